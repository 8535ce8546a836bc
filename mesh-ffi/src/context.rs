//! `mesh_context`: a KV cache over a model, and local generation on it.

use std::os::raw::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use mesh_core::chat::ChatMessage;
use mesh_core::engine::{ActiveLora, Engine, GgmlEngine, GgmlSession, Logits};
use mesh_core::generate::{self, GenerateOutput, GenerateParams, OutputFormat, Prompt, StopReason};
use mesh_core::json_schema::JsonSchema;
use mesh_core::sampling::SamplerParams;

use crate::ffi::{self, Castable, OwnershipBox, Params, TextCallback, Versioned};
use crate::model::mesh_model;
use crate::status::{boundary, boundary_value, boundary_void, mesh_status, Failure, FfiResult};

/// A generation context: a KV cache of `n_ctx` positions over a model, and
/// the scratch buffers to run it.
///
/// Ownership: one owner. `mesh_context_new` returns it, `mesh_context_free`
/// frees it. The context holds its own reference to the model, so the model
/// may be freed before the context.
///
/// Threads: one `mesh_generate` at a time per context (a concurrent second
/// call returns `MESH_STATUS_BUSY` instead of waiting); `mesh_context_cancel`
/// from any thread at any time while the context is alive. Different contexts,
/// of the same model or not, may generate concurrently on different threads.
pub struct mesh_context {
    _private: [u8; 0],
}

impl Castable for mesh_context {
    const NAME: &'static str = "mesh_context";
    type Ownership = OwnershipBox;
    type RustType = Context;
}

/// What a `mesh_context` stands for.
pub struct Context {
    model: Arc<GgmlEngine>,
    n_ctx: usize,
    session: Mutex<GgmlSession>,
    /// Logits kept by the last `mesh_context_eval` (rows of `n_vocab`).
    logits: Mutex<Vec<f32>>,
    /// True while a generation runs; guards `cancel` so a cancel only ever
    /// reaches the generation in progress.
    running: Mutex<bool>,
    cancel: AtomicBool,
}

/// A context is used from several threads at once (generate + cancel).
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<Context>();
};

/// Lock `m`, going on after a panic in another holder: the state it guards is
/// reset at the start of every generation.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Marks the context as generating; unmarks it (and clears a pending cancel)
/// when dropped, also on error or panic.
struct Running<'a>(&'a Context);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        let mut running = lock(&self.0.running);
        *running = false;
        self.0.cancel.store(false, Ordering::SeqCst);
    }
}

impl Context {
    fn new(model: Arc<GgmlEngine>, params: &mesh_context_params) -> FfiResult<Context> {
        let n_ctx = match params.n_ctx {
            0 => model.info().n_ctx_train,
            n => n,
        };
        let mut session = model.new_session(n_ctx)?;
        if params.n_threads > 0 {
            session.set_threads(params.n_threads)?;
        }
        Ok(Context {
            model,
            n_ctx,
            session: Mutex::new(session),
            logits: Mutex::new(Vec::new()),
            running: Mutex::new(false),
            cancel: AtomicBool::new(false),
        })
    }

