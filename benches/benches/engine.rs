//! Prompt processing and decode throughput of the ggml engine on the default model,
//! without and with a rank-8 LoRA adapter on every projection (target: decode with
//! the adapter at least 0.9x without). Each benchmark first checks that the engine
//! answers correctly (and that the adapter changes the logits), then times it.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::Arc;

use mesh_core::engine::{lora, ActiveLora, Engine, GgmlEngine, Logits, LoraAdapter};
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

/// A rank-8 adapter on all seven projections of every layer (deterministic
/// values), with F32 tensors or (`f16`) F16 ones.
fn adapter(engine: &GgmlEngine, f16: bool) -> Arc<LoraAdapter> {
    let i = engine.info();
    let (d, kv, ff) = (
        i.n_embd as u64,
        (i.n_head_kv * i.head_dim) as u64,
        i.n_ff as u64,
    );
    let rank = 8u64;
    let values = |n: u64, seed: u64| -> Vec<f32> {
        (0..n)
            .map(|k| ((k.wrapping_mul(2654435761) ^ seed) % 1001) as f32 / 32032.0 - 1.0 / 64.0)
            .collect()
    };
    let mut tensors = Vec::new();
    for layer in 0..i.n_layers {
        for (kind, cols, rows) in [
            ("attn_q", d, d),
            ("attn_k", d, kv),
            ("attn_v", d, kv),
            ("attn_output", d, d),
            ("ffn_gate", d, ff),
            ("ffn_up", d, ff),
            ("ffn_down", ff, d),
        ] {
            let base = format!("blk.{layer}.{kind}.weight");
            let seed = layer as u64 * 16 + cols;
            tensors.push((
                format!("{base}.lora_a"),
                [cols, rank],
                values(cols * rank, seed),
            ));
            tensors.push((
                format!("{base}.lora_b"),
                [rank, rows],
                values(rank * rows, seed + 1),
            ));
        }
    }
    let bytes = if f16 {
        lora::adapter_bytes_f16("llama", 16.0, &tensors)
    } else {
        lora::adapter_bytes("llama", 16.0, &tensors)
    };
    Arc::new(LoraAdapter::from_bytes(&bytes, i).unwrap())
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

    let lora = [ActiveLora::new(adapter(&engine, false), 1.0)];
    let lora16 = [ActiveLora::new(adapter(&engine, true), 1.0)];
    let mut g = c.benchmark_group("decode");
    g.sample_size(20);
    g.throughput(Throughput::Elements(1));
    // One token at a time after a 64-token prompt, like llama-bench's tg; the
    // same with the adapter ("token_lora_r8"), and with it in F16.
    for (name, adapters) in [
        ("token", &[][..]),
        ("token_lora_r8", &lora[..]),
        ("token_lora_r8_f16", &lora16[..]),
    ] {
        let mut s = engine.new_session(64 + 4096).unwrap();
        engine.set_adapters(&mut s, adapters).unwrap();
        let first = engine.forward(&prompt[..64], Logits::Last, &mut s).unwrap();
        if !adapters.is_empty() {
            let mut plain = engine.new_session(64).unwrap();
            let base = engine
                .forward(&prompt[..64], Logits::Last, &mut plain)
                .unwrap();
            assert_ne!(first, base, "the adapter changed nothing");
        }
        let mut next = 1u32;
        g.bench_function(name, |b| {
            b.iter(|| {
                if engine.session_len(&s, 0) >= 64 + 4000 {
                    engine.truncate_session(&mut s, 64);
                }
                let logits = engine.forward(&[next], Logits::Last, &mut s).unwrap();
                next = argmax(&logits).unwrap();
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_engine);
criterion_main!(benches);
