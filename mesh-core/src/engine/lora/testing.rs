//! Adapter checks against a fixed small llama-shaped model, and adapter
//! GGUF bytes, for tests, fuzz targets and seeds: not a stable API.

use super::*;

/// The small model [`check`] validates against: 2 layers, width 64, 4
/// heads (2 KV heads), FFN 128, vocabulary 256, untied output.
pub fn small_model() -> ModelInfo {
    ModelInfo {
        architecture: "llama".into(),
        name: None,
        id: ModelId([7; 32]),
        file_size: 0,
        n_layers: 2,
        n_embd: 64,
        n_head: 4,
        n_head_kv: 2,
        head_dim: 16,
        n_ff: 128,
        n_vocab: 256,
        n_ctx_train: 128,
        rms_eps: 1e-5,
        rope_freq_base: 10000.0,
        rope_freq_scale: 1.0,
        rope_kind: super::super::RopeKind::Normal,
        tied_output: false,
        file_type: GgmlType::F32,
    }
}

/// GGUF bytes of a rank-`rank` F32 adapter for `info` on `targets` (layer,
/// projection; [`Projection::Output`] for an untied output), its values
/// uniform in `±amp` from `seed`: for tests, benchmarks and demos.
pub fn random_adapter(
    info: &ModelInfo,
    targets: &[(usize, Projection)],
    rank: u64,
    alpha: f32,
    amp: f32,
    seed: u64,
) -> Vec<u8> {
    let mut state = seed;
    let mut next = move || {
        // splitmix64
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * amp
    };
    let mut tensors = Vec::new();
    for &(layer, p) in targets {
        let (cols, rows) = projection_shape(info, p);
        let (cols, rows) = (cols as u64, rows as u64);
        let base = base_tensor_name(layer, p);
        let a: Vec<f32> = (0..cols * rank).map(|_| next()).collect();
        let b: Vec<f32> = (0..rank * rows).map(|_| next()).collect();
        tensors.push((format!("{base}.lora_a"), [cols, rank], a));
        tensors.push((format!("{base}.lora_b"), [rank, rows], b));
    }
    adapter_bytes(&info.architecture, alpha, &tensors)
}

/// Loads `bytes` as an adapter of [`small_model`]; on success checks that
/// every pair has the shapes the model needs.
pub fn check(bytes: &[u8]) -> Result<LoraAdapter> {
    let info = small_model();
    let adapter = LoraAdapter::from_bytes(bytes, &info)?;
    for (&(_, p), pair) in &adapter.pairs {
        let (cols, rows) = projection_shape(&info, p);
        assert_eq!(pair.a.ne()[0] as usize, cols);
        assert_eq!(pair.b.ne()[1] as usize, rows);
        assert_eq!(pair.a.ne()[1] as usize, pair.rank);
        assert_eq!(pair.b.ne()[0] as usize, pair.rank);
    }
    Ok(adapter)
}
