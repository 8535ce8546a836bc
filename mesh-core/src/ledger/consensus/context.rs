//! Malachite's context for this chain: heights, validators and their set,
//! votes, proposals, proposer selection, the bytes each signature covers,
//! and the keys that sign and verify them.

use std::fmt;

use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use malachitebft_core_types as mt;

use crate::ledger::chain::{Block, BlockHash, Certificate, CommitSig, Genesis};
use crate::ledger::stake::Stakes;
use crate::ledger::LedgerError;
use crate::network::identity::ed25519_of;
use crate::network::{Identity, PeerId};

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
