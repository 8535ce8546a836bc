//! The libp2p implementation of [`Network`].
//!
//! Transports: TCP and QUIC (v1), secured by noise and multiplexed by yamux
//! on TCP, plus a relay client so a node behind NAT can be reached through a
//! relay and upgraded to a direct connection by dcutr; autonat tells a node
//! whether it is publicly reachable. Behaviours: identify, ping (RTT),
//! Kademlia (server mode set explicitly; provider records for models and
//! layers), gossipsub (signed, validated messages), request-response with our
//! codec ([`super::wire`]), optional mDNS, connection limits and a block list.
//!
//! One task owns the [`Swarm`] and runs a single `tokio::select!` loop over
//! swarm events, commands from [`P2pNetwork`] handles (a bounded channel),
//! handler replies and a housekeeping tick. Nothing on the loop blocks:
//! frames are read and decoded by the connection tasks, handlers run
//! elsewhere and answer through oneshot channels.

use std::collections::{HashMap, HashSet};
use std::io;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{AsyncRead, AsyncWrite, FutureExt, StreamExt};
use libp2p::core::ConnectedPoint;
use libp2p::multiaddr::Protocol;
use libp2p::request_response::{
    self, OutboundFailure, OutboundRequestId, ProtocolSupport, ResponseChannel,
};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::DialOpts;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, SwarmEvent};
use libp2p::{
    allow_block_list, autonat, connection_limits, dcutr, gossipsub, identify, kad, mdns, noise,
    ping, relay, tcp, yamux, StreamProtocol, Swarm,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::streams::{self, Handlers, StreamClient};
use super::wire::{self, Frame};
use super::{
    check_method, check_topic, keys, Announcement, Event, GossipMessage, Identity, InboundRequest,
    Limits, Multiaddr, Network, NetworkError, PeerId, Provider, RemoteStatus, Reply, Request,
    Response, Validation, Validator, ANNOUNCE_TOPIC, DESCRIBE_METHOD,
};
use crate::model_id::ModelId;
use crate::{Error, Result};

mod actor;
mod codec;
mod events;
mod find;
mod swarm;

pub(crate) use codec::*;
use find::*;
use swarm::*;
pub use swarm::{layer_key, model_key};

/// Protocol id of our request-response protocol.
pub const RR_PROTOCOL: &str = "/mesh-llm/rr/1";

/// The protocol of long-lived request streams, preferred over
/// [`RR_PROTOCOL`] for every request up to 256 KiB but `mesh/describe`.
pub use super::streams::{StreamStats, RPC_PROTOCOL};
/// Protocol id of our Kademlia DHT (a private DHT, not the public IPFS one).
pub const KAD_PROTOCOL: &str = "/mesh-llm/kad/1";
/// Identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/mesh-llm/1";

/// Most providers described per lookup.
const MAX_DESCRIBED: usize = 64;
/// Capacity of the command channel and of every subscriber queue.
const QUEUE: usize = 256;

/// Settings of a libp2p node.
#[derive(Clone, Debug)]
pub struct P2pConfig {
    /// The node's identity.
    pub identity: Identity,
    /// Addresses to listen on, e.g. `/ip4/0.0.0.0/tcp/0` and
    /// `/ip4/0.0.0.0/udp/0/quic-v1`.
    pub listen: Vec<Multiaddr>,
    /// Peers to bootstrap from (with or without `/p2p/<id>`).
    pub bootstrap: Vec<Multiaddr>,
    /// Discover peers on the LAN with mDNS.
    pub mdns: bool,
    /// Also act as a relay for peers behind NAT. A relay must be reachable at
    /// the addresses it hands out: its listen addresses are taken as its
    /// external addresses (plus `external`).
    pub relay_server: bool,
    /// Addresses others can reach this node at (e.g. a public address behind
    /// port forwarding); confirmed to the swarm as external addresses.
    pub external: Vec<Multiaddr>,
    /// Size and connection limits.
    pub limits: Limits,
    /// Connections idle this long are closed.
    pub idle_timeout: Duration,
    /// Gossipsub heartbeat (mesh maintenance).
    pub gossip_heartbeat: Duration,
    /// Provider records are re-published this often (and once the first peers
    /// are known).
    pub reprovide_interval: Duration,
    /// Longest a request may stay outstanding inside libp2p, whatever the
    /// caller's own deadline.
    pub max_request_time: Duration,
    /// Serve and use long-lived request streams ([`RPC_PROTOCOL`]); off,
    /// every request goes over request-response (as to a peer that does
    /// not speak the protocol).
    pub request_streams: bool,
}

impl P2pConfig {
    /// Defaults: listen on nothing (add addresses), no bootstrap, no mDNS.
    pub fn new(identity: Identity) -> Self {
        P2pConfig {
            identity,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            mdns: false,
            relay_server: false,
            external: Vec::new(),
            limits: Limits::default(),
            idle_timeout: Duration::from_secs(120),
            gossip_heartbeat: Duration::from_millis(500),
            reprovide_interval: Duration::from_secs(600),
            max_request_time: Duration::from_secs(600),
            request_streams: true,
        }
    }

    /// Listen on TCP and QUIC on loopback, ephemeral ports (tests, benches).
    pub fn loopback(identity: Identity) -> Self {
        let mut c = P2pConfig::new(identity);
        c.listen = vec![
            "/ip4/127.0.0.1/tcp/0".parse().expect("valid multiaddr"),
            "/ip4/127.0.0.1/udp/0/quic-v1"
                .parse()
                .expect("valid multiaddr"),
        ];
        c
    }
}

// ---------------------------------------------------------------------------
// Commands and loop state

type Ack<T> = oneshot::Sender<Result<T>>;

enum Command {
    ListenAddrs(Ack<Vec<Multiaddr>>),
    Dial(Multiaddr, Ack<()>),
    ConnectedPeers(Ack<Vec<PeerId>>),
    Announce(Announcement, Ack<()>),
    Withdraw(ModelId, Ack<()>),
    FindProviders {
        model: ModelId,
        layer: Option<u32>,
        deadline: Instant,
        reply: Ack<Vec<Provider>>,
    },
    Subscribe(String, mpsc::Sender<GossipMessage>, Ack<()>),
    SetValidator(String, Validator, Ack<()>),
    Publish(String, Bytes, Ack<()>),
    Handle(String, mpsc::Sender<InboundRequest>, Ack<()>),
    Request(PeerId, Bytes, Ack<Response>),
    Rtt(PeerId, Ack<Option<Duration>>),
    PeerAddrs(PeerId, Ack<Vec<Multiaddr>>),
    Ban(PeerId, Ack<()>),
    Shutdown(Ack<()>),
}

/// A provider lookup in progress.
struct Find {
    model: ModelId,
    layer: Option<u32>,
    deadline: Instant,
    reply: Option<Ack<Vec<Provider>>>,
    dht_done: bool,
    asked: HashSet<PeerId>,
    outstanding: usize,
    found: Vec<Provider>,
}

enum Outbound {
    User(Ack<Response>),
    Describe { find: kad::QueryId, peer: PeerId },
}

type PendingReply = BoxFuture<'static, (ResponseChannel<RrResponse>, Option<Reply>)>;

struct State {
    swarm: Swarm<Behaviour>,
    limits: Limits,
    events: broadcast::Sender<Event>,
    listen: Vec<Multiaddr>,
    announcements: Vec<Announcement>,
    /// What each peer last announced by gossip, to report changes.
    remote_announcements: HashMap<PeerId, Vec<Announcement>>,
    subscribers: HashMap<gossipsub::TopicHash, (String, Vec<mpsc::Sender<GossipMessage>>)>,
    validators: HashMap<gossipsub::TopicHash, Validator>,
    handlers: Handlers,
    /// Idle request streams, pruned on the housekeeping tick.
    streams: Option<Arc<StreamClient>>,
    outbound: HashMap<OutboundRequestId, Outbound>,
    finds: HashMap<kad::QueryId, Find>,
    dials: HashMap<ConnectionId, Ack<()>>,
    /// Dials that wait for a connection to a peer someone else is dialling.
    peer_dials: HashMap<PeerId, Vec<Ack<()>>>,
    addresses: HashMap<PeerId, Vec<Multiaddr>>,
    rtts: HashMap<PeerId, Duration>,
    /// The remote address of every open connection, by peer: what the peer
    /// is seen as, not what it claims.
    remote_addrs: HashMap<PeerId, HashMap<libp2p::swarm::ConnectionId, Multiaddr>>,
    pending_replies: FuturesUnordered<PendingReply>,
    reprovide_at: Instant,
    reprovide_interval: Duration,
    had_peers: bool,
    /// Listen addresses count as external (relay servers).
    listen_is_external: bool,
    /// When to re-publish our announcements (a peer subscribed to them since).
    announce_due: Option<Instant>,
    shutting_down: Option<Ack<()>>,
}

/// A libp2p node. Cheap to share (`Arc`); dropping the last handle without
/// [`Network::shutdown`] stops the loop too.
pub struct P2pNetwork {
    peer_id: PeerId,
    commands: mpsc::Sender<Command>,
    events: broadcast::Sender<Event>,
    limits: Limits,
    task: Mutex<Option<JoinHandle<()>>>,
    /// Requests over streams, and the task serving inbound ones (`None`:
    /// streams are off).
    streams: Option<Arc<StreamClient>>,
    stream_server: Option<JoinHandle<()>>,
    banned: Arc<Mutex<HashSet<PeerId>>>,
}

impl std::fmt::Debug for P2pNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "P2pNetwork({})", self.peer_id)
    }
}

