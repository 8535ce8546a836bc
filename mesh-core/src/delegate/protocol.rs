//! The private-delegation wire protocol: projection codes, the sealed
//! payloads' layout, and the `mesh/helper/1` request/response messages an
//! owner exchanges with a helper on another node (`docs/PRIVATE.md`).
//!
//! One method, [`HELPER_METHOD`], carries a [`HelperRequest`] (protobuf, in
//! the request's `meta`) and, for a `Call`, the sealed envelope in its
//! `tensor`; the answer is a [`HelperReply`] and, for a `Call`, the sealed
//! reply envelope. The schema, for other implementations:
//!
//! ```proto
//! syntax = "proto3";
//! package mesh.helper.v1;
//! message Hello { bytes model = 1; }
//! message Open  { bytes session_id = 1; bytes model = 2; bytes owner_public = 3; bytes enc = 4; }
//! message Call  { bytes session_id = 1; uint32 kind = 2; uint32 n = 3; uint32 helper_index = 4;
//!                 uint32 op = 5; uint32 layer = 6; uint64 step = 7; uint32 rows = 8;
//!                 uint32 cols = 9; uint32 attempt = 10; bytes request_hash = 11; }
//! message Close { bytes session_id = 1; }
//! message HelperRequest { uint32 version = 1;
//!                         oneof op { Hello hello = 2; Open open = 3; Call call = 4; Close close = 5; } }
//! enum ErrorCode { NONE = 0; UNKNOWN_SESSION = 1; WRONG_MODEL = 2; BAD_REQUEST = 3; BUSY = 4;
//!                  MALFORMED = 5; INTERNAL = 6; UNSUPPORTED_VERSION = 7; }
//! message HelperReply { uint32 version = 1; ErrorCode error = 2; string message = 3;
//!                       bytes hpke_public = 4; bytes signature = 5; bytes enc = 6;
//!                       uint64 compute_nanos = 7; }
//! ```
//!
//! A `Call`'s fields and the session's ids rebuild, on both sides, the
//! [`EnvelopeHeader`] the envelope is sealed to (its AAD), so a field changed
//! on the way makes the envelope fail to open.

use std::fmt;

use prost::Message;

use super::seal::{Direction, EnvelopeHeader, DEFAULT_MAX_PAYLOAD};
use super::share::ShareSeed;
use crate::engine::{ModelId, Projection};
use crate::{Error, Result};

/// Method name of the helper protocol (version in the name and in every message).
pub const HELPER_METHOD: &str = "mesh/helper/1";

/// Version of the helper messages this build speaks.
pub const HELPER_VERSION: u32 = 1;

/// Message kind: owner to helper, the share is a 32-byte seed.
pub const KIND_SEED: u8 = 1;
/// Message kind: owner to helper, the share is a full vector.
pub const KIND_FULL: u8 = 2;
/// Message kind: helper to owner, the helper's partial result.
pub const KIND_RESULT: u8 = 3;

/// Wire code of a projection (the header's `op`) when it travels alone.
pub fn op_code(p: Projection) -> u8 {
    match p {
        Projection::Q => 0,
        Projection::K => 1,
        Projection::V => 2,
        Projection::O => 3,
        Projection::Gate => 4,
        Projection::Up => 5,
        Projection::Down => 6,
        Projection::Output => 7,
    }
}

/// Wire code of the fused Q, K, V request (one share of the input, three products).
pub const OP_QKV: u8 = 8;
/// Wire code of the fused gate and up request.
pub const OP_GATE_UP: u8 = 9;

/// The projections a request with wire code `op` computes, in reply order.
pub fn op_group(op: u8) -> Option<&'static [Projection]> {
    const SINGLE: [Projection; 8] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
        Projection::Output,
    ];
    match op {
        0..=7 => Some(&SINGLE[op as usize..op as usize + 1]),
        OP_QKV => Some(&[Projection::Q, Projection::K, Projection::V]),
        OP_GATE_UP => Some(&[Projection::Gate, Projection::Up]),
        _ => None,
    }
}

