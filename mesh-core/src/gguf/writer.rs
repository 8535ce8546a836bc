//! A GGUF byte writer: mesh-llm writes the adapters it aggregates with it
//! (`engine::lora::adapter_bytes`), and tests build files with it, malformed
//! ones included.

use super::{Array, Value};

/// A little-endian byte sink that writes GGUF pieces in the order it is
/// called, with no validation (so tests can build malformed files too): the
/// caller writes a valid file by writing the header, metadata, tensor infos
/// and aligned data in order.
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
