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

/// Writes `checker` to `path` atomically: a new 0600 file next to it (name
/// suffixed with `tag`), synced, then renamed over `path`. Creates `dir`
/// (0700) if needed.
fn write_cache_file(
    dir: &Path,
    path: &Path,
    tag: &[u8; 8],
    key: &MatrixKey,
    checker: &Checker,
) -> Result<(), CacheError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension(format!("fvc.tmp-{tag}"));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut w = options.open(&tmp)?;
        checker.save(key, &mut w)?;
        w.flush()?;
        w.sync_all()?;
        drop(w);
        std::fs::rename(&tmp, path)?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
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

/// The part of each activation the fixed-point encoding rounded away:
/// `(token, column, x - decoded X)` for every nonzero difference (exact in
/// f64: the two are within a factor of two, or the encoding is zero).
fn residuals(
    xq: &[f64],
    xr: &[u64],
    params: &[ring::FixedPoint],
    cols: usize,
) -> Vec<(usize, usize, f64)> {
    let mut out = Vec::new();
    for (t, ((x, e), fp)) in xq
        .chunks_exact(cols)
        .zip(xr.chunks_exact(cols))
        .zip(params)
        .enumerate()
    {
        let k = 2f64.powi(fp.scale_log2() - fp.frac_bits());
        for (j, (xv, ev)) in x.iter().zip(e).enumerate() {
            let r = xv - ring::to_signed(*ev) as f64 * k;
            if r != 0.0 {
                out.push((t, j, r));
            }
        }
    }
    out
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

    /// Whether ggml converts the input of every matrix of `group` to the same format.
    fn same_activation_format(&mut self, layer: usize, group: &[Projection]) -> Result<bool> {
        let mut formats = Vec::with_capacity(group.len());
        for p in group {
            formats.push(self.matrix_state(layer, *p)?.format);
        }
        Ok(formats.windows(2).all(|w| w[0] == w[1]))
    }

    /// Loads the mins of a Q4_1 / Q5_1 matrix into its state (once), for
    /// [`Self::set_match_ggml_s`].
    fn ensure_mins(&mut self, layer: usize, projection: Projection) -> Result<()> {
        let view = self.engine.weight(layer, projection)?;
        let Some(st) = self.matrices.get_mut(&(layer, projection)) else {
            return Ok(());
        };
        if st.mins.is_none() && matches!(view.ggml_type, GgmlType::Q4_1 | GgmlType::Q5_1) {
            // Q4_1 and Q5_1 blocks start with fp16 d and m.
            st.mins = Some(
                view.bytes
                    .chunks_exact(view.ggml_type.type_size() as usize)
                    .map(|b| f16_to_f32(u16::from_le_bytes([b[2], b[3]])))
                    .collect(),
            );
        }
        Ok(())
    }

    /// The owner's state for one matrix, built on first use.
    fn matrix_state(&mut self, layer: usize, projection: Projection) -> Result<&MatrixState> {
        let key = (layer, projection);
        if !self.matrices.contains_key(&key) {
            let view = self.engine.weight(layer, projection)?;
            let m = Matrix::from_view(&view)?;
            let checker = self.checker(layer, projection, &m)?;
            let state = MatrixState {
                rows: m.rows(),
                cols: m.cols(),
                mins: None,
                format: ActivationFormat::for_weights(m.ggml_type())?,
                bounds: m.column_bounds()?,
                checker,
            };
            self.matrices.insert(key, state);
        }
        Ok(&self.matrices[&key])
    }

    /// The check vectors for `m`: from the cache if there is a valid file,
    /// else computed (and written to the cache if there is one).
    fn checker(&mut self, layer: usize, projection: Projection, m: &Matrix<'_>) -> Result<Checker> {
        let Some(dir) = self.cache_dir.clone() else {
            self.stats.checkers_computed += 1;
            return Checker::new(m, &mut self.rng);
        };
        let key = MatrixKey {
            model: self.model_hash,
            layer: u32::try_from(layer).map_err(|_| {
                Error::InvalidArgument(format!("layer {layer} does not fit the cache format"))
            })?,
            op: op_code(projection),
            rows: m.rows(),
            cols: m.cols(),
        };
        let hex: String = self.model_hash.iter().map(|b| format!("{b:02x}")).collect();
        let dir = dir.join(hex);
        let path = dir.join(format!("{layer}-{}.fvc", key.op));
        match std::fs::File::open(&path) {
            Ok(mut f) => match Checker::load(&mut f, &key) {
                Ok(c) => {
                    self.stats.checkers_loaded += 1;
                    return Ok(c);
                }
                Err(e) => {
                    self.stats.checker_cache_errors += 1;
                    self.last_cache_error = Some(e);
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                self.stats.checker_cache_errors += 1;
                self.last_cache_error = Some(CacheError::Io(e));
            }
        }
        let checker = Checker::new(m, &mut self.rng)?;
        self.stats.checkers_computed += 1;
        let mut tag = [0u8; 8];
        self.rng.fill_bytes(&mut tag);
        if let Err(e) = write_cache_file(&dir, &path, &tag, &key, &checker) {
            self.stats.checker_cache_errors += 1;
            self.last_cache_error = Some(e);
        }
        Ok(checker)
    }

    /// One request (wire code `op`) for the projections `group` of `layer`,
    /// which share their input: one sharing of `x`, one round trip to every
    /// helper, one checked and decoded output per projection. Accounts the
    /// owner's and the helpers' time in the stats.
    fn delegate(
        &mut self,
        layer: usize,
        op: u8,
        group: &[Projection],
        x: &[f32],
        n: usize,
    ) -> Result<Vec<Vec<f32>>> {
        // One-time set-up of the matrices is not per-token overhead.
        for p in group {
            self.matrix_state(layer, *p)?;
        }
        let start = Instant::now();
        let helpers_before = self.stats.helper_nanos;
        let result = self.delegate_timed(layer, op, group, x, n);
        let total = u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let in_helpers = self.stats.helper_nanos - helpers_before;
        self.stats.owner_nanos += total.saturating_sub(in_helpers);
        result
    }

    /// [`Self::delegate`] without the time accounting: one step, attempted
    /// again with fresh shares (on spares, once the culprits are dropped) as
    /// long as the helpers are at fault and someone can take their place.
    fn delegate_timed(
        &mut self,
        layer: usize,
        op: u8,
        group: &[Projection],
        x: &[f32],
        n: usize,
    ) -> Result<Vec<Vec<f32>>> {
        self.step += 1;
        let mut attempt = 0u32;
        let mut unattributed_retry = false;
        loop {
            let (culprits, error) = match self.attempt(layer, op, group, x, n, attempt) {
                Ok(outs) => return Ok(outs),
                Err(Failure::Fatal(e)) => return Err(*e),
                Err(Failure::Helpers { culprits, error }) => (culprits, *error),
            };
            if culprits.is_empty() {
                // Nobody named: fresh shares on the same helpers, once.
                if unattributed_retry {
                    return Err(error.into());
                }
                unattributed_retry = true;
            } else {
                if culprits.len() > self.spares.len() {
                    return Err(error.into());
                }
                for &position in &culprits {
                    let helper = self.active[position];
                    let spare = self.spares.remove(0);
                    tracing::warn!(
                        helper,
                        spare,
                        layer,
                        op,
                        step = self.step,
                        attempt,
                        "private delegation: dropping a helper: {error}"
                    );
                    self.dropped.push(DroppedHelper {
                        helper,
                        peer: self.transport.helper_peer(helper),
                        layer: layer as u32,
                        op,
                        step: self.step,
                        attempt,
                        reason: error.to_string(),
                    });
                    self.stats.helpers_dropped += 1;
                    self.active[position] = spare;
                }
            }
            self.stats.retries += 1;
            attempt = attempt.checked_add(1).ok_or_else(|| {
                Error::InvalidArgument("private delegation: too many attempts".into())
            })?;
        }
    }

    /// One attempt of a step: fresh shares of `x` to the active helpers,
    /// their replies checked and decoded.
    fn attempt(
        &mut self,
        layer: usize,
        op: u8,
        group: &[Projection],
        x: &[f32],
        n: usize,
        attempt: u32,
    ) -> std::result::Result<Vec<Vec<f32>>, Failure> {
        let name = format!("layer {layer} {:?}", group);
        let mut shapes = Vec::with_capacity(group.len());
        let mut format = None;
        // Elementwise max of the column bounds: a fixed point valid for every
        // matrix of the group.
        let mut bounds: Vec<u64> = Vec::new();
        for p in group {
            let st = self.matrix_state(layer, *p)?;
            if bounds.is_empty() {
                bounds = st.bounds.clone();
            } else if bounds.len() != st.cols {
                return Err(Error::InvalidArgument(format!(
                    "{name}: the fused matrices differ in width"
                ))
                .into());
            } else {
                bounds
                    .iter_mut()
                    .zip(&st.bounds)
                    .for_each(|(b, c)| *b = (*b).max(*c));
            }
            shapes.push(st.rows);
            if format.is_some_and(|f| f != st.format) {
                return Err(Error::InvalidArgument(format!(
                    "{name}: the fused matrices take differently quantized inputs"
                ))
                .into());
            }
            format = Some(st.format);
        }
        let format = format.unwrap_or(ActivationFormat::F32);
        let cols = bounds.len();
        let rows: usize = shapes.iter().sum();
        if n == 0 || Some(x.len()) != n.checked_mul(cols) {
            return Err(Error::InvalidArgument(format!(
                "{name} input: expected {n} tokens of {cols} values, found {} values",
                x.len()
            ))
            .into());
        }
        let (rows32, cols32, n32) =
            match (u32::try_from(rows), u32::try_from(cols), u32::try_from(n)) {
                (Ok(r), Ok(c), Ok(n)) => (r, c, n),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{name}: {n} tokens of a {rows}x{cols} matrix do not fit the wire format"
                    ))
                    .into())
                }
            };
        // The values ggml's quantized mat-vec would multiply (its integers
        // times the block scales, exact in f64): the ring then reproduces the
        // local path's integer dot products.
        // Every buffer that holds the input, its encoding, the helpers' partial
        // results or their sum is zeroed when dropped, on every return path.
        let xq = Zeroizing::new(quantize_like_ggml(format, x)?);
        let encoded = ring::encode_batch(&xq, &bounds);
        // Per token and block of 32: ggml's s minus the exact block sum.
        let s_delta = Zeroizing::new(if self.match_ggml_s && format == ActivationFormat::Q8_1 {
            for p in group {
                self.ensure_mins(layer, *p)?;
            }
            let s = q8_1_sums(x)?;
            s.iter()
                .zip(xq.chunks_exact(32))
                .map(|(s, b)| f64::from(*s) - b.iter().sum::<f64>())
                .collect()
        } else {
            Vec::new()
        });
        // What the fixed-point grid cannot hold exactly (activations far below
        // their token's maximum): the owner multiplies that part in itself.
        let residual = Residuals(match &encoded {
            Ok((xr, params)) => residuals(&xq, xr, params, cols),
            Err(_) => Vec::new(),
        });
        drop(xq);
        let (xr, params) = encoded?;
        let xr = Zeroizing::new(xr);
        let n_helpers = self.active.len();
        let shares = share(&xr, n_helpers, &mut self.rng)?;
        self.stats.round_trips += 1;
        if attempt == 0 {
            self.stats.projections += group.len() as u64;
        }
        let mut y = Zeroizing::new(vec![0u64; n * rows]);
        // Each helper's partial result, kept until the checks pass so a
        // failure can be attributed to a helper.
        let mut parts: Vec<Zeroizing<Vec<u64>>> = Vec::with_capacity(n_helpers);
        // A helper whose session cannot be opened has failed like one that
        // does not answer.
        let mut culprits = Vec::new();
        let mut first_error = None;
        for i in 0..n_helpers {
            if let Err(e) = self.ensure_link(self.active[i]) {
                culprits.push(i);
                first_error.get_or_insert(e);
            }
        }
        if let Some(e) = first_error {
            return Err(Failure::Helpers {
                error: Box::new(self.failure(
                    &culprits,
                    (layer, op, attempt),
                    HelperFailureKind::NoSession,
                    format!(
                        "delegated {name} (step {}, attempt {attempt}): helper{} {:?} could not \
                         open a session: {e}",
                        self.step,
                        if culprits.len() > 1 { "s" } else { "" },
                        culprits.iter().map(|&i| self.active[i]).collect::<Vec<_>>(),
                    ),
                )),
                culprits,
            });
        }
        // Seal every share, then send them all at once.
        let mut calls = Vec::with_capacity(n_helpers);
        for i in 0..n_helpers {
            // Share position `i` goes to pool helper `h`.
            let h = self.active[i];
            let (kind, mut payload) = {
                let mut p =
                    Vec::with_capacity(4 + if i + 1 < n_helpers { 32 } else { xr.len() * 8 });
                p.extend_from_slice(&n32.to_le_bytes());
                if i + 1 < n_helpers {
                    p.extend_from_slice(shares.seeds()[i].as_bytes());
                    (KIND_SEED, p)
                } else {
                    for v in shares.last() {
                        p.extend_from_slice(&v.to_le_bytes());
                    }
                    (KIND_FULL, p)
                }
            };
            let header = EnvelopeHeader {
                direction: Direction::OwnerToHelper,
                kind,
                n: n_helpers as u16,
                helper_index: i as u16,
                op,
                layer: layer as u32,
                session_id: self.session_id,
                owner_peer: self.owner_peer.clone(),
                helper_peer: self.transport.helper_peer(h),
                model_hash: self.model_hash,
                step: self.step,
                rows: rows32,
                cols: cols32,
                attempt,
                request_hash: *blake3::hash(&payload).as_bytes(),
            };
            let link = self.links[h].as_mut().expect("opened above");
            let sealed = link.to_helper.seal(&header, &payload);
            payload.zeroize();
            match sealed {
                Ok(envelope) => {
                    self.stats.bytes_sent += envelope.len() as u64;
                    calls.push(HelperCall {
                        helper: h,
                        header,
                        envelope,
                    });
                }
                Err(e) => return Err(e.into()),
            }
        }
        let headers: Vec<EnvelopeHeader> = calls.iter().map(|c| c.header.clone()).collect();
        // The transport: the header's fields travel in the clear next to the envelope.
        let in_helpers = Instant::now();
        let answers = self.transport.exchange(calls);
        self.stats.helper_nanos +=
            u64::try_from(in_helpers.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.helper_compute_nanos += answers
            .iter()
            .filter_map(|a| a.as_ref().ok().map(|a| a.compute_nanos))
            .max()
            .unwrap_or(0);
        let mut errors = Vec::new();
        for (i, (answer, header)) in answers.into_iter().zip(headers).enumerate() {
            let h = self.active[i];
            let expected = EnvelopeHeader {
                direction: Direction::HelperToOwner,
                kind: KIND_RESULT,
                ..header
            };
            // No answer, an envelope that does not open, a reply of the wrong
            // size: this helper's fault.
            let part = answer.and_then(|reply| {
                self.stats.bytes_received += reply.envelope.len() as u64;
                let link = self.links[h].as_mut().expect("opened above");
                let mut opened = link.from_helper.open(&expected, &reply.envelope)?;
                let part = decode_reply(&opened.payload, y.len());
                opened.payload.zeroize();
                part
            });
            match part {
                Ok(part) => parts.push(Zeroizing::new(part)),
                Err(e) => {
                    culprits.push(i);
                    errors.push(format!("helper {h} gave no usable answer: {e}"));
                }
            }
        }
        if !culprits.is_empty() {
            return Err(Failure::Helpers {
                error: Box::new(self.failure(
                    &culprits,
                    (layer, op, attempt),
                    HelperFailureKind::NoAnswer,
                    format!(
                        "delegated {name} (step {}, attempt {attempt}): {}",
                        self.step,
                        errors.join("; ")
                    ),
                )),
                culprits,
            });
        }
        for part in &parts {
            ring::add_assign(&mut y, part);
        }
        // Check every product before decoding any of them.
        let mut failed = None;
        let mut offset = 0;
        for (p, r) in group.iter().zip(&shapes) {
            let span = offset..offset + n * r;
            let st = &self.matrices[&(layer, *p)];
            if let Err(failure) = st.checker.check(&xr, &y[span.clone()]) {
                failed = Some((*p, span, failure));
                break;
            }
            offset += n * r;
        }
        drop(xr);
        if let Some((p, span, failure)) = failed {
            self.stats.checks_failed += 1;
            let slices: Vec<&[u64]> = parts.iter().map(|v| &v[span.clone()]).collect();
            let culprits = self.attribute(layer, p, &shares, &slices);
            drop(parts);
            let culprits = culprits.unwrap_or_default();
            let who = if culprits.is_empty() {
                format!("one of helpers {:?} (not attributable)", self.active)
            } else {
                format!(
                    "helper{} {}",
                    if culprits.len() > 1 { "s" } else { "" },
                    culprits
                        .iter()
                        .map(|&i| self.active[i].to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(Failure::Helpers {
                error: Box::new(self.failure(
                    &culprits,
                    (layer, op, attempt),
                    HelperFailureKind::WrongResult,
                    format!(
                        "delegated layer {layer} {p:?} (step {}, attempt {attempt}): {who} \
                         returned a wrong result; the reconstruction failed the integrity check \
                         ({failure})",
                        self.step
                    ),
                )),
                culprits,
            });
        }
        drop(parts);
        drop(shares);
        let mut outs = Vec::with_capacity(group.len());
        let mut offset = 0;
        for (p, r) in group.iter().zip(&shapes) {
            let mut out =
                Zeroizing::new(ring::decode_batch(&y[offset..offset + n * r], *r, &params)?);
            if let (Some(mins), false) = (&self.matrices[&(layer, *p)].mins, s_delta.is_empty()) {
                let nb = cols / 32;
                for (yt, dt) in out.chunks_exact_mut(*r).zip(s_delta.chunks_exact(nb)) {
                    for (yv, mr) in yt.iter_mut().zip(mins.chunks_exact(nb)) {
                        *yv += mr
                            .iter()
                            .zip(dt)
                            .map(|(m, d)| f64::from(*m) * d)
                            .sum::<f64>();
                    }
                }
            }
            if !residual.0.is_empty() {
                self.add_residual_product(layer, *p, *r, &residual.0, &mut out)?;
            }
            outs.push(out.iter().map(|v| *v as f32).collect());
            offset += n * r;
        }
        Ok(outs)
    }

    /// Adds `W·r` to `out` (`n` tokens of `rows` values) for the sparse
    /// residual `r` of [`residuals`] (token, column, value): one block column
    /// of `projection`'s matrix per block that holds a residual.
    fn add_residual_product(
        &mut self,
        layer: usize,
        projection: Projection,
        rows: usize,
        residual: &[(usize, usize, f64)],
        out: &mut [f64],
    ) -> Result<()> {
        let m = Matrix::from_view(&self.engine.weight(layer, projection)?)?;
        let bs = m.ggml_type().block_size() as usize;
        let mut blocks: Vec<usize> = residual.iter().map(|(_, j, _)| j / bs).collect();
        blocks.sort_unstable();
        blocks.dedup();
        let mut w = vec![0i64; rows * bs];
        let unit = 2f64.powi(-(ring::WEIGHT_FRAC_BITS as i32));
        for b in blocks {
            m.block_column_weights(b, &mut w)?;
            for &(t, j, v) in residual.iter().filter(|(_, j, _)| j / bs == b) {
                let yt = &mut out[t * rows..(t + 1) * rows];
                for (y, wr) in yt.iter_mut().zip(w.chunks_exact(bs)) {
                    *y += wr[j - b * bs] as f64 * unit * v;
                }
            }
        }
        Ok(())
    }

    /// The typed failure of a step naming the helpers at share positions `culprits`.
    fn failure(
        &self,
        culprits: &[usize],
        (layer, op, attempt): (usize, u8, u32),
        kind: HelperFailureKind,
        message: String,
    ) -> HelperFailure {
        let peer = |h: usize| {
            let bytes = self.transport.helper_peer(h);
            crate::network::PeerId::from_bytes(&bytes)
                .map(|p| p.to_string())
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned())
        };
        HelperFailure {
            helpers: culprits
                .iter()
                .map(|&i| (self.active[i], peer(self.active[i])))
                .collect(),
            layer: layer as u32,
            op,
            step: self.step,
            attempt,
            kind,
            message,
        }
    }

    /// After a failed check: which helpers' partial results are not `W·X_i`.
    /// Freivalds is linear, so it applies to each share on its own (the range
    /// check does not: shares are uniform). Uses fresh check vectors and one
    /// pass over the matrix; an error confined to the top bits of a share can
    /// escape it (probability `2^-ATTRIBUTION_VECTORS` at worst), in which
    /// case nobody is named.
    fn attribute(
        &mut self,
        layer: usize,
        projection: Projection,
        shares: &Shares,
        parts: &[&[u64]],
    ) -> Result<Vec<usize>> {
        let m = Matrix::from_view(&self.engine.weight(layer, projection)?)?;
        let (rows, cols) = (m.rows(), m.cols());
        let k = ATTRIBUTION_VECTORS;
        let r: Vec<u64> = (0..k * rows).map(|_| self.rng.next_u64()).collect();
        let mut v = vec![0u64; k * cols];
        let mut w = vec![0i64; cols];
        for row in 0..rows {
            m.row_weights(row, &mut w)?;
            for t in 0..k {
                let rt = r[t * rows + row];
                for (acc, wj) in v[t * cols..(t + 1) * cols].iter_mut().zip(&w) {
                    *acc = acc.wrapping_add(rt.wrapping_mul(ring::from_signed(*wj)));
                }
            }
        }
        let mut culprits = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let xi = Zeroizing::new(shares.expand(i)?);
            let wrong = part.len() % rows != 0
                || part.len() / rows != xi.len() / cols
                || xi
                    .chunks_exact(cols)
                    .zip(part.chunks_exact(rows))
                    .any(|(xt, yt)| {
                        (0..k).any(|t| {
                            ring::dot(&r[t * rows..(t + 1) * rows], yt)
                                != ring::dot(&v[t * cols..(t + 1) * cols], xt)
                        })
                    });
            drop(xi);
            if wrong {
                culprits.push(i);
            }
        }
        Ok(culprits)
    }
}