/// Parses an opened request payload (untrusted: what a helper receives):
/// `n_tokens` (u32 LE), then the 32-byte seed (`kind` 1) or the full share
/// (`kind` 2, `n_tokens·cols` u64 LE). Returns the share as a full vector.
/// Sizes are checked before anything is allocated.
pub fn decode_request(kind: u8, payload: &[u8], cols: usize) -> Result<Vec<u64>> {
    let bad = |what: String| Err(Error::InvalidArgument(format!("request payload: {what}")));
    let Some((n, body)) = payload.split_at_checked(4) else {
        return bad(format!(
            "expected at least 4 bytes, found {}",
            payload.len()
        ));
    };
    let n = u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize;
    let len = n.saturating_mul(cols);
    if n == 0 || len.saturating_mul(8) > DEFAULT_MAX_PAYLOAD {
        return bad(format!(
            "{n} tokens of {cols} values: expected at least one and at most {} bytes of share",
            DEFAULT_MAX_PAYLOAD
        ));
    }
    match kind {
        KIND_SEED => {
            let Ok(seed) = <[u8; 32]>::try_from(body) else {
                return bad(format!(
                    "expected a 32-byte seed, found {} bytes",
                    body.len()
                ));
            };
            Ok(ShareSeed::from_bytes(seed).expand(len))
        }
        KIND_FULL => {
            if body.len() != len.saturating_mul(8) {
                return bad(format!(
                    "expected {n} x {cols} values ({} bytes), found {} bytes",
                    len.saturating_mul(8),
                    body.len()
                ));
            }
            Ok(bytes_to_words(body))
        }
        other => bad(format!("unknown message kind {other}")),
    }
}

/// Parses an opened reply payload (untrusted: what the owner receives): exactly
/// `words` ring elements, u64 LE. The length is checked before allocating.
pub fn decode_reply(payload: &[u8], words: usize) -> Result<Vec<u64>> {
    if Some(payload.len()) != words.checked_mul(8) {
        return Err(Error::InvalidArgument(format!(
            "reply payload: expected {words} values ({} bytes), found {} bytes",
            words.saturating_mul(8),
            payload.len()
        )));
    }
    Ok(bytes_to_words(payload))
}

/// Ring elements as u64 LE bytes.
pub(crate) fn words_to_bytes(w: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(w.len() * 8);
    for v in w {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn bytes_to_words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// Why a helper refused or failed a request (carried in [`HelperReply::error`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum HelperErrorCode {
    /// No error.
    None = 0,
    /// The session does not exist (never opened, closed, expired, or another peer's).
    UnknownSession = 1,
    /// The node does not help with this model.
    WrongModel = 2,
    /// The request does not fit the session or the model (shape, op, header, envelope).
    BadRequest = 3,
    /// The node has no session slot left right now.
    Busy = 4,
    /// The request could not be decoded.
    Malformed = 5,
    /// The helper failed.
    Internal = 6,
    /// The request's version is not [`HELPER_VERSION`].
    UnsupportedVersion = 7,
}

impl HelperErrorCode {
    /// Short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            HelperErrorCode::None => "ok",
            HelperErrorCode::UnknownSession => "unknown session",
            HelperErrorCode::WrongModel => "wrong model",
            HelperErrorCode::BadRequest => "bad request",
            HelperErrorCode::Busy => "busy",
            HelperErrorCode::Malformed => "malformed",
            HelperErrorCode::Internal => "internal",
            HelperErrorCode::UnsupportedVersion => "unsupported version",
        }
    }
}

impl fmt::Display for HelperErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Ask a node for its signed HPKE key for a model.
#[derive(Clone, PartialEq, Message)]
pub struct HelloMsg {
    /// BLAKE3 of the GGUF file, 32 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub model: Vec<u8>,
}

