//! Private delegation (`delegate::private`) on the default model: exactness of
//! single projections, a private forward pass and greedy decoding against the
//! local engine, cheating helpers, and bytes per token.

mod common;
use common::{argmax, rel_l2};

use std::sync::OnceLock;

use mesh_core::delegate::activations::{q8_1_sums, quantize_like_ggml, ActivationFormat};
use mesh_core::delegate::private::{Cheat, PrivateProjector};
use mesh_core::delegate::Matrix;
use mesh_core::engine::{Engine, EngineOptions, GgmlEngine, Logits, Projection};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

fn engine() -> &'static GgmlEngine {
    static E: OnceLock<GgmlEngine> = OnceLock::new();
    E.get_or_init(|| {
        GgmlEngine::load(common::model_path(), common::THREADS).expect("load default model")
    })
}

/// A second instance of the default model with exact accumulation on (see
/// `EngineOptions::exact`), for local runs that compute the same
/// exact products as the private path.
fn exact_engine() -> &'static GgmlEngine {
    static E: OnceLock<GgmlEngine> = OnceLock::new();
    E.get_or_init(|| {
        let opts = EngineOptions::new().threads(common::THREADS).exact(true);
        GgmlEngine::load_with(common::model_path(), &opts).expect("exact accumulation")
    })
}

fn projector(n: usize, seed: u64) -> PrivateProjector<'static, GgmlEngine, ChaCha20Rng> {
    PrivateProjector::new(engine(), n, ChaCha20Rng::seed_from_u64(seed)).unwrap()
}

/// Largest minus second-largest logit.
fn top2_gap(v: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &x in v {
        if x > a {
            b = a;
            a = x;
        } else if x > b {
            b = x;
        }
    }
    a - b
}

/// Activations of `n` tokens with magnitudes spread over a few octaves.
fn activations(n: usize, cols: usize) -> Vec<f32> {
    (0..n * cols)
        .map(|i| {
            let t = i / cols;
            let v = ((i * 37 % 101) as f32 / 50.0) - 1.0;
            v * 2f32.powi((i % 7) as i32 - 3) * (1.0 + t as f32 * 3.0)
        })
        .collect()
}

/// The exact weights `w[r][j]` of a projection (the GGUF block values, exact
/// in f64; ggml's own f32 dequantization of Q4_1 rounds `d·q + m`).
fn exact_weights(layer: usize, p: Projection) -> (usize, usize, Vec<f64>) {
    let m = Matrix::from_view(&engine().weight(layer, p).unwrap()).unwrap();
    let (rows, cols) = (m.rows(), m.cols());
    let mut w = vec![0f64; rows * cols];
    let mut row = vec![0i64; cols];
    for r in 0..rows {
        m.row_weights(r, &mut row).unwrap();
        for (o, v) in w[r * cols..(r + 1) * cols].iter_mut().zip(&row) {
            *o = *v as f64 / 2f64.powi(24);
        }
    }
    (rows, cols, w)
}

/// The activations ggml's mat-vec with `p`'s weights multiplies (exact f64).
fn ggml_activations(layer: usize, p: Projection, x: &[f32]) -> Vec<f64> {
    let w = engine().weight(layer, p).unwrap();
    quantize_like_ggml(ActivationFormat::for_weights(w.ggml_type).unwrap(), x).unwrap()
}

/// `W·x'` in f64 with the exact weights, where `x'` is what ggml's quantized
/// mat-vec makes of `x` (the private path computes exactly this product, up
/// to its fixed-point rounding; the true-`x` product differs from both by the
/// 8-bit activation quantization, ~1e-2 relative, that the local path has too).
fn reference(layer: usize, p: Projection, x: &[f32], n: usize) -> Vec<f64> {
    let (rows, cols, w) = exact_weights(layer, p);
    let xq = ggml_activations(layer, p, x);
    let mut out = Vec::with_capacity(n * rows);
    for t in 0..n {
        let xt = &xq[t * cols..(t + 1) * cols];
        for r in 0..rows {
            out.push(
                w[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(xt)
                    .map(|(a, b)| a * b)
                    .sum::<f64>(),
            );
        }
    }
    out
}

fn rel_l2_f64(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (f64::from(*g) - w).powi(2);
        den += w.powi(2);
    }
    (num / den).sqrt()
}

/// Reconstruction error of the private projections against an f64 reference
/// computed on the same quantized activations (the owner feeds the ring what
/// ggml's mat-vec would multiply, 8-bit blocks; against the raw f32
/// activations both paths are ~1e-2 off, which says nothing about the ring).
#[test]
fn private_projections_match_an_f64_reference() {
    let e = engine();
    let n = 3;
    let x = activations(n, e.info().n_embd);
    // Q and K of layer 3 (K served from the fused Q/K/V request) and the output.
    let cases = [
        (3, Projection::Q),
        (3, Projection::K),
        (0, Projection::Output),
    ];
    let want: Vec<Vec<f64>> = cases
        .iter()
        .map(|(l, p)| reference(*l, *p, &x, n))
        .collect();
    for helpers in [2, 3] {
        for fuse in [true, false] {
            let mut pp = projector(helpers, 11 + helpers as u64);
            pp.set_fuse(fuse);
            // The ring's own reconstruction error: the exact product of the
            // quantized activations (the default: ggml's fp16 `s` not mimicked).
            for ((layer, p), want) in cases.iter().zip(&want) {
                let y = pp.project(*layer, *p, &x, n).unwrap();
                let rel = rel_l2_f64(&y, want);
                let w = e.weight(*layer, *p).unwrap();
                eprintln!(
                    "{p:?} ({} {}x{}), n = {helpers}, fused = {fuse}: relative L2 vs f64 reference = {rel:.3e}",
                    w.ggml_type, w.rows, w.cols
                );
                assert!(rel <= 1e-7, "{p:?}, n = {helpers}: relative L2 {rel}");
            }
            let s = pp.stats();
            assert_eq!(s.checks_failed, 0);
            if fuse {
                // Q/K/V in one round trip (V computed but not asked for), then the output.
                assert_eq!((s.round_trips, s.projections), (2, 4));
            } else {
                assert_eq!((s.round_trips, s.projections), (3, 3));
            }
        }
    }
}

