//! The `embedder.v1.Embedder` gRPC service: the edge where proto types stop.
//!
//! # Threading
//! Each `Converse` stream is one lightweight Tokio task (`converse_task`) that
//! reads requests in order, hands turns to the [`Engine`] thread with the
//! stream's [`Conversation`], and writes one response per request into a
//! bounded channel (a slow reader pushes back). The task owns the
//! conversation; when the stream ends, is cancelled, or its client vanishes,
//! the task returns and the conversation's KV cache is dropped with it.

use std::{
    sync::{Arc, OnceLock},
    time::Instant,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming, codegen::http};
use tracing::Instrument;

use crate::{
    config::Config,
    conversation::{Conversation, ConversationOptions, OptionsError, Overflow, Pooling, TurnError, TurnOutput},
    engine::{Engine, EngineStopped, TurnReply},
    model::ModelError,
    pb::{self, converse_request::Action, converse_response::Result as ResponseBody},
    tokenizer::TokenizerError,
};

/// Why a request or a stream failed: per-turn failures are answered in-band
/// on a stream (the session lives on), the rest end the call with a status.
/// Every variant maps to its gRPC code in [`ServiceError::code`], matched
/// variant by variant down to the layers' own enums: a new variant anywhere
/// forces a decision here.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A ConverseRequest with no action.
    #[error("the request has no action: set one of options, turn or reset")]
    NoAction,
    /// Options after the first request.
    #[error("options are allowed only as the stream's first request")]
    OptionsNotFirst,
    /// An enum number this server does not know.
    #[error("unknown {field} value {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// The number sent.
        value: i32,
    },
    /// An Embed request with no texts.
    #[error("texts is empty")]
    NoTexts,
    /// Options that do not suit the model.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The turn failed.
    #[error(transparent)]
    Turn(#[from] TurnError),
    /// One text of an Embed failed.
    #[error("texts[{index}] failed")]
    EmbedText {
        /// Which text.
        index: usize,
        /// Why.
        #[source]
        source: TurnError,
    },
    /// The model is still loading.
    #[error("the model is still loading; retry when health is SERVING")]
    Loading,
    /// SIGINT/SIGTERM: new streams and calls are refused while open streams drain.
    #[error("the server is shutting down and takes no new requests")]
    Draining,
    /// The drain deadline passed with the stream still open.
    #[error("server shutting down")]
    ShuttingDown,
    /// `--max-sessions` streams are open.
    #[error("too many open streams: the server's limit is {limit}")]
    TooManyStreams {
        /// The limit.
        limit: usize,
    },
    /// A message over `--max-message-bytes` (tonic's own message kept).
    #[error("{0}")]
    MessageTooLarge(String),
    /// The engine thread died: nothing can be embedded until a restart.
    #[error(transparent)]
    EngineStopped(#[from] EngineStopped),
    /// The server's own default options do not suit the model (a start-up check makes this unreachable).
    #[error("the server's default session options are invalid")]
    Defaults(#[source] OptionsError),
}

impl ServiceError {
    /// The gRPC code: chosen per variant, on purpose (no catch-all).
    pub fn code(&self) -> Code {
        match self {
            ServiceError::NoAction
            | ServiceError::OptionsNotFirst
            | ServiceError::UnknownEnum { .. }
            | ServiceError::NoTexts => Code::InvalidArgument,
            ServiceError::Options(e) => options_code(e),
            ServiceError::Turn(e) | ServiceError::EmbedText { source: e, .. } => turn_code(e),
            ServiceError::Loading | ServiceError::Draining | ServiceError::ShuttingDown => Code::Unavailable,
            ServiceError::EngineStopped(EngineStopped) => Code::Unavailable,
            ServiceError::TooManyStreams { .. } | ServiceError::MessageTooLarge(_) => Code::ResourceExhausted,
            ServiceError::Defaults(_) => Code::Internal,
        }
    }

    /// One clear sentence for the client (internal failures hide their chain,
    /// which goes to the log).
    pub fn client_message(&self) -> String {
        match self {
            ServiceError::Turn(e) => turn_message(e),
            ServiceError::EmbedText { index, source } => format!("texts[{index}]: {}", turn_message(source)),
            _ if self.code() == Code::Internal => "the server failed to handle this request".to_string(),
            _ => self.to_string(),
        }
    }

    fn log(&self) {
        match self.code() {
            Code::Internal => tracing::error!(error = %ErrorChain(self), "request failed"),
            Code::Unavailable if matches!(self, ServiceError::EngineStopped(_)) => {
                tracing::error!(error = %self, "request failed");
            }
            _ => tracing::debug!(error = %self, "request refused"),
        }
    }

    /// The status that ends a call (logged).
    pub fn to_status(&self) -> Status {
        self.log();
        Status::new(self.code(), self.client_message())
    }

    /// The in-band error of a Converse response (logged).
    fn to_pb(&self) -> pb::Error {
        self.log();
        pb::Error {
            code: self.code() as i32,
            message: self.client_message(),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        e.to_status()
    }
}

/// A turn's failure as the client reads it: internal ones hide their chain.
fn turn_message(e: &TurnError) -> String {
    if turn_code(e) == Code::Internal {
        "the model failed to run this turn; the conversation is unchanged".to_string()
    } else {
        e.to_string()
    }
}

fn options_code(e: &OptionsError) -> Code {
    match e {
        OptionsError::Dimensions { .. }
        | OptionsError::Window { .. }
        | OptionsError::Keep { .. }
        | OptionsError::Chunk => Code::InvalidArgument,
    }
}

fn turn_code(e: &TurnError) -> Code {
    match e {
        TurnError::UnknownRole(_) | TurnError::Empty => Code::InvalidArgument,
        TurnError::Options(o) => options_code(o),
        TurnError::TurnTooLong { .. } | TurnError::OverWindow { .. } | TurnError::ContextFull { .. } => {
            Code::ResourceExhausted
        }
        TurnError::Tokenizer(t) => match t {
            TokenizerError::Encode(_) | TokenizerError::Load { .. } | TokenizerError::MissingMarker { .. } => {
                Code::Internal
            }
        },
        TurnError::Model(m) => match m {
            ModelError::Ort { .. }
            | ModelError::Runtime(_)
            | ModelError::Path { .. }
            | ModelError::Tokenizer(_)
            | ModelError::Config { .. }
            | ModelError::Contract { .. } => Code::Internal,
        },
    }
}

/// Displays an error with its sources.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

// ------------------------------------------------------------ conversions

fn pooling(value: i32) -> Result<Pooling, ServiceError> {
    match pb::Pooling::try_from(value) {
        Ok(pb::Pooling::Unspecified | pb::Pooling::Mean) => Ok(Pooling::Mean),
        Ok(pb::Pooling::LastToken) => Ok(Pooling::LastToken),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "pooling",
            value,
        }),
    }
}

fn overflow(value: i32) -> Result<Overflow, ServiceError> {
    match pb::Overflow::try_from(value) {
        Ok(pb::Overflow::Unspecified | pb::Overflow::Slide) => Ok(Overflow::Slide),
        Ok(pb::Overflow::Reject) => Ok(Overflow::Reject),
        Ok(pb::Overflow::Reset) => Ok(Overflow::Reset),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "overflow",
            value,
        }),
    }
}

