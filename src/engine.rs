//! The engine: one worker thread that owns all model work, fed through a
//! bounded queue.
//!
//! # Threading
//! Inference never runs on a Tokio worker. Streams send jobs over a
//! bounded channel (a full queue makes `send` wait: backpressure) and await a
//! oneshot reply. A turn's [`Conversation`] moves into the job and comes back
//! with the result, so no cache is ever shared or locked. If the reply's
//! receiver is gone when the worker picks a job up (the stream was cancelled
//! or its client vanished), the job is skipped and dropping it frees the
//! conversation's cache at once.
//!
//! # Rounds: batching and long turns
//! The worker works in rounds. A round takes every job waiting (up to
//! [`BatchLimits::max_turns`]; when idle it blocks for the first) and runs
//! their turns through the batching of `run_turns`, which shares one model
//! call between turns of different streams that fit together. Nothing waits
//! to fill a batch: a lone turn runs at once, and batches form only when
//! turns queue up behind a running call, which is when sharing the weight
//! reads pays. The texts of one `Embed` are one job and run in chunks of at
//! most `max_turns` texts and `max_padded_tokens` bytes, so a request of many
//! texts holds only one chunk's caches at once.
//!
//! A turn longer than `prefill_chunk_tokens` (so several calls) does not hold
//! the engine for all of them: it joins a queue of long turns, and each round
//! ends with one chunk of the oldest. Short turns of other streams are thus
//! answered within about one chunk's time however long the prefill in
//! progress, and only the oldest long turn holds a part-built cache. A long
//! turn whose stream has gone is dropped before its next chunk, which frees
//! its cache then rather than after the whole prefill.
//!
//! Dropping the last [`Engine`] handle closes the queue; the worker finishes
//! the work in hand and exits, and `Drop` joins it.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    conversation::{
        Advance, BatchLimits, Conversation, ConversationOptions, PendingTurn, Started, TurnError, TurnOutput,
        TurnRequest, start_turns,
    },
    model::Model,
};

/// The engine stopped (only during shutdown).
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the inference engine has stopped")]
pub struct EngineStopped;

/// A turn's reply: the conversation back, and what the turn gave.
pub type TurnReply = (Conversation, Result<TurnOutput, TurnError>);

enum Job {
    Turn {
        conversation: Conversation,
        text: String,
        role: String,
        reply: oneshot::Sender<TurnReply>,
        span: tracing::Span,
    },
    Embed {
        texts: Vec<String>,
        options: ConversationOptions,
        reply: oneshot::Sender<Vec<Result<TurnOutput, TurnError>>>,
        span: tracing::Span,
    },
}

impl Job {
    /// Texts the job embeds (what `EngineStats::queued` counts).
    fn texts(&self) -> usize {
        match self {
            Job::Turn { .. } => 1,
            Job::Embed { texts, .. } => texts.len(),
        }
    }
}

/// Work counters, read by `GetStats`.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Turns (and stateless texts) embedded.
    pub turns: AtomicU64,
    /// Tokens prefilled by those turns.
    pub tokens: AtomicU64,
    /// Texts (turns and Embed texts) waiting in the queue or running.
    pub queued: AtomicUsize,
}

/// A handle on the engine thread. Cheap to clone via `Arc`.
#[derive(Debug)]
pub struct Engine {
    /// The queue; dropping the last sender stops the worker.
    jobs_tx: Option<mpsc::Sender<Job>>,
    stats: Arc<EngineStats>,
    model: Arc<Model>,
    worker: Option<std::thread::JoinHandle<()>>,
}

