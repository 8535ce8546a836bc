//! GGUF model files: parsing and validation of untrusted bytes.
//!
//! [`Gguf::parse`] reads the header, the metadata key/value table and the
//! tensor table of a GGUF v2 or v3 file (little-endian), and checks everything
//! a loader relies on before any tensor data is touched: counts bounded by the
//! bytes that follow, strings that are valid UTF-8, known value and tensor
//! types, tensor shapes that fit ggml (1 to 4 dimensions, no overflow, whole
//! quantization blocks per row), aligned tensor offsets, tensor data that lies
//! inside the file, and tensors that do not overlap.
//!
//! ```no_run
//! # fn main() -> mesh_core::Result<()> {
//! # let bytes: Vec<u8> = Vec::new();
//! use mesh_core::gguf::Gguf;
//! let gguf = Gguf::parse(&bytes)?;
//! let layers = gguf.get_u32("llama.block_count")?;
//! let embd = gguf.require_tensor("token_embd.weight")?;
//! let data = embd.data(&bytes)?;
//! # let _ = (layers, data);
//! # Ok(())
//! # }
//! ```

use crate::{Error, Result};
use std::collections::HashMap;
use std::fmt;

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";

/// Data alignment used when a file has no `general.alignment` key.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Most dimensions a tensor may have (ggml's `GGML_MAX_DIMS`).
pub const MAX_DIMS: usize = 4;

/// Longest tensor name in bytes (ggml keeps names in a 64-byte buffer with a NUL).
pub const MAX_TENSOR_NAME_LEN: usize = 63;

/// Longest metadata key in bytes (the GGUF specification's limit).
pub const MAX_KEY_LEN: usize = 65_535;

/// How deeply arrays may nest inside arrays (an array of arrays is depth 2).
pub const MAX_ARRAY_DEPTH: usize = 4;

/// Bytes of the fixed header: magic, version, tensor count, metadata count.
const HEADER_LEN: usize = 24;

/// Fewest bytes one tensor info can take: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_LEN: u64 = 8 + 4 + 8 + 4 + 8;

/// Fewest bytes one metadata entry can take: key length, value type, a one-byte value.
const MIN_KV_LEN: u64 = 8 + 4 + 1;

/// A parsed and validated GGUF file: its metadata and its tensor table.
///
/// Tensor data is not copied: each [`TensorInfo`] records where its bytes lie
/// in the file that was parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct Gguf {
    /// Format version: 2 or 3.
    pub version: u32,
    /// Alignment of the data section and of every tensor offset
    /// (`general.alignment`, or [`DEFAULT_ALIGNMENT`]); a nonzero power of two.
    pub alignment: u64,
    /// Absolute file offset where tensor data starts; a multiple of `alignment`.
    pub data_offset: u64,
    /// Metadata entries in file order; keys are unique.
    pub metadata: Vec<(String, Value)>,
    /// Tensors in file order; names are unique.
    pub tensors: Vec<TensorInfo>,
}

/// The type tag of a metadata value, as stored in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ValueType {
    /// Unsigned 8-bit integer.
    U8 = 0,
    /// Signed 8-bit integer.
    I8 = 1,
    /// Unsigned 16-bit integer.
    U16 = 2,
    /// Signed 16-bit integer.
    I16 = 3,
    /// Unsigned 32-bit integer.
    U32 = 4,
    /// Signed 32-bit integer.
    I32 = 5,
    /// 32-bit float.
    F32 = 6,
    /// Boolean stored as one byte, 0 or 1.
    Bool = 7,
    /// UTF-8 string with a u64 length prefix.
    String = 8,
    /// Array: element type, u64 count, elements.
    Array = 9,
    /// Unsigned 64-bit integer.
    U64 = 10,
    /// Signed 64-bit integer.
    I64 = 11,
    /// 64-bit float.
    F64 = 12,
}

impl ValueType {
    /// The value type with file tag `v`; unknown tags are a malformed file.
    pub fn from_u32(v: u32) -> Result<Self> {
        Ok(match v {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => {
                return Err(Error::Gguf(format!(
                    "unknown value type {v}: expected 0..=12"
                )))
            }
        })
    }

    /// Lower-case name of the type ("u32", "string", "array", ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::U8 => "u8",
            Self::I8 => "i8",
            Self::U16 => "u16",
            Self::I16 => "i16",
            Self::U32 => "u32",
            Self::I32 => "i32",
            Self::F32 => "f32",
            Self::Bool => "bool",
            Self::String => "string",
            Self::Array => "array",
            Self::U64 => "u64",
            Self::I64 => "i64",
            Self::F64 => "f64",
        }
    }

    /// Bytes one value of this type takes in the file, for fixed-size types.
    fn fixed_size(self) -> Option<u64> {
        match self {
            Self::U8 | Self::I8 | Self::Bool => Some(1),
            Self::U16 | Self::I16 => Some(2),
            Self::U32 | Self::I32 | Self::F32 => Some(4),
            Self::U64 | Self::I64 | Self::F64 => Some(8),
            Self::String | Self::Array => None,
        }
    }

    /// Fewest bytes one value of this type can take in the file.
    fn min_size(self) -> u64 {
        match self {
            Self::String => 8,
            Self::Array => 4 + 8,
            other => other.fixed_size().unwrap_or(1),
        }
    }
}

impl fmt::Display for ValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Unsigned 8-bit integer.
    U8(u8),
    /// Signed 8-bit integer.
    I8(i8),
    /// Unsigned 16-bit integer.
    U16(u16),
    /// Signed 16-bit integer.
    I16(i16),
    /// Unsigned 32-bit integer.
    U32(u32),
    /// Signed 32-bit integer.
    I32(i32),
    /// Unsigned 64-bit integer.
    U64(u64),
    /// Signed 64-bit integer.
    I64(i64),
    /// 32-bit float.
    F32(f32),
    /// 64-bit float.
    F64(f64),
    /// Boolean.
    Bool(bool),
    /// UTF-8 string.
    String(String),
    /// Homogeneous array.
    Array(Array),
}

impl Value {
    /// The type tag this value is stored with.
    pub fn value_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F32(_) => ValueType::F32,
            Self::F64(_) => ValueType::F64,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array(_) => ValueType::Array,
        }
    }

    /// Name of this value's type, with the element type for arrays
    /// ("u32", "string", "array of string", ...).
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Array(a) => a.type_name(),
            other => other.value_type().name(),
        }
    }

    /// The value as an integer, if it is one (of any width or sign).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            Self::U8(v) => v.into(),
            Self::I8(v) => v.into(),
            Self::U16(v) => v.into(),
            Self::I16(v) => v.into(),
            Self::U32(v) => v.into(),
            Self::I32(v) => v.into(),
            Self::U64(v) => v.into(),
            Self::I64(v) => v.into(),
            _ => return None,
        })
    }
}

/// Shows the value itself: numbers and booleans plainly, strings quoted,
/// arrays as their type and length with the first few elements.
impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::U8(v) => write!(f, "{v}"),
            Self::I8(v) => write!(f, "{v}"),
            Self::U16(v) => write!(f, "{v}"),
            Self::I16(v) => write!(f, "{v}"),
            Self::U32(v) => write!(f, "{v}"),
            Self::I32(v) => write!(f, "{v}"),
            Self::U64(v) => write!(f, "{v}"),
            Self::I64(v) => write!(f, "{v}"),
            Self::F32(v) => write!(f, "{v}"),
            Self::F64(v) => write!(f, "{v}"),
            Self::Bool(v) => write!(f, "{v}"),
            Self::String(v) => write!(f, "{v:?}"),
            Self::Array(a) => write!(f, "{a}"),
        }
    }
}

/// A homogeneous metadata array.
#[derive(Debug, Clone, PartialEq)]
pub enum Array {
    /// Array of u8.
    U8(Vec<u8>),
    /// Array of i8.
    I8(Vec<i8>),
    /// Array of u16.
    U16(Vec<u16>),
    /// Array of i16.
    I16(Vec<i16>),
    /// Array of u32.
    U32(Vec<u32>),
    /// Array of i32.
    I32(Vec<i32>),
    /// Array of u64.
    U64(Vec<u64>),
    /// Array of i64.
    I64(Vec<i64>),
    /// Array of f32.
    F32(Vec<f32>),
    /// Array of f64.
    F64(Vec<f64>),
    /// Array of bool.
    Bool(Vec<bool>),
    /// Array of strings.
    String(Vec<String>),
    /// Array of arrays (nesting depth is limited to [`MAX_ARRAY_DEPTH`]).
    Array(Vec<Array>),
}

