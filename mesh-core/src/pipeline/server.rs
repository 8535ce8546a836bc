//! Serving stages: sessions over a range of a model's layers, for peers.
//!
//! A [`StageServer`] answers [`STAGE_METHOD`] requests for the models it was
//! given ([`StageServer::add_model`]). Each session belongs to the peer that
//! opened it (another peer naming its id gets "unknown session"), holds a KV
//! cache sized at open, and expires after [`StageConfig::idle_ttl`] without
//! requests. The KV caches of all sessions together stay within
//! [`StageConfig::kv_budget_bytes`]: an open past it is refused as
//! [`ErrorCode::Busy`] before anything is allocated. Every computation takes
//! the process-wide [`crate::compute::pool`].
//!
//! LoRA adapters given to [`StageServer::add_adapter`] are applied by the
//! sessions that name them (by hash) at open; a session naming one the server
//! does not hold is refused as [`ErrorCode::AdapterMissing`].

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use rand::RngCore;
use tokio::sync::{broadcast, mpsc};

use super::protocol::{
    decode_request, encode_request, encode_rows, DeliverMsg, ErrorCode, ForwardMsg, Push, RouteHop,
    StageCall, StageOp, StageReply, DELIVER_METHOD, STAGE_METHOD, STAGE_VERSION,
};
use crate::compute::{self, ComputePool};
use crate::engine::lora::{ActiveLora, LoraAdapter};
use crate::engine::{Engine, GgmlEngine, GgmlSession, Hidden, ModelId};
use crate::network::{InboundRequest, Network, PeerId, Request, Response};
use crate::Result;

/// Limits of a stage server.
#[derive(Clone, Debug, PartialEq)]
pub struct StageConfig {
    /// Bytes all sessions' KV caches may hold together.
    pub kv_budget_bytes: u64,
    /// A session without requests for this long is closed.
    pub idle_ttl: Duration,
    /// Most sessions open at once.
    pub max_sessions: usize,
}

impl Default for StageConfig {
    /// 1 GiB of KV caches, 5 minutes idle, 64 sessions.
    fn default() -> Self {
        StageConfig {
            kv_budget_bytes: 1 << 30,
            idle_ttl: Duration::from_secs(300),
            max_sessions: 64,
        }
    }
}

/// Why a session ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// Its client closed it.
    Client,
    /// It was idle past the TTL.
    Expired,
}

/// A session opened or closed on this server.
#[derive(Clone, Debug, PartialEq)]
pub enum StageEvent {
    /// A peer opened a session.
    Opened {
        /// Who.
        peer: PeerId,
        /// Session id.
        session: u64,
        /// Model.
        model: ModelId,
        /// Layers.
        layers: Range<u32>,
        /// KV positions.
        n_ctx: usize,
    },
    /// A session ended.
    Closed {
        /// Its owner.
        peer: PeerId,
        /// Session id.
        session: u64,
        /// Why.
        reason: CloseReason,
        /// Rows it forwarded in its life.
        rows: u64,
    },
}

struct Served {
    engine: Arc<GgmlEngine>,
    layers: Range<u32>,
}

struct Slot {
    owner: PeerId,
    engine: Arc<GgmlEngine>,
    layers: Range<usize>,
    kv_bytes: u64,
    state: Mutex<SlotState>,
}

struct SlotState {
    session: GgmlSession,
    last_used: Instant,
    rows: u64,
}

/// Answers stage requests (see the module docs).
pub struct StageServer {
    config: StageConfig,
    models: RwLock<Vec<Served>>,
    adapters: RwLock<HashMap<ModelId, Arc<LoraAdapter>>>,
    sessions: Mutex<HashMap<u64, Arc<Slot>>>,
    events: broadcast::Sender<StageEvent>,
    pool: &'static ComputePool,
}

impl std::fmt::Debug for StageServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageServer")
            .field("config", &self.config)
            .field("sessions", &self.lock_sessions().len())
            .finish_non_exhaustive()
    }
}

impl StageServer {
    /// A server with no models yet.
    pub fn new(config: StageConfig) -> StageServer {
        StageServer {
            config,
            models: RwLock::new(Vec::new()),
            adapters: RwLock::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
            events: broadcast::channel(256).0,
            pool: compute::pool(),
        }
    }

