use super::*;
use proptest::prelude::*;
use serde_json::json;

fn compiled(v: &Value) -> Arc<JsonSchema> {
    Arc::new(JsonSchema::compile(v).unwrap_or_else(|e| panic!("{v}: {e}")))
}

fn complete(schema: &Arc<JsonSchema>, text: &str) -> bool {
    SchemaState::new(schema.clone())
        .feed(text.as_bytes())
        .is_some_and(|s| s.is_complete())
}

/// A person, as pydantic writes a model with a nested one and an enum.
fn person() -> Value {
    json!({
        "$defs": {
            "Pet": {
                "properties": {
                    "kind": {"enum": ["cat", "dog"], "title": "Kind", "type": "string"},
                    "age": {"type": "integer"}
                },
                "required": ["kind"],
                "title": "Pet",
                "type": "object"
            }
        },
        "properties": {
            "name": {"title": "Name", "type": "string"},
            "age": {"type": "integer"},
            "height": {"type": "number"},
            "nick": {"anyOf": [{"type": "string"}, {"type": "null"}], "default": null},
            "pets": {"type": "array", "items": {"$ref": "#/$defs/Pet"}, "maxItems": 2},
            "ok": {"type": "boolean"}
        },
        "required": ["name", "age", "pets"],
        "title": "Person",
        "type": "object"
    })
}

