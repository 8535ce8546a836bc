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
use std::io::{self, Read, Write};

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

/// Which matrix a saved [`Checker`] belongs to: the header of its cache file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatrixKey {
    /// The model id (`ModelInfo::id`, a hash of the GGUF).
    pub model: [u8; 32],
    /// The layer (0 for the output projection).
    pub layer: u32,
    /// The projection's wire code ([`super::private::op_code`]).
    pub op: u8,
    /// Rows of the matrix.
    pub rows: usize,
    /// Columns of the matrix.
    pub cols: usize,
}

/// Magic bytes of a saved [`Checker`].
pub const CHECKER_MAGIC: [u8; 8] = *b"MESHFVC\0";
/// Version of the saved [`Checker`] format.
pub const CHECKER_FORMAT_VERSION: u32 = 1;

/// Why a saved [`Checker`] was rejected by [`Checker::load`] (or could not
/// be saved by [`Checker::save`]).
#[derive(Debug)]
pub enum CacheError {
    /// Reading or writing failed (other than the file ending early).
    Io(io::Error),
    /// The file ends before the format says it should.
    Truncated,
    /// The file does not start with [`CHECKER_MAGIC`].
    BadMagic,
    /// The file has a format version this build does not read.
    Version {
        /// The version found.
        found: u32,
    },
    /// A header field differs from the matrix the checker is loaded for.
    Mismatch {
        /// Which field: "model", "layer", "op", "rows", "cols" or "k".
        field: &'static str,
        /// What was expected.
        expected: String,
        /// What the file says.
        found: String,
    },
    /// The BLAKE3 checksum does not match the header and body.
    Checksum,
    /// Bytes follow the checksum.
    TrailingData,
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Io(e) => write!(f, "check vector file: {e}"),
            CacheError::Truncated => write!(f, "check vector file: truncated"),
            CacheError::BadMagic => write!(f, "check vector file: bad magic"),
            CacheError::Version { found } => write!(
                f,
                "check vector file: expected version {CHECKER_FORMAT_VERSION}, found {found}"
            ),
            CacheError::Mismatch {
                field,
                expected,
                found,
            } => write!(
                f,
                "check vector file: {field}: expected {expected}, found {found}"
            ),
            CacheError::Checksum => write!(f, "check vector file: checksum mismatch"),
            CacheError::TrailingData => write!(f, "check vector file: data after the checksum"),
        }
    }
}

impl std::error::Error for CacheError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CacheError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for CacheError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            CacheError::Truncated
        } else {
            CacheError::Io(e)
        }
    }
}

/// Bytes of a saved header: magic, version, model, layer, op, rows, cols, k.
const HEADER_LEN: usize = 8 + 4 + 32 + 4 + 1 + 8 + 8 + 4;

