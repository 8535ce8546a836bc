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
        build: impl for<'g> FnOnce(&mut Graph<'g>) -> Tensor<'g>,
    ) -> Result<Vec<f32>> {
        let Scratch {
            n_threads,
            nodes,
            galloc,
            meta,
            work,
        } = s;
        Graph::scope(meta, *nodes, |g| {
            let out = build(g);
            g.set_output(out);
            let (_, gf) = g.raw_parts();
            // SAFETY: every tensor was created in the graph's context through
            // its checked ops; the allocator places the intermediates, then
            // the inputs receive exactly their bytes (`Graph::mark_input`
            // checked each size).
            unsafe {
                if !ggml_gallocr_alloc_graph(galloc.as_ptr(), gf) {
                    return Err(Error::ggml(
                        GgmlErrorKind::Alloc,
                        "could not allocate the compute graph",
                    ));
                }
                for (t, bytes) in &g.inputs {
                    ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        (*t.raw()).data.cast::<u8>(),
                        bytes.len(),
                    );
                }
            }
            // A graph's shape for the thread policy: its node count and
            // the size of its first input (tokens or hidden rows).
            // SAFETY: reads the node count of a live graph.
            let shape = (
                unsafe { (*gf).n_nodes } as usize,
                g.inputs.first().map_or(0, |i| i.1.len()),
            );
            let threads = self
                .thread_policy()
                .choose(shape, *n_threads, Instant::now());
            // SAFETY: plans a live graph; the work buffer is sized to the plan
            // and outlives the computation; the placement (every thread
            // calls its callback first) lives until the compute returns.
            unsafe {
                let mut plan = sys::ggml_graph_plan(gf, threads as i32);
                if plan.work_size > work.len() {
                    work.resize(plan.work_size, 0);
                }
                plan.work_data = work.as_mut_ptr();
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
                    .record(shape, threads, *n_threads, now - started, cpu, now);
                if status != sys::ggml_status_GGML_STATUS_SUCCESS {
                    return Err(Error::ggml(
                        GgmlErrorKind::Compute,
                        format!("graph compute failed with status {status}"),
                    ));
                }
                let n = out.nelements() as usize;
                let mut v = vec![0f32; n];
                ptr::copy_nonoverlapping((*out.raw()).data.cast::<f32>(), v.as_mut_ptr(), n);
                Ok(v)
            }
        })
    }

    /// `w · x` for a weight `w` (`[cols, rows]`) and `x` (F32 `[cols, n]`): with the
    /// tiled kernel of [`q4_1`] for Q4_1 weights and batches, the exact or
    /// single-token kernels of [`q8_0`] for Q8_0 ones, else ggml's `mul_mat`.
    pub(super) fn mat_mul<'g>(
        &self,
        g: &mut Graph<'g>,
        w: Tensor<'g>,
        x: Tensor<'g>,
        n: usize,
    ) -> Tensor<'g> {
        let (wn, xn) = (w.ne(), x.ne());
        let (cols, rows) = (wn[0] as usize, wn[1] as usize);
        let exact = self.options.exact;
        let use_kernel = (exact || (self.options.custom_gemm && n >= 2))
            && w.ty() == sys::ggml_type_GGML_TYPE_Q4_1
            && w.is_2d()
            && x.is_f32()
            && x.is_contiguous()
            && xn[0] as usize == cols
            && xn[1] as usize == n
            && x.is_2d()
            && q4_1::fits(cols, n);
        if !use_kernel {
            let q8_0_shapes = w.ty() == sys::ggml_type_GGML_TYPE_Q8_0
                && w.is_2d()
                && w.is_contiguous()
                && x.is_f32()
                && xn[0] as usize == cols
                && x.is_2d()
                && x.nb()[0] == 4
                && q8_0::fits(cols);
            // Exact mode: the exactly rounded product. Otherwise one token
            // through Q8_0 weights (the tied output head) gets ggml's
            // result from a faster kernel (see `q8_0::gemv_op`).
            let q8_0_op: sys::ggml_custom3_op_t = if !q8_0_shapes {
                None
            } else if exact {
                Some(q8_0::exact_gemm_op)
            } else if self.options.custom_gemm && n == 1 && xn[1] == 1 && q8_0::gemv_available() {
                Some(q8_0::gemv_op)
            } else {
                None
            };
            if q8_0_op.is_some() {
                // The custom op's result takes the shape of its first argument.
                let shape = g.shape_3d(rows as i64, xn[1], 1);
                // SAFETY: the ops' contract: Q8_0 `w` contiguous `[cols, rows]`,
                // F32 `x` `[cols, n]` with packed rows, `fits` and (for the
                // one-token op) `gemv_available`, all checked above.
                return unsafe { g.custom3(shape, w, x, q8_0_op, ptr::null_mut()) };
            }
            return g.mul_mat(w, x);
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
                // SAFETY: the op's contract: contiguous F32 `[cols, n]` with
                // `cols % 32 == 0` (part of `fits`), checked above.
                let xq = unsafe { g.custom1(x, Some(q4_1::quantize_op), userdata) };
                g.quantized.push((x, exact, xq));
                xq
            }
        };
        // The custom op's result takes the shape of its first argument.
        let shape = g.shape_3d(rows as i64, n as i64, 1);
        // SAFETY: the op's contract: Q4_1 `w` `[cols, rows]`, `xq` the
        // quantized `x` of `n` tokens, `fits` checked above.
        unsafe { g.custom3(shape, w, xq, Some(q4_1::gemm_op), userdata) }
    }

    /// `w · cur` plus each adapter's `s · B (A cur)` for `projection` of `layer`,
    /// built as llama.cpp's `build_lora_mm` builds it (same ops, same order).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn lora_mat_mul<'g>(
        &self,
        g: &mut Graph<'g>,
        adapters: &[ActiveLora],
        layer: usize,
        projection: Projection,
        w: Held,
        cur: Tensor<'g>,
        n: usize,
    ) -> Tensor<'g> {
        let w = g.held(w);
        let res = self.mat_mul(g, w, cur, n);
        self.add_adapters(g, adapters, layer, projection, res, cur)
    }

    /// [`lora_mat_mul`](Self::lora_mat_mul) for projections that all read
    /// `cur`: for one token as fused nodes where every part allows it (see
    /// [`crate::engine::fused`]), else one by one.
    pub(super) fn lora_mat_muls<'g, const N: usize>(
        &self,
        g: &mut Graph<'g>,
        adapters: &[ActiveLora],
        layer: usize,
        items: [(Projection, Held); N],
        cur: Tensor<'g>,
        n: usize,
    ) -> [Tensor<'g>; N] {
        if let Some(out) = self.fused_lora_mat_muls(g, adapters, layer, &items, cur, n) {
            return out;
        }
        items.map(|(p, w)| self.lora_mat_mul(g, adapters, layer, p, w, cur, n))
    }

    /// The fused form of [`lora_mat_muls`](Self::lora_mat_muls), or `None`
    /// (nothing built) unless: one token, not exact mode, the custom kernels
    /// on, ggml's Q4_1 row functions usable, contiguous Q4_1 weights of
    /// `cur`'s width (a multiple of 32), and every adapter pair of these
    /// projections of matching shapes, F32 or (where ggml's F16 sums can be
    /// reproduced, [`RowFns::fuses_f16`](crate::engine::fused::RowFns::fuses_f16)) F16.
    fn fused_lora_mat_muls<'g, const N: usize>(
        &self,
        g: &mut Graph<'g>,
        adapters: &[ActiveLora],
        layer: usize,
        items: &[(Projection, Held); N],
        cur: Tensor<'g>,
        n: usize,
    ) -> Option<[Tensor<'g>; N]> {
        use crate::engine::fused::{self, Half, Prep, PrepA, Product, ProductPair, RowFns};
        static FNS: std::sync::OnceLock<Option<RowFns>> = std::sync::OnceLock::new();
        if n != 1 || self.options.exact || !self.options.custom_gemm {
            return None;
        }
        let fns = (*FNS.get_or_init(RowFns::q4_1))?;
        let cn = cur.ne();
        let cols = cn[0] as usize;
        let token = cur.is_f32() && cur.is_contiguous() && cur.is_2d() && cn[1] == 1;
        if !token || !cols.is_multiple_of(32) {
            return None;
        }
        let order = lora_order(self.options.exact);
        let mut a = Vec::new();
        let mut products = Vec::with_capacity(N);
        let mut t_at = fused::q8_1_row_words(cols);
        for &(projection, w) in items {
            let w = g.held(w);
            let wn = w.ne();
            if w.ty() != sys::ggml_type_GGML_TYPE_Q4_1
                || !w.is_2d()
                || !w.is_contiguous()
                || wn[0] as usize != cols
            {
                return None;
            }
            let rows = wn[1] as usize;
            let mut pairs = Vec::new();
            for act in adapters {
                let Some(pair) = act.adapter.pair(layer, projection) else {
                    continue;
                };
                let (pa, pb) = (g.held(pair.a), g.held(pair.b));
                let (an, bn) = (pa.ne(), pb.ne());
                let (half, panels) = if pa.is_f32() && pb.is_f32() {
                    (Half::F32, pair.b_panels as *const c_void)
                } else if pa.ty() == sys::ggml_type_GGML_TYPE_F16
                    && pb.ty() == sys::ggml_type_GGML_TYPE_F16
                    && fns.fuses_f16(pair.rank, order)
                {
                    (Half::F16, pair.b_panels16 as *const c_void)
                } else {
                    return None;
                };
                let fits = pa.is_contiguous()
                    && pb.is_contiguous()
                    && !panels.is_null()
                    && an[0] as usize == cols
                    && an[1] as usize == pair.rank
                    && bn[0] as usize == pair.rank
                    && bn[1] as usize == rows;
                if !fits {
                    return None;
                }
                a.push(PrepA {
                    a: pair.a.data() as *const c_void,
                    rank: pair.rank,
                    half,
                });
                pairs.push(ProductPair {
                    b: pair.b.data() as *const c_void,
                    b_panels: panels,
                    rank: pair.rank,
                    half,
                    scale: act.adapter.effective_scale(act.scale, pair.rank),
                    t_at,
                });
                t_at += pair.rank;
            }
            products.push((w, rows, pairs));
        }
        let prep = Prep {
            fns,
            cols,
            order,
            a,
        };
        let shape = g.shape_3d(prep.words() as i64, 1, 1);
        let userdata = g.keep(Box::new(prep));
        // SAFETY: the op's contract: `cur` contiguous F32 `[cols, 1]` with
        // `cols % 32 == 0`, the output `Prep::words` long, and each A an F32
        // or F16 `[cols, rank]` tensor of an adapter the graph borrows, F16
        // only where `fuses_f16` (checked above).
        let prep = unsafe { g.custom2(shape, cur, Some(fused::prep_op), userdata) };
        let out: Vec<Tensor<'g>> = products
            .into_iter()
            .map(|(w, rows, pairs)| {
                let shape = g.shape_3d(rows as i64, 1, 1);
                let userdata = g.keep(Box::new(Product { fns, order, pairs }));
                // SAFETY: the op's contract: `w` contiguous Q4_1 `[cols, rows]`,
                // `prep` the prep output of a token of `cols` values, each
                // pair's B `[rank, rows]` of its `half` type with its panels and its `t` in
                // `prep` (checked and laid out above).
                unsafe { g.custom3(shape, w, prep, Some(fused::product_op), userdata) }
            })
            .collect();
        out.try_into().ok()
    }

    /// `res` plus each adapter's `s · B (A cur)` for `projection` of `layer`,
    /// in order (see [`GgmlEngine::lora_add`]). The adapters were checked
    /// against this model at load, and `adapters` borrows them for the
    /// graph's life.
    pub(super) fn add_adapters<'g>(
        &self,
        g: &mut Graph<'g>,
        adapters: &[ActiveLora],
        layer: usize,
        projection: Projection,
        mut res: Tensor<'g>,
        cur: Tensor<'g>,
    ) -> Tensor<'g> {
        for act in adapters {
            if let Some(pair) = act.adapter.pair(layer, projection) {
                res = self.lora_add(g, res, act, pair, cur);
            }
        }
        res
    }

    /// `res + s · B (A cur)` for one adapter pair, as one [`lora_add_op`]
    /// node, which sums each product as llama.cpp's CPU backend of this
    /// machine's SIMD class does (for F32 halves its tiled F32 kernel or
    /// `ggml_vec_dot_f32`; for F16 halves, with the custom kernels on, those
    /// of the ggml this crate links, see [`crate::engine::fused`]); in exact
    /// mode always the AVX2 order, so results do not depend on the CPU.
    /// Other pairs use ggml's `mul_mat`, `scale`, `add`.
    pub(super) fn lora_add<'g>(
        &self,
        g: &mut Graph<'g>,
        res: Tensor<'g>,
        act: &ActiveLora,
        pair: &LoraPair,
        cur: Tensor<'g>,
    ) -> Tensor<'g> {
        let scale = act.adapter.effective_scale(act.scale, pair.rank);
        let order = lora_order(self.options.exact);
        let (a, b) = (g.held(pair.a), g.held(pair.b));
        let (an, bn, cn, rn) = (a.ne(), b.ne(), cur.ne(), res.ne());
        // The shapes the op reads: A `[cols, rank]`, B `[rank, rows]`
        // (checked against the model at load), `cur` `[cols, n]` and `res`
        // `[rows, n]`, contiguous F32.
        let shapes = cur.is_f32()
            && res.is_f32()
            && cur.is_contiguous()
            && res.is_contiguous()
            && cur.is_2d()
            && res.is_2d()
            && rn[1] == cn[1]
            && an[0] == cn[0]
            && an[1] == bn[0]
            && bn[1] == rn[0]
            && an[1] as usize == pair.rank;
        let f16 = a.ty() == sys::ggml_type_GGML_TYPE_F16 && b.ty() == sys::ggml_type_GGML_TYPE_F16;
        let halves = if a.is_f32() && b.is_f32() && !pair.b_panels.is_null() {
            Some((None, pair.b_panels as *const std::ffi::c_void))
        } else if f16 && self.options.custom_gemm && !pair.b_panels16.is_null() {
            // In exact mode only where no product needs ggml's own F16
            // `vec_dot` of a long row, which differs between SIMD classes.
            let cols_ok = !self.options.exact || (an[0] as usize).is_multiple_of(order.lanes());
            crate::engine::fused::F16Fns::get()
                .filter(|f| f.fuses(pair.rank, order) && cols_ok)
                .map(|f| (Some(f), pair.b_panels16 as *const std::ffi::c_void))
        } else {
            None
        };
        let Some((f16, b_panels)) = halves.filter(|_| shapes) else {
            let ac = g.mul_mat(a, cur);
            let ab = g.mul_mat(b, ac);
            let scaled = g.scale(ab, scale);
            return g.add(res, scaled);
        };
        let userdata = g.keep(Box::new(LoraCall {
            a: a.raw(),
            b: b.raw(),
            b_panels,
            f16,
            scale,
            order,
        }));
        // SAFETY: the op's contract: shapes and types checked above,
        // `b_panels` the adapter's B in panels (`rank x rows`) of B's type,
        // `f16` set exactly for F16 halves, and the call kept by the graph,
        // which outlives its computation.
        unsafe { g.custom2(res, cur, Some(lora_add_op), userdata) }
    }

    /// Positions and the causal mask of `n` tokens at `pos`, as graph inputs.
    pub(super) fn position_inputs<'g>(
        &self,
        g: &mut Graph<'g>,
        pos: usize,
        n: usize,
    ) -> (Tensor<'g>, Tensor<'g>) {
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
    /// (`n_embd x n`), before the output projection. `q` is `n_embd x n`, `k`
    /// and `v` are `kv_dim x n` F32 tensors, `pos + n` was checked against
    /// the cache, and `inp_pos`/`kq_mask` come from `position_inputs`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn attention<'g>(
        &self,
        g: &mut Graph<'g>,
        s: &KvCache,
        il: usize,
        q: Tensor<'g>,
        k: Tensor<'g>,
        v: Tensor<'g>,
        pos: usize,
        n: usize,
        inp_pos: Tensor<'g>,
        kq_mask: Tensor<'g>,
    ) -> Tensor<'g> {
        let info = &self.info;
        let n_kv = kv_span(pos + n);
        let hd = info.head_dim as i64;
        let kv_dim = info.n_head_kv * info.head_dim;
        let kq_scale = 1.0 / (info.head_dim as f32).sqrt();
        let (Some(kc), Some(vc)) = (s.k[il], s.v[il]) else {
            panic!("attention: layer {il} has no KV cache (check_kv lets no such step through)");
        };
        let (kc, vc) = (g.held(kc), g.held(vc));
        let (k_esz, v_esz) = (kc.nb()[0], vc.nb()[0]);
        // Our RoPE rather than ggml's: the pinned ggml rounds the rotation
        // differently from current llama.cpp in rare elements.
        let rope = |g: &mut Graph<'g>, t: Tensor<'g>, heads: usize| {
            let t = g.reshape(t, &[hd, heads as i64, n as i64]);
            let positions = inp_pos.ne();
            assert!(
                t.is_f32() && positions[0] == n as i64 && inp_pos.is_contiguous(),
                "rope: {t:?} at {inp_pos:?}"
            );
            let params = &*self.rope as *const kernels::RopeParams as *mut c_void;
            // SAFETY: the op's contract: contiguous F32 `[head_dim, heads, n]`
            // (a reshape is contiguous), `n` contiguous I32 positions, and
            // the engine's RoPE parameters, which outlive the graph.
            unsafe { g.custom2(t, inp_pos, Some(kernels::rope_op), params) }
        };
        let q = rope(g, q, info.n_head);
        let k = rope(g, k, info.n_head_kv);

        // Append this batch's K (row per token) and V (transposed) to the cache.
        let k_dst = g.view(kc, &[(n * kv_dim) as i64], &[], k_esz * kv_dim * pos);
        let k_cpy = g.cpy(k, k_dst);
        g.expand(k_cpy);
        let v_2d = g.reshape(v, &[kv_dim as i64, n as i64]);
        let v_t = g.transpose(v_2d);
        let v_dst = g.view(
            vc,
            &[n as i64, kv_dim as i64],
            &[v_esz * s.cap],
            v_esz * pos,
        );
        let v_cpy = g.cpy(v_t, v_dst);
        g.expand(v_cpy);

        // Contiguous queries let ggml use its tiled (llamafile) F16 x F32 kernel for
        // K·Q instead of one dot product per pair: ~10% of prompt time. Rounded
        // to fp16 first, as current ggml converts them before its f16 x f16
        // kernel (same per-element order): K·Q is then bit-identical to it.
        //
        // One token (decode) is the exception, as in current llama.cpp: its
        // products are ggml's f16 dot products (queries and softmax weights
        // converted to f16 tensors, which routes ggml past the tiled kernel),
        // so a decode step computes what upstream's does.
        let to_f16 = |g: &mut Graph<'g>, t: Tensor<'g>| {
            let ne = t.ne();
            let h = g.new_tensor(sys::ggml_type_GGML_TYPE_F16, &ne[..3]);
            g.cpy(t, h)
        };
        let exact = self.options.exact;
        let qp = g.permute(q, [0, 2, 1, 3]);
        let qp = g.cont(qp, None);
        let qp = if exact {
            qp
        } else if n == 1 {
            to_f16(g, qp)
        } else {
            // SAFETY: the op's contract: contiguous F32 in and out (`cont`).
            unsafe { g.custom1(qp, Some(kernels::round_f16_op), ptr::null_mut()) }
        };
        let keys = g.view(
            kc,
            &[hd, n_kv as i64, info.n_head_kv as i64],
            &[k_esz * kv_dim, k_esz * info.head_dim],
            0,
        );
        // Exact mode: both products in a CPU-independent summation order (ggml's
        // own follow its vector width, which differs between AVX2 and AVX-512
        // builds), so exact results are bit-identical on every CPU.
        let product = |g: &mut Graph<'g>, a: Tensor<'g>, b: Tensor<'g>| {
            if !exact {
                return g.mul_mat(a, b);
            }
            let (an, bn) = (a.ne(), b.ne());
            assert!(
                a.ty() == sys::ggml_type_GGML_TYPE_F16
                    && a.nb()[0] == 2
                    && b.is_f32()
                    && b.is_contiguous()
                    && an[0] == bn[0]
                    && bn[2] % an[2] == 0,
                "exact product: {a:?} by {b:?}"
            );
            let shape = g.shape_3d(an[1], bn[1], bn[2]);
            // SAFETY: the op's contract: F16 `a` `[K, M, Ha]` with packed
            // elements, contiguous F32 `b` `[K, N, Hb]`, `Hb` a multiple of
            // `Ha` (checked just above), `dst` `[M, N, Hb]`.
            unsafe { g.custom3(shape, a, b, Some(kernels::dot_f16_op), ptr::null_mut()) }
        };
        let kq = product(g, keys, qp);
        let (kn, mn) = (kq.ne(), kq_mask.ne());
        assert!(
            kq.is_f32() && kq.is_contiguous() && kq_mask.is_contiguous() && mn[0] == kn[0],
            "soft_max: {kq:?} with mask {kq_mask:?}"
        );
        // SAFETY: the op's contract: contiguous F32 scores and a contiguous
        // F32 mask with rows as long (checked just above).
        let kq = unsafe {
            g.custom2(
                kq,
                kq_mask,
                Some(kernels::soft_max_op),
                kernels::scale_to_userdata(kq_scale),
            )
        };
        let values = g.view(
            vc,
            &[n_kv as i64, hd, info.n_head_kv as i64],
            &[v_esz * s.cap, v_esz * s.cap * info.head_dim],
            0,
        );
        let kq = if n == 1 && !exact { to_f16(g, kq) } else { kq };
        let kqv = product(g, values, kq);
        let merged = g.permute(kqv, [0, 2, 1, 3]);
        g.cont(merged, Some([info.n_embd as i64, n as i64]))
    }

    /// The transformer layers `layers` on `x` (`n` tokens at `pos`), appending K/V.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn build_layers<'g>(
        &self,
        g: &mut Graph<'g>,
        s: &KvCache,
        adapters: &[ActiveLora],
        layers: Range<usize>,
        mut x: Tensor<'g>,
        pos: usize,
        n: usize,
    ) -> Tensor<'g> {
        if layers.is_empty() {
            return x;
        }
        let (inp_pos, kq_mask) = self.position_inputs(g, pos, n);
        for il in layers {
            let (q, k, v) = self.build_qkv(g, adapters, il, x, n);
            let attn = self.attention(g, s, il, q, k, v, pos, n, inp_pos, kq_mask);
            x = self.build_rest_of_layer(g, adapters, il, x, attn, n);
        }
        x
    }

    /// `rms_norm(x) * weight`: the model's RMS norm with its learned scale.
    pub(super) fn build_norm<'g>(
        &self,
        g: &mut Graph<'g>,
        x: Tensor<'g>,
        weight: Tensor<'g>,
    ) -> Tensor<'g> {
        let normed = g.rms_norm(x, self.info.rms_eps);
        g.mul(normed, weight)
    }

    /// The attention inputs of layer `il` for `x` (`n` tokens, `n_embd x n`):
    /// the norm, then the Q, K and V projections with their biases.
    pub(super) fn build_qkv<'g>(
        &self,
        g: &mut Graph<'g>,
        adapters: &[ActiveLora],
        il: usize,
        x: Tensor<'g>,
        n: usize,
    ) -> (Tensor<'g>, Tensor<'g>, Tensor<'g>) {
        let lt = &self.tensors.layers[il];
        let norm = g.held(lt.attn_norm);
        let cur = self.build_norm(g, x, norm);
        let [q, k, v] = self.lora_mat_muls(
            g,
            adapters,
            il,
            [
                (Projection::Q, lt.wq),
                (Projection::K, lt.wk),
                (Projection::V, lt.wv),
            ],
            cur,
            n,
        );
        let mut bias = |t: Tensor<'g>, b: Option<Held>| match b {
            Some(b) => {
                let b = g.held(b);
                g.add(t, b)
            }
            None => t,
        };
        (bias(q, lt.bq), bias(k, lt.bk), bias(v, lt.bv))
    }

    /// The rest of layer `il` after attention: the output projection of
    /// `attn` added to `x`, then the feed-forward block (norm, SwiGLU, down
    /// projection) added to that. `x` and `attn` are `n_embd x n`.
    pub(super) fn build_rest_of_layer<'g>(
        &self,
        g: &mut Graph<'g>,
        adapters: &[ActiveLora],
        il: usize,
        x: Tensor<'g>,
        attn: Tensor<'g>,
        n: usize,
    ) -> Tensor<'g> {
        let lt = &self.tensors.layers[il];
        let [o] = self.lora_mat_muls(g, adapters, il, [(Projection::O, lt.wo)], attn, n);
        let x = g.add(o, x);
        let norm = g.held(lt.ffn_norm);
        let cur = self.build_norm(g, x, norm);
        let [gate, up] = self.lora_mat_muls(
            g,
            adapters,
            il,
            [(Projection::Gate, lt.gate), (Projection::Up, lt.up)],
            cur,
            n,
        );
        assert!(
            gate.is_f32() && gate.is_contiguous() && up.is_contiguous() && gate.ne() == up.ne(),
            "swiglu: {gate:?} and {up:?}"
        );
        // SAFETY: the op's contract: contiguous F32 operands of one shape
        // (checked just above).
        let act = unsafe { g.custom2(gate, up, Some(kernels::swiglu_op), ptr::null_mut()) };
        let [down] = self.lora_mat_muls(g, adapters, il, [(Projection::Down, lt.down)], act, n);
        g.add(down, x)
    }

    /// Final norm and output projection of `x` (`n` tokens, `n_embd x n`).
    pub(super) fn build_head<'g>(
        &self,
        g: &mut Graph<'g>,
        adapters: &[ActiveLora],
        x: Tensor<'g>,
        n: usize,
        which: Logits,
    ) -> Tensor<'g> {
        let norm = g.held(self.tensors.output_norm);
        let mut cur = self.build_norm(g, x, norm);
        if which == Logits::Last && n > 1 {
            let nb1 = cur.nb()[1];
            cur = g.view(cur, &[self.info.n_embd as i64, 1], &[nb1], nb1 * (n - 1));
        }
        let n_out = cur.ne()[1] as usize;
        // Exact accumulation covers the output head too (Q8_0 here); in the
        // default mode a single token's head runs `q8_0::gemv_op`.
        let output = g.held(self.tensors.output);
        let res = self.mat_mul(g, output, cur, n_out);
        self.add_adapters(g, adapters, 0, Projection::Output, res, cur)
    }

    /// The embeddings of `tokens` (checked against `n_vocab` by the caller).
    pub(super) fn build_embed<'g>(&self, g: &mut Graph<'g>, tokens: &[u32]) -> Tensor<'g> {
        let ids: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let inp = g.input_i32(&ids);
        let embd = g.held(self.tensors.token_embd);
        g.get_rows(embd, inp)
    }
}

/// The order the LoRA products are summed in: llama.cpp's on this CPU class,
/// or in exact mode the AVX2 one (so results do not depend on the CPU).
fn lora_order(exact: bool) -> DotOrder {
    if !exact && cpu_class() == CpuClass::Avx512 {
        DotOrder::Wide16
    } else {
        DotOrder::Wide8
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
