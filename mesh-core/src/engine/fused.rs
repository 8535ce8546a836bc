//! One-token projections of Q4_1 weights, with or without LoRA adapters, in
//! fewer graph nodes than ggml's `mul_mat`.
//!
//! ggml's `mul_mat` of one token quantizes it (to Q8_1 for Q4_1 weights),
//! waits for all threads, then takes one `vec_dot` per weight row; the node
//! ends in another barrier. With an adapter, a
//! [`lora_add_op`](super::lora::lora_add_op) node followed (one more barrier),
//! in which every thread computed all of `A x`, so at two threads the
//! adapter's cost did not shrink at all.
//!
//! Fused, the projections that read the same activations (Q, K and V; gate
//! and up; O; down) share one [`prep_op`] node, which quantizes the token as
//! `mul_mat` does (ggml's own `from_float` for `vec_dot_type`) and computes
//! every adapter's `t = A x` for those projections, split across threads.
//! Then one [`product_op`] node per projection takes ggml's own `vec_dot`
//! per weight row and adds each adapter's `s · B t`, in adapter order. Per
//! layer that is 11 barriers instead of 14 without adapters and 21 with.
//! The floats are those of the unfused nodes: the same quantization, the
//! same `vec_dot` per row, the same [`dot`] and [`dot_rows`] sums (tested
//! bit for bit against the unfused graph).
//!
//! Adapters with F16 halves (what llama.cpp's converter writes by default)
//! are fused too, on x86, reproducing the F16 `mul_mat` chain of the ggml
//! this crate links, product by product:
//! - where the inner length `k` is a multiple of the register width (16
//!   lanes on AVX-512 builds, 8 on AVX2), ggml hands the product to its
//!   tiled kernel, which widens the F16 operand and keeps the F32 one as
//!   is: one accumulator of fused multiply-adds, then a horizontal sum
//!   ([`dot`] in its tiled order, on the widened row);
//! - else the F32 operand is rounded to F16 and ggml's F16 `vec_dot` runs:
//!   for `A x`, ggml's own function; for a row of `B t` (`k` = the rank,
//!   below 32, under its vector step) a serial sum in f64, which
//!   [`panel16`] computes for 16 rows at a time from F16 panels.
//!
//! Half the bytes of F32 factors. That ggml's tiled kernel takes a product
//! of any number of tokens, so each output is summed the same way in a
//! batch as alone: [`lora_add_op`](super::lora::lora_add_op) computes F16
//! pairs of a batch (a prompt) with the same [`F16Fns::a_rows`] and
//! [`b_rows16`], token by token.

use std::ffi::c_void;

use ggml_sys_bleedingedge as sys;

use super::lora::{dot, dot_rows, reduce_tiled, walk_panels, DotOrder};
use crate::engine::kernels::share;

/// A row function of ggml's: one row of the weight type times one row of
/// its `vec_dot_type`.
type VecDot =
    unsafe extern "C" fn(i32, *mut f32, usize, *const c_void, usize, *const c_void, usize, i32);
/// A row conversion of ggml's, from F32 to a `vec_dot_type`.
type FromFloat = unsafe extern "C" fn(*const f32, *mut c_void, i64);

/// ggml's row functions for a one-token `mul_mat` of Q4_1 weights, and of
/// F16 adapter halves where they can be reproduced.
#[derive(Clone, Copy)]
pub(crate) struct RowFns {
    /// Q8_1 quantization of an F32 row (`from_float` of `vec_dot_type`).
    from_float: FromFloat,
    /// One Q4_1 row times one Q8_1 row.
    vec_dot: VecDot,
    /// For F16 adapter halves.
    f16: Option<F16Fns>,
}

impl RowFns {
    /// The functions ggml's `mul_mat` uses for Q4_1 weights, if it uses them
    /// one row at a time (`nrows == 1`) with Q8_1 activations, as on x86;
    /// `None` otherwise (then the graph keeps the unfused nodes).
    pub(crate) fn q4_1() -> Option<RowFns> {
        // SAFETY: reads ggml's static table entries for valid types.
        let (w, y) = unsafe {
            (
                sys::ggml_internal_get_type_traits(sys::ggml_type_GGML_TYPE_Q4_1),
                sys::ggml_internal_get_type_traits(sys::ggml_type_GGML_TYPE_Q8_1),
            )
        };
        if w.vec_dot_type != sys::ggml_type_GGML_TYPE_Q8_1 || w.nrows != 1 {
            return None;
        }
        Some(RowFns {
            from_float: y.from_float?,
            vec_dot: w.vec_dot?,
            f16: F16Fns::get(),
        })
    }

    /// Whether F16 pairs of rank `rank` can be fused, with products summed
    /// in `order` (see [`F16Fns::fuses`]).
    pub(crate) fn fuses_f16(&self, rank: usize, order: DotOrder) -> bool {
        self.f16.is_some_and(|f| f.fuses(rank, order))
    }
}