impl Array {
    /// The type tag of the elements.
    pub fn elem_type(&self) -> ValueType {
        match self {
            Self::U8(_) => ValueType::U8,
            Self::I8(_) => ValueType::I8,
            Self::U16(_) => ValueType::U16,
            Self::I16(_) => ValueType::I16,
            Self::U32(_) => ValueType::U32,
            Self::I32(_) => ValueType::I32,
            Self::U64(_) => ValueType::U64,
            Self::I64(_) => ValueType::I64,
            Self::F32(_) => ValueType::F32,
            Self::F64(_) => ValueType::F64,
            Self::Bool(_) => ValueType::Bool,
            Self::String(_) => ValueType::String,
            Self::Array(_) => ValueType::Array,
        }
    }

    /// Name of the array type ("array of string", ...).
    pub fn type_name(&self) -> &'static str {
        match self.elem_type() {
            ValueType::U8 => "array of u8",
            ValueType::I8 => "array of i8",
            ValueType::U16 => "array of u16",
            ValueType::I16 => "array of i16",
            ValueType::U32 => "array of u32",
            ValueType::I32 => "array of i32",
            ValueType::U64 => "array of u64",
            ValueType::I64 => "array of i64",
            ValueType::F32 => "array of f32",
            ValueType::F64 => "array of f64",
            ValueType::Bool => "array of bool",
            ValueType::String => "array of string",
            ValueType::Array => "array of array",
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::U8(v) => v.len(),
            Self::I8(v) => v.len(),
            Self::U16(v) => v.len(),
            Self::I16(v) => v.len(),
            Self::U32(v) => v.len(),
            Self::I32(v) => v.len(),
            Self::U64(v) => v.len(),
            Self::I64(v) => v.len(),
            Self::F32(v) => v.len(),
            Self::F64(v) => v.len(),
            Self::Bool(v) => v.len(),
            Self::String(v) => v.len(),
            Self::Array(v) => v.len(),
        }
    }

    /// True when the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Shows the array type and length and up to its first eight elements.
impl fmt::Display for Array {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 8;
        fn list<T: fmt::Debug>(f: &mut fmt::Formatter<'_>, v: &[T]) -> fmt::Result {
            for (i, x) in v.iter().take(SHOWN).enumerate() {
                if i > 0 {
                    f.write_str(", ")?;
                }
                write!(f, "{x:?}")?;
            }
            Ok(())
        }
        write!(f, "[{} x{}: ", self.type_name(), self.len())?;
        match self {
            Self::U8(v) => list(f, v)?,
            Self::I8(v) => list(f, v)?,
            Self::U16(v) => list(f, v)?,
            Self::I16(v) => list(f, v)?,
            Self::U32(v) => list(f, v)?,
            Self::I32(v) => list(f, v)?,
            Self::U64(v) => list(f, v)?,
            Self::I64(v) => list(f, v)?,
            Self::F32(v) => list(f, v)?,
            Self::F64(v) => list(f, v)?,
            Self::Bool(v) => list(f, v)?,
            Self::String(v) => list(f, v)?,
            Self::Array(v) => {
                for (i, a) in v.iter().take(SHOWN).enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{a}")?;
                }
            }
        }
        if self.len() > SHOWN {
            f.write_str(", ...")?;
        }
        f.write_str("]")
    }
}

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
            return Err(Error::Gguf(format!(
                "row length {ne0} is not a multiple of the {} block size {bs}",
                self.name()
            )));
        }
        (ne0 / bs).checked_mul(self.type_size()).ok_or_else(|| {
            Error::Gguf(format!(
                "row of {ne0} {} elements is larger than 2^64 bytes",
                self.name()
            ))
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
                Error::Gguf(format!(
                    "tensor {}: data 0x{:x}..0x{end:x} is past the end of the file (size 0x{:x})",
                    self.name,
                    self.offset,
                    file.len()
                ))
            })
    }
}

impl Gguf {
    /// Parse and validate a whole GGUF file.
    ///
    /// Fails with [`Error::Gguf`] for a malformed file and
    /// [`Error::Unsupported`] for a version or tensor type this build does not
    /// handle; never panics, whatever the bytes.
    pub fn parse(bytes: &[u8]) -> Result<Gguf> {
        let mut r = Reader { bytes, pos: 0 };
        let version = read_header_start(&mut r)?;
        let n_tensors = r.u64("tensor count")?;
        let n_kv = r.u64("metadata entry count")?;
        let need = n_tensors
            .checked_mul(MIN_TENSOR_INFO_LEN)
            .zip(n_kv.checked_mul(MIN_KV_LEN))
            .and_then(|(a, b)| a.checked_add(b));
        if need.is_none_or(|need| need > r.remaining()) {
            return Err(Error::Gguf(format!(
                "header claims {n_tensors} tensors and {n_kv} metadata entries, which need at \
                 least {} bytes, but only {} bytes follow the header",
                need.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                r.remaining()
            )));
        }

        let mut metadata = Vec::new();
        for i in 0..n_kv {
            metadata.push(read_kv(&mut r, i)?);
        }
        check_unique(metadata.iter().map(|(k, _)| k.as_str()), "metadata key")?;

        let mut raw = Vec::new();
        for i in 0..n_tensors {
            raw.push(read_tensor_info(&mut r, i)?);
        }
        check_unique(raw.iter().map(|t| t.name.as_str()), "tensor name")?;

        let alignment = alignment(&metadata)?;
        let file_len = len_u64(bytes.len());
        let infos_end = len_u64(r.pos);
        let data_offset = align_up(infos_end, alignment).ok_or_else(|| {
            Error::Gguf(format!(
                "data section offset: aligning 0x{infos_end:x} to {alignment} overflows u64"
            ))
        })?;
        if data_offset > file_len {
            return Err(Error::Gguf(format!(
                "data section starts at 0x{data_offset:x} (tensor infos end at 0x{infos_end:x}, \
                 aligned to {alignment}), past the end of the file (size 0x{file_len:x})"
            )));
        }

        let tensors = raw
            .into_iter()
            .map(|t| t.locate(data_offset, alignment, file_len))
            .collect::<Result<Vec<_>>>()?;
        check_no_overlap(&tensors)?;

        Ok(Gguf {
            version,
            alignment,
            data_offset,
            metadata,
            tensors,
        })
    }

    /// The value of metadata key `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The value of a required key.
    fn required(&self, key: &str) -> Result<&Value> {
        self.get(key)
            .ok_or_else(|| Error::Gguf(format!("missing required key {key}")))
    }

    /// A required string value.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        as_str(key, self.required(key)?)
    }

    /// An optional string value (`Ok(None)` when the key is absent).
    pub fn get_opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| as_str(key, v)).transpose()
    }

    /// A required integer that fits in a u32 (stored as any integer type).
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        as_u32(key, self.required(key)?)
    }

    /// An optional integer that fits in a u32 (`Ok(None)` when the key is absent).
    pub fn get_opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.get(key).map(|v| as_u32(key, v)).transpose()
    }

    /// A required float, stored as f32 or f64.
    pub fn get_f32(&self, key: &str) -> Result<f32> {
        as_f32(key, self.required(key)?)
    }

    /// An optional float, stored as f32 or f64 (`Ok(None)` when the key is absent).
    pub fn get_opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.get(key).map(|v| as_f32(key, v)).transpose()
    }

    /// A required boolean.
    pub fn get_bool(&self, key: &str) -> Result<bool> {
        as_bool(key, self.required(key)?)
    }

    /// An optional boolean (`Ok(None)` when the key is absent).
    pub fn get_opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| as_bool(key, v)).transpose()
    }

    /// A required array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<&[String]> {
        match self.get_array(key)? {
            Array::String(v) => Ok(v),
            other => Err(wrong_type(key, "array of string", other.type_name())),
        }
    }

    /// A required array of any element type.
    pub fn get_array(&self, key: &str) -> Result<&Array> {
        match self.required(key)? {
            Value::Array(a) => Ok(a),
            other => Err(wrong_type(key, "array", other.type_name())),
        }
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor named `name`; its absence is an error.
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name)
            .ok_or_else(|| Error::Gguf(format!("missing tensor {name}")))
    }

    /// The model architecture (`general.architecture`, e.g. "llama").
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }
}

