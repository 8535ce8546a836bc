//! Finding peers and moving tensors between them.
//!
//! [`Network`] is the seam: the Delegator and the `Node` facade only see this
//! trait. Two implementations:
//!
//! * [`p2p::P2pNetwork`] on libp2p (TCP and QUIC, noise, yamux, identify, ping,
//!   Kademlia, gossipsub, request-response with our own codec, optional mDNS,
//!   relay client + dcutr + autonat). One `tokio::select!` loop owns the swarm;
//!   the handle talks to it over bounded channels.
//! * [`memory::MemoryNetwork`]: no sockets; per-link latency, bandwidth, loss
//!   and partitions, deterministic with a seed. For tests and simulations of
//!   hundreds of nodes.
//!
//! What a node serves is an [`Announcement`]: a model id (BLAKE3 of the GGUF),
//! a layer range `a..b`, free memory and measured tokens/s. Providers are found
//! per model or per layer ([`Network::find_providers`]); the answer carries the
//! provider's own description of what it serves, asked for directly
//! ([`DESCRIBE_METHOD`]).
//!
//! Requests are typed by a method name and carry two payloads: `meta` (a
//! protobuf message the method defines) and `tensor` (raw little-endian
//! bytes). Sizes are checked before anything is allocated ([`Limits`]); a
//! message over the limit is [`NetworkError::TooLarge`] on both sides.

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::model_id::ModelId;
use crate::Result;

pub mod identity;
pub mod keys;
pub mod memory;
pub mod p2p;
pub mod sim;
mod streams;
pub mod wire;

pub use identity::Identity;
pub use libp2p::{Multiaddr, PeerId};

/// Method name of the built-in request that returns a node's announcements
/// (answered by every implementation; handlers cannot claim it).
pub const DESCRIBE_METHOD: &str = "mesh/describe";

/// Gossip topic on which nodes publish what they serve (and withdraw it).
pub const ANNOUNCE_TOPIC: &str = "mesh-llm/announce/1";

/// What a node serves: a contiguous range of layers of one model.
#[derive(Clone, Debug, PartialEq)]
pub struct Announcement {
    /// The model (BLAKE3 of its GGUF file).
    pub model: ModelId,
    /// Layers served, `start..end` (end exclusive); `0..n_layers` is the whole model.
    pub layers: Range<u32>,
    /// Memory the node still has free, in bytes.
    pub free_memory: u64,
    /// Measured decode throughput for this range, tokens per second.
    pub tokens_per_sec: f32,
}

impl Announcement {
    /// Checks the range is non-empty and not absurdly large.
    pub fn validate(&self) -> Result<()> {
        if self.layers.start >= self.layers.end || self.layers.end > wire::MAX_LAYERS {
            return Err(NetworkError::Malformed(format!(
                "announcement: expected a non-empty layer range below {}, found {}..{}",
                wire::MAX_LAYERS,
                self.layers.start,
                self.layers.end
            ))
            .into());
        }
        if !self.tokens_per_sec.is_finite() || self.tokens_per_sec < 0.0 {
            return Err(NetworkError::Malformed(format!(
                "announcement: expected a finite, non-negative tokens/s, found {}",
                self.tokens_per_sec
            ))
            .into());
        }
        Ok(())
    }
}

/// A peer that serves (part of) a model, as found by [`Network::find_providers`].
#[derive(Clone, Debug, PartialEq)]
pub struct Provider {
    /// The provider.
    pub peer_id: PeerId,
    /// Layers it serves.
    pub layers: Range<u32>,
    /// Addresses it listens on (as it reports them).
    pub addrs: Vec<Multiaddr>,
    /// Free memory it reports, bytes.
    pub free_memory: u64,
    /// Throughput it reports, tokens per second.
    pub tokens_per_sec: f32,
}

/// A request: a method name and two payloads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Request {
    /// Which handler answers it (see [`Network::handle`]).
    pub method: String,
    /// Method-defined metadata (usually a protobuf message).
    pub meta: Bytes,
    /// Raw little-endian tensor bytes.
    pub tensor: Bytes,
}

/// A successful reply.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Response {
    /// Method-defined metadata.
    pub meta: Bytes,
    /// Raw little-endian tensor bytes.
    pub tensor: Bytes,
}

