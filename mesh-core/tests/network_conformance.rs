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

/// Two nodes of `kind`, `a` dialled to `b` (the in-memory world is kept
/// alive by its nodes).
async fn pair(kind: Kind, seed: u8) -> (Arc<dyn Network>, Arc<dyn Network>) {
    let (a, b): (Arc<dyn Network>, Arc<dyn Network>) = match kind {
        Kind::P2p => {
            let start = |s: u8| async move {
                let mut config = P2pConfig::loopback(Identity::from_seed([s; 32]));
                config.gossip_heartbeat = Duration::from_millis(200);
                P2pNetwork::start(config).await.expect("node starts")
            };
            (Arc::new(start(seed).await), Arc::new(start(seed + 1).await))
        }
        Kind::Memory => {
            let net = MemoryNet::new(u64::from(seed));
            let add = |s: u8| net.add_node(Identity::from_seed([s; 32]), Limits::default());
            (Arc::new(add(seed)), Arc::new(add(seed + 1)))
        }
    };
    let addrs = b.listen_addrs().await.unwrap();
    let addr = addrs
        .iter()
        .find(|a| !a.to_string().contains("/udp/"))
        .expect("a stream address")
        .clone();
    a.dial(addr).await.unwrap();
    (a, b)
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
