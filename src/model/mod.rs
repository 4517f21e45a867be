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
//! * `contract`: [`ModelSpec`] and [`FloatType`], discovered from the session;
//! * `kv`: [`KvCache`], and the packing of several caches into one batched
//!   call;
//! * `prefix`: shared prefixes, the KV rows of leading turns held once for
//!   every conversation that begins with them ([`Segment`]);
//! * `ledger`: the bytes of every live cache and running call, and in test
//!   builds a census of the tensors that exist beside it
//!   ([`Model::ledger_snapshot`]);
//! * `broken` (test builds): calls broken on purpose, for the tests'
//!   negative controls;
//! * `card`: the model's card, how it embeds ([`Card`]: its pooling, end
//!   token, normalisation, Matryoshka widths, templates and probe);
//! * `profile`: the embedding statistics and the learned head shipped
//!   beside the model ([`EmbeddingStats`], [`EmbeddingHead`]).

#[cfg(feature = "faults")]
mod broken;
mod card;
mod contract;
mod faults;
mod forward;
mod kv;
mod ledger;
mod prefix;
mod profile;
mod tokenizer;

pub use card::{CARD_FILE, Card, NativePooling, Template, Templates};
pub use contract::{FloatType, ModelSpec};
use contract::{discover, read_config};
pub use kv::KvCache;
pub use ledger::{Call, Snapshot as LedgerSnapshot};
use ledger::{Held, Ledger, Reservation};
pub use prefix::{PrefixStats, Segment};
pub use profile::{
    EmbeddingHead, EmbeddingStats, HEAD_FILE, STATS_FILE, STATS_POOLINGS, Standardizer, Whitening, unit,
};

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use ort::{
    session::{Session, builder::GraphOptimizationLevel},
    value::DynValue,
};

pub use forward::{BatchRow, Hidden, IN_PLACE_CUT_RATIO};
pub use tokenizer::{ROLES, TextTokenizer, TokenizerError, TurnTokens};

