//! Prompt processing and decode throughput of the ggml engine on the default model.
//! Each benchmark first checks that the engine answers correctly, then times it.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mesh_core::engine::{Engine, GgmlEngine, Logits};
use mesh_core::generate::{generate, tokenize_prompt, GenerateParams, Prompt};
use mesh_core::sampling::{argmax, SamplerParams};

fn check_answers(engine: &GgmlEngine) {
    let ids = tokenize_prompt(engine, &Prompt::Text("The capital of France is".into())).unwrap();
    let mut s = engine.new_session(64).unwrap();
    let params = GenerateParams {
        max_tokens: 4,
        sampler: SamplerParams::greedy(),
        ..GenerateParams::default()
    };
    let out = generate(engine, &mut s, &ids, &params, None, &mut |_| true).unwrap();
    assert!(out.text.contains("Paris"), "engine answered {:?}", out.text);
}

fn bench_engine(c: &mut Criterion) {
    let engine = GgmlEngine::load(mesh_benches::model_path(), mesh_benches::threads()).unwrap();
    check_answers(&engine);
    let n_vocab = engine.info().n_vocab as u32;
    let prompt: Vec<u32> = (1..=256u32).map(|i| i * 7919 % n_vocab).collect();

    let mut g = c.benchmark_group("prompt_processing");
    g.sample_size(10);
    for n in [64usize, 256] {
        g.throughput(Throughput::Elements(n as u64));
        let mut s = engine.new_session(n).unwrap();
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, &n| {
            b.iter(|| {
                engine.truncate_session(&mut s, 0);
                let logits = engine.forward(&prompt[..n], Logits::Last, &mut s).unwrap();
                assert!(logits[0].is_finite());
                logits
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("decode");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    // One token at a time after a 64-token prompt, like llama-bench's tg.
    let mut s = engine.new_session(64 + 4096).unwrap();
    engine.forward(&prompt[..64], Logits::Last, &mut s).unwrap();
    let mut next = 1u32;
    g.bench_function("token", |b| {
        b.iter(|| {
            if engine.session_len(&s, 0) >= 64 + 4000 {
                engine.truncate_session(&mut s, 64);
            }
            let logits = engine.forward(&[next], Logits::Last, &mut s).unwrap();
            next = argmax(&logits).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, bench_engine);
criterion_main!(benches);
