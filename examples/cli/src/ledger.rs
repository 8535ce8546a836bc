//! `mesh ledger` (genesis files, a store's status, offline verification) and
//! the ledger parts of `mesh node` and `mesh generate`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_core::engine::{Engine, GgmlEngine, LoraAdapter};
use mesh_core::ledger::chain::{verify_chain_stakes, Block, Genesis, GenesisValidator};
use mesh_core::ledger::consensus::{ChainStore, LedgerEvent, LedgerHandle};
use mesh_core::ledger::db::LedgerDb;
use mesh_core::ledger::Stakes;
use mesh_core::network::{Identity, PeerId};
use mesh_core::node::Node;
use serde_json::{json, Value};

use crate::BoxError;

/// Reads and checks a genesis file.
pub fn read_genesis(path: &Path) -> Result<Genesis, BoxError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("genesis {}: {e}", path.display()))?;
    Ok(Genesis::from_json(&text).map_err(|e| format!("{}: {e}", path.display()))?)
}

/// `mesh ledger genesis`: validators given as `PEER_ID[:STAKE]` or
/// `IDENTITY_FILE[:STAKE]` (the file is created when missing, like
/// `mesh node --identity`).
pub fn genesis(
    chain_id: &str,
    validators: &[String],
    output: Option<&Path>,
) -> Result<(), BoxError> {
    let mut list = Vec::new();
    for spec in validators {
        let (who, power) = match spec.rsplit_once(':') {
            Some((who, p)) if p.chars().all(|c| c.is_ascii_digit()) && !p.is_empty() => {
                let power: u64 = p
                    .parse()
                    .map_err(|_| format!("--validator {spec}: stake {p} is too large"))?;
                (who, power)
            }
            _ => (spec.as_str(), 1),
        };
        let peer_id = match who.parse::<PeerId>() {
            Ok(p) => p,
            Err(_) => Identity::load_or_create(Path::new(who))
                .map_err(|e| {
                    format!("--validator {spec}: not a peer id, and as an identity file: {e}")
                })?
                .peer_id(),
        };
        list.push(GenesisValidator { peer_id, power });
    }
    let g = Genesis::new(chain_id, list)?;
    let text = g.to_json();
    match output {
        Some(path) => {
            std::fs::write(path, format!("{text}\n"))
                .map_err(|e| format!("{}: {e}", path.display()))?;
            println!(
                "{}",
                json!({"genesis": path.display().to_string(), "hash": g.hash().to_hex(),
                       "validators": g.validators.len(), "total_stake": g.total_power()})
            );
        }
        None => println!("{text}"),
    }
    Ok(())
}

fn active_json(
    active: &std::collections::BTreeMap<mesh_core::engine::ModelId, mesh_core::engine::ModelId>,
) -> Value {
    Value::Object(
        active
            .iter()
            .map(|(b, a)| (b.to_hex(), Value::String(a.to_hex())))
            .collect(),
    )
}

/// `mesh ledger status` (no signature checks) and `mesh ledger verify`
/// (every link and certificate against the genesis).
pub fn inspect(genesis: &Path, store: &Path, verify: bool) -> Result<(), BoxError> {
    let g = read_genesis(genesis)?;
    if !store.exists() {
        return Err(format!("{}: no ledger store there", store.display()).into());
    }
    let db = LedgerDb::open(store, &g)?;
    let mut blocks = Vec::new();
    for h in 1..=db.height() {
        let pair = db
            .get(h)
            .ok_or_else(|| format!("{}: block {h} cannot be read", store.display()))?;
        blocks.push(pair);
    }
    let (tip, stakes) = if verify {
        verify_chain_stakes(&g, blocks.iter().map(|(b, c)| (b, c)))?
    } else {
        let mut stakes = Stakes::genesis(&g);
        for (b, _) in &blocks {
            stakes = stakes.after(b)?;
        }
        let tip = blocks
            .last()
            .map(|(b, _)| b.hash())
            .unwrap_or_else(|| g.hash());
        (tip, stakes)
    };
    let mut active = std::collections::BTreeMap::new();
    let mut updates = 0;
    for (b, _) in &blocks {
        active.extend(b.active.iter().map(|(x, y)| (*x, *y)));
        updates += b.updates.len();
    }
    let mut out = json!({
        "height": db.height(), "tip": tip.to_hex(), "genesis": g.hash().to_hex(),
        "chain_id": g.chain_id, "updates": updates, "active": active_json(&active),
        "stakes": stakes_json(&stakes),
    });
    if verify {
        out["verified"] = json!(true);
    }
    println!("{out}");
    Ok(())
}

/// Peer id -> stake, for JSON output.
pub fn stakes_json(stakes: &Stakes) -> Value {
    Value::Object(
        stakes
            .validators()
            .iter()
            .map(|v| (v.peer_id.to_string(), json!(v.power)))
            .collect(),
    )
}

