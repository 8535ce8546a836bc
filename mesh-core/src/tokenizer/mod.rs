//! Text to token ids and back, from the vocabulary stored in a GGUF file.
//!
//! The ids are the ones upstream llama.cpp produces for the same model
//! (`llama_tokenize` / `llama_token_to_piece` / `llama_detokenize`): the same
//! special-token partitioning, pre-tokenizer word boundaries, merge order, byte
//! fallback and end-of-generation set. Two vocabulary kinds are supported:
//!
//! * `gpt2`: byte-level BPE with a named pre-tokenizer (see [`SUPPORTED_PRE`]),
//! * `llama`: SentencePiece-style BPE over scores with `<0xXX>` byte fallback.

mod bpe;
mod pretokenize;
mod spm;
mod unicode;
mod vocab;

/// Why a tokenizer could not be built from a model ([`crate::Error::Tokenizer`]).
pub type TokenizerError = crate::LayerError<TokenizerErrorKind>;

/// The kinds of [`TokenizerError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TokenizerErrorKind {
    /// The token list and its per-token arrays (scores, types) are missing,
    /// of another type or length, too many, or hold duplicates.
    Vocabulary,
    /// A BPE merge names a token the vocabulary lacks, or there are too many.
    Merges,
    /// A token the model's settings need is missing or misformed (a byte
    /// token `<0xXX>`, a BOS/EOS the vocabulary asks to add).
    MissingToken,
}

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::ops::Range;

use self::bpe::Bpe;
use self::pretokenize::Split;
use self::spm::Spm;
use self::unicode::char_to_byte;
use self::vocab::*;
use crate::gguf::{Array, Gguf, Value};
use crate::{Error, Result};

// Token attributes (llama.h `llama_token_attr`).
const ATTR_UNKNOWN: u32 = 1 << 0;
const ATTR_UNUSED: u32 = 1 << 1;
const ATTR_NORMAL: u32 = 1 << 2;
const ATTR_CONTROL: u32 = 1 << 3;
const ATTR_USER_DEFINED: u32 = 1 << 4;
const ATTR_BYTE: u32 = 1 << 5;
const ATTR_LSTRIP: u32 = 1 << 7;
const ATTR_RSTRIP: u32 = 1 << 8;

/// Pre-tokenizer names (`tokenizer.ggml.pre`) supported for `gpt2` vocabularies.
pub const SUPPORTED_PRE: &[&str] = &[
    "default",
    "llama3",
    "llama-v3",
    "llama-bpe",
    "falcon3",
    "falcon-h1",
    "pixtral",
    "midm-2.0",
    "lfm2",
    "jina-v5-nano",
    "dbrx",
    "smaug-bpe",
    "chatglm-bpe",
    "glm4",
    "glm5",
    "falcon",
    "mpt",
    "olmo",
    "jais",
    "starcoder",
    "refact",
    "command-r",
    "smollm",
    "codeshell",
    "exaone",
    "minerva-7b",
    "mellum2",
    "gpt-2",
    "phi-2",
    "jina-es",
    "jina-de",
    "gigachat",
    "jina-v2-es",
    "jina-v2-de",
    "a.x-4.0",
    "mellum",
    "modern-bert",
    "jina-v1-en",
    "jina-v2-code",
    "roberta-bpe",
    "exaone4",
    "trillion",
    "granite-docling",
    "qwen2",
    "deepseek-r1-qwen",
    "kormo",
    "f2llmv2",
    "megrez",
    "stablelm2",
    "hunyuan",
    "solar-open",
    "qwen35",
];

/// The two vocabulary kinds.
enum Kind {
    Bpe(Bpe),
    Spm(Spm),
}

