//! The `embedder.v1.Embedder` gRPC service: the edge where proto types stop.
//!
//! # Threading
//! Each `Converse` stream is one lightweight Tokio task (`converse_task`) that
//! reads requests in order, hands turns to the [`Engine`] thread with the
//! [`Slot`] the stream's [`Conversation`] rests in, and writes one response
//! per request into a bounded channel (a slow reader pushes back). The task
//! holds the slot; when the stream ends, is cancelled, or its client
//! vanishes, the task returns and the conversation's KV cache is dropped
//! with the slot, unless a resumable session ([`Sessions`]) keeps it.
//!
//! Every failure is a [`ServiceError`] (in `error`), with its gRPC code.

mod error;
mod session;

use error::inbound_failure;
pub use error::{ErrorChain, ServiceError, rewrite_decode_statuses};
use session::{HalfCloseArm, OnHalfClose};
pub use session::{MAX_SESSION_ID_LEN, Sessions};

use std::{
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    auth::Principal,
    config::Config,
    conversation::{Conversation, ConversationOptions, InputType, Overflow, Pooling, Standardize, TurnOutput},
    engine::Engine,
    memory::Slot,
    pb::{self, converse_request::Action, converse_response::Result as ResponseBody},
};

// ------------------------------------------------------------ conversions

fn pooling(value: i32) -> Result<Pooling, ServiceError> {
    match pb::Pooling::try_from(value) {
        Ok(pb::Pooling::Unspecified) => Ok(Pooling::default()),
        Ok(pb::Pooling::Mean) => Ok(Pooling::Mean),
        Ok(pb::Pooling::LastToken) => Ok(Pooling::LastToken),
        Ok(pb::Pooling::Probe) => Ok(Pooling::Probe),
        Ok(pb::Pooling::ProbeMean) => Ok(Pooling::ProbeMean),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "pooling",
            value,
        }),
    }
}

/// The standardisation asked for; unset, the pooling's default.
fn standardize(value: i32, pooling: Pooling) -> Result<Standardize, ServiceError> {
    match pb::Standardize::try_from(value) {
        Ok(pb::Standardize::Unspecified) => Ok(Standardize::default_for(pooling)),
        Ok(pb::Standardize::Zscore) => Ok(Standardize::Zscore),
        Ok(pb::Standardize::None) => Ok(Standardize::None),
        Ok(pb::Standardize::Head) => Ok(Standardize::Head),
        Ok(pb::Standardize::Whiten) => Ok(Standardize::Whiten),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "standardize",
            value,
        }),
    }
}

