//! One turn of a conversation, from its text to its vector: planned once
//! (checked, tokenised, its place in the context decided), then run call by
//! call, then adopted. This is the one prefill path: a turn that fits one
//! call and one that needs many, a rebuild after an eviction, a slide, a
//! turn in a shared batched call, all go through [`Turn`].
//!
//! # Life
//! [`Turn::start`] takes the conversation and plans the turn: the tokens to
//! prefill (the turn's own, after the context kept by a slide or rebuilt
//! after an eviction when the cache does not cover it) and, when the pooling
//! probes, the probe's tokens at the end. [`Turn::next_call`] says what the
//! next model call is (its shape, for batching and the budget);
//! [`Turn::step`] runs it alone, or the scheduler runs a single-call turn's
//! only call in a batch ([`Turn::batch_row`], [`Turn::take_batched`]).
//! After the last call the probe's rows are cut from the new cache and the
//! conversation adopts the turn; [`Turn::into_conversation`] gives it back
//! with the result. Until then, and after any failure, the conversation is
//! exactly as it was: a part-built cache is the turn's, not the
//! conversation's.
//!
//! [`Turn::evict`] drops the conversation's cache to make room (its token
//! ids stay): a turn that would have run on top of that cache is planned
//! again as a rebuild from its token ids, without tokenising again.
//!
//! # Shared prefixes
//! Within the model's shared-prefix bound, the turn's rows become a shared
//! segment after the conversation's (see `model::prefix`), with the turn's
//! output kept beside them; a turn that another conversation with the same
//! options already took on the same context is over at [`Turn::start`],
//! answered from that segment without a call. A rebuild starts from the
//! deepest segment of the evicted chain still alive.

use std::{ops::Range, sync::Arc};

use super::{
    ConversationOptions,
    options::{MeanOver, OptionsError, Overflow},
    pooling,
    state::Conversation,
};
use crate::model::{BatchRow, Call, Hidden, KvCache, ModelError, ROLES, Segment, TokenizerError};

/// Past the shared-prefix bound, a conversation keeps reading a shared base
/// that another conversation reads too while its own rows are at most this
/// many times the base's; beyond that it holds all its rows, as a copy of
/// its own rows every call would cost more than the base's memory saves.
pub const KEEP_BASE_RATIO: usize = 4;

/// A turn's output kept with the shared segment it made, for the options it
/// ran with: a conversation with the same options whose next turn is that
/// segment is answered from it without a model call.
#[derive(Debug)]
struct Replay {
    options: ConversationOptions,
    output: TurnOutput,
    context_sum: Option<pooling::RowSum>,
}

/// Why a turn failed. The conversation is unchanged whatever the reason.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    /// The role is not "", "system", "user" or "assistant".
    #[error("unknown role {0:?}: use \"\", \"system\", \"user\" or \"assistant\"")]
    UnknownRole(String),
    /// The text has no tokens.
    #[error("the turn's text is empty")]
    Empty,
    /// The turn is over the server's per-turn limit.
    #[error("the turn has {tokens} tokens, over the limit of {limit} per turn")]
    TurnTooLong {
        /// The turn's tokens.
        tokens: usize,
        /// The limit.
        limit: usize,
    },
    /// The turn alone (with the kept prefix) does not fit in the window.
    #[error("the turn has {tokens} tokens and does not fit in the window of {window} tokens (with {kept} kept tokens)")]
    OverWindow {
        /// The turn's tokens.
        tokens: usize,
        /// Tokens a slide keeps.
        kept: usize,
        /// The window.
        window: usize,
    },
    /// The REJECT policy refused a turn that would overflow the window.
    #[error("context full: {context} + {tokens} tokens exceed the window of {window} (overflow policy REJECT)")]
    ContextFull {
        /// Tokens in the context.
        context: usize,
        /// The turn's tokens.
        tokens: usize,
        /// The window.
        window: usize,
    },
    /// The turn's model calls need more KV cache memory at once than the
    /// server's budget allows with every other cache evicted.
    #[error(
        "the turn needs {need} bytes of KV cache at once, more than the budget of {budget} bytes (--max-kv-bytes) leaves with every other conversation's cache evicted"
    )]
    OverBudget {
        /// Bytes its next call adds.
        need: u64,
        /// The budget.
        budget: u64,
    },
    /// Another turn of the conversation is running (a client's turns are
    /// sent one at a time, so this is a bug if it happens).
    #[error("another turn of this conversation is running")]
    Busy,
    /// The options do not suit the model (stateless embeds only).
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// Tokenisation failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
}