/// Open a delegation session: the owner's HPKE encapsulation to the helper's
/// key (`enc`) and the owner's public key the helper seals replies to.
#[derive(Clone, PartialEq, Message)]
pub struct OpenMsg {
    /// 16 random bytes chosen by the owner.
    #[prost(bytes = "vec", tag = "1")]
    pub session_id: Vec<u8>,
    /// BLAKE3 of the GGUF file, 32 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub model: Vec<u8>,
    /// The owner's X25519 public key for this session, 32 bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub owner_public: Vec<u8>,
    /// The owner's HPKE encapsulated key to the helper, 32 bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub enc: Vec<u8>,
}

/// One sealed projection request (the envelope travels in the `tensor`).
#[derive(Clone, PartialEq, Message)]
pub struct CallMsg {
    /// The session.
    #[prost(bytes = "vec", tag = "1")]
    pub session_id: Vec<u8>,
    /// Message kind ([`KIND_SEED`] or [`KIND_FULL`]).
    #[prost(uint32, tag = "2")]
    pub kind: u32,
    /// Parties sharing the activation.
    #[prost(uint32, tag = "3")]
    pub n: u32,
    /// This helper's share position.
    #[prost(uint32, tag = "4")]
    pub helper_index: u32,
    /// Projection code ([`op_code`], [`OP_QKV`], [`OP_GATE_UP`]).
    #[prost(uint32, tag = "5")]
    pub op: u32,
    /// Layer.
    #[prost(uint32, tag = "6")]
    pub layer: u32,
    /// Step number.
    #[prost(uint64, tag = "7")]
    pub step: u64,
    /// Output rows (sum over the group's matrices).
    #[prost(uint32, tag = "8")]
    pub rows: u32,
    /// Input columns.
    #[prost(uint32, tag = "9")]
    pub cols: u32,
    /// Retry counter.
    #[prost(uint32, tag = "10")]
    pub attempt: u32,
    /// BLAKE3 of the opened payload, 32 bytes.
    #[prost(bytes = "vec", tag = "11")]
    pub request_hash: Vec<u8>,
}

/// Close a session.
#[derive(Clone, PartialEq, Message)]
pub struct CloseMsg {
    /// The session.
    #[prost(bytes = "vec", tag = "1")]
    pub session_id: Vec<u8>,
}

/// The operation of a [`HelperRequest`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum HelperOp {
    /// Ask for the signed key.
    #[prost(message, tag = "2")]
    Hello(HelloMsg),
    /// Open a session.
    #[prost(message, tag = "3")]
    Open(OpenMsg),
    /// A projection request.
    #[prost(message, tag = "4")]
    Call(CallMsg),
    /// Close a session.
    #[prost(message, tag = "5")]
    Close(CloseMsg),
}

/// A helper request (the `meta` of a [`HELPER_METHOD`] request).
#[derive(Clone, PartialEq, Message)]
pub struct HelperRequest {
    /// [`HELPER_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// What to do.
    #[prost(oneof = "HelperOp", tags = "2, 3, 4, 5")]
    pub op: Option<HelperOp>,
}

/// A helper reply (the `meta` of the response; a sealed reply in its `tensor`).
#[derive(Clone, PartialEq, Message)]
pub struct HelperReply {
    /// [`HELPER_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// [`HelperErrorCode::None`] on success.
    #[prost(enumeration = "HelperErrorCode", tag = "2")]
    pub error: i32,
    /// What went wrong, for people.
    #[prost(string, tag = "3")]
    pub message: String,
    /// Hello: the helper's X25519 HPKE public key, 32 bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub hpke_public: Vec<u8>,
    /// Hello: Ed25519 signature of the key by the node identity, 64 bytes.
    #[prost(bytes = "vec", tag = "5")]
    pub signature: Vec<u8>,
    /// Open: the helper's HPKE encapsulated key to the owner, 32 bytes.
    #[prost(bytes = "vec", tag = "6")]
    pub enc: Vec<u8>,
    /// Call: nanoseconds the helper spent opening, computing and sealing.
    #[prost(uint64, tag = "7")]
    pub compute_nanos: u64,
}

