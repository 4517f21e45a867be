//! The engine: one worker thread that owns all model work, fed through a
//! bounded queue.
//!
//! # Threading
//! Inference never runs on a Tokio worker. Streams send jobs over a
//! bounded channel (a full queue makes `send` wait: backpressure) and await a
//! oneshot reply. A turn's job carries the [`Slot`] its conversation rests
//! in; the worker takes the conversation out when the turn starts, and puts
//! it back before the answer goes, so no cache is ever shared while a turn
//! runs, and a queued turn's conversation can still be evicted
//! ([`crate::memory`]). If the reply's receiver is gone when the worker gets
//! to a job (the stream was cancelled or its client vanished), the job is
//! skipped and the conversation goes back unchanged: freed with its slot at
//! once, unless a resumable session keeps the slot.
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

use std::time::{Duration, Instant};

use crate::{
    conversation::{Conversation, ConversationOptions, TurnError, TurnOutput},
    memory::{KvBudget, Slot},
    model::Model,
    schedule::{BatchLimits, Replies, Scheduler, Work},
};

/// The engine's thread has exited while work was asked of it. It exits only
/// when every handle is gone, so this means it died (a panic): the process
/// cannot embed any more and must be restarted.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the inference engine has stopped: its thread exited unexpectedly")]
pub struct EngineStopped;

/// What a turn job answers (the conversation is back in its slot by then:
/// after the turn, or exactly as before it on error).
pub type TurnReply = Result<TurnOutput, TurnError>;

/// What an `Embed` job answers: one result per text, in order.
pub type EmbedReply = Vec<Result<TurnOutput, TurnError>>;

enum Job {
    Turn {
        slot: Arc<Slot>,
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
    /// Turns that rebuilt an evicted cache, and the tokens they recomputed.
    rebuilds: AtomicU64,
    rebuilt_tokens: AtomicU64,
    /// Time texts waited between their submission and their first model
    /// call's round, summed and at most, in microseconds.
    queue_wait_us: AtomicU64,
    queue_wait_max_us: AtomicU64,
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

    /// Turns that had to rebuild an evicted cache before they ran.
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds.load(Ordering::Relaxed)
    }

    /// Tokens those rebuilds recomputed.
    pub fn rebuilt_tokens(&self) -> u64 {
        self.rebuilt_tokens.load(Ordering::Relaxed)
    }

    /// Total time texts waited in the queue before their round began.
    pub fn queue_wait_total(&self) -> Duration {
        Duration::from_micros(self.queue_wait_us.load(Ordering::Relaxed))
    }

    /// The longest such wait.
    pub fn queue_wait_max(&self) -> Duration {
        Duration::from_micros(self.queue_wait_max_us.load(Ordering::Relaxed))
    }

    /// `n` tickets, each counted in [`EngineStats::queued`] until dropped.
    fn tickets(self: &Arc<Self>, n: usize) -> Vec<QueueTicket> {
        self.queued.fetch_add(n, Ordering::Relaxed);
        let now = Instant::now();
        (0..n).map(|_| QueueTicket(self.clone(), now)).collect()
    }
}

/// One text's place in [`EngineStats::queued`], given up on drop: whatever
/// path a text leaves the engine by (answered, abandoned, failed, dropped
/// with the engine), the count follows. It knows when the text was queued.
#[derive(Debug)]
struct QueueTicket(Arc<EngineStats>, Instant);

impl QueueTicket {
    /// Counts the text's wait, from its submission until now (its round).
    fn started(&self) {
        let waited = u64::try_from(self.1.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.0.queue_wait_us.fetch_add(waited, Ordering::Relaxed);
        self.0.queue_wait_max_us.fetch_max(waited, Ordering::Relaxed);
        metrics::histogram!("se_queue_wait_seconds").record(self.1.elapsed().as_secs_f64());
    }
}

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
    budget: Arc<KvBudget>,
    /// Becomes true when the worker thread exits (for good: a panic, or
    /// every handle dropped).
    stopped: tokio::sync::watch::Receiver<bool>,
    worker: Option<std::thread::JoinHandle<()>>,
}

/// Marks the engine stopped when the worker thread exits, by return or by
/// unwinding from a panic.
struct ExitGuard(tokio::sync::watch::Sender<bool>);

impl Drop for ExitGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            tracing::error!("the engine thread panicked: the inference engine has stopped");
        }
        self.0.send_replace(true);
    }
}

