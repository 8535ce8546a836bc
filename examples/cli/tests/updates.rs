//! Model sync across processes on loopback: `mesh node --updates DIR
//! --publish-update FILE` signs and announces an adapter; another `mesh node
//! --updates DIR --fetch-updates` started later hears the record, fetches the
//! adapter by hash and keeps a byte-identical copy in its store.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::model;
use mesh_core::engine::{lora, Engine, GgmlEngine, Projection};
use serde_json::Value;

/// `mesh node` with `args`, its JSON lines on a channel; killed on drop.
struct Proc {
    child: std::process::Child,
    lines: mpsc::Receiver<Value>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(args: &[&str]) -> Proc {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mesh node");
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    Proc { child, lines }
}

/// The first line for which `pick` is true, within `limit`.
fn wait_for(p: &Proc, limit: Duration, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let v = p
            .lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no matching line within {limit:?}"));
        if pick(&v) {
            return v;
        }
    }
}

#[test]
fn a_published_adapter_reaches_a_node_that_joins_later() {
    let m = model();
    let path = mesh_core::fetch::resolve_model(&m, &mut |_| {}).unwrap();
    let engine = GgmlEngine::load(&path, 1).unwrap();
    let bytes = lora::testing::random_adapter(
        engine.info(),
        &[(4, Projection::K), (9, Projection::Up)],
        4,
        8.0,
        0.05,
        3,
    );
    let want = mesh_core::engine::LoraAdapter::from_bytes(&bytes, engine.info())
        .unwrap()
        .id()
        .to_hex();
    drop(engine);
    let root = std::env::temp_dir().join(format!("mesh-cli-updates-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let file = root.join("adapter.gguf");
    std::fs::write(&file, &bytes).unwrap();
    let (a_dir, b_dir) = (root.join("a"), root.join("b"));
    let serve = format!("{m}:0-2");
    let node = |dir: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "node",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--serve",
            &serve,
        ];
        args.extend(["--updates", dir.to_str().unwrap()]);
        args.extend_from_slice(extra);
        spawn(&args)
    };
    let a = node(&a_dir, &["--publish-update", file.to_str().unwrap()]);
    let first = wait_for(&a, Duration::from_secs(120), |v| v["peer_id"].is_string());
    let a_id = first["peer_id"].as_str().unwrap().to_owned();
    let addr = format!("{}/p2p/{a_id}", first["listen"][0].as_str().unwrap());
    let published = wait_for(&a, Duration::from_secs(120), |v| v["event"] == "update");
    assert_eq!(published["adapter"], want.as_str());
    assert_eq!(published["author"], a_id.as_str());

    // A node that was not there when the record was first sent.
    let b = node(&b_dir, &["--fetch-updates", "--bootstrap", &addr]);
    let heard = wait_for(&b, Duration::from_secs(120), |v| v["event"] == "update");
    assert_eq!(heard["id"], published["id"]);
    let fetched = wait_for(&b, Duration::from_secs(60), |v| {
        v["event"] == "update_fetched" || v["event"] == "update_fetch_failed"
    });
    assert_eq!(fetched["event"], "update_fetched", "{fetched}");
    assert_eq!(fetched["from"], a_id.as_str());
    let copy = std::fs::read(fetched["path"].as_str().unwrap()).unwrap();
    assert!(copy == bytes, "the fetched adapter differs");
    assert!(fetched["path"].as_str().unwrap().contains(&want));
    drop(b);
    drop(a);
    let _ = std::fs::remove_dir_all(&root);
}
