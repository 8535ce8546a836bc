//! mesh-serve: the HTTP host behind `mesh serve`, an HTTP host over a [`Node`] that speaks OpenAI's API
//! (`/v1/...`, [`openai`]) and Ollama's (`/api/...`, [`ollama`]), with a chat
//! page at `/` ([`PAGE`]).
//!
//! Every request becomes a [`Job`]: admitted if fewer than `queue` requests
//! are in flight (else 503 with the API's error shape), run once one of
//! `parallel` slots is free, each in its own KV session on a blocking thread
//! (the node's compute pool interleaves their graphs). Text reaches the
//! handler through a bounded channel; a client that goes away closes it,
//! which stops its generation at the next token. Shutdown stops accepting,
//! lets in-flight requests finish for a grace period, then cancels them.
//!
//! Untrusted input is bounded before it is parsed: bodies at most
//! `max_body` bytes (a larger `Content-Length` is refused before reading)
//! and read within [`BODY_TIMEOUT`], request headers within
//! [`ServeConfig::header_timeout`], at most [`MAX_CONNECTIONS`] connections.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use mesh_core::engine::{Engine, GgmlEngine};
use mesh_core::generate::{GenerateParams, Prompt};
use mesh_core::node::{GenerateRequest, Mode, Node, NodeOutput};
use serde_json::{json, Value};
use tokio::sync::{mpsc, Semaphore};

/// Errors of [`run`] and [`served_model`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub mod ollama;
pub mod openai;
pub mod stop;

/// The chat page, embedded in the binary.
pub const PAGE: &str = include_str!("page.html");
/// A connection must send its request headers within this time (default).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// A request body must arrive within this time.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 256;
/// Pieces of text buffered per request between generation and the client.
const CHANNEL: usize = 64;
/// A client that takes no text for this long (its buffer full) is dropped,
/// so a reader that stalls cannot hold a generation slot forever.
pub const STALLED_CLIENT: Duration = Duration::from_secs(60);

/// The settings of `mesh serve`.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Bearer key every API request must carry (`None`: open).
    pub api_key: Option<String>,
    /// Mode of requests that do not name one.
    pub mode: Mode,
    /// Private-mode helpers (and spares) when a request asks for private mode
    /// without saying how many.
    pub private: (usize, usize),
    /// Generations running at once.
    pub parallel: usize,
    /// Requests in flight at once (running and waiting); more get 503.
    pub queue: usize,
    /// Largest request body in bytes; larger gets 413.
    pub max_body: usize,
    /// Seconds in-flight requests may take to finish at shutdown before they are cancelled.
    pub grace: Duration,
    /// A connection must send its request headers within this time.
    pub header_timeout: Duration,
}

/// The model a server serves, and the names it answers to.
pub struct ServedModel {
    /// The main name (`default` for the default model, else the file stem).
    pub name: String,
    /// The node that generates (locally or across the mesh).
    pub node: Arc<Node>,
    /// This node's copy of the model.
    pub engine: Arc<GgmlEngine>,
    /// The GGUF file's modification time (seconds since the epoch).
    pub modified: u64,
    /// The file's name without its extension.
    pub stem: String,
}

impl ServedModel {
    /// The mode a model name asks for: `NAME`, `NAME:latest` (server default),
    /// `NAME:local`, `NAME:pipeline`, `NAME:private`; `None`: not this model.
    /// NAME is the main name, the file stem or the model id.
    pub fn mode_of(&self, requested: &str, default: Mode, private: (usize, usize)) -> Option<Mode> {
        let (base, tag) = match requested.rsplit_once(':') {
            Some((b, t)) => (b, Some(t)),
            None => (requested, None),
        };
        let id = self.engine.info().id.to_hex();
        let known = |n: &str| n == self.name || n == self.stem || n == id;
        if known(requested) {
            return Some(default);
        }
        if !known(base) {
            return None;
        }
        match tag? {
            "latest" => Some(default),
            "local" => Some(Mode::Local),
            "pipeline" => Some(Mode::Pipeline),
            "private" => Some(Mode::Private {
                helpers: private.0,
                spares: private.1,
            }),
            _ => None,
        }
    }
}