fn dimensions(value: u32) -> Option<usize> {
    (value != 0).then_some(value as usize)
}

impl Limits {
    /// The options a stream (and an Embed, and the warm-up turn) starts with:
    /// the one place the server's session defaults are built.
    pub fn default_options(&self) -> ConversationOptions {
        ConversationOptions {
            max_context_tokens: self.max_context_tokens,
            max_turn_tokens: self.max_turn_tokens,
            prefill_chunk_tokens: self.prefill_chunk_tokens,
            ..ConversationOptions::default()
        }
    }

    /// Session options from the wire, over the server's defaults.
    fn session_options(&self, o: &pb::SessionOptions) -> Result<ConversationOptions, ServiceError> {
        let base = self.default_options();
        Ok(ConversationOptions {
            pooling: pooling(o.pooling)?,
            dimensions: dimensions(o.dimensions),
            normalize: o.normalize.unwrap_or(true),
            max_context_tokens: if o.max_context_tokens == 0 {
                base.max_context_tokens
            } else {
                o.max_context_tokens as usize
            },
            overflow: overflow(o.overflow)?,
            keep_tokens: o.keep_tokens as usize,
            include_turn_mean: o.include_turn_mean,
            ..base
        })
    }
}

/// A count for one of the proto's u32 fields (they cannot overflow in
/// practice, but a count never wraps).
pub fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn embedding(out: TurnOutput) -> pb::Embedding {
    pb::Embedding {
        values: out.embedding,
        turn_tokens: saturating_u32(out.turn_tokens),
        context_tokens: saturating_u32(out.context_tokens),
        evicted_tokens: saturating_u32(out.evicted_tokens),
        turn_mean: out.turn_mean.unwrap_or_default(),
    }
}

