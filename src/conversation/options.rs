//! A conversation's options: how its turns become vectors (pooling,
//! standardisation, input type, truncation) and how its context is kept
//! (the window and what happens when a turn does not fit), checked against
//! a model once, when the conversation is made.

use crate::model::{Model, NativePooling};

/// The default context window, when neither client nor server sets one.
pub const DEFAULT_MAX_CONTEXT_TOKENS: usize = 8192;
/// Components [`Standardize::Whiten`] keeps when `dimensions` is not set
/// (the best of 128–700 in QUALITY.md's measurements).
pub const DEFAULT_WHITEN_COMPONENTS: usize = 384;
/// The default size of one prefill call for long turns.
pub const DEFAULT_PREFILL_CHUNK_TOKENS: usize = 512;

/// How a turn's hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Mean over the turn's text tokens (each has attended to the whole context).
    Mean,
    /// The hidden state of the turn's last text token.
    LastToken,
    /// The model's probe (a fixed suffix from the model card `embedding.json`, e.g.
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
    /// The hidden state of the model's end token (its card's `end_token`,
    /// e.g. `<|endoftext|>`) appended after the turn: the native vector of
    /// last-token embedding models such as Qwen3-Embedding. Like the probe,
    /// the end token rides at the end of the turn's own call and its row is
    /// cut from the new cache, so after turn k the vector is the model's own
    /// embedding of the whole conversation so far. The raw state
    /// ([`Standardize::None`]) only.
    EndToken,
}

impl Pooling {
    /// Whether tokens ride after the turn's for this pooling (the probe or
    /// the end token), their last row pooled and their rows cut from the
    /// new cache.
    pub fn appends(self) -> bool {
        match self {
            Pooling::Probe | Pooling::ProbeMean | Pooling::EndToken => true,
            Pooling::Mean | Pooling::LastToken => false,
        }
    }

    /// Whether the pooling takes a mean (and so reads [`MeanOver`]).
    pub fn takes_mean(self) -> bool {
        matches!(self, Pooling::Mean | Pooling::ProbeMean)
    }

    /// The tokens that ride after the turn on `model`: the probe's, the end
    /// token, or none.
    pub fn appended(self, model: &Model) -> &[u32] {
        match self {
            Pooling::Probe | Pooling::ProbeMean => model.probe_ids(),
            Pooling::EndToken => model.end_ids(),
            Pooling::Mean | Pooling::LastToken => &[],
        }
    }

    /// A model card's pooling.
    pub fn native(pooling: NativePooling) -> Pooling {
        match pooling {
            NativePooling::ProbeMean => Pooling::ProbeMean,
            NativePooling::EndToken => Pooling::EndToken,
            NativePooling::LastToken => Pooling::LastToken,
            NativePooling::Mean => Pooling::Mean,
        }
    }
}

/// What is done to a pooled vector before truncation and normalisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// The standardisation a pooling gets on `model` when none is asked
    /// for: the model's own vector ([`Standardize::None`]) for the pooling
    /// its card names, unless that is [`Pooling::ProbeMean`] (a base model);
    /// otherwise the best measured for it (QUALITY.md), and whitening for
    /// [`Pooling::ProbeMean`] on a model without a learned head.
    pub fn default_for(pooling: Pooling, model: &Model) -> Standardize {
        let native = Pooling::native(model.card().pooling);
        match pooling {
            Pooling::EndToken => Standardize::None,
            p if p == native && p != Pooling::ProbeMean => Standardize::None,
            Pooling::ProbeMean if model.embedding_head().is_some() => Standardize::Head,
            Pooling::ProbeMean | Pooling::Probe => Standardize::Whiten,
            Pooling::Mean | Pooling::LastToken => Standardize::Zscore,
        }
    }
}