    fn begin(&self) -> FfiResult<Running<'_>> {
        let mut running = lock(&self.running);
        if *running {
            return Err(Failure::new(
                mesh_status::Busy,
                "another mesh_generate is running on this context",
            ));
        }
        *running = true;
        self.cancel.store(false, Ordering::SeqCst);
        Ok(Running(self))
    }

    fn cancel(&self) {
        let running = lock(&self.running);
        if *running {
            self.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Loads the adapter at `path` for this context's model and appends it
    /// (at `scale`) to the adapters the context applies; `None` removes them all.
    fn set_lora(&self, add: Option<(&str, f32)>) -> FfiResult {
        // Not while generating: the adapters of a running generation stay fixed.
        let _running = self.begin()?;
        let mut session = lock(&self.session);
        let mut adapters = session.adapters().to_vec();
        match add {
            Some((path, scale)) => {
                let adapter = self.model.load_adapter(path)?;
                adapters.push(ActiveLora::new(adapter, scale));
            }
            None => adapters.clear(),
        }
        self.model.set_adapters(&mut session, &adapters)?;
        Ok(())
    }

    /// Appends `tokens` to the KV cache and keeps their logits (the last
    /// token's, or every token's with `all`). All or nothing: on an error or
    /// a cancel the cache is as before and the kept logits unchanged.
    fn eval(&self, tokens: &[u32], all: bool) -> FfiResult {
        let _running = self.begin()?;
        if tokens.is_empty() {
            return Err(Failure::new(
                mesh_status::InvalidArg,
                "no tokens to evaluate (n_tokens is 0)",
            ));
        }
        let model = self.model.as_ref();
        let n_vocab = model.info().n_vocab;
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Failure::new(
                mesh_status::InvalidArg,
                format!("token id {bad}: expected < {n_vocab} (vocabulary size)"),
            ));
        }
        let mut session = lock(&self.session);
        let start = model.session_len(&session, 0);
        if start.saturating_add(tokens.len()) > self.n_ctx {
            return Err(mesh_core::Error::ContextOverflow {
                needed: start.saturating_add(tokens.len()),
                capacity: self.n_ctx,
            }
            .into());
        }
        let which = if all { Logits::All } else { Logits::Last };
        let mut out = Vec::new();
        // Batches small enough that a cancel waits for at most one of them.
        for batch in tokens.chunks(EVAL_BATCH) {
            let step = if self.cancel.load(Ordering::SeqCst) {
                Err(Failure::new(
                    mesh_status::Cancelled,
                    "evaluation cancelled by mesh_context_cancel",
                ))
            } else {
                model
                    .forward(batch, which, &mut session)
                    .map_err(Failure::from)
            };
            match step {
                Ok(logits) if all => out.extend_from_slice(&logits),
                Ok(logits) => out = logits,
                Err(e) => {
                    model.truncate_session(&mut session, start);
                    return Err(e);
                }
            }
        }
        *lock(&self.logits) = out;
        Ok(())
    }

    /// Positions the KV cache holds now.
    fn n_past(&self) -> FfiResult<usize> {
        let _running = self.begin()?;
        let session = lock(&self.session);
        Ok(self.model.session_len(&session, 0))
    }

    /// Forgets positions from `n_past` on (and the kept logits, which may
    /// belong to a forgotten position).
    fn truncate(&self, n_past: usize) -> FfiResult {
        let _running = self.begin()?;
        let mut session = lock(&self.session);
        if n_past < self.model.session_len(&session, 0) {
            self.model.truncate_session(&mut session, n_past);
            lock(&self.logits).clear();
        }
        Ok(())
    }

    /// Generate from an empty KV cache.
    fn generate(
        &self,
        prompt: &Prompt,
        params: &GenerateParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> FfiResult<GenerateOutput> {
        let _running = self.begin()?;
        let mut session = lock(&self.session);
        let model = self.model.as_ref();
        model.truncate_session(&mut session, 0);
        lock(&self.logits).clear();
        let ids = generate::tokenize_prompt(model, prompt)?;
        let out = generate::generate(
            model,
            &mut session,
            &ids,
            params,
            Some(&self.cancel),
            on_text,
        )?;
        if out.stop == StopReason::Cancelled {
            return Err(Failure::new(
                mesh_status::Cancelled,
                format!(
                    "generation cancelled by mesh_context_cancel after {} tokens",
                    out.token_ids.len()
                ),
            ));
        }
        Ok(out)
    }
}

/// How to create a context. Fill it with `mesh_context_params_default()`, then
/// change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct mesh_context_params {
    /// `sizeof(mesh_context_params)`; set by `mesh_context_params_default()`.
    pub struct_size: usize,
    /// Positions the KV cache holds (prompt plus generated tokens); 0 = the
    /// model's training context. Default 2048.
    pub n_ctx: usize,
    /// Compute threads; 0 = the model's setting (`mesh_model_params.n_threads`).
    pub n_threads: usize,
}

/// Default KV cache size of a context.
const DEFAULT_N_CTX: usize = 2048;

