//! Element-wise kernels the pinned ggml computes with fp16 lookup tables
//! (SiLU and the softmax's exp round their input to fp16, ~1e-3 relative error),
//! done here in f32 the way current llama.cpp does, as ggml custom operations.
//!
//! Each kernel gets the thread index `ith` of `nth` and handles its share of rows.
//! Inputs are contiguous F32 tensors built by the graph code in `ggml.rs`.

use std::ffi::c_void;

use ggml_sys_bleedingedge as sys;

/// `exp(x)` in f32 to within ~2 ulp, branch-free so loops over it vectorize.
/// Inputs below -87.3 give ~0 (not exactly 0); above 88.3 saturate.
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor series of e^r on |r| <= ln2/2 to degree 7 (error < 1e-8 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
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
    let n = sys::ggml_nelements(t) as usize;
    let ne0 = (*t).ne[0] as usize;
    (std::slice::from_raw_parts((*t).data as *const f32, n), ne0)
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
    let (a, ne0) = rows_of(a);
    let (b, _) = rows_of(b);
    let n = a.len().min(b.len());
    let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, n);
    let (r0, r1) = share(n / ne0.max(1), ith, nth);
    let range = r0 * ne0..r1 * ne0;
    swiglu(&mut out[range.clone()], &a[range.clone()], &b[range]);
}

/// Defines `$name` to run `$body` through a copy compiled for AVX2 when the CPU
/// has it (the loops vectorize 8-wide there); the arithmetic is identical either
/// way, since Rust never contracts `a * b + c` into an FMA on its own.
macro_rules! dispatch {
    ($name:ident($($arg:ident: $ty:ty),*) $body:block) => {
        pub(crate) fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2")]
                unsafe fn avx2($($arg: $ty),*) {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: the CPU supports AVX2 (checked just above).
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

dispatch!(soft_max_row(o: &mut [f32], x: &[f32], m: &[f32], scale: f32) {
    // Masked (-inf) entries past the last visible key are exact zeros: skip them.
    let len = m.iter().rposition(|&v| v != f32::NEG_INFINITY).map_or(0, |p| p + 1);
    let (o, tail) = o.split_at_mut(len);
    tail.fill(0.0);
    for (o, (&x, &m)) in o.iter_mut().zip(x.iter().zip(m)) {
        *o = x * scale + m;
    }
    // Eight independent lanes so the reductions vectorize.
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = o.chunks_exact(8);
    for c in &mut chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = if v > *l { v } else { *l };
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).fold(f32::NEG_INFINITY, |a, &b| if b > a { b } else { a });
    let mut sums = [0f32; 8];
    let mut chunks = o.chunks_exact_mut(8);
    for c in &mut chunks {
        for (s, v) in sums.iter_mut().zip(c) {
            *v = if *v == f32::NEG_INFINITY { 0.0 } else { exp_f32(*v - max) };
            *s += *v;
        }
    }
    let mut sum: f32 = sums.iter().sum();
    for v in chunks.into_remainder() {
        *v = if *v == f32::NEG_INFINITY { 0.0 } else { exp_f32(*v - max) };
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in o.iter_mut() {
        *v *= inv;
    }
});

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
                assert!(
                    (got as f64 - want).abs() < 1e-6,
                    "n={n} j={j}: {got} vs {want}"
                );
                if m[j] == f32::NEG_INFINITY {
                    assert_eq!(got, 0.0);
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
