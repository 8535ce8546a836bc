//! The wire format: protobuf messages (prost) with an explicit version, in
//! length-prefixed frames whose length is checked before anything is allocated.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes of one
//! protobuf message. The schema, for other implementations:
//!
//! ```proto
//! syntax = "proto3";
//! package mesh.wire.v1;
//! message RequestFrame  { uint32 version = 1; string method = 2; bytes meta = 3; bytes tensor = 4; }
//! message ResponseFrame { uint32 version = 1; Status status = 2; string message = 3; bytes meta = 4; bytes tensor = 5; }
//! enum Status { OK = 0; UNKNOWN_METHOD = 1; REJECTED = 2; TOO_LARGE = 3;
//!               UNSUPPORTED_VERSION = 4; MALFORMED = 5; BUSY = 6; }
//! message AnnouncementMsg { bytes model = 1; uint32 layer_start = 2; uint32 layer_end = 3;
//!                           uint64 free_memory = 4; float tokens_per_sec = 5; }
//! message DescribeReply  { uint32 version = 1; repeated AnnouncementMsg announcements = 2; repeated string addrs = 3; }
//! message AnnounceGossip { uint32 version = 1; repeated AnnouncementMsg announcements = 2; }
//! ```
//!
//! `tensor` fields are raw little-endian bytes; decoding a frame held in
//! [`Bytes`] slices them without copying.

use std::io;
use std::ops::Range;

use bytes::Bytes;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use prost::Message;

use super::{Announcement, Multiaddr, NetworkError, RemoteStatus, Request, Response};
use crate::model_id::ModelId;
use crate::Result;

/// The wire version this build speaks.
pub const VERSION: u32 = 1;

/// Longest method name.
pub const MAX_METHOD_LEN: usize = 64;

/// Layer indices must be below this (no real model has more layers).
pub const MAX_LAYERS: u32 = 1 << 16;

/// Most announcements one node may list in a describe reply or gossip message.
pub const MAX_ANNOUNCEMENTS: usize = 256;

/// Most addresses one node may list in a describe reply.
pub const MAX_ADDRS: usize = 64;

/// Bytes of the length prefix.
pub const PREFIX_LEN: usize = 4;

/// Frames up to this size are written with their prefix in one write.
const SMALL_FRAME: usize = 64 << 10;

/// A request on the wire.
#[derive(Clone, PartialEq, Message)]
pub struct RequestFrame {
    /// Wire version ([`VERSION`]).
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Method name.
    #[prost(string, tag = "2")]
    pub method: String,
    /// Method-defined metadata.
    #[prost(bytes = "bytes", tag = "3")]
    pub meta: Bytes,
    /// Raw little-endian tensor bytes.
    #[prost(bytes = "bytes", tag = "4")]
    pub tensor: Bytes,
}

/// Status of a [`ResponseFrame`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Status {
    /// The handler answered.
    Ok = 0,
    /// See [`RemoteStatus::UnknownMethod`].
    UnknownMethod = 1,
    /// See [`RemoteStatus::Rejected`].
    Rejected = 2,
    /// See [`RemoteStatus::TooLarge`].
    TooLarge = 3,
    /// See [`RemoteStatus::UnsupportedVersion`].
    UnsupportedVersion = 4,
    /// See [`RemoteStatus::Malformed`].
    Malformed = 5,
    /// See [`RemoteStatus::Busy`].
    Busy = 6,
}

impl From<RemoteStatus> for Status {
    fn from(s: RemoteStatus) -> Status {
        match s {
            RemoteStatus::UnknownMethod => Status::UnknownMethod,
            RemoteStatus::Rejected => Status::Rejected,
            RemoteStatus::TooLarge => Status::TooLarge,
            RemoteStatus::UnsupportedVersion => Status::UnsupportedVersion,
            RemoteStatus::Malformed => Status::Malformed,
            RemoteStatus::Busy => Status::Busy,
        }
    }
}

/// A response on the wire.
#[derive(Clone, PartialEq, Message)]
pub struct ResponseFrame {
    /// Wire version ([`VERSION`]).
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Outcome.
    #[prost(enumeration = "Status", tag = "2")]
    pub status: i32,
    /// Error message when `status` is not `Ok`.
    #[prost(string, tag = "3")]
    pub message: String,
    /// Method-defined metadata.
    #[prost(bytes = "bytes", tag = "4")]
    pub meta: Bytes,
    /// Raw little-endian tensor bytes.
    #[prost(bytes = "bytes", tag = "5")]
    pub tensor: Bytes,
}

