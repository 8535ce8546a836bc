//! Adapter transfer: content-addressed chunks over request/response.
//!
//! A node holding adapters in an [`AdapterStore`] answers [`ADAPTER_METHOD`]
//! requests: a [`ChunkRequest`] (protobuf, in the request's `meta`) names an
//! adapter by hash and a byte range; the [`ChunkReply`] carries the file's
//! total size and the bytes in the response's `tensor`.
//!
//! ```proto
//! syntax = "proto3";
//! package mesh.adapter.v1;
//! message ChunkRequest { uint32 version = 1; bytes id = 2; uint64 offset = 3; uint32 len = 4; }
//! enum ChunkError { NONE = 0; NOT_FOUND = 1; BAD_RANGE = 2; MALFORMED = 3;
//!                   UNSUPPORTED_VERSION = 4; INTERNAL = 5; }
//! message ChunkReply { uint32 version = 1; ChunkError error = 2; string message = 3; uint64 total = 4; }
//! ```
//!
//! [`fetch`] asks peers in turn, [`FetchConfig::window`] chunks in flight at a
//! time, writes through [`AdapterStore::writer`] and keeps the file only if
//! its BLAKE3 hash is the id asked for: a peer that sends other bytes (or the
//! wrong size, or fails part-way) is reported and the next one asked from
//! the start, so a file is never assembled from two sources.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;

use super::store::AdapterStore;
use super::LedgerError;
use crate::engine::ModelId;
use crate::network::{InboundRequest, Network, PeerId, Request, Response};

/// Method name of the adapter transfer protocol.
pub const ADAPTER_METHOD: &str = "mesh/adapter/1";

/// Version of the chunk messages this build speaks.
pub const ADAPTER_VERSION: u32 = 1;

/// Largest chunk one request may ask for (4 MiB).
pub const MAX_CHUNK: u32 = 4 << 20;

/// A byte range of an adapter.
#[derive(Clone, PartialEq, Message)]
pub struct ChunkRequest {
    /// [`ADAPTER_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// The adapter's BLAKE3 hash, 32 bytes.
    #[prost(bytes = "vec", tag = "2")]
    pub id: Vec<u8>,
    /// First byte.
    #[prost(uint64, tag = "3")]
    pub offset: u64,
    /// Bytes wanted (1 to [`MAX_CHUNK`]); fewer come back at the end of the file.
    #[prost(uint32, tag = "4")]
    pub len: u32,
}

/// Why a chunk request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, prost::Enumeration)]
#[repr(i32)]
pub enum ChunkError {
    /// No error.
    None = 0,
    /// The node does not hold the adapter.
    NotFound = 1,
    /// Offset past the end, or a length of 0 or over [`MAX_CHUNK`].
    BadRange = 2,
    /// The request could not be decoded.
    Malformed = 3,
    /// Another version than [`ADAPTER_VERSION`].
    UnsupportedVersion = 4,
    /// Reading the file failed.
    Internal = 5,
}

/// The answer to a [`ChunkRequest`] (bytes in the response's tensor).
#[derive(Clone, PartialEq, Message)]
pub struct ChunkReply {
    /// [`ADAPTER_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// [`ChunkError::None`] on success.
    #[prost(enumeration = "ChunkError", tag = "2")]
    pub error: i32,
    /// What went wrong, for people.
    #[prost(string, tag = "3")]
    pub message: String,
    /// The adapter file's size.
    #[prost(uint64, tag = "4")]
    pub total: u64,
}

fn failure(error: ChunkError, message: impl Into<String>) -> (ChunkReply, Bytes) {
    (
        ChunkReply {
            version: ADAPTER_VERSION,
            error: error as i32,
            message: message.into(),
            total: 0,
        },
        Bytes::new(),
    )
}

