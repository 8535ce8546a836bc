//! Competing updates of one model decided as their robust aggregate (needs
//! the model): four validators hold five updates of SmolLM2 (one an
//! outlier); blocks name the aggregate (norm clipping + Multi-Krum, one
//! Byzantine update tolerated), every validator recomputes it before voting,
//! and a proposer that names another adapter as the aggregate is refused.

use std::sync::Arc;
use std::time::Duration;

use malachitebft_core_types::{Context as _, Round};
use mesh_core::engine::{lora, Engine, GgmlEngine, LoraAdapter, ModelId, Projection};
use mesh_core::ledger::aggregate::{aggregate, AggregateConfig};
use mesh_core::ledger::chain::{verify_chain, Block, BlockDraft, Genesis, GenesisValidator};
use mesh_core::ledger::consensus::{
    self, BlockBuilder, Height, LedgerConfig, LedgerEvent, MemoryChain, MeshContext, ValidatorSet,
};
use mesh_core::ledger::pool::{SeenUpdates, UpdatePool};
use mesh_core::ledger::{AdapterStore, UpdateDraft, UpdateRecord};
use mesh_core::network::memory::{MemoryNet, MemoryNetwork};
use mesh_core::network::{Identity, Limits, Network};

/// Proposes what an honest pool would, but names the outlier as the aggregate.
struct Liar {
    honest: UpdatePool,
    claim: (ModelId, u64),
}

impl BlockBuilder for Liar {
    fn draft(&mut self, height: u64) -> BlockDraft {
        let mut d = self.honest.draft(height);
        for (base, g) in d.aggregates.iter_mut() {
            g.adapter = self.claim.0;
            g.adapter_size = self.claim.1;
            d.active.insert(*base, self.claim.0);
        }
        d
    }

    fn check(&mut self, block: &Block) -> Result<(), String> {
        self.honest.check(block)
    }

    fn decided(&mut self, block: &Block) {
        self.honest.decided(block)
    }
}