/// Shared by every handler.
pub struct AppState {
    pub model: ServedModel,
    pub config: ServeConfig,
    slots: Arc<Semaphore>,
    in_flight: AtomicUsize,
    running: AtomicUsize,
    served: AtomicU64,
    cancelled: AtomicU64,
    shutting_down: AtomicBool,
    /// Cancel flags of the running jobs (set at the end of the grace period).
    flags: Mutex<Vec<std::sync::Weak<AtomicBool>>>,
    started: Instant,
}

impl AppState {
    pub fn new(model: ServedModel, config: ServeConfig) -> Arc<AppState> {
        Arc::new(AppState {
            slots: Arc::new(Semaphore::new(config.parallel.max(1))),
            model,
            config,
            in_flight: AtomicUsize::new(0),
            running: AtomicUsize::new(0),
            served: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            shutting_down: AtomicBool::new(false),
            flags: Mutex::new(Vec::new()),
            started: Instant::now(),
        })
    }

    /// The mode `model` asks for, or the API's "unknown model" error.
    pub fn resolve(&self, model: &str) -> Result<Mode, ApiError> {
        self.model
            .mode_of(model, self.config.mode, self.config.private)
            .ok_or_else(|| ApiError::unknown_model(model))
    }

    /// Sets every running job's cancel flag.
    fn cancel_all(&self) {
        let flags = self.flags.lock().unwrap_or_else(|e| e.into_inner());
        for f in flags.iter().filter_map(|w| w.upgrade()) {
            f.store(true, Ordering::Relaxed);
        }
    }
}

/// An API error: a status code, a message, and the OpenAI error type and
/// code (Ollama's shape uses only the message).
#[derive(Clone, Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            kind,
            code: None,
            param: None,
        }
    }

    /// 400, `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    /// 400 naming an unsupported field.
    pub fn unsupported(param: &'static str, what: &str) -> ApiError {
        ApiError {
            param: Some(param),
            code: Some("unsupported_parameter"),
            ..ApiError::bad_request(format!("{what} is not supported by mesh-llm"))
        }
    }

    fn unknown_model(model: &str) -> ApiError {
        ApiError {
            code: Some("model_not_found"),
            param: Some("model"),
            ..ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("model '{model}' not found"),
            )
        }
    }

    fn from_core(e: mesh_core::Error) -> ApiError {
        use mesh_core::Error as E;
        let message = e.to_string();
        match e {
            E::InvalidArgument(_) | E::Tokenizer(_) | E::Template(_) => {
                ApiError::bad_request(message)
            }
            E::ContextOverflow { .. } => ApiError {
                code: Some("context_length_exceeded"),
                param: Some("messages"),
                ..ApiError::bad_request(message)
            },
            E::NotEnoughHelpers { .. }
            | E::Helper(_)
            | E::Network(_)
            | E::Pipeline(_)
            | E::Seal(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "mesh_unavailable", message)
            }
            E::Cancelled => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "cancelled", message),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message),
        }
    }

    /// OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai(&self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code,
        }});
        (self.status, axum::Json(body)).into_response()
    }

    /// Ollama's shape: `{"error": "..."}`.
    pub fn ollama(&self) -> Response {
        (self.status, axum::Json(json!({"error": self.message}))).into_response()
    }
}

/// A JSON body read within the size and time limits, parsed into `T` with
/// the API's error shape on failure. `raw` holds the body as JSON for
/// fields outside `T` (the `mesh` extension).
pub struct Body<T> {
    pub value: T,
    pub raw: Value,
}

