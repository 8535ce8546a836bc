//! [`MemoryNetwork`]: one node's handle, and its [`Network`] implementation.

use super::*;

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
    ///
    /// The lookup gets three quarters of `timeout` and stops there with the
    /// providers it has: a peer that never answers its query (a partition)
    /// must not use up the time the describes of the others need. (The
    /// libp2p implementation describes each provider as it is found.)
    async fn find_providers(
        &self,
        model: ModelId,
        layer: Option<u32>,
        timeout: Duration,
    ) -> Result<Vec<Provider>> {
        self.alive()?;
        let now = Instant::now();
        let deadline = later(now, timeout);
        let lookup_deadline = later(now, timeout.saturating_mul(3) / 4);
        let key = layer.map_or_else(|| model_key(&model), |l| layer_key(&model, l));
        let found = self
            .net
            .lookup(self.index, key, KadOp::GetProviders, Some(lookup_deadline))
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
