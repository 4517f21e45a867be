//! A conversation's KV cache, with the byte ledger it keeps, and the packing
//! of several caches into one batched call's tensors and back.
//!
//! # Slack
//! A cache's tensors may hold more rows than its tokens: a probe cut *in
//! place* ([`super::Model::cut`]) moves each head's kept rows down over the
//! cut ones, so the first `heads × len × d` values of a tensor are the
//! `[1, heads, len, d]` cache and the `slack × heads` rows after them are
//! unused until the next call replaces the tensors. A call reads such a
//! cache through a view of those first values; the ledger and the census
//! count the slack, since it is memory held.
//!
//! # Shared rows
//! A cache may follow a [`Segment`] chain (its *base*, see the `prefix`
//! module): its first `base.end()` tokens' rows are the chain's, held once
//! for every cache that follows it, and its tensors hold only the rows after
//! them. Whatever reads a cache's rows reads them through [`pieces`], the
//! chain's then its own, so a based cache and a contiguous one of the same
//! tokens are read alike.
//!
//! # Batch layout
//! With `P` the longest past and `N` the longest row of a batch, row `b`'s
//! cache is right-aligned into `[B, kv_heads, P, d]` after `P - p_b` pad
//! slots; after the call each row's own `[1, kv_heads, p_b + n_b, d]` cache is
//! copied out of `present.*`, skipping the pads (see
//! [`super::Model::forward_batch`]).

use ort::{
    session::SessionInputValue,
    value::{DynValue, Tensor, TensorRef},
};

use std::sync::Arc;

use super::{BatchRow, ModelError, ledger::Held, ort_err, prefix::Segment};

/// A conversation's KV cache: per layer, the `present.{i}.key|value` tensors
/// ONNX Runtime returned, fed back unchanged as `past_key_values.{i}.*`.
/// Its bytes are counted in the model's ledger until it is dropped.
pub struct KvCache {
    /// Its own rows (those after the base's), laid out `own_len() + slack` per head.
    pub(super) tensors: Vec<DynValue>,
    /// Tokens cached, the base's included.
    pub(super) len: usize,
    /// The shared segment chain its first tokens' rows are in.
    pub(super) base: Option<Arc<Segment>>,
    /// Unused rows per head at the end of every tensor (see the module's "Slack").
    pub(super) slack: usize,
    pub(super) held: Held,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("slack", &self.slack)
            .field("base", &self.base.as_ref().map(|b| b.end()))
            .field("bytes", &self.held.bytes())
            .finish()
    }
}

impl KvCache {
    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the cache holds itself (its slack included, its base not).
    pub fn bytes(&self) -> u64 {
        self.held.bytes()
    }

    /// Bytes it reads: its own and its base chain's (which other caches
    /// may share).
    pub fn total_bytes(&self) -> u64 {
        self.held.bytes() + self.base.as_ref().map_or(0, Segment::chain_bytes)
    }

    /// The shared segment its first tokens' rows are in.
    pub fn base(&self) -> Option<&Arc<Segment>> {
        self.base.as_ref()
    }

    /// Tokens of its base.
    pub fn base_len(&self) -> usize {
        self.base.as_ref().map_or(0, |b| b.end())
    }

    /// Tokens whose rows it holds itself.
    pub fn own_len(&self) -> usize {
        self.len - self.base_len()
    }

    /// Rows per head held beyond [`KvCache::len`] (a probe cut in place).
    pub fn slack(&self) -> usize {
        self.slack
    }

