//! The tokenizer against upstream llama.cpp: `tests/data/golden.json` holds the ids
//! llama-cpp-python produced for a corpus of strings (see `scripts/golden.py`).
//!
//! Needs the model file the golden data was made from: `$MESH_MODEL`, or the
//! default SmolLM2-135M-Instruct Q4_1, fetched as the CLI fetches it. With
//! another model in `$MESH_MODEL` the tests print why and pass.

use std::collections::HashSet;
use std::time::Instant;

use mesh_core::gguf::{Array, Gguf, Value};
use mesh_core::tokenizer::Tokenizer;
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

mod common;

const GOLDEN: &str = include_str!("data/golden.json");

fn golden() -> Json {
    serde_json::from_str(GOLDEN).expect("tests/data/golden.json is valid JSON")
}

/// The parsed model the golden data was made from, or `None` (with a message) when
/// `$MESH_MODEL` names another file.
fn load_model(test: &str) -> Option<Gguf> {
    let path = common::model_path();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let g = golden();
    let want = g["model_sha256"].as_str().unwrap_or_default();
    let got: String = Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    if got != want {
        println!(
            "SKIP {test}: {} has sha256 {got}, the golden data was made from {want}",
            path.display()
        );
        return None;
    }
    Some(Gguf::parse(&bytes).expect("model parses"))
}

fn ids_of(v: &Json) -> Vec<u32> {
    v.as_array()
        .expect("ids array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

#[test]
fn corpus_matches_llama_cpp() {
    let Some(gguf) = load_model("corpus_matches_llama_cpp") else {
        return;
    };
    let start = Instant::now();
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer builds");
    println!("Tokenizer::from_gguf: {:?}", start.elapsed());

    let g = golden();
    let cases = g["tokenize"].as_array().expect("tokenize cases");
    let (mut failures, mut detok_failures, mut roundtrips) = (Vec::new(), Vec::new(), 0);
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let add_special = case["add_special"].as_bool().expect("add_special");
        let parse_special = case["parse_special"].as_bool().expect("parse_special");
        let want = ids_of(&case["ids"]);
        let got = tok
            .encode(text, add_special, parse_special)
            .expect("encode");
        if got != want {
            failures.push(format!(
                "text {text:?} (add_special {add_special}, parse_special {parse_special})\n  \
                 expected {want:?}\n  got      {got:?}"
            ));
            continue;
        }
        let want_detok = match case.get("detok") {
            Some(s) => s.as_str().expect("detok").as_bytes().to_vec(),
            None => hex_decode(case["detok_hex"].as_str().expect("detok_hex")),
        };
        let got_detok = tok.decode(&got, true).expect("decode");
        if got_detok != want_detok {
            detok_failures.push(format!(
                "ids {got:?}\n  expected {:?}\n  got      {:?}",
                String::from_utf8_lossy(&want_detok),
                String::from_utf8_lossy(&got_detok)
            ));
        }
        // Round trip wherever upstream's holds.
        if want_detok == text.as_bytes() {
            assert_eq!(tok.decode(&got, true).expect("decode"), text.as_bytes());
            roundtrips += 1;
        }
    }
    println!(
        "tokenize: {}/{} cases match llama.cpp; {roundtrips} round-trip exactly",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(
        detok_failures.is_empty(),
        "{} decodes differ from llama_detokenize:\n{}",
        detok_failures.len(),
        detok_failures.join("\n")
    );
}

#[test]
fn vocab_facts_match_llama_cpp() {
    let Some(gguf) = load_model("vocab_facts_match_llama_cpp") else {
        return;
    };
    let tok = Tokenizer::from_gguf(&gguf).expect("tokenizer builds");
    let g = golden();
    let v = &g["vocab"];
    assert_eq!(tok.n_vocab() as u64, v["n_vocab"].as_u64().unwrap());
    let id_or_none = |x: &Json| x.as_i64().filter(|&i| i >= 0).map(|i| i as u32);
    assert_eq!(tok.bos(), id_or_none(&v["bos"]));
    assert_eq!(tok.eos(), id_or_none(&v["eos"]));
    assert_eq!(tok.add_bos(), v["add_bos"].as_bool().unwrap());
    let eog: HashSet<u32> = ids_of(&v["eog_ids"]).into_iter().collect();
    for id in 0..tok.n_vocab() as u32 {
        assert_eq!(tok.is_eog(id), eog.contains(&id), "is_eog({id})");
    }
    for entry in v["pieces_hex"].as_array().unwrap() {
        let id = entry[0].as_u64().unwrap() as u32;
        let plain = hex_decode(entry[1].as_str().unwrap());
        let special = hex_decode(entry[2].as_str().unwrap());
        assert_eq!(
            tok.token_to_piece(id, false).unwrap(),
            plain,
            "piece({id}, false)"
        );
        assert_eq!(
            tok.token_to_piece(id, true).unwrap(),
            special,
            "piece({id}, true)"
        );
    }
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert!(tok.token_to_piece(tok.n_vocab() as u32, true).is_err());
    assert!(tok.decode(&[0, u32::MAX], true).is_err());
}

/// GPT-2's byte-to-unicode table, written independently of the crate's.
fn gpt2_char_to_byte() -> std::collections::HashMap<char, u8> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut map = std::collections::HashMap::new();
    let mut n = 0;
    for b in 0..256u32 {
        let cp = if printable(b) {
            b
        } else {
            n += 1;
            255 + n
        };
        map.insert(char::from_u32(cp).unwrap(), b as u8);
    }
    map
}

fn meta_mut<'a>(g: &'a mut Gguf, key: &str) -> &'a mut Value {
    &mut g
        .metadata
        .iter_mut()
        .find(|(k, _)| k == key)
        .unwrap_or_else(|| panic!("model has no {key}"))
        .1
}