fn wrong_type(key: &str, expected: &str, found: &str) -> Error {
    Error::Gguf(format!("key {key}: expected {expected}, found {found}"))
}

fn as_str<'a>(key: &str, v: &'a Value) -> Result<&'a str> {
    match v {
        Value::String(s) => Ok(s),
        other => Err(wrong_type(key, "string", other.type_name())),
    }
}

fn as_u32(key: &str, v: &Value) -> Result<u32> {
    let n = v
        .as_i128()
        .ok_or_else(|| wrong_type(key, "an integer", v.type_name()))?;
    u32::try_from(n).map_err(|_| {
        Error::Gguf(format!(
            "key {key}: expected an integer in 0..=4294967295, found {} {n}",
            v.type_name()
        ))
    })
}

fn as_f32(key: &str, v: &Value) -> Result<f32> {
    match *v {
        Value::F32(x) => Ok(x),
        Value::F64(x) => {
            // Narrowing is the intent; only a finite value turning infinite is an error.
            let y = x as f32;
            if x.is_finite() && !y.is_finite() {
                return Err(Error::Gguf(format!(
                    "key {key}: expected a value in f32 range, found f64 {x:?}"
                )));
            }
            Ok(y)
        }
        ref other => Err(wrong_type(key, "f32", other.type_name())),
    }
}

fn as_bool(key: &str, v: &Value) -> Result<bool> {
    match v {
        Value::Bool(b) => Ok(*b),
        other => Err(wrong_type(key, "bool", other.type_name())),
    }
}

/// `usize` to `u64`; lossless on every platform Rust supports.
fn len_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// Round `n` up to a multiple of `align` (a nonzero power of two).
fn align_up(n: u64, align: u64) -> Option<u64> {
    let mask = align.checked_sub(1)?;
    Some(n.checked_add(mask)? & !mask)
}

/// Prefix the message of a parse error with where it happened.
fn context(e: Error, at: impl fmt::Display) -> Error {
    match e {
        Error::Gguf(m) => Error::Gguf(format!("{at}: {m}")),
        Error::Unsupported(m) => Error::Unsupported(format!("{at}: {m}")),
        other => other,
    }
}

/// Hex dump of a few bytes, "47 47 4d 4c".
fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Check the magic and version; returns the version.
fn read_header_start(r: &mut Reader<'_>) -> Result<u32> {
    let bytes = r.bytes;
    let Some(magic) = bytes.first_chunk::<4>() else {
        return Err(Error::Gguf(format!(
            "file is {} bytes, too short for a GGUF header ({HEADER_LEN} bytes); \
             found {}",
            bytes.len(),
            if bytes.is_empty() {
                "nothing".to_string()
            } else {
                hex(bytes)
            }
        )));
    };
    if *magic != MAGIC {
        let mut swapped = MAGIC;
        swapped.reverse();
        if *magic == swapped {
            return Err(Error::Unsupported(
                "byte-swapped magic \"FUGG\": this is a big-endian GGUF file; \
                 only little-endian files are supported"
                    .to_string(),
            ));
        }
        return Err(Error::Gguf(format!(
            "bad magic: expected \"GGUF\" (47 47 55 46), found {}",
            hex(magic)
        )));
    }
    r.pos = 4;
    let version = r.u32("version")?;
    match version {
        2 | 3 => Ok(version),
        1 => Err(Error::Unsupported(
            "GGUF version 1: expected version 2 or 3 (version 1 is obsolete; \
             re-convert the model)"
                .to_string(),
        )),
        v if (1..=3).contains(&v.swap_bytes()) => Err(Error::Unsupported(format!(
            "GGUF version field 0x{v:08x} is version {} byte-swapped: this is a big-endian \
             GGUF file; only little-endian files are supported",
            v.swap_bytes()
        ))),
        v => Err(Error::Unsupported(format!(
            "GGUF version {v}: expected version 2 or 3"
        ))),
    }
}

/// A little-endian cursor over untrusted bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> u64 {
        len_u64(self.bytes.len().saturating_sub(self.pos))
    }

    fn truncated(&self, what: &str, need: impl fmt::Display) -> Error {
        Error::Gguf(format!(
            "unexpected end of file at offset 0x{:x} reading {what}: need {need} bytes, \
             {} left",
            self.pos,
            self.remaining()
        ))
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let slice = usize::try_from(n)
            .ok()
            .and_then(|n| Some(self.pos..self.pos.checked_add(n)?))
            .and_then(|range| self.bytes.get(range));
        match slice {
            Some(s) => {
                self.pos += s.len();
                Ok(s)
            }
            None => Err(self.truncated(what, n)),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let rest = self.bytes.get(self.pos..).unwrap_or(&[]);
        match rest.first_chunk::<N>() {
            Some(a) => {
                self.pos += N;
                Ok(*a)
            }
            None => Err(self.truncated(what, N)),
        }
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(u8::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        let at = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(Error::Gguf(format!(
                "{what} at offset 0x{at:x}: expected bool 0 or 1, found {b}"
            ))),
        }
    }

    /// A `gguf_string`: u64 length and UTF-8 bytes.
    fn string(&mut self, what: &str, max_len: u64) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > max_len {
            return Err(Error::Gguf(format!(
                "{what} at offset 0x{at:x}: length {len} is longer than the limit of {max_len}"
            )));
        }
        if len > self.remaining() {
            return Err(Error::Gguf(format!(
                "{what} at offset 0x{at:x}: length {len} runs past the end of the file \
                 ({} bytes left)",
                self.remaining()
            )));
        }
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            let bad = start.saturating_add(e.utf8_error().valid_up_to());
            Error::Gguf(format!(
                "{what} at offset 0x{at:x}: expected UTF-8, found invalid byte 0x{:02x} at \
                 offset 0x{bad:x}",
                e.as_bytes()
                    .get(e.utf8_error().valid_up_to())
                    .copied()
                    .unwrap_or(0)
            ))
        })
    }

    /// `count` fixed-size elements decoded with `f` from `N`-byte chunks.
    fn fixed<const N: usize, T>(
        &mut self,
        count: u64,
        what: &str,
        f: impl Fn([u8; N]) -> T,
    ) -> Result<Vec<T>> {
        let n = len_u64(N);
        let len = count
            .checked_mul(n)
            .ok_or_else(|| self.truncated(what, format_args!("{count} x {n}")))?;
        let bytes = self.take(len, what)?;
        Ok(bytes
            .chunks_exact(N)
            .filter_map(|c| c.first_chunk::<N>())
            .map(|c| f(*c))
            .collect())
    }
}

/// Read one metadata entry, the `index`th.
fn read_kv(r: &mut Reader<'_>, index: u64) -> Result<(String, Value)> {
    let at = r.pos;
    let key = r.string("key", len_u64(MAX_KEY_LEN)).map_err(|e| {
        context(
            e,
            format_args!("metadata entry #{index} at offset 0x{at:x}"),
        )
    })?;
    let value = r
        .u32("value type")
        .and_then(ValueType::from_u32)
        .and_then(|ty| read_value(r, ty))
        .map_err(|e| context(e, format_args!("key {key}")))?;
    Ok((key, value))
}

fn read_value(r: &mut Reader<'_>, ty: ValueType) -> Result<Value> {
    let name = ty.name();
    Ok(match ty {
        ValueType::U8 => Value::U8(r.u8(name)?),
        ValueType::I8 => Value::I8(i8::from_le_bytes(r.array(name)?)),
        ValueType::U16 => Value::U16(u16::from_le_bytes(r.array(name)?)),
        ValueType::I16 => Value::I16(i16::from_le_bytes(r.array(name)?)),
        ValueType::U32 => Value::U32(r.u32(name)?),
        ValueType::I32 => Value::I32(i32::from_le_bytes(r.array(name)?)),
        ValueType::U64 => Value::U64(r.u64(name)?),
        ValueType::I64 => Value::I64(i64::from_le_bytes(r.array(name)?)),
        ValueType::F32 => Value::F32(f32::from_le_bytes(r.array(name)?)),
        ValueType::F64 => Value::F64(f64::from_le_bytes(r.array(name)?)),
        ValueType::Bool => Value::Bool(r.bool(name)?),
        ValueType::String => Value::String(r.string("string", u64::MAX)?),
        ValueType::Array => Value::Array(read_array(r, 1)?),
    })
}

