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

use std::ffi::c_void;

use ggml_sys_bleedingedge as sys;

use super::lora::{dot, dot_rows, DotOrder};
use crate::engine::kernels::share;

/// ggml's row functions for a Q4_1 `mul_mat` of one token.
#[derive(Clone, Copy)]
pub(crate) struct RowFns {
    /// Q8_1 quantization of an F32 row (`from_float` of `vec_dot_type`).
    from_float: unsafe extern "C" fn(*const f32, *mut c_void, i64),
    /// One Q4_1 row times one Q8_1 row.
    vec_dot:
        unsafe extern "C" fn(i32, *mut f32, usize, *const c_void, usize, *const c_void, usize, i32),
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
        })
    }
}

/// Bytes of one Q8_1 row of `cols` values (`cols % 32 == 0`).
pub(crate) fn q8_1_row_bytes(cols: usize) -> usize {
    cols / 32 * std::mem::size_of::<crate::engine::blocks::BlockQ8_1>()
}

/// F32 words at the start of a [`prep_op`] output that hold the quantized
/// token (its bytes rounded up to whole words).
pub(crate) fn q8_1_row_words(cols: usize) -> usize {
    q8_1_row_bytes(cols).div_ceil(4)
}

/// The userdata of one [`prep_op`]: the token's width, ggml's functions and
/// each adapter pair's A (whose `t = A x` it computes), in order.
pub(crate) struct Prep {
    pub fns: RowFns,
    pub cols: usize,
    pub order: DotOrder,
    /// `(A, rank)`: A is `rank` rows of `cols` F32 values; its `t` lands
    /// after the quantized token and the `t`s of the pairs before it.
    pub a: Vec<(*const f32, usize)>,
}

impl Prep {
    /// F32 words of the op's output: the quantized token, then every `t`.
    pub(crate) fn words(&self) -> usize {
        q8_1_row_words(self.cols) + self.a.iter().map(|&(_, r)| r).sum::<usize>()
    }
}

/// `dst` = the token `x` (F32 `[cols, 1]`) quantized to Q8_1, then each
/// pair's `t = A x`, for the [`Prep`] at `userdata`. The work items (the
/// quantization, then each row of each A) are split across threads.
///
/// # Safety
/// Called by ggml with `dst` of [`Prep::words`] F32 words, `x` a contiguous
/// F32 `[cols]` (`cols % 32 == 0`), `userdata` a live [`Prep`] whose A
/// pointers address `rank · cols` floats each.
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
        let items = 1 + prep.a.iter().map(|&(_, r)| r).sum::<usize>();
        let (i0, i1) = share(items, ith, nth);
        if i0 == 0 && i1 > 0 {
            (prep.fns.from_float)(x.as_ptr(), out.cast(), cols as i64);
        }
        // Item 1 + k is the k-th row of all the A halves laid end to end,
        // and so is its place in the `t`s after the quantized token.
        let t = out.add(q8_1_row_words(cols));
        let mut k = 0;
        for &(a, rank) in &prep.a {
            for r in 0..rank {
                let item = 1 + k + r;
                if item >= i0 && item < i1 {
                    let row = std::slice::from_raw_parts(a.add(r * cols), cols);
                    *t.add(k + r) = dot(prep.order, false, row, x);
                }
            }
            k += rank;
        }
    }
}

/// One adapter pair as [`product_op`] adds it.
pub(crate) struct ProductPair {
    /// B, `rows` rows of `rank` F32 values.
    pub b: *const f32,
    /// B in panels of 16 rows ([`super::lora::LoraPair::b_panels`]).
    pub b_panels: *const f32,
    pub rank: usize,
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
            let b = std::slice::from_raw_parts(p.b, rows * p.rank);
            let panels = std::slice::from_raw_parts(p.b_panels, rows / 16 * 16 * p.rank);
            dot_rows(call.order, false, b, panels, t, range, p.scale, &res, out);
        }
    }
}
