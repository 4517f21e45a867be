//! The server's settings: one clap struct (the `serve` subcommand's flags,
//! each with its environment variable), passed down by reference.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser};

use crate::{
    conversation::{DEFAULT_MAX_CONTEXT_TOKENS, DEFAULT_PREFILL_CHUNK_TOKENS},
    engine::{BatchLimits, DEFAULT_MAX_BATCH_PAST_TOKENS, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_BATCH_TURNS},
    service::Limits,
};

/// The default `--max-streams`: measured safe on the tiny model (10,000
/// open streams within the budget, health answering; BENCHMARKS.md).
pub const DEFAULT_MAX_STREAMS: usize = 10_000;

/// The default `--max-detached-sessions`: a detached session costs its
/// token ids (4 bytes a token) and a resting conversation whose cache is
/// evictable, like an idle stream.
pub const DEFAULT_MAX_DETACHED_SESSIONS: usize = 10_000;

/// The default `--shared-prefix-tokens`: room for a long system prompt and a
/// few examples. Within it every call gathers its shared rows into one
/// tensor first (a copy of at most this many tokens' rows: within the noise
/// of a turn, +1% to +5% at ~1,900 tokens on the 0.5B model in f32,
/// BENCHMARKS.md's "Shared prefixes").
pub const DEFAULT_SHARED_PREFIX_TOKENS: usize = 2048;

