use super::testing::{tensor_bytes, write_gguf, Writer};
use super::*;
use proptest::prelude::*;

fn s(v: &str) -> Value {
    Value::String(v.to_string())
}

fn kv(k: &str, v: Value) -> (String, Value) {
    (k.to_string(), v)
}

fn t(name: &str, dims: &[u64], ty: GgmlType) -> (String, Vec<u64>, GgmlType) {
    (name.to_string(), dims.to_vec(), ty)
}

/// A small llama-like file.
fn sample() -> Vec<u8> {
    write_gguf(
        &[
            kv("general.architecture", s("llama")),
            kv("llama.block_count", Value::U32(2)),
            kv("llama.rope.freq_base", Value::F32(10000.0)),
            kv(
                "tokenizer.ggml.tokens",
                Value::Array(Array::String(vec!["<s>".into(), "a".into()])),
            ),
        ],
        &[
            t("token_embd.weight", &[64, 2], GgmlType::Q4_1),
            t("output_norm.weight", &[64], GgmlType::F32),
            t("blk.0.attn_q.weight", &[64, 64], GgmlType::Q8_0),
        ],
    )
}

/// Header + tensor infos for `tensors` (raw type and relative offset), padded,
/// followed by `data_len` bytes of data.
fn raw_file(tensors: &[(&str, &[u64], u32, u64)], data_len: usize) -> Vec<u8> {
    let mut w = Writer::new();
    w.header(3, tensors.len() as u64, 0);
    for (name, dims, ty, off) in tensors {
        w.tensor_info(name, dims, *ty, *off);
    }
    w.pad_to(DEFAULT_ALIGNMENT);
    w.buf.resize(w.buf.len() + data_len, 0xab);
    w.buf
}

/// A file whose only metadata entry is `key` with raw type `ty` and raw value bytes.
fn raw_kv(key: &[u8], ty: u32, value: &[u8]) -> Vec<u8> {
    let mut w = Writer::new();
    w.header(3, 0, 1).string(key).u32(ty).raw(value).pad_to(32);
    w.buf
}

fn gguf_err(bytes: &[u8]) -> String {
    match Gguf::parse(bytes) {
        Err(Error::Gguf(m)) => m.message().to_owned(),
        other => panic!("expected Error::Gguf, got {other:?}"),
    }
}

fn unsupported_err(bytes: &[u8]) -> String {
    match Gguf::parse(bytes) {
        Err(Error::Unsupported(m)) => m,
        other => panic!("expected Error::Unsupported, got {other:?}"),
    }
}

fn assert_contains(msg: &str, parts: &[&str]) {
    for p in parts {
        assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
    }
}

/// Callers match on the kind (a host can tell an interrupted download from a
/// file that is not a model); the message says the rest.
#[test]
fn errors_have_kinds_to_match_on() {
    let kind = |bytes: &[u8]| match Gguf::parse(bytes) {
        Err(Error::Gguf(e)) => e.kind(),
        other => panic!("expected Error::Gguf, got {other:?}"),
    };
    let file = sample();
    assert_eq!(kind(b"GGUF"), GgufErrorKind::Truncated);
    assert_eq!(kind(&file[..file.len() / 2]), GgufErrorKind::Truncated);
    let mut not_gguf = file.clone();
    not_gguf[..4].copy_from_slice(b"GGML");
    assert_eq!(kind(&not_gguf), GgufErrorKind::NotGguf);
    assert_eq!(
        kind(&raw_kv(b"k", ValueType::Bool as u32, &[2])),
        GgufErrorKind::Malformed
    );
    assert_eq!(
        kind(&raw_file(&[("t", &[0], GgmlType::F32 as u32, 0)], 32)),
        GgufErrorKind::BadTensor
    );
    let g = Gguf::parse(&file).unwrap();
    let err = |e: Error| match e {
        Error::Gguf(e) => e.kind(),
        other => panic!("expected Error::Gguf, got {other:?}"),
    };
    assert_eq!(
        err(g.require_tensor("nope").unwrap_err()),
        GgufErrorKind::MissingTensor
    );
    assert_eq!(
        err(g.value::<u32>("nope").unwrap_err()),
        GgufErrorKind::MissingKey
    );
}

