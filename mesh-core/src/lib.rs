//! mesh-llm core: a peer-to-peer LLM inference runtime as a library.
//!
//! The modules follow the map in `ARCHITECTURE.md`:
//!
//! * [`gguf`] parses and validates GGUF model files (untrusted bytes).
//! * [`tokenizer`] turns text into token ids and back, from the GGUF vocabulary.
//! * [`sampling`] picks the next token from logits (greedy, temperature, top-k/p, min-p, penalties).
//! * [`chat`] renders a conversation with the model's own chat template.
//! * [`engine`] runs a range of transformer layers on ggml: the primitive that
//!   local, pipeline and private generation all compose.
//! * [`fetch`] resolves and downloads the default model into a local cache.
//! * [`generate`] drives a whole local generation (prompt, decode loop, stop conditions).
//! * [`delegate`] is the arithmetic of private delegation: fixed-point ring encoding, integer GGUF kernels, additive shares, Freivalds checks.
//! * [`pipeline`] splits a model's layers across peers: stage protocol and server, planner, client with failover.
//! * [`node`] is the facade hosts use: [`node::Node`] serves layers and generates locally or across the mesh.
//! * [`compute`] is the process-wide compute pool every graph of a node takes turns on.
//! * [`network`] finds peers and moves tensors between them: libp2p, or an in-memory mesh for tests and simulations.
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
pub mod ledger;
pub mod model_id;
pub mod network;
pub mod node;
pub mod pipeline;
pub mod sampling;
pub mod tokenizer;

pub use error::{Error, Result};
