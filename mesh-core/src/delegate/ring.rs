//! Arithmetic in the ring `Z_2^64` (wrapping `u64`) and the owner's
//! fixed-point encoding of activations.
//!
//! Weights enter the ring as the exact integers `2^24·w` (see
//! [`super::kernels`]); an activation vector `x` enters as
//! `X_j = round(x_j / s · 2^F)` with a private power-of-two scale `s >= max |x|`
//! and `F` fractional bits chosen so that no honest result row can reach
//! `2^55` in magnitude ([`RESULT_BOUND_LOG2`]). The owner decodes a result row
//! as `y = Y·s / 2^(24 + F)` with `Y` read as a signed 64-bit integer.

use zeroize::Zeroize;

use crate::{Error, Result};

/// Weights are scaled by `2^WEIGHT_FRAC_BITS`: every fp16-based GGUF weight
/// is then an exact integer (the smallest fp16 step is `2^-24`).
pub const WEIGHT_FRAC_BITS: u32 = 24;

/// An honest result row satisfies `|Y| < 2^RESULT_BOUND_LOG2`, by the choice of `F`.
pub const RESULT_BOUND_LOG2: u32 = 55;

/// The owner rejects a result row with `|Y| >= 2^RANGE_CHECK_LOG2` (one bit of
/// slack over [`RESULT_BOUND_LOG2`]; see [`super::verify`] for why).
pub const RANGE_CHECK_LOG2: u32 = 56;

/// Largest number of fractional bits: keeps `|X_j| <= 2^62` since `|x_j / s| <= 1`.
const MAX_FRAC_BITS: i32 = 62;

/// Fewest useful fractional bits; below this the encoding would drop the signal.
const MIN_FRAC_BITS: i32 = 1;

/// Reads a ring element as a two's-complement signed integer.
pub fn to_signed(v: u64) -> i64 {
    v as i64
}

/// Embeds a signed integer into the ring (two's complement).
pub fn from_signed(v: i64) -> u64 {
    v as u64
}

/// `acc[i] += v[i]` in the ring. Panics if the lengths differ (a caller bug).
pub fn add_assign(acc: &mut [u64], v: &[u64]) {
    assert_eq!(acc.len(), v.len(), "ring::add_assign: length mismatch");
    for (a, b) in acc.iter_mut().zip(v) {
        *a = a.wrapping_add(*b);
    }
}

/// `acc[i] -= v[i]` in the ring. Panics if the lengths differ (a caller bug).
pub fn sub_assign(acc: &mut [u64], v: &[u64]) {
    assert_eq!(acc.len(), v.len(), "ring::sub_assign: length mismatch");
    for (a, b) in acc.iter_mut().zip(v) {
        *a = a.wrapping_sub(*b);
    }
}

/// Inner product `Σ a_i·b_i` in the ring. Panics if the lengths differ (a caller bug).
pub fn dot(a: &[u64], b: &[u64]) -> u64 {
    assert_eq!(a.len(), b.len(), "ring::dot: length mismatch");
    a.iter()
        .zip(b)
        .fold(0u64, |acc, (x, y)| acc.wrapping_add(x.wrapping_mul(*y)))
}

/// The owner's private fixed-point parameters for one token's activations:
/// scale `s = 2^scale_log2` and `F` fractional bits. Never leaves the owner;
/// zeroized on drop and deliberately not `Debug`.
pub struct FixedPoint {
    scale_log2: i32,
    frac_bits: i32,
}

impl Drop for FixedPoint {
    fn drop(&mut self) {
        self.scale_log2.zeroize();
        self.frac_bits.zeroize();
    }
}

