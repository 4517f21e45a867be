//! `se-bench`: the Rust half of the benchmark harness. `make bench` builds it
//! (`cargo build --release --features bench`: it is not part of the product,
//! so neither `cargo install` nor `cargo test --all-targets` builds it) and
//! runs it through `bench/run.py`, which writes BENCHMARKS.md. It uses the
//! library's public API only.
//!
//! * `se-bench engine` — in-process figures on one model: one call vs token
//!   by token, stateful vs stateless turns 1…20, turn latency with an empty
//!   and a 500-token context and after 4,000 tokens, eight conversations'
//!   turns one by one vs batched, RSS per live conversation and after 1,000
//!   conversations, and (with `--reference`) each variant's fidelity to f32.
//! * `se-bench load` — a gRPC load generator: N concurrent streams × M turns,
//!   reporting tokens/s, p50/p90/p99 turn latency and (from our server's
//!   GetStats) how many model calls served the turns.
//! * `se-bench mixed` — a short turn's latency on a fresh stream, alone and
//!   sent while another stream's long turn (about 7,500 tokens) prefills.
//! * `se-bench sessions` — many open streams (each with one short turn
//!   behind it, then idle) and a few active ones taking turns: the active
//!   turns' latency, health checked throughout, the KV bytes sampled.
//! * `se-bench rebuild` — a short turn on a ~1,000-token context with its
//!   cache kept, and again after the server evicted it (`--idle-evict-seconds`).
//! * `se-bench profile` — where a short and a 45-token turn's time goes at
//!   a few context lengths: the model call alone, the same tokens without
//!   context, the probe's cut, a full copy of the cache, the whole turn
//!   (MEAN raw and the default vector), and one call batched with up to 7
//!   others (as the server's default group would).
//! * `se-bench soak` — N streams × M short turns, a share of them cancelled
//!   mid-turn (the stream dropped with the turn in flight, then reopened):
//!   latency, and every error that was not one of its own cancels.
//!
//! Each prints one JSON object on stdout.

use std::{
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use stateful_embedder::{
    conversation::{Conversation, ConversationOptions, Pooling, Standardize},
    engine::{BatchLimits, DEFAULT_MAX_BATCH_TOKENS, TurnRequest, run_turns},
    model::{BatchRow, Model, ModelOptions},
    pb::{self, converse_request::Action, converse_response::Result as Reply, embedder_client::EmbedderClient},
};
use tokio_stream::StreamExt;

#[derive(Parser)]
#[command(about = "Benchmarks for stateful-embedder")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// In-process engine figures.
    Engine(EngineArgs),
    /// gRPC load generator.
    Load(LoadArgs),
    /// A short turn's latency over gRPC, alone and while another stream's long
    /// turn prefills.
    Mixed(MixedArgs),
    /// Many open, mostly idle streams and a few active ones.
    Sessions(SessionsArgs),
    /// The cost of rebuilding an evicted cache vs keeping it.
    Rebuild(RebuildArgs),
    /// Soak: many streams × many short turns, some streams cancelled mid-turn.
    Soak(SoakArgs),
    /// Where a turn's time goes, by context length.
    Profile(ProfileArgs),
    /// Many conversations behind one system prompt, with and without
    /// shared prefixes.
    Shared(SharedArgs),
}

#[derive(Args)]
struct SharedArgs {
    /// The model (an ONNX file in a prepared model directory).
    #[arg(long)]
    model: PathBuf,
    /// Conversations behind the system prompt, with sharing.
    #[arg(long, default_value_t = 1000)]
    conversations: usize,
    /// Of them, how many run without sharing (each prefills the prompt: its
    /// memory is the same for every one, so the total is scaled from these).
    #[arg(long, default_value_t = 20)]
    unshared: usize,
    /// The system prompt's length, in tokens (at least).
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Repetitions of the in-zone turn timings.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// ONNX Runtime threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

#[derive(Args)]
struct ProfileArgs {
    /// The model (an ONNX file in a prepared model directory).
    #[arg(long)]
    model: PathBuf,
    /// Repetitions per measurement (after one warm-up).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Context lengths (tokens, ascending) at which the turns are timed.
    #[arg(long, value_delimiter = ',', default_value = "250,2000,6000")]
    contexts: Vec<usize>,
    /// ONNX Runtime threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Probe lengths (tokens) whose rows are also timed in the turn's call,
    /// alternating with none and the served probe's (the served probe's
    /// first tokens, repeated when longer): what a shorter probe would
    /// cost, before a head is fitted for it.
    #[arg(long, value_delimiter = ',', default_value = "2,4,5,6")]
    probe_lengths: Vec<usize>,
}

#[derive(Args)]
struct SoakArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 200)]
    streams: usize,
    /// Turns per stream.
    #[arg(long, default_value_t = 200)]
    turns: usize,
    /// Per-mille of turns whose stream is cancelled mid-turn (then reopened).
    #[arg(long, default_value_t = 10)]
    cancel_per_mille: u64,
    /// HTTP/2 connections the streams share.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Seed of the cancel draws.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct SessionsArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Streams opened first, each with one short turn, then left idle.
    #[arg(long, default_value_t = 1000)]
    open: usize,
    /// Streams that then take turns concurrently.
    #[arg(long, default_value_t = 64)]
    active: usize,
    /// Turns per active stream (bench/turns.txt's lines).
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// HTTP/2 connections the streams share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds to wait, once every stream is open, before the active ones
    /// start (for the driver to read the server's RSS).
    #[arg(long, default_value_t = 0.0)]
    pause: f64,
}

#[derive(Args)]
struct RebuildArgs {
    /// Server address (a server with `--idle-evict-seconds`).
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Lines of bench/turns.txt in the context (about 43 tokens each).
    #[arg(long, default_value_t = 23)]
    context_lines: usize,
    /// Repetitions.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

#[derive(Args)]
struct EngineArgs {
    /// Model file (.onnx) or directory.
    #[arg(long)]
    model: PathBuf,
    /// A model to compare embeddings against (the f32 reference), for fidelity.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Repetitions per measurement (after one warm-up).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// ONNX Runtime threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Only the per-turn speed and fidelity (for the variants).
    #[arg(long)]
    quick: bool,
    /// Only the batching figures (after the per-turn speed).
    #[arg(long)]
    batching_only: bool,
}

#[derive(Args)]
struct LoadArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Turns per stream (each waits for the previous answer).
    #[arg(long, default_value_t = 10)]
    turns: usize,
    /// Streams each worker opens one after another (for the open/close churn test).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Send this text every turn instead of bench/turns.txt's lines.
    #[arg(long)]
    text: Option<String>,
}

