//! The server under test, on 127.0.0.1:0 with the tiny model: in this
//! process (`server::run` with a shutdown future, as a library user would run
//! it) or as a child process (for tests that signal it, read its logs, or
//! need a fault plan of its own). Stopped on drop.

use std::{
    path::PathBuf,
    process::Stdio,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use stateful_embedder::{
    pb::{self, embedder_client::EmbedderClient},
    server::{self, Config},
    service::CENSUS_METADATA,
};
use tokio::{io::AsyncBufReadExt, sync::oneshot};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

use super::{DEADLINE, models};

/// The server binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_stateful-embedder");

/// How to start a server: flags, environment, logging.
#[derive(Debug, Clone)]
pub struct Launch {
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: String,
}

impl Launch {
    /// `serve --addr 127.0.0.1:0 --model models/tiny` and `flags`.
    pub fn new(flags: &[&str]) -> Launch {
        let mut args: Vec<String> = ["--addr", "127.0.0.1:0", "--model"].map(String::from).to_vec();
        args.push(models::tiny_dir().to_str().expect("a UTF-8 path").to_string());
        args.extend(flags.iter().map(|f| f.to_string()));
        Launch {
            args,
            env: Vec::new(),
            log: "info".into(),
        }
    }

    /// Serves the model in `dir` instead of models/tiny.
    pub fn model(mut self, dir: &std::path::Path) -> Launch {
        self.args[3] = dir.to_str().expect("a UTF-8 path").to_string();
        self
    }

    /// An environment variable for a process server.
    pub fn env(mut self, key: &str, value: impl Into<String>) -> Launch {
        self.env.push((key.into(), value.into()));
        self
    }

    /// `RUST_LOG` for a process server.
    pub fn log(mut self, level: &str) -> Launch {
        self.log = level.into();
        self
    }

    /// Runs the server in this process; returns once health is SERVING.
    pub async fn in_process(self) -> TestServer {
        assert!(
            self.env.is_empty(),
            "an in-process server shares the test's environment"
        );
        let config = Config::from_serve_args(&self.args).expect("valid test flags");
        let listener = tokio::net::TcpListener::bind(config.addr)
            .await
            .expect("binds 127.0.0.1:0");
        let addr = listener.local_addr().expect("a bound address");
        let (shutdown, shutdown_rx) = oneshot::channel();
        let task = tokio::spawn(server::run(config, listener, async {
            let _ = shutdown_rx.await;
        }));
        let server = TestServer {
            addr: format!("http://{addr}"),
            kind: Kind::InProcess {
                shutdown: Some(shutdown),
                task,
            },
            logs: Logs::default(),
        };
        server.wait_health(ServingStatus::Serving).await;
        server
    }

    /// Runs the server binary; returns once health is SERVING. Its log
    /// lines are echoed to the test's stderr and kept for [`TestServer::wait_log`].
    pub async fn process(self) -> TestServer {
        let server = self.spawn().await;
        server.wait_health(ServingStatus::Serving).await;
        server
    }

    /// Runs the server binary; returns once it listens (for a server the
    /// test's plaintext health check cannot reach, e.g. over TLS).
    pub async fn spawn(self) -> TestServer {
        let mut child = tokio::process::Command::new(BIN)
            .arg("serve")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", &self.log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("the server binary starts");
        let logs = Logs::default();
        let stderr = tokio::io::BufReader::new(child.stderr.take().expect("piped stderr"));
        tokio::spawn(logs.clone().keep(stderr));
        let addr = listening_address(child.stdout.take().expect("piped stdout")).await;
        TestServer {
            addr: format!("http://{addr}"),
            kind: Kind::Process(child),
            logs,
        }
    }
}

/// Reads the `listening on ADDR` line a server process prints first (bounded).
pub async fn listening_address(stdout: tokio::process::ChildStdout) -> String {
    let mut stdout = tokio::io::BufReader::new(stdout);
    let mut line = String::new();
    tokio::time::timeout(DEADLINE, stdout.read_line(&mut line))
        .await
        .expect("the server prints its address in time")
        .expect("reads its stdout");
    line.trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("a 'listening on' line, not {line:?}"))
        .to_string()
}

