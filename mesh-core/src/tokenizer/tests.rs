//! Unit tests on small synthetic vocabularies (the real-model comparison with
//! llama.cpp lives in `tests/tokenizer_golden.rs`).

use proptest::prelude::*;

use super::unicode::byte_to_char;
use super::*;

/// Control tokens first (ids 0..3), then the 256 byte characters, then `extra`.
fn byte_level_tokens(extra: &[&str]) -> (Vec<String>, Vec<i32>) {
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .map(String::from)
        .to_vec();
    let mut types = vec![3, 3, 3];
    for b in 0..=255u8 {
        tokens.push(byte_to_char(b).to_string());
        types.push(1);
    }
    for t in extra {
        tokens.push(t.to_string());
        types.push(if t.starts_with("<tool") { 4 } else { 1 });
    }
    (tokens, types)
}

const MERGES: &[&str] = &[
    "Ġ t",
    "h e",
    "Ġt he",
    "i n",
    "Ġ Ġ",
    "ĠĠ ĠĠ",
    "Ċ Ċ",
    "1 2",
    "12 3",
    "l l",
    "ll o",
    "Ġ a",
    "Ã ©",
    "' s",
];
const MERGED: &[&str] = &[
    "Ġt", "he", "Ġthe", "in", "ĠĠ", "ĠĠĠĠ", "ĊĊ", "12", "123", "ll", "llo", "Ġa", "Ã©", "'s",
    "<tool>",
];

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn byte_level(pre: &str) -> Tokenizer {
    let (tokens, types) = byte_level_tokens(MERGED);
    let merges = strings(MERGES);
    Tokenizer::from_spec(VocabSpec {
        model: "gpt2",
        pre: Some(pre),
        tokens: &tokens,
        token_types: Some(&types),
        merges: Some(&merges),
        ids: vec![
            ("tokenizer.ggml.bos_token_id", 1),
            ("tokenizer.ggml.eos_token_id", 2),
        ],
        add_bos: Some(false),
        ..VocabSpec::default()
    })
    .expect("synthetic vocabulary builds")
}

fn spm() -> Tokenizer {
    let mut tokens = strings(&["<unk>", "<s>", "</s>"]);
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0; 3];
    for b in 0..=255u8 {
        tokens.push(format!("<0x{b:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (i, p) in [
        "▁",
        "h",
        "e",
        "l",
        "o",
        "▁h",
        "ll",
        "▁he",
        "llo",
        "▁hello",
        "<|im_start|>",
    ]
    .iter()
    .enumerate()
    {
        tokens.push(p.to_string());
        types.push(if p.starts_with("<|") { 3 } else { 1 });
        scores.push(-(i as f32) - 1.0);
    }
    Tokenizer::from_spec(VocabSpec {
        model: "llama",
        tokens: &tokens,
        token_types: Some(&types),
        scores: Some(scores),
        ..VocabSpec::default()
    })
    .expect("synthetic SPM vocabulary builds")
}

fn id(tok: &Tokenizer, text: &str) -> u32 {
    tok.token_id(text)
        .unwrap_or_else(|| panic!("{text:?} is a token"))
}

fn text_of(tok: &Tokenizer, ids: &[u32]) -> String {
    String::from_utf8(tok.decode(ids, true).unwrap()).unwrap()
}

#[test]
fn merges_apply_lowest_rank_first() {
    let tok = byte_level("smollm");
    assert_eq!(
        tok.encode(" the", false, false).unwrap(),
        [id(&tok, "Ġthe")]
    );
    assert_eq!(
        tok.encode("hello", false, false).unwrap(),
        [id(&tok, "he"), id(&tok, "llo")]
    );
    // smollm isolates every digit before merging, so "123" never merges.
    assert_eq!(
        tok.encode("123", false, false).unwrap(),
        [id(&tok, "1"), id(&tok, "2"), id(&tok, "3")]
    );
    // gpt-2 does not.
    let gpt2 = byte_level("gpt-2");
    assert_eq!(
        gpt2.encode("123", false, false).unwrap(),
        [id(&gpt2, "123")]
    );
}

#[test]
fn special_tokens_are_parsed_only_when_asked() {
    let tok = byte_level("smollm");
    let (start, end) = (id(&tok, "<|im_start|>"), id(&tok, "<|im_end|>"));
    let ids = tok
        .encode("<|im_start|>user<|im_end|>", false, true)
        .unwrap();
    assert_eq!(ids.first(), Some(&start));
    assert_eq!(ids.last(), Some(&end));
    assert_eq!(text_of(&tok, &ids), "<|im_start|>user<|im_end|>");

    let plain = tok.encode("<|im_start|>user", false, false).unwrap();
    assert!(!plain.contains(&start));
    assert_eq!(text_of(&tok, &plain), "<|im_start|>user");

    // User-defined tokens are matched either way.
    let tool = id(&tok, "<tool>");
    assert!(tok
        .encode("a<tool>b", false, false)
        .unwrap()
        .contains(&tool));
}

#[test]
fn control_tokens_render_only_with_special() {
    let tok = byte_level("smollm");
    let start = id(&tok, "<|im_start|>");
    assert_eq!(tok.token_to_piece(start, false).unwrap(), b"");
    assert_eq!(tok.token_to_piece(start, true).unwrap(), b"<|im_start|>");
    assert_eq!(
        tok.token_to_piece(id(&tok, "Ġthe"), false).unwrap(),
        b" the"
    );
    let ids = tok.encode("<|im_start|>hi", false, true).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), b"hi");
}