/// ggml's F32-to-F16 row conversion and F16 dot product, which its F16
/// `mul_mat` uses where its tiled kernel does not take the product.
#[derive(Clone, Copy, Debug)]
pub(crate) struct F16Fns {
    from_float: FromFloat,
    vec_dot: VecDot,
}

impl F16Fns {
    /// ggml's functions, on x86 only (elsewhere ggml's F16 sums differ, see
    /// the module docs), if it uses them one row at a time. Looked up once.
    pub(crate) fn get() -> Option<F16Fns> {
        static FNS: std::sync::OnceLock<Option<F16Fns>> = std::sync::OnceLock::new();
        *FNS.get_or_init(|| {
            if !cfg!(target_arch = "x86_64") {
                return None;
            }
            // SAFETY: reads ggml's static table entry for a valid type.
            let h = unsafe { sys::ggml_internal_get_type_traits(sys::ggml_type_GGML_TYPE_F16) };
            if h.vec_dot_type != sys::ggml_type_GGML_TYPE_F16 || h.nrows != 1 {
                return None;
            }
            Some(F16Fns {
                from_float: h.from_float?,
                vec_dot: h.vec_dot?,
            })
        })
    }

    /// Whether a pair of rank `rank` is reproduced, with products summed in
    /// `order`: ranks that ggml's tiled kernel takes, or short enough for its
    /// F16 `vec_dot` to sum serially (see the module docs).
    pub(crate) fn fuses(&self, rank: usize, order: DotOrder) -> bool {
        rank.is_multiple_of(order.lanes()) || rank < F16_SERIAL_RANK
    }

    /// `v` rounded to F16 as ggml rounds it, as an f32.
    fn round(&self, v: f32) -> f32 {
        let mut h = 0u16;
        // SAFETY: one value in, one F16 value out.
        unsafe { (self.from_float)(&v, (&mut h as *mut u16).cast(), 1) };
        half::f16::from_bits(h).to_f32()
    }

    /// `t[r - rows.0] = A_r · x` for rows `rows` of an F16 `a` (`rank` rows
    /// of `x.len()` values), as ggml's F16 `mul_mat` computes them (its
    /// tiled kernel, or `x` rounded to F16 and its `vec_dot`), then rounded
    /// to F16 where the product `B t` after it takes `t` in F16 (see the
    /// module docs).
    pub(crate) fn a_rows(
        &self,
        order: DotOrder,
        a: &[u16],
        rank: usize,
        x: &[f32],
        rows: (usize, usize),
        t: &mut [f32],
    ) {
        let (cols, lanes) = (x.len(), order.lanes());
        assert!(a.len() >= rank * cols && rows.1 <= rank && t.len() >= rows.1 - rows.0);
        let finish = |v: f32| {
            if rank.is_multiple_of(lanes) {
                v
            } else {
                self.round(v)
            }
        };
        if cols.is_multiple_of(lanes) {
            // ggml's tiled kernel: A widened, x as is; four rows at a time
            // (independent sums in flight).
            let mut r = rows.0;
            while r < rows.1 {
                let n = (rows.1 - r).min(4);
                let v = dot_f16_tiled_rows(order, &a[r * cols..(r + n) * cols], n, x);
                for (j, &v) in v[..n].iter().enumerate() {
                    t[r - rows.0 + j] = finish(v);
                }
                r += n;
            }
            return;
        }
        let mut x16 = vec![0u16; cols];
        // SAFETY: `cols` values in, `cols` F16 values out.
        unsafe { (self.from_float)(x.as_ptr(), x16.as_mut_ptr().cast(), cols as i64) };
        for r in rows.0..rows.1 {
            let row = a[r * cols..(r + 1) * cols].as_ptr();
            let mut v = 0f32;
            // SAFETY: two rows of `cols` F16 values, one result.
            unsafe {
                (self.vec_dot)(
                    cols as i32,
                    &mut v,
                    0,
                    row.cast(),
                    0,
                    x16.as_ptr().cast(),
                    0,
                    1,
                )
            };
            t[r - rows.0] = finish(v);
        }
    }
}

/// `out[o] = res[o] + scale · (B t)[o]` for rows `range` of an F16 `b`
/// (rows of `t.len()` values; `panels` the same in panels of 16 rows), `t`
/// from [`F16Fns::a_rows`], summed as ggml's F16 `mul_mat` sums them: its
/// tiled kernel (each row widened, `t` as is) where the rank is a multiple
/// of `order`'s lanes, else [`dot_rows16`].
#[allow(clippy::too_many_arguments)]
pub(crate) fn b_rows16(
    order: DotOrder,
    b: &[u16],
    panels: &[u16],
    t: &[f32],
    range: (usize, usize),
    scale: f32,
    res: &[f32],
    out: &mut [f32],
) {
    let rank = t.len();
    if !rank.is_multiple_of(order.lanes()) {
        return dot_rows16(b, panels, t, range, scale, res, out);
    }
    let row = |o: usize, out: &mut [f32]| {
        let d = dot_f16_tiled_rows(order, &b[o * rank..(o + 1) * rank], 1, t)[0];
        out[o] = res[o] + d * scale;
    };
    let panelled = panels.len() == res.len() / 16 * 16 * rank;
    walk_panels(range, panelled, false, out, row, |o, n, out| {
        let res: &[f32; 16] = res[o..o + n].try_into().expect("16 values");
        let out: &mut [f32; 16] = (&mut out[o..o + n]).try_into().expect("16 values");
        panel16_tiled(order, &panels[o * rank..(o + n) * rank], t, scale, res, out);
    });
}

