//! Decode steps of several sessions in one graph, and the batcher that
//! gathers them.
//!
//! A decode step reads every weight of the model to compute one token; with
//! several sessions decoding at once (a node serving several clients), one
//! graph over all their tokens reads the weights once. [`GgmlEngine::forward_batch`]
//! builds it: the embeddings, norms, projections and feed-forward run on the
//! tokens side by side (a matrix product over B columns instead of B
//! matrix-vector products), and each session's attention runs on its own KV
//! cache, at its own position. Every step computes the same floats as a
//! [`Engine::forward`] of that token alone: the projections of Q4_1 weights
//! use the tiled kernel that is bit-identical to ggml's per-column dot
//! products, and the attention of one token is the decode path itself
//! (`tests/engine.rs` checks logits bit for bit).
//!
//! [`Decoder::decode`] is the batcher: a decode step queues itself and waits
//! for the compute pool; whoever gets the pool first runs every queued step
//! (up to [`MAX_BATCH`]) as one batch, and the others find their logits ready
//! when their turn comes. Sessions that decode one after another would fall
//! into lockstep (each step queued while the other computes, then computed
//! alone); so a leader whose batch lacks some of the sessions that are
//! decoding right now (those with a live [`Decoder`] that has decoded)
//! waits for them, at most [`LINGER`] and a quarter of the last batch's
//! compute time, while they sample their next token. A lone session never
//! waits and computes as before.

use std::sync::{Condvar, Mutex};

use super::*;
use crate::compute::ComputePool;
use crate::engine::GgmlErrorKind;

/// Most decode steps in one batch.
pub const MAX_BATCH: usize = 8;

/// Longest a batch waits for the steps of other decoding sessions.
pub const LINGER: std::time::Duration = std::time::Duration::from_millis(2);

/// A decode step waiting in the queue.
struct Step {
    token: u32,
    /// The session of the thread that queued the step: it waits in
    /// [`GgmlEngine::decode`] (holding the `&mut`) until the step is done, and
    /// only the thread that holds the compute pool touches the session.
    session: *mut GgmlSession,
    result: Mutex<Option<Result<Vec<f32>>>>,
    done: Condvar,
}

// SAFETY: `session` is only dereferenced by the thread holding the compute
// pool while the owner waits (see `Step::session`); the rest is Sync.
unsafe impl Send for Step {}
unsafe impl Sync for Step {}

/// The queue of decode steps of one engine, and the graph buffers of batches.
#[derive(Default)]
pub(super) struct Batcher {
    queue: Mutex<Vec<Arc<Step>>>,
    /// Signalled when a step is queued.
    arrived: Condvar,
    /// Sessions decoding now: live [`Decoder`]s that have decoded.
    active: std::sync::atomic::AtomicUsize,
    /// Compute time of the last batch, microseconds.
    last_us: std::sync::atomic::AtomicU64,
    scratch: Mutex<Option<Scratch>>,
    batches: std::sync::atomic::AtomicU64,
    batched_steps: std::sync::atomic::AtomicU64,
}

/// How many batches ran and how many steps they held (see
/// [`GgmlEngine::batch_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Graphs run by the batcher (one per batch, lone steps included).
    pub batches: u64,
    /// Decode steps they computed.
    pub steps: u64,
    /// Generations decoding through the batcher right now (live
    /// [`Decoder`]s that have decoded a session without adapters): the
    /// sessions a batch waits for.
    pub decoding: usize,
}

/// One generation's decode steps through the batcher of its engine (see
/// [`GgmlEngine::forward_batch`]): from its first step until it is dropped, the
/// generation counts as decoding, and batches wait briefly for its steps. A
/// session with adapters decodes alone and does not count: no batch could
/// take its steps.
pub struct Decoder<'e> {
    engine: &'e GgmlEngine,
    counted: bool,
}

impl Drop for Decoder<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.engine
                .batcher
                .active
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

impl Decoder<'_> {
    /// The logits of `token` after the tokens `session` holds, as
    /// [`Engine::forward`] computes them, batched with the decode steps other
    /// threads run on this engine at the same time. Takes `pool` for the
    /// computation. A session with adapters decodes alone.
    pub fn decode(
        &mut self,
        token: u32,
        session: &mut GgmlSession,
        pool: &ComputePool,
    ) -> Result<Vec<f32>> {
        if !self.counted && session.adapters.is_empty() {
            self.counted = true;
            self.engine
                .batcher
                .active
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.engine.decode(token, session, pool)
    }
}

