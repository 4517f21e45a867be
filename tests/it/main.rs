//! Integration tests, one binary (one link) with a module per area.
//!
//! Models: `models/tiny` (random weights, real tokenizer and contract) for
//! most tests; `models/qwen2.5-coder-0.5b-instruct` for the real-model ones.
//! `make test` prepares both and sets `SE_REQUIRE_MODELS=1`, which turns a
//! missing model into a failure instead of a printed skip.

mod common;
mod grpc;
mod oracle;
mod runtime;
