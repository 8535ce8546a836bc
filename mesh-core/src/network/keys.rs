//! DHT provider keys, the same for every [`Network`](super::Network)
//! implementation: CIDs, as the libp2p Kademlia specification expects, so any
//! libp2p implementation can ask who provides a model or a layer.
//!
//! A key is a CIDv1 with the `raw` codec (0x55) and a BLAKE3 multihash
//! (code 0x1e, 32-byte digest), in binary form:
//! `0x01 0x55 0x1e 0x20 <digest>` (36 bytes).
//!
//! * The model key's digest is the [`ModelId`] itself (the BLAKE3 of the GGUF
//!   file), so the key is the CID of the model file's bytes: a client that has
//!   the file can compute it with any CID library.
//! * A layer key's digest is the BLAKE3 of `mesh-llm/layer/1` followed by the
//!   model id and the layer index as a big-endian u32.

use crate::model_id::ModelId;

/// CID version 1.
const CID_V1: u8 = 0x01;
/// Multicodec `raw`.
const CODEC_RAW: u8 = 0x55;
/// Multihash code of BLAKE3.
const MULTIHASH_BLAKE3: u8 = 0x1e;
/// Digest length in bytes (fits a one-byte varint).
const DIGEST_LEN: u8 = 32;

/// Domain separator of layer keys (versioned with the key scheme).
const LAYER_DOMAIN: &[u8] = b"mesh-llm/layer/1";

/// Bytes of a provider key.
pub const KEY_LEN: usize = 4 + DIGEST_LEN as usize;

/// Binary CIDv1 (raw codec, BLAKE3 multihash) with the given digest.
pub fn cid_blake3(digest: &[u8; 32]) -> [u8; KEY_LEN] {
    let mut k = [0u8; KEY_LEN];
    k[..4].copy_from_slice(&[CID_V1, CODEC_RAW, MULTIHASH_BLAKE3, DIGEST_LEN]);
    k[4..].copy_from_slice(digest);
    k
}

/// Provider key of a model: the CID of its GGUF file.
pub fn model_key(model: &ModelId) -> [u8; KEY_LEN] {
    cid_blake3(&model.0)
}

/// Provider key of one layer of a model.
pub fn layer_key(model: &ModelId, layer: u32) -> [u8; KEY_LEN] {
    let mut h = blake3::Hasher::new();
    h.update(LAYER_DOMAIN);
    h.update(&model.0);
    h.update(&layer.to_be_bytes());
    cid_blake3(h.finalize().as_bytes())
}

/// The provider keys of an announcement: the model's, then each layer's.
pub fn announcement_keys(a: &super::Announcement) -> Vec<[u8; KEY_LEN]> {
    std::iter::once(model_key(&a.model))
        .chain(a.layers.clone().map(|l| layer_key(&a.model, l)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_key_is_the_cid_of_the_file_bytes() {
        let file = b"GGUF not really a model";
        let id = ModelId(*blake3::hash(file).as_bytes());
        let k = model_key(&id);
        assert_eq!(&k[..4], &[0x01, 0x55, 0x1e, 0x20]);
        assert_eq!(&k[4..], blake3::hash(file).as_bytes());
    }

    #[test]
    fn layer_keys_differ_per_layer_and_model() {
        let (a, b) = (ModelId([1; 32]), ModelId([2; 32]));
        let keys = [
            layer_key(&a, 0),
            layer_key(&a, 1),
            layer_key(&b, 0),
            model_key(&a),
        ];
        for i in 0..keys.len() {
            for j in i + 1..keys.len() {
                assert_ne!(keys[i], keys[j]);
            }
        }
    }
}
