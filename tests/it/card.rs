//! The model's card (`embedding.json`): an embedding-tuned model served with
//! its own pooling. The fixture is the tiny Qwen3 model with the card an
//! embedding model's GGUF gets from the model tool (pooling `end_token`,
//! `<|endoftext|>`, Matryoshka widths, an instruction for queries) and no
//! learned head. The expectations are written here: the end token's id is
//! the literal 151643 of Qwen's vocabulary, the vector is the last row of
//! one forward pass over the whole conversation and that id, L2-normalised.

use std::path::Path;

use stateful_embedder::{
    conversation::{Conversation, ConversationOptions, InputType, OptionsError, Pooling, Standardize},
    model::{Model, ModelError},
    pb,
};
use tonic::Code;

use crate::support::{
    models,
    oracle::{F32, assert_close, max_abs_diff, one_shot},
    server::Launch,
    stream::{self, Talker},
    tokens::{self, Context},
};

/// `<|endoftext|>` in Qwen's vocabulary.
const ENDOFTEXT: u32 = 151_643;
const QUERY: &str = "Instruct: Given a code search query, retrieve the code that answers it\nQuery:";

/// The tiny Qwen3 model's files with an embedding model's card (`card`
/// over the defaults below) and without a head, in a directory of its own.
fn embedding_model(card: serde_json::Value) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let from = models::tiny_qwen3_dir();
    for f in [
        "model.onnx",
        "model_fp16.onnx",
        "tokenizer.json",
        "config.json",
        "embedding_stats.safetensors",
    ] {
        std::os::unix::fs::symlink(from.join(f), dir.path().join(f)).expect("linked");
    }
    let base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(from.join("embedding.json")).unwrap()).unwrap();
    let mut file = serde_json::json!({
        "format": "1",
        "model": base["model"],
        "source": "written by tests/it/card.rs",
        "pooling": "end_token",
        "end_token": "<|endoftext|>",
        "normalize": true,
        "dimensions": [16, 32, 64],
        "input_types": {"query": format!("{QUERY}{{text}}"), "document": "{text}"},
        "probe": base["probe"],
    });
    for (k, v) in card.as_object().expect("an object") {
        file[k] = v.clone();
    }
    std::fs::write(dir.path().join("embedding.json"), file.to_string()).expect("written");
    dir
}

fn open(dir: &Path) -> Result<std::sync::Arc<Model>, ModelError> {
    Model::open(dir, &Default::default())
}

/// L2-normalised in f64, written here.
fn unit(v: &[f32]) -> Vec<f32> {
    let n = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    v.iter().map(|x| (f64::from(*x) / n) as f32).collect()
}

/// The model's own embedding of `ids`: the last row of one call over `ids`
/// and the end token, normalised.
fn own_embedding(model: &Model, ids: &[u32]) -> Vec<f32> {
    let mut all = ids.to_vec();
    all.push(ENDOFTEXT);
    let n = all.len();
    unit(&one_shot(model, &all, n - 1..n).remove(0))
}

#[test]
/// A conversation on an END_TOKEN card, with the card's defaults: after each
/// turn (slid, evicted and rebuilt, in chunks of 5, fp16 too) its vector is
/// the model's own embedding of the whole conversation so far; the end
/// token never joins the context. Negative control: the last text token's
/// state (no end token) is another vector.
fn an_end_token_card_gives_the_models_own_vector() {
    let dir = embedding_model(serde_json::json!({}));
    for (file, tol) in [("model.onnx", F32), ("model_fp16.onnx", crate::support::oracle::FP16)] {
        let model = open(&dir.path().join(file)).expect("the card loads without a head");
        assert!(model.embedding_head().is_none());
        let defaults = ConversationOptions::for_model(&model);
        assert_eq!(
            (defaults.pooling, defaults.standardize, defaults.normalize),
            (Pooling::EndToken, Standardize::None, true)
        );
        let o = ConversationOptions {
            prefill_chunk_tokens: 5,
            max_context_tokens: 48,
            ..defaults
        };
        let mut conv = Conversation::new(&model, o).unwrap();
        let mut context = Context::default();
        let mut slid = 0;
        let turns = [
            ("You are a careful reviewer of Rust code.", "system"),
            ("fn add(a: i32, b: i32) -> i32 { a + b }", "user"),
            ("It adds two numbers; consider checked_add.", "assistant"),
            ("Can you make it easier to test?", "user"),
            ("def parse(line): return line.split(',')", "user"),
            ("Now handle quoted fields too.", "user"),
        ];
        for (i, (text, role)) in turns.iter().enumerate() {
            if i == 3 {
                assert!(conv.evict_cache() > 0, "a cache to evict");
            }
            let out = conv.turn(text, role).unwrap();
            if out.dropped_tokens > 0 {
                slid += 1;
                // A slide kept the most recent tokens: the context restarts from them.
                let kept = context.ids.len() - out.dropped_tokens;
                context.ids = context.ids[context.ids.len() - kept..].to_vec();
            }
            context.push(text, role);
            assert_eq!(
                conv.tokens(),
                &context.ids[..],
                "{file} turn {i}: no end token in the context"
            );
            let want = own_embedding(&model, &context.ids);
            assert_close(&format!("{file} turn {i}"), &out.embedding, &want, tol);
            let n = context.ids.len();
            let last_text = unit(&one_shot(&model, &context.ids, n - 1..n).remove(0));
            assert!(
                max_abs_diff(&last_text, &want) > 1e-2,
                "{file} turn {i}: the end token must change the vector"
            );
        }
        assert!(slid > 0, "{file}: the window of 48 tokens must have slid");
    }
}

