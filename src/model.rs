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
    value::{DynValue, Tensor, TensorElementType, ValueType},
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

fn ort_err(action: &'static str) -> impl FnOnce(ort::Error) -> ModelError {
    move |source| ModelError::Ort { action, source }
}

/// Element type of the KV cache (and of the hidden-state output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// 32-bit float.
    F32,
    /// 16-bit float (the fp16 variant).
    F16,
}

impl KvDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::F16 => 2,
        }
    }

    /// The name clients see (`float32`/`float16`).
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "float32",
            KvDtype::F16 => "float16",
        }
    }

    fn from_ort(t: TensorElementType) -> Option<Self> {
        match t {
            TensorElementType::Float32 => Some(KvDtype::F32),
            TensorElementType::Float16 => Some(KvDtype::F16),
            _ => None,
        }
    }
}

/// What the loaded model is, as discovered from its session and config.json.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A human-readable name (config.json `name`, else the directory name) and file.
    pub name: String,
    /// The ONNX file served.
    pub path: PathBuf,
    /// Decoder layers (`past_key_values.{i}.*` inputs).
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Size of the hidden state (and of a full embedding).
    pub hidden_size: usize,
    /// Element type of the KV cache.
    pub kv_dtype: KvDtype,
    /// Element type of `last_hidden_state`.
    pub hidden_dtype: KvDtype,
    /// Whether the graph takes `position_ids`.
    pub has_position_ids: bool,
    /// Vocabulary size of the tokenizer.
    pub vocab_size: usize,
    /// The longest context the model supports (config.json
    /// `max_position_embeddings`; 8192 when absent).
    pub max_positions: usize,
}

impl ModelSpec {
    /// Bytes of KV cache one token of context costs.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (self.layers * 2 * self.kv_heads * self.head_dim * self.kv_dtype.size()) as u64
    }
}

/// How to load a model.
#[derive(Debug, Clone, Default)]
pub struct ModelOptions {
    /// ONNX Runtime intra-op threads; 0 means one per core.
    pub threads: usize,
    /// An explicit ONNX Runtime library (otherwise: see [`crate::runtime`]).
    pub onnxruntime: Option<PathBuf>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct ConfigJson {
    name: Option<String>,
    hidden_size: Option<usize>,
    max_position_embeddings: Option<usize>,
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
    /// Bytes held by every live [`KvCache`] of this model.
    kv_ledger: Arc<AtomicU64>,
    /// Model calls (`Session::run`) so far.
    calls: AtomicU64,
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

/// A conversation's KV cache: per layer, the `present.{i}.key|value` tensors
/// ONNX Runtime returned, fed back unchanged as `past_key_values.{i}.*`.
/// Its bytes are counted in the model's ledger until it is dropped.
pub struct KvCache {
    tensors: Vec<DynValue>,
    len: usize,
    bytes: u64,
    ledger: Arc<AtomicU64>,
}

impl std::fmt::Debug for KvCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvCache")
            .field("len", &self.len)
            .field("bytes", &self.bytes)
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
        self.bytes
    }
}

