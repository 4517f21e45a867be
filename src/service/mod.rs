//! The `embedder.v1.Embedder` gRPC service: the edge where proto types stop
//! (nothing below this module sees a `pb` type).
//!
//! # Threading
//! Each `Converse` stream is one lightweight Tokio task (`stream`) that
//! reads requests in order, hands turns to the [`Engine`] thread with the
//! slot the stream's conversation rests in, and writes one response per
//! request into a bounded channel (a slow reader pushes back). The task
//! holds the slot; when the stream ends, is cancelled, or its client
//! vanishes, the task returns and the conversation's KV cache is dropped
//! with the slot, unless a resumable session ([`Sessions`]) keeps it.
//!
//! # Layout
//! * this module: [`EmbedderService`], the RPC handlers;
//! * `shared`: its [`Limits`] and the state it shares with the server's
//!   lifecycle ([`Shared`]);
//! * `stream`: one `Converse` stream's task;
//! * `convert`: proto messages to the domain's options and back;
//! * `auth`: bearer tokens ([`Tokens`], [`Principal`]);
//! * `sessions`: resumable sessions ([`Sessions`]);
//! * `error`: every failure ([`ServiceError`]) with its gRPC code, in one table.

mod auth;
mod convert;
mod error;
mod sessions;
mod shared;
mod store;
mod stream;

pub use auth::{Principal, Tokens, interceptor};
pub use convert::{embed_options, saturating_u32};
pub use error::{ErrorChain, ServiceError, rewrite_decode_statuses};
pub use sessions::{MAX_SESSION_ID_LEN, Sessions};
pub use shared::{Limits, Shared};
pub use store::{RedisStore, StoreConfig, StoreError};
pub use stream::{RESUME_TRAILER, Responses};

use std::{sync::Arc, time::Duration};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use crate::{
    conversation::{Conversation, Pooling},
    engine::Engine,
    pb,
};
use convert::{embedding, pooling_on_wire};
use sessions::OnHalfClose;
use stream::ConverseTask;

/// The request metadata key that asks `GetStats` for the census (test builds).
pub const CENSUS_METADATA: &str = "se-census";

/// The gRPC service.
#[derive(Debug, Clone)]
pub struct EmbedderService {
    shared: Arc<Shared>,
}

