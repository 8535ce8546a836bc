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

/// The first line for which `pick` is true, within `limit`. On timeout the
/// panic shows the last lines that did not match, to tell a slow process from
/// one that went another way.
fn wait_for(p: &Proc, limit: Duration, pick: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    let mut skipped = std::collections::VecDeque::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(v) = p.lines.recv_timeout(left) else {
            let seen: Vec<String> = skipped.iter().map(Value::to_string).collect();
            panic!(
                "no matching line within {limit:?}; the last ones were:\n{}",
                seen.join("\n")
            );
        };
        if pick(&v) {
            return v;
        }
        if skipped.len() == 12 {
            skipped.pop_front();
        }
        skipped.push_back(v);
    }
}

/// Whether `v` reports a block appended to a node's chain. A validator
/// usually decides a block itself (`ledger_decided`), but one that missed the
/// last votes takes it from a peer (`ledger_synced`); on a slow machine either
/// can happen, and both carry the same block.
fn is_block(v: &Value) -> bool {
    v["event"] == "ledger_decided" || v["event"] == "ledger_synced"
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

/// The ledger across processes on loopback: four `mesh node --ledger`
/// validators (identities and stakes from `mesh ledger genesis`); an author
/// without stake runs `mesh ledger propose --adapter`; the update is fetched
/// by every validator, decided with a commit certificate, and a fifth
/// process, `mesh generate --follow-ledger`, fetches and runs it: its greedy tokens equal local
/// generation with `--lora` on that file. `mesh ledger verify` then checks a
/// validator's store offline.
#[test]
fn four_validator_processes_decide_an_update_that_a_fifth_process_runs() {
    let m = model();
    let path = mesh_core::fetch::resolve_model(&m, &mut |_| {}).unwrap();
    let model_path = path.to_str().unwrap().to_owned();
    let engine = GgmlEngine::load(&path, 1).unwrap();
    let bytes = lora::testing::random_adapter(
        engine.info(),
        &[
            (3, Projection::Q),
            (12, Projection::Down),
            (20, Projection::Up),
        ],
        8,
        16.0,
        0.08,
        21,
    );
    let adapter_id = mesh_core::engine::LoraAdapter::from_bytes(&bytes, engine.info())
        .unwrap()
        .id()
        .to_hex();
    let model_id = engine.info().id.to_hex();
    drop(engine);
    let root = std::env::temp_dir().join(format!("mesh-cli-ledger-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let file = root.join("adapter.gguf");
    std::fs::write(&file, &bytes).unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    let mesh = |args: &[String]| {
        Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(args)
            .env("MESH_CACHE_DIR", root.join("cache"))
            .output()
            .unwrap()
    };

    // The genesis: four identity files (created here), unequal stake.
    let genesis = root.join("genesis.json");
    let mut args: Vec<String> = vec![
        "ledger".into(),
        "genesis".into(),
        "--chain-id".into(),
        "cli-test".into(),
    ];
    for (i, stake) in [3, 2, 2, 1].iter().enumerate() {
        args.push("--validator".into());
        args.push(format!("{}:{stake}", s(&root.join(format!("id{i}.key")))));
    }
    args.extend(["-o".into(), s(&genesis)]);
    let o = mesh(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let summary: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["validators"], 4);
    assert_eq!(summary["total_stake"], 8);

    let serve = format!("{model_path}:0-2");
    let validator = |i: usize, extra: &[&str]| {
        let dir = s(&root.join(format!("v{i}")));
        let id = s(&root.join(format!("id{i}.key")));
        let mut args = vec![
            "node",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--serve",
            &serve,
            "--threads",
            "1",
            "--identity",
            &id,
            "--updates",
            &dir,
            "--validator",
            "--ledger",
        ];
        let g = s(&genesis);
        args.push(&g);
        args.extend_from_slice(extra);
        spawn(&args)
    };
    let file_arg = s(&file);
    let v0 = validator(0, &[]);
    let first = wait_for(&v0, Duration::from_secs(120), |v| v["peer_id"].is_string());
    let addr = format!(
        "{}/p2p/{}",
        first["listen"][0].as_str().unwrap(),
        first["peer_id"].as_str().unwrap()
    );
    let ledger = wait_for(&v0, Duration::from_secs(120), |v| v["event"] == "ledger");
    assert_eq!(ledger["validator"], true);
    let others: Vec<Proc> = (1..4)
        .map(|i| validator(i, &["--bootstrap", &addr]))
        .collect();
    // The author (no stake) proposes the adapter and waits for the decision.
    let author_key = s(&root.join("author.key"));
    let g = s(&genesis);
    // Without stake, `--validator` refuses to start.
    let o = mesh(&[
        "node".into(),
        "--identity".into(),
        author_key.clone(),
        "--ledger".into(),
        g.clone(),
        "--validator".into(),
    ]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no stake"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = mesh(&[
        "ledger".into(),
        "propose".into(),
        "--adapter".into(),
        file_arg.clone(),
        "--model".into(),
        model_path.clone(),
        "--genesis".into(),
        g.clone(),
        "--bootstrap".into(),
        addr.clone(),
        "--identity".into(),
        author_key,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let proposed: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(proposed["adapter"], adapter_id.as_str());
    assert_eq!(proposed["active"], adapter_id.as_str());
    let decided = wait_for(&v0, Duration::from_secs(240), |v| {
        is_block(v) && !v["updates"].as_array().unwrap().is_empty()
    });
    assert_eq!(decided["height"], proposed["decided_at"]);
    assert_eq!(
        decided["active"][&model_id],
        adapter_id.as_str(),
        "{decided}"
    );

    // The fifth process: not a validator, it follows the chain and runs the
    // decided adapter.
    let prompt = "The three primary colors are";
    let gen = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "generate",
            "--model",
            &model_path,
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--ignore-eos",
            "--max-tokens",
            "24",
            "--format",
            "json",
            "--threads",
            "1",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.extend(extra.iter().map(|a| a.to_string()));
        let o = mesh(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        (v, String::from_utf8_lossy(&o.stderr).into_owned())
    };
    let (followed, err) = gen(&["--follow-ledger", &g, "--bootstrap", &addr]);
    assert!(
        err.contains("\"ledger_adapter\"") && err.contains(&adapter_id),
        "{err}"
    );
    let (local, _) = gen(&["--lora", &file_arg]);
    let (plain, _) = gen(&[]);
    assert_eq!(
        followed["token_ids"], local["token_ids"],
        "the followed adapter is not the file's"
    );
    assert_ne!(
        local["token_ids"], plain["token_ids"],
        "the adapter changes nothing: the test proves little"
    );

    // Validator 3 gives its stake (1 of 8) to the author: the author's key
    // signs nothing here, validator 3's does; the chain goes on without it.
    let author_peer = mesh_core::network::Identity::load_or_create(&root.join("author.key"))
        .unwrap()
        .peer_id()
        .to_string();
    let give_one = |extra: &[&str]| {
        let mut args: Vec<String> = vec![
            "ledger".into(),
            "stake".into(),
            "--genesis".into(),
            g.clone(),
            "--identity".into(),
            s(&root.join("id3.key")),
            "--to".into(),
            author_peer.clone(),
            "--amount".into(),
            "1".into(),
            "--bootstrap".into(),
            addr.clone(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        mesh(&args)
    };
    let o = give_one(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let moved: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(moved["stakes"][&author_peer], 1, "{moved}");
    assert_eq!(moved["stakes"].as_object().unwrap().len(), 4, "{moved}");
    let after = moved["decided_at"].as_u64().unwrap();
    wait_for(&v0, Duration::from_secs(120), |v| {
        is_block(v) && v["height"].as_u64().is_some_and(|h| h > after + 1)
    });
    // More than it holds now (nothing) is refused before anything is sent.
    let o = give_one(&["--wait", "30"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("holds 0"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Offline: a validator's store verifies against the genesis alone.
    drop(others);
    drop(v0);
    let store = std::fs::read_dir(root.join("v1"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "redb"))
        .expect("validator 1's ledger store");
    let o = mesh(&[
        "ledger".into(),
        "verify".into(),
        "--genesis".into(),
        g.clone(),
        "--store".into(),
        s(&store),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["verified"], true);
    assert_eq!(v["active"][&model_id], adapter_id.as_str());
    assert_eq!(v["stakes"][&author_peer], 1, "{v}");
    assert!(v["height"].as_u64().unwrap() >= decided["height"].as_u64().unwrap());
    // Another genesis does not open this store.
    let other = root.join("other.json");
    let o = mesh(&[
        "ledger".into(),
        "genesis".into(),
        "--chain-id".into(),
        "other".into(),
        "--validator".into(),
        s(&root.join("id0.key")),
        "-o".into(),
        s(&other),
    ]);
    assert!(o.status.success());
    let o = mesh(&[
        "ledger".into(),
        "status".into(),
        "--genesis".into(),
        s(&other),
        "--store".into(),
        s(&store),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("another genesis"));
    let _ = std::fs::remove_dir_all(&root);
}
