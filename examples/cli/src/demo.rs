//! `mesh demo`: a 3-node mesh on loopback (child `mesh node` processes,
//! each serving a third of the layers and helper duty), the same prompt
//! generated locally, through the pipeline and in private mode, and the
//! figures side by side; with `--serve`, `mesh serve` over that mesh.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::chat::ChatMessage;
use mesh_core::engine::{Engine, GgmlEngine};
use mesh_core::generate::{GenerateParams, Prompt};
use mesh_core::network::{Multiaddr, PeerId};
use mesh_core::node::{GenerateRequest, Mode, Node, NodeOutput};
use mesh_core::sampling::SamplerParams;
use serde_json::{json, Value};

use crate::BoxError;

/// What `mesh demo` was asked to do.
pub struct DemoArgs {
    pub prompt: String,
    pub max_tokens: usize,
    pub serve: bool,
    pub listen: std::net::SocketAddr,
    pub json: bool,
}

/// A child `mesh node`, killed when dropped.
struct Peer {
    child: Child,
    peer_id: PeerId,
    addr: Multiaddr,
    layers: (u32, u32),
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `mesh node` serving `layers` with helper duty and waits until it
/// serves (its stdout JSON lines say so).
fn start_peer(layers: (u32, u32), bootstrap: Option<&Multiaddr>) -> Result<Peer, BoxError> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.args(["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--threads", "1"])
        .args(["--serve", &format!("default:{}-{}", layers.0, layers.1)])
        .arg("--helper")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(b) = bootstrap {
        cmd.args(["--bootstrap", &b.to_string()]);
    }
    let mut child = cmd.spawn()?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<Value>();
    std::thread::spawn(move || {
        // Keep reading (and discarding after startup) so the child never
        // blocks on a full pipe.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                let _ = tx.send(v);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let (mut peer_id, mut addr, mut helping) = (None, None, false);
    while !(peer_id.is_some() && helping) {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = rx
            .recv_timeout(left)
            .map_err(|_| format!("node for layers {}-{} did not start", layers.0, layers.1))?;
        if let (Some(p), Some(l)) = (v["peer_id"].as_str(), v["listen"].as_array()) {
            peer_id = Some(p.parse::<PeerId>()?);
            addr = l
                .iter()
                .filter_map(|a| a.as_str())
                .find(|a| a.contains("/tcp/"))
                .map(String::from);
        }
        helping |= v["event"] == "helping";
    }
    let addr = addr.ok_or("the node listens on no TCP address")?;
    let peer_id = peer_id.ok_or("no peer id")?;
    let addr: Multiaddr = if addr.contains("/p2p/") {
        addr.parse()?
    } else {
        format!("{addr}/p2p/{peer_id}").parse()?
    };
    Ok(Peer {
        child,
        peer_id,
        addr,
        layers,
    })
}

fn run(
    node: &Node,
    engine: &Arc<GgmlEngine>,
    request: &GenerateRequest,
    mode: Mode,
) -> Result<NodeOutput, BoxError> {
    Ok(node.generate(engine, request, mode, None, &mut |_| true)?)
}

fn tps(out: &NodeOutput) -> f64 {
    out.output.token_ids.len() as f64 / (out.output.generate_ms / 1e3).max(1e-9)
}

/// `mesh demo`.
pub fn demo(args: DemoArgs) -> Result<(), BoxError> {
    let say = |s: &str| {
        if !args.json {
            eprintln!("{s}");
        }
    };
    say("mesh demo: fetching the default model (first run only)...");
    let path = crate::model_path("default")?;
    let engine = Arc::new(GgmlEngine::load(&path, 1)?);
    let n = engine.info().n_layers as u32;
    let ranges = [(0, n / 3), (n / 3, 2 * n / 3), (2 * n / 3, n)];
    let mut peers: Vec<Peer> = Vec::new();
    for (i, &r) in ranges.iter().enumerate() {
        say(&format!(
            "mesh demo: starting node {}/3 (layers {}-{}, helper duty)...",
            i + 1,
            r.0,
            r.1
        ));
        let boot = peers.first().map(|p| p.addr.clone());
        peers.push(start_peer(r, boot.as_ref())?);
    }
    let client = crate::net::client_node(crate::net::ClientArgs {
        bootstrap: peers.iter().map(|p| p.addr.clone()).collect(),
        stage_timeout: 30.0,
        find_timeout: 20.0,
        helper_timeout: 30.0,
        // All three run on this machine: the demo vouches for them.
        trust: peers.iter().map(|p| p.peer_id).collect(),
        unbatched_decode: false,
        hop_by_hop: false,
    })?;
    let request = GenerateRequest::new(
        Prompt::Chat(vec![ChatMessage::new("user", &args.prompt)]),
        GenerateParams {
            max_tokens: args.max_tokens,
            sampler: SamplerParams::greedy(),
            ..GenerateParams::default()
        },
    );
    say("mesh demo: generating locally...");
    let local = run(&client, &engine, &request, Mode::Local)?;
    say("mesh demo: generating through the pipeline (3 nodes)...");
    let pipeline = run(&client, &engine, &request, Mode::Pipeline)?;
    say("mesh demo: generating in private mode (2 helpers hold secret shares)...");
    let private = run(
        &client,
        &engine,
        &request,
        Mode::Private {
            helpers: 2,
            spares: 1,
        },
    )?;
    let p = pipeline.pipeline.as_ref().ok_or("no pipeline report")?;
    let q = private.private.as_ref().ok_or("no private report")?;
    let steps = q.decode_steps.max(1) as f64;
    let private_bytes = (q.decode.bytes_sent + q.decode.bytes_received) as f64 / steps;
    let layers_of = |peer: &PeerId| {
        peers
            .iter()
            .position(|x| &x.peer_id == peer)
            .map(|i| format!("node {}", i + 1))
            .unwrap_or_else(|| peer.to_string())
    };
    let summary = json!({
        "prompt": args.prompt,
        "local": {"text": local.output.text, "tokens_per_second": tps(&local)},
        "pipeline": {
            "text": pipeline.output.text,
            "same_as_local": pipeline.output.token_ids == local.output.token_ids,
            "tokens_per_second": tps(&pipeline),
            "plan": mesh_core::node::hops_json(&p.plan),
            "hop_ms": p.stats.hop_ms(),
            "bytes_per_token": p.stats.bytes_per_token(),
        },
        "private": {
            "text": private.output.text,
            "same_as_local": private.output.token_ids == local.output.token_ids,
            "tokens_per_second": tps(&private),
            "helpers": q.active.iter().filter_map(|&i| q.helpers.get(i)).map(|p| p.to_string()).collect::<Vec<_>>(),
            "round_trips_per_token": q.decode.round_trips as f64 / steps,
            "bytes_per_token": private_bytes,
            "checks_failed": q.stats.checks_failed,
        },
        "nodes": peers.iter().map(|p| json!({"peer_id": p.peer_id.to_string(), "layers": [p.layers.0, p.layers.1]})).collect::<Vec<_>>(),
    });
    if args.json {
        println!("{summary}");
    } else {
        println!("prompt:   {}", args.prompt);
        println!("answer:   {}", local.output.text.trim());
        println!();
        println!("mode       tokens/s  bytes/token  same text  where");
        println!(
            "local      {:>8.1}  {:>11}  {:>9}  this process, all {n} layers",
            tps(&local),
            "-",
            "-"
        );
        let plan: Vec<String> = p
            .plan
            .iter()
            .map(|h| {
                format!(
                    "{} {}-{}",
                    match &h.target {
                        mesh_core::pipeline::planner::Target::Peer(p) => layers_of(p),
                        t => t.to_string(),
                    },
                    h.layers.start,
                    h.layers.end
                )
            })
            .collect();
        println!(
            "pipeline   {:>8.1}  {:>11.0}  {:>9}  {} ({:.1} ms per hop)",
            tps(&pipeline),
            p.stats.bytes_per_token(),
            pipeline.output.token_ids == local.output.token_ids,
            plan.join(", "),
            p.stats.hop_ms()
        );
        let helpers: Vec<String> = q
            .active
            .iter()
            .filter_map(|&i| q.helpers.get(i))
            .map(layers_of)
            .collect();
        println!(
            "private    {:>8.1}  {:>11.0}  {:>9}  helpers {} ({:.0} round trips/token, {} failed checks)",
            tps(&private),
            private_bytes,
            private.output.token_ids == local.output.token_ids,
            helpers.join(" + "),
            q.decode.round_trips as f64 / steps,
            q.stats.checks_failed
        );
        println!();
        println!(
            "Private mode's answer may differ from local in late tokens: helpers compute exact \
             integer products, local ggml rounds as it accumulates (see README, exact mode)."
        );
    }
    if !args.serve {
        drop(peers);
        client.shutdown()?;
        return Ok(());
    }
    let engine = Arc::try_unwrap(engine).map_err(|_| "the engine is still shared")?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(args.listen))?;
    let state = mesh_serve::AppState::new(
        mesh_serve::served_model(&path, None, "default", engine, client)?,
        mesh_serve::ServeConfig {
            listen: args.listen,
            api_key: None,
            mode: Mode::Local,
            private: (2, 1),
            parallel: 2,
            queue: 8,
            max_body: 4 << 20,
            grace: Duration::from_secs(5),
            header_timeout: mesh_serve::HEADER_TIMEOUT,
        },
    );
    let url = format!("http://{}", listener.local_addr()?);
    println!("{}", json!({"listening": url}));
    eprintln!("mesh demo: chat at {url}/ (pick local, pipeline or private); Ctrl-C to stop");
    rt.block_on(mesh_serve::run(
        listener,
        state,
        mesh_serve::shutdown_signal(),
    ))?;
    drop(peers);
    Ok(())
}
