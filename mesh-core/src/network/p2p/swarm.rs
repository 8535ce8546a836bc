//! The libp2p behaviours, the DHT keys they use, and the swarm built from a
//! [`P2pConfig`].

use super::*;

#[derive(NetworkBehaviour)]
pub(super) struct Behaviour {
    pub(super) limits: connection_limits::Behaviour,
    pub(super) blocked: allow_block_list::Behaviour<allow_block_list::BlockedPeers>,
    pub(super) identify: identify::Behaviour,
    pub(super) ping: ping::Behaviour,
    pub(super) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(super) gossipsub: gossipsub::Behaviour,
    pub(super) rr: request_response::Behaviour<MeshCodec>,
    pub(super) stream: libp2p_stream::Behaviour,
    pub(super) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(super) relay_client: relay::client::Behaviour,
    pub(super) relay: Toggle<relay::Behaviour>,
    pub(super) dcutr: dcutr::Behaviour,
    pub(super) autonat: autonat::Behaviour,
}

/// DHT key of a model (its CID, see [`super::keys`]).
pub fn model_key(model: &ModelId) -> kad::RecordKey {
    kad::RecordKey::new(&keys::model_key(model))
}

/// DHT key of one layer of a model (a CID, see [`super::keys`]).
pub fn layer_key(model: &ModelId, layer: u32) -> kad::RecordKey {
    kad::RecordKey::new(&keys::layer_key(model, layer))
}

pub(super) fn keys_of(a: &Announcement) -> Vec<kad::RecordKey> {
    keys::announcement_keys(a)
        .iter()
        .map(kad::RecordKey::new)
        .collect()
}

pub(super) fn build_swarm(config: &P2pConfig) -> Result<Swarm<Behaviour>> {
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
