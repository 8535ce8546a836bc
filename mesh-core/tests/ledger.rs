//! The ledger's consensus over the in-memory network (virtual time): validators
//! decide blocks with commit certificates that verify offline, a follower
//! catches up, faulty messages are refused, the chain survives one of four
//! validators down and halts without forking at two, then resumes.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use malachitebft_core_types::{Context as _, NilOrVal, Round, SignedMessage};
use mesh_core::engine::ModelId;
use mesh_core::ledger::chain::{
    verify_chain, ActiveMsg, Block, BlockDraft, BlockHash, BlockMsg, Certificate, Genesis,
    GenesisValidator,
};
use mesh_core::ledger::consensus::{
    self, encode_proposal, encode_vote, BlockBuilder, EmptyBlocks, Height, Keys, LedgerConfig,
    LedgerEvent, LedgerHandle, LedgerMsg, MemoryChain, MeshContext, Proposal, ProposalMsg,
    ValidatorId, ValidatorSet, Vote, VoteKind, LEDGER_TOPIC,
};
use mesh_core::ledger::{StakeTransfer, Stakes, UpdateDraft, UpdateRecord};
use mesh_core::network::memory::{LinkConfig, MemoryNet, MemoryNetwork};
use mesh_core::network::{Identity, Limits, Network};
use prost::Message as _;

fn config() -> LedgerConfig {
    LedgerConfig {
        propose_timeout: Duration::from_millis(600),
        vote_timeout: Duration::from_millis(300),
        round_delta: Duration::from_millis(200),
        rebroadcast: Duration::from_millis(500),
        status_interval: Duration::from_millis(700),
        sync_timeout: Duration::from_secs(2),
        block_interval: Duration::from_millis(100),
    }
}

fn identities(n: usize, seed: u8) -> Vec<Identity> {
    (0..n)
        .map(|i| Identity::from_seed([seed.wrapping_add(i as u8); 32]))
        .collect()
}

fn genesis(ids: &[Identity], powers: &[u64]) -> Genesis {
    Genesis::new(
        "test-mesh",
        ids.iter()
            .zip(powers)
            .map(|(id, p)| GenesisValidator {
                peer_id: id.peer_id(),
                power: *p,
            })
            .collect(),
    )
    .unwrap()
}

/// Adds a node per identity and connects every pair.
async fn mesh(net: &MemoryNet, ids: &[Identity]) -> Vec<MemoryNetwork> {
    let nodes: Vec<MemoryNetwork> = ids
        .iter()
        .map(|id| net.add_node(id.clone(), Limits::default()))
        .collect();
    connect(&nodes).await;
    nodes
}

async fn connect(nodes: &[MemoryNetwork]) {
    for i in 0..nodes.len() {
        for j in i + 1..nodes.len() {
            nodes[i].dial(nodes[j].addr()).await.unwrap();
        }
    }
}

async fn start(
    node: &MemoryNetwork,
    genesis: &Genesis,
    id: &Identity,
    builder: Box<dyn BlockBuilder>,
) -> LedgerHandle {
    let net: Arc<dyn Network> = Arc::new(node.clone());
    consensus::start(
        net,
        genesis.clone(),
        id,
        Box::new(MemoryChain::default()),
        builder,
        config(),
    )
    .await
    .unwrap()
}

fn chain_of(h: &LedgerHandle, upto: u64) -> Vec<(Block, Certificate)> {
    (1..=upto).map(|i| h.block(i).expect("decided")).collect()
}

/// Waits (virtual time) until every handle reaches `height`.
async fn all_reach(handles: &[&LedgerHandle], height: u64, within: Duration) {
    let wait = async {
        for h in handles {
            assert!(h.wait_for_height(height).await, "a ledger node stopped");
        }
    };
    tokio::time::timeout(within, wait)
        .await
        .unwrap_or_else(|_| {
            let heights: Vec<u64> = handles.iter().map(|h| h.status().height).collect();
            panic!("not every node reached height {height} in {within:?}: {heights:?}")
        });
}

/// Offers one update record until a block carries it.
struct Mempool {
    record: Option<UpdateRecord>,
    from_height: u64,
}

impl BlockBuilder for Mempool {
    fn draft(&mut self, height: u64) -> BlockDraft {
        let mut draft = BlockDraft::default();
        if height >= self.from_height {
            if let Some(r) = &self.record {
                draft.active.insert(r.base, r.adapter);
                draft.updates.push(r.clone());
            }
        }
        draft
    }

    fn decided(&mut self, block: &Block) {
        if let Some(r) = &self.record {
            if block.updates.iter().any(|u| u.id() == r.id()) {
                self.record = None;
            }
        }
    }
}