/// Reads and parses a JSON body (see [`Body`]).
pub async fn read_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    req: Request,
) -> Result<Body<T>, ApiError> {
    let limit = state.config.max_body;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            format!("the request body is larger than {limit} bytes"),
        ));
    }
    let bytes = match tokio::time::timeout(BODY_TIMEOUT, Bytes::from_request(req, &())).await {
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
            ))
        }
        Ok(Err(e)) => {
            // The router's `DefaultBodyLimit` (set to `max_body`) ends a
            // body that grows past the limit with this status.
            let too_large = e.status() == StatusCode::PAYLOAD_TOO_LARGE;
            if too_large {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "invalid_request_error",
                    format!("the request body is larger than {limit} bytes"),
                ));
            }
            return Err(ApiError::bad_request(format!("reading the body: {e}")));
        }
        Ok(Ok(b)) => b,
    };
    parse_json(&bytes)
}

/// Reads a generation request: the body as `T` (and as JSON), and the mode
/// its model name and `mesh` field ask for (404 for another model).
pub async fn read_request<T: serde::de::DeserializeOwned>(
    state: &AppState,
    req: Request,
    model: fn(&T) -> &str,
) -> Result<(T, Mode, Value), ApiError> {
    let body = read_body::<T>(state, req).await?;
    let mode = state.resolve(model(&body.value))?;
    let mode = mesh_mode(&body.raw, mode, state.config.private)?;
    Ok((body.value, mode, body.raw))
}

/// Parses a request body: JSON, then `T` (pure; the fuzz target's entry).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<Body<T>, ApiError> {
    let raw: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid JSON: {e}")))?;
    if !raw.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    let value = T::deserialize(&raw).map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Body { value, raw })
}

/// The `mesh` extension of a request body: `{"mesh": {"mode": "private"}}`
/// overrides the mode the model name asks for.
pub fn mesh_mode(raw: &Value, mode: Mode, private: (usize, usize)) -> Result<Mode, ApiError> {
    match raw.get("mesh").and_then(|m| m.get("mode")) {
        None | Some(Value::Null) => Ok(mode),
        Some(Value::String(s)) => match s.as_str() {
            "local" => Ok(Mode::Local),
            "pipeline" => Ok(Mode::Pipeline),
            "private" => Ok(Mode::Private {
                helpers: private.0,
                spares: private.1,
            }),
            other => Err(ApiError::bad_request(format!(
                "mesh.mode: expected local, pipeline or private, found {other:?}"
            ))),
        },
        Some(other) => Err(ApiError::bad_request(format!(
            "mesh.mode: expected a string, found {other}"
        ))),
    }
}

/// `"ignore_eos": true` (as llama.cpp's server takes it): generate past
/// end-of-generation tokens, up to `max_tokens` (benchmarks).
pub fn ignore_eos(raw: &Value) -> bool {
    raw.get("ignore_eos")
        .and_then(Value::as_bool)
        .unwrap_or(false)
}

/// The mode's name in responses.
pub fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Local => "local",
        Mode::Pipeline => "pipeline",
        Mode::Private { .. } => "private",
    }
}

/// One generation asked of the server.
#[derive(Debug)]
pub struct Job {
    pub prompt: Prompt,
    pub params: GenerateParams,
    /// `None`: as many tokens as the context holds.
    pub max_tokens: Option<usize>,
    pub stops: Vec<String>,
    pub mode: Mode,
}

/// Why a job's text ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// End-of-generation token or a stop string.
    Stop,
    /// The token limit (or the context) was reached.
    Length,
    /// Cancelled (client gone or shutdown).
    Cancelled,
}

/// How a finished job went.
#[derive(Clone, Debug)]
pub struct Summary {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub finish: Finish,
    pub prompt_ms: f64,
    pub generate_ms: f64,
    pub queued_ms: f64,
    /// Where it was computed (`mode`, and the plan or helpers).
    pub mesh: Value,
}

