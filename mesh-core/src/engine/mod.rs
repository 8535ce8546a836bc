//! The local inference engine: run a *range* of transformer layers on a hidden state.
//!
//! Everything mesh-llm does with a model composes four primitives:
//! [`Engine::embed`] (tokens to hidden state), [`Engine::run_layers`] (layers `a..b`
//! with the session's KV cache), [`Engine::head`] (final norm and output projection
//! to logits), and the per-projection access ([`Engine::weight`], [`Engine::project`])
//! a delegator uses to evaluate the heavy linear layers elsewhere. "Whole model" is
//! just `0..n_layers`; running `0..k` then `k..n` gives the same logits as `0..n`.
//!
//! [`GgmlEngine`] implements the llama family (llama, mistral, qwen2) on ggml.

pub(crate) mod blocks;
mod fused;
mod ggml;
mod kernels;
pub mod lora;
mod model;
mod options;
mod placement;
mod q4_1;
mod q8_0;
mod quant;
pub mod threads;

use std::fmt;
use std::ops::Range;

pub(crate) use self::ggml::available_memory;
pub use self::ggml::{
    available_cores, cpu_class, default_threads, resolve_threads, BatchStats, Decoder, GgmlEngine,
    GgmlSession, LINGER, MAX_BATCH,
};
pub use self::lora::{parse_lora_arg, ActiveLora, AdapterError, LoraAdapter, LoraFactors};
pub use self::model::{LayerWeights, ModelInfo, RopeKind};
pub use self::options::EngineOptions;
pub use self::quant::{dequantize, quantize, QUANT_TYPES};
pub use self::threads::ThreadStats;

/// Why ggml failed ([`crate::Error::Ggml`]).
pub type GgmlError = crate::LayerError<GgmlErrorKind>;

/// The kinds of [`GgmlError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlErrorKind {
    /// A ggml context, graph, KV cache or buffer could not be allocated.
    Alloc,
    /// A graph's computation failed, or a batched step panicked.
    Compute,
    /// The forward pass produced NaN or infinite logits.
    NonFinite,
    /// A result had another size than the engine expected (a bug, reported
    /// rather than trusted).
    Internal,
}
use crate::chat::ChatTemplate;
use crate::gguf::GgmlType;
use crate::tokenizer::Tokenizer;
use crate::Result;

/// Which SIMD kernels compute the default path (see [`cpu_class`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CpuClass {
    /// x86-64 with AVX-512 (ggml built with it).
    Avx512,
    /// x86-64 with AVX2 and FMA, without AVX-512.
    Avx2,
    /// Anything else (scalar or other ISAs).
    Other,
}

impl CpuClass {
    /// Short name: `avx512`, `avx2` or `other` (as `scripts/golden.py` records it).
    pub fn name(self) -> &'static str {
        match self {
            CpuClass::Avx512 => "avx512",
            CpuClass::Avx2 => "avx2",
            CpuClass::Other => "other",
        }
    }
}

impl fmt::Display for CpuClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

pub use crate::model_id::ModelId;

/// Hidden states of a batch of consecutive tokens: `n_tokens` rows of `n_embd` floats.
#[derive(Clone, Debug, PartialEq)]
pub struct Hidden {
    /// Width of one row (the model's embedding length).
    pub n_embd: usize,
    /// Position (in the sequence) of the first row.
    pub pos: usize,
    /// Row-major data, `n_tokens * n_embd` values.
    pub data: Vec<f32>,
}

impl Hidden {
    /// Number of token rows.
    pub fn n_tokens(&self) -> usize {
        self.data.len().checked_div(self.n_embd).unwrap_or(0)
    }

    /// Row `i` (one token's hidden state), if it exists.
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        self.data.get(i * self.n_embd..(i + 1) * self.n_embd)
    }
}

/// One of the linear projections of the model, addressable one at a time so a
/// delegator can evaluate it elsewhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Projection {
    /// Attention query projection of a layer.
    Q,
    /// Attention key projection of a layer.
    K,
    /// Attention value projection of a layer.
    V,
    /// Attention output projection of a layer.
    O,
    /// Feed-forward gate projection of a layer.
    Gate,
    /// Feed-forward up projection of a layer.
    Up,
    /// Feed-forward down projection of a layer.
    Down,
    /// The output projection to vocabulary logits (lm_head; layer index ignored).
    Output,
}

impl Projection {
    /// All projections of one transformer layer, in evaluation order.
    pub const LAYER: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];
}

