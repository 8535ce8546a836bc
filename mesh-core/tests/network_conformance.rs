//! One suite, both implementations: every scenario here runs over
//! `Arc<dyn Network>` against the libp2p network on loopback and the
//! in-memory one, and must behave the same (the same results, the same error
//! variants). Behaviour only one implementation has (sockets, relays,
//! simulated loss, churn) stays in `network_p2p.rs`, `network_sim.rs` and the
//! in-memory module's unit tests.

mod common;
use common::eventually;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use mesh_core::model_id::ModelId;
use mesh_core::network::memory::MemoryNet;
use mesh_core::network::p2p::{P2pConfig, P2pNetwork};
use mesh_core::network::{
    Announcement, Identity, Limits, Network, NetworkError, RemoteStatus, Request, Response,
    DESCRIBE_METHOD, MAX_TOPIC_LEN,
};
use mesh_core::Error;
use tokio::time::Instant;

const MODEL: ModelId = ModelId([9; 32]);

#[derive(Clone, Copy, Debug)]
enum Kind {
    P2p,
    Memory,
}

const KINDS: [Kind; 2] = [Kind::P2p, Kind::Memory];

/// Where a test's nodes live: loopback sockets, or one in-memory world.
enum World {
    P2p,
    Memory(MemoryNet),
}

impl World {
    fn new(kind: Kind, seed: u8) -> World {
        match kind {
            Kind::P2p => World::P2p,
            Kind::Memory => World::Memory(MemoryNet::new(u64::from(seed))),
        }
    }

    /// A node with identity `seed` and `limits`.
    async fn node(&self, seed: u8, limits: Limits) -> Arc<dyn Network> {
        match self {
            World::P2p => {
                let mut config = P2pConfig::loopback(Identity::from_seed([seed; 32]));
                config.limits = limits;
                config.gossip_heartbeat = Duration::from_millis(200);
                Arc::new(P2pNetwork::start(config).await.expect("node starts"))
            }
            World::Memory(net) => Arc::new(net.add_node(Identity::from_seed([seed; 32]), limits)),
        }
    }

    /// Messages the world has carried, where it counts them.
    fn messages_sent(&self) -> Option<u64> {
        match self {
            World::P2p => None,
            World::Memory(net) => Some(net.stats().messages_sent),
        }
    }

    /// Kill `node` without a goodbye: its tasks stop and its connections
    /// close (the libp2p swarm task is aborted when its last handle drops).
    fn kill(&self, node: Arc<dyn Network>) {
        match self {
            World::P2p => {
                assert_eq!(
                    Arc::strong_count(&node),
                    1,
                    "the test holds the last handle"
                );
                drop(node);
            }
            World::Memory(net) => assert!(net.kill(node.local_peer_id())),
        }
    }
}

/// Dial `b` from `a` on one of `b`'s stream addresses.
async fn connect(a: &Arc<dyn Network>, b: &Arc<dyn Network>) {
    let addrs = b.listen_addrs().await.unwrap();
    let addr = addrs
        .iter()
        .find(|a| !a.to_string().contains("/udp/"))
        .expect("a stream address")
        .clone();
    a.dial(addr).await.unwrap();
}

/// Two nodes of `kind` with default limits, `a` dialled to `b` (the
/// in-memory world is kept alive by its nodes).
async fn pair(kind: Kind, seed: u8) -> (Arc<dyn Network>, Arc<dyn Network>) {
    let world = World::new(kind, seed);
    let a = world.node(seed, Limits::default()).await;
    let b = world.node(seed + 1, Limits::default()).await;
    connect(&a, &b).await;
    (a, b)
}

/// A handler for `method` that answers with the tensor reversed.
async fn echo(node: &Arc<dyn Network>, method: &str) {
    let mut rx = node.handle(method).await.unwrap();
    tokio::spawn(async move {
        while let Some(req) = rx.recv().await {
            let mut t = req.request.tensor.to_vec();
            t.reverse();
            let meta = req.request.meta.clone();
            req.respond(Response {
                meta,
                tensor: Bytes::from(t),
            });
        }
    });
}

