//! What the service and the server's lifecycle share: the limits the
//! service applies, the engine once it is loaded, the stream permits, the
//! resumable sessions, and the tokens that end the streams.

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{sessions::Sessions, store::RedisStore};
use crate::{conversation::ConversationOptions, engine::Engine, model::Model};

/// Server-wide limits the service applies.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Default window (already capped at the model's maximum).
    pub max_context_tokens: usize,
    /// Longest turn.
    pub max_turn_tokens: usize,
    /// Tokens per prefill call.
    pub prefill_chunk_tokens: usize,
    /// Converse streams open at once.
    pub max_streams: usize,
    /// Resumable sessions kept detached at once.
    pub max_detached_sessions: usize,
    /// How long a lost resumable session is kept; `None`: sessions off.
    pub detached_ttl: Option<Duration>,
}

impl Limits {
    /// The options a stream (and an Embed, and the warm-up turn) starts with
    /// on `model` (its card's pooling and normalisation): the one place the
    /// server's session defaults are built.
    pub fn default_options(&self, model: &Model) -> ConversationOptions {
        ConversationOptions {
            max_context_tokens: self.max_context_tokens,
            max_turn_tokens: self.max_turn_tokens,
            prefill_chunk_tokens: self.prefill_chunk_tokens,
            ..ConversationOptions::for_model(model)
        }
    }
}

/// State shared by the service and the server's lifecycle code.
#[derive(Debug)]
pub struct Shared {
    /// Set once the model is loaded and warm; until then RPCs are UNAVAILABLE.
    pub engine: OnceLock<Arc<Engine>>,
    /// One permit per open Converse stream.
    pub streams: Arc<Semaphore>,
    /// Limits.
    pub limits: Limits,
    /// Cancelled after the drain deadline: every stream ends with UNAVAILABLE.
    pub root: CancellationToken,
    /// Cancelled on SIGINT/SIGTERM: new streams are refused.
    pub draining: CancellationToken,
    /// Resumable sessions.
    pub sessions: Arc<Sessions>,
}

impl Shared {
    /// Fresh state for a server with these limits, its resumable sessions
    /// in `store` when one is given.
    pub fn new(limits: Limits, store: Option<Arc<RedisStore>>) -> Arc<Shared> {
        Arc::new(Shared {
            engine: OnceLock::new(),
            streams: Arc::new(Semaphore::new(limits.max_streams)),
            root: CancellationToken::new(),
            draining: CancellationToken::new(),
            sessions: Sessions::new(limits.detached_ttl, limits.max_detached_sessions, store),
            limits,
        })
    }

    /// Converse streams open now.
    pub fn open_streams(&self) -> usize {
        self.limits.max_streams - self.streams.available_permits()
    }
}