/// A process server's log lines, as they come.
#[derive(Debug, Clone, Default)]
pub struct Logs {
    lines: Arc<Mutex<Vec<String>>>,
    more: Arc<tokio::sync::Notify>,
}

impl Logs {
    async fn keep(self, stderr: tokio::io::BufReader<tokio::process::ChildStderr>) {
        let mut lines = stderr.lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[server] {line}");
            self.lines.lock().unwrap().push(line);
            self.more.notify_waiters();
        }
    }

    /// Every line so far.
    pub fn all(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }
}

/// A running test server.
pub struct TestServer {
    /// `http://127.0.0.1:PORT`.
    pub addr: String,
    kind: Kind,
    logs: Logs,
}

enum Kind {
    /// `server::run` on this test's runtime; sending on `shutdown` drains it.
    InProcess {
        shutdown: Option<oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<anyhow::Result<()>>,
    },
    /// The server binary (killed on drop).
    Process(tokio::process::Child),
}

impl TestServer {
    /// [`Launch::in_process`] with these flags.
    pub async fn start(flags: &[&str]) -> TestServer {
        Launch::new(flags).in_process().await
    }

    /// [`Launch::process`] with these flags.
    pub async fn process(flags: &[&str]) -> TestServer {
        Launch::new(flags).process().await
    }

    /// Waits on the health Watch (bounded) until the overall status is `want`.
    pub async fn wait_health(&self, want: ServingStatus) {
        wait_health(self.channel().await, want).await;
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr.rsplit(':').next().unwrap().parse().expect("a port")
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .expect("connects")
    }

    pub async fn client(&self) -> EmbedderClient<Channel> {
        EmbedderClient::new(self.channel().await).max_decoding_message_size(64 << 20)
    }

    /// GetStats now.
    pub async fn stats(&self) -> pb::Stats {
        self.client()
            .await
            .get_stats(pb::GetStatsRequest {})
            .await
            .unwrap()
            .into_inner()
    }

