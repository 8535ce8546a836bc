//! The stage protocol: request/response messages a pipeline client sends to a
//! node that serves a range of a model's layers.
//!
//! One method, [`STAGE_METHOD`], carries a [`StageRequest`] (protobuf, in the
//! request's `meta`) and hidden-state rows (raw little-endian, in its
//! `tensor`); the answer is a [`StageReply`] and the output rows. The schema,
//! for other implementations:
//!
//! ```proto
//! syntax = "proto3";
//! package mesh.stage.v1;
//! enum DType { F32 = 0; F16 = 1; }
//! message AdapterRef { bytes id = 1; float scale = 2; }
//! message Open     { bytes model = 1; uint32 layer_start = 2; uint32 layer_end = 3;
//!                    uint64 n_ctx = 4; bool exact = 5; repeated AdapterRef adapters = 6; }
//! message RouteHop { bytes peer = 1; uint64 session = 2; }
//! message Forward  { uint64 session = 1; uint64 pos = 2; uint32 n_tokens = 3; DType dtype = 4;
//!                    repeated RouteHop route = 5; uint64 deliver = 6; bytes origin = 7;
//!                    uint32 carried = 8; repeated uint64 compute_us = 9; uint32 timeout_ms = 10; }
//! message Truncate { uint64 session = 1; uint64 len = 2; }
//! message Close    { uint64 session = 1; }
//! message StageRequest { uint32 version = 1;
//!                        oneof op { Open open = 2; Forward forward = 3; Truncate truncate = 4; Close close = 5; } }
//! enum ErrorCode { NONE = 0; UNKNOWN_SESSION = 1; WRONG_MODEL = 2; LAYERS_NOT_SERVED = 3;
//!                  BAD_SHAPE = 4; POSITION_MISMATCH = 5; CONTEXT_FULL = 6; BUSY = 7;
//!                  MODE_MISMATCH = 8; TOO_LARGE = 9; MALFORMED = 10; INTERNAL = 11;
//!                  UNSUPPORTED_VERSION = 12; ADAPTER_MISSING = 13; NEXT_HOP = 14; }
//! message StageReply { uint32 version = 1; uint64 session = 2; uint64 len = 3; ErrorCode error = 4;
//!                      string message = 5; uint64 compute_us = 6; uint32 n_tokens = 7; DType dtype = 8; }
//! message Deliver  { uint32 version = 1; uint64 deliver = 2; uint64 pos = 3; uint32 n_tokens = 4;
//!                    DType dtype = 5; repeated uint64 compute_us = 6; }
//! ```
//!
//! A `Forward` carries `n_tokens` rows of the model's embedding width, in
//! `dtype`, for positions `pos..pos + n_tokens`; `pos` must equal the number
//! of positions the session holds (truncate first to rewrite history). The
//! reply carries the rows after the session's layers, in the same dtype.
//! Every size is checked before anything is allocated.
//!
//! **Pushed forwards** (decode steps, at most [`MAX_PUSH_TOKENS`] rows): a
//! `Forward` with a non-zero `deliver` and a `route` (the later hops' peers
//! and sessions, at most [`MAX_ROUTE`]) asks the stage to send its output on
//! itself instead of answering with it: as a `Forward` to `route[0]` (with
//! the rest of the route, `origin` set to the client, and its own output
//! appended to the tensor), or, at the end of the route, as a `Deliver` to
//! the origin on [`DELIVER_METHOD`] (meta: `Deliver`; tensor: every hop's
//! output in route order). The client's pushed forward carries its rows
//! only (`carried` 0, no `compute_us`, no `origin`); a stage's carries the
//! outputs of every hop before it on the route, its own input last, each of
//! `n_tokens` rows: `carried` counts those before its input, `compute_us`
//! holds all of their compute times (`carried` + 1). One token
//! then crosses hops + 1 links instead of 2 x hops, and the client still
//! learns every hop's input (to replay into a replacement). The reply to a
//! pushed forward carries no rows: it comes once the next hop (or the
//! origin) answered, with `NEXT_HOP` and the next hop's error when that
//! failed. A pushed forward from another stage names the session's owner in
//! `origin`: the session id (random, 64 bits, known only to the client and
//! the hops it sends it to) is the capability, so a stage on the route can
//! write into a later hop's session, which it could already corrupt by
//! answering wrong rows.
//!
//! An `Open` may name LoRA adapters (BLAKE3 of the adapter file, and a scale;
//! at most [`MAX_SESSION_ADAPTERS`]): the stage applies their tensors for its
//! layers, in the order given, and refuses with `ADAPTER_MISSING` when it
//! does not hold one of them (the client then plans around that stage).

