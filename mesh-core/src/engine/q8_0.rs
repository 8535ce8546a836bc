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

/// ggml's own single-token product with Q8_0 weights, faster.
///
/// The pinned ggml computes `w · x` for Q8_0 weights with llamafile's
/// `tinyBLAS_Q0_AVX2` (on both x86 classes), which for one token reads four
/// rows interleaved (its `gemm<4, 1>` tile). On this project's machines that
/// ran at a third of the speed of reading one row after the other: the tied
/// output head (28M weights, 30 MB) took 39% of a single-thread decode step.
/// This kernel computes the same floats in the same order, one row at a
/// time: `x` quantized to Q8_0 as ggml does, then per block `acc[i] =
/// fma(d_w·d_x, Σ_{4 bytes} q_w·q_x, acc[i])` in 8 lanes, and the lanes
/// summed as tinyBLAS's `hsum` does. The integer dots are `maddubs` pairs as
/// ggml's AVX2 path computes them (equal to the VNNI path's for quants in
/// -127..=127, which is all ggml's quantizers write). Single-thread decode of
/// the default model went from 108-118 to 162-170 tokens/s.
#[cfg(target_arch = "x86_64")]
mod tiny_blas_order {
    use std::arch::x86_64::*;

    use super::{BlockQ8_0, BLOCK};
    use crate::engine::blocks::half;

    /// One row's dot in tinyBLAS's order; `xq`/`dx` are the input's quants
    /// and block scales (as f32).
    ///
    /// # Safety
    /// The CPU supports AVX2, FMA and F16C; `row` has `xq.len() / 32` blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot(row: &[BlockQ8_0], xq: &[i8], dx: &[f32]) -> f32 {
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        for ((blk, &dxl), x) in row.iter().zip(dx).zip(xq.chunks_exact(32)) {
            // SAFETY: `x` and `blk.qs` are 32 bytes each.
            let (xv, wv) = unsafe {
                (
                    _mm256_loadu_si256(x.as_ptr().cast()),
                    _mm256_loadu_si256(blk.qs.as_ptr().cast()),
                )
            };
            let u = _mm256_sign_epi8(wv, wv);
            let sx = _mm256_sign_epi8(xv, wv);
            let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(ones, _mm256_maddubs_epi16(u, sx)));
            let dw = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(half(blk.d)))));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(dw * dxl), dot, acc);
        }
        let mut x = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        x = _mm_add_ps(x, _mm_movehl_ps(x, x));
        x = _mm_add_ss(x, _mm_movehdup_ps(x));
        _mm_cvtss_f32(x)
    }

    /// `out[r - r0] = w_r · x` for rows `r0..r1` of `w` (`row_bytes` each).
    ///
    /// # Safety
    /// As [`dot`]; `w` holds rows `r0..r1` and `out` has `r1 - r0` floats.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn rows(
        w: &[u8],
        row_bytes: usize,
        (r0, r1): (usize, usize),
        xq: &[i8],
        dx: &[f32],
        out: &mut [f32],
    ) {
        debug_assert_eq!(row_bytes, xq.len() / 32 * BLOCK);
        for (r, o) in (r0..r1).zip(out.iter_mut()) {
            let row: &[BlockQ8_0] = bytemuck::cast_slice(&w[r * row_bytes..(r + 1) * row_bytes]);
            // SAFETY: as this function's contract.
            *o = unsafe { dot(row, xq, dx) };
        }
    }
}