#[test]
fn documents_the_schema_accepts_are_read_and_others_refused() {
    let s = compiled(&person());
    for ok in [
        r#"{"name":"Ann","age":31,"pets":[]}"#,
        r#"{ "name": "Zoë", "age": -2, "pets": [ {"kind": "dog", "age": 3} ], "height": 1.7e0, "ok": true }"#,
        r#"{"name":"A","age":0,"pets":[{"kind":"cat"},{"kind":"cat"}],"nick":null}"#,
        r#"{"name":"A","age":10,"pets":[],"nick":"x","ok":false}"#,
    ] {
        assert!(complete(&s, ok), "{ok}");
        assert!(valid(
            &person(),
            &person(),
            &serde_json::from_str(ok).unwrap()
        ));
    }
    for bad in [
        r#"{"age":31,"name":"Ann","pets":[]}"#,   // required order
        r#"{"name":"Ann","pets":[]}"#,            // age missing
        r#"{"name":"Ann","age":31.5,"pets":[]}"#, // integer
        r#"{"name":"Ann","age":1,"pets":[{"kind":"cow"}]}"#, // enum
        r#"{"name":"Ann","age":1,"pets":[{"kind":"cat"},{"kind":"cat"},{"kind":"cat"}]}"#,
        r#"{"name":"Ann","age":1,"pets":[],"extra":1}"#,
        r#"{"name":1,"age":1,"pets":[]}"#,
        r#"{"name":"Ann","age":1,"pets":[],"ok":true,"height":1}"#, // optional order
        r#"[]"#,
    ] {
        assert!(!complete(&s, bad), "{bad}");
    }
    // A prefix is accepted, and the document is not complete until it closes.
    let st = SchemaState::new(s.clone())
        .feed(br#"{"name":"Ann","age":3"#)
        .unwrap();
    assert!(!st.is_complete());
    assert!(st.accepts(b"1,"));
    assert!(!st.accepts(b"}"));
    assert!(st.feed(br#","pets":[]}"#).unwrap().is_complete());
    assert!(!st.feed(br#","pets":[]} "#).is_some_and(|s| s.is_complete()));
}

#[test]
fn format_is_an_annotation() {
    // Draft 2020-12: `format` asserts nothing unless a schema opts in.
    let s = compiled(&json!({"type": "object", "properties": {
        "when": {"type": "string", "format": "date-time"}}, "required": ["when"]}));
    assert!(complete(&s, r#"{"when":"yesterday"}"#));
    assert!(!complete(&s, r#"{"when":1}"#));
}

#[test]
fn enums_whose_values_are_prefixes_of_each_other_stay_open() {
    let s = compiled(&json!({
        "type": "object",
        "properties": {"n": {"enum": [1, 10, 100, "a", [1, 2], {"k": null}]}},
        "required": ["n"]
    }));
    for (text, ok) in [
        (r#"{"n":1}"#, true),
        (r#"{"n":10}"#, true),
        (r#"{"n":100 }"#, true),
        (r#"{"n":1000}"#, false),
        (r#"{"n":"a"}"#, true),
        (r#"{"n":[1,2]}"#, true),
        (r#"{"n":[1, 2]}"#, false),
        (r#"{"n":{"k":null}}"#, true),
        (r#"{"n":2}"#, false),
    ] {
        assert_eq!(complete(&s, text), ok, "{text}");
    }
}

#[test]
fn recursive_references_and_free_values() {
    let tree = json!({
        "$defs": {"Node": {"type": "object", "properties": {
            "v": {}, "kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}
        }, "required": ["v"]}},
        "$ref": "#/$defs/Node"
    });
    let s = compiled(&tree);
    let doc = r#"{"v":{"any":[1,"x",null]},"kids":[{"v":2},{"v":"s","kids":[{"v":[]}]}]}"#;
    assert!(complete(&s, doc));
    assert!(valid(&tree, &tree, &serde_json::from_str(doc).unwrap()));
    assert!(!complete(&s, r#"{"kids":[]}"#));
}

#[test]
fn unsupported_keywords_and_bad_schemas_are_refused_by_name() {
    for (schema, needle) in [
        (
            json!({"type": "object", "properties": {"a": {"type": "string", "pattern": "x"}}}),
            "pattern",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "string", "maxLength": 3}}}),
            "maxLength",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "integer", "minimum": 0}}}),
            "minimum",
        ),
        (json!({"type": "string"}), "root must be an object"),
        (
            json!({"type": "object", "required": ["a"], "properties": {"b": {}}}),
            "\"a\"",
        ),
        (json!({"$ref": "#/$defs/Missing"}), "Missing"),
        (
            json!({"$ref": "http://example.com/s.json"}),
            "local reference",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "array", "minItems": 3, "maxItems": 1}}}),
            "minItems",
        ),
        (
            json!({"type": "object", "properties": {"a": {"enum": []}}}),
            "enum",
        ),
        (
            json!({"type": "object", "properties": {"a": {"type": "date"}}}),
            "date",
        ),
        (json!(false), "false"),
        (
            json!({"type": "object", "properties": {("k".repeat(5000)): {}}}),
            "at most 4096",
        ),
        (
            json!({"type": "object", "properties": {"a": {"const": "v".repeat(5000)}}}),
            "at most 4096",
        ),
        (json!(7), "expected an object"),
    ] {
        let e = JsonSchema::compile(&schema).unwrap_err().to_string();
        assert!(e.contains(needle), "{schema}: {e}");
    }
    // A reference cycle that never reaches a value is refused, not followed forever.
    let cycle = json!({"$defs": {"A": {"$ref": "#/$defs/B"}, "B": {"$ref": "#/$defs/A"}}, "$ref": "#/$defs/A"});
    assert!(JsonSchema::compile(&cycle).is_err());
}

/// An independent check of the supported subset, to judge what the
/// automaton lets through.
fn valid(root: &Value, schema: &Value, v: &Value) -> bool {
    let Value::Object(m) = schema else {
        return schema == &Value::Bool(true);
    };
    if let Some(Value::String(r)) = m.get("$ref") {
        return valid(root, root.pointer(&r[1..]).unwrap(), v);
    }
    if let Some(c) = m.get("const") {
        return c == v;
    }
    if let Some(Value::Array(e)) = m.get("enum") {
        return e.contains(v);
    }
    for key in ["anyOf", "oneOf"] {
        if let Some(Value::Array(alts)) = m.get(key) {
            return alts.iter().any(|a| valid(root, a, v));
        }
    }
    if let Some(Value::Array(all)) = m.get("allOf") {
        return all.iter().all(|a| valid(root, a, v));
    }
    let type_ok = |t: &str| match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        // An integer beyond 64 bits parses as a float with no fraction.
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    };
    match m.get("type") {
        Some(Value::String(t)) if !type_ok(t) => return false,
        Some(Value::Array(ts)) if !ts.iter().any(|t| type_ok(t.as_str().unwrap())) => return false,
        _ => {}
    }
    if let Value::Object(o) = v {
        if let Some(Value::Array(req)) = m.get("required") {
            if !req.iter().all(|k| o.contains_key(k.as_str().unwrap())) {
                return false;
            }
        }
        let props = m.get("properties").and_then(|p| p.as_object());
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(s) if !valid(root, s, x) => return false,
                Some(_) => {}
                None if m.get("additionalProperties") == Some(&Value::Bool(false)) => return false,
                None => {}
            }
        }
    }
    if let Value::Array(a) = v {
        if let Some(items) = m.get("items") {
            if !a.iter().all(|x| valid(root, items, x)) {
                return false;
            }
        }
        let n = a.len() as u64;
        if m.get("minItems")
            .and_then(|x| x.as_u64())
            .is_some_and(|min| n < min)
            || m.get("maxItems")
                .and_then(|x| x.as_u64())
                .is_some_and(|max| n > max)
        {
            return false;
        }
    }
    true
}

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(json!({"type": "string"})),
        Just(json!({"type": "number"})),
        Just(json!({"type": "integer"})),
        Just(json!({"type": "boolean"})),
        Just(json!({"type": "null"})),
        Just(json!({})),
        Just(json!({"type": ["integer", "null"]})),
        Just(json!({"enum": ["a", "ab", 1, 12, null, true]})),
        Just(json!({"const": {"x": [1]}})),
        Just(json!({"type": "object"})),
        Just(json!({"type": "array"})),
    ]
}

fn schema() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            (
                prop::collection::vec((inner.clone(), any::<bool>()), 0..4),
                any::<bool>()
            )
                .prop_map(|(props, closed)| {
                    let mut p = Map::new();
                    let mut req = Vec::new();
                    for (i, (s, r)) in props.into_iter().enumerate() {
                        let k = format!("k{i}{}", "x".repeat(i % 2));
                        if r {
                            req.push(Value::String(k.clone()));
                        }
                        p.insert(k, s);
                    }
                    json!({"type": "object", "properties": p, "required": req,
                           "additionalProperties": !closed})
                }),
            (inner.clone(), 0u64..3, 0u64..3).prop_map(|(items, min, extra)| json!({
                "type": "array", "items": items, "minItems": min, "maxItems": min + extra
            })),
            prop::collection::vec(inner, 1..3).prop_map(|alts| json!({"anyOf": alts})),
        ]
    })
}

