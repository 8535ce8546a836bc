//! LoRA adapters in llama.cpp's GGUF format, applied beside the base weights.
//!
//! An adapter file has `general.type = "adapter"`, `adapter.type = "lora"`,
//! `general.architecture` equal to the base model's, an optional
//! `adapter.lora.alpha`, and for each adapted matrix `W` (`cols` inputs, `rows`
//! outputs) two tensors `<W's name>.lora_a` (ggml shape `[cols, r]`) and
//! `<W's name>.lora_b` (`[r, rows]`). A projection then computes
//! `W x + s · B (A x)` with `s = scale · alpha / r` (just `scale` when alpha is
//! 0), exactly as llama.cpp builds it: the same ggml operations in the same
//! order, so greedy tokens match llama.cpp with the same adapter. The base
//! weights are never modified; several adapters apply in the order given, and
//! a session can switch adapters between calls without reloading anything.
//!
//! Adapted matrices: the seven projections of every layer (`attn_q`, `attn_k`,
//! `attn_v`, `attn_output`, `ffn_gate`, `ffn_up`, `ffn_down`) and an untied
//! `output.weight`. Tensors that are not LoRA halves (e.g. norms) are skipped,
//! as llama.cpp's converter leaves them out. LoRA tensors are F32 or F16.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::ptr::{self, NonNull};
use std::sync::Arc;

use ggml_sys_bleedingedge as sys;

use super::{ModelId, ModelInfo, Projection};
use crate::gguf::{GgmlType, Gguf, TensorInfo};
use crate::{Error, Result};

/// Why an adapter file was refused (inside [`Error::Adapter`]).
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    /// The file is a GGUF file but not a LoRA adapter (`general.type` or
    /// `adapter.type` missing or different).
    #[error("not a LoRA adapter: {0}")]
    NotAnAdapter(String),
    /// The adapter was made for another architecture.
    #[error("adapter architecture {found:?}: the model is {expected:?}")]
    WrongArchitecture {
        /// The base model's architecture.
        expected: String,
        /// The adapter's `general.architecture`.
        found: String,
    },
    /// A LoRA tensor names a matrix the base model does not have (or one
    /// LoRA cannot adapt here, such as `token_embd.weight`).
    #[error("tensor {name}: {why}")]
    UnknownTarget {
        /// The LoRA tensor's name.
        name: String,
        /// What is wrong with its target.
        why: String,
    },
    /// One half of a pair (`lora_a` or `lora_b`) is missing.
    #[error("tensor {base}: the LoRA pair has no {missing}")]
    MissingHalf {
        /// The adapted matrix.
        base: String,
        /// `lora_a` or `lora_b`.
        missing: &'static str,
    },
    /// A half's shape does not fit the base matrix or the other half.
    #[error("tensor {name}: expected shape {expected}, found {found}")]
    Shape {
        /// The LoRA tensor's name.
        name: String,
        /// What the base model needs.
        expected: String,
        /// The tensor's shape.
        found: String,
    },
    /// A LoRA tensor's storage type is not supported.
    #[error("tensor {name}: type {ty} (LoRA tensors must be F32 or F16)")]
    UnsupportedType {
        /// The LoRA tensor's name.
        name: String,
        /// Its type.
        ty: String,
    },
    /// `adapter.lora.alpha` is negative, infinite or NaN.
    #[error("adapter.lora.alpha {0}: expected a finite value >= 0")]
    BadAlpha(f32),
    /// The file has no LoRA tensor at all.
    #[error("the adapter has no LoRA tensors")]
    Empty,
    /// The adapter was validated against another model than the one asked to run it.
    #[error("adapter {adapter} was loaded for model {loaded_for}, not {model}")]
    OtherModel {
        /// The adapter's id.
        adapter: ModelId,
        /// The model it was loaded for.
        loaded_for: ModelId,
        /// The model asked to apply it.
        model: ModelId,
    },
    /// A scale that is not finite.
    #[error("adapter {adapter}: scale {scale} is not finite")]
    BadScale {
        /// The adapter's id.
        adapter: ModelId,
        /// The scale.
        scale: f32,
    },
}

impl From<AdapterError> for Error {
    fn from(e: AdapterError) -> Error {
        Error::Adapter(e)
    }
}

/// The A and B halves of one adapted matrix, as ggml tensors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LoraPair {
    /// `[cols, rank]`.
    pub a: *mut sys::ggml_tensor,
    /// `[rank, rows]`.
    pub b: *mut sys::ggml_tensor,
    /// The rank `r`.
    pub rank: usize,
    /// B transposed (F32 halves), owned by the adapter.
    pub bt: *const f32,
}

/// A validated LoRA adapter for one base model, its tensors in memory.
pub struct LoraAdapter {
    id: ModelId,
    base: ModelId,
    alpha: f32,
    file_size: u64,
    name: Option<String>,
    ctx: NonNull<sys::ggml_context>,
    pairs: HashMap<(usize, Projection), LoraPair>,
    /// B of each F32 pair transposed (`LoraPair::bt` points into these).
    transposed: Vec<Box<[f32]>>,
}

// SAFETY: after construction the adapter's ggml context and tensors are only
// read (by graphs that use them as sources); nothing mutates them.
unsafe impl Send for LoraAdapter {}
unsafe impl Sync for LoraAdapter {}

impl Drop for LoraAdapter {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from ggml_init and is freed exactly once.
        unsafe { sys::ggml_free(self.ctx.as_ptr()) }
    }
}

impl fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("id", &self.id)
            .field("base", &self.base)
            .field("alpha", &self.alpha)
            .field("matrices", &self.pairs.len())
            .finish_non_exhaustive()
    }
}

/// One pair found and checked by [`plan`].
#[derive(Clone, Debug)]
struct Planned {
    layer: usize,
    projection: Projection,
    a: TensorInfo,
    b: TensorInfo,
    rank: usize,
}

/// `(cols, rows)` of a projection of `info`'s model.
pub(crate) fn projection_shape(info: &ModelInfo, p: Projection) -> (usize, usize) {
    let kv_dim = info.n_head_kv * info.head_dim;
    match p {
        Projection::Q | Projection::O => (info.n_embd, info.n_embd),
        Projection::K | Projection::V => (info.n_embd, kv_dim),
        Projection::Gate | Projection::Up => (info.n_embd, info.n_ff),
        Projection::Down => (info.n_ff, info.n_embd),
        Projection::Output => (info.n_embd, info.n_vocab),
    }
}

