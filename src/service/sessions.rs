//! Resumable sessions: conversations that outlive a lost stream.
//!
//! A stream that asks for `SESSION_MODE_CREATE` registers its conversation's
//! [`Slot`] here under an id, held by that stream. When the stream ends by
//! the client's half-close, the session ends with it; when it ends any other
//! way (the client vanished or cancelled, the connection dropped), the
//! session is *detached*: the slot stays here for the TTL, its cache as
//! evictable as any resting conversation's, and a new stream may take it
//! with `SESSION_MODE_RESUME`. After the TTL a detached session is removed
//! and its conversation freed.
//!
//! With a shared store (`--session-store redis://…`, [`RedisStore`]) the
//! store is the truth: a session is created there, held there by a lease,
//! written there after every turn and reset before the answer goes, and
//! resumed from there on any replica (its cache rebuilt by recomputation,
//! or this replica's own detached copy reused when it is the same). The
//! table here then holds the sessions this replica's streams hold, and its
//! detached copies.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::{CancellationToken, DropGuard};

use prost::Message;

use super::{
    auth::Principal,
    convert::{embedding, output},
    error::ServiceError,
    store::{Meta, RedisStore, StoreError, Stored, now_ms},
};
use crate::{
    conversation::{Conversation, ConversationOptions},
    engine::{Engine, Slot},
    pb,
};

/// The longest id a client may choose.
pub const MAX_SESSION_ID_LEN: usize = 128;

/// The session table. Share it with `Arc`.
#[derive(Debug)]
pub struct Sessions {
    table: Mutex<HashMap<String, Entry>>,
    /// How long a detached session is kept; `None`: sessions are off.
    ttl: Option<Duration>,
    /// Most detached sessions kept at once (past it, a lost session is freed).
    max_detached: usize,
    /// The shared store; `None`: sessions live in this process only.
    store: Option<Arc<RedisStore>>,
}

#[derive(Debug)]
struct Entry {
    slot: Arc<Slot>,
    /// The stream that holds it; `None` while detached.
    holder: Option<u64>,
    /// Bumped at every detach, so that a stale expiry leaves a newer one alone.
    generation: u64,
    /// The token that created it (with `--auth-token-file`): only it may resume.
    owner: Option<Principal>,
    /// With a shared store: the holding stream's lease, while held.
    lease: Option<Lease>,
}

/// A stream's hold on a session in the shared store.
#[derive(Debug)]
struct Lease {
    /// The holder id the store knows (random, one per attachment).
    holder: String,
    /// What does not change between writes.
    meta: Meta,
    /// Stops the lease's refresher when dropped.
    _refresher: DropGuard,
}

impl Sessions {
    /// A table keeping detached sessions for `ttl` (none: sessions off), at
    /// most `max_detached` at once, in `store` when one is given.
    pub fn new(ttl: Option<Duration>, max_detached: usize, store: Option<Arc<RedisStore>>) -> Arc<Sessions> {
        Arc::new(Sessions {
            table: Mutex::new(HashMap::new()),
            ttl,
            max_detached,
            store,
        })
    }

    /// The shared store, if sessions live in one.
    pub fn store(&self) -> Option<&Arc<RedisStore>> {
        self.store.as_ref()
    }

