//! Loading a [`GgmlEngine`]: the GGUF file is checked to be a regular file,
//! memory-mapped read-only and parsed (model info, tokenizer, chat template),
//! and every weight gets a ggml tensor whose data points straight into the
//! mapping, after its bounds and size are checked against the file.

use std::ffi::CString;
use std::fs::File;

use super::*;
use crate::engine::model::RopeKind;
use crate::engine::ModelId;
use crate::gguf::Gguf;

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

impl GgmlEngine {
    /// Memory-map and validate a GGUF model, using `n_threads` compute threads
    /// (0 = the idle cores, see [`default_threads`]; more than the cores is an
    /// error) and the other [`EngineOptions`] at their defaults.
    pub fn load(path: impl AsRef<Path>, n_threads: usize) -> Result<GgmlEngine> {
        Self::load_with(path, &EngineOptions::new().threads(n_threads))
    }

    /// Memory-map and validate a GGUF model that computes as `options` say.
    pub fn load_with(path: impl AsRef<Path>, options: &EngineOptions) -> Result<GgmlEngine> {
        let path = path.as_ref();
        if options.exact && !q4_1::available() {
            return Err(Error::Unsupported(
                "exact accumulation needs an x86-64 CPU with AVX2, FMA and F16C".into(),
            ));
        }
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
        Self::from_mmap(mmap, options)
    }

    fn from_mmap(mmap: Mmap, options: &EngineOptions) -> Result<GgmlEngine> {
        let gguf = Gguf::parse(&mmap)?;
        let id = ModelId(*blake3::hash(&mmap).as_bytes());
        let (info, weights) = ModelInfo::from_gguf(&gguf, id, mmap.len() as u64)?;
        let tokenizer = Tokenizer::from_gguf(&gguf)?;
        if tokenizer.n_vocab() != info.n_vocab {
            return Err(Error::gguf(
                GgufErrorKind::Model,
                format!(
                    "vocabulary: expected {} tokens (rows of token_embd.weight), found {}",
                    info.n_vocab,
                    tokenizer.n_vocab()
                ),
            ));
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
        let n_threads = resolve_threads(options.threads)?;
        let options = EngineOptions {
            threads: n_threads,
            custom_gemm: options.custom_gemm && q4_1::available(),
            ..*options
        };
        let mut policy = crate::engine::threads::ThreadPolicy::new(n_threads);
        policy.set_adaptive(options.adaptive_threads);
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
            options,
            rope,
            batcher: batch::Batcher::default(),
            threads: std::sync::Mutex::new(policy),
            mmap,
        })
    }
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
    let ctx = NonNull::new(unsafe { sys::ggml_init(params) }).ok_or_else(|| {
        Error::ggml(
            GgmlErrorKind::Alloc,
            "ggml_init failed for the weight context",
        )
    })?;
    // Owns the context from here on (freed on drop, also on an error below).
    let guard = ContextGuard(ctx);
    let base = mmap.as_ptr();
    let file_len = mmap.len() as u64;
    let mut mk = |info: &TensorInfo| -> Result<Held> {
        let end = info.offset.checked_add(info.size);
        if end.is_none_or(|e| e > file_len) {
            return Err(Error::gguf(
                GgufErrorKind::Truncated,
                format!("tensor {}: data lies past the end of the file", info.name),
            ));
        }
        let ne: Vec<i64> = info.dims.iter().map(|&d| d as i64).collect();
        // SAFETY: the tensor's metadata lives in `ctx`; its data pointer is set to
        // the validated, in-bounds range of the read-only mapping, which outlives
        // the tensor (WeightTensors drops before the Mmap in GgmlEngine), and
        // graphs read the weights within a borrow of the engine.
        unsafe {
            let t = sys::ggml_new_tensor(
                ctx.as_ptr(),
                ggml_type(info.ggml_type),
                ne.len() as i32,
                ne.as_ptr(),
            );
            let Some(held) = Held::new(t) else {
                return Err(Error::ggml(
                    GgmlErrorKind::Alloc,
                    format!("tensor {}: no room in the weight context", info.name),
                ));
            };
            if sys::ggml_nbytes(t) as u64 != info.size {
                return Err(Error::gguf(
                    GgufErrorKind::BadTensor,
                    format!(
                        "tensor {}: expected {} bytes, ggml computes {}",
                        info.name,
                        info.size,
                        sys::ggml_nbytes(t)
                    ),
                ));
            }
            (*t).data = base.add(info.offset as usize) as *mut c_void;
            if let Ok(name) = CString::new(info.name.as_str()) {
                sys::ggml_set_name(t, name.as_ptr());
            }
            Ok(held)
        }
    };
    let (token_embd, output_norm, output) =
        (mk(&w.token_embd)?, mk(&w.output_norm)?, mk(&w.output)?);
    let mut layers = Vec::with_capacity(w.layers.len());
    for l in &w.layers {
        let opt = |b: &Option<TensorInfo>, mk: &mut dyn FnMut(&TensorInfo) -> Result<Held>| {
            b.as_ref().map(mk).transpose()
        };
        let bq = opt(&l.bq, &mut mk)?;
        let bk = opt(&l.bk, &mut mk)?;
        let bv = opt(&l.bv, &mut mk)?;
        layers.push(LayerTensors {
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
    Ok(WeightTensors {
        ctx: guard.release(),
        token_embd,
        output_norm,
        output,
        layers,
    })
}

/// Frees a weight context unless it was handed on ([`ContextGuard::release`]).
struct ContextGuard(NonNull<sys::ggml_context>);

impl ContextGuard {
    fn release(self) -> NonNull<sys::ggml_context> {
        let ctx = self.0;
        std::mem::forget(self);
        ctx
    }
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        // SAFETY: a context from ggml_init that nothing else frees.
        unsafe { sys::ggml_free(self.0.as_ptr()) }
    }
}