/// The projection a base tensor name refers to, or why it cannot be adapted.
fn target(info: &ModelInfo, base: &str) -> std::result::Result<(usize, Projection), String> {
    if base == "output.weight" {
        return if info.tied_output {
            Err("the model has no output.weight (its output reuses token_embd.weight)".into())
        } else {
            Ok((0, Projection::Output))
        };
    }
    if base == "token_embd.weight" {
        return Err("LoRA on token embeddings is not supported".into());
    }
    let rest = base
        .strip_prefix("blk.")
        .ok_or_else(|| "the base model has no such matrix".to_string())?;
    let (layer, kind) = rest
        .split_once('.')
        .ok_or_else(|| "the base model has no such matrix".to_string())?;
    let layer: usize = layer
        .parse()
        .ok()
        .filter(|l: &usize| *l < info.n_layers && l.to_string() == layer)
        .ok_or_else(|| format!("expected a layer below {}", info.n_layers))?;
    let p = match kind {
        "attn_q.weight" => Projection::Q,
        "attn_k.weight" => Projection::K,
        "attn_v.weight" => Projection::V,
        "attn_output.weight" => Projection::O,
        "ffn_gate.weight" => Projection::Gate,
        "ffn_up.weight" => Projection::Up,
        "ffn_down.weight" => Projection::Down,
        _ => return Err("not a projection LoRA can adapt (or not in the base model)".into()),
    };
    Ok((layer, p))
}

fn dims(t: &TensorInfo) -> String {
    let d: Vec<String> = t.dims.iter().map(u64::to_string).collect();
    d.join("x")
}

/// Checks an adapter's metadata and tensors against `info`'s model; returns
/// alpha and the pairs.
fn plan(g: &Gguf, info: &ModelInfo) -> Result<(f32, Vec<Planned>)> {
    match g.opt_value::<&str>("general.type")? {
        Some("adapter") => {}
        other => {
            return Err(AdapterError::NotAnAdapter(format!(
                "general.type is {other:?}, expected \"adapter\""
            ))
            .into())
        }
    }
    match g.opt_value::<&str>("adapter.type")? {
        Some("lora") => {}
        other => {
            return Err(AdapterError::NotAnAdapter(format!(
                "adapter.type is {other:?}, expected \"lora\""
            ))
            .into())
        }
    }
    let arch = g.architecture()?;
    if arch != info.architecture {
        return Err(AdapterError::WrongArchitecture {
            expected: info.architecture.clone(),
            found: arch.to_string(),
        }
        .into());
    }
    let alpha = g.opt_value::<f32>("adapter.lora.alpha")?.unwrap_or(0.0);
    if !(alpha.is_finite() && alpha >= 0.0) {
        return Err(AdapterError::BadAlpha(alpha).into());
    }
    // Pair the halves by base name, in file order.
    let mut halves: Vec<(&str, Option<&TensorInfo>, Option<&TensorInfo>)> = Vec::new();
    for t in &g.tensors {
        let (base, is_a) = if let Some(b) = t.name.strip_suffix(".lora_a") {
            (b, true)
        } else if let Some(b) = t.name.strip_suffix(".lora_b") {
            (b, false)
        } else {
            continue; // norms and other non-LoRA tensors: skipped, like llama.cpp
        };
        let slot = match halves.iter().position(|(n, _, _)| *n == base) {
            Some(i) => &mut halves[i],
            None => {
                halves.push((base, None, None));
                halves.last_mut().expect("just pushed")
            }
        };
        if is_a {
            slot.1 = Some(t);
        } else {
            slot.2 = Some(t);
        }
    }
    if halves.is_empty() {
        return Err(AdapterError::Empty.into());
    }
    let mut out = Vec::with_capacity(halves.len());
    for (base, a, b) in halves {
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (None, _) => {
                return Err(AdapterError::MissingHalf {
                    base: base.to_string(),
                    missing: "lora_a",
                }
                .into())
            }
            (_, None) => {
                return Err(AdapterError::MissingHalf {
                    base: base.to_string(),
                    missing: "lora_b",
                }
                .into())
            }
        };
        let (layer, projection) =
            target(info, base).map_err(|why| AdapterError::UnknownTarget {
                name: a.name.clone(),
                why,
            })?;
        for t in [a, b] {
            if !matches!(t.ggml_type, GgmlType::F32 | GgmlType::F16) {
                return Err(AdapterError::UnsupportedType {
                    name: t.name.clone(),
                    ty: t.ggml_type.name().to_string(),
                }
                .into());
            }
        }
        let (cols, rows) = projection_shape(info, projection);
        let rank = a.dims.get(1).copied().unwrap_or(0);
        if a.dims.len() != 2 || a.dims[0] != cols as u64 || rank == 0 {
            return Err(AdapterError::Shape {
                name: a.name.clone(),
                expected: format!("{cols}xR (R >= 1)"),
                found: dims(a),
            }
            .into());
        }
        if b.dims.len() != 2 || b.dims[0] != rank || b.dims[1] != rows as u64 {
            return Err(AdapterError::Shape {
                name: b.name.clone(),
                expected: format!("{rank}x{rows}"),
                found: dims(b),
            }
            .into());
        }
        out.push(Planned {
            layer,
            projection,
            a: a.clone(),
            b: b.clone(),
            rank: rank as usize,
        });
    }
    Ok((alpha, out))
}

impl LoraAdapter {
    /// Reads and validates the adapter at `path` for the model `info`
    /// describes (the base model's [`ModelInfo`], e.g. `engine.info()`).
    pub fn load(path: impl AsRef<Path>, info: &ModelInfo) -> Result<LoraAdapter> {
        Self::from_bytes(&Self::read_file(path.as_ref())?, info)
    }

