//! OpenAI's API: `POST /v1/chat/completions`, `POST /v1/completions`,
//! `GET /v1/models[/{model}]`. Request and response types are
//! `async-openai`'s; every response also carries a `mesh` object saying
//! where it was computed (clients ignore fields they do not know).

use std::convert::Infallible;
use std::sync::Arc;

use async_openai::types::chat::{
    ChatChoice, ChatChoiceStream, ChatCompletionRequestAssistantMessageContent,
    ChatCompletionRequestAssistantMessageContentPart, ChatCompletionRequestDeveloperMessageContent,
    ChatCompletionRequestDeveloperMessageContentPart, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessageContent, ChatCompletionRequestSystemMessageContentPart,
    ChatCompletionRequestUserMessageContent, ChatCompletionRequestUserMessageContentPart,
    ChatCompletionResponseMessage, ChatCompletionStreamResponseDelta, Choice,
    CompletionFinishReason, CompletionUsage, CreateChatCompletionRequest,
    CreateChatCompletionResponse, CreateChatCompletionStreamResponse, FinishReason, Prompt,
    ResponseFormat, Role, StopConfiguration,
};
use async_openai::types::completions::{CreateCompletionRequest, CreateCompletionResponse};
use async_openai::types::models::{ListModelResponse, Model};
use axum::extract::{Path, Request, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use mesh_core::chat::ChatMessage;
use mesh_core::engine::Engine;
use mesh_core::generate::{GenerateParams, OutputFormat, Prompt as MeshPrompt};
use mesh_core::json_schema::JsonSchema;
use mesh_core::sampling::SamplerParams;
use serde::Serialize;
use serde_json::{json, Value};

use super::{
    read_request, submit, unix_now, ApiError, AppState, Event, Finish, Job, JobHandle, Summary,
};

/// A response with the `mesh` extension beside OpenAI's fields.
#[derive(Serialize)]
struct WithMesh<T: Serialize> {
    #[serde(flatten)]
    inner: T,
    #[serde(skip_serializing_if = "Value::is_null")]
    mesh: Value,
}

/// The text of a message's content parts (text parts only).
fn text_of<I: IntoIterator<Item = Result<String, ApiError>>>(parts: I) -> Result<String, ApiError> {
    parts
        .into_iter()
        .collect::<Result<Vec<_>, _>>()
        .map(|p| p.concat())
}

/// OpenAI messages as chat-template messages (text content only).
fn chat_messages(messages: &[ChatCompletionRequestMessage]) -> Result<Vec<ChatMessage>, ApiError> {
    use ChatCompletionRequestMessage as M;
    if messages.is_empty() {
        return Err(ApiError {
            param: Some("messages"),
            ..ApiError::bad_request("messages: expected at least one message")
        });
    }
    messages
        .iter()
        .map(|m| {
            let (role, content) = match m {
                M::System(s) => (
                    "system",
                    match &s.content {
                        ChatCompletionRequestSystemMessageContent::Text(t) => t.clone(),
                        ChatCompletionRequestSystemMessageContent::Array(parts) => {
                            text_of(parts.iter().map(|p| match p {
                                ChatCompletionRequestSystemMessageContentPart::Text(t) => {
                                    Ok(t.text.clone())
                                }
                            }))?
                        }
                    },
                ),
                // A developer message is the system message of newer models.
                M::Developer(d) => (
                    "system",
                    match &d.content {
                        ChatCompletionRequestDeveloperMessageContent::Text(t) => t.clone(),
                        ChatCompletionRequestDeveloperMessageContent::Array(parts) => {
                            text_of(parts.iter().map(|p| match p {
                                ChatCompletionRequestDeveloperMessageContentPart::Text(t) => {
                                    Ok(t.text.clone())
                                }
                            }))?
                        }
                    },
                ),
                M::User(u) => (
                    "user",
                    match &u.content {
                        ChatCompletionRequestUserMessageContent::Text(t) => t.clone(),
                        ChatCompletionRequestUserMessageContent::Array(parts) => {
                            text_of(parts.iter().map(|p| match p {
                                ChatCompletionRequestUserMessageContentPart::Text(t) => {
                                    Ok(t.text.clone())
                                }
                                _ => Err(ApiError::unsupported(
                                    "messages",
                                    "content other than text (images, audio, files)",
                                )),
                            }))?
                        }
                    },
                ),
                M::Assistant(a) => {
                    if a.tool_calls.as_ref().is_some_and(|t| !t.is_empty()) {
                        return Err(ApiError::unsupported("messages", "tool calls"));
                    }
                    (
                        "assistant",
                        match &a.content {
                            None => String::new(),
                            Some(ChatCompletionRequestAssistantMessageContent::Text(t)) => {
                                t.clone()
                            }
                            Some(ChatCompletionRequestAssistantMessageContent::Array(parts)) => {
                                text_of(parts.iter().map(|p| match p {
                                    ChatCompletionRequestAssistantMessageContentPart::Text(t) => {
                                        Ok(t.text.clone())
                                    }
                                    ChatCompletionRequestAssistantMessageContentPart::Refusal(
                                        r,
                                    ) => Ok(r.refusal.clone()),
                                }))?
                            }
                        },
                    )
                }
                M::Tool(_) | M::Function(_) => {
                    return Err(ApiError::unsupported(
                        "messages",
                        "tool and function messages",
                    ))
                }
            };
            Ok(ChatMessage::new(role, content))
        })
        .collect()
}

fn stops(stop: Option<StopConfiguration>) -> Vec<String> {
    match stop {
        None => Vec::new(),
        Some(StopConfiguration::String(s)) => vec![s],
        Some(StopConfiguration::StringArray(v)) => v,
    }
}

/// OpenAI's sampling: temperature and nucleus only (no top-k, min-p or
/// repetition penalty), a random seed unless one is given.
fn sampler(temperature: Option<f32>, top_p: Option<f32>, seed: Option<i64>) -> SamplerParams {
    SamplerParams {
        temperature: temperature.unwrap_or(1.0),
        top_k: 0,
        top_p: top_p.unwrap_or(1.0),
        min_p: 0.0,
        repeat_penalty: 1.0,
        repeat_last_n: 0,
        seed: seed.map(|s| s as u64).unwrap_or_else(super::random_seed),
    }
}

/// Rejects fields whose meaning mesh-llm cannot honour (rather than
/// silently answering something else).
fn check_common(
    n: Option<u8>,
    presence: Option<f32>,
    frequency: Option<f32>,
    params: &SamplerParams,
) -> Result<(), ApiError> {
    if n.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported("n", "n other than 1"));
    }
    if presence.is_some_and(|p| p != 0.0) {
        return Err(ApiError::unsupported(
            "presence_penalty",
            "presence_penalty",
        ));
    }
    if frequency.is_some_and(|p| p != 0.0) {
        return Err(ApiError::unsupported(
            "frequency_penalty",
            "frequency_penalty",
        ));
    }
    params
        .validate()
        .map_err(|e| ApiError::bad_request(e.to_string()))
}

