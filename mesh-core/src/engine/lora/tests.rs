use super::op::{b_panels, dot, dot_lanes_generic, panel_generic, Factors, LoraJob};
use super::testing::{check, small_model};
use super::*;
use crate::gguf::testing::write_gguf;
use crate::gguf::Value;
use proptest::prelude::*;

fn pair(base: &str, cols: u64, rank: u64, rows: u64) -> [(String, [u64; 2], Vec<f32>); 2] {
    let n = |a: u64, b: u64| {
        (0..a * b)
            .map(|i| (i % 7) as f32 * 0.01)
            .collect::<Vec<_>>()
    };
    [
        (format!("{base}.lora_a"), [cols, rank], n(cols, rank)),
        (format!("{base}.lora_b"), [rank, rows], n(rank, rows)),
    ]
}

fn valid() -> Vec<(String, [u64; 2], Vec<f32>)> {
    let mut t = Vec::new();
    t.extend(pair("blk.0.attn_q.weight", 64, 4, 64));
    t.extend(pair("blk.1.attn_k.weight", 64, 2, 32));
    t.extend(pair("blk.1.ffn_down.weight", 128, 4, 64));
    t.extend(pair("output.weight", 64, 3, 256));
    t
}

fn err(bytes: &[u8]) -> AdapterError {
    match check(bytes) {
        Err(Error::Adapter(e)) => e,
        other => panic!("expected an adapter error, got {other:?}"),
    }
}

#[test]
fn a_valid_adapter_loads_with_its_pairs_and_scale() {
    let a = check(&adapter_bytes("llama", 8.0, &valid())).unwrap();
    assert_eq!(a.n_matrices(), 4);
    assert_eq!(a.alpha(), 8.0);
    assert_eq!(a.rank(0, Projection::Q), Some(4));
    assert_eq!(a.rank(5, Projection::Output), Some(3));
    assert!(!a.adapts(0, Projection::K));
    assert_eq!(a.base_model(), small_model().id);
    assert_eq!(a.effective_scale(0.5, 4), 1.0);
    let no_alpha = check(&adapter_bytes("llama", 0.0, &valid())).unwrap();
    assert_eq!(no_alpha.effective_scale(0.5, 4), 0.5);
}

#[test]
fn bad_adapters_get_typed_errors() {
    // Another architecture.
    assert!(matches!(
        err(&adapter_bytes("qwen2", 8.0, &valid())),
        AdapterError::WrongArchitecture { .. }
    ));
    // Missing half.
    let mut t = valid();
    t.remove(1);
    assert!(matches!(
        err(&adapter_bytes("llama", 8.0, &t)),
        AdapterError::MissingHalf {
            missing: "lora_b",
            ..
        }
    ));
    let mut t = valid();
    t.remove(0);
    assert!(matches!(
        err(&adapter_bytes("llama", 8.0, &t)),
        AdapterError::MissingHalf {
            missing: "lora_a",
            ..
        }
    ));
    // Shapes: A's input width, B's output height, ranks that disagree.
    for (base, cols, rank, rows) in [
        ("blk.0.attn_q.weight", 32, 4, 64),
        ("blk.0.attn_q.weight", 64, 4, 32),
        ("blk.0.ffn_down.weight", 64, 4, 64),
    ] {
        let t = pair(base, cols, rank, rows).to_vec();
        assert!(matches!(
            err(&adapter_bytes("llama", 8.0, &t)),
            AdapterError::Shape { .. }
        ));
    }
    let mut t = pair("blk.0.attn_q.weight", 64, 4, 64).to_vec();
    t[1] = (
        "blk.0.attn_q.weight.lora_b".into(),
        [5, 64],
        vec![0.0; 5 * 64],
    );
    assert!(matches!(
        err(&adapter_bytes("llama", 8.0, &t)),
        AdapterError::Shape { .. }
    ));
    // Targets the model does not have or LoRA cannot adapt.
    for base in [
        "blk.2.attn_q.weight",
        "blk.01.attn_q.weight",
        "blk.+1.attn_q.weight",
        "blk.0.attn_norm.weight",
        "token_embd.weight",
        "nonsense",
    ] {
        let t = pair(base, 64, 4, 64).to_vec();
        assert!(
            matches!(
                err(&adapter_bytes("llama", 8.0, &t)),
                AdapterError::UnknownTarget { .. }
            ),
            "{base}"
        );
    }
    // No LoRA tensors, bad alpha.
    assert_eq!(err(&adapter_bytes("llama", 8.0, &[])), AdapterError::Empty);
    assert!(matches!(
        err(&adapter_bytes("llama", -1.0, &valid())),
        AdapterError::BadAlpha(_)
    ));
    assert!(matches!(
        err(&adapter_bytes("llama", f32::NAN, &valid())),
        AdapterError::BadAlpha(_)
    ));
}

