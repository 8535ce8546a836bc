//! The `mesh` command lines that other programs script, run as a user would.

use std::process::Command;

use serde_json::Value;

fn mesh(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args)
        .output()
        .expect("run mesh");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `$MESH_MODEL`, or `default` (fetched into the cache by the CLI itself).
fn model() -> String {
    std::env::var("MESH_MODEL").unwrap_or_else(|_| "default".into())
}

fn json(args: &[&str]) -> Value {
    let (ok, stdout, stderr) = mesh(args);
    assert!(ok, "mesh {args:?} failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn generate_json_has_the_documented_fields() {
    let m = model();
    let v = json(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--threads",
        "1",
        "--format",
        "json",
    ]);
    for key in [
        "text",
        "prompt_ids",
        "token_ids",
        "prompt_ms",
        "generate_ms",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["token_ids"].as_array().unwrap().len(), 6);
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
}

#[test]
fn raw_parses_special_tokens_and_chat_applies_the_template() {
    let m = model();
    let raw = json(&[
        "generate",
        "--model",
        &m,
        "--raw",
        "--prompt",
        "<|im_start|>user\nHi<|im_end|>\n",
        "--max-tokens",
        "1",
        "--temperature",
        "0",
        "--threads",
        "1",
        "--format",
        "json",
    ]);
    let ids: Vec<u64> = raw["prompt_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(ids[0], 1, "<|im_start|> is one special token: {ids:?}");
    let chat = json(&[
        "generate",
        "--model",
        &m,
        "--chat",
        "--prompt",
        "Hi",
        "--max-tokens",
        "1",
        "--temperature",
        "0",
        "--threads",
        "1",
        "--format",
        "json",
    ]);
    let n_chat = chat["prompt_ids"].as_array().unwrap().len();
    assert!(n_chat > 5, "the chat template wraps the prompt: {chat}");
}

/// `mesh generate` in private mode with 2 helpers, greedy, 3 tokens, JSON.
fn private_generate<'a>(model: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "generate",
        "--model",
        model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "3",
        "--temperature",
        "0",
        "--threads",
        "1",
        "--private",
        "2",
        "--format",
        "json",
    ];
    args.extend_from_slice(extra);
    args
}

#[test]
fn private_generation_reports_traffic_and_checks() {
    let m = model();
    let v = json(&private_generate(&m, &[]));
    assert_eq!(v["checks_failed"], 0, "{v}");
    let bytes = v["bytes_per_token"].as_u64().unwrap();
    // 30 layers x ~110 KB + the lm_head's shares and replies.
    assert!(
        (3_000_000..6_000_000).contains(&bytes),
        "bytes_per_token {bytes}"
    );
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["helpers_dropped"], serde_json::json!([]), "{v}");
    assert!(v["owner_ms_per_token"].as_f64().unwrap() > 0.0, "{v}");
}

#[test]
fn a_lying_helper_is_replaced_by_a_spare() {
    let m = model();
    let honest = json(&private_generate(&m, &[]));
    let v = json(&private_generate(
        &m,
        &["--spares", "1", "--inject-fault", "0:flip-bit"],
    ));
    assert_eq!(v["token_ids"], honest["token_ids"], "{v}");
    assert_eq!(v["checks_failed"], 1, "{v}");
    assert_eq!(v["retries"], 1, "{v}");
    assert_eq!(v["active_helpers"], serde_json::json!([2, 1]), "{v}");
    let dropped = v["helpers_dropped"].as_array().unwrap();
    assert_eq!(dropped.len(), 1, "{v}");
    assert_eq!(dropped[0]["helper"], 0, "{v}");
    assert!(
        dropped[0]["reason"]
            .as_str()
            .unwrap()
            .contains("wrong result"),
        "{v}"
    );
    // Without a spare the same fault is a clear error and no text.
    let (ok, stdout, stderr) = mesh(&private_generate(&m, &["--inject-fault", "1:fail"]));
    assert!(!ok && stdout.is_empty(), "{stdout}");
    assert!(
        stderr.contains("helper 1 gave no usable answer"),
        "{stderr}"
    );
    let (ok, _, stderr) = mesh(&private_generate(&m, &["--inject-fault", "0:sneeze"]));
    assert!(!ok && stderr.contains("fault \"sneeze\""), "{stderr}");
}

