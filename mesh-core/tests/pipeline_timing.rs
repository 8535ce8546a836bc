//! Pipeline time per token over the in-memory network with 20 ms round trips,
//! against the model hops x RTT + compute. Its own test binary, so no other
//! test's graphs share the compute pool while it measures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use mesh_core::engine::GgmlEngine;
use mesh_core::generate::{GenerateParams, Prompt};
use mesh_core::network::memory::{LinkConfig, MemoryNet};
use mesh_core::network::{Identity, Limits};
use mesh_core::node::{GenerateRequest, Mode, Node, NodeOptions};
use mesh_core::sampling::SamplerParams;

/// Time per token against the model: hops x RTT + the compute the run did.
#[test]
fn time_per_token_matches_hops_times_rtt_plus_compute() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = Arc::new(GgmlEngine::load(common::model_path(), common::THREADS).unwrap());
    let net = MemoryNet::new(11);
    let node = || {
        let n = net.add_node(Identity::ephemeral(), Limits::default());
        Node::with_network(Arc::new(n), rt.handle().clone(), NodeOptions::default())
    };
    let client = node();
    let hub = client.listen_addrs().unwrap()[0].clone();
    let stages: Vec<Node> = [(0, 10), (10, 20), (20, 30)]
        .iter()
        .map(|&(a, b)| {
            let s = node();
            s.dial(hub.clone()).unwrap();
            s.serve(engine.clone(), a..b).unwrap();
            s
        })
        .collect();
    // 10 ms each way: 20 ms round trips.
    net.set_default_link(LinkConfig {
        latency: Duration::from_millis(10),
        ..LinkConfig::default()
    });
    let req = GenerateRequest::new(
        Prompt::Text("The capital of France is".into()),
        GenerateParams {
            max_tokens: 24,
            sampler: SamplerParams::greedy(),
            ignore_eos: true,
            ..GenerateParams::default()
        },
    );
    let per_step = |out: &mesh_core::node::NodeOutput| {
        out.output.generate_ms / (out.output.token_ids.len() - 1) as f64
    };
    let local = client
        .generate(&engine, &req, Mode::Local, None, &mut |_| true)
        .unwrap();
    let piped = client
        .generate(&engine, &req, Mode::Pipeline, None, &mut |_| true)
        .unwrap();
    let local_ms = per_step(&local);
    let measured = per_step(&piped);
    // The compute of the pipelined run itself, measured in it: what the
    // stages report computing per decode step, plus what the client does
    // outside its forward requests (embedding, head, sampling). (The local
    // run's step time, printed too, computes the same layers in one fused
    // graph and moves by several ms from run to run on a shared machine.)
    let stats = &piped.pipeline.as_ref().unwrap().stats;
    let steps = stats.decode_steps as f64;
    let stage_ms = stats.decode_compute_us as f64 / 1e3 / steps;
    let client_ms = measured - stats.decode_forward_nanos as f64 / 1e6 / steps;
    let compute = stage_ms + client_ms;
    let predicted = 3.0 * 20.0 + compute;
    eprintln!(
        "per token: measured {measured:.1} ms, model {predicted:.1} ms (3 hops x 20 ms + \
         {compute:.1} ms compute: stages {stage_ms:.1}, client {client_ms:.1}; local run \
         {local_ms:.1} ms); hop {:.1} ms",
        stats.hop_ms()
    );
    assert_eq!(stages.len(), 3);
    assert!(
        (measured - predicted).abs() / predicted < 0.15,
        "measured {measured:.1} ms per token, model {predicted:.1} ms"
    );
}
