//! A conversation: the token ids of its context, the KV cache behind them,
//! and the turn that prefills new text on top and returns an embedding.
//!
//! # Invariants
//! * The next position is always `tokens.len()`, and the cache covers either
//!   all the tokens (the conversation is *resident*) or none of them (it was
//!   *evicted*: [`Conversation::evict_cache`] dropped the cache to free
//!   memory and kept the token ids, 4 bytes a token). An evicted
//!   conversation's next turn rebuilds the cache by prefilling its tokens
//!   (in chunks, like a long turn), then runs the turn: its embedding is
//!   exactly what it would have been (the oracle below).
//! * A turn is all or nothing: the new cache and tokens are adopted only when
//!   every model call succeeded, so a failed turn leaves the conversation as
//!   it was (ONNX Runtime never writes into its inputs), though perhaps
//!   evicted.
//!
//! # From hidden states to a vector
//! A turn's text tokens (its ChatML markers and input-type template excluded)
//! are pooled (mean or last token), or the model's probe runs after the
//! turn's tokens in the same call and its last row is taken
//! ([`Pooling::Probe`]; the probe's rows are then cut from the new cache, so
//! the conversation's cache is what it would be without it), or both the
//! probe's row and the mean are taken ([`Pooling::ProbeMean`]). The vector
//! is then standardised with the model's background statistics of that
//! pooling (for [`Pooling::ProbeMean`]: each part on its own, each
//! L2-normalised, side by side; or through the learned head,
//! [`Standardize::Head`]), truncated and normalised.
//!
//! # The oracle
//! The embedding after turn k equals the embedding computed in one call with
//! an empty cache over `concat(tokens(t1)…tokens(tk))` (after a slide: over the
//! kept tokens followed by the turn; for the probe: followed by the probe's
//! tokens, its last row), pooled over the same span and post-processed alike: exactly for a
//! turn run on its own ([`Conversation::turn`]), up to float rounding for one
//! that shared a padded call with other conversations' turns
//! ([`crate::schedule::run_turns`]).
//!
//! "Exactly" holds on every x86-64 CPU for f32 and fp16 graphs, by how ONNX
//! Runtime computes them: the weight MatMuls multiply prepacked weights with
//! one kernel whatever the number of rows, each output summed in the same
//! order; attention never has a single row (the query heads of a KV head are
//! stacked); masked positions add exact zeros. Measured bit-identical on
//! AVX-512 and on an emulated AVX2-only CPU (`make test-avx2`). Variants that
//! quantise activations per call (q4, q8, int8) meet the oracle only in
//! cosine, by a margin that depends on the CPU's kernels.
//!
//! Turns of several conversations are grouped into shared calls by
//! [`crate::schedule`]; this module is one conversation's state machine.

use std::sync::Arc;

use crate::{
    model::{Hidden, KvCache, Model, ModelError, unit},
    tokenizer::{ROLES, TokenizerError},
};

/// The default context window, when neither client nor server sets one.
pub const DEFAULT_MAX_CONTEXT_TOKENS: usize = 8192;
/// Components [`Standardize::Whiten`] keeps when `dimensions` is not set
/// (the best of 128–700 in QUALITY.md's measurements).
pub const DEFAULT_WHITEN_COMPONENTS: usize = 384;
/// The default size of one prefill call for long turns.
pub const DEFAULT_PREFILL_CHUNK_TOKENS: usize = 512;

/// How a turn's hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// Mean over the turn's text tokens (each has attended to the whole context).
    Mean,
    /// The hidden state of the turn's last text token.
    LastToken,
    /// The model's probe (a fixed suffix from `templates.json`, e.g.
    /// `In one sentence, the text above is about: "`) run after the turn's
    /// tokens, its last token's hidden state: a summary of the whole
    /// conversation. The probe's tokens never join the context: they ride at
    /// the end of the turn's own model call and their rows are cut from the
    /// new cache (no token of the turn attended to them: the cache is the
    /// one the turn alone makes, bit for bit on f32 and fp16 graphs).
    Probe,
    /// [`Pooling::Probe`] and [`Pooling::Mean`] of the same turn together:
    /// with [`Standardize::Head`] (the default for `Embed` and `Converse`),
    /// the model's learned head over both; otherwise each standardised,
    /// L2-normalised and side by side, the probe's first (each takes half of
    /// `dimensions`). The best vector for retrieval and for the state of a
    /// conversation (QUALITY.md). Costs what [`Pooling::Probe`] costs.
    #[default]
    ProbeMean,
}