/// The server's settings. Every flag can also be set by its environment variable.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "SE_ADDR", default_value = "127.0.0.1:50051")]
    pub addr: SocketAddr,

    /// Model directory (served from its model.onnx) or one .onnx file, with
    /// tokenizer.json and config.json beside it.
    #[arg(long, env = "SE_MODEL", default_value = "models/qwen2.5-coder-0.5b-instruct")]
    pub model: PathBuf,

    /// ONNX Runtime intra-op threads; 0 means one per core.
    #[arg(long, env = "SE_THREADS", default_value_t = 0)]
    pub threads: usize,

    /// Context window per conversation, in tokens: the default and the most
    /// a client may ask for (more is INVALID_ARGUMENT); at most the model's
    /// maximum.
    #[arg(long, env = "SE_MAX_CONTEXT_TOKENS", default_value_t = DEFAULT_MAX_CONTEXT_TOKENS)]
    pub max_context_tokens: usize,

    /// Most Converse streams open at once; more get RESOURCE_EXHAUSTED. An
    /// idle stream costs its token ids and a few KiB (BENCHMARKS.md), its KV
    /// cache being evictable, so this can be large. (`--max-sessions`, its
    /// name before 2026-12, still works.)
    #[arg(long, alias = "max-sessions", env = "SE_MAX_STREAMS", default_value_t = DEFAULT_MAX_STREAMS)]
    pub max_streams: usize,

    /// Most resumable sessions kept detached at once (their streams lost,
    /// waiting to be resumed); past it, a lost session is freed at once.
    #[arg(long, env = "SE_MAX_DETACHED_SESSIONS", default_value_t = DEFAULT_MAX_DETACHED_SESSIONS)]
    pub max_detached_sessions: usize,

    /// Most bytes all KV caches may hold together (live caches, part-built
    /// ones and a running call's): e.g. 8GiB, 512MiB, 2Gi (binary), 2G or 2GB
    /// (decimal), or a number of bytes. When a turn needs more,
    /// idle conversations' caches are evicted (least recently used first) and
    /// rebuilt by recomputation at their next turn. Default: half the memory
    /// available at start (the cgroup's, in a container) after the model's
    /// weights.
    #[arg(long, env = "SE_MAX_KV_BYTES", value_parser = parse_bytes)]
    pub max_kv_bytes: Option<u64>,

    /// Evict the cache of a conversation idle this long (the stream stays
    /// open; the next turn rebuilds it); 0 never evicts by age.
    #[arg(long, env = "SE_IDLE_EVICT_SECONDS", default_value_t = 0.0, value_parser = parse_seconds)]
    pub idle_evict_seconds: f64,

    /// How long a resumable session whose stream was lost (not half-closed)
    /// waits to be resumed before it is freed; 0 turns resumable sessions off.
    #[arg(long, env = "SE_DETACHED_TTL_SECONDS", default_value_t = 300.0, value_parser = parse_seconds)]
    pub detached_ttl_seconds: f64,

    /// Where resumable sessions live: `memory` (this process only: a
    /// replica that goes away takes its detached sessions with it) or a
    /// Redis/Valkey URL, `redis://host:port[/db]` or `rediss://…` (TLS),
    /// shared by every replica: a session is written there after every turn
    /// before the answer goes, resumed on any replica, handed off on a
    /// drain. A password may be in the URL or in `--session-store-password-file`.
    #[arg(long, env = "SE_SESSION_STORE", default_value = "memory")]
    pub session_store: String,

    /// A file holding the session store's password (AUTH), read at start
    /// and never logged.
    #[arg(long, env = "SE_SESSION_STORE_PASSWORD_FILE")]
    pub session_store_password_file: Option<PathBuf>,

    /// With a shared session store: how long a stream's hold on its session
    /// lasts without a refresh (refreshed every third of it). A replica that
    /// crashes leaves its sessions resumable elsewhere within this time.
    #[arg(long, env = "SE_SESSION_LEASE_SECONDS", default_value_t = 10.0, value_parser = parse_seconds)]
    pub session_lease_seconds: f64,

    /// With a shared session store: the longest one call to it may take; a
    /// store slower than that fails the turn (or the session's CREATE or
    /// RESUME) in-band with UNAVAILABLE, the conversation unchanged.
    #[arg(long, env = "SE_SESSION_STORE_TIMEOUT_SECONDS", default_value_t = 2.0, value_parser = parse_seconds)]
    pub session_store_timeout_seconds: f64,

    /// Most tokens in one turn (ChatML markers included); longer turns get an
    /// in-band RESOURCE_EXHAUSTED error.
    #[arg(long, env = "SE_MAX_TURN_TOKENS", default_value_t = DEFAULT_MAX_CONTEXT_TOKENS)]
    pub max_turn_tokens: usize,

    /// Largest gRPC message accepted or sent, in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "SE_MAX_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_message_bytes: usize,

    /// Tokens per model call when prefilling long turns (bounds the attention
    /// scratch memory of one call). Other streams' turns run between a long
    /// turn's chunks, so this also bounds how long they wait behind it.
    #[arg(long, env = "SE_PREFILL_CHUNK_TOKENS", default_value_t = DEFAULT_PREFILL_CHUNK_TOKENS)]
    pub prefill_chunk_tokens: usize,

    /// Turns that may wait for the model at once before senders wait too.
    #[arg(long, env = "SE_QUEUE_DEPTH", default_value_t = 256)]
    pub queue_depth: usize,

    /// Most turns of different streams that share one model call (1 turns
    /// batching off). Turns are batched only when they queue up behind a
    /// running call; nothing waits to fill a batch.
    #[arg(long, env = "SE_MAX_BATCH_TURNS", default_value_t = DEFAULT_MAX_BATCH_TURNS)]
    pub max_batch_turns: usize,

    /// Most padded token slots in one batched call (turns × (longest context +
    /// longest turn)): bounds the memory of one call. An Embed runs its texts
    /// in chunks of at most this many bytes (≥ their tokens).
    #[arg(long, env = "SE_MAX_BATCH_TOKENS", default_value_t = DEFAULT_MAX_BATCH_TOKENS)]
    pub max_batch_tokens: usize,

    /// Longest context (tokens) a turn may run on and still share a batched
    /// call; a turn on a longer one runs alone (past ~4,000 tokens, copying
    /// its cache in and out of the batch costs what sharing the call saves).
    #[arg(long, env = "SE_MAX_BATCH_PAST_TOKENS", default_value_t = DEFAULT_MAX_BATCH_PAST_TOKENS)]
    pub max_batch_past_tokens: usize,

    /// Contexts of at most this many tokens keep their KV rows in shared
    /// prefixes: conversations that begin with the same turns (a system
    /// prompt, examples) read one copy of them, and a turn another
    /// conversation with the same options already took on the same context
    /// is answered without a model call. 0 shares nothing.
    #[arg(long, env = "SE_SHARED_PREFIX_TOKENS", default_value_t = DEFAULT_SHARED_PREFIX_TOKENS)]
    pub shared_prefix_tokens: usize,

    /// Seconds open streams may go on after SIGINT/SIGTERM before they end
    /// with UNAVAILABLE; `inf` waits for every stream to end.
    #[arg(long, env = "SE_DRAIN_SECONDS", default_value_t = 10.0, value_parser = parse_seconds)]
    pub drain_seconds: f64,

    /// Seconds between the HTTP/2 keepalive pings the server sends on each
    /// connection; a peer that does not answer one within
    /// `--keepalive-timeout` (its host gone, a half-open connection) is
    /// dropped, its streams end and their caches are freed. 0 sends none.
    #[arg(long, env = "SE_KEEPALIVE_INTERVAL", default_value_t = 30.0, value_parser = parse_seconds)]
    pub keepalive_interval: f64,

    /// Seconds a keepalive ping may go unanswered.
    #[arg(long, env = "SE_KEEPALIVE_TIMEOUT", default_value_t = 10.0, value_parser = parse_seconds)]
    pub keepalive_timeout: f64,

    /// Most streams open at once on one HTTP/2 connection (advertised to
    /// the client; more are refused by HTTP/2 itself).
    #[arg(long, env = "SE_MAX_STREAMS_PER_CONNECTION", default_value_t = 4096)]
    pub max_streams_per_connection: u32,

    /// Largest HTTP/2 header list accepted, in bytes.
    #[arg(long, env = "SE_MAX_HEADER_LIST_BYTES", default_value_t = 16 << 10)]
    pub max_header_list_bytes: u32,

    /// Serve TLS with this certificate chain (PEM); needs `--tls-key`.
    #[arg(long, env = "SE_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// The TLS certificate's private key (PEM).
    #[arg(long, env = "SE_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "SE_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,

    /// Accept Embedder calls only with `authorization: Bearer <token>`
    /// metadata naming a token of this file (one per line; `#` comments;
    /// reloaded on SIGHUP). Health and reflection stay open.
    #[arg(long, env = "SE_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,

    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9464);
    /// off when unset.
    #[arg(long, env = "SE_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Log lines as `text` (for people) or `json` (one object per line, for
    /// collectors). Either way every stream's lines carry its stream id, and
    /// no text, token or vector is logged above debug level.
    #[arg(long, env = "SE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// The ONNX Runtime library (libonnxruntime.so*); by default ORT_DYLIB_PATH,
    /// then the project's .venv, then the system library path.
    #[arg(long, env = "SE_ONNXRUNTIME")]
    pub onnxruntime: Option<PathBuf>,
}

