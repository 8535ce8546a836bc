//! Building the llama graph: projections (with their LoRA paths), attention
//! over the KV cache, the layers, the embedding lookup and the head; and
//! computing a graph on the session's scratch buffers.

use crate::engine::placement::{placement_callback, Placement};
use crate::engine::GgmlErrorKind;
use std::time::{Duration, Instant};

use super::*;

/// CPU time this process has used (all threads), where the platform says.
fn process_cpu_time() -> Option<Duration> {
    #[cfg(unix)]
    {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid, writable timespec.
        let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
        (rc == 0).then(|| Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32))
    }
    #[cfg(not(unix))]
    {
        None
    }
}

impl GgmlEngine {
    /// Build and compute one graph; `build` returns the output tensor.
    pub(super) fn compute(
        &self,
        s: &mut Scratch,
        build: impl FnOnce(&mut Graph) -> T,
    ) -> Result<Vec<f32>> {
        let params = sys::ggml_init_params {
            mem_size: s.meta.len(),
            mem_buffer: s.meta.as_mut_ptr().cast(),
            no_alloc: true,
        };
        // SAFETY: `meta` outlives the context, which is freed before returning.
        let ctx = NonNull::new(unsafe { sys::ggml_init(params) }).ok_or_else(|| {
            Error::ggml(
                GgmlErrorKind::Alloc,
                "ggml_init failed for the compute context",
            )
        })?;
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
                    return Err(Error::ggml(
                        GgmlErrorKind::Alloc,
                        "could not allocate the compute graph",
                    ));
                }
                for (t, bytes) in &g.inputs {
                    debug_assert_eq!(sys::ggml_nbytes(*t), bytes.len());
                    ptr::copy_nonoverlapping(bytes.as_ptr(), (**t).data.cast::<u8>(), bytes.len());
                }
                // A graph's shape for the thread policy: its node count and
                // the size of its first input (tokens or hidden rows).
                let shape = (
                    (*gf).n_nodes as usize,
                    g.inputs.first().map_or(0, |i| i.1.len()),
                );
                let threads = self
                    .thread_policy()
                    .choose(shape, s.n_threads, Instant::now());
                let mut plan = sys::ggml_graph_plan(gf, threads as i32);
                if plan.work_size > s.work.len() {
                    s.work.resize(plan.work_size, 0);
                }
                plan.work_data = s.work.as_mut_ptr();
                // Every thread calls this first (see `placement`); it lives
                // until the compute returns.
                let placement = (threads > 1).then(|| Placement::new(threads));
                if let Some(p) = &placement {
                    plan.abort_callback = Some(placement_callback);
                    plan.abort_callback_data = p as *const Placement as *mut c_void;
                }
                let started = Instant::now();
                let cpu_started = process_cpu_time();
                let status = sys::ggml_graph_compute(gf, &mut plan);
                let cpu = process_cpu_time()
                    .zip(cpu_started)
                    .map(|(end, start)| end.saturating_sub(start));
                let now = Instant::now();
                self.thread_policy()
                    .record(shape, threads, s.n_threads, now - started, cpu, now);
                if status != sys::ggml_status_GGML_STATUS_SUCCESS {
                    return Err(Error::ggml(
                        GgmlErrorKind::Compute,
                        format!("graph compute failed with status {status}"),
                    ));
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
    pub(super) unsafe fn mat_mul(&self, g: &mut Graph, w: T, x: T, n: usize) -> T {
        // SAFETY: the caller upholds this function's safety contract (its
        // `# Safety` section or the documented invariants it is called under).
        unsafe {
            let ctx = g.ctx;
            let (cols, rows) = ((*w).ne[0] as usize, (*w).ne[1] as usize);
            let exact = self.options.exact;
            let use_kernel = (exact || (self.options.custom_gemm && n >= 2))
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
                let q8_0_shapes = (*w).type_ == sys::ggml_type_GGML_TYPE_Q8_0
                    && (*w).ne[2] == 1
                    && (*w).ne[3] == 1
                    && sys::ggml_is_contiguous(w)
                    && (*x).type_ == sys::ggml_type_GGML_TYPE_F32
                    && (*x).ne[0] as usize == cols
                    && (*x).ne[2] == 1
                    && (*x).ne[3] == 1
                    && (*x).nb[0] == 4
                    && q8_0::fits(cols);
                // Exact mode: the exactly rounded product. Otherwise one token
                // through Q8_0 weights (the tied output head) gets ggml's
                // result from a faster kernel (see `q8_0::gemv_op`).
                let q8_0_op: sys::ggml_custom3_op_t = if !q8_0_shapes {
                    None
                } else if exact {
                    Some(q8_0::exact_gemm_op)
                } else if self.options.custom_gemm
                    && n == 1
                    && (*x).ne[1] == 1
                    && q8_0::gemv_available()
                {
                    Some(q8_0::gemv_op)
                } else {
                    None
                };
                if q8_0_op.is_some() {
                    // The custom op's result takes the shape of its first argument.
                    let shape = g.shape_3d(rows as i64, (*x).ne[1], 1);
                    return sys::ggml_map_custom3(
                        ctx,
                        shape,
                        w,
                        x,
                        q8_0_op,
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
                    let xq = sys::ggml_map_custom1(
                        ctx,
                        x,
                        Some(q4_1::quantize_op),
                        N_TASKS_MAX,
                        userdata,
                    );
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
    }

    /// `w · cur` plus each adapter's `s · B (A cur)` for `projection` of `layer`,
    /// built as llama.cpp's `build_lora_mm` builds it (same ops, same order).
    ///
    /// # Safety
    /// As [`GgmlEngine::mat_mul`]; the adapters were checked against this model.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn lora_mat_mul(
        &self,
        g: &mut Graph,
        adapters: &[ActiveLora],
        layer: usize,
        projection: Projection,
        w: T,
        cur: T,
        n: usize,
    ) -> T {
        // SAFETY: the caller upholds this function's safety contract (its
        // `# Safety` section or the documented invariants it is called under).
        unsafe {
            let res = self.mat_mul(g, w, cur, n);
            self.add_adapters(g, adapters, layer, projection, res, cur)
        }
    }

    /// `res` plus each adapter's `s · B (A cur)` for `projection` of `layer`,
    /// in order (see [`GgmlEngine::lora_add`]).
    ///
    /// # Safety
    /// As [`GgmlEngine::lora_add`].
    pub(super) unsafe fn add_adapters(
        &self,
        g: &mut Graph,
        adapters: &[ActiveLora],
        layer: usize,
        projection: Projection,
        mut res: T,
        cur: T,
    ) -> T {
        // SAFETY: the caller upholds this function's safety contract (its
        // `# Safety` section or the documented invariants it is called under).
        unsafe {
            for act in adapters {
                if let Some(pair) = act.adapter.pair(layer, projection) {
                    res = self.lora_add(g, res, act, pair, cur);
                }
            }
            res
        }
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
    pub(super) unsafe fn lora_add(
        &self,
        g: &mut Graph,
        res: T,
        act: &ActiveLora,
        pair: &LoraPair,
        cur: T,
    ) -> T {
        // SAFETY: the caller upholds this function's safety contract (its
        // `# Safety` section or the documented invariants it is called under).
        unsafe {
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
            let order = if !self.options.exact && cpu_class() == CpuClass::Avx512 {
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
    }

    /// Positions and the causal mask of `n` tokens at `pos`, as graph inputs.
    pub(super) fn position_inputs(&self, g: &mut Graph, pos: usize, n: usize) -> (T, T) {
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
    pub(super) unsafe fn attention(
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
        // SAFETY: the caller upholds this function's safety contract (its
        // `# Safety` section or the documented invariants it is called under).
        unsafe {
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
            let v_t =
                sys::ggml_transpose(ctx, sys::ggml_reshape_2d(ctx, v, kv_dim as i64, n as i64));
            let v_dst =
                sys::ggml_view_2d(ctx, vc, n as i64, kv_dim as i64, v_esz * s.cap, v_esz * pos);
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
                let h =
                    sys::ggml_new_tensor_3d(ctx, sys::ggml_type_GGML_TYPE_F16, ne[0], ne[1], ne[2]);
                sys::ggml_cpy(ctx, t, h)
            };
            let exact = self.options.exact;
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
    }

    /// The transformer layers `layers` on `x` (`n` tokens at `pos`), appending K/V.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn build_layers(
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
        let (inp_pos, kq_mask) = self.position_inputs(g, pos, n);
        // SAFETY: all shapes below follow from the validated model hyper-parameters
        // and the checked `pos + n <= n_ctx`; views stay inside the KV tensors.
        unsafe {
            for il in layers {
                let (q, k, v) = self.build_qkv(g, adapters, il, x, n);
                let attn = self.attention(g, s, il, q, k, v, pos, n, inp_pos, kq_mask);
                x = self.build_rest_of_layer(g, adapters, il, x, attn, n);
            }
        }
        x
    }

    /// `rms_norm(x) * weight`: the model's RMS norm with its learned scale.
    ///
    /// # Safety
    /// `x` is an `n_embd x n` F32 tensor of `ctx` and `weight` an `n_embd`
    /// vector of the model.
    pub(super) unsafe fn build_norm(&self, ctx: *mut sys::ggml_context, x: T, weight: T) -> T {
        // SAFETY: as this function's contract.
        unsafe { sys::ggml_mul(ctx, sys::ggml_rms_norm(ctx, x, self.info.rms_eps), weight) }
    }

    /// The attention inputs of layer `il` for `x` (`n` tokens): the norm, then
    /// the Q, K and V projections with their biases.
    ///
    /// # Safety
    /// `x` is an `n_embd x n` F32 tensor of this graph; the adapters were
    /// checked against this model.
    pub(super) unsafe fn build_qkv(
        &self,
        g: &mut Graph,
        adapters: &[ActiveLora],
        il: usize,
        x: T,
        n: usize,
    ) -> (T, T, T) {
        // SAFETY: as this function's contract; shapes from the validated model.
        unsafe {
            let ctx = g.ctx;
            let lt = &self.tensors.layers[il];
            let cur = self.build_norm(ctx, x, lt.attn_norm);
            let with_bias = |t: T, b: Option<T>| match b {
                Some(b) => sys::ggml_add(ctx, t, b),
                None => t,
            };
            let mut mm = |p: Projection, w: T| self.lora_mat_mul(g, adapters, il, p, w, cur, n);
            (
                with_bias(mm(Projection::Q, lt.wq), lt.bq),
                with_bias(mm(Projection::K, lt.wk), lt.bk),
                with_bias(mm(Projection::V, lt.wv), lt.bv),
            )
        }
    }

    /// The rest of layer `il` after attention: the output projection of
    /// `attn` added to `x`, then the feed-forward block (norm, SwiGLU, down
    /// projection) added to that.
    ///
    /// # Safety
    /// `x` and `attn` are `n_embd x n` F32 tensors of this graph; the
    /// adapters were checked against this model.
    pub(super) unsafe fn build_rest_of_layer(
        &self,
        g: &mut Graph,
        adapters: &[ActiveLora],
        il: usize,
        x: T,
        attn: T,
        n: usize,
    ) -> T {
        // SAFETY: as this function's contract; shapes from the validated model.
        unsafe {
            let ctx = g.ctx;
            let lt = &self.tensors.layers[il];
            let mm = |g: &mut Graph, p: Projection, w: T, cur: T| {
                self.lora_mat_mul(g, adapters, il, p, w, cur, n)
            };
            let x = sys::ggml_add(ctx, mm(g, Projection::O, lt.wo, attn), x);
            let cur = self.build_norm(ctx, x, lt.ffn_norm);
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
            sys::ggml_add(ctx, mm(g, Projection::Down, lt.down, act), x)
        }
    }

    /// Final norm and output projection of `x` (`n` tokens).
    pub(super) fn build_head(
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
            let mut cur = self.build_norm(ctx, x, self.tensors.output_norm);
            if which == Logits::Last && n > 1 {
                let nb1 = (*cur).nb[1];
                cur = sys::ggml_view_2d(ctx, cur, self.info.n_embd as i64, 1, nb1, nb1 * (n - 1));
            }
            let n_out = (*cur).ne[1] as usize;
            // Exact accumulation covers the output head too (Q8_0 here); in the
            // default mode a single token's head runs `q8_0::gemv_op`.
            let res = self.mat_mul(g, self.tensors.output, cur, n_out);
            self.add_adapters(g, adapters, 0, Projection::Output, res, cur)
        }
    }

    pub(super) fn build_embed(&self, g: &mut Graph, tokens: &[u32]) -> T {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let inp = g.input_i32(&ids);
        // SAFETY: ids were checked against n_vocab by the caller.
        unsafe { sys::ggml_get_rows(g.ctx, self.tensors.token_embd, inp) }
    }
}

/// Graph capacity for `n_layers` layers with `n_adapters` LoRA adapters
/// (each adds up to four nodes per projection).
pub(super) fn max_nodes(n_layers: usize, n_adapters: usize) -> usize {
    1024 + (64 + 32 * n_adapters) * (n_layers + 1)
}

/// Bytes of graph metadata for `nodes` nodes.
pub(super) fn meta_bytes(nodes: usize) -> usize {
    // SAFETY: pure size computations.
    unsafe { sys::ggml_tensor_overhead() * nodes + sys::ggml_graph_overhead_custom(nodes, false) }
}

/// A graph under construction and the input data to copy in once it is allocated.
pub(super) struct Graph {
    pub(super) ctx: *mut sys::ggml_context,
    pub(super) gf: *mut sys::ggml_cgraph,
    pub(super) inputs: Vec<(T, Vec<u8>)>,
    /// Activations already quantized for the Q4_1 kernel: (F32 input, exact mode,
    /// Q8_1 node).
    pub(super) quantized: Vec<(T, bool, T)>,
    /// Userdata of this graph's [`lora_add_op`] nodes (freed with the graph;
    /// boxed so their addresses stay put while the list grows).
    #[allow(clippy::vec_box)]
    pub(super) lora_calls: Vec<Box<LoraCall>>,
    /// Shape source for custom ops' outputs, and its capacity in floats.
    pub(super) shape: Option<(T, usize)>,
}

impl Graph {
    /// An F32 `[ne0, ne1, ne2]` tensor that only gives a custom op its output
    /// shape: a view of one tensor per graph that nothing reads or writes, grown
    /// (replaced) when a larger shape is asked for.
    ///
    /// # Safety
    /// The sizes are positive and their product fits in memory.
    pub(super) unsafe fn shape_3d(&mut self, ne0: i64, ne1: i64, ne2: i64) -> T {
        // SAFETY: the caller upholds this function's safety contract (its
        // `# Safety` section or the documented invariants it is called under).
        unsafe {
            let elems = (ne0 * ne1 * ne2) as usize;
            let (t, cap) = match self.shape {
                Some((t, cap)) if cap >= elems => (t, cap),
                _ => {
                    let t = sys::ggml_new_tensor_1d(
                        self.ctx,
                        sys::ggml_type_GGML_TYPE_F32,
                        elems as i64,
                    );
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
    }

    pub(super) fn input_i32(&mut self, data: &[i32]) -> T {
        // SAFETY: a new 1-d tensor in this graph's context.
        let t = unsafe {
            sys::ggml_new_tensor_1d(self.ctx, sys::ggml_type_GGML_TYPE_I32, data.len() as i64)
        };
        let bytes = data.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.mark_input(t, bytes)
    }

    pub(super) fn input_f32(&mut self, data: &[f32], ne: &[i64]) -> T {
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

    pub(super) fn mark_input(&mut self, t: T, bytes: Vec<u8>) -> T {
        // SAFETY: `t` is a fresh tensor of this context.
        unsafe { sys::ggml_set_input(t) };
        self.inputs.push((t, bytes));
        t
    }
}