    /// Every cached value's bits, layer by layer (key, then value), as
    /// little-endian bytes: for tests that a cache is bit-identical to
    /// another (test builds only, the `faults` feature).
    ///
    /// # Errors
    /// [`ModelError::Ort`] if a tensor cannot be read.
    #[cfg(feature = "faults")]
    pub fn to_bits(&self) -> Result<Vec<u8>, ModelError> {
        let mut out = Vec::with_capacity(self.total_bytes() as usize);
        let own = self.tensors.first().filter(|_| self.own_len() > 0);
        let Some(first) = own.or_else(|| self.base.as_ref().and_then(|b| b.chain()[0].rows.tensors.first())) else {
            return Ok(out);
        };
        let layers = self
            .base
            .as_ref()
            .map_or(self.tensors.len(), |b| b.chain()[0].rows.tensors.len());
        let (heads, d) = match first.try_extract_tensor::<f32>() {
            Ok((shape, _)) => (shape[1] as usize, shape[3] as usize),
            Err(_) => {
                let (shape, _) = first
                    .try_extract_tensor::<half::f16>()
                    .map_err(ort_err("read a KV cache"))?;
                (shape[1] as usize, shape[3] as usize)
            }
        };
        let f32s = first.try_extract_tensor::<f32>().is_ok();
        for t in 0..layers {
            if f32s {
                let data = gather::<f32>(self, t, 0..self.len, heads, d)?;
                out.extend(data.iter().flat_map(|x| x.to_bits().to_le_bytes()));
            } else {
                let data = gather::<half::f16>(self, t, 0..self.len, heads, d)?;
                out.extend(data.iter().flat_map(|x| x.to_bits().to_le_bytes()));
            }
        }
        Ok(out)
    }
}

/// The cache's values in a tensor of `len + slack` rows per head: the first
/// `len` rows' worth (see the module's "Slack").
pub(super) fn valid<T>(data: &[T], len: usize, slack: usize) -> &[T] {
    let rows = len + slack;
    if rows == 0 {
        return &[];
    }
    &data[..data.len() / rows * len]
}

/// A cache tensor as a call's `past_key_values.*` input: the tensor itself,
/// or, when it has slack, a `[1, heads, len, d]` view of its first values.
pub(super) fn past_input<'a, T>(
    value: &'a DynValue,
    len: usize,
    slack: usize,
    heads: usize,
    d: usize,
) -> Result<SessionInputValue<'a>, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    if slack == 0 {
        return Ok(value.into());
    }
    let (_, data) = value.try_extract_tensor::<T>().map_err(ort_err("read a KV cache"))?;
    TensorRef::from_array_view(([1usize, heads, len, d], valid(data, len, slack)))
        .map(Into::into)
        .map_err(ort_err("view a KV cache"))
}

/// Leaves the last `len - keep` of a cache tensor's `len` rows per head out,
/// in place: each head's first `keep` rows move down to follow the previous
/// head's (head 0 stays), so the first `heads × keep × d` values are the
/// shorter cache. The tensor's rows must be laid out `len` per head (a fresh
/// `present.*`, or a cache already cut this way).
pub(super) fn cut_in_place<T>(
    value: &mut DynValue,
    len: usize,
    keep: usize,
    heads: usize,
    d: usize,
) -> Result<(), ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let (_, data) = value
        .try_extract_tensor_mut::<T>()
        .map_err(ort_err("write a KV cache"))?;
    for h in 1..heads {
        let from = h * len * d;
        data.copy_within(from..from + keep * d, h * keep * d);
    }
    Ok(())
}

/// Tensor `t` of a cache as consecutive pieces of rows: its base chain's
/// segments (root first), then its own rows. Each piece is `(values, rows)`,
/// laid out `rows` per head.
pub(super) fn pieces<T>(cache: &KvCache, t: usize) -> Result<Vec<(&[T], usize)>, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    fn piece<T>(c: &KvCache, t: usize, rows: usize) -> Result<(&[T], usize), ModelError>
    where
        T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
    {
        let (_, data) = c.tensors[t]
            .try_extract_tensor::<T>()
            .map_err(ort_err("read a KV cache"))?;
        Ok((valid(data, rows, c.slack), rows))
    }
    let mut out = Vec::new();
    if let Some(base) = &cache.base {
        for s in base.chain() {
            if s.rows.len > 0 {
                out.push(piece(&s.rows, t, s.rows.len)?);
            }
        }
    }
    if cache.own_len() > 0 {
        out.push(piece(cache, t, cache.own_len())?);
    }
    Ok(out)
}

/// Appends head `h`'s rows `range` (positions in the whole cache) of `pieces` to `out`.
fn copy_rows<T: Copy>(pieces: &[(&[T], usize)], h: usize, range: std::ops::Range<usize>, d: usize, out: &mut Vec<T>) {
    let mut at = 0;
    for &(data, rows) in pieces {
        let (from, to) = (range.start.max(at), range.end.min(at + rows));
        if from < to {
            let base = h * rows;
            out.extend_from_slice(&data[(base + from - at) * d..(base + to - at) * d]);
        }
        at += rows;
    }
}

