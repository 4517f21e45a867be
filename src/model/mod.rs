//! The decoder model: one ONNX Runtime session, its I/O contract discovered
//! at load, and one forward pass (`tokens + past KV → hidden states + present KV`).
//!
//! # Threading
//! `ort::Session::run` takes `&mut self`, so the session sits behind a mutex.
//! The server calls [`Model`] from one engine thread, so the lock is never
//! contended there; library users may call it from any thread.
//!
//! # The contract (Hugging Face optimum / onnx-community decoder layout)
//! inputs `input_ids` i64 `[b, s]`, `attention_mask` i64 `[b, past+s]`,
//! optional `position_ids` i64 `[b, s]`, `past_key_values.{i}.key|value`
//! `[b, kv_heads, past, head_dim]`; outputs `last_hidden_state` `[b, s, hidden]`
//! and `present.{i}.key|value` `[b, kv_heads, past+s, head_dim]`. Layers, KV
//! heads, head_dim and the element type are read from the session, never assumed.
//!
//! # Layout
//! * this module: [`Model`] (the session, [`Model::forward`] and
//!   [`Model::forward_batch`]) and [`Hidden`];
//! * `contract`: [`ModelSpec`] and [`KvDtype`], discovered from the session;
//! * `kv`: [`KvCache`], and the packing of several caches into one batched
//!   call;
//! * `ledger`: the bytes of every live cache and running call, and in test
//!   builds a census of the tensors that exist beside it
//!   ([`Model::ledger_snapshot`]);
//! * `broken` (test builds): calls broken on purpose, for the tests'
//!   negative controls;
//! * `profile`: the embedding statistics, learned head and templates
//!   shipped beside the model ([`EmbeddingStats`], [`EmbeddingHead`],
//!   [`Templates`]).

#[cfg(feature = "faults")]
mod broken;
mod contract;
mod kv;
mod ledger;
mod profile;

pub use contract::{KvDtype, ModelSpec};
use contract::{discover, read_config};
pub use kv::KvCache;
pub use ledger::Snapshot as LedgerSnapshot;
use ledger::{Held, Ledger, Reservation};
pub use profile::{
    EmbeddingHead, EmbeddingStats, HEAD_FILE, STATS_FILE, STATS_POOLINGS, Standardizer, TEMPLATES_FILE, Template,
    Templates, Whitening, unit,
};

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use half::f16;
use ort::{
    session::{Session, SessionInputValue, SessionOutputs, builder::GraphOptimizationLevel},
    value::{DynValue, Tensor},
};

use crate::{
    runtime::{self, RuntimeError},
    tokenizer::{TextTokenizer, TokenizerError},
};

/// The file a model directory is served from.
pub const DEFAULT_MODEL_FILE: &str = "model.onnx";

