//! Long-lived idle streams: a CONNECT tunnel through a random ready replica to a sink that
//! holds every connection open, as `kubectl logs -f` or an idle ssh session would. When a
//! drain deadline cuts one, it is opened again through another replica.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rd_benches::{BoxError, Rng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What the holders saw.
#[derive(Debug, Default)]
pub struct Holds {
    opened: AtomicU64,
    ended: AtomicU64,
    refused: AtomicU64,
    open_now: AtomicU64,
    changed: Notify,
}

/// [`Holds`] as numbers.
#[derive(Debug, Clone, Copy)]
pub struct HoldStats {
    pub opened: u64,
    /// Cut (by a drain deadline) and opened again elsewhere.
    pub ended: u64,
    /// Attempts to open one that were refused.
    pub refused: u64,
}

impl Holds {
    pub fn stats(&self) -> HoldStats {
        HoldStats {
            opened: self.opened.load(Ordering::Relaxed),
            ended: self.ended.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
        }
    }

    /// Waits until `n` are open at once.
    pub async fn wait_open(&self, n: usize, bound: Duration) -> Result<(), BoxError> {
        let wait = async {
            loop {
                let changed = self.changed.notified();
                if self.open_now.load(Ordering::Relaxed) as usize >= n {
                    return;
                }
                changed.await;
            }
        };
        tokio::time::timeout(bound, wait)
            .await
            .map_err(|_| format!("fewer than {n} long-lived streams open after {bound:?}").into())
    }
}

/// A TCP service that accepts and holds every connection, reading and discarding.
pub async fn sink() -> Result<SocketAddr, BoxError> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    Ok(addr)
}

/// Holds one long-lived stream for `client` until `stop`, opening it again when it ends.
pub async fn hold(
    client: String,
    sink: SocketAddr,
    mut rng: Rng,
    ready: Arc<Vec<AtomicBool>>,
    addrs: Arc<Vec<SocketAddr>>,
    holds: Arc<Holds>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        let live: Vec<SocketAddr> = addrs
            .iter()
            .zip(ready.iter())
            .filter(|(_, r)| r.load(Ordering::SeqCst))
            .map(|(a, _)| *a)
            .collect();
        if live.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        let server = live[(rng.next_u64() % live.len() as u64) as usize];
        let mut tunnel = match open(server, &client, sink).await {
            Ok(t) => t,
            Err(_) => {
                holds.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        holds.opened.fetch_add(1, Ordering::Relaxed);
        holds.open_now.fetch_add(1, Ordering::Relaxed);
        holds.changed.notify_waiters();
        let mut buf = [0u8; 64];
        let ended = tokio::select! {
            _ = tunnel.read(&mut buf) => true,
            () = stop.cancelled() => false,
        };
        holds.open_now.fetch_sub(1, Ordering::Relaxed);
        if ended {
            holds.ended.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn open(server: SocketAddr, client: &str, sink: SocketAddr) -> Result<TcpStream, BoxError> {
    let mut tcp = TcpStream::connect(server).await?;
    // The agent's id as the proxy user; the replicas check no password.
    let auth = basic(client);
    let req = format!(
        "CONNECT {sink} HTTP/1.1\r\nHost: {sink}\r\nProxy-Authorization: Basic {auth}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tcp.read(&mut byte).await? == 0 {
            return Err("closed before the answer".into());
        }
        head.push(byte[0]);
    }
    if head.starts_with(b"HTTP/1.1 200") {
        Ok(tcp)
    } else {
        Err(String::from_utf8_lossy(&head).into_owned().into())
    }
}

/// `user:` in base64, for Basic auth with an empty password.
fn basic(user: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:"))
}