/// A tokenizer built from a GGUF vocabulary: encodes text to token ids and
/// decodes ids back to bytes, exactly as llama.cpp does for the same model.
///
/// Immutable once built; `Send + Sync`, so one instance serves every thread.
pub struct Tokenizer {
    kind: Kind,
    /// `tokenizer.ggml.pre` (empty when absent).
    pre: String,
    tokens: Vec<String>,
    attrs: Vec<u32>,
    token_to_id: HashMap<String, u32>,
    /// Control, user-defined and unknown tokens, longest text first: the order
    /// they are cut out of the input.
    special_tokens: Vec<u32>,
    special: [Option<u32>; N_ROLES],
    eog: BTreeSet<u32>,
    add_bos: bool,
    add_eos: bool,
    add_space_prefix: bool,
    clean_spaces: bool,
    /// Every token's piece (`special == false`) back to back, built on first
    /// use by [`Tokenizer::pieces`].
    pieces: std::sync::OnceLock<Pieces>,
}

/// Every token's bytes ([`Tokenizer::token_to_piece`] with `special ==
/// false`) in one buffer: what constrained sampling scans each step.
#[derive(Clone, Debug, Default)]
pub struct Pieces {
    bytes: Vec<u8>,
    /// Token `i` is `bytes[ends[i - 1]..ends[i]]` (from 0 for token 0).
    ends: Vec<usize>,
}

impl Pieces {
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }

    /// The bytes of token `id`, or `None` outside the vocabulary.
    pub fn get(&self, id: usize) -> Option<&[u8]> {
        let end = *self.ends.get(id)?;
        let start = if id == 0 { 0 } else { self.ends[id - 1] };
        Some(&self.bytes[start..end])
    }
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field(
                "model",
                &match self.kind {
                    Kind::Bpe(_) => "gpt2",
                    Kind::Spm(_) => "llama",
                },
            )
            .field("pre", &self.pre)
            .field("n_vocab", &self.tokens.len())
            .field("bos", &self.bos())
            .field("eos", &self.eos())
            .field("eog", &self.eog)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .finish()
    }
}

/// One piece of the input after special tokens are cut out.
enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

