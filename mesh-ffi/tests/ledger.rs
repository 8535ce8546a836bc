//! The ledger through the C ABI: a node whose identity is the genesis's only
//! validator decides blocks alone; status and adapter are readable; errors
//! are statuses; the store keeps the chain across a restart.

use std::ffi::{CStr, CString};
use std::os::raw::c_char;
use std::ptr;
use std::time::{Duration, Instant};

use mesh_ffi::*;
use serde_json::Value;

fn last_error() -> String {
    let mut buf = vec![0 as c_char; 1024];
    let mut n = 0;
    unsafe { mesh_last_error_message(buf.as_mut_ptr(), buf.len(), &mut n) };
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

fn open(identity: &CString) -> *mut mesh_node {
    let listen = [c"/ip4/127.0.0.1/tcp/0".as_ptr()];
    let mut params = mesh_node_params_default();
    params.listen = listen.as_ptr();
    params.n_listen = 1;
    params.identity_path = identity.as_ptr();
    let mut node = ptr::null_mut();
    let status = unsafe { mesh_node_open(&params, &mut node) };
    assert_eq!(status, mesh_status::Ok, "{}", last_error());
    node
}

fn text(f: impl Fn(*mut c_char, usize, *mut usize) -> mesh_status) -> (mesh_status, String) {
    let mut buf = vec![0 as c_char; 4096];
    let mut n = 0;
    let status = f(buf.as_mut_ptr(), buf.len(), &mut n);
    let s = unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    (status, s)
}

fn status(node: *mut mesh_node) -> Value {
    let (s, json) = text(|b, c, n| unsafe { mesh_node_ledger_status(node, b, c, n) });
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    serde_json::from_str(&json).unwrap()
}

fn wait_height(node: *mut mesh_node, height: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = status(node);
        if v["height"].as_u64().unwrap() >= height {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "height {height} not reached: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_lone_validator_decides_blocks_readable_through_the_c_abi() {
    let dir = std::env::temp_dir().join(format!("mesh-ffi-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let c = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    let identity = c(&dir.join("id.key"));
    let node = open(&identity);
    let (s, peer) = text(|b, cap, n| unsafe { mesh_node_peer_id(node, b, cap, n) });
    assert_eq!(s, mesh_status::Ok);
    let genesis = dir.join("genesis.json");
    std::fs::write(
        &genesis,
        format!(r#"{{"chain_id": "ffi", "validators": [{{"peer_id": "{peer}", "power": 5}}]}}"#),
    )
    .unwrap();
    let (genesis, store, updates) = (c(&genesis), c(&dir.join("l.redb")), c(&dir.join("u")));

    // Nothing runs yet: a status.
    let (s, _) = text(|b, cap, n| unsafe { mesh_node_ledger_status(node, b, cap, n) });
    assert_eq!(s, mesh_status::InvalidArg);
    assert!(last_error().contains("no ledger"), "{}", last_error());
    let bad = c(&dir.join("missing.json"));
    let s = unsafe { mesh_node_ledger_start(node, bad.as_ptr(), store.as_ptr(), ptr::null()) };
    assert_eq!(s, mesh_status::Io);
    let s = unsafe { mesh_node_ledger_start(node, ptr::null(), store.as_ptr(), ptr::null()) };
    assert_eq!(s, mesh_status::NullArg);

    let s =
        unsafe { mesh_node_ledger_start(node, genesis.as_ptr(), store.as_ptr(), updates.as_ptr()) };
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    let s =
        unsafe { mesh_node_ledger_start(node, genesis.as_ptr(), store.as_ptr(), updates.as_ptr()) };
    assert_eq!(s, mesh_status::InvalidArg, "a second ledger on one node");
    let v = wait_height(node, 3);
    assert_eq!(v["validator"], true);
    assert_eq!(v["tip"].as_str().unwrap().len(), 64);
    assert_eq!(v["active"], serde_json::json!({}));
    // A buffer too small reports the size needed.
    let mut small = [0 as c_char; 4];
    let mut need = 0;
    let s = unsafe { mesh_node_ledger_status(node, small.as_mut_ptr(), 4, &mut need) };
    assert_eq!(s, mesh_status::BufferTooSmall);
    assert!(need > 20);
    let reached = v["height"].as_u64().unwrap();
    unsafe { mesh_node_free(node) };

    // The same identity and store: the chain goes on from where it was.
    let node = open(&identity);
    let s =
        unsafe { mesh_node_ledger_start(node, genesis.as_ptr(), store.as_ptr(), updates.as_ptr()) };
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    assert!(status(node)["height"].as_u64().unwrap() >= reached);
    wait_height(node, reached + 2);
    unsafe { mesh_node_free(node) };
    let _ = std::fs::remove_dir_all(&dir);
}

/// An update decided by a lone C-ABI validator: heard from an author node,
/// fetched, decided; `mesh_node_ledger_adapter` then gives its path, the
/// bytes the author published, which `mesh_context_add_lora` applies.
#[test]
fn the_ledgers_active_adapter_reaches_a_c_host() {
    use mesh_core::engine::{lora, Engine, GgmlEngine, Projection};
    use mesh_core::network::p2p::P2pConfig;
    use mesh_core::network::Identity;
    use mesh_core::node::{Node, NodeOptions};

    let dir = std::env::temp_dir().join(format!("mesh-ffi-ledger-adapter-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let c = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    let spec = std::env::var("MESH_MODEL").unwrap_or_else(|_| "default".into());
    let path = mesh_core::fetch::resolve_model(&spec, &mut |_| {}).unwrap();
    let engine = GgmlEngine::load(&path, 1).unwrap();
    let bytes =
        lora::testing::random_adapter(engine.info(), &[(5, Projection::V)], 4, 8.0, 0.05, 9);
    let adapter_file = dir.join("adapter.gguf");
    std::fs::write(&adapter_file, &bytes).unwrap();

    // The author: a Rust node that publishes the adapter as an update.
    let author = Node::open(
        P2pConfig::loopback(Identity::ephemeral()),
        NodeOptions::default(),
    )
    .unwrap();
    author.enable_updates(dir.join("author")).unwrap();
    author
        .publish_update(&engine, &adapter_file, None, Vec::new())
        .unwrap();
    let author_addr = author
        .listen_addrs()
        .unwrap()
        .into_iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .unwrap()
        .to_string();
    let author_addr = CString::new(format!("{author_addr}/p2p/{}", author.peer_id())).unwrap();

    // The C host: a node, the genesis naming it alone, the model.
    let identity = c(&dir.join("id.key"));
    let node = open(&identity);
    let (_, peer) = text(|b, cap, n| unsafe { mesh_node_peer_id(node, b, cap, n) });
    let genesis = dir.join("genesis.json");
    std::fs::write(
        &genesis,
        format!(
            r#"{{"chain_id": "ffi-adapter", "validators": [{{"peer_id": "{peer}", "power": 1}}]}}"#
        ),
    )
    .unwrap();
    assert_eq!(
        unsafe { mesh_node_dial(node, author_addr.as_ptr()) },
        mesh_status::Ok,
        "{}",
        last_error()
    );
    let spec = CString::new(path.to_str().unwrap()).unwrap();
    let mut mp = mesh_model_params_default();
    mp.n_threads = 1;
    let mut model = ptr::null();
    assert_eq!(
        unsafe { mesh_model_load(spec.as_ptr(), &mp, &mut model) },
        mesh_status::Ok
    );
    let (genesis, store, updates) = (c(&genesis), c(&dir.join("l.redb")), c(&dir.join("u")));
    let s =
        unsafe { mesh_node_ledger_start(node, genesis.as_ptr(), store.as_ptr(), updates.as_ptr()) };
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    // Wait until the update is decided and active.
    let model_hex = engine.info().id.to_hex();
    let deadline = Instant::now() + Duration::from_secs(60);
    while status(node)["active"].get(&model_hex).is_none() {
        assert!(Instant::now() < deadline, "not decided: {}", status(node));
        std::thread::sleep(Duration::from_millis(100));
    }
    let (s, held) = text(|b, cap, n| unsafe { mesh_node_ledger_adapter(node, model, b, cap, n) });
    assert_eq!(s, mesh_status::Ok, "{}", last_error());
    assert_eq!(std::fs::read(&held).unwrap(), bytes);
    let mut cp = mesh_context_params_default();
    cp.n_ctx = 64;
    let mut ctx = ptr::null_mut();
    assert_eq!(
        unsafe { mesh_context_new(model, &cp, &mut ctx) },
        mesh_status::Ok
    );
    let held = CString::new(held).unwrap();
    assert_eq!(
        unsafe { mesh_context_add_lora(ctx, held.as_ptr(), 1.0) },
        mesh_status::Ok,
        "{}",
        last_error()
    );
    unsafe {
        mesh_context_free(ctx);
        mesh_model_free(model);
        mesh_node_free(node);
    }
    author.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
