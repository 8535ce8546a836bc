//! Local generation and scoring on top of an [`Engine`]: prompt processing in
//! batches, the decode loop with sampling and stop conditions, streaming of
//! text pieces as valid UTF-8, perplexity, and a throughput benchmark.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::chat::ChatMessage;
use crate::engine::GgmlErrorKind;
use crate::engine::{Engine, Logits};
use crate::json_mode::JsonMode;
use crate::json_schema::{JsonSchema, SchemaMode};
use crate::sampling::{Sampler, SamplerParams};
use crate::{Error, Result};

/// Tokens evaluated per graph while processing a prompt.
pub const DEFAULT_BATCH: usize = 512;

/// How a prompt is turned into tokens.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Plain text: BOS added if the model asks for it, special-token texts kept as text.
    Text(String),
    /// Text fed as is: special tokens like `<|im_start|>` are parsed; BOS only if the
    /// model's metadata asks for one.
    Raw(String),
    /// A conversation rendered with the model's chat template, ending with the
    /// assistant's turn.
    Chat(Vec<ChatMessage>),
    /// Already tokenized.
    Tokens(Vec<u32>),
}

/// Tokenize a [`Prompt`] for `engine`.
pub fn tokenize_prompt<E: Engine>(engine: &E, prompt: &Prompt) -> Result<Vec<u32>> {
    let tok = engine.tokenizer();
    // Text that already starts with the BOS token's text (a chat template that
    // writes it, or a raw prompt) gets no second BOS.
    let special_text = |text: &str| {
        let bos_text = tok
            .bos()
            .and_then(|b| tok.token_to_piece(b, true).ok())
            .filter(|p| !p.is_empty());
        let has_bos = bos_text.is_some_and(|b| text.as_bytes().starts_with(&b));
        tok.encode(text, !has_bos, true)
    };
    match prompt {
        Prompt::Text(s) => tok.encode(s, true, false),
        Prompt::Raw(s) => special_text(s),
        Prompt::Chat(messages) => special_text(&engine.chat_template().render(messages, true)?),
        Prompt::Tokens(t) => Ok(t.clone()),
    }
}

/// Settings of one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateParams {
    /// Maximum number of tokens to generate.
    pub max_tokens: usize,
    /// Sampling settings.
    pub sampler: SamplerParams,
    /// Keep generating past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Tokens evaluated per graph while processing the prompt.
    pub batch: usize,
    /// What the generated text must be: free text, or one JSON object.
    pub format: OutputFormat,
}

/// The shape the generated text is constrained to.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum OutputFormat {
    /// Whatever the model generates.
    #[default]
    Text,
    /// One JSON object: tokens that cannot continue one are never sampled, and
    /// generation ends ([`StopReason::EndOfGeneration`]) when it closes (see
    /// [`crate::json_mode`]). `max_tokens` may still cut it short.
    JsonObject,
    /// One JSON object that the schema accepts (structured output, see
    /// [`crate::json_schema`]); ends like [`OutputFormat::JsonObject`].
    JsonSchema(Arc<JsonSchema>),
}

/// The automaton of a constrained [`OutputFormat`].
enum Constraint<'t> {
    Json(JsonMode<'t>),
    Schema(SchemaMode<'t>),
}

impl Constraint<'_> {
    fn mask(&self, logits: &mut [f32]) -> Result<usize> {
        match self {
            Constraint::Json(j) => j.mask(logits),
            Constraint::Schema(s) => s.mask(logits),
        }
    }

    fn advance(&mut self, id: u32) -> Result<()> {
        match self {
            Constraint::Json(j) => j.advance(id),
            Constraint::Schema(s) => s.advance(id),
        }
    }

    fn is_complete(&self) -> bool {
        match self {
            Constraint::Json(j) => j.is_complete(),
            Constraint::Schema(s) => s.is_complete(),
        }
    }
}

impl Default for GenerateParams {
    fn default() -> Self {
        GenerateParams {
            max_tokens: 128,
            sampler: SamplerParams::default(),
            ignore_eos: false,
            batch: DEFAULT_BATCH,
            format: OutputFormat::Text,
        }
    }
}

/// Why a generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The model produced an end-of-generation token.
    EndOfGeneration,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The callback asked to stop.
    Callback,
    /// The cancellation flag was set.
    Cancelled,
}

/// Result of a generation.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOutput {
    /// The generated text (lossy UTF-8 of the generated tokens' bytes).
    pub text: String,
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The generated token ids (without the end-of-generation token).
    pub token_ids: Vec<u32>,
    /// Milliseconds spent evaluating the prompt.
    pub prompt_ms: f64,
    /// Milliseconds spent generating.
    pub generate_ms: f64,
    /// Why generation ended.
    pub stop: StopReason,
}

