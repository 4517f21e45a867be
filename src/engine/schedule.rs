//! Scheduling: which turns share a model call, how a round's work is cut into
//! chunks, when the chunks of long turns run, and making room for each call.
//!
//! # Grouping
//! A round plans each turn ([`Turn::start`]: tokenised once), groups the
//! turns that fit in one call by length, and runs each group as one padded
//! call ([`crate::model::Model::forward_batch`]): short turns share the
//! weight reads that dominate their cost. [`BatchLimits`] bounds a group
//! (and keeps turns on long caches out of groups, where copying their caches
//! in and out of the batch costs what sharing saves);
//! the `PAD_*` rules keep a group from padding more than it saves.
//!
//! # Rounds
//! The engine thread hands [`Scheduler::run_round`] every job that waited
//! since the last round. A round runs them in chunks of at most
//! [`BatchLimits::max_turns`] turns and `max_padded_tokens` bytes of text (so
//! an `Embed` of many texts holds only one chunk's caches at once), then runs
//! one call of the oldest long turn: a turn longer than
//! `prefill_chunk_tokens` never holds the engine for all its calls, so other
//! streams are answered within about one chunk's time. Only the oldest long
//! turn holds a part-built cache; one whose requester has gone is dropped
//! before its next call, which frees its cache then.
//!
//! # Memory
//! Before each model call the scheduler asks the budget what the call adds
//! and for room for it ([`crate::engine::KvBudget`]), one way for every
//! call (`room_for`): the budget evicts resting conversations, least
//! recently used first; if that is not enough, the round's other turns'
//! caches go (a batch instead runs as single turns), then the turn's own
//! ([`Turn::evict`]: a turn that would have read it is planned again as a
//! rebuild); a turn that still does not fit fails with
//! [`TurnError::OverBudget`], its conversation unchanged.
//!
//! The scheduler decides what runs; where answers go (a stream's oneshot, a
//! result of an `Embed`) is the engine's, behind the `Replies` trait.

use std::collections::VecDeque;

use super::budget::KvBudget;
use crate::{
    conversation::{Conversation, Turn, TurnError, TurnOutput},
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
    /// Longest cache a turn may run on and still share a call: past it, the
    /// copies of its cache into the batch and back out cost about what the
    /// shared weight reads save (measured on the real model in f32, 2 cores,
    /// 2026-12-04: per row, batched vs alone, ~0.7× at 2,000 tokens of
    /// context, 1.0× at 4,000, 1.13–1.19× at 6,000; BENCHMARKS.md).
    pub max_past_tokens: usize,
}

/// The default [`BatchLimits::max_turns`] (`--max-batch-turns`).
pub const DEFAULT_MAX_BATCH_TURNS: usize = 16;
/// The default [`BatchLimits::max_padded_tokens`] (`--max-batch-tokens`).
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 16_384;
/// The default [`BatchLimits::max_past_tokens`] (`--max-batch-past-tokens`).
pub const DEFAULT_MAX_BATCH_PAST_TOKENS: usize = 4_096;

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_turns: DEFAULT_MAX_BATCH_TURNS,
            max_padded_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_past_tokens: DEFAULT_MAX_BATCH_PAST_TOKENS,
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
            && p <= limits.max_past_tokens
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

/// One turn to run, from its admission to its answer: the turn (its
/// conversation inside), where the answer goes, the request's span, and the
/// text's length in bytes (what a round's chunks are cut by).
///
/// Fields drop in order: the turn (its conversation and caches) before the
/// reply, so that whoever counts replies sees the caches gone first.
#[derive(Debug)]
pub(crate) struct Work<R> {
    pub turn: Turn,
    pub reply: R,
    pub span: tracing::Span,
    pub text_len: usize,
    /// Put among the long turns in this round (its cache is then not the
    /// round's to evict while it waits for its first call).
    pub long: bool,
}

impl<R> Work<R> {
    /// A turn to run, not yet classified.
    pub fn new(turn: Turn, reply: R, span: tracing::Span, text_len: usize) -> Work<R> {
        Work {
            turn,
            reply,
            span,
            text_len,
            long: false,
        }
    }
}

/// Where answers go: whether one is still wanted, and delivering it.
pub(crate) trait Replies<R> {
    /// Whether someone still waits for this reply.
    fn wanted(&self, reply: &R) -> bool;
    /// Delivers a turn's conversation with its result, or without one when
    /// the turn was abandoned (nobody waits: the conversation is as before).
    fn answer(
        &mut self,
        conversation: Conversation,
        reply: R,
        span: &tracing::Span,
        result: Option<Result<TurnOutput, TurnError>>,
    );
}

fn deliver<R>(work: Work<R>, replies: &mut impl Replies<R>) {
    let Work { turn, reply, span, .. } = work;
    let (conversation, result) = turn.into_conversation();
    replies.answer(conversation, reply, &span, result);
}

/// What [`room_for`] found.
enum Room {
    /// The next call fits.
    Fits,
    /// The turn's own cache was evicted to make room: it may be another
    /// turn now (a rebuild, maybe of several calls).
    Replanned,
    /// No room even with every cache it may evict gone.
    None(u64),
}

