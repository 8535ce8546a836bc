//! Private delegation on the default model: the helpers' integer kernel
//! ([`Matrix::mul`]) against ggml's own quantized mat-vec, one private decode
//! step against a local one, and the traffic of a private step per layer.
//! Each benchmark first checks that both sides agree, then times them.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mesh_core::delegate::private::PrivateProjector;
use mesh_core::delegate::ring::FixedPoint;
use mesh_core::delegate::seal::{Direction, EnvelopeHeader, OpenContext, SealContext, SecretKey};
use mesh_core::delegate::Matrix;
use mesh_core::engine::{Engine, GgmlEngine, GgmlSession, Logits, Projection};
use mesh_core::generate::{tokenize_prompt, Prompt};
use mesh_core::sampling::argmax;
use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// Private decode steps are timed after this many prompt tokens.
const PROMPT_LEN: usize = 8;

/// Deterministic activations of `len` values, roughly the size of a hidden state.
fn activations(len: usize) -> Vec<f32> {
    (0..len)
        .map(|j| ((j as f32 * 0.37).sin() + 0.25 * (j as f32 * 1.91).cos()) * 1.5)
        .collect()
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (f64::from(*x) - f64::from(*y)).powi(2);
        den += f64::from(*y).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

/// The projections whose matrices the benchmarks use, one per storage format:
/// the first matrix of each format (`blk.0` up first), then the output matrix.
fn one_matrix_per_format(engine: &GgmlEngine) -> Vec<(usize, Projection)> {
    let mut seen = Vec::new();
    let mut picks = Vec::new();
    let order = [
        Projection::Up,
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Down,
    ];
    let all = (0..engine.info().n_layers)
        .flat_map(|l| order.iter().map(move |p| (l, *p)))
        .chain(std::iter::once((0, Projection::Output)));
    for (l, p) in all {
        let ty = engine.weight(l, p).unwrap().ggml_type;
        if !seen.contains(&ty) {
            seen.push(ty);
            picks.push((l, p));
        }
    }
    picks
}

/// `Matrix::mul` on one token, decoded, next to ggml's own product.
fn checked_kernel_input(
    engine: &GgmlEngine,
    m: &Matrix<'_>,
    layer: usize,
    p: Projection,
    session: &mut GgmlSession,
) -> (Vec<f32>, Vec<u64>) {
    let x = activations(m.cols());
    let fp = FixedPoint::choose(&x, &m.column_bounds().unwrap()).unwrap();
    let xr = fp.encode(&x);
    let ours: Vec<f32> = fp
        .decode(&m.mul(&xr).unwrap())
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let theirs = engine.project(layer, p, &x, session).unwrap();
    let err = rel_l2(&ours, &theirs);
    assert!(
        err < 2e-2,
        "layer {layer} {p:?}: Matrix::mul differs from ggml by {err:.3e} (relative L2)"
    );
    (x, xr)
}

/// `engine` runs ggml on one thread, like the brief's baseline; `wide` on
/// [`mesh_benches::threads`], since [`Matrix::mul`] splits matrices of at least
/// 2^22 weights over all cores.
fn bench_helper_kernel(c: &mut Criterion, engine: &GgmlEngine, wide: &GgmlEngine) {
    let mut session = engine.new_session(16).unwrap();
    let mut wide_session = wide.new_session(16).unwrap();
    let wide_id = format!("ggml_{}t", mesh_benches::threads());
    let mut g = c.benchmark_group("helper_kernel");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(3));
    for (layer, p) in one_matrix_per_format(engine) {
        let view = engine.weight(layer, p).unwrap();
        let m = Matrix::from_view(&view).unwrap();
        let (x, xr) = checked_kernel_input(engine, &m, layer, p, &mut session);
        let weights = (m.rows() * m.cols()) as u64;
        eprintln!(
            "helper_kernel/{}: layer {layer} {p:?} {}x{}",
            view.ggml_type,
            m.rows(),
            m.cols()
        );
        g.throughput(Throughput::Elements(weights));
        let fmt = view.ggml_type.to_string();
        g.bench_with_input(BenchmarkId::new("ours", &fmt), &xr, |b, xr| {
            b.iter(|| m.mul(xr).unwrap())
        });
        // The portable scalar kernel (one thread), the SIMD kernels' reference.
        g.bench_with_input(BenchmarkId::new("ours_scalar", &fmt), &xr, |b, xr| {
            b.iter(|| m.mul_scalar(xr).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("ggml", &fmt), &x, |b, x| {
            b.iter(|| engine.project(layer, p, x, &mut session).unwrap())
        });
        g.bench_with_input(BenchmarkId::new(&wide_id, &fmt), &x, |b, x| {
            b.iter(|| wide.project(layer, p, x, &mut wide_session).unwrap())
        });
        let ours = median_ns(9, || {
            m.mul(&xr).unwrap();
        });
        let scalar = median_ns(9, || {
            m.mul_scalar(&xr).unwrap();
        });
        let ggml = median_ns(9, || {
            engine.project(layer, p, &x, &mut session).unwrap();
        });
        let ggml_wide = median_ns(9, || {
            wide.project(layer, p, &x, &mut wide_session).unwrap();
        });
        eprintln!(
            "helper_kernel/{fmt} summary: ours {:.3} ns/weight (SIMD: {}), scalar {:.3} ns/weight, \
             ggml 1 thread {:.3} ns/weight ({:.2}x), {wide_id} {:.3} ns/weight ({:.2}x)",
            ours / weights as f64,
            mesh_core::delegate::kernels::simd_available(),
            scalar / weights as f64,
            ggml / weights as f64,
            ours / ggml,
            ggml_wide / weights as f64,
            ours / ggml_wide
        );
    }
    g.finish();
}

/// Median wall time of `reps` calls of `f`, in nanoseconds.
fn median_ns(reps: usize, mut f: impl FnMut()) -> f64 {
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_nanos() as f64
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

type Pp<'e> = PrivateProjector<'e, GgmlEngine, ChaCha20Rng>;

/// `tokens` at the session's position through all layers and the head, every
/// projection delegated to `pp`'s helpers.
fn private_forward(
    engine: &GgmlEngine,
    pp: &mut Pp<'_>,
    tokens: &[u32],
    session: &mut GgmlSession,
) -> Vec<f32> {
    let pos = engine.session_len(session, 0);
    let mut hidden = engine.embed(tokens, pos).unwrap();
    let n_layers = engine.info().n_layers;
    engine
        .run_layers_with(0..n_layers, &mut hidden, session, &mut |l, p, x, n| {
            pp.project(l, p, x, n)
        })
        .unwrap();
    engine
        .head_with(&hidden, Logits::Last, session, &mut |l, p, x, n| {
            pp.project(l, p, x, n)
        })
        .unwrap()
}

fn prompt(engine: &GgmlEngine) -> Vec<u32> {
    let text = "The capital of France is Paris, and the capital of Italy is";
    let ids = tokenize_prompt(engine, &Prompt::Text(text.into())).unwrap();
    assert!(ids.len() >= PROMPT_LEN, "prompt has {} tokens", ids.len());
    ids[..PROMPT_LEN].to_vec()
}

fn bench_private_token(c: &mut Criterion, engine: &GgmlEngine) {
    let prompt = prompt(engine);
    let n_layers = engine.info().n_layers;

    // Same argmax, private and local, on the prompt and on one decode step.
    let mut pp = PrivateProjector::new(engine, 2, ChaCha20Rng::seed_from_u64(1)).unwrap();
    let mut ps = engine.new_session(64).unwrap();
    let mut ls = engine.new_session(64).unwrap();
    let private = private_forward(engine, &mut pp, &prompt, &mut ps);
    let local = engine.forward(&prompt, Logits::Last, &mut ls).unwrap();
    let next = argmax(&local).unwrap();
    assert_eq!(
        argmax(&private),
        Some(next),
        "private and local argmax differ"
    );
    let private = private_forward(engine, &mut pp, &[next], &mut ps);
    let local = engine.forward(&[next], Logits::Last, &mut ls).unwrap();
    assert_eq!(
        argmax(&private),
        argmax(&local),
        "private and local argmax differ after one decode step"
    );

    // The helpers' kernel work of one step: every matrix once, one token.
    let mut mats = Vec::new();
    for l in 0..n_layers {
        for p in Projection::LAYER {
            mats.push(Matrix::from_view(&engine.weight(l, p).unwrap()).unwrap());
        }
    }
    mats.push(Matrix::from_view(&engine.weight(0, Projection::Output).unwrap()).unwrap());
    let inputs: Vec<Vec<u64>> = mats
        .iter()
        .map(|m| {
            let x = activations(m.cols());
            FixedPoint::choose(&x, &m.column_bounds().unwrap())
                .unwrap()
                .encode(&x)
        })
        .collect();
    let kernel_pass = || {
        for (m, x) in mats.iter().zip(&inputs) {
            std::hint::black_box(m.mul(x).unwrap());
        }
    };

    let mut private_step = || {
        engine.truncate_session(&mut ps, PROMPT_LEN);
        private_forward(engine, &mut pp, &[next], &mut ps)
    };
    let mut pp_s = PrivateProjector::new(engine, 2, ChaCha20Rng::seed_from_u64(2)).unwrap();
    pp_s.set_match_ggml_s(true);
    let mut ps_s = engine.new_session(64).unwrap();
    private_forward(engine, &mut pp_s, &prompt, &mut ps_s);
    let mut private_step_match_s = || {
        engine.truncate_session(&mut ps_s, PROMPT_LEN);
        private_forward(engine, &mut pp_s, &[next], &mut ps_s)
    };
    let mut local_step = || {
        engine.truncate_session(&mut ls, PROMPT_LEN);
        engine.forward(&[next], Logits::Last, &mut ls).unwrap()
    };

    let mut g = c.benchmark_group("private_token");
    g.sample_size(10);
    g.warm_up_time(Duration::from_secs(1));
    g.measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(1));
    g.bench_function("private_n2", |b| b.iter(&mut private_step));
    // With the owner's emulation of ggml's fp16 Q8_1 sums (Q4_1 min term).
    g.bench_function("private_n2_match_ggml_s", |b| {
        b.iter(&mut private_step_match_s)
    });
    g.bench_function("local", |b| b.iter(&mut local_step));
    g.bench_function("helper_kernels_one_helper", |b| b.iter(kernel_pass));
    g.finish();

    pp.reset_stats();
    let a = median_ns(7, || {
        engine.truncate_session(&mut ps, PROMPT_LEN);
        private_forward(engine, &mut pp, &[next], &mut ps);
    });
    // The owner's own share of a step, timed inside the projector (excludes
    // the helpers and the local non-linear work).
    let step_stats = pp.take_stats();
    let owner_measured = step_stats.owner_nanos as f64 / 7.0;
    let owner_bytes = (step_stats.bytes_sent + step_stats.bytes_received) as f64 / 7.0;
    // The floor under the owner's overhead: sealing and opening the envelope
    // bytes a step must move (ChaCha20-Poly1305, which SMPC.md prescribes).
    let aead_ns_per_byte = aead_ns_per_byte();
    let aead_floor = aead_ns_per_byte * owner_bytes;
    let kernels_one = median_ns(7, kernel_pass);
    let local = median_ns(7, || {
        local_step();
    });
    // In process the helpers run one after the other: their kernel time adds up.
    let b = 2.0 * kernels_one;
    let owner = a - b;
    eprintln!(
        "private_token summary (n=2): private step {:.1} ms, helper kernels {:.1} ms \
         (2 x {:.1} ms), rest (owner + local non-linear work + helper HPKE/seed expansion) \
         {:.1} ms, local step {:.1} ms; private/local {:.2}x, rest/local {:.2}x, \
         helper kernels/local {:.2}x; owner overhead (sharing, sealing, opening, checks, \
         timed in the projector) {:.2} ms = {:.2}x local; of which at least {:.2} ms \
         = {:.2}x local is AEAD over the step's {:.2} MB of envelopes ({:.2} ns/byte, \
         {:.2} GB/s per pass)",
        a / 1e6,
        b / 1e6,
        kernels_one / 1e6,
        owner / 1e6,
        local / 1e6,
        a / local,
        owner / local,
        b / local,
        owner_measured / 1e6,
        owner_measured / local,
        aead_floor / 1e6,
        aead_floor / local,
        owner_bytes / 1e6,
        aead_ns_per_byte,
        1.0 / aead_ns_per_byte
    );
}

/// Nanoseconds per payload byte to seal one 1 MiB envelope and open it again
/// (median of 9), checking the round trip.
fn aead_ns_per_byte() -> f64 {
    let mut rng = ChaCha20Rng::seed_from_u64(3);
    let key = SecretKey::generate(&mut rng);
    let mut seal = SealContext::new(&mut rng, &key.public_key()).unwrap();
    let mut open = OpenContext::new(&key, &seal.enc()).unwrap();
    let header = EnvelopeHeader {
        direction: Direction::HelperToOwner,
        kind: 3,
        n: 2,
        helper_index: 0,
        op: 8,
        layer: 0,
        session_id: [1; 16],
        owner_peer: b"owner".to_vec(),
        helper_peer: b"helper".to_vec(),
        model_hash: [2; 32],
        step: 1,
        rows: 1,
        cols: 1,
        attempt: 0,
        request_hash: [3; 32],
    };
    let payload: Vec<u8> = (0..1 << 20).map(|i| (i * 31 % 251) as u8).collect();
    let ns = median_ns(9, || {
        let sealed = seal.seal(&header, &payload).unwrap();
        let opened = open.open(&header, &sealed).unwrap();
        assert_eq!(opened.payload.len(), payload.len());
    });
    // Seal and open each pass over the payload once.
    ns / (2.0 * payload.len() as f64)
}

/// Envelope bytes of one private decode step, per layer and for the head.
fn print_traffic(engine: &GgmlEngine) {
    let prompt = prompt(engine);
    let n_layers = engine.info().n_layers;
    eprintln!("private traffic of one decode step (envelope bytes, after {PROMPT_LEN} tokens):");
    eprintln!(
        "{:>2} | {:>12} {:>12} {:>12} | {:>11} | {:>12} {:>12}",
        "n", "sent/layer", "recv/layer", "total/layer", "trips/layer", "head sent", "head recv"
    );
    for n in [2usize, 3] {
        let mut pp =
            PrivateProjector::new(engine, n, ChaCha20Rng::seed_from_u64(n as u64)).unwrap();
        let mut s = engine.new_session(64).unwrap();
        let logits = private_forward(engine, &mut pp, &prompt, &mut s);
        let next = argmax(&logits).unwrap();
        let mut hidden = engine.embed(&[next], PROMPT_LEN).unwrap();
        pp.reset_stats();
        engine
            .run_layers_with(0..n_layers, &mut hidden, &mut s, &mut |l, p, x, k| {
                pp.project(l, p, x, k)
            })
            .unwrap();
        let layers = pp.take_stats();
        engine
            .head_with(&hidden, Logits::Last, &mut s, &mut |l, p, x, k| {
                pp.project(l, p, x, k)
            })
            .unwrap();
        let head = pp.take_stats();
        assert_eq!(layers.checks_failed + head.checks_failed, 0);
        let nl = n_layers as u64;
        eprintln!(
            "{n:>2} | {:>12} {:>12} {:>12} | {:>11} | {:>12} {:>12}",
            layers.bytes_sent / nl,
            layers.bytes_received / nl,
            (layers.bytes_sent + layers.bytes_received) / nl,
            layers.round_trips / nl,
            head.bytes_sent,
            head.bytes_received
        );
    }
}

fn bench_private(c: &mut Criterion) {
    let engine = GgmlEngine::load(mesh_benches::model_path(), 1).unwrap();
    let wide = GgmlEngine::load(mesh_benches::model_path(), mesh_benches::threads()).unwrap();
    bench_helper_kernel(c, &engine, &wide);
    drop(wide);
    bench_private_token(c, &engine);
    print_traffic(&engine);
}

criterion_group!(benches, bench_private);
criterion_main!(benches);