/// Raw bytes of one weight matrix exactly as stored in the GGUF file.
#[derive(Clone, Copy, Debug)]
pub struct WeightView<'a> {
    /// Storage type (block format) of the matrix.
    pub ggml_type: GgmlType,
    /// Number of output rows.
    pub rows: usize,
    /// Number of input columns (row length).
    pub cols: usize,
    /// `rows` rows of `ggml_type.row_bytes(cols)` bytes each.
    pub bytes: &'a [u8],
}

/// What to return from a forward pass over the whole model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Logits of the last token only (generation).
    Last,
    /// Logits of every token (perplexity, scoring).
    All,
}

/// Computes one linear projection for [`Engine::run_layers_with`] and
/// [`Engine::head_with`]: `(layer, projection, x, n)` with `x` holding `n` rows of
/// the matrix's `cols` inputs, returning `n` rows of its `rows` outputs
/// (row-major by token). The layer index is ignored for [`Projection::Output`].
pub type Projector<'a> = dyn FnMut(usize, Projection, &[f32], usize) -> Result<Vec<f32>> + 'a;

/// A model that can be evaluated one layer range at a time.
///
/// Implementations are shareable across threads; the mutable per-sequence state
/// (KV cache, compute buffers) lives in a [`Engine::Session`].
pub trait Engine: Send + Sync {
    /// Per-sequence state: KV cache and scratch buffers.
    type Session: Send;

    /// Hyper-parameters and identity of the loaded model.
    fn info(&self) -> &ModelInfo;
    /// The model's tokenizer.
    fn tokenizer(&self) -> &Tokenizer;
    /// The model's chat template (ChatML if the file has none).
    fn chat_template(&self) -> &ChatTemplate;

    /// A new session whose KV cache holds `n_ctx` positions for every layer.
    fn new_session(&self, n_ctx: usize) -> Result<Self::Session>;

    /// Embeddings of `tokens`, which sit at positions `pos..pos + tokens.len()`.
    fn embed(&self, tokens: &[u32], pos: usize) -> Result<Hidden>;

    /// Run layers `layers` on `hidden` in place, appending to the session's KV cache
    /// of those layers (each must hold exactly `hidden.pos` positions).
    fn run_layers(
        &self,
        layers: Range<usize>,
        hidden: &mut Hidden,
        session: &mut Self::Session,
    ) -> Result<()>;

    /// Like [`Engine::run_layers`], but every linear projection of the layers
    /// (Q, K, V, O, gate, up, down) is computed by `project`; norms, RoPE,
    /// attention with the session's KV cache, SiLU·mul, biases and residuals stay
    /// here. This is how a delegator evaluates the heavy layers elsewhere.
    fn run_layers_with(
        &self,
        layers: Range<usize>,
        hidden: &mut Hidden,
        session: &mut Self::Session,
        project: &mut Projector<'_>,
    ) -> Result<()>;

    /// Like [`Engine::head`], with the output projection computed by `project`.
    fn head_with(
        &self,
        hidden: &Hidden,
        which: Logits,
        session: &mut Self::Session,
        project: &mut Projector<'_>,
    ) -> Result<Vec<f32>>;

    /// Final norm and output projection: logits (`n_vocab` per returned token).
    fn head(&self, hidden: &Hidden, which: Logits, session: &mut Self::Session)
        -> Result<Vec<f32>>;

    /// Whole-model forward pass of `tokens` at the session's current position.
    /// Implementations may fuse the steps; the result equals
    /// `head(run_layers(0..n, embed(tokens)))`.
    fn forward(
        &self,
        tokens: &[u32],
        which: Logits,
        session: &mut Self::Session,
    ) -> Result<Vec<f32>>;

    /// Number of positions the session's KV cache holds for `layer`.
    fn session_len(&self, session: &Self::Session, layer: usize) -> usize;

    /// Number of positions the session's KV cache can hold (its `n_ctx`).
    fn session_capacity(&self, session: &Self::Session) -> usize;

    /// Forget every position from `len` on in all layers (for replay or retry).
    fn truncate_session(&self, session: &mut Self::Session, len: usize);

    /// Raw bytes of one projection matrix of `layer`.
    fn weight(&self, layer: usize, projection: Projection) -> Result<WeightView<'_>>;

    /// Threads this engine computes with; kernels that run on its behalf
    /// (a private-mode helper's share products) use no more. One unless
    /// the implementation says otherwise.
    fn compute_threads(&self) -> usize {
        1
    }

    /// `W·x` for one projection, for `n_tokens = x.len() / cols` input rows.
    /// Returns `n_tokens * rows` values, row-major by token.
    fn project(
        &self,
        layer: usize,
        projection: Projection,
        x: &[f32],
        session: &mut Self::Session,
    ) -> Result<Vec<f32>>;
}
