//! The ledger on a node: run it, read its status, get the adapter it makes
//! active for a model.

use std::os::raw::c_char;
use std::path::PathBuf;

use mesh_core::engine::Engine;
use mesh_core::ledger::chain::Genesis;
use mesh_core::ledger::db::LedgerDb;
use serde_json::{json, Value};

use crate::ffi;
use crate::model::mesh_model;
use crate::node::{lock, mesh_node};
use crate::status::{boundary, mesh_status, Failure, FfiResult};

/// An optional path argument (NULL: `None`).
///
/// # Safety
/// `ptr` is NULL or a NUL-terminated string.
unsafe fn opt_path(ptr: *const c_char, name: &str) -> FfiResult<Option<PathBuf>> {
    if ptr.is_null() {
        return Ok(None);
    }
    // SAFETY: caller's contract.
    Ok(Some(PathBuf::from(unsafe { ffi::c_str(ptr, name) }?)))
}

fn cache(sub: &str) -> FfiResult<PathBuf> {
    Ok(mesh_core::fetch::cache_dir()?.join(sub))
}

/// Run the ledger of the genesis file at `genesis_path` (JSON: chain id,
/// validators and their stake; see the README) on `node`: it votes if the
/// node's identity (`mesh_node_params.identity_path`) has stake, and
/// follows the chain otherwise. Decided blocks are kept in the redb file
/// `store_path` (NULL: in the cache, named after the genesis). Model sync
/// is switched on with adapters kept in `updates_dir` (NULL: the cache's
/// `updates`): blocks carry the update records the node hears, and a
/// validator votes only for blocks whose adapters it holds. The ledger runs
/// until the node is freed.
///
/// `MESH_STATUS_IO` when a file cannot be read or created,
/// `MESH_STATUS_INVALID_ARG` for a genesis that is not valid, a store
/// holding another chain's blocks, or a ledger already running on `node`.
///
/// Threads: any thread; returns once the ledger runs (the store's blocks
/// verified).
#[no_mangle]
pub unsafe extern "C" fn mesh_node_ledger_start(
    node: *const mesh_node,
    genesis_path: *const c_char,
    store_path: *const c_char,
    updates_dir: *const c_char,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let genesis_path = unsafe { ffi::c_str(genesis_path, "genesis_path") }?;
        // SAFETY: caller's contract.
        let store = unsafe { opt_path(store_path, "store_path") }?;
        // SAFETY: caller's contract.
        let updates = unsafe { opt_path(updates_dir, "updates_dir") }?;
        let mut slot = lock(&node.ledger);
        if slot.is_some() {
            return Err(Failure::new(
                mesh_status::InvalidArg,
                "a ledger already runs on this node",
            ));
        }
        let text = std::fs::read_to_string(genesis_path)
            .map_err(|e| Failure::new(mesh_status::Io, format!("genesis {genesis_path}: {e}")))?;
        let genesis = Genesis::from_json(&text).map_err(mesh_core::Error::from)?;
        let store = match store {
            Some(p) => p,
            None => LedgerDb::default_path(&genesis)?,
        };
        let updates = match updates {
            Some(p) => p,
            None => cache("updates")?,
        };
        node.node().enable_updates(updates)?;
        let db = LedgerDb::open(&store, &genesis).map_err(mesh_core::Error::from)?;
        let handle = node
            .node()
            .start_ledger(genesis, Box::new(db), Default::default())?;
        *slot = Some(handle);
        Ok(())
    })
}

fn no_ledger() -> Failure {
    Failure::new(
        mesh_status::InvalidArg,
        "no ledger runs on this node (mesh_node_ledger_start)",
    )
}

