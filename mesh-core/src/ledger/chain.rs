//! The ledger's chain: a genesis (validators and their stake), blocks (the
//! update records decided at a height and the adapter each base model runs
//! from then on), commit certificates, and offline verification.
//!
//! A block counts only with a commit certificate: precommits for its hash by
//! validators holding more than 2/3 of the genesis stake, each an Ed25519
//! signature by the key the validator's peer id embeds. [`verify_chain`]
//! checks a whole chain against the genesis alone, with no network.
//!
//! On the wire (all prost, every field checked on decode, never panics):
//!
//! ```proto
//! syntax = "proto3";
//! package mesh.ledger.v1;
//! message Active { bytes base = 1; bytes adapter = 2; }
//! message BlockMsg { uint32 version = 1; uint64 height = 2; bytes parent = 3;
//!                    bytes proposer = 4; uint64 time_ms = 5;
//!                    repeated bytes updates = 6; repeated Active active = 7; }
//! message AggregateMsg { bytes base = 1; bytes adapter = 2; uint64 adapter_size = 3;
//!                        uint32 byzantine = 4; }
//! // BlockMsg also has: repeated AggregateMsg aggregates = 8;
//! //                    repeated bytes stake = 9;  (StakeMsg, see `stake`)
//! message CommitSig { bytes validator = 1; bytes signature = 2; }
//! message CertMsg { uint64 height = 1; int64 round = 2; bytes block = 3;
//!                   repeated CommitSig signatures = 4; }
//! ```

mod cert;

pub use self::cert::{CertMsg, Certificate, CommitSig, CommitSigMsg};

use std::collections::BTreeMap;
use std::fmt;

use bytes::Bytes;
use prost::Message;
use serde::{Deserialize, Serialize};

use super::record::UpdateRecord;
use super::stake::{StakeTransfer, Stakes};
use super::LedgerError;
use crate::engine::ModelId;
use crate::network::identity::ed25519_of;
use crate::network::PeerId;

/// Version of [`BlockMsg`] this build writes and reads.
pub const BLOCK_VERSION: u32 = 1;

/// Largest encoded block accepted.
pub const MAX_BLOCK_BYTES: usize = 256 * 1024;

/// Most update records in one block.
pub const MAX_BLOCK_UPDATES: usize = 32;

/// Most stake transfers in one block.
pub const MAX_BLOCK_STAKE: usize = 64;

/// Most validators in a genesis (and at any height).
pub const MAX_VALIDATORS: usize = 256;

/// Largest stake of one validator (keeps every sum of stakes far from
/// overflowing).
pub const MAX_POWER: u64 = 1 << 40;

/// Largest encoded commit certificate accepted.
pub const MAX_CERT_BYTES: usize = 8 + MAX_VALIDATORS * 128 + 128;

const BLOCK_DOMAIN: &[u8] = b"mesh-llm block v1\0";
const GENESIS_DOMAIN: &[u8] = b"mesh-llm genesis v1\0";

/// The hash of a block (or, for height 1's parent, of the genesis).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct BlockHash(pub [u8; 32]);

impl BlockHash {
    /// Lower-case hex.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl fmt::Display for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlockHash({})", &self.to_hex()[..16])
    }
}

/// One validator of a genesis.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GenesisValidator {
    /// Its peer id (an Ed25519 identity: the key signs its votes).
    #[serde(with = "peer_string")]
    pub peer_id: PeerId,
    /// Its stake (voting power), 1 to [`MAX_POWER`].
    pub power: u64,
}

/// The chain's first statement: who validates, with how much stake.
///
/// Read from JSON:
/// `{"chain_id": "my-mesh", "validators": [{"peer_id": "12D3Koo…", "power": 10}]}`.
/// Validators are kept sorted by peer id; duplicates, zero stake and
/// non-Ed25519 peer ids are errors (a zero-stake identity could change
/// nothing anyway).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Genesis {
    /// A name that separates this chain's signatures from any other's.
    pub chain_id: String,
    /// The validators.
    pub validators: Vec<GenesisValidator>,
}