/// Private prefill of `toks` and greedy decoding of `steps` tokens; returns the
/// last-prompt-token logits and the generated tokens.
fn private_greedy(
    pp: &mut PrivateProjector<'static, GgmlEngine, ChaCha20Rng>,
    toks: &[u32],
    steps: usize,
) -> (Vec<f32>, Vec<u32>) {
    let e = engine();
    let n_layers = e.info().n_layers;
    let mut s = e.new_session(toks.len() + steps + 1).unwrap();
    let mut project = |l: usize, p: Projection, x: &[f32], n: usize| pp.project(l, p, x, n);
    let mut h = e.embed(toks, 0).unwrap();
    e.run_layers_with(0..n_layers, &mut h, &mut s, &mut project)
        .unwrap();
    let first = e.head_with(&h, Logits::Last, &mut s, &mut project).unwrap();
    let mut out = vec![argmax(&first) as u32];
    while out.len() < steps {
        let pos = toks.len() + out.len() - 1;
        let mut h = e.embed(&out[out.len() - 1..], pos).unwrap();
        e.run_layers_with(0..n_layers, &mut h, &mut s, &mut project)
            .unwrap();
        let logits = e.head_with(&h, Logits::Last, &mut s, &mut project).unwrap();
        out.push(argmax(&logits) as u32);
    }
    (first, out)
}

/// Local greedy decoding; also returns the top-2 gap of every step's logits.
fn local_greedy(toks: &[u32], steps: usize) -> (Vec<f32>, Vec<u32>, Vec<f32>) {
    let e = engine();
    let mut s = e.new_session(toks.len() + steps + 1).unwrap();
    let first = e.forward(toks, Logits::Last, &mut s).unwrap();
    let mut out = vec![argmax(&first) as u32];
    let mut gaps = vec![top2_gap(&first)];
    while out.len() < steps {
        let logits = e
            .forward(&out[out.len() - 1..], Logits::Last, &mut s)
            .unwrap();
        out.push(argmax(&logits) as u32);
        gaps.push(top2_gap(&logits));
    }
    (first, out, gaps)
}

#[test]
fn private_forward_and_greedy_decoding_match_the_local_engine() {
    let e = engine();
    let prompts = [
        "The quick brown fox jumps over the lazy dog because it",
        "The capital of France is Paris, and the capital of Italy is",
        "def fibonacci(n):\n    if n < 2:\n        return n\n   ",
    ];
    const STEPS: usize = 16;
    let mut pp = projector(2, 7);
    let mut identical = 0;
    for (k, prompt) in prompts.iter().enumerate() {
        let toks = e.tokenizer().encode(prompt, false, false).unwrap();
        let (pl, ptoks) = private_greedy(&mut pp, &toks, STEPS);
        let (ll, ltoks, gaps) = local_greedy(&toks, STEPS);
        if k == 0 {
            let rel = rel_l2(&pl, &ll);
            eprintln!(
                "prompt of {} tokens, 30 layers + head: logits relative L2 private vs local = {rel:.3e}, \
                 argmax private {} local {}",
                toks.len(),
                argmax(&pl),
                argmax(&ll)
            );
            assert!(rel < 5e-2, "logits relative L2 {rel}");
            assert_eq!(argmax(&pl), argmax(&ll));
        }
        let same = ptoks.iter().zip(&ltoks).take_while(|(a, b)| a == b).count();
        identical += same;
        if same < STEPS {
            eprintln!(
                "prompt {k}: first divergence at step {same}: private {} local {}, local top-2 gap {:.4}",
                ptoks[same], ltoks[same], gaps[same]
            );
            assert!(
                gaps[same] < 0.5,
                "prompt {k}: private and local diverge at step {same} where the local top-2 gap is {}",
                gaps[same]
            );
        } else {
            eprintln!("prompt {k}: all {STEPS} greedy tokens identical");
        }
    }
    eprintln!(
        "greedy: {identical} / {} tokens identical before any divergence",
        STEPS * prompts.len()
    );
    let s = pp.stats();
    assert_eq!(s.checks_failed, 0, "an honest run passes every check");
    assert_eq!(
        s.projections as usize,
        prompts.len() * STEPS * (7 * e.info().n_layers + 1)
    );
    assert_eq!(
        s.round_trips as usize,
        prompts.len() * STEPS * (4 * e.info().n_layers + 1),
        "Q/K/V and gate/up fused"
    );
}

