//! Privacy, measured: how many prompt tokens an attacker who knows the public
//! weights recovers from what one peer receives.
//!
//! - **Pipeline stage**: the hidden rows a stage serving layers `L..` receives
//!   (the output of layers `0..L`), for L = 1, 10, 20.
//! - **Private-mode helper**: the share of the input of layer L's fused QKV
//!   projection that the helper holding the full-vector share receives (the
//!   others receive a 32-byte seed), built as `PrivateProjector` builds it:
//!   the input quantized as ggml would, encoded in the ring with the owner's
//!   private fixed point, minus the other helper's seeded share. (Every
//!   projection's share is built the same way; QKV's input is the one closest
//!   to the hidden state.)
//!
//! Attacks, each per position:
//! 1. **nearest row**: the embedding row (cosine) closest to the vector;
//! 2. **linear probe**: a ridge regression from the vector to the true token's
//!    embedding row, trained on other text (the first tokens of
//!    `mesh-core/tests/data/ppl_words.txt`), then nearest row;
//! 3. **dictionary** (layer 1 only; deeper layers would need a forward of L
//!    layers per vocabulary entry): every token's own vector at position 0
//!    with no context (layer 0 on its embedding alone), nearest (cosine);
//! 4. **candidate search**: with the recovered prefix in the model's own first
//!    L layers (attention is causal), try the top candidates of attacks 1-3
//!    at the position and keep the one whose output is closest to what was
//!    received (for shares: closest in the ring after the candidate's own
//!    encoding).
//!
//! Over 24 prompts, with chance (1/vocab) beside the rates. It checks that
//! the pipeline stage at layer 1 gives up most tokens and that no attack on
//! shares beats chance by more than a handful of tokens, then prints a table.
//!
//! `cargo bench -p mesh-benches --bench privacy` (a few minutes, 1 thread).

use std::time::Instant;

use mesh_core::delegate::activations::{quantize_like_ggml, ActivationFormat};
use mesh_core::delegate::{ring, share, Matrix};
use mesh_core::engine::{Engine, GgmlEngine, GgmlSession, Hidden, Projection};
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

const LAYERS: [usize; 3] = [1, 10, 20];
/// Candidates per attack tried by the candidate search.
const CANDIDATES: usize = 12;
/// Training tokens of the linear probe.
const PROBE_TOKENS: usize = 1536;
/// Ridge penalty (relative to the mean diagonal of H^T H).
const RIDGE: f64 = 1e-3;

const PROMPTS: [&str; 24] = [
    "My bank account number is 4417 and my password is sunflower",
    "Patient reports chest pain and shortness of breath since Tuesday",
    "Please forward the merger documents to the board before Friday",
    "The quick brown fox jumps over the lazy dog",
    "I have been feeling anxious about my divorce hearing next week",
    "Our new product launch is scheduled for the third quarter",
    "def transfer(amount, account): return bank.send(amount, account)",
    "Remind me to call my mother about her cancer treatment",
    "The password for the staging server is correct horse battery staple",
    "Send the encrypted backup to the offsite storage location",
    "What is the capital of France and why is it famous",
    "Translate this sentence into Spanish for my lawyer",
    "Our quarterly revenue fell by twelve percent compared to last year",
    "The suspect was last seen driving a red truck near the border",
    "Write a poem about the ocean at night",
    "My social security number should never be shared online",
    "Can you summarize the attached medical report for me",
    "The meeting with the investors went better than expected",
    "List three reasons why the project might be delayed",
    "I think my neighbor is stealing packages from my porch",
    "How do I reset the router to its factory settings",
    "The recipe calls for two cups of flour and one egg",
    "Explain quantum entanglement to a ten year old child",
    "Schedule a dentist appointment for next Monday morning",
];

fn model_path() -> std::path::PathBuf {
    match std::env::var_os("MESH_MODEL") {
        Some(p) => p.into(),
        None => mesh_core::fetch::default_model(&mut |_| {}).expect("fetching the default model"),
    }
}

