//! The gRPC service against a real server on an ephemeral port (tiny model),
//! run in-process through `server::run` (a child process for the signal test),
//! with tonic clients and the Rust `converse` client process.

use std::{
    io::{BufRead, BufReader, Write},
    process::Stdio,
    time::{Duration, Instant},
};

use stateful_embedder::{
    config::Config,
    conversation::{Conversation, ConversationOptions, Pooling, Standardize},
    pb::{
        self, ConverseRequest, ConverseResponse, converse_request::Action, converse_response::Result as Reply,
        embedder_client::EmbedderClient,
    },
    server,
};
use tokio::{io::AsyncBufReadExt, sync::oneshot};
use tokio_stream::StreamExt;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::common::{self, F32, assert_close, oracle};

const BIN: &str = env!("CARGO_BIN_EXE_stateful-embedder");

/// A server on 127.0.0.1:0 with the tiny model: in this process (`server::run`
/// with a shutdown future, as a library user would run it), or as a child
/// process for the tests that signal it. Stopped on drop.
pub struct TestServer {
    pub addr: String,
    kind: Kind,
}

enum Kind {
    /// `server::run` on this test's runtime; sending on `shutdown` drains it.
    InProcess {
        shutdown: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
    /// The server binary (killed on drop).
    Process(tokio::process::Child),
}

impl TestServer {
    /// Runs the server in this process with extra command-line flags; returns once health is SERVING.
    pub async fn start(extra: &[&str]) -> TestServer {
        let tiny = common::tiny_dir();
        let mut args = vec!["--addr", "127.0.0.1:0", "--model", tiny.to_str().expect("a UTF-8 path")];
        args.extend_from_slice(extra);
        let config = Config::from_serve_args(args).expect("valid test flags");
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .expect("binds 127.0.0.1:0");
        let addr = listener.local_addr().expect("a bound address");
        let (shutdown, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(server::run(config, listener, async {
            let _ = shutdown_rx.await;
        }));
        let server = TestServer {
            addr: format!("http://{addr}"),
            kind: Kind::InProcess {
                shutdown: Some(shutdown),
                task,
            },
        };
        server.wait_serving().await;
        server
    }

    /// Runs the server binary with extra flags; returns once health is SERVING.
    pub async fn process(extra: &[&str]) -> TestServer {
        Self::process_logging(extra, "info").await
    }

    /// [`TestServer::process`] logging at `level` (its stderr is the test's).
    pub async fn process_logging(extra: &[&str], level: &str) -> TestServer {
        Self::process_with(extra, level, &[]).await
    }

    /// [`TestServer::process_logging`] with extra environment variables.
    pub async fn process_with(extra: &[&str], level: &str, env: &[(&str, &str)]) -> TestServer {
        let mut child = tokio::process::Command::new(BIN)
            .args(["serve", "--addr", "127.0.0.1:0", "--model"])
            .arg(common::tiny_dir())
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", level)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("the server binary starts");
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line))
            .await
            .expect("the server prints its address within 60 s")
            .expect("reads its stdout");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .expect("a 'listening on' line")
            .to_string();
        let server = TestServer {
            addr: format!("http://{addr}"),
            kind: Kind::Process(child),
        };
        server.wait_serving().await;
        server
    }

    /// Waits on the health Watch until the server is SERVING.
    async fn wait_serving(&self) {
        self.wait_health(ServingStatus::Serving).await;
    }

    /// Waits on the health Watch (bounded: 60 s) until the overall status is `want`.
    pub async fn wait_health(&self, want: ServingStatus) {
        let mut health = HealthClient::new(self.channel().await);
        let mut watch = health
            .watch(HealthCheckRequest { service: String::new() })
            .await
            .expect("health watch")
            .into_inner();
        let reached = async {
            while let Some(status) = watch.next().await {
                if status.expect("health status").status() == want {
                    return;
                }
            }
            panic!("the health watch ended before {want:?}");
        };
        tokio::time::timeout(Duration::from_secs(60), reached)
            .await
            .unwrap_or_else(|_| panic!("{want:?} within 60 s"));
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .expect("connects")
    }

