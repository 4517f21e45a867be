//! One `Converse` stream's task: reads requests in order, runs each (options,
//! a turn through the engine, a reset), writes one response per request,
//! and decides what becomes of a resumable session when the stream ends.

use std::{sync::Arc, time::Instant};

use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use super::{
    auth::Principal,
    convert::{embedding, saturating_u32},
    error::ServiceError,
    error::inbound_failure,
    sessions::{HalfCloseArm, OnHalfClose, Sessions},
    shared::Limits,
};
use crate::{
    conversation::{Conversation, TurnOutput},
    engine::{Engine, EngineStopped, Slot},
    pb::{self, converse_request::Action, converse_response::Result as ResponseBody},
};

/// A conversation's context, turns and last output, to put back.
type Snapshot = (Vec<u32>, u64, Option<TurnOutput>);

/// The trailer that names the session a handed-off stream held.
pub const RESUME_TRAILER: &str = "se-resume-session";

/// A fresh stream id (for logs and the session table).
pub(super) fn next_id() -> u64 {
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

impl Responses {
    pub(super) fn new(inner: ReceiverStream<Result<pb::ConverseResponse, Status>>, on_half_close: OnHalfClose) -> Self {
        Self { inner, on_half_close }
    }
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
    /// The server drains and the stream's session is in a shared store:
    /// ended at once, for the client to resume it on another replica.
    HandedOff,
    InboundError,
    EngineStopped,
}

/// What a stream did, for its closing log line.
#[derive(Debug)]
struct Tally {
    started: Instant,
    requests: u64,
    turns: u64,
    tokens: u64,
    rebuilds: u64,
    peak_kv_bytes: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Tally {
            started: Instant::now(),
            requests: 0,
            turns: 0,
            tokens: 0,
            rebuilds: 0,
            peak_kv_bytes: 0,
        }
    }
}

impl Tally {
    fn turn(&mut self, out: &TurnOutput) {
        self.turns += 1;
        self.tokens += out.turn_tokens as u64;
        self.rebuilds += u64::from(out.rebuilt_tokens > 0);
    }

    fn log(&self, ending: Ending, session: &str) {
        tracing::info!(
            ending = ?ending,
            duration_ms = self.started.elapsed().as_millis() as u64,
            requests = self.requests,
            turns = self.turns,
            tokens = self.tokens,
            rebuilds = self.rebuilds,
            peak_kv_bytes = self.peak_kv_bytes,
            session,
            "stream closed"
        );
    }
}

/// One Converse stream: holds its conversation's slot until the stream ends.
pub(super) struct ConverseTask {
    pub(super) engine: Arc<Engine>,
    pub(super) limits: Limits,
    pub(super) sessions: Arc<Sessions>,
    pub(super) stream_id: u64,
    pub(super) inbound: Streaming<pb::ConverseRequest>,
    /// Responses to the client; a failed send means the client is gone.
    pub(super) responses_tx: mpsc::Sender<Result<pb::ConverseResponse, Status>>,
    /// Cancelled after the server's drain deadline.
    pub(super) cancel: CancellationToken,
    /// Cancelled when the server starts draining (hands off shared sessions).
    pub(super) draining: CancellationToken,
    /// Where the conversation rests between turns (the engine has it during one).
    pub(super) slot: Arc<Slot>,
    /// The resumable session this stream holds, if any.
    pub(super) session_id: Option<String>,
    /// The token the stream came with (`--auth-token-file`).
    pub(super) principal: Option<Principal>,
    /// Ends a half-closed session once its responses have all gone out.
    pub(super) half_close: HalfCloseArm,
    /// Holds one of the server's stream slots for the task's lifetime.
    pub(super) _permit: OwnedSemaphorePermit,
}

