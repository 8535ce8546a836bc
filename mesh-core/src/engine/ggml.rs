//! The llama-family forward pass built as ggml graphs.
//!
//! Weights stay in the memory-mapped GGUF file: ggml tensors point straight into
//! the mapping. Each call builds one graph for the requested work (a layer range,
//! optionally fused with the embedding lookup and the output head), lets ggml's
//! graph allocator place the intermediates in a buffer the session reuses, and
//! computes it on `n_threads` threads. This is the only module with ggml `unsafe`.

use std::ffi::{c_void, CString};
use std::fs::File;
use std::ops::Range;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ggml_sys_bleedingedge as sys;
use memmap2::Mmap;

use super::kernels;
use super::lora::{lora_add_op, ActiveLora, DotOrder, LoraAdapter, LoraCall, LoraPair};
use super::model::{ModelInfo, RopeKind, Weights};
use super::q4_1;
use super::q8_0;
use super::{CpuClass, Engine, Hidden, Logits, ModelId, Projection, Projector, WeightView};
use crate::chat::ChatTemplate;
use crate::gguf::{GgmlType, Gguf, TensorInfo};
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

type T = *mut sys::ggml_tensor;

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
    attn_norm: T,
    wq: T,
    wk: T,
    wv: T,
    bq: Option<T>,
    bk: Option<T>,
    bv: Option<T>,
    wo: T,
    ffn_norm: T,
    gate: T,
    up: T,
    down: T,
}

