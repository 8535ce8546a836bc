//! Rendering a conversation with the model's own chat template.
//!
//! Models ship a Jinja chat template (the GGUF key `tokenizer.chat_template`,
//! taken from Hugging Face's `tokenizer_config.json`). [`ChatTemplate`]
//! renders it the way Hugging Face `transformers` does: `trim_blocks` and
//! `lstrip_blocks` on, loop controls, the variables `messages`,
//! `add_generation_prompt`, `bos_token` and `eos_token`, the function
//! `raise_exception(msg)`, a `tojson` filter that writes JSON as Python's
//! `json.dumps` does, and Python string, dict and list methods such as
//! `.strip()`, `.startswith()`, `.split()` and `.items()`.
//!
//! Templates come from model files and are untrusted. Rendering has one
//! budget, minijinja's fuel (`FUEL`), paid for every instruction and for
//! every byte of every string, list slot and output the template makes
//! (checked before big allocations); the methods and filters added here
//! (`split` as a filter and as Python's `split`, `rsplit` and `splitlines`,
//! and `tojson`) pay for what they make before they make it. With a recursion limit
//! and a cap on the output, a template can neither loop forever nor grow a
//! value (doubling a string in a namespace, squaring it with `replace`, ...)
//! past a few hundred megabytes: `tests/template_memory.rs` measures it.
//!
//! Values cannot hold themselves: namespaces are minijinja's only mutable
//! values, and the patched minijinja (`third_party/minijinja`) refuses to
//! store in one a value that contains it (or more than 10,000 values), so no
//! render recurses without end; renders run on a thread with a 64 MiB stack
//! for the finite nesting that is left.
//!
//! Known limits (minijinja 3.1's core, not reachable from here): a list
//! concatenated with itself more than 32 levels deep is built without fuel,
//! and values nested through a long chain of namespaces, each assigned a
//! shallow value, are not bounded in depth by anything but fuel. No real chat
//! template does either.

use std::fmt;
use std::io;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Serde, Value};
use minijinja::{Environment, ErrorKind};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use crate::{Error, Result};

/// Why a chat template could not be used ([`crate::Error::Template`]).
pub type TemplateError = crate::LayerError<TemplateErrorKind>;

/// The kinds of [`TemplateError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TemplateErrorKind {
    /// The template does not parse (the message gives the line).
    Syntax,
    /// Rendering failed: an undefined function or filter, a `raise_exception`,
    /// a type error, an exhausted limit.
    Render,
    /// The output is longer than the limit or is not valid UTF-8.
    Output,
}

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// Who speaks: usually `system`, `user` or `assistant`.
    pub role: String,
    /// What they say.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role` with `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Name under which the template is compiled; it shows in error messages.
const TEMPLATE_NAME: &str = "chat_template";

/// Fuel of one render. One fuel pays for an instruction or for 64 bytes of
/// data, so this is at most 2 million instructions and 128 MiB of strings,
/// lists and output made in all. Real templates use a few hundred
/// instructions per message and bytes a small multiple of the prompt's; this
/// stops endless loops well within a second.
const FUEL: u64 = 2_000_000;

/// Bytes one fuel pays for (minijinja's unit).
const BYTES_PER_FUEL: usize = 64;

/// Longest `indent` string or separator `tojson` accepts.
const MAX_JSON_PUNCTUATION: usize = 64;

/// Stack of the thread a render runs on (address space: only the pages a
/// render touches are used). minijinja renders nested values recursively,
/// and the patched minijinja (third_party/minijinja) lets a namespace hold at
/// most 10,000 values, so no value made by one assignment nests deeper.
const RENDER_STACK: usize = 64 << 20;

/// Nesting depth of macro calls, includes and loops one render may reach.
const RECURSION_LIMIT: usize = 64;

/// Bytes one render may produce.
const MAX_OUTPUT: usize = 64 << 20;

/// ChatML, used when a model has no template of its own. It is the template
/// `transformers` used as its default.
const CHATML: &str = "{% for message in messages %}\
{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}\
{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// A compiled chat template with the model's special tokens.
#[derive(Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    env: Environment<'static>,
}

