//! The engine's counters, read by `GetStats` and the metrics: work done,
//! and the texts queued or running, counted by tickets that give their
//! place up on drop, whatever path a text leaves the engine by.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

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

    /// Counts a turn answered: its tokens, and the context it rebuilt.
    pub(super) fn count(&self, turn_tokens: usize, rebuilt_tokens: usize) {
        self.turns.fetch_add(1, Ordering::Relaxed);
        self.tokens.fetch_add(turn_tokens as u64, Ordering::Relaxed);
        if rebuilt_tokens > 0 {
            self.rebuilds.fetch_add(1, Ordering::Relaxed);
            self.rebuilt_tokens.fetch_add(rebuilt_tokens as u64, Ordering::Relaxed);
        }
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
    pub(super) fn tickets(self: &Arc<Self>, n: usize) -> Vec<QueueTicket> {
        self.queued.fetch_add(n, Ordering::Relaxed);
        let now = Instant::now();
        (0..n).map(|_| QueueTicket(self.clone(), now)).collect()
    }
}

/// One text's place in [`EngineStats::queued`], given up on drop: whatever
/// path a text leaves the engine by (answered, abandoned, failed, dropped
/// with the engine), the count follows. It knows when the text was queued.
#[derive(Debug)]
pub(super) struct QueueTicket(Arc<EngineStats>, Instant);

impl QueueTicket {
    /// Counts the text's wait, from its submission until now (its round).
    pub(super) fn started(&self) {
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
