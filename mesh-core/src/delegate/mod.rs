//! Private delegation of linear layers by additive secret sharing (`SMPC.md`).
//!
//! The arithmetic core, in process and without any transport:
//!
//! * [`ring`]: wrapping `Z_2^64` helpers and the owner's fixed-point encoding
//!   of activations (private scale `s`, fractional bits `F`).
//! * [`activations`]: the owner's conversion of activations to the values
//!   ggml's quantized mat-vec multiplies (Q8_0, Q8_1, Q8_K, F16), so the
//!   ring product uses the same integers as the local path.
//! * [`kernels`]: a helper's integer matrix products straight on GGUF block
//!   bytes, with every weight scaled to the exact integer `2^24·w`.
//! * [`share`](mod@share): additive sharing into `n` shares, `n - 1` of them seeded.
//! * [`verify`]: Freivalds check vectors plus the range check that let the
//!   owner reject a wrong result before it uses it.
//! * [`seal`]: RFC 9180 HPKE base mode (X25519, HKDF-SHA256, ChaCha20-Poly1305)
//!   envelopes whose AAD binds every field of the request, with a replay window,
//!   and helper keys signed by the node's Ed25519 identity.
//! * [`private`]: the owner side put together with `n >= 2` helpers: a
//!   [`PrivateProjector`](private::PrivateProjector) for
//!   `Engine::run_layers_with` / `Engine::head_with` that shares, seals,
//!   checks and reconstructs every linear projection.
//! * [`helper`]: the helper side, one [`HelperSession`](helper::HelperSession)
//!   per owner session, and the [`HelperServer`](helper::HelperServer) that
//!   answers owners on other nodes.
//! * [`link`]: how the owner reaches its helpers: in process or over the
//!   network ([`HelperLinks`](link::HelperLinks)).
//! * [`select`]: which peers may hold shares (one per network unless trusted).
//! * [`protocol`]: projection codes, payload layout and the `mesh/helper/1`
//!   messages (`docs/PRIVATE.md`).

pub mod activations;
pub mod helper;
pub mod kernels;
pub mod link;
pub mod private;
pub mod protocol;
pub mod ring;
pub mod seal;
pub mod select;
pub mod share;
pub mod verify;

pub use kernels::Matrix;
pub use ring::FixedPoint;
pub use share::{reconstruct, share, ShareSeed, Shares};
pub use verify::{CheckFailure, Checker};
