//! Model sync: signed update records naming LoRA adapters, and the
//! content-addressed transfer of the adapters themselves.
//!
//! This is the ledger's foundation: [`record`] (what an author signs),
//! [`store`] (adapter files named by hash, written atomically) and
//! [`transfer`] (chunks over request/response, verified by hash). Records are
//! announced on the gossip topic [`record::UPDATE_TOPIC`] (see
//! [`crate::node::Node::enable_updates`]). [`aggregate()`] combines competing
//! updates robustly and reproducibly (norm clipping, then Multi-Krum, exact in
//! factor space). Which update the mesh runs is decided by [`consensus`]
//! (stake-weighted BFT: Malachite's Tendermint core over the node's own
//! network) on the blocks of [`chain`] (genesis, blocks, commit certificates
//! that verify offline).

use std::path::Path;

use crate::engine::ModelId;
use crate::network::PeerId;

pub mod aggregate;
pub mod chain;
pub mod consensus;
pub mod db;
pub mod pool;
pub mod record;
pub mod stake;
pub mod store;
pub mod transfer;

pub use aggregate::{aggregate, Aggregate, AggregateConfig};
pub use record::{UpdateDraft, UpdateId, UpdateRecord};
pub use stake::{StakeTransfer, Stakes};
pub use store::AdapterStore;
pub use transfer::{FetchConfig, Fetched};

/// Why a record, a store operation or a transfer failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// Bytes that do not decode, or fields out of range.
    #[error("malformed: {0}")]
    Malformed(String),
    /// A size over a protocol limit.
    #[error("{what} of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// What.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// A version this build does not read.
    #[error("version {0} is not supported")]
    UnsupportedVersion(u32),
    /// The signature is not the named author's.
    #[error("the signature is not {author}'s")]
    BadSignature {
        /// The author the record names.
        author: PeerId,
    },
    /// Bytes whose hash is not the one asked for.
    #[error("content hash {found} is not the expected {expected}")]
    HashMismatch {
        /// The id asked for.
        expected: ModelId,
        /// The hash of what arrived.
        found: ModelId,
    },
    /// A peer failed to send what was asked (error, timeout, wrong size).
    #[error("peer: {0}")]
    Peer(String),
    /// No peer sent the adapter.
    #[error("adapter {adapter} is not available: {}", describe(failures))]
    Unavailable {
        /// The adapter.
        adapter: ModelId,
        /// Each peer asked, and why it failed.
        failures: Vec<(PeerId, String)>,
    },
    /// A file operation failed.
    #[error("{path}: {message}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        message: String,
    },
}

fn describe(failures: &[(PeerId, String)]) -> String {
    if failures.is_empty() {
        return "no peer to ask".into();
    }
    failures
        .iter()
        .map(|(p, e)| format!("{p}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

impl LedgerError {
    fn io(path: &Path, e: std::io::Error) -> LedgerError {
        LedgerError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        }
    }
}
