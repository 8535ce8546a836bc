//! Peak memory while generating stays within 1.3x (model file + KV cache):
//! weights are memory-mapped, not copied, and compute buffers are reused.
//! Its own test binary, so no other test's model shares the process.

mod common;

use mesh_core::engine::{Engine, GgmlEngine};
use mesh_core::generate::{generate, tokenize_prompt, GenerateParams, Prompt};
use mesh_core::sampling::SamplerParams;

/// Peak resident set size of this process in bytes (Linux: VmHWM).
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

#[test]
fn peak_rss_while_generating_is_within_1_3x_model_plus_kv() {
    let Some(before) = peak_rss() else {
        eprintln!("skipping: /proc/self/status has no VmHWM on this platform");
        return;
    };
    let engine = GgmlEngine::load(common::model_path(), common::THREADS).unwrap();
    let ids = tokenize_prompt(&engine, &Prompt::Text("Once upon a time".into())).unwrap();
    let max_tokens = 96;
    let mut s = engine.new_session(ids.len() + max_tokens).unwrap();
    let params = GenerateParams {
        max_tokens,
        sampler: SamplerParams::greedy(),
        ignore_eos: true,
        ..GenerateParams::default()
    };
    let out = generate(&engine, &mut s, &ids, &params, None, &mut |_| true).unwrap();
    assert_eq!(out.token_ids.len(), max_tokens);
    let peak = peak_rss().unwrap();
    let budget = 1.3 * (engine.info().file_size as f64 + s.kv_bytes() as f64);
    eprintln!(
        "peak RSS {:.1} MB (test binary before loading: {:.1} MB), budget {:.1} MB",
        peak as f64 / 1e6,
        before as f64 / 1e6,
        budget / 1e6
    );
    assert!(
        (peak as f64) < budget,
        "peak RSS {peak} bytes exceeds the budget of {budget:.0}"
    );
}