/// What a turn returns.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnOutput {
    /// The embedding (pooled as the options say, truncated, normalised).
    pub embedding: Vec<f32>,
    /// The mean-pooled vector too, when `include_turn_mean` is set.
    pub turn_mean: Option<Vec<f32>>,
    /// Tokens the turn added to the context (ChatML markers included).
    pub turn_tokens: usize,
    /// Tokens in the context after the turn.
    pub context_tokens: usize,
    /// Tokens dropped from the context by this turn (a slide or a reset of
    /// the window; not an eviction, which keeps every token id).
    pub dropped_tokens: usize,
    /// Tokens of context recomputed before the turn because the
    /// conversation's cache had been evicted (0 when it was resident).
    pub rebuilt_tokens: usize,
}

impl Conversation {
    /// Runs one turn: tokenises `text` (wrapped in ChatML when `role` is set),
    /// prefills it on top of the context (in `prefill_chunk_tokens` calls)
    /// and returns its embedding.
    ///
    /// # Errors
    /// A [`TurnError`]; the conversation is then exactly as before the call.
    pub fn turn(&mut self, text: &str, role: &str) -> Result<TurnOutput, TurnError> {
        let mut turn = Turn::start(self.take(), text, role);
        while turn.step() == Step::More {}
        let (conversation, result) = turn.into_conversation();
        *self = conversation;
        result.expect("a turn stepped until it is over has a result")
    }

    /// A raw-text turn's embedding (the prototype's `embed`).
    ///
    /// # Errors
    /// As [`Conversation::turn`].
    pub fn embed(&mut self, text: &str) -> Result<Vec<f32>, TurnError> {
        self.turn(text, "").map(|o| o.embedding)
    }
}

/// A turn of one conversation (see the module docs).
#[derive(Debug)]
pub(crate) struct Turn {
    conversation: Conversation,
    state: State,
}

#[derive(Debug)]
enum State {
    /// Planned, maybe part-way through its calls.
    Running(Box<Prefill>),
    /// Done: the conversation holds the turn (or, on error, is as before it).
    Over(Result<TurnOutput, TurnError>),
}

/// A turn's calls: what they prefill, how far they are, what they pooled.
#[derive(Debug)]
struct Prefill {
    /// The turn's own tokens (ChatML markers and template included).
    turn: Vec<u32>,
    /// The text's rows within `turn` (what is pooled).
    text: Range<usize>,
    /// What the calls prefill: the base (nothing, or the context a slide
    /// keeps, or the context rebuilt after an eviction), the turn, the probe.
    sequence: Vec<u32>,
    /// `sequence` runs from an empty cache, not on top of the conversation's.
    from_empty: bool,
    /// Tokens of the probe at the end of `sequence` (cut from the new cache).
    probe: usize,
    /// Context tokens a slide or a reset drops.
    dropped: usize,
    /// Context tokens recomputed because the cache had been evicted.
    rebuilt: usize,
    /// Tokens of `sequence` prefilled so far.
    done: usize,
    /// The cache after the calls so far (none yet: the conversation's, or an
    /// empty one when `from_empty`; a shared segment's when a rebuild starts
    /// from one).
    cache: Option<KvCache>,
    pooler: pooling::Pooler,
    /// Context tokens `sequence` follows (the whole context on top of the
    /// conversation's cache; a shared segment's when a rebuild starts from
    /// one; none after a slide, a reset or a rebuild from nothing).
    kept: usize,
    /// The shared segment the first call's past follows.
    base: Option<Arc<Segment>>,
    /// The new cache keeps following `base` (see [`KEEP_BASE_RATIO`]).
    keep_base: bool,
    /// The new context is short enough to share: its rows after `base`
    /// become a shared segment.
    share: bool,
    /// The turn runs right on top of the conversation's shared segment (or
    /// an empty context): its segment is exactly its own tokens, and its
    /// output is kept with it for a conversation that takes the same turn.
    plain: bool,
    /// Tokens of a rebuild found in a shared segment (not prefilled).
    reused: usize,
}

