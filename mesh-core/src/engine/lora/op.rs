//! The custom ggml op that applies one adapter pair, `res + s · B (A x)`,
//! with every dot product summed in the order llama.cpp's CPU backend sums
//! it (so greedy tokens match upstream with the same adapter).

use super::*;
use crate::engine::fused::{b_rows16, F16Fns};

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
    /// Lanes of one register.
    pub(crate) fn lanes(self) -> usize {
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
pub(crate) fn dot(order: DotOrder, tiled: bool, a: &[f32], b: &[f32]) -> f32 {
    match order {
        DotOrder::Wide16 => dot_lanes::<16>(tiled, a, b),
        DotOrder::Wide8 => dot_lanes::<8>(tiled, a, b),
    }
}

/// [`dot`] for a register of `L` lanes (16 or 8).
#[inline(always)]
pub(super) fn dot_lanes<const L: usize>(tiled: bool, a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 and FMA (checked just above).
        return unsafe { x86::dot_lanes::<L>(tiled, a, b) };
    }
    dot_lanes_generic::<L>(tiled, a, b)
}

/// [`dot_lanes`] in portable code: the reference the SIMD variant is tested
/// against, and the fallback on CPUs without AVX2.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // lanes are indexed as the registers are
pub(super) fn dot_lanes_generic<const L: usize>(tiled: bool, a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    if tiled && k.is_multiple_of(L) {
        let mut acc = [0f32; L];
        for (ca, cb) in a[..k].chunks_exact(L).zip(b[..k].chunks_exact(L)) {
            for l in 0..L {
                acc[l] = ca[l].mul_add(cb[l], acc[l]);
            }
        }
        return reduce_tiled(&acc);
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
    reduce_vec_dot(sum, &a[np..k], &b[np..k])
}

/// The end of a tiled dot product: the horizontal sum of its accumulator.
#[inline(always)]
pub(crate) fn reduce_tiled<const L: usize>(acc: &[f32; L]) -> f32 {
    let mut w = [0f32; 16];
    w[..L].copy_from_slice(acc);
    if L == 16 {
        hsum16(&w)
    } else {
        hsum8(&w[..8])
    }
}

/// The end of `ggml_vec_dot_f32`: its four accumulators reduced as it reduces
/// them, then the leftovers `a`·`b` (shorter than a block) added one by one.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn reduce_vec_dot<const L: usize>(mut sum: [[f32; L]; 4], a: &[f32], b: &[f32]) -> f32 {
    for l in 0..L {
        sum[0][l] += sum[2][l];
        sum[1][l] += sum[3][l];
    }
    for l in 0..L {
        sum[0][l] += sum[1][l];
    }
    let mut sumf = if L == 16 {
        reduce_tiled(&sum[0])
    } else {
        let mut w = [0f32; 8];
        w.copy_from_slice(&sum[0][..8]);
        hadd8(&w)
    };
    // Leftovers: `sumf += x[i]*y[i]` (not contracted into an FMA: matched
    // against llama.cpp's results).
    for (x, y) in a.iter().zip(b) {
        sumf += x * y;
    }
    sumf
}

/// Whether the CPU runs the AVX2 variants of this module's kernels
/// (detected once).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn has_avx2_fma() -> bool {
    static V: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *V.get_or_init(|| {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    })
}

