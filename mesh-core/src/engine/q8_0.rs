//! Exact-accumulation products with Q8_0 weights (the default model's tied
//! output head): the input is quantized to Q8_0 exactly as ggml does, each
//! block's integer dot `Σ q_w·q_x` is summed in i32 (exact), scaled by the
//! two fp16 scales in f64 (exact: 11 + 11 + 19 significant bits), the blocks
//! are summed in f64 in a fixed order, and the result is rounded once to
//! f32. The value is independent of the CPU, thread split and batch, and is
//! the one private mode reconstructs from its ring product, so local exact
//! generation and private generation pick the same tokens.

use std::ffi::c_void;

use ggml_sys_bleedingedge as sys;

use super::kernels::share;
use crate::delegate::activations::{f16_to_f32, q8_0_quants};

use super::blocks::{half, BlockQ8_0};

/// Bytes per Q8_0 block ([`BlockQ8_0`]).
const BLOCK: usize = std::mem::size_of::<BlockQ8_0>();

/// The whole blocks of `row` (a partial block at the end is ignored).
fn whole_blocks(row: &[u8]) -> &[BlockQ8_0] {
    // Never panics: a multiple of the block size, and blocks have alignment 1.
    bytemuck::cast_slice(&row[..row.len() / BLOCK * BLOCK])
}

/// Every fp16 value as f32 (the weights' block scales; a table is several
/// times faster than converting in software per block).
fn f16_table() -> &'static [f32] {
    static TABLE: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| (0..=u16::MAX).map(f16_to_f32).collect())
}

/// `Σ_b d_w·d_x·Σ_j q_w·q_x` of one Q8_0 row against a quantized input.
#[inline(always)]
fn row_dot_generic(row: &[u8], scales: &[f64], quants: &[i8], f16: &[f32]) -> f64 {
    let mut acc = 0f64;
    for ((blk, dx), qx) in whole_blocks(row)
        .iter()
        .zip(scales)
        .zip(quants.chunks_exact(32))
    {
        let dw = f64::from(f16[usize::from(half(blk.d))]);
        let isum: i32 = blk
            .qs
            .iter()
            .zip(qx)
            .map(|(w, x)| i32::from(*w) * i32::from(*x))
            .sum();
        acc += dw * dx * f64::from(isum);
    }
    acc
}

/// [`row_dot_generic`] compiled for AVX2 (the integer dot vectorizes; the
/// result is the same integer, so the same value).
///
/// # Safety
/// The CPU supports AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn row_dot_avx2(row: &[u8], scales: &[f64], quants: &[i8], f16: &[f32]) -> f64 {
    row_dot_generic(row, scales, quants, f16)
}

fn row_dot(avx2: bool, row: &[u8], scales: &[f64], quants: &[i8], f16: &[f32]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: the caller detected AVX2.
        return unsafe { row_dot_avx2(row, scales, quants, f16) };
    }
    let _ = avx2;
    row_dot_generic(row, scales, quants, f16)
}

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `out[t·rows + r] = w_r · x_t` exactly rounded (see the module docs) for
/// rows `r0..r1` of `w` (`rows` rows of `cols / 32` Q8_0 blocks) and the
/// `n` tokens of `x` (`cols` values each). A token with a non-finite value
/// gives NaN outputs.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rows(
    avx2: bool,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    out: &mut [f32],
    (r0, r1): (usize, usize),
) {
    let row_bytes = cols / 32 * BLOCK;
    let f16 = f16_table();
    let mut scales = vec![0f64; cols / 32];
    let mut quants = vec![0i8; cols];
    for (t, xt) in x.chunks_exact(cols).take(n).enumerate() {
        let dst = &mut out[t * rows..(t + 1) * rows];
        if q8_0_quants(xt, &mut scales, &mut quants).is_err() {
            dst[r0..r1].iter_mut().for_each(|o| *o = f32::NAN);
            continue;
        }
        for r in r0..r1 {
            let row = &w[r * row_bytes..(r + 1) * row_bytes];
            dst[r] = row_dot(avx2, row, &scales, &quants, f16) as f32;
        }
    }
}