/// Rows `range` of tensor `t` of a cache (based or not), as the values of
/// a `[1, heads, range.len(), d]` tensor.
pub(super) fn gather<T>(
    cache: &KvCache,
    t: usize,
    range: std::ops::Range<usize>,
    heads: usize,
    d: usize,
) -> Result<Vec<T>, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let pieces = pieces::<T>(cache, t)?;
    let mut out = Vec::with_capacity(heads * range.len() * d);
    for h in 0..heads {
        copy_rows(&pieces, h, range.clone(), d, &mut out);
    }
    Ok(out)
}

/// [`gather`] into a tensor of its own.
pub(super) fn gather_tensor<T>(
    cache: &KvCache,
    t: usize,
    range: std::ops::Range<usize>,
    heads: usize,
    d: usize,
) -> Result<DynValue, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let len = range.len();
    let values = gather::<T>(cache, t, range, heads, d)?;
    Tensor::from_array(([1usize, heads, len, d], values))
        .map(Tensor::into_dyn)
        .map_err(ort_err("create a KV cache"))
}

/// The cache tensor `t` of every row, right-aligned into one `[B, heads, p, d]` tensor.
pub(super) fn pack_past<T>(
    rows: &[BatchRow<'_>],
    t: usize,
    p: usize,
    heads: usize,
    d: usize,
) -> Result<DynValue, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + Default + std::fmt::Debug + 'static,
{
    // Written once, in order: zeros for the pads, then the row's cache.
    let mut packed = Vec::with_capacity(rows.len() * heads * p * d);
    for r in rows {
        let pi = r.past.len;
        let pieces = if pi == 0 { Vec::new() } else { pieces::<T>(r.past, t)? };
        for h in 0..heads {
            packed.resize(packed.len() + (p - pi) * d, T::default());
            copy_rows(&pieces, h, 0..pi, d, &mut packed);
        }
    }
    Tensor::from_array(([rows.len(), heads, p, d], packed))
        .map(Tensor::into_dyn)
        .map_err(ort_err("create a batched KV cache"))
}

/// Each row's own `[1, kv_heads, p_b + n_b - cut_b - s_b, d]` cache out of
/// a batched `present` tensor: the row's last `cut_b` tokens left out, and
/// its first `s_b` when it keeps its past's base ([`BatchRow::keep_base`]).
pub(super) fn unpack_present<T>(
    present: &DynValue,
    rows: &[BatchRow<'_>],
    (p, n): (usize, usize),
    heads: usize,
    d: usize,
) -> Result<Vec<DynValue>, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let total = p + n;
    let (_, data) = present.try_extract_tensor::<T>().map_err(ort_err("read present"))?;
    rows.iter()
        .enumerate()
        .map(|(i, r)| {
            let (pi, ni, kept) = (r.past.len, r.ids.len(), r.ids.len() - r.cut);
            let skip = if r.keep_base { r.past.base_len() } else { 0 };
            let mut own = Vec::with_capacity(heads * (pi - skip + kept) * d);
            for h in 0..heads {
                let base = (i * heads + h) * total * d;
                own.extend_from_slice(&data[base + (p - pi + skip) * d..base + p * d]);
                own.extend_from_slice(&data[base + (total - ni) * d..base + (total - ni + kept) * d]);
            }
            Tensor::from_array(([1usize, heads, pi - skip + kept, d], own))
                .map(Tensor::into_dyn)
                .map_err(ort_err("create a KV cache"))
        })
        .collect()
}

/// A copy of tensor `t` of `cache` (`[1, heads, len, d]`, whole) with row
/// `row` of every head taken from `donor`'s.
#[cfg(feature = "faults")]
pub(super) fn splice<T>(
    cache: &KvCache,
    t: usize,
    donor: &KvCache,
    row: usize,
    heads: usize,
    d: usize,
) -> Result<DynValue, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let len = cache.len;
    let mut own = gather::<T>(cache, t, 0..len, heads, d)?;
    let from = gather::<T>(donor, t, 0..donor.len, heads, d)?;
    for h in 0..heads {
        let (to, src) = ((h * len + row) * d, (h * donor.len + row) * d);
        own[to..to + d].copy_from_slice(&from[src..src + d]);
    }
    Tensor::from_array(([1usize, heads, len, d], own))
        .map(Tensor::into_dyn)
        .map_err(ort_err("create a KV cache"))
}