/// `serve`'s flags on their own, to parse a [`Config`] from arguments.
#[derive(Debug, Parser)]
#[command(name = "stateful-embedder serve")]
struct ServeArgs {
    #[command(flatten)]
    config: Config,
}

impl Config {
    /// The config `stateful-embedder serve ARGS…` runs with: the flags, then
    /// their environment variables, then the defaults. For running
    /// [`crate::server::run`] from a program of your own.
    ///
    /// # Errors
    /// clap's error for an unknown flag or a bad value.
    pub fn from_serve_args<I, T>(args: I) -> Result<Config, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let argv = std::iter::once("serve".into()).chain(args.into_iter().map(Into::into));
        Ok(ServeArgs::try_parse_from(argv)?.config)
    }

    /// The shared session store the flags ask for (`None`: `memory`).
    ///
    /// # Errors
    /// When the URL is not a Redis URL, the password file cannot be read,
    /// or shared sessions are asked for with resumable sessions off.
    pub fn session_store(&self) -> anyhow::Result<Option<std::sync::Arc<crate::service::RedisStore>>> {
        if self.session_store == "memory" {
            return Ok(None);
        }
        let Some(detached_ttl) = self.detached_ttl() else {
            anyhow::bail!(
                "--session-store {} needs resumable sessions: --detached-ttl-seconds is 0",
                "<url>"
            );
        };
        let password = match &self.session_store_password_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading --session-store-password-file {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        };
        let seconds = |s: f64, what: &str| {
            Duration::try_from_secs_f64(s)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| anyhow::anyhow!("{what} must be more than 0 seconds"))
        };
        crate::service::RedisStore::new(crate::service::StoreConfig {
            url: self.session_store.clone(),
            password,
            timeout: seconds(self.session_store_timeout_seconds, "--session-store-timeout-seconds")?,
            lease: seconds(self.session_lease_seconds, "--session-lease-seconds")?,
            detached_ttl,
        })
        .map(Some)
    }

    /// The limits the service applies.
    pub fn limits(&self) -> Limits {
        Limits {
            max_context_tokens: self.max_context_tokens,
            max_turn_tokens: self.max_turn_tokens,
            prefill_chunk_tokens: self.prefill_chunk_tokens,
            max_streams: self.max_streams,
            max_detached_sessions: self.max_detached_sessions,
            detached_ttl: self.detached_ttl(),
        }
    }

    /// How the engine batches turns.
    pub fn batch_limits(&self) -> BatchLimits {
        BatchLimits {
            max_turns: self.max_batch_turns.max(1),
            max_padded_tokens: self.max_batch_tokens,
            max_past_tokens: self.max_batch_past_tokens,
        }
    }

    /// The keepalive ping interval, if pings are on.
    pub fn keepalive(&self) -> Option<Duration> {
        (self.keepalive_interval > 0.0)
            .then(|| Duration::try_from_secs_f64(self.keepalive_interval).ok())
            .flatten()
    }

    /// How long a keepalive ping may go unanswered.
    pub fn keepalive_timeout(&self) -> Duration {
        Duration::try_from_secs_f64(self.keepalive_timeout).unwrap_or(Duration::from_secs(3600))
    }

    /// The idle age at which caches are evicted, if any.
    pub fn idle_evict(&self) -> Option<Duration> {
        (self.idle_evict_seconds > 0.0)
            .then(|| Duration::try_from_secs_f64(self.idle_evict_seconds).ok())
            .flatten()
    }

    /// How long a lost session is kept; `None` when resumable sessions are off.
    pub fn detached_ttl(&self) -> Option<Duration> {
        (self.detached_ttl_seconds > 0.0).then(|| {
            Duration::try_from_secs_f64(self.detached_ttl_seconds).unwrap_or(Duration::from_secs(u64::MAX / 4))
        })
    }

    /// The drain deadline; `None` (from `inf`, or more seconds than a
    /// `Duration` holds) waits for every stream.
    pub fn drain_timeout(&self) -> Option<Duration> {
        Duration::try_from_secs_f64(self.drain_seconds).ok()
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A byte count: a number with an optional unit (`bytesize`'s: KiB, MiB,
/// GiB or Ki, Mi, Gi are powers of 1024; K, M, G and KB, MB, GB powers of
/// 1000, as Kubernetes reads them), at least 1.
fn parse_bytes(s: &str) -> Result<u64, String> {
    let bytes = s
        .trim()
        .parse::<bytesize::ByteSize>()
        .map_err(|e| format!("{s:?} is not a byte count (e.g. 8GiB, 512MiB, 1000000): {e}"))?
        .as_u64();
    if bytes == 0 {
        return Err(format!("{s:?}: a byte count must be at least 1"));
    }
    Ok(bytes)
}

/// A number of seconds: zero or more, `inf` allowed; not NaN, not negative.
fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number of seconds: {e}"))?;
    if v.is_nan() || v < 0.0 {
        return Err(format!("{s:?}: seconds must be zero or more (or inf)"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `inf` means no deadline and never panics; negative and NaN are refused at parse time.
    #[test]
    fn drain_seconds_parse() {
        assert_eq!(parse_seconds("inf"), Ok(f64::INFINITY));
        assert_eq!(parse_seconds("2.5"), Ok(2.5));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("nan").is_err());
        assert!(parse_seconds("soon").is_err());
        let config = Config::from_serve_args(["--drain-seconds", "inf"]).unwrap();
        assert_eq!(config.drain_timeout(), None);
        let config = Config::from_serve_args(["--drain-seconds", "0.5"]).unwrap();
        assert_eq!(config.drain_timeout(), Some(Duration::from_millis(500)));
        assert!(Config::from_serve_args(["--drain-seconds", "-1"]).is_err());
    }

    /// Byte counts take binary and decimal units; nothing else.
    #[test]
    fn byte_counts_parse() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("4KiB"), Ok(4096));
        assert_eq!(parse_bytes("1.5MiB"), Ok(1_572_864));
        assert_eq!(parse_bytes("2Gi"), Ok(2 << 30));
        assert_eq!(parse_bytes("2G"), Ok(2_000_000_000));
        assert_eq!(parse_bytes("3GB"), Ok(3_000_000_000));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }

    /// `--max-sessions`, the old name of `--max-streams`, still works.
    #[test]
    fn the_old_stream_cap_flag_still_works() {
        let config = Config::from_serve_args(["--max-sessions", "7"]).unwrap();
        assert_eq!(config.max_streams, 7);
        assert_eq!(config.limits().max_streams, 7);
    }

    /// The command line's defaults are the library's.
    #[test]
    fn defaults_are_the_librarys() {
        let config = Config::from_serve_args(Vec::<String>::new()).unwrap();
        let options = crate::conversation::ConversationOptions::default();
        assert_eq!(config.max_context_tokens, options.max_context_tokens);
        assert_eq!(config.max_turn_tokens, options.max_turn_tokens);
        assert_eq!(config.prefill_chunk_tokens, options.prefill_chunk_tokens);
        assert_eq!(config.batch_limits(), BatchLimits::default());
    }

    /// `memory` is the default and needs no store; a URL of another scheme,
    /// or shared sessions with sessions off, refuse to start, and no error
    /// shows the URL's password.
    #[tokio::test]
    async fn session_store_flags_are_checked() {
        let store = |args: &[&str]| Config::from_serve_args(args.iter().copied()).unwrap().session_store();
        assert!(store(&[]).unwrap().is_none(), "memory by default");
        assert!(store(&["--session-store", "redis://127.0.0.1:1/0"]).unwrap().is_some());
        assert!(
            store(&["--session-store", "rediss://user:pw@host:6380"])
                .unwrap()
                .is_some()
        );
        for args in [
            &["--session-store", "http://user:s3cret-pw@host:6379"][..],
            &[
                "--session-store",
                "redis://user:s3cret-pw@host:6379",
                "--detached-ttl-seconds",
                "0",
            ],
            &["--session-store", "redis://h", "--session-lease-seconds", "0"],
        ] {
            let e = store(args).unwrap_err().to_string();
            assert!(!e.contains("s3cret"), "{e}");
            assert!(e.contains("--session") || e.contains("--detached"), "{e}");
        }
    }
}
