//! The shutdown sequence, one for a signal and for a dead engine: refuse
//! new work, then say so (health NOT_SERVING: a client that sees it never
//! gets a new stream accepted), let open streams end (until the drain
//! deadline; at once when the engine died), end the rest with UNAVAILABLE.

use std::{future::Future, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    pb::embedder_server::EmbedderServer,
    service::{EmbedderService, Shared, saturating_u32},
};

/// Time the server gives connections to close after every stream has ended.
pub(super) const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Resolves once the drain is over (for tonic's graceful shutdown): after
/// `shutdown` resolves or `engine_dead` is cancelled, and every stream has
/// ended or been ended. Cancels `drained` when done.
pub(super) async fn drain(
    shared: Arc<Shared>,
    health: HealthReporter,
    deadline: Option<Duration>,
    shutdown: impl Future<Output = ()>,
    engine_dead: CancellationToken,
    drained: CancellationToken,
) {
    let died = tokio::select! {
        () = shutdown => false,
        () = engine_dead.cancelled() => true,
    };
    if !died {
        tracing::info!(open_streams = shared.open_streams(), "shutting down: draining");
    }
    shared.draining.cancel();
    set_health(&health, ServingStatus::NotServing).await;
    if died {
        // Nothing can be embedded any more: every stream ends now.
        shared.root.cancel();
    }
    let all = saturating_u32(shared.limits.max_streams);
    let every_stream_ended = shared.streams.acquire_many(all);
    let limit = if died { Some(CLOSE_GRACE) } else { deadline };
    let ended = match limit {
        Some(limit) => tokio::time::timeout(limit, every_stream_ended).await.is_ok(),
        None => {
            let _ = every_stream_ended.await;
            true
        }
    };
    if !ended {
        tracing::warn!(
            open_streams = shared.open_streams(),
            "drain deadline passed; ending open streams"
        );
    }
    shared.root.cancel();
    drained.cancel();
}

/// Sets the overall status and the Embedder service's.
pub(super) async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <EmbedderServer<EmbedderService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}