    pub async fn client(&self) -> EmbedderClient<Channel> {
        EmbedderClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// Polls GetStats until `done` holds (bounded: 20 s), returning the last
    /// stats. (GetStats has no watch; the poll is bounded and its interval
    /// short, and no test sleeps instead of waiting for a state.)
    pub async fn wait_stats(&self, what: &str, done: impl Fn(&pb::Stats) -> bool) -> pb::Stats {
        let mut client = self.client().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let stats = client.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
            if done(&stats) {
                return stats;
            }
            assert!(Instant::now() < deadline, "{what}: stats never got there: {stats:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The child process's pid (process servers only).
    pub fn pid(&self) -> u32 {
        match &self.kind {
            Kind::Process(child) => child.id().expect("the server process is running"),
            Kind::InProcess { .. } => panic!("an in-process server has no pid of its own"),
        }
    }

    /// Waits (bounded) for the child process to exit (process servers only).
    pub async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let Kind::Process(child) = &mut self.kind else {
            panic!("only a process server exits on its own");
        };
        tokio::time::timeout(limit, child.wait())
            .await
            .unwrap_or_else(|_| panic!("the server did not exit within {limit:?}"))
            .expect("waits for the server process")
    }

    /// Resolves an in-process server's shutdown future, as a signal would.
    pub fn begin_shutdown(&mut self) {
        let Kind::InProcess { shutdown, .. } = &mut self.kind else {
            panic!("only an in-process server is shut down through its future");
        };
        let _ = shutdown.take().expect("shut down once").send(());
    }

    /// Waits (bounded: 30 s) for an in-process server's `run` to return.
    pub async fn stopped(mut self) -> anyhow::Result<()> {
        let Kind::InProcess { task, .. } = &mut self.kind else {
            panic!("only an in-process server returns from run");
        };
        tokio::time::timeout(Duration::from_secs(30), task)
            .await
            .expect("server::run returns within 30 s of its shutdown")
            .expect("the server task does not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        match &mut self.kind {
            Kind::InProcess { task, .. } => task.abort(),
            Kind::Process(child) => {
                let _ = child.start_kill();
            }
        }
    }
}

pub(crate) fn turn(tag: &str, text: &str, role: &str) -> ConverseRequest {
    ConverseRequest {
        tag: tag.into(),
        action: Some(Action::Turn(pb::Turn {
            text: text.into(),
            role: role.into(),
        })),
    }
}

pub(crate) fn options(o: pb::SessionOptions) -> ConverseRequest {
    ConverseRequest {
        tag: "options".into(),
        action: Some(Action::Options(o)),
    }
}

fn reset(tag: &str) -> ConverseRequest {
    ConverseRequest {
        tag: tag.into(),
        action: Some(Action::Reset(pb::Reset {})),
    }
}

/// Opens a Converse stream fed by the returned sender: requests sent on it
/// go out in order, and dropping it half-closes the stream.
pub(crate) async fn open(
    client: &mut EmbedderClient<Channel>,
) -> (
    tokio::sync::mpsc::Sender<ConverseRequest>,
    tonic::Streaming<ConverseResponse>,
) {
    // Room for every request a test pipelines before reading.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let stream = client
        .converse(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("the stream opens")
        .into_inner();
    (tx, stream)
}

/// Sends all requests at once on one stream (pipelined), half-closes, collects every response.
pub(crate) async fn converse_all(
    client: &mut EmbedderClient<Channel>,
    requests: Vec<ConverseRequest>,
) -> Vec<ConverseResponse> {
    let (tx, stream) = open(client).await;
    for r in requests {
        tx.send(r).await.expect("the stream takes requests");
    }
    drop(tx);
    stream.collect::<Result<Vec<_>, _>>().await.expect("the stream ends OK")
}

/// An open stream with one turn answered: the sender (keep it to keep the
/// stream open), the response stream, and the first response.
pub(crate) async fn open_stream(
    client: &mut EmbedderClient<Channel>,
    first: ConverseRequest,
) -> (
    tokio::sync::mpsc::Sender<ConverseRequest>,
    tonic::Streaming<ConverseResponse>,
    ConverseResponse,
) {
    let (tx, mut stream) = open(client).await;
    tx.send(first).await.expect("the stream takes requests");
    let response = stream.next().await.expect("a response").expect("an OK response");
    (tx, stream, response)
}

pub(crate) fn embedding(r: &ConverseResponse) -> &pb::Embedding {
    match &r.result {
        Some(Reply::Embedding(e)) => e,
        other => panic!("expected an embedding at index {}, got {other:?}", r.index),
    }
}

pub(crate) fn error(r: &ConverseResponse) -> &pb::Error {
    match &r.result {
        Some(Reply::Error(e)) => e,
        other => panic!("expected an error at index {}, got {other:?}", r.index),
    }
}

const TURNS: [(&str, &str); 3] = [
    ("You are a terse coding assistant.", "system"),
    ("def add(a, b):\n    return a + b", "user"),
    ("Rust: fn add(a: i32, b: i32) -> i32 { a + b }", "assistant"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The engine's oracle holds over the wire: each streamed turn equals the one-shot embedding.
async fn oracle_holds_over_the_wire() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let requests = TURNS
        .iter()
        .enumerate()
        .map(|(i, (t, r))| turn(&format!("t{i}"), t, r))
        .collect();
    let responses = converse_all(&mut client, requests).await;
    let model = common::tiny();
    let mut context = Vec::new();
    for (i, ((text, role), r)) in TURNS.iter().zip(&responses).enumerate() {
        let tt = model.tokenizer().turn(text, role).unwrap();
        let span = context.len() + tt.text.start..context.len() + tt.text.end;
        context.extend_from_slice(&tt.ids);
        let want = oracle(&model, &context, span, &ConversationOptions::default());
        let e = embedding(r);
        assert_close(&format!("turn {i}"), &e.values, &want, F32);
        assert_eq!(e.context_tokens as usize, context.len());
        assert_eq!(e.turn_tokens as usize, tt.ids.len());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Pipelined requests come back one per request, in order, with their index and tag.
async fn pipelined_requests_come_back_in_order() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let mut requests = vec![options(pb::SessionOptions {
        dimensions: 16,
        ..Default::default()
    })];
    for i in 0..24 {
        requests.push(match i % 6 {
            0 => reset(&format!("r{i}")),
            1 => ConverseRequest {
                tag: format!("bad{i}"),
                action: None,
            },
            _ => turn(&format!("t{i}"), &format!("turn number {i}: some text"), "user"),
        });
    }
    let tags: Vec<String> = requests.iter().map(|r| r.tag.clone()).collect();
    let responses = converse_all(&mut client, requests).await;
    assert_eq!(responses.len(), tags.len());
    for (i, (r, tag)) in responses.iter().zip(&tags).enumerate() {
        assert_eq!(r.index, i as u64);
        assert_eq!(&r.tag, tag);
        match (i, &r.result) {
            (0, Some(Reply::Ready(ready))) => assert_eq!(ready.dimensions, 16),
            (_, Some(Reply::Reset(_))) => assert!(tag.starts_with('r')),
            (_, Some(Reply::Error(e))) => {
                assert!(tag.starts_with("bad"));
                assert_eq!(e.code, Code::InvalidArgument as i32);
            }
            (_, Some(Reply::Embedding(e))) => {
                assert!(tag.starts_with('t'));
                assert_eq!(e.values.len(), 16);
            }
            (_, other) => panic!("unexpected response {other:?} for {tag}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// In-band errors leave the session unchanged and usable; the next good turn still meets the oracle.
async fn in_band_errors_keep_the_session() {
    let server = TestServer::start(&["--max-turn-tokens", "40"]).await;
    let mut client = server.client().await;
    let requests = vec![
        options(pb::SessionOptions {
            // "a" is 16 tokens, "full" 38 (over the window), "b" 31 (fits).
            max_context_tokens: 50,
            overflow: pb::Overflow::Reject as i32,
            ..Default::default()
        }),
        turn("a", TURNS[1].0, "user"),
        options(pb::SessionOptions::default()),
        ConverseRequest {
            tag: "none".into(),
            action: None,
        },
        turn("empty", "", "user"),
        turn("role", "hi", "robot"),
        turn("long", &"word ".repeat(60), ""),
        turn("full", &"many words ".repeat(16), "user"),
        turn("b", TURNS[2].0, "assistant"),
    ];
    let responses = converse_all(&mut client, requests).await;
    assert!(matches!(responses[0].result, Some(Reply::Ready(_))));
    let first = embedding(&responses[1]);
    let codes: Vec<i32> = responses[2..8].iter().map(|r| error(r).code).collect();
    let ia = Code::InvalidArgument as i32;
    let re = Code::ResourceExhausted as i32;
    assert_eq!(codes, vec![ia, ia, ia, ia, re, re], "{responses:#?}");
    assert!(error(&responses[2]).message.contains("first request"));
    assert!(
        error(&responses[7]).message.contains("REJECT"),
        "{}",
        error(&responses[7]).message
    );
    let last = embedding(&responses[8]);
    assert_eq!(
        last.context_tokens,
        first.context_tokens + last.turn_tokens,
        "the failed requests added nothing"
    );
    let model = common::tiny();
    let a = model.tokenizer().turn(TURNS[1].0, "user").unwrap();
    let b = model.tokenizer().turn(TURNS[2].0, "assistant").unwrap();
    let mut context = a.ids.clone();
    let span = context.len() + b.text.start..context.len() + b.text.end;
    context.extend_from_slice(&b.ids);
    let want = oracle(&model, &context, span, &ConversationOptions::default());
    assert_close("turn after errors", &last.values, &want, F32);

    // Options that cannot work are an in-band error too, and the defaults stay.
    let responses = converse_all(
        &mut client,
        vec![
            options(pb::SessionOptions {
                dimensions: 10_000,
                ..Default::default()
            }),
            turn("ok", "still works", ""),
        ],
    )
    .await;
    assert_eq!(error(&responses[0]).code, ia);
    assert_eq!(embedding(&responses[1]).values.len(), common::tiny_dims());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The quality options over the wire: standardisation, input types and the
/// probe reach the tokens and the vectors (Embed and Converse, each against
/// a library conversation with the same options); GetModelInfo lists the
/// templates; unknown enum numbers are in-band INVALID_ARGUMENT in a stream
/// and INVALID_ARGUMENT statuses for Embed.
async fn quality_options_over_the_wire() {
    use stateful_embedder::conversation::{InputType, Pooling, Standardize};
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let model = common::tiny();
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(common::tiny_dir().join("templates.json")).unwrap()).unwrap();
    assert_eq!(
        info.input_types["query"],
        file["input_types"]["query"].as_str().unwrap()
    );
    assert_eq!(
        info.input_types["document"],
        file["input_types"]["document"].as_str().unwrap()
    );
    assert_eq!(info.probe, file["probe"].as_str().unwrap());
    assert_eq!(info.stats_corpus_sha256.len(), 64, "{info:?}");

    let text = "Return the sum of two numbers.";
    for (pooling, standardize, input_type) in [
        (pb::Pooling::Mean, pb::Standardize::Unspecified, pb::InputType::Query),
        (pb::Pooling::Probe, pb::Standardize::Zscore, pb::InputType::Unspecified),
        (
            pb::Pooling::Probe,
            pb::Standardize::Unspecified,
            pb::InputType::Unspecified,
        ),
        (pb::Pooling::LastToken, pb::Standardize::None, pb::InputType::Document),
        (pb::Pooling::ProbeMean, pb::Standardize::Head, pb::InputType::Query),
        (
            pb::Pooling::ProbeMean,
            pb::Standardize::Whiten,
            pb::InputType::Unspecified,
        ),
        (
            pb::Pooling::Unspecified,
            pb::Standardize::Unspecified,
            pb::InputType::Query,
        ),
    ] {
        let got = client
            .embed(pb::EmbedRequest {
                texts: vec![text.into()],
                pooling: pooling as i32,
                standardize: standardize as i32,
                input_type: input_type as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Unset is the defaults: PROBE_MEAN, and the pooling's standardisation.
        let pooling_ = match pooling {
            pb::Pooling::Probe => Pooling::Probe,
            pb::Pooling::LastToken => Pooling::LastToken,
            pb::Pooling::Mean => Pooling::Mean,
            pb::Pooling::ProbeMean | pb::Pooling::Unspecified => Pooling::ProbeMean,
        };
        let o = ConversationOptions {
            pooling: pooling_,
            standardize: match standardize {
                pb::Standardize::None => Standardize::None,
                pb::Standardize::Head => Standardize::Head,
                pb::Standardize::Zscore => Standardize::Zscore,
                pb::Standardize::Whiten => Standardize::Whiten,
                pb::Standardize::Unspecified => Standardize::default_for(pooling_),
            },
            input_type: match input_type {
                pb::InputType::Query => InputType::Query,
                pb::InputType::Document => InputType::Document,
                pb::InputType::Unspecified => InputType::Raw,
            },
            ..Default::default()
        };
        let mut conv = Conversation::new(&model, o).unwrap();
        let want = conv.turn(text, "").unwrap();
        let e = &got.embeddings[0];
        assert_close(
            &format!("{pooling:?} {standardize:?} {input_type:?}"),
            &e.values,
            &want.embedding,
            F32,
        );
        // The query template's tokens join the turn: prefix + text.
        let text_ids = model.tokenizer().encode(text).unwrap();
        let prefix = info.input_types["query"].split("{text}").next().unwrap().to_string();
        let expected_ids = match input_type {
            pb::InputType::Query => [model.tokenizer().encode(&prefix).unwrap(), text_ids.clone()].concat(),
            _ => text_ids.clone(),
        };
        assert_eq!(conv.tokens(), &expected_ids[..], "{input_type:?}");
        assert_eq!(e.turn_tokens as usize, expected_ids.len());
    }
    // Standardisation changes the vector; raw stays one option away.
    let both: Vec<Vec<f32>> = {
        let mut v = Vec::new();
        for standardize in [pb::Standardize::None, pb::Standardize::Zscore] {
            let r = client
                .embed(pb::EmbedRequest {
                    texts: vec![text.into()],
                    standardize: standardize as i32,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            v.push(r.embeddings[0].values.clone());
        }
        v
    };
    assert!(
        common::cosine(&both[0], &both[1]) < 0.999,
        "z-scoring must change the vector"
    );

    for (field, bad) in [
        (
            "standardize",
            pb::EmbedRequest {
                standardize: 99,
                texts: vec!["x".into()],
                ..Default::default()
            },
        ),
        (
            "input_type",
            pb::EmbedRequest {
                input_type: 99,
                texts: vec!["x".into()],
                ..Default::default()
            },
        ),
        (
            "pooling",
            pb::EmbedRequest {
                pooling: 99,
                texts: vec!["x".into()],
                ..Default::default()
            },
        ),
    ] {
        let err = client.embed(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    for (field, o) in [
        (
            "standardize",
            pb::SessionOptions {
                standardize: 7,
                ..Default::default()
            },
        ),
        (
            "needs pooling PROBE_MEAN",
            pb::SessionOptions {
                standardize: pb::Standardize::Head as i32,
                pooling: pb::Pooling::Probe as i32,
                ..Default::default()
            },
        ),
        (
            "input_type",
            pb::SessionOptions {
                input_type: 7,
                ..Default::default()
            },
        ),
    ] {
        let responses = converse_all(&mut client, vec![options(o), turn("ok", "still works", "")]).await;
        assert_eq!(error(&responses[0]).code, Code::InvalidArgument as i32, "{field}");
        assert!(
            error(&responses[0]).message.contains(field),
            "{}",
            error(&responses[0]).message
        );
        assert_eq!(
            embedding(&responses[1]).values.len(),
            model.embedding_head().dimensions,
            "the session goes on with the defaults"
        );
    }

    // A stream with the probe: each turn's vector equals a library
    // conversation's with the same options.
    let responses = converse_all(
        &mut client,
        vec![
            options(pb::SessionOptions {
                pooling: pb::Pooling::Probe as i32,
                include_turn_mean: true,
                ..Default::default()
            }),
            turn("a", TURNS[1].0, "user"),
            turn("b", TURNS[2].0, "assistant"),
        ],
    )
    .await;
    let mut conv = Conversation::new(
        &model,
        ConversationOptions {
            pooling: Pooling::Probe,
            standardize: Standardize::Whiten,
            include_turn_mean: true,
            ..Default::default()
        },
    )
    .unwrap();
    for (r, (text, role)) in responses[1..].iter().zip([TURNS[1], TURNS[2]]) {
        let want = conv.turn(text, role).unwrap();
        let got = embedding(r);
        assert_close("probe over the wire", &got.values, &want.embedding, F32);
        assert_close(
            "turn mean beside the probe",
            &got.turn_mean,
            want.turn_mean.as_ref().unwrap(),
            F32,
        );
        assert_eq!(
            got.context_tokens as usize,
            conv.context_len(),
            "the probe never joins the context"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// After a normal close, a cancellation and a killed client process, GetStats shows 0 sessions and 0 KV bytes.
async fn caches_are_freed_when_streams_end() {
    let server = TestServer::start(&[]).await;
    let zero = |s: &pb::Stats| s.active_sessions == 0 && s.kv_cache_bytes == 0;

    // Normal close.
    let mut client = server.client().await;
    let responses = converse_all(&mut client, vec![turn("a", TURNS[1].0, "user")]).await;
    assert_eq!(responses.len(), 1);
    let stats = server.wait_stats("after a normal close", zero).await;
    assert_eq!(stats.turns_total, 1);

    // Cancellation: the client drops the stream while it is open and holds a cache.
    let (tx, stream, first) = open_stream(&mut client, turn("a", TURNS[1].0, "user")).await;
    assert!(embedding(&first).context_tokens > 0);
    let open = server.wait_stats("while open", |s| s.active_sessions == 1).await;
    assert!(
        open.kv_cache_bytes > 0,
        "an open conversation holds its cache: {open:?}"
    );
    println!("GetStats with one open stream: {open:?}");
    drop(stream);
    drop(tx);
    let after = server.wait_stats("after cancellation", zero).await;
    println!("GetStats after cancellation: {after:?}");

    // A client process killed mid-stream.
    let mut child = std::process::Command::new(BIN)
        .args(["converse", "--addr", &server.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, r#"{{"text": "def add(a, b): return a + b", "role": "user"}}"#).unwrap();
    stdin.flush().unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"values\""), "the client got its embedding: {line}");
    let open = server
        .wait_stats("client process open", |s| s.active_sessions == 1)
        .await;
    assert!(open.kv_cache_bytes > 0);
    child.kill().unwrap(); // SIGKILL: no goodbye on the wire
    child.wait().unwrap();
    server.wait_stats("after the client process was killed", zero).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A message over --max-message-bytes gets RESOURCE_EXHAUSTED (stream and unary); the server keeps serving.
async fn oversize_messages_are_resource_exhausted() {
    let server = TestServer::start(&["--max-message-bytes", "2048"]).await;
    let mut client = server.client().await;
    let big = "x".repeat(4096);

    let mut stream = client
        .converse(tokio_stream::iter(vec![turn("big", &big, "")]))
        .await
        .unwrap()
        .into_inner();
    let status = match stream.next().await {
        Some(Ok(r)) => panic!("no response expected for an oversize message, got {r:?}"),
        Some(Err(s)) => s,
        None => panic!("the stream ended OK"),
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    let status = client
        .embed(pb::EmbedRequest {
            texts: vec![big],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    let ok = converse_all(&mut client, vec![turn("small", "small text", "")]).await;
    assert_eq!(embedding(&ok[0]).values.len(), common::tiny_dims());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Streams over --max-sessions get RESOURCE_EXHAUSTED; the open ones keep working, and a slot frees on close.
async fn stream_limit_is_resource_exhausted() {
    let server = TestServer::start(&["--max-sessions", "2"]).await;
    let mut client = server.client().await;
    let mut open = Vec::new();
    for i in 0..2 {
        let (tx, s, _) = open_stream(&mut client, turn(&format!("s{i}"), "hello", "")).await;
        open.push((tx, s));
    }
    let (_tx3, rx3) = tokio::sync::mpsc::channel::<ConverseRequest>(4);
    let refused = client
        .converse(tokio_stream::wrappers::ReceiverStream::new(rx3))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    assert!(refused.message().contains("limit is 2"), "{}", refused.message());

    // The open streams still work.
    let (tx, s) = &mut open[0];
    tx.send(turn("again", "more", "")).await.unwrap();
    assert!(embedding(&s.next().await.unwrap().unwrap()).context_tokens > 1);

    // Closing one frees a slot.
    open.pop();
    server.wait_stats("one slot free", |s| s.active_sessions == 1).await;
    let ok = converse_all(&mut client, vec![turn("new", "new stream", "")]).await;
    assert_eq!(ok.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Embed is stateless (each text equals a fresh conversation's first raw turn) and batches its texts
/// into one call; ModelInfo describes the model.
async fn embed_and_model_info() {
    let server = TestServer::start(&["--max-context-tokens", "1024", "--max-batch-tokens", "64"]).await;
    let mut client = server.client().await;
    // Texts of 2–4 tokens (one batch, padded by at most 2 rows each), LAST_TOKEN:
    // the padded rows must not leak into any text's last row.
    let texts: Vec<String> = ["first text", "second, different text", "a third", "and one more"]
        .map(String::from)
        .to_vec();
    let before = server.wait_stats("idle", |_| true).await;
    let got = client
        .embed(pb::EmbedRequest {
            texts: texts.clone(),
            pooling: pb::Pooling::LastToken as i32,
            dimensions: 32,
            normalize: Some(false),
            standardize: pb::Standardize::Zscore as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let model = common::tiny();
    let o = ConversationOptions {
        pooling: stateful_embedder::conversation::Pooling::LastToken,
        standardize: stateful_embedder::conversation::Standardize::Zscore,
        dimensions: Some(32),
        normalize: false,
        ..Default::default()
    };
    for (text, e) in texts.iter().zip(&got.embeddings) {
        let want = Conversation::new(&model, o.clone()).unwrap().turn(text, "").unwrap();
        assert_close(text, &e.values, &want.embedding, F32);
        assert_eq!(e.context_tokens, e.turn_tokens);
    }
    let after = server.wait_stats("answered", |_| true).await;
    assert_eq!(
        after.model_calls_total - before.model_calls_total,
        1,
        "the texts share one call"
    );
    assert_eq!(after.turns_total - before.turns_total, 4);
    // 40 texts of 14 bytes run in chunks of at most --max-batch-tokens (64)
    // bytes, 4 texts each, which bounds the caches held at once.
    let many: Vec<String> = (0..40).map(|i| format!("text number {i:02}")).collect();
    let got = client
        .embed(pb::EmbedRequest {
            texts: many.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.embeddings.len(), 40);
    // Embed's defaults: PROBE_MEAN (the probe in each text's call) through
    // the learned head, equal to a library conversation with the defaults.
    let embed_defaults = ConversationOptions::default();
    for (text, e) in many.iter().zip(&got.embeddings) {
        let want = Conversation::new(&model, embed_defaults.clone())
            .unwrap()
            .turn(text, "")
            .unwrap();
        assert_close(text, &e.values, &want.embedding, F32);
        assert_eq!(e.context_tokens, e.turn_tokens, "the probe never joins the context");
    }
    // Each text's row is its tokens and the probe's: a chunk of 4
    // runs in as many calls as rows of that length fit in 64 padded slots.
    let row = model.tokenizer().encode(&many[0]).unwrap().len() + model.probe_ids().len();
    assert!(
        many.iter()
            .all(|t| model.tokenizer().encode(t).unwrap().len() + model.probe_ids().len() == row)
    );
    let per_call = 64 / row;
    let last = server.wait_stats("answered", |_| true).await;
    assert_eq!(
        last.model_calls_total - after.model_calls_total,
        10 * 4u64.div_ceil(per_call as u64),
        "40 texts in chunks of 4, rows of {row} tokens"
    );
    assert_eq!(last.kv_cache_bytes, 0, "an Embed keeps no cache");
    let empty = client
        .embed(pb::EmbedRequest {
            texts: vec![String::new()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), Code::InvalidArgument);

    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (info.layers, info.hidden_size, info.kv_heads, info.head_dim),
        (2, 64, 2, 16)
    );
    assert_eq!(info.kv_dtype, "float32");
    assert_eq!(info.max_context_tokens, 1024);
    assert_eq!(info.kv_bytes_per_token, 2 * 2 * 2 * 16 * 4);
    assert!(info.vocab_size > 151_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// SIGTERM (to the server binary): health goes NOT_SERVING, new streams are refused, an open stream ends
/// with UNAVAILABLE after the drain deadline (4 s: room for a busy machine), and the process exits 0.
async fn shutdown_drains_then_ends_streams() {
    let mut server = TestServer::process(&["--drain-seconds", "4"]).await;
    let mut client = server.client().await;
    let (tx, mut stream, _) = open_stream(&mut client, turn("a", "hello", "")).await;

    let status = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());

    server.wait_health(ServingStatus::NotServing).await;
    let refused = client
        .converse(tokio_stream::iter(vec![turn("late", "hi", "")]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable);
    assert!(refused.message().contains("shutting down"), "{refused:?}");

    // The open stream still works during the drain…
    tx.send(turn("b", "during drain", "")).await.unwrap();
    let r = stream.next().await.unwrap().unwrap();
    assert_eq!(r.index, 1);
    // …and ends with UNAVAILABLE once the deadline passes.
    let end = stream.next().await.expect("the stream ends with a status");
    let status = end.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "server shutting down");
    let exit = server.wait_exit(Duration::from_secs(20)).await;
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// In process, `server::run`'s shutdown future drains as a signal does; with `--drain-seconds inf`
/// there is no deadline (and no panic): an open stream goes on until its client half-closes, then
/// `run` returns Ok.
async fn shutdown_future_drains_without_a_deadline() {
    let mut server = TestServer::start(&["--drain-seconds", "inf"]).await;
    let mut client = server.client().await;
    let (tx, mut stream, _) = open_stream(&mut client, turn("a", "hello", "")).await;

    server.begin_shutdown();
    server.wait_health(ServingStatus::NotServing).await;
    let refused = client.embed(pb::EmbedRequest {
        texts: vec!["late".into()],
        ..Default::default()
    });
    assert_eq!(refused.await.unwrap_err().code(), Code::Unavailable);

    tx.send(turn("b", "during drain", "")).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().index, 1);
    drop(tx); // half-close: the stream ends OK, and with it the drain
    assert!(stream.next().await.is_none(), "the stream ends cleanly");
    drop((stream, client));
    server.stopped().await.expect("server::run returns Ok after the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Reflection answers on v1 (newer clients) as well as v1alpha (grpcurl 1.8.6, tested from Python).
async fn reflection_v1_lists_the_services() {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let server = TestServer::start(&[]).await;
    let mut client = ServerReflectionClient::new(server.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"embedder.v1.Embedder".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}

/// Opens `n` streams and sends each one equal-length turn (so that no padding
/// rule splits a batch); returns the streams and the texts.
async fn send_short_turns(
    client: &mut EmbedderClient<Channel>,
    n: usize,
) -> (
    Vec<(
        tokio::sync::mpsc::Sender<ConverseRequest>,
        tonic::Streaming<ConverseResponse>,
    )>,
    Vec<String>,
) {
    let texts: Vec<String> = (0..n)
        .map(|i| format!("stream {i}: what does this function return?"))
        .collect();
    let mut streams = Vec::new();
    for (i, text) in texts.iter().enumerate() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(turn(&format!("s{i}"), text, "user")).await.unwrap();
        let stream = client
            .converse(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        streams.push((tx, stream));
    }
    (streams, texts)
}

/// Checks each stream's answer against the oracle (first turns of fresh
/// conversations); returns the context tokens they now hold.
async fn check_short_turns(
    streams: &mut [(
        tokio::sync::mpsc::Sender<ConverseRequest>,
        tonic::Streaming<ConverseResponse>,
    )],
    texts: &[String],
) -> u64 {
    let model = common::tiny();
    let mut context = 0;
    for ((_, stream), text) in streams.iter_mut().zip(texts) {
        let r = stream.next().await.unwrap().unwrap();
        let tt = model.tokenizer().turn(text, "user").unwrap();
        let want = oracle(&model, &tt.ids, tt.text.clone(), &ConversationOptions::default());
        assert_close(&format!("stream {}", r.tag), &embedding(&r).values, &want, F32);
        context += u64::from(embedding(&r).context_tokens);
    }
    context
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Turns of streams that queue up behind a running call share one model call,
/// and each still meets the oracle. A long turn (about 4,000 tokens in one
/// call, over a second on the tiny model) keeps the engine busy while eight
/// streams send a turn each; the test waits until the long call runs and all
/// eight are queued behind it, so the batch is certain.
async fn queued_turns_of_many_streams_share_a_call() {
    let server = TestServer::start(&["--prefill-chunk-tokens", "8192"]).await;
    let mut client = server.client().await;
    let base = server.wait_stats("start", |_| true).await;

    let long_text = "alpha beta gamma delta ".repeat(1000);
    let long_tokens = common::tiny().tokenizer().turn(&long_text, "").unwrap().ids.len();
    let (long_tx, mut long_rx, _) = open_stream(&mut client, turn("warm", "hello", "")).await;
    long_tx.send(turn("long", &long_text, "")).await.unwrap();
    // Wait until the long call has started, not only until the turn is
    // queued: a round takes every job already waiting, so a turn sent before
    // the long one is taken would share its round but not the batch (a model
    // call counts as it starts; "hello" was the first).
    let long_call = base.model_calls_total + 2;
    server
        .wait_stats("the long call running", |s| s.model_calls_total >= long_call)
        .await;
    let (mut streams, texts) = send_short_turns(&mut client, 8).await;
    let queued = server
        .wait_stats("eight turns queued behind the long one", |s| s.queued_turns == 9)
        .await;
    assert_eq!(
        queued.model_calls_total, long_call,
        "the long call was still running: {queued:?}"
    );

    let long = long_rx.next().await.unwrap().unwrap();
    assert_eq!(embedding(&long).turn_tokens as usize, long_tokens);
    check_short_turns(&mut streams, &texts).await;
    let after = server.wait_stats("all answered", |s| s.queued_turns == 0).await;
    // "hello", the long turn, then the eight turns in one call (each turn's
    // probe in its own call).
    assert_eq!(after.model_calls_total - base.model_calls_total, 3, "{after:?}");
    assert_eq!(after.turns_total - base.turns_total, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A long prefill does not hold up other streams: a turn that needs many
/// calls (8,000 tokens in 16-token chunks) runs one chunk per round, and
/// turns sent meanwhile are answered, exact, between its chunks. When its
/// stream goes away part-way, the rest of its prefill is dropped and its
/// part-built cache freed.
async fn short_turns_are_answered_while_a_long_turn_prefills() {
    let server = TestServer::start(&["--prefill-chunk-tokens", "16"]).await;
    let mut client = server.client().await;
    let base = server.wait_stats("start", |_| true).await;
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();

    let long_text = "alpha beta gamma delta ".repeat(2000);
    let chunks = common::tiny()
        .tokenizer()
        .turn(&long_text, "")
        .unwrap()
        .ids
        .len()
        .div_ceil(16) as u64;
    let (long_tx, long_rx, _) = open_stream(&mut client, turn("warm", "hello", "")).await;
    long_tx.send(turn("long", &long_text, "")).await.unwrap();
    server
        .wait_stats("the long turn running", |s| {
            s.model_calls_total >= base.model_calls_total + 2
        })
        .await;

    let (mut streams, texts) = send_short_turns(&mut client, 8).await;
    let context = check_short_turns(&mut streams, &texts).await;
    let during = server.wait_stats("now", |_| true).await;
    println!("after the eight answers: {during:?}");
    let calls = during.model_calls_total - base.model_calls_total;
    assert!(
        calls < 1 + chunks,
        "the long turn was still prefilling ({calls} of {chunks} calls)"
    );
    assert_eq!(during.queued_turns, 1, "only the long turn is left");

    // The long turn's stream goes away part-way through its prefill.
    drop((long_tx, long_rx));
    let after = server
        .wait_stats("the long turn dropped", |s| s.queued_turns == 0)
        .await;
    println!("after the long stream went: {after:?}");
    let calls = after.model_calls_total - base.model_calls_total;
    assert!(
        calls < 1 + chunks,
        "the rest of the long prefill was dropped ({calls} of {chunks} calls)"
    );
    // Only the eight streams' caches are left: the long turn's part-built
    // cache and its conversation went with it.
    assert_eq!(after.kv_cache_bytes, context * info.kv_bytes_per_token);
    assert_eq!(after.turns_total - base.turns_total, 9);

    // An Embed whose texts need one call and several: the reply waits for
    // both, and each equals a fresh conversation's turn.
    let texts = vec!["alpha beta gamma delta ".repeat(25), "a short text".to_string()];
    let got = client
        .embed(pb::EmbedRequest {
            texts: texts.clone(),
            pooling: pb::Pooling::Mean as i32,
            standardize: pb::Standardize::Zscore as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let model = common::tiny();
    let mut want_calls = 0;
    for (text, e) in texts.iter().zip(&got.embeddings) {
        let tokens = model.tokenizer().turn(text, "").unwrap().ids.len();
        want_calls += tokens.div_ceil(16) as u64;
        let mean = ConversationOptions {
            pooling: Pooling::Mean,
            standardize: Standardize::Zscore,
            ..ConversationOptions::default()
        };
        let want = Conversation::new(&model, mean).unwrap().turn(text, "").unwrap();
        assert_close(&format!("{tokens} tokens"), &e.values, &want.embedding, F32);
    }
    assert!(want_calls > 2, "one text needs several calls");
    let last = server.wait_stats("embedded", |_| true).await;
    assert_eq!(last.model_calls_total - after.model_calls_total, want_calls);
    assert_eq!(last.kv_cache_bytes, after.kv_cache_bytes, "an Embed keeps no cache");
}
