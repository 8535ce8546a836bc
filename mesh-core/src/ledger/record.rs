//! Update records: a signed statement "this adapter improves that model".
//!
//! A record names the base model (BLAKE3 of its GGUF file), the adapter
//! (BLAKE3 of the adapter's GGUF file, and its size), the update it builds
//! on (`parent`), its author (a peer id holding an Ed25519 key) and optional
//! evaluation figures. The author signs the encoded body; the record's id is
//! the BLAKE3 hash of what was signed. On the wire (gossip topic
//! [`UPDATE_TOPIC`], and later ledger blocks) it is an [`UpdateEnvelope`]:
//!
//! ```proto
//! syntax = "proto3";
//! package mesh.update.v1;
//! message Metric { string name = 1; double value = 2; }
//! message UpdateBody { bytes base = 1; bytes adapter = 2; uint64 adapter_size = 3;
//!                      bytes parent = 4; bytes author = 5; repeated Metric metrics = 6;
//!                      uint64 created_ms = 7; }
//! message UpdateEnvelope { uint32 version = 1; bytes body = 2; bytes signature = 3; }
//! ```
//!
//! The signature is Ed25519 over `"mesh-llm update v1\0" || body` by the key
//! the author's peer id embeds. [`UpdateRecord::decode`] checks sizes, fields
//! and the signature, and never panics.

use std::fmt;

use bytes::Bytes;
use ed25519_dalek::{Signer, Verifier};
use prost::Message;

use super::LedgerError;
use crate::engine::ModelId;
use crate::network::identity::ed25519_of;
use crate::network::{Identity, PeerId};

/// Version of [`UpdateEnvelope`] this build writes and reads.
pub const UPDATE_VERSION: u32 = 1;

/// Gossip topic on which update records are announced.
pub const UPDATE_TOPIC: &str = "mesh-llm/updates/1";

/// Largest encoded record accepted.
pub const MAX_RECORD_BYTES: usize = 4096;

/// Most evaluation figures in one record.
pub const MAX_METRICS: usize = 16;

/// Longest metric name, in bytes.
pub const MAX_METRIC_NAME: usize = 64;

/// Largest adapter a record may name (1 GiB).
pub const MAX_ADAPTER_BYTES: u64 = 1 << 30;

const DOMAIN: &[u8] = b"mesh-llm update v1\0";

/// An evaluation figure (e.g. `perplexity` on a named text).
#[derive(Clone, PartialEq, Message)]
pub struct MetricMsg {
    /// What was measured.
    #[prost(string, tag = "1")]
    pub name: String,
    /// The value.
    #[prost(double, tag = "2")]
    pub value: f64,
}

/// The signed part of a record.
#[derive(Clone, PartialEq, Message)]
pub struct UpdateBody {
    /// Base model id, 32 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub base: Vec<u8>,
    /// Adapter id (BLAKE3 of the file), 32 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub adapter: Vec<u8>,
    /// Adapter file size in bytes.
    #[prost(uint64, tag = "3")]
    pub adapter_size: u64,
    /// Id of the update this one builds on: empty, or 32 bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub parent: Vec<u8>,
    /// Author's peer id (its multihash bytes).
    #[prost(bytes = "vec", tag = "5")]
    pub author: Vec<u8>,
    /// Evaluation figures.
    #[prost(message, repeated, tag = "6")]
    pub metrics: Vec<MetricMsg>,
    /// When it was signed, milliseconds since the Unix epoch (informational).
    #[prost(uint64, tag = "7")]
    pub created_ms: u64,
}

/// A record on the wire.
#[derive(Clone, PartialEq, Message)]
pub struct UpdateEnvelope {
    /// [`UPDATE_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The encoded [`UpdateBody`], exactly as signed.
    #[prost(bytes = "bytes", tag = "2")]
    pub body: Bytes,
    /// Ed25519 signature, 64 bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub signature: Vec<u8>,
}