#[test]
fn eog_covers_end_of_turn_tokens() {
    let tok = byte_level("smollm");
    assert!(tok.is_eog(id(&tok, "<|im_end|>")));
    assert!(tok.is_eog(id(&tok, "<|endoftext|>")));
    assert!(!tok.is_eog(id(&tok, "<|im_start|>")));
    assert!(!tok.is_eog(id(&tok, "he")));
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert!(!tok.add_bos());
    assert_eq!(tok.n_vocab(), 3 + 256 + MERGED.len());
}

#[test]
fn add_special_follows_the_metadata() {
    let tok = byte_level("smollm");
    assert_eq!(tok.encode("", true, true).unwrap(), Vec::<u32>::new());
    // llama3-style pre-tokenizers add BOS unless the metadata says otherwise.
    let (tokens, types) = byte_level_tokens(MERGED);
    let merges = strings(MERGES);
    let llama3 = Tokenizer::from_spec(VocabSpec {
        model: "gpt2",
        pre: Some("llama-bpe"),
        tokens: &tokens,
        token_types: Some(&types),
        merges: Some(&merges),
        ids: vec![("tokenizer.ggml.bos_token_id", 1)],
        ..VocabSpec::default()
    })
    .unwrap();
    assert!(llama3.add_bos());
    assert_eq!(llama3.encode("", true, false).unwrap(), [1]);
    assert_eq!(
        llama3.encode(" the", true, false).unwrap(),
        [1, id(&llama3, "Ġthe")]
    );
}

#[test]
fn unmergeable_non_ascii_is_dropped_like_upstream() {
    // "Ã ©" merges the two bytes of "é"; here the result is a token. Without it, llama.cpp
    // looks the pieces of the merged symbol up byte by byte and finds nothing.
    let tok = byte_level("smollm");
    assert_eq!(tok.encode("é", false, false).unwrap(), [id(&tok, "Ã©")]);
    let (tokens, types) = byte_level_tokens(&["<tool>"]);
    let merges = strings(&["Ã ©"]);
    let lossy = Tokenizer::from_spec(VocabSpec {
        model: "gpt2",
        pre: Some("smollm"),
        tokens: &tokens,
        token_types: Some(&types),
        merges: Some(&merges),
        ..VocabSpec::default()
    })
    .unwrap();
    assert_eq!(lossy.encode("é", false, false).unwrap(), Vec::<u32>::new());
    assert_eq!(lossy.encode("aé", false, false).unwrap(), [id(&lossy, "a")]);
}

#[test]
fn bad_vocabularies_are_errors() {
    let (tokens, types) = byte_level_tokens(MERGED);
    let merges = strings(MERGES);
    let spec = || VocabSpec {
        model: "gpt2",
        pre: Some("smollm"),
        tokens: &tokens,
        token_types: Some(&types),
        merges: Some(&merges),
        ..VocabSpec::default()
    };

    let err = Tokenizer::from_spec(VocabSpec {
        model: "bert",
        ..spec()
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Unsupported(ref m) if m.contains("bert")),
        "{err}"
    );

    let err = Tokenizer::from_spec(VocabSpec {
        pre: Some("tekken"),
        ..spec()
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Unsupported(ref m) if m.contains("tekken") && m.contains("smollm")),
        "{err}"
    );

    let bad_merges = strings(&["Ġ t", "zz q"]);
    let err = Tokenizer::from_spec(VocabSpec {
        merges: Some(&bad_merges),
        ..spec()
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Tokenizer(ref m)
            if m.kind() == TokenizerErrorKind::Merges && m.message().contains("zz")),
        "{err}"
    );

    let err = Tokenizer::from_spec(VocabSpec {
        merges: None,
        ..spec()
    })
    .unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err}");

    let mut dup = tokens.clone();
    dup.push("he".into());
    let mut dup_types = types.clone();
    dup_types.push(1);
    let err = Tokenizer::from_spec(VocabSpec {
        tokens: &dup,
        token_types: Some(&dup_types),
        ..spec()
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Tokenizer(ref m)
            if m.kind() == TokenizerErrorKind::Vocabulary && m.message().contains("duplicates")),
        "{err}"
    );

    let err = Tokenizer::from_spec(VocabSpec {
        token_types: Some(&types[..10]),
        ..spec()
    })
    .unwrap_err();
    assert!(
        matches!(err, Error::Tokenizer(ref m) if m.message().contains("token_type")),
        "{err}"
    );

    let err = Tokenizer::from_spec(VocabSpec {
        tokens: &[],
        token_types: None,
        ..spec()
    })
    .unwrap_err();
    assert!(matches!(err, Error::Tokenizer(_)), "{err}");

    // Out-of-range special ids from the metadata fall back to the defaults.
    let tok = Tokenizer::from_spec(VocabSpec {
        ids: vec![("tokenizer.ggml.eos_token_id", 1_000_000)],
        ..spec()
    })
    .unwrap();
    assert_eq!(tok.eos(), Some(11));
}

