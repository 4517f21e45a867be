//! `stateful-embedder converse`: a Rust (tonic) client for scripts and tests.
//!
//! Reads JSON lines from stdin — `{"text": "...", "role": "user", "tag": "t1"}`
//! for a turn, `{"reset": true}` for a reset — streams each as soon as it is
//! read (pipelined), and prints one JSON line per response as it arrives:
//! `{"index":0,"tag":"t1","values":[…],"turn_tokens":…,"context_tokens":…,
//! "dropped_tokens":…}`, `{"index":1,"reset":{"released_tokens":…}}` or
//! `{"index":2,"error":{"code":3,"message":"…"}}`. The stream stays open
//! until stdin closes.

use std::io::Write;

use anyhow::Context;
use clap::Args;
use serde::Deserialize;
use tokio::io::AsyncBufReadExt;
use tokio_stream::StreamExt;

use crate::pb::{self, converse_request::Action, converse_response::Result as Reply, embedder_client::EmbedderClient};

/// Settings of the `converse` client.
#[derive(Debug, Clone, Args)]
pub struct ClientConfig {
    /// Server address, e.g. http://127.0.0.1:50051.
    #[arg(long, env = "SE_CLIENT_ADDR", default_value = "http://127.0.0.1:50051")]
    pub addr: String,
    /// Pooling: probe-mean (the server's default), probe, mean or last-token;
    /// each with its default standardisation.
    #[arg(long, default_value = "probe-mean")]
    pub pooling: String,
    /// Truncate embeddings to this many dimensions (0: full).
    #[arg(long, default_value_t = 0)]
    pub dimensions: u32,
}

#[derive(Debug, Deserialize)]
struct Line {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    role: String,
    #[serde(default)]
    tag: String,
    #[serde(default)]
    reset: bool,
}

/// Runs the client until stdin closes and every response is printed.
///
/// # Errors
/// When the server cannot be reached, a line is not JSON, or the stream fails.
pub async fn run(config: ClientConfig) -> anyhow::Result<()> {
    let mut client = EmbedderClient::connect(config.addr.clone())
        .await
        .with_context(|| format!("connecting to {}", config.addr))?;
    let pooling = match config.pooling.as_str() {
        "probe-mean" | "probe_mean" => pb::Pooling::ProbeMean,
        "probe" => pb::Pooling::Probe,
        "mean" => pb::Pooling::Mean,
        "last-token" | "last_token" => pb::Pooling::LastToken,
        other => anyhow::bail!("unknown pooling {other:?}: use probe-mean, probe, mean or last-token"),
    };
    let (requests_tx, requests_rx) = tokio::sync::mpsc::channel(64);
    requests_tx
        .send(pb::ConverseRequest {
            tag: "options".into(),
            action: Some(Action::Options(pb::SessionOptions {
                pooling: pooling as i32,
                dimensions: config.dimensions,
                ..Default::default()
            })),
        })
        .await
        .context("queueing the options")?;
    let reader = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
        while let Some(line) = lines.next_line().await.context("reading stdin")? {
            if line.trim().is_empty() {
                continue;
            }
            let l: Line = serde_json::from_str(&line).with_context(|| format!("not a JSON request line: {line}"))?;
            let action = if l.reset {
                Action::Reset(pb::Reset {})
            } else {
                Action::Turn(pb::Turn {
                    text: l.text.unwrap_or_default(),
                    role: l.role,
                })
            };
            let request = pb::ConverseRequest {
                tag: l.tag,
                action: Some(action),
            };
            if requests_tx.send(request).await.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    });
    let mut responses = client
        .converse(tokio_stream::wrappers::ReceiverStream::new(requests_rx))
        .await
        .context("opening the Converse stream")?
        .into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(response) = responses.next().await {
        let r = response.context("the Converse stream failed")?;
        let mut json = serde_json::json!({ "index": r.index, "tag": r.tag });
        match r.result {
            Some(Reply::Ready(_)) => continue,
            Some(Reply::Embedding(e)) => {
                json["values"] = serde_json::json!(e.values);
                json["turn_tokens"] = e.turn_tokens.into();
                json["context_tokens"] = e.context_tokens.into();
                json["dropped_tokens"] = e.dropped_tokens.into();
            }
            Some(Reply::Reset(r)) => json["reset"] = serde_json::json!({ "released_tokens": r.released_tokens }),
            Some(Reply::Error(e)) => json["error"] = serde_json::json!({ "code": e.code, "message": e.message }),
            None => json["error"] = serde_json::json!({ "code": 13, "message": "empty response" }),
        }
        writeln!(out, "{json}").context("writing stdout")?;
        out.flush().context("writing stdout")?;
    }
    reader.await.context("the stdin reader panicked")??;
    Ok(())
}