impl Drop for KvCache {
    fn drop(&mut self) {
        self.ledger.fetch_sub(self.bytes, Ordering::Relaxed);
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
            kv_ledger: Arc::new(AtomicU64::new(0)),
            calls: AtomicU64::new(0),
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

    /// Bytes held by all live KV caches of this model.
    pub fn kv_cache_bytes(&self) -> u64 {
        self.kv_ledger.load(Ordering::Relaxed)
    }

    /// Model calls run so far (one per [`Model::forward`] or [`Model::forward_batch`]).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// An empty cache.
    pub fn empty_cache(&self) -> KvCache {
        KvCache {
            tensors: Vec::new(),
            len: 0,
            bytes: 0,
            ledger: self.kv_ledger.clone(),
        }
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
            let pos = Tensor::from_array(([1usize, s], (p as i64..total as i64).collect::<Vec<_>>()))
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
        Ok((hidden, self.cache(tensors, total)))
    }

    /// Runs the session once (counted in [`Model::calls`]) and hands its outputs to `read`.
    fn run<R>(
        &self,
        inputs: Vec<(&str, SessionInputValue<'_>)>,
        read: impl FnOnce(&mut SessionOutputs<'_>) -> Result<R, ModelError>,
    ) -> Result<R, ModelError> {
        let mut session = self.session.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.calls.fetch_add(1, Ordering::Relaxed);
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

    /// A cache of `len` tokens over `tensors`, counted in the ledger.
    fn cache(&self, tensors: Vec<DynValue>, len: usize) -> KvCache {
        let bytes = len as u64 * self.spec.kv_bytes_per_token();
        self.kv_ledger.fetch_add(bytes, Ordering::Relaxed);
        KvCache {
            tensors,
            len,
            bytes,
            ledger: self.kv_ledger.clone(),
        }
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
}

impl Model {
    /// Runs several rows in one call: each row's tokens on top of its own
    /// cache. Returns, per row, what [`Model::forward`] would (equal up to
    /// float rounding: the GEMMs see other shapes).
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
            return Ok(vec![self.forward(row.ids, row.past, row.keep.clone())?]);
        }
        let b = rows.len();
        let p = rows.iter().map(|r| r.past.len).max().unwrap_or(0);
        let n = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0);
        let total = p + n;
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
        for (t, name) in self.io.past.iter().enumerate() {
            let packed = match self.spec.kv_dtype {
                KvDtype::F32 => self.pack_past::<f32>(rows, t, p)?,
                KvDtype::F16 => self.pack_past::<f16>(rows, t, p)?,
            };
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
            // Layer by layer, each batched tensor freed once split: the copies
            // never hold more than one layer twice.
            for name in &self.io.present {
                let present = outputs
                    .remove(name)
                    .expect("the contract check at load guarantees present.*");
                let split = match self.spec.kv_dtype {
                    KvDtype::F32 => self.unpack_present::<f32>(&present, rows, p, n)?,
                    KvDtype::F16 => self.unpack_present::<f16>(&present, rows, p, n)?,
                };
                for (row, t) in tensors.iter_mut().zip(split) {
                    row.push(t);
                }
            }
            Ok((hidden, tensors))
        })?;
        Ok(rows
            .iter()
            .zip(hidden)
            .zip(tensors)
            .map(|((r, hidden), tensors)| (hidden, self.cache(tensors, r.past.len + r.ids.len())))
            .collect())
    }

    /// Cache tensor `t` of every row, right-aligned into one `[B, kv_heads, p, d]` tensor.
    fn pack_past<T>(&self, rows: &[BatchRow<'_>], t: usize, p: usize) -> Result<DynValue, ModelError>
    where
        T: ort::value::PrimitiveTensorElementType + Copy + Default + std::fmt::Debug + 'static,
    {
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
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

    /// Each row's own `[1, kv_heads, p_b + n_b, d]` cache out of a batched `present` tensor.
    fn unpack_present<T>(
        &self,
        present: &DynValue,
        rows: &[BatchRow<'_>],
        p: usize,
        n: usize,
    ) -> Result<Vec<DynValue>, ModelError>
    where
        T: ort::value::PrimitiveTensorElementType + Copy + std::fmt::Debug + 'static,
    {
        let (heads, d) = (self.spec.kv_heads, self.spec.head_dim);
        let total = p + n;
        let (_, data) = present.try_extract_tensor::<T>().map_err(ort_err("read present"))?;
        rows.iter()
            .enumerate()
            .map(|(i, r)| {
                let (pi, ni) = (r.past.len, r.ids.len());
                let mut own = Vec::with_capacity(heads * (pi + ni) * d);
                for h in 0..heads {
                    let base = (i * heads + h) * total * d;
                    own.extend_from_slice(&data[base + (p - pi) * d..base + p * d]);
                    own.extend_from_slice(&data[base + (total - ni) * d..base + total * d]);
                }
                Tensor::from_array(([1usize, heads, pi + ni, d], own))
                    .map(Tensor::into_dyn)
                    .map_err(ort_err("create a KV cache"))
            })
            .collect()
    }
}

fn read_config(path: &Path) -> Result<ConfigJson, ModelError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ModelError::Config {
            path: path.to_path_buf(),
            source,
        }),
        Err(_) => Ok(ConfigJson::default()),
    }
}

/// Reads the I/O contract off the session; fails fast on any breach.
fn discover(
    session: &Session,
    path: &Path,
    config: &ConfigJson,
    name: String,
    vocab_size: usize,
) -> Result<ModelSpec, ModelError> {
    let breach = |reason: String| ModelError::Contract {
        path: path.to_path_buf(),
        reason,
    };
    let input = |n: &str| session.inputs().iter().find(|o| o.name() == n).map(|o| o.dtype());
    let output = |n: &str| session.outputs().iter().find(|o| o.name() == n).map(|o| o.dtype());
    let tensor = |t: &ValueType| match t {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect::<Vec<i64>>())),
        _ => None,
    };