/// Id of an update record: BLAKE3 of its signed bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UpdateId(pub [u8; 32]);

impl UpdateId {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        ModelId(self.0).to_hex()
    }
}

impl fmt::Display for UpdateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

impl fmt::Debug for UpdateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "UpdateId({})", self.to_hex())
    }
}

/// What an author states before signing.
#[derive(Clone, Debug, PartialEq)]
pub struct UpdateDraft {
    /// The base model.
    pub base: ModelId,
    /// The adapter (BLAKE3 of its file).
    pub adapter: ModelId,
    /// The adapter file's size.
    pub adapter_size: u64,
    /// The update it builds on.
    pub parent: Option<UpdateId>,
    /// Evaluation figures: at most [`MAX_METRICS`], finite values, names of at
    /// most [`MAX_METRIC_NAME`] bytes.
    pub metrics: Vec<(String, f64)>,
}

/// A signed, verified update record.
#[derive(Clone, PartialEq)]
pub struct UpdateRecord {
    /// The base model.
    pub base: ModelId,
    /// The adapter (BLAKE3 of its file).
    pub adapter: ModelId,
    /// The adapter file's size.
    pub adapter_size: u64,
    /// The update it builds on.
    pub parent: Option<UpdateId>,
    /// Who signed it.
    pub author: PeerId,
    /// Evaluation figures.
    pub metrics: Vec<(String, f64)>,
    /// When it was signed (ms since the epoch, as the author states it).
    pub created_ms: u64,
    id: UpdateId,
    body: Bytes,
    signature: [u8; 64],
}

impl fmt::Debug for UpdateRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpdateRecord")
            .field("id", &self.id)
            .field("base", &self.base)
            .field("adapter", &self.adapter)
            .field("adapter_size", &self.adapter_size)
            .field("parent", &self.parent)
            .field("author", &self.author)
            .field("metrics", &self.metrics)
            .finish()
    }
}

fn signed_bytes(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(DOMAIN.len() + body.len());
    m.extend_from_slice(DOMAIN);
    m.extend_from_slice(body);
    m
}

fn check_metrics(metrics: &[(String, f64)]) -> Result<(), LedgerError> {
    if metrics.len() > MAX_METRICS {
        return Err(LedgerError::Malformed(format!(
            "{} metrics, at most {MAX_METRICS}",
            metrics.len()
        )));
    }
    for (name, value) in metrics {
        if name.is_empty() || name.len() > MAX_METRIC_NAME {
            return Err(LedgerError::Malformed(format!(
                "metric name of {} bytes: expected 1 to {MAX_METRIC_NAME}",
                name.len()
            )));
        }
        if !value.is_finite() {
            return Err(LedgerError::Malformed(format!(
                "metric {name:?} is not finite"
            )));
        }
    }
    Ok(())
}

fn id32(what: &str, bytes: &[u8]) -> Result<[u8; 32], LedgerError> {
    bytes.try_into().map_err(|_| {
        LedgerError::Malformed(format!("{what}: expected 32 bytes, found {}", bytes.len()))
    })
}

impl UpdateRecord {
    /// Signs `draft` as `identity` (the author).
    pub fn sign(identity: &Identity, draft: UpdateDraft) -> Result<UpdateRecord, LedgerError> {
        check_metrics(&draft.metrics)?;
        if draft.adapter_size == 0 || draft.adapter_size > MAX_ADAPTER_BYTES {
            return Err(LedgerError::Malformed(format!(
                "adapter size {}: expected 1 to {MAX_ADAPTER_BYTES} bytes",
                draft.adapter_size
            )));
        }
        let created_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let body = UpdateBody {
            base: draft.base.0.to_vec(),
            adapter: draft.adapter.0.to_vec(),
            adapter_size: draft.adapter_size,
            parent: draft.parent.map(|p| p.0.to_vec()).unwrap_or_default(),
            author: identity.peer_id().to_bytes(),
            metrics: draft
                .metrics
                .iter()
                .map(|(name, value)| MetricMsg {
                    name: name.clone(),
                    value: *value,
                })
                .collect(),
            created_ms,
        }
        .encode_to_vec();
        let signature = identity.signing_key().sign(&signed_bytes(&body)).to_bytes();
        let envelope = UpdateEnvelope {
            version: UPDATE_VERSION,
            body: Bytes::from(body),
            signature: signature.to_vec(),
        };
        // The author's own record goes through the same checks as anyone's.
        UpdateRecord::decode(&envelope.encode_to_vec())
    }

