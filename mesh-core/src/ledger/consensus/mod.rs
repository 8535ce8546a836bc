//! Stake-weighted BFT consensus on ledger blocks.
//!
//! The algorithm is Tendermint as implemented by Malachite's core
//! (`informalsystems-malachitebft-core-consensus`): a pure state machine that
//! asks, through effects, for everything outside it. This module answers
//! those effects with this project's pieces: votes and proposals travel on
//! the node's own [`Network`](crate::network::Network) (gossip topic [`LEDGER_TOPIC`], one libp2p swarm
//! and one identity per node), they are signed with the node's Ed25519 key,
//! timers are tokio's, and decided blocks go to a [`ChainStore`].
//!
//! * **Validators and stake** come from the [`Genesis`](crate::ledger::chain::Genesis) and change only by
//!   [`StakeTransfer`]s decided in blocks ([`super::stake`]): each height
//!   runs with the validator set of the stakes after the block before it
//!   (Malachite gets it with each `StartHeight`). A node whose stake reaches
//!   0 stops voting; one that receives stake starts. Transfers travel on the
//!   same gossip topic; proposers include the valid ones they hold, and a
//!   proposal whose transfers do not apply is dropped. A validator's
//!   voting power is its stake. The proposer of a height is drawn with
//!   probability proportional to stake (BLAKE3 of the chain and height), and
//!   the following rounds rotate through the validator list, so a dead
//!   proposer costs one round.
//! * **Values** are whole [`Block`]s carried in the proposal (Malachite's
//!   `ProposalOnly` mode): blocks are small (at most [`super::chain::MAX_BLOCK_BYTES`]).
//!   A validator checks a proposed block before consensus sees it (height,
//!   parent, every record's signature, the active-adapter rule, and the
//!   application's own [`BlockBuilder::check`]); a block that fails is
//!   dropped, so the validator prevotes nil for that round.
//! * **Decisions** carry a commit certificate (precommits of more than 2/3
//!   of the stake) which [`super::chain::verify_chain`] checks offline.
//! * **Catching up**: every node publishes its decided height every
//!   [`LedgerConfig::status_interval`]; a node that learns of a longer chain
//!   asks that peer for the missing blocks over request/response
//!   ([`SYNC_METHOD`]) and appends each only after verifying its
//!   certificate. Non-validators (followers) only do this.
//!
//! * **Restarts**: what Malachite asks to persist for the height under way
//!   (votes and proposals received, timeouts that fired, values this node
//!   proposed) goes to the store's write-ahead log
//!   ([`ChainStore::wal_append`]) before Malachite acts on it; a validator
//!   started on a store that holds a log for its next height replays it
//!   after starting the height, and comes back in the state it had (round,
//!   votes, lock and valid value), proposing again the very block it had
//!   proposed, if any. Each signed vote is also recorded before it is sent
//!   and never contradicted ([`ChainStore::signed_vote`]). A decided
//!   height's log is dropped with its votes.
//!
//! Not yet: gossip of Malachite's polka and round certificates (votes are
//! rebroadcast instead).

mod context;
mod effects;
mod runner;
mod store;
mod wal;
mod wire;

pub use context::*;
pub use runner::start;
pub use store::*;
pub use wire::*;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, watch};

use crate::engine::ModelId;
use crate::ledger::chain::{Block, BlockHash, Certificate, MAX_BLOCK_BYTES};
use crate::ledger::stake::{StakeTransfer, Stakes};
use crate::ledger::LedgerError;
use crate::network::{Identity, PeerId};

/// Gossip topic of consensus messages (votes, proposals, status).
pub const LEDGER_TOPIC: &str = "mesh-llm/ledger/1";

/// Request/response method that serves decided blocks with their
/// certificates, by height.
pub const SYNC_METHOD: &str = "mesh/ledger/sync/1";

/// Version of [`LedgerMsg`] this build writes and reads.
pub const LEDGER_MSG_VERSION: u32 = 1;

/// Largest consensus message accepted (a proposal carries a whole block).
pub const MAX_LEDGER_MSG_BYTES: usize = MAX_BLOCK_BYTES + 1024;

/// Timeouts and intervals of a ledger node.
#[derive(Clone, Debug)]
pub struct LedgerConfig {
    /// How long to wait for round 0's proposal.
    pub propose_timeout: Duration,
    /// How long to wait for more votes after seeing 2/3 of any.
    pub vote_timeout: Duration,
    /// Added to both per round, so rounds lengthen until the network keeps up.
    pub round_delta: Duration,
    /// How often a validator re-sends its last votes (for lost messages).
    pub rebroadcast: Duration,
    /// How often a node publishes its decided height.
    pub status_interval: Duration,
    /// Deadline of one sync request.
    pub sync_timeout: Duration,
    /// Wait this long after a decision before starting the next height
    /// (rate limits empty blocks).
    pub block_interval: Duration,
}

impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            propose_timeout: Duration::from_millis(1500),
            vote_timeout: Duration::from_millis(500),
            round_delta: Duration::from_millis(500),
            rebroadcast: Duration::from_secs(1),
            status_interval: Duration::from_secs(2),
            sync_timeout: Duration::from_secs(5),
            block_interval: Duration::from_secs(1),
        }
    }
}

/// Where an active adapter comes from ([`LedgerHandle::active_source`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ActiveSource {
    /// The adapter's id (BLAKE3 of its file).
    pub adapter: ModelId,
    /// Its file's size.
    pub size: u64,
    /// A peer that holds it: the update's author, or the proposer of the
    /// block that aggregated it (every validator that voted for it does too).
    pub holder: PeerId,
    /// The height of the block that made it active.
    pub height: u64,
}