/// AVX2 variants of the products. A register of 16 lanes is two `__m256`;
/// every lane does the same fused multiply-adds, and the accumulators are
/// reduced by the same portable code, so results are bit-identical to the
/// generic ones (tested). Written with intrinsics because the compiler did
/// not vectorize the generic loops over `[[f32; L]; 4]` (it spilled them).
#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use std::arch::x86_64::*;

    /// [`super::dot_lanes_generic`] with AVX2 registers.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn dot_lanes<const L: usize>(tiled: bool, a: &[f32], b: &[f32]) -> f32 {
        let k = a.len().min(b.len());
        let regs = L / 8;
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        // SAFETY (all loads below): offsets stay below `k`, in both slices.
        if tiled && k.is_multiple_of(L) {
            let mut acc = [_mm256_setzero_ps(); 2];
            let mut i = 0;
            while i < k {
                for (r, acc) in acc.iter_mut().enumerate().take(regs) {
                    let (x, y) = unsafe {
                        (
                            _mm256_loadu_ps(pa.add(i + 8 * r)),
                            _mm256_loadu_ps(pb.add(i + 8 * r)),
                        )
                    };
                    *acc = _mm256_fmadd_ps(x, y, *acc);
                }
                i += L;
            }
            return super::reduce_tiled::<L>(&lanes::<L>(&acc));
        }
        let np = k - k % (4 * L);
        let mut sum = [[_mm256_setzero_ps(); 2]; 4];
        let mut i = 0;
        while i < np {
            for (j, sum) in sum.iter_mut().enumerate() {
                for (r, acc) in sum.iter_mut().enumerate().take(regs) {
                    let o = i + j * L + 8 * r;
                    let (x, y) =
                        unsafe { (_mm256_loadu_ps(pa.add(o)), _mm256_loadu_ps(pb.add(o))) };
                    *acc = _mm256_fmadd_ps(x, y, *acc);
                }
            }
            i += 4 * L;
        }
        let sum = [
            lanes::<L>(&sum[0]),
            lanes::<L>(&sum[1]),
            lanes::<L>(&sum[2]),
            lanes::<L>(&sum[3]),
        ];
        super::reduce_vec_dot(sum, &a[np..k], &b[np..k])
    }

    /// The first `L` lanes of two registers, as an array.
    #[target_feature(enable = "avx2")]
    pub(crate) fn lanes<const L: usize>(v: &[__m256; 2]) -> [f32; L] {
        let mut w = [0f32; 16];
        // SAFETY: `w` has room for two registers.
        unsafe {
            _mm256_storeu_ps(w.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(w.as_mut_ptr().add(8), v[1]);
        }
        let mut out = [0f32; L];
        out.copy_from_slice(&w[..L]);
        out
    }

    /// [`super::panel_generic`] with AVX2 registers.
    ///
    /// # Safety
    /// The CPU must support AVX2.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn panel(
        panel: &[f32],
        t: &[f32],
        scale: f32,
        res: &[f32; 16],
        out: &mut [f32; 16],
    ) {
        assert!(panel.len() >= 16 * t.len(), "LoRA panel: too short");
        let p = panel.as_ptr();
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        for (i, &ti) in t.iter().enumerate() {
            let tv = _mm256_set1_ps(ti);
            // SAFETY: `16 · i + 16 <= panel.len()` (asserted above).
            let (a, b) = unsafe {
                (
                    _mm256_loadu_ps(p.add(16 * i)),
                    _mm256_loadu_ps(p.add(16 * i + 8)),
                )
            };
            // Multiplied, then added: a serial sum, not fused.
            lo = _mm256_add_ps(lo, _mm256_mul_ps(a, tv));
            hi = _mm256_add_ps(hi, _mm256_mul_ps(b, tv));
        }
        let s = _mm256_set1_ps(scale);
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

/// 16 output rows of a short serial product from their panel (`t.len()`
/// columns of 16 values, see [`b_panels`]): `out[r] = res[r] + scale ·
/// Σ_i panel[i][r] · t[i]`, each sum serial in `i`, multiplied then added
/// (as `ggml_vec_dot_f32` sums a row shorter than one block).
#[inline(always)]
#[allow(clippy::needless_range_loop)]
pub(super) fn panel_generic(
    panel: &[f32],
    t: &[f32],
    scale: f32,
    res: &[f32; 16],
    out: &mut [f32; 16],
) {
    let mut acc = [0f32; 16];
    for (i, &ti) in t.iter().enumerate() {
        let col: &[f32; 16] = panel[16 * i..16 * i + 16].try_into().expect("16 values");
        for r in 0..16 {
            acc[r] += col[r] * ti;
        }
    }
    for r in 0..16 {
        out[r] = res[r] + acc[r] * scale;
    }
}

/// One panel through the best variant this CPU has.
#[inline(always)]
fn panel(panel: &[f32], t: &[f32], scale: f32, res: &[f32; 16], out: &mut [f32; 16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { x86::panel(panel, t, scale, res, out) };
    }
    panel_generic(panel, t, scale, res, out)
}

/// B (`rows` rows of `rank`) laid out for [`dot_rows`]: each full block of 16
/// rows as `rank` columns of 16 values, blocks in order, so one block's
/// products read one contiguous run. Rows past the last full block are left
/// out (they are summed from B itself). F32 values, or F16 bits.
pub(crate) fn b_panels<T: Copy + Default>(b: &[T], rank: usize, rows: usize) -> Box<[T]> {
    let blocks = rows / 16;
    let mut p = vec![T::default(); blocks * 16 * rank].into_boxed_slice();
    for blk in 0..blocks {
        for i in 0..rank {
            for r in 0..16 {
                p[(blk * rank + i) * 16 + r] = b[(blk * 16 + r) * rank + i];
            }
        }
    }
    p
}

/// One adapter pair applied by [`lora_add_op`]: kept alive by the graph
/// that uses it (its address is the op's userdata).
#[derive(Debug)]
pub(crate) struct LoraCall {
    /// `[cols, r]`, F32 (or F16 with `f16`).
    pub a: *const sys::ggml_tensor,
    /// `[r, rows]`, of A's type.
    pub b: *const sys::ggml_tensor,
    /// B in panels of 16 rows ([`b_panels`]), for the short serial sums:
    /// F32 values, or with `f16` F16 bits.
    pub b_panels: *const std::ffi::c_void,
    /// ggml's F16 functions, for F16 halves (whose products this op then
    /// sums as [`F16Fns::a_rows`] and [`b_rows16`] do).
    pub f16: Option<F16Fns>,
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
/// whose halves fit `x` and `res`, F16 ones with `f16` set and F32 ones
/// without.
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
        let n_panels = rows / 16 * 16 * rank;
        let factors = match call.f16 {
            None => Factors::F32 {
                a: std::slice::from_raw_parts((*a).data as *const f32, cols * rank),
                b: std::slice::from_raw_parts((*b).data as *const f32, rank * rows),
                b_panels: std::slice::from_raw_parts(call.b_panels as *const f32, n_panels),
            },
            Some(fns) => Factors::F16 {
                fns,
                a: std::slice::from_raw_parts((*a).data as *const u16, cols * rank),
                b: std::slice::from_raw_parts((*b).data as *const u16, rank * rows),
                b_panels: std::slice::from_raw_parts(call.b_panels as *const u16, n_panels),
            },
        };
        let job = LoraJob {
            order: call.order,
            scale: call.scale,
            cols,
            rank,
            rows,
            n,
            x: std::slice::from_raw_parts((*x).data as *const f32, cols * n),
            factors,
            res: std::slice::from_raw_parts((*res).data as *const f32, rows * n),
        };
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, rows * n);
        job.run(out, ith, nth)
    }
}

