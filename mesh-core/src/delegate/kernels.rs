//! A helper's matrix products in `Z_2^64`, straight on GGUF block bytes.
//!
//! Every supported format stores fp16 scales (and mins) and small integer
//! quants, and the smallest fp16 step is `2^-24` (the least subnormal), so
//! `2^24·w` is an exact integer for every weight:
//!
//! | format | weight `w`                  | `2^24·w`                  | max `|2^24·w|` |
//! |--------|-----------------------------|---------------------------|----------------|
//! | F16    | `h`                         | `H`                       | `< 2^40`       |
//! | Q8_0   | `d·q`, `q` in i8            | `D·q`                     | `< 2^47`       |
//! | Q4_0   | `d·(q - 8)`, `q` in 0..16   | `D·(q - 8)`               | `< 2^43`       |
//! | Q4_1   | `d·q + m`                   | `D·q + M`                 | `< 2^45`       |
//! | Q4_K   | `d·sc·q - dmin·mn` (6-bit sc, mn) | `D·sc·q - Dmin·mn`  | `< 2^50`       |
//! | Q6_K   | `d·sc·(q - 32)`, `sc` in i8 | `D·sc·(q - 32)`           | `< 2^52`       |
//!
//! with `D = 2^24·d` etc. An fp16 scale decodes to the integer
//! `(1024 + f)·2^(e - 1)` (normal) or `f` (subnormal); infinities and NaNs are
//! rejected. All of these fit an `i64`, so no intermediate overflows before
//! the (intended) wrapping reduction mod `2^64`.
//!
//! Q8_0, Q4_0 and Q4_1 have an AVX2 path (chosen at run time, see
//! [`simd_available`]; the scalar code is the fallback and the reference),
//! built on the small size of one factor: an fp16 scale is `D = ±mant·2^sh`
//! with `mant < 2^11`, so `mant·q` fits 19 signed bits and, with the input
//! split as `X = lo + 2^32·hi` (`lo` a signed 32-bit value), one block is
//! `±2^sh·(Σ mant·q_j·lo_j + 2^32·Σ mant·q_j·hi_j)`: a signed 32x32->64-bit
//! multiply (`vpmuldq`) for the low part and a 32-bit multiply (`vpmulld`,
//! only its low 32 bits matter after the shift) for the high part, then one
//! shift per block. The min (Q4_1) and `-8·D` (Q4_0) terms use per-block
//! sums of `X` computed once per token. Every operation is a ring operation
//! mod `2^64` (or mod `2^32` for what is later shifted by 32), so the result
//! is the scalar one bit for bit (proptested).
//!
//! Note that ggml's own f32 dequantization is *not* always exact for Q4_1,
//! Q4_K (the `- m` step) and Q6_K (`d·sc·q` can need 25 bits); the integers
//! here are the format's exact values.

use crate::engine::blocks::{
    block, half, Block, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ6K, BlockQ8_0,
};
use crate::engine::WeightView;
use crate::gguf::GgmlType;
use crate::gguf::GgufErrorKind;
use crate::{Error, Result};

/// Block formats the kernels accept.
pub const SUPPORTED_TYPES: [GgmlType; 6] = [
    GgmlType::F16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
];

/// Work (weights × tokens) above which [`Matrix::mul`] splits rows across threads.
const PARALLEL_WORK: usize = 1 << 22;

/// A validated weight matrix in one of [`SUPPORTED_TYPES`]: `rows` rows of
/// `cols` weights, row-major GGUF blocks.
#[derive(Clone, Copy)]
pub struct Matrix<'a> {
    ty: GgmlType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    bytes: &'a [u8],
}

impl std::fmt::Debug for Matrix<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Matrix({} {}x{})", self.ty, self.rows, self.cols)
    }
}

/// `2^24·h` for the fp16 bit pattern `bits`, exactly.
fn fp16_scaled(bits: u16) -> Result<i64> {
    let exp = i64::from((bits >> 10) & 0x1f);
    let frac = i64::from(bits & 0x3ff);
    let mag = match exp {
        0 => frac,
        31 => {
            return Err(Error::gguf(
                GgufErrorKind::Model,
                format!(
                    "fp16 value {bits:#06x} is infinite or NaN: expected a finite weight or scale"
                ),
            ))
        }
        _ => (1024 + frac) << (exp - 1),
    };
    Ok(if bits >> 15 == 1 { -mag } else { mag })
}

