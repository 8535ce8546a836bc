//! Fuzz target: LoRA adapter loading on arbitrary bytes must return an error
//! or a valid adapter, never panic. Each input is tried as is and as an XOR
//! mask over a valid adapter (so mutations start from a well-formed file).
//!
//! On stable, fuzz/run.sh builds it with coverage; `lora_load CORPUS -runs=0` replays.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::engine::lora::{adapter_bytes, testing::check};

fn valid() -> Vec<u8> {
    let pair = |base: &str, cols: u64, rank: u64, rows: u64| {
        [
            (format!("{base}.lora_a"), [cols, rank], vec![0.25f32; (cols * rank) as usize]),
            (format!("{base}.lora_b"), [rank, rows], vec![-0.5f32; (rank * rows) as usize]),
        ]
    };
    let mut t = Vec::new();
    t.extend(pair("blk.0.attn_q.weight", 64, 2, 64));
    t.extend(pair("blk.1.ffn_down.weight", 128, 2, 64));
    adapter_bytes("llama", 4.0, &t)
}

fuzz_target!(|data: &[u8]| {
    let _ = check(data);
    let mut bytes = valid();
    for (i, b) in data.iter().enumerate() {
        let at = i % bytes.len();
        bytes[at] ^= b;
    }
    if data.len() > bytes.len() {
        // Longer inputs also truncate the file at a point they choose.
        let cut = data.len() % bytes.len();
        bytes.truncate(cut);
    }
    let _ = check(&bytes);
});