impl Pooling {
    /// Whether the model's probe runs for this pooling.
    pub fn probes(self) -> bool {
        match self {
            Pooling::Probe | Pooling::ProbeMean => true,
            Pooling::Mean | Pooling::LastToken => false,
        }
    }
}

/// The pooled vectors of one turn, before standardisation.
#[derive(Debug, Clone, PartialEq)]
enum Pooled {
    /// One vector, with the name of its background statistics.
    One(&'static str, Vec<f32>),
    /// [`Pooling::ProbeMean`]'s two.
    ProbeMean { probe: Vec<f32>, mean: Vec<f32> },
}

/// What is done to a pooled vector before truncation and normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Standardize {
    /// Per-dimension z-score with the model's background statistics
    /// (`embedding_stats.safetensors`): `(x - mean) / std`.
    Zscore,
    /// Nothing: the raw hidden state.
    None,
    /// PCA whitening with the model's background statistics: the vector's
    /// coordinates along the background's principal directions (largest
    /// variance first), each over its standard deviation. Its length is the
    /// number of components kept: `dimensions`, by default
    /// [`DEFAULT_WHITEN_COMPONENTS`].
    Whiten,
    /// The model's learned head (`embedding_head.safetensors`: fitted with
    /// a contrastive loss on docstring → code pairs and conversations) over
    /// [`Pooling::ProbeMean`]'s two vectors. That pooling only; it is
    /// [`ConversationOptions::default`]'s.
    #[default]
    Head,
}

impl Standardize {
    /// The standardisation a pooling gets when none is asked for: the best
    /// measured for it (QUALITY.md).
    pub fn default_for(pooling: Pooling) -> Standardize {
        match pooling {
            Pooling::ProbeMean => Standardize::Head,
            Pooling::Probe => Standardize::Whiten,
            Pooling::Mean | Pooling::LastToken => Standardize::Zscore,
        }
    }
}

/// What kind of text a turn is, for the model's input-type templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputType {
    /// The text as it is.
    #[default]
    Raw,
    /// A search query: the model's `query` template around the text.
    Query,
    /// A document to be found: the model's `document` template.
    Document,
}

impl InputType {
    /// The template's name in `templates.json`, if any.
    pub fn template_name(self) -> Option<&'static str> {
        match self {
            InputType::Raw => None,
            InputType::Query => Some("query"),
            InputType::Document => Some("document"),
        }
    }
}

/// What happens when a turn does not fit in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop the oldest tokens after the first `keep_tokens` until at least
    /// half the window is free, rebuild the cache, then run the turn.
    #[default]
    Slide,
    /// Fail the turn; nothing changes.
    Reject,
    /// Clear the context, then run the turn.
    Reset,
}

/// Per-conversation settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationOptions {
    /// Pooling of the returned embedding.
    pub pooling: Pooling,
    /// Keep only the first `dimensions` components (Matryoshka style); `None` keeps all.
    pub dimensions: Option<usize>,
    /// L2-normalise (after truncation).
    pub normalize: bool,
    /// The context window in tokens (≤ the model's maximum).
    pub max_context_tokens: usize,
    /// What to do when a turn does not fit.
    pub overflow: Overflow,
    /// Tokens at the start of the context a slide never drops (e.g. a system prompt).
    pub keep_tokens: usize,
    /// Also return the mean-pooled vector (useful with [`Pooling::LastToken`]).
    pub include_turn_mean: bool,
    /// Standardisation before truncation and normalisation.
    pub standardize: Standardize,
    /// The template around every turn's text.
    pub input_type: InputType,
    /// Longest turn accepted, in tokens (a server limit).
    pub max_turn_tokens: usize,
    /// Tokens per model call when prefilling a long turn or a rebuilt context.
    pub prefill_chunk_tokens: usize,
}

impl Default for ConversationOptions {
    fn default() -> Self {
        Self {
            pooling: Pooling::ProbeMean,
            dimensions: None,
            normalize: true,
            max_context_tokens: DEFAULT_MAX_CONTEXT_TOKENS,
            overflow: Overflow::Slide,
            keep_tokens: 0,
            include_turn_mean: false,
            standardize: Standardize::Head,
            input_type: InputType::Raw,
            max_turn_tokens: DEFAULT_MAX_CONTEXT_TOKENS,
            prefill_chunk_tokens: DEFAULT_PREFILL_CHUNK_TOKENS,
        }
    }
}