#[test]
fn bad_ids_are_invalid_arguments() {
    let tok = byte_level("smollm");
    let n = tok.n_vocab() as u32;
    assert!(matches!(
        tok.token_to_piece(n, true),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        tok.decode(&[0, n], true),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn spm_merges_by_score_and_falls_back_to_bytes() {
    let tok = spm();
    let hello = id(&tok, "▁hello");
    assert_eq!(tok.encode("hello", false, false).unwrap(), [hello]);
    assert_eq!(tok.encode("hello", true, false).unwrap(), [1, hello]);
    assert_eq!(tok.decode(&[hello], false).unwrap(), b"hello");
    // As llama_detokenize (remove_special = false): the BOS piece takes the strip.
    assert_eq!(tok.decode(&[1, hello], false).unwrap(), b" hello");
    // "x" and "é" are not tokens: byte fallback.
    assert_eq!(
        tok.encode("x", false, false).unwrap(),
        [id(&tok, "▁"), id(&tok, "<0x78>")]
    );
    let ids = tok.encode("hé", false, false).unwrap();
    assert_eq!(
        ids,
        [id(&tok, "▁h"), id(&tok, "<0xC3>"), id(&tok, "<0xA9>")]
    );
    assert_eq!(tok.decode(&ids, false).unwrap(), "hé".as_bytes());
    // A special token resets the prefix space.
    assert_eq!(
        tok.encode("<|im_start|>hello", false, true).unwrap(),
        [id(&tok, "<|im_start|>"), hello]
    );
    assert!(tok.is_eog(2));
}

#[test]
fn clean_up_spaces_matches_llama_cpp() {
    let mut text = b"a , b ' c 's d 're e 't f ?".to_vec();
    clean_up_spaces(&mut text);
    assert_eq!(text, b"a, b'c's d're e 't f?");
    let mut empty = Vec::new();
    clean_up_spaces(&mut empty);
    assert!(empty.is_empty());
}

/// Text with many whitespace runs, contractions, digits and special-token texts.
fn tricky_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        Just(" ".to_string()),
        Just("  ".to_string()),
        Just("\t".to_string()),
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("\u{3000}".to_string()),
        Just("\u{a0}".to_string()),
        Just("'s".to_string()),
        Just("'LL".to_string()),
        Just("the".to_string()),
        Just("hello".to_string()),
        Just("123".to_string()),
        Just("é".to_string()),
        Just("😀".to_string()),
        Just("\u{200d}".to_string()),
        Just("<|im_start|>".to_string()),
        Just("<tool>".to_string()),
        Just(".".to_string()),
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..24).prop_map(|v| v.concat())
}

fn any_text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), tricky_text()]
}

proptest! {
    #[test]
    fn byte_level_round_trips(text in any_text()) {
        for pre in ["smollm", "qwen2", "qwen35", "command-r"] {
            let tok = byte_level(pre);
            let ids = tok.encode(&text, false, false).unwrap();
            prop_assert_eq!(tok.decode(&ids, true).unwrap(), text.as_bytes(), "pre {}", pre);
        }
    }

    #[test]
    fn byte_level_round_trips_up_to_space_clean_up(text in any_text()) {
        // These vocabularies ask llama.cpp to clean up spaces before punctuation on decode.
        for pre in ["llama-bpe", "gpt-2", "default", "falcon", "starcoder"] {
            let tok = byte_level(pre);
            let ids = tok.encode(&text, false, false).unwrap();
            let mut want = text.as_bytes().to_vec();
            clean_up_spaces(&mut want);
            prop_assert_eq!(tok.decode(&ids, true).unwrap(), want, "pre {}", pre);
        }
    }

    #[test]
    fn special_parsing_round_trips(text in any_text()) {
        let tok = byte_level("smollm");
        let ids = tok.encode(&text, true, true).unwrap();
        prop_assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()));
        prop_assert_eq!(tok.decode(&ids, true).unwrap(), text.as_bytes());
    }

    #[test]
    fn spm_round_trips(text in any_text().prop_filter("no U+2581", |t| !t.contains('\u{2581}'))) {
        let tok = spm();
        let ids = tok.encode(&text, false, false).unwrap();
        prop_assert_eq!(tok.decode(&ids, false).unwrap(), text.as_bytes());
    }
}

#[test]
fn tokenizer_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    let text = format!("{:?}", byte_level("smollm"));
    assert!(text.contains("smollm") && text.len() < 400, "{text}");
}
