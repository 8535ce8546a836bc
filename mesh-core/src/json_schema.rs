//! Structured output: sampling constrained to JSON that a JSON Schema accepts
//! (Ollama's `format: {schema}`, OpenAI's `response_format: json_schema`).
//!
//! [`JsonSchema::compile`] turns a schema (a subset of draft 2020-12, below)
//! into a graph of nodes; [`SchemaState`] is a byte-level automaton over it: a
//! set of stacks of frames (a set, because `anyOf` and enum values that are
//! prefixes of each other leave several readings open until a later byte
//! decides). [`SchemaMode`] masks, before each draw, every token whose bytes
//! cannot continue a document the schema accepts, as [`crate::json_mode`]
//! does for plain JSON, and generation ends when the root object closes.
//!
//! Supported: `type` (one or a list), `properties` with `required`,
//! `additionalProperties` (extra keys are never generated, which every value
//! of it allows), `items` with `minItems` / `maxItems`, `enum`, `const`,
//! `anyOf`, `oneOf` (generated as `anyOf`: overlapping alternatives are not
//! excluded), `allOf` of one schema, local `$ref` (`#/$defs/..`,
//! `#/definitions/..`, recursion included), `true`, and the annotations
//! (`title`, `description`, `default`, `examples`, ...), `format` among them:
//! draft 2020-12 makes it an annotation unless a schema opts into format
//! assertion, so a `"format": "date-time"` string (pydantic's `datetime`,
//! `EmailStr`, `UUID`) is generated as a plain string. Keywords that
//! constrain values in ways the automaton does not enforce (`pattern`,
//! `minLength`, `minimum`, `uniqueItems`, ...) are refused by name rather
//! than silently ignored. The root must be an object. Properties are generated in
//! the order of `required`, then the optional ones by name; every required
//! property appears, optional ones may be left out. Enum and const values are
//! generated in compact form (`serde_json`'s).

mod state;

pub use self::state::SchemaState;

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::tokenizer::{Pieces, Tokenizer};
use crate::{Error, Result};

/// Most properties of one object, and values of one `enum`.
pub const MAX_CHOICES: usize = 64;
/// Most nodes one schema compiles to.
pub const MAX_NODES: usize = 4096;
/// Deepest nesting of values in a generated document.
pub const MAX_DEPTH: usize = 64;
/// Most readings the automaton keeps open at once.
const MAX_READINGS: usize = 64;
/// Longest property name or enum / const value, in bytes of JSON text.
pub const MAX_LITERAL: usize = 4096;

#[derive(Clone, Debug, PartialEq)]
enum Node {
    /// An object with these properties (key as JSON text with its quotes,
    /// value node, required), generated in this order; no other keys.
    Object(Vec<(Vec<u8>, u32, bool)>),
    /// Any object, or any array (plain JSON inside).
    FreeObject,
    FreeArray,
    Array {
        items: u32,
        min: u32,
        max: u32,
    },
    String,
    Number,
    Integer,
    Boolean,
    Null,
    /// One of these JSON texts, byte for byte.
    Literals(Vec<Vec<u8>>),
    AnyOf(Vec<u32>),
    /// Not compiled yet (a `$ref` being resolved).
    Pending,
}

/// A compiled JSON Schema (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq)]
pub struct JsonSchema {
    nodes: Vec<Node>,
    root: u32,
}

const ANNOTATIONS: &[&str] = &[
    "$schema",
    "$id",
    "$comment",
    "$anchor",
    "title",
    "description",
    "default",
    "examples",
    "readOnly",
    "writeOnly",
    "deprecated",
    "format",
    "contentEncoding",
    "contentMediaType",
    "$defs",
    "definitions",
    "strict",
];

struct Compiler<'a> {
    root: &'a Value,
    nodes: Vec<Node>,
    refs: HashMap<String, u32>,
}

fn bad(message: impl Into<String>) -> Error {
    Error::InvalidArgument(format!("JSON schema: {}", message.into()))
}

impl JsonSchema {
    /// Compiles `schema` (see the [module docs](self) for what is supported);
    /// anything else is [`Error::InvalidArgument`] naming the keyword.
    pub fn compile(schema: &Value) -> Result<JsonSchema> {
        let mut c = Compiler {
            root: schema,
            nodes: Vec::new(),
            refs: HashMap::new(),
        };
        let root = c.node(schema, 0)?;
        let mut s = JsonSchema {
            nodes: c.nodes,
            root,
        };
        s.flatten()?;
        match s.resolve_objects(root) {
            Some(true) => Ok(s),
            _ => Err(bad("the root must be an object (\"type\": \"object\")")),
        }
    }