impl P2pNetwork {
    /// Starts a node: listens on `config.listen`, dials the bootstrap peers and
    /// returns once every listener reported an address (or failed). Must be
    /// called inside a tokio runtime; the swarm loop runs as a task on it.
    pub async fn start(config: P2pConfig) -> Result<P2pNetwork> {
        let mut swarm = build_swarm(&config)?;
        let peer_id = *swarm.local_peer_id();
        for addr in &config.external {
            swarm.add_external_address(addr.clone());
        }
        let mut listeners = 0;
        for addr in &config.listen {
            swarm
                .listen_on(addr.clone())
                .map_err(|e| NetworkError::Transport(format!("listen on {addr}: {e}")))?;
            listeners += 1;
        }
        let (events, _) = broadcast::channel(1024);
        let handlers = Handlers::default();
        let banned = Arc::new(Mutex::new(HashSet::new()));
        let (stream_client, stream_server) = if config.request_streams {
            let control = swarm.behaviour_mut().stream.new_control();
            let server = streams::serve(
                control.clone(),
                handlers.clone(),
                banned.clone(),
                config.limits.clone(),
            )?;
            let client = Arc::new(StreamClient::new(control, config.limits.clone()));
            (Some(client), Some(server))
        } else {
            (None, None)
        };
        let mut state = State {
            swarm,
            limits: config.limits.clone(),
            events: events.clone(),
            listen: Vec::new(),
            announcements: Vec::new(),
            remote_announcements: HashMap::new(),
            subscribers: HashMap::new(),
            validators: HashMap::new(),
            handlers: handlers.clone(),
            streams: stream_client.clone(),
            outbound: HashMap::new(),
            finds: HashMap::new(),
            dials: HashMap::new(),
            peer_dials: HashMap::new(),
            addresses: HashMap::new(),
            rtts: HashMap::new(),
            remote_addrs: HashMap::new(),
            pending_replies: FuturesUnordered::new(),
            reprovide_at: Instant::now() + config.reprovide_interval,
            reprovide_interval: config.reprovide_interval,
            had_peers: false,
            listen_is_external: config.relay_server,
            announce_due: None,
            shutting_down: None,
        };
        // Everyone listens to announcements (to report ProvidersChanged).
        let topic = gossipsub::IdentTopic::new(ANNOUNCE_TOPIC);
        state
            .swarm
            .behaviour_mut()
            .gossipsub
            .subscribe(&topic)
            .map_err(|e| NetworkError::Gossip(format!("subscribe {ANNOUNCE_TOPIC}: {e}")))?;
        // Wait (bounded) for the listeners to come up before returning.
        let ready_by = Instant::now() + Duration::from_secs(10);
        while state.listen.len() < listeners {
            let event = tokio::select! {
                e = state.swarm.select_next_some() => e,
                _ = tokio::time::sleep_until(ready_by) => break,
            };
            if let SwarmEvent::ListenerError { error, .. }
            | SwarmEvent::ListenerClosed {
                reason: Err(error), ..
            } = &event
            {
                return Err(NetworkError::Transport(format!("listener failed: {error}")).into());
            }
            state.on_swarm_event(event);
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        for addr in &config.bootstrap {
            let (ack, _) = oneshot::channel();
            state.dial(addr.clone(), ack);
        }
        let task = tokio::spawn(state.run(rx));
        Ok(P2pNetwork {
            peer_id,
            commands: tx,
            events,
            streams: stream_client,
            limits: config.limits,
            task: Mutex::new(Some(task)),
            stream_server,
            banned,
        })
    }

    /// How requests used long-lived streams so far (zero when
    /// [`P2pConfig::request_streams`] is off).
    pub fn stream_stats(&self) -> StreamStats {
        self.streams.as_ref().map(|s| s.stats()).unwrap_or_default()
    }

    async fn call<T>(&self, make: impl FnOnce(Ack<T>) -> Command) -> Result<T> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .await
            .map_err(|_| NetworkError::Shutdown)?;
        rx.await.map_err(|_| NetworkError::Shutdown)?
    }
}