fn usage(s: &Summary) -> CompletionUsage {
    CompletionUsage {
        prompt_tokens: s.prompt_tokens as u32,
        completion_tokens: s.completion_tokens as u32,
        total_tokens: (s.prompt_tokens + s.completion_tokens) as u32,
        prompt_tokens_details: None,
        completion_tokens_details: None,
    }
}

fn finish_reason(f: Finish) -> FinishReason {
    match f {
        Finish::Length => FinishReason::Length,
        Finish::Stop | Finish::Cancelled => FinishReason::Stop,
    }
}

fn completion_id(prefix: &str) -> String {
    format!("{prefix}-{:016x}", rand::random::<u64>())
}

/// The job of a chat request (everything but the model name, checked by
/// the caller): refuses what mesh-llm cannot honour.
pub fn chat_job(r: &CreateChatCompletionRequest, mode: super::Mode) -> Result<Job, ApiError> {
    if r.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ApiError::unsupported("tools", "tools"));
    }
    if r.logprobs == Some(true) {
        return Err(ApiError::unsupported("logprobs", "logprobs"));
    }
    let format = match &r.response_format {
        None | Some(ResponseFormat::Text) => OutputFormat::Text,
        Some(ResponseFormat::JsonObject) => OutputFormat::JsonObject,
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let schema = json_schema.schema.as_ref().ok_or_else(|| {
                ApiError::bad_request("response_format.json_schema.schema is missing")
            })?;
            let compiled = JsonSchema::compile(schema)
                .map_err(|e| ApiError::bad_request(format!("response_format: {e}")))?;
            OutputFormat::JsonSchema(Arc::new(compiled))
        }
    };
    // `seed` is deprecated in OpenAI's spec but still sent by clients.
    #[allow(deprecated)]
    let params = sampler(r.temperature, r.top_p, r.seed);
    check_common(r.n, r.presence_penalty, r.frequency_penalty, &params)?;
    #[allow(deprecated)]
    let max_tokens = r.max_completion_tokens.or(r.max_tokens);
    Ok(Job {
        prompt: MeshPrompt::Chat(chat_messages(&r.messages)?),
        params: GenerateParams {
            sampler: params,
            format,
            ..GenerateParams::default()
        },
        max_tokens: max_tokens.map(|m| m as usize),
        stops: stops(r.stop.clone()),
        mode,
    })
}