    /// Whether every reading of node `n` is an object.
    fn resolve_objects(&self, n: u32) -> Option<bool> {
        self.resolve_objects_depth(n, 0)
    }

    fn resolve_objects_depth(&self, n: u32, depth: usize) -> Option<bool> {
        if depth > 64 {
            return None;
        }
        Some(match &self.nodes[n as usize] {
            Node::Object(_) | Node::FreeObject => true,
            Node::AnyOf(alts) => {
                for &a in alts {
                    if self.resolve_objects_depth(a, depth + 1) != Some(true) {
                        return Some(false);
                    }
                }
                true
            }
            Node::Literals(l) => l.iter().all(|t| t.first() == Some(&b'{')),
            _ => false,
        })
    }

    fn node(&self, n: u32) -> &Node {
        &self.nodes[n as usize]
    }

    /// Replaces the alternatives of every `anyOf` by the nodes that are not
    /// themselves `anyOf` (references compile to one-alternative `anyOf`s),
    /// so starting a value never recurses. A cycle of references that never
    /// reaches a value is refused, as is a union of more than 4 x
    /// [`MAX_CHOICES`] alternatives.
    fn flatten(&mut self) -> Result<()> {
        for n in 0..self.nodes.len() {
            if !matches!(self.nodes[n], Node::AnyOf(_)) {
                continue;
            }
            let mut leaves = Vec::new();
            let mut path = Vec::new();
            self.leaves(n as u32, &mut path, &mut leaves)?;
            self.nodes[n] = Node::AnyOf(leaves);
        }
        Ok(())
    }

    fn leaves(&self, n: u32, path: &mut Vec<u32>, out: &mut Vec<u32>) -> Result<()> {
        match &self.nodes[n as usize] {
            Node::AnyOf(alts) => {
                if path.contains(&n) {
                    return Err(bad("a cycle of references that never reaches a value"));
                }
                path.push(n);
                for &a in alts {
                    self.leaves(a, path, out)?;
                }
                path.pop();
            }
            Node::Pending => return Err(bad("an unresolved reference")),
            _ => {
                if !out.contains(&n) {
                    if out.len() >= 4 * MAX_CHOICES {
                        return Err(bad(format!(
                            "more than {} alternatives in one union",
                            4 * MAX_CHOICES
                        )));
                    }
                    out.push(n);
                }
            }
        }
        Ok(())
    }
}

