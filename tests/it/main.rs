//! Integration tests, one binary (one link) with a module per area.
//!
//! Models: `models/tiny` (random weights, real tokenizer and contract) for
//! most tests; `models/qwen2.5-coder-0.5b-instruct` for the real-model ones.
//! `make test` prepares both. Real-model tests are `#[ignore]`d, so a plain
//! `cargo test` says in its summary that they did not run; `make test` runs
//! them with `--include-ignored`. A missing model fails a test, never skips it.

mod common;
mod grpc;
mod oracle;
mod runtime;