impl Tokenizer {
    /// Encode `text` to token ids, like llama.cpp's `llama_tokenize`.
    ///
    /// `add_special` adds BOS (and EOS) where the model's metadata asks for them;
    /// `parse_special` turns the texts of control tokens (e.g. `<|im_start|>`) into
    /// their ids instead of tokenizing them as plain text. User-defined tokens are
    /// always matched.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let fragments = self.partition(text, parse_special);
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_special && self.add_bos {
            out.push(self.required(Role::Bos, "BOS")?);
        }
        match &self.kind {
            Kind::Spm(spm) => {
                let mut prev_special = true;
                let mut buf = String::new();
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            buf.clear();
                            if self.add_space_prefix && prev_special {
                                buf.push(' ');
                            }
                            buf.push_str(&text[range]);
                            let escaped = buf.replace(' ', "\u{2581}");
                            spm.encode(&escaped, &self.token_to_id, &mut out)?;
                            prev_special = false;
                        }
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                    }
                }
            }
            Kind::Bpe(bpe) => {
                for fragment in fragments {
                    match fragment {
                        Fragment::Text(range) => {
                            bpe.encode(&text[range], &self.token_to_id, &mut out)
                        }
                        Fragment::Token(id) => out.push(id),
                    }
                }
            }
        }
        if add_special && self.add_eos {
            out.push(self.required(Role::Eos, "EOS")?);
        }
        Ok(out)
    }

    fn required(&self, role: Role, what: &str) -> Result<u32> {
        self.special[role as usize].ok_or_else(|| {
            Error::tokenizer(
                TokenizerErrorKind::MissingToken,
                format!("the vocabulary asks for a {what} token to be added but has none"),
            )
        })
    }

    /// Cut special tokens out of `text`, longest first, as llama.cpp's
    /// `tokenizer_st_partition` does.
    fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        let mut fragments = Vec::new();
        if !text.is_empty() {
            fragments.push(Fragment::Text(0..text.len()));
        }
        let bytes = text.as_bytes();
        for &id in &self.special_tokens {
            let attr = self.attrs[id as usize];
            if !parse_special && attr & (ATTR_CONTROL | ATTR_UNKNOWN) != 0 {
                continue;
            }
            let needle = self.tokens[id as usize].as_str();
            let found = fragments
                .iter()
                .any(|f| matches!(f, Fragment::Text(r) if text[r.clone()].contains(needle)));
            if !found {
                continue;
            }
            let mut next = Vec::with_capacity(fragments.len() + 4);
            for fragment in fragments {
                let Fragment::Text(range) = fragment else {
                    next.push(fragment);
                    continue;
                };
                let (mut start, end) = (range.start, range.end);
                while let Some(at) = text[start..end].find(needle) {
                    let at = start + at;
                    let mut left_end = at;
                    if attr & ATTR_LSTRIP != 0 {
                        while left_end > start && is_c_space(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > start {
                        next.push(Fragment::Text(start..left_end));
                    }
                    next.push(Fragment::Token(id));
                    start = at + needle.len();
                    if attr & ATTR_RSTRIP != 0 {
                        while start < end && is_c_space(bytes[start]) {
                            start += 1;
                        }
                    }
                }
                if start < end {
                    next.push(Fragment::Text(start..end));
                }
            }
            fragments = next;
        }
        fragments
    }

    /// The bytes token `id` stands for, like llama.cpp's `llama_token_to_piece`
    /// (no space stripping).
    ///
    /// A piece may be part of a UTF-8 character. With `special == false`, control
    /// and unknown tokens render as nothing; with `true`, as their text.
    pub fn token_to_piece(&self, id: u32, special: bool) -> Result<Vec<u8>> {
        let Some(text) = self.tokens.get(id as usize) else {
            return Err(Error::InvalidArgument(format!(
                "token id {id}: expected an id below the vocabulary size {}",
                self.tokens.len()
            )));
        };
        let attr = self.attrs[id as usize];
        if !special && attr & (ATTR_UNKNOWN | ATTR_CONTROL) != 0 {
            return Ok(Vec::new());
        }
        if attr & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER_DEFINED) != 0 {
            return Ok(text.as_bytes().to_vec());
        }
        if attr & ATTR_NORMAL != 0 {
            return Ok(match self.kind {
                Kind::Spm(_) => text.replace('\u{2581}', " ").into_bytes(),
                Kind::Bpe(_) => decode_byte_level(text),
            });
        }
        if attr & ATTR_BYTE != 0 {
            return byte_token_value(text).map(|b| vec![b]).ok_or_else(|| {
                Error::tokenizer(
                    TokenizerErrorKind::MissingToken,
                    format!("token {id} {text:?} is a byte token; expected the form <0xXX>"),
                )
            });
        }
        Ok(Vec::new())
    }

    /// Concatenated pieces of `ids`, like llama.cpp's `llama_detokenize` with
    /// `remove_special = false, unparse_special = special`: the first piece loses a
    /// leading space when the vocabulary adds one on encode (SentencePiece), and
    /// vocabularies that ask for it get llama.cpp's clean-up of spaces before
    /// punctuation.
    pub fn decode(&self, ids: &[u32], special: bool) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        let mut strip_space = self.add_space_prefix;
        for &id in ids {
            let piece = self.token_to_piece(id, special)?;
            let piece = match piece.split_first() {
                Some((b' ', rest)) if strip_space => rest,
                _ => &piece[..],
            };
            out.extend_from_slice(piece);
            strip_space = false;
        }
        if self.clean_spaces {
            clean_up_spaces(&mut out);
        }
        Ok(out)
    }

    /// Every token's piece (as [`token_to_piece`](Self::token_to_piece) with
    /// `special == false`: control tokens empty), computed once per tokenizer.
    pub fn pieces(&self) -> &Pieces {
        self.pieces.get_or_init(|| {
            let mut p = Pieces {
                bytes: Vec::with_capacity(self.tokens.len() * 6),
                ends: Vec::with_capacity(self.tokens.len()),
            };
            for id in 0..self.tokens.len() {
                // Every id below the vocabulary size is valid; a byte token
                // with a malformed name (refused when decoding) has no bytes.
                if let Ok(piece) = self.token_to_piece(id as u32, false) {
                    p.bytes.extend_from_slice(&piece);
                }
                p.ends.push(p.bytes.len());
            }
            p
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    /// The beginning-of-sequence token, if the vocabulary has one.
    pub fn bos(&self) -> Option<u32> {
        self.special[Role::Bos as usize]
    }

    /// The end-of-sequence token, if the vocabulary has one.
    pub fn eos(&self) -> Option<u32> {
        self.special[Role::Eos as usize]
    }

    /// Whether `id` ends generation (EOS, end-of-turn tokens such as `<|im_end|>`,
    /// `<|eot_id|>`, `<end_of_turn>`, `<|endoftext|>`, ...: llama.cpp's EOG set).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.contains(&id)
    }

    /// Whether [`encode`](Self::encode) with `add_special` prepends BOS.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The id of the token whose text is exactly `text`, if any.
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.token_to_id.get(text).copied()
    }
}