#[test]
fn a_cheating_helper_is_caught() {
    let e = engine();
    let x = activations(2, e.info().n_embd);
    for (helper, cheat) in [(0, Cheat::FlipBit), (1, Cheat::AddOne), (2, Cheat::FlipBit)] {
        let mut pp = projector(3, 5);
        pp.project(0, Projection::Q, &x, 2).unwrap();
        assert_eq!(pp.stats().checks_failed, 0);
        pp.set_cheat(Some((helper, cheat))).unwrap();
        let err = pp.project(0, Projection::Q, &x, 2).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("layer 0 Q"), "{msg}");
        assert!(
            msg.contains(&format!("helper {helper} returned a wrong result")),
            "{msg}"
        );
        if helper == 0 {
            eprintln!("cheat caught: {msg}");
        }
        assert_eq!(pp.stats().checks_failed, 1, "{helper} {cheat:?}");
        let err = pp.project(2, Projection::Down, &activations(1, e.info().n_ff), 1);
        assert!(err.is_err(), "{helper} {cheat:?} on Down");
        assert_eq!(pp.stats().checks_failed, 2);
        pp.set_cheat(None).unwrap();
        pp.project(0, Projection::Q, &x, 2).unwrap();
        assert_eq!(pp.stats().checks_failed, 2);
    }
    let mut pp = projector(2, 5);
    assert!(pp.set_cheat(Some((2, Cheat::AddOne))).is_err());
    assert!(PrivateProjector::new(e, 1, ChaCha20Rng::seed_from_u64(1)).is_err());
    // A forward pass with a cheater fails instead of producing logits.
    pp.set_cheat(Some((1, Cheat::AddOne))).unwrap();
    let toks = e.tokenizer().encode("Hello there", false, false).unwrap();
    let mut s = e.new_session(8).unwrap();
    let mut h = e.embed(&toks, 0).unwrap();
    let r = e.run_layers_with(0..e.info().n_layers, &mut h, &mut s, &mut |l, p, x, n| {
        pp.project(l, p, x, n)
    });
    assert!(r.is_err());
    assert_eq!(pp.stats().checks_failed, 1);
}

#[test]
fn a_failing_helper_is_dropped_and_the_step_redone_on_a_spare() {
    let e = engine();
    let x = activations(2, e.info().n_embd);
    let want = projector(2, 9).project(0, Projection::Q, &x, 2).unwrap();
    // Every way a helper can fail, at either share position (0 gets a seed,
    // 1 the full vector).
    for cheat in [
        Cheat::FlipBit,
        Cheat::AddOne,
        Cheat::Fail,
        Cheat::CorruptEnvelope,
    ] {
        for bad in [0, 1] {
            let mut pp =
                PrivateProjector::with_spares(e, 2, 2, ChaCha20Rng::seed_from_u64(7)).unwrap();
            pp.set_cheat(Some((bad, cheat))).unwrap();
            // The result is the honest one: shares differ, the exact product does not.
            let got = pp.project(0, Projection::Q, &x, 2).unwrap();
            assert_eq!(got, want, "{cheat:?} at {bad}");
            let st = pp.stats();
            assert_eq!(
                (st.helpers_dropped, st.retries),
                (1, 1),
                "{cheat:?} at {bad}"
            );
            let wrong_result = matches!(cheat, Cheat::FlipBit | Cheat::AddOne);
            assert_eq!(st.checks_failed, u64::from(wrong_result), "{cheat:?}");
            let d = &pp.dropped_helpers()[0];
            assert_eq!((d.helper, d.layer, d.attempt), (bad, 0, 0), "{d:?}");
            assert_eq!(d.op, mesh_core::delegate::private::OP_QKV);
            let expect = if wrong_result {
                "wrong result"
            } else {
                "no usable answer"
            };
            assert!(d.reason.contains(expect), "{cheat:?}: {}", d.reason);
            // Spare 2 took the dropped helper's share position.
            let mut active = [0, 1];
            active[bad] = 2;
            assert_eq!(pp.active_helpers(), &active[..]);
            assert_eq!(pp.spares_left(), 1);
            // Later steps run on the new set without further failures.
            pp.project(3, Projection::Down, &activations(1, e.info().n_ff), 1)
                .unwrap();
            assert_eq!(pp.stats().helpers_dropped, 1);
        }
    }
}