    /// Serves `layers` of `engine`'s model (replacing an earlier range of the
    /// same model; open sessions keep theirs).
    pub fn add_model(&self, engine: Arc<GgmlEngine>, layers: Range<u32>) {
        let mut models = self.models.write().unwrap_or_else(|p| p.into_inner());
        let id = engine.info().id;
        models.retain(|m| m.engine.info().id != id);
        models.push(Served { engine, layers });
    }

    /// Holds `adapter` for sessions that name it (by [`LoraAdapter::id`]).
    /// It must have been loaded against the engine of a served model (else
    /// [`crate::Error::InvalidArgument`]).
    pub fn add_adapter(&self, adapter: Arc<LoraAdapter>) -> Result<()> {
        let base = adapter.base_model();
        let served = self
            .models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|m| m.engine.info().id == base);
        if !served {
            return Err(crate::Error::InvalidArgument(format!(
                "adapter {} is for model {base}, which this node does not serve",
                adapter.id()
            )));
        }
        self.adapters
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(adapter.id(), adapter);
        Ok(())
    }

    /// Ids of the adapters this server holds.
    pub fn adapter_ids(&self) -> Vec<ModelId> {
        let mut ids: Vec<ModelId> = self
            .adapters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        ids.sort_by_key(|id| id.0);
        ids
    }

    /// Opened and closed sessions, as they happen.
    pub fn events(&self) -> broadcast::Receiver<StageEvent> {
        self.events.subscribe()
    }

    /// Sessions open now.
    pub fn session_count(&self) -> usize {
        self.lock_sessions().len()
    }

    /// Bytes of KV cache the open sessions hold.
    pub fn kv_bytes_in_use(&self) -> u64 {
        self.lock_sessions().values().map(|s| s.kv_bytes).sum()
    }

    fn lock_sessions(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Slot>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Answers one request from `peer` (blocking: may compute). Never panics
    /// on any input; every refusal is a reply with its [`ErrorCode`]. A
    /// pushed forward's onward request is not sent (see [`Self::answer`]):
    /// its reply is the one the requester would get once that succeeded.
    pub fn handle(&self, peer: PeerId, meta: &[u8], tensor: &[u8]) -> (StageReply, Bytes) {
        match self.answer(peer, meta, tensor) {
            Answer::Reply(reply, rows) => (reply, rows),
            Answer::Onward(onward) => (onward.reply, Bytes::new()),
        }
    }

    /// Answers one request from `peer` (blocking: may compute): a reply, or,
    /// for a pushed forward that computed, the request to send on (see the
    /// protocol docs). Never panics on any input.
    pub fn answer(&self, peer: PeerId, meta: &[u8], tensor: &[u8]) -> Answer {
        let call = match decode_request(meta, tensor) {
            Ok(call) => call,
            Err(r) => {
                return Answer::Reply(StageReply::failure(0, r.code, r.message), Bytes::new())
            }
        };
        self.handle_call(peer, call)
    }

    fn handle_call(&self, peer: PeerId, call: StageCall) -> Answer {
        let (reply, rows) = match call {
            StageCall::Open {
                model,
                layers,
                n_ctx,
                exact,
                adapters,
            } => (
                self.open(peer, model, layers, n_ctx, exact, &adapters),
                Bytes::new(),
            ),
            StageCall::Forward {
                session,
                pos,
                n_tokens,
                dtype,
                rows,
                push,
            } => {
                // The session belongs to the client that opened it, whoever
                // relays a pushed forward.
                let owner = push.as_ref().and_then(|p| p.origin).unwrap_or(peer);
                let computed = self
                    .slot(owner, session)
                    .and_then(|slot| forward(&slot, session, pos, n_tokens, rows, self.pool));
                match computed {
                    Err(reply) => (reply, Bytes::new()),
                    Ok((mut reply, out)) => {
                        reply.dtype = dtype as i32;
                        match push {
                            None => (reply, encode_rows(&out, dtype)),
                            Some(push) => {
                                let onward =
                                    Onward::new(reply, owner, pos, n_tokens, dtype, push, &out);
                                return Answer::Onward(onward);
                            }
                        }
                    }
                }
            }
            StageCall::Truncate { session, len } => match self.slot(peer, session) {
                Err(reply) => (reply, Bytes::new()),
                Ok(slot) => {
                    let mut st = slot.state.lock().unwrap_or_else(|p| p.into_inner());
                    let held = slot.engine.session_len(&st.session, slot.layers.start);
                    if len > held {
                        let msg = format!("truncate to {len}: the session holds {held} positions");
                        return Answer::Reply(
                            StageReply::failure(session, ErrorCode::PositionMismatch, msg),
                            Bytes::new(),
                        );
                    }
                    slot.engine.truncate_session(&mut st.session, len);
                    st.last_used = Instant::now();
                    (ok_reply(session, len), Bytes::new())
                }
            },
            StageCall::Close { session } => match self.slot(peer, session) {
                Err(reply) => (reply, Bytes::new()),
                Ok(_) => {
                    self.remove(session, CloseReason::Client);
                    (ok_reply(session, 0), Bytes::new())
                }
            },
        };
        Answer::Reply(reply, rows)
    }

    fn open(
        &self,
        peer: PeerId,
        model: ModelId,
        layers: Range<u32>,
        n_ctx: usize,
        exact: bool,
        adapters: &[(ModelId, f32)],
    ) -> StageReply {
        let (engine, served) = {
            let models = self.models.read().unwrap_or_else(|p| p.into_inner());
            match models.iter().find(|m| m.engine.info().id == model) {
                Some(m) => (m.engine.clone(), m.layers.clone()),
                None => {
                    return StageReply::failure(
                        0,
                        ErrorCode::WrongModel,
                        format!("this node does not serve model {model}"),
                    )
                }
            }
        };
        if layers.start < served.start || layers.end > served.end {
            return StageReply::failure(
                0,
                ErrorCode::LayersNotServed,
                format!(
                    "layers {}..{} requested, this node serves {}..{}",
                    layers.start, layers.end, served.start, served.end
                ),
            );
        }
        if exact != engine.exact_accumulation() {
            return StageReply::failure(
                0,
                ErrorCode::ModeMismatch,
                format!(
                    "the session asks for exact accumulation {}, this node runs {}",
                    if exact { "on" } else { "off" },
                    if engine.exact_accumulation() {
                        "on"
                    } else {
                        "off"
                    }
                ),
            );
        }
        if n_ctx > engine.info().n_ctx_train {
            return StageReply::failure(
                0,
                ErrorCode::TooLarge,
                format!(
                    "context {n_ctx}: the model was trained for {} positions",
                    engine.info().n_ctx_train
                ),
            );
        }
        let active = {
            let held = self.adapters.read().unwrap_or_else(|p| p.into_inner());
            let mut active = Vec::with_capacity(adapters.len());
            for (id, scale) in adapters {
                match held.get(id).filter(|a| a.base_model() == model) {
                    Some(a) => active.push(ActiveLora::new(a.clone(), *scale)),
                    None => {
                        return StageReply::failure(
                            0,
                            ErrorCode::AdapterMissing,
                            format!("this node does not hold LoRA adapter {id} for model {model}"),
                        )
                    }
                }
            }
            active
        };
        let span = layers.start as usize..layers.end as usize;
        let Some(kv_bytes) = engine.kv_bytes_for(span.len(), n_ctx).map(|b| b as u64) else {
            return StageReply::failure(0, ErrorCode::TooLarge, format!("context {n_ctx}"));
        };
        // Idle sessions give their memory back before this one is weighed
        // (the timer in `serve_queue` sweeps too, but only every TTL/4).
        self.expire_idle();
        // Check the limits, allocate outside the lock, then check again:
        // another open may have taken the budget meanwhile.
        let id = {
            let sessions = self.lock_sessions();
            if let Err(reply) = self.admit(&sessions, n_ctx, kv_bytes) {
                return reply;
            }
            let mut rng = rand::thread_rng();
            loop {
                let id = rng.next_u64();
                if id != 0 && !sessions.contains_key(&id) {
                    break id;
                }
            }
        };
        // A cache for the session's layers only.
        let session = match engine
            .new_session_for(span.clone(), n_ctx)
            .and_then(|mut s| engine.set_adapters(&mut s, &active).map(|()| s))
        {
            Ok(s) => s,
            Err(e) => return StageReply::failure(0, ErrorCode::Internal, e.to_string()),
        };
        let slot = Arc::new(Slot {
            owner: peer,
            engine,
            layers: span,
            kv_bytes,
            state: Mutex::new(SlotState {
                session,
                last_used: Instant::now(),
                rows: 0,
            }),
        });
        {
            let mut sessions = self.lock_sessions();
            if let Err(reply) = self.admit(&sessions, n_ctx, kv_bytes) {
                return reply;
            }
            sessions.insert(id, slot);
        }
        let _ = self.events.send(StageEvent::Opened {
            peer,
            session: id,
            model,
            layers,
            n_ctx,
        });
        ok_reply(id, 0)
    }

    /// Whether a session of `kv_bytes` fits next to `sessions`: a slot and
    /// the KV budget, or a `busy` reply saying which is missing.
    fn admit(
        &self,
        sessions: &HashMap<u64, Arc<Slot>>,
        n_ctx: usize,
        kv_bytes: u64,
    ) -> std::result::Result<(), StageReply> {
        if sessions.len() >= self.config.max_sessions {
            return Err(StageReply::failure(
                0,
                ErrorCode::Busy,
                format!("{} sessions open, the limit", sessions.len()),
            ));
        }
        let used: u64 = sessions.values().map(|s| s.kv_bytes).sum();
        if used.saturating_add(kv_bytes) > self.config.kv_budget_bytes {
            return Err(StageReply::failure(
                0,
                ErrorCode::Busy,
                format!(
                    "a {n_ctx}-position session needs {} KiB of KV cache; {} of {} KiB are in use",
                    kv_bytes >> 10,
                    used >> 10,
                    self.config.kv_budget_bytes >> 10
                ),
            ));
        }
        Ok(())
    }

    /// The session `id` if `peer` owns it and it has not been idle past the
    /// TTL (an expired one is closed here, whenever the sweep would come).
    fn slot(&self, peer: PeerId, id: u64) -> std::result::Result<Arc<Slot>, StageReply> {
        let found = self
            .lock_sessions()
            .get(&id)
            .filter(|slot| slot.owner == peer)
            .cloned();
        match found {
            Some(slot) if !self.is_idle(&slot, Instant::now()) => Ok(slot),
            expired => {
                if expired.is_some() {
                    self.remove(id, CloseReason::Expired);
                }
                // Someone else's session looks exactly like a missing one.
                Err(StageReply::failure(
                    id,
                    ErrorCode::UnknownSession,
                    format!("no session {id:#x} for this peer (closed, expired or never opened)"),
                ))
            }
        }
    }

    /// Idle past the TTL at `now`. A session computing right now is busy, not idle.
    fn is_idle(&self, slot: &Slot, now: Instant) -> bool {
        slot.state
            .try_lock()
            .is_ok_and(|st| now.duration_since(st.last_used) > self.config.idle_ttl)
    }

    fn remove(&self, id: u64, reason: CloseReason) {
        let slot = self.lock_sessions().remove(&id);
        if let Some(slot) = slot {
            let rows = slot.state.lock().map(|s| s.rows).unwrap_or(0);
            let _ = self.events.send(StageEvent::Closed {
                peer: slot.owner,
                session: id,
                reason,
                rows,
            });
        }
    }

    /// Closes sessions idle past the TTL.
    pub fn expire_idle(&self) {
        let now = Instant::now();
        let idle: Vec<u64> = self
            .lock_sessions()
            .iter()
            .filter(|(_, s)| self.is_idle(s, now))
            .map(|(&id, _)| id)
            .collect();
        for id in idle {
            self.remove(id, CloseReason::Expired);
        }
    }

    /// Answers [`STAGE_METHOD`] requests arriving on `net` until the network
    /// shuts down. Each request computes on a blocking thread.
    pub async fn serve(self: Arc<Self>, net: Arc<dyn Network>) -> Result<()> {
        let mut requests = net.handle(STAGE_METHOD).await?;
        self.serve_queue(net, &mut requests).await
    }

    /// Answers the requests arriving on `requests` (the queue of
    /// [`Network::handle`] for [`STAGE_METHOD`] on `net`, which also carries
    /// pushed forwards on) until it closes.
    pub async fn serve_queue(
        self: Arc<Self>,
        net: Arc<dyn Network>,
        requests: &mut mpsc::Receiver<InboundRequest>,
    ) -> Result<()> {
        let rt = tokio::runtime::Handle::current();
        let tick =
            (self.config.idle_ttl / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        let mut sweep = tokio::time::interval(tick);
        loop {
            tokio::select! {
                r = requests.recv() => {
                    let Some(inbound) = r else { return Ok(()) };
                    let server = self.clone();
                    let (net, rt) = (net.clone(), rt.clone());
                    // Straight onto a blocking thread, answered from there:
                    // one hand-off fewer per forward than an async wrapper.
                    tokio::task::spawn_blocking(move || {
                        let (peer, request) = (inbound.peer, &inbound.request);
                        let answer = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            server.answer(peer, &request.meta, &request.tensor)
                        }));
                        match answer {
                            Ok(Answer::Reply(reply, tensor)) => inbound.respond(Response {
                                meta: Bytes::from(reply.encode_to_vec()),
                                tensor,
                            }),
                            Ok(Answer::Onward(onward)) => {
                                rt.spawn(onward.send(net, inbound));
                            }
                            Err(_) => inbound.reject("stage handler failed (panicked)"),
                        }
                    });
                }
                _ = sweep.tick() => self.expire_idle(),
            }
        }
    }
}

