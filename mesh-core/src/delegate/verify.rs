//! Integrity of a delegated product: Freivalds check vectors plus a range check.
//!
//! Per matrix `W` the owner keeps `k =` [`CHECK_VECTORS`] secret uniform
//! vectors `r_t` in `Z_2^64^rows` and `v_t = r_t^T·W`. A claimed result `Y` of
//! input `X` passes if `r_t·Y == v_t·X (mod 2^64)` for every `t` and every row
//! satisfies `|Y_row| < 2^56` read as signed.
//!
//! Why both: let `E = Y - W·X != 0` be the error. If some entry of `E` has
//! 2-adic valuation `v` (it is `2^v·odd`) and no entry has a smaller one, then
//! `r_t·E` is uniform over the multiples of `2^v` in `Z_2^64`, so each `r_t`
//! misses `E` with probability `2^-(64 - v)`, all five with `2^-5(64 - v)`.
//! That is `<= 2^-40` only for `v <= 56`: over a ring (unlike a field),
//! Freivalds is weak against errors confined to the high bits (an error of
//! `2^63` slips past each `r_t` with probability 1/2). Those are exactly the
//! errors the range check catches deterministically: an honest row has
//! `|Y| < 2^55` ([`super::ring::RESULT_BOUND_LOG2`]), and adding a non-zero
//! multiple of `2^57` to it gives a signed value of magnitude at least
//! `2^57 - 2^55 > 2^56`. So every error is caught with probability `>= 1 - 2^-40`.

use std::fmt;

use rand::{CryptoRng, RngCore};
use zeroize::Zeroize;

use super::kernels::Matrix;
use super::ring::{self, RANGE_CHECK_LOG2};
use crate::Result;

/// Number of Freivalds vectors per matrix (`k` in `SMPC.md`).
pub const CHECK_VECTORS: usize = 5;

/// Why a claimed result was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckFailure {
    /// Input or result length does not fit the matrix.
    Shape {
        /// What was expected, e.g. "a multiple of 576 input values".
        expected: String,
        /// What was found.
        found: String,
    },
    /// A result row is out of the honest range `|Y| < 2^56`.
    Range {
        /// Token index within the batch.
        token: usize,
        /// Row index within the token's result.
        row: usize,
        /// The offending value, read as signed.
        value: i64,
    },
    /// `r_t·Y != v_t·X` for a check vector.
    Freivalds {
        /// Token index within the batch.
        token: usize,
        /// Index `t` of the failing check vector.
        vector: usize,
    },
}

impl fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckFailure::Shape { expected, found } => {
                write!(f, "result shape: expected {expected}, found {found}")
            }
            CheckFailure::Range { token, row, value } => write!(
                f,
                "token {token} row {row}: expected |Y| < 2^{RANGE_CHECK_LOG2}, found {value}"
            ),
            CheckFailure::Freivalds { token, vector } => write!(
                f,
                "token {token}: Freivalds check vector {vector} does not match the result"
            ),
        }
    }
}

impl std::error::Error for CheckFailure {}

/// The owner's secret check vectors for one matrix. Zeroized on drop and
/// deliberately not `Debug`.
pub struct Checker {
    rows: usize,
    cols: usize,
    /// `r_t`, `CHECK_VECTORS·rows` values.
    r: Vec<u64>,
    /// `v_t = r_t^T·W`, `CHECK_VECTORS·cols` values.
    v: Vec<u64>,
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.r.zeroize();
        self.v.zeroize();
    }
}

impl Checker {
    /// Draws the `r_t` from `rng` and computes `v_t = r_t^T·W` by streaming
    /// the matrix once (through the kernels' exact integer weights).
    pub fn new<R: RngCore + CryptoRng>(m: &Matrix<'_>, rng: &mut R) -> Result<Checker> {
        let (rows, cols) = (m.rows(), m.cols());
        let r: Vec<u64> = (0..CHECK_VECTORS * rows).map(|_| rng.next_u64()).collect();
        let mut v = vec![0u64; CHECK_VECTORS * cols];
        let mut w = vec![0i64; cols];
        for row in 0..rows {
            m.row_weights(row, &mut w)?;
            for t in 0..CHECK_VECTORS {
                let rt = r[t * rows + row];
                for (acc, wj) in v[t * cols..(t + 1) * cols].iter_mut().zip(&w) {
                    *acc = acc.wrapping_add(rt.wrapping_mul(ring::from_signed(*wj)));
                }
            }
        }
        Ok(Checker { rows, cols, r, v })
    }