/// Unit-length embedding rows (the tied token embedding, exact values).
fn embedding_rows(engine: &GgmlEngine) -> Vec<f32> {
    let m = Matrix::from_view(&engine.weight(0, Projection::Output).unwrap()).unwrap();
    let (rows, cols) = (m.rows(), m.cols());
    let mut out = vec![0f32; rows * cols];
    let mut w = vec![0i64; cols];
    for r in 0..rows {
        m.row_weights(r, &mut w).unwrap();
        let row = &mut out[r * cols..(r + 1) * cols];
        row.iter_mut().zip(&w).for_each(|(o, v)| *o = *v as f32);
        normalize(row);
    }
    out
}

fn normalize(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

/// Indices of the `k` embedding rows most similar (cosine) to `v`, best first.
fn top_rows(emb: &[f32], cols: usize, v: &[f32], k: usize) -> Vec<usize> {
    let mut q = v.to_vec();
    normalize(&mut q);
    let mut best: Vec<(f32, usize)> = Vec::with_capacity(k + 1);
    for (r, row) in emb.chunks_exact(cols).enumerate() {
        let s: f32 = row.iter().zip(&q).map(|(a, b)| a * b).sum();
        if best.len() < k || s > best[best.len() - 1].0 {
            let at = best.partition_point(|(b, _)| *b >= s);
            best.insert(at, (s, r));
            best.truncate(k);
        }
    }
    best.into_iter().map(|(_, r)| r).collect()
}

/// What a peer receives for one prompt at one layer, one vector per token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum View {
    /// A pipeline stage: the hidden rows after layers `0..L`.
    Stage,
    /// A helper: the full-vector share of layer L's QKV input (ring words
    /// read as signed integers).
    Share,
}

/// Hidden rows after layers `0..layer` for `tokens`, and the QKV input of
/// `layer` (what `run_layers_with` hands the projector for Q).
fn observe(engine: &GgmlEngine, tokens: &[u32], layer: usize) -> (Vec<f32>, Vec<f32>) {
    let mut s = engine.new_session(tokens.len() + 1).unwrap();
    let mut h = engine.embed(tokens, 0).unwrap();
    engine.run_layers(0..layer, &mut h, &mut s).unwrap();
    let hidden = h.data.clone();
    (hidden, qkv_input(engine, &mut h, &mut s, layer))
}

/// Runs `layer` on `h` and returns the input its Q projection gets (the
/// normalized hidden rows that private mode shares for the fused QKV).
fn qkv_input(engine: &GgmlEngine, h: &mut Hidden, s: &mut GgmlSession, layer: usize) -> Vec<f32> {
    let mut qkv = Vec::new();
    let mut scratch = engine.new_session(1).unwrap();
    let mut project = |l: usize, p: Projection, x: &[f32], _n: usize| {
        if l == layer && p == Projection::Q {
            qkv = x.to_vec();
        }
        engine.project(l, p, x, &mut scratch)
    };
    engine
        .run_layers_with(layer..layer + 1, h, s, &mut project)
        .unwrap();
    qkv
}

/// Layer `layer`'s QKV input `x` (n tokens x cols) as the owner encodes it for
/// the ring (quantized as ggml would, private fixed point per token), read as
/// signed integers: with `shared`, the full-vector share one helper receives
/// (the encoding minus the other helper's seeded share); without, the
/// encoding itself (what an attacker can compute for a guess).
fn ring_view(
    engine: &GgmlEngine,
    layer: usize,
    x: &[f32],
    shared: bool,
    rng: &mut ChaCha20Rng,
) -> Vec<f32> {
    let m = Matrix::from_view(&engine.weight(layer, Projection::Q).unwrap()).unwrap();
    // Column bounds stream the matrix: once per layer.
    static BOUNDS: std::sync::Mutex<Vec<(usize, Vec<u64>)>> = std::sync::Mutex::new(Vec::new());
    let bounds = {
        let mut cache = BOUNDS.lock().unwrap();
        match cache.iter().find(|(l, _)| *l == layer) {
            Some((_, b)) => b.clone(),
            None => {
                let b = m.column_bounds().unwrap();
                cache.push((layer, b.clone()));
                b
            }
        }
    };
    let format = ActivationFormat::for_weights(m.ggml_type()).unwrap();
    let xq = quantize_like_ggml(format, x).unwrap();
    let (xr, _params) = ring::encode_batch(&xq, &bounds).unwrap();
    let words = if shared {
        share(&xr, 2, rng).unwrap().last().to_vec()
    } else {
        xr
    };
    words.iter().map(|w| ring::to_signed(*w) as f32).collect()
}

