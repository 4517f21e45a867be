//! Bad input, each case with its exact expected outcome: an in-band error
//! with the session intact, or a stream status, and the server (and every
//! other stream) unharmed. Raw bytes go out through a codec that sends what
//! it is given, so malformed protobuf reaches the server as a client's would.

use std::time::Duration;

use bytes::BufMut;
use prost::Message;
use stateful_embedder::pb::{self, converse_response::Result as Reply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_stream::StreamExt;
use tonic::{
    Code, Status,
    codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder},
    transport::Channel,
};

use crate::support::{
    models,
    server::TestServer,
    stream::{answer, converse_all, embedding, error, open, options, turn},
    tokens,
};

/// Sends raw bytes as each message; decodes responses as `R`.
struct Raw<R>(std::marker::PhantomData<R>);

impl<R> Default for Raw<R> {
    fn default() -> Self {
        Raw(std::marker::PhantomData)
    }
}

struct RawEncoder;
struct ProstDecoder<R>(std::marker::PhantomData<R>);

impl Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl<R: Message + Default + Send + 'static> Decoder for ProstDecoder<R> {
    type Item = R;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<R>, Status> {
        R::decode(src).map(Some).map_err(|e| Status::internal(e.to_string()))
    }
}

impl<R: Message + Default + Send + 'static> Codec for Raw<R> {
    type Encode = Vec<u8>;
    type Decode = R;
    type Encoder = RawEncoder;
    type Decoder = ProstDecoder<R>;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> ProstDecoder<R> {
        ProstDecoder(std::marker::PhantomData)
    }
}

/// Sends `messages` (raw bytes each) on a Converse stream; returns the
/// responses before the stream's end and its final status (None if OK).
async fn raw_converse(channel: Channel, messages: Vec<Vec<u8>>) -> (Vec<pb::ConverseResponse>, Option<Status>) {
    let mut grpc = tonic::client::Grpc::new(channel).max_encoding_message_size(64 << 20);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/embedder.v1.Embedder/Converse");
    let response = grpc
        .streaming(
            tonic::Request::new(tokio_stream::iter(messages)),
            path,
            Raw::<pb::ConverseResponse>::default(),
        )
        .await;
    let mut stream = match response {
        Ok(r) => r.into_inner(),
        Err(status) => return (Vec::new(), Some(status)),
    };
    let mut got = Vec::new();
    loop {
        match tokio::time::timeout(crate::support::DEADLINE, stream.next())
            .await
            .expect("the server answers in time")
        {
            Some(Ok(r)) => got.push(r),
            Some(Err(status)) => return (got, Some(status)),
            None => return (got, None),
        }
    }
}

async fn raw_embed(channel: Channel, message: Vec<u8>) -> Result<pb::EmbedResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/embedder.v1.Embedder/Embed");
    grpc.unary(tonic::Request::new(message), path, Raw::<pb::EmbedResponse>::default())
        .await
        .map(tonic::Response::into_inner)
}

/// A ConverseRequest whose turn text is the given bytes, valid UTF-8 or not.
fn turn_with_text_bytes(text: &[u8]) -> Vec<u8> {
    // Turn { text (1): bytes }, wrapped as ConverseRequest { turn (3) }.
    let mut turn = vec![0x0a];
    prost::encoding::encode_varint(text.len() as u64, &mut turn);
    turn.extend_from_slice(text);
    let mut request = vec![0x1a];
    prost::encoding::encode_varint(turn.len() as u64, &mut request);
    request.extend_from_slice(&turn);
    request
}