/// ggml tensors whose data points into the mapped file.
struct WeightTensors {
    ctx: NonNull<sys::ggml_context>,
    token_embd: T,
    output_norm: T,
    output: T,
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
    /// Batched Q4_1 projections use [`q4_1`]'s tiled kernel (bit-identical to ggml).
    custom_gemm: AtomicBool,
    /// Every Q4_1 projection (decode too) uses [`q4_1`]'s exact-accumulation kernel.
    exact: AtomicBool,
    /// RoPE parameters for [`kernels::rope_op`] (boxed: graphs hold its address).
    rope: Box<kernels::RopeParams>,
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
    k: Vec<T>,
    v: Vec<T>,
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

/// What a non-regular file is, for error messages.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        let t = meta.file_type();
        if t.is_fifo() {
            return "FIFO";
        }
        if t.is_socket() {
            return "socket";
        }
        if t.is_block_device() || t.is_char_device() {
            return "device";
        }
    }
    if meta.is_dir() {
        "directory"
    } else {
        "non-regular file"
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
    /// Memory-map and validate a GGUF model, using `n_threads` compute threads
    /// (0 = the idle cores, see [`default_threads`]; more than the cores is an error).
    pub fn load(path: impl AsRef<Path>, n_threads: usize) -> Result<GgmlEngine> {
        let path = path.as_ref();
        // A FIFO or device would block the open or the mapping forever: only
        // regular files (symlinks followed) are models.
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{}: expected a regular GGUF file, found a {}",
                path.display(),
                file_kind(&meta)
            )));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the mapping is read-only; if another process truncates the file
        // while it is mapped, reads fault (SIGBUS) — the same contract as llama.cpp.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::from_mmap(mmap, n_threads)
    }

    fn from_mmap(mmap: Mmap, n_threads: usize) -> Result<GgmlEngine> {
        let gguf = Gguf::parse(&mmap)?;
        let id = ModelId(*blake3::hash(&mmap).as_bytes());
        let (info, weights) = ModelInfo::from_gguf(&gguf, id, mmap.len() as u64)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        if tokenizer.n_vocab() != info.n_vocab {
            return Err(Error::Gguf(format!(
                "vocabulary: expected {} tokens (rows of token_embd.weight), found {}",
                info.n_vocab,
                tokenizer.n_vocab()
            )));
        }
        let piece = |id: Option<u32>| -> String {
            id.and_then(|id| tokenizer.token_to_piece(id, true).ok())
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default()
        };
        let template = match gguf.opt_value::<&str>("tokenizer.chat_template")? {
            Some(src) => ChatTemplate::new(src, &piece(tokenizer.bos()), &piece(tokenizer.eos()))?,
            None => ChatTemplate::chatml(),
        };
        let tensors = create_weight_tensors(&mmap, &weights)?;
        let n_threads = resolve_threads(n_threads)?;
        let rope = Box::new(kernels::RopeParams {
            n_dims: info.head_dim,
            neox: info.rope_kind == RopeKind::Neox,
            freq_base: info.rope_freq_base,
            freq_scale: info.rope_freq_scale,
        });
        Ok(GgmlEngine {
            tensors,
            weights,
            info,
            tokenizer,
            template,
            n_threads,
            custom_gemm: AtomicBool::new(q4_1::available()),
            exact: AtomicBool::new(false),
            rope,
            mmap,
        })
    }

    /// Whether batched Q4_1 projections use mesh-llm's tiled kernel instead of
    /// ggml's `mul_mat` (on by default where the CPU supports it). Both give
    /// bit-identical results; switching it off is a debugging and benchmarking aid.
    /// Returns whether the kernel is now in use (false if this CPU cannot run it).
    pub fn set_custom_gemm(&self, on: bool) -> bool {
        let on = on && q4_1::available();
        self.custom_gemm.store(on, Ordering::Relaxed);
        on
    }

    /// Exact accumulation (off by default): every Q4_1 projection, including
    /// single-token decode, computes the exact `Σ_b d_w·d_x·isum_b + m_w·d_x·Σq_b`
    /// of the Q8_1-quantized input (with `Σq_b` summed from the int8s, not Q8_1's
    /// fp16-rounded `s`) and rounds it once to f32, instead of ggml's f32
    /// accumulation. The result then matches a computation of the exact product
    /// elsewhere (e.g. private delegation) and does not depend on batching or
    /// threads, except where an f64 rounding lands on an f32 rounding boundary
    /// (probability ~2^-29 per output). The Q8_0 output head stays on ggml.
    /// Returns whether the mode is now on (false if this CPU cannot run the kernel).
    pub fn set_exact_accumulation(&self, on: bool) -> bool {
        let on = on && q4_1::available();
        self.exact.store(on, Ordering::Relaxed);
        on
    }

    /// Whether exact accumulation is on (see [`GgmlEngine::set_exact_accumulation`]).
    pub fn exact_accumulation(&self) -> bool {
        self.exact.load(Ordering::Relaxed)
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
            Error::Ggml(format!("could not allocate a KV cache of {mem_size} bytes"))
        })?;
        let mut k = Vec::with_capacity(info.n_layers);
        let mut v = Vec::with_capacity(info.n_layers);
        for l in 0..info.n_layers {
            if !layers.contains(&l) {
                // No cache for this layer: check_kv refuses to run it.
                k.push(ptr::null_mut());
                v.push(ptr::null_mut());
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
                    list.push(t);
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
        // SAFETY: allocator over ggml's CPU buffer type; freed in Scratch::drop.
        let galloc = NonNull::new(unsafe { ggml_gallocr_new(ggml_backend_cpu_buffer_type()) })
            .ok_or_else(|| Error::Ggml("could not create the graph allocator".into()))?;
        let nodes = max_nodes(info.n_layers, 0);
        Ok(GgmlSession {
            n_layers: info.n_layers,
            kv_dim,
            kv,
            scratch: Scratch {
                n_threads: self.n_threads,
                nodes,
                galloc,
                meta: vec![0; meta_bytes(nodes)],
                work: Vec::new(),
            },
            adapters: Vec::new(),
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

    fn projection_tensor(&self, layer: usize, p: Projection) -> Result<(T, &TensorInfo)> {
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
    fn norm(&self, scratch: &mut Scratch, x: &[f32], n: usize, weight: T) -> Result<Vec<f32>> {
        let ne = [self.info.n_embd as i64, n as i64];
        self.compute(scratch, |g| {
            let xt = g.input_f32(x, &ne);
            // SAFETY: `xt` is n_embd x n and `weight` an n_embd vector of the model.
            unsafe {
                sys::ggml_mul(
                    g.ctx,
                    sys::ggml_rms_norm(g.ctx, xt, self.info.rms_eps),
                    weight,
                )
            }
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

    /// Build and compute one graph; `build` returns the output tensor.
    fn compute(&self, s: &mut Scratch, build: impl FnOnce(&mut Graph) -> T) -> Result<Vec<f32>> {
        let params = sys::ggml_init_params {
            mem_size: s.meta.len(),
            mem_buffer: s.meta.as_mut_ptr().cast(),
            no_alloc: true,
        };
        // SAFETY: `meta` outlives the context, which is freed before returning.
        let ctx = NonNull::new(unsafe { sys::ggml_init(params) })
            .ok_or_else(|| Error::Ggml("ggml_init failed for the compute context".into()))?;
        let result = (|| {
            // SAFETY: the graph lives in `ctx`'s metadata buffer, sized for MAX_NODES.
            let gf = unsafe { sys::ggml_new_graph_custom(ctx.as_ptr(), s.nodes, false) };
            let mut g = Graph {
                ctx: ctx.as_ptr(),
                gf,
                inputs: Vec::new(),
                quantized: Vec::new(),
                lora_calls: Vec::new(),
                shape: None,
            };
            let out = build(&mut g);
            // SAFETY: every tensor was created in `ctx` by the builders below, with
            // shapes checked by the caller; the allocator places the intermediates.
            unsafe {
                sys::ggml_set_output(out);
                sys::ggml_build_forward_expand(gf, out);
                if !ggml_gallocr_alloc_graph(s.galloc.as_ptr(), gf) {
                    return Err(Error::Ggml("could not allocate the compute graph".into()));
                }
                for (t, bytes) in &g.inputs {
                    debug_assert_eq!(sys::ggml_nbytes(*t), bytes.len());
                    ptr::copy_nonoverlapping(bytes.as_ptr(), (**t).data.cast::<u8>(), bytes.len());
                }
                let mut plan = sys::ggml_graph_plan(gf, s.n_threads as i32);
                if plan.work_size > s.work.len() {
                    s.work.resize(plan.work_size, 0);
                }
                plan.work_data = s.work.as_mut_ptr();
                let status = sys::ggml_graph_compute(gf, &mut plan);
                if status != sys::ggml_status_GGML_STATUS_SUCCESS {
                    return Err(Error::Ggml(format!(
                        "graph compute failed with status {status}"
                    )));
                }
                let n = sys::ggml_nelements(out) as usize;
                let mut v = vec![0f32; n];
                ptr::copy_nonoverlapping((*out).data.cast::<f32>(), v.as_mut_ptr(), n);
                Ok(v)
            }
        })();
        // SAFETY: frees only the context's bookkeeping; `meta` is ours.
        unsafe { sys::ggml_free(ctx.as_ptr()) };
        result
    }

    /// `w · x` for a weight `w` (`[cols, rows]`) and `x` (F32 `[cols, n]`): with the
    /// tiled kernel of [`q4_1`] for Q4_1 weights and batches, else ggml's `mul_mat`.
    ///
    /// # Safety
    /// `w` and `x` are tensors of this graph (or the weights) with `x.ne[0] == w.ne[0]`.
    unsafe fn mat_mul(&self, g: &mut Graph, w: T, x: T, n: usize) -> T {
        let ctx = g.ctx;
        let (cols, rows) = ((*w).ne[0] as usize, (*w).ne[1] as usize);
        let exact = self.exact.load(Ordering::Relaxed);
        let use_kernel = (exact || (self.custom_gemm.load(Ordering::Relaxed) && n >= 2))
            && (*w).type_ == sys::ggml_type_GGML_TYPE_Q4_1
            && (*w).ne[2] == 1
            && (*w).ne[3] == 1
            && (*x).type_ == sys::ggml_type_GGML_TYPE_F32
            && sys::ggml_is_contiguous(x)
            && (*x).ne[0] as usize == cols
            && (*x).ne[1] as usize == n
            && (*x).ne[2] == 1
            && (*x).ne[3] == 1
            && q4_1::fits(cols, n);
        if !use_kernel {
            let exact_q8_0 = exact
                && (*w).type_ == sys::ggml_type_GGML_TYPE_Q8_0
                && (*w).ne[2] == 1
                && (*w).ne[3] == 1
                && sys::ggml_is_contiguous(w)
                && (*x).type_ == sys::ggml_type_GGML_TYPE_F32
                && (*x).ne[0] as usize == cols
                && (*x).ne[2] == 1
                && (*x).ne[3] == 1
                && (*x).nb[0] == 4
                && q8_0::fits(cols);
            if exact_q8_0 {
                // The custom op's result takes the shape of its first argument.
                let shape = g.shape_3d(rows as i64, (*x).ne[1], 1);
                return sys::ggml_map_custom3(
                    ctx,
                    shape,
                    w,
                    x,
                    Some(q8_0::exact_gemm_op),
                    N_TASKS_MAX,
                    ptr::null_mut(),
                );
            }
            return sys::ggml_mul_mat(ctx, w, x);
        }
        let userdata = if exact {
            q4_1::exact_userdata()
        } else {
            ptr::null_mut()
        };
        let xq = match g
            .quantized
            .iter()
            .find(|(src, ex, _)| *src == x && *ex == exact)
        {
            Some(&(_, _, xq)) => xq,
            None => {
                let xq =
                    sys::ggml_map_custom1(ctx, x, Some(q4_1::quantize_op), N_TASKS_MAX, userdata);
                g.quantized.push((x, exact, xq));
                xq
            }
        };
        // The custom op's result takes the shape of its first argument.
        let shape = g.shape_3d(rows as i64, n as i64, 1);
        sys::ggml_map_custom3(
            ctx,
            shape,
            w,
            xq,
            Some(q4_1::gemm_op),
            N_TASKS_MAX,
            userdata,
        )
    }

    /// `w · cur` plus each adapter's `s · B (A cur)` for `projection` of `layer`,
    /// built as llama.cpp's `build_lora_mm` builds it (same ops, same order).
    ///
    /// # Safety
    /// As [`GgmlEngine::mat_mul`]; the adapters were checked against this model.
    #[allow(clippy::too_many_arguments)]
    unsafe fn lora_mat_mul(
        &self,
        g: &mut Graph,
        adapters: &[ActiveLora],
        layer: usize,
        projection: Projection,
        w: T,
        cur: T,
        n: usize,
    ) -> T {
        let res = self.mat_mul(g, w, cur, n);
        self.add_adapters(g, adapters, layer, projection, res, cur)
    }

    /// `res` plus each adapter's `s · B (A cur)` for `projection` of `layer`,
    /// in order (see [`GgmlEngine::lora_add`]).
    ///
    /// # Safety
    /// As [`GgmlEngine::lora_add`].
    unsafe fn add_adapters(
        &self,
        g: &mut Graph,
        adapters: &[ActiveLora],
        layer: usize,
        projection: Projection,
        mut res: T,
        cur: T,
    ) -> T {
        for act in adapters {
            if let Some(pair) = act.adapter.pair(layer, projection) {
                res = self.lora_add(g, res, act, pair, cur);
            }
        }
        res
    }

    /// `res + s · B (A cur)` for one adapter pair. F32 halves go through
    /// [`lora_add_op`] (one node), which sums each product as llama.cpp's CPU
    /// backend of this machine's SIMD class does (its tiled F32 kernel or
    /// `ggml_vec_dot_f32`; in exact mode always the AVX2 order, so results do
    /// not depend on the CPU); F16 halves use ggml's `mul_mat`, `scale`, `add`.
    ///
    /// # Safety
    /// `cur` is an F32 `[cols, n]` tensor of this graph and `res` `[rows, n]`;
    /// `pair` belongs to an adapter checked against this model, which outlives
    /// the graph.
    unsafe fn lora_add(
        &self,
        g: &mut Graph,
        res: T,
        act: &ActiveLora,
        pair: &LoraPair,
        cur: T,
    ) -> T {
        let ctx = g.ctx;
        let scale = act.adapter.effective_scale(act.scale, pair.rank);
        let fused = (*pair.a).type_ == sys::ggml_type_GGML_TYPE_F32
            && (*pair.b).type_ == sys::ggml_type_GGML_TYPE_F32
            && !pair.bt.is_null()
            && (*cur).type_ == sys::ggml_type_GGML_TYPE_F32
            && (*res).type_ == sys::ggml_type_GGML_TYPE_F32
            && sys::ggml_is_contiguous(cur)
            && sys::ggml_is_contiguous(res)
            && (*cur).ne[2] == 1
            && (*cur).ne[3] == 1
            && (*res).ne[1] == (*cur).ne[1]
            && (*res).ne[2] == 1
            && (*res).ne[3] == 1;
        if !fused {
            let ab = sys::ggml_mul_mat(ctx, pair.b, sys::ggml_mul_mat(ctx, pair.a, cur));
            return sys::ggml_add(ctx, res, sys::ggml_scale(ctx, ab, scale));
        }
        let order = if !self.exact.load(Ordering::Relaxed) && cpu_class() == CpuClass::Avx512 {
            DotOrder::Wide16
        } else {
            DotOrder::Wide8
        };
        let call = Box::new(LoraCall {
            a: pair.a,
            b: pair.b,
            bt: pair.bt,
            scale,
            order,
        });
        let userdata = &*call as *const LoraCall as *mut c_void;
        g.lora_calls.push(call);
        sys::ggml_map_custom2(ctx, res, cur, Some(lora_add_op), N_TASKS_MAX, userdata)
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
            // SAFETY: `xt` is cols x n and `yt` rows x n, as the pairs
            // expect (checked at load); the adapters outlive the graph.
            unsafe { self.add_adapters(g, adapters, layer, projection, yt, xt) }
        })?;
        if sum.len() != y.len() {
            return Err(Error::Ggml(format!(
                "layer {layer} {projection:?}: LoRA gave {} values, expected {}",
                sum.len(),
                y.len()
            )));
        }
        *y = sum;
        Ok(())
    }

    /// Positions and the causal mask of `n` tokens at `pos`, as graph inputs.
    fn position_inputs(&self, g: &mut Graph, pos: usize, n: usize) -> (T, T) {
        let n_kv = kv_span(pos + n);
        let positions: Vec<i32> = (pos..pos + n).map(|p| p as i32).collect();
        let inp_pos = g.input_i32(&positions);
        let mut mask = vec![0f32; n_kv * n];
        for i in 0..n {
            for j in pos + i + 1..n_kv {
                mask[i * n_kv + j] = f32::NEG_INFINITY;
            }
        }
        let kq_mask = g.input_f32(&mask, &[n_kv as i64, n as i64]);
        (inp_pos, kq_mask)
    }

    /// Attention of layer `il` from projected (and biased) `q`, `k`, `v`: RoPE,
    /// append K/V to the cache at `pos`, softmax(K·Q)·V; returns the merged heads
    /// (`n_embd x n`), before the output projection.
    ///
    /// # Safety
    /// `q` is `n_embd x n`, `k` and `v` are `kv_dim x n` F32 tensors of this graph,
    /// `pos + n <= s.n_ctx`, and `inp_pos`/`kq_mask` come from `position_inputs`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn attention(
        &self,
        g: &mut Graph,
        s: &KvCache,
        il: usize,
        q: T,
        k: T,
        v: T,
        pos: usize,
        n: usize,
        inp_pos: T,
        kq_mask: T,
    ) -> T {
        let info = &self.info;
        let (ctx, gf) = (g.ctx, g.gf);
        let n_kv = kv_span(pos + n);
        let hd = info.head_dim as i64;
        let kv_dim = info.n_head_kv * info.head_dim;
        let kq_scale = 1.0 / (info.head_dim as f32).sqrt();
        let (kc, vc) = (s.k[il], s.v[il]);
        let k_esz = sys::ggml_element_size(kc);
        let v_esz = sys::ggml_element_size(vc);
        // Our RoPE rather than ggml's: the pinned ggml rounds the rotation
        // differently from current llama.cpp in rare elements.
        let rope_params = &*self.rope as *const kernels::RopeParams as *mut std::ffi::c_void;
        let rope = |t: T, heads: usize| {
            let t = sys::ggml_reshape_3d(ctx, t, hd, heads as i64, n as i64);
            sys::ggml_map_custom2(
                ctx,
                t,
                inp_pos,
                Some(kernels::rope_op),
                N_TASKS_MAX,
                rope_params,
            )
        };
        let q = rope(q, info.n_head);
        let k = rope(k, info.n_head_kv);

        // Append this batch's K (row per token) and V (transposed) to the cache.
        let k_dst = sys::ggml_view_1d(ctx, kc, (n * kv_dim) as i64, k_esz * kv_dim * pos);
        sys::ggml_build_forward_expand(gf, sys::ggml_cpy(ctx, k, k_dst));
        let v_t = sys::ggml_transpose(ctx, sys::ggml_reshape_2d(ctx, v, kv_dim as i64, n as i64));
        let v_dst = sys::ggml_view_2d(ctx, vc, n as i64, kv_dim as i64, v_esz * s.cap, v_esz * pos);
        sys::ggml_build_forward_expand(gf, sys::ggml_cpy(ctx, v_t, v_dst));

        // Contiguous queries let ggml use its tiled (llamafile) F16 x F32 kernel for
        // K·Q instead of one dot product per pair: ~10% of prompt time. Rounded
        // to fp16 first, as current ggml converts them before its f16 x f16
        // kernel (same per-element order): K·Q is then bit-identical to it.
        //
        // One token (decode) is the exception, as in current llama.cpp: its
        // products are ggml's f16 dot products (queries and softmax weights
        // converted to f16 tensors, which routes ggml past the tiled kernel),
        // so a decode step computes what upstream's does.
        let to_f16 = |t: T| {
            let ne = &(*t).ne;
            let h = sys::ggml_new_tensor_3d(ctx, sys::ggml_type_GGML_TYPE_F16, ne[0], ne[1], ne[2]);
            sys::ggml_cpy(ctx, t, h)
        };
        let exact = self.exact.load(Ordering::Relaxed);
        let qp = sys::ggml_cont(ctx, sys::ggml_permute(ctx, q, 0, 2, 1, 3));
        let qp = if exact {
            qp
        } else if n == 1 {
            to_f16(qp)
        } else {
            sys::ggml_map_custom1(
                ctx,
                qp,
                Some(kernels::round_f16_op),
                N_TASKS_MAX,
                ptr::null_mut(),
            )
        };
        let keys = sys::ggml_view_3d(
            ctx,
            kc,
            hd,
            n_kv as i64,
            info.n_head_kv as i64,
            k_esz * kv_dim,
            k_esz * info.head_dim,
            0,
        );
        // Exact mode: both products in a CPU-independent summation order (ggml's
        // own follow its vector width, which differs between AVX2 and AVX-512
        // builds), so exact results are bit-identical on every CPU.
        let product = |g: &mut Graph, a: T, b: T| {
            if !exact {
                return sys::ggml_mul_mat(ctx, a, b);
            }
            let shape = g.shape_3d((*a).ne[1], (*b).ne[1], (*b).ne[2]);
            sys::ggml_map_custom3(
                ctx,
                shape,
                a,
                b,
                Some(kernels::dot_f16_op),
                N_TASKS_MAX,
                ptr::null_mut(),
            )
        };
        let kq = product(g, keys, qp);
        let kq = sys::ggml_map_custom2(
            ctx,
            kq,
            kq_mask,
            Some(kernels::soft_max_op),
            N_TASKS_MAX,
            kernels::scale_to_userdata(kq_scale),
        );
        let values = sys::ggml_view_3d(
            ctx,
            vc,
            n_kv as i64,
            hd,
            info.n_head_kv as i64,
            v_esz * s.cap,
            v_esz * s.cap * info.head_dim,
            0,
        );
        let kq = if n == 1 && !exact { to_f16(kq) } else { kq };
        let kqv = product(g, values, kq);
        let merged = sys::ggml_permute(ctx, kqv, 0, 2, 1, 3);
        sys::ggml_cont_2d(ctx, merged, info.n_embd as i64, n as i64)
    }

    /// The transformer layers `layers` on `x` (`n` tokens at `pos`), appending K/V.
    #[allow(clippy::too_many_arguments)]
    fn build_layers(
        &self,
        g: &mut Graph,
        s: &KvCache,
        adapters: &[ActiveLora],
        layers: Range<usize>,
        mut x: T,
        pos: usize,
        n: usize,
    ) -> T {
        if layers.is_empty() {
            return x;
        }
        let info = &self.info;
        let ctx = g.ctx;
        let (inp_pos, kq_mask) = self.position_inputs(g, pos, n);
        // SAFETY: all shapes below follow from the validated model hyper-parameters
        // and the checked `pos + n <= n_ctx`; views stay inside the KV tensors.
        unsafe {
            for il in layers {
                let lt = &self.tensors.layers[il];
                let cur =
                    sys::ggml_mul(ctx, sys::ggml_rms_norm(ctx, x, info.rms_eps), lt.attn_norm);
                let with_bias = |t: T, b: Option<T>| match b {
                    Some(b) => sys::ggml_add(ctx, t, b),
                    None => t,
                };
                let mm = |g: &mut Graph, p: Projection, w: T, cur: T| {
                    self.lora_mat_mul(g, adapters, il, p, w, cur, n)
                };
                let q = with_bias(mm(g, Projection::Q, lt.wq, cur), lt.bq);
                let k = with_bias(mm(g, Projection::K, lt.wk, cur), lt.bk);
                let v = with_bias(mm(g, Projection::V, lt.wv, cur), lt.bv);
                let attn = self.attention(g, s, il, q, k, v, pos, n, inp_pos, kq_mask);
                let attn = mm(g, Projection::O, lt.wo, attn);
                x = sys::ggml_add(ctx, attn, x);

                let cur = sys::ggml_mul(ctx, sys::ggml_rms_norm(ctx, x, info.rms_eps), lt.ffn_norm);
                let gate = mm(g, Projection::Gate, lt.gate, cur);
                let up = mm(g, Projection::Up, lt.up, cur);
                let act = sys::ggml_map_custom2(
                    ctx,
                    gate,
                    up,
                    Some(kernels::swiglu_op),
                    N_TASKS_MAX,
                    ptr::null_mut(),
                );
                let ffn = mm(g, Projection::Down, lt.down, act);
                x = sys::ggml_add(ctx, ffn, x);
            }
        }
        x
    }

    /// Final norm and output projection of `x` (`n` tokens).
    fn build_head(
        &self,
        g: &mut Graph,
        adapters: &[ActiveLora],
        x: T,
        n: usize,
        which: Logits,
    ) -> T {
        // SAFETY: `x` is an n_embd x n tensor of this graph.
        unsafe {
            let ctx = g.ctx;
            let mut cur = sys::ggml_mul(
                ctx,
                sys::ggml_rms_norm(ctx, x, self.info.rms_eps),
                self.tensors.output_norm,
            );
            if which == Logits::Last && n > 1 {
                let nb1 = (*cur).nb[1];
                cur = sys::ggml_view_2d(ctx, cur, self.info.n_embd as i64, 1, nb1, nb1 * (n - 1));
            }
            let n_out = (*cur).ne[1] as usize;
            let res = if self.exact.load(Ordering::Relaxed) {
                // Exact accumulation covers the output head too (Q8_0 here).
                self.mat_mul(g, self.tensors.output, cur, n_out)
            } else {
                sys::ggml_mul_mat(ctx, self.tensors.output, cur)
            };
            self.add_adapters(g, adapters, 0, Projection::Output, res, cur)
        }
    }

    fn build_embed(&self, g: &mut Graph, tokens: &[u32]) -> T {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let inp = g.input_i32(&ids);
        // SAFETY: ids were checked against n_vocab by the caller.
        unsafe { sys::ggml_get_rows(g.ctx, self.tensors.token_embd, inp) }
    }
}

/// A graph under construction and the input data to copy in once it is allocated.
struct Graph {
    ctx: *mut sys::ggml_context,
    gf: *mut sys::ggml_cgraph,
    inputs: Vec<(T, Vec<u8>)>,
    /// Activations already quantized for the Q4_1 kernel: (F32 input, exact mode,
    /// Q8_1 node).
    quantized: Vec<(T, bool, T)>,
    /// Userdata of this graph's [`lora_add_op`] nodes (freed with the graph;
    /// boxed so their addresses stay put while the list grows).
    #[allow(clippy::vec_box)]
    lora_calls: Vec<Box<LoraCall>>,
    /// Shape source for custom ops' outputs, and its capacity in floats.
    shape: Option<(T, usize)>,
}

impl Graph {
    /// An F32 `[ne0, ne1, ne2]` tensor that only gives a custom op its output
    /// shape: a view of one tensor per graph that nothing reads or writes, grown
    /// (replaced) when a larger shape is asked for.
    ///
    /// # Safety
    /// The sizes are positive and their product fits in memory.
    unsafe fn shape_3d(&mut self, ne0: i64, ne1: i64, ne2: i64) -> T {
        let elems = (ne0 * ne1 * ne2) as usize;
        let (t, cap) = match self.shape {
            Some((t, cap)) if cap >= elems => (t, cap),
            _ => {
                let t =
                    sys::ggml_new_tensor_1d(self.ctx, sys::ggml_type_GGML_TYPE_F32, elems as i64);
                (t, elems)
            }
        };
        self.shape = Some((t, cap));
        sys::ggml_view_3d(
            self.ctx,
            t,
            ne0,
            ne1,
            ne2,
            4 * ne0 as usize,
            4 * (ne0 * ne1) as usize,
            0,
        )
    }

    fn input_i32(&mut self, data: &[i32]) -> T {
        // SAFETY: a new 1-d tensor in this graph's context.
        let t = unsafe {
            sys::ggml_new_tensor_1d(self.ctx, sys::ggml_type_GGML_TYPE_I32, data.len() as i64)
        };
        let bytes = data.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.mark_input(t, bytes)
    }

    fn input_f32(&mut self, data: &[f32], ne: &[i64]) -> T {
        // SAFETY: a new tensor in this graph's context; `ne` has 1..=4 entries.
        let t = unsafe {
            sys::ggml_new_tensor(
                self.ctx,
                sys::ggml_type_GGML_TYPE_F32,
                ne.len() as i32,
                ne.as_ptr(),
            )
        };
        let bytes = data.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.mark_input(t, bytes)
    }

    fn mark_input(&mut self, t: T, bytes: Vec<u8>) -> T {
        // SAFETY: `t` is a fresh tensor of this context.
        unsafe { sys::ggml_set_input(t) };
        self.inputs.push((t, bytes));
        t
    }
}

/// Graph capacity for `n_layers` layers with `n_adapters` LoRA adapters
/// (each adds up to four nodes per projection).
fn max_nodes(n_layers: usize, n_adapters: usize) -> usize {
    1024 + (64 + 32 * n_adapters) * (n_layers + 1)
}

/// Bytes of graph metadata for `nodes` nodes.
fn meta_bytes(nodes: usize) -> usize {
    // SAFETY: pure size computations.
    unsafe { sys::ggml_tensor_overhead() * nodes + sys::ggml_graph_overhead_custom(nodes, false) }
}

fn create_weight_tensors(mmap: &Mmap, w: &Weights) -> Result<WeightTensors> {
    let n_tensors = 3 + 12 * w.layers.len();
    // SAFETY: pure size computations.
    let mem_size = unsafe { sys::ggml_tensor_overhead() } * (n_tensors + 16);
    let params = sys::ggml_init_params {
        mem_size,
        mem_buffer: ptr::null_mut(),
        no_alloc: true,
    };
    // SAFETY: ggml owns the metadata buffer it allocates; freed in WeightTensors::drop.
    let ctx = NonNull::new(unsafe { sys::ggml_init(params) })
        .ok_or_else(|| Error::Ggml("ggml_init failed for the weight context".into()))?;
    let mut wt = WeightTensors {
        ctx,
        token_embd: ptr::null_mut(),
        output_norm: ptr::null_mut(),
        output: ptr::null_mut(),
        layers: Vec::with_capacity(w.layers.len()),
    };
    let base = mmap.as_ptr();
    let file_len = mmap.len() as u64;
    let mut mk = |info: &TensorInfo| -> Result<T> {
        let end = info.offset.checked_add(info.size);
        if end.is_none_or(|e| e > file_len) {
            return Err(Error::Gguf(format!(
                "tensor {}: data lies past the end of the file",
                info.name
            )));
        }
        let ne: Vec<i64> = info.dims.iter().map(|&d| d as i64).collect();
        // SAFETY: the tensor's metadata lives in `ctx`; its data pointer is set to
        // the validated, in-bounds range of the read-only mapping, which outlives
        // the tensor (WeightTensors drops before the Mmap in GgmlEngine).
        unsafe {
            let t = sys::ggml_new_tensor(
                ctx.as_ptr(),
                ggml_type(info.ggml_type),
                ne.len() as i32,
                ne.as_ptr(),
            );
            if sys::ggml_nbytes(t) as u64 != info.size {
                return Err(Error::Gguf(format!(
                    "tensor {}: expected {} bytes, ggml computes {}",
                    info.name,
                    info.size,
                    sys::ggml_nbytes(t)
                )));
            }
            (*t).data = base.add(info.offset as usize) as *mut c_void;
            if let Ok(name) = CString::new(info.name.as_str()) {
                sys::ggml_set_name(t, name.as_ptr());
            }
            Ok(t)
        }
    };
    wt.token_embd = mk(&w.token_embd)?;
    wt.output_norm = mk(&w.output_norm)?;
    wt.output = mk(&w.output)?;
    for l in &w.layers {
        let opt = |b: &Option<TensorInfo>, mk: &mut dyn FnMut(&TensorInfo) -> Result<T>| {
            b.as_ref().map(mk).transpose()
        };
        let bq = opt(&l.bq, &mut mk)?;
        let bk = opt(&l.bk, &mut mk)?;
        let bv = opt(&l.bv, &mut mk)?;
        wt.layers.push(LayerTensors {
            attn_norm: mk(&l.attn_norm)?,
            wq: mk(&l.wq)?,
            wk: mk(&l.wk)?,
            wv: mk(&l.wv)?,
            bq,
            bk,
            bv,
            wo: mk(&l.wo)?,
            ffn_norm: mk(&l.ffn_norm)?,
            gate: mk(&l.gate)?,
            up: mk(&l.up)?,
            down: mk(&l.down)?,
        });
    }
    Ok(wt)
}

impl Engine for GgmlEngine {
    type Session = GgmlSession;

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    fn chat_template(&self) -> &ChatTemplate {
        &self.template
    }

    fn new_session(&self, n_ctx: usize) -> Result<GgmlSession> {
        self.new_session_for(0..self.info.n_layers, n_ctx)
    }

    fn embed(&self, tokens: &[u32], pos: usize) -> Result<Hidden> {
        self.check_tokens(tokens)?;
        let t = &self.weights.token_embd;
        // SAFETY: reads the type traits table of a type the model validated.
        let traits = unsafe { sys::ggml_internal_get_type_traits(ggml_type(t.ggml_type)) };
        let n_embd = self.info.n_embd;
        let row_bytes = t.ggml_type.row_bytes(n_embd as u64)? as usize;
        let mut data = vec![0f32; tokens.len() * n_embd];
        for (i, &tok) in tokens.iter().enumerate() {
            let start = t.offset as usize + tok as usize * row_bytes;
            let row = self.mmap.get(start..start + row_bytes).ok_or_else(|| {
                Error::Gguf(format!("token_embd.weight row {tok} is out of bounds"))
            })?;
            let out = &mut data[i * n_embd..(i + 1) * n_embd];
            match (t.ggml_type, traits.to_float) {
                (GgmlType::F32, _) => {
                    for (o, c) in out.iter_mut().zip(row.chunks_exact(4)) {
                        *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
                // SAFETY: `row` holds exactly one row of n_embd elements of this type.
                (_, Some(to_float)) => unsafe {
                    to_float(row.as_ptr().cast(), out.as_mut_ptr(), n_embd as i64)
                },
                (other, None) => {
                    return Err(Error::Unsupported(format!(
                        "token embeddings of type {}",
                        other.name()
                    )))
                }
            }
        }
        Ok(Hidden { n_embd, pos, data })
    }

    fn run_layers(
        &self,
        layers: Range<usize>,
        hidden: &mut Hidden,
        s: &mut GgmlSession,
    ) -> Result<()> {
        self.check_session(s)?;
        let n = self.check_hidden(hidden)?;
        self.check_kv(&s.kv, &layers, hidden.pos, n)?;
        if layers.is_empty() {
            return Ok(());
        }
        let pos = hidden.pos;
        let ne = [self.info.n_embd as i64, n as i64];
        let (kv, adapters) = (&s.kv, &s.adapters);
        let out = self.compute(&mut s.scratch, |g| {
            let x = g.input_f32(&hidden.data, &ne);
            self.build_layers(g, kv, adapters, layers.clone(), x, pos, n)
        })?;
        for l in layers {
            s.kv.len[l] = pos + n;
        }
        hidden.data = out;
        Ok(())
    }

    fn run_layers_with(
        &self,
        layers: Range<usize>,
        hidden: &mut Hidden,
        s: &mut GgmlSession,
        project: &mut Projector<'_>,
    ) -> Result<()> {
        self.check_session(s)?;
        let n = self.check_hidden(hidden)?;
        self.check_kv(&s.kv, &layers, hidden.pos, n)?;
        let info = &self.info;
        let (pos, n_embd, kv_dim) = (hidden.pos, info.n_embd, info.n_head_kv * info.head_dim);
        // The projector computes `W x`; the adapters' rank-r paths run here.
        let mut call = |scratch: &mut Scratch,
                        adapters: &[ActiveLora],
                        l: usize,
                        p: Projection,
                        x: &[f32],
                        rows: usize| {
            let mut y = Self::call_projector(project, l, p, x, n, rows)?;
            self.add_lora(scratch, adapters, l, p, x, n, &mut y)?;
            Ok::<_, Error>(y)
        };
        for il in layers {
            let lt = &self.tensors.layers[il];
            let x = &mut hidden.data;
            let xn = self.norm(&mut s.scratch, x, n, lt.attn_norm)?;
            let q = call(&mut s.scratch, &s.adapters, il, Projection::Q, &xn, n_embd)?;
            let k = call(&mut s.scratch, &s.adapters, il, Projection::K, &xn, kv_dim)?;
            let v = call(&mut s.scratch, &s.adapters, il, Projection::V, &xn, kv_dim)?;
            let kv = &s.kv;
            let attn = self.compute(&mut s.scratch, |g| {
                let (inp_pos, kq_mask) = self.position_inputs(g, pos, n);
                let ctx = g.ctx;
                let q = g.input_f32(&q, &[n_embd as i64, n as i64]);
                let k = g.input_f32(&k, &[kv_dim as i64, n as i64]);
                let v = g.input_f32(&v, &[kv_dim as i64, n as i64]);
                // SAFETY: shapes as documented on `attention`; `pos + n` was checked
                // against the cache; biases are vectors of the matching width.
                unsafe {
                    let with_bias = |t: T, b: Option<T>| match b {
                        Some(b) => sys::ggml_add(ctx, t, b),
                        None => t,
                    };
                    let (q, k, v) = (
                        with_bias(q, lt.bq),
                        with_bias(k, lt.bk),
                        with_bias(v, lt.bv),
                    );
                    self.attention(g, kv, il, q, k, v, pos, n, inp_pos, kq_mask)
                }
            })?;
            s.kv.len[il] = pos + n;
            let o = call(
                &mut s.scratch,
                &s.adapters,
                il,
                Projection::O,
                &attn,
                n_embd,
            )?;
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let xn = self.norm(&mut s.scratch, x, n, lt.ffn_norm)?;
            let gate = call(
                &mut s.scratch,
                &s.adapters,
                il,
                Projection::Gate,
                &xn,
                info.n_ff,
            )?;
            let up = call(
                &mut s.scratch,
                &s.adapters,
                il,
                Projection::Up,
                &xn,
                info.n_ff,
            )?;
            let mut act = vec![0f32; gate.len()];
            kernels::swiglu(&mut act, &gate, &up);
            let down = call(
                &mut s.scratch,
                &s.adapters,
                il,
                Projection::Down,
                &act,
                n_embd,
            )?;
            x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        }
        Ok(())
    }

    fn head_with(
        &self,
        hidden: &Hidden,
        which: Logits,
        s: &mut GgmlSession,
        project: &mut Projector<'_>,
    ) -> Result<Vec<f32>> {
        self.check_session(s)?;
        let n = self.check_hidden(hidden)?;
        let n_embd = self.info.n_embd;
        let rows = match which {
            Logits::All => &hidden.data[..],
            Logits::Last => &hidden.data[(n - 1) * n_embd..],
        };
        let n_out = rows.len() / n_embd;
        let xn = self.norm(&mut s.scratch, rows, n_out, self.tensors.output_norm)?;
        let mut y = Self::call_projector(
            project,
            0,
            Projection::Output,
            &xn,
            n_out,
            self.info.n_vocab,
        )?;
        self.add_lora(
            &mut s.scratch,
            &s.adapters,
            0,
            Projection::Output,
            &xn,
            n_out,
            &mut y,
        )?;
        Ok(y)
    }

    fn head(&self, hidden: &Hidden, which: Logits, s: &mut GgmlSession) -> Result<Vec<f32>> {
        self.check_session(s)?;
        let n = self.check_hidden(hidden)?;
        let ne = [self.info.n_embd as i64, n as i64];
        let adapters = &s.adapters;
        self.compute(&mut s.scratch, |g| {
            let x = g.input_f32(&hidden.data, &ne);
            self.build_head(g, adapters, x, n, which)
        })
    }

    fn forward(&self, tokens: &[u32], which: Logits, s: &mut GgmlSession) -> Result<Vec<f32>> {
        self.check_session(s)?;
        self.check_tokens(tokens)?;
        let pos = s.kv.len.first().copied().unwrap_or(0);
        let n = tokens.len();
        let all = 0..self.info.n_layers;
        self.check_kv(&s.kv, &all, pos, n)?;
        let (kv, adapters) = (&s.kv, &s.adapters);
        let out = self.compute(&mut s.scratch, |g| {
            let x = self.build_embed(g, tokens);
            let x = self.build_layers(g, kv, adapters, all.clone(), x, pos, n);
            self.build_head(g, adapters, x, n, which)
        })?;
        for l in all {
            s.kv.len[l] = pos + n;
        }
        Ok(out)
    }

    fn session_len(&self, s: &GgmlSession, layer: usize) -> usize {
        s.kv.len.get(layer).copied().unwrap_or(0)
    }

    fn session_capacity(&self, s: &GgmlSession) -> usize {
        s.kv.n_ctx
    }

    fn truncate_session(&self, s: &mut GgmlSession, len: usize) {
        for l in &mut s.kv.len {
            *l = (*l).min(len);
        }
    }

    fn weight(&self, layer: usize, projection: Projection) -> Result<WeightView<'_>> {
        let (_, info) = self.projection_tensor(layer, projection)?;
        let bytes = self
            .mmap
            .get(info.offset as usize..(info.offset + info.size) as usize)
            .ok_or_else(|| Error::Gguf(format!("tensor {}: data out of bounds", info.name)))?;
        Ok(WeightView {
            ggml_type: info.ggml_type,
            rows: info.rows() as usize,
            cols: info.cols() as usize,
            bytes,
        })
    }

    fn project(
        &self,
        layer: usize,
        projection: Projection,
        x: &[f32],
        s: &mut GgmlSession,
    ) -> Result<Vec<f32>> {
        let (w, info) = self.projection_tensor(layer, projection)?;
        let cols = info.cols() as usize;
        if x.is_empty() || !x.len().is_multiple_of(cols) {
            return Err(Error::InvalidArgument(format!(
                "{projection:?} input: expected a non-empty multiple of {cols} values, found {}",
                x.len()
            )));
        }
        self.check_session(s)?;
        let ne = [cols as i64, (x.len() / cols) as i64];
        self.compute(&mut s.scratch, |g| {
            let xt = g.input_f32(x, &ne);
            // SAFETY: `w` is cols x rows and `xt` cols x n.
            unsafe {
                if self.exact.load(Ordering::Relaxed) {
                    self.mat_mul(g, w, xt, ne[1] as usize)
                } else {
                    sys::ggml_mul_mat(g.ctx, w, xt)
                }
            }
        })
    }
}
