//! Fuzz target: LoRA adapter loading on arbitrary bytes must return an error
//! or a valid adapter, never panic. Each input is tried as is and as an XOR
//! mask over a valid adapter (so mutations start from a well-formed file).
//! An adapter that loads is then aggregated with the valid one (robust
//! aggregation takes peers' adapters): an error (non-finite values) or an
//! aggregate that loads again, never a panic.
//!
//! On stable, fuzz/run.sh builds it with coverage; `lora_load CORPUS -runs=0` replays.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::engine::lora::testing::{check, small_model};
use mesh_core::engine::lora::adapter_bytes;
use mesh_core::engine::LoraAdapter;
use mesh_core::ledger::{aggregate, AggregateConfig};

/// Aggregate `bytes` (if it loads) with `good`, three times over, f = 0.
fn aggregate_with(bytes: &[u8], good: &[u8]) {
    let (Ok(x), Ok(g)) = (check(bytes), check(good)) else {
        return;
    };
    let info = small_model();
    let config = AggregateConfig {
        byzantine: 0,
        clip_bound: None,
    };
    if let Ok(agg) = aggregate(&info, &[&x, &g, &x], &config) {
        assert_eq!(agg.selected.len(), 3);
        let back = LoraAdapter::from_bytes(&agg.adapter, &info);
        assert!(back.is_ok(), "the aggregate does not load: {back:?}");
    }
}

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
    aggregate_with(&bytes, &valid());
});
