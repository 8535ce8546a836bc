//! How an owner reaches its helpers: the [`HelperLinks`] trait, with helpers
//! in this process ([`InProcessLinks`]) or on other nodes ([`NetworkLinks`],
//! over [`HELPER_METHOD`]).
//!
//! A link only moves bytes: the owner seals every request and opens every
//! reply itself (`PrivateProjector`), so both implementations carry exactly
//! the same envelopes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{CryptoRng, RngCore};
use tokio::runtime::Handle;

use super::helper::{Cheat, HelperSession};
use super::protocol::{
    decode_helper_reply, encode_request, CallFields, HelperCallMsg, HELPER_METHOD,
};
use super::seal::{EnvelopeHeader, HelperKey, PublicKey, SecretKey};
use crate::engine::{Engine, ModelId};
use crate::network::{Network, PeerId, Request};
use crate::{Error, Result};

/// One sealed request of a step, for pool helper `helper`.
#[derive(Clone, Debug)]
pub struct HelperCall {
    /// Pool index of the helper.
    pub helper: usize,
    /// The header the envelope is sealed to (its per-request fields travel in the clear).
    pub header: EnvelopeHeader,
    /// The sealed request.
    pub envelope: Vec<u8>,
}

/// A helper's answer to a [`HelperCall`].
#[derive(Clone, Debug)]
pub struct HelperAnswer {
    /// The sealed reply (untrusted until it opens).
    pub envelope: Vec<u8>,
    /// Time the helper says it spent (opening, computing, sealing).
    pub compute_nanos: u64,
}

/// The transport between an owner and its pool of helpers (active ones and
/// spares), by pool index.
pub trait HelperLinks {
    /// Helpers in the pool.
    fn len(&self) -> usize;
    /// Whether the pool is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The owner's peer id bytes, as every header names it.
    fn owner_peer(&self) -> Vec<u8>;
    /// Helper `h`'s peer id bytes, as headers name it.
    fn helper_peer(&self, h: usize) -> Vec<u8>;
    /// Helper `h`'s HPKE public key (checked against its identity where it has one).
    fn helper_key(&mut self, h: usize) -> Result<PublicKey>;
    /// Opens delegation session `session_id` for `model` on helper `h`: `enc`
    /// is the owner's encapsulation to the helper's key, `owner` the key
    /// replies are sealed to. Returns the helper's encapsulation to `owner`.
    fn open(
        &mut self,
        h: usize,
        session_id: [u8; 16],
        model: ModelId,
        owner: &PublicKey,
        enc: [u8; 32],
    ) -> Result<[u8; 32]>;
    /// Sends every call (to distinct helpers) at once; answers in call order.
    fn exchange(&mut self, calls: Vec<HelperCall>) -> Vec<Result<HelperAnswer>>;
    /// Fault injection (in-process helpers only): make pool helper `i` misbehave.
    fn set_cheat(&mut self, cheat: Option<(usize, Cheat)>) -> Result<()> {
        let _ = cheat;
        Err(Error::Unsupported(
            "fault injection works on in-process helpers; start a helper node with a fault instead"
                .into(),
        ))
    }
}

/// Peer id the in-process owner puts in every header.
const OWNER_PEER: &[u8] = b"in-process owner";

/// Helpers in this process, each with its own key and contexts: the
/// envelopes are exactly those a network would carry.
pub struct InProcessLinks<'e, E: Engine> {
    engine: &'e E,
    keys: Vec<SecretKey>,
    sessions: Vec<Option<HelperSession>>,
    cheats: Vec<Option<Cheat>>,
}

impl<'e, E: Engine> InProcessLinks<'e, E> {
    /// `pool` helpers over `engine`'s weights, keys from `rng`.
    pub fn new<R: RngCore + CryptoRng>(engine: &'e E, pool: usize, rng: &mut R) -> Self {
        InProcessLinks {
            engine,
            keys: (0..pool).map(|_| SecretKey::generate(rng)).collect(),
            sessions: (0..pool).map(|_| None).collect(),
            cheats: vec![None; pool],
        }
    }
}

