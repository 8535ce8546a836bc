//! End-to-end sealing of delegation messages (`SMPC.md`, "Sealing").
//!
//! RFC 9180 HPKE in base mode with the suite DHKEM(X25519, HKDF-SHA256),
//! HKDF-SHA256, ChaCha20-Poly1305, built directly on `x25519-dalek`,
//! `hkdf`/`sha2` and `chacha20poly1305` and checked against the RFC's
//! published test vector (Appendix A.2.1). Not the `hpke` crate: its
//! contexts open strictly in sequence order and keep `key`/`base_nonce`
//! private, while the replay window below must open out of order; and its
//! current releases need `rand_core` 0.9/0.10, not the workspace's 0.6.
//!
//! One HPKE context per (session, helper, direction): the sender builds a
//! [`SealContext`] against the recipient's [`PublicKey`] and hands its
//! [`enc`](SealContext::enc) to the recipient once, at session setup; the
//! recipient builds the matching [`OpenContext`] from its [`SecretKey`] and
//! that `enc`. Every message is then one envelope:
//!
//! ```text
//! version (1) | seq (8, LE) | ciphertext length (4, LE) | ciphertext (payload + 16-byte tag)
//! ```
//!
//! The nonce is HPKE's `base_nonce XOR seq`; the sender numbers its messages
//! 0, 1, 2, ... itself. The AAD is the canonical encoding of the
//! [`EnvelopeHeader`] the caller supplies plus the protocol version and `seq`,
//! so an envelope opens only where the receiver expects exactly that header.
//! The receiver keeps a [`REPLAY_WINDOW`]-entry sliding window over `seq`:
//! a duplicate or a `seq` older than the window is rejected, in any order
//! otherwise.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hkdf::{Hkdf, HkdfExtract};
use rand::{CryptoRng, RngCore};
use sha2::Sha256;
use zeroize::Zeroize;

use crate::{Error, Result};

/// Envelope format and AAD version this build writes and accepts.
pub const PROTOCOL_VERSION: u8 = 1;

/// Sequence numbers a receiver remembers: a `seq` this far or further
/// behind the newest one it has opened is rejected as too old.
pub const REPLAY_WINDOW: u64 = 1024;

/// Default largest payload an [`OpenContext`] or [`SealContext`] accepts: 64 MiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 << 20;

/// Longest peer id (in bytes) an [`EnvelopeHeader`] may carry.
pub const MAX_PEER_ID_LEN: usize = 256;

/// Bytes of the envelope before the ciphertext: version, seq, length.
pub const ENVELOPE_HEADER_LEN: usize = 1 + 8 + 4;

/// Bytes the AEAD adds to every payload (the Poly1305 tag).
pub const TAG_LEN: usize = 16;

/// HPKE `info` for every context: names the protocol, so keys derived for
/// mesh-llm sealing are useless to any other HPKE application.
const HPKE_INFO: &[u8] = b"mesh-llm delegate seal v1";

/// Why sealing or opening an envelope failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The envelope starts with a version byte this build does not speak.
    #[error("envelope version {found}, expected {expected}")]
    UnknownVersion {
        /// Version this build speaks.
        expected: u8,
        /// Version byte found.
        found: u8,
    },
    /// The envelope is shorter than its header or its declared ciphertext.
    #[error("envelope truncated: need {needed} bytes, found {found}")]
    Truncated {
        /// Bytes the envelope needs.
        needed: usize,
        /// Bytes present.
        found: usize,
    },
    /// The envelope has bytes after its declared ciphertext.
    #[error("envelope has {extra} bytes after its ciphertext")]
    TrailingBytes {
        /// Bytes after the ciphertext.
        extra: usize,
    },
    /// A payload (or a declared ciphertext length) exceeds the configured limit.
    #[error("payload of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Payload bytes declared or given.
        len: usize,
        /// Largest payload accepted.
        max: usize,
    },
    /// The ciphertext does not authenticate: it was altered, the header
    /// (AAD) differs from the expected one, or it was sealed to another key.
    #[error("envelope does not authenticate (tampered, wrong header or wrong key)")]
    Authentication,
    /// This sequence number was already opened.
    #[error("sequence number {seq} replayed")]
    Replayed {
        /// The duplicate sequence number.
        seq: u64,
    },
    /// The sequence number is behind the replay window.
    #[error("sequence number {seq} is outside the replay window (newest {newest})")]
    TooOld {
        /// The rejected sequence number.
        seq: u64,
        /// Newest sequence number opened so far.
        newest: u64,
    },
    /// A public key or `enc` is a low-order point (the X25519 result is all zero).
    #[error("invalid X25519 public key (low-order point)")]
    InvalidKey,
    /// A peer id in the header is longer than [`MAX_PEER_ID_LEN`].
    #[error("peer id of {len} bytes, at most {max} allowed")]
    PeerIdTooLong {
        /// Length given.
        len: usize,
        /// Longest accepted.
        max: usize,
    },
    /// The sender used every sequence number; start a new context.
    #[error("sequence numbers exhausted")]
    SequenceExhausted,
    /// A [`HelperKey`]'s signature does not verify under the claimed identity.
    #[error("helper key signature does not verify under the node identity")]
    BadSignature,
}