/// Tokens per forward pass in `mesh_context_eval`: a cancel waits for at
/// most one such batch.
const EVAL_BATCH: usize = 64;

// SAFETY: repr(C), starts with `struct_size: usize`.
unsafe impl Versioned for mesh_context_params {}

// SAFETY: all fields are integers.
unsafe impl Params for mesh_context_params {
    fn default_value() -> Self {
        mesh_context_params {
            struct_size: std::mem::size_of::<mesh_context_params>(),
            n_ctx: DEFAULT_N_CTX,
            n_threads: 0,
        }
    }
}

/// How to generate. Fill it with `mesh_generate_params_default()`, then change
/// fields. The sampler applies, in order: repetition penalty, top-k, top-p,
/// min-p, temperature, then a draw seeded with `seed` (same seed, same model,
/// same prompt: same text).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct mesh_generate_params {
    /// `sizeof(mesh_generate_params)`; set by `mesh_generate_params_default()`.
    pub struct_size: usize,
    /// Maximum number of tokens to generate. Default 128.
    pub max_tokens: usize,
    /// Softmax temperature; 0 or below = greedy (always the most likely token). Default 0.8.
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 = off. Default 40.
    pub top_k: usize,
    /// Nucleus sampling threshold in [0, 1]; 1 = off. Default 0.95.
    pub top_p: f32,
    /// Drop tokens below `min_p` times the best one's probability, in [0, 1]; 0 = off. Default 0.05.
    pub min_p: f32,
    /// Penalty (> 0) on tokens seen in the last `repeat_last_n`; 1 = off. Default 1.
    pub repeat_penalty: f32,
    /// How many recent tokens the repetition penalty looks at. Default 64.
    pub repeat_last_n: usize,
    /// Seed of the sampler's random number generator. Default 0.
    pub seed: u64,
    /// Keep generating past end-of-generation tokens. Default false.
    pub ignore_eos: bool,
    /// Treat the prompt as one user message and render it with the model's
    /// chat template (the assistant's reply is generated). Default false.
    pub chat: bool,
    /// When `chat` is false: parse special-token text in the prompt (e.g. the
    /// output of `mesh_chat_apply_template`) instead of tokenizing it as plain
    /// text. Default false.
    pub raw: bool,
    /// What the output must be: NULL or `"text"` (anything, the default),
    /// `"json"`: one JSON object (tokens that cannot continue one are never
    /// sampled; generation ends when it closes, or at `max_tokens`), like
    /// Ollama's `format: "json"` and OpenAI's `json_object`; or a JSON Schema
    /// as JSON text (starting with `{`): one object the schema accepts
    /// (structured output; a schema with a keyword that is not enforced, e.g.
    /// `pattern`, is `MESH_STATUS_INVALID_ARG` naming it). A NUL-terminated
    /// string read during the call only.
    pub format: *const c_char,
}

// SAFETY: repr(C), starts with `struct_size: usize`.
unsafe impl Versioned for mesh_generate_params {}

// SAFETY: integers, floats, bools (C bools are 0 or 1) and a pointer (any
// value; read only after the NULL check, under `to_core`'s contract).
unsafe impl Params for mesh_generate_params {
    fn default_value() -> Self {
        let d = GenerateParams::default();
        mesh_generate_params {
            struct_size: std::mem::size_of::<mesh_generate_params>(),
            max_tokens: d.max_tokens,
            temperature: d.sampler.temperature,
            top_k: d.sampler.top_k,
            top_p: d.sampler.top_p,
            min_p: d.sampler.min_p,
            repeat_penalty: d.sampler.repeat_penalty,
            repeat_last_n: d.sampler.repeat_last_n,
            seed: d.sampler.seed,
            ignore_eos: d.ignore_eos,
            chat: false,
            raw: false,
            format: std::ptr::null(),
        }
    }
}

impl mesh_generate_params {
    /// The prompt as mesh-core sees it.
    pub(crate) fn prompt(&self, text: &str) -> Prompt {
        match (self.chat, self.raw) {
            (true, _) => Prompt::Chat(vec![ChatMessage::new("user", text)]),
            (false, true) => Prompt::Raw(text.to_owned()),
            (false, false) => Prompt::Text(text.to_owned()),
        }
    }

