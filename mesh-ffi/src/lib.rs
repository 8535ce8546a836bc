//! C ABI over mesh-core: the functions, handles and structs of `include/mesh.h`.
//!
//! Conventions:
//!
//! * Every fallible function returns a `mesh_status` (0 = `MESH_STATUS_OK`) and
//!   writes its results to out-parameters only on success (the one documented
//!   exception: the length out-parameter of a buffer that is too small).
//!   `mesh_last_error_message` gives the message of the last failure on the
//!   calling thread.
//! * Handles are opaque. `mesh_model` is refcounted and thread-safe;
//!   `mesh_context` has one owner and one generation at a time; `mesh_node`
//!   has one owner and is thread-safe.
//! * NULL, misaligned pointers, invalid UTF-8, wrong `struct_size`s and
//!   handles that are not live (freed, of another type, never made here) are
//!   statuses, and a panic is `MESH_STATUS_PANIC`; none of them reaches C as
//!   undefined behaviour or unwinding.
//!
//! The Rust side is organised as rustls-ffi is: `ffi` holds all the pointer
//! plumbing and `status` the panic boundary, so that each export reads as a
//! few lines of intent. The exports are `unsafe extern "C"`: their pointer
//! contracts are the ones documented in the header.
#![warn(missing_docs)]
#![allow(non_camel_case_types)]
// The safety contract of every export is its documentation in mesh.h.
#![allow(clippy::missing_safety_doc)]

// Plumbing: pointers, statuses and the panic boundary.
mod ffi;
mod status;

// Exports, in the order mesh.h lists them.
mod model;

mod text;

mod context;

mod node;

mod ledger;

mod log;

use std::os::raw::c_char;

pub use context::{
    mesh_context, mesh_context_add_lora, mesh_context_cancel, mesh_context_clear_lora,
    mesh_context_eval, mesh_context_free, mesh_context_logits, mesh_context_n_ctx,
    mesh_context_n_past, mesh_context_new, mesh_context_params, mesh_context_params_default,
    mesh_context_truncate, mesh_generate, mesh_generate_params, mesh_generate_params_default,
    mesh_generate_stats, mesh_stop_reason, mesh_token_callback,
};
pub use ledger::{mesh_node_ledger_adapter, mesh_node_ledger_start, mesh_node_ledger_status};
pub use log::{
    mesh_log_callback, mesh_log_level, mesh_log_set, MESH_LOG_DEBUG, MESH_LOG_ERROR, MESH_LOG_INFO,
    MESH_LOG_OFF, MESH_LOG_TRACE, MESH_LOG_WARN,
};
pub use model::{
    mesh_model, mesh_model_architecture, mesh_model_free, mesh_model_id, mesh_model_load,
    mesh_model_n_ctx_train, mesh_model_n_embd, mesh_model_n_layers, mesh_model_n_vocab,
    mesh_model_params, mesh_model_params_default, mesh_model_retain,
};
pub use node::{
    mesh_mode, mesh_node, mesh_node_cancel, mesh_node_dial, mesh_node_event_callback,
    mesh_node_free, mesh_node_generate, mesh_node_generate_stats, mesh_node_listen_addrs,
    mesh_node_open, mesh_node_params, mesh_node_params_default, mesh_node_peer_id, mesh_node_serve,
    mesh_node_set_event_callback,
};
pub use status::mesh_status;
pub use text::{mesh_chat_apply_template, mesh_chat_message, mesh_detokenize, mesh_tokenize};

use crate::status::{boundary, boundary_value, last_error, set_last_error, status_c_str};

/// Major version of the library (semantic versioning).
pub const MESH_VERSION_MAJOR: u32 = 0;
/// Minor version of the library.
pub const MESH_VERSION_MINOR: u32 = 1;
/// Patch version of the library.
pub const MESH_VERSION_PATCH: u32 = 0;
/// Version of the C ABI this header describes. It changes whenever a function
/// signature, struct layout or constant changes incompatibly; compare it with
/// `mesh_abi_version()` at run time.
pub const MESH_ABI_VERSION: u32 = 1;

/// The `MESH_ABI_VERSION` the library was built with. A program should check
/// `mesh_abi_version() == MESH_ABI_VERSION` before using anything else.
///
/// Threads: any thread. Never fails.
#[no_mangle]
pub extern "C" fn mesh_abi_version() -> u32 {
    MESH_ABI_VERSION
}

/// The name of a status as a static NUL-terminated string, e.g.
/// `"MESH_STATUS_NULL_ARG"`; `"MESH_STATUS_UNKNOWN"` for a value that is not a
/// `mesh_status`.
///
/// Lifetimes: the string is static; do not free it.
/// Threads: any thread. Never fails.
#[no_mangle]
pub extern "C" fn mesh_status_str(status: i32) -> *const c_char {
    boundary_value(status_c_str(mesh_status::Internal.code()), || {
        status_c_str(status)
    })
}

/// The message of the most recent failure (any status but `MESH_STATUS_OK`)
/// of a mesh function called on this thread, NUL-terminated in `buf` of
/// `cap` bytes; `""` if none failed yet. Successful calls do not change it, and neither does
/// this function, whatever it returns.
///
/// Unlike other buffer functions, a message that does not fit is cut (at a
/// UTF-8 character boundary) and still written NUL-terminated when `cap` > 0,
/// so a fixed-size buffer always holds something printable; the status is then
/// `MESH_STATUS_BUFFER_TOO_SMALL` and `*n_out` the size needed including the
/// NUL. On success `*n_out` is the message length. `buf` may be NULL when
/// `cap` is 0.
///
/// Threads: per thread: each thread sees its own last failure.
#[no_mangle]
pub unsafe extern "C" fn mesh_last_error_message(
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> mesh_status {
    // This call never changes the message it reports, not even when it fails.
    let message = last_error();
    // SAFETY: caller's contract.
    let status = boundary(|| {
        unsafe { ffi::buf_out(buf, cap, n_out, "buf") }?.write_text_truncated(&message)
    });
    set_last_error(message);
    status
}

/// Test hook: panics inside the boundary, so tests can check that a panic
/// becomes `MESH_STATUS_PANIC` with its message. Only built with the
/// `test-hooks` cargo feature (declared when `MESH_TEST_HOOKS` is defined).
///
/// Threads: any thread.
#[cfg(feature = "test-hooks")]
#[no_mangle]
pub extern "C" fn mesh_debug_panic() -> mesh_status {
    boundary(|| panic!("mesh_debug_panic was called"))
}

#[cfg(test)]
mod tests;
