//! The activations ggml actually multiplies: before a quantized mat-vec, ggml
//! converts the f32 activation row to the weight type's `vec_dot_type` and
//! takes the dot product of integers (SMPC.md's "same integers as the local
//! path"). The owner applies the same conversion before it encodes a token in
//! the ring, so the helpers' exact ring product is the exact dot product of the
//! integers ggml uses, and private and local results differ only by ggml's f32
//! accumulation (and, for Q4_1/Q5_1, the rounding of Q8_1's `s`, see below).
//!
//! | weights                | `vec_dot_type` | block | value of activation `j`           |
//! |------------------------|----------------|-------|-----------------------------------|
//! | F32                    | F32            | 1     | `x_j`                             |
//! | F16                    | F16            | 1     | `fp16(x_j)`                       |
//! | Q4_0, Q5_0, Q8_0       | Q8_0           | 32    | `fp16(d)·q_j`                     |
//! | Q4_1, Q5_1             | Q8_1           | 32    | `fp16(d)·q_j`                     |
//! | K-quants (Q2_K..Q6_K)  | Q8_K           | 256   | `d·q_j` (`d` an f32)              |
//!
//! Q8_0 and Q8_1 use the quantizer ggml is built with for this CPU
//! (`quantize_row_q8_0` / `quantize_row_q8_1`, the `from_float` of the type
//! traits): on x86 with AVX `d = amax/127`, `q = round_half_even(x·(127/amax))`;
//! on aarch64 (NEON) `q = round_half_even(x·(1/d))`; elsewhere ggml's scalar
//! reference, `q = roundf(x·(1/d))` (half away from zero). Q8_K has one scalar
//! quantizer everywhere (`iscale = -127/max` with `max` the signed element of
//! largest magnitude, `q = min(127, nearest_int(iscale·x))`, `d = 1/iscale`;
//! with FMA the compiler fuses `iscale·x + 1.5·2^23` inside `nearest_int`,
//! which changes some ties, and that is reproduced too).
//! F16 conversions round to nearest even, as F16C and ggml's scalar code do.
//! The unit tests compare every format bit for bit with ggml's own `from_float`.
//!
//! Q8_1 also stores `s = fp16(d_f32·Σ q_j)` (with the *unrounded* `d`), and
//! ggml's Q4_1 dot adds `m·s` per block where the exact dot of the dequantized
//! values has `m·fp16(d)·Σ q_j`: the two differ by up to about `2^-11·|m·d·Σq|`
//! per block, a rounding the ring (which computes the exact dot) does not
//! reproduce. [`q8_1_sums`] returns ggml's `s` so tests can measure it.
//!
//! Values are returned as `f64`: `d·q` is exact there for every format (Q8_K's
//! f32 `d` times a 7-bit `q` needs up to 31 significant bits).

use crate::gguf::GgmlType;
use crate::{Error, Result};

/// The activation format ggml converts to before a mat-vec (`vec_dot_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types)] // ggml's names
pub enum ActivationFormat {
    /// Used as is.
    F32,
    /// Rounded to IEEE half precision.
    F16,
    /// Blocks of 32: fp16 `d`, 32 `i8`.
    Q8_0,
    /// Blocks of 32: fp16 `d` and `s = d·Σq`, 32 `i8`.
    Q8_1,
    /// Blocks of 256: f32 `d`, 256 `i8` (and sums ggml's dots use internally).
    Q8_K,
}

impl ActivationFormat {
    /// ggml's `vec_dot_type` of weights of type `ty`.
    pub fn for_weights(ty: GgmlType) -> Result<ActivationFormat> {
        Ok(match ty {
            GgmlType::F32 => ActivationFormat::F32,
            GgmlType::F16 => ActivationFormat::F16,
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => ActivationFormat::Q8_0,
            GgmlType::Q4_1 | GgmlType::Q5_1 => ActivationFormat::Q8_1,
            GgmlType::Q2_K | GgmlType::Q3_K | GgmlType::Q4_K | GgmlType::Q5_K | GgmlType::Q6_K => {
                ActivationFormat::Q8_K
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "activation format for {other} weights"
                )))
            }
        })
    }

    /// Values per block.
    pub fn block_size(self) -> usize {
        match self {
            ActivationFormat::F32 | ActivationFormat::F16 => 1,
            ActivationFormat::Q8_0 | ActivationFormat::Q8_1 => 32,
            ActivationFormat::Q8_K => 256,
        }
    }
}

