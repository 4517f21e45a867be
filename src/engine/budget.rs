//! The KV budget: one cap on the bytes of every KV cache together, kept by
//! evicting the caches of idle conversations and rebuilding them by
//! recomputation when their next turn comes.
//!
//! # Where conversations rest
//! Between turns a stream's [`Conversation`] rests in a [`Slot`] that the
//! stream (and, for a resumable session, the session table) holds; the
//! budget keeps a weak reference to every slot. The engine takes the
//! conversation out of its slot when the turn starts running and puts it
//! back when the turn is answered (or abandoned), so a conversation whose
//! turn is still queued rests in its slot and can be evicted too.
//!
//! # The budget
//! The model's ledger ([`Model::kv_cache_bytes`]) counts every live cache,
//! the part-built cache of a long turn, and the outputs and packed inputs of
//! a call while it runs. Before each model call the scheduler asks the
//! budget what the call adds ([`KvBudget::call_bytes`], the ledger's own
//! formula) and for room for it ([`KvBudget::make_room`]); if the ledger
//! plus those bytes is over the limit, the budget drops the caches of
//! resting conversations, least recently used first, until it fits (their
//! token ids stay: [`Conversation::evict_cache`]); the scheduler may then
//! evict the caches of the turns of its round too, counted here
//! ([`KvBudget::record_eviction`]). Only the engine thread makes caches, so
//! once it has made room, nothing else can take it: the ledger never
//! exceeds the limit. `--idle-evict-seconds` evicts the same way by age
//! ([`KvBudget::evict_idle`]).

use std::{
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    conversation::Conversation,
    model::{Call, Model},
    platform,
};

/// The share of the memory available at start (after the model's weights)
/// that the default `--max-kv-bytes` gives the KV caches: the rest is for
/// ONNX Runtime's activations and arena, the streams and the OS.
pub const DEFAULT_BUDGET_FRACTION: f64 = 0.5;

/// Where a conversation rests between turns (see the module docs).
#[derive(Debug)]
pub struct Slot {
    state: Mutex<SlotState>,
    /// Woken when the engine puts the conversation back.
    returned: tokio::sync::Notify,
}

#[derive(Debug)]
struct SlotState {
    /// `None` while the engine runs a turn of it.
    conversation: Option<Conversation>,
    /// When its last turn was answered (or when it was created).
    last_used: Instant,
}

impl Slot {
    fn state(&self) -> std::sync::MutexGuard<'_, SlotState> {
        // A panic while the lock was held cannot leave a half-made state: every
        // critical section is a take, a put or a call on a whole conversation.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes the conversation out to run a turn; `None` if a turn has it.
    pub fn take(&self) -> Option<Conversation> {
        self.state().conversation.take()
    }

    /// Puts the conversation back after a turn and wakes whoever waits for it.
    pub fn put(&self, conversation: Conversation) {
        {
            let mut state = self.state();
            state.conversation = Some(conversation);
            state.last_used = Instant::now();
        }
        self.returned.notify_waiters();
    }

    /// Runs `f` on the resting conversation; `None` if a turn has it.
    pub fn with<R>(&self, f: impl FnOnce(&mut Conversation) -> R) -> Option<R> {
        self.state().conversation.as_mut().map(f)
    }

    /// Replaces the resting conversation (new session options).
    pub fn replace(&self, conversation: Conversation) {
        let mut state = self.state();
        state.conversation = Some(conversation);
        state.last_used = Instant::now();
    }

    /// Waits until no turn holds the conversation (a resumed session whose
    /// last turn, from the stream that was lost, is still in the engine).
    pub async fn rested(&self) {
        loop {
            let notified = self.returned.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state().conversation.is_some() {
                return;
            }
            notified.await;
        }
    }
}

/// How the resting conversations stand (for `GetStats`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Resting {
    /// Conversations whose cache covers their context (empty ones included).
    pub resident: usize,
    /// Conversations whose cache was evicted (token ids only).
    pub evicted: usize,
}

/// The global KV budget (see the module docs). Share it with `Arc`.
#[derive(Debug)]
pub struct KvBudget {
    limit: u64,
    model: Arc<Model>,
    slots: Mutex<Vec<Weak<Slot>>>,
    evictions: AtomicU64,
    evicted_tokens: AtomicU64,
}

impl KvBudget {
    /// A budget of `limit` bytes over `model`'s caches (`u64::MAX`: no limit).
    pub fn new(model: Arc<Model>, limit: u64) -> Arc<KvBudget> {
        Arc::new(KvBudget {
            limit,
            model,
            slots: Mutex::new(Vec::new()),
            evictions: AtomicU64::new(0),
            evicted_tokens: AtomicU64::new(0),
        })
    }

    /// The cap, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes counted now (every cache, and a running call's).
    pub fn used(&self) -> u64 {
        self.model.kv_cache_bytes()
    }

