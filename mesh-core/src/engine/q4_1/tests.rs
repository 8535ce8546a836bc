use super::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

fn random_weights(rng: &mut ChaCha8Rng, rows: usize, cols: usize) -> Vec<u8> {
    let mut w = vec![0u8; rows * cols / QK * W_BLOCK];
    for blk in w.chunks_exact_mut(W_BLOCK) {
        let d: f32 = rng.gen_range(1e-5..0.05);
        let m: f32 = rng.gen_range(-0.5..0.1);
        // SAFETY: pure conversions.
        let (d, m) = unsafe { (sys::ggml_fp32_to_fp16(d), sys::ggml_fp32_to_fp16(m)) };
        blk[..2].copy_from_slice(&d.to_le_bytes());
        blk[2..4].copy_from_slice(&m.to_le_bytes());
        rng.fill(&mut blk[4..]);
    }
    w
}

/// The variants this CPU runs: AVX2, and AVX-512 where available.
fn variants() -> &'static [bool] {
    if has_avx512_vnni() {
        &[false, true]
    } else {
        &[false]
    }
}

#[test]
fn bit_exact_with_ggml_vec_dot() {
    if !cpu_supported() {
        eprintln!("skipped: no AVX2/FMA/F16C");
        return;
    }
    assert!(init_ggml_tables());
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut checked = 0usize;
    for cols in [32usize, 64, 96, 256, 1024, 1536] {
        for n in 1..=9 {
            for rows in [1usize, 2, 5, 8] {
                let w = random_weights(&mut rng, rows, cols);
                let scale: f32 = rng.gen_range(0.01..30.0);
                let x: Vec<f32> = (0..cols * n)
                    .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
                    .collect();
                let want = reference(&w, rows, cols, &x, n).expect("reference");
                for &vnni in variants() {
                    let got = matmul(vnni, &w, rows, cols, &x, n, false).expect("kernel");
                    for (i, (g, e)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            e.to_bits(),
                            "vnni {vnni} rows {rows} cols {cols} n {n} output {i}: {g} vs {e}"
                        );
                    }
                }
                checked += want.len();
            }
        }
    }
    assert_eq!(checked, 6 * 45 * 16);
    assert!(available());
}

#[test]
fn thread_shares_compose() {
    if !cpu_supported() {
        return;
    }
    assert!(init_ggml_tables());
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let (rows, cols, n) = (13, 192, 70);
    let w = random_weights(&mut rng, rows, cols);
    let x: Vec<f32> = (0..cols * n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    let want = reference(&w, rows, cols, &x, n).expect("reference");
    let l = ActLayout::new(cols, n);
    for (nth, &vnni) in (1..4).flat_map(|nth| variants().iter().map(move |v| (nth, v))) {
        let mut buf = vec![0f32; l.bytes().div_ceil(4)];
        let mut out = vec![f32::NAN; rows * n];
        // SAFETY: buffers sized as the functions require; CPU features checked.
        unsafe {
            let b = buf.as_mut_ptr().cast::<u8>();
            for ith in 0..nth {
                let (c0, c1) = share(n, ith, nth);
                quantize_rows(x.as_ptr(), b, cols, n, c0, c1, false);
            }
            for ith in 0..nth {
                let (r0, r1) = share(rows, ith, nth);
                gemm_rows_with(
                    vnni,
                    w.as_ptr(),
                    cols / QK * W_BLOCK,
                    rows,
                    cols,
                    b,
                    n,
                    out.as_mut_ptr(),
                    r0,
                    r1,
                    false,
                );
            }
        }
        let same = out
            .iter()
            .zip(&want)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "nth {nth} vnni {vnni}");
    }
}

/// `(mantissa, exponent)` with `v == mantissa * 2^exponent` for a finite f32.
fn split(v: f32) -> (i128, i32) {
    if v == 0.0 {
        return (0, 0);
    }
    let bits = v.to_bits();
    let exp = ((bits >> 23) & 0xff) as i32;
    let frac = i128::from(bits & 0x7f_ffff);
    let (m, e) = if exp == 0 {
        (frac, -149)
    } else {
        (frac | 0x80_0000, exp - 150)
    };
    (if v < 0.0 { -m } else { m }, e)
}