impl Drop for P2pNetwork {
    fn drop(&mut self) {
        if let Some(server) = &self.stream_server {
            server.abort();
        }
        if let Ok(mut task) = self.task.lock() {
            if let Some(t) = task.take() {
                t.abort();
            }
        }
    }
}

#[async_trait]
impl Network for P2pNetwork {
    fn local_peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn listen_addrs(&self) -> Result<Vec<Multiaddr>> {
        self.call(Command::ListenAddrs).await
    }

    async fn dial(&self, addr: Multiaddr) -> Result<()> {
        self.call(|ack| Command::Dial(addr, ack)).await
    }

    async fn connected_peers(&self) -> Result<Vec<PeerId>> {
        self.call(Command::ConnectedPeers).await
    }

    async fn announce(&self, announcement: Announcement) -> Result<()> {
        announcement.validate()?;
        self.call(|ack| Command::Announce(announcement, ack)).await
    }

    async fn withdraw(&self, model: ModelId) -> Result<()> {
        self.call(|ack| Command::Withdraw(model, ack)).await
    }

    async fn find_providers(
        &self,
        model: ModelId,
        layer: Option<u32>,
        timeout: Duration,
    ) -> Result<Vec<Provider>> {
        let deadline = Instant::now() + timeout;
        self.call(|reply| Command::FindProviders {
            model,
            layer,
            deadline,
            reply,
        })
        .await
    }

