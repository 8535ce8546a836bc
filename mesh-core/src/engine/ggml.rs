//! The llama-family forward pass built as ggml graphs.
//!
//! Weights stay in the memory-mapped GGUF file: ggml tensors point straight into
//! the mapping. Each call builds one graph for the requested work (a layer range,
//! optionally fused with the embedding lookup and the output head), lets ggml's
//! graph allocator place the intermediates in a buffer the session reuses, and
//! computes it on `n_threads` threads. This is the only module with ggml `unsafe`.

mod batch;
mod build;
mod graph;
mod load;
mod run;

pub use self::batch::{BatchStats, Decoder, LINGER, MAX_BATCH};

use std::ffi::c_void;
use std::ops::Range;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use ggml_sys_bleedingedge as sys;
use memmap2::Mmap;

use self::build::*;
pub(crate) use self::graph::Held;
use self::graph::{Graph, Tensor};
use super::kernels;
use super::lora::{lora_add_op, ActiveLora, DotOrder, LoraAdapter, LoraCall, LoraPair};
use super::model::{ModelInfo, Weights};
use super::q4_1;
use super::q8_0;
use super::EngineOptions;
use super::{CpuClass, Engine, Hidden, Logits, Projection, Projector, WeightView};
use crate::chat::ChatTemplate;
use crate::engine::GgmlErrorKind;
use crate::gguf::GgufErrorKind;
use crate::gguf::{GgmlType, TensorInfo};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

// ggml-alloc / ggml-backend are compiled into ggml's static library, but the
// bindings only cover ggml.h: declare the four functions the graph allocator needs.
#[allow(non_camel_case_types)]
type ggml_gallocr_t = *mut c_void;
extern "C" {
    fn ggml_backend_cpu_buffer_type() -> *mut c_void;
    fn ggml_gallocr_new(buft: *mut c_void) -> ggml_gallocr_t;
    fn ggml_gallocr_free(galloc: ggml_gallocr_t);
    fn ggml_gallocr_alloc_graph(galloc: ggml_gallocr_t, graph: *mut sys::ggml_cgraph) -> bool;
}

/// ggml's "use every thread" task count for custom ops.
const N_TASKS_MAX: i32 = -1;

/// Cores this process may run on.
pub fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Default number of compute threads: the cores that are idle right now (at
/// least 1). The pinned ggml's workers spin while they wait for each other,
/// so a thread that shares its core with another busy process stalls every
/// step of the graph (measured: 2 threads next to one busy process on 2 cores
/// ran 5-100x slower than 1 thread). Idle means: not taken by the other
/// runnable tasks the kernel counts right now (`procs_running` in
/// `/proc/stat`, this thread excluded); where that is unknown, all cores.
pub fn default_threads() -> usize {
    let cores = available_cores();
    let running = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("procs_running "))
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    match running {
        Some(r) => cores.saturating_sub(r.saturating_sub(1)).max(1),
        None => cores,
    }
}

/// Checks a caller's thread count: 0 means [`default_threads`]; more threads
/// than cores is refused (spinning workers would then wait on each other).
pub fn resolve_threads(n_threads: usize) -> Result<usize> {
    let cores = available_cores();
    match n_threads {
        0 => Ok(default_threads()),
        n if n > cores => Err(Error::InvalidArgument(format!(
            "threads: expected at most {cores} (the cores available to this process), found {n}"
        ))),
        n => Ok(n),
    }
}

/// The SIMD class of the default path's kernels on this build and CPU.
///
/// ggml's own kernels are compiled for the build machine (`-march=native`), and
/// their float summation order follows the vector width: AVX-512 builds sum
/// K·Q, softmax·V and other dot products in other orders than AVX2 builds, so
/// the default path's logits (and upstream llama.cpp's) differ in their last
/// bits between classes. The exact-accumulation mode does not depend on it.
pub fn cpu_class() -> CpuClass {
    // SAFETY: pure functions reporting ggml's compile-time features.
    let (avx512, avx2) = unsafe { (sys::ggml_cpu_has_avx512(), sys::ggml_cpu_has_avx2()) };
    if avx512 != 0 {
        CpuClass::Avx512
    } else if avx2 != 0 {
        CpuClass::Avx2
    } else {
        CpuClass::Other
    }
}

struct LayerTensors {
    attn_norm: Held,
    wq: Held,
    wk: Held,
    wv: Held,
    bq: Option<Held>,
    bk: Option<Held>,
    bv: Option<Held>,
    wo: Held,
    ffn_norm: Held,
    gate: Held,
    up: Held,
    down: Held,
}

