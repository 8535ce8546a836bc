//! `mesh node`, `mesh find` and `mesh generate --mesh` across two network namespaces joined by a
//! veth pair, with 20 ms of `tc netem` delay on each side where the kernel
//! has netem. The test creates and removes the namespaces itself and is
//! skipped, saying why, where namespaces are not permitted (not root, no
//! `ip`).

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MESH: &str = env!("CARGO_BIN_EXE_mesh");

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Two namespaces and a veth pair; removed on drop (with every process in them).
struct Netns {
    a: String,
    b: String,
    children: Vec<Child>,
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = ip(&["netns", "del", &self.a]);
        let _ = ip(&["netns", "del", &self.b]);
    }
}

impl Netns {
    fn create(subnet: &str) -> Result<Netns, String> {
        let id = std::process::id();
        let ns = Netns {
            a: format!("mesh{id}a"),
            b: format!("mesh{id}b"),
            children: Vec::new(),
        };
        ip(&["netns", "add", &ns.a])?;
        ip(&["netns", "add", &ns.b])?;
        let (va, vb) = (format!("mv{id}a"), format!("mv{id}b"));
        ip(&["link", "add", &va, "type", "veth", "peer", "name", &vb])?;
        ip(&["link", "set", &va, "netns", &ns.a])?;
        ip(&["link", "set", &vb, "netns", &ns.b])?;
        ip(&[
            "-n",
            &ns.a,
            "addr",
            "add",
            &format!("{subnet}.1/24"),
            "dev",
            &va,
        ])?;
        ip(&[
            "-n",
            &ns.b,
            "addr",
            "add",
            &format!("{subnet}.2/24"),
            "dev",
            &vb,
        ])?;
        for (n, v) in [(&ns.a, &va), (&ns.b, &vb)] {
            ip(&["-n", n, "link", "set", v, "up"])?;
            ip(&["-n", n, "link", "set", "lo", "up"])?;
        }
        Ok(ns)
    }

    /// Adds 20 ms of delay on both ends; false if this kernel has no netem.
    fn add_delay(&self) -> bool {
        let id = std::process::id();
        [(&self.a, format!("mv{id}a")), (&self.b, format!("mv{id}b"))]
            .iter()
            .all(|(n, v)| {
                Command::new("ip")
                    .args([
                        "netns", "exec", n, "tc", "qdisc", "add", "dev", v, "root", "netem",
                        "delay", "20ms",
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
    }

    fn spawn(&mut self, ns: &str, args: &[&str]) -> mpsc::Receiver<serde_json::Value> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, MESH])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mesh node");
        let out: ChildStdout = child.stdout.take().expect("piped stdout");
        self.children.push(child);
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&line) {
                    if tx.send(v).is_err() {
                        break;
                    }
                }
            }
        });
        rx
    }
}

fn find(ns: &str, bootstrap: &str, layer: Option<u32>) -> serde_json::Value {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        MESH,
        "find",
        "--bootstrap",
        bootstrap,
        "--model",
        "default",
        "--timeout",
        "30",
    ]);
    if let Some(l) = layer {
        cmd.args(["--layer", &l.to_string()]);
    }
    let out = cmd.output().expect("run mesh find");
    assert!(
        out.status.success(),
        "mesh find failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("mesh find prints JSON")
}