    async fn subscribe(&self, topic: &str) -> Result<mpsc::Receiver<GossipMessage>> {
        check_topic(topic)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        self.call(|ack| Command::Subscribe(topic.to_owned(), tx, ack))
            .await?;
        Ok(rx)
    }

    async fn set_validator(&self, topic: &str, validator: Validator) -> Result<()> {
        check_topic(topic)?;
        self.call(|ack| Command::SetValidator(topic.to_owned(), validator, ack))
            .await
    }

    async fn publish(&self, topic: &str, data: Bytes) -> Result<()> {
        check_topic(topic)?;
        if data.len() > self.limits.max_gossip_bytes {
            return Err(NetworkError::TooLarge {
                what: "gossip message",
                size: data.len() as u64,
                limit: self.limits.max_gossip_bytes as u64,
            }
            .into());
        }
        self.call(|ack| Command::Publish(topic.to_owned(), data, ack))
            .await
    }

    async fn handle(&self, method: &str) -> Result<mpsc::Receiver<InboundRequest>> {
        check_method(method)?;
        let (tx, rx) = mpsc::channel(self.limits.handler_queue.max(1));
        self.call(|ack| Command::Handle(method.to_owned(), tx, ack))
            .await?;
        Ok(rx)
    }

    async fn request(&self, peer: PeerId, request: Request, timeout: Duration) -> Result<Response> {
        let body = wire::encode_request(&request, self.limits.max_request_bytes)?;
        let exchange = async {
            if request.method != DESCRIBE_METHOD && body.len() <= streams::MAX_STREAM_REQUEST {
                if self
                    .banned
                    .lock()
                    .map(|b| b.contains(&peer))
                    .unwrap_or(false)
                {
                    return Err(NetworkError::Banned(peer).into());
                }
                if let Some(streams) = &self.streams {
                    if let Some(reply) = streams.request(peer, &body).await {
                        return reply;
                    }
                }
            }
            self.call(|ack| Command::Request(peer, body, ack)).await
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(NetworkError::Timeout {
                what: format!("{} reply from {peer}", request.method),
                after: timeout,
            }
            .into()),
        }
    }

