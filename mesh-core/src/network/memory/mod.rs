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
    check_method, check_topic, keys, wire, Announcement, Event, GossipMessage, Identity,
    InboundRequest, Limits, Multiaddr, Network, NetworkError, PeerId, Provider, RemoteStatus,
    Reply, Request, Response, Validation, Validator, ANNOUNCE_TOPIC, DESCRIBE_METHOD,
};
use crate::model_id::ModelId;
use crate::Result;

mod gossip;
mod handle;
mod kademlia;
mod links;
#[cfg(test)]
mod tests;

use kademlia::*;

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

/// Longest gossip topic name (the network-wide limit).
pub use super::MAX_TOPIC_LEN;

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

/// `now + d`, saturating at about a century.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86400))
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
}