/// Why a model did not load or a forward pass failed.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// ONNX Runtime is missing.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The model path is not a model.
    #[error("{path}: {reason}")]
    Path {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer did not load.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// config.json exists but is not JSON.
    #[error("{path}: invalid config.json")]
    Config {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        #[source]
        source: serde_json::Error,
    },
    /// The graph breaks the decoder contract.
    #[error("{path}: breaks the decoder contract: {reason}")]
    Contract {
        /// The model file.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// The embedding statistics or templates beside the model are missing or wrong.
    #[error("{path}: {reason}")]
    Profile {
        /// The file.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// ONNX Runtime failed.
    #[error("ONNX Runtime failed to {action}")]
    Ort {
        /// What was being done.
        action: &'static str,
        /// The runtime's error.
        #[source]
        source: ort::Error,
    },
}

pub(crate) fn ort_err(action: &'static str) -> impl FnOnce(ort::Error) -> ModelError {
    move |source| ModelError::Ort { action, source }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// ONNX Runtime intra-op threads; 0 means one per core.
    pub threads: usize,
    /// An explicit ONNX Runtime library (otherwise: see [`crate::runtime`]).
    pub onnxruntime: Option<PathBuf>,
}

/// Names of the graph's inputs and outputs, built once.
#[derive(Debug)]
struct IoNames {
    past: Vec<String>,
    present: Vec<String>,
}

/// A loaded decoder model with its tokenizer. Share it with `Arc`.
#[derive(Debug)]
pub struct Model {
    spec: ModelSpec,
    tokenizer: TextTokenizer,
    session: Mutex<Session>,
    io: IoNames,
    /// Bytes held by every live [`KvCache`] of this model (and a running call's).
    ledger: Arc<Ledger>,
    /// Model calls (`Session::run`) so far.
    calls: AtomicU64,
    stats: EmbeddingStats,
    head: EmbeddingHead,
    templates: Templates,
    probe_ids: Vec<u32>,
}

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
    /// Loads a model: a directory (served from `model.onnx`) or one `.onnx`
    /// file, with `tokenizer.json` (required) and `config.json` (optional)
    /// beside it.
    ///
    /// # Errors
    /// A [`ModelError`] saying what is missing: ONNX Runtime, the file, the
    /// tokenizer, or a part of the I/O contract.
    pub fn open(path: impl AsRef<Path>, options: &ModelOptions) -> Result<Arc<Model>, ModelError> {
        let path = path.as_ref();
        let (dir, file) = if path.is_dir() {
            (path.to_path_buf(), path.join(DEFAULT_MODEL_FILE))
        } else {
            let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
            (dir, path.to_path_buf())
        };
        if !file.is_file() {
            let reason = if path.is_dir() {
                format!("no {DEFAULT_MODEL_FILE} in this directory (run `make models` to prepare one)")
            } else {
                "no such model file (run `make models` to prepare one)".to_string()
            };
            return Err(ModelError::Path { path: file, reason });
        }
        // The tokenizer first: it is cheap and its absence is fatal.
        let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json"))?;
        let config = read_config(&dir.join("config.json"))?;
        let environment = runtime::environment(options.onnxruntime.as_deref())?;
        let threads = if options.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            options.threads
        };
        let session = Session::builder(environment)
            .and_then(|b| {
                b.with_optimization_level(GraphOptimizationLevel::All)
                    .map_err(Into::into)
            })
            .and_then(|b| b.with_intra_threads(threads).map_err(Into::into))
            .and_then(|b| b.with_inter_threads(1).map_err(Into::into))
            .and_then(|mut b| b.commit_from_file(&file))
            .map_err(ort_err("load the model"))?;

        let name = config.name.clone().unwrap_or_else(|| {
            dir.file_name()
                .map_or_else(|| "model".to_string(), |n| n.to_string_lossy().into_owned())
        });
        let file_name = file
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        let spec = discover(
            &session,
            &file,
            &config,
            format!("{name} ({file_name})"),
            tokenizer.vocab_size(),
        )?;
        // The embedding profile after the contract: a graph that is not a
        // decoder gets the contract's message (e.g. "run prepare.py import").
        let templates = Templates::read(&dir.join(TEMPLATES_FILE))?;
        let probe_ids = tokenizer.encode(&templates.probe)?;
        let stats = EmbeddingStats::read(&dir.join(STATS_FILE), spec.hidden_size, &name)?;
        let head = EmbeddingHead::read(&dir.join(HEAD_FILE), spec.hidden_size, &name, &templates.probe)?;
        let io = IoNames {
            past: (0..spec.layers)
                .flat_map(|i| [format!("past_key_values.{i}.key"), format!("past_key_values.{i}.value")])
                .collect(),
            present: (0..spec.layers)
                .flat_map(|i| [format!("present.{i}.key"), format!("present.{i}.value")])
                .collect(),
        };
        tracing::info!(
            model = %spec.name,
            layers = spec.layers,
            kv_heads = spec.kv_heads,
            head_dim = spec.head_dim,
            hidden = spec.hidden_size,
            kv_dtype = spec.kv_dtype.name(),
            threads,
            "model loaded"
        );
        Ok(Arc::new(Model {
            spec,
            tokenizer,
            session: Mutex::new(session),
            io,
            ledger: Arc::new(Ledger::default()),
            calls: AtomicU64::new(0),
            stats,
            head,
            templates,
            probe_ids,
        }))
    }

    /// What the model is.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// The background statistics of its pooled vectors.
    pub fn embedding_stats(&self) -> &EmbeddingStats {
        &self.stats
    }

    /// The learned head of [`crate::conversation::Pooling::ProbeMean`].
    pub fn embedding_head(&self) -> &EmbeddingHead {
        &self.head
    }

    /// Its input-type templates and probe.
    pub fn templates(&self) -> &Templates {
        &self.templates
    }

    /// The probe's token ids.
    pub fn probe_ids(&self) -> &[u32] {
        &self.probe_ids
    }

    /// Bytes held by all live KV caches of this model.
    pub fn kv_cache_bytes(&self) -> u64 {
        self.ledger.bytes()
    }

    /// The ledger beside an independent census of the KV tensors that exist
    /// (measured from their shapes), read when no model call runs (waiting
    /// for the running one): test builds only (the `faults` feature), `None`
    /// otherwise. See the `ledger` module.
    pub fn ledger_snapshot(&self) -> Option<LedgerSnapshot> {
        self.ledger.snapshot()
    }

    /// Model calls run so far (one per [`Model::forward`] or [`Model::forward_batch`]).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Bytes [`Model::forward`] of `new` tokens on a cache of `past` adds
    /// to [`Model::kv_cache_bytes`] while it runs: its `present.*` outputs,
    /// which become the new cache. (The cache it reads is counted already.)
    pub fn call_bytes(&self, past: usize, new: usize) -> u64 {
        (past + new) as u64 * self.spec.kv_bytes_per_token()
    }

    /// Bytes [`Model::forward_batch`] over rows of `(past, new)` tokens adds
    /// while it runs: the pasts packed into one `[B, heads, P, d]` tensor per
    /// layer, the batched `present.*` (`B × (P + N)` slots) and each row's
    /// own new cache copied out of them. One row is a [`Model::call_bytes`].
    pub fn batch_call_bytes(&self, rows: &[(usize, usize)]) -> u64 {
        if let [(past, new)] = rows {
            return self.call_bytes(*past, *new);
        }
        let b = rows.len();
        let p = rows.iter().map(|r| r.0).max().unwrap_or(0);
        let n = rows.iter().map(|r| r.1).max().unwrap_or(0);
        let own: usize = rows.iter().map(|(p, n)| p + n).sum();
        (b * p + b * (p + n) + own) as u64 * self.spec.kv_bytes_per_token()
    }

    /// An empty cache.
    pub fn empty_cache(&self) -> KvCache {
        KvCache {
            tensors: Vec::new(),
            len: 0,
            held: Held::none(&self.ledger),
        }
    }

    /// A cache of `len` tokens over `tensors`, its bytes taken from `reserved`.
    fn cache(&self, reserved: &mut Reservation, tensors: Vec<DynValue>, len: usize) -> KvCache {
        let held = reserved.hold(len as u64 * self.spec.kv_bytes_per_token(), &tensors);
        KvCache { tensors, len, held }
    }

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
    fn forward_at(
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
        let empty_shape = [1usize, self.spec.kv_heads, 0, self.spec.head_dim];
        for (i, name) in self.io.past.iter().enumerate() {
            let value: SessionInputValue<'_> = match past.tensors.get(i) {
                Some(t) => t.into(),
                None => match self.spec.kv_dtype {
                    KvDtype::F32 => Tensor::from_array((empty_shape, Vec::<f32>::new())).map(Into::into),
                    KvDtype::F16 => Tensor::from_array((empty_shape, Vec::<f16>::new())).map(Into::into),
                }
                .map_err(ort_err("create an empty KV cache"))?,
            };
            inputs.push((name.as_str(), value));
        }

        let keep = keep.start.min(s)..keep.end.min(s);
        let _call = self.ledger.call();
        let mut reserved = self.ledger.reserve(self.call_bytes(p, s));
        metrics::histogram!("se_batch_rows").record(1.0);
        let (hidden, tensors) = self.run(inputs, |outputs| {
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
        Ok((hidden, self.cache(&mut reserved, tensors, total)))
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
        let mut reserved = self.ledger.reserve(self.call_bytes(0, len));
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
        let tensors = cache
            .tensors
            .iter()
            .map(|t| match self.spec.kv_dtype {
                KvDtype::F32 => kv::prefix::<f32>(t, cache.len, len, heads, d),
                KvDtype::F16 => kv::prefix::<f16>(t, cache.len, len, heads, d),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(self.cache(&mut reserved, tensors, len))
    }

    /// Runs the session once (counted in [`Model::calls`]) and hands its outputs to `read`.
    fn run<R>(
        &self,
        inputs: Vec<(&str, SessionInputValue<'_>)>,
        read: impl FnOnce(&mut SessionOutputs<'_>) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        let mut session = self.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let _call = self.calls.fetch_add(1, Ordering::Relaxed) + 1;
        #[cfg(feature = "faults")]
        crate::faults::before_call(_call).map_err(ort_err("run the model"))?;
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
            KvDtype::F32 => {
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
            KvDtype::F16 => {
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
            if row.cut == 0 {
                return Ok(vec![(hidden, cache)]);
            }
            return Ok(vec![(hidden, self.truncate(&cache, cache.len() - row.cut)?)]);
        }
        let b = rows.len();
        let p = rows.iter().map(|r| r.past.len).max().unwrap_or(0);
        let n = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let total = p + n;
        // Counted before the packed pasts are made.
        let shape: Vec<(usize, usize)> = rows.iter().map(|r| (r.past.len, r.ids.len())).collect();
        let _call = self.ledger.call();
        let mut reserved = self.ledger.reserve(self.batch_call_bytes(&shape));
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
                KvDtype::F32 => kv::pack_past::<f32>(rows, t, p, self.spec.kv_heads, self.spec.head_dim)?,
                KvDtype::F16 => kv::pack_past::<f16>(rows, t, p, self.spec.kv_heads, self.spec.head_dim)?,
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
                    KvDtype::F32 => {
                        kv::unpack_present::<f32>(&present, rows, (p, n), self.spec.kv_heads, self.spec.head_dim)?
                    }
                    KvDtype::F16 => {
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
                (hidden, self.cache(&mut reserved, tensors, len))
            })
            .collect())
    }
}
