//! Fuzz target: `Gguf::parse` on arbitrary bytes must return, never panic,
//! and whatever it accepts must be safe to use.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run gguf_parse`.
//! On stable, the built binary replays a corpus: `gguf_parse corpus/gguf_parse -runs=0`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::gguf::{Array, Gguf};

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::parse(data) else {
        return;
    };
    assert!(g.alignment.is_power_of_two());
    assert_eq!(g.data_offset % g.alignment, 0);
    for (key, value) in &g.metadata {
        let v = g.get(key);
        assert!(v.is_some());
        let _ = value.to_string();
        let _ = g.value::<&str>(key);
        let _ = g.value::<u32>(key);
        let _ = g.value::<f32>(key);
        let _ = g.value::<bool>(key);
        let _ = g.value::<&[String]>(key);
        let _ = g.value::<&Array>(key);
    }
    let _ = g.architecture();
    for t in &g.tensors {
        let bytes = t
            .data(data)
            .expect("accepted tensor data lies inside the file");
        assert_eq!(bytes.len() as u64, t.size);
        assert_eq!(t.n_elements(), t.rows() * t.cols());
        assert_eq!(t.size, t.ggml_type.row_bytes(t.cols()).unwrap() * t.rows());
        assert!(g.tensor(&t.name).is_some());
        assert!(t.offset >= g.data_offset);
    }
});
