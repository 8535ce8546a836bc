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

use super::ggml::Held;
use super::{ModelId, ModelInfo, Projection};
use crate::engine::GgmlErrorKind;
use crate::gguf::GgufErrorKind;
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
    pub a: Held,
    /// `[rank, rows]`.
    pub b: Held,
    /// The rank `r`.
    pub rank: usize,
    /// B in panels of 16 rows (F32 halves, see [`op::b_panels`]), owned by
    /// the adapter.
    pub b_panels: *const f32,
    /// B in panels of 16 rows (F16 halves: their bits), owned by the adapter.
    pub b_panels16: *const u16,
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
    /// B of each F32 pair in panels (`LoraPair::b_panels` points into these).
    panels: Vec<Box<[f32]>>,
    /// B of each F16 pair in panels (`LoraPair::b_panels16` points into these).
    panels16: Vec<Box<[u16]>>,
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
            Error::ggml(
                GgmlErrorKind::Alloc,
                format!("could not allocate {mem_size} bytes for an adapter"),
            )
        })?;
        let mut adapter = LoraAdapter {
            id: ModelId(*blake3::hash(bytes).as_bytes()),
            base: info.id,
            alpha,
            file_size: bytes.len() as u64,
            name: g.opt_value::<&str>("general.name")?.map(str::to_string),
            ctx,
            pairs: HashMap::with_capacity(planned.len()),
            panels: Vec::new(),
            panels16: Vec::new(),
        };
        let mk = |t: &TensorInfo| -> Result<Held> {
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
                    return Err(Error::gguf(
                        GgufErrorKind::Truncated,
                        format!("tensor {}: expected {} bytes of data", t.name, src.len()),
                    ));
                }
                ptr::copy_nonoverlapping(src.as_ptr(), (*tensor).data.cast::<u8>(), src.len());
                // The adapter owns the context; graphs read its tensors
                // while they hold the adapter (`ActiveLora`).
                Held::new(tensor).ok_or_else(|| {
                    Error::gguf(
                        GgufErrorKind::Truncated,
                        format!("tensor {}: no tensor", t.name),
                    )
                })
            }
        };
        for p in planned {
            let (a, b) = (mk(&p.a)?, mk(&p.b)?);
            let rows = p.b.dims[1] as usize;
            // SAFETY (both): `b` is a tensor of rank x rows just filled, of
            // the element type read.
            let b_panels = match p.b.ggml_type {
                GgmlType::F32 => keep_panels(
                    unsafe { std::slice::from_raw_parts(b.data() as *const f32, p.rank * rows) },
                    p.rank,
                    &mut adapter.panels,
                ),
                _ => ptr::null(),
            };
            let b_panels16 = match p.b.ggml_type {
                GgmlType::F16 => keep_panels(
                    unsafe { std::slice::from_raw_parts(b.data() as *const u16, p.rank * rows) },
                    p.rank,
                    &mut adapter.panels16,
                ),
                _ => ptr::null(),
            };
            let pair = LoraPair {
                a,
                b,
                rank: p.rank,
                b_panels,
                b_panels16,
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

/// B (`src`, rows of `rank`) in panels ([`op::b_panels`]), kept in `store`
/// for the adapter's life; returns where they start.
fn keep_panels<T: Copy + Default>(src: &[T], rank: usize, store: &mut Vec<Box<[T]>>) -> *const T {
    let panels = op::b_panels(src, rank, src.len() / rank);
    let at = panels.as_ptr();
    store.push(panels);
    at
}

mod op;
#[cfg(test)]
pub(crate) use op::b_panels;
#[cfg(target_arch = "x86_64")]
pub(crate) use op::x86::lanes as x86_lanes;
pub(crate) use op::{dot, dot_rows, lora_add_op, reduce_tiled, walk_panels, DotOrder, LoraCall};

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
unsafe fn tensor_values(t: Held) -> Vec<f32> {
    // SAFETY: the caller's contract; n elements of the tensor's type at `data`.
    unsafe {
        let n = (t.ne()[0] * t.ne()[1]) as usize;
        if t.ty() == sys::ggml_type_GGML_TYPE_F16 {
            std::slice::from_raw_parts(t.data() as *const u16, n)
                .iter()
                .map(|&h| half::f16::from_bits(h).to_f32())
                .collect()
        } else {
            std::slice::from_raw_parts(t.data() as *const f32, n).to_vec()
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
                let (a, b) = unsafe { (tensor_values(pair.a), tensor_values(pair.b)) };
                let (cols, rows) = (pair.a.ne()[0] as usize, pair.b.ne()[1] as usize);
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

/// GGUF bytes of a LoRA adapter for `arch` with F32 tensors `(name, [ne0, ne1],
/// values)` in order (data aligned to 32 bytes): llama.cpp's adapter format,
/// as [`LoraAdapter::from_bytes`] reads it. Model sync writes aggregated
/// adapters with it.
pub fn adapter_bytes(arch: &str, alpha: f32, tensors: &[(String, [u64; 2], Vec<f32>)]) -> Vec<u8> {
    write_adapter(arch, alpha, tensors, GgmlType::F32)
}

/// [`adapter_bytes`] with F16 tensors (each value rounded to the nearest
/// F16), as llama.cpp's `convert_lora_to_gguf.py` writes by default.
pub fn adapter_bytes_f16(
    arch: &str,
    alpha: f32,
    tensors: &[(String, [u64; 2], Vec<f32>)],
) -> Vec<u8> {
    write_adapter(arch, alpha, tensors, GgmlType::F16)
}

fn write_adapter(
    arch: &str,
    alpha: f32,
    tensors: &[(String, [u64; 2], Vec<f32>)],
    ty: GgmlType,
) -> Vec<u8> {
    use crate::gguf::{Value, Writer};
    let width = if ty == GgmlType::F16 { 2 } else { 4 };
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
        w.tensor_info(name, dims, ty as u32, offset);
        offset = (offset + width * values.len() as u64).div_ceil(32) * 32;
    }
    w.pad_to(32);
    for (_, _, values) in tensors {
        w.pad_to(32);
        for &v in values {
            if ty == GgmlType::F16 {
                w.buf
                    .extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
            } else {
                w.buf.extend_from_slice(&v.to_le_bytes());
            }
        }
    }
    w.buf
}

/// Adapter checks against a fixed small llama-shaped model, for tests, fuzz
/// targets and seeds (feature `testing`): not a stable API.
#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
pub(crate) mod tests;
