//! The engine against upstream llama.cpp: greedy tokens and logits recorded by
//! `scripts/golden.py` (llama-cpp-python) in `tests/data/golden.json`.
//!
//! The forward pass computes what current llama.cpp computes on this CPU
//! family, operation for operation: the same quantized dot products, RoPE with
//! the same fused rounding, fp16 K·Q and softmax·V products in the same
//! summation order (tiled for batches, plain f16 dot products for one token,
//! as upstream), the same vectorized exponential and softmax sums. So greedy
//! decoding must agree token for token, and the recorded top-10 logits
//! (rounded to 4 decimals by the script) must agree to that rounding.

mod common;

use mesh_core::engine::{Engine, GgmlEngine, Logits};
use mesh_core::sampling::argmax;
use serde_json::Value;

/// The recorded logits are rounded to 4 decimals; ours may differ from
/// upstream's by an f32 ulp on top (the output head's summation order).
const LOGIT_TOLERANCE: f32 = 6e-5;

fn golden() -> Value {
    serde_json::from_str(include_str!("data/golden.json")).expect("golden.json parses")
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest |ours - upstream| over upstream's top-10 logits.
fn top_logit_diff(ours: &[f32], top: &Value) -> f32 {
    top.as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (ours[pair[0].as_u64().unwrap() as usize] - pair[1].as_f64().unwrap() as f32).abs()
        })
        .fold(0.0, f32::max)
}

#[test]
fn greedy_tokens_and_logits_match_upstream_llama_cpp() {
    let g = golden();
    let engine = GgmlEngine::load(common::model_path(), common::THREADS).unwrap();
    let prompts = g["generate"]["prompts"].as_array().unwrap();
    assert!(prompts.len() >= 10);
    let mut tokens = 0;
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let prompt = engine
            .tokenizer()
            .encode(p["text"].as_str().unwrap(), true, true)
            .unwrap();
        assert_eq!(prompt, ids(&p["prompt_ids"]), "{name}: prompt tokens");
        let want = ids(&p["greedy_ids"]);
        assert!(want.len() >= 64, "{name}: {} tokens recorded", want.len());

        let mut s = engine.new_session(prompt.len() + want.len() + 1).unwrap();
        let mut logits = engine.forward(&prompt, Logits::Last, &mut s).unwrap();
        let d = top_logit_diff(&logits, &p["top_logits_last_prompt"]);
        assert!(
            d < LOGIT_TOLERANCE,
            "{name}: top-10 logits after the prompt differ by up to {d}"
        );
        for (step, &up) in want.iter().enumerate() {
            let ours = argmax(&logits).unwrap();
            assert_eq!(
                ours, up,
                "{name}: step {step}: we pick {ours}, upstream {up} (logits {} vs {})",
                logits[ours as usize], logits[up as usize]
            );
            logits = engine.forward(&[up], Logits::Last, &mut s).unwrap();
            if step == 0 {
                let d = top_logit_diff(&logits, &p["top_logits_after_first_generated"]);
                assert!(
                    d < LOGIT_TOLERANCE,
                    "{name}: top-10 logits after the first token differ by up to {d}"
                );
            }
        }
        tokens += want.len();
    }
    eprintln!(
        "{} prompts, {tokens} greedy tokens identical to upstream llama.cpp",
        prompts.len()
    );
}