/// Answers one chunk request from `store`. Never panics; reads at most
/// [`MAX_CHUNK`] bytes.
pub fn answer(store: &AdapterStore, meta: &[u8]) -> (ChunkReply, Bytes) {
    let req = match ChunkRequest::decode(meta) {
        Ok(r) => r,
        Err(e) => return failure(ChunkError::Malformed, format!("chunk request: {e}")),
    };
    if req.version != ADAPTER_VERSION {
        return failure(
            ChunkError::UnsupportedVersion,
            format!(
                "version {} (this node speaks {ADAPTER_VERSION})",
                req.version
            ),
        );
    }
    let Ok(id) = <[u8; 32]>::try_from(req.id.as_slice()) else {
        return failure(
            ChunkError::Malformed,
            format!("adapter id: expected 32 bytes, found {}", req.id.len()),
        );
    };
    let id = ModelId(id);
    let Some(total) = store.size(id) else {
        return failure(ChunkError::NotFound, format!("no adapter {id} here"));
    };
    if req.len == 0 || req.len > MAX_CHUNK || req.offset > total {
        return failure(
            ChunkError::BadRange,
            format!(
                "{} bytes at {}: the file has {total}, chunks are 1 to {MAX_CHUNK} bytes",
                req.len, req.offset
            ),
        );
    }
    match store.read_range(id, req.offset, req.len as usize) {
        Ok(bytes) => (
            ChunkReply {
                version: ADAPTER_VERSION,
                error: ChunkError::None as i32,
                message: String::new(),
                total,
            },
            Bytes::from(bytes),
        ),
        Err(e) => failure(ChunkError::Internal, e.to_string()),
    }
}

/// Answers [`ADAPTER_METHOD`] requests from `store` until the queue closes
/// (file reads on blocking threads).
pub async fn serve(store: AdapterStore, mut requests: mpsc::Receiver<InboundRequest>) {
    let store = Arc::new(store);
    while let Some(inbound) = requests.recv().await {
        let store = store.clone();
        tokio::task::spawn_blocking(move || {
            let (reply, tensor) = answer(&store, &inbound.request.meta);
            inbound.respond(Response {
                meta: Bytes::from(reply.encode_to_vec()),
                tensor,
            });
        });
    }
}

/// How [`fetch`] asks.
#[derive(Clone, Debug, PartialEq)]
pub struct FetchConfig {
    /// Bytes per request (at most [`MAX_CHUNK`]).
    pub chunk: u32,
    /// Requests in flight at once.
    pub window: usize,
    /// A request not answered within this fails that peer.
    pub timeout: Duration,
}

impl Default for FetchConfig {
    /// 1 MiB chunks, 4 in flight, 30 s per request.
    fn default() -> Self {
        FetchConfig {
            chunk: 1 << 20,
            window: 4,
            timeout: Duration::from_secs(30),
        }
    }
}

/// A fetched adapter.
#[derive(Clone, Debug, PartialEq)]
pub struct Fetched {
    /// Its file in the store.
    pub path: PathBuf,
    /// The peer that sent it (`None`: the store held it already).
    pub from: Option<PeerId>,
    /// Peers that failed first, and why (a wrong hash among them is a lie).
    pub failures: Vec<(PeerId, String)>,
}

