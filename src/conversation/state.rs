//! One conversation's state: the token ids of its context, the KV cache
//! behind them (all of them, or none after an eviction), its options.

use std::sync::Arc;

use super::{
    TurnOutput,
    options::{ConversationOptions, MeanOver, OptionsError},
    pooling::RowSum,
};
use crate::model::{KvCache, Model};

/// One conversation over a shared [`Model`]: its own tokens and KV cache.
///
/// It is `Send`: the server moves it into the engine thread with each turn
/// and gets it back with the result. Dropping it frees its cache.
#[derive(Debug)]
pub struct Conversation {
    model: Arc<Model>,
    options: ConversationOptions,
    tokens: Vec<u32>,
    cache: KvCache,
    peak_kv_bytes: u64,
    turns: u64,
    /// The last turn's output, kept when asked ([`Conversation::remember_last`]).
    last: Option<Box<TurnOutput>>,
    remember_last: bool,
    /// [`MeanOver::Conversation`]'s running sum over the context; `None`
    /// when not kept, or not known (a restored or rolled-back context,
    /// whose next turn rebuilds it: never a resident one).
    context_sum: Option<RowSum>,
}

impl Conversation {
    /// A new, empty conversation on `model`.
    ///
    /// # Errors
    /// [`OptionsError`] when the options do not suit this model.
    pub fn new(model: &Arc<Model>, options: ConversationOptions) -> Result<Conversation, OptionsError> {
        options.validate(model)?;
        Ok(Conversation {
            cache: model.empty_cache(),
            model: model.clone(),
            context_sum: Self::empty_sum(model, &options),
            options,
            tokens: Vec::new(),
            peak_kv_bytes: 0,
            turns: 0,
            last: None,
            remember_last: false,
        })
    }

    /// The running sum of an empty context, when the options keep one.
    fn empty_sum(model: &Model, options: &ConversationOptions) -> Option<RowSum> {
        (options.mean_over == MeanOver::Conversation).then(|| RowSum::empty(model.spec().hidden_size))
    }

    /// A conversation on `model` whose context is `tokens` (exactly as
    /// another conversation held them) after `turns` turns, its cache not
    /// yet made: its next turn rebuilds it by recomputation first, like an
    /// evicted conversation's, and its embeddings are what they would have
    /// been had the conversation never left.
    ///
    /// # Errors
    /// [`OptionsError`] when the options do not suit this model, or the
    /// tokens do not fit its window.
    pub fn restored(
        model: &Arc<Model>,
        options: ConversationOptions,
        tokens: Vec<u32>,
        turns: u64,
    ) -> Result<Conversation, OptionsError> {
        let mut conversation = Conversation::new(model, options)?;
        if tokens.len() > conversation.options.max_context_tokens {
            return Err(OptionsError::Window {
                asked: tokens.len(),
                max: conversation.options.max_context_tokens,
            });
        }
        conversation.tokens = tokens;
        conversation.turns = turns;
        conversation.forget_sum();
        Ok(conversation)
    }

    /// Puts the context back as it was (`tokens` after `turns` turns), its
    /// cache dropped (rebuilt at the next turn): for a turn whose result
    /// could not be kept where it had to be (a session store that did not
    /// take it). The next turn's embedding is exactly what it would have
    /// been had that turn never run.
    pub fn roll_back(&mut self, tokens: Vec<u32>, turns: u64, last: Option<TurnOutput>) {
        self.tokens = tokens;
        self.turns = turns;
        self.last = last.map(Box::new);
        self.cache = self.model.empty_cache();
        self.forget_sum();
    }

    /// The context's tokens came without their cache: the running sum (if
    /// kept) is unknown until the next turn's rebuild sums them again, or
    /// the empty one when there are none (such a context is resident).
    fn forget_sum(&mut self) {
        self.context_sum = if self.tokens.is_empty() {
            Self::empty_sum(&self.model, &self.options)
        } else {
            None
        };
    }

    /// Keeps each turn's output from now on ([`Conversation::last_output`]):
    /// for a resumable session, whose client may lose a turn's answer with
    /// its stream and read it again on the resume.
    pub fn remember_last(&mut self, last: Option<TurnOutput>) {
        self.remember_last = true;
        if last.is_some() {
            self.last = last.map(Box::new);
        }
    }

