//! Links and connections of the in-memory network: sending on a link,
//! dialling, pings, requests and their answers.

use super::*;

impl World {
    pub(super) fn link(&self, a: PeerId, b: PeerId) -> &LinkConfig {
        let key = if a <= b { (a, b) } else { (b, a) };
        self.links.get(&key).unwrap_or(&self.default_link)
    }

    pub(super) fn partitioned(&self, a: &PeerId, b: &PeerId) -> bool {
        match &self.groups {
            None => false,
            Some(g) => g.get(a) != g.get(b),
        }
    }

    pub(super) fn check_alive(&self, index: usize) -> Result<()> {
        match self.nodes.get(index) {
            Some(n) if n.alive => Ok(()),
            _ => Err(NetworkError::Shutdown.into()),
        }
    }

    /// Puts `bytes` on the link from node `from` to `to_peer`.
    pub(super) fn send(&mut self, from: usize, to_peer: PeerId, bytes: usize) -> Sent {
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
    pub(super) fn arrive(&mut self, from_peer: PeerId, to: usize, bytes: usize) -> Arrived {
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
    pub(super) fn can_connect(&self, me: usize, peer: PeerId) -> Result<usize> {
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
    pub(super) fn establish(&mut self, a: usize, b: usize, rtt: Duration) -> bool {
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
    pub(super) fn ping(&mut self, me: usize, peer: PeerId) -> bool {
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

    pub(super) fn disconnect(&mut self, a: usize, peer: PeerId) {
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
    pub(super) fn teardown(&mut self, index: usize) {
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

    /// Node `to` answers `bytes` (a request frame) from `from_peer`.
    pub(super) fn answer(&mut self, to: usize, from_peer: PeerId, bytes: Bytes) -> Answer {
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
}

/// What a node answers to a request, now or once its handler replies.
pub(super) enum Answer {
    Now(Bytes),
    Later(oneshot::Receiver<Reply>, usize),
}

pub(super) fn status_of(e: &crate::Error) -> RemoteStatus {
    match e {
        crate::Error::Network(NetworkError::TooLarge { .. }) => RemoteStatus::TooLarge,
        crate::Error::Network(NetworkError::UnsupportedVersion { .. }) => {
            RemoteStatus::UnsupportedVersion
        }
        _ => RemoteStatus::Malformed,
    }
}

impl MemoryNet {
    pub(super) async fn ensure_connected(&self, me: usize, peer: PeerId) -> Result<()> {
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
    pub(super) async fn exchange(&self, me: usize, peer: PeerId, bytes: Bytes) -> Result<Bytes> {
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
    pub(super) async fn request_from(
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
    pub(super) async fn describe(
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

/// A lost message: waits forever (the caller's deadline ends it) unless
/// this node or the peer dies first.
pub(super) async fn lost<T>(
    my_dead: &mut watch::Receiver<bool>,
    peer_dead: &mut watch::Receiver<bool>,
    peer: PeerId,
) -> Result<T> {
    watch_both(my_dead, peer_dead, peer, std::future::pending::<()>()).await?;
    Err(NetworkError::ConnectionClosed { peer }.into())
}

/// Runs `fut` unless this node or the peer dies first.
pub(super) async fn watch_both<F: Future>(
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