impl Engine {
    /// Starts the worker thread with a queue of `queue_depth` jobs, batching
    /// queued turns within `limits`.
    ///
    /// # Panics
    /// If the OS cannot spawn a thread.
    pub fn start(model: Arc<Model>, queue_depth: usize, limits: BatchLimits) -> Engine {
        let (jobs_tx, jobs_rx) = mpsc::channel(queue_depth.max(1));
        let stats = Arc::new(EngineStats::default());
        let worker_stats = stats.clone();
        let worker_model = model.clone();
        let worker = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || engine_worker(worker_model, jobs_rx, worker_stats, limits))
            .expect("the OS can spawn the engine thread");
        Engine {
            jobs_tx: Some(jobs_tx),
            stats,
            model,
            worker: Some(worker),
        }
    }

    /// The model the engine runs.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Work counters.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    async fn submit(&self, job: Job) -> Result<(), EngineStopped> {
        let tx = self.jobs_tx.as_ref().ok_or(EngineStopped)?;
        // Wait for room (backpressure); from here to the send nothing can be
        // cancelled, so the count and the queue agree.
        let permit = tx.reserve().await.map_err(|_| EngineStopped)?;
        self.stats.queued.fetch_add(job.texts(), Ordering::Relaxed);
        permit.send(job);
        Ok(())
    }

    /// Runs one turn of `conversation`. Cancel-safe: dropping the future
    /// abandons the turn and (once the worker sees it) frees the conversation.
    ///
    /// # Errors
    /// [`EngineStopped`] when the engine is shutting down (the conversation is lost with it).
    pub async fn turn(
        &self,
        conversation: Conversation,
        text: String,
        role: String,
    ) -> Result<TurnReply, EngineStopped> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Turn {
            conversation,
            text,
            role,
            reply,
            span: tracing::Span::current(),
        })
        .await?;
        rx.await.map_err(|_| EngineStopped)
    }

    /// Embeds each text alone, from an empty context; the texts are queued
    /// as one job, so they share model calls as far as their lengths allow.
    ///
    /// # Errors
    /// [`EngineStopped`] when the engine is shutting down.
    pub async fn embed(
        &self,
        texts: Vec<String>,
        options: ConversationOptions,
    ) -> Result<Vec<Result<TurnOutput, TurnError>>, EngineStopped> {
        let (reply, rx) = oneshot::channel();
        self.submit(Job::Embed {
            texts,
            options,
            reply,
            span: tracing::Span::current(),
        })
        .await?;
        rx.await.map_err(|_| EngineStopped)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.jobs_tx = None;
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            tracing::error!("the engine thread panicked");
        }
    }
}

/// Where a turn's answer goes: a stream's reply, or slot `index` of embed job `job`.
enum Reply {
    Turn(oneshot::Sender<TurnReply>),
    Embed { job: u64, index: usize },
}

/// An embed job being answered: its reply, a slot per text, and how many
/// slots are still empty.
struct EmbedJob {
    reply: oneshot::Sender<Vec<Result<TurnOutput, TurnError>>>,
    slots: Vec<Option<Result<TurnOutput, TurnError>>>,
    open: usize,
}

/// A turn that needs several calls, waiting for its next chunk.
struct LongTurn {
    conversation: Conversation,
    pending: PendingTurn,
    reply: Reply,
    span: tracing::Span,
}

/// The worker thread's state.
struct Worker {
    model: Arc<Model>,
    stats: Arc<EngineStats>,
    limits: BatchLimits,
    /// Long turns in arrival order; the first one advances a chunk per round.
    long: VecDeque<LongTurn>,
    /// Embed jobs with texts still to answer, by id.
    embeds: HashMap<u64, EmbedJob>,
    next_embed: u64,
}