fn input_type(value: i32) -> Result<InputType, ServiceError> {
    match pb::InputType::try_from(value) {
        Ok(pb::InputType::Unspecified) => Ok(InputType::Raw),
        Ok(pb::InputType::Query) => Ok(InputType::Query),
        Ok(pb::InputType::Document) => Ok(InputType::Document),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "input_type",
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

/// An `Embed` request's options over the server's defaults (a stream's:
/// the same pooling and standardisation; each text is a one-turn
/// conversation).
pub fn embed_options(req: &pb::EmbedRequest, base: ConversationOptions) -> Result<ConversationOptions, ServiceError> {
    let pooling = pooling(req.pooling)?;
    Ok(ConversationOptions {
        pooling,
        dimensions: dimensions(req.dimensions),
        normalize: req.normalize.unwrap_or(true),
        standardize: standardize(req.standardize, pooling)?,
        input_type: input_type(req.input_type)?,
        ..base
    })
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
    pub fn session_options(&self, o: &pb::SessionOptions) -> Result<ConversationOptions, ServiceError> {
        let base = self.default_options();
        if o.max_context_tokens as usize > self.max_context_tokens {
            return Err(ServiceError::WindowOverCap {
                asked: o.max_context_tokens as usize,
                cap: self.max_context_tokens,
            });
        }
        let pooling = pooling(o.pooling)?;
        Ok(ConversationOptions {
            pooling,
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
            standardize: standardize(o.standardize, pooling)?,
            input_type: input_type(o.input_type)?,
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
    /// How long a lost resumable session is kept; `None`: sessions off.
    pub detached_ttl: Option<Duration>,
}

impl Limits {
    /// The limits a config sets.
    pub fn from_config(config: &Config) -> Limits {
        Limits {
            max_context_tokens: config.max_context_tokens,
            max_turn_tokens: config.max_turn_tokens,
            prefill_chunk_tokens: config.prefill_chunk_tokens,
            max_sessions: config.max_sessions,
            detached_ttl: config.detached_ttl(),
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
    /// Resumable sessions.
    pub sessions_table: Arc<Sessions>,
}

impl Shared {
    /// Fresh state for a server with these limits.
    pub fn new(limits: Limits) -> Arc<Shared> {
        Arc::new(Shared {
            engine: OnceLock::new(),
            sessions: Arc::new(Semaphore::new(limits.max_sessions)),
            root: CancellationToken::new(),
            draining: CancellationToken::new(),
            sessions_table: Sessions::new(limits.detached_ttl, limits.max_sessions),
            limits,
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
    type ConverseStream = Responses;

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
        let principal = request.extensions().get::<Principal>().cloned();
        let conversation =
            Conversation::new(engine.model(), self.shared.limits.default_options()).map_err(ServiceError::Defaults)?;
        let slot = engine.budget().slot(conversation);
        let (responses_tx, responses_rx) = mpsc::channel(16);
        let (on_half_close, half_close) = OnHalfClose::new(self.shared.sessions_table.clone(), stream_id);
        let task = ConverseTask {
            engine,
            limits: self.shared.limits.clone(),
            sessions: self.shared.sessions_table.clone(),
            stream_id,
            inbound: request.into_inner(),
            responses_tx,
            cancel: self.shared.root.child_token(),
            slot,
            session_id: None,
            principal,
            half_close,
            _permit: permit,
        };
        let span = tracing::info_span!("converse", stream_id, peer = ?peer);
        tokio::spawn(task.run().instrument(span));
        Ok(Response::new(Responses {
            inner: ReceiverStream::new(responses_rx),
            on_half_close,
        }))
    }

    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        self.refuse_if_draining()?;
        let engine = self.engine()?;
        let req = request.into_inner();
        let options = embed_options(&req, self.shared.limits.default_options())?;
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
        let model = engine.model();
        let spec = model.spec();
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
            input_types: model
                .templates()
                .input_types
                .iter()
                .map(|(name, t)| (name.clone(), t.text()))
                .collect(),
            probe: model.templates().probe.clone(),
            stats_corpus_sha256: model.embedding_stats().corpus_sha256.clone(),
            head_dimensions: saturating_u32(model.embedding_head().dimensions),
            head_pairs_sha256: model.embedding_head().pairs_sha256.clone(),
            kv_budget_bytes: engine.budget().limit(),
            max_sessions: n(self.shared.limits.max_sessions),
            detached_ttl_seconds: self.shared.limits.detached_ttl.map_or(0.0, |d| d.as_secs_f64()),
        }))
    }

    async fn get_stats(&self, request: Request<pb::GetStatsRequest>) -> Result<Response<pb::Stats>, Status> {
        let engine = self.engine()?;
        // Test builds answer `se-census` metadata with the ledger and an
        // independent census of the KV tensors, read together between model
        // calls (see `model::Model::ledger_snapshot`).
        let snapshot = if request.metadata().contains_key(CENSUS_METADATA) {
            let model = engine.model().clone();
            tokio::task::spawn_blocking(move || model.ledger_snapshot())
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        let stats = engine.stats();
        let budget = engine.budget();
        let census = budget.census();
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let mut response = Response::new(pb::Stats {
            active_sessions: saturating_u32(self.shared.active_sessions()),
            kv_cache_bytes: snapshot.map_or_else(|| engine.model().kv_cache_bytes(), |s| s.ledger),
            turns_total: stats.turns(),
            tokens_total: stats.tokens(),
            queued_turns: saturating_u32(stats.queued()),
            model_calls_total: engine.model().calls(),
            kv_budget_bytes: budget.limit(),
            resident_conversations: saturating_u32(census.resident),
            evicted_conversations: saturating_u32(census.evicted),
            detached_sessions: saturating_u32(self.shared.sessions_table.detached()),
            evictions_total: budget.evictions(),
            evicted_tokens_total: budget.evicted_tokens(),
            rebuilds_total: stats.rebuilds(),
            rebuilt_tokens_total: stats.rebuilt_tokens(),
            queue_wait_us_total: micros(stats.queue_wait_total()),
            queue_wait_us_max: micros(stats.queue_wait_max()),
        });
        if let Some(s) = snapshot {
            let metadata = response.metadata_mut();
            metadata.insert("se-census-bytes", s.census.into());
            metadata.insert("se-census-peak-bytes", s.peak.into());
        }
        Ok(response)
    }
}

/// The request metadata key that asks `GetStats` for the census (test builds).
pub const CENSUS_METADATA: &str = "se-census";

fn next_stream_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// A Converse stream's responses, as tonic sends them; when they have all
/// gone out, a half-closed resumable session ends (and if they are cut
/// short, it is kept, detached).
#[derive(Debug)]
pub struct Responses {
    inner: ReceiverStream<Result<pb::ConverseResponse, Status>>,
    on_half_close: OnHalfClose,
}

impl tokio_stream::Stream for Responses {
    type Item = Result<pb::ConverseResponse, Status>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        let next = std::pin::Pin::new(&mut self.inner).poll_next(cx);
        if let std::task::Poll::Ready(None) = next {
            self.on_half_close.delivered();
        }
        next
    }
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

/// One Converse stream: holds its conversation's slot until the stream ends.
struct ConverseTask {
    engine: Arc<Engine>,
    limits: Limits,
    sessions: Arc<Sessions>,
    stream_id: u64,
    inbound: Streaming<pb::ConverseRequest>,
    /// Responses to the client; a failed send means the client is gone.
    responses_tx: mpsc::Sender<Result<pb::ConverseResponse, Status>>,
    /// Cancelled after the server's drain deadline.
    cancel: CancellationToken,
    /// Where the conversation rests between turns (the engine has it during one).
    slot: Arc<Slot>,
    /// The resumable session this stream holds, if any.
    session_id: Option<String>,
    /// The token the stream came with (`--auth-token-file`).
    principal: Option<Principal>,
    /// Ends a half-closed session once its responses have all gone out.
    half_close: HalfCloseArm,
    /// Holds one of the server's stream slots for the task's lifetime.
    _permit: OwnedSemaphorePermit,
}

impl ConverseTask {
    async fn run(mut self) {
        let started = Instant::now();
        let (mut index, mut turns, mut tokens, mut peak, mut rebuilds) = (0u64, 0u64, 0u64, 0u64, 0u64);
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
                Some(Action::Options(o)) if index == 0 => {
                    // A resume may wait for the lost stream's last turn.
                    let (cancel, responses) = (self.cancel.clone(), self.responses_tx.clone());
                    tokio::select! {
                        biased;
                        () = cancel.cancelled() => break self.shutting_down().await,
                        () = responses.closed() => break Ending::ClientGone,
                        r = self.apply_options(&o) => r,
                    }
                }
                Some(Action::Options(_)) => Err(ServiceError::OptionsNotFirst),
                Some(Action::Reset(_)) => Ok(self.reset()),
                Some(Action::Turn(turn)) => {
                    let asked = Instant::now();
                    let job = self.engine.turn(self.slot.clone(), turn.text, turn.role);
                    let reply = tokio::select! {
                        biased;
                        () = self.cancel.cancelled() => break self.shutting_down().await,
                        () = self.responses_tx.closed() => break Ending::ClientGone,
                        r = job => r,
                    };
                    metrics::histogram!("se_turn_seconds").record(asked.elapsed().as_secs_f64());
                    let result = match reply {
                        Ok(result) => result,
                        Err(stopped) => {
                            self.end_with(ServiceError::from(stopped)).await;
                            break Ending::EngineStopped;
                        }
                    };
                    result
                        .map(|out| {
                            turns += 1;
                            tokens += out.turn_tokens as u64;
                            rebuilds += u64::from(out.rebuilt_tokens > 0);
                            ResponseBody::Embedding(embedding(out))
                        })
                        .map_err(ServiceError::from)
                }
            };
            if let Some(p) = self.slot.with(|c| c.peak_kv_bytes()) {
                peak = peak.max(p);
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
        let session = match (&self.session_id, ending) {
            (None, _) => "none",
            (Some(id), Ending::HalfClosed) => {
                // Ended once the responses have all gone out; kept if not.
                if self.half_close.arm(id) {
                    "ends when its responses are out"
                } else {
                    self.sessions.detach(id, self.stream_id);
                    "detached"
                }
            }
            (Some(id), Ending::ShuttingDown | Ending::EngineStopped) => {
                self.sessions.end(id, self.stream_id);
                "ended"
            }
            (Some(id), Ending::ClientGone | Ending::InboundError) => {
                self.sessions.detach(id, self.stream_id);
                "detached"
            }
        };
        tracing::info!(
            ending = ?ending,
            duration_ms = started.elapsed().as_millis() as u64,
            requests = index,
            turns,
            tokens,
            rebuilds,
            peak_kv_bytes = peak,
            session,
            "stream closed"
        );
    }

    /// Ends the stream with the drain deadline's UNAVAILABLE, or the dead
    /// engine's when that is why the server is stopping.
    async fn shutting_down(&self) -> Ending {
        if self.engine.is_stopped() {
            self.end_with(ServiceError::EngineStopped(crate::engine::EngineStopped))
                .await;
            return Ending::EngineStopped;
        }
        self.end_with(ServiceError::ShuttingDown).await;
        Ending::ShuttingDown
    }

    /// Ends the stream with `error`'s status (a failed send: the client is gone anyway).
    async fn end_with(&self, error: ServiceError) {
        let _ = self.responses_tx.send(Err(error.to_status())).await;
    }

    async fn apply_options(&mut self, o: &pb::SessionOptions) -> Result<ResponseBody, ServiceError> {
        let mode = pb::SessionMode::try_from(o.session_mode).map_err(|_| ServiceError::UnknownEnum {
            field: "session_mode",
            value: o.session_mode,
        })?;
        let session_id = match mode {
            pb::SessionMode::Unspecified => String::new(),
            pb::SessionMode::Resume => {
                let bare = pb::SessionOptions {
                    session_id: o.session_id.clone(),
                    session_mode: o.session_mode,
                    ..Default::default()
                };
                if *o != bare {
                    return Err(ServiceError::ResumeWithOptions);
                }
                let slot = self
                    .sessions
                    .resume(&o.session_id, self.stream_id, self.principal.as_ref())?;
                self.session_id = Some(o.session_id.clone());
                // The lost stream's last turn may still be in the engine.
                slot.rested().await;
                self.slot = slot;
                o.session_id.clone()
            }
            pb::SessionMode::Create => {
                let options = self.limits.session_options(o)?;
                let conversation = Conversation::new(self.engine.model(), options)?;
                let slot = self.engine.budget().slot(conversation);
                let id = self
                    .sessions
                    .create(&o.session_id, slot.clone(), self.stream_id, self.principal.clone())?;
                self.slot = slot;
                self.session_id = Some(id.clone());
                id
            }
        };
        if mode == pb::SessionMode::Unspecified {
            let options = self.limits.session_options(o)?;
            self.slot.replace(Conversation::new(self.engine.model(), options)?);
        }
        let ready = self
            .slot
            .with(|c| pb::SessionReady {
                dimensions: saturating_u32(c.options().output_dimensions(c.model())),
                max_context_tokens: saturating_u32(c.options().max_context_tokens),
                session_id,
                context_tokens: saturating_u32(c.context_len()),
                turns: c.turns(),
            })
            .expect("no turn holds the conversation while options are applied");
        Ok(ResponseBody::Ready(ready))
    }

    fn reset(&mut self) -> ResponseBody {
        let released = self.slot.with(Conversation::reset).unwrap_or(0);
        ResponseBody::Reset(pb::ResetDone {
            released_tokens: saturating_u32(released),
        })
    }
}