impl Compiler<'_> {
    fn push(&mut self, node: Node) -> Result<u32> {
        if self.nodes.len() >= MAX_NODES {
            return Err(bad(format!("more than {MAX_NODES} nodes")));
        }
        self.nodes.push(node);
        Ok(self.nodes.len() as u32 - 1)
    }

    fn any(&mut self) -> Result<u32> {
        let alts = vec![
            self.push(Node::FreeObject)?,
            self.push(Node::FreeArray)?,
            self.push(Node::String)?,
            self.push(Node::Number)?,
            self.push(Node::Boolean)?,
            self.push(Node::Null)?,
        ];
        self.push(Node::AnyOf(alts))
    }

    fn node(&mut self, schema: &Value, depth: usize) -> Result<u32> {
        if depth > 128 {
            return Err(bad("nested too deeply"));
        }
        let map = match schema {
            Value::Bool(true) => return self.any(),
            Value::Bool(false) => return Err(bad("`false` accepts nothing")),
            Value::Object(m) => m,
            other => return Err(bad(format!("expected an object, found {other}"))),
        };
        if let Some(r) = map.get("$ref") {
            return self.reference(r, depth);
        }
        for key in map.keys() {
            let known = ANNOTATIONS.contains(&key.as_str())
                || matches!(
                    key.as_str(),
                    "type"
                        | "properties"
                        | "required"
                        | "additionalProperties"
                        | "items"
                        | "minItems"
                        | "maxItems"
                        | "enum"
                        | "const"
                        | "anyOf"
                        | "oneOf"
                        | "allOf"
                );
            if !known {
                return Err(bad(format!("keyword {key:?} is not supported")));
            }
        }
        if let Some(v) = map.get("const") {
            return self.push(Node::Literals(vec![compact(v)?]));
        }
        if let Some(v) = map.get("enum") {
            let Value::Array(values) = v else {
                return Err(bad("enum must be an array"));
            };
            if values.is_empty() || values.len() > MAX_CHOICES {
                return Err(bad(format!("enum must hold 1 to {MAX_CHOICES} values")));
            }
            let texts = values.iter().map(compact).collect::<Result<Vec<_>>>()?;
            return self.push(Node::Literals(texts));
        }
        for key in ["anyOf", "oneOf"] {
            if let Some(v) = map.get(key) {
                let Value::Array(alts) = v else {
                    return Err(bad(format!("{key} must be an array")));
                };
                if alts.is_empty() || alts.len() > MAX_CHOICES {
                    return Err(bad(format!("{key} must hold 1 to {MAX_CHOICES} schemas")));
                }
                let ids = alts
                    .iter()
                    .map(|a| self.node(a, depth + 1))
                    .collect::<Result<Vec<_>>>()?;
                return self.push(Node::AnyOf(ids));
            }
        }
        if let Some(v) = map.get("allOf") {
            return match v {
                Value::Array(one) if one.len() == 1 => self.node(&one[0], depth + 1),
                _ => Err(bad("allOf is supported with exactly one schema")),
            };
        }
        match map.get("type") {
            None => {
                if map.contains_key("properties") || map.contains_key("required") {
                    self.typed(map, "object", depth)
                } else if map.contains_key("items") {
                    self.typed(map, "array", depth)
                } else {
                    self.any()
                }
            }
            Some(Value::String(t)) => self.typed(map, t, depth),
            Some(Value::Array(types)) if !types.is_empty() && types.len() <= 7 => {
                let mut ids = Vec::new();
                for t in types {
                    let Value::String(t) = t else {
                        return Err(bad(format!("type {t} is not a string")));
                    };
                    ids.push(self.typed(map, t, depth)?);
                }
                if ids.len() == 1 {
                    Ok(ids[0])
                } else {
                    self.push(Node::AnyOf(ids))
                }
            }
            Some(other) => Err(bad(format!(
                "type must be a string or a list, found {other}"
            ))),
        }
    }

    fn typed(&mut self, map: &Map<String, Value>, t: &str, depth: usize) -> Result<u32> {
        let node = match t {
            "object" => return self.object(map, depth),
            "array" => return self.array(map, depth),
            "string" => Node::String,
            "number" => Node::Number,
            "integer" => Node::Integer,
            "boolean" => Node::Boolean,
            "null" => Node::Null,
            other => return Err(bad(format!("unknown type {other:?}"))),
        };
        self.push(node)
    }

    fn object(&mut self, map: &Map<String, Value>, depth: usize) -> Result<u32> {
        let required: Vec<&str> = match map.get("required") {
            None => Vec::new(),
            Some(Value::Array(r)) => r
                .iter()
                .map(|k| k.as_str().ok_or_else(|| bad("required must list strings")))
                .collect::<Result<_>>()?,
            Some(_) => return Err(bad("required must be an array")),
        };
        let props = match map.get("properties") {
            None => None,
            Some(Value::Object(p)) => Some(p),
            Some(_) => return Err(bad("properties must be an object")),
        };
        let closed = matches!(map.get("additionalProperties"), Some(Value::Bool(false)));
        match map.get("additionalProperties") {
            None | Some(Value::Bool(_)) => {}
            Some(Value::Object(_)) if props.is_some_and(|p| !p.is_empty()) => {}
            Some(_) => {
                return Err(bad(
                    "additionalProperties with a schema is supported only beside properties",
                ))
            }
        }
        let Some(props) = props.filter(|p| !p.is_empty() || closed) else {
            if !required.is_empty() {
                return Err(bad("required names properties that are not declared"));
            }
            return self.push(Node::FreeObject);
        };
        for r in &required {
            if !props.contains_key(*r) {
                return Err(bad(format!("required property {r:?} is not declared")));
            }
        }
        if props.len() > MAX_CHOICES {
            return Err(bad(format!("more than {MAX_CHOICES} properties")));
        }
        let mut order: Vec<&str> = Vec::new();
        for r in &required {
            if !order.contains(r) {
                order.push(r);
            }
        }
        for k in props.keys() {
            if !order.contains(&k.as_str()) {
                order.push(k);
            }
        }
        let id = self.push(Node::Pending)?;
        let mut out = Vec::new();
        for k in order {
            let value = self.node(&props[k], depth + 1)?;
            let key = compact(&Value::String(k.to_string()))?;
            out.push((key, value, required.contains(&k)));
        }
        self.nodes[id as usize] = Node::Object(out);
        Ok(id)
    }

    fn array(&mut self, map: &Map<String, Value>, depth: usize) -> Result<u32> {
        let count = |key: &str, default: u64| -> Result<u32> {
            match map.get(key) {
                None => Ok(default.min(u32::MAX as u64) as u32),
                Some(v) => v
                    .as_u64()
                    .map(|n| n.min(u32::MAX as u64) as u32)
                    .ok_or_else(|| bad(format!("{key} must be a non-negative integer"))),
            }
        };
        let (min, max) = (count("minItems", 0)?, count("maxItems", u64::MAX)?);
        if min > max {
            return Err(bad("minItems is above maxItems"));
        }
        let items = match map.get("items") {
            None => {
                if min == 0 && max == u32::MAX {
                    return self.push(Node::FreeArray);
                }
                self.any()?
            }
            Some(s) => self.node(s, depth + 1)?,
        };
        self.push(Node::Array { items, min, max })
    }

    fn reference(&mut self, r: &Value, depth: usize) -> Result<u32> {
        let Value::String(r) = r else {
            return Err(bad("$ref must be a string"));
        };
        if let Some(&id) = self.refs.get(r) {
            return Ok(id);
        }
        let target = match r.strip_prefix('#') {
            Some(pointer) => self.root.pointer(pointer),
            None => None,
        }
        .ok_or_else(|| bad(format!("$ref {r:?} is not a local reference that resolves")))?;
        // A placeholder first, so a recursive reference finds it; the target
        // is compiled into it.
        let id = self.push(Node::Pending)?;
        self.refs.insert(r.clone(), id);
        let inner = self.node(target, depth + 1)?;
        self.nodes[id as usize] = Node::AnyOf(vec![inner]);
        Ok(id)
    }
}

