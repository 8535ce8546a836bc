//! The owner side of private delegation: every linear projection of a
//! forward pass is secret-shared among `n >= 2` helpers, computed by them on
//! the GGUF bytes, checked and reconstructed (`docs/PRIVATE.md`).
//!
//! [`PrivateProjector::project`] has the shape of an
//! [`engine::Projector`](crate::engine::Projector), so a whole private forward
//! pass is
//!
//! ```ignore
//! let mut pp = PrivateProjector::new(&engine, 2, rng)?;
//! engine.run_layers_with(0..n_layers, &mut hidden, &mut session, &mut |l, p, x, n| pp.project(l, p, x, n))?;
//! let logits = engine.head_with(&hidden, Logits::Last, &mut session, &mut |l, p, x, n| pp.project(l, p, x, n))?;
//! ```
//!
//! Per call the owner first replaces each token row by the values ggml's
//! quantized mat-vec would multiply for that matrix's format
//! ([`quantize_like_ggml`]: Q8_1 for
//! Q4_1 weights, Q8_0 for Q8_0/Q4_0, Q8_K for K-quants, fp16 for F16), so the
//! helpers' exact ring product is the dot of the same integers the local path
//! uses; it then encodes each row in the ring with its own private
//! [`FixedPoint`](super::ring::FixedPoint), splits the batch into `n` additive
//! shares (seeds for helpers `0..n-1`, a full vector for the last), and sends
//! helper `i` its share sealed in that helper's HPKE context. The helper opens
//! it, expands a seed if needed, computes `W·X_i` with [`Matrix::mul`] and seals
//! the reply; the owner opens every reply, sums them, runs the Freivalds and
//! range check ([`Checker`]) and only then decodes to `f32`. A failed check
//! names the layer, the projection and (by Freivalds on each share alone) the
//! helper that lied. With spares ([`PrivateProjector::with_spares`]) the liar
//! (or a helper that fails to answer) is dropped for the session with its
//! evidence and the step is redone with fresh shares and the next `attempt`
//! number on a spare; without one the failure is an error. No result is used
//! before it passed the check.
//!
//! Q, K and V of a layer (and gate and up) share their input, so by default
//! they travel as one request ([`OP_QKV`], [`OP_GATE_UP`]): four round trips
//! per layer, as `SMPC.md` counts them; see [`PrivateProjector::set_fuse`].
//!
//! The helpers are reached through a [`HelperLinks`] transport: in-process
//! objects with their own keys and contexts ([`PrivateProjector::with_spares`])
//! or nodes on the mesh ([`crate::delegate::link::NetworkLinks`], used by
//! `Node::generate` in private mode). The envelopes are exactly the bytes
//! a network carries either way, so [`PrivateStats`] measures the real
//! traffic. What travels in the clear next to each envelope is its
//! [`EnvelopeHeader`]'s per-request fields (authenticated as the AAD); their
//! bytes are not counted. All helpers of a step are asked at once.

mod checks;
mod round;

use self::checks::residuals;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{CryptoRng, RngCore};
use zeroize::{Zeroize, Zeroizing};

use super::activations::{f16_to_f32, q8_1_sums, quantize_like_ggml, ActivationFormat};
use super::kernels::Matrix;
use super::link::{HelperCall, HelperLinks, InProcessLinks};
use super::ring;
use super::seal::{Direction, EnvelopeHeader, OpenContext, SealContext, SecretKey};
use super::share::{share, Shares};
use super::verify::{CacheError, Checker, MatrixKey};
use crate::engine::{Engine, Projection};
use crate::gguf::GgmlType;
use crate::{Error, Result};

pub use super::helper::Cheat;
pub use super::protocol::{
    decode_reply, decode_request, op_code, op_group, KIND_FULL, KIND_RESULT, KIND_SEED, OP_GATE_UP,
    OP_QKV,
};

/// Fresh Freivalds vectors used to attribute a failed check to a helper.
const ATTRIBUTION_VECTORS: usize = 16;

