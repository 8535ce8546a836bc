//! The in-memory network (mesh_core::network::memory) and the mesh
//! simulation, in virtual time: every test runs on a current-thread runtime
//! with paused time, so latencies are exact and runs are reproducible.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mesh_core::engine::ModelId;
use mesh_core::network::memory::{LinkConfig, MemoryNet, MemoryNetwork, NetStats};
use mesh_core::network::sim::{simulate, SimConfig};
use mesh_core::network::{
    Announcement, Event, Identity, Limits, Network, NetworkError, Request, Response, Validation,
    ANNOUNCE_TOPIC,
};
use tokio::time::Instant;

const MODEL: ModelId = ModelId([7; 32]);

fn identity(i: u8) -> Identity {
    Identity::from_seed([i; 32])
}

fn network_error(e: mesh_core::Error) -> NetworkError {
    match e {
        mesh_core::Error::Network(n) => n,
        other => panic!("expected a network error, found {other}"),
    }
}

/// `n` nodes, all bootstrapped through node 0; node i (i ≥ 1) serves layers
/// 8(i-1)..8i of MODEL.
async fn mesh(net: &MemoryNet, n: u8) -> Vec<MemoryNetwork> {
    let nodes: Vec<MemoryNetwork> = (0..n)
        .map(|i| net.add_node(identity(i + 1), Limits::default()))
        .collect();
    let boot = nodes[0].listen_addrs().await.unwrap()[0].clone();
    for node in &nodes[1..] {
        node.dial(boot.clone()).await.unwrap();
    }
    for (i, node) in nodes.iter().enumerate().skip(1) {
        let i = i as u32;
        node.announce(Announcement {
            model: MODEL,
            layers: 8 * (i - 1)..8 * i,
            free_memory: 1 << 30,
            tokens_per_sec: 10.0 * i as f32,
        })
        .await
        .unwrap();
    }
    nodes
}

async fn echo_server(node: &MemoryNetwork, method: &str) {
    let mut rx = node.handle(method).await.unwrap();
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let response = Response {
                meta: req.request.meta.clone(),
                tensor: req.request.tensor.clone(),
            };
            req.respond(response);
        }
    });
}

fn request(method: &str, tensor: usize) -> Request {
    Request {
        method: method.into(),
        meta: Bytes::from_static(b"meta"),
        tensor: Bytes::from(vec![0xab; tensor]),
    }
}

