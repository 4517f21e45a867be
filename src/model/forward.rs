//! One forward pass: `tokens + past KV -> hidden states + present KV`, one
//! conversation's ([`Model::forward`]) or several in one padded call
//! ([`Model::forward_batch`]), and the copy of a cache without its last rows
//! ([`Model::truncate`]). Every call reserves the bytes it will make in the
//! ledger before it runs, and its outputs become caches counted there.

use half::f16;
use ort::{
    session::{SessionInputValue, SessionOutputs},
    value::{DynValue, Tensor},
};

use std::sync::{Arc, atomic::Ordering};

use super::{Call, FloatType, KvCache, Model, ModelError, faults, kv, ort_err, prefix::Segment};

/// [`Model::cut`] works in place when the rows it leaves unused are at most
/// 1/64 of the cache (a 12-token probe: caches of 768 tokens and more).
pub const IN_PLACE_CUT_RATIO: usize = 64;

/// One forward pass's hidden states: `rows × hidden` row-major f32.
#[derive(Debug)]
pub struct Hidden {
    /// Row-major values.
    pub values: Vec<f32>,
    /// Size of a row.
    pub width: usize,
}

impl Hidden {
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.values[i * self.width..(i + 1) * self.width]
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.values.len() / self.width.max(1)
    }
}

impl Model {
    /// Runs `ids` on top of `past` in one call. Returns the hidden states of
    /// the rows in `keep` (indices into `ids`) and the cache of `past + ids`.
    /// `past` is only read: on error nothing has changed.
    ///
    /// # Errors
    /// [`ModelError::Ort`] when ONNX Runtime fails (e.g. out of memory).
    pub fn forward(
        &self,
        ids: &[u32],
        past: &KvCache,
        keep: std::ops::Range<usize>,
    ) -> Result<(Hidden, KvCache), ModelError> {
        self.forward_at(ids, past, keep, 0)
    }

    /// [`Model::forward`] with the new tokens' positions moved by `shift`
    /// (0 in every call the server makes; tests break it on purpose).
    pub(super) fn forward_at(
        &self,
        ids: &[u32],
        past: &KvCache,
        keep: std::ops::Range<usize>,
        shift: i64,
    ) -> Result<(Hidden, KvCache), ModelError> {
        let s = ids.len();
        let p = past.len;
        let total = p + s;
        let input_ids = Tensor::from_array(([1usize, s], ids.iter().map(|&t| i64::from(t)).collect::<Vec<_>>()))
            .map_err(ort_err("create input_ids"))?;
        let mask =
            Tensor::from_array(([1usize, total], vec![1i64; total])).map_err(ort_err("create attention_mask"))?;
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(3 + 2 * self.spec.layers);
        inputs.push(("input_ids", input_ids.into()));
        inputs.push(("attention_mask", mask.into()));
        if self.spec.has_position_ids {
            let first = p as i64 + shift;
            let pos = Tensor::from_array(([1usize, s], (first..first + s as i64).collect::<Vec<_>>()))
                .map_err(ort_err("create position_ids"))?;
            inputs.push(("position_ids", pos.into()));
        }
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
        let empty_shape = [1usize, heads, 0, d];
        // Counted before a based past is gathered.
        let _call = self.ledger.call();
        let mut reserved = self.ledger.reserve(self.call_bytes(&[Call {
            past: p,
            new: s,
            base: past.base_len(),
            ..Call::default()
        }]));
        // A based past is fed as it is when it is one segment (and nothing
        // of its own), else gathered into one tensor per layer.
        let whole = match &past.base {
            None => Some(past),
            Some(base) if past.own_len() == 0 && base.parent().is_none() => Some(&base.rows),
            Some(_) => None,
        };
        let mut gathered_census = Vec::new();
        for (i, name) in self.io.past.iter().enumerate() {
            let value: SessionInputValue<'_> = match whole {
                Some(cache) => match cache.tensors.get(i) {
                    Some(t) => match self.spec.kv_dtype {
                        FloatType::F32 => kv::past_input::<f32>(t, p, cache.slack, heads, d)?,
                        FloatType::F16 => kv::past_input::<f16>(t, p, cache.slack, heads, d)?,
                    },
                    None => match self.spec.kv_dtype {
                        FloatType::F32 => Tensor::from_array((empty_shape, Vec::<f32>::new())).map(Into::into),
                        FloatType::F16 => Tensor::from_array((empty_shape, Vec::<f16>::new())).map(Into::into),
                    }
                    .map_err(ort_err("create an empty KV cache"))?,
                },
                None => {
                    let gathered = match self.spec.kv_dtype {
                        FloatType::F32 => kv::gather_tensor::<f32>(past, i, 0..p, heads, d)?,
                        FloatType::F16 => kv::gather_tensor::<f16>(past, i, 0..p, heads, d)?,
                    };
                    gathered_census.push(self.ledger.scratch(&[&gathered]));
                    gathered.into()
                }
            };
            inputs.push((name.as_str(), value));
        }