/// `2^24·h` for the fp16 scale `h` of a block.
fn scale(h: [u8; 2]) -> Result<i64> {
    fp16_scaled(half(h))
}

/// `bytes` as one block of `B` (the callers cut exactly one block).
fn one<B: Block>(bytes: &[u8]) -> Result<&B> {
    block::<B>(bytes).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{} block: expected {} bytes, found {}",
            B::TYPE,
            B::TYPE.type_size(),
            bytes.len()
        ))
    })
}

/// Q4_K's packed 6-bit scale and min of sub-block `j` (ggml's `get_scale_min_k4`).
fn q4k_scale_min(j: usize, s: &[u8]) -> (i64, i64) {
    if j < 4 {
        (i64::from(s[j] & 63), i64::from(s[j + 4] & 63))
    } else {
        (
            i64::from((s[j + 4] & 0xf) | ((s[j - 4] >> 6) << 4)),
            i64::from((s[j + 4] >> 4) | ((s[j] >> 6) << 4)),
        )
    }
}

/// Writes the exact integer weights `2^24·w` of one block to `out`.
fn block_weights(ty: GgmlType, b: &[u8], out: &mut [i64]) -> Result<()> {
    match ty {
        GgmlType::F16 => out[0] = fp16_scaled(u16::from_le_bytes([b[0], b[1]]))?,
        GgmlType::Q8_0 => {
            let blk = one::<BlockQ8_0>(b)?;
            let d = scale(blk.d)?;
            for (o, q) in out.iter_mut().zip(&blk.qs) {
                *o = d * i64::from(*q);
            }
        }
        GgmlType::Q4_0 => {
            let blk = one::<BlockQ4_0>(b)?;
            let d = scale(blk.d)?;
            for (i, q) in blk.qs.iter().enumerate() {
                out[i] = d * (i64::from(q & 0xf) - 8);
                out[i + 16] = d * (i64::from(q >> 4) - 8);
            }
        }
        GgmlType::Q4_1 => {
            let blk = one::<BlockQ4_1>(b)?;
            let (d, m) = (scale(blk.d)?, scale(blk.m)?);
            for (i, q) in blk.qs.iter().enumerate() {
                out[i] = d * i64::from(q & 0xf) + m;
                out[i + 16] = d * i64::from(q >> 4) + m;
            }
        }
        GgmlType::Q4_K => {
            let blk = one::<BlockQ4K>(b)?;
            let (d, dmin) = (scale(blk.d)?, scale(blk.dmin)?);
            // 4 chunks of 32 quant bytes; low nibbles are sub-block 2c, high 2c+1.
            for (c, qs) in blk.qs.chunks_exact(32).enumerate() {
                let (sc_lo, mn_lo) = q4k_scale_min(2 * c, &blk.scales);
                let (sc_hi, mn_hi) = q4k_scale_min(2 * c + 1, &blk.scales);
                let (a_lo, b_lo) = (d * sc_lo, dmin * mn_lo);
                let (a_hi, b_hi) = (d * sc_hi, dmin * mn_hi);
                for (l, q) in qs.iter().enumerate() {
                    out[64 * c + l] = a_lo * i64::from(q & 0xf) - b_lo;
                    out[64 * c + 32 + l] = a_hi * i64::from(q >> 4) - b_hi;
                }
            }
        }
        GgmlType::Q6_K => {
            let blk = one::<BlockQ6K>(b)?;
            let d = scale(blk.d)?;
            // Two halves of 128 weights; each uses 64 ql bytes, 32 qh bytes, 8 scales.
            for h in 0..2 {
                let (ql, qh, sc) = (&blk.ql[64 * h..], &blk.qh[32 * h..], &blk.scales[8 * h..]);
                for l in 0..32 {
                    let hi = qh[l];
                    let q = [
                        (ql[l] & 0xf) | ((hi & 3) << 4),
                        (ql[l + 32] & 0xf) | (((hi >> 2) & 3) << 4),
                        (ql[l] >> 4) | (((hi >> 4) & 3) << 4),
                        (ql[l + 32] >> 4) | (((hi >> 6) & 3) << 4),
                    ];
                    for (k, qk) in q.iter().enumerate() {
                        let s = i64::from(sc[l / 16 + 2 * k]);
                        out[128 * h + 32 * k + l] = d * s * (i64::from(*qk) - 32);
                    }
                }
            }
        }
        other => {
            return Err(Error::Unsupported(format!(
                "delegated matmul on {other} weights: expected one of F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K"
            )))
        }
    }
    Ok(())
}

