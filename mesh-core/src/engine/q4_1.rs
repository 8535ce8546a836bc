//! Q4_1 weights times a batch of activations, tiled: each weight block is
//! unpacked once and used for several tokens (2 rows x 4 tokens per tile).
//!
//! The pinned ggml computes a Q4_1 `mul_mat` as one `ggml_vec_dot_q4_1_q8_1` call
//! per (weight row, token) pair; that is ~75% of prompt processing. This module
//! computes exactly the same floats: the activations are quantized to Q8_1 with
//! ggml's own `quantize_row_q8_1`, and every output keeps the operation order of
//! ggml's AVX2 `vec_dot` (as built here with `-march=native`, which contracts the
//! scalar `summs += m * s` into an FMA):
//!
//! ```text
//! for each block b:  acc   = fma(splat(d_w * d_x), cvt(dot_u8_i8_pairs(q_w, q_x)), acc)
//!                    summs = fma(m_w, s_x, summs)
//! result = hsum_float_8(acc) + summs
//! ```
//!
//! The kernel is compiled twice for AVX2 + FMA + F16C: with `maddubs` + `madd` for
//! the integer dot product, and, used where the CPU has AVX-512 VNNI + VL, with one
//! `vpdpbusd` (~12% faster). The integers are identical either way. Each activation
//! block's `d` is stored as a ready 8-lane vector, so `d_w * d_x` is one multiply
//! with a memory operand.
//!
//! [`available`] checks the CPU features and, once per process, compares the kernel
//! with ggml's `vec_dot` bit for bit; the graph code only uses the kernel if it passes.
//! Measured on a 2-core AVX-512 EPYC: prompt processing of the default model (Q4_1)
//! ~430 -> ~850 tokens/s.
//!
//! Two ggml custom ops: [`quantize_op`] (a separate node, since custom ops have no
//! barrier) writes the activations into its F32-shaped output in the layout of
//! [`ActLayout`], and [`gemm_op`] splits the weight rows across ggml's threads.

#[cfg(target_arch = "x86_64")]
mod tiled;

use std::ffi::c_void;
use std::sync::OnceLock;

use ggml_sys_bleedingedge as sys;

use super::kernels::share;

#[cfg(target_arch = "x86_64")]
use self::tiled::tiled_kernel;
use super::blocks::{half, BlockQ4_1, BlockQ8_1, Q4_1_QS, Q8_1_QS, QK};

/// Bytes of a weight block ([`BlockQ4_1`]).
const W_BLOCK: usize = std::mem::size_of::<BlockQ4_1>();
/// Bytes of an activation block ([`BlockQ8_1`]).
const Y_BLOCK: usize = std::mem::size_of::<BlockQ8_1>();
/// Tokens per column block (keeps the activations a tile row reads in L2).
const COL_BLOCK: usize = 64;
/// Copies of each activation block's `d` in the quantized buffer.
const D_REPEAT: usize = 8;

/// Where [`quantize_op`] puts the `n` quantized activation rows of `cols` values in
/// its output buffer: the Q8_1 rows back to back, then the blocks' `d` converted
/// to f32 and repeated 8 times (a ready vector operand), as a `[block][token][8]`
/// table, then their `s` as f32, a `[block][token]` table.
#[derive(Clone, Copy)]
struct ActLayout {
    nb: usize,
    n: usize,
}

impl ActLayout {
    fn new(cols: usize, n: usize) -> ActLayout {
        ActLayout { nb: cols / QK, n }
    }

    fn q8_bytes(&self) -> usize {
        self.n * self.nb * Y_BLOCK
    }

    /// Floats in the `d` table.
    fn d_floats(&self) -> usize {
        D_REPEAT * self.n * self.nb
    }

    /// Bytes needed; 72/128 of the `4 * cols * n` of an F32 `[cols, n]` tensor.
    fn bytes(&self) -> usize {
        self.q8_bytes() + 4 * self.d_floats() + 4 * self.n * self.nb
    }
}

/// Whether the kernel can run here and matches ggml's `vec_dot` bit for bit
/// (checked once per process).
pub(crate) fn available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| cpu_supported() && self_test())
}