/// What [`plan`] decides.
#[derive(Debug)]
enum Plan {
    /// Calls to run.
    Prefill(Box<Prefill>),
    /// The turn is a shared segment's, kept with its output.
    Shared(Arc<Segment>, Arc<Replay>),
}

/// What [`Turn::step`] leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    /// More calls to run.
    More,
    /// The turn is over (see [`Turn::into_conversation`]).
    Over,
}

impl Turn {
    /// Plans a turn of `text` (in ChatML with `role`, unless it is "") on
    /// `conversation`. A turn that cannot be (an unknown role, an empty or
    /// too long text, a full window under REJECT...) is over at once, its
    /// conversation unchanged.
    pub(crate) fn start(mut conversation: Conversation, text: &str, role: &str) -> Turn {
        let state = match plan(&conversation, text, role) {
            Ok(Plan::Prefill(prefill)) => State::Running(prefill),
            Ok(Plan::Shared(segment, replay)) => {
                let c = &mut conversation;
                let model = c.model().clone();
                let saved = segment.tokens().len() + c.options().pooling.appended(&model).len();
                model.count_shared(true, saved);
                let kept = c.context_len();
                let cache = model.segment_cache(segment.clone());
                c.adopt(
                    segment.tokens().to_vec(),
                    kept,
                    cache,
                    &replay.output,
                    replay.context_sum.clone(),
                );
                State::Over(Ok(replay.output.clone()))
            }
            Err(e) => State::Over(Err(e)),
        };
        Turn { conversation, state }
    }

    /// The conversation the turn is on (before the turn, until it is over).
    pub(crate) fn conversation(&self) -> &Conversation {
        &self.conversation
    }

    /// Whether the turn is over.
    pub(crate) fn is_over(&self) -> bool {
        matches!(self.state, State::Over(_))
    }

    fn prefill(&self) -> Option<&Prefill> {
        match &self.state {
            State::Running(p) => Some(p),
            State::Over(_) => None,
        }
    }

    /// Whether the turn is all in one call not yet run (and so can share a
    /// batched call with other conversations' turns).
    pub(crate) fn is_single_call(&self) -> bool {
        self.prefill()
            .is_some_and(|p| p.done == 0 && p.chunk_end(&self.conversation, 0) == p.sequence.len())
    }

    /// The next call's shape; `None` once the turn is over.
    pub(crate) fn next_call(&self) -> Option<Call> {
        let p = self.prefill()?;
        let end = p.chunk_end(&self.conversation, p.done);
        let last = end == p.sequence.len();
        Some(Call {
            past: p.past_len(&self.conversation),
            new: end - p.done,
            cut: if last { p.probe } else { 0 },
            base: p.past(&self.conversation).map_or(0, KvCache::base_len),
            keep_base: last && p.keep_base,
        })
    }

    /// Whether the next call reads the conversation's own cache (false for
    /// a rebuild, a slide or a reset, and once a first call has run): if it
    /// does, evicting that cache means planning the turn again.
    pub(crate) fn reads_conversation_cache(&self) -> bool {
        self.prefill().is_some_and(|p| !p.from_empty && p.cache.is_none())
    }

    /// Drops the conversation's cache to free its memory (its token ids
    /// stay); a turn that would have run on top of it is planned again as a
    /// rebuild. Returns the tokens whose cache was dropped, `None` when the
    /// conversation held no cache.
    pub(crate) fn evict(&mut self) -> Option<usize> {
        if self.conversation.kv_bytes() == 0 {
            return None;
        }
        let tokens = self.conversation.context_len();
        let reads = self.reads_conversation_cache();
        self.conversation.evict_cache();
        if reads && let State::Running(p) = &mut self.state {
            p.rebuild_from(&self.conversation);
        }
        Some(tokens)
    }

    /// Runs the next call alone. After the last one the turn is over; on a
    /// failure it is over too, the conversation as before the turn.
    pub(crate) fn step(&mut self) -> Step {
        let State::Running(p) = &mut self.state else {
            return Step::Over;
        };
        match p.call(&self.conversation) {
            Ok(true) => {
                self.adopt();
                Step::Over
            }
            Ok(false) => Step::More,
            Err(e) => {
                self.state = State::Over(Err(e));
                Step::Over
            }
        }
    }