/// The halves of one adapter pair, as a [`LoraJob`] reads them.
pub(crate) enum Factors<'a> {
    F32 {
        /// `rank` rows of `cols`.
        a: &'a [f32],
        /// `rows` rows of `rank`.
        b: &'a [f32],
        /// `b` in panels of 16 rows ([`b_panels`]).
        b_panels: &'a [f32],
    },
    /// F16 bits, summed as ggml's F16 `mul_mat` of the ggml this crate links
    /// sums them (see [`crate::engine::fused`]).
    F16 {
        fns: F16Fns,
        a: &'a [u16],
        b: &'a [u16],
        b_panels: &'a [u16],
    },
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
    pub factors: Factors<'a>,
    /// `n` rows of `rows`.
    pub res: &'a [f32],
}

impl LoraJob<'_> {
    /// This thread's share of `out` (`n` rows of `rows`): whole tokens when
    /// there are at least as many as threads, else a range of output rows of
    /// every token (whole panels of 16 where it can). Every output is
    /// computed the same way either way.
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
            let (p0, p1) = crate::engine::kernels::share(self.rows.div_ceil(16), ith, nth);
            (
                (0, self.n),
                ((p0 * 16).min(self.rows), (p1 * 16).min(self.rows)),
            )
        };
        let mut small = [0f32; 64];
        let mut large = Vec::new();
        let t = if self.rank <= small.len() {
            &mut small[..self.rank]
        } else {
            large.resize(self.rank, 0f32);
            &mut large[..]
        };
        for j in tokens.0..tokens.1 {
            let xj = &self.x[j * self.cols..(j + 1) * self.cols];
            let o = j * self.rows;
            let (res, out) = (&self.res[o..o + self.rows], &mut out[o..o + self.rows]);
            match &self.factors {
                Factors::F32 { a, b, b_panels } => {
                    for (r, tr) in t.iter_mut().enumerate() {
                        *tr = dot(
                            self.order,
                            tiled_a,
                            &a[r * self.cols..(r + 1) * self.cols],
                            xj,
                        );
                    }
                    dot_rows(
                        self.order, tiled_b, b, b_panels, t, out_rows, self.scale, res, out,
                    );
                }
                // The pinned ggml's F16 products do not depend on the batch:
                // token by token as for one.
                Factors::F16 {
                    fns,
                    a,
                    b,
                    b_panels,
                } => {
                    fns.a_rows(self.order, a, self.rank, xj, (0, self.rank), t);
                    b_rows16(self.order, b, b_panels, t, out_rows, self.scale, res, out);
                }
            }
        }
    }
}