/// Ridge regression `W` (cols x cols, row-major: y = x·W) from `xs` to `ys`.
fn ridge(xs: &[f32], ys: &[f32], cols: usize) -> Vec<f64> {
    let n = xs.len() / cols;
    let mut a = vec![0f64; cols * cols];
    let mut b = vec![0f64; cols * cols];
    for t in 0..n {
        let x = &xs[t * cols..(t + 1) * cols];
        let y = &ys[t * cols..(t + 1) * cols];
        for i in 0..cols {
            let xi = f64::from(x[i]);
            if xi == 0.0 {
                continue;
            }
            for j in 0..cols {
                a[i * cols + j] += xi * f64::from(x[j]);
                b[i * cols + j] += xi * f64::from(y[j]);
            }
        }
    }
    let mean_diag = (0..cols).map(|i| a[i * cols + i]).sum::<f64>() / cols as f64;
    for i in 0..cols {
        a[i * cols + i] += RIDGE * mean_diag.max(1e-12);
    }
    // Cholesky: a = L·L^T, then solve for every column of b.
    let mut l = vec![0f64; cols * cols];
    for i in 0..cols {
        for j in 0..=i {
            let mut s = a[i * cols + j];
            for k in 0..j {
                s -= l[i * cols + k] * l[j * cols + k];
            }
            l[i * cols + j] = if i == j {
                s.max(1e-300).sqrt()
            } else {
                s / l[j * cols + j]
            };
        }
    }
    let mut w = vec![0f64; cols * cols];
    let mut z = vec![0f64; cols];
    for c in 0..cols {
        for i in 0..cols {
            let mut s = b[i * cols + c];
            for k in 0..i {
                s -= l[i * cols + k] * z[k];
            }
            z[i] = s / l[i * cols + i];
        }
        for i in (0..cols).rev() {
            let mut s = z[i];
            for k in i + 1..cols {
                s -= l[k * cols + i] * w[k * cols + c];
            }
            w[i * cols + c] = s / l[i * cols + i];
        }
    }
    w
}

