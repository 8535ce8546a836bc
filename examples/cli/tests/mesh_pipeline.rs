//! Pipeline inference across real processes on loopback: `mesh node --serve`
//! stages, `mesh generate --mesh` from another process, kill -9 of a stage
//! mid-generation, and every stage gone.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// `$MESH_MODEL`, or `default` (fetched into the cache by the CLI itself).
fn model() -> String {
    std::env::var("MESH_MODEL").unwrap_or_else(|_| "default".into())
}

/// A `mesh node` process; killed (SIGKILL) when dropped.
struct Stage {
    child: Child,
    peer_id: String,
    addr: String,
}

impl Drop for Stage {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `mesh node` serving `layers` (e.g. "0-10"), bootstrapping from
/// `bootstrap`; returns once it serves.
fn stage(layers: &str, bootstrap: Option<&str>) -> Stage {
    let serve = format!("{}:{layers}", model());
    let mut args = vec![
        "node",
        "--listen",
        "/ip4/127.0.0.1/tcp/0",
        "--serve",
        &serve,
    ];
    if let Some(b) = bootstrap {
        args.extend(["--bootstrap", b]);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mesh node");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel::<Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    let first = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("mesh node prints its listen line");
    let peer_id = first["peer_id"].as_str().unwrap().to_owned();
    let addr = first["listen"][0].as_str().unwrap().to_owned();
    let addr = if addr.contains("/p2p/") {
        addr
    } else {
        format!("{addr}/p2p/{peer_id}")
    };
    // Wait for the serving line (the speed measurement is done, handler up).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("mesh node reports serving");
        if v["event"] == "serving" {
            break;
        }
    }
    // Keep draining events so the node never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Stage {
        child,
        peer_id,
        addr,
    }
}

fn generate_args<'a>(prompt: &'a str, max_tokens: &'a str) -> Vec<&'a str> {
    vec![
        "generate",
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--ignore-eos",
        "--max-tokens",
        max_tokens,
        "--format",
        "json",
        "--threads",
        "1",
    ]
}

fn run_json(args: &[&str], model: &str) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .args(["--model", model])
        .output()
        .expect("run mesh");
    assert!(
        out.status.success(),
        "mesh {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON output")
}

const PROMPTS: [&str; 10] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "My favourite book is",
    "To make a cup of tea, first",
    "The largest planet in the solar system",
    "In 1969, humans",
    "A haiku about the sea:",
];

#[test]
fn three_stage_processes_give_the_tokens_of_local_generation() {
    let m = model();
    let a = stage("0-10", None);
    let b = stage("10-20", Some(&a.addr));
    let c = stage("20-30", Some(&a.addr));
    for prompt in PROMPTS {
        let args = generate_args(prompt, "32");
        let local = run_json(&args, &m);
        let mut mesh_args = args.clone();
        mesh_args.extend(["--mesh", "--bootstrap", &a.addr]);
        let piped = run_json(&mesh_args, &m);
        assert_eq!(piped["token_ids"], local["token_ids"], "{prompt}");
        assert_eq!(piped["failovers"], 0);
        let plan: Vec<(String, Value)> = piped["plan"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| {
                (
                    h["peer_id"].as_str().unwrap().to_owned(),
                    h["layers"].clone(),
                )
            })
            .collect();
        assert_eq!(
            plan,
            vec![
                (a.peer_id.clone(), serde_json::json!([0, 10])),
                (b.peer_id.clone(), serde_json::json!([10, 20])),
                (c.peer_id.clone(), serde_json::json!([20, 30])),
            ]
        );
        assert!(piped["hop_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(piped["bytes_per_token"], 3.0 * 2.0 * 576.0 * 4.0);
    }
}

/// Runs `mesh generate --mesh --events`, calling `on_event` with each JSON
/// line of its standard error; returns (success, stdout, stderr lines).
fn generate_watching(
    args: &[&str],
    mut on_event: impl FnMut(&Value),
) -> (bool, String, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .args(["--model", &model()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mesh generate");
    let stderr = child.stderr.take().unwrap();
    let mut lines = Vec::new();
    for line in BufReader::new(stderr).lines().map_while(Result::ok) {
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            on_event(&v);
        }
        lines.push(line);
    }
    let out = child.wait_with_output().expect("wait for mesh generate");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        lines,
    )
}

#[test]
fn kill_9_of_the_middle_stage_fails_over_with_identical_tokens() {
    let m = model();
    let a = stage("0-10", None);
    let mut middle = vec![stage("10-20", Some(&a.addr)), stage("10-20", Some(&a.addr))];
    let _c = stage("20-30", Some(&a.addr));
    let args = generate_args(PROMPTS[1], "48");
    let local = run_json(&args, &m);
    let mut mesh_args = args.clone();
    mesh_args.extend(["--mesh", "--bootstrap", &a.addr, "--events"]);
    let mut in_plan = None;
    let mut killed = None;
    let (ok, stdout, stderr) = generate_watching(&mesh_args, |v| {
        if v["event"] == "plan" && in_plan.is_none() {
            in_plan = Some(v["hops"][1]["peer_id"].as_str().unwrap().to_owned());
        }
        if v["event"] == "piece" && v["index"] == 10 {
            let victim = in_plan.as_ref().expect("the plan comes first");
            let i = middle.iter().position(|s| &s.peer_id == victim).unwrap();
            let mut stage = middle.remove(i);
            // kill -9, mid-generation.
            stage.child.kill().unwrap();
            killed = Some(stage.peer_id.clone());
            drop(stage);
        }
    });
    assert!(ok, "generate failed: {stderr:?}");
    let killed = killed.expect("the victim was killed at piece 10");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["token_ids"], local["token_ids"]);
    assert_eq!(v["failovers"], 1, "{stderr:?}");
    assert_eq!(v["failed"], serde_json::json!([killed]));
    assert_eq!(v["plan"][1]["peer_id"], middle[0].peer_id.as_str());
    assert!(
        stderr.iter().any(|l| l.contains("\"event\":\"failover\"")),
        "{stderr:?}"
    );
}

#[test]
fn every_stage_gone_is_an_error_within_the_deadline() {
    let a = stage("0-15", None);
    let b = stage("15-30", Some(&a.addr));
    let mut stages = vec![a, b];
    let addr = stages[0].addr.clone();
    let mut args = generate_args(PROMPTS[0], "64");
    args.extend([
        "--mesh",
        "--bootstrap",
        &addr,
        "--events",
        "--stage-timeout",
        "3",
        "--find-timeout",
        "2",
    ]);
    let started = Instant::now();
    let (ok, _, stderr) = generate_watching(&args, |v| {
        if v["event"] == "piece" && v["index"] == 5 {
            stages.clear();
        }
    });
    assert!(!ok, "generation went on without stages");
    assert!(started.elapsed() < Duration::from_secs(60));
    let last = stderr.last().cloned().unwrap_or_default();
    assert!(
        last.contains("mesh: error: pipeline:"),
        "expected a pipeline error, found {stderr:?}"
    );
}
