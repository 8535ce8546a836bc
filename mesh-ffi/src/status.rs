//! Status codes, the per-thread last error, and the panic boundary every export
//! runs inside.
//!
//! An export's body is a closure returning `Result<T, Failure>`; [`boundary`]
//! runs it under `catch_unwind`, records the message of a failure or a panic for
//! `mesh_last_error_message`, and hands C a `mesh_status`.

use std::any::Any;
use std::cell::RefCell;
use std::fmt;
use std::os::raw::c_char;
use std::panic::{self, AssertUnwindSafe};

/// Result of every fallible mesh function. `MESH_STATUS_OK` (0) is success;
/// every other value is a failure whose message `mesh_last_error_message`
/// returns on the same thread.
///
/// It is an `int32_t`: compare it with the `MESH_STATUS_*` constants, and expect
/// new values in later minor versions (treat unknown ones as failures).
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum mesh_status {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArg = 1,
    /// A pointer argument was not aligned for its type.
    MisalignedArg = 2,
    /// A string argument was not valid UTF-8.
    InvalidUtf8 = 3,
    /// A params or stats struct's `struct_size` is not one this library knows.
    StructSize = 4,
    /// A caller buffer is too small; the size it needs was written to the
    /// function's length out-parameter.
    BufferTooSmall = 5,
    /// An argument was out of range or inconsistent (mesh_core `InvalidArgument`).
    InvalidArg = 6,
    /// The handle is in use by another call that excludes this one (e.g. a
    /// second `mesh_generate` on a context that is already generating).
    Busy = 7,
    /// A file could not be opened, read or written (mesh_core `Io`).
    Io = 8,
    /// A GGUF model file is malformed (mesh_core `Gguf`).
    Gguf = 9,
    /// The model uses something this build does not support (mesh_core `Unsupported`).
    Unsupported = 10,
    /// The tokenizer could not be built, or could not encode or decode (mesh_core `Tokenizer`).
    Tokenizer = 11,
    /// The chat template failed to parse or render (mesh_core `Template`).
    Template = 12,
    /// The request needs more positions than the context holds (mesh_core `ContextOverflow`).
    ContextOverflow = 13,
    /// Fetching or verifying a model file failed (mesh_core `Fetch`).
    Fetch = 14,
    /// ggml failed to allocate or compute (mesh_core `Ggml`).
    Ggml = 15,
    /// The operation was cancelled (`mesh_context_cancel`).
    Cancelled = 16,
    /// Rust code panicked; the panic was caught at the boundary. The handle
    /// involved stays valid (and must still be freed), but a bug was hit:
    /// please report the message.
    Panic = 17,
    /// An error this version of the C API has no status for (a newer mesh-core
    /// error kind); the message says what happened.
    Internal = 18,
    /// Sealing or opening a private-delegation envelope failed (mesh_core `Seal`).
    Seal = 19,
    /// A network operation failed: dial, timeout, size limit, remote error
    /// (mesh_core `Network`).
    Network = 20,
    /// A handle argument is not a live handle of its type: it was freed
    /// already (a use after free, a double free), it is a handle of another
    /// type, or this library never made it. Detected unless the allocator has
    /// since given its address to a new handle of the same type; a handle
    /// freed while another call is still using it is not detected (that stays
    /// undefined behaviour).
    InvalidHandle = 21,
}

/// Every status, in numeric order.
const ALL_STATUSES: [mesh_status; 22] = [
    mesh_status::Ok,
    mesh_status::NullArg,
    mesh_status::MisalignedArg,
    mesh_status::InvalidUtf8,
    mesh_status::StructSize,
    mesh_status::BufferTooSmall,
    mesh_status::InvalidArg,
    mesh_status::Busy,
    mesh_status::Io,
    mesh_status::Gguf,
    mesh_status::Unsupported,
    mesh_status::Tokenizer,
    mesh_status::Template,
    mesh_status::ContextOverflow,
    mesh_status::Fetch,
    mesh_status::Ggml,
    mesh_status::Cancelled,
    mesh_status::Panic,
    mesh_status::Internal,
    mesh_status::Seal,
    mesh_status::Network,
    mesh_status::InvalidHandle,
];

impl mesh_status {
    /// Every status, in numeric order.
    pub fn all() -> impl Iterator<Item = mesh_status> {
        ALL_STATUSES.into_iter()
    }

    /// The status with numeric value `code`, if there is one.
    pub fn from_code(code: i32) -> Option<mesh_status> {
        ALL_STATUSES.into_iter().find(|s| s.code() == code)
    }

