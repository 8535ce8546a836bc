//! Requests over long-lived libp2p streams (`/mesh-llm/rpc/1`).
//!
//! The request-response behaviour opens a new substream for every request
//! and passes each request and reply through the swarm task on both sides:
//! on loopback that is ~0.3 ms per round trip of bookkeeping, paid by every
//! pipeline hop and every private-mode helper call. Here a requester keeps a
//! few open streams per peer and writes one request frame, then reads one
//! reply frame, on a stream it holds alone; the data moves between the
//! connection's task and the caller directly.
//!
//! Frames are exactly request-response's (`wire::encode_request` /
//! `wire::encode_response` behind a 4-byte length), strictly alternating on
//! a stream. Limits are the same: oversized frames are drained and answered
//! `TooLarge`, the stream stays usable. A peer that does not speak the
//! protocol (another implementation, an older node) is remembered and asked
//! over request-response instead, as is any peer we cannot open a stream to
//! (request-response then reports the typed dial error).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use libp2p::{Stream, StreamProtocol};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::wire::{self, Frame};
use super::{
    InboundRequest, Limits, NetworkError, PeerId, RemoteStatus, Reply, Request, Response,
    DESCRIBE_METHOD,
};
use crate::{Error, Result};

/// The protocol of request streams.
pub const RPC_PROTOCOL: StreamProtocol = StreamProtocol::new("/mesh-llm/rpc/1");

/// Larger requests go over request-response: its codec reads in the
/// connection's own task, while a stream's reader is woken once per yamux
/// frame (16 KiB), which costs more than the per-request set-up from about
/// 256 KiB up (`cargo bench -p mesh-benches --bench network`: 2.3 KB 64 vs
/// 210 us, 100 KiB 372 vs 502 us, 256 KiB 888 vs 863 us, 1 MiB 4.8 vs 3.2 ms).
pub(crate) const MAX_STREAM_REQUEST: usize = 256 << 10;

/// Idle streams kept per peer (more concurrent requests open more streams;
/// the extra ones are closed when they come back).
const MAX_IDLE_PER_PEER: usize = 8;
/// A requester drops a stream idle this long (shorter than the server's, so
/// it never writes to a stream the server closed for idleness).
const CLIENT_IDLE: Duration = Duration::from_secs(30);
/// A server closes a stream with no request for this long.
const SERVER_IDLE: Duration = Duration::from_secs(90);
/// Streams served at once, over all peers; more are closed on arrival.
const MAX_SERVED: usize = 512;
/// Streams served at once for one peer (so one peer cannot take them all).
const MAX_SERVED_PER_PEER: usize = 64;

/// The methods this node answers and where their requests go; shared by the
/// swarm loop (request-response) and the stream server.
pub(crate) type Handlers = Arc<RwLock<HashMap<String, mpsc::Sender<InboundRequest>>>>;

/// Hands `request` to its method's handler; `Err` is the reply to send
/// instead (unknown method, handler queue full).
pub(crate) fn dispatch(
    handlers: &Handlers,
    peer: PeerId,
    request: Request,
) -> std::result::Result<oneshot::Receiver<Reply>, Reply> {
    let unknown = |method: &str| {
        Reply::Err(
            RemoteStatus::UnknownMethod,
            format!("no handler for {method:?}"),
        )
    };
    let handler = match handlers.read() {
        Ok(h) => h.get(&request.method).cloned(),
        Err(_) => None,
    };
    let Some(handler) = handler else {
        return Err(unknown(&request.method));
    };
    let (tx, rx) = oneshot::channel();
    match handler.try_send(InboundRequest::new(peer, request, tx)) {
        Ok(()) => Ok(rx),
        Err(mpsc::error::TrySendError::Full(_)) => {
            Err(Reply::Err(RemoteStatus::Busy, "handler queue full".into()))
        }
        Err(mpsc::error::TrySendError::Closed(r)) => {
            let method = r.request.method.clone();
            drop(r);
            if let Ok(mut h) = handlers.write() {
                if h.get(&method).is_some_and(|h| h.is_closed()) {
                    h.remove(&method);
                }
            }
            Err(unknown(&method))
        }
    }
}

