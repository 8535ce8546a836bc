//! Private-mode time per token over the in-memory network with 20 ms round
//! trips, against the model round trips x RTT + compute (the RTT as the
//! network delivers it: 20 ms plus the timer's granularity, timed in the
//! test). Its own test
//! binary, so no other test's graphs share the compute pool while it measures.

mod common;

use std::sync::Arc;
use std::time::Duration;

use mesh_core::delegate::select::SelectionPolicy;
use mesh_core::engine::{Engine, EngineOptions, GgmlEngine};
use mesh_core::generate::{GenerateParams, Prompt};
use mesh_core::network::memory::{LinkConfig, MemoryNet};
use mesh_core::network::{Identity, Limits};
use mesh_core::node::{GenerateRequest, Mode, Node, NodeOptions, PrivateConfig};
use mesh_core::sampling::SamplerParams;

#[test]
fn time_per_token_matches_round_trips_times_rtt_plus_compute() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let opts = EngineOptions::new().threads(common::THREADS).exact(true);
    let engine = Arc::new(GgmlEngine::load_with(common::model_path(), &opts).unwrap());
    let net = MemoryNet::new(13);
    let helpers: Vec<Node> = (0..2)
        .map(|_| {
            let id = Identity::ephemeral();
            let n = net.add_node(id.clone(), Limits::default());
            Node::with_network(Arc::new(n), rt.handle().clone(), NodeOptions::default())
                .with_identity(id)
                .unwrap()
        })
        .collect();
    let options = NodeOptions {
        private: PrivateConfig {
            selection: SelectionPolicy {
                trusted: helpers.iter().map(|h| h.peer_id()).collect(),
                ..SelectionPolicy::default()
            },
            ..PrivateConfig::default()
        },
        ..NodeOptions::default()
    };
    let owner = Node::with_network(
        Arc::new(net.add_node(Identity::ephemeral(), Limits::default())),
        rt.handle().clone(),
        options,
    );
    let hub = owner.listen_addrs().unwrap()[0].clone();
    for h in &helpers {
        h.dial(hub.clone()).unwrap();
        h.serve_helper(engine.clone()).unwrap();
    }
    // 10 ms each way: 20 ms round trips.
    net.set_default_link(LinkConfig {
        latency: Duration::from_millis(10),
        ..LinkConfig::default()
    });
    let req = GenerateRequest::new(
        Prompt::Text("The capital of France is".into()),
        GenerateParams {
            max_tokens: 5,
            sampler: SamplerParams::greedy(),
            ignore_eos: true,
            ..GenerateParams::default()
        },
    );
    // The round trip as this network delivers it (10 ms each way, plus the
    // timer's granularity): a small request to a helper, timed.
    let rtt_ms = {
        let (net, peer, model) = (
            owner.network().clone(),
            helpers[0].peer_id(),
            engine.info().id,
        );
        let start = std::time::Instant::now();
        rt.block_on(async {
            for _ in 0..10 {
                mesh_core::delegate::link::hello(&*net, peer, model, Duration::from_secs(5))
                    .await
                    .unwrap();
            }
        });
        start.elapsed().as_secs_f64() * 1e3 / 10.0
    };
    assert!(rtt_ms >= 20.0, "round trip {rtt_ms:.1} ms");
    let mode = Mode::Private {
        helpers: 2,
        spares: 0,
    };
    let out = owner
        .generate(&engine, &req, mode, None, &mut |_| true)
        .unwrap();
    let report = out.private.as_ref().unwrap();
    let steps = report.decode_steps as f64;
    assert_eq!(steps as usize, out.output.token_ids.len() - 1);
    let measured = out.output.generate_ms / steps;
    let d = &report.decode;
    let round_trips = d.round_trips as f64 / steps;
    assert_eq!(round_trips, 4.0 * engine.info().n_layers as f64 + 1.0);
    // Compute of the run itself: the helpers' (slowest per round trip, as
    // they report it) plus everything the owner does outside its waits
    // (sharing, sealing, checks, attention, norms, sampling).
    let helper_ms = d.helper_compute_nanos as f64 / 1e6 / steps;
    let owner_ms = measured - d.helper_nanos as f64 / 1e6 / steps;
    let predicted = round_trips * rtt_ms + helper_ms + owner_ms;
    eprintln!(
        "per token: measured {measured:.1} ms, model {predicted:.1} ms ({round_trips} round \
         trips x {rtt_ms:.2} ms + helpers {helper_ms:.1} ms + owner {owner_ms:.1} ms)"
    );
    assert!(
        (measured - predicted).abs() / predicted < 0.15,
        "measured {measured:.1} ms per token, model {predicted:.1} ms"
    );
}