/// One [`Announcement`] on the wire.
#[derive(Clone, PartialEq, Message)]
pub struct AnnouncementMsg {
    /// BLAKE3 of the GGUF file, 32 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub model: Vec<u8>,
    /// First layer served.
    #[prost(uint32, tag = "2")]
    pub layer_start: u32,
    /// One past the last layer served.
    #[prost(uint32, tag = "3")]
    pub layer_end: u32,
    /// Free memory, bytes.
    #[prost(uint64, tag = "4")]
    pub free_memory: u64,
    /// Measured tokens per second.
    #[prost(float, tag = "5")]
    pub tokens_per_sec: f32,
}

/// Reply to [`super::DESCRIBE_METHOD`] (in `meta`).
#[derive(Clone, PartialEq, Message)]
pub struct DescribeReply {
    /// Wire version.
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Everything the node serves.
    #[prost(message, repeated, tag = "2")]
    pub announcements: Vec<AnnouncementMsg>,
    /// Its listen addresses.
    #[prost(string, repeated, tag = "3")]
    pub addrs: Vec<String>,
}

/// Gossip on [`super::ANNOUNCE_TOPIC`]: the full list of what the publisher
/// serves now (a model missing from it is withdrawn).
#[derive(Clone, PartialEq, Message)]
pub struct AnnounceGossip {
    /// Wire version.
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Everything the publisher serves.
    #[prost(message, repeated, tag = "2")]
    pub announcements: Vec<AnnouncementMsg>,
}

fn check_version(found: u32) -> Result<()> {
    if found != VERSION {
        return Err(NetworkError::UnsupportedVersion {
            found,
            supported: VERSION,
        }
        .into());
    }
    Ok(())
}

fn check_size(what: &'static str, size: usize, limit: usize) -> Result<()> {
    if size > limit {
        return Err(NetworkError::TooLarge {
            what,
            size: size as u64,
            limit: limit as u64,
        }
        .into());
    }
    Ok(())
}

fn decode_err(what: &str, e: prost::DecodeError) -> crate::Error {
    NetworkError::Malformed(format!("{what}: {e}")).into()
}

/// Encodes a request, refusing one larger than `limit` bytes.
pub fn encode_request(request: &Request, limit: usize) -> Result<Bytes> {
    let frame = RequestFrame {
        version: VERSION,
        method: request.method.clone(),
        meta: request.meta.clone(),
        tensor: request.tensor.clone(),
    };
    check_size("request", frame.encoded_len(), limit)?;
    Ok(Bytes::from(frame.encode_to_vec()))
}

/// Decodes a request body (without its length prefix); `tensor` and `meta`
/// share `bytes`' buffer.
pub fn decode_request(bytes: Bytes, limit: usize) -> Result<Request> {
    check_size("request", bytes.len(), limit)?;
    let frame = RequestFrame::decode(bytes).map_err(|e| decode_err("request", e))?;
    check_version(frame.version)?;
    if frame.method.is_empty() || frame.method.len() > MAX_METHOD_LEN {
        return Err(NetworkError::Malformed(format!(
            "request: expected a method of 1 to {MAX_METHOD_LEN} bytes, found {}",
            frame.method.len()
        ))
        .into());
    }
    Ok(Request {
        method: frame.method,
        meta: frame.meta,
        tensor: frame.tensor,
    })
}

/// Encodes a reply. A response over `limit` is replaced by a `TooLarge`
/// error frame, so the requester learns why.
pub fn encode_response(
    reply: std::result::Result<&Response, (RemoteStatus, &str)>,
    limit: usize,
) -> Bytes {
    let frame = match reply {
        Ok(r) => ResponseFrame {
            version: VERSION,
            status: Status::Ok as i32,
            message: String::new(),
            meta: r.meta.clone(),
            tensor: r.tensor.clone(),
        },
        Err((status, message)) => ResponseFrame {
            version: VERSION,
            status: Status::from(status) as i32,
            message: message.chars().take(1024).collect(),
            meta: Bytes::new(),
            tensor: Bytes::new(),
        },
    };
    let len = frame.encoded_len();
    if len > limit {
        let message =
            format!("response of {len} bytes exceeds the responder's limit of {limit} bytes");
        return Bytes::from(
            ResponseFrame {
                version: VERSION,
                status: Status::TooLarge as i32,
                message,
                meta: Bytes::new(),
                tensor: Bytes::new(),
            }
            .encode_to_vec(),
        );
    }
    Bytes::from(frame.encode_to_vec())
}