/// What a job sends to its handler.
pub enum Event {
    /// Admitted, tokenized and about to run.
    Started { prompt_tokens: usize },
    /// A piece of text.
    Text(String),
    /// The end: a summary or an error.
    Done(Result<Summary, ApiError>),
}

/// A running job's events; dropping it cancels the job.
pub struct JobHandle {
    pub events: mpsc::Receiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl Drop for JobHandle {
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
}

impl JobHandle {
    /// Waits for the job to start; an error before any text becomes the
    /// response's status.
    pub async fn started(&mut self) -> Result<usize, ApiError> {
        match self.events.recv().await {
            Some(Event::Started { prompt_tokens }) => Ok(prompt_tokens),
            Some(Event::Done(Err(e))) => Err(e),
            _ => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the generation ended before it started",
            )),
        }
    }

    /// Collects the whole text (non-streaming responses).
    pub async fn collect(&mut self) -> Result<(String, Summary), ApiError> {
        let mut text = String::new();
        while let Some(e) = self.events.recv().await {
            match e {
                Event::Text(t) => text.push_str(&t),
                Event::Done(r) => return r.map(|s| (text, s)),
                Event::Started { .. } => {}
            }
        }
        Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the generation stopped without a result",
        ))
    }
}

/// Counts one while alive (also when a generation panics).
struct Counted<'a>(&'a AtomicUsize);

impl<'a> Counted<'a> {
    fn new(n: &'a AtomicUsize) -> Counted<'a> {
        n.fetch_add(1, Ordering::AcqRel);
        Counted(n)
    }
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Decrements the in-flight count when a request leaves.
struct Admitted(Arc<AppState>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Admits `job` (503 if `queue` requests are in flight or the server is
/// shutting down) and starts it; events arrive on the handle.
pub fn submit(state: &Arc<AppState>, job: Job) -> Result<JobHandle, ApiError> {
    if state.shutting_down.load(Ordering::Relaxed) {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_shutting_down",
            "the server is shutting down",
        ));
    }
    let limit = state.config.queue.max(1);
    let admitted = state
        .in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .is_ok();
    if !admitted {
        return Err(ApiError {
            code: Some("queue_full"),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_busy",
                format!("the server is busy ({limit} requests in flight); retry later"),
            )
        });
    }
    let guard = Admitted(state.clone());
    let (tx, rx) = mpsc::channel(CHANNEL);
    let cancel = Arc::new(AtomicBool::new(false));
    let flag = cancel.clone();
    let state = state.clone();
    let queued = Instant::now();
    tokio::spawn(async move {
        // Wait for a slot, unless the client leaves first.
        let permit = tokio::select! {
            p = state.slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = tx.closed() => return,
        };
        let queued_ms = queued.elapsed().as_secs_f64() * 1e3;
        state
            .flags
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(&flag));
        let st = state.clone();
        let result = tokio::task::spawn_blocking(move || {
            let running = Counted::new(&st.running);
            let r = run_job(&st, job, &flag, &tx, queued_ms);
            drop(running);
            if matches!(&r, Ok(s) if s.finish == Finish::Cancelled) {
                st.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            st.served.fetch_add(1, Ordering::Relaxed);
            st.flags
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), Arc::as_ptr(&flag)));
            // Free the slot and the queue place before the client hears the
            // end, so a client that sends its next request at once finds them.
            drop(permit);
            drop(guard);
            let _ = send(&tx, Event::Done(r));
        })
        .await;
        if let Err(e) = result {
            eprintln!("mesh serve: a generation panicked: {e}");
        }
    });
    Ok(JobHandle { events: rx, cancel })
}

