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

use crate::{auth::Principal, memory::Slot};

use super::ServiceError;

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
