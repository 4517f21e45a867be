//! Prometheus metrics on `--metrics-addr` (off by default), through the
//! `metrics` facade and `metrics-exporter-prometheus`'s own HTTP listener
//! (`GET /metrics`, the text exposition format).
//!
//! Three kinds of figure, all named `se_*`:
//! * gauges and counters the engine and the budget already keep (streams,
//!   KV bytes and the budget, conversations by state, turns, tokens, model
//!   calls, evictions, rebuilds), copied into the registry every
//!   [`REFRESH`] by [`publish`] (and once before health says SERVING, by
//!   [`publish_once`]), so they cost nothing on the hot path;
//! * histograms recorded where things happen: `se_turn_seconds` (a turn's
//!   time as its stream sees it), `se_queue_wait_seconds` (from submission to
//!   the engine's round), `se_batch_rows` (rows per model call);
//! * `se_rejected_total{reason, code}`: every request or stream refused, by
//!   the [`crate::service::ServiceError`] variant and its gRPC code.
//!
//! The recorder is process-global: one server per process exports metrics.
//! Without `--metrics-addr` no recorder is installed and every call site is
//! a no-op.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};

use crate::{engine::Engine, service::Shared};

/// How often the kept counters are copied into the registry.
pub const REFRESH: Duration = Duration::from_millis(500);

/// Latency buckets, in seconds: 1 ms to 2 minutes.
const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
];
/// Rows-per-call buckets (the default `--max-batch-turns` is 16).
const ROWS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0];

/// Installs the recorder and serves `/metrics` on `addr`.
///
/// # Errors
/// When the address cannot be bound or a recorder is already installed.
pub fn install(addr: SocketAddr) -> anyhow::Result<()> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
        .context("setting the latency buckets")?
        .set_buckets_for_metric(Matcher::Full("se_batch_rows".into()), ROWS)
        .context("setting the batch buckets")?
        .install()
        .with_context(|| format!("serving metrics on {addr}"))?;
    describe();
    tracing::info!(%addr, "metrics on http://{addr}/metrics");
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!("se_open_streams", "Converse streams open now");
    describe_gauge!(
        "se_kv_cache_bytes",
        Unit::Bytes,
        "bytes of every live KV cache and a running call's"
    );
    describe_gauge!("se_kv_budget_bytes", Unit::Bytes, "the KV budget (--max-kv-bytes)");
    describe_gauge!(
        "se_resident_conversations",
        "conversations whose cache covers their context"
    );
    describe_gauge!(
        "se_evicted_conversations",
        "conversations whose cache was evicted (token ids only)"
    );
    describe_gauge!("se_detached_sessions", "resumable sessions waiting for a new stream");
    describe_gauge!("se_queued_texts", "turns and Embed texts queued or running");
    describe_gauge!(
        "se_session_store_up",
        "1 if the shared session store's last call succeeded (1 without one)"
    );
    describe_counter!(
        "se_session_store_errors_total",
        "calls to the shared session store that failed"
    );
    describe_gauge!(
        "se_shared_prefixes",
        "live shared prefix segments (one per shared turn)"
    );
    describe_gauge!("se_shared_prefix_tokens", "tokens of the live shared prefix segments");
    describe_gauge!(
        "se_shared_prefix_bytes",
        Unit::Bytes,
        "bytes of the live shared prefix segments (each once)"
    );
    describe_gauge!(
        "se_shared_prefix_references",
        "references to shared prefix segments beyond one each"
    );
    describe_counter!(
        "se_shared_turns_total",
        "turns answered from a shared prefix without a model call"
    );
    describe_counter!(
        "se_shared_tokens_saved_total",
        "tokens shared prefixes kept from being prefilled"
    );
    describe_counter!("se_turns_total", "turns and Embed texts embedded");
    describe_counter!("se_tokens_total", "tokens of those turns");
    describe_counter!("se_model_calls_total", "model calls run");
    describe_counter!("se_evictions_total", "KV caches evicted");
    describe_counter!("se_rebuilds_total", "turns that first rebuilt an evicted cache");
    describe_counter!("se_rebuilt_tokens_total", "tokens those rebuilds recomputed");
    describe_counter!(
        "se_rejected_total",
        "requests and streams refused, by reason and gRPC code"
    );
    describe_histogram!(
        "se_turn_seconds",
        Unit::Seconds,
        "a Converse turn's time, request to answer"
    );
    describe_histogram!(
        "se_queue_wait_seconds",
        Unit::Seconds,
        "a text's wait for the engine's round"
    );
    describe_histogram!("se_batch_rows", "rows (turns) per model call");
}

/// Copies the engine's and the budget's figures into the registry every
/// [`REFRESH`], until the future is dropped (the first copy at once).
pub async fn publish(shared: Arc<Shared>, engine: Arc<Engine>) {
    let mut tick = tokio::time::interval(REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        publish_once(&shared, &engine);
    }
}

/// Copies the engine's and the budget's figures into the registry once:
/// called before health says SERVING too, so a scrape right after it sees
/// them (the spawned [`publish`] loop may not have run yet).
pub fn publish_once(shared: &Shared, engine: &Engine) {
    let (stats, budget, model) = (engine.stats(), engine.budget(), engine.model());
    let resting = budget.resting();
    metrics::gauge!("se_open_streams").set(shared.open_streams() as f64);
    metrics::gauge!("se_kv_cache_bytes").set(model.kv_cache_bytes() as f64);
    metrics::gauge!("se_kv_budget_bytes").set(budget.limit() as f64);
    metrics::gauge!("se_resident_conversations").set(resting.resident as f64);
    metrics::gauge!("se_evicted_conversations").set(resting.evicted as f64);
    metrics::gauge!("se_detached_sessions").set(shared.sessions.detached() as f64);
    metrics::gauge!("se_queued_texts").set(stats.queued() as f64);
    let store_up = shared.sessions.store().is_none_or(|s| s.is_up());
    metrics::gauge!("se_session_store_up").set(if store_up { 1.0 } else { 0.0 });
    metrics::counter!("se_turns_total").absolute(stats.turns());
    metrics::counter!("se_tokens_total").absolute(stats.tokens());
    metrics::counter!("se_model_calls_total").absolute(model.calls());
    metrics::counter!("se_evictions_total").absolute(budget.evictions());
    metrics::counter!("se_rebuilds_total").absolute(stats.rebuilds());
    metrics::counter!("se_rebuilt_tokens_total").absolute(stats.rebuilt_tokens());
    let shared = model.prefix_stats();
    metrics::gauge!("se_shared_prefixes").set(shared.segments as f64);
    metrics::gauge!("se_shared_prefix_tokens").set(shared.tokens as f64);
    metrics::gauge!("se_shared_prefix_bytes").set(shared.bytes as f64);
    metrics::gauge!("se_shared_prefix_references").set(shared.shared_references as f64);
    metrics::counter!("se_shared_turns_total").absolute(shared.hits);
    metrics::counter!("se_shared_tokens_saved_total").absolute(shared.tokens_saved);
}
