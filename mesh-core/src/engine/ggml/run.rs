//! [`Engine`] for [`GgmlEngine`]: embedding, layer ranges (fused, or step by
//! step with an external projector for private mode), the head, and the
//! session bookkeeping.

use super::*;
use crate::gguf::GgufErrorKind;

impl Engine for GgmlEngine {
    type Session = GgmlSession;

    fn compute_threads(&self) -> usize {
        self.n_threads()
    }

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
                Error::gguf(
                    GgufErrorKind::Truncated,
                    format!("token_embd.weight row {tok} is out of bounds"),
                )
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
                let q = g.input_f32(&q, &[n_embd as i64, n as i64]);
                let k = g.input_f32(&k, &[kv_dim as i64, n as i64]);
                let v = g.input_f32(&v, &[kv_dim as i64, n as i64]);
                let mut with_bias = |t, b: Option<Held>| match b {
                    Some(b) => {
                        let b = g.held(b);
                        g.add(t, b)
                    }
                    None => t,
                };
                let (q, k, v) = (
                    with_bias(q, lt.bq),
                    with_bias(k, lt.bk),
                    with_bias(v, lt.bv),
                );
                self.attention(g, kv, il, q, k, v, pos, n, inp_pos, kq_mask)
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
            .ok_or_else(|| {
                Error::gguf(
                    GgufErrorKind::Truncated,
                    format!("tensor {}: data out of bounds", info.name),
                )
            })?;
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
            let w = g.held(w);
            if self.options.exact {
                self.mat_mul(g, w, xt, ne[1] as usize)
            } else {
                g.mul_mat(w, xt)
            }
        })
    }
}
