//! Pre-tokenizers for byte-level BPE: split text into words before merging.
//!
//! llama.cpp applies a list of regexes per pre-tokenizer type, each one splitting
//! the pieces the previous one produced. The big GPT-2 / llama3 / qwen2 patterns it
//! runs through hand-written splitters (unicode.cpp `unicode_regex_split_custom_*`),
//! the small ones through `std::regex` over a "collapsed" text where every non-ASCII
//! codepoint stands for its category. Both are reproduced here by hand so the word
//! boundaries are the same as upstream's, edge cases included.

use std::ops::Range;

use super::unicode::Flags;

/// One splitting stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Split {
    /// `\p{N}`: every number codepoint on its own.
    EachNumber,
    /// `\p{N}+`: runs of number codepoints.
    NumberRuns,
    /// `[0-9][0-9][0-9]`: ASCII digit triples, leftmost first.
    AsciiDigitTriples,
    /// `[\p{P}\$\+<=>\^~\|]+` (with a backtick too when `backtick`).
    PunctRuns {
        /// Whether `` ` `` is in the class (falcon).
        backtick: bool,
    },
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// The llama3 pattern (`\p{N}{1,3}`, case-insensitive contractions, `\r\n` handling).
    Llama3,
    /// The qwen2 pattern: llama3's with single-digit numbers.
    Qwen2,
    /// The qwen3.5 pattern: qwen2's with combining marks joining letter runs.
    Qwen35,
}

/// A codepoint of the text with its classes.
#[derive(Clone, Copy)]
struct Cp {
    c: char,
    f: Flags,
}

/// Split `text` into words with `stages` applied in order; returns byte ranges
/// covering `text` exactly, in order, none empty.
pub(crate) fn split(text: &str, stages: &[Split]) -> Vec<Range<usize>> {
    let mut cps = Vec::with_capacity(text.len());
    let mut starts = Vec::with_capacity(text.len() + 1);
    for (i, c) in text.char_indices() {
        cps.push(Cp { c, f: Flags::of(c) });
        starts.push(i);
    }
    starts.push(text.len());

    let mut lens = vec![cps.len()];
    let mut next = Vec::with_capacity(cps.len() / 2 + 1);
    for stage in stages {
        next.clear();
        let mut at = 0;
        for &len in &lens {
            let seg = &cps[at..at + len];
            at += len;
            if !seg.is_empty() {
                split_segment(*stage, seg, &mut next);
            }
        }
        std::mem::swap(&mut lens, &mut next);
    }

    let mut out = Vec::with_capacity(lens.len());
    let mut at = 0;
    for len in lens {
        if len > 0 {
            out.push(starts[at]..starts[at + len]);
            at += len;
        }
    }
    out
}

fn split_segment(stage: Split, seg: &[Cp], out: &mut Vec<usize>) {
    match stage {
        Split::EachNumber => split_class(seg, out, |s, i| usize::from(s[i].f.is_number())),
        Split::NumberRuns => split_class(seg, out, |s, i| {
            s[i..].iter().take_while(|cp| cp.f.is_number()).count()
        }),
        Split::AsciiDigitTriples => split_class(seg, out, |s, i| {
            let ok = s.len() >= i + 3 && s[i..i + 3].iter().all(|cp| cp.c.is_ascii_digit());
            if ok {
                3
            } else {
                0
            }
        }),
        Split::PunctRuns { backtick } => split_class(seg, out, |s, i| {
            s[i..]
                .iter()
                .take_while(|cp| in_punct_class(**cp, backtick))
                .count()
        }),
        Split::Gpt2 => split_gpt2(seg, out),
        Split::Llama3 => split_llama3(seg, out, Variant::Llama3),
        Split::Qwen2 => split_llama3(seg, out, Variant::Qwen2),
        Split::Qwen35 => split_llama3(seg, out, Variant::Qwen35),
    }
}

/// `[\p{P}\$\+<=>\^~\|]`: ASCII punctuation by Unicode category plus those symbols;
/// beyond ASCII, the punctuation category (as llama.cpp's collapsed text sees it).
fn in_punct_class(cp: Cp, backtick: bool) -> bool {
    if cp.c.is_ascii() {
        cp.f.is_punctuation_only()
            || matches!(cp.c, '$' | '+' | '<' | '=' | '>' | '^' | '~' | '|')
            || (backtick && cp.c == '`')
    } else {
        cp.f.is_punctuation_only()
    }
}

