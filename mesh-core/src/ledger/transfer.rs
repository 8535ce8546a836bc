//! File transfer: content-addressed chunks over request/response.
//!
//! A node answers [`ADAPTER_METHOD`] requests for the files it [`Offered`]:
//! adapters in its [`AdapterStore`] and the GGUF files of the models it
//! serves (so a peer can run a model it knows only by id). A
//! [`ChunkRequest`] (protobuf, in the request's `meta`) names a file by its
//! BLAKE3 hash and a byte range; the [`ChunkReply`] carries the file's total
//! size and the bytes in the response's `tensor`.
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
//! [`fetch`] (size known, e.g. from an update record) and [`fetch_any_size`]
//! (size learned from the first reply, up to a limit) ask peers in turn, [`FetchConfig::window`] chunks in flight at a
//! time, writes through [`AdapterStore::writer`] and keeps the file only if
//! its BLAKE3 hash is the id asked for: a peer that sends other bytes (or the
//! wrong size, or fails part-way) is reported and the next one asked from
//! the start, so a file is never assembled from two sources.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tokio::sync::mpsc;

use super::store::AdapterStore;
use super::LedgerError;
use crate::engine::{Engine, GgmlEngine, ModelId};
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

/// The files a node sends to peers that ask: an [`AdapterStore`]'s and the
/// GGUF files of loaded models (sent from the engine's mapping, i.e. the
/// bytes its id is the hash of). Cheap to clone; clones share the set.
#[derive(Clone, Default)]
pub struct Offered {
    inner: Arc<RwLock<OfferedFiles>>,
}

#[derive(Default)]
struct OfferedFiles {
    store: Option<AdapterStore>,
    models: HashMap<ModelId, Arc<GgmlEngine>>,
}