/// Options that cannot work with this model.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// No dimensions, or more than the pooling and standardisation give.
    #[error("dimensions {asked} must be between 1 and {max}, the components this pooling and standardisation give")]
    Dimensions {
        /// Asked for.
        asked: usize,
        /// The most there are.
        max: usize,
    },
    /// A window of zero or above the model's maximum.
    #[error("max_context_tokens {asked} must be between 2 and the model's maximum {max}")]
    Window {
        /// Asked for.
        asked: usize,
        /// The model's maximum.
        max: usize,
    },
    /// `keep_tokens` would leave no room to slide.
    #[error("keep_tokens {keep} must be at most half the window ({window} tokens)")]
    Keep {
        /// Asked for.
        keep: usize,
        /// The window.
        window: usize,
    },
    /// A zero prefill chunk.
    #[error("prefill_chunk_tokens must be at least 1")]
    Chunk,
    /// The learned head was asked for with another pooling than PROBE_MEAN.
    #[error(
        "standardize HEAD needs pooling PROBE_MEAN (the head is fitted on the probe's and the mean's vectors together)"
    )]
    HeadNeedsProbeMean,
}

impl ConversationOptions {
    /// Checks the options against a model.
    ///
    /// # Errors
    /// The first [`OptionsError`] found.
    pub fn validate(&self, model: &Model) -> Result<(), OptionsError> {
        let spec = model.spec();
        if self.standardize == Standardize::Head && self.pooling != Pooling::ProbeMean {
            return Err(OptionsError::HeadNeedsProbeMean);
        }
        let max = self.max_dimensions(model);
        if let Some(d) = self.dimensions
            && (d == 0 || d > max)
        {
            return Err(OptionsError::Dimensions { asked: d, max });
        }
        if self.max_context_tokens < 2 || self.max_context_tokens > spec.max_positions {
            return Err(OptionsError::Window {
                asked: self.max_context_tokens,
                max: spec.max_positions,
            });
        }
        if self.keep_tokens > self.max_context_tokens / 2 {
            return Err(OptionsError::Keep {
                keep: self.keep_tokens,
                window: self.max_context_tokens,
            });
        }
        if self.prefill_chunk_tokens == 0 {
            return Err(OptionsError::Chunk);
        }
        Ok(())
    }

    /// The most components the pooling and standardisation give on `model`:
    /// its hidden size, twice that for [`Pooling::ProbeMean`] (two vectors
    /// side by side), the head's output for [`Standardize::Head`].
    pub fn max_dimensions(&self, model: &Model) -> usize {
        let hidden = model.spec().hidden_size;
        match (self.pooling, self.standardize) {
            (_, Standardize::Head) => model.embedding_head().dimensions,
            (Pooling::ProbeMean, _) => 2 * hidden,
            _ => hidden,
        }
    }

    /// The embedding's length on `model`: `dimensions` if set; otherwise
    /// every component, but for [`Standardize::Whiten`]'s
    /// [`DEFAULT_WHITEN_COMPONENTS`] (per vector: twice that for
    /// [`Pooling::ProbeMean`]).
    pub fn output_dimensions(&self, model: &Model) -> usize {
        let max = self.max_dimensions(model);
        let default = match (self.pooling, self.standardize) {
            (Pooling::ProbeMean, Standardize::Whiten) => 2 * DEFAULT_WHITEN_COMPONENTS,
            (_, Standardize::Whiten) => DEFAULT_WHITEN_COMPONENTS,
            _ => max,
        };
        self.dimensions.unwrap_or(default).min(max)
    }

    /// The length of `include_turn_mean`'s vector: as a [`Pooling::Mean`]
    /// embedding's (z-scored under [`Standardize::Head`]).
    pub fn turn_mean_dimensions(&self, model: &Model) -> usize {
        let hidden = model.spec().hidden_size;
        let default = if self.standardize == Standardize::Whiten {
            DEFAULT_WHITEN_COMPONENTS
        } else {
            hidden
        };
        self.dimensions.unwrap_or(default).min(hidden)
    }
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
    /// Tokens dropped from the context by this turn (slide or reset).
    pub evicted_tokens: usize,
    /// Tokens of context recomputed before the turn because the
    /// conversation's cache had been evicted (0 when it was resident).
    pub rebuilt_tokens: usize,
}

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
}