/// A received request frame, decoded, or the error reply it gets.
pub(crate) fn parse_request(
    frame: Frame,
    limit: usize,
) -> std::result::Result<Request, (RemoteStatus, String)> {
    match frame {
        Frame::Oversized { size } => Err((
            RemoteStatus::TooLarge,
            format!("request of {size} bytes exceeds the limit of {limit} bytes"),
        )),
        Frame::Body(body) => match wire::decode_request(body, limit) {
            Ok(r) => Ok(r),
            Err(Error::Network(NetworkError::UnsupportedVersion { found, supported })) => Err((
                RemoteStatus::UnsupportedVersion,
                format!("wire version {found} is not supported (this node speaks {supported})"),
            )),
            Err(e) => Err((RemoteStatus::Malformed, e.to_string())),
        },
    }
}

/// The frame body of a reply (`None`: the handler dropped the request).
pub(crate) fn reply_body(reply: Option<&Reply>, limit: usize) -> Bytes {
    match reply {
        Some(Reply::Ok(r)) => wire::encode_response(Ok(r), limit),
        Some(Reply::Err(status, message)) => wire::encode_response(Err((*status, message)), limit),
        None => wire::encode_response(
            Err((RemoteStatus::Rejected, "handler dropped the request")),
            limit,
        ),
    }
}

/// Serves request streams until the node stops: one task per stream, each
/// answering its requests in order.
pub(crate) fn serve(
    mut control: libp2p_stream::Control,
    handlers: Handlers,
    banned: Arc<Mutex<HashSet<PeerId>>>,
    limits: Limits,
) -> Result<JoinHandle<()>> {
    let mut incoming = control
        .accept(RPC_PROTOCOL)
        .map_err(|e| NetworkError::Transport(format!("{RPC_PROTOCOL}: {e}")))?;
    Ok(tokio::spawn(async move {
        let served = Served::default();
        while let Some((peer, stream)) = incoming.next().await {
            let is_banned = banned.lock().map(|b| b.contains(&peer)).unwrap_or(true);
            let slot = if is_banned { None } else { served.take(peer) };
            let Some(slot) = slot else {
                tracing::debug!("closing a request stream from {peer} (banned or at a limit)");
                continue;
            };
            let (handlers, limits) = (handlers.clone(), limits.clone());
            tokio::spawn(async move {
                serve_stream(peer, stream, &handlers, &limits).await;
                drop(slot);
            });
        }
    }))
}

/// Streams being served, by peer.
#[derive(Clone, Default)]
struct Served(Arc<Mutex<HashMap<PeerId, usize>>>);

/// One served stream's place in [`Served`], given back on drop.
struct ServedSlot {
    served: Served,
    peer: PeerId,
}

impl Served {
    /// A place for one more stream from `peer`, if the limits allow.
    fn take(&self, peer: PeerId) -> Option<ServedSlot> {
        let mut counts = self.0.lock().ok()?;
        let total: usize = counts.values().sum();
        let mine = counts.get(&peer).copied().unwrap_or(0);
        if total >= MAX_SERVED || mine >= MAX_SERVED_PER_PEER {
            return None;
        }
        *counts.entry(peer).or_default() += 1;
        Some(ServedSlot {
            served: self.clone(),
            peer,
        })
    }
}

impl Drop for ServedSlot {
    fn drop(&mut self) {
        if let Ok(mut counts) = self.served.0.lock() {
            if let Some(n) = counts.get_mut(&self.peer) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&self.peer);
                }
            }
        }
    }
}

async fn serve_stream(peer: PeerId, mut stream: Stream, handlers: &Handlers, limits: &Limits) {
    loop {
        let read = wire::read_frame(&mut stream, limits.max_request_bytes, "request");
        let frame = match tokio::time::timeout(SERVER_IDLE, read).await {
            Ok(Ok(frame)) => frame,
            // Closed, broken, undrainable or idle: end the stream.
            _ => return,
        };
        let reply = match parse_request(frame, limits.max_request_bytes) {
            Err((status, message)) => Some(Reply::Err(status, message)),
            Ok(r) if r.method == DESCRIBE_METHOD => Some(Reply::Err(
                RemoteStatus::UnknownMethod,
                format!("{DESCRIBE_METHOD} is answered over request-response only"),
            )),
            Ok(request) => match dispatch(handlers, peer, request) {
                Ok(rx) => rx.await.ok(),
                Err(reply) => Some(reply),
            },
        };
        let body = reply_body(reply.as_ref(), limits.max_response_bytes);
        if wire::write_frame(&mut stream, &body).await.is_err() {
            return;
        }
    }
}

