//! Additive secret sharing in `Z_2^64`: `X = X_1 + ... + X_n (mod 2^64)`.
//!
//! `X_1..X_{n-1}` are expanded from fresh 32-byte ChaCha20 seeds, so those
//! helpers receive 32 bytes each; only the last helper gets a full vector,
//! `X_n = X - Σ_{i<n} X_i`, which is uniform given the seeds are. Any `n - 1`
//! shares are independent of `X`.

use rand::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use zeroize::Zeroize;

use super::ring;
use crate::{Error, Result};

/// A 32-byte ChaCha20 seed that expands to one share. Secret: zeroized on
/// drop and deliberately not `Debug`.
pub struct ShareSeed([u8; 32]);

impl Drop for ShareSeed {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl ShareSeed {
    /// A fresh seed from `rng`.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> ShareSeed {
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        ShareSeed(seed)
    }

    /// A seed received from the owner (helper side).
    pub fn from_bytes(bytes: [u8; 32]) -> ShareSeed {
        ShareSeed(bytes)
    }

    /// The seed bytes, to send to a helper.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The share this seed stands for: `len` words of the ChaCha20 stream
    /// (little-endian `u64`s, portable across platforms).
    pub fn expand(&self, len: usize) -> Vec<u64> {
        let mut rng = ChaCha20Rng::from_seed(self.0);
        (0..len).map(|_| rng.next_u64()).collect()
    }
}

/// The `n` shares of one vector: `n - 1` seeds and the last, full share.
/// The last share is zeroized on drop; not `Debug`.
pub struct Shares {
    seeds: Vec<ShareSeed>,
    last: Vec<u64>,
}

impl Drop for Shares {
    fn drop(&mut self) {
        self.last.zeroize();
    }
}

impl Shares {
    /// Number of shares `n`.
    pub fn len(&self) -> usize {
        self.seeds.len() + 1
    }

    /// Always false: there are at least two shares.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The seeds of shares `1..n` (what helpers `1..n-1` receive).
    pub fn seeds(&self) -> &[ShareSeed] {
        &self.seeds
    }

    /// The last share `X_n = X - Σ_{i<n} X_i` (what helper `n` receives).
    pub fn last(&self) -> &[u64] {
        &self.last
    }

    /// Share `i` (0-based) as a full vector.
    pub fn expand(&self, i: usize) -> Result<Vec<u64>> {
        match i.cmp(&self.seeds.len()) {
            std::cmp::Ordering::Less => Ok(self.seeds[i].expand(self.last.len())),
            std::cmp::Ordering::Equal => Ok(self.last.clone()),
            std::cmp::Ordering::Greater => Err(Error::InvalidArgument(format!(
                "share {i}: expected an index below {}",
                self.len()
            ))),
        }
    }
}

/// Splits `x` into `n >= 2` additive shares with fresh seeds from `rng`.
pub fn share<R: RngCore + CryptoRng>(x: &[u64], n: usize, rng: &mut R) -> Result<Shares> {
    if n < 2 {
        return Err(Error::InvalidArgument(format!(
            "sharing into {n} shares: expected at least 2"
        )));
    }
    let seeds: Vec<ShareSeed> = (0..n - 1).map(|_| ShareSeed::generate(rng)).collect();
    let mut last = x.to_vec();
    for s in &seeds {
        let mut part = s.expand(x.len());
        ring::sub_assign(&mut last, &part);
        part.zeroize();
    }
    Ok(Shares { seeds, last })
}