/// Pools a turn's rows as they stream out of the prefill calls: the mean
/// and the last of its text rows, and the probe's last row.
#[derive(Debug)]
pub(crate) struct Pooler {
    /// Rows of the plan's sequence that are the turn's text.
    text: std::ops::Range<usize>,
    /// The row of the probe's last token.
    probe_row: Option<usize>,
    sum: Vec<f64>,
    rows: usize,
    last: Vec<f32>,
    probe: Option<Vec<f32>>,
}

impl Pooler {
    pub(crate) fn new(width: usize, plan: &TurnPlan) -> Self {
        Self {
            text: plan.span.clone(),
            probe_row: plan.probe_row,
            sum: vec![0.0; width],
            rows: 0,
            last: Vec::new(),
            probe: None,
        }
    }

    /// Takes the rows of `hidden`, the first of which is row `first` of the
    /// plan's sequence.
    pub(crate) fn add_rows(&mut self, hidden: &Hidden, first: usize) {
        for r in 0..hidden.rows() {
            let (index, row) = (first + r, hidden.row(r));
            if self.text.contains(&index) {
                for (s, v) in self.sum.iter_mut().zip(row) {
                    *s += f64::from(*v);
                }
                self.rows += 1;
                self.last.clear();
                self.last.extend_from_slice(row);
            }
            if self.probe_row == Some(index) {
                self.probe = Some(row.to_vec());
            }
        }
    }

    fn mean(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.sum.iter().map(|s| (s / n) as f32).collect()
    }
}

/// Truncates to `dims` and L2-normalises if asked.
pub fn finish_vector(mut v: Vec<f32>, dims: usize, normalize: bool) -> Vec<f32> {
    v.truncate(dims);
    if normalize {
        let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
        if norm > 0.0 {
            for x in &mut v {
                *x = (f64::from(*x) / norm) as f32;
            }
        }
    }
    v
}

/// A checked, tokenised turn with its place in the context decided.
#[derive(Debug)]
pub(crate) struct TurnPlan {
    /// Tokens to run: the turn, or after a slide/reset the kept tokens and the turn.
    pub(crate) sequence: Vec<u32>,
    /// `sequence` runs from an empty cache (slide or reset), not on top of the context.
    pub(crate) rebuild: bool,
    /// Rows of `sequence` that are pooled (the turn's text).
    pub(crate) span: std::ops::Range<usize>,
    /// The row of the probe's last token, when the pooling probes (the
    /// probe rides at the end of the turn's call).
    pub(crate) probe_row: Option<usize>,
    /// Tokens of the probe at the end of `sequence` (0 when the pooling
    /// does not probe), cut from the turn's new cache.
    pub(crate) probe_tokens: usize,
    /// The turn's tokens.
    turn_tokens: usize,
    /// Tokens the turn drops from the context.
    evicted: usize,
    /// Context tokens recomputed because the cache had been evicted.
    restored: usize,
}

impl TurnPlan {
    /// The rows of `sequence` the pooling reads: the text's, and on to the
    /// probe's last row.
    pub(crate) fn rows(&self) -> std::ops::Range<usize> {
        self.span.start..self.probe_row.map_or(self.span.end, |r| r + 1)
    }

    /// Bytes cutting the probe from a new cache of `total` tokens adds at
    /// its peak: the copy without it, made while the call's cache is held.
    pub(crate) fn cut_bytes(&self, model: &Model, total: usize) -> u64 {
        if self.probe_tokens == 0 {
            0
        } else {
            model.call_bytes(0, total - self.probe_tokens)
        }
    }
}

/// A turn too long for one call, part-way through its prefill on the
/// conversation that planned it: [`Conversation::advance`] runs its next chunk.
#[derive(Debug)]
pub(crate) struct PendingTurn {
    plan: TurnPlan,
    pooler: Pooler,
    /// The cache after the chunks run so far (none yet: the conversation's,
    /// or an empty one for a rebuild).
    cache: Option<KvCache>,
    /// Tokens of `plan.sequence` prefilled so far.
    done: usize,
}

impl PendingTurn {
    /// Whether its next chunk reads the conversation's own cache (false for
    /// a rebuild, and once the first chunk has run): if not, that cache may
    /// be evicted while the turn goes on.
    pub(crate) fn reads_conversation_cache(&self) -> bool {
        !self.plan.rebuild && self.cache.is_none()
    }

