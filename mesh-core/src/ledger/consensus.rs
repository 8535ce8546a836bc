//! Stake-weighted BFT consensus on ledger blocks.
//!
//! The algorithm is Tendermint as implemented by Malachite's core
//! (`informalsystems-malachitebft-core-consensus`): a pure state machine that
//! asks, through effects, for everything outside it. This module answers
//! those effects with this project's pieces: votes and proposals travel on
//! the node's own [`Network`] (gossip topic [`LEDGER_TOPIC`], one libp2p swarm
//! and one identity per node), they are signed with the node's Ed25519 key,
//! timers are tokio's, and decided blocks go to a [`ChainStore`].
//!
//! * **Validators and stake** come from the [`Genesis`] and change only by
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
//! Not yet: a write-ahead log of Malachite's state (a validator restarted
//! mid-height starts that height again from round 0; it never signs a vote
//! conflicting with one it recorded, see [`ChainStore::signed_vote`], but it
//! forgets a lock), and gossip of Malachite's polka and round certificates
//! (votes are rebroadcast instead).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use malachitebft_core_consensus as mc;
use malachitebft_core_types as mt;
use mt::SigningProviderExt as _;
use prost::Message;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::time::Instant;

use super::chain::{
    verify_link, Block, BlockDraft, BlockHash, Certificate, CommitSig, Genesis, MAX_BLOCK_BYTES,
    MAX_BLOCK_STAKE,
};
use super::stake::{StakeTransfer, Stakes};
use super::LedgerError;
use crate::engine::ModelId;
use crate::network::identity::ed25519_of;
use crate::network::{Identity, Network, PeerId, Request, Response};

/// Gossip topic of consensus messages (votes, proposals, status).
pub const LEDGER_TOPIC: &str = "mesh-llm/ledger/1";

/// Request/response method that serves decided blocks with their
/// certificates, by height.
pub const SYNC_METHOD: &str = "mesh/ledger/sync/1";

/// Version of [`LedgerMsg`] this build writes and reads.
pub const LEDGER_MSG_VERSION: u32 = 1;

/// Largest consensus message accepted (a proposal carries a whole block).
pub const MAX_LEDGER_MSG_BYTES: usize = MAX_BLOCK_BYTES + 1024;

const VOTE_DOMAIN: &[u8] = b"mesh-llm vote v1\0";
const PROPOSAL_DOMAIN: &[u8] = b"mesh-llm proposal v1\0";

/// A block height as Malachite sees it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Height(pub u64);

impl fmt::Display for Height {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl mt::Height for Height {
    const ZERO: Height = Height(0);
    const INITIAL: Height = Height(1);

    fn increment_by(&self, n: u64) -> Height {
        Height(self.0.saturating_add(n))
    }

    fn decrement_by(&self, n: u64) -> Option<Height> {
        self.0.checked_sub(n).map(Height)
    }

    fn as_u64(&self) -> u64 {
        self.0
    }
}

/// A validator's address: its peer id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ValidatorId(pub PeerId);

impl fmt::Display for ValidatorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl mt::Address for ValidatorId {}

impl mt::Value for Block {
    type Id = BlockHash;

    fn id(&self) -> BlockHash {
        self.hash()
    }
}

/// A validator with its key and voting power.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Validator {
    /// Its address.
    pub id: ValidatorId,
    /// The key its peer id embeds.
    pub key: VerifyingKey,
    /// Its stake.
    pub power: u64,
}

impl mt::Validator<MeshContext> for Validator {
    fn address(&self) -> &ValidatorId {
        &self.id
    }

    fn public_key(&self) -> &VerifyingKey {
        &self.key
    }

    fn voting_power(&self) -> u64 {
        self.power
    }
}

/// The validators of one height, sorted by peer id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidatorSet {
    validators: Vec<Validator>,
    total: u64,
}

impl ValidatorSet {
    /// The validator set `genesis` defines (that of height 1).
    pub fn from_genesis(genesis: &Genesis) -> Result<ValidatorSet, LedgerError> {
        ValidatorSet::from_stakes(&Stakes::genesis(genesis))
    }

