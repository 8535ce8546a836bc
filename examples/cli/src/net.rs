//! `mesh node` and `mesh find`: run a libp2p node, or look up providers.

use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use mesh_core::engine::{Engine, ModelId};
use mesh_core::network::p2p::{P2pConfig, P2pNetwork};
use mesh_core::network::{Identity, Multiaddr, Network, NetworkError};
use mesh_core::node::{Node, NodeOptions};
use mesh_core::pipeline::client::PipelineConfig;
use serde_json::json;

use crate::BoxError;

/// `--serve MODEL[:a-b]`: a model (path or `default`) and an optional layer range.
#[derive(Clone, Debug)]
pub struct ServeSpec {
    model: String,
    layers: Option<(u32, u32)>,
}

impl std::str::FromStr for ServeSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // The range suffix is `:a-b` with digits; a path may itself contain ':'.
        if let Some((model, range)) = s.rsplit_once(':') {
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (a.parse::<u32>(), b.parse::<u32>()) {
                    if a >= b {
                        return Err(format!(
                            "layer range {a}-{b}: expected a < b (end exclusive)"
                        ));
                    }
                    return Ok(ServeSpec {
                        model: model.to_owned(),
                        layers: Some((a, b)),
                    });
                }
            }
        }
        if s.is_empty() {
            return Err("expected MODEL[:a-b]".into());
        }
        Ok(ServeSpec {
            model: s.to_owned(),
            layers: None,
        })
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// What `mesh node` was asked to do.
pub struct NodeArgs {
    pub listen: Vec<Multiaddr>,
    pub bootstrap: Vec<Multiaddr>,
    pub identity: Option<PathBuf>,
    pub serve: Vec<ServeSpec>,
    pub mdns: bool,
    pub relay_server: bool,
    pub external: Vec<Multiaddr>,
    pub threads: usize,
    /// Also answer private-mode requests for every served model.
    pub helper: bool,
    /// Testing: every helper session of this node misbehaves this way.
    pub helper_fault: Option<mesh_core::delegate::private::Cheat>,
    /// LoRA adapters to hold for pipeline sessions that name them.
    pub lora: Vec<PathBuf>,
    /// Model sync store directory.
    pub updates: Option<PathBuf>,
    /// An adapter to publish as an update.
    pub publish_update: Option<PathBuf>,
    /// Fetch the adapters of update records heard.
    pub fetch_updates: bool,
    /// The genesis of a ledger to run.
    pub ledger: Option<PathBuf>,
    /// Where its blocks are kept.
    pub ledger_store: Option<PathBuf>,
    /// Fail unless the identity has stake in the genesis.
    pub validator: bool,
    /// Hold the ledger's active adapters for served models.
    pub follow_ledger: bool,
}