#[test]
fn generation_survives_lying_helpers_until_the_spares_run_out() {
    let e = engine();
    let toks = e
        .tokenizer()
        .encode(GREEDY_PROMPTS[1], false, false)
        .unwrap();
    let (_, honest) = private_greedy(&mut projector(2, 11), &toks, 6);
    let mut pp = PrivateProjector::with_spares(e, 2, 1, ChaCha20Rng::seed_from_u64(12)).unwrap();
    pp.set_cheat(Some((1, Cheat::AddOne))).unwrap();
    let (_, tokens) = private_greedy(&mut pp, &toks, 6);
    assert_eq!(
        tokens, honest,
        "a replaced liar must not change a single token"
    );
    assert_eq!(pp.dropped_helpers().len(), 1);
    assert_eq!(pp.active_helpers(), &[0, 2]);
    // Now the spare lies too and nobody is left to take over: an error, no logits.
    pp.set_cheat(Some((2, Cheat::FlipBit))).unwrap();
    let mut h = e.embed(&toks[..1], 0).unwrap();
    let mut s = e.new_session(4).unwrap();
    let err = e
        .run_layers_with(0..1, &mut h, &mut s, &mut |l, p, x, n| {
            pp.project(l, p, x, n)
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("helper 2 returned a wrong result"), "{err}");
    assert_eq!(pp.stats().helpers_dropped, 1);
    assert!(PrivateProjector::with_spares(e, 1, 5, ChaCha20Rng::seed_from_u64(1)).is_err());
    assert!(PrivateProjector::with_spares(e, 2, 65534, ChaCha20Rng::seed_from_u64(1)).is_err());
}

#[test]
fn bytes_per_decoded_token() {
    let e = engine();
    let n_layers = e.info().n_layers;
    let toks = e
        .tokenizer()
        .encode("Once upon a time there was a", false, false)
        .unwrap();
    for (helpers, fuse) in [(2, true), (3, true), (2, false), (3, false)] {
        let mut pp = projector(helpers, 3);
        pp.set_fuse(fuse);
        let mut s = e.new_session(toks.len() + 2).unwrap();
        // Local prefill fills the KV cache; the decode step is private.
        let first = e.forward(&toks, Logits::Last, &mut s).unwrap();
        let next = argmax(&first) as u32;
        let mut h = e.embed(&[next], toks.len()).unwrap();
        pp.reset_stats();
        e.run_layers_with(0..n_layers, &mut h, &mut s, &mut |l, p, x, n| {
            pp.project(l, p, x, n)
        })
        .unwrap();
        let layers = pp.take_stats();
        e.head_with(&h, Logits::Last, &mut s, &mut |l, p, x, n| {
            pp.project(l, p, x, n)
        })
        .unwrap();
        let head = pp.take_stats();
        let total =
            layers.bytes_sent + layers.bytes_received + head.bytes_sent + head.bytes_received;
        eprintln!(
            "n = {helpers}, fused = {fuse}: one decode step: layers sent {} B received {} B = {:.1} KB/layer; \
             head sent {} B received {} B; total {:.1} KB/token ({} round trips)",
            layers.bytes_sent,
            layers.bytes_received,
            (layers.bytes_sent + layers.bytes_received) as f64 / n_layers as f64 / 1000.0,
            head.bytes_sent,
            head.bytes_received,
            total as f64 / 1000.0,
            layers.round_trips + head.round_trips
        );
        assert_eq!(layers.projections as usize, 7 * n_layers);
        // Both sides did measurable work and the owner's time excludes the helpers'.
        assert!(
            layers.owner_nanos > 0 && layers.helper_nanos > 0,
            "{layers:?}"
        );
        assert!(head.owner_nanos > 0 && head.helper_nanos > 0, "{head:?}");
        assert_eq!((layers.checks_failed, head.checks_failed), (0, 0));
        // Replies: every helper returns 8 bytes per output value.
        let info = e.info();
        let outs =
            2 * info.n_embd + 2 * info.n_head_kv * info.head_dim + 2 * info.n_ff + info.n_embd;
        assert!(layers.bytes_received as usize >= helpers * n_layers * outs * 8);
        assert!(head.bytes_received as usize >= helpers * info.n_vocab * 8);
    }
}

const GREEDY_PROMPTS: [&str; 10] = [
    "The quick brown fox jumps over the lazy dog because it",
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n   ",
    "Once upon a time, in a small village by the sea, there lived",
    "The three laws of thermodynamics state that",
    "Here is a recipe for chocolate chip cookies. Ingredients:",
    "In 1969, Neil Armstrong became the first person to",
    "SELECT name, age FROM users WHERE",
    "The most important thing to remember when learning a new language is",
    "Photosynthesis is the process by which plants",
];

/// Greedy generation of `steps` tokens from `prompt` through
/// `mesh_core::generate`, locally (also returns the top-2 logit gap of the
/// logits each token was picked from) and privately with `n` helpers.
fn generate_both(
    pp: &mut PrivateProjector<'static, GgmlEngine, ChaCha20Rng>,
    local_engine: &GgmlEngine,
    prompt: &str,
    steps: usize,
) -> (Vec<u32>, Vec<u32>, Vec<f32>) {
    use mesh_core::generate::{generate, generate_with, GenerateParams};
    use mesh_core::sampling::SamplerParams;
    let le = local_engine;
    // The owner's own work (norms, attention) runs on the local engine too, so
    // in exact mode both sides use the exact attention products.
    let e = local_engine;
    let toks = e.tokenizer().encode(prompt, false, false).unwrap();
    let params = GenerateParams {
        max_tokens: steps,
        sampler: SamplerParams::greedy(),
        ignore_eos: true,
        ..GenerateParams::default()
    };
    // Local, through `generate`, and again with a forward that records gaps.
    let mut s = le.new_session(toks.len() + steps + 1).unwrap();
    let local = generate(le, &mut s, &toks, &params, None, &mut |_| true).unwrap();
    let mut gaps = Vec::new();
    let mut s = le.new_session(toks.len() + steps + 1).unwrap();
    let mut forward = |t: &[u32], s: &mut _| {
        let logits = le.forward(t, Logits::Last, s)?;
        gaps.push(top2_gap(&logits));
        Ok(logits)
    };
    let recorded = generate_with(
        le,
        &mut s,
        &toks,
        &params,
        None,
        &mut |_| true,
        &mut forward,
    )
    .unwrap();
    assert_eq!(local.token_ids, recorded.token_ids);
    // One forward per prompt batch, then one per generated token but the
    // last: token i was picked from the logits of forward call len - steps + i.
    assert!(gaps.len() >= steps);
    let gaps = gaps.split_off(gaps.len() - steps);
    // Private: embed, delegated layers, delegated head.
    let failed = pp.stats().checks_failed;
    let n_layers = e.info().n_layers;
    let mut s = e.new_session(toks.len() + steps + 1).unwrap();
    let mut forward = |t: &[u32], s: &mut _| {
        let mut project = |l: usize, p: Projection, x: &[f32], n: usize| pp.project(l, p, x, n);
        let mut h = e.embed(t, e.session_len(s, 0))?;
        e.run_layers_with(0..n_layers, &mut h, s, &mut project)?;
        e.head_with(&h, Logits::Last, s, &mut project)
    };
    let private =
        generate_with(e, &mut s, &toks, &params, None, &mut |_| true, &mut forward).unwrap();
    assert_eq!(pp.stats().checks_failed, failed);
    (local.token_ids, private.token_ids, gaps)
}

/// `prompts` x `steps` greedy tokens, private (n = 2) against local: at most
/// `max_diverging` prompts may diverge, each only at a near-tie (local top-2
/// logit gap below 0.5 at the first differing step).
fn private_generation_matches_local(
    local_engine: &GgmlEngine,
    prompts: &[&str],
    steps: usize,
    max_diverging: usize,
) {
    let t0 = std::time::Instant::now();
    let (mut diverging, mut identical) = (0, 0);
    let mut not_near_ties = Vec::new();
    let mut pp = projector(2, 11);
    for (k, prompt) in prompts.iter().enumerate() {
        let (local, private, gaps) = generate_both(&mut pp, local_engine, prompt, steps);
        assert_eq!((local.len(), private.len()), (steps, steps));
        let same = local
            .iter()
            .zip(&private)
            .take_while(|(a, b)| a == b)
            .count();
        identical += same;
        if same < steps {
            diverging += 1;
            eprintln!(
                "prompt {k}: first divergence at step {same}: private {} local {}, local top-2 gap {:.4}",
                private[same], local[same], gaps[same]
            );
            if gaps[same] >= 0.5 {
                not_near_ties.push((k, same, gaps[same]));
            }
        } else {
            eprintln!("prompt {k}: all {steps} greedy tokens identical");
        }
    }
    eprintln!(
        "{} prompts x {steps} tokens: {diverging} diverging, {identical} / {} tokens identical \
         before any divergence ({:.1} s)",
        prompts.len(),
        steps * prompts.len(),
        t0.elapsed().as_secs_f64()
    );
    assert!(
        not_near_ties.is_empty(),
        "private and local diverge where the local top-2 gap is >= 0.5 \
         (prompt, step, gap): {not_near_ties:?}"
    );
    assert!(diverging <= max_diverging, "{diverging} prompts diverge");
}

/// The proof: private greedy generation (n = 2) through
/// `generate_with` against local `generate`, 10 prompts x 64 tokens (about
/// 2 minutes in the dev profile on 2 cores). The owner quantizes each
/// projection's input exactly as ggml does (Q8_1 / Q8_0 blocks, bit-identical
/// to ggml's `from_float`), so the ring computes the exact dot of the same
/// integers, and each private projection is within ~1e-7 (plus ~4e-4 from
/// ggml's fp16 `s`, see `local_error_is_f32_accumulation_and_q8_1_s`) of the
/// local one. Measured: 9 of 10 prompts still diverge (with or without
/// `set_match_ggml_s`), each first at a near-tie (local top-2 gap
/// 0.005..0.25, below the ~0.4..1.0 max-abs logit difference any
/// non-bit-identical path has). The "at most 1 of 10" is not reachable
/// this way: every layer re-quantizes its input to 8 bits, so a difference of
/// one ulp flips some rounding and grows to the quantization step within one
/// forward pass; ggml's own layered path with 1-ulp noise on its outputs
/// diverges on 9 of 10 prompts too (`layered_path_with_ggml_projections_vs_local_graph`).
/// Matching would need a result bit-identical to ggml's per-lane f32
/// accumulation. So the count is printed, and the near-tie condition asserted.
/// The other way round works: with the local engine in exact-accumulation mode
/// no prompt diverges (`private_generation_matches_exact_local_generation_10x64`).
#[test]
fn private_generation_matches_local_generation_10x64() {
    private_generation_matches_local(engine(), &GREEDY_PROMPTS, 64, GREEDY_PROMPTS.len());
}

/// The same 10 x 64 comparison with the local engine in exact-accumulation mode
/// (`EngineOptions::exact`): every local Q4_1 projection is then the
/// exact product of the same quantized integers rounded once to f32, as the
/// private path computes it. At most 1 of 10 prompts may diverge, only at a
/// near-tie.
#[test]
fn private_generation_matches_exact_local_generation_10x64() {
    private_generation_matches_local(exact_engine(), &GREEDY_PROMPTS, 64, 1);
}

/// On real hidden states, the exact-mode local projection and the private one
/// (owner quantization, ring product, decode) of Q4_1 weights agree bit for bit
/// for every token whose quantized activations the owner's fixed-point encoding
/// represents exactly. The encoding's `F` is capped by the ring's headroom
/// (`ring::RESULT_BOUND_LOG2`), so activation blocks far below the token's
/// largest value lose low bits; such tokens are counted and may differ.
#[test]
fn exact_local_projections_equal_private_ones() {
    use mesh_core::delegate::ring::FixedPoint;
    let le = exact_engine();
    let toks = le
        .tokenizer()
        .encode(
            "The capital of France is Paris, and the capital of Italy is",
            false,
            false,
        )
        .unwrap();
    let n_layers = le.info().n_layers;
    let mut s = le.new_session(toks.len() + 1).unwrap();
    let mut side = le.new_session(toks.len() + 1).unwrap();
    let mut pp = projector(2, 23);
    let (mut checked, mut tokens, mut inexact_tokens, mut inexact_values, mut values) =
        (0usize, 0usize, 0usize, 0usize, 0usize);
    let (mut outputs, mut differing_exact, mut differing_inexact) = (0usize, 0usize, 0usize);
    let mut h = le.embed(&toks, 0).unwrap();
    le.run_layers_with(0..n_layers, &mut h, &mut s, &mut |l, p, x, n| {
        let local = le.project(l, p, x, &mut side)?;
        let view = le.weight(l, p)?;
        if view.ggml_type == mesh_core::gguf::GgmlType::Q4_1 {
            let bounds = Matrix::from_view(&view)?.column_bounds()?;
            let private = pp.project(l, p, x, n)?;
            checked += 1;
            let (cols, rows) = (x.len() / n, local.len() / n);
            for t in 0..n {
                let xq = quantize_like_ggml(
                    ActivationFormat::for_weights(view.ggml_type)?,
                    &x[t * cols..(t + 1) * cols],
                )?;
                let fp = FixedPoint::choose(&xq, &bounds)?;
                let k = 2f64.powi(fp.frac_bits() - fp.scale_log2());
                let bad = xq.iter().filter(|v| (**v * k).fract() != 0.0).count();
                values += cols;
                inexact_values += bad;
                tokens += 1;
                let diff = local[t * rows..(t + 1) * rows]
                    .iter()
                    .zip(&private[t * rows..(t + 1) * rows])
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                outputs += rows;
                if bad > 0 {
                    inexact_tokens += 1;
                    differing_inexact += diff;
                } else {
                    differing_exact += diff;
                }
            }
        }
        Ok(local)
    })
    .unwrap();
    eprintln!(
        "{checked} Q4_1 projections, {tokens} token inputs, {outputs} outputs; \
         fixed point inexact for {inexact_values} / {values} activations in \
         {inexact_tokens} token inputs; outputs differing from private: \
         {differing_exact} in exactly encoded tokens, {differing_inexact} in the others"
    );
    assert!(checked > 0);
    assert_eq!(differing_exact, 0);
}

/// What separates the local (ggml) projection from the private one, on real
/// hidden states: both multiply the same quantized activations `x'`; the
/// private result is the exact `W·x'` (up to ~1e-9 fixed-point rounding), the
/// local one rounds in f32 and, for Q4_1, adds `m·s` per block with Q8_1's
/// `s = fp16(d·Σq)` where the exact product has `m·fp16(d)·Σq`. Measures
/// local vs exact, local vs exact-with-ggml's-`s`, and private vs exact.
#[test]
fn local_error_is_f32_accumulation_and_q8_1_s() {
    let e = engine();
    let toks = e
        .tokenizer()
        .encode(
            "The capital of France is Paris, and the capital of Italy is",
            false,
            false,
        )
        .unwrap();
    let n_layers = e.info().n_layers;
    // Record the real inputs of a few projections during a local forward pass.
    let want = [
        (3, Projection::Q),
        (10, Projection::Down),
        (20, Projection::Up),
    ];
    let mut seen: Vec<(usize, Projection, Vec<f32>, usize)> = Vec::new();
    let mut s = e.new_session(toks.len() + 1).unwrap();
    let mut side = e.new_session(4).unwrap();
    let mut h = e.embed(&toks, 0).unwrap();
    e.run_layers_with(0..n_layers, &mut h, &mut s, &mut |l, p, x, n| {
        if want.contains(&(l, p)) {
            seen.push((l, p, x.to_vec(), n));
        }
        e.project(l, p, x, &mut side)
    })
    .unwrap();
    let mut s = e.new_session(toks.len() + 1).unwrap();
    e.forward(&toks, Logits::Last, &mut s).unwrap();
    let mut pp = projector(2, 21);
    pp.set_match_ggml_s(true);
    for (layer, p, x, n) in seen {
        let x = &x[(n - 1) * x.len() / n..]; // the last token: a mat-vec
        let local = e.project(layer, p, x, &mut side).unwrap();
        let exact = reference(layer, p, x, 1);
        let private = pp.project(layer, p, x, 1).unwrap();
        // Exact product with ggml's `s` in the min term (Q4_1 only).
        let w = e.weight(layer, p).unwrap();
        let xq = ggml_activations(layer, p, x);
        let sums = q8_1_sums(x).unwrap();
        let nb = w.cols / 32;
        let row_bytes = nb * 20;
        let with_s: Vec<f64> = (0..w.rows)
            .map(|r| {
                let mut y = exact[r];
                for b in 0..nb {
                    let blk = &w.bytes[r * row_bytes + b * 20..];
                    let m = f64::from(mesh_core::delegate::activations::f16_to_f32(
                        u16::from_le_bytes([blk[2], blk[3]]),
                    ));
                    let sx: f64 = xq[32 * b..32 * (b + 1)].iter().sum();
                    y += m * (f64::from(sums[b]) - sx);
                }
                y
            })
            .collect();
        let max_abs = |a: &[f32], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(a, b)| (f64::from(*a) - b).abs())
                .fold(0f64, f64::max)
        };
        eprintln!(
            "layer {layer} {p:?} ({} {}x{}): local vs exact W·x': rel L2 {:.3e} (max abs {:.3e});              local vs exact with ggml's fp16 s: rel L2 {:.3e} (max abs {:.3e});              private vs exact with ggml's s: rel L2 {:.3e}",
            w.ggml_type,
            w.rows,
            w.cols,
            rel_l2_f64(&local, &exact),
            max_abs(&local, &exact),
            rel_l2_f64(&local, &with_s),
            max_abs(&local, &with_s),
            rel_l2_f64(&private, &with_s),
        );
        // With `set_match_ggml_s` the owner adds ggml's `s` rounding; without
        // it (the default) the private result is the exact product.
        assert!(rel_l2_f64(&private, &with_s) <= 1e-7);
        pp.set_match_ggml_s(false);
        let private_exact = pp.project(layer, p, x, 1).unwrap();
        pp.set_match_ggml_s(true);
        eprintln!(
            "    private vs local: rel L2 {:.3e}; without the s correction {:.3e}",
            rel_l2(&private, &local),
            rel_l2(&private_exact, &local)
        );
        assert!(rel_l2_f64(&private_exact, &exact) <= 1e-7);
        // Without the owner's quantization the gap would be ~1e-2; with it the
        // local path is within f32 rounding plus the `s` rounding. How large
        // the `s` term is depends on the activations (1.4e-3 on layer 10's
        // down projection with an AVX2 build, below 1e-3 with AVX-512, whose
        // hidden states differ in their last bits), so it is bounded by what
        // the rounding itself moves, not by a constant.
        let den: f64 = exact.iter().map(|v| v * v).sum();
        let s_effect = (with_s
            .iter()
            .zip(&exact)
            .map(|(a, b)| (a - b).powi(2))
            .sum::<f64>()
            / den)
            .sqrt();
        assert!(
            rel_l2_f64(&local, &exact) <= s_effect + 1e-5,
            "local vs exact {:.3e}, of which the s rounding explains {s_effect:.3e}",
            rel_l2_f64(&local, &exact)
        );
        assert!(rel_l2_f64(&local, &with_s) < 1e-5);
    }
}