    /// The validator set of `stakes`.
    pub fn from_stakes(stakes: &Stakes) -> Result<ValidatorSet, LedgerError> {
        let validators = stakes
            .validators()
            .iter()
            .map(|v| {
                Ok(Validator {
                    id: ValidatorId(v.peer_id),
                    key: ed25519_of(&v.peer_id)
                        .map_err(|e| LedgerError::Malformed(e.to_string()))?,
                    power: v.power,
                })
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        Ok(ValidatorSet {
            total: validators.iter().map(|v| v.power).sum(),
            validators,
        })
    }

    /// The validators.
    pub fn validators(&self) -> &[Validator] {
        &self.validators
    }
}

impl mt::ValidatorSet<MeshContext> for ValidatorSet {
    fn count(&self) -> usize {
        self.validators.len()
    }

    fn total_voting_power(&self) -> u64 {
        self.total
    }

    fn get_by_address(&self, address: &ValidatorId) -> Option<&Validator> {
        self.validators
            .binary_search_by(|v| v.id.cmp(address))
            .ok()
            .map(|i| &self.validators[i])
    }

    fn get_by_index(&self, index: usize) -> Option<&Validator> {
        self.validators.get(index)
    }
}

/// Prevote or precommit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum VoteKind {
    /// First voting step.
    Prevote,
    /// Second voting step; a quorum of these decides.
    Precommit,
}

/// A vote.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Vote {
    /// Prevote or precommit.
    pub kind: VoteKind,
    /// Height.
    pub height: Height,
    /// Round.
    pub round: mt::Round,
    /// The block voted for, or nil.
    pub value: mt::NilOrVal<BlockHash>,
    /// The voter.
    pub validator: ValidatorId,
}

impl mt::Vote<MeshContext> for Vote {
    fn height(&self) -> Height {
        self.height
    }

    fn round(&self) -> mt::Round {
        self.round
    }

    fn value(&self) -> &mt::NilOrVal<BlockHash> {
        &self.value
    }

    fn take_value(self) -> mt::NilOrVal<BlockHash> {
        self.value
    }

    fn vote_type(&self) -> mt::VoteType {
        match self.kind {
            VoteKind::Prevote => mt::VoteType::Prevote,
            VoteKind::Precommit => mt::VoteType::Precommit,
        }
    }

    fn validator_address(&self) -> &ValidatorId {
        &self.validator
    }

    fn extension(&self) -> Option<&mt::SignedExtension<MeshContext>> {
        None
    }

    fn take_extension(&mut self) -> Option<mt::SignedExtension<MeshContext>> {
        None
    }

    fn extend(self, _: mt::SignedExtension<MeshContext>) -> Vote {
        self
    }
}

/// A proposal: a whole block for a height and round.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proposal {
    /// Height.
    pub height: Height,
    /// Round.
    pub round: mt::Round,
    /// The proposed block.
    pub block: Block,
    /// The round of the polka this re-proposal relies on, or nil.
    pub pol_round: mt::Round,
    /// The proposer.
    pub proposer: ValidatorId,
}

impl mt::Proposal<MeshContext> for Proposal {
    fn height(&self) -> Height {
        self.height
    }

    fn round(&self) -> mt::Round {
        self.round
    }

    fn value(&self) -> &Block {
        &self.block
    }

    fn take_value(self) -> Block {
        self.block
    }

    fn pol_round(&self) -> mt::Round {
        self.pol_round
    }

    fn validator_address(&self) -> &ValidatorId {
        &self.proposer
    }
}

/// Proposal parts are not used (whole blocks travel in proposals).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoParts;

impl mt::ProposalPart<MeshContext> for NoParts {
    fn is_first(&self) -> bool {
        true
    }

    fn is_last(&self) -> bool {
        true
    }
}

/// Ed25519 signatures (the keys of Ed25519 peer ids).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ed25519;

impl mt::SigningScheme for Ed25519 {
    type DecodingError = String;
    type Signature = [u8; 64];
    type PublicKey = VerifyingKey;
    type PrivateKey = SigningKey;