// ------------------------------------------------------------ the service

/// Server-wide limits the service applies.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Default window (already capped at the model's maximum).
    pub max_context_tokens: usize,
    /// Longest turn.
    pub max_turn_tokens: usize,
    /// Tokens per prefill call.
    pub prefill_chunk_tokens: usize,
    /// Streams at once.
    pub max_sessions: usize,
}

impl Limits {
    /// The limits a config sets.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            max_context_tokens: config.max_context_tokens,
            max_turn_tokens: config.max_turn_tokens,
            prefill_chunk_tokens: config.prefill_chunk_tokens,
            max_sessions: config.max_sessions,
        }
    }
}

/// State shared by the service and the server's lifecycle code.
#[derive(Debug)]
pub struct Shared {
    /// Set once the model is loaded and warm; until then RPCs are UNAVAILABLE.
    pub engine: OnceLock<Arc<Engine>>,
    /// One permit per open Converse stream.
    pub sessions: Arc<Semaphore>,
    /// Limits.
    pub limits: Limits,
    /// Cancelled after the drain deadline: every stream ends with UNAVAILABLE.
    pub root: CancellationToken,
    /// Cancelled on SIGINT/SIGTERM: new streams are refused.
    pub draining: CancellationToken,
}

impl Shared {
    /// Fresh state for a server with these limits.
    pub fn new(limits: Limits) -> Arc<Shared> {
        Arc::new(Shared {
            engine: OnceLock::new(),
            sessions: Arc::new(Semaphore::new(limits.max_sessions)),
            limits,
            root: CancellationToken::new(),
            draining: CancellationToken::new(),
        })
    }

    /// Streams open now.
    pub fn active_sessions(&self) -> usize {
        self.limits.max_sessions - self.sessions.available_permits()
    }
}

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct EmbedderService {
    shared: Arc<Shared>,
}

