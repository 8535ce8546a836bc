//! The ledger's persistent store: decided blocks with their certificates,
//! and the votes this validator signed, in an embedded ACID database
//! ([redb](https://docs.rs/redb): copy-on-write B-trees, fsync on commit).
//!
//! A block and its certificate are written in one transaction, so a crash
//! (even `kill -9` in the middle of a write) leaves the store at the last
//! committed block, never with a partial one; `mesh-core/tests/ledger_db.rs`
//! kills a writer 100 times at random points and reopens it. The store is
//! bound to one chain: opening it with another genesis is an error.
//!
//! Votes are recorded before they are sent: a validator restarted in the
//! middle of a height signs again what it signed before for a (height,
//! round, step), never a conflicting vote.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

use super::chain::{Block, BlockHash, Certificate, Genesis};
use super::consensus::{ChainStore, VoteKind};
use super::LedgerError;

const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");
const CERTS: TableDefinition<u64, &[u8]> = TableDefinition::new("certificates");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// (height, round, 1 prevote | 2 precommit) -> 32-byte block hash, or empty for nil.
const VOTES: TableDefinition<(u64, u32, u8), &[u8]> = TableDefinition::new("signed_votes");
/// Consensus inputs of undecided heights, by (height, sequence number).
const WAL: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("consensus_wal");

/// Decided blocks and signed votes of one chain, on disk.
pub struct LedgerDb {
    db: Database,
    path: PathBuf,
    height: u64,
}

impl std::fmt::Debug for LedgerDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LedgerDb")
            .field("path", &self.path)
            .field("height", &self.height)
            .finish()
    }
}

fn db_err(path: &Path, e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn kind_byte(kind: VoteKind) -> u8 {
    match kind {
        VoteKind::Prevote => 1,
        VoteKind::Precommit => 2,
    }
}

impl LedgerDb {
    /// The store's usual file name for the chain of `genesis`
    /// (`ledger-<first 16 hex digits of the genesis hash>.redb`).
    pub fn file_name(genesis: &Genesis) -> String {
        format!("ledger-{}.redb", &genesis.hash().to_hex()[..16])
    }

    /// Where a node keeps the chain of `genesis` by default: the cache's
    /// `ledger` directory, under [`LedgerDb::file_name`].
    pub fn default_path(genesis: &Genesis) -> crate::Result<PathBuf> {
        Ok(crate::fetch::cache_dir()?
            .join("ledger")
            .join(LedgerDb::file_name(genesis)))
    }

    /// Opens (or creates) the store at `path` for the chain of `genesis`.
    /// The blocks it holds are decoded, not verified: [`super::consensus::start`]
    /// verifies them, and `verify_chain` does offline.
    pub fn open(path: impl AsRef<Path>, genesis: &Genesis) -> Result<LedgerDb, LedgerError> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| LedgerError::io(dir, e))?;
        }
        let db = Database::create(&path).map_err(|e| db_err(&path, e))?;
        let chain = genesis.hash();
        let txn = db.begin_write().map_err(|e| db_err(&path, e))?;
        let height = {
            let mut meta = txn.open_table(META).map_err(|e| db_err(&path, e))?;
            let stored = meta
                .get("genesis")
                .map_err(|e| db_err(&path, e))?
                .map(|g| g.value().to_vec());
            match stored {
                Some(g) if g != chain.0 => {
                    return Err(LedgerError::Malformed(format!(
                        "{} holds the chain of another genesis",
                        path.display()
                    )))
                }
                Some(_) => {}
                None => {
                    meta.insert("genesis", chain.0.as_slice())
                        .map_err(|e| db_err(&path, e))?;
                }
            }
            txn.open_table(CERTS).map_err(|e| db_err(&path, e))?;
            txn.open_table(VOTES).map_err(|e| db_err(&path, e))?;
            txn.open_table(WAL).map_err(|e| db_err(&path, e))?;
            let blocks = txn.open_table(BLOCKS).map_err(|e| db_err(&path, e))?;
            let last = blocks.last().map_err(|e| db_err(&path, e))?;
            last.map(|(k, _)| k.value()).unwrap_or(0)
        };
        txn.commit().map_err(|e| db_err(&path, e))?;
        Ok(LedgerDb { db, path, height })
    }

    /// Where the store lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn read(&self, height: u64) -> Result<Option<(Block, Certificate)>, LedgerError> {
        let txn = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
        let blocks = txn.open_table(BLOCKS).map_err(|e| db_err(&self.path, e))?;
        let certs = txn.open_table(CERTS).map_err(|e| db_err(&self.path, e))?;
        let block = blocks.get(height).map_err(|e| db_err(&self.path, e))?;
        let cert = certs.get(height).map_err(|e| db_err(&self.path, e))?;
        match (block, cert) {
            (Some(b), Some(c)) => Ok(Some((
                Block::decode(b.value())?,
                Certificate::decode(c.value())?,
            ))),
            (None, None) => Ok(None),
            _ => Err(LedgerError::Malformed(format!(
                "{}: block {height} without its certificate",
                self.path.display()
            ))),
        }
    }
}