/// `Σ_j 2^24·q_j·X_j` and `Σ_j X_j` over the 32 nibbles of a Q4_0/Q4_1
/// block against its 32 inputs.
fn nibble_dot(qs: &[u8; 16], xs: &[u64]) -> (u64, u64) {
    let (lo, hi) = xs.split_at(16);
    let (mut sq, mut sx) = (0u64, 0u64);
    for ((q, a), c) in qs.iter().zip(lo).zip(hi) {
        sq = sq
            .wrapping_add(u64::from(q & 0xf).wrapping_mul(*a))
            .wrapping_add(u64::from(q >> 4).wrapping_mul(*c));
        sx = sx.wrapping_add(*a).wrapping_add(*c);
    }
    (sq, sx)
}

/// `Σ_j 2^24·w_j·X_j` over one row of 32-weight blocks, block by block on
/// the GGUF bytes: `D·Σ q_j·X_j` (Q8_0), `D·(Σ q_j·X_j - 8·Σ X_j)` (Q4_0),
/// `D·Σ q_j·X_j + M·Σ X_j` (Q4_1). Only for those three types.
fn block_dot(ty: GgmlType, row: &[u8], x: &[u64]) -> Result<u64> {
    let ts = ty.type_size() as usize;
    let mut acc = 0u64;
    for (b, xs) in row.chunks_exact(ts).zip(x.chunks_exact(32)) {
        let (d, sq, offset, sx) = match ty {
            GgmlType::Q8_0 => {
                let blk = one::<BlockQ8_0>(b)?;
                let mut sq = 0u64;
                for (q, v) in blk.qs.iter().zip(xs) {
                    sq = sq.wrapping_add((i64::from(*q) as u64).wrapping_mul(*v));
                }
                (scale(blk.d)? as u64, sq, 0, 0)
            }
            GgmlType::Q4_0 => {
                let blk = one::<BlockQ4_0>(b)?;
                let d = scale(blk.d)? as u64;
                let (sq, sx) = nibble_dot(&blk.qs, xs);
                // D·(q - 8) summed: the -8·D·ΣX term.
                (d, sq, d.wrapping_mul(8).wrapping_neg(), sx)
            }
            GgmlType::Q4_1 => {
                let blk = one::<BlockQ4_1>(b)?;
                let (sq, sx) = nibble_dot(&blk.qs, xs);
                (scale(blk.d)? as u64, sq, scale(blk.m)? as u64, sx)
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "block dot product on {other}: expected Q8_0, Q4_0 or Q4_1"
                )))
            }
        };
        acc = acc
            .wrapping_add(d.wrapping_mul(sq))
            .wrapping_add(offset.wrapping_mul(sx));
    }
    Ok(acc)
}