use std::fmt;
use std::ops::Range;
use std::time::Duration;

use bytes::Bytes;
use prost::Message;

use crate::engine::ModelId;
use crate::network::wire::MAX_LAYERS;
use crate::network::PeerId;

/// Method name of the stage protocol (version in the name and in every message).
pub const STAGE_METHOD: &str = "mesh/stage/1";

/// Version of the stage messages this build speaks.
pub const STAGE_VERSION: u32 = 1;

/// Most token rows in one `Forward` (a prompt batch).
pub const MAX_BATCH_TOKENS: u32 = 4096;

/// Largest context a session may ask for.
pub const MAX_SESSION_CTX: u64 = 1 << 20;

/// Method on which the last stage of a pushed forward delivers every hop's
/// output to the client that started it.
pub const DELIVER_METHOD: &str = "mesh/stage-deliver/1";

/// Most rows in a pushed forward (see the module docs).
pub const MAX_PUSH_TOKENS: u32 = 16;

/// Most later hops one pushed forward may name.
pub const MAX_ROUTE: usize = 32;

/// Most LoRA adapters one session may name.
pub const MAX_SESSION_ADAPTERS: usize = 16;

/// Element type of hidden-state rows on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum DType {
    /// IEEE f32, little-endian: exactly what the engine computes.
    F32 = 0,
    /// IEEE f16, little-endian: half the bytes; rounds every hidden value, so
    /// tokens may differ from local generation.
    F16 = 1,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
}

/// Why a stage refused or failed a request (carried in [`StageReply::error`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum ErrorCode {
    /// No error.
    None = 0,
    /// The session does not exist (never opened, closed, expired, or opened by another peer).
    UnknownSession = 1,
    /// The node does not serve this model.
    WrongModel = 2,
    /// The node does not serve (all of) the requested layers.
    LayersNotServed = 3,
    /// Hidden rows of the wrong width or byte length.
    BadShape = 4,
    /// `pos` is not the number of positions the session holds.
    PositionMismatch = 5,
    /// The rows would go past the session's context.
    ContextFull = 6,
    /// The node has no memory (KV budget) or session slot left right now.
    Busy = 7,
    /// The session asks for a numeric mode (exact accumulation) the node does not run.
    ModeMismatch = 8,
    /// A size exceeds a protocol limit.
    TooLarge = 9,
    /// The request could not be decoded.
    Malformed = 10,
    /// The engine failed.
    Internal = 11,
    /// The request's version is not [`STAGE_VERSION`].
    UnsupportedVersion = 12,
    /// The session names a LoRA adapter this node does not hold.
    AdapterMissing = 13,
    /// A pushed forward's next hop (or its origin) failed or refused.
    NextHop = 14,
}

