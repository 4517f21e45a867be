//! The `stateful-embedder` binary: parse the config, install tracing, bind,
//! and hand over to [`stateful_embedder::server::run`].

use std::{io::Write, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use stateful_embedder::{
    client::ClientConfig,
    platform::onnxruntime,
    server::{self, Config, LogFormat},
};
use tracing_subscriber::EnvFilter;

/// A gRPC server that keeps one decoder KV cache per bidirectional stream and
/// answers every turn with an embedding.
#[derive(Debug, Parser)]
#[command(name = "stateful-embedder", version, about)]
struct Cli {
    /// What to do.
    #[command(subcommand)]
    command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the Embedder gRPC API (with health and reflection).
    Serve(Box<Config>),
    /// A Converse client: JSON-lines turns on stdin, one JSON line per response on stdout.
    Converse(ClientConfig),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Serve(config) => config.log_format,
        Command::Converse(_) => LogFormat::Text,
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().with_current_span(true).with_span_list(false).init(),
    }
    let result = match cli.command {
        Command::Serve(config) => serve(*config),
        Command::Converse(config) => converse(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> anyhow::Result<()> {
    // Find ONNX Runtime before anything else: its absence is a one-line error.
    onnxruntime::environment(config.onnxruntime.as_deref())?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("tokio")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .with_context(|| format!("binding {}", config.addr))?;
        let addr = listener.local_addr().context("reading the bound address")?;
        // Tests and scripts read this line to learn the port chosen for :0.
        println!("listening on {addr}");
        std::io::stdout().flush().ok();
        server::run(config, listener, shutdown_signal()).await
    })
}

fn converse(config: ClientConfig) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(stateful_embedder::client::run(config))
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the server");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
