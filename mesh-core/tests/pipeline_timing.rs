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

/// Time per token against the model: links crossed x one-way latency (as
/// the network delivers it: 10 ms plus the timer's granularity) + the
/// compute the run did. Hop by hop a token crosses 2 links per hop (3 hops: 6
/// x 10 ms); pushed from stage to stage, hops + 1 (4 x 10 ms).
#[test]
fn time_per_token_matches_hops_times_rtt_plus_compute() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = Arc::new(GgmlEngine::load(common::model_path(), common::THREADS).unwrap());
    let net = MemoryNet::new(11);
    let node = |options: NodeOptions| {
        let n = net.add_node(Identity::ephemeral(), Limits::default());
        Node::with_network(Arc::new(n), rt.handle().clone(), options)
    };
    let pushed = node(NodeOptions::default());
    let hub = pushed.listen_addrs().unwrap()[0].clone();
    let mut options = NodeOptions::default();
    options.pipeline.push = false;
    let hop_by_hop = node(options);
    hop_by_hop.dial(hub.clone()).unwrap();
    let stages: Vec<Node> = [(0, 10), (10, 20), (20, 30)]
        .iter()
        .map(|&(a, b)| {
            let s = node(NodeOptions::default());
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
    // The round trip as this network delivers it (10 ms each way, plus the
    // timer's granularity): a small request to a stage (refused as
    // malformed, which needs no compute), timed.
    let rtt_ms = {
        let (net, peer) = (pushed.network().clone(), stages[1].peer_id());
        let start = std::time::Instant::now();
        rt.block_on(async {
            for _ in 0..10 {
                let request = mesh_core::network::Request {
                    method: mesh_core::pipeline::STAGE_METHOD.into(),
                    meta: Default::default(),
                    tensor: Default::default(),
                };
                net.request(peer, request, Duration::from_secs(5))
                    .await
                    .unwrap();
            }
        });
        start.elapsed().as_secs_f64() * 1e3 / 10.0
    };
    assert!(rtt_ms >= 20.0, "round trip {rtt_ms:.1} ms");
    let per_step = |out: &mesh_core::node::NodeOutput| {
        out.output.generate_ms / (out.output.token_ids.len() - 1) as f64
    };
    let local = pushed
        .generate(&engine, &req, Mode::Local, None, &mut |_| true)
        .unwrap();
    let local_ms = per_step(&local);
    let mut measured_ms = Vec::new();
    for (client, links, name) in [(&hop_by_hop, 6.0, "hop by hop"), (&pushed, 4.0, "pushed")] {
        let piped = client
            .generate(&engine, &req, Mode::Pipeline, None, &mut |_| true)
            .unwrap();
        assert_eq!(piped.output.token_ids, local.output.token_ids);
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
        let predicted = links * rtt_ms / 2.0 + compute;
        eprintln!(
            "{name}: per token measured {measured:.1} ms, model {predicted:.1} ms ({links} links \
             x {:.2} ms + {compute:.1} ms compute: stages {stage_ms:.1}, client {client_ms:.1}; \
             local run {local_ms:.1} ms); hop {:.1} ms; {} of {} steps pushed",
            rtt_ms / 2.0,
            stats.hop_ms(),
            stats.pushed_steps,
            stats.decode_steps,
        );
        assert_eq!(stats.pushed_steps > 0, links == 4.0);
        assert!(
            (measured - predicted).abs() / predicted < 0.15,
            "{name}: measured {measured:.1} ms per token, model {predicted:.1} ms"
        );
        measured_ms.push(measured);
    }
    assert_eq!(stages.len(), 3);
    eprintln!(
        "pushed / hop by hop: {:.2}",
        measured_ms[1] / measured_ms[0]
    );
}