/// ggml tensors whose data points into the mapped file.
struct WeightTensors {
    ctx: NonNull<sys::ggml_context>,
    token_embd: Held,
    output_norm: Held,
    output: Held,
    layers: Vec<LayerTensors>,
}

// SAFETY: after construction the weight context and its tensors are only read
// (ggml reads `data`, `ne`, `nb` and `type_` of source tensors while computing);
// nothing mutates them, so sharing across threads is sound.
unsafe impl Send for WeightTensors {}
unsafe impl Sync for WeightTensors {}

impl Drop for WeightTensors {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from ggml_init and is freed exactly once.
        unsafe { sys::ggml_free(self.ctx.as_ptr()) }
    }
}

/// A llama-family model evaluated with ggml on the CPU.
pub struct GgmlEngine {
    // Field order matters: the tensors point into `mmap`, so they drop first.
    tensors: WeightTensors,
    weights: Weights,
    info: ModelInfo,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    n_threads: usize,
    /// How this engine computes, fixed at load (the effective values: a
    /// kernel this CPU cannot run is off).
    options: EngineOptions,
    /// RoPE parameters for [`kernels::rope_op`] (boxed: graphs hold its address).
    rope: Box<kernels::RopeParams>,
    /// Decode steps of concurrent sessions, computed together.
    batcher: batch::Batcher,
    /// How many threads each graph gets (see [`super::threads`]).
    threads: std::sync::Mutex<super::threads::ThreadPolicy>,
    mmap: Mmap,
}

impl std::fmt::Debug for GgmlEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgmlEngine")
            .field("info", &self.info)
            .field("n_threads", &self.n_threads)
            .finish_non_exhaustive()
    }
}

/// Per-sequence state of a [`GgmlEngine`]: KV cache and reusable compute buffers.
pub struct GgmlSession {
    n_layers: usize,
    kv_dim: usize,
    kv: KvCache,
    scratch: Scratch,
    /// LoRA adapters every projection applies, in order (see [`GgmlEngine::set_adapters`]).
    adapters: Vec<ActiveLora>,
}

/// Attention spans whole multiples of this many cache cells (the cells past
/// the sequence are masked and hold zeros): ggml's tiled f16 kernel needs a
/// multiple of 16, and with 64 its single-token f16 dot products and the
/// softmax sums run in whole SIMD steps, as in current llama.cpp (which pads
/// to 256; the extra cells only add exact zeros).
const KV_PAD: usize = 64;

/// Cache cells attention reads for a sequence of `len` positions.
fn kv_span(len: usize) -> usize {
    len.div_ceil(KV_PAD) * KV_PAD
}

/// K and V of every layer, F16; V is stored transposed (a row per dimension).
/// Cells hold zeros until written, so padded cells are finite.
struct KvCache {
    n_ctx: usize,
    /// Allocated cells: `n_ctx` rounded up to [`KV_PAD`].
    cap: usize,
    /// Layers with a cache (the others' `k` and `v` are null).
    layers: Range<usize>,
    len: Vec<usize>,
    ctx: NonNull<sys::ggml_context>,
    k: Vec<Option<Held>>,
    v: Vec<Option<Held>>,
}

/// Graph metadata, the graph allocator and ggml's work buffer, reused across calls.
struct Scratch {
    n_threads: usize,
    /// Graph capacity in nodes (`meta` is sized for it).
    nodes: usize,
    galloc: NonNull<c_void>,
    meta: Vec<u8>,
    work: Vec<u8>,
}

// SAFETY: the session exclusively owns its ggml contexts, tensors and allocator;
// moving it to another thread moves that ownership (it is not Sync).
unsafe impl Send for GgmlSession {}

impl Drop for KvCache {
    fn drop(&mut self) {
        // SAFETY: created by ggml_init in `new_session`, freed once.
        unsafe { sys::ggml_free(self.ctx.as_ptr()) }
    }
}

// SAFETY: the scratch exclusively owns its allocator and buffers; moving it to
// another thread moves that ownership (the engine's batch scratch is behind a
// mutex).
unsafe impl Send for Scratch {}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: created by ggml_gallocr_new in `new_session`, freed once.
        unsafe { ggml_gallocr_free(self.galloc.as_ptr()) }
    }
}

impl GgmlSession {
    /// Positions the KV cache can hold.
    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx
    }

    /// Set the number of compute threads used by this session: 1 up to the
    /// available cores (see [`resolve_threads`]; 0 = the idle cores now).
    pub fn set_threads(&mut self, n_threads: usize) -> Result<()> {
        self.scratch.n_threads = resolve_threads(n_threads)?;
        Ok(())
    }

    /// Bytes held by the KV cache.
    pub fn kv_bytes(&self) -> usize {
        self.kv.layers.len() * 2 * self.kv_dim * self.kv.cap * 2
    }

    /// The LoRA adapters this session applies, in order.
    pub fn adapters(&self) -> &[ActiveLora] {
        &self.adapters
    }
}