/// `s` up to its first NUL, as llama.cpp sees GGUF strings.
pub(crate) fn c_str(s: &str) -> &str {
    s.split('\0').next().unwrap_or("")
}

/// C `isspace` in the "C" locale.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// Undo GPT-2's byte-to-unicode mapping; characters outside it are kept visibly,
/// as llama.cpp's `llama_decode_text` does.
fn decode_byte_level(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    for c in text.chars() {
        match char_to_byte(c) {
            Some(b) => out.push(b),
            None => {
                out.extend_from_slice(b"[UNK_BYTE_0x");
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.extend_from_slice(format!("{b:02x}").as_bytes());
                }
                out.extend_from_slice(text.as_bytes());
                out.push(b']');
            }
        }
    }
    out
}

/// The byte of a `<0xXX>` token (hex digits at positions 3..5, parsed like `strtol`).
fn byte_token_value(text: &str) -> Option<u8> {
    let digits = text.as_bytes().get(3..)?;
    let digits = &digits[..digits.len().min(2)];
    let mut value = 0u8;
    for &d in digits {
        let Some(v) = char::from(d).to_digit(16) else {
            break;
        };
        value = value * 16 + v as u8;
    }
    Some(value)
}

/// llama.cpp's `clean_up_tokenization_spaces`: drop the space before `?!.,`,
/// around a lone `'`, and before `'s 'm 're 've`.
fn clean_up_spaces(text: &mut Vec<u8>) {
    // Each pass rewrites the buffer in place, reading ahead of where it writes.
    let n = text.len();
    let mut total = usize::from(n > 0);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && matches!(x, b'?' | b'!' | b'.' | b',') {
            total -= 1;
        }
        text[total] = x;
        total += 1;
    }

    let n = total;
    total = usize::from(n > 0);
    let mut i = 1;
    while i < n {
        let x = text[i];
        if x == b'\'' && i + 1 < n && text[i - 1] == b' ' && text[i + 1] == b' ' {
            total -= 1;
            i += 1;
            text[i] = 0;
        }
        text[total] = x;
        total += 1;
        i += 1;
    }

    let n = total;
    total = usize::from(n > 0);
    for i in 1..n {
        let x = text[i];
        if text[i - 1] == b' ' && x == b'\'' && i + 1 < n {
            let x1 = text[i + 1];
            if x1 == b's' || x1 == b'm' {
                total -= 1;
            } else if i + 2 < n {
                let x2 = text[i + 2];
                if (x1 == b'r' || x1 == b'v') && x2 == b'e' {
                    total -= 1;
                }
            }
        }
        text[total] = x;
        total += 1;
    }
    text.truncate(total);
}

#[cfg(test)]
mod tests;
