//! JSON mode: sampling constrained so the generated text is one JSON object
//! (Ollama's `format: "json"`, OpenAI's `response_format: json_object`).
//!
//! [`JsonState`] is a byte-level JSON automaton (RFC 8259: objects, arrays,
//! strings with escapes and well-formed UTF-8, numbers, `true`/`false`/`null`)
//! whose top-level value must be an object. It is `Copy` (the container stack
//! is a bit set, at most [`MAX_DEPTH`] deep), so trying a token's bytes from
//! the current state costs no allocation. Before each draw, [`JsonMode`] sets
//! the logit of every token whose bytes cannot continue a valid object to NaN
//! (the sampler never picks NaN), and generation ends as soon as the object
//! is closed. Whitespace between tokens is limited to [`MAX_WHITESPACE`]
//! consecutive bytes, so a model cannot fill its budget with newlines.
//!
//! A generation cut short by `max_tokens` ends with an unfinished object, as
//! in llama.cpp and Ollama.

use crate::tokenizer::{Pieces, Tokenizer};
use crate::{Error, Result};

/// Deepest nesting of objects and arrays accepted.
pub const MAX_DEPTH: u8 = 64;
/// Most consecutive whitespace bytes accepted between tokens of the JSON.
pub const MAX_WHITESPACE: u8 = 32;

const LITERALS: [&[u8]; 3] = [b"true", b"false", b"null"];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

impl Num {
    fn step(self, b: u8) -> Option<Num> {
        use Num::*;
        let digit = b.is_ascii_digit();
        Some(match (self, b) {
            (Minus, b'0') => Zero,
            (Minus, _) if digit => Int,
            (Zero | Int, b'.') => Dot,
            (Zero | Int | Frac, b'e' | b'E') => E,
            (Int, _) if digit => Int,
            (Dot | Frac, _) if digit => Frac,
            (E, b'+' | b'-') => ESign,
            (E | ESign | Exp, _) if digit => Exp,
            _ => return None,
        })
    }

    /// Whether a number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object: whitespace or `{`.
    Start,
    /// A value must come (after `:` or an array's `,`).
    Value,
    /// Just after `[`: a value or `]`.
    ArrayFirst,
    /// Just after `{`: a key or `}`.
    ObjectFirst,
    /// After an object's `,`: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closing bracket of the container.
    After,
    /// Inside a string; `esc` is 0, 1 after `\`, 2..=5 while reading the
    /// hex digits of `\u`; `utf8` is the continuation bytes still expected,
    /// `lo`/`hi` the range the next one must be in; `sur` tracks UTF-16
    /// surrogates in `\u` escapes (see [`Sur`]).
    Str {
        key: bool,
        esc: u8,
        utf8: u8,
        lo: u8,
        hi: u8,
        sur: Sur,
    },
    Num(Num),
    /// Inside `true`, `false` or `null`: the literal and the next position.
    Lit {
        word: u8,
        pos: u8,
    },
    /// The top-level object is closed: nothing more.
    Done,
}

/// Surrogates in `\u` escapes: a high one (`\uD800`-`\uDBFF`) must be
/// followed at once by a low one (`\uDC00`-`\uDFFF`), and a low one may not
/// come alone. RFC 8259's grammar allows unpaired ones, but strict parsers
/// (serde_json, Go's) refuse them, so they are never generated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sur {
    /// Nothing pending.
    None,
    /// In a `\u` escape whose first digit was `D`.
    D,
    /// In the escape of a high surrogate (its second digit was 8-B).
    High,
    /// A high surrogate ended: `\` must come.
    WantBackslash,
    /// ... then `u`.
    WantU,
    /// In the low surrogate's escape: `D` must come.
    LowD,
    /// ... then C-F.
    LowC,
}

/// Where a JSON text stands after some bytes: the value of the automaton
/// (see the [module docs](self)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JsonState {
    mode: Mode,
    /// Bit `i` is set when the container at depth `i` is an object.
    stack: u64,
    depth: u8,
    /// Consecutive whitespace bytes so far.
    ws: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        JsonState::new()
    }
}

