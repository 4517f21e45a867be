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
//! The modules are layers, each importing only from those above it in this
//! list (the lowest first):
//! * [`platform`]: the machine (ONNX Runtime's library, CPU features,
//!   available memory).
//! * [`model`]: the decoder: one ONNX Runtime session, its I/O contract
//!   ([`model::ModelSpec`]), forward passes alone and batched, the KV cache
//!   ([`model::KvCache`]), the shared prefixes whose rows caches read in
//!   common ([`model::Segment`]), the ledger of their bytes, the tokenizer, and
//!   what is shipped beside the model: its card ([`model::Card`]: pooling,
//!   end token, widths, templates, probe), statistics and learned head.
//! * [`conversation`]: one conversation ([`conversation::Conversation`]) and
//!   one turn of it (planned once, run call by call, adopted), its options,
//!   and pooling into vectors.
//! * [`engine`]: the one thread that runs the model ([`engine::Engine`]),
//!   fed by a bounded queue; its rounds batch turns of many conversations,
//!   run long turns a call per round, and make room in the KV budget
//!   ([`engine::KvBudget`]) before each call.
//! * [`service`]: the gRPC edge (`embedder.v1.Embedder`): proto conversions,
//!   one task per `Converse` stream, resumable sessions, bearer tokens, every
//!   failure with its gRPC code. Proto types stop here.
//! * [`server`]: the lifecycle (load, warm up, serve, drain) with health,
//!   reflection and metrics, and its [`server::Config`].
//! * [`client`]: a small Rust client (`stateful-embedder converse`).
//!
//! A turn's path: `service` (a stream's request) → `engine` (queued,
//! admitted: the conversation's turn planned once) → its rounds (room in the
//! budget, then the turn's calls, alone or batched) → `model` → back to the
//! `engine`'s reply → `service` (the response). A conversation is taken out
//! of its slot for its turn, so nothing is shared between streams while a
//! turn runs but the model.
//!
//! Test builds (the `faults` feature) add seams in `model`: fault plans for
//! model calls, a census of the KV tensors that exist beside the ledger,
//! and calls broken on purpose for the tests' negative controls.
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
//! let mut conv = Conversation::new(&model, ConversationOptions::for_model(&model))?;
//! let first: Vec<f32> = conv.embed("def add(a, b):\n    return a + b")?;
//! let second = conv.embed("Now make it subtract.")?; // sees the first turn too
//! // The defaults: the probe's vector and the conversation's mean through the learned head.
//! assert_eq!(first.len(), model.embedding_head().expect("a base model has its head").dimensions);
//! assert!(conv.context_len() > 0);
//! conv.reset();
//! assert_eq!(conv.embed("def add(a, b):\n    return a + b")?, first);
//! # let _ = second;
//! # Ok(())
//! # }
//! ```

pub mod client;
pub mod conversation;
pub mod engine;
pub mod model;
pub mod platform;
pub mod server;
pub mod service;

/// The generated `embedder.v1` types, client and server.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("embedder.v1");

    /// The encoded descriptor set of `proto/` (with comments), for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/embedder_descriptor.bin"));
}