/// Read an array value (element type, count, elements) nested `depth` deep.
fn read_array(r: &mut Reader<'_>, depth: usize) -> Result<Array> {
    let elem = r.u32("array element type").and_then(ValueType::from_u32)?;
    let at = r.pos;
    let count = r.u64("array length")?;
    let need = count.checked_mul(elem.min_size());
    if need.is_none_or(|need| need > r.remaining()) {
        return Err(Error::Gguf(format!(
            "array at offset 0x{at:x}: {count} {elem} elements need at least {} bytes, \
             {} left",
            need.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
            r.remaining()
        )));
    }
    let what = "array elements";
    Ok(match elem {
        ValueType::U8 => Array::U8(r.fixed(count, what, u8::from_le_bytes)?),
        ValueType::I8 => Array::I8(r.fixed(count, what, i8::from_le_bytes)?),
        ValueType::U16 => Array::U16(r.fixed(count, what, u16::from_le_bytes)?),
        ValueType::I16 => Array::I16(r.fixed(count, what, i16::from_le_bytes)?),
        ValueType::U32 => Array::U32(r.fixed(count, what, u32::from_le_bytes)?),
        ValueType::I32 => Array::I32(r.fixed(count, what, i32::from_le_bytes)?),
        ValueType::U64 => Array::U64(r.fixed(count, what, u64::from_le_bytes)?),
        ValueType::I64 => Array::I64(r.fixed(count, what, i64::from_le_bytes)?),
        ValueType::F32 => Array::F32(r.fixed(count, what, f32::from_le_bytes)?),
        ValueType::F64 => Array::F64(r.fixed(count, what, f64::from_le_bytes)?),
        ValueType::Bool => {
            let start = r.pos;
            let raw = r.fixed(count, what, u8::from_le_bytes)?;
            let mut out = Vec::with_capacity(raw.len());
            for (i, b) in raw.into_iter().enumerate() {
                match b {
                    0 => out.push(false),
                    1 => out.push(true),
                    b => {
                        return Err(Error::Gguf(format!(
                            "array element {i} at offset 0x{:x}: expected bool 0 or 1, found {b}",
                            start.saturating_add(i)
                        )))
                    }
                }
            }
            Array::Bool(out)
        }
        ValueType::String => {
            let mut out = Vec::new();
            for i in 0..count {
                out.push(
                    r.string("string", u64::MAX)
                        .map_err(|e| context(e, format_args!("array element {i}")))?,
                );
            }
            Array::String(out)
        }
        ValueType::Array => {
            if depth >= MAX_ARRAY_DEPTH {
                return Err(Error::Gguf(format!(
                    "array at offset 0x{at:x}: expected arrays nested at most \
                     {MAX_ARRAY_DEPTH} deep, found deeper nesting"
                )));
            }
            let mut out = Vec::new();
            for i in 0..count {
                out.push(
                    read_array(r, depth + 1)
                        .map_err(|e| context(e, format_args!("array element {i}")))?,
                );
            }
            Array::Array(out)
        }
    })
}

/// A tensor info as read, before its data is located.
struct RawTensor {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    rel_offset: u64,
}

fn read_tensor_info(r: &mut Reader<'_>, index: u64) -> Result<RawTensor> {
    let at = r.pos;
    let name = r
        .string("tensor name", len_u64(MAX_TENSOR_NAME_LEN))
        .map_err(|e| context(e, format_args!("tensor #{index} at offset 0x{at:x}")))?;
    let rest = (|| {
        let n_dims = r.u32("n_dims")?;
        if !(1..=len_u64(MAX_DIMS)).contains(&u64::from(n_dims)) {
            return Err(Error::Gguf(format!(
                "expected 1 to {MAX_DIMS} dimensions, found {n_dims}"
            )));
        }
        let mut dims = Vec::with_capacity(MAX_DIMS);
        for i in 0..n_dims {
            let d = r.u64("dimension")?;
            if d == 0 {
                return Err(Error::Gguf(format!(
                    "dimension {i}: expected at least 1, found 0"
                )));
            }
            dims.push(d);
        }
        let ggml_type = GgmlType::from_u32(r.u32("tensor type")?)?;
        let rel_offset = r.u64("tensor offset")?;
        Ok(RawTensor {
            name: String::new(),
            dims,
            ggml_type,
            rel_offset,
        })
    })()
    .map_err(|e| context(e, format_args!("tensor {name}")))?;
    Ok(RawTensor { name, ..rest })
}

impl RawTensor {
    /// Check the shape and place the data inside the file.
    fn locate(self, data_offset: u64, alignment: u64, file_len: u64) -> Result<TensorInfo> {
        let at = |m: String| Error::Gguf(format!("tensor {}: {m}", self.name));
        let dims_str = || {
            self.dims
                .iter()
                .map(u64::to_string)
                .collect::<Vec<_>>()
                .join("x")
        };
        // ggml holds sizes in int64_t: the element count must fit there.
        let n_elements = self
            .dims
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d))
            .filter(|&n| i64::try_from(n).is_ok())
            .ok_or_else(|| {
                at(format!(
                    "shape {}: expected at most {} elements, found more",
                    dims_str(),
                    i64::MAX
                ))
            })?;
        let ne0 = self.dims.first().copied().unwrap_or(1);
        let rows = n_elements / ne0.max(1);
        let row_bytes = self
            .ggml_type
            .row_bytes(ne0)
            .map_err(|e| context(e, format_args!("tensor {}", self.name)))?;
        let size = row_bytes.checked_mul(rows).ok_or_else(|| {
            at(format!(
                "shape {} of {}: data size overflows u64",
                dims_str(),
                self.ggml_type
            ))
        })?;
        if !self.rel_offset.is_multiple_of(alignment) {
            return Err(at(format!(
                "offset 0x{:x}: expected a multiple of the alignment {alignment}",
                self.rel_offset
            )));
        }
        let offset = data_offset.checked_add(self.rel_offset);
        let end = offset.and_then(|o| o.checked_add(size));
        let (Some(offset), Some(end)) = (offset, end) else {
            return Err(at(format!(
                "data at 0x{data_offset:x} + 0x{:x}, size 0x{size:x}, is past the end of \
                 the file (size 0x{file_len:x})",
                self.rel_offset
            )));
        };
        if end > file_len {
            return Err(at(format!(
                "data 0x{offset:x}..0x{end:x} is past the end of the file (size 0x{file_len:x})"
            )));
        }
        Ok(TensorInfo {
            name: self.name,
            dims: self.dims,
            ggml_type: self.ggml_type,
            offset,
            size,
        })
    }
}

/// `general.alignment`, or the default; must be a nonzero power of two.
fn alignment(metadata: &[(String, Value)]) -> Result<u64> {
    const KEY: &str = "general.alignment";
    let Some((_, v)) = metadata.iter().find(|(k, _)| k == KEY) else {
        return Ok(DEFAULT_ALIGNMENT);
    };
    let n = v
        .as_i128()
        .ok_or_else(|| wrong_type(KEY, "an integer", v.type_name()))?;
    u64::try_from(n)
        .ok()
        .filter(|a| a.is_power_of_two())
        .ok_or_else(|| {
            Error::Gguf(format!(
                "key {KEY}: expected a nonzero power of two, found {n}"
            ))
        })
}

fn check_unique<'a>(names: impl Iterator<Item = &'a str>, what: &str) -> Result<()> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, name) in names.enumerate() {
        if let Some(first) = seen.insert(name, i) {
            return Err(Error::Gguf(format!(
                "duplicate {what} {name:?}: expected unique, found at #{first} and #{i}"
            )));
        }
    }
    Ok(())
}