fn layer_sets(v: &serde_json::Value) -> Vec<(String, [u64; 2])> {
    let mut out: Vec<_> = v["providers"]
        .as_array()
        .expect("providers array")
        .iter()
        .map(|p| {
            let l = p["layers"].as_array().expect("layers");
            (
                p["peer_id"].as_str().expect("peer id").to_owned(),
                [l[0].as_u64().unwrap(), l[1].as_u64().unwrap()],
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn nodes_in_two_namespaces_find_each_other_over_a_delayed_veth() {
    let mut ns = match Netns::create("10.231.77") {
        Ok(ns) => ns,
        Err(e) => {
            eprintln!("SKIPPED: network namespaces are not permitted here ({e})");
            return;
        }
    };
    let delayed = ns.add_delay();
    if !delayed {
        eprintln!(
            "NOTE: this kernel has no netem qdisc; the namespaces run without the 20 ms delay"
        );
    }
    let (a, b) = (ns.a.clone(), ns.b.clone());
    let a_events = ns.spawn(
        &a,
        &[
            "node",
            "--listen",
            "/ip4/10.231.77.1/tcp/0",
            "--serve",
            "default:0-15",
        ],
    );
    let hello = a_events
        .recv_timeout(Duration::from_secs(120))
        .expect("node A prints its listen line");
    let a_id = hello["peer_id"].as_str().unwrap().to_owned();
    let a_addr = hello["listen"][0].as_str().unwrap().to_owned();
    assert!(a_addr.starts_with("/ip4/10.231.77.1/tcp/"), "{a_addr}");
    let b_events = ns.spawn(
        &b,
        &[
            "node",
            "--listen",
            "/ip4/10.231.77.2/tcp/0",
            "--bootstrap",
            &a_addr,
            "--serve",
            "default:15-30",
        ],
    );
    let hello = b_events
        .recv_timeout(Duration::from_secs(120))
        .expect("node B prints its listen line");
    let b_id = hello["peer_id"].as_str().unwrap().to_owned();
    let b_addr = hello["listen"][0].as_str().unwrap().to_owned();

    // From each namespace, through the other node, both ranges are found.
    let want = {
        let mut w = vec![(a_id.clone(), [0, 15]), (b_id.clone(), [15, 30])];
        w.sort();
        w
    };
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let got = layer_sets(&find(&b, &a_addr, None));
        if got == want {
            break;
        }
        assert!(
            Instant::now() < until,
            "providers seen from B: {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        layer_sets(&find(&a, &b_addr, Some(20))),
        vec![(b_id.clone(), [15, 30])]
    );
    assert_eq!(
        layer_sets(&find(&a, &b_addr, Some(3))),
        vec![(a_id.clone(), [0, 15])]
    );

    // B measures its RTT to A: with netem on both ends it is at least 40 ms.
    let until = Instant::now() + Duration::from_secs(30);
    let rtt = loop {
        let e = b_events
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .expect("an rtt event from B");
        if e["event"] == "rtt" && e["peer_id"] == a_id.as_str() {
            break e["ms"].as_f64().unwrap();
        }
    };
    eprintln!("RTT B -> A: {rtt:.2} ms (netem: {delayed})");
    if delayed {
        assert!(rtt >= 38.0, "RTT {rtt} ms with 2 x 20 ms netem");
    }

    // A 2-namespace pipeline: a client in B's namespace runs layers 0-15 on A
    // (across the veth) and 15-30 on B, and gets the tokens of local generation.
    let generate = |ns: &str, extra: &[&str]| -> serde_json::Value {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, MESH, "generate", "--model", "default"])
            .args(["--prompt", "The capital of France is", "--temperature", "0"])
            .args(["--ignore-eos", "--max-tokens", "16", "--threads", "1"])
            .args(["--format", "json"])
            .args(extra)
            .output()
            .expect("run mesh generate");
        assert!(
            out.status.success(),
            "mesh generate {extra:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("mesh generate prints JSON")
    };
    let local = generate(&b, &[]);
    let piped = generate(&b, &["--mesh", "--bootstrap", &a_addr]);
    assert_eq!(piped["token_ids"], local["token_ids"]);
    let plan: Vec<(String, serde_json::Value)> = piped["plan"]
        .as_array()
        .expect("plan")
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
            (a_id.clone(), serde_json::json!([0, 15])),
            (b_id.clone(), serde_json::json!([15, 30]))
        ]
    );
    eprintln!(
        "pipeline across the namespaces: {:.2} ms per hop",
        piped["hop_ms"].as_f64().unwrap()
    );

    // SIGTERM: B withdraws and exits cleanly; A sees the withdrawal.
    let pid = ns.children[1].id();
    assert!(Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    let status = ns.children[1].wait().unwrap();
    assert!(status.success(), "node B exits 0 on SIGTERM: {status}");
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let e = a_events
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .expect("withdrawal seen by A");
        if e["event"] == "providers_changed"
            && e["peer_id"] == b_id.as_str()
            && e["layers"].is_null()
        {
            break;
        }
    }
}
