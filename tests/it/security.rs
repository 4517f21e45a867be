//! TLS, mutual TLS and bearer tokens against the server binary (tiny model),
//! with certificates made at test time (rcgen) and the Rust tonic client.

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use stateful_embedder::pb::{self, embedder_client::EmbedderClient};
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use crate::support::{
    DEADLINE,
    proxy::Proxy,
    server::{Launch, TestServer, wait_health},
    stream::{create, options, resume, turn},
};

/// A CA, a server certificate for localhost and a client certificate, as PEM files in `dir`.
struct Pki {
    ca: String,
    client_cert: String,
    client_key: String,
    server_cert: PathBuf,
    server_key: PathBuf,
    ca_file: PathBuf,
}

fn pki(dir: &Path) -> Pki {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let issue = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names).unwrap().signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = issue(vec!["a-client".into()]);
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    Pki {
        ca: ca.pem(),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        ca_file: write("ca.pem", &ca.pem()),
        client_cert,
        client_key,
    }
}

async fn tls_channel(port: u16, pki: &Pki, with_identity: bool) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca))
        .domain_name("localhost");
    if with_identity {
        tls = tls.identity(Identity::from_pem(&pki.client_cert, &pki.client_key));
    }
    Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// Waits on the health Watch over `channel` (bounded) until SERVING.
async fn serving(channel: &Channel) {
    wait_health(channel.clone(), ServingStatus::Serving).await;
}

fn with_token<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    request
}

async fn stats(client: &mut EmbedderClient<Channel>, token: &str) -> pb::Stats {
    client
        .get_stats(with_token(pb::GetStatsRequest {}, Some(token)))
        .await
        .unwrap()
        .into_inner()
}

fn embed_request() -> pb::EmbedRequest {
    pb::EmbedRequest {
        texts: vec!["def add(a, b): return a + b".into()],
        ..Default::default()
    }
}

/// The flags of a TLS server (and of a token file when given).
fn tls_flags(pki: &Pki, tokens: Option<&Path>) -> Vec<String> {
    let mut flags = vec![
        "--tls-cert".to_string(),
        pki.server_cert.display().to_string(),
        "--tls-key".to_string(),
        pki.server_key.display().to_string(),
    ];
    if let Some(t) = tokens {
        flags.extend(["--auth-token-file".to_string(), t.display().to_string()]);
    }
    flags
}

