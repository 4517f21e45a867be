//! The shared session store (`--session-store redis://…` or `rediss://…`):
//! resumable sessions in Redis or Valkey, so that any replica can resume
//! them, a draining replica can hand them off, and a crashed one loses none.
//!
//! # What is kept
//! Per session, two keys with the id as a hash tag (so that a cluster keeps
//! them together): `se:{ID}:state`, a hash of `meta` (JSON: the format
//! version, the resolved options, the model's name, the turn count, the
//! context's length, a SHA-256 of the bearer token that created it (never
//! the token), timestamps) and `tokens` (the context's token ids exactly as
//! the conversation holds them after slides and resets, 4 little-endian
//! bytes each); and `se:{ID}:lease`, the id of the stream that holds it.
//! The KV cache never leaves the process: it is rebuilt by recomputation.
//!
//! # One holder at a time
//! A stream holds a session by its lease (`SET NX PX`), refreshed every
//! third of `--session-lease-seconds` while the stream lives; every write
//! checks the lease in the same script, so a replica whose lease lapsed
//! cannot overwrite a session another replica took. A crashed replica's
//! lease expires within the lease time, after which any replica may resume
//! the session. The state expires `--detached-ttl-seconds` after its last
//! holder let it go (or after its lease lapsed).
//!
//! # Failures
//! Every call is bounded by `--session-store-timeout-seconds`; a store that
//! is unreachable, slow or answering errors is [`StoreError::Unavailable`]
//! (UNAVAILABLE to the client, retryable), never a crash. The connection is
//! made lazily and remade after any failure.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use redis::{Script, aio::ConnectionManager};
use serde::{Deserialize, Serialize};

use crate::conversation::ConversationOptions;

/// The format of a session's `meta` this server writes and reads.
pub const FORMAT: u32 = 1;

/// Why a store call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store did not answer in time, or answered an error.
    #[error("the session store is unavailable ({0})")]
    Unavailable(String),
    /// CREATE of an id that exists.
    #[error("the session exists")]
    Exists,
    /// RESUME of an id the store does not hold.
    #[error("no such session")]
    Missing,
    /// RESUME of a session whose lease another stream holds.
    #[error("the session is held by another stream")]
    Held,
    /// The lease of the stream that writes lapsed and another stream took
    /// the session (or it expired).
    #[error("this stream's lease on the session lapsed")]
    LeaseLost,
    /// What the store holds is not a session this server can read.
    #[error("the stored session is unreadable: {0}")]
    Corrupt(String),
}

/// A session as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// [`FORMAT`] when written by this server.
    pub version: u32,
    /// The conversation's options, resolved.
    pub options: ConversationOptions,
    /// The model it runs on (a session of another model is not resumed).
    pub model: String,
    /// Turns the conversation has taken.
    pub turns: u64,
    /// Tokens in the context (the length of the stored token ids).
    pub context_tokens: usize,
    /// Hex SHA-256 of the bearer token that created it; none without tokens.
    pub owner: Option<String>,
    /// When it was created and last written, in milliseconds since the epoch.
    pub created_ms: u64,
    pub updated_ms: u64,
}

/// A session's meta, its context's token ids, and the answer to its last
/// turn (an encoded `embedder.v1.Embedding`; empty before the first turn).
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub meta: Meta,
    pub tokens: Vec<u32>,
    pub last: Vec<u8>,
}

impl Stored {
    fn encode(&self) -> (String, Vec<u8>) {
        let meta = serde_json::to_string(&self.meta).expect("a session's meta serialises");
        let tokens = self.tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        (meta, tokens)
    }