/// The SentencePiece vocabulary `scripts/golden.py` derives from the model (see
/// `spm_vocab_from` there).
fn spm_variant(base: &Gguf) -> Gguf {
    let mut g = base.clone();
    let Some(Value::Array(Array::String(tokens))) = g.get("tokenizer.ggml.tokens").cloned() else {
        panic!("tokens")
    };
    let Some(Value::Array(Array::I32(types))) = g.get("tokenizer.ggml.token_type").cloned() else {
        panic!("token types")
    };
    let c2b = gpt2_char_to_byte();
    let mut out: Vec<String> = ["<unk>", "<s>", "</s>"].map(String::from).to_vec();
    out.extend((0..256).map(|b| format!("<0x{b:02X}>")));
    let mut out_types = vec![2, 3, 3];
    out_types.extend([6; 256]);
    let mut scores = vec![0.0f32; out.len()];
    let mut seen: HashSet<String> = out.iter().cloned().collect();
    for (i, (text, &t)) in tokens.iter().zip(&types).enumerate() {
        if t != 1 {
            continue;
        }
        let Some(raw) = text
            .chars()
            .map(|c| c2b.get(&c).copied())
            .collect::<Option<Vec<u8>>>()
        else {
            continue;
        };
        let Ok(s) = String::from_utf8(raw) else {
            continue;
        };
        let s = s.replace(' ', "\u{2581}");
        if s.is_empty() || !seen.insert(s.clone()) {
            continue;
        }
        out.push(s);
        out_types.push(1);
        scores.push(-(i as f32));
    }
    for s in ["<|im_start|>", "<|im_end|>"] {
        out.push(s.to_string());
        out_types.push(3);
        scores.push(0.0);
    }
    let n = out.len();
    g.metadata.retain(|(k, _)| {
        !matches!(
            k.as_str(),
            "tokenizer.ggml.pre"
                | "tokenizer.ggml.merges"
                | "tokenizer.ggml.add_bos_token"
                | "tokenizer.ggml.add_space_prefix"
                | "tokenizer.ggml.padding_token_id"
                | "tokenizer.chat_template"
        )
    });
    *meta_mut(&mut g, "tokenizer.ggml.model") = Value::String("llama".into());
    *meta_mut(&mut g, "tokenizer.ggml.tokens") = Value::Array(Array::String(out));
    *meta_mut(&mut g, "tokenizer.ggml.token_type") = Value::Array(Array::I32(out_types));
    *meta_mut(&mut g, "tokenizer.ggml.bos_token_id") = Value::U32(1);
    *meta_mut(&mut g, "tokenizer.ggml.eos_token_id") = Value::U32(2);
    *meta_mut(&mut g, "tokenizer.ggml.unknown_token_id") = Value::U32(0);
    *meta_mut(&mut g, "llama.vocab_size") = Value::U32(n as u32);
    g.metadata.push((
        "tokenizer.ggml.scores".into(),
        Value::Array(Array::F32(scores)),
    ));
    g
}

/// The tokenizer of a variant described in the golden data: the model's metadata
/// with string keys set and keys removed, or the derived SentencePiece vocabulary.
fn variant_tokenizer(base: &Gguf, variant: &Json) -> Tokenizer {
    let name = variant["name"].as_str().unwrap();
    let gguf = if variant["spm"].as_bool().unwrap() {
        spm_variant(base)
    } else {
        let mut v = base.clone();
        for (key, value) in variant["set"].as_object().unwrap() {
            *meta_mut(&mut v, key) = Value::String(value.as_str().unwrap().into());
        }
        for key in variant["remove"].as_array().unwrap() {
            v.metadata.retain(|(k, _)| k != key.as_str().unwrap());
        }
        v
    };
    Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("variant {name}: {e}"))
}