impl From<SealError> for Error {
    fn from(e: SealError) -> Self {
        Error::Seal(e)
    }
}

/// Which way a message travels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// From the model owner to a helper.
    OwnerToHelper,
    /// From a helper back to the model owner.
    HelperToOwner,
}

impl Direction {
    fn code(self) -> u8 {
        match self {
            Direction::OwnerToHelper => 0,
            Direction::HelperToOwner => 1,
        }
    }
}

/// Everything a sealed message is bound to (its AAD), apart from the
/// protocol version and sequence number, which the envelope adds.
///
/// Both sides build it from what they know about the request; an envelope
/// opens only if the receiver's expected header equals the sender's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EnvelopeHeader {
    /// Which way the message travels.
    pub direction: Direction,
    /// Message kind, as numbered by the wire protocol.
    pub kind: u8,
    /// Number of parties sharing the activation.
    pub n: u16,
    /// Index of the helper this message is to or from.
    pub helper_index: u16,
    /// Which projection (QKV, O, gate+up, down), as numbered by the wire protocol.
    pub op: u8,
    /// Transformer layer.
    pub layer: u32,
    /// Session id.
    pub session_id: [u8; 16],
    /// The owner's peer id bytes (at most [`MAX_PEER_ID_LEN`]).
    pub owner_peer: Vec<u8>,
    /// The helper's peer id bytes (at most [`MAX_PEER_ID_LEN`]).
    pub helper_peer: Vec<u8>,
    /// Hash of the model file.
    pub model_hash: [u8; 32],
    /// Decoding step.
    pub step: u64,
    /// Rows of the shared matrix.
    pub rows: u32,
    /// Columns of the shared matrix.
    pub cols: u32,
    /// Retry counter for this request.
    pub attempt: u32,
    /// Hash of the request this message belongs to.
    pub request_hash: [u8; 32],
}

impl EnvelopeHeader {
    /// Canonical AAD: fixed-width little-endian fields in declaration order,
    /// peer ids prefixed by their length as a `u16`, version first, `seq`
    /// after `attempt`.
    fn aad(&self, seq: u64) -> Result<Vec<u8>, SealError> {
        for peer in [&self.owner_peer, &self.helper_peer] {
            if peer.len() > MAX_PEER_ID_LEN {
                return Err(SealError::PeerIdTooLong {
                    len: peer.len(),
                    max: MAX_PEER_ID_LEN,
                });
            }
        }
        let mut out = Vec::with_capacity(160 + self.owner_peer.len() + self.helper_peer.len());
        out.push(PROTOCOL_VERSION);
        out.push(self.direction.code());
        out.push(self.kind);
        out.extend_from_slice(&self.n.to_le_bytes());
        out.extend_from_slice(&self.helper_index.to_le_bytes());
        out.push(self.op);
        out.extend_from_slice(&self.layer.to_le_bytes());
        out.extend_from_slice(&self.session_id);
        for peer in [&self.owner_peer, &self.helper_peer] {
            // Checked above: at most MAX_PEER_ID_LEN, so it fits a u16.
            out.extend_from_slice(&(peer.len() as u16).to_le_bytes());
            out.extend_from_slice(peer);
        }
        out.extend_from_slice(&self.model_hash);
        out.extend_from_slice(&self.step.to_le_bytes());
        out.extend_from_slice(&self.rows.to_le_bytes());
        out.extend_from_slice(&self.cols.to_le_bytes());
        out.extend_from_slice(&self.attempt.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&self.request_hash);
        Ok(out)
    }
}

