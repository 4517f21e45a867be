//! What the integration tests share, in one place: the models, the oracle
//! and its tolerances, reference token ids, the server under test (in this
//! process or as a child process), Converse streams, a proxy that loses
//! connections.
//!
//! Every wait is bounded by [`DEADLINE`] and fails the test loudly when it
//! passes; nothing sleeps instead of waiting for an event.

#![allow(dead_code)] // each test module uses a part

pub mod models;
pub mod oracle;
pub mod profile;
pub mod proxy;
pub mod server;
pub mod stream;
pub mod tokens;

use std::time::Duration;

/// The longest any test waits for one event (a response, a state, a log
/// line, a process to exit) before it fails: far above what a loaded
/// 2-core machine takes (the slowest seen are model calls of a few seconds
/// in debug builds), so reaching it means something is stuck.
pub const DEADLINE: Duration = Duration::from_secs(60);