    /// A single-call turn's call as a row of a batched call.
    ///
    /// # Panics
    /// If the turn is not [`Turn::is_single_call`].
    pub(crate) fn batch_row<'a>(&'a self, empty: &'a KvCache) -> BatchRow<'a> {
        assert!(self.is_single_call(), "only a single-call turn shares a batched call");
        let p = self.prefill().expect("a single-call turn is running");
        BatchRow {
            ids: &p.sequence,
            past: p.past(&self.conversation).unwrap_or(empty),
            keep: p.pooler.rows(),
            cut: p.probe,
            keep_base: p.keep_base,
        }
    }

    /// Takes the result of this turn's row of a batched call (its hidden
    /// states and its new cache, the probe already cut): the turn is over.
    pub(crate) fn take_batched(&mut self, hidden: &Hidden, cache: KvCache) {
        let State::Running(p) = &mut self.state else {
            return;
        };
        let first = p.pooler.rows().start;
        p.pooler.add_rows(hidden, first);
        p.done = p.sequence.len();
        p.cache = Some(cache);
        self.adopt();
    }

    /// Ends the turn with `error` (e.g. no room for its calls): the
    /// conversation is as before it.
    pub(crate) fn fail(&mut self, error: TurnError) {
        self.state = State::Over(Err(error));
    }

    /// The conversation and the turn's result. A turn not over is
    /// abandoned: its part-built cache dropped, the conversation as before.
    pub(crate) fn into_conversation(self) -> (Conversation, Option<Result<TurnOutput, TurnError>>) {
        let result = match self.state {
            State::Over(result) => Some(result),
            State::Running(_) => None,
        };
        (self.conversation, result)
    }

    /// The last call ran: the conversation takes the turn's tokens and its
    /// cache (the probe's rows already cut), and the vectors are made.
    fn adopt(&mut self) {
        let State::Running(p) = std::mem::replace(&mut self.state, State::Over(Err(TurnError::Busy))) else {
            return;
        };
        let Prefill {
            turn,
            mut sequence,
            probe,
            dropped,
            rebuilt,
            cache,
            pooler,
            kept,
            share,
            plain,
            reused,
            ..
        } = *p;
        let c = &mut self.conversation;
        let model = c.model().clone();
        sequence.truncate(sequence.len() - probe);
        let context_sum = pooler.context_sum().cloned();
        let (embedding, turn_mean) = pooling::vectors(&model, c.options(), pooler);
        let output = TurnOutput {
            embedding,
            turn_mean,
            turn_tokens: turn.len(),
            context_tokens: kept + sequence.len(),
            dropped_tokens: dropped,
            rebuilt_tokens: rebuilt,
        };
        let mut cache = cache.expect("the last call made the turn's cache");
        if share {
            // The rows after the base become a shared segment (or the one
            // another conversation made of the same tokens meanwhile).
            let own: Vec<u32> = c.tokens()[cache.base_len()..kept]
                .iter()
                .chain(&sequence)
                .copied()
                .collect();
            let segment = model.share(cache, own);
            if plain && segment.output::<Replay>(|r| r.options == *c.options()).is_none() {
                segment.keep_output(Replay {
                    options: c.options().clone(),
                    output: output.clone(),
                    context_sum: context_sum.clone(),
                });
            }
            cache = model.segment_cache(segment);
        }
        if reused > 0 {
            model.count_shared(false, reused);
        }
        c.adopt(sequence, kept, cache, &output, context_sum);
        self.state = State::Over(Ok(output));
    }
}

impl Prefill {
    /// The cache the next call runs on top of (`None`: an empty one).
    fn past<'a>(&'a self, c: &'a Conversation) -> Option<&'a KvCache> {
        match &self.cache {
            Some(cache) => Some(cache),
            None if self.from_empty => None,
            None => Some(c.cache()),
        }
    }

    /// Tokens of cache the next call runs on top of.
    fn past_len(&self, c: &Conversation) -> usize {
        self.past(c).map_or(0, KvCache::len)
    }