impl HelperReply {
    /// A reply that reports `code` with `message`.
    pub fn failure(code: HelperErrorCode, message: impl Into<String>) -> HelperReply {
        HelperReply {
            version: HELPER_VERSION,
            error: code as i32,
            message: message.into(),
            ..HelperReply::default()
        }
    }

    /// The error code (unknown codes read as [`HelperErrorCode::Internal`]).
    pub fn code(&self) -> HelperErrorCode {
        HelperErrorCode::try_from(self.error).unwrap_or(HelperErrorCode::Internal)
    }
}

/// A decoded, size-checked helper request.
#[derive(Clone, Debug, PartialEq)]
pub enum HelperCallMsg {
    /// Ask for the signed key for `model`.
    Hello {
        /// The model.
        model: ModelId,
    },
    /// Open a session.
    Open {
        /// Session id.
        session_id: [u8; 16],
        /// The model.
        model: ModelId,
        /// The owner's public key.
        owner_public: [u8; 32],
        /// The owner's encapsulated key to the helper.
        enc: [u8; 32],
    },
    /// A projection request: everything of its header but the peers and the model.
    Call {
        /// Session id.
        session_id: [u8; 16],
        /// Header fields sent in the clear.
        fields: CallFields,
    },
    /// Close a session.
    Close {
        /// Session id.
        session_id: [u8; 16],
    },
}

/// The per-request fields of an [`EnvelopeHeader`] that a `Call` carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallFields {
    /// Message kind.
    pub kind: u8,
    /// Parties.
    pub n: u16,
    /// Share position.
    pub helper_index: u16,
    /// Projection code.
    pub op: u8,
    /// Layer.
    pub layer: u32,
    /// Step.
    pub step: u64,
    /// Rows.
    pub rows: u32,
    /// Columns.
    pub cols: u32,
    /// Attempt.
    pub attempt: u32,
    /// Request hash.
    pub request_hash: [u8; 32],
}

impl CallFields {
    /// The fields of `header`.
    pub fn of(header: &EnvelopeHeader) -> CallFields {
        CallFields {
            kind: header.kind,
            n: header.n,
            helper_index: header.helper_index,
            op: header.op,
            layer: header.layer,
            step: header.step,
            rows: header.rows,
            cols: header.cols,
            attempt: header.attempt,
            request_hash: header.request_hash,
        }
    }

    /// The owner-to-helper header these fields describe in a session.
    pub fn header(
        &self,
        session_id: [u8; 16],
        owner_peer: Vec<u8>,
        helper_peer: Vec<u8>,
        model_hash: [u8; 32],
    ) -> EnvelopeHeader {
        EnvelopeHeader {
            direction: Direction::OwnerToHelper,
            kind: self.kind,
            n: self.n,
            helper_index: self.helper_index,
            op: self.op,
            layer: self.layer,
            session_id,
            owner_peer,
            helper_peer,
            model_hash,
            step: self.step,
            rows: self.rows,
            cols: self.cols,
            attempt: self.attempt,
            request_hash: self.request_hash,
        }
    }

    fn to_msg(self, session_id: [u8; 16]) -> CallMsg {
        CallMsg {
            session_id: session_id.to_vec(),
            kind: u32::from(self.kind),
            n: u32::from(self.n),
            helper_index: u32::from(self.helper_index),
            op: u32::from(self.op),
            layer: self.layer,
            step: self.step,
            rows: self.rows,
            cols: self.cols,
            attempt: self.attempt,
            request_hash: self.request_hash.to_vec(),
        }
    }
}

