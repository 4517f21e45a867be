//! What an operator relies on: half-open connections detected by keepalive
//! pings, and structured logs that carry stream ids and never the text.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use stateful_embedder::pb::{self, embedder_client::EmbedderClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::{
    common,
    grpc::{TestServer, embedding, open, turn},
};

const BIN: &str = env!("CARGO_BIN_EXE_stateful-embedder");

/// A TCP proxy to the server that can go silent: after `freeze`, it forwards
/// nothing either way and closes nothing, as a client host that lost power
/// or a network that black-holes packets would (no FIN, no RST).
struct FreezeProxy {
    addr: String,
    frozen: Arc<AtomicBool>,
    _task: tokio::task::JoinHandle<()>,
}

impl FreezeProxy {
    async fn to(server: &TestServer) -> FreezeProxy {
        let target = server.addr.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        let task = tokio::spawn(async move {
            loop {
                let (inbound, _) = listener.accept().await.unwrap();
                let outbound = tokio::net::TcpStream::connect(target.clone()).await.unwrap();
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                tokio::spawn(pipe(ri, wo, flag.clone()));
                tokio::spawn(pipe(ro, wi, flag.clone()));
            }
        });
        FreezeProxy {
            addr,
            frozen,
            _task: task,
        }
    }

    async fn client(&self) -> EmbedderClient<Channel> {
        EmbedderClient::new(
            Channel::from_shared(self.addr.clone())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
    }

    fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until frozen; then holds both halves open forever.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Silent from now on: the bytes are dropped, the sockets stay open.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A half-open connection (the peer silent, nothing closed) is detected by
/// the server's keepalive pings: within about interval + timeout its stream
/// ends and its cache is freed, while another stream goes on.
async fn keepalive_frees_a_half_open_peer() {
    let server = TestServer::start(&["--keepalive-interval", "0.3", "--keepalive-timeout", "0.3"]).await;
    let proxy = FreezeProxy::to(&server).await;
    let mut far = proxy.client().await;
    let (tx, mut rx) = open(&mut far).await;
    tx.send(turn("t", "a turn from a host about to vanish", "user"))
        .await
        .unwrap();
    let e = embedding(&rx.next().await.unwrap().unwrap()).clone();
    assert!(e.context_tokens > 0);

    let mut near = server.client().await;
    let (near_tx, mut near_rx) = open(&mut near).await;
    near_tx.send(turn("n", "a client that stays", "user")).await.unwrap();
    embedding(&near_rx.next().await.unwrap().unwrap());
    let held = server.wait_stats("two streams", |s| s.active_sessions == 2).await;

    proxy.freeze();
    let frozen = Instant::now();
    let after = server
        .wait_stats("the silent peer's stream gone", |s| {
            s.active_sessions == 1 && s.kv_cache_bytes < held.kv_cache_bytes
        })
        .await;
    let took = frozen.elapsed();
    println!("half-open peer dropped after {took:?}: {after:?}");
    // The far client's stream is still "open" on its side: nothing told it.
    drop((tx, rx));
    near_tx.send(turn("n2", "still here", "user")).await.unwrap();
    embedding(&near_rx.next().await.unwrap().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `--log-format json`: every line is one JSON object, a stream's lines carry
/// its stream id, and a turn's text appears in no line at info level.
async fn json_logs_carry_stream_ids_and_no_text() {
    let marker = "zebra-quartz-4471 should never be logged";
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--addr", "127.0.0.1:0", "--log-format", "json", "--model"])
        .arg(common::tiny_dir())
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the server starts");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let addr = format!("http://{}", line.trim().strip_prefix("listening on ").unwrap());
    let stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || BufReader::new(stderr).lines().map(|l| l.unwrap()).collect::<Vec<_>>());

    let deadline = Instant::now() + Duration::from_secs(60);
    // GetStats answers once the model is loaded.
    let mut client = loop {
        if let Ok(mut c) = EmbedderClient::connect(addr.clone()).await
            && c.get_stats(pb::GetStatsRequest {}).await.is_ok()
        {
            break c;
        }
        assert!(Instant::now() < deadline, "the server never answered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (tx, mut rx) = open(&mut client).await;
    tx.send(turn("t", marker, "user")).await.unwrap();
    embedding(&rx.next().await.unwrap().unwrap());
    tx.send(turn("bad", marker, "robot")).await.unwrap();
    rx.next().await.unwrap().unwrap(); // an in-band error naming the role, not the text
    drop(tx);
    while rx.next().await.is_some() {}
    drop(client);
    // SIGTERM: the server drains and exits, its logs complete.
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(child.wait().unwrap().success(), "a clean exit after SIGTERM");
    let lines = logs.join().unwrap();
    let mut stream_lines = 0;
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(!l.contains("zebra-quartz"), "the text was logged: {l}");
        let message = v["fields"]["message"].as_str().unwrap_or_default();
        if message.starts_with("stream ") {
            stream_lines += 1;
            assert!(
                v["span"]["stream_id"].is_number(),
                "a stream line without its stream id: {l}"
            );
        }
    }
    assert!(stream_lines >= 2, "stream opened and closed lines: {lines:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `--max-streams-per-connection` is advertised in HTTP/2's settings: a
/// third stream on a connection that allows two waits (in the client) until
/// one of the first two ends, then runs.
async fn streams_per_connection_are_capped() {
    let server = TestServer::start(&["--max-streams-per-connection", "2"]).await;
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for i in 0..2 {
        let (tx, mut rx) = open(&mut client).await;
        tx.send(turn("t", &format!("stream {i}"), "")).await.unwrap();
        embedding(&rx.next().await.unwrap().unwrap());
        streams.push((tx, rx));
    }
    let mut third_client = client.clone();
    let third = tokio::spawn(async move {
        let (tx, mut rx) = open(&mut third_client).await;
        tx.send(turn("t", "the third", "")).await.unwrap();
        let r = rx.next().await.unwrap().unwrap();
        (tx, rx, r)
    });
    // The server holds two: the third has not reached it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let s = server.wait_stats("two open", |_| true).await;
    assert_eq!(s.active_sessions, 2, "{s:?}");
    assert!(!third.is_finished(), "the third stream waits for a free slot");
    drop(streams.pop());
    let (_tx, _rx, r) = tokio::time::timeout(Duration::from_secs(20), third)
        .await
        .expect("the third stream runs once a slot is free")
        .unwrap();
    embedding(&r);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A header list over `--max-header-list-bytes` is refused by HTTP/2 before
/// any handler runs, the same header under the default 16 KiB passes, and a
/// normal call on the limited server still works.
async fn oversized_header_lists_are_refused() {
    let padded = || {
        let mut request = tonic::Request::new(pb::GetStatsRequest {});
        request
            .metadata_mut()
            .insert("x-padding", "p".repeat(8192).parse().unwrap());
        request
    };
    let default = TestServer::start(&[]).await;
    let passed = default.client().await.get_stats(padded()).await;
    assert!(passed.is_ok(), "8 KiB of headers under the default 16 KiB: {passed:?}");

    let server = TestServer::start(&["--max-header-list-bytes", "4096"]).await;
    let refused = server.client().await.get_stats(padded()).await;
    assert!(refused.is_err(), "an 8 KiB header over a 4 KiB limit: {refused:?}");
    let mut client = server.client().await;
    assert!(client.get_stats(pb::GetStatsRequest {}).await.is_ok());
}
