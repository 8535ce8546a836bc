//! The facade hosts embed: a [`Node`] joins the mesh, serves layer ranges of
//! models to peers, and generates locally or across the mesh.
//!
//! ```no_run
//! use std::sync::Arc;
//! use mesh_core::engine::GgmlEngine;
//! use mesh_core::generate::{GenerateParams, Prompt};
//! use mesh_core::network::{p2p::P2pConfig, Identity};
//! use mesh_core::node::{GenerateRequest, Mode, Node, NodeOptions};
//!
//! # fn main() -> mesh_core::Result<()> {
//! let node = Node::open(P2pConfig::new(Identity::ephemeral()), NodeOptions::default())?;
//! node.dial("/ip4/127.0.0.1/tcp/4001".parse().unwrap())?;
//! let engine = Arc::new(GgmlEngine::load("model.gguf", 0)?);
//! let request = GenerateRequest::new(Prompt::Text("Hello".into()), GenerateParams::default());
//! let out = node.generate(&engine, &request, Mode::Pipeline, None, &mut |piece| {
//!     print!("{piece}");
//!     true
//! })?;
//! println!("\n{:?}", out.pipeline.map(|p| p.plan));
//! node.shutdown()?;
//! # Ok(()) }
//! ```
//!
//! Every graph the node computes, for its own generations and for the stage
//! sessions it serves, takes turns on the process-wide [`crate::compute`]
//! pool, so serving and generating at once slows each down instead of
//! collapsing both.
//!
//! The blocking methods ([`Node::open`], [`Node::serve`], [`Node::generate`],
//! ...) must be called from plain threads, not from inside async tasks.

mod private;
mod sync;

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::runtime::{Handle, Runtime};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::compute;
use crate::delegate::helper::{HelperConfig, HelperServer};
use crate::delegate::link::{self, NetworkLinks, RemoteHelper};
use crate::delegate::private::{DroppedHelper, PrivateProjector, PrivateStats};
use crate::delegate::protocol::HELPER_METHOD;
use crate::delegate::select::{select_helpers, Candidate, SelectionPolicy};
use crate::engine::{ActiveLora, Engine, GgmlEngine, GgmlSession, Logits, LoraAdapter, ModelId};
use crate::generate::{self, GenerateOutput, GenerateParams, Prompt};
use crate::ledger::record::UPDATE_TOPIC;
use crate::ledger::transfer::{Offered, ADAPTER_METHOD};
use crate::ledger::{AdapterStore, FetchConfig, Fetched, UpdateDraft, UpdateId, UpdateRecord};
use crate::network::p2p::{P2pConfig, P2pNetwork};
use crate::network::{self, Announcement, Identity, Multiaddr, Network, PeerId};
use crate::pipeline::client::{
    Deliveries, PipelineConfig, PipelineEvent, PipelineSession, PipelineStats,
};
use crate::pipeline::planner::Hop;
use crate::pipeline::server::{StageConfig, StageEvent, StageServer};
use crate::{Error, Result};

/// Settings of a [`Node`] besides its network.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeOptions {
    /// Limits of the stage sessions this node serves.
    pub stage: StageConfig,
    /// How this node's pipeline generations find, use and replace stages.
    pub pipeline: PipelineConfig,
    /// Limits of the helper sessions this node serves ([`Node::serve_helper`]).
    pub helper: HelperConfig,
    /// How this node's private generations find and use helpers.
    pub private: PrivateConfig,
    /// When set, [`Node::serve`] does not send the served model's GGUF file
    /// to peers that ask for it by id ([`Node::fetch_model`]); by default it
    /// does, so a peer can join knowing only the model id.
    pub withhold_model_files: bool,
    /// When set, the decode steps of concurrent local generations compute one
    /// after another; by default they are batched into one graph
    /// ([`GgmlEngine::decoder`]), with identical results and more tokens per
    /// second in all (a debugging and benchmarking switch).
    pub unbatched_decode: bool,
    /// Worker threads of the node's own tokio runtime ([`Node::open`]: the
    /// network, request handlers, stage and helper plumbing; model compute
    /// runs on threads of its own). `None` picks
    /// [`default_network_threads`].
    pub network_threads: Option<usize>,
}