/// Regex-iterator semantics for a pattern that cannot match empty: `matched(seg, i)`
/// is the length of the match starting at `i` (0 for none); matches and the gaps
/// between them become pieces.
fn split_class(seg: &[Cp], out: &mut Vec<usize>, matched: impl Fn(&[Cp], usize) -> usize) {
    let mut gap_start = 0;
    let mut i = 0;
    while i < seg.len() {
        let m = matched(seg, i);
        if m == 0 {
            i += 1;
            continue;
        }
        if i > gap_start {
            out.push(i - gap_start);
        }
        out.push(m);
        i += m;
        gap_start = i;
    }
    if seg.len() > gap_start {
        out.push(seg.len() - gap_start);
    }
}

/// Classes of position `i` of a segment; [`Flags::NONE`] past its end.
fn flags_at(seg: &[Cp], i: usize) -> Flags {
    seg.get(i).map_or(Flags::NONE, |cp| cp.f)
}

fn char_at(seg: &[Cp], i: usize) -> Option<char> {
    seg.get(i).map(|cp| cp.c)
}

/// Length of the contraction (`'s`, `'re`, ...) starting at `pos`, or 0.
fn contraction_len(seg: &[Cp], pos: usize, ignore_case: bool) -> usize {
    if seg[pos].c != '\'' || pos + 1 >= seg.len() {
        return 0;
    }
    let lower = |c: char| {
        if ignore_case {
            c.to_ascii_lowercase()
        } else {
            c
        }
    };
    let c1 = lower(seg[pos + 1].c);
    if matches!(c1, 's' | 't' | 'm' | 'd') {
        return 2;
    }
    if pos + 2 < seg.len() {
        let c2 = lower(seg[pos + 2].c);
        if matches!((c1, c2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
            return 3;
        }
    }
    0
}

/// Length of the whitespace run starting at `pos`, per `\s+(?!\S)|\s+`: a run
/// followed by a non-space keeps its last space for the next word.
fn whitespace_len(seg: &[Cp], pos: usize) -> usize {
    let n = seg[pos..]
        .iter()
        .take_while(|cp| cp.f.is_whitespace())
        .count();
    if n > 1 && pos + n < seg.len() {
        n - 1
    } else {
        n.max(1)
    }
}

/// `[^\s\p{L}\p{N}]` for a codepoint that exists.
fn is_other(f: Flags) -> bool {
    !(f.is_whitespace() || f.is_letter() || f.is_number() || f.is_none())
}

/// The GPT-2 pattern, as llama.cpp's hand-written splitter applies it.
fn split_gpt2(seg: &[Cp], out: &mut Vec<usize>) {
    let mut pos = 0;
    while pos < seg.len() {
        let start = pos;
        let Cp { c, f } = seg[pos];

        let n = contraction_len(seg, pos, false);
        if n > 0 {
            out.push(n);
            pos += n;
            continue;
        }

        // ` ?X+` where the optional space is only taken when X follows it.
        let space = usize::from(c == ' ');
        let f2 = if c == ' ' { flags_at(seg, pos + 1) } else { f };
        let class: Option<fn(Flags) -> bool> = if f2.is_letter() {
            Some(Flags::is_letter)
        } else if f2.is_number() {
            Some(Flags::is_number)
        } else if is_other(f2) {
            Some(is_other)
        } else {
            None
        };
        if let Some(class) = class {
            pos += space;
            while class(flags_at(seg, pos)) {
                pos += 1;
            }
            out.push(pos - start);
            continue;
        }

        let n = whitespace_len(seg, pos);
        out.push(n);
        pos += n;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Llama3,
    Qwen2,
    Qwen35,
}

/// The llama3 / qwen2 / qwen3.5 patterns, as llama.cpp's hand-written splitters apply them:
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
///  ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
fn split_llama3(seg: &[Cp], out: &mut Vec<usize>, variant: Variant) {
    let marks = variant == Variant::Qwen35;
    let wordish = |f: Flags| f.is_letter() || (marks && f.is_mark());
    let mut pos = 0;
    while pos < seg.len() {
        let start = pos;
        let Cp { c, f } = seg[pos];

        let n = contraction_len(seg, pos, true);
        if n > 0 {
            out.push(n);
            pos += n;
            continue;
        }

        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(c == '\r' || c == '\n' || f.is_number())
            && (wordish(f) || wordish(flags_at(seg, pos + 1)))
        {
            pos += 1;
            while wordish(flags_at(seg, pos)) {
                pos += 1;
            }
            out.push(pos - start);
            continue;
        }

        // \p{N}{1,3} (llama3) or \p{N} (qwen)
        if f.is_number() {
            if variant == Variant::Llama3 {
                let mut chunk = pos;
                while flags_at(seg, pos).is_number() {
                    pos += 1;
                    if pos - chunk >= 3 {
                        out.push(pos - chunk);
                        chunk = pos;
                    }
                }
                if pos > chunk {
                    out.push(pos - chunk);
                }
            } else {
                pos += 1;
                out.push(1);
            }
            continue;
        }

        //  ?[^\s\p{L}\p{N}]+[\r\n]*
        let other = |f: Flags| {
            !(f.is_whitespace() || f.is_letter() || f.is_number() || (marks && f.is_mark()))
        };
        let f2 = if c == ' ' { flags_at(seg, pos + 1) } else { f };
        if other(f2) && !f.is_none() {
            pos += usize::from(c == ' ');
            while other(flags_at(seg, pos)) && !flags_at(seg, pos).is_none() {
                pos += 1;
            }
            while matches!(char_at(seg, pos), Some('\r' | '\n')) {
                pos += 1;
            }
            out.push(pos - start);
            continue;
        }

        // \s*[\r\n]+ : the run up to its last line break
        let run = seg[pos..]
            .iter()
            .take_while(|cp| cp.f.is_whitespace())
            .count();
        if let Some(last) = seg[pos..pos + run]
            .iter()
            .rposition(|cp| cp.c == '\r' || cp.c == '\n')
        {
            out.push(last + 1);
            pos += last + 1;
            continue;
        }

        // \s+(?!\S)|\s+
        let n = whitespace_len(seg, pos);
        out.push(n);
        pos += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words<'a>(text: &'a str, stages: &[Split]) -> Vec<&'a str> {
        split(text, stages).into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn gpt2_splits_like_the_regex() {
        assert_eq!(
            words("Hello world's  end!!\n\n  x", &[Split::Gpt2]),
            vec!["Hello", " world", "'s", " ", " end", "!!", "\n\n ", " x"]
        );
        assert_eq!(words("  ", &[Split::Gpt2]), vec!["  "]);
        assert_eq!(words("a  ", &[Split::Gpt2]), vec!["a", "  "]);
    }

    #[test]
    fn smollm_isolates_digits_first() {
        assert_eq!(
            words("x 1234", &[Split::EachNumber, Split::Gpt2]),
            vec!["x", " ", "1", "2", "3", "4"]
        );
    }

    #[test]
    fn llama3_chunks_numbers_and_keeps_newlines() {
        assert_eq!(
            words("1234567 ab\n\n  cd", &[Split::Llama3]),
            vec!["123", "456", "7", " ab", "\n\n", " ", " cd"]
        );
        assert_eq!(
            words("I'M here", &[Split::Llama3]),
            vec!["I", "'M", " here"]
        );
    }

    #[test]
    fn class_splits_keep_gaps() {
        assert_eq!(
            words("12345", &[Split::AsciiDigitTriples]),
            vec!["123", "45"]
        );
        assert_eq!(
            words("a+=b", &[Split::PunctRuns { backtick: false }]),
            vec!["a", "+=", "b"]
        );
    }

    #[test]
    fn split_covers_input() {
        let text = "héllo 世界 \u{200D}👨‍👩‍👧 12³ \t\r\n end";
        for stages in [
            &[Split::Gpt2][..],
            &[Split::Llama3],
            &[Split::Qwen2],
            &[Split::Qwen35],
            &[Split::EachNumber, Split::Gpt2],
            &[
                Split::PunctRuns { backtick: false },
                Split::Gpt2,
                Split::NumberRuns,
                Split::AsciiDigitTriples,
            ],
        ] {
            let joined: String = words(text, stages).concat();
            assert_eq!(joined, text);
        }
    }
}
