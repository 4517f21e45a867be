//! TLS, mutual TLS and bearer tokens against the server binary (tiny model),
//! with certificates made at test time (rcgen) and the Rust tonic client.

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
use stateful_embedder::pb::{self, embedder_client::EmbedderClient};
use tokio::io::AsyncBufReadExt;
use tonic::{
    Code, Request,
    transport::{Certificate, Channel, ClientTlsConfig, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{common, memory::CutProxy};

const BIN: &str = env!("CARGO_BIN_EXE_stateful-embedder");

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

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("se-security-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The server binary with extra flags; its port, once it prints it.
struct Proc {
    child: tokio::process::Child,
    port: u16,
}

impl Proc {
    async fn start(extra: &[&std::ffi::OsStr]) -> Proc {
        let mut child = tokio::process::Command::new(BIN)
            .args(["serve", "--addr", "127.0.0.1:0", "--model"])
            .arg(common::tiny_dir())
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        tokio::time::timeout(Duration::from_secs(60), stdout.read_line(&mut line))
            .await
            .expect("the server prints its address")
            .unwrap();
        let port = line.trim().rsplit(':').next().unwrap().parse().unwrap();
        Proc { child, port }
    }

    fn signal(&self, name: &str) {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args([name, &pid])
                .status()
                .unwrap()
                .success()
        );
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

/// Waits (bounded) until health over `channel` says SERVING.
async fn serving(channel: &Channel) {
    let mut health = HealthClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = health.check(HealthCheckRequest { service: String::new() }).await
            && r.into_inner().status == 1
        {
            return;
        }
        assert!(Instant::now() < deadline, "never SERVING");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// TLS with bearer tokens: health answers without a token; a missing or
/// wrong token is UNAUTHENTICATED and runs no model call; the right one
/// works; a plaintext client cannot talk to the TLS port; SIGHUP reloads the
/// token file (the new token in, the old one out).
async fn tls_and_bearer_tokens() {
    let dir = scratch("tokens");
    let pki = pki(&dir);
    let token_file = dir.join("tokens");
    std::fs::write(&token_file, "# test tokens\ntoken-alpha\n").unwrap();
    let server = Proc::start(&[
        "--tls-cert".as_ref(),
        pki.server_cert.as_os_str(),
        "--tls-key".as_ref(),
        pki.server_key.as_os_str(),
        "--auth-token-file".as_ref(),
        token_file.as_os_str(),
    ])
    .await;
    let channel = tls_channel(server.port, &pki, false).await.expect("a TLS connection");
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
        assert_eq!(err.code(), Code::Unauthenticated);
    }
    let after = stats(&mut client, "token-alpha").await;
    assert_eq!(
        after.model_calls_total, before.model_calls_total,
        "rejected calls ran nothing"
    );
    let ok = client
        .embed(with_token(embed_request(), Some("token-alpha")))
        .await
        .unwrap();
    assert_eq!(ok.into_inner().embeddings.len(), 1);

    // Plaintext against the TLS port fails.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{}", server.port)).unwrap();
    if let Ok(channel) = plain.connect().await {
        let r = HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await;
        assert!(r.is_err(), "a plaintext health check must fail on a TLS port");
    }

    // SIGHUP reloads the file.
    std::fs::write(&token_file, "token-gamma\n").unwrap();
    server.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let gamma = client.embed(with_token(embed_request(), Some("token-gamma"))).await;
        if gamma.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the new token never took: {gamma:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old = client
        .embed(with_token(embed_request(), Some("token-alpha")))
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated);
    // A bad file on reload keeps the tokens in force.
    std::fs::write(&token_file, "# nothing\n").unwrap();
    server.signal("-HUP");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        client
            .embed(with_token(embed_request(), Some("token-gamma")))
            .await
            .is_ok()
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Mutual TLS: a client without a certificate signed by `--tls-client-ca`
/// cannot connect; one with it can.
async fn mutual_tls_rejects_a_client_without_a_certificate() {
    let dir = scratch("mtls");
    let pki = pki(&dir);
    let server = Proc::start(&[
        "--tls-cert".as_ref(),
        pki.server_cert.as_os_str(),
        "--tls-key".as_ref(),
        pki.server_key.as_os_str(),
        "--tls-client-ca".as_ref(),
        pki.ca_file.as_os_str(),
    ])
    .await;
    let good = tls_channel(server.port, &pki, true)
        .await
        .expect("a client with a certificate");
    serving(&good).await;
    let mut client = EmbedderClient::new(good);
    assert!(client.embed(embed_request()).await.is_ok());

    let refused = match tls_channel(server.port, &pki, false).await {
        Err(_) => true,
        Ok(channel) => HealthClient::new(channel)
            .check(HealthCheckRequest { service: String::new() })
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate must not get an answer");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// With tokens, a resumable session belongs to the token that created it:
/// another token's resume is NOT_FOUND, its own works.
async fn sessions_are_bound_to_their_token() {
    let dir = scratch("session-token");
    let token_file = dir.join("tokens");
    std::fs::write(&token_file, "token-a\ntoken-b\n").unwrap();
    let server = Proc::start(&["--auth-token-file".as_ref(), token_file.as_os_str()]).await;
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", server.port))
        .unwrap()
        .connect()
        .await
        .unwrap();
    serving(&channel).await;
    let mut client = EmbedderClient::new(channel);
    // The first stream goes through a proxy whose connection is then cut.
    let proxy = CutProxy::to_addr(&format!("127.0.0.1:{}", server.port)).await;
    let mut far = EmbedderClient::new(
        Channel::from_shared(proxy.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );

    let create = pb::ConverseRequest {
        tag: String::new(),
        action: Some(pb::converse_request::Action::Options(pb::SessionOptions {
            session_id: "owned-1".into(),
            session_mode: pb::SessionMode::Create as i32,
            ..Default::default()
        })),
    };
    // Created with token-a; the connection is then cut (no half-close).
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(create).await.unwrap();
    let mut responses = far
        .converse(with_token(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Some("token-a"),
        ))
        .await
        .unwrap()
        .into_inner();
    use tokio_stream::StreamExt;
    assert!(matches!(
        responses.next().await.unwrap().unwrap().result,
        Some(pb::converse_response::Result::Ready(_))
    ));
    proxy.cut();
    let _keep = (responses, tx);

    let resumer = client.clone();
    let resume = |token: &'static str| {
        let mut client = resumer.clone();
        async move {
            let request = pb::ConverseRequest {
                tag: String::new(),
                action: Some(pb::converse_request::Action::Options(pb::SessionOptions {
                    session_id: "owned-1".into(),
                    session_mode: pb::SessionMode::Resume as i32,
                    ..Default::default()
                })),
            };
            let mut r = client
                .converse(with_token(tokio_stream::iter(vec![request]), Some(token)))
                .await
                .unwrap()
                .into_inner();
            r.next().await.unwrap().unwrap().result
        }
    };
    // Wait for the first stream to be detached, then try both tokens.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = stats(&mut client, "token-a").await;
        if s.detached_sessions == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "never detached: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match resume("token-b").await {
        Some(pb::converse_response::Result::Error(e)) => assert_eq!(e.code, Code::NotFound as i32),
        other => panic!("another token's resume: {other:?}"),
    }
    match resume("token-a").await {
        Some(pb::converse_response::Result::Ready(r)) => assert_eq!(r.session_id, "owned-1"),
        other => panic!("its own token's resume: {other:?}"),
    }
    std::fs::remove_dir_all(dir).unwrap();
}
