//! Model hyper-parameters and weight layout of the llama family, read from GGUF
//! metadata and validated against the tensor index before any weight is touched.

use super::ModelId;
use crate::gguf::GgufErrorKind;
use crate::gguf::{GgmlType, Gguf, TensorInfo};
use crate::{Error, Result};

/// How rotary position embeddings pair up dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeKind {
    /// Adjacent pairs (llama, mistral): ggml rope mode 0.
    Normal,
    /// Halves (qwen2, gpt-neox): ggml rope mode 2.
    Neox,
}

/// Hyper-parameters and identity of a loaded model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelInfo {
    /// `general.architecture` (e.g. "llama").
    pub architecture: String,
    /// `general.name`, if present.
    pub name: Option<String>,
    /// BLAKE3 hash of the GGUF file.
    pub id: ModelId,
    /// Size of the GGUF file in bytes.
    pub file_size: u64,
    /// Number of transformer layers.
    pub n_layers: usize,
    /// Embedding (hidden state) width.
    pub n_embd: usize,
    /// Attention query heads.
    pub n_head: usize,
    /// Attention key/value heads (grouped-query attention when < `n_head`).
    pub n_head_kv: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Feed-forward inner width.
    pub n_ff: usize,
    /// Vocabulary size (rows of the embedding matrix).
    pub n_vocab: usize,
    /// Context length the model was trained with.
    pub n_ctx_train: usize,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// RoPE frequency base.
    pub rope_freq_base: f32,
    /// RoPE frequency scale (1 / linear scaling factor).
    pub rope_freq_scale: f32,
    /// RoPE pairing.
    pub rope_kind: RopeKind,
    /// True when the output projection reuses the token embedding matrix.
    pub tied_output: bool,
    /// Storage type of most weight matrices (the "quantization" of the file).
    pub file_type: GgmlType,
}

/// GGUF tensors of one transformer layer.
#[derive(Clone, Debug)]
pub struct LayerWeights {
    /// Pre-attention RMSNorm weight.
    pub attn_norm: TensorInfo,
    /// Query projection.
    pub wq: TensorInfo,
    /// Key projection.
    pub wk: TensorInfo,
    /// Value projection.
    pub wv: TensorInfo,
    /// Optional query bias (qwen2).
    pub bq: Option<TensorInfo>,
    /// Optional key bias (qwen2).
    pub bk: Option<TensorInfo>,
    /// Optional value bias (qwen2).
    pub bv: Option<TensorInfo>,
    /// Attention output projection.
    pub wo: TensorInfo,
    /// Pre-FFN RMSNorm weight.
    pub ffn_norm: TensorInfo,
    /// FFN gate projection.
    pub gate: TensorInfo,
    /// FFN up projection.
    pub up: TensorInfo,
    /// FFN down projection.
    pub down: TensorInfo,
}

/// All weights the forward pass needs, validated.
#[derive(Clone, Debug)]
pub(crate) struct Weights {
    pub token_embd: TensorInfo,
    pub output_norm: TensorInfo,
    pub output: TensorInfo,
    pub layers: Vec<LayerWeights>,
}

/// Matrix formats the forward pass accepts: exactly those ggml quantizes.
use super::quant::QUANT_TYPES as MATRIX_TYPES;

fn usize_of(key: &str, v: u32) -> Result<usize> {
    if v == 0 {
        return Err(Error::gguf(
            GgufErrorKind::Model,
            format!("{key}: expected a positive value, found 0"),
        ));
    }
    Ok(v as usize)
}