    /// The bytes of the adapter file at `path` (a regular file: a FIFO or a
    /// directory is refused, not waited on), for [`LoraAdapter::from_bytes`].
    pub fn read_file(path: &Path) -> Result<Vec<u8>> {
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if !meta.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{}: expected a regular GGUF adapter file",
                path.display()
            )));
        }
        std::fs::read(path).map_err(|e| Error::io(path, e))
    }

    /// Validates an adapter held in memory (see [`LoraAdapter::load`]).
    pub fn from_bytes(bytes: &[u8], info: &ModelInfo) -> Result<LoraAdapter> {
        let g = Gguf::parse(bytes)?;
        let (alpha, planned) = plan(&g, info)?;
        // Tensor data lies inside `bytes` (checked before any allocation).
        let mut data_len = 0usize;
        for p in &planned {
            for t in [&p.a, &p.b] {
                data_len = data_len.saturating_add(t.data(bytes)?.len());
            }
        }
        // SAFETY: pure size computation.
        let overhead = unsafe { sys::ggml_tensor_overhead() };
        let mem_size = data_len
            .checked_add((overhead + 64) * (2 * planned.len() + 4))
            .ok_or_else(|| Error::InvalidArgument("adapter too large".into()))?;
        let params = sys::ggml_init_params {
            mem_size,
            mem_buffer: ptr::null_mut(),
            no_alloc: false,
        };
        // SAFETY: ggml allocates and owns the buffer; freed in Drop.
        let ctx = NonNull::new(unsafe { sys::ggml_init(params) }).ok_or_else(|| {
            Error::Ggml(format!(
                "could not allocate {mem_size} bytes for an adapter"
            ))
        })?;
        let mut adapter = LoraAdapter {
            id: ModelId(*blake3::hash(bytes).as_bytes()),
            base: info.id,
            alpha,
            file_size: bytes.len() as u64,
            name: g.opt_value::<&str>("general.name")?.map(str::to_string),
            ctx,
            pairs: HashMap::with_capacity(planned.len()),
            transposed: Vec::new(),
        };
        let mk = |t: &TensorInfo| -> Result<*mut sys::ggml_tensor> {
            let src = t.data(bytes)?;
            // SAFETY: a 2-d tensor of a type ggml knows, in a context sized for
            // all tensors' bytes; the copy fills exactly its bytes.
            unsafe {
                let tensor = sys::ggml_new_tensor_2d(
                    ctx.as_ptr(),
                    t.ggml_type as u32 as sys::ggml_type,
                    t.dims[0] as i64,
                    t.dims[1] as i64,
                );
                if tensor.is_null() || sys::ggml_nbytes(tensor) != src.len() {
                    return Err(Error::Gguf(format!(
                        "tensor {}: expected {} bytes of data",
                        t.name,
                        src.len()
                    )));
                }
                ptr::copy_nonoverlapping(src.as_ptr(), (*tensor).data.cast::<u8>(), src.len());
                Ok(tensor)
            }
        };
        for p in planned {
            let (a, b) = (mk(&p.a)?, mk(&p.b)?);
            let bt = if p.b.ggml_type == GgmlType::F32 {
                let rows = p.b.dims[1] as usize;
                // SAFETY: `b` is an F32 tensor of rank x rows just filled.
                let src =
                    unsafe { std::slice::from_raw_parts((*b).data as *const f32, p.rank * rows) };
                let mut t = vec![0f32; src.len()].into_boxed_slice();
                for o in 0..rows {
                    for r in 0..p.rank {
                        t[r * rows + o] = src[o * p.rank + r];
                    }
                }
                let ptr = t.as_ptr();
                adapter.transposed.push(t);
                ptr
            } else {
                ptr::null()
            };
            let pair = LoraPair {
                a,
                b,
                rank: p.rank,
                bt,
            };
            adapter.pairs.insert((p.layer, p.projection), pair);
        }
        Ok(adapter)
    }

    /// BLAKE3 hash of the adapter file (the same kind of id as a model's).
    pub fn id(&self) -> ModelId {
        self.id
    }

    /// The model this adapter was validated against.
    pub fn base_model(&self) -> ModelId {
        self.base
    }

    /// `adapter.lora.alpha` (0 when absent: the scale applies unchanged).
    pub fn alpha(&self) -> f32 {
        self.alpha
    }

    /// `general.name`, if the file has one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Size of the adapter file in bytes.
    pub fn file_size(&self) -> u64 {
        self.file_size
    }

    /// Number of adapted matrices.
    pub fn n_matrices(&self) -> usize {
        self.pairs.len()
    }

    /// Whether the adapter changes `projection` of `layer` (the layer is
    /// ignored for [`Projection::Output`]).
    pub fn adapts(&self, layer: usize, projection: Projection) -> bool {
        self.pair(layer, projection).is_some()
    }

    /// The rank of the adapted `projection` of `layer`, if adapted.
    pub fn rank(&self, layer: usize, projection: Projection) -> Option<usize> {
        self.pair(layer, projection).map(|p| p.rank)
    }

    pub(crate) fn pair(&self, layer: usize, projection: Projection) -> Option<&LoraPair> {
        let layer = if projection == Projection::Output {
            0
        } else {
            layer
        };
        self.pairs.get(&(layer, projection))
    }

    /// The factor `B (A x)` is multiplied by for a user `scale` on a pair of
    /// rank `rank`: `scale · alpha / rank`, or `scale` when alpha is 0 (as llama.cpp).
    pub fn effective_scale(&self, scale: f32, rank: usize) -> f32 {
        if self.alpha == 0.0 {
            scale
        } else {
            scale * self.alpha / rank as f32
        }
    }
}

/// How llama.cpp's CPU backend sums one F32 dot product of length `k` in a
/// `mul_mat` of `n` tokens whose first operand has `m` rows, per SIMD class:
/// its tiled "tinyBLAS" kernel (one accumulator of `lanes` lanes, fused
/// multiply-adds over the row, then a horizontal sum) for batches (`n >= 2`)
/// where `k` is a multiple of the vector width and `m` of 4, else
/// `ggml_vec_dot_f32` (four accumulators over blocks of `4 · lanes`, a tree
/// reduction, then the leftovers one by one, multiplied and added separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DotOrder {
    /// AVX-512 builds: 16 lanes.
    Wide16,
    /// AVX2 builds: 8 lanes.
    Wide8,
}

impl DotOrder {
    fn lanes(self) -> usize {
        match self {
            DotOrder::Wide16 => 16,
            DotOrder::Wide8 => 8,
        }
    }
}

