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

use super::{BatchRow, ModelError, ledger::Held, ort_err};

/// A conversation's KV cache: per layer, the `present.{i}.key|value` tensors
/// ONNX Runtime returned, fed back unchanged as `past_key_values.{i}.*`.
/// Its bytes are counted in the model's ledger until it is dropped.
pub struct KvCache {
    pub(super) tensors: Vec<DynValue>,
    pub(super) len: usize,
    /// Unused rows per head at the end of every tensor (see the module's "Slack").
    pub(super) slack: usize,
    pub(super) held: Held,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("slack", &self.slack)
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

    /// Bytes the cache holds (its slack included).
    pub fn bytes(&self) -> u64 {
        self.held.bytes()
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
        let mut out = Vec::with_capacity(self.bytes() as usize);
        for t in &self.tensors {
            if let Ok((_, data)) = t.try_extract_tensor::<f32>() {
                let data = valid(data, self.len, self.slack);
                out.extend(data.iter().flat_map(|x| x.to_bits().to_le_bytes()));
            } else {
                let (_, data) = t
                    .try_extract_tensor::<half::f16>()
                    .map_err(ort_err("read a KV cache"))?;
                let data = valid(data, self.len, self.slack);
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
        let data = match r.past.tensors.get(t) {
            Some(value) => valid(
                value.try_extract_tensor::<T>().map_err(ort_err("read a KV cache"))?.1,
                pi,
                r.past.slack,
            ),
            None => &[],
        };
        for h in 0..heads {
            packed.resize(packed.len() + (p - pi) * d, T::default());
            packed.extend_from_slice(&data[h * pi * d..(h + 1) * pi * d]);
        }
    }
    Tensor::from_array(([rows.len(), heads, p, d], packed))
        .map(Tensor::into_dyn)
        .map_err(ort_err("create a batched KV cache"))
}

/// The first `len` of the `old` positions of a `[1, heads, old, d]` cache
/// tensor (`slack` unused rows per head after them), in a tensor of its own.
pub(super) fn prefix<T>(
    value: &DynValue,
    (old, slack): (usize, usize),
    len: usize,
    heads: usize,
    d: usize,
) -> Result<DynValue, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let (_, data) = value.try_extract_tensor::<T>().map_err(ort_err("read a KV cache"))?;
    let data = valid(data, old, slack);
    let mut own = Vec::with_capacity(heads * len * d);
    for h in 0..heads {
        own.extend_from_slice(&data[h * old * d..(h * old + len) * d]);
    }
    Tensor::from_array(([1usize, heads, len, d], own))
        .map(Tensor::into_dyn)
        .map_err(ort_err("create a KV cache"))
}

/// Each row's own `[1, kv_heads, p_b + n_b - cut_b, d]` cache out of a
/// batched `present` tensor (the row's last `cut_b` tokens left out).
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
            let mut own = Vec::with_capacity(heads * (pi + kept) * d);
            for h in 0..heads {
                let base = (i * heads + h) * total * d;
                own.extend_from_slice(&data[base + (p - pi) * d..base + p * d]);
                own.extend_from_slice(&data[base + (total - ni) * d..base + (total - ni + kept) * d]);
            }
            Tensor::from_array(([1usize, heads, pi + kept, d], own))
                .map(Tensor::into_dyn)
                .map_err(ort_err("create a KV cache"))
        })
        .collect()
}

/// A copy of the `[1, heads, len, d]` tensor `value` with row `row` of
/// every head taken from `donor` (`[1, heads, donor_len, d]`).
#[cfg(feature = "faults")]
pub(super) fn splice<T>(
    value: &DynValue,
    (len, slack): (usize, usize),
    donor: &DynValue,
    donor_len: usize,
    row: usize,
    heads: usize,
    d: usize,
) -> Result<DynValue, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let (_, data) = value.try_extract_tensor::<T>().map_err(ort_err("read a KV cache"))?;
    let (_, from) = donor.try_extract_tensor::<T>().map_err(ort_err("read a KV cache"))?;
    let mut own = valid(data, len, slack).to_vec();
    for h in 0..heads {
        let (to, src) = ((h * len + row) * d, (h * donor_len + row) * d);
        own[to..to + d].copy_from_slice(&from[src..src + d]);
    }
    Tensor::from_array(([1usize, heads, len, d], own))
        .map(Tensor::into_dyn)
        .map_err(ort_err("create a KV cache"))
}