    /// Takes a lease for `id` in the store: keeps it refreshed until dropped.
    fn lease(store: &Arc<RedisStore>, id: &str, holder: String, meta: Meta) -> Lease {
        let stop = CancellationToken::new();
        let (store, id, who, token) = (store.clone(), id.to_string(), holder.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(store.lease() / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    () = token.cancelled() => return,
                    _ = tick.tick() => {}
                }
                match store.refresh(&id, &who).await {
                    Ok(()) | Err(StoreError::Unavailable(_)) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "a session's lease could not be kept");
                        return;
                    }
                }
            }
        });
        Lease {
            holder,
            meta,
            _refresher: stop.drop_guard(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.table.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The TTL of a detached session; `None` when sessions are off.
    pub fn ttl(&self) -> Option<Duration> {
        self.ttl
    }

    /// Registers a new session held by `stream`: under `id` if given (checked),
    /// else under a fresh random id. Returns the id.
    ///
    /// # Errors
    /// [`ServiceError::SessionsOff`], [`ServiceError::BadSessionId`],
    /// [`ServiceError::SessionExists`].
    pub async fn create(
        &self,
        id: &str,
        slot: Arc<Slot>,
        stream: u64,
        owner: Option<Principal>,
    ) -> Result<String, ServiceError> {
        if self.ttl.is_none() {
            return Err(ServiceError::SessionsOff);
        }
        // A session's client may lose a turn's answer with its stream: the
        // conversation keeps it, for the resume.
        slot.with(|c| c.remember_last(None));
        let id = if id.is_empty() {
            random_id()
        } else {
            check_id(id)?;
            id.to_string()
        };
        if self.table().contains_key(&id) {
            return Err(ServiceError::SessionExists { id });
        }
        let lease = match &self.store {
            None => None,
            Some(store) => {
                let (options, model) = slot
                    .with(|c| (c.options().clone(), c.model().spec().name.clone()))
                    .expect("a new session's conversation rests in its slot");
                let now = now_ms();
                let stored = Stored {
                    meta: Meta {
                        version: super::store::FORMAT,
                        options,
                        model,
                        turns: 0,
                        context_tokens: 0,
                        owner: owner.as_ref().map(Principal::fingerprint),
                        created_ms: now,
                        updated_ms: now,
                    },
                    tokens: Vec::new(),
                    last: Vec::new(),
                };
                let holder = random_id();
                store
                    .create(&id, &holder, &stored)
                    .await
                    .map_err(|e| store_error(&id, e))?;
                Some(Self::lease(store, &id, holder, stored.meta))
            }
        };
        let mut table = self.table();
        if table.contains_key(&id) {
            // Raced with another stream of this replica for the same id.
            return Err(ServiceError::SessionExists { id });
        }
        table.insert(
            id.clone(),
            Entry {
                slot,
                holder: Some(stream),
                generation: 0,
                owner,
                lease,
            },
        );
        Ok(id)
    }

    /// Hands the detached session `id` to `stream`, if `who` created it.
    /// From a shared store, the session's conversation is made again from
    /// its token ids (its cache rebuilt at its next turn, under `defaults`'
    /// server limits), unless this replica's own detached copy is the same.
    ///
    /// # Errors
    /// [`ServiceError::BadSessionId`], [`ServiceError::SessionNotFound`]
    /// (also for another principal's session: its existence is not told),
    /// [`ServiceError::SessionHeld`]; from a store also
    /// [`ServiceError::StoreUnavailable`] and [`ServiceError::SessionCorrupt`].
    pub async fn resume(
        &self,
        id: &str,
        stream: u64,
        who: Option<&Principal>,
        engine: &Engine,
        defaults: &ConversationOptions,
    ) -> Result<Arc<Slot>, ServiceError> {
        check_id(id)?;
        let Some(store) = &self.store else {
            let mut table = self.table();
            let entry = table
                .get_mut(id)
                .filter(|e| e.owner.as_ref() == who)
                .ok_or_else(|| ServiceError::SessionNotFound { id: id.to_string() })?;
            if entry.holder.is_some() {
                return Err(ServiceError::SessionHeld { id: id.to_string() });
            }
            entry.holder = Some(stream);
            return Ok(entry.slot.clone());
        };
        if self.table().get(id).is_some_and(|e| e.holder.is_some()) {
            return Err(ServiceError::SessionHeld { id: id.to_string() });
        }
        let holder = random_id();
        let stored = store.resume(id, &holder).await.map_err(|e| store_error(id, e))?;
        let model = engine.model();
        let refuse = |error: ServiceError| {
            let (store, id, holder) = (store.clone(), id.to_string(), holder.clone());
            tokio::spawn(async move { store.let_go(&id, &holder, true).await });
            Err(error)
        };
        if stored.meta.owner != who.map(Principal::fingerprint) {
            // Another principal's session: its existence is not told.
            return refuse(ServiceError::SessionNotFound { id: id.to_string() });
        }
        if stored.meta.model != model.spec().name {
            return refuse(ServiceError::SessionCorrupt {
                id: id.to_string(),
                reason: format!("a session of model {:?}, not of this server's", stored.meta.model),
            });
        }
        // This replica's own detached copy, if it is the stored state (the
        // lost stream's last turn may still be in the engine: wait for it).
        let local = self
            .table()
            .get(id)
            .filter(|e| e.holder.is_none())
            .map(|e| e.slot.clone());
        let mut warm = None;
        if let Some(slot) = local {
            slot.rested().await;
            let same = slot.with(|c| c.turns() == stored.meta.turns && c.tokens() == stored.tokens.as_slice());
            if same == Some(true) {
                warm = Some(slot);
            }
        }
        let slot = match warm {
            Some(slot) => slot,
            None => {
                // The session's own options, under this server's limits.
                let options = ConversationOptions {
                    max_turn_tokens: defaults.max_turn_tokens,
                    prefill_chunk_tokens: defaults.prefill_chunk_tokens,
                    ..stored.meta.options.clone()
                };
                match Conversation::restored(model, options, stored.tokens, stored.meta.turns) {
                    Ok(mut conversation) => {
                        let last = (!stored.last.is_empty())
                            .then(|| pb::Embedding::decode(stored.last.as_slice()).ok().map(output))
                            .flatten();
                        conversation.remember_last(last);
                        engine.budget().slot(conversation)
                    }
                    Err(e) => {
                        return refuse(ServiceError::SessionCorrupt {
                            id: id.to_string(),
                            reason: e.to_string(),
                        });
                    }
                }
            }
        };
        let lease = Self::lease(store, id, holder, stored.meta);
        self.table().insert(
            id.to_string(),
            Entry {
                slot: slot.clone(),
                holder: Some(stream),
                generation: 0,
                owner: who.cloned(),
                lease: Some(lease),
            },
        );
        Ok(slot)
    }

    /// With a shared store, writes the session `id` held by `stream` as its
    /// conversation stands (after a turn or a reset, before the answer goes).
    /// Without one, nothing.
    ///
    /// # Errors
    /// [`ServiceError::StoreUnavailable`], [`ServiceError::SessionLost`].
    pub async fn persist(&self, id: &str, stream: u64) -> Result<(), ServiceError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let found = {
            let table = self.table();
            table.get(id).filter(|e| e.holder == Some(stream)).and_then(|e| {
                let lease = e.lease.as_ref()?;
                let (tokens, turns, last) = e.slot.with(|c| {
                    let last = c.last_output().map(|o| embedding(o.clone()).encode_to_vec());
                    (c.tokens().to_vec(), c.turns(), last.unwrap_or_default())
                })?;
                let meta = Meta {
                    turns,
                    context_tokens: tokens.len(),
                    updated_ms: now_ms(),
                    ..lease.meta.clone()
                };
                Some((lease.holder.clone(), Stored { meta, tokens, last }))
            })
        };
        let Some((holder, stored)) = found else {
            return Err(ServiceError::SessionLost { id: id.to_string() });
        };
        store.write(id, &holder, &stored).await.map_err(|e| store_error(id, e))
    }

    /// Ends the session `id` held by `stream` for good (a half-close).
    pub fn end(&self, id: &str, stream: u64) {
        let mut table = self.table();
        if table.get(id).is_some_and(|e| e.holder == Some(stream))
            && let Some(entry) = table.remove(id)
        {
            self.let_go(id, entry.lease, false);
        }
    }

    /// Releases a lease in the store (in the background): the state kept for
    /// the TTL (`keep`) or deleted.
    fn let_go(&self, id: &str, lease: Option<Lease>, keep: bool) {
        if let (Some(store), Some(lease)) = (&self.store, lease) {
            let (store, id) = (store.clone(), id.to_string());
            tokio::spawn(async move {
                if let Err(e) = store.let_go(&id, &lease.holder, keep).await {
                    tracing::warn!(error = %e, "a session's lease was not released; it lapses on its own");
                }
            });
        }
    }

    /// Detaches the session `id` held by `stream` (its stream was lost): kept
    /// for the TTL, then freed, unless a stream resumes it first.
    pub fn detach(self: &Arc<Self>, id: &str, stream: u64) {
        let lease = self.detach_here(id, stream);
        self.let_go(id, lease, true);
    }

    /// Detaches the shared session `id` held by `stream` on a drain, and
    /// returns once the store has its lease back: the client told to resume
    /// elsewhere finds it free.
    pub async fn hand_off(self: &Arc<Self>, id: &str, stream: u64) {
        if let (Some(store), Some(lease)) = (&self.store, self.detach_here(id, stream))
            && let Err(e) = store.let_go(id, &lease.holder, true).await
        {
            tracing::warn!(error = %e, "a handed-off session's lease was not released; it lapses on its own");
        }
    }

    /// Detaches the session here (see [`Sessions::detach`]); returns its
    /// lease in the store, for the caller to let go.
    fn detach_here(self: &Arc<Self>, id: &str, stream: u64) -> Option<Lease> {
        let ttl = self.ttl?;
        let mut table = self.table();
        let detached = table.values().filter(|e| e.holder.is_none()).count();
        let entry = table.get_mut(id).filter(|e| e.holder == Some(stream))?;
        let lease = entry.lease.take();
        if detached >= self.max_detached {
            tracing::warn!(
                max = self.max_detached,
                "too many detached sessions: this lost session is freed, not kept"
            );
            table.remove(id);
            return lease;
        }
        entry.holder = None;
        entry.generation += 1;
        let generation = entry.generation;
        drop(table);
        let (sessions, id) = (self.clone(), id.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(ttl).await;
            let mut table = sessions.table();
            if table
                .get(&id)
                .is_some_and(|e| e.holder.is_none() && e.generation == generation)
            {
                table.remove(&id);
                tracing::info!("a detached session's TTL passed; freed");
            }
        });
        lease
    }

    /// Whether session `id` is here, and which stream holds it (`None`: detached).
    #[cfg(test)]
    fn holder(&self, id: &str) -> Option<Option<u64>> {
        self.table().get(id).map(|e| e.holder)
    }

    /// Detached sessions now.
    pub fn detached(&self) -> usize {
        self.table().values().filter(|e| e.holder.is_none()).count()
    }
}