/// `out[o] = res[o] + scale · dot(w row o, t)` for rows `range` of `w`
/// (`k = t.len()` columns), summed as [`dot`] sums it. Short rows on the
/// `ggml_vec_dot_f32` path (no full block: a plain serial sum) are done 16
/// rows at a time from `panels` (`w` in [`b_panels`] layout), each row with
/// its own running sum in the same order, so the loads and sums vectorize
/// across rows and each block reads one contiguous run.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn dot_rows(
    order: DotOrder,
    tiled: bool,
    w: &[f32],
    panels: &[f32],
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
    let row = |o: usize, out: &mut [f32]| {
        let d = dot(order, tiled, &w[o * k..(o + 1) * k], t);
        // ggml_scale multiplies the stored f32 product, then ggml_add.
        out[o] = res[o] + d * scale;
    };
    let panelled = serial && panels.len() == rows / 16 * 16 * k;
    walk_panels(range, panelled, false, out, row, |o, n, out| {
        let res: &[f32; 16] = res[o..o + n].try_into().expect("16 values");
        let out: &mut [f32; 16] = (&mut out[o..o + n]).try_into().expect("16 values");
        panel(&panels[o * k..(o + n) * k], t, scale, res, out);
    });
}

/// Walks output rows `range` of a matrix kept in panels of 16 rows: with
/// `panelled`, rows before the first whole panel and after the last one go
/// to `row` one at a time, and whole panels to `block(o, n, out)` for the
/// `n` rows from `o` (32 at a time with `pairs`, else 16); without, every
/// row goes to `row`.
pub(crate) fn walk_panels(
    range: (usize, usize),
    panelled: bool,
    pairs: bool,
    out: &mut [f32],
    mut row: impl FnMut(usize, &mut [f32]),
    mut block: impl FnMut(usize, usize, &mut [f32]),
) {
    let mut o = range.0;
    if panelled {
        while o < range.1 && !o.is_multiple_of(16) {
            row(o, out);
            o += 1;
        }
        while pairs && o + 32 <= range.1 {
            block(o, 32, out);
            o += 32;
        }
        while o + 16 <= range.1 {
            block(o, 16, out);
            o += 16;
        }
    }
    for o in o..range.1 {
        row(o, out);
    }
}
