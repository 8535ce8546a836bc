use super::*;

fn node(net: &MemoryNet, i: u8) -> MemoryNetwork {
    net.add_node(Identity::from_seed([i; 32]), Limits::default())
}

fn net_err(e: crate::Error) -> NetworkError {
    match e {
        crate::Error::Network(n) => n,
        other => panic!("expected a network error, found {other}"),
    }
}

fn req(method: &str) -> Request {
    Request {
        method: method.into(),
        meta: Bytes::new(),
        tensor: Bytes::new(),
    }
}

#[test]
fn keys_and_buckets() {
    let a = [0u8; 32];
    let mut b = [0u8; 32];
    assert_eq!(bucket_index(&a, &a), None);
    b[31] = 1;
    assert_eq!(bucket_index(&a, &b), Some(0));
    b[0] = 0x80;
    assert_eq!(bucket_index(&a, &b), Some(255));
    assert_ne!(
        layer_key(&ModelId([1; 32]), 0),
        layer_key(&ModelId([1; 32]), 1)
    );
    assert_ne!(
        model_key(&ModelId([1; 32])),
        layer_key(&ModelId([1; 32]), 0)
    );
    let keys = announcement_keys(&Announcement {
        model: ModelId([1; 32]),
        layers: 3..6,
        free_memory: 0,
        tokens_per_sec: 0.0,
    });
    assert_eq!(keys.len(), 4);
}

#[tokio::test(start_paused = true)]
async fn handlers_statuses_and_describe() {
    let net = MemoryNet::new(1);
    let a = node(&net, 1);
    let small_queue = Limits {
        handler_queue: 1,
        ..Limits::default()
    };
    let b = net.add_node(Identity::from_seed([2; 32]), small_queue);
    let _rx = b.handle("m").await.unwrap();
    // A second handler for the same method, or the built-in one, is refused.
    assert!(matches!(
        net_err(b.handle("m").await.unwrap_err()),
        NetworkError::Method { .. }
    ));
    assert!(matches!(
        net_err(b.handle(DESCRIBE_METHOD).await.unwrap_err()),
        NetworkError::Method { .. }
    ));
    let t = Duration::from_secs(1);
    let err = net_err(a.request(b.peer, req("nope"), t).await.unwrap_err());
    assert!(matches!(
        err,
        NetworkError::Remote {
            status: RemoteStatus::UnknownMethod,
            ..
        }
    ));
    // The queue holds one request (never answered: a timeout), the next is Busy.
    let err = net_err(a.request(b.peer, req("m"), t).await.unwrap_err());
    assert!(matches!(err, NetworkError::Timeout { .. }), "{err}");
    let err = net_err(a.request(b.peer, req("m"), t).await.unwrap_err());
    assert!(
        matches!(
            err,
            NetworkError::Remote {
                status: RemoteStatus::Busy,
                ..
            }
        ),
        "{err}"
    );
    // A dropped handler frees the method.
    drop(_rx);
    let mut rx = b.handle("m").await.unwrap();
    tokio::spawn(async move {
        while let Some(r) = rx.recv().await {
            r.reject("no thanks");
        }
    });
    let err = net_err(a.request(b.peer, req("m"), t).await.unwrap_err());
    assert!(
        matches!(&err, NetworkError::Remote { status: RemoteStatus::Rejected, message, .. } if message == "no thanks"),
        "{err}"
    );
    // Describe is answered by the node itself.
    let ann = Announcement {
        model: ModelId([3; 32]),
        layers: 0..2,
        free_memory: 5,
        tokens_per_sec: 1.5,
    };
    b.announce(ann.clone()).await.unwrap();
    let r = a.request(b.peer, req(DESCRIBE_METHOD), t).await.unwrap();
    let (anns, addrs) = wire::decode_describe(&r.meta).unwrap();
    assert_eq!(anns, vec![ann]);
    assert_eq!(addrs, vec![b.addr()]);
    // Requests to oneself are refused.
    assert!(matches!(
        net_err(a.request(a.peer, req("m"), t).await.unwrap_err()),
        NetworkError::Dial { .. }
    ));
}

