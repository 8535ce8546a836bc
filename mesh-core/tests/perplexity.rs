//! Perplexity with the `mesh perplexity` protocol against upstream llama.cpp's value
//! on the same text (recorded by scripts/perplexity_upstream.py).

mod common;

use mesh_core::engine::{cpu_class, Engine, GgmlEngine};
use mesh_core::generate::{perplexity, DEFAULT_BATCH};

#[test]
fn perplexity_matches_upstream() {
    let want: serde_json::Value =
        serde_json::from_str(include_str!("data/perplexity.json")).unwrap();
    let ctx = want["ctx"].as_u64().unwrap() as usize;
    let engine = GgmlEngine::load(common::model_path(), common::THREADS).unwrap();
    let tokens = engine
        .tokenizer()
        .encode(include_str!("data/ppl_words.txt"), false, false)
        .unwrap();
    let mut windows = Vec::new();
    let got = perplexity(&engine, &tokens, ctx, DEFAULT_BATCH, &mut |done, total| {
        windows.push((done, total))
    })
    .unwrap();
    assert_eq!(got.tokens as u64, want["tokens"].as_u64().unwrap());
    assert_eq!(
        windows.last(),
        Some(&(tokens.len() / ctx, tokens.len() / ctx))
    );
    let upstream = want["ppl"].as_f64().unwrap();
    let rel = (got.ppl - upstream).abs() / upstream;
    // On the CPU class upstream's value was recorded on, the same computation:
    // 164.33015312267315 vs 164.3301531226733 measured; the tolerance allows for
    // the output head's last-bit differences. On another class the dot products
    // sum in another order (as upstream's own builds for that class do):
    // measured 164.1757 on AVX2 (9.4e-4 relative); allowed: 2e-3.
    let same_class = want["cpu_class"].as_str() == Some(cpu_class().name());
    let tolerance = if same_class { 1e-6 } else { 2e-3 };
    eprintln!(
        "perplexity {} vs upstream {upstream} ({rel:.3e} relative; upstream recorded on {}, \
         this build {})",
        got.ppl,
        want["cpu_class"],
        cpu_class()
    );
    assert!(
        rel < tolerance,
        "perplexity {} vs upstream {upstream} ({rel:.4} relative)",
        got.ppl
    );
}

#[test]
fn perplexity_rejects_too_little_text() {
    let engine = GgmlEngine::load(common::model_path(), common::THREADS).unwrap();
    assert!(perplexity(&engine, &[1, 2, 3], 8, DEFAULT_BATCH, &mut |_, _| {}).is_err());
    assert!(perplexity(&engine, &[1, 2, 3], 1, DEFAULT_BATCH, &mut |_, _| {}).is_err());
}
