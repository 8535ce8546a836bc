//! In-memory network: the [`Network`] trait without sockets, for tests and
//! simulations of hundreds of nodes.
//!
//! A [`MemoryNet`] is the simulated world; [`MemoryNet::add_node`] puts a
//! node in it and returns its [`MemoryNetwork`] handle, listening on
//! `/memory/<n>`. Every message between nodes is a simulated message on a
//! link ([`LinkConfig`]: latency, bandwidth, loss), may be cut by a
//! [partition](MemoryNet::partition), and is counted ([`NetStats`]).
//!
//! # What is simulated
//!
//! * **Request/response** goes through the real wire encoding
//!   ([`wire::encode_request`], [`wire::decode_request`],
//!   [`wire::encode_response`], [`wire::decode_response`]) under each side's
//!   [`Limits`]. Delivery takes the link latency plus the transfer time at the
//!   link's bandwidth (messages on one directed link queue behind each
//!   other). A lost or partitioned message is simply not delivered: the
//!   requester hits its deadline ([`NetworkError::Timeout`]). A peer that
//!   vanishes ([`MemoryNet::kill`]) fails requests in flight to it with
//!   [`NetworkError::ConnectionClosed`] at once. Requests to a peer that is
//!   not connected dial it first (one round trip), like libp2p dialling by
//!   peer id; an unreachable peer is [`NetworkError::Dial`] at once.
//! * **Discovery** is a simplified Kademlia over simulated messages (no
//!   global registry): keys are SHA-256 of the peer id's bytes and of
//!   `("model", id)` / `("layer", id, layer)`; XOR distance; k-buckets with
//!   [`K`] = 20 (peers enter on every Kademlia message from them and every
//!   answer; a full bucket replaces its least recently seen entry only if
//!   that node is gone, as libp2p replaces disconnected entries); iterative
//!   lookups with [`ALPHA`] = 3 queries in flight that end when the `K`
//!   closest peers seen have all answered. Provider records live at the `K` closest nodes, expire after
//!   [`MemoryConfig::provider_ttl`] and are republished every
//!   [`MemoryConfig::republish_interval`]. Kademlia messages have modelled
//!   sizes (see [`KAD_REQUEST_BYTES`]), not a protobuf encoding. They do not
//!   open connections (libp2p would; here connections only come from
//!   [`Network::dial`] and requests, so gossip does not flood over every peer
//!   a lookup touched).
//! * **Gossip** floods: a message goes to every connected peer subscribed to
//!   its topic, each node forwards it once (dedup by source and sequence
//!   number) and only if its validator accepts it (the validator is given
//!   the message's source, its publisher). Subscriptions are read
//!   from the peer directly (gossipsub exchanges them on connect). Every node
//!   is subscribed to [`ANNOUNCE_TOPIC`]. A node does not receive its own
//!   messages.
//! * **Connections** are symmetric, one per pair, opened by a simulated
//!   handshake of one round trip that also measures the RTT (2 × latency,
//!   reported as [`Event::Rtt`]; the handshake is neither lost nor
//!   bandwidth-limited). With [`MemoryConfig::ping_interval`] each
//!   connection is pinged periodically (pings are not subject to loss).
//!   [`Limits::max_connections`] is enforced on both ends;
//!   `max_connections_per_peer` is moot (one connection per pair). A
//!   partition does not close existing connections; messages across it are
//!   dropped until [`MemoryNet::heal`]. Connections are never closed for
//!   idleness.
//! * **Leaving**: [`Network::shutdown`] withdraws (gossip and record
//!   removal) then disconnects; [`MemoryNet::kill`] does neither, so peers
//!   only see [`Event::PeerDisconnected`], and its provider records stay at
//!   other nodes until they expire, but [`Network::find_providers`] drops it
//!   since it cannot describe itself.
//!
//! # Determinism
//!
//! All time is [`tokio::time`] and all randomness (loss) comes from one
//! ChaCha8 generator seeded by [`MemoryNet::new`]'s seed; every collection
//! is ordered (`BTreeMap`), and every `select!` is `biased`. So a run on a
//! **current-thread** runtime (the order tasks run in is then fixed) with
//! **paused time** (`#[tokio::test(start_paused = true)]`: virtual time
//! advances only when every task waits, so no wall-clock timing leaks in) is
//! reproducible: the same seed and the same calls give the same messages,
//! counts and results. Identities must be reproducible too
//! ([`Identity::from_seed`]): peer ids decide Kademlia distances. On a multi-threaded runtime the network still works
//! but the interleaving, hence the loss draws, may vary between runs.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use libp2p::multiaddr::Protocol;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::Instant;

use super::{
    check_method, keys, wire, Announcement, Event, GossipMessage, Identity, InboundRequest, Limits,
    Multiaddr, Network, NetworkError, PeerId, Provider, RemoteStatus, Reply, Request, Response,
    Validation, Validator, ANNOUNCE_TOPIC, DESCRIBE_METHOD,
};
use crate::engine::ModelId;
use crate::Result;

/// Kademlia bucket size and replication factor.
pub const K: usize = 20;

/// Kademlia lookup parallelism.
pub const ALPHA: usize = 3;

/// Modelled size of a Kademlia request (type, 32-byte key, framing).
pub const KAD_REQUEST_BYTES: usize = 48;

/// Modelled size of one peer entry (peer id and an address) in a Kademlia reply.
pub const KAD_PEER_BYTES: usize = 64;

/// Modelled per-message overhead of gossip (source, sequence number, signature).
pub const GOSSIP_OVERHEAD_BYTES: usize = 120;

/// Modelled size of each of the two handshake messages opening a connection.
pub const HANDSHAKE_BYTES: usize = 256;

/// Modelled size of a ping and of its answer.
pub const PING_BYTES: usize = 40;

/// Longest gossip topic name.
pub const MAX_TOPIC_LEN: usize = 256;

/// Most providers a node stores for one key.
const MAX_PROVIDERS_PER_KEY: usize = 1024;

/// A 256-bit Kademlia key.
type Key = [u8; 32];

/// The properties of a (symmetric) link between two nodes.
#[derive(Clone, Debug, PartialEq)]
pub struct LinkConfig {
    /// One-way latency.
    pub latency: Duration,
    /// Bandwidth in each direction; `None` is unlimited (`Some(0)` counts as 1 byte/s).
    pub bandwidth_bytes_per_sec: Option<u64>,
    /// Probability in `0..=1` that a message is lost.
    pub loss: f64,
}

impl Default for LinkConfig {
    /// 5 ms, unlimited bandwidth, no loss.
    fn default() -> Self {
        LinkConfig {
            latency: Duration::from_millis(5),
            bandwidth_bytes_per_sec: None,
            loss: 0.0,
        }
    }
}

/// Protocol parameters of a [`MemoryNet`].
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryConfig {
    /// How long a provider record lives at the node storing it.
    pub provider_ttl: Duration,
    /// How often a node republishes its provider records.
    pub republish_interval: Duration,
    /// Deadline of one Kademlia request.
    pub rpc_timeout: Duration,
    /// Capacity of each node's event channel.
    pub event_capacity: usize,
    /// Capacity of each gossip subscription's queue.
    pub gossip_queue: usize,
    /// Gossip message ids remembered per node for deduplication.
    pub seen_cache: usize,
    /// Most keys a node stores provider records for.
    pub max_record_keys: usize,
    /// Re-measure each connection's RTT this often (libp2p pings every
    /// 15 s). `None` (the default, cheaper for large simulations): only the
    /// connection handshake measures it.
    pub ping_interval: Option<Duration>,
}

impl Default for MemoryConfig {
    /// libp2p's defaults: records live 48 h, republished every 12 h; 10 s
    /// Kademlia request deadline.
    fn default() -> Self {
        MemoryConfig {
            provider_ttl: Duration::from_secs(48 * 3600),
            republish_interval: Duration::from_secs(12 * 3600),
            rpc_timeout: Duration::from_secs(10),
            event_capacity: 1024,
            gossip_queue: 1024,
            seen_cache: 16384,
            max_record_keys: 65536,
            ping_interval: None,
        }
    }
}

/// Counters of a [`MemoryNet`], summed over all nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Messages put on a link (every kind).
    pub messages_sent: u64,
    /// Messages that arrived.
    pub messages_delivered: u64,
    /// Bytes of the messages that arrived.
    pub bytes_delivered: u64,
    /// Messages lost to the link's loss rate.
    pub messages_lost: u64,
    /// Messages dropped by a partition or because the receiver vanished.
    pub messages_dropped: u64,
    /// Kademlia messages sent (requests and replies).
    pub kad_messages: u64,
    /// Iterative Kademlia lookups started.
    pub lookups: u64,
    /// Requests sent by [`Network::request`] (and describes).
    pub requests: u64,
    /// Gossip messages sent (publishes and forwards).
    pub gossip_messages: u64,
    /// Gossip messages a validator did not accept.
    pub gossip_rejected: u64,
    /// Connections opened.
    pub connections: u64,
}