/// Sends `event` from a generation thread; `false` if the client is gone or
/// took nothing for [`STALLED_CLIENT`].
fn send(tx: &mpsc::Sender<Event>, event: Event) -> bool {
    use mpsc::error::TrySendError;
    let deadline = Instant::now() + STALLED_CLIENT;
    let mut event = event;
    loop {
        match tx.try_send(event) {
            Ok(()) => return true,
            Err(TrySendError::Closed(_)) => return false,
            Err(TrySendError::Full(e)) if Instant::now() < deadline => {
                event = e;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(TrySendError::Full(_)) => return false,
        }
    }
}

/// Runs one job on this (blocking) thread.
fn run_job(
    state: &AppState,
    job: Job,
    cancel: &AtomicBool,
    tx: &mpsc::Sender<Event>,
    queued_ms: f64,
) -> Result<Summary, ApiError> {
    let engine = &state.model.engine;
    let prompt_ids = mesh_core::generate::tokenize_prompt(&**engine, &job.prompt)
        .map_err(ApiError::from_core)?;
    let n_ctx_train = engine.info().n_ctx_train;
    if prompt_ids.len() >= n_ctx_train {
        return Err(ApiError::from_core(mesh_core::Error::ContextOverflow {
            needed: prompt_ids.len() + 1,
            capacity: n_ctx_train,
        }));
    }
    if prompt_ids.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty"));
    }
    let room = n_ctx_train - prompt_ids.len();
    let max_tokens = job.max_tokens.unwrap_or(room).min(room);
    let mut params = job.params;
    params.max_tokens = max_tokens;
    let request = GenerateRequest {
        prompt: Prompt::Tokens(prompt_ids.clone()),
        params,
        n_ctx: Some(prompt_ids.len() + max_tokens),
        adapters: Vec::new(),
    };
    if !send(
        tx,
        Event::Started {
            prompt_tokens: prompt_ids.len(),
        },
    ) {
        return Ok(cancelled_summary(prompt_ids.len(), queued_ms, job.mode));
    }
    let mut filter = stop::StopFilter::new(job.stops);
    let mut stopped_by_string = false;
    let mut client_gone = false;
    let mut on_text = |piece: &str| {
        let (text, stopped) = filter.push(piece);
        if !text.is_empty() && !send(tx, Event::Text(text)) {
            client_gone = true;
            return false;
        }
        if stopped {
            stopped_by_string = true;
        }
        !stopped
    };
    let out = state
        .model
        .node
        .generate(engine, &request, job.mode, Some(cancel), &mut on_text);
    let out = match out {
        Err(mesh_core::Error::Cancelled) => {
            return Ok(cancelled_summary(prompt_ids.len(), queued_ms, job.mode))
        }
        r => r.map_err(ApiError::from_core)?,
    };
    if !stopped_by_string && !client_gone {
        let rest = filter.finish();
        if !rest.is_empty() {
            let _ = send(tx, Event::Text(rest));
        }
    }
    use mesh_core::generate::StopReason;
    let finish = match out.output.stop {
        _ if stopped_by_string => Finish::Stop,
        StopReason::EndOfGeneration => Finish::Stop,
        StopReason::MaxTokens => Finish::Length,
        StopReason::Callback | StopReason::Cancelled => Finish::Cancelled,
    };
    Ok(Summary {
        prompt_tokens: prompt_ids.len(),
        completion_tokens: out.output.token_ids.len(),
        finish,
        prompt_ms: out.output.prompt_ms,
        generate_ms: out.output.generate_ms,
        queued_ms,
        mesh: mesh_json(&out),
    })
}

fn cancelled_summary(prompt_tokens: usize, queued_ms: f64, mode: Mode) -> Summary {
    Summary {
        prompt_tokens,
        completion_tokens: 0,
        finish: Finish::Cancelled,
        prompt_ms: 0.0,
        generate_ms: 0.0,
        queued_ms,
        mesh: json!({"mode": mode_name(mode)}),
    }
}

