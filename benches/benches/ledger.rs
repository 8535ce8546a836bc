//! The ledger's consensus on loopback: four validators (equal stake), each on
//! its own libp2p swarm (TCP, noise, yamux, gossipsub), deciding empty blocks
//! back to back (`block_interval` 0). Reports the commit latency (time
//! between two decisions at one validator: propose, prevote, precommit, and
//! the next height's start) as median and p90, and heights per second over
//! the whole run. Checks that every validator holds the same chain and that
//! it verifies offline (every certificate over 2/3 of the stake).
//!
//! `cargo bench -p mesh-benches --bench ledger` ($MESH_LEDGER_HEIGHTS, default 60).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::ledger::chain::{verify_chain, Genesis, GenesisValidator};
use mesh_core::ledger::consensus::{self, EmptyBlocks, LedgerConfig, LedgerEvent, MemoryChain};
use mesh_core::network::p2p::{P2pConfig, P2pNetwork};
use mesh_core::network::{Identity, Multiaddr, Network};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` (CI's compile check) runs nothing.
    }
    let heights: u64 = std::env::var("MESH_LEDGER_HEIGHTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
        .max(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ids: Vec<Identity> = (0..4).map(|i| Identity::from_seed([200 + i; 32])).collect();
    let genesis = Genesis::new(
        "bench",
        ids.iter()
            .map(|id| GenesisValidator {
                peer_id: id.peer_id(),
                power: 1,
            })
            .collect(),
    )
    .unwrap();
    let config = LedgerConfig {
        block_interval: Duration::ZERO,
        ..LedgerConfig::default()
    };
    let (handles, nets) = rt.block_on(async {
        let mut nets: Vec<Arc<dyn Network>> = Vec::new();
        let mut first_addr = None;
        for id in &ids {
            let mut c = P2pConfig::loopback(id.clone());
            c.gossip_heartbeat = Duration::from_millis(200);
            c.bootstrap = first_addr.clone().into_iter().collect();
            let net = P2pNetwork::start(c).await.unwrap();
            if first_addr.is_none() {
                let a = net
                    .listen_addrs()
                    .await
                    .unwrap()
                    .into_iter()
                    .find(|a| a.to_string().contains("/tcp/"))
                    .unwrap();
                let a: Multiaddr = format!("{a}/p2p/{}", id.peer_id()).parse().unwrap();
                first_addr = Some(a);
            }
            nets.push(Arc::new(net));
        }
        // Let gossipsub form its mesh.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut handles = Vec::new();
        for (net, id) in nets.iter().zip(&ids) {
            let h = consensus::start(
                net.clone(),
                genesis.clone(),
                id,
                Box::new(MemoryChain::default()),
                Box::new(EmptyBlocks),
                config.clone(),
            )
            .await
            .unwrap();
            handles.push(h);
        }
        (handles, nets)
    });
    // Warm-up: the first heights include the gossip mesh settling.
    let mut events = handles[0].events();
    let mut times = Vec::new();
    let mut rounds = Vec::new();
    let warm = 3;
    let start = rt.block_on(async {
        assert!(handles[0].wait_for_height(warm).await);
        let start = Instant::now();
        let mut last = start;
        loop {
            match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
                Ok(Ok(LedgerEvent::Decided { height, round, .. })) if height > warm => {
                    let now = Instant::now();
                    times.push(now.duration_since(last).as_secs_f64() * 1e3);
                    rounds.push(round);
                    last = now;
                    if height >= warm + heights {
                        break;
                    }
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("events: {e}"),
                Err(_) => panic!("no decision within 60 s"),
            }
        }
        start
    });
    let elapsed = start.elapsed().as_secs_f64();
    let top = handles.iter().map(|h| h.status().height).min().unwrap();
    let chain: Vec<_> = (1..=top).map(|h| handles[0].block(h).unwrap()).collect();
    verify_chain(&genesis, chain.iter().map(|(b, c)| (b, c))).expect("the chain verifies");
    for h in &handles[1..] {
        for (i, (b, _)) in chain.iter().enumerate() {
            let other = h.block(i as u64 + 1).unwrap().0;
            assert_eq!(other.hash(), b.hash(), "fork at height {}", i + 1);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let p = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
    let later_rounds = rounds.iter().filter(|r| **r > 0).count();
    println!(
        "ledger: 4 validators on loopback libp2p, {heights} heights: commit latency median {:.1} ms, \
         p90 {:.1} ms; {:.1} heights/s; {later_rounds} decided after round 0; chain of {top} verified",
        p(0.5),
        p(0.9),
        heights as f64 / elapsed
    );
    rt.block_on(async {
        for h in handles {
            h.stop().await;
        }
        for n in nets {
            let _ = n.shutdown().await;
        }
    });
}