/// `mesh node`.
pub fn node(args: NodeArgs) -> Result<(), BoxError> {
    let NodeArgs {
        listen,
        bootstrap,
        identity,
        serve,
        mdns,
        relay_server,
        external,
        threads,
        helper,
        helper_fault,
        lora,
        updates,
        publish_update,
        fetch_updates,
        ledger,
        ledger_store,
        validator,
        follow_ledger,
    } = args;
    let genesis = ledger
        .as_deref()
        .map(crate::ledger::read_genesis)
        .transpose()?;
    let identity = match identity {
        Some(path) => Identity::load_or_create(&path)?,
        None => Identity::ephemeral(),
    };
    // Load every model before going online, so a bad path fails fast.
    let mut engines = Vec::new();
    for spec in &serve {
        let path = crate::model_path_via(&spec.model, &bootstrap)?;
        let engine = Arc::new(mesh_core::engine::GgmlEngine::load(path, threads)?);
        let n_layers = engine.info().n_layers as u32;
        let (a, b) = spec.layers.unwrap_or((0, n_layers));
        if b > n_layers {
            return Err(format!(
                "--serve {}: the model has {n_layers} layers, range {a}-{b} exceeds it",
                spec.model
            )
            .into());
        }
        engines.push((engine, a..b));
    }
    // Each adapter for the served model it fits, checked before going online.
    let mut adapters = Vec::new();
    for path in &lora {
        let mut last = None;
        for (engine, _) in &engines {
            match engine.load_adapter(path) {
                Ok(a) => {
                    adapters.push((a, path.clone()));
                    last = None;
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(e) = last {
            return Err(format!("--lora {}: {e}", path.display()).into());
        }
    }
    let mut config = P2pConfig::new(identity);
    config.listen = if listen.is_empty() {
        vec![
            "/ip4/0.0.0.0/tcp/0".parse()?,
            "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
        ]
    } else {
        listen
    };
    config.bootstrap = bootstrap;
    config.mdns = mdns;
    config.relay_server = relay_server;
    config.external = external;
    let options = NodeOptions {
        helper: mesh_core::delegate::helper::HelperConfig {
            fault: helper_fault,
            ..Default::default()
        },
        ..NodeOptions::default()
    };
    let node = Arc::new(Node::open(config, options)?);
    let mut events = node.events();
    let addrs: Vec<String> = node.listen_addrs()?.iter().map(|a| a.to_string()).collect();
    println!(
        "{}",
        json!({"peer_id": node.peer_id().to_string(), "listen": addrs})
    );
    // Measure, start answering stage requests, announce.
    for (engine, layers) in engines {
        let a = node.serve(engine.clone(), layers)?;
        println!(
            "{}",
            json!({"event": "serving", "model": a.model.to_hex(),
                   "layers": [a.layers.start, a.layers.end], "tokens_per_sec": a.tokens_per_sec})
        );
        if helper {
            node.serve_helper(engine)?;
            let key = node
                .helper_server()
                .map(|h| h.key().hpke_public)
                .unwrap_or_default();
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            println!(
                "{}",
                json!({"event": "helping", "model": a.model.to_hex(), "hpke_public": hex,
                       "fault": helper_fault.map(|f| format!("{f:?}"))})
            );
        }
    }
    for (adapter, path) in adapters {
        let id = node.serve_adapter(adapter.clone())?;
        println!(
            "{}",
            json!({"event": "adapter", "adapter": id.to_hex(),
                   "model": adapter.base_model().to_hex(), "file": path.display().to_string()})
        );
    }
    let served: Vec<Arc<mesh_core::engine::GgmlEngine>> = node.served_engines();
    if let Some(dir) = &updates {
        node.enable_updates(dir)?;
        if let Some(path) = &publish_update {
            let engine = served.first().ok_or("--publish-update needs --serve")?;
            // The record is printed as an `update` event below.
            node.publish_update(engine, path, None, Vec::new())
                .map_err(|e| format!("--publish-update {}: {e}", path.display()))?;
        }
    }
    let ledger_handle = match genesis {
        Some(g) => {
            let store = match ledger_store {
                Some(p) => p,
                None => crate::ledger::default_store(updates.as_deref(), &g)?,
            };
            let chain_id = g.chain_id.clone();
            let handle = crate::ledger::start_on(&node, g, &store)?;
            // Stake comes from the genesis or from transfers in the stored
            // chain; a node given stake later starts voting by itself.
            if validator && !handle.status().validator {
                return Err(format!(
                    "--validator: {} has no stake in the ledger {chain_id} (genesis and {} stored blocks); without --validator the node follows the chain and votes once a transfer gives it stake",
                    node.peer_id(),
                    handle.status().height
                )
                .into());
            }
            Some(handle)
        }
        None => None,
    };
    let mut ledger_events = ledger_handle.as_ref().map(|h| h.events());
    let mut following = Following::default();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            let next_ledger = async {
                match ledger_events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                e = next_ledger => match (e, ledger_handle.as_ref()) {
                    (Ok(e), Some(h)) => {
                        crate::ledger::print_event(h, &e);
                        if follow_ledger {
                            following.update(&node, &served, h);
                        }
                    }
                    // Missed events: the chain itself is intact; say so, and
                    // catch up on what is active now.
                    (Err(tokio::sync::broadcast::error::RecvError::Lagged(n)), Some(h)) => {
                        println!("{}", json!({"event": "ledger_lagged", "missed": n}));
                        if follow_ledger {
                            following.update(&node, &served, h);
                        }
                    }
                    // The ledger stopped: stop polling a closed channel
                    // (it would return at once, forever).
                    _ => ledger_events = None,
                },
                e = events.recv() => match e {
                    Ok(e) => {
                        println!("{}", e.to_json());
                        if let (true, mesh_core::node::NodeEvent::Update(record)) = (fetch_updates, &e) {
                            fetch_in_background(&node, &served, (**record).clone());
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        println!("{}", json!({"event": "lagged", "missed": n}))
                    }
                    Err(_) => break,
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        Ok::<(), BoxError>(())
    })?;
    drop(ledger_handle);
    // A fetch still running holds the node: it then ends with the process.
    if let Ok(node) = Arc::try_unwrap(node) {
        node.shutdown()?;
    }
    println!("{}", json!({"event": "shutdown"}));
    Ok(())
}

/// The adapters `--follow-ledger` holds, by model.
#[derive(Default)]
struct Following {
    held: std::collections::HashMap<mesh_core::engine::ModelId, mesh_core::engine::ModelId>,
}

impl Following {
    /// Fetches and holds (`serve_adapter`) the ledger's active adapter of each
    /// served model that changed; prints `ledger_adapter` (or
    /// `ledger_adapter_failed`). Fetches run on threads of their own.
    fn update(
        &mut self,
        node: &Arc<Node>,
        served: &[Arc<mesh_core::engine::GgmlEngine>],
        ledger: &mesh_core::ledger::consensus::LedgerHandle,
    ) {
        for engine in served {
            let model = engine.info().id;
            let Some(source) = ledger.active_source(model) else {
                continue;
            };
            if self.held.get(&model) == Some(&source.adapter) {
                continue;
            }
            self.held.insert(model, source.adapter);
            let (node, engine) = (node.clone(), engine.clone());
            std::thread::spawn(move || {
                let fetched = node
                    .fetch_adapter(
                        &engine,
                        source.adapter,
                        source.size,
                        source.holder,
                        &Default::default(),
                    )
                    .and_then(|(a, _)| node.serve_adapter(a));
                match fetched {
                    Ok(id) => println!(
                        "{}",
                        json!({"event": "ledger_adapter", "model": model.to_hex(),
                               "adapter": id.to_hex(), "decided_at": source.height})
                    ),
                    Err(e) => println!(
                        "{}",
                        json!({"event": "ledger_adapter_failed", "adapter": source.adapter.to_hex(),
                               "error": e.to_string()})
                    ),
                }
            });
        }
    }
}

/// Fetches the adapter of `record` (if it is for a served model) on a thread
/// of its own; prints `update_fetched` or `update_fetch_failed`.
fn fetch_in_background(
    node: &Arc<Node>,
    served: &[Arc<mesh_core::engine::GgmlEngine>],
    record: mesh_core::ledger::UpdateRecord,
) {
    let Some(engine) = served.iter().find(|e| e.info().id == record.base).cloned() else {
        return;
    };
    let node = node.clone();
    std::thread::spawn(move || {
        let config = mesh_core::ledger::FetchConfig::default();
        match node.fetch_update(&engine, &record, &config) {
            Ok((adapter, fetched)) => println!(
                "{}",
                json!({"event": "update_fetched", "id": record.id().to_hex(),
                       "adapter": adapter.id().to_hex(),
                       "path": fetched.path.display().to_string(),
                       "from": fetched.from.map(|p| p.to_string()),
                       "failures": fetched.failures.iter()
                           .map(|(p, e)| json!({"peer_id": p.to_string(), "error": e}))
                           .collect::<Vec<_>>()})
            ),
            Err(e) => println!(
                "{}",
                json!({"event": "update_fetch_failed", "id": record.id().to_hex(),
                       "error": e.to_string()})
            ),
        }
    });
}

/// A duration flag's value: a positive, finite number of seconds that fits a `Duration`.
pub fn seconds(flag: &str, v: f64) -> Result<Duration, BoxError> {
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("{flag} {v}: expected a positive number of seconds").into());
    }
    Duration::try_from_secs_f64(v)
        .map_err(|_| format!("{flag} {v}: too large (at most ~5.8e11 years)").into())
}

/// How `mesh generate` reaches the mesh.
#[derive(Clone, Debug)]
pub struct ClientArgs {
    pub bootstrap: Vec<Multiaddr>,
    pub stage_timeout: f64,
    pub find_timeout: f64,
    pub helper_timeout: f64,
    pub trust: Vec<mesh_core::network::PeerId>,
    /// Decode steps of concurrent generations one by one (`mesh serve --no-batch`).
    pub unbatched_decode: bool,
    /// Pipeline decode steps hop by hop, not pushed (`mesh generate --hop-by-hop`).
    pub hop_by_hop: bool,
}

impl Default for ClientArgs {
    /// The CLI's defaults: no bootstrap, 30 s per stage, 10 s to find
    /// providers, 30 s per helper request, nobody trusted.
    fn default() -> Self {
        ClientArgs {
            bootstrap: Vec::new(),
            stage_timeout: 30.0,
            find_timeout: 10.0,
            helper_timeout: 30.0,
            trust: Vec::new(),
            unbatched_decode: false,
            hop_by_hop: false,
        }
    }
}

/// A node for `mesh generate --mesh`, `--private N --bootstrap ...` and
/// `mesh serve`: dials `bootstrap` (none: it can only generate locally),
/// listens nowhere.
pub fn client_node(args: ClientArgs) -> Result<Node, BoxError> {
    let mut config = P2pConfig::new(Identity::ephemeral());
    config.bootstrap = args.bootstrap;
    let find_timeout = seconds("--find-timeout", args.find_timeout)?;
    let options = NodeOptions {
        pipeline: PipelineConfig {
            stage_timeout: seconds("--stage-timeout", args.stage_timeout)?,
            find_timeout,
            push: !args.hop_by_hop,
            ..PipelineConfig::default()
        },
        private: mesh_core::node::PrivateConfig {
            find_timeout,
            helper_timeout: seconds("--helper-timeout", args.helper_timeout)?,
            selection: mesh_core::delegate::select::SelectionPolicy {
                trusted: args.trust,
                ..Default::default()
            },
            // Check vectors are the owner's secret: cached with the model, 0600.
            cache_dir: mesh_core::fetch::cache_dir().ok().map(|d| d.join("checks")),
        },
        unbatched_decode: args.unbatched_decode,
        ..NodeOptions::default()
    };
    Ok(Node::open(config, options)?)
}

/// `mesh find`.
pub fn find(
    bootstrap: Vec<Multiaddr>,
    model: String,
    layer: Option<u32>,
    timeout: f64,
) -> Result<(), BoxError> {
    if bootstrap.is_empty() {
        return Err("mesh find: expected at least one --bootstrap MULTIADDR".into());
    }
    let model = match ModelId::from_hex(&model) {
        Ok(id) => id,
        // Not an id: a model path (or `default`), identified by its hash.
        Err(_) => crate::load(&model, 1)?.info().id,
    };
    let timeout = seconds("--timeout", timeout)?;
    let rt = runtime()?;
    rt.block_on(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        let net = P2pNetwork::start(P2pConfig::new(Identity::ephemeral())).await?;
        let mut dialled = 0;
        let mut last_err = None;
        for addr in bootstrap {
            match tokio::time::timeout_at(deadline, net.dial(addr)).await {
                Ok(Ok(())) => dialled += 1,
                Ok(Err(e)) => last_err = Some(e),
                Err(_) => break,
            }
        }
        if dialled == 0 {
            let e: BoxError = match last_err {
                Some(e) => e.into(),
                None => mesh_core::Error::from(NetworkError::Timeout {
                    what: "a bootstrap connection".into(),
                    after: timeout,
                })
                .into(),
            };
            return Err(e);
        }
        // Records may still be propagating: ask again until something is found or time is up.
        let mut providers = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            providers = net.find_providers(model, layer, left).await?;
            if !providers.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200).min(left)).await;
        }
        let list: Vec<_> = providers
            .iter()
            .map(|p| {
                json!({
                    "peer_id": p.peer_id.to_string(), "layers": [p.layers.start, p.layers.end],
                    "addrs": p.addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                    "free_memory": p.free_memory, "tokens_per_sec": p.tokens_per_sec,
                })
            })
            .collect();
        println!("{}", json!({"providers": list}));
        net.shutdown().await?;
        Ok(())
    })
}