    fn decode_signature(bytes: &[u8]) -> Result<[u8; 64], String> {
        bytes
            .try_into()
            .map_err(|_| format!("signature of {} bytes, expected 64", bytes.len()))
    }

    fn encode_signature(signature: &[u8; 64]) -> Vec<u8> {
        signature.to_vec()
    }
}

/// The types Malachite runs on, and the chain whose votes they sign.
#[derive(Clone, Debug)]
pub struct MeshContext {
    chain: BlockHash,
}

impl MeshContext {
    /// The context of the chain whose genesis hash is `chain`.
    pub fn new(chain: BlockHash) -> MeshContext {
        MeshContext { chain }
    }
}

impl mt::Context for MeshContext {
    type Address = ValidatorId;
    type Height = Height;
    type ProposalPart = NoParts;
    type Proposal = Proposal;
    type Validator = Validator;
    type ValidatorSet = ValidatorSet;
    type Value = Block;
    type Vote = Vote;
    type Extension = ();
    type SigningScheme = Ed25519;

    fn select_proposer<'a>(
        &self,
        validator_set: &'a ValidatorSet,
        height: Height,
        round: mt::Round,
    ) -> &'a Validator {
        let set = &validator_set.validators;
        let start = proposer_index(&self.chain, height.0, set);
        let round = u64::from(round.as_u32().unwrap_or(0));
        &set[((start as u64 + round) % set.len() as u64) as usize]
    }

    fn new_proposal(
        &self,
        height: Height,
        round: mt::Round,
        block: Block,
        pol_round: mt::Round,
        proposer: ValidatorId,
    ) -> Proposal {
        Proposal {
            height,
            round,
            block,
            pol_round,
            proposer,
        }
    }

    fn new_prevote(
        &self,
        height: Height,
        round: mt::Round,
        value: mt::NilOrVal<BlockHash>,
        validator: ValidatorId,
    ) -> Vote {
        Vote {
            kind: VoteKind::Prevote,
            height,
            round,
            value,
            validator,
        }
    }

    fn new_precommit(
        &self,
        height: Height,
        round: mt::Round,
        value: mt::NilOrVal<BlockHash>,
        validator: ValidatorId,
    ) -> Vote {
        Vote {
            kind: VoteKind::Precommit,
            height,
            round,
            value,
            validator,
        }
    }
}

/// The index of height `height`'s first proposer in `set`: drawn with
/// probability proportional to stake from BLAKE3(chain, height).
fn proposer_index(chain: &BlockHash, height: u64, set: &[Validator]) -> usize {
    let total: u64 = set.iter().map(|v| v.power).sum();
    let mut h = blake3::Hasher::new();
    h.update(b"mesh-llm proposer v1\0");
    h.update(&chain.0);
    h.update(&height.to_le_bytes());
    let digest = h.finalize();
    let draw = u64::from_le_bytes(digest.as_bytes()[..8].try_into().unwrap_or([0; 8]));
    let mut point = draw % total.max(1);
    for (i, v) in set.iter().enumerate() {
        if point < v.power {
            return i;
        }
        point -= v.power;
    }
    0
}

/// The bytes a validator signs for a vote: a domain tag, the chain (genesis
/// hash), kind, height, round, the block hash or nil, and the voter.
pub fn vote_sign_bytes(
    chain: &BlockHash,
    kind: VoteKind,
    height: u64,
    round: i64,
    block: Option<&BlockHash>,
    validator: &PeerId,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(VOTE_DOMAIN.len() + 32 + 1 + 16 + 33 + 40);
    out.extend_from_slice(VOTE_DOMAIN);
    out.extend_from_slice(&chain.0);
    out.push(match kind {
        VoteKind::Prevote => 1,
        VoteKind::Precommit => 2,
    });
    out.extend_from_slice(&height.to_le_bytes());
    out.extend_from_slice(&round.to_le_bytes());
    match block {
        None => out.push(0),
        Some(b) => {
            out.push(1);
            out.extend_from_slice(&b.0);
        }
    }
    out.extend_from_slice(&validator.to_bytes());
    out
}

