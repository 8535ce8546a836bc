use std::path::PathBuf;

/// Result alias used throughout mesh-core.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every error mesh-core can return. Messages say what was expected and what was found.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A GGUF file is malformed (bad magic, truncated, out-of-bounds tensor, ...).
    #[error("gguf: {0}")]
    Gguf(String),
    /// The input is valid but uses something this build does not support
    /// (architecture, tensor type, tokenizer model, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The tokenizer could not be built from the model, or could not encode/decode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A chat template failed to parse or render.
    #[error("chat template: {0}")]
    Template(String),
    /// A caller passed an invalid argument (bad range, empty prompt, invalid UTF-8, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The request needs more context than the KV cache holds.
    #[error("context overflow: need {needed} positions, the context holds {capacity}")]
    ContextOverflow {
        /// Positions the request needs.
        needed: usize,
        /// Positions the KV cache holds.
        capacity: usize,
    },
    /// Fetching or verifying a model file failed.
    #[error("model fetch: {0}")]
    Fetch(String),
    /// ggml failed to allocate or compute.
    #[error("ggml: {0}")]
    Ggml(String),
    /// Private mode found too few helpers it may use: fewer nodes answered
    /// as helpers of the model, or too many of them share a network (at most
    /// one untrusted helper per IPv4 /24 or IPv6 /48).
    #[error(
        "private mode needs {needed} helpers (active and spares); found {found} usable among \
         {candidates} that answered ({same_network} left out for sharing a network with \
         another helper; trust peers by id to lift that rule){}",
        if refused.is_empty() { String::new() } else { format!("; not helpers: {}", refused.join("; ")) }
    )]
    NotEnoughHelpers {
        /// Helpers needed.
        needed: usize,
        /// Helpers usable.
        found: usize,
        /// Nodes that answered as helpers.
        candidates: usize,
        /// Nodes left out for sharing a network.
        same_network: usize,
        /// Providers of the model that did not answer as helpers, and why.
        refused: Vec<String>,
    },
    /// The operation was cancelled by the caller.
    #[error("cancelled")]
    Cancelled,
    /// Sealing or opening a delegation envelope failed (bad version, length,
    /// authentication, replay, key, ...).
    #[error("seal: {0}")]
    Seal(crate::delegate::seal::SealError),
    /// A network operation failed (dial, timeout, size limit, remote error, ...).
    #[error("network: {0}")]
    Network(crate::network::NetworkError),
    /// Pipeline inference across peers failed (no cover, stage error, failover).
    #[error("pipeline: {0}")]
    Pipeline(Box<crate::pipeline::PipelineError>),
    /// Model sync: a bad update record, a failed adapter transfer or store.
    #[error("ledger: {0}")]
    Ledger(Box<crate::ledger::LedgerError>),
    /// A LoRA adapter was refused (not an adapter, another architecture or
    /// model, a shape or type that does not fit).
    #[error("adapter: {0}")]
    Adapter(crate::engine::AdapterError),
    /// Private mode: helpers failed a step (no session, no usable answer, a
    /// wrong result) and no spare was left to take their place.
    #[error("private mode: {0}")]
    Helper(Box<crate::delegate::private::HelperFailure>),
}

impl Error {
    /// Build an [`Error::Io`] for `path`.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

impl From<crate::ledger::LedgerError> for Error {
    fn from(e: crate::ledger::LedgerError) -> Self {
        Error::Ledger(Box::new(e))
    }
}
