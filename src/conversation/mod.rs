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
//! probe's row and the mean are taken ([`Pooling::ProbeMean`]); the mean is
//! the turn's text's, or with [`MeanOver::Conversation`] (a server
//! stream's default, [`ConversationOptions::for_model`]) the whole
//! context's (its tokens but the special ones: a running sum the
//! conversation carries, which an eviction keeps and a slide, a reset or a
//! restore sums again, after a shared prefix that carries one). The vector
//! is then standardised with the model's background statistics of that
//! pooling (for [`Pooling::ProbeMean`]: each part on its own, each
//! L2-normalised, side by side; or through the learned head,
//! [`Standardize::Head`]), truncated and normalised.
//!
//! # The oracle
//! The embedding after turn k equals the embedding computed in one call with
//! an empty cache over `concat(tokens(t1)…tokens(tk))` (after a slide: over the
//! kept tokens followed by the turn; for the probe: followed by the probe's
//! tokens, its last row), pooled over the same span (or the whole context,
//! [`MeanOver::Conversation`]) and post-processed alike: exactly for a
//! turn run on its own ([`Conversation::turn`]), up to float rounding for one
//! that shared a padded call with other conversations' turns
//! ([`crate::engine::run_turns`]).
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
//! [`crate::engine`]; this module is one conversation's state machine.
//!
//! # Layout
//! * `state`: [`Conversation`], its state (token ids, cache, options);
//! * `options`: [`ConversationOptions`] and their vocabulary (pooling,
//!   standardisation, input type, overflow), checked against the model;
//! * `turn`: one turn from its text to its vector (planned once, run call by
//!   call, alone or in a batch, adopted), and what it returns
//!   ([`TurnOutput`]) or fails with ([`TurnError`]);
//! * `pooling`: the rows a turn's calls return, pooled, standardised,
//!   truncated and normalised.

mod options;
mod pooling;
mod turn;

mod state;

pub use options::{
    ConversationOptions, DEFAULT_MAX_CONTEXT_TOKENS, DEFAULT_PREFILL_CHUNK_TOKENS, DEFAULT_WHITEN_COMPONENTS,
    InputType, MeanOver, OptionsError, Overflow, Pooling, Standardize,
};
pub use pooling::truncate_and_normalize;
pub use state::Conversation;
pub(crate) use turn::Turn;
pub use turn::{TurnError, TurnOutput};