mod peer_string {
    use super::PeerId;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &PeerId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&p.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PeerId, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Genesis {
    /// A checked genesis (see the type's documentation for the rules).
    pub fn new(chain_id: &str, validators: Vec<GenesisValidator>) -> Result<Genesis, LedgerError> {
        let mut g = Genesis {
            chain_id: chain_id.to_string(),
            validators,
        };
        g.check()?;
        Ok(g)
    }

    /// Parses and checks a genesis file's JSON.
    pub fn from_json(text: &str) -> Result<Genesis, LedgerError> {
        let mut g: Genesis = serde_json::from_str(text)
            .map_err(|e| LedgerError::Malformed(format!("genesis: {e}")))?;
        g.check()?;
        Ok(g)
    }

    /// The genesis as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    fn check(&mut self) -> Result<(), LedgerError> {
        let bad = |m: String| Err(LedgerError::Malformed(format!("genesis: {m}")));
        if self.chain_id.is_empty() || self.chain_id.len() > 64 {
            return bad("chain_id must have 1 to 64 bytes".into());
        }
        if self.validators.is_empty() || self.validators.len() > MAX_VALIDATORS {
            return bad(format!(
                "{} validators: expected 1 to {MAX_VALIDATORS}",
                self.validators.len()
            ));
        }
        self.validators.sort_by_key(|v| v.peer_id);
        for w in self.validators.windows(2) {
            if w[0].peer_id == w[1].peer_id {
                return bad(format!("validator {} is listed twice", w[0].peer_id));
            }
        }
        for v in &self.validators {
            if v.power == 0 || v.power > MAX_POWER {
                return bad(format!(
                    "validator {} has stake {}: expected 1 to {MAX_POWER}",
                    v.peer_id, v.power
                ));
            }
            ed25519_of(&v.peer_id).map_err(|e| LedgerError::Malformed(format!("genesis: {e}")))?;
        }
        Ok(())
    }

    /// The genesis hash: the parent of block 1, and mixed into every
    /// signature so that votes of one chain mean nothing on another.
    pub fn hash(&self) -> BlockHash {
        let mut h = blake3::Hasher::new();
        h.update(GENESIS_DOMAIN);
        h.update(&(self.chain_id.len() as u64).to_le_bytes());
        h.update(self.chain_id.as_bytes());
        for v in &self.validators {
            let id = v.peer_id.to_bytes();
            h.update(&(id.len() as u64).to_le_bytes());
            h.update(&id);
            h.update(&v.power.to_le_bytes());
        }
        BlockHash(*h.finalize().as_bytes())
    }

    /// The sum of all stakes.
    pub fn total_power(&self) -> u64 {
        self.validators.iter().map(|v| v.power).sum()
    }

    /// The stake of `peer` (0 for anyone not a validator).
    pub fn power_of(&self, peer: &PeerId) -> u64 {
        stake_in(&self.validators, peer)
    }
}

/// The stake of `peer` in `validators` (sorted by peer id; 0 if absent).
pub(crate) fn stake_in(validators: &[GenesisValidator], peer: &PeerId) -> u64 {
    validators
        .binary_search_by(|v| v.peer_id.cmp(peer))
        .map(|i| validators[i].power)
        .unwrap_or(0)
}

/// What a proposer puts in a block (see [`Block::build`]).
#[derive(Clone, Debug, Default)]
pub struct BlockDraft {
    /// Update records decided at this height.
    pub updates: Vec<UpdateRecord>,
    /// Base model -> the adapter it runs from this height on.
    pub active: BTreeMap<ModelId, ModelId>,
    /// Base model -> the robust aggregate of its updates in this block (for
    /// every base with several).
    pub aggregates: BTreeMap<ModelId, AggregateEntry>,
    /// Stake transfers, applied in this order (see [`Stakes::after`]).
    pub stake: Vec<StakeTransfer>,
}

/// The aggregate of a block's updates for one base model: the adapter
/// [`crate::ledger::aggregate()`] writes from them (in block order, with
/// `byzantine` tolerated), which every validator recomputes before voting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AggregateEntry {
    /// The aggregate adapter's id (BLAKE3 of its file).
    pub adapter: ModelId,
    /// Its file's size.
    pub adapter_size: u64,
    /// Byzantine updates tolerated (Multi-Krum; 0: the clipped mean of all).
    pub byzantine: u32,
}

/// The Byzantine updates a block aggregates `n` competing updates with: as
/// many as Multi-Krum allows (`n >= 2f + 3`), 0 below 3 updates.
pub fn byzantine_for(n: usize) -> u32 {
    (n.saturating_sub(3) / 2) as u32
}