impl GgmlEngine {
    /// A [`Decoder`] for one generation's decode steps.
    pub fn decoder(&self) -> Decoder<'_> {
        Decoder {
            engine: self,
            counted: false,
        }
    }

    fn decode(
        &self,
        token: u32,
        session: &mut GgmlSession,
        pool: &ComputePool,
    ) -> Result<Vec<f32>> {
        if !session.adapters.is_empty() {
            return pool.run(|| self.forward(&[token], Logits::Last, session));
        }
        let step = Arc::new(Step {
            token,
            session: session as *mut GgmlSession,
            result: Mutex::new(None),
            done: Condvar::new(),
        });
        self.batcher
            .queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(step.clone());
        self.batcher.arrived.notify_all();
        pool.run(|| {
            if step
                .result
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some()
            {
                return; // computed in an earlier batch
            }
            let batch: Vec<Arc<Step>> = {
                let mut q = self.batcher.queue.lock().unwrap_or_else(|p| p.into_inner());
                q = self.linger(q);
                // Ours is in the queue (nobody took it): run it with up to
                // MAX_BATCH - 1 others, the oldest first.
                let at = q.iter().position(|s| Arc::ptr_eq(s, &step));
                let mut batch = Vec::with_capacity(MAX_BATCH);
                if let Some(at) = at {
                    batch.push(q.remove(at));
                }
                let more = (MAX_BATCH - batch.len()).min(q.len());
                batch.extend(q.drain(..more));
                batch
            };
            self.run_steps(&batch);
        });
        let mut result = step.result.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(r) = result.take() {
                return r;
            }
            // Not reachable with the pool's FIFO order (a step is done before
            // its owner's turn); waiting keeps it correct regardless.
            result = step.done.wait(result).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Waits (holding the queue's lock between wake-ups) until every
    /// decoding session has a step queued, a batch is full, or the linger
    /// time is over.
    fn linger<'q>(
        &self,
        mut q: std::sync::MutexGuard<'q, Vec<Arc<Step>>>,
    ) -> std::sync::MutexGuard<'q, Vec<Arc<Step>>> {
        use std::sync::atomic::Ordering::{Relaxed, SeqCst};
        let last = std::time::Duration::from_micros(self.batcher.last_us.load(Relaxed) / 4);
        let deadline = std::time::Instant::now() + LINGER.min(last);
        loop {
            let want = self.batcher.active.load(SeqCst).min(MAX_BATCH);
            let now = std::time::Instant::now();
            if q.len() >= want || now >= deadline {
                return q;
            }
            q = self
                .batcher
                .arrived
                .wait_timeout(q, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Batches run by [`Decoder::decode`] so far.
    pub fn batch_stats(&self) -> BatchStats {
        use std::sync::atomic::Ordering::Relaxed;
        BatchStats {
            batches: self.batcher.batches.load(Relaxed),
            steps: self.batcher.batched_steps.load(Relaxed),
            decoding: self.batcher.active.load(Relaxed),
        }
    }

    /// Runs `batch` (the caller holds the compute pool) and hands each step
    /// its result; a panic is every step's error.
    fn run_steps(&self, batch: &[Arc<Step>]) {
        use std::sync::atomic::Ordering::Relaxed;
        if batch.is_empty() {
            return;
        }
        self.batcher.batches.fetch_add(1, Relaxed);
        self.batcher
            .batched_steps
            .fetch_add(batch.len() as u64, Relaxed);
        let started = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: each step's owner waits in `decode` until its result is
            // set below, and no other thread runs a batch (we hold the pool):
            // these are the only references to the sessions. The sessions are
            // distinct: a thread queues one step at a time.
            let mut items: Vec<(&mut GgmlSession, u32)> = batch
                .iter()
                .map(|s| (unsafe { &mut *s.session }, s.token))
                .collect();
            self.forward_batch(&mut items)
        }));
        self.batcher
            .last_us
            .store(started.elapsed().as_micros() as u64, Relaxed);
        let results: Vec<Result<Vec<f32>>> = match outcome {
            Ok(Ok(logits)) => logits.into_iter().map(Ok).collect(),
            Ok(Err(e)) => {
                let message = e.to_string();
                let mut first = Some(e);
                batch
                    .iter()
                    .map(|_| {
                        Err(first.take().unwrap_or_else(|| {
                            Error::ggml(
                                GgmlErrorKind::Compute,
                                format!("the batched step this one was in failed: {message}"),
                            )
                        }))
                    })
                    .collect()
            }
            Err(_) => batch
                .iter()
                .map(|_| {
                    Err(Error::ggml(
                        GgmlErrorKind::Compute,
                        "a batched decode step panicked",
                    ))
                })
                .collect(),
        };
        for (step, r) in batch.iter().zip(results) {
            *step.result.lock().unwrap_or_else(|p| p.into_inner()) = Some(r);
            step.done.notify_all();
        }
    }

    /// The logits of one token for each `(session, token)` of `items`, in one
    /// graph (projections over all tokens side by side, each session's attention
    /// on its own cache); each session's cache takes its
    /// token. Sessions must hold every layer, have no adapters, and be
    /// distinct; at most [`MAX_BATCH`]. On an error no session has changed
    /// length.
    pub fn forward_batch(&self, items: &mut [(&mut GgmlSession, u32)]) -> Result<Vec<Vec<f32>>> {
        if items.len() > MAX_BATCH {
            return Err(Error::InvalidArgument(format!(
                "{} decode steps in one batch; at most {MAX_BATCH}",
                items.len()
            )));
        }
        if let [(s, token)] = items {
            return Ok(vec![self.forward(&[*token], Logits::Last, s)?]);
        }
        let all = 0..self.info.n_layers;
        let mut tokens = Vec::with_capacity(items.len());
        let mut pos = Vec::with_capacity(items.len());
        for (s, token) in items.iter() {
            self.check_session(s)?;
            self.check_tokens(&[*token])?;
            if !s.adapters.is_empty() {
                return Err(Error::InvalidArgument(
                    "a session with adapters decodes alone".into(),
                ));
            }
            let p = s.kv.len.first().copied().unwrap_or(0);
            self.check_kv(&s.kv, &all, p, 1)?;
            tokens.push(*token);
            pos.push(p);
        }
        let b = items.len();
        let kvs: Vec<&KvCache> = items.iter().map(|(s, _)| &s.kv).collect();
        let mut guard = self
            .batcher
            .scratch
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.new_scratch(batch_nodes(self.info.n_layers))?);
        }
        let scratch = guard.as_mut().expect("created above");
        let out = self.compute(scratch, |g| {
            let x = self.build_embed(g, &tokens);
            let x = self.build_layers_batch(g, &kvs, &pos, x);
            self.build_head(g, &[], x, b, Logits::All)
        })?;
        drop(guard);
        let n_vocab = self.info.n_vocab;
        for ((s, _), p) in items.iter_mut().zip(&pos) {
            for l in all.clone() {
                s.kv.len[l] = p + 1;
            }
        }
        Ok(out.chunks_exact(n_vocab).map(<[f32]>::to_vec).collect())
    }

    /// Every layer over `x` (one token of each of `kvs`' sessions, at `pos`):
    /// [`GgmlEngine::build_layers`] with the projections over all tokens at
    /// once and each token's attention on its own cache.
    fn build_layers_batch<'g>(
        &self,
        g: &mut Graph<'g>,
        kvs: &[&KvCache],
        pos: &[usize],
        mut x: Tensor<'g>,
    ) -> Tensor<'g> {
        let info = &self.info;
        let b = kvs.len();
        let inputs: Vec<_> = pos.iter().map(|&p| self.position_inputs(g, p, 1)).collect();
        let kv_dim = info.n_head_kv * info.head_dim;
        // Token `i`'s column of a `[rows, b]` tensor.
        let column = |g: &mut Graph<'g>, t: Tensor<'g>, rows: usize, i: usize| {
            let nb1 = t.nb()[1];
            g.view(t, &[rows as i64], &[], nb1 * i)
        };
        for il in 0..info.n_layers {
            let (q, k, v) = self.build_qkv(g, &[], il, x, b);
            let mut attn: Option<Tensor<'g>> = None;
            for (i, (kv, &(inp_pos, kq_mask))) in kvs.iter().zip(&inputs).enumerate() {
                let (qi, ki, vi) = (
                    column(g, q, info.n_embd, i),
                    column(g, k, kv_dim, i),
                    column(g, v, kv_dim, i),
                );
                let a = self.attention(g, kv, il, qi, ki, vi, pos[i], 1, inp_pos, kq_mask);
                let a = g.reshape(a, &[info.n_embd as i64, 1, 1]);
                attn = Some(match attn {
                    None => a,
                    // ggml's concat joins along the third dimension.
                    Some(prev) => g.concat(prev, a),
                });
            }
            let attn = attn.expect("at least one session");
            let attn = g.reshape(attn, &[info.n_embd as i64, b as i64]);
            x = self.build_rest_of_layer(g, &[], il, x, attn, b);
        }
        x
    }
}

/// Graph capacity of a batch of [`MAX_BATCH`] steps over `n_layers` layers:
/// a lone step's, plus each further token's attention in every layer.
fn batch_nodes(n_layers: usize) -> usize {
    max_nodes(n_layers, 0) + MAX_BATCH * (n_layers + 1) * 48
}
