//! Scheduling: which turns share a model call, how a round's work is cut into
//! chunks, and when the chunks of long turns run.
//!
//! # Grouping
//! [`run_turns`] (and the engine's rounds, through `start_turns`) plans one
//! turn on each of several conversations, groups the turns that fit in one
//! call by length, and runs each group as one padded call
//! ([`crate::model::Model::forward_batch`]): short turns share the weight
//! reads that dominate their cost. [`BatchLimits`] bounds a group; the `PAD_*`
//! rules keep a group from padding more than it saves.
//!
//! # Rounds
//! The engine thread hands `Scheduler::run_round` every job that waited
//! since the last round. A round runs them in chunks of at most
//! [`BatchLimits::max_turns`] turns and `max_padded_tokens` bytes of text (so
//! an `Embed` of many texts holds only one chunk's caches at once), then runs
//! one chunk of the oldest long turn: a turn longer than
//! `prefill_chunk_tokens` never holds the engine for all its calls, so other
//! streams are answered within about one chunk's time. Only the oldest long
//! turn holds a part-built cache; one whose requester has gone is dropped
//! before its next chunk, which frees its cache then.
//!
//! # Memory
//! Before each model call the scheduler asks its [`Room`] for the bytes the
//! call adds (see [`crate::memory`]). When the budget cannot give them by
//! evicting resting conversations, a batch runs as single turns, then the
//! round's other conversations' caches are evicted (their plans redone as
//! rebuilds), then the turn's own cache when it is not read (or the turn is
//! redone as a rebuild, in chunks); a turn that still does not fit fails
//! with [`TurnError::OverBudget`], its conversation unchanged.
//!
//! The scheduler decides what runs; where answers go (a stream's oneshot, a
//! slot of an `Embed`) is the engine's, behind the `Replies` trait.

use std::{collections::VecDeque, sync::Arc};

use crate::{
    conversation::{Advance, Conversation, PendingTurn, Pooler, TurnError, TurnOutput, TurnPlan},
    model::BatchRow,
};

/// How turns of different conversations are grouped into shared model calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most turns in one call; 1 turns batching off.
    pub max_turns: usize,
    /// Most padded token slots in one call (turns × (longest cache + longest
    /// turn)): bounds the call's extra memory, about twice the slots' KV bytes
    /// (the packed caches in, the batched `present.*` out): at the default,
    /// 2 × 16,384 × 24 KiB = 768 MiB on the real model in f32.
    pub max_padded_tokens: usize,
}

/// The default [`BatchLimits::max_turns`] (`--max-batch-turns`).
pub const DEFAULT_MAX_BATCH_TURNS: usize = 16;
/// The default [`BatchLimits::max_padded_tokens`] (`--max-batch-tokens`).
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 16_384;

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_turns: DEFAULT_MAX_BATCH_TURNS,
            max_padded_tokens: DEFAULT_MAX_BATCH_TOKENS,
        }
    }
}

/// Padding each turn beyond the first may bring into a group, when that is more
/// than a quarter of the group's real tokens. A pad row costs a GEMM row (about
/// 4 ms on the real model on 2 cores) and a call saved is worth about ten of
/// them (the ~45 ms read of the weights); a pad cache slot costs copies and
/// attention only, about a hundredth of a row.
const PAD_NEW_PER_TURN: usize = 8;
const PAD_PAST_PER_TURN: usize = 256;

/// Memory for model calls: see the module docs.
pub trait Room {
    /// Whether `need` more bytes fit under the budget, after evicting
    /// resting conversations' caches if they did not.
    fn make_room(&self, need: u64) -> bool;
    /// Counts a cache the scheduler evicted itself (a conversation of the round).
    fn evicted(&self, tokens: usize);
    /// The budget, in bytes.
    fn limit(&self) -> u64;
}

/// No budget: every call fits ([`run_turns`] for library users).
#[derive(Debug, Clone, Copy, Default)]
pub struct Unlimited;

