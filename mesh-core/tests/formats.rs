//! Every supported weight format through the whole forward pass, on small
//! synthetic llama and qwen2 models written here (no download needed).
//!
//! For each format T the same random weights are written twice: quantized to T,
//! and as F32 holding exactly the dequantized T values. Both models compute the
//! same function, so their logits may differ only by the engine's own 8-bit
//! activation quantization: a wrong block layout, type mapping or kernel choice
//! shows up as a relative error near 1.

mod common;
use common::rel_l2;

use std::path::{Path, PathBuf};

use mesh_core::engine::{dequantize, quantize, Engine, GgmlEngine, Logits};
use mesh_core::gguf::Writer;
use mesh_core::gguf::{Array, GgmlType, Value};

const N_EMBD: usize = 256;
const N_FF: usize = 512;
const N_HEAD: u32 = 4;
const N_HEAD_KV: u32 = 2;
const N_LAYERS: usize = 2;
const KV_DIM: usize = N_EMBD / N_HEAD as usize * N_HEAD_KV as usize;

/// GPT-2's byte-to-unicode table: the 256 single-byte tokens of a byte-level BPE vocab.
fn byte_tokens() -> Vec<String> {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32).collect();
    printable.extend(0xA1..=0xAC);
    printable.extend(0xAE..=0xFF);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            let c = if printable.contains(&b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).unwrap().to_string()
        })
        .collect()
}

/// Deterministic pseudo-random values in [-scale, scale).
fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