fn proposal_sign_bytes(chain: &BlockHash, p: &Proposal) -> Vec<u8> {
    let mut out = Vec::with_capacity(PROPOSAL_DOMAIN.len() + 32 + 24 + 32 + 40);
    out.extend_from_slice(PROPOSAL_DOMAIN);
    out.extend_from_slice(&chain.0);
    out.extend_from_slice(&p.height.0.to_le_bytes());
    out.extend_from_slice(&p.round.as_i64().to_le_bytes());
    out.extend_from_slice(&p.pol_round.as_i64().to_le_bytes());
    out.extend_from_slice(&p.block.hash().0);
    out.extend_from_slice(&p.proposer.0.to_bytes());
    out
}

fn vote_bytes(chain: &BlockHash, v: &Vote) -> Vec<u8> {
    let block = match &v.value {
        mt::NilOrVal::Nil => None,
        mt::NilOrVal::Val(b) => Some(b),
    };
    vote_sign_bytes(
        chain,
        v.kind,
        v.height.0,
        v.round.as_i64(),
        block,
        &v.validator.0,
    )
}

/// A validator's signing key for one chain (also verifies anyone's
/// signatures on it).
#[derive(Clone)]
pub struct Keys {
    chain: BlockHash,
    key: SigningKey,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Keys({:?})", self.chain)
    }
}

impl Keys {
    /// `identity`'s key for the chain whose genesis hash is `chain`.
    pub fn new(chain: BlockHash, identity: &Identity) -> Keys {
        Keys {
            chain,
            key: identity.signing_key(),
        }
    }

    /// Signs `vote` (also for tests that play a faulty validator).
    pub fn sign_vote(&self, vote: &Vote) -> [u8; 64] {
        self.key.sign(&vote_bytes(&self.chain, vote)).to_bytes()
    }

    /// Signs `proposal`.
    pub fn sign_proposal(&self, proposal: &Proposal) -> [u8; 64] {
        self.key
            .sign(&proposal_sign_bytes(&self.chain, proposal))
            .to_bytes()
    }
}

fn verify(key: &VerifyingKey, bytes: &[u8], signature: &[u8; 64]) -> bool {
    key.verify(bytes, &ed25519_dalek::Signature::from_bytes(signature))
        .is_ok()
}

impl mt::SigningProvider<MeshContext> for Keys {
    fn sign_vote(&self, vote: Vote) -> mt::SignedVote<MeshContext> {
        let signature = Keys::sign_vote(self, &vote);
        mt::SignedMessage::new(vote, signature)
    }

    fn verify_signed_vote(&self, vote: &Vote, signature: &[u8; 64], key: &VerifyingKey) -> bool {
        verify(key, &vote_bytes(&self.chain, vote), signature)
    }

    fn sign_proposal(&self, proposal: Proposal) -> mt::SignedProposal<MeshContext> {
        let signature = Keys::sign_proposal(self, &proposal);
        mt::SignedMessage::new(proposal, signature)
    }

    fn verify_signed_proposal(
        &self,
        proposal: &Proposal,
        signature: &[u8; 64],
        key: &VerifyingKey,
    ) -> bool {
        verify(key, &proposal_sign_bytes(&self.chain, proposal), signature)
    }

    fn sign_proposal_part(&self, part: NoParts) -> mt::SignedMessage<MeshContext, NoParts> {
        let signature = self.key.sign(b"mesh-llm unused proposal part").to_bytes();
        mt::SignedMessage::new(part, signature)
    }

    fn verify_signed_proposal_part(&self, _: &NoParts, _: &[u8; 64], _: &VerifyingKey) -> bool {
        false
    }

    fn sign_vote_extension(&self, ext: ()) -> mt::SignedExtension<MeshContext> {
        let signature = self.key.sign(b"mesh-llm unused vote extension").to_bytes();
        mt::SignedMessage::new(ext, signature)
    }

