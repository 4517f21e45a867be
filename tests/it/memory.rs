//! The KV budget, eviction by recomputation, idle eviction and resumable
//! sessions, against a real server (tiny model) and tonic clients.

use std::time::{Duration, Instant};

use stateful_embedder::{
    conversation::ConversationOptions,
    pb::{
        self, ConverseRequest, ConverseResponse, converse_response::Result as Reply, embedder_client::EmbedderClient,
    },
};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};

use crate::{
    common::{self, F32, assert_close, oracle},
    grpc::{TestServer, embedding, error, open, options, turn},
};

/// The tiny model's KV bytes per token (2 layers × K,V × 2 heads × 16 × f32).
const TINY_KV_BYTES_PER_TOKEN: u64 = 512;

/// One conversation on a stream, with the token ids it should hold, checked
/// against the oracle at every turn.
struct Talker {
    tx: tokio::sync::mpsc::Sender<ConverseRequest>,
    rx: tonic::Streaming<ConverseResponse>,
    context: Vec<u32>,
}

impl Talker {
    async fn open(client: &mut EmbedderClient<Channel>) -> Talker {
        let (tx, rx) = open(client).await;
        Talker {
            tx,
            rx,
            context: Vec::new(),
        }
    }

    async fn send(&mut self, request: ConverseRequest) -> ConverseResponse {
        self.tx.send(request).await.expect("the stream takes requests");
        self.rx.next().await.expect("a response").expect("an OK response")
    }

    /// A turn; its embedding must equal the oracle's over the whole context.
    async fn say(&mut self, what: &str, text: &str) -> pb::Embedding {
        let response = self.send(turn(what, text, "user")).await;
        let model = common::tiny();
        let tt = model.tokenizer().turn(text, "user").unwrap();
        let span = self.context.len() + tt.text.start..self.context.len() + tt.text.end;
        self.context.extend_from_slice(&tt.ids);
        let want = oracle(&model, &self.context, span, &ConversationOptions::default());
        let e = embedding(&response).clone();
        assert_close(what, &e.values, &want, F32);
        assert_eq!(e.context_tokens as usize, self.context.len(), "{what}");
        e
    }
}

async fn stats(client: &mut EmbedderClient<Channel>) -> pb::Stats {
    client.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner()
}

fn ready(r: &ConverseResponse) -> &pb::SessionReady {
    match &r.result {
        Some(Reply::Ready(ready)) => ready,
        other => panic!("expected ready, got {other:?}"),
    }
}