impl EmbedderService {
    /// A service over shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn engine(&self) -> Result<Arc<Engine>, ServiceError> {
        self.shared.engine.get().cloned().ok_or(ServiceError::Loading)
    }

    fn refuse_if_draining(&self) -> Result<(), ServiceError> {
        if self.shared.draining.is_cancelled() {
            return Err(ServiceError::Draining);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::embedder_server::Embedder for EmbedderService {
    type ConverseStream = ReceiverStream<Result<pb::ConverseResponse, Status>>;

    async fn converse(
        &self,
        request: Request<Streaming<pb::ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        self.refuse_if_draining()?;
        let engine = self.engine()?;
        let permit = self
            .shared
            .sessions
            .clone()
            .try_acquire_owned()
            .map_err(|_| ServiceError::TooManyStreams {
                limit: self.shared.limits.max_sessions,
            })?;
        let stream_id = next_stream_id();
        let peer = request.remote_addr();
        let conversation =
            Conversation::new(engine.model(), self.shared.limits.default_options()).map_err(ServiceError::Defaults)?;
        let (responses_tx, responses_rx) = mpsc::channel(16);
        let task = ConverseTask {
            engine,
            limits: self.shared.limits.clone(),
            inbound: request.into_inner(),
            responses_tx,
            cancel: self.shared.root.child_token(),
            conversation: Some(conversation),
            _permit: permit,
        };
        let span = tracing::info_span!("converse", stream_id, peer = ?peer);
        tokio::spawn(task.run().instrument(span));
        Ok(Response::new(ReceiverStream::new(responses_rx)))
    }

    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        self.refuse_if_draining()?;
        let engine = self.engine()?;
        let req = request.into_inner();
        let options = ConversationOptions {
            pooling: pooling(req.pooling)?,
            dimensions: dimensions(req.dimensions),
            normalize: req.normalize.unwrap_or(true),
            ..self.shared.limits.default_options()
        };
        if req.texts.is_empty() {
            return Err(ServiceError::NoTexts.into());
        }
        options.validate(engine.model()).map_err(ServiceError::from)?;
        let results = engine.embed(req.texts, options).await.map_err(ServiceError::from)?;
        let mut embeddings = Vec::with_capacity(results.len());
        for (index, result) in results.into_iter().enumerate() {
            let out = result.map_err(|source| ServiceError::EmbedText { index, source })?;
            embeddings.push(embedding(out));
        }
        Ok(Response::new(pb::EmbedResponse { embeddings }))
    }

    async fn get_model_info(&self, _: Request<pb::GetModelInfoRequest>) -> Result<Response<pb::ModelInfo>, Status> {
        let engine = self.engine()?;
        let spec = engine.model().spec();
        let n = saturating_u32;
        Ok(Response::new(pb::ModelInfo {
            name: spec.name.clone(),
            layers: n(spec.layers),
            hidden_size: n(spec.hidden_size),
            kv_heads: n(spec.kv_heads),
            head_dim: n(spec.head_dim),
            kv_dtype: spec.kv_dtype.name().to_string(),
            vocab_size: n(spec.vocab_size),
            max_context_tokens: n(self.shared.limits.max_context_tokens),
            kv_bytes_per_token: spec.kv_bytes_per_token(),
        }))
    }

    async fn get_stats(&self, _: Request<pb::GetStatsRequest>) -> Result<Response<pb::Stats>, Status> {
        let engine = self.engine()?;
        let stats = engine.stats();
        Ok(Response::new(pb::Stats {
            active_sessions: saturating_u32(self.shared.active_sessions()),
            kv_cache_bytes: engine.model().kv_cache_bytes(),
            turns_total: stats.turns(),
            tokens_total: stats.tokens(),
            queued_turns: saturating_u32(stats.queued()),
            model_calls_total: engine.model().calls(),
        }))
    }
}

fn next_stream_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// How a stream ended, for its closing log line.
#[derive(Debug, Clone, Copy)]
enum Ending {
    HalfClosed,
    ClientGone,
    ShuttingDown,
    InboundError,
    EngineStopped,
}

/// One Converse stream: owns its conversation until the stream ends.
struct ConverseTask {
    engine: Arc<Engine>,
    limits: Limits,
    inbound: Streaming<pb::ConverseRequest>,
    /// Responses to the client; a failed send means the client is gone.
    responses_tx: mpsc::Sender<Result<pb::ConverseResponse, Status>>,
    /// Cancelled after the server's drain deadline.
    cancel: CancellationToken,
    /// `None` only while a turn is in the engine, or after the engine lost it.
    conversation: Option<Conversation>,
    /// Holds one of the server's stream slots for the task's lifetime.
    _permit: OwnedSemaphorePermit,
}

impl ConverseTask {
    async fn run(mut self) {
        let started = Instant::now();
        let (mut index, mut turns, mut tokens, mut peak) = (0u64, 0u64, 0u64, 0u64);
        tracing::info!("stream opened");
        let ending = loop {
            let message = tokio::select! {
                biased;
                () = self.cancel.cancelled() => break self.shutting_down().await,
                () = self.responses_tx.closed() => break Ending::ClientGone,
                m = self.inbound.message() => m,
            };
            let request = match message {
                Ok(Some(r)) => r,
                Ok(None) => break Ending::HalfClosed,
                Err(status) => {
                    tracing::debug!(code = ?status.code(), message = status.message(), "inbound stream failed");
                    let _ = self.responses_tx.send(Err(inbound_failure(status))).await;
                    break Ending::InboundError;
                }
            };
            let tag = request.tag;
            let result = match request.action {
                None => Err(ServiceError::NoAction),
                Some(Action::Options(o)) if index == 0 => self.apply_options(&o),
                Some(Action::Options(_)) => Err(ServiceError::OptionsNotFirst),
                Some(Action::Reset(_)) => Ok(self.reset()),
                Some(Action::Turn(turn)) => {
                    let conversation = self
                        .conversation
                        .take()
                        .expect("between turns the conversation is back from the engine (a lost one ends the stream)");
                    let job = self.engine.turn(conversation, turn.text, turn.role);
                    let reply = tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => break self.shutting_down().await,
                        () = self.responses_tx.closed() => break Ending::ClientGone,
                        r = job => r,
                    };
                    let TurnReply { conversation, result } = match reply {
                        Ok(reply) => reply,
                        Err(stopped) => {
                            self.end_with(ServiceError::from(stopped)).await;
                            break Ending::EngineStopped;
                        }
                    };
                    self.conversation = Some(conversation);
                    result
                        .map(|out| {
                            turns += 1;
                            tokens += out.turn_tokens as u64;
                            ResponseBody::Embedding(embedding(out))
                        })
                        .map_err(ServiceError::from)
                }
            };
            if let Some(c) = &self.conversation {
                peak = peak.max(c.peak_kv_bytes());
            }
            let result = result.unwrap_or_else(|e| ResponseBody::Error(e.to_pb()));
            let response = pb::ConverseResponse {
                tag,
                index,
                result: Some(result),
            };
            index += 1;
            if self.responses_tx.send(Ok(response)).await.is_err() {
                break Ending::ClientGone;
            }
        };
        drop(self.conversation.take());
        tracing::info!(
            ending = ?ending,
            duration_ms = started.elapsed().as_millis() as u64,
            requests = index,
            turns,
            tokens,
            peak_kv_bytes = peak,
            "stream closed"
        );
    }

    /// Ends the stream with the drain deadline's UNAVAILABLE.
    async fn shutting_down(&self) -> Ending {
        self.end_with(ServiceError::ShuttingDown).await;
        Ending::ShuttingDown
    }

    /// Ends the stream with `error`'s status (a failed send: the client is gone anyway).
    async fn end_with(&self, error: ServiceError) {
        let _ = self.responses_tx.send(Err(error.to_status())).await;
    }

    fn apply_options(&mut self, o: &pb::SessionOptions) -> Result<ResponseBody, ServiceError> {
        let options = self.limits.session_options(o)?;
        let engine = self.engine.clone();
        let conversation = Conversation::new(engine.model(), options)?;
        let hidden = engine.model().spec().hidden_size;
        let ready = pb::SessionReady {
            dimensions: saturating_u32(conversation.options().output_dimensions(hidden)),
            max_context_tokens: saturating_u32(conversation.options().max_context_tokens),
        };
        self.conversation = Some(conversation);
        Ok(ResponseBody::Ready(ready))
    }

    fn reset(&mut self) -> ResponseBody {
        let released = self.conversation.as_mut().map_or(0, Conversation::reset);
        ResponseBody::Reset(pb::ResetDone {
            released_tokens: saturating_u32(released),
        })
    }
}