/// Splits a byte stream into valid UTF-8 pieces, holding back an incomplete
/// trailing character until its remaining bytes arrive.
#[derive(Debug, Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Append `bytes`; returns the text that is complete so far (may be empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let good = e.valid_up_to();
                    // SAFETY-free: the prefix is valid UTF-8 by construction.
                    out.push_str(&String::from_utf8_lossy(&self.pending[..good]));
                    match e.error_len() {
                        // Invalid bytes: replace them and go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..good + bad);
                        }
                        // Incomplete character at the end: keep it for later.
                        None => {
                            self.pending.drain(..good);
                            return out;
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left, with an incomplete character replaced.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

/// Evaluate `tokens` into the session in batches; returns the last token's logits.
/// `cancel` is checked before every [`CANCEL_UBATCH`] tokens ([`Error::Cancelled`]).
pub fn process_prompt<E: Engine>(
    engine: &E,
    session: &mut E::Session,
    tokens: &[u32],
    batch: usize,
    cancel: Option<&AtomicBool>,
) -> Result<Vec<f32>> {
    let mut forward = |t: &[u32], s: &mut E::Session| engine.forward(t, Logits::Last, s);
    prompt_with(session, tokens, batch, cancel, &mut forward)
}

fn prompt_with<S>(
    session: &mut S,
    tokens: &[u32],
    batch: usize,
    cancel: Option<&AtomicBool>,
    forward: &mut ForwardFn<'_, S>,
) -> Result<Vec<f32>> {
    if tokens.is_empty() {
        return Err(Error::InvalidArgument("the prompt has no tokens".into()));
    }
    let mut logits = Vec::new();
    for chunk in cancel_points(tokens, batch) {
        if cancel.is_some_and(|c| c.load(Ordering::Relaxed)) {
            return Err(Error::Cancelled);
        }
        logits = forward(chunk, session)?;
    }
    Ok(logits)
}

/// Most prompt tokens evaluated between two looks at the cancellation flag.
pub const CANCEL_UBATCH: usize = 64;

/// `tokens` in batches of at most `batch`, each cut into pieces of at most
/// [`CANCEL_UBATCH`] so a cancellation waits for one piece at most. No piece
/// of a multi-token batch is a single token (a 1-token tail joins the piece
/// before it): the engine's batched path gives the same logits however a
/// batch of two or more tokens is split, while a single token takes the
/// decode path, whose last bits differ (as upstream's do).
fn cancel_points(tokens: &[u32], batch: usize) -> impl Iterator<Item = &[u32]> {
    tokens.chunks(batch.max(1)).flat_map(|chunk| {
        let n = chunk.len();
        let pieces = n.div_ceil(CANCEL_UBATCH).max(1);
        // Equal pieces (sizes differ by at most one), so none is 1 token unless
        // the whole batch is.
        (0..pieces).map(move |i| &chunk[i * n / pieces..(i + 1) * n / pieces])
    })
}

/// Generate from `prompt_ids` appended to `session`, calling `on_text` with each
/// piece of text as it becomes valid UTF-8 (return `false` to stop; it is not
/// called again). `cancel` may be set from another thread: it is checked before
/// every [`CANCEL_UBATCH`] prompt tokens ([`Error::Cancelled`]) and between generated tokens
/// ([`StopReason::Cancelled`]).
pub fn generate<E: Engine>(
    engine: &E,
    session: &mut E::Session,
    prompt_ids: &[u32],
    params: &GenerateParams,
    cancel: Option<&AtomicBool>,
    on_text: &mut dyn FnMut(&str) -> bool,
) -> Result<GenerateOutput> {
    let mut forward = |tokens: &[u32], s: &mut E::Session| engine.forward(tokens, Logits::Last, s);
    generate_with(
        engine,
        session,
        prompt_ids,
        params,
        cancel,
        on_text,
        &mut forward,
    )
}

/// A forward pass for [`generate_with`]: evaluate `tokens` at the session's
/// current position and return the last token's logits.
pub type ForwardFn<'a, S> = dyn FnMut(&[u32], &mut S) -> Result<Vec<f32>> + 'a;

/// [`generate`] with the forward pass supplied by the caller (for example a
/// private forward whose projections are evaluated on secret shares).
pub fn generate_with<E: Engine>(
    engine: &E,
    session: &mut E::Session,
    prompt_ids: &[u32],
    params: &GenerateParams,
    cancel: Option<&AtomicBool>,
    on_text: &mut dyn FnMut(&str) -> bool,
    forward: &mut ForwardFn<'_, E::Session>,
) -> Result<GenerateOutput> {
    let mut sampler = Sampler::new(params.sampler.clone())?;
    let tok = engine.tokenizer();
    let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));

    // A prompt that cannot fit fails before anything is evaluated (the cache
    // is left as it was, and no time is spent on positions that cannot be used).
    let start = (0..engine.info().n_layers)
        .map(|l| engine.session_len(session, l))
        .max()
        .unwrap_or(0);
    let capacity = engine.session_capacity(session);
    if start.saturating_add(prompt_ids.len()) > capacity {
        return Err(Error::ContextOverflow {
            needed: start.saturating_add(prompt_ids.len()),
            capacity,
        });
    }
    let t0 = Instant::now();
    let mut logits = prompt_with(session, prompt_ids, params.batch, cancel, forward)?;
    let prompt_ms = t0.elapsed().as_secs_f64() * 1e3;

    let t1 = Instant::now();
    let mut history: Vec<u32> = prompt_ids.to_vec();
    let mut generated = Vec::new();
    let mut bytes = Vec::new();
    let mut stream = Utf8Stream::default();
    let mut stop = StopReason::MaxTokens;
    let mut json = match &params.format {
        OutputFormat::Text => None,
        OutputFormat::JsonObject => Some(Constraint::Json(JsonMode::new(tok))),
        OutputFormat::JsonSchema(s) => Some(Constraint::Schema(SchemaMode::new(tok, s.clone()))),
    };
    while generated.len() < params.max_tokens {
        if cancelled() {
            stop = StopReason::Cancelled;
            break;
        }
        let next = match &mut json {
            None => sampler.sample(&logits, &history)?,
            Some(j) => {
                j.mask(&mut logits)?;
                let next = sampler.sample(&logits, &history)?;
                j.advance(next)?;
                next
            }
        };
        if !params.ignore_eos && tok.is_eog(next) {
            stop = StopReason::EndOfGeneration;
            break;
        }
        generated.push(next);
        history.push(next);
        let piece = tok.token_to_piece(next, false)?;
        bytes.extend_from_slice(&piece);
        let text = stream.push(&piece);
        if !text.is_empty() && !on_text(&text) {
            stop = StopReason::Callback;
            break;
        }
        if json.as_ref().is_some_and(Constraint::is_complete) {
            // The object is closed: nothing may follow, so no forward pass.
            stop = StopReason::EndOfGeneration;
            break;
        }
        if generated.len() == params.max_tokens {
            break;
        }
        logits = forward(&[next], session)?;
    }
    // Flush an incomplete trailing character, unless the callback said stop.
    let rest = stream.finish();
    if !rest.is_empty() && stop != StopReason::Callback {
        on_text(&rest);
    }
    Ok(GenerateOutput {
        text: String::from_utf8_lossy(&bytes).into_owned(),
        prompt_ids: prompt_ids.to_vec(),
        token_ids: generated,
        prompt_ms,
        generate_ms: t1.elapsed().as_secs_f64() * 1e3,
        stop,
    })
}

