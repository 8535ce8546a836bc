use super::*;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

// RFC 9180 Appendix A.2.1: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256,
// ChaCha20Poly1305, base mode (mode 0). Taken from the CFRG test-vectors
// JSON vendored in the `hpke` crate (test-vectors-5f503c5.json) and
// cross-checked against independent copies of the RFC text.
const INFO: &str = "4f6465206f6e2061204772656369616e2055726e";
const IKM_E: &str = "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b";
const PK_EM: &str = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
const SK_EM: &str = "f4ec9b33b792c372c1d2c2063507b684ef925b8c75a42dbcbf57d63ccd381600";
const IKM_R: &str = "1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df";
const PK_RM: &str = "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a";
const SK_RM: &str = "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb";
const ENC: &str = "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a";
const SHARED_SECRET: &str = "0bbe78490412b4bbea4812666f7916932b828bba79942424abb65244930d69a7";
const KEY: &str = "ad2744de8e17f4ebba575b3f5f5a8fa1f69c2a07f6e7500bc60ca6e3e3ec1c91";
const BASE_NONCE: &str = "5c4d98150661b848853b547f";
const EXPORTER_SECRET: &str = "a3b010d4994890e2c6968a36f64470d3c824c8f5029942feb11e7a74b2921922";
const PT: &str = "4265617574792069732074727574682c20747275746820626561757479";
/// (seq, aad, nonce, ct).
const ENCRYPTIONS: [(u64, &str, &str, &str); 3] = [
    (
        0,
        "436f756e742d30",
        "5c4d98150661b848853b547f",
        "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28",
    ),
    (
        1,
        "436f756e742d31",
        "5c4d98150661b848853b547e",
        "6b53c051e4199c518de79594e1c4ab18b96f081549d45ce015be002090bb119e85285337cc95ba5f59992dc98c",
    ),
    (
        2,
        "436f756e742d32",
        "5c4d98150661b848853b547d",
        "71146bd6795ccc9c49ce25dda112a48f202ad220559502cef1f34271e0cb4b02b4f10ecac6f48c32f878fae86b",
    ),
];

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn hex32(s: &str) -> [u8; 32] {
    hex(s).try_into().unwrap()
}

