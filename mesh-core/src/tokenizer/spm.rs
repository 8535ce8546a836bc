//! SentencePiece-style BPE (llama 2 / mistral vocabularies), as llama.cpp's
//! `llm_tokenizer_spm` runs it: merge the highest-scoring adjacent pair whose
//! concatenation is a token, fall back to `<0xXX>` byte tokens.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

use crate::tokenizer::TokenizerErrorKind;
use crate::{Error, Result};

/// Scores and byte-fallback tokens of an SPM vocabulary.
pub(crate) struct Spm {
    scores: Vec<f32>,
    /// Token for each byte: `<0xXX>`, else the one-character token.
    byte_ids: [Option<u32>; 256],
}

/// A candidate merge of two adjacent symbols.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Higher score first, then the leftmost pair (llama.cpp's comparator).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score
            .partial_cmp(&other.score)
            .unwrap_or(Ordering::Equal)
            .then_with(|| other.left.cmp(&self.left))
    }
}

impl Spm {
    pub(crate) fn new(token_to_id: &HashMap<String, u32>, scores: Vec<f32>) -> Spm {
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = token_to_id
                .get(&format!("<0x{b:02X}>"))
                .copied()
                .or_else(|| {
                    let b = b as u8;
                    b.is_ascii()
                        .then(|| token_to_id.get(&*char::from(b).to_string()).copied())
                        .flatten()
                });
        }
        Spm { scores, byte_ids }
    }

    /// Append the tokens of `text` (spaces already escaped to `▁`) to `out`.
    pub(crate) fn encode(
        &self,
        text: &str,
        token_to_id: &HashMap<String, u32>,
        out: &mut Vec<u32>,
    ) -> Result<()> {
        const NIL: usize = usize::MAX;
        struct Sym {
            start: usize,
            len: usize,
            prev: usize,
            next: usize,
        }
        let mut syms: Vec<Sym> = Vec::with_capacity(text.len());
        for (start, c) in text.char_indices() {
            let i = syms.len();
            syms.push(Sym {
                start,
                len: c.len_utf8(),
                prev: if i == 0 { NIL } else { i - 1 },
                next: i + 1,
            });
        }
        if let Some(last) = syms.last_mut() {
            last.next = NIL;
        }

        let mut queue = BinaryHeap::new();
        let push = |syms: &[Sym], queue: &mut BinaryHeap<Bigram>, l: usize, r: usize| {
            if l == NIL || r == NIL {
                return;
            }
            let (start, size) = (syms[l].start, syms[l].len + syms[r].len);
            if let Some(&id) = token_to_id.get(&text[start..start + size]) {
                let score = self.scores.get(id as usize).copied().unwrap_or(0.0);
                queue.push(Bigram {
                    score,
                    left: l,
                    right: r,
                    size,
                });
            }
        };
        for i in 1..syms.len() {
            push(&syms, &mut queue, i - 1, i);
        }

        while let Some(Bigram {
            left, right, size, ..
        }) = queue.pop()
        {
            if syms[left].len == 0
                || syms[right].len == 0
                || syms[left].len + syms[right].len != size
            {
                continue;
            }
            let next = syms[right].next;
            syms[left].len = size;
            syms[left].next = next;
            syms[right].len = 0;
            if next != NIL {
                syms[next].prev = left;
            }
            let prev = syms[left].prev;
            push(&syms, &mut queue, prev, left);
            push(&syms, &mut queue, left, next);
        }

        // Every merged symbol is a token; single characters that are not fall back
        // to byte tokens.
        let mut i = 0;
        while i < syms.len() {
            let Sym { start, len, .. } = syms[i];
            let piece = &text[start..start + len];
            match token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for &b in piece.as_bytes() {
                        let id = self.byte_ids[usize::from(b)].ok_or_else(|| {
                            Error::tokenizer(TokenizerErrorKind::MissingToken, format!(
                                "no token for byte 0x{b:02X}: expected <0x{b:02X}> in the vocabulary"
                            ))
                        })?;
                        out.push(id);
                    }
                }
            }
            // Symbols are indexed by character; skip the ones merged into this one.
            i = match syms[i].next {
                NIL => syms.len(),
                next => next,
            };
        }
        Ok(())
    }
}
