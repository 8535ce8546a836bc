use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use crate::value::{Enumerator, Object, ObjectRepr, Value};

/// This object exists for the `namespace` function.
///
/// It's special in that it behaves like a dictionary in many ways but it's the only
/// object that can be used with `{% set %}` assignments.  This is used internally
/// in the vm via downcasting.
#[derive(Debug, Default)]
pub(crate) struct Namespace {
    data: Mutex<BTreeMap<Arc<str>, Value>>,
}

impl Object for Namespace {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        self.data.lock().unwrap().get(some!(key.as_str())).cloned()
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let data = self.data.lock().unwrap();
        let keys = data.keys().cloned().map(Value::from);
        Enumerator::Values(keys.collect())
    }
}

impl Namespace {
    pub(crate) fn set_value(&self, key: &str, value: Value) {
        self.data.lock().unwrap().insert(key.into(), value);
    }

    /// mesh-llm patch: whether `value` holds this namespace, directly or
    /// through lists, maps, iterables or other namespaces (past
    /// `MAX_CYCLE_VISITS` values it gives up and says yes). Storing such a
    /// value in the namespace would make a cycle, and rendering, comparing
    /// or serializing a cyclic value recurses until the stack overflows.
    pub(crate) fn would_hold_itself(&self, value: &Value) -> bool {
        let mut stack = vec![value.clone()];
        let mut visits = 0usize;
        while let Some(v) = stack.pop() {
            visits += 1;
            if visits > MAX_CYCLE_VISITS {
                return true;
            }
            let Some(obj) = v.as_object() else {
                continue;
            };
            if let Some(ns) = obj.downcast_ref::<Namespace>() {
                if std::ptr::eq(ns, self) {
                    return true;
                }
                stack.extend(ns.data.lock().unwrap().values().cloned());
                continue;
            }
            let items: Box<dyn Iterator<Item = Value>> = match obj.repr() {
                ObjectRepr::Plain => continue,
                ObjectRepr::Map => match obj.try_iter_pairs() {
                    Some(pairs) => Box::new(pairs.flat_map(|(k, v)| [k, v])),
                    None => continue,
                },
                ObjectRepr::Seq | ObjectRepr::Iterable => match obj.try_iter() {
                    Some(items) => items,
                    None => continue,
                },
            };
            for item in items {
                if stack.len() > MAX_CYCLE_VISITS {
                    return true;
                }
                stack.push(item);
            }
        }
        false
    }
}

/// mesh-llm patch: values [`Namespace::would_hold_itself`] looks at.
const MAX_CYCLE_VISITS: usize = 10_000;
