//! The ledger's redb store: reopens with its chain, refuses another chain,
//! survives `kill -9` in the middle of writes (100 times) without a partial
//! block, and lets restarted validators continue the chain.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use mesh_core::ledger::chain::{
    verify_chain, verify_link, Block, BlockDraft, BlockHash, Genesis, GenesisValidator,
};
use mesh_core::ledger::consensus::{
    self, certify, ChainStore, EmptyBlocks, LedgerConfig, LedgerHandle, VoteKind,
};
use mesh_core::ledger::db::LedgerDb;
use mesh_core::ledger::Stakes;
use mesh_core::network::memory::{MemoryNet, MemoryNetwork};
use mesh_core::network::{Identity, Limits, Network};

const CHILD_ENV: &str = "MESH_LEDGER_DB_CHILD";

fn identities() -> Vec<Identity> {
    (0..4).map(|i| Identity::from_seed([100 + i; 32])).collect()
}

fn genesis(ids: &[Identity], name: &str) -> Genesis {
    Genesis::new(
        name,
        ids.iter()
            .map(|id| GenesisValidator {
                peer_id: id.peer_id(),
                power: 1,
            })
            .collect(),
    )
    .unwrap()
}

fn temp(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mesh-ledger-db-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Appends the next certified block (signed by three of the four).
fn extend(db: &mut LedgerDb, g: &Genesis, ids: &[Identity]) {
    let height = db.height() + 1;
    let parent = match height {
        1 => g.hash(),
        h => db.get(h - 1).expect("tip").0.hash(),
    };
    let block = Block::build(height, parent, ids[0].peer_id(), BlockDraft::default()).unwrap();
    let cert = certify(g, &block, 0, &ids[..3]);
    db.append(&block, &cert).unwrap();
}

fn check_whole(db: &LedgerDb, g: &Genesis) -> BlockHash {
    let chain: Vec<_> = (1..=db.height())
        .map(|h| db.get(h).unwrap_or_else(|| panic!("block {h} missing")))
        .collect();
    verify_chain(g, chain.iter().map(|(b, c)| (b, c))).unwrap()
}

#[test]
fn a_store_reopens_with_its_chain_and_refuses_another_genesis() {
    let ids = identities();
    let g = genesis(&ids, "db-test");
    let dir = temp("reopen");
    let path = dir.join("ledger.redb");
    let tip = {
        let mut db = LedgerDb::open(&path, &g).unwrap();
        assert_eq!(db.height(), 0);
        for _ in 0..3 {
            extend(&mut db, &g, &ids);
        }
        // Not the next height: refused, nothing written.
        let (b2, c2) = db.get(2).unwrap();
        assert!(db.append(&b2, &c2).is_err());
        // Votes: recorded, read back, dropped once their height is decided.
        db.record_vote(4, 0, VoteKind::Prevote, Some(BlockHash([1; 32])))
            .unwrap();
        db.record_vote(4, 1, VoteKind::Precommit, None).unwrap();
        assert_eq!(
            db.signed_vote(4, 0, VoteKind::Prevote),
            Some(Some(BlockHash([1; 32])))
        );
        assert_eq!(db.signed_vote(4, 1, VoteKind::Precommit), Some(None));
        assert_eq!(db.signed_vote(4, 0, VoteKind::Precommit), None);
        // The write-ahead log: per height, in order; made durable by the
        // next recorded vote.
        db.wal_append(4, b"first").unwrap();
        db.wal_append(5, b"later height").unwrap();
        db.wal_append(4, b"second").unwrap();
        db.record_vote(4, 2, VoteKind::Prevote, None).unwrap();
        check_whole(&db, &g)
    };
    let mut db = LedgerDb::open(&path, &g).unwrap();
    assert_eq!(db.height(), 3);
    assert_eq!(check_whole(&db, &g), tip);
    assert_eq!(db.signed_vote(4, 1, VoteKind::Precommit), Some(None));
    assert_eq!(db.wal(4), vec![b"first".to_vec(), b"second".to_vec()]);
    assert_eq!(db.wal(5), vec![b"later height".to_vec()]);
    assert!(db.wal(3).is_empty());
    extend(&mut db, &g, &ids);
    assert_eq!(db.signed_vote(4, 1, VoteKind::Precommit), None);
    // Height 4 decided: its log is dropped, the next one's kept.
    assert!(db.wal(4).is_empty());
    assert_eq!(db.wal(5), vec![b"later height".to_vec()]);
    drop(db);
    let other = genesis(&ids, "another-chain");
    let err = LedgerDb::open(&path, &other).unwrap_err();
    assert!(err.to_string().contains("another genesis"), "{err}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Run by the kill test in a child process: appends blocks until killed.
#[test]
#[ignore = "a helper the kill -9 test runs in a child process"]
fn writer_child() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let ids = identities();
    let g = genesis(&ids, "db-kill");
    let mut db = LedgerDb::open(Path::new(&path), &g).unwrap();
    loop {
        extend(&mut db, &g, &ids);
        db.record_vote(db.height() + 1, 0, VoteKind::Prevote, None)
            .unwrap();
    }
}

#[test]
fn kill_9_during_writes_never_leaves_a_partial_block() {
    let ids = identities();
    let g = genesis(&ids, "db-kill");
    let dir = temp("kill");
    let path = dir.join("ledger.redb");
    let exe = std::env::current_exe().unwrap();
    let mut last = 0;
    let mut grew = 0;
    for round in 0..100u64 {
        let mut child = Command::new(&exe)
            .args(["--ignored", "--exact", "writer_child", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // A pseudo-random point: 20 to 120 ms in (process start included).
        let wait = 20 + (round.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 57);
        std::thread::sleep(Duration::from_millis(wait));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let db = LedgerDb::open(&path, &g).unwrap_or_else(|e| panic!("kill {round}: {e}"));
        assert!(db.height() >= last, "kill {round}: height went back");
        if db.height() > last {
            grew += 1;
        }
        last = db.height();
        // The newest block is whole and links to its parent.
        if last > 0 {
            let (block, cert) = db.get(last).expect("the newest block");
            let parent = match last {
                1 => g.hash(),
                h => db.get(h - 1).expect("its parent").0.hash(),
            };
            verify_link(&Stakes::genesis(&g), last, parent, &block, &cert).unwrap();
        }
    }
    let db = LedgerDb::open(&path, &g).unwrap();
    check_whole(&db, &g);
    println!("kill -9 x100: the store reopened every time, {last} blocks, all verified");
    // The writer made progress between most kills (else the test proves little).
    assert!(
        grew >= 50,
        "the store grew in only {grew} of 100 runs (height {last})"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(start_paused = true)]
async fn validators_restarted_from_their_stores_continue_the_chain() {
    let ids = identities();
    let g = genesis(&ids, "db-restart");
    let dir = temp("restart");
    let net = MemoryNet::new(5);
    let config = LedgerConfig {
        block_interval: Duration::from_millis(100),
        ..LedgerConfig::default()
    };
    async fn run(
        net: &MemoryNet,
        ids: &[Identity],
        g: &Genesis,
        dir: &Path,
        config: &LedgerConfig,
    ) -> Vec<LedgerHandle> {
        let nodes: Vec<MemoryNetwork> = ids
            .iter()
            .map(|id| net.add_node(id.clone(), Limits::default()))
            .collect();
        for i in 0..nodes.len() {
            for j in i + 1..nodes.len() {
                nodes[i].dial(nodes[j].addr()).await.unwrap();
            }
        }
        let mut hs = Vec::new();
        for (i, (node, id)) in nodes.iter().zip(ids).enumerate() {
            let db = LedgerDb::open(dir.join(format!("v{i}.redb")), g).unwrap();
            let net: Arc<dyn Network> = Arc::new(node.clone());
            let h = consensus::start(
                net,
                g.clone(),
                id,
                Box::new(db),
                Box::new(EmptyBlocks),
                config.clone(),
            )
            .await
            .unwrap();
            hs.push(h);
        }
        hs
    }
    let hs = run(&net, &ids, &g, &dir, &config).await;
    for h in &hs {
        assert!(
            tokio::time::timeout(Duration::from_secs(60), h.wait_for_height(3))
                .await
                .unwrap()
        );
    }
    for h in hs {
        h.stop().await;
    }
    let hs = run(&net, &ids, &g, &dir, &config).await;
    for h in &hs {
        assert!(h.status().height >= 3, "the store lost blocks");
    }
    for h in &hs {
        assert!(
            tokio::time::timeout(Duration::from_secs(60), h.wait_for_height(6))
                .await
                .unwrap()
        );
    }
    for height in 1..=6 {
        let hashes: std::collections::BTreeSet<BlockHash> = hs
            .iter()
            .map(|h| h.block(height).unwrap().0.hash())
            .collect();
        assert_eq!(hashes.len(), 1, "fork at height {height}");
    }
    for h in hs {
        h.stop().await;
    }
    let _ = std::fs::remove_dir_all(dir);
}
