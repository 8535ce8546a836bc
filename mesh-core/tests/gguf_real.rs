//! Parses the real default model (SmolLM2-135M-Instruct, Q4_1).
//!
//! The path is `$MESH_MODEL`, or the default model fetched into the cache as
//! the CLI fetches it.

mod common;

use mesh_core::gguf::{Array, GgmlType, Gguf};
use std::path::PathBuf;

fn model_bytes() -> (PathBuf, Vec<u8>) {
    let path = common::model_path();
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (path, bytes)
}

#[test]
fn parses_the_default_model() {
    let (path, bytes) = model_bytes();
    let g = Gguf::parse(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));

    assert_eq!(g.version, 3);
    assert_eq!(g.alignment, 32);
    assert_eq!(g.architecture().unwrap(), "llama");
    assert_eq!(g.value::<u32>("llama.block_count").unwrap(), 30);
    assert_eq!(g.value::<u32>("llama.embedding_length").unwrap(), 576);
    assert_eq!(g.value::<u32>("llama.attention.head_count").unwrap(), 9);
    assert_eq!(g.value::<u32>("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(g.value::<f32>("llama.rope.freq_base").unwrap(), 100_000.0);
    assert_eq!(g.value::<&str>("tokenizer.ggml.model").unwrap(), "gpt2");
    assert_eq!(g.value::<u32>("tokenizer.ggml.eos_token_id").unwrap(), 2);
    assert!(!g.value::<bool>("tokenizer.ggml.add_bos_token").unwrap());
    assert!(g
        .value::<&str>("tokenizer.chat_template")
        .unwrap()
        .contains("<|im_start|>"));

    let tokens = g.value::<&[String]>("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[..3], ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]);
    match g.value::<&Array>("tokenizer.ggml.token_type").unwrap() {
        Array::I32(types) => assert_eq!(types.len(), 49152),
        other => panic!(
            "token_type: expected array of i32, found {}",
            other.type_name()
        ),
    }
    assert_eq!(
        g.value::<&[String]>("tokenizer.ggml.merges").unwrap().len(),
        48900
    );

    // 30 blocks x 9 tensors, token embedding, output norm; the output matrix is tied.
    assert_eq!(g.tensors.len(), 272);
    assert!(g.tensor("output.weight").is_none());

    let embd = g.require_tensor("token_embd.weight").unwrap();
    assert_eq!(embd.dims, [576, 49152]);
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.offset, g.data_offset);
    assert_eq!(embd.size, 49152 * (576 / 32) * 34);

    let q = g.require_tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!(q.dims, [576, 576]);
    assert_eq!(q.ggml_type, GgmlType::Q4_1);
    assert_eq!(q.size, 576 * 18 * 20);
    assert_eq!(q.data(&bytes).unwrap().len(), 207_360);

    let k = g.require_tensor("blk.29.attn_k.weight").unwrap();
    assert_eq!((k.cols(), k.rows()), (576, 192));
    let norm = g.require_tensor("output_norm.weight").unwrap();
    assert_eq!(
        (norm.dims.as_slice(), norm.ggml_type),
        (&[576u64][..], GgmlType::F32)
    );

    // The data section is packed: the last tensor ends at the end of the file.
    let end = g.tensors.iter().map(|t| t.offset + t.size).max().unwrap();
    assert_eq!(end, bytes.len() as u64);
}

#[test]
fn truncated_default_model_is_an_error() {
    let (_, bytes) = model_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    for cut in [
        0,
        3,
        23,
        100,
        g.data_offset as usize - 1,
        g.data_offset as usize + 1000,
        bytes.len() - 1,
    ] {
        assert!(
            Gguf::parse(&bytes[..cut]).is_err(),
            "a file cut at {cut} of {} bytes parsed",
            bytes.len()
        );
    }
}