/// Result of [`perplexity`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Perplexity {
    /// exp(mean negative log-likelihood) over the scored tokens.
    pub ppl: f64,
    /// Number of tokens scored.
    pub tokens: usize,
}

/// Perplexity of `tokens` in consecutive non-overlapping windows of `ctx` tokens
/// (a tail shorter than `ctx` is dropped). Each window starts from an empty cache
/// and every token but its first is scored. `progress(done, total)` is called after
/// each window.
pub fn perplexity<E: Engine>(
    engine: &E,
    tokens: &[u32],
    ctx: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    let mut session = engine.new_session(ctx.max(1))?;
    perplexity_in(engine, &mut session, tokens, ctx, batch, progress)
}

/// [`perplexity`] in a session the caller made (e.g. with LoRA adapters set);
/// it must hold at least `ctx` positions, and is truncated before each window.
pub fn perplexity_in<E: Engine>(
    engine: &E,
    session: &mut E::Session,
    tokens: &[u32],
    ctx: usize,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Perplexity> {
    if ctx < 2 {
        return Err(Error::InvalidArgument(format!(
            "window size {ctx}: expected at least 2"
        )));
    }
    let windows = tokens.len() / ctx;
    if windows == 0 {
        return Err(Error::InvalidArgument(format!(
            "the text has {} tokens, fewer than one window of {ctx}",
            tokens.len()
        )));
    }
    let n_vocab = engine.info().n_vocab;
    let mut nll = 0f64;
    let mut scored = 0usize;
    for (w, window) in tokens.chunks_exact(ctx).enumerate() {
        engine.truncate_session(session, 0);
        let mut done = 0;
        for chunk in window.chunks(batch.max(1)) {
            let logits = engine.forward(chunk, Logits::All, session)?;
            for (i, row) in logits.chunks_exact(n_vocab).enumerate() {
                let pos = done + i;
                let Some(&target) = window.get(pos + 1) else {
                    break;
                };
                nll -= log_softmax_at(row, target as usize);
                scored += 1;
            }
            done += chunk.len();
        }
        progress(w + 1, windows);
    }
    Ok(Perplexity {
        ppl: (nll / scored as f64).exp(),
        tokens: scored,
    })
}

fn log_softmax_at(row: &[f32], target: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row.get(target)
        .map_or(f64::NEG_INFINITY, |&v| v as f64 - max - sum.ln())
}

/// Throughput measured by [`bench()`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BenchResult {
    /// Prompt processing, tokens per second (median of the runs).
    pub pp_tps: f64,
    /// Generation (one token per step), tokens per second (median of the runs).
    pub tg_tps: f64,
}

