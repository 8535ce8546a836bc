//! The ledger's messages on the wire: votes, proposals, status and stake
//! transfers on the gossip topic, and the sync request and reply.

use bytes::Bytes;
use malachitebft_core_types as mt;
use prost::Message;

use super::{
    Height, MeshContext, Proposal, ValidatorId, Vote, VoteKind, LEDGER_MSG_VERSION,
    MAX_LEDGER_MSG_BYTES,
};
use crate::ledger::chain::{Block, BlockHash, Certificate};
use crate::ledger::stake::StakeTransfer;
use crate::ledger::LedgerError;
use crate::network::PeerId;

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

/// A message on [`LEDGER_TOPIC`](super::LEDGER_TOPIC): exactly one of a vote, a proposal, or a
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
    /// A stake transfer ([`crate::ledger::stake::StakeMsg`]) for proposers to include.
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

/// Encodes a signed vote for [`LEDGER_TOPIC`](super::LEDGER_TOPIC).
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

/// Encodes a signed proposal for [`LEDGER_TOPIC`](super::LEDGER_TOPIC).
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

/// Encodes a stake transfer for [`LEDGER_TOPIC`](super::LEDGER_TOPIC).
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

pub(super) fn encode_status(height: u64) -> Bytes {
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

pub(super) fn decode_sync_reply(bytes: &[u8]) -> Result<(Block, Certificate), String> {
    if bytes.len() > MAX_LEDGER_MSG_BYTES + crate::ledger::chain::MAX_CERT_BYTES {
        return Err(format!("sync reply of {} bytes", bytes.len()));
    }
    let reply = SyncReply::decode(bytes).map_err(|e| format!("sync reply: {e}"))?;
    let block = Block::decode(&reply.block).map_err(|e| e.to_string())?;
    let cert = Certificate::decode(&reply.certificate).map_err(|e| e.to_string())?;
    Ok((block, cert))
}
