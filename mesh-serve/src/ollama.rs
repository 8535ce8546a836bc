//! Ollama's API: `POST /api/chat`, `POST /api/generate` (NDJSON streams by
//! default, `stream: false` for one object), `GET /api/tags`, `POST
//! /api/show`, `GET /api/ps`, `GET /api/version`. Durations are in
//! nanoseconds, as Ollama's are. The final object of a generation carries a
//! `mesh` object saying where it was computed.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use mesh_core::chat::ChatMessage;
use mesh_core::engine::Engine;
use mesh_core::generate::{GenerateParams, OutputFormat, Prompt};
use mesh_core::json_schema::JsonSchema;
use mesh_core::sampling::SamplerParams;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    model_details, read_body, read_request, submit, ApiError, AppState, Event, Finish, Job, Summary,
};

/// Ollama's `options` (the ones mesh-llm honours; others are ignored, as
/// Ollama ignores options a model does not use).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct Options {
    pub temperature: Option<f32>,
    pub top_k: Option<i64>,
    pub top_p: Option<f32>,
    pub min_p: Option<f32>,
    pub repeat_penalty: Option<f32>,
    pub repeat_last_n: Option<i64>,
    pub seed: Option<i64>,
    /// Tokens to generate; -1 (the default) and -2: until the context is full.
    pub num_predict: Option<i64>,
    pub stop: Option<Vec<String>>,
}

/// A message of `/api/chat`.
#[derive(Clone, Debug, Deserialize)]
pub struct Message {
    pub role: String,
    #[serde(default)]
    pub content: String,
    #[serde(default)]
    pub images: Option<Vec<String>>,
    #[serde(default)]
    pub tool_calls: Option<Vec<Value>>,
}

/// `POST /api/chat`'s body.
#[derive(Clone, Debug, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub options: Option<Options>,
    #[serde(default)]
    pub format: Option<Value>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
}

/// `POST /api/generate`'s body.
#[derive(Clone, Debug, Deserialize)]
pub struct GenerateBody {
    pub model: String,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub suffix: Option<String>,
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub context: Option<Vec<u32>>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub raw: Option<bool>,
    #[serde(default)]
    pub format: Option<Value>,
    #[serde(default)]
    pub images: Option<Vec<String>>,
    #[serde(default)]
    pub options: Option<Options>,
}

/// `POST /api/show`'s body (`name` in older clients).
#[derive(Clone, Debug, Deserialize)]
pub struct ShowRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
}

/// RFC 3339 time (UTC) of `secs` since the epoch, with `nanos`.
pub fn rfc3339(secs: u64, nanos: u32) -> String {
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(t.as_secs(), t.subsec_nanos())
}

/// The sampler and token limit of `options` (Ollama's defaults otherwise:
/// temperature 0.8, top-k 40, top-p 0.9, no limit but the context).
fn settings(
    options: Option<Options>,
) -> Result<(SamplerParams, Option<usize>, Vec<String>), ApiError> {
    let o = options.unwrap_or_default();
    let nonneg = |name: &'static str, v: Option<i64>, default: usize| match v {
        None => Ok(default),
        Some(v) if v >= 0 => Ok(v as usize),
        Some(v) => Err(ApiError::bad_request(format!(
            "options.{name}: expected a number >= 0, found {v}"
        ))),
    };
    let params = SamplerParams {
        temperature: o.temperature.unwrap_or(0.8),
        top_k: nonneg("top_k", o.top_k, 40)?,
        top_p: o.top_p.unwrap_or(0.9),
        min_p: o.min_p.unwrap_or(0.0),
        repeat_penalty: o.repeat_penalty.unwrap_or(1.1),
        repeat_last_n: nonneg("repeat_last_n", o.repeat_last_n, 64)?,
        seed: o.seed.map(|s| s as u64).unwrap_or_else(super::random_seed),
    };
    params
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let max_tokens = match o.num_predict {
        None | Some(-1) | Some(-2) => None,
        Some(n) if n >= 0 => Some(n as usize),
        Some(n) => {
            return Err(ApiError::bad_request(format!(
                "options.num_predict: expected -1, -2 or a number >= 0, found {n}"
            )))
        }
    };
    Ok((params, max_tokens, o.stop.unwrap_or_default()))
}