fn check_no_overlap(tensors: &[TensorInfo]) -> Result<()> {
    let mut sorted: Vec<&TensorInfo> = tensors.iter().collect();
    sorted.sort_by_key(|t| (t.offset, t.size));
    for pair in sorted.windows(2) {
        let [a, b] = pair else { continue };
        let a_end = a.offset.saturating_add(a.size);
        if a_end > b.offset {
            return Err(Error::Gguf(format!(
                "tensors {} (0x{:x}..0x{a_end:x}) and {} (0x{:x}..0x{:x}) overlap",
                a.name,
                a.offset,
                b.name,
                b.offset,
                b.offset.saturating_add(b.size)
            )));
        }
    }
    Ok(())
}

/// Builders of GGUF bytes, for tests and fuzz seeds: not a stable API.
#[doc(hidden)]
pub mod testing {
    use super::{Array, GgmlType, Value, DEFAULT_ALIGNMENT};

    /// A little-endian byte sink that writes GGUF pieces with no validation,
    /// so tests can build malformed files too.
    #[derive(Debug, Default, Clone)]
    pub struct Writer {
        /// Bytes written so far.
        pub buf: Vec<u8>,
    }

    impl Writer {
        /// An empty writer.
        pub fn new() -> Self {
            Self::default()
        }

        /// Raw bytes.
        pub fn raw(&mut self, b: &[u8]) -> &mut Self {
            self.buf.extend_from_slice(b);
            self
        }

        /// A u32.
        pub fn u32(&mut self, v: u32) -> &mut Self {
            self.raw(&v.to_le_bytes())
        }

        /// A u64.
        pub fn u64(&mut self, v: u64) -> &mut Self {
            self.raw(&v.to_le_bytes())
        }

        /// A `gguf_string` from arbitrary bytes.
        pub fn string(&mut self, s: &[u8]) -> &mut Self {
            self.u64(s.len() as u64).raw(s)
        }

        /// Magic, version, tensor count, metadata count.
        pub fn header(&mut self, version: u32, n_tensors: u64, n_kv: u64) -> &mut Self {
            self.raw(b"GGUF").u32(version).u64(n_tensors).u64(n_kv)
        }

        /// One metadata entry: key, type tag, value.
        pub fn kv(&mut self, key: &str, v: &Value) -> &mut Self {
            self.string(key.as_bytes())
                .u32(v.value_type() as u32)
                .value(v)
        }

        /// A value without its type tag.
        pub fn value(&mut self, v: &Value) -> &mut Self {
            match v {
                Value::U8(x) => self.raw(&x.to_le_bytes()),
                Value::I8(x) => self.raw(&x.to_le_bytes()),
                Value::U16(x) => self.raw(&x.to_le_bytes()),
                Value::I16(x) => self.raw(&x.to_le_bytes()),
                Value::U32(x) => self.raw(&x.to_le_bytes()),
                Value::I32(x) => self.raw(&x.to_le_bytes()),
                Value::U64(x) => self.raw(&x.to_le_bytes()),
                Value::I64(x) => self.raw(&x.to_le_bytes()),
                Value::F32(x) => self.raw(&x.to_le_bytes()),
                Value::F64(x) => self.raw(&x.to_le_bytes()),
                Value::Bool(x) => self.raw(&[u8::from(*x)]),
                Value::String(s) => self.string(s.as_bytes()),
                Value::Array(a) => self.array(a),
            }
        }

        /// An array value: element type, count, elements.
        pub fn array(&mut self, a: &Array) -> &mut Self {
            self.u32(a.elem_type() as u32).u64(a.len() as u64);
            fn each<T: Copy>(w: &mut Writer, v: &[T], f: impl Fn(T) -> Value) {
                for x in v {
                    w.value(&f(*x));
                }
            }
            match a {
                Array::U8(v) => each(self, v, Value::U8),
                Array::I8(v) => each(self, v, Value::I8),
                Array::U16(v) => each(self, v, Value::U16),
                Array::I16(v) => each(self, v, Value::I16),
                Array::U32(v) => each(self, v, Value::U32),
                Array::I32(v) => each(self, v, Value::I32),
                Array::U64(v) => each(self, v, Value::U64),
                Array::I64(v) => each(self, v, Value::I64),
                Array::F32(v) => each(self, v, Value::F32),
                Array::F64(v) => each(self, v, Value::F64),
                Array::Bool(v) => each(self, v, Value::Bool),
                Array::String(v) => {
                    for s in v {
                        self.string(s.as_bytes());
                    }
                }
                Array::Array(v) => {
                    for inner in v {
                        self.array(inner);
                    }
                }
            }
            self
        }

        /// One tensor info with a raw type number and a relative offset.
        pub fn tensor_info(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> &mut Self {
            self.string(name.as_bytes()).u32(dims.len() as u32);
            for &d in dims {
                self.u64(d);
            }
            self.u32(ty).u64(offset)
        }

        /// Zero bytes up to the next multiple of `align`.
        pub fn pad_to(&mut self, align: u64) -> &mut Self {
            while !(self.buf.len() as u64).is_multiple_of(align.max(1)) {
                self.buf.push(0);
            }
            self
        }
    }

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
}

#[cfg(test)]
mod tests {
    use super::testing::{tensor_bytes, write_gguf, Writer};
    use super::*;
    use proptest::prelude::*;

    fn s(v: &str) -> Value {
        Value::String(v.to_string())
    }

    fn kv(k: &str, v: Value) -> (String, Value) {
        (k.to_string(), v)
    }

    fn t(name: &str, dims: &[u64], ty: GgmlType) -> (String, Vec<u64>, GgmlType) {
        (name.to_string(), dims.to_vec(), ty)
    }

    /// A small llama-like file.
    fn sample() -> Vec<u8> {
        write_gguf(
            &[
                kv("general.architecture", s("llama")),
                kv("llama.block_count", Value::U32(2)),
                kv("llama.rope.freq_base", Value::F32(10000.0)),
                kv(
                    "tokenizer.ggml.tokens",
                    Value::Array(Array::String(vec!["<s>".into(), "a".into()])),
                ),
            ],
            &[
                t("token_embd.weight", &[64, 2], GgmlType::Q4_1),
                t("output_norm.weight", &[64], GgmlType::F32),
                t("blk.0.attn_q.weight", &[64, 64], GgmlType::Q8_0),
            ],
        )
    }

    /// Header + tensor infos for `tensors` (raw type and relative offset), padded,
    /// followed by `data_len` bytes of data.
    fn raw_file(tensors: &[(&str, &[u64], u32, u64)], data_len: usize) -> Vec<u8> {
        let mut w = Writer::new();
        w.header(3, tensors.len() as u64, 0);
        for (name, dims, ty, off) in tensors {
            w.tensor_info(name, dims, *ty, *off);
        }
        w.pad_to(DEFAULT_ALIGNMENT);
        w.buf.resize(w.buf.len() + data_len, 0xab);
        w.buf
    }

    /// A file whose only metadata entry is `key` with raw type `ty` and raw value bytes.
    fn raw_kv(key: &[u8], ty: u32, value: &[u8]) -> Vec<u8> {
        let mut w = Writer::new();
        w.header(3, 0, 1).string(key).u32(ty).raw(value).pad_to(32);
        w.buf
    }

    fn gguf_err(bytes: &[u8]) -> String {
        match Gguf::parse(bytes) {
            Err(Error::Gguf(m)) => m,
            other => panic!("expected Error::Gguf, got {other:?}"),
        }
    }

    fn unsupported_err(bytes: &[u8]) -> String {
        match Gguf::parse(bytes) {
            Err(Error::Unsupported(m)) => m,
            other => panic!("expected Error::Unsupported, got {other:?}"),
        }
    }

    fn assert_contains(msg: &str, parts: &[&str]) {
        for p in parts {
            assert!(msg.contains(p), "message {msg:?} lacks {p:?}");
        }
    }

