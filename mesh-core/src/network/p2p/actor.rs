//! The task that owns the swarm: its loop, the commands from
//! [`P2pNetwork`] handles, requests and their replies.

use super::*;

impl State {
    pub(super) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
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

    pub(super) fn emit(&self, e: Event) {
        let _ = self.events.send(e);
    }

    pub(super) fn begin_shutdown(&mut self, ack: Ack<()>) {
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

    pub(super) fn on_tick(&mut self) {
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

    pub(super) fn reprovide(&mut self) {
        let keys: Vec<kad::RecordKey> = self.announcements.iter().flat_map(keys_of).collect();
        for k in keys {
            if let Err(e) = self.swarm.behaviour_mut().kad.start_providing(k) {
                tracing::warn!("re-providing failed: {e}");
            }
        }
    }

    pub(super) fn dial(&mut self, addr: Multiaddr, ack: Ack<()>) {
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

    pub(super) fn publish_announcements(&mut self) {
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

    pub(super) fn withdraw(&mut self, model: ModelId) {
        let Some(i) = self.announcements.iter().position(|a| a.model == model) else {
            return;
        };
        let old = self.announcements.remove(i);
        for k in keys_of(&old) {
            self.swarm.behaviour_mut().kad.stop_providing(&k);
        }
        self.publish_announcements();
    }

    pub(super) fn on_command(&mut self, command: Command) {
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

    pub(super) fn send_request(&mut self, peer: PeerId, body: Bytes) -> OutboundRequestId {
        let rr = &mut self.swarm.behaviour_mut().rr;
        match self.addresses.get(&peer) {
            Some(addrs) if !rr.is_connected(&peer) => {
                rr.send_request_with_addresses(&peer, RrRequest::Outbound(body), addrs.clone())
            }
            _ => rr.send_request(&peer, RrRequest::Outbound(body)),
        }
    }

    pub(super) fn on_inbound_request(
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

    pub(super) fn send_reply(
        &mut self,
        channel: ResponseChannel<RrResponse>,
        reply: Option<Reply>,
    ) {
        let body = streams::reply_body(reply.as_ref(), self.limits.max_response_bytes);
        // Fails only if the requester is gone; nothing to do then.
        let _ = self
            .swarm
            .behaviour_mut()
            .rr
            .send_response(channel, RrResponse(body));
    }

    pub(super) fn remember_address(&mut self, peer: PeerId, addr: Multiaddr) {
        let list = self.addresses.entry(peer).or_default();
        if !list.contains(&addr) {
            list.push(addr);
            if list.len() > 16 {
                list.remove(0);
            }
        }
    }

    pub(super) fn on_outbound_result(&mut self, id: OutboundRequestId, result: Result<Response>) {
        match self.outbound.remove(&id) {
            Some(Outbound::User(ack)) => {
                let _ = ack.send(result);
            }
            Some(Outbound::Describe { find, peer }) => self.on_describe(find, peer, result),
            None => {}
        }
    }
}
