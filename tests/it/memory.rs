//! The KV budget, eviction by recomputation, idle eviction and resumable
//! sessions, against a real server (tiny model) and tonic clients. Every
//! budget is checked against the census of the KV tensors that exist (read
//! beside the ledger, which must agree with it), not against the ledger
//! alone.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use stateful_embedder::{
    conversation::{Conversation, ConversationOptions},
    engine::KvBudget,
    pb::{self, ConverseResponse, embedder_client::EmbedderClient},
};
use tonic::{Code, transport::Channel};

use crate::support::{
    models,
    proxy::Proxy,
    server::{Census, Launch, TestServer, census},
    stream::{Talker, create, embedding, error, open, options, ready, resume, turn},
    tokens,
};

/// The tiny model's KV bytes per token (2 layers × K,V × 2 heads × 16 × f32).
const TINY_KV_BYTES_PER_TOKEN: u64 = 512;

fn text_of(stream: usize, t: usize) -> String {
    format!("stream {stream} turn {t}: fn f{stream}_{t}(x: u32) -> u32 {{ x * {t} + {stream} }}")
}

/// Checks one census against the budget: the tensors that exist, and the
/// most that existed at once since the previous census, within it; the
/// ledger equal to the tensors.
#[track_caller]
fn within(what: &str, c: &Census, budget: u64) {
    assert!(
        c.bytes <= budget,
        "{what}: {} bytes of KV tensors > budget {budget}",
        c.bytes
    );
    assert!(c.peak <= budget, "{what}: a peak of {} bytes > budget {budget}", c.peak);
    assert_eq!(
        c.stats.kv_cache_bytes, c.bytes,
        "{what}: the ledger disagrees with the census: {c:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// With a budget that holds about four conversations, sixteen streams
/// talking at once never take the KV tensors over it: the census after
/// every response and continuously meanwhile, its peak covering every model
/// call in between (caches, packed batch inputs, batched outputs, copies).
/// Evicted conversations rebuild by recomputation, every embedding still
/// equals its oracle, and nothing is left when the streams end.
async fn budget_holds_while_sixteen_streams_take_turns() {
    const STREAMS: usize = 16;
    const TURNS: usize = 5;
    let longest = (0..TURNS)
        .map(|t| tokens::turn(&text_of(15, t), "user").0.len())
        .sum::<usize>() as u64;
    // About four full conversations.
    let budget = 4 * longest * TINY_KV_BYTES_PER_TOKEN;
    let server = TestServer::start(&["--max-kv-bytes", &budget.to_string()]).await;
    let mut client = server.client().await;
    let start = census(&mut client).await; // (its peak is the warm-up's)
    assert_eq!(start.stats.kv_budget_bytes, budget);

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (mut client, done) = (server.client().await, done.clone());
        tokio::spawn(async move {
            let (mut samples, mut most) = (0u64, 0u64);
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let c = census(&mut client).await;
                within(&format!("sample {samples}"), &c, budget);
                most = most.max(c.peak);
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
                within(
                    &format!("after stream {s} turn {t}"),
                    &census(&mut client).await,
                    budget,
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
    let after = census(&mut client).await;
    within("after", &after, budget);
    println!("{samples} samples, most {most} of {budget} bytes; {after:?}");
    let s = &after.stats;
    assert!(s.evictions_total > 0, "the budget forced evictions: {s:?}");
    assert!(s.rebuilds_total > 0, "evicted conversations rebuilt: {s:?}");
    assert!(s.rebuilt_tokens_total > 0);
    assert!(s.evicted_conversations > 0, "{s:?}");
    assert_eq!(
        s.evicted_conversations + s.resident_conversations,
        STREAMS as u32,
        "{s:?}"
    );
    // Every conversation goes on exactly after all that.
    for (s, talker) in talkers.iter_mut().enumerate().take(3) {
        talker.say(&format!("stream {s} again"), "and once more").await;
    }
    drop(talkers);
    server
        .wait_stats("every stream gone", |s| s.open_streams == 0 && s.kv_cache_bytes == 0)
        .await;
    let end = census(&mut client).await;
    assert_eq!((end.bytes, end.stats.kv_cache_bytes), (0, 0), "nothing left: {end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `--idle-evict-seconds` drops an idle conversation's cache (the stream
/// stays open; no KV tensor is left), and its next turn rebuilds it and
/// still matches the oracle.
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
    assert_eq!(server.census().await.bytes, 0, "the evicted cache's tensors are gone");
    talker.say("after eviction", text_of(0, 1).as_str()).await;
    let after = server.stats().await;
    assert_eq!(after.rebuilds_total, 1, "{after:?}");
    assert_eq!(after.rebuilt_tokens_total, u64::from(first.context_tokens));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `--max-context-tokens` caps what a session may ask for (INVALID_ARGUMENT
/// in `ready`'s place); a turn whose call cannot fit in the whole budget is
/// RESOURCE_EXHAUSTED in-band, and the conversation goes on unchanged, the
/// census within the budget throughout.
async fn caps_are_caps_and_an_over_budget_turn_fails_alone() {
    let n = |t: &str| tokens::turn(t, "user").0.len();
    let (a, big, small) = (
        "fn add(a: i32, b: i32) -> i32 { a + b } // the first turn of this test".to_string(),
        "word ".repeat(30),
        "ok".to_string(),
    );
    let (na, nbig, nsmall) = (n(&a), n(&big), n(&small));
    // A turn's peak, its own cache evicted and rebuilt (the default pooling's
    // probe rides at the end of the call and is cut from its output): the
    // call's output of n + probe tokens and the copy of n tokens without the
    // probe. The budget holds that for `a` and `small`, but not for `a` and
    // `big`.
    let probe = crate::support::profile::of(&models::tiny_dir()).probe_ids.len();
    let peak = |n: usize| 2 * n + probe;
    let budget_tokens = (peak(na + nsmall) + 1) as u64;
    assert!(peak(na + nbig) > budget_tokens as usize && peak(na + nsmall) <= budget_tokens as usize);
    let budget = budget_tokens * TINY_KV_BYTES_PER_TOKEN;
    let server = TestServer::start(&["--max-context-tokens", "64", "--max-kv-bytes", &budget.to_string()]).await;
    let mut client = server.client().await;
    census(&mut client).await; // (its peak is the warm-up's, before the budget)

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
    within("after a", &census(&mut client).await, budget);
    let e = talker.fails(&big).await;
    assert_eq!(e.code, Code::ResourceExhausted as i32, "{e:?}");
    assert!(e.message.contains("--max-kv-bytes"), "{}", e.message);
    within("after the refused turn", &census(&mut client).await, budget);
    // Unchanged: the next turn extends `a` alone, exactly.
    talker.say("small", &small).await;
    within("after small", &census(&mut client).await, budget);
}

/// Opens a stream and sends its options; returns the talker and `ready`.
async fn session(client: &mut EmbedderClient<Channel>, o: pb::SessionOptions) -> (Talker, ConverseResponse) {
    let mut talker = Talker::open(client).await;
    let r = talker.send(options(o)).await;
    (talker, r)
}

/// Talks through a proxy, then cuts it: the stream is lost, not
/// half-closed. Returns the talker's context.
async fn lost_stream<F: std::future::Future<Output = Talker>>(
    proxy: Proxy,
    talk: impl FnOnce(EmbedderClient<Channel>) -> F,
) -> tokens::Context {
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
    let context = lost_stream(Proxy::to(&server.addr).await, |mut client| {
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
            s.detached_sessions == 1 && s.open_streams == 0 && s.evicted_conversations == 1 && s.kv_cache_bytes == 0
        })
        .await;
    println!("detached: {detached:?}");
    assert_eq!(server.census().await.bytes, 0, "the detached session holds no tensor");

    let (mut resumed, r) = session(&mut client, resume(&id)).await;
    let ready = ready(&r).clone();
    assert_eq!((ready.session_id.as_str(), ready.turns), (id.as_str(), 2));
    assert_eq!(ready.context_tokens as usize, context.ids.len());
    resumed.context = context;
    resumed.say("t3 after resume", &text_of(1, 3)).await;
    let s = server.stats().await;
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
    assert!(
        crate::support::stream::next(&mut rx).await.is_none(),
        "the stream ends OK"
    );
    let (_gone, r) = session(&mut client, resume(&id)).await;
    assert_eq!(error(&r).code, Code::NotFound as i32, "{r:?}");
    let s = server.stats().await;
    assert_eq!(s.detached_sessions, 0, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// After the TTL a detached session is gone (NOT_FOUND) and holds no byte;
/// with `--detached-ttl-seconds 0` resumable sessions are refused. The TTL
/// (4 s) is far above a stall of a loaded machine, so the detached state is
/// seen before it ends.
async fn detached_sessions_expire() {
    let server = TestServer::start(&["--detached-ttl-seconds", "4"]).await;
    let mut client = server.client().await;
    lost_stream(Proxy::to(&server.addr).await, |mut client| async move {
        let (mut talker, r) = session(&mut client, create("ttl-test:1")).await;
        assert_eq!(ready(&r).session_id, "ttl-test:1");
        talker.say("t1", "a turn to keep").await;
        talker
    })
    .await;
    server.wait_stats("detached", |s| s.detached_sessions == 1).await;
    let detached = Instant::now();
    let gone = server
        .wait_stats("expired and freed", |s| {
            s.detached_sessions == 0 && s.kv_cache_bytes == 0 && s.resident_conversations + s.evicted_conversations == 0
        })
        .await;
    // It was seen detached after its stream was lost, so at most the TTL
    // after that, and not before the TTL less the time to see it.
    assert!(
        detached.elapsed() >= Duration::from_secs(3),
        "expired after {:?}",
        detached.elapsed()
    );
    println!("expired: {gone:?}");
    assert_eq!(server.census().await.bytes, 0);
    let (_t, r) = session(&mut client, resume("ttl-test:1")).await;
    assert_eq!(error(&r).code, Code::NotFound as i32, "{r:?}");
    let (_t, r) = session(&mut client, create("bad id")).await;
    assert_eq!(error(&r).code, Code::InvalidArgument as i32, "{r:?}");

    let off = TestServer::start(&["--detached-ttl-seconds", "0"]).await;
    let mut client = off.client().await;
    let (_t, r) = session(&mut client, create("")).await;
    assert_eq!(error(&r).code, Code::FailedPrecondition as i32, "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// At most `--max-detached-sessions` lost sessions are kept detached: past
/// that, a lost session is freed at once (NOT_FOUND), and the ones kept are
/// still resumable.
async fn detached_sessions_are_capped() {
    let server = TestServer::start(&["--max-detached-sessions", "2"]).await;
    let mut client = server.client().await;
    for (i, id) in ["cap-a", "cap-b", "cap-c"].into_iter().enumerate() {
        lost_stream(Proxy::to(&server.addr).await, |mut client| async move {
            let (mut talker, r) = session(&mut client, create(id)).await;
            assert_eq!(ready(&r).session_id, id);
            talker.say(id, "a turn to keep").await;
            talker
        })
        .await;
        // Each lost stream is done with (its slot free) before the next.
        let kept = (i + 1).min(2) as u32;
        server
            .wait_stats("the lost stream gone", |s| {
                s.open_streams == 0 && s.detached_sessions == kept && s.resident_conversations == kept
            })
            .await;
    }
    let (_t, r) = session(&mut client, resume("cap-c")).await;
    assert_eq!(error(&r).code, Code::NotFound as i32, "the third was freed: {r:?}");
    drop(_t);
    server
        .wait_stats("the refused stream gone", |s| s.open_streams == 0)
        .await;
    let (mut a, r) = session(&mut client, resume("cap-a")).await;
    assert_eq!(ready(&r).turns, 1, "the first was kept");
    embedding(&a.send(turn("again", "and again", "user")).await);
}

#[test]
/// The budget evicts the least recently used resting conversation first:
/// with three resting caches and no room, making room for one byte evicts
/// the one rested longest, and making room for more evicts the next one.
/// (The budget lists slots by when they were last used; ties, if the clock
/// gives any, keep registration order, which is the same order here.)
fn evictions_go_least_recently_used_first() {
    let model = models::tiny_private("model.onnx");
    let mut convs: Vec<Conversation> = (0..3)
        .map(|i| {
            let mut c = Conversation::new(&model, ConversationOptions::default()).unwrap();
            c.turn(&text_of(i, 0), "user").unwrap();
            c
        })
        .collect();
    let bytes: Vec<u64> = convs.iter().map(Conversation::kv_bytes).collect();
    let budget = KvBudget::new(model.clone(), model.kv_cache_bytes());
    // Rested in the order 1, 0, 2: 1 is the least recently used.
    let c2 = convs.pop().unwrap();
    let c1 = convs.pop().unwrap();
    let c0 = convs.pop().unwrap();
    let slot1 = budget.slot(c1);
    let slot0 = budget.slot(c0);
    let slot2 = budget.slot(c2);
    let resident = || -> Vec<bool> {
        [&slot0, &slot1, &slot2]
            .iter()
            .map(|s| s.with(|c| c.kv_bytes() > 0).unwrap())
            .collect()
    };
    assert_eq!(resident(), [true, true, true]);
    assert!(budget.make_room(1), "room for a byte, one conversation evicted");
    assert_eq!(resident(), [true, false, true], "the least recently used went first");
    assert_eq!(budget.evictions(), 1);
    assert!(budget.make_room(bytes[1] + 1), "room for more, the next one evicted");
    assert_eq!(resident(), [false, false, true], "then the next oldest");
    assert_eq!(budget.evictions(), 2);
    // The evicted caches' tensors are gone: the census is the one left.
    let snapshot = model.ledger_snapshot().expect("test builds keep a census");
    assert_eq!((snapshot.census, snapshot.ledger), (bytes[2], bytes[2]));
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

/// How long one health check may take while 2,000 streams open: a liveness
/// bound (measured: the slowest a few milliseconds, a debug build on 2
/// cores), not a speed target, far above a loaded machine's stall.
const HEALTH_WITHIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// 2,000 open streams, each with a turn behind it and most of them idle,
/// while a few go on talking: health answers throughout, every checked turn
/// matches its oracle, the KV tensors stay within the budget (the census),
/// and the server's RSS grows by at most the budget plus
/// [`PER_STREAM_BYTES`] a stream.
async fn two_thousand_open_streams_fit_the_budget() {
    const STREAMS: usize = 2_000;
    let budget: u64 = 1 << 20;
    // Warnings only: 2,000 streams' open and close lines would bury the test's output.
    let server = Launch::new(&["--max-kv-bytes", "1MiB"]).log("warn").process().await;
    let pid = server.pid();
    let mut client = server.client().await;
    // Warm the allocator and ONNX Runtime's arena with the shapes to come.
    let mut warm = Talker::open(&mut client).await;
    for t in 0..4 {
        warm.say("warm", &text_of(9_999, t)).await;
    }
    drop(warm);
    server.wait_stats("warm-up freed", |s| s.open_streams == 0).await;
    census(&mut client).await; // (its peak is the warm-up's)
    let before = rss(pid);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let health = {
        let (channel, stop) = (server.channel().await, stop.clone());
        tokio::spawn(async move {
            use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
            let mut health = HealthClient::new(channel);
            let (mut checks, mut slowest) = (0u32, Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let asked = Instant::now();
                let answer = tokio::time::timeout(
                    HEALTH_WITHIN,
                    health.check(HealthCheckRequest { service: String::new() }),
                )
                .await;
                let status = answer.expect("health answers in time").expect("health answers OK");
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
                let r = crate::support::stream::answer(&mut rx).await;
                assert!(!embedding(&r).values.is_empty());
                (tx, rx)
            }));
        }
        for task in opening {
            open_streams.push(task.await.expect("every stream opens and is answered"));
        }
    }
    let open_now = census(&mut client).await;
    assert_eq!(open_now.stats.open_streams as usize, STREAMS, "{open_now:?}");
    within("with 2,000 streams open", &open_now, budget);
    assert!(open_now.stats.evictions_total > 0, "{open_now:?}");

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
    let after = census(&mut client).await;
    let grown = rss(pid).saturating_sub(before);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (checks, slowest) = health.await.expect("health answered throughout");
    let streams = (STREAMS + kept.len()) as u64;
    println!(
        "{streams} streams: RSS grew {grown} bytes ({} per stream beyond the {budget}-byte budget); \
         {checks} health checks, slowest {slowest:?}; {after:?}",
        grown.saturating_sub(budget) / streams
    );
    within("after the talkers", &after, budget);
    assert!(checks > 0);
    assert!(
        grown <= budget + streams * PER_STREAM_BYTES,
        "RSS grew {grown} bytes for {streams} streams (budget {budget}, {PER_STREAM_BYTES} a stream)"
    );
    drop((open_streams, kept));
    server
        .wait_stats("all streams gone", |s| s.open_streams == 0 && s.kv_cache_bytes == 0)
        .await;
    assert_eq!(census(&mut client).await.bytes, 0);
}
