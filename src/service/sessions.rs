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

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use super::auth::Principal;
use crate::engine::Slot;

use super::error::ServiceError;

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
}

impl Sessions {
    /// A table keeping detached sessions for `ttl` (none: sessions off), at
    /// most `max_detached` at once.
    pub fn new(ttl: Option<Duration>, max_detached: usize) -> Arc<Sessions> {
        Arc::new(Sessions {
            table: Mutex::new(HashMap::new()),
            ttl,
            max_detached,
        })
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
    pub fn create(
        &self,
        id: &str,
        slot: Arc<Slot>,
        stream: u64,
        owner: Option<Principal>,
    ) -> Result<String, ServiceError> {
        if self.ttl.is_none() {
            return Err(ServiceError::SessionsOff);
        }
        let id = if id.is_empty() {
            random_id()
        } else {
            check_id(id)?;
            id.to_string()
        };
        let mut table = self.table();
        if table.contains_key(&id) {
            return Err(ServiceError::SessionExists { id });
        }
        table.insert(
            id.clone(),
            Entry {
                slot,
                holder: Some(stream),
                generation: 0,
                owner,
            },
        );
        Ok(id)
    }

    /// Hands the detached session `id` to `stream`, if `who` created it.
    ///
    /// # Errors
    /// [`ServiceError::BadSessionId`], [`ServiceError::SessionNotFound`]
    /// (also for another principal's session: its existence is not told),
    /// [`ServiceError::SessionHeld`].
    pub fn resume(&self, id: &str, stream: u64, who: Option<&Principal>) -> Result<Arc<Slot>, ServiceError> {
        check_id(id)?;
        let mut table = self.table();
        let entry = table
            .get_mut(id)
            .filter(|e| e.owner.as_ref() == who)
            .ok_or_else(|| ServiceError::SessionNotFound { id: id.to_string() })?;
        if entry.holder.is_some() {
            return Err(ServiceError::SessionHeld { id: id.to_string() });
        }
        entry.holder = Some(stream);
        Ok(entry.slot.clone())
    }

    /// Ends the session `id` held by `stream` for good (a half-close).
    pub fn end(&self, id: &str, stream: u64) {
        let mut table = self.table();
        if table.get(id).is_some_and(|e| e.holder == Some(stream)) {
            table.remove(id);
        }
    }

    /// Detaches the session `id` held by `stream` (its stream was lost): kept
    /// for the TTL, then freed, unless a stream resumes it first.
    pub fn detach(self: &Arc<Self>, id: &str, stream: u64) {
        let Some(ttl) = self.ttl else { return };
        let mut table = self.table();
        let detached = table.values().filter(|e| e.holder.is_none()).count();
        let Some(entry) = table.get_mut(id).filter(|e| e.holder == Some(stream)) else {
            return;
        };
        if detached >= self.max_detached {
            tracing::warn!(
                max = self.max_detached,
                "too many detached sessions: this lost session is freed, not kept"
            );
            table.remove(id);
            return;
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
    fn held(id: &str) -> Arc<Sessions> {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny");
        let model = Model::open(dir, &Default::default()).expect("the tiny model (make models)");
        let conversation = Conversation::new(&model, Default::default()).unwrap();
        let sessions = Sessions::new(Some(Duration::from_secs(60)), 8);
        let slot = KvBudget::new(model, u64::MAX).slot(conversation);
        sessions.create(id, slot, 1, None).unwrap();
        sessions
    }

    /// A half-close ends the session only once every response went out; a
    /// stream whose responses are dropped first (a reset with the
    /// half-close, as grpcio sends them) keeps it, detached, whichever of
    /// the two the server sees first.
    #[tokio::test]
    async fn a_half_close_ends_a_session_only_once_its_responses_are_out() {
        // Armed, then every response out: ended.
        let sessions = held("a");
        let (guard, arm) = OnHalfClose::new(sessions.clone(), 1);
        assert!(arm.arm("a"));
        guard.delivered();
        drop(guard);
        assert!(matches!(
            sessions.resume("a", 2, None),
            Err(ServiceError::SessionNotFound { .. })
        ));

        // Armed, then the responses dropped unsent: detached, resumable.
        let sessions = held("b");
        let (guard, arm) = OnHalfClose::new(sessions.clone(), 1);
        assert!(arm.arm("b"));
        drop(guard);
        assert_eq!(sessions.detached(), 1);
        assert!(sessions.resume("b", 2, None).is_ok());

        // The responses dropped before the half-close is seen: too late to
        // arm; the stream's task detaches it itself.
        let sessions = held("c");
        let (guard, arm) = OnHalfClose::new(sessions.clone(), 1);
        drop(guard);
        assert!(!arm.arm("c"), "the responses were gone already");
        assert_eq!(sessions.detached(), 0, "nothing done until the task decides");

        // Unarmed (no half-close): the responses ending changes nothing.
        let sessions = held("d");
        let (guard, _arm) = OnHalfClose::new(sessions.clone(), 1);
        guard.delivered();
        drop(guard);
        assert!(matches!(
            sessions.resume("d", 2, None),
            Err(ServiceError::SessionHeld { .. })
        ));
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
