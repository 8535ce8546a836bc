//! The helper side of private delegation: a [`HelperSession`] opens one
//! owner's sealed share, multiplies it by the public weights and seals the
//! partial result; a [`HelperServer`] answers [`HELPER_METHOD`](super::protocol::HELPER_METHOD) requests from
//! owners on other nodes with one session per (owner peer, session id).
//!
//! A helper never sees anything but its own share: a seed or a vector of
//! uniformly random ring elements. Its HPKE key lives as long as the server;
//! owners seal to it only after checking its signature by the node identity
//! ([`HelperKey`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use rand::rngs::OsRng;
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use super::kernels::Matrix;
use super::protocol::{
    decode_helper_request, decode_request, op_group, words_to_bytes, HelperCallMsg,
    HelperErrorCode, HelperReply, HELPER_VERSION, KIND_RESULT,
};
use super::seal::{
    Direction, EnvelopeHeader, HelperKey, OpenContext, PublicKey, SealContext, SecretKey,
};
use crate::engine::{Engine, GgmlEngine, ModelId};
use crate::network::{InboundRequest, PeerId, Response};
use crate::{compute, Error, Result};

/// Fault injection: how a dishonest or broken helper answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cheat {
    /// Flip one bit (bit 17 of the first value) of the partial result.
    FlipBit,
    /// Add one to the first value of the partial result.
    AddOne,
    /// Answer with an error instead of a result (a crash or a refusal).
    Fail,
    /// Flip a byte of the sealed reply (the envelope fails to open).
    CorruptEnvelope,
    /// Answer with the envelope sealed for its previous request (a replayed,
    /// validly sealed reply that belongs to another step).
    StaleEnvelope,
    /// Never answer (over a network: the owner's deadline passes; in
    /// process: an error saying so).
    Stall,
}

impl std::str::FromStr for Cheat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Cheat> {
        Ok(match s {
            "flip-bit" => Cheat::FlipBit,
            "add-one" => Cheat::AddOne,
            "fail" => Cheat::Fail,
            "corrupt-envelope" => Cheat::CorruptEnvelope,
            "stale-envelope" => Cheat::StaleEnvelope,
            "stall" => Cheat::Stall,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "fault {other:?}: expected flip-bit, add-one, fail, corrupt-envelope, \
                     stale-envelope or stall"
                )))
            }
        })
    }
}

/// One owner's session on a helper: the helper's ends of the two HPKE
/// contexts (and the replay window inside them).
pub struct HelperSession {
    peer: Vec<u8>,
    from_owner: OpenContext,
    to_owner: SealContext,
    cheat: Option<Cheat>,
    last_reply: Option<Vec<u8>>,
}

impl HelperSession {
    /// A session of the helper `peer` (its id bytes, as headers name it) whose
    /// owner encapsulated `enc` to `key` and receives replies under `owner`.
    pub fn open(
        peer: Vec<u8>,
        key: &SecretKey,
        enc: &[u8; 32],
        owner: &PublicKey,
    ) -> Result<HelperSession> {
        Ok(HelperSession {
            peer,
            from_owner: OpenContext::new(key, enc)?,
            to_owner: SealContext::new(&mut OsRng, owner)?,
            cheat: None,
            last_reply: None,
        })
    }

    /// The helper's encapsulated key to the owner (the owner opens replies with it).
    pub fn enc(&self) -> [u8; 32] {
        self.to_owner.enc()
    }

    /// Makes this session misbehave (tests and demonstrations).
    pub fn set_cheat(&mut self, cheat: Option<Cheat>) {
        self.cheat = cheat;
    }

    /// The fault this session injects, if any.
    pub fn cheat(&self) -> Option<Cheat> {
        self.cheat
    }

