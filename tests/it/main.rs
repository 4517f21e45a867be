//! Integration tests, one binary (one link) with a module per area.
//!
//! Models: `models/tiny` (random weights, real tokenizer and contract) for
//! most tests; `models/qwen2.5-coder-0.5b-instruct` for the real-model ones.
//! `make test` prepares both, and every test runs in every `cargo test`: a
//! missing model fails its tests (with "run `make models`"), never skips them.

mod bad_input;
mod common;
// Needs the server built with the `faults` feature (`make test` turns it on).
#[cfg(feature = "faults")]
mod faults;
mod grpc;
mod memory;
mod operations;
mod oracle;
mod properties;
mod runtime;
mod security;