impl FixedPoint {
    /// Parameters for one token `x` (`cols` values) against a matrix whose
    /// column bounds are `col_bounds[j] = max_r |2^24·w[r][j]|`
    /// ([`super::Matrix::column_bounds`]).
    ///
    /// `s` is the smallest power of two `>= max |x|`; `F` is the largest
    /// number of fractional bits for which the worst row,
    /// `2^F·Σ_j c_j·|x_j/s| + Σ_{x_j != 0} c_j/2` (the second term bounds the
    /// rounding of `X`), stays below `2^55`.
    ///
    /// `x` is `f32` or `f64` (the owner passes the exact `f64` values of
    /// [`super::activations::quantize_like_ggml`]).
    pub fn choose<T: Copy + Into<f64>>(x: &[T], col_bounds: &[u64]) -> Result<FixedPoint> {
        if x.len() != col_bounds.len() {
            return Err(Error::InvalidArgument(format!(
                "activations: expected {} values (one per matrix column), found {}",
                col_bounds.len(),
                x.len()
            )));
        }
        let mut max_abs = 0f64;
        for (j, v) in x.iter().enumerate() {
            let v: f64 = (*v).into();
            if !v.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "activation {j} is {v}: expected a finite value"
                )));
            }
            max_abs = max_abs.max(v.abs());
        }
        let scale_log2 = if max_abs == 0.0 {
            0
        } else {
            // Exact: f32 magnitudes are within f64's exponent range.
            let mut e = max_abs.log2().ceil() as i32;
            while 2f64.powi(e) < max_abs {
                e += 1;
            }
            while 2f64.powi(e - 1) >= max_abs {
                e -= 1;
            }
            e
        };
        let inv_s = 2f64.powi(-scale_log2);
        // S = Σ c_j |x_j/s| and R = Σ_{x_j != 0} c_j / 2, each rounded up: a
        // sum of n non-negative f64 terms is off by at most n·2^-53 relative.
        let mut sum = 0f64;
        let mut rounding = 0f64;
        for (v, c) in x.iter().zip(col_bounds) {
            let v: f64 = (*v).into();
            if v != 0.0 {
                let c = *c as f64;
                sum += c * (v.abs() * inv_s);
                rounding += c / 2.0;
            }
        }
        let slack = 1.0 + (x.len() as f64 + 2.0) * f64::EPSILON;
        let sum = sum * slack;
        let rounding = rounding * slack;
        let limit = 2f64.powi(RESULT_BOUND_LOG2 as i32);
        let mut frac_bits = if sum > 0.0 {
            // SMPC.md's F = 56 - 1 - ceil(log2 S); can still reach 2^55 exactly
            // (S a power of two) plus rounding, so step down until strictly below.
            (RESULT_BOUND_LOG2 as i32 - sum.log2().ceil() as i32).min(MAX_FRAC_BITS)
        } else {
            MAX_FRAC_BITS
        };
        while frac_bits >= MIN_FRAC_BITS && 2f64.powi(frac_bits) * sum + rounding >= limit {
            frac_bits -= 1;
        }
        if frac_bits < MIN_FRAC_BITS {
            return Err(Error::Unsupported(format!(
                "fixed-point encoding: weight bounds (Σ c_j = {:.3e}) leave fewer than \
                 {MIN_FRAC_BITS} fractional bits below 2^{RESULT_BOUND_LOG2}",
                col_bounds.iter().map(|c| *c as f64).sum::<f64>()
            )));
        }
        Ok(FixedPoint {
            scale_log2,
            frac_bits,
        })
    }

    /// Number of fractional bits `F`.
    pub fn frac_bits(&self) -> i32 {
        self.frac_bits
    }

    /// `log2` of the scale `s`.
    pub fn scale_log2(&self) -> i32 {
        self.scale_log2
    }

    /// `X_j = round(x_j / s · 2^F)` as ring elements. `x` must be the vector
    /// the parameters were chosen for (or one bounded by it).
    pub fn encode<T: Copy + Into<f64>>(&self, x: &[T]) -> Vec<u64> {
        let mut out = Vec::with_capacity(x.len());
        self.encode_into(x, &mut out);
        out
    }

    /// [`FixedPoint::encode`], appending to `out`.
    pub fn encode_into<T: Copy + Into<f64>>(&self, x: &[T], out: &mut Vec<u64>) {
        let k = 2f64.powi(self.frac_bits - self.scale_log2);
        // x_j·2^(F - log2 s) is exact in f64 (for an f32 x_j, and for an f64
        // one unless it has more significant bits than fit above 2^-F·s) and
        // at most 2^62 in magnitude.
        out.extend(
            x.iter()
                .map(|v| from_signed(((*v).into() * k).round() as i64)),
        );
    }

    /// `y = Y·s / 2^(24 + F)` for each ring element `Y` read as signed.
    pub fn decode(&self, y: &[u64]) -> Vec<f64> {
        let k = 2f64.powi(self.scale_log2 - WEIGHT_FRAC_BITS as i32 - self.frac_bits);
        y.iter().map(|v| to_signed(*v) as f64 * k).collect()
    }
}

