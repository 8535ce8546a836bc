//! The simplified Kademlia of the in-memory network: keys, the routing
//! table, iterative lookups, provider records and their republishing.

use super::*;

pub(super) fn sha256(parts: &[&[u8]]) -> Key {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

pub(super) fn peer_key(peer: &PeerId) -> Key {
    sha256(&[&peer.to_bytes()])
}

/// Distances between provider keys ([`keys`]) are taken between their
/// SHA-256 hashes, as libp2p's Kademlia does.
pub(super) fn model_key(model: &ModelId) -> Key {
    sha256(&[&keys::model_key(model)])
}

pub(super) fn layer_key(model: &ModelId, layer: u32) -> Key {
    sha256(&[&keys::layer_key(model, layer)])
}

/// The provider keys of an announcement: the model and each of its layers.
pub(super) fn announcement_keys(a: &Announcement) -> Vec<Key> {
    keys::announcement_keys(a)
        .iter()
        .map(|k| sha256(&[k]))
        .collect()
}

pub(super) fn distance(a: &Key, b: &Key) -> Key {
    let mut d = [0u8; 32];
    for (i, x) in d.iter_mut().enumerate() {
        *x = a[i] ^ b[i];
    }
    d
}

pub(super) fn bucket_index(local: &Key, key: &Key) -> Option<usize> {
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
pub(super) struct Table {
    pub(super) local: Key,
    pub(super) buckets: Vec<Vec<(PeerId, Key)>>,
}

impl Table {
    pub(super) fn new(local: Key) -> Table {
        Table {
            local,
            buckets: vec![Vec::new(); 256],
        }
    }

    pub(super) fn remove(&mut self, peer: &PeerId) {
        if let Some(b) = bucket_index(&self.local, &peer_key(peer)) {
            self.buckets[b].retain(|(p, _)| p != peer);
        }
    }

    pub(super) fn closest(&self, target: &Key, n: usize, exclude: &PeerId) -> Vec<PeerId> {
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
pub(super) enum KadOp {
    FindNode,
    GetProviders,
    AddProvider,
    RemoveProvider,
}

impl KadOp {
    pub(super) fn one_way(self) -> bool {
        matches!(self, KadOp::AddProvider | KadOp::RemoveProvider)
    }
}

#[derive(Default)]
pub(super) struct KadReply {
    pub(super) closer: Vec<PeerId>,
    pub(super) providers: Vec<PeerId>,
}

impl KadReply {
    pub(super) fn bytes(&self) -> usize {
        16 + (self.closer.len() + self.providers.len()) * KAD_PEER_BYTES
    }
}

impl World {
    /// Adds `peer` to node `at`'s routing table (or refreshes it).
    pub(super) fn table_insert(&mut self, at: usize, peer: PeerId) {
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
    pub(super) fn handle_kad(
        &mut self,
        to: usize,
        from_peer: PeerId,
        op: KadOp,
        key: Key,
    ) -> KadReply {
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
}

pub(super) struct Lookup {
    pub(super) closest: Vec<PeerId>,
    pub(super) providers: BTreeSet<PeerId>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Probe {
    NotQueried,
    Waiting,
    Succeeded,
    Failed,
}

impl MemoryNet {
    /// One Kademlia request from node `from` to `to_peer` and its reply,
    /// within the request deadline; `None` if it failed or timed out.
    pub(super) async fn kad_rpc(
        &self,
        from: usize,
        to_peer: PeerId,
        op: KadOp,
        key: Key,
    ) -> Option<KadReply> {
        let deadline = self.lock().config.rpc_timeout;
        tokio::time::timeout(deadline, self.kad_exchange(from, to_peer, op, key))
            .await
            .ok()
            .flatten()
    }

    pub(super) async fn kad_exchange(
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
    pub(super) async fn lookup(
        &self,
        me: usize,
        target: Key,
        op: KadOp,
        deadline: Option<Instant>,
    ) -> Lookup {
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
    pub(super) async fn put_record(&self, me: usize, key: Key, op: KadOp) {
        let found = self.lookup(me, key, KadOp::FindNode, None).await;
        futures::future::join_all(found.closest.iter().map(|p| self.kad_rpc(me, *p, op, key)))
            .await;
    }

    pub(super) async fn put_records(&self, me: usize, keys: Vec<Key>, op: KadOp) {
        futures::future::join_all(keys.into_iter().map(|k| self.put_record(me, k, op))).await;
    }

    pub(super) fn start_republishing(&self, me: usize) {
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
}

pub(super) fn provider_of(
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
