//! Perplexity with the `mesh perplexity` protocol against upstream llama.cpp's value
//! on the same text (recorded by scripts/perplexity_upstream.py).

mod common;

use mesh_core::engine::{Engine, GgmlEngine};
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
    // The same computation as upstream's: 164.33015312267315 vs 164.3301531226733
    // measured; the tolerance allows for the output head's last-bit differences.
    assert!(
        rel < 1e-6,
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