fn apply(w: &[f64], x: &[f32], cols: usize) -> Vec<f32> {
    let mut y = vec![0f64; cols];
    for (i, xi) in x.iter().enumerate() {
        let xi = f64::from(*xi);
        if xi != 0.0 {
            for (yj, wij) in y.iter_mut().zip(&w[i * cols..(i + 1) * cols]) {
                *yj += xi * wij;
            }
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}

/// The vectors a peer in `view` receives for `tokens` at `layer`.
fn received(
    engine: &GgmlEngine,
    tokens: &[u32],
    layer: usize,
    view: View,
    rng: &mut ChaCha20Rng,
) -> Vec<f32> {
    let (hidden, qkv) = observe(engine, tokens, layer);
    match view {
        View::Stage => hidden,
        View::Share => ring_view(engine, layer, &qkv, true, rng),
    }
}

/// What the attacker computes for `token` at `pos` after the prefix held in
/// `s` (layers `0..=layer`): the hidden row (stage) or the ring encoding of
/// the QKV input (share). Leaves `s` holding the prefix and `token`.
fn guess_row(
    engine: &GgmlEngine,
    s: &mut GgmlSession,
    token: u32,
    pos: usize,
    layer: usize,
    view: View,
    rng: &mut ChaCha20Rng,
) -> Vec<f32> {
    engine.truncate_session(s, pos);
    let mut h = engine.embed(&[token], pos).unwrap();
    engine.run_layers(0..layer, &mut h, s).unwrap();
    let hidden = h.data.clone();
    let qkv = qkv_input(engine, &mut h, s, layer);
    match view {
        View::Stage => hidden,
        View::Share => ring_view(engine, layer, &qkv, false, rng),
    }
}

/// Distance between what was received and what a candidate produces.
fn distance(view: View, got: &[f32], candidate: &[f32]) -> f64 {
    match view {
        View::Stage => got
            .iter()
            .zip(candidate)
            .map(|(a, b)| f64::from(a - b).powi(2))
            .sum(),
        // Ring distance of the words (both read as signed integers).
        View::Share => got
            .iter()
            .zip(candidate)
            .map(|(a, b)| {
                let d = ring::from_signed(*a as i64).wrapping_sub(ring::from_signed(*b as i64));
                (ring::to_signed(d) as f64).abs()
            })
            .sum(),
    }
}

struct Rates {
    nearest: usize,
    probe: usize,
    dictionary: Option<usize>,
    search: usize,
    total: usize,
}

/// Every vocabulary token's vector in `view` at `layer`, alone at position
/// 0, normalized (for the dictionary attack).
fn dictionary(engine: &GgmlEngine, layer: usize, view: View, rng: &mut ChaCha20Rng) -> Vec<f32> {
    let cols = engine.info().n_embd;
    let mut s = engine.new_session(2).unwrap();
    let mut out = Vec::with_capacity(engine.info().n_vocab * cols);
    for t in 0..engine.info().n_vocab as u32 {
        let mut row = guess_row(engine, &mut s, t, 0, layer, view, rng);
        normalize(&mut row);
        out.extend(row);
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn attack(
    engine: &GgmlEngine,
    emb: &[f32],
    probe: &[f64],
    dict: Option<&[f32]>,
    layer: usize,
    view: View,
    prompts: &[Vec<u32>],
    rng: &mut ChaCha20Rng,
) -> Rates {
    let cols = engine.info().n_embd;
    let mut r = Rates {
        nearest: 0,
        probe: 0,
        dictionary: dict.map(|_| 0),
        search: 0,
        total: 0,
    };
    for tokens in prompts {
        let got = received(engine, tokens, layer, view, rng);
        let mut s = engine.new_session(tokens.len() + 1).unwrap();
        for (i, &truth) in tokens.iter().enumerate() {
            let v = &got[i * cols..(i + 1) * cols];
            let near = top_rows(emb, cols, v, CANDIDATES);
            let probed = top_rows(emb, cols, &apply(probe, v, cols), CANDIDATES);
            let looked_up = dict
                .map(|d| top_rows(d, cols, v, CANDIDATES))
                .unwrap_or_default();
            r.nearest += usize::from(near[0] as u32 == truth);
            r.probe += usize::from(probed[0] as u32 == truth);
            if let (Some(n), Some(first)) = (r.dictionary.as_mut(), looked_up.first()) {
                *n += usize::from(*first as u32 == truth);
            }
            // Candidate search over the union, given the recovered prefix.
            let mut best = (f64::INFINITY, near[0] as u32);
            let mut tried = Vec::new();
            for c in near
                .iter()
                .chain(&probed)
                .chain(&looked_up)
                .map(|c| *c as u32)
            {
                if tried.contains(&c) {
                    continue;
                }
                tried.push(c);
                let out = guess_row(engine, &mut s, c, i, layer, view, rng);
                let d = distance(view, v, &out);
                if d < best.0 {
                    best = (d, c);
                }
            }
            r.search += usize::from(best.1 == truth);
            // Keep the recovered token as the prefix of the next position.
            guess_row(engine, &mut s, best.1, i, layer, view, rng);
            r.total += 1;
        }
    }
    r
}

fn main() {
    let started = Instant::now();
    let engine = GgmlEngine::load(model_path(), 1).expect("loading the default model");
    let cols = engine.info().n_embd;
    let vocab = engine.info().n_vocab;
    let emb = embedding_rows(&engine);
    let encode = |text: &str| engine.tokenizer().encode(text, false, false).unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS.iter().map(|p| encode(p)).collect();
    // Probe training text: disjoint from the prompts.
    let words = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../mesh-core/tests/data/ppl_words.txt"
    ))
    .expect("reading ppl_words.txt");
    let train = encode(&words);
    let train = &train[..PROBE_TOKENS.min(train.len())];
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let chance = 1.0 / vocab as f64;
    let mut rows = Vec::new();
    for view in [View::Stage, View::Share] {
        for layer in LAYERS {
            // Train the probe on this view of the training text (64-token chunks).
            let (mut xs, mut ys) = (Vec::new(), Vec::new());
            for chunk in train.chunks(64) {
                xs.extend(received(&engine, chunk, layer, view, &mut rng));
                for &t in chunk {
                    ys.extend_from_slice(&emb[t as usize * cols..(t as usize + 1) * cols]);
                }
            }
            let probe = ridge(&xs, &ys, cols);
            let dict = (layer == 1).then(|| dictionary(&engine, layer, view, &mut rng));
            let r = attack(
                &engine,
                &emb,
                &probe,
                dict.as_deref(),
                layer,
                view,
                &prompts,
                &mut rng,
            );
            let pct = |k: usize| 100.0 * k as f64 / r.total as f64;
            rows.push((
                view,
                layer,
                [
                    Some(pct(r.nearest)),
                    Some(pct(r.probe)),
                    r.dictionary.map(pct),
                    Some(pct(r.search)),
                ],
                r.total,
            ));
            eprintln!(
                "privacy: {} layer {layer}: nearest {:.1}%, probe {:.1}%, dictionary {}, search \
                 {:.1}% of {} tokens ({:.0} s)",
                if view == View::Stage {
                    "stage"
                } else {
                    "helper share"
                },
                pct(r.nearest),
                pct(r.probe),
                r.dictionary
                    .map(|d| format!("{:.1}%", pct(d)))
                    .unwrap_or_else(|| "-".into()),
                pct(r.search),
                r.total,
                started.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "| what one peer receives | layer | nearest row | linear probe | dictionary | \
         candidate search | tokens | chance |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let cell = |v: &Option<f64>| v.map(|p| format!("{p:.1}%")).unwrap_or_else(|| "-".into());
    for (view, layer, rates, total) in &rows {
        println!(
            "| {} | {layer} | {} | {} | {} | {} | {total} | {:.4}% |",
            if *view == View::Stage {
                "pipeline stage (hidden rows)"
            } else {
                "private helper (its share)"
            },
            cell(&rates[0]),
            cell(&rates[1]),
            cell(&rates[2]),
            cell(&rates[3]),
            100.0 * chance
        );
    }
    // The checks: a stage at layer 1 gives up most of the prompt; a share
    // gives up nothing beyond chance (a few lucky tokens at most).
    let best = |rates: &[Option<f64>; 4]| rates.iter().flatten().fold(0f64, |a, b| a.max(*b));
    let stage1 = rows
        .iter()
        .find(|r| r.0 == View::Stage && r.1 == 1)
        .unwrap();
    assert!(
        best(&stage1.2) > 50.0,
        "expected a layer-1 stage to give up most tokens"
    );
    for r in rows.iter().filter(|r| r.0 == View::Share) {
        assert!(
            best(&r.2) < 2.0,
            "an attack on shares at layer {} recovered {:.1}% of tokens",
            r.1,
            best(&r.2)
        );
    }
}