/// Whether a `[cols, rows]` Q8_0 weight and an F32 `[cols, n]` input fit
/// [`exact_gemm_op`].
pub(crate) fn fits(cols: usize) -> bool {
    cols > 0 && cols.is_multiple_of(32)
}

/// `dst = w · x` exactly rounded, with `w` Q8_0 `[cols, rows]` (contiguous)
/// and `x` F32 `[cols, n]` (rows `nb[1]` bytes apart); `dst` is F32
/// `[rows, n]` (the shape of `_shape`).
///
/// # Safety
/// Called by ggml with tensors as built by the graph code, which checks the
/// types, shapes and [`fits`].
pub(crate) unsafe extern "C" fn exact_gemm_op(
    dst: *mut sys::ggml_tensor,
    _shape: *const sys::ggml_tensor,
    w: *const sys::ggml_tensor,
    x: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    _userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let cols = (*w).ne[0] as usize;
        let rows = (*w).ne[1] as usize;
        let n = (*x).ne[1] as usize;
        let (r0, r1) = share(rows, ith, nth);
        // SAFETY: `w` is a contiguous Q8_0 matrix of `rows` rows of `cols / 32`
        // blocks; `x` holds `n` F32 rows of `cols` values, `nb[1]` bytes apart;
        // `dst` holds `rows * n` floats and threads write disjoint rows.
        let w = std::slice::from_raw_parts((*w).data as *const u8, rows * (cols / 32) * BLOCK);
        let mut xs = Vec::with_capacity(cols * n);
        for t in 0..n {
            let p = ((*x).data as *const u8).add(t * (*x).nb[1]) as *const f32;
            xs.extend_from_slice(std::slice::from_raw_parts(p, cols));
        }
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, rows * n);
        gemm_rows(has_avx2(), w, rows, cols, &xs, n, out, (r0, r1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegate::activations::{f32_to_f16, quantize_like_ggml, ActivationFormat};
    use proptest::prelude::*;

    /// A Q8_0 matrix from scales and quants.
    fn matrix(rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as u32
        };
        let mut w = Vec::new();
        for _ in 0..rows * cols / 32 {
            let d = (next() % 1000) as f32 / 1e5 + 1e-4;
            w.extend_from_slice(&f32_to_f16(d).to_le_bytes());
            for _ in 0..32 {
                w.push((next() % 255) as u8);
            }
        }
        w
    }

    proptest! {
        #[test]
        fn scalar_and_avx2_agree_and_match_the_exact_value(
            seed in any::<u64>(),
            x in proptest::collection::vec(-4f32..4f32, 64 * 3),
        ) {
            let (rows, cols, n) = (5, 64, 3);
            let w = matrix(rows, cols, seed);
            let mut a = vec![0f32; rows * n];
            let mut b = vec![0f32; rows * n];
            gemm_rows(false, &w, rows, cols, &x, n, &mut a, (0, rows));
            gemm_rows(has_avx2(), &w, rows, cols, &x, n, &mut b, (0, rows));
            prop_assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            b.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            // The same value from the dequantized activations in f64.
            let xv = quantize_like_ggml(ActivationFormat::Q8_0, &x).unwrap();
            for t in 0..n {
                for r in 0..rows {
                    let row = &w[r * cols / 32 * BLOCK..(r + 1) * cols / 32 * BLOCK];
                    let mut exact = 0f64;
                    for (bi, blk) in whole_blocks(row).iter().enumerate() {
                        let dw = f64::from(f16_to_f32(half(blk.d)));
                        let s: f64 = blk.qs.iter().enumerate()
                            .map(|(j, q)| f64::from(*q) * xv[t * cols + bi * 32 + j])
                            .sum();
                        exact += dw * s;
                    }
                    prop_assert_eq!(a[t * rows + r], exact as f32);
                }
            }
        }
    }

    #[test]
    fn non_finite_input_gives_nan_not_a_panic() {
        let w = matrix(2, 32, 1);
        let mut x = vec![1f32; 32];
        x[3] = f32::INFINITY;
        let mut out = vec![0f32; 2];
        gemm_rows(has_avx2(), &w, 2, 32, &x, 1, &mut out, (0, 2));
        assert!(out.iter().all(|v| v.is_nan()));
    }
}
