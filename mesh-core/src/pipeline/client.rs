//! The client side of a pipeline: a chain of stage sessions that together run
//! every layer of a model, with failover.
//!
//! The client (the node that generates) keeps the embeddings, the head and the
//! sampler; a [`PipelineSession`] carries hidden rows through the plan's hops
//! in order, hop by hop (a star: every hop's output comes back to the client,
//! which sends it to the next hop). The client keeps every row it sent to each
//! hop, chunk by chunk. When a hop fails (dies, stalls past
//! [`PipelineConfig::stage_timeout`], or answers an error), its peer is
//! avoided for the rest of the session, the hop's layers are planned again
//! over the remaining providers, and the saved chunks are replayed into the
//! new sessions in the same chunks as before. Layers see the same inputs in
//! the same batches, so the replacement's KV cache, and every later token,
//! are bit-identical to an uninterrupted run whenever the replacement
//! computes with the same kernels (same CPU class, or exact accumulation on
//! every node).
//!
//! **Pushed decode steps.** A single-token step through two or more remote
//! hops in a row goes out as one pushed forward (see the protocol docs):
//! each stage sends its output straight to the next, and the last delivers
//! every hop's output to this node on [`DELIVER_METHOD`](super::DELIVER_METHOD) (served by
//! [`Deliveries`]). The token crosses hops + 1 links instead of 2 x hops,
//! and the client still records every hop's input, as in a star. When the
//! push fails in any way (a stage refuses, dies or stalls, the delivery is
//! late or malformed, or the first stage does not push at all), the client
//! truncates each of those hops back to the step's position and runs the
//! step hop by hop, where the failover above takes over; a hop that could
//! not even be truncated is failed over at once. A hop that takes part in a
//! failed push may so be failed over even when another hop was at fault
//! (when a stalled stage wakes up after the truncation and pushes late).
//!
//! A hop whose peer disconnects during the session (the network's
//! [`Event::PeerDisconnected`]) is planned again the same way before the
//! next request to it, when the providers found then cover its layers
//! without it: a request to a peer whose connection closed would first
//! redial it, which takes seconds when it is gone (QUIC waits for its
//! handshake timeout). When nobody else covers those layers, the request
//! goes to the peer anyway (it may be back).

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use tokio::runtime::Handle;
use tokio::sync::broadcast;

use super::planner::{self, Candidate, CostModel, Hop, Plan, Target};
use super::protocol::{
    decode_rows, encode_request, encode_rows, AdapterRef, CloseMsg, DType, ErrorCode, ForwardMsg,
    OpenMsg, StageOp, StageReply, STAGE_METHOD, STAGE_VERSION,
};
use super::PipelineError;
use crate::compute;
use crate::engine::{Engine, GgmlEngine, GgmlSession, Hidden, ModelId};
use crate::network::{Event, Network, PeerId, Request};
use crate::{Error, Result};

mod push;

pub use push::Deliveries;
use push::PushFailure;

/// Settings of a pipeline session.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineConfig {
    /// A stage that has not answered a request within this is failed over.
    pub stage_timeout: Duration,
    /// How long to look for providers before planning gives up.
    pub find_timeout: Duration,
    /// Element type of hidden rows on the wire.
    pub dtype: DType,
    /// Most failovers in one session before giving up.
    pub max_failovers: usize,
    /// Planner cost model.
    pub cost: CostModel,
    /// Push decode steps from stage to stage (see the module docs) when the
    /// session has [`Deliveries`]; `false` runs every step hop by hop.
    pub push: bool,
}

impl Default for PipelineConfig {
    /// 30 s per stage request, 10 s to find providers, f32 rows, 8 failovers,
    /// pushed decode steps.
    fn default() -> Self {
        PipelineConfig {
            stage_timeout: Duration::from_secs(30),
            find_timeout: Duration::from_secs(10),
            dtype: DType::F32,
            max_failovers: 8,
            cost: CostModel::default(),
            push: true,
        }
    }
}

/// Something that happened to a pipeline session.
#[derive(Clone, Debug, PartialEq)]
pub enum PipelineEvent {
    /// The session planned (or re-planned) its chain.
    Plan {
        /// The whole chain now.
        hops: Vec<Hop>,
        /// Expected milliseconds per token.
        expected_ms: f64,
    },
    /// A hop failed; its layers moved to `replacement`.
    Failover {
        /// The peer that failed (avoided from now on).
        peer: PeerId,
        /// Its layers.
        layers: Range<u32>,
        /// What went wrong.
        error: String,
        /// The hops that took over.
        replacement: Vec<Hop>,
    },
}