/// The requesting side: idle streams per peer, and the peers that do not
/// speak the protocol.
pub(crate) struct StreamClient {
    control: libp2p_stream::Control,
    idle: Mutex<HashMap<PeerId, Vec<(Stream, Instant)>>>,
    unsupported: Mutex<HashSet<PeerId>>,
    limits: Limits,
    opened: AtomicUsize,
    reused: AtomicUsize,
    fallbacks: AtomicUsize,
}

/// How requests went out over streams so far (see [`P2pNetwork::stream_stats`](super::p2p::P2pNetwork::stream_stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StreamStats {
    /// Streams opened.
    pub opened: usize,
    /// Requests sent on a stream opened by an earlier request.
    pub reused: usize,
    /// Requests sent over request-response because the peer does not speak
    /// [`RPC_PROTOCOL`] or no stream could be opened.
    pub fallbacks: usize,
}

/// Where a round trip on a stream failed.
enum Failed {
    /// Writing the request: nothing was answered (on a pooled stream this
    /// is a stream the connection lost; try a fresh one).
    Write,
    /// The stream ended (or was reset) before the first byte of a reply:
    /// the request was not taken (libp2p-stream drops inbound streams an
    /// application has not accepted yet, and servers close streams over
    /// their limits on arrival), so it may be sent again another way.
    Unanswered,
    /// Reading the reply failed part-way.
    Read(std::io::Error),
}

/// Counts the bytes read through it (to tell [`Failed::Unanswered`] apart).
struct Counting<'a> {
    inner: &'a mut Stream,
    read: usize,
}

impl futures::AsyncRead for Counting<'_> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut *this.inner).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = polled {
            this.read += n;
        }
        polled
    }
}

impl StreamClient {
    pub(crate) fn new(control: libp2p_stream::Control, limits: Limits) -> Self {
        StreamClient {
            control,
            idle: Mutex::new(HashMap::new()),
            unsupported: Mutex::new(HashSet::new()),
            limits,
            opened: AtomicUsize::new(0),
            reused: AtomicUsize::new(0),
            fallbacks: AtomicUsize::new(0),
        }
    }

    pub(crate) fn stats(&self) -> StreamStats {
        StreamStats {
            opened: self.opened.load(Ordering::Relaxed),
            reused: self.reused.load(Ordering::Relaxed),
            fallbacks: self.fallbacks.load(Ordering::Relaxed),
        }
    }