/// Bytes of memory the system can still give us (`MemAvailable`), where known.
pub(crate) fn available_memory() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

fn ggml_type(t: GgmlType) -> sys::ggml_type {
    t as u32 as sys::ggml_type
}

impl GgmlEngine {
    /// How the thread counts of graphs were chosen so far.
    pub fn thread_stats(&self) -> super::ThreadStats {
        self.thread_policy().stats()
    }

    fn thread_policy(&self) -> std::sync::MutexGuard<'_, super::threads::ThreadPolicy> {
        self.threads.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How this engine computes (the effective options: `threads` resolved,
    /// `custom_gemm` off where the CPU cannot run it).
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Whether exact accumulation is on (see [`EngineOptions::exact`]).
    pub fn exact_accumulation(&self) -> bool {
        self.options.exact
    }

    /// Bytes the KV cache of a session of `n_ctx` positions over `n_layers`
    /// layers holds (what [`GgmlSession::kv_bytes`] will report), or `None`
    /// if it overflows.
    pub fn kv_bytes_for(&self, n_layers: usize, n_ctx: usize) -> Option<usize> {
        let kv_dim = self.info.n_head_kv * self.info.head_dim;
        kv_dim
            .checked_mul(n_ctx.checked_add(KV_PAD - 1)? / KV_PAD * KV_PAD)?
            .checked_mul(4 * n_layers)
    }

    /// A session whose KV cache holds `n_ctx` positions for `layers` only (a
    /// pipeline stage's range): it can run those layers and no others, and
    /// its cache is that share of a whole-model session's.
    pub fn new_session_for(&self, layers: Range<usize>, n_ctx: usize) -> Result<GgmlSession> {
        if layers.start >= layers.end || layers.end > self.info.n_layers {
            return Err(Error::InvalidArgument(format!(
                "session layers {}..{}: expected a non-empty range within 0..{}",
                layers.start, layers.end, self.info.n_layers
            )));
        }
        if n_ctx == 0 {
            return Err(Error::InvalidArgument(
                "context size must be at least 1".into(),
            ));
        }
        let info = &self.info;
        // The trained context bounds positions RoPE was trained for, and every
        // size below (this ggml aborts rather than failing an allocation).
        if n_ctx > info.n_ctx_train {
            return Err(Error::InvalidArgument(format!(
                "context size {n_ctx}: this model was trained for at most {} positions",
                info.n_ctx_train
            )));
        }
        let kv_dim = info.n_head_kv * info.head_dim;
        let cap = kv_span(n_ctx);
        // SAFETY: pure size computation.
        let overhead = unsafe { sys::ggml_tensor_overhead() };
        let mem_size = kv_dim
            .checked_mul(cap)
            .and_then(|e| e.checked_mul(2))
            .and_then(|t| t.checked_add(overhead + 64))
            .and_then(|t| t.checked_mul(2 * layers.len()))
            .and_then(|t| t.checked_add(1024))
            .ok_or_else(|| Error::InvalidArgument(format!("context size {n_ctx} is too large")))?;
        if let Some(avail) = available_memory() {
            if mem_size > avail {
                return Err(Error::InvalidArgument(format!(
                    "context size {n_ctx} needs a {} MiB KV cache; {} MiB of memory is available",
                    mem_size >> 20,
                    avail >> 20
                )));
            }
        }
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: ptr::null_mut(),
            no_alloc: false,
        };
        // SAFETY: ggml allocates and owns the KV buffer; freed in GgmlSession::drop.
        let kv_ctx = NonNull::new(unsafe { sys::ggml_init(params) }).ok_or_else(|| {
            Error::ggml(
                GgmlErrorKind::Alloc,
                format!("could not allocate a KV cache of {mem_size} bytes"),
            )
        })?;
        let mut k = Vec::with_capacity(info.n_layers);
        let mut v = Vec::with_capacity(info.n_layers);
        for l in 0..info.n_layers {
            if !layers.contains(&l) {
                // No cache for this layer: check_kv refuses to run it.
                k.push(None);
                v.push(None);
                continue;
            }
            // SAFETY: tensors in the KV context, sized within `mem_size`.
            unsafe {
                for list in [&mut k, &mut v] {
                    let t = sys::ggml_new_tensor_1d(
                        kv_ctx.as_ptr(),
                        sys::ggml_type_GGML_TYPE_F16,
                        (kv_dim * cap) as i64,
                    );
                    // Zero cells: padded cells are read (and masked) before any write.
                    ptr::write_bytes((*t).data as *mut u8, 0, sys::ggml_nbytes(t));
                    // The cache's context lives as long as the session, and
                    // graphs reading it are built within a borrow of it.
                    list.push(Held::new(t));
                }
            }
        }
        let kv = KvCache {
            n_ctx,
            cap,
            layers: layers.clone(),
            len: vec![0; info.n_layers],
            ctx: kv_ctx,
            k,
            v,
        };
        Ok(GgmlSession {
            n_layers: info.n_layers,
            kv_dim,
            kv,
            scratch: self.new_scratch(max_nodes(info.n_layers, 0))?,
            adapters: Vec::new(),
        })
    }