/// Traffic and integrity counters of a [`PrivateProjector`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PrivateStats {
    /// Delegated matrix products (per projection, fused or not).
    pub projections: u64,
    /// Requests answered by all helpers (a fused Q/K/V or gate/up request is
    /// one round trip for two or three projections).
    pub round_trips: u64,
    /// Envelope bytes sent by the owner to all helpers.
    pub bytes_sent: u64,
    /// Envelope bytes received by the owner from all helpers.
    pub bytes_received: u64,
    /// Reconstructed results rejected by the Freivalds or range check.
    pub checks_failed: u64,
    /// Check vectors computed by streaming a matrix.
    pub checkers_computed: u64,
    /// Check vectors loaded from the cache directory.
    pub checkers_loaded: u64,
    /// Cache files rejected as invalid (then recomputed and rewritten) or
    /// that could not be written.
    pub checker_cache_errors: u64,
    /// Wall time the owner spent on its side of delegation, in nanoseconds:
    /// quantizing and encoding inputs, sharing, hashing and sealing requests,
    /// opening and parsing replies, reconstructing, checking and decoding.
    /// Excludes the helpers' work and the one-time set-up of a matrix (its
    /// column bounds and check vectors). This is the owner overhead of
    /// private mode, to compare with the local compute it replaces.
    pub owner_nanos: u64,
    /// Wall time spent inside the (in-process) helpers, in nanoseconds:
    /// opening, seed expansion, the integer kernels and sealing the replies.
    pub helper_nanos: u64,
    /// Part of `helper_nanos` the helpers say they spent computing (per
    /// round trip the slowest helper's time): the rest is transport.
    pub helper_compute_nanos: u64,
    /// Helpers dropped for the session after a wrong or missing result (see
    /// [`PrivateProjector::dropped_helpers`]).
    pub helpers_dropped: u64,
    /// Requests redone with fresh shares after a failed attempt.
    pub retries: u64,
}

/// Evidence kept when a helper is dropped for the session: what it was asked
/// and why its answer was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DroppedHelper {
    /// The helper's index in the projector's pool (`0..n + spares`).
    pub helper: usize,
    /// Its peer id as bound into the envelopes' AAD.
    pub peer: Vec<u8>,
    /// Layer of the request.
    pub layer: u32,
    /// Wire op code of the request ([`op_code`], [`OP_QKV`], [`OP_GATE_UP`]).
    pub op: u8,
    /// The projector's step counter of the request.
    pub step: u64,
    /// Which attempt of that step failed (0 = the first).
    pub attempt: u32,
    /// Why the answer was rejected.
    pub reason: String,
}

/// What the owner keeps per weight matrix: the column bounds for the
/// fixed-point encoding and the secret check vectors.
struct MatrixState {
    rows: usize,
    cols: usize,
    /// What ggml converts this matrix's input to before its mat-vec.
    format: ActivationFormat,
    /// Q4_1 / Q5_1 only: the blocks' mins `m` (`rows x cols/32`, row-major),
    /// for [`PrivateProjector::set_match_ggml_s`].
    mins: Option<Vec<f32>>,
    bounds: Vec<u64>,
    checker: Checker,
}

/// The owner's end of one helper's two HPKE contexts.
struct OwnerLink {
    to_helper: SealContext,
    from_helper: OpenContext,
}

/// What went wrong with the helpers of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HelperFailureKind {
    /// A helper's session could not be opened (unreachable, refused, bad key).
    NoSession,
    /// No usable answer: an error, a timeout, an envelope that does not
    /// open (corrupted, replayed, another step's), a reply of the wrong size.
    NoAnswer,
    /// The reconstructed result failed the integrity check.
    WrongResult,
}

/// A delegated step the helpers failed, with who, where and why (the
/// evidence a dropped helper also gets, see [`DroppedHelper`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HelperFailure {
    /// The helpers found responsible: pool index and peer id (as text);
    /// empty when a wrong result could not be attributed.
    pub helpers: Vec<(usize, String)>,
    /// Layer of the step.
    pub layer: u32,
    /// Projection code ([`op_code`], [`OP_QKV`], [`OP_GATE_UP`]).
    pub op: u8,
    /// Step number.
    pub step: u64,
    /// Attempt number within the step.
    pub attempt: u32,
    /// What kind of failure.
    pub kind: HelperFailureKind,
    /// The details, for people.
    pub message: String,
}

impl std::fmt::Display for HelperFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<HelperFailure> for Error {
    fn from(e: HelperFailure) -> Error {
        Error::Helper(Box::new(e))
    }
}

/// Why one attempt of a delegated step failed.
enum Failure {
    /// Not the helpers' doing (invalid input, a local error): not retried.
    Fatal(Box<Error>),
    /// The helpers at these share positions answered wrongly or not at all
    /// (empty: a wrong result nobody could be named for).
    Helpers {
        culprits: Vec<usize>,
        error: Box<HelperFailure>,
    },
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fatal(Box::new(e))
    }
}