/// The simulated world: nodes, links, partitions, counters. Cheap to clone.
#[derive(Clone)]
pub struct MemoryNet {
    world: Arc<Mutex<World>>,
}

impl std::fmt::Debug for MemoryNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let w = self.lock();
        write!(f, "MemoryNet({} nodes, {:?})", w.nodes.len(), w.stats)
    }
}

/// One node of a [`MemoryNet`]; implements [`Network`]. Cheap to clone.
#[derive(Clone)]
pub struct MemoryNetwork {
    net: MemoryNet,
    index: usize,
    peer: PeerId,
}

impl std::fmt::Debug for MemoryNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MemoryNetwork(/memory/{}, {})", self.index, self.peer)
    }
}

fn sha256(parts: &[&[u8]]) -> Key {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn peer_key(peer: &PeerId) -> Key {
    sha256(&[&peer.to_bytes()])
}

/// Distances between provider keys ([`keys`]) are taken between their
/// SHA-256 hashes, as libp2p's Kademlia does.
fn model_key(model: &ModelId) -> Key {
    sha256(&[&keys::model_key(model)])
}

fn layer_key(model: &ModelId, layer: u32) -> Key {
    sha256(&[&keys::layer_key(model, layer)])
}

/// The provider keys of an announcement: the model and each of its layers.
fn announcement_keys(a: &Announcement) -> Vec<Key> {
    keys::announcement_keys(a)
        .iter()
        .map(|k| sha256(&[k]))
        .collect()
}

/// `now + d`, saturating at about a century.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86400))
}

fn distance(a: &Key, b: &Key) -> Key {
    let mut d = [0u8; 32];
    for (i, x) in d.iter_mut().enumerate() {
        *x = a[i] ^ b[i];
    }
    d
}

fn bucket_index(local: &Key, key: &Key) -> Option<usize> {
    let d = distance(local, key);
    let mut zeros = 0usize;
    for byte in d {
        if byte == 0 {
            zeros += 8;
        } else {
            zeros += byte.leading_zeros() as usize;
            return Some(255 - zeros);
        }
    }
    None
}

/// A Kademlia routing table: 256 buckets, least recently seen first.
struct Table {
    local: Key,
    buckets: Vec<Vec<(PeerId, Key)>>,
}

impl Table {
    fn new(local: Key) -> Table {
        Table {
            local,
            buckets: vec![Vec::new(); 256],
        }
    }

    fn remove(&mut self, peer: &PeerId) {
        if let Some(b) = bucket_index(&self.local, &peer_key(peer)) {
            self.buckets[b].retain(|(p, _)| p != peer);
        }
    }