/// Where a generation was computed, for responses and the chat page.
pub fn mesh_json(out: &NodeOutput) -> Value {
    let mut v = json!({"mode": mode_name(out.mode)});
    let tokens = out.output.token_ids.len();
    if tokens > 0 && out.output.generate_ms > 0.0 {
        v["tokens_per_second"] = json!(tokens as f64 / (out.output.generate_ms / 1e3));
    }
    if let Some(p) = &out.pipeline {
        v["plan"] = mesh_core::node::hops_json(&p.plan);
        v["hop_ms"] = json!(p.stats.hop_ms());
        v["failovers"] = json!(p.stats.failovers);
        v["bytes_per_token"] = json!(p.stats.bytes_per_token());
    }
    if let Some(r) = &out.private {
        let steps = r.decode_steps.max(1) as f64;
        v["helpers"] = json!(r
            .active
            .iter()
            .filter_map(|&i| r.helpers.get(i))
            .map(|p| p.to_string())
            .collect::<Vec<_>>());
        v["helpers_dropped"] = json!(r.dropped.len());
        v["bytes_per_token"] =
            json!((r.decode.bytes_sent + r.decode.bytes_received) as f64 / steps);
        v["round_trips_per_token"] = json!(r.decode.round_trips as f64 / steps);
    }
    v
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A fresh random seed (requests that give none are not reproducible, as
/// with OpenAI and Ollama).
pub fn random_seed() -> u64 {
    rand::random()
}

/// Checks the bearer key (when one is set).
fn authorized(state: &AppState, headers: &HeaderMap) -> bool {
    let Some(key) = &state.config.api_key else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Constant-time comparison: the key's bytes do not leak through timing.
    given.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes()
                .zip(key.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

async fn auth(
    State(state): State<Arc<AppState>>,
    req: Request,
    next: axum::middleware::Next,
) -> Response {
    if authorized(&state, req.headers()) {
        return next.run(req).await;
    }
    let e = ApiError {
        code: Some("invalid_api_key"),
        ..ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "missing or wrong API key (Authorization: Bearer KEY)",
        )
    };
    if req.uri().path().starts_with("/api/") {
        e.ollama()
    } else {
        e.openai()
    }
}

/// `GET /mesh/v1/status`: the server's counters.
async fn status(State(state): State<Arc<AppState>>) -> Response {
    let info = state.model.engine.info();
    axum::Json(json!({
        "model": state.model.name,
        "model_id": info.id.to_hex(),
        "mode": mode_name(state.config.mode),
        "peer_id": state.model.node.peer_id().to_string(),
        "in_flight": state.in_flight.load(Ordering::Acquire),
        "running": state.running.load(Ordering::Acquire),
        "served": state.served.load(Ordering::Relaxed),
        "cancelled": state.cancelled.load(Ordering::Relaxed),
        "parallel": state.config.parallel,
        "queue": state.config.queue,
        "uptime_s": state.started.elapsed().as_secs_f64(),
    }))
    .into_response()
}

/// The router: the page, OpenAI's and Ollama's routes, and the status.
pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/completions", post(openai::completions))
        .route("/v1/models", get(openai::models))
        .route("/v1/models/{model}", get(openai::model))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/mesh/v1/status", get(status))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        // Ollama clients probe these two without a key.
        .route("/api/version", get(ollama::version))
        .route("/api", get(|| async { "Ollama is running" }))
        .merge(api)
        // axum's own limit (2 MiB by default) bounds every body read; make
        // it the configured one.
        .layer(axum::extract::DefaultBodyLimit::max(state.config.max_body))
        .fallback(|req: Request| async move {
            let e = ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("no route {} {}", req.method(), req.uri().path()),
            );
            if req.uri().path().starts_with("/api/") {
                e.ollama()
            } else {
                e.openai()
            }
        })
        .with_state(state)
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops
/// accepting, waits up to the grace period for in-flight requests, cancels
/// the rest and returns once every connection is closed.
pub async fn run(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), BoxError> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;

    let app = router(state.clone());
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(state.config.header_timeout)
        .max_buf_size(64 * 1024);
    let builder = builder.http1_only();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = connections.clone().acquire_owned() => p?,
            _ = &mut shutdown => break,
        };
        let (stream, _peer) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait, do not spin.
                    eprintln!("mesh serve: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
        let conn = graceful.watch(conn.into_owned());
        tokio::spawn(async move {
            let _permit = permit;
            let _ = conn.await;
        });
    }
    drop(listener);
    state.shutting_down.store(true, Ordering::Relaxed);
    eprintln!(
        "mesh serve: shutting down ({} requests in flight)",
        state.in_flight.load(Ordering::Acquire)
    );
    let grace = state.config.grace;
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    if tokio::time::timeout(grace, &mut drained).await.is_err() {
        state.cancel_all();
        let _ = tokio::time::timeout(Duration::from_secs(10), drained).await;
    }
    Ok(())
}