/// Makes room for turn `i`'s next call: the budget evicts resting
/// conversations (least recently used first); then, if `others`, the
/// round's other turns' caches go (not those of long turns waiting to read
/// theirs); then the turn's own. Every eviction is counted in the budget.
fn room_for<R>(budget: &KvBudget, round: &mut [Work<R>], i: usize, others: bool) -> Room {
    let need = |w: &Work<R>| budget.call_bytes(&[w.turn.next_call().expect("a running turn has a next call")]);
    if budget.make_room(need(&round[i])) {
        return Room::Fits;
    }
    if others {
        for (j, w) in round.iter_mut().enumerate() {
            let pinned = w.long && w.turn.reads_conversation_cache();
            if j != i
                && !pinned
                && let Some(tokens) = w.turn.evict()
            {
                budget.record_eviction(tokens);
            }
        }
        if budget.make_room(need(&round[i])) {
            return Room::Fits;
        }
    }
    match round[i].turn.evict() {
        Some(tokens) => {
            budget.record_eviction(tokens);
            Room::Replanned
        }
        None => Room::None(need(&round[i])),
    }
}

/// The rounds of the engine thread: see the module docs.
#[derive(Debug)]
pub(crate) struct Scheduler<R> {
    limits: BatchLimits,
    /// Whether a round's work is cut into chunks (the engine's rounds; not
    /// [`run_turns`], whose caller holds every conversation at once anyway).
    chunked: bool,
    /// Long turns in arrival order; the first one runs a call per round.
    long: VecDeque<Work<R>>,
}

impl<R> Scheduler<R> {
    /// A scheduler batching within `limits`.
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            limits,
            chunked: true,
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

    /// One round: `work` in chunks, then one call of the oldest long turn
    /// still wanted.
    pub fn run_round(&mut self, work: Vec<Work<R>>, replies: &mut impl Replies<R>, budget: &KvBudget) {
        let mut work: VecDeque<Work<R>> = work
            .into_iter()
            .filter_map(|w| {
                if replies.wanted(&w.reply) {
                    return Some(w);
                }
                w.span.in_scope(|| tracing::debug!("turn abandoned before it ran"));
                deliver(w, replies);
                None
            })
            .collect();
        while !work.is_empty() {
            let n = if self.chunked {
                chunk_len(work.iter().map(|w| w.text_len), self.limits)
            } else {
                work.len()
            };
            let mut chunk: Vec<Work<R>> = work.drain(..n).collect();
            self.start(&mut chunk, budget);
            if chunk.len() > 1 {
                tracing::debug!(turns = chunk.len(), "ran a batch of turns");
            }
            for w in chunk {
                if w.long {
                    self.long.push_back(w);
                } else {
                    deliver(w, replies);
                }
            }
        }
        self.advance_long(replies, budget);
    }

    /// Runs the chunk's turns that fit one call (grouped into shared calls
    /// where they can be) and marks the others long.
    fn start(&self, chunk: &mut [Work<R>], budget: &KvBudget) {
        let Some(model) = chunk.first().map(|w| w.turn.conversation().model().clone()) else {
            return;
        };
        let candidates: Vec<(usize, usize, usize)> = chunk
            .iter()
            .enumerate()
            .filter(|(_, w)| {
                self.limits.max_turns > 1
                    && std::sync::Arc::ptr_eq(&model, w.turn.conversation().model())
                    && w.turn.is_single_call()
            })
            .filter_map(|(i, w)| w.turn.next_call().map(|c| (i, c.past, c.new)))
            .collect();
        for group in group(candidates, self.limits).iter().filter(|g| g.members.len() > 1) {
            let calls: Vec<_> = group
                .members
                .iter()
                .filter_map(|&i| chunk[i].turn.next_call())
                .collect();
            // (Each row's cache is copied out of the batch without its probe.)
            if !budget.make_room(budget.call_bytes(&calls)) {
                tracing::debug!(
                    turns = group.members.len(),
                    "no room for a batched call; its turns run alone"
                );
                continue;
            }
            let batched = {
                let empty = model.empty_cache();
                let rows: Vec<BatchRow<'_>> = group.members.iter().map(|&i| chunk[i].turn.batch_row(&empty)).collect();
                model.forward_batch(&rows)
            };
            match batched {
                Ok(outputs) => {
                    for (&i, (hidden, cache)) in group.members.iter().zip(outputs) {
                        chunk[i].turn.take_batched(&hidden, cache);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, turns = group.members.len(), "a batched call failed; running its turns one by one")
                }
            }
        }
        // Everything not over runs alone, or waits for its calls.
        for i in 0..chunk.len() {
            loop {
                let turn = &chunk[i].turn;
                if turn.is_over() {
                    break;
                }
                if !turn.is_single_call() {
                    chunk[i].long = true;
                    break;
                }
                match room_for(budget, chunk, i, true) {
                    Room::Fits => {
                        let _enter = chunk[i].span.enter();
                        chunk[i].turn.step();
                        break;
                    }
                    Room::Replanned => continue,
                    Room::None(need) => {
                        chunk[i].turn.fail(TurnError::OverBudget {
                            need,
                            budget: budget.limit(),
                        });
                        break;
                    }
                }
            }
        }
    }