impl ErrorCode {
    /// Short name for messages.
    pub fn name(self) -> &'static str {
        match self {
            ErrorCode::None => "ok",
            ErrorCode::UnknownSession => "unknown session",
            ErrorCode::WrongModel => "wrong model",
            ErrorCode::LayersNotServed => "layers not served",
            ErrorCode::BadShape => "bad shape",
            ErrorCode::PositionMismatch => "position mismatch",
            ErrorCode::ContextFull => "context full",
            ErrorCode::Busy => "busy",
            ErrorCode::ModeMismatch => "mode mismatch",
            ErrorCode::TooLarge => "too large",
            ErrorCode::Malformed => "malformed",
            ErrorCode::Internal => "internal",
            ErrorCode::UnsupportedVersion => "unsupported version",
            ErrorCode::AdapterMissing => "adapter missing",
            ErrorCode::NextHop => "next hop failed",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Open a session over `layer_start..layer_end` of a model.
#[derive(Clone, PartialEq, Message)]
pub struct OpenMsg {
    /// BLAKE3 of the GGUF file, 32 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub model: Vec<u8>,
    /// First layer.
    #[prost(uint32, tag = "2")]
    pub layer_start: u32,
    /// One past the last layer.
    #[prost(uint32, tag = "3")]
    pub layer_end: u32,
    /// Positions the session's KV cache must hold.
    #[prost(uint64, tag = "4")]
    pub n_ctx: u64,
    /// The client expects exact accumulation (see `EngineOptions::exact`).
    #[prost(bool, tag = "5")]
    pub exact: bool,
    /// LoRA adapters the session applies, in order.
    #[prost(message, repeated, tag = "6")]
    pub adapters: Vec<AdapterRef>,
}

/// A LoRA adapter a session applies: its id and scale.
#[derive(Clone, PartialEq, Message)]
pub struct AdapterRef {
    /// BLAKE3 of the adapter's GGUF file, 32 bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub id: Vec<u8>,
    /// Scale (as `--lora FILE:SCALE`).
    #[prost(float, tag = "2")]
    pub scale: f32,
}

/// Run the session's layers on rows at `pos`.
#[derive(Clone, PartialEq, Message)]
pub struct ForwardMsg {
    /// Session id from the open reply.
    #[prost(uint64, tag = "1")]
    pub session: u64,
    /// Position of the first row.
    #[prost(uint64, tag = "2")]
    pub pos: u64,
    /// Rows in the tensor.
    #[prost(uint32, tag = "3")]
    pub n_tokens: u32,
    /// Element type of the rows (the reply uses the same).
    #[prost(enumeration = "DType", tag = "4")]
    pub dtype: i32,
    /// Pushed forwards: the later hops, in order.
    #[prost(message, repeated, tag = "5")]
    pub route: Vec<RouteHop>,
    /// Pushed forwards: the client's delivery id (0: an ordinary forward).
    #[prost(uint64, tag = "6")]
    pub deliver: u64,
    /// Pushed forwards from a stage: the client's peer id (empty: the requester).
    #[prost(bytes = "vec", tag = "7")]
    pub origin: Vec<u8>,
    /// Pushed forwards: earlier hops' outputs before the input rows.
    #[prost(uint32, tag = "8")]
    pub carried: u32,
    /// Pushed forwards: the earlier hops' compute times, microseconds.
    #[prost(uint64, repeated, tag = "9")]
    pub compute_us: Vec<u64>,
    /// Pushed forwards: how long to wait for the next hop's answer.
    #[prost(uint32, tag = "10")]
    pub timeout_ms: u32,
}

/// A later hop of a pushed forward.
#[derive(Clone, PartialEq, Message)]
pub struct RouteHop {
    /// Its peer id (libp2p bytes).
    #[prost(bytes = "vec", tag = "1")]
    pub peer: Vec<u8>,
    /// Its session there.
    #[prost(uint64, tag = "2")]
    pub session: u64,
}

/// Every hop's output of a pushed forward, sent to its origin on
/// [`DELIVER_METHOD`] (rows in the request's tensor, hop after hop).
#[derive(Clone, PartialEq, Message)]
pub struct DeliverMsg {
    /// [`STAGE_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The delivery id the client chose.
    #[prost(uint64, tag = "2")]
    pub deliver: u64,
    /// Position of the first row.
    #[prost(uint64, tag = "3")]
    pub pos: u64,
    /// Rows per hop.
    #[prost(uint32, tag = "4")]
    pub n_tokens: u32,
    /// Element type of the rows.
    #[prost(enumeration = "DType", tag = "5")]
    pub dtype: i32,
    /// Every hop's compute time, microseconds, in route order.
    #[prost(uint64, repeated, tag = "6")]
    pub compute_us: Vec<u64>,
}

/// Forget every position from `len` on.
#[derive(Clone, PartialEq, Message)]
pub struct TruncateMsg {
    /// Session id.
    #[prost(uint64, tag = "1")]
    pub session: u64,
    /// Positions to keep.
    #[prost(uint64, tag = "2")]
    pub len: u64,
}

/// Close a session and free its KV cache.
#[derive(Clone, PartialEq, Message)]
pub struct CloseMsg {
    /// Session id.
    #[prost(uint64, tag = "1")]
    pub session: u64,
}

/// The operation of a [`StageRequest`].
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum StageOp {
    /// Open a session.
    #[prost(message, tag = "2")]
    Open(OpenMsg),
    /// Forward rows.
    #[prost(message, tag = "3")]
    Forward(ForwardMsg),
    /// Truncate the KV cache.
    #[prost(message, tag = "4")]
    Truncate(TruncateMsg),
    /// Close the session.
    #[prost(message, tag = "5")]
    Close(CloseMsg),
}

/// A stage request (the `meta` of a [`STAGE_METHOD`] request).
#[derive(Clone, PartialEq, Message)]
pub struct StageRequest {
    /// [`STAGE_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// What to do.
    #[prost(oneof = "StageOp", tags = "2, 3, 4, 5")]
    pub op: Option<StageOp>,
}

/// A stage reply (the `meta` of the response; output rows in its `tensor`).
#[derive(Clone, PartialEq, Message)]
pub struct StageReply {
    /// [`STAGE_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The session the reply is about.
    #[prost(uint64, tag = "2")]
    pub session: u64,
    /// Positions the session holds after the operation.
    #[prost(uint64, tag = "3")]
    pub len: u64,
    /// [`ErrorCode::None`] on success.
    #[prost(enumeration = "ErrorCode", tag = "4")]
    pub error: i32,
    /// What went wrong, for people.
    #[prost(string, tag = "5")]
    pub message: String,
    /// Microseconds the stage spent computing (excludes queueing).
    #[prost(uint64, tag = "6")]
    pub compute_us: u64,
    /// Rows in the tensor.
    #[prost(uint32, tag = "7")]
    pub n_tokens: u32,
    /// Element type of the rows.
    #[prost(enumeration = "DType", tag = "8")]
    pub dtype: i32,
}

impl StageReply {
    /// A reply that reports `code` with `message`.
    pub fn failure(session: u64, code: ErrorCode, message: impl Into<String>) -> StageReply {
        StageReply {
            version: STAGE_VERSION,
            session,
            error: code as i32,
            message: message.into(),
            ..StageReply::default()
        }
    }

    /// The error code (unknown codes read as [`ErrorCode::Internal`]).
    pub fn code(&self) -> ErrorCode {
        ErrorCode::try_from(self.error).unwrap_or(ErrorCode::Internal)
    }
}

/// A request refused before it reached a session: the code and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Error code for the reply.
    pub code: ErrorCode,
    /// Message for the reply.
    pub message: String,
}

impl Refusal {
    fn new(code: ErrorCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
        }
    }
}