/// Fetches adapter `id` of `size` bytes into `store` from the first of
/// `peers` that sends exactly those bytes (see the module docs). `progress`
/// gets (bytes received from the current peer, size).
pub async fn fetch(
    net: &Arc<dyn Network>,
    store: &AdapterStore,
    id: ModelId,
    size: u64,
    peers: &[PeerId],
    config: &FetchConfig,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Fetched, LedgerError> {
    if let Some(path) = store.get(id) {
        return Ok(Fetched {
            path,
            from: None,
            failures: Vec::new(),
        });
    }
    if size == 0 || size > super::record::MAX_ADAPTER_BYTES {
        return Err(LedgerError::Malformed(format!("adapter size {size}")));
    }
    let chunk = config.chunk.clamp(1, MAX_CHUNK);
    let mut failures = Vec::new();
    for &peer in peers {
        match fetch_from(net, store, id, size, peer, chunk, config, progress).await {
            Ok(path) => {
                return Ok(Fetched {
                    path,
                    from: Some(peer),
                    failures,
                })
            }
            Err(e) => {
                tracing::debug!("adapter {id} from {peer}: {e}");
                failures.push((peer, e.to_string()));
            }
        }
    }
    Err(LedgerError::Unavailable {
        adapter: id,
        failures,
    })
}

#[allow(clippy::too_many_arguments)]
async fn fetch_from(
    net: &Arc<dyn Network>,
    store: &AdapterStore,
    id: ModelId,
    size: u64,
    peer: PeerId,
    chunk: u32,
    config: &FetchConfig,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<PathBuf, LedgerError> {
    let mut writer = store.writer(id)?;
    let offsets = (0..size).step_by(chunk as usize);
    let requests = futures::stream::iter(offsets.map(|offset| {
        let net = net.clone();
        async move {
            let meta = ChunkRequest {
                version: ADAPTER_VERSION,
                id: id.0.to_vec(),
                offset,
                len: chunk,
            }
            .encode_to_vec();
            let request = Request {
                method: ADAPTER_METHOD.into(),
                meta: Bytes::from(meta),
                tensor: Bytes::new(),
            };
            (offset, net.request(peer, request, config.timeout).await)
        }
    }))
    .buffered(config.window.max(1));
    futures::pin_mut!(requests);
    while let Some((offset, response)) = requests.next().await {
        let response = response.map_err(|e| LedgerError::Peer(e.to_string()))?;
        let reply = ChunkReply::decode(response.meta.as_ref())
            .map_err(|e| LedgerError::Peer(format!("undecodable chunk reply: {e}")))?;
        if reply.error != ChunkError::None as i32 {
            let code = ChunkError::try_from(reply.error).unwrap_or(ChunkError::Internal);
            return Err(LedgerError::Peer(format!("{code:?}: {}", reply.message)));
        }
        let want = (size - offset).min(u64::from(chunk));
        if reply.total != size || response.tensor.len() as u64 != want {
            return Err(LedgerError::Peer(format!(
                "sent {} bytes at {offset} of a {}-byte file; expected {want} of {size}",
                response.tensor.len(),
                reply.total
            )));
        }
        writer.write(&response.tensor)?;
        progress(writer.written(), size);
    }
    writer.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn store() -> (AdapterStore, ModelId, Vec<u8>) {
        let dir = std::env::temp_dir().join(format!(
            "mesh-chunks-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let store = AdapterStore::open(dir).unwrap();
        let bytes: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let id = store.put(&bytes).unwrap();
        (store, id, bytes)
    }

    fn ask(
        store: &AdapterStore,
        id: &[u8],
        offset: u64,
        len: u32,
        version: u32,
    ) -> (ChunkReply, Bytes) {
        let meta = ChunkRequest {
            version,
            id: id.to_vec(),
            offset,
            len,
        }
        .encode_to_vec();
        answer(store, &meta)
    }

    #[test]
    fn ranges_and_refusals() {
        let (store, id, bytes) = store();
        let (r, b) = ask(&store, &id.0, 4000, 4096, ADAPTER_VERSION);
        assert_eq!((r.error, r.total), (0, 5000));
        assert_eq!(&b[..], &bytes[4000..]);
        let code = |r: (ChunkReply, Bytes)| ChunkError::try_from(r.0.error).unwrap();
        assert_eq!(code(ask(&store, &[1; 32], 0, 10, 1)), ChunkError::NotFound);
        assert_eq!(code(ask(&store, &[1; 31], 0, 10, 1)), ChunkError::Malformed);
        assert_eq!(code(ask(&store, &id.0, 5001, 10, 1)), ChunkError::BadRange);
        assert_eq!(code(ask(&store, &id.0, 0, 0, 1)), ChunkError::BadRange);
        assert_eq!(
            code(ask(&store, &id.0, 0, MAX_CHUNK + 1, 1)),
            ChunkError::BadRange
        );
        assert_eq!(
            code(ask(&store, &id.0, 0, 10, 2)),
            ChunkError::UnsupportedVersion
        );
        assert_eq!(
            ChunkError::try_from(answer(&store, b"\xff\xff").0.error).unwrap(),
            ChunkError::Malformed
        );
        let _ = std::fs::remove_dir_all(store.dir());
    }

    proptest! {
        #[test]
        fn answer_never_panics(meta in proptest::collection::vec(any::<u8>(), 0..80)) {
            static STORE: std::sync::OnceLock<(AdapterStore, ModelId, Vec<u8>)> =
                std::sync::OnceLock::new();
            let (store, _, _) = STORE.get_or_init(store);
            let (r, b) = answer(store, &meta);
            prop_assert!(b.len() <= MAX_CHUNK as usize);
            prop_assert!(r.error != 0 || r.total >= b.len() as u64);
        }
    }
}
