//! Byte-level BPE (GPT-2 style), as llama.cpp's `llm_tokenizer_bpe` runs it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::pretokenize::{self, Split};
use super::unicode::byte_to_char;
use crate::tokenizer::TokenizerErrorKind;
use crate::{Error, Result};

/// One merge rule: the pair's rank, and the token the concatenation is (if any).
#[derive(Clone, Copy)]
struct Merge {
    rank: u32,
    merged: Option<u32>,
}

/// The merge table and pre-tokenizer of a byte-level BPE vocabulary.
pub(crate) struct Bpe {
    /// `(left id << 32) | right id` -> merge rule.
    merges: HashMap<u64, Merge>,
    /// Token of each byte's GPT-2 character (`None` if the vocabulary lacks it).
    byte_ids: [Option<u32>; 256],
    stages: &'static [Split],
    /// Emit a whole word as one token when it is in the vocabulary (llama3 and others).
    ignore_merges: bool,
}

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

impl Bpe {
    /// Build the merge table. Merges are `"left right"` strings, lower index = higher
    /// priority; both halves must be tokens (as Hugging Face tokenizers also require).
    pub(crate) fn new(
        token_to_id: &HashMap<String, u32>,
        merges: &[String],
        stages: &'static [Split],
        ignore_merges: bool,
    ) -> Result<Bpe> {
        let mut table = HashMap::with_capacity(merges.len());
        let mut joined = String::new();
        for (rank, merge) in merges.iter().enumerate() {
            let merge = super::c_str(merge);
            // Split at the first space after the first byte, as llama.cpp does;
            // an entry without one can never apply and is skipped.
            let Some(at) = merge.bytes().skip(1).position(|b| b == b' ') else {
                continue;
            };
            let (left, right) = (&merge[..at + 1], &merge[at + 2..]);
            let id_of = |part: &str| {
                token_to_id.get(part).copied().ok_or_else(|| {
                    Error::tokenizer(
                        TokenizerErrorKind::Merges,
                        format!(
                            "merge {rank} {merge:?}: expected both halves to be tokens, \
                         {part:?} is not in the vocabulary"
                        ),
                    )
                })
            };
            let (l, r) = (id_of(left)?, id_of(right)?);
            joined.clear();
            joined.push_str(left);
            joined.push_str(right);
            let rank = u32::try_from(rank).map_err(|_| {
                Error::tokenizer(
                    TokenizerErrorKind::Merges,
                    format!("{} merges: too many", merges.len()),
                )
            })?;
            table.entry(pair_key(l, r)).or_insert(Merge {
                rank,
                merged: token_to_id.get(joined.as_str()).copied(),
            });
        }

        let mut byte_ids = [None; 256];
        let mut buf = [0u8; 4];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            let c = byte_to_char(b as u8);
            *slot = token_to_id.get(&*c.encode_utf8(&mut buf)).copied();
        }
        Ok(Bpe {
            merges: table,
            byte_ids,
            stages,
            ignore_merges,
        })
    }

    /// Append the tokens of `text` (a fragment with no special tokens) to `out`.
    pub(crate) fn encode(
        &self,
        text: &str,
        token_to_id: &HashMap<String, u32>,
        out: &mut Vec<u32>,
    ) {
        let mut encoded = String::new();
        for word in pretokenize::split(text, self.stages) {
            let word = &text.as_bytes()[word];
            if self.ignore_merges {
                encoded.clear();
                encoded.extend(word.iter().map(|&b| byte_to_char(b)));
                if let Some(&id) = token_to_id.get(encoded.as_str()) {
                    out.push(id);
                    continue;
                }
            }
            self.encode_word(word, out);
        }
    }

    /// Merge the bytes of one word, lowest rank first (leftmost on ties).
    fn encode_word(&self, word: &[u8], out: &mut Vec<u32>) {
        const NIL: usize = usize::MAX;
        struct Sym {
            len: usize,
            prev: usize,
            next: usize,
            id: Option<u32>,
        }
        let n = word.len();
        let mut syms: Vec<Sym> = (0..n)
            .map(|i| Sym {
                len: 1,
                prev: if i == 0 { NIL } else { i - 1 },
                next: if i + 1 == n { NIL } else { i + 1 },
                id: self.byte_ids[usize::from(word[i])],
            })
            .collect();

        // (rank, left, right, size, merged token)
        type Entry = Reverse<(u32, usize, usize, usize, Option<u32>)>;
        let mut queue: BinaryHeap<Entry> = BinaryHeap::new();
        let push = |syms: &[Sym], queue: &mut BinaryHeap<Entry>, l: usize, r: usize| {
            if l == NIL || r == NIL {
                return;
            }
            let (Some(a), Some(b)) = (syms[l].id, syms[r].id) else {
                return;
            };
            if let Some(m) = self.merges.get(&pair_key(a, b)) {
                let size = syms[l].len + syms[r].len;
                queue.push(Reverse((m.rank, l, r, size, m.merged)));
            }
        };
        for i in 1..n {
            push(&syms, &mut queue, i - 1, i);
        }

        while let Some(Reverse((_, l, r, size, merged))) = queue.pop() {
            // Stale entry: one side was merged away or grew since it was queued.
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != size {
                continue;
            }
            let next = syms[r].next;
            syms[l].len = size;
            syms[l].next = next;
            syms[l].id = merged;
            syms[r].len = 0;
            if next != NIL {
                syms[next].prev = l;
            }
            let prev = syms[l].prev;
            push(&syms, &mut queue, prev, l);
            push(&syms, &mut queue, l, next);
        }

        let mut i = 0;
        while i < n {
            let sym = &syms[i];
            match sym.id {
                Some(id) => out.push(id),
                // Not a token: llama.cpp looks each byte of the encoded text up as a
                // one-byte token, which only printable ASCII can be.
                None => out.extend(
                    word[i..i + sym.len]
                        .iter()
                        .filter(|b| (0x21..=0x7E).contains(*b))
                        .filter_map(|&b| self.byte_ids[usize::from(b)]),
                ),
            }
            i += sym.len.max(1);
        }
    }
}