/// What [`StageServer::answer`] decided.
#[derive(Debug)]
pub enum Answer {
    /// Answer the requester with this reply and these rows.
    Reply(StageReply, Bytes),
    /// A pushed forward computed: send its output on, then answer.
    Onward(Onward),
}

/// The output of a pushed forward on its way to the next hop (a
/// [`STAGE_METHOD`] forward) or, at the end of the route, to the client (a
/// [`DELIVER_METHOD`] delivery).
#[derive(Debug)]
pub struct Onward {
    /// The reply to the requester once the next hop accepted.
    pub reply: StageReply,
    /// Where the request goes.
    pub to: PeerId,
    /// The request.
    pub request: Request,
    /// How long to wait for its answer.
    pub timeout: Duration,
}

impl Onward {
    fn new(
        reply: StageReply,
        owner: PeerId,
        pos: usize,
        n_tokens: usize,
        dtype: super::DType,
        push: Push,
        out: &[f32],
    ) -> Onward {
        let mut tensor = Vec::with_capacity(push.carried.len() + out.len() * dtype.size());
        tensor.extend_from_slice(&push.carried);
        tensor.extend_from_slice(&encode_rows(out, dtype));
        let mut compute_us = push.compute_us;
        compute_us.push(reply.compute_us);
        let (to, request) = match push.route.split_first() {
            Some((&(next, session), rest)) => {
                let op = StageOp::Forward(ForwardMsg {
                    session,
                    pos: pos as u64,
                    n_tokens: n_tokens as u32,
                    dtype: dtype as i32,
                    route: rest
                        .iter()
                        .map(|(peer, session)| RouteHop {
                            peer: peer.to_bytes(),
                            session: *session,
                        })
                        .collect(),
                    deliver: push.deliver,
                    origin: owner.to_bytes(),
                    // Every output so far but this stage's (the next input).
                    carried: (compute_us.len() - 1) as u32,
                    compute_us,
                    timeout_ms: push.timeout.as_millis().min(u32::MAX as u128) as u32,
                });
                let (meta, tensor) = encode_request(op, Bytes::from(tensor));
                let method = STAGE_METHOD.into();
                (
                    next,
                    Request {
                        method,
                        meta,
                        tensor,
                    },
                )
            }
            None => {
                let msg = DeliverMsg {
                    version: STAGE_VERSION,
                    deliver: push.deliver,
                    pos: pos as u64,
                    n_tokens: n_tokens as u32,
                    dtype: dtype as i32,
                    compute_us,
                };
                let request = Request {
                    method: DELIVER_METHOD.into(),
                    meta: Bytes::from(msg.encode_to_vec()),
                    tensor: Bytes::from(tensor),
                };
                (owner, request)
            }
        };
        Onward {
            reply,
            to,
            request,
            timeout: push.timeout,
        }
    }