impl<'a> Matrix<'a> {
    /// Checks that `bytes` holds exactly `rows` rows of `cols` weights of `ty`.
    pub fn new(ty: GgmlType, rows: usize, cols: usize, bytes: &'a [u8]) -> Result<Matrix<'a>> {
        if !SUPPORTED_TYPES.contains(&ty) {
            return Err(Error::Unsupported(format!(
                "delegated matmul on {ty} weights: expected one of F16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K"
            )));
        }
        if rows == 0 || cols == 0 {
            return Err(Error::InvalidArgument(format!(
                "matrix {rows}x{cols}: expected at least one row and column"
            )));
        }
        let row_bytes = ty.row_bytes(cols as u64)? as usize;
        let need = rows.checked_mul(row_bytes).ok_or_else(|| {
            Error::InvalidArgument(format!("matrix {rows}x{cols} {ty} is too large"))
        })?;
        if bytes.len() != need {
            return Err(Error::InvalidArgument(format!(
                "{ty} matrix {rows}x{cols}: expected {need} bytes, found {}",
                bytes.len()
            )));
        }
        Ok(Matrix {
            ty,
            rows,
            cols,
            row_bytes,
            bytes,
        })
    }

    /// The same checks for a projection as the engine exposes it.
    pub fn from_view(view: &WeightView<'a>) -> Result<Matrix<'a>> {
        Matrix::new(view.ggml_type, view.rows, view.cols, view.bytes)
    }

    /// Storage format.
    pub fn ggml_type(&self) -> GgmlType {
        self.ty
    }

    /// Number of output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Number of input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Writes the exact integer weights `2^24·w[row][j]` into `out` (`cols` values).
    pub fn row_weights(&self, row: usize, out: &mut [i64]) -> Result<()> {
        if row >= self.rows || out.len() != self.cols {
            return Err(Error::InvalidArgument(format!(
                "row {row} into {} values: expected a row below {} and {} values",
                out.len(),
                self.rows,
                self.cols
            )));
        }
        let bs = self.ty.block_size() as usize;
        let ts = self.ty.type_size() as usize;
        let bytes = &self.bytes[row * self.row_bytes..(row + 1) * self.row_bytes];
        for (b, o) in bytes.chunks_exact(ts).zip(out.chunks_exact_mut(bs)) {
            block_weights(self.ty, b, o)?;
        }
        Ok(())
    }

    /// The weights of block column `block` (columns `block·bs..(block+1)·bs`,
    /// `bs` the format's block size) of every row, row-major into `out`
    /// (`rows·bs` values), as exact integers `2^24·w`. Reads one block per row.
    pub fn block_column_weights(&self, block: usize, out: &mut [i64]) -> Result<()> {
        let bs = self.ty.block_size() as usize;
        let ts = self.ty.type_size() as usize;
        if block >= self.cols / bs || out.len() != self.rows * bs {
            return Err(Error::InvalidArgument(format!(
                "block column {block} into {} values: expected a block below {} and {} values",
                out.len(),
                self.cols / bs,
                self.rows * bs
            )));
        }
        for (r, o) in out.chunks_exact_mut(bs).enumerate() {
            let at = r * self.row_bytes + block * ts;
            block_weights(self.ty, &self.bytes[at..at + ts], o)?;
        }
        Ok(())
    }

    /// Per-column weight bounds `c_j = max_r |2^24·w[r][j]|`, the input of
    /// [`super::FixedPoint::choose`]. Streams the matrix once.
    pub fn column_bounds(&self) -> Result<Vec<u64>> {
        let mut bounds = vec![0u64; self.cols];
        let mut w = vec![0i64; self.cols];
        for r in 0..self.rows {
            self.row_weights(r, &mut w)?;
            for (b, v) in bounds.iter_mut().zip(&w) {
                *b = (*b).max(v.unsigned_abs());
            }
        }
        Ok(bounds)
    }

    /// `Y = W·X` in `Z_2^64` for `n = x.len() / cols` tokens (row-major): returns
    /// `n·rows` values, row-major by token. No floating point. Uses the SIMD
    /// kernel where there is one ([`simd_available`]) and splits large
    /// products across threads.
    pub fn mul(&self, x: &[u64]) -> Result<Vec<u64>> {
        // `available_parallelism` reads cgroup files on Linux: once per process.
        static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let threads = *THREADS
            .get_or_init(|| std::thread::available_parallelism().map_or(1, |t| t.get().min(8)));
        self.mul_impl(x, false, threads)
    }

    /// [`Matrix::mul`] with at most `threads` threads computing at once (the
    /// caller waits while they do): a node's compute threads, so a helper
    /// never runs more threads than it was given.
    pub fn mul_threads(&self, x: &[u64], threads: usize) -> Result<Vec<u64>> {
        self.mul_impl(x, false, threads.max(1))
    }

    /// [`Matrix::mul`] with the portable scalar kernel on the calling thread
    /// only: the reference the SIMD kernels are tested (and benchmarked) against.
    pub fn mul_scalar(&self, x: &[u64]) -> Result<Vec<u64>> {
        self.mul_impl(x, true, 1)
    }

    fn mul_impl(&self, x: &[u64], scalar: bool, threads: usize) -> Result<Vec<u64>> {
        if x.is_empty() || !x.len().is_multiple_of(self.cols) {
            return Err(Error::InvalidArgument(format!(
                "input: expected a whole, non-zero number of tokens of {} values, found {}",
                self.cols,
                x.len()
            )));
        }
        let n = x.len() / self.cols;
        let work = self.rows.saturating_mul(self.cols).saturating_mul(n);
        // Rows in [start, end), stored row-major by row: out[(r - start)·n + t].
        let by_row = if scalar {
            self.mul_rows_scalar(0, self.rows, x, n)?
        } else if threads > 1 && work >= PARALLEL_WORK && self.rows >= threads {
            let chunk = self.rows.div_ceil(threads);
            std::thread::scope(|scope| {
                let handles: Vec<_> = (0..self.rows)
                    .step_by(chunk)
                    .map(|start| {
                        let end = (start + chunk).min(self.rows);
                        scope.spawn(move || self.mul_rows(start, end, x, n))
                    })
                    .collect();
                let mut all = Vec::with_capacity(self.rows * n);
                for h in handles {
                    match h.join() {
                        Ok(part) => all.extend(part?),
                        Err(p) => std::panic::resume_unwind(p),
                    }
                }
                Ok::<_, Error>(all)
            })?
        } else {
            self.mul_rows(0, self.rows, x, n)?
        };
        let mut y = vec![0u64; n * self.rows];
        for (r, per_token) in by_row.chunks_exact(n).enumerate() {
            for (t, v) in per_token.iter().enumerate() {
                y[t * self.rows + r] = *v;
            }
        }
        Ok(y)
    }

    fn mul_rows(&self, start: usize, end: usize, x: &[u64], n: usize) -> Result<Vec<u64>> {
        #[cfg(target_arch = "x86_64")]
        if matches!(self.ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) && simd_available() {
            let prepared: Vec<avx2::Prepared> =
                x.chunks_exact(self.cols).map(avx2::prepare).collect();
            let mut out = vec![0u64; (end - start) * n];
            let row = |r: usize| &self.bytes[r * self.row_bytes..(r + 1) * self.row_bytes];
            // Two rows at a time share the input loads; `out` is by row, then token.
            let mut r = start;
            while r < end {
                for (t, p) in prepared.iter().enumerate() {
                    // SAFETY: AVX2 is available (checked above).
                    let ok = if r + 1 < end {
                        unsafe { avx2::rows_dot(self.ty, [row(r), row(r + 1)], p) }.map(|[a, b]| {
                            out[(r - start) * n + t] = a;
                            out[(r + 1 - start) * n + t] = b;
                        })
                    } else {
                        unsafe { avx2::rows_dot(self.ty, [row(r)], p) }
                            .map(|[a]| out[(r - start) * n + t] = a)
                    };
                    if ok.is_none() {
                        // A non-finite scale: the scalar kernel reports it.
                        return self.mul_rows_scalar(start, end, x, n);
                    }
                }
                r += 2;
            }
            return Ok(out);
        }
        self.mul_rows_scalar(start, end, x, n)
    }

    fn mul_rows_scalar(&self, start: usize, end: usize, x: &[u64], n: usize) -> Result<Vec<u64>> {
        let mut out = Vec::with_capacity((end - start) * n);
        if matches!(self.ty, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
            for r in start..end {
                let row = &self.bytes[r * self.row_bytes..(r + 1) * self.row_bytes];
                for token in x.chunks_exact(self.cols) {
                    out.push(block_dot(self.ty, row, token)?);
                }
            }
            return Ok(out);
        }
        let mut w = vec![0i64; self.cols];
        for r in start..end {
            self.row_weights(r, &mut w)?;
            for token in x.chunks_exact(self.cols) {
                let acc = w.iter().zip(token).fold(0u64, |acc, (a, b)| {
                    acc.wrapping_add((*a as u64).wrapping_mul(*b))
                });
                out.push(acc);
            }
        }
        Ok(out)
    }
}

/// Whether [`Matrix::mul`] uses its SIMD kernel (AVX2 on x86_64, for Q8_0,
/// Q4_0 and Q4_1); elsewhere, and for the other formats, it runs the scalar one.
pub fn simd_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The AVX2 kernel for blocks of 32 with one fp16 scale (see the module docs).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::mem::size_of;

    use crate::engine::blocks::{half, BlockQ4_0, BlockQ4_1, BlockQ8_0, Q4_0_QS, Q4_1_QS, Q8_0_QS};
    use crate::gguf::GgmlType;

    /// One token's input in the kernel's layout. Per block of 32 the weights
    /// are taken as four groups of eight (even and odd positions of each
    /// half, the order `vpmaddwd` produces them in; see [`weight_of`]):
    /// `lo` holds per group the eight `X_j` (the kernel reads their low 32
    /// bits as signed), lanes 0, 2, 4, 6 then 1, 3, 5, 7; `hi` the eight
    /// `(X_j - lo_j) >> 32` as 32-bit values; `sums` each block's `Σ X_j`.
    pub(super) struct Prepared {
        lo: Vec<u64>,
        hi: Vec<u32>,
        sums: Vec<u64>,
    }

    /// Position in its block of the weight that feeds 32-bit lane `l` of group `g`.
    fn weight_of(g: usize, l: usize) -> usize {
        16 * (g / 2) + g % 2 + 2 * l
    }

    /// `x` is one token, a whole number of blocks of 32.
    pub(super) fn prepare(x: &[u64]) -> Prepared {
        let nb = x.len() / 32;
        let mut p = Prepared {
            lo: vec![0; 32 * nb],
            hi: vec![0; 32 * nb],
            sums: vec![0; nb],
        };
        for (b, xb) in x.chunks_exact(32).enumerate() {
            p.sums[b] = xb.iter().fold(0u64, |a, v| a.wrapping_add(*v));
            for g in 0..4 {
                for l in 0..8 {
                    let v = xb[weight_of(g, l)];
                    let slot = if l % 2 == 0 { l / 2 } else { 4 + l / 2 };
                    p.lo[32 * b + 8 * g + slot] = v;
                    let low = v as u32 as i32 as i64 as u64;
                    p.hi[32 * b + 8 * g + l] = (v.wrapping_sub(low) >> 32) as u32;
                }
            }
        }
        p
    }

    /// `Σ_j 2^24·w_j·X_j mod 2^64` over `R` rows (1 or 2) of Q8_0, Q4_0 or
    /// Q4_1 blocks (`rows[i]`, `R` used), or `None` if a scale or min is not
    /// finite (or the type is another).
    ///
    /// # Safety
    /// The CPU supports AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn rows_dot<const R: usize>(
        ty: GgmlType,
        rows: [&[u8]; R],
        p: &Prepared,
    ) -> Option<[u64; R]> {
        // SAFETY: the caller upholds this function's safety contract (its
        // `# Safety` section or the documented invariants it is called under).
        unsafe {
            match ty {
                GgmlType::Q8_0 => rows_dot_k::<0, R>(rows, p),
                GgmlType::Q4_0 => rows_dot_k::<1, R>(rows, p),
                GgmlType::Q4_1 => rows_dot_k::<2, R>(rows, p),
                _ => None,
            }
        }
    }