/// 16 rows of the tiled F16 `B t` of [`b_rows16`] from their panel: each
/// row summed as [`dot`] sums it in its tiled order on the widened row (one
/// accumulator of `order.lanes()` lanes of fused multiply-adds, then
/// [`reduce_tiled`]), the 16 rows side by side. `t.len()` is a multiple of
/// the lanes.
pub(crate) fn panel16_tiled(
    order: DotOrder,
    panel: &[u16],
    t: &[f32],
    scale: f32,
    res: &[f32; 16],
    out: &mut [f32; 16],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
    {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe {
            match order {
                DotOrder::Wide16 => x86::panel16_tiled::<16>(panel, t, scale, res, out),
                DotOrder::Wide8 => x86::panel16_tiled::<8>(panel, t, scale, res, out),
            }
        };
    }
    match order {
        DotOrder::Wide16 => panel16_tiled_generic::<16>(panel, t, scale, res, out),
        DotOrder::Wide8 => panel16_tiled_generic::<8>(panel, t, scale, res, out),
    }
}

/// [`panel16_tiled`] in portable code.
#[allow(clippy::needless_range_loop)]
pub(crate) fn panel16_tiled_generic<const L: usize>(
    panel: &[u16],
    t: &[f32],
    scale: f32,
    res: &[f32; 16],
    out: &mut [f32; 16],
) {
    // acc[lane][row]
    let mut acc = [[0f32; 16]; L];
    for (k, &tk) in t.iter().enumerate() {
        for r in 0..16 {
            let w = half::f16::from_bits(panel[16 * k + r]).to_f32();
            acc[k % L][r] = w.mul_add(tk, acc[k % L][r]);
        }
    }
    for r in 0..16 {
        let lanes: [f32; L] = std::array::from_fn(|l| acc[l][r]);
        out[r] = res[r] + reduce_tiled(&lanes) * scale;
    }
}

/// Below this length ggml's F16 dot product is one serial f64 sum on x86
/// (its vector step is 32 with AVX2, 64 with AVX-512).
const F16_SERIAL_RANK: usize = 32;

/// Bytes of one Q8_1 row of `cols` values (`cols % 32 == 0`).
pub(crate) fn q8_1_row_bytes(cols: usize) -> usize {
    cols / 32 * std::mem::size_of::<crate::engine::blocks::BlockQ8_1>()
}

/// F32 words at the start of a [`prep_op`] output that hold the quantized
/// token (its bytes rounded up to whole words).
pub(crate) fn q8_1_row_words(cols: usize) -> usize {
    q8_1_row_bytes(cols).div_ceil(4)
}

/// The element type of an adapter pair's halves (both the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    F32,
    F16,
}

/// One pair's A as [`prep_op`] reads it.
pub(crate) struct PrepA {
    /// `rank` rows of `cols` values of type `half`.
    pub a: *const c_void,
    pub rank: usize,
    pub half: Half,
}

/// The userdata of one [`prep_op`]: the token's width, ggml's functions and
/// each adapter pair's A (whose `t = A x` it computes), in order.
pub(crate) struct Prep {
    pub fns: RowFns,
    pub cols: usize,
    pub order: DotOrder,
    /// The A halves; each one's `t` lands after the quantized token and the
    /// `t`s of the pairs before it (for F16 pairs, rounded to F16 and stored
    /// as the f32 of that value, as ggml's next `mul_mat` reads it).
    pub a: Vec<PrepA>,
}

impl Prep {
    /// F32 words of the op's output: the quantized token, then every `t`.
    pub(crate) fn words(&self) -> usize {
        q8_1_row_words(self.cols) + self.a.iter().map(|p| p.rank).sum::<usize>()
    }
}