/// An X25519 HPKE public key (a helper's or an owner's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// The key from its 32 serialized bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        PublicKey(bytes)
    }

    /// The key's 32 serialized bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0
    }
}

/// An X25519 HPKE secret key; zeroized on drop, never printed.
pub struct SecretKey(x25519_dalek::StaticSecret);

impl SecretKey {
    /// A fresh key drawn from `rng` (RFC 9180 `GenerateKeyPair`: 32 random
    /// bytes through `DeriveKeyPair`).
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let mut ikm = [0u8; 32];
        rng.fill_bytes(&mut ikm);
        let key = SecretKey::derive(&ikm);
        ikm.zeroize();
        key
    }

    /// The key RFC 9180 `DeriveKeyPair` makes from `ikm` (at least 32 bytes
    /// of secret input keying material).
    pub fn derive(ikm: &[u8]) -> Self {
        let mut dkp_prk = labeled_extract(KEM_SUITE, b"", b"dkp_prk", &[ikm]);
        let mut sk = [0u8; 32];
        labeled_expand(KEM_SUITE, &dkp_prk, b"sk", &[], &mut sk);
        dkp_prk.zeroize();
        SecretKey::from_bytes(sk)
    }

    /// The key from its 32 serialized bytes.
    pub fn from_bytes(mut bytes: [u8; 32]) -> Self {
        let key = SecretKey(x25519_dalek::StaticSecret::from(bytes));
        bytes.zeroize();
        key
    }

    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519_dalek::PublicKey::from(&self.0).to_bytes())
    }

    /// X25519 with `peer`; fails on a low-order `peer` (all-zero result).
    fn dh(&self, peer: &[u8; 32]) -> Result<[u8; 32], SealError> {
        let shared = self.0.diffie_hellman(&x25519_dalek::PublicKey::from(*peer));
        if !shared.was_contributory() {
            return Err(SealError::InvalidKey);
        }
        Ok(shared.to_bytes())
    }
}

/// `"KEM" || I2OSP(kem_id = 0x0020, 2)`.
const KEM_SUITE: &[u8] = b"KEM\x00\x20";
/// `"HPKE" || kem_id 0x0020 || kdf_id 0x0001 || aead_id 0x0003`.
const HPKE_SUITE: &[u8] = b"HPKE\x00\x20\x00\x01\x00\x03";

/// RFC 9180 `LabeledExtract(salt, label, ikm)`, with `ikm` given in parts.
fn labeled_extract(suite: &[u8], salt: &[u8], label: &[u8], ikm: &[&[u8]]) -> [u8; 32] {
    let mut extract = HkdfExtract::<Sha256>::new(Some(salt));
    extract.input_ikm(b"HPKE-v1");
    extract.input_ikm(suite);
    extract.input_ikm(label);
    for part in ikm {
        extract.input_ikm(part);
    }
    let (prk, _) = extract.finalize();
    let mut out = [0u8; 32];
    out.copy_from_slice(&prk);
    out
}

/// RFC 9180 `LabeledExpand(prk, label, info, L)` with `L = out.len()` (at most 32).
fn labeled_expand(suite: &[u8], prk: &[u8; 32], label: &[u8], info: &[&[u8]], out: &mut [u8]) {
    let hkdf = Hkdf::<Sha256>::from_prk(prk).unwrap_or_else(|_| unreachable!("prk is 32 bytes"));
    let len = (out.len() as u16).to_be_bytes();
    let mut parts: Vec<&[u8]> = vec![&len, b"HPKE-v1", suite, label];
    parts.extend_from_slice(info);
    hkdf.expand_multi_info(&parts, out)
        .unwrap_or_else(|_| unreachable!("L <= 32 is a valid HKDF-SHA256 length"));
}

/// DHKEM `ExtractAndExpand(dh, kem_context)`.
fn kem_shared_secret(dh: &[u8; 32], enc: &[u8; 32], pk_r: &[u8; 32]) -> [u8; 32] {
    let mut eae_prk = labeled_extract(KEM_SUITE, b"", b"eae_prk", &[dh]);
    let mut shared = [0u8; 32];
    labeled_expand(
        KEM_SUITE,
        &eae_prk,
        b"shared_secret",
        &[enc, pk_r],
        &mut shared,
    );
    eae_prk.zeroize();
    shared
}