    /// Where the call that starts at row `start` of the sequence ends:
    /// `prefill_chunk_tokens` on, but the probe's tokens always ride with
    /// the turn's last chunk (never split off, never a call of their own), so
    /// a turn that fits in a chunk is one call with its probe.
    fn chunk_end(&self, c: &Conversation, start: usize) -> usize {
        let len = self.sequence.len();
        let end = (start + c.options().prefill_chunk_tokens.max(1)).min(len);
        if len - end <= self.probe { len } else { end }
    }

    /// Plans the turn again as a rebuild of `c`'s context (its cache was
    /// evicted before any call ran on it).
    fn rebuild_from(&mut self, c: &Conversation) {
        // Let go of the shared segments this plan was to read first: a
        // segment only this turn still held is then freed (what the eviction
        // was for), not found again as a live prefix and read as before.
        self.base = None;
        self.cache = None;
        let place = place(c, self.turn.len()).expect("a turn that fit on its context fits on it rebuilt");
        *self = build(c, std::mem::take(&mut self.turn), self.text.clone(), place);
    }

    /// Runs the next call; returns whether it was the last (its cache, the
    /// probe cut, is then the turn's).
    fn call(&mut self, c: &Conversation) -> Result<bool, TurnError> {
        let (start, len) = (self.done, self.sequence.len());
        let end = self.chunk_end(c, start);
        let rows = self.pooler.rows();
        let keep = rows.start.max(start).min(end) - start..rows.end.max(start).min(end) - start;
        let model = c.model();
        let (hidden, next) = {
            let fresh;
            let past = match &self.cache {
                Some(cache) => cache,
                None if self.from_empty => {
                    fresh = model.empty_cache();
                    &fresh
                }
                None => c.cache(),
            };
            model.forward(&self.sequence[start..end], past, keep.clone())?
        };
        self.pooler.add_rows(&hidden, start + keep.start);
        let last = end == len;
        // The last call: the probe's rows leave the new cache, and it keeps
        // following the shared base or holds every row (the batched path
        // copies each row's cache out so).
        self.cache = Some(if last {
            model.finish(next, self.base.as_ref(), self.keep_base, self.probe)?
        } else {
            next
        });
        self.done = end;
        Ok(last)
    }
}

/// Checks and tokenises a turn and decides what runs on top of what.
fn plan(c: &Conversation, text: &str, role: &str) -> Result<Plan, TurnError> {
    if !role.is_empty() && !ROLES.contains(&role) {
        return Err(TurnError::UnknownRole(role.to_string()));
    }
    let model = c.model();
    let o = c.options();
    let template = o
        .input_type
        .template_name()
        .and_then(|name| model.templates().input_types.get(name))
        .cloned()
        .unwrap_or_default();
    let turn = model
        .tokenizer()
        .turn_templated(text, role, &template.prefix, &template.suffix)?;
    if turn.text.is_empty() {
        return Err(TurnError::Empty);
    }
    let n = turn.ids.len();
    if n > o.max_turn_tokens {
        return Err(TurnError::TurnTooLong {
            tokens: n,
            limit: o.max_turn_tokens,
        });
    }
    if n > o.max_context_tokens {
        return Err(TurnError::OverWindow {
            tokens: n,
            kept: 0,
            window: o.max_context_tokens,
        });
    }

    let place = place(c, n)?;
    if place.base.is_none()
        && let Some((segment, replay)) = shared_turn(c, &turn.ids)
    {
        return Ok(Plan::Shared(segment, replay));
    }
    Ok(Plan::Prefill(Box::new(build(c, turn.ids, turn.text, place))))
}

/// The shared segment of a turn of `ids` on top of `c`'s context, with the
/// output it had for `c`'s options: when the context is shared up to its
/// end (or empty) and a conversation with the same options took the same
/// turn there.
fn shared_turn(c: &Conversation, ids: &[u32]) -> Option<(Arc<Segment>, Arc<Replay>)> {
    let model = c.model();
    let bound = model.shared_prefix_tokens();
    if c.context_len() + ids.len() > bound || c.cache().own_len() != 0 || !c.is_resident() {
        return None;
    }
    let segment = model.find_segment(c.cache().base(), ids)?;
    let replay = segment.output::<Replay>(|r| r.options == *c.options())?;
    Some((segment, replay))
}