#[test]
fn parses_a_valid_file() {
    let bytes = sample();
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.data_offset % 32, 0);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.value::<u32>("llama.block_count").unwrap(), 2);
    assert_eq!(g.value::<f32>("llama.rope.freq_base").unwrap(), 10000.0);
    assert_eq!(
        g.value::<&[String]>("tokenizer.ggml.tokens").unwrap(),
        ["<s>", "a"]
    );
    let e = g.require_tensor("token_embd.weight").unwrap();
    assert_eq!(e.dims, [64, 2]);
    assert_eq!((e.cols(), e.rows(), e.n_elements()), (64, 2, 128));
    assert_eq!(e.size, 2 * 2 * 20);
    assert_eq!(e.offset, g.data_offset);
    assert_eq!(e.data(&bytes).unwrap().len(), 80);
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.ggml_type, GgmlType::Q8_0);
    assert_eq!(q.size, 64 * 2 * 34);
    assert_eq!(q.offset + q.size, bytes.len() as u64);
    let names: Vec<_> = g.tensors.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "token_embd.weight",
            "output_norm.weight",
            "blk.0.attn_q.weight"
        ]
    );
}

#[test]
fn version_2_is_accepted() {
    let mut bytes = sample();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(Gguf::parse(&bytes).unwrap().version, 2);
}

#[test]
fn custom_alignment_places_data() {
    let bytes = write_gguf(
        &[kv("general.alignment", Value::U32(256))],
        &[t("a", &[3], GgmlType::F32), t("b", &[5], GgmlType::F16)],
    );
    let g = Gguf::parse(&bytes).unwrap();
    assert_eq!(g.alignment, 256);
    assert_eq!(g.data_offset % 256, 0);
    assert_eq!(g.tensors[1].offset, g.data_offset + 256);
    assert_eq!(g.tensors[1].size, 10);
}

#[test]
fn bad_alignment_is_rejected() {
    for (v, found) in [
        (Value::U32(24), "found 24"),
        (Value::U32(0), "found 0"),
        (Value::I32(-32), "found -32"),
    ] {
        let bytes = write_gguf(&[kv("general.alignment", v)], &[]);
        assert_contains(
            &gguf_err(&bytes),
            &["general.alignment", "power of two", found],
        );
    }
    let bytes = write_gguf(&[kv("general.alignment", s("32"))], &[]);
    assert_contains(
        &gguf_err(&bytes),
        &["general.alignment", "expected an integer", "found string"],
    );
}

#[test]
fn bad_magic() {
    let mut bytes = sample();
    bytes[..4].copy_from_slice(b"GGML");
    assert_contains(
        &gguf_err(&bytes),
        &["bad magic", "expected \"GGUF\"", "found 47 47 4d 4c"],
    );
}

#[test]
fn short_files() {
    assert_contains(&gguf_err(b""), &["0 bytes", "found nothing"]);
    assert_contains(&gguf_err(b"GG"), &["2 bytes", "47 47"]);
    assert_contains(
        &gguf_err(b"GGUF\x03\0"),
        &["end of file", "version", "need 4 bytes, 2 left"],
    );
    assert_contains(
        &gguf_err(&sample()[..20]),
        &[
            "end of file",
            "metadata entry count",
            "need 8 bytes, 4 left",
        ],
    );
}

#[test]
fn big_endian_is_unsupported() {
    let mut bytes = sample();
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    assert_contains(
        &unsupported_err(&bytes),
        &["big-endian", "0x03000000", "little-endian"],
    );
    bytes[..4].copy_from_slice(b"FUGG");
    assert_contains(&unsupported_err(&bytes), &["big-endian", "FUGG"]);
}

#[test]
fn unsupported_versions() {
    for (v, found) in [(1u32, "version 1"), (4, "version 4"), (0, "version 0")] {
        let mut bytes = sample();
        bytes[4..8].copy_from_slice(&v.to_le_bytes());
        assert_contains(
            &unsupported_err(&bytes),
            &[found, "expected version 2 or 3"],
        );
    }
}

