//! Shared helpers of the CLI tests that run `mesh` processes on loopback.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Ten greedy prompts of ordinary text.
pub const PROMPTS: [&str; 10] = [
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

/// `$MESH_MODEL`, or `default` (fetched into the cache by the CLI itself).
pub fn model() -> String {
    std::env::var("MESH_MODEL").unwrap_or_else(|_| "default".into())
}

/// A `mesh node` process; killed (SIGKILL) when dropped.
pub struct NodeProcess {
    pub child: Child,
    pub peer_id: String,
    pub addr: String,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `mesh node --listen 127.0.0.1 --serve SERVE ARGS...` (bootstrapping
/// from `bootstrap`) and returns once it printed an event named `ready`
/// (`serving`, or `helping` for a helper).
pub fn spawn_node(serve: &str, args: &[&str], bootstrap: Option<&str>, ready: &str) -> NodeProcess {
    let mut all = vec!["node", "--listen", "/ip4/127.0.0.1/tcp/0", "--serve", serve];
    all.extend_from_slice(args);
    if let Some(b) = bootstrap {
        all.extend(["--bootstrap", b]);
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(&all)
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
    // Wait for the ready line (the speed measurement is done, handlers up).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let v = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("mesh node reports {ready}"));
        if v["event"] == ready {
            break;
        }
    }
    // Keep draining events so the node never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    NodeProcess {
        child,
        peer_id,
        addr,
    }
}

/// `mesh generate` arguments for greedy JSON output of `max_tokens` tokens.
pub fn generate_args<'a>(prompt: &'a str, max_tokens: &'a str) -> Vec<&'a str> {
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

/// Runs `mesh ARGS --model MODEL`, which must succeed; its JSON output.
pub fn run_json(args: &[&str], model: &str) -> Value {
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

/// Runs `mesh generate ... --events`, calling `on_event` with each JSON
/// line of its standard error; returns (success, stdout, stderr lines).
pub fn generate_watching(
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
