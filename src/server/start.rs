//! Start-up: loading the model and warming it up, the KV budget, the
//! engine, TLS and the token file; and the background work a running
//! server does (idle eviction, token reloads).

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use super::config::Config;
use crate::{
    conversation::Conversation,
    engine::{self, Engine, KvBudget},
    model::{Model, ModelOptions},
    platform::cpu::{self, CpuFeatures},
    service::Tokens,
};

/// The TLS configuration the flags ask for, if any.
pub(super) fn tls_config(config: &Config) -> anyhow::Result<Option<ServerTlsConfig>> {
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
pub(super) async fn reload_on_sighup(tokens: Arc<Tokens>) {
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
pub(super) fn load(config: &Config) -> anyhow::Result<Arc<Engine>> {
    let started = std::time::Instant::now();
    let options = ModelOptions {
        threads: config.threads,
        onnxruntime: config.onnxruntime.clone(),
    };
    let model = Model::open(&config.model, &options)
        .with_context(|| format!("loading the model {}", config.model.display()))?;
    log_variant_advice(&model);
    let mut warm = Conversation::new(&model, config.limits().default_options(&model))
        .context("the server's --max-context-tokens / --prefill-chunk-tokens do not suit the model")?;
    warm.turn("Warm-up: def add(a, b):\n    return a + b", "user")
        .context("the warm-up turn failed")?;
    drop(warm);
    model.set_shared_prefix_tokens(config.shared_prefix_tokens);
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "model loaded and warm"
    );
    let limit = match config.max_kv_bytes {
        Some(limit) => limit,
        // Measured now: the model's weights and the warm-up's arena are in.
        None => {
            engine::default_budget(0).context("cannot read the memory available (/proc/meminfo): set --max-kv-bytes")?
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

/// Starts what a serving server does in the background, until the root
/// token is cancelled: metrics publishing (with `--metrics-addr`) and idle
/// eviction (with `--idle-evict-seconds`).
pub(super) fn background(config: &Config, shared: &Arc<crate::service::Shared>, engine: &Arc<Engine>) {
    if config.metrics_addr.is_some() {
        super::metrics::publish_once(shared, engine);
        let (shared, engine, stop) = (shared.clone(), engine.clone(), shared.root.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = super::metrics::publish(shared, engine) => {}
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
}