    /// mesh-core's settings, checked.
    ///
    /// # Safety
    /// `format` is NULL or a NUL-terminated string.
    pub(crate) unsafe fn to_core(self) -> FfiResult<GenerateParams> {
        let format = if self.format.is_null() {
            ""
        } else {
            // SAFETY: caller's contract (non-NULL here).
            unsafe { ffi::c_str(self.format, "params->format") }?
        };
        let format = match format {
            "" | "text" => OutputFormat::Text,
            "json" => OutputFormat::JsonObject,
            schema if schema.trim_start().starts_with('{') => {
                let invalid = |e: String| {
                    Failure::new(
                        mesh_status::InvalidArg,
                        format!("`params->format` is not a usable JSON schema: {e}"),
                    )
                };
                let value: serde_json::Value =
                    serde_json::from_str(schema).map_err(|e| invalid(e.to_string()))?;
                let compiled = JsonSchema::compile(&value).map_err(|e| invalid(e.to_string()))?;
                OutputFormat::JsonSchema(Arc::new(compiled))
            }
            other => {
                return Err(Failure::new(
                    mesh_status::InvalidArg,
                    format!(
                        "`params->format` is {other:?}: expected NULL, \"text\", \"json\" or a JSON schema"
                    ),
                ))
            }
        };
        let sampler = SamplerParams {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: self.repeat_last_n,
            seed: self.seed,
        };
        sampler.validate()?;
        Ok(GenerateParams {
            max_tokens: self.max_tokens,
            sampler,
            ignore_eos: self.ignore_eos,
            format,
            ..GenerateParams::default()
        })
    }
}

/// Why a generation ended normally.
#[allow(non_camel_case_types)]
#[repr(i32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum mesh_stop_reason {
    /// The model produced an end-of-generation token.
    EndOfGeneration = 0,
    /// `max_tokens` tokens were generated.
    MaxTokens = 1,
    /// The token callback returned false.
    Callback = 2,
}

/// Numbers about one `mesh_generate` call. The caller sets `struct_size` to
/// `sizeof(mesh_generate_stats)`; the rest is written on success.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct mesh_generate_stats {
    /// `sizeof(mesh_generate_stats)`, set by the caller.
    pub struct_size: usize,
    /// Tokens in the prompt (after the chat template, BOS included).
    pub prompt_tokens: usize,
    /// Tokens generated (the end-of-generation token not counted).
    pub generated_tokens: usize,
    /// Milliseconds spent evaluating the prompt.
    pub prompt_ms: f64,
    /// Milliseconds spent generating.
    pub generate_ms: f64,
    /// Why generation ended.
    pub stop_reason: mesh_stop_reason,
}

// SAFETY: repr(C), starts with `struct_size: usize`; never read whole.
unsafe impl Versioned for mesh_generate_stats {}

impl mesh_generate_stats {
    pub(crate) fn from_output(out: &GenerateOutput) -> FfiResult<mesh_generate_stats> {
        let stop_reason = match out.stop {
            StopReason::EndOfGeneration => mesh_stop_reason::EndOfGeneration,
            StopReason::MaxTokens => mesh_stop_reason::MaxTokens,
            StopReason::Callback => mesh_stop_reason::Callback,
            StopReason::Cancelled => {
                return Err(Failure::new(mesh_status::Cancelled, "generation cancelled"))
            }
        };
        Ok(mesh_generate_stats {
            struct_size: std::mem::size_of::<mesh_generate_stats>(),
            prompt_tokens: out.prompt_ids.len(),
            generated_tokens: out.token_ids.len(),
            prompt_ms: out.prompt_ms,
            generate_ms: out.generate_ms,
            stop_reason,
        })
    }
}