/// `POST /v1/chat/completions`.
pub async fn chat(State(state): State<Arc<AppState>>, req: Request) -> Response {
    match chat_inner(state, req).await {
        Ok(r) => r,
        Err(e) => e.openai(),
    }
}

async fn chat_inner(state: Arc<AppState>, req: Request) -> Result<Response, ApiError> {
    let (r, mode, raw) =
        read_request::<CreateChatCompletionRequest>(&state, req, |r| &r.model).await?;
    let mut job = chat_job(&r, mode)?;
    job.params.ignore_eos = super::ignore_eos(&raw);
    let mut handle = submit(&state, job)?;
    handle.started().await?;
    let id = completion_id("chatcmpl");
    let model = r.model.clone();
    let created = unix_now() as u32;
    if r.stream == Some(true) {
        let include_usage = r
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let chunk = move |delta: ChatCompletionStreamResponseDelta,
                          finish: Option<FinishReason>,
                          usage: Option<CompletionUsage>,
                          mesh: Value| {
            let choices = if usage.is_some() && finish.is_none() && delta.content.is_none() {
                vec![]
            } else {
                vec![ChatChoiceStream {
                    index: 0,
                    delta,
                    finish_reason: finish,
                    logprobs: None,
                }]
            };
            #[allow(deprecated)]
            let c = CreateChatCompletionStreamResponse {
                id: id.clone(),
                choices,
                created,
                model: model.clone(),
                service_tier: None,
                system_fingerprint: None,
                object: "chat.completion.chunk".into(),
                usage,
            };
            serde_json::to_string(&WithMesh { inner: c, mesh }).unwrap_or_default()
        };
        #[allow(deprecated)]
        let delta =
            |content: Option<String>, role: Option<Role>| ChatCompletionStreamResponseDelta {
                content,
                function_call: None,
                tool_calls: None,
                role,
                refusal: None,
            };
        let first = chunk(
            delta(Some(String::new()), Some(Role::Assistant)),
            None,
            None,
            Value::Null,
        );
        let stream = sse_stream(handle, Some(first), move |e| match e {
            StreamItem::Text(t) => vec![chunk(delta(Some(t), None), None, None, Value::Null)],
            StreamItem::Done(s) => {
                let mut out = vec![chunk(
                    delta(None, None),
                    Some(finish_reason(s.finish)),
                    None,
                    s.mesh.clone(),
                )];
                if include_usage {
                    out.push(chunk(delta(None, None), None, Some(usage(&s)), Value::Null));
                }
                out
            }
        });
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let (text, summary) = handle.collect().await?;
    #[allow(deprecated)]
    let response = CreateChatCompletionResponse {
        id,
        choices: vec![ChatChoice {
            index: 0,
            message: ChatCompletionResponseMessage {
                content: Some(text),
                refusal: None,
                tool_calls: None,
                annotations: None,
                role: Role::Assistant,
                function_call: None,
                audio: None,
            },
            finish_reason: Some(finish_reason(summary.finish)),
            logprobs: None,
        }],
        created,
        model: r.model,
        service_tier: None,
        system_fingerprint: None,
        object: "chat.completion".into(),
        usage: Some(usage(&summary)),
    };
    Ok(axum::Json(WithMesh {
        inner: response,
        mesh: summary.mesh,
    })
    .into_response())
}

/// What a streamed job turns into.
pub enum StreamItem {
    Text(String),
    Done(Summary),
}

/// An SSE stream of a job: `first` (if any), then `render` of each item, then an
/// error event if the job failed, then `data: [DONE]`. Dropping the stream
/// (the client left) drops the handle, which cancels the job.
fn sse_stream(
    handle: JobHandle,
    first: Option<String>,
    render: impl FnMut(StreamItem) -> Vec<String> + Send + 'static,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send {
    struct St<F> {
        handle: JobHandle,
        render: F,
        pending: std::collections::VecDeque<String>,
        done: bool,
    }
    let st = St {
        handle,
        render,
        pending: first.into_iter().collect(),
        done: false,
    };
    futures::stream::unfold(st, |mut st| async move {
        loop {
            if let Some(data) = st.pending.pop_front() {
                return Some((Ok(SseEvent::default().data(data)), st));
            }
            if st.done {
                return None;
            }
            match st.handle.events.recv().await {
                Some(Event::Text(t)) => st.pending.extend((st.render)(StreamItem::Text(t))),
                Some(Event::Done(Ok(s))) => {
                    st.pending.extend((st.render)(StreamItem::Done(s)));
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
                Some(Event::Done(Err(e))) => {
                    // Headers are sent: the error travels as a data event in
                    // OpenAI's error shape.
                    let err = json!({"error": {"message": e.message, "type": e.kind,
                                               "param": e.param, "code": e.code}});
                    st.pending.push_back(err.to_string());
                    st.pending.push_back("[DONE]".into());
                    st.done = true;
                }
                Some(Event::Started { .. }) => {}
                None => return None,
            }
        }
    })
}

/// The job of a completions request (everything but the model name);
/// token prompts must be below `n_vocab`.
pub fn completion_job(
    r: &CreateCompletionRequest,
    mode: super::Mode,
    n_vocab: usize,
) -> Result<Job, ApiError> {
    let prompt = match r.prompt.clone() {
        Prompt::String(s) => MeshPrompt::Text(s),
        Prompt::StringArray(v) if v.len() == 1 => MeshPrompt::Text(v[0].clone()),
        Prompt::IntegerArray(ids) => {
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= n_vocab) {
                return Err(ApiError::bad_request(format!(
                    "prompt: token id {bad} is not below the vocabulary size {n_vocab}"
                )));
            }
            MeshPrompt::Tokens(ids)
        }
        Prompt::ArrayOfIntegerArray(v) if v.len() == 1 => {
            let ids = v.into_iter().next().unwrap_or_default();
            if ids.iter().any(|&t| t as usize >= n_vocab) {
                return Err(ApiError::bad_request(format!(
                    "prompt: token ids must be below the vocabulary size {n_vocab}"
                )));
            }
            MeshPrompt::Tokens(ids)
        }
        _ => {
            return Err(ApiError::unsupported(
                "prompt",
                "more than one prompt per request",
            ))
        }
    };
    if r.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "suffix"));
    }
    if r.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "echo"));
    }
    if r.logprobs.is_some() {
        return Err(ApiError::unsupported("logprobs", "logprobs"));
    }
    if r.best_of.is_some_and(|b| b > 1) {
        return Err(ApiError::unsupported("best_of", "best_of"));
    }
    let params = sampler(r.temperature, r.top_p, r.seed);
    check_common(r.n, r.presence_penalty, r.frequency_penalty, &params)?;
    Ok(Job {
        prompt,
        params: GenerateParams {
            sampler: params,
            ..GenerateParams::default()
        },
        // The legacy API's default is 16 tokens.
        max_tokens: Some(r.max_tokens.unwrap_or(16) as usize),
        stops: stops(r.stop.clone()),
        mode,
    })
}