/// Why a remote peer did not answer a request with a [`Response`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteStatus {
    /// No handler for the method on that peer.
    UnknownMethod,
    /// The handler refused the request (its message says why).
    Rejected,
    /// The request exceeded the peer's size limit.
    TooLarge,
    /// The peer does not speak our wire version.
    UnsupportedVersion,
    /// The peer could not decode the request.
    Malformed,
    /// The handler's queue was full.
    Busy,
}

impl fmt::Display for RemoteStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RemoteStatus::UnknownMethod => "unknown method",
            RemoteStatus::Rejected => "rejected",
            RemoteStatus::TooLarge => "too large",
            RemoteStatus::UnsupportedVersion => "unsupported version",
            RemoteStatus::Malformed => "malformed",
            RemoteStatus::Busy => "busy",
        })
    }
}

/// A request that arrived for a method this node handles. Answer it with
/// [`InboundRequest::respond`] or [`InboundRequest::reject`]; dropping it
/// answers "rejected: handler dropped the request".
#[derive(Debug)]
pub struct InboundRequest {
    /// Who sent it (authenticated by the transport).
    pub peer: PeerId,
    /// The request.
    pub request: Request,
    reply: Option<oneshot::Sender<Reply>>,
}

/// What a handler answered (crate-internal: transports turn it into a frame).
#[derive(Debug)]
pub(crate) enum Reply {
    Ok(Response),
    Err(RemoteStatus, String),
}

impl InboundRequest {
    /// Wraps a request with the channel its reply goes back on.
    pub(crate) fn new(peer: PeerId, request: Request, reply: oneshot::Sender<Reply>) -> Self {
        InboundRequest {
            peer,
            request,
            reply: Some(reply),
        }
    }

    /// Sends `response` back to the requester.
    pub fn respond(mut self, response: Response) {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(Reply::Ok(response));
        }
    }

    /// Refuses the request; the requester gets [`NetworkError::Remote`] with
    /// [`RemoteStatus::Rejected`] and `message`.
    pub fn reject(mut self, message: impl Into<String>) {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(Reply::Err(RemoteStatus::Rejected, message.into()));
        }
    }
}

impl Drop for InboundRequest {
    fn drop(&mut self) {
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(Reply::Err(
                RemoteStatus::Rejected,
                "handler dropped the request".into(),
            ));
        }
    }
}

/// A gossip message delivered to a subscriber (it passed the topic's validator).
#[derive(Clone, Debug, PartialEq)]
pub struct GossipMessage {
    /// The peer that published it (signed by it).
    pub source: PeerId,
    /// Topic name.
    pub topic: String,
    /// Payload.
    pub data: Bytes,
}

/// What a topic validator decides about a gossip message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validation {
    /// Deliver and forward.
    Accept,
    /// Drop, do not forward, and count it against the peer that sent it.
    Reject,
    /// Drop and do not forward, without penalty.
    Ignore,
}

/// A topic validator, called with the message's publisher (not the neighbour
/// that forwarded it) and its data. It runs on the network loop for every
/// message of its topic, so it must be fast and must not block.
pub type Validator = Arc<dyn Fn(&PeerId, &[u8]) -> Validation + Send + Sync>;

/// Something that happened on the network ([`Network::events`]).
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A new listen address.
    Listening {
        /// The address.
        addr: Multiaddr,
    },
    /// First connection to a peer established.
    PeerConnected {
        /// The peer.
        peer: PeerId,
    },
    /// Last connection to a peer closed.
    PeerDisconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A peer announced or withdrew (part of) a model.
    ProvidersChanged {
        /// The model.
        model: ModelId,
        /// The peer.
        peer: PeerId,
        /// The layers it now serves (`None`: withdrawn).
        layers: Option<Range<u32>>,
    },
    /// A round-trip time measured to a peer.
    Rtt {
        /// The peer.
        peer: PeerId,
        /// Round-trip time.
        rtt: Duration,
    },
}

