//! Shared prefixes: the KV rows of a conversation's leading turns, held
//! once and referenced by every conversation that begins with the same
//! tokens.
//!
//! # Segments
//! A [`Segment`] holds the KV rows of one stretch of tokens (usually one
//! turn) on top of its parent segment's: a chain of segments from a root
//! is the cache of the tokens along it, each row held once however many
//! conversations reference the chain. A conversation's [`KvCache`] is a
//! chain (its *base*, the deepest segment) plus rows of its own after it.
//! ONNX Runtime takes a past as one contiguous tensor per layer, so a call
//! on a based cache first copies the chain's rows and the cache's own into
//! one (a gather, about as many bytes as the `present` concatenation the
//! call makes anyway); a chain of one segment and no own rows is fed as it
//! is. The rows are the same bits whichever way they are held: a call on a
//! based cache is the call on the contiguous one.
//!
//! # The index
//! A hash map from a chain's key (a hash of every token from the start
//! through the segment's last, computed incrementally: a segment keeps the
//! hasher's state for its children) to a weak reference:
//! a segment lives while a conversation references it (directly, or as the
//! parent of one it references) and is freed with its last reference, so
//! nothing in the index is held for nobody and the budget never has to
//! evict a prefix. A lookup walks one turn at a time (parent, tokens), the
//! way conversations arrive, and checks the tokens, so a hash collision is
//! a miss, never a wrong cache. Why a hash per turn boundary and not a
//! radix tree over tokens: conversations share whole leading turns (a
//! system prompt, examples), a turn is the unit a stream sends and the
//! engine prefills, and a shared prefix that ended inside a turn would need
//! the rest of that turn prefilled anyway; one map lookup per turn is all
//! the matching a turn needs. A context that comes without its boundaries
//! (evicted, or restored from a session store) finds the longest live
//! segment that begins it by hashing its tokens one by one and looking each
//! prefix up ([`Index::longest`]): one lookup per token, the match checked
//! token by token.
//!
//! # What else a segment keeps
//! The outputs of the turn that made it (per set of conversation options,
//! opaque here: the conversation module's), so a conversation whose next
//! turn is a cached segment skips the call altogether.

use std::{
    any::Any,
    collections::HashMap,
    hash::{DefaultHasher, Hasher},
    sync::{
        Arc, Mutex, Weak,
        atomic::{AtomicU64, Ordering},
    },
};

use super::KvCache;

/// The KV rows of one stretch of tokens after its parent's (see the module docs).
pub struct Segment {
    parent: Option<Arc<Segment>>,
    /// This segment's rows only (never based itself).
    pub(super) rows: KvCache,
    tokens: Vec<u32>,
    /// Tokens before it (its parent chain's).
    start: usize,
    /// The hash of every token from the start through its last.
    path: DefaultHasher,
    outputs: Mutex<Vec<Arc<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("start", &self.start)
            .field("len", &self.tokens.len())
            .field("bytes", &self.rows.bytes())
            .finish()
    }
}

impl Segment {
    /// Tokens from the start of the chain through this segment.
    pub fn end(&self) -> usize {
        self.start + self.tokens.len()
    }

    /// This segment's own tokens.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The segment it follows.
    pub fn parent(&self) -> Option<&Arc<Segment>> {
        self.parent.as_ref()
    }

    /// Bytes of its own rows.
    pub fn bytes(&self) -> u64 {
        self.rows.bytes()
    }

    /// The chain, root first.
    pub(super) fn chain(self: &Arc<Self>) -> Vec<&Segment> {
        let mut chain = Vec::new();
        let mut at = Some(&**self);
        while let Some(s) = at {
            chain.push(s);
            at = s.parent.as_deref();
        }
        chain.reverse();
        chain
    }

    /// Bytes of the whole chain.
    pub fn chain_bytes(self: &Arc<Self>) -> u64 {
        self.chain().iter().map(|s| s.bytes()).sum()
    }

    /// The first output kept with it that `pick` accepts.
    pub fn output<T: Any + Send + Sync>(&self, mut pick: impl FnMut(&T) -> bool) -> Option<Arc<T>> {
        let outputs = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
        outputs
            .iter()
            .filter_map(|o| o.clone().downcast::<T>().ok())
            .find(|o| pick(o))
    }

    /// Keeps an output of the turn that made it.
    pub fn keep_output<T: Any + Send + Sync>(&self, output: T) {
        self.outputs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::new(output));
    }
}