/// What tonic says of a message over the size limit (in a status message,
/// and percent-encoded in a `grpc-message` header).
const OVERSIZE: [&str; 2] = ["message length too large", "message%20length%20too%20large"];

/// Whether tonic's status (code and message) is its "message too large":
/// OUT_OF_RANGE, where gRPC's convention (and every other implementation's)
/// is RESOURCE_EXHAUSTED.
fn is_oversize(code: Code, message: &str) -> bool {
    code == Code::OutOfRange && OVERSIZE.iter().any(|m| message.contains(m))
}

/// The status to end a stream with when reading from it failed: tonic's
/// own, except an over-size message, which is [`ServiceError::MessageTooLarge`].
fn inbound_failure(status: Status) -> Status {
    if is_oversize(status.code(), status.message()) {
        ServiceError::MessageTooLarge(status.message().to_string()).to_status()
    } else {
        status
    }
}

/// tonic answers an over-size unary request with OUT_OF_RANGE before any
/// handler runs; this response layer rewrites that one status (on
/// trailers-only responses, where it sits in the headers) to
/// RESOURCE_EXHAUSTED, as `inbound_failure` does for streams.
pub fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let oversize = headers.get("grpc-status").is_some_and(|s| s == "11")
        && headers
            .get("grpc-message")
            .and_then(|m| m.to_str().ok())
            .is_some_and(|m| is_oversize(Code::OutOfRange, m));
    if oversize {
        headers.insert("grpc-status", http::HeaderValue::from(Code::ResourceExhausted as i32));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each failure maps to the code STYLE.md chooses for its kind.
    #[test]
    fn codes_are_chosen_per_variant() {
        let cases: Vec<(ServiceError, Code)> = vec![
            (ServiceError::NoAction, Code::InvalidArgument),
            (
                ServiceError::UnknownEnum {
                    field: "pooling",
                    value: 9,
                },
                Code::InvalidArgument,
            ),
            (ServiceError::Options(OptionsError::Chunk), Code::InvalidArgument),
            (ServiceError::Turn(TurnError::Empty), Code::InvalidArgument),
            (
                ServiceError::Turn(TurnError::ContextFull {
                    context: 1,
                    tokens: 2,
                    window: 2,
                }),
                Code::ResourceExhausted,
            ),
            (ServiceError::TooManyStreams { limit: 1 }, Code::ResourceExhausted),
            (ServiceError::MessageTooLarge("too big".into()), Code::ResourceExhausted),
            (ServiceError::Loading, Code::Unavailable),
            (ServiceError::Draining, Code::Unavailable),
            (ServiceError::ShuttingDown, Code::Unavailable),
            (ServiceError::EngineStopped(EngineStopped), Code::Unavailable),
            (
                ServiceError::Turn(TurnError::Model(ModelError::Contract {
                    path: "m.onnx".into(),
                    reason: "x".into(),
                })),
                Code::Internal,
            ),
            (ServiceError::Defaults(OptionsError::Chunk), Code::Internal),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error:?}");
        }
    }

    /// Internal failures tell the client one sentence, not their chain; the rest say what was wrong.
    #[test]
    fn clients_read_one_clear_sentence() {
        let internal = ServiceError::EmbedText {
            index: 3,
            source: TurnError::Tokenizer(TokenizerError::Encode("bad".into())),
        };
        assert_eq!(
            internal.client_message(),
            "texts[3]: the model failed to run this turn; the conversation is unchanged"
        );
        assert_eq!(
            ServiceError::EmbedText {
                index: 0,
                source: TurnError::Empty
            }
            .client_message(),
            "texts[0]: the turn's text is empty"
        );
        let stopped = ServiceError::EngineStopped(EngineStopped).client_message();
        assert!(stopped.contains("engine has stopped"), "{stopped}");
        assert!(
            !stopped.contains("shutting down"),
            "a dead engine is not a shutdown: {stopped}"
        );
    }

    /// tonic's over-size status is recognised in a status and in a percent-encoded header, nothing else.
    #[test]
    fn oversize_is_recognised_in_both_spellings() {
        let tonic =
            Status::out_of_range("Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes");
        assert_eq!(inbound_failure(tonic).code(), Code::ResourceExhausted);
        assert_eq!(inbound_failure(Status::out_of_range("other")).code(), Code::OutOfRange);
        assert_eq!(inbound_failure(Status::cancelled("gone")).code(), Code::Cancelled);
        let response = http::Response::builder()
            .header("grpc-status", "11")
            .header("grpc-message", "decoded%20message%20length%20too%20large")
            .body(())
            .unwrap();
        let rewritten = oversize_is_resource_exhausted(response);
        assert_eq!(rewritten.headers()["grpc-status"], "8");
    }
}