#[test]
fn check_vectors_are_cached_on_disk() {
    let e = engine();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let root = std::env::temp_dir().join(format!("mesh-fvc-{}-{nanos}", std::process::id()));
    let hex: String = e.info().id.0.iter().map(|b| format!("{b:02x}")).collect();
    let dir = root.join(hex);
    let x = activations(2, e.info().n_embd);
    // Layer 0 Q, K, V (one fused request): three checkers.
    let run = |seed: u64| {
        let mut pp = projector(2, seed).with_cache_dir(&root);
        let t = std::time::Instant::now();
        let q = pp.project(0, Projection::Q, &x, 2).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        let s = pp.stats();
        assert_eq!(s.checks_failed, 0);
        assert_eq!(s.checkers_computed + s.checkers_loaded, 3);
        (q, s, ms, pp)
    };
    let (q1, s, ms, _) = run(1);
    assert_eq!((s.checkers_computed, s.checkers_loaded), (3, 0));
    assert_eq!(s.checker_cache_errors, 0);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|f| f.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["0-0.fvc", "0-1.fvc", "0-2.fvc"],
        "no temporary files left"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&dir.join("0-0.fvc")), 0o600, "r_t are secret");
        assert_eq!(mode(&dir), 0o700);
    }
    // A second projector loads them, checks with them and still catches a cheater.
    let (q2, s, ms_loaded, mut pp) = run(2);
    assert_eq!((s.checkers_computed, s.checkers_loaded), (0, 3));
    assert_eq!(q1, q2);
    eprintln!(
        "layer 0 QKV first call: {ms:.1} ms computing checkers, {ms_loaded:.1} ms loading them"
    );
    pp.set_cheat(Some((1, Cheat::AddOne))).unwrap();
    assert!(pp.project(0, Projection::Q, &x, 2).is_err());
    assert_eq!(pp.stats().checks_failed, 1);
    // Corrupted, truncated, wrong-version and wrong-matrix files are rejected
    // and recomputed, not fatal.
    let q_file = std::fs::read(dir.join("0-0.fvc")).unwrap();
    let k_file = std::fs::read(dir.join("0-1.fvc")).unwrap();
    let mut bad = q_file.clone();
    bad[q_file.len() / 2] ^= 1;
    std::fs::write(dir.join("0-0.fvc"), &bad).unwrap();
    std::fs::write(dir.join("0-1.fvc"), &k_file[..k_file.len() - 9]).unwrap();
    std::fs::write(dir.join("0-2.fvc"), &k_file).unwrap();
    let (q3, s, _, pp) = run(3);
    assert_eq!((s.checkers_computed, s.checkers_loaded), (3, 0));
    assert_eq!(s.checker_cache_errors, 3);
    assert!(pp.last_cache_error().is_some());
    assert_eq!(q1, q3);
    let mut bad = q_file;
    bad[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(dir.join("0-0.fvc"), &bad).unwrap();
    let (_, s, _, pp) = run(4);
    assert_eq!((s.checkers_computed, s.checkers_loaded), (1, 2));
    assert!(matches!(
        pp.last_cache_error(),
        Some(mesh_core::delegate::verify::CacheError::Version { found: 99 })
    ));
    let (_, s, _, _) = run(5);
    assert_eq!((s.checkers_computed, s.checkers_loaded), (0, 3));
    std::fs::remove_dir_all(&root).unwrap();
}