impl<E: Engine> HelperLinks for InProcessLinks<'_, E> {
    fn len(&self) -> usize {
        self.keys.len()
    }

    fn owner_peer(&self) -> Vec<u8> {
        OWNER_PEER.to_vec()
    }

    fn helper_peer(&self, h: usize) -> Vec<u8> {
        format!("in-process helper {h}").into_bytes()
    }

    fn helper_key(&mut self, h: usize) -> Result<PublicKey> {
        Ok(self.keys[h].public_key())
    }

    fn open(
        &mut self,
        h: usize,
        _session_id: [u8; 16],
        _model: ModelId,
        owner: &PublicKey,
        enc: [u8; 32],
    ) -> Result<[u8; 32]> {
        let mut s = HelperSession::open(self.helper_peer(h), &self.keys[h], &enc, owner)?;
        s.set_cheat(self.cheats[h]);
        let enc = s.enc();
        self.sessions[h] = Some(s);
        Ok(enc)
    }

    fn exchange(&mut self, calls: Vec<HelperCall>) -> Vec<Result<HelperAnswer>> {
        calls
            .into_iter()
            .map(|c| {
                let start = Instant::now();
                let Some(s) = self.sessions.get_mut(c.helper).and_then(Option::as_mut) else {
                    return Err(Error::InvalidArgument(format!(
                        "helper {}: no open session",
                        c.helper
                    )));
                };
                let envelope = s.handle(self.engine, &c.header, &c.envelope)?;
                Ok(HelperAnswer {
                    envelope,
                    compute_nanos: u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX),
                })
            })
            .collect()
    }

    fn set_cheat(&mut self, cheat: Option<(usize, Cheat)>) -> Result<()> {
        for (j, c) in self.cheats.iter_mut().enumerate() {
            *c = cheat.and_then(|(i, k)| (i == j).then_some(k));
        }
        for (s, c) in self.sessions.iter_mut().zip(&self.cheats) {
            if let Some(s) = s {
                s.set_cheat(*c);
            }
        }
        Ok(())
    }
}

/// A helper found on the mesh: its peer id and its key, signature checked.
#[derive(Clone, Debug, PartialEq)]
pub struct RemoteHelper {
    /// The helper node.
    pub peer: PeerId,
    /// Its HPKE public key (verified against `peer`).
    pub key: PublicKey,
}

/// Asks `peer` for its signed helper key for `model` and checks the signature
/// against the Ed25519 key inside the peer id.
pub async fn hello(
    net: &dyn Network,
    peer: PeerId,
    model: ModelId,
    timeout: Duration,
) -> Result<RemoteHelper> {
    let name = peer.to_string();
    let response = net
        .request(
            peer,
            helper_request(&HelperCallMsg::Hello { model }, Vec::new()),
            timeout,
        )
        .await?;
    let reply = decode_helper_reply(&response.meta, &name)?;
    let (Ok(hpke_public), Ok(signature)) = (
        <[u8; 32]>::try_from(reply.hpke_public.as_slice()),
        <[u8; 64]>::try_from(reply.signature.as_slice()),
    ) else {
        return Err(Error::InvalidArgument(format!(
            "helper {name}: a key of {} bytes and a signature of {} bytes (expected 32 and 64)",
            reply.hpke_public.len(),
            reply.signature.len()
        )));
    };
    let identity = ed25519_of(&peer)?;
    let key = HelperKey {
        hpke_public,
        signature,
    }
    .verify(&identity)
    .map_err(|e| Error::InvalidArgument(format!("helper {name}: key signature: {e}")))?;
    Ok(RemoteHelper { peer, key })
}

pub use crate::network::identity::ed25519_of;

/// Helpers on other nodes, reached with [`HELPER_METHOD`] requests on a
/// [`Network`]. Blocking: call from plain threads, not async tasks.
pub struct NetworkLinks {
    net: Arc<dyn Network>,
    handle: Handle,
    helpers: Vec<RemoteHelper>,
    timeout: Duration,
    /// Sessions opened, closed on drop.
    opened: Vec<(PeerId, [u8; 16])>,
}

