//! Test-only fault injection in model calls: the cargo feature `faults` (on
//! in `make test`, never in `make serve`'s release build) compiles it in;
//! without it [`before_call`] is an empty function, so the one call site in
//! the model's run needs no condition of its own.
//!
//! `SE_FAULTS` lists model calls, counted from 1 since start (the warm-up is
//! call 1), and what happens at each: `fail:N` makes call N fail as ONNX
//! Runtime would (an error, nothing computed), `fail:N-M` each call from N
//! to M, `panic:N` panics in call N (on the engine thread: the engine dies),
//! `hold:N` holds call N, before it runs, until a file named `N` exists in
//! the directory `SE_FAULTS_GATE` names (at most [`HOLD_LIMIT`]): a test
//! knows the engine is busy with call N for as long as it wants, so what
//! queues behind it does not depend on how fast the machine is. For example
//! `SE_FAULTS=hold:3,fail:4`. Unset, nothing happens.

#[cfg(feature = "faults")]
use std::{path::PathBuf, sync::OnceLock, time::Duration};

/// Without the `faults` feature: nothing happens.
#[cfg(not(feature = "faults"))]
#[inline(always)]
pub(crate) fn before_call(_call: u64) -> Result<(), ort::Error> {
    Ok(())
}

/// The longest a held call waits for its gate (then it runs anyway).
#[cfg(feature = "faults")]
pub const HOLD_LIMIT: Duration = Duration::from_secs(120);

#[cfg(feature = "faults")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Fail,
    Panic,
    Hold,
}

#[cfg(feature = "faults")]
fn plan() -> &'static [(Fault, u64, u64)] {
    static PLAN: OnceLock<Vec<(Fault, u64, u64)>> = OnceLock::new();
    PLAN.get_or_init(|| {
        std::env::var("SE_FAULTS")
            .map(|spec| parse(&spec).unwrap_or_else(|e| panic!("SE_FAULTS={spec:?}: {e}")))
            .unwrap_or_default()
    })
}

#[cfg(feature = "faults")]
fn parse(spec: &str) -> Result<Vec<(Fault, u64, u64)>, String> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (kind, calls) = item.trim().split_once(':').ok_or("each item is kind:calls")?;
            let kind = match kind {
                "fail" => Fault::Fail,
                "panic" => Fault::Panic,
                "hold" => Fault::Hold,
                other => return Err(format!("unknown fault {other:?} (fail, panic or hold)")),
            };
            let (from, to) = calls.split_once('-').unwrap_or((calls, calls));
            let n = |s: &str| s.parse::<u64>().map_err(|e| format!("{s:?}: {e}"));
            Ok((kind, n(from)?, n(to)?))
        })
        .collect()
}

/// Called before model call number `call` runs.
///
/// # Errors
/// The injected failure.
///
/// # Panics
/// When the plan says so.
#[cfg(feature = "faults")]
pub(crate) fn before_call(call: u64) -> Result<(), ort::Error> {
    for &(fault, from, to) in plan() {
        if (from..=to).contains(&call) {
            match fault {
                Fault::Fail => return Err(ort::Error::new(format!("injected fault: model call {call} fails"))),
                Fault::Panic => panic!("injected fault: model call {call} panics"),
                Fault::Hold => hold(call),
            }
        }
    }
    Ok(())
}

/// Waits until the call's gate file exists (or [`HOLD_LIMIT`] passes).
#[cfg(feature = "faults")]
fn hold(call: u64) {
    let gate = std::env::var_os("SE_FAULTS_GATE")
        .map(|dir| PathBuf::from(dir).join(call.to_string()))
        .unwrap_or_else(|| panic!("SE_FAULTS holds call {call}: set SE_FAULTS_GATE to the directory that releases it"));
    let started = std::time::Instant::now();
    while !gate.exists() && started.elapsed() < HOLD_LIMIT {
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[cfg(all(test, feature = "faults"))]
mod tests {
    use super::*;

    #[test]
    fn plans_parse() {
        assert_eq!(
            parse("fail:3, fail:5-7,panic:9,hold:2").unwrap(),
            vec![
                (Fault::Fail, 3, 3),
                (Fault::Fail, 5, 7),
                (Fault::Panic, 9, 9),
                (Fault::Hold, 2, 2)
            ]
        );
        assert!(parse("explode:1").is_err());
        assert!(parse("fail:x").is_err());
        assert!(parse("").unwrap().is_empty());
    }
}
