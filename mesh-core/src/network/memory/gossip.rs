//! Gossip in the in-memory network: flooding with deduplication and
//! validation, and the announcements it carries.

use super::*;

impl World {
    /// Node `at` sends (or forwards) `msg` to its connected peers subscribed
    /// to the topic, except `except` and the source.
    pub(super) fn forward(
        &mut self,
        net: &MemoryNet,
        at: usize,
        msg: &Arc<Gossip>,
        except: Option<PeerId>,
    ) {
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
    pub(super) fn publish(&mut self, net: &MemoryNet, at: usize, topic: &str, data: Bytes) {
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
    pub(super) fn learn_announcements(
        &mut self,
        at: usize,
        source: PeerId,
        list: Vec<Announcement>,
    ) {
        let node = &mut self.nodes[at];
        let old = node.known.remove(&source).unwrap_or_default();
        for (model, layers) in crate::network::announcement_changes(&old, &list) {
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

impl MemoryNet {
    pub(super) async fn deliver_gossip(
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
}