    pub(crate) fn new(plan: TurnPlan, width: usize) -> Self {
        Self {
            pooler: Pooler::new(width, &plan),
            plan,
            cache: None,
            done: 0,
        }
    }
}

/// What a step of [`Conversation::advance`] leaves.
#[derive(Debug)]
pub(crate) enum Advance {
    /// The turn is done and adopted.
    Done(TurnOutput),
    /// More chunks to run.
    More(PendingTurn),
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
            options,
            tokens: Vec::new(),
            peak_kv_bytes: 0,
            turns: 0,
        })
    }

    /// Runs one turn: tokenises `text` (wrapped in ChatML when `role` is set),
    /// prefills it on top of the context and returns its embedding.
    ///
    /// # Errors
    /// A [`TurnError`]; the conversation is then exactly as before the call.
    pub fn turn(&mut self, text: &str, role: &str) -> Result<TurnOutput, TurnError> {
        let plan = self.plan(text, role)?;
        self.run_alone(plan)
    }

    /// Checks and tokenises a turn and decides what runs on top of what.
    pub(crate) fn plan(&self, text: &str, role: &str) -> Result<TurnPlan, TurnError> {
        if !role.is_empty() && !ROLES.contains(&role) {
            return Err(TurnError::UnknownRole(role.to_string()));
        }
        let template = self
            .options
            .input_type
            .template_name()
            .and_then(|name| self.model.templates().input_types.get(name))
            .cloned()
            .unwrap_or_default();
        let turn = self
            .model
            .tokenizer()
            .turn_templated(text, role, &template.prefix, &template.suffix)?;
        if turn.text.is_empty() {
            return Err(TurnError::Empty);
        }
        let o = &self.options;
        let n = turn.ids.len();
        if n > o.max_turn_tokens {
            return Err(TurnError::TurnTooLong {
                tokens: n,
                limit: o.max_turn_tokens,
            });
        }
        let window = o.max_context_tokens;
        let ctx = self.tokens.len();
        if n > window {
            return Err(TurnError::OverWindow {
                tokens: n,
                kept: 0,
                window,
            });
        }

        let mut restored = 0;
        let (rebuild, evicted): (Option<Vec<u32>>, usize) = if ctx + n <= window {
            if self.is_resident() {
                (None, 0)
            } else {
                restored = ctx;
                (Some(self.tokens.clone()), 0)
            }
        } else {
            match o.overflow {
                Overflow::Reject => {
                    return Err(TurnError::ContextFull {
                        context: ctx,
                        tokens: n,
                        window,
                    });
                }
                Overflow::Reset => (Some(Vec::new()), ctx),
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
                    let mut kept = Vec::with_capacity(target + n);
                    kept.extend_from_slice(&self.tokens[..keep]);
                    kept.extend_from_slice(&self.tokens[ctx - recent..]);
                    let evicted = ctx - kept.len();
                    (Some(kept), evicted)
                }
            }
        };
        let rebuilt = rebuild.is_some();
        let mut sequence = rebuild.unwrap_or_default();
        let offset = sequence.len();
        sequence.extend_from_slice(&turn.ids);
        let span = (offset + turn.text.start)..(offset + turn.text.end);
        let (mut probe_row, mut probe_tokens) = (None, 0);
        if o.pooling.probes() {
            // The probe rides at the end of the turn's call; its last row is
            // the probe's vector, and its rows are cut from the new cache (no
            // row of the turn attended to them: the cache is the turn's alone).
            let probe = self.model.probe_ids();
            sequence.extend_from_slice(probe);
            probe_row = Some(sequence.len() - 1);
            probe_tokens = probe.len();
        }
        Ok(TurnPlan {
            sequence,
            rebuild: rebuilt,
            span,
            probe_row,
            probe_tokens,
            turn_tokens: n,
            evicted,
            restored,
        })
    }

    /// Bytes a single-call plan adds to the model's ledger at its peak:
    /// the call's outputs and, when the probe is cut from them, the copy
    /// without it (see [`Model::call_bytes`], [`Model::truncate`]).
    pub(crate) fn plan_bytes(&self, plan: &TurnPlan) -> u64 {
        let total = self.base_len(plan) + plan.sequence.len();
        self.model.call_bytes(0, total) + plan.cut_bytes(&self.model, total)
    }

    /// Bytes the next chunk of a pending turn adds at its peak (with the
    /// probe's cut after the last chunk).
    pub(crate) fn chunk_bytes(&self, pending: &PendingTurn) -> u64 {
        let base = match &pending.cache {
            Some(cache) => cache.len(),
            None => self.base_len(&pending.plan),
        };
        let end = self.chunk_end(&pending.plan, pending.done);
        let new = end - pending.done;
        let cut = if end == pending.plan.sequence.len() {
            pending.plan.cut_bytes(&self.model, base + new)
        } else {
            0
        };
        self.model.call_bytes(base, new) + cut
    }

    /// Whether the plan runs in a single model call (and so can share one).
    pub(crate) fn single_call(&self, plan: &TurnPlan) -> bool {
        self.chunk_end(plan, 0) == plan.sequence.len()
    }

    /// Where the call that starts at row `start` of the plan's sequence
    /// ends: `prefill_chunk_tokens` on, but the probe's tokens always ride
    /// with the turn's last chunk (never split off, never a call of their
    /// own), so a turn that fits in a chunk is one call with its probe.
    fn chunk_end(&self, plan: &TurnPlan, start: usize) -> usize {
        let len = plan.sequence.len();
        let end = (start + self.options.prefill_chunk_tokens.max(1)).min(len);
        if len - end <= plan.probe_tokens { len } else { end }
    }

    /// Tokens of cache the plan runs on top of.
    pub(crate) fn base_len(&self, plan: &TurnPlan) -> usize {
        if plan.rebuild { 0 } else { self.cache.len() }
    }

    /// Runs a plan on its own, in `prefill_chunk_tokens` calls.
    pub(crate) fn run_alone(&mut self, plan: TurnPlan) -> Result<TurnOutput, TurnError> {
        let pending = PendingTurn::new(plan, self.model.spec().hidden_size);
        self.finish(pending)
    }

    /// Runs all the chunks left of a pending turn.
    pub(crate) fn finish(&mut self, mut pending: PendingTurn) -> Result<TurnOutput, TurnError> {
        loop {
            match self.advance(pending)? {
                Advance::Done(output) => return Ok(output),
                Advance::More(rest) => pending = rest,
            }
        }
    }

    /// Runs the next `prefill_chunk_tokens` of a turn planned on this
    /// conversation (see `schedule::start_turns`). After the last chunk the
    /// conversation takes the turn's state and the output comes back; until
    /// then, and after an error, the conversation is exactly as before the
    /// turn, and dropping the pending turn abandons it.
    pub(crate) fn advance(&mut self, mut pending: PendingTurn) -> Result<Advance, TurnError> {
        let (start, len) = (pending.done, pending.plan.sequence.len());
        let end = self.chunk_end(&pending.plan, start);
        let rows = pending.plan.rows();
        let keep = rows.start.max(start).min(end) - start..rows.end.max(start).min(end) - start;
        let (hidden, next) = {
            let fresh;
            let past = match &pending.cache {
                Some(cache) => cache,
                None if pending.plan.rebuild => {
                    fresh = self.model.empty_cache();
                    &fresh
                }
                None => &self.cache,
            };
            self.model
                .forward(&pending.plan.sequence[start..end], past, keep.clone())?
        };
        pending.pooler.add_rows(&hidden, start + keep.start);
        if end < len {
            pending.cache = Some(next);
            pending.done = end;
            return Ok(Advance::More(pending));
        }
        // The last call: the probe's rows leave the new cache (the batched
        // path copies each row's cache out without them).
        let cut = pending.plan.probe_tokens;
        let cache = if cut > 0 {
            self.model.truncate(&next, next.len() - cut)?
        } else {
            next
        };
        let PendingTurn { plan, pooler, .. } = pending;
        Ok(Advance::Done(self.adopt(plan, pooler, cache)))
    }

    /// Standardises one pooled vector with the statistics named `key`,
    /// keeping `dims` components. (The head has no single-vector form: a
    /// lone vector under [`Standardize::Head`], `include_turn_mean`'s, is
    /// z-scored.)
    fn standardized(&self, key: &str, mut v: Vec<f32>, dims: usize) -> Vec<f32> {
        let stats = self.model.embedding_stats().get(key);
        match self.options.standardize {
            Standardize::None => {}
            Standardize::Zscore | Standardize::Head => stats.apply(&mut v),
            Standardize::Whiten => v = stats.whiten(&v, dims),
        }
        v.truncate(dims);
        v
    }

    /// Standardises (as the options say), truncates to `dims` and normalises
    /// a turn's pooled vectors.
    fn finish_pooled(&self, pooled: Pooled, dims: usize) -> Vec<f32> {
        let v = match pooled {
            Pooled::One(key, v) => self.standardized(key, v, dims),
            Pooled::ProbeMean { probe, mean } if self.options.standardize == Standardize::Head => {
                self.model.embedding_head().apply(&probe, &mean)
            }
            Pooled::ProbeMean { probe, mean } => {
                // Each part takes half the dimensions (the probe the odd one),
                // each normalised: side by side, neither outweighs the other.
                let mut v = unit(self.standardized("probe", probe, dims.div_ceil(2)));
                v.extend(unit(self.standardized("mean", mean, dims / 2)));
                v
            }
        };
        finish_vector(v, dims, self.options.normalize)
    }

    /// Success of the turn's calls: takes the new state (`cache`, the
    /// probe's rows already cut from it) and builds the output.
    pub(crate) fn adopt(&mut self, mut plan: TurnPlan, mut pooler: Pooler, cache: KvCache) -> TurnOutput {
        plan.sequence.truncate(plan.sequence.len() - plan.probe_tokens);
        let probed = pooler.probe.take();
        if plan.rebuild {
            self.tokens = plan.sequence;
        } else {
            self.tokens.extend_from_slice(&plan.sequence);
        }
        let context_tokens = self.tokens.len();
        debug_assert_eq!(cache.len(), context_tokens, "the cache covers exactly the context");
        self.cache = cache;
        self.peak_kv_bytes = self.peak_kv_bytes.max(self.cache.bytes());
        self.turns += 1;

        let turn_mean = self.options.include_turn_mean.then(|| {
            self.finish_pooled(
                Pooled::One("mean", pooler.mean()),
                self.options.turn_mean_dimensions(&self.model),
            )
        });
        let probe = || probed.expect("a pooling that probes has its probe row in the turn's call");
        let pooled = match self.options.pooling {
            Pooling::Mean => Pooled::One("mean", pooler.mean()),
            Pooling::LastToken => Pooled::One("last_token", std::mem::take(&mut pooler.last)),
            Pooling::Probe => Pooled::One("probe", probe()),
            Pooling::ProbeMean => Pooled::ProbeMean {
                mean: pooler.mean(),
                probe: probe(),
            },
        };
        let embedding = self.finish_pooled(pooled, self.options.output_dimensions(&self.model));
        TurnOutput {
            embedding,
            turn_mean,
            turn_tokens: plan.turn_tokens,
            context_tokens,
            evicted_tokens: plan.evicted,
            rebuilt_tokens: plan.restored,
        }
    }

    /// A raw-text turn's embedding (the prototype's `embed`).
    ///
    /// # Errors
    /// As [`Conversation::turn`].
    pub fn embed(&mut self, text: &str) -> Result<Vec<f32>, TurnError> {
        self.turn(text, "").map(|o| o.embedding)
    }

    /// Drops the context and its cache; returns how many tokens were released.
    /// The next turn's embedding equals a fresh conversation's.
    pub fn reset(&mut self) -> usize {
        let released = self.tokens.len();
        self.tokens.clear();
        self.cache = self.model.empty_cache();
        released
    }

    /// Drops the cache to free its memory and keeps the token ids: the
    /// next turn rebuilds the cache (by prefilling the tokens) before it
    /// runs, and its embedding is what it would have been. Returns the bytes
    /// freed (0 when nothing was cached).
    pub fn evict_cache(&mut self) -> u64 {
        if self.cache.is_empty() {
            return 0;
        }
        let freed = self.cache.bytes();
        self.cache = self.model.empty_cache();
        freed
    }

    /// Whether the cache covers the context (false after
    /// [`Conversation::evict_cache`], until the next turn rebuilds it).
    pub fn is_resident(&self) -> bool {
        self.cache.len() == self.tokens.len()
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

    /// Bytes of KV cache this conversation holds.
    pub fn kv_bytes(&self) -> u64 {
        self.cache.bytes()
    }

    /// The most KV bytes this conversation has held at once after a turn.
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
}