    fn verify_signed_vote_extension(&self, _: &(), _: &[u8; 64], _: &VerifyingKey) -> bool {
        false
    }
}

/// A commit certificate for `block` signed by `signers` (precommits at
/// `round`): what consensus produces, for tools and tests that build chains
/// without running it. It verifies only if the signers hold more than 2/3
/// of `genesis`'s stake.
pub fn certify(genesis: &Genesis, block: &Block, round: u32, signers: &[Identity]) -> Certificate {
    let chain = genesis.hash();
    let signatures = signers
        .iter()
        .map(|id| {
            let vote = Vote {
                kind: VoteKind::Precommit,
                height: Height(block.height),
                round: mt::Round::new(round),
                value: mt::NilOrVal::Val(block.hash()),
                validator: ValidatorId(id.peer_id()),
            };
            CommitSig {
                validator: id.peer_id(),
                signature: Keys::new(chain, id).sign_vote(&vote),
            }
        })
        .collect();
    Certificate {
        height: block.height,
        round,
        block: block.hash(),
        signatures,
    }
}

/// Wire form of a vote.
#[derive(Clone, PartialEq, Message)]
pub struct VoteMsg {
    /// 1 prevote, 2 precommit.
    #[prost(uint32, tag = "1")]
    pub kind: u32,
    /// Height.
    #[prost(uint64, tag = "2")]
    pub height: u64,
    /// Round (>= 0).
    #[prost(int64, tag = "3")]
    pub round: i64,
    /// Block hash; empty for nil.
    #[prost(bytes = "vec", tag = "4")]
    pub block: Vec<u8>,
    /// Voter's peer id bytes.
    #[prost(bytes = "vec", tag = "5")]
    pub validator: Vec<u8>,
    /// 64-byte signature.
    #[prost(bytes = "vec", tag = "6")]
    pub signature: Vec<u8>,
}

/// Wire form of a proposal.
#[derive(Clone, PartialEq, Message)]
pub struct ProposalMsg {
    /// Height.
    #[prost(uint64, tag = "1")]
    pub height: u64,
    /// Round (>= 0).
    #[prost(int64, tag = "2")]
    pub round: i64,
    /// Polka round (-1 for none).
    #[prost(int64, tag = "3")]
    pub pol_round: i64,
    /// The encoded block.
    #[prost(bytes = "bytes", tag = "4")]
    pub block: Bytes,
    /// Proposer's peer id bytes.
    #[prost(bytes = "vec", tag = "5")]
    pub proposer: Vec<u8>,
    /// 64-byte signature.
    #[prost(bytes = "vec", tag = "6")]
    pub signature: Vec<u8>,
}

/// A message on [`LEDGER_TOPIC`]: exactly one of a vote, a proposal, or a
/// status (the sender's decided height).
#[derive(Clone, PartialEq, Message)]
pub struct LedgerMsg {
    /// [`LEDGER_MSG_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// A vote.
    #[prost(message, optional, tag = "2")]
    pub vote: Option<VoteMsg>,
    /// A proposal.
    #[prost(message, optional, tag = "3")]
    pub proposal: Option<ProposalMsg>,
    /// The sender's decided height (a status message when nothing else is set).
    #[prost(uint64, optional, tag = "4")]
    pub status: Option<u64>,
    /// A stake transfer ([`super::stake::StakeMsg`]) for proposers to include.
    #[prost(bytes = "vec", optional, tag = "5")]
    pub stake: Option<Vec<u8>>,
}

/// A decoded [`LedgerMsg`] (signatures not yet verified).
#[derive(Clone, Debug)]
pub enum Decoded {
    /// A vote with its signature.
    Vote(mt::SignedVote<MeshContext>),
    /// A proposal with its signature (the block itself checked by
    /// [`Block::decode`]).
    Proposal(Box<mt::SignedProposal<MeshContext>>),
    /// The sender's decided height.
    Status(u64),
    /// A stake transfer (its signature checked).
    Stake(StakeTransfer),
}

