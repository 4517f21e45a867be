//! stateful-embedder: a gRPC server that turns long-lived conversations into
//! embeddings, one turn at a time.
//!
//! Each bidirectional `Converse` stream owns one conversation: the decoder's
//! KV cache and the token ids behind it. Each turn is prefilled on top of the
//! cached context in one model call and answered with an embedding; the cache
//! is freed the moment the stream ends (unless a resumable session keeps the
//! conversation for a new stream), and all caches together stay within one
//! KV budget, idle ones evicted and rebuilt by recomputation.
//!
//! # Layout
//! * [`runtime`] finds and loads ONNX Runtime (`load-dynamic`); [`cpu`] reads
//!   the CPU features its kernels (and so each variant's speed) depend on.
//! * [`tokenizer`] turns text (and ChatML roles) into token ids.
//! * [`model`] owns the ONNX Runtime session and runs forward passes, one
//!   conversation's or several in one padded call; `model::contract`
//!   discovers the I/O contract ([`model::ModelSpec`]) and `model::kv` holds
//!   [`model::KvCache`] (a conversation's cache, with its byte ledger) and the
//!   packing of caches into a batch; `model::profile` reads what ships beside
//!   the model for embedding quality ([`model::EmbeddingStats`]: background
//!   statistics; [`model::EmbeddingHead`]: the learned head;
//!   [`model::Templates`]: input types and the probe).
//! * [`conversation`] is one conversation's state machine
//!   ([`conversation::Conversation::new`], `turn`, `reset`): templates,
//!   pooling (mean, last token, probe, probe and mean), standardisation and
//!   the learned head, truncation, context
//!   window and overflow policies, all-or-nothing turns.
//! * [`schedule`] decides what runs together: it groups turns of several
//!   conversations into shared calls ([`schedule::run_turns`]), cuts a round
//!   of work into chunks, runs long turns (and rebuilds) a chunk per round,
//!   and makes room in the KV budget before each call ([`schedule::Room`]).
//! * [`metrics`] exports Prometheus metrics (`--metrics-addr`); [`auth`]
//!   checks bearer tokens (`--auth-token-file`).
//! * [`memory`] is the KV budget ([`memory::KvBudget`]): the slots
//!   conversations rest in between turns, LRU and idle eviction.
//! * [`engine`] is the one thread that runs the model, fed by a bounded queue
//!   of jobs, each carrying its conversation's slot and a oneshot reply; it
//!   takes what waits each round and hands it to the scheduler, and keeps the
//!   counters (the queue count is tickets that decrement on drop).
//! * [`service`] is the gRPC edge (`embedder.v1.Embedder`): validation, proto
//!   conversions, one task per `Converse` stream, resumable sessions
//!   ([`service::Sessions`]), and every failure in
//!   [`service::ServiceError`] with its gRPC code; [`server`] adds health and
//!   reflection and runs the lifecycle (load, warm up, serve, drain);
//!   [`config`] is the command line; [`client`] is a small Rust client
//!   (`stateful-embedder converse`) for scripts and tests.
//!
//! Data flows `service → engine → schedule → conversation → model/tokenizer`
//! and back; a conversation is taken out of its slot for its turn, so
//! nothing is shared between streams while a turn runs but the model.
//!
//! # Example
//! ```
//! use stateful_embedder::{
//!     conversation::{Conversation, ConversationOptions},
//!     model::{Model, ModelOptions},
//! };
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/models/tiny");
//! let model = Model::open(dir, &ModelOptions::default())?;
//! let mut conv = Conversation::new(&model, ConversationOptions::default())?;
//! let first: Vec<f32> = conv.embed("def add(a, b):\n    return a + b")?;
//! let second = conv.embed("Now make it subtract.")?; // sees the first turn too
//! // The defaults: the probe's and the mean's vectors through the learned head.
//! assert_eq!(first.len(), model.embedding_head().dimensions);
//! assert!(conv.context_len() > 0);
//! conv.reset();
//! assert_eq!(conv.embed("def add(a, b):\n    return a + b")?, first);
//! # let _ = second;
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod client;
pub mod config;
pub mod conversation;
pub mod cpu;
pub mod engine;
#[cfg(feature = "faults")]
pub mod faults;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod runtime;
pub mod schedule;
pub mod server;
pub mod service;
pub mod tokenizer;

/// The generated `embedder.v1` types, client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("embedder.v1");

    /// The encoded descriptor set of `proto/` (with comments), for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/embedder_descriptor.bin"));
}
