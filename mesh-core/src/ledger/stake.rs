//! Stake changes as ledger transactions: who validates, with how much stake,
//! at every height.
//!
//! The genesis fixes the stake at height 1. From then on stake moves only by
//! a [`StakeTransfer`]: `amount` of `from`'s stake given to `to`, signed by
//! `from`'s key, carried in a decided block. The total never changes, so no
//! one can create stake: an identity without stake (any number of them)
//! changes nothing until a holder gives it some (Sybil resistance). A
//! transfer takes effect at the height after its block: block `h + 1`'s
//! certificate is checked against the stakes after block `h` ([`Stakes`]).
//! A validator whose stake reaches 0 leaves the set; a new identity that
//! receives stake joins it.
//!
//! Each transfer carries the genesis hash (a transfer of one chain means
//! nothing on another) and a nonce: the sender's transfers are numbered 1, 2,
//! 3, ... in the order the chain applies them, so none can be replayed.
//!
//! On the wire (prost):
//!
//! ```proto
//! message StakeMsg { bytes chain = 1; bytes from = 2; bytes to = 3;
//!                    uint64 amount = 4; uint64 nonce = 5; bytes signature = 6; }
//! ```

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use ed25519_dalek::{Signer, Verifier};
use prost::Message;

use super::chain::{
    stake_in, Block, BlockHash, Genesis, GenesisValidator, MAX_POWER, MAX_VALIDATORS,
};
use super::LedgerError;
use crate::network::identity::ed25519_of;
use crate::network::{Identity, PeerId};

/// Largest encoded transfer accepted.
pub const MAX_STAKE_BYTES: usize = 512;

const STAKE_DOMAIN: &[u8] = b"mesh-llm stake v1\0";

/// Wire form of a [`StakeTransfer`].
#[derive(Clone, PartialEq, Message)]
pub struct StakeMsg {
    /// The genesis hash of the chain it belongs to.
    #[prost(bytes = "vec", tag = "1")]
    pub chain: Vec<u8>,
    /// The giver's peer id bytes (its key signs).
    #[prost(bytes = "vec", tag = "2")]
    pub from: Vec<u8>,
    /// The receiver's peer id bytes.
    #[prost(bytes = "vec", tag = "3")]
    pub to: Vec<u8>,
    /// Stake moved.
    #[prost(uint64, tag = "4")]
    pub amount: u64,
    /// The giver's transfer number (1 for its first).
    #[prost(uint64, tag = "5")]
    pub nonce: u64,
    /// 64-byte Ed25519 signature.
    #[prost(bytes = "vec", tag = "6")]
    pub signature: Vec<u8>,
}

/// A signed stake transfer (see the module documentation).
#[derive(Clone, PartialEq, Eq)]
pub struct StakeTransfer {
    /// The genesis hash of its chain.
    pub chain: BlockHash,
    /// Who gives (and signed).
    pub from: PeerId,
    /// Who receives.
    pub to: PeerId,
    /// How much stake moves (at least 1).
    pub amount: u64,
    /// The giver's transfer number.
    pub nonce: u64,
    encoded: Bytes,
    id: BlockHash,
}

impl fmt::Debug for StakeTransfer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StakeTransfer")
            .field("from", &self.from)
            .field("to", &self.to)
            .field("amount", &self.amount)
            .field("nonce", &self.nonce)
            .finish()
    }
}

fn sign_bytes(chain: &[u8], from: &[u8], to: &[u8], amount: u64, nonce: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(STAKE_DOMAIN.len() + 32 + 2 * 48 + 32);
    b.extend_from_slice(STAKE_DOMAIN);
    b.extend_from_slice(chain);
    for id in [from, to] {
        b.extend_from_slice(&(id.len() as u64).to_le_bytes());
        b.extend_from_slice(id);
    }
    b.extend_from_slice(&amount.to_le_bytes());
    b.extend_from_slice(&nonce.to_le_bytes());
    b
}