#[test]
fn competing_updates_are_decided_as_their_recomputed_aggregate() {
    let spec = std::env::var("MESH_MODEL").unwrap_or_else(|_| "default".into());
    let path = mesh_core::fetch::resolve_model(&spec, &mut |_| {}).unwrap();
    let engine = Arc::new(GgmlEngine::load(&path, 1).unwrap());
    let info = engine.info().clone();
    let targets = [(2, Projection::Q), (9, Projection::Down)];
    // Four similar updates and an outlier (ten times larger, unrelated).
    let files: Vec<Vec<u8>> = (0..5)
        .map(|i| {
            let scale = if i == 3 { 0.5 } else { 0.05 };
            let seed = if i == 3 { 99 } else { 40 + i as u64 % 2 };
            lora::testing::random_adapter(&info, &targets, 4, 8.0, scale, seed)
        })
        .collect();
    let authors: Vec<Identity> = (0..5).map(|i| Identity::from_seed([150 + i; 32])).collect();
    let records: Vec<UpdateRecord> = files
        .iter()
        .zip(&authors)
        .map(|(bytes, author)| {
            let a = LoraAdapter::from_bytes(bytes, &info).unwrap();
            UpdateRecord::sign(
                author,
                UpdateDraft {
                    base: info.id,
                    adapter: a.id(),
                    adapter_size: bytes.len() as u64,
                    parent: None,
                    metrics: vec![],
                },
            )
            .unwrap()
        })
        .collect();
    // What the ledger must decide: the aggregate of the five, in heard order.
    let loaded: Vec<Arc<LoraAdapter>> = files
        .iter()
        .map(|b| Arc::new(LoraAdapter::from_bytes(b, &info).unwrap()))
        .collect();
    let refs: Vec<&LoraAdapter> = loaded.iter().map(|a| a.as_ref()).collect();
    let config = AggregateConfig {
        byzantine: 1,
        clip_bound: None,
    };
    let expected = aggregate(&info, &refs, &config).unwrap();
    assert!(
        !expected.selected.contains(&3),
        "Multi-Krum keeps the outlier"
    );
    let expected_id = LoraAdapter::from_bytes(&expected.adapter, &info)
        .unwrap()
        .id();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let net = MemoryNet::new(21);
    // Validators chosen so that the liar proposes first, at height 1.
    let (ids, genesis) = (100u8..200)
        .map(|s| {
            let ids: Vec<Identity> = (0..4).map(|i| Identity::from_seed([s + i; 32])).collect();
            let genesis = Genesis::new(
                "aggregate",
                ids.iter()
                    .map(|id| GenesisValidator {
                        peer_id: id.peer_id(),
                        power: 1,
                    })
                    .collect(),
            )
            .unwrap();
            (ids, genesis)
        })
        .find(|(ids, g)| {
            let set = ValidatorSet::from_genesis(g).unwrap();
            let first = MeshContext::new(g.hash()).select_proposer(&set, Height(1), Round::new(0));
            first.id.0 == ids[3].peer_id()
        })
        .expect("a seed where the fourth validator proposes first");
    let root = std::env::temp_dir().join(format!("mesh-ledger-aggregate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let nodes: Vec<MemoryNetwork> = ids
        .iter()
        .map(|id| net.add_node(id.clone(), Limits::default()))
        .collect();
    rt.block_on(async {
        for i in 0..4 {
            for j in i + 1..4 {
                nodes[i].dial(nodes[j].addr()).await.unwrap();
            }
        }
    });
    let seen: SeenUpdates = {
        let records = records.clone();
        Arc::new(move || records.clone())
    };
    let mut handles = Vec::new();
    for (i, (node, id)) in nodes.iter().zip(&ids).enumerate() {
        let store = AdapterStore::open(root.join(format!("v{i}"))).unwrap();
        for f in &files {
            store.put(f).unwrap();
        }
        let n: Arc<dyn Network> = Arc::new(node.clone());
        let pool = UpdatePool::new(
            store,
            seen.clone(),
            n.clone(),
            rt.handle().clone(),
            vec![engine.clone()],
        );
        let builder: Box<dyn BlockBuilder> = if i == 3 {
            Box::new(Liar {
                honest: pool,
                claim: (records[3].adapter, records[3].adapter_size),
            })
        } else {
            Box::new(pool)
        };
        let config = LedgerConfig {
            propose_timeout: Duration::from_millis(1500),
            block_interval: Duration::from_millis(50),
            ..LedgerConfig::default()
        };
        let h = rt
            .block_on(consensus::start(
                n,
                genesis.clone(),
                id,
                Box::new(MemoryChain::default()),
                builder,
                config,
            ))
            .unwrap();
        handles.push(h);
    }
    let mut events = handles[0].events();
    let decided = rt.block_on(async {
        let wait = async {
            loop {
                if handles
                    .iter()
                    .all(|h| h.status().active.get(&info.id) == Some(&expected_id))
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(120), wait).await
    });
    assert!(
        decided.is_ok(),
        "not decided: {:?}",
        handles.iter().map(|h| h.status()).collect::<Vec<_>>()
    );
    let top = handles.iter().map(|h| h.status().height).min().unwrap();
    let chain: Vec<_> = (1..=top).map(|h| handles[0].block(h).unwrap()).collect();
    verify_chain(&genesis, chain.iter().map(|(b, c)| (b, c))).unwrap();
    let with: Vec<&Block> = chain
        .iter()
        .map(|(b, _)| b)
        .filter(|b| !b.aggregates.is_empty())
        .collect();
    assert_eq!(with.len(), 1, "the updates were decided once");
    let g = with[0].aggregates[&info.id];
    assert_eq!(g.adapter, expected_id);
    assert_eq!(g.byzantine, 1);
    assert_eq!(g.adapter_size, expected.adapter.len() as u64);
    assert_eq!(with[0].updates.len(), 5);
    // The aggregate is held by every validator, byte for byte what the test computed.
    for i in 0..4 {
        let store = AdapterStore::open(root.join(format!("v{i}"))).unwrap();
        let held = store.get(expected_id).expect("the aggregate is stored");
        assert_eq!(std::fs::read(held).unwrap(), expected.adapter);
    }
    // The source a follower would fetch it from.
    let src = handles[0].active_source(info.id).unwrap();
    assert_eq!(
        (src.adapter, src.size),
        (expected_id, expected.adapter.len() as u64)
    );
    // The liar proposed first, with the outlier as the aggregate: refused by
    // the honest validators, so the block came from a later round.
    assert!(
        with[0].height > 1 || chain[0].1.round >= 1,
        "{:?}",
        chain[0].1
    );
    assert_ne!(with[0].proposer, ids[3].peer_id());
    let mut refusals = 0;
    while let Ok(e) = events.try_recv() {
        if let LedgerEvent::Rejected { reason, from } = e {
            if reason.contains("aggregate") {
                assert_eq!(from, ids[3].peer_id());
                refusals += 1;
            }
        }
    }
    assert!(refusals >= 1, "the liar's aggregate was never refused");
    drop(handles);
    let _ = std::fs::remove_dir_all(&root);
}