/// The default of [`NodeOptions::network_threads`]: one worker on machines
/// with two CPUs or fewer, two otherwise. On two cores a second worker
/// mostly wakes the first: every request then crosses threads once more,
/// and private decode over loopback (owner and two helpers on one 2-core
/// machine) took 64.6-65.6 ms per token with two workers against 57.4-58.5
/// with one, in alternated runs; pipeline decode was the same either way.
pub fn default_network_threads() -> usize {
    match std::thread::available_parallelism() {
        Ok(n) if n.get() <= 2 => 1,
        _ => 2,
    }
}

/// How a node's private generations ([`Mode::Private`]) find and use helpers.
#[derive(Clone, Debug, PartialEq)]
pub struct PrivateConfig {
    /// How long to look for helpers (providers of the model that answer a
    /// helper hello with a key signed by their identity).
    pub find_timeout: std::time::Duration,
    /// How long a helper may take to answer one request before it is
    /// dropped and replaced by a spare.
    pub helper_timeout: std::time::Duration,
    /// Who may hold shares (one per network unless trusted).
    pub selection: SelectionPolicy,
    /// Where the owner caches its check vectors (secret, owner-local;
    /// `None`: recomputed every generation).
    pub cache_dir: Option<std::path::PathBuf>,
}

impl Default for PrivateConfig {
    fn default() -> Self {
        PrivateConfig {
            find_timeout: std::time::Duration::from_secs(10),
            helper_timeout: std::time::Duration::from_secs(30),
            selection: SelectionPolicy::default(),
            cache_dir: None,
        }
    }
}

/// Where a generation's layers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every layer on this node.
    Local,
    /// Layers split across peers (and this node's own served layers), chosen
    /// by the planner, with failover.
    Pipeline,
    /// The linear layers on additive secret shares held by `helpers` peers
    /// (plus `spares` in reserve), chosen by [`PrivateConfig::selection`];
    /// this node keeps embeddings, norms, attention, the KV cache and
    /// sampling. Helpers compute exact integer products: with
    /// [`EngineOptions::exact`](crate::engine::EngineOptions::exact) on, the owner's own products
    /// (attention) are exact too and greedy tokens equal local exact
    /// generation's.
    Private {
        /// Helpers holding shares.
        helpers: usize,
        /// Helpers in reserve.
        spares: usize,
    },
}

/// Something that happened on a node.
#[derive(Clone, Debug, PartialEq)]
pub enum NodeEvent {
    /// From the network (peers, providers, RTTs).
    Network(network::Event),
    /// A stage session opened or closed on this node.
    Stage(StageEvent),
    /// A pipeline generation of this node planned or failed over.
    Pipeline(PipelineEvent),
    /// A verified update record arrived by gossip (or this node published one);
    /// see [`Node::enable_updates`].
    Update(Box<UpdateRecord>),
}

impl NodeEvent {
    /// The event as one JSON object with an `"event"` name (what `mesh node`
    /// prints and the C ABI's event callback receives): `listening`,
    /// `peer_connected`, `peer_disconnected`, `providers_changed`, `rtt`,
    /// `session_opened`, `session_closed`, `plan`, `failover`, `update`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            NodeEvent::Network(e) => match e {
                network::Event::Listening { addr } => {
                    json!({"event": "listening", "addr": addr.to_string()})
                }
                network::Event::PeerConnected { peer } => {
                    json!({"event": "peer_connected", "peer_id": peer.to_string()})
                }
                network::Event::PeerDisconnected { peer } => {
                    json!({"event": "peer_disconnected", "peer_id": peer.to_string()})
                }
                network::Event::ProvidersChanged {
                    model,
                    peer,
                    layers,
                } => json!({
                    "event": "providers_changed", "model": model.to_hex(), "peer_id": peer.to_string(),
                    "layers": layers.as_ref().map(|r| vec![r.start, r.end]),
                }),
                network::Event::Rtt { peer, rtt } => json!({
                    "event": "rtt", "peer_id": peer.to_string(), "ms": rtt.as_secs_f64() * 1e3,
                }),
            },
            NodeEvent::Stage(StageEvent::Opened {
                peer,
                session,
                model,
                layers,
                n_ctx,
            }) => json!({
                "event": "session_opened", "peer_id": peer.to_string(),
                "session": format!("{session:016x}"), "model": model.to_hex(),
                "layers": [layers.start, layers.end], "n_ctx": n_ctx,
            }),
            NodeEvent::Stage(StageEvent::Closed {
                peer,
                session,
                reason,
                rows,
            }) => json!({
                "event": "session_closed", "peer_id": peer.to_string(),
                "session": format!("{session:016x}"),
                "reason": format!("{reason:?}").to_lowercase(), "rows": rows,
            }),
            NodeEvent::Pipeline(PipelineEvent::Plan { hops, expected_ms }) => json!({
                "event": "plan", "hops": hops_json(hops), "expected_ms": expected_ms,
            }),
            NodeEvent::Pipeline(PipelineEvent::Failover {
                peer,
                layers,
                error,
                replacement,
            }) => json!({
                "event": "failover", "peer_id": peer.to_string(),
                "layers": [layers.start, layers.end], "error": error,
                "replacement": hops_json(replacement),
            }),
            NodeEvent::Update(r) => json!({
                "event": "update", "id": r.id().to_hex(), "base": r.base.to_hex(),
                "adapter": r.adapter.to_hex(), "adapter_size": r.adapter_size,
                "parent": r.parent.map(|p| p.to_hex()), "author": r.author.to_string(),
                "metrics": r.metrics.iter().map(|(k, v)| json!([k, v])).collect::<Vec<_>>(),
            }),
        }
    }
}