fn object_schema() -> impl Strategy<Value = Value> {
    (prop::collection::vec((schema(), any::<bool>()), 1..4)).prop_map(|props| {
        let mut p = Map::new();
        let mut req = Vec::new();
        for (i, (s, r)) in props.into_iter().enumerate() {
            let k = format!("p{i}");
            if r {
                req.push(Value::String(k.clone()));
            }
            p.insert(k, s);
        }
        json!({"type": "object", "properties": p, "required": req})
    })
}

/// A random document the automaton allows, byte by byte: random accepted
/// bytes first, then (past `patience` bytes) the ones that close things.
fn walk(schema: &Arc<JsonSchema>, seed: u64, patience: usize) -> Option<String> {
    let alphabet: Vec<u8> = (0x20u8..0x7f).chain([b'\n']).collect();
    let closing = b"\"}]:,0aeflnrstu1";
    let mut rng = seed;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut st = SchemaState::new(schema.clone());
    let mut text = Vec::new();
    for i in 0..4000 {
        if st.is_complete() {
            return Some(String::from_utf8(text).unwrap());
        }
        let allowed: Vec<u8> = alphabet
            .iter()
            .copied()
            .filter(|&b| st.accepts(&[b]))
            .collect();
        assert!(
            !allowed.is_empty(),
            "stuck after {:?}",
            String::from_utf8_lossy(&text)
        );
        let b = if i > patience {
            *closing
                .iter()
                .find(|c| allowed.contains(c))
                .unwrap_or(&allowed[next() as usize % allowed.len()])
        } else {
            allowed[next() as usize % allowed.len()]
        };
        st = st.feed(&[b]).unwrap();
        text.push(b);
    }
    eprintln!(
        "walk did not end: {:?}",
        String::from_utf8_lossy(&text[..300])
    );
    None
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Every document the automaton completes is JSON the schema accepts,
    /// and the automaton never gets stuck (some byte always continues).
    #[test]
    fn random_documents_the_automaton_allows_are_valid(s in object_schema(), seed in 1u64.., patience in 0usize..80) {
        let compiled = compiled(&s);
        let doc = walk(&compiled, seed, patience);
        let doc = doc.expect("a walk that closes what it opens completes");
        let v: Value = match serde_json::from_str(&doc) {
            Ok(v) => v,
            // Valid JSON beyond f64 (`1e999`): nothing to check it against.
            Err(e) if e.to_string().contains("number out of range") => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("{doc}: {e}"))),
        };
        prop_assert!(valid(&s, &s, &v), "{} does not satisfy {}", doc, s);
    }

    /// Valid documents (serde_json's compact text) are accepted whole.
    #[test]
    fn documents_the_walk_found_are_accepted_again_and_prefixes_are_incomplete(s in object_schema(), seed in 1u64..) {
        let compiled = compiled(&s);
        let doc = walk(&compiled, seed, 20).expect("the walk completes");
        prop_assert!(complete(&compiled, &doc));
        // Whole, and cut anywhere: a prefix is accepted but not complete.
        let cut = (seed as usize) % doc.len();
        let st = SchemaState::new(compiled.clone()).feed(&doc.as_bytes()[..cut]).unwrap();
        prop_assert!(!st.is_complete());
    }

    /// Arbitrary bytes never panic, and what is refused stays refused.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let s = compiled(&person());
        let st = SchemaState::new(s);
        if let Some(after) = st.feed(&bytes) {
            prop_assert!(st.accepts(&bytes));
            let _ = after.is_complete();
        } else {
            prop_assert!(!st.accepts(&bytes));
        }
    }
}