impl ChainStore for LedgerDb {
    fn height(&self) -> u64 {
        self.height
    }

    fn get(&self, height: u64) -> Option<(Block, Certificate)> {
        match self.read(height) {
            Ok(found) => found,
            Err(e) => {
                tracing::error!("ledger store: {e}");
                None
            }
        }
    }

    fn append(&mut self, block: &Block, cert: &Certificate) -> Result<(), LedgerError> {
        if block.height != self.height + 1 || cert.height != block.height {
            return Err(LedgerError::Malformed(format!(
                "appending block {} to a chain of height {}",
                block.height, self.height
            )));
        }
        let txn = self.db.begin_write().map_err(|e| db_err(&self.path, e))?;
        {
            let mut blocks = txn.open_table(BLOCKS).map_err(|e| db_err(&self.path, e))?;
            blocks
                .insert(block.height, block.encoded().as_ref())
                .map_err(|e| db_err(&self.path, e))?;
            let mut certs = txn.open_table(CERTS).map_err(|e| db_err(&self.path, e))?;
            certs
                .insert(block.height, cert.encode().as_slice())
                .map_err(|e| db_err(&self.path, e))?;
            // Votes of decided heights are no longer needed.
            let mut votes = txn.open_table(VOTES).map_err(|e| db_err(&self.path, e))?;
            votes
                .retain(|(h, _, _), _| h > block.height)
                .map_err(|e| db_err(&self.path, e))?;
            let mut wal = txn.open_table(WAL).map_err(|e| db_err(&self.path, e))?;
            wal.retain(|(h, _), _| h > block.height)
                .map_err(|e| db_err(&self.path, e))?;
        }
        txn.commit().map_err(|e| db_err(&self.path, e))?;
        self.height = block.height;
        Ok(())
    }

    fn signed_vote(&self, height: u64, round: u32, kind: VoteKind) -> Option<Option<BlockHash>> {
        let txn = self.db.begin_read().ok()?;
        let votes = txn.open_table(VOTES).ok()?;
        let got = votes.get((height, round, kind_byte(kind))).ok()??;
        let v = got.value();
        match v.len() {
            0 => Some(None),
            32 => Some(Some(BlockHash(v.try_into().ok()?))),
            _ => None,
        }
    }

    fn record_vote(
        &mut self,
        height: u64,
        round: u32,
        kind: VoteKind,
        value: Option<BlockHash>,
    ) -> Result<(), LedgerError> {
        let txn = self.db.begin_write().map_err(|e| db_err(&self.path, e))?;
        {
            let mut votes = txn.open_table(VOTES).map_err(|e| db_err(&self.path, e))?;
            let bytes: &[u8] = match &value {
                Some(h) => &h.0,
                None => &[],
            };
            votes
                .insert((height, round, kind_byte(kind)), bytes)
                .map_err(|e| db_err(&self.path, e))?;
        }
        txn.commit().map_err(|e| db_err(&self.path, e))
    }

    fn wal_append(&mut self, height: u64, entry: &[u8]) -> Result<(), LedgerError> {
        let mut txn = self.db.begin_write().map_err(|e| db_err(&self.path, e))?;
        // Not synced here: the next durable commit (a vote recorded before it
        // is signed, or a block) makes it durable with everything before it.
        txn.set_durability(redb::Durability::None);
        {
            let mut wal = txn.open_table(WAL).map_err(|e| db_err(&self.path, e))?;
            let next = wal
                .range((height, 0)..=(height, u64::MAX))
                .map_err(|e| db_err(&self.path, e))?
                .next_back()
                .transpose()
                .map_err(|e| db_err(&self.path, e))?
                .map_or(0, |(k, _)| k.value().1 + 1);
            wal.insert((height, next), entry)
                .map_err(|e| db_err(&self.path, e))?;
        }
        txn.commit().map_err(|e| db_err(&self.path, e))
    }

    fn wal(&self, height: u64) -> Vec<Vec<u8>> {
        let read = || -> Result<Vec<Vec<u8>>, LedgerError> {
            let txn = self.db.begin_read().map_err(|e| db_err(&self.path, e))?;
            let wal = txn.open_table(WAL).map_err(|e| db_err(&self.path, e))?;
            let mut out = Vec::new();
            for item in wal
                .range((height, 0)..=(height, u64::MAX))
                .map_err(|e| db_err(&self.path, e))?
            {
                out.push(item.map_err(|e| db_err(&self.path, e))?.1.value().to_vec());
            }
            Ok(out)
        };
        read().unwrap_or_else(|e| {
            tracing::error!("ledger store: write-ahead log of height {height}: {e}");
            Vec::new()
        })
    }
}
