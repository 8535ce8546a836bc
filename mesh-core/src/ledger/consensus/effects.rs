//! Malachite's effects, answered: timers, gossip, signatures (with the
//! double-sign guard), the write-ahead log, proposals built from the
//! node's `BlockBuilder`, and decisions handed back to the runner.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use bytes::Bytes;
use malachitebft_core_consensus as mc;
use malachitebft_core_types as mt;
use mt::SigningProviderExt as _;
use tokio::time::Instant;

use super::wal;
use super::{
    encode_proposal, encode_vote, BlockBuilder, Keys, LedgerConfig, MeshContext, SharedChain,
    ValidatorId, ValidatorSet, Vote,
};
use crate::ledger::chain::{Block, BlockDraft, BlockHash, Certificate, CommitSig, MAX_BLOCK_STAKE};
use crate::ledger::stake::{StakeTransfer, Stakes};

/// Everything the effect handler touches (apart from Malachite's state).
pub(super) struct Fx {
    pub(super) ctx: MeshContext,
    pub(super) chain: SharedChain,
    pub(super) keys: Keys,
    /// The validator set of the height under way (from `stakes`).
    pub(super) valset: ValidatorSet,
    /// The stakes after the last decided block.
    pub(super) stakes: Stakes,
    /// Stake transfers heard and not yet applied (at most [`MAX_MEMPOOL`]).
    pub(super) mempool: Vec<StakeTransfer>,
    pub(super) me: ValidatorId,
    pub(super) config: LedgerConfig,
    pub(super) timers: HashMap<mt::Timeout, Instant>,
    pub(super) outbox: Vec<Bytes>,
    pub(super) pending: VecDeque<mc::Input<MeshContext>>,
    /// Blocks proposed at the current height, by hash.
    pub(super) blocks: HashMap<BlockHash, Block>,
    /// A decision made during the last input, to store after it.
    pub(super) decided: Option<(Block, Certificate)>,
    pub(super) round: u32,
    /// The height whose inputs go to the write-ahead log (see `wal`).
    pub(super) wal_height: u64,
    /// BLAKE3 of the entries logged for it (replayed inputs log nothing again).
    pub(super) wal_seen: HashSet<[u8; 32]>,
    /// Blocks this node proposed at that height, by round.
    pub(super) proposed: HashMap<u32, Block>,
}

/// Most stake transfers a node holds for proposals.
pub(super) const MAX_MEMPOOL: usize = 256;

impl Fx {
    /// The transfers of the mempool that apply in turn to the current stakes
    /// (lowest nonces first), at most [`MAX_BLOCK_STAKE`].
    pub(super) fn applicable_stake(&self) -> Vec<StakeTransfer> {
        let mut candidates = self.mempool.clone();
        candidates.sort_by_key(|t| (t.nonce, t.id()));
        let mut stakes = self.stakes.clone();
        candidates
            .into_iter()
            .filter(|t| stakes.apply(t).is_ok())
            .take(MAX_BLOCK_STAKE)
            .collect()
    }

    /// Never two different votes for one (height, round, step): a vote is
    /// recorded in the store before it is signed, and one already recorded
    /// (say, before a restart) is signed again instead of a conflicting one.
    fn guard_vote(&self, mut v: Vote) -> Result<Vote, String> {
        let value = match &v.value {
            mt::NilOrVal::Nil => None,
            mt::NilOrVal::Val(h) => Some(*h),
        };
        let round = v.round.as_u32().unwrap_or(0);
        let mut store = self.chain.lock().map_err(|_| "chain store poisoned")?;
        match store.signed_vote(v.height.0, round, v.kind) {
            Some(before) if before != value => {
                tracing::warn!(
                    "ledger: already voted {:?} at height {} round {round}; not signing {:?}",
                    before,
                    v.height,
                    value
                );
                v.value = match before {
                    None => mt::NilOrVal::Nil,
                    Some(h) => mt::NilOrVal::Val(h),
                };
            }
            Some(_) => {}
            None => store
                .record_vote(v.height.0, round, v.kind, value)
                .map_err(|e| format!("cannot record a vote: {e}"))?,
        }
        Ok(v)
    }

    /// Logs `entry` for the height under way (before Malachite acts on it).
    fn wal_append(&mut self, entry: &mc::WalEntry<MeshContext>) -> Result<(), String> {
        let Some(bytes) = wal::encode(entry, &self.me) else {
            return Ok(());
        };
        // Logged values are this node's own, in a round (see `wal::encode`).
        if let mc::WalEntry::ProposedValue(v) = entry {
            if let Some(round) = v.round.as_u32() {
                self.proposed.insert(round, v.value.clone());
            }
        }
        if !self.wal_seen.insert(*blake3::hash(&bytes).as_bytes()) {
            return Ok(());
        }
        let mut store = self.chain.lock().map_err(|_| "chain store poisoned")?;
        store
            .wal_append(self.wal_height, &bytes)
            .map_err(|e| format!("cannot log a consensus input: {e}"))
    }

    fn timeout_length(&self, t: &mt::Timeout) -> Duration {
        let round = t.round.as_u32().unwrap_or(0).min(64);
        let c = &self.config;
        match t.kind {
            mt::TimeoutKind::Propose => c.propose_timeout + c.round_delta * round,
            mt::TimeoutKind::Prevote | mt::TimeoutKind::Precommit => {
                c.vote_timeout + c.round_delta * round
            }
            mt::TimeoutKind::Rebroadcast => c.rebroadcast,
        }
    }