impl Drop for Segment {
    /// Frees a chain that only this segment held one segment at a time
    /// (a chain may be a few thousand short turns long: no recursion).
    fn drop(&mut self) {
        let mut next = self.parent.take();
        while let Some(parent) = next {
            next = match Arc::try_unwrap(parent) {
                Ok(mut segment) => segment.parent.take(),
                Err(_) => None,
            };
        }
    }
}

/// The hasher's state after `tokens` following `parent`'s (see the module docs).
fn path(parent: Option<&Arc<Segment>>, tokens: &[u32]) -> DefaultHasher {
    let mut h = parent.map_or_else(DefaultHasher::new, |p| p.path.clone());
    for &t in tokens {
        h.write_u32(t);
    }
    h
}

/// What is shared now (see [`super::Model::prefix_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixStats {
    /// Live segments.
    pub segments: u64,
    /// Their tokens.
    pub tokens: u64,
    /// Their bytes (each counted once).
    pub bytes: u64,
    /// References to them beyond one each: conversations and later segments
    /// that share a segment with another.
    pub shared_references: u64,
    /// Turns answered from a shared segment without a model call.
    pub hits: u64,
    /// Tokens not prefilled thanks to shared segments (those turns', and the
    /// shared part of rebuilt contexts).
    pub tokens_saved: u64,
}

/// The index of live segments (see the module docs).
#[derive(Debug, Default)]
pub(super) struct Index {
    map: Mutex<HashMap<u64, Weak<Segment>>>,
    hits: AtomicU64,
    saved: AtomicU64,
}

impl Index {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Weak<Segment>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live segment of `tokens` after `parent`.
    pub(super) fn find(&self, parent: Option<&Arc<Segment>>, tokens: &[u32]) -> Option<Arc<Segment>> {
        let found = self.map().get(&path(parent, tokens).finish())?.upgrade()?;
        let same_parent = match (parent, &found.parent) {
            (None, None) => true,
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        (same_parent && found.tokens == tokens).then_some(found)
    }

    /// A segment of `rows` (the rows of `tokens` after `parent`), or the
    /// live one already indexed for them (then `rows` are dropped: held once).
    pub(super) fn insert(&self, parent: Option<Arc<Segment>>, tokens: Vec<u32>, rows: KvCache) -> Arc<Segment> {
        if let Some(found) = self.find(parent.as_ref(), &tokens) {
            return found;
        }
        let path = path(parent.as_ref(), &tokens);
        let key = path.finish();
        let start = parent.as_ref().map_or(0, |p| p.end());
        let segment = Arc::new(Segment {
            parent,
            rows,
            tokens,
            start,
            path,
            outputs: Mutex::new(Vec::new()),
        });
        let mut map = self.map();
        // Forget the dead entries now and then, so the map stays about as
        // large as the live segments.
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        map.insert(key, Arc::downgrade(&segment));
        segment
    }

    /// The deepest live segment whose chain's tokens begin `tokens`.
    pub(super) fn longest(&self, tokens: &[u32]) -> Option<Arc<Segment>> {
        let map = self.map();
        if map.is_empty() {
            return None;
        }
        let mut h = DefaultHasher::new();
        let mut found = None;
        for (i, &t) in tokens.iter().enumerate() {
            h.write_u32(t);
            let Some(segment) = map.get(&h.finish()).and_then(Weak::upgrade) else {
                continue;
            };
            // A hash names its tokens only probably: check them.
            let same = segment.end() == i + 1 && segment.chain().iter().all(|s| s.tokens == tokens[s.start..s.end()]);
            if same {
                found = Some(segment);
            }
        }
        found
    }

    /// Counts a turn answered from a segment, or tokens reused in a rebuild.
    pub(super) fn saved(&self, hit: bool, tokens: usize) {
        if hit {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
        self.saved.fetch_add(tokens as u64, Ordering::Relaxed);
    }

    pub(super) fn stats(&self) -> PrefixStats {
        let mut stats = PrefixStats {
            hits: self.hits.load(Ordering::Relaxed),
            tokens_saved: self.saved.load(Ordering::Relaxed),
            ..PrefixStats::default()
        };
        let mut map = self.map();
        map.retain(|_, w| {
            let Some(s) = w.upgrade() else {
                return false;
            };
            stats.segments += 1;
            stats.tokens += s.tokens.len() as u64;
            stats.bytes += s.bytes();
            // One reference is ours (the upgrade), one its holder's.
            stats.shared_references += (Arc::strong_count(&s) as u64).saturating_sub(2);
            true
        });
        stats
    }
}