impl fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compile the Jinja template `source`; `bos_token` and `eos_token` are
    /// the text of the model's special tokens, visible to the template.
    ///
    /// A syntax error is an [`Error::Template`] that gives the line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_error)?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(python_method);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_filter("split", split_filter);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(template_error)?;
        Ok(ChatTemplate {
            source: source.to_owned(),
            bos_token: bos_token.to_owned(),
            eos_token: eos_token.to_owned(),
            env,
        })
    }

    /// The ChatML template (`<|im_start|>role\ncontent<|im_end|>\n`), for
    /// models without a template of their own.
    pub fn chatml() -> ChatTemplate {
        match ChatTemplate::new(CHATML, "", "<|im_end|>") {
            Ok(template) => template,
            // CHATML is a constant checked by the tests.
            Err(err) => unreachable!("the built-in ChatML template does not compile: {err}"),
        }
    }

    /// The template's Jinja source.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render `messages` into a prompt. With `add_generation_prompt` the
    /// prompt ends with the header of an assistant turn, ready for generation.
    ///
    /// Errors raised by the template (`raise_exception`), bad operations and
    /// exhausted limits are [`Error::Template`] with the template's message.
    ///
    /// Runs on a thread of its own with a 64 MiB stack: values a
    /// template nests deeply are rendered recursively, and the caller's
    /// thread (an async worker, a host's thread) may have a small stack.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        std::thread::scope(|scope| {
            match std::thread::Builder::new()
                .name("mesh-template".into())
                .stack_size(RENDER_STACK)
                .spawn_scoped(scope, || self.render_here(messages, add_generation_prompt))
            {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                // No thread to be had: render on this one.
                Err(_) => self.render_here(messages, add_generation_prompt),
            }
        })
    }

    /// [`ChatTemplate::render`] on the calling thread.
    fn render_here(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(template_error)?;
        let ctx = minijinja::context! {
            messages => Value::from(Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        let mut out = LimitedWriter {
            buf: Vec::new(),
            overflowed: false,
            limit: MAX_OUTPUT,
        };
        let rendered = template.render_captured_to(ctx, &mut out);
        if out.overflowed {
            return Err(Error::template(
                TemplateErrorKind::Output,
                format!(
                    "expected at most {MAX_OUTPUT} bytes of output, the template produced more"
                ),
            ));
        }
        rendered.map_err(template_error)?;
        String::from_utf8(out.buf).map_err(|err| {
            Error::template(
                TemplateErrorKind::Output,
                format!("the output is not valid UTF-8: {err}"),
            )
        })
    }
}

/// Convert a minijinja error, with its causes, into [`Error::Template`]
/// (a syntax error, or one while rendering).
fn template_error(err: minijinja::Error) -> Error {
    let mut msg = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        source = cause.source();
    }
    let kind = match err.kind() {
        ErrorKind::SyntaxError | ErrorKind::BadEscape => TemplateErrorKind::Syntax,
        _ => TemplateErrorKind::Render,
    };
    Error::template(kind, msg)
}

/// Collects output and refuses to grow past `limit` bytes.
struct LimitedWriter {
    buf: Vec<u8>,
    overflowed: bool,
    limit: usize,
}