fn cpu_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A small deterministic product computed both ways; any bit difference disables
/// the kernel (e.g. a ggml built without FMA contraction).
fn self_test() -> bool {
    if !init_ggml_tables() {
        return false;
    }
    let (rows, cols, n) = (5, 160, 7);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut w = vec![0u8; rows * cols / QK * W_BLOCK];
    for blk in super::blocks::blocks_mut::<BlockQ4_1>(&mut w).expect("whole blocks") {
        let d = (next() % 1000) as f32 * 1e-5 + 1e-4;
        let m = -((next() % 1000) as f32) * 1e-4;
        // SAFETY: pure conversions.
        let (d, m) = unsafe { (sys::ggml_fp32_to_fp16(d), sys::ggml_fp32_to_fp16(m)) };
        blk.d = d.to_le_bytes();
        blk.m = m.to_le_bytes();
        for q in &mut blk.qs {
            *q = next() as u8;
        }
    }
    let x: Vec<f32> = (0..cols * n)
        .map(|_| ((next() % 20_001) as f32 - 10_000.0) * 3e-4)
        .collect();
    match (
        matmul(use_avx512(), &w, rows, cols, &x, n, false),
        reference(&w, rows, cols, &x, n),
    ) {
        (Some(a), Some(b)) => a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits()),
        _ => false,
    }
}

/// ggml fills the fp16 table its `vec_dot` reads in the first `ggml_init`.
fn init_ggml_tables() -> bool {
    let params = sys::ggml_init_params {
        mem_size: 1024,
        mem_buffer: std::ptr::null_mut(),
        no_alloc: true,
    };
    // SAFETY: a plain context init and free; ggml fills its tables once, under its
    // own critical section.
    unsafe {
        let ctx = sys::ggml_init(params);
        if ctx.is_null() {
            return false;
        }
        sys::ggml_free(ctx);
    }
    true
}

fn type_traits(t: sys::ggml_type) -> sys::ggml_type_traits_t {
    // SAFETY: reads ggml's static table entry for a valid type.
    unsafe { sys::ggml_internal_get_type_traits(t) }
}

/// Quantize activation rows `c0..c1` of `x` (`n` rows of `cols` floats) into `buf`.
/// With `exact`, the `s` table holds `d * Σq` computed from the block's int8s (exact
/// in f32: an 11-bit fp16 significand times an integer below 2^12) instead of the
/// block's fp16-rounded `s`.
///
/// # Safety
/// `x` holds `n * cols` floats, `buf` is 4-byte aligned and holds
/// `ActLayout::new(cols, n).bytes()` bytes; `cols % 32 == 0`, `c1 <= n`. Calls for
/// disjoint row ranges may run concurrently.
unsafe fn quantize_rows(
    x: *const f32,
    buf: *mut u8,
    cols: usize,
    n: usize,
    c0: usize,
    c1: usize,
    exact: bool,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        // Always present for Q8_1; were it missing, `available()`'s self-test (which runs
        // this function) would fail and the kernel would never be used.
        let Some(from_float) = type_traits(sys::ggml_type_GGML_TYPE_Q8_1).from_float else {
            return;
        };
        let l = ActLayout::new(cols, n);
        let d_tab = buf.add(l.q8_bytes()).cast::<f32>();
        let s_tab = d_tab.add(l.d_floats());
        for c in c0..c1 {
            let row = buf.add(c * l.nb * Y_BLOCK);
            from_float(x.add(c * cols), row.cast(), cols as i64);
            for b in 0..l.nb {
                // Alignment 1: any byte address holds a block.
                let blk = &*row.add(b * Y_BLOCK).cast::<BlockQ8_1>();
                let d = sys::ggml_fp16_to_fp32(half(blk.d));
                for k in 0..D_REPEAT {
                    *d_tab.add((b * n + c) * D_REPEAT + k) = d;
                }
                *s_tab.add(b * n + c) = if exact {
                    let sumq: i32 = blk.qs.iter().map(|&q| i32::from(q)).sum();
                    d * sumq as f32
                } else {
                    sys::ggml_fp16_to_fp32(half(blk.s))
                };
            }
        }
    }
}

/// `out[c * rows + r] = row r of w · activation c` for rows `r0..r1`.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C. `w` holds `rows` Q4_1 rows of `cols` values,
/// `w_stride` bytes apart; `buf` was filled by [`quantize_rows`] for all `n` rows;
/// `out` holds `rows * n` floats; `r1 <= rows`. Calls for disjoint row ranges may
/// run concurrently.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows(
    w: *const u8,
    w_stride: usize,
    rows: usize,
    cols: usize,
    buf: *const u8,
    n: usize,
    out: *mut f32,
    r0: usize,
    r1: usize,
    exact: bool,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let vnni = use_avx512();
        gemm_rows_with(vnni, w, w_stride, rows, cols, buf, n, out, r0, r1, exact);
    }
}

/// The AVX-512 variant where the CPU has it and `MESH_NO_AVX512` is not set
/// (cached). Both variants give bit-identical results; the switch lets one
/// machine run the AVX2 path end to end (see `scripts/cpu-class-tests.sh`).
fn use_avx512() -> bool {
    static V: OnceLock<bool> = OnceLock::new();
    *V.get_or_init(|| has_avx512_vnni() && std::env::var_os("MESH_NO_AVX512").is_none())
}