    fn closest(&self, target: &Key, n: usize, exclude: &PeerId) -> Vec<PeerId> {
        let mut all: Vec<(Key, PeerId)> = self
            .buckets
            .iter()
            .flatten()
            .filter(|(p, _)| p != exclude)
            .map(|(p, k)| (distance(k, target), *p))
            .collect();
        all.sort();
        all.into_iter().take(n).map(|(_, p)| p).collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KadOp {
    FindNode,
    GetProviders,
    AddProvider,
    RemoveProvider,
}

impl KadOp {
    fn one_way(self) -> bool {
        matches!(self, KadOp::AddProvider | KadOp::RemoveProvider)
    }
}

#[derive(Default)]
struct KadReply {
    closer: Vec<PeerId>,
    providers: Vec<PeerId>,
}

impl KadReply {
    fn bytes(&self) -> usize {
        16 + (self.closer.len() + self.providers.len()) * KAD_PEER_BYTES
    }
}

struct Gossip {
    source: PeerId,
    seqno: u64,
    topic: String,
    data: Bytes,
}

impl Gossip {
    fn bytes(&self) -> usize {
        GOSSIP_OVERHEAD_BYTES + self.topic.len() + self.data.len()
    }
}

struct Node {
    peer: PeerId,
    key: Key,
    addr: Multiaddr,
    limits: Limits,
    alive: bool,
    dead: watch::Sender<bool>,
    events: broadcast::Sender<Event>,
    first_events: Option<broadcast::Receiver<Event>>,
    connected: BTreeSet<PeerId>,
    banned: BTreeSet<PeerId>,
    rtt: BTreeMap<PeerId, Duration>,
    handlers: BTreeMap<String, mpsc::Sender<InboundRequest>>,
    subscribers: BTreeMap<String, Vec<mpsc::Sender<GossipMessage>>>,
    validators: BTreeMap<String, Validator>,
    seen: BTreeSet<(PeerId, u64)>,
    seen_order: VecDeque<(PeerId, u64)>,
    seqno: u64,
    announcements: Vec<Announcement>,
    known: BTreeMap<PeerId, Vec<Announcement>>,
    table: Table,
    records: BTreeMap<Key, BTreeMap<PeerId, Instant>>,
    provided: BTreeSet<Key>,
    republishing: bool,
    tasks: Vec<AbortHandle>,
}

impl Node {
    fn emit(&self, event: Event) {
        let _ = self.events.send(event);
    }

    fn subscribed(&self, topic: &str) -> bool {
        topic == ANNOUNCE_TOPIC
            || self
                .subscribers
                .get(topic)
                .is_some_and(|subs| subs.iter().any(|s| !s.is_closed()))
    }

    /// Remembers a gossip id; false if it was seen before.
    fn first_sight(&mut self, id: (PeerId, u64), cap: usize) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.seen_order.push_back(id);
        while self.seen_order.len() > cap.max(1) {
            if let Some(old) = self.seen_order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }
}

/// Outcome of putting a message on a link.
enum Sent {
    Deliver { to: usize, delay: Duration },
    Dropped,
    Unreachable,
}

/// Outcome of a message reaching the end of its link.
#[derive(PartialEq, Eq)]
enum Arrived {
    Yes,
    Dropped,
    Gone,
}

struct World {
    config: MemoryConfig,
    rng: ChaCha8Rng,
    default_link: LinkConfig,
    links: BTreeMap<(PeerId, PeerId), LinkConfig>,
    groups: Option<BTreeMap<PeerId, usize>>,
    busy: BTreeMap<(usize, usize), Instant>,
    nodes: Vec<Node>,
    by_peer: BTreeMap<PeerId, usize>,
    stats: NetStats,
}

impl World {
    fn link(&self, a: PeerId, b: PeerId) -> &LinkConfig {
        let key = if a <= b { (a, b) } else { (b, a) };
        self.links.get(&key).unwrap_or(&self.default_link)
    }

    fn partitioned(&self, a: &PeerId, b: &PeerId) -> bool {
        match &self.groups {
            None => false,
            Some(g) => g.get(a) != g.get(b),
        }
    }

    fn check_alive(&self, index: usize) -> Result<()> {
        match self.nodes.get(index) {
            Some(n) if n.alive => Ok(()),
            _ => Err(NetworkError::Shutdown.into()),
        }
    }

    /// Puts `bytes` on the link from node `from` to `to_peer`.
    fn send(&mut self, from: usize, to_peer: PeerId, bytes: usize) -> Sent {
        let Some(&to) = self.by_peer.get(&to_peer) else {
            return Sent::Unreachable;
        };
        let from_peer = self.nodes[from].peer;
        if self.nodes[to].banned.contains(&from_peer) || self.nodes[from].banned.contains(&to_peer)
        {
            return Sent::Unreachable;
        }
        self.stats.messages_sent += 1;
        if self.partitioned(&from_peer, &to_peer) {
            self.stats.messages_dropped += 1;
            return Sent::Dropped;
        }
        let link = self.link(from_peer, to_peer).clone();
        if link.loss > 0.0 && self.rng.gen::<f64>() < link.loss {
            self.stats.messages_lost += 1;
            return Sent::Dropped;
        }
        let delay = match link.bandwidth_bytes_per_sec {
            None => link.latency,
            Some(bw) => {
                let micros = (bytes as u128 * 1_000_000) / u128::from(bw.max(1));
                let transfer = Duration::from_micros(micros.min(u128::from(u32::MAX)) as u64);
                let now = Instant::now();
                let start = self
                    .busy
                    .get(&(from, to))
                    .copied()
                    .filter(|t| *t > now)
                    .unwrap_or(now);
                let done = later(start, transfer);
                self.busy.insert((from, to), done);
                (done - now).saturating_add(link.latency)
            }
        };
        Sent::Deliver { to, delay }
    }

    /// A message of `bytes` from `from_peer` reaches node `to`.
    fn arrive(&mut self, from_peer: PeerId, to: usize, bytes: usize) -> Arrived {
        let node = &self.nodes[to];
        if !node.alive {
            self.stats.messages_dropped += 1;
            return Arrived::Gone;
        }
        if self.partitioned(&from_peer, &node.peer) {
            self.stats.messages_dropped += 1;
            return Arrived::Dropped;
        }
        self.stats.messages_delivered += 1;
        self.stats.bytes_delivered += bytes as u64;
        Arrived::Yes
    }

    /// Whether node `me` may open a connection to `peer`; the peer's index.
    fn can_connect(&self, me: usize, peer: PeerId) -> Result<usize> {
        let node = &self.nodes[me];
        let dial = |reason: &str| -> crate::Error {
            NetworkError::Dial {
                target: peer.to_string(),
                reason: reason.into(),
            }
            .into()
        };
        if peer == node.peer {
            return Err(dial("cannot dial the local peer"));
        }
        if node.banned.contains(&peer) {
            return Err(NetworkError::Banned(peer).into());
        }
        let Some(&to) = self.by_peer.get(&peer) else {
            return Err(dial("no live node has this peer id"));
        };
        let other = &self.nodes[to];
        if other.banned.contains(&node.peer) {
            return Err(dial("refused by the peer"));
        }
        if self.partitioned(&node.peer, &peer) {
            return Err(dial("unreachable (partitioned)"));
        }
        if node.connected.len() >= node.limits.max_connections as usize
            || other.connected.len() >= other.limits.max_connections as usize
        {
            return Err(dial("connection limit reached"));
        }
        Ok(to)
    }

    /// Opens the connection between `a` and `b`; false if it was open.
    fn establish(&mut self, a: usize, b: usize, rtt: Duration) -> bool {
        let (pa, pb) = (self.nodes[a].peer, self.nodes[b].peer);
        if self.nodes[a].connected.contains(&pb) {
            return false;
        }
        self.stats.connections += 1;
        self.stats.messages_delivered += 2;
        self.stats.bytes_delivered += 2 * HANDSHAKE_BYTES as u64;
        for (me, other) in [(a, pb), (b, pa)] {
            let node = &mut self.nodes[me];
            node.connected.insert(other);
            node.rtt.insert(other, rtt);
            node.emit(Event::PeerConnected { peer: other });
            node.emit(Event::Rtt { peer: other, rtt });
        }
        self.table_insert(a, pb);
        self.table_insert(b, pa);
        true
    }

    /// One ping over the open connection from `me` to `peer`: both ends
    /// record the RTT (2 × latency) unless a partition drops it. False once
    /// the connection is gone.
    fn ping(&mut self, me: usize, peer: PeerId) -> bool {
        let my_peer = self.nodes[me].peer;
        let Some(&to) = self.by_peer.get(&peer) else {
            return false;
        };
        if !self.nodes[me].alive || !self.nodes[me].connected.contains(&peer) {
            return false;
        }
        self.stats.messages_sent += 1;
        if self.partitioned(&my_peer, &peer) {
            self.stats.messages_dropped += 1;
            return true;
        }
        self.stats.messages_sent += 1;
        self.stats.messages_delivered += 2;
        self.stats.bytes_delivered += 2 * PING_BYTES as u64;
        let rtt = self.link(my_peer, peer).latency.saturating_mul(2);
        for (i, other) in [(me, peer), (to, my_peer)] {
            let node = &mut self.nodes[i];
            node.rtt.insert(other, rtt);
            node.emit(Event::Rtt { peer: other, rtt });
        }
        true
    }

    fn disconnect(&mut self, a: usize, peer: PeerId) {
        let pa = self.nodes[a].peer;
        if self.nodes[a].connected.remove(&peer) {
            self.nodes[a].emit(Event::PeerDisconnected { peer });
        }
        if let Some(&b) = self.by_peer.get(&peer) {
            if self.nodes[b].connected.remove(&pa) {
                self.nodes[b].emit(Event::PeerDisconnected { peer: pa });
            }
        }
    }

    /// The node vanishes: no more messages in or out, its peers see it go.
    fn teardown(&mut self, index: usize) {
        let peer = self.nodes[index].peer;
        if !self.nodes[index].alive {
            return;
        }
        let connected: Vec<PeerId> = self.nodes[index].connected.iter().copied().collect();
        for p in connected {
            self.disconnect(index, p);
        }
        let node = &mut self.nodes[index];
        node.alive = false;
        node.dead.send_replace(true);
        for t in node.tasks.drain(..) {
            t.abort();
        }
        node.handlers.clear();
        node.subscribers.clear();
        node.records.clear();
        node.provided.clear();
        if self.by_peer.get(&peer) == Some(&index) {
            self.by_peer.remove(&peer);
        }
    }

    /// Adds `peer` to node `at`'s routing table (or refreshes it).
    fn table_insert(&mut self, at: usize, peer: PeerId) {
        let node = &self.nodes[at];
        if node.peer == peer || node.banned.contains(&peer) {
            return;
        }
        let key = peer_key(&peer);
        let Some(b) = bucket_index(&node.key, &key) else {
            return;
        };
        let bucket = &node.table.buckets[b];
        if let Some(pos) = bucket.iter().position(|(p, _)| *p == peer) {
            let bucket = &mut self.nodes[at].table.buckets[b];
            let entry = bucket.remove(pos);
            bucket.push(entry);
            return;
        }
        if bucket.len() < K {
            self.nodes[at].table.buckets[b].push((peer, key));
            return;
        }
        // Full bucket: the least recently seen entry is replaced if it is
        // gone (libp2p replaces a disconnected one; liveness comes from the
        // connection keep-alive, so no extra message is counted), else kept.
        let oldest = bucket[0].0;
        let answers =
            self.by_peer.contains_key(&oldest) && !self.partitioned(&self.nodes[at].peer, &oldest);
        let bucket = &mut self.nodes[at].table.buckets[b];
        let entry = bucket.remove(0);
        if answers {
            bucket.push(entry);
        } else {
            bucket.push((peer, key));
        }
    }

    /// Node `to` answers a Kademlia request from `from_peer`.
    fn handle_kad(&mut self, to: usize, from_peer: PeerId, op: KadOp, key: Key) -> KadReply {
        self.table_insert(to, from_peer);
        let now = Instant::now();
        let ttl = self.config.provider_ttl;
        let max_keys = self.config.max_record_keys;
        let node = &mut self.nodes[to];
        let mut reply = KadReply::default();
        match op {
            KadOp::FindNode => reply.closer = node.table.closest(&key, K, &from_peer),
            KadOp::GetProviders => {
                if let Some(records) = node.records.get_mut(&key) {
                    records.retain(|_, expires| *expires > now);
                    reply.providers.extend(records.keys().copied());
                    if records.is_empty() {
                        node.records.remove(&key);
                    }
                }
                if node.provided.contains(&key) {
                    reply.providers.push(node.peer);
                }
                reply.closer = node.table.closest(&key, K, &from_peer);
            }
            KadOp::AddProvider => {
                if !node.records.contains_key(&key) && node.records.len() >= max_keys {
                    node.records.retain(|_, r| {
                        r.retain(|_, expires| *expires > now);
                        !r.is_empty()
                    });
                }
                if node.records.contains_key(&key) || node.records.len() < max_keys {
                    let records = node.records.entry(key).or_default();
                    if records.len() < MAX_PROVIDERS_PER_KEY || records.contains_key(&from_peer) {
                        records.insert(from_peer, later(now, ttl));
                    }
                }
            }
            KadOp::RemoveProvider => {
                if let Some(records) = node.records.get_mut(&key) {
                    records.remove(&from_peer);
                    if records.is_empty() {
                        node.records.remove(&key);
                    }
                }
            }
        }
        reply
    }

    /// Node `to` answers `bytes` (a request frame) from `from_peer`.
    fn answer(&mut self, to: usize, from_peer: PeerId, bytes: Bytes) -> Answer {
        let node = &mut self.nodes[to];
        let limit = node.limits.max_response_bytes;
        let error = |status: RemoteStatus, message: &str| {
            Answer::Now(wire::encode_response(Err((status, message)), limit))
        };
        let request = match wire::decode_request(bytes, node.limits.max_request_bytes) {
            Ok(r) => r,
            Err(e) => return error(status_of(&e), &e.to_string()),
        };
        if request.method == DESCRIBE_METHOD {
            let meta = wire::encode_describe(&node.announcements, std::slice::from_ref(&node.addr));
            let response = Response {
                meta,
                tensor: Bytes::new(),
            };
            return Answer::Now(wire::encode_response(Ok(&response), limit));
        }
        let method = request.method.clone();
        let Some(tx) = node.handlers.get(&method) else {
            return error(RemoteStatus::UnknownMethod, "no handler for this method");
        };
        let (reply_tx, reply_rx) = oneshot::channel();
        match tx.try_send(InboundRequest::new(from_peer, request, reply_tx)) {
            Ok(()) => Answer::Later(reply_rx, limit),
            Err(mpsc::error::TrySendError::Full(_)) => {
                error(RemoteStatus::Busy, "the handler's queue is full")
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                node.handlers.remove(&method);
                error(RemoteStatus::UnknownMethod, "no handler for this method")
            }
        }
    }

    /// Node `at` sends (or forwards) `msg` to its connected peers subscribed
    /// to the topic, except `except` and the source.
    fn forward(&mut self, net: &MemoryNet, at: usize, msg: &Arc<Gossip>, except: Option<PeerId>) {
        let targets: Vec<PeerId> = self.nodes[at]
            .connected
            .iter()
            .copied()
            .filter(|p| Some(*p) != except && *p != msg.source)
            .filter(|p| {
                self.by_peer
                    .get(p)
                    .is_some_and(|&i| self.nodes[i].subscribed(&msg.topic))
            })
            .collect();
        let from_peer = self.nodes[at].peer;
        for p in targets {
            self.stats.gossip_messages += 1;
            if let Sent::Deliver { to, delay } = self.send(at, p, msg.bytes()) {
                let net = net.clone();
                let msg = msg.clone();
                tokio::spawn(async move { net.deliver_gossip(from_peer, to, delay, msg).await });
            }
        }
    }

    /// Node `at` publishes a new gossip message.
    fn publish(&mut self, net: &MemoryNet, at: usize, topic: &str, data: Bytes) {
        let cap = self.config.seen_cache;
        let node = &mut self.nodes[at];
        node.seqno += 1;
        let msg = Arc::new(Gossip {
            source: node.peer,
            seqno: node.seqno,
            topic: topic.to_string(),
            data,
        });
        node.first_sight((msg.source, msg.seqno), cap);
        self.forward(net, at, &msg, None);
    }

    /// Node `at` learnt `list` is everything `source` serves now.
    fn learn_announcements(&mut self, at: usize, source: PeerId, list: Vec<Announcement>) {
        let node = &mut self.nodes[at];
        let old = node.known.remove(&source).unwrap_or_default();
        for (model, layers) in super::announcement_changes(&old, &list) {
            node.emit(Event::ProvidersChanged {
                model,
                peer: source,
                layers,
            });
        }
        if !list.is_empty() && node.known.len() < 4096 {
            node.known.insert(source, list);
        }
    }
}

/// What a node answers to a request, now or once its handler replies.
enum Answer {
    Now(Bytes),
    Later(oneshot::Receiver<Reply>, usize),
}

fn status_of(e: &crate::Error) -> RemoteStatus {
    match e {
        crate::Error::Network(NetworkError::TooLarge { .. }) => RemoteStatus::TooLarge,
        crate::Error::Network(NetworkError::UnsupportedVersion { .. }) => {
            RemoteStatus::UnsupportedVersion
        }
        _ => RemoteStatus::Malformed,
    }
}

struct Lookup {
    closest: Vec<PeerId>,
    providers: BTreeSet<PeerId>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Probe {
    NotQueried,
    Waiting,
    Succeeded,
    Failed,
}

impl MemoryNet {
    /// An empty world whose randomness comes from `seed`, with the default
    /// [`MemoryConfig`].
    pub fn new(seed: u64) -> MemoryNet {
        MemoryNet::with_config(seed, MemoryConfig::default())
    }

    /// An empty world with protocol parameters `config`.
    pub fn with_config(seed: u64, config: MemoryConfig) -> MemoryNet {
        MemoryNet {
            world: Arc::new(Mutex::new(World {
                config,
                rng: ChaCha8Rng::seed_from_u64(seed),
                default_link: LinkConfig::default(),
                links: BTreeMap::new(),
                groups: None,
                busy: BTreeMap::new(),
                nodes: Vec::new(),
                by_peer: BTreeMap::new(),
                stats: NetStats::default(),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a node with `identity` and `limits`, listening on `/memory/<n>`
    /// (`n` counts the nodes ever added). A live node with the same identity
    /// is killed first (a restart).
    pub fn add_node(&self, identity: Identity, limits: Limits) -> MemoryNetwork {
        let peer = identity.peer_id();
        let mut w = self.lock();
        if let Some(&old) = w.by_peer.get(&peer) {
            w.teardown(old);
        }
        let index = w.nodes.len();
        let addr = Multiaddr::empty().with(Protocol::Memory(index as u64));
        let (events, first_events) = broadcast::channel(w.config.event_capacity.max(1));
        let _ = events.send(Event::Listening { addr: addr.clone() });
        let key = peer_key(&peer);
        w.nodes.push(Node {
            peer,
            key,
            addr,
            limits,
            alive: true,
            dead: watch::channel(false).0,
            events,
            first_events: Some(first_events),
            connected: BTreeSet::new(),
            banned: BTreeSet::new(),
            rtt: BTreeMap::new(),
            handlers: BTreeMap::new(),
            subscribers: BTreeMap::new(),
            validators: BTreeMap::new(),
            seen: BTreeSet::new(),
            seen_order: VecDeque::new(),
            seqno: 0,
            announcements: Vec::new(),
            known: BTreeMap::new(),
            table: Table::new(key),
            records: BTreeMap::new(),
            provided: BTreeSet::new(),
            republishing: false,
            tasks: Vec::new(),
        });
        w.by_peer.insert(peer, index);
        MemoryNetwork {
            net: self.clone(),
            index,
            peer,
        }
    }

    /// Sets the link used between nodes without a [`set_link`](Self::set_link).
    pub fn set_default_link(&self, link: LinkConfig) {
        self.lock().default_link = link;
    }

    /// Sets the link between `a` and `b` (both directions).
    pub fn set_link(&self, a: PeerId, b: PeerId, link: LinkConfig) {
        let key = if a <= b { (a, b) } else { (b, a) };
        self.lock().links.insert(key, link);
    }

    /// Splits the network: peers in different groups cannot reach each
    /// other (messages between them are dropped, dials fail). Peers listed in
    /// no group form one more group together. Replaces an earlier partition.
    pub fn partition(&self, groups: &[Vec<PeerId>]) {
        let mut map = BTreeMap::new();
        for (i, g) in groups.iter().enumerate() {
            for p in g {
                map.insert(*p, i);
            }
        }
        self.lock().groups = Some(map);
    }

    /// Ends the partition.
    pub fn heal(&self) {
        self.lock().groups = None;
    }

    /// Makes `peer` vanish abruptly: it withdraws nothing; its peers see
    /// [`Event::PeerDisconnected`]; requests in flight to it fail with
    /// [`NetworkError::ConnectionClosed`]; its handle then returns
    /// [`NetworkError::Shutdown`]. False if no live node has that id.
    pub fn kill(&self, peer: PeerId) -> bool {
        let mut w = self.lock();
        match w.by_peer.get(&peer) {
            Some(&i) => {
                w.teardown(i);
                true
            }
            None => false,
        }
    }

    /// Kills every node (ends their background tasks).
    pub fn kill_all(&self) {
        let mut w = self.lock();
        for i in 0..w.nodes.len() {
            w.teardown(i);
        }
    }

    /// The live nodes' peer ids.
    pub fn live_peers(&self) -> Vec<PeerId> {
        self.lock().by_peer.keys().copied().collect()
    }

    /// Whether a live node has peer id `peer`.
    pub fn is_alive(&self, peer: &PeerId) -> bool {
        self.lock().by_peer.contains_key(peer)
    }

    /// The counters so far.
    pub fn stats(&self) -> NetStats {
        self.lock().stats
    }

    async fn deliver_gossip(
        &self,
        from_peer: PeerId,
        to: usize,
        delay: Duration,
        msg: Arc<Gossip>,
    ) {
        tokio::time::sleep(delay).await;
        let validator = {
            let mut w = self.lock();
            if w.arrive(from_peer, to, msg.bytes()) != Arrived::Yes {
                return;
            }
            let cap = w.config.seen_cache;
            let node = &mut w.nodes[to];
            if node.banned.contains(&from_peer) || node.banned.contains(&msg.source) {
                return;
            }
            if !node.first_sight((msg.source, msg.seqno), cap) {
                return;
            }
            if msg.data.len() > node.limits.max_gossip_bytes || !node.subscribed(&msg.topic) {
                return;
            }
            node.validators.get(&msg.topic).cloned()
        };
        // The validator is the user's code: run it without the world's lock.
        let mut verdict = validator.map_or(Validation::Accept, |v| v(&msg.source, &msg.data));
        let mut announced = None;
        if verdict == Validation::Accept && msg.topic == ANNOUNCE_TOPIC {
            match wire::decode_announce(&msg.data) {
                Ok(list) => announced = Some(list),
                Err(_) => verdict = Validation::Reject,
            }
        }
        let mut w = self.lock();
        if verdict != Validation::Accept {
            w.stats.gossip_rejected += 1;
            return;
        }
        if !w.nodes[to].alive {
            return;
        }
        if let Some(subs) = w.nodes[to].subscribers.get_mut(&msg.topic) {
            subs.retain(|s| !s.is_closed());
            for s in subs.iter() {
                let _ = s.try_send(GossipMessage {
                    source: msg.source,
                    topic: msg.topic.clone(),
                    data: msg.data.clone(),
                });
            }
        }
        if let Some(list) = announced {
            w.learn_announcements(to, msg.source, list);
        }
        w.forward(self, to, &msg, Some(from_peer));
    }

    /// One Kademlia request from node `from` to `to_peer` and its reply,
    /// within the request deadline; `None` if it failed or timed out.
    async fn kad_rpc(&self, from: usize, to_peer: PeerId, op: KadOp, key: Key) -> Option<KadReply> {
        let deadline = self.lock().config.rpc_timeout;
        tokio::time::timeout(deadline, self.kad_exchange(from, to_peer, op, key))
            .await
            .ok()
            .flatten()
    }

    async fn kad_exchange(
        &self,
        from: usize,
        to_peer: PeerId,
        op: KadOp,
        key: Key,
    ) -> Option<KadReply> {
        let (sent, from_peer) = {
            let mut w = self.lock();
            w.check_alive(from).ok()?;
            w.stats.kad_messages += 1;
            (w.send(from, to_peer, KAD_REQUEST_BYTES), w.nodes[from].peer)
        };
        let (to, delay) = match sent {
            Sent::Deliver { to, delay } => (to, delay),
            Sent::Dropped if !op.one_way() => return std::future::pending().await,
            _ => return None,
        };
        tokio::time::sleep(delay).await;
        let reply = {
            let mut w = self.lock();
            match w.arrive(from_peer, to, KAD_REQUEST_BYTES) {
                Arrived::Yes => Ok(w.handle_kad(to, from_peer, op, key)),
                Arrived::Dropped if !op.one_way() => Err(true),
                _ => Err(false),
            }
        };
        let reply = match reply {
            Ok(r) => r,
            Err(true) => return std::future::pending().await,
            Err(false) => return None,
        };
        if op.one_way() {
            return Some(reply);
        }
        let bytes = reply.bytes();
        let sent = {
            let mut w = self.lock();
            w.stats.kad_messages += 1;
            w.send(to, from_peer, bytes)
        };
        let delay = match sent {
            Sent::Deliver { delay, .. } => delay,
            Sent::Dropped => return std::future::pending().await,
            Sent::Unreachable => return None,
        };
        tokio::time::sleep(delay).await;
        let arrived = self.lock().arrive(to_peer, from, bytes);
        match arrived {
            Arrived::Yes => Some(reply),
            Arrived::Dropped => std::future::pending().await,
            Arrived::Gone => None,
        }
    }

    /// An iterative lookup of `target` by node `me`: ends when the `K`
    /// closest peers seen have all answered (or failed), or at `deadline`.
    async fn lookup(&self, me: usize, target: Key, op: KadOp, deadline: Option<Instant>) -> Lookup {
        let mut providers = BTreeSet::new();
        let mut probes: BTreeMap<(Key, PeerId), Probe> = BTreeMap::new();
        let my_peer = {
            let mut w = self.lock();
            w.stats.lookups += 1;
            let node = &w.nodes[me];
            for p in node.table.closest(&target, K, &node.peer) {
                probes.insert((distance(&peer_key(&p), &target), p), Probe::NotQueried);
            }
            if op == KadOp::GetProviders {
                if let Some(r) = node.records.get(&target) {
                    let now = Instant::now();
                    providers.extend(r.iter().filter(|(_, e)| **e > now).map(|(p, _)| *p));
                }
                if node.provided.contains(&target) {
                    providers.insert(node.peer);
                }
            }
            node.peer
        };
        let mut in_flight = FuturesUnordered::new();
        loop {
            while in_flight.len() < ALPHA {
                let next = probes
                    .iter()
                    .filter(|(_, s)| **s != Probe::Failed)
                    .take(K)
                    .find(|(_, s)| **s == Probe::NotQueried)
                    .map(|(id, _)| *id);
                let Some(id) = next else { break };
                probes.insert(id, Probe::Waiting);
                in_flight.push(async move { (id, self.kad_rpc(me, id.1, op, target).await) });
            }
            if in_flight.is_empty() {
                break;
            }
            let done = match deadline {
                Some(d) => tokio::select! {
                    biased;
                    r = in_flight.next() => r,
                    _ = tokio::time::sleep_until(d) => None,
                },
                None => in_flight.next().await,
            };
            let Some((id, reply)) = done else { break };
            match reply {
                Some(reply) => {
                    probes.insert(id, Probe::Succeeded);
                    self.lock().table_insert(me, id.1);
                    for p in reply.closer {
                        if p != my_peer {
                            probes
                                .entry((distance(&peer_key(&p), &target), p))
                                .or_insert(Probe::NotQueried);
                        }
                    }
                    providers.extend(reply.providers);
                }
                None => {
                    probes.insert(id, Probe::Failed);
                    self.lock().nodes[me].table.remove(&id.1);
                }
            }
        }
        Lookup {
            closest: probes
                .iter()
                .filter(|(_, s)| **s == Probe::Succeeded)
                .take(K)
                .map(|(id, _)| id.1)
                .collect(),
            providers,
        }
    }

    /// Stores (or removes) node `me`'s provider record for `key` at the `K`
    /// closest nodes.
    async fn put_record(&self, me: usize, key: Key, op: KadOp) {
        let found = self.lookup(me, key, KadOp::FindNode, None).await;
        futures::future::join_all(found.closest.iter().map(|p| self.kad_rpc(me, *p, op, key)))
            .await;
    }

    async fn put_records(&self, me: usize, keys: Vec<Key>, op: KadOp) {
        futures::future::join_all(keys.into_iter().map(|k| self.put_record(me, k, op))).await;
    }

    fn start_republishing(&self, me: usize) {
        let mut w = self.lock();
        if w.nodes[me].republishing {
            return;
        }
        w.nodes[me].republishing = true;
        let interval = w.config.republish_interval;
        let net = self.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(interval).await;
                let keys: Vec<Key> = {
                    let w = net.lock();
                    if !w.nodes[me].alive {
                        return;
                    }
                    w.nodes[me].provided.iter().copied().collect()
                };
                net.put_records(me, keys, KadOp::AddProvider).await;
            }
        });
        w.nodes[me].tasks.push(task.abort_handle());
    }

    async fn ensure_connected(&self, me: usize, peer: PeerId) -> Result<()> {
        let rtt = {
            let mut w = self.lock();
            w.check_alive(me)?;
            if w.nodes[me].connected.contains(&peer) {
                return Ok(());
            }
            w.can_connect(me, peer)?;
            w.stats.messages_sent += 2;
            w.link(w.nodes[me].peer, peer).latency.saturating_mul(2)
        };
        tokio::time::sleep(rtt).await;
        let mut w = self.lock();
        w.check_alive(me)?;
        let to = w.can_connect(me, peer).or_else(|e| {
            if w.nodes[me].connected.contains(&peer) {
                Ok(usize::MAX)
            } else {
                Err(e)
            }
        })?;
        if to != usize::MAX && w.establish(me, to, rtt) {
            if let Some(interval) = w.config.ping_interval {
                let interval = interval.max(Duration::from_millis(1));
                let net = self.clone();
                let task = tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(interval).await;
                        if !net.lock().ping(me, peer) {
                            return;
                        }
                    }
                });
                let node = &mut w.nodes[me];
                node.tasks.retain(|t| !t.is_finished());
                node.tasks.push(task.abort_handle());
            }
        }
        Ok(())
    }

    /// Sends a request frame from node `me` to `peer` and returns the
    /// response frame. Never returns on a lost message (the caller's
    /// deadline ends it).
    async fn exchange(&self, me: usize, peer: PeerId, bytes: Bytes) -> Result<Bytes> {
        self.ensure_connected(me, peer).await?;
        let closed = || -> crate::Error { NetworkError::ConnectionClosed { peer }.into() };
        let len = bytes.len();
        let (sent, my_peer, mut my_dead, mut peer_dead) = {
            let mut w = self.lock();
            let Some(&to) = w.by_peer.get(&peer) else {
                return Err(closed());
            };
            w.stats.requests += 1;
            (
                w.send(me, peer, len),
                w.nodes[me].peer,
                w.nodes[me].dead.subscribe(),
                w.nodes[to].dead.subscribe(),
            )
        };
        // A lost message is never answered: wait for the caller's deadline,
        // unless either end dies first.
        let (to, delay) = match sent {
            Sent::Deliver { to, delay } => (to, delay),
            Sent::Dropped => return lost(&mut my_dead, &mut peer_dead, peer).await,
            Sent::Unreachable => return Err(closed()),
        };
        watch_both(
            &mut my_dead,
            &mut peer_dead,
            peer,
            tokio::time::sleep(delay),
        )
        .await?;
        let answer = {
            let mut w = self.lock();
            match w.arrive(my_peer, to, len) {
                Arrived::Yes if w.nodes[to].connected.contains(&my_peer) => {
                    Some(w.answer(to, my_peer, bytes))
                }
                Arrived::Dropped => None,
                Arrived::Yes | Arrived::Gone => return Err(closed()),
            }
        };
        let Some(answer) = answer else {
            return lost(&mut my_dead, &mut peer_dead, peer).await;
        };
        let reply = match answer {
            Answer::Now(b) => b,
            Answer::Later(rx, limit) => {
                match watch_both(&mut my_dead, &mut peer_dead, peer, rx).await? {
                    Ok(Reply::Ok(r)) => wire::encode_response(Ok(&r), limit),
                    Ok(Reply::Err(status, message)) => {
                        wire::encode_response(Err((status, &message)), limit)
                    }
                    Err(_) => wire::encode_response(
                        Err((RemoteStatus::Rejected, "handler dropped the request")),
                        limit,
                    ),
                }
            }
        };
        let sent = {
            let mut w = self.lock();
            if !w.nodes[to].alive || !w.nodes[to].connected.contains(&my_peer) {
                return Err(closed());
            }
            w.send(to, my_peer, reply.len())
        };
        let delay = match sent {
            Sent::Deliver { delay, .. } => delay,
            Sent::Dropped => return lost(&mut my_dead, &mut peer_dead, peer).await,
            Sent::Unreachable => return Err(NetworkError::Shutdown.into()),
        };
        tokio::time::sleep(delay).await;
        let arrived = self.lock().arrive(peer, me, reply.len());
        match arrived {
            Arrived::Yes => Ok(reply),
            Arrived::Dropped => lost(&mut my_dead, &mut peer_dead, peer).await,
            Arrived::Gone => Err(NetworkError::Shutdown.into()),
        }
    }

    /// Request from node `me` to `peer`: encode, exchange within `timeout`,
    /// decode.
    async fn request_from(
        &self,
        me: usize,
        peer: PeerId,
        request: &Request,
        timeout: Duration,
    ) -> Result<Response> {
        let limits = {
            let w = self.lock();
            w.check_alive(me)?;
            if w.nodes[me].banned.contains(&peer) {
                return Err(NetworkError::Banned(peer).into());
            }
            w.nodes[me].limits.clone()
        };
        let bytes = wire::encode_request(request, limits.max_request_bytes)?;
        match tokio::time::timeout(timeout, self.exchange(me, peer, bytes)).await {
            Ok(reply) => wire::decode_response(reply?, limits.max_response_bytes, peer),
            Err(_) => Err(NetworkError::Timeout {
                what: format!(
                    "a response to {:?} from {peer}",
                    request.method.chars().take(64).collect::<String>()
                ),
                after: timeout,
            }
            .into()),
        }
    }

    /// Node `me` describes `peer` and keeps what it serves of `model`.
    async fn describe(
        &self,
        me: usize,
        peer: PeerId,
        model: ModelId,
        layer: Option<u32>,
        deadline: Instant,
    ) -> Option<Provider> {
        let request = Request {
            method: DESCRIBE_METHOD.into(),
            meta: Bytes::new(),
            tensor: Bytes::new(),
        };
        let rpc_timeout = self.lock().config.rpc_timeout;
        let left = deadline
            .saturating_duration_since(Instant::now())
            .min(rpc_timeout);
        let response = self.request_from(me, peer, &request, left).await.ok()?;
        let (announcements, addrs) = wire::decode_describe(&response.meta).ok()?;
        provider_of(peer, &announcements, addrs, model, layer)
    }
}

fn provider_of(
    peer: PeerId,
    announcements: &[Announcement],
    addrs: Vec<Multiaddr>,
    model: ModelId,
    layer: Option<u32>,
) -> Option<Provider> {
    let a = announcements
        .iter()
        .find(|a| a.model == model && layer.is_none_or(|l| a.layers.contains(&l)))?;
    Some(Provider {
        peer_id: peer,
        layers: a.layers.clone(),
        addrs,
        free_memory: a.free_memory,
        tokens_per_sec: a.tokens_per_sec,
    })
}

/// A lost message: waits forever (the caller's deadline ends it) unless
/// this node or the peer dies first.
async fn lost<T>(
    my_dead: &mut watch::Receiver<bool>,
    peer_dead: &mut watch::Receiver<bool>,
    peer: PeerId,
) -> Result<T> {
    watch_both(my_dead, peer_dead, peer, std::future::pending::<()>()).await?;
    Err(NetworkError::ConnectionClosed { peer }.into())
}

/// Runs `fut` unless this node or the peer dies first.
async fn watch_both<F: Future>(
    my_dead: &mut watch::Receiver<bool>,
    peer_dead: &mut watch::Receiver<bool>,
    peer: PeerId,
    fut: F,
) -> Result<F::Output> {
    tokio::select! {
        biased;
        _ = my_dead.wait_for(|d| *d) => Err(NetworkError::Shutdown.into()),
        _ = peer_dead.wait_for(|d| *d) => Err(NetworkError::ConnectionClosed { peer }.into()),
        out = fut => Ok(out),
    }
}

impl MemoryNetwork {
    /// The world this node lives in.
    pub fn net(&self) -> &MemoryNet {
        &self.net
    }

    /// This node's listen address, `/memory/<n>`.
    pub fn addr(&self) -> Multiaddr {
        Multiaddr::empty().with(Protocol::Memory(self.index as u64))
    }

    fn alive(&self) -> Result<()> {
        self.net.lock().check_alive(self.index)
    }
}

#[async_trait]
impl Network for MemoryNetwork {
    fn local_peer_id(&self) -> PeerId {
        self.peer
    }

    async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        self.alive()?;
        Ok(vec![self.addr()])
    }

    /// Connects to the node at `/memory/<n>[/p2p/<id>]`, adds it to the
    /// routing table and starts a self-lookup in the background (Kademlia's
    /// bootstrap).
    async fn dial(&self, addr: Multiaddr) -> Result<()> {
        self.alive()?;
        let dial_err = |reason: String| -> crate::Error {
            NetworkError::Dial {
                target: addr.to_string(),
                reason,
            }
            .into()
        };
        let mut index = None;
        let mut expected = None;
        for p in addr.iter() {
            match p {
                Protocol::Memory(n) if index.is_none() => index = Some(n),
                Protocol::P2p(id) => expected = Some(id),
                other => {
                    return Err(dial_err(format!(
                        "the in-memory network only dials /memory/<n>[/p2p/<id>], found {other}"
                    )))
                }
            }
        }
        let Some(index) = index else {
            return Err(dial_err("expected a /memory/<n> address".into()));
        };
        let peer = {
            let w = self.net.lock();
            match usize::try_from(index).ok().and_then(|i| w.nodes.get(i)) {
                Some(n) if n.alive => n.peer,
                _ => return Err(dial_err("nothing listens there".into())),
            }
        };
        if expected.is_some_and(|e| e != peer) {
            return Err(dial_err(format!("the node there is {peer}")));
        }
        self.net.ensure_connected(self.index, peer).await?;
        let net = self.net.clone();
        let me = self.index;
        let key = peer_key(&self.peer);
        let task = tokio::spawn(async move {
            net.lookup(me, key, KadOp::FindNode, None).await;
        });
        let mut w = self.net.lock();
        let node = &mut w.nodes[me];
        node.tasks.retain(|t| !t.is_finished());
        if node.alive {
            node.tasks.push(task.abort_handle());
        } else {
            task.abort();
        }
        Ok(())
    }

    async fn connected_peers(&self) -> Result<Vec<PeerId>> {
        let w = self.net.lock();
        w.check_alive(self.index)?;
        Ok(w.nodes[self.index].connected.iter().copied().collect())
    }

    async fn announce(&self, announcement: Announcement) -> Result<()> {
        announcement.validate()?;
        let keys = announcement_keys(&announcement);
        let removed = {
            let mut w = self.net.lock();
            w.check_alive(self.index)?;
            let node = &mut w.nodes[self.index];
            let n_announced = node.announcements.len();
            let old = match node
                .announcements
                .iter_mut()
                .find(|a| a.model == announcement.model)
            {
                Some(a) => Some(std::mem::replace(a, announcement)),
                None if n_announced >= wire::MAX_ANNOUNCEMENTS => {
                    return Err(NetworkError::Malformed(format!(
                        "announce: this node already serves {} models, the most one node may list",
                        wire::MAX_ANNOUNCEMENTS
                    ))
                    .into())
                }
                None => {
                    node.announcements.push(announcement);
                    None
                }
            };
            let removed: Vec<Key> = old
                .map(|a| announcement_keys(&a))
                .unwrap_or_default()
                .into_iter()
                .filter(|k| !keys.contains(k))
                .collect();
            for k in &removed {
                node.provided.remove(k);
            }
            node.provided.extend(keys.iter().copied());
            let data = wire::encode_announce(&node.announcements);
            w.publish(&self.net, self.index, ANNOUNCE_TOPIC, data);
            removed
        };
        self.net.start_republishing(self.index);
        futures::future::join(
            self.net.put_records(self.index, keys, KadOp::AddProvider),
            self.net
                .put_records(self.index, removed, KadOp::RemoveProvider),
        )
        .await;
        Ok(())
    }

    async fn withdraw(&self, model: ModelId) -> Result<()> {
        let keys = {
            let mut w = self.net.lock();
            w.check_alive(self.index)?;
            let node = &mut w.nodes[self.index];
            let Some(pos) = node.announcements.iter().position(|a| a.model == model) else {
                return Ok(());
            };
            let old = node.announcements.remove(pos);
            let keys = announcement_keys(&old);
            for k in &keys {
                node.provided.remove(k);
            }
            let data = wire::encode_announce(&node.announcements);
            w.publish(&self.net, self.index, ANNOUNCE_TOPIC, data);
            keys
        };
        self.net
            .put_records(self.index, keys, KadOp::RemoveProvider)
            .await;
        Ok(())
    }

    /// An iterative get-providers lookup of the model's (or layer's) key,
    /// then a [`DESCRIBE_METHOD`] request to each provider found (each
    /// within [`MemoryConfig::rpc_timeout`]); providers that do not answer in
    /// time, or no longer serve what was asked, are dropped. Sorted by peer id.
    async fn find_providers(
        &self,
        model: ModelId,
        layer: Option<u32>,
        timeout: Duration,
    ) -> Result<Vec<Provider>> {
        self.alive()?;
        let deadline = later(Instant::now(), timeout);
        let key = layer.map_or_else(|| model_key(&model), |l| layer_key(&model, l));
        let found = self
            .net
            .lookup(self.index, key, KadOp::GetProviders, Some(deadline))
            .await;
        let mut out = Vec::new();
        if found.providers.contains(&self.peer) {
            let (announcements, addr) = {
                let w = self.net.lock();
                w.check_alive(self.index)?;
                let node = &w.nodes[self.index];
                (node.announcements.clone(), node.addr.clone())
            };
            out.extend(provider_of(
                self.peer,
                &announcements,
                vec![addr],
                model,
                layer,
            ));
        }
        let others = found.providers.iter().filter(|p| **p != self.peer);
        let described = futures::future::join_all(
            others.map(|p| self.net.describe(self.index, *p, model, layer, deadline)),
        )
        .await;
        out.extend(described.into_iter().flatten());
        out.sort_by_key(|p| p.peer_id);
        Ok(out)
    }

    async fn subscribe(&self, topic: &str) -> Result<mpsc::Receiver<GossipMessage>> {
        check_topic(topic)?;
        let mut w = self.net.lock();
        w.check_alive(self.index)?;
        let (tx, rx) = mpsc::channel(w.config.gossip_queue.max(1));
        w.nodes[self.index]
            .subscribers
            .entry(topic.to_string())
            .or_default()
            .push(tx);
        Ok(rx)
    }

    async fn set_validator(&self, topic: &str, validator: Validator) -> Result<()> {
        check_topic(topic)?;
        let mut w = self.net.lock();
        w.check_alive(self.index)?;
        w.nodes[self.index]
            .validators
            .insert(topic.to_string(), validator);
        Ok(())
    }

    /// Sends to the connected peers subscribed to `topic`; succeeds even if
    /// there are none (libp2p's gossipsub would report "insufficient peers").
    async fn publish(&self, topic: &str, data: Bytes) -> Result<()> {
        check_topic(topic)?;
        let mut w = self.net.lock();
        w.check_alive(self.index)?;
        let limit = w.nodes[self.index].limits.max_gossip_bytes;
        if data.len() > limit {
            return Err(NetworkError::TooLarge {
                what: "gossip message",
                size: data.len() as u64,
                limit: limit as u64,
            }
            .into());
        }
        w.publish(&self.net, self.index, topic, data);
        Ok(())
    }

    /// Refuses a method another live receiver already handles; once that
    /// receiver is dropped the method may be claimed again.
    async fn handle(&self, method: &str) -> Result<mpsc::Receiver<InboundRequest>> {
        check_method(method)?;
        let mut w = self.net.lock();
        w.check_alive(self.index)?;
        let node = &mut w.nodes[self.index];
        if node.handlers.get(method).is_some_and(|tx| !tx.is_closed()) {
            return Err(NetworkError::Method {
                method: method.to_string(),
                reason: "already handled on this node".into(),
            }
            .into());
        }
        let (tx, rx) = mpsc::channel(node.limits.handler_queue.max(1));
        node.handlers.insert(method.to_string(), tx);
        Ok(rx)
    }

    async fn request(&self, peer: PeerId, request: Request, timeout: Duration) -> Result<Response> {
        self.net
            .request_from(self.index, peer, &request, timeout)
            .await
    }

    async fn rtt(&self, peer: PeerId) -> Result<Option<Duration>> {
        let w = self.net.lock();
        w.check_alive(self.index)?;
        Ok(w.nodes[self.index].rtt.get(&peer).copied())
    }

    async fn ban(&self, peer: PeerId) -> Result<()> {
        let mut w = self.net.lock();
        w.check_alive(self.index)?;
        if peer == self.peer {
            return Ok(());
        }
        w.disconnect(self.index, peer);
        let node = &mut w.nodes[self.index];
        node.banned.insert(peer);
        node.table.remove(&peer);
        node.known.remove(&peer);
        Ok(())
    }

    /// The first call returns a receiver that also holds the
    /// [`Event::Listening`] sent when the node was added.
    fn events(&self) -> broadcast::Receiver<Event> {
        let mut w = self.net.lock();
        let node = &mut w.nodes[self.index];
        node.first_events
            .take()
            .unwrap_or_else(|| node.events.subscribe())
    }

    async fn shutdown(&self) -> Result<()> {
        let (models, deadline) = {
            let w = self.net.lock();
            w.check_alive(self.index)?;
            let models: Vec<ModelId> = w.nodes[self.index]
                .announcements
                .iter()
                .map(|a| a.model)
                .collect();
            (models, w.config.rpc_timeout.saturating_mul(3))
        };
        let withdraw_all = async {
            for model in models {
                let _ = self.withdraw(model).await;
            }
        };
        let _ = tokio::time::timeout(deadline, withdraw_all).await;
        self.net.lock().teardown(self.index);
        Ok(())
    }
}

fn check_topic(topic: &str) -> Result<()> {
    if topic.is_empty() || topic.len() > MAX_TOPIC_LEN {
        return Err(NetworkError::Gossip(format!(
            "expected a topic of 1 to {MAX_TOPIC_LEN} bytes, found {}",
            topic.len()
        ))
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(net: &MemoryNet, i: u8) -> MemoryNetwork {
        net.add_node(Identity::from_seed([i; 32]), Limits::default())
    }

    fn net_err(e: crate::Error) -> NetworkError {
        match e {
            crate::Error::Network(n) => n,
            other => panic!("expected a network error, found {other}"),
        }
    }

    fn req(method: &str) -> Request {
        Request {
            method: method.into(),
            meta: Bytes::new(),
            tensor: Bytes::new(),
        }
    }

    #[test]
    fn keys_and_buckets() {
        let a = [0u8; 32];
        let mut b = [0u8; 32];
        assert_eq!(bucket_index(&a, &a), None);
        b[31] = 1;
        assert_eq!(bucket_index(&a, &b), Some(0));
        b[0] = 0x80;
        assert_eq!(bucket_index(&a, &b), Some(255));
        assert_ne!(
            layer_key(&ModelId([1; 32]), 0),
            layer_key(&ModelId([1; 32]), 1)
        );
        assert_ne!(
            model_key(&ModelId([1; 32])),
            layer_key(&ModelId([1; 32]), 0)
        );
        let keys = announcement_keys(&Announcement {
            model: ModelId([1; 32]),
            layers: 3..6,
            free_memory: 0,
            tokens_per_sec: 0.0,
        });
        assert_eq!(keys.len(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn handlers_statuses_and_describe() {
        let net = MemoryNet::new(1);
        let a = node(&net, 1);
        let small_queue = Limits {
            handler_queue: 1,
            ..Limits::default()
        };
        let b = net.add_node(Identity::from_seed([2; 32]), small_queue);
        let _rx = b.handle("m").await.unwrap();
        // A second handler for the same method, or the built-in one, is refused.
        assert!(matches!(
            net_err(b.handle("m").await.unwrap_err()),
            NetworkError::Method { .. }
        ));
        assert!(matches!(
            net_err(b.handle(DESCRIBE_METHOD).await.unwrap_err()),
            NetworkError::Method { .. }
        ));
        let t = Duration::from_secs(1);
        let err = net_err(a.request(b.peer, req("nope"), t).await.unwrap_err());
        assert!(matches!(
            err,
            NetworkError::Remote {
                status: RemoteStatus::UnknownMethod,
                ..
            }
        ));
        // The queue holds one request (never answered: a timeout), the next is Busy.
        let err = net_err(a.request(b.peer, req("m"), t).await.unwrap_err());
        assert!(matches!(err, NetworkError::Timeout { .. }), "{err}");
        let err = net_err(a.request(b.peer, req("m"), t).await.unwrap_err());
        assert!(
            matches!(
                err,
                NetworkError::Remote {
                    status: RemoteStatus::Busy,
                    ..
                }
            ),
            "{err}"
        );
        // A dropped handler frees the method.
        drop(_rx);
        let mut rx = b.handle("m").await.unwrap();
        tokio::spawn(async move {
            while let Some(r) = rx.recv().await {
                r.reject("no thanks");
            }
        });
        let err = net_err(a.request(b.peer, req("m"), t).await.unwrap_err());
        assert!(
            matches!(&err, NetworkError::Remote { status: RemoteStatus::Rejected, message, .. } if message == "no thanks"),
            "{err}"
        );
        // Describe is answered by the node itself.
        let ann = Announcement {
            model: ModelId([3; 32]),
            layers: 0..2,
            free_memory: 5,
            tokens_per_sec: 1.5,
        };
        b.announce(ann.clone()).await.unwrap();
        let r = a.request(b.peer, req(DESCRIBE_METHOD), t).await.unwrap();
        let (anns, addrs) = wire::decode_describe(&r.meta).unwrap();
        assert_eq!(anns, vec![ann]);
        assert_eq!(addrs, vec![b.addr()]);
        // Requests to oneself are refused.
        assert!(matches!(
            net_err(a.request(a.peer, req("m"), t).await.unwrap_err()),
            NetworkError::Dial { .. }
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn dial_addresses_events_and_rtt() {
        let net = MemoryNet::new(2);
        net.set_default_link(LinkConfig {
            latency: Duration::from_millis(15),
            ..LinkConfig::default()
        });
        let a = node(&net, 1);
        let b = node(&net, 2);
        let mut events = a.events();
        assert_eq!(
            events.try_recv().unwrap(),
            Event::Listening { addr: a.addr() }
        );
        for bad in [
            "/ip4/127.0.0.1/tcp/1",
            "/memory/99",
            "/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN",
        ] {
            let err = net_err(a.dial(bad.parse().unwrap()).await.unwrap_err());
            assert!(matches!(err, NetworkError::Dial { .. }), "{bad}: {err}");
        }
        let wrong = b.addr().with(Protocol::P2p(a.peer));
        assert!(matches!(
            net_err(a.dial(wrong).await.unwrap_err()),
            NetworkError::Dial { .. }
        ));
        a.dial(b.addr().with(Protocol::P2p(b.peer))).await.unwrap();
        assert_eq!(a.connected_peers().await.unwrap(), vec![b.peer]);
        assert_eq!(b.connected_peers().await.unwrap(), vec![a.peer]);
        assert_eq!(
            events.try_recv().unwrap(),
            Event::PeerConnected { peer: b.peer }
        );
        assert_eq!(
            events.try_recv().unwrap(),
            Event::Rtt {
                peer: b.peer,
                rtt: Duration::from_millis(30)
            }
        );
        assert_eq!(
            b.rtt(a.peer).await.unwrap(),
            Some(Duration::from_millis(30))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn periodic_pings_follow_link_changes() {
        let config = MemoryConfig {
            ping_interval: Some(Duration::from_secs(15)),
            ..MemoryConfig::default()
        };
        let net = MemoryNet::with_config(6, config);
        let a = node(&net, 1);
        let b = node(&net, 2);
        a.dial(b.addr()).await.unwrap();
        assert_eq!(
            b.rtt(a.peer).await.unwrap(),
            Some(Duration::from_millis(10))
        );
        net.set_link(
            a.peer,
            b.peer,
            LinkConfig {
                latency: Duration::from_millis(50),
                ..LinkConfig::default()
            },
        );
        tokio::time::sleep(Duration::from_secs(16)).await;
        assert_eq!(
            b.rtt(a.peer).await.unwrap(),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            a.rtt(b.peer).await.unwrap(),
            Some(Duration::from_millis(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bans_refuse_both_ways_and_shutdown_is_final() {
        let net = MemoryNet::new(3);
        let a = node(&net, 1);
        let b = node(&net, 2);
        let _rx_a = a.handle("m").await.unwrap();
        let _rx_b = b.handle("m").await.unwrap();
        a.dial(b.addr()).await.unwrap();
        a.ban(b.peer).await.unwrap();
        assert!(a.connected_peers().await.unwrap().is_empty());
        assert!(b.connected_peers().await.unwrap().is_empty());
        let t = Duration::from_secs(1);
        assert_eq!(
            net_err(a.request(b.peer, req("m"), t).await.unwrap_err()),
            NetworkError::Banned(b.peer)
        );
        assert!(matches!(
            net_err(b.request(a.peer, req("m"), t).await.unwrap_err()),
            NetworkError::Dial { .. }
        ));
        assert!(matches!(
            net_err(b.dial(a.addr()).await.unwrap_err()),
            NetworkError::Dial { .. }
        ));
        a.shutdown().await.unwrap();
        assert_eq!(
            net_err(a.shutdown().await.unwrap_err()),
            NetworkError::Shutdown
        );
        assert_eq!(
            net_err(a.publish("t", Bytes::new()).await.unwrap_err()),
            NetworkError::Shutdown
        );
        assert_eq!(
            net_err(
                a.find_providers(ModelId([0; 32]), None, t)
                    .await
                    .unwrap_err()
            ),
            NetworkError::Shutdown
        );
        assert!(!net.is_alive(&a.peer));
        assert_eq!(net.live_peers(), vec![b.peer]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_request_still_notices_the_peer_dying() {
        let net = MemoryNet::new(5);
        let a = node(&net, 1);
        let b = node(&net, 2);
        let _rx = b.handle("m").await.unwrap();
        a.dial(b.addr()).await.unwrap();
        net.set_default_link(LinkConfig {
            loss: 1.0,
            ..LinkConfig::default()
        });
        let killer = {
            let net = net.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(2)).await;
                net.kill(b.peer);
            })
        };
        let t = Instant::now();
        let err = net_err(
            a.request(b.peer, req("m"), Duration::from_secs(30))
                .await
                .unwrap_err(),
        );
        assert_eq!(err, NetworkError::ConnectionClosed { peer: b.peer });
        assert_eq!(t.elapsed(), Duration::from_secs(2));
        killer.await.unwrap();
        assert!(net.stats().messages_lost >= 1);
    }

    #[tokio::test(start_paused = true)]
    async fn provider_records_expire_unless_republished() {
        let config = MemoryConfig {
            provider_ttl: Duration::from_secs(60),
            republish_interval: Duration::from_secs(3600),
            ..MemoryConfig::default()
        };
        let net = MemoryNet::with_config(4, config);
        let nodes: Vec<MemoryNetwork> = (1..=4).map(|i| node(&net, i)).collect();
        for n in &nodes[1..] {
            n.dial(nodes[0].addr()).await.unwrap();
        }
        let model = ModelId([9; 32]);
        nodes[3]
            .announce(Announcement {
                model,
                layers: 0..1,
                free_memory: 0,
                tokens_per_sec: 0.0,
            })
            .await
            .unwrap();
        let key = model_key(&model);
        let holders = |net: &MemoryNet| {
            let w = net.lock();
            w.nodes
                .iter()
                .filter(|n| {
                    n.records
                        .get(&key)
                        .is_some_and(|r| r.values().any(|e| *e > Instant::now()))
                })
                .count()
        };
        assert_eq!(holders(&net), 3);
        tokio::time::sleep(Duration::from_secs(61)).await;
        assert_eq!(holders(&net), 0);
        // The provider itself still answers (it provides the key).
        let t = Duration::from_secs(5);
        assert_eq!(
            nodes[0].find_providers(model, None, t).await.unwrap().len(),
            1
        );
    }
}