#[tokio::test(start_paused = true)]
async fn dial_addresses_events_and_rtt() {
    let net = MemoryNet::new(2);
    net.set_default_link(LinkConfig {
        latency: Duration::from_millis(15),
        ..LinkConfig::default()
    });
    let a = node(&net, 1);
    let b = node(&net, 2);
    let mut events = a.events();
    assert_eq!(
        events.try_recv().unwrap(),
        Event::Listening { addr: a.addr() }
    );
    for bad in [
        "/ip4/127.0.0.1/tcp/1",
        "/memory/99",
        "/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
    ] {
        let err = net_err(a.dial(bad.parse().unwrap()).await.unwrap_err());
        assert!(matches!(err, NetworkError::Dial { .. }), "{bad}: {err}");
    }
    let wrong = b.addr().with(Protocol::P2p(a.peer));
    assert!(matches!(
        net_err(a.dial(wrong).await.unwrap_err()),
        NetworkError::Dial { .. }
    ));
    a.dial(b.addr().with(Protocol::P2p(b.peer))).await.unwrap();
    assert_eq!(a.connected_peers().await.unwrap(), vec![b.peer]);
    assert_eq!(b.connected_peers().await.unwrap(), vec![a.peer]);
    assert_eq!(
        events.try_recv().unwrap(),
        Event::PeerConnected { peer: b.peer }
    );
    assert_eq!(
        events.try_recv().unwrap(),
        Event::Rtt {
            peer: b.peer,
            rtt: Duration::from_millis(30)
        }
    );
    assert_eq!(
        b.rtt(a.peer).await.unwrap(),
        Some(Duration::from_millis(30))
    );
}

#[tokio::test(start_paused = true)]
async fn periodic_pings_follow_link_changes() {
    let config = MemoryConfig {
        ping_interval: Some(Duration::from_secs(15)),
        ..MemoryConfig::default()
    };
    let net = MemoryNet::with_config(6, config);
    let a = node(&net, 1);
    let b = node(&net, 2);
    a.dial(b.addr()).await.unwrap();
    assert_eq!(
        b.rtt(a.peer).await.unwrap(),
        Some(Duration::from_millis(10))
    );
    net.set_link(
        a.peer,
        b.peer,
        LinkConfig {
            latency: Duration::from_millis(50),
            ..LinkConfig::default()
        },
    );
    tokio::time::sleep(Duration::from_secs(16)).await;
    assert_eq!(
        b.rtt(a.peer).await.unwrap(),
        Some(Duration::from_millis(100))
    );
    assert_eq!(
        a.rtt(b.peer).await.unwrap(),
        Some(Duration::from_millis(100))
    );
}

#[tokio::test(start_paused = true)]
async fn bans_refuse_both_ways_and_shutdown_is_final() {
    let net = MemoryNet::new(3);
    let a = node(&net, 1);
    let b = node(&net, 2);
    let _rx_a = a.handle("m").await.unwrap();
    let _rx_b = b.handle("m").await.unwrap();
    a.dial(b.addr()).await.unwrap();
    a.ban(b.peer).await.unwrap();
    assert!(a.connected_peers().await.unwrap().is_empty());
    assert!(b.connected_peers().await.unwrap().is_empty());
    let t = Duration::from_secs(1);
    assert_eq!(
        net_err(a.request(b.peer, req("m"), t).await.unwrap_err()),
        NetworkError::Banned(b.peer)
    );
    assert!(matches!(
        net_err(b.request(a.peer, req("m"), t).await.unwrap_err()),
        NetworkError::Dial { .. }
    ));
    assert!(matches!(
        net_err(b.dial(a.addr()).await.unwrap_err()),
        NetworkError::Dial { .. }
    ));
    a.shutdown().await.unwrap();
    assert_eq!(
        net_err(a.shutdown().await.unwrap_err()),
        NetworkError::Shutdown
    );
    assert_eq!(
        net_err(a.publish("t", Bytes::new()).await.unwrap_err()),
        NetworkError::Shutdown
    );
    assert_eq!(
        net_err(
            a.find_providers(ModelId([0; 32]), None, t)
                .await
                .unwrap_err()
        ),
        NetworkError::Shutdown
    );
    assert!(!net.is_alive(&a.peer));
    assert_eq!(net.live_peers(), vec![b.peer]);
}