/// Counters of a pipeline session.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PipelineStats {
    /// Stage requests sent (opens, forwards, closes).
    pub requests: u64,
    /// Forward requests and their total round-trip time.
    pub forwards: u64,
    /// Total round-trip nanoseconds of forward requests.
    pub forward_nanos: u64,
    /// Total microseconds the stages reported computing.
    pub stage_compute_us: u64,
    /// Tensor bytes sent and received.
    pub bytes: u64,
    /// Single-token steps (decode) and their tensor bytes.
    pub decode_steps: u64,
    /// Tensor bytes of single-token steps.
    pub decode_bytes: u64,
    /// Round-trip nanoseconds of single-token forwards (all hops).
    pub decode_forward_nanos: u64,
    /// Microseconds the stages reported computing single-token forwards.
    pub decode_compute_us: u64,
    /// Steps that went out as one pushed forward and were delivered.
    pub pushed_steps: u64,
    /// Pushed forwards that failed and were run hop by hop instead.
    pub push_fallbacks: u64,
    /// Failovers so far.
    pub failovers: usize,
    /// Peers that failed.
    pub failed: Vec<PeerId>,
}

impl PipelineStats {
    /// Mean round trip of a forward request to one hop, milliseconds.
    pub fn hop_ms(&self) -> f64 {
        self.forward_nanos as f64 / 1e6 / self.forwards.max(1) as f64
    }

    /// Mean time a forward request spent outside the stage's computation
    /// (serialize, send, queue, receive, deserialize), microseconds.
    pub fn hop_overhead_us(&self) -> f64 {
        let total_us = self.forward_nanos as f64 / 1e3;
        (total_us - self.stage_compute_us as f64) / self.forwards.max(1) as f64
    }

    /// Mean tensor bytes per generated token (over single-token steps).
    pub fn bytes_per_token(&self) -> f64 {
        self.decode_bytes as f64 / self.decode_steps.max(1) as f64
    }

    /// Counts the forward of `n_tokens` rows through `hops` hops (one
    /// request each, or one pushed forward for all) that took `nanos` from
    /// send to answer, with `compute_us` of stage compute and `bytes` of
    /// rows out and back; single-token ones count as decode too.
    fn count_forward(
        &mut self,
        hops: u64,
        n_tokens: usize,
        nanos: u64,
        compute_us: u64,
        bytes: u64,
    ) {
        self.forwards += hops;
        self.forward_nanos += nanos;
        self.stage_compute_us += compute_us;
        if n_tokens == 1 {
            self.decode_bytes += bytes;
            self.decode_forward_nanos += nanos;
            self.decode_compute_us += compute_us;
        }
    }
}

struct ActiveHop {
    hop: Hop,
    /// Remote session id (0 for local hops).
    session: u64,
    /// Every chunk of rows sent to this hop, in order (remote hops only:
    /// they are what a replacement replays).
    inputs: Vec<Hidden>,
    /// How many of `inputs` the current session has processed.
    done: usize,
    /// Why the hop is known to be unusable (it could not be truncated after
    /// a failed push): failed over before any other request.
    broken: Option<Error>,
}

/// Callback for [`PipelineEvent`]s.
pub type EventSink = Arc<dyn Fn(&PipelineEvent) + Send + Sync>;

/// A chain of stage sessions over every layer of a model (see the module docs).
///
/// Its methods block on network requests: call them from a plain thread, not
/// from inside an async task.
pub struct PipelineSession {
    net: Arc<dyn Network>,
    rt: Handle,
    engine: Arc<GgmlEngine>,
    model: ModelId,
    n_ctx: usize,
    exact: bool,
    /// LoRA adapters every remote session applies.
    adapters: Vec<AdapterRef>,
    config: PipelineConfig,
    /// What this node serves itself, with its speed.
    local: Option<(Range<u32>, f32)>,
    hops: Vec<ActiveHop>,
    avoid: HashSet<PeerId>,
    /// The network's events since the session opened.
    events: broadcast::Receiver<Event>,
    /// Peers whose last connection closed since then (and that have not
    /// connected again).
    departed: HashSet<PeerId>,
    stats: PipelineStats,
    sink: Option<EventSink>,
    /// Where deliveries of pushed forwards arrive (`None`: no pushes).
    deliveries: Option<Arc<Deliveries>>,
}