    /// The numeric value C sees.
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The constant's name, NUL-terminated.
    pub(crate) fn c_name(self) -> &'static [u8] {
        match self {
            mesh_status::Ok => b"MESH_STATUS_OK\0",
            mesh_status::NullArg => b"MESH_STATUS_NULL_ARG\0",
            mesh_status::MisalignedArg => b"MESH_STATUS_MISALIGNED_ARG\0",
            mesh_status::InvalidUtf8 => b"MESH_STATUS_INVALID_UTF8\0",
            mesh_status::StructSize => b"MESH_STATUS_STRUCT_SIZE\0",
            mesh_status::BufferTooSmall => b"MESH_STATUS_BUFFER_TOO_SMALL\0",
            mesh_status::InvalidArg => b"MESH_STATUS_INVALID_ARG\0",
            mesh_status::Busy => b"MESH_STATUS_BUSY\0",
            mesh_status::Io => b"MESH_STATUS_IO\0",
            mesh_status::Gguf => b"MESH_STATUS_GGUF\0",
            mesh_status::Unsupported => b"MESH_STATUS_UNSUPPORTED\0",
            mesh_status::Tokenizer => b"MESH_STATUS_TOKENIZER\0",
            mesh_status::Template => b"MESH_STATUS_TEMPLATE\0",
            mesh_status::ContextOverflow => b"MESH_STATUS_CONTEXT_OVERFLOW\0",
            mesh_status::Fetch => b"MESH_STATUS_FETCH\0",
            mesh_status::Ggml => b"MESH_STATUS_GGML\0",
            mesh_status::Cancelled => b"MESH_STATUS_CANCELLED\0",
            mesh_status::Panic => b"MESH_STATUS_PANIC\0",
            mesh_status::Internal => b"MESH_STATUS_INTERNAL\0",
            mesh_status::Seal => b"MESH_STATUS_SEAL\0",
            mesh_status::Network => b"MESH_STATUS_NETWORK\0",
            mesh_status::InvalidHandle => b"MESH_STATUS_INVALID_HANDLE\0",
        }
    }
}

/// Name of an unknown status code, NUL-terminated.
pub(crate) const UNKNOWN_STATUS: &[u8] = b"MESH_STATUS_UNKNOWN\0";

/// Why an export failed: the status C gets and the message it can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Failure {
    pub(crate) status: mesh_status,
    pub(crate) message: String,
}

impl Failure {
    pub(crate) fn new(status: mesh_status, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.status, self.message)
    }
}

impl From<mesh_core::Error> for Failure {
    fn from(err: mesh_core::Error) -> Failure {
        use mesh_core::Error as E;
        let status = match &err {
            E::Io { .. } => mesh_status::Io,
            E::Gguf(_) => mesh_status::Gguf,
            E::Unsupported(_) => mesh_status::Unsupported,
            E::Tokenizer(_) => mesh_status::Tokenizer,
            E::Template(_) => mesh_status::Template,
            E::InvalidArgument(_) => mesh_status::InvalidArg,
            E::ContextOverflow { .. } => mesh_status::ContextOverflow,
            E::Fetch(_) => mesh_status::Fetch,
            E::Ggml(_) => mesh_status::Ggml,
            E::Cancelled => mesh_status::Cancelled,
            E::Seal(_) => mesh_status::Seal,
            E::Adapter(a) => match a {
                mesh_core::engine::AdapterError::UnsupportedType { .. } => mesh_status::Unsupported,
                mesh_core::engine::AdapterError::BadScale { .. }
                | mesh_core::engine::AdapterError::OtherModel { .. } => mesh_status::InvalidArg,
                _ => mesh_status::Gguf,
            },
            E::Network(_) | E::Pipeline(_) | E::NotEnoughHelpers { .. } | E::Helper(_) => {
                mesh_status::Network
            }
            E::Ledger(l) => match **l {
                mesh_core::ledger::LedgerError::Io { .. } => mesh_status::Io,
                mesh_core::ledger::LedgerError::Peer(_)
                | mesh_core::ledger::LedgerError::Unavailable { .. }
                | mesh_core::ledger::LedgerError::HashMismatch { .. } => mesh_status::Network,
                _ => mesh_status::InvalidArg,
            },
            // mesh_core::Error is non_exhaustive: a kind added later is reported
            // with its message until it gets a status of its own.
            _ => mesh_status::Internal,
        };
        Failure::new(status, err.to_string())
    }
}

/// What an export's body returns.
pub(crate) type FfiResult<T = ()> = Result<T, Failure>;

thread_local! {
    /// Message of the most recent failure on this thread (empty before the first).
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

/// Remember `message` as this thread's last error.
pub(crate) fn set_last_error(message: String) {
    // `try_with`: a failure while the thread is being torn down is not worth a panic.
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = message);
}

/// This thread's last error message.
pub(crate) fn last_error() -> String {
    LAST_ERROR
        .try_with(|last| last.borrow().clone())
        .unwrap_or_default()
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    let what = payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)");
    format!("panic in mesh-ffi: {what}")
}

/// Run an export's body: a failure or a panic is recorded as this thread's last
/// error and becomes its status; a panic never unwinds into C.
pub(crate) fn boundary(body: impl FnOnce() -> FfiResult) -> mesh_status {
    match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => mesh_status::Ok,
        Ok(Err(failure)) => {
            let status = failure.status;
            set_last_error(failure.message);
            status
        }
        Err(payload) => {
            set_last_error(panic_message(payload.as_ref()));
            mesh_status::Panic
        }
    }
}

/// [`boundary`] for exports that return a value instead of a status: `fallback`
/// is returned if `body` panics.
pub(crate) fn boundary_value<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    match panic::catch_unwind(AssertUnwindSafe(body)) {
        Ok(value) => value,
        Err(payload) => {
            set_last_error(panic_message(payload.as_ref()));
            fallback
        }
    }
}

/// [`boundary`] for exports that return nothing (`_free`): a failure is only
/// recorded.
pub(crate) fn boundary_void(body: impl FnOnce() -> FfiResult) {
    let _ = boundary(body);
}

/// Name of `status` as a static NUL-terminated C string.
pub(crate) fn status_c_str(code: i32) -> *const c_char {
    let name = mesh_status::from_code(code).map_or(UNKNOWN_STATUS, mesh_status::c_name);
    name.as_ptr().cast()
}
