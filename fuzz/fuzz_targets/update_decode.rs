//! Fuzz target: model-sync decoders on arbitrary bytes. The first byte picks
//! the decoder: even, an update record (`UpdateRecord::decode`: envelope,
//! body, fields and signature); odd, an adapter chunk request answered from
//! a small store. Decoding must return a value or a typed error, never panic;
//! a record that decodes re-encodes to bytes that decode to the same record,
//! and a chunk answer never carries more than it may.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run update_decode`; on stable: `fuzz/run.sh`.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_core::ledger::transfer::{answer, Offered, MAX_CHUNK};
use mesh_core::ledger::{AdapterStore, UpdateRecord};

fn store() -> &'static Offered {
    static STORE: OnceLock<Offered> = OnceLock::new();
    STORE.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mesh-fuzz-store-{}", std::process::id()));
        let store = AdapterStore::open(dir).expect("store");
        store.put(&[7u8; 3000]).expect("put");
        Offered::from(store)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(record) = UpdateRecord::decode(rest) {
            let again = UpdateRecord::decode(&record.encode()).expect("re-encoded record");
            assert_eq!(again, record);
        }
    } else {
        let (reply, bytes) = answer(store(), rest);
        assert!(bytes.len() <= MAX_CHUNK as usize);
        assert!(reply.error != 0 || bytes.len() as u64 <= reply.total);
    }
});
