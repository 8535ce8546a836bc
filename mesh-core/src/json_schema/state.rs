//! The byte-level automaton behind [`SchemaState`]: the frames a reading
//! of a document stacks (an object, a key or a literal being read, an array,
//! a plain-JSON value, a number), and the step that reads one byte in every
//! open reading of a compiled [`JsonSchema`], starting values of its nodes
//! and narrowing keys and literals one byte at a time.

use std::sync::Arc;

use super::{JsonSchema, Node, MAX_DEPTH, MAX_READINGS};
use crate::json_mode::JsonState;

/// Where the object property keys (key frames) and literals stand.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ObjAt {
    /// Just after `{`.
    First,
    /// After `,`: a key must come.
    Key,
    /// After the key of property `i`: `:`.
    Colon(u8),
    /// After a value: `,` or `}`.
    After,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ArrAt {
    First,
    Value,
    After,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Frame {
    /// A value of the node must start here.
    Value(u32),
    /// Inside an object; `next` is the first property that may still come.
    Obj { node: u32, next: u8, at: ObjAt },
    /// Reading a key of object `node`: the candidates (bit i: property i)
    /// matching so far, `pos` bytes of their text read.
    Key { node: u32, pos: u16, cands: u64 },
    /// Inside an array; `count` items started.
    Arr { node: u32, count: u32, at: ArrAt },
    /// Reading one of the literals of `node`.
    Lit { node: u32, pos: u16, cands: u64 },
    /// A string, number, `true`/`false`/`null`, or a free object / array:
    /// plain JSON (the JSON-mode automaton, from a value's start).
    Json(JsonState),
    /// A number; integers take no fraction or exponent.
    Num { state: JsonState, integer: bool },
}

/// One reading: a stack of frames (empty: the root object is closed).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Reading {
    stack: Vec<Frame>,
    ws: u8,
}

/// Where a document stands after some bytes (see the [module docs](super)).
#[derive(Clone, Debug, PartialEq)]
pub struct SchemaState {
    schema: Arc<JsonSchema>,
    readings: Vec<Reading>,
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl SchemaState {
    /// Nothing read yet.
    pub fn new(schema: Arc<JsonSchema>) -> SchemaState {
        let root = schema.root;
        SchemaState {
            schema,
            readings: vec![Reading {
                stack: vec![Frame::Value(root)],
                ws: 0,
            }],
        }
    }

    /// Whether the root object is complete (nothing may follow).
    pub fn is_complete(&self) -> bool {
        self.readings.iter().any(|r| r.stack.is_empty())
    }

    /// The state after `bytes`, or `None` if they cannot continue a document
    /// the schema accepts.
    pub fn feed(&self, bytes: &[u8]) -> Option<SchemaState> {
        let mut readings = self.readings.clone();
        for &b in bytes {
            readings = step_all(&self.schema, &readings, b)?;
        }
        Some(SchemaState {
            schema: self.schema.clone(),
            readings,
        })
    }

    /// Whether `bytes` can continue the document (as [`feed`](Self::feed),
    /// without keeping the result).
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        let mut readings = std::borrow::Cow::Borrowed(&self.readings);
        for &b in bytes {
            match step_all(&self.schema, &readings, b) {
                Some(r) => readings = std::borrow::Cow::Owned(r),
                None => return false,
            }
        }
        true
    }
}

fn step_all(schema: &JsonSchema, readings: &[Reading], b: u8) -> Option<Vec<Reading>> {
    let mut out = Vec::new();
    for r in readings {
        step(schema, r.clone(), b, &mut out, 0);
        if out.len() > MAX_READINGS {
            return None;
        }
    }
    if out.is_empty() {
        None
    } else {
        Some(out)
    }
}

fn emit(out: &mut Vec<Reading>, r: Reading) {
    if !out.contains(&r) {
        out.push(r);
    }
}