/// Whether [`gemv_op`] can run here: an x86-64 CPU with AVX2, FMA and F16C
/// and a ggml built for the AVX2 or AVX-512 class (whose `mul_mat` it
/// reproduces).
pub(crate) fn gemv_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::{cpu_class, CpuClass};
        static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *OK.get_or_init(|| {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
                && std::arch::is_x86_feature_detected!("f16c")
                && cpu_class() != CpuClass::Other
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `dst = w · x` for one token, bit-identical to ggml's `mul_mat` (see
/// `tiny_blas_order`): `w` Q8_0 `[cols, rows]` (contiguous), `x` F32
/// `[cols, 1]`, `dst` F32 `[rows, 1]` (the shape of `_shape`). A non-finite
/// input gives NaN outputs.
///
/// # Safety
/// Called by ggml with tensors as built by the graph code, which checks the
/// types, shapes, [`fits`] and [`gemv_available`].
pub(crate) unsafe extern "C" fn gemv_op(
    dst: *mut sys::ggml_tensor,
    _shape: *const sys::ggml_tensor,
    w: *const sys::ggml_tensor,
    x: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    _userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract: `w` is a
    // contiguous Q8_0 matrix of `rows` rows of `cols / 32` blocks, `x` holds
    // `cols` F32 values, `dst` `rows` floats; threads write disjoint rows.
    unsafe {
        let cols = (*w).ne[0] as usize;
        let rows = (*w).ne[1] as usize;
        let (r0, r1) = share(rows, ith, nth);
        let row_bytes = cols / 32 * BLOCK;
        let w = std::slice::from_raw_parts((*w).data as *const u8, rows * row_bytes);
        let x = std::slice::from_raw_parts((*x).data as *const f32, cols);
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, rows);
        gemv_rows(w, cols, x, &mut out[r0..r1], (r0, r1));
    }
}

/// Rows `r0..r1` of [`gemv_op`] into `out` (`r1 - r0` floats).
fn gemv_rows(w: &[u8], cols: usize, x: &[f32], out: &mut [f32], (r0, r1): (usize, usize)) {
    let mut scales = vec![0f64; cols / 32];
    let mut quants = vec![0i8; cols];
    if q8_0_quants(x, &mut scales, &mut quants).is_err() {
        out.iter_mut().for_each(|o| *o = f32::NAN);
        return;
    }
    // Exact: the scales are fp16 values.
    let dx: Vec<f32> = scales.iter().map(|&d| d as f32).collect();
    #[cfg(target_arch = "x86_64")]
    if gemv_available() {
        // SAFETY: detected above; `w` holds rows `r0..r1` of `cols / 32` blocks.
        unsafe { tiny_blas_order::rows(w, cols / 32 * BLOCK, (r0, r1), &quants, &dx, out) };
        return;
    }
    // Unreachable: the graph code uses `gemv_op` only where it is available.
    let _ = (w, r0, r1, dx);
    out.iter_mut().for_each(|o| *o = f32::NAN);
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

    /// tinyBLAS's order in plain Rust: per block an 8-lane FMA of the block's
    /// 4-byte integer dots, then `(l0 + l2) + (l1 + l3)` of the 4 lane pairs.
    fn tiny_blas_reference(row: &[u8], xq: &[i8], dx: &[f32]) -> f32 {
        let mut acc = [0f32; 8];
        for ((blk, d), x) in whole_blocks(row).iter().zip(dx).zip(xq.chunks_exact(32)) {
            let d = f16_to_f32(half(blk.d)) * d;
            for (i, a) in acc.iter_mut().enumerate() {
                let dot: i32 = (4 * i..4 * i + 4)
                    .map(|j| i32::from(blk.qs[j]) * i32::from(x[j]))
                    .sum();
                *a = d.mul_add(dot as f32, *a);
            }
        }
        let p: Vec<f32> = (0..4).map(|k| acc[k + 4] + acc[k]).collect();
        (p[0] + p[2]) + (p[1] + p[3])
    }

    proptest! {
        #[test]
        fn the_gemv_kernel_sums_in_tiny_blas_order(
            seed in any::<u64>(),
            x in proptest::collection::vec(-4f32..4f32, 96),
        ) {
            if !gemv_available() {
                return Ok(());
            }
            let (rows, cols) = (7, 96);
            // Quants in -127..=127, as ggml's quantizers write them.
            let mut w = matrix(rows, cols, seed);
            for (i, b) in w.iter_mut().enumerate() {
                if i % BLOCK >= 2 && *b == 0x80 {
                    *b = 0x81;
                }
            }
            let mut out = vec![0f32; 4];
            gemv_rows(&w, cols, &x, &mut out, (2, 6));
            let mut scales = vec![0f64; cols / 32];
            let mut quants = vec![0i8; cols];
            q8_0_quants(&x, &mut scales, &mut quants).unwrap();
            let dx: Vec<f32> = scales.iter().map(|&d| d as f32).collect();
            let row_bytes = cols / 32 * BLOCK;
            for (k, r) in (2..6).enumerate() {
                let want = tiny_blas_reference(&w[r * row_bytes..(r + 1) * row_bytes], &quants, &dx);
                prop_assert_eq!(out[k].to_bits(), want.to_bits(), "row {}", r);
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
