//! Kernels the pinned ggml computes differently from current llama.cpp, done
//! here with upstream's arithmetic as ggml custom operations, so the forward
//! pass is bit-identical to upstream's: SwiGLU and softmax (the pinned ggml uses
//! fp16 lookup tables for their exponentials; upstream a vectorized `expf`,
//! reproduced by [`exp_f32`], and AVX-512 chunked softmax sums), RoPE (fused
//! rotation, f32 theta recurrence), and the fp16 rounding upstream applies to
//! the f32 operand of its fp16 attention products. Exactness against
//! llama-cpp-python is checked by `tests/engine_golden.rs`.
//!
//! Each kernel gets the thread index `ith` of `nth` and handles its share of rows.
//! Inputs are contiguous F32 tensors built by the graph code in `ggml.rs`.

use std::ffi::c_void;

use ggml_sys_bleedingedge as sys;

/// `exp(x)` in f32 to within ~2 ulp, with the arithmetic of current
/// llama.cpp's vectorized exponential (x86 builds), so softmax and SiLU round
/// exactly as upstream does: `x = n·ln2 + b` with `n` rounded by the
/// `1.5·2^23` shift and `ln2` in two parts, a degree-5 minimax polynomial in
/// `b` evaluated with fused multiply-adds (ARM optimized-routines'
/// coefficients), then one rounding of `p·2^n`. `|n| > 192` gives 0 or +inf.
/// Branch-free, so loops over it vectorize.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 1.5·2^23
    let log2e = f32::from_bits(0x3fb8_aa3b);
    let ln2_hi = f32::from_bits(0x3f31_7200);
    let ln2_lo = f32::from_bits(0x35bf_be8e);
    let c1 = f32::from_bits(0x3f7f_fff6);
    let c2 = f32::from_bits(0x3eff_fedb);
    let c3 = f32::from_bits(0x3e2a_af33);
    let c4 = f32::from_bits(0x3d2b_9f17);
    let c5 = f32::from_bits(0x3c07_2010);
    let n = x.mul_add(log2e, SHIFT) - SHIFT;
    let b = (-n).mul_add(ln2_lo, (-n).mul_add(ln2_hi, x));
    let u = b * b;
    let p = c5
        .mul_add(b, c4)
        .mul_add(u, c3.mul_add(b, c2))
        .mul_add(u, c1.mul_add(b, 1.0));
    // p·2^n rounded once: exact in f64 (2^n is normal there for |n| <= 192).
    let ni = (n as i64).clamp(-1000, 1000);
    let scaled = (f64::from(p) * f64::from_bits(((ni + 1023) as u64) << 52)) as f32;
    if n.abs() > 192.0 {
        if n <= 0.0 {
            0.0
        } else {
            f32::INFINITY
        }
    } else {
        scaled
    }
}

/// `x` rounded to the nearest fp16 value (ties to even), as an f32: what
/// ggml's conversion of a matrix product's f32 operand to fp16 keeps.
#[inline(always)]
pub(crate) fn round_f16(x: f32) -> f32 {
    half::f16::from_f32(x).to_f32()
}

/// Sum of 16 values in the order of x86's `_mm512_reduce_add_ps` (halves
/// added pairwise: lanes `i` and `i + 8`, then `i + 4`, `i + 2`, `i + 1`).
#[inline(always)]
fn reduce_add_16(c: &[f32]) -> f32 {
    let mut t = [0f32; 8];
    for i in 0..8 {
        t[i] = c[i] + c[i + 8];
    }
    let t4 = [t[0] + t[4], t[1] + t[5], t[2] + t[6], t[3] + t[7]];
    (t4[0] + t4[2]) + (t4[1] + t4[3])
}

/// The rows `[start, end)` of `rows` that thread `ith` of `nth` handles.
pub(crate) fn share(rows: usize, ith: i32, nth: i32) -> (usize, usize) {
    let nth = nth.max(1) as usize;
    let ith = (ith.max(0) as usize).min(nth - 1);
    let per = rows.div_ceil(nth);
    ((ith * per).min(rows), ((ith + 1) * per).min(rows))
}

/// Carry the softmax scale in the userdata pointer itself (no lifetime to manage).
pub(crate) fn scale_to_userdata(scale: f32) -> *mut c_void {
    scale.to_bits() as usize as *mut c_void
}