#[test]
fn counts_bounded_by_remaining_bytes() {
    let mut w = Writer::new();
    w.header(3, u64::MAX, 0);
    assert_contains(
        &gguf_err(&w.buf),
        &[
            "18446744073709551615 tensors",
            "more than 2^64",
            "0 bytes follow",
        ],
    );
    let mut w = Writer::new();
    w.header(3, 0, 1000).raw(&[0; 100]);
    assert_contains(
        &gguf_err(&w.buf),
        &[
            "1000 metadata entries",
            "at least 13000 bytes",
            "only 100 bytes",
        ],
    );
}

#[test]
fn invalid_utf8_value_names_the_key() {
    let mut value = 2u64.to_le_bytes().to_vec();
    value.extend_from_slice(&[0x61, 0xff]);
    let msg = gguf_err(&raw_kv(b"general.name", 8, &value));
    assert_contains(&msg, &["key general.name", "expected UTF-8", "0xff"]);

    let mut arr = Vec::new();
    arr.extend_from_slice(&8u32.to_le_bytes());
    arr.extend_from_slice(&2u64.to_le_bytes());
    arr.extend_from_slice(&1u64.to_le_bytes());
    arr.push(b'a');
    arr.extend_from_slice(&1u64.to_le_bytes());
    arr.push(0xc3);
    let msg = gguf_err(&raw_kv(b"tokenizer.ggml.tokens", 9, &arr));
    assert_contains(
        &msg,
        &[
            "key tokenizer.ggml.tokens",
            "array element 1",
            "expected UTF-8",
        ],
    );
}

#[test]
fn invalid_utf8_key() {
    let msg = gguf_err(&raw_kv(b"gen\xfe", 4, &7u32.to_le_bytes()));
    assert_contains(
        &msg,
        &["metadata entry #0", "key", "expected UTF-8", "0xfe"],
    );
}

#[test]
fn string_length_past_end() {
    let mut value = 1000u64.to_le_bytes().to_vec();
    value.extend_from_slice(b"abc");
    let msg = gguf_err(&raw_kv(b"general.name", 8, &value));
    assert_contains(&msg, &["key general.name", "length 1000", "past the end"]);

    let mut w = Writer::new();
    w.header(3, 0, 1).u64(u64::MAX).raw(&[0; 20]);
    assert_contains(
        &gguf_err(&w.buf),
        &["metadata entry #0", "longer than the limit"],
    );
}

#[test]
fn unknown_value_type() {
    let msg = gguf_err(&raw_kv(b"general.name", 13, &[0; 8]));
    assert_contains(
        &msg,
        &["key general.name", "unknown value type 13", "0..=12"],
    );
    let mut arr = 77u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&0u64.to_le_bytes());
    let msg = gguf_err(&raw_kv(b"x", 9, &arr));
    assert_contains(&msg, &["key x", "unknown value type 77"]);
}

#[test]
fn bool_must_be_0_or_1() {
    let msg = gguf_err(&raw_kv(b"general.flag", 7, &[2]));
    assert_contains(&msg, &["key general.flag", "expected bool 0 or 1, found 2"]);
    let mut arr = 7u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&3u64.to_le_bytes());
    arr.extend_from_slice(&[1, 0, 9]);
    let msg = gguf_err(&raw_kv(b"flags", 9, &arr));
    assert_contains(&msg, &["key flags", "element 2", "found 9"]);
}

#[test]
fn array_count_bounded_by_remaining_bytes() {
    for (elem, min) in [(4u32, "4000"), (8, "8000"), (9, "12000")] {
        let mut arr = elem.to_le_bytes().to_vec();
        arr.extend_from_slice(&1000u64.to_le_bytes());
        arr.extend_from_slice(&[0; 64]);
        let msg = gguf_err(&raw_kv(b"k", 9, &arr));
        assert_contains(&msg, &["key k", "1000", min, "bytes"]);
    }
    let mut arr = 12u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&u64::MAX.to_le_bytes());
    assert_contains(&gguf_err(&raw_kv(b"k", 9, &arr)), &["more than 2^64"]);
}