/// Horizontal sum of a 16-lane register as `_mm512_reduce_add_ps` (GCC):
/// halves added, then quarters, then the last four as `(0+2) + (1+3)`.
#[inline(always)]
#[allow(clippy::needless_range_loop)]
fn hsum16(v: &[f32; 16]) -> f32 {
    let mut h = [0f32; 8];
    for i in 0..8 {
        h[i] = v[i] + v[i + 8];
    }
    let mut g = [0f32; 4];
    for i in 0..4 {
        g[i] = h[i] + h[i + 4];
    }
    (g[0] + g[2]) + (g[1] + g[3])
}

/// Horizontal sum of an 8-lane register as tinyBLAS's `hsum(__m256)`.
#[inline(always)]
fn hsum8(v: &[f32]) -> f32 {
    let t = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

/// Horizontal sum of `ggml_vec_dot_f32`'s AVX reduction (`_mm_hadd_ps` twice).
#[inline(always)]
fn hadd8(v: &[f32]) -> f32 {
    let t = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (t[0] + t[1]) + (t[2] + t[3])
}

/// `Σ a[l]·b[l]` summed as llama.cpp's `mul_mat` sums it (see [`DotOrder`]).
#[inline(always)]
fn dot(order: DotOrder, tiled: bool, a: &[f32], b: &[f32]) -> f32 {
    match order {
        DotOrder::Wide16 => dot_lanes::<16>(tiled, a, b),
        DotOrder::Wide8 => dot_lanes::<8>(tiled, a, b),
    }
}

/// [`dot`] for a register of `L` lanes (16 or 8).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // lanes are indexed as the registers are
fn dot_lanes<const L: usize>(tiled: bool, a: &[f32], b: &[f32]) -> f32 {
    let k = a.len().min(b.len());
    let hsum = |v: &[f32; L]| -> f32 {
        let mut w = [0f32; 16];
        w[..L].copy_from_slice(v);
        if L == 16 {
            hsum16(&w)
        } else {
            hsum8(&w[..8])
        }
    };
    if tiled && k.is_multiple_of(L) {
        let mut acc = [0f32; L];
        for (ca, cb) in a[..k].chunks_exact(L).zip(b[..k].chunks_exact(L)) {
            for l in 0..L {
                acc[l] = ca[l].mul_add(cb[l], acc[l]);
            }
        }
        return hsum(&acc);
    }
    // ggml_vec_dot_f32: 4 accumulators over blocks of 4 registers.
    let np = k - k % (4 * L);
    let mut sum = [[0f32; L]; 4];
    for (ca, cb) in a[..np].chunks_exact(4 * L).zip(b[..np].chunks_exact(4 * L)) {
        for j in 0..4 {
            for l in 0..L {
                sum[j][l] = ca[j * L + l].mul_add(cb[j * L + l], sum[j][l]);
            }
        }
    }
    for l in 0..L {
        sum[0][l] += sum[2][l];
        sum[1][l] += sum[3][l];
    }
    for l in 0..L {
        sum[0][l] += sum[1][l];
    }
    let mut sumf = if L == 16 {
        hsum(&sum[0])
    } else {
        let mut w = [0f32; 8];
        w.copy_from_slice(&sum[0][..8]);
        hadd8(&w)
    };
    // Leftovers: `sumf += x[i]*y[i]` (not contracted into an FMA: matched
    // against llama.cpp's results).
    for i in np..k {
        sumf += a[i] * b[i];
    }
    sumf
}

/// One adapter pair applied by [`lora_add_op`]: kept alive by the graph
/// that uses it (its address is the op's userdata).
#[derive(Debug)]
pub(crate) struct LoraCall {
    /// `[cols, r]`, F32.
    pub a: *const sys::ggml_tensor,
    /// `[r, rows]`, F32.
    pub b: *const sys::ggml_tensor,
    /// B transposed (`r` rows of `rows`), for the short serial sums.
    pub bt: *const f32,
    /// `s = scale · alpha / r`.
    pub scale: f32,
    /// Summation order of the products.
    pub order: DotOrder,
}

/// Custom op `dst = res + s · B (A x)` for `res` `[rows, n]` and `x` `[cols, n]`
/// (contiguous F32), the pair and `s` in the [`LoraCall`] at `userdata`: what
/// llama.cpp computes as `mul_mat(a)`, `mul_mat(b)`, `scale`, `add` (four
/// graph nodes there, one here), with each product summed as it sums it.
///
/// # Safety
/// Called by ggml with those tensors; `userdata` points to a live [`LoraCall`]
/// whose halves fit `x` and `res`.
pub(crate) unsafe extern "C" fn lora_add_op(
    dst: *mut sys::ggml_tensor,
    res: *const sys::ggml_tensor,
    x: *const sys::ggml_tensor,
    ith: i32,
    nth: i32,
    userdata: *mut std::ffi::c_void,
) {
    let call = &*(userdata as *const LoraCall);
    let (a, b) = (call.a, call.b);
    let cols = (*a).ne[0] as usize;
    let rank = (*a).ne[1] as usize;
    let rows = (*b).ne[1] as usize;
    let n = (*x).ne[1] as usize;
    let job = LoraJob {
        order: call.order,
        scale: call.scale,
        cols,
        rank,
        rows,
        n,
        x: std::slice::from_raw_parts((*x).data as *const f32, cols * n),
        a: std::slice::from_raw_parts((*a).data as *const f32, cols * rank),
        b: std::slice::from_raw_parts((*b).data as *const f32, rank * rows),
        bt: std::slice::from_raw_parts(call.bt, rank * rows),
        res: std::slice::from_raw_parts((*res).data as *const f32, rows * n),
    };
    let out = std::slice::from_raw_parts_mut((*dst).data as *mut f32, rows * n);
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(job: &LoraJob<'_>, out: &mut [f32], ith: i32, nth: i32) {
            job.run(out, ith, nth)
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU has AVX2 and FMA (checked just above). The
            // arithmetic is the same either way: `mul_add` is a fused
            // multiply-add in hardware or in libm.
            return avx2(&job, out, ith, nth);
        }
    }
    job.run(out, ith, nth)
}