/// The residuals of one input (token, column, value, see [`residuals`]):
/// plaintext activations, so their values are zeroed on drop.
struct Residuals(Vec<(usize, usize, f64)>);

impl Drop for Residuals {
    fn drop(&mut self) {
        self.0.iter_mut().for_each(|(_, _, v)| v.zeroize());
    }
}

/// The owner side of private delegation with `n >= 2` helpers (see the
/// [module docs](self)). One projector is one delegation session:
/// its session id, HPKE contexts and step counter live as long as it does.
pub struct PrivateProjector<'e, E: Engine, R: RngCore + CryptoRng> {
    engine: &'e E,
    rng: R,
    session_id: [u8; 16],
    model_hash: [u8; 32],
    step: u64,
    /// The owner's key for this session (helpers seal replies to it).
    owner_key: SecretKey,
    /// The owner's peer id bytes, as headers name it.
    owner_peer: Vec<u8>,
    /// The owner's ends of every pooled helper's contexts, by pool index,
    /// once that helper's session is open.
    links: Vec<Option<OwnerLink>>,
    /// The transport to every helper of the pool: the `n` active ones and the spares.
    transport: Box<dyn HelperLinks + 'e>,
    /// Pool indices of the helpers holding shares, in share order (the last
    /// one gets the full vector).
    active: Vec<usize>,
    /// Pool indices of helpers not used yet, taken in order when an active
    /// helper is dropped.
    spares: Vec<usize>,
    /// Evidence on every helper dropped so far.
    dropped: Vec<DroppedHelper>,
    matrices: HashMap<(usize, Projection), MatrixState>,
    stats: PrivateStats,
    fuse: bool,
    /// Add ggml's rounding of Q8_1's `s` to Q4_1/Q5_1 results.
    match_ggml_s: bool,
    /// Results of a fused request not yet asked for: layer, BLAKE3 of the
    /// input they were computed on, and the outputs by projection.
    pending: Option<Pending>,
    /// Where check vectors are cached, if anywhere.
    cache_dir: Option<PathBuf>,
    /// The last cache error, for diagnostics.
    last_cache_error: Option<CacheError>,
}

/// K and V (or up) computed along with Q (or gate), waiting for their call.
struct Pending {
    layer: usize,
    input: [u8; 32],
    outputs: Vec<(Projection, Vec<f32>)>,
}

/// BLAKE3 of an input batch, to match a later call to a fused request.
fn input_hash(x: &[f32], n: usize) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&(n as u64).to_le_bytes());
    for v in x {
        h.update(&v.to_le_bytes());
    }
    *h.finalize().as_bytes()
}

impl<'e, E: Engine, R: RngCore + CryptoRng> PrivateProjector<'e, E, R> {
    /// A session with `n_helpers >= 2` helpers over `engine`'s weights and no
    /// spares: a wrong result is an error. Every secret (session id, HPKE
    /// keys, share seeds, check vectors) comes from `rng`.
    pub fn new(engine: &'e E, n_helpers: usize, rng: R) -> Result<Self> {
        Self::with_spares(engine, n_helpers, 0, rng)
    }

    /// A session with `n_helpers >= 2` active helpers and `spares` more in
    /// reserve (`SMPC.md`, integrity): when a result fails the check, or a
    /// helper fails to answer (an error, an envelope that does not open, a
    /// reply of the wrong size), the helpers found responsible are dropped
    /// for the session with their evidence ([`Self::dropped_helpers`]),
    /// replaced by spares, and the request is redone with fresh shares and
    /// the next attempt number. A result is used only once it passed the
    /// check; when no spare is left the failure is an error. A failure that
    /// cannot be attributed (an error confined to the top bits of a share,
    /// probability about `2^-40`) is retried once with fresh shares on the
    /// same helpers.
    pub fn with_spares(engine: &'e E, n_helpers: usize, spares: usize, mut rng: R) -> Result<Self> {
        let pool = n_helpers.saturating_add(spares);
        if n_helpers < 2 || pool > usize::from(u16::MAX) {
            return Err(Error::InvalidArgument(format!(
                "private delegation with {n_helpers} helpers and {spares} spares: expected \
                 at least 2 helpers and at most 65535 in all"
            )));
        }
        let links = InProcessLinks::new(engine, pool, &mut rng);
        Self::with_links(engine, n_helpers, Box::new(links), rng)
    }