impl io::Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.buf.len().saturating_add(data.len()) > self.limit {
            self.overflowed = true;
            return Err(io::Error::other("template output too large"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Python's string, dict and list methods (minijinja-contrib's `pycompat`),
/// with the methods that make many values from one string (`split`,
/// `rsplit`, `splitlines`) paying their fuel before they allocate.
fn python_method(
    state: &mut minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> std::result::Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        match method {
            "split" | "rsplit" => pay_for_split(state, s, args.first().and_then(Value::as_str))?,
            "splitlines" => pay_for_items(state, s.lines().count())?,
            _ => {}
        }
    }
    minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
}

/// `value | split(sep=None, maxsplits=None)`: minijinja's filter, which
/// makes the whole list at once, after paying for its items.
fn split_filter(
    state: &minijinja::State,
    value: &Value,
    sep: Option<std::sync::Arc<str>>,
    maxsplits: Option<i64>,
) -> std::result::Result<Value, minijinja::Error> {
    if let Some(s) = value.as_str() {
        pay_for_split(state, s, sep.as_deref())?;
    }
    minijinja::filters::split(value, sep, maxsplits)
}

/// Pay for the items splitting `s` at `sep` (whitespace when `None`) can
/// make, before they are made.
fn pay_for_split(
    state: &minijinja::State,
    s: &str,
    sep: Option<&str>,
) -> std::result::Result<(), minijinja::Error> {
    let items = match sep {
        Some(sep) if !sep.is_empty() => s.matches(sep).count() + 1,
        _ => s.split_whitespace().count(),
    };
    pay_for_items(state, items)
}

/// Pay for `items` new values in a list: a value is 24 bytes plus its slot,
/// so one fuel (64 bytes' worth) each.
fn pay_for_items(
    state: &minijinja::State,
    items: usize,
) -> std::result::Result<(), minijinja::Error> {
    state.consume_fuel(items as u64)
}

/// `raise_exception(msg)`: abort rendering with `msg`, as in `transformers`.
fn raise_exception(msg: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `value | tojson(indent=None, separators=None, sort_keys=False,
/// ensure_ascii=False)`: JSON as Python's `json.dumps` writes it, which is
/// what `transformers` templates expect (`", "` and `": "` separators, no
/// HTML escaping).
///
/// The output pays its fuel, and a self-nested value cannot make it grow past
/// what the remaining fuel (and the output cap) would allow.
fn tojson(
    state: &minijinja::State,
    value: Value,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => Some(match v.as_str() {
            Some(s) => s.to_owned(),
            None => {
                let n = i64::try_from(v.clone()).map_err(|_| {
                    minijinja::Error::new(
                        ErrorKind::InvalidOperation,
                        format!("tojson: expected an integer or string indent, found {v}"),
                    )
                })?;
                " ".repeat(usize::try_from(n).unwrap_or(0).min(64))
            }
        }),
    };
    let too_long = |what: &str, len: usize| {
        minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: the {what} is {len} bytes long, at most {MAX_JSON_PUNCTUATION} are allowed"),
        )
    };
    if let Some(indent) = &indent {
        if indent.len() > MAX_JSON_PUNCTUATION {
            return Err(too_long("indent", indent.len()));
        }
    }
    if let Some(long) = separators
        .iter()
        .flatten()
        .find(|sep| sep.len() > MAX_JSON_PUNCTUATION)
    {
        return Err(too_long("separator", long.len()));
    }
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(other) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: expected two separators, found {}", other.len()),
            ))
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let formatter = PyFormatter {
        indent,
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        level: 0,
        has_value: false,
    };
    let budget = state
        .fuel_levels()
        .map_or(MAX_OUTPUT, |(_, left)| {
            usize::try_from(left).map_or(MAX_OUTPUT, |left| left.saturating_mul(BYTES_PER_FUEL))
        })
        .min(MAX_OUTPUT);
    let mut out = LimitedWriter {
        buf: Vec::new(),
        overflowed: false,
        limit: budget,
    };
    let mut ser = serde_json::Serializer::with_formatter(&mut out, formatter);
    let written = if sort_keys.unwrap_or(false) {
        serde_json::to_value(&value).and_then(|v| Sorted(&v).serialize(&mut ser))
    } else {
        value.serialize(&mut ser)
    };
    if out.overflowed {
        return Err(minijinja::Error::from(ErrorKind::OutOfFuel));
    }
    written.map_err(|err| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {err}"))
    })?;
    state.consume_fuel((out.buf.len() / BYTES_PER_FUEL) as u64)?;
    let json = String::from_utf8(out.buf).map_err(|err| {
        minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {err}"))
    })?;
    Ok(Value::from_safe_string(json))
}

/// Serializes a JSON value with every object's keys in sorted order,
/// whatever order the map keeps them in.
struct Sorted<'a>(&'a serde_json::Value);

impl Serialize for Sorted<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        match self.0 {
            serde_json::Value::Array(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Sorted(item))?;
                }
                seq.end()
            }
            serde_json::Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                let mut m = s.serialize_map(Some(entries.len()))?;
                for (k, v) in entries {
                    m.serialize_entry(k, &Sorted(v))?;
                }
                m.end()
            }
            other => other.serialize(s),
        }
    }
}