fn engine_worker(model: Arc<Model>, mut jobs_rx: mpsc::Receiver<Job>, stats: Arc<EngineStats>, limits: BatchLimits) {
    let mut worker = Worker {
        model,
        stats,
        limits,
        long: VecDeque::new(),
        embeds: HashMap::new(),
        next_embed: 0,
    };
    let max_jobs = limits.max_turns.max(1);
    loop {
        // A round: every job waiting (blocking for one only when idle), then
        // one chunk of the oldest long turn.
        let mut jobs = Vec::new();
        if worker.long.is_empty() {
            match jobs_rx.blocking_recv() {
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        while jobs.len() < max_jobs {
            match jobs_rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        worker.run_jobs(jobs);
        worker.advance_long();
    }
    tracing::debug!("engine queue closed; worker exits");
}

impl Worker {
    fn run_jobs(&mut self, jobs: Vec<Job>) {
        // (conversation, text, role, reply, span) of every turn still wanted.
        let mut work = Vec::with_capacity(jobs.len());
        for job in jobs {
            match job {
                Job::Turn {
                    conversation,
                    text,
                    role,
                    reply,
                    span,
                } => {
                    if reply.is_closed() {
                        let _enter = span.enter();
                        tracing::debug!("turn abandoned before it ran; freeing its conversation");
                        // Freed before the count drops, so that a client that
                        // sees the queue empty sees the cache gone too.
                        drop(conversation);
                        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                    } else {
                        work.push((conversation, text, role, Reply::Turn(reply), span));
                    }
                }
                Job::Embed {
                    texts,
                    options,
                    reply,
                    span,
                } => {
                    if reply.is_closed() {
                        self.stats.queued.fetch_sub(texts.len(), Ordering::Relaxed);
                        continue;
                    }
                    let job = self.next_embed;
                    self.next_embed += 1;
                    let mut embed = EmbedJob {
                        reply,
                        slots: Vec::with_capacity(texts.len()),
                        open: 0,
                    };
                    for (index, text) in texts.into_iter().enumerate() {
                        match self.model.conversation(options.clone()) {
                            Ok(conversation) => {
                                embed.slots.push(None);
                                embed.open += 1;
                                work.push((
                                    conversation,
                                    text,
                                    String::new(),
                                    Reply::Embed { job, index },
                                    span.clone(),
                                ));
                            }
                            Err(e) => {
                                embed.slots.push(Some(Err(e.into())));
                                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                            }
                        }
                    }
                    self.embeds.insert(job, embed);
                    self.finish_embed(job);
                }
            }
        }

        // In chunks of at most `max_turns` turns and (beyond the first) of
        // `max_padded_tokens` bytes of text, which bounds their tokens: an
        // Embed of many texts never holds more than one chunk's caches at once.
        while !work.is_empty() {
            let (mut end, mut bytes) = (0, 0);
            while end < work.len()
                && end < self.limits.max_turns.max(1)
                && (end == 0 || bytes + work[end].1.len() <= self.limits.max_padded_tokens)
            {
                bytes += work[end].1.len();
                end += 1;
            }
            let mut chunk: Vec<_> = work.drain(..end).collect();
            let started = {
                let mut requests: Vec<TurnRequest<'_>> = chunk
                    .iter_mut()
                    .map(|(conversation, text, role, _, _)| TurnRequest {
                        conversation,
                        text,
                        role,
                    })
                    .collect();
                start_turns(&mut requests, self.limits)
            };
            if chunk.len() > 1 {
                tracing::debug!(turns = chunk.len(), "ran a batch of turns");
            }
            for ((conversation, _, _, reply, span), started) in chunk.into_iter().zip(started) {
                match started {
                    Started::Done(result) => self.answer(conversation, reply, &span, result),
                    Started::Pending(pending) => self.long.push_back(LongTurn {
                        conversation,
                        pending,
                        reply,
                        span,
                    }),
                }
            }
        }
    }

    /// Runs the next chunk of the oldest long turn still wanted.
    fn advance_long(&mut self) {
        while let Some(long) = self.long.pop_front() {
            let LongTurn {
                mut conversation,
                pending,
                reply,
                span,
            } = long;
            if !self.wanted(&reply) {
                let _enter = span.enter();
                tracing::debug!("long turn abandoned part-way; freeing its conversation");
                drop((conversation, pending));
                self.abandon(reply);
                continue;
            }
            let step = {
                let _enter = span.enter();
                conversation.advance(pending)
            };
            match step {
                Ok(Advance::More(pending)) => self.long.push_front(LongTurn {
                    conversation,
                    pending,
                    reply,
                    span,
                }),
                Ok(Advance::Done(output)) => self.answer(conversation, reply, &span, Ok(output)),
                Err(e) => self.answer(conversation, reply, &span, Err(e)),
            }
            return;
        }
    }

    /// Whether someone still waits for the reply.
    fn wanted(&self, reply: &Reply) -> bool {
        match reply {
            Reply::Turn(tx) => !tx.is_closed(),
            Reply::Embed { job, .. } => self.embeds.get(job).is_some_and(|e| !e.reply.is_closed()),
        }
    }

    /// Gives up a turn nobody waits for (its conversation already dropped).
    fn abandon(&mut self, reply: Reply) {
        self.stats.queued.fetch_sub(1, Ordering::Relaxed);
        if let Reply::Embed { job, .. } = reply
            && let Some(embed) = self.embeds.get_mut(&job)
        {
            embed.open -= 1;
            if embed.open == 0 {
                self.embeds.remove(&job);
            }
        }
    }

    /// Delivers a turn's result.
    fn answer(
        &mut self,
        conversation: Conversation,
        reply: Reply,
        span: &tracing::Span,
        result: Result<TurnOutput, TurnError>,
    ) {
        let _enter = span.enter();
        if let Ok(out) = &result {
            self.stats.turns.fetch_add(1, Ordering::Relaxed);
            self.stats.tokens.fetch_add(out.turn_tokens as u64, Ordering::Relaxed);
        }
        // Counters move before the answer goes, so that a client holding the
        // answer sees them moved (and, for an Embed, its caches gone).
        match reply {
            Reply::Turn(tx) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                // A failed send means the stream is gone: the conversation drops with it.
                let _ = tx.send((conversation, result));
            }
            Reply::Embed { job, index } => {
                drop(conversation);
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                if let Some(embed) = self.embeds.get_mut(&job) {
                    embed.slots[index] = Some(result);
                    embed.open -= 1;
                }
                self.finish_embed(job);
            }
        }
    }

    /// Sends an embed job's reply once every text has its result.
    fn finish_embed(&mut self, job: u64) {
        if self.embeds.get(&job).is_some_and(|e| e.open == 0)
            && let Some(embed) = self.embeds.remove(&job)
        {
            let results = embed
                .slots
                .into_iter()
                .map(|r| r.expect("every text of an embed job has a result"))
                .collect();
            let _ = embed.reply.send(results);
        }
    }
}