/// What a half-close does to a resumable session, decided when the stream's
/// responses end: [`OnHalfClose::delivered`] ends it (every response went
/// out), dropping it first detaches it (the responses were cut short).
/// Unarmed (no half-close, or no session), it does nothing.
#[derive(Debug)]
pub struct OnHalfClose {
    sessions: Arc<Sessions>,
    stream: u64,
    state: Arc<Mutex<HalfClose>>,
}

#[derive(Debug, Default)]
struct HalfClose {
    /// The session to end once the responses are out (set on a half-close).
    armed: Option<String>,
    /// The responses were dropped (sent or not): too late to arm.
    gone: bool,
}

/// The stream task's side of an [`OnHalfClose`]: arms it on a half-close.
#[derive(Debug, Clone)]
pub struct HalfCloseArm(Arc<Mutex<HalfClose>>);

impl HalfCloseArm {
    /// The session `id` ends when the stream's responses have all gone out.
    /// Returns false when the responses were dropped already (a reset that
    /// came with the half-close): then the caller detaches the session.
    pub fn arm(&self, id: &str) -> bool {
        let mut state = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if state.gone {
            return false;
        }
        state.armed = Some(id.to_string());
        true
    }
}

impl OnHalfClose {
    /// An unarmed guard for `stream`'s sessions, and its arm.
    pub fn new(sessions: Arc<Sessions>, stream: u64) -> (OnHalfClose, HalfCloseArm) {
        let state = Arc::new(Mutex::new(HalfClose::default()));
        (
            OnHalfClose {
                sessions,
                stream,
                state: state.clone(),
            },
            HalfCloseArm(state),
        )
    }