/// The server still answers a good conversation (and health) after the case.
async fn still_fine(server: &TestServer) {
    let mut client = server.client().await;
    let ok = converse_all(&mut client, vec![turn("ok", "still fine", "")]).await;
    assert_eq!(embedding(&ok[0]).values.len(), models::tiny_dims());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Malformed protobuf and a string field that is not UTF-8: the stream (or
/// the Embed call) ends with INVALID_ARGUMENT; nothing else is touched.
async fn undecodable_messages_are_invalid_argument() {
    let server = TestServer::start(&[]).await;
    // A stream that is open and working throughout.
    let mut client = server.client().await;
    let (bystander_tx, mut bystander) = open(&mut client).await;
    bystander_tx.send(turn("b1", "a bystander", "")).await.unwrap();
    let first = embedding(&answer(&mut bystander).await).clone();

    let good = pb::ConverseRequest {
        tag: "good".into(),
        action: Some(pb::converse_request::Action::Turn(pb::Turn {
            text: "fine".into(),
            role: String::new(),
        })),
    }
    .encode_to_vec();
    for (what, bad) in [
        ("garbage bytes", vec![0xff, 0xff, 0xff, 0xff]),
        ("a truncated field", vec![0x1a, 0x10, 0x0a]),
        (
            "text that is not UTF-8",
            turn_with_text_bytes(&[b'o', b'k', 0xc3, 0x28]),
        ),
    ] {
        let (responses, status) = raw_converse(server.channel().await, vec![good.clone(), bad.clone()]).await;
        assert_eq!(responses.len(), 1, "{what}: the good request before it was answered");
        assert!(matches!(responses[0].result, Some(Reply::Embedding(_))));
        let status = status.unwrap_or_else(|| panic!("{what}: the stream ended OK"));
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains("not a valid request"), "{what}: {status:?}");

        let status = raw_embed(server.channel().await, bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{what} (Embed): {status:?}");
    }
    // The bystander's conversation went on untouched.
    bystander_tx.send(turn("b2", "still here", "")).await.unwrap();
    let second = embedding(&answer(&mut bystander).await).clone();
    assert!(second.context_tokens > first.context_tokens);
    server
        .wait_stats("only the bystander's cache", |s| s.open_streams == 1)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A message of exactly the limit is read; one byte more ends the stream
/// with RESOURCE_EXHAUSTED.
async fn the_message_limit_is_exact() {
    let limit = 4 << 20;
    let server = TestServer::start(&[]).await;
    let sized = |total: usize| {
        // Find the text length whose encoded request is `total` bytes.
        let mut n = total - 16;
        loop {
            let text: Vec<u8> = b"word ".iter().copied().cycle().take(n).collect();
            let m = turn_with_text_bytes(&text);
            match m.len().cmp(&total) {
                std::cmp::Ordering::Equal => return m,
                std::cmp::Ordering::Less => n += 1,
                std::cmp::Ordering::Greater => n -= 1,
            }
        }
    };
    let (responses, status) = raw_converse(server.channel().await, vec![sized(limit)]).await;
    assert!(status.is_none(), "4 MiB exactly is read: {status:?}");
    // Read, and refused in-band as a turn over the token limit (a 4 MiB turn).
    assert_eq!(error(&responses[0]).code, Code::ResourceExhausted as i32);
    let (_, status) = raw_converse(server.channel().await, vec![sized(limit + 1)]).await;
    let status = status.expect("4 MiB + 1 ends the stream");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    still_fine(&server).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Options sent twice, options after a turn, dimensions 0 (the full size)
/// and one over the hidden size, unknown enum numbers, a turn one token
/// over the window under REJECT and one exactly filling it: each has its
/// exact outcome, in-band, and the session goes on.
async fn session_level_bad_input_is_in_band() {
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let r = converse_all(
        &mut client,
        vec![
            options(pb::SessionOptions::default()),
            options(pb::SessionOptions::default()),
        ],
    )
    .await;
    assert!(matches!(r[0].result, Some(Reply::Ready(_))));
    assert_eq!(error(&r[1]).code, Code::InvalidArgument as i32);

    let r = converse_all(
        &mut client,
        vec![turn("t", "hi", ""), options(pb::SessionOptions::default())],
    )
    .await;
    assert_eq!(error(&r[1]).code, Code::InvalidArgument as i32, "options after a turn");

    for (o, want) in [
        (pb::SessionOptions::default(), Ok(models::tiny_dims() as u32)),
        (
            pb::SessionOptions {
                dimensions: models::tiny_dims() as u32 + 1,
                ..Default::default()
            },
            Err(Code::InvalidArgument),
        ),
        (
            pb::SessionOptions {
                pooling: pb::Pooling::Mean as i32,
                dimensions: 65,
                ..Default::default()
            },
            Err(Code::InvalidArgument),
        ),
        (
            pb::SessionOptions {
                pooling: 99,
                ..Default::default()
            },
            Err(Code::InvalidArgument),
        ),
        (
            pb::SessionOptions {
                overflow: -1,
                ..Default::default()
            },
            Err(Code::InvalidArgument),
        ),
        (
            pb::SessionOptions {
                session_mode: 7,
                ..Default::default()
            },
            Err(Code::InvalidArgument),
        ),
    ] {
        let r = converse_all(&mut client, vec![options(o.clone()), turn("t", "after", "")]).await;
        match (&r[0].result, want) {
            (Some(Reply::Ready(ready)), Ok(dims)) => assert_eq!(ready.dimensions, dims, "{o:?}"),
            (Some(Reply::Error(e)), Err(code)) => assert_eq!(e.code, code as i32, "{o:?}: {e:?}"),
            (got, want) => panic!("{o:?}: got {got:?}, want {want:?}"),
        }
        assert!(embedding(&r[1]).context_tokens > 0, "the session goes on after {o:?}");
    }

    // REJECT at the window's edge: a turn that fills it exactly fits; one token more does not.
    let first = "def add(a, b): return a + b";
    let n1 = tokens::encode(first).len();
    let word = tokens::encode(" x").len();
    assert_eq!(word, 1, "' x' is one token");
    let window = n1 + 3;
    let reject = pb::SessionOptions {
        max_context_tokens: window as u32,
        overflow: pb::Overflow::Reject as i32,
        ..Default::default()
    };
    let over = converse_all(
        &mut client,
        vec![
            options(reject.clone()),
            turn("a", first, ""),
            turn("over", " x x x x", ""),
            turn("fit", " x x x", ""),
        ],
    )
    .await;
    assert_eq!(tokens::encode(" x x x x").len(), 4);
    let e = error(&over[2]);
    assert_eq!(e.code, Code::ResourceExhausted as i32, "{e:?}");
    assert!(e.message.contains("REJECT"), "{e:?}");
    assert_eq!(embedding(&over[3]).context_tokens as usize, window, "exactly full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A plain HTTP/1.1 request to the gRPC port gets no answer but a closed
/// connection (the server speaks HTTP/2 only); the server is unharmed.
async fn http1_requests_are_refused_harmlessly() {
    let server = TestServer::start(&[]).await;
    let addr = server.addr.trim_start_matches("http://").to_string();
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    socket
        .write_all(b"GET /embedder.v1.Embedder/GetStats HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut reply)).await;
    assert!(read.is_ok(), "the server closes the connection");
    assert!(
        !String::from_utf8_lossy(&reply).contains("200 OK"),
        "no HTTP/1.1 success: {:?}",
        String::from_utf8_lossy(&reply)
    );
    still_fine(&server).await;
}