fn round_of(what: &str, r: i64, nil_ok: bool) -> Result<mt::Round, LedgerError> {
    match r {
        -1 if nil_ok => Ok(mt::Round::Nil),
        0..=0xFFFF_FFFF => Ok(mt::Round::new(r as u32)),
        _ => Err(LedgerError::Malformed(format!("{what} {r}"))),
    }
}

fn sig64(bytes: &[u8]) -> Result<[u8; 64], LedgerError> {
    bytes.try_into().map_err(|_| {
        LedgerError::Malformed(format!(
            "signature: expected 64 bytes, found {}",
            bytes.len()
        ))
    })
}

fn peer_of(what: &str, bytes: &[u8]) -> Result<PeerId, LedgerError> {
    PeerId::from_bytes(bytes).map_err(|e| LedgerError::Malformed(format!("{what}: {e}")))
}

impl Decoded {
    /// Decodes a consensus message: sizes and fields (and, for a proposal,
    /// the block with its records' signatures). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Decoded, LedgerError> {
        if bytes.len() > MAX_LEDGER_MSG_BYTES {
            return Err(LedgerError::TooLarge {
                what: "ledger message",
                size: bytes.len() as u64,
                limit: MAX_LEDGER_MSG_BYTES as u64,
            });
        }
        let msg = LedgerMsg::decode(bytes)
            .map_err(|e| LedgerError::Malformed(format!("ledger message: {e}")))?;
        if msg.version != LEDGER_MSG_VERSION {
            return Err(LedgerError::UnsupportedVersion(msg.version));
        }
        match (msg.vote, msg.proposal, msg.status, msg.stake) {
            (None, None, None, Some(t)) => Ok(Decoded::Stake(StakeTransfer::decode(&t)?)),
            (Some(v), None, None, None) => {
                let kind = match v.kind {
                    1 => VoteKind::Prevote,
                    2 => VoteKind::Precommit,
                    k => return Err(LedgerError::Malformed(format!("vote kind {k}"))),
                };
                let value = match v.block.len() {
                    0 => mt::NilOrVal::Nil,
                    32 => mt::NilOrVal::Val(BlockHash(
                        v.block.as_slice().try_into().unwrap_or([0; 32]),
                    )),
                    n => {
                        return Err(LedgerError::Malformed(format!(
                            "vote block hash of {n} bytes"
                        )))
                    }
                };
                let vote = Vote {
                    kind,
                    height: Height(v.height),
                    round: round_of("vote round", v.round, false)?,
                    value,
                    validator: ValidatorId(peer_of("voter", &v.validator)?),
                };
                Ok(Decoded::Vote(mt::SignedMessage::new(
                    vote,
                    sig64(&v.signature)?,
                )))
            }
            (None, Some(p), None, None) => {
                let block = Block::decode(&p.block)?;
                if block.height != p.height {
                    return Err(LedgerError::Malformed(format!(
                        "proposal for height {} carries block {}",
                        p.height, block.height
                    )));
                }
                let proposer = ValidatorId(peer_of("proposer", &p.proposer)?);
                if block.proposer != proposer.0 {
                    return Err(LedgerError::Malformed(
                        "the block's proposer is not the proposal's".into(),
                    ));
                }
                let proposal = Proposal {
                    height: Height(p.height),
                    round: round_of("proposal round", p.round, false)?,
                    block,
                    pol_round: round_of("proposal polka round", p.pol_round, true)?,
                    proposer,
                };
                Ok(Decoded::Proposal(Box::new(mt::SignedMessage::new(
                    proposal,
                    sig64(&p.signature)?,
                ))))
            }
            (None, None, Some(h), None) => Ok(Decoded::Status(h)),
            _ => Err(LedgerError::Malformed(
                "a ledger message carries exactly one of vote, proposal, status, stake".into(),
            )),
        }
    }
}