    #[test]
    fn parses_a_valid_file() {
        let bytes = sample();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.version, 3);
        assert_eq!(g.alignment, 32);
        assert_eq!(g.data_offset % 32, 0);
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.get_u32("llama.block_count").unwrap(), 2);
        assert_eq!(g.get_f32("llama.rope.freq_base").unwrap(), 10000.0);
        assert_eq!(
            g.get_str_array("tokenizer.ggml.tokens").unwrap(),
            ["<s>", "a"]
        );
        let e = g.require_tensor("token_embd.weight").unwrap();
        assert_eq!(e.dims, [64, 2]);
        assert_eq!((e.cols(), e.rows(), e.n_elements()), (64, 2, 128));
        assert_eq!(e.size, 2 * 2 * 20);
        assert_eq!(e.offset, g.data_offset);
        assert_eq!(e.data(&bytes).unwrap().len(), 80);
        let q = g.tensor("blk.0.attn_q.weight").unwrap();
        assert_eq!(q.ggml_type, GgmlType::Q8_0);
        assert_eq!(q.size, 64 * 2 * 34);
        assert_eq!(q.offset + q.size, bytes.len() as u64);
        let names: Vec<_> = g.tensors.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "token_embd.weight",
                "output_norm.weight",
                "blk.0.attn_q.weight"
            ]
        );
    }

    #[test]
    fn version_2_is_accepted() {
        let mut bytes = sample();
        bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(Gguf::parse(&bytes).unwrap().version, 2);
    }

    #[test]
    fn custom_alignment_places_data() {
        let bytes = write_gguf(
            &[kv("general.alignment", Value::U32(256))],
            &[t("a", &[3], GgmlType::F32), t("b", &[5], GgmlType::F16)],
        );
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(g.alignment, 256);
        assert_eq!(g.data_offset % 256, 0);
        assert_eq!(g.tensors[1].offset, g.data_offset + 256);
        assert_eq!(g.tensors[1].size, 10);
    }

    #[test]
    fn bad_alignment_is_rejected() {
        for (v, found) in [
            (Value::U32(24), "found 24"),
            (Value::U32(0), "found 0"),
            (Value::I32(-32), "found -32"),
        ] {
            let bytes = write_gguf(&[kv("general.alignment", v)], &[]);
            assert_contains(
                &gguf_err(&bytes),
                &["general.alignment", "power of two", found],
            );
        }
        let bytes = write_gguf(&[kv("general.alignment", s("32"))], &[]);
        assert_contains(
            &gguf_err(&bytes),
            &["general.alignment", "expected an integer", "found string"],
        );
    }

    #[test]
    fn bad_magic() {
        let mut bytes = sample();
        bytes[..4].copy_from_slice(b"GGML");
        assert_contains(
            &gguf_err(&bytes),
            &["bad magic", "expected \"GGUF\"", "found 47 47 4d 4c"],
        );
    }

    #[test]
    fn short_files() {
        assert_contains(&gguf_err(b""), &["0 bytes", "found nothing"]);
        assert_contains(&gguf_err(b"GG"), &["2 bytes", "47 47"]);
        assert_contains(
            &gguf_err(b"GGUF\x03\0"),
            &["end of file", "version", "need 4 bytes, 2 left"],
        );
        assert_contains(
            &gguf_err(&sample()[..20]),
            &[
                "end of file",
                "metadata entry count",
                "need 8 bytes, 4 left",
            ],
        );
    }

    #[test]
    fn big_endian_is_unsupported() {
        let mut bytes = sample();
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        assert_contains(
            &unsupported_err(&bytes),
            &["big-endian", "0x03000000", "little-endian"],
        );
        bytes[..4].copy_from_slice(b"FUGG");
        assert_contains(&unsupported_err(&bytes), &["big-endian", "FUGG"]);
    }

    #[test]
    fn unsupported_versions() {
        for (v, found) in [(1u32, "version 1"), (4, "version 4"), (0, "version 0")] {
            let mut bytes = sample();
            bytes[4..8].copy_from_slice(&v.to_le_bytes());
            assert_contains(
                &unsupported_err(&bytes),
                &[found, "expected version 2 or 3"],
            );
        }
    }

    #[test]
    fn counts_bounded_by_remaining_bytes() {
        let mut w = Writer::new();
        w.header(3, u64::MAX, 0);
        assert_contains(
            &gguf_err(&w.buf),
            &[
                "18446744073709551615 tensors",
                "more than 2^64",
                "0 bytes follow",
            ],
        );
        let mut w = Writer::new();
        w.header(3, 0, 1000).raw(&[0; 100]);
        assert_contains(
            &gguf_err(&w.buf),
            &[
                "1000 metadata entries",
                "at least 13000 bytes",
                "only 100 bytes",
            ],
        );
    }

    #[test]
    fn invalid_utf8_value_names_the_key() {
        let mut value = 2u64.to_le_bytes().to_vec();
        value.extend_from_slice(&[0x61, 0xff]);
        let msg = gguf_err(&raw_kv(b"general.name", 8, &value));
        assert_contains(&msg, &["key general.name", "expected UTF-8", "0xff"]);

        let mut arr = Vec::new();
        arr.extend_from_slice(&8u32.to_le_bytes());
        arr.extend_from_slice(&2u64.to_le_bytes());
        arr.extend_from_slice(&1u64.to_le_bytes());
        arr.push(b'a');
        arr.extend_from_slice(&1u64.to_le_bytes());
        arr.push(0xc3);
        let msg = gguf_err(&raw_kv(b"tokenizer.ggml.tokens", 9, &arr));
        assert_contains(
            &msg,
            &[
                "key tokenizer.ggml.tokens",
                "array element 1",
                "expected UTF-8",
            ],
        );
    }

    #[test]
    fn invalid_utf8_key() {
        let msg = gguf_err(&raw_kv(b"gen\xfe", 4, &7u32.to_le_bytes()));
        assert_contains(
            &msg,
            &["metadata entry #0", "key", "expected UTF-8", "0xfe"],
        );
    }

    #[test]
    fn string_length_past_end() {
        let mut value = 1000u64.to_le_bytes().to_vec();
        value.extend_from_slice(b"abc");
        let msg = gguf_err(&raw_kv(b"general.name", 8, &value));
        assert_contains(&msg, &["key general.name", "length 1000", "past the end"]);

        let mut w = Writer::new();
        w.header(3, 0, 1).u64(u64::MAX).raw(&[0; 20]);
        assert_contains(
            &gguf_err(&w.buf),
            &["metadata entry #0", "longer than the limit"],
        );
    }

    #[test]
    fn unknown_value_type() {
        let msg = gguf_err(&raw_kv(b"general.name", 13, &[0; 8]));
        assert_contains(
            &msg,
            &["key general.name", "unknown value type 13", "0..=12"],
        );
        let mut arr = 77u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&0u64.to_le_bytes());
        let msg = gguf_err(&raw_kv(b"x", 9, &arr));
        assert_contains(&msg, &["key x", "unknown value type 77"]);
    }

    #[test]
    fn bool_must_be_0_or_1() {
        let msg = gguf_err(&raw_kv(b"general.flag", 7, &[2]));
        assert_contains(&msg, &["key general.flag", "expected bool 0 or 1, found 2"]);
        let mut arr = 7u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&3u64.to_le_bytes());
        arr.extend_from_slice(&[1, 0, 9]);
        let msg = gguf_err(&raw_kv(b"flags", 9, &arr));
        assert_contains(&msg, &["key flags", "element 2", "found 9"]);
    }

    #[test]
    fn array_count_bounded_by_remaining_bytes() {
        for (elem, min) in [(4u32, "4000"), (8, "8000"), (9, "12000")] {
            let mut arr = elem.to_le_bytes().to_vec();
            arr.extend_from_slice(&1000u64.to_le_bytes());
            arr.extend_from_slice(&[0; 64]);
            let msg = gguf_err(&raw_kv(b"k", 9, &arr));
            assert_contains(&msg, &["key k", "1000", min, "bytes"]);
        }
        let mut arr = 12u32.to_le_bytes().to_vec();
        arr.extend_from_slice(&u64::MAX.to_le_bytes());
        assert_contains(&gguf_err(&raw_kv(b"k", 9, &arr)), &["more than 2^64"]);
    }

    #[test]
    fn nested_arrays_are_depth_limited() {
        let mut nested = Array::U8(vec![1, 2]);
        for _ in 1..MAX_ARRAY_DEPTH {
            nested = Array::Array(vec![nested]);
        }
        let ok = write_gguf(&[kv("deep", Value::Array(nested.clone()))], &[]);
        let g = Gguf::parse(&ok).unwrap();
        assert_eq!(g.get_array("deep").unwrap(), &nested);

        let too_deep = write_gguf(&[kv("deep", Value::Array(Array::Array(vec![nested])))], &[]);
        assert_contains(
            &gguf_err(&too_deep),
            &["key deep", "nested at most 4 deep", "found deeper"],
        );
    }

    #[test]
    fn duplicate_keys_and_tensor_names() {
        let bytes = write_gguf(&[kv("a", Value::U8(1)), kv("a", Value::U8(2))], &[]);
        assert_contains(
            &gguf_err(&bytes),
            &["duplicate metadata key \"a\"", "#0 and #1"],
        );
        let bytes = write_gguf(
            &[],
            &[t("w", &[4], GgmlType::F32), t("w", &[4], GgmlType::F32)],
        );
        assert_contains(
            &gguf_err(&bytes),
            &["duplicate tensor name \"w\"", "#0 and #1"],
        );
    }

    #[test]
    fn n_dims_must_be_1_to_4() {
        for n in [0usize, 5] {
            let dims = vec![1u64; n];
            let msg = gguf_err(&raw_file(&[("w", &dims, 0, 0)], 64));
            assert_contains(
                &msg,
                &[
                    "tensor w",
                    "expected 1 to 4 dimensions",
                    &format!("found {n}"),
                ],
            );
        }
    }

    #[test]
    fn zero_dim_is_rejected() {
        let msg = gguf_err(&raw_file(&[("w", &[4, 0], 0, 0)], 64));
        assert_contains(
            &msg,
            &["tensor w", "dimension 1", "expected at least 1, found 0"],
        );
    }

    #[test]
    fn element_count_overflow() {
        let big = 1u64 << 32;
        let msg = gguf_err(&raw_file(&[("w", &[big, big], 0, 0)], 64));
        assert_contains(&msg, &["tensor w", "4294967296x4294967296", "elements"]);
        let msg = gguf_err(&raw_file(&[("w", &[1 << 63], 0, 0)], 64));
        assert_contains(&msg, &["tensor w", "9223372036854775807"]);
    }

    #[test]
    fn row_not_a_multiple_of_block_size() {
        let msg = gguf_err(&raw_file(&[("blk.0.ffn_up.weight", &[48, 2], 3, 0)], 64));
        assert_contains(
            &msg,
            &[
                "tensor blk.0.ffn_up.weight",
                "row length 48",
                "Q4_1 block size 32",
            ],
        );
    }

    #[test]
    fn unknown_tensor_type() {
        let msg = unsupported_err(&raw_file(&[("w", &[32], 99, 0)], 64));
        assert_contains(
            &msg,
            &["tensor w", "tensor type 99", "expected one of", "Q4_1 (3)"],
        );
        // Removed types 4 and 5 (Q4_2, Q4_3) are unsupported too.
        unsupported_err(&raw_file(&[("w", &[32], 4, 0)], 64));
    }

    #[test]
    fn offset_must_be_aligned() {
        let msg = gguf_err(&raw_file(&[("w", &[4], 0, 8)], 64));
        assert_contains(
            &msg,
            &["tensor w", "offset 0x8", "multiple of the alignment 32"],
        );
    }

    #[test]
    fn data_past_end_of_file() {
        let bytes = raw_file(&[("blk.3.attn_q.weight", &[16, 16], 0, 0)], 64);
        let data_offset = bytes.len() - 64;
        let msg = gguf_err(&bytes);
        assert_contains(
            &msg,
            &[
                "tensor blk.3.attn_q.weight",
                &format!("data 0x{data_offset:x}..0x{:x}", data_offset + 1024),
                &format!("past the end of the file (size 0x{:x})", bytes.len()),
            ],
        );
        let msg = gguf_err(&raw_file(&[("w", &[4], 0, u64::MAX - 31)], 64));
        assert_contains(&msg, &["tensor w", "past the end of the file"]);
    }

    #[test]
    fn tensors_must_not_overlap() {
        let msg = gguf_err(&raw_file(&[("a", &[16], 0, 0), ("b", &[8], 0, 32)], 128));
        assert_contains(&msg, &["tensors a", "and b", "overlap"]);
        // Touching is fine.
        Gguf::parse(&raw_file(&[("a", &[8], 0, 0), ("b", &[8], 0, 32)], 128)).unwrap();
    }

    #[test]
    fn tensor_name_length_limited() {
        let long = "x".repeat(64);
        let msg = gguf_err(&raw_file(&[(&long, &[4], 0, 0)], 64));
        assert_contains(&msg, &["tensor #0", "length 64", "limit of 63"]);
    }

    #[test]
    fn data_section_past_end() {
        let mut w = Writer::new();
        w.header(3, 0, 0);
        assert_contains(
            &gguf_err(&w.buf),
            &["data section starts at 0x20", "size 0x18"],
        );
    }

    #[test]
    fn getters_report_expected_and_found() {
        let bytes = write_gguf(
            &[
                kv("s", s("x")),
                kv("u", Value::U32(7)),
                kv("neg", Value::I32(-1)),
                kv("big", Value::U64(1 << 40)),
                kv("small", Value::U8(3)),
                kv("i64", Value::I64(5)),
                kv("f64", Value::F64(0.5)),
                kv("huge", Value::F64(1e300)),
                kv("b", Value::Bool(true)),
                kv("ints", Value::Array(Array::I32(vec![1]))),
            ],
            &[],
        );
        let g = Gguf::parse(&bytes).unwrap();
        let msg = |r: Result<String>| match r {
            Err(Error::Gguf(m)) => m,
            other => panic!("expected Error::Gguf, got {other:?}"),
        };
        assert_eq!(
            msg(g.get_str("nope").map(str::to_string)),
            "missing required key nope"
        );
        assert_eq!(
            msg(g.get_str("u").map(str::to_string)),
            "key u: expected string, found u32"
        );
        assert_contains(
            &msg(g.get_u32("neg").map(|v| v.to_string())),
            &["key neg", "0..=4294967295", "found i32 -1"],
        );
        assert_contains(
            &msg(g.get_u32("big").map(|v| v.to_string())),
            &["key big", "found u64 1099511627776"],
        );
        assert_eq!(
            msg(g.get_u32("s").map(|v| v.to_string())),
            "key s: expected an integer, found string"
        );
        assert_eq!(g.get_u32("small").unwrap(), 3);
        assert_eq!(g.get_u32("i64").unwrap(), 5);
        assert_eq!(g.get_f32("f64").unwrap(), 0.5);
        assert_contains(
            &msg(g.get_f32("huge").map(|v| v.to_string())),
            &["f32 range", "1e300"],
        );
        assert_eq!(
            msg(g.get_f32("u").map(|v| v.to_string())),
            "key u: expected f32, found u32"
        );
        assert!(g.get_bool("b").unwrap());
        assert_eq!(
            msg(g.get_bool("s").map(|v| v.to_string())),
            "key s: expected bool, found string"
        );
        assert_eq!(
            msg(g.get_str_array("ints").map(|v| v.len().to_string())),
            "key ints: expected array of string, found array of i32"
        );
        assert_eq!(
            msg(g.get_array("u").map(|v| v.len().to_string())),
            "key u: expected array, found u32"
        );
        assert_eq!(g.get_opt_u32("nope").unwrap(), None);
        assert_eq!(g.get_opt_f32("nope").unwrap(), None);
        assert_eq!(g.get_opt_str("nope").unwrap(), None);
        assert_eq!(g.get_opt_bool("nope").unwrap(), None);
        assert_eq!(g.get_opt_u32("u").unwrap(), Some(7));
        assert!(g.get_opt_str("u").is_err());
        assert_eq!(
            msg(g.require_tensor("output.weight").map(|t| t.name.clone())),
            "missing tensor output.weight"
        );
        assert_eq!(
            msg(g.architecture().map(str::to_string)),
            "missing required key general.architecture"
        );
    }

    #[test]
    fn ggml_type_table() {
        let expected: [(GgmlType, u32, u64, u64); 20] = [
            (GgmlType::F32, 0, 1, 4),
            (GgmlType::F16, 1, 1, 2),
            (GgmlType::Q4_0, 2, 32, 18),
            (GgmlType::Q4_1, 3, 32, 20),
            (GgmlType::Q5_0, 6, 32, 22),
            (GgmlType::Q5_1, 7, 32, 24),
            (GgmlType::Q8_0, 8, 32, 34),
            (GgmlType::Q8_1, 9, 32, 36),
            (GgmlType::Q2_K, 10, 256, 84),
            (GgmlType::Q3_K, 11, 256, 110),
            (GgmlType::Q4_K, 12, 256, 144),
            (GgmlType::Q5_K, 13, 256, 176),
            (GgmlType::Q6_K, 14, 256, 210),
            (GgmlType::Q8_K, 15, 256, 292),
            (GgmlType::I8, 24, 1, 1),
            (GgmlType::I16, 25, 1, 2),
            (GgmlType::I32, 26, 1, 4),
            (GgmlType::I64, 27, 1, 8),
            (GgmlType::F64, 28, 1, 8),
            (GgmlType::BF16, 30, 1, 2),
        ];
        for (ty, id, bs, ts) in expected {
            assert_eq!(GgmlType::from_u32(id).unwrap(), ty);
            assert_eq!(ty as u32, id);
            assert_eq!((ty.block_size(), ty.type_size()), (bs, ts), "{ty}");
            assert_eq!(ty.row_bytes(bs * 3).unwrap(), ts * 3);
            assert_eq!(format!("{ty:?}"), ty.name());
        }
        assert_eq!(GgmlType::Q4_1.row_bytes(576).unwrap(), 18 * 20);
        assert!(matches!(GgmlType::Q4_K.row_bytes(576), Err(Error::Gguf(_))));
        assert!(matches!(
            GgmlType::F32.row_bytes(u64::MAX),
            Err(Error::Gguf(_))
        ));
        for bad in [4, 5, 16, 29, 31, 1000, u32::MAX] {
            assert!(matches!(
                GgmlType::from_u32(bad),
                Err(Error::Unsupported(_))
            ));
        }
    }

    #[test]
    fn value_type_names_and_display() {
        assert_eq!(Value::U32(1).type_name(), "u32");
        assert_eq!(Value::Array(Array::F32(vec![])).type_name(), "array of f32");
        assert_eq!(ValueType::String.to_string(), "string");
        assert_eq!(s("hi").to_string(), "\"hi\"");
        let a = Value::Array(Array::U32((0..10).collect()));
        assert_eq!(
            a.to_string(),
            "[array of u32 x10: 0, 1, 2, 3, 4, 5, 6, 7, ...]"
        );
        for v in 0..=12 {
            assert_eq!(ValueType::from_u32(v).unwrap() as u32, v);
        }
    }

    // ---- property tests -------------------------------------------------

    fn arb_f32() -> impl Strategy<Value = f32> {
        any::<f32>().prop_map(|f| if f.is_nan() { 0.0 } else { f })
    }

    fn arb_f64() -> impl Strategy<Value = f64> {
        any::<f64>().prop_map(|f| if f.is_nan() { 0.0 } else { f })
    }

    fn arb_array() -> impl Strategy<Value = Array> {
        use proptest::collection::vec;
        let leaf = prop_oneof![
            vec(any::<u8>(), 0..6).prop_map(Array::U8),
            vec(any::<i8>(), 0..6).prop_map(Array::I8),
            vec(any::<u16>(), 0..6).prop_map(Array::U16),
            vec(any::<i16>(), 0..6).prop_map(Array::I16),
            vec(any::<u32>(), 0..6).prop_map(Array::U32),
            vec(any::<i32>(), 0..6).prop_map(Array::I32),
            vec(any::<u64>(), 0..6).prop_map(Array::U64),
            vec(any::<i64>(), 0..6).prop_map(Array::I64),
            vec(arb_f32(), 0..6).prop_map(Array::F32),
            vec(arb_f64(), 0..6).prop_map(Array::F64),
            vec(any::<bool>(), 0..6).prop_map(Array::Bool),
            vec(".{0,8}", 0..6).prop_map(Array::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| vec(inner, 0..4).prop_map(Array::Array))
    }

    fn arb_value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<u8>().prop_map(Value::U8),
            any::<i8>().prop_map(Value::I8),
            any::<u16>().prop_map(Value::U16),
            any::<i16>().prop_map(Value::I16),
            any::<u32>().prop_map(Value::U32),
            any::<i32>().prop_map(Value::I32),
            any::<u64>().prop_map(Value::U64),
            any::<i64>().prop_map(Value::I64),
            arb_f32().prop_map(Value::F32),
            arb_f64().prop_map(Value::F64),
            any::<bool>().prop_map(Value::Bool),
            ".{0,16}".prop_map(Value::String),
            arb_array().prop_map(Value::Array),
        ]
    }

    fn arb_metadata() -> impl Strategy<Value = Vec<(String, Value)>> {
        (
            proptest::collection::btree_map("[a-z][a-z0-9_.]{0,24}", arb_value(), 0..8),
            proptest::option::of(prop_oneof![Just(8u32), Just(32), Just(64), Just(4096)]),
        )
            .prop_map(|(m, align)| {
                let mut m: Vec<_> = m
                    .into_iter()
                    .filter(|(k, _)| k != "general.alignment")
                    .collect();
                if let Some(a) = align {
                    m.push(("general.alignment".to_string(), Value::U32(a)));
                }
                m
            })
    }

    fn arb_tensor() -> impl Strategy<Value = (Vec<u64>, GgmlType)> {
        (
            proptest::sample::select(GgmlType::ALL.to_vec()),
            1u64..4,
            proptest::collection::vec(1u64..5, 0..4),
        )
            .prop_map(|(ty, blocks, rest)| {
                let mut dims = vec![blocks * ty.block_size()];
                dims.extend(rest);
                (dims, ty)
            })
    }

    fn arb_tensors() -> impl Strategy<Value = Vec<(String, Vec<u64>, GgmlType)>> {
        proptest::collection::btree_map("[a-z0-9_.]{1,40}", arb_tensor(), 0..6).prop_map(|m| {
            m.into_iter()
                .map(|(name, (dims, ty))| (name, dims, ty))
                .collect()
        })
    }

    fn arb_file() -> impl Strategy<Value = Vec<u8>> {
        (arb_metadata(), arb_tensors()).prop_map(|(m, t)| write_gguf(&m, &t))
    }

    proptest! {
        #[test]
        fn write_parse_round_trip(metadata in arb_metadata(), tensors in arb_tensors()) {
            let bytes = write_gguf(&metadata, &tensors);
            let g = Gguf::parse(&bytes).unwrap();
            prop_assert_eq!(&g.metadata, &metadata);
            prop_assert_eq!(g.tensors.len(), tensors.len());
            prop_assert_eq!(g.data_offset % g.alignment, 0);
            for (info, (name, dims, ty)) in g.tensors.iter().zip(&tensors) {
                prop_assert_eq!(&info.name, name);
                prop_assert_eq!(&info.dims, dims);
                prop_assert_eq!(info.ggml_type, *ty);
                prop_assert_eq!(info.size, tensor_bytes(dims, *ty));
                prop_assert_eq!(info.n_elements(), info.rows() * info.cols());
                prop_assert_eq!((info.offset - g.data_offset) % g.alignment, 0);
                prop_assert_eq!(info.data(&bytes).unwrap().len() as u64, info.size);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = Gguf::parse(&bytes);
            let mut with_header = b"GGUF\x03\0\0\0".to_vec();
            with_header.extend_from_slice(&bytes);
            let _ = Gguf::parse(&with_header);
        }

        #[test]
        fn truncated_files_are_errors(bytes in arb_file(), cut in any::<prop::sample::Index>()) {
            let cut = cut.index(bytes.len());
            prop_assert!(Gguf::parse(&bytes[..cut]).is_err());
        }

        #[test]
        fn mutated_files_never_panic(
            bytes in arb_file(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut bytes = bytes;
            for (at, b) in edits {
                let i = at.index(bytes.len());
                bytes[i] = b;
            }
            if let Ok(g) = Gguf::parse(&bytes) {
                for t in &g.tensors {
                    prop_assert!(t.data(&bytes).is_ok());
                }
            }
        }
    }
}
