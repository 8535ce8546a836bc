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

#[test]
fn aggregate_leaves_out_the_outlier_and_writes_a_loadable_adapter() {
    use mesh_core::engine::LoraAdapter;
    use mesh_core::ledger::aggregate::{update_distance, update_norm};
    let m = model();
    let path = mesh_core::fetch::resolve_model(&m, &mut |_| {}).unwrap();
    let engine = GgmlEngine::load(&path, 1).unwrap();
    let targets = [(2, Projection::Q), (7, Projection::Down)];
    // Four peers agree on an update; a fifth sends an unrelated, larger one.
    let honest = lora::testing::random_adapter(engine.info(), &targets, 4, 8.0, 0.05, 11);
    let outlier = lora::testing::random_adapter(engine.info(), &targets, 4, 8.0, 0.5, 12);
    let root = std::env::temp_dir().join(format!("mesh-cli-aggregate-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let mut files = Vec::new();
    for i in 0..5 {
        let f = root.join(format!("update-{i}.gguf"));
        std::fs::write(&f, if i == 3 { &outlier } else { &honest }).unwrap();
        files.push(f.to_str().unwrap().to_owned());
    }
    let out = root.join("aggregate.gguf");
    let run = |files: &[String]| {
        let mut args = vec![
            "aggregate",
            "--model",
            &m,
            "--output",
            out.to_str().unwrap(),
        ];
        args.extend(files.iter().map(String::as_str));
        Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(&args)
            .output()
            .unwrap()
    };
    let o = run(&files);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let selected: Vec<&str> = v["selected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let want: Vec<&str> = [0, 1, 2, 4].iter().map(|&i| files[i].as_str()).collect();
    assert_eq!(selected, want);
    let agg = LoraAdapter::load(&out, engine.info()).unwrap();
    assert_eq!(v["id"], agg.id().to_hex().as_str());
    assert_eq!(
        agg.rank(2, Projection::Q),
        Some(16),
        "4 updates of rank 4, stacked"
    );
    // Four identical updates, none clipped: their mean is the update itself.
    let honest = LoraAdapter::from_bytes(&honest, engine.info()).unwrap();
    let d = update_distance(&agg, &honest);
    assert!(d <= 1e-6 * update_norm(&honest), "{d}");
    assert_eq!(
        std::fs::read_dir(&root).unwrap().count(),
        6,
        "no partial file left"
    );

    // Too few updates for one Byzantine: an error, no output.
    std::fs::remove_file(&out).unwrap();
    let o = run(&files[..3]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("at least 5"), "{err}");
    assert!(!out.exists());
    let _ = std::fs::remove_dir_all(&root);
}