/// An "RNG" that returns fixed bytes: reproduces the RFC's ephemeral key.
struct Fixed(Vec<u8>);
impl rand::RngCore for Fixed {
    fn next_u32(&mut self) -> u32 {
        unimplemented!()
    }
    fn next_u64(&mut self) -> u64 {
        unimplemented!()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        dest.copy_from_slice(&self.0[..dest.len()]);
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
impl rand::CryptoRng for Fixed {}

#[test]
fn rfc9180_a2_base_vector() {
    let sk_e = SecretKey::derive(&hex(IKM_E));
    assert_eq!(sk_e.0.to_bytes(), hex32(SK_EM));
    assert_eq!(sk_e.public_key().to_bytes(), hex32(PK_EM));
    let sk_r = SecretKey::derive(&hex(IKM_R));
    assert_eq!(sk_r.0.to_bytes(), hex32(SK_RM));
    assert_eq!(sk_r.public_key().to_bytes(), hex32(PK_RM));

    // Encap with the RFC's ephemeral key, then Decap.
    let pk_r = sk_r.public_key();
    let dh = sk_e.dh(&pk_r.0).unwrap();
    let enc = sk_e.public_key().0;
    assert_eq!(enc, hex32(ENC));
    let shared = kem_shared_secret(&dh, &enc, &pk_r.0);
    assert_eq!(shared, hex32(SHARED_SECRET));
    let dh_r = sk_r.dh(&enc).unwrap();
    assert_eq!(kem_shared_secret(&dh_r, &enc, &pk_r.0), shared);

    let schedule = KeySchedule::new(&shared, &hex(INFO));
    assert_eq!(schedule.key, hex32(KEY));
    assert_eq!(schedule.base_nonce.to_vec(), hex(BASE_NONCE));
    assert_eq!(schedule.exporter_secret, hex32(EXPORTER_SECRET));
    for (seq, aad, nonce, ct) in ENCRYPTIONS {
        assert_eq!(schedule.nonce(seq).to_vec(), hex(nonce));
        let sealed = schedule.seal(seq, &hex(aad), &hex(PT)).unwrap();
        assert_eq!(sealed, hex(ct), "seq {seq}");
        assert_eq!(schedule.open(seq, &hex(aad), &sealed).unwrap(), hex(PT));
    }

    // The public constructor draws ikmE from its RNG exactly as the RFC's
    // GenerateKeyPair does, so a fixed RNG reproduces `enc`.
    let ctx = SealContext::new(&mut Fixed(hex(IKM_E)), &pk_r).unwrap();
    assert_eq!(ctx.enc(), hex32(ENC));
}

fn header() -> EnvelopeHeader {
    EnvelopeHeader {
        direction: Direction::OwnerToHelper,
        kind: 1,
        n: 2,
        helper_index: 1,
        op: 3,
        layer: 7,
        session_id: [0x5a; 16],
        owner_peer: b"owner-peer-id".to_vec(),
        helper_peer: b"helper-peer-id".to_vec(),
        model_hash: [0x11; 32],
        step: 42,
        rows: 576,
        cols: 1536,
        attempt: 0,
        request_hash: [0x22; 32],
    }
}

fn pair(seed: u64) -> (SealContext, OpenContext) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let helper = SecretKey::generate(&mut rng);
    let sealer = SealContext::new(&mut rng, &helper.public_key()).unwrap();
    let opener = OpenContext::new(&helper, &sealer.enc()).unwrap();
    (sealer, opener)
}

fn seal_err(e: Error) -> SealError {
    match e {
        Error::Seal(s) => s,
        other => panic!("expected Error::Seal, found {other:?}"),
    }
}

#[test]
fn round_trip_in_and_out_of_order() {
    let (mut s, mut o) = pair(1);
    let h = header();
    let a = s.seal(&h, b"first").unwrap();
    let b = s.seal(&h, b"").unwrap();
    let c = s.seal(&h, &[7u8; 5000]).unwrap();
    assert_eq!(a.len(), ENVELOPE_HEADER_LEN + 5 + TAG_LEN);
    let opened = o.open(&h, &c).unwrap();
    assert_eq!((opened.seq, opened.payload), (2, vec![7u8; 5000]));
    assert_eq!(o.open(&h, &a).unwrap().payload, b"first");
    assert_eq!(o.open(&h, &b).unwrap().payload, b"");
}

#[test]
fn tampered_ciphertext_is_rejected() {
    let (mut s, mut o) = pair(2);
    let h = header();
    let mut env = s.seal(&h, b"payload").unwrap();
    env[ENVELOPE_HEADER_LEN + 3] ^= 0x01;
    assert_eq!(
        seal_err(o.open(&h, &env).unwrap_err()),
        SealError::Authentication
    );
    // Flipping the seq field changes the nonce and the AAD.
    let mut env = s.seal(&h, b"payload").unwrap();
    env[1] ^= 0x80;
    assert_eq!(
        seal_err(o.open(&h, &env).unwrap_err()),
        SealError::Authentication
    );
}

#[test]
fn every_header_field_is_bound() {
    type Change = (&'static str, fn(&mut EnvelopeHeader));
    let changes: Vec<Change> = vec![
        ("direction", |h| h.direction = Direction::HelperToOwner),
        ("kind", |h| h.kind ^= 1),
        ("n", |h| h.n += 1),
        ("helper_index", |h| h.helper_index += 1),
        ("op", |h| h.op ^= 1),
        ("layer", |h| h.layer += 1),
        ("session_id", |h| h.session_id[15] ^= 1),
        ("owner_peer", |h| h.owner_peer.push(0)),
        ("helper_peer", |h| h.helper_peer[0] ^= 1),
        ("model_hash", |h| h.model_hash[0] ^= 1),
        ("step", |h| h.step += 1),
        ("rows", |h| h.rows += 1),
        ("cols", |h| h.cols += 1),
        ("attempt", |h| h.attempt += 1),
        ("request_hash", |h| h.request_hash[31] ^= 1),
        // Moving bytes between the two peer ids must not collide.
        ("peer boundary", |h| {
            let b = h.owner_peer.pop().unwrap();
            h.helper_peer.insert(0, b);
        }),
    ];
    let (mut s, mut o) = pair(3);
    let h = header();
    for (name, change) in changes {
        let env = s.seal(&h, b"bound").unwrap();
        let mut wrong = h.clone();
        change(&mut wrong);
        assert_ne!(wrong, h, "{name}");
        assert_eq!(
            seal_err(o.open(&wrong, &env).unwrap_err()),
            SealError::Authentication,
            "{name}"
        );
        // A failed open does not consume the sequence number.
        assert_eq!(o.open(&h, &env).unwrap().payload, b"bound", "{name}");
    }
}

#[test]
fn wrong_key_is_rejected() {
    let mut rng = ChaCha20Rng::seed_from_u64(4);
    let helper = SecretKey::generate(&mut rng);
    let other = SecretKey::generate(&mut rng);
    let mut s = SealContext::new(&mut rng, &helper.public_key()).unwrap();
    let mut o = OpenContext::new(&other, &s.enc()).unwrap();
    let env = s.seal(&header(), b"secret").unwrap();
    assert_eq!(
        seal_err(o.open(&header(), &env).unwrap_err()),
        SealError::Authentication
    );
    // Same key, another sender's context (other enc).
    let s2 = SealContext::new(&mut rng, &helper.public_key()).unwrap();
    let mut o2 = OpenContext::new(&helper, &s2.enc()).unwrap();
    assert_eq!(
        seal_err(o2.open(&header(), &env).unwrap_err()),
        SealError::Authentication
    );
}

#[test]
fn low_order_enc_is_rejected() {
    let helper = SecretKey::derive(&[9; 32]);
    let zero = [0u8; 32];
    assert_eq!(
        seal_err(OpenContext::new(&helper, &zero).err().unwrap()),
        SealError::InvalidKey
    );
    let mut rng = ChaCha20Rng::seed_from_u64(5);
    assert_eq!(
        seal_err(
            SealContext::new(&mut rng, &PublicKey::from_bytes(zero))
                .err()
                .unwrap()
        ),
        SealError::InvalidKey
    );
}

#[test]
fn replayed_sequence_is_rejected() {
    let (mut s, mut o) = pair(6);
    let h = header();
    let env = s.seal(&h, b"once").unwrap();
    o.open(&h, &env).unwrap();
    assert_eq!(
        seal_err(o.open(&h, &env).unwrap_err()),
        SealError::Replayed { seq: 0 }
    );
}

#[test]
fn sequence_outside_window_is_rejected() {
    let (mut s, mut o) = pair(7);
    let h = header();
    let old = s.seal(&h, b"old").unwrap();
    let edge = s.seal(&h, b"edge").unwrap(); // seq 1
    for _ in 2..REPLAY_WINDOW + 1 {
        s.seal(&h, b"").unwrap();
    }
    let newest = s.seal(&h, b"new").unwrap(); // seq 1025
    assert_eq!(o.open(&h, &newest).unwrap().seq, REPLAY_WINDOW + 1);
    assert_eq!(
        seal_err(o.open(&h, &old).unwrap_err()),
        SealError::TooOld {
            seq: 0,
            newest: REPLAY_WINDOW + 1
        }
    );
    assert_eq!(
        seal_err(o.open(&h, &edge).unwrap_err()),
        SealError::TooOld {
            seq: 1,
            newest: REPLAY_WINDOW + 1
        }
    );
}

#[test]
fn window_edge_is_still_accepted_once() {
    let (mut s, mut o) = pair(8);
    let h = header();
    let envs: Vec<_> = (0..REPLAY_WINDOW + 1)
        .map(|_| s.seal(&h, b"x").unwrap())
        .collect();
    o.open(&h, &envs[REPLAY_WINDOW as usize]).unwrap();
    // seq 1 is exactly REPLAY_WINDOW - 1 behind: inside.
    o.open(&h, &envs[1]).unwrap();
    assert_eq!(
        seal_err(o.open(&h, &envs[1]).unwrap_err()),
        SealError::Replayed { seq: 1 }
    );
    assert!(matches!(
        seal_err(o.open(&h, &envs[0]).unwrap_err()),
        SealError::TooOld { seq: 0, .. }
    ));
}

#[test]
fn truncated_envelope_is_rejected() {
    let (mut s, mut o) = pair(9);
    let h = header();
    let env = s.seal(&h, b"truncate me").unwrap();
    assert_eq!(
        seal_err(o.open(&h, &env[..5]).unwrap_err()),
        SealError::Truncated {
            needed: ENVELOPE_HEADER_LEN,
            found: 5
        }
    );
    assert_eq!(
        seal_err(o.open(&h, &env[..env.len() - 1]).unwrap_err()),
        SealError::Truncated {
            needed: env.len(),
            found: env.len() - 1
        }
    );
    assert!(matches!(
        seal_err(o.open(&h, &[]).unwrap_err()),
        SealError::Truncated { found: 0, .. }
    ));
    let mut long = env.clone();
    long.push(0);
    assert_eq!(
        seal_err(o.open(&h, &long).unwrap_err()),
        SealError::TrailingBytes { extra: 1 }
    );
    assert_eq!(o.open(&h, &env).unwrap().payload, b"truncate me");
}

#[test]
fn oversized_length_is_rejected_before_reading() {
    let (mut s, o) = pair(10);
    let mut o = o.with_max_payload(100);
    let h = header();
    // A 13-byte envelope claiming a 4 GiB ciphertext.
    let mut env = vec![PROTOCOL_VERSION];
    env.extend_from_slice(&0u64.to_le_bytes());
    env.extend_from_slice(&u32::MAX.to_le_bytes());
    assert_eq!(
        seal_err(o.open(&h, &env).unwrap_err()),
        SealError::TooLarge {
            len: u32::MAX as usize - TAG_LEN,
            max: 100
        }
    );
    let big = s.seal(&h, &[0u8; 101]).unwrap();
    assert_eq!(
        seal_err(o.open(&h, &big).unwrap_err()),
        SealError::TooLarge { len: 101, max: 100 }
    );
    let mut s = s.with_max_payload(100);
    assert_eq!(
        seal_err(s.seal(&h, &[0u8; 101]).unwrap_err()),
        SealError::TooLarge { len: 101, max: 100 }
    );
}

#[test]
fn unknown_version_is_rejected() {
    let (mut s, mut o) = pair(11);
    let h = header();
    let mut env = s.seal(&h, b"v").unwrap();
    env[0] = PROTOCOL_VERSION + 1;
    assert_eq!(
        seal_err(o.open(&h, &env).unwrap_err()),
        SealError::UnknownVersion {
            expected: PROTOCOL_VERSION,
            found: PROTOCOL_VERSION + 1
        }
    );
}

#[test]
fn overlong_peer_id_is_rejected() {
    let (mut s, _) = pair(12);
    let mut h = header();
    h.owner_peer = vec![0; MAX_PEER_ID_LEN + 1];
    assert_eq!(
        seal_err(s.seal(&h, b"").unwrap_err()),
        SealError::PeerIdTooLong {
            len: MAX_PEER_ID_LEN + 1,
            max: MAX_PEER_ID_LEN
        }
    );
    assert_eq!(s.next_seq(), 0);
}

#[test]
fn helper_key_signature() {
    let mut rng = ChaCha20Rng::seed_from_u64(15);
    let identity = ed25519_dalek::SigningKey::from_bytes(&rng.gen());
    let other = ed25519_dalek::SigningKey::from_bytes(&rng.gen());
    let hpke = SecretKey::generate(&mut rng).public_key();
    let signed = HelperKey::sign(&identity, &hpke);
    assert_eq!(signed.verify(&identity.verifying_key()).unwrap(), hpke);
    assert_eq!(
        seal_err(signed.verify(&other.verifying_key()).unwrap_err()),
        SealError::BadSignature
    );
    let mut swapped = signed;
    swapped.hpke_public = SecretKey::generate(&mut rng).public_key().to_bytes();
    assert_eq!(
        seal_err(swapped.verify(&identity.verifying_key()).unwrap_err()),
        SealError::BadSignature
    );
    let mut flipped = signed;
    flipped.signature[10] ^= 1;
    assert_eq!(
        seal_err(flipped.verify(&identity.verifying_key()).unwrap_err()),
        SealError::BadSignature
    );
    // Without the domain prefix, a plain signature over the key is refused.
    use ed25519_dalek::Signer;
    let bare = HelperKey {
        hpke_public: hpke.to_bytes(),
        signature: identity.sign(&hpke.to_bytes()).to_bytes(),
    };
    assert_eq!(
        seal_err(bare.verify(&identity.verifying_key()).unwrap_err()),
        SealError::BadSignature
    );
}

fn arb_header() -> impl Strategy<Value = EnvelopeHeader> {
    (
        (
            any::<bool>(),
            any::<u8>(),
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
            any::<u32>(),
        ),
        (
            any::<[u8; 16]>(),
            proptest::collection::vec(any::<u8>(), 0..=MAX_PEER_ID_LEN),
            proptest::collection::vec(any::<u8>(), 0..=MAX_PEER_ID_LEN),
            any::<[u8; 32]>(),
        ),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            any::<u32>(),
            any::<[u8; 32]>(),
        ),
    )
        .prop_map(
            |(
                (dir, kind, n, helper_index, op, layer),
                (session_id, owner_peer, helper_peer, model_hash),
                (step, rows, cols, attempt, request_hash),
            )| EnvelopeHeader {
                direction: if dir {
                    Direction::OwnerToHelper
                } else {
                    Direction::HelperToOwner
                },
                kind,
                n,
                helper_index,
                op,
                layer,
                session_id,
                owner_peer,
                helper_peer,
                model_hash,
                step,
                rows,
                cols,
                attempt,
                request_hash,
            },
        )
}

proptest! {
    #[test]
    fn open_arbitrary_bytes_fails_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let (_, mut o) = pair(13);
        prop_assert!(matches!(o.open(&header(), &bytes), Err(Error::Seal(_))));
    }

    #[test]
    fn open_well_formed_forgeries_fails_cleanly(
        seq in any::<u64>(),
        body in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let (_, mut o) = pair(14);
        let mut env = vec![PROTOCOL_VERSION];
        env.extend_from_slice(&seq.to_le_bytes());
        env.extend_from_slice(&(body.len() as u32).to_le_bytes());
        env.extend_from_slice(&body);
        prop_assert!(matches!(o.open(&header(), &env), Err(Error::Seal(_))));
    }

    #[test]
    fn seal_open_round_trip(
        h in arb_header(),
        payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..2048), 1..4),
        seed in any::<u64>(),
    ) {
        let (mut s, mut o) = pair(seed);
        let sealed: Vec<_> = payloads.iter().map(|p| s.seal(&h, p).unwrap()).collect();
        for (i, (env, p)) in sealed.iter().zip(&payloads).enumerate().rev() {
            let opened = o.open(&h, env).unwrap();
            prop_assert_eq!(opened.seq, i as u64);
            prop_assert_eq!(&opened.payload, p);
        }
    }
}
