//! Exact-accumulation mode is the hardware-independent reference: its logits
//! must be bit-identical on every CPU (AVX2, AVX-512, any thread count, any
//! batch split), because failover and private mode compare results computed
//! on different machines.
//!
//! `tests/data/exact_golden.json` holds, for the prompts of `golden.json`,
//! greedy tokens and a SHA-256 over every logit (f32 bits, little-endian) of
//! the prompt and of each generated step, recorded on one machine with
//! `MESH_RECORD_EXACT_GOLDEN=1 cargo test -p mesh-core --test engine_exact`.
//! Every other machine must reproduce the same digests; the file names the
//! CPU class it was recorded on, and the test prints this one's.

mod common;

use mesh_core::engine::{available_cores, Engine, EngineOptions, GgmlEngine, GgmlSession, Logits};
use mesh_core::sampling::argmax;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Greedy steps per prompt.
const STEPS: usize = 32;

const GOLDEN_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/exact_golden.json");

fn engine() -> GgmlEngine {
    GgmlEngine::load_with(
        common::model_path(),
        &EngineOptions::new().threads(common::THREADS).exact(true),
    )
    .expect("exact accumulation is not available on this CPU")
}

fn prompts(e: &GgmlEngine) -> Vec<(String, Vec<u32>)> {
    let g: Value = serde_json::from_str(include_str!("data/golden.json")).unwrap();
    g["generate"]["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let text = p["text"].as_str().unwrap();
            let ids = e.tokenizer().encode(text, true, true).unwrap();
            (p["name"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

/// A greedy run: the prompt fed in the given batch sizes (then one token per
/// step), its tokens and the SHA-256 of every logit vector it produced.
fn run(e: &GgmlEngine, s: &mut GgmlSession, prompt: &[u32], split: &[usize]) -> (Vec<u32>, String) {
    let mut hash = Sha256::new();
    let mut feed = |logits: &[f32]| {
        for v in logits {
            hash.update(v.to_le_bytes());
        }
    };
    let mut rest = prompt;
    let mut logits = Vec::new();
    for &n in split.iter().chain(std::iter::once(&usize::MAX)) {
        let (batch, tail) = rest.split_at(n.min(rest.len()));
        if batch.is_empty() {
            break;
        }
        logits = e.forward(batch, Logits::Last, s).unwrap();
        rest = tail;
    }
    feed(&logits);
    let mut tokens = Vec::new();
    for _ in 0..STEPS {
        let t = argmax(&logits).unwrap();
        tokens.push(t);
        logits = e.forward(&[t], Logits::Last, s).unwrap();
        feed(&logits);
    }
    let digest = hash.finalize().iter().map(|b| format!("{b:02x}")).collect();
    (tokens, digest)
}

#[test]
fn exact_mode_is_bit_identical_to_the_recorded_reference() {
    let e = engine();
    let prompts = prompts(&e);
    let mut runs = Vec::new();
    for (name, ids) in &prompts {
        let mut s = e.new_session(ids.len() + STEPS + 1).unwrap();
        let (tokens, digest) = run(&e, &mut s, ids, &[]);
        runs.push(json!({"name": name, "tokens": tokens, "logits_sha256": digest}));
    }
    let header = json!({
        "generated_by": "MESH_RECORD_EXACT_GOLDEN=1 cargo test -p mesh-core --test engine_exact",
        "steps": STEPS,
    });
    let recorded = include_str!("data/exact_golden.json");
    common::exact_golden(GOLDEN_PATH, recorded, header, runs);
}

/// The same digests however the prompt is split into batches (one batch, two,
/// token by token) and with two compute threads: the exact mode's results do
/// not depend on batching or threading either.
#[test]
fn exact_mode_ignores_batching_and_threads() {
    let e = engine();
    let prompts = prompts(&e);
    for (name, ids) in prompts.iter().take(3) {
        let mut s = e.new_session(ids.len() + STEPS + 1).unwrap();
        let whole = run(&e, &mut s, ids, &[]);
        let mut s = e.new_session(ids.len() + STEPS + 1).unwrap();
        let halves = run(&e, &mut s, ids, &[ids.len() / 2]);
        assert_eq!(whole, halves, "{name}: prompt in two batches");
        let mut s = e.new_session(ids.len() + STEPS + 1).unwrap();
        let singles = vec![1; ids.len()];
        let one_by_one = run(&e, &mut s, ids, &singles);
        assert_eq!(whole, one_by_one, "{name}: prompt token by token");
        let mut s = e.new_session(ids.len() + STEPS + 1).unwrap();
        s.set_threads(available_cores().min(2)).unwrap();
        let two_threads = run(&e, &mut s, ids, &[]);
        assert_eq!(whole, two_threads, "{name}: two threads");
    }
}