/// `dst` = the token `x` (F32 `[cols, 1]`) quantized to Q8_1, then each
/// pair's `t = A x`, for the [`Prep`] at `userdata`. The work items (the
/// quantization, then each row of each A) are split across threads.
///
/// # Safety
/// Called by ggml with `dst` of [`Prep::words`] F32 words, `x` a contiguous
/// F32 `[cols]` (`cols % 32 == 0`), `userdata` a live [`Prep`] whose A
/// pointers address `rank · cols` values each, F16 ones only where
/// [`RowFns::fuses_f16`].
pub(crate) unsafe extern "C" fn prep_op(
    dst: *mut sys::ggml_tensor,
    _shape: *const sys::ggml_tensor,
    x: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract.
    unsafe {
        let prep = &*(userdata as *const Prep);
        let cols = prep.cols;
        let x = std::slice::from_raw_parts((*x).data as *const f32, cols);
        let out = (*dst).data as *mut f32;
        let items = 1 + prep.a.iter().map(|p| p.rank).sum::<usize>();
        let (i0, i1) = share(items, ith, nth);
        if i0 == 0 && i1 > 0 {
            (prep.fns.from_float)(x.as_ptr(), out.cast(), cols as i64);
        }
        // Item 1 + k is the k-th row of all the A halves laid end to end,
        // and so is its place in the `t`s after the quantized token.
        let t = out.add(q8_1_row_words(cols));
        let mut k = 0;
        for p in &prep.a {
            // This thread's rows of this A: items `1 + k + r`.
            let r0 = i0.saturating_sub(1 + k).min(p.rank);
            let r1 = i1.saturating_sub(1 + k).min(p.rank);
            // Only this thread writes these `t`s.
            let mine = std::slice::from_raw_parts_mut(t.add(k + r0), r1 - r0);
            match (p.half, prep.fns.f16) {
                (Half::F32, _) => {
                    for (r, t) in (r0..r1).zip(mine) {
                        let row =
                            std::slice::from_raw_parts((p.a as *const f32).add(r * cols), cols);
                        *t = dot(prep.order, false, row, x);
                    }
                }
                (Half::F16, Some(f16)) => {
                    let a = std::slice::from_raw_parts(p.a as *const u16, p.rank * cols);
                    f16.a_rows(prep.order, a, p.rank, x, (r0, r1), mine);
                }
                // Not built (see `RowFns::fuses_f16`).
                (Half::F16, None) => mine.fill(f32::NAN),
            }
            k += p.rank;
        }
    }
}

/// [`dot_f16_tiled`] of `n` (at most 4) consecutive rows of `a` (each
/// `b.len()` long) with `b`: the first `n` results.
pub(crate) fn dot_f16_tiled_rows(order: DotOrder, a: &[u16], n: usize, b: &[f32]) -> [f32; 4] {
    let k = b.len();
    let mut out = [0f32; 4];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
        && n <= 4
        && a.len() >= n * k
    {
        // SAFETY: the CPU has AVX2, FMA and F16C (checked just above).
        return unsafe {
            match order {
                DotOrder::Wide16 => x86::dot_f16_tiled_rows::<16>(a, n, b),
                DotOrder::Wide8 => x86::dot_f16_tiled_rows::<8>(a, n, b),
            }
        };
    }
    for (j, o) in out.iter_mut().enumerate().take(n.min(4)) {
        *o = dot_f16_tiled(order, &a[j * k..(j + 1) * k], b);
    }
    out
}

/// [`dot`] in its tiled order (`tiled = true`) of F16 values `a` (widened
/// exactly) and F32 `b`, `a.len()` a multiple of the order's lanes: ggml's
/// tiled kernel for an F16 weight and an F32 operand, in portable code (the
/// reference [`dot_f16_tiled_rows`] falls back to and is tested against).
pub(crate) fn dot_f16_tiled(order: DotOrder, a: &[u16], b: &[f32]) -> f32 {
    let wide: Vec<f32> = a
        .iter()
        .map(|&h| half::f16::from_bits(h).to_f32())
        .collect();
    dot(order, true, &wide, b)
}

/// One adapter pair as [`product_op`] adds it.
pub(crate) struct ProductPair {
    /// B, `rows` rows of `rank` values of type `half`.
    pub b: *const c_void,
    /// B in panels of 16 rows ([`LoraPair::b_panels`](super::lora::LoraPair::b_panels)
    /// or `b_panels16`).
    pub b_panels: *const c_void,
    pub rank: usize,
    pub half: Half,
    /// `s = scale · alpha / rank`.
    pub scale: f32,
    /// Where this pair's `t` starts in the prep output, in F32 words.
    pub t_at: usize,
}

/// The userdata of one [`product_op`].
pub(crate) struct Product {
    pub fns: RowFns,
    pub order: DotOrder,
    /// The projection's adapter pairs, in the order they are added.
    pub pairs: Vec<ProductPair>,
}