#[test]
fn nested_arrays_are_depth_limited() {
    let mut nested = Array::U8(vec![1, 2]);
    for _ in 1..MAX_ARRAY_DEPTH {
        nested = Array::Array(vec![nested]);
    }
    let ok = write_gguf(&[kv("deep", Value::Array(nested.clone()))], &[]);
    let g = Gguf::parse(&ok).unwrap();
    assert_eq!(g.value::<&Array>("deep").unwrap(), &nested);

    let too_deep = write_gguf(&[kv("deep", Value::Array(Array::Array(vec![nested])))], &[]);
    assert_contains(
        &gguf_err(&too_deep),
        &["key deep", "nested at most 4 deep", "found deeper"],
    );
}

#[test]
fn duplicate_keys_and_tensor_names() {
    let bytes = write_gguf(&[kv("a", Value::U8(1)), kv("a", Value::U8(2))], &[]);
    assert_contains(
        &gguf_err(&bytes),
        &["duplicate metadata key \"a\"", "#0 and #1"],
    );
    let bytes = write_gguf(
        &[],
        &[t("w", &[4], GgmlType::F32), t("w", &[4], GgmlType::F32)],
    );
    assert_contains(
        &gguf_err(&bytes),
        &["duplicate tensor name \"w\"", "#0 and #1"],
    );
}

#[test]
fn n_dims_must_be_1_to_4() {
    for n in [0usize, 5] {
        let dims = vec![1u64; n];
        let msg = gguf_err(&raw_file(&[("w", &dims, 0, 0)], 64));
        assert_contains(
            &msg,
            &[
                "tensor w",
                "expected 1 to 4 dimensions",
                &format!("found {n}"),
            ],
        );
    }
}

#[test]
fn zero_dim_is_rejected() {
    let msg = gguf_err(&raw_file(&[("w", &[4, 0], 0, 0)], 64));
    assert_contains(
        &msg,
        &["tensor w", "dimension 1", "expected at least 1, found 0"],
    );
}

#[test]
fn element_count_overflow() {
    let big = 1u64 << 32;
    let msg = gguf_err(&raw_file(&[("w", &[big, big], 0, 0)], 64));
    assert_contains(&msg, &["tensor w", "4294967296x4294967296", "elements"]);
    let msg = gguf_err(&raw_file(&[("w", &[1 << 63], 0, 0)], 64));
    assert_contains(&msg, &["tensor w", "9223372036854775807"]);
}

#[test]
fn row_not_a_multiple_of_block_size() {
    let msg = gguf_err(&raw_file(&[("blk.0.ffn_up.weight", &[48, 2], 3, 0)], 64));
    assert_contains(
        &msg,
        &[
            "tensor blk.0.ffn_up.weight",
            "row length 48",
            "Q4_1 block size 32",
        ],
    );
}

#[test]
fn unknown_tensor_type() {
    let msg = unsupported_err(&raw_file(&[("w", &[32], 99, 0)], 64));
    assert_contains(
        &msg,
        &["tensor w", "tensor type 99", "expected one of", "Q4_1 (3)"],
    );
    // Removed types 4 and 5 (Q4_2, Q4_3) are unsupported too.
    unsupported_err(&raw_file(&[("w", &[32], 4, 0)], 64));
}

#[test]
fn offset_must_be_aligned() {
    let msg = gguf_err(&raw_file(&[("w", &[4], 0, 8)], 64));
    assert_contains(
        &msg,
        &["tensor w", "offset 0x8", "multiple of the alignment 32"],
    );
}

#[test]
fn data_past_end_of_file() {
    let bytes = raw_file(&[("blk.3.attn_q.weight", &[16, 16], 0, 0)], 64);
    let data_offset = bytes.len() - 64;
    let msg = gguf_err(&bytes);
    assert_contains(
        &msg,
        &[
            "tensor blk.3.attn_q.weight",
            &format!("data 0x{data_offset:x}..0x{:x}", data_offset + 1024),
            &format!("past the end of the file (size 0x{:x})", bytes.len()),
        ],
    );
    let msg = gguf_err(&raw_file(&[("w", &[4], 0, u64::MAX - 31)], 64));
    assert_contains(&msg, &["tensor w", "past the end of the file"]);
}

#[test]
fn tensors_must_not_overlap() {
    let msg = gguf_err(&raw_file(&[("a", &[16], 0, 0), ("b", &[8], 0, 32)], 128));
    assert_contains(&msg, &["tensors a", "and b", "overlap"]);
    // Touching is fine.
    Gguf::parse(&raw_file(&[("a", &[8], 0, 0), ("b", &[8], 0, 32)], 128)).unwrap();
}