struct Tensor {
    name: String,
    dims: Vec<u64>,
    ty: GgmlType,
    data: Vec<u8>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A matrix of `rows` rows of `cols`, stored as `ty`, or as F32 holding the values
/// that `ty` would dequantize to when `exact_f32` is set.
fn matrix(
    name: &str,
    cols: usize,
    rows: usize,
    seed: u64,
    ty: GgmlType,
    exact_f32: bool,
) -> Tensor {
    let w = random(cols * rows, seed, 0.08);
    let q = quantize(ty, &w, cols).unwrap();
    let (ty, data) = if exact_f32 {
        (
            GgmlType::F32,
            f32_bytes(&dequantize(ty, &q, w.len(), cols).unwrap()),
        )
    } else {
        (ty, q)
    };
    Tensor {
        name: name.into(),
        dims: vec![cols as u64, rows as u64],
        ty,
        data,
    }
}

fn vector(name: &str, len: usize, seed: u64, base: f32) -> Tensor {
    let v: Vec<f32> = random(len, seed, 0.1).iter().map(|x| base + x).collect();
    Tensor {
        name: name.into(),
        dims: vec![len as u64],
        ty: GgmlType::F32,
        data: f32_bytes(&v),
    }
}

/// Write a tiny model of architecture `arch` ("llama" or "qwen2", the latter with
/// q/k/v biases) whose matrices are stored as `ty`.
fn write_model(path: &Path, arch: &str, ty: GgmlType, exact_f32: bool, tied: bool) {
    write_model_claiming(path, arch, ty, exact_f32, tied, N_LAYERS as u32)
}

/// [`write_model`] whose metadata claims `block_count` layers (the tensors are
/// those of `N_LAYERS`).
fn write_model_claiming(
    path: &Path,
    arch: &str,
    ty: GgmlType,
    exact_f32: bool,
    tied: bool,
    block_count: u32,
) {
    let mut tokens = byte_tokens();
    tokens.push("Ġt".into());
    tokens.push("<|endoftext|>".into());
    let n_vocab = tokens.len();
    let mut types = vec![1i32; 257];
    types.push(3);
    let s = |v: &str| Value::String(v.into());
    let k = |key: &str| format!("{arch}.{key}");
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), s(arch)),
        (k("block_count"), Value::U32(block_count)),
        (k("embedding_length"), Value::U32(N_EMBD as u32)),
        (k("feed_forward_length"), Value::U32(N_FF as u32)),
        (k("attention.head_count"), Value::U32(N_HEAD)),
        (k("attention.head_count_kv"), Value::U32(N_HEAD_KV)),
        (k("context_length"), Value::U32(128)),
        (k("attention.layer_norm_rms_epsilon"), Value::F32(1e-5)),
        (k("rope.freq_base"), Value::F32(10000.0)),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("default")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(Array::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(Array::I32(types)),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(Array::String(vec!["Ġ t".into()])),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(n_vocab as u32 - 1),
        ),
    ];
    let mut t = vec![
        Tensor {
            name: "token_embd.weight".into(),
            dims: vec![N_EMBD as u64, n_vocab as u64],
            ty: GgmlType::F32,
            data: f32_bytes(&random(N_EMBD * n_vocab, 1, 1.0)),
        },
        vector("output_norm.weight", N_EMBD, 2, 1.0),
    ];
    if !tied {
        t.push(matrix("output.weight", N_EMBD, n_vocab, 3, ty, exact_f32));
    }
    for l in 0..N_LAYERS {
        let seed = 100 * (l as u64 + 1);
        let name = |n: &str| format!("blk.{l}.{n}");
        t.push(vector(&name("attn_norm.weight"), N_EMBD, seed, 1.0));
        t.push(matrix(
            &name("attn_q.weight"),
            N_EMBD,
            N_EMBD,
            seed + 1,
            ty,
            exact_f32,
        ));
        t.push(matrix(
            &name("attn_k.weight"),
            N_EMBD,
            KV_DIM,
            seed + 2,
            ty,
            exact_f32,
        ));
        t.push(matrix(
            &name("attn_v.weight"),
            N_EMBD,
            KV_DIM,
            seed + 3,
            ty,
            exact_f32,
        ));
        if arch == "qwen2" {
            t.push(vector(&name("attn_q.bias"), N_EMBD, seed + 4, 0.0));
            t.push(vector(&name("attn_k.bias"), KV_DIM, seed + 5, 0.0));
            t.push(vector(&name("attn_v.bias"), KV_DIM, seed + 6, 0.0));
        }
        t.push(matrix(
            &name("attn_output.weight"),
            N_EMBD,
            N_EMBD,
            seed + 7,
            ty,
            exact_f32,
        ));
        t.push(vector(&name("ffn_norm.weight"), N_EMBD, seed + 8, 1.0));
        t.push(matrix(
            &name("ffn_gate.weight"),
            N_EMBD,
            N_FF,
            seed + 9,
            ty,
            exact_f32,
        ));
        t.push(matrix(
            &name("ffn_up.weight"),
            N_EMBD,
            N_FF,
            seed + 10,
            ty,
            exact_f32,
        ));
        t.push(matrix(
            &name("ffn_down.weight"),
            N_FF,
            N_EMBD,
            seed + 11,
            ty,
            exact_f32,
        ));
    }

    let mut w = Writer::new();
    w.header(3, t.len() as u64, metadata.len() as u64);
    for (key, v) in &metadata {
        w.kv(key, v);
    }
    let mut offset = 0u64;
    for tensor in &t {
        w.tensor_info(&tensor.name, &tensor.dims, tensor.ty as u32, offset);
        offset = (offset + tensor.data.len() as u64).div_ceil(32) * 32;
    }
    for tensor in &t {
        w.pad_to(32);
        w.raw(&tensor.data);
    }
    std::fs::write(path, &w.buf).unwrap();
}