#[test]
fn perplexity_and_bench_print_json() {
    let m = model();
    let dir = std::env::temp_dir().join(format!("mesh-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("text.txt");
    std::fs::write(
        &file,
        "the quick brown fox jumps over the lazy dog. ".repeat(40),
    )
    .unwrap();
    let v = json(&[
        "perplexity",
        "--model",
        &m,
        "--file",
        file.to_str().unwrap(),
        "--ctx",
        "64",
        "--threads",
        "1",
        "--format",
        "json",
    ]);
    let (ppl, tokens) = (v["ppl"].as_f64().unwrap(), v["tokens"].as_u64().unwrap());
    assert!(ppl.is_finite() && ppl > 1.0, "{v}");
    assert_eq!(tokens % 63, 0, "63 scored tokens per 64-token window: {v}");
    let b = json(&[
        "bench",
        "--model",
        &m,
        "--threads",
        "1",
        "--prompt-tokens",
        "16",
        "--gen-tokens",
        "4",
        "--runs",
        "1",
        "--format",
        "json",
    ]);
    assert!(
        b["pp_tps"].as_f64().unwrap() > 0.0 && b["tg_tps"].as_f64().unwrap() > 0.0,
        "{b}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_a_clear_error_with_a_failing_exit_code() {
    let (ok, _, stderr) = mesh(&[
        "generate",
        "--model",
        "/nonexistent/model.gguf",
        "--prompt",
        "x",
    ]);
    assert!(!ok);
    assert!(stderr.contains("/nonexistent/model.gguf"), "{stderr}");
    let m = model();
    let (ok, _, stderr) = mesh(&[
        "generate",
        "--model",
        &m,
        "--prompt",
        "hello",
        "--max-tokens",
        "4",
        "--ctx",
        "2",
    ]);
    assert!(!ok);
    assert!(stderr.contains("context overflow"), "{stderr}");
    let (ok, _, stderr) = mesh(&["generate", "--model", &m, "--prompt", "x", "--private", "1"]);
    assert!(!ok, "one helper would see everything: {stderr}");
}

#[test]
fn sim_converges_and_is_deterministic_per_seed() {
    let args = ["sim", "--nodes", "40", "--churn", "6", "--seed", "9"];
    let mut a = json(&args);
    let mut b = json(&args);
    assert_eq!(a["converged"], true, "{a}");
    assert_eq!(a["ranges"], 8);
    assert!(a["stats"]["messages_delivered"].as_u64().unwrap() > 0);
    // Same seed, same simulated run (wall time aside).
    a.as_object_mut().unwrap().remove("wall_time_s");
    b.as_object_mut().unwrap().remove("wall_time_s");
    assert_eq!(a, b);
    let (ok, _, err) = mesh(&["sim", "--nodes", "1"]);
    assert!(!ok && err.contains("--nodes >= 2"), "{err}");
}

#[test]
fn node_and_find_report_bad_arguments() {
    let (ok, _, err) = mesh(&["find", "--model", "default"]);
    assert!(!ok && err.contains("--bootstrap"), "{err}");
    let (ok, _, err) = mesh(&["node", "--serve", "default:9-3"]);
    assert!(!ok && err.contains("expected a < b"), "{err}");
    let (ok, _, err) = mesh(&[
        "find",
        "--bootstrap",
        "/ip4/127.0.0.1/tcp/1",
        "--model",
        &"ab".repeat(32),
        "--timeout",
        "3",
    ]);
    assert!(!ok && err.contains("dial"), "{err}");
}

/// Sizes that used to abort the process (or hang it) are errors with a failing
/// exit code and a message; none of them may panic.
#[test]
fn hostile_sizes_are_clear_errors() {
    let m = model();
    let no_panic = |stderr: &str| assert!(!stderr.contains("panicked"), "{stderr}");
    // `mesh generate` on a one-character prompt with the given options.
    let generate = |extra: &[&str]| {
        let mut args = vec!["generate", "--model", &m, "--prompt", "x"];
        args.extend_from_slice(extra);
        mesh(&args)
    };
    for ctx in ["1099511627776", "18446744073709551615", "1000000"] {
        let (ok, _, stderr) = generate(&["--ctx", ctx, "--threads", "1"]);
        assert!(
            !ok && stderr.contains("trained for at most"),
            "--ctx {ctx}: {stderr}"
        );
        no_panic(&stderr);
    }
    let (ok, _, stderr) = generate(&["--threads", "100000"]);
    assert!(!ok && stderr.contains("threads"), "{stderr}");
    no_panic(&stderr);
    // A huge --max-tokens caps the default context at the trained one and
    // stops at the end of the answer. (The demo's prompt: greedy answers it in
    // one sentence on every CPU class and in exact mode; without "Answer in
    // one sentence." the AVX-512 kernels run on in French to the context end.)
    let (ok, stdout, stderr) = mesh(&[
        "generate",
        "--model",
        &m,
        "--chat",
        "--prompt",
        "What is the capital of France? Answer in one sentence.",
        "--max-tokens",
        "18446744073709551615",
        "--temperature",
        "0",
        "--threads",
        "1",
    ]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}");
    let (ok, _, stderr) = mesh(&[
        "find",
        "--bootstrap",
        "/ip4/127.0.0.1/tcp/1",
        "--model",
        "default",
        "--timeout",
        "1e20",
    ]);
    assert!(!ok && stderr.contains("--timeout"), "{stderr}");
    no_panic(&stderr);
}

/// `--prompt-file PATH` and `--prompt-file -` (standard input) give the same
/// tokens as `--prompt`.
#[test]
fn prompt_file_and_stdin() {
    use std::io::Write;
    let m = model();
    let text = "The capital of France is";
    let args = |how: &[&'static str]| -> Vec<String> {
        let mut v: Vec<String> = ["generate", "--model", &m, "--max-tokens", "4"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(how.iter().map(|s| s.to_string()));
        v.extend(["--temperature", "0", "--threads", "1", "--format", "json"].map(String::from));
        v
    };
    let direct = {
        let a = args(&["--prompt", text]);
        json(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let path = std::env::temp_dir().join(format!("mesh-prompt-{}.txt", std::process::id()));
    std::fs::write(&path, text).unwrap();
    let p = path.to_str().unwrap().to_string();
    let from_file = {
        let mut a = args(&[]);
        a.extend(["--prompt-file".to_string(), p]);
        json(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    assert_eq!(direct["token_ids"], from_file["token_ids"]);
    assert_eq!(direct["prompt_ids"], from_file["prompt_ids"]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh"))
        .args(args(&["--prompt-file", "-"]))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let from_stdin: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(direct["token_ids"], from_stdin["token_ids"]);
    std::fs::write(&path, b"\xff\xfe not utf-8").unwrap();
    let mut a = args(&[]);
    a.extend([
        "--prompt-file".to_string(),
        path.to_str().unwrap().to_string(),
    ]);
    let (ok, _, stderr) = mesh(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok && stderr.contains("UTF-8"), "{stderr}");
    let _ = std::fs::remove_file(&path);
}