#[test]
/// The card's instruction is the query template; its widths bound nothing
/// the pooling does not (any width up to the hidden size), and are what
/// the card says; a base model's options that need a head are refused, and
/// PROBE_MEAN falls back to whitening.
fn an_embedding_card_sets_templates_and_refuses_the_head() {
    let dir = embedding_model(serde_json::json!({}));
    let model = open(dir.path()).unwrap();
    assert_eq!(model.card().dimensions, vec![16, 32, 64]);
    let o = ConversationOptions {
        input_type: InputType::Query,
        dimensions: Some(32),
        ..ConversationOptions::for_model(&model)
    };
    let mut conv = Conversation::new(&model, o).unwrap();
    let text = "parse a CSV line";
    let out = conv.turn(text, "").unwrap();
    let ids = [tokens::encode(QUERY), tokens::encode(text)].concat();
    assert_eq!(conv.tokens(), &ids[..]);
    let full = own_embedding(&model, &ids);
    assert_close("query at 32", &out.embedding, &unit(&full[..32]), F32);
    let head = ConversationOptions {
        pooling: Pooling::ProbeMean,
        standardize: Standardize::Head,
        ..ConversationOptions::for_model(&model)
    };
    assert_eq!(
        Conversation::new(&model, head).unwrap_err().to_string(),
        OptionsError::NoHead("end_token").to_string()
    );
    assert_eq!(
        Standardize::default_for(Pooling::ProbeMean, &model),
        Standardize::Whiten
    );
    let raw_zscore = ConversationOptions {
        standardize: Standardize::Zscore,
        ..ConversationOptions::for_model(&model)
    };
    assert!(matches!(
        Conversation::new(&model, raw_zscore),
        Err(e) if e.to_string() == OptionsError::EndTokenIsRaw.to_string()
    ));
    // Another pooling on an embedding model is the raw state only when it is
    // the card's own; MEAN here is z-scored as on any model.
    assert_eq!(Standardize::default_for(Pooling::Mean, &model), Standardize::Zscore);
}

#[test]
/// A card the server cannot honour stops the load, naming why.
fn a_card_the_model_cannot_honour_does_not_load() {
    let refuse = |card: serde_json::Value, says: &str| {
        let dir = embedding_model(card);
        let e = open(dir.path()).expect_err("refused").to_string();
        assert!(e.contains(says), "{e}");
    };
    refuse(
        serde_json::json!({"dimensions": [32, 128]}),
        "Matryoshka width 128 is over the 64",
    );
    refuse(serde_json::json!({"end_token": "<|no such token|>"}), "not one token");
    refuse(serde_json::json!({"end_token": null}), "needs the card's \"end_token\"");
    refuse(serde_json::json!({"pooling": "cls"}), "invalid card");
    refuse(serde_json::json!({"format": "2"}), "format");
    refuse(serde_json::json!({"model": "another"}), "not of this model");
    // A base model's card needs its head, which this directory lacks.
    refuse(
        serde_json::json!({"pooling": "probe_mean"}),
        "embedding_head.safetensors",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Over gRPC: GetModelInfo reports the card; a stream and Embed without
/// options get the model's own vectors; STANDARDIZE_HEAD is
/// INVALID_ARGUMENT naming the missing head.
async fn an_embedding_card_over_the_wire() {
    let dir = embedding_model(serde_json::json!({}));
    let server = Launch::new(&[]).model(dir.path()).in_process().await;
    let mut client = server.client().await;
    let info = client
        .get_model_info(pb::GetModelInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.pooling, pb::Pooling::EndToken as i32, "{info:?}");
    assert_eq!(info.end_token, "<|endoftext|>");
    assert_eq!(info.matryoshka_dimensions, vec![16, 32, 64]);
    assert_eq!(info.head_dimensions, 0);
    assert!(info.normalize);
    assert_eq!(info.card_source, "written by tests/it/card.rs");
    assert_eq!(info.input_types["query"], format!("{QUERY}{{text}}"));

    let model = open(dir.path()).unwrap();
    let mut talker = Talker::open(&mut client).await;
    let mut context = Context::default();
    for (i, text) in [
        "fn add(a: i32, b: i32) -> i32 { a + b }",
        "Can you make it easier to test?",
    ]
    .iter()
    .enumerate()
    {
        let response = talker.send(stream::turn(&format!("t{i}"), text, "user")).await;
        context.push(text, "user");
        let got = stream::embedding(&response);
        assert_close(
            &format!("turn {i}"),
            &got.values,
            &own_embedding(&model, &context.ids),
            F32,
        );
    }
    let text = "parse a CSV line";
    let embedded = client
        .embed(pb::EmbedRequest {
            texts: vec![text.into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_close(
        "Embed",
        &embedded.embeddings[0].values,
        &own_embedding(&model, &tokens::encode(text)),
        F32,
    );
    let refused = client
        .embed(pb::EmbedRequest {
            texts: vec![text.into()],
            pooling: pb::Pooling::ProbeMean as i32,
            standardize: pb::Standardize::Head as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert!(refused.message().contains("no learned head"), "{}", refused.message());
}
