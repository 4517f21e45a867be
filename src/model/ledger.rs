//! The KV ledger: the bytes of every live KV cache of one model, and of a
//! running call's outputs and packed inputs, counted as they are reserved
//! and given back when the caches die.
//!
//! The ledger counts by arithmetic (tokens × [`super::ModelSpec::kv_bytes_per_token`]),
//! reserved before a call from what the call will make. Test builds (the
//! `faults` feature) keep a second count beside it, the *census*: the bytes
//! of the tensors that actually exist, measured from each tensor's own shape
//! and element type as ONNX Runtime reports them, never from the ledger's
//! arithmetic. A cache holding rows it should not (a probe not cut, a stale
//! row) shows in the census and not in the ledger; [`Ledger::snapshot`]
//! reads both at a moment when no call is running, where they must agree.
//! In other builds the census compiles to nothing.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use ort::value::DynValue;

/// One row of a model call, for the bytes the call adds: the row's cached
/// tokens, its new tokens, and the tokens cut from its new cache (a probe).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Call {
    /// Tokens of cache the row runs on top of.
    pub past: usize,
    /// Tokens the row runs.
    pub new: usize,
    /// Tokens at the end of `new` left out of the row's new cache.
    pub cut: usize,
    /// Tokens of `past` held in a shared segment chain (its base): a call
    /// alone gathers such a past into one tensor first.
    pub base: usize,
    /// The row's new cache keeps that base and holds only the rows after it.
    pub keep_base: bool,
}

/// Tokens of KV memory a call over `rows` adds at its peak: one row, its
/// past gathered into one tensor when it is based (`past`), its outputs
/// (`past + new`) and the copy of the rows it keeps when it keeps a base or
/// cuts rows (`past + new - cut`, less the base it keeps); several rows
/// in one padded call, the pasts packed into one tensor (`B × P`), the
/// batched outputs (`B × (P + N)`) and each row's own copy out of them
/// (`past + new` each, less a kept base, counted whole). The one formula
/// both the budget (before a call) and the call's reservation use.
pub fn call_tokens(rows: &[Call]) -> usize {
    let kept_base = |r: &Call| if r.keep_base { r.base } else { 0 };
    if let [row] = rows {
        let total = row.past + row.new;
        let gathered = if row.base > 0 { row.past } else { 0 };
        let copy = if row.cut > 0 || row.keep_base {
            total - row.cut - kept_base(row)
        } else {
            0
        };
        return gathered + total + copy;
    }
    let b = rows.len();
    let p = rows.iter().map(|r| r.past).max().unwrap_or(0);
    let n = rows.iter().map(|r| r.new).max().unwrap_or(0);
    let own: usize = rows.iter().map(|r| r.past + r.new - kept_base(r)).sum();
    b * p + b * (p + n) + own
}

/// The ledger of one model. Share it with `Arc`.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    bytes: AtomicU64,
    census: census::Census,
}

/// The ledger and the census read together, with no call running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    /// The ledger's count, in bytes.
    pub ledger: u64,
    /// The bytes of every live KV tensor, measured from the tensors.
    pub census: u64,
    /// The most the census measured at once since the previous snapshot
    /// (every call's peak included: caches, packed inputs, outputs, copies).
    pub peak: u64,
}

impl Ledger {
    /// Bytes counted now.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Counts `bytes` until the reservation is dropped or turned into caches.
    pub(crate) fn reserve(self: &Arc<Self>, bytes: u64) -> Reservation {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        Reservation {
            ledger: self.clone(),
            bytes,
        }
    }

    /// Marks a model call (its reservation, inputs, outputs and the caches
    /// it makes) for the census: a snapshot waits until the call is over.
    /// Calls may nest (a batch of one is a call and a cut).
    pub(crate) fn call(&self) -> census::CallGuard<'_> {
        self.census.call()
    }

    /// Counts transient KV tensors of a call (packed inputs, batched
    /// outputs) in the census while the returned guard lives. The ledger
    /// counts them in the call's reservation.
    pub(crate) fn scratch(&self, values: &[&DynValue]) -> census::Entry {
        self.census.entry(values)
    }

    /// The ledger and the census at a moment when no call runs; `None`
    /// without the census (builds without the `faults` feature).
    pub(crate) fn snapshot(&self) -> Option<Snapshot> {
        self.census.snapshot(&self.bytes)
    }
}

/// Bytes counted in the ledger for a running call (see
/// [`super::Model::call_bytes`]): given back on drop, or carried over into
/// the caches the call made, so the ledger never counts a byte twice nor
/// drops one it still holds.
#[derive(Debug)]
pub(crate) struct Reservation {
    ledger: Arc<Ledger>,
    bytes: u64,
}