    /// A session over any transport: `links` reaches a pool of helpers, the
    /// first `n_helpers >= 2` active and the rest spares (see
    /// [`Self::with_spares`]). Each helper's session is opened on its first
    /// use; a helper that fails to open is dropped like one that fails to
    /// answer.
    pub fn with_links(
        engine: &'e E,
        n_helpers: usize,
        links: Box<dyn HelperLinks + 'e>,
        mut rng: R,
    ) -> Result<Self> {
        let pool = links.len();
        if n_helpers < 2 || pool < n_helpers || pool > usize::from(u16::MAX) {
            return Err(Error::InvalidArgument(format!(
                "private delegation with {n_helpers} helpers in a pool of {pool}: expected \
                 at least 2 helpers and at most 65535 in all"
            )));
        }
        let mut session_id = [0u8; 16];
        rng.fill_bytes(&mut session_id);
        let owner_key = SecretKey::generate(&mut rng);
        Ok(PrivateProjector {
            engine,
            rng,
            session_id,
            model_hash: engine.info().id.0,
            step: 0,
            owner_key,
            owner_peer: links.owner_peer(),
            links: (0..pool).map(|_| None).collect(),
            transport: links,
            active: (0..n_helpers).collect(),
            spares: (n_helpers..pool).collect(),
            dropped: Vec::new(),
            matrices: HashMap::new(),
            stats: PrivateStats::default(),
            fuse: true,
            match_ggml_s: false,
            pending: None,
            cache_dir: None,
            last_cache_error: None,
        })
    }