#[test]
fn tensor_name_length_limited() {
    let long = "x".repeat(64);
    let msg = gguf_err(&raw_file(&[(&long, &[4], 0, 0)], 64));
    assert_contains(&msg, &["tensor #0", "length 64", "limit of 63"]);
}

#[test]
fn data_section_past_end() {
    let mut w = Writer::new();
    w.header(3, 0, 0);
    assert_contains(
        &gguf_err(&w.buf),
        &["data section starts at 0x20", "size 0x18"],
    );
}

#[test]
fn getters_report_expected_and_found() {
    let bytes = write_gguf(
        &[
            kv("s", s("x")),
            kv("u", Value::U32(7)),
            kv("neg", Value::I32(-1)),
            kv("big", Value::U64(1 << 40)),
            kv("small", Value::U8(3)),
            kv("i64", Value::I64(5)),
            kv("f64", Value::F64(0.5)),
            kv("huge", Value::F64(1e300)),
            kv("b", Value::Bool(true)),
            kv("ints", Value::Array(Array::I32(vec![1]))),
        ],
        &[],
    );
    let g = Gguf::parse(&bytes).unwrap();
    let err = |r: Result<String>| match r {
        Err(Error::Gguf(e)) => e,
        other => panic!("expected Error::Gguf, got {other:?}"),
    };
    let msg = |r: Result<String>| err(r).message().to_owned();
    let e = err(g.value::<&str>("nope").map(str::to_string));
    assert_eq!(
        (e.kind(), e.message()),
        (GgufErrorKind::MissingKey, "missing required key nope")
    );
    let e = err(g.value::<&str>("u").map(str::to_string));
    assert_eq!(
        (e.kind(), e.message()),
        (
            GgufErrorKind::WrongType,
            "key u: expected string, found u32"
        )
    );
    assert_contains(
        &msg(g.value::<u32>("neg").map(|v| v.to_string())),
        &["key neg", "0..=4294967295", "found i32 -1"],
    );
    assert_contains(
        &msg(g.value::<u32>("big").map(|v| v.to_string())),
        &["key big", "found u64 1099511627776"],
    );
    assert_eq!(
        msg(g.value::<u32>("s").map(|v| v.to_string())),
        "key s: expected an integer, found string"
    );
    assert_eq!(g.value::<u32>("small").unwrap(), 3);
    assert_eq!(g.value::<u32>("i64").unwrap(), 5);
    assert_eq!(g.value::<f32>("f64").unwrap(), 0.5);
    assert_contains(
        &msg(g.value::<f32>("huge").map(|v| v.to_string())),
        &["f32 range", "1e300"],
    );
    assert_eq!(
        msg(g.value::<f32>("u").map(|v| v.to_string())),
        "key u: expected f32, found u32"
    );
    assert!(g.value::<bool>("b").unwrap());
    assert_eq!(
        msg(g.value::<bool>("s").map(|v| v.to_string())),
        "key s: expected bool, found string"
    );
    assert_eq!(
        msg(g.value::<&[String]>("ints").map(|v| v.len().to_string())),
        "key ints: expected array of string, found array of i32"
    );
    assert_eq!(
        msg(g.value::<&Array>("u").map(|v| v.len().to_string())),
        "key u: expected array, found u32"
    );
    assert_eq!(g.opt_value::<u32>("nope").unwrap(), None);
    assert_eq!(g.opt_value::<f32>("nope").unwrap(), None);
    assert_eq!(g.opt_value::<&str>("nope").unwrap(), None);
    assert_eq!(g.opt_value::<bool>("nope").unwrap(), None);
    assert_eq!(g.opt_value::<u32>("u").unwrap(), Some(7));
    assert!(g.opt_value::<&str>("u").is_err());
    assert_eq!(
        msg(g.require_tensor("output.weight").map(|t| t.name.clone())),
        "missing tensor output.weight"
    );
    assert_eq!(
        msg(g.architecture().map(str::to_string)),
        "missing required key general.architecture"
    );
}