async fn start(flags: &[String]) -> TestServer {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    Launch::new(&flags).spawn().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// TLS with bearer tokens: health answers without a token; a missing or
/// wrong token is UNAUTHENTICATED on every Embedder call (Embed,
/// GetModelInfo, GetStats, Converse) and runs no model call; the right one
/// works; a plaintext client cannot talk to the TLS port; SIGHUP reloads the
/// token file (the new token in, the old one out), and a reload of a bad
/// file keeps the tokens in force.
async fn tls_and_bearer_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, "# test tokens\ntoken-alpha\n").unwrap();
    let server = start(&tls_flags(&pki, Some(&token_file))).await;
    let channel = tls_channel(server.port(), &pki, false).await.expect("a TLS connection");
    serving(&channel).await;
    let mut client = EmbedderClient::new(channel);

    let before = stats(&mut client, "token-alpha").await;
    for token in [None, Some("token-beta"), Some("token-alph"), Some("")] {
        let err = client.embed(with_token(embed_request(), token)).await.unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        let err = client
            .get_model_info(with_token(pb::GetModelInfoRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        let err = client
            .get_stats(with_token(pb::GetStatsRequest {}, token))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
        let err = client
            .converse(with_token(tokio_stream::iter(vec![turn("t", "hi", "")]), token))
            .await
            .expect_err("a stream without an accepted token is refused");
        assert_eq!(err.code(), Code::Unauthenticated, "{token:?}: {err:?}");
    }
    let after = stats(&mut client, "token-alpha").await;
    assert_eq!(
        (after.model_calls_total, after.turns_total),
        (before.model_calls_total, before.turns_total),
        "rejected calls ran nothing"
    );
    let ok = client
        .embed(with_token(embed_request(), Some("token-alpha")))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().embeddings.len(), 1);
    let mut stream = client
        .converse(with_token(
            tokio_stream::iter(vec![turn("t", "hi", "")]),
            Some("token-alpha"),
        ))
        .await
        .expect("a stream with the token opens")
        .into_inner();
    crate::support::stream::embedding(&crate::support::stream::answer(&mut stream).await);

    // Plaintext against the TLS port fails.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", server.port())).unwrap();
    if let Ok(channel) = plain.connect().await {
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await;
        assert!(r.is_err(), "a plaintext health check must fail on a TLS port");
    }

    // SIGHUP reloads the file.
    std::fs::write(&token_file, "token-gamma\n").unwrap();
    server.signal("-HUP");
    server
        .wait_log("token file reloaded", |l| l.contains("token file reloaded"))
        .await;
    client
        .embed(with_token(embed_request(), Some("token-gamma")))
        .await
        .expect("the new token works after the reload");
    let old = client
        .embed(with_token(embed_request(), Some("token-alpha")))
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated);
    // A bad file on reload keeps the tokens in force.
    std::fs::write(&token_file, "# nothing\n").unwrap();
    server.signal("-HUP");
    server
        .wait_log("token file not reloaded", |l| l.contains("token file not reloaded"))
        .await;
    client
        .embed(with_token(embed_request(), Some("token-gamma")))
        .await
        .expect("the tokens in force stay after a bad reload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Mutual TLS: a client without a certificate signed by `--tls-client-ca`
/// cannot connect; one with it can.
async fn mutual_tls_rejects_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let mut flags = tls_flags(&pki, None);
    flags.extend(["--tls-client-ca".to_string(), pki.ca_file.display().to_string()]);
    let server = start(&flags).await;
    let good = tls_channel(server.port(), &pki, true)
        .await
        .expect("a client with a certificate");
    serving(&good).await;
    let mut client = EmbedderClient::new(good);
    assert!(client.embed(embed_request()).await.is_ok());

    let refused = match tls_channel(server.port(), &pki, false).await {
        Err(_) => true,
        Ok(channel) => HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate must not get an answer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// With tokens, a resumable session belongs to the token that created it:
/// another token's resume is NOT_FOUND, its own works.
async fn sessions_are_bound_to_their_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("tokens");
    std::fs::write(&token_file, "token-a\ntoken-b\n").unwrap();
    let server = Launch::new(&["--auth-token-file", token_file.to_str().unwrap()])
        .spawn()
        .await;
    let channel = server.channel().await;
    serving(&channel).await;
    let mut client = EmbedderClient::new(channel);
    // The first stream goes through a proxy whose connections are then cut.
    let proxy = Proxy::to(&server.addr).await;
    let mut far = proxy.client().await;

    // Created with token-a; the connection is then cut (no half-close).
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(options(create("owned-1"))).await.unwrap();
    let mut responses = far
        .converse(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some("token-a"),
        ))
        .await
        .unwrap()
        .into_inner();
    crate::support::stream::ready(&crate::support::stream::answer(&mut responses).await);
    proxy.cut();
    let _keep = (responses, tx);

    let resumer = client.clone();
    let resume_with = |token: &'static str| {
        let mut client = resumer.clone();
        async move {
            let mut r = client
                .converse(with_token(
                    tokio_stream::iter(vec![options(resume("owned-1"))]),
                    Some(token),
                ))
                .await
                .unwrap()
                .into_inner();
            crate::support::stream::answer(&mut r).await.result
        }
    };
    // Wait for the first stream to be detached, then try both tokens.
    let deadline = Instant::now() + DEADLINE;
    loop {
        let s = stats(&mut client, "token-a").await;
        if s.detached_sessions == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never detached: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match resume_with("token-b").await {
        Some(pb::converse_response::Result::Error(e)) => assert_eq!(e.code, Code::NotFound as i32),
        other => panic!("another token's resume: {other:?}"),
    }
    match resume_with("token-a").await {
        Some(pb::converse_response::Result::Ready(r)) => assert_eq!(r.session_id, "owned-1"),
        other => panic!("its own token's resume: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Tokens are never logged, whatever the log level: a server logging
/// everything at debug (every crate) sees calls with the right token, a
/// wrong one and a session created with one, and no line holds either.
async fn tokens_are_never_logged() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("tokens");
    let (right, wrong) = ("secret-right-7f3a9c", "secret-wrong-b81e44");
    std::fs::write(&token_file, format!("{right}\n")).unwrap();
    let server = Launch::new(&["--auth-token-file", token_file.to_str().unwrap()])
        .log("debug")
        .spawn()
        .await;
    let channel = server.channel().await;
    serving(&channel).await;
    let mut client = EmbedderClient::new(channel);
    client.embed(with_token(embed_request(), Some(right))).await.unwrap();
    let err = client
        .embed(with_token(embed_request(), Some(wrong)))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let mut stream = client
        .converse(with_token(
            tokio_stream::iter(vec![options(create("logged-1")), turn("t", "hello", "user")]),
            Some(right),
        ))
        .await
        .unwrap()
        .into_inner();
    while crate::support::stream::next(&mut stream).await.is_some() {}
    // The server logs the stream's end at info, after its last response.
    server
        .wait_log("the stream's close", |l| l.contains("stream closed"))
        .await;
    let logs = server.logs();
    assert!(logs.len() > 20, "the server logged at debug: {} lines", logs.len());
    for line in &logs {
        assert!(!line.contains("secret-"), "a token (or part of one) was logged: {line}");
    }
}