    pub(super) fn handle(
        &mut self,
        effect: mc::Effect<MeshContext>,
        builder: &mut dyn BlockBuilder,
        tip: BlockHash,
    ) -> Result<mc::Resume<MeshContext>, String> {
        use mc::{Effect as E, Resumable as _};
        Ok(match effect {
            E::ResetTimeouts(r) => r.resume_with(()),
            E::CancelAllTimeouts(r) => {
                self.timers.clear();
                r.resume_with(())
            }
            E::CancelTimeout(t, r) => {
                self.timers.remove(&t);
                r.resume_with(())
            }
            E::ScheduleTimeout(t, r) => {
                let at = Instant::now() + self.timeout_length(&t);
                self.timers.insert(t, at);
                r.resume_with(())
            }
            E::GetValidatorSet(_, r) => r.resume_with(Some(self.valset.clone())),
            E::StartRound(_, round, _, _, r) => {
                self.round = round.as_u32().unwrap_or(0);
                r.resume_with(())
            }
            E::PublishConsensusMsg(msg, r) => {
                match msg {
                    mc::SignedConsensusMsg::Vote(v) => self.outbox.push(encode_vote(&v)),
                    mc::SignedConsensusMsg::Proposal(p) => {
                        self.blocks
                            .insert(p.message.block.hash(), p.message.block.clone());
                        self.outbox.push(encode_proposal(&p));
                    }
                }
                r.resume_with(())
            }
            E::PublishLivenessMsg(msg, r) => {
                if let mc::LivenessMsg::Vote(v) = msg {
                    self.outbox.push(encode_vote(&v));
                }
                r.resume_with(())
            }
            E::RepublishVote(v, r) => {
                self.outbox.push(encode_vote(&v));
                r.resume_with(())
            }
            E::RepublishRoundCertificate(_, r) => r.resume_with(()),
            E::GetValue(height, round, _, r) => {
                // Proposed before (and logged): the same block again.
                if let Some(block) = round.as_u32().and_then(|r| self.proposed.get(&r)) {
                    self.pending
                        .push_back(mc::Input::Propose(mc::LocallyProposedValue::new(
                            height,
                            round,
                            block.clone(),
                        )));
                    return Ok(r.resume_with(()));
                }
                let stake = self.applicable_stake();
                let mut draft = builder.draft(height.0);
                draft.stake = stake.clone();
                let block = Block::build(height.0, tip, self.me.0, draft)
                    .or_else(|e| {
                        tracing::warn!("ledger: the block builder's draft is invalid ({e}); proposing a block without updates");
                        let draft = BlockDraft { stake, ..Default::default() };
                        Block::build(height.0, tip, self.me.0, draft)
                    })
                    .map_err(|e| e.to_string())?;
                self.blocks.insert(block.hash(), block.clone());
                self.pending
                    .push_back(mc::Input::Propose(mc::LocallyProposedValue::new(
                        height, round, block,
                    )));
                r.resume_with(())
            }
            E::RestreamProposal(.., r) => r.resume_with(()),
            E::SyncValue(_, r) => r.resume_with(()),
            E::Decide(cert, _, r) => {
                let block = self
                    .blocks
                    .get(&cert.value_id)
                    .cloned()
                    .ok_or_else(|| format!("decided block {} was never seen", cert.value_id))?;
                let cert = Certificate {
                    height: cert.height.0,
                    round: cert.round.as_u32().unwrap_or(0),
                    block: cert.value_id,
                    signatures: cert
                        .commit_signatures
                        .iter()
                        .map(|s| CommitSig {
                            validator: s.address.0,
                            signature: s.signature,
                        })
                        .collect(),
                };
                self.decided = Some((block, cert));
                r.resume_with(())
            }
            E::SignVote(v, r) => {
                let v = self.guard_vote(v)?;
                r.resume_with(mt::SigningProvider::sign_vote(&self.keys, v))
            }
            E::SignProposal(p, r) => {
                r.resume_with(mt::SigningProvider::sign_proposal(&self.keys, p))
            }
            E::VerifySignature(msg, key, r) => {
                use mt::SigningProvider as _;
                let ok = match &msg.message {
                    mc::ConsensusMsg::Vote(v) => {
                        self.keys.verify_signed_vote(v, &msg.signature, &key)
                    }
                    mc::ConsensusMsg::Proposal(p) => {
                        self.keys.verify_signed_proposal(p, &msg.signature, &key)
                    }
                };
                r.resume_with(ok)
            }
            E::VerifyCommitCertificate(c, set, th, r) => {
                r.resume_with(self.keys.verify_commit_certificate(&self.ctx, &c, &set, th))
            }
            E::VerifyPolkaCertificate(c, set, th, r) => {
                r.resume_with(self.keys.verify_polka_certificate(&self.ctx, &c, &set, th))
            }
            E::VerifyRoundCertificate(c, set, th, r) => {
                r.resume_with(self.keys.verify_round_certificate(&self.ctx, &c, &set, th))
            }
            E::WalAppend(entry, r) => {
                self.wal_append(&entry)?;
                r.resume_with(())
            }
            E::ExtendVote(_, _, _, r) => r.resume_with(None),
            E::VerifyVoteExtension(.., r) => r.resume_with(Ok(())),
        })
    }
}