    /// Caches evicted so far (by the budget, by age, or by the scheduler).
    pub fn evictions(&self) -> u64 {
        self.evictions.load(Ordering::Relaxed)
    }

    /// Tokens whose cache those evictions dropped.
    pub fn evicted_tokens(&self) -> u64 {
        self.evicted_tokens.load(Ordering::Relaxed)
    }

    /// Bytes a model call over `rows` adds at its peak (the model's ledger
    /// formula: see [`Call`]).
    pub fn call_bytes(&self, rows: &[Call]) -> u64 {
        self.model.call_bytes(rows)
    }

    /// Counts an eviction of `tokens` tokens (made by the budget, or by the
    /// scheduler among the turns of its round).
    pub fn record_eviction(&self, tokens: usize) {
        self.evictions.fetch_add(1, Ordering::Relaxed);
        self.evicted_tokens.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    /// A slot for `conversation`, known to the budget from now on.
    pub fn slot(&self, conversation: Conversation) -> Arc<Slot> {
        let slot = Arc::new(Slot {
            state: Mutex::new(SlotState {
                conversation: Some(conversation),
                last_used: Instant::now(),
            }),
            returned: tokio::sync::Notify::new(),
        });
        let mut slots = self.slots();
        // Forget the slots that are gone, now and then, so the list stays
        // about as long as the live ones.
        if slots.len() >= 64 && slots.len().is_power_of_two() {
            slots.retain(|w| w.strong_count() > 0);
        }
        slots.push(Arc::downgrade(&slot));
        slot
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Vec<Weak<Slot>>> {
        self.slots.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The live slots (dropping the dead ones from the list).
    fn live(&self) -> Vec<Arc<Slot>> {
        let mut slots = self.slots();
        let mut live = Vec::with_capacity(slots.len());
        slots.retain(|w| match w.upgrade() {
            Some(slot) => {
                live.push(slot);
                true
            }
            None => false,
        });
        live
    }

    /// Whether `need` more bytes fit under the limit, after evicting the
    /// caches of resting conversations (least recently used first) if they
    /// do not.
    pub fn make_room(&self, need: u64) -> bool {
        if self.used().saturating_add(need) <= self.limit {
            return true;
        }
        let mut candidates: Vec<(Instant, Arc<Slot>)> = self
            .live()
            .into_iter()
            .filter_map(|slot| {
                let last_used = {
                    let state = slot.state.try_lock().ok()?;
                    let c = state.conversation.as_ref()?;
                    if c.kv_bytes() == 0 {
                        return None;
                    }
                    state.last_used
                };
                Some((last_used, slot))
            })
            .collect();
        candidates.sort_by_key(|(last_used, _)| *last_used);
        for (_, slot) in candidates {
            self.evict(&slot);
            if self.used().saturating_add(need) <= self.limit {
                return true;
            }
        }
        false
    }

    fn evict(&self, slot: &Slot) {
        let tokens = slot.with(|c| (c.context_len(), c.evict_cache()));
        if let Some((tokens, freed)) = tokens
            && freed > 0
        {
            self.record_eviction(tokens);
        }
    }

    /// Evicts the caches of conversations that have rested `idle_for` or
    /// longer; returns how many.
    pub fn evict_idle(&self, idle_for: Duration) -> usize {
        let now = Instant::now();
        let mut n = 0;
        for slot in self.live() {
            let old = {
                let state = slot.state();
                state.conversation.as_ref().is_some_and(|c| c.kv_bytes() > 0)
                    && now.duration_since(state.last_used) >= idle_for
            };
            if old {
                self.evict(&slot);
                n += 1;
            }
        }
        n
    }

    /// How the resting conversations stand.
    pub fn resting(&self) -> Resting {
        let mut resting = Resting::default();
        for slot in self.live() {
            match slot.with(|c| c.is_resident()) {
                Some(true) => resting.resident += 1,
                Some(false) => resting.evicted += 1,
                None => resting.resident += 1, // in a turn: it is being made resident
            }
        }
        resting
    }
}

/// The bytes the default `--max-kv-bytes` allows: [`DEFAULT_BUDGET_FRACTION`]
/// of the memory available now (the smaller of the system's and the
/// cgroup's, for a container), less `model_bytes` (weights about to be
/// loaded). `None` if the available memory cannot be read.
pub fn default_budget(model_bytes: u64) -> Option<u64> {
    let free = platform::memory::available()?.saturating_sub(model_bytes);
    Some((free as f64 * DEFAULT_BUDGET_FRACTION) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_budget_is_a_share_of_what_is_available() {
        let available = platform::memory::available().expect("MemAvailable is readable");
        assert!(default_budget(0).unwrap() <= available);
        assert_eq!(default_budget(u64::MAX), Some(0));
    }
}
