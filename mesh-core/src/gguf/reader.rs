//! The bounds-checked reader of untrusted GGUF bytes: header, metadata
//! entries, arrays, tensor infos, and the checks across them.

use super::value::wrong_type;
use super::*;
use crate::gguf::GgufErrorKind;
use std::collections::HashMap;

/// Check the magic and version; returns the version.
pub(super) fn read_header_start(r: &mut Reader<'_>) -> Result<u32> {
    let bytes = r.bytes;
    let Some(magic) = bytes.first_chunk::<4>() else {
        return Err(Error::gguf(
            GgufErrorKind::Truncated,
            format!(
                "file is {} bytes, too short for a GGUF header ({HEADER_LEN} bytes); \
             found {}",
                bytes.len(),
                if bytes.is_empty() {
                    "nothing".to_string()
                } else {
                    hex(bytes)
                }
            ),
        ));
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
        return Err(Error::gguf(
            GgufErrorKind::NotGguf,
            format!(
                "bad magic: expected \"GGUF\" (47 47 55 46), found {}",
                hex(magic)
            ),
        ));
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
pub(super) struct Reader<'a> {
    pub(super) bytes: &'a [u8],
    pub(super) pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn remaining(&self) -> u64 {
        len_u64(self.bytes.len().saturating_sub(self.pos))
    }

    fn truncated(&self, what: &str, need: impl fmt::Display) -> Error {
        Error::gguf(
            GgufErrorKind::Truncated,
            format!(
                "unexpected end of file at offset 0x{:x} reading {what}: need {need} bytes, \
             {} left",
                self.pos,
                self.remaining()
            ),
        )
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

    pub(super) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn bool(&mut self, what: &str) -> Result<bool> {
        let at = self.pos;
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(Error::gguf(
                GgufErrorKind::Malformed,
                format!("{what} at offset 0x{at:x}: expected bool 0 or 1, found {b}"),
            )),
        }
    }

    /// A `gguf_string`: u64 length and UTF-8 bytes.
    fn string(&mut self, what: &str, max_len: u64) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        if len > max_len {
            return Err(Error::gguf(
                GgufErrorKind::Malformed,
                format!(
                    "{what} at offset 0x{at:x}: length {len} is longer than the limit of {max_len}"
                ),
            ));
        }
        if len > self.remaining() {
            return Err(Error::gguf(
                GgufErrorKind::Truncated,
                format!(
                    "{what} at offset 0x{at:x}: length {len} runs past the end of the file \
                 ({} bytes left)",
                    self.remaining()
                ),
            ));
        }
        let start = self.pos;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| {
            let bad = start.saturating_add(e.utf8_error().valid_up_to());
            Error::gguf(
                GgufErrorKind::Malformed,
                format!(
                    "{what} at offset 0x{at:x}: expected UTF-8, found invalid byte 0x{:02x} at \
                 offset 0x{bad:x}",
                    e.as_bytes()
                        .get(e.utf8_error().valid_up_to())
                        .copied()
                        .unwrap_or(0)
                ),
            )
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
pub(super) fn read_kv(r: &mut Reader<'_>, index: u64) -> Result<(String, Value)> {
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
        return Err(Error::gguf(
            GgufErrorKind::Truncated,
            format!(
                "array at offset 0x{at:x}: {count} {elem} elements need at least {} bytes, \
             {} left",
                need.map_or_else(|| "more than 2^64".to_string(), |n| n.to_string()),
                r.remaining()
            ),
        ));
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
                        return Err(Error::gguf(
                            GgufErrorKind::Malformed,
                            format!(
                            "array element {i} at offset 0x{:x}: expected bool 0 or 1, found {b}",
                            start.saturating_add(i)
                        ),
                        ))
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
                return Err(Error::gguf(
                    GgufErrorKind::Malformed,
                    format!(
                        "array at offset 0x{at:x}: expected arrays nested at most \
                     {MAX_ARRAY_DEPTH} deep, found deeper nesting"
                    ),
                ));
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
pub(super) struct RawTensor {
    pub(super) name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    rel_offset: u64,
}

pub(super) fn read_tensor_info(r: &mut Reader<'_>, index: u64) -> Result<RawTensor> {
    let at = r.pos;
    let name = r
        .string("tensor name", len_u64(MAX_TENSOR_NAME_LEN))
        .map_err(|e| context(e, format_args!("tensor #{index} at offset 0x{at:x}")))?;
    let rest = (|| {
        let n_dims = r.u32("n_dims")?;
        if !(1..=len_u64(MAX_DIMS)).contains(&u64::from(n_dims)) {
            return Err(Error::gguf(
                GgufErrorKind::BadTensor,
                format!("expected 1 to {MAX_DIMS} dimensions, found {n_dims}"),
            ));
        }
        let mut dims = Vec::with_capacity(MAX_DIMS);
        for i in 0..n_dims {
            let d = r.u64("dimension")?;
            if d == 0 {
                return Err(Error::gguf(
                    GgufErrorKind::BadTensor,
                    format!("dimension {i}: expected at least 1, found 0"),
                ));
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
    pub(super) fn locate(
        self,
        data_offset: u64,
        alignment: u64,
        file_len: u64,
    ) -> Result<TensorInfo> {
        let at_kind = |kind, m: String| Error::gguf(kind, format!("tensor {}: {m}", self.name));
        let at = |m: String| at_kind(GgufErrorKind::BadTensor, m);
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
            return Err(at_kind(
                GgufErrorKind::Truncated,
                format!(
                "data 0x{offset:x}..0x{end:x} is past the end of the file (size 0x{file_len:x})"
            ),
            ));
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
pub(super) fn alignment(metadata: &[(String, Value)]) -> Result<u64> {
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
            Error::gguf(
                GgufErrorKind::Malformed,
                format!("key {KEY}: expected a nonzero power of two, found {n}"),
            )
        })
}

pub(super) fn check_unique<'a>(names: impl Iterator<Item = &'a str>, what: &str) -> Result<()> {
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (i, name) in names.enumerate() {
        if let Some(first) = seen.insert(name, i) {
            return Err(Error::gguf(
                GgufErrorKind::Malformed,
                format!("duplicate {what} {name:?}: expected unique, found at #{first} and #{i}"),
            ));
        }
    }
    Ok(())
}

pub(super) fn check_no_overlap(tensors: &[TensorInfo]) -> Result<()> {
    let mut sorted: Vec<&TensorInfo> = tensors.iter().collect();
    sorted.sort_by_key(|t| (t.offset, t.size));
    for pair in sorted.windows(2) {
        let [a, b] = pair else { continue };
        let a_end = a.offset.saturating_add(a.size);
        if a_end > b.offset {
            return Err(Error::gguf(
                GgufErrorKind::Malformed,
                format!(
                    "tensors {} (0x{:x}..0x{a_end:x}) and {} (0x{:x}..0x{:x}) overlap",
                    a.name,
                    a.offset,
                    b.name,
                    b.offset,
                    b.offset.saturating_add(b.size)
                ),
            ));
        }
    }
    Ok(())
}
