//! The engine: one worker thread that owns all model work, fed through a
//! bounded queue.
//!
//! # Threading
//! Inference never runs on a Tokio worker. Streams send jobs over a
//! bounded channel (a full queue makes `send` wait: backpressure) and await a
//! oneshot reply. A turn's [`Conversation`] moves into the job and comes back
//! with the result ([`TurnReply`]), so no cache is ever shared or locked. If
//! the reply's receiver is gone when the worker gets to a job (the stream was
//! cancelled or its client vanished), the job is skipped and dropping it
//! frees the conversation's cache at once.
//!
//! # Rounds
//! The worker works in rounds: it takes every job waiting (up to
//! [`BatchLimits::max_turns`]; when idle it blocks for the first) and hands
//! them to the scheduler ([`crate::schedule`]), which batches turns of different streams
//! into shared calls and runs one chunk of the oldest long turn per round.
//! Nothing waits to fill a batch: a lone turn runs at once, and batches form
//! only when turns queue up behind a running call, which is when sharing the
//! weight reads pays. The texts of one `Embed` are one job.
//!
//! The engine's own part is where answers go: a stream's oneshot, or a slot
//! of an `Embed`'s reply, sent once every text has its result.
//!
//! Dropping the last [`Engine`] handle closes the queue; the worker finishes
//! the work in hand and exits, and `Drop` joins it.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    conversation::{Conversation, ConversationOptions, TurnError, TurnOutput},
    model::Model,
    schedule::{BatchLimits, Replies, Scheduler, Work},
};

/// The engine's thread has exited while work was asked of it. It exits only
/// when every handle is gone, so this means it died (a panic): the process
/// cannot embed any more and must be restarted.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the inference engine has stopped: its thread exited unexpectedly")]
pub struct EngineStopped;

/// What a turn job answers: the conversation back, and what the turn gave.
#[derive(Debug)]
pub struct TurnReply {
    /// The conversation, after the turn (or exactly as before, on error).
    pub conversation: Conversation,
    /// The turn's output or why it failed.
    pub result: Result<TurnOutput, TurnError>,
}

/// What an `Embed` job answers: one result per text, in order.
pub type EmbedReply = Vec<Result<TurnOutput, TurnError>>;

enum Job {
    Turn {
        conversation: Conversation,
        text: String,
        role: String,
        reply: oneshot::Sender<TurnReply>,
        span: tracing::Span,
        ticket: QueueTicket,
    },
    Embed {
        texts: Vec<String>,
        options: ConversationOptions,
        reply: oneshot::Sender<EmbedReply>,
        span: tracing::Span,
        tickets: Vec<QueueTicket>,
    },
}

/// Work counters, read by `GetStats`; only the engine moves them.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Turns (and stateless texts) embedded.
    turns: AtomicU64,
    /// Tokens prefilled by those turns.
    tokens: AtomicU64,
    /// Texts queued or running: one per live [`QueueTicket`].
    queued: AtomicUsize,
}

impl EngineStats {
    /// Turns (and stateless texts) embedded so far.
    pub fn turns(&self) -> u64 {
        self.turns.load(Ordering::Relaxed)
    }

    /// Tokens those turns prefilled.
    pub fn tokens(&self) -> u64 {
        self.tokens.load(Ordering::Relaxed)
    }

    /// Texts (turns and `Embed` texts) waiting in the queue or running.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// `n` tickets, each counted in [`EngineStats::queued`] until dropped.
    fn tickets(self: &Arc<Self>, n: usize) -> Vec<QueueTicket> {
        self.queued.fetch_add(n, Ordering::Relaxed);
        (0..n).map(|_| QueueTicket(self.clone())).collect()
    }
}

/// One text's place in [`EngineStats::queued`], given up on drop: whatever
/// path a text leaves the engine by (answered, abandoned, failed, dropped
/// with the engine), the count follows.
#[derive(Debug)]
struct QueueTicket(Arc<EngineStats>);

impl Drop for QueueTicket {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A handle on the engine thread. Share it with `Arc`.
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

    /// Queues the job `make` builds from its texts' tickets, waiting for room
    /// (backpressure). From the reservation to the send nothing can be
    /// cancelled, so the count and the queue agree.
    async fn submit(&self, texts: usize, make: impl FnOnce(Vec<QueueTicket>) -> Job) -> Result<(), EngineStopped> {
        let tx = self.jobs_tx.as_ref().ok_or(EngineStopped)?;
        let permit = tx.reserve().await.map_err(|_| EngineStopped)?;
        permit.send(make(self.stats.tickets(texts)));
        Ok(())
    }

    /// Runs one turn of `conversation`. Cancel-safe: dropping the future
    /// abandons the turn and (once the worker sees it) frees the conversation.
    ///
    /// # Errors
    /// [`EngineStopped`] when the engine thread has died (the conversation is lost with it).
    pub async fn turn(
        &self,
        conversation: Conversation,
        text: String,
        role: String,
    ) -> Result<TurnReply, EngineStopped> {
        let (reply, rx) = oneshot::channel();
        let span = tracing::Span::current();
        self.submit(1, |mut tickets| Job::Turn {
            conversation,
            text,
            role,
            reply,
            span,
            ticket: tickets.pop().expect("one ticket for one turn"),
        })
        .await?;
        rx.await.map_err(|_| EngineStopped)
    }

