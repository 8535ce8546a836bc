//! The custom ggml op that applies one adapter pair, `res + s · B (A x)`,
//! with every dot product summed in the order llama.cpp's CPU backend sums
//! it (so greedy tokens match upstream with the same adapter).

use super::*;

/// How llama.cpp's CPU backend sums one F32 dot product of length `k` in a
/// `mul_mat` of `n` tokens whose first operand has `m` rows, per SIMD class:
/// its tiled "tinyBLAS" kernel (one accumulator of `lanes` lanes, fused
/// multiply-adds over the row, then a horizontal sum) for batches (`n >= 2`)
/// where `k` is a multiple of the vector width and `m` of 4, else
/// `ggml_vec_dot_f32` (four accumulators over blocks of `4 · lanes`, a tree
/// reduction, then the leftovers one by one, multiplied and added separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DotOrder {
    /// AVX-512 builds: 16 lanes.
    Wide16,
    /// AVX2 builds: 8 lanes.
    Wide8,
}

impl DotOrder {
    fn lanes(self) -> usize {
        match self {
            DotOrder::Wide16 => 16,
            DotOrder::Wide8 => 8,
        }
    }
}

/// Horizontal sum of a 16-lane register as `_mm512_reduce_add_ps` (GCC):
/// halves added, then quarters, then the last four as `(0+2) + (1+3)`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(super) fn hsum16(v: &[f32; 16]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = v[i] + v[i + 8];
    }
    let mut g = [0f32; 4];
    for i in 0..4 {
        g[i] = h[i] + h[i + 4];
    }
    (g[0] + g[2]) + (g[1] + g[3])
}

/// Horizontal sum of an 8-lane register as tinyBLAS's `hsum(__m256)`.
#[inline(always)]
pub(super) fn hsum8(v: &[f32]) -> f32 {
    let t = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// Horizontal sum of `ggml_vec_dot_f32`'s AVX reduction (`_mm_hadd_ps` twice).
#[inline(always)]
pub(super) fn hadd8(v: &[f32]) -> f32 {
    let t = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (t[0] + t[1]) + (t[2] + t[3])
}

/// `Σ a[l]·b[l]` summed as llama.cpp's `mul_mat` sums it (see [`DotOrder`]).
#[inline(always)]
pub(super) fn dot(order: DotOrder, tiled: bool, a: &[f32], b: &[f32]) -> f32 {
    match order {
        DotOrder::Wide16 => dot_lanes::<16>(tiled, a, b),
        DotOrder::Wide8 => dot_lanes::<8>(tiled, a, b),
    }
}

/// [`dot`] for a register of `L` lanes (16 or 8).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // lanes are indexed as the registers are
pub(super) fn dot_lanes<const L: usize>(tiled: bool, a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    let hsum = |v: &[f32; L]| -> f32 {
        let mut w = [0f32; 16];
        w[..L].copy_from_slice(v);
        if L == 16 {
            hsum16(&w)
        } else {
            hsum8(&w[..8])
        }
    };
    if tiled && k.is_multiple_of(L) {
        let mut acc = [0f32; L];
        for (ca, cb) in a[..k].chunks_exact(L).zip(b[..k].chunks_exact(L)) {
            for l in 0..L {
                acc[l] = ca[l].mul_add(cb[l], acc[l]);
            }
        }
        return hsum(&acc);
    }
    // ggml_vec_dot_f32: 4 accumulators over blocks of 4 registers.
    let np = k - k % (4 * L);
    let mut sum = [[0f32; L]; 4];
    for (ca, cb) in a[..np].chunks_exact(4 * L).zip(b[..np].chunks_exact(4 * L)) {
        for j in 0..4 {
            for l in 0..L {
                sum[j][l] = ca[j * L + l].mul_add(cb[j * L + l], sum[j][l]);
            }
        }
    }
    for l in 0..L {
        sum[0][l] += sum[2][l];
        sum[1][l] += sum[3][l];
    }
    for l in 0..L {
        sum[0][l] += sum[1][l];
    }
    let mut sumf = if L == 16 {
        hsum(&sum[0])
    } else {
        let mut w = [0f32; 8];
        w.copy_from_slice(&sum[0][..8]);
        hadd8(&w)
    };
    // Leftovers: `sumf += x[i]*y[i]` (not contracted into an FMA: matched
    // against llama.cpp's results).
    for i in np..k {
        sumf += a[i] * b[i];
    }
    sumf
}

/// One adapter pair applied by [`lora_add_op`]: kept alive by the graph
/// that uses it (its address is the op's userdata).
#[derive(Debug)]
pub(crate) struct LoraCall {
    /// `[cols, r]`, F32.
    pub a: *const sys::ggml_tensor,
    /// `[r, rows]`, F32.
    pub b: *const sys::ggml_tensor,
    /// B transposed (`r` rows of `rows`), for the short serial sums.
    pub bt: *const f32,
    /// `s = scale · alpha / r`.
    pub scale: f32,
    /// Summation order of the products.
    pub order: DotOrder,
}

/// Custom op `dst = res + s · B (A x)` for `res` `[rows, n]` and `x` `[cols, n]`
/// (contiguous F32), the pair and `s` in the [`LoraCall`] at `userdata`: what
/// llama.cpp computes as `mul_mat(a)`, `mul_mat(b)`, `scale`, `add` (four
/// graph nodes there, one here), with each product summed as it sums it.
///
/// # Safety
/// Called by ggml with those tensors; `userdata` points to a live [`LoraCall`]
/// whose halves fit `x` and `res`.
pub(crate) unsafe extern "C" fn lora_add_op(
    dst: *mut sys::ggml_tensor,
    res: *const sys::ggml_tensor,
    x: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    userdata: *mut std::ffi::c_void,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let call = &*(userdata as *const LoraCall);
        let (a, b) = (call.a, call.b);
        let cols = (*a).ne[0] as usize;
        let rank = (*a).ne[1] as usize;
        let rows = (*b).ne[1] as usize;
        let n = (*x).ne[1] as usize;
        let job = LoraJob {
            order: call.order,
            scale: call.scale,
            cols,
            rank,
            rows,
            n,
            x: std::slice::from_raw_parts((*x).data as *const f32, cols * n),
            a: std::slice::from_raw_parts((*a).data as *const f32, cols * rank),
            b: std::slice::from_raw_parts((*b).data as *const f32, rank * rows),
            bt: std::slice::from_raw_parts(call.bt, rank * rows),
            res: std::slice::from_raw_parts((*res).data as *const f32, rows * n),
        };
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, rows * n);
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2(job: &LoraJob<'_>, out: &mut [f32], ith: i32, nth: i32) {
                job.run(out, ith, nth)
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: the CPU has AVX2 and FMA (checked just above). The
                // arithmetic is the same either way: `mul_add` is a fused
                // multiply-add in hardware or in libm.
                return avx2(&job, out, ith, nth);
            }
        }
        job.run(out, ith, nth)
    }
}