    /// Handles one sealed request whose cleartext header is `header`: opens
    /// it, checks it against what this helper knows, computes its partial
    /// product and returns the sealed reply.
    pub fn handle<E: Engine>(
        &mut self,
        engine: &E,
        header: &EnvelopeHeader,
        envelope: &[u8],
    ) -> Result<Vec<u8>> {
        match self.cheat {
            Some(Cheat::Fail) => {
                return Err(Error::InvalidArgument("helper: out of service".into()))
            }
            Some(Cheat::Stall) => {
                return Err(Error::InvalidArgument("helper: stalled (no answer)".into()))
            }
            _ => {}
        }
        let refuse = |why: String| {
            Err(Error::InvalidArgument(format!(
                "helper: request refused: {why}"
            )))
        };
        if header.direction != Direction::OwnerToHelper
            || header.helper_index >= header.n
            || header.helper_peer != self.peer
            || header.model_hash != engine.info().id.0
        {
            return refuse("header is not addressed to this helper and model".into());
        }
        let Some(group) = op_group(header.op) else {
            return refuse(format!("unknown op {}", header.op));
        };
        if header.layer as usize >= engine.info().n_layers.max(1) {
            return refuse(format!("layer {} is not in the model", header.layer));
        }
        let mut ms = Vec::with_capacity(group.len());
        for p in group {
            ms.push(Matrix::from_view(
                &engine.weight(header.layer as usize, *p)?,
            )?);
        }
        let rows: usize = ms.iter().map(|m| m.rows()).sum();
        if ms.iter().any(|m| m.cols() != header.cols as usize) || rows != header.rows as usize {
            return refuse(format!(
                "header says {}x{}, the weights are {:?}",
                header.rows, header.cols, ms
            ));
        }
        // The share, its decoding, the products and the reply's plaintext are
        // zeroed when dropped, on every return path.
        let request = Zeroizing::new(self.from_owner.open(header, envelope)?.payload);
        if *blake3::hash(&request).as_bytes() != header.request_hash {
            return refuse("payload does not match the request hash".into());
        }
        let x = Zeroizing::new(decode_request(header.kind, &request, header.cols as usize)?);
        drop(request);
        // Reply: each matrix's `n·rows_m` values in turn.
        // Sized up front: a growing Vec would leave copies in freed memory.
        let tokens = x.len().checked_div(header.cols as usize).unwrap_or(0);
        let mut y = Zeroizing::new(Vec::with_capacity(tokens.saturating_mul(rows)));
        for m in &ms {
            y.extend_from_slice(&Zeroizing::new(
                m.mul_threads(&x, engine.compute_threads())?,
            ));
        }
        drop(x);
        match self.cheat {
            Some(Cheat::FlipBit) => y[0] ^= 1 << 17,
            Some(Cheat::AddOne) => y[0] = y[0].wrapping_add(1),
            _ => {}
        }
        let payload = Zeroizing::new(words_to_bytes(&y));
        drop(y);
        let reply = EnvelopeHeader {
            direction: Direction::HelperToOwner,
            kind: KIND_RESULT,
            ..header.clone()
        };
        let sealed = self.to_owner.seal(&reply, &payload);
        drop(payload);
        let mut sealed = sealed?;
        match self.cheat {
            Some(Cheat::CorruptEnvelope) => {
                let last = sealed.len() - 1;
                sealed[last] ^= 0x40;
            }
            Some(Cheat::StaleEnvelope) => {
                if let Some(old) = self.last_reply.replace(sealed.clone()) {
                    return Ok(old);
                }
            }
            _ => {}
        }
        Ok(sealed)
    }
}

/// Limits of a [`HelperServer`].
#[derive(Clone, Debug, PartialEq)]
pub struct HelperConfig {
    /// Sessions open at once (over all owners); more are refused as busy.
    pub max_sessions: usize,
    /// A session not used for this long is closed.
    pub idle_ttl: Duration,
    /// Fault injection for tests and demonstrations: every session of this
    /// server misbehaves this way.
    pub fault: Option<Cheat>,
}

impl Default for HelperConfig {
    fn default() -> Self {
        HelperConfig {
            max_sessions: 64,
            idle_ttl: Duration::from_secs(300),
            fault: None,
        }
    }
}

