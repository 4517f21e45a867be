//! Faults from inside, through the `faults` feature's hook (`SE_FAULTS`,
//! src/faults.rs): a model call that fails mid-turn, mid-chunk of a long
//! turn and mid-batch leaves every conversation as it was; a dead engine says
//! so and the process exits non-zero. Model calls are counted from 1 (the
//! warm-up), so each test knows which call it breaks. Streams take the
//! defaults (PROBE_MEAN): the probe's 12 tokens ride at the end of each
//! turn's call(s).

use std::time::Duration;

use stateful_embedder::{conversation::ConversationOptions, pb};
use tokio_stream::StreamExt;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    common::{self, F32, assert_close, oracle},
    grpc::{TestServer, embedding, error, open, turn},
};

/// A stream taking turns; its expected context follows only the turns that succeed.
struct Checked {
    tx: tokio::sync::mpsc::Sender<pb::ConverseRequest>,
    rx: tonic::Streaming<pb::ConverseResponse>,
    context: Vec<u32>,
}

impl Checked {
    async fn open(server: &TestServer) -> Checked {
        let (tx, rx) = open(&mut server.client().await).await;
        Checked {
            tx,
            rx,
            context: Vec::new(),
        }
    }

    async fn send(&mut self, text: &str) -> pb::ConverseResponse {
        self.tx.send(turn("t", text, "user")).await.unwrap();
        self.rx.next().await.unwrap().unwrap()
    }

    /// A turn that must succeed and equal the oracle over the context so far.
    async fn good(&mut self, text: &str) {
        let r = self.send(text).await;
        let model = common::tiny();
        let tt = model.tokenizer().turn(text, "user").unwrap();
        let span = self.context.len() + tt.text.start..self.context.len() + tt.text.end;
        self.context.extend_from_slice(&tt.ids);
        let want = oracle(&model, &self.context, span, &ConversationOptions::default());
        assert_close(text, &embedding(&r).values, &want, F32);
    }

