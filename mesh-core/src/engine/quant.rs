//! Quantize and dequantize weight rows with ggml's own reference code, so that
//! tools and tests can build models in every supported block format and compare
//! against exact dequantized values.

use ggml_sys_bleedingedge as sys;

use crate::engine::GgmlErrorKind;
use crate::gguf::GgmlType;
use crate::{Error, Result};

/// Block formats [`quantize`] and [`dequantize`] accept.
pub const QUANT_TYPES: [GgmlType; 12] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// ggml fills its fp16 conversion tables in the first `ggml_init`; conversions
/// before that read zeros. Creating (and freeing) a tiny context guarantees it.
fn ensure_ggml_tables() -> Result<()> {
    let params = sys::ggml_init_params {
        mem_size: 1024,
        mem_buffer: std::ptr::null_mut(),
        no_alloc: true,
    };
    // SAFETY: a plain context init/free; ggml initializes its tables once,
    // guarded by its own critical section.
    let ctx = unsafe { sys::ggml_init(params) };
    if ctx.is_null() {
        return Err(Error::ggml(GgmlErrorKind::Alloc, "ggml_init failed"));
    }
    // SAFETY: `ctx` was just created and is not used after this.
    unsafe { sys::ggml_free(ctx) };
    Ok(())
}

fn check(ty: GgmlType, n: usize, row_len: usize) -> Result<usize> {
    ensure_ggml_tables()?;
    if !QUANT_TYPES.contains(&ty) {
        return Err(Error::Unsupported(format!("quantizing to {}", ty.name())));
    }
    if row_len == 0 || !n.is_multiple_of(row_len) {
        return Err(Error::InvalidArgument(format!(
            "{n} values: expected a whole number of rows of {row_len}"
        )));
    }
    let row_bytes = ty.row_bytes(row_len as u64)? as usize;
    Ok(n / row_len * row_bytes)
}

/// Quantize `values` (rows of `row_len` values; `row_len` a multiple of the
/// format's block size) to `ty`, as GGUF stores it.
pub fn quantize(ty: GgmlType, values: &[f32], row_len: usize) -> Result<Vec<u8>> {
    let bytes = check(ty, values.len(), row_len)?;
    let mut out = vec![0u8; bytes];
    if values.is_empty() {
        return Ok(out);
    }
    // SAFETY: `values` holds nrows * row_len floats and `out` exactly the bytes
    // of that many rows of `ty` (checked above); the type is one ggml quantizes
    // without an importance matrix; start = 0 satisfies ggml's alignment asserts.
    let written = unsafe {
        sys::ggml_quantize_chunk(
            ty as u32 as sys::ggml_type,
            values.as_ptr(),
            out.as_mut_ptr().cast(),
            0,
            (values.len() / row_len) as i64,
            row_len as i64,
            std::ptr::null(),
        )
    };
    if written != bytes {
        return Err(Error::ggml(
            GgmlErrorKind::Internal,
            format!(
                "quantizing to {}: expected {bytes} bytes, ggml wrote {written}",
                ty.name()
            ),
        ));
    }
    Ok(out)
}

/// Dequantize `n` values (rows of `row_len`) of format `ty` from `bytes`.
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize, row_len: usize) -> Result<Vec<f32>> {
    let need = check(ty, n, row_len)?;
    if bytes.len() != need {
        return Err(Error::InvalidArgument(format!(
            "{n} values of {}: expected {need} bytes, found {}",
            ty.name(),
            bytes.len()
        )));
    }
    let mut out = vec![0f32; n];
    if ty == GgmlType::F32 {
        for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        return Ok(out);
    }
    // SAFETY: reads ggml's static type table for a supported type.
    let traits = unsafe { sys::ggml_internal_get_type_traits(ty as u32 as sys::ggml_type) };
    let to_float = traits
        .to_float
        .ok_or_else(|| Error::Unsupported(format!("dequantizing {}", ty.name())))?;
    // SAFETY: `bytes` holds exactly the blocks of `n` values (checked above) and
    // `out` has room for `n` floats.
    unsafe { to_float(bytes.as_ptr().cast(), out.as_mut_ptr(), n as i64) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_error_is_what_each_format_promises() {
        let row = 512;
        let values: Vec<f32> = (0..2 * row)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0)
            .collect();
        for (ty, bound) in [
            (GgmlType::F32, 0.0),
            (GgmlType::F16, 1e-3),
            (GgmlType::Q8_0, 1e-2),
            (GgmlType::Q6_K, 3e-2),
            (GgmlType::Q5_K, 5e-2),
            (GgmlType::Q4_K, 0.1),
            (GgmlType::Q4_1, 0.1),
            (GgmlType::Q4_0, 0.15),
        ] {
            let q = quantize(ty, &values, row).unwrap();
            assert_eq!(q.len() as u64, ty.row_bytes(row as u64).unwrap() * 2);
            let back = dequantize(ty, &q, values.len(), row).unwrap();
            let num: f64 = values
                .iter()
                .zip(&back)
                .map(|(a, b)| ((a - b) as f64).powi(2))
                .sum();
            let den: f64 = values.iter().map(|a| (*a as f64).powi(2)).sum();
            let rel = (num / den).sqrt();
            assert!(rel <= bound, "{}: relative error {rel}", ty.name());
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        assert!(quantize(GgmlType::Q4_K, &[0.0; 100], 100).is_err());
        assert!(quantize(GgmlType::Q8_0, &[0.0; 33], 32).is_err());
        assert!(quantize(GgmlType::BF16, &[0.0; 32], 32).is_err());
        assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32, 32).is_err());
    }
}