/// `dst = w · x + Σ s · B t` for one token: `w` Q4_1 `[cols, rows]`, `prep`
/// the output of the [`prep_op`] of `x`, `dst` F32 `[rows, 1]`; the pairs in
/// the [`Product`] at `userdata`. Threads take whole panels of 16 rows.
///
/// # Safety
/// Called by ggml with those tensors (`w` contiguous, `cols % 32 == 0`),
/// `userdata` a live [`Product`] whose pairs fit `rows` and the prep output.
pub(crate) unsafe extern "C" fn product_op(
    dst: *mut sys::ggml_tensor,
    _shape: *const sys::ggml_tensor,
    w: *const sys::ggml_tensor,
    prep: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract.
    unsafe {
        let call = &*(userdata as *const Product);
        let cols = (*w).ne[0] as usize;
        let rows = (*w).ne[1] as usize;
        let w_row = (*w).nb[1];
        let wd = (*w).data as *const u8;
        let xq = (*prep).data as *const c_void;
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, rows);
        let (p0, p1) = share(rows.div_ceil(16), ith, nth);
        let range = ((p0 * 16).min(rows), (p1 * 16).min(rows));
        for (o, v) in out[range.0..range.1].iter_mut().enumerate() {
            let row = wd.add((range.0 + o) * w_row).cast::<c_void>();
            (call.fns.vec_dot)(cols as i32, v, 0, row, 0, xq, 0, 1);
        }
        if call.pairs.is_empty() || range.0 == range.1 {
            return;
        }
        let t_all = (*prep).data as *const f32;
        let mut res = vec![0f32; rows];
        for p in &call.pairs {
            res[range.0..range.1].copy_from_slice(&out[range.0..range.1]);
            let t = std::slice::from_raw_parts(t_all.add(p.t_at), p.rank);
            let n_panels = rows / 16 * 16 * p.rank;
            match p.half {
                Half::F32 => {
                    let b = std::slice::from_raw_parts(p.b as *const f32, rows * p.rank);
                    let panels = std::slice::from_raw_parts(p.b_panels as *const f32, n_panels);
                    dot_rows(call.order, false, b, panels, t, range, p.scale, &res, out);
                }
                Half::F16 => {
                    let b = std::slice::from_raw_parts(p.b as *const u16, rows * p.rank);
                    let panels = std::slice::from_raw_parts(p.b_panels as *const u16, n_panels);
                    b_rows16(call.order, b, panels, t, range, p.scale, &res, out);
                }
            }
        }
    }
}

/// [`dot_rows`] for F16 B and a short `t` (already F16 values) of a length
/// ggml's tiled kernel does not take: each row
/// `out[o] = res[o] + scale · (Σ_i f32(b[o][i]) · t[i], summed in f64)`,
/// as ggml's F16 `vec_dot` sums a row shorter than its vector step.
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_rows16(
    b: &[u16],
    panels: &[u16],
    t: &[f32],
    range: (usize, usize),
    scale: f32,
    res: &[f32],
    out: &mut [f32],
) {
    let k = t.len();
    let row = |o: usize, out: &mut [f32]| {
        let mut sum = 0f64;
        for (&h, &ti) in b[o * k..(o + 1) * k].iter().zip(t) {
            sum += f64::from(half::f16::from_bits(h).to_f32() * ti);
        }
        out[o] = res[o] + sum as f32 * scale;
    };
    let panelled = panels.len() == res.len() / 16 * 16 * k;
    walk_panels(range, panelled, true, out, row, |o, n, out| {
        let res = &res[o..o + n];
        let (p, out) = (&panels[o * k..(o + n) * k], &mut out[o..o + n]);
        if n == 32 {
            // Two panels at a time: twice the independent f64 sums in flight.
            let res: &[f32; 32] = res.try_into().expect("32 values");
            panel16x2(p, t, scale, res, out.try_into().expect("32 values"));
        } else {
            let res: &[f32; 16] = res.try_into().expect("16 values");
            panel16(p, t, scale, res, out.try_into().expect("16 values"));
        }
    });
}

/// 16 rows of [`dot_rows16`] from their panel (`t.len()` columns of 16 F16
/// values), through F16C where the CPU has it.
#[inline(always)]
pub(crate) fn panel16(panel: &[u16], t: &[f32], scale: f32, res: &[f32; 16], out: &mut [f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX2 and F16C (checked just above).
        return unsafe { x86::panel16(panel, t, scale, res, out) };
    }
    panel16_generic(panel, t, scale, res, out)
}

/// [`panel16`] for two consecutive panels.
#[inline(always)]
pub(crate) fn panel16x2(
    panels: &[u16],
    t: &[f32],
    scale: f32,
    res: &[f32; 32],
    out: &mut [f32; 32],
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX2 and F16C (checked just above).
        return unsafe { x86::panel16x2(panels, t, scale, res, out) };
    }
    let k = t.len();
    let (r0, r1) = res.split_at(16);
    let (o0, o1) = out.split_at_mut(16);
    let (p0, p1) = panels.split_at(16 * k);
    let as16 = |r: &[f32]| -> [f32; 16] { r.try_into().expect("16 values") };
    let (mut a, mut b) = ([0f32; 16], [0f32; 16]);
    panel16_generic(p0, t, scale, &as16(r0), &mut a);
    panel16_generic(p1, t, scale, &as16(r1), &mut b);
    o0.copy_from_slice(&a);
    o1.copy_from_slice(&b);
}