/// A decoded, range-checked stage request.
#[derive(Clone, Debug, PartialEq)]
pub enum StageCall {
    /// Open a session.
    Open {
        /// The model.
        model: ModelId,
        /// Its layers.
        layers: Range<u32>,
        /// KV positions.
        n_ctx: usize,
        /// Exact accumulation expected.
        exact: bool,
        /// LoRA adapters (id, finite scale), in order.
        adapters: Vec<(ModelId, f32)>,
    },
    /// Forward rows.
    Forward {
        /// Session id.
        session: u64,
        /// Position of the first row.
        pos: usize,
        /// Number of rows.
        n_tokens: usize,
        /// Element type of the rows on the wire.
        dtype: DType,
        /// The input rows as f32 (widened from f16 if that was the wire type).
        rows: Vec<f32>,
        /// Where to send the output instead of answering with it.
        push: Option<Push>,
    },
    /// Truncate to `len` positions.
    Truncate {
        /// Session id.
        session: u64,
        /// Positions kept.
        len: usize,
    },
    /// Close.
    Close {
        /// Session id.
        session: u64,
    },
}

/// What a pushed forward asks of the stage (see the module docs).
#[derive(Clone, Debug, PartialEq)]
pub struct Push {
    /// The later hops: peer and session.
    pub route: Vec<(PeerId, u64)>,
    /// The client's delivery id.
    pub deliver: u64,
    /// The session's owner, when a stage sent the request (`None`: the requester).
    pub origin: Option<PeerId>,
    /// Earlier hops' outputs, as they came (wire bytes).
    pub carried: Bytes,
    /// Their compute times.
    pub compute_us: Vec<u64>,
    /// How long to wait for the next hop's answer.
    pub timeout: Duration,
}

