//! Tensor element types (ggml's numbering, block sizes) and tensor infos.

use super::*;
use crate::gguf::GgufErrorKind;

/// The element type of a tensor, with ggml's numbering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
#[allow(non_camel_case_types)]
pub enum GgmlType {
    /// 32-bit float.
    F32 = 0,
    /// 16-bit IEEE float.
    F16 = 1,
    /// 4-bit quantization, blocks of 32 with one scale.
    Q4_0 = 2,
    /// 4-bit quantization, blocks of 32 with scale and minimum.
    Q4_1 = 3,
    /// 5-bit quantization, blocks of 32 with one scale.
    Q5_0 = 6,
    /// 5-bit quantization, blocks of 32 with scale and minimum.
    Q5_1 = 7,
    /// 8-bit quantization, blocks of 32 with one scale.
    Q8_0 = 8,
    /// 8-bit quantization, blocks of 32 with scale and sum.
    Q8_1 = 9,
    /// 2-bit k-quant, super-blocks of 256.
    Q2_K = 10,
    /// 3-bit k-quant, super-blocks of 256.
    Q3_K = 11,
    /// 4-bit k-quant, super-blocks of 256.
    Q4_K = 12,
    /// 5-bit k-quant, super-blocks of 256.
    Q5_K = 13,
    /// 6-bit k-quant, super-blocks of 256.
    Q6_K = 14,
    /// 8-bit k-quant, super-blocks of 256.
    Q8_K = 15,
    /// 8-bit signed integer.
    I8 = 24,
    /// 16-bit signed integer.
    I16 = 25,
    /// 32-bit signed integer.
    I32 = 26,
    /// 64-bit signed integer.
    I64 = 27,
    /// 64-bit float.
    F64 = 28,
    /// 16-bit bfloat.
    BF16 = 30,
}

impl GgmlType {
    /// Every type this build understands, in ggml's numbering order.
    pub const ALL: [GgmlType; 20] = [
        Self::F32,
        Self::F16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q8_1,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q8_K,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F64,
        Self::BF16,
    ];

    /// The type with ggml number `v`; other numbers are [`Error::Unsupported`].
    pub fn from_u32(v: u32) -> Result<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|t| *t as u32 == v)
            .ok_or_else(|| {
                Error::Unsupported(format!(
                    "tensor type {v}: expected one of {}",
                    Self::ALL
                        .iter()
                        .map(|t| format!("{} ({})", t.name(), *t as u32))
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })
    }

    /// Elements per block: 1 for plain types, 32 for Q4_x/Q5_x/Q8_x, 256 for k-quants.
    pub fn block_size(self) -> u64 {
        match self {
            Self::F32
            | Self::F16
            | Self::BF16
            | Self::F64
            | Self::I8
            | Self::I16
            | Self::I32
            | Self::I64 => 1,
            Self::Q4_0 | Self::Q4_1 | Self::Q5_0 | Self::Q5_1 | Self::Q8_0 | Self::Q8_1 => 32,
            Self::Q2_K | Self::Q3_K | Self::Q4_K | Self::Q5_K | Self::Q6_K | Self::Q8_K => 256,
        }
    }

    /// Bytes per block.
    pub fn type_size(self) -> u64 {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q5_0 => 22,
            Self::Q5_1 => 24,
            Self::Q8_0 => 34,
            Self::Q8_1 => 36,
            Self::Q2_K => 84,
            Self::Q3_K => 110,
            Self::Q4_K => 144,
            Self::Q5_K => 176,
            Self::Q6_K => 210,
            Self::Q8_K => 292,
            Self::I8 => 1,
            Self::I16 => 2,
            Self::I32 => 4,
            Self::I64 => 8,
            Self::F64 => 8,
            Self::BF16 => 2,
        }
    }

    /// ggml's name for the type ("F32", "Q4_1", "Q6_K", ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "F32",
            Self::F16 => "F16",
            Self::Q4_0 => "Q4_0",
            Self::Q4_1 => "Q4_1",
            Self::Q5_0 => "Q5_0",
            Self::Q5_1 => "Q5_1",
            Self::Q8_0 => "Q8_0",
            Self::Q8_1 => "Q8_1",
            Self::Q2_K => "Q2_K",
            Self::Q3_K => "Q3_K",
            Self::Q4_K => "Q4_K",
            Self::Q5_K => "Q5_K",
            Self::Q6_K => "Q6_K",
            Self::Q8_K => "Q8_K",
            Self::I8 => "I8",
            Self::I16 => "I16",
            Self::I32 => "I32",
            Self::I64 => "I64",
            Self::F64 => "F64",
            Self::BF16 => "BF16",
        }
    }

    /// Bytes of one row of `ne0` elements; `ne0` must be a whole number of blocks.
    pub fn row_bytes(self, ne0: u64) -> Result<u64> {
        let bs = self.block_size();
        if !ne0.is_multiple_of(bs) {
            return Err(Error::gguf(
                GgufErrorKind::BadTensor,
                format!(
                    "row length {ne0} is not a multiple of the {} block size {bs}",
                    self.name()
                ),
            ));
        }
        (ne0 / bs).checked_mul(self.type_size()).ok_or_else(|| {
            Error::gguf(
                GgufErrorKind::BadTensor,
                format!(
                    "row of {ne0} {} elements is larger than 2^64 bytes",
                    self.name()
                ),
            )
        })
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's name, shape, type and location in the file.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Shape in ggml order: `dims[0]` is the row length (innermost); 1 to 4 dims.
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Absolute file offset of the tensor data.
    pub offset: u64,
    /// Bytes of tensor data.
    pub size: u64,
}

impl TensorInfo {
    /// Number of elements (product of the dims).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// Number of rows (product of `dims[1..]`).
    pub fn rows(&self) -> u64 {
        self.dims
            .get(1..)
            .unwrap_or(&[])
            .iter()
            .fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// Row length (`dims[0]`).
    pub fn cols(&self) -> u64 {
        self.dims.first().copied().unwrap_or(1)
    }

    /// The tensor's bytes within `file`, the bytes it was parsed from.
    pub fn data<'a>(&self, file: &'a [u8]) -> Result<&'a [u8]> {
        let end = self.offset.saturating_add(self.size);
        usize::try_from(self.offset)
            .ok()
            .zip(usize::try_from(end).ok())
            .and_then(|(start, end)| file.get(start..end))
            .ok_or_else(|| {
                Error::gguf(
                    GgufErrorKind::Truncated,
                    format!(
                    "tensor {}: data 0x{:x}..0x{end:x} is past the end of the file (size 0x{:x})",
                    self.name,
                    self.offset,
                    file.len()
                ),
                )
            })
    }
}
