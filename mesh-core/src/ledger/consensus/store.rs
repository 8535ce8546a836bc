//! Where decided blocks go ([`ChainStore`]) and what goes into the blocks a
//! node proposes ([`BlockBuilder`]).

use std::collections::BTreeMap;

use super::VoteKind;
use crate::ledger::chain::{Block, BlockDraft, BlockHash, Certificate};
use crate::ledger::LedgerError;

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
    /// Durable when it returns, and so is every [`ChainStore::wal_append`]
    /// before it.
    fn record_vote(
        &mut self,
        height: u64,
        round: u32,
        kind: VoteKind,
        value: Option<BlockHash>,
    ) -> Result<(), LedgerError>;
    /// Appends `entry` to the write-ahead log of consensus inputs for
    /// `height` (see the consensus module docs). It need not be durable
    /// until the next [`ChainStore::record_vote`]; [`ChainStore::append`]
    /// drops the log of the heights it decides.
    fn wal_append(&mut self, height: u64, entry: &[u8]) -> Result<(), LedgerError>;
    /// The write-ahead log of `height`, oldest entry first.
    fn wal(&self, height: u64) -> Vec<Vec<u8>>;
}

/// A chain kept in memory.
#[derive(Debug, Default)]
pub struct MemoryChain {
    blocks: Vec<(Block, Certificate)>,
    votes: BTreeMap<(u64, u32, VoteKind), Option<BlockHash>>,
    wal: BTreeMap<u64, Vec<Vec<u8>>>,
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
        self.wal.retain(|h, _| *h > block.height);
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

    fn wal_append(&mut self, height: u64, entry: &[u8]) -> Result<(), LedgerError> {
        self.wal.entry(height).or_default().push(entry.to_vec());
        Ok(())
    }

    fn wal(&self, height: u64) -> Vec<Vec<u8>> {
        self.wal.get(&height).cloned().unwrap_or_default()
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

/// The builder of a node without model sync: proposes empty blocks (stake
/// transfers aside, which the ledger adds itself) and accepts well-formed
/// blocks without updates. A block carrying updates or aggregates it
/// refuses: this node holds no adapters, so it cannot check that they are
/// held and load, and nobody votes for an update it could not run. With
/// more than a third of the stake on such validators, no update is decided.
#[derive(Debug, Default)]
pub struct EmptyBlocks;

impl BlockBuilder for EmptyBlocks {
    fn draft(&mut self, _: u64) -> BlockDraft {
        BlockDraft::default()
    }

    fn check(&mut self, block: &Block) -> Result<(), String> {
        if block.updates.is_empty() && block.aggregates.is_empty() {
            return Ok(());
        }
        Err(format!(
            "block {} carries {} update(s): this node runs no model sync and cannot check \
             their adapters",
            block.height,
            block.updates.len()
        ))
    }
}