    fn state(&self) -> std::sync::MutexGuard<'_, HalfClose> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every response went out: an armed session ends for good.
    pub fn delivered(&self) {
        let armed = self.state().armed.take();
        if let Some(id) = armed {
            self.sessions.end(&id, self.stream);
        }
    }
}

impl Drop for OnHalfClose {
    fn drop(&mut self) {
        let armed = {
            let mut state = self.state();
            state.gone = true;
            state.armed.take()
        };
        if let Some(id) = armed {
            tracing::debug!("a half-closed stream's responses were cut short: its session is kept");
            self.sessions.detach(&id, self.stream);
        }
    }
}

/// A store failure as the client reads it.
fn store_error(id: &str, e: StoreError) -> ServiceError {
    let id = id.to_string();
    match e {
        StoreError::Unavailable(reason) => ServiceError::StoreUnavailable { reason },
        StoreError::Exists => ServiceError::SessionExists { id },
        StoreError::Missing => ServiceError::SessionNotFound { id },
        StoreError::Held => ServiceError::SessionHeld { id },
        StoreError::LeaseLost => ServiceError::SessionLost { id },
        StoreError::Corrupt(reason) => ServiceError::SessionCorrupt { id, reason },
    }
}

/// 128 random bits from the OS, as 32 hex digits.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS gives random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check_id(id: &str) -> Result<(), ServiceError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_SESSION_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    if ok { Ok(()) } else { Err(ServiceError::BadSessionId) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{conversation::Conversation, engine::KvBudget, model::Model};

    /// A session table with one session `id` held by stream 1.
    async fn held(id: &str) -> Arc<Sessions> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny");
        let model = Model::open(dir, &Default::default()).expect("the tiny model (make models)");
        let conversation = Conversation::new(&model, Default::default()).unwrap();
        let sessions = Sessions::new(Some(Duration::from_secs(60)), 8, None);
        let slot = KvBudget::new(model, u64::MAX).slot(conversation);
        sessions.create(id, slot, 1, None).await.unwrap();
        sessions
    }

    /// A half-close ends the session only once every response went out; a
    /// stream whose responses are dropped first (a reset with the
    /// half-close, as grpcio sends them) keeps it, detached, whichever of
    /// the two the server sees first.
    #[tokio::test]
    async fn a_half_close_ends_a_session_only_once_its_responses_are_out() {
        // Armed, then every response out: ended.
        let sessions = held("a").await;
        let (guard, arm) = OnHalfClose::new(sessions.clone(), 1);
        assert!(arm.arm("a"));
        guard.delivered();
        drop(guard);
        assert_eq!(sessions.holder("a"), None, "ended");

        // Armed, then the responses dropped unsent: detached, resumable.
        let sessions = held("b").await;
        let (guard, arm) = OnHalfClose::new(sessions.clone(), 1);
        assert!(arm.arm("b"));
        drop(guard);
        assert_eq!(sessions.detached(), 1);
        assert_eq!(sessions.holder("b"), Some(None), "kept, detached");

        // The responses dropped before the half-close is seen: too late to
        // arm; the stream's task detaches it itself.
        let sessions = held("c").await;
        let (guard, arm) = OnHalfClose::new(sessions.clone(), 1);
        drop(guard);
        assert!(!arm.arm("c"), "the responses were gone already");
        assert_eq!(sessions.detached(), 0, "nothing done until the task decides");

        // Unarmed (no half-close): the responses ending changes nothing.
        let sessions = held("d").await;
        let (guard, _arm) = OnHalfClose::new(sessions.clone(), 1);
        guard.delivered();
        drop(guard);
        assert_eq!(sessions.holder("d"), Some(Some(1)), "still held");
    }

    #[test]
    fn drawn_ids_are_unguessable_and_valid() {
        let (a, b) = (random_id(), random_id());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(check_id(&a).is_ok());
    }

    #[test]
    fn chosen_ids_are_checked() {
        assert!(check_id("user-42:chat_7.a").is_ok());
        assert!(check_id("").is_err());
        assert!(check_id("has space").is_err());
        assert!(check_id("ünï").is_err());
        assert!(check_id(&"x".repeat(MAX_SESSION_ID_LEN + 1)).is_err());
    }
}