async fn close(nodes: &[&Arc<dyn Network>]) {
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

fn gossip_err(r: mesh_core::Result<impl Sized>) -> bool {
    matches!(r, Err(Error::Network(NetworkError::Gossip(_))))
}

fn method_err(r: mesh_core::Result<impl Sized>) -> bool {
    matches!(r, Err(Error::Network(NetworkError::Method { .. })))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_and_method_names_are_checked_alike() {
    for kind in KINDS {
        let (a, b) = pair(kind, 10).await;
        let long = "t".repeat(MAX_TOPIC_LEN + 1);
        for topic in ["", "a\nb", "tab\there", long.as_str()] {
            assert!(
                gossip_err(a.subscribe(topic).await),
                "{kind:?} subscribe {topic:?}"
            );
            let publish = a.publish(topic, Bytes::from_static(b"x")).await;
            assert!(gossip_err(publish), "{kind:?} publish {topic:?}");
            let validate = a
                .set_validator(
                    topic,
                    Arc::new(|_, _| mesh_core::network::Validation::Accept),
                )
                .await;
            assert!(gossip_err(validate), "{kind:?} validator {topic:?}");
        }
        let longest = "t".repeat(MAX_TOPIC_LEN);
        for topic in ["mesh/ok", "ünïcode topic", longest.as_str()] {
            assert!(a.subscribe(topic).await.is_ok(), "{kind:?} {topic:?}");
        }
        let long = "m".repeat(65);
        for method in ["", "with space", "tab\t", DESCRIBE_METHOD, long.as_str()] {
            assert!(
                method_err(a.handle(method).await),
                "{kind:?} handle {method:?}"
            );
        }
        assert!(a.handle("test/ok").await.is_ok(), "{kind:?}");
        close(&[&a, &b]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_rejected_or_unknown_alike() {
    for kind in KINDS {
        let (a, b) = pair(kind, 20).await;
        let mut rx = b.handle("test/echo").await.unwrap();
        tokio::spawn(async move {
            while let Some(req) = rx.recv().await {
                if req.request.meta.as_ref() == b"refuse" {
                    req.reject("not this one");
                    continue;
                }
                let mut t = req.request.tensor.to_vec();
                t.reverse();
                let meta = req.request.meta.clone();
                req.respond(Response {
                    meta,
                    tensor: Bytes::from(t),
                });
            }
        });
        let request = |method: &str, meta: &'static [u8]| Request {
            method: method.into(),
            meta: Bytes::from_static(meta),
            tensor: Bytes::from((0..=255u8).collect::<Vec<u8>>()),
        };
        let timeout = Duration::from_secs(10);
        let peer = b.local_peer_id();

        let r = a
            .request(peer, request("test/echo", b"m"), timeout)
            .await
            .unwrap();
        assert_eq!(r.meta.as_ref(), b"m", "{kind:?}");
        assert_eq!(
            r.tensor.to_vec(),
            (0..=255u8).rev().collect::<Vec<_>>(),
            "{kind:?}"
        );

        let status = |r: mesh_core::Result<Response>| match r {
            Err(Error::Network(NetworkError::Remote { status, .. })) => Some(status),
            _ => None,
        };
        let refused = a
            .request(peer, request("test/echo", b"refuse"), timeout)
            .await;
        assert_eq!(status(refused), Some(RemoteStatus::Rejected), "{kind:?}");
        let unknown = a.request(peer, request("test/nobody", b"m"), timeout).await;
        assert_eq!(
            status(unknown),
            Some(RemoteStatus::UnknownMethod),
            "{kind:?}"
        );
        // The built-in describe answers without any handler.
        let described = a
            .request(peer, request(DESCRIBE_METHOD, b""), timeout)
            .await;
        assert!(described.is_ok(), "{kind:?}: {described:?}");
        close(&[&a, &b]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_reaches_a_subscriber_and_the_validator_decides_alike() {
    for kind in KINDS {
        let (a, b) = pair(kind, 30).await;
        let mut rx = b.subscribe("test/topic").await.unwrap();
        // The subscriber drops messages that start with "bad".
        b.set_validator(
            "test/topic",
            Arc::new(|_, data: &[u8]| {
                if data.starts_with(b"bad") {
                    mesh_core::network::Validation::Reject
                } else {
                    mesh_core::network::Validation::Accept
                }
            }),
        )
        .await
        .unwrap();
        a.subscribe("test/topic").await.unwrap();
        // Publish until the first one arrives (gossipsub needs a heartbeat to
        // learn the subscription); a rejected one published just before must
        // never arrive.
        let mut got = None;
        let until = Instant::now() + Duration::from_secs(20);
        let mut i = 0u32;
        while got.is_none() && Instant::now() < until {
            i += 1;
            let _ = a
                .publish("test/topic", Bytes::from(format!("bad {i}")))
                .await;
            let _ = a
                .publish("test/topic", Bytes::from(format!("good {i}")))
                .await;
            if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
                got = Some(m);
            }
        }
        let m = got.unwrap_or_else(|| panic!("{kind:?}: no gossip within 20 s"));
        assert!(m.data.starts_with(b"good"), "{kind:?}: {:?}", m.data);
        assert_eq!(m.source, a.local_peer_id(), "{kind:?}");
        assert_eq!(m.topic, "test/topic", "{kind:?}");
        while let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(300), rx.recv()).await {
            assert!(m.data.starts_with(b"good"), "{kind:?}: {:?}", m.data);
        }
        close(&[&a, &b]).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn announced_layers_are_found_and_withdrawn_alike() {
    for kind in KINDS {
        let (a, b) = pair(kind, 40).await;
        a.announce(Announcement {
            model: MODEL,
            layers: 5..12,
            free_memory: 1 << 30,
            tokens_per_sec: 50.0,
        })
        .await
        .unwrap();
        let a_id = a.local_peer_id();
        let found = |layer: Option<u32>| {
            let b = b.clone();
            async move {
                b.find_providers(MODEL, layer, Duration::from_secs(2))
                    .await
                    .unwrap()
            }
        };
        eventually(
            &format!("{kind:?}: provider of layer 7"),
            Duration::from_secs(20),
            || {
                let f = found(Some(7));
                async move {
                    f.await
                        .iter()
                        .any(|p| p.peer_id == a_id && p.layers == (5..12))
                }
            },
        )
        .await;
        // A layer outside the range is not served by `a`.
        assert!(
            found(Some(12)).await.iter().all(|p| p.peer_id != a_id),
            "{kind:?}"
        );
        a.withdraw(MODEL).await.unwrap();
        eventually(
            &format!("{kind:?}: withdrawn"),
            Duration::from_secs(20),
            || {
                let f = found(None);
                async move { f.await.iter().all(|p| p.peer_id != a_id) }
            },
        )
        .await;
        close(&[&a, &b]).await;
    }
}

fn request(method: &str, bytes: usize) -> Request {
    Request {
        method: method.into(),
        meta: Bytes::new(),
        tensor: Bytes::from(vec![1u8; bytes]),
    }
}

/// A request over the receiver's limit is refused by the receiver, after it
/// reads only the length, with a TooLarge status; one over the sender's own
/// limit is refused before anything is sent; the connection keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_limit_requests_are_typed_errors_on_both_sides_alike() {
    for kind in KINDS {
        let world = World::new(kind, 50);
        let small = Limits {
            max_request_bytes: 64 << 10,
            ..Limits::default()
        };
        let big = 128 << 10;
        let a = world.node(50, Limits::default()).await;
        let b = world.node(51, small.clone()).await;
        let c = world.node(52, small).await;
        echo(&a, "test/echo").await;
        echo(&b, "test/echo").await;
        connect(&a, &b).await;
        connect(&c, &a).await;
        let t = Duration::from_secs(20);

        let err = a
            .request(b.local_peer_id(), request("test/echo", big), t)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Network(NetworkError::Remote {
                    status: RemoteStatus::TooLarge,
                    ..
                })
            ),
            "{kind:?}: {err}"
        );

        let before = world.messages_sent();
        let err = c
            .request(a.local_peer_id(), request("test/echo", big), t)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::Network(NetworkError::TooLarge {
                    what: "request",
                    limit: 65536,
                    ..
                })
            ),
            "{kind:?}: {err}"
        );
        assert_eq!(world.messages_sent(), before, "{kind:?}: nothing sent");

        let ok = a
            .request(b.local_peer_id(), request("test/echo", 100), t)
            .await
            .unwrap();
        assert_eq!(ok.tensor.len(), 100, "{kind:?}");
        close(&[&a, &b, &c]).await;
    }
}

/// A peer that stalls costs the caller its deadline (a Timeout); a peer
/// killed mid-request fails the request at once with a connection error,
/// never a hang or a Timeout, and later requests to it fail to dial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_request_gives_an_error_not_a_hang_alike() {
    for kind in KINDS {
        let world = World::new(kind, 60);
        let client = world.node(60, Limits::default()).await;
        let server = world.node(61, Limits::default()).await;
        connect(&client, &server).await;
        let server_id = server.local_peer_id();
        // A handler that takes requests and never answers.
        let mut rx = server.handle("test/stall").await.unwrap();
        let (got_tx, got_rx) = tokio::sync::oneshot::channel();
        let held = tokio::spawn(async move {
            let first = rx.recv().await;
            let _ = got_tx.send(());
            let mut rest = Vec::new();
            while let Some(r) = rx.recv().await {
                rest.push(r);
            }
            drop((first, rest));
        });
        let c = client.clone();
        let pending = tokio::spawn(async move {
            c.request(
                server_id,
                request("test/stall", 10),
                Duration::from_secs(60),
            )
            .await
        });
        got_rx.await.unwrap();

        let err = client
            .request(
                server_id,
                request("test/stall", 10),
                Duration::from_millis(500),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::Network(NetworkError::Timeout { .. })),
            "{kind:?}: {err}"
        );

        // The handler task outlives the node here (a real kill takes it
        // too); libp2p's side of it still fails the request within seconds.
        let killed = Instant::now();
        world.kill(server);
        let err = tokio::time::timeout(Duration::from_secs(30), pending)
            .await
            .expect("no hang")
            .unwrap()
            .unwrap_err();
        assert!(killed.elapsed() < Duration::from_secs(30), "{kind:?}");
        let closed = |e: &Error| {
            matches!(
                e,
                Error::Network(NetworkError::ConnectionClosed { .. } | NetworkError::Dial { .. })
            )
        };
        assert!(closed(&err), "{kind:?}: {err}");
        let err = client
            .request(
                server_id,
                request("test/stall", 10),
                Duration::from_secs(20),
            )
            .await
            .unwrap_err();
        assert!(closed(&err), "{kind:?}: after the kill: {err}");
        held.abort();
        close(&[&client]).await;
    }
}