impl ModelInfo {
    /// Read and check the hyper-parameters of a llama-family model.
    pub(crate) fn from_gguf(g: &Gguf, id: ModelId, file_size: u64) -> Result<(ModelInfo, Weights)> {
        let arch = g.architecture()?.to_string();
        let rope_kind = match arch.as_str() {
            "llama" | "mistral" => RopeKind::Normal,
            "qwen2" => RopeKind::Neox,
            other => {
                return Err(Error::Unsupported(format!(
                    "architecture {other:?}: expected one of \"llama\", \"mistral\", \"qwen2\""
                )))
            }
        };
        let key = |k: &str| format!("{arch}.{k}");
        let n_layers = usize_of(&key("block_count"), g.value::<u32>(&key("block_count"))?)?;
        let n_embd = usize_of(
            &key("embedding_length"),
            g.value::<u32>(&key("embedding_length"))?,
        )?;
        let n_ff = usize_of(
            &key("feed_forward_length"),
            g.value::<u32>(&key("feed_forward_length"))?,
        )?;
        let n_head = usize_of(
            &key("attention.head_count"),
            g.value::<u32>(&key("attention.head_count"))?,
        )?;
        let n_head_kv = match g.opt_value::<u32>(&key("attention.head_count_kv"))? {
            Some(v) => usize_of(&key("attention.head_count_kv"), v)?,
            None => n_head,
        };
        let n_ctx_train = usize_of(
            &key("context_length"),
            g.value::<u32>(&key("context_length"))?,
        )?;
        let rms_eps = g.value::<f32>(&key("attention.layer_norm_rms_epsilon"))?;
        let rope_freq_base = g
            .opt_value::<f32>(&key("rope.freq_base"))?
            .unwrap_or(10000.0);
        let rope_freq_scale = match g.opt_value::<&str>(&key("rope.scaling.type"))? {
            None | Some("none") => 1.0,
            Some("linear") => {
                let factor = g
                    .opt_value::<f32>(&key("rope.scaling.factor"))?
                    .unwrap_or(1.0);
                if !(factor.is_finite() && factor > 0.0) {
                    return Err(Error::gguf(
                        GgufErrorKind::Model,
                        format!(
                            "{}: expected a positive factor, found {factor}",
                            key("rope.scaling.factor")
                        ),
                    ));
                }
                1.0 / factor
            }
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "{}: {other:?} (supported: none, linear)",
                    key("rope.scaling.type")
                )))
            }
        };
        if !(rms_eps.is_finite()
            && rms_eps > 0.0
            && rope_freq_base.is_finite()
            && rope_freq_base > 0.0)
        {
            return Err(Error::gguf(GgufErrorKind::Model, format!(
                "rms epsilon {rms_eps} / rope base {rope_freq_base}: expected positive finite values"
            )));
        }
        if n_embd % n_head != 0 || n_head % n_head_kv != 0 {
            return Err(Error::gguf(
                GgufErrorKind::Model,
                format!(
                "attention shape: expected embedding length {n_embd} divisible by {n_head} heads \
                 and {n_head} heads divisible by {n_head_kv} kv heads"
            ),
            ));
        }
        let head_dim = n_embd / n_head;
        if let Some(rot) = g.opt_value::<u32>(&key("rope.dimension_count"))? {
            if rot as usize != head_dim {
                return Err(Error::Unsupported(format!(
                    "{}: partial rotary embeddings ({rot} of {head_dim} dims)",
                    key("rope.dimension_count")
                )));
            }
        }
        let kv_dim = n_head_kv * head_dim;

        let token_embd = g.require_tensor("token_embd.weight")?.clone();
        let n_vocab = token_embd.dims.get(1).copied().unwrap_or(0) as usize;
        expect_matrix(&token_embd, n_embd, n_vocab)?;
        let output_norm = expect_vector(g, "output_norm.weight", n_embd)?;
        let (output, tied_output) = match g.tensor("output.weight") {
            Some(t) => (t.clone(), false),
            None => (token_embd.clone(), true),
        };
        expect_matrix(&output, n_embd, n_vocab)?;

        // Each layer has at least 9 tensors (2 norms, 7 projections): a block
        // count the tensor index cannot back is an error before any allocation.
        let most_layers = g.tensors.len() / 9;
        if n_layers == 0 || n_layers > most_layers {
            return Err(Error::gguf(
                GgufErrorKind::Model,
                format!(
                    "{}: expected 1..={most_layers} layers (the file has {} tensors, 9 or more \
                 per layer), found {n_layers}",
                    key("block_count"),
                    g.tensors.len()
                ),
            ));
        }
        let mut layers = Vec::with_capacity(n_layers);
        for i in 0..n_layers {
            let m = |name: &str, cols: usize, rows: usize| -> Result<TensorInfo> {
                let t = g.require_tensor(&format!("blk.{i}.{name}.weight"))?;
                expect_matrix(t, cols, rows)?;
                Ok(t.clone())
            };
            let bias = |name: &str, len: usize| -> Result<Option<TensorInfo>> {
                let full = format!("blk.{i}.{name}.bias");
                match g.tensor(&full) {
                    Some(_) => expect_vector(g, &full, len).map(Some),
                    None => Ok(None),
                }
            };
            layers.push(LayerWeights {
                attn_norm: expect_vector(g, &format!("blk.{i}.attn_norm.weight"), n_embd)?,
                wq: m("attn_q", n_embd, n_embd)?,
                wk: m("attn_k", n_embd, kv_dim)?,
                wv: m("attn_v", n_embd, kv_dim)?,
                bq: bias("attn_q", n_embd)?,
                bk: bias("attn_k", kv_dim)?,
                bv: bias("attn_v", kv_dim)?,
                wo: m("attn_output", n_embd, n_embd)?,
                ffn_norm: expect_vector(g, &format!("blk.{i}.ffn_norm.weight"), n_embd)?,
                gate: m("ffn_gate", n_embd, n_ff)?,
                up: m("ffn_up", n_embd, n_ff)?,
                down: m("ffn_down", n_ff, n_embd)?,
            });
        }
        let file_type = layers
            .first()
            .map(|l| l.wq.ggml_type)
            .unwrap_or(token_embd.ggml_type);
        let info = ModelInfo {
            architecture: arch,
            name: g.opt_value::<&str>("general.name")?.map(str::to_string),
            id,
            file_size,
            n_layers,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_vocab,
            n_ctx_train,
            rms_eps,
            rope_freq_base,
            rope_freq_scale,
            rope_kind,
            tied_output,
            file_type,
        };
        let weights = Weights {
            token_embd,
            output_norm,
            output,
            layers,
        };
        Ok((info, weights))
    }
}