/// The calls of a turn of `turn` (its text at rows `text`) placed by `place`.
fn build(c: &Conversation, turn: Vec<u32>, text: Range<usize>, place: Place) -> Prefill {
    let model = c.model();
    let o = c.options();
    let Place {
        base: placed,
        segment,
        dropped,
        rebuilt,
        sum,
    } = place;
    let from_empty = placed.is_some();
    let kept = if from_empty {
        segment.as_ref().map_or(0, |s| s.end())
    } else {
        c.context_len()
    };
    let plain = !from_empty && c.cache().own_len() == 0;
    let mut sequence = placed.unwrap_or_default();
    let offset = sequence.len();
    sequence.extend_from_slice(&turn);
    let text_rows = offset + text.start..offset + text.end;
    let (mut probe_row, mut probe) = (None, 0);
    if o.pooling.appends() {
        // The probe (or the end token) rides at the end of the turn's call;
        // its last row is the pooled vector, and its rows are cut from the
        // new cache (no row of the turn attended to them: the cache is the
        // turn's alone).
        let ids = o.pooling.appended(model);
        sequence.extend_from_slice(ids);
        probe_row = Some(sequence.len() - 1);
        probe = ids.len();
    }
    // Sharing: a context within the bound is shared; past it, a base that
    // another conversation reads too is kept while it is worth it.
    let new_len = kept + sequence.len() - probe;
    let bound = model.shared_prefix_tokens();
    let share = bound > 0 && new_len <= bound;
    let base = if from_empty { segment } else { c.cache().base().cloned() };
    // This turn's references to the base: the clone above, and the
    // conversation's cache's when the turn runs on it.
    let ours = if from_empty { 1 } else { 2 };
    let keep_base = base
        .as_ref()
        .is_some_and(|b| share || (Arc::strong_count(b) > ours && new_len - b.end() <= KEEP_BASE_RATIO * b.end()));
    let reused = if from_empty { kept } else { 0 };
    Prefill {
        text,
        turn,
        pooler: pooler(
            c,
            &sequence,
            probe,
            text_rows,
            probe_row,
            from_empty.then_some((sum, kept)),
        ),
        sequence,
        from_empty,
        probe,
        dropped,
        rebuilt,
        done: 0,
        cache: base.clone().filter(|_| from_empty).map(|b| model.segment_cache(b)),
        kept,
        base,
        keep_base,
        share,
        plain,
        reused,
    }
}

/// The pooler of a turn's `sequence` (its last `probe` tokens the probe's
/// or the end token's), over the text rows `text`: with
/// [`MeanOver::Conversation`] it also sums every row but the probe's that
/// is not a special token and not in the sum already, onto the
/// conversation's sum when the sequence runs on its cache, else (`placed`:
/// the sum a rebuild goes on from and the context tokens it covers, and the
/// context tokens before the sequence) onto that sum or an empty one.
fn pooler(
    c: &Conversation,
    sequence: &[u32],
    probe: usize,
    text: std::ops::Range<usize>,
    probe_row: Option<usize>,
    placed: Option<(Option<(pooling::RowSum, usize)>, usize)>,
) -> pooling::Pooler {
    let model = c.model();
    let pooler = pooling::Pooler::new(model.spec().hidden_size, text, probe_row);
    if c.options().mean_over != MeanOver::Conversation {
        return pooler;
    }
    let empty = || pooling::RowSum::empty(model.spec().hidden_size);
    let (sum, first) = match placed {
        // A conversation forgets its sum only with a cache it no longer
        // has (restored or rolled back onto tokens): a turn on top of its
        // cache always has the sum to go on from.
        None => {
            debug_assert!(c.context_sum().is_some(), "a resident conversation's sum");
            (c.context_sum().cloned().unwrap_or_else(empty), 0)
        }
        Some((Some((sum, covers)), before)) => (sum, covers.saturating_sub(before)),
        Some((None, _)) => (empty(), 0),
    };
    let tokenizer = model.tokenizer();
    let plain = sequence[..sequence.len() - probe]
        .iter()
        .map(|&id| !tokenizer.is_special(id))
        .collect();
    pooler.with_context(sum, plain, first)
}