/// [`panel16`] in portable code.
#[allow(clippy::needless_range_loop)]
pub(crate) fn panel16_generic(
    panel: &[u16],
    t: &[f32],
    scale: f32,
    res: &[f32; 16],
    out: &mut [f32; 16],
) {
    let mut acc = [0f64; 16];
    for (i, &ti) in t.iter().enumerate() {
        for r in 0..16 {
            acc[r] += f64::from(half::f16::from_bits(panel[16 * i + r]).to_f32() * ti);
        }
    }
    for r in 0..16 {
        out[r] = res[r] + acc[r] as f32 * scale;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::dot_f16_tiled_rows`] for a register of `L` lanes: the rows'
    /// sums interleaved, each as [`dot_f16_tiled`] sums it.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `n <= 4`, `a.len() >= n · b.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn dot_f16_tiled_rows<const L: usize>(
        a: &[u16],
        n: usize,
        b: &[f32],
    ) -> [f32; 4] {
        let k = b.len();
        let kk = k / L * L;
        let regs = L / 8;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i < kk {
            for r in 0..regs {
                // SAFETY: `i + 8 · r + 8 <= kk <= k`; row `j < n` of `a`
                // holds `k` values (the caller's contract).
                let y = unsafe { _mm256_loadu_ps(pb.add(i + 8 * r)) };
                for (j, acc) in acc.iter_mut().enumerate().take(n) {
                    let x = unsafe {
                        _mm256_cvtph_ps(_mm_loadu_si128(pa.add(j * k + i + 8 * r).cast()))
                    };
                    acc[r] = _mm256_fmadd_ps(x, y, acc[r]);
                }
            }
            i += L;
        }
        let mut out = [0f32; 4];
        for (o, acc) in out.iter_mut().zip(&acc).take(n) {
            *o = crate::engine::lora::reduce_tiled(&crate::engine::lora::x86_lanes::<L>(acc));
        }
        out
    }

    /// [`super::panel16_tiled_generic`] with AVX2, FMA and F16C: lane `l` of
    /// each row's accumulator is register pair `acc[l]` (16 rows), and the
    /// horizontal sum adds those pairs as [`reduce_tiled`] adds lanes.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `L` is 8 or 16.
    ///
    /// [`reduce_tiled`]: crate::engine::lora::reduce_tiled
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) unsafe fn panel16_tiled<const L: usize>(
        panel: &[u16],
        t: &[f32],
        scale: f32,
        res: &[f32; 16],
        out: &mut [f32; 16],
    ) {
        assert!(panel.len() >= 16 * t.len(), "F16 panel: too short");
        let p = panel.as_ptr();
        let mut acc = [[_mm256_setzero_ps(); 2]; L];
        for (k, &tk) in t.iter().enumerate() {
            let tv = _mm256_set1_ps(tk);
            // SAFETY: `16 · k + 16 <= panel.len()` (asserted above).
            let (lo, hi) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * k).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(p.add(16 * k + 8).cast())),
                )
            };
            let a = &mut acc[k % L];
            a[0] = _mm256_fmadd_ps(lo, tv, a[0]);
            a[1] = _mm256_fmadd_ps(hi, tv, a[1]);
        }
        // `hsum16`: halves, quarters, then (0 + 2) + (1 + 3); `hsum8`: halves,
        // then (0 + 2) + (1 + 3).
        let mut w = L;
        while w > 4 {
            w /= 2;
            for l in 0..w {
                acc[l] = add2(acc[l], acc[l + w]);
            }
        }
        let sum = add2(add2(acc[0], acc[2]), add2(acc[1], acc[3]));
        let s = _mm256_set1_ps(scale);
        // SAFETY: `res` and `out` hold 16 values.
        unsafe {
            for (h, v) in sum.iter().enumerate() {
                let r = _mm256_loadu_ps(res.as_ptr().add(8 * h));
                _mm256_storeu_ps(
                    out.as_mut_ptr().add(8 * h),
                    _mm256_add_ps(r, _mm256_mul_ps(*v, s)),
                );
            }
        }
    }

    #[target_feature(enable = "avx")]
    #[inline]
    fn add2(x: [__m256; 2], y: [__m256; 2]) -> [__m256; 2] {
        [_mm256_add_ps(x[0], y[0]), _mm256_add_ps(x[1], y[1])]
    }

    /// [`super::panel16_generic`] with AVX2 and F16C: the same f32 products
    /// (exact: two F16 values), widened and summed in f64 in the same order.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn panel16(
        panel: &[u16],
        t: &[f32],
        scale: f32,
        res: &[f32; 16],
        out: &mut [f32; 16],
    ) {
        assert!(panel.len() >= 16 * t.len(), "F16 panel: too short");
        let p = panel.as_ptr();
        let mut acc = [_mm256_setzero_pd(); 4];
        for (i, &ti) in t.iter().enumerate() {
            // SAFETY: `16 · i + 16 <= panel.len()` (asserted above).
            unsafe { add_products(p.add(16 * i), ti, &mut acc) };
        }
        finish(&acc, scale, res, out)
    }

    /// `acc[r] += f64(f32(p[r]) · t)` for the 16 F16 values at `p`, in four
    /// registers of four rows.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C; `p` addresses 16 values.
    #[target_feature(enable = "avx2,f16c")]
    #[inline]
    unsafe fn add_products(p: *const u16, t: f32, acc: &mut [__m256d; 4]) {
        let tv = _mm256_set1_ps(t);
        // SAFETY: `p` addresses 16 values (the caller's contract).
        let (lo, hi) = unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(p.cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(8).cast())),
            )
        };
        let (lo, hi) = (_mm256_mul_ps(lo, tv), _mm256_mul_ps(hi, tv));
        let wide = [
            _mm256_cvtps_pd(_mm256_castps256_ps128(lo)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(lo)),
            _mm256_cvtps_pd(_mm256_castps256_ps128(hi)),
            _mm256_cvtps_pd(_mm256_extractf128_ps::<1>(hi)),
        ];
        for (a, w) in acc.iter_mut().zip(wide) {
            *a = _mm256_add_pd(*a, w);
        }
    }

    /// [`panel16`] for two panels (32 rows), their sums interleaved.
    ///
    /// # Safety
    /// The CPU must support AVX2 and F16C.
    #[target_feature(enable = "avx2,f16c")]
    pub(crate) unsafe fn panel16x2(
        panels: &[u16],
        t: &[f32],
        scale: f32,
        res: &[f32; 32],
        out: &mut [f32; 32],
    ) {
        let k = t.len();
        assert!(panels.len() >= 32 * k, "F16 panels: too short");
        let (p0, p1) = (panels.as_ptr(), panels[16 * k..].as_ptr());
        let mut acc = [[_mm256_setzero_pd(); 4]; 2];
        for (i, &ti) in t.iter().enumerate() {
            for (acc, p) in acc.iter_mut().zip([p0, p1]) {
                // SAFETY: `16 · i + 16 <= 16 · k`, inside each panel.
                unsafe { add_products(p.add(16 * i), ti, acc) };
            }
        }
        let (r0, r1) = res.split_at(16);
        let (o0, o1) = out.split_at_mut(16);
        finish(
            &acc[0],
            scale,
            r0.try_into().expect("16"),
            o0.try_into().expect("16"),
        );
        finish(
            &acc[1],
            scale,
            r1.try_into().expect("16"),
            o1.try_into().expect("16"),
        );
    }

    /// `out = res + f32(acc) · scale` for 16 rows summed in f64.
    #[target_feature(enable = "avx2")]
    fn finish(acc: &[__m256d; 4], scale: f32, res: &[f32; 16], out: &mut [f32; 16]) {
        let s = _mm256_set1_ps(scale);
        let lo = _mm256_set_m128(_mm256_cvtpd_ps(acc[1]), _mm256_cvtpd_ps(acc[0]));
        let hi = _mm256_set_m128(_mm256_cvtpd_ps(acc[3]), _mm256_cvtpd_ps(acc[2]));
        // SAFETY: `res` and `out` hold 16 values.
        unsafe {
            let (r0, r1) = (
                _mm256_loadu_ps(res.as_ptr()),
                _mm256_loadu_ps(res.as_ptr().add(8)),
            );
            _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(r0, _mm256_mul_ps(lo, s)));
            _mm256_storeu_ps(
                out.as_mut_ptr().add(8),
                _mm256_add_ps(r1, _mm256_mul_ps(hi, s)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::lora::tests::noise;

    fn to_f16(v: &[f32]) -> Vec<u16> {
        v.iter()
            .map(|&x| half::f16::from_f32(x).to_bits())
            .collect()
    }

    #[test]
    fn f16_panels_equal_the_portable_sums_bit_for_bit() {
        for rank in [1usize, 2, 8, 16, 31] {
            let p = to_f16(&noise(rank as u64 * 5, 16 * rank));
            let t: Vec<f32> = to_f16(&noise(rank as u64 * 3, rank))
                .into_iter()
                .map(|h| half::f16::from_bits(h).to_f32())
                .collect();
            let res: [f32; 16] = noise(9, 16).try_into().expect("16");
            let (mut fast, mut slow) = ([0f32; 16], [0f32; 16]);
            panel16(&p, &t, 0.37, &res, &mut fast);
            panel16_generic(&p, &t, 0.37, &res, &mut slow);
            assert_eq!(
                fast.map(f32::to_bits),
                slow.map(f32::to_bits),
                "rank {rank}"
            );
        }
    }

    #[test]
    fn f16_tiled_panels_equal_the_widened_rows_tiled_dots_bit_for_bit() {
        for order in [DotOrder::Wide16, DotOrder::Wide8] {
            for rank in [8usize, 16, 24, 32, 64] {
                if !rank.is_multiple_of(order.lanes()) {
                    continue;
                }
                let rows = 37;
                let b = to_f16(&noise(rank as u64 * 11, rows * rank));
                let panels = crate::engine::lora::b_panels(&b, rank, rows);
                let t = noise(rank as u64 + 5, rank);
                let res = noise(3, rows);
                let mut want = vec![0f32; rows];
                for o in 0..rows {
                    let wide: Vec<f32> = b[o * rank..(o + 1) * rank]
                        .iter()
                        .map(|&h| half::f16::from_bits(h).to_f32())
                        .collect();
                    want[o] = res[o] + dot(order, true, &wide, &t) * 0.3;
                }
                for range in [(0, rows), (5, 35), (16, 32)] {
                    let mut got = vec![f32::NAN; rows];
                    b_rows16(order, &b, &panels, &t, range, 0.3, &res, &mut got);
                    for o in range.0..range.1 {
                        assert_eq!(
                            got[o].to_bits(),
                            want[o].to_bits(),
                            "{order:?} rank {rank} row {o}"
                        );
                    }
                }
                let mut slow = [0f32; 16];
                let res16: [f32; 16] = res[..16].try_into().expect("16");
                match order {
                    DotOrder::Wide16 => panel16_tiled_generic::<16>(
                        &panels[..16 * rank],
                        &t,
                        0.3,
                        &res16,
                        &mut slow,
                    ),
                    DotOrder::Wide8 => {
                        panel16_tiled_generic::<8>(&panels[..16 * rank], &t, 0.3, &res16, &mut slow)
                    }
                }
                assert_eq!(
                    slow.map(f32::to_bits)[..],
                    want[..16].iter().map(|v| v.to_bits()).collect::<Vec<_>>()[..]
                );
            }
        }
    }

    #[test]
    fn f16_tiled_dots_and_panel_pairs_equal_the_portable_ones() {
        for order in [DotOrder::Wide16, DotOrder::Wide8] {
            for k in [16usize, 32, 64, 576, 1536] {
                let a = to_f16(&noise(k as u64, k));
                let b = noise(!(k as u64), k);
                let wide: Vec<f32> = a
                    .iter()
                    .map(|&h| half::f16::from_bits(h).to_f32())
                    .collect();
                let want = crate::engine::lora::dot(order, true, &wide, &b);
                // The SIMD kernel on one row against the widened row's dot.
                let one = dot_f16_tiled_rows(order, &a, 1, &b)[0];
                assert_eq!(one.to_bits(), want.to_bits());
                let rows = to_f16(&noise(k as u64 * 3, 4 * k));
                for n in 1..=4 {
                    let got = dot_f16_tiled_rows(order, &rows, n, &b);
                    for j in 0..n {
                        let one = dot_f16_tiled(order, &rows[j * k..(j + 1) * k], &b);
                        assert_eq!(got[j].to_bits(), one.to_bits(), "k {k} n {n} row {j}");
                    }
                }
            }
        }
        for rank in [1usize, 8, 31] {
            let p = to_f16(&noise(rank as u64, 32 * rank));
            let t = noise(2, rank);
            let res: [f32; 32] = noise(7, 32).try_into().expect("32");
            let mut two = [0f32; 32];
            panel16x2(&p, &t, 0.75, &res, &mut two);
            let mut one = [0f32; 16];
            for h in 0..2 {
                let r: [f32; 16] = res[16 * h..16 * h + 16].try_into().expect("16");
                panel16_generic(
                    &p[16 * rank * h..16 * rank * (h + 1)],
                    &t,
                    0.75,
                    &r,
                    &mut one,
                );
                assert_eq!(
                    one.map(f32::to_bits),
                    <[f32; 16]>::try_from(&two[16 * h..16 * h + 16])
                        .unwrap()
                        .map(f32::to_bits)
                );
            }
        }
    }

    #[test]
    fn f16_rows_in_panels_equal_row_by_row_sums_for_every_split() {
        // 50 rows: three panels and two rows past them.
        let (rank, rows) = (8usize, 50usize);
        let b = to_f16(&noise(3, rows * rank));
        let panels = crate::engine::lora::b_panels(&b, rank, rows);
        let t = noise(4, rank);
        let res = noise(5, rows);
        let mut want = vec![f32::NAN; rows];
        dot_rows16(&b, &[], &t, (0, rows), 0.5, &res, &mut want);
        // Each row on its own, as ggml's F16 `vec_dot` sums a short row.
        for o in 0..rows {
            let mut sum = 0f64;
            for i in 0..rank {
                sum += f64::from(half::f16::from_bits(b[o * rank + i]).to_f32() * t[i]);
            }
            assert_eq!(want[o].to_bits(), (res[o] + sum as f32 * 0.5).to_bits());
        }
        for nth in 1..6 {
            let mut out = vec![f32::NAN; rows];
            for ith in 0..nth {
                let (p0, p1) = share(rows.div_ceil(16), ith, nth);
                let range = ((p0 * 16).min(rows), (p1 * 16).min(rows));
                dot_rows16(&b, &panels, &t, range, 0.5, &res, &mut out);
            }
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&out), bits(&want), "threads {nth}");
        }
    }
}