/// # Safety
/// `t` must be a contiguous F32 tensor whose data is valid for `nelements` floats.
unsafe fn rows_of<'a>(t: *const sys::ggml_tensor) -> (&'a [f32], usize) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let n = sys::ggml_nelements(t) as usize;
        let ne0 = (*t).ne[0] as usize;
        (std::slice::from_raw_parts((*t).data as *const f32, n), ne0)
    }
}

/// `dst = silu(a) * b` element-wise (SwiGLU), a and b of the same shape.
///
/// # Safety
/// Called by ggml with contiguous F32 `dst`, `a`, `b` of equal shape.
pub(crate) unsafe extern "C" fn swiglu_op(
    dst: *mut sys::ggml_tensor,
    a: *const sys::ggml_tensor,
    b: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    _userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let (a, ne0) = rows_of(a);
        let (b, _) = rows_of(b);
        let n = a.len().min(b.len());
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, n);
        let (r0, r1) = share(n / ne0.max(1), ith, nth);
        let range = r0 * ne0..r1 * ne0;
        swiglu(&mut out[range.clone()], &a[range.clone()], &b[range]);
    }
}

/// Defines `$name` to run `$body` through a copy compiled for AVX2 and FMA when
/// the CPU has them (the loops vectorize 8-wide there); the arithmetic is
/// identical either way: Rust never contracts `a * b + c` into an FMA on its
/// own, and an explicit `mul_add` is a fused multiply-add on both paths (a
/// hardware instruction or libm's `fmaf`).
macro_rules! dispatch {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        pub(crate) fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

dispatch!(swiglu(out: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
        *o = g / (1.0 + exp_f32(-g)) * u;
    }
});

// Softmax of `x · scale + m` into `o`, rounded to fp16 values, in the order
// current llama.cpp computes it on AVX-512 (so results are bit-identical):
// exponentials in chunks of 16 with [`exp_f32`] (the libm `expf` for a tail
// shorter than 16), each chunk summed as `_mm512_reduce_add_ps` does and the
// chunk sums accumulated in f64, then every value scaled by `1/sum` rounded
// to f32. The fp16 rounding is what ggml's K·Q·V product does to this operand.
// Masked (`-inf`) entries give exactly 0.
dispatch!(soft_max_row(o: &mut [f32], x: &[f32], m: &[f32], scale: f32) {
    for (o, (&x, &m)) in o.iter_mut().zip(x.iter().zip(m)) {
        *o = x * scale + m;
    }
    let max = o.iter().fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let mut sum = 0f64;
    let mut chunks = o.chunks_exact_mut(16);
    for c in &mut chunks {
        for v in c.iter_mut() {
            *v = exp_f32(*v - max);
        }
        sum += f64::from(reduce_add_16(c));
    }
    for v in chunks.into_remainder() {
        *v = (*v - max).exp();
        sum += f64::from(*v);
    }
    let inv = (1.0 / sum) as f32;
    for v in o.iter_mut() {
        *v = round_f16(*v * inv);
    }
});

/// Rotary position embedding parameters, handed to [`rope_op`] through its
/// userdata pointer (owned by the engine, so it outlives every graph).
#[derive(Debug)]
pub(crate) struct RopeParams {
    /// Rotated dimensions per head (the rest are copied).
    pub n_dims: usize,
    /// NeoX layout (pairs `i`, `i + n_dims/2`) instead of adjacent pairs.
    pub neox: bool,
    pub freq_base: f32,
    pub freq_scale: f32,
}

/// The cos/sin of every rotated pair at position `pos`: `theta` starts at
/// `pos·freq_scale` and is multiplied by `freq_base^(-2/n_dims)` per pair in
/// f32, as current llama.cpp computes its rope cache (libm `cosf`/`sinf`).
fn rope_cache(p: &RopeParams, pos: i32, cache: &mut Vec<(f32, f32)>) {
    cache.clear();
    let theta_scale = p.freq_base.powf(-2.0 / p.n_dims as f32);
    let mut theta = pos as f32;
    for _ in 0..p.n_dims / 2 {
        let t = p.freq_scale * theta;
        cache.push((t.cos(), t.sin()));
        theta *= theta_scale;
    }
}

/// Rotates one head row in place of `dst`: each pair `(x0, x1)` becomes
/// `(x0·cos − x1·sin, x0·sin + x1·cos)` with the first product fused (one
/// rounding each, as upstream's compiled kernel does).
#[inline(always)]
fn rope_row(p: &RopeParams, cache: &[(f32, f32)], src: &[f32], dst: &mut [f32]) {
    dst.copy_from_slice(src);
    let half = p.n_dims / 2;
    for (i, &(c, s)) in cache.iter().enumerate() {
        let (i0, i1) = if p.neox {
            (i, i + half)
        } else {
            (2 * i, 2 * i + 1)
        };
        let (x0, x1) = (src[i0], src[i1]);
        dst[i0] = x0.mul_add(c, -(x1 * s));
        dst[i1] = x0.mul_add(s, x1 * c);
    }
}