impl Room for Unlimited {
    fn make_room(&self, _need: u64) -> bool {
        true
    }

    fn evicted(&self, _tokens: usize) {}

    fn limit(&self) -> u64 {
        u64::MAX
    }
}

/// One turn for [`run_turns`].
#[derive(Debug)]
pub struct TurnRequest<'a> {
    /// The conversation the turn extends.
    pub conversation: &'a mut Conversation,
    /// The turn's text.
    pub text: &'a str,
    /// Its ChatML role, or "" for raw text.
    pub role: &'a str,
}

/// Turns that share one call: indices into the requests, with the padded shape.
#[derive(Debug, Default)]
struct Group {
    members: Vec<usize>,
    max_past: usize,
    max_new: usize,
    sum_past: usize,
    sum_new: usize,
}

impl Group {
    /// Whether a turn of `new` tokens on a cache of `past` may join the group.
    fn fits(&self, past: usize, new: usize, limits: BatchLimits) -> bool {
        let rows = self.members.len() + 1;
        let (p, n) = (self.max_past.max(past), self.max_new.max(new));
        let (real_past, real_new) = (self.sum_past + past, self.sum_new + new);
        rows <= limits.max_turns
            && rows * (p + n) <= limits.max_padded_tokens
            && rows * n - real_new <= (real_new / 4).max(PAD_NEW_PER_TURN * (rows - 1))
            && rows * p - real_past <= (real_past / 4).max(PAD_PAST_PER_TURN * (rows - 1))
    }

    fn add(&mut self, index: usize, past: usize, new: usize) {
        self.members.push(index);
        self.max_past = self.max_past.max(past);
        self.max_new = self.max_new.max(new);
        self.sum_past += past;
        self.sum_new += new;
    }
}

/// Groups `(index, past, new)` candidates, longest turns first so that each
/// group pads its turns little (a pad row costs as much as a real one; a pad
/// cache slot far less).
fn group(mut candidates: Vec<(usize, usize, usize)>, limits: BatchLimits) -> Vec<Group> {
    candidates.sort_by(|a, b| b.2.cmp(&a.2).then(b.1.cmp(&a.1)));
    let mut groups: Vec<Group> = Vec::new();
    for (i, past, new) in candidates {
        match groups.last_mut() {
            Some(g) if g.fits(past, new, limits) => g.add(i, past, new),
            _ => {
                let mut g = Group::default();
                g.add(i, past, new);
                groups.push(g);
            }
        }
    }
    groups
}