    /// Accepts `y` as `W·x` (both row-major by token, `x` of `cols` and `y` of
    /// `rows` values per token) or says which check failed where.
    pub fn check(&self, x: &[u64], y: &[u64]) -> Result<(), CheckFailure> {
        let n = x.len() / self.cols;
        if x.is_empty() || x.len() % self.cols != 0 || Some(y.len()) != n.checked_mul(self.rows) {
            return Err(CheckFailure::Shape {
                expected: format!(
                    "a non-zero multiple of {} input values and {} result values per token",
                    self.cols, self.rows
                ),
                found: format!("{} input and {} result values", x.len(), y.len()),
            });
        }
        let bound = 1u64 << RANGE_CHECK_LOG2;
        for (token, (xt, yt)) in x
            .chunks_exact(self.cols)
            .zip(y.chunks_exact(self.rows))
            .enumerate()
        {
            for (row, value) in yt.iter().enumerate() {
                let value = ring::to_signed(*value);
                if value.unsigned_abs() >= bound {
                    return Err(CheckFailure::Range { token, row, value });
                }
            }
            for vector in 0..CHECK_VECTORS {
                let r = &self.r[vector * self.rows..(vector + 1) * self.rows];
                let v = &self.v[vector * self.cols..(vector + 1) * self.cols];
                if ring::dot(r, yt) != ring::dot(v, xt) {
                    return Err(CheckFailure::Freivalds { token, vector });
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegate::ring::encode_batch;
    use crate::gguf::GgmlType;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha20Rng;

    const TRIALS: usize = 10_000;

    #[derive(Clone, Copy, Debug)]
    enum Attack {
        FlipBit,
        SmallError,
        MultipleOfPowerOfTwo,
        Stale,
        SwapRows,
    }

    /// A realistic small matrix (Q8_0, 16x64) and honest encoded inputs.
    struct Setup {
        bytes: Vec<u8>,
        bounds: Vec<u64>,
    }

    const ROWS: usize = 16;
    const COLS: usize = 64;

    fn setup() -> Setup {
        let mut rng = ChaCha20Rng::seed_from_u64(5);
        let values: Vec<f32> = (0..ROWS * COLS)
            .map(|_| rng.gen_range(-0.2f32..0.2))
            .collect();
        let bytes = crate::engine::quantize(GgmlType::Q8_0, &values, COLS).unwrap();
        let bounds = Matrix::new(GgmlType::Q8_0, ROWS, COLS, &bytes)
            .unwrap()
            .column_bounds()
            .unwrap();
        Setup { bytes, bounds }
    }

    fn random_input(s: &Setup, n: usize, rng: &mut ChaCha20Rng) -> Vec<u64> {
        let x: Vec<f32> = (0..n * COLS)
            .map(|_| rng.gen_range(-1.0f32..1.0) * 2f32.powi(rng.gen_range(-8..8)))
            .collect();
        encode_batch(&x, &s.bounds).unwrap().0
    }

    #[test]
    fn honest_results_always_pass() {
        let s = setup();
        let m = Matrix::new(GgmlType::Q8_0, ROWS, COLS, &s.bytes).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for i in 0..TRIALS / 10 {
            let checker = Checker::new(&m, &mut rng).unwrap();
            let x = random_input(&s, 1 + i % 3, &mut rng);
            let y = m.mul(&x).unwrap();
            assert_eq!(checker.check(&x, &y), Ok(()));
        }
    }

    #[test]
    fn every_kind_of_cheating_is_caught() {
        let s = setup();
        let m = Matrix::new(GgmlType::Q8_0, ROWS, COLS, &s.bytes).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        for attack in [
            Attack::FlipBit,
            Attack::SmallError,
            Attack::MultipleOfPowerOfTwo,
            Attack::Stale,
            Attack::SwapRows,
        ] {
            let (mut by_range, mut by_freivalds) = (0, 0);
            let mut high_bit_trials = 0;
            for _ in 0..TRIALS {
                let checker = Checker::new(&m, &mut rng).unwrap();
                let n = rng.gen_range(1..4);
                let x = random_input(&s, n, &mut rng);
                let honest = m.mul(&x).unwrap();
                let mut y = honest.clone();
                let i = rng.gen_range(0..y.len());
                match attack {
                    Attack::FlipBit => {
                        // Bits 56..63 included: these are the range check's job.
                        let bit = rng.gen_range(0..64);
                        high_bit_trials += usize::from(bit >= 56);
                        y[i] ^= 1 << bit;
                    }
                    Attack::SmallError => {
                        let e: i64 = rng.gen_range(1..1000) * if rng.gen() { 1 } else { -1 };
                        y[i] = y[i].wrapping_add(e as u64);
                    }
                    Attack::MultipleOfPowerOfTwo => {
                        let k = rng.gen_range(0..64);
                        high_bit_trials += usize::from(k >= 56);
                        let e = loop {
                            let e = rng.gen::<u64>() << k;
                            if e != 0 {
                                break e;
                            }
                        };
                        y[i] = y[i].wrapping_add(e);
                    }
                    Attack::Stale => {
                        let other = random_input(&s, n, &mut rng);
                        y = m.mul(&other).unwrap();
                        if y == honest {
                            continue;
                        }
                    }
                    Attack::SwapRows => {
                        let t = i / ROWS;
                        let (a, b) = (i, t * ROWS + (i % ROWS + rng.gen_range(1..ROWS)) % ROWS);
                        if y[a] == y[b] {
                            continue;
                        }
                        y.swap(a, b);
                    }
                }
                assert_ne!(y, honest);
                match checker.check(&x, &y) {
                    Ok(()) => panic!("{attack:?}: cheating result accepted"),
                    Err(CheckFailure::Range { .. }) => by_range += 1,
                    Err(CheckFailure::Freivalds { .. }) => by_freivalds += 1,
                    Err(e) => panic!("{attack:?}: unexpected {e}"),
                }
            }
            println!(
                "{attack:?}: caught {} (range {by_range}, Freivalds {by_freivalds}; \
                 {high_bit_trials} high-bit trials)",
                by_range + by_freivalds
            );
            assert!(
                by_range + by_freivalds >= TRIALS * 99 / 100,
                "{attack:?}: too many skipped trials"
            );
        }
    }

    #[test]
    fn top_bit_error_slips_past_freivalds_alone_but_not_the_range_check() {
        // An error of 2^63 in one row: each r_t misses it when r_t[row] is even
        // (probability 1/2), so some checkers accept it on Freivalds alone.
        let s = setup();
        let m = Matrix::new(GgmlType::Q8_0, ROWS, COLS, &s.bytes).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut freivalds_only_misses = 0;
        for _ in 0..2000 {
            let checker = Checker::new(&m, &mut rng).unwrap();
            let x = random_input(&s, 1, &mut rng);
            let mut y = m.mul(&x).unwrap();
            y[0] ^= 1 << 63;
            let missed = (0..CHECK_VECTORS).all(|t| {
                ring::dot(&checker.r[t * ROWS..(t + 1) * ROWS], &y)
                    == ring::dot(&checker.v[t * COLS..(t + 1) * COLS], &x)
            });
            freivalds_only_misses += usize::from(missed);
            assert!(matches!(
                checker.check(&x, &y),
                Err(CheckFailure::Range { row: 0, .. })
            ));
        }
        // Expected 2000 / 32 = 62.5.
        assert!(freivalds_only_misses > 20, "{freivalds_only_misses}");
    }

    #[test]
    fn shape_mismatch_is_a_failure() {
        let s = setup();
        let m = Matrix::new(GgmlType::Q8_0, ROWS, COLS, &s.bytes).unwrap();
        let checker = Checker::new(&m, &mut ChaCha20Rng::seed_from_u64(4)).unwrap();
        let x = vec![0u64; COLS];
        assert!(matches!(
            checker.check(&x, &[0; ROWS - 1]),
            Err(CheckFailure::Shape { .. })
        ));
        assert!(matches!(
            checker.check(&x[1..], &[0; ROWS]),
            Err(CheckFailure::Shape { .. })
        ));
        assert!(matches!(
            checker.check(&[], &[]),
            Err(CheckFailure::Shape { .. })
        ));
    }
}
