//! Model calls broken on purpose, for the negative controls of the tests'
//! bounds (the `faults` feature only): a bound that a subtly wrong cache or
//! call still passes proves nothing, so the tests show each bound failing on
//! one. Nothing here runs in a server.

use super::{FloatType, Hidden, KvCache, Model, ModelError, kv};

impl Model {
    /// [`Model::forward`] with the new tokens' positions off by `shift`
    /// (an off-by-one on top of a correct cache, say).
    ///
    /// # Errors
    /// As [`Model::forward`].
    pub fn forward_shifted(
        &self,
        ids: &[u32],
        past: &KvCache,
        keep: std::ops::Range<usize>,
        shift: i64,
    ) -> Result<(Hidden, KvCache), ModelError> {
        self.forward_at(ids, past, keep, shift)
    }

    /// A copy of `cache` whose row `row` (every layer, key and value) is
    /// `donor`'s row instead: a stale row left behind.
    ///
    /// # Errors
    /// [`ModelError::Ort`] when a tensor cannot be read or made.
    ///
    /// # Panics
    /// If either cache is shorter than `row + 1`.
    pub fn splice_row(&self, cache: &KvCache, donor: &KvCache, row: usize) -> Result<KvCache, ModelError> {
        assert!(
            row < cache.len && row < donor.len,
            "row {row} of caches of {} and {}",
            cache.len,
            donor.len
        );
        let _call = self.ledger.call();
        let mut reserved = self.ledger.reserve(self.call_bytes(&[super::Call {
            new: cache.len,
            ..super::Call::default()
        }]));
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
        let tensors = (0..self.io.past.len())
            .map(|t| match self.spec.kv_dtype {
                FloatType::F32 => kv::splice::<f32>(cache, t, donor, row, heads, d),
                FloatType::F16 => kv::splice::<half::f16>(cache, t, donor, row, heads, d),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.cache(&mut reserved, tensors, cache.len, None))
    }
}