/// Where a node keeps its ledger by default: next to its update store, or in
/// the cache.
pub fn default_store(updates: Option<&Path>, genesis: &Genesis) -> Result<PathBuf, BoxError> {
    Ok(match updates {
        Some(dir) => dir.join(LedgerDb::file_name(genesis)),
        None => LedgerDb::default_path(genesis)?,
    })
}

/// JSON for a decided block.
pub fn block_json(event: &str, b: &Block, round: Option<u32>) -> Value {
    json!({"event": event, "height": b.height, "hash": b.hash().to_hex(),
           "proposer": b.proposer.to_string(), "round": round,
           "updates": b.updates.iter().map(|u| u.id().to_hex()).collect::<Vec<_>>(),
           "active": active_json(&b.active),
           "stake": b.stake.iter().map(|t| json!({"from": t.from.to_string(), "to": t.to.to_string(),
                                                   "amount": t.amount, "nonce": t.nonce}))
                           .collect::<Vec<_>>()})
}

/// Starts `node`'s ledger and prints `ledger` (and later `ledger_decided` /
/// `ledger_synced`) lines; returns the handle (the ledger stops with it).
pub fn start_on(node: &Node, genesis: Genesis, store: &Path) -> Result<LedgerHandle, BoxError> {
    let db = LedgerDb::open(store, &genesis)?;
    let handle = node.start_ledger(genesis, Box::new(db), Default::default())?;
    let s = handle.status();
    println!(
        "{}",
        json!({"event": "ledger", "validator": s.validator, "height": s.height,
               "tip": s.tip.to_hex(), "store": store.display().to_string()})
    );
    Ok(handle)
}

/// Prints one ledger event as a JSON line.
pub fn print_event(handle: &LedgerHandle, e: &LedgerEvent) {
    match e {
        LedgerEvent::Decided { height, round, .. } => {
            if let Some((b, _)) = handle.block(*height) {
                println!("{}", block_json("ledger_decided", &b, Some(*round)));
            }
        }
        LedgerEvent::Synced { height, from } => {
            if let Some((b, _)) = handle.block(*height) {
                let mut v = block_json("ledger_synced", &b, None);
                v["from"] = json!(from.to_string());
                println!("{v}");
            }
        }
        LedgerEvent::Rejected { from, reason } => println!(
            "{}",
            json!({"event": "ledger_rejected", "from": from.to_string(), "reason": reason})
        ),
    }
}

/// `mesh ledger propose`.
pub fn propose(
    adapter: &Path,
    model: &Path,
    genesis: &Path,
    bootstrap: Vec<mesh_core::network::Multiaddr>,
    identity: Option<&Path>,
    wait: Duration,
) -> Result<(), BoxError> {
    let genesis = read_genesis(genesis)?;
    let identity = match identity {
        Some(p) => Identity::load_or_create(p)?,
        None => Identity::ephemeral(),
    };
    let engine = GgmlEngine::load(model, 1)?;
    let mut config = mesh_core::network::p2p::P2pConfig::new(identity);
    config.listen = vec![
        "/ip4/0.0.0.0/tcp/0".parse()?,
        "/ip4/0.0.0.0/udp/0/quic-v1".parse()?,
    ];
    config.bootstrap = bootstrap;
    let node = Node::open(config, Default::default())?;
    let cache = mesh_core::fetch::cache_dir()?;
    node.enable_updates(cache.join("updates"))?;
    let store = default_store(None, &genesis)?;
    let db = LedgerDb::open(&store, &genesis)?;
    let ledger = node.start_ledger(genesis, Box::new(db), Default::default())?;
    let record = node
        .publish_update(&engine, adapter, None, Vec::new())
        .map_err(|e| format!("--adapter {}: {e}", adapter.display()))?;
    eprintln!(
        "{}",
        json!({"event": "update", "id": record.id().to_hex(), "adapter": record.adapter.to_hex(),
               "author": record.author.to_string()})
    );
    let carries = |b: &Block| b.updates.iter().any(|u| u.id() == record.id());
    match wait_for_block(&ledger, 0, wait, carries) {
        Ok(b) => {
            let active = b.active.get(&record.base).map(|a| a.to_hex());
            println!(
                "{}",
                json!({"update": record.id().to_hex(), "adapter": record.adapter.to_hex(),
                       "decided_at": b.height, "active": active})
            );
            drop(ledger);
            node.shutdown()?;
            Ok(())
        }
        Err(height) => Err(format!(
            "update {} was not decided within {wait:?} (chain at height {height}); \
             validators decide only updates whose adapter they could fetch and load",
            record.id()
        )
        .into()),
    }
}

