//! Builders of GGUF bytes, for tests and fuzz seeds: not a stable API.

pub use super::Writer;
use super::{GgmlType, Value, DEFAULT_ALIGNMENT};

/// Bytes of a `ty` tensor of shape `dims` (rounding partial blocks down).
pub fn tensor_bytes(dims: &[u64], ty: GgmlType) -> u64 {
    let ne0 = dims.first().copied().unwrap_or(1);
    let rows: u64 = dims.iter().skip(1).product();
    ne0 / ty.block_size() * ty.type_size() * rows
}

/// A valid GGUF v3 file with `metadata` and `tensors` (name, dims, type),
/// tensors laid out in order at `general.alignment` (or 32), each tensor's
/// data filled with a byte pattern, and no padding after the last tensor.
pub fn write_gguf(
    metadata: &[(String, Value)],
    tensors: &[(String, Vec<u64>, GgmlType)],
) -> Vec<u8> {
    let align = metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_i128())
        .and_then(|a| u64::try_from(a).ok())
        .unwrap_or(DEFAULT_ALIGNMENT);
    let mut w = Writer::new();
    w.header(3, tensors.len() as u64, metadata.len() as u64);
    for (k, v) in metadata {
        w.kv(k, v);
    }
    let mut offset = 0u64;
    let mut layout = Vec::new();
    for (name, dims, ty) in tensors {
        let size = tensor_bytes(dims, *ty);
        w.tensor_info(name, dims, *ty as u32, offset);
        layout.push(size);
        offset = (offset + size).div_ceil(align) * align;
    }
    w.pad_to(align);
    for (i, size) in layout.iter().enumerate() {
        w.pad_to(align);
        for j in 0..*size {
            w.buf.push((i as u64 * 31 + j) as u8);
        }
    }
    w.buf
}