fn text_of(stream: usize, t: usize) -> String {
    format!("stream {stream} turn {t}: fn f{stream}_{t}(x: u32) -> u32 {{ x * {t} + {stream} }}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// With a budget that holds about four conversations, sixteen streams
/// talking at once never take the KV bytes over it (sampled after every
/// response and continuously meanwhile); evicted conversations rebuild by
/// recomputation, and every embedding still equals its oracle.
async fn budget_holds_while_sixteen_streams_take_turns() {
    const STREAMS: usize = 16;
    const TURNS: usize = 5;
    let tiny = common::tiny();
    let longest = (0..TURNS)
        .map(|t| tiny.tokenizer().turn(&text_of(15, t), "user").unwrap().ids.len())
        .sum::<usize>() as u64;
    // About four full conversations.
    let budget = 4 * longest * TINY_KV_BYTES_PER_TOKEN;
    let server = TestServer::start(&["--max-kv-bytes", &budget.to_string()]).await;
    let mut client = server.client().await;
    assert_eq!(stats(&mut client).await.kv_budget_bytes, budget);

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (mut client, done) = (server.client().await, done.clone());
        tokio::spawn(async move {
            let (mut samples, mut most) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let s = stats(&mut client).await;
                most = most.max(s.kv_cache_bytes);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (samples, most)
        })
    };
    let mut tasks = Vec::new();
    for s in 0..STREAMS {
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move {
            let mut talker = Talker::open(&mut client).await;
            for t in 0..TURNS {
                talker.say(&format!("stream {s} turn {t}"), &text_of(s, t)).await;
                let now = stats(&mut client).await;
                assert!(
                    now.kv_cache_bytes <= budget,
                    "over the budget after stream {s} turn {t}: {now:?}"
                );
            }
            talker
        }));
    }
    let mut talkers = Vec::new();
    for task in tasks {
        talkers.push(task.await.expect("a stream's turns all match their oracle"));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (samples, most) = sampler.await.unwrap();
    let after = stats(&mut client).await;
    println!("{samples} samples, most {most} of {budget} bytes; {after:?}");
    assert!(most <= budget, "sampled {most} > budget {budget}");
    assert!(after.evictions_total > 0, "the budget forced evictions: {after:?}");
    assert!(after.rebuilds_total > 0, "evicted conversations rebuilt: {after:?}");
    assert!(after.rebuilt_tokens_total > 0);
    assert!(after.evicted_conversations > 0, "{after:?}");
    assert_eq!(
        after.evicted_conversations + after.resident_conversations,
        STREAMS as u32,
        "{after:?}"
    );
    // Every conversation goes on exactly after all that.
    for (s, talker) in talkers.iter_mut().enumerate().take(3) {
        talker.say(&format!("stream {s} again"), "and once more").await;
    }
    drop(talkers);
    server
        .wait_stats("every cache freed", |s| s.kv_cache_bytes == 0 && s.active_sessions == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `--idle-evict-seconds` drops an idle conversation's cache (the stream
/// stays open), and its next turn rebuilds it and still matches the oracle.
async fn idle_conversations_are_evicted_and_rebuilt() {
    let server = TestServer::start(&["--idle-evict-seconds", "0.2"]).await;
    let mut client = server.client().await;
    let mut talker = Talker::open(&mut client).await;
    let first = talker.say("first", text_of(0, 0).as_str()).await;
    let evicted = server
        .wait_stats("the idle cache evicted", |s| {
            s.kv_cache_bytes == 0 && s.evicted_conversations == 1
        })
        .await;
    assert_eq!(evicted.evictions_total, 1);
    assert_eq!(evicted.evicted_tokens_total, u64::from(first.context_tokens));
    talker.say("after eviction", text_of(0, 1).as_str()).await;
    let after = stats(&mut client).await;
    assert_eq!(after.rebuilds_total, 1, "{after:?}");
    assert_eq!(after.rebuilt_tokens_total, u64::from(first.context_tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `--max-context-tokens` caps what a session may ask for (INVALID_ARGUMENT
/// in `ready`'s place); a turn whose call cannot fit in the whole budget is
/// RESOURCE_EXHAUSTED in-band, and the conversation goes on unchanged.
async fn caps_are_caps_and_an_over_budget_turn_fails_alone() {
    let tiny = common::tiny();
    let tokens = |t: &str| tiny.tokenizer().turn(t, "user").unwrap().ids.len();
    let (a, big, small) = (
        "fn add(a: i32, b: i32) -> i32 { a + b } // the first turn of this test".to_string(),
        "word ".repeat(30),
        "ok".to_string(),
    );
    let (na, nbig, nsmall) = (tokens(&a), tokens(&big), tokens(&small));
    // A turn's peak, its own cache evicted and rebuilt (the default pooling's
    // probe rides at the end of the call and is cut from its output): the
    // call's output of n + probe tokens and the copy of n tokens without the
    // probe. The budget holds that for `a` and `small`, but not for `a` and
    // `big`.
    let probe = tiny.probe_ids().len();
    let peak = |n: usize| 2 * n + probe;
    let budget_tokens = (peak(na + nsmall) + 1) as u64;
    assert!(peak(na + nbig) > budget_tokens as usize && peak(na + nsmall) <= budget_tokens as usize);
    let budget = budget_tokens * TINY_KV_BYTES_PER_TOKEN;
    let server = TestServer::start(&["--max-context-tokens", "64", "--max-kv-bytes", &budget.to_string()]).await;
    let mut client = server.client().await;

    let mut over = Talker::open(&mut client).await;
    let r = over
        .send(options(pb::SessionOptions {
            max_context_tokens: 65,
            ..Default::default()
        }))
        .await;
    assert_eq!(error(&r).code, Code::InvalidArgument as i32);
    assert!(error(&r).message.contains("cap of 64"), "{}", error(&r).message);
    over.say("after the refused options", "still works").await;
    drop(over);

    let mut talker = Talker::open(&mut client).await;
    let r = talker
        .send(options(pb::SessionOptions {
            max_context_tokens: 64,
            ..Default::default()
        }))
        .await;
    assert_eq!(ready(&r).max_context_tokens, 64);
    talker.say("a", &a).await;
    let r = talker.send(turn("big", &big, "user")).await;
    assert_eq!(error(&r).code, Code::ResourceExhausted as i32, "{r:?}");
    assert!(error(&r).message.contains("--max-kv-bytes"), "{}", error(&r).message);
    // Unchanged: the next turn extends `a` alone, exactly.
    talker.say("small", &small).await;
    let s = stats(&mut client).await;
    assert!(s.kv_cache_bytes <= budget, "{s:?}");
}

/// Opens a stream and sends its options; returns the talker and `ready`.
async fn session(client: &mut EmbedderClient<Channel>, o: pb::SessionOptions) -> (Talker, ConverseResponse) {
    let mut talker = Talker::open(client).await;
    let r = talker.send(options(o)).await;
    (talker, r)
}

fn create(id: &str) -> pb::SessionOptions {
    pb::SessionOptions {
        session_id: id.into(),
        session_mode: pb::SessionMode::Create as i32,
        ..Default::default()
    }
}

fn resume(id: &str) -> pb::SessionOptions {
    pb::SessionOptions {
        session_id: id.into(),
        session_mode: pb::SessionMode::Resume as i32,
        ..Default::default()
    }
}

/// A TCP proxy to the server whose connections can be cut, as a network
/// (or a client host) that goes away would: no half-close of any stream.
pub(crate) struct CutProxy {
    pub(crate) addr: String,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    async fn to(server: &TestServer) -> CutProxy {
        Self::to_addr(server.addr.trim_start_matches("http://")).await
    }

    /// A proxy to `target` (host:port).
    pub(crate) async fn to_addr(target: &str) -> CutProxy {
        let target = target.to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                let (mut inbound, _) = listener.accept().await.unwrap();
                let target = target.clone();
                connections.spawn(async move {
                    let mut outbound = tokio::net::TcpStream::connect(target).await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                });
            }
        });
        CutProxy { addr, task }
    }

    async fn client(&self) -> EmbedderClient<Channel> {
        let channel = Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        EmbedderClient::new(channel)
    }

    /// Cuts every connection through the proxy (their sockets close).
    pub(crate) fn cut(self) {
        self.task.abort();
    }
}

/// Talks through a proxy, then cuts it: the stream is lost, not half-closed.
async fn lost_stream<F: std::future::Future<Output = Talker>>(
    proxy: CutProxy,
    talk: impl FnOnce(EmbedderClient<Channel>) -> F,
) -> Vec<u32> {
    let client = proxy.client().await;
    let talker = talk(client).await;
    proxy.cut();
    talker.context
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A resumable session survives a cancelled stream: kept detached, its cache
/// evicted meanwhile, it is resumed by a new stream and its next turns equal
/// an unbroken conversation's (the oracle). While held it cannot be taken;
/// a half-close ends it at once; its id cannot be created twice.
async fn sessions_resume_after_a_lost_stream() {
    let server = TestServer::start(&["--idle-evict-seconds", "0.2"]).await;
    let mut client = server.client().await;

    let mut id = String::new();
    let context = lost_stream(CutProxy::to(&server).await, |mut client| {
        let id = &mut id;
        async move {
            let (mut first, r) = session(&mut client, create("")).await;
            *id = ready(&r).session_id.clone();
            first.say("t1", &text_of(1, 1)).await;
            first.say("t2", &text_of(1, 2)).await;
            first
        }
    })
    .await;
    assert_eq!(id.len(), 32, "a drawn id: 128 bits in hex");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    let detached = server
        .wait_stats("detached and evicted", |s| {
            s.detached_sessions == 1 && s.active_sessions == 0 && s.evicted_conversations == 1 && s.kv_cache_bytes == 0
        })
        .await;
    println!("detached: {detached:?}");

    let (mut resumed, r) = session(&mut client, resume(&id)).await;
    let ready = ready(&r).clone();
    assert_eq!((ready.session_id.as_str(), ready.turns), (id.as_str(), 2));
    assert_eq!(ready.context_tokens as usize, context.len());
    resumed.context = context;
    resumed.say("t3 after resume", &text_of(1, 3)).await;
    let s = stats(&mut client).await;
    assert_eq!(s.detached_sessions, 0, "{s:?}");
    assert!(s.rebuilds_total >= 1, "the evicted session was rebuilt: {s:?}");

    // Held: another stream can neither resume nor create it.
    let (_other, r) = session(&mut client, resume(&id)).await;
    assert_eq!(error(&r).code, Code::FailedPrecondition as i32, "{r:?}");
    let (_other, r) = session(&mut client, create(&id)).await;
    assert_eq!(error(&r).code, Code::AlreadyExists as i32, "{r:?}");
    // A resume keeps the session's options: others are refused.
    let (_other, r) = session(
        &mut client,
        pb::SessionOptions {
            dimensions: 8,
            ..resume(&id)
        },
    )
    .await;
    assert_eq!(error(&r).code, Code::InvalidArgument as i32, "{r:?}");

    // A half-close ends it for good, at once.
    let Talker { tx, mut rx, .. } = resumed;
    drop(tx);
    assert!(rx.next().await.is_none(), "the stream ends OK");
    let (_gone, r) = session(&mut client, resume(&id)).await;
    assert_eq!(error(&r).code, Code::NotFound as i32, "{r:?}");
    let s = stats(&mut client).await;
    assert_eq!(s.detached_sessions, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// After the TTL a detached session is gone (NOT_FOUND) and holds no byte;
/// with `--detached-ttl-seconds 0` resumable sessions are refused.
async fn detached_sessions_expire() {
    let server = TestServer::start(&["--detached-ttl-seconds", "0.5"]).await;
    let mut client = server.client().await;
    lost_stream(CutProxy::to(&server).await, |mut client| async move {
        let (mut talker, r) = session(&mut client, create("ttl-test:1")).await;
        assert_eq!(ready(&r).session_id, "ttl-test:1");
        talker.say("t1", "a turn to keep").await;
        talker
    })
    .await;
    let started = Instant::now();
    server.wait_stats("detached", |s| s.detached_sessions == 1).await;
    let gone = server
        .wait_stats("expired and freed", |s| {
            s.detached_sessions == 0 && s.kv_cache_bytes == 0 && s.resident_conversations + s.evicted_conversations == 0
        })
        .await;
    assert!(started.elapsed() >= Duration::from_millis(500), "not before the TTL");
    println!("expired: {gone:?}");
    let (_t, r) = session(&mut client, resume("ttl-test:1")).await;
    assert_eq!(error(&r).code, Code::NotFound as i32, "{r:?}");
    let (_t, r) = session(&mut client, create("bad id")).await;
    assert_eq!(error(&r).code, Code::InvalidArgument as i32, "{r:?}");

    let off = TestServer::start(&["--detached-ttl-seconds", "0"]).await;
    let mut client = off.client().await;
    let (_t, r) = session(&mut client, create("")).await;
    assert_eq!(error(&r).code, Code::FailedPrecondition as i32, "{r:?}");
}

/// The server process's resident set, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the server's /proc status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line");
    kib * 1024
}

/// The most an open stream that has taken a turn costs the server beyond
/// the KV budget: its task, channels and HTTP/2 stream state, its token ids
/// and resting conversation (tonic's 8 KiB decode and encode buffers are
/// most of it). Measured 18 KiB a stream here (debug build, 2,008 streams),
/// 19 KiB in release at 10,000 (BENCHMARKS.md section 8); the bound is a
/// margin over that for allocator fragmentation, which differs between runs.
const PER_STREAM_BYTES: u64 = 48 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// 2,000 open streams, each with a turn behind it and most of them idle,
/// while a few go on talking: health answers throughout, every checked turn
/// matches its oracle, the KV bytes stay within the budget, and the server's
/// RSS grows by at most the budget plus [`PER_STREAM_BYTES`] a stream.
async fn two_thousand_open_streams_fit_the_budget() {
    const STREAMS: usize = 2_000;
    let budget: u64 = 1 << 20;
    // Warnings only: 2,000 streams' open and close lines would bury the test's output.
    let server = TestServer::process_logging(&["--max-kv-bytes", "1MiB"], "warn").await;
    let pid = server.pid();
    let mut client = server.client().await;
    // Warm the allocator and ONNX Runtime's arena with the shapes to come.
    let mut warm = Talker::open(&mut client).await;
    for t in 0..4 {
        warm.say("warm", &text_of(9_999, t)).await;
    }
    drop(warm);
    server.wait_stats("warm-up freed", |s| s.active_sessions == 0).await;
    let before = rss(pid);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = {
        let (channel, stop) = (server.channel().await, stop.clone());
        tokio::spawn(async move {
            use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
            let mut health = HealthClient::new(channel);
            let (mut checks, mut slowest) = (0u32, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                let answer = tokio::time::timeout(
                    Duration::from_secs(2),
                    health.check(HealthCheckRequest { service: String::new() }),
                )
                .await;
                let status = answer.expect("health answers within 2 s").expect("health answers OK");
                assert_eq!(status.into_inner().status, 1, "SERVING");
                slowest = slowest.max(asked.elapsed());
                checks += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (checks, slowest)
        })
    };

    // Four connections, the streams opened a hundred at a time.
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(server.client().await);
    }
    let mut open_streams = Vec::with_capacity(STREAMS);
    for wave in 0..STREAMS / 100 {
        let mut opening = Vec::new();
        for i in wave * 100..(wave + 1) * 100 {
            let mut client = clients[i % 4].clone();
            opening.push(tokio::spawn(async move {
                let (tx, mut rx) = open(&mut client).await;
                tx.send(turn("hello", &format!("stream {i}: hello"), "user"))
                    .await
                    .unwrap();
                let r = rx.next().await.expect("a response").expect("an OK response");
                assert!(!embedding(&r).values.is_empty());
                (tx, rx)
            }));
        }
        for task in opening {
            open_streams.push(task.await.expect("every stream opens and is answered"));
        }
    }
    let open_now = stats(&mut client).await;
    assert_eq!(open_now.active_sessions as usize, STREAMS, "{open_now:?}");
    assert!(open_now.kv_cache_bytes <= budget, "{open_now:?}");
    assert!(open_now.evictions_total > 0, "{open_now:?}");

    // A few go on talking, exactly.
    let mut talkers = Vec::new();
    for s in 0..8 {
        let mut client = clients[s % 4].clone();
        talkers.push(tokio::spawn(async move {
            let mut talker = Talker::open(&mut client).await;
            for t in 0..5 {
                talker.say(&format!("talker {s} turn {t}"), &text_of(s, t)).await;
            }
            talker
        }));
    }
    let mut kept = Vec::new();
    for t in talkers {
        kept.push(t.await.expect("the talkers' turns match their oracle"));
    }
    let after = stats(&mut client).await;
    let grown = rss(pid).saturating_sub(before);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (checks, slowest) = health.await.expect("health answered throughout");
    let streams = (STREAMS + kept.len()) as u64;
    println!(
        "{streams} streams: RSS grew {grown} bytes ({} per stream beyond the {budget}-byte budget); \
         {checks} health checks, slowest {slowest:?}; {after:?}",
        grown.saturating_sub(budget) / streams
    );
    assert!(after.kv_cache_bytes <= budget, "{after:?}");
    assert!(checks > 0);
    assert!(
        grown <= budget + streams * PER_STREAM_BYTES,
        "RSS grew {grown} bytes for {streams} streams (budget {budget}, {PER_STREAM_BYTES} a stream)"
    );
    drop((open_streams, kept));
    server
        .wait_stats("all streams gone", |s| s.active_sessions == 0 && s.kv_cache_bytes == 0)
        .await;
}