/// Encodes a request's `meta`.
pub fn encode_request(call: &HelperCallMsg) -> Vec<u8> {
    let op = match call {
        HelperCallMsg::Hello { model } => HelperOp::Hello(HelloMsg {
            model: model.0.to_vec(),
        }),
        HelperCallMsg::Open {
            session_id,
            model,
            owner_public,
            enc,
        } => HelperOp::Open(OpenMsg {
            session_id: session_id.to_vec(),
            model: model.0.to_vec(),
            owner_public: owner_public.to_vec(),
            enc: enc.to_vec(),
        }),
        HelperCallMsg::Call { session_id, fields } => HelperOp::Call(fields.to_msg(*session_id)),
        HelperCallMsg::Close { session_id } => HelperOp::Close(CloseMsg {
            session_id: session_id.to_vec(),
        }),
    };
    HelperRequest {
        version: HELPER_VERSION,
        op: Some(op),
    }
    .encode_to_vec()
}

/// A request refused before it reached a session: the code and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperRefusal {
    /// Error code for the reply.
    pub code: HelperErrorCode,
    /// Message for the reply.
    pub message: String,
}

fn fixed<const N: usize>(bytes: &[u8], what: &str) -> Result<[u8; N], HelperRefusal> {
    <[u8; N]>::try_from(bytes).map_err(|_| HelperRefusal {
        code: HelperErrorCode::Malformed,
        message: format!("{what}: expected {N} bytes, found {}", bytes.len()),
    })
}

fn narrow<T: TryFrom<u32>>(v: u32, what: &str) -> Result<T, HelperRefusal> {
    T::try_from(v).map_err(|_| HelperRefusal {
        code: HelperErrorCode::Malformed,
        message: format!("{what} {v} is out of range"),
    })
}

/// Decodes the `meta` of a helper request (untrusted). Checks the version and
/// every fixed-size field; never panics, allocates at most `meta.len()`.
pub fn decode_helper_request(meta: &[u8]) -> Result<HelperCallMsg, HelperRefusal> {
    let msg = HelperRequest::decode(meta).map_err(|e| HelperRefusal {
        code: HelperErrorCode::Malformed,
        message: format!("helper request: {e}"),
    })?;
    if msg.version != HELPER_VERSION {
        return Err(HelperRefusal {
            code: HelperErrorCode::UnsupportedVersion,
            message: format!(
                "helper request version {} (this node speaks {HELPER_VERSION})",
                msg.version
            ),
        });
    }
    match msg.op {
        None => Err(HelperRefusal {
            code: HelperErrorCode::Malformed,
            message: "helper request without an operation".into(),
        }),
        Some(HelperOp::Hello(h)) => Ok(HelperCallMsg::Hello {
            model: ModelId(fixed(&h.model, "model")?),
        }),
        Some(HelperOp::Open(o)) => Ok(HelperCallMsg::Open {
            session_id: fixed(&o.session_id, "session id")?,
            model: ModelId(fixed(&o.model, "model")?),
            owner_public: fixed(&o.owner_public, "owner public key")?,
            enc: fixed(&o.enc, "enc")?,
        }),
        Some(HelperOp::Call(c)) => Ok(HelperCallMsg::Call {
            session_id: fixed(&c.session_id, "session id")?,
            fields: CallFields {
                kind: narrow(c.kind, "kind")?,
                n: narrow(c.n, "n")?,
                helper_index: narrow(c.helper_index, "helper index")?,
                op: narrow(c.op, "op")?,
                layer: c.layer,
                step: c.step,
                rows: c.rows,
                cols: c.cols,
                attempt: c.attempt,
                request_hash: fixed(&c.request_hash, "request hash")?,
            },
        }),
        Some(HelperOp::Close(c)) => Ok(HelperCallMsg::Close {
            session_id: fixed(&c.session_id, "session id")?,
        }),
    }
}

