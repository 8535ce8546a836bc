//! The tiled Q4_1 kernel for batched projections gives bit-identical logits to
//! ggml's own `mul_mat` on the default model (whose projections are Q4_1).

mod common;

use mesh_core::engine::{Engine, EngineOptions, GgmlEngine, Logits, Projection};
use mesh_core::gguf::GgmlType;

fn logits(threads: usize, tokens: &[u32], custom: bool) -> (Vec<f32>, Vec<f32>) {
    let opts = EngineOptions::new().threads(threads).custom_gemm(custom);
    let e = GgmlEngine::load_with(common::model_path(), &opts).expect("load default model");
    assert_eq!(
        e.options().custom_gemm,
        custom,
        "the kernel should be available on this CPU"
    );
    let mut s = e.new_session(64).unwrap();
    let all = e.forward(tokens, Logits::All, &mut s).unwrap();
    // A second batch at a non-zero position, then a single token (ggml's path).
    let more = e.forward(&tokens[..7], Logits::All, &mut s).unwrap();
    let one = e.forward(&tokens[..1], Logits::Last, &mut s).unwrap();
    (all, [more, one].concat())
}

fn check(threads: usize) {
    let e = GgmlEngine::load(common::model_path(), threads).expect("load default model");
    let n_q4_1 = (0..e.info().n_layers)
        .flat_map(|l| [Projection::Q, Projection::Up, Projection::Down].map(|p| (l, p)))
        .filter(|&(l, p)| e.weight(l, p).unwrap().ggml_type == GgmlType::Q4_1)
        .count();
    assert!(n_q4_1 > 0, "the default model should have Q4_1 projections");
    let tokens: Vec<u32> = e
        .tokenizer()
        .encode(
            "Tiled kernels must not change a single bit of the model's output, ever.",
            false,
            false,
        )
        .unwrap();
    let tokens: Vec<u32> = tokens.iter().cycle().take(20).copied().collect();
    let (ggml_all, ggml_rest) = logits(threads, &tokens, false);
    let (ours_all, ours_rest) = logits(threads, &tokens, true);
    assert_eq!(ggml_all.len(), 20 * e.info().n_vocab);
    let same = |a: &[f32], b: &[f32]| {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
    };
    assert!(
        same(&ggml_all, &ours_all),
        "20-token logits differ ({threads} threads)"
    );
    assert!(
        same(&ggml_rest, &ours_rest),
        "later logits differ ({threads} threads)"
    );
}

#[test]
fn batched_logits_are_bit_identical_with_and_without_the_kernel() {
    // One test, so the multi-threaded run does not compete with another engine.
    check(common::THREADS);
    check(2);
}

/// Exact accumulation (`EngineOptions::exact`) computes every Q4_1 output
/// independently of batching and threads: last-token logits of a prompt are the
/// same processed in one batch or token by token, with 1 or 2 threads; an
/// exact engine beside a default one leaves the default path unchanged.
#[test]
fn exact_accumulation_ignores_batching_and_threads() {
    let tokens: Vec<u32> = {
        let e = GgmlEngine::load(common::model_path(), 1).expect("load default model");
        e.tokenizer()
            .encode(
                "Exact sums do not care how the work is split.",
                false,
                false,
            )
            .unwrap()
    };
    let mut results = Vec::new();
    for threads in [1, 2] {
        let e = GgmlEngine::load(common::model_path(), threads).expect("load default model");
        let mut s = e.new_session(64).unwrap();
        let default = e.forward(&tokens, Logits::Last, &mut s).unwrap();
        let opts = EngineOptions::new().threads(threads).exact(true);
        let x = GgmlEngine::load_with(common::model_path(), &opts).expect("needs AVX2/FMA/F16C");
        let mut s = x.new_session(64).unwrap();
        let batched = x.forward(&tokens, Logits::Last, &mut s).unwrap();
        let mut s = x.new_session(64).unwrap();
        let mut single = Vec::new();
        for t in &tokens {
            single = x.forward(&[*t], Logits::Last, &mut s).unwrap();
        }
        let mut s = e.new_session(64).unwrap();
        let again = e.forward(&tokens, Logits::Last, &mut s).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&default),
            bits(&again),
            "{threads} threads: default changed"
        );
        assert_ne!(
            bits(&default),
            bits(&batched),
            "exact mode should change something"
        );
        let argmax = |v: &[f32]| mesh_core::sampling::argmax(v).unwrap();
        assert_eq!(argmax(&batched), argmax(&single));
        results.push((bits(&batched), bits(&single)));
    }
    let diff = |a: &[u32], b: &[u32]| a.iter().zip(b).filter(|(x, y)| x != y).count();
    for (k, (batched, single)) in results.iter().enumerate() {
        eprintln!(
            "exact, {} thread(s): batched vs token by token: {} of {} logits differ",
            k + 1,
            diff(batched, single),
            batched.len()
        );
    }
    eprintln!(
        "exact, 1 vs 2 threads: batched {} differ, token by token {} differ",
        diff(&results[0].0, &results[1].0),
        diff(&results[0].1, &results[1].1)
    );
    assert_eq!(results[0].0, results[1].0, "batched: 1 vs 2 threads");
    assert_eq!(results[0].1, results[1].1, "token by token: 1 vs 2 threads");
    for (batched, single) in &results {
        assert_eq!(batched, single, "batched vs token by token");
    }
}