#[test]
fn models_quantized_halves_and_untied_outputs_are_refused() {
    let s = |v: &str| Value::String(v.into());
    let meta = |ty: Option<&str>| {
        let mut m = vec![("general.architecture".to_string(), s("llama"))];
        if let Some(ty) = ty {
            m.push(("general.type".to_string(), s(ty)));
            m.push(("adapter.type".to_string(), s("lora")));
        }
        m
    };
    let tensors = |ty: GgmlType| {
        vec![
            ("blk.0.attn_q.weight.lora_a".to_string(), vec![64, 32], ty),
            ("blk.0.attn_q.weight.lora_b".to_string(), vec![32, 64], ty),
        ]
    };
    // A model file (no general.type) is not an adapter.
    assert!(matches!(
        err(&write_gguf(&meta(None), &tensors(GgmlType::F32))),
        AdapterError::NotAnAdapter(_)
    ));
    assert!(matches!(
        err(&write_gguf(&meta(Some("model")), &tensors(GgmlType::F32))),
        AdapterError::NotAnAdapter(_)
    ));
    // Quantized LoRA halves.
    assert!(matches!(
        err(&write_gguf(
            &meta(Some("adapter")),
            &tensors(GgmlType::Q8_0)
        )),
        AdapterError::UnsupportedType { .. }
    ));
    // F16 halves load.
    check(&write_gguf(&meta(Some("adapter")), &tensors(GgmlType::F16))).unwrap();
    // output.weight of a model whose output is tied to the embeddings.
    let tied = ModelInfo {
        tied_output: true,
        ..small_model()
    };
    let bytes = adapter_bytes("llama", 1.0, &pair("output.weight", 64, 3, 256));
    assert!(matches!(
        LoraAdapter::from_bytes(&bytes, &tied),
        Err(Error::Adapter(AdapterError::UnknownTarget { .. }))
    ));
}

#[test]
fn active_adapters_check_their_model_and_scale() {
    let a = Arc::new(check(&adapter_bytes("llama", 8.0, &valid())).unwrap());
    ActiveLora::new(a.clone(), 1.0)
        .check(a.base_model())
        .unwrap();
    assert!(matches!(
        ActiveLora::new(a.clone(), 1.0).check(ModelId([1; 32])),
        Err(Error::Adapter(AdapterError::OtherModel { .. }))
    ));
    assert!(matches!(
        ActiveLora::new(a.clone(), f32::INFINITY).check(a.base_model()),
        Err(Error::Adapter(AdapterError::BadScale { .. }))
    ));
    assert_eq!(ActiveLora::new(a.clone(), 0.5), ActiveLora::new(a, 0.5));
}

#[test]
fn lora_arguments_parse() {
    assert_eq!(parse_lora_arg("a.gguf").unwrap(), ("a.gguf".into(), 1.0));
    assert_eq!(
        parse_lora_arg("a.gguf:0.5").unwrap(),
        ("a.gguf".into(), 0.5)
    );
    assert_eq!(
        parse_lora_arg("c:/x:y.gguf").unwrap(),
        ("c:/x:y.gguf".into(), 1.0)
    );
    assert!(parse_lora_arg("").is_err());
    assert!(parse_lora_arg(":2").is_err());
    assert!(parse_lora_arg("a.gguf:inf").is_err());
}

#[test]
fn every_summation_order_computes_the_dot_product() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let mut distinct = false;
    for k in [1usize, 7, 8, 16, 24, 64, 100, 576, 1536] {
        let a: Vec<f32> = (0..k).map(|_| next()).collect();
        let b: Vec<f32> = (0..k).map(|_| next()).collect();
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let mag: f64 = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (*x as f64 * *y as f64).abs())
            .sum();
        let mut seen = Vec::new();
        for order in [DotOrder::Wide16, DotOrder::Wide8] {
            for tiled in [false, true] {
                let d = dot(order, tiled, &a, &b) as f64;
                assert!(
                    (d - exact).abs() <= 1e-6 * mag + 1e-30,
                    "k {k}: {d} vs {exact}"
                );
                seen.push(d);
            }
        }
        distinct |= seen.iter().any(|d| *d != seen[0]);
    }
    assert!(distinct, "the four summation orders never differ");
}

