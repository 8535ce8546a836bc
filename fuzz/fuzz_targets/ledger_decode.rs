//! Fuzz target: the ledger's decoders on arbitrary bytes. The first byte
//! picks the decoder: consensus messages (`Decoded::decode`: votes,
//! proposals with whole blocks, status), blocks (`Block::decode`, records'
//! signatures and the active-adapter rule), commit certificates
//! (`Certificate::decode`, then `verify` against a fixed genesis), genesis
//! files (`Genesis::from_json`), stake transfers (`StakeTransfer::decode`,
//! then `Stakes::apply` to the fixed genesis). Each returns a value or a typed error and
//! never panics; what decodes re-encodes to bytes that decode the same.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run ledger_decode`; on stable: `fuzz/run.sh`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_core::ledger::chain::{Block, Certificate, Genesis, GenesisValidator};
use mesh_core::ledger::consensus::Decoded;
use mesh_core::ledger::{StakeTransfer, Stakes};
use mesh_core::network::Identity;

fn genesis() -> &'static Genesis {
    static G: OnceLock<Genesis> = OnceLock::new();
    G.get_or_init(|| {
        let validators = (1..=4u8)
            .map(|i| GenesisValidator {
                peer_id: Identity::from_seed([i; 32]).peer_id(),
                power: u64::from(i),
            })
            .collect();
        Genesis::new("fuzz", validators).expect("genesis")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 5 {
        0 => {
            let _ = Decoded::decode(rest);
        }
        1 => {
            if let Ok(block) = Block::decode(rest) {
                let again = Block::decode(block.encoded()).expect("re-decoded block");
                assert_eq!(again.hash(), block.hash());
                assert_eq!(again.updates.len(), block.updates.len());
            }
        }
        2 => {
            if let Ok(cert) = Certificate::decode(rest) {
                let again = Certificate::decode(&cert.encode()).expect("re-encoded certificate");
                assert_eq!(again, cert);
                let _ = cert.verify(&Stakes::genesis(genesis()));
            }
        }
        3 => {
            if let Ok(tx) = StakeTransfer::decode(rest) {
                let again = StakeTransfer::decode(tx.encoded()).expect("re-decoded transfer");
                assert_eq!(again, tx);
                let mut stakes = Stakes::genesis(genesis());
                let before = stakes.clone();
                if stakes.apply(&tx).is_err() {
                    assert_eq!(stakes, before, "a refused transfer changed the stakes");
                } else {
                    assert_eq!(stakes.total_power(), before.total_power());
                }
            }
        }
        _ => {
            if let Ok(text) = std::str::from_utf8(rest) {
                if let Ok(g) = Genesis::from_json(text) {
                    assert_eq!(Genesis::from_json(&g.to_json()).expect("re-read genesis"), g);
                }
            }
        }
    }
});