#[derive(Args)]
struct MixedArgs {
    /// Server address.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The long turn: bench/turns.txt's lines (40–45 tokens each), this many in all.
    #[arg(long, default_value_t = 170)]
    long_lines: usize,
    /// The short turn's text.
    #[arg(long, default_value = "Yes, and add unit tests too.")]
    text: String,
    /// How long after the long turn the short one is sent, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    delay_ms: u64,
    /// Repetitions.
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

/// Turn texts of about 40–45 tokens each (the prototype's turn size), one per
/// line, shared with the Python contenders.
const TURNS: &str = include_str!("turns.txt");

fn turn_text(i: usize) -> &'static str {
    let lines: Vec<&'static str> = TURNS.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[i % lines.len()]
}

/// Minor page faults of this process so far (/proc/self/stat, field 10):
/// memory touched for the first time.
fn minor_faults() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().nth(7)?.parse().ok())
        .unwrap_or(0)
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Median, min and max of durations, in milliseconds.
fn stats(samples: &[Duration]) -> serde_json::Value {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let median = if ms.is_empty() {
        0.0
    } else if ms.len() % 2 == 1 {
        ms[ms.len() / 2]
    } else {
        (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
    };
    json!({ "median_ms": median, "min_ms": ms.first().copied().unwrap_or(0.0), "max_ms": ms.last().copied().unwrap_or(0.0), "n": ms.len() })
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    if sorted_ms.is_empty() {
        return 0.0;
    }
    let i = ((p / 100.0) * (sorted_ms.len() - 1) as f64).round() as usize;
    sorted_ms[i.min(sorted_ms.len() - 1)]
}

/// A short chat turn, for the batching figures.
const SHORT_TURN: &str = "Yes, and add unit tests too.";

/// One turn on each conversation through `run_turns`; returns the wall time.
fn round(convs: &mut [Conversation], texts: &[&str], limits: BatchLimits) -> anyhow::Result<Duration> {
    let mut requests: Vec<TurnRequest<'_>> = convs
        .iter_mut()
        .zip(texts)
        .map(|(conversation, text)| TurnRequest {
            conversation,
            text,
            role: "",
        })
        .collect();
    let (d, results) = time(|| run_turns(&mut requests, limits));
    for r in results {
        r?;
    }
    Ok(d)
}

fn time<T>(f: impl FnOnce() -> T) -> (Duration, T) {
    let t = Instant::now();
    let out = f();
    (t.elapsed(), out)
}

fn engine(args: &EngineArgs) -> anyhow::Result<serde_json::Value> {
    let rss_start = rss_bytes();
    let (load_time, model) = time(|| {
        Model::open(
            &args.model,
            &ModelOptions {
                threads: args.threads,
                onnxruntime: None,
            },
        )
    });
    let model = model?;
    let rss_loaded = rss_bytes();
    let tok = model.tokenizer();
    let ids45 = tok.encode(turn_text(0))?;
    let opts = mean_options();
    // Warm-up.
    Conversation::new(&model, opts.clone())?.turn(turn_text(0), "")?;

    // Turn latency at turn 1..10 of a conversation of ~45-token turns (also
    // the variants' speed), MEAN z-scored and the model's default vector
    // (its probe rides in each turn's call), alternated.
    let defaults = ConversationOptions::for_model(&model);
    Conversation::new(&model, defaults.clone())?.turn(turn_text(0), "")?;
    let (mut per_turn, mut per_turn_default) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        for (o, into) in [(&opts, &mut per_turn), (&defaults, &mut per_turn_default)] {
            let mut conv = Conversation::new(&model, o.clone())?;
            for i in 0..10 {
                let (d, _) = time(|| conv.turn(turn_text(i), ""));
                into.push(d);
            }
        }
    }
    let mut out = json!({
        "model": model.spec().name,
        "load_ms": load_time.as_secs_f64() * 1e3,
        "rss_start": rss_start,
        "rss_loaded": rss_loaded,
        "turn_tokens": ids45.len(),
        "turns_1_to_10": stats(&per_turn),
        "turns_1_to_10_default": stats(&per_turn_default),
        "default_pooling": format!("{:?}", defaults.pooling),
    });

    if let Some(reference) = &args.reference {
        let reference = Model::open(
            reference,
            &ModelOptions {
                threads: args.threads,
                onnxruntime: None,
            },
        )?;
        let mut worst = [1.0f64; 2];
        for (k, pooling) in [Pooling::Mean, Pooling::LastToken].into_iter().enumerate() {
            let o = ConversationOptions {
                pooling,
                ..opts.clone()
            };
            let mut a = Conversation::new(&model, o.clone())?;
            let mut b = Conversation::new(&reference, o)?;
            for i in 0..10 {
                let x = a.turn(turn_text(i), "")?.embedding;
                let y = b.turn(turn_text(i), "")?.embedding;
                let c: f64 = x.iter().zip(&y).map(|(p, q)| f64::from(*p) * f64::from(*q)).sum();
                worst[k] = worst[k].min(c);
            }
        }
        out["fidelity_min_cosine_mean"] = json!(worst[0]);
        out["fidelity_min_cosine_last_token"] = json!(worst[1]);
    }
    if args.quick {
        return Ok(out);
    }

    if !args.batching_only {
        figures_one_conversation(args, &model, &mut out)?;
    }
    batching(args, &model, &mut out)?;
    Ok(out)
}

/// A chat turn of about 15 tokens (the common case of our users).
const SHORT_CHAT_TURN: &str = "Can you make this function easier to test, and add a short docstring to it?";