#[test]
fn ggml_type_table() {
    let expected: [(GgmlType, u32, u64, u64); 20] = [
        (GgmlType::F32, 0, 1, 4),
        (GgmlType::F16, 1, 1, 2),
        (GgmlType::Q4_0, 2, 32, 18),
        (GgmlType::Q4_1, 3, 32, 20),
        (GgmlType::Q5_0, 6, 32, 22),
        (GgmlType::Q5_1, 7, 32, 24),
        (GgmlType::Q8_0, 8, 32, 34),
        (GgmlType::Q8_1, 9, 32, 36),
        (GgmlType::Q2_K, 10, 256, 84),
        (GgmlType::Q3_K, 11, 256, 110),
        (GgmlType::Q4_K, 12, 256, 144),
        (GgmlType::Q5_K, 13, 256, 176),
        (GgmlType::Q6_K, 14, 256, 210),
        (GgmlType::Q8_K, 15, 256, 292),
        (GgmlType::I8, 24, 1, 1),
        (GgmlType::I16, 25, 1, 2),
        (GgmlType::I32, 26, 1, 4),
        (GgmlType::I64, 27, 1, 8),
        (GgmlType::F64, 28, 1, 8),
        (GgmlType::BF16, 30, 1, 2),
    ];
    for (ty, id, bs, ts) in expected {
        assert_eq!(GgmlType::from_u32(id).unwrap(), ty);
        assert_eq!(ty as u32, id);
        assert_eq!((ty.block_size(), ty.type_size()), (bs, ts), "{ty}");
        assert_eq!(ty.row_bytes(bs * 3).unwrap(), ts * 3);
        assert_eq!(format!("{ty:?}"), ty.name());
    }
    assert_eq!(GgmlType::Q4_1.row_bytes(576).unwrap(), 18 * 20);
    assert!(matches!(GgmlType::Q4_K.row_bytes(576), Err(Error::Gguf(_))));
    assert!(matches!(
        GgmlType::F32.row_bytes(u64::MAX),
        Err(Error::Gguf(_))
    ));
    for bad in [4, 5, 16, 29, 31, 1000, u32::MAX] {
        assert!(matches!(
            GgmlType::from_u32(bad),
            Err(Error::Unsupported(_))
        ));
    }
}

#[test]
fn value_type_names_and_display() {
    assert_eq!(Value::U32(1).type_name(), "u32");
    assert_eq!(Value::Array(Array::F32(vec![])).type_name(), "array of f32");
    assert_eq!(ValueType::String.to_string(), "string");
    assert_eq!(s("hi").to_string(), "\"hi\"");
    let a = Value::Array(Array::U32((0..10).collect()));
    assert_eq!(
        a.to_string(),
        "[array of u32 x10: 0, 1, 2, 3, 4, 5, 6, 7, ...]"
    );
    for v in 0..=12 {
        assert_eq!(ValueType::from_u32(v).unwrap() as u32, v);
    }
}

// ---- property tests -------------------------------------------------

fn arb_f32() -> impl Strategy<Value = f32> {
    any::<f32>().prop_map(|f| if f.is_nan() { 0.0 } else { f })
}

fn arb_f64() -> impl Strategy<Value = f64> {
    any::<f64>().prop_map(|f| if f.is_nan() { 0.0 } else { f })
}

fn arb_array() -> impl Strategy<Value = Array> {
    use proptest::collection::vec;
    let leaf = prop_oneof![
        vec(any::<u8>(), 0..6).prop_map(Array::U8),
        vec(any::<i8>(), 0..6).prop_map(Array::I8),
        vec(any::<u16>(), 0..6).prop_map(Array::U16),
        vec(any::<i16>(), 0..6).prop_map(Array::I16),
        vec(any::<u32>(), 0..6).prop_map(Array::U32),
        vec(any::<i32>(), 0..6).prop_map(Array::I32),
        vec(any::<u64>(), 0..6).prop_map(Array::U64),
        vec(any::<i64>(), 0..6).prop_map(Array::I64),
        vec(arb_f32(), 0..6).prop_map(Array::F32),
        vec(arb_f64(), 0..6).prop_map(Array::F64),
        vec(any::<bool>(), 0..6).prop_map(Array::Bool),
        vec(".{0,8}", 0..6).prop_map(Array::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| vec(inner, 0..4).prop_map(Array::Array))
}

fn arb_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<u8>().prop_map(Value::U8),
        any::<i8>().prop_map(Value::I8),
        any::<u16>().prop_map(Value::U16),
        any::<i16>().prop_map(Value::I16),
        any::<u32>().prop_map(Value::U32),
        any::<i32>().prop_map(Value::I32),
        any::<u64>().prop_map(Value::U64),
        any::<i64>().prop_map(Value::I64),
        arb_f32().prop_map(Value::F32),
        arb_f64().prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        ".{0,16}".prop_map(Value::String),
        arb_array().prop_map(Value::Array),
    ]
}