/// llama-bench-like throughput: `prompt_tokens` in one batch from an empty cache,
/// then `gen_tokens` single-token steps; median of `runs` runs each.
pub fn bench<E: Engine>(
    engine: &E,
    session: &mut E::Session,
    prompt_tokens: usize,
    gen_tokens: usize,
    runs: usize,
) -> Result<BenchResult> {
    let n_vocab = engine.info().n_vocab as u32;
    // A deterministic spread of real token ids (avoid id 0 repeated).
    let tokens: Vec<u32> = (0..prompt_tokens.max(1) as u32)
        .map(|i| (i.wrapping_mul(2654435761) % n_vocab.max(1)).max(1))
        .collect();
    let mut pp = Vec::new();
    let mut tg = Vec::new();
    for _ in 0..runs.max(1) {
        engine.truncate_session(session, 0);
        let t = Instant::now();
        let logits = process_prompt(engine, session, &tokens, prompt_tokens.max(1), None)?;
        pp.push(tokens.len() as f64 / t.elapsed().as_secs_f64());
        check_finite(&logits)?;

        engine.truncate_session(session, 0);
        let t = Instant::now();
        let mut next = tokens[0];
        for _ in 0..gen_tokens {
            let logits = engine.forward(&[next], Logits::Last, session)?;
            next = crate::sampling::argmax(&logits)
                .ok_or_else(|| Error::ggml(GgmlErrorKind::NonFinite, "logits are all NaN"))?;
        }
        tg.push(gen_tokens as f64 / t.elapsed().as_secs_f64());
    }
    Ok(BenchResult {
        pp_tps: median(&mut pp),
        tg_tps: median(&mut tg),
    })
}

fn check_finite(logits: &[f32]) -> Result<()> {
    if logits.is_empty() || logits.iter().any(|v| !v.is_finite()) {
        return Err(Error::ggml(
            GgmlErrorKind::NonFinite,
            "the forward pass produced non-finite logits",
        ));
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_points_cover_the_prompt_in_small_multi_token_pieces() {
        for n in [1usize, 2, 63, 64, 65, 128, 129, 511, 512, 513, 1500] {
            for batch in [1usize, 7, 64, 512] {
                let tokens: Vec<u32> = (0..n as u32).collect();
                let pieces: Vec<&[u32]> = cancel_points(&tokens, batch).collect();
                assert_eq!(pieces.concat(), tokens, "n={n} batch={batch}");
                for p in &pieces {
                    assert!(p.len() <= CANCEL_UBATCH.min(batch), "n={n} batch={batch}");
                    // A single token only where the batch itself is one token.
                    assert!(p.len() >= 2 || batch == 1 || n % batch == 1 || n == 1);
                }
            }
        }
    }

    #[test]
    fn utf8_stream_holds_back_split_characters() {
        let mut s = Utf8Stream::default();
        let e = "é🙂".as_bytes();
        assert_eq!(s.push(&e[..1]), "");
        assert_eq!(s.push(&e[1..3]), "é");
        assert_eq!(s.push(&e[3..5]), "");
        assert_eq!(s.push(&e[5..]), "🙂");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn utf8_stream_replaces_invalid_bytes() {
        let mut s = Utf8Stream::default();
        assert_eq!(s.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(s.push(b"\xe2\x82"), "");
        assert_eq!(s.finish(), "\u{fffd}");
    }

    #[test]
    fn log_softmax_matches_definition() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f64 = row.iter().map(|&v| (v as f64).exp()).sum();
        let want = (2.0f64).exp().ln() - z.ln();
        assert!((log_softmax_at(&row, 1) - want).abs() < 1e-12);
    }

    #[test]
    fn median_of_three() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }
}