/// A ledger node's state as others see it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LedgerStatus {
    /// Height of the last decided block.
    pub height: u64,
    /// Its hash (the genesis hash before any block).
    pub tip: BlockHash,
    /// The consensus round of the height under way (validators only).
    pub round: u32,
    /// Base model -> the adapter the ledger says it runs.
    pub active: BTreeMap<ModelId, ModelId>,
    /// Whether this node votes.
    pub validator: bool,
    /// The highest decided height heard from a peer (0: none heard yet).
    pub peers_height: u64,
    /// The stakes after the last decided block: who validates the next
    /// height.
    pub stakes: Stakes,
}

impl LedgerStatus {
    /// Whether this node has heard from a peer and holds as many blocks as
    /// any peer it heard.
    pub fn is_synced(&self) -> bool {
        self.peers_height > 0 && self.height >= self.peers_height
    }
}

/// Something a ledger node did or refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LedgerEvent {
    /// A block was decided here.
    Decided {
        /// Height.
        height: u64,
        /// Hash.
        hash: BlockHash,
        /// The round it was decided in.
        round: u32,
    },
    /// A block decided elsewhere was fetched and verified.
    Synced {
        /// Height.
        height: u64,
        /// From whom.
        from: PeerId,
    },
    /// A message was refused (bad encoding, bad block, wrong chain).
    Rejected {
        /// Who sent it.
        from: PeerId,
        /// Why.
        reason: String,
    },
}

pub(super) type SharedChain = Arc<Mutex<Box<dyn ChainStore>>>;

/// A running ledger node (a validator if its identity has stake in the
/// genesis, a follower otherwise). Dropping the handle stops it.
pub struct LedgerHandle {
    status: watch::Receiver<LedgerStatus>,
    events: broadcast::Sender<LedgerEvent>,
    chain: SharedChain,
    submit: mpsc::Sender<StakeTransfer>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LedgerHandle {
    /// The latest status.
    pub fn status(&self) -> LedgerStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes.
    pub fn watch(&self) -> watch::Receiver<LedgerStatus> {
        self.status.clone()
    }

    /// A receiver of events from now on.
    pub fn events(&self) -> broadcast::Receiver<LedgerEvent> {
        self.events.subscribe()
    }

    /// Block `height` with its certificate, if decided here.
    pub fn block(&self, height: u64) -> Option<(Block, Certificate)> {
        self.chain.lock().ok()?.get(height)
    }

    /// Where the adapter the ledger makes active for `model` comes from (the
    /// newest block that set it): `None` if it names none.
    pub fn active_source(&self, model: ModelId) -> Option<ActiveSource> {
        let chain = self.chain.lock().ok()?;
        for height in (1..=chain.height()).rev() {
            let (block, _) = chain.get(height)?;
            let Some(adapter) = block.active.get(&model).copied() else {
                continue;
            };
            if let Some(g) = block.aggregates.get(&model) {
                return Some(ActiveSource {
                    adapter,
                    size: g.adapter_size,
                    holder: block.proposer,
                    height,
                });
            }
            let record = block.updates.iter().find(|u| u.base == model)?;
            return Some(ActiveSource {
                adapter,
                size: record.adapter_size,
                holder: record.author,
                height,
            });
        }
        None
    }

    /// Offers a signed stake transfer to the validators (gossiped, re-sent
    /// every [`LedgerConfig::status_interval`] until a block applies it or
    /// it can no longer apply). It takes effect at the height after the
    /// block that carries it: watch [`LedgerStatus::stakes`].
    pub fn submit_stake(&self, tx: StakeTransfer) -> Result<(), LedgerError> {
        let stakes = self.status.borrow().stakes.clone();
        if tx.chain != stakes.chain() {
            return Err(LedgerError::Malformed(
                "stake transfer: signed for another chain".into(),
            ));
        }
        let next = stakes.next_nonce(&tx.from);
        if tx.nonce < next {
            return Err(LedgerError::Malformed(format!(
                "stake transfer: nonce {} was used; the next is {next}",
                tx.nonce
            )));
        }
        self.submit
            .try_send(tx)
            .map_err(|e| LedgerError::Malformed(format!("stake transfer not queued: {e}")))
    }

    /// Signs (with `identity`, the stake holder's key) and submits a transfer
    /// of `amount` of its stake to `to`, numbered after the holder's last
    /// decided transfer. Returns the transfer (its inclusion shows in
    /// [`LedgerStatus::stakes`]).
    pub fn transfer_stake(
        &self,
        identity: &Identity,
        to: PeerId,
        amount: u64,
    ) -> Result<StakeTransfer, LedgerError> {
        let stakes = self.status.borrow().stakes.clone();
        let nonce = stakes.next_nonce(&identity.peer_id());
        let tx = StakeTransfer::sign(identity, stakes.chain(), to, amount, nonce)?;
        stakes.check(&tx)?;
        self.submit_stake(tx.clone())?;
        Ok(tx)
    }

    /// Waits until the chain reaches `height`; false if the node stopped.
    pub async fn wait_for_height(&self, height: u64) -> bool {
        let mut rx = self.status.clone();
        let reached = rx.wait_for(|s| s.height >= height).await.is_ok();
        reached
    }

    /// Stops the node and waits for it.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for LedgerHandle {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
