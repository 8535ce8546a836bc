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

use std::ops::Range;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use tokio::runtime::{Handle, Runtime};
use tokio::sync::broadcast;
use tokio::task::JoinHandle;

use crate::compute;
use crate::engine::{Engine, GgmlEngine, GgmlSession, Logits};
use crate::generate::{self, GenerateOutput, GenerateParams, Prompt};
use crate::network::p2p::{P2pConfig, P2pNetwork};
use crate::network::{self, Announcement, Multiaddr, Network, PeerId};
use crate::pipeline::client::{PipelineConfig, PipelineEvent, PipelineSession, PipelineStats};
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
    /// (plus `spares` in reserve). Across peers: not yet available.
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
}

impl NodeEvent {
    /// The event as one JSON object with an `"event"` name (what `mesh node`
    /// prints and the C ABI's event callback receives): `listening`,
    /// `peer_connected`, `peer_disconnected`, `providers_changed`, `rtt`,
    /// `session_opened`, `session_closed`, `plan`, `failover`.
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
}

impl GenerateRequest {
    /// A request with the default context size.
    pub fn new(prompt: Prompt, params: GenerateParams) -> GenerateRequest {
        GenerateRequest {
            prompt,
            params,
            n_ctx: None,
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

/// The result of [`Node::generate`].
#[derive(Clone, Debug, PartialEq)]
pub struct NodeOutput {
    /// Text, tokens, timings and why generation stopped.
    pub output: GenerateOutput,
    /// The mode used.
    pub mode: Mode,
    /// Present for [`Mode::Pipeline`].
    pub pipeline: Option<PipelineReport>,
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
    served: Mutex<Vec<Served>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    events: broadcast::Sender<NodeEvent>,
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
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mesh-node")
            .enable_all()
            .build()
            .map_err(|e| Error::Network(network::NetworkError::Transport(e.to_string())))?;
        let net = runtime.block_on(P2pNetwork::start(p2p))?;
        let handle = runtime.handle().clone();
        let mut node = Node::with_network(Arc::new(net), handle, options);
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
            served: Mutex::new(Vec::new()),
            tasks: Mutex::new(tasks),
            events,
        }
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
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let (stages, net) = (self.stages.clone(), self.net.clone());
            let task = self.handle.spawn(async move {
                let result = {
                    let mut requests = match net.handle(crate::pipeline::STAGE_METHOD).await {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    stages.serve_queue(&mut requests).await
                };
                if let Err(e) = result {
                    tracing::warn!("stage server stopped: {e}");
                }
            });
            self.lock_tasks().push(task);
            ready_rx
                .recv()
                .map_err(|_| Error::Network(network::NetworkError::Shutdown))??;
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
        // Pipeline: this node keeps embeddings, head and sampler; the chain
        // of stages runs the layers.
        let mut pipeline = match mode {
            Mode::Local => None,
            Mode::Pipeline => {
                let tx = self.events.clone();
                let sink: crate::pipeline::client::EventSink = Arc::new(move |e| {
                    let _ = tx.send(NodeEvent::Pipeline(e.clone()));
                });
                Some(PipelineSession::open(
                    self.net.clone(),
                    self.handle.clone(),
                    engine.clone(),
                    n_ctx,
                    self.local_layers(engine),
                    self.options.pipeline.clone(),
                    Some(sink),
                )?)
            }
            Mode::Private { .. } => {
                return Err(Error::Unsupported(
                    "private mode across peers is not available yet; private generation with \
                     in-process helpers is `mesh_core::delegate::private::PrivateProjector`"
                        .into(),
                ))
            }
        };
        let mut session = engine.new_session(n_ctx)?;
        let mut pos = 0usize;
        let mut forward = |tokens: &[u32], s: &mut GgmlSession| match pipeline.as_mut() {
            None => compute::pool().run(|| engine.forward(tokens, Logits::Last, s)),
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