/// The IEEE half-precision bit pattern nearest to `x` (ties to even), as F16C's
/// `vcvtps2ph` with rounding mode 0 and ggml's scalar conversion compute it.
pub fn f32_to_f16(x: f32) -> u16 {
    let b = x.to_bits();
    let sign = ((b >> 16) & 0x8000) as u16;
    let exp = ((b >> 23) & 0xff) as i32;
    let man = b & 0x7f_ffff;
    if exp == 0xff {
        return sign | 0x7c00 | if man != 0 { 0x200 } else { 0 };
    }
    // Biased half exponent.
    let e = exp - 127 + 15;
    if e >= 31 {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // Below 2^-25 (or exactly 2^-25, a tie with zero): rounds to zero.
        if e < -10 {
            return sign;
        }
        // In units of 2^-24: significand · 2^(exp - 126), a right shift of 14 - e.
        let m = man | 0x80_0000;
        let shift = (14 - e) as u32;
        let (q, rem, half) = (m >> shift, m & ((1 << shift) - 1), 1u32 << (shift - 1));
        let q = if rem > half || (rem == half && q & 1 == 1) {
            q + 1
        } else {
            q
        };
        return sign | q as u16;
    }
    let q = ((e as u32) << 10) | (man >> 13);
    let rem = man & 0x1fff;
    // A carry out of the mantissa correctly bumps the exponent (up to infinity).
    let q = if rem > 0x1000 || (rem == 0x1000 && q & 1 == 1) {
        q + 1
    } else {
        q
    };
    sign | q as u16
}

/// The value of a finite half-precision bit pattern (exact in f32).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = if h >> 15 == 1 { -1.0f32 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let frac = f32::from(h & 0x3ff);
    match exp {
        0 => sign * frac * 2f32.powi(-24),
        31 if frac == 0.0 => sign * f32::INFINITY,
        31 => f32::NAN,
        _ => sign * (1024.0 + frac) * 2f32.powi(exp - 25),
    }
}

/// Which of ggml's Q8_0 / Q8_1 quantizers this build uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Q8Flavor {
    /// x86 AVX: `id = 127/amax`, round half to even.
    Avx,
    /// aarch64 NEON: `id = 1/d`, round half to even.
    #[cfg_attr(not(target_arch = "aarch64"), allow(dead_code))]
    Neon,
    /// ggml's scalar reference: `id = 1/d`, `roundf` (half away from zero).
    Reference,
}

fn q8_flavor() -> Q8Flavor {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        // ggml-sys builds ggml with the host's features (-mavx, -mavx2, ...).
        if std::arch::is_x86_feature_detected!("avx") {
            return Q8Flavor::Avx;
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        return Q8Flavor::Neon;
    }
    #[allow(unreachable_code)]
    Q8Flavor::Reference
}

/// One Q8_0/Q8_1 block of 32: writes `fp16(d)·q_j` to `out` and returns
/// ggml's `s = fp16(d·Σq)` (as f32) and the scale `fp16(d)`.
fn q8_block(flavor: Q8Flavor, x: &[f32], out: &mut [f64]) -> (f32, f64) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = match flavor {
        Q8Flavor::Avx if amax != 0.0 => 127.0 / amax,
        Q8Flavor::Neon | Q8Flavor::Reference if d != 0.0 => 1.0 / d,
        _ => 0.0,
    };
    let dh = f64::from(f16_to_f32(f32_to_f16(d)));
    let mut sum = 0i32;
    for (o, v) in out.iter_mut().zip(x) {
        let t = v * id;
        let q = match flavor {
            // `vcvtps2dq` of a rounded value: out of range or NaN gives i32::MIN.
            Q8Flavor::Avx => {
                let r = round_half_even(t);
                if r.is_nan() || r.abs() >= 2_147_483_648.0 {
                    i32::MIN
                } else {
                    r as i32
                }
            }
            // `vcvtnq_s32_f32` saturates (NaN to 0), as Rust's `as` does.
            Q8Flavor::Neon => round_half_even(t) as i32,
            Q8Flavor::Reference => t.round() as i32,
        };
        // ggml packs with signed saturation; the SIMD paths sum the 32-bit
        // values before packing, the reference sums the stored bytes.
        let stored = q.clamp(-128, 127);
        sum = sum.wrapping_add(if flavor == Q8Flavor::Reference {
            stored
        } else {
            q
        });
        let q = stored;
        *o = dh * f64::from(q);
    }
    (f16_to_f32(f32_to_f16(d * sum as f32)), dh)
}