/// `mesh sim`.
pub fn sim(nodes: usize, seed: u64, churn: usize, loss: f64) -> Result<(), BoxError> {
    use mesh_core::network::sim::{simulate, SimConfig};
    if nodes < 2 || !(0.0..1.0).contains(&loss) {
        return Err(format!(
            "mesh sim: expected --nodes >= 2 and 0 <= --loss < 1, found {nodes} and {loss}"
        )
        .into());
    }
    let config = SimConfig {
        nodes,
        seed,
        churn_joins: churn,
        churn_leaves: churn.min(nodes / 2),
        loss,
        ..SimConfig::default()
    };
    // Virtual time: a current-thread runtime with the clock paused advances
    // straight to the next timer, so minutes of simulated time take seconds.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()?;
    let r = rt.block_on(simulate(config))?;
    let stats = |s: &mesh_core::network::memory::NetStats| {
        json!({"messages_sent": s.messages_sent, "messages_delivered": s.messages_delivered,
               "bytes_delivered": s.bytes_delivered, "messages_lost": s.messages_lost,
               "kad_messages": s.kad_messages})
    };
    println!(
        "{}",
        json!({
            "nodes_started": r.nodes_started, "live_nodes": r.live_nodes, "killed": r.killed,
            "shut_down": r.shut_down, "ranges": r.ranges, "converged": r.converged,
            "time_to_converge_s": r.time_to_converge.as_secs_f64(),
            "time_after_churn_s": r.time_after_churn.as_secs_f64(),
            "finds": r.finds, "find_time_mean_s": r.find_time_mean.as_secs_f64(),
            "find_time_max_s": r.find_time_max.as_secs_f64(), "messages_per_find": r.messages_per_find,
            "stats": stats(&r.stats), "stats_after_churn": stats(&r.stats_after_churn),
            "wall_time_s": r.wall_time.as_secs_f64(),
        })
    );
    if !r.converged {
        return Err("the simulated mesh did not converge".into());
    }
    Ok(())
}
