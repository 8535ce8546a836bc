//! mesh-llm core: a peer-to-peer LLM inference runtime as a library.
//!
//! # Where to start
//!
//! A few types cover what most hosts need:
//!
//! * [`engine::GgmlEngine`] loads a GGUF model; [`generate::generate`] runs a
//!   local generation on one of its sessions.
//! * [`node::Node`] joins the mesh: serves layer ranges
//!   ([`Node::serve`](node::Node::serve)), acts as a private-mode helper, and
//!   generates locally, across a pipeline of peers or with private helpers
//!   ([`node::Mode`]).
//! * [`fetch::ModelSpec`] / [`fetch::default_model`] find a model (the default
//!   one is fetched into a cache on first use); [`ModelId`](model_id::ModelId)
//!   names a model by the BLAKE3 hash of its file.
//! * [`Error`] and [`Result`]: every fallible call. Each layer has its own
//!   typed error inside a root variant: [`LayerError`] with a kind to match on
//!   for GGUF files, the tokenizer, chat templates, fetching and ggml
//!   ([`gguf::GgufErrorKind`], ...), and richer types for the network, sealing,
//!   pipelines, private mode, adapters and the ledger.
//! * [`engine::EngineOptions`]: how an engine computes (threads, exact
//!   accumulation), fixed when it is loaded.
//!
//! ```no_run
//! use mesh_core::engine::{Engine, GgmlEngine};
//! use mesh_core::generate::{generate, tokenize_prompt, GenerateParams, Prompt};
//!
//! # fn main() -> mesh_core::Result<()> {
//! let path = mesh_core::fetch::default_model(&mut |_| {})?;
//! let engine = GgmlEngine::load(&path, 1)?;
//! let ids = tokenize_prompt(&engine, &Prompt::Text("The capital of France is".into()))?;
//! let mut session = engine.new_session(256)?;
//! let out = generate(&engine, &mut session, &ids, &GenerateParams::default(), None,
//!                    &mut |piece| { print!("{piece}"); true })?;
//! # let _ = out;
//! # Ok(()) }
//! ```
//!
//! # Modules
//!
//! The modules follow the map in `docs/ARCHITECTURE.md`:
//!
//! * [`gguf`] parses and validates GGUF model files (untrusted bytes).
//! * [`tokenizer`] turns text into token ids and back, from the GGUF vocabulary.
//! * [`sampling`] picks the next token from logits (greedy, temperature, top-k/p, min-p, penalties).
//! * [`chat`] renders a conversation with the model's own chat template.
//! * [`json_mode`] constrains sampling to one JSON object.
//! * [`engine`] runs a range of transformer layers on ggml: the primitive that
//!   local, pipeline and private generation all compose; LoRA adapters apply beside it.
//! * [`fetch`] resolves and downloads the default model into a local cache.
//! * [`generate`] drives a whole local generation (prompt, decode loop, stop conditions).
//! * [`delegate`] is private mode: fixed-point ring encoding, integer GGUF kernels,
//!   additive shares, Freivalds checks, sealed envelopes, helpers and the owner.
//! * [`pipeline`] splits a model's layers across peers: stage protocol and server, planner, client with failover.
//! * [`node`] is the facade hosts use: [`node::Node`] serves layers and generates locally or across the mesh.
//! * [`ledger`] decides which LoRA updates the mesh runs: signed records,
//!   robust aggregation, a stake-weighted BFT chain with commit certificates.
//! * [`compute`] is the process-wide compute pool every graph of a node takes turns on.
//! * [`network`] finds peers and moves tensors between them: libp2p, or an in-memory mesh for tests and simulations.
//! * [`model_id`] names models (a leaf module every other one uses).
#![warn(missing_docs)]

pub mod chat;
pub mod compute;
pub mod delegate;
pub mod engine;
mod error;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod json_mode;
pub mod json_schema;
pub mod ledger;
pub mod model_id;
pub mod network;
pub mod node;
pub mod pipeline;
pub mod sampling;
pub mod tokenizer;

pub use error::{Error, LayerError, Result};