/// The secrets of one HPKE context; zeroized on drop, never printed.
struct KeySchedule {
    key: [u8; 32],
    base_nonce: [u8; 12],
    #[cfg_attr(not(test), allow(dead_code))]
    exporter_secret: [u8; 32],
}

impl KeySchedule {
    /// RFC 9180 `KeySchedule` in base mode (empty psk and psk_id).
    fn new(shared_secret: &[u8; 32], info: &[u8]) -> Self {
        let psk_id_hash = labeled_extract(HPKE_SUITE, b"", b"psk_id_hash", &[]);
        let info_hash = labeled_extract(HPKE_SUITE, b"", b"info_hash", &[info]);
        let context: [&[u8]; 3] = [&[0u8], &psk_id_hash, &info_hash];
        let mut secret = labeled_extract(HPKE_SUITE, shared_secret, b"secret", &[]);
        let mut schedule = KeySchedule {
            key: [0; 32],
            base_nonce: [0; 12],
            exporter_secret: [0; 32],
        };
        labeled_expand(HPKE_SUITE, &secret, b"key", &context, &mut schedule.key);
        labeled_expand(
            HPKE_SUITE,
            &secret,
            b"base_nonce",
            &context,
            &mut schedule.base_nonce,
        );
        labeled_expand(
            HPKE_SUITE,
            &secret,
            b"exp",
            &context,
            &mut schedule.exporter_secret,
        );
        secret.zeroize();
        schedule
    }

    /// `base_nonce XOR I2OSP(seq, 12)`.
    fn nonce(&self, seq: u64) -> [u8; 12] {
        let mut nonce = self.base_nonce;
        for (n, s) in nonce[4..].iter_mut().zip(seq.to_be_bytes()) {
            *n ^= s;
        }
        nonce
    }

    fn seal(&self, seq: u64, aad: &[u8], pt: &[u8]) -> Result<Vec<u8>, SealError> {
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.key));
        cipher
            .encrypt(
                Nonce::from_slice(&self.nonce(seq)),
                Payload { msg: pt, aad },
            )
            // ChaCha20-Poly1305 refuses only plaintexts over 256 GiB.
            .map_err(|_| SealError::TooLarge {
                len: pt.len(),
                max: MAX_REPRESENTABLE_PAYLOAD,
            })
    }

    fn open(&self, seq: u64, aad: &[u8], ct: &[u8]) -> Result<Vec<u8>, SealError> {
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&self.key));
        cipher
            .decrypt(
                Nonce::from_slice(&self.nonce(seq)),
                Payload { msg: ct, aad },
            )
            .map_err(|_| SealError::Authentication)
    }
}

impl Drop for KeySchedule {
    fn drop(&mut self) {
        self.key.zeroize();
        self.base_nonce.zeroize();
        self.exporter_secret.zeroize();
    }
}

/// Largest payload that still fits the envelope's `u32` length field.
const MAX_REPRESENTABLE_PAYLOAD: usize = u32::MAX as usize - TAG_LEN;

/// The sending side of one HPKE context: seals envelopes numbered 0, 1, 2, ...
pub struct SealContext {
    schedule: KeySchedule,
    enc: [u8; 32],
    next_seq: u64,
    max_payload: usize,
}

impl SealContext {
    /// A context sealing to `recipient`, with a fresh ephemeral key from
    /// `rng` (RFC 9180 `SetupBaseS`). Send [`enc`](Self::enc) to the
    /// recipient once, before the first envelope.
    pub fn new<R: RngCore + CryptoRng>(rng: &mut R, recipient: &PublicKey) -> Result<Self> {
        let ephemeral = SecretKey::generate(rng);
        let enc = ephemeral.public_key().0;
        let mut dh = ephemeral.dh(&recipient.0)?;
        let mut shared = kem_shared_secret(&dh, &enc, &recipient.0);
        dh.zeroize();
        let schedule = KeySchedule::new(&shared, HPKE_INFO);
        shared.zeroize();
        Ok(SealContext {
            schedule,
            enc,
            next_seq: 0,
            max_payload: DEFAULT_MAX_PAYLOAD,
        })
    }