/// `t.round_ties_even()` without a libm call where it cannot be inlined (no
/// SSE4.1 at compile time): adding and subtracting `1.5·2^23` rounds to an
/// integer, ties to even, for `|t| < 2^22` (every in-range quantizer input).
#[inline]
fn round_half_even(t: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    if t.abs() < 4_194_304.0 {
        (t + MAGIC) - MAGIC
    } else {
        t.round_ties_even()
    }
}

/// ggml's `nearest_int(a·b)`: round half to even through the `1.5·2^23`
/// trick. Where ggml is built with FMA (x86 with the `fma` feature, aarch64),
/// the C compiler contracts the inlined `a·b + 12582912.f` into one fused
/// multiply-add, so the product is not rounded first (a product just below
/// `k + 0.5` then rounds down where the unfused code would see a tie).
fn nearest_int_of_product(a: f32, b: f32, fused: bool) -> i32 {
    let v = if fused {
        a.mul_add(b, 12_582_912.0)
    } else {
        a * b + 12_582_912.0
    };
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// Whether the C compiler could fuse multiply-adds in ggml's scalar code.
fn ggml_has_fma() -> bool {
    #[cfg(any(target_arch = "x86", target_arch = "x86_64"))]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(target_arch = "aarch64")]
    {
        true
    }
    #[cfg(not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// One Q8_K block of 256 (`quantize_row_q8_K_reference`): writes `d·q_j`.
fn q8k_block(x: &[f32], out: &mut [f64], fused: bool) {
    let (mut amax, mut max) = (0f32, 0f32);
    for v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = *v;
        }
    }
    if amax == 0.0 {
        out.iter_mut().for_each(|o| *o = 0.0);
        return;
    }
    let iscale = -127.0 / max;
    let d = f64::from(1.0 / iscale);
    for (o, v) in out.iter_mut().zip(x) {
        *o = d * f64::from(nearest_int_of_product(iscale, *v, fused).min(127));
    }
}

fn check(format: ActivationFormat, x: &[f32]) -> Result<()> {
    let bs = format.block_size();
    if !x.len().is_multiple_of(bs) {
        return Err(Error::InvalidArgument(format!(
            "{format:?} activations: expected a multiple of {bs} values, found {}",
            x.len()
        )));
    }
    if let Some((j, v)) = x.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(Error::InvalidArgument(format!(
            "activation {j} is {v}: expected a finite value"
        )));
    }
    Ok(())
}

/// The values ggml's conversion of `x` to `format` represents (dequantized,
/// exactly), block by block; `x` may hold several rows when every row is a
/// whole number of blocks (true for every matrix width of that weight type).
pub fn quantize_like_ggml(format: ActivationFormat, x: &[f32]) -> Result<Vec<f64>> {
    let mut out = vec![0f64; x.len()];
    quantize_like_ggml_into(format, x, &mut out)?;
    Ok(out)
}

/// [`quantize_like_ggml`] into `out` (`x.len()` values).
pub fn quantize_like_ggml_into(format: ActivationFormat, x: &[f32], out: &mut [f64]) -> Result<()> {
    check(format, x)?;
    if out.len() != x.len() {
        return Err(Error::InvalidArgument(format!(
            "quantized activations: expected room for {} values, found {}",
            x.len(),
            out.len()
        )));
    }
    match format {
        ActivationFormat::F32 => out.iter_mut().zip(x).for_each(|(o, v)| *o = f64::from(*v)),
        ActivationFormat::F16 => out
            .iter_mut()
            .zip(x)
            .for_each(|(o, v)| *o = f64::from(f16_to_f32(f32_to_f16(*v)))),
        ActivationFormat::Q8_0 | ActivationFormat::Q8_1 => {
            let flavor = q8_flavor();
            for (xb, ob) in x.chunks_exact(32).zip(out.chunks_exact_mut(32)) {
                q8_block(flavor, xb, ob);
            }
        }
        ActivationFormat::Q8_K => {
            let fused = ggml_has_fma();
            for (xb, ob) in x.chunks_exact(256).zip(out.chunks_exact_mut(256)) {
                q8k_block(xb, ob, fused);
            }
        }
    }
    Ok(())
}

/// ggml's Q8_1 block sums `s = fp16(d·Σ q_j)` of `x` (one per block of 32),
/// which its Q4_1 and Q5_1 dots multiply by the weight block's `m`.
pub fn q8_1_sums(x: &[f32]) -> Result<Vec<f32>> {
    check(ActivationFormat::Q8_1, x)?;
    let flavor = q8_flavor();
    let mut scratch = [0f64; 32];
    Ok(x.chunks_exact(32)
        .map(|xb| q8_block(flavor, xb, &mut scratch).0)
        .collect())
}

