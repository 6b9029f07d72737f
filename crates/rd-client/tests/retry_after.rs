//! `Client::run` honours a server's `503` with `Retry-After` (rd-server's answer when its
//! handshake admission is full): that server is not tried again before the time it named,
//! and another server, if there is one, goes first. Fake servers on loopback answer every
//! upgrade with a fixed response and report each attempt.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rd_client::Client;
use rd_session::Backoff;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Bound on waiting for an attempt that should come; only reached on failure.
const BOUND: Duration = Duration::from_secs(30);

/// A server answering every request with `response`; each attempt is sent on the channel
/// with the instant it arrived.
async fn fake_server(response: &'static str) -> (SocketAddr, mpsc::UnboundedReceiver<Instant>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                tx.send(Instant::now()).ok();
                tcp.write_all(response.as_bytes()).await.ok();
                tcp.shutdown().await.ok();
            });
        }
    });
    (addr, rx)
}

const BUSY_1S: &str = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\n\
                       Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n";
const BUSY_LONG: &str = "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3600\r\n\
                         Content-Length: 5\r\nConnection: close\r\n\r\nbusy\n";
const DOWN: &str = "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 5\r\n\
                    Connection: close\r\n\r\ndown\n";

/// Redials as fast as allowed: only Retry-After can hold the client back.
fn eager() -> Backoff {
    Backoff::new(
        Duration::from_millis(1),
        Duration::from_millis(1),
        Duration::from_secs(60),
    )
}

async fn next(rx: &mut mpsc::UnboundedReceiver<Instant>, what: &str) -> Instant {
    tokio::time::timeout(BOUND, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no {what} within {BOUND:?}"))
        .unwrap()
}

#[tokio::test]
async fn a_lone_server_is_retried_no_sooner_than_its_retry_after() {
    let (addr, mut attempts) = fake_server(BUSY_1S).await;
    let client = Client::builder(format!("ws://{addr}/connect"))
        .backoff(eager())
        .build();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let (client, cancel) = (client.clone(), cancel.clone());
        async move { client.run(cancel).await }
    });
    let first = next(&mut attempts, "first attempt").await;
    let second = next(&mut attempts, "second attempt").await;
    // Without Retry-After the 1 ms backoff would have redialed at once.
    assert!(
        second - first >= Duration::from_secs(1),
        "retried after {:?}",
        second - first
    );
    cancel.cancel();
    tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
}

#[tokio::test]
async fn another_server_goes_first_while_one_said_retry_after() {
    let (busy, mut busy_attempts) = fake_server(BUSY_LONG).await;
    let (down, mut down_attempts) = fake_server(DOWN).await;
    let client = Client::builder(format!("ws://{busy}/connect"))
        .server(format!("ws://{down}/connect"))
        .backoff(eager())
        .build();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let (client, cancel) = (client.clone(), cancel.clone());
        async move { client.run(cancel).await }
    });
    next(&mut busy_attempts, "attempt on the busy server").await;
    // The other server is tried round after round meanwhile...
    for i in 0..5 {
        next(
            &mut down_attempts,
            &format!("attempt {i} on the other server"),
        )
        .await;
    }
    // ...and the busy one not again: it asked for an hour.
    assert!(
        busy_attempts.try_recv().is_err(),
        "the server that said Retry-After was dialed again"
    );
    cancel.cancel();
    tokio::time::timeout(BOUND, run).await.unwrap().unwrap();
}