/// A job of `prompt` with Ollama's `options`.
fn job(
    prompt: Prompt,
    options: Option<Options>,
    mode: super::Mode,
    format: OutputFormat,
) -> Result<Job, ApiError> {
    let (sampler, max_tokens, stops) = settings(options)?;
    Ok(Job {
        prompt,
        params: GenerateParams {
            sampler,
            format,
            ..GenerateParams::default()
        },
        max_tokens,
        stops,
        mode,
    })
}

/// Ollama's `format`: absent or `""` for text, `"json"` for one JSON object
/// (JSON mode), a JSON schema for structured output (a schema using what
/// [`mesh_core::json_schema`] does not enforce is refused, naming the
/// keyword, rather than half honoured).
fn output_format(format: &Option<Value>) -> Result<OutputFormat, ApiError> {
    match format {
        None | Some(Value::Null) => Ok(OutputFormat::Text),
        Some(Value::String(s)) if s.is_empty() => Ok(OutputFormat::Text),
        Some(Value::String(s)) if s == "json" => Ok(OutputFormat::JsonObject),
        Some(schema @ Value::Object(_)) => JsonSchema::compile(schema)
            .map(|s| OutputFormat::JsonSchema(Arc::new(s)))
            .map_err(|e| ApiError::bad_request(format!("format: {e}"))),
        Some(other) => Err(ApiError::bad_request(format!(
            "format: expected \"json\" or a JSON schema, found {other}"
        ))),
    }
}

fn done_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
        Finish::Cancelled => "cancelled",
    }
}

/// The counters of a final object.
fn final_fields(model: &str, s: &Summary, total_ns: u64) -> Value {
    json!({
        "model": model,
        "created_at": now(),
        "done": true,
        "done_reason": done_reason(s.finish),
        "total_duration": total_ns,
        "load_duration": 0,
        "prompt_eval_count": s.prompt_tokens,
        "prompt_eval_duration": (s.prompt_ms * 1e6) as u64,
        "eval_count": s.completion_tokens,
        "eval_duration": (s.generate_ms * 1e6) as u64,
        "mesh": s.mesh,
    })
}