/// The work of one [`lora_add_op`].
pub(crate) struct LoraJob<'a> {
    pub order: DotOrder,
    pub scale: f32,
    pub cols: usize,
    pub rank: usize,
    pub rows: usize,
    pub n: usize,
    /// `n` rows of `cols`.
    pub x: &'a [f32],
    /// `rank` rows of `cols`.
    pub a: &'a [f32],
    /// `rows` rows of `rank`.
    pub b: &'a [f32],
    /// `b` transposed: `rank` rows of `rows`.
    pub bt: &'a [f32],
    /// `n` rows of `rows`.
    pub res: &'a [f32],
}

impl LoraJob<'_> {
    /// This thread's share of `out` (`n` rows of `rows`): whole tokens when
    /// there are at least as many as threads, else a range of output rows of
    /// every token. Every output is computed the same way either way.
    #[inline(always)]
    pub(crate) fn run(&self, out: &mut [f32], ith: i32, nth: i32) {
        // llama.cpp runs tinyBLAS for batches only (two or more tokens), on
        // matrices whose row count is a multiple of 4.
        let tiled_a = self.n >= 2 && self.rank.is_multiple_of(4);
        let tiled_b = self.n >= 2 && self.rows.is_multiple_of(4);
        let (tokens, out_rows) = if self.n >= nth.max(1) as usize {
            (
                crate::engine::kernels::share(self.n, ith, nth),
                (0, self.rows),
            )
        } else {
            (
                (0, self.n),
                crate::engine::kernels::share(self.rows, ith, nth),
            )
        };
        let mut t = vec![0f32; self.rank];
        for j in tokens.0..tokens.1 {
            let xj = &self.x[j * self.cols..(j + 1) * self.cols];
            for (r, tr) in t.iter_mut().enumerate() {
                *tr = dot(
                    self.order,
                    tiled_a,
                    &self.a[r * self.cols..(r + 1) * self.cols],
                    xj,
                );
            }
            let o = j * self.rows;
            dot_rows(
                self.order,
                tiled_b,
                self.b,
                self.bt,
                &t,
                out_rows,
                self.scale,
                &self.res[o..o + self.rows],
                &mut out[o..o + self.rows],
            );
        }
    }
}

/// `out[o] = res[o] + scale · dot(w row o, t)` for rows `range` of `w`
/// (`k = t.len()` columns), summed as [`dot`] sums it. Short rows on the
/// `ggml_vec_dot_f32` path (no full block: a plain serial sum) are done 16
/// rows at a time from `wt` (`w` transposed), each row with its own running
/// sum in the same order, so the loads and sums vectorize across rows.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
pub(super) fn dot_rows(
    order: DotOrder,
    tiled: bool,
    w: &[f32],
    wt: &[f32],
    t: &[f32],
    range: (usize, usize),
    scale: f32,
    res: &[f32],
    out: &mut [f32],
) {
    let k = t.len();
    let rows = res.len();
    let lanes = order.lanes();
    let serial = !(tiled && k.is_multiple_of(lanes)) && k < 4 * lanes;
    let mut o = range.0;
    if serial && wt.len() == rows * k {
        while o + 16 <= range.1 {
            let mut acc = [0f32; 16];
            for (i, &ti) in t.iter().enumerate() {
                let col: &[f32; 16] = wt[i * rows + o..i * rows + o + 16]
                    .try_into()
                    .expect("16 values");
                for r in 0..16 {
                    acc[r] += col[r] * ti;
                }
            }
            let res: &[f32; 16] = res[o..o + 16].try_into().expect("16 values");
            let out: &mut [f32; 16] = (&mut out[o..o + 16]).try_into().expect("16 values");
            for r in 0..16 {
                out[r] = res[r] + acc[r] * scale;
            }
            o += 16;
        }
    }
    for o in o..range.1 {
        let d = dot(order, tiled, &w[o * k..(o + 1) * k], t);
        // ggml_scale multiplies the stored f32 product, then ggml_add.
        out[o] = res[o] + d * scale;
    }
}