fn tmp(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-formats-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn logits(path: &Path, tokens: &[u32]) -> Vec<f32> {
    let e = GgmlEngine::load(path, 1).unwrap();
    let mut s = e.new_session(32).unwrap();
    e.forward(tokens, Logits::All, &mut s).unwrap()
}

const TOKENS: [u32; 12] = [72, 101, 108, 108, 111, 256, 119, 111, 114, 108, 100, 33];

#[test]
fn every_weight_format_computes_the_same_function_as_its_f32_dequantization() {
    let formats = [
        GgmlType::F16,
        GgmlType::Q8_0,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_K,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];
    for ty in formats {
        for (arch, tied) in [("llama", true), ("qwen2", false)] {
            let q = tmp(&format!("{arch}-{}.gguf", ty.name()));
            let f = tmp(&format!("{arch}-{}-f32.gguf", ty.name()));
            write_model(&q, arch, ty, false, tied);
            write_model(&f, arch, ty, true, tied);
            let (got, want) = (logits(&q, &TOKENS), logits(&f, &TOKENS));
            let rel = rel_l2(&got, &want);
            // Only the 8-bit (F16: 16-bit) activation quantization separates them.
            eprintln!("{arch} {}: relative L2 {rel:.5}", ty.name());
            assert!(rel < 0.03, "{arch} {}: relative L2 {rel}", ty.name());
            std::fs::remove_file(&q).ok();
            std::fs::remove_file(&f).ok();
        }
    }
}

#[test]
fn qwen2_layer_ranges_compose_with_biases() {
    let path = tmp("qwen2-split.gguf");
    write_model(&path, "qwen2", GgmlType::Q8_0, false, false);
    let e = GgmlEngine::load(&path, 1).unwrap();
    assert_eq!(e.info().architecture, "qwen2");
    let mut whole = e.new_session(32).unwrap();
    let want = e.forward(&TOKENS, Logits::Last, &mut whole).unwrap();
    let mut s = e.new_session(32).unwrap();
    let mut h = e.embed(&TOKENS, 0).unwrap();
    e.run_layers(0..1, &mut h, &mut s).unwrap();
    e.run_layers(1..2, &mut h, &mut s).unwrap();
    let got = e.head(&h, Logits::Last, &mut s).unwrap();
    assert!(rel_l2(&got, &want) < 1e-5);
    assert_eq!(
        e.tokenizer().encode("Hello t", false, false).unwrap(),
        vec![72, 101, 108, 108, 111, 256]
    );
    std::fs::remove_file(&path).ok();
}

/// Sizes from a hostile file or caller are typed errors, never an abort inside
/// ggml or the allocator (each of these used to abort or hang the process).
#[test]
fn hostile_sizes_are_errors_not_aborts() {
    use mesh_core::engine::available_cores;
    use mesh_core::Error;
    // A block count the tensor index cannot back: no allocation of 1e8 layers.
    let path = tmp("claims-1e8-layers.gguf");
    write_model_claiming(&path, "llama", GgmlType::F32, true, true, 100_000_000);
    match GgmlEngine::load(&path, 1) {
        Err(Error::Gguf(m)) => assert!(m.message().contains("block_count"), "{m}"),
        other => panic!("expected a block_count error, got {other:?}"),
    }
    // Context sizes past the trained context (128 here), up to ones whose KV
    // span would wrap around: errors that say what is possible.
    let path = tmp("hostile-llama.gguf");
    write_model(&path, "llama", GgmlType::F32, true, true);
    let e = GgmlEngine::load(&path, 1).unwrap();
    assert!(e.new_session(128).is_ok());
    for n_ctx in [129, 1_000_000, 1 << 40, usize::MAX - 1, usize::MAX] {
        match e.new_session(n_ctx) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("128"), "{m}"),
            Err(other) => panic!("n_ctx {n_ctx}: unexpected error {other}"),
            Ok(_) => panic!("n_ctx {n_ctx}: accepted"),
        }
    }
    // Thread counts: more than the cores is refused, 0 picks a safe default.
    let cores = available_cores();
    for n in [cores + 1, 100_000, usize::MAX] {
        assert!(
            matches!(GgmlEngine::load(&path, n), Err(Error::InvalidArgument(_))),
            "{n} threads accepted"
        );
    }
    let e = GgmlEngine::load(&path, 0).unwrap();
    assert!((1..=cores).contains(&e.n_threads()));
    let mut s = e.new_session(8).unwrap();
    assert!(s.set_threads(cores + 1).is_err());
    assert!(s.set_threads(1).is_ok());
    // Something that is not a regular file (a FIFO would block the open forever).
    let fifo = tmp("model.fifo");
    let _ = std::fs::remove_file(&fifo);
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    if made.is_ok_and(|s| s.success()) {
        match GgmlEngine::load(&fifo, 1) {
            Err(Error::InvalidArgument(m)) => assert!(m.contains("FIFO"), "{m}"),
            other => panic!("expected a FIFO error, got {other:?}"),
        }
    }
    match GgmlEngine::load(std::env::temp_dir(), 1) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains("directory"), "{m}"),
        other => panic!("expected a directory error, got {other:?}"),
    }
}