/// Reads byte `b` in reading `r`; every reading it leads to goes to `out`.
fn step(schema: &JsonSchema, mut r: Reading, b: u8, out: &mut Vec<Reading>, depth: u32) {
    if depth > 2 * MAX_DEPTH as u32 + 8 {
        return;
    }
    let Some(&top) = r.stack.last() else {
        return; // complete: nothing may follow
    };
    let ws = is_ws(b);
    // Structural positions take limited whitespace.
    let structural = matches!(top, Frame::Value(_) | Frame::Obj { .. } | Frame::Arr { .. });
    if ws && structural {
        if r.ws < crate::json_mode::MAX_WHITESPACE {
            r.ws += 1;
            emit(out, r);
        }
        return;
    }
    if structural {
        r.ws = 0;
    }
    let n = r.stack.len() - 1;
    match top {
        Frame::Value(node) => {
            r.stack.pop();
            start_value(schema, r, node, b, out, depth);
        }
        Frame::Obj { node, next, at } => {
            let Node::Object(props) = schema.node(node) else {
                return;
            };
            let rest_optional = props[next as usize..].iter().all(|p| !p.2);
            match (at, b) {
                (ObjAt::First | ObjAt::After, b'}') if rest_optional => {
                    r.stack.pop();
                    emit(out, r);
                }
                (ObjAt::First | ObjAt::Key, b'"') => {
                    // Candidates: properties from `next` up to the first required one.
                    let mut cands = 0u64;
                    for (i, p) in props.iter().enumerate().skip(next as usize) {
                        cands |= 1 << i;
                        if p.2 {
                            break;
                        }
                    }
                    if cands != 0 {
                        r.stack.push(Frame::Key {
                            node,
                            pos: 1,
                            cands,
                        });
                        emit(out, r);
                    }
                }
                (ObjAt::After, b',') if (next as usize) < props.len() => {
                    r.stack[n] = Frame::Obj {
                        node,
                        next,
                        at: ObjAt::Key,
                    };
                    emit(out, r);
                }
                (ObjAt::Colon(i), b':') => {
                    if r.stack.len() >= 2 * MAX_DEPTH {
                        return;
                    }
                    r.stack[n] = Frame::Obj {
                        node,
                        next: i + 1,
                        at: ObjAt::After,
                    };
                    r.stack.push(Frame::Value(props[i as usize].1));
                    emit(out, r);
                }
                _ => {}
            }
        }
        Frame::Key { node, pos, cands } => {
            let Node::Object(props) = schema.node(node) else {
                return;
            };
            let pos = pos as usize;
            let left = with_byte_at(props.iter().map(|p| &p.0[..]), cands, pos, b);
            let done =
                (0..props.len()).find(|&i| left & (1 << i) != 0 && props[i].0.len() == pos + 1);
            if let Some(i) = done {
                // A key's text ends with its only unescaped quote: no other
                // candidate continues past it.
                r.stack.pop();
                let m = r.stack.len() - 1;
                r.stack[m] = Frame::Obj {
                    node,
                    next: i as u8,
                    at: ObjAt::Colon(i as u8),
                };
                emit(out, r);
            } else if left != 0 {
                r.stack[n] = Frame::Key {
                    node,
                    pos: pos as u16 + 1,
                    cands: left,
                };
                emit(out, r);
            }
        }
        Frame::Arr { node, count, at } => {
            let Node::Array { items, min, max } = *schema.node(node) else {
                return;
            };
            match (at, b) {
                (ArrAt::First | ArrAt::After, b']') if count >= min => {
                    r.stack.pop();
                    emit(out, r);
                }
                (ArrAt::After, b',') if count < max => {
                    r.stack[n] = Frame::Arr {
                        node,
                        count,
                        at: ArrAt::Value,
                    };
                    emit(out, r);
                }
                (ArrAt::First | ArrAt::Value, _) if count < max => {
                    if r.stack.len() >= 2 * MAX_DEPTH {
                        return;
                    }
                    r.stack[n] = Frame::Arr {
                        node,
                        count: count + 1,
                        at: ArrAt::After,
                    };
                    start_value(schema, r, items, b, out, depth + 1);
                }
                _ => {}
            }
        }
        Frame::Lit { node, pos, cands } => {
            let Node::Literals(texts) = schema.node(node) else {
                return;
            };
            let left = with_byte_at(texts.iter().map(|t| &t[..]), cands, pos as usize, b);
            let complete =
                (0..texts.len()).any(|i| cands & (1 << i) != 0 && texts[i].len() == pos as usize);
            if left != 0 {
                let mut r2 = r.clone();
                r2.stack[n] = Frame::Lit {
                    node,
                    pos: pos + 1,
                    cands: left,
                };
                emit(out, r2);
            }
            if complete {
                // A literal ended before `b`: the enclosing frame reads it.
                r.stack.pop();
                step(schema, r, b, out, depth + 1);
            }
        }
        Frame::Json(state) => {
            if let Some(s) = state.step(b) {
                if s.is_complete() {
                    r.stack.pop();
                } else {
                    r.stack[n] = Frame::Json(s);
                }
                emit(out, r);
            } else if state.value_complete() {
                // A scalar's end shows only in the byte after it.
                r.stack.pop();
                step(schema, r, b, out, depth + 1);
            }
        }
        Frame::Num { state, integer } => {
            let next = if integer && matches!(b, b'.' | b'e' | b'E') {
                None
            } else {
                state.step(b).filter(|s| s.in_number())
            };
            if let Some(s) = next {
                r.stack[n] = Frame::Num { state: s, integer };
                emit(out, r);
            } else if state.value_complete() {
                r.stack.pop();
                step(schema, r, b, out, depth + 1);
            }
        }
    }
}