/// A decided (or proposed) block.
#[derive(Clone)]
pub struct Block {
    /// Its height (1 is the first block).
    pub height: u64,
    /// The hash of the block before it (the genesis hash for height 1).
    pub parent: BlockHash,
    /// The validator that proposed it.
    pub proposer: PeerId,
    /// The proposer's clock when it built the block, in ms since 1970.
    pub time_ms: u64,
    /// Update records decided at this height (each signed by its author).
    pub updates: Vec<UpdateRecord>,
    /// Base model -> the adapter it runs from this height on.
    pub active: BTreeMap<ModelId, ModelId>,
    /// Base model -> the aggregate of its updates here (bases with several).
    pub aggregates: BTreeMap<ModelId, AggregateEntry>,
    /// Stake transfers, in the order they apply (from the next height on).
    pub stake: Vec<StakeTransfer>,
    encoded: Bytes,
    hash: BlockHash,
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("height", &self.height)
            .field("hash", &self.hash)
            .field("parent", &self.parent)
            .field("proposer", &self.proposer)
            .field("updates", &self.updates.len())
            .field("active", &self.active.len())
            .field("stake", &self.stake.len())
            .finish()
    }
}

impl PartialEq for Block {
    fn eq(&self, other: &Block) -> bool {
        self.hash == other.hash
    }
}
impl Eq for Block {}
impl PartialOrd for Block {
    fn partial_cmp(&self, other: &Block) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Block {
    fn cmp(&self, other: &Block) -> std::cmp::Ordering {
        self.hash.cmp(&other.hash)
    }
}

/// Wire form of a block's active adapter.
#[derive(Clone, PartialEq, Message)]
pub struct ActiveMsg {
    /// Base model id.
    #[prost(bytes = "vec", tag = "1")]
    pub base: Vec<u8>,
    /// Adapter id.
    #[prost(bytes = "vec", tag = "2")]
    pub adapter: Vec<u8>,
}

/// Wire form of a block.
#[derive(Clone, PartialEq, Message)]
pub struct BlockMsg {
    /// [`BLOCK_VERSION`].
    #[prost(uint32, tag = "1")]
    pub version: u32,
    /// Height.
    #[prost(uint64, tag = "2")]
    pub height: u64,
    /// Parent hash.
    #[prost(bytes = "vec", tag = "3")]
    pub parent: Vec<u8>,
    /// Proposer's peer id bytes.
    #[prost(bytes = "vec", tag = "4")]
    pub proposer: Vec<u8>,
    /// Proposer's clock.
    #[prost(uint64, tag = "5")]
    pub time_ms: u64,
    /// Encoded update records.
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub updates: Vec<Vec<u8>>,
    /// Active adapters, sorted by base, one per base.
    #[prost(message, repeated, tag = "7")]
    pub active: Vec<ActiveMsg>,
    /// Aggregates, sorted by base, one per base.
    #[prost(message, repeated, tag = "8")]
    pub aggregates: Vec<AggregateMsg>,
    /// Encoded stake transfers ([`super::stake::StakeMsg`]).
    #[prost(bytes = "vec", repeated, tag = "9")]
    pub stake: Vec<Vec<u8>>,
}

/// Wire form of an [`AggregateEntry`].
#[derive(Clone, PartialEq, Message)]
pub struct AggregateMsg {
    /// Base model id.
    #[prost(bytes = "vec", tag = "1")]
    pub base: Vec<u8>,
    /// Aggregate adapter id.
    #[prost(bytes = "vec", tag = "2")]
    pub adapter: Vec<u8>,
    /// Its size in bytes.
    #[prost(uint64, tag = "3")]
    pub adapter_size: u64,
    /// Byzantine updates tolerated.
    #[prost(uint32, tag = "4")]
    pub byzantine: u32,
}

fn id32(what: &str, bytes: &[u8]) -> Result<[u8; 32], LedgerError> {
    bytes.try_into().map_err(|_| {
        LedgerError::Malformed(format!("{what}: expected 32 bytes, found {}", bytes.len()))
    })
}

impl Block {
    /// Builds (and encodes) the block `draft` describes. Fails where
    /// [`Block::decode`] would refuse the result.
    pub fn build(
        height: u64,
        parent: BlockHash,
        proposer: PeerId,
        draft: BlockDraft,
    ) -> Result<Block, LedgerError> {
        let time_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let msg = BlockMsg {
            version: BLOCK_VERSION,
            height,
            parent: parent.0.to_vec(),
            proposer: proposer.to_bytes(),
            time_ms,
            updates: draft.updates.iter().map(|u| u.encode()).collect(),
            active: draft
                .active
                .iter()
                .map(|(b, a)| ActiveMsg {
                    base: b.0.to_vec(),
                    adapter: a.0.to_vec(),
                })
                .collect(),
            aggregates: draft
                .aggregates
                .iter()
                .map(|(b, g)| AggregateMsg {
                    base: b.0.to_vec(),
                    adapter: g.adapter.0.to_vec(),
                    adapter_size: g.adapter_size,
                    byzantine: g.byzantine,
                })
                .collect(),
            stake: draft.stake.iter().map(|t| t.encoded().to_vec()).collect(),
        };
        Block::decode(&msg.encode_to_vec())
    }