impl Engine {
    /// Starts the worker thread with a queue of `queue_depth` jobs, batching
    /// queued turns within `limits` and keeping every cache within `budget`
    /// (which must be over the engine's model).
    ///
    /// # Panics
    /// If the OS cannot spawn a thread.
    pub fn start(model: Arc<Model>, queue_depth: usize, limits: BatchLimits, budget: Arc<KvBudget>) -> Engine {
        let (jobs_tx, jobs_rx) = mpsc::channel(queue_depth.max(1));
        let stats = Arc::new(EngineStats::default());
        let worker_stats = stats.clone();
        let worker_model = model.clone();
        let worker_budget = budget.clone();
        let (stopped_tx, stopped) = tokio::sync::watch::channel(false);
        let worker = std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let _exit = ExitGuard(stopped_tx);
                engine_worker(worker_model, jobs_rx, worker_stats, limits, worker_budget);
            })
            .expect("the OS can spawn the engine thread");
        Engine {
            jobs_tx: Some(jobs_tx),
            stats,
            model,
            budget,
            stopped,
            worker: Some(worker),
        }
    }

    /// Whether the worker thread has exited (while handles remain, that
    /// means it died: see [`EngineStopped`]).
    pub fn is_stopped(&self) -> bool {
        *self.stopped.borrow()
    }

    /// Resolves once the worker thread has exited.
    pub async fn stopped(&self) {
        let mut stopped = self.stopped.clone();
        let _ = stopped.wait_for(|s| *s).await;
    }

    /// The KV budget the engine keeps; conversations rest in its slots.
    pub fn budget(&self) -> &Arc<KvBudget> {
        &self.budget
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

    /// Runs one turn of the conversation resting in `slot` (a slot of this
    /// engine's [`Engine::budget`]). Cancel-safe: dropping the future
    /// abandons the turn; once the worker sees it, the conversation goes back
    /// into its slot as it was (and is freed with the slot if nobody else
    /// holds it).
    ///
    /// # Errors
    /// [`EngineStopped`] when the engine thread has died (the conversation
    /// may be lost with it).
    pub async fn turn(&self, slot: Arc<Slot>, text: String, role: String) -> Result<TurnReply, EngineStopped> {
        let (reply, rx) = oneshot::channel();
        let span = tracing::Span::current();
        self.submit(1, |mut tickets| Job::Turn {
            slot,
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

/// A stream's reply (and the slot its conversation goes back to), or slot
/// `index` of `Embed` job `job`.
enum AnswerTo {
    Stream {
        tx: oneshot::Sender<TurnReply>,
        slot: Arc<Slot>,
    },
    Embed {
        job: u64,
        index: usize,
    },
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

fn engine_worker(
    model: Arc<Model>,
    mut jobs_rx: mpsc::Receiver<Job>,
    stats: Arc<EngineStats>,
    limits: BatchLimits,
    budget: Arc<KvBudget>,
) {
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
        scheduler.run_round(work, &mut answers, &*budget);
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
                    slot,
                    text,
                    role,
                    reply,
                    span,
                    ticket,
                } => {
                    ticket.started();
                    if reply.is_closed() {
                        continue; // the conversation rests in its slot, untouched
                    }
                    let Some(conversation) = slot.take() else {
                        // The service sends a conversation's turns one at a time.
                        let _ = reply.send(Err(TurnError::Busy));
                        continue;
                    };
                    work.push(Work {
                        conversation,
                        text,
                        role,
                        span,
                        reply: Answer {
                            to: AnswerTo::Stream { tx: reply, slot },
                            ticket,
                        },
                    });
                }
                Job::Embed {
                    texts,
                    options,
                    reply,
                    span,
                    tickets,
                } => {
                    for ticket in &tickets {
                        ticket.started();
                    }
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
            AnswerTo::Stream { tx, .. } => !tx.is_closed(),
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
            if out.rebuilt_tokens > 0 {
                self.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .rebuilt_tokens
                    .fetch_add(out.rebuilt_tokens as u64, Ordering::Relaxed);
            }
        }
        // Counters move and the conversation is back before the answer goes,
        // so that a client holding the answer sees them moved (and, for an
        // Embed, its caches gone), and its next turn finds the conversation.
        let Answer { to, ticket } = reply;
        match to {
            AnswerTo::Stream { tx, slot } => {
                slot.put(conversation);
                drop(ticket);
                // A failed send means the stream is gone: the conversation is
                // freed with its slot, unless a resumable session keeps it.
                let _ = tx.send(result);
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

    fn abandon(&mut self, conversation: Conversation, reply: Answer) {
        let Answer { to, ticket } = reply;
        match to {
            AnswerTo::Stream { slot, .. } => {
                slot.put(conversation);
                drop(slot);
            }
            AnswerTo::Embed { job, .. } => {
                drop(conversation);
                if let Some(embed) = self.embeds.get_mut(&job) {
                    embed.open -= 1;
                    if embed.open == 0 {
                        self.embeds.remove(&job);
                    }
                }
            }
        }
        drop(ticket);
    }
}
