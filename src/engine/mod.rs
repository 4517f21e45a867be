//! The engine: one worker thread that owns all model work, fed through a
//! bounded queue.
//!
//! # Threading
//! Inference never runs on a Tokio worker. Streams send jobs over a
//! bounded channel (a full queue makes `send` wait: backpressure) and await a
//! oneshot reply. A turn's job carries the [`Slot`] its conversation rests
//! in; the worker takes the conversation out when the turn starts, and puts
//! it back before the answer goes, so no cache is ever shared while a turn
//! runs, and a queued turn's conversation can still be evicted (the
//! budget: [`KvBudget`]). If the reply's receiver is gone when the worker gets
//! to a job (the stream was cancelled or its client vanished), the job is
//! skipped and the conversation goes back unchanged: freed with its slot at
//! once, unless a resumable session keeps the slot.
//!
//! # Rounds
//! The worker works in rounds: it takes every job waiting (up to
//! [`BatchLimits::max_turns`]; when idle it blocks for the first) and hands
//! them to the scheduler, which batches turns of different streams into
//! shared calls and runs one call of the oldest long turn per round.
//! Nothing waits to fill a batch: a lone turn runs at once, and batches form
//! only when turns queue up behind a running call, which is when sharing the
//! weight reads pays. The texts of one `Embed` are one job.
//!
//! # Layout
//! * this module: [`Engine`] (the handle: [`Engine::turn`],
//!   [`Engine::embed`]) and the worker loop;
//! * `reply`: admission (a job's turns, each planned once) and the reply
//!   path (a stream's oneshot and slot, an `Embed`'s results);
//! * `schedule`: rounds, shared calls, long turns, and making room for each
//!   call ([`run_turns`] is the same rounds for library users);
//! * `budget`: the KV budget ([`KvBudget`]) and the slots conversations
//!   rest in ([`Slot`]);
//! * `stats`: the counters ([`EngineStats`]).
//!
//! Dropping the last [`Engine`] handle closes the queue; the worker finishes
//! the work in hand and exits, and `Drop` joins it.

mod budget;
mod reply;
mod schedule;
mod stats;

pub use budget::{DEFAULT_BUDGET_FRACTION, KvBudget, Resting, Slot, default_budget};
pub use schedule::{
    BatchLimits, DEFAULT_MAX_BATCH_PAST_TOKENS, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_BATCH_TURNS, TurnRequest,
    run_turns, run_turns_within,
};
pub use stats::EngineStats;

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::{conversation::ConversationOptions, model::Model};
pub use reply::{EmbedReply, TurnReply};
use reply::{Job, OpenReplies};
use schedule::Scheduler;
use stats::QueueTicket;

/// The engine's thread has exited while work was asked of it. It exits only
/// when every handle is gone, so this means it died (a panic): the process
/// cannot embed any more and must be restarted.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the inference engine has stopped: its thread exited unexpectedly")]
pub struct EngineStopped;

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
        let (tx, rx) = oneshot::channel();
        let span = tracing::Span::current();
        self.submit(1, |mut tickets| Job::Turn {
            slot,
            text,
            role,
            tx,
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
        let (tx, rx) = oneshot::channel();
        let span = tracing::Span::current();
        self.submit(texts.len(), |tickets| Job::Embed {
            texts,
            options,
            tx,
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

fn engine_worker(
    model: Arc<Model>,
    mut jobs_rx: mpsc::Receiver<Job>,
    stats: Arc<EngineStats>,
    limits: BatchLimits,
    budget: Arc<KvBudget>,
) {
    let mut scheduler = Scheduler::new(limits);
    let mut replies = OpenReplies::new(stats);
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
        let work = replies.admit(&model, jobs);
        scheduler.run_round(work, &mut replies, &budget);
    }
    tracing::debug!("engine queue closed; worker exits");
}
