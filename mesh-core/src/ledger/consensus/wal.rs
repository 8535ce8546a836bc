//! The write-ahead log of consensus inputs: what Malachite asks to persist
//! (`Effect::WalAppend`) for the height under way, so that a validator
//! restarted mid-height replays it and comes back in the same state, its
//! lock and valid value included, instead of starting the height afresh.
//! (Its signed votes are also guarded one by one; see `Fx::guard_vote`.)
//!
//! An entry is a tag byte and its payload:
//! - `0`, a vote or a proposal as gossiped (`wire::encode_vote`,
//!   `wire::encode_proposal`);
//! - `1`, a timeout: its kind (`0` propose, `1` prevote, `2` precommit,
//!   `3` rebroadcast) and round (u32, little-endian);
//! - `2`, a value this node proposed: its round (u32, little-endian) and the
//!   block's encoding. Replayed, it is what this node proposes again in
//!   that round, never a new block (which would be a second proposal).
//!
//! Values proposed by others are not logged: replaying their proposal
//! message yields them again.

use malachitebft_core_consensus as mc;
use malachitebft_core_types as mt;

use super::{encode_proposal, encode_vote, Decoded, MeshContext, ValidatorId};
use crate::ledger::chain::Block;
use crate::ledger::LedgerError;

/// One decoded entry.
#[derive(Debug)]
pub(super) enum Entry {
    /// A vote or a proposal, as gossiped.
    Message(Decoded),
    /// A timeout that elapsed.
    Timeout(mt::Timeout),
    /// A block this node proposed in a round.
    Proposed(u32, Block),
}

const MESSAGE: u8 = 0;
const TIMEOUT: u8 = 1;
const PROPOSED: u8 = 2;

/// The bytes to log for `entry` (`None`: nothing to log, a value another
/// node proposed).
pub(super) fn encode(entry: &mc::WalEntry<MeshContext>, me: &ValidatorId) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match entry {
        mc::WalEntry::ConsensusMsg(mc::SignedConsensusMsg::Vote(v)) => {
            out.push(MESSAGE);
            out.extend_from_slice(&encode_vote(v));
        }
        mc::WalEntry::ConsensusMsg(mc::SignedConsensusMsg::Proposal(p)) => {
            out.push(MESSAGE);
            out.extend_from_slice(&encode_proposal(p));
        }
        mc::WalEntry::Timeout(t) => {
            out.push(TIMEOUT);
            out.push(match t.kind {
                mt::TimeoutKind::Propose => 0,
                mt::TimeoutKind::Prevote => 1,
                mt::TimeoutKind::Precommit => 2,
                mt::TimeoutKind::Rebroadcast => 3,
            });
            out.extend_from_slice(&t.round.as_u32()?.to_le_bytes());
        }
        mc::WalEntry::ProposedValue(v) if v.proposer == *me => {
            out.push(PROPOSED);
            out.extend_from_slice(&v.round.as_u32()?.to_le_bytes());
            out.extend_from_slice(v.value.encoded());
        }
        mc::WalEntry::ProposedValue(_) => return None,
    }
    Some(out)
}

/// Decodes an entry written by [`encode`]. Never panics.
pub(super) fn decode(bytes: &[u8]) -> Result<Entry, LedgerError> {
    let bad = |why: &str| LedgerError::Malformed(format!("write-ahead log entry: {why}"));
    let round = |b: &[u8]| -> Result<u32, LedgerError> {
        let r: [u8; 4] = b
            .get(..4)
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad("no round"))?;
        Ok(u32::from_le_bytes(r))
    };
    match bytes.split_first() {
        Some((&MESSAGE, msg)) => match Decoded::decode(msg)? {
            m @ (Decoded::Vote(_) | Decoded::Proposal(_)) => Ok(Entry::Message(m)),
            _ => Err(bad("neither a vote nor a proposal")),
        },
        Some((&TIMEOUT, rest)) => {
            let kind = match rest.first() {
                Some(0) => mt::TimeoutKind::Propose,
                Some(1) => mt::TimeoutKind::Prevote,
                Some(2) => mt::TimeoutKind::Precommit,
                Some(3) => mt::TimeoutKind::Rebroadcast,
                _ => return Err(bad("unknown timeout kind")),
            };
            if rest.len() != 5 {
                return Err(bad("timeout of the wrong length"));
            }
            let round = mt::Round::new(round(&rest[1..])?);
            Ok(Entry::Timeout(mt::Timeout { kind, round }))
        }
        Some((&PROPOSED, rest)) => {
            let r = round(rest)?;
            Ok(Entry::Proposed(r, Block::decode(&rest[4..])?))
        }
        _ => Err(bad("unknown tag")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn timeouts_round_trip_and_bad_entries_are_refused() {
        let me = ValidatorId(crate::network::Identity::from_seed([1; 32]).peer_id());
        for kind in [
            mt::TimeoutKind::Propose,
            mt::TimeoutKind::Prevote,
            mt::TimeoutKind::Precommit,
            mt::TimeoutKind::Rebroadcast,
        ] {
            let t = mt::Timeout {
                kind,
                round: mt::Round::new(7),
            };
            let bytes = encode(&mc::WalEntry::Timeout(t), &me).unwrap();
            match decode(&bytes).unwrap() {
                Entry::Timeout(back) => assert_eq!(back, t),
                other => panic!("{other:?}"),
            }
        }
        for bad in [
            &b""[..],
            b"\x09",
            b"\x01\x07\x00\x00\x00\x00",
            b"\x01\x00\x01",
            b"\x02\x01",
        ] {
            assert!(decode(bad).is_err(), "{bad:?}");
        }
    }

    proptest! {
        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn decoding_any_tag_with_garbage_never_panics(
            tag in 0u8..4,
            rest in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut bytes = vec![tag];
            bytes.extend(rest);
            let _ = decode(&bytes);
        }
    }
}
