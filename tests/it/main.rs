//! Integration tests, one binary (one link) with a module per area; what
//! they share is in `support`.
//!
//! Models: `models/tiny` (random weights, real tokenizer and contract) for
//! most tests, `models/tiny-qwen3` (the same in Qwen3's architecture) for the
//! oracle on it, `models/qwen2.5-coder-0.5b-instruct` for the real-model
//! ones. `make test` prepares them all, and every test runs in every `cargo test`: a
//! missing model fails its tests (with "run `make models`"), never skips them.
//! The tests need the `faults` feature (`make test` turns it on): its fault
//! plans and its census of live KV tensors are how they see inside. Cargo.toml
//! makes this target require it, so `cargo test` without it runs only the
//! unit tests; `make test` runs both.

mod bad_input;
mod card;
mod faults;
mod grpc;
mod memory;
mod operations;
mod oracle;
mod prefix;
mod properties;
mod runtime;
mod security;
mod support;