/// The work of one [`lora_add_op`].
pub(crate) struct LoraJob<'a> {
    pub order: DotOrder,
    pub scale: f32,
    pub cols: usize,
    pub rank: usize,
    pub rows: usize,
    pub n: usize,
    /// `n` rows of `cols`.
    pub x: &'a [f32],
    /// `rank` rows of `cols`.
    pub a: &'a [f32],
    /// `rows` rows of `rank`.
    pub b: &'a [f32],
    /// `b` transposed: `rank` rows of `rows`.
    pub bt: &'a [f32],
    /// `n` rows of `rows`.
    pub res: &'a [f32],
}

impl LoraJob<'_> {
    /// This thread's share of `out` (`n` rows of `rows`): whole tokens when
    /// there are at least as many as threads, else a range of output rows of
    /// every token. Every output is computed the same way either way.
    #[inline(always)]
    pub(crate) fn run(&self, out: &mut [f32], ith: i32, nth: i32) {
        // llama.cpp runs tinyBLAS for batches only (two or more tokens), on
        // matrices whose row count is a multiple of 4.
        let tiled_a = self.n >= 2 && self.rank.is_multiple_of(4);
        let tiled_b = self.n >= 2 && self.rows.is_multiple_of(4);
        let (tokens, out_rows) = if self.n >= nth.max(1) as usize {
            (super::kernels::share(self.n, ith, nth), (0, self.rows))
        } else {
            ((0, self.n), super::kernels::share(self.rows, ith, nth))
        };
        let mut t = vec![0f32; self.rank];
        for j in tokens.0..tokens.1 {
            let xj = &self.x[j * self.cols..(j + 1) * self.cols];
            for (r, tr) in t.iter_mut().enumerate() {
                *tr = dot(
                    self.order,
                    tiled_a,
                    &self.a[r * self.cols..(r + 1) * self.cols],
                    xj,
                );
            }
            let o = j * self.rows;
            dot_rows(
                self.order,
                tiled_b,
                self.b,
                self.bt,
                &t,
                out_rows,
                self.scale,
                &self.res[o..o + self.rows],
                &mut out[o..o + self.rows],
            );
        }
    }
}

/// `out[o] = res[o] + scale · dot(w row o, t)` for rows `range` of `w`
/// (`k = t.len()` columns), summed as [`dot`] sums it. Short rows on the
/// `ggml_vec_dot_f32` path (no full block: a plain serial sum) are done 16
/// rows at a time from `wt` (`w` transposed), each row with its own running
/// sum in the same order, so the loads and sums vectorize across rows.
#[inline(always)]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
fn dot_rows(
    order: DotOrder,
    tiled: bool,
    w: &[f32],
    wt: &[f32],
    t: &[f32],
    range: (usize, usize),
    scale: f32,
    res: &[f32],
    out: &mut [f32],
) {
    let k = t.len();
    let rows = res.len();
    let lanes = order.lanes();
    let serial = !(tiled && k.is_multiple_of(lanes)) && k < 4 * lanes;
    let mut o = range.0;
    if serial && wt.len() == rows * k {
        while o + 16 <= range.1 {
            let mut acc = [0f32; 16];
            for (i, &ti) in t.iter().enumerate() {
                let col: &[f32; 16] = wt[i * rows + o..i * rows + o + 16]
                    .try_into()
                    .expect("16 values");
                for r in 0..16 {
                    acc[r] += col[r] * ti;
                }
            }
            let res: &[f32; 16] = res[o..o + 16].try_into().expect("16 values");
            let out: &mut [f32; 16] = (&mut out[o..o + 16]).try_into().expect("16 values");
            for r in 0..16 {
                out[r] = res[r] + acc[r] * scale;
            }
            o += 16;
        }
    }
    for o in o..range.1 {
        let d = dot(order, tiled, &w[o * k..(o + 1) * k], t);
        // ggml_scale multiplies the stored f32 product, then ggml_add.
        out[o] = res[o] + d * scale;
    }
}

/// An adapter applied with a scale (1.0 = as trained).
#[derive(Clone, Debug)]
pub struct ActiveLora {
    /// The adapter.
    pub adapter: Arc<LoraAdapter>,
    /// Its user scale (`s = scale · alpha / rank`).
    pub scale: f32,
}

impl ActiveLora {
    /// `adapter` at `scale`.
    pub fn new(adapter: Arc<LoraAdapter>, scale: f32) -> ActiveLora {
        ActiveLora { adapter, scale }
    }

    /// Checks that the adapter belongs to `model` and the scale is finite.
    pub(crate) fn check(&self, model: ModelId) -> Result<()> {
        if self.adapter.base != model {
            return Err(AdapterError::OtherModel {
                adapter: self.adapter.id,
                loaded_for: self.adapter.base,
                model,
            }
            .into());
        }
        if !self.scale.is_finite() {
            return Err(AdapterError::BadScale {
                adapter: self.adapter.id,
                scale: self.scale,
            }
            .into());
        }
        Ok(())
    }
}

impl PartialEq for ActiveLora {
    /// Same adapter file (by id) at the same scale.
    fn eq(&self, other: &ActiveLora) -> bool {
        self.adapter.id == other.adapter.id && self.scale.to_bits() == other.scale.to_bits()
    }
}

/// Parses `FILE[:SCALE]` (scale defaults to 1.0), as `mesh generate --lora` takes it.
/// A colon followed by something that is not a number is part of the path.
pub fn parse_lora_arg(arg: &str) -> Result<(std::path::PathBuf, f32)> {
    if let Some((path, scale)) = arg.rsplit_once(':') {
        if let Ok(s) = scale.parse::<f32>() {
            if !s.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "--lora {arg}: the scale must be a finite number"
                )));
            }
            if path.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "--lora {arg}: expected FILE[:SCALE]"
                )));
            }
            return Ok((path.into(), s));
        }
    }
    if arg.is_empty() {
        return Err(Error::InvalidArgument(
            "--lora: expected FILE[:SCALE]".into(),
        ));
    }
    Ok((arg.into(), 1.0))
}