    /// Decodes an [`UpdateEnvelope`] and verifies it: sizes, fields, and the
    /// author's signature. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<UpdateRecord, LedgerError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(LedgerError::TooLarge {
                what: "update record",
                size: bytes.len() as u64,
                limit: MAX_RECORD_BYTES as u64,
            });
        }
        let env = UpdateEnvelope::decode(bytes)
            .map_err(|e| LedgerError::Malformed(format!("update envelope: {e}")))?;
        if env.version != UPDATE_VERSION {
            return Err(LedgerError::UnsupportedVersion(env.version));
        }
        let body = UpdateBody::decode(env.body.as_ref())
            .map_err(|e| LedgerError::Malformed(format!("update body: {e}")))?;
        let base = ModelId(id32("base model", &body.base)?);
        let adapter = ModelId(id32("adapter", &body.adapter)?);
        let parent = match body.parent.len() {
            0 => None,
            _ => Some(UpdateId(id32("parent", &body.parent)?)),
        };
        if body.adapter_size == 0 || body.adapter_size > MAX_ADAPTER_BYTES {
            return Err(LedgerError::Malformed(format!(
                "adapter size {}: expected 1 to {MAX_ADAPTER_BYTES} bytes",
                body.adapter_size
            )));
        }
        let metrics: Vec<(String, f64)> = body
            .metrics
            .into_iter()
            .map(|m| (m.name, m.value))
            .collect();
        check_metrics(&metrics)?;
        let author = PeerId::from_bytes(&body.author)
            .map_err(|e| LedgerError::Malformed(format!("author: {e}")))?;
        let key = ed25519_of(&author).map_err(|e| LedgerError::Malformed(e.to_string()))?;
        let signature: [u8; 64] = env.signature.as_slice().try_into().map_err(|_| {
            LedgerError::Malformed(format!(
                "signature: expected 64 bytes, found {}",
                env.signature.len()
            ))
        })?;
        let signed = signed_bytes(&env.body);
        key.verify(&signed, &ed25519_dalek::Signature::from_bytes(&signature))
            .map_err(|_| LedgerError::BadSignature { author })?;
        Ok(UpdateRecord {
            base,
            adapter,
            adapter_size: body.adapter_size,
            parent,
            author,
            metrics,
            created_ms: body.created_ms,
            id: UpdateId(*blake3::hash(&signed).as_bytes()),
            body: env.body,
            signature,
        })
    }

    /// The record as sent: an encoded [`UpdateEnvelope`].
    pub fn encode(&self) -> Vec<u8> {
        UpdateEnvelope {
            version: UPDATE_VERSION,
            body: self.body.clone(),
            signature: self.signature.to_vec(),
        }
        .encode_to_vec()
    }

    /// The record's id.
    pub fn id(&self) -> UpdateId {
        self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn draft() -> UpdateDraft {
        UpdateDraft {
            base: ModelId([1; 32]),
            adapter: ModelId([2; 32]),
            adapter_size: 12345,
            parent: Some(UpdateId([3; 32])),
            metrics: vec![("perplexity".into(), 12.5)],
        }
    }

    #[test]
    fn signed_records_round_trip_and_name_their_author() {
        let me = Identity::from_seed([9; 32]);
        let r = UpdateRecord::sign(&me, draft()).unwrap();
        assert_eq!(r.author, me.peer_id());
        let back = UpdateRecord::decode(&r.encode()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.id(), r.id());
        assert_eq!(back.parent, Some(UpdateId([3; 32])));
        // Another draft, another id.
        let mut d = draft();
        d.adapter_size += 1;
        assert_ne!(UpdateRecord::sign(&me, d).unwrap().id(), r.id());
    }

    #[test]
    fn tampered_and_forged_records_are_refused() {
        let me = Identity::from_seed([9; 32]);
        let r = UpdateRecord::sign(&me, draft()).unwrap();
        let env = UpdateEnvelope::decode(r.encode().as_slice()).unwrap();
        // Any change of the body breaks the signature.
        let mut body = UpdateBody::decode(env.body.as_ref()).unwrap();
        body.adapter_size += 1;
        let tampered = UpdateEnvelope {
            body: Bytes::from(body.encode_to_vec()),
            ..env.clone()
        };
        assert!(matches!(
            UpdateRecord::decode(&tampered.encode_to_vec()),
            Err(LedgerError::BadSignature { .. })
        ));
        // Claiming another author: the signature is not theirs.
        let mut body = UpdateBody::decode(env.body.as_ref()).unwrap();
        body.author = Identity::from_seed([8; 32]).peer_id().to_bytes();
        let forged = UpdateEnvelope {
            body: Bytes::from(body.encode_to_vec()),
            ..env.clone()
        };
        match UpdateRecord::decode(&forged.encode_to_vec()) {
            Err(LedgerError::BadSignature { author }) => {
                assert_eq!(author, Identity::from_seed([8; 32]).peer_id())
            }
            other => panic!("{other:?}"),
        }
        let wrong_version = UpdateEnvelope {
            version: 2,
            ..env.clone()
        };
        assert!(matches!(
            UpdateRecord::decode(&wrong_version.encode_to_vec()),
            Err(LedgerError::UnsupportedVersion(2))
        ));
        let short_sig = UpdateEnvelope {
            signature: vec![0; 63],
            ..env
        };
        assert!(matches!(
            UpdateRecord::decode(&short_sig.encode_to_vec()),
            Err(LedgerError::Malformed(_))
        ));
        assert!(matches!(
            UpdateRecord::decode(&vec![0; MAX_RECORD_BYTES + 1]),
            Err(LedgerError::TooLarge { .. })
        ));
    }

    #[test]
    fn bad_drafts_are_refused_before_signing() {
        let me = Identity::from_seed([9; 32]);
        for bad in [
            UpdateDraft {
                adapter_size: 0,
                ..draft()
            },
            UpdateDraft {
                adapter_size: MAX_ADAPTER_BYTES + 1,
                ..draft()
            },
            UpdateDraft {
                metrics: vec![("x".into(), f64::NAN)],
                ..draft()
            },
            UpdateDraft {
                metrics: vec![(String::new(), 1.0)],
                ..draft()
            },
            UpdateDraft {
                metrics: vec![("x".into(), 1.0); MAX_METRICS + 1],
                ..draft()
            },
        ] {
            assert!(matches!(
                UpdateRecord::sign(&me, bad),
                Err(LedgerError::Malformed(_))
            ));
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = UpdateRecord::decode(&bytes);
        }

        #[test]
        fn flipping_any_bit_of_a_record_is_caught(bit in 0usize..4000) {
            let me = Identity::from_seed([5; 32]);
            let r = UpdateRecord::sign(&me, draft()).unwrap();
            let mut bytes = r.encode();
            let bit = bit % (bytes.len() * 8);
            bytes[bit / 8] ^= 1 << (bit % 8);
            // Either refused, or (a bit in a field the decoder skips, e.g. an
            // unknown tag's value) the very same record.
            if let Ok(back) = UpdateRecord::decode(&bytes) {
                prop_assert_eq!(back, r);
            }
        }
    }
}