impl std::fmt::Debug for PipelineSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PipelineSession")
            .field("model", &self.model)
            .field("plan", &self.plan())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl PipelineSession {
    /// Finds providers of `engine`'s model, plans a chain over all its layers
    /// (using `local` layers on this node where that is cheapest) and opens a
    /// session on every remote hop like `session` (this node's own session:
    /// its context size and LoRA adapters, which every stage must hold). A
    /// stage that refuses the open (say, it lacks an adapter) is avoided and
    /// the layers planned again, within [`PipelineConfig::max_failovers`].
    /// With `deliveries` (served on `net` for [`DELIVER_METHOD`](super::DELIVER_METHOD)) and
    /// [`PipelineConfig::push`], decode steps are pushed from stage to stage.
    #[allow(clippy::too_many_arguments)]
    pub fn open(
        net: Arc<dyn Network>,
        rt: Handle,
        engine: Arc<GgmlEngine>,
        session: &GgmlSession,
        local: Option<(Range<u32>, f32)>,
        config: PipelineConfig,
        sink: Option<EventSink>,
        deliveries: Option<Arc<Deliveries>>,
    ) -> Result<PipelineSession> {
        let info = engine.info();
        let events = net.events();
        let deliveries = deliveries.filter(|_| config.push);
        let mut s = PipelineSession {
            net,
            rt,
            model: info.id,
            exact: engine.exact_accumulation(),
            engine,
            n_ctx: session.n_ctx(),
            adapters: session
                .adapters()
                .iter()
                .map(|a| AdapterRef {
                    id: a.adapter.id().0.to_vec(),
                    scale: a.scale,
                })
                .collect(),
            config,
            local,
            hops: Vec::new(),
            avoid: HashSet::new(),
            events,
            departed: HashSet::new(),
            stats: PipelineStats::default(),
            sink,
            deliveries,
        };
        let n_layers = s.engine.info().n_layers as u32;
        let (plan, hops) = s.open_chain(0..n_layers)?;
        s.hops = hops;
        s.emit(PipelineEvent::Plan {
            hops: s.plan(),
            expected_ms: plan.expected_ms,
        });
        Ok(s)
    }

    /// Plans `range` and opens its hops; a peer that fails to open is avoided
    /// and the range planned again over the providers already found (no new
    /// lookup: waiting for providers nobody announced would only delay the
    /// answer). When no plan is left after refusals, the
    /// error is the last stage's refusal (it says why, e.g. a missing
    /// adapter), or else the last failure to reach a stage.
    fn open_chain(&mut self, range: Range<u32>) -> Result<(Plan, Vec<ActiveHop>)> {
        let mut refused: Option<Error> = None;
        let candidates = self.candidates(&range)?;
        loop {
            let plan =
                match planner::plan(range.clone(), &candidates, &self.avoid, &self.config.cost) {
                    Ok(plan) => plan,
                    Err(e) => return Err(refused.unwrap_or(e)),
                };
            match self.open_hops(&plan.hops) {
                Ok(hops) => return Ok((plan, hops)),
                Err(failed) => {
                    let (peer, e) = *failed;
                    tracing::debug!("stage {peer} refused to open: {e}");
                    self.count_failure(peer, &e)?;
                    let typed = |e: &Error| matches!(e, Error::Pipeline(p) if matches!(**p, PipelineError::Stage { .. }));
                    if typed(&e) || !refused.as_ref().is_some_and(typed) {
                        refused = Some(e);
                    }
                }
            }
        }
    }

    /// The chain as it is now.
    pub fn plan(&self) -> Vec<Hop> {
        self.hops.iter().map(|h| h.hop.clone()).collect()
    }

    /// Counters so far.
    pub fn stats(&self) -> &PipelineStats {
        &self.stats
    }

    fn emit(&self, event: PipelineEvent) {
        if let Some(sink) = &self.sink {
            sink(&event);
        }
    }

    /// Providers found now, as planner candidates (this node's own layers first).
    fn candidates(&self, range: &Range<u32>) -> Result<Vec<Candidate>> {
        let me = self.net.local_peer_id();
        let mut out = Vec::new();
        if let Some((layers, tps)) = &self.local {
            out.push(Candidate {
                target: Target::Local,
                layers: layers.clone(),
                tokens_per_sec: *tps,
                rtt: None,
            });
        }
        let deadline = Instant::now() + self.config.find_timeout;
        // Everything found in any round counts: a later round cut short by the
        // deadline may see less than an earlier one.
        let mut found: Vec<Candidate> = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            // A failed lookup (no peer left to ask, say) finds nothing; the
            // planner then names the layers nobody serves.
            let providers = self
                .rt
                .block_on(self.net.find_providers(
                    self.model,
                    None,
                    left.max(Duration::from_millis(1)),
                ))
                .unwrap_or_else(|e| {
                    tracing::debug!("find providers: {e}");
                    Vec::new()
                });
            for p in providers {
                if p.peer_id == me || p.layers.start >= p.layers.end {
                    continue;
                }
                let rtt = self.rt.block_on(self.net.rtt(p.peer_id)).ok().flatten();
                let candidate = Candidate {
                    target: Target::Peer(p.peer_id),
                    layers: p.layers,
                    tokens_per_sec: p.tokens_per_sec,
                    rtt,
                };
                match found.iter_mut().find(|c| c.target == candidate.target) {
                    Some(c) => *c = candidate,
                    None => found.push(candidate),
                }
            }
            let all: Vec<Candidate> = out.iter().chain(&found).cloned().collect();
            // Records may still be spreading: look again until the range is
            // covered or time is up.
            if planner::uncovered(range, &all, &self.avoid).is_empty() || Instant::now() >= deadline
            {
                return Ok(all);
            }
            std::thread::sleep(Duration::from_millis(100).min(left));
        }
    }

    /// Whether hop `i`'s `peer` left during the session and the providers
    /// found now cover the hop's layers without it (then the hop fails over
    /// before any request to the peer; see the module docs).
    fn left_and_replaceable(&mut self, i: usize, peer: PeerId) -> bool {
        self.drain_events();
        if !self.departed.contains(&peer) {
            return false;
        }
        let layers = self.hops[i].hop.layers.clone();
        let fresh = self.avoid.insert(peer);
        let covered = self
            .candidates(&layers)
            .is_ok_and(|all| planner::uncovered(&layers, &all, &self.avoid).is_empty());
        if fresh {
            self.avoid.remove(&peer);
        }
        covered
    }

    /// Takes in the network's connection events since the last call.
    fn drain_events(&mut self) {
        loop {
            match self.events.try_recv() {
                Ok(Event::PeerDisconnected { peer }) => {
                    self.departed.insert(peer);
                }
                Ok(Event::PeerConnected { peer }) => {
                    self.departed.remove(&peer);
                }
                Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
    }

    /// Counts a failover away from `peer` (avoided from now on); past
    /// [`PipelineConfig::max_failovers`] the session gives up with `err`.
    fn count_failure(&mut self, peer: PeerId, err: &Error) -> Result<()> {
        self.stats.failovers += 1;
        self.stats.failed.push(peer);
        self.avoid.insert(peer);
        if self.stats.failovers > self.config.max_failovers {
            return Err(PipelineError::Exhausted {
                failovers: self.stats.failovers - 1,
                last: err.to_string(),
            }
            .into());
        }
        Ok(())
    }

    /// Opens `hops`; on a failure closes what it opened and names the peer.
    fn open_hops(
        &mut self,
        hops: &[Hop],
    ) -> std::result::Result<Vec<ActiveHop>, Box<(PeerId, Error)>> {
        let mut out = Vec::with_capacity(hops.len());
        for hop in hops {
            let session = match hop.target {
                Target::Local => 0,
                Target::Peer(peer) => match self.open_remote(peer, hop.layers.clone()) {
                    Ok(id) => id,
                    Err(e) => {
                        // Close what this call opened, then report.
                        for h in &out {
                            self.close_hop(h);
                        }
                        return Err(Box::new((peer, e)));
                    }
                },
            };
            out.push(ActiveHop {
                hop: hop.clone(),
                session,
                inputs: Vec::new(),
                done: 0,
                broken: None,
            });
        }
        Ok(out)
    }

    fn request(&mut self, peer: PeerId, op: StageOp, rows: Bytes) -> Result<(StageReply, Bytes)> {
        let (meta, tensor) = encode_request(op, rows);
        self.stats.requests += 1;
        self.stats.bytes += tensor.len() as u64;
        let request = Request {
            method: STAGE_METHOD.into(),
            meta,
            tensor,
        };
        let response =
            self.rt
                .block_on(self.net.request(peer, request, self.config.stage_timeout))?;
        self.stats.bytes += response.tensor.len() as u64;
        let reply =
            StageReply::decode(response.meta.as_ref()).map_err(|e| PipelineError::BadReply {
                peer,
                message: format!("undecodable reply: {e}"),
            })?;
        if reply.version != STAGE_VERSION {
            return Err(PipelineError::BadReply {
                peer,
                message: format!("reply version {}", reply.version),
            }
            .into());
        }
        if reply.code() != ErrorCode::None {
            return Err(PipelineError::Stage {
                peer,
                code: reply.code(),
                message: reply.message,
            }
            .into());
        }
        Ok((reply, response.tensor))
    }

    fn open_remote(&mut self, peer: PeerId, layers: Range<u32>) -> Result<u64> {
        let op = StageOp::Open(OpenMsg {
            model: self.model.0.to_vec(),
            layer_start: layers.start,
            layer_end: layers.end,
            n_ctx: self.n_ctx as u64,
            exact: self.exact,
            adapters: self.adapters.clone(),
        });
        let (reply, _) = self.request(peer, op, Bytes::new())?;
        if reply.session == 0 {
            return Err(PipelineError::BadReply {
                peer,
                message: "open answered session 0".into(),
            }
            .into());
        }
        Ok(reply.session)
    }

    fn close_hop(&self, hop: &ActiveHop) {
        if let Target::Peer(peer) = hop.hop.target {
            let (meta, tensor) = encode_request(
                StageOp::Close(CloseMsg {
                    session: hop.session,
                }),
                Bytes::new(),
            );
            let net = self.net.clone();
            // Best effort, in the background: a dead peer must not hold us up.
            self.rt.spawn(async move {
                let request = Request {
                    method: STAGE_METHOD.into(),
                    meta,
                    tensor,
                };
                let _ = net.request(peer, request, Duration::from_secs(5)).await;
            });
        }
    }

    fn forward_remote(&mut self, i: usize, peer: PeerId, input: &Hidden) -> Result<Hidden> {
        let session = self.hops[i].session;
        let n_tokens = input.n_tokens();
        let op = StageOp::Forward(ForwardMsg {
            session,
            pos: input.pos as u64,
            n_tokens: n_tokens as u32,
            dtype: self.config.dtype as i32,
            ..ForwardMsg::default()
        });
        let rows = encode_rows(&input.data, self.config.dtype);
        let sent = rows.len() as u64;
        let started = Instant::now();
        let (reply, tensor) = self.request(peer, op, rows)?;
        let (nanos, bytes) = (
            started.elapsed().as_nanos() as u64,
            sent + tensor.len() as u64,
        );
        self.stats
            .count_forward(1, n_tokens, nanos, reply.compute_us, bytes);
        let bad = |message: String| -> Error { PipelineError::BadReply { peer, message }.into() };
        if reply.session != session {
            return Err(bad(format!(
                "answered session {:#x} to a request for {session:#x}",
                reply.session
            )));
        }
        if reply.n_tokens as usize != n_tokens || reply.dtype != self.config.dtype as i32 {
            return Err(bad(format!(
                "answered {} rows of dtype {} to {n_tokens} rows of {:?}",
                reply.n_tokens, reply.dtype, self.config.dtype
            )));
        }
        let data = decode_rows(&tensor, self.config.dtype);
        if tensor.len() != input.data.len() * self.config.dtype.size()
            || data.iter().any(|v| !v.is_finite())
        {
            return Err(bad(format!(
                "answered {} tensor bytes (or non-finite values) for {} values",
                tensor.len(),
                input.data.len()
            )));
        }
        Ok(Hidden {
            n_embd: input.n_embd,
            pos: input.pos,
            data,
        })
    }

    /// Runs the chunks of remote hop `i` its session has not processed yet;
    /// returns the output of the last one.
    fn catch_up(&mut self, i: usize, peer: PeerId) -> Result<Hidden> {
        let mut last = None;
        while self.hops[i].done < self.hops[i].inputs.len() {
            let input = self.hops[i].inputs[self.hops[i].done].clone();
            last = Some(self.forward_remote(i, peer, &input)?);
            self.hops[i].done += 1;
        }
        last.ok_or_else(|| Error::InvalidArgument("a hop with no input to run".into()))
    }

    /// Runs `input` through hop `i`, failing over as needed. Returns the
    /// output and the index of the hop after the chain that ran it.
    fn run_hop(
        &mut self,
        i: usize,
        input: Hidden,
        local: &mut GgmlSession,
    ) -> Result<(Hidden, usize)> {
        let peer = match self.hops[i].hop.target {
            Target::Peer(peer) => peer,
            Target::Local => {
                // This node's own layers: nothing to fail over to, so no history.
                let mut h = input;
                let layers =
                    self.hops[i].hop.layers.start as usize..self.hops[i].hop.layers.end as usize;
                let engine = &self.engine;
                compute::pool().run(|| engine.run_layers(layers, &mut h, local))?;
                return Ok((h, i + 1));
            }
        };
        self.hops[i].inputs.push(input);
        let err = if let Some(e) = self.hops[i].broken.take() {
            e
        } else if self.left_and_replaceable(i, peer) {
            PipelineError::Left { peer }.into()
        } else {
            match self.catch_up(i, peer) {
                Ok(out) => return Ok((out, i + 1)),
                Err(Error::Cancelled) => return Err(Error::Cancelled),
                Err(e) => e,
            }
        };
        self.count_failure(peer, &err)?;
        let failed = self.hops.remove(i);
        self.close_hop(&failed);
        let (plan, new_hops) = self
            .open_chain(failed.hop.layers.clone())
            .map_err(|e| match e {
                Error::Pipeline(p) => match *p {
                    PipelineError::Uncovered { missing } => PipelineError::FailoverImpossible {
                        peer,
                        error: err.to_string(),
                        missing,
                    }
                    .into(),
                    other => other.into(),
                },
                other => other,
            })?;
        let k = new_hops.len();
        self.emit(PipelineEvent::Failover {
            peer,
            layers: failed.hop.layers.clone(),
            error: err.to_string(),
            replacement: plan.hops.clone(),
        });
        for (j, h) in new_hops.into_iter().enumerate() {
            self.hops.insert(i + j, h);
        }
        self.emit(PipelineEvent::Plan {
            hops: self.plan(),
            expected_ms: plan.expected_ms,
        });
        // Replay every chunk the failed hop saw, in the same chunks, through
        // the replacement chain; the last chunk's output is this call's. A
        // hop of the replacement that fails in turn is replaced the same way
        // (run_hop replays its own history), which lengthens the chain.
        let mut end = i + k;
        let mut out = None;
        for chunk in failed.inputs {
            let mut h = chunk;
            let mut j = i;
            while j < end {
                let (next, after) = self.run_hop(j, h, local)?;
                end += after - (j + 1);
                h = next;
                j = after;
            }
            out = Some(h);
        }
        let out = out.ok_or_else(|| Error::InvalidArgument("nothing to replay".into()))?;
        Ok((out, end))
    }

    /// Runs `hidden` (rows at the positions after those already run) through
    /// every hop; `local` is this node's session for its own hops.
    pub fn forward(&mut self, hidden: Hidden, local: &mut GgmlSession) -> Result<Hidden> {
        let single = hidden.n_tokens() == 1;
        // One attempt per step: after a failed push the step goes hop by hop.
        let mut push = single && self.deliveries.is_some();
        let mut h = hidden;
        let mut i = 0;
        while i < self.hops.len() {
            let end = if push { self.push_run(i) } else { i };
            if end >= i + 2 {
                match self.push(i, end, &h) {
                    Ok(out) => {
                        h = out;
                        i = end;
                        continue;
                    }
                    Err(failure) => {
                        push = false;
                        self.stats.push_fallbacks += 1;
                        let reason = match failure {
                            PushFailure::Unsupported => {
                                self.deliveries = None;
                                "the first stage does not push".to_string()
                            }
                            PushFailure::Failed(reason) => reason,
                        };
                        tracing::debug!("pushed forward failed ({reason}); hop by hop instead");
                        self.reset_hops(i, end, h.pos);
                    }
                }
            }
            let (out, next) = self.run_hop(i, h, local)?;
            h = out;
            i = next;
        }
        if single {
            self.stats.decode_steps += 1;
        }
        Ok(h)
    }
}

impl Drop for PipelineSession {
    fn drop(&mut self) {
        for h in &self.hops {
            self.close_hop(h);
        }
    }
}