/// Decodes the `meta` and `tensor` of a stage request. Checks the version,
/// sizes and ranges; the row width against the model is the server's check.
/// Never panics; allocates at most `tensor.len() * 2` bytes.
pub fn decode_request(meta: &[u8], tensor: &[u8]) -> Result<StageCall, Refusal> {
    let msg = StageRequest::decode(meta)
        .map_err(|e| Refusal::new(ErrorCode::Malformed, format!("stage request: {e}")))?;
    if msg.version != STAGE_VERSION {
        return Err(Refusal::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "stage version {} is not supported (this node speaks {STAGE_VERSION})",
                msg.version
            ),
        ));
    }
    let op = msg
        .op
        .ok_or_else(|| Refusal::new(ErrorCode::Malformed, "stage request without an operation"))?;
    let no_tensor = |what: &str| {
        if tensor.is_empty() {
            Ok(())
        } else {
            Err(Refusal::new(
                ErrorCode::Malformed,
                format!(
                    "{what} carries no rows, found {} tensor bytes",
                    tensor.len()
                ),
            ))
        }
    };
    match op {
        StageOp::Open(o) => {
            no_tensor("open")?;
            let model: [u8; 32] = o.model.as_slice().try_into().map_err(|_| {
                Refusal::new(
                    ErrorCode::Malformed,
                    format!("model id: expected 32 bytes, found {}", o.model.len()),
                )
            })?;
            if o.layer_start >= o.layer_end || o.layer_end > MAX_LAYERS {
                return Err(Refusal::new(
                    ErrorCode::Malformed,
                    format!(
                        "layer range: expected a non-empty range below {MAX_LAYERS}, found {}..{}",
                        o.layer_start, o.layer_end
                    ),
                ));
            }
            if o.n_ctx == 0 || o.n_ctx > MAX_SESSION_CTX {
                return Err(Refusal::new(
                    ErrorCode::TooLarge,
                    format!(
                        "context: expected 1 to {MAX_SESSION_CTX} positions, found {}",
                        o.n_ctx
                    ),
                ));
            }
            if o.adapters.len() > MAX_SESSION_ADAPTERS {
                return Err(Refusal::new(
                    ErrorCode::TooLarge,
                    format!(
                        "adapters: at most {MAX_SESSION_ADAPTERS}, found {}",
                        o.adapters.len()
                    ),
                ));
            }
            let mut adapters = Vec::with_capacity(o.adapters.len());
            for a in &o.adapters {
                let id: [u8; 32] = a.id.as_slice().try_into().map_err(|_| {
                    Refusal::new(
                        ErrorCode::Malformed,
                        format!("adapter id: expected 32 bytes, found {}", a.id.len()),
                    )
                })?;
                if !a.scale.is_finite() {
                    return Err(Refusal::new(
                        ErrorCode::Malformed,
                        format!("adapter scale {} is not finite", a.scale),
                    ));
                }
                adapters.push((ModelId(id), a.scale));
            }
            Ok(StageCall::Open {
                model: ModelId(model),
                layers: o.layer_start..o.layer_end,
                n_ctx: o.n_ctx as usize,
                exact: o.exact,
                adapters,
            })
        }
        StageOp::Forward(f) => {
            let dtype = DType::try_from(f.dtype).map_err(|_| {
                Refusal::new(
                    ErrorCode::Malformed,
                    format!("dtype: expected 0 (f32) or 1 (f16), found {}", f.dtype),
                )
            })?;
            if f.n_tokens == 0 || f.n_tokens > MAX_BATCH_TOKENS {
                return Err(Refusal::new(
                    ErrorCode::TooLarge,
                    format!(
                        "batch: expected 1 to {MAX_BATCH_TOKENS} rows, found {}",
                        f.n_tokens
                    ),
                ));
            }
            if f.pos > MAX_SESSION_CTX {
                return Err(Refusal::new(
                    ErrorCode::ContextFull,
                    format!("position {} is past any session's context", f.pos),
                ));
            }
            let push = decode_push(&f)?;
            let chunks = push.as_ref().map_or(1, |_| f.carried as usize + 1);
            let row_bytes = f.n_tokens as usize * dtype.size() * chunks;
            if tensor.is_empty() || !tensor.len().is_multiple_of(row_bytes) {
                return Err(Refusal::new(
                    ErrorCode::BadShape,
                    format!(
                        "{} tensor bytes are not {chunks} x {} rows of {} values",
                        tensor.len(),
                        f.n_tokens,
                        dtype.size()
                    ),
                ));
            }
            let input_at = tensor.len() / chunks * (chunks - 1);
            Ok(StageCall::Forward {
                session: f.session,
                pos: f.pos as usize,
                n_tokens: f.n_tokens as usize,
                dtype,
                rows: decode_rows(&tensor[input_at..], dtype),
                // A stage's push keeps what it received (the earlier hops'
                // outputs, its input last); the client's first forward
                // carries only the client's own rows.
                push: push.map(|p| Push {
                    carried: match p.origin {
                        Some(_) => Bytes::copy_from_slice(tensor),
                        None => Bytes::new(),
                    },
                    ..p
                }),
            })
        }
        StageOp::Truncate(t) => {
            no_tensor("truncate")?;
            Ok(StageCall::Truncate {
                session: t.session,
                len: t.len.min(MAX_SESSION_CTX) as usize,
            })
        }
        StageOp::Close(c) => {
            no_tensor("close")?;
            Ok(StageCall::Close { session: c.session })
        }
    }
}