impl JsonState {
    /// Nothing read yet.
    pub fn new() -> JsonState {
        JsonState {
            mode: Mode::Start,
            stack: 0,
            depth: 0,
            ws: 0,
        }
    }

    /// Whether the top-level object is complete (nothing may follow).
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Before one JSON value of any kind (the structured-output automaton
    /// reads strings, literals, numbers and free objects or arrays with
    /// it): complete once the value is, except a number, whose end shows
    /// only in the byte after it (see [`value_complete`](Self::value_complete)).
    pub(crate) fn value_start() -> JsonState {
        JsonState {
            mode: Mode::Value,
            ..JsonState::new()
        }
    }

    /// Whether a value begun at [`value_start`](Self::value_start) could
    /// end here without being [complete](Self::is_complete): a number.
    pub(crate) fn value_complete(&self) -> bool {
        self.depth == 0 && matches!(self.mode, Mode::Num(n) if n.complete())
    }

    /// Whether inside a number.
    pub(crate) fn in_number(&self) -> bool {
        matches!(self.mode, Mode::Num(_))
    }

    /// The state after `bytes`, or `None` if they cannot continue a JSON object.
    pub fn feed(self, bytes: &[u8]) -> Option<JsonState> {
        bytes.iter().try_fold(self, |s, &b| s.step(b))
    }

    /// The state after one byte, or `None` if it cannot come next.
    pub fn step(mut self, b: u8) -> Option<JsonState> {
        match self.mode {
            Mode::Str {
                key,
                esc,
                utf8,
                lo,
                hi,
                sur,
            } => return self.string(key, (esc, utf8, lo, hi, sur), b),
            Mode::Num(n) => {
                if let Some(next) = n.step(b) {
                    self.mode = Mode::Num(next);
                    return Some(self);
                }
                if !n.complete() {
                    return None;
                }
                // The number ended; `b` is read after it.
                self.mode = Mode::After;
            }
            Mode::Lit { word, pos } => {
                let w = LITERALS[usize::from(word)];
                if w[usize::from(pos)] != b {
                    return None;
                }
                self.mode = if usize::from(pos) + 1 == w.len() {
                    self.after_value()
                } else {
                    Mode::Lit { word, pos: pos + 1 }
                };
                return Some(self);
            }
            _ => {}
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if self.mode == Mode::Done || self.ws >= MAX_WHITESPACE {
                return None;
            }
            self.ws += 1;
            return Some(self);
        }
        self.ws = 0;
        match (self.mode, b) {
            (Mode::Start, b'{') => self.open(true),
            (Mode::ArrayFirst, b']') => self.close(false),
            (Mode::Value | Mode::ArrayFirst, _) => self.value(b),
            (Mode::ObjectFirst, b'}') => self.close(true),
            (Mode::ObjectFirst | Mode::Key, b'"') => {
                self.mode = Mode::Str {
                    key: true,
                    esc: 0,
                    utf8: 0,
                    lo: 0,
                    hi: 0,
                    sur: Sur::None,
                };
                Some(self)
            }
            (Mode::Colon, b':') => {
                self.mode = Mode::Value;
                Some(self)
            }
            (Mode::After, b',') => {
                self.mode = if self.in_object() {
                    Mode::Key
                } else {
                    Mode::Value
                };
                Some(self)
            }
            (Mode::After, b'}') => self.close(true),
            (Mode::After, b']') => self.close(false),
            _ => None,
        }
    }

    /// After a string or literal: more of the container, or the end of a
    /// value read from [`value_start`](Self::value_start).
    fn after_value(&self) -> Mode {
        if self.depth == 0 {
            Mode::Done
        } else {
            Mode::After
        }
    }

    fn in_object(&self) -> bool {
        self.depth > 0 && self.stack & (1 << (self.depth - 1)) != 0
    }

    fn open(mut self, object: bool) -> Option<JsonState> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        if object {
            self.stack |= 1 << self.depth;
        } else {
            self.stack &= !(1 << self.depth);
        }
        self.depth += 1;
        self.mode = if object {
            Mode::ObjectFirst
        } else {
            Mode::ArrayFirst
        };
        Some(self)
    }