#[test]
fn lora_jobs_add_the_scaled_product_and_split_work_exactly() {
    // x: 3 tokens of 2; A: rank 2; B: 20 rows (a block of 16 plus 4).
    let x = [1.0f32, 1.0, 0.5, -1.0, 2.0, 0.25];
    let a = [1.0f32, 2.0, -1.0, 0.5];
    let b: Vec<f32> = (0..40).map(|i| (i % 5) as f32 - 2.0).collect();
    let res: Vec<f32> = (0..60).map(|i| i as f32 * 0.125).collect();
    let panels = b_panels(&b, 2, 20);
    let mut want = vec![0f32; 60];
    for j in 0..3 {
        let t = [
            a[0] * x[2 * j] + a[1] * x[2 * j + 1],
            a[2] * x[2 * j] + a[3] * x[2 * j + 1],
        ];
        for o in 0..20 {
            want[j * 20 + o] = res[j * 20 + o] + (b[2 * o] * t[0] + b[2 * o + 1] * t[1]) * 2.0;
        }
    }
    for order in [DotOrder::Wide16, DotOrder::Wide8] {
        for n in [1usize, 3] {
            let job = LoraJob {
                order,
                scale: 2.0,
                cols: 2,
                rank: 2,
                rows: 20,
                n,
                x: &x[..2 * n],
                factors: Factors::F32 {
                    a: &a,
                    b: &b,
                    b_panels: &panels,
                },
                res: &res[..20 * n],
            };
            for nth in 1..4 {
                let mut out = vec![f32::NAN; 20 * n];
                for ith in 0..nth {
                    job.run(&mut out, ith, nth);
                }
                assert_eq!(out, want[..20 * n], "{order:?} n {n} threads {nth}");
            }
        }
    }
}

/// Products for the kernels' tests, from a seed: values of mixed sign and
/// magnitude, so that summation orders give different roundings.
pub(crate) fn noise(seed: u64, len: usize) -> Vec<f32> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let m = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            m * [1.0, 1e-3, 37.0, 1e3][(s & 3) as usize]
        })
        .collect()
}

#[test]
fn simd_products_equal_the_portable_ones_bit_for_bit() {
    for k in [
        0usize, 1, 7, 8, 15, 16, 17, 31, 63, 64, 65, 100, 128, 192, 576, 1536,
    ] {
        let (a, b) = (noise(k as u64, k), noise(!(k as u64), k));
        for tiled in [false, true] {
            let d16 = dot(DotOrder::Wide16, tiled, &a, &b);
            let d8 = dot(DotOrder::Wide8, tiled, &a, &b);
            assert_eq!(
                d16.to_bits(),
                dot_lanes_generic::<16>(tiled, &a, &b).to_bits()
            );
            assert_eq!(
                d8.to_bits(),
                dot_lanes_generic::<8>(tiled, &a, &b).to_bits()
            );
        }
    }
    for rank in [1usize, 2, 8, 16, 33] {
        let p = noise(rank as u64 * 7, 16 * rank);
        let t = noise(rank as u64 * 11, rank);
        let res: [f32; 16] = noise(3, 16).try_into().expect("16");
        let (mut fast, mut slow) = ([0f32; 16], [0f32; 16]);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            unsafe { super::op::x86::panel(&p, &t, 0.37, &res, &mut fast) };
            panel_generic(&p, &t, 0.37, &res, &mut slow);
            assert_eq!(
                fast.map(f32::to_bits),
                slow.map(f32::to_bits),
                "rank {rank}"
            );
        }
    }
}

#[test]
fn panelled_rows_equal_row_by_row_sums_for_every_split() {
    // 50 rows: three panels and two rows past them; rank 8 (a serial sum).
    let (cols, rank, rows) = (24usize, 8usize, 50usize);
    let x = noise(1, cols * 3);
    let a = noise(2, rank * cols);
    let b = noise(3, rows * rank);
    let res = noise(4, rows * 3);
    let panels = b_panels(&b, rank, rows);
    for order in [DotOrder::Wide16, DotOrder::Wide8] {
        for n in [1usize, 3] {
            // No panels: every row summed on its own.
            let plain = LoraJob {
                order,
                scale: 0.5,
                cols,
                rank,
                rows,
                n,
                x: &x[..cols * n],
                factors: Factors::F32 {
                    a: &a,
                    b: &b,
                    b_panels: &[],
                },
                res: &res[..rows * n],
            };
            let job = LoraJob {
                factors: Factors::F32 {
                    a: &a,
                    b: &b,
                    b_panels: &panels,
                },
                ..plain
            };
            let mut want = vec![f32::NAN; rows * n];
            plain.run(&mut want, 0, 1);
            for nth in 1..6 {
                let mut out = vec![f32::NAN; rows * n];
                for ith in 0..nth {
                    job.run(&mut out, ith, nth);
                }
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&out), bits(&want), "{order:?} n {n} threads {nth}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// Arbitrary bytes, and valid adapters with bytes flipped, never panic.
    #[test]
    fn hostile_adapter_bytes_are_errors(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let _ = check(&bytes);
        let mut good = adapter_bytes("llama", 8.0, &valid());
        for (at, v) in flips {
            let i = at % good.len();
            good[i] ^= v | 1;
        }
        let _ = check(&good);
    }
}
