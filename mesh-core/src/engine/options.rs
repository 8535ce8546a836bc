//! How an engine computes ([`EngineOptions`]), fixed when it is loaded.

#[cfg(doc)]
use super::GgmlEngine;

/// How an engine computes, fixed when it is loaded ([`GgmlEngine::load_with`]):
/// every session of the engine computes the same way, so results never depend
/// on which session or thread asked first.
///
/// ```no_run
/// # fn main() -> mesh_core::Result<()> {
/// use mesh_core::engine::{EngineOptions, GgmlEngine};
/// let engine = GgmlEngine::load_with("model.gguf", &EngineOptions::new().threads(2).exact(true))?;
/// assert!(engine.exact_accumulation());
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineOptions {
    /// Compute threads (0 = the idle cores, see [`default_threads`](super::default_threads); more
    /// than the cores is an error). Default 0.
    pub threads: usize,
    /// Exact accumulation (default off): every Q4_1 projection, including
    /// single-token decode, computes the exact `Σ_b d_w·d_x·isum_b +
    /// m_w·d_x·Σq_b` of the Q8_1-quantized input (with `Σq_b` summed from the
    /// int8s, not Q8_1's fp16-rounded `s`) and rounds it once to f32, instead
    /// of ggml's f32 accumulation. The result then matches a computation of
    /// the exact product elsewhere (private delegation, a pipeline stage on
    /// another CPU) and does not depend on batching or threads, except where
    /// an f64 rounding lands on an f32 rounding boundary (probability ~2^-29
    /// per output). The Q8_0 output head stays on ggml. Needs an x86-64 CPU
    /// with AVX2, FMA and F16C: loading fails with [`Error::Unsupported`](crate::Error::Unsupported)
    /// elsewhere.
    pub exact: bool,
    /// Batched Q4_1 projections use mesh-llm's tiled kernel, and single-token
    /// products with Q8_0 weights (the default model's output head) its
    /// row-by-row kernel, instead of ggml's `mul_mat` (default on; each
    /// silently off where the CPU cannot run it). Both give bit-identical
    /// results: switching it off is a debugging and benchmarking aid.
    pub custom_gemm: bool,
    /// Adapt each graph's thread count to the machine's load (default on), or
    /// always use [`threads`](Self::threads), as the pinned ggml would: see
    /// [`super::threads`]. Results are the same either way.
    pub adaptive_threads: bool,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            threads: 0,
            exact: false,
            custom_gemm: true,
            adaptive_threads: true,
        }
    }
}

impl EngineOptions {
    /// The defaults: idle cores, ggml's accumulation, tiled kernel, adaptive threads.
    pub fn new() -> Self {
        Self::default()
    }
    /// Set [`threads`](Self::threads).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }
    /// Set [`exact`](Self::exact).
    pub fn exact(mut self, on: bool) -> Self {
        self.exact = on;
        self
    }
    /// Set [`custom_gemm`](Self::custom_gemm).
    pub fn custom_gemm(mut self, on: bool) -> Self {
        self.custom_gemm = on;
        self
    }
    /// Set [`adaptive_threads`](Self::adaptive_threads).
    pub fn adaptive_threads(mut self, on: bool) -> Self {
        self.adaptive_threads = on;
        self
    }
}