/// `[{"peer_id": "...", "layers": [a, b]}]` (`peer_id` is `"local"` for this node).
pub fn hops_json(hops: &[Hop]) -> serde_json::Value {
    hops.iter()
        .map(|h| {
            serde_json::json!({"peer_id": h.target.to_string(), "layers": [h.layers.start, h.layers.end]})
        })
        .collect()
}

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling, length and stop settings.
    pub params: GenerateParams,
    /// KV positions (default: prompt + `max_tokens`, at most the trained context).
    pub n_ctx: Option<usize>,
    /// LoRA adapters to apply, in order (loaded for the engine passed to
    /// [`Node::generate`]). Local and private mode apply them at this node
    /// (private mode's helpers never see them); in pipeline mode every stage
    /// applies them to its layers, named by hash: stages must hold them
    /// ([`Node::serve_adapter`]), one that does not is planned around.
    pub adapters: Vec<ActiveLora>,
}

impl GenerateRequest {
    /// A request with the default context size.
    pub fn new(prompt: Prompt, params: GenerateParams) -> GenerateRequest {
        GenerateRequest {
            prompt,
            params,
            n_ctx: None,
            adapters: Vec::new(),
        }
    }
}

/// What a pipeline generation used.
#[derive(Clone, Debug, PartialEq)]
pub struct PipelineReport {
    /// The chain at the end (after any failover).
    pub plan: Vec<Hop>,
    /// Counters (requests, bytes, failovers).
    pub stats: PipelineStats,
}

/// What a private generation used.
#[derive(Clone, Debug, PartialEq)]
pub struct PrivateReport {
    /// The helper pool by pool index: the active helpers first, then spares.
    pub helpers: Vec<PeerId>,
    /// Pool indices holding shares at the end, in share order.
    pub active: Vec<usize>,
    /// Traffic, timing and integrity counters of the whole generation.
    pub stats: PrivateStats,
    /// Counters of the single-token (decode) steps only.
    pub decode: PrivateStats,
    /// Decode steps counted in `decode`.
    pub decode_steps: u64,
    /// Every helper dropped, with the evidence.
    pub dropped: Vec<DroppedHelper>,
    /// Measured round trip to each pool helper when selected (ms; `None`: unknown).
    pub rtt_ms: Vec<Option<f64>>,
}

/// The result of [`Node::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct NodeOutput {
    /// Text, tokens, timings and why generation stopped.
    pub output: GenerateOutput,
    /// The mode used.
    pub mode: Mode,
    /// Present for [`Mode::Pipeline`].
    pub pipeline: Option<PipelineReport>,
    /// Present for [`Mode::Private`].
    pub private: Option<PrivateReport>,
}

struct Served {
    engine: Arc<GgmlEngine>,
    layers: Range<u32>,
    tokens_per_sec: f32,
}