/// The push part of a forward, checked (`carried` left empty), or `None`
/// for an ordinary forward.
fn decode_push(f: &ForwardMsg) -> Result<Option<Push>, Refusal> {
    let pushed = f.deliver != 0;
    if !pushed {
        if !f.route.is_empty() || !f.origin.is_empty() || f.carried != 0 || !f.compute_us.is_empty()
        {
            return Err(Refusal::new(
                ErrorCode::Malformed,
                "a forward without a delivery id carries a route, origin or earlier rows",
            ));
        }
        return Ok(None);
    }
    if f.n_tokens > MAX_PUSH_TOKENS {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!(
                "pushed forward: at most {MAX_PUSH_TOKENS} rows, found {}",
                f.n_tokens
            ),
        ));
    }
    if f.route.len() > MAX_ROUTE || f.carried as usize > MAX_ROUTE {
        return Err(Refusal::new(
            ErrorCode::TooLarge,
            format!(
                "pushed forward: at most {MAX_ROUTE} hops, found a route of {} after {} carried",
                f.route.len(),
                f.carried
            ),
        ));
    }
    // From the client: no earlier hop. From a stage: every hop before this
    // one (those carried, and the one whose output is this input).
    let expected = match f.origin.is_empty() {
        true => 0,
        false => f.carried as usize + 1,
    };
    if f.compute_us.len() != expected || (f.origin.is_empty() && f.carried != 0) {
        return Err(Refusal::new(
            ErrorCode::Malformed,
            format!(
                "pushed forward: {} compute times and {} carried hops {} an origin",
                f.compute_us.len(),
                f.carried,
                if f.origin.is_empty() {
                    "without"
                } else {
                    "with"
                }
            ),
        ));
    }
    let peer = |bytes: &[u8], what: &str| {
        PeerId::from_bytes(bytes)
            .map_err(|e| Refusal::new(ErrorCode::Malformed, format!("{what} peer id: {e}")))
    };
    let mut route = Vec::with_capacity(f.route.len());
    for hop in &f.route {
        route.push((peer(&hop.peer, "route")?, hop.session));
    }
    let origin = match f.origin.as_slice() {
        [] => None,
        bytes => Some(peer(bytes, "origin")?),
    };
    Ok(Some(Push {
        route,
        deliver: f.deliver,
        origin,
        carried: Bytes::new(),
        compute_us: f.compute_us.clone(),
        timeout: Duration::from_millis(u64::from(f.timeout_ms.clamp(1, MAX_PUSH_TIMEOUT_MS))),
    }))
}

/// Longest a stage waits for the next hop of a pushed forward.
const MAX_PUSH_TIMEOUT_MS: u32 = 120_000;

/// Encodes a request for the wire: `(meta, tensor)`.
pub fn encode_request(op: StageOp, rows: Bytes) -> (Bytes, Bytes) {
    let msg = StageRequest {
        version: STAGE_VERSION,
        op: Some(op),
    };
    (Bytes::from(msg.encode_to_vec()), rows)
}

/// Rows as little-endian bytes of `dtype` (f16 rounds to nearest even).
pub fn encode_rows(rows: &[f32], dtype: DType) -> Bytes {
    let mut out = Vec::with_capacity(rows.len() * dtype.size());
    match dtype {
        DType::F32 => {
            for v in rows {
                out.extend_from_slice(&v.to_le_bytes());
            }
        }
        DType::F16 => {
            for v in rows {
                out.extend_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
    }
    Bytes::from(out)
}

/// Rows from little-endian bytes of `dtype` (a trailing partial element is ignored).
pub fn decode_rows(bytes: &[u8], dtype: DType) -> Vec<f32> {
    match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
    }
}

#[cfg(test)]
mod tests;