    /// Reads a stored session, or says what is wrong with it.
    fn decode(meta: &[u8], tokens: &[u8], last: &[u8]) -> Result<Stored, StoreError> {
        let value: serde_json::Value =
            serde_json::from_slice(meta).map_err(|e| StoreError::Corrupt(format!("meta is not JSON: {e}")))?;
        let version = value.get("version").and_then(serde_json::Value::as_u64);
        match version {
            Some(v) if v == u64::from(FORMAT) => {}
            Some(v) if v > u64::from(FORMAT) => {
                return Err(StoreError::Corrupt(format!(
                    "format {v} is newer than this server's {FORMAT}: upgrade the server"
                )));
            }
            other => return Err(StoreError::Corrupt(format!("format {other:?} is not {FORMAT}"))),
        }
        let meta: Meta =
            serde_json::from_value(value).map_err(|e| StoreError::Corrupt(format!("meta is not a session's: {e}")))?;
        if !tokens.len().is_multiple_of(4) || tokens.len() / 4 != meta.context_tokens {
            return Err(StoreError::Corrupt(format!(
                "{} bytes of token ids for a context of {} tokens",
                tokens.len(),
                meta.context_tokens
            )));
        }
        let tokens = tokens
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        Ok(Stored {
            meta,
            tokens,
            last: last.to_vec(),
        })
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Where the store is and how long it may take.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `redis://[user[:password]@]host:port[/db]` or `rediss://…` (TLS).
    pub url: String,
    /// The password, when not in the URL (read from a file, never logged).
    pub password: Option<String>,
    /// The longest one call may take.
    pub timeout: Duration,
    /// How long a holder's lease lasts without a refresh.
    pub lease: Duration,
    /// How long a detached session is kept.
    pub detached_ttl: Duration,
}

/// The shared store (see the module docs). Share it with `Arc`.
pub struct RedisStore {
    connection: ConnectionManager,
    config: StoreConfig,
    /// Whether the last call succeeded.
    up: AtomicBool,
    /// Calls that failed (unavailable), since start.
    errors: AtomicU64,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never shown.
        f.debug_struct("RedisStore")
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// `se:{ID}:state` and `se:{ID}:lease`.
fn keys(id: &str) -> (String, String) {
    (format!("se:{{{id}}}:state"), format!("se:{{{id}}}:lease"))
}

// The scripts: each one call, atomic. KEYS[1] the state, KEYS[2] the lease.

/// CREATE: fails if the state exists or the lease is held; else takes the
/// lease and writes the state. ARGV: holder, lease ms, state expiry ms, meta,
/// tokens, last answer.
const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 'exists' end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return 'held' end
redis.call('HSET', KEYS[1], 'meta', ARGV[4], 'tokens', ARGV[5], 'last', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 'ok'
";

/// RESUME: takes the lease of an existing state and returns it.
/// ARGV: holder, lease ms, state expiry ms.
const RESUME: &str = r"
local kind = redis.call('TYPE', KEYS[1]).ok
if kind == 'none' then return {'missing'} end
if kind ~= 'hash' then return {'foreign', kind} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'held'} end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local state = redis.call('HMGET', KEYS[1], 'meta', 'tokens', 'last')
return {'ok', state[1] or '', state[2] or '', state[3] or ''}
";

/// WRITE: the holder's new state, only while it holds the lease (which the
/// write renews). ARGV: holder, lease ms, state expiry ms, meta, tokens, last.
const WRITE: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'meta', ARGV[4], 'tokens', ARGV[5], 'last', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return 1
";

/// REFRESH: renews the holder's lease and the state's expiry.
/// ARGV: holder, lease ms, state expiry ms.
const REFRESH: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// LET GO: the holder releases its lease; the state expires after the TTL
/// (ARGV[2] > 0) or is deleted (ARGV[2] = 0). ARGV: holder, state expiry ms.
const LET_GO: &str = r"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
if tonumber(ARGV[2]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) else redis.call('DEL', KEYS[1]) end
return 1
";

/// The scripts, hashed once (EVALSHA, loaded on the first NOSCRIPT).
struct Scripts {
    create: Script,
    resume: Script,
    write: Script,
    refresh: Script,
    let_go: Script,
}

static SCRIPTS: std::sync::LazyLock<Scripts> = std::sync::LazyLock::new(|| Scripts {
    create: Script::new(CREATE),
    resume: Script::new(RESUME),
    write: Script::new(WRITE),
    refresh: Script::new(REFRESH),
    let_go: Script::new(LET_GO),
});

impl RedisStore {
    /// A store at `config.url`, connected lazily (the server starts whether
    /// or not the store is up).
    ///
    /// # Errors
    /// When the URL is not a Redis URL.
    pub fn new(config: StoreConfig) -> anyhow::Result<Arc<RedisStore>> {
        let mut info: redis::ConnectionInfo = redis::IntoConnectionInfo::into_connection_info(config.url.as_str())
            .map_err(|e| anyhow::anyhow!("--session-store is not a redis:// or rediss:// URL: {:?}", e.kind()))?;
        if let Some(password) = &config.password {
            let redis_info = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(redis_info);
        }
        let client = redis::Client::open(info).map_err(|e| anyhow::anyhow!("the session store: {:?}", e.kind()))?;
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1);
        let connection = ConnectionManager::new_lazy_with_config(client, manager)
            .map_err(|e| anyhow::anyhow!("the session store: {:?}", e.kind()))?;
        Ok(Arc::new(RedisStore {
            connection,
            config,
            up: AtomicBool::new(true),
            errors: AtomicU64::new(0),
        }))
    }