/// A mesh node (see the module docs).
pub struct Node {
    // Dropped last: the tasks below run on it.
    runtime: Option<Runtime>,
    handle: Handle,
    net: Arc<dyn Network>,
    options: NodeOptions,
    stages: Arc<StageServer>,
    identity: Option<Identity>,
    helper: Mutex<Option<Arc<HelperServer>>>,
    served: Mutex<Vec<Served>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    events: broadcast::Sender<NodeEvent>,
    updates: Arc<Mutex<Option<Updates>>>,
    /// Files sent to peers that ask ([`ADAPTER_METHOD`]), and whether the
    /// handler runs.
    offered: Offered,
    offering: Mutex<bool>,
    /// Where pushed pipeline steps deliver, once its handler runs.
    deliveries: Mutex<Option<Arc<Deliveries>>>,
}

/// Model sync state of a node ([`Node::enable_updates`]).
struct Updates {
    store: AdapterStore,
    /// Verified records seen, oldest first (at most [`MAX_SEEN_UPDATES`]).
    seen: Vec<UpdateRecord>,
}

/// Update records a node remembers.
const MAX_SEEN_UPDATES: usize = 1024;

/// Pause between two provider lookups of [`Node::fetch_model`].
const FIND_RETRY: std::time::Duration = std::time::Duration::from_millis(200);

/// Largest model file [`Node::fetch_model`] accepts from a peer (1 TiB).
pub const MAX_MODEL_BYTES: u64 = 1 << 40;

/// How often a node sends its own update records again (gossip reaches only
/// the peers there at the time).
const UPDATE_REPUBLISH: std::time::Duration = std::time::Duration::from_secs(5);

/// Most of its own (latest) records a node sends again.
const MAX_REPUBLISHED: usize = 16;

impl Updates {
    /// Remembers `record`; false if it was known.
    fn remember(&mut self, record: &UpdateRecord) -> bool {
        if self.seen.iter().any(|r| r.id() == record.id()) {
            return false;
        }
        if self.seen.len() >= MAX_SEEN_UPDATES {
            self.seen.remove(0);
        }
        self.seen.push(record.clone());
        true
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("peer_id", &self.net.local_peer_id())
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Starts a libp2p node (its own tokio runtime) and dials `p2p.bootstrap`.
    pub fn open(p2p: P2pConfig, options: NodeOptions) -> Result<Node> {
        let workers = options
            .network_threads
            .unwrap_or_else(default_network_threads)
            .max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("mesh-node")
            .enable_all()
            .build()
            .map_err(|e| Error::Network(network::NetworkError::Transport(e.to_string())))?;
        let identity = p2p.identity.clone();
        let net = runtime.block_on(P2pNetwork::start(p2p))?;
        let handle = runtime.handle().clone();
        let mut node = Node::with_network(Arc::new(net), handle, options);
        node.identity = Some(identity);
        node.runtime = Some(runtime);
        Ok(node)
    }

    /// A node over an existing network (e.g. a [`network::memory::MemoryNetwork`])
    /// whose tasks run on `handle`.
    pub fn with_network(net: Arc<dyn Network>, handle: Handle, options: NodeOptions) -> Node {
        let (events, _) = broadcast::channel(1024);
        let stages = Arc::new(StageServer::new(options.stage.clone()));
        // Forward network and stage events to the node's subscribers.
        let tasks = vec![
            forward_events(&handle, net.events(), events.clone(), NodeEvent::Network),
            forward_events(&handle, stages.events(), events.clone(), NodeEvent::Stage),
        ];
        Node {
            runtime: None,
            handle,
            net,
            options,
            stages,
            identity: None,
            helper: Mutex::new(None),
            served: Mutex::new(Vec::new()),
            tasks: Mutex::new(tasks),
            events,
            updates: Arc::new(Mutex::new(None)),
            offered: Offered::default(),
            offering: Mutex::new(false),
            deliveries: Mutex::new(None),
        }
    }

    /// The node's [`Deliveries`], its [`crate::pipeline::DELIVER_METHOD`]
    /// handler started on first use (`None` if that failed: pipeline steps
    /// then run hop by hop).
    fn deliveries(&self) -> Option<Arc<Deliveries>> {
        let mut slot = self.deliveries.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            let deliveries = Arc::new(Deliveries::default());
            let d = deliveries.clone();
            let started = self
                .start_handler(crate::pipeline::DELIVER_METHOD, |mut requests| async move {
                    d.serve(&mut requests).await
                });
            match started {
                Ok(()) => *slot = Some(deliveries),
                Err(e) => tracing::warn!("pipeline deliveries: {e}; steps go hop by hop"),
            }
        }
        slot.clone()
    }