/// `se-bench profile`: at each context length, where a turn's time goes. The
/// model call is timed alone (`forward`: ONNX Runtime's run, which also
/// copies past + new into `present`, plus making the inputs and reading the
/// kept hidden rows) and on an empty cache (`forward_no_context`: what the
/// turn's own tokens cost), with the probe's rows and with those of shorter
/// probes (`--probe-lengths`); the probe's cut as a turn makes it (`cut`: in
/// place on a long cache, see `Model::cut`) and as a copy of the kept rows
/// (`cut_copy`), a full copy of the cache (`copy_cache`:
/// the bytes ONNX Runtime's present concat writes too, a proxy for it),
/// freeing a cache of that size (`drop_cache`), the minor page faults of
/// one call and of one whole turn (memory touched for the first time), the
/// whole turn (MEAN raw, and the model's default vector with its probe),
/// and the same call as one row of a batched call of as many rows as the
/// padded-slot bound allows (at most 8 within `--max-batch-tokens`; the
/// others on the same context), per row.
fn profile(args: &ProfileArgs) -> anyhow::Result<serde_json::Value> {
    let model = Model::open(
        &args.model,
        &ModelOptions {
            threads: args.threads,
            onnxruntime: None,
        },
    )?;
    let tok = model.tokenizer();
    let window = args.contexts.iter().copied().max().unwrap_or(0) + 2_000;
    let sized = |o: ConversationOptions| ConversationOptions {
        max_context_tokens: window,
        max_turn_tokens: window,
        ..o
    };
    let raw = sized(ConversationOptions {
        pooling: Pooling::Mean,
        standardize: Standardize::None,
        ..ConversationOptions::default()
    });
    let defaults = sized(ConversationOptions::for_model(&model));
    let (mut raw_conv, mut default_conv) = (Conversation::new(&model, raw)?, Conversation::new(&model, defaults)?);
    let probe = model.probe_ids().to_vec();
    let empty = model.empty_cache();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median_of = |mut f: Box<dyn FnMut() -> anyhow::Result<Duration> + '_>| -> anyhow::Result<f64> {
        f()?; // warm-up
        let mut v = (0..args.reps)
            .map(|_| f().map(ms))
            .collect::<anyhow::Result<Vec<f64>>>()?;
        v.sort_by(f64::total_cmp);
        Ok(v[v.len() / 2])
    };
    let mut rows = Vec::new();
    let mut line = 0;
    for &target in &args.contexts {
        // Both conversations grow to `target` tokens (± one line) on the same text.
        while raw_conv.context_len() + 40 < target {
            let lines = ((target - raw_conv.context_len()) / 43).clamp(1, 100);
            let text = (line..line + lines).map(turn_text).collect::<Vec<_>>().join("\n");
            line += lines;
            raw_conv.turn(&text, "")?;
            default_conv.turn(&text, "")?;
        }
        for (name, text) in [("short", SHORT_CHAT_TURN), ("turn45", turn_text(0))] {
            let ids = tok.encode(text)?;
            let n = ids.len();
            let context = raw_conv.context_len();
            let mut with_probe = ids.clone();
            with_probe.extend_from_slice(&probe);
            let forward = median_of(Box::new(|| Ok(time(|| model.forward(&ids, raw_conv.cache(), 0..n)).0)))?;
            let forward_no_context = median_of(Box::new(|| Ok(time(|| model.forward(&ids, &empty, 0..n)).0)))?;
            let forward_probe = median_of(Box::new(|| {
                Ok(time(|| model.forward(&with_probe, default_conv.cache(), 0..with_probe.len())).0)
            }))?;
            // The call with 0, each of `--probe-lengths` and the probe's
            // rows after the turn, on the same cache, the lengths
            // alternating in each round (so a busy moment hits all alike),
            // three times the rounds: what each probe length adds to a call.
            let mut lengths = vec![0];
            lengths.extend(
                args.probe_lengths
                    .iter()
                    .copied()
                    .filter(|&p| p != 0 && p != probe.len()),
            );
            lengths.push(probe.len());
            let calls: Vec<Vec<u32>> = lengths
                .iter()
                .map(|&p| {
                    ids.iter()
                        .copied()
                        .chain(probe.iter().copied().cycle().take(p))
                        .collect()
                })
                .collect();
            let mut samples = vec![Vec::new(); calls.len()];
            for round in 0..=3 * args.reps {
                for (call, times) in calls.iter().zip(&mut samples) {
                    let (t, out) = time(|| model.forward(call, default_conv.cache(), 0..call.len()));
                    out?;
                    if round > 0 {
                        times.push(ms(t)); // round 0 warms up
                    }
                }
            }
            let mut forward_by_probe_length = serde_json::Map::new();
            for (p, mut times) in lengths.iter().zip(samples) {
                times.sort_by(f64::total_cmp);
                forward_by_probe_length.insert(p.to_string(), json!(times[times.len() / 2]));
            }
            // The probe's cut as a turn makes it (in place on a long cache,
            // see `Model::cut`), each time on a fresh call's output, and as
            // a copy of the kept rows (how every cut was made before).
            let cut = median_of(Box::new(|| {
                let (_, probed) = model.forward(&with_probe, default_conv.cache(), 0..with_probe.len())?;
                Ok(time(|| model.cut(probed, probe.len())).0)
            }))?;
            let (_, probed) = model.forward(&with_probe, default_conv.cache(), 0..with_probe.len())?;
            let cut_copy = median_of(Box::new(|| {
                Ok(time(|| model.truncate(&probed, probed.len() - probe.len())).0)
            }))?;
            drop(probed);
            let copy_cache = median_of(Box::new(|| {
                Ok(time(|| model.truncate(raw_conv.cache(), raw_conv.context_len())).0)
            }))?;
            // Freeing a cache of the context's size (what a turn does with
            // the cache it replaces).
            let drop_cache = median_of(Box::new(|| {
                let copy = model.truncate(raw_conv.cache(), raw_conv.context_len())?;
                Ok(time(move || drop(copy)).0)
            }))?;
            // As many rows as the padded-slot bound alone allows (8 at most
            // within `--max-batch-tokens`), all on this context: past
            // `--max-batch-past-tokens` the server runs such turns alone, and
            // these rows say why.
            let group = (DEFAULT_MAX_BATCH_TOKENS / (context + n)).clamp(1, 8);
            let batch: Vec<BatchRow<'_>> = (0..group)
                .map(|_| BatchRow {
                    ids: &ids,
                    past: raw_conv.cache(),
                    keep: 0..n,
                    cut: 0,
                    keep_base: false,
                })
                .collect();
            let batched = median_of(Box::new(|| Ok(time(|| model.forward_batch(&batch)).0)))? / group as f64;
            drop(batch);
            // Memory touched for the first time, per call and per whole turn.
            let faults = |f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<u64> {
                let before = minor_faults();
                f()?;
                Ok(minor_faults() - before)
            };
            let forward_faults = faults(&mut || {
                model.forward(&ids, raw_conv.cache(), 0..n)?;
                Ok(())
            })?;
            let turn_faults = faults(&mut || {
                raw_conv.turn(text, "")?;
                Ok(())
            })?;
            let turn_raw = median_of(Box::new(|| Ok(time(|| raw_conv.turn(text, "")).0)))?;
            let turn_default = median_of(Box::new(|| Ok(time(|| default_conv.turn(text, "")).0)))?;
            rows.push(json!({
                "context": context, "turn": name, "turn_tokens": n, "probe_tokens": probe.len(),
                "cache_bytes": raw_conv.kv_bytes(),
                "forward_ms": forward, "forward_no_context_ms": forward_no_context,
                "forward_with_probe_ms": forward_probe, "forward_with_probe_length_ms": forward_by_probe_length, "cut_ms": cut, "cut_copy_ms": cut_copy, "copy_cache_ms": copy_cache, "drop_cache_ms": drop_cache,
                "batched_rows": group, "batched_per_row_ms": batched, "turn_mean_raw_ms": turn_raw, "turn_default_ms": turn_default,
                "forward_minor_faults": forward_faults, "turn_mean_raw_minor_faults": turn_faults,
            }));
            eprintln!("[profile] {}", rows.last().expect("pushed"));
        }
    }
    Ok(json!({ "model": model.spec().name, "reps": args.reps, "rows": rows }))
}

