//! The task that drives Malachite: it feeds the state machine votes,
//! proposals, timeouts and synced blocks, replays the write-ahead log of a
//! height it restarts in, stores decisions and syncs; the effects are
//! answered in `effects.rs`.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use malachitebft_core_consensus as mc;
use malachitebft_core_types as mt;
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use super::{
    encode_stake, BlockBuilder, ChainStore, Decoded, Height, Keys, LedgerConfig, LedgerEvent,
    LedgerHandle, LedgerStatus, MeshContext, SharedChain, SyncReply, SyncRequest, ValidatorId,
    ValidatorSet, LEDGER_TOPIC, SYNC_METHOD,
};
use crate::ledger::chain::{verify_link, Block, BlockHash, Certificate, Genesis};
use crate::ledger::stake::{StakeTransfer, Stakes};
use crate::ledger::LedgerError;
use crate::network::{Identity, Network, PeerId, Request, Response};

use super::effects::{Fx, MAX_MEMPOOL};
use super::wal;
use super::wire::{decode_sync_reply, encode_status};

/// Starts a ledger node on `net` for `genesis`, with `identity`'s key,
/// appending decided blocks to `store` (which may already hold a prefix of
/// the chain: it is verified first).
pub async fn start(
    net: Arc<dyn Network>,
    genesis: Genesis,
    identity: &Identity,
    store: Box<dyn ChainStore>,
    mut builder: Box<dyn BlockBuilder>,
    config: LedgerConfig,
) -> crate::Result<LedgerHandle> {
    let chain = genesis.hash();
    let me = identity.peer_id();
    // Verify what the store holds, and find the tip, the active adapters
    // and the stakes of the next height.
    let mut tip = chain;
    let mut active = BTreeMap::new();
    let mut stakes = Stakes::genesis(&genesis);
    for h in 1..=store.height() {
        let (block, cert) = store
            .get(h)
            .ok_or_else(|| LedgerError::Malformed(format!("the store lacks block {h}")))?;
        stakes = verify_link(&stakes, h, tip, &block, &cert)?;
        builder.decided(&block);
        tip = block.hash();
        active.extend(block.active.iter().map(|(b, a)| (*b, *a)));
    }
    let height = store.height();
    let valset = ValidatorSet::from_stakes(&stakes)?;
    let validator = stakes.power_of(&me) > 0;
    // Messages that do not decode are neither delivered nor forwarded, and
    // count against the peer that published them.
    let well_formed: crate::network::Validator = Arc::new(|_, data| match Decoded::decode(data) {
        Ok(_) => crate::network::Validation::Accept,
        Err(_) => crate::network::Validation::Reject,
    });
    net.set_validator(LEDGER_TOPIC, well_formed).await?;
    let gossip = net.subscribe(LEDGER_TOPIC).await?;
    let sync_in = net.handle(SYNC_METHOD).await?;
    let (status_tx, status_rx) = watch::channel(LedgerStatus {
        height,
        tip,
        round: 0,
        active,
        validator,
        peers_height: 0,
        stakes: stakes.clone(),
    });
    let (events, _) = broadcast::channel(256);
    let chain_store: SharedChain = Arc::new(Mutex::new(store));
    let ctx = MeshContext::new(chain);
    let keys = Keys::new(chain, identity);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel();
    let (synced_tx, synced_rx) = mpsc::channel(16);
    let (submit_tx, submit_rx) = mpsc::channel(64);
    let mut runner = Runner {
        fx: Fx {
            ctx: ctx.clone(),
            chain: chain_store.clone(),
            keys,
            valset,
            stakes,
            mempool: Vec::new(),
            me: ValidatorId(me),
            config,
            timers: HashMap::new(),
            outbox: Vec::new(),
            pending: VecDeque::new(),
            blocks: HashMap::new(),
            decided: None,
            round: 0,
            wal_height: 0,
            wal_seen: HashSet::new(),
            proposed: HashMap::new(),
        },
        consensus: None,
        net,
        builder,
        chain: chain_store.clone(),
        status: status_tx,
        events: events.clone(),
        future: Vec::new(),
        syncing: false,
        synced_tx,
        best_peer: None,
        start_at: None,
        own: Vec::new(),
    };
    if validator {
        runner.start_height(height + 1);
    }
    let task = tokio::spawn(runner.run(gossip, sync_in, synced_rx, submit_rx, stop_rx));
    Ok(LedgerHandle {
        status: status_rx,
        events,
        chain: chain_store,
        submit: submit_tx,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

struct Runner {
    fx: Fx,
    consensus: Option<mc::State<MeshContext>>,
    net: Arc<dyn Network>,
    builder: Box<dyn BlockBuilder>,
    chain: SharedChain,
    status: watch::Sender<LedgerStatus>,
    events: broadcast::Sender<LedgerEvent>,
    /// Proposals for the next height, kept until this node decides the current one.
    future: Vec<(PeerId, mt::SignedProposal<MeshContext>)>,
    syncing: bool,
    synced_tx: mpsc::Sender<SyncResult>,
    /// The peer with the longest chain heard of, and its height.
    /// (Validators in this node's view first.)
    best_peer: Option<(PeerId, u64, bool)>,
    /// When to start the next height (after [`LedgerConfig::block_interval`]).
    start_at: Option<(Instant, u64)>,
    /// Stake transfers submitted here, re-sent until applied or stale.
    own: Vec<StakeTransfer>,
}

const MAX_FUTURE_PROPOSALS: usize = 64;

/// A sync request's outcome: the peer asked, and its block or why not.
type SyncResult = (PeerId, Result<(Block, Certificate), String>);

impl Runner {
    fn height(&self) -> u64 {
        self.status.borrow().height
    }

    fn tip(&self) -> BlockHash {
        self.status.borrow().tip
    }

    fn start_height(&mut self, height: u64) {
        self.fx.blocks.clear();
        self.fx.timers.clear();
        let state = self.consensus.get_or_insert_with(|| {
            mc::State::new(
                self.fx.ctx.clone(),
                mc::Params {
                    initial_height: Height(height),
                    initial_validator_set: self.fx.valset.clone(),
                    address: self.fx.me,
                    threshold_params: mt::ThresholdParams::default(),
                    value_payload: mt::ValuePayload::ProposalOnly,
                },
                64,
            )
        });
        let _ = state;
        self.fx.pending.push_back(mc::Input::StartHeight(
            Height(height),
            self.fx.valset.clone(),
        ));
        self.replay_wal(height);
    }

    /// Queues what the write-ahead log holds for `height` (a restart in
    /// the middle of it), in order, after its start.
    fn replay_wal(&mut self, height: u64) {
        self.fx.wal_height = height;
        self.fx.wal_seen.clear();
        self.fx.proposed.clear();
        let entries = match self.chain.lock() {
            Ok(chain) => chain.wal(height),
            Err(_) => return,
        };
        if !entries.is_empty() {
            tracing::info!(
                "ledger: replaying {} logged consensus inputs of height {height}",
                entries.len()
            );
        }
        for bytes in entries {
            self.fx.wal_seen.insert(*blake3::hash(&bytes).as_bytes());
            match wal::decode(&bytes) {
                Ok(wal::Entry::Message(Decoded::Vote(v))) => {
                    self.fx.pending.push_back(mc::Input::Vote(v));
                }
                Ok(wal::Entry::Message(Decoded::Proposal(p))) => {
                    let block = &p.message.block;
                    self.fx.blocks.insert(block.hash(), block.clone());
                    self.fx.pending.push_back(mc::Input::Proposal(*p));
                }
                Ok(wal::Entry::Message(_)) => {}
                Ok(wal::Entry::Timeout(t)) => {
                    self.fx.pending.push_back(mc::Input::TimeoutElapsed(t));
                }
                Ok(wal::Entry::Proposed(round, block)) => {
                    self.fx.blocks.insert(block.hash(), block.clone());
                    self.fx.proposed.insert(round, block);
                }
                Err(e) => tracing::error!("ledger: height {height}: {e}"),
            }
        }
    }

    /// Starts `height` and hands it the proposals for it heard early.
    fn begin_height(&mut self, height: u64) {
        self.start_height(height);
        for (from, p) in std::mem::take(&mut self.future) {
            if p.message.height.0 == height {
                self.on_proposal(from, p);
            }
        }
    }

    /// Feeds pending inputs to Malachite until none are left.
    fn drain(&mut self) {
        while let Some(input) = self.fx.pending.pop_front() {
            let Some(state) = self.consensus.as_mut() else {
                self.fx.pending.clear();
                return;
            };
            let tip = self.status.borrow().tip;
            let fx = &mut self.fx;
            let builder = &mut *self.builder;
            let result: Result<(), mc::Error<MeshContext>> = mc::process!(
                input: input,
                state: state,
                metrics: &(),
                with: effect => fx.handle(effect, builder, tip)
            );
            if let Err(e) = result {
                tracing::warn!("ledger consensus: {e}");
            }
            if let Some((block, cert)) = self.fx.decided.take() {
                let round = cert.round;
                let next = match self.fx.stakes.after(&block) {
                    Ok(next) => next,
                    Err(e) => {
                        // Every validator checked the transfers before voting.
                        tracing::error!(
                            "ledger: decided block {} does not apply: {e}",
                            block.height
                        );
                        continue;
                    }
                };
                if self.append(&block, &cert, next) {
                    let _ = self.events.send(LedgerEvent::Decided {
                        height: block.height,
                        hash: block.hash(),
                        round,
                    });
                    self.schedule_next(block.height + 1);
                }
            }
            let round = self.fx.round;
            self.status.send_if_modified(|s| {
                let changed = s.round != round;
                s.round = round;
                changed
            });
        }
    }

    fn schedule_next(&mut self, height: u64) {
        if !self.is_validator() {
            return;
        }
        self.fx.timers.clear();
        self.start_at = Some((Instant::now() + self.fx.config.block_interval, height));
        self.fx.outbox.push(encode_status(height - 1));
    }

    /// Whether this node holds stake at the height under way.
    fn is_validator(&self) -> bool {
        self.fx.stakes.power_of(&self.fx.me.0) > 0
    }

    /// Appends a decided block (`next`: the stakes after it); false if it
    /// does not extend the chain.
    fn append(&mut self, block: &Block, cert: &Certificate, next: Stakes) -> bool {
        if block.height != self.height() + 1 || block.parent != self.tip() {
            return false;
        }
        let stored = match self.chain.lock() {
            Ok(mut chain) => chain.append(block, cert),
            Err(_) => Err(LedgerError::Malformed("chain store poisoned".into())),
        };
        if let Err(e) = stored {
            tracing::error!("ledger: cannot store block {}: {e}", block.height);
            return false;
        }
        self.builder.decided(block);
        let changed = next != self.fx.stakes;
        if changed {
            self.set_stakes(next);
        }
        let stakes = changed.then(|| self.fx.stakes.clone());
        let validator = self.is_validator();
        self.status.send_modify(|s| {
            s.height = block.height;
            s.tip = block.hash();
            s.active.extend(block.active.iter().map(|(b, a)| (*b, *a)));
            if let Some(stakes) = stakes {
                s.stakes = stakes;
                s.validator = validator;
            }
        });
        true
    }

    /// The stakes after a decided block: the next height's validator set;
    /// this node stops or starts voting with them.
    fn set_stakes(&mut self, next: Stakes) {
        match ValidatorSet::from_stakes(&next) {
            Ok(set) => self.fx.valset = set,
            // Transfers only name receivers with Ed25519 keys (checked at decode).
            Err(e) => tracing::error!("ledger: validator set: {e}"),
        }
        self.fx.stakes = next;
        let stakes = &self.fx.stakes;
        self.fx.mempool.retain(|t| stakes.may_apply(t));
        self.own.retain(|t| stakes.may_apply(t));
        if !self.is_validator() && self.consensus.is_some() {
            tracing::info!("ledger: this node's stake is gone; it stops voting");
            self.consensus = None;
            self.fx.timers.clear();
            self.fx.pending.clear();
            self.start_at = None;
            self.future.clear();
        }
    }

    /// Keeps a transfer heard or submitted, if it may still apply.
    fn hold_stake(&mut self, tx: StakeTransfer) -> bool {
        if !self.fx.stakes.may_apply(&tx) {
            return false;
        }
        if self.fx.mempool.len() >= MAX_MEMPOOL || self.fx.mempool.iter().any(|t| t.id() == tx.id())
        {
            return false;
        }
        self.fx.mempool.push(tx);
        true
    }

    fn reject(&self, from: PeerId, reason: String) {
        tracing::debug!("ledger: refused a message from {from}: {reason}");
        let _ = self.events.send(LedgerEvent::Rejected { from, reason });
    }

    /// `peer` (the gossip's authenticated publisher) says it has decided
    /// `height`. Only validators are listened to: anyone else could make
    /// this node wait for blocks that do not exist.
    fn heard_of(&mut self, peer: PeerId, height: u64) {
        let trusted = self.fx.stakes.power_of(&peer) > 0;
        if trusted {
            self.status.send_if_modified(|s| {
                let higher = height > s.peers_height;
                s.peers_height = s.peers_height.max(height);
                higher
            });
        }
        // Others are asked only while no validator is ahead: after stake
        // moved, this node's (old) view may name none of the validators
        // still running. What they send is verified like any block.
        let better = match self.best_peer {
            None => true,
            Some((_, h, t)) => (trusted, height) > (t, h),
        };
        if height > self.height() && better {
            self.best_peer = Some((peer, height, trusted));
        }
        self.maybe_sync();
    }

    fn maybe_sync(&mut self) {
        let Some((peer, best, _)) = self.best_peer else {
            return;
        };
        if best <= self.height() {
            self.best_peer = None;
            return;
        }
        if self.syncing {
            return;
        }
        self.syncing = true;
        let want = self.height() + 1;
        let net = self.net.clone();
        let tx = self.synced_tx.clone();
        let timeout = self.fx.config.sync_timeout;
        tokio::spawn(async move {
            let request = Request {
                method: SYNC_METHOD.into(),
                meta: Bytes::from(SyncRequest { height: want }.encode_to_vec()),
                tensor: Bytes::new(),
            };
            let result = match net.request(peer, request, timeout).await {
                Ok(resp) => decode_sync_reply(&resp.meta),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send((peer, result)).await;
        });
    }

    fn on_synced(&mut self, from: PeerId, result: Result<(Block, Certificate), String>) {
        self.syncing = false;
        match result {
            Ok((block, cert)) => {
                let height = self.height() + 1;
                match verify_link(&self.fx.stakes, height, self.tip(), &block, &cert) {
                    Ok(next) => {
                        if self.append(&block, &cert, next) {
                            let _ = self.events.send(LedgerEvent::Synced { height, from });
                            if self.is_validator() {
                                self.start_at = None;
                                self.begin_height(height + 1);
                            }
                        }
                    }
                    Err(e) => {
                        self.reject(from, format!("synced block {height}: {e}"));
                        self.best_peer = None;
                    }
                }
            }
            Err(e) => {
                tracing::debug!("ledger: sync from {from} failed: {e}");
                self.best_peer = None;
            }
        }
        self.maybe_sync();
    }

    fn on_gossip(&mut self, from: PeerId, data: &[u8]) {
        let msg = match Decoded::decode(data) {
            Ok(m) => m,
            Err(e) => return self.reject(from, e.to_string()),
        };
        let current = self.height() + 1;
        match msg {
            Decoded::Status(h) => self.heard_of(from, h),
            Decoded::Stake(tx) => {
                if let Err(e) = self.fx.stakes.check(&tx) {
                    // A later nonce may apply after the giver's earlier ones.
                    if tx.nonce <= self.fx.stakes.next_nonce(&tx.from) {
                        return self.reject(from, e.to_string());
                    }
                }
                self.hold_stake(tx);
            }
            Decoded::Vote(v) => {
                let h = v.message.height.0;
                if h > current {
                    self.heard_of(from, h - 1);
                }
                if self.consensus.is_some() && h >= current {
                    self.fx.pending.push_back(mc::Input::Vote(v));
                }
            }
            Decoded::Proposal(p) => {
                let h = p.message.height.0;
                if h > current {
                    self.heard_of(from, h - 1);
                    if h == current + 1 && self.future.len() < MAX_FUTURE_PROPOSALS {
                        self.future.push((from, *p));
                    }
                    return;
                }
                if h == current && self.consensus.is_some() {
                    self.on_proposal(from, *p);
                }
            }
        }
    }

    fn on_proposal(&mut self, from: PeerId, p: mt::SignedProposal<MeshContext>) {
        let block = &p.message.block;
        if block.parent != self.tip() {
            return self.reject(
                from,
                format!(
                    "proposal for height {}: parent {} is not this chain's tip",
                    block.height, block.parent
                ),
            );
        }
        if let Err(e) = self.fx.stakes.after(block) {
            return self.reject(from, format!("proposal for height {}: {e}", block.height));
        }
        if let Err(e) = self.builder.check(block) {
            return self.reject(from, format!("proposal for height {}: {e}", block.height));
        }
        self.fx.blocks.insert(block.hash(), block.clone());
        self.fx.pending.push_back(mc::Input::Proposal(p));
    }

    fn on_sync_request(&self, inbound: crate::network::InboundRequest) {
        let height = match SyncRequest::decode(inbound.request.meta.as_ref()) {
            Ok(r) => r.height,
            Err(e) => return inbound.reject(format!("sync request: {e}")),
        };
        let found = self.chain.lock().ok().and_then(|c| c.get(height));
        match found {
            Some((block, cert)) => inbound.respond(Response {
                meta: Bytes::from(
                    SyncReply {
                        block: block.encoded().to_vec(),
                        certificate: cert.encode(),
                    }
                    .encode_to_vec(),
                ),
                tensor: Bytes::new(),
            }),
            None => inbound.reject(format!("block {height} is not decided here")),
        }
    }

    async fn flush(&mut self) {
        for msg in std::mem::take(&mut self.fx.outbox) {
            if let Err(e) = self.net.publish(LEDGER_TOPIC, msg).await {
                tracing::debug!("ledger: publish failed: {e}");
            }
        }
    }

    fn next_deadline(&self, status_at: Instant) -> Instant {
        let mut at = status_at;
        if let Some((t, _)) = self.start_at {
            at = at.min(t);
        }
        if let Some(t) = self.fx.timers.values().min() {
            at = at.min(*t);
        }
        at
    }

    fn fire_due(&mut self) {
        let now = Instant::now();
        if let Some((t, h)) = self.start_at {
            if t <= now {
                self.start_at = None;
                if h == self.height() + 1 {
                    self.begin_height(h);
                }
            }
        }
        let mut due: Vec<(Instant, mt::Timeout)> = self
            .fx
            .timers
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(t, at)| (*at, *t))
            .collect();
        due.sort_by_key(|(at, _)| *at);
        for (_, t) in due {
            self.fx.timers.remove(&t);
            self.fx.pending.push_back(mc::Input::TimeoutElapsed(t));
        }
    }

    async fn run(
        mut self,
        mut gossip: mpsc::Receiver<crate::network::GossipMessage>,
        mut sync_in: mpsc::Receiver<crate::network::InboundRequest>,
        mut synced: mpsc::Receiver<SyncResult>,
        mut submitted: mpsc::Receiver<StakeTransfer>,
        mut stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        let mut status_at = Instant::now();
        loop {
            self.drain();
            self.flush().await;
            if Instant::now() >= status_at {
                let h = self.height();
                self.fx.outbox.push(encode_status(h));
                for tx in &self.own {
                    self.fx.outbox.push(encode_stake(tx));
                }
                self.flush().await;
                status_at = Instant::now() + self.fx.config.status_interval;
            }
            let deadline = self.next_deadline(status_at);
            tokio::select! {
                _ = &mut stop => break,
                m = gossip.recv() => match m {
                    Some(m) => self.on_gossip(m.source, &m.data),
                    None => break,
                },
                r = sync_in.recv() => if let Some(r) = r {
                    self.on_sync_request(r);
                },
                s = synced.recv() => if let Some((from, result)) = s {
                    self.on_synced(from, result);
                },
                t = submitted.recv() => if let Some(tx) = t {
                    self.fx.outbox.push(encode_stake(&tx));
                    if self.hold_stake(tx.clone()) {
                        self.own.push(tx);
                    }
                },
                _ = tokio::time::sleep_until(deadline) => self.fire_due(),
            }
        }
    }
}