    fn close(mut self, object: bool) -> Option<JsonState> {
        if self.depth == 0 || self.in_object() != object {
            return None;
        }
        self.depth -= 1;
        self.mode = if self.depth == 0 {
            Mode::Done
        } else {
            Mode::After
        };
        Some(self)
    }

    /// The first byte of a value.
    fn value(mut self, b: u8) -> Option<JsonState> {
        self.mode = match b {
            b'{' => return self.open(true),
            b'[' => return self.open(false),
            b'"' => Mode::Str {
                key: false,
                esc: 0,
                utf8: 0,
                lo: 0,
                hi: 0,
                sur: Sur::None,
            },
            b'-' => Mode::Num(Num::Minus),
            b'0' => Mode::Num(Num::Zero),
            b'1'..=b'9' => Mode::Num(Num::Int),
            b't' => Mode::Lit { word: 0, pos: 1 },
            b'f' => Mode::Lit { word: 1, pos: 1 },
            b'n' => Mode::Lit { word: 2, pos: 1 },
            _ => return None,
        };
        Some(self)
    }

    /// One byte inside a string: escapes (surrogates paired, see [`Sur`]),
    /// control characters refused, UTF-8 checked as `str` does (no overlong
    /// forms, no surrogates, at most U+10FFFF).
    fn string(mut self, key: bool, st: (u8, u8, u8, u8, Sur), b: u8) -> Option<JsonState> {
        let (mut esc, mut utf8, mut lo, mut hi, mut sur) = st;
        if utf8 > 0 {
            if b < lo || b > hi {
                return None;
            }
            utf8 -= 1;
            (lo, hi) = (0x80, 0xBF);
        } else if esc == 1 {
            if sur == Sur::WantU {
                if b != b'u' {
                    return None;
                }
                (esc, sur) = (2, Sur::LowD);
            } else {
                esc = match b {
                    b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 0,
                    b'u' => 2,
                    _ => return None,
                };
            }
        } else if esc >= 2 {
            if !b.is_ascii_hexdigit() {
                return None;
            }
            let digit = (b as char).to_digit(16).unwrap_or(0);
            sur = match (sur, esc) {
                (Sur::None, 2) if digit == 0xD => Sur::D,
                (Sur::D, 3) if (0x8..=0xB).contains(&digit) => Sur::High,
                (Sur::D, 3) if digit >= 0xC => return None, // a lone low surrogate
                (Sur::D, 3) => Sur::None,
                (Sur::LowD, 2) if digit == 0xD => Sur::LowC,
                (Sur::LowD, 2) => return None,
                (Sur::LowC, 3) if digit >= 0xC => Sur::None,
                (Sur::LowC, 3) => return None,
                (other, _) => other,
            };
            esc = if esc == 5 { 0 } else { esc + 1 };
            if esc == 0 && sur == Sur::High {
                sur = Sur::WantBackslash;
            }
        } else if sur == Sur::WantBackslash {
            if b != b'\\' {
                return None;
            }
            (esc, sur) = (1, Sur::WantU);
        } else {
            match b {
                b'"' => {
                    self.mode = if key { Mode::Colon } else { self.after_value() };
                    return Some(self);
                }
                b'\\' => esc = 1,
                0x00..=0x1F => return None,
                0x20..=0x7F => {}
                0xC2..=0xDF => (utf8, lo, hi) = (1, 0x80, 0xBF),
                0xE0 => (utf8, lo, hi) = (2, 0xA0, 0xBF),
                0xE1..=0xEC | 0xEE..=0xEF => (utf8, lo, hi) = (2, 0x80, 0xBF),
                0xED => (utf8, lo, hi) = (2, 0x80, 0x9F),
                0xF0 => (utf8, lo, hi) = (3, 0x90, 0xBF),
                0xF1..=0xF3 => (utf8, lo, hi) = (3, 0x80, 0xBF),
                0xF4 => (utf8, lo, hi) = (3, 0x80, 0x8F),
                _ => return None,
            }
        }
        self.mode = Mode::Str {
            key,
            esc,
            utf8,
            lo,
            hi,
            sur,
        };
        Some(self)
    }
}

/// JSON mode over one tokenizer's vocabulary: which tokens may come next.
#[derive(Clone, Debug)]
pub struct JsonMode<'t> {
    pieces: &'t Pieces,
    state: JsonState,
}

