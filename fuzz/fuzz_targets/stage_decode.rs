//! Fuzz target: the pipeline stage request decoder on arbitrary bytes. The
//! first two bytes (little-endian) split the rest into the request's `meta`
//! and `tensor`. Decoding must return a call or a typed refusal, never panic;
//! a decoded forward's input rows are exactly the tensor's last chunk (all of
//! it unless pushed from a stage, which keeps the whole tensor to pass on),
//! and f32 rows re-encode to the same bytes.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run stage_decode`; on stable: `fuzz/run.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::pipeline::protocol::{
    decode_request, encode_rows, DType, StageCall, MAX_BATCH_TOKENS, MAX_PUSH_TOKENS, MAX_ROUTE,
    MAX_SESSION_ADAPTERS,
};

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let split = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    let (meta, tensor) = data[2..].split_at(split);
    match decode_request(meta, tensor) {
        Ok(StageCall::Forward { n_tokens, dtype, rows, push, .. }) => {
            assert!(n_tokens >= 1 && n_tokens <= MAX_BATCH_TOKENS as usize);
            assert_eq!(rows.len() % n_tokens, 0);
            // The input rows are the tensor's last chunk; a push from a stage
            // keeps the whole tensor, one from the client nothing.
            let input = &tensor[tensor.len() - rows.len() * dtype.size()..];
            match &push {
                None => assert_eq!(input.len(), tensor.len()),
                Some(p) => {
                    assert!(n_tokens <= MAX_PUSH_TOKENS as usize);
                    assert!(p.route.len() <= MAX_ROUTE);
                    assert_ne!(p.deliver, 0);
                    match p.origin {
                        Some(_) => assert_eq!(&p.carried[..], tensor),
                        None => {
                            assert!(p.carried.is_empty() && p.compute_us.is_empty());
                            assert_eq!(input.len(), tensor.len());
                        }
                    }
                }
            }
            if dtype == DType::F32 {
                assert_eq!(&encode_rows(&rows, dtype)[..], input);
            }
        }
        Ok(StageCall::Open { layers, n_ctx, adapters, .. }) => {
            assert!(layers.start < layers.end);
            assert!(n_ctx >= 1);
            assert!(adapters.len() <= MAX_SESSION_ADAPTERS);
            assert!(adapters.iter().all(|(_, scale)| scale.is_finite()));
        }
        Ok(_) | Err(_) => {}
    }
});