#[tokio::test(start_paused = true)]
async fn a_lost_request_still_notices_the_peer_dying() {
    let net = MemoryNet::new(5);
    let a = node(&net, 1);
    let b = node(&net, 2);
    let _rx = b.handle("m").await.unwrap();
    a.dial(b.addr()).await.unwrap();
    net.set_default_link(LinkConfig {
        loss: 1.0,
        ..LinkConfig::default()
    });
    let killer = {
        let net = net.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            net.kill(b.peer);
        })
    };
    let t = Instant::now();
    let err = net_err(
        a.request(b.peer, req("m"), Duration::from_secs(30))
            .await
            .unwrap_err(),
    );
    assert_eq!(err, NetworkError::ConnectionClosed { peer: b.peer });
    assert_eq!(t.elapsed(), Duration::from_secs(2));
    killer.await.unwrap();
    assert!(net.stats().messages_lost >= 1);
}

#[tokio::test(start_paused = true)]
async fn provider_records_expire_unless_republished() {
    let config = MemoryConfig {
        provider_ttl: Duration::from_secs(60),
        republish_interval: Duration::from_secs(3600),
        ..MemoryConfig::default()
    };
    let net = MemoryNet::with_config(4, config);
    let nodes: Vec<MemoryNetwork> = (1..=4).map(|i| node(&net, i)).collect();
    for n in &nodes[1..] {
        n.dial(nodes[0].addr()).await.unwrap();
    }
    let model = ModelId([9; 32]);
    nodes[3]
        .announce(Announcement {
            model,
            layers: 0..1,
            free_memory: 0,
            tokens_per_sec: 0.0,
        })
        .await
        .unwrap();
    let key = model_key(&model);
    let holders = |net: &MemoryNet| {
        let w = net.lock();
        w.nodes
            .iter()
            .filter(|n| {
                n.records
                    .get(&key)
                    .is_some_and(|r| r.values().any(|e| *e > Instant::now()))
            })
            .count()
    };
    assert_eq!(holders(&net), 3);
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(holders(&net), 0);
    // The provider itself still answers (it provides the key).
    let t = Duration::from_secs(5);
    assert_eq!(
        nodes[0].find_providers(model, None, t).await.unwrap().len(),
        1
    );
}

/// A provider cut off by a partition never answers the lookup's query nor
/// its describe; the others are still found within the timeout.
#[tokio::test(start_paused = true)]
async fn a_partitioned_provider_does_not_hide_the_others() {
    let net = MemoryNet::new(5);
    let nodes: Vec<MemoryNetwork> = (1..=4).map(|i| node(&net, i)).collect();
    for n in &nodes[1..] {
        n.dial(nodes[0].addr()).await.unwrap();
    }
    let model = ModelId([7; 32]);
    for n in &nodes[2..] {
        n.announce(Announcement {
            model,
            layers: 0..1,
            free_memory: 0,
            tokens_per_sec: 0.0,
        })
        .await
        .unwrap();
    }
    let t = Duration::from_secs(4);
    assert_eq!(
        nodes[0].find_providers(model, None, t).await.unwrap().len(),
        2
    );
    net.partition(&[vec![nodes[2].local_peer_id()]]);
    let started = Instant::now();
    let found = nodes[0].find_providers(model, None, t).await.unwrap();
    let peers: Vec<PeerId> = found.iter().map(|p| p.peer_id).collect();
    assert_eq!(peers, vec![nodes[3].local_peer_id()]);
    assert!(started.elapsed() <= t, "{:?}", started.elapsed());
}