/// `Σ_i parts[i] (mod 2^64)`: the reconstruction of shared vectors (or of
/// the helpers' partial results). All parts must have the same length.
pub fn reconstruct(parts: &[&[u64]]) -> Result<Vec<u64>> {
    let Some(first) = parts.first() else {
        return Err(Error::InvalidArgument(
            "reconstruct: expected at least one share, found none".into(),
        ));
    };
    let mut out = first.to_vec();
    for (i, p) in parts.iter().enumerate().skip(1) {
        if p.len() != out.len() {
            return Err(Error::InvalidArgument(format!(
                "share {i}: expected {} values, found {}",
                out.len(),
                p.len()
            )));
        }
        ring::add_assign(&mut out, p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegate::Matrix;
    use proptest::prelude::*;

    fn all_shares(s: &Shares) -> Vec<Vec<u64>> {
        (0..s.len()).map(|i| s.expand(i).unwrap()).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// reconstruct(share(x)) == x for any x and n.
        #[test]
        fn reconstruct_inverts_share(
            x in proptest::collection::vec(any::<u64>(), 0..64),
            n in 2usize..6,
            seed in any::<u64>(),
        ) {
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            let s = share(&x, n, &mut rng).unwrap();
            prop_assert_eq!(s.len(), n);
            let parts = all_shares(&s);
            let refs: Vec<&[u64]> = parts.iter().map(|p| p.as_slice()).collect();
            prop_assert_eq!(reconstruct(&refs).unwrap(), x.clone());
            // A helper rebuilds its share from the 32 seed bytes alone.
            for (i, seed) in s.seeds().iter().enumerate() {
                prop_assert_eq!(ShareSeed::from_bytes(*seed.as_bytes()).expand(x.len()), parts[i].clone());
            }
        }

        /// Σ_i kernel(W, X_i) == kernel(W, X) (mod 2^64): helpers' partial
        /// results reconstruct the product.
        #[test]
        fn kernels_are_linear_over_shares(
            n in 2usize..5,
            tokens in 1usize..3,
            seed in any::<u64>(),
        ) {
            use rand::Rng;
            let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(seed);
            let (rows, cols) = (3, 64);
            let values: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
            for ty in crate::delegate::kernels::SUPPORTED_TYPES {
                let cols = if ty.block_size() == 256 { 256 } else { cols };
                let values = &values.repeat(4)[..rows * cols];
                let bytes = crate::engine::quantize(ty, values, cols).unwrap();
                let m = Matrix::new(ty, rows, cols, &bytes).unwrap();
                let x: Vec<u64> = (0..tokens * cols).map(|_| rng.gen()).collect();
                let s = share(&x, n, &mut rng).unwrap();
                let partial: Vec<Vec<u64>> = all_shares(&s).iter().map(|p| m.mul(p).unwrap()).collect();
                let refs: Vec<&[u64]> = partial.iter().map(|p| p.as_slice()).collect();
                prop_assert_eq!(reconstruct(&refs).unwrap(), m.mul(&x).unwrap());
            }
        }
    }

    #[test]
    fn bad_arguments() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        assert!(share(&[1, 2], 1, &mut rng).is_err());
        assert!(reconstruct(&[]).is_err());
        assert!(reconstruct(&[&[1, 2], &[3]]).is_err());
        let s = share(&[1, 2], 2, &mut rng).unwrap();
        assert!(s.expand(2).is_err());
    }

    /// Chi-square of byte values (255 degrees of freedom) and the largest
    /// deviation of any bit position's count of ones from half, in sigmas.
    fn uniformity(words: &[u64]) -> (f64, f64) {
        let mut bytes = [0u64; 256];
        let mut ones = [0u64; 64];
        for w in words {
            for b in w.to_le_bytes() {
                bytes[b as usize] += 1;
            }
            for (bit, o) in ones.iter_mut().enumerate() {
                *o += (w >> bit) & 1;
            }
        }
        let expected = words.len() as f64 * 8.0 / 256.0;
        let chi2 = bytes
            .iter()
            .map(|c| (*c as f64 - expected).powi(2) / expected)
            .sum();
        let n = words.len() as f64;
        let sigma = (n / 4.0).sqrt();
        let max_dev = ones
            .iter()
            .map(|o| (*o as f64 - n / 2.0).abs() / sigma)
            .fold(0.0, f64::max);
        (chi2, max_dev)
    }

    // Generous thresholds: chi2 with 255 df has mean 255, sd 22.6, so 400 is
    // > 6 sd; a bit count beyond 6 sigma happens with probability ~2e-9 per bit.
    const CHI2_MAX: f64 = 400.0;
    const BIT_SIGMA_MAX: f64 = 6.0;

    #[test]
    fn what_a_helper_receives_looks_uniform() {
        let len = 1 << 20;
        // A very non-uniform secret: small non-negative values, high bits all zero.
        let x: Vec<u64> = (0..len as u64).map(|i| i % 1000).collect();
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(42);
        for n in [2, 3] {
            let s = share(&x, n, &mut rng).unwrap();
            for i in 0..n {
                let view = s.expand(i).unwrap();
                let (chi2, dev) = uniformity(&view);
                assert!(chi2 < CHI2_MAX, "n={n} share {i}: chi2 {chi2}");
                assert!(
                    dev < BIT_SIGMA_MAX,
                    "n={n} share {i}: bit deviation {dev} sigma"
                );
            }
        }
        // The secret itself fails, and so does a subtly biased share (top byte
        // zero): the test can tell.
        let (chi2, dev) = uniformity(&x);
        assert!(chi2 > CHI2_MAX && dev > BIT_SIGMA_MAX);
        let s = share(&x, 2, &mut rng).unwrap();
        let biased: Vec<u64> = s.last().iter().map(|w| w & (u64::MAX >> 8)).collect();
        let (chi2, dev) = uniformity(&biased);
        assert!(chi2 > CHI2_MAX, "biased chi2 {chi2}");
        assert!(dev > BIT_SIGMA_MAX, "biased bit deviation {dev}");
        // One biased bit alone is caught by the per-bit balance.
        let one_bit: Vec<u64> = s.last().iter().map(|w| w & !(1 << 37)).collect();
        assert!(uniformity(&one_bit).1 > BIT_SIGMA_MAX);
    }
}