/// The ledger's status as one JSON object, NUL-terminated in `buf` of `cap`
/// bytes (buffer rules as `mesh_node_peer_id`): `height` (of the last
/// decided block), `tip` (its hash, hex), `round` (of the height under way),
/// `validator` (whether this node votes), `peers_height` (the highest height
/// heard from a validator), `synced` (heard one and caught up with it) and
/// `active` (model id -> the adapter id the ledger makes it run, hex) and
/// `stakes` (peer id -> stake: the validators of the next height, after the
/// stake transfers decided so far).
///
/// `MESH_STATUS_INVALID_ARG` if no ledger runs on `node`.
///
/// Threads: any thread; returns at once.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_ledger_status(
    node: *const mesh_node,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let buf = unsafe { ffi::buf_out(buf, cap, n_out, "buf") }?;
        let status = lock(&node.ledger)
            .as_ref()
            .map(|l| l.status())
            .ok_or_else(no_ledger)?;
        let active: serde_json::Map<String, Value> = status
            .active
            .iter()
            .map(|(m, a)| (m.to_hex(), Value::String(a.to_hex())))
            .collect();
        let text = json!({
            "height": status.height, "tip": status.tip.to_hex(), "round": status.round,
            "validator": status.validator, "peers_height": status.peers_height,
            "synced": status.is_synced(), "active": active,
            "stakes": status.stakes.validators().iter()
                .map(|v| (v.peer_id.to_string(), json!(v.power)))
                .collect::<serde_json::Map<String, Value>>(),
        })
        .to_string();
        buf.write_text(text.as_bytes())
    })
}

/// The adapter the ledger makes active for `model`, ready to apply with
/// `mesh_context_add_lora`: fetched from peers if needed (checked against
/// its hash and loaded for the model), its file's path NUL-terminated in
/// `buf` of `cap` bytes (buffer rules as `mesh_node_peer_id`). An empty
/// string if the ledger names no adapter for the model (yet).
///
/// `MESH_STATUS_INVALID_ARG` if no ledger runs on `node`, `MESH_STATUS_NETWORK`
/// if no peer sends the adapter, `MESH_STATUS_GGUF` if it does not load.
///
/// Threads: any thread; blocks while fetching.
#[no_mangle]
pub unsafe extern "C" fn mesh_node_ledger_adapter(
    node: *const mesh_node,
    model: *const mesh_model,
    buf: *mut c_char,
    cap: usize,
    n_out: *mut usize,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let engine = unsafe { ffi::arc_clone(model, "model") }?;
        // SAFETY: caller's contract.
        let buf = unsafe { ffi::buf_out(buf, cap, n_out, "buf") }?;
        let source = lock(&node.ledger)
            .as_ref()
            .ok_or_else(no_ledger)?
            .active_source(engine.info().id);
        let Some(s) = source else {
            return buf.write_text(b"");
        };
        let (_, fetched) =
            node.node()
                .fetch_adapter(&engine, s.adapter, s.size, s.holder, &Default::default())?;
        buf.write_text(fetched.path.to_string_lossy().as_bytes())
    })
}

/// Gives `amount` of this node's stake in its ledger to the peer `to` (a
/// peer id string): a transfer signed with the node's identity (its stake
/// key), numbered after its last decided transfer, sent to the validators.
/// It takes effect at the height after the block that carries it: watch
/// `stakes` in `mesh_node_ledger_status`. A holder that gives all its stake
/// stops voting; the receiver starts.
///
/// `MESH_STATUS_INVALID_ARG` if no ledger runs on `node`, `to` is not an
/// Ed25519 peer id or is this node, `amount` is 0, or this node does not
/// hold `amount` at the ledger's current height.
///
/// Threads: any thread; returns once the transfer is sent (not decided).
#[no_mangle]
pub unsafe extern "C" fn mesh_node_ledger_transfer(
    node: *const mesh_node,
    to: *const c_char,
    amount: u64,
) -> mesh_status {
    boundary(|| {
        // SAFETY: caller's contract.
        let node = unsafe { ffi::handle(node, "node") }?;
        // SAFETY: caller's contract.
        let text = unsafe { ffi::c_str(to, "to") }?;
        let peer = crate::node::parse_peer_id(text, "to")?;
        let ledger = lock(&node.ledger);
        let ledger = ledger.as_ref().ok_or_else(no_ledger)?;
        node.node().transfer_stake(ledger, peer, amount)?;
        Ok(())
    })
}
