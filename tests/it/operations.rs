//! What an operator relies on: half-open connections detected by keepalive
//! pings, structured logs that carry stream ids and never the text, and the
//! HTTP/2 limits.

use std::time::{Duration, Instant};

use stateful_embedder::pb;
use tonic::Code;

use crate::support::{
    DEADLINE,
    proxy::Proxy,
    server::{Launch, TestServer},
    stream::{answer, embedding, next, open, turn},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A half-open connection (the peer silent, nothing closed) is detected by
/// the server's keepalive pings: after the ping timeout (5 s, and at most
/// the interval, 1 s, more) its stream ends and its cache is freed, while a
/// stream on a healthy connection goes on. The server runs in a process of
/// its own and the timeout is far above a stall of a loaded machine, so a
/// healthy connection is never taken for a dead one.
async fn keepalive_frees_a_half_open_peer() {
    let server = TestServer::process(&["--keepalive-interval", "1", "--keepalive-timeout", "5"]).await;
    let proxy = Proxy::to(&server.addr).await;
    let mut far = proxy.client().await;
    let (tx, mut rx) = open(&mut far).await;
    tx.send(turn("t", "a turn from a host about to vanish", "user"))
        .await
        .unwrap();
    assert!(embedding(&answer(&mut rx).await).context_tokens > 0);

    let mut near = server.client().await;
    let (near_tx, mut near_rx) = open(&mut near).await;
    near_tx.send(turn("n", "a client that stays", "user")).await.unwrap();
    embedding(&answer(&mut near_rx).await);
    let held = server.wait_stats("two streams", |s| s.open_streams == 2).await;

    proxy.freeze();
    let frozen = Instant::now();
    let after = server
        .wait_stats("the silent peer's stream gone", |s| {
            s.open_streams == 1 && s.kv_cache_bytes < held.kv_cache_bytes
        })
        .await;
    let took = frozen.elapsed();
    println!("half-open peer dropped after {took:?}: {after:?}");
    // Not before a ping went unanswered for the timeout (less the time an
    // ack already on its way when the proxy froze could have taken) ...
    assert!(
        took >= Duration::from_millis(4_800),
        "dropped after {took:?}: not by keepalive"
    );
    // ... and not long after the interval and the timeout.
    assert!(took <= Duration::from_secs(6 + 10), "dropped only after {took:?}");
    // The far client's stream is still "open" on its side: nothing told it.
    drop((tx, rx));
    near_tx.send(turn("n2", "still here", "user")).await.unwrap();
    embedding(&answer(&mut near_rx).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// `--log-format json`: every line is one JSON object, a stream's lines carry
/// its stream id, and a turn's text appears in no line at info level.
async fn json_logs_carry_stream_ids_and_no_text() {
    let marker = "zebra-quartz-4471 should never be logged";
    let mut server = Launch::new(&["--log-format", "json"]).process().await;
    let mut client = server.client().await;
    let (tx, mut rx) = open(&mut client).await;
    tx.send(turn("t", marker, "user")).await.unwrap();
    embedding(&answer(&mut rx).await);
    tx.send(turn("bad", marker, "robot")).await.unwrap();
    answer(&mut rx).await; // an in-band error naming the role, not the text
    drop(tx);
    while next(&mut rx).await.is_some() {}
    drop(client);
    // SIGTERM: the server drains and exits, its logs complete.
    server.signal("-TERM");
    assert!(server.wait_exit().await.success(), "a clean exit after SIGTERM");
    server.wait_log("the last line", |l| l.contains("\"stopped\"")).await;
    let lines = server.logs();
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
/// `--max-streams-per-connection` is advertised in HTTP/2's SETTINGS (read
/// off the handshake by a raw HTTP/2 client), and a tonic client that has
/// two streams open on a connection that allows two runs its third once
/// one of the first two ends.
async fn streams_per_connection_are_capped() {
    let server = TestServer::start(&["--max-streams-per-connection", "2"]).await;
    // What the server advertises.
    let tcp = tokio::net::TcpStream::connect(server.addr.trim_start_matches("http://"))
        .await
        .unwrap();
    let (send, connection) = h2::client::handshake(tcp).await.expect("an HTTP/2 handshake");
    tokio::spawn(connection);
    let send = tokio::time::timeout(DEADLINE, send.ready())
        .await
        .expect("the connection is ready in time")
        .unwrap();
    // SETTINGS arrive with the server's first frames; an empty request's
    // answer (whatever it is) comes after them.
    let request = http::Request::post(format!("{}/grpc.health.v1.Health/Check", server.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let mut send = send;
    let (response, _) = send.send_request(request, true).unwrap();
    tokio::time::timeout(DEADLINE, response)
        .await
        .expect("an answer in time")
        .unwrap();
    assert_eq!(send.current_max_send_streams(), 2, "the advertised limit");

    // A tonic client waits for a free stream.
    let mut client = server.client().await;
    let mut streams = Vec::new();
    for i in 0..2 {
        let (tx, mut rx) = open(&mut client).await;
        tx.send(turn("t", &format!("stream {i}"), "")).await.unwrap();
        embedding(&answer(&mut rx).await);
        streams.push((tx, rx));
    }
    let mut third_client = client.clone();
    let third = tokio::spawn(async move {
        let (tx, mut rx) = open(&mut third_client).await;
        tx.send(turn("t", "the third", "")).await.unwrap();
        let r = answer(&mut rx).await;
        (tx, rx, r)
    });
    let s = server.wait_stats("two open", |_| true).await;
    assert_eq!(s.open_streams, 2, "{s:?}");
    drop(streams.pop());
    let (_tx, _rx, r) = tokio::time::timeout(DEADLINE, third)
        .await
        .expect("the third stream runs once a stream is free")
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
    let refused = server
        .client()
        .await
        .get_stats(padded())
        .await
        .expect_err("an 8 KiB header over a 4 KiB limit is refused");
    // The server answers an over-size header list with HTTP 431 (Request
    // Header Fields Too Large) and no grpc-status, which gRPC's HTTP-status
    // mapping reads as UNKNOWN.
    assert_eq!(refused.code(), Code::Unknown, "{refused:?}");
    assert!(refused.message().contains("431"), "{refused:?}");
    let before = server.stats().await;
    assert_eq!(before.turns_total, 0, "no handler ran");
    let mut client = server.client().await;
    assert!(client.get_stats(pb::GetStatsRequest {}).await.is_ok());
}