fn record(author: &Identity) -> UpdateRecord {
    UpdateRecord::sign(
        author,
        UpdateDraft {
            base: ModelId([7; 32]),
            adapter: ModelId([8; 32]),
            adapter_size: 1234,
            parent: None,
            metrics: vec![("perplexity".into(), 9.5)],
        },
    )
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn four_validators_decide_certified_blocks_and_a_follower_catches_up() {
    let net = MemoryNet::new(11);
    let ids = identities(4, 1);
    let g = genesis(&ids, &[1, 1, 1, 1]);
    let nodes = mesh(&net, &ids).await;
    let update = record(&Identity::from_seed([99; 32]));
    let mut handles = Vec::new();
    for (node, id) in nodes.iter().zip(&ids) {
        let builder = Mempool {
            record: Some(update.clone()),
            from_height: 2,
        };
        handles.push(start(node, &g, id, Box::new(builder)).await);
    }
    let refs: Vec<&LedgerHandle> = handles.iter().collect();
    all_reach(&refs, 5, Duration::from_secs(60)).await;

    // Every validator holds the same chain, and it verifies offline.
    let reference = chain_of(&handles[0], 5);
    for h in &handles[1..] {
        let chain = chain_of(h, 5);
        for (a, b) in reference.iter().zip(&chain) {
            assert_eq!(a.0.hash(), b.0.hash(), "fork at height {}", a.0.height);
        }
        let tip = verify_chain(&g, chain.iter().map(|(b, c)| (b, c))).unwrap();
        assert_eq!(tip, chain[4].0.hash());
    }
    // The update was decided exactly once, and the ledger now runs it.
    let carrying: Vec<u64> = reference
        .iter()
        .filter(|(b, _)| b.updates.iter().any(|u| u.id() == update.id()))
        .map(|(b, _)| b.height)
        .collect();
    assert_eq!(carrying.len(), 1, "{carrying:?}");
    assert!(carrying[0] >= 2);
    for h in &handles {
        assert_eq!(h.status().active.get(&update.base), Some(&update.adapter));
    }
    // Certificates: more than 2/3 of the stake, round-trip on the wire.
    for (block, cert) in &reference {
        assert!(cert.signatures.len() >= 3, "{cert:?}");
        let again = Certificate::decode(&cert.encode()).unwrap();
        assert_eq!(&again, cert);
        assert_eq!(
            again.verify(&Stakes::genesis(&g)).unwrap(),
            cert.signatures.len() as u64
        );
        assert_eq!(Block::decode(block.encoded()).unwrap().hash(), block.hash());
    }
    // Tampering is caught offline: a certificate for another block, or with
    // a signature short of the quorum.
    let mut wrong = reference[1].1.clone();
    wrong.block = reference[2].0.hash();
    assert!(verify_chain(
        &g,
        [
            (&reference[0].0, &reference[0].1),
            (&reference[1].0, &wrong)
        ]
    )
    .is_err());
    let mut short = reference[0].1.clone();
    short.signatures.truncate(2);
    assert!(short.verify(&Stakes::genesis(&g)).is_err());
    let mut forged = reference[0].1.clone();
    forged.signatures[0].signature[5] ^= 1;
    assert!(forged.verify(&Stakes::genesis(&g)).is_err());
    // Another chain's genesis rejects these certificates.
    let other = Genesis::new("other-mesh", g.validators.clone()).unwrap();
    assert!(reference[0].1.verify(&Stakes::genesis(&other)).is_err());

    // A follower (no stake) joins late and catches up by sync alone.
    let follower_id = Identity::from_seed([50; 32]);
    let follower_node = net.add_node(follower_id.clone(), Limits::default());
    follower_node.dial(nodes[0].addr()).await.unwrap();
    follower_node.dial(nodes[1].addr()).await.unwrap();
    let follower = start(&follower_node, &g, &follower_id, Box::new(EmptyBlocks)).await;
    assert!(!follower.status().validator);
    let target = handles[0].status().height + 2;
    all_reach(&refs, target, Duration::from_secs(60)).await;
    all_reach(&[&follower], target, Duration::from_secs(60)).await;
    let fchain = chain_of(&follower, target);
    let vchain = chain_of(&handles[2], target);
    for (a, b) in fchain.iter().zip(&vchain) {
        assert_eq!(a.0.hash(), b.0.hash());
    }
    assert_eq!(
        follower.status().active.get(&update.base),
        Some(&update.adapter)
    );
}

/// A validator without model sync (`EmptyBlocks`) prevotes nil for blocks
/// with updates: holding more than a third of the stake it keeps every
/// update out (the chain goes on with its empty blocks); with less, the
/// others decide the update without it.
#[tokio::test(start_paused = true)]
async fn a_validator_without_model_sync_never_votes_for_updates() {
    for (powers, decided) in [([2, 1, 1, 1], false), ([1, 2, 2, 2], true)] {
        let net = MemoryNet::new(13);
        let ids = identities(4, 50);
        let g = genesis(&ids, &powers);
        let nodes = mesh(&net, &ids).await;
        let update = record(&Identity::from_seed([98; 32]));
        let mut handles = Vec::new();
        for (i, (node, id)) in nodes.iter().zip(&ids).enumerate() {
            let builder: Box<dyn BlockBuilder> = if i == 0 {
                Box::new(EmptyBlocks)
            } else {
                Box::new(Mempool {
                    record: Some(update.clone()),
                    from_height: 1,
                })
            };
            handles.push(start(node, &g, id, builder).await);
        }
        let refs: Vec<&LedgerHandle> = handles.iter().collect();
        all_reach(&refs, 6, Duration::from_secs(300)).await;
        let chain = chain_of(&handles[1], 6);
        verify_chain(&g, chain.iter().map(|(b, c)| (b, c))).unwrap();
        let carried = chain.iter().any(|(b, _)| !b.updates.is_empty());
        assert_eq!(carried, decided, "stakes {powers:?}");
        for h in &handles {
            let active = h.status().active.get(&update.base).copied();
            assert_eq!(active.is_some(), decided, "stakes {powers:?}");
        }
    }
}

/// Publishes a signed vote as `keys`' validator.
async fn vote(node: &MemoryNetwork, keys: &Keys, v: Vote) {
    let signature = keys.sign_vote(&v);
    let bytes = encode_vote(&SignedMessage::new(v, signature));
    node.publish(LEDGER_TOPIC, bytes).await.unwrap();
}

/// Four identities (seeds from `seed` on) for which the fourth proposes
/// first at height 1.
fn with_fourth_proposing_first(seed: u8) -> (Vec<Identity>, Genesis) {
    for s in seed..seed + 200 {
        let ids = identities(4, s);
        let g = genesis(&ids, &[1, 1, 1, 1]);
        let set = ValidatorSet::from_genesis(&g).unwrap();
        let ctx = MeshContext::new(g.hash());
        let first = ctx.select_proposer(&set, Height(1), Round::new(0));
        if first.id.0 == ids[3].peer_id() {
            return (ids, g);
        }
    }
    panic!("no seed makes the fourth validator propose first");
}

/// What a faulty validator sends for `height`: equivocating votes, a vote
/// forged in an honest validator's name, a block that does not extend the
/// chain, a block breaking the active-adapter rule, and garbage.
async fn misbehave(
    bad: &MemoryNetwork,
    keys: &Keys,
    me: &Identity,
    honest: ValidatorId,
    height: u64,
    bad_blocks: &mut BTreeSet<BlockHash>,
) {
    let bad_id = ValidatorId(me.peer_id());
    for round in 0..3u32 {
        let r = Round::new(round);
        for kind in [VoteKind::Prevote, VoteKind::Precommit] {
            for fake in [[1u8; 32], [2u8; 32]] {
                let v = Vote {
                    kind,
                    height: Height(height),
                    round: r,
                    value: NilOrVal::Val(BlockHash(fake)),
                    validator: bad_id,
                };
                vote(bad, keys, v).await;
            }
        }
        let forged = Vote {
            kind: VoteKind::Precommit,
            height: Height(height),
            round: r,
            value: NilOrVal::Val(BlockHash([3; 32])),
            validator: honest,
        };
        vote(bad, keys, forged).await;
        let block = Block::build(
            height,
            BlockHash([9; 32]),
            me.peer_id(),
            BlockDraft::default(),
        )
        .unwrap();
        bad_blocks.insert(block.hash());
        let p = Proposal {
            height: Height(height),
            round: r,
            block,
            pol_round: Round::Nil,
            proposer: bad_id,
        };
        let signature = keys.sign_proposal(&p);
        let bytes = encode_proposal(&SignedMessage::new(p, signature));
        bad.publish(LEDGER_TOPIC, bytes).await.unwrap();
        // A block naming an adapter no update in it supplies.
        let raw = BlockMsg {
            version: 1,
            height,
            parent: vec![0; 32],
            proposer: me.peer_id().to_bytes(),
            time_ms: 0,
            updates: vec![],
            active: vec![ActiveMsg {
                base: vec![7; 32],
                adapter: vec![6; 32],
            }],
            aggregates: vec![],
            stake: vec![],
        };
        let msg = LedgerMsg {
            version: 1,
            proposal: Some(ProposalMsg {
                height,
                round: i64::from(round),
                pol_round: -1,
                block: Bytes::from(raw.encode_to_vec()),
                proposer: me.peer_id().to_bytes(),
                signature: vec![0; 64],
            }),
            ..Default::default()
        };
        bad.publish(LEDGER_TOPIC, Bytes::from(msg.encode_to_vec()))
            .await
            .unwrap();
        bad.publish(LEDGER_TOPIC, Bytes::from_static(b"\xff\x00junk"))
            .await
            .unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn a_faulty_validator_is_refused_and_the_chain_goes_on() {
    let net = MemoryNet::new(12);
    let (ids, g) = with_fourth_proposing_first(20);
    let nodes = mesh(&net, &ids).await;
    let mut handles = Vec::new();
    for (node, id) in nodes.iter().zip(&ids).take(3) {
        handles.push(start(node, &g, id, Box::new(EmptyBlocks)).await);
    }
    let mut events = handles[0].events();
    // The fourth validator is faulty: it runs no consensus and, at every
    // height the others work on, sends junk, including height 1 round 0
    // where it is the rightful proposer.
    let bad_keys = Keys::new(g.hash(), &ids[3]);
    let honest = ValidatorId(ids[0].peer_id());
    let mut bad_blocks = BTreeSet::new();
    let mut last = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while handles.iter().map(|h| h.status().height).min().unwrap() < 4 {
        let height = handles[0].status().height + 1;
        if height != last {
            misbehave(
                &nodes[3],
                &bad_keys,
                &ids[3],
                honest,
                height,
                &mut bad_blocks,
            )
            .await;
            last = height;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "the honest validators stalled"
        );
    }
    let refs: Vec<&LedgerHandle> = handles.iter().collect();
    all_reach(&refs, 4, Duration::from_secs(120)).await;
    let reference = chain_of(&handles[0], 4);
    for h in &handles[1..] {
        for (a, b) in reference.iter().zip(chain_of(h, 4)) {
            assert_eq!(a.0.hash(), b.0.hash(), "fork at height {}", a.0.height);
        }
    }
    verify_chain(&g, reference.iter().map(|(b, c)| (b, c))).unwrap();
    for (block, cert) in &reference {
        assert!(!bad_blocks.contains(&block.hash()));
        assert_ne!(block.proposer, ids[3].peer_id());
        // Only real precommits are in certificates: the forged one never counts.
        assert!(cert.verify(&Stakes::genesis(&g)).is_ok());
    }
    // Height 1 needed a second round: its first proposer was the faulty one.
    assert!(reference[0].1.round >= 1, "{:?}", reference[0].1);
    let mut rejected = 0;
    while let Ok(e) = events.try_recv() {
        if let LedgerEvent::Rejected { from, .. } = e {
            assert_eq!(from, ids[3].peer_id());
            rejected += 1;
        }
    }
    assert!(rejected > 0, "the faulty validator's junk was not refused");
}

#[tokio::test(start_paused = true)]
async fn one_of_four_down_goes_on_two_down_halts_without_a_fork_then_resumes() {
    let net = MemoryNet::new(13);
    net.set_default_link(LinkConfig {
        latency: Duration::from_millis(20),
        ..LinkConfig::default()
    });
    let ids = identities(4, 40);
    let g = genesis(&ids, &[1, 1, 1, 1]);
    let nodes = mesh(&net, &ids).await;
    let mut handles: Vec<Option<LedgerHandle>> = Vec::new();
    for (node, id) in nodes.iter().zip(&ids) {
        handles.push(Some(start(node, &g, id, Box::new(EmptyBlocks)).await));
    }
    let live = |hs: &Vec<Option<LedgerHandle>>| -> Vec<u64> {
        hs.iter().flatten().map(|h| h.status().height).collect()
    };
    {
        let refs: Vec<&LedgerHandle> = handles.iter().flatten().collect();
        all_reach(&refs, 2, Duration::from_secs(60)).await;
    }
    // One of four down: 3 of 4 is still more than 2/3.
    net.kill(ids[3].peer_id());
    handles[3].take().unwrap().stop().await;
    let h1 = live(&handles).into_iter().max().unwrap();
    {
        let refs: Vec<&LedgerHandle> = handles.iter().flatten().collect();
        all_reach(&refs, h1 + 3, Duration::from_secs(120)).await;
    }
    // Two down: no quorum, no block.
    net.kill(ids[2].peer_id());
    handles[2].take().unwrap().stop().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let halted = live(&handles);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(live(&handles), halted, "decided without a quorum");
    let top = *halted.iter().max().unwrap();
    // They come back (fresh stores: they catch up by sync) and the chain resumes.
    let back: Vec<MemoryNetwork> = ids[2..]
        .iter()
        .map(|id| net.add_node(id.clone(), Limits::default()))
        .collect();
    for b in &back {
        for n in &nodes[..2] {
            b.dial(n.addr()).await.unwrap();
        }
    }
    back[0].dial(back[1].addr()).await.unwrap();
    handles[2] = Some(start(&back[0], &g, &ids[2], Box::new(EmptyBlocks)).await);
    handles[3] = Some(start(&back[1], &g, &ids[3], Box::new(EmptyBlocks)).await);
    let refs: Vec<&LedgerHandle> = handles.iter().flatten().collect();
    all_reach(&refs, top + 3, Duration::from_secs(180)).await;
    let reference = chain_of(refs[0], top + 3);
    verify_chain(&g, reference.iter().map(|(b, c)| (b, c))).unwrap();
    for h in &refs[1..] {
        for (a, b) in reference.iter().zip(chain_of(h, top + 3)) {
            assert_eq!(a.0.hash(), b.0.hash(), "fork at height {}", a.0.height);
        }
    }
}

/// A chain store shared with the test, so a validator restarted on it finds
/// what it wrote before (blocks, signed votes, its write-ahead log).
#[derive(Clone, Default)]
struct SharedStore(Arc<std::sync::Mutex<MemoryChain>>);

impl consensus::ChainStore for SharedStore {
    fn height(&self) -> u64 {
        self.0.lock().unwrap().height()
    }
    fn get(&self, height: u64) -> Option<(Block, Certificate)> {
        self.0.lock().unwrap().get(height)
    }
    fn append(
        &mut self,
        block: &Block,
        cert: &Certificate,
    ) -> Result<(), mesh_core::ledger::LedgerError> {
        self.0.lock().unwrap().append(block, cert)
    }
    fn signed_vote(&self, height: u64, round: u32, kind: VoteKind) -> Option<Option<BlockHash>> {
        self.0.lock().unwrap().signed_vote(height, round, kind)
    }
    fn record_vote(
        &mut self,
        height: u64,
        round: u32,
        kind: VoteKind,
        value: Option<BlockHash>,
    ) -> Result<(), mesh_core::ledger::LedgerError> {
        self.0
            .lock()
            .unwrap()
            .record_vote(height, round, kind, value)
    }
    fn wal_append(
        &mut self,
        height: u64,
        entry: &[u8],
    ) -> Result<(), mesh_core::ledger::LedgerError> {
        self.0.lock().unwrap().wal_append(height, entry)
    }
    fn wal(&self, height: u64) -> Vec<Vec<u8>> {
        self.0.lock().unwrap().wal(height)
    }
}

/// Refuses every proposal while its gate is closed (so rounds go by
/// without a decision), accepts empty blocks once it opens.
#[derive(Clone)]
struct Gate(Arc<std::sync::atomic::AtomicBool>);

impl BlockBuilder for Gate {
    fn draft(&mut self, _: u64) -> BlockDraft {
        BlockDraft::default()
    }
    fn check(&mut self, _: &Block) -> Result<(), String> {
        match self.0.load(std::sync::atomic::Ordering::SeqCst) {
            true => Ok(()),
            false => Err("the test's gate is closed".into()),
        }
    }
}

/// A validator restarted in the middle of a height replays its write-ahead
/// log: it is back in the round it had reached (with its votes, and any
/// lock) before any timeout or rebroadcast could have brought it there,
/// instead of starting the height over at round 0; the chain then goes on
/// without a fork, and a decided height's log is dropped.
#[tokio::test(start_paused = true)]
async fn a_validator_restarted_mid_height_replays_its_log_and_resumes_its_round() {
    use consensus::ChainStore as _;
    let net = MemoryNet::new(17);
    net.set_default_link(LinkConfig {
        latency: Duration::from_millis(20),
        ..LinkConfig::default()
    });
    let ids = identities(4, 60);
    let g = genesis(&ids, &[1, 1, 1, 1]);
    let nodes = mesh(&net, &ids).await;
    let store = SharedStore::default();
    let gate = Gate(Arc::default());
    let start_on = |node: &MemoryNetwork, id: &Identity, store: Box<dyn consensus::ChainStore>| {
        let (node, id, g, gate) = (node.clone(), id.clone(), g.clone(), gate.clone());
        async move {
            let net: Arc<dyn Network> = Arc::new(node);
            consensus::start(net, g, &id, store, Box::new(gate), config())
                .await
                .unwrap()
        }
    };
    let mut handles = vec![start_on(&nodes[0], &ids[0], Box::new(store.clone())).await];
    for (node, id) in nodes.iter().zip(&ids).skip(1) {
        handles.push(start_on(node, id, Box::<MemoryChain>::default()).await);
    }
    // Every proposal refused: round after round of nil votes at height 1.
    tokio::time::timeout(Duration::from_secs(120), async {
        while handles[0].status().round < 3 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("no round 3");
    let before = handles[0].status();
    assert_eq!(before.height, 0, "decided a refused block");
    assert!(!store.wal(1).is_empty(), "nothing logged at height 1");
    // Restart validator 0 on the same store (a new process, same key).
    net.kill(ids[0].peer_id());
    handles.remove(0).stop().await;
    let again = net.add_node(ids[0].clone(), Limits::default());
    for n in &nodes[1..] {
        again.dial(n.addr()).await.unwrap();
    }
    let restarted = start_on(&again, &ids[0], Box::new(store.clone())).await;
    // Well within a propose timeout (600 ms) or a rebroadcast (500 ms):
    // only the replay can have brought it this far.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = restarted.status();
    assert_eq!(after.height, 0);
    assert!(
        after.round >= before.round,
        "restarted at round {}, had reached {}",
        after.round,
        before.round
    );
    handles.insert(0, restarted);
    // Proposals accepted again: the chain goes on, one chain.
    gate.0.store(true, std::sync::atomic::Ordering::SeqCst);
    let refs: Vec<&LedgerHandle> = handles.iter().collect();
    all_reach(&refs, 2, Duration::from_secs(180)).await;
    let reference = chain_of(refs[0], 2);
    verify_chain(&g, reference.iter().map(|(b, c)| (b, c))).unwrap();
    for h in &refs[1..] {
        for (a, b) in reference.iter().zip(chain_of(h, 2)) {
            assert_eq!(a.0.hash(), b.0.hash(), "fork at height {}", a.0.height);
        }
    }
    assert!(store.wal(1).is_empty(), "height 1 decided, its log kept");
}

/// Waits (virtual time) until `cond` holds for every handle's status.
async fn all_see(
    handles: &[&LedgerHandle],
    within: Duration,
    what: &str,
    cond: impl Fn(&consensus::LedgerStatus) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !handles.iter().all(|h| cond(&h.status())) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every node saw {what} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn stake_moves_by_signed_transfer_and_the_new_holder_validates() {
    let net = MemoryNet::new(17);
    net.set_default_link(LinkConfig {
        latency: Duration::from_millis(10),
        ..LinkConfig::default()
    });
    // A holds 3 of 6: nothing is decided without A (more than 4 is needed).
    let ids = identities(4, 70);
    let g = genesis(&ids, &[3, 1, 1, 1]);
    let newcomer = Identity::from_seed([90; 32]);
    let sybil = Identity::from_seed([91; 32]);
    let mut all_ids = ids.clone();
    all_ids.push(newcomer.clone());
    let nodes = mesh(&net, &all_ids).await;
    let mut handles: Vec<Option<LedgerHandle>> = Vec::new();
    for (node, id) in nodes.iter().zip(&all_ids) {
        handles.push(Some(start(node, &g, id, Box::new(EmptyBlocks)).await));
    }
    assert!(!handles[4].as_ref().unwrap().status().validator);
    {
        let refs: Vec<&LedgerHandle> = handles.iter().flatten().collect();
        all_reach(&refs, 2, Duration::from_secs(60)).await;
    }
    let a = handles[0].as_ref().unwrap();
    let chain = g.hash();
    // Offered but never applied: a zero-stake identity giving stake, and B
    // giving more than it holds.
    let gift = StakeTransfer::sign(&sybil, chain, ids[1].peer_id(), 5, 1).unwrap();
    a.submit_stake(gift.clone()).unwrap();
    let overdraft = StakeTransfer::sign(&ids[1], chain, newcomer.peer_id(), 2, 1).unwrap();
    a.submit_stake(overdraft.clone()).unwrap();
    assert!(a.transfer_stake(&ids[1], newcomer.peer_id(), 2).is_err());
    // A gives all its stake to the newcomer.
    let tx = a.transfer_stake(&ids[0], newcomer.peer_id(), 3).unwrap();
    assert_eq!(tx.nonce, 1);
    {
        let refs: Vec<&LedgerHandle> = handles.iter().flatten().collect();
        all_see(&refs, Duration::from_secs(60), "the transfer", |s| {
            s.stakes.power_of(&newcomer.peer_id()) == 3
        })
        .await;
    }
    let moved_at = handles[0].as_ref().unwrap().status().height;
    for (i, h) in handles.iter().flatten().enumerate() {
        let s = h.status();
        assert_eq!(s.stakes.power_of(&ids[0].peer_id()), 0);
        assert_eq!(s.stakes.total_power(), 6);
        assert_eq!(s.stakes.validators().len(), 4);
        assert_eq!(s.validator, i != 0, "node {i}");
    }
    // A leaves. Without the newcomer's vote B, C, D hold 3 of 6: the chain
    // going on proves the transfer counts.
    net.kill(ids[0].peer_id());
    handles[0].take().unwrap().stop().await;
    let target = moved_at + 3;
    let refs: Vec<&LedgerHandle> = handles.iter().flatten().collect();
    all_reach(&refs, target, Duration::from_secs(180)).await;
    let reference = chain_of(refs[0], target);
    for h in &refs[1..] {
        for (x, y) in reference.iter().zip(chain_of(h, target)) {
            assert_eq!(x.0.hash(), y.0.hash(), "fork at height {}", x.0.height);
        }
    }
    // Offline: the chain verifies with per-height stakes, the transfer
    // appears once, the refused ones never.
    let (tip, stakes) =
        mesh_core::ledger::chain::verify_chain_stakes(&g, reference.iter().map(|(b, c)| (b, c)))
            .unwrap();
    assert_eq!(tip, reference.last().unwrap().0.hash());
    assert_eq!(stakes.power_of(&newcomer.peer_id()), 3);
    assert_eq!(stakes.next_nonce(&ids[0].peer_id()), 2);
    let carried: Vec<u64> = reference
        .iter()
        .filter(|(b, _)| b.stake.iter().any(|t| t.id() == tx.id()))
        .map(|(b, _)| b.height)
        .collect();
    assert_eq!(carried.len(), 1, "{carried:?}");
    for (b, _) in &reference {
        assert!(b
            .stake
            .iter()
            .all(|t| t.id() != gift.id() && t.id() != overdraft.id()));
    }
    // Blocks after the transfer's are certified by the newcomer, never by
    // A, and their certificates do not verify under the genesis stakes.
    let genesis_stakes = Stakes::genesis(&g);
    for (b, c) in &reference[carried[0] as usize..] {
        let signers: Vec<_> = c.signatures.iter().map(|s| s.validator).collect();
        assert!(signers.contains(&newcomer.peer_id()), "block {}", b.height);
        assert!(!signers.contains(&ids[0].peer_id()), "block {}", b.height);
        assert!(c.verify(&genesis_stakes).is_err());
    }
    // A follower joining now syncs across the change of validator set.
    let late_id = Identity::from_seed([92; 32]);
    let late_node = net.add_node(late_id.clone(), Limits::default());
    late_node.dial(nodes[4].addr()).await.unwrap();
    late_node.dial(nodes[1].addr()).await.unwrap();
    let late = start(&late_node, &g, &late_id, Box::new(EmptyBlocks)).await;
    all_reach(&[&late], target, Duration::from_secs(120)).await;
    for (x, y) in reference.iter().zip(chain_of(&late, target)) {
        assert_eq!(x.0.hash(), y.0.hash());
    }
    let seen = late.status().stakes;
    assert_eq!(seen.power_of(&newcomer.peer_id()), 3);
    assert_eq!(seen.power_of(&ids[0].peer_id()), 0);
    assert!(!late.status().validator);
}

/// Heights of every handle.
fn heights(hs: &[LedgerHandle]) -> Vec<u64> {
    hs.iter().map(|h| h.status().height).collect()
}

/// Asserts that all handles agree on every height they have both decided.
fn assert_no_fork(hs: &[LedgerHandle]) {
    let top = heights(hs).into_iter().max().unwrap_or(0);
    for height in 1..=top {
        let hashes: BTreeSet<BlockHash> = hs
            .iter()
            .filter_map(|h| h.block(height))
            .map(|(b, _)| b.hash())
            .collect();
        assert!(hashes.len() <= 1, "fork at height {height}: {hashes:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn twenty_validators_with_unequal_stake_on_a_lossy_partitioned_network_never_fork() {
    let net = MemoryNet::new(14);
    net.set_default_link(LinkConfig {
        latency: Duration::from_millis(20),
        loss: 0.05,
        ..LinkConfig::default()
    });
    let ids = identities(20, 60);
    let powers: Vec<u64> = (1..=20).collect();
    let g = genesis(&ids, &powers);
    // Each node connects to its next four on a ring (degree 8): gossip
    // crosses several hops, as it would on a real mesh.
    let nodes: Vec<MemoryNetwork> = ids
        .iter()
        .map(|id| net.add_node(id.clone(), Limits::default()))
        .collect();
    for i in 0..nodes.len() {
        for d in 1..=4 {
            let j = (i + d) % nodes.len();
            nodes[i].dial(nodes[j].addr()).await.unwrap();
        }
    }
    let mut handles = Vec::new();
    for (node, id) in nodes.iter().zip(&ids) {
        handles.push(start(node, &g, id, Box::new(EmptyBlocks)).await);
    }
    let refs: Vec<&LedgerHandle> = handles.iter().collect();
    let before = net.stats();
    let t0 = tokio::time::Instant::now();
    all_reach(&refs, 10, Duration::from_secs(300)).await;
    let elapsed = t0.elapsed();
    let stats = net.stats();
    let decided = heights(&handles).into_iter().min().unwrap();
    let per_height = (stats.messages_delivered - before.messages_delivered) / decided;
    println!(
        "20 validators, unequal stake, 20 ms links, 5% loss: {decided} heights in {:.1} s of \
         network time ({:.2} heights/s), {per_height} messages delivered per height, \
         {} lost in all",
        elapsed.as_secs_f64(),
        decided as f64 / elapsed.as_secs_f64(),
        stats.messages_lost - before.messages_lost
    );
    assert_no_fork(&handles);

    // A partition in which neither side holds more than 2/3 of the stake
    // (even and odd stakes: 110 and 100 of 210): no side can decide alone.
    let (a, b): (Vec<_>, Vec<_>) = ids.iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let side = |s: Vec<(usize, &Identity)>| s.into_iter().map(|(_, id)| id.peer_id()).collect();
    net.partition(&[side(a), side(b)]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let split = heights(&handles);
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert_eq!(heights(&handles), split, "a side without a quorum decided");
    assert_no_fork(&handles);

    // Healed: the chain resumes, every node catches up, still one chain.
    net.heal();
    let top = split.iter().copied().max().unwrap();
    all_reach(&refs, top + 3, Duration::from_secs(300)).await;
    assert_no_fork(&handles);
    let chain = chain_of(&handles[0], top + 3);
    verify_chain(&g, chain.iter().map(|(b, c)| (b, c))).unwrap();
}

/// The same consensus over real libp2p swarms on loopback (TCP, noise,
/// gossipsub, request/response): four validators and a follower that
/// bootstraps late.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validators_on_real_libp2p_swarms_decide_and_a_follower_syncs() {
    use mesh_core::network::p2p::{P2pConfig, P2pNetwork};

    async fn p2p(id: &Identity, bootstrap: Option<mesh_core::network::Multiaddr>) -> P2pNetwork {
        let mut config = P2pConfig::loopback(id.clone());
        config.bootstrap = bootstrap.into_iter().collect();
        config.gossip_heartbeat = Duration::from_millis(200);
        P2pNetwork::start(config).await.expect("node starts")
    }
    let ids = identities(4, 80);
    let g = genesis(&ids, &[3, 1, 1, 2]);
    let first = p2p(&ids[0], None).await;
    let addr = first
        .listen_addrs()
        .await
        .unwrap()
        .into_iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .unwrap()
        .with(libp2p::multiaddr::Protocol::P2p(ids[0].peer_id()));
    let mut nets: Vec<Arc<dyn Network>> = vec![Arc::new(first)];
    for id in &ids[1..] {
        nets.push(Arc::new(p2p(id, Some(addr.clone())).await));
    }
    // Let gossipsub form its mesh before the first proposal.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut handles = Vec::new();
    for (net, id) in nets.iter().zip(&ids) {
        let h = consensus::start(
            net.clone(),
            g.clone(),
            id,
            Box::new(MemoryChain::default()),
            Box::new(EmptyBlocks),
            config(),
        )
        .await
        .unwrap();
        handles.push(h);
    }
    let refs: Vec<&LedgerHandle> = handles.iter().collect();
    all_reach(&refs, 3, Duration::from_secs(120)).await;
    let follower_id = Identity::from_seed([90; 32]);
    let follower_net: Arc<dyn Network> = Arc::new(p2p(&follower_id, Some(addr)).await);
    let follower = consensus::start(
        follower_net,
        g.clone(),
        &follower_id,
        Box::new(MemoryChain::default()),
        Box::new(EmptyBlocks),
        config(),
    )
    .await
    .unwrap();
    all_reach(&[&follower], 3, Duration::from_secs(120)).await;
    let reference = chain_of(&handles[0], 3);
    verify_chain(&g, reference.iter().map(|(b, c)| (b, c))).unwrap();
    for h in handles.iter().skip(1).chain([&follower]) {
        for (a, b) in reference.iter().zip(chain_of(h, 3)) {
            assert_eq!(a.0.hash(), b.0.hash(), "fork at height {}", a.0.height);
        }
    }
    for n in &nets {
        n.shutdown().await.unwrap();
    }
}

/// Four validators (stake 2, 1, 1, 1) with model sync, each a `Node` with
/// its own update store, and a fifth network node for an author without
/// stake, all connected on one in-memory network (real time, two threads).
struct SyncMesh {
    nodes: Vec<MemoryNetwork>,
    validators: Vec<mesh_core::node::Node>,
    handles: Vec<LedgerHandle>,
    base: std::path::PathBuf,
    genesis: Genesis,
    author: Identity,
    // Dropped last: the nodes' tasks run on it.
    rt: tokio::runtime::Runtime,
}

fn sync_mesh(seed: u8, tag: &str) -> SyncMesh {
    use mesh_core::node::{Node, NodeOptions};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let net = MemoryNet::new(u64::from(seed));
    let ids = identities(4, seed);
    let genesis = genesis(&ids, &[2, 1, 1, 1]);
    let author = Identity::from_seed([seed.wrapping_add(10); 32]);
    let mut all = ids.clone();
    all.push(author.clone());
    let nodes = rt.block_on(mesh(&net, &all));
    let base = std::env::temp_dir().join(format!("mesh-ledger-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let (mut validators, mut handles) = (Vec::new(), Vec::new());
    for (i, (n, id)) in nodes.iter().zip(&ids).enumerate() {
        let netw: Arc<dyn Network> = Arc::new(n.clone());
        let node = Node::with_network(netw, rt.handle().clone(), NodeOptions::default())
            .with_identity(id.clone())
            .unwrap();
        node.enable_updates(base.join(format!("n{i}"))).unwrap();
        let h = node
            .start_ledger(genesis.clone(), Box::new(MemoryChain::default()), config())
            .unwrap();
        handles.push(h);
        validators.push(node);
    }
    SyncMesh {
        nodes,
        validators,
        handles,
        base,
        genesis,
        author,
        rt,
    }
}

impl SyncMesh {
    /// Validator `i`'s update store.
    fn store(&self, i: usize) -> mesh_core::ledger::AdapterStore {
        mesh_core::ledger::AdapterStore::open(self.base.join(format!("n{i}"))).unwrap()
    }

    /// Gossips `record` from the author a few times (gossip reaches only the
    /// nodes subscribed at the time).
    fn publish(&self, record: &UpdateRecord) {
        let data = Bytes::from(record.encode());
        let author_net = self.nodes[4].clone();
        self.rt.block_on(async {
            for _ in 0..3 {
                author_net
                    .publish(mesh_core::ledger::record::UPDATE_TOPIC, data.clone())
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
    }

    /// Polls `done` every 100 ms for up to `within`; whether it held.
    fn wait_for(&self, within: Duration, mut done: impl FnMut(&SyncMesh) -> bool) -> bool {
        let until = std::time::Instant::now() + within;
        while std::time::Instant::now() < until {
            if done(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The chain up to the lowest validator's height, verified offline.
    fn verified_chain(&self) -> Vec<(Block, Certificate)> {
        let top = self
            .handles
            .iter()
            .map(|h| h.status().height)
            .min()
            .unwrap();
        let chain = chain_of(&self.handles[0], top);
        verify_chain(&self.genesis, chain.iter().map(|(b, c)| (b, c))).unwrap();
        chain
    }

    fn close(self) {
        drop(self.handles);
        for v in self.validators {
            v.shutdown().unwrap();
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

fn record_of(author: &Identity, adapter: ModelId, size: usize) -> UpdateRecord {
    UpdateRecord::sign(
        author,
        UpdateDraft {
            base: ModelId([5; 32]),
            adapter,
            adapter_size: size as u64,
            parent: None,
            metrics: vec![],
        },
    )
    .unwrap()
}

/// Nodes with model sync run the ledger: an update record gossiped by an
/// author (no stake) is fetched by the validators, decided in a block, and
/// becomes the active adapter everywhere; every validator then holds the
/// adapter's bytes.
#[test]
fn nodes_decide_a_gossiped_update_once_every_validator_holds_its_adapter() {
    use mesh_core::node::{Node, NodeOptions};

    let m = sync_mesh(120, "pool");
    // The author is a node with model sync too: it stores an adapter (any
    // bytes: no model is served here) and serves it from there.
    let author_net: Arc<dyn Network> = Arc::new(m.nodes[4].clone());
    let author = Node::with_network(author_net, m.rt.handle().clone(), NodeOptions::default())
        .with_identity(m.author.clone())
        .unwrap();
    author.enable_updates(m.base.join("author")).unwrap();
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let store = mesh_core::ledger::AdapterStore::open(m.base.join("author")).unwrap();
    let adapter = store.put(&bytes).unwrap();
    let record = record_of(&m.author, adapter, bytes.len());
    m.publish(&record);
    // Decided everywhere, and every validator's fetch (started when it first
    // checked a block naming it) has finished.
    let decided = m.wait_for(Duration::from_secs(90), |m| {
        (0..4).all(|i| m.store(i).get(adapter).is_some())
            && m.handles
                .iter()
                .all(|h| h.status().active.get(&record.base) == Some(&adapter))
    });
    assert!(
        decided,
        "the update was not decided: {:?}",
        m.handles.iter().map(|h| h.status()).collect::<Vec<_>>()
    );
    let chain = m.verified_chain();
    let carrying: Vec<&Block> = chain
        .iter()
        .map(|(b, _)| b)
        .filter(|b| !b.updates.is_empty())
        .collect();
    assert_eq!(carrying.len(), 1, "the update was decided more than once");
    assert_eq!(carrying[0].updates[0].id(), record.id());
    for i in 0..4 {
        let held = m
            .store(i)
            .get(adapter)
            .expect("every validator holds the decided adapter");
        assert_eq!(std::fs::read(held).unwrap(), bytes);
    }
    author.shutdown().unwrap();
    m.close();
}

/// An author whose record names one adapter but who sends other bytes for
/// it: no validator keeps the bytes, the update is never decided, the chain
/// goes on with empty blocks, and the validators' fetches back off (each
/// asks a handful of times, not once per block it proposes).
#[test]
fn an_author_sending_other_bytes_than_its_record_names_gets_nothing_decided() {
    use mesh_core::ledger::transfer::{self, ADAPTER_METHOD};
    use std::sync::atomic::{AtomicUsize, Ordering};

    let m = sync_mesh(160, "liar");
    let bytes: Vec<u8> = (0..200_000u32).map(|i| (i * 11 % 253) as u8).collect();
    let store = mesh_core::ledger::AdapterStore::open(m.base.join("author")).unwrap();
    let adapter = store.put(&bytes).unwrap();
    // The file under the adapter's hash now holds other bytes of the same
    // size, which the author sends when asked.
    let mut other = bytes.clone();
    other.iter_mut().step_by(997).for_each(|b| *b ^= 0x5a);
    std::fs::write(store.path_of(adapter), &other).unwrap();
    // The author answers chunk requests from that store, counting them (an
    // adapter this size is one request per fetch).
    let asked = Arc::new(AtomicUsize::new(0));
    let author_net = m.nodes[4].clone();
    let counter = asked.clone();
    m.rt.block_on(async {
        let mut requests = author_net.handle(ADAPTER_METHOD).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(transfer::serve(store.clone(), rx));
        tokio::spawn(async move {
            while let Some(r) = requests.recv().await {
                counter.fetch_add(1, Ordering::Relaxed);
                if tx.send(r).await.is_err() {
                    break;
                }
            }
        });
    });
    let start = std::time::Instant::now();
    let h0 = m.handles.iter().map(|h| h.status().height).min().unwrap();
    m.publish(&record_of(&m.author, adapter, bytes.len()));
    // Long enough for many proposals by every validator.
    let went_on = m.wait_for(Duration::from_secs(120), |m| {
        m.handles.iter().all(|h| h.status().height >= h0 + 60)
    });
    assert!(
        went_on,
        "the chain stalled: {:?}",
        m.handles.iter().map(|h| h.status()).collect::<Vec<_>>()
    );
    let elapsed = start.elapsed().as_secs_f64();
    let chain = m.verified_chain();
    assert!(
        chain
            .iter()
            .all(|(b, _)| b.updates.is_empty() && b.active.is_empty()),
        "a block carries the liar's update"
    );
    for (i, h) in m.handles.iter().enumerate() {
        assert!(h.status().active.is_empty(), "validator {i}");
        assert!(
            m.store(i).get(adapter).is_none(),
            "validator {i} kept the bytes"
        );
    }
    // Each validator fetches when it first proposes after hearing the
    // record, then after 1, 2, 4, ... s: within `elapsed` seconds at most
    // 2 + log2(elapsed) times: 12 requests in 7.5 s here, against 59 when
    // the pool retried on every proposal.
    let asked = asked.load(Ordering::Relaxed);
    let bound = 4.0 * (2.0 + elapsed.max(1.0).log2());
    eprintln!("{asked} chunk requests to the author in {elapsed:.1} s (bound {bound:.1})");
    assert!(asked >= 1, "no validator tried to fetch the adapter");
    assert!(
        (asked as f64) <= bound,
        "{asked} requests in {elapsed:.1} s: fetches do not back off"
    );
    m.close();
}