/// Receives generated text as it is produced: `piece` points to `len` bytes of
/// valid UTF-8 (one or more tokens' worth, never a split character) followed
/// by a NUL; it is valid only during the call. `userdata` is what was passed
/// to `mesh_generate`. Return true to continue, false to stop (the callback is
/// not called again and `mesh_generate` returns `MESH_STATUS_OK` with
/// `MESH_STOP_REASON_CALLBACK`).
///
/// It runs on the thread that called `mesh_generate`. It may call
/// `mesh_context_cancel` and any model function, but not `mesh_context_free`
/// on the generating context (and `mesh_generate` on it returns
/// `MESH_STATUS_BUSY`). It must not unwind (C++ exceptions, longjmp) through
/// the library.
pub type mesh_token_callback =
    Option<unsafe extern "C" fn(userdata: *mut c_void, piece: *const c_char, len: usize) -> bool>;

/// Default context parameters (2048 positions, the model's thread count).
///
/// Threads: any thread. Never fails.
#[no_mangle]
pub extern "C" fn mesh_context_params_default() -> mesh_context_params {
    boundary_value(
        mesh_context_params::default_value(),
        mesh_context_params::default_value,
    )
}

/// Default generation parameters: 128 tokens, llama.cpp's default sampler
/// (temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no repetition
/// penalty), seed 0, plain-text prompt.
///
/// Threads: any thread. Never fails.
#[no_mangle]
pub extern "C" fn mesh_generate_params_default() -> mesh_generate_params {
    boundary_value(
        mesh_generate_params::default_value(),
        mesh_generate_params::default_value,
    )
}

/// Create a generation context over `model`, with a KV cache of
/// `params->n_ctx` positions. `params` may be NULL for the defaults.
///
/// On success `*out` receives a context the caller owns and must free with
/// `mesh_context_free`; it holds its own reference to `model`. On failure
/// `*out` is not written.
///
/// Threads: any thread.
#[no_mangle]
pub unsafe extern "C" fn mesh_context_new(
    model: *const mesh_model,
    params: *const mesh_context_params,
    out: *mut *mut mesh_context,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let model = unsafe { ffi::arc_clone(model, "model") }?;
        // SAFETY: caller's contract.
        let params = unsafe { ffi::params(params, "params") }?;
        // SAFETY: caller's contract.
        let out = unsafe { ffi::out(out, "out") }?;
        out.write(ffi::box_handle(Context::new(model, &params)?));
        Ok(())
    })
}

/// Free a context (and its reference to the model). NULL is a no-op.
///
/// Lifetimes: no other call on `ctx` may be running or start afterwards (free
/// it only after `mesh_generate` has returned, and never from inside its
/// callback).
#[no_mangle]
pub unsafe extern "C" fn mesh_context_free(ctx: *mut mesh_context) {
    // SAFETY: caller's contract.
    boundary_void(|| unsafe { ffi::box_free(ctx, "ctx") })
}

/// Number of positions the context's KV cache holds, into `*out`.
///
/// Threads: any thread, also while generating.
#[no_mangle]
pub unsafe extern "C" fn mesh_context_n_ctx(
    ctx: *const mesh_context,
    out: *mut usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let ctx = unsafe { ffi::handle(ctx, "ctx") }?;
        // SAFETY: caller's contract.
        unsafe { ffi::out(out, "out") }?.write(ctx.n_ctx);
        Ok(())
    })
}

/// Apply a LoRA adapter (llama.cpp's GGUF adapter format, path as
/// NUL-terminated UTF-8) at `scale` (1.0 = as trained) in every later
/// `mesh_generate` on `ctx`, after the adapters added before. The adapter
/// must be made for the context's model: another architecture, shapes that
/// do not fit, a missing half or not an adapter at all is `MESH_STATUS_GGUF`,
/// quantized halves `MESH_STATUS_UNSUPPORTED`, a non-finite scale
/// `MESH_STATUS_INVALID_ARG`, a missing file `MESH_STATUS_IO`; on error the
/// context's adapters are unchanged.
///
/// Threads: not while `mesh_generate` runs on `ctx` (`MESH_STATUS_BUSY`).
#[no_mangle]
pub unsafe extern "C" fn mesh_context_add_lora(
    ctx: *const mesh_context,
    path: *const c_char,
    scale: f32,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let ctx = unsafe { ffi::handle(ctx, "ctx") }?;
        // SAFETY: caller's contract.
        let path = unsafe { ffi::c_str(path, "path") }?;
        ctx.set_lora(Some((path, scale)))
    })
}