    /// Sends the request on over `net`, then answers `inbound`: with the
    /// stage's own reply when the next hop accepted, else with
    /// [`ErrorCode::NextHop`] and what went wrong there.
    pub async fn send(self, net: Arc<dyn Network>, inbound: InboundRequest) {
        let session = self.reply.session;
        let to = self.to;
        let failed = |message: String| {
            StageReply::failure(
                session,
                ErrorCode::NextHop,
                format!("next hop {to}: {message}"),
            )
        };
        let reply = match net.request(to, self.request, self.timeout).await {
            Err(e) => failed(e.to_string()),
            Ok(response) => match StageReply::decode(response.meta.as_ref()) {
                Err(e) => failed(format!("undecodable reply: {e}")),
                Ok(r) if r.code() != ErrorCode::None => {
                    failed(format!("{}: {}", r.code(), r.message))
                }
                Ok(_) => self.reply,
            },
        };
        inbound.respond(Response {
            meta: Bytes::from(reply.encode_to_vec()),
            tensor: Bytes::new(),
        });
    }
}

fn ok_reply(session: u64, len: usize) -> StageReply {
    StageReply {
        version: STAGE_VERSION,
        session,
        len: len as u64,
        ..StageReply::default()
    }
}

fn forward(
    slot: &Slot,
    session: u64,
    pos: usize,
    n_tokens: usize,
    rows: Vec<f32>,
    pool: &ComputePool,
) -> std::result::Result<(StageReply, Vec<f32>), StageReply> {
    let n_embd = slot.engine.info().n_embd;
    if rows.len() != n_tokens * n_embd {
        return Err(StageReply::failure(
            session,
            ErrorCode::BadShape,
            format!(
                "expected {n_tokens} rows of {n_embd} values, found {} values",
                rows.len()
            ),
        ));
    }
    if rows.iter().any(|v| !v.is_finite()) {
        return Err(StageReply::failure(
            session,
            ErrorCode::BadShape,
            "hidden rows hold a non-finite value",
        ));
    }
    let mut st = slot.state.lock().unwrap_or_else(|p| p.into_inner());
    let held = slot.engine.session_len(&st.session, slot.layers.start);
    if pos != held {
        return Err(StageReply::failure(
            session,
            ErrorCode::PositionMismatch,
            format!("rows at position {pos}, the session holds {held} positions"),
        ));
    }
    let n_ctx = st.session.n_ctx();
    if pos + n_tokens > n_ctx {
        return Err(StageReply::failure(
            session,
            ErrorCode::ContextFull,
            format!(
                "{n_tokens} rows at {pos} need {} positions; the session holds {n_ctx}",
                pos + n_tokens
            ),
        ));
    }
    let mut hidden = Hidden {
        n_embd,
        pos,
        data: rows,
    };
    let engine = &slot.engine;
    let layers = slot.layers.clone();
    let state = &mut *st;
    // Compute time only: the wait for the pool is queueing.
    let (result, compute_us) = pool.run(|| {
        let started = Instant::now();
        let r = engine.run_layers(layers, &mut hidden, &mut state.session);
        (r, started.elapsed().as_micros() as u64)
    });
    if let Err(e) = result {
        // A failed graph may have written part of the cache: forget it.
        engine.truncate_session(&mut state.session, pos);
        return Err(StageReply::failure(
            session,
            ErrorCode::Internal,
            e.to_string(),
        ));
    }
    state.last_used = Instant::now();
    state.rows += n_tokens as u64;
    let reply = StageReply {
        version: STAGE_VERSION,
        session,
        len: (pos + n_tokens) as u64,
        compute_us,
        n_tokens: n_tokens as u32,
        ..StageReply::default()
    };
    Ok((reply, hidden.data))
}