    async fn rtt(&self, peer: PeerId) -> Result<Option<Duration>> {
        self.call(|ack| Command::Rtt(peer, ack)).await
    }

    async fn peer_addrs(&self, peer: PeerId) -> Result<Vec<Multiaddr>> {
        self.call(|ack| Command::PeerAddrs(peer, ack)).await
    }

    async fn ban(&self, peer: PeerId) -> Result<()> {
        if let Ok(mut b) = self.banned.lock() {
            b.insert(peer);
        }
        if let Some(streams) = &self.streams {
            streams.forget(Some(peer));
        }
        self.call(|ack| Command::Ban(peer, ack)).await
    }

    fn events(&self) -> broadcast::Receiver<Event> {
        self.events.subscribe()
    }

    async fn shutdown(&self) -> Result<()> {
        if let Some(server) = &self.stream_server {
            server.abort();
        }
        if let Some(streams) = &self.streams {
            streams.forget(None);
        }
        let result = self.call(Command::Shutdown).await;
        let task = self.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        result
    }
}

/// The peer id at the end of a multiaddr (`.../p2p/<id>`), if any.
fn peer_of(addr: &Multiaddr) -> Option<PeerId> {
    addr.iter().last().and_then(|p| match p {
        Protocol::P2p(id) => Some(id),
        _ => None,
    })
}

fn outbound_error(peer: PeerId, e: &OutboundFailure) -> Error {
    match e {
        OutboundFailure::DialFailure => NetworkError::Dial {
            target: peer.to_string(),
            reason: "no reachable address".into(),
        },
        OutboundFailure::Timeout => NetworkError::Timeout {
            what: format!("reply from {peer}"),
            after: Duration::ZERO,
        },
        OutboundFailure::ConnectionClosed => NetworkError::ConnectionClosed { peer },
        OutboundFailure::UnsupportedProtocols => NetworkError::Remote {
            peer,
            status: RemoteStatus::UnknownMethod,
            message: format!("peer does not speak {RR_PROTOCOL}"),
        },
        OutboundFailure::Io(e) => {
            wire::network_error_of(e).unwrap_or(NetworkError::ConnectionClosed { peer })
        }
    }
    .into()
}

/// Layers as an `[a, b]` pair (for JSON output).
pub fn range_pair(r: &Range<u32>) -> [u32; 2] {
    [r.start, r.end]
}

/// An `Arc`'d node, the form `Node` and the FFI layer hold.
pub type SharedNetwork = Arc<dyn Network>;
