//! The server's lifecycle: bind, load, warm up, serve, drain, stop.
//!
//! `run` serves grpc.health.v1 and reflection at once (health NOT_SERVING),
//! loads the model on a blocking thread, runs one warm-up turn, then flips
//! health to SERVING. On the `shutdown` future: new streams are refused with
//! UNAVAILABLE and health goes NOT_SERVING (in that order), open streams may
//! go on until they end or the drain deadline passes, then every stream
//! still open ends with UNAVAILABLE "server shutting down" and the server
//! stops. If the engine thread dies, the same drain runs at once: health
//! NOT_SERVING, every stream ended with UNAVAILABLE "the inference engine has
//! stopped…", and `run` returns that error (the binary exits non-zero, for a
//! supervisor to restart it).
//!
//! # Layout
//! * this module: [`run`] and the services it serves;
//! * `config`: the command line's settings ([`Config`]);
//! * `start`: loading and warming up the model, the budget and the engine,
//!   TLS, the token file, and the background work (idle eviction);
//! * `drain`: the shutdown sequence;
//! * `metrics`: Prometheus metrics.

pub mod config;
mod drain;
pub mod metrics;
mod start;

pub use config::{Config, DEFAULT_SHARED_PREFIX_TOKENS, LogFormat};

use drain::{CLOSE_GRACE, set_health};

use std::future::Future;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::{service::interceptor::InterceptedService, transport::Server};
use tonic_health::ServingStatus;
use tower::util::MapResponseLayer;

use crate::{
    pb::{self, embedder_server::EmbedderServer},
    service::{EmbedderService, Shared, Tokens, interceptor, rewrite_decode_statuses},
};

/// Serves until `shutdown` resolves (then drains) or the model fails to load.
///
/// # Errors
/// When the model cannot be loaded or warmed up, the transport fails, or
/// the inference engine stops.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics_addr {
        metrics::install(addr)?;
    }
    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;
    let store = config.session_store()?;
    if store.is_some() {
        tracing::info!("resumable sessions in the shared session store");
    }
    let shared = Shared::new(config.limits(), store);

    let tokens = match &config.auth_token_file {
        Some(path) => {
            let tokens = Tokens::load(path)?;
            tokio::spawn(start::reload_on_sighup(tokens.clone()));
            Some(tokens)
        }
        None => None,
    };
    let embedder = InterceptedService::new(
        EmbedderServer::new(EmbedderService::new(shared.clone()))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes),
        interceptor(tokens),
    );
    let (reflection_v1, reflection_v1alpha) = reflection()?;

    // Load and warm up off the runtime.
    let loader_config = config.clone();
    let mut loader = tokio::task::spawn_blocking(move || start::load(&loader_config));

    // Cancelled when the drain is over; cancelled when the engine dies.
    let (drained, engine_dead) = (CancellationToken::new(), CancellationToken::new());
    let drain = drain::drain(
        shared.clone(),
        health.clone(),
        config.drain_timeout(),
        shutdown,
        engine_dead.clone(),
        drained.clone(),
    );

    let mut builder = Server::builder();
    if let Some(tls) = start::tls_config(&config)? {
        builder = builder.tls_config(tls).context("configuring TLS")?;
    }
    let serve = builder
        .http2_keepalive_interval(config.keepalive())
        .http2_keepalive_timeout(Some(config.keepalive_timeout()))
        .max_concurrent_streams(Some(config.max_streams_per_connection))
        .http2_max_header_list_size(Some(config.max_header_list_bytes))
        .layer(MapResponseLayer::new(rewrite_decode_statuses))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(embedder)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), drain);
    tokio::pin!(serve);

    let (mut loaded, mut dead) = (false, false);
    let engine_died = async {
        match shared.engine.get() {
            Some(engine) => engine.stopped().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(engine_died);
    loop {
        tokio::select! {
            () = &mut engine_died, if loaded && !dead => {
                // Nothing can be embedded any more: the drain says so (health
                // NOT_SERVING, every stream ended with the engine's
                // UNAVAILABLE, the transport closed gracefully so that those
                // reach the clients), then `run` fails for a supervisor to
                // restart the process.
                dead = true;
                engine_dead.cancel();
            }
            result = &mut serve => {
                result.context("the gRPC transport failed")?;
                break;
            }
            joined = &mut loader, if !loaded => {
                loaded = true;
                let engine = joined.context("the model loader panicked")??;
                start::background(&config, &shared, &engine);
                let _ = shared.engine.set(engine);
                set_health(&health, ServingStatus::Serving).await;
                tracing::info!("serving");
            }
            () = async { drained.cancelled().await; tokio::time::sleep(CLOSE_GRACE).await } => {
                tracing::warn!("connections still open after the drain; stopping anyway");
                break;
            }
        }
    }
    if dead {
        anyhow::bail!(crate::engine::EngineStopped);
    }
    tracing::info!("stopped");
    Ok(())
}

/// The reflection services, v1 (newer clients) and v1alpha (grpcurl 1.8).
fn reflection() -> anyhow::Result<(
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<impl tonic_reflection::server::v1alpha::ServerReflection>,
)> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let v1 = builder().build_v1().context("building the reflection service")?;
    let v1alpha = builder()
        .build_v1alpha()
        .context("building the v1alpha reflection service")?;
    Ok((v1, v1alpha))
}