    /// Graph buffers for graphs of up to `nodes` nodes.
    fn new_scratch(&self, nodes: usize) -> Result<Scratch> {
        // SAFETY: allocator over ggml's CPU buffer type; freed in Scratch::drop.
        let galloc = NonNull::new(unsafe { ggml_gallocr_new(ggml_backend_cpu_buffer_type()) })
            .ok_or_else(|| {
                Error::ggml(GgmlErrorKind::Alloc, "could not create the graph allocator")
            })?;
        Ok(Scratch {
            n_threads: self.n_threads,
            nodes,
            galloc,
            meta: vec![0; meta_bytes(nodes)],
            work: Vec::new(),
        })
    }

    /// `W·x` for one projection plus the session's adapters' `s · B (A x)`:
    /// [`Engine::project`] as the forward pass computes it with adapters.
    pub fn project_adapted(
        &self,
        layer: usize,
        projection: Projection,
        x: &[f32],
        session: &mut GgmlSession,
    ) -> Result<Vec<f32>> {
        let mut y = self.project(layer, projection, x, session)?;
        let n = y.len() / self.projection_tensor(layer, projection)?.1.rows() as usize;
        self.add_lora(
            &mut session.scratch,
            &session.adapters,
            layer,
            projection,
            x,
            n,
            &mut y,
        )?;
        Ok(y)
    }

    /// The model's GGUF file as loaded (mapped read-only): the bytes whose
    /// BLAKE3 hash is the model id. Peers that know the model only by id
    /// fetch it from here (see [`crate::ledger::transfer::Offered`]).
    pub fn file_bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// Reads and validates a LoRA adapter for this model (see [`LoraAdapter`]).
    pub fn load_adapter(&self, path: impl AsRef<Path>) -> Result<Arc<LoraAdapter>> {
        LoraAdapter::load(path, &self.info).map(Arc::new)
    }

    /// Makes `session` apply `adapters` (in order) from its next call on,
    /// replacing the ones it applied; an empty list runs the base model. The
    /// KV cache is kept: positions already in it were computed with the
    /// previous adapters (truncate or start a new session to recompute them).
    /// Fails, changing nothing, if an adapter was loaded for another model or
    /// a scale is not finite.
    pub fn set_adapters(&self, session: &mut GgmlSession, adapters: &[ActiveLora]) -> Result<()> {
        self.check_session(session)?;
        for a in adapters {
            a.check(self.info.id)?;
        }
        let nodes = max_nodes(self.info.n_layers, adapters.len());
        if nodes > session.scratch.nodes {
            session.scratch.meta = vec![0; meta_bytes(nodes)];
            session.scratch.nodes = nodes;
        }
        session.adapters = adapters.to_vec();
        Ok(())
    }

