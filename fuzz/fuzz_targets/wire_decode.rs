//! Fuzz target: the network wire codec on arbitrary bytes. Decoding a
//! request, a response, a describe reply or announce gossip must return a
//! value or a typed error, never panic; whatever decodes must re-encode and
//! decode to the same value; and the frame reader must never allocate more
//! than its limit (an oversized length is drained or refused, not trusted).
//!
//! With cargo-fuzz (nightly): `cargo fuzz run wire_decode`; on stable: `fuzz/run.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::network::wire::{self, Frame};
use mesh_core::network::PeerId;

const LIMIT: usize = 1 << 16;

fuzz_target!(|data: &[u8]| {
    let bytes = bytes::Bytes::copy_from_slice(data);
    if let Ok(r) = wire::decode_request(bytes.clone(), LIMIT) {
        let again = wire::encode_request(&r, LIMIT).expect("a decoded request re-encodes under the same limit");
        assert_eq!(wire::decode_request(again, LIMIT).expect("round trip"), r);
    }
    let peer = PeerId::from_bytes(&[0, 2, 8, 1]).unwrap_or_else(|_| PeerId::random());
    if let Ok(r) = wire::decode_response(bytes.clone(), LIMIT, peer) {
        let again = wire::encode_response(Ok(&r), LIMIT);
        assert_eq!(wire::decode_response(again, LIMIT, peer).expect("round trip"), r);
    }
    if let Ok((anns, addrs)) = wire::decode_describe(data) {
        let again = wire::encode_describe(&anns, &addrs);
        assert_eq!(wire::decode_describe(&again).expect("round trip"), (anns, addrs));
    }
    if let Ok(anns) = wire::decode_announce(data) {
        assert_eq!(wire::decode_announce(&wire::encode_announce(&anns)).expect("round trip"), anns);
    }
    // The same bytes as a stream of frames.
    futures::executor::block_on(async {
        let mut io = futures::io::Cursor::new(data);
        while let Ok(frame) = wire::read_frame(&mut io, 256, "request").await {
            match frame {
                Frame::Body(b) => assert!(b.len() <= 256),
                Frame::Oversized { size } => assert!(size > 256),
            }
        }
    });
});