/// `POST /v1/completions`.
pub async fn completions(State(state): State<Arc<AppState>>, req: Request) -> Response {
    match completions_inner(state, req).await {
        Ok(r) => r,
        Err(e) => e.openai(),
    }
}

async fn completions_inner(state: Arc<AppState>, req: Request) -> Result<Response, ApiError> {
    let (r, mode, raw) = read_request::<CreateCompletionRequest>(&state, req, |r| &r.model).await?;
    let mut job = completion_job(&r, mode, state.model.engine.info().n_vocab)?;
    job.params.ignore_eos = super::ignore_eos(&raw);
    let mut handle = submit(&state, job)?;
    handle.started().await?;
    let id = completion_id("cmpl");
    let model = r.model.clone();
    let created = unix_now() as u32;
    let choice = |text: String, finish: Option<Finish>| Choice {
        text,
        index: 0,
        logprobs: None,
        finish_reason: finish.map(|f| match f {
            Finish::Length => CompletionFinishReason::Length,
            Finish::Stop | Finish::Cancelled => CompletionFinishReason::Stop,
        }),
    };
    #[allow(deprecated)]
    let response =
        move |choices: Vec<Choice>, usage: Option<CompletionUsage>| CreateCompletionResponse {
            id: id.clone(),
            choices,
            created,
            model: model.clone(),
            system_fingerprint: None,
            object: "text_completion".into(),
            usage,
        };
    if r.stream == Some(true) {
        let include_usage = r
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false);
        let render = move |item: StreamItem| {
            let to =
                |inner, mesh| serde_json::to_string(&WithMesh { inner, mesh }).unwrap_or_default();
            match item {
                StreamItem::Text(t) => vec![to(response(vec![choice(t, None)], None), Value::Null)],
                StreamItem::Done(s) => {
                    let mut out = vec![to(
                        response(vec![choice(String::new(), Some(s.finish))], None),
                        s.mesh.clone(),
                    )];
                    if include_usage {
                        out.push(to(response(vec![], Some(usage(&s))), Value::Null));
                    }
                    out
                }
            }
        };
        // Completions streams start with text, not a role chunk.
        let stream = sse_stream(handle, None, render);
        return Ok(Sse::new(stream)
            .keep_alive(KeepAlive::default())
            .into_response());
    }
    let (text, summary) = handle.collect().await?;
    let inner = response(
        vec![choice(text, Some(summary.finish))],
        Some(usage(&summary)),
    );
    Ok(axum::Json(WithMesh {
        inner,
        mesh: summary.mesh,
    })
    .into_response())
}

fn model_object(state: &AppState, id: &str) -> Model {
    Model {
        id: id.to_owned(),
        object: "model".into(),
        created: state.model.modified as u32,
        owned_by: "mesh-llm".into(),
    }
}

/// `GET /v1/models`: the served model under its name and one name per mode.
pub async fn models(State(state): State<Arc<AppState>>) -> Response {
    let name = &state.model.name;
    let data = [name.clone()]
        .into_iter()
        .chain(["local", "pipeline", "private"].map(|m| format!("{name}:{m}")))
        .map(|id| model_object(&state, &id))
        .collect();
    axum::Json(ListModelResponse {
        object: "list".into(),
        data,
    })
    .into_response()
}

/// `GET /v1/models/{model}`.
pub async fn model(State(state): State<Arc<AppState>>, Path(model): Path<String>) -> Response {
    match state.resolve(&model) {
        Ok(_) => axum::Json(model_object(&state, &model)).into_response(),
        Err(e) => e.openai(),
    }
}
