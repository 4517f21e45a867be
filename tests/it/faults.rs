//! Faults from inside, through the `faults` feature's hook (`SE_FAULTS`,
//! src/faults.rs): a model call that fails mid-turn, mid-chunk of a long
//! turn and mid-batch leaves every conversation as it was; a turn whose
//! stream goes away while its call runs is dropped without harm; a dead
//! engine says so and the process exits non-zero. Model calls are counted
//! from 1 (the warm-up), so each test knows which call it breaks, and calls
//! that must be running while something else happens are held (`hold:N`)
//! until the test releases them. Streams take the defaults (PROBE_MEAN): the
//! probe's 12 tokens ride at the end of each turn's call(s).

use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::support::{
    DEADLINE, models,
    oracle::{F32, assert_close, oracle, stream_defaults},
    server::{Gate, Launch, TestServer},
    stream::{Talker, answer, embedding, end_status, open, turn},
    tokens,
};

/// A turn that must fail in-band with INTERNAL, the stream going on.
async fn fails_internally(talker: &mut Talker, text: &str) {
    let e = talker.fails(text).await;
    assert_eq!(e.code, Code::Internal as i32, "{e:?}");
    assert!(e.message.contains("unchanged"), "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A model call that fails mid-turn (the turn's tokens and its probe's):
/// INTERNAL in-band, the KV tensors and the context exactly as before (the
/// next turn meets the oracle without it), twice in one stream.
async fn a_failed_call_mid_turn_changes_nothing() {
    // 1 the warm-up, 2 the first turn, 3 the second (fails), 4 the third,
    // 5 the fourth (fails).
    let server = Launch::new(&[])
        .env("SE_FAULTS", "fail:3,fail:5")
        .log("warn")
        .process()
        .await;
    let mut s = Talker::open(&mut server.client().await).await;
    s.say("first", "def add(a, b): return a + b").await;
    let before = server.census().await;
    fails_internally(&mut s, "this turn's call fails").await;
    let after = server.census().await;
    assert_eq!(after.bytes, before.bytes, "no KV tensor kept or lost: {after:?}");
    assert_eq!(after.stats.kv_cache_bytes, after.bytes);
    s.say("third", "and this one succeeds on the old context").await;
    let before = server.census().await;
    fails_internally(&mut s, "this turn's call fails too").await;
    let after = server.census().await;
    assert_eq!(after.stats.model_calls_total, 5, "one call per turn, the probe in it");
    assert_eq!(after.bytes, before.bytes, "the turn's new cache was dropped");
    s.say("fifth", "and the context is as before the failed turn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A chunk of a long turn that fails part-way: the part-built cache is
/// dropped (the census), the conversation is as before the turn.
async fn a_failed_chunk_of_a_long_turn_changes_nothing() {
    // Chunks of 16, each turn's tokens followed by the probe's 12 (which
    // ride with the last chunk): 1-2 the warm-up (19 + 12 tokens), 3 "short"
    // (6 + 12), the long turn calls 4 on (five or more); call 6, its third,
    // fails.
    let server = Launch::new(&["--prefill-chunk-tokens", "16"])
        .env("SE_FAULTS", "fail:6")
        .log("warn")
        .process()
        .await;
    let long = "alpha beta gamma delta ".repeat(15);
    assert!(tokens::turn(&long, "user").0.len() > 48, "five chunks or more");
    let mut s = Talker::open(&mut server.client().await).await;
    s.say("short", "short").await;
    let before = server.census().await;
    fails_internally(&mut s, &long).await;
    let after = server.census().await;
    assert_eq!(after.bytes, before.bytes, "part-built cache gone: {after:?}");
    assert_eq!(
        after.stats.model_calls_total, 6,
        "the rest of the prefill (and the probe) was not run"
    );
    s.say("after", "after the failed long turn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A batched call that fails: every turn in it is answered (each run alone
/// after the failure), each equal to its oracle. The call before it is held
/// until the four turns are queued, so they are certain to share the call.
async fn a_failed_batch_still_answers_every_turn() {
    // 1 the warm-up, 2 "hello" (held), 3 the batch of four: fails; 4-7 each alone.
    let gate = Gate::new();
    let server = Launch::new(&[])
        .faults("hold:2,fail:3", &gate)
        .log("warn")
        .process()
        .await;
    let mut client = server.client().await;
    let (hello_tx, mut hello_rx) = open(&mut client).await;
    hello_tx.send(turn("hello", "hello", "")).await.unwrap();
    server
        .wait_stats("the held call started", |s| s.model_calls_total == 2)
        .await;
    let texts: Vec<String> = (0..4).map(|i| format!("stream {i}: what does this return?")).collect();
    let mut shorts = Vec::new();
    for text in &texts {
        let (tx, rx) = open(&mut client).await;
        tx.send(turn("t", text, "user")).await.unwrap();
        shorts.push((tx, rx));
    }
    server
        .wait_stats("four queued behind the held call", |s| s.queued_turns == 5)
        .await;
    gate.open(2);
    embedding(&answer(&mut hello_rx).await);
    let model = models::tiny();
    for ((_, rx), text) in shorts.iter_mut().zip(&texts) {
        let r = answer(rx).await;
        let (ids, span) = tokens::turn(text, "user");
        let want = oracle(&model, &ids, span, &stream_defaults());
        assert_close(text, &embedding(&r).values, &want, F32);
    }
    let after = server.wait_stats("all answered", |s| s.queued_turns == 0).await;
    assert_eq!(
        after.model_calls_total,
        3 + 4,
        "the failed batch, then each turn alone: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A turn whose stream is cancelled while its (single) model call runs:
/// the call finishes, its result is dropped, the conversation and every
/// tensor with it are freed, and the server goes on serving (a second
/// stream's next turn is exact).
async fn a_turn_cancelled_mid_call_is_dropped_cleanly() {
    // 1 the warm-up, 2 the bystander's first turn, 3 the doomed turn (held).
    let gate = Gate::new();
    let server = Launch::new(&[]).faults("hold:3", &gate).log("warn").process().await;
    let mut bystander = Talker::open(&mut server.client().await).await;
    bystander.say("first", "a bystander's first turn").await;
    let before = server.census().await;

    let mut client = server.client().await;
    let (tx, rx) = open(&mut client).await;
    tx.send(turn("doomed", "a turn whose client goes away", "user"))
        .await
        .unwrap();
    server
        .wait_stats("the doomed call started", |s| s.model_calls_total == 3)
        .await;
    drop((tx, rx, client)); // the client cancels mid-call
    server
        .wait_stats("the doomed stream gone", |s| s.open_streams == 1)
        .await;
    gate.open(3);
    let after = server.wait_stats("the call over", |s| s.queued_turns == 0).await;
    assert_eq!(after.turns_total, before.stats.turns_total + 1, "the doomed turn ran");
    let census = server.census().await;
    assert_eq!(
        census.bytes, before.bytes,
        "only the bystander's tensors are left: {census:?}"
    );
    assert_eq!(census.stats.kv_cache_bytes, census.bytes);
    bystander.say("second", "the bystander goes on").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The engine thread panics: the turn's stream and an idle one end with
/// UNAVAILABLE "the inference engine has stopped", a health Watch opened
/// before sees NOT_SERVING, and the process exits non-zero.
async fn a_dead_engine_says_so_and_the_process_exits() {
    // 1 the warm-up, 2 the idle stream's turn, 3 panics.
    let mut server: TestServer = Launch::new(&[]).env("SE_FAULTS", "panic:3").log("warn").process().await;
    let mut health = HealthClient::new(server.channel().await)
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("a health watch")
        .into_inner();
    let mut idle = Talker::open(&mut server.client().await).await;
    idle.say("idle", "an idle stream's turn").await;
    let mut dying = Talker::open(&mut server.client().await).await;
    dying.tx.send(turn("t", "the call that panics", "user")).await.unwrap();
    for (what, rx) in [("the turn's stream", &mut dying.rx), ("an idle stream", &mut idle.rx)] {
        let status = end_status(rx).await;
        assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
        assert!(status.message().contains("engine has stopped"), "{what}: {status:?}");
    }
    let not_serving = async {
        while let Some(status) = tokio_stream::StreamExt::next(&mut health).await {
            if status.expect("a health status").status() == ServingStatus::NotServing {
                return;
            }
        }
        panic!("the health watch ended before NOT_SERVING");
    };
    tokio::time::timeout(DEADLINE, not_serving)
        .await
        .expect("NOT_SERVING in time");
    let status = server.wait_exit().await;
    assert!(!status.success(), "a dead engine exits non-zero: {status:?}");
}