impl NetworkLinks {
    /// A pool of `helpers` (active ones first, then spares) reached over
    /// `net`, whose requests run on `handle`; a helper that does not answer
    /// within `timeout` has failed.
    pub fn new(
        net: Arc<dyn Network>,
        handle: Handle,
        helpers: Vec<RemoteHelper>,
        timeout: Duration,
    ) -> NetworkLinks {
        NetworkLinks {
            net,
            handle,
            helpers,
            timeout,
            opened: Vec::new(),
        }
    }

    /// The helpers of the pool, by pool index.
    pub fn helpers(&self) -> &[RemoteHelper] {
        &self.helpers
    }
}

/// A [`HELPER_METHOD`] request carrying `call` (and an envelope in `tensor`).
fn helper_request(call: &HelperCallMsg, tensor: Vec<u8>) -> Request {
    Request {
        method: HELPER_METHOD.into(),
        meta: Bytes::from(encode_request(call)),
        tensor: Bytes::from(tensor),
    }
}

impl HelperLinks for NetworkLinks {
    fn len(&self) -> usize {
        self.helpers.len()
    }

    fn owner_peer(&self) -> Vec<u8> {
        self.net.local_peer_id().to_bytes()
    }

    fn helper_peer(&self, h: usize) -> Vec<u8> {
        self.helpers[h].peer.to_bytes()
    }

    fn helper_key(&mut self, h: usize) -> Result<PublicKey> {
        Ok(self.helpers[h].key)
    }

    fn open(
        &mut self,
        h: usize,
        session_id: [u8; 16],
        model: ModelId,
        owner: &PublicKey,
        enc: [u8; 32],
    ) -> Result<[u8; 32]> {
        let peer = self.helpers[h].peer;
        let request = helper_request(
            &HelperCallMsg::Open {
                session_id,
                model,
                owner_public: owner.to_bytes(),
                enc,
            },
            Vec::new(),
        );
        let (net, timeout) = (self.net.clone(), self.timeout);
        let response = self
            .handle
            .block_on(async move { net.request(peer, request, timeout).await })?;
        let reply = decode_helper_reply(&response.meta, peer)?;
        let enc = <[u8; 32]>::try_from(reply.enc.as_slice()).map_err(|_| {
            Error::InvalidArgument(format!(
                "helper {peer}: an encapsulated key of {} bytes (expected 32)",
                reply.enc.len()
            ))
        })?;
        self.opened.push((peer, session_id));
        Ok(enc)
    }

    fn exchange(&mut self, calls: Vec<HelperCall>) -> Vec<Result<HelperAnswer>> {
        let timeout = self.timeout;
        let futures: Vec<_> = calls
            .into_iter()
            .map(|c| {
                let peer = self.helpers[c.helper].peer;
                let request = helper_request(
                    &HelperCallMsg::Call {
                        session_id: c.header.session_id,
                        fields: CallFields::of(&c.header),
                    },
                    c.envelope,
                );
                let net = self.net.clone();
                async move {
                    let response = net.request(peer, request, timeout).await?;
                    let reply = decode_helper_reply(&response.meta, peer)?;
                    Ok(HelperAnswer {
                        envelope: response.tensor.to_vec(),
                        compute_nanos: reply.compute_nanos,
                    })
                }
            })
            .collect();
        self.handle.block_on(futures::future::join_all(futures))
    }
}

impl Drop for NetworkLinks {
    fn drop(&mut self) {
        // Best effort, without waiting: helpers also expire idle sessions.
        for (peer, session_id) in self.opened.drain(..) {
            let net = self.net.clone();
            let request = helper_request(&HelperCallMsg::Close { session_id }, Vec::new());
            self.handle.spawn(async move {
                let _ = net.request(peer, request, Duration::from_secs(2)).await;
            });
        }
    }
}