        let keep = keep.start.min(s)..keep.end.min(s);
        metrics::histogram!("se_batch_rows").record(1.0);
        let (hidden, tensors) = self.run(inputs, |outputs| {
            drop(gathered_census); // the run consumed the gathered inputs
            let hidden = self.read_hidden(outputs, [keep])?.remove(0);
            let tensors = self
                .io
                .present
                .iter()
                .map(|name| {
                    outputs
                        .remove(name)
                        .expect("the contract check at load guarantees present.*")
                })
                .collect();
            Ok((hidden, tensors))
        })?;
        Ok((hidden, self.cache(&mut reserved, tensors, total, None)))
    }

    /// The first `len` tokens of `cache`, copied into a cache of their own
    /// (counted in the ledger like any other). For a turn's cache without
    /// the probe that ran at its end: under causal attention no earlier
    /// token attended to the probe, so the result is the cache the turn
    /// alone would have made. `cache` is only read: on error nothing has
    /// changed.
    ///
    /// # Errors
    /// [`ModelError::Ort`] when a tensor cannot be read or made.
    ///
    /// # Panics
    /// If `len` exceeds the cache's length.
    pub fn truncate(&self, cache: &KvCache, len: usize) -> Result<KvCache, ModelError> {
        assert!(len <= cache.len, "a cache of {} tokens cut to {len}", cache.len);
        if len == 0 {
            return Ok(self.empty_cache());
        }
        let _call = self.ledger.call();
        let mut reserved = self.ledger.reserve(self.call_bytes(&[Call {
            new: len,
            ..Call::default()
        }]));
        let tensors = self.gather(cache, 0..len)?;
        Ok(self.cache(&mut reserved, tensors, len, None))
    }

    /// Rows `range` of every tensor of `cache`, in tensors of their own.
    fn gather(&self, cache: &KvCache, range: std::ops::Range<usize>) -> Result<Vec<DynValue>, ModelError> {
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
        (0..self.io.past.len())
            .map(|t| match self.spec.kv_dtype {
                FloatType::F32 => kv::gather_tensor::<f32>(cache, t, range.clone(), heads, d),
                FloatType::F16 => kv::gather_tensor::<f16>(cache, t, range.clone(), heads, d),
            })
            .collect()
    }

    /// `cache` (a call's whole new cache) without its last `cut` tokens, as a
    /// cache that follows `base` (whose tokens are its first ones): only the
    /// rows after the base are copied and held; the base's are shared.
    ///
    /// # Errors
    /// [`ModelError::Ort`] when a tensor cannot be read or made.
    ///
    /// # Panics
    /// If `base` and `cut` leave no room in the cache.
    pub fn rebase(&self, cache: &KvCache, base: Arc<Segment>, cut: usize) -> Result<KvCache, ModelError> {
        let (from, to) = (base.end(), cache.len - cut);
        assert!(from <= to, "a base of {from} tokens under a cache of {to}");
        let _call = self.ledger.call();
        let mut reserved = self.ledger.reserve(self.call_bytes(&[Call {
            new: to - from,
            ..Call::default()
        }]));
        let tensors = if from == to {
            Vec::new()
        } else {
            self.gather(cache, from..to)?
        };
        Ok(self.cache(&mut reserved, tensors, to, Some(base)))
    }

    /// `cache` without its last `n` tokens (a probe's rows, which under
    /// causal attention no earlier token attended to): the cache the tokens
    /// before them alone would have made, bit for bit. On a long cache the
    /// cut is made in place, each head's kept rows moved down over the cut
    /// ones (about half the bytes of a copy, no new memory), and the cut
    /// rows stay as slack until the next call replaces the tensors; on a
    /// short one, where that slack would be more than 1/[`IN_PLACE_CUT_RATIO`]
    /// of the cache and a copy costs little, the kept rows are copied
    /// ([`Model::truncate`]). On error the cache is dropped.
    ///
    /// # Errors
    /// [`ModelError::Ort`] when a tensor cannot be read or made.
    ///
    /// # Panics
    /// If `n` exceeds the cache's length.
    pub fn cut(&self, mut cache: KvCache, n: usize) -> Result<KvCache, ModelError> {
        assert!(n <= cache.len, "{n} tokens cut from a cache of {}", cache.len);
        let keep = cache.len - n;
        if n == 0 {
            return Ok(cache);
        }
        if keep < IN_PLACE_CUT_RATIO * (cache.slack + n) || cache.base.is_some() {
            return self.truncate(&cache, keep);
        }
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
        for t in &mut cache.tensors {
            match self.spec.kv_dtype {
                FloatType::F32 => kv::cut_in_place::<f32>(t, cache.len, keep, heads, d)?,
                FloatType::F16 => kv::cut_in_place::<f16>(t, cache.len, keep, heads, d)?,
            }
        }
        cache.slack += n;
        cache.len = keep;
        Ok(cache)
    }

    /// A call's whole new cache as the turn keeps it: without its last
    /// `cut` rows, and following `base` when `keep_base` (see [`Model::rebase`]).
    ///
    /// # Errors
    /// [`ModelError::Ort`] when a tensor cannot be read or made.
    pub fn finish(
        &self,
        cache: KvCache,
        base: Option<&Arc<Segment>>,
        keep_base: bool,
        cut: usize,
    ) -> Result<KvCache, ModelError> {
        match base {
            Some(base) if keep_base => self.rebase(&cache, base.clone(), cut),
            _ => self.cut(cache, cut),
        }
    }

    /// Runs the session once (counted in [`Model::calls`]) and hands its outputs to `read`.
    fn run<R>(
        &self,
        inputs: Vec<(&str, SessionInputValue<'_>)>,
        read: impl FnOnce(&mut SessionOutputs<'_>) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        let mut session = self.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        faults::before_call(call).map_err(ort_err("run the model"))?;
        let mut outputs = session.run(inputs).map_err(ort_err("run the model"))?;
        read(&mut outputs)
    }

    /// Rows of `last_hidden_state` (flattened over batch and sequence), one
    /// [`Hidden`] per range, as f32.
    fn read_hidden(
        &self,
        outputs: &SessionOutputs<'_>,
        ranges: impl IntoIterator<Item = std::ops::Range<usize>>,
    ) -> Result<Vec<Hidden>, ModelError> {
        let value = outputs
            .get("last_hidden_state")
            .expect("the contract check at load guarantees last_hidden_state");
        let width = self.spec.hidden_size;
        let rows = |r: std::ops::Range<usize>| r.start * width..r.end * width;
        Ok(match self.spec.hidden_dtype {
            FloatType::F32 => {
                let (_, data) = value
                    .try_extract_tensor::<f32>()
                    .map_err(ort_err("read last_hidden_state"))?;
                ranges
                    .into_iter()
                    .map(|r| Hidden {
                        values: data[rows(r)].to_vec(),
                        width,
                    })
                    .collect()
            }
            FloatType::F16 => {
                let (_, data) = value
                    .try_extract_tensor::<f16>()
                    .map_err(ort_err("read last_hidden_state"))?;
                ranges
                    .into_iter()
                    .map(|r| Hidden {
                        values: data[rows(r)].iter().map(|v| v.to_f32()).collect(),
                        width,
                    })
                    .collect()
            }
        })
    }
}

/// One row of [`Model::forward_batch`]: new tokens on top of a cache.
#[derive(Debug, Clone)]
pub struct BatchRow<'a> {
    /// The tokens to run (at least one).
    pub ids: &'a [u32],
    /// The cache they run on top of (only read).
    pub past: &'a KvCache,
    /// Rows of `ids` whose hidden states to return.
    pub keep: std::ops::Range<usize>,
    /// Tokens at the end of `ids` left out of the row's new cache (a probe:
    /// under causal attention no earlier token attended to them, so the
    /// cache is what it would be had they never run).
    pub cut: usize,
    /// The row's new cache keeps its past's base (see the `prefix` module)
    /// and holds only the rows after it; otherwise it holds all its rows.
    pub keep_base: bool,
}