    /// Runs the next call of the oldest long turn still wanted, once there
    /// is room for it; a turn that cannot have room fails.
    fn advance_long(&mut self, replies: &mut impl Replies<R>, budget: &KvBudget) {
        while let Some(mut w) = self.long.pop_front() {
            if !replies.wanted(&w.reply) {
                w.span.in_scope(|| tracing::debug!("long turn abandoned part-way"));
                deliver(w, replies);
                continue;
            }
            loop {
                match room_for(budget, std::slice::from_mut(&mut w), 0, false) {
                    Room::Fits => {
                        let _enter = w.span.enter();
                        w.turn.step();
                        break;
                    }
                    Room::Replanned => continue,
                    Room::None(need) => {
                        w.turn.fail(TurnError::OverBudget {
                            need,
                            budget: budget.limit(),
                        });
                        break;
                    }
                }
            }
            if w.turn.is_over() {
                deliver(w, replies);
            } else {
                self.long.push_front(w);
            }
            return;
        }
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

/// Runs one turn on each conversation, each with the result and the
/// all-or-nothing guarantee of [`Conversation::turn`].
///
/// Turns of conversations on the same model that each fit in one call are
/// grouped by length and run together, padded, in one model call per group
/// (see [`crate::model::Model::forward_batch`]): short turns share the weight
/// reads that dominate their cost. A group's embeddings equal the
/// turn-by-turn ones up to float rounding. A turn alone in its group, a turn
/// needing several calls, and every turn of a group whose call failed run on
/// their own. (The engine's rounds, with no budget.)
pub fn run_turns(requests: &mut [TurnRequest<'_>], limits: BatchLimits) -> Vec<Result<TurnOutput, TurnError>> {
    let Some(model) = requests.first().map(|r| r.conversation.model().clone()) else {
        return Vec::new();
    };
    run_turns_within(requests, limits, &KvBudget::new(model, u64::MAX))
}

/// [`run_turns`] within a memory budget: before each call the scheduler
/// makes room for it as the engine does (see the module docs), evicting the
/// other requests' caches, then the turn's own, when the budget's resting
/// conversations are not enough.
pub fn run_turns_within(
    requests: &mut [TurnRequest<'_>],
    limits: BatchLimits,
    budget: &KvBudget,
) -> Vec<Result<TurnOutput, TurnError>> {
    let work = requests
        .iter_mut()
        .enumerate()
        .map(|(i, r)| {
            let turn = Turn::start(r.conversation.take(), r.text, r.role);
            Work::new(turn, i, tracing::Span::none(), r.text.len())
        })
        .collect();
    let mut collected = Collected(requests.iter().map(|_| None).collect());
    let mut scheduler = Scheduler {
        chunked: false,
        ..Scheduler::new(limits)
    };
    scheduler.run_round(work, &mut collected, budget);
    while !scheduler.is_idle() {
        scheduler.run_round(Vec::new(), &mut collected, budget);
    }
    requests
        .iter_mut()
        .zip(collected.0)
        .map(|(r, answer)| {
            let (conversation, result) = answer.expect("every request is answered");
            *r.conversation = conversation;
            result.expect("every request is run")
        })
        .collect()
}

/// [`run_turns`]'s replies: each request's conversation and result.
type Answer = (Conversation, Option<Result<TurnOutput, TurnError>>);

struct Collected(Vec<Option<Answer>>);

impl Replies<usize> for Collected {
    fn wanted(&self, _reply: &usize) -> bool {
        true
    }

    fn answer(
        &mut self,
        conversation: Conversation,
        reply: usize,
        _span: &tracing::Span,
        result: Option<Result<TurnOutput, TurnError>>,
    ) {
        self.0[reply] = Some((conversation, result));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(max_turns: usize, max_padded_tokens: usize) -> BatchLimits {
        BatchLimits {
            max_turns,
            max_padded_tokens,
            ..BatchLimits::default()
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

    /// A turn on a cache longer than `max_past_tokens` runs alone (so does
    /// every other turn that would share its call), whatever else fits; one
    /// on a cache of exactly that length still shares.
    #[test]
    fn long_caches_run_alone() {
        let at = |max_past_tokens| BatchLimits {
            max_past_tokens,
            ..BatchLimits::default()
        };
        let sizes = |limits| -> Vec<usize> {
            group(vec![(0, 5_000, 10), (1, 5_000, 10), (2, 100, 10), (3, 120, 10)], limits)
                .iter()
                .map(|g| g.members.len())
                .collect()
        };
        assert_eq!(sizes(at(4_096)), [1, 1, 2]);
        assert_eq!(sizes(at(5_000)), [2, 2], "the control: at the bound they batch");
        assert_eq!(DEFAULT_MAX_BATCH_PAST_TOKENS, BatchLimits::default().max_past_tokens);
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