/// Encodes `n = x.len() / cols` tokens (row-major, `cols = col_bounds.len()`),
/// each with its own [`FixedPoint`]. Returns the ring vector and the parameters.
pub fn encode_batch<T: Copy + Into<f64>>(
    x: &[T],
    col_bounds: &[u64],
) -> Result<(Vec<u64>, Vec<FixedPoint>)> {
    let cols = col_bounds.len();
    if cols == 0 || !x.len().is_multiple_of(cols) {
        return Err(Error::InvalidArgument(format!(
            "activations: expected a whole number of tokens of {cols} values, found {}",
            x.len()
        )));
    }
    let mut out = Vec::with_capacity(x.len());
    let mut params = Vec::with_capacity(x.len() / cols);
    for token in x.chunks_exact(cols) {
        let fp = FixedPoint::choose(token, col_bounds)?;
        fp.encode_into(token, &mut out);
        params.push(fp);
    }
    Ok((out, params))
}

/// Decodes a result of `params.len()` tokens of `rows` ring elements each.
pub fn decode_batch(y: &[u64], rows: usize, params: &[FixedPoint]) -> Result<Vec<f64>> {
    if Some(y.len()) != rows.checked_mul(params.len()) {
        return Err(Error::InvalidArgument(format!(
            "result: expected {} tokens of {rows} values, found {} values",
            params.len(),
            y.len()
        )));
    }
    let mut out = Vec::with_capacity(y.len());
    for (fp, token) in params.iter().zip(y.chunks_exact(rows.max(1))) {
        out.extend(fp.decode(token));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn col_bounds(w: &[i64], cols: usize) -> Vec<u64> {
        let mut c = vec![0u64; cols];
        for row in w.chunks_exact(cols) {
            for (b, v) in c.iter_mut().zip(row) {
                *b = (*b).max(v.unsigned_abs());
            }
        }
        c
    }

    /// Exact `Σ_j W[r][j]·X_j` over the integers.
    fn exact(w: &[i64], cols: usize, x: &[u64]) -> Vec<i128> {
        w.chunks_exact(cols)
            .map(|row| {
                row.iter()
                    .zip(x)
                    .map(|(a, b)| i128::from(*a) * i128::from(to_signed(*b)))
                    .sum()
            })
            .collect()
    }

    #[test]
    fn smpc_md_formula_alone_reaches_the_bound_this_one_does_not() {
        // Every weight 1.0 (2^24), every x = 1.0, 64 columns: S = 2^30 exactly.
        // F = 55 - ceil(log2 S) = 25 gives Y = 64·2^24·2^25 = 2^55 (on the
        // bound); the chosen F keeps the row strictly below it.
        let cols = 64;
        let w = vec![1i64 << 24; cols];
        let x = vec![1.0f32; cols];
        let fp = FixedPoint::choose(&x, &col_bounds(&w, cols)).unwrap();
        assert_eq!(fp.frac_bits(), 24);
        let y = exact(&w, cols, &fp.encode(&x))[0];
        assert!(y.abs() < 1i128 << RESULT_BOUND_LOG2, "{y}");
        assert_eq!(fp.decode(&[y as i64 as u64]), vec![64.0]);
    }

    #[test]
    fn zero_and_bad_inputs() {
        let fp = FixedPoint::choose(&[0.0; 4], &[1 << 30; 4]).unwrap();
        assert_eq!(fp.encode(&[0.0; 4]), vec![0; 4]);
        assert!(FixedPoint::choose(&[f32::NAN], &[1]).is_err());
        assert!(FixedPoint::choose(&[1.0, 2.0], &[1]).is_err());
        // Weights so large that no fractional bit is left.
        assert!(FixedPoint::choose(&[1.0; 4], &[1 << 62; 4]).is_err());
        assert!(encode_batch(&[1.0; 3], &[1, 1]).is_err());
    }

    fn activation() -> impl Strategy<Value = f32> {
        prop_oneof![
            Just(0.0f32),
            (-1.0f32..1.0),
            // Exact powers of two and their negatives hit the bound's edge.
            (-20i32..20, any::<bool>()).prop_map(|(e, neg)| {
                let v = 2f32.powi(e);
                if neg {
                    -v
                } else {
                    v
                }
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// decode(exact integer matmul of encode(x)) equals the f64 reference up to
        /// the rounding of x, no row reaches 2^55, and wrapping u64 arithmetic
        /// gives the same integers.
        #[test]
        fn encode_matmul_decode_is_within_rounding(
            rows in 1usize..6,
            cols in 1usize..48,
            wbits in 0u32..45,
            seed in any::<u64>(),
            xs in proptest::collection::vec(activation(), 48),
            xscale in -30i32..30,
            same_sign in any::<bool>(),
        ) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let x: Vec<f32> = xs[..cols].iter().map(|v| v * 2f32.powi(xscale)).collect();
            let w: Vec<i64> = (0..rows * cols)
                .map(|i| {
                    let m = (1i64 << wbits) as u64;
                    let v = if same_sign { m as i64 } else { (rng.gen::<u64>() % (2 * m + 1)) as i64 - m as i64 };
                    // Same sign as x makes every row the worst case.
                    if same_sign && x[i % cols] < 0.0 { -v } else { v }
                })
                .collect();
            let c = col_bounds(&w, cols);
            let fp = FixedPoint::choose(&x, &c).unwrap();
            let xe = fp.encode(&x);
            let y = exact(&w, cols, &xe);
            let yu: Vec<u64> = y.iter().map(|v| *v as i64 as u64).collect();
            for (r, row) in w.chunks_exact(cols).enumerate() {
                prop_assert!(y[r].abs() < 1i128 << RESULT_BOUND_LOG2, "row {r}: {}", y[r]);
                let wu: Vec<u64> = row.iter().map(|v| from_signed(*v)).collect();
                prop_assert_eq!(dot(&wu, &xe), yu[r]);
            }
            let dec = fp.decode(&yu);
            let s = 2f64.powi(fp.scale_log2());
            for (r, row) in w.chunks_exact(cols).enumerate() {
                let wf = |v: i64| v as f64 / 2f64.powi(24);
                let reference: f64 = row.iter().zip(&x).map(|(a, b)| wf(*a) * f64::from(*b)).sum();
                let abs_w: f64 = row.iter().map(|a| wf(*a).abs()).sum();
                let abs_wx: f64 = row.iter().zip(&x).map(|(a, b)| (wf(*a) * f64::from(*b)).abs()).sum();
                let bound = s * 2f64.powi(-fp.frac_bits() - 1) * abs_w * (1.0 + 1e-12)
                    + 1e-13 * (abs_wx + s * abs_w) + f64::MIN_POSITIVE;
                prop_assert!((dec[r] - reference).abs() <= bound,
                    "row {r}: decoded {} reference {reference} bound {bound}", dec[r]);
            }
        }

        /// Ring helpers agree with i128 arithmetic mod 2^64.
        #[test]
        fn ring_helpers(a in proptest::collection::vec(any::<u64>(), 0..32), seed in any::<u64>()) {
            let b: Vec<u64> = a.iter().map(|v| v.rotate_left(17) ^ seed).collect();
            let mut s = a.clone();
            add_assign(&mut s, &b);
            sub_assign(&mut s, &b);
            prop_assert_eq!(&s, &a);
            let want = a.iter().zip(&b).fold(0u128, |acc, (x, y)| {
                (acc + u128::from(*x) * u128::from(*y)) % (1u128 << 64)
            });
            prop_assert_eq!(u128::from(dot(&a, &b)), want);
        }
    }
}
