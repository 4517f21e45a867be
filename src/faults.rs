//! Test-only fault injection: the cargo feature `faults` (on in `make test`,
//! never in `make serve`'s release build) compiles this in.
//!
//! `SE_FAULTS` lists model calls, counted from 1 since start (the warm-up is
//! call 1), and what happens at each: `fail:N` makes call N fail as ONNX
//! Runtime would (an error, nothing computed), `fail:N-M` each call from N
//! to M, `panic:N` panics in call N (on the engine thread: the engine dies).
//! For example `SE_FAULTS=fail:3,panic:9`. Unset, nothing happens.

use std::sync::OnceLock;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Fail,
    Panic,
}

fn plan() -> &'static [(Fault, u64, u64)] {
    static PLAN: OnceLock<Vec<(Fault, u64, u64)>> = OnceLock::new();
    PLAN.get_or_init(|| {
        std::env::var("SE_FAULTS")
            .map(|spec| parse(&spec).unwrap_or_else(|e| panic!("SE_FAULTS={spec:?}: {e}")))
            .unwrap_or_default()
    })
}

fn parse(spec: &str) -> Result<Vec<(Fault, u64, u64)>, String> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (kind, calls) = item.trim().split_once(':').ok_or("each item is kind:calls")?;
            let kind = match kind {
                "fail" => Fault::Fail,
                "panic" => Fault::Panic,
                other => return Err(format!("unknown fault {other:?} (fail or panic)")),
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
pub fn before_call(call: u64) -> Result<(), ort::Error> {
    for &(fault, from, to) in plan() {
        if (from..=to).contains(&call) {
            match fault {
                Fault::Fail => return Err(ort::Error::new(format!("injected fault: model call {call} fails"))),
                Fault::Panic => panic!("injected fault: model call {call} panics"),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_parse() {
        assert_eq!(
            parse("fail:3, fail:5-7,panic:9").unwrap(),
            vec![(Fault::Fail, 3, 3), (Fault::Fail, 5, 7), (Fault::Panic, 9, 9)]
        );
        assert!(parse("explode:1").is_err());
        assert!(parse("fail:x").is_err());
        assert!(parse("").unwrap().is_empty());
    }
}
