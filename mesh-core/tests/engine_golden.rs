//! The engine against upstream llama.cpp: greedy tokens and logits recorded by
//! `scripts/golden.py` (llama-cpp-python) in `tests/data/golden.json`.
//!
//! Bit-identical logits are not expected: attention kernels differ between the
//! pinned ggml and current llama.cpp, and 8-bit activation quantization turns
//! last-bit differences into visible ones. Upstream itself moves logits by up to
//! ~0.8 between its batched and token-by-token paths on these prompts (measured
//! with the same llama-cpp-python). So: logits must agree within that noise, and
//! greedy decoding must agree token for token except where the two best
//! candidates are closer than that noise (a near-tie), which the test checks.

mod common;

use mesh_core::engine::{Engine, GgmlEngine, Logits};
use mesh_core::sampling::argmax;
use serde_json::Value;

/// Upstream's own disagreement between its batched and single-token paths.
const NOISE: f32 = 0.8;

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
    assert!(prompts.len() >= 4);
    let mut identical = 0;
    for p in prompts {
        let name = p["name"].as_str().unwrap();
        let prompt = engine
            .tokenizer()
            .encode(p["text"].as_str().unwrap(), true, true)
            .unwrap();
        assert_eq!(prompt, ids(&p["prompt_ids"]), "{name}: prompt tokens");
        let want = ids(&p["greedy_ids"]);

        let mut s = engine.new_session(prompt.len() + want.len() + 1).unwrap();
        let mut logits = engine.forward(&prompt, Logits::Last, &mut s).unwrap();
        let d = top_logit_diff(&logits, &p["top_logits_last_prompt"]);
        assert!(
            d < NOISE,
            "{name}: top-10 logits of the last prompt token differ by up to {d}"
        );

        let mut diverged = None;
        for (step, &up) in want.iter().enumerate() {
            let ours = argmax(&logits).unwrap();
            if ours != up {
                // Only a near-tie may flip: upstream's choice is (almost) as good in our logits.
                let gap = logits[ours as usize] - logits[up as usize];
                assert!(
                    gap < NOISE,
                    "{name}: step {step}: we pick {ours}, upstream {up}; our logit gap {gap} is no near-tie"
                );
                diverged = Some((step, gap));
                break;
            }
            if step == 0 {
                let d = top_logit_diff(&logits, &p["top_logits_last_prompt"]);
                assert!(d < NOISE, "{name}: first-step logits differ by up to {d}");
            }
            logits = engine.forward(&[up], Logits::Last, &mut s).unwrap();
            if step == 0 {
                let d = top_logit_diff(&logits, &p["top_logits_after_first_generated"]);
                assert!(
                    d < NOISE,
                    "{name}: logits after the first token differ by up to {d}"
                );
            }
        }
        match diverged {
            None => identical += 1,
            Some((step, gap)) => {
                eprintln!("{name}: near-tie at step {step} (gap {gap:.3}); identical before")
            }
        }
    }
    eprintln!(
        "{identical} of {} prompts identical for all 32 tokens",
        prompts.len()
    );
}