/// ggml's Q8_0 conversion of `x` (a whole number of blocks of 32) as
/// integers: per block the fp16 scale (exactly, as f64) into `scales` and
/// the 32 quants into `quants`. The same values [`quantize_like_ggml`]
/// returns as `scale·quant`; for exact integer dot products.
pub fn q8_0_quants(x: &[f32], scales: &mut [f64], quants: &mut [i8]) -> Result<()> {
    check(ActivationFormat::Q8_0, x)?;
    if scales.len() != x.len() / 32 || quants.len() != x.len() {
        return Err(Error::InvalidArgument(format!(
            "Q8_0 quants: expected room for {} scales and {} quants, found {} and {}",
            x.len() / 32,
            x.len(),
            scales.len(),
            quants.len()
        )));
    }
    let flavor = q8_flavor();
    let mut values = [0f64; 32];
    for ((xb, qb), scale) in x
        .chunks_exact(32)
        .zip(quants.chunks_exact_mut(32))
        .zip(scales.iter_mut())
    {
        let (_, dh) = q8_block(flavor, xb, &mut values);
        *scale = dh;
        for (q, v) in qb.iter_mut().zip(&values) {
            // `v` is `dh·q` with |q| <= 128, exactly: the division is exact.
            *q = if dh == 0.0 { 0 } else { (v / dh) as i8 };
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ggml_sys_bleedingedge as sys;
    use rand::{Rng, SeedableRng};

    /// ggml's own conversion of `x` to `ty` (the type traits' `from_float`, the
    /// function its mat-vec calls), dequantized exactly; plus Q8_1's `s`.
    fn ggml_values(ty: sys::ggml_type, x: &[f32]) -> (Vec<f64>, Vec<f32>) {
        // ggml fills its fp16 tables in the first `ggml_init`.
        let _ = crate::engine::quantize(GgmlType::F16, &[0.0], 1).unwrap();
        // SAFETY: reads a static table entry of a valid type.
        let traits = unsafe { sys::ggml_internal_get_type_traits(ty) };
        let from_float = traits.from_float.expect("from_float");
        let (bs, ts) = (traits.blck_size as usize, traits.type_size);
        let mut buf = vec![0u8; x.len() / bs * ts];
        // SAFETY: `x` is a whole number of blocks and `buf` holds them all.
        unsafe { from_float(x.as_ptr(), buf.as_mut_ptr().cast(), x.len() as i64) };
        use crate::engine::blocks::{blocks, half, BlockQ8K, BlockQ8_0, BlockQ8_1};
        let h = |b: [u8; 2]| f16_to_f32(half(b));
        fn quants(d: f64, qs: &[i8]) -> impl Iterator<Item = f64> + '_ {
            qs.iter().map(move |q| d * f64::from(*q))
        }
        let (mut vals, mut sums) = (Vec::new(), Vec::new());
        match ty {
            sys::ggml_type_GGML_TYPE_F16 => {
                vals.extend(buf.chunks_exact(ts).map(|b| f64::from(h([b[0], b[1]]))));
            }
            sys::ggml_type_GGML_TYPE_Q8_0 => {
                for b in blocks::<BlockQ8_0>(&buf).unwrap() {
                    vals.extend(quants(f64::from(h(b.d)), &b.qs));
                }
            }
            sys::ggml_type_GGML_TYPE_Q8_1 => {
                for b in blocks::<BlockQ8_1>(&buf).unwrap() {
                    sums.push(h(b.s));
                    vals.extend(quants(f64::from(h(b.d)), &b.qs));
                }
            }
            sys::ggml_type_GGML_TYPE_Q8_K => {
                for b in blocks::<BlockQ8K>(&buf).unwrap() {
                    vals.extend(quants(f64::from(f32::from_le_bytes(b.d)), &b.qs));
                }
            }
            _ => unreachable!(),
        }
        (vals, sums)
    }

    /// Random rows with every kind of block: typical values, outliers, ties at
    /// the rounding boundary, constant and all-zero blocks, tiny (subnormal
    /// scale) and huge magnitudes.
    fn rows(seed: u64) -> Vec<Vec<f32>> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::new();
        for case in 0..64 {
            let n = 1024;
            let scale = 2f32.powi(rng.gen_range(-30..20));
            let x: Vec<f32> = (0..n)
                .map(|i| match case % 8 {
                    0 => rng.gen_range(-1.0f32..1.0) * scale,
                    // Full 24-bit mantissas.
                    1 => (rng.gen_range(-1.0f64..1.0) * f64::from(scale)) as f32,
                    2 => {
                        if i % 37 == 0 {
                            40.0 * scale
                        } else {
                            rng.gen_range(-0.5f32..0.5) * scale
                        }
                    }
                    // Multiples of amax/254: many exact .5 ties after scaling.
                    3 => {
                        let k = rng.gen_range(-254i32..=254);
                        if i % 32 == 0 {
                            127.0
                        } else {
                            k as f32 / 2.0
                        }
                    }
                    4 => {
                        if (i / 32) % 3 == 0 {
                            0.0
                        } else {
                            scale
                        }
                    }
                    5 => rng.gen_range(-1.0f32..1.0) * 1e-40,
                    6 => rng.gen_range(-1.0f32..1.0) * 6e4,
                    _ => {
                        let v = rng.gen_range(-3i32..=3) as f32 * 0.25 * scale;
                        if i % 256 == 7 {
                            -v.abs() - scale
                        } else {
                            v
                        }
                    }
                })
                .collect();
            out.push(x);
        }
        out
    }

    #[test]
    fn bit_identical_to_ggml_from_float() {
        let cases = [
            (ActivationFormat::F16, sys::ggml_type_GGML_TYPE_F16),
            (ActivationFormat::Q8_0, sys::ggml_type_GGML_TYPE_Q8_0),
            (ActivationFormat::Q8_1, sys::ggml_type_GGML_TYPE_Q8_1),
            (ActivationFormat::Q8_K, sys::ggml_type_GGML_TYPE_Q8_K),
        ];
        for (format, ty) in cases {
            for (k, x) in rows(1).iter().enumerate() {
                let got = quantize_like_ggml(format, x).unwrap();
                let (want, sums) = ggml_values(ty, x);
                assert_eq!(got.len(), want.len());
                for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g.to_bits() == w.to_bits() || (*g == 0.0 && *w == 0.0),
                        "{format:?} row {k} [{j}] (x = {}): ours {g:e} ggml {w:e}",
                        x[j]
                    );
                }
                if format == ActivationFormat::Q8_1 {
                    let ours = q8_1_sums(x).unwrap();
                    let same = ours
                        .iter()
                        .zip(&sums)
                        .all(|(a, b)| a.to_bits() == b.to_bits() || (*a == 0.0 && *b == 0.0));
                    assert!(same, "row {k}: s {ours:?} ggml {sums:?}");
                }
            }
        }
    }

    #[test]
    fn f16_conversion_matches_ggml_everywhere() {
        let _ = crate::engine::quantize(GgmlType::F16, &[0.0], 1).unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        // Every f16 value, the midpoints between neighbours (ties) and their
        // f32 neighbours, and random bit patterns.
        let mut xs = Vec::new();
        for h in 0..0x7c00u16 {
            let v = f16_to_f32(h);
            let next = f16_to_f32(h + 1);
            let mid = (f64::from(v) + f64::from(next)) / 2.0;
            let mid = mid as f32;
            for x in [
                v,
                mid,
                f32::from_bits(mid.to_bits() + 1),
                f32::from_bits(mid.to_bits().saturating_sub(1)),
            ] {
                xs.push(x);
                xs.push(-x);
            }
        }
        for _ in 0..100_000 {
            let x = f32::from_bits(rng.gen::<u32>());
            if x.is_finite() {
                xs.push(x);
            }
        }
        for x in xs {
            // SAFETY: a pure conversion.
            let want = unsafe { sys::ggml_fp32_to_fp16(x) };
            assert_eq!(f32_to_f16(x), want, "{x:e} ({:#010x})", x.to_bits());
        }
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0xfbff), -65504.0);
    }

    #[test]
    fn formats_and_bad_inputs() {
        assert_eq!(
            ActivationFormat::for_weights(GgmlType::Q4_1).unwrap(),
            ActivationFormat::Q8_1
        );
        assert_eq!(
            ActivationFormat::for_weights(GgmlType::Q6_K).unwrap(),
            ActivationFormat::Q8_K
        );
        assert!(quantize_like_ggml(ActivationFormat::Q8_0, &[1.0; 31]).is_err());
        assert!(quantize_like_ggml(ActivationFormat::Q8_K, &[1.0; 32]).is_err());
        let mut x = vec![1.0f32; 32];
        x[3] = f32::NAN;
        assert!(quantize_like_ggml(ActivationFormat::Q8_1, &x).is_err());
        assert_eq!(
            quantize_like_ggml(ActivationFormat::Q8_0, &[0.0; 32]).unwrap(),
            vec![0.0; 32]
        );
    }
}
