//! The tiled Q4_1 x Q8_1 kernel as a template: `tiled_kernel!` defines a
//! module holding the whole kernel (ggml's horizontal sums, the tiles of
//! weight rows x tokens in ggml's operation order and in exact accumulation,
//! and the row-range drivers `gemm` and `gemm_exact`), compiled for one set of
//! target features with one integer dot product. The parent instantiates it
//! once per variant (`avx2`, `avx512`), so each generated module sits beside
//! `Act` and the block constants it imports from there.

/// Defines module `$m`: the tiled kernel compiled for `$features`, with `$dot` as
/// the integer dot product of 32 u8 (weights) x 32 i8 (activations) in 8 i32 lanes.
#[cfg(target_arch = "x86_64")]
macro_rules! tiled_kernel {
    ($m:ident, $features:literal, |$qx:ident, $qy:ident| $dot:block) => {
        mod $m {
            use std::arch::x86_64::*;

            use super::{Act, COL_BLOCK, D_REPEAT, Q4_1_QS, Q8_1_QS, W_BLOCK, Y_BLOCK};

            /// ggml's `hsum_float_8`, same operation order.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn hsum(x: __m256) -> f32 {
                let mut res = _mm256_extractf128_ps(x, 1);
                res = _mm_add_ps(res, _mm256_castps256_ps128(x));
                res = _mm_add_ps(res, _mm_movehl_ps(res, res));
                res = _mm_add_ss(res, _mm_movehdup_ps(res));
                _mm_cvtss_f32(res)
            }

            /// u8 x i8 products summed in fours, as 8 i32 lanes.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn idot($qx: __m256i, $qy: __m256i) -> __m256i $dot

            /// ggml's `mul_sum_us8_pairs_float`: u8 x i8 products summed in fours, as floats.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn dot(qx: __m256i, qy: __m256i) -> __m256 { unsafe {
                _mm256_cvtepi32_ps(idot(qx, qy))
            }}

            /// Sum of 4 f64 lanes.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn hsum_pd(x: __m256d) -> f64 {
                let s = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));
                _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
            }

            /// Exact-accumulation outputs of `R` weight rows x `C` tokens: per block,
            /// `d_w·d_x` (exact in f32: two 11-bit significands) times the integer
            /// dot (folded to 4 i32 lanes, each below 2^14) accumulated in f64 with
            /// FMA (each product exact), plus `m_w · (d_x·Σq)` (exact in f64) in a
            /// scalar f64 sum; rounded once to f32. Every output runs the same
            /// operations whatever `R`, `C` or the thread split, so the result does
            /// not depend on batching or threads.
            #[allow(clippy::needless_range_loop)]
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_exact<const R: usize, const C: usize>(
                w: *const u8,
                w_stride: usize,
                a: &Act,
                c0: usize,
                out: *mut f32,
                rows: usize,
                r0: usize,
            ) { unsafe {
                let mut acc = [[_mm256_setzero_pd(); C]; R];
                // The min terms: 4 tokens in one f64 vector per row when C == 4,
                // else scalars (mw·sx is exact, so fma and mul + add agree).
                let mut summs4 = [_mm256_setzero_pd(); R];
                let mut summs = [[0f64; C]; R];
                let low = _mm256_set1_epi8(0x0f);
                let y_stride = a.nb * Y_BLOCK;
                for b in 0..a.nb {
                    let mut qx = [_mm256_setzero_si256(); R];
                    let mut dw = [_mm_setzero_ps(); R];
                    let mut mw = [_mm256_setzero_pd(); R];
                    for r in 0..R {
                        let blk = w.add(r * w_stride + b * W_BLOCK);
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(blk.cast::<i32>().read_unaligned()));
                        dw[r] = _mm_broadcastss_ps(dm);
                        mw[r] = _mm256_cvtps_pd(_mm_permute_ps(dm, 0x55));
                        let tmp = _mm_loadu_si128(blk.add(Q4_1_QS).cast());
                        qx[r] = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp));
                    }
                    let d_row = a.d.add((b * a.n + c0) * D_REPEAT);
                    let s_row = a.s.add(b * a.n + c0);
                    if C == 4 {
                        let s4 = _mm256_cvtps_pd(_mm_loadu_ps(s_row));
                        for r in 0..R {
                            summs4[r] = _mm256_fmadd_pd(mw[r], s4, summs4[r]);
                        }
                    } else {
                        for r in 0..R {
                            let m = _mm256_cvtsd_f64(mw[r]);
                            for c in 0..C {
                                summs[r][c] += m * f64::from(*s_row.add(c));
                            }
                        }
                    }
                    for c in 0..C {
                        let y = a.q.add((c0 + c) * y_stride + b * Y_BLOCK);
                        let qy = _mm256_loadu_si256(y.add(Q8_1_QS).cast());
                        let dx = _mm_loadu_ps(d_row.add(c * D_REPEAT));
                        for r in 0..R {
                            let i8l = idot(qx[r], qy);
                            let i4 = _mm_add_epi32(
                                _mm256_castsi256_si128(i8l),
                                _mm256_extracti128_si256(i8l, 1),
                            );
                            // d_w·d_x is exact in f32.
                            let dd = _mm256_cvtps_pd(_mm_mul_ps(dw[r], dx));
                            acc[r][c] = _mm256_fmadd_pd(dd, _mm256_cvtepi32_pd(i4), acc[r][c]);
                        }
                    }
                }
                for r in 0..R {
                    if C == 4 {
                        let mut s = [0f64; 4];
                        _mm256_storeu_pd(s.as_mut_ptr(), summs4[r]);
                        summs[r].copy_from_slice(&s[..C]);
                    }
                    for c in 0..C {
                        *out.add((c0 + c) * rows + r0 + r) =
                            (hsum_pd(acc[r][c]) + summs[r][c]) as f32;
                    }
                }
            }}

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_row_exact<const R: usize>(
                w: *const u8,
                w_stride: usize,
                a: &Act,
                cols: std::ops::Range<usize>,
                out: *mut f32,
                rows: usize,
                r0: usize,
            ) { unsafe {
                let mut c = cols.start;
                while c + 4 <= cols.end {
                    tile_exact::<R, 4>(w, w_stride, a, c, out, rows, r0);
                    c += 4;
                }
                match cols.end - c {
                    3 => tile_exact::<R, 3>(w, w_stride, a, c, out, rows, r0),
                    2 => tile_exact::<R, 2>(w, w_stride, a, c, out, rows, r0),
                    1 => tile_exact::<R, 1>(w, w_stride, a, c, out, rows, r0),
                    _ => {}
                }
            }}

            /// See `super::gemm_rows_with` with `exact`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn gemm_exact(
                w: *const u8,
                w_stride: usize,
                rows: usize,
                a: &Act,
                out: *mut f32,
                r0: usize,
                r1: usize,
            ) { unsafe {
                let mut cb = 0;
                while cb < a.n {
                    let cols = cb..(cb + COL_BLOCK).min(a.n);
                    let mut r = r0;
                    while r + 2 <= r1 {
                        tile_row_exact::<2>(w.add(r * w_stride), w_stride, a, cols.clone(), out, rows, r);
                        r += 2;
                    }
                    if r < r1 {
                        tile_row_exact::<1>(w.add(r * w_stride), w_stride, a, cols.clone(), out, rows, r);
                    }
                    cb = cols.end;
                }
            }}

            /// Outputs of `R` weight rows (from `w`) x `C` tokens (from `c0`).
            // Index loops over the register tile's small fixed-size arrays read best here.
            #[allow(clippy::needless_range_loop)]
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile<const R: usize, const C: usize>(
                w: *const u8,
                w_stride: usize,
                a: &Act,
                c0: usize,
                out: *mut f32,
                rows: usize,
                r0: usize,
            ) { unsafe {
                let mut acc = [[_mm256_setzero_ps(); C]; R];
                let mut summs4 = [_mm_setzero_ps(); R];
                let mut summs = [[0f32; C]; R];
                let low = _mm256_set1_epi8(0x0f);
                let y_stride = a.nb * Y_BLOCK;
                for b in 0..a.nb {
                    let mut qx = [_mm256_setzero_si256(); R];
                    let mut dw = [_mm256_setzero_ps(); R];
                    let mut mw = [_mm_setzero_ps(); R];
                    for r in 0..R {
                        let blk = w.add(r * w_stride + b * W_BLOCK);
                        // d and m (f16) -> lanes 0 and 1, exactly.
                        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(blk.cast::<i32>().read_unaligned()));
                        dw[r] = _mm256_broadcastss_ps(dm);
                        mw[r] = _mm_permute_ps(dm, 0x55);
                        // ggml's bytes_from_nibbles_32.
                        let tmp = _mm_loadu_si128(blk.add(Q4_1_QS).cast());
                        qx[r] = _mm256_and_si256(low, _mm256_set_m128i(_mm_srli_epi16(tmp, 4), tmp));
                    }
                    let d_row = a.d.add((b * a.n + c0) * D_REPEAT);
                    let s_row = a.s.add(b * a.n + c0);
                    if C == 4 {
                        let s4 = _mm_loadu_ps(s_row);
                        for r in 0..R {
                            summs4[r] = _mm_fmadd_ps(mw[r], s4, summs4[r]);
                        }
                    } else {
                        for r in 0..R {
                            let m = _mm_cvtss_f32(mw[r]);
                            for c in 0..C {
                                summs[r][c] = m.mul_add(*s_row.add(c), summs[r][c]);
                            }
                        }
                    }
                    for c in 0..C {
                        let y = a.q.add((c0 + c) * y_stride + b * Y_BLOCK);
                        let qy = _mm256_loadu_si256(y.add(Q8_1_QS).cast());
                        let dy = _mm256_loadu_ps(d_row.add(c * D_REPEAT));
                        for r in 0..R {
                            let xy = dot(qx[r], qy);
                            acc[r][c] = _mm256_fmadd_ps(_mm256_mul_ps(dw[r], dy), xy, acc[r][c]);
                        }
                    }
                }
                for r in 0..R {
                    if C == 4 {
                        let mut s = [0f32; 4];
                        _mm_storeu_ps(s.as_mut_ptr(), summs4[r]);
                        summs[r].copy_from_slice(&s[..C]);
                    }
                    for c in 0..C {
                        *out.add((c0 + c) * rows + r0 + r) = hsum(acc[r][c]) + summs[r][c];
                    }
                }
            }}

            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn tile_row<const R: usize>(
                w: *const u8,
                w_stride: usize,
                a: &Act,
                cols: std::ops::Range<usize>,
                out: *mut f32,
                rows: usize,
                r0: usize,
            ) { unsafe {
                let mut c = cols.start;
                while c + 4 <= cols.end {
                    tile::<R, 4>(w, w_stride, a, c, out, rows, r0);
                    c += 4;
                }
                match cols.end - c {
                    3 => tile::<R, 3>(w, w_stride, a, c, out, rows, r0),
                    2 => tile::<R, 2>(w, w_stride, a, c, out, rows, r0),
                    1 => tile::<R, 1>(w, w_stride, a, c, out, rows, r0),
                    _ => {}
                }
            }}

            /// See `super::gemm_rows`.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn gemm(
                w: *const u8,
                w_stride: usize,
                rows: usize,
                a: &Act,
                out: *mut f32,
                r0: usize,
                r1: usize,
            ) { unsafe {
                let mut cb = 0;
                while cb < a.n {
                    let cols = cb..(cb + COL_BLOCK).min(a.n);
                    let mut r = r0;
                    while r + 2 <= r1 {
                        tile_row::<2>(w.add(r * w_stride), w_stride, a, cols.clone(), out, rows, r);
                        r += 2;
                    }
                    if r < r1 {
                        tile_row::<1>(w.add(r * w_stride), w_stride, a, cols.clone(), out, rows, r);
                    }
                    cb = cols.end;
                }
            }}
        }
    };
}

pub(super) use tiled_kernel;