    /// Sends an encoded request to `peer` on a stream and reads the reply.
    /// `None`: streams are not possible with this peer; use request-response.
    pub(crate) async fn request(&self, peer: PeerId, body: &Bytes) -> Option<Result<Response>> {
        if self
            .unsupported
            .lock()
            .map(|u| u.contains(&peer))
            .unwrap_or(true)
        {
            self.fallbacks.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        if let Some(stream) = self.take_idle(peer) {
            self.reused.fetch_add(1, Ordering::Relaxed);
            match self.exchange(peer, stream, body).await {
                // A dead pooled stream (or one the server closed as idle
                // while the request went out): open a fresh one.
                Err(Failed::Write | Failed::Unanswered) => {}
                other => return Some(self.finish(peer, other)),
            }
        }
        let stream = match self.control.clone().open_stream(peer, RPC_PROTOCOL).await {
            Ok(s) => {
                self.opened.fetch_add(1, Ordering::Relaxed);
                s
            }
            Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) => {
                if let Ok(mut u) = self.unsupported.lock() {
                    u.insert(peer);
                }
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            Err(e) => {
                tracing::debug!("no request stream to {peer}: {e}");
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                return None;
            }
        };
        match self.exchange(peer, stream, body).await {
            Err(Failed::Write | Failed::Unanswered) => {
                // Not taken (the stream was dropped on arrival, see
                // `Failed::Unanswered`): request-response delivers it instead.
                tracing::debug!(
                    "request stream to {peer} dropped unanswered; using request-response"
                );
                self.fallbacks.fetch_add(1, Ordering::Relaxed);
                None
            }
            result => Some(self.finish(peer, result)),
        }
    }

    fn finish(
        &self,
        peer: PeerId,
        result: std::result::Result<Result<Response>, Failed>,
    ) -> Result<Response> {
        match result {
            Ok(reply) => reply,
            // The stream (or its connection) closed before a reply, as
            // request-response reports it.
            Err(Failed::Write | Failed::Unanswered) => {
                Err(NetworkError::ConnectionClosed { peer }.into())
            }
            Err(Failed::Read(e)) => {
                tracing::debug!("request stream to {peer} failed: {e}");
                Err(wire::network_error_of(&e)
                    .unwrap_or(NetworkError::ConnectionClosed { peer })
                    .into())
            }
        }
    }

    /// One request and its reply on `stream` (the outer error: the exchange
    /// failed; the inner result: the reply, possibly a remote error). The
    /// stream goes back to the pool only after a complete exchange: a
    /// cancelled or failed one may leave a reply in flight on it.
    async fn exchange(
        &self,
        peer: PeerId,
        mut stream: Stream,
        body: &Bytes,
    ) -> std::result::Result<Result<Response>, Failed> {
        if wire::write_frame(&mut stream, body).await.is_err() {
            return Err(Failed::Write);
        }
        let limit = self.limits.max_response_bytes;
        let mut counting = Counting {
            inner: &mut stream,
            read: 0,
        };
        let frame = match wire::read_frame(&mut counting, limit, "response").await {
            Ok(frame) => frame,
            Err(_) if counting.read == 0 => return Err(Failed::Unanswered),
            Err(e) => return Err(Failed::Read(e)),
        };
        self.put_idle(peer, stream);
        Ok(match frame {
            Frame::Body(b) => wire::decode_response(b, limit, peer),
            Frame::Oversized { size } => Err(NetworkError::TooLarge {
                what: "response",
                size,
                limit: limit as u64,
            }
            .into()),
        })
    }

    fn take_idle(&self, peer: PeerId) -> Option<Stream> {
        let mut idle = self.idle.lock().ok()?;
        let list = idle.get_mut(&peer)?;
        let stream = list.pop().map(|(s, _)| s);
        if list.is_empty() {
            idle.remove(&peer);
        }
        stream
    }

    /// Closes the streams idle for [`CLIENT_IDLE`] (they would keep their
    /// connections open, and the server closes them soon after).
    pub(crate) fn prune(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            let now = Instant::now();
            idle.retain(|_, list| {
                list.retain(|(_, since)| now.duration_since(*since) < CLIENT_IDLE);
                !list.is_empty()
            });
        }
    }

    fn put_idle(&self, peer: PeerId, stream: Stream) {
        if let Ok(mut idle) = self.idle.lock() {
            let list = idle.entry(peer).or_default();
            if list.len() < MAX_IDLE_PER_PEER {
                list.push((stream, Instant::now()));
            }
        }
    }

    /// Closes every idle stream to `peer` (banned, or the node stops).
    pub(crate) fn forget(&self, peer: Option<PeerId>) {
        if let Ok(mut idle) = self.idle.lock() {
            match peer {
                Some(p) => {
                    idle.remove(&p);
                }
                None => idle.clear(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn served_streams_are_capped_per_peer_and_in_all() {
        let served = Served::default();
        let (a, b) = (PeerId::random(), PeerId::random());
        let mut held: Vec<ServedSlot> = (0..MAX_SERVED_PER_PEER)
            .map(|_| served.take(a).expect("under the per-peer limit"))
            .collect();
        assert!(served.take(a).is_none(), "one peer past its limit");
        let other = served.take(b).expect("another peer still served");
        drop(held.pop());
        assert!(served.take(a).is_some(), "a slot given back is free again");
        drop((held, other));
        assert!(served.0.lock().unwrap().is_empty());
        // The total cap holds over many peers.
        let all: Vec<ServedSlot> = (0..MAX_SERVED)
            .map(|_| served.take(PeerId::random()).expect("under the total"))
            .collect();
        assert!(served.take(PeerId::random()).is_none(), "past the total");
        drop(all);
        assert!(served.0.lock().unwrap().is_empty());
    }
}