/// Which tokens [`Pooling::Mean`] (and [`Pooling::ProbeMean`]'s mean) averages.
///
/// A Converse stream's default is [`MeanOver::default_for`] its pooling (the
/// conversation); `Default` is the turn, what options stored before the
/// field existed were.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeanOver {
    /// The turn's text tokens (each of which attended to the whole context).
    /// What `Embed` pools for its one text (its template's tokens left out).
    #[default]
    Turn,
    /// Every token of the context after the turn that is not one of the
    /// tokenizer's special tokens (ChatML's markers): the conversation read
    /// as a whole, so a generic later turn ("can you make it easier to
    /// test?") keeps what the earlier ones were about. Exact and cheap for a
    /// causal model: an earlier token's final state never changes, so the
    /// conversation keeps a running sum (f64, rows added in order) and a
    /// rebuild (after a slide, a reset, an eviction or a resume) sums its
    /// rows again from the first.
    Conversation,
}

impl MeanOver {
    /// A conversation's default for `pooling`: the conversation for the
    /// poolings that take a mean (measured in QUALITY.md: it wins every
    /// conversation set, and the shipped head is fitted for it), the turn
    /// (which nothing reads) for the others.
    pub fn default_for(pooling: Pooling) -> MeanOver {
        if pooling.takes_mean() {
            MeanOver::Conversation
        } else {
            MeanOver::Turn
        }
    }
}

/// What kind of text a turn is, for the model's input-type templates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// The template's name in the model card (`embedding.json`), if any.
    pub fn template_name(self) -> Option<&'static str> {
        match self {
            InputType::Raw => None,
            InputType::Query => Some("query"),
            InputType::Document => Some("document"),
        }
    }
}

/// What happens when a turn does not fit in the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// Which tokens the mean averages ([`Pooling::Mean`], [`Pooling::ProbeMean`]).
    #[serde(default)]
    pub mean_over: MeanOver,
}

/// PROBE_MEAN through the head, its mean the turn's ([`MeanOver`]'s
/// `Default`, so that a stored session without the field reads as it was
/// made). [`ConversationOptions::for_model`] is a server stream's defaults
/// on a model: its card's pooling, the conversation's mean.
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
            mean_over: MeanOver::Turn,
        }
    }
}

impl ConversationOptions {
    /// The defaults on `model`: its card's pooling, standardised as
    /// [`Standardize::default_for`] says, normalised as the card says, its
    /// mean (if it takes one) over [`MeanOver::default_for`] it.
    pub fn for_model(model: &Model) -> Self {
        let pooling = Pooling::native(model.card().pooling);
        Self {
            pooling,
            standardize: Standardize::default_for(pooling, model),
            normalize: model.card().normalize,
            mean_over: MeanOver::default_for(pooling),
            ..Self::default()
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
    /// The learned head was asked for on a model that has none.
    #[error("standardize HEAD: this model has no learned head (its card's pooling is {0}; see GetModelInfo)")]
    NoHead(&'static str),
    /// END_TOKEN on a model whose card names no end token.
    #[error("pooling END_TOKEN: this model's card names no end token")]
    NoEndToken,
    /// END_TOKEN with a standardisation: it is the model's own vector.
    #[error("pooling END_TOKEN is the model's own vector: standardize must be NONE (or unset)")]
    EndTokenIsRaw,
    /// MEAN_OVER_CONVERSATION with a pooling that takes no mean.
    #[error("mean_over CONVERSATION needs pooling MEAN or PROBE_MEAN (the poolings that take a mean)")]
    MeanOverNeedsMean,
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
        if self.standardize == Standardize::Head && model.embedding_head().is_none() {
            return Err(OptionsError::NoHead(model.card().pooling.name()));
        }
        if self.mean_over == MeanOver::Conversation && !self.pooling.takes_mean() {
            return Err(OptionsError::MeanOverNeedsMean);
        }
        if self.pooling == Pooling::EndToken {
            if model.end_ids().is_empty() {
                return Err(OptionsError::NoEndToken);
            }
            if self.standardize != Standardize::None {
                return Err(OptionsError::EndTokenIsRaw);
            }
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
            (_, Standardize::Head) => model.embedding_head().map_or(hidden, |h| h.dimensions),
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