/// Runs one turn on each conversation, each with the result and the
/// all-or-nothing guarantee of [`Conversation::turn`].
///
/// Turns of conversations on the same model that each fit in one call are
/// grouped by length and run together, padded, in one model call per group
/// (see [`crate::model::Model::forward_batch`]): short turns share the weight
/// reads that dominate their cost. A group's embeddings equal the
/// turn-by-turn ones up to float rounding. A turn alone in its group, a turn
/// needing several calls, and every turn of a group whose call failed run on
/// their own.
pub fn run_turns(requests: &mut [TurnRequest<'_>], limits: BatchLimits) -> Vec<Result<TurnOutput, TurnError>> {
    run_turns_within(requests, limits, &Unlimited)
}

/// [`run_turns`] within a memory budget: before each call the scheduler asks
/// `room` for the bytes it adds, and when it cannot have them evicts the
/// other requests' caches, then the turn's own (see the module docs); each
/// chunk of a turn that needs several calls is checked too (the
/// engine's rounds run them a chunk per round, each checked the same way).
pub fn run_turns_within(
    requests: &mut [TurnRequest<'_>],
    limits: BatchLimits,
    room: &impl Room,
) -> Vec<Result<TurnOutput, TurnError>> {
    let started = start_turns(requests, limits, room);
    requests
        .iter_mut()
        .zip(started)
        .map(|(r, started)| match started {
            Started::Done(result) => result,
            Started::Pending(mut pending) => loop {
                match advance_within(r.conversation, pending, r.text, r.role, room)? {
                    Advance::Done(output) => break Ok(output),
                    Advance::More(rest) => pending = rest,
                }
            },
        })
        .collect()
}

/// Where [`start_turns`] leaves a turn.
#[derive(Debug)]
pub(crate) enum Started {
    /// It ran (alone or in a shared call), or could not.
    Done(Result<TurnOutput, TurnError>),
    /// It needs several calls: none has run yet; [`Conversation::advance`]
    /// on its conversation runs them.
    Pending(PendingTurn),
}

/// [`run_turns`] without the turns that need several calls: those come back
/// pending, so that the engine can run their chunks between other work.
pub(crate) fn start_turns(requests: &mut [TurnRequest<'_>], limits: BatchLimits, room: &impl Room) -> Vec<Started> {
    let mut results: Vec<Option<Started>> = requests.iter().map(|_| None).collect();
    let mut plans: Vec<Option<TurnPlan>> = Vec::with_capacity(requests.len());
    let mut candidates = Vec::new();
    let model = requests.first().map(|r| r.conversation.model().clone());
    for (i, r) in requests.iter().enumerate() {
        match r.conversation.plan(r.text, r.role) {
            Ok(plan) => {
                let shares_model = model.as_ref().is_some_and(|m| Arc::ptr_eq(m, r.conversation.model()));
                if limits.max_turns > 1 && shares_model && r.conversation.single_call(&plan) {
                    candidates.push((i, r.conversation.base_len(&plan), plan.sequence.len()));
                }
                plans.push(Some(plan));
            }
            Err(e) => {
                results[i] = Some(Started::Done(Err(e)));
                plans.push(None);
            }
        }
    }

    if let Some(model) = &model {
        for group in group(candidates, limits).iter().filter(|g| g.members.len() > 1) {
            let shape: Vec<(usize, usize)> = group
                .members
                .iter()
                .map(|&i| {
                    let plan = plans[i].as_ref().expect("grouped turns have plans");
                    (requests[i].conversation.base_len(plan), plan.sequence.len())
                })
                .collect();
            // (Each row's cache is copied out of the batch without its probe.)
            if !room.make_room(model.batch_call_bytes(&shape)) {
                tracing::debug!(
                    turns = group.members.len(),
                    "no room for a batched call; its turns run alone"
                );
                continue;
            }
            let batched = {
                let empty = model.empty_cache();
                let rows: Vec<BatchRow<'_>> = group
                    .members
                    .iter()
                    .map(|&i| {
                        let plan = plans[i].as_ref().expect("grouped turns have plans");
                        BatchRow {
                            ids: &plan.sequence,
                            past: if plan.rebuild {
                                &empty
                            } else {
                                requests[i].conversation.cache()
                            },
                            keep: plan.rows(),
                            cut: plan.probe_tokens,
                        }
                    })
                    .collect();
                model.forward_batch(&rows)
            };
            match batched {
                Ok(outputs) => {
                    for (&i, (hidden, cache)) in group.members.iter().zip(outputs) {
                        let plan = plans[i].take().expect("grouped turns have plans");
                        let mut pooler = Pooler::new(hidden.width, &plan);
                        pooler.add_rows(&hidden, plan.rows().start);
                        let output = requests[i].conversation.adopt(plan, pooler, cache);
                        results[i] = Some(Started::Done(Ok(output)));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, turns = group.members.len(), "a batched call failed; running its turns one by one")
                }
            }
        }
    }

    // Everything not yet answered runs alone, or waits for its calls.
    for i in 0..requests.len() {
        let Some(mut plan) = plans[i].take() else { continue };
        loop {
            let c = &requests[i].conversation;
            if !c.single_call(&plan) {
                let pending = PendingTurn::new(plan, c.model().spec().hidden_size);
                results[i] = Some(Started::Pending(pending));
                break;
            }
            let need = c.plan_bytes(&plan);
            if room.make_room(need) {
                results[i] = Some(Started::Done(requests[i].conversation.run_alone(plan)));
                break;
            }
            // The others of the round first, then the turn's own cache.
            evict_others(requests, &mut plans, &mut results, i, room);
            if room.make_room(need) {
                continue;
            }
            let c = &mut *requests[i].conversation;
            if c.kv_bytes() == 0 {
                results[i] = Some(Started::Done(Err(TurnError::OverBudget {
                    need,
                    budget: room.limit(),
                })));
                break;
            }
            room.evicted(c.context_len());
            c.evict_cache();
            if !plan.rebuild {
                match c.plan(requests[i].text, requests[i].role) {
                    Ok(p) => plan = p,
                    Err(e) => {
                        results[i] = Some(Started::Done(Err(e)));
                        break;
                    }
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.expect("every turn has a result"))
        .collect()
}

/// Runs the next chunk of a pending turn if there is room for it: if not,
/// the conversation's own cache is evicted too (a turn that still reads it is
/// planned again as a rebuild); if there is still no room, the turn fails
/// with [`TurnError::OverBudget`].
fn advance_within(
    conversation: &mut Conversation,
    mut pending: PendingTurn,
    text: &str,
    role: &str,
    room: &impl Room,
) -> Result<Advance, TurnError> {
    let mut need = conversation.chunk_bytes(&pending);
    if !room.make_room(need) && conversation.kv_bytes() > 0 {
        room.evicted(conversation.context_len());
        conversation.evict_cache();
        if pending.reads_conversation_cache() {
            pending = PendingTurn::new(conversation.plan(text, role)?, conversation.model().spec().hidden_size);
        }
        need = conversation.chunk_bytes(&pending);
    }
    if !room.make_room(need) {
        return Err(TurnError::OverBudget {
            need,
            budget: room.limit(),
        });
    }
    conversation.advance(pending)
}

/// Evicts the caches of the round's conversations other than `except`: the
/// ones that have run (their new caches) and the ones still to run, whose
/// plans are redone as rebuilds; not those waiting for chunks on top of their
/// own cache.
fn evict_others(
    requests: &mut [TurnRequest<'_>],
    plans: &mut [Option<TurnPlan>],
    results: &mut [Option<Started>],
    except: usize,
    room: &impl Room,
) {
    for (j, r) in requests.iter_mut().enumerate() {
        // A turn waiting for its chunks reads the cache it was planned on.
        let pinned = matches!(&results[j], Some(Started::Pending(p)) if p.reads_conversation_cache());
        if j == except || pinned || r.conversation.kv_bytes() == 0 {
            continue;
        }
        room.evicted(r.conversation.context_len());
        r.conversation.evict_cache();
        if let Some(plan) = &plans[j]
            && !plan.rebuild
        {
            match r.conversation.plan(r.text, r.role) {
                Ok(p) => plans[j] = Some(p),
                Err(e) => {
                    plans[j] = None;
                    results[j] = Some(Started::Done(Err(e)));
                }
            }
        }
    }
}

/// How many of `texts` (their lengths in bytes, in order) make the next chunk
/// of a round: at most `max_turns`, and beyond the first at most
/// `max_padded_tokens` bytes (a text has at most as many tokens as bytes).
/// At least one, when there is one.
fn chunk_len(texts: impl IntoIterator<Item = usize>, limits: BatchLimits) -> usize {
    let (mut n, mut bytes) = (0, 0);
    for len in texts {
        if n >= limits.max_turns.max(1) || (n > 0 && bytes + len > limits.max_padded_tokens) {
            break;
        }
        bytes += len;
        n += 1;
    }
    n
}

/// One turn to schedule, and where its answer goes.
///
/// Fields drop in order: the conversation (its cache) before the reply, so
/// that whoever counts replies sees the cache gone first.
#[derive(Debug)]
pub(crate) struct Work<R> {
    /// The conversation the turn extends (an `Embed` text's own, fresh one).
    pub conversation: Conversation,
    /// The turn's text.
    pub text: String,
    /// Its ChatML role, or "".
    pub role: String,
    /// The span of the request it came from.
    pub span: tracing::Span,
    /// Where the answer goes.
    pub reply: R,
}

/// The engine's side of a round: whether an answer is still wanted, and
/// delivering it.
pub(crate) trait Replies<R> {
    /// Whether someone still waits for this reply.
    fn wanted(&self, reply: &R) -> bool;
    /// Delivers a turn's result with its conversation.
    fn answer(
        &mut self,
        conversation: Conversation,
        reply: R,
        span: &tracing::Span,
        result: Result<TurnOutput, TurnError>,
    );
    /// Gives up a reply nobody waits for, with its conversation exactly as
    /// before the turn (for the engine to drop, or to put back where it rests).
    fn abandon(&mut self, conversation: Conversation, reply: R);
}

/// A turn that needs several calls, waiting for its next chunk.
#[derive(Debug)]
struct LongTurn<R> {
    conversation: Conversation,
    pending: PendingTurn,
    /// The turn's text and role, to plan it again as a rebuild.
    text: String,
    role: String,
    span: tracing::Span,
    reply: R,
}

/// The rounds of the engine thread: see the module docs.
#[derive(Debug)]
pub(crate) struct Scheduler<R> {
    limits: BatchLimits,
    /// Long turns in arrival order; the first one advances a chunk per round.
    long: VecDeque<LongTurn<R>>,
}

impl<R> Scheduler<R> {
    /// A scheduler batching within `limits`.
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            limits,
            long: VecDeque::new(),
        }
    }

    /// Whether no long turn is waiting (so the engine may block for new work).
    pub fn is_idle(&self) -> bool {
        self.long.is_empty()
    }

    /// Most jobs one round takes from the queue.
    pub fn max_jobs(&self) -> usize {
        self.limits.max_turns.max(1)
    }

    /// One round: `work` in chunks (each through [`start_turns`]), then one
    /// chunk of the oldest long turn still wanted.
    pub fn run_round(&mut self, work: Vec<Work<R>>, replies: &mut impl Replies<R>, room: &impl Room) {
        let mut work: VecDeque<Work<R>> = work
            .into_iter()
            .filter_map(|w| {
                if replies.wanted(&w.reply) {
                    return Some(w);
                }
                let _enter = w.span.enter();
                tracing::debug!("turn abandoned before it ran");
                let Work {
                    conversation, reply, ..
                } = w;
                replies.abandon(conversation, reply);
                None
            })
            .collect();
        while !work.is_empty() {
            let n = chunk_len(work.iter().map(|w| w.text.len()), self.limits);
            let mut chunk: Vec<Work<R>> = work.drain(..n).collect();
            let started = {
                let mut requests: Vec<TurnRequest<'_>> = chunk
                    .iter_mut()
                    .map(|w| TurnRequest {
                        conversation: &mut w.conversation,
                        text: &w.text,
                        role: &w.role,
                    })
                    .collect();
                start_turns(&mut requests, self.limits, room)
            };
            if chunk.len() > 1 {
                tracing::debug!(turns = chunk.len(), "ran a batch of turns");
            }
            for (w, started) in chunk.into_iter().zip(started) {
                let Work {
                    conversation,
                    text,
                    role,
                    span,
                    reply,
                } = w;
                match started {
                    Started::Done(result) => replies.answer(conversation, reply, &span, result),
                    Started::Pending(pending) => self.long.push_back(LongTurn {
                        conversation,
                        pending,
                        text,
                        role,
                        span,
                        reply,
                    }),
                }
            }
        }
        self.advance_long(replies, room);
    }

    /// Runs the next chunk of the oldest long turn still wanted, if there is
    /// room for it (evicting the conversation's own cache when the turn no
    /// longer reads it); otherwise the turn fails with
    /// [`TurnError::OverBudget`].
    fn advance_long(&mut self, replies: &mut impl Replies<R>, room: &impl Room) {
        while let Some(long) = self.long.pop_front() {
            let LongTurn {
                mut conversation,
                pending,
                text,
                role,
                span,
                reply,
            } = long;
            if !replies.wanted(&reply) {
                let _enter = span.enter();
                tracing::debug!("long turn abandoned part-way");
                drop(pending);
                replies.abandon(conversation, reply);
                continue;
            }
            let step = {
                let _enter = span.enter();
                advance_within(&mut conversation, pending, &text, &role, room)
            };
            match step {
                Ok(Advance::More(pending)) => self.long.push_front(LongTurn {
                    conversation,
                    pending,
                    text,
                    role,
                    span,
                    reply,
                }),
                Ok(Advance::Done(output)) => replies.answer(conversation, reply, &span, Ok(output)),
                Err(e) => replies.answer(conversation, reply, &span, Err(e)),
            }
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_turns: usize, max_padded_tokens: usize) -> BatchLimits {
        BatchLimits {
            max_turns,
            max_padded_tokens,
        }
    }

    /// Equal turns on equal caches group up to `max_turns`, then start a new group.
    #[test]
    fn equal_turns_fill_groups_of_max_turns() {
        let candidates = (0..5).map(|i| (i, 100, 10)).collect();
        let groups = group(candidates, limits(2, 16_384));
        let sizes: Vec<usize> = groups.iter().map(|g| g.members.len()).collect();
        assert_eq!(sizes, [2, 2, 1]);
    }

    /// A group's padded slots (rows × (longest past + longest new)) stay within the budget.
    #[test]
    fn padded_slots_bound_a_group() {
        // 3 × (100 + 10) = 330 > 300: the third turn starts a new group.
        let groups = group((0..3).map(|i| (i, 100, 10)).collect(), limits(16, 300));
        assert_eq!(groups[0].members.len(), 2);
        assert_eq!(groups.len(), 2);
    }

    /// A short turn does not join a long one when its row would be mostly padding:
    /// 40 + 4 new tokens pad 36 > max(44 / 4, 8); 12 + 8 pad 4, within 8.
    #[test]
    fn padding_rules_keep_unlike_lengths_apart() {
        let empty = Group::default();
        let mut long = Group::default();
        long.add(0, 0, 40);
        assert!(empty.fits(0, 4, BatchLimits::default()));
        assert!(!long.fits(0, 4, BatchLimits::default()));
        let mut twelve = Group::default();
        twelve.add(0, 0, 12);
        assert!(twelve.fits(0, 8, BatchLimits::default()));
        // Cache padding is cheap: 256 pad slots a turn are allowed ...
        let mut deep = Group::default();
        deep.add(0, 300, 10);
        assert!(deep.fits(44, 10, BatchLimits::default()));
        // ... but not 300.
        assert!(!deep.fits(0, 10, BatchLimits::default()));
    }

    /// Longest turns are grouped first, so a group's rows are alike.
    #[test]
    fn groups_are_formed_longest_first() {
        let groups = group(
            vec![(0, 0, 4), (1, 0, 40), (2, 0, 5), (3, 0, 39)],
            BatchLimits::default(),
        );
        let members: Vec<Vec<usize>> = groups.iter().map(|g| g.members.clone()).collect();
        assert_eq!(members, [vec![1, 3], vec![2, 0]]);
    }

    /// A round's chunk holds at most `max_turns` texts and, beyond the first,
    /// `max_padded_tokens` bytes; an over-long first text still goes alone.
    #[test]
    fn chunks_respect_turns_and_bytes() {
        assert_eq!(chunk_len([10, 10, 10], limits(2, 1_000)), 2);
        assert_eq!(chunk_len([10, 10, 10], limits(16, 25)), 2);
        assert_eq!(chunk_len([5_000, 10], limits(16, 1_000)), 1);
        assert_eq!(chunk_len([], limits(16, 1_000)), 0);
        assert_eq!(chunk_len([1, 1], limits(0, 1_000)), 1, "max_turns 0 acts as 1");
    }
}