/// [`gemm_rows`] with the variant chosen by the caller. With `exact` (and `buf`
/// quantized with `exact`), each output is the exact
/// `Σ_b d_w·d_x·isum_b + m_w·d_x·Σq_b` accumulated in f64 and rounded once to f32
/// (see `exact_tile`), instead of ggml's f32 accumulation.
///
/// # Safety
/// As [`gemm_rows`]; with `vnni`, the CPU also has AVX-512 F/VL/BW/VNNI.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_rows_with(
    vnni: bool,
    w: *const u8,
    w_stride: usize,
    rows: usize,
    cols: usize,
    buf: *const u8,
    n: usize,
    out: *mut f32,
    r0: usize,
    r1: usize,
    exact: bool,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        #[cfg(target_arch = "x86_64")]
        {
            let l = ActLayout::new(cols, n);
            let d_tab = buf.add(l.q8_bytes()).cast::<f32>();
            let a = Act {
                q: buf,
                d: d_tab,
                s: d_tab.add(l.d_floats()),
                nb: l.nb,
                n,
            };
            // SAFETY: the caller guarantees the buffers and the CPU features of the
            // chosen variant (see # Safety).
            match (vnni, exact) {
                (true, false) => avx512::gemm(w, w_stride, rows, &a, out, r0, r1),
                (false, false) => avx2::gemm(w, w_stride, rows, &a, out, r0, r1),
                (true, true) => avx512::gemm_exact(w, w_stride, rows, &a, out, r0, r1),
                (false, true) => avx2::gemm_exact(w, w_stride, rows, &a, out, r0, r1),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (vnni, w, w_stride, rows, cols, buf, n, out, r0, r1, exact);
            unreachable!("q4_1::available() is false off x86_64");
        }
    }
}

/// Quantized activations (see `ActLayout`).
#[cfg(target_arch = "x86_64")]
struct Act {
    q: *const u8,
    d: *const f32,
    s: *const f32,
    nb: usize,
    n: usize,
}

// maddubs cannot saturate here (|15 * 127 * 2| < 32768), so both forms give the
// same integers as ggml's VNNI `dpbusd` (or its own maddubs + madd fallback).
#[cfg(target_arch = "x86_64")]
tiled_kernel!(avx2, "avx2,fma,f16c", |qx, qy| {
    let pairs = _mm256_maddubs_epi16(qx, qy);
    _mm256_madd_epi16(_mm256_set1_epi16(1), pairs)
});

// With AVX-512 VNNI + VL: one `vpdpbusd` (u8 x i8, summed in fours). Inline asm
// because the intrinsic needs Rust 1.89 and the workspace supports 1.85.
#[cfg(target_arch = "x86_64")]
tiled_kernel!(avx512, "avx2,fma,f16c", |qx, qy| {
    unsafe {
        let mut sums = _mm256_setzero_si256();
        // SAFETY: this variant only runs where `has_avx512_vnni()` detected AVX-512
        // VNNI and VL (the EVEX encoding of `vpdpbusd` on ymm registers); register-only.
        std::arch::asm!(
            "vpdpbusd {sums}, {x}, {y}",
            sums = inout(ymm_reg) sums,
            x = in(ymm_reg) qx,
            y = in(ymm_reg) qy,
            options(pure, nomem, nostack, preserves_flags),
        );
        sums
    }
});

/// Whether the CPU can run the `avx512` (VNNI) variant.
fn has_avx512_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Quantize `a` (contiguous F32 `[cols, n]`, `cols % 32 == 0`) into `dst` (same shape).
///
/// # Safety
/// Called by ggml with `dst` and `a` as built by the graph code.
pub(crate) unsafe extern "C" fn quantize_op(
    dst: *mut sys::ggml_tensor,
    a: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let cols = (*a).ne[0] as usize;
        let n = (*a).ne[1] as usize;
        let (c0, c1) = share(n, ith, nth);
        // SAFETY: the graph code only builds this op on a contiguous F32 `[cols, n]` with
        // `fits(cols, n)`, so `dst` (same shape, 32-byte aligned) has room for the layout;
        // each thread writes only its own rows' bytes and table entries.
        quantize_rows(
            (*a).data as *const f32,
            (*dst).data as *mut u8,
            cols,
            n,
            c0,
            c1,
            !userdata.is_null(),
        );
    }
}