    /// Decodes and checks a block: sizes, fields, every update record's
    /// signature, no record twice, and the rule for active adapters: each
    /// names a base model with updates in this block; with one, it is that
    /// update's adapter; with several, it is their aggregate, which the
    /// block then names (with [`byzantine_for`] Byzantine updates tolerated,
    /// no other choice; whether it is the right aggregate, validators
    /// recompute).
    /// Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Block, LedgerError> {
        if bytes.len() > MAX_BLOCK_BYTES {
            return Err(LedgerError::TooLarge {
                what: "block",
                size: bytes.len() as u64,
                limit: MAX_BLOCK_BYTES as u64,
            });
        }
        let msg =
            BlockMsg::decode(bytes).map_err(|e| LedgerError::Malformed(format!("block: {e}")))?;
        if msg.version != BLOCK_VERSION {
            return Err(LedgerError::UnsupportedVersion(msg.version));
        }
        if msg.height == 0 {
            return Err(LedgerError::Malformed("block height 0".into()));
        }
        if msg.updates.len() > MAX_BLOCK_UPDATES {
            return Err(LedgerError::TooLarge {
                what: "block updates",
                size: msg.updates.len() as u64,
                limit: MAX_BLOCK_UPDATES as u64,
            });
        }
        if msg.stake.len() > MAX_BLOCK_STAKE {
            return Err(LedgerError::TooLarge {
                what: "block stake transfers",
                size: msg.stake.len() as u64,
                limit: MAX_BLOCK_STAKE as u64,
            });
        }
        let mut stake: Vec<StakeTransfer> = Vec::with_capacity(msg.stake.len());
        for t in &msg.stake {
            let tx = StakeTransfer::decode(t)?;
            if stake.iter().any(|s| s.id() == tx.id()) {
                return Err(LedgerError::Malformed(
                    "a stake transfer appears twice in the block".into(),
                ));
            }
            stake.push(tx);
        }
        let parent = BlockHash(id32("parent", &msg.parent)?);
        let proposer = PeerId::from_bytes(&msg.proposer)
            .map_err(|e| LedgerError::Malformed(format!("proposer: {e}")))?;
        let mut updates = Vec::with_capacity(msg.updates.len());
        for u in &msg.updates {
            let record = UpdateRecord::decode(u)?;
            if updates.iter().any(|r: &UpdateRecord| r.id() == record.id()) {
                return Err(LedgerError::Malformed(format!(
                    "update {} appears twice in the block",
                    record.id()
                )));
            }
            updates.push(record);
        }
        let mut active = BTreeMap::new();
        for a in &msg.active {
            let base = ModelId(id32("active base", &a.base)?);
            let adapter = ModelId(id32("active adapter", &a.adapter)?);
            if let Some((last, _)) = active.last_key_value() {
                if *last >= base {
                    return Err(LedgerError::Malformed(
                        "active adapters must be sorted by base model, one per base".into(),
                    ));
                }
            }
            active.insert(base, adapter);
        }
        let mut aggregates = BTreeMap::new();
        for g in &msg.aggregates {
            let base = ModelId(id32("aggregate base", &g.base)?);
            if let Some((last, _)) = aggregates.last_key_value() {
                if *last >= base {
                    return Err(LedgerError::Malformed(
                        "aggregates must be sorted by base model, one per base".into(),
                    ));
                }
            }
            if g.adapter_size == 0 || g.adapter_size > super::record::MAX_ADAPTER_BYTES {
                return Err(LedgerError::Malformed(format!(
                    "aggregate size {}",
                    g.adapter_size
                )));
            }
            let entry = AggregateEntry {
                adapter: ModelId(id32("aggregate adapter", &g.adapter)?),
                adapter_size: g.adapter_size,
                byzantine: g.byzantine,
            };
            aggregates.insert(base, entry);
        }
        for (base, adapter) in &active {
            let for_base: Vec<&UpdateRecord> = updates.iter().filter(|u| u.base == *base).collect();
            let bad = |why: String| Err(LedgerError::Malformed(format!("base {base}: {why}")));
            match (for_base.len(), aggregates.get(base)) {
                (0, _) => return bad("an active adapter without an update for it".into()),
                (1, None) if for_base[0].adapter == *adapter => {}
                (1, None) => return bad(format!("active adapter {adapter} is not its update's")),
                (1, Some(_)) => return bad("an aggregate of a single update".into()),
                (_, None) => return bad("several updates without their aggregate".into()),
                (n, Some(g)) => {
                    if g.adapter != *adapter {
                        return bad("the active adapter is not the aggregate".into());
                    }
                    if g.byzantine != byzantine_for(n) {
                        return bad(format!(
                            "{} Byzantine updates tolerated among {n}: the rule says {}",
                            g.byzantine,
                            byzantine_for(n)
                        ));
                    }
                }
            }
        }
        if let Some(base) = aggregates.keys().find(|b| !active.contains_key(b)) {
            return Err(LedgerError::Malformed(format!(
                "an aggregate for base {base}, which the block does not activate"
            )));
        }
        let mut h = blake3::Hasher::new();
        h.update(BLOCK_DOMAIN);
        h.update(bytes);
        Ok(Block {
            height: msg.height,
            parent,
            proposer,
            time_ms: msg.time_ms,
            updates,
            active,
            aggregates,
            stake,
            encoded: Bytes::copy_from_slice(bytes),
            hash: BlockHash(*h.finalize().as_bytes()),
        })
    }

