//! Fuzz target: the private-mode helper protocol (`mesh/helper/1`) decoders
//! on arbitrary bytes: what a helper receives (request `meta`) and what an
//! owner receives (reply `meta`). Decoding must return a message or a typed
//! refusal, never panic; a decoded request re-encodes to a request that
//! decodes to the same message.
//!
//! With cargo-fuzz (nightly): `cargo fuzz run helper_decode`; on stable: `fuzz/run.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::delegate::protocol::{decode_helper_reply, decode_helper_request, encode_request};

fuzz_target!(|data: &[u8]| {
    if let Ok(call) = decode_helper_request(data) {
        let again = decode_helper_request(&encode_request(&call)).expect("re-encoded request decodes");
        assert_eq!(again, call);
    }
    let _ = decode_helper_reply(data, "fuzz");
});