/// Decodes a helper reply's `meta` (untrusted: what the owner receives):
/// version checked, error codes turned into an error naming the helper.
pub fn decode_helper_reply(meta: &[u8], helper: impl std::fmt::Display) -> Result<HelperReply> {
    let reply = HelperReply::decode(meta)
        .map_err(|e| Error::InvalidArgument(format!("helper {helper}: malformed reply: {e}")))?;
    if reply.version != HELPER_VERSION {
        return Err(Error::InvalidArgument(format!(
            "helper {helper}: reply version {} (this node speaks {HELPER_VERSION})",
            reply.version
        )));
    }
    if reply.code() != HelperErrorCode::None {
        let code = reply.code();
        let mut message = reply.message;
        // Untrusted text: keep it short (on a character boundary).
        if let Some((at, _)) = message.char_indices().nth(1024) {
            message.truncate(at);
        }
        return Err(Error::InvalidArgument(format!(
            "helper {helper} answered {code}: {message}"
        )));
    }
    Ok(reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields() -> CallFields {
        CallFields {
            kind: KIND_FULL,
            n: 3,
            helper_index: 2,
            op: OP_QKV,
            layer: 29,
            step: 1 << 40,
            rows: 960,
            cols: 576,
            attempt: 1,
            request_hash: [7; 32],
        }
    }

    #[test]
    fn requests_round_trip() {
        let calls = [
            HelperCallMsg::Hello {
                model: ModelId([1; 32]),
            },
            HelperCallMsg::Open {
                session_id: [2; 16],
                model: ModelId([3; 32]),
                owner_public: [4; 32],
                enc: [5; 32],
            },
            HelperCallMsg::Call {
                session_id: [6; 16],
                fields: fields(),
            },
            HelperCallMsg::Close {
                session_id: [8; 16],
            },
        ];
        for c in calls {
            assert_eq!(decode_helper_request(&encode_request(&c)).unwrap(), c);
        }
    }

    #[test]
    fn header_fields_round_trip() {
        let h = fields().header([1; 16], b"owner".to_vec(), b"helper".to_vec(), [2; 32]);
        assert_eq!(CallFields::of(&h), fields());
        assert_eq!(h.direction, Direction::OwnerToHelper);
    }

    #[test]
    fn bad_requests_are_typed() {
        let wrong_version = HelperRequest {
            version: 2,
            op: Some(HelperOp::Close(CloseMsg {
                session_id: vec![0; 16],
            })),
        };
        assert_eq!(
            decode_helper_request(&wrong_version.encode_to_vec())
                .unwrap_err()
                .code,
            HelperErrorCode::UnsupportedVersion
        );
        let short_id = HelperRequest {
            version: 1,
            op: Some(HelperOp::Close(CloseMsg {
                session_id: vec![0; 15],
            })),
        };
        assert_eq!(
            decode_helper_request(&short_id.encode_to_vec())
                .unwrap_err()
                .code,
            HelperErrorCode::Malformed
        );
        let mut big = fields().to_msg([0; 16]);
        big.n = 70_000;
        let msg = HelperRequest {
            version: 1,
            op: Some(HelperOp::Call(big)),
        };
        assert_eq!(
            decode_helper_request(&msg.encode_to_vec())
                .unwrap_err()
                .code,
            HelperErrorCode::Malformed
        );
        let empty = HelperRequest {
            version: 1,
            op: None,
        };
        assert!(decode_helper_request(&empty.encode_to_vec()).is_err());
    }

    #[test]
    fn replies_with_errors_name_the_helper() {
        let meta = HelperReply::failure(HelperErrorCode::Busy, "full").encode_to_vec();
        let e = decode_helper_reply(&meta, "12D3Koo")
            .unwrap_err()
            .to_string();
        assert!(e.contains("12D3Koo") && e.contains("busy"), "{e}");
        let ok = HelperReply {
            version: HELPER_VERSION,
            compute_nanos: 5,
            ..HelperReply::default()
        };
        assert_eq!(
            decode_helper_reply(&ok.encode_to_vec(), "x")
                .unwrap()
                .compute_nanos,
            5
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_helper_request(&bytes);
            let _ = decode_helper_reply(&bytes, "p");
        }
    }
}