/// Stop applying LoRA adapters on `ctx` (the base model again).
///
/// Threads: not while `mesh_generate` runs on `ctx` (`MESH_STATUS_BUSY`).
#[no_mangle]
pub unsafe extern "C" fn mesh_context_clear_lora(ctx: *const mesh_context) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let ctx = unsafe { ffi::handle(ctx, "ctx") }?;
        ctx.set_lora(None)
    })
}

/// Generate text after `prompt` (NUL-terminated UTF-8), streaming it to `cb`.
///
/// Every call starts from an empty KV cache: the prompt must carry the whole
/// conversation (use `mesh_chat_apply_template` with `raw = true`, or
/// `chat = true` for a single user message). Prompt plus generated tokens must
/// fit in the context's `n_ctx`, else `MESH_STATUS_CONTEXT_OVERFLOW` (possibly
/// after some pieces were already streamed).
///
/// `params` may be NULL for the defaults; `cb` may be NULL (the text is then
/// only counted); `userdata` is passed to `cb` untouched; `out_stats` may be
/// NULL, else its `struct_size` must be set and it is written on success.
///
/// Returns `MESH_STATUS_OK` when generation ended by itself, at `max_tokens`,
/// or because `cb` returned false (see `out_stats->stop_reason`);
/// `MESH_STATUS_CANCELLED` when `mesh_context_cancel` stopped it (the pieces
/// already streamed stay valid; `out_stats` is not written);
/// `MESH_STATUS_BUSY` when another `mesh_generate` runs on `ctx`;
/// `MESH_STATUS_INVALID_ARG` for out-of-range sampler settings, a
/// `params->format` other than NULL, "text", "json" or a usable JSON schema,
/// or an empty prompt.
///
/// Lifetimes: `prompt`, `params` and `out_stats` are used only during the call;
/// `userdata` must stay valid until it returns.
/// Threads: blocks the calling thread until done; see `mesh_context`.
#[no_mangle]
pub unsafe extern "C" fn mesh_generate(
    ctx: *mut mesh_context,
    prompt: *const c_char,
    params: *const mesh_generate_params,
    cb: mesh_token_callback,
    userdata: *mut c_void,
    out_stats: *mut mesh_generate_stats,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let ctx = unsafe { ffi::handle(ctx.cast_const(), "ctx") }?;
        // SAFETY: caller's contract.
        let text = unsafe { ffi::c_str(prompt, "prompt") }?;
        // SAFETY: caller's contract.
        let params = unsafe { ffi::params(params, "params") }?;
        // SAFETY: caller's contract.
        let stats = unsafe { ffi::versioned_out(out_stats, "out_stats") }?;
        let mut cb = TextCallback::new(cb, userdata);
        // SAFETY: `params` is the caller's, `format` valid during the call.
        let core = unsafe { params.to_core() }?;
        // SAFETY: caller's contract.
        let out = ctx.generate(&params.prompt(text), &core, &mut |piece| unsafe {
            cb.send(piece)
        })?;
        if let Some(stats) = stats {
            stats.write(mesh_generate_stats::from_output(&out)?);
        }
        Ok(())
    })
}

/// Ask the generation running on `ctx` to stop; `mesh_generate` then returns
/// `MESH_STATUS_CANCELLED` after at most one more token. Does nothing if no
/// generation is running (it does not affect a later one).
///
/// Threads: any thread, at any time while `ctx` is alive, including from the
/// token callback. Returns at once.
#[no_mangle]
pub unsafe extern "C" fn mesh_context_cancel(ctx: *const mesh_context) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        unsafe { ffi::handle(ctx, "ctx") }?.cancel();
        Ok(())
    })
}