/// The GGUF name of the base matrix an adapter pair targets
/// (`blk.3.attn_q.weight`, `output.weight`); the pair's tensors add `.lora_a`
/// and `.lora_b`.
pub fn base_tensor_name(layer: usize, projection: Projection) -> String {
    let kind = match projection {
        Projection::Q => "attn_q",
        Projection::K => "attn_k",
        Projection::V => "attn_v",
        Projection::O => "attn_output",
        Projection::Gate => "ffn_gate",
        Projection::Up => "ffn_up",
        Projection::Down => "ffn_down",
        Projection::Output => return "output.weight".to_string(),
    };
    format!("blk.{layer}.{kind}.weight")
}

/// One adapted matrix's factors as f32 (F16 files widened), in the file's
/// layouts: the update of the `rows x cols` base matrix is `B A`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraFactors {
    /// The layer (0 for [`Projection::Output`]).
    pub layer: usize,
    /// The adapted projection.
    pub projection: Projection,
    /// The rank `r`.
    pub rank: usize,
    /// Input width of the base matrix.
    pub cols: usize,
    /// Output rows of the base matrix.
    pub rows: usize,
    /// A: `rank` rows of `cols` values (ggml `[cols, rank]`).
    pub a: Vec<f32>,
    /// B: `rows` rows of `rank` values (ggml `[rank, rows]`).
    pub b: Vec<f32>,
}

/// Where the pair of `(layer, projection)` sorts among an adapter's pairs:
/// by layer, then in evaluation order ([`Projection::LAYER`], then
/// [`Projection::Output`]).
pub(crate) fn pair_order(layer: usize, projection: Projection) -> (usize, usize) {
    let p = Projection::LAYER
        .iter()
        .position(|&q| q == projection)
        .unwrap_or(Projection::LAYER.len());
    (layer, p)
}

/// The values of a 2-d F32 or F16 tensor of an adapter's context, in memory order.
///
/// # Safety
/// `t` is a tensor of a live adapter context, F32 or F16 (checked at load).
unsafe fn tensor_values(t: *const sys::ggml_tensor) -> Vec<f32> {
    // SAFETY: the caller's contract; n elements of the tensor's type at `data`.
    unsafe {
        let n = ((*t).ne[0] * (*t).ne[1]) as usize;
        if (*t).type_ == sys::ggml_type_GGML_TYPE_F16 {
            std::slice::from_raw_parts((*t).data as *const u16, n)
                .iter()
                .map(|&h| half::f16::from_bits(h).to_f32())
                .collect()
        } else {
            std::slice::from_raw_parts((*t).data as *const f32, n).to_vec()
        }
    }
}

impl LoraAdapter {
    /// Every adapted matrix's factors, ordered by layer, then projection in
    /// evaluation order ([`Projection::LAYER`], then [`Projection::Output`]).
    pub fn factors(&self) -> Vec<LoraFactors> {
        let mut keys: Vec<_> = self.pairs.keys().copied().collect();
        keys.sort_by_key(|&(layer, p)| pair_order(layer, p));
        keys.into_iter()
            .map(|(layer, projection)| {
                let pair = &self.pairs[&(layer, projection)];
                // SAFETY: tensors of this adapter's context, F32 or F16 (load checks).
                let (a, b, cols, rows) = unsafe {
                    (
                        tensor_values(pair.a),
                        tensor_values(pair.b),
                        (*pair.a).ne[0] as usize,
                        (*pair.b).ne[1] as usize,
                    )
                };
                LoraFactors {
                    layer,
                    projection,
                    rank: pair.rank,
                    cols,
                    rows,
                    a,
                    b,
                }
            })
            .collect()
    }
}

/// Adapter checks against a fixed small llama-shaped model, for the fuzz
/// target: not a stable API.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// The small model [`check`] validates against: 2 layers, width 64, 4
    /// heads (2 KV heads), FFN 128, vocabulary 256, untied output.
    pub fn small_model() -> ModelInfo {
        ModelInfo {
            architecture: "llama".into(),
            name: None,
            id: ModelId([7; 32]),
            file_size: 0,
            n_layers: 2,
            n_embd: 64,
            n_head: 4,
            n_head_kv: 2,
            head_dim: 16,
            n_ff: 128,
            n_vocab: 256,
            n_ctx_train: 128,
            rms_eps: 1e-5,
            rope_freq_base: 10000.0,
            rope_freq_scale: 1.0,
            rope_kind: super::super::RopeKind::Normal,
            tied_output: false,
            file_type: GgmlType::F32,
        }
    }

    /// GGUF bytes of a rank-`rank` F32 adapter for `info` on `targets` (layer,
    /// projection; [`Projection::Output`] for an untied output), its values
    /// uniform in `±amp` from `seed`: for tests, benchmarks and demos.
    pub fn random_adapter(
        info: &ModelInfo,
        targets: &[(usize, Projection)],
        rank: u64,
        alpha: f32,
        amp: f32,
        seed: u64,
    ) -> Vec<u8> {
        let mut state = seed;
        let mut next = move || {
            // splitmix64
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * amp
        };
        let mut tensors = Vec::new();
        for &(layer, p) in targets {
            let (cols, rows) = projection_shape(info, p);
            let (cols, rows) = (cols as u64, rows as u64);
            let base = base_tensor_name(layer, p);
            let a: Vec<f32> = (0..cols * rank).map(|_| next()).collect();
            let b: Vec<f32> = (0..rank * rows).map(|_| next()).collect();
            tensors.push((format!("{base}.lora_a"), [cols, rank], a));
            tensors.push((format!("{base}.lora_b"), [rank, rows], b));
        }
        adapter_bytes(&info.architecture, alpha, &tensors)
    }

    /// Loads `bytes` as an adapter of [`small_model`]; on success checks that
    /// every pair has the shapes the model needs.
    pub fn check(bytes: &[u8]) -> Result<LoraAdapter> {
        let info = small_model();
        let adapter = LoraAdapter::from_bytes(bytes, &info)?;
        for (&(_, p), pair) in &adapter.pairs {
            let (cols, rows) = projection_shape(&info, p);
            // SAFETY: tensors of the adapter's own context.
            unsafe {
                assert_eq!((*pair.a).ne[0] as usize, cols);
                assert_eq!((*pair.b).ne[1] as usize, rows);
                assert_eq!((*pair.a).ne[1] as usize, pair.rank);
                assert_eq!((*pair.b).ne[0] as usize, pair.rank);
            }
        }
        Ok(adapter)
    }
}