    /// Gives a node made with [`Node::with_network`] its identity (the key
    /// behind its peer id), which [`Node::serve_helper`] signs its helper key
    /// with. Fails if `identity` is not this node's.
    pub fn with_identity(mut self, identity: Identity) -> Result<Node> {
        if identity.peer_id() != self.peer_id() {
            return Err(Error::InvalidArgument(format!(
                "identity {} is not this node's ({})",
                identity.peer_id(),
                self.peer_id()
            )));
        }
        self.identity = Some(identity);
        Ok(self)
    }

    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.net.local_peer_id()
    }

    /// The network under the node.
    pub fn network(&self) -> &Arc<dyn Network> {
        &self.net
    }

    /// Addresses the node listens on.
    pub fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        self.handle.block_on(self.net.listen_addrs())
    }

    /// Connects to a peer.
    pub fn dial(&self, addr: Multiaddr) -> Result<()> {
        self.handle.block_on(self.net.dial(addr))
    }

    /// A new receiver of the node's events (bounded; a slow receiver skips).
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// The stage server (sessions, KV use).
    pub fn stages(&self) -> &Arc<StageServer> {
        &self.stages
    }

    /// Serves `layers` of `engine`'s model to peers: measures this node's
    /// decode speed over them, answers stage requests, and announces the
    /// range. Returns the announcement.
    pub fn serve(&self, engine: Arc<GgmlEngine>, layers: Range<u32>) -> Result<Announcement> {
        let n_layers = engine.info().n_layers as u32;
        if layers.start >= layers.end || layers.end > n_layers {
            return Err(Error::InvalidArgument(format!(
                "layers {}..{}: expected a non-empty range within the model's {n_layers} layers",
                layers.start, layers.end
            )));
        }
        // A short decode benchmark, scaled to the range (time is per layer).
        let mut session = engine.new_session(64.min(engine.info().n_ctx_train))?;
        let bench = compute::pool().run(|| generate::bench(&*engine, &mut session, 8, 16, 1))?;
        drop(session);
        let tokens_per_sec =
            (bench.tg_tps * f64::from(n_layers) / f64::from(layers.end - layers.start)) as f32;
        let announcement = Announcement {
            model: engine.info().id,
            layers: layers.clone(),
            free_memory: crate::engine::available_memory().unwrap_or(0) as u64,
            tokens_per_sec,
        };
        let first = self.served.lock().map(|s| s.is_empty()).unwrap_or(true);
        self.stages.add_model(engine.clone(), layers.clone());
        if first {
            let stages = self.stages.clone();
            let net = self.net.clone();
            self.start_handler(crate::pipeline::STAGE_METHOD, |mut requests| async move {
                if let Err(e) = stages.serve_queue(net, &mut requests).await {
                    tracing::warn!("stage server stopped: {e}");
                }
            })?;
        }
        if !self.options.withhold_model_files {
            self.offered.add_model(engine.clone());
            self.offer_files()?;
        }
        self.handle
            .block_on(self.net.announce(announcement.clone()))?;
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        let id = engine.info().id;
        served.retain(|s| s.engine.info().id != id);
        served.push(Served {
            engine,
            layers,
            tokens_per_sec,
        });
        Ok(announcement)
    }

    /// The engines of the models this node serves ([`Node::serve`]).
    pub fn served_engines(&self) -> Vec<Arc<GgmlEngine>> {
        self.served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| s.engine.clone())
            .collect()
    }

    /// Registers this node as the handler of `method` and runs `serve` on
    /// its requests in a task of the node; returns once the handler is
    /// registered (or failed to be).
    fn start_handler<F, Fut>(&self, method: &'static str, serve: F) -> Result<()>
    where
        F: FnOnce(tokio::sync::mpsc::Receiver<network::InboundRequest>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let net = self.net.clone();
        let task = self.handle.spawn(async move {
            match net.handle(method).await {
                Ok(requests) => {
                    let _ = ready_tx.send(Ok(()));
                    serve(requests).await;
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            }
        });
        self.lock_tasks().push(task);
        ready_rx
            .recv()
            .map_err(|_| Error::Network(network::NetworkError::Shutdown))?
    }

    fn lock_tasks(&self) -> std::sync::MutexGuard<'_, Vec<JoinHandle<()>>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The layers of `engine`'s model this node serves, with its speed.
    fn local_layers(&self, engine: &GgmlEngine) -> Option<(Range<u32>, f32)> {
        let served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        served
            .iter()
            .find(|s| s.engine.info().id == engine.info().id)
            .map(|s| (s.layers.clone(), s.tokens_per_sec))
    }

    /// Generates from `request` with `engine` (this node's copy of the model:
    /// tokenizer, embeddings and head always run here), calling `on_text`
    /// with each piece of text (return `false` to stop). `cancel` may be set
    /// from another thread. Blocks until done.
    pub fn generate(
        &self,
        engine: &Arc<GgmlEngine>,
        request: &GenerateRequest,
        mode: Mode,
        cancel: Option<&AtomicBool>,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<NodeOutput> {
        let prompt_ids = generate::tokenize_prompt(&**engine, &request.prompt)?;
        let n_ctx = request
            .n_ctx
            .unwrap_or_else(|| {
                prompt_ids
                    .len()
                    .saturating_add(request.params.max_tokens)
                    .min(engine.info().n_ctx_train)
            })
            .max(1);
        if let Mode::Private { helpers, spares } = mode {
            return self.generate_private(
                engine,
                request,
                (helpers, spares),
                &prompt_ids,
                n_ctx,
                cancel,
                on_text,
            );
        }
        // Pipeline: this node keeps embeddings, head and sampler; the chain
        // of stages runs the layers.
        let mut session = engine.new_session(n_ctx)?;
        engine.set_adapters(&mut session, &request.adapters)?;
        let mut pipeline = match mode {
            Mode::Pipeline => {
                let tx = self.events.clone();
                let sink: crate::pipeline::client::EventSink = Arc::new(move |e| {
                    let _ = tx.send(NodeEvent::Pipeline(e.clone()));
                });
                Some(PipelineSession::open(
                    self.net.clone(),
                    self.handle.clone(),
                    engine.clone(),
                    &session,
                    self.local_layers(engine),
                    self.options.pipeline.clone(),
                    Some(sink),
                    self.options
                        .pipeline
                        .push
                        .then(|| self.deliveries())
                        .flatten(),
                )?)
            }
            Mode::Local | Mode::Private { .. } => None,
        };
        let mut pos = 0usize;
        let batched = !self.options.unbatched_decode;
        let mut decoder = engine.decoder();
        let mut forward = |tokens: &[u32], s: &mut GgmlSession| match pipeline.as_mut() {
            None => match tokens {
                [token] if batched => decoder.decode(*token, s, compute::pool()),
                _ => compute::pool().run(|| engine.forward(tokens, Logits::Last, s)),
            },
            Some(p) => {
                let hidden = p.forward(engine.embed(tokens, pos)?, s)?;
                pos += tokens.len();
                compute::pool().run(|| engine.head(&hidden, Logits::Last, s))
            }
        };
        let output = generate::generate_with(
            &**engine,
            &mut session,
            &prompt_ids,
            &request.params,
            cancel,
            on_text,
            &mut forward,
        )?;
        Ok(NodeOutput {
            output,
            mode,
            pipeline: pipeline.map(|p| PipelineReport {
                plan: p.plan(),
                stats: p.stats().clone(),
            }),
            private: None,
        })
    }

    /// Withdraws every announcement, stops serving and closes the network.
    pub fn shutdown(mut self) -> Result<()> {
        let result = self.handle.block_on(self.net.shutdown());
        for t in self.lock_tasks().drain(..) {
            t.abort();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
        result
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for t in self.lock_tasks().drain(..) {
            t.abort();
        }
        if let Some(rt) = self.runtime.take() {
            // Not shut down explicitly: stop the network with the runtime.
            let net = self.net.clone();
            let _ = rt.block_on(async move {
                tokio::time::timeout(std::time::Duration::from_secs(2), net.shutdown()).await
            });
            rt.shutdown_timeout(std::time::Duration::from_secs(2));
        }
    }
}

/// Re-sends every event of `rx` to `tx` as a [`NodeEvent`] until `rx` closes
/// (a lagging `rx` skips what it missed).
fn forward_events<T: Clone + Send + 'static>(
    handle: &Handle,
    mut rx: broadcast::Receiver<T>,
    tx: broadcast::Sender<NodeEvent>,
    wrap: fn(T) -> NodeEvent,
) -> JoinHandle<()> {
    handle.spawn(async move {
        loop {
            match rx.recv().await {
                Ok(e) => {
                    let _ = tx.send(wrap(e));
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    })
}
