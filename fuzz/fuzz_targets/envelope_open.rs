//! Fuzz target: `OpenContext::open` on arbitrary bytes (with a fixed key pair)
//! must return an error, never panic, and never open anything: nobody without
//! the key can forge an envelope.
//!
//! The input is one envelope, then the same bytes cut into several envelopes
//! (each prefixed by a `u16` little-endian length) fed to one context, so the
//! replay window sees many sequence numbers.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run envelope_open`.
//! On stable, the built binary replays a corpus: `envelope_open corpus/envelope_open -runs=0`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::delegate::seal::{Direction, EnvelopeHeader, OpenContext, SecretKey};

fn header() -> EnvelopeHeader {
    EnvelopeHeader {
        direction: Direction::HelperToOwner,
        kind: 2,
        n: 2,
        helper_index: 1,
        op: 0,
        layer: 3,
        session_id: [7; 16],
        owner_peer: b"owner".to_vec(),
        helper_peer: b"helper".to_vec(),
        model_hash: [1; 32],
        step: 9,
        rows: 4,
        cols: 8,
        attempt: 0,
        request_hash: [2; 32],
    }
}

fuzz_target!(|data: &[u8]| {
    let recipient = SecretKey::derive(&[0x42; 32]);
    let enc = SecretKey::derive(&[0x24; 32]).public_key().to_bytes();
    let header = header();

    let mut whole = OpenContext::new(&recipient, &enc)
        .expect("fixed keys are valid")
        .with_max_payload(1 << 16);
    assert!(whole.open(&header, data).is_err());

    let mut ctx = OpenContext::new(&recipient, &enc)
        .expect("fixed keys are valid")
        .with_max_payload(1 << 16);
    let mut rest = data;
    while let [lo, hi, tail @ ..] = rest {
        let len = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (envelope, next) = tail.split_at(len);
        assert!(ctx.open(&header, envelope).is_err());
        rest = next;
    }
});