/// Decodes a response body from `peer`: `Ok` status gives the [`Response`],
/// any other status [`NetworkError::Remote`].
pub fn decode_response(bytes: Bytes, limit: usize, peer: super::PeerId) -> Result<Response> {
    check_size("response", bytes.len(), limit)?;
    let frame = ResponseFrame::decode(bytes).map_err(|e| decode_err("response", e))?;
    check_version(frame.version)?;
    let status = match Status::try_from(frame.status) {
        Ok(Status::Ok) => {
            return Ok(Response {
                meta: frame.meta,
                tensor: frame.tensor,
            })
        }
        Ok(Status::UnknownMethod) => RemoteStatus::UnknownMethod,
        Ok(Status::Rejected) => RemoteStatus::Rejected,
        Ok(Status::TooLarge) => RemoteStatus::TooLarge,
        Ok(Status::UnsupportedVersion) => RemoteStatus::UnsupportedVersion,
        Ok(Status::Malformed) => RemoteStatus::Malformed,
        Ok(Status::Busy) => RemoteStatus::Busy,
        Err(_) => {
            return Err(NetworkError::Malformed(format!(
                "response: unknown status {}",
                frame.status
            ))
            .into())
        }
    };
    Err(NetworkError::Remote {
        peer,
        status,
        message: frame.message.chars().take(1024).collect(),
    }
    .into())
}

impl From<&Announcement> for AnnouncementMsg {
    fn from(a: &Announcement) -> Self {
        AnnouncementMsg {
            model: a.model.0.to_vec(),
            layer_start: a.layers.start,
            layer_end: a.layers.end,
            free_memory: a.free_memory,
            tokens_per_sec: a.tokens_per_sec,
        }
    }
}

impl TryFrom<&AnnouncementMsg> for Announcement {
    type Error = crate::Error;

    fn try_from(m: &AnnouncementMsg) -> Result<Announcement> {
        let model: [u8; 32] = m.model.as_slice().try_into().map_err(|_| {
            NetworkError::Malformed(format!(
                "announcement: expected a 32-byte model id, found {} bytes",
                m.model.len()
            ))
        })?;
        let a = Announcement {
            model: ModelId(model),
            layers: Range {
                start: m.layer_start,
                end: m.layer_end,
            },
            free_memory: m.free_memory,
            tokens_per_sec: m.tokens_per_sec,
        };
        a.validate()?;
        Ok(a)
    }
}

fn announcements_from(msgs: &[AnnouncementMsg]) -> Result<Vec<Announcement>> {
    if msgs.len() > MAX_ANNOUNCEMENTS {
        return Err(NetworkError::Malformed(format!(
            "expected at most {MAX_ANNOUNCEMENTS} announcements, found {}",
            msgs.len()
        ))
        .into());
    }
    msgs.iter().map(Announcement::try_from).collect()
}

/// Encodes a describe reply.
pub fn encode_describe(announcements: &[Announcement], addrs: &[Multiaddr]) -> Bytes {
    let reply = DescribeReply {
        version: VERSION,
        announcements: announcements
            .iter()
            .take(MAX_ANNOUNCEMENTS)
            .map(Into::into)
            .collect(),
        addrs: addrs
            .iter()
            .take(MAX_ADDRS)
            .map(|a| a.to_string())
            .collect(),
    };
    Bytes::from(reply.encode_to_vec())
}