fn compact(v: &Value) -> Result<Vec<u8>> {
    let text = serde_json::to_vec(v).map_err(|e| bad(e.to_string()))?;
    if text.len() > MAX_LITERAL {
        return Err(bad(format!(
            "a property name or enum value of {} bytes (at most {MAX_LITERAL})",
            text.len()
        )));
    }
    Ok(text)
}

/// Structured output over one tokenizer's vocabulary: which tokens may come
/// next (the counterpart of [`crate::json_mode::JsonMode`]).
#[derive(Clone, Debug)]
pub struct SchemaMode<'t> {
    pieces: &'t Pieces,
    state: SchemaState,
}

impl<'t> SchemaMode<'t> {
    /// Structured output for `tok`'s vocabulary, at the start of the document.
    pub fn new(tok: &'t Tokenizer, schema: Arc<JsonSchema>) -> SchemaMode<'t> {
        SchemaMode {
            pieces: tok.pieces(),
            state: SchemaState::new(schema),
        }
    }

    /// Whether the document is complete (generation should end).
    pub fn is_complete(&self) -> bool {
        self.state.is_complete()
    }

    /// Sets to NaN the logit of every token that cannot come next (as
    /// [`JsonMode::mask`](crate::json_mode::JsonMode::mask)); returns how
    /// many remain, an error if none does. Each token's first byte is tried
    /// once per byte value, so tokens refused there cost nothing more.
    pub fn mask(&self, logits: &mut [f32]) -> Result<usize> {
        let mut first: Vec<Option<Option<SchemaState>>> = vec![None; 256];
        crate::json_mode::mask_tokens(self.pieces, logits, |p| {
            first[p[0] as usize]
                .get_or_insert_with(|| self.state.feed(&p[..1]))
                .as_ref()
                .is_some_and(|s| s.accepts(&p[1..]))
        })
        .ok_or_else(|| {
            Error::InvalidArgument(
                "JSON schema: no token of the vocabulary continues the document".into(),
            )
        })
    }

    /// Moves past token `id` (one [`mask`](Self::mask) allowed).
    pub fn advance(&mut self, id: u32) -> Result<()> {
        self.state = self
            .pieces
            .get(id as usize)
            .and_then(|p| self.state.feed(p))
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "JSON schema: token {id} does not continue the document"
                ))
            })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