fn header_bytes(key: &MatrixKey, k: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    let mut at = 0;
    for part in [
        &CHECKER_MAGIC[..],
        &CHECKER_FORMAT_VERSION.to_le_bytes(),
        &key.model,
        &key.layer.to_le_bytes(),
        &[key.op],
        &(key.rows as u64).to_le_bytes(),
        &(key.cols as u64).to_le_bytes(),
        &k.to_le_bytes(),
    ] {
        h[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    h
}

/// Writes `words` little-endian to `w` and `hasher` through a small buffer
/// that is zeroized afterwards (the words may be secret).
fn write_words(w: &mut impl Write, hasher: &mut blake3::Hasher, words: &[u64]) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut result = Ok(());
    for chunk in words.chunks(buf.len() / 8) {
        let bytes = &mut buf[..chunk.len() * 8];
        for (b, v) in bytes.chunks_exact_mut(8).zip(chunk) {
            b.copy_from_slice(&v.to_le_bytes());
        }
        hasher.update(bytes);
        result = w.write_all(bytes);
        if result.is_err() {
            break;
        }
    }
    buf.zeroize();
    result
}

/// Reads `out.len()` little-endian words from `r` into `out`, hashing them.
fn read_words(r: &mut impl Read, hasher: &mut blake3::Hasher, out: &mut [u64]) -> io::Result<()> {
    let mut buf = [0u8; 4096];
    let mut result = Ok(());
    for chunk in out.chunks_mut(buf.len() / 8) {
        let bytes = &mut buf[..chunk.len() * 8];
        result = r.read_exact(bytes);
        if result.is_err() {
            break;
        }
        hasher.update(bytes);
        for (v, b) in chunk.iter_mut().zip(bytes.chunks_exact(8)) {
            *v = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        }
    }
    buf.zeroize();
    result
}

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

    /// Rows of the matrix this checker is for.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns of the matrix this checker is for.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Writes the check vectors for the matrix `key` to `w`: [`CHECKER_MAGIC`],
    /// version (u32), model id (32 bytes), layer (u32), op (u8), rows (u64),
    /// cols (u64), k (u32), then the `r_t` and the `v_t` as u64, all
    /// little-endian, then the BLAKE3 hash of everything before it.
    ///
    /// **The `r_t` are secret.** Whoever knows them can forge results that
    /// pass the Freivalds check, so a saved checker must never reach a helper:
    /// keep it in an owner-local file readable only by the owner (as
    /// [`PrivateProjector::with_cache_dir`](super::private::PrivateProjector::with_cache_dir)
    /// does, mode 0600). Fails if `key`'s shape is not this checker's.
    pub fn save(&self, key: &MatrixKey, w: &mut impl Write) -> Result<(), CacheError> {
        if (key.rows, key.cols) != (self.rows, self.cols) {
            return Err(CacheError::Mismatch {
                field: "rows x cols",
                expected: format!("{}x{}", self.rows, self.cols),
                found: format!("{}x{}", key.rows, key.cols),
            });
        }
        let mut hasher = blake3::Hasher::new();
        let header = header_bytes(key, CHECK_VECTORS as u32);
        hasher.update(&header);
        w.write_all(&header)?;
        write_words(w, &mut hasher, &self.r)?;
        write_words(w, &mut hasher, &self.v)?;
        w.write_all(hasher.finalize().as_bytes())?;
        Ok(())
    }

    /// Reads check vectors written by [`Checker::save`] for the matrix
    /// `expected`. Every header field is checked against `expected` before
    /// anything is allocated (so a file cannot make the owner allocate more
    /// than the matrix needs), then the checksum, then that nothing follows.
    pub fn load(r: &mut impl Read, expected: &MatrixKey) -> Result<Checker, CacheError> {
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)?;
        if header[..8] != CHECKER_MAGIC {
            return Err(CacheError::BadMagic);
        }
        let version = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if version != CHECKER_FORMAT_VERSION {
            return Err(CacheError::Version { found: version });
        }
        let want = header_bytes(expected, CHECK_VECTORS as u32);
        // Fields after magic and version: (name, offset, length).
        for (field, at, len) in [
            ("model", 12, 32),
            ("layer", 44, 4),
            ("op", 48, 1),
            ("rows", 49, 8),
            ("cols", 57, 8),
            ("k", 65, 4),
        ] {
            if header[at..at + len] != want[at..at + len] {
                let show = |b: &[u8]| {
                    if len == 32 {
                        b.iter().map(|x| format!("{x:02x}")).collect::<String>()
                    } else {
                        let mut le = [0u8; 8];
                        le[..len].copy_from_slice(b);
                        u64::from_le_bytes(le).to_string()
                    }
                };
                return Err(CacheError::Mismatch {
                    field,
                    expected: show(&want[at..at + len]),
                    found: show(&header[at..at + len]),
                });
            }
        }
        let (rows, cols) = (expected.rows, expected.cols);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&header);
        // Built before reading so the vectors are zeroized on every error path.
        let mut checker = Checker {
            rows,
            cols,
            r: vec![0u64; CHECK_VECTORS * rows],
            v: vec![0u64; CHECK_VECTORS * cols],
        };
        read_words(r, &mut hasher, &mut checker.r)?;
        read_words(r, &mut hasher, &mut checker.v)?;
        let mut sum = [0u8; 32];
        r.read_exact(&mut sum)?;
        if sum != *hasher.finalize().as_bytes() {
            return Err(CacheError::Checksum);
        }
        let mut extra = [0u8; 1];
        loop {
            match r.read(&mut extra) {
                Ok(0) => break,
                Ok(_) => return Err(CacheError::TrailingData),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(checker)
    }

    /// Accepts `y` as `W·x` (both row-major by token, `x` of `cols` and `y` of
    /// `rows` values per token) or says which check failed where.
    pub fn check(&self, x: &[u64], y: &[u64]) -> Result<(), CheckFailure> {
        let n = x.len() / self.cols;
        if x.is_empty()
            || !x.len().is_multiple_of(self.cols)
            || Some(y.len()) != n.checked_mul(self.rows)
        {
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

    fn key() -> MatrixKey {
        MatrixKey {
            model: [7; 32],
            layer: 3,
            op: 4,
            rows: ROWS,
            cols: COLS,
        }
    }

    fn saved(checker: &Checker) -> Vec<u8> {
        let mut out = Vec::new();
        checker.save(&key(), &mut out).unwrap();
        out
    }

    #[test]
    fn save_load_round_trip_checks_the_same() {
        let s = setup();
        let m = Matrix::new(GgmlType::Q8_0, ROWS, COLS, &s.bytes).unwrap();
        let mut rng = ChaCha20Rng::seed_from_u64(6);
        let checker = Checker::new(&m, &mut rng).unwrap();
        let bytes = saved(&checker);
        assert_eq!(
            bytes.len(),
            HEADER_LEN + 8 * CHECK_VECTORS * (ROWS + COLS) + 32
        );
        let loaded = Checker::load(&mut &bytes[..], &key()).unwrap();
        assert_eq!((loaded.rows(), loaded.cols()), (ROWS, COLS));
        assert_eq!((&loaded.r, &loaded.v), (&checker.r, &checker.v));
        for _ in 0..200 {
            let x = random_input(&s, 2, &mut rng);
            let mut y = m.mul(&x).unwrap();
            assert_eq!(loaded.check(&x, &y), Ok(()));
            let i = rng.gen_range(0..y.len());
            y[i] = y[i].wrapping_add(rng.gen_range(1..1 << 20));
            assert_eq!(loaded.check(&x, &y), checker.check(&x, &y));
            assert!(loaded.check(&x, &y).is_err());
        }
    }

    #[test]
    fn bad_checker_files_are_rejected() {
        let s = setup();
        let m = Matrix::new(GgmlType::Q8_0, ROWS, COLS, &s.bytes).unwrap();
        let checker = Checker::new(&m, &mut ChaCha20Rng::seed_from_u64(7)).unwrap();
        let good = saved(&checker);
        let load = |b: &[u8], k: &MatrixKey| Checker::load(&mut &b[..], k).map(|_| ());
        // Every single corrupted byte is caught, by a header check or the checksum.
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            let e = load(&bad, &key()).unwrap_err();
            if i >= HEADER_LEN {
                assert!(matches!(e, CacheError::Checksum), "byte {i}: {e}");
            }
        }
        // Truncated anywhere.
        for len in [0, 5, HEADER_LEN, HEADER_LEN + 3, good.len() - 1] {
            assert!(
                matches!(load(&good[..len], &key()), Err(CacheError::Truncated)),
                "{len}"
            );
        }
        let mut long = good.clone();
        long.push(0);
        assert!(matches!(load(&long, &key()), Err(CacheError::TrailingData)));
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(load(&bad, &key()), Err(CacheError::BadMagic)));
        let mut bad = good.clone();
        bad[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert!(matches!(
            load(&bad, &key()),
            Err(CacheError::Version { found: 2 })
        ));
        // Wrong shape, model, layer or op: rejected before allocating.
        for (k, what) in [
            (
                MatrixKey {
                    rows: ROWS + 1,
                    ..key()
                },
                "rows",
            ),
            (
                MatrixKey {
                    cols: 1 << 40,
                    ..key()
                },
                "cols",
            ),
            (
                MatrixKey {
                    model: [8; 32],
                    ..key()
                },
                "model",
            ),
            (MatrixKey { layer: 4, ..key() }, "layer"),
            (MatrixKey { op: 5, ..key() }, "op"),
        ] {
            match load(&good, &k) {
                Err(CacheError::Mismatch { field, .. }) => assert_eq!(field, what),
                other => panic!("{what}: {other:?}"),
            }
        }
        // A header claiming a huge matrix is refused, not allocated.
        let mut huge = good[..HEADER_LEN].to_vec();
        huge[49..57].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            load(&huge, &key()),
            Err(CacheError::Mismatch { field: "rows", .. })
        ));
        assert!(checker
            .save(&MatrixKey { rows: 1, ..key() }, &mut Vec::new())
            .is_err());
        assert!(load(&good, &key()).is_ok());
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