    /// Whether the last call reached the store.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Calls that failed since start.
    pub fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// How long a lease lasts without a refresh.
    pub fn lease(&self) -> Duration {
        self.config.lease
    }

    fn ms(d: Duration) -> u64 {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    }

    /// The state's expiry while held: the lease and then the TTL, so that a
    /// session whose holder crashed is kept the TTL after its lease lapsed.
    fn held_expiry(&self) -> u64 {
        Self::ms(self.config.lease + self.config.detached_ttl)
    }

    /// Runs `script` within the timeout, counting failures.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        id: &str,
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let (state, lease) = keys(id);
        let mut invocation = script.prepare_invoke();
        invocation.key(state).key(lease);
        for a in args {
            invocation.arg(*a);
        }
        let mut connection = self.connection.clone();
        let result = tokio::time::timeout(self.config.timeout, invocation.invoke_async::<T>(&mut connection)).await;
        let outcome = match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(StoreError::Unavailable(format!("{:?}", e.kind()))),
            Err(_) => Err(StoreError::Unavailable(format!(
                "no answer within {:?}",
                self.config.timeout
            ))),
        };
        self.up.store(outcome.is_ok(), Ordering::Relaxed);
        if let Err(e) = &outcome {
            self.errors.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("se_session_store_errors_total").increment(1);
            tracing::warn!(error = %e, "session store call failed");
        }
        outcome
    }

    /// Runs `script` (CREATE or WRITE) with `holder`, the lease and expiry
    /// times, and `stored` encoded: the arguments both scripts take.
    async fn invoke_with_state<T: redis::FromRedisValue>(
        &self,
        script: &Script,
        id: &str,
        holder: &str,
        stored: &Stored,
    ) -> Result<T, StoreError> {
        let (meta, tokens) = stored.encode();
        let (lease, expiry) = (Self::ms(self.config.lease).to_string(), self.held_expiry().to_string());
        let args = [
            holder.as_bytes(),
            lease.as_bytes(),
            expiry.as_bytes(),
            meta.as_bytes(),
            &tokens,
            &stored.last,
        ];
        self.invoke(script, id, &args).await
    }

    /// Creates session `id`, held by `holder`.
    ///
    /// # Errors
    /// [`StoreError::Exists`], [`StoreError::Unavailable`].
    pub async fn create(&self, id: &str, holder: &str, stored: &Stored) -> Result<(), StoreError> {
        let answer: String = self.invoke_with_state(&SCRIPTS.create, id, holder, stored).await?;
        match answer.as_str() {
            "ok" => Ok(()),
            "exists" | "held" => Err(StoreError::Exists),
            other => Err(StoreError::Unavailable(format!("unexpected answer {other:?}"))),
        }
    }

    /// Takes session `id` for `holder` and reads it.
    ///
    /// # Errors
    /// [`StoreError::Missing`], [`StoreError::Held`], [`StoreError::Corrupt`]
    /// (the lease is let go then), [`StoreError::Unavailable`].
    pub async fn resume(&self, id: &str, holder: &str) -> Result<Stored, StoreError> {
        let (lease, expiry) = (Self::ms(self.config.lease).to_string(), self.held_expiry().to_string());
        let args = [holder.as_bytes(), lease.as_bytes(), expiry.as_bytes()];
        let answer: Vec<Vec<u8>> = self.invoke(&SCRIPTS.resume, id, &args).await?;
        match answer.first().map(Vec::as_slice) {
            Some(b"ok") if answer.len() == 4 => match Stored::decode(&answer[1], &answer[2], &answer[3]) {
                Ok(stored) => Ok(stored),
                Err(e) => {
                    // Keep it for whoever can read it (a newer server).
                    let _ = self.let_go(id, holder, true).await;
                    Err(e)
                }
            },
            Some(b"missing") => Err(StoreError::Missing),
            Some(b"held") => Err(StoreError::Held),
            Some(b"foreign") => Err(StoreError::Corrupt(format!(
                "its key holds a {}, not a session",
                String::from_utf8_lossy(answer.get(1).map_or(&[][..], Vec::as_slice))
            ))),
            _ => Err(StoreError::Unavailable("unexpected answer to RESUME".to_string())),
        }
    }

    /// Writes `holder`'s new state of session `id`.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`], [`StoreError::Unavailable`].
    pub async fn write(&self, id: &str, holder: &str, stored: &Stored) -> Result<(), StoreError> {
        let written: i64 = self.invoke_with_state(&SCRIPTS.write, id, holder, stored).await?;
        if written == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    /// Renews `holder`'s lease on session `id`.
    ///
    /// # Errors
    /// [`StoreError::LeaseLost`], [`StoreError::Unavailable`].
    pub async fn refresh(&self, id: &str, holder: &str) -> Result<(), StoreError> {
        let (lease, expiry) = (Self::ms(self.config.lease).to_string(), self.held_expiry().to_string());
        let args = [holder.as_bytes(), lease.as_bytes(), expiry.as_bytes()];
        let renewed: i64 = self.invoke(&SCRIPTS.refresh, id, &args).await?;
        if renewed == 1 {
            Ok(())
        } else {
            Err(StoreError::LeaseLost)
        }
    }

    /// Lets session `id` go: kept for the TTL (`keep`, a lost stream) or
    /// deleted (a half-close that ended it).
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] (the lease then lapses on its own).
    pub async fn let_go(&self, id: &str, holder: &str, keep: bool) -> Result<(), StoreError> {
        let expiry = if keep { Self::ms(self.config.detached_ttl) } else { 0 }.to_string();
        let args = [holder.as_bytes(), expiry.as_bytes()];
        let _: i64 = self.invoke(&SCRIPTS.let_go, id, &args).await?;
        Ok(())
    }
}