impl EmbedderService {
    /// A service over shared state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn engine(&self) -> Result<Arc<Engine>, ServiceError> {
        self.shared.engine.get().cloned().ok_or(ServiceError::Loading)
    }

    fn refuse_if_draining(&self) -> Result<(), ServiceError> {
        if self.shared.draining.is_cancelled() {
            return Err(ServiceError::Draining);
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::embedder_server::Embedder for EmbedderService {
    type ConverseStream = Responses;

    async fn converse(
        &self,
        request: Request<Streaming<pb::ConverseRequest>>,
    ) -> Result<Response<Self::ConverseStream>, Status> {
        self.refuse_if_draining()?;
        let engine = self.engine()?;
        let permit = self
            .shared
            .streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| ServiceError::TooManyStreams {
                limit: self.shared.limits.max_streams,
            })?;
        let stream_id = stream::next_id();
        let peer = request.remote_addr();
        let principal = request.extensions().get::<Principal>().cloned();
        let conversation = Conversation::new(engine.model(), self.shared.limits.default_options(engine.model()))
            .map_err(ServiceError::Defaults)?;
        let slot = engine.budget().slot(conversation);
        let (responses_tx, responses_rx) = mpsc::channel(16);
        let (on_half_close, half_close) = OnHalfClose::new(self.shared.sessions.clone(), stream_id);
        let task = ConverseTask {
            engine,
            limits: self.shared.limits.clone(),
            sessions: self.shared.sessions.clone(),
            stream_id,
            inbound: request.into_inner(),
            responses_tx,
            cancel: self.shared.root.child_token(),
            draining: self.shared.draining.clone(),
            slot,
            session_id: None,
            principal,
            half_close,
            _permit: permit,
        };
        let span = tracing::info_span!("converse", stream_id, peer = ?peer);
        tokio::spawn(task.run().instrument(span));
        Ok(Response::new(Responses::new(
            ReceiverStream::new(responses_rx),
            on_half_close,
        )))
    }

    async fn embed(&self, request: Request<pb::EmbedRequest>) -> Result<Response<pb::EmbedResponse>, Status> {
        self.refuse_if_draining()?;
        let engine = self.engine()?;
        let req = request.into_inner();
        let options = embed_options(&req, &self.shared.limits, engine.model())?;
        if req.texts.is_empty() {
            return Err(ServiceError::NoTexts.into());
        }
        options.validate(engine.model()).map_err(ServiceError::from)?;
        let results = engine.embed(req.texts, options).await.map_err(ServiceError::from)?;
        let mut embeddings = Vec::with_capacity(results.len());
        for (index, result) in results.into_iter().enumerate() {
            let out = result.map_err(|source| ServiceError::EmbedText { index, source })?;
            embeddings.push(embedding(out));
        }
        Ok(Response::new(pb::EmbedResponse { embeddings }))
    }

    async fn get_model_info(&self, _: Request<pb::GetModelInfoRequest>) -> Result<Response<pb::ModelInfo>, Status> {
        let engine = self.engine()?;
        let model = engine.model();
        let spec = model.spec();
        let n = saturating_u32;
        Ok(Response::new(pb::ModelInfo {
            name: spec.name.clone(),
            layers: n(spec.layers),
            hidden_size: n(spec.hidden_size),
            kv_heads: n(spec.kv_heads),
            head_dim: n(spec.head_dim),
            kv_dtype: spec.kv_dtype.name().to_string(),
            vocab_size: n(spec.vocab_size),
            max_context_tokens: n(self.shared.limits.max_context_tokens),
            kv_bytes_per_token: spec.kv_bytes_per_token(),
            input_types: model
                .templates()
                .input_types
                .iter()
                .map(|(name, t)| (name.clone(), t.text()))
                .collect(),
            probe: model.templates().probe.clone(),
            stats_corpus_sha256: model.embedding_stats().corpus_sha256.clone(),
            head_dimensions: model.embedding_head().map_or(0, |h| saturating_u32(h.dimensions)),
            head_pairs_sha256: model
                .embedding_head()
                .map_or_else(String::new, |h| h.pairs_sha256.clone()),
            pooling: pooling_on_wire(Pooling::native(model.card().pooling)) as i32,
            end_token: model.card().end_token.clone().unwrap_or_default(),
            matryoshka_dimensions: model.card().dimensions.iter().map(|&d| n(d)).collect(),
            normalize: model.card().normalize,
            card_source: model.card().source.clone(),
            kv_budget_bytes: engine.budget().limit(),
            max_streams: n(self.shared.limits.max_streams),
            max_detached_sessions: n(self.shared.limits.max_detached_sessions),
            detached_ttl_seconds: self.shared.limits.detached_ttl.map_or(0.0, |d| d.as_secs_f64()),
        }))
    }

    async fn get_stats(&self, request: Request<pb::GetStatsRequest>) -> Result<Response<pb::Stats>, Status> {
        let engine = self.engine()?;
        // Test builds answer `se-census` metadata with the ledger and an
        // independent census of the KV tensors, read together between model
        // calls (see `model::Model::ledger_snapshot`).
        let snapshot = if request.metadata().contains_key(CENSUS_METADATA) {
            let model = engine.model().clone();
            tokio::task::spawn_blocking(move || model.ledger_snapshot())
                .await
                .ok()
                .flatten()
        } else {
            None
        };
        let stats = engine.stats();
        let budget = engine.budget();
        let resting = budget.resting();
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let shared = engine.model().prefix_stats();
        let mut response = Response::new(pb::Stats {
            open_streams: saturating_u32(self.shared.open_streams()),
            kv_cache_bytes: snapshot.map_or_else(|| engine.model().kv_cache_bytes(), |s| s.ledger),
            turns_total: stats.turns(),
            tokens_total: stats.tokens(),
            queued_turns: saturating_u32(stats.queued()),
            model_calls_total: engine.model().calls(),
            kv_budget_bytes: budget.limit(),
            resident_conversations: saturating_u32(resting.resident),
            evicted_conversations: saturating_u32(resting.evicted),
            detached_sessions: saturating_u32(self.shared.sessions.detached()),
            evictions_total: budget.evictions(),
            evicted_tokens_total: budget.evicted_tokens(),
            rebuilds_total: stats.rebuilds(),
            rebuilt_tokens_total: stats.rebuilt_tokens(),
            queue_wait_us_total: micros(stats.queue_wait_total()),
            queue_wait_us_max: micros(stats.queue_wait_max()),
            session_store_up: self.shared.sessions.store().is_none_or(|s| s.is_up()),
            session_store_errors_total: self.shared.sessions.store().map_or(0, |s| s.errors()),
            shared_prefixes: u32::try_from(shared.segments).unwrap_or(u32::MAX),
            shared_prefix_tokens: shared.tokens,
            shared_prefix_bytes: shared.bytes,
            shared_prefix_references: shared.shared_references,
            shared_turns_total: shared.hits,
            shared_tokens_saved_total: shared.tokens_saved,
        });
        if let Some(s) = snapshot {
            let metadata = response.metadata_mut();
            metadata.insert("se-census-bytes", s.census.into());
            metadata.insert("se-census-peak-bytes", s.peak.into());
        }
        Ok(response)
    }
}
