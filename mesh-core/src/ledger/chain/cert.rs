//! Commit certificates: the precommit signatures that make a block count
//! ([`Certificate`], one [`CommitSig`] per validator), their wire form
//! ([`CertMsg`], [`CommitSigMsg`]) with a decoder that checks every field, and
//! the check that the signatures are valid and hold a quorum of the stake.

use prost::Message;

use super::{has_quorum, id32, BlockHash, MAX_CERT_BYTES, MAX_VALIDATORS};
use crate::ledger::consensus;
use crate::ledger::stake::Stakes;
use crate::ledger::LedgerError;
use crate::network::identity::ed25519_of;
use crate::network::PeerId;

/// One validator's precommit signature in a [`Certificate`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CommitSig {
    /// The validator.
    pub validator: PeerId,
    /// Its Ed25519 signature over the precommit (see
    /// [`consensus::vote_sign_bytes`]).
    pub signature: [u8; 64],
}

/// Proof that a block was decided: precommits for its hash, at one height
/// and round, by validators holding more than 2/3 of the stake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    /// The block's height.
    pub height: u64,
    /// The consensus round in which it was decided.
    pub round: u32,
    /// The block's hash.
    pub block: BlockHash,
    /// The precommits.
    pub signatures: Vec<CommitSig>,
}

/// Wire form of a [`CommitSig`].
#[derive(Clone, PartialEq, Message)]
pub struct CommitSigMsg {
    /// Validator peer id bytes.
    #[prost(bytes = "vec", tag = "1")]
    pub validator: Vec<u8>,
    /// 64-byte signature.
    #[prost(bytes = "vec", tag = "2")]
    pub signature: Vec<u8>,
}

/// Wire form of a [`Certificate`].
#[derive(Clone, PartialEq, Message)]
pub struct CertMsg {
    /// Height.
    #[prost(uint64, tag = "1")]
    pub height: u64,
    /// Round.
    #[prost(int64, tag = "2")]
    pub round: i64,
    /// Block hash.
    #[prost(bytes = "vec", tag = "3")]
    pub block: Vec<u8>,
    /// Signatures.
    #[prost(message, repeated, tag = "4")]
    pub signatures: Vec<CommitSigMsg>,
}

impl Certificate {
    /// The certificate as sent.
    pub fn encode(&self) -> Vec<u8> {
        CertMsg {
            height: self.height,
            round: i64::from(self.round),
            block: self.block.0.to_vec(),
            signatures: self
                .signatures
                .iter()
                .map(|s| CommitSigMsg {
                    validator: s.validator.to_bytes(),
                    signature: s.signature.to_vec(),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    /// Decodes a certificate (fields only: [`Certificate::verify`] checks
    /// the signatures). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Certificate, LedgerError> {
        if bytes.len() > MAX_CERT_BYTES {
            return Err(LedgerError::TooLarge {
                what: "certificate",
                size: bytes.len() as u64,
                limit: MAX_CERT_BYTES as u64,
            });
        }
        let msg = CertMsg::decode(bytes)
            .map_err(|e| LedgerError::Malformed(format!("certificate: {e}")))?;
        if msg.signatures.len() > MAX_VALIDATORS {
            return Err(LedgerError::Malformed(format!(
                "certificate with {} signatures",
                msg.signatures.len()
            )));
        }
        let round = u32::try_from(msg.round)
            .map_err(|_| LedgerError::Malformed(format!("certificate round {}", msg.round)))?;
        let signatures = msg
            .signatures
            .iter()
            .map(|s| {
                Ok(CommitSig {
                    validator: PeerId::from_bytes(&s.validator)
                        .map_err(|e| LedgerError::Malformed(format!("validator: {e}")))?,
                    signature: s.signature.as_slice().try_into().map_err(|_| {
                        LedgerError::Malformed(format!(
                            "signature: expected 64 bytes, found {}",
                            s.signature.len()
                        ))
                    })?,
                })
            })
            .collect::<Result<Vec<_>, LedgerError>>()?;
        Ok(Certificate {
            height: msg.height,
            round,
            block: BlockHash(id32("certificate block", &msg.block)?),
            signatures,
        })
    }

    /// Checks the certificate against the stakes of its height (those after
    /// the block before it; [`Stakes::genesis`] for block 1): every
    /// signature a distinct validator's and valid, and their stake more than
    /// 2/3 of the total. Returns the stake that signed.
    pub fn verify(&self, stakes: &Stakes) -> Result<u64, LedgerError> {
        let chain = stakes.chain();
        let mut seen: Vec<PeerId> = Vec::with_capacity(self.signatures.len());
        let mut signed = 0u64;
        for s in &self.signatures {
            if seen.contains(&s.validator) {
                return Err(LedgerError::Malformed(format!(
                    "certificate: {} signed twice",
                    s.validator
                )));
            }
            seen.push(s.validator);
            let power = stakes.power_of(&s.validator);
            if power == 0 {
                return Err(LedgerError::Malformed(format!(
                    "certificate: {} is not a validator",
                    s.validator
                )));
            }
            let bytes = consensus::vote_sign_bytes(
                &chain,
                consensus::VoteKind::Precommit,
                self.height,
                i64::from(self.round),
                Some(&self.block),
                &s.validator,
            );
            let key = ed25519_of(&s.validator)
                .map_err(|e| LedgerError::Malformed(format!("certificate: {e}")))?;
            use ed25519_dalek::Verifier;
            key.verify(&bytes, &ed25519_dalek::Signature::from_bytes(&s.signature))
                .map_err(|_| LedgerError::BadSignature {
                    author: s.validator,
                })?;
            signed += power;
        }
        if !has_quorum(signed, stakes.total_power()) {
            return Err(LedgerError::Malformed(format!(
                "certificate: stake {signed} of {} signed; more than 2/3 is needed",
                stakes.total_power()
            )));
        }
        Ok(signed)
    }
}