/// Byte `b` starts a value of `node` (its frame already popped from `r`).
fn start_value(
    schema: &JsonSchema,
    mut r: Reading,
    node: u32,
    b: u8,
    out: &mut Vec<Reading>,
    depth: u32,
) {
    if depth > 2 * MAX_DEPTH as u32 + 8 {
        return;
    }
    let json = |r: &mut Reading, out: &mut Vec<Reading>| {
        if let Some(s) = JsonState::value_start().step(b) {
            r.stack.push(Frame::Json(s));
            emit(out, r.clone());
        }
    };
    match schema.node(node) {
        Node::AnyOf(alts) => {
            for &a in alts {
                start_value(schema, r.clone(), a, b, out, depth + 1);
            }
        }
        Node::Object(_) if b == b'{' => {
            r.stack.push(Frame::Obj {
                node,
                next: 0,
                at: ObjAt::First,
            });
            emit(out, r);
        }
        Node::FreeObject if b == b'{' => json(&mut r, out),
        Node::FreeArray if b == b'[' => json(&mut r, out),
        Node::Array { .. } if b == b'[' => {
            r.stack.push(Frame::Arr {
                node,
                count: 0,
                at: ArrAt::First,
            });
            emit(out, r);
        }
        Node::String if b == b'"' => json(&mut r, out),
        Node::Boolean if matches!(b, b't' | b'f') => json(&mut r, out),
        Node::Null if b == b'n' => json(&mut r, out),
        Node::Number | Node::Integer if b == b'-' || b.is_ascii_digit() => {
            if let Some(state) = JsonState::value_start().step(b) {
                r.stack.push(Frame::Num {
                    state,
                    integer: *schema.node(node) == Node::Integer,
                });
                emit(out, r);
            }
        }
        Node::Literals(texts) => {
            let cands = with_byte_at(texts.iter().map(|t| &t[..]), u64::MAX, 0, b);
            if cands != 0 {
                r.stack.push(Frame::Lit {
                    node,
                    pos: 1,
                    cands,
                });
                emit(out, r);
            }
        }
        _ => {}
    }
}

/// The candidates of `cands` (bit `i` for the `i`th text) whose byte at
/// `pos` is `b`: how a key or literal being read narrows, one byte at a time.
fn with_byte_at<'a>(texts: impl Iterator<Item = &'a [u8]>, cands: u64, pos: usize, b: u8) -> u64 {
    texts
        .enumerate()
        .filter(|&(i, t)| cands & (1 << i) != 0 && t.get(pos) == Some(&b))
        .fold(0, |m, (i, _)| m | 1 << i)
}
