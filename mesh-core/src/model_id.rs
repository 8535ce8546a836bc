//! [`ModelId`], the identity of a model (the BLAKE3 hash of its GGUF
//! file). A leaf module: the network, the pipeline, the ledger and the engine
//! all name models by it without depending on each other.

use crate::Result;
use std::fmt;

/// Identity of a model: the BLAKE3 hash of its GGUF file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub [u8; 32]);

impl ModelId {
    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parses 64 hex digits (either case), as printed by [`ModelId::to_hex`].
    pub fn from_hex(s: &str) -> Result<ModelId> {
        let bytes = s.as_bytes();
        if bytes.len() != 64 {
            return Err(crate::Error::InvalidArgument(format!(
                "model id: expected 64 hex digits, found {} characters",
                s.chars().count()
            )));
        }
        let mut out = [0u8; 32];
        for (i, pair) in bytes.chunks_exact(2).enumerate() {
            let hex = |c: u8| (c as char).to_digit(16);
            match (hex(pair[0]), hex(pair[1])) {
                (Some(h), Some(l)) => out[i] = (h * 16 + l) as u8,
                _ => {
                    return Err(crate::Error::InvalidArgument(format!(
                        "model id: expected hex digits, found {:?} at offset {}",
                        String::from_utf8_lossy(pair),
                        2 * i
                    )))
                }
            }
        }
        Ok(ModelId(out))
    }
}

impl fmt::Display for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ModelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ModelId({})", self.to_hex())
    }
}
