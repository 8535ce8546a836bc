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
//! let layers = gguf.value::<u32>("llama.block_count")?;
//! let embd = gguf.require_tensor("token_embd.weight")?;
//! let data = embd.data(&bytes)?;
//! # let _ = (layers, data);
//! # Ok(())
//! # }
//! ```

use crate::{Error, Result};
use std::fmt;

mod reader;
mod types;
mod value;
mod writer;

/// Builders of GGUF bytes, for tests and fuzz seeds (feature `testing`):
/// not a stable API.
#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;

use reader::*;
pub use types::{GgmlType, TensorInfo};
pub use value::{Array, FromValue, Value, ValueType};
pub use writer::Writer;

/// Why a GGUF file was refused ([`crate::Error::Gguf`]).
pub type GgufError = crate::LayerError<GgufErrorKind>;

/// The kinds of [`GgufError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgufErrorKind {
    /// The file ends before something it declares (a header, a string, an
    /// array, tensor data): often an interrupted download.
    Truncated,
    /// The file does not start with the GGUF magic: not a GGUF file.
    NotGguf,
    /// A value the format constrains is out of bounds (a bool, a UTF-8
    /// string, a length or nesting limit, an alignment, a duplicate name,
    /// overlapping tensors, an unknown value type).
    Malformed,
    /// A tensor's shape, type or size does not fit ggml or the data.
    BadTensor,
    /// A metadata key the model needs is missing.
    MissingKey,
    /// A metadata value has another type, or is out of the range its use allows.
    WrongType,
    /// A tensor the model needs is missing.
    MissingTensor,
    /// A valid GGUF file whose contents do not make a consistent model
    /// (hyperparameters, tensor shapes, vocabulary size, weights).
    Model,
}

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
            return Err(Error::gguf(
                GgufErrorKind::Truncated,
                format!(
                    "header claims {n_tensors} tensors and {n_kv} metadata entries, which need at \
                 least {} bytes, but only {} bytes follow the header",
                    need.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                    r.remaining()
                ),
            ));
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
            Error::gguf(
                GgufErrorKind::Malformed,
                format!(
                    "data section offset: aligning 0x{infos_end:x} to {alignment} overflows u64"
                ),
            )
        })?;
        if data_offset > file_len {
            return Err(Error::gguf(
                GgufErrorKind::Truncated,
                format!(
                "data section starts at 0x{data_offset:x} (tensor infos end at 0x{infos_end:x}, \
                 aligned to {alignment}), past the end of the file (size 0x{file_len:x})"
            ),
            ));
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

    /// A required metadata value as `T` (see [`FromValue`] for the types and
    /// their checks): a missing key, or a value of another type or out of
    /// `T`'s range, is an [`Error::Gguf`] naming the key.
    ///
    /// ```no_run
    /// # fn f(gguf: &mesh_core::gguf::Gguf) -> mesh_core::Result<()> {
    /// let layers: u32 = gguf.value("llama.block_count")?;
    /// let name = gguf.value::<&str>("general.name")?;
    /// let tokens = gguf.value::<&[String]>("tokenizer.ggml.tokens")?;
    /// # let _ = (layers, name, tokens);
    /// # Ok(())
    /// # }
    /// ```
    pub fn value<'a, T: FromValue<'a>>(&'a self, key: &str) -> Result<T> {
        let v = self.get(key).ok_or_else(|| {
            Error::gguf(
                GgufErrorKind::MissingKey,
                format!("missing required key {key}"),
            )
        })?;
        T::from_value(key, v)
    }

    /// An optional metadata value as `T`: `Ok(None)` when the key is absent;
    /// present with another type or out of range is an error, as in
    /// [`value`](Self::value).
    pub fn opt_value<'a, T: FromValue<'a>>(&'a self, key: &str) -> Result<Option<T>> {
        self.get(key).map(|v| T::from_value(key, v)).transpose()
    }

    /// The tensor named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The tensor named `name`; its absence is an error.
    pub fn require_tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.tensor(name).ok_or_else(|| {
            Error::gguf(
                GgufErrorKind::MissingTensor,
                format!("missing tensor {name}"),
            )
        })
    }

    /// The model architecture (`general.architecture`, e.g. "llama").
    pub fn architecture(&self) -> Result<&str> {
        self.value("general.architecture")
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
        Error::Gguf(e) => Error::Gguf(e.at(at)),
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