/// GGUF bytes of a LoRA adapter for `arch` with F32 tensors `(name, [ne0, ne1],
/// values)` in order (data aligned to 32 bytes), for tests and fuzz seeds.
#[doc(hidden)]
pub fn adapter_bytes(arch: &str, alpha: f32, tensors: &[(String, [u64; 2], Vec<f32>)]) -> Vec<u8> {
    use crate::gguf::testing::Writer;
    use crate::gguf::Value;
    let metadata = [
        ("general.architecture", Value::String(arch.into())),
        ("general.type", Value::String("adapter".into())),
        ("adapter.type", Value::String("lora".into())),
        ("adapter.lora.alpha", Value::F32(alpha)),
    ];
    let mut w = Writer::new();
    w.header(3, tensors.len() as u64, metadata.len() as u64);
    for (k, v) in &metadata {
        w.kv(k, v);
    }
    let mut offset = 0u64;
    for (name, dims, values) in tensors {
        w.tensor_info(name, dims, GgmlType::F32 as u32, offset);
        offset = (offset + 4 * values.len() as u64).div_ceil(32) * 32;
    }
    w.pad_to(32);
    for (_, _, values) in tensors {
        w.pad_to(32);
        for v in values {
            w.buf.extend_from_slice(&v.to_le_bytes());
        }
    }
    w.buf
}

#[cfg(test)]
mod tests {
    use super::testing::{check, small_model};
    use super::*;
    use crate::gguf::testing::write_gguf;
    use crate::gguf::Value;
    use proptest::prelude::*;

    fn pair(base: &str, cols: u64, rank: u64, rows: u64) -> [(String, [u64; 2], Vec<f32>); 2] {
        let n = |a: u64, b: u64| {
            (0..a * b)
                .map(|i| (i % 7) as f32 * 0.01)
                .collect::<Vec<_>>()
        };
        [
            (format!("{base}.lora_a"), [cols, rank], n(cols, rank)),
            (format!("{base}.lora_b"), [rank, rows], n(rank, rows)),
        ]
    }

    fn valid() -> Vec<(String, [u64; 2], Vec<f32>)> {
        let mut t = Vec::new();
        t.extend(pair("blk.0.attn_q.weight", 64, 4, 64));
        t.extend(pair("blk.1.attn_k.weight", 64, 2, 32));
        t.extend(pair("blk.1.ffn_down.weight", 128, 4, 64));
        t.extend(pair("output.weight", 64, 3, 256));
        t
    }