    /// Embeds each text alone, from an empty context; the texts are queued
    /// as one job, so they share model calls as far as their lengths allow.
    ///
    /// # Errors
    /// [`EngineStopped`] when the engine thread has died.
    pub async fn embed(&self, texts: Vec<String>, options: ConversationOptions) -> Result<EmbedReply, EngineStopped> {
        let (reply, rx) = oneshot::channel();
        let span = tracing::Span::current();
        self.submit(texts.len(), |tickets| Job::Embed {
            texts,
            options,
            reply,
            span,
            tickets,
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

/// Where a turn's answer goes, with the text's place in the queue count.
/// (Field order: the ticket drops last.)
struct Answer {
    to: AnswerTo,
    ticket: QueueTicket,
}

/// A stream's reply, or slot `index` of `Embed` job `job`.
enum AnswerTo {
    Stream(oneshot::Sender<TurnReply>),
    Embed { job: u64, index: usize },
}

/// An `Embed` job being answered: its reply, a slot per text, and how many
/// slots are still empty.
struct EmbedJob {
    reply: oneshot::Sender<EmbedReply>,
    slots: Vec<Option<Result<TurnOutput, TurnError>>>,
    open: usize,
}

/// The engine's replies: the counters and the `Embed` jobs still answering.
struct Answers {
    stats: Arc<EngineStats>,
    embeds: HashMap<u64, EmbedJob>,
    next_embed: u64,
}

fn engine_worker(model: Arc<Model>, mut jobs_rx: mpsc::Receiver<Job>, stats: Arc<EngineStats>, limits: BatchLimits) {
    let mut scheduler = Scheduler::new(limits);
    let mut answers = Answers {
        stats,
        embeds: HashMap::new(),
        next_embed: 0,
    };
    loop {
        let mut jobs = Vec::new();
        if scheduler.is_idle() {
            match jobs_rx.blocking_recv() {
                Some(job) => jobs.push(job),
                None => break,
            }
        }
        while jobs.len() < scheduler.max_jobs() {
            match jobs_rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let work = answers.admit(&model, jobs);
        scheduler.run_round(work, &mut answers);
    }
    tracing::debug!("engine queue closed; worker exits");
}

impl Answers {
    /// The turns of `jobs` as work for the scheduler; an `Embed` job gets a
    /// fresh conversation per text and a table entry for its slots.
    fn admit(&mut self, model: &Arc<Model>, jobs: Vec<Job>) -> Vec<Work<Answer>> {
        let mut work = Vec::with_capacity(jobs.len());
        for job in jobs {
            match job {
                Job::Turn {
                    conversation,
                    text,
                    role,
                    reply,
                    span,
                    ticket,
                } => work.push(Work {
                    conversation,
                    text,
                    role,
                    span,
                    reply: Answer {
                        to: AnswerTo::Stream(reply),
                        ticket,
                    },
                }),
                Job::Embed {
                    texts,
                    options,
                    reply,
                    span,
                    tickets,
                } => {
                    if reply.is_closed() {
                        continue; // the tickets drop with the job
                    }
                    let job = self.next_embed;
                    self.next_embed += 1;
                    let mut embed = EmbedJob {
                        reply,
                        slots: Vec::with_capacity(texts.len()),
                        open: 0,
                    };
                    for (index, (text, ticket)) in texts.into_iter().zip(tickets).enumerate() {
                        match Conversation::new(model, options.clone()) {
                            Ok(conversation) => {
                                embed.slots.push(None);
                                embed.open += 1;
                                work.push(Work {
                                    conversation,
                                    text,
                                    role: String::new(),
                                    span: span.clone(),
                                    reply: Answer {
                                        to: AnswerTo::Embed { job, index },
                                        ticket,
                                    },
                                });
                            }
                            Err(e) => embed.slots.push(Some(Err(e.into()))),
                        }
                    }
                    self.embeds.insert(job, embed);
                    self.finish_embed(job);
                }
            }
        }
        work
    }

    /// Sends an `Embed` job's reply once every text has its result.
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

impl Replies<Answer> for Answers {
    fn wanted(&self, reply: &Answer) -> bool {
        match &reply.to {
            AnswerTo::Stream(tx) => !tx.is_closed(),
            AnswerTo::Embed { job, .. } => self.embeds.get(job).is_some_and(|e| !e.reply.is_closed()),
        }
    }

    fn answer(
        &mut self,
        conversation: Conversation,
        reply: Answer,
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
        let Answer { to, ticket } = reply;
        match to {
            AnswerTo::Stream(tx) => {
                drop(ticket);
                // A failed send means the stream is gone: the conversation drops with it.
                let _ = tx.send(TurnReply { conversation, result });
            }
            AnswerTo::Embed { job, index } => {
                drop(conversation);
                drop(ticket);
                if let Some(embed) = self.embeds.get_mut(&job) {
                    embed.slots[index] = Some(result);
                    embed.open -= 1;
                }
                self.finish_embed(job);
            }
        }
    }

    fn abandon(&mut self, reply: Answer) {
        let Answer { to, ticket } = reply;
        drop(ticket);
        if let AnswerTo::Embed { job, .. } = to
            && let Some(embed) = self.embeds.get_mut(&job)
        {
            embed.open -= 1;
            if embed.open == 0 {
                self.embeds.remove(&job);
            }
        }
    }
}