impl<'t> JsonMode<'t> {
    /// JSON mode for `tok`'s vocabulary, at the start of the object (the
    /// token pieces are built once per tokenizer).
    pub fn new(tok: &'t Tokenizer) -> JsonMode<'t> {
        JsonMode {
            pieces: tok.pieces(),
            state: JsonState::new(),
        }
    }

    /// The current state.
    pub fn state(&self) -> JsonState {
        self.state
    }

    /// Whether the object is complete (generation should end).
    pub fn is_complete(&self) -> bool {
        self.state.is_complete()
    }

    /// Set to NaN the logit of every token that cannot come next: tokens
    /// whose bytes break the JSON, and tokens without bytes (control tokens,
    /// end of generation), which would not move it forward. Returns how many
    /// tokens remain; an error if none does.
    pub fn mask(&self, logits: &mut [f32]) -> Result<usize> {
        mask_tokens(self.pieces, logits, |p| self.state.feed(p).is_some()).ok_or_else(|| {
            Error::InvalidArgument(
                "JSON mode: no token of the vocabulary continues the JSON".into(),
            )
        })
    }

    /// Move past token `id` (one [`mask`](Self::mask) allowed).
    pub fn advance(&mut self, id: u32) -> Result<()> {
        self.state = self
            .pieces
            .get(id as usize)
            .and_then(|p| self.state.feed(p))
            .ok_or_else(|| {
                Error::InvalidArgument(format!("JSON mode: token {id} does not continue the JSON"))
            })?;
        Ok(())
    }
}

/// Sets to NaN the logit of every token whose piece is empty (control
/// tokens, end of generation: they would not move the text forward) or
/// refused by `ok`, and of every token without a piece; the number left, or
/// `None` if none is. The masking loop of [`JsonMode`] and
/// [`SchemaMode`](crate::json_schema::SchemaMode).
pub(crate) fn mask_tokens(
    pieces: &Pieces,
    logits: &mut [f32],
    mut ok: impl FnMut(&[u8]) -> bool,
) -> Option<usize> {
    let mut left = 0;
    for (id, logit) in logits.iter_mut().enumerate() {
        let allowed = pieces.get(id).is_some_and(|p| !p.is_empty() && ok(p));
        if allowed && !logit.is_nan() {
            left += 1;
        } else {
            *logit = f32::NAN;
        }
    }
    (left > 0).then_some(left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn complete(text: &str) -> bool {
        JsonState::new()
            .feed(text.as_bytes())
            .is_some_and(|s| s.is_complete())
    }

    fn prefix_ok(text: &[u8]) -> bool {
        JsonState::new().feed(text).is_some()
    }

    #[test]
    fn surrogate_escapes_come_in_pairs() {
        for (text, ok) in [
            (r#"{"a":"\ud83d\ude00"}"#, true),
            (r#"{"a":"\uD83D\uDE00x"}"#, true),
            (r#"{"a":"\u00e9\uD7FF\uE000\uffff"}"#, true),
            (r#"{"\ud800\udc00":1}"#, true),
            (r#"{"a":"\ud83d"}"#, false),
            (r#"{"a":"\ude00"}"#, false),
            (r#"{"a":"\ud83dx"}"#, false),
            (r#"{"a":"\ud83d\u0041"}"#, false),
            (r#"{"a":"\ud83d\n"}"#, false),
            (r#"{"a":"\ud83d\ud83d"}"#, false),
        ] {
            assert_eq!(complete(text), ok, "{text}");
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(text).is_ok(),
                ok,
                "{text}"
            );
        }
    }

    #[test]
    fn objects_are_accepted_and_everything_else_refused() {
        for ok in [
            "{}",
            " {\"a\": 1}",
            "{\"a\":[1,-2.5e+3,0,0.1,true,false,null,\"x\\n\\u00e9\\\"\",{}],\"b\":{\"c\":[]}}",
            "{\n  \"name\": \"Zoë 🙂\",\n  \"n\": -0E-0\n}",
            "{\"\":\"\"}",
        ] {
            assert!(complete(ok), "{ok}");
            assert!(
                serde_json::from_str::<serde_json::Value>(ok).is_ok(),
                "{ok}"
            );
        }
        for bad in [
            "[1]",
            "\"top\"",
            "1",
            "{\"a\" 1}",
            "{\"a\":01}",
            "{\"a\":1,}",
            "{\"a\":.5}",
            "{\"a\":1.}",
            "{\"a\":tru}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"\u{1}\"}",
            "{a:1}",
            "{\"a\":1]",
            "{\"a\":[1}",
            "{} {}",
            "{}x",
            "{\"a\":-}",
        ] {
            assert!(!complete(bad), "{bad}");
        }
        // Invalid UTF-8 inside strings: overlong, surrogate, past U+10FFFF, stray continuation.
        for bad in [
            &b"{\"a\":\"\xC0\xAF\"}"[..],
            b"{\"a\":\"\xED\xA0\x80\"}",
            b"{\"a\":\"\xF4\x90\x80\x80\"}",
            b"{\"a\":\"\x80\"}",
            b"{\"a\":\"\xE2\x82\"}",
        ] {
            assert!(JsonState::new().feed(bad).is_none_or(|s| !s.is_complete()));
        }
    }

    #[test]
    fn depth_and_whitespace_are_bounded() {
        let deep = |n: usize| format!("{{\"a\":{}{}}}", "[".repeat(n), "]".repeat(n));
        assert!(complete(&deep(usize::from(MAX_DEPTH) - 1)));
        assert!(!complete(&deep(usize::from(MAX_DEPTH))));
        let ws = |n: usize| format!("{{{}\"a\":1}}", " ".repeat(n));
        assert!(complete(&ws(usize::from(MAX_WHITESPACE))));
        assert!(!prefix_ok(ws(usize::from(MAX_WHITESPACE) + 1).as_bytes()));
    }

    const FRAGMENTS: [&str; 24] = [
        "{", "}", "[", "]", "\"", ":", ",", " ", "\n", "0", "1", "-", ".", "e", "+", "true",
        "null", "\\", "u", "a", "é", "\u{1}", "\"x\"", "12",
    ];

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::Value;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            (-1e12f64..1e12).prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map(any::<String>(), inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn serialised_objects_are_accepted(v in arb_json(), pretty in any::<bool>()) {
            let obj = serde_json::json!({ "v": v });
            let text = if pretty {
                serde_json::to_string_pretty(&obj).unwrap()
            } else {
                serde_json::to_string(&obj).unwrap()
            };
            prop_assert!(complete(&text), "{}", text);
        }

        #[test]
        fn the_automaton_agrees_with_serde_json(parts in prop::collection::vec(0usize..FRAGMENTS.len(), 0..24)) {
            // Texts made of JSON fragments (valid and not): the automaton
            // completes exactly the ones serde_json parses as an object, and
            // refuses a byte as soon as no object can follow.
            let mut text = b"{\"k\":".to_vec();
            for p in parts {
                text.extend_from_slice(FRAGMENTS[p].as_bytes());
            }
            let parsed = serde_json::from_slice::<serde_json::Value>(&text);
            // Valid JSON whose exponent overflows f64 is serde_json's limit, not JSON's.
            prop_assume!(!parsed.as_ref().is_err_and(|e| e.to_string().contains("out of range")));
            let state = JsonState::new().feed(&text);
            let trailing_ws = text.last().is_some_and(|b| b" \t\n\r".contains(b));
            let is_object = matches!(parsed, Ok(serde_json::Value::Object(_)));
            if !trailing_ws {
                prop_assert_eq!(state.is_some_and(|s| s.is_complete()), is_object,
                    "{:?}", String::from_utf8_lossy(&text));
            }
            if let Some(s) = state {
                // (serde_json reports a number cut short as invalid, not as EOF.)
                if !s.is_complete() && !matches!(s.mode, Mode::Num(_)) {
                    // An accepted prefix: serde_json says "EOF", not a syntax error.
                    let e = parsed.err();
                    prop_assert!(e.as_ref().is_some_and(|e| e.is_eof()),
                        "{:?}: {:?}", String::from_utf8_lossy(&text), e);
                }
            }
        }
    }
}