/// Runs `job` and answers as Ollama does: an NDJSON stream of `piece(text)`
/// objects and a final object, or one object with the whole text.
async fn respond(
    state: Arc<AppState>,
    job: Job,
    model: String,
    stream: bool,
    piece: fn(&str, String) -> Value,
    whole: fn(&mut Value, String),
) -> Result<Response, ApiError> {
    let t0 = std::time::Instant::now();
    let mut handle = submit(&state, job)?;
    handle.started().await?;
    if !stream {
        let (text, s) = handle.collect().await?;
        let mut v = final_fields(&model, &s, t0.elapsed().as_nanos() as u64);
        whole(&mut v, text);
        return Ok(axum::Json(v).into_response());
    }
    let lines = futures::stream::unfold(Some(handle), move |h| {
        let model = model.clone();
        async move {
            let mut h = h?;
            loop {
                let line = match h.events.recv().await {
                    Some(Event::Text(t)) => piece(&model, t),
                    Some(Event::Done(Ok(s))) => {
                        let mut v = final_fields(&model, &s, t0.elapsed().as_nanos() as u64);
                        whole(&mut v, String::new());
                        let mut bytes = v.to_string().into_bytes();
                        bytes.push(b'\n');
                        return Some((Ok::<_, Infallible>(Bytes::from(bytes)), None));
                    }
                    Some(Event::Done(Err(e))) => {
                        let mut bytes = json!({"error": e.message}).to_string().into_bytes();
                        bytes.push(b'\n');
                        return Some((Ok(Bytes::from(bytes)), None));
                    }
                    Some(Event::Started { .. }) => continue,
                    None => return None,
                };
                let mut bytes = line.to_string().into_bytes();
                bytes.push(b'\n');
                return Some((Ok(Bytes::from(bytes)), Some(h)));
            }
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// The job of a chat request (everything but the model name); `None`:
/// no messages (Ollama's "load the model" call).
pub fn chat_job(r: &ChatRequest, mode: super::Mode) -> Result<Option<Job>, ApiError> {
    let format = output_format(&r.format)?;
    if r.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported("tools", "tools"));
    }
    if r.messages.is_empty() {
        return Ok(None);
    }
    let messages = r
        .messages
        .iter()
        .map(|m| {
            if m.images.as_ref().is_some_and(|i| !i.is_empty()) {
                return Err(ApiError::unsupported("messages", "images"));
            }
            if m.tool_calls.as_ref().is_some_and(|t| !t.is_empty()) || m.role == "tool" {
                return Err(ApiError::unsupported("messages", "tool calls"));
            }
            match m.role.as_str() {
                "system" | "user" | "assistant" => Ok(ChatMessage::new(&m.role, &m.content)),
                other => Err(ApiError::bad_request(format!(
                    "messages: unknown role {other:?} (expected system, user or assistant)"
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    job(Prompt::Chat(messages), r.options.clone(), mode, format).map(Some)
}

/// `POST /api/chat`.
pub async fn chat(State(state): State<Arc<AppState>>, req: Request) -> Response {
    match chat_inner(state, req).await {
        Ok(r) => r,
        Err(e) => e.ollama(),
    }
}

async fn chat_inner(state: Arc<AppState>, req: Request) -> Result<Response, ApiError> {
    let (r, mode, _) = read_request::<ChatRequest>(&state, req, |r| &r.model).await?;
    let Some(job) = chat_job(&r, mode)? else {
        // No messages: Ollama loads the model and answers at once.
        return Ok(axum::Json(json!({
            "model": r.model, "created_at": now(),
            "message": {"role": "assistant", "content": ""},
            "done": true, "done_reason": "load",
        }))
        .into_response());
    };
    respond(
        state,
        job,
        r.model,
        r.stream.unwrap_or(true),
        |model, text| {
            json!({"model": model, "created_at": now(),
                   "message": {"role": "assistant", "content": text}, "done": false})
        },
        |v, text| v["message"] = json!({"role": "assistant", "content": text}),
    )
    .await
}

/// The job of a generate request (everything but the model name); `None`:
/// an empty prompt (Ollama's "load the model" call).
pub fn generate_job(r: &GenerateBody, mode: super::Mode) -> Result<Option<Job>, ApiError> {
    let format = output_format(&r.format)?;
    if r.images.as_ref().is_some_and(|i| !i.is_empty()) {
        return Err(ApiError::unsupported("images", "images"));
    }
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported(
            "suffix",
            "suffix (fill in the middle)",
        ));
    }
    if r.template.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("template", "a template override"));
    }
    if r.context.as_ref().is_some_and(|c| !c.is_empty()) {
        return Err(ApiError::unsupported(
            "context",
            "context (deprecated by Ollama)",
        ));
    }
    let prompt = r.prompt.clone().unwrap_or_default();
    if prompt.is_empty() {
        return Ok(None);
    }
    let prompt = if r.raw == Some(true) {
        Prompt::Raw(prompt)
    } else {
        let system = r.system.clone().filter(|s| !s.is_empty());
        let system = system.map(|s| ChatMessage::new("system", s));
        Prompt::Chat(
            system
                .into_iter()
                .chain([ChatMessage::new("user", prompt)])
                .collect(),
        )
    };
    job(prompt, r.options.clone(), mode, format).map(Some)
}

/// `POST /api/generate`.
pub async fn generate(State(state): State<Arc<AppState>>, req: Request) -> Response {
    match generate_inner(state, req).await {
        Ok(r) => r,
        Err(e) => e.ollama(),
    }
}

async fn generate_inner(state: Arc<AppState>, req: Request) -> Result<Response, ApiError> {
    let (r, mode, _) = read_request::<GenerateBody>(&state, req, |r| &r.model).await?;
    let Some(job) = generate_job(&r, mode)? else {
        return Ok(axum::Json(json!({
            "model": r.model, "created_at": now(), "response": "",
            "done": true, "done_reason": "load",
        }))
        .into_response());
    };
    respond(
        state,
        job,
        r.model,
        r.stream.unwrap_or(true),
        |model, text| json!({"model": model, "created_at": now(), "response": text, "done": false}),
        |v, text| v["response"] = json!(text),
    )
    .await
}

/// The served model as `/api/tags` and `/api/ps` list it.
fn model_entry(state: &AppState) -> Value {
    let info = state.model.engine.info();
    json!({
        "name": state.model.name,
        "model": state.model.name,
        "modified_at": rfc3339(state.model.modified, 0),
        "size": info.file_size,
        "digest": info.id.to_hex(),
        "details": model_details(&state.model.engine),
    })
}

/// `GET /api/tags`.
pub async fn tags(State(state): State<Arc<AppState>>) -> Response {
    axum::Json(json!({"models": [model_entry(&state)]})).into_response()
}

/// `GET /api/ps`: the model is loaded for as long as the server runs.
pub async fn ps(State(state): State<Arc<AppState>>) -> Response {
    let mut m = model_entry(&state);
    m["expires_at"] = json!(rfc3339(u64::from(u32::MAX), 0));
    m["size_vram"] = json!(0);
    axum::Json(json!({"models": [m]})).into_response()
}

/// `GET /api/version`.
pub async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

/// `POST /api/show`.
pub async fn show(State(state): State<Arc<AppState>>, req: Request) -> Response {
    let r = match read_body::<ShowRequest>(&state, req).await {
        Ok(b) => b.value,
        Err(e) => return e.ollama(),
    };
    let Some(model) = r.model.or(r.name) else {
        return ApiError::bad_request("model: required").ollama();
    };
    if let Err(e) = state.resolve(&model) {
        return e.ollama();
    }
    let engine = &state.model.engine;
    let info = engine.info();
    let arch = &info.architecture;
    let template = engine.chat_template().source().to_owned();
    axum::Json(json!({
        "modelfile": format!("# mesh-llm serves {}\nFROM {}\n", state.model.name, state.model.stem),
        "parameters": "",
        "template": template,
        "details": model_details(engine),
        "model_info": {
            "general.architecture": arch,
            "general.name": info.name,
            "general.file_type": info.file_type.name(),
            format!("{arch}.block_count"): info.n_layers,
            format!("{arch}.context_length"): info.n_ctx_train,
            format!("{arch}.embedding_length"): info.n_embd,
            format!("{arch}.feed_forward_length"): info.n_ff,
            format!("{arch}.attention.head_count"): info.n_head,
            format!("{arch}.attention.head_count_kv"): info.n_head_kv,
            format!("{arch}.vocab_size"): info.n_vocab,
            "mesh.model_id": info.id.to_hex(),
        },
        "capabilities": ["completion"],
        "modified_at": rfc3339(state.model.modified, 0),
    }))
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_matches_known_dates() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.000000005Z");
        assert_eq!(rfc3339(1_798_761_599, 0), "2026-12-31T23:59:59.000000000Z");
    }

    #[test]
    fn options_map_to_the_sampler_and_bad_values_are_errors() {
        let o: Options =
            serde_json::from_value(json!({"temperature": 0, "num_predict": 5, "seed": 3,
                                          "stop": ["x"], "num_ctx": 2048}))
            .unwrap();
        let (p, max, stops) = settings(Some(o)).unwrap();
        assert_eq!(
            (p.temperature, p.seed, max, stops),
            (0.0, 3, Some(5), vec!["x".to_string()])
        );
        for bad in [
            json!({"num_predict": -3}),
            json!({"top_k": -1}),
            json!({"top_p": 2.0}),
        ] {
            let o: Options = serde_json::from_value(bad).unwrap();
            assert_eq!(settings(Some(o)).unwrap_err().status, 400);
        }
    }
}
