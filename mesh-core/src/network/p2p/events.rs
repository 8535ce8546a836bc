//! Swarm and behaviour events: connections, identify, ping, Kademlia,
//! gossip (validated announcements) and request-response.

use super::*;

impl State {
    pub(super) fn on_gossip(
        &mut self,
        source: PeerId,
        id: gossipsub::MessageId,
        message: gossipsub::Message,
    ) {
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

    pub(super) fn on_remote_announcements(&mut self, peer: PeerId, list: Vec<Announcement>) {
        let old = self
            .remote_announcements
            .insert(peer, list.clone())
            .unwrap_or_default();
        for (model, layers) in crate::network::announcement_changes(&old, &list) {
            self.emit(Event::ProvidersChanged {
                model,
                peer,
                layers,
            });
        }
    }

    pub(super) fn on_swarm_event(&mut self, event: SwarmEvent<BehaviourEvent>) {
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

    pub(super) fn on_behaviour_event(&mut self, event: BehaviourEvent) {
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
}