/// The floor under `private_generation_matches_local_generation_10x64`: the
/// layered path the private forward uses (`run_layers_with` / `head_with`,
/// norms and attention as separate graphs, SwiGLU and residuals in Rust) with
/// ggml's own mat-vec as the projector, against the fused local graph. Any
/// divergence here is not the delegation's.
#[test]
fn layered_path_with_ggml_projections_vs_local_graph() {
    use mesh_core::generate::{generate, generate_with, GenerateParams};
    use mesh_core::sampling::SamplerParams;
    let e = engine();
    let steps = 64;
    let n_layers = e.info().n_layers;
    let params = GenerateParams {
        max_tokens: steps,
        sampler: SamplerParams::greedy(),
        ignore_eos: true,
        ..GenerateParams::default()
    };
    for nudge in [0usize, 1, 2] {
        let mut diverging = 0;
        for (k, prompt) in GREEDY_PROMPTS.iter().enumerate() {
            let toks = e.tokenizer().encode(prompt, false, false).unwrap();
            let mut s = e.new_session(toks.len() + steps + 1).unwrap();
            let local = generate(e, &mut s, &toks, &params, None, &mut |_| true).unwrap();
            let mut side = e.new_session(4).unwrap();
            let mut s = e.new_session(toks.len() + steps + 1).unwrap();
            let mut forward = |t: &[u32], s: &mut _| {
                let mut project = |l: usize, p: Projection, x: &[f32], _n: usize| {
                    let mut y = e.project(l, p, x, &mut side)?;
                    match nudge {
                        // One ulp on one output of each projection.
                        1 => {
                            let i = (l * 7 + p as usize) % y.len();
                            y[i] = f32::from_bits(y[i].to_bits() + 1);
                        }
                        // One ulp up or down on 2/3 of all outputs (noise of the
                        // size of f32 rounding, like any path that is exact
                        // but not bit-identical to ggml's accumulation order).
                        2 => {
                            for (i, v) in y.iter_mut().enumerate() {
                                if *v != 0.0 {
                                    *v = f32::from_bits(
                                        match (i * 7919 + l * 97 + p as usize) % 3 {
                                            0 => v.to_bits() + 1,
                                            1 => v.to_bits() - 1,
                                            _ => v.to_bits(),
                                        },
                                    );
                                }
                            }
                        }
                        _ => {}
                    }
                    Ok(y)
                };
                let mut h = e.embed(t, e.session_len(s, 0))?;
                e.run_layers_with(0..n_layers, &mut h, s, &mut project)?;
                e.head_with(&h, Logits::Last, s, &mut project)
            };
            let layered =
                generate_with(e, &mut s, &toks, &params, None, &mut |_| true, &mut forward)
                    .unwrap();
            let same = local
                .token_ids
                .iter()
                .zip(&layered.token_ids)
                .take_while(|(a, b)| a == b)
                .count();
            if same < steps {
                diverging += 1;
                eprintln!("prompt {k} (nudge {nudge}): layered path diverges from the local graph at step {same}");
            }
        }
        eprintln!(
            "layered path with ggml projections{}: {diverging} of 10 prompts diverge in 64 tokens",
            [
                "",
                ", one output of each projection 1 ulp off",
                ", 2/3 of all outputs 1 ulp off"
            ][nudge]
        );
        if nudge == 0 {
            assert_eq!(
                diverging, 0,
                "the layered path alone reproduces the local graph"
            );
        }
    }
}