impl Model {
    /// Runs several rows in one call: each row's tokens on top of its own
    /// cache. Returns, per row, what [`Model::forward`] would (equal up to
    /// float rounding: the GEMMs see other shapes), the row's cache without
    /// its last [`BatchRow::cut`] tokens.
    ///
    /// # Layout
    /// With `P` the longest past and `N` the longest row, row `b` is laid out as
    /// `[pad; P - p_b] [past_b] [pad; N - n_b] [ids_b]`; `attention_mask` is 0 on
    /// the pads, so no real token attends to them, and `position_ids` continue
    /// each row's own context. The pasts are copied into `[B, kv_heads, P, d]`
    /// tensors and each row's cache is copied back out of `present.*`: the
    /// price of batching, small next to the GEMMs it shares.
    ///
    /// # Errors
    /// [`ModelError::Ort`] when ONNX Runtime fails; no cache has changed then.
    pub fn forward_batch(&self, rows: &[BatchRow<'_>]) -> Result<Vec<(Hidden, KvCache)>, ModelError> {
        if let [row] = rows {
            let (hidden, cache) = self.forward(row.ids, row.past, row.keep.clone())?;
            return Ok(vec![(
                hidden,
                self.finish(cache, row.past.base(), row.keep_base, row.cut)?,
            )]);
        }
        let b = rows.len();
        let p = rows.iter().map(|r| r.past.len).max().unwrap_or(0);
        let n = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let total = p + n;
        // Counted before the packed pasts are made.
        let shape: Vec<Call> = rows
            .iter()
            .map(|r| Call {
                past: r.past.len,
                new: r.ids.len(),
                cut: r.cut,
                base: r.past.base_len(),
                keep_base: r.keep_base,
            })
            .collect();
        let _call = self.ledger.call();
        let mut reserved = self.ledger.reserve(self.call_bytes(&shape));
        metrics::histogram!("se_batch_rows").record(b as f64);
        let mut ids = vec![0i64; b * n];
        let mut mask = vec![0i64; b * total];
        let mut pos = vec![0i64; b * n];
        for (i, r) in rows.iter().enumerate() {
            let (pi, ni) = (r.past.len, r.ids.len());
            for (j, &t) in r.ids.iter().enumerate() {
                ids[i * n + n - ni + j] = i64::from(t);
            }
            mask[i * total + p - pi..i * total + p].fill(1);
            mask[i * total + total - ni..(i + 1) * total].fill(1);
            for (j, slot) in pos[i * n..(i + 1) * n].iter_mut().enumerate() {
                // Pads sit at the row's first new position; they are masked anyway.
                *slot = (pi + j.saturating_sub(n - ni)) as i64;
            }
        }
        let input_ids = Tensor::from_array(([b, n], ids)).map_err(ort_err("create input_ids"))?;
        let mask = Tensor::from_array(([b, total], mask)).map_err(ort_err("create attention_mask"))?;
        let mut inputs: Vec<(&str, SessionInputValue<'_>)> = Vec::with_capacity(3 + 2 * self.spec.layers);
        inputs.push(("input_ids", input_ids.into()));
        inputs.push(("attention_mask", mask.into()));
        if self.spec.has_position_ids {
            let pos = Tensor::from_array(([b, n], pos)).map_err(ort_err("create position_ids"))?;
            inputs.push(("position_ids", pos.into()));
        }
        let mut packed_census = Vec::with_capacity(self.io.past.len());
        for (t, name) in self.io.past.iter().enumerate() {
            let packed = match self.spec.kv_dtype {
                FloatType::F32 => kv::pack_past::<f32>(rows, t, p, self.spec.kv_heads, self.spec.head_dim)?,
                FloatType::F16 => kv::pack_past::<f16>(rows, t, p, self.spec.kv_heads, self.spec.head_dim)?,
            };
            packed_census.push(self.ledger.scratch(&[&packed]));
            inputs.push((name.as_str(), packed.into()));
        }

        let (hidden, tensors) = self.run(inputs, |outputs| {
            let hidden = self.read_hidden(
                outputs,
                rows.iter().enumerate().map(|(i, r)| {
                    let ni = r.ids.len();
                    let first = i * n + n - ni;
                    first + r.keep.start.min(ni)..first + r.keep.end.min(ni)
                }),
            )?;
            let mut tensors: Vec<Vec<DynValue>> =
                rows.iter().map(|_| Vec::with_capacity(self.io.present.len())).collect();
            // The batched outputs all exist now, the packed inputs too.
            let mut present_census: Vec<_> = self
                .io
                .present
                .iter()
                .map(|name| self.ledger.scratch(&[&outputs[name.as_str()]]))
                .collect();
            drop(packed_census); // the run consumed the packed inputs
            // Layer by layer, each batched tensor freed once split: the copies
            // never hold more than one layer twice.
            for (name, counted) in self.io.present.iter().zip(present_census.drain(..)) {
                let present = outputs
                    .remove(name)
                    .expect("the contract check at load guarantees present.*");
                let split = match self.spec.kv_dtype {
                    FloatType::F32 => {
                        kv::unpack_present::<f32>(&present, rows, (p, n), self.spec.kv_heads, self.spec.head_dim)?
                    }
                    FloatType::F16 => {
                        kv::unpack_present::<f16>(&present, rows, (p, n), self.spec.kv_heads, self.spec.head_dim)?
                    }
                };
                for (row, t) in tensors.iter_mut().zip(split) {
                    row.push(t);
                }
                drop((present, counted));
            }
            Ok((hidden, tensors))
        })?;
        Ok(rows
            .iter()
            .zip(hidden)
            .zip(tensors)
            .map(|((r, hidden), tensors)| {
                let len = r.past.len + r.ids.len() - r.cut;
                let base = r.past.base.clone().filter(|_| r.keep_base);
                (hidden, self.cache(&mut reserved, tensors, len, base))
            })
            .collect())
    }
}
