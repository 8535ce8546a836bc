//! One stage node serving the whole default model over libp2p on loopback,
//! driven by 1 and then 4 concurrent client sessions (separate client nodes,
//! one thread each) doing the same work: a prompt batch of 16 rows, then
//! single-token steps. Prints throughput (steps per second over all sessions)
//! and the p50 / p99 latency of one step, and checks every session's output
//! rows are bit-identical to the single session's (sessions do not disturb
//! each other). The point: the node's compute pool keeps concurrent sessions
//! from spinning against each other (ggml's workers spin), so 4 sessions
//! share the throughput of 1 instead of collapsing.
//!
//! `cargo bench -p mesh-benches --bench stages` ($MESH_THREADS compute
//! threads, default 2; $MESH_STEPS steps per session, default 48).

use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mesh_core::engine::{Engine, GgmlEngine};
use mesh_core::network::p2p::{P2pConfig, P2pNetwork};
use mesh_core::network::{Identity, Multiaddr, Network, PeerId, Request};
use mesh_core::node::{Node, NodeOptions};
use mesh_core::pipeline::protocol::{
    decode_rows, encode_request, encode_rows, DType, ErrorCode, ForwardMsg, OpenMsg, StageOp,
    StageReply, STAGE_METHOD,
};
use prost::Message;
use tokio::runtime::Handle;

const PROMPT: usize = 16;

fn steps() -> usize {
    std::env::var("MESH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(48)
}

fn call(
    rt: &Handle,
    net: &P2pNetwork,
    peer: PeerId,
    op: StageOp,
    rows: Bytes,
) -> (StageReply, Bytes) {
    let (meta, tensor) = encode_request(op, rows);
    let r = rt
        .block_on(net.request(
            peer,
            Request {
                method: STAGE_METHOD.into(),
                meta,
                tensor,
            },
            Duration::from_secs(120),
        ))
        .expect("stage request");
    let reply = StageReply::decode(r.meta.as_ref()).expect("stage reply");
    assert_eq!(reply.code(), ErrorCode::None, "{}", reply.message);
    (reply, r.tensor)
}

/// One client session: returns the per-step latencies and every output row.
fn session(
    rt: &Handle,
    engine: &GgmlEngine,
    stage: (PeerId, Multiaddr),
    start: &Barrier,
) -> (Vec<Duration>, Vec<f32>) {
    let net = rt
        .block_on(P2pNetwork::start(P2pConfig::new(Identity::ephemeral())))
        .unwrap();
    rt.block_on(net.dial(stage.1.clone())).unwrap();
    let n_layers = engine.info().n_layers as u32;
    let n = steps();
    let open = StageOp::Open(OpenMsg {
        model: engine.info().id.0.to_vec(),
        layer_start: 0,
        layer_end: n_layers,
        n_ctx: (PROMPT + n) as u64,
        exact: false,
        adapters: Vec::new(),
    });
    let (reply, _) = call(rt, &net, stage.0, open, Bytes::new());
    let id = reply.session;
    let tokens: Vec<u32> = (0..(PROMPT + n) as u32)
        .map(|i| 1 + i * 37 % 4000)
        .collect();
    let forward = |pos: usize, toks: &[u32]| {
        let h = engine.embed(toks, pos).unwrap();
        let op = StageOp::Forward(ForwardMsg {
            session: id,
            pos: pos as u64,
            n_tokens: toks.len() as u32,
            dtype: DType::F32 as i32,
            ..ForwardMsg::default()
        });
        let (_, out) = call(rt, &net, stage.0, op, encode_rows(&h.data, DType::F32));
        decode_rows(&out, DType::F32)
    };
    start.wait();
    let mut outputs = forward(0, &tokens[..PROMPT]);
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        outputs.extend(forward(PROMPT + i, &tokens[PROMPT + i..PROMPT + i + 1]));
        latencies.push(t.elapsed());
    }
    rt.block_on(net.shutdown()).unwrap();
    (latencies, outputs)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we use.
    let threads = mesh_benches::threads();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = Arc::new(GgmlEngine::load(mesh_benches::model_path(), threads).unwrap());
    let stage = Node::with_network(
        Arc::new(
            rt.block_on(P2pNetwork::start(
                P2pConfig::loopback(Identity::ephemeral()),
            ))
            .unwrap(),
        ),
        rt.handle().clone(),
        NodeOptions::default(),
    );
    stage
        .serve(engine.clone(), 0..engine.info().n_layers as u32)
        .unwrap();
    let addr = stage.listen_addrs().unwrap()[0].clone();
    let target = (stage.peer_id(), addr);
    let mut reference: Option<Vec<f32>> = None;
    println!("| sessions | steps/s (all sessions) | step p50 | step p99 |");
    println!("|---|---|---|---|");
    for k in [1usize, 4] {
        let start = Arc::new(Barrier::new(k));
        let began = Instant::now();
        let results: Vec<(Vec<Duration>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..k)
                .map(|_| {
                    let (rt, engine, target, start) = (
                        rt.handle().clone(),
                        engine.clone(),
                        target.clone(),
                        start.clone(),
                    );
                    s.spawn(move || session(&rt, &engine, target, &start))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let wall = began.elapsed();
        for (_, out) in &results {
            match &reference {
                None => reference = Some(out.clone()),
                Some(r) => assert!(
                    r == out,
                    "a concurrent session's rows differ from the single session's"
                ),
            }
        }
        let mut all: Vec<Duration> = results.iter().flat_map(|(l, _)| l.clone()).collect();
        all.sort();
        // Throughput over the decode phase: steps of all sessions / wall time
        // (the prompt batch included in the wall time is the same for each k).
        let total = all.len() as f64;
        println!(
            "| {k} | {:.1} | {:.1} ms | {:.1} ms |",
            total / wall.as_secs_f64(),
            percentile(&all, 0.5).as_secs_f64() * 1e3,
            percentile(&all, 0.99).as_secs_f64() * 1e3
        );
    }
    println!("\n(whole model on one stage, {threads} compute threads, outputs of every session identical)");
    stage.shutdown().unwrap();
}