#[test]
fn every_private_projection_matches_ggml_on_real_inputs() {
    let e = engine();
    let toks = e
        .tokenizer()
        .encode(
            "Once upon a time, in a small village by the sea, there lived",
            false,
            false,
        )
        .unwrap();
    let n_layers = e.info().n_layers;
    let mut pp = projector(2, 5);
    pp.set_match_ggml_s(true);
    let mut side = e.new_session(4).unwrap();
    let mut worst: Vec<(f64, usize, Projection, usize)> = Vec::new();
    let mut s = e.new_session(toks.len() + 2).unwrap();
    for (pos, t) in [(0, &toks[..]), (toks.len(), &toks[..1])] {
        let mut h = e.embed(t, pos).unwrap();
        let mut project = |l: usize, p: Projection, x: &[f32], n: usize| {
            let local = e.project(l, p, x, &mut side)?;
            let private = pp.project(l, p, x, n)?;
            worst.push((rel_l2(&private, &local), l, p, n));
            Ok(local)
        };
        e.run_layers_with(0..n_layers, &mut h, &mut s, &mut project)
            .unwrap();
        e.head_with(&h, Logits::Last, &mut s, &mut project).unwrap();
    }
    worst.sort_by(|a, b| b.0.total_cmp(&a.0));
    eprintln!(
        "worst private vs ggml projections (rel L2, layer, projection, tokens): {:?}",
        &worst[..8]
    );
    assert!(worst[0].0 < 1e-5, "{:?}", worst[0]);
}