/// Decodes and validates a describe reply.
pub fn decode_describe(bytes: &[u8]) -> Result<(Vec<Announcement>, Vec<Multiaddr>)> {
    let reply = DescribeReply::decode(bytes).map_err(|e| decode_err("describe reply", e))?;
    check_version(reply.version)?;
    let announcements = announcements_from(&reply.announcements)?;
    if reply.addrs.len() > MAX_ADDRS {
        return Err(NetworkError::Malformed(format!(
            "describe reply: expected at most {MAX_ADDRS} addresses, found {}",
            reply.addrs.len()
        ))
        .into());
    }
    let addrs = reply
        .addrs
        .iter()
        .map(|a| {
            a.parse::<Multiaddr>().map_err(|e| {
                crate::Error::from(NetworkError::Malformed(format!(
                    "describe reply: bad address {:?}: {e}",
                    a.chars().take(100).collect::<String>()
                )))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((announcements, addrs))
}

/// Encodes the gossip a node publishes on [`super::ANNOUNCE_TOPIC`].
pub fn encode_announce(announcements: &[Announcement]) -> Bytes {
    let msg = AnnounceGossip {
        version: VERSION,
        announcements: announcements
            .iter()
            .take(MAX_ANNOUNCEMENTS)
            .map(Into::into)
            .collect(),
    };
    Bytes::from(msg.encode_to_vec())
}

/// Decodes and validates announce gossip.
pub fn decode_announce(bytes: &[u8]) -> Result<Vec<Announcement>> {
    let msg = AnnounceGossip::decode(bytes).map_err(|e| decode_err("announce gossip", e))?;
    check_version(msg.version)?;
    announcements_from(&msg.announcements)
}

/// The io::Error a codec returns for a typed wire failure; recover it with
/// [`network_error_of`].
pub fn io_error(e: NetworkError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// The [`NetworkError`] inside an io::Error made by [`io_error`], if any.
pub fn network_error_of(e: &io::Error) -> Option<NetworkError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<NetworkError>())
        .cloned()
}

/// What reading one frame found.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A frame body within the limit.
    Body(Bytes),
    /// A frame whose announced length exceeds the limit; its body was read
    /// and discarded (in fixed-size chunks), so the stream can still carry a reply.
    Oversized {
        /// Announced length.
        size: u64,
    },
}

/// Most bytes an oversized frame may announce and still be drained (beyond
/// that the stream is reset instead).
pub const MAX_DRAIN: u64 = 1 << 30;

/// Reads one frame: the 4-byte length first, checked against `limit` before
/// anything is allocated. An oversized frame up to [`MAX_DRAIN`] is drained
/// and reported as [`Frame::Oversized`]; a larger one is an error.
pub async fn read_frame<T: AsyncRead + Unpin>(
    io: &mut T,
    limit: usize,
    what: &'static str,
) -> io::Result<Frame> {
    let mut prefix = [0u8; PREFIX_LEN];
    io.read_exact(&mut prefix).await?;
    let len = u64::from(u32::from_be_bytes(prefix));
    if len > limit as u64 {
        if len > MAX_DRAIN {
            return Err(io_error(NetworkError::TooLarge {
                what,
                size: len,
                limit: limit as u64,
            }));
        }
        let mut left = len;
        let mut chunk = [0u8; 16 << 10];
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            io.read_exact(&mut chunk[..n]).await?;
            left -= n as u64;
        }
        return Ok(Frame::Oversized { size: len });
    }
    let mut body = vec![0u8; len as usize];
    io.read_exact(&mut body).await?;
    Ok(Frame::Body(Bytes::from(body)))
}

/// Writes one frame (length prefix and body) and flushes.
pub async fn write_frame<T: AsyncWrite + Unpin>(io: &mut T, body: &[u8]) -> io::Result<()> {
    let len = u32::try_from(body.len()).map_err(|_| {
        io_error(NetworkError::TooLarge {
            what: "frame",
            size: body.len() as u64,
            limit: u64::from(u32::MAX),
        })
    })?;
    if body.len() <= SMALL_FRAME {
        // One write: a multiplexed stream sends each write as its own frame.
        let mut frame = Vec::with_capacity(PREFIX_LEN + body.len());
        frame.extend_from_slice(&len.to_be_bytes());
        frame.extend_from_slice(body);
        io.write_all(&frame).await?;
    } else {
        io.write_all(&len.to_be_bytes()).await?;
        io.write_all(body).await?;
    }
    io.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn peer() -> super::super::PeerId {
        super::super::PeerId::random()
    }

    proptest! {
        #[test]
        fn request_round_trip(method in "[a-z/]{1,64}", meta in proptest::collection::vec(any::<u8>(), 0..300),
                              tensor in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let r = Request { method, meta: meta.into(), tensor: tensor.into() };
            let bytes = encode_request(&r, 1 << 20).unwrap();
            prop_assert_eq!(decode_request(bytes, 1 << 20).unwrap(), r);
        }

        #[test]
        fn response_round_trip(meta in proptest::collection::vec(any::<u8>(), 0..300),
                               tensor in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let r = Response { meta: meta.into(), tensor: tensor.into() };
            let bytes = encode_response(Ok(&r), 1 << 20);
            prop_assert_eq!(decode_response(bytes, 1 << 20, peer()).unwrap(), r);
        }

        #[test]
        fn announcements_round_trip(start in 0u32..100, len in 1u32..100, free in any::<u64>(), tps in 0f32..1e6,
                                    model in any::<[u8; 32]>()) {
            let a = Announcement { model: ModelId(model), layers: start..start + len, free_memory: free, tokens_per_sec: tps };
            let addr: Multiaddr = "/ip4/127.0.0.1/tcp/4001".parse().unwrap();
            let (got, addrs) = decode_describe(&encode_describe(std::slice::from_ref(&a), std::slice::from_ref(&addr))).unwrap();
            prop_assert_eq!(got, vec![a.clone()]);
            prop_assert_eq!(addrs, vec![addr]);
            prop_assert_eq!(decode_announce(&encode_announce(std::slice::from_ref(&a))).unwrap(), vec![a]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode_request(Bytes::from(bytes.clone()), 1 << 20);
            let _ = decode_response(Bytes::from(bytes.clone()), 1 << 20, peer());
            let _ = decode_describe(&bytes);
            let _ = decode_announce(&bytes);
        }
    }

    #[test]
    fn too_large_requests_are_refused_before_sending() {
        let r = Request {
            method: "m".into(),
            meta: Bytes::new(),
            tensor: vec![0u8; 2000].into(),
        };
        let err = encode_request(&r, 1000).unwrap_err();
        assert!(
            matches!(
                err,
                crate::Error::Network(NetworkError::TooLarge {
                    what: "request",
                    limit: 1000,
                    ..
                })
            ),
            "{err}"
        );
    }

    #[test]
    fn too_large_responses_become_an_error_frame() {
        let r = Response {
            meta: Bytes::new(),
            tensor: vec![0u8; 2000].into(),
        };
        let bytes = encode_response(Ok(&r), 1000);
        let err = decode_response(bytes, 1 << 20, peer()).unwrap_err();
        assert!(
            matches!(
                err,
                crate::Error::Network(NetworkError::Remote {
                    status: RemoteStatus::TooLarge,
                    ..
                })
            ),
            "{err}"
        );
    }

    #[test]
    fn unknown_versions_and_statuses_are_typed_errors() {
        let frame = RequestFrame {
            version: 2,
            method: "m".into(),
            meta: Bytes::new(),
            tensor: Bytes::new(),
        };
        let err = decode_request(Bytes::from(frame.encode_to_vec()), 1 << 20).unwrap_err();
        assert!(
            matches!(
                err,
                crate::Error::Network(NetworkError::UnsupportedVersion {
                    found: 2,
                    supported: 1
                })
            ),
            "{err}"
        );
        let frame = ResponseFrame {
            version: 1,
            status: 99,
            message: String::new(),
            meta: Bytes::new(),
            tensor: Bytes::new(),
        };
        let err = decode_response(Bytes::from(frame.encode_to_vec()), 1 << 20, peer()).unwrap_err();
        assert!(err.to_string().contains("unknown status 99"), "{err}");
        let bad = AnnounceGossip {
            version: 1,
            announcements: vec![AnnouncementMsg {
                model: vec![1; 5],
                layer_start: 0,
                layer_end: 1,
                free_memory: 0,
                tokens_per_sec: 0.0,
            }],
        };
        let err = decode_announce(&bad.encode_to_vec()).unwrap_err();
        assert!(err.to_string().contains("32-byte model id"), "{err}");
        let empty = AnnounceGossip {
            version: 1,
            announcements: vec![AnnouncementMsg {
                model: vec![1; 32],
                layer_start: 3,
                layer_end: 3,
                free_memory: 0,
                tokens_per_sec: 0.0,
            }],
        };
        assert!(decode_announce(&empty.encode_to_vec()).is_err());
    }

    #[test]
    fn frames_check_the_length_before_allocating() {
        futures::executor::block_on(async {
            let mut out = Vec::new();
            write_frame(&mut out, b"hello").await.unwrap();
            let mut cursor = futures::io::Cursor::new(out.clone());
            assert_eq!(
                read_frame(&mut cursor, 16, "request").await.unwrap(),
                Frame::Body(Bytes::from_static(b"hello"))
            );
            // Over the limit: drained, reported with its size.
            let mut cursor = futures::io::Cursor::new(out);
            assert_eq!(
                read_frame(&mut cursor, 4, "request").await.unwrap(),
                Frame::Oversized { size: 5 }
            );
            // A prefix announcing 4 GiB with no body: refused without allocating or reading.
            let mut cursor = futures::io::Cursor::new(vec![0xff, 0xff, 0xff, 0xff]);
            let err = read_frame(&mut cursor, 1 << 20, "request")
                .await
                .unwrap_err();
            assert!(
                matches!(
                    network_error_of(&err),
                    Some(NetworkError::TooLarge {
                        size: 0xffff_ffff,
                        ..
                    })
                ),
                "{err}"
            );
            // Truncated body: an io error, not a panic.
            let mut cursor = futures::io::Cursor::new(vec![0, 0, 0, 9, 1, 2]);
            assert!(read_frame(&mut cursor, 16, "request").await.is_err());
        });
    }
}