/// Size and connection limits. All sizes are in bytes and are enforced before
/// allocating: a frame's length prefix is checked first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request (method + meta + tensor, encoded) sent or accepted.
    pub max_request_bytes: usize,
    /// Largest response sent or accepted.
    pub max_response_bytes: usize,
    /// Largest gossip message.
    pub max_gossip_bytes: usize,
    /// Established connections in total.
    pub max_connections: u32,
    /// Established connections per peer.
    pub max_connections_per_peer: u32,
    /// Requests queued per handler before the node answers "busy".
    pub handler_queue: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 64 << 20,
            max_response_bytes: 64 << 20,
            max_gossip_bytes: 1 << 20,
            max_connections: 256,
            max_connections_per_peer: 4,
            handler_queue: 64,
        }
    }
}

/// Errors of the network layer.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum NetworkError {
    /// An operation did not finish before its deadline.
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// The deadline.
        after: Duration,
    },
    /// A peer or address could not be reached.
    #[error("dial {target}: {reason}")]
    Dial {
        /// Peer id or address.
        target: String,
        /// Why.
        reason: String,
    },
    /// The connection to the peer closed before the reply arrived.
    #[error("connection to {peer} closed before the reply")]
    ConnectionClosed {
        /// The peer.
        peer: PeerId,
    },
    /// A message is larger than the limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Which message.
        what: &'static str,
        /// Its size (or announced size).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A message carries a wire version this build does not speak.
    #[error("wire version {found} is not supported (this build speaks {supported})")]
    UnsupportedVersion {
        /// Version found.
        found: u32,
        /// Version supported.
        supported: u32,
    },
    /// A message could not be decoded or is invalid.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The remote peer answered with an error.
    #[error("{peer} answered {status}: {message}")]
    Remote {
        /// The peer.
        peer: PeerId,
        /// Its status.
        status: RemoteStatus,
        /// Its message.
        message: String,
    },
    /// The peer is banned by this node.
    #[error("peer {0} is banned")]
    Banned(PeerId),
    /// A method name is invalid or already handled.
    #[error("method {method:?}: {reason}")]
    Method {
        /// The method.
        method: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// Publishing or subscribing to gossip failed.
    #[error("gossip: {0}")]
    Gossip(String),
    /// A DHT operation failed.
    #[error("dht: {0}")]
    Dht(String),
    /// A transport (listen, socket) failed.
    #[error("transport: {0}")]
    Transport(String),
    /// The node has shut down (or its loop stopped).
    #[error("the network node has shut down")]
    Shutdown,
}

impl From<NetworkError> for crate::Error {
    fn from(e: NetworkError) -> Self {
        crate::Error::Network(e)
    }
}

/// A node on a network: identity, discovery, gossip, request/response, events.
///
/// Implementations are cheap handles (`Send + Sync`); every method may be
/// called from any task. Futures are cancel-safe: dropping one abandons the
/// operation (a request's reply is then discarded).
#[async_trait]
pub trait Network: Send + Sync {
    /// This node's peer id.
    fn local_peer_id(&self) -> PeerId;

    /// Addresses this node listens on now.
    async fn listen_addrs(&self) -> Result<Vec<Multiaddr>>;

    /// Connects to a peer at `addr` (with or without a trailing `/p2p/<id>`).
    /// The peer may still close the connection right after (e.g. when it is
    /// over its connection limit): [`Event::PeerDisconnected`] then follows.
    async fn dial(&self, addr: Multiaddr) -> Result<()>;

    /// Peers with an established connection.
    async fn connected_peers(&self) -> Result<Vec<PeerId>>;

    /// Announces that this node serves `announcement` (replacing an earlier
    /// announcement of the same model): provider records for the model and
    /// for each layer, and a gossip message on [`ANNOUNCE_TOPIC`].
    async fn announce(&self, announcement: Announcement) -> Result<()>;

    /// Withdraws the announcement of `model` (no-op if there is none).
    async fn withdraw(&self, model: ModelId) -> Result<()>;

    /// Providers of `model`, or of the one layer `layer` of it, each with the
    /// range it serves. Waits at most `timeout`; an empty list is not an error.
    async fn find_providers(
        &self,
        model: ModelId,
        layer: Option<u32>,
        timeout: Duration,
    ) -> Result<Vec<Provider>>;