/// A `serde_json` formatter that lays out JSON like Python's `json.dumps`.
struct PyFormatter {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    level: usize,
    has_value: bool,
}

impl PyFormatter {
    fn newline<W: ?Sized + io::Write>(&self, w: &mut W) -> io::Result<()> {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.level {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn begin<W: ?Sized + io::Write>(&mut self, w: &mut W, open: &[u8]) -> io::Result<()> {
        self.level += 1;
        self.has_value = false;
        w.write_all(open)
    }

    fn end<W: ?Sized + io::Write>(&mut self, w: &mut W, close: &[u8]) -> io::Result<()> {
        self.level = self.level.saturating_sub(1);
        if self.has_value {
            self.newline(w)?;
        }
        w.write_all(close)
    }

    fn item<W: ?Sized + io::Write>(&mut self, w: &mut W, first: bool) -> io::Result<()> {
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin(w, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end(w, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.begin(w, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        self.end(w, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, w: &mut W) -> io::Result<()> {
        w.write_all(self.key_sep.as_bytes())
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _w: &mut W) -> io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        if !self.ensure_ascii || fragment.is_ascii() {
            return w.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tokenizer.chat_template` of SmolLM2-135M-Instruct, as stored in the
    /// GGUF of the default model.
    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}{% endif %}{{'<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{% endif %}";

    /// Llama 2 chat's template from `transformers`, which uses `.strip()` and
    /// `raise_exception`.
    const LLAMA2: &str = r#"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"#;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs
            .iter()
            .map(|(r, c)| ChatMessage::new(*r, *c))
            .collect()
    }

    #[test]
    fn smollm2_matches_transformers() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let m = msgs(&[("system", "You are terse."), ("user", "What is 2+2?")]);
        // Expected strings rendered by jinja2 3.1 set up as `transformers` does.
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&m[1..], false).unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        );
        assert_eq!(t.source(), SMOLLM2);
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::chatml();
        let m = msgs(&[
            ("system", "S"),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Bye"),
        ]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"
        );
        assert_eq!(
            t.render(&m[1..2], false).unwrap(),
            "<|im_start|>user\nHi<|im_end|>\n"
        );
    }

    #[test]
    fn llama2_with_strip_renders() {
        let t = ChatTemplate::new(LLAMA2, "<s>", "</s>").unwrap();
        let m = msgs(&[
            ("system", "Be brief."),
            ("user", "  Hello there  "),
            ("assistant", " Hi! \n"),
            ("user", "How are you?"),
        ]);
        assert_eq!(
            t.render(&m, true).unwrap(),
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n  Hello there [/INST] Hi! </s><s>[INST] How are you? [/INST]"
        );
    }

    #[test]
    fn raise_exception_is_a_template_error_with_the_message() {
        let t = ChatTemplate::new(LLAMA2, "<s>", "</s>").unwrap();
        let m = msgs(&[("user", "a"), ("user", "b")]);
        match t.render(&m, true) {
            Err(Error::Template(msg)) => assert!(
                msg.message().contains(
                    "Conversation roles must alternate user/assistant/user/assistant/..."
                ),
                "{msg}"
            ),
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn malformed_template_is_an_error_with_the_line() {
        let err = ChatTemplate::new("line one\n{% for m in messages %}\n{{ m.content }", "", "")
            .unwrap_err();
        match err {
            Error::Template(msg) => {
                assert_eq!(msg.kind(), TemplateErrorKind::Syntax);
                assert!(msg.message().contains(":3"), "{msg}");
            }
            other => panic!("expected a template error, got {other:?}"),
        }
        assert!(matches!(
            ChatTemplate::new("{% if x %}never closed", "", ""),
            Err(Error::Template(_))
        ));
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for message in messages %}\n    {% if message.role == 'user' %}\nU: {{ message.content }}\n    {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, "", "").unwrap();
        assert_eq!(
            t.render(
                &msgs(&[("user", "a"), ("assistant", "b"), ("user", "c")]),
                false
            )
            .unwrap(),
            "U: a\nU: c\n"
        );
    }

    #[test]
    fn python_methods_and_tojson_match_transformers() {
        let src = r#"{% for m in messages %}{{ m.content.split(',') | join('|') }};{{ m.content.startswith('a') }};{{ m.content.upper() }};{{ m.content.replace('a', 'x') }}
{% endfor %}{{ messages | tojson }}
{{ messages[0] | tojson(indent=2) }}
{{ {'b': 1, 'a': [1, 2.5, none, true]} | tojson(sort_keys=true) }}
{{ 'é<&>' | tojson }}{{ 'é' | tojson(ensure_ascii=true) }}
{% for k, v in messages[0].items() %}{{ k }}={{ v }} {% endfor %}
{% for m in messages %}{% if m.role == 'assistant' %}{% break %}{% endif %}{{ m.role }} {% endfor %}"#;
        let t = ChatTemplate::new(src, "", "").unwrap();
        let m = msgs(&[("user", "a,b,c"), ("assistant", "x")]);
        // Rendered by jinja2 3.1 with transformers' environment and tojson.
        let expected = "a|b|c;True;A,B,C;x,b,c\nx;False;X;x\n[{\"role\": \"user\", \"content\": \"a,b,c\"}, {\"role\": \"assistant\", \"content\": \"x\"}]\n{\n  \"role\": \"user\",\n  \"content\": \"a,b,c\"\n}\n{\"a\": [1, 2.5, null, true], \"b\": 1}\n\"\u{e9}<&>\"\"\\u00e9\"\nrole=user content=a,b,c user ";
        assert_eq!(t.render(&m, false).unwrap(), expected);
    }

    #[test]
    fn endless_templates_are_stopped() {
        let t = ChatTemplate::new(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}x{% endfor %}{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(matches!(t.render(&[], false), Err(Error::Template(_))));

        let t = ChatTemplate::new(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "",
            "",
        )
        .unwrap();
        assert!(matches!(t.render(&[], false), Err(Error::Template(_))));

        let t = ChatTemplate::new(
            "{% set s = 'x' * 10000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        match t.render(&[], false) {
            Err(Error::Template(msg)) => {
                assert_eq!(msg.kind(), TemplateErrorKind::Output);
                assert!(msg.message().contains("bytes of output"), "{msg}");
            }
            other => panic!("expected a template error, got {other:?}"),
        }
    }

    #[test]
    fn values_that_contain_themselves_are_errors() {
        // Found by fuzz/run.sh (chat_template): a namespace holding a tuple
        // that holds the namespace, then turned into a string.
        let t = ChatTemplate::new(
            "{% set ns = namespace(s=x) %}{% for i in range(68) %}{% set ns.s = ns, s ~ ns.s %}{% endfor %}{{ ns.lh }}",
            "",
            "",
        )
        .unwrap();
        assert!(matches!(t.render(&[], false), Err(Error::Template(_))));
    }

    #[test]
    fn values_nested_in_a_namespace_stay_shallow_enough_to_render() {
        // A namespace is the only place a value can grow across loop
        // iterations; one holding more than 10,000 values cannot be assigned
        // (the patched minijinja's cycle check gives up there), so nesting
        // stops before rendering it could exhaust even a 2 MiB thread stack.
        let render = |n: usize| {
            let t = ChatTemplate::new(
                &format!("{{% set ns = namespace(s=1) %}}{{% for i in range({n}) %}}{{% set ns.s = [ns.s] %}}{{% endfor %}}{{{{ ns.s|length }}}}{{{{ ns.s }}}}"),
                "",
                "",
            )
            .unwrap();
            std::thread::Builder::new()
                .stack_size(2 << 20)
                .spawn(move || t.render(&[], false))
                .unwrap()
                .join()
                .unwrap()
        };
        let deep = render(9_000).unwrap();
        assert!(
            deep.starts_with("1[[[[") && deep.ends_with("]]]]"),
            "{}",
            &deep[..20]
        );
        assert!(matches!(render(20_000), Err(Error::Template(_))));
    }

    #[test]
    fn special_tokens_are_visible() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}",
            "<s>",
            "</s>",
        )
        .unwrap();
        assert_eq!(
            t.render(&msgs(&[("user", "hi")]), false).unwrap(),
            "<s>hi</s>"
        );
    }

    #[test]
    fn template_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ChatTemplate>();
    }
}
