//! DHT provider keys are CIDs (CIDv1, raw codec, BLAKE3 multihash), decoded
//! here with the multiformats reference implementation (`cid` crate), so any
//! libp2p implementation can query who provides a model or a layer.

use mesh_core::engine::ModelId;
use mesh_core::network::keys::{announcement_keys, layer_key, model_key};
use mesh_core::network::p2p;
use mesh_core::network::Announcement;

const RAW: u64 = 0x55;
const BLAKE3: u64 = 0x1e;

#[test]
fn model_key_decodes_as_the_cid_of_the_model_file() {
    let file = b"GGUF\x03\x00\x00\x00 stands in for a model file";
    let id = ModelId(*blake3::hash(file).as_bytes());
    let key = model_key(&id);
    let cid = cid::Cid::try_from(&key[..]).expect("a valid CID");
    assert_eq!(cid.version(), cid::Version::V1);
    assert_eq!(cid.codec(), RAW);
    assert_eq!(cid.hash().code(), BLAKE3);
    assert_eq!(cid.hash().digest(), blake3::hash(file).as_bytes());
    assert_eq!(cid.to_bytes(), key.to_vec(), "canonical encoding");
    // What the libp2p network puts in (and asks) the DHT is exactly these bytes.
    assert_eq!(p2p::model_key(&id).to_vec(), key.to_vec());
    // The text form other clients print and parse (multibase base32, "b...").
    let text = cid.to_string();
    assert!(text.starts_with("bafkr4i"), "{text}");
    assert_eq!(cid::Cid::try_from(text.as_str()).unwrap(), cid);
}

#[test]
fn layer_keys_decode_as_distinct_cids() {
    let id = ModelId([9; 32]);
    let a = Announcement {
        model: id,
        layers: 10..20,
        free_memory: 0,
        tokens_per_sec: 0.0,
    };
    let keys = announcement_keys(&a);
    assert_eq!(keys.len(), 11);
    assert_eq!(keys[0], model_key(&id));
    let mut seen = std::collections::HashSet::new();
    for (i, k) in keys.iter().enumerate().skip(1) {
        let layer = 10 + i as u32 - 1;
        assert_eq!(*k, layer_key(&id, layer));
        assert_eq!(p2p::layer_key(&id, layer).to_vec(), k.to_vec());
        let cid = cid::Cid::try_from(&k[..]).expect("a valid CID");
        assert_eq!((cid.version(), cid.codec()), (cid::Version::V1, RAW));
        assert_eq!(cid.hash().code(), BLAKE3);
        assert_eq!(cid.hash().size(), 32);
        assert!(seen.insert(cid), "layer {layer}: duplicate key");
    }
}
