//! A TCP proxy between a client and the server, to lose connections the
//! ways networks lose them: [`Proxy::cut`] closes every socket (a client
//! host that goes away with its kernel still up: no half-close of any
//! stream), [`Proxy::freeze`] goes silent and closes nothing (a host that
//! lost power, a network that black-holes packets: no FIN, no RST).

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use stateful_embedder::pb::embedder_client::EmbedderClient;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;

pub struct Proxy {
    /// `http://127.0.0.1:PORT`, for clients.
    pub addr: String,
    frozen: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// A proxy to `target` (`http://host:port` or `host:port`).
    pub async fn to(target: &str) -> Proxy {
        let target = target.trim_start_matches("http://").to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let frozen = Arc::new(AtomicBool::new(false));
        let flag = frozen.clone();
        let task = tokio::spawn(async move {
            // The connections' tasks belong to this one: aborting it drops
            // them, and with them every socket.
            let mut pipes = tokio::task::JoinSet::new();
            loop {
                let (inbound, _) = listener.accept().await.unwrap();
                let outbound = tokio::net::TcpStream::connect(&target).await.unwrap();
                let (ri, wi) = inbound.into_split();
                let (ro, wo) = outbound.into_split();
                pipes.spawn(pipe(ri, wo, flag.clone()));
                pipes.spawn(pipe(ro, wi, flag.clone()));
            }
        });
        Proxy { addr, frozen, task }
    }

    /// A client connected through the proxy.
    pub async fn client(&self) -> EmbedderClient<Channel> {
        EmbedderClient::new(self.channel().await)
    }

    /// A channel connected through the proxy.
    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.addr.clone())
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Closes every connection through the proxy.
    pub fn cut(self) {
        self.task.abort();
    }

    /// From now on forwards nothing either way and closes nothing.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until frozen; then holds both halves open forever.
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    frozen: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if frozen.load(Ordering::SeqCst) {
            // Silent from now on: the bytes are dropped, the sockets stay open.
            let _keep = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