/// The chat page's and the APIs' common description of the served model.
pub fn model_details(engine: &GgmlEngine) -> Value {
    let info = engine.info();
    json!({
        "parent_model": "",
        "format": "gguf",
        "family": info.architecture,
        "families": [info.architecture],
        "parameter_size": parameter_size(engine),
        "quantization_level": info.file_type.name(),
    })
}

/// The parameter count in Ollama's style (`135M`, `1.5B`).
fn parameter_size(engine: &GgmlEngine) -> String {
    let i = engine.info();
    let (e, h) = (i.n_embd as f64, (i.n_head * i.head_dim) as f64);
    let kv = (i.n_head_kv * i.head_dim) as f64;
    let layer = 2.0 * e * h + 2.0 * e * kv + 3.0 * e * i.n_ff as f64 + 2.0 * e;
    let vocab = i.n_vocab as f64 * e * if i.tied_output { 1.0 } else { 2.0 };
    let n = vocab + i.n_layers as f64 * layer + e;
    if n >= 1e9 {
        format!("{:.1}B", n / 1e9)
    } else {
        format!("{:.0}M", n / 1e6)
    }
}

/// The served model for `path` (named `name`, else `default` for the
/// default model, else the file stem).
pub fn served_model(
    path: &std::path::Path,
    name: Option<String>,
    spec: &str,
    engine: GgmlEngine,
    node: Node,
) -> Result<ServedModel, BoxError> {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let name = name.unwrap_or_else(|| {
        if spec == "default" {
            "default".into()
        } else {
            stem.clone()
        }
    });
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(format!("--name {name:?}: expected a name without spaces").into());
    }
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(ServedModel {
        name,
        node: Arc::new(node),
        engine: Arc::new(engine),
        modified,
        stem,
    })
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

