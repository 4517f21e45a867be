//! The server's lifecycle: bind, load, warm up, serve, drain, stop.
//!
//! `run` serves grpc.health.v1 and reflection at once (health NOT_SERVING),
//! loads the model on a blocking thread, runs one warm-up turn, then flips
//! health to SERVING. On the `shutdown` future: health NOT_SERVING, new
//! streams are refused with UNAVAILABLE, open streams may go on until they end
//! or the drain deadline passes, then every stream still open ends with
//! UNAVAILABLE "server shutting down" and the server stops. If the engine
//! thread dies, health goes NOT_SERVING, every stream ends with UNAVAILABLE
//! "the inference engine has stopped…", and `run` returns that error (the
//! binary exits non-zero, for a supervisor to restart it).

use std::{future::Future, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Certificate, Identity, Server, ServerTlsConfig},
};
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::util::MapResponseLayer;

use crate::{
    auth::{self, Tokens},
    config::Config,
    conversation::Conversation,
    cpu::{self, CpuFeatures},
    engine::Engine,
    memory::{self, KvBudget},
    metrics,
    model::{Model, ModelOptions},
    pb::{self, embedder_server::EmbedderServer},
    service::{EmbedderService, Limits, Shared, rewrite_decode_statuses, saturating_u32},
};

/// Time the server gives connections to close after every stream has ended.
const CLOSE_GRACE: Duration = Duration::from_secs(3);

/// Serves until `shutdown` resolves (then drains) or the model fails to load.
///
/// # Errors
/// When the model cannot be loaded or warmed up, or the transport fails.
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
    let shared = Shared::new(Limits::from_config(&config));

    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("building the v1alpha reflection service")?;
    let tokens = match &config.auth_token_file {
        Some(path) => {
            let tokens = Tokens::load(path)?;
            tokio::spawn(reload_on_sighup(tokens.clone()));
            Some(tokens)
        }
        None => None,
    };
    let embedder = InterceptedService::new(
        EmbedderServer::new(EmbedderService::new(shared.clone()))
            .max_decoding_message_size(config.max_message_bytes)
            .max_encoding_message_size(config.max_message_bytes),
        auth::interceptor(tokens),
    );

    // Load and warm up off the runtime.
    let loader_config = config.clone();
    let mut loader = tokio::task::spawn_blocking(move || load(&loader_config));

    let drained = tokio_util::sync::CancellationToken::new();
    // Cancelled when the engine thread dies: the drain below then ends every
    // stream at once, with the engine's UNAVAILABLE.
    let engine_dead = tokio_util::sync::CancellationToken::new();
    let drain = {
        let (shared, health, drained, engine_dead) =
            (shared.clone(), health.clone(), drained.clone(), engine_dead.clone());
        let deadline = config.drain_timeout();
        async move {
            let died = tokio::select! {
                () = shutdown => false,
                () = engine_dead.cancelled() => true,
            };
            if !died {
                tracing::info!(open_streams = shared.active_sessions(), "shutting down: draining");
            }
            // Refuse new work first, then say so: a client that sees
            // NOT_SERVING must never get a new stream accepted after it.
            shared.draining.cancel();
            set_health(&health, ServingStatus::NotServing).await;
            if died {
                // Nothing can be embedded any more: every stream ends now.
                shared.root.cancel();
            }
            let all = saturating_u32(shared.limits.max_sessions);
            let every_stream_ended = shared.sessions.acquire_many(all);
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
                    open_streams = shared.active_sessions(),
                    "drain deadline passed; ending open streams"
                );
            }
            shared.root.cancel();
            drained.cancel();
        }
    };

    let mut builder = Server::builder();
    if let Some(tls) = tls_config(&config)? {
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
                if config.metrics_addr.is_some() {
                    let (shared, engine, stop) = (shared.clone(), engine.clone(), shared.root.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            () = metrics::publish(shared, engine) => {}
                            () = stop.cancelled() => {}
                        }
                    });
                }
                if let Some(idle) = config.idle_evict() {
                    let (budget, stop) = (engine.budget().clone(), shared.root.clone());
                    tokio::spawn(async move {
                        tokio::select! {
                            () = evict_idle_caches(budget, idle) => {}
                            () = stop.cancelled() => {}
                        }
                    });
                }
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

