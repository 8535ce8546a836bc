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
    check_method, keys, Announcement, Event, GossipMessage, Identity, InboundRequest, Limits,
    Multiaddr, Network, NetworkError, PeerId, Provider, RemoteStatus, Reply, Request, Response,
    Validation, Validator, ANNOUNCE_TOPIC, DESCRIBE_METHOD,
};
use crate::engine::ModelId;
use crate::{Error, Result};

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
// Codec

/// A request as the codec sees it.
#[derive(Debug)]
pub(crate) enum RrRequest {
    /// An encoded frame body we send.
    Outbound(Bytes),
    /// A request we received, decoded, or why it could not be.
    Inbound(std::result::Result<Request, (RemoteStatus, String)>),
}

/// A response frame body (encoded when sent, raw when received: the loop
/// decodes it knowing the peer).
#[derive(Debug)]
pub(crate) struct RrResponse(Bytes);

/// Length-prefixed prost frames with limits checked before allocation.
#[derive(Clone, Debug)]
pub(crate) struct MeshCodec {
    limits: Limits,
}

impl request_response::Codec for MeshCodec {
    type Protocol = StreamProtocol;
    type Request = RrRequest;
    type Response = RrResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<RrRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        let limit = self.limits.max_request_bytes;
        let frame = wire::read_frame(io, limit, "request").await?;
        Ok(RrRequest::Inbound(streams::parse_request(frame, limit)))
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<RrResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        let limit = self.limits.max_response_bytes;
        match wire::read_frame(io, limit, "response").await? {
            Frame::Body(b) => Ok(RrResponse(b)),
            Frame::Oversized { size } => Err(wire::io_error(NetworkError::TooLarge {
                what: "response",
                size,
                limit: limit as u64,
            })),
        }
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        req: RrRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        match req {
            RrRequest::Outbound(body) => wire::write_frame(io, &body).await,
            RrRequest::Inbound(_) => Err(io::Error::other("an inbound request cannot be sent")),
        }
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        res: RrResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        wire::write_frame(io, &res.0).await
    }
}

// ---------------------------------------------------------------------------
// Behaviour

#[derive(NetworkBehaviour)]
struct Behaviour {
    limits: connection_limits::Behaviour,
    blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    identify: identify::Behaviour,
    ping: ping::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
    gossipsub: gossipsub::Behaviour,
    rr: request_response::Behaviour<MeshCodec>,
    stream: libp2p_stream::Behaviour,
    mdns: Toggle<mdns::tokio::Behaviour>,
    relay_client: relay::client::Behaviour,
    relay: Toggle<relay::Behaviour>,
    dcutr: dcutr::Behaviour,
    autonat: autonat::Behaviour,
}

/// DHT key of a model (its CID, see [`super::keys`]).
pub fn model_key(model: &ModelId) -> kad::RecordKey {
    kad::RecordKey::new(&keys::model_key(model))
}

/// DHT key of one layer of a model (a CID, see [`super::keys`]).
pub fn layer_key(model: &ModelId, layer: u32) -> kad::RecordKey {
    kad::RecordKey::new(&keys::layer_key(model, layer))
}

fn keys_of(a: &Announcement) -> Vec<kad::RecordKey> {
    keys::announcement_keys(a)
        .iter()
        .map(kad::RecordKey::new)
        .collect()
}

