//! Pipeline inference across peers: a model's layers split over nodes.
//!
//! * [`protocol`]: the stage messages (open a session over a layer range,
//!   forward hidden rows, truncate, close), versioned and size-checked.
//! * [`server`]: [`server::StageServer`] answers them for the layer ranges a
//!   node serves, with per-session KV caches under a memory budget.
//! * [`planner`]: which peers compute which layers (shortest path over the
//!   expected time per token).
//! * [`client`]: [`client::PipelineSession`] runs hidden rows through the
//!   planned chain and fails over to other peers, replaying history so the
//!   output does not change.
//!
//! [`crate::node::Node`] puts them together.

use std::ops::Range;

use crate::network::PeerId;

pub mod client;
pub mod planner;
pub mod protocol;
pub mod server;

pub use protocol::{DType, ErrorCode, DELIVER_METHOD, STAGE_METHOD};

/// Errors of pipeline inference.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// No candidate (outside the avoided peers) serves some layers.
    #[error("no reachable peer serves layers {}", ranges(.missing))]
    Uncovered {
        /// The layers nobody serves, as ranges.
        missing: Vec<Range<u32>>,
    },
    /// A stage answered with an error.
    #[error("stage {peer} answered {code}: {message}")]
    Stage {
        /// The stage.
        peer: PeerId,
        /// Its error code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// A stage's reply does not fit the request.
    #[error("stage {peer} sent an invalid reply: {message}")]
    BadReply {
        /// The stage.
        peer: PeerId,
        /// What is wrong with it.
        message: String,
    },
    /// A stage's peer disconnected during the session (its last connection
    /// closed), so its layers were planned again before the next request
    /// (the failover's reason; never returned by itself).
    #[error("stage {peer} left the mesh (its last connection closed)")]
    Left {
        /// The stage.
        peer: PeerId,
    },
    /// A stage failed and no other peer can take its layers.
    #[error("stage {peer} failed ({error}) and no other peer serves layers {}", ranges(.missing))]
    FailoverImpossible {
        /// The stage that failed.
        peer: PeerId,
        /// How it failed.
        error: String,
        /// Layers left without a provider.
        missing: Vec<Range<u32>>,
    },
    /// Too many stages failed in one session.
    #[error("gave up after {failovers} failovers; last error: {last}")]
    Exhausted {
        /// Failovers done.
        failovers: usize,
        /// The last error.
        last: String,
    },
}

/// `0-9, 20-29` (inclusive layer numbers, as people count them).
fn ranges(r: &[Range<u32>]) -> String {
    r.iter()
        .map(|r| format!("{}-{}", r.start, r.end.saturating_sub(1)))
        .collect::<Vec<_>>()
        .join(", ")
}

impl From<PipelineError> for crate::Error {
    fn from(e: PipelineError) -> Self {
        crate::Error::Pipeline(Box::new(e))
    }
}