/// The hex SHA-256 of a bearer token: what a session keeps of its creator.
pub fn owner_hash(token: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token).iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(tokens: Vec<u32>) -> Stored {
        Stored {
            meta: Meta {
                version: FORMAT,
                options: ConversationOptions::default(),
                model: "m".into(),
                turns: 2,
                context_tokens: tokens.len(),
                owner: Some(owner_hash(b"token")),
                created_ms: 1,
                updated_ms: 2,
            },
            tokens,
            last: vec![1, 2, 3],
        }
    }

    /// A session round-trips; a truncated token list, a foreign value and a
    /// newer format are each a clear error.
    #[test]
    fn stored_sessions_round_trip_and_bad_ones_are_refused() {
        let s = stored(vec![1, 2, 151_644, u32::MAX]);
        let (meta, tokens) = s.encode();
        assert_eq!(Stored::decode(meta.as_bytes(), &tokens, &s.last).unwrap(), s);
        let truncated = Stored::decode(meta.as_bytes(), &tokens[..tokens.len() - 2], b"").unwrap_err();
        assert!(truncated.to_string().contains("bytes of token ids"), "{truncated}");
        let foreign = Stored::decode(br#"{"version": 1, "hello": "world"}"#, b"", b"").unwrap_err();
        assert!(foreign.to_string().contains("not a session's"), "{foreign}");
        let newer = meta.replace("\"version\":1", "\"version\":2");
        let future = Stored::decode(newer.as_bytes(), &tokens, b"").unwrap_err();
        assert!(future.to_string().contains("newer"), "{future}");
        assert!(Stored::decode(b"not json", b"", b"").is_err());
        assert!(!meta.contains("token\""), "the token itself is never stored: {meta}");
    }
}