fn arb_metadata() -> impl Strategy<Value = Vec<(String, Value)>> {
    (
        proptest::collection::btree_map("[a-z][a-z0-9_.]{0,24}", arb_value(), 0..8),
        proptest::option::of(prop_oneof![Just(8u32), Just(32), Just(64), Just(4096)]),
    )
        .prop_map(|(m, align)| {
            let mut m: Vec<_> = m
                .into_iter()
                .filter(|(k, _)| k != "general.alignment")
                .collect();
            if let Some(a) = align {
                m.push(("general.alignment".to_string(), Value::U32(a)));
            }
            m
        })
}

fn arb_tensor() -> impl Strategy<Value = (Vec<u64>, GgmlType)> {
    (
        proptest::sample::select(GgmlType::ALL.to_vec()),
        1u64..4,
        proptest::collection::vec(1u64..5, 0..4),
    )
        .prop_map(|(ty, blocks, rest)| {
            let mut dims = vec![blocks * ty.block_size()];
            dims.extend(rest);
            (dims, ty)
        })
}

fn arb_tensors() -> impl Strategy<Value = Vec<(String, Vec<u64>, GgmlType)>> {
    proptest::collection::btree_map("[a-z0-9_.]{1,40}", arb_tensor(), 0..6).prop_map(|m| {
        m.into_iter()
            .map(|(name, (dims, ty))| (name, dims, ty))
            .collect()
    })
}

fn arb_file() -> impl Strategy<Value = Vec<u8>> {
    (arb_metadata(), arb_tensors()).prop_map(|(m, t)| write_gguf(&m, &t))
}

proptest! {
    #[test]
    fn write_parse_round_trip(metadata in arb_metadata(), tensors in arb_tensors()) {
        let bytes = write_gguf(&metadata, &tensors);
        let g = Gguf::parse(&bytes).unwrap();
        prop_assert_eq!(&g.metadata, &metadata);
        prop_assert_eq!(g.tensors.len(), tensors.len());
        prop_assert_eq!(g.data_offset % g.alignment, 0);
        for (info, (name, dims, ty)) in g.tensors.iter().zip(&tensors) {
            prop_assert_eq!(&info.name, name);
            prop_assert_eq!(&info.dims, dims);
            prop_assert_eq!(info.ggml_type, *ty);
            prop_assert_eq!(info.size, tensor_bytes(dims, *ty));
            prop_assert_eq!(info.n_elements(), info.rows() * info.cols());
            prop_assert_eq!((info.offset - g.data_offset) % g.alignment, 0);
            prop_assert_eq!(info.data(&bytes).unwrap().len() as u64, info.size);
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = Gguf::parse(&bytes);
        let mut with_header = b"GGUF\x03\0\0\0".to_vec();
        with_header.extend_from_slice(&bytes);
        let _ = Gguf::parse(&with_header);
    }

    #[test]
    fn truncated_files_are_errors(bytes in arb_file(), cut in any::<prop::sample::Index>()) {
        let cut = cut.index(bytes.len());
        prop_assert!(Gguf::parse(&bytes[..cut]).is_err());
    }

    #[test]
    fn mutated_files_never_panic(
        bytes in arb_file(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = bytes;
        for (at, b) in edits {
            let i = at.index(bytes.len());
            bytes[i] = b;
        }
        if let Ok(g) = Gguf::parse(&bytes) {
            for t in &g.tensors {
                prop_assert!(t.data(&bytes).is_ok());
            }
        }
    }
}