/// The exact `Σ_b d_w·d_x·isum_b + m_w·d_x·Σq_b` of one weight row and one
/// Q8_1 activation row, as an i128 multiple of 2^-100, rounded once to f32.
fn exact_reference(w_row: &[u8], y_row: &[u8]) -> f32 {
    const SHIFT: i32 = 100;
    // SAFETY: a pure conversion.
    let f16 = |b: &[u8]| unsafe { sys::ggml_fp16_to_fp32(u16::from_le_bytes([b[0], b[1]])) };
    let term = |a: f32, b: f32, k: i128| -> i128 {
        let ((ma, ea), (mb, eb)) = (split(a), split(b));
        let e = ea + eb + SHIFT;
        assert!(e >= 0, "scale too small");
        (ma * mb * k) << e
    };
    let mut total = 0i128;
    for (wb, yb) in w_row.chunks_exact(W_BLOCK).zip(y_row.chunks_exact(Y_BLOCK)) {
        let (dw, mw, dx) = (f16(&wb[..2]), f16(&wb[2..4]), f16(&yb[..2]));
        let qy = |k: usize| i128::from(yb[4 + k] as i8);
        let qw = |k: usize| {
            i128::from(if k < 16 {
                wb[4 + k] & 15
            } else {
                wb[4 + k - 16] >> 4
            })
        };
        let isum: i128 = (0..QK).map(|k| qw(k) * qy(k)).sum();
        let sumq: i128 = (0..QK).map(qy).sum();
        total += term(dw, dx, isum) + term(mw, dx, sumq);
    }
    // i128 -> f32 rounds to nearest (once); the power-of-two scale is exact.
    (total as f32) * 2f32.powi(-SHIFT)
}

#[test]
fn exact_mode_is_the_correctly_rounded_exact_product() {
    if !cpu_supported() {
        return;
    }
    assert!(init_ggml_tables());
    let from_float = type_traits(sys::ggml_type_GGML_TYPE_Q8_1)
        .from_float
        .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let mut checked = 0usize;
    for cols in [32usize, 96, 576, 1536] {
        for n in [1usize, 3, 4, 9] {
            let rows = 7;
            let w = random_weights(&mut rng, rows, cols);
            let scale: f32 = rng.gen_range(0.01..30.0);
            let x: Vec<f32> = (0..cols * n)
                .map(|_| rng.gen_range(-1.0f32..1.0) * scale)
                .collect();
            let (w_row, y_row) = (cols / QK * W_BLOCK, cols / QK * Y_BLOCK);
            let mut y = vec![0u8; n * y_row];
            for c in 0..n {
                // SAFETY: a full row of floats into a full Q8_1 row.
                unsafe {
                    from_float(
                        x[c * cols..].as_ptr(),
                        y[c * y_row..].as_mut_ptr().cast(),
                        cols as i64,
                    )
                };
            }
            for &vnni in variants() {
                let got = matmul(vnni, &w, rows, cols, &x, n, true).unwrap();
                for c in 0..n {
                    for r in 0..rows {
                        let want = exact_reference(
                            &w[r * w_row..(r + 1) * w_row],
                            &y[c * y_row..(c + 1) * y_row],
                        );
                        let g = got[c * rows + r];
                        assert_eq!(
                            g.to_bits(),
                            want.to_bits(),
                            "cols {cols} n {n} r {r} c {c}: {g} vs {want}"
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    assert!(checked >= 16 * 7 * 4);
}

#[test]
fn exact_mode_ignores_batching_and_threads() {
    if !cpu_supported() {
        return;
    }
    assert!(init_ggml_tables());
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let (rows, cols, n) = (13, 576, 70);
    let w = random_weights(&mut rng, rows, cols);
    let x: Vec<f32> = (0..cols * n).map(|_| rng.gen_range(-2.0f32..2.0)).collect();
    for &vnni in variants() {
        let batched = matmul(vnni, &w, rows, cols, &x, n, true).unwrap();
        // One token at a time.
        for c in 0..n {
            let one = matmul(vnni, &w, rows, cols, &x[c * cols..(c + 1) * cols], 1, true).unwrap();
            for r in 0..rows {
                assert_eq!(one[r].to_bits(), batched[c * rows + r].to_bits());
            }
        }
        // Thread splits.
        let l = ActLayout::new(cols, n);
        for nth in 2..4 {
            let mut buf = vec![0f32; l.bytes().div_ceil(4)];
            let mut out = vec![f32::NAN; rows * n];
            // SAFETY: buffers sized as the functions require; CPU features checked.
            unsafe {
                let b = buf.as_mut_ptr().cast::<u8>();
                for ith in 0..nth {
                    let (c0, c1) = share(n, ith, nth);
                    quantize_rows(x.as_ptr(), b, cols, n, c0, c1, true);
                }
                for ith in 0..nth {
                    let (r0, r1) = share(rows, ith, nth);
                    gemm_rows_with(
                        vnni,
                        w.as_ptr(),
                        cols / QK * W_BLOCK,
                        rows,
                        cols,
                        b,
                        n,
                        out.as_mut_ptr(),
                        r0,
                        r1,
                        true,
                    );
                }
            }
            assert!(out
                .iter()
                .zip(&batched)
                .all(|(a, b)| a.to_bits() == b.to_bits()));
        }
    }
}

#[test]
fn layout_fits_in_an_f32_tensor() {
    for cols in [32usize, 2048, 5632] {
        for n in [1usize, 2, 256] {
            assert!(fits(cols, n));
        }
    }
    assert!(!fits(33, 2));
}
