//! Metadata values: their type tags, scalars and homogeneous arrays.

use super::*;
use crate::gguf::GgufErrorKind;

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
                return Err(Error::gguf(
                    GgufErrorKind::Malformed,
                    format!("unknown value type {v}: expected 0..=12"),
                ))
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
    pub(super) fn fixed_size(self) -> Option<u64> {
        match self {
            Self::U8 | Self::I8 | Self::Bool => Some(1),
            Self::U16 | Self::I16 => Some(2),
            Self::U32 | Self::I32 | Self::F32 => Some(4),
            Self::U64 | Self::I64 | Self::F64 => Some(8),
            Self::String | Self::Array => None,
        }
    }

    /// Fewest bytes one value of this type can take in the file.
    pub(super) fn min_size(self) -> u64 {
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

/// A Rust type a metadata value converts to, with the checks
/// [`Gguf::value`] and [`Gguf::opt_value`] apply:
///
/// | type | accepts |
/// |---|---|
/// | `&str` | a string |
/// | `u32` | any integer type, if the value is in `0..=u32::MAX` |
/// | `f32` | an f32, or an f64 that stays finite when narrowed |
/// | `bool` | a boolean |
/// | `&Array` | an array of any element type |
/// | `&[String]` | an array of strings |
pub trait FromValue<'a>: Sized {
    /// Converts `v`, the value of metadata key `key` (named in the error).
    fn from_value(key: &str, v: &'a Value) -> Result<Self>;
}

pub(super) fn wrong_type(key: &str, expected: &str, found: &str) -> Error {
    Error::gguf(
        GgufErrorKind::WrongType,
        format!("key {key}: expected {expected}, found {found}"),
    )
}

impl<'a> FromValue<'a> for &'a str {
    fn from_value(key: &str, v: &'a Value) -> Result<Self> {
        match v {
            Value::String(s) => Ok(s),
            other => Err(wrong_type(key, "string", other.type_name())),
        }
    }
}

impl FromValue<'_> for u32 {
    fn from_value(key: &str, v: &Value) -> Result<Self> {
        let n = v
            .as_i128()
            .ok_or_else(|| wrong_type(key, "an integer", v.type_name()))?;
        u32::try_from(n).map_err(|_| {
            Error::gguf(
                GgufErrorKind::WrongType,
                format!(
                    "key {key}: expected an integer in 0..=4294967295, found {} {n}",
                    v.type_name()
                ),
            )
        })
    }
}

impl FromValue<'_> for f32 {
    fn from_value(key: &str, v: &Value) -> Result<Self> {
        match *v {
            Value::F32(x) => Ok(x),
            Value::F64(x) => {
                // Narrowing is the intent; only a finite value turning infinite is an error.
                let y = x as f32;
                if x.is_finite() && !y.is_finite() {
                    return Err(Error::gguf(
                        GgufErrorKind::WrongType,
                        format!("key {key}: expected a value in f32 range, found f64 {x:?}"),
                    ));
                }
                Ok(y)
            }
            ref other => Err(wrong_type(key, "f32", other.type_name())),
        }
    }
}

impl FromValue<'_> for bool {
    fn from_value(key: &str, v: &Value) -> Result<Self> {
        match v {
            Value::Bool(b) => Ok(*b),
            other => Err(wrong_type(key, "bool", other.type_name())),
        }
    }
}

impl<'a> FromValue<'a> for &'a Array {
    fn from_value(key: &str, v: &'a Value) -> Result<Self> {
        match v {
            Value::Array(a) => Ok(a),
            other => Err(wrong_type(key, "array", other.type_name())),
        }
    }
}

impl<'a> FromValue<'a> for &'a [String] {
    fn from_value(key: &str, v: &'a Value) -> Result<Self> {
        match <&Array>::from_value(key, v)? {
            Array::String(s) => Ok(s),
            other => Err(wrong_type(key, "array of string", other.type_name())),
        }
    }
}
