//! Private inference across real processes on loopback: `mesh node --helper`
//! processes hold the shares, `mesh generate --private N --bootstrap` owns the
//! model; kill -9 of a helper mid-generation, helpers that lie, replay or
//! stall, and every helper gone.

mod common;

use std::time::{Duration, Instant};

use common::{generate_args, generate_watching, model, run_json, spawn_node, NodeProcess, PROMPTS};
use serde_json::Value;

/// Starts `mesh node --serve MODEL --helper [--helper-fault FAULT]`.
fn helper(bootstrap: Option<&str>, fault: Option<&str>) -> NodeProcess {
    let mut args = vec!["--helper"];
    if let Some(f) = fault {
        args.extend(["--helper-fault", f]);
    }
    spawn_node(&model(), &args, bootstrap, "helping")
}

/// Owner arguments: exact accumulation (the helpers' products are exact),
/// `--private 2 --spares 1`, trusting `trusted` (all helpers share 127.0.0.1,
/// so at most one untrusted helper is used).
fn private_args<'a>(args: &[&'a str], bootstrap: &'a str, trusted: &[&'a str]) -> Vec<&'a str> {
    let mut a = args.to_vec();
    a.extend([
        "--exact",
        "--private",
        "2",
        "--spares",
        "1",
        "--bootstrap",
        bootstrap,
        "--helper-timeout",
        "5",
        "--find-timeout",
        "5",
    ]);
    for t in trusted {
        a.extend(["--trust", t]);
    }
    a
}

#[test]
fn three_helper_processes_give_the_tokens_of_local_exact_generation() {
    let m = model();
    let a = helper(None, None);
    let b = helper(Some(&a.addr), None);
    let c = helper(Some(&a.addr), None);
    let ids = [a.peer_id.as_str(), b.peer_id.as_str(), c.peer_id.as_str()];
    for prompt in PROMPTS {
        let mut args = generate_args(prompt, "32");
        args.push("--exact");
        let local = run_json(&args, &m);
        let private = run_json(
            &private_args(&generate_args(prompt, "32"), &a.addr, &ids),
            &m,
        );
        assert_eq!(private["token_ids"], local["token_ids"], "{prompt}");
        assert_eq!(private["checks_failed"], 0);
        assert_eq!(private["helpers_dropped"], serde_json::json!([]));
        let helpers: Vec<&str> = private["helpers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h.as_str().unwrap())
            .collect();
        assert_eq!(helpers.len(), 3);
        assert!(helpers.iter().all(|h| ids.contains(h)), "{helpers:?}");
        assert_eq!(private["round_trips_per_token"], 4.0 * 30.0 + 1.0);
        let ms = &private["ms_per_token"];
        for part in ["owner", "network_wait", "helper_compute"] {
            assert!(ms[part].as_f64().unwrap() > 0.0, "{part}: {ms}");
        }
    }
}

#[test]
fn kill_9_of_a_helper_mid_generation_keeps_the_tokens() {
    let m = model();
    let a = helper(None, None);
    let mut victim = Some(helper(Some(&a.addr), None));
    let spare = helper(Some(&a.addr), None);
    let victim_id = victim.as_ref().unwrap().peer_id.clone();
    let mut args = generate_args(PROMPTS[1], "32");
    args.push("--exact");
    let local = run_json(&args, &m);
    // a and the victim are trusted, so they hold the shares; the spare is the
    // one untrusted helper on 127.0.0.0/24.
    let mut owner = private_args(
        &generate_args(PROMPTS[1], "32"),
        &a.addr,
        &[&a.peer_id, &victim_id],
    );
    owner.push("--events");
    let (ok, stdout, stderr) = generate_watching(&owner, |v: &Value| {
        if v["event"] == "piece" && v["index"] == 10 {
            // kill -9, mid-generation.
            drop(victim.take());
        }
    });
    assert!(ok, "generate failed: {stderr:?}");
    assert!(victim.is_none(), "the victim was killed at piece 10");
    let v: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["token_ids"], local["token_ids"]);
    let dropped = v["helpers_dropped"].as_array().unwrap();
    assert_eq!(dropped.len(), 1, "{stderr:?}");
    assert_eq!(dropped[0]["peer_id"], victim_id.as_str());
    let active: Vec<&str> = v["active_helpers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| v["helpers"][i.as_u64().unwrap() as usize].as_str().unwrap())
        .collect();
    assert!(active.contains(&spare.peer_id.as_str()), "{active:?}");
}

#[test]
fn a_helper_that_lies_replays_or_stalls_is_replaced_with_identical_tokens() {
    let m = model();
    let mut args = generate_args(PROMPTS[0], "12");
    args.push("--exact");
    let local = run_json(&args, &m);
    for fault in ["flip-bit", "stale-envelope", "stall"] {
        let bad = helper(None, Some(fault));
        let good = helper(Some(&bad.addr), None);
        let _spare = helper(Some(&bad.addr), None);
        let owner = private_args(
            &generate_args(PROMPTS[0], "12"),
            &bad.addr,
            &[&bad.peer_id, &good.peer_id],
        );
        let v = run_json(&owner, &m);
        assert_eq!(v["token_ids"], local["token_ids"], "{fault}");
        let dropped = v["helpers_dropped"].as_array().unwrap();
        assert_eq!(dropped.len(), 1, "{fault}: {v}");
        assert_eq!(dropped[0]["peer_id"], bad.peer_id.as_str(), "{fault}");
    }
}

#[test]
fn every_helper_gone_is_an_error_within_the_deadline() {
    let a = helper(None, None);
    let b = helper(Some(&a.addr), None);
    let ids = [a.peer_id.clone(), b.peer_id.clone()];
    let addr = a.addr.clone();
    let mut helpers = vec![a, b];
    let mut args = generate_args(PROMPTS[0], "64");
    args.extend([
        "--exact",
        "--private",
        "2",
        "--bootstrap",
        &addr,
        "--helper-timeout",
        "3",
        "--find-timeout",
        "3",
        "--events",
        "--trust",
        &ids[0],
        "--trust",
        &ids[1],
    ]);
    let started = Instant::now();
    let (ok, _, stderr) = generate_watching(&args, |v| {
        if v["event"] == "piece" && v["index"] == 5 {
            helpers.clear();
        }
    });
    assert!(!ok, "generation went on without helpers");
    assert!(started.elapsed() < Duration::from_secs(90));
    let last = stderr.last().cloned().unwrap_or_default();
    assert!(
        last.contains("mesh: error:") && last.contains("helper"),
        "expected a helper error, found {stderr:?}"
    );
}