    /// A turn that must fail in-band with INTERNAL, the stream going on.
    async fn fails(&mut self, text: &str) {
        let r = self.send(text).await;
        let e = error(&r);
        assert_eq!(e.code, Code::Internal as i32, "{e:?}");
        assert!(e.message.contains("unchanged"), "{e:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A model call that fails mid-turn (the turn's tokens and its probe's):
/// INTERNAL in-band, the KV bytes and the context exactly as before (the
/// next turn meets the oracle without it), twice in one stream.
async fn a_failed_call_mid_turn_changes_nothing() {
    // 1 the warm-up, 2 the first turn, 3 the second (fails), 4 the third,
    // 5 the fourth (fails).
    let server = TestServer::process_with(&[], "warn", &[("SE_FAULTS", "fail:3,fail:5")]).await;
    let mut s = Checked::open(&server).await;
    s.good("def add(a, b): return a + b").await;
    let before = server.wait_stats("after the first turn", |_| true).await;
    s.fails("this turn's call fails").await;
    let after = server.wait_stats("after the failure", |_| true).await;
    assert_eq!(after.kv_cache_bytes, before.kv_cache_bytes, "no byte kept or lost");
    s.good("and this one succeeds on the old context").await;
    let before = server.wait_stats("after the third turn", |_| true).await;
    s.fails("this turn's call fails too").await;
    let after = server.wait_stats("after the second failure", |_| true).await;
    assert_eq!(after.model_calls_total, 5, "one call per turn, the probe in it");
    assert_eq!(
        after.kv_cache_bytes, before.kv_cache_bytes,
        "the turn's new cache was dropped"
    );
    s.good("and the context is as before the failed turn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A chunk of a long turn that fails part-way: the part-built cache is
/// dropped, the conversation is as before the turn.
async fn a_failed_chunk_of_a_long_turn_changes_nothing() {
    // Chunks of 16, each turn's tokens followed by the probe's 12 (which
    // ride with the last chunk): 1-2 the warm-up (19 + 12 tokens), 3 "short"
    // (6 + 12), the long turn calls 4 on (five or more); call 6, its third,
    // fails.
    let server = TestServer::process_with(&["--prefill-chunk-tokens", "16"], "warn", &[("SE_FAULTS", "fail:6")]).await;
    let long = "alpha beta gamma delta ".repeat(15);
    let n = common::tiny().tokenizer().turn(&long, "user").unwrap().ids.len();
    assert!(n > 48, "five chunks or more: {n} tokens");
    let mut s = Checked::open(&server).await;
    s.good("short").await;
    let before = server.wait_stats("after the first turn", |_| true).await;
    s.fails(&long).await;
    let after = server
        .wait_stats("part-built cache gone", |s| s.kv_cache_bytes == before.kv_cache_bytes)
        .await;
    assert_eq!(
        after.model_calls_total, 6,
        "the rest of the prefill (and the probe) was not run"
    );
    s.good("after the failed long turn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A batched call that fails: every turn in it is answered (each run alone
/// after the failure), each equal to its oracle.
async fn a_failed_batch_still_answers_every_turn() {
    // 1 the warm-up, 2 "hello", 3 the long turn (one call), 4 the batch of
    // four: fails.
    let server =
        TestServer::process_with(&["--prefill-chunk-tokens", "8192"], "warn", &[("SE_FAULTS", "fail:4")]).await;
    let mut long = Checked::open(&server).await;
    long.good("hello").await;
    let long_text = "alpha beta gamma delta ".repeat(1000);
    long.tx.send(turn("long", &long_text, "")).await.unwrap();
    server
        .wait_stats("the long call running", |s| s.model_calls_total >= 3)
        .await;
    let mut shorts = Vec::new();
    for i in 0..4 {
        let s = Checked::open(&server).await;
        s.tx.send(turn("t", &format!("stream {i}: what does this return?"), "user"))
            .await
            .unwrap();
        shorts.push(s);
    }
    let queued = server
        .wait_stats("four queued behind the long call", |s| s.queued_turns == 5)
        .await;
    assert_eq!(
        queued.model_calls_total, 3,
        "the long call was still running: {queued:?}"
    );
    long.rx.next().await.unwrap().unwrap();
    let model = common::tiny();
    for (i, s) in shorts.iter_mut().enumerate() {
        let text = format!("stream {i}: what does this return?");
        let r = s.rx.next().await.unwrap().unwrap();
        let tt = model.tokenizer().turn(&text, "user").unwrap();
        let want = oracle(&model, &tt.ids, tt.text.clone(), &ConversationOptions::default());
        assert_close(&text, &embedding(&r).values, &want, F32);
    }
    let after = server.wait_stats("all answered", |s| s.queued_turns == 0).await;
    assert_eq!(
        after.model_calls_total,
        4 + 4,
        "the failed batch, then each turn alone: {after:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The engine thread panics: the turn's stream and an idle one end with
/// UNAVAILABLE "the inference engine has stopped", health is NOT_SERVING
/// (or the port closed), and the process exits non-zero.
async fn a_dead_engine_says_so_and_the_process_exits() {
    // 1 the warm-up, 2 the idle stream's turn, 3 panics.
    let mut server = TestServer::process_with(&[], "warn", &[("SE_FAULTS", "panic:3")]).await;
    let mut idle = Checked::open(&server).await;
    idle.good("an idle stream's turn").await;
    let mut dying = Checked::open(&server).await;
    dying.tx.send(turn("t", "the call that panics", "user")).await.unwrap();
    for (what, rx) in [("the turn's stream", &mut dying.rx), ("an idle stream", &mut idle.rx)] {
        let status = tokio::time::timeout(Duration::from_secs(20), async {
            loop {
                match rx.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => return status,
                    None => panic!("{what} ended OK"),
                }
            }
        })
        .await
        .expect("the streams end");
        assert_eq!(status.code(), Code::Unavailable, "{what}: {status:?}");
        assert!(status.message().contains("engine has stopped"), "{what}: {status:?}");
    }
    if let Ok(channel) = tonic::transport::Channel::from_shared(server.addr.clone())
        .unwrap()
        .connect()
        .await
        && let Ok(r) = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
    {
        assert_ne!(r.into_inner().status, 1, "not SERVING with a dead engine");
    }
    let status = server.wait_exit(Duration::from_secs(20)).await;
    assert!(!status.success(), "a dead engine exits non-zero: {status:?}");
}