    /// Sets the largest payload [`seal`](Self::seal) accepts (capped so the
    /// ciphertext length fits the envelope's `u32` field).
    pub fn with_max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload.min(MAX_REPRESENTABLE_PAYLOAD);
        self
    }

    /// The encapsulated ephemeral public key the recipient needs to open.
    pub fn enc(&self) -> [u8; 32] {
        self.enc
    }

    /// Sequence number the next envelope will carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Seals `payload` bound to `header` and the next sequence number.
    pub fn seal(&mut self, header: &EnvelopeHeader, payload: &[u8]) -> Result<Vec<u8>> {
        if payload.len() > self.max_payload {
            return Err(SealError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            }
            .into());
        }
        let seq = self.next_seq;
        let next = seq.checked_add(1).ok_or(SealError::SequenceExhausted)?;
        let aad = header.aad(seq)?;
        let ct = self.schedule.seal(seq, &aad, payload)?;
        let ct_len = u32::try_from(ct.len()).map_err(|_| SealError::TooLarge {
            len: payload.len(),
            max: self.max_payload,
        })?;
        let mut out = Vec::with_capacity(ENVELOPE_HEADER_LEN + ct.len());
        out.push(PROTOCOL_VERSION);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&ct_len.to_le_bytes());
        out.extend_from_slice(&ct);
        self.next_seq = next;
        Ok(out)
    }
}

/// A payload opened from an envelope, with the sequence number it carried.
#[derive(Clone, PartialEq, Eq)]
pub struct Opened {
    /// Sequence number of the envelope.
    pub seq: u64,
    /// The plaintext payload.
    pub payload: Vec<u8>,
}

impl std::fmt::Debug for Opened {
    /// Shows the sequence number and payload length, never the plaintext.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opened")
            .field("seq", &self.seq)
            .field("payload_len", &self.payload.len())
            .finish()
    }
}