    /// Caches the check vectors under `dir`: on first use of a matrix, the
    /// projector loads `<dir>/<model-id-hex>/<layer>-<op>.fvc` ([`Checker::load`];
    /// `op` is [`op_code`]) if present and valid, and otherwise computes them
    /// and writes that file atomically (temporary file, then rename). An
    /// invalid file is counted in [`PrivateStats::checker_cache_errors`] and
    /// replaced, never fatal; so is a failed write.
    ///
    /// **Security:** the `r_t` in these files are the owner's secret — a
    /// helper that learns them can forge results that pass the Freivalds
    /// check. The cache is owner-local: directories are created 0700 and
    /// files 0600 (on Unix), and the directory must never be shared with or
    /// readable by helpers.
    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = Some(dir.into());
        self
    }

    /// The last error met reading or writing the check vector cache.
    pub fn last_cache_error(&self) -> Option<&CacheError> {
        self.last_cache_error.as_ref()
    }

    /// Number of helpers `n` holding shares.
    pub fn n_helpers(&self) -> usize {
        self.active.len()
    }

    /// Spares not used yet.
    pub fn spares_left(&self) -> usize {
        self.spares.len()
    }

    /// Pool indices of the helpers holding shares, in share order.
    pub fn active_helpers(&self) -> &[usize] {
        &self.active
    }

    /// Every helper dropped for this session, with the evidence.
    pub fn dropped_helpers(&self) -> &[DroppedHelper] {
        &self.dropped
    }

    /// Whether Q, K, V (and gate, up) of a layer travel as one request (the
    /// default): the input is shared once and the helpers return all products
    /// in one round trip. The engine asks for them one at a time with the same
    /// input; the later ones are served from the fused result when the input
    /// matches bit for bit, and delegated on their own otherwise.
    pub fn set_fuse(&mut self, fuse: bool) {
        self.fuse = fuse;
        self.pending = None;
    }

    /// Whether Q4_1 / Q5_1 results reproduce ggml's rounding of Q8_1's block
    /// sums (off by default). ggml's dot adds `m·s` per block with
    /// `s = fp16(d·Σq)` where the exact product of the quantized activations
    /// (what the helpers compute) has `m·fp16(d)·Σq`; on the default model that
    /// difference is ~4e-4 relative L2 per projection, against ~1e-7 for all
    /// of ggml's f32 rounding. With this on, the owner adds
    /// `Σ_b m_b·(s_b - fp16(d_b)·Σq_b)` itself (one multiply-add per row and
    /// block of 32, from the public mins, kept in memory as f32, 1/8 of a Q4_1
    /// model's size, and its own activations; nothing is sent), and private
    /// projections match ggml's to ~1e-7.
    ///
    /// It does not make greedy decoding match local decoding more often:
    /// each layer re-quantizes its input to 8 bits, so any difference, even
    /// one ulp on some outputs, flips a rounding somewhere and grows to the
    /// size of the quantization step within a forward pass (ggml's own path
    /// with 1-ulp noise on its outputs diverges on 9 of 10 prompts in 64
    /// tokens: `layered_path_with_ggml_projections_vs_local_graph` in
    /// `tests/private.rs`). Only a result bit-identical to ggml's per-lane
    /// f32 accumulation would avoid that, and that needs per-block partial
    /// sums, far more than one ring value per row.
    pub fn set_match_ggml_s(&mut self, on: bool) {
        self.match_ggml_s = on;
        self.pending = None;
    }

    /// Counters since creation or the last reset.
    pub fn stats(&self) -> PrivateStats {
        self.stats.clone()
    }

    /// Zeroes the counters (e.g. at the start of each token).
    pub fn reset_stats(&mut self) {
        self.stats = PrivateStats::default();
    }

    /// Returns the counters and zeroes them.
    pub fn take_stats(&mut self) -> PrivateStats {
        std::mem::take(&mut self.stats)
    }

    /// Fault injection for tests: make helper `i` (pool index, spares after
    /// the `n` first helpers) alter every answer it gives (`Some((i, cheat))`),
    /// or make every helper honest (`None`).
    pub fn set_cheat(&mut self, cheat: Option<(usize, Cheat)>) -> Result<()> {
        if let Some((i, _)) = cheat {
            if i >= self.transport.len() {
                return Err(Error::InvalidArgument(format!(
                    "cheating helper {i}: expected an index below {}",
                    self.transport.len()
                )));
            }
        }
        self.transport.set_cheat(cheat)
    }

    /// Opens pool helper `h`'s session if it is not open yet.
    fn ensure_link(&mut self, h: usize) -> Result<()> {
        if self.links[h].is_some() {
            return Ok(());
        }
        let key = self.transport.helper_key(h)?;
        let to_helper = SealContext::new(&mut self.rng, &key)?;
        let helper_enc = self.transport.open(
            h,
            self.session_id,
            crate::engine::ModelId(self.model_hash),
            &self.owner_key.public_key(),
            to_helper.enc(),
        )?;
        let from_helper = OpenContext::new(&self.owner_key, &helper_enc)?;
        self.links[h] = Some(OwnerLink {
            to_helper,
            from_helper,
        });
        Ok(())
    }

    /// `W·x` for `n` token rows of `x` (row-major, `cols` values each), where
    /// `W` is `projection` of `layer` (ignored for [`Projection::Output`]),
    /// computed by the helpers on secret shares and checked before it is
    /// decoded. Returns `n` rows of `rows` values. Fits
    /// [`engine::Projector`](crate::engine::Projector).
    pub fn project(
        &mut self,
        layer: usize,
        projection: Projection,
        x: &[f32],
        n: usize,
    ) -> Result<Vec<f32>> {
        let layer = if projection == Projection::Output {
            0
        } else {
            layer
        };
        if let Some(p) = self.pending.as_mut() {
            if let Some(at) = p.outputs.iter().position(|(q, _)| *q == projection) {
                if p.layer == layer && p.input == input_hash(x, n) {
                    let (_, out) = p.outputs.remove(at);
                    if p.outputs.is_empty() {
                        self.pending = None;
                    }
                    return Ok(out);
                }
            }
        }
        self.pending = None;
        let (op, group): (u8, &[Projection]) = match projection {
            Projection::Q if self.fuse => (OP_QKV, &[Projection::Q, Projection::K, Projection::V]),
            Projection::Gate if self.fuse => (OP_GATE_UP, &[Projection::Gate, Projection::Up]),
            p => (op_code(p), op_group(op_code(p)).unwrap_or_default()),
        };
        // A fused request shares one quantized input: only if ggml would
        // quantize it the same way for every matrix of the group.
        let (op, group) = if group.len() > 1 && !self.same_activation_format(layer, group)? {
            (
                op_code(projection),
                op_group(op_code(projection)).unwrap_or_default(),
            )
        } else {
            (op, group)
        };
        let mut outs = self.delegate(layer, op, group, x, n)?;
        let first = outs.remove(0);
        if !outs.is_empty() {
            self.pending = Some(Pending {
                layer,
                input: input_hash(x, n),
                outputs: group[1..].iter().copied().zip(outs).collect(),
            });
        }
        Ok(first)
    }
}
