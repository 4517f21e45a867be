//! Converse streams from a test: requests, responses (every read bounded by
//! [`DEADLINE`]: a server that stops answering fails the test, it never
//! hangs it), and a [`Talker`] that checks each turn against the oracle
//! over the context it tracks itself.

use stateful_embedder::{
    conversation::ConversationOptions,
    pb::{
        self, ConverseRequest, ConverseResponse, converse_request::Action, converse_response::Result as Reply,
        embedder_client::EmbedderClient,
    },
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use super::{
    DEADLINE, models,
    oracle::{F32, assert_close, oracle, stream_defaults},
    tokens::Context,
};

pub fn turn(tag: &str, text: &str, role: &str) -> ConverseRequest {
    ConverseRequest {
        tag: tag.into(),
        action: Some(Action::Turn(pb::Turn {
            text: text.into(),
            role: role.into(),
        })),
    }
}

pub fn options(o: pb::SessionOptions) -> ConverseRequest {
    ConverseRequest {
        tag: "options".into(),
        action: Some(Action::Options(o)),
    }
}

pub fn reset(tag: &str) -> ConverseRequest {
    ConverseRequest {
        tag: tag.into(),
        action: Some(Action::Reset(pb::Reset {})),
    }
}

pub fn create(id: &str) -> pb::SessionOptions {
    pb::SessionOptions {
        session_id: id.into(),
        session_mode: pb::SessionMode::Create as i32,
        ..Default::default()
    }
}

pub fn resume(id: &str) -> pb::SessionOptions {
    pb::SessionOptions {
        session_id: id.into(),
        session_mode: pb::SessionMode::Resume as i32,
        ..Default::default()
    }
}

pub fn embedding(r: &ConverseResponse) -> &pb::Embedding {
    match &r.result {
        Some(Reply::Embedding(e)) => e,
        other => panic!("expected an embedding at index {}, got {other:?}", r.index),
    }
}

pub fn error(r: &ConverseResponse) -> &pb::Error {
    match &r.result {
        Some(Reply::Error(e)) => e,
        other => panic!("expected an error at index {}, got {other:?}", r.index),
    }
}

pub fn ready(r: &ConverseResponse) -> &pb::SessionReady {
    match &r.result {
        Some(Reply::Ready(ready)) => ready,
        other => panic!("expected ready, got {other:?}"),
    }
}

/// The next item of a response stream, within [`DEADLINE`].
pub async fn next(stream: &mut tonic::Streaming<ConverseResponse>) -> Option<Result<ConverseResponse, tonic::Status>> {
    tokio::time::timeout(DEADLINE, stream.next())
        .await
        .unwrap_or_else(|_| panic!("no response within {DEADLINE:?}"))
}

/// The next response, which must be OK.
pub async fn answer(stream: &mut tonic::Streaming<ConverseResponse>) -> ConverseResponse {
    next(stream).await.expect("a response").expect("an OK response")
}

/// The status a stream ends with (answers before it are skipped).
pub async fn end_status(stream: &mut tonic::Streaming<ConverseResponse>) -> tonic::Status {
    loop {
        match next(stream).await {
            Some(Ok(_)) => continue,
            Some(Err(status)) => return status,
            None => panic!("the stream ended OK"),
        }
    }
}

/// Opens a Converse stream fed by the returned sender: requests sent on it
/// go out in order, and dropping it half-closes the stream.
pub async fn open(
    client: &mut EmbedderClient<Channel>,
) -> (
    tokio::sync::mpsc::Sender<ConverseRequest>,
    tonic::Streaming<ConverseResponse>,
) {
    // Room for every request a test pipelines before reading.
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let stream = tokio::time::timeout(
        DEADLINE,
        client.converse(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("the stream opens in time")
    .expect("the stream opens")
    .into_inner();
    (tx, stream)
}

/// Sends all requests at once on one stream (pipelined), half-closes, collects every response.
pub async fn converse_all(
    client: &mut EmbedderClient<Channel>,
    requests: Vec<ConverseRequest>,
) -> Vec<ConverseResponse> {
    let (tx, mut stream) = open(client).await;
    for r in requests {
        tx.send(r).await.expect("the stream takes requests");
    }
    drop(tx);
    let mut responses = Vec::new();
    while let Some(r) = next(&mut stream).await {
        responses.push(r.expect("the stream ends OK"));
    }
    responses
}

/// An open stream with one request answered: the sender (keep it to keep
/// the stream open), the response stream, and the first response.
pub async fn open_stream(
    client: &mut EmbedderClient<Channel>,
    first: ConverseRequest,
) -> (
    tokio::sync::mpsc::Sender<ConverseRequest>,
    tonic::Streaming<ConverseResponse>,
    ConverseResponse,
) {
    let (tx, mut stream) = open(client).await;
    tx.send(first).await.expect("the stream takes requests");
    let response = answer(&mut stream).await;
    (tx, stream, response)
}

/// One conversation on a stream, checked against the oracle at every turn
/// (the server's defaults, the tiny model) over the context it tracks
/// itself: the reference tokenizer's ids of every turn that succeeded.
pub struct Talker {
    pub tx: tokio::sync::mpsc::Sender<ConverseRequest>,
    pub rx: tonic::Streaming<ConverseResponse>,
    pub context: Context,
    /// The options the oracle applies.
    pub options: ConversationOptions,
}

impl Talker {
    pub async fn open(client: &mut EmbedderClient<Channel>) -> Talker {
        let (tx, rx) = open(client).await;
        Talker {
            tx,
            rx,
            context: Context::default(),
            options: stream_defaults(),
        }
    }

    /// Sends a request and reads its response.
    pub async fn send(&mut self, request: ConverseRequest) -> ConverseResponse {
        self.tx.send(request).await.expect("the stream takes requests");
        answer(&mut self.rx).await
    }

    /// A user turn that must succeed; its embedding must equal the oracle's
    /// over the whole context.
    pub async fn say(&mut self, what: &str, text: &str) -> pb::Embedding {
        let response = self.send(turn(what, text, "user")).await;
        let mut after = self.context.clone();
        let span = after.push(text, "user");
        let model = models::tiny();
        let want = oracle(&model, &after.ids, span, &self.options);
        let e = embedding(&response).clone();
        assert_close(what, &e.values, &want, F32);
        assert_eq!(e.context_tokens as usize, after.ids.len(), "{what}");
        self.context = after;
        e
    }

    /// A user turn that must fail in-band; the context stays as it was.
    pub async fn fails(&mut self, text: &str) -> pb::Error {
        let response = self.send(turn("fails", text, "user")).await;
        error(&response).clone()
    }
}
