//! A conversation's KV cache, with the byte ledger it keeps, and the packing
//! of several caches into one batched call's tensors and back.
//!
//! # Batch layout
//! With `P` the longest past and `N` the longest row of a batch, row `b`'s
//! cache is right-aligned into `[B, kv_heads, P, d]` after `P - p_b` pad
//! slots; after the call each row's own `[1, kv_heads, p_b + n_b, d]` cache is
//! copied out of `present.*`, skipping the pads (see
//! [`super::Model::forward_batch`]).

use ort::value::{DynValue, Tensor};

use super::{BatchRow, ModelError, ledger::Held, ort_err};

/// A conversation's KV cache: per layer, the `present.{i}.key|value` tensors
/// ONNX Runtime returned, fed back unchanged as `past_key_values.{i}.*`.
/// Its bytes are counted in the model's ledger until it is dropped.
pub struct KvCache {
    pub(super) tensors: Vec<DynValue>,
    pub(super) len: usize,
    pub(super) held: Held,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
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

    /// Bytes the cache holds.
    pub fn bytes(&self) -> u64 {
        self.held.bytes()
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
                out.extend(data.iter().flat_map(|x| x.to_bits().to_le_bytes()));
            } else {
                let (_, data) = t
                    .try_extract_tensor::<half::f16>()
                    .map_err(ort_err("read a KV cache"))?;
                out.extend(data.iter().flat_map(|x| x.to_bits().to_le_bytes()));
            }
        }
        Ok(out)
    }
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
            Some(value) => value.try_extract_tensor::<T>().map_err(ort_err("read a KV cache"))?.1,
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

/// The first `len` of the `old` positions of a `[1, heads, old, d]` cache tensor.
pub(super) fn prefix<T>(
    value: &DynValue,
    old: usize,
    len: usize,
    heads: usize,
    d: usize,
) -> Result<DynValue, ModelError>
where
    T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
{
    let (_, data) = value.try_extract_tensor::<T>().map_err(ort_err("read a KV cache"))?;
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
    len: usize,
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
    let mut own = data.to_vec();
    for h in 0..heads {
        let (to, src) = ((h * len + row) * d, (h * donor_len + row) * d);
        own[to..to + d].copy_from_slice(&from[src..src + d]);
    }
    Tensor::from_array(([1usize, heads, len, d], own))
        .map(Tensor::into_dyn)
        .map_err(ort_err("create a KV cache"))
}