impl Reservation {
    /// Holds `bytes` for a cache made of `values`, taken from the reservation.
    pub(crate) fn hold(&mut self, bytes: u64, values: &[DynValue]) -> Held {
        let carried = bytes.min(self.bytes);
        self.bytes -= carried;
        if bytes > carried {
            debug_assert!(false, "a call's caches exceed its reservation");
            self.ledger.bytes.fetch_add(bytes - carried, Ordering::Relaxed);
        }
        let values: Vec<&DynValue> = values.iter().collect();
        Held {
            census: self.ledger.census.entry(&values),
            ledger: self.ledger.clone(),
            bytes,
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.ledger.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// One cache's bytes in the ledger (and its tensors in the census), given
/// back on drop.
#[derive(Debug)]
pub(crate) struct Held {
    ledger: Arc<Ledger>,
    bytes: u64,
    census: census::Entry,
}

impl Held {
    /// Nothing held (an empty cache).
    pub(crate) fn none(ledger: &Arc<Ledger>) -> Held {
        Held {
            ledger: ledger.clone(),
            bytes: 0,
            census: census::Entry::default(),
        }
    }

    /// The bytes held.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // The ledger and the census give the bytes back together: a snapshot
        // never sees one without the other.
        let (ledger, bytes) = (&self.ledger.bytes, self.bytes);
        self.ledger.census.release(&mut self.census, || {
            ledger.fetch_sub(bytes, Ordering::Relaxed);
        });
    }
}

/// The bytes of a tensor, from its own shape and element type.
#[cfg(feature = "faults")]
fn measured(value: &DynValue) -> u64 {
    match value.dtype() {
        ort::value::ValueType::Tensor { ty, shape, .. } => {
            let elements = shape.iter().map(|&d| usize::try_from(d).unwrap_or(0)).product();
            ty.byte_size(elements).unwrap_or(0) as u64
        }
        _ => 0,
    }
}

#[cfg(feature = "faults")]
mod census {
    use std::{
        cell::Cell,
        sync::{
            Arc, Mutex, MutexGuard,
            atomic::{AtomicU64, Ordering},
        },
    };

    use super::{DynValue, Snapshot, measured};

    thread_local! {
        /// Calls this thread is inside (they nest: a batch of one is a call and a cut).
        static DEPTH: Cell<usize> = const { Cell::new(0) };
    }

    /// Measured bytes now and at most since the last snapshot.
    #[derive(Debug, Default)]
    struct Counts {
        current: u64,
        peak: u64,
    }

    #[derive(Debug, Default)]
    pub(crate) struct Census {
        counts: Arc<Mutex<Counts>>,
        /// Held for the length of every model call.
        calls: Mutex<()>,
    }

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The call lock, held by the outermost call of this thread.
    pub(crate) struct CallGuard<'a> {
        _outermost: Option<MutexGuard<'a, ()>>,
    }

    impl Drop for CallGuard<'_> {
        fn drop(&mut self) {
            DEPTH.with(|d| d.set(d.get() - 1));
        }
    }

    /// Measured bytes counted until released (or dropped).
    #[derive(Debug, Default)]
    pub(crate) struct Entry {
        counts: Option<Arc<Mutex<Counts>>>,
        bytes: u64,
    }

    impl Drop for Entry {
        fn drop(&mut self) {
            if let Some(counts) = self.counts.take() {
                lock(&counts).current -= self.bytes;
            }
        }
    }

    impl Census {
        pub(crate) fn call(&self) -> CallGuard<'_> {
            let outer = DEPTH.with(|d| {
                d.set(d.get() + 1);
                d.get() == 1
            });
            CallGuard {
                _outermost: outer.then(|| lock(&self.calls)),
            }
        }

        pub(crate) fn entry(&self, values: &[&DynValue]) -> Entry {
            let bytes = values.iter().map(|v| measured(v)).sum();
            let mut counts = lock(&self.counts);
            counts.current += bytes;
            counts.peak = counts.peak.max(counts.current);
            Entry {
                counts: Some(self.counts.clone()),
                bytes,
            }
        }

        pub(crate) fn release(&self, entry: &mut Entry, also: impl FnOnce()) {
            let mut counts = lock(&self.counts);
            if entry.counts.take().is_some() {
                counts.current -= entry.bytes;
            }
            also();
        }

        pub(crate) fn snapshot(&self, ledger: &AtomicU64) -> Option<Snapshot> {
            let _calls = lock(&self.calls);
            let mut counts = lock(&self.counts);
            let snapshot = Snapshot {
                ledger: ledger.load(Ordering::Relaxed),
                census: counts.current,
                peak: counts.peak,
            };
            counts.peak = counts.current;
            Some(snapshot)
        }
    }
}

#[cfg(not(feature = "faults"))]
mod census {
    use std::sync::atomic::AtomicU64;

    use super::{DynValue, Snapshot};

    #[derive(Debug, Default)]
    pub(crate) struct Census;

    pub(crate) struct CallGuard<'a>(std::marker::PhantomData<&'a ()>);

    /// Braced, not a unit struct: both builds construct it with `default()`.
    #[derive(Debug, Default)]
    pub(crate) struct Entry {}

    impl Census {
        pub(crate) fn call(&self) -> CallGuard<'_> {
            CallGuard(std::marker::PhantomData)
        }

        pub(crate) fn entry(&self, _values: &[&DynValue]) -> Entry {
            Entry {}
        }

        pub(crate) fn release(&self, _entry: &mut Entry, also: impl FnOnce()) {
            also();
        }

        pub(crate) fn snapshot(&self, _ledger: &AtomicU64) -> Option<Snapshot> {
            None
        }
    }
}