/// `dst = rope(a, positions)` for `a` of shape `[head_dim, n_heads, n_tokens]`
/// and I32 `positions` of `n_tokens`.
///
/// # Safety
/// Called by ggml with contiguous F32 `dst` and `a` of equal shape, a
/// contiguous I32 `positions` of `ne[2]` values, and `userdata` pointing to a
/// live [`RopeParams`] with `n_dims <= head_dim`, `n_dims` even.
pub(crate) unsafe extern "C" fn rope_op(
    dst: *mut sys::ggml_tensor,
    a: *const sys::ggml_tensor,
    positions: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let p = &*(userdata as *const RopeParams);
        let ne = (*a).ne;
        let (d, heads, n) = (ne[0] as usize, ne[1] as usize, ne[2] as usize);
        let src = std::slice::from_raw_parts((*a).data as *const f32, d * heads * n);
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, d * heads * n);
        let pos = std::slice::from_raw_parts((*positions).data as *const i32, n);
        let (r0, r1) = share(heads * n, ith, nth);
        let mut cache = Vec::with_capacity(p.n_dims / 2);
        let mut cached = None;
        for r in r0..r1 {
            let t = r / heads;
            if cached != Some(t) {
                rope_cache(p, pos[t], &mut cache);
                cached = Some(t);
            }
            rope_row(
                p,
                &cache,
                &src[r * d..(r + 1) * d],
                &mut out[r * d..(r + 1) * d],
            );
        }
    }
}

/// `dst = round_f16(a)` element-wise: the fp16 rounding ggml applies to a
/// matrix product's f32 operand when the other one is fp16, done up front so
/// the pinned ggml's f16 x f32 kernel multiplies the same values.
///
/// # Safety
/// Called by ggml with contiguous F32 `dst` and `a` of equal shape.
pub(crate) unsafe extern "C" fn round_f16_op(
    dst: *mut sys::ggml_tensor,
    a: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    _userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let (a, ne0) = rows_of(a);
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, a.len());
        let (r0, r1) = share(a.len() / ne0.max(1), ith, nth);
        for (o, &v) in out[r0 * ne0..r1 * ne0]
            .iter_mut()
            .zip(&a[r0 * ne0..r1 * ne0])
        {
            *o = round_f16(v);
        }
    }
}

/// `dst = softmax(a * scale + mask)` over rows of `a` (`[n_kv, n_tokens, n_head]`),
/// with `mask` of shape `[n_kv, n_tokens]` (0 or -inf), scale from the userdata.
///
/// # Safety
/// Called by ggml with contiguous F32 `dst` and `a` of equal shape and a
/// contiguous F32 `mask` whose rows are as long as `a`'s.
pub(crate) unsafe extern "C" fn soft_max_op(
    dst: *mut sys::ggml_tensor,
    a: *const sys::ggml_tensor,
    mask: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let scale = f32::from_bits(userdata as usize as u32);
        let (a, ne0) = rows_of(a);
        let (mask, _) = rows_of(mask);
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, a.len());
        let mask_rows = mask.len() / ne0.max(1);
        let (r0, r1) = share(a.len() / ne0.max(1), ith, nth);
        for r in r0..r1 {
            let m = &mask[(r % mask_rows.max(1)) * ne0..][..ne0];
            let x = &a[r * ne0..][..ne0];
            soft_max_row(&mut out[r * ne0..][..ne0], x, m, scale);
        }
    }
}

/// Dot product of fp16 values `a` (raw bits, as f32) with `b`, in a fixed order
/// that does not depend on the CPU: eight running lane sums (`lane[k % 8]`) in
/// f32, then one fixed tree. Every product of two fp16 values is exact in f32,
/// so a fused multiply-add and a multiply-then-add round the same, and the
/// vectorized (AVX2) and scalar builds of this loop give identical bits.
#[inline(always)]
fn dot_fixed(a: &[f32], b: &[f32]) -> f32 {
    let mut lane = [0f32; 8];
    let mut ca = a.chunks_exact(8);
    let mut cb = b.chunks_exact(8);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for k in 0..8 {
            lane[k] += x[k] * y[k];
        }
    }
    for (k, (x, y)) in ca.remainder().iter().zip(cb.remainder()).enumerate() {
        lane[k] += x * y;
    }
    ((lane[0] + lane[4]) + (lane[2] + lane[6])) + ((lane[1] + lane[5]) + (lane[3] + lane[7]))
}

