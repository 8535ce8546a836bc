//! A node's identity: an Ed25519 keypair; its public key is the [`PeerId`].
//!
//! Stored as the 32-byte Ed25519 secret seed, hex-encoded on one line, in a
//! file only its owner may read (mode 0600 on Unix). The same key signs the
//! node's HPKE keys for private delegation ([`Identity::signing_key`]).

use std::fs;
use std::io::Write;
use std::path::Path;

use libp2p::identity::{ed25519, Keypair};
use zeroize::Zeroize;

use super::PeerId;
use crate::{Error, Result};

/// An Ed25519 node identity.
#[derive(Clone)]
pub struct Identity {
    keypair: ed25519::Keypair,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.peer_id())
    }
}

impl Identity {
    /// A fresh random identity (not saved anywhere).
    pub fn ephemeral() -> Identity {
        Identity {
            keypair: ed25519::Keypair::generate(),
        }
    }

    /// The identity whose secret seed is `seed` (deterministic; for tests and
    /// simulations).
    pub fn from_seed(mut seed: [u8; 32]) -> Identity {
        let secret = ed25519::SecretKey::try_from_bytes(&mut seed)
            .expect("any 32 bytes are an Ed25519 secret seed");
        Identity {
            keypair: ed25519::Keypair::from(secret),
        }
    }

    /// Loads the identity stored at `path`, or creates one there (mode 0600)
    /// if the file does not exist.
    pub fn load_or_create(path: &Path) -> Result<Identity> {
        match fs::read_to_string(path) {
            Ok(text) => Self::parse(text.trim()).map_err(|reason| {
                Error::InvalidArgument(format!("identity file {}: {reason}", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = Identity::ephemeral();
                id.save(path)?;
                Ok(id)
            }
            Err(e) => Err(Error::io(path, e)),
        }
    }

    fn parse(text: &str) -> std::result::Result<Identity, String> {
        if text.len() != 64 {
            return Err(format!(
                "expected 64 hex digits (an Ed25519 secret seed), found {} characters",
                text.chars().count()
            ));
        }
        let mut seed = [0u8; 32];
        for (i, pair) in text.as_bytes().chunks_exact(2).enumerate() {
            let hex = |c: u8| (c as char).to_digit(16);
            match (hex(pair[0]), hex(pair[1])) {
                (Some(h), Some(l)) => seed[i] = (h * 16 + l) as u8,
                _ => {
                    seed.zeroize();
                    return Err(format!(
                        "expected hex digits, found a non-hex character near offset {}",
                        2 * i
                    ));
                }
            }
        }
        Ok(Identity::from_seed(seed))
    }

    /// Writes the secret seed to `path` with mode 0600 (atomically: a temporary
    /// file in the same directory, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        let dir = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let tmp = dir.join(format!(
            ".{}.tmp{}",
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let mut options = fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut text: String = self
            .keypair
            .secret()
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        text.push('\n');
        let written = options
            .open(&tmp)
            .and_then(|mut f| {
                f.write_all(text.as_bytes())?;
                f.sync_all()
            })
            .and_then(|_| fs::rename(&tmp, path));
        text.zeroize();
        written.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            Error::io(path, e)
        })
    }

    /// The peer id (derived from the public key).
    pub fn peer_id(&self) -> PeerId {
        PeerId::from_public_key(&libp2p::identity::PublicKey::from(self.keypair.public()))
    }

    /// The keypair in libp2p's form.
    pub fn keypair(&self) -> Keypair {
        Keypair::from(self.keypair.clone())
    }

    /// The same key as an `ed25519-dalek` signing key (signs HPKE keys for
    /// private delegation).
    pub fn signing_key(&self) -> ed25519_dalek::SigningKey {
        let mut seed: [u8; 32] = self
            .keypair
            .secret()
            .as_ref()
            .try_into()
            .expect("an Ed25519 secret seed is 32 bytes");
        let key = ed25519_dalek::SigningKey::from_bytes(&seed);
        seed.zeroize();
        key
    }
}

/// The Ed25519 public key a peer id embeds (libp2p inlines Ed25519 keys in
/// the id as an identity multihash).
pub fn ed25519_of(peer: &PeerId) -> Result<ed25519_dalek::VerifyingKey> {
    let bad = |why: &str| {
        Error::InvalidArgument(format!(
            "peer {peer}: {why}; signed messages need an Ed25519 identity"
        ))
    };
    let mh = peer.as_ref();
    if mh.code() != 0 {
        return Err(bad("the peer id is a hash of its key, not the key"));
    }
    let public = libp2p::identity::PublicKey::try_decode_protobuf(mh.digest())
        .map_err(|_| bad("the peer id does not hold a public key"))?;
    let ed = public
        .try_into_ed25519()
        .map_err(|_| bad("not an Ed25519 key"))?;
    ed25519_dalek::VerifyingKey::from_bytes(&ed.to_bytes()).map_err(|_| bad("invalid key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_a_private_file() {
        let dir = std::env::temp_dir().join(format!("mesh-identity-{}", std::process::id()));
        let path = dir.join("node.key");
        let _ = fs::remove_file(&path);
        let a = Identity::load_or_create(&path).unwrap();
        let b = Identity::load_or_create(&path).unwrap();
        assert_eq!(a.peer_id(), b.peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                fs::metadata(&path).unwrap().permissions().mode() & 0o777,
                0o600
            );
        }
        // The dalek key is the same key: its public half matches libp2p's.
        assert_eq!(
            a.signing_key().verifying_key().to_bytes(),
            a.keypair.public().to_bytes()
        );
        fs::write(&path, "not a key").unwrap();
        let err = Identity::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("expected 64 hex digits"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn seeds_are_deterministic() {
        assert_eq!(
            Identity::from_seed([7; 32]).peer_id(),
            Identity::from_seed([7; 32]).peer_id()
        );
        assert_ne!(
            Identity::from_seed([7; 32]).peer_id(),
            Identity::from_seed([8; 32]).peer_id()
        );
    }
}