#[test]
fn variants_match_llama_cpp() {
    let Some(base) = load_model("variants_match_llama_cpp") else {
        return;
    };
    let g = golden();
    let corpus: Vec<&str> = {
        // The plain cases, in corpus order, are the entries with both flags off.
        g["tokenize"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| {
                !c["add_special"].as_bool().unwrap() && !c["parse_special"].as_bool().unwrap()
            })
            .map(|c| c["text"].as_str().unwrap())
            .collect()
    };
    let mut report = Vec::new();
    let mut failures = Vec::new();
    for variant in g["variants"].as_array().unwrap() {
        let name = variant["name"].as_str().unwrap();
        let tok = variant_tokenizer(&base, variant);
        assert_eq!(
            tok.n_vocab() as u64,
            variant["n_vocab"].as_u64().unwrap(),
            "{name} n_vocab"
        );
        let all_ids = variant["ids"].as_array().unwrap();
        assert_eq!(all_ids.len(), corpus.len());
        let detok = variant["detok_differs_hex"].as_object().unwrap();
        let mut ok = 0;
        for (i, (text, want)) in corpus.iter().zip(all_ids).enumerate() {
            let want = ids_of(want);
            let got = tok.encode(text, false, false).unwrap();
            if got != want {
                failures.push(format!(
                    "[{name}] text {text:?}\n  expected {want:?}\n  got      {got:?}"
                ));
                continue;
            }
            let want_text = match detok.get(&i.to_string()) {
                Some(h) => hex_decode(h.as_str().unwrap()),
                None => text.as_bytes().to_vec(),
            };
            let got_text = tok.decode(&got, false).unwrap();
            if got_text != want_text {
                failures.push(format!(
                    "[{name}] decode of {text:?}\n  expected {:?}\n  got      {:?}",
                    String::from_utf8_lossy(&want_text),
                    String::from_utf8_lossy(&got_text)
                ));
                continue;
            }
            ok += 1;
        }
        for case in variant["add_special_cases"].as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let want = ids_of(&case["ids"]);
            let got = tok.encode(text, true, true).unwrap();
            if got != want {
                failures.push(format!(
                    "[{name}] text {text:?} (add_special, parse_special)\n  expected {want:?}\n  got      {got:?}"
                ));
            }
        }
        report.push(format!("{name} {ok}/{}", corpus.len()));
    }
    println!("variants: {}", report.join(", "));
    assert!(
        failures.is_empty(),
        "{} variant cases differ from llama.cpp:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The real model's tokenizer, built once for the property tests (`None` without the model).
fn real_tokenizer() -> Option<&'static Tokenizer> {
    static TOKENIZER: std::sync::OnceLock<Option<Tokenizer>> = std::sync::OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            load_model("real_model_round_trips")
                .map(|g| Tokenizer::from_gguf(&g).expect("tokenizer builds"))
        })
        .as_ref()
}

fn whitespace_heavy() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let piece = prop_oneof![
        Just(" "),
        Just("   "),
        Just("\t"),
        Just("\n"),
        Just("\n\n"),
        Just("\r\n"),
        Just("\u{3000}"),
        Just("\u{a0}"),
        Just("x"),
        Just("'s"),
        Just("42"),
        Just("é"),
        Just("🙂"),
        Just("<|im_start|>"),
    ];
    prop::collection::vec(piece, 0..32).prop_map(|v| v.concat())
}

proptest::proptest! {
    #[test]
    fn real_model_round_trips(text in proptest::prop_oneof![
        proptest::prelude::any::<String>(),
        whitespace_heavy(),
    ]) {
        let Some(tok) = real_tokenizer() else {
            return Ok(());
        };
        // smollm does no space clean-up, so byte-level BPE is lossless.
        let ids = tok.encode(&text, false, false).unwrap();
        proptest::prop_assert_eq!(tok.decode(&ids, false).unwrap(), text.as_bytes());
        let ids = tok.encode(&text, true, true).unwrap();
        proptest::prop_assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
        proptest::prop_assert_eq!(tok.decode(&ids, true).unwrap(), text.as_bytes());
    }
}

/// Random strings against upstream, when `MESH_TOKENIZER_FUZZ` names a file made by
/// `scripts/golden.py --fuzz SEED N FILE` (too large to commit).
#[test]
fn random_strings_match_llama_cpp() {
    let Some(path) = std::env::var_os("MESH_TOKENIZER_FUZZ") else {
        println!("SKIP random_strings_match_llama_cpp: MESH_TOKENIZER_FUZZ is not set");
        return;
    };
    let Some(base) = load_model("random_strings_match_llama_cpp") else {
        return;
    };
    let data: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let strings: Vec<&str> = data["strings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let mut failures = Vec::new();
    for variant in data["variants"].as_array().unwrap() {
        let name = variant["name"].as_str().unwrap();
        let tok = variant_tokenizer(&base, variant);
        let mut ok = 0;
        for (i, text) in strings.iter().enumerate() {
            let (want, want_special) = (
                ids_of(&variant["ids"][i]),
                ids_of(&variant["ids_special"][i]),
            );
            let got = tok.encode(text, false, false).unwrap();
            let got_special = tok.encode(text, true, true).unwrap();
            let want_text = hex_decode(variant["detok_hex"][i].as_str().unwrap());
            let got_text = tok.decode(&want_special, true).unwrap();
            if got == want && got_special == want_special && got_text == want_text {
                ok += 1;
            } else if failures.len() < 20 {
                failures.push(format!(
                    "[{name}] {text:?}\n  expected {want:?} / {want_special:?}\n  \
                     got      {got:?} / {got_special:?}"
                ));
            }
        }
        println!("{name}: {ok}/{} random strings match", strings.len());
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