/// Encodes a signed vote for [`LEDGER_TOPIC`].
pub fn encode_vote(v: &mt::SignedVote<MeshContext>) -> Bytes {
    let block = match &v.message.value {
        mt::NilOrVal::Nil => Vec::new(),
        mt::NilOrVal::Val(b) => b.0.to_vec(),
    };
    Bytes::from(
        LedgerMsg {
            version: LEDGER_MSG_VERSION,
            vote: Some(VoteMsg {
                kind: match v.message.kind {
                    VoteKind::Prevote => 1,
                    VoteKind::Precommit => 2,
                },
                height: v.message.height.0,
                round: v.message.round.as_i64(),
                block,
                validator: v.message.validator.0.to_bytes(),
                signature: v.signature.to_vec(),
            }),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

/// Encodes a signed proposal for [`LEDGER_TOPIC`].
pub fn encode_proposal(p: &mt::SignedProposal<MeshContext>) -> Bytes {
    Bytes::from(
        LedgerMsg {
            version: LEDGER_MSG_VERSION,
            proposal: Some(ProposalMsg {
                height: p.message.height.0,
                round: p.message.round.as_i64(),
                pol_round: p.message.pol_round.as_i64(),
                block: p.message.block.encoded().clone(),
                proposer: p.message.proposer.0.to_bytes(),
                signature: p.signature.to_vec(),
            }),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

/// Encodes a stake transfer for [`LEDGER_TOPIC`].
pub fn encode_stake(tx: &StakeTransfer) -> Bytes {
    Bytes::from(
        LedgerMsg {
            version: LEDGER_MSG_VERSION,
            stake: Some(tx.encoded().to_vec()),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

fn encode_status(height: u64) -> Bytes {
    Bytes::from(
        LedgerMsg {
            version: LEDGER_MSG_VERSION,
            status: Some(height),
            ..Default::default()
        }
        .encode_to_vec(),
    )
}

/// A sync request: the height wanted.
#[derive(Clone, PartialEq, Message)]
pub struct SyncRequest {
    /// Height.
    #[prost(uint64, tag = "1")]
    pub height: u64,
}

/// A sync reply: the block and its certificate.
#[derive(Clone, PartialEq, Message)]
pub struct SyncReply {
    /// Encoded block.
    #[prost(bytes = "vec", tag = "1")]
    pub block: Vec<u8>,
    /// Encoded certificate.
    #[prost(bytes = "vec", tag = "2")]
    pub certificate: Vec<u8>,
}

/// Where decided blocks are kept.
pub trait ChainStore: Send {
    /// The height of the last decided block (0 for none).
    fn height(&self) -> u64;
    /// Block `height` with its certificate.
    fn get(&self, height: u64) -> Option<(Block, Certificate)>;
    /// Appends the next block; `block.height` must be `height() + 1`.
    fn append(&mut self, block: &Block, cert: &Certificate) -> Result<(), LedgerError>;
    /// The vote this validator signed for (height, round, step), if any
    /// (`Some(None)`: nil).
    fn signed_vote(&self, height: u64, round: u32, kind: VoteKind) -> Option<Option<BlockHash>>;
    /// Records a vote before it is sent (see [`ChainStore::signed_vote`]).
    fn record_vote(
        &mut self,
        height: u64,
        round: u32,
        kind: VoteKind,
        value: Option<BlockHash>,
    ) -> Result<(), LedgerError>;
}

/// A chain kept in memory.
#[derive(Debug, Default)]
pub struct MemoryChain {
    blocks: Vec<(Block, Certificate)>,
    votes: BTreeMap<(u64, u32, VoteKind), Option<BlockHash>>,
}

impl ChainStore for MemoryChain {
    fn height(&self) -> u64 {
        self.blocks.len() as u64
    }

    fn get(&self, height: u64) -> Option<(Block, Certificate)> {
        let i = usize::try_from(height.checked_sub(1)?).ok()?;
        self.blocks.get(i).cloned()
    }

    fn append(&mut self, block: &Block, cert: &Certificate) -> Result<(), LedgerError> {
        if block.height != self.height() + 1 {
            return Err(LedgerError::Malformed(format!(
                "appending block {} to a chain of height {}",
                block.height,
                self.height()
            )));
        }
        self.blocks.push((block.clone(), cert.clone()));
        self.votes.retain(|(h, _, _), _| *h > block.height);
        Ok(())
    }

    fn signed_vote(&self, height: u64, round: u32, kind: VoteKind) -> Option<Option<BlockHash>> {
        self.votes.get(&(height, round, kind)).copied()
    }

    fn record_vote(
        &mut self,
        height: u64,
        round: u32,
        kind: VoteKind,
        value: Option<BlockHash>,
    ) -> Result<(), LedgerError> {
        self.votes.insert((height, round, kind), value);
        Ok(())
    }
}

/// What goes into the blocks this node proposes, and what else it requires
/// of blocks others propose.
pub trait BlockBuilder: Send + 'static {
    /// The contents of this node's proposal for `height`.
    fn draft(&mut self, height: u64) -> BlockDraft;
    /// Checks a proposed block beyond what [`Block::decode`] and the chain
    /// links check (e.g. that its updates' adapters are held and sound).
    /// An error makes this validator prevote nil for it.
    fn check(&mut self, block: &Block) -> Result<(), String> {
        let _ = block;
        Ok(())
    }
    /// Called once a block is decided (by consensus or synced).
    fn decided(&mut self, block: &Block) {
        let _ = block;
    }
}

/// Proposes empty blocks and accepts every well-formed block.
#[derive(Debug, Default)]
pub struct EmptyBlocks;

impl BlockBuilder for EmptyBlocks {
    fn draft(&mut self, _: u64) -> BlockDraft {
        BlockDraft::default()
    }
}

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

type SharedChain = Arc<Mutex<Box<dyn ChainStore>>>;

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

/// Everything the effect handler touches (apart from Malachite's state).
struct Fx {
    ctx: MeshContext,
    chain: SharedChain,
    keys: Keys,
    /// The validator set of the height under way (from `stakes`).
    valset: ValidatorSet,
    /// The stakes after the last decided block.
    stakes: Stakes,
    /// Stake transfers heard and not yet applied (at most [`MAX_MEMPOOL`]).
    mempool: Vec<StakeTransfer>,
    me: ValidatorId,
    config: LedgerConfig,
    timers: HashMap<mt::Timeout, Instant>,
    outbox: Vec<Bytes>,
    pending: VecDeque<mc::Input<MeshContext>>,
    /// Blocks proposed at the current height, by hash.
    blocks: HashMap<BlockHash, Block>,
    /// A decision made during the last input, to store after it.
    decided: Option<(Block, Certificate)>,
    round: u32,
}

/// Most stake transfers a node holds for proposals.
const MAX_MEMPOOL: usize = 256;

impl Fx {
    /// The transfers of the mempool that apply in turn to the current stakes
    /// (lowest nonces first), at most [`MAX_BLOCK_STAKE`].
    fn applicable_stake(&self) -> Vec<StakeTransfer> {
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

    fn handle(
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
            E::WalAppend(_, r) => r.resume_with(()),
            E::ExtendVote(_, _, _, r) => r.resume_with(None),
            E::VerifyVoteExtension(.., r) => r.resume_with(Ok(())),
        })
    }
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
        self.fx
            .mempool
            .retain(|t| t.chain == stakes.chain() && t.nonce >= stakes.next_nonce(&t.from));
        self.own
            .retain(|t| t.chain == stakes.chain() && t.nonce >= stakes.next_nonce(&t.from));
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
        let stakes = &self.fx.stakes;
        if tx.chain != stakes.chain() || tx.nonce < stakes.next_nonce(&tx.from) {
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

fn decode_sync_reply(bytes: &[u8]) -> Result<(Block, Certificate), String> {
    if bytes.len() > MAX_LEDGER_MSG_BYTES + super::chain::MAX_CERT_BYTES {
        return Err(format!("sync reply of {} bytes", bytes.len()));
    }
    let reply = SyncReply::decode(bytes).map_err(|e| format!("sync reply: {e}"))?;
    let block = Block::decode(&reply.block).map_err(|e| e.to_string())?;
    let cert = Certificate::decode(&reply.certificate).map_err(|e| e.to_string())?;
    Ok((block, cert))
}