    /// The last turn's output, when kept.
    pub fn last_output(&self) -> Option<&TurnOutput> {
        self.last.as_deref()
    }

    /// Moves the conversation out, leaving an empty one on the same model
    /// and options in its place.
    pub(crate) fn take(&mut self) -> Conversation {
        let empty = Conversation {
            cache: self.model.empty_cache(),
            context_sum: Self::empty_sum(&self.model, &self.options),
            model: self.model.clone(),
            options: self.options.clone(),
            tokens: Vec::new(),
            peak_kv_bytes: 0,
            turns: 0,
            last: None,
            remember_last: false,
        };
        std::mem::replace(self, empty)
    }

    /// Drops the context and its cache; returns how many tokens were released.
    /// The next turn's embedding equals a fresh conversation's.
    pub fn reset(&mut self) -> usize {
        let released = self.tokens.len();
        self.tokens.clear();
        self.cache = self.model.empty_cache();
        self.context_sum = Self::empty_sum(&self.model, &self.options);
        released
    }

    /// Drops the cache to free its memory and keeps the token ids: the
    /// next turn rebuilds the cache (by prefilling the tokens, after the
    /// part of them a live shared segment holds) before it runs, and its
    /// embedding is what it would have been. Returns the bytes it no longer
    /// reads (0 when nothing was cached): its own, and its shared segments',
    /// which are freed if no other conversation reads them.
    pub fn evict_cache(&mut self) -> u64 {
        if self.cache.is_empty() {
            return 0;
        }
        let released = self.cache.total_bytes();
        self.cache = self.model.empty_cache();
        released
    }

    /// Whether the cache covers the context (false after
    /// [`Conversation::evict_cache`], until the next turn rebuilds it).
    pub fn is_resident(&self) -> bool {
        self.cache.len() == self.tokens.len()
    }

    /// [`MeanOver::Conversation`]'s running sum, when kept and known.
    pub(super) fn context_sum(&self) -> Option<&RowSum> {
        self.context_sum.as_ref()
    }

    /// Turns this conversation has taken (a reset does not count them down).
    pub fn turns(&self) -> u64 {
        self.turns
    }

    /// Tokens in the context (the next position).
    pub fn context_len(&self) -> usize {
        self.tokens.len()
    }

    /// The context's token ids, in order.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Bytes of KV cache this conversation reads: its own, and those of the
    /// shared segments it follows (which other conversations may read too).
    pub fn kv_bytes(&self) -> u64 {
        self.cache.total_bytes()
    }

    /// The most KV bytes this conversation has read at once after a turn
    /// (as [`Conversation::kv_bytes`]: shared segments included).
    pub fn peak_kv_bytes(&self) -> u64 {
        self.peak_kv_bytes
    }

    /// The conversation's options.
    pub fn options(&self) -> &ConversationOptions {
        &self.options
    }

    /// The model it runs on.
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// The KV cache of the context.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Takes a turn's state after its last call: `sequence` (the turn's
    /// tokens, after the kept, slid or rebuilt context) follows the first
    /// `kept` tokens of the context, and `cache` (which covers exactly the
    /// new context) replaces the old one.
    /// A turn that kept the conversation's sum leaves `context_sum`, the
    /// sum over the new context.
    pub(super) fn adopt(
        &mut self,
        sequence: Vec<u32>,
        kept: usize,
        cache: KvCache,
        output: &TurnOutput,
        context_sum: Option<RowSum>,
    ) {
        if context_sum.is_some() {
            self.context_sum = context_sum;
        }
        if self.remember_last {
            self.last = Some(Box::new(output.clone()));
        }
        self.tokens.truncate(kept);
        self.tokens.extend_from_slice(&sequence);
        debug_assert_eq!(cache.len(), self.tokens.len(), "the cache covers exactly the context");
        self.cache = cache;
        self.peak_kv_bytes = self.peak_kv_bytes.max(self.cache.total_bytes());
        self.turns += 1;
    }
}