    /// Polls GetStats until `done` holds (bounded), returning the last stats.
    /// (GetStats has no watch; the poll is bounded, its interval short, and
    /// no test sleeps instead of waiting for a state.)
    pub async fn wait_stats(&self, what: &str, done: impl Fn(&pb::Stats) -> bool) -> pb::Stats {
        let mut client = self.client().await;
        let deadline = Instant::now() + DEADLINE;
        loop {
            let stats = client.get_stats(pb::GetStatsRequest {}).await.unwrap().into_inner();
            if done(&stats) {
                return stats;
            }
            assert!(Instant::now() < deadline, "{what}: stats never got there: {stats:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// GetStats with the census beside it (test builds): the ledger
    /// (`kv_cache_bytes`) and the bytes of the KV tensors that exist, read
    /// together between model calls, and the census's peak since the
    /// previous census.
    pub async fn census(&self) -> Census {
        census(&mut self.client().await).await
    }

    /// Waits (bounded) for a log line of a process server that `matches`.
    pub async fn wait_log(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let wait = async {
            loop {
                let more = self.logs.more.notified();
                tokio::pin!(more);
                more.as_mut().enable();
                if let Some(line) = self.logs.all().into_iter().find(|l| matches(l)) {
                    return line;
                }
                more.await;
            }
        };
        tokio::time::timeout(DEADLINE, wait)
            .await
            .unwrap_or_else(|_| panic!("no log line {what} within {DEADLINE:?}"))
    }

    /// A process server's log lines so far.
    pub fn logs(&self) -> Vec<String> {
        self.logs.all()
    }

    /// The child process's pid (process servers only).
    pub fn pid(&self) -> u32 {
        match &self.kind {
            Kind::Process(child) => child.id().expect("the server process is running"),
            Kind::InProcess { .. } => panic!("an in-process server has no pid of its own"),
        }
    }

    /// Sends `signal` (e.g. `-TERM`) to a process server.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill {signal}");
    }

    /// Waits (bounded) for the child process to exit (process servers only).
    pub async fn wait_exit(&mut self) -> std::process::ExitStatus {
        let Kind::Process(child) = &mut self.kind else {
            panic!("only a process server exits on its own");
        };
        tokio::time::timeout(DEADLINE, child.wait())
            .await
            .unwrap_or_else(|_| panic!("the server did not exit within {DEADLINE:?}"))
            .expect("waits for the server process")
    }

    /// Resolves an in-process server's shutdown future, as a signal would.
    pub fn begin_shutdown(&mut self) {
        let Kind::InProcess { shutdown, .. } = &mut self.kind else {
            panic!("only an in-process server is shut down through its future");
        };
        let _ = shutdown.take().expect("shut down once").send(());
    }

    /// Waits (bounded) for an in-process server's `run` to return.
    pub async fn stopped(mut self) -> anyhow::Result<()> {
        let Kind::InProcess { task, .. } = &mut self.kind else {
            panic!("only an in-process server returns from run");
        };
        tokio::time::timeout(DEADLINE, task)
            .await
            .expect("server::run returns after its shutdown")
            .expect("the server task does not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        match &mut self.kind {
            Kind::InProcess { task, .. } => task.abort(),
            Kind::Process(child) => {
                let _ = child.start_kill();
            }
        }
    }
}

/// Waits on the health Watch over `channel` (bounded) until the overall
/// status is `want` (over TLS too: the channel is the caller's).
pub async fn wait_health(channel: Channel, want: ServingStatus) {
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest { service: String::new() })
        .await
        .expect("health watch")
        .into_inner();
    let reached = async {
        while let Some(status) = watch.next().await {
            if status.expect("health status").status() == want {
                return;
            }
        }
        panic!("the health watch ended before {want:?}");
    };
    tokio::time::timeout(DEADLINE, reached)
        .await
        .unwrap_or_else(|_| panic!("{want:?} within {DEADLINE:?}"));
}

/// GetStats with the census (see [`TestServer::census`]).
#[derive(Debug, Clone)]
pub struct Census {
    pub stats: pb::Stats,
    /// Bytes of the KV tensors that exist.
    pub bytes: u64,
    /// The most the census measured at once since the previous census.
    pub peak: u64,
}

/// [`TestServer::census`] over a client of one's own.
pub async fn census(client: &mut EmbedderClient<Channel>) -> Census {
    let mut request = tonic::Request::new(pb::GetStatsRequest {});
    request.metadata_mut().insert(CENSUS_METADATA, "1".parse().unwrap());
    let response = client.get_stats(request).await.expect("GetStats answers");
    let number = |key: &str| -> u64 {
        response
            .metadata()
            .get(key)
            .unwrap_or_else(|| panic!("no {key} metadata: is the server built with the `faults` feature?"))
            .to_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (bytes, peak) = (number("se-census-bytes"), number("se-census-peak-bytes"));
    Census {
        stats: response.into_inner(),
        bytes,
        peak,
    }
}

/// The directory whose files release the calls held by `SE_FAULTS=hold:N`
/// (src/faults.rs); removed on drop.
pub struct Gate {
    dir: tempfile::TempDir,
}

impl Gate {
    pub fn new() -> Gate {
        Gate {
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    /// The directory, for `SE_FAULTS_GATE`.
    pub fn path(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Releases held call `call`.
    pub fn open(&self, call: u64) {
        std::fs::write(self.dir.path().join(call.to_string()), b"").expect("the gate file is written");
    }
}

impl Launch {
    /// Runs the server with the fault plan `plan` (`SE_FAULTS`), its held
    /// calls released by `gate`.
    pub fn faults(self, plan: &str, gate: &Gate) -> Launch {
        self.env("SE_FAULTS", plan)
            .env("SE_FAULTS_GATE", gate.path().to_string_lossy())
    }
}

/// Runs `cmd` to its end and collects its output; fails the test if it has
/// not exited within [`DEADLINE`] (e.g. a server that should have refused
/// to start).
pub fn output(cmd: &mut std::process::Command) -> std::process::Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let pid = child.id();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done_tx.send(child.wait_with_output());
    });
    match done_rx.recv_timeout(DEADLINE) {
        Ok(output) => output.expect("the command's output is read"),
        Err(_) => {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("{cmd:?} did not exit within {DEADLINE:?}");
        }
    }
}