use crate::platform::onnxruntime::{self, RuntimeError};

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
    /// The card, embedding statistics or head beside the model are missing or wrong.
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
    /// An explicit ONNX Runtime library (otherwise: see [`crate::platform::onnxruntime`]).
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
    head: Option<EmbeddingHead>,
    card: Card,
    probe_ids: Vec<u32>,
    /// The card's end token, as the one id it must be.
    end_ids: Vec<u32>,
    /// The live shared prefixes.
    prefixes: prefix::Index,
    /// Contexts up to this many tokens are shared ([`Model::set_shared_prefix_tokens`]).
    shared_prefix_tokens: AtomicUsize,
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
        let environment = onnxruntime::environment(options.onnxruntime.as_deref())?;
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
        let card_path = dir.join(CARD_FILE);
        let card = Card::read(&card_path, &name)?;
        let probe_ids = tokenizer.encode(&card.templates.probe)?;
        let end_ids = match &card.end_token {
            None => Vec::new(),
            Some(token) => vec![tokenizer.token_id(token).ok_or_else(|| ModelError::Profile {
                path: card_path.clone(),
                reason: format!("the end token {token:?} is not one token of tokenizer.json"),
            })?],
        };
        let stats = EmbeddingStats::read(&dir.join(STATS_FILE), spec.hidden_size, &name)?;
        // The head is the vector of a PROBE_MEAN card; beside another card
        // it is optional (an embedding-tuned model has its own vector).
        let head_path = dir.join(HEAD_FILE);
        let head = if card.pooling == NativePooling::ProbeMean || head_path.exists() {
            Some(EmbeddingHead::read(
                &head_path,
                spec.hidden_size,
                &name,
                &card.templates.probe,
            )?)
        } else {
            None
        };
        let width = match (&head, card.pooling) {
            (Some(head), NativePooling::ProbeMean) => head.dimensions,
            _ => spec.hidden_size,
        };
        if let Some(&widest) = card.dimensions.last()
            && widest > width
        {
            return Err(ModelError::Profile {
                path: card_path,
                reason: format!(
                    "Matryoshka width {widest} is over the {width} components of the model's {} vector",
                    card.pooling.name()
                ),
            });
        }
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
            card,
            probe_ids,
            end_ids,
            prefixes: prefix::Index::default(),
            shared_prefix_tokens: AtomicUsize::new(0),
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

    /// The learned head of [`crate::conversation::Pooling::ProbeMean`]
    /// (always there when the card's pooling is PROBE_MEAN).
    pub fn embedding_head(&self) -> Option<&EmbeddingHead> {
        self.head.as_ref()
    }

    /// Its card: how it embeds.
    pub fn card(&self) -> &Card {
        &self.card
    }

    /// Its input-type templates and probe (the card's).
    pub fn templates(&self) -> &Templates {
        &self.card.templates
    }

    /// The card's end token as ids (one, or none when the card names none).
    pub fn end_ids(&self) -> &[u32] {
        &self.end_ids
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

    /// Bytes a call over `rows` adds to [`Model::kv_cache_bytes`] at its
    /// peak (see [`Call`]): what the budget makes room for before the call,
    /// and what the call reserves when it runs. (The caches it reads are
    /// counted already.)
    pub fn call_bytes(&self, rows: &[Call]) -> u64 {
        ledger::call_tokens(rows) as u64 * self.spec.kv_bytes_per_token()
    }

    /// An empty cache.
    pub fn empty_cache(&self) -> KvCache {
        KvCache {
            tensors: Vec::new(),
            len: 0,
            base: None,
            slack: 0,
            held: Held::none(&self.ledger),
        }
    }

    /// A cache of `len` tokens over `tensors` (the rows after `base`'s), its
    /// bytes taken from `reserved`.
    fn cache(
        &self,
        reserved: &mut Reservation,
        tensors: Vec<DynValue>,
        len: usize,
        base: Option<Arc<Segment>>,
    ) -> KvCache {
        let own = len - base.as_ref().map_or(0, |b| b.end());
        let held = reserved.hold(own as u64 * self.spec.kv_bytes_per_token(), &tensors);
        KvCache {
            tensors,
            len,
            base,
            slack: 0,
            held,
        }
    }

    /// Contexts of at most this many tokens keep their KV rows in shared
    /// segments, found again by any conversation that begins with the same
    /// turns (see the `prefix` module); 0 (the library's default) shares
    /// nothing. The server sets `--shared-prefix-tokens`.
    pub fn set_shared_prefix_tokens(&self, tokens: usize) {
        self.shared_prefix_tokens.store(tokens, Ordering::Relaxed);
    }

    /// See [`Model::set_shared_prefix_tokens`].
    pub fn shared_prefix_tokens(&self) -> usize {
        self.shared_prefix_tokens.load(Ordering::Relaxed)
    }

    /// The live shared segment of `tokens` right after `parent` (after
    /// nothing: at the start of a context).
    pub fn find_segment(&self, parent: Option<&Arc<Segment>>, tokens: &[u32]) -> Option<Arc<Segment>> {
        self.prefixes.find(parent, tokens)
    }

    /// The deepest live shared segment whose chain's tokens begin `tokens`
    /// (for a context rebuilt without its cache: evicted, or restored).
    pub fn longest_segment(&self, tokens: &[u32]) -> Option<Arc<Segment>> {
        self.prefixes.longest(tokens)
    }

    /// Shares the rows `cache` holds itself (those of `tokens`, after its
    /// base) as a segment after its base, or finds the live segment of the
    /// same tokens made meanwhile (then `cache`'s rows are dropped: every
    /// row is held once).
    ///
    /// # Panics
    /// If `tokens` are not the tokens of the cache's own rows.
    pub fn share(&self, cache: KvCache, tokens: Vec<u32>) -> Arc<Segment> {
        assert_eq!(tokens.len(), cache.own_len(), "a segment's tokens are its rows'");
        let KvCache {
            tensors,
            len,
            base,
            slack,
            held,
        } = cache;
        let rows = KvCache {
            tensors,
            len: len - base.as_ref().map_or(0, |b| b.end()),
            base: None,
            slack,
            held,
        };
        self.prefixes.insert(base, tokens, rows)
    }

    /// A cache that is `segment`'s chain and nothing of its own.
    pub fn segment_cache(&self, segment: Arc<Segment>) -> KvCache {
        KvCache {
            tensors: Vec::new(),
            len: segment.end(),
            base: Some(segment),
            slack: 0,
            held: Held::none(&self.ledger),
        }
    }

    /// Counts prefill a shared segment saved: a turn answered from one
    /// (`hit`), or `tokens` of a rebuild found in one.
    pub fn count_shared(&self, hit: bool, tokens: usize) {
        self.prefixes.saved(hit, tokens);
    }

    /// What is shared now.
    pub fn prefix_stats(&self) -> PrefixStats {
        self.prefixes.stats()
    }
}