    /// `2^24·h` of a finite fp16 `h` as `(±mant, sh)` with `|mant| < 2^11`,
    /// `2^24·h = mant·2^sh`; `None` for infinities and NaNs.
    #[inline]
    fn half_parts(bits: u16) -> Option<(i32, u32)> {
        let exp = u32::from((bits >> 10) & 0x1f);
        let frac = i32::from(bits & 0x3ff);
        let (mant, sh) = match exp {
            0 => (frac, 0),
            31 => return None,
            _ => (1024 + frac, exp - 1),
        };
        Some((if bits >> 15 == 1 { -mant } else { mant }, sh))
    }

    /// One block, decoded: `±mant·q` for the four groups, the shift `sh` as a
    /// count vector, and the coefficient of the block's `Σ X_j`.
    struct Block {
        w: [__m256i; 4],
        count: __m128i,
        offset: u64,
    }

    /// `K`: 0 = Q8_0, 1 = Q4_0, 2 = Q4_1; `blk` points at a whole block.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn decode_block<const K: u8>(blk: *const u8) -> Option<Block> {
        // SAFETY: the caller upholds this function's safety contract (its
        // `# Safety` section or the documented invariants it is called under).
        unsafe {
            let (mant, sh) = half_parts(u16::from_le_bytes([*blk, *blk.add(1)]))?;
            // The block's 32 quants as two vectors of 16 i16 (weights 0..16, 16..32).
            let (q0, q1) = if K == 0 {
                (
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(Q8_0_QS).cast())),
                    _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(Q8_0_QS + 16).cast())),
                )
            } else {
                let nibbles = _mm_set1_epi8(0x0f);
                let v = _mm_loadu_si128(blk.add(if K == 1 { Q4_0_QS } else { Q4_1_QS }).cast());
                (
                    _mm256_cvtepu8_epi16(_mm_and_si128(v, nibbles)),
                    _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), nibbles)),
                )
            };
            // ±mant·q as i32 (|.| < 2^18), even and odd positions of each half.
            let even = _mm256_set1_epi32(i32::from(mant as i16 as u16));
            let odd = _mm256_set1_epi32(i32::from(mant as i16 as u16) << 16);
            let offset = match K {
                // Σ D·(q - 8): the -8·D·ΣX term.
                1 => (-8 * (i64::from(mant) << sh)) as u64,
                2 => {
                    let m = (*blk.cast::<BlockQ4_1>()).m;
                    let (m, msh) = half_parts(half(m))?;
                    (i64::from(m) << msh) as u64
                }
                _ => 0,
            };
            Some(Block {
                w: [
                    _mm256_madd_epi16(q0, even),
                    _mm256_madd_epi16(q0, odd),
                    _mm256_madd_epi16(q1, even),
                    _mm256_madd_epi16(q1, odd),
                ],
                count: _mm_cvtsi32_si128(sh as i32),
                offset,
            })
        }
    }

    #[target_feature(enable = "avx2")]
    unsafe fn rows_dot_k<const K: u8, const R: usize>(
        rows: [&[u8]; R],
        p: &Prepared,
    ) -> Option<[u64; R]> {
        // SAFETY: the caller upholds this function's safety contract (its
        // `# Safety` section or the documented invariants it is called under).
        unsafe {
            let ts = [
                size_of::<BlockQ8_0>(),
                size_of::<BlockQ4_0>(),
                size_of::<BlockQ4_1>(),
            ][K as usize];
            let nb = p.sums.len();
            assert!(p.lo.len() == 32 * nb && p.hi.len() == 32 * nb);
            assert!(rows.iter().all(|r| r.len() == nb * ts));
            let zero = _mm256_setzero_si256();
            let mut acc_lo = [zero; R];
            let mut acc_hi = [zero; R];
            let mut extra = [0u64; R];
            for b in 0..nb {
                let mut blocks = [const { None }; R];
                for (i, row) in rows.iter().enumerate() {
                    blocks[i] = Some(decode_block::<K>(row.as_ptr().add(b * ts))?);
                }
                let lo = p.lo.as_ptr().add(32 * b).cast::<__m256i>();
                let hi = p.hi.as_ptr().add(32 * b).cast::<__m256i>();
                let mut blo = [zero; R];
                let mut bhi = [zero; R];
                for g in 0..4 {
                    let (x_even, x_odd) = (
                        _mm256_loadu_si256(lo.add(2 * g)),
                        _mm256_loadu_si256(lo.add(2 * g + 1)),
                    );
                    let x_hi = _mm256_loadu_si256(hi.add(g));
                    for i in 0..R {
                        let wg = blocks[i].as_ref().unwrap_unchecked().w[g];
                        // lo_j·mant·q_j exactly (|.| < 2^49): lanes 0, 2, 4, 6 then 1, 3, 5, 7.
                        blo[i] = _mm256_add_epi64(blo[i], _mm256_mul_epi32(x_even, wg));
                        blo[i] = _mm256_add_epi64(
                            blo[i],
                            _mm256_mul_epi32(x_odd, _mm256_srli_epi64(wg, 32)),
                        );
                        // hi_j·mant·q_j mod 2^32.
                        bhi[i] = _mm256_add_epi32(bhi[i], _mm256_mullo_epi32(x_hi, wg));
                    }
                }
                for i in 0..R {
                    let blk = blocks[i].as_ref().unwrap_unchecked();
                    acc_lo[i] = _mm256_add_epi64(acc_lo[i], _mm256_sll_epi64(blo[i], blk.count));
                    acc_hi[i] = _mm256_add_epi32(acc_hi[i], _mm256_sll_epi32(bhi[i], blk.count));
                    extra[i] = extra[i].wrapping_add(blk.offset.wrapping_mul(p.sums[b]));
                }
            }
            let mut out = [0u64; R];
            for i in 0..R {
                let mut l = [0u64; 4];
                let mut h = [0u32; 8];
                _mm256_storeu_si256(l.as_mut_ptr().cast(), acc_lo[i]);
                _mm256_storeu_si256(h.as_mut_ptr().cast(), acc_hi[i]);
                let lo = l.iter().fold(0u64, |a, v| a.wrapping_add(*v));
                let hi = h.iter().fold(0u32, |a, v| a.wrapping_add(*v));
                out[i] = lo.wrapping_add(u64::from(hi) << 32).wrapping_add(extra[i]);
            }
            Some(out)
        }
    }
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod measure;