    fn err(bytes: &[u8]) -> AdapterError {
        match check(bytes) {
            Err(Error::Adapter(e)) => e,
            other => panic!("expected an adapter error, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_adapter_loads_with_its_pairs_and_scale() {
        let a = check(&adapter_bytes("llama", 8.0, &valid())).unwrap();
        assert_eq!(a.n_matrices(), 4);
        assert_eq!(a.alpha(), 8.0);
        assert_eq!(a.rank(0, Projection::Q), Some(4));
        assert_eq!(a.rank(5, Projection::Output), Some(3));
        assert!(!a.adapts(0, Projection::K));
        assert_eq!(a.base_model(), small_model().id);
        assert_eq!(a.effective_scale(0.5, 4), 1.0);
        let no_alpha = check(&adapter_bytes("llama", 0.0, &valid())).unwrap();
        assert_eq!(no_alpha.effective_scale(0.5, 4), 0.5);
    }

    #[test]
    fn bad_adapters_get_typed_errors() {
        // Another architecture.
        assert!(matches!(
            err(&adapter_bytes("qwen2", 8.0, &valid())),
            AdapterError::WrongArchitecture { .. }
        ));
        // Missing half.
        let mut t = valid();
        t.remove(1);
        assert!(matches!(
            err(&adapter_bytes("llama", 8.0, &t)),
            AdapterError::MissingHalf {
                missing: "lora_b",
                ..
            }
        ));
        let mut t = valid();
        t.remove(0);
        assert!(matches!(
            err(&adapter_bytes("llama", 8.0, &t)),
            AdapterError::MissingHalf {
                missing: "lora_a",
                ..
            }
        ));
        // Shapes: A's input width, B's output height, ranks that disagree.
        for (base, cols, rank, rows) in [
            ("blk.0.attn_q.weight", 32, 4, 64),
            ("blk.0.attn_q.weight", 64, 4, 32),
            ("blk.0.ffn_down.weight", 64, 4, 64),
        ] {
            let t = pair(base, cols, rank, rows).to_vec();
            assert!(matches!(
                err(&adapter_bytes("llama", 8.0, &t)),
                AdapterError::Shape { .. }
            ));
        }
        let mut t = pair("blk.0.attn_q.weight", 64, 4, 64).to_vec();
        t[1] = (
            "blk.0.attn_q.weight.lora_b".into(),
            [5, 64],
            vec![0.0; 5 * 64],
        );
        assert!(matches!(
            err(&adapter_bytes("llama", 8.0, &t)),
            AdapterError::Shape { .. }
        ));
        // Targets the model does not have or LoRA cannot adapt.
        for base in [
            "blk.2.attn_q.weight",
            "blk.01.attn_q.weight",
            "blk.+1.attn_q.weight",
            "blk.0.attn_norm.weight",
            "token_embd.weight",
            "nonsense",
        ] {
            let t = pair(base, 64, 4, 64).to_vec();
            assert!(
                matches!(
                    err(&adapter_bytes("llama", 8.0, &t)),
                    AdapterError::UnknownTarget { .. }
                ),
                "{base}"
            );
        }
        // No LoRA tensors, bad alpha.
        assert_eq!(err(&adapter_bytes("llama", 8.0, &[])), AdapterError::Empty);
        assert!(matches!(
            err(&adapter_bytes("llama", -1.0, &valid())),
            AdapterError::BadAlpha(_)
        ));
        assert!(matches!(
            err(&adapter_bytes("llama", f32::NAN, &valid())),
            AdapterError::BadAlpha(_)
        ));
    }

    #[test]
    fn models_quantized_halves_and_untied_outputs_are_refused() {
        let s = |v: &str| Value::String(v.into());
        let meta = |ty: Option<&str>| {
            let mut m = vec![("general.architecture".to_string(), s("llama"))];
            if let Some(ty) = ty {
                m.push(("general.type".to_string(), s(ty)));
                m.push(("adapter.type".to_string(), s("lora")));
            }
            m
        };
        let tensors = |ty: GgmlType| {
            vec![
                ("blk.0.attn_q.weight.lora_a".to_string(), vec![64, 32], ty),
                ("blk.0.attn_q.weight.lora_b".to_string(), vec![32, 64], ty),
            ]
        };
        // A model file (no general.type) is not an adapter.
        assert!(matches!(
            err(&write_gguf(&meta(None), &tensors(GgmlType::F32))),
            AdapterError::NotAnAdapter(_)
        ));
        assert!(matches!(
            err(&write_gguf(&meta(Some("model")), &tensors(GgmlType::F32))),
            AdapterError::NotAnAdapter(_)
        ));
        // Quantized LoRA halves.
        assert!(matches!(
            err(&write_gguf(
                &meta(Some("adapter")),
                &tensors(GgmlType::Q8_0)
            )),
            AdapterError::UnsupportedType { .. }
        ));
        // F16 halves load.
        check(&write_gguf(&meta(Some("adapter")), &tensors(GgmlType::F16))).unwrap();
        // output.weight of a model whose output is tied to the embeddings.
        let tied = ModelInfo {
            tied_output: true,
            ..small_model()
        };
        let bytes = adapter_bytes("llama", 1.0, &pair("output.weight", 64, 3, 256));
        assert!(matches!(
            LoraAdapter::from_bytes(&bytes, &tied),
            Err(Error::Adapter(AdapterError::UnknownTarget { .. }))
        ));
    }

    #[test]
    fn active_adapters_check_their_model_and_scale() {
        let a = Arc::new(check(&adapter_bytes("llama", 8.0, &valid())).unwrap());
        ActiveLora::new(a.clone(), 1.0)
            .check(a.base_model())
            .unwrap();
        assert!(matches!(
            ActiveLora::new(a.clone(), 1.0).check(ModelId([1; 32])),
            Err(Error::Adapter(AdapterError::OtherModel { .. }))
        ));
        assert!(matches!(
            ActiveLora::new(a.clone(), f32::INFINITY).check(a.base_model()),
            Err(Error::Adapter(AdapterError::BadScale { .. }))
        ));
        assert_eq!(ActiveLora::new(a.clone(), 0.5), ActiveLora::new(a, 0.5));
    }

    #[test]
    fn lora_arguments_parse() {
        assert_eq!(parse_lora_arg("a.gguf").unwrap(), ("a.gguf".into(), 1.0));
        assert_eq!(
            parse_lora_arg("a.gguf:0.5").unwrap(),
            ("a.gguf".into(), 0.5)
        );
        assert_eq!(
            parse_lora_arg("c:/x:y.gguf").unwrap(),
            ("c:/x:y.gguf".into(), 1.0)
        );
        assert!(parse_lora_arg("").is_err());
        assert!(parse_lora_arg(":2").is_err());
        assert!(parse_lora_arg("a.gguf:inf").is_err());
    }

    #[test]
    fn every_summation_order_computes_the_dot_product() {
        let mut seed = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let mut distinct = false;
        for k in [1usize, 7, 8, 16, 24, 64, 100, 576, 1536] {
            let a: Vec<f32> = (0..k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k).map(|_| next()).collect();
            let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let mag: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 * *y as f64).abs())
                .sum();
            let mut seen = Vec::new();
            for order in [DotOrder::Wide16, DotOrder::Wide8] {
                for tiled in [false, true] {
                    let d = dot(order, tiled, &a, &b) as f64;
                    assert!(
                        (d - exact).abs() <= 1e-6 * mag + 1e-30,
                        "k {k}: {d} vs {exact}"
                    );
                    seen.push(d);
                }
            }
            distinct |= seen.iter().any(|d| *d != seen[0]);
        }
        assert!(distinct, "the four summation orders never differ");
    }

    #[test]
    fn lora_jobs_add_the_scaled_product_and_split_work_exactly() {
        // x: 3 tokens of 2; A: rank 2; B: 20 rows (a block of 16 plus 4).
        let x = [1.0f32, 1.0, 0.5, -1.0, 2.0, 0.25];
        let a = [1.0f32, 2.0, -1.0, 0.5];
        let b: Vec<f32> = (0..40).map(|i| (i % 5) as f32 - 2.0).collect();
        let res: Vec<f32> = (0..60).map(|i| i as f32 * 0.125).collect();
        let bt: Vec<f32> = (0..40).map(|i| b[(i % 20) * 2 + i / 20]).collect();
        let mut want = vec![0f32; 60];
        for j in 0..3 {
            let t = [
                a[0] * x[2 * j] + a[1] * x[2 * j + 1],
                a[2] * x[2 * j] + a[3] * x[2 * j + 1],
            ];
            for o in 0..20 {
                want[j * 20 + o] = res[j * 20 + o] + (b[2 * o] * t[0] + b[2 * o + 1] * t[1]) * 2.0;
            }
        }
        for order in [DotOrder::Wide16, DotOrder::Wide8] {
            for n in [1usize, 3] {
                let job = LoraJob {
                    order,
                    scale: 2.0,
                    cols: 2,
                    rank: 2,
                    rows: 20,
                    n,
                    x: &x[..2 * n],
                    a: &a,
                    b: &b,
                    bt: &bt,
                    res: &res[..20 * n],
                };
                for nth in 1..4 {
                    let mut out = vec![f32::NAN; 20 * n];
                    for ith in 0..nth {
                        job.run(&mut out, ith, nth);
                    }
                    assert_eq!(out, want[..20 * n], "{order:?} n {n} threads {nth}");
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Arbitrary bytes, and valid adapters with bytes flipped, never panic.
        #[test]
        fn hostile_adapter_bytes_are_errors(
            bytes in proptest::collection::vec(any::<u8>(), 0..512),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        ) {
            let _ = check(&bytes);
            let mut good = adapter_bytes("llama", 8.0, &valid());
            for (at, v) in flips {
                let i = at % good.len();
                good[i] ^= v | 1;
            }
            let _ = check(&good);
        }
    }
}