/// The options of the in-process figures: MEAN pooling, z-scored (the
/// figures BENCHMARKS.md has tracked since the start; the defaults add the
/// probe's tokens to each turn's call, whose cost QUALITY.md measures).
fn mean_options() -> ConversationOptions {
    ConversationOptions {
        pooling: Pooling::Mean,
        standardize: Standardize::Zscore,
        ..ConversationOptions::default()
    }
}

/// Comparisons 1, 2 and 7 (in process): one call vs token by token, turn
/// latency by context, stateless vs stateful, memory.
fn figures_one_conversation(args: &EngineArgs, model: &Arc<Model>, out: &mut serde_json::Value) -> anyhow::Result<()> {
    let tok = model.tokenizer();
    let ids45 = tok.encode(turn_text(0))?;
    let opts = mean_options();

    // 1. The prototype's way (one token per call) vs one call, 45 tokens, empty context.
    let (mut one_call, mut token_by_token) = (Vec::new(), Vec::new());
    for _ in 0..args.reps {
        let empty = model.empty_cache();
        let (d, r) = time(|| model.forward(&ids45, &empty, 0..ids45.len()));
        r?;
        one_call.push(d);
        let t = Instant::now();
        let mut cache = model.empty_cache();
        for id in &ids45 {
            cache = model.forward(std::slice::from_ref(id), &cache, 0..1)?.1;
        }
        token_by_token.push(t.elapsed());
    }
    out["prototype"] = json!({ "one_call": stats(&one_call), "token_by_token": stats(&token_by_token) });

    // 45-token turn on an empty and on a ~500-token context.
    let (mut empty_ctx, mut ctx500) = (Vec::new(), Vec::new());
    let mut context_len = 0;
    for _ in 0..args.reps {
        let mut conv = Conversation::new(model, opts.clone())?;
        let (d, r) = time(|| conv.turn(turn_text(0), ""));
        r?;
        empty_ctx.push(d);
        let mut conv = Conversation::new(model, opts.clone())?;
        let mut i = 1;
        while conv.context_len() < 500 - ids45.len() / 2 {
            conv.turn(turn_text(i), "")?;
            i += 1;
        }
        context_len = conv.context_len();
        let (d, r) = time(|| conv.turn(turn_text(0), ""));
        r?;
        ctx500.push(d);
    }
    out["turn45"] =
        json!({ "empty_context": stats(&empty_ctx), "context": context_len, "after_context": stats(&ctx500) });

    // 2. Stateless (the whole conversation from an empty cache) vs stateful, turns 1..20.
    let mut curve = Vec::new();
    let mut turn_ids: Vec<Vec<u32>> = Vec::new();
    for i in 0..20 {
        turn_ids.push(tok.encode(turn_text(i))?);
    }
    let mut stateful: Vec<Vec<Duration>> = vec![Vec::new(); 20];
    let mut stateless: Vec<Vec<Duration>> = vec![Vec::new(); 20];
    for _ in 0..args.reps.min(3) {
        let mut conv = Conversation::new(model, opts.clone())?;
        let mut all: Vec<u32> = Vec::new();
        for k in 0..20 {
            let (d, r) = time(|| conv.turn(turn_text(k), ""));
            r?;
            stateful[k].push(d);
            all.extend_from_slice(&turn_ids[k]);
            let start = all.len() - turn_ids[k].len();
            let empty = model.empty_cache();
            let (d, r) = time(|| model.forward(&all, &empty, start..all.len()));
            r?;
            stateless[k].push(d);
        }
    }
    for k in 0..20 {
        curve.push(json!({ "turn": k + 1, "stateful": stats(&stateful[k]), "stateless": stats(&stateless[k]) }));
    }
    out["stateless_vs_stateful"] = json!(curve);

    // 7. RSS per live conversation (one 1,000-token turn each) and after 1,000
    //    short conversations opened, used and closed.
    let live_n = 16;
    let long_turn = (0..40).map(turn_text).collect::<Vec<_>>().join(" ");
    let long_ids = tok.encode(&long_turn)?;
    let long_turn = tok.decode(&long_ids[..1000.min(long_ids.len())])?;
    let before_live = rss_bytes();
    let mut live = Vec::new();
    for _ in 0..live_n {
        let mut conv = Conversation::new(model, opts.clone())?;
        conv.turn(&long_turn, "")?;
        live.push(conv);
    }
    let after_live = rss_bytes();
    let kv: u64 = live.iter().map(|c| c.kv_bytes()).sum();
    drop(live);
    let before_churn = rss_bytes();
    for i in 0..1000 {
        let mut conv = Conversation::new(model, opts.clone())?;
        conv.turn(&format!("conversation {i}: hello"), "user")?;
        conv.turn("and goodbye", "assistant")?;
    }
    let after_churn = rss_bytes();
    out["memory"] = json!({
        "live_conversations": live_n,
        "rss_before_live": before_live,
        "rss_with_live": after_live,
        "kv_bytes_live": kv,
        "rss_before_churn": before_churn,
        "rss_after_1000": after_churn,
    });

    Ok(())
}