dispatch!(dot_rows_fixed(out: &mut [f32], rows: &[f32], b: &[f32]) {
    let k = b.len();
    for (o, row) in out.iter_mut().zip(rows.chunks_exact(k.max(1))) {
        *o = dot_fixed(row, b);
    }
});

/// `dst = a · fp16(b)` with `a` an F16 tensor (any strides, contiguous rows)
/// `[K, M, Ha]` and `b` a contiguous F32 `[K, N, Hb]` (`Hb` a multiple of
/// `Ha`, broadcast as ggml's `mul_mat` does: head `h` of `b` uses head
/// `h / (Hb / Ha)` of `a`); `dst` is `[M, N, Hb]`, its shape taken from the
/// op's first source. The same product as ggml's `mul_mat`, but summed in the
/// CPU-independent order of [`dot_fixed`] instead of ggml's per-ISA vector
/// width: the exact-accumulation mode uses it for the attention products (K·Q
/// and softmax·V) so its results are bit-identical on every CPU.
///
/// # Safety
/// Called by ggml with `dst` a contiguous F32 tensor of `M·N·Hb` elements, `a`
/// an F16 tensor with `nb[0] == 2`, `b` a contiguous F32 tensor, shapes as
/// above.
pub(crate) unsafe extern "C" fn dot_f16_op(
    dst: *mut sys::ggml_tensor,
    _shape: *const sys::ggml_tensor,
    a: *const sys::ggml_tensor,
    b: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    _userdata: *mut c_void,
) {
    // SAFETY: the caller upholds this function's safety contract (its
    // `# Safety` section or the documented invariants it is called under).
    unsafe {
        let (ane, anb) = ((*a).ne, (*a).nb);
        let (k, m, ha) = (ane[0] as usize, ane[1] as usize, ane[2].max(1) as usize);
        let (bne, bnb) = ((*b).ne, (*b).nb);
        let (n, hb) = (bne[1] as usize, bne[2].max(1) as usize);
        let ratio = (hb / ha).max(1);
        let b_data = (*b).data as *const u8;
        let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, m * n * hb);
        // Thread `ith` takes a share of the `Hb · N` output rows; it converts the
        // fp16 rows of `a` for one head at a time (once per head, not per row).
        let (r0, r1) = share(hb * n, ith, nth);
        let mut rows = vec![0f32; m * k];
        let mut rows_head = usize::MAX;
        let mut bv = vec![0f32; k];
        for r in r0..r1 {
            let (h, t) = (r / n, r % n);
            let ah = h / ratio;
            if ah != rows_head {
                let base = ((*a).data as *const u8).add(ah * anb[2]);
                for (i, row) in rows.chunks_exact_mut(k).enumerate() {
                    let src =
                        std::slice::from_raw_parts(base.add(i * anb[1]).cast::<half::f16>(), k);
                    // Eight at a time where the CPU converts fp16 (F16C): the
                    // same exact widening as one by one, ~10x faster.
                    half::slice::HalfFloatSliceExt::convert_to_f32_slice(src, row);
                }
                rows_head = ah;
            }
            let src = b_data.add(h * bnb[2] + t * bnb[1]).cast::<f32>();
            for (d, &s) in bv.iter_mut().zip(std::slice::from_raw_parts(src, k)) {
                *d = round_f16(s);
            }
            dot_rows_fixed(&mut out[r * m..(r + 1) * m], &rows, &bv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate_over_the_useful_range() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp_f32(x) as f64;
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 5e-7, "worst relative error {worst}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
    }

    #[test]
    fn soft_max_matches_an_f64_reference() {
        for n in [1usize, 5, 8, 13, 64, 100] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919 % 23) as f32 - 11.0) * 0.7)
                .collect();
            // Causal-style mask: the last third is hidden, plus one hole inside.
            let mut m = vec![0f32; n];
            for v in m.iter_mut().skip(n - n / 3) {
                *v = f32::NEG_INFINITY;
            }
            if n > 4 {
                m[1] = f32::NEG_INFINITY;
            }
            let mut o = vec![f32::NAN; n];
            soft_max_row(&mut o, &x, &m, 0.125);
            let z: Vec<f64> = x
                .iter()
                .zip(&m)
                .map(|(&x, &m)| x as f64 * 0.125 + m as f64)
                .collect();
            let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
            for (j, (&got, v)) in o.iter().zip(&z).enumerate() {
                let want = (v - max).exp() / sum;
                // fp16 output: within half an fp16 ulp (2^-11 relative) plus f32 noise.
                assert_eq!(got, round_f16(got), "n={n} j={j}: not an fp16 value");
                assert!(
                    (got as f64 - want).abs() <= want * 4.9e-4 + 1e-7,
                    "n={n} j={j}: {got} vs {want}"
                );
                if m[j] == f32::NEG_INFINITY {
                    assert_eq!(got, 0.0);
                }
            }
        }
    }

    #[test]
    fn exp_special_values() {
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-200.0), 0.0);
        assert_eq!(exp_f32(200.0), f32::INFINITY);
        assert_eq!(exp_f32(f32::INFINITY), f32::INFINITY);
        assert!(exp_f32(f32::NAN).is_nan());
        // Subnormal results are rounded once, not flushed.
        let tiny = exp_f32(-90.0);
        assert!(tiny > 0.0 && tiny < f32::MIN_POSITIVE);
        assert!(((tiny as f64) / (-90f64).exp() - 1.0).abs() < 1e-4);
    }

    #[test]
    fn round_f16_is_nearest_even() {
        assert_eq!(round_f16(1.0), 1.0);
        // 1 + 2^-11 is halfway between 1 and 1 + 2^-10: ties go to even (1.0).
        assert_eq!(round_f16(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(
            round_f16(1.0 + 3.0 * 2f32.powi(-11)),
            1.0 + 2.0 * 2f32.powi(-10)
        );
        assert_eq!(round_f16(70000.0), f32::INFINITY);
    }

    #[test]
    fn rope_rotates_pairs_like_an_f64_reference() {
        for neox in [false, true] {
            let p = RopeParams {
                n_dims: 64,
                neox,
                freq_base: 100_000.0,
                freq_scale: 1.0,
            };
            let src: Vec<f32> = (0..64)
                .map(|i| ((i * 37 % 17) as f32 - 8.0) * 0.37)
                .collect();
            let mut cache = Vec::new();
            for pos in [0, 1, 7, 300] {
                rope_cache(&p, pos, &mut cache);
                let mut dst = vec![0f32; 64];
                rope_row(&p, &cache, &src, &mut dst);
                for i in 0..32 {
                    let (i0, i1) = if neox {
                        (i, i + 32)
                    } else {
                        (2 * i, 2 * i + 1)
                    };
                    let theta = pos as f64 * 100_000f64.powf(-2.0 * i as f64 / 64.0);
                    let (x0, x1) = (src[i0] as f64, src[i1] as f64);
                    let want0 = x0 * theta.cos() - x1 * theta.sin();
                    let want1 = x0 * theta.sin() + x1 * theta.cos();
                    // theta is accumulated in f32 over the pairs (as upstream does).
                    let tol = 1e-5 * (1.0 + theta.abs());
                    assert!((dst[i0] as f64 - want0).abs() < tol, "pos {pos} pair {i}");
                    assert!((dst[i1] as f64 - want1).abs() < tol, "pos {pos} pair {i}");
                }
                if pos == 0 {
                    assert_eq!(dst, src, "position 0 is the identity");
                }
            }
        }
    }

    #[test]
    fn swiglu_matches_definition() {
        let g: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 9.0).collect();
        let u: Vec<f32> = (0..37).map(|i| 1.0 - i as f32 * 0.1).collect();
        let mut o = vec![0f32; 37];
        swiglu(&mut o, &g, &u);
        for i in 0..37 {
            let (g, u) = (g[i] as f64, u[i] as f64);
            let want = g / (1.0 + (-g).exp()) * u;
            assert!(
                (o[i] as f64 - want).abs() < 1e-6 * want.abs().max(1.0),
                "{i}"
            );
        }
    }

    #[test]
    fn shares_cover_all_rows_once() {
        for rows in [0usize, 1, 7, 64, 1000] {
            for nth in 1..5 {
                let mut covered = 0;
                let mut next = 0;
                for ith in 0..nth {
                    let (a, b) = share(rows, ith, nth);
                    assert_eq!(a, next.min(rows));
                    covered += b - a;
                    next = b;
                }
                assert_eq!(covered, rows);
            }
        }
    }
}