/// What an evicted or restored context is rebuilt on: the deepest live
/// shared segment that begins it (only the tokens after it are prefilled)
/// and, for [`MeanOver::Conversation`], the running sum the turn goes on
/// from with the context tokens it covers. That is the conversation's own
/// sum when it kept it (an eviction keeps it: the rebuilt rows are not
/// summed again), else (restored, rolled back) the sum through a segment of
/// the chain that a turn summing the conversation left on it, the rows
/// after that segment rebuilt and summed; with neither, the whole context
/// is rebuilt and summed from its first token.
fn rebuild_base(c: &Conversation) -> (Option<Arc<Segment>>, Option<(pooling::RowSum, usize)>) {
    let segment = c.model().longest_segment(c.tokens());
    if c.options().mean_over != MeanOver::Conversation {
        return (segment, None);
    }
    if let Some(sum) = c.context_sum() {
        return (segment, Some((sum.clone(), c.context_len())));
    }
    // The sum over a stretch of tokens does not depend on the options (the
    // probe's rows are never summed): any replay that kept one will do.
    let mut at = segment;
    while let Some(s) = at {
        if let Some(r) = s.output::<Replay>(|r| r.context_sum.is_some())
            && let Some(sum) = &r.context_sum
        {
            return (Some(s.clone()), Some((sum.clone(), s.end())));
        }
        at = s.parent().cloned();
    }
    (None, None)
}

/// Where a turn of `n` tokens goes in a conversation's context.
struct Place {
    /// What the turn's calls run on top of: `None`, the conversation's
    /// cache; otherwise these tokens first, from an empty cache or on top
    /// of `segment` (the context a slide keeps, nothing after a reset, the
    /// context when its cache was evicted, after the part of it a shared
    /// segment still holds).
    base: Option<Vec<u32>>,
    /// The shared segment an evicted context is rebuilt on.
    segment: Option<Arc<Segment>>,
    /// Context tokens a slide or a reset drops.
    dropped: usize,
    /// Context tokens recomputed because the cache had been evicted.
    rebuilt: usize,
    /// For [`MeanOver::Conversation`] on a rebuild: the running sum the
    /// turn goes on from, and how many of the context's first tokens it
    /// covers (`None`: an empty sum).
    sum: Option<(pooling::RowSum, usize)>,
}

/// The window's rule for a turn of `n` tokens (at most the window): on top
/// of the context if it fits (rebuilt first if evicted), else as the
/// overflow policy says.
fn place(c: &Conversation, n: usize) -> Result<Place, TurnError> {
    let o = c.options();
    let (window, ctx) = (o.max_context_tokens, c.context_len());
    if ctx + n <= window {
        if c.is_resident() {
            return Ok(Place {
                base: None,
                segment: None,
                dropped: 0,
                rebuilt: 0,
                sum: None,
            });
        }
        let (segment, sum) = rebuild_base(c);
        let from = segment.as_ref().map_or(0, |s| s.end());
        return Ok(Place {
            base: Some(c.tokens()[from..].to_vec()),
            segment,
            dropped: 0,
            rebuilt: ctx - from,
            sum,
        });
    }
    match o.overflow {
        Overflow::Reject => Err(TurnError::ContextFull {
            context: ctx,
            tokens: n,
            window,
        }),
        Overflow::Reset => Ok(Place {
            base: Some(Vec::new()),
            segment: None,
            dropped: ctx,
            rebuilt: 0,
            sum: None,
        }),
        Overflow::Slide => {
            let keep = o.keep_tokens.min(ctx);
            if keep + n > window {
                return Err(TurnError::OverWindow {
                    tokens: n,
                    kept: keep,
                    window,
                });
            }
            // Leave at least half the window free, and room for the turn.
            let target = (window / 2).min(window - n).max(keep);
            let recent = target - keep;
            let tokens = c.tokens();
            let mut kept = Vec::with_capacity(target + n);
            kept.extend_from_slice(&tokens[..keep]);
            kept.extend_from_slice(&tokens[ctx - recent..]);
            Ok(Place {
                dropped: ctx - kept.len(),
                base: Some(kept),
                segment: None,
                rebuilt: 0,
                sum: None,
            })
        }
    }
}