    for n in ["input_ids", "attention_mask"] {
        match input(n).and_then(tensor) {
            Some((TensorElementType::Int64, _)) => {}
            Some((ty, _)) => return Err(breach(format!("input {n} is {ty:?}, not int64"))),
            None => return Err(breach(format!("no input {n}"))),
        }
    }
    let has_position_ids = input("position_ids").is_some();

    let mut layers = 0;
    while input(&format!("past_key_values.{layers}.key")).is_some() {
        layers += 1;
    }
    if layers == 0 {
        return Err(breach(
            "no past_key_values.0.key input: not a decoder with a KV cache".into(),
        ));
    }
    let (kv_ty, kv_shape) = input("past_key_values.0.key")
        .and_then(tensor)
        .ok_or_else(|| breach("past_key_values.0.key is not a tensor".into()))?;
    let kv_dtype =
        KvDtype::from_ort(kv_ty).ok_or_else(|| breach(format!("KV cache type {kv_ty:?} is not float32 or float16")))?;
    if kv_shape.len() != 4 || kv_shape[1] <= 0 || kv_shape[3] <= 0 {
        return Err(breach(format!(
            "past_key_values.0.key has shape {kv_shape:?}; expected [batch, kv_heads, past, head_dim] with fixed kv_heads and head_dim"
        )));
    }
    for i in 0..layers {
        for kind in ["key", "value"] {
            let past = format!("past_key_values.{i}.{kind}");
            match input(&past).and_then(tensor) {
                Some((ty, shape))
                    if ty == kv_ty && shape.len() == 4 && shape[1] == kv_shape[1] && shape[3] == kv_shape[3] => {}
                Some((ty, shape)) => {
                    return Err(breach(format!(
                        "{past} is {ty:?} {shape:?}, unlike past_key_values.0.key"
                    )));
                }
                None => return Err(breach(format!("no input {past}"))),
            }
            if output(&format!("present.{i}.{kind}")).is_none() {
                return Err(breach(format!("no output present.{i}.{kind}")));
            }
        }
    }
    if input(&format!("past_key_values.{layers}.value")).is_some() {
        return Err(breach(format!("past_key_values.{layers}.value without a matching key")));
    }

    let Some((hidden_ty, hidden_shape)) = output("last_hidden_state").and_then(tensor) else {
        let hint = if output("logits").is_some() {
            ": it only has logits; run `python models/prepare.py import EXPORT_DIR --out DIR` to add it"
        } else {
            ""
        };
        return Err(breach(format!("no last_hidden_state output{hint}")));
    };
    let hidden_dtype = KvDtype::from_ort(hidden_ty)
        .ok_or_else(|| breach(format!("last_hidden_state is {hidden_ty:?}, not float32 or float16")))?;
    let hidden_size = match hidden_shape.last() {
        Some(&d) if d > 0 => d as usize,
        _ => config
            .hidden_size
            .ok_or_else(|| breach("last_hidden_state's width is dynamic and config.json has no hidden_size".into()))?,
    };
    Ok(ModelSpec {
        name,
        path: path.to_path_buf(),
        layers,
        kv_heads: kv_shape[1] as usize,
        head_dim: kv_shape[3] as usize,
        hidden_size,
        kv_dtype,
        hidden_dtype,
        has_position_ids,
        vocab_size,
        max_positions: config.max_position_embeddings.unwrap_or(8192),
    })
}