    /// Subscribes to a gossip topic. Every subscriber gets every accepted
    /// message; a subscriber that falls behind its bounded queue misses messages.
    async fn subscribe(&self, topic: &str) -> Result<mpsc::Receiver<GossipMessage>>;

    /// Installs the validator of a topic: messages it does not accept are
    /// neither delivered nor forwarded.
    async fn set_validator(&self, topic: &str, validator: Validator) -> Result<()>;

    /// Publishes `data` on `topic` (this node need not be subscribed). With no
    /// subscribed peer the message reaches no one; that is not an error.
    async fn publish(&self, topic: &str, data: Bytes) -> Result<()>;

    /// Starts handling `method`: requests for it arrive on the returned
    /// queue (bounded by [`Limits::handler_queue`]; when it is full the
    /// requester gets [`RemoteStatus::Busy`]).
    async fn handle(&self, method: &str) -> Result<mpsc::Receiver<InboundRequest>>;

    /// Sends `request` to `peer` and awaits its response for at most `timeout`.
    async fn request(&self, peer: PeerId, request: Request, timeout: Duration) -> Result<Response>;

    /// The latest round-trip time measured to `peer`, if any.
    async fn rtt(&self, peer: PeerId) -> Result<Option<Duration>>;

    /// The remote addresses of the open connections to `peer`: where the
    /// transport sees it, not what it announces (used to tell peers on the
    /// same network apart). Empty when not connected or when the transport
    /// has no addresses (the default).
    async fn peer_addrs(&self, peer: PeerId) -> Result<Vec<Multiaddr>> {
        let _ = peer;
        Ok(Vec::new())
    }

    /// Disconnects `peer` and refuses it from now on.
    async fn ban(&self, peer: PeerId) -> Result<()>;

    /// A new receiver of [`Event`]s (bounded; a lagging receiver skips events).
    fn events(&self) -> broadcast::Receiver<Event>;

    /// Withdraws every announcement, closes all connections and stops the
    /// node. Later calls fail with [`NetworkError::Shutdown`].
    async fn shutdown(&self) -> Result<()>;
}

/// What changed between two announcement lists of one peer: each model whose
/// served range differs, with its new range (`None`: withdrawn). Both
/// implementations turn announce gossip into [`Event::ProvidersChanged`] with it.
pub(crate) fn announcement_changes(
    old: &[Announcement],
    new: &[Announcement],
) -> Vec<(ModelId, Option<Range<u32>>)> {
    let mut models: Vec<ModelId> = old.iter().chain(new).map(|a| a.model).collect();
    models.sort();
    models.dedup();
    let range = |list: &[Announcement], m: ModelId| {
        list.iter().find(|a| a.model == m).map(|a| a.layers.clone())
    };
    models
        .into_iter()
        .filter_map(|m| {
            let after = range(new, m);
            (range(old, m) != after).then_some((m, after))
        })
        .collect()
}

/// Longest gossip topic name, in bytes (both implementations).
pub const MAX_TOPIC_LEN: usize = 256;

/// Checks a gossip topic name (both implementations): 1 to
/// [`MAX_TOPIC_LEN`] bytes without control characters.
pub(crate) fn check_topic(topic: &str) -> Result<()> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN || topic.chars().any(char::is_control) {
        return Err(NetworkError::Gossip(format!(
            "topic {:?}: expected 1 to {MAX_TOPIC_LEN} bytes without control characters",
            topic.chars().take(80).collect::<String>()
        ))
        .into());
    }
    Ok(())
}

/// Checks a method name handlers may claim: 1..=64 printable ASCII bytes, not
/// a built-in method.
pub(crate) fn check_method(method: &str) -> Result<()> {
    let bad = |reason: &str| {
        Err(NetworkError::Method {
            method: method.chars().take(80).collect(),
            reason: reason.into(),
        }
        .into())
    };
    if method.is_empty() || method.len() > wire::MAX_METHOD_LEN {
        return bad("expected 1 to 64 bytes");
    }
    if !method.bytes().all(|b| b.is_ascii_graphic()) {
        return bad("expected printable ASCII without spaces");
    }
    if method == DESCRIBE_METHOD {
        return bad("built in");
    }
    Ok(())
}