/// The first block after height `from` for which `carries` holds, waiting
/// up to `wait` for it; the chain's height if none came.
fn wait_for_block(
    ledger: &LedgerHandle,
    from: u64,
    wait: Duration,
    carries: impl Fn(&Block) -> bool,
) -> Result<Block, u64> {
    let deadline = Instant::now() + wait;
    let mut checked = from;
    loop {
        let height = ledger.status().height;
        for h in checked + 1..=height {
            if let Some((b, _)) = ledger.block(h) {
                if carries(&b) {
                    return Ok(b);
                }
            }
        }
        checked = height;
        if Instant::now() >= deadline {
            return Err(height);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Opens a short-lived node (an ephemeral network identity: the stake key
/// only signs) that follows the ledger of `genesis` in memory (a store on
/// disk may be held by a node running here), and waits until it is in sync
/// with the validators.
fn follow(
    genesis: &Genesis,
    bootstrap: Vec<mesh_core::network::Multiaddr>,
    wait: Duration,
) -> Result<(Node, LedgerHandle), BoxError> {
    let mut config = mesh_core::network::p2p::P2pConfig::new(Identity::ephemeral());
    config.listen = vec!["/ip4/0.0.0.0/tcp/0".parse()?];
    config.bootstrap = bootstrap;
    let node = Node::open(config, Default::default())?;
    let chain = mesh_core::ledger::consensus::MemoryChain::default();
    let handle = node.start_ledger(genesis.clone(), Box::new(chain), Default::default())?;
    wait_synced(&handle, wait, "--wait")?;
    Ok((node, handle))
}

fn wait_synced(handle: &LedgerHandle, wait: Duration, flag: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + wait;
    while !handle.status().is_synced() {
        if Instant::now() >= deadline {
            return Err(format!(
                "{flag}: not in sync with the validators within {wait:?} (height {}, validators heard at {})",
                handle.status().height,
                handle.status().peers_height
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// `mesh ledger stake`.
pub fn stake(
    genesis: &Path,
    identity: &Path,
    to: PeerId,
    amount: u64,
    bootstrap: Vec<mesh_core::network::Multiaddr>,
    wait: Duration,
) -> Result<(), BoxError> {
    let genesis = read_genesis(genesis)?;
    if !identity.exists() {
        return Err(format!("--identity {}: no such key file", identity.display()).into());
    }
    let giver = Identity::load_or_create(identity)?;
    let (node, ledger) = follow(&genesis, bootstrap, wait)?;
    let tx = ledger
        .transfer_stake(&giver, to, amount)
        .map_err(|e| format!("at height {}: {e}", ledger.status().height))?;
    eprintln!(
        "{}",
        json!({"event": "stake_submitted", "transfer": tx.id().to_hex(), "nonce": tx.nonce,
               "height": ledger.status().height})
    );
    let from = ledger.status().height;
    match wait_for_block(&ledger, from, wait, |b| {
        b.stake.iter().any(|t| t.id() == tx.id())
    }) {
        Ok(b) => {
            println!(
                "{}",
                json!({"transfer": tx.id().to_hex(), "from": tx.from.to_string(),
                       "to": tx.to.to_string(), "amount": tx.amount, "decided_at": b.height,
                       "stakes": stakes_json(&ledger.status().stakes)})
            );
            drop(ledger);
            node.shutdown()?;
            Ok(())
        }
        Err(height) => Err(format!(
            "transfer {} was not decided within {wait:?} (chain at height {height})",
            tx.id()
        )
        .into()),
    }
}

/// `mesh generate --follow-ledger`: follows the ledger of `genesis` through
/// `node` until it holds as many blocks as the validators it hears, then
/// fetches the adapter the ledger makes active for `engine`'s model (if
/// any). Prints a `ledger_adapter` line on stderr.
pub fn active_adapter(
    node: &Node,
    engine: &GgmlEngine,
    genesis: Genesis,
    wait: Duration,
) -> Result<Option<Arc<LoraAdapter>>, BoxError> {
    let dir = mesh_core::fetch::cache_dir()?.join("updates");
    node.enable_updates(&dir)?;
    let store = default_store(None, &genesis)?;
    let db = LedgerDb::open(&store, &genesis)?;
    let handle = node.start_ledger(genesis, Box::new(db), Default::default())?;
    wait_synced(&handle, wait, "--follow-ledger")?;
    let status = handle.status();
    let Some(source) = handle.active_source(engine.info().id) else {
        eprintln!(
            "{}",
            json!({"event": "ledger_adapter", "height": status.height, "adapter": null})
        );
        return Ok(None);
    };
    let (loaded, fetched) = node.fetch_adapter(
        engine,
        source.adapter,
        source.size,
        source.holder,
        &Default::default(),
    )?;
    eprintln!(
        "{}",
        json!({"event": "ledger_adapter", "height": status.height,
               "adapter": source.adapter.to_hex(), "decided_at": source.height,
               "path": fetched.path.display().to_string()})
    );
    Ok(Some(loaded))
}