fn build_swarm(config: &P2pConfig) -> Result<Swarm<Behaviour>> {
    let transport_err = |what: &str, e: &dyn std::fmt::Display| -> Error {
        NetworkError::Transport(format!("{what}: {e}")).into()
    };
    let limits = config.limits.clone();
    let heartbeat = config.gossip_heartbeat;
    let mdns_on = config.mdns;
    let relay_on = config.relay_server;
    let max_request_time = config.max_request_time;
    let swarm = libp2p::SwarmBuilder::with_existing_identity(config.identity.keypair())
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport_err("tcp", &e))?
        .with_quic()
        // `/dns4/`, `/dns6/` and `/dns/` addresses, resolved with the system's
        // resolver configuration (hosts file included).
        .with_dns()
        .map_err(|e| transport_err("dns", &e))?
        .with_relay_client(noise::Config::new, yamux::Config::default)
        .map_err(|e| transport_err("relay client", &e))?
        .with_behaviour(|key, relay_client| {
            let peer_id = key.public().to_peer_id();
            let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
            kad_config.set_query_timeout(Duration::from_secs(30));
            let mut kad = kad::Behaviour::with_config(
                peer_id,
                kad::store::MemoryStore::new(peer_id),
                kad_config,
            );
            kad.set_mode(Some(kad::Mode::Server));
            let gossip_config = gossipsub::ConfigBuilder::default()
                .validation_mode(gossipsub::ValidationMode::Strict)
                .validate_messages()
                .max_transmit_size(limits.max_gossip_bytes.max(1024))
                .heartbeat_interval(heartbeat)
                .build()
                .map_err(|e| io::Error::other(format!("gossipsub config: {e}")))?;
            let gossipsub = gossipsub::Behaviour::new(
                gossipsub::MessageAuthenticity::Signed(key.clone()),
                gossip_config,
            )
            .map_err(|e| io::Error::other(format!("gossipsub: {e}")))?;
            let rr = request_response::Behaviour::with_codec(
                MeshCodec {
                    limits: limits.clone(),
                },
                [(StreamProtocol::new(RR_PROTOCOL), ProtocolSupport::Full)],
                request_response::Config::default().with_request_timeout(max_request_time),
            );
            let mdns = if mdns_on {
                Some(mdns::tokio::Behaviour::new(
                    mdns::Config::default(),
                    peer_id,
                )?)
            } else {
                None
            };
            let conn_limits = connection_limits::ConnectionLimits::default()
                .with_max_established(Some(limits.max_connections))
                .with_max_established_per_peer(Some(limits.max_connections_per_peer));
            Ok(Behaviour {
                limits: connection_limits::Behaviour::new(conn_limits),
                blocked: Default::default(),
                identify: identify::Behaviour::new(identify::Config::new(
                    IDENTIFY_PROTOCOL.into(),
                    key.public(),
                )),
                ping: ping::Behaviour::new(
                    ping::Config::new().with_interval(Duration::from_secs(5)),
                ),
                kad,
                gossipsub,
                rr,
                stream: libp2p_stream::Behaviour::new(),
                mdns: Toggle::from(mdns),
                relay_client,
                relay: Toggle::from(
                    relay_on.then(|| relay::Behaviour::new(peer_id, relay::Config::default())),
                ),
                dcutr: dcutr::Behaviour::new(peer_id),
                autonat: autonat::Behaviour::new(peer_id, autonat::Config::default()),
            })
        })
        .map_err(|e| transport_err("behaviour", &e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(config.idle_timeout))
        .build();
    Ok(swarm)
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

fn check_topic(topic: &str) -> Result<()> {
    if topic.is_empty() || topic.len() > 256 || topic.chars().any(char::is_control) {
        return Err(NetworkError::Gossip(format!(
            "topic {:?}: expected 1 to 256 bytes without control characters",
            topic.chars().take(80).collect::<String>()
        ))
        .into());
    }
    Ok(())
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

impl State {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = commands.recv() => match command {
                    Some(c) => {
                        if let Command::Shutdown(ack) = c {
                            self.begin_shutdown(ack);
                            break;
                        }
                        self.on_command(c)
                    }
                    // Every handle is gone: stop quietly.
                    None => break,
                },
                Some((channel, reply)) = self.pending_replies.next(), if !self.pending_replies.is_empty() => {
                    self.send_reply(channel, reply)
                }
                _ = tick.tick() => self.on_tick(),
            }
        }
        // Drain briefly so the withdrawal gossip and goodbyes get out.
        let until = Instant::now() + Duration::from_millis(300);
        loop {
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                _ = tokio::time::sleep_until(until) => break,
            }
        }
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        for p in peers {
            let _ = self.swarm.disconnect_peer_id(p);
        }
        if let Some(ack) = self.shutting_down.take() {
            let _ = ack.send(Ok(()));
        }
    }

    fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    fn begin_shutdown(&mut self, ack: Ack<()>) {
        let models: Vec<ModelId> = self.announcements.iter().map(|a| a.model).collect();
        for m in models {
            self.withdraw(m);
        }
        for (_, out) in self.outbound.drain() {
            if let Outbound::User(ack) = out {
                let _ = ack.send(Err(NetworkError::Shutdown.into()));
            }
        }
        for (_, mut f) in self.finds.drain() {
            if let Some(r) = f.reply.take() {
                let _ = r.send(Err(NetworkError::Shutdown.into()));
            }
        }
        self.shutting_down = Some(ack);
    }

    fn on_tick(&mut self) {
        let now = Instant::now();
        let expired: Vec<kad::QueryId> = self
            .finds
            .iter()
            .filter(|(_, f)| f.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            if let Some(mut q) = self.swarm.behaviour_mut().kad.query_mut(&id) {
                q.finish();
            }
            self.finish_find(id);
        }
        if self.announce_due.is_some_and(|t| now >= t) {
            self.announce_due = None;
            self.publish_announcements();
        }
        if now >= self.reprovide_at {
            self.reprovide_at = now + self.reprovide_interval;
            self.reprovide();
        }
        if let Some(streams) = &self.streams {
            streams.prune();
        }
    }

    fn reprovide(&mut self) {
        let keys: Vec<kad::RecordKey> = self.announcements.iter().flat_map(keys_of).collect();
        for k in keys {
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(k) {
                tracing::warn!("re-providing failed: {e}");
            }
        }
    }

    fn dial(&mut self, addr: Multiaddr, ack: Ack<()>) {
        let peer = peer_of(&addr);
        if let Some(p) = peer {
            if self.swarm.is_connected(&p) {
                let _ = ack.send(Ok(()));
                return;
            }
        }
        let opts = match peer {
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(vec![addr.clone()])
                .build(),
            None => DialOpts::unknown_peer_id().address(addr.clone()).build(),
        };
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.dials.insert(id, ack);
            }
            // Already being dialled (e.g. by a bootstrap or a request): wait for that.
            Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) if peer.is_some() => {
                self.peer_dials
                    .entry(peer.expect("checked"))
                    .or_default()
                    .push(ack);
            }
            Err(e) => {
                let _ = ack.send(Err(NetworkError::Dial {
                    target: addr.to_string(),
                    reason: e.to_string(),
                }
                .into()));
            }
        }
    }

    fn publish_announcements(&mut self) {
        let data = wire::encode_announce(&self.announcements);
        let topic = gossipsub::IdentTopic::new(ANNOUNCE_TOPIC);
        if let Err(e) = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, data.to_vec())
        {
            // No peers yet is normal: the DHT records and describe requests still work.
            tracing::debug!("announce gossip not sent: {e}");
        }
    }

    fn withdraw(&mut self, model: ModelId) {
        let Some(i) = self.announcements.iter().position(|a| a.model == model) else {
            return;
        };
        let old = self.announcements.remove(i);
        for k in keys_of(&old) {
            self.swarm.behaviour_mut().kad.stop_providing(&k);
        }
        self.publish_announcements();
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs(ack) => {
                let _ = ack.send(Ok(self.listen.clone()));
            }
            Command::Dial(addr, ack) => self.dial(addr, ack),
            Command::ConnectedPeers(ack) => {
                let _ = ack.send(Ok(self.swarm.connected_peers().copied().collect()));
            }
            Command::Announce(a, ack) => {
                let old_keys: HashSet<kad::RecordKey> = self
                    .announcements
                    .iter()
                    .filter(|o| o.model == a.model)
                    .flat_map(keys_of)
                    .collect();
                let new_keys: Vec<kad::RecordKey> = keys_of(&a);
                for k in old_keys.iter().filter(|k| !new_keys.contains(k)) {
                    self.swarm.behaviour_mut().kad.stop_providing(k);
                }
                let mut result = Ok(());
                for k in new_keys {
                    if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(k) {
                        result = Err(NetworkError::Dht(format!("provide: {e}")).into());
                    }
                }
                self.announcements.retain(|o| o.model != a.model);
                self.announcements.push(a);
                self.publish_announcements();
                let _ = ack.send(result);
            }
            Command::Withdraw(model, ack) => {
                self.withdraw(model);
                let _ = ack.send(Ok(()));
            }
            Command::FindProviders {
                model,
                layer,
                deadline,
                reply,
            } => {
                let key = match layer {
                    Some(l) => layer_key(&model, l),
                    None => model_key(&model),
                };
                let id = self.swarm.behaviour_mut().kad.get_providers(key);
                let mut find = Find {
                    model,
                    layer,
                    deadline,
                    reply: Some(reply),
                    dht_done: false,
                    asked: HashSet::new(),
                    outstanding: 0,
                    found: Vec::new(),
                };
                // This node itself, if it serves what is asked.
                let me = *self.swarm.local_peer_id();
                find.asked.insert(me);
                for a in &self.announcements {
                    if matches_find(a, model, layer) {
                        find.found.push(Provider {
                            peer_id: me,
                            layers: a.layers.clone(),
                            addrs: self.listen.clone(),
                            free_memory: a.free_memory,
                            tokens_per_sec: a.tokens_per_sec,
                        });
                    }
                }
                self.finds.insert(id, find);
            }
            Command::Subscribe(topic, tx, ack) => {
                let t = gossipsub::IdentTopic::new(topic.clone());
                let result = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .subscribe(&t)
                    .map(|_| ())
                    .map_err(|e| NetworkError::Gossip(format!("subscribe {topic}: {e}")).into());
                if result.is_ok() {
                    self.subscribers
                        .entry(t.hash())
                        .or_insert_with(|| (topic, Vec::new()))
                        .1
                        .push(tx);
                }
                let _ = ack.send(result);
            }
            Command::SetValidator(topic, v, ack) => {
                self.validators
                    .insert(gossipsub::IdentTopic::new(topic).hash(), v);
                let _ = ack.send(Ok(()));
            }
            Command::Publish(topic, data, ack) => {
                let t = gossipsub::IdentTopic::new(topic.clone());
                let result = match self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(t, data.to_vec())
                {
                    // Nobody listens (yet): like publishing to an empty room, not an error.
                    Ok(_) | Err(gossipsub::PublishError::NoPeersSubscribedToTopic) => Ok(()),
                    Err(e) => Err(NetworkError::Gossip(format!("publish on {topic}: {e}")).into()),
                };
                let _ = ack.send(result);
            }
            Command::Handle(method, tx, ack) => {
                let result = match self.handlers.write() {
                    Ok(h) if h.get(&method).is_some_and(|h| !h.is_closed()) => {
                        Err(NetworkError::Method {
                            method,
                            reason: "already handled".into(),
                        }
                        .into())
                    }
                    Ok(mut h) => {
                        h.insert(method, tx);
                        Ok(())
                    }
                    Err(_) => Err(NetworkError::Shutdown.into()),
                };
                let _ = ack.send(result);
            }
            Command::Request(peer, body, ack) => {
                if self
                    .swarm
                    .behaviour()
                    .blocked
                    .blocked_peers()
                    .contains(&peer)
                {
                    let _ = ack.send(Err(NetworkError::Banned(peer).into()));
                    return;
                }
                let id = self.send_request(peer, body);
                self.outbound.insert(id, Outbound::User(ack));
            }
            Command::Rtt(peer, ack) => {
                let _ = ack.send(Ok(self.rtts.get(&peer).copied()));
            }
            Command::PeerAddrs(peer, ack) => {
                let addrs = self
                    .remote_addrs
                    .get(&peer)
                    .map(|c| c.values().cloned().collect())
                    .unwrap_or_default();
                let _ = ack.send(Ok(addrs));
            }
            Command::Ban(peer, ack) => {
                self.swarm.behaviour_mut().blocked.block_peer(peer);
                self.swarm.behaviour_mut().kad.remove_peer(&peer);
                self.addresses.remove(&peer);
                let _ = ack.send(Ok(()));
            }
            Command::Shutdown(_) => unreachable!("handled by the loop"),
        }
    }

    fn send_request(&mut self, peer: PeerId, body: Bytes) -> OutboundRequestId {
        let rr = &mut self.swarm.behaviour_mut().rr;
        match self.addresses.get(&peer) {
            Some(addrs) if !rr.is_connected(&peer) => {
                rr.send_request_with_addresses(&peer, RrRequest::Outbound(body), addrs.clone())
            }
            _ => rr.send_request(&peer, RrRequest::Outbound(body)),
        }
    }

    fn describe_body() -> Bytes {
        let req = Request {
            method: DESCRIBE_METHOD.into(),
            meta: Bytes::new(),
            tensor: Bytes::new(),
        };
        wire::encode_request(&req, usize::MAX).expect("no limit")
    }

    fn on_providers_found(&mut self, id: kad::QueryId, providers: HashSet<PeerId>) {
        let Some(find) = self.finds.get_mut(&id) else {
            return;
        };
        let new: Vec<PeerId> = providers
            .into_iter()
            .filter(|p| find.asked.len() < MAX_DESCRIBED + 1 && find.asked.insert(*p))
            .collect();
        find.outstanding += new.len();
        for peer in new {
            let rid = self.send_request(peer, Self::describe_body());
            self.outbound
                .insert(rid, Outbound::Describe { find: id, peer });
        }
    }

    fn on_describe(&mut self, find: kad::QueryId, peer: PeerId, result: Result<Response>) {
        let Some(f) = self.finds.get_mut(&find) else {
            return;
        };
        f.outstanding = f.outstanding.saturating_sub(1);
        match result.and_then(|r| wire::decode_describe(&r.meta)) {
            Ok((announcements, addrs)) => {
                for a in announcements {
                    if matches_find(&a, f.model, f.layer) {
                        f.found.push(Provider {
                            peer_id: peer,
                            layers: a.layers,
                            addrs: addrs.clone(),
                            free_memory: a.free_memory,
                            tokens_per_sec: a.tokens_per_sec,
                        });
                    }
                }
            }
            Err(e) => tracing::debug!("describe {peer}: {e}"),
        }
        if f.dht_done && f.outstanding == 0 {
            self.finish_find(find);
        }
    }

    fn finish_find(&mut self, id: kad::QueryId) {
        if let Some(mut f) = self.finds.remove(&id) {
            f.found.sort_by(|a, b| {
                a.peer_id
                    .cmp(&b.peer_id)
                    .then(a.layers.start.cmp(&b.layers.start))
            });
            if let Some(r) = f.reply.take() {
                let _ = r.send(Ok(f.found));
            }
        }
    }

    fn local_describe(&self) -> Response {
        Response {
            meta: wire::encode_describe(&self.announcements, &self.listen),
            tensor: Bytes::new(),
        }
    }

    fn on_inbound_request(
        &mut self,
        peer: PeerId,
        request: RrRequest,
        channel: ResponseChannel<RrResponse>,
    ) {
        let request = match request {
            RrRequest::Inbound(Ok(r)) => r,
            RrRequest::Inbound(Err((status, message))) => {
                tracing::debug!("bad request from {peer}: {status}: {message}");
                self.send_reply(channel, Some(Reply::Err(status, message)));
                return;
            }
            RrRequest::Outbound(_) => return,
        };
        if request.method == DESCRIBE_METHOD {
            let reply = Reply::Ok(self.local_describe());
            self.send_reply(channel, Some(reply));
            return;
        }
        match streams::dispatch(&self.handlers, peer, request) {
            Ok(rx) => self
                .pending_replies
                .push(async move { (channel, rx.await.ok()) }.boxed()),
            Err(reply) => self.send_reply(channel, Some(reply)),
        }
    }

    fn send_reply(&mut self, channel: ResponseChannel<RrResponse>, reply: Option<Reply>) {
        let body = streams::reply_body(reply.as_ref(), self.limits.max_response_bytes);
        // Fails only if the requester is gone; nothing to do then.
        let _ = self
            .swarm
            .behaviour_mut()
            .rr
            .send_response(channel, RrResponse(body));
    }

    fn on_gossip(&mut self, source: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        let Some(publisher) = message.source else {
            let _ = self
                .swarm
                .behaviour_mut()
                .gossipsub
                .report_message_validation_result(
                    &id,
                    &source,
                    gossipsub::MessageAcceptance::Reject,
                );
            return;
        };
        let announce_hash = gossipsub::IdentTopic::new(ANNOUNCE_TOPIC).hash();
        let mut verdict = match self.validators.get(&message.topic) {
            Some(v) => v(&publisher, &message.data),
            None => Validation::Accept,
        };
        let mut announced = None;
        if verdict == Validation::Accept && message.topic == announce_hash {
            match wire::decode_announce(&message.data) {
                Ok(list) => announced = Some(list),
                Err(_) => verdict = Validation::Reject,
            }
        }
        let acceptance = match verdict {
            Validation::Accept => gossipsub::MessageAcceptance::Accept,
            Validation::Reject => gossipsub::MessageAcceptance::Reject,
            Validation::Ignore => gossipsub::MessageAcceptance::Ignore,
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &source, acceptance);
        if verdict != Validation::Accept {
            return;
        }
        if let Some(list) = announced {
            self.on_remote_announcements(publisher, list);
        }
        if let Some((name, subs)) = self.subscribers.get_mut(&message.topic) {
            let data = Bytes::from(message.data);
            subs.retain(|s| !s.is_closed());
            for s in subs.iter() {
                // A full subscriber misses this message rather than stalling the loop.
                let _ = s.try_send(GossipMessage {
                    source: publisher,
                    topic: name.clone(),
                    data: data.clone(),
                });
            }
        }
    }

    fn on_remote_announcements(&mut self, peer: PeerId, list: Vec<Announcement>) {
        let old = self
            .remote_announcements
            .insert(peer, list.clone())
            .unwrap_or_default();
        for (model, layers) in super::announcement_changes(&old, &list) {
            self.emit(Event::ProvidersChanged {
                model,
                peer,
                layers,
            });
        }
    }

    fn remember_address(&mut self, peer: PeerId, addr: Multiaddr) {
        let list = self.addresses.entry(peer).or_default();
        if !list.contains(&addr) {
            list.push(addr);
            if list.len() > 16 {
                list.remove(0);
            }
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
        match event {
            SwarmEvent::NewListenAddr { address, .. } => {
                let me = *self.swarm.local_peer_id();
                let full = address.clone().with(Protocol::P2p(me));
                if !self.listen.contains(&full) {
                    self.listen.push(full);
                }
                if self.listen_is_external && !address.iter().any(|p| p == Protocol::P2pCircuit) {
                    self.swarm.add_external_address(address.clone());
                }
                self.emit(Event::Listening { addr: address });
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen
                    .retain(|a| !a.to_string().starts_with(&address.to_string()));
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                if let Some(ack) = self.dials.remove(&connection_id) {
                    let _ = ack.send(Ok(()));
                }
                for ack in self.peer_dials.remove(&peer_id).unwrap_or_default() {
                    let _ = ack.send(Ok(()));
                }
                self.remote_addrs
                    .entry(peer_id)
                    .or_default()
                    .insert(connection_id, endpoint.get_remote_address().clone());
                if let ConnectedPoint::Dialer { address, .. } = &endpoint {
                    self.remember_address(peer_id, address.clone());
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer_id, address.clone());
                }
                if num_established.get() == 1 {
                    self.emit(Event::PeerConnected { peer: peer_id });
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                ..
            } => {
                if let Some(c) = self.remote_addrs.get_mut(&peer_id) {
                    c.remove(&connection_id);
                }
                if num_established == 0 {
                    self.remote_addrs.remove(&peer_id);
                    self.rtts.remove(&peer_id);
                    self.emit(Event::PeerDisconnected { peer: peer_id });
                }
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
                ..
            } => {
                let target = peer_id
                    .map(|p| p.to_string())
                    .unwrap_or_else(|| "address".into());
                let waiting = peer_id
                    .filter(|p| !self.swarm.is_connected(p))
                    .and_then(|p| self.peer_dials.remove(&p))
                    .unwrap_or_default();
                for ack in self.dials.remove(&connection_id).into_iter().chain(waiting) {
                    let _ = ack.send(Err(NetworkError::Dial {
                        target: target.clone(),
                        reason: error.to_string(),
                    }
                    .into()));
                }
            }
            SwarmEvent::Behaviour(event) => self.on_behaviour_event(event),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, event: BehaviourEvent) {
        match event {
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                let speaks_kad = info.protocols.iter().any(|p| p.as_ref() == KAD_PROTOCOL);
                for addr in info.listen_addrs {
                    // A peer's loopback address is only useful if we are on the same host,
                    // which is exactly the case where it is reported; keep them all.
                    if speaks_kad {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, addr.clone());
                    }
                    self.remember_address(peer_id, addr);
                }
                if speaks_kad && !self.had_peers {
                    self.had_peers = true;
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    // Records published while alone reached no one: publish them now.
                    self.reprovide();
                    self.publish_announcements();
                }
            }
            BehaviourEvent::Ping(ping::Event {
                peer,
                result: Ok(rtt),
                ..
            }) => {
                self.rtts.insert(peer, rtt);
                self.emit(Event::Rtt { peer, rtt });
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            }) => match result {
                kad::QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
                    providers,
                    ..
                })) => {
                    self.on_providers_found(id, providers);
                    if step.last {
                        self.on_find_dht_done(id);
                    }
                }
                kad::QueryResult::GetProviders(_)
                    if step.last => {
                        self.on_find_dht_done(id);
                    }
                kad::QueryResult::StartProviding(Err(e)) => tracing::debug!("providing: {e}"),
                _ => {}
            },
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip(propagation_source, message_id, message),
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { topic, .. })
                // A new listener of announcements: tell it what we serve, once
                // per second at most however many peers join.
                if topic == gossipsub::IdentTopic::new(ANNOUNCE_TOPIC).hash()
                    && !self.announcements.is_empty()
                    && self.announce_due.is_none()
                => {
                    self.announce_due = Some(Instant::now() + Duration::from_secs(1));
                }
            BehaviourEvent::Rr(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => self.on_inbound_request(peer, request, channel),
                    request_response::Message::Response {
                        request_id,
                        response,
                    } => {
                        let limit = self.limits.max_response_bytes;
                        let result = wire::decode_response(response.0, limit, peer);
                        self.on_outbound_result(request_id, result);
                    }
                }
            }
            BehaviourEvent::Rr(request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            }) => {
                let e = outbound_error(peer, &error);
                self.on_outbound_result(request_id, Err(e));
            }
            BehaviourEvent::Rr(request_response::Event::InboundFailure { peer, error, .. }) => {
                tracing::debug!("inbound request from {peer} failed: {error}");
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(list)) => {
                for (peer, addr) in list {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    self.remember_address(peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self
                            .swarm
                            .dial(DialOpts::peer_id(peer).addresses(vec![addr]).build());
                    }
                }
            }
            _ => {}
        }
    }

    fn on_find_dht_done(&mut self, id: kad::QueryId) {
        if let Some(f) = self.finds.get_mut(&id) {
            f.dht_done = true;
            if f.outstanding == 0 {
                self.finish_find(id);
            }
        }
    }

    fn on_outbound_result(&mut self, id: OutboundRequestId, result: Result<Response>) {
        match self.outbound.remove(&id) {
            Some(Outbound::User(ack)) => {
                let _ = ack.send(result);
            }
            Some(Outbound::Describe { find, peer }) => self.on_describe(find, peer, result),
            None => {}
        }
    }
}

fn matches_find(a: &Announcement, model: ModelId, layer: Option<u32>) -> bool {
    a.model == model && layer.is_none_or(|l| a.layers.contains(&l))
}

/// Layers as an `[a, b]` pair (for JSON output).
pub fn range_pair(r: &Range<u32>) -> [u32; 2] {
    [r.start, r.end]
}

/// An `Arc`'d node, the form `Node` and the FFI layer hold.
pub type SharedNetwork = Arc<dyn Network>;