fn expect_matrix(t: &TensorInfo, cols: usize, rows: usize) -> Result<()> {
    let found: Vec<String> = t.dims.iter().map(u64::to_string).collect();
    if t.dims.len() != 2 || t.dims[0] != cols as u64 || t.dims[1] != rows as u64 || rows == 0 {
        return Err(Error::gguf(
            GgufErrorKind::Model,
            format!(
                "tensor {}: expected {cols}x{rows}, found {}",
                t.name,
                found.join("x")
            ),
        ));
    }
    if !MATRIX_TYPES.contains(&t.ggml_type) {
        return Err(Error::Unsupported(format!(
            "tensor {}: type {} (supported: F32 F16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q2_K..Q6_K)",
            t.name,
            t.ggml_type.name()
        )));
    }
    Ok(())
}

fn expect_vector(g: &Gguf, name: &str, len: usize) -> Result<TensorInfo> {
    let t = g.require_tensor(name)?;
    let found: Vec<String> = t.dims.iter().map(u64::to_string).collect();
    if t.dims.len() != 1 || t.dims[0] != len as u64 {
        return Err(Error::gguf(
            GgufErrorKind::Model,
            format!("tensor {name}: expected {len}, found {}", found.join("x")),
        ));
    }
    if t.ggml_type != GgmlType::F32 {
        return Err(Error::Unsupported(format!(
            "tensor {name}: expected type F32, found {}",
            t.ggml_type.name()
        )));
    }
    Ok(t.clone())
}
