//! Builders of GGUF bytes, for tests and fuzz seeds: not a stable API.

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