struct ServerSession {
    model: ModelId,
    owner: PeerId,
    last_used: Instant,
    inner: Arc<Mutex<HelperSession>>,
}

/// Answers [`HELPER_METHOD`](super::protocol::HELPER_METHOD) requests for the models added to it (see the
/// module docs).
pub struct HelperServer {
    peer: PeerId,
    key: SecretKey,
    signed: HelperKey,
    config: HelperConfig,
    models: Mutex<HashMap<ModelId, Arc<GgmlEngine>>>,
    sessions: Mutex<HashMap<(PeerId, [u8; 16]), ServerSession>>,
}

impl std::fmt::Debug for HelperServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelperServer")
            .field("peer", &self.peer)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl HelperServer {
    /// A server for the node with identity `signing` (its libp2p Ed25519
    /// key, whose peer id is `peer`): a fresh HPKE key signed by it.
    pub fn new(
        peer: PeerId,
        signing: &ed25519_dalek::SigningKey,
        config: HelperConfig,
    ) -> HelperServer {
        let key = SecretKey::generate(&mut OsRng);
        let signed = HelperKey::sign(signing, &key.public_key());
        HelperServer {
            peer,
            key,
            signed,
            config,
            models: Mutex::new(HashMap::new()),
            sessions: Mutex::new(HashMap::new()),
        }
    }

    /// Helps with `engine`'s model from now on.
    pub fn add_model(&self, engine: Arc<GgmlEngine>) {
        let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models.insert(engine.info().id, engine);
    }

    /// The signed key owners seal to.
    pub fn key(&self) -> HelperKey {
        self.signed
    }

    /// Sessions open now.
    pub fn sessions(&self) -> usize {
        self.lock_sessions().len()
    }

    fn lock_sessions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<(PeerId, [u8; 16]), ServerSession>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn engine(&self, model: &ModelId) -> Option<Arc<GgmlEngine>> {
        let models = self.models.lock().unwrap_or_else(|p| p.into_inner());
        models.get(model).cloned()
    }

    /// Answers requests from `requests` until it closes. Calls compute on
    /// the process-wide [`compute`] pool, one task per request.
    pub async fn serve_queue(self: &Arc<Self>, requests: &mut mpsc::Receiver<InboundRequest>) {
        while let Some(request) = requests.recv().await {
            let server = self.clone();
            tokio::spawn(async move { server.answer(request).await });
        }
    }

    async fn answer(self: Arc<Self>, request: InboundRequest) {
        let peer = request.peer;
        let call = match decode_helper_request(&request.request.meta) {
            Ok(c) => c,
            Err(r) => return respond(request, HelperReply::failure(r.code, r.message), None),
        };
        let ok = HelperReply {
            version: HELPER_VERSION,
            ..HelperReply::default()
        };
        match call {
            HelperCallMsg::Hello { model } => {
                if self.engine(&model).is_none() {
                    return respond(request, wrong_model(&model), None);
                }
                let reply = HelperReply {
                    hpke_public: self.signed.hpke_public.to_vec(),
                    signature: self.signed.signature.to_vec(),
                    ..ok
                };
                respond(request, reply, None)
            }
            HelperCallMsg::Open {
                session_id,
                model,
                owner_public,
                enc,
            } => {
                if self.engine(&model).is_none() {
                    return respond(request, wrong_model(&model), None);
                }
                self.expire();
                let mut sessions = self.lock_sessions();
                if sessions.len() >= self.config.max_sessions
                    && !sessions.contains_key(&(peer, session_id))
                {
                    drop(sessions);
                    return respond(
                        request,
                        HelperReply::failure(
                            HelperErrorCode::Busy,
                            format!("{} sessions open", self.config.max_sessions),
                        ),
                        None,
                    );
                }
                let session = match HelperSession::open(
                    self.peer.to_bytes(),
                    &self.key,
                    &enc,
                    &PublicKey::from_bytes(owner_public),
                ) {
                    Ok(mut s) => {
                        s.set_cheat(self.config.fault);
                        s
                    }
                    Err(e) => {
                        drop(sessions);
                        return respond(
                            request,
                            HelperReply::failure(HelperErrorCode::BadRequest, e.to_string()),
                            None,
                        );
                    }
                };
                let enc = session.enc();
                sessions.insert(
                    (peer, session_id),
                    ServerSession {
                        model,
                        owner: peer,
                        last_used: Instant::now(),
                        inner: Arc::new(Mutex::new(session)),
                    },
                );
                drop(sessions);
                tracing::debug!(%peer, "helper session opened");
                respond(
                    request,
                    HelperReply {
                        enc: enc.to_vec(),
                        ..ok
                    },
                    None,
                )
            }
            HelperCallMsg::Close { session_id } => {
                self.lock_sessions().remove(&(peer, session_id));
                respond(request, ok, None)
            }
            HelperCallMsg::Call { session_id, fields } => {
                let found = {
                    let mut sessions = self.lock_sessions();
                    let ttl = self.config.idle_ttl;
                    match sessions.get_mut(&(peer, session_id)) {
                        Some(s) if s.last_used.elapsed() <= ttl => {
                            s.last_used = Instant::now();
                            Some((s.model, s.owner, s.inner.clone()))
                        }
                        Some(_) => {
                            sessions.remove(&(peer, session_id));
                            None
                        }
                        None => None,
                    }
                };
                let Some((model, owner, session)) = found else {
                    return respond(
                        request,
                        HelperReply::failure(
                            HelperErrorCode::UnknownSession,
                            "no such session for this peer (never opened, closed or expired)",
                        ),
                        None,
                    );
                };
                let Some(engine) = self.engine(&model) else {
                    return respond(request, wrong_model(&model), None);
                };
                if session.lock().map(|s| s.cheat()).ok().flatten() == Some(Cheat::Stall) {
                    // Hold the request until the owner gives up on it.
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                let header =
                    fields.header(session_id, owner.to_bytes(), self.peer.to_bytes(), model.0);
                let envelope = request.request.tensor.clone();
                // Computed and answered on a blocking thread: no hand-off
                // back to an async task before the reply goes out.
                tokio::task::spawn_blocking(move || {
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        compute::pool().run(|| {
                            let start = Instant::now();
                            let mut s = session.lock().unwrap_or_else(|p| p.into_inner());
                            let sealed = s.handle(&*engine, &header, &envelope);
                            (sealed, start.elapsed())
                        })
                    }));
                    match result {
                        Ok((Ok(sealed), took)) => respond(
                            request,
                            HelperReply {
                                compute_nanos: u64::try_from(took.as_nanos()).unwrap_or(u64::MAX),
                                ..ok
                            },
                            Some(Bytes::from(sealed)),
                        ),
                        Ok((Err(e), _)) => respond(
                            request,
                            HelperReply::failure(HelperErrorCode::BadRequest, e.to_string()),
                            None,
                        ),
                        Err(_) => respond(
                            request,
                            HelperReply::failure(
                                HelperErrorCode::Internal,
                                "the helper's computation panicked",
                            ),
                            None,
                        ),
                    }
                });
            }
        }
    }

    /// Closes sessions idle past the TTL.
    fn expire(&self) {
        let ttl = self.config.idle_ttl;
        self.lock_sessions()
            .retain(|_, s| s.last_used.elapsed() <= ttl);
    }
}

fn wrong_model(model: &ModelId) -> HelperReply {
    HelperReply::failure(
        HelperErrorCode::WrongModel,
        format!("this node does not help with model {}", model.to_hex()),
    )
}

fn respond(request: InboundRequest, reply: HelperReply, tensor: Option<Bytes>) {
    request.respond(Response {
        meta: Bytes::from(reply.encode_to_vec()),
        tensor: tensor.unwrap_or_default(),
    });
}