    /// Number of compute threads new sessions use.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    fn check_session(&self, s: &GgmlSession) -> Result<()> {
        if s.n_layers != self.info.n_layers || s.kv_dim != self.info.n_head_kv * self.info.head_dim
        {
            return Err(Error::InvalidArgument(format!(
                "session has {} layers of width {}, the model {} of width {}",
                s.n_layers,
                s.kv_dim,
                self.info.n_layers,
                self.info.n_head_kv * self.info.head_dim
            )));
        }
        Ok(())
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("no tokens to evaluate".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.info.n_vocab) {
            return Err(Error::InvalidArgument(format!(
                "token id {bad}: expected < {} (vocabulary size)",
                self.info.n_vocab
            )));
        }
        Ok(())
    }

    /// Check that `layers` may be appended to at `pos` with `n` tokens.
    fn check_kv(&self, s: &KvCache, layers: &Range<usize>, pos: usize, n: usize) -> Result<()> {
        if layers.start > layers.end || layers.end > self.info.n_layers {
            return Err(Error::InvalidArgument(format!(
                "layer range {}..{}: expected a range within 0..{}",
                layers.start, layers.end, self.info.n_layers
            )));
        }
        if pos + n > s.n_ctx {
            return Err(Error::ContextOverflow {
                needed: pos + n,
                capacity: s.n_ctx,
            });
        }
        if !layers.is_empty() && (layers.start < s.layers.start || layers.end > s.layers.end) {
            return Err(Error::InvalidArgument(format!(
                "layer range {}..{}: this session holds a KV cache for layers {}..{} only",
                layers.start, layers.end, s.layers.start, s.layers.end
            )));
        }
        for l in layers.clone() {
            if s.len[l] != pos {
                return Err(Error::InvalidArgument(format!(
                    "layer {l}: KV cache holds {} positions, the hidden state starts at {pos}",
                    s.len[l]
                )));
            }
        }
        Ok(())
    }

    fn projection_tensor(&self, layer: usize, p: Projection) -> Result<(Held, &TensorInfo)> {
        if p == Projection::Output {
            return Ok((self.tensors.output, &self.weights.output));
        }
        let (Some(lt), Some(lw)) = (
            self.tensors.layers.get(layer),
            self.weights.layers.get(layer),
        ) else {
            return Err(Error::InvalidArgument(format!(
                "layer {layer}: expected < {}",
                self.info.n_layers
            )));
        };
        Ok(match p {
            Projection::Q => (lt.wq, &lw.wq),
            Projection::K => (lt.wk, &lw.wk),
            Projection::V => (lt.wv, &lw.wv),
            Projection::O => (lt.wo, &lw.wo),
            Projection::Gate => (lt.gate, &lw.gate),
            Projection::Up => (lt.up, &lw.up),
            Projection::Down => (lt.down, &lw.down),
            Projection::Output => (self.tensors.output, &self.weights.output),
        })
    }

    fn check_hidden(&self, hidden: &Hidden) -> Result<usize> {
        let n = hidden.n_tokens();
        if hidden.n_embd != self.info.n_embd || n == 0 || hidden.data.len() != n * hidden.n_embd {
            return Err(Error::InvalidArgument(format!(
                "hidden state: expected a non-empty multiple of {} values, found {} values of width {}",
                self.info.n_embd,
                hidden.data.len(),
                hidden.n_embd
            )));
        }
        Ok(n)
    }

    /// `rms_norm(x) * weight` for `n` rows of `x`, computed by ggml.
    fn norm(&self, scratch: &mut Scratch, x: &[f32], n: usize, weight: Held) -> Result<Vec<f32>> {
        let ne = [self.info.n_embd as i64, n as i64];
        self.compute(scratch, |g| {
            let xt = g.input_f32(x, &ne);
            let weight = g.held(weight);
            self.build_norm(g, xt, weight)
        })
    }

    /// Call `project` and check it returned `n` rows of `rows` values.
    fn call_projector(
        project: &mut Projector<'_>,
        layer: usize,
        p: Projection,
        x: &[f32],
        n: usize,
        rows: usize,
    ) -> Result<Vec<f32>> {
        let y = project(layer, p, x, n)?;
        if y.len() != n * rows {
            return Err(Error::InvalidArgument(format!(
                "layer {layer} {p:?}: the projector returned {} values, expected {n} x {rows}",
                y.len()
            )));
        }
        Ok(y)
    }

    /// Adds the adapters' `s · B (A x)` for `projection` of `layer` to `y`
    /// (`n` rows each), computed here: the same values the fused graph of
    /// [`GgmlEngine::lora_mat_mul`] adds, for a projection computed elsewhere.
    #[allow(clippy::too_many_arguments)]
    fn add_lora(
        &self,
        scratch: &mut Scratch,
        adapters: &[ActiveLora],
        layer: usize,
        projection: Projection,
        x: &[f32],
        n: usize,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        if !adapters.iter().any(|a| a.adapter.adapts(layer, projection)) {
            return Ok(());
        }
        let cols = x.len() / n.max(1);
        let rows = y.len() / n.max(1);
        // One graph for all adapters, chained as in the fused forward pass.
        let sum = self.compute(scratch, |g| {
            let xt = g.input_f32(x, &[cols as i64, n as i64]);
            let yt = g.input_f32(y, &[rows as i64, n as i64]);
            self.add_adapters(g, adapters, layer, projection, yt, xt)
        })?;
        if sum.len() != y.len() {
            return Err(Error::ggml(
                GgmlErrorKind::Internal,
                format!(
                    "layer {layer} {projection:?}: LoRA gave {} values, expected {}",
                    sum.len(),
                    y.len()
                ),
            ));
        }
        *y = sum;
        Ok(())
    }
}
