//! Fuzz target: the payloads inside opened delegation envelopes. A helper
//! parses the owner's request (`decode_request`: token count, then a seed or a
//! full share), the owner parses a helper's reply (`decode_reply`). Both must
//! return a value of exactly the announced size or a typed error, never panic,
//! and never allocate before the size check.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run delegate_payloads`; on stable: `fuzz/run.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::delegate::private::{decode_reply, decode_request};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, rest)) = data.split_first() else {
        return;
    };
    let Some((c, payload)) = rest.split_at_checked(2) else {
        return;
    };
    let cols = usize::from(u16::from_le_bytes([c[0], c[1]]));
    if let Ok(share) = decode_request(kind, payload, cols) {
        let n = u32::from_le_bytes(payload[..4].try_into().unwrap()) as usize;
        assert_eq!(share.len(), n * cols);
    }
    let words = cols;
    if let Ok(reply) = decode_reply(payload, words) {
        assert_eq!(reply.len(), words);
        assert_eq!(payload.len(), words * 8);
    }
});