/// Evaluate `n_tokens` token ids at the end of the context's KV cache (at
/// positions `n_past .. n_past + n_tokens`, see `mesh_context_n_past`), as
/// llama.cpp's `llama_decode` does, for hosts that run their own sampling
/// loop: evaluate the prompt, read `mesh_context_logits`, pick a token,
/// evaluate it, and so on. The context keeps the logits of the last token,
/// or of every token when `all_logits` is true (`n_tokens` rows).
///
/// All or nothing: on any error the KV cache and the kept logits are as
/// before the call. An id outside the vocabulary or `n_tokens == 0` is
/// `MESH_STATUS_INVALID_ARG`; more positions than `n_ctx` is
/// `MESH_STATUS_CONTEXT_OVERFLOW` (free room with `mesh_context_truncate`);
/// `mesh_context_cancel` from another thread stops a long evaluation within
/// one batch of 64 tokens (`MESH_STATUS_CANCELLED`). Adapters added with
/// `mesh_context_add_lora` apply. `mesh_generate` starts over from an empty
/// cache and clears the kept logits; the positions it evaluated stay in the
/// cache (`mesh_context_truncate(ctx, 0)` to start over).
///
/// Lifetimes: `tokens` is used only during the call.
/// Threads: as `mesh_generate` (`MESH_STATUS_BUSY` while another call runs
/// on `ctx`).
#[no_mangle]
pub unsafe extern "C" fn mesh_context_eval(
    ctx: *mut mesh_context,
    tokens: *const u32,
    n_tokens: usize,
    all_logits: bool,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let ctx = unsafe { ffi::handle(ctx.cast_const(), "ctx") }?;
        // SAFETY: caller's contract.
        let tokens = unsafe { ffi::slice(tokens, n_tokens, "tokens") }?;
        ctx.eval(tokens, all_logits)
    })
}

/// Copy the logits kept by the last `mesh_context_eval` into `buf` (room
/// for `cap` floats; NULL allowed when `cap` is 0): `n_vocab` floats, or
/// `n_tokens * n_vocab` (row by row) after an evaluation with `all_logits`.
/// `*n_out` receives their number (0 before any evaluation, and after
/// `mesh_generate` or a `mesh_context_truncate` that forgot positions). If
/// `cap` is too small, returns `MESH_STATUS_BUFFER_TOO_SMALL`, leaves `buf`
/// untouched and sets `*n_out` to the number needed.
///
/// Threads: any thread, also while another call runs on `ctx` (it then sees
/// the logits from before that call).
#[no_mangle]
pub unsafe extern "C" fn mesh_context_logits(
    ctx: *const mesh_context,
    buf: *mut f32,
    cap: usize,
    n_out: *mut usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let ctx = unsafe { ffi::handle(ctx, "ctx") }?;
        // SAFETY: caller's contract.
        let out = unsafe { ffi::buf_out(buf, cap, n_out, "buf") }?;
        let logits = lock(&ctx.logits);
        out.write_items(&logits)
    })
}

/// Number of positions the context's KV cache holds now (tokens evaluated
/// and not truncated), into `*out`.
///
/// Threads: not while `mesh_generate` or `mesh_context_eval` runs on `ctx`
/// (`MESH_STATUS_BUSY`).
#[no_mangle]
pub unsafe extern "C" fn mesh_context_n_past(
    ctx: *const mesh_context,
    out: *mut usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let ctx = unsafe { ffi::handle(ctx, "ctx") }?;
        // SAFETY: caller's contract.
        let out = unsafe { ffi::out(out, "out") }?;
        out.write(ctx.n_past()?);
        Ok(())
    })
}

/// Forget every position from `n_past` on (like llama.cpp's
/// `llama_kv_cache_seq_rm(ctx, 0, n_past, -1)`), e.g. to regenerate a reply
/// or to drop a conversation's tail; `n_past` at or past the current length
/// changes nothing. When positions are forgotten, the kept logits are too.
///
/// Threads: not while `mesh_generate` or `mesh_context_eval` runs on `ctx`
/// (`MESH_STATUS_BUSY`).
#[no_mangle]
pub unsafe extern "C" fn mesh_context_truncate(
    ctx: *const mesh_context,
    n_past: usize,
) -> mesh_status {
    // SAFETY: caller's contract.
    boundary(|| unsafe { ffi::handle(ctx, "ctx") }?.truncate(n_past))
}