/// The receiving side of one HPKE context: opens envelopes in any order
/// within the replay window, each at most once.
pub struct OpenContext {
    schedule: KeySchedule,
    max_payload: usize,
    /// Newest sequence number opened so far.
    newest: Option<u64>,
    /// Bit `seq % REPLAY_WINDOW` is set when `seq` (within the window) was opened.
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl OpenContext {
    /// The context matching the sender's, from the recipient's key and the
    /// sender's `enc` (RFC 9180 `SetupBaseR`).
    pub fn new(recipient: &SecretKey, enc: &[u8; 32]) -> Result<Self> {
        let mut dh = recipient.dh(enc)?;
        let mut shared = kem_shared_secret(&dh, enc, &recipient.public_key().0);
        dh.zeroize();
        let schedule = KeySchedule::new(&shared, HPKE_INFO);
        shared.zeroize();
        Ok(OpenContext {
            schedule,
            max_payload: DEFAULT_MAX_PAYLOAD,
            newest: None,
            seen: [0; (REPLAY_WINDOW / 64) as usize],
        })
    }

    /// Sets the largest payload [`open`](Self::open) accepts; larger declared
    /// lengths are rejected before anything is allocated.
    pub fn with_max_payload(mut self, max_payload: usize) -> Self {
        self.max_payload = max_payload.min(MAX_REPRESENTABLE_PAYLOAD);
        self
    }

    /// Opens `bytes`, which must have been sealed in this context with a
    /// header equal to `expected` and a sequence number not opened before
    /// and within the replay window. The window only advances on success.
    pub fn open(&mut self, expected: &EnvelopeHeader, bytes: &[u8]) -> Result<Opened> {
        let (seq, ct) = self.parse(bytes)?;
        self.check_window(seq)?;
        let aad = expected.aad(seq)?;
        let payload = self.schedule.open(seq, &aad, ct)?;
        self.mark(seq);
        Ok(Opened { seq, payload })
    }

    /// Splits an envelope into its sequence number and ciphertext, checking
    /// version and lengths.
    fn parse<'a>(&self, bytes: &'a [u8]) -> Result<(u64, &'a [u8]), SealError> {
        let version = *bytes.first().ok_or(SealError::Truncated {
            needed: ENVELOPE_HEADER_LEN,
            found: 0,
        })?;
        if version != PROTOCOL_VERSION {
            return Err(SealError::UnknownVersion {
                expected: PROTOCOL_VERSION,
                found: version,
            });
        }
        let Some((head, ct)) = bytes.split_at_checked(ENVELOPE_HEADER_LEN) else {
            return Err(SealError::Truncated {
                needed: ENVELOPE_HEADER_LEN,
                found: bytes.len(),
            });
        };
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&head[1..9]);
        let mut len = [0u8; 4];
        len.copy_from_slice(&head[9..13]);
        let ct_len = u32::from_le_bytes(len) as usize;
        if ct_len < TAG_LEN {
            return Err(SealError::Authentication);
        }
        let payload_len = ct_len - TAG_LEN;
        if payload_len > self.max_payload {
            return Err(SealError::TooLarge {
                len: payload_len,
                max: self.max_payload,
            });
        }
        if ct.len() < ct_len {
            return Err(SealError::Truncated {
                needed: ENVELOPE_HEADER_LEN + ct_len,
                found: bytes.len(),
            });
        }
        if ct.len() > ct_len {
            return Err(SealError::TrailingBytes {
                extra: ct.len() - ct_len,
            });
        }
        Ok((u64::from_le_bytes(seq), ct))
    }

    fn bit(seq: u64) -> (usize, u64) {
        let slot = seq % REPLAY_WINDOW;
        ((slot / 64) as usize, 1u64 << (slot % 64))
    }

    fn check_window(&self, seq: u64) -> Result<(), SealError> {
        let Some(newest) = self.newest else {
            return Ok(());
        };
        if seq > newest {
            return Ok(());
        }
        if newest - seq >= REPLAY_WINDOW {
            return Err(SealError::TooOld { seq, newest });
        }
        let (word, mask) = Self::bit(seq);
        if self.seen[word] & mask != 0 {
            return Err(SealError::Replayed { seq });
        }
        Ok(())
    }

    /// Records `seq` as opened (after [`check_window`](Self::check_window) passed).
    fn mark(&mut self, seq: u64) {
        match self.newest {
            Some(newest) if seq <= newest => {}
            Some(newest) if seq - newest < REPLAY_WINDOW => {
                // Forget the slots the window slides over.
                for old in newest + 1..seq {
                    let (word, mask) = Self::bit(old);
                    self.seen[word] &= !mask;
                }
                self.newest = Some(seq);
            }
            _ => {
                self.seen = [0; (REPLAY_WINDOW / 64) as usize];
                self.newest = Some(seq);
            }
        }
        let (word, mask) = Self::bit(seq);
        self.seen[word] |= mask;
    }
}

/// Domain separation for [`HelperKey`] signatures: an identity signature over
/// these bytes can mean nothing else.
const HELPER_KEY_CONTEXT: &[u8] = b"mesh-llm delegate helper hpke key v1\0";

/// A helper's HPKE public key signed by its node identity (the libp2p
/// Ed25519 key), so an owner seals only to keys the helper vouched for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HelperKey {
    /// The helper's X25519 HPKE public key.
    pub hpke_public: [u8; 32],
    /// Ed25519 signature over a domain-separation prefix and `hpke_public`.
    pub signature: [u8; 64],
}

impl HelperKey {
    /// `hpke_public` signed by the node `identity`.
    pub fn sign(identity: &ed25519_dalek::SigningKey, hpke_public: &PublicKey) -> Self {
        use ed25519_dalek::Signer;
        let signature = identity.sign(&Self::message(&hpke_public.0));
        HelperKey {
            hpke_public: hpke_public.0,
            signature: signature.to_bytes(),
        }
    }

    /// The HPKE public key, if the signature verifies (strictly: no
    /// malleable or small-order encodings) under `identity`.
    pub fn verify(&self, identity: &ed25519_dalek::VerifyingKey) -> Result<PublicKey> {
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature);
        identity
            .verify_strict(&Self::message(&self.hpke_public), &signature)
            .map_err(|_| SealError::BadSignature)?;
        Ok(PublicKey(self.hpke_public))
    }

    fn message(hpke_public: &[u8; 32]) -> Vec<u8> {
        [HELPER_KEY_CONTEXT, hpke_public].concat()
    }
}

#[cfg(test)]
mod tests;