impl StakeTransfer {
    /// `identity` gives `amount` of its stake on the chain whose genesis
    /// hash is `chain` to `to`, as its transfer number `nonce` (see
    /// [`Stakes::next_nonce`]). Fails where [`StakeTransfer::decode`] would
    /// refuse the result.
    pub fn sign(
        identity: &Identity,
        chain: BlockHash,
        to: PeerId,
        amount: u64,
        nonce: u64,
    ) -> Result<StakeTransfer, LedgerError> {
        let from = identity.peer_id().to_bytes();
        let to = to.to_bytes();
        let signature = identity
            .signing_key()
            .sign(&sign_bytes(&chain.0, &from, &to, amount, nonce))
            .to_bytes();
        let msg = StakeMsg {
            chain: chain.0.to_vec(),
            from,
            to,
            amount,
            nonce,
            signature: signature.to_vec(),
        };
        StakeTransfer::decode(&msg.encode_to_vec())
    }

    /// Decodes a transfer and checks its fields and the giver's signature
    /// (whether the giver has the stake is [`Stakes::check`]'s question).
    /// Never panics.
    pub fn decode(bytes: &[u8]) -> Result<StakeTransfer, LedgerError> {
        if bytes.len() > MAX_STAKE_BYTES {
            return Err(LedgerError::TooLarge {
                what: "stake transfer",
                size: bytes.len() as u64,
                limit: MAX_STAKE_BYTES as u64,
            });
        }
        let msg = StakeMsg::decode(bytes)
            .map_err(|e| LedgerError::Malformed(format!("stake transfer: {e}")))?;
        let bad = |m: String| LedgerError::Malformed(format!("stake transfer: {m}"));
        let chain: [u8; 32] = msg
            .chain
            .as_slice()
            .try_into()
            .map_err(|_| bad(format!("chain of {} bytes", msg.chain.len())))?;
        let from = PeerId::from_bytes(&msg.from).map_err(|e| bad(format!("from: {e}")))?;
        let to = PeerId::from_bytes(&msg.to).map_err(|e| bad(format!("to: {e}")))?;
        if from == to {
            return Err(bad(format!("{from} gives stake to itself")));
        }
        if msg.amount == 0 || msg.amount > MAX_POWER {
            return Err(bad(format!(
                "amount {}: expected 1 to {MAX_POWER}",
                msg.amount
            )));
        }
        if msg.nonce == 0 {
            return Err(bad("nonce 0 (the first transfer is 1)".into()));
        }
        // The receiver must be able to sign votes with the key its id embeds.
        ed25519_of(&to).map_err(|e| bad(format!("to: {e}")))?;
        let key = ed25519_of(&from).map_err(|e| bad(format!("from: {e}")))?;
        let signature: [u8; 64] = msg
            .signature
            .as_slice()
            .try_into()
            .map_err(|_| bad(format!("signature of {} bytes", msg.signature.len())))?;
        key.verify(
            &sign_bytes(&chain, &msg.from, &msg.to, msg.amount, msg.nonce),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .map_err(|_| LedgerError::BadSignature { author: from })?;
        Ok(StakeTransfer {
            chain: BlockHash(chain),
            from,
            to,
            amount: msg.amount,
            nonce: msg.nonce,
            encoded: Bytes::copy_from_slice(bytes),
            id: BlockHash(*blake3::hash(bytes).as_bytes()),
        })
    }

    /// The transfer as sent.
    pub fn encoded(&self) -> &Bytes {
        &self.encoded
    }

    /// Its id: the BLAKE3 hash of its encoding.
    pub fn id(&self) -> BlockHash {
        self.id
    }
}

/// The validators and their stake at one height, and every giver's last
/// transfer number: the genesis with the transfers of the blocks so far
/// applied. Deterministic: every node that applies the same blocks holds the
/// same `Stakes`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stakes {
    chain: BlockHash,
    validators: Vec<GenesisValidator>,
    nonces: BTreeMap<PeerId, u64>,
}