#[tokio::test(start_paused = true)]
async fn five_nodes_find_layer_range_providers_from_every_node() {
    let net = MemoryNet::new(1);
    let nodes = mesh(&net, 5).await;
    for (i, node) in nodes.iter().enumerate() {
        for layer in [0u32, 9, 17, 31] {
            let found = node
                .find_providers(MODEL, Some(layer), Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(found.len(), 1, "node {i}, layer {layer}: {found:?}");
            let p = &found[0];
            assert!(p.layers.contains(&layer));
            assert_eq!(p.peer_id, nodes[1 + layer as usize / 8].local_peer_id());
            assert_eq!(
                p.addrs,
                nodes[1 + layer as usize / 8].listen_addrs().await.unwrap()
            );
            assert_eq!(p.free_memory, 1 << 30);
        }
        let all = node
            .find_providers(MODEL, None, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(all.len(), 4, "node {i}");
        let none = node
            .find_providers(MODEL, Some(40), Duration::from_secs(10))
            .await
            .unwrap();
        assert!(none.is_empty());
    }
    // A withdrawn range is no longer found; a killed provider is dropped.
    nodes[1].withdraw(MODEL).await.unwrap();
    net.kill(nodes[2].local_peer_id());
    let found = nodes[0]
        .find_providers(MODEL, None, Duration::from_secs(10))
        .await
        .unwrap();
    let peers: Vec<_> = found.iter().map(|p| p.peer_id).collect();
    let mut expected = vec![nodes[3].local_peer_id(), nodes[4].local_peer_id()];
    expected.sort();
    assert_eq!(peers, expected);
    assert!(net.stats().lookups > 0 && net.stats().kad_messages > 0);
}

#[tokio::test(start_paused = true)]
async fn gossip_reaches_every_node_and_announcements_become_events() {
    let net = MemoryNet::new(2);
    let nodes: Vec<MemoryNetwork> = (0..5)
        .map(|i| net.add_node(identity(i + 1), Limits::default()))
        .collect();
    // A line 0-1-2-3-4: messages must be forwarded.
    for w in nodes.windows(2) {
        w[1].dial(w[0].listen_addrs().await.unwrap()[0].clone())
            .await
            .unwrap();
    }
    let mut subs = Vec::new();
    let mut events = Vec::new();
    for node in &nodes {
        subs.push(node.subscribe("news").await.unwrap());
        events.push(node.events());
    }
    nodes[0]
        .publish("news", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    for (i, sub) in subs.iter_mut().enumerate().skip(1) {
        let msg = sub.recv().await.unwrap();
        assert_eq!(msg.data, Bytes::from_static(b"hello"), "node {i}");
        assert_eq!(msg.source, nodes[0].local_peer_id());
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(subs[0].try_recv().is_err(), "no echo of one's own message");
    assert!(subs[4].try_recv().is_err(), "delivered once");

    nodes[4]
        .announce(Announcement {
            model: MODEL,
            layers: 0..4,
            free_memory: 1,
            tokens_per_sec: 1.0,
        })
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, ev) in events.iter_mut().enumerate().take(4) {
        let mut seen = false;
        while let Ok(e) = ev.try_recv() {
            if let Event::ProvidersChanged {
                model,
                peer,
                layers,
            } = e
            {
                assert_eq!((model, peer), (MODEL, nodes[4].local_peer_id()));
                assert_eq!(layers, Some(0..4));
                seen = true;
            }
        }
        assert!(seen, "node {i} saw the announcement");
    }
    let too_big = Bytes::from(vec![0; (1 << 20) + 1]);
    let err = network_error(nodes[0].publish("news", too_big).await.unwrap_err());
    assert!(matches!(err, NetworkError::TooLarge { .. }), "{err}");
    // A graceful shutdown withdraws.
    nodes[4].shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut withdrawn = false;
    while let Ok(e) = events[3].try_recv() {
        withdrawn |= matches!(e, Event::ProvidersChanged { layers: None, .. });
    }
    assert!(withdrawn);
    let err = network_error(nodes[4].connected_peers().await.unwrap_err());
    assert_eq!(err, NetworkError::Shutdown);
}

#[tokio::test(start_paused = true)]
async fn validator_rejecting_a_message_stops_its_forwarding() {
    let net = MemoryNet::new(3);
    let nodes: Vec<MemoryNetwork> = (0..3)
        .map(|i| net.add_node(identity(i + 1), Limits::default()))
        .collect();
    for w in nodes.windows(2) {
        w[1].dial(w[0].listen_addrs().await.unwrap()[0].clone())
            .await
            .unwrap();
    }
    let mut subs = Vec::new();
    for node in &nodes {
        subs.push(node.subscribe("t").await.unwrap());
    }
    nodes[1]
        .set_validator(
            "t",
            Arc::new(|_, data: &[u8]| {
                if data.starts_with(b"bad") {
                    Validation::Reject
                } else {
                    Validation::Accept
                }
            }),
        )
        .await
        .unwrap();
    nodes[0]
        .publish("t", Bytes::from_static(b"bad message"))
        .await
        .unwrap();
    nodes[0]
        .publish("t", Bytes::from_static(b"good message"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in [1, 2] {
        assert_eq!(
            subs[i].try_recv().unwrap().data,
            Bytes::from_static(b"good message"),
            "node {i}"
        );
        assert!(subs[i].try_recv().is_err(), "node {i} got the bad message");
    }
    assert_eq!(net.stats().gossip_rejected, 1);
    // Malformed announce gossip is rejected by the built-in validation.
    nodes[0]
        .publish(ANNOUNCE_TOPIC, Bytes::from_static(b"\xff\xff"))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(net.stats().gossip_rejected, 2);
}

#[tokio::test(start_paused = true)]
async fn one_mib_round_trip_and_latency_in_virtual_time() {
    let net = MemoryNet::new(4);
    let a = net.add_node(identity(1), Limits::default());
    let b = net.add_node(identity(2), Limits::default());
    net.set_link(
        a.local_peer_id(),
        b.local_peer_id(),
        LinkConfig {
            latency: Duration::from_millis(20),
            bandwidth_bytes_per_sec: None,
            loss: 0.0,
        },
    );
    echo_server(&b, "echo").await;
    // Not connected yet: the request dials first (one round trip).
    let t = Instant::now();
    let r = a
        .request(
            b.local_peer_id(),
            request("echo", 1 << 20),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
    assert_eq!(r.tensor.len(), 1 << 20);
    assert!(r.tensor.iter().all(|&x| x == 0xab));
    assert_eq!(r.meta, Bytes::from_static(b"meta"));
    assert_eq!(t.elapsed(), Duration::from_millis(80));
    assert_eq!(
        a.rtt(b.local_peer_id()).await.unwrap(),
        Some(Duration::from_millis(40))
    );
    // Connected: one round trip.
    let t = Instant::now();
    a.request(
        b.local_peer_id(),
        request("echo", 10),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(t.elapsed(), Duration::from_millis(40));
    // Bandwidth: 1 MiB each way at 1 MiB/s adds 2 s.
    net.set_link(
        a.local_peer_id(),
        b.local_peer_id(),
        LinkConfig {
            latency: Duration::from_millis(20),
            bandwidth_bytes_per_sec: Some(1 << 20),
            loss: 0.0,
        },
    );
    let t = Instant::now();
    a.request(
        b.local_peer_id(),
        request("echo", 1 << 20),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(2040) && took < Duration::from_millis(2060),
        "{took:?}"
    );
    // A deadline shorter than the transfer is a timeout.
    let err = network_error(
        a.request(
            b.local_peer_id(),
            request("echo", 1 << 20),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err(),
    );
    assert!(matches!(err, NetworkError::Timeout { .. }), "{err}");
    // Total loss: the request is never answered.
    net.set_link(
        a.local_peer_id(),
        b.local_peer_id(),
        LinkConfig {
            latency: Duration::from_millis(20),
            bandwidth_bytes_per_sec: None,
            loss: 1.0,
        },
    );
    let err = network_error(
        a.request(
            b.local_peer_id(),
            request("echo", 1),
            Duration::from_secs(3),
        )
        .await
        .unwrap_err(),
    );
    assert!(matches!(err, NetworkError::Timeout { .. }), "{err}");
    assert!(net.stats().messages_lost >= 1);
    assert!(net.stats().bytes_delivered > 4 << 20);
}

/// In virtual time: a request fails at the very instant its peer is killed,
/// and the caller sees the peer leave. (What every implementation must do
/// with a killed peer is in `network_conformance.rs`.)
#[tokio::test(start_paused = true)]
async fn a_killed_peer_fails_requests_at_the_instant_of_the_kill() {
    let net = MemoryNet::new(6);
    let a = net.add_node(identity(1), Limits::default());
    let b = net.add_node(identity(2), Limits::default());
    let mut events = a.events();
    let mut rx = b.handle("slow").await.unwrap();
    // The handler takes the request and never answers.
    let held = tokio::spawn(async move {
        let req = rx.recv().await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        drop(req);
    });
    let killer = {
        let net = net.clone();
        let peer = b.local_peer_id();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            net.kill(peer);
        })
    };
    let t = Instant::now();
    let err = network_error(
        a.request(
            b.local_peer_id(),
            request("slow", 10),
            Duration::from_secs(60),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(
        err,
        NetworkError::ConnectionClosed {
            peer: b.local_peer_id()
        }
    );
    assert_eq!(t.elapsed(), Duration::from_secs(1));
    killer.await.unwrap();
    held.abort();
    let mut disconnected = false;
    while let Ok(e) = events.try_recv() {
        disconnected |= e
            == Event::PeerDisconnected {
                peer: b.local_peer_id(),
            };
    }
    assert!(disconnected);
    assert_eq!(
        network_error(b.listen_addrs().await.unwrap_err()),
        NetworkError::Shutdown
    );
}

#[tokio::test(start_paused = true)]
async fn partitions_fail_requests_and_heal_restores_them() {
    let net = MemoryNet::new(7);
    let nodes: Vec<MemoryNetwork> = (0..4)
        .map(|i| net.add_node(identity(i + 1), Limits::default()))
        .collect();
    for n in &nodes {
        echo_server(n, "echo").await;
    }
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    a.request(
        b.local_peer_id(),
        request("echo", 10),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    net.partition(&[
        vec![a.local_peer_id(), nodes[3].local_peer_id()],
        vec![b.local_peer_id(), c.local_peer_id()],
    ]);
    // Connected across the split: the message is dropped, the deadline hits.
    let err = network_error(
        a.request(
            b.local_peer_id(),
            request("echo", 10),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err(),
    );
    assert!(matches!(err, NetworkError::Timeout { .. }), "{err}");
    // Not connected: the dial fails.
    let err = network_error(
        a.request(
            c.local_peer_id(),
            request("echo", 10),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err(),
    );
    assert!(matches!(err, NetworkError::Dial { .. }), "{err}");
    // Within a group it works.
    a.request(
        nodes[3].local_peer_id(),
        request("echo", 10),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    net.heal();
    a.request(
        b.local_peer_id(),
        request("echo", 10),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    a.request(
        c.local_peer_id(),
        request("echo", 10),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
}

/// A scenario touching discovery, gossip, requests and loss; returns what it saw.
async fn scenario(seed: u64) -> (NetStats, Vec<Vec<String>>) {
    let t0 = Instant::now();
    let net = MemoryNet::new(seed);
    net.set_default_link(LinkConfig {
        latency: Duration::from_millis(7),
        bandwidth_bytes_per_sec: Some(10 << 20),
        loss: 0.05,
    });
    let nodes = mesh(&net, 8).await;
    let mut results = Vec::new();
    for node in &nodes {
        echo_server(node, "echo").await;
    }
    for node in &nodes {
        let found = node
            .find_providers(MODEL, Some(20), Duration::from_secs(20))
            .await
            .unwrap();
        let r = node
            .request(
                nodes[3].local_peer_id(),
                request("echo", 5000),
                Duration::from_secs(2),
            )
            .await;
        results.push(vec![
            format!("{:?}", found.iter().map(|p| p.peer_id).collect::<Vec<_>>()),
            format!("{:?}", r.map(|r| r.tensor.len()).map_err(|e| e.to_string())),
            format!("{:?}", t0.elapsed()),
        ]);
    }
    let stats = net.stats();
    net.kill_all();
    (stats, results)
}

#[tokio::test(start_paused = true)]
async fn the_same_seed_gives_the_same_run() {
    let (s1, r1) = scenario(42).await;
    let (s2, r2) = scenario(42).await;
    assert_eq!(s1, s2);
    assert_eq!(r1, r2);
    assert!(s1.messages_lost > 0, "{s1:?}");
    let (s3, _) = scenario(43).await;
    assert_ne!(s1, s3, "another seed, other losses");
}

#[tokio::test(start_paused = true)]
async fn small_simulations_are_reproducible() {
    let cfg = SimConfig {
        nodes: 30,
        churn_joins: 5,
        churn_leaves: 5,
        loss: 0.01,
        ..SimConfig::default()
    };
    let mut a = simulate(cfg.clone()).await.unwrap();
    let mut b = simulate(cfg).await.unwrap();
    assert!(a.converged, "{a}");
    a.wall_time = Duration::ZERO;
    b.wall_time = Duration::ZERO;
    assert_eq!(a, b);
}

#[tokio::test(start_paused = true)]
async fn simulation_of_200_nodes_with_churn_converges() {
    let cfg = SimConfig::default();
    let report = simulate(cfg.clone()).await.unwrap();
    println!("simulation: {cfg:?}\n{report}");
    assert!(report.converged, "{report}");
    assert_eq!(report.nodes_started, 240);
    assert!(report.live_nodes >= 190, "{report}");
}

#[tokio::test(start_paused = true)]
async fn simulation_of_200_nodes_with_churn_and_loss_converges() {
    let cfg = SimConfig {
        seed: 2,
        loss: 0.01,
        ..SimConfig::default()
    };
    let report = simulate(cfg.clone()).await.unwrap();
    println!("simulation with 1% loss: {cfg:?}\n{report}");
    assert!(report.converged, "{report}");
    assert!(report.stats.messages_lost > 0, "{report}");
}
