//! The tiled Q4_1 kernel for batched projections gives bit-identical logits to
//! ggml's own `mul_mat` on the default model (whose projections are Q4_1).

mod common;

use mesh_core::engine::{Engine, GgmlEngine, Logits, Projection};
use mesh_core::gguf::GgmlType;

fn logits(e: &GgmlEngine, tokens: &[u32], custom: bool) -> (Vec<f32>, Vec<f32>) {
    let on = e.set_custom_gemm(custom);
    assert_eq!(on, custom, "the kernel should be available on this CPU");
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
    let (ggml_all, ggml_rest) = logits(&e, &tokens, false);
    let (ours_all, ours_rest) = logits(&e, &tokens, true);
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