impl Stakes {
    /// The stakes at height 1.
    pub fn genesis(genesis: &Genesis) -> Stakes {
        Stakes {
            chain: genesis.hash(),
            validators: genesis.validators.clone(),
            nonces: BTreeMap::new(),
        }
    }

    /// The genesis hash of the chain these stakes belong to.
    pub fn chain(&self) -> BlockHash {
        self.chain
    }

    /// The validators (stake > 0), sorted by peer id.
    pub fn validators(&self) -> &[GenesisValidator] {
        &self.validators
    }

    /// The stake of `peer` (0 for anyone not a validator).
    pub fn power_of(&self, peer: &PeerId) -> u64 {
        stake_in(&self.validators, peer)
    }

    /// The sum of all stakes (the genesis total: transfers keep it).
    pub fn total_power(&self) -> u64 {
        self.validators.iter().map(|v| v.power).sum()
    }

    /// The nonce `peer`'s next transfer must carry.
    pub fn next_nonce(&self, peer: &PeerId) -> u64 {
        self.nonces.get(peer).copied().unwrap_or(0) + 1
    }

    /// Whether `tx` may apply now or after the giver's earlier transfers:
    /// this chain's, and its nonce not yet used.
    pub fn may_apply(&self, tx: &StakeTransfer) -> bool {
        tx.chain == self.chain && tx.nonce >= self.next_nonce(&tx.from)
    }

    /// Whether `tx` applies to these stakes: this chain's, the giver's next
    /// nonce, the giver holds the amount, the receiver stays within
    /// [`MAX_POWER`] and the set within [`MAX_VALIDATORS`].
    pub fn check(&self, tx: &StakeTransfer) -> Result<(), LedgerError> {
        let bad = |m: String| Err(LedgerError::Malformed(format!("stake transfer: {m}")));
        if tx.chain != self.chain {
            return bad("signed for another chain".into());
        }
        let nonce = self.next_nonce(&tx.from);
        if tx.nonce != nonce {
            return bad(format!(
                "{} sends nonce {}; its next is {nonce}",
                tx.from, tx.nonce
            ));
        }
        let has = self.power_of(&tx.from);
        if has < tx.amount {
            return bad(format!("{} gives {} but holds {has}", tx.from, tx.amount));
        }
        let receiver = self.power_of(&tx.to);
        if receiver + tx.amount > MAX_POWER {
            return bad(format!(
                "{} would hold {}: more than {MAX_POWER}",
                tx.to,
                receiver + tx.amount
            ));
        }
        let count =
            self.validators.len() + usize::from(receiver == 0) - usize::from(has == tx.amount);
        if count > MAX_VALIDATORS {
            return bad(format!(
                "the set would have {count} validators: more than {MAX_VALIDATORS}"
            ));
        }
        Ok(())
    }

    /// Applies `tx` (after [`Stakes::check`]); on error nothing changes.
    pub fn apply(&mut self, tx: &StakeTransfer) -> Result<(), LedgerError> {
        self.check(tx)?;
        self.nonces.insert(tx.from, tx.nonce);
        let i = self
            .validators
            .binary_search_by(|v| v.peer_id.cmp(&tx.from))
            .map_err(|_| LedgerError::Malformed("stake transfer: giver vanished".into()))?;
        self.validators[i].power -= tx.amount;
        if self.validators[i].power == 0 {
            self.validators.remove(i);
        }
        match self.validators.binary_search_by(|v| v.peer_id.cmp(&tx.to)) {
            Ok(j) => self.validators[j].power += tx.amount,
            Err(j) => self.validators.insert(
                j,
                GenesisValidator {
                    peer_id: tx.to,
                    power: tx.amount,
                },
            ),
        }
        Ok(())
    }