/// The TLS configuration the flags ask for, if any.
fn tls_config(config: &Config) -> anyhow::Result<Option<ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) else {
        return Ok(None);
    };
    let read = |p: &std::path::PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
    if let Some(ca) = &config.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?));
    }
    tracing::info!(mutual = config.tls_client_ca.is_some(), "serving TLS");
    Ok(Some(tls))
}

/// Reloads the token file on every SIGHUP (a bad file keeps the tokens in force).
async fn reload_on_sighup(tokens: Arc<Tokens>) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP: the token file will not be reloaded");
        return;
    };
    while hup.recv().await.is_some() {
        match tokens.reload() {
            Ok(n) => tracing::info!(tokens = n, "token file reloaded"),
            Err(e) => tracing::error!(error = %format!("{e:#}"), "token file not reloaded; the tokens in force stay"),
        }
    }
}

/// Loads the model, starts the engine, and runs one warm-up turn.
fn load(config: &Config) -> anyhow::Result<Arc<Engine>> {
    let started = std::time::Instant::now();
    let options = ModelOptions {
        threads: config.threads,
        onnxruntime: config.onnxruntime.clone(),
    };
    let model = Model::open(&config.model, &options)
        .with_context(|| format!("loading the model {}", config.model.display()))?;
    log_variant_advice(&model);
    let mut warm = Conversation::new(&model, Limits::from_config(config).default_options())
        .context("the server's --max-context-tokens / --prefill-chunk-tokens do not suit the model")?;
    warm.turn("Warm-up: def add(a, b):\n    return a + b", "user")
        .context("the warm-up turn failed")?;
    drop(warm);
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded and warm"
    );
    let limit = match config.max_kv_bytes {
        Some(limit) => limit,
        // Measured now: the model's weights and the warm-up's arena are in.
        None => {
            memory::default_budget(0).context("cannot read the memory available (/proc/meminfo): set --max-kv-bytes")?
        }
    };
    let per_token = model.spec().kv_bytes_per_token();
    tracing::info!(
        kv_budget_bytes = limit,
        kv_budget_tokens = limit / per_token.max(1),
        source = if config.max_kv_bytes.is_some() {
            "--max-kv-bytes"
        } else {
            "half the memory available after loading the model"
        },
        "KV budget"
    );
    let window = config.max_context_tokens.min(model.spec().max_positions) as u64;
    if limit < 2 * window * per_token {
        tracing::warn!(
            kv_budget_bytes = limit,
            window_tokens = window,
            "the KV budget holds less than twice a full window's cache: turns of a conversation near its window will fail with RESOURCE_EXHAUSTED"
        );
    }
    let budget = KvBudget::new(model.clone(), limit);
    Ok(Arc::new(Engine::start(
        model,
        config.queue_depth,
        config.batch_limits(),
        budget,
    )))
}

/// Evicts, every so often, the caches of conversations idle `idle` or longer.
async fn evict_idle_caches(budget: Arc<KvBudget>, idle: Duration) {
    let mut tick = tokio::time::interval((idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let n = budget.evict_idle(idle);
        if n > 0 {
            tracing::debug!(evicted = n, "evicted idle conversations' caches");
        }
    }
}

/// Says which CPU features ONNX Runtime will pick kernels by, and which
/// variant is the fastest faithful one here (advice only: the served file is
/// the one asked for).
fn log_variant_advice(model: &Model) {
    let features = CpuFeatures::detect();
    let advice = features.advice();
    let served = model
        .spec()
        .path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    tracing::info!(
        cpu = cpu::model_name().unwrap_or_else(|| "unknown".to_string()),
        features = %features,
        "CPU features (ONNX Runtime picks its kernels, and so each variant's speed, by these)"
    );
    if served != advice.file() {
        tracing::info!(
            served = %served,
            fastest_faithful = advice.variant,
            "on this CPU {} is the fastest variant within cosine 0.999 of f32 ({}); \
             `make serve SERVE_VARIANT={}` serves it",
            advice.file(),
            advice.reason,
            advice.variant
        );
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    health.set_service_status("", status).await;
    health
        .set_service_status(
            <EmbedderServer<EmbedderService> as tonic::server::NamedService>::NAME,
            status,
        )
        .await;
}