/// Diagnostic: private and local forward in lockstep on the same tokens; the
/// logits differ by ~3e-2 relative L2 (max abs ~0.5..1.0) although every
/// projection alone agrees to ~1e-7..4e-4 (8-bit re-quantization amplifies).
#[test]
#[ignore = "diagnostic"]
fn lockstep_logits_private_vs_local() {
    let e = engine();
    let prompt = GREEDY_PROMPTS[1];
    let toks = e.tokenizer().encode(prompt, false, false).unwrap();
    let n_layers = e.info().n_layers;
    let mut pp = projector(2, 11);
    let mut ls = e.new_session(toks.len() + 40).unwrap();
    let mut ps = e.new_session(toks.len() + 40).unwrap();
    let mut input = toks.clone();
    for step in 0..20 {
        let local = e.forward(&input, Logits::Last, &mut ls).unwrap();
        let mut project = |l: usize, p: Projection, x: &[f32], n: usize| pp.project(l, p, x, n);
        let mut h = e.embed(&input, e.session_len(&ps, 0)).unwrap();
        e.run_layers_with(0..n_layers, &mut h, &mut ps, &mut project)
            .unwrap();
        let private = e
            .head_with(&h, Logits::Last, &mut ps, &mut project)
            .unwrap();
        let max_abs = private
            .iter()
            .zip(&local)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "step {step}: logits rel L2 {:.3e} max abs {:.3e}; argmax local {} private {}; gap {:.4}",
            rel_l2(&private, &local),
            max_abs,
            argmax(&local),
            argmax(&private),
            top2_gap(&local)
        );
        input = vec![argmax(&local) as u32];
    }
}