    /// The stakes after `block`'s transfers, in block order; an error if
    /// any does not apply (such a block is invalid).
    pub fn after(&self, block: &Block) -> Result<Stakes, LedgerError> {
        if block.stake.is_empty() {
            return Ok(self.clone());
        }
        let mut next = self.clone();
        for tx in &block.stake {
            next.apply(tx)
                .map_err(|e| LedgerError::Malformed(format!("block {}: {e}", block.height)))?;
        }
        Ok(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::chain::BlockDraft;
    use proptest::prelude::*;

    fn ids(n: u8) -> Vec<Identity> {
        (1..=n).map(|i| Identity::from_seed([i; 32])).collect()
    }

    fn genesis(ids: &[Identity], powers: &[u64]) -> Genesis {
        let v = ids
            .iter()
            .zip(powers)
            .map(|(id, p)| GenesisValidator {
                peer_id: id.peer_id(),
                power: *p,
            })
            .collect();
        Genesis::new("stake-test", v).unwrap()
    }

    #[test]
    fn transfers_move_stake_and_keep_the_total() {
        let ids = ids(3);
        let newcomer = Identity::from_seed([50; 32]);
        let g = genesis(&ids, &[3, 2, 1]);
        let mut s = Stakes::genesis(&g);
        let chain = g.hash();
        let tx = |from: &Identity, to: PeerId, amount, nonce| {
            StakeTransfer::sign(from, chain, to, amount, nonce).unwrap()
        };
        // 0 gives 2 of its 3 to a newcomer, which joins the set.
        s.apply(&tx(&ids[0], newcomer.peer_id(), 2, 1)).unwrap();
        assert_eq!(s.power_of(&ids[0].peer_id()), 1);
        assert_eq!(s.power_of(&newcomer.peer_id()), 2);
        assert_eq!(s.validators().len(), 4);
        assert_eq!(s.total_power(), 6);
        assert_eq!(s.next_nonce(&ids[0].peer_id()), 2);
        // Replaying it, or skipping a nonce, is refused.
        assert!(s.check(&tx(&ids[0], newcomer.peer_id(), 1, 1)).is_err());
        assert!(s.check(&tx(&ids[0], newcomer.peer_id(), 1, 3)).is_err());
        // More than it holds.
        assert!(s.check(&tx(&ids[0], newcomer.peer_id(), 2, 2)).is_err());
        // Zero-stake identities have nothing to give.
        let sybil = Identity::from_seed([60; 32]);
        assert!(s.check(&tx(&sybil, ids[1].peer_id(), 1, 1)).is_err());
        // Giving everything leaves the set; the receiver's stake grows.
        s.apply(&tx(&ids[2], ids[1].peer_id(), 1, 1)).unwrap();
        assert_eq!(s.power_of(&ids[2].peer_id()), 0);
        assert_eq!(s.power_of(&ids[1].peer_id()), 3);
        assert_eq!(s.validators().len(), 3);
        assert_eq!(s.total_power(), 6);
        assert!(s
            .validators()
            .windows(2)
            .all(|w| w[0].peer_id < w[1].peer_id));
        // A failed apply changes nothing.
        let before = s.clone();
        assert!(s.apply(&tx(&ids[2], ids[1].peer_id(), 1, 2)).is_err());
        assert_eq!(s, before);
        // A transfer of another chain.
        let other = genesis(&ids, &[3, 2, 2]).hash();
        let foreign = StakeTransfer::sign(&ids[1], other, ids[0].peer_id(), 1, 1).unwrap();
        assert!(s.check(&foreign).is_err());
    }

    #[test]
    fn decode_refuses_bad_transfers() {
        let ids = ids(2);
        let chain = BlockHash([7; 32]);
        let to = ids[1].peer_id();
        let ok = StakeTransfer::sign(&ids[0], chain, to, 5, 1).unwrap();
        let again = StakeTransfer::decode(ok.encoded()).unwrap();
        assert_eq!(again, ok);
        assert_eq!(again.id(), ok.id());
        assert!(StakeTransfer::sign(&ids[0], chain, ids[0].peer_id(), 5, 1).is_err());
        assert!(StakeTransfer::sign(&ids[0], chain, to, 0, 1).is_err());
        assert!(StakeTransfer::sign(&ids[0], chain, to, MAX_POWER + 1, 1).is_err());
        assert!(StakeTransfer::sign(&ids[0], chain, to, 1, 0).is_err());
        // A receiver whose id carries no key could never vote.
        assert!(StakeTransfer::sign(&ids[0], chain, PeerId::random(), 1, 1).is_err());
        // Someone else's signature: the giver did not sign it.
        let mut msg = StakeMsg::decode(ok.encoded().as_ref()).unwrap();
        msg.amount = 6;
        assert!(matches!(
            StakeTransfer::decode(&msg.encode_to_vec()),
            Err(LedgerError::BadSignature { .. })
        ));
        let mut forged = StakeMsg::decode(ok.encoded().as_ref()).unwrap();
        let by_other = StakeTransfer::sign(&ids[1], chain, ids[0].peer_id(), 5, 1).unwrap();
        forged.signature = StakeMsg::decode(by_other.encoded().as_ref())
            .unwrap()
            .signature;
        assert!(StakeTransfer::decode(&forged.encode_to_vec()).is_err());
        assert!(StakeTransfer::decode(&[0u8; MAX_STAKE_BYTES + 1]).is_err());
    }

    #[test]
    fn a_block_with_an_invalid_transfer_does_not_apply() {
        let ids = ids(2);
        let g = genesis(&ids, &[2, 2]);
        let s = Stakes::genesis(&g);
        let chain = g.hash();
        let good = StakeTransfer::sign(&ids[0], chain, ids[1].peer_id(), 2, 1).unwrap();
        // After the first, 0 holds nothing: the second overdraws.
        let second = StakeTransfer::sign(&ids[0], chain, ids[1].peer_id(), 1, 2).unwrap();
        let build = |stake: Vec<StakeTransfer>| {
            let draft = BlockDraft {
                stake,
                ..Default::default()
            };
            Block::build(1, chain, ids[0].peer_id(), draft).unwrap()
        };
        let next = s.after(&build(vec![good.clone()])).unwrap();
        assert_eq!(next.validators().len(), 1);
        assert_eq!(next.power_of(&ids[1].peer_id()), 4);
        assert!(s.after(&build(vec![good, second])).is_err());
        assert_eq!(s.after(&build(vec![])).unwrap(), s);
    }

    proptest! {
        /// Any sequence of transfers, valid or not, keeps the total, the
        /// order and positive stakes.
        #[test]
        fn random_transfers_keep_the_invariants(
            ops in proptest::collection::vec((0u8..5, 0u8..6, 1u64..5, 0u64..4), 0..40)
        ) {
            let ids: Vec<Identity> = (0..6).map(|i| Identity::from_seed([100 + i; 32])).collect();
            let g = genesis(&ids[..4], &[3, 3, 2, 1]);
            let mut s = Stakes::genesis(&g);
            for (from, to, amount, skew) in ops {
                let (from, to) = (&ids[from as usize], &ids[to as usize]);
                let nonce = s.next_nonce(&from.peer_id()) + skew;
                let Ok(tx) = StakeTransfer::sign(from, g.hash(), to.peer_id(), amount, nonce) else {
                    continue;
                };
                let before = s.clone();
                if s.apply(&tx).is_err() {
                    prop_assert_eq!(&s, &before);
                }
                prop_assert_eq!(s.total_power(), 9);
                prop_assert!(s.validators().iter().all(|v| v.power > 0));
                prop_assert!(s.validators().windows(2).all(|w| w[0].peer_id < w[1].peer_id));
            }
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = StakeTransfer::decode(&bytes);
        }
    }
}