/// Every request parser on `data` as a body of each endpoint, with the
/// checks that need no model (the fuzz target's entry; never panics).
/// Returns how many parsed into a job.
pub fn parse_requests(data: &[u8]) -> usize {
    use async_openai::types::chat::CreateChatCompletionRequest;
    use async_openai::types::completions::CreateCompletionRequest;
    let mode = Mode::Local;
    let mut jobs = 0;
    if let Ok(b) = parse_json::<CreateChatCompletionRequest>(data) {
        let _ = mesh_mode(&b.raw, mode, (2, 0));
        jobs += usize::from(openai::chat_job(&b.value, mode).is_ok());
    }
    if let Ok(b) = parse_json::<CreateCompletionRequest>(data) {
        jobs += usize::from(openai::completion_job(&b.value, mode, 49_152).is_ok());
    }
    if let Ok(b) = parse_json::<ollama::ChatRequest>(data) {
        jobs += usize::from(matches!(ollama::chat_job(&b.value, mode), Ok(Some(_))));
    }
    if let Ok(b) = parse_json::<ollama::GenerateBody>(data) {
        jobs += usize::from(matches!(ollama::generate_job(&b.value, mode), Ok(Some(_))));
    }
    let _ = parse_json::<ollama::ShowRequest>(data);
    // A schema in the body (Ollama's `format`, OpenAI's `response_format`):
    // the automaton it compiles to reads the body's own bytes.
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        let schemas = [
            v.get("format"),
            v.pointer("/response_format/json_schema/schema"),
        ];
        for schema in schemas.into_iter().flatten() {
            if let Ok(s) = mesh_core::json_schema::JsonSchema::compile(schema) {
                let state = mesh_core::json_schema::SchemaState::new(Arc::new(s));
                let _ = state.feed(data).map(|s| s.is_complete());
            }
        }
    }
    jobs
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parsers_take_each_apis_requests() {
        let chat = br#"{"model": "m", "messages": [{"role": "system", "content": "s"},
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "stop": "x", "max_completion_tokens": 5, "seed": 7, "temperature": 0.5}"#;
        let b = parse_json::<async_openai::types::chat::CreateChatCompletionRequest>(chat).unwrap();
        let job = openai::chat_job(&b.value, Mode::Local).unwrap();
        assert_eq!(job.max_tokens, Some(5));
        assert_eq!(job.stops, vec!["x".to_string()]);
        assert_eq!(
            (job.params.sampler.seed, job.params.sampler.temperature),
            (7, 0.5)
        );
        match job.prompt {
            Prompt::Chat(m) => {
                assert_eq!(m.len(), 2);
                assert_eq!(m[1].content, "ab");
            }
            p => panic!("{p:?}"),
        }
        let ollama = br#"{"model": "m", "prompt": "hi", "system": "be brief", "options": {"num_predict": 3}}"#;
        let b = parse_json::<ollama::GenerateBody>(ollama).unwrap();
        let job = ollama::generate_job(&b.value, Mode::Local)
            .unwrap()
            .unwrap();
        assert_eq!(job.max_tokens, Some(3));
        assert!(matches!(job.prompt, Prompt::Chat(ref m) if m.len() == 2));
        assert_eq!(parse_requests(chat), 1);
    }

    #[test]
    fn mesh_extension_and_model_suffix_pick_the_mode() {
        let raw = serde_json::json!({"mesh": {"mode": "private"}});
        assert_eq!(
            mesh_mode(&raw, Mode::Local, (3, 1)).unwrap(),
            Mode::Private {
                helpers: 3,
                spares: 1
            }
        );
        let bad = serde_json::json!({"mesh": {"mode": "secret"}});
        assert_eq!(
            mesh_mode(&bad, Mode::Local, (2, 0)).unwrap_err().status,
            400
        );
        assert_eq!(
            mesh_mode(&serde_json::json!({}), Mode::Pipeline, (2, 0)).unwrap(),
            Mode::Pipeline
        );
    }

    #[test]
    fn image_parts_and_tools_are_refused() {
        let img = br#"{"model": "m", "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}]}"#;
        let b = parse_json::<async_openai::types::chat::CreateChatCompletionRequest>(img).unwrap();
        assert_eq!(
            openai::chat_job(&b.value, Mode::Local).unwrap_err().status,
            400
        );
        let tool = br#"{"model": "m", "messages": [{"role": "tool", "content": "x"}]}"#;
        let b = parse_json::<ollama::ChatRequest>(tool).unwrap();
        assert_eq!(
            ollama::chat_job(&b.value, Mode::Local).unwrap_err().status,
            400
        );
    }

    proptest! {
        /// Arbitrary bytes and arbitrary JSON never panic a parser.
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            parse_requests(&data);
        }

        #[test]
        fn parsers_never_panic_on_json_shaped_input(
            model in ".{0,8}",
            content in ".{0,16}",
            role in "(system|user|assistant|tool|developer|x)",
            n in any::<i64>(),
            t in any::<f64>(),
        ) {
            let body = serde_json::json!({
                "model": model, "prompt": content, "messages": [{"role": role, "content": content}],
                "max_tokens": n, "temperature": t, "options": {"num_predict": n, "top_k": n, "temperature": t},
                "stop": [content], "n": n, "seed": n,
            });
            parse_requests(body.to_string().as_bytes());
        }
    }
}
