//! The gRPC service against a real server on an ephemeral port (tiny model),
//! run in-process through `server::run` (a child process where a test
//! signals it or holds a model call), with tonic clients and the Rust
//! `converse` client process.

use std::process::Stdio;

use stateful_embedder::{
    conversation::{Conversation, ConversationOptions, Pooling, Standardize},
    pb::{
        self, ConverseRequest, ConverseResponse, converse_response::Result as Reply, embedder_client::EmbedderClient,
    },
};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::support::{
    DEADLINE, models,
    oracle::{F32, assert_close, close, cosine, oracle, stream_defaults},
    server::{BIN, Gate, Launch, TestServer},
    stream::{answer, converse_all, embedding, end_status, error, next, open, open_stream, options, reset, turn},
    tokens::{self, Context},
};

const TURNS: [(&str, &str); 3] = [
    ("You are a terse coding assistant.", "system"),
    ("def add(a, b):\n    return a + b", "user"),
    ("Rust: fn add(a: i32, b: i32) -> i32 { a + b }", "assistant"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// The engine's oracle holds over the wire: each streamed turn equals the
/// one-shot embedding under the documented defaults (PROBE_MEAN through the
/// head, its mean over the whole conversation), which is not the turn
/// mean's vector after the first turn.
async fn oracle_holds_over_the_wire() {
    use stateful_embedder::conversation::MeanOver;
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let requests = TURNS
        .iter()
        .enumerate()
        .map(|(i, (t, r))| turn(&format!("t{i}"), t, r))
        .collect();
    let responses = converse_all(&mut client, requests).await;
    let model = models::tiny();
    // The expected tokens: the reference tokenizer, and literal ids for the
    // first two turns (Qwen's vocabulary) so that the reference is checked too.
    let mut context = Context::default();
    for (i, ((text, role), r)) in TURNS.iter().zip(&responses).enumerate() {
        let before = context.ids.len();
        let span = context.push(text, role);
        let documented = stream_defaults();
        let want = oracle(&model, &context.ids, span.clone(), &documented);
        let e = embedding(r);
        assert_close(&format!("turn {i}"), &e.values, &want, F32);
        let turn_mean = ConversationOptions {
            mean_over: MeanOver::Turn,
            ..documented
        };
        let other = oracle(&model, &context.ids, span, &turn_mean);
        if i > 0 {
            assert!(
                !close(&e.values, &other, F32),
                "turn {i}: the default pooled the turn's mean"
            );
        }
        assert_eq!(e.context_tokens as usize, context.ids.len());
        assert_eq!(e.turn_tokens as usize, context.ids.len() - before);
    }
    assert_eq!(&context.ids[..TURNS_LITERAL.len()], TURNS_LITERAL);
}

/// The first two of [`TURNS`] in ChatML, as Qwen2's tokenizer gives them.
const TURNS_LITERAL: &[u32] = &[
    151_644, 8948, 198, 2610, 525, 264, 50537, 10822, 17847, 13, 151_645, 198, // system
    151_644, 872, 198, 750, 912, 2877, 11, 293, 982, 262, 470, 264, 488, 293, 151_645, 198, // user
];

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
    let model = models::tiny();
    let mut context = Context::default();
    context.push(TURNS[1].0, "user");
    let span = context.push(TURNS[2].0, "assistant");
    let want = oracle(&model, &context.ids, span, &stream_defaults());
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
    assert_eq!(embedding(&responses[1]).values.len(), models::tiny_dims());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// MEAN_OVER_CONVERSATION over the wire: each turn's vector is the mean over
/// the whole context's plain tokens (the oracle, one shot), not the turn's;
/// `turn_mean` stays the turn's; with a pooling that takes no mean, or an
/// unknown value, it is an in-band INVALID_ARGUMENT.
async fn mean_over_the_conversation_over_the_wire() {
    use stateful_embedder::conversation::MeanOver;
    let server = TestServer::start(&[]).await;
    let mut client = server.client().await;
    let model = models::tiny();
    let mut requests = vec![options(pb::SessionOptions {
        pooling: pb::Pooling::Mean as i32,
        mean_over: pb::MeanOver::Conversation as i32,
        include_turn_mean: true,
        ..Default::default()
    })];
    requests.extend(TURNS.iter().enumerate().map(|(i, (t, r))| turn(&format!("t{i}"), t, r)));
    let responses = converse_all(&mut client, requests).await;
    assert!(matches!(responses[0].result, Some(Reply::Ready(_))), "{responses:#?}");
    let over = |mean_over| ConversationOptions {
        pooling: Pooling::Mean,
        standardize: Standardize::Zscore,
        mean_over,
        ..ConversationOptions::default()
    };
    let mut context = Context::default();
    for (i, ((text, role), r)) in TURNS.iter().zip(&responses[1..]).enumerate() {
        let span = context.push(text, role);
        let e = embedding(r);
        let want = oracle(&model, &context.ids, span.clone(), &over(MeanOver::Conversation));
        assert_close(&format!("turn {i}"), &e.values, &want, F32);
        let turn_mean = oracle(&model, &context.ids, span, &over(MeanOver::Turn));
        assert_close(&format!("turn {i}'s turn_mean"), &e.turn_mean, &turn_mean, F32);
        if i > 0 {
            assert!(cosine(&want, &turn_mean) < 0.999, "turn {i}: the two means differ");
        }
    }
    let ia = Code::InvalidArgument as i32;
    for (pooling, mean_over) in [(pb::Pooling::LastToken, 2), (pb::Pooling::Mean, 7)] {
        let responses = converse_all(
            &mut client,
            vec![options(pb::SessionOptions {
                pooling: pooling as i32,
                mean_over,
                ..Default::default()
            })],
        )
        .await;
        let e = error(&responses[0]);
        assert_eq!(e.code, ia, "{pooling:?} {mean_over}: {e:?}");
        assert!(e.message.contains("mean_over"), "{}", e.message);
    }
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
    let model = models::tiny();
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(models::tiny_dir().join("embedding.json")).unwrap()).unwrap();
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
    // The card: a base model's (PROBE_MEAN through its head), with an end token.
    assert_eq!(info.pooling, pb::Pooling::ProbeMean as i32, "{info:?}");
    assert_eq!(info.end_token, file["end_token"].as_str().unwrap());
    assert!(info.normalize && info.matryoshka_dimensions.is_empty(), "{info:?}");
    assert!(info.card_source.contains("base.json"), "{info:?}");

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
            pb::Pooling::EndToken,
            pb::Standardize::Unspecified,
            pb::InputType::Query,
        ),
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
            pb::Pooling::EndToken => Pooling::EndToken,
        };
        let o = ConversationOptions {
            pooling: pooling_,
            standardize: match standardize {
                pb::Standardize::None => Standardize::None,
                pb::Standardize::Head => Standardize::Head,
                pb::Standardize::Zscore => Standardize::Zscore,
                pb::Standardize::Whiten => Standardize::Whiten,
                pb::Standardize::Unspecified => Standardize::default_for(pooling_, &model),
            },
            input_type: match input_type {
                pb::InputType::Query => InputType::Query,
                pb::InputType::Document => InputType::Document,
                pb::InputType::Unspecified => InputType::Raw,
            },
            // Embed's mean is its text's (MEAN_OVER_TURN: the query
            // template's tokens left out), whatever a stream's default.
            mean_over: stateful_embedder::conversation::MeanOver::Turn,
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
        let text_ids = tokens::encode(text);
        let prefix = info.input_types["query"].split("{text}").next().unwrap().to_string();
        let expected_ids = match input_type {
            pb::InputType::Query => [tokens::encode(&prefix), text_ids.clone()].concat(),
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
        crate::support::oracle::cosine(&both[0], &both[1]) < 0.999,
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
            model.embedding_head().expect("a base model has its head").dimensions,
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
/// After a normal close, a cancellation and a killed client process, no
/// stream is open and no KV tensor exists (the census, not only the ledger),
/// while an open stream's cache is exactly its context's.
async fn caches_are_freed_when_streams_end() {
    let server = TestServer::start(&[]).await;
    let per_token = models::tiny().spec().kv_bytes_per_token();
    let zero = |s: &pb::Stats| s.open_streams == 0 && s.kv_cache_bytes == 0;
    let nothing_left = |what: &str, census: crate::support::server::Census| {
        assert_eq!(census.bytes, 0, "{what}: KV tensors left: {census:?}");
        assert_eq!(census.stats.kv_cache_bytes, 0, "{what}: {census:?}");
    };

    // Normal close.
    let mut client = server.client().await;
    let responses = converse_all(&mut client, vec![turn("a", TURNS[1].0, "user")]).await;
    assert_eq!(responses.len(), 1);
    let stats = server.wait_stats("after a normal close", zero).await;
    assert_eq!(stats.turns_total, 1);
    nothing_left("after a normal close", server.census().await);

    // Cancellation: the client drops the stream while it is open and holds a cache.
    let (tx, stream, first) = open_stream(&mut client, turn("a", TURNS[1].0, "user")).await;
    let context = u64::from(embedding(&first).context_tokens);
    assert!(context > 0);
    let open = server.census().await;
    assert_eq!(open.stats.open_streams, 1);
    assert_eq!(
        open.bytes,
        context * per_token,
        "the open stream's tensors hold its context: {open:?}"
    );
    assert_eq!(
        open.stats.kv_cache_bytes, open.bytes,
        "the ledger agrees with the census"
    );
    drop(stream);
    drop(tx);
    server.wait_stats("after cancellation", zero).await;
    nothing_left("after cancellation", server.census().await);

    // A client process killed mid-stream.
    let mut child = tokio::process::Command::new(BIN)
        .args(["converse", "--addr", &server.addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"{\"text\": \"def add(a, b): return a + b\", \"role\": \"user\"}\n")
        .await
        .unwrap();
    stdin.flush().await.unwrap();
    let mut line = String::new();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    tokio::time::timeout(DEADLINE, stdout.read_line(&mut line))
        .await
        .expect("the client prints its answer in time")
        .unwrap();
    assert!(line.contains("\"values\""), "the client got its embedding: {line}");
    let open = server.wait_stats("client process open", |s| s.open_streams == 1).await;
    assert!(open.kv_cache_bytes > 0);
    child.kill().await.unwrap(); // SIGKILL: no goodbye on the wire
    server.wait_stats("after the client process was killed", zero).await;
    nothing_left("after the client process was killed", server.census().await);
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
    let status = match next(&mut stream).await {
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
    assert_eq!(embedding(&ok[0]).values.len(), models::tiny_dims());
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
    assert!(embedding(&answer(s).await).context_tokens > 1);

    // Closing one frees a slot.
    open.pop();
    server.wait_stats("one slot free", |s| s.open_streams == 1).await;
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
    let model = models::tiny();
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
    let probe = crate::support::profile::of(&models::tiny_dir()).probe_ids.len();
    let row = tokens::encode(&many[0]).len() + probe;
    assert!(many.iter().all(|t| tokens::encode(t).len() + probe == row));
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
/// SIGTERM (to the server binary): health goes NOT_SERVING, and from the
/// moment a client sees that, new streams are refused (the server refuses
/// first, then says so: the order a race once lost); an open stream goes on
/// until the drain deadline (8 s, two orders of magnitude above the few
/// turns it must answer meanwhile), then ends with UNAVAILABLE, and the
/// process exits 0.
async fn shutdown_drains_then_ends_streams() {
    let mut server = TestServer::process(&["--drain-seconds", "8"]).await;
    let mut client = server.client().await;
    let (tx, mut stream, _) = open_stream(&mut client, turn("a", "hello", "")).await;

    server.signal("-TERM");
    server.wait_health(ServingStatus::NotServing).await;
    let refused = client
        .converse(tokio_stream::iter(vec![turn("late", "hi", "")]))
        .await
        .expect_err("a stream opened after NOT_SERVING is refused");
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("shutting down"), "{refused:?}");

    // The open stream still works during the drain…
    tx.send(turn("b", "during drain", "")).await.unwrap();
    assert_eq!(answer(&mut stream).await.index, 1);
    // …and ends with UNAVAILABLE once the deadline passes.
    let status = end_status(&mut stream).await;
    assert_eq!(status.code(), Code::Unavailable);
    assert_eq!(status.message(), "server shutting down");
    let exit = server.wait_exit().await;
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
    assert_eq!(answer(&mut stream).await.index, 1);
    drop(tx); // half-close: the stream ends OK, and with it the drain
    assert!(next(&mut stream).await.is_none(), "the stream ends cleanly");
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
    let response = tokio::time::timeout(DEADLINE, tokio_stream::StreamExt::next(&mut responses))
        .await
        .expect("reflection answers in time")
        .unwrap()
        .unwrap();
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
        let (tx, stream) = open(client).await;
        tx.send(turn(&format!("s{i}"), text, "user")).await.unwrap();
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
    let model = models::tiny();
    let mut context = 0;
    for ((_, stream), text) in streams.iter_mut().zip(texts) {
        let r = answer(stream).await;
        let (ids, span) = tokens::turn(text, "user");
        let want = oracle(&model, &ids, span, &stream_defaults());
        assert_close(&format!("stream {}", r.tag), &embedding(&r).values, &want, F32);
        assert_eq!(embedding(&r).context_tokens as usize, ids.len());
        context += u64::from(embedding(&r).context_tokens);
    }
    context
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Turns of streams that queue up behind a running call share one model
/// call, and each still meets the oracle. The running call is held (the
/// `hold` fault) until all eight turns are queued, so the batch does not
/// depend on how fast the machine is.
async fn queued_turns_of_many_streams_share_a_call() {
    // 1 the warm-up, 2 "hello" (held), 3 the eight turns together.
    let gate = Gate::new();
    let server = Launch::new(&[]).faults("hold:2", &gate).log("warn").process().await;
    let mut client = server.client().await;
    let (hello_tx, mut hello_rx) = open(&mut client).await;
    hello_tx.send(turn("hello", "hello", "")).await.unwrap();
    server
        .wait_stats("the held call started", |s| s.model_calls_total == 2)
        .await;
    let (mut streams, texts) = send_short_turns(&mut client, 8).await;
    let queued = server
        .wait_stats("eight turns queued behind the held one", |s| s.queued_turns == 9)
        .await;
    assert_eq!(queued.model_calls_total, 2, "{queued:?}");
    gate.open(2);

    embedding(&answer(&mut hello_rx).await);
    check_short_turns(&mut streams, &texts).await;
    let after = server.wait_stats("all answered", |s| s.queued_turns == 0).await;
    assert_eq!(after.model_calls_total, 3, "the eight turns in one call: {after:?}");
    assert_eq!(after.turns_total, 9);
    let census = server.census().await;
    assert_eq!(census.bytes, census.stats.kv_cache_bytes, "{census:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// A long prefill does not hold up other streams: a turn that needs many
/// calls (2,000 tokens in 16-token chunks) runs one chunk per round, and
/// turns sent meanwhile are answered, exact, between its chunks. When its
/// stream goes away part-way, the rest of its prefill is dropped and its
/// part-built cache freed (the census, not only the ledger). Two of its
/// chunk calls are held so that what runs between them does not depend on
/// the machine's speed.
async fn short_turns_are_answered_while_a_long_turn_prefills() {
    // 1 the warm-up, 2 "hello", 3 the long turn's first chunk, 4 its second
    // (held until eight short turns are queued), 5 the eight together,
    // 6 its third chunk (held until its stream has gone).
    let gate = Gate::new();
    let server = Launch::new(&["--prefill-chunk-tokens", "16"])
        .faults("hold:4,hold:6", &gate)
        .log("warn")
        .process()
        .await;
    let mut client = server.client().await;
    let per_token = models::tiny().spec().kv_bytes_per_token();

    let long_text = "alpha beta gamma delta ".repeat(500);
    let (long_ids, _) = tokens::turn(&long_text, "");
    assert!(long_ids.len().div_ceil(16) > 10, "many chunks");
    let (long_tx, long_rx, _) = open_stream(&mut client, turn("warm", "hello", "")).await;
    long_tx.send(turn("long", &long_text, "")).await.unwrap();
    server
        .wait_stats("the long turn's second chunk held", |s| s.model_calls_total == 4)
        .await;

    let (mut streams, texts) = send_short_turns(&mut client, 8).await;
    server
        .wait_stats("eight turns queued beside the long one", |s| s.queued_turns == 9)
        .await;
    gate.open(4);
    let context = check_short_turns(&mut streams, &texts).await;
    let during = server
        .wait_stats("the long turn's third chunk held", |s| s.model_calls_total == 6)
        .await;
    assert_eq!(during.queued_turns, 1, "only the long turn is left: {during:?}");
    assert_eq!(during.turns_total, 1 + 8);

    // The long turn's stream goes away part-way through its prefill.
    drop((long_tx, long_rx));
    server.wait_stats("the long stream gone", |s| s.open_streams == 8).await;
    gate.open(6);
    let after = server
        .wait_stats("the long turn dropped", |s| s.queued_turns == 0)
        .await;
    assert_eq!(
        after.model_calls_total, 6,
        "no chunk ran after the held one: the rest of the prefill was dropped"
    );
    assert_eq!(after.turns_total, 1 + 8);
    // Only the eight streams' caches are left: the long turn's part-built
    // cache and its conversation went with it.
    let census = server.census().await;
    assert_eq!(census.bytes, context * per_token, "{census:?}");
    assert_eq!(census.stats.kv_cache_bytes, census.bytes, "{census:?}");

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
    let model = models::tiny();
    let mean = ConversationOptions {
        pooling: Pooling::Mean,
        standardize: Standardize::Zscore,
        ..ConversationOptions::default()
    };
    let mut want_calls = 0;
    for (text, e) in texts.iter().zip(&got.embeddings) {
        let (ids, span) = tokens::turn(text, "");
        want_calls += ids.len().div_ceil(16) as u64;
        let want = oracle(&model, &ids, span, &mean);
        assert_close(&format!("{} tokens", ids.len()), &e.values, &want, F32);
    }
    assert!(want_calls > 2, "one text needs several calls");
    let last = server.census().await;
    assert_eq!(last.stats.model_calls_total - after.model_calls_total, want_calls);
    assert_eq!(last.bytes, census.bytes, "an Embed keeps no cache");
}