    /// The block as sent.
    pub fn encoded(&self) -> &Bytes {
        &self.encoded
    }

    /// The block's hash (what validators vote for).
    pub fn hash(&self) -> BlockHash {
        self.hash
    }
}

/// More than 2/3 of `total`.
pub fn has_quorum(signed: u64, total: u64) -> bool {
    // signed > 2/3 total, in integers (stakes are at most 2^40 each).
    3 * u128::from(signed) > 2 * u128::from(total)
}

/// Checks a chain offline against its genesis: heights 1, 2, ... in order,
/// each block's parent the hash of the one before (the genesis hash for
/// the first), each certificate a valid quorum for its block under the
/// stakes of its height, and every stake transfer applicable. Returns the
/// hash of the last block (the genesis hash for an empty chain).
pub fn verify_chain<'a>(
    genesis: &Genesis,
    chain: impl IntoIterator<Item = (&'a Block, &'a Certificate)>,
) -> Result<BlockHash, LedgerError> {
    verify_chain_stakes(genesis, chain).map(|(tip, _)| tip)
}

/// [`verify_chain`], also returning the stakes after the last block (who
/// validates the next height).
pub fn verify_chain_stakes<'a>(
    genesis: &Genesis,
    chain: impl IntoIterator<Item = (&'a Block, &'a Certificate)>,
) -> Result<(BlockHash, Stakes), LedgerError> {
    let mut parent = genesis.hash();
    let mut stakes = Stakes::genesis(genesis);
    let mut height = 0u64;
    for (block, cert) in chain {
        height += 1;
        stakes = verify_link(&stakes, height, parent, block, cert)?;
        parent = block.hash();
    }
    Ok((parent, stakes))
}

/// Checks one block and its certificate as the successor of `parent` at
/// `height`, under `stakes` (those of that height). Returns the stakes
/// after the block.
pub fn verify_link(
    stakes: &Stakes,
    height: u64,
    parent: BlockHash,
    block: &Block,
    cert: &Certificate,
) -> Result<Stakes, LedgerError> {
    if block.height != height {
        return Err(LedgerError::Malformed(format!(
            "block at position {height} has height {}",
            block.height
        )));
    }
    if block.parent != parent {
        return Err(LedgerError::Malformed(format!(
            "block {height}: parent {} is not {parent}",
            block.parent
        )));
    }
    if cert.height != height || cert.block != block.hash() {
        return Err(LedgerError::Malformed(format!(
            "block {height}: the certificate is for block {} at height {}",
            cert.block, cert.height
        )));
    }
    if stakes.power_of(&block.proposer) == 0 {
        return Err(LedgerError::Malformed(format!(
            "block {height}: proposer {} is not a validator",
            block.proposer
        )));
    }
    cert.verify(stakes)?;
    stakes.after(block)
}

#[cfg(test)]
mod tests;