impl std::fmt::Debug for Offered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let files = self.read();
        f.debug_struct("Offered")
            .field("store", &files.store)
            .field("models", &files.models.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl From<AdapterStore> for Offered {
    fn from(store: AdapterStore) -> Offered {
        let offered = Offered::default();
        offered.set_store(store);
        offered
    }
}

impl Offered {
    /// Offers every file in `store` (replacing a store offered before).
    pub fn set_store(&self, store: AdapterStore) {
        self.write().store = Some(store);
    }

    /// Offers the GGUF file of `engine`'s model, under its id.
    pub fn add_model(&self, engine: Arc<GgmlEngine>) {
        self.write().models.insert(engine.info().id, engine);
    }

    /// Whether file `id` is offered.
    pub fn contains(&self, id: ModelId) -> bool {
        self.size(id).is_some()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, OfferedFiles> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, OfferedFiles> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn size(&self, id: ModelId) -> Option<u64> {
        let files = self.read();
        if let Some(engine) = files.models.get(&id) {
            return Some(engine.file_bytes().len() as u64);
        }
        files.store.as_ref().and_then(|s| s.size(id))
    }

    fn read_range(&self, id: ModelId, offset: u64, len: usize) -> Result<Vec<u8>, LedgerError> {
        let files = self.read();
        if let Some(engine) = files.models.get(&id) {
            let bytes = engine.file_bytes();
            let start = usize::try_from(offset)
                .unwrap_or(usize::MAX)
                .min(bytes.len());
            let end = start.saturating_add(len).min(bytes.len());
            return Ok(bytes[start..end].to_vec());
        }
        match &files.store {
            Some(store) => store.read_range(id, offset, len),
            None => Err(LedgerError::Malformed(format!("no file {id} here"))),
        }
    }
}

/// Answers one chunk request from the files `offered`. Never panics; reads
/// at most [`MAX_CHUNK`] bytes.
pub fn answer(offered: &Offered, meta: &[u8]) -> (ChunkReply, Bytes) {
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
    let Some(total) = offered.size(id) else {
        return failure(ChunkError::NotFound, format!("no file {id} here"));
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
    match offered.read_range(id, req.offset, req.len as usize) {
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

/// Answers [`ADAPTER_METHOD`] requests for the files `offered` (including
/// files offered later) until the queue closes (reads on blocking threads).
pub async fn serve(offered: impl Into<Offered>, mut requests: mpsc::Receiver<InboundRequest>) {
    let offered = offered.into();
    while let Some(inbound) = requests.recv().await {
        let offered = offered.clone();
        tokio::task::spawn_blocking(move || {
            let (reply, tensor) = answer(&offered, &inbound.request.meta);
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

/// A fetched file.
#[derive(Clone, Debug, PartialEq)]
pub struct Fetched {
    /// Its file in the store.
    pub path: PathBuf,
    /// The peer that sent it (`None`: the store held it already).
    pub from: Option<PeerId>,
    /// Peers that failed first, and why (a wrong hash among them is a lie).
    pub failures: Vec<(PeerId, String)>,
}

/// The size a fetched file must have.
#[derive(Clone, Copy, Debug)]
enum Size {
    /// Exactly this many bytes.
    Exact(u64),
    /// Whatever the peer says, from 1 to this many bytes.
    AtMost(u64),
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
    if size == 0 || size > super::record::MAX_ADAPTER_BYTES {
        return Err(LedgerError::Malformed(format!("adapter size {size}")));
    }
    fetch_sized(net, store, id, Size::Exact(size), peers, config, progress).await
}

/// Fetches adapter `id` of `size` bytes like [`fetch`], asking `holder`
/// first, then every other connected peer (never this node itself).
pub async fn fetch_via(
    net: &Arc<dyn Network>,
    store: &AdapterStore,
    id: ModelId,
    size: u64,
    holder: PeerId,
    config: &FetchConfig,
) -> crate::Result<Fetched> {
    let me = net.local_peer_id();
    let mut peers = vec![holder];
    peers.extend(net.connected_peers().await?);
    let mut seen = std::collections::HashSet::new();
    peers.retain(|p| *p != me && seen.insert(*p));
    Ok(fetch(net, store, id, size, &peers, config, &mut |_, _| {}).await?)
}

/// Fetches file `id` into `store` like [`fetch`], when its size is not known
/// beforehand (e.g. a model known only by id): each peer's first reply says
/// how big the file is, and a peer claiming more than `max_size` bytes is
/// not asked further. `progress` gets (bytes received from the current peer,
/// the size it claims).
pub async fn fetch_any_size(
    net: &Arc<dyn Network>,
    store: &AdapterStore,
    id: ModelId,
    max_size: u64,
    peers: &[PeerId],
    config: &FetchConfig,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<Fetched, LedgerError> {
    fetch_sized(
        net,
        store,
        id,
        Size::AtMost(max_size),
        peers,
        config,
        progress,
    )
    .await
}

async fn fetch_sized(
    net: &Arc<dyn Network>,
    store: &AdapterStore,
    id: ModelId,
    size: Size,
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

/// Asks `peer` for `chunk` bytes of `id` at `offset`; returns the file size
/// the peer claims and the bytes.
async fn ask_chunk(
    net: &Arc<dyn Network>,
    peer: PeerId,
    id: ModelId,
    offset: u64,
    chunk: u32,
    timeout: Duration,
) -> Result<(u64, Bytes), LedgerError> {
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
    let response = net
        .request(peer, request, timeout)
        .await
        .map_err(|e| LedgerError::Peer(e.to_string()))?;
    let reply = ChunkReply::decode(response.meta.as_ref())
        .map_err(|e| LedgerError::Peer(format!("undecodable chunk reply: {e}")))?;
    if reply.error != ChunkError::None as i32 {
        let code = ChunkError::try_from(reply.error).unwrap_or(ChunkError::Internal);
        return Err(LedgerError::Peer(format!("{code:?}: {}", reply.message)));
    }
    Ok((reply.total, response.tensor))
}

#[allow(clippy::too_many_arguments)]
async fn fetch_from(
    net: &Arc<dyn Network>,
    store: &AdapterStore,
    id: ModelId,
    size: Size,
    peer: PeerId,
    chunk: u32,
    config: &FetchConfig,
    progress: &mut (dyn FnMut(u64, u64) + Send),
) -> Result<PathBuf, LedgerError> {
    // The first chunk alone: its reply says how big the file is.
    let (total, first) = ask_chunk(net, peer, id, 0, chunk, config.timeout).await?;
    let size = match size {
        Size::Exact(size) => size,
        Size::AtMost(max) if total == 0 || total > max => {
            return Err(LedgerError::Peer(format!(
                "claims a {total}-byte file; expected 1 to {max} bytes"
            )))
        }
        Size::AtMost(_) => total,
    };
    let check = |offset: u64, total: u64, got: usize| {
        let want = (size - offset).min(u64::from(chunk));
        if total != size || got as u64 != want {
            return Err(LedgerError::Peer(format!(
                "sent {got} bytes at {offset} of a {total}-byte file; expected {want} of {size}"
            )));
        }
        Ok(())
    };
    check(0, total, first.len())?;
    let mut writer = store.writer(id)?;
    writer.write(&first)?;
    progress(writer.written(), size);
    let offsets = (u64::from(chunk)..size).step_by(chunk as usize);
    let requests = futures::stream::iter(offsets.map(|offset| async move {
        let answer = ask_chunk(net, peer, id, offset, chunk, config.timeout).await;
        (offset, answer)
    }))
    .buffered(config.window.max(1));
    futures::pin_mut!(requests);
    while let Some((offset, answer)) = requests.next().await {
        let (total, bytes) = answer?;
        check(offset, total, bytes.len())?;
        writer.write(&bytes)?;
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
        answer(&Offered::from(store.clone()), &meta)
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
            ChunkError::try_from(answer(&Offered::from(store.clone()), b"\xff\xff").0.error)
                .unwrap(),
            ChunkError::Malformed
        );
        let _ = std::fs::remove_dir_all(store.dir());
    }

    proptest! {
        #[test]
        fn answer_never_panics(meta in proptest::collection::vec(any::<u8>(), 0..80)) {
            static STORE: std::sync::OnceLock<Offered> = std::sync::OnceLock::new();
            let offered = STORE.get_or_init(|| Offered::from(store().0));
            let (r, b) = answer(offered, &meta);
            prop_assert!(b.len() <= MAX_CHUNK as usize);
            prop_assert!(r.error != 0 || r.total >= b.len() as u64);
        }
    }
}