impl ConverseTask {
    pub(super) async fn run(mut self) {
        let mut tally = Tally::default();
        tracing::info!("stream opened");
        let ending = loop {
            let request = match self.next_request().await {
                Ok(request) => request,
                Err(ending) => break ending,
            };
            let result = match self.handle(request.action, tally.requests, &mut tally).await {
                Ok(result) => result,
                Err(ending) => break ending,
            };
            if let Some(p) = self.slot.with(|c| c.peak_kv_bytes()) {
                tally.peak_kv_bytes = tally.peak_kv_bytes.max(p);
            }
            let response = pb::ConverseResponse {
                tag: request.tag,
                index: tally.requests,
                result: Some(result.unwrap_or_else(|e| ResponseBody::Error(e.to_pb()))),
            };
            tally.requests += 1;
            if self.responses_tx.send(Ok(response)).await.is_err() {
                break Ending::ClientGone;
            }
        };
        let session = self.end_session(ending);
        tally.log(ending, session);
    }

    /// The next request, or how the stream ended instead.
    async fn next_request(&mut self) -> Result<pb::ConverseRequest, Ending> {
        let draining = self.draining.clone();
        let message = tokio::select! {
            biased;
            () = self.cancel.cancelled() => return Err(self.shutting_down().await),
            () = draining.cancelled(), if self.shares() => return Err(self.hand_off().await),
            () = self.responses_tx.closed() => return Err(Ending::ClientGone),
            m = self.inbound.message() => m,
        };
        match message {
            Ok(Some(r)) => Ok(r),
            Ok(None) => Err(Ending::HalfClosed),
            Err(status) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "inbound stream failed");
                let _ = self.responses_tx.send(Err(inbound_failure(status))).await;
                Err(Ending::InboundError)
            }
        }
    }

    /// Runs one request's action: its response body or its in-band error,
    /// or how the stream ended meanwhile.
    async fn handle(
        &mut self,
        action: Option<Action>,
        index: u64,
        tally: &mut Tally,
    ) -> Result<Result<ResponseBody, ServiceError>, Ending> {
        Ok(match action {
            None => Err(ServiceError::NoAction),
            Some(Action::Options(o)) if index == 0 => {
                // A resume may wait for the lost stream's last turn.
                let (cancel, responses) = (self.cancel.clone(), self.responses_tx.clone());
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => return Err(self.shutting_down().await),
                    () = responses.closed() => return Err(Ending::ClientGone),
                    r = self.apply_options(&o) => r,
                }
            }
            Some(Action::Options(_)) => Err(ServiceError::OptionsNotFirst),
            Some(Action::Reset(_)) => self.reset().await,
            Some(Action::Turn(turn)) => {
                let asked = Instant::now();
                let before = self.snapshot();
                let job = self.engine.turn(self.slot.clone(), turn.text, turn.role);
                let reply = tokio::select! {
                    biased;
                    () = self.cancel.cancelled() => return Err(self.shutting_down().await),
                    () = self.responses_tx.closed() => return Err(Ending::ClientGone),
                    r = job => r,
                };
                metrics::histogram!("se_turn_seconds").record(asked.elapsed().as_secs_f64());
                match reply {
                    // A session's turn is answered once the store has it.
                    Ok(Ok(out)) => match self.persist(before).await {
                        Ok(()) => {
                            tally.turn(&out);
                            Ok(ResponseBody::Embedding(embedding(out)))
                        }
                        Err(e) => Err(e),
                    },
                    Ok(Err(e)) => Err(ServiceError::from(e)),
                    Err(stopped) => {
                        self.end_with(ServiceError::from(stopped)).await;
                        return Err(Ending::EngineStopped);
                    }
                }
            }
        })
    }

    /// What becomes of the stream's resumable session, if it has one, now
    /// that the stream has ended (for the closing log line).
    fn end_session(&self, ending: Ending) -> &'static str {
        let Some(id) = &self.session_id else {
            return "none";
        };
        match ending {
            // Ended once the responses have all gone out; kept if not.
            Ending::HalfClosed if self.half_close.arm(id) => "ends when its responses are out",
            Ending::HalfClosed | Ending::ClientGone | Ending::InboundError | Ending::HandedOff => {
                self.sessions.detach(id, self.stream_id);
                "detached"
            }
            Ending::ShuttingDown | Ending::EngineStopped => {
                self.sessions.end(id, self.stream_id);
                "ended"
            }
        }
    }

    /// Ends the stream with the drain deadline's UNAVAILABLE, or the dead
    /// engine's when that is why the server is stopping.
    async fn shutting_down(&self) -> Ending {
        if self.engine.is_stopped() {
            self.end_with(ServiceError::EngineStopped(EngineStopped)).await;
            return Ending::EngineStopped;
        }
        self.end_with(ServiceError::ShuttingDown).await;
        Ending::ShuttingDown
    }

    /// Ends a shared session's stream on a drain, right after its in-flight
    /// turn: UNAVAILABLE, with the session's id in the `se-resume-session`
    /// trailer, for the client to resume it on another replica.
    async fn hand_off(&self) -> Ending {
        let id = self.session_id.clone().unwrap_or_default();
        // The lease back in the store first, so that the resume finds it free.
        self.sessions.hand_off(&id, self.stream_id).await;
        let mut status = ServiceError::HandedOff { id: id.clone() }.to_status();
        if let Ok(value) = id.parse() {
            status.metadata_mut().insert(RESUME_TRAILER, value);
        }
        let _ = self.responses_tx.send(Err(status)).await;
        Ending::HandedOff
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
                let defaults = self.limits.default_options(self.engine.model());
                let slot = self
                    .sessions
                    .resume(
                        &o.session_id,
                        self.stream_id,
                        self.principal.as_ref(),
                        &self.engine,
                        &defaults,
                    )
                    .await?;
                self.session_id = Some(o.session_id.clone());
                // The lost stream's last turn may still be in the engine.
                slot.rested().await;
                self.slot = slot;
                o.session_id.clone()
            }
            pb::SessionMode::Create => {
                let options = self.limits.session_options(o, self.engine.model())?;
                let conversation = Conversation::new(self.engine.model(), options)?;
                let slot = self.engine.budget().slot(conversation);
                let id = self
                    .sessions
                    .create(&o.session_id, slot.clone(), self.stream_id, self.principal.clone())
                    .await?;
                self.slot = slot;
                self.session_id = Some(id.clone());
                id
            }
        };
        if mode == pb::SessionMode::Unspecified {
            let options = self.limits.session_options(o, self.engine.model())?;
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
                last_embedding: c.last_output().cloned().map(embedding),
            })
            .expect("no turn holds the conversation while options are applied");
        Ok(ResponseBody::Ready(ready))
    }

    async fn reset(&mut self) -> Result<ResponseBody, ServiceError> {
        let before = self.snapshot();
        let released = self.slot.with(Conversation::reset).unwrap_or(0);
        self.persist(before).await?;
        Ok(ResponseBody::Reset(pb::ResetDone {
            released_tokens: saturating_u32(released),
        }))
    }

    /// Whether the stream's conversation is a session kept in a shared
    /// store: then every change is written there before it is answered, and
    /// a drain hands the stream off.
    fn shares(&self) -> bool {
        self.session_id.is_some() && self.sessions.store().is_some()
    }

    /// The context's token ids and turns before a change, to put back if the
    /// store does not take the change (only for a shared session).
    fn snapshot(&self) -> Option<Snapshot> {
        if !self.shares() {
            return None;
        }
        self.slot
            .with(|c| (c.tokens().to_vec(), c.turns(), c.last_output().cloned()))
    }

    /// Writes a shared session's new state to the store; if the store does
    /// not take it, the conversation goes back to `before` (its cache
    /// dropped, rebuilt at the next turn) and the change fails in-band.
    async fn persist(&self, before: Option<Snapshot>) -> Result<(), ServiceError> {
        let (Some(id), Some((tokens, turns, last))) = (&self.session_id, before) else {
            return Ok(());
        };
        let written = self.sessions.persist(id, self.stream_id).await;
        if written.is_err() {
            self.slot.with(|c| c.roll_back(tokens, turns, last));
        }
        written
    }
}