/// `dst = w · x` with `w` Q4_1 `[cols, rows]` and `xq` the output of [`quantize_op`]
/// for an F32 `[cols, n]`; `dst` is F32 `[rows, n]` (the shape of `_shape`).
///
/// # Safety
/// Called by ggml with tensors as built by the graph code, which only inserts this
/// op when [`available`] is true.
pub(crate) unsafe extern "C" fn gemm_op(
    dst: *mut sys::ggml_tensor,
    _shape: *const sys::ggml_tensor,
    w: *const sys::ggml_tensor,
    xq: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let cols = (*w).ne[0] as usize;
        let rows = (*w).ne[1] as usize;
        let n = (*xq).ne[1] as usize;
        // Whole row pairs per thread.
        let (p0, p1) = share(rows.div_ceil(2), ith, nth);
        let (r0, r1) = ((2 * p0).min(rows), (2 * p1).min(rows));
        // SAFETY: the op is only built when `available()` (CPU features checked), on a
        // Q4_1 `w` whose `cols` match the quantized `xq` (an earlier node, complete when
        // this one runs) and a `dst` of `rows * n` floats; threads get disjoint rows.
        gemm_rows(
            (*w).data as *const u8,
            (*w).nb[1],
            rows,
            cols,
            (*xq).data as *const u8,
            n,
            (*dst).data as *mut f32,
            r0,
            r1,
            !userdata.is_null(),
        );
    }
}

/// The `userdata` of [`quantize_op`] and [`gemm_op`] that selects exact accumulation
/// (null selects ggml's order). Only compared with null, never dereferenced.
pub(crate) fn exact_userdata() -> *mut c_void {
    static EXACT: u8 = 1;
    (&EXACT as *const u8).cast_mut().cast()
}

/// Check that a graph's `[cols, n]` F32 tensor has room for the quantized form.
pub(crate) fn fits(cols: usize, n: usize) -> bool {
    cols.is_multiple_of(QK) && ActLayout::new(cols, n).bytes() <= 4 * cols * n
}

/// `w · x` (`rows x n` outputs, token-major) with this kernel (the AVX-512 variant
/// if `vnni`), single-threaded;
/// None if unavailable or the shapes do not match.
fn matmul(
    vnni: bool,
    w: &[u8],
    rows: usize,
    cols: usize,
    x: &[f32],
    n: usize,
    exact: bool,
) -> Option<Vec<f32>> {
    if !cpu_supported()
        || (vnni && !has_avx512_vnni())
        || !cols.is_multiple_of(QK)
        || w.len() != rows * cols / QK * W_BLOCK
    {
        return None;
    }
    if x.len() != cols * n {
        return None;
    }
    let l = ActLayout::new(cols, n);
    let mut buf = vec![0f32; l.bytes().div_ceil(4)];
    let mut out = vec![0f32; rows * n];
    // SAFETY: sizes checked above; `buf` is f32-aligned; the CPU features were checked.
    unsafe {
        let b = buf.as_mut_ptr().cast::<u8>();
        quantize_rows(x.as_ptr(), b, cols, n, 0, n, exact);
        gemm_rows_with(
            vnni,
            w.as_ptr(),
            cols / QK * W_BLOCK,
            rows,
            cols,
            b,
            n,
            out.as_mut_ptr(),
            0,
            rows,
            exact,
        );
    }
    Some(out)
}

/// The same product with ggml's quantization and `vec_dot`, one call per output.
fn reference(w: &[u8], rows: usize, cols: usize, x: &[f32], n: usize) -> Option<Vec<f32>> {
    let q4 = type_traits(sys::ggml_type_GGML_TYPE_Q4_1);
    let q8 = type_traits(sys::ggml_type_GGML_TYPE_Q8_1);
    let (vec_dot, from_float) = (q4.vec_dot?, q8.from_float?);
    let w_row = cols / QK * W_BLOCK;
    let y_row = cols / QK * Y_BLOCK;
    if !cols.is_multiple_of(QK) || w.len() != rows * w_row || x.len() != cols * n {
        return None;
    }
    let mut y = vec![0u8; n * y_row];
    let mut out = vec![0f32; rows * n];
    // SAFETY: every row pointer addresses a full row of its type (sizes checked).
    unsafe {
        for c in 0..n {
            from_float(
                x[c * cols..].as_ptr(),
                y[c * y_row..].as_mut_ptr().cast(),
                cols as i64,
            );
        }
        for c in 0..n {
            for r in 0..rows {
                vec_dot(
                    cols as i32,
                    &mut out[c * rows + r],
                    0,
                    w[r * w_row..].as_ptr().cast(),
                    0,
                    y[c * y_row..].as_ptr().cast(),
                    0,
                    1,
                );
            }
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests;
