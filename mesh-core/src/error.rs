use std::fmt;
use std::path::PathBuf;

use crate::chat::{TemplateError, TemplateErrorKind};
use crate::engine::{GgmlError, GgmlErrorKind};
use crate::fetch::{FetchError, FetchErrorKind};
use crate::gguf::{GgufError, GgufErrorKind};
use crate::tokenizer::{TokenizerError, TokenizerErrorKind};

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
    /// A GGUF file is malformed (bad magic, truncated, out-of-bounds tensor,
    /// ...) or not a model this engine can run; see [`GgufErrorKind`].
    #[error("gguf: {0}")]
    Gguf(GgufError),
    /// The input is valid but uses something this build does not support
    /// (architecture, tensor type, tokenizer model, ...).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The model's vocabulary is inconsistent: the tokenizer could not be
    /// built from it; see [`TokenizerErrorKind`].
    #[error("tokenizer: {0}")]
    Tokenizer(TokenizerError),
    /// A chat template failed to parse or render; see [`TemplateErrorKind`].
    #[error("chat template: {0}")]
    Template(TemplateError),
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
    /// Fetching or verifying a model file failed; see [`FetchErrorKind`].
    #[error("model fetch: {0}")]
    Fetch(FetchError),
    /// ggml failed to allocate or compute; see [`GgmlErrorKind`].
    #[error("ggml: {0}")]
    Ggml(GgmlError),
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

    /// An [`Error::Gguf`] of `kind`.
    pub(crate) fn gguf(kind: GgufErrorKind, message: impl Into<String>) -> Self {
        Error::Gguf(LayerError::new(kind, message))
    }

    /// An [`Error::Tokenizer`] of `kind`.
    pub(crate) fn tokenizer(kind: TokenizerErrorKind, message: impl Into<String>) -> Self {
        Error::Tokenizer(LayerError::new(kind, message))
    }

    /// An [`Error::Template`] of `kind`.
    pub(crate) fn template(kind: TemplateErrorKind, message: impl Into<String>) -> Self {
        Error::Template(LayerError::new(kind, message))
    }

    /// An [`Error::Fetch`] of `kind`.
    pub(crate) fn fetch(kind: FetchErrorKind, message: impl Into<String>) -> Self {
        Error::Fetch(LayerError::new(kind, message))
    }

    /// An [`Error::Ggml`] of `kind`.
    pub(crate) fn ggml(kind: GgmlErrorKind, message: impl Into<String>) -> Self {
        Error::Ggml(LayerError::new(kind, message))
    }
}

/// The error of one layer of mesh-core (GGUF parsing, the tokenizer, chat
/// templates, model fetching, ggml): a kind to match on, and a message that
/// says what was expected and what was found. `K` is the layer's kind enum
/// ([`GgufErrorKind`], [`TokenizerErrorKind`], [`TemplateErrorKind`],
/// [`FetchErrorKind`], [`GgmlErrorKind`]); the layer's alias names the type
/// ([`GgufError`], ...). Layers with richer errors have their own types
/// ([`crate::network::NetworkError`], [`crate::delegate::seal::SealError`],
/// [`crate::engine::AdapterError`], ...).
///
/// ```
/// # use mesh_core::{gguf::{Gguf, GgufErrorKind}, Error};
/// match Gguf::parse(b"GGUF") {
///     Err(Error::Gguf(e)) => assert_eq!(e.kind(), GgufErrorKind::Truncated),
///     other => panic!("{other:?}"),
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerError<K> {
    kind: K,
    message: String,
}

impl<K: Copy> LayerError<K> {
    /// An error of `kind` saying `message` (for hosts' and tests' own
    /// errors; mesh-core makes its own).
    pub fn new(kind: K, message: impl Into<String>) -> Self {
        LayerError {
            kind,
            message: message.into(),
        }
    }

    /// What kind of failure this is.
    pub fn kind(&self) -> K {
        self.kind
    }

    /// What was expected and what was found (the error's `Display`).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The same error with `at: ` in front of its message.
    pub(crate) fn at(self, at: impl fmt::Display) -> Self {
        LayerError {
            kind: self.kind,
            message: format!("{at}: {}", self.message),
        }
    }
}

impl<K> fmt::Display for LayerError<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<K: fmt::Debug> std::error::Error for LayerError<K> {}

impl From<crate::ledger::LedgerError> for Error {
    fn from(e: crate::ledger::LedgerError) -> Self {
        Error::Ledger(Box::new(e))
    }
}