/// Comparison 5 in process, and a turn after a long context: run after the
/// memory figures (the heap it frees would hide their RSS growth).
fn batching(args: &EngineArgs, model: &Arc<Model>, out: &mut serde_json::Value) -> anyhow::Result<()> {
    let tok = model.tokenizer();
    let opts = mean_options();
    // Batching: 8 conversations with ~270 tokens of context;
    //    a round of one turn each, one by one vs in one `run_turns` call
    //    (alternating which goes first), for 45-token and for short turns.
    let streams = 8;
    let mut convs = (0..streams)
        .map(|_| Conversation::new(model, opts.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    for k in 1..7 {
        round(&mut convs, &vec![turn_text(k); streams], BatchLimits::default())?;
    }
    let start_context = convs[0].context_len();
    let mut batching = serde_json::Map::new();
    for (label, text) in [("turn45", turn_text(0)), ("short", SHORT_TURN)] {
        let (mut alone, mut batched) = (Vec::new(), Vec::new());
        for rep in 0..args.reps {
            let texts = vec![text; streams];
            let off = BatchLimits {
                max_turns: 1,
                ..BatchLimits::default()
            };
            for first in [rep % 2 == 0, rep % 2 == 1] {
                if first {
                    alone.push(round(&mut convs, &texts, off)?);
                } else {
                    batched.push(round(&mut convs, &texts, BatchLimits::default())?);
                }
            }
        }
        batching.insert(
            label.into(),
            json!({ "turn_tokens": tok.encode(text)?.len(), "one_by_one": stats(&alone), "batched": stats(&batched) }),
        );
    }
    batching.insert("conversations".into(), json!(streams));
    batching.insert(
        "context".into(),
        json!([start_context, convs.iter().map(|c| c.context_len()).max()]),
    );
    drop(convs);
    out["batching"] = serde_json::Value::Object(batching);

    // A 45-token turn after ~4,000 tokens of context (attention's share grows with context).
    let mut conv = Conversation::new(model, opts.clone())?;
    let long_text = (0..100).map(turn_text).collect::<Vec<_>>().join(" ");
    let long_ids = tok.encode(&long_text)?;
    conv.turn(&tok.decode(&long_ids[..4000.min(long_ids.len())])?, "")?;
    let mut ctx4000 = Vec::new();
    let context_before = conv.context_len();
    for _ in 0..args.reps.min(3) {
        let (d, r) = time(|| conv.turn(turn_text(0), ""));
        r?;
        ctx4000.push(d);
    }
    out["turn45_long_context"] = json!({ "context": context_before, "turn": stats(&ctx4000) });
    Ok(())
}

/// The server's (turns, model calls) so far, if it answers GetStats.
async fn server_calls(addr: &str) -> Option<(u64, u64)> {
    let mut client = EmbedderClient::connect(addr.to_string()).await.ok()?;
    let s = client.get_stats(pb::GetStatsRequest {}).await.ok()?.into_inner();
    Some((s.turns_total, s.model_calls_total))
}

async fn load(args: &LoadArgs) -> anyhow::Result<serde_json::Value> {
    let calls_before = server_calls(&args.addr).await;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.streams {
        let addr = args.addr.clone();
        let (turns, rounds, text) = (args.turns, args.rounds, args.text.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = EmbedderClient::connect(addr).await?;
            let mut latencies = Vec::with_capacity(turns * rounds);
            let mut tokens = 0u64;
            for _ in 0..rounds {
                let (tx, rx) = tokio::sync::mpsc::channel(1);
                let mut rx = Some(rx);
                let mut responses = None;
                for i in 0..turns {
                    if let Some(rx) = rx.take() {
                        // Open the stream with the options already queued: some
                        // servers (grpcio) send no headers before they have an answer.
                        tx.send(comparable_options()).await.context("the stream closed")?;
                        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
                        let mut opened = client.converse(stream).await?.into_inner();
                        ready_of(opened.next().await.context("the stream ended")??)?;
                        responses = Some(opened);
                    }
                    let request = pb::ConverseRequest {
                        tag: String::new(),
                        action: Some(Action::Turn(pb::Turn {
                            text: text.clone().unwrap_or_else(|| turn_text(i).to_string()),
                            role: String::new(),
                        })),
                    };
                    let t = Instant::now();
                    tx.send(request).await.context("the stream closed")?;
                    let responses = responses.as_mut().expect("opened before the first turn");
                    let r = responses.next().await.context("the stream ended")??;
                    latencies.push(t.elapsed());
                    match r.result {
                        Some(Reply::Embedding(e)) => tokens += u64::from(e.turn_tokens),
                        other => anyhow::bail!("unexpected response {other:?}"),
                    }
                }
                drop(tx);
                if let Some(mut responses) = responses {
                    while responses.next().await.is_some() {}
                }
            }
            anyhow::Ok((latencies, tokens))
        }));
    }
    let mut all = Vec::new();
    let mut tokens = 0;
    for t in tasks {
        let (l, n) = t.await??;
        all.extend(l);
        tokens += n;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let calls = match (calls_before, server_calls(&args.addr).await) {
        (Some((t0, c0)), Some((t1, c1))) => json!({ "turns": t1 - t0, "model_calls": c1 - c0 }),
        _ => serde_json::Value::Null,
    };
    let mut ms: Vec<f64> = all.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    Ok(json!({
        "streams": args.streams,
        "turns_per_stream": args.turns,
        "rounds": args.rounds,
        "turns": ms.len(),
        "tokens": tokens,
        "seconds": elapsed,
        "tokens_per_s": tokens as f64 / elapsed,
        "p50_ms": percentile(&ms, 50.0),
        "p90_ms": percentile(&ms, 90.0),
        "p99_ms": percentile(&ms, 99.0),
        "median_ms": percentile(&ms, 50.0),
        "server_calls": calls,
    }))
}

/// Opens a stream, sends one turn, and returns its latency and tokens.
async fn one_turn(addr: String, text: String) -> anyhow::Result<(Duration, u32)> {
    let mut client = EmbedderClient::connect(addr).await?;
    let request = pb::ConverseRequest {
        tag: String::new(),
        action: Some(Action::Turn(pb::Turn {
            text,
            role: String::new(),
        })),
    };
    let t = Instant::now();
    let requests = vec![comparable_options(), request];
    let mut responses = client.converse(tokio_stream::iter(requests)).await?.into_inner();
    ready_of(responses.next().await.context("the stream ended")??)?;
    let r = responses.next().await.context("the stream ended")??;
    let elapsed = t.elapsed();
    match r.result {
        Some(Reply::Embedding(e)) => Ok((elapsed, e.turn_tokens)),
        other => anyhow::bail!("unexpected response {other:?}"),
    }
}

async fn mixed(args: &MixedArgs) -> anyhow::Result<serde_json::Value> {
    let long_text = (0..args.long_lines).map(turn_text).collect::<Vec<_>>().join("\n");
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (mut alone, mut behind, mut long, mut long_tokens) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for _ in 0..args.reps {
        alone.push(ms(one_turn(args.addr.clone(), args.text.clone()).await?.0));
        let background = tokio::spawn(one_turn(args.addr.clone(), long_text.clone()));
        tokio::time::sleep(Duration::from_millis(args.delay_ms)).await;
        behind.push(ms(one_turn(args.addr.clone(), args.text.clone()).await?.0));
        let (elapsed, tokens) = background.await??;
        long.push(ms(elapsed));
        long_tokens = tokens;
    }
    Ok(json!({
        "long_tokens": long_tokens,
        "delay_ms": args.delay_ms,
        "short_alone_ms": alone,
        "short_behind_long_ms": behind,
        "long_ms": long,
    }))
}

fn turn_request(text: String) -> pb::ConverseRequest {
    pb::ConverseRequest {
        tag: String::new(),
        action: Some(Action::Turn(pb::Turn {
            text,
            role: String::new(),
        })),
    }
}

/// An open stream: its requests' sender and its responses.
struct Open {
    tx: tokio::sync::mpsc::Sender<pb::ConverseRequest>,
    rx: tonic::Streaming<pb::ConverseResponse>,
}

impl Open {
    async fn start(client: &mut EmbedderClient<tonic::transport::Channel>, first: String) -> anyhow::Result<Open> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(turn_request(first)).await?;
        let mut rx = client
            .converse(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await?
            .into_inner();
        embedding_of(rx.next().await.context("the stream ended")??)?;
        Ok(Open { tx, rx })
    }

    async fn turn(&mut self, text: String) -> anyhow::Result<pb::Embedding> {
        self.tx.send(turn_request(text)).await?;
        embedding_of(self.rx.next().await.context("the stream ended")??)
    }
}

/// The first request of the `load` and `mixed` streams: MEAN pooling of the
/// raw states, the work the Python server of the comparison does (the
/// server's default adds the probe's 12 tokens to each turn's call:
/// QUALITY.md, "Cost on the server").
fn comparable_options() -> pb::ConverseRequest {
    pb::ConverseRequest {
        tag: String::new(),
        action: Some(Action::Options(pb::SessionOptions {
            pooling: pb::Pooling::Mean as i32,
            standardize: pb::Standardize::None as i32,
            ..Default::default()
        })),
    }
}

fn ready_of(r: pb::ConverseResponse) -> anyhow::Result<()> {
    match r.result {
        Some(Reply::Ready(_)) => Ok(()),
        other => anyhow::bail!("expected the session's ready, got {other:?}"),
    }
}

fn embedding_of(r: pb::ConverseResponse) -> anyhow::Result<pb::Embedding> {
    match r.result {
        Some(Reply::Embedding(e)) => Ok(e),
        other => anyhow::bail!("unexpected response {other:?}"),
    }
}

async fn server_stats(addr: &str) -> anyhow::Result<pb::Stats> {
    let mut client = EmbedderClient::connect(addr.to_string()).await?;
    Ok(client.get_stats(pb::GetStatsRequest {}).await?.into_inner())
}

fn stats_json(s: &pb::Stats) -> serde_json::Value {
    json!({
        "open_streams": s.open_streams,
        "kv_cache_bytes": s.kv_cache_bytes,
        "kv_budget_bytes": s.kv_budget_bytes,
        "resident_conversations": s.resident_conversations,
        "evicted_conversations": s.evicted_conversations,
        "evictions_total": s.evictions_total,
        "rebuilds_total": s.rebuilds_total,
        "rebuilt_tokens_total": s.rebuilt_tokens_total,
        "turns_total": s.turns_total,
        "model_calls_total": s.model_calls_total,
        "queue_wait_us_total": s.queue_wait_us_total,
        "queue_wait_us_max": s.queue_wait_us_max,
    })
}

async fn sessions(args: &SessionsArgs) -> anyhow::Result<serde_json::Value> {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(EmbedderClient::connect(args.addr.clone()).await?);
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Health and the KV bytes, sampled every 20 ms on a connection of their own.
    let sampler = {
        let (addr, stop) = (args.addr.clone(), stop.clone());
        tokio::spawn(async move {
            let channel = tonic::transport::Channel::from_shared(addr)?.connect().await?;
            let mut health = HealthClient::new(channel.clone());
            let mut embedder = EmbedderClient::new(channel);
            let (mut checks, mut failures, mut slowest, mut most_kv) = (0u64, 0u64, Duration::ZERO, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let ok = tokio::time::timeout(
                    Duration::from_secs(2),
                    health.check(HealthCheckRequest { service: String::new() }),
                )
                .await
                .is_ok_and(|r| r.is_ok_and(|r| r.into_inner().status == 1));
                slowest = slowest.max(t.elapsed());
                checks += 1;
                failures += u64::from(!ok);
                if let Ok(s) = embedder.get_stats(pb::GetStatsRequest {}).await {
                    most_kv = most_kv.max(s.into_inner().kv_cache_bytes);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok((checks, failures, slowest, most_kv))
        })
    };
    let started = Instant::now();
    let mut idle = Vec::with_capacity(args.open);
    for wave in (0..args.open).collect::<Vec<_>>().chunks(200) {
        let mut opening = Vec::new();
        for &i in wave {
            let mut client = clients[i % clients.len()].clone();
            opening.push(tokio::spawn(async move {
                Open::start(&mut client, format!("stream {i}: hello")).await
            }));
        }
        for o in opening {
            idle.push(o.await??);
        }
    }
    let opened_s = started.elapsed().as_secs_f64();
    let open_stats = server_stats(&args.addr).await?;
    println!("{}", json!({ "opened": idle.len(), "opened_s": opened_s }));
    tokio::time::sleep(Duration::from_secs_f64(args.pause)).await;

    let active_started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..args.active {
        let mut client = clients[s % clients.len()].clone();
        let turns = args.turns;
        tasks.push(tokio::spawn(async move {
            let mut open = Open::start(&mut client, turn_text(s).to_string()).await?;
            let mut latencies = Vec::with_capacity(turns);
            for t in 1..turns {
                let asked = Instant::now();
                open.turn(turn_text(s + t).to_string()).await?;
                latencies.push(asked.elapsed().as_secs_f64() * 1e3);
            }
            anyhow::Ok((open, latencies))
        }));
    }
    let (mut ms, mut active) = (Vec::new(), Vec::new());
    for t in tasks {
        let (open, l) = t.await??;
        ms.extend(l);
        active.push(open);
    }
    let active_s = active_started.elapsed().as_secs_f64();
    let after = server_stats(&args.addr).await?;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (checks, failures, slowest, most_kv) = sampler.await??;
    ms.sort_by(f64::total_cmp);
    drop((idle, active));
    Ok(json!({
        "open": args.open,
        "active": args.active,
        "turns_per_active": args.turns,
        "opened_s": opened_s,
        "active_s": active_s,
        "active_turns": ms.len(),
        "p50_ms": percentile(&ms, 50.0),
        "p99_ms": percentile(&ms, 99.0),
        "health_checks": checks,
        "health_failures": failures,
        "health_slowest_ms": slowest.as_secs_f64() * 1e3,
        "most_kv_bytes_sampled": most_kv,
        "stats_open": stats_json(&open_stats),
        "stats_after": stats_json(&after),
    }))
}

async fn rebuild(args: &RebuildArgs) -> anyhow::Result<serde_json::Value> {
    let context = (0..args.context_lines).map(turn_text).collect::<Vec<_>>().join("\n");
    let mut client = EmbedderClient::connect(args.addr.clone()).await?;
    let (mut kept, mut rebuilt, mut per_1000, mut tokens) = (Vec::new(), Vec::new(), Vec::new(), 0);
    for rep in 0..args.reps {
        let mut open = Open::start(&mut client, context.clone()).await?;
        let t = Instant::now();
        open.turn(SHORT_TEXT.to_string()).await?;
        let kept_ms = t.elapsed().as_secs_f64() * 1e3;
        // Wait for the server's idle eviction.
        let deadline = Instant::now() + Duration::from_secs(60);
        let before = loop {
            let s = server_stats(&args.addr).await?;
            if s.evicted_conversations >= 1 && s.kv_cache_bytes == 0 {
                break s;
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server never evicted the cache (--idle-evict-seconds?)"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let t = Instant::now();
        open.turn(SHORT_TEXT.to_string()).await?;
        let rebuilt_ms = t.elapsed().as_secs_f64() * 1e3;
        let after = server_stats(&args.addr).await?;
        let n = after.rebuilt_tokens_total - before.rebuilt_tokens_total;
        anyhow::ensure!(n > 0, "rep {rep}: the turn did not rebuild");
        tokens = n;
        kept.push(kept_ms);
        rebuilt.push(rebuilt_ms);
        per_1000.push((rebuilt_ms - kept_ms) / n as f64 * 1000.0);
    }
    Ok(json!({
        "rebuilt_tokens": tokens,
        "kept_ms": kept,
        "rebuilt_ms": rebuilt,
        "rebuild_ms_per_1000_tokens": per_1000,
    }))
}

/// A small deterministic generator (xorshift64*) for the soak's draws.
struct Draws(u64);

impl Draws {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

async fn soak(args: &SoakArgs) -> anyhow::Result<serde_json::Value> {
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        clients.push(EmbedderClient::connect(args.addr.clone()).await?);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for s in 0..args.streams {
        let mut client = clients[s % clients.len()].clone();
        let (turns, per_mille) = (args.turns, args.cancel_per_mille);
        let mut draws = Draws(args.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (s as u64 + 1));
        tasks.push(tokio::spawn(async move {
            let (mut ms, mut cancels, mut errors) = (Vec::with_capacity(turns), 0u64, Vec::new());
            let mut open = Open::start(&mut client, format!("soak stream {s}: hello")).await?;
            for t in 0..turns {
                let text = format!("stream {s} turn {t}: fn f(x: u32) -> u32 {{ x + {t} }}");
                if draws.next() % 1000 < per_mille {
                    // Cancel mid-turn: send it, drop the stream at once, reopen.
                    open.tx.send(turn_request(text)).await?;
                    drop(open);
                    cancels += 1;
                    open = Open::start(&mut client, format!("soak stream {s}: again")).await?;
                    continue;
                }
                let asked = Instant::now();
                match open.turn(text).await {
                    Ok(_) => ms.push(asked.elapsed().as_secs_f64() * 1e3),
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            drop(open);
            anyhow::Ok((ms, cancels, errors))
        }));
    }
    let (mut ms, mut cancels, mut errors) = (Vec::new(), 0, Vec::new());
    for t in tasks {
        let (m, c, e) = t.await??;
        ms.extend(m);
        cancels += c;
        errors.extend(e);
    }
    let seconds = started.elapsed().as_secs_f64();
    ms.sort_by(f64::total_cmp);
    let error_count = errors.len();
    errors.truncate(20);
    Ok(json!({
        "error_count": error_count,
        "streams": args.streams,
        "turns_per_stream": args.turns,
        "turns_ok": ms.len(),
        "cancels": cancels,
        "errors": errors,
        "seconds": seconds,
        "p50_ms": percentile(&ms, 50.0),
        "p99_ms": percentile(&ms, 99.0),
    }))
}

/// `se-bench shared`: `--conversations` conversations whose first turn is
/// the same system prompt (about `--prompt-tokens` tokens) and whose second
/// is a short question of their own, all alive at the end, with shared
/// prefixes on (the server's default `--shared-prefix-tokens`): the KV bytes
/// held (the model's ledger) against one prompt plus every conversation's
/// own tokens, and each conversation's time to its first own vector (the
/// prompt turn, answered from the shared prefix, then the question on it).
/// Among them, spread evenly, `--unshared` conversations with sharing off:
/// the prompt prefilled by each, and the same question on its own cache,
/// the turn's cost when its context is cached. Last, the price of sharing for one conversation
/// within the bound (its calls gather the shared rows into one past): a
/// short turn at a few context lengths, shared and not.
fn shared(args: &SharedArgs) -> anyhow::Result<serde_json::Value> {
    let model = Model::open(
        &args.model,
        &ModelOptions {
            threads: args.threads,
            onnxruntime: None,
        },
    )?;
    let tok = model.tokenizer();
    let per_token = model.spec().kv_bytes_per_token();
    let mut prompt = String::from("You are a senior reviewer of Python and Rust code. Follow these rules.\n");
    let mut rule = 0;
    while tok.encode(&prompt)?.len() < args.prompt_tokens {
        prompt.push_str(&format!(
            "Rule {rule}: prefer small pure functions, name them for what they return, and test edge case {rule}.\n"
        ));
        rule += 1;
    }
    let question = |i: usize| format!("Conversation {i}: can you make `parse_{i}` easier to test?");
    let options = ConversationOptions::for_model(&model);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };

    // With sharing, and now and then (evenly spread, so that both see the
    // same machine) a conversation with sharing off: it prefills the prompt
    // itself, and its question runs on its own cache of it.
    let bound = stateful_embedder::server::DEFAULT_SHARED_PREFIX_TOKENS;
    let every = (args.conversations / args.unshared.max(1)).max(1);
    let (mut conversations, mut first, mut prompt_turn, mut question_shared, mut own_tokens) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
    let (mut unshared, mut first_unshared, mut cached_turn, mut unshared_bytes) =
        (Vec::new(), Vec::new(), Vec::new(), 0);
    let (mut calls, mut prompt_len) = (0, 0);
    let started = Instant::now();
    for i in 0..args.conversations {
        if i % every == every / 2 && unshared.len() < args.unshared {
            model.set_shared_prefix_tokens(0);
            let before = model.kv_cache_bytes();
            let mut c = Conversation::new(&model, options.clone())?;
            let (d_prompt, out) = time(|| c.turn(&prompt, "system"));
            out?;
            let (d_question, out) = time(|| c.turn(&question(i), "user"));
            out?;
            first_unshared.push(ms(d_prompt + d_question));
            cached_turn.push(ms(d_question));
            unshared_bytes += model.kv_cache_bytes() - before;
            unshared.push(c);
        }
        model.set_shared_prefix_tokens(bound);
        let before = model.calls();
        let mut c = Conversation::new(&model, options.clone())?;
        let (d_prompt, out) = time(|| c.turn(&prompt, "system"));
        prompt_len = out?.turn_tokens;
        let (d_question, out) = time(|| c.turn(&question(i), "user"));
        own_tokens += out?.turn_tokens;
        calls += model.calls() - before;
        if i > 0 {
            prompt_turn.push(ms(d_prompt));
            question_shared.push(ms(d_question));
            first.push(ms(d_prompt + d_question));
        }
        conversations.push(c);
    }
    let seconds = started.elapsed().as_secs_f64();
    let unshared_bytes = unshared_bytes / unshared.len().max(1) as u64;
    drop(unshared);
    let held = model.kv_cache_bytes();
    let stats = model.prefix_stats();
    let ideal = (prompt_len + own_tokens) as u64 * per_token;
    let shared_calls = calls;
    drop(conversations);

    // One conversation within the bound, shared and not: a short turn at
    // each length, on turns of about 100 tokens (one segment each).
    let mut zone = Vec::new();
    for target in [250usize, 1000, 1900] {
        let mut row = json!({ "context": target });
        for (name, bound) in [
            ("shared", stateful_embedder::server::DEFAULT_SHARED_PREFIX_TOKENS),
            ("unshared", 0),
        ] {
            model.set_shared_prefix_tokens(bound);
            let mut c = Conversation::new(&model, options.clone())?;
            let mut line = 0;
            while c.context_len() + 100 < target {
                let text = (line..line + 2).map(turn_text).collect::<Vec<_>>().join("\n");
                line += 2;
                c.turn(&format!("{name} {target}: {text}"), "user")?;
            }
            let mut v = Vec::new();
            for r in 0..=args.reps {
                let (d, out) = time(|| c.turn(&format!("{SHORT_CHAT_TURN} ({name} {target} {r})"), "user"));
                out?;
                if r > 0 {
                    v.push(ms(d)); // the first is a warm-up
                }
            }
            row[name] = json!(median(v));
            row[format!("{name}_segments")] = json!(model.prefix_stats().segments);
        }
        zone.push(row);
    }
    model.set_shared_prefix_tokens(0);

    Ok(json!({
        "model": args.model.display().to_string(),
        "cpu_features": format!("{:?}", stateful_embedder::platform::cpu::CpuFeatures::detect()),
        "conversations": args.conversations,
        "prompt_tokens": prompt_len,
        "own_tokens_mean": own_tokens as f64 / args.conversations as f64,
        "seconds": seconds,
        "model_calls": shared_calls,
        "kv_bytes_shared": held,
        "kv_bytes_ideal": ideal,
        "kv_bytes_unshared_per_conversation": unshared_bytes,
        "kv_bytes_unshared_total": unshared_bytes * args.conversations as u64,
        "shared_segments": stats.segments,
        "shared_turns": stats.hits,
        "shared_tokens_saved": stats.tokens_saved,
        "prompt_turn_shared_ms": median(prompt_turn.clone()),
        "first_vector_shared_ms": median(first.clone()),
        "first_vector_shared_max_ms": first.iter().copied().fold(0.0, f64::max),
        "first_vector_unshared_ms": median(first_unshared.clone()),
        "question_shared_ms": median(question_shared),
        "cached_turn_ms": median(cached_turn),
        "unshared_samples": first_unshared.len(),
        "zone": zone,
    }))
}

/// The short turn of `se-bench rebuild`.
const SHORT_TEXT: &str = "Yes, and add unit tests too.";

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = || tokio::runtime::Builder::new_multi_thread().enable_all().build();
    let out = match &cli.command {
        Cmd::Engine(a) => engine(a)?,
        Cmd::Profile(a) => profile(a)?,
        Cmd::Shared(a) => shared(a)?,
        Cmd::Load(a) => rt()?.block_on(load(a))?,
        Cmd::Mixed(a) => rt()?.block_on(mixed(a))?,
        Cmd::Sessions(a) => rt()?.block_on(sessions(a))?,
        Cmd::Rebuild(a) => rt()?.block_on(rebuild(a))?,
        Cmd::Soak(a) => rt()?.block_on(soak(a))?,
    };
    println!("{out}");
    Ok(())
}
