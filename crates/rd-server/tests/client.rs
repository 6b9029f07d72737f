//! `rd_client::Client` against a library server: refused credentials and redial pacing,
//! unix socket targets, and connecting through an HTTP CONNECT proxy.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rd_client::transport::ProxyUrl;
use rd_client::{ClientError, ConnectError, ConnectOptions, ProxyMode};
use rd_server::{Authorization, Server, TunnelIdHeader};
use rd_session::Backoff;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A server whose authorizer refuses everybody and counts the attempts.
async fn refusing_server() -> (TestServer, Arc<AtomicUsize>) {
    let attempts = Arc::new(AtomicUsize::new(0));
    let counter = attempts.clone();
    let server = Server::builder(move |_parts: &http::request::Parts| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Authorization::Unauthorized }
    })
    .build();
    (serve(server).await, attempts)
}

#[tokio::test]
async fn refused_credentials_are_an_auth_failure() {
    let (ts, attempts) = refusing_server().await;
    let client = agent(&ts.ws_url(), "foo").build();
    let err = bounded("connect", client.connect(&CancellationToken::new()))
        .await
        .unwrap_err();
    match &err {
        ClientError::Connect(e @ ConnectError::Rejected { status, body, .. }) => {
            assert_eq!(status.as_u16(), 401);
            assert_eq!(body, "failed authentication");
            assert!(e.is_auth_failure());
        }
        other => panic!("unexpected error {other:?}"),
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn run_redials_with_backoff_not_in_a_tight_loop() {
    let (ts, attempts) = refusing_server().await;
    let client = agent(&ts.ws_url(), "foo")
        .backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(200),
            Duration::from_secs(60),
        ))
        .build();
    let cancel = CancellationToken::new();
    let run = tokio::spawn({
        let cancel = cancel.clone();
        async move { client.run(cancel).await }
    });
    // Count attempts over a fixed window: this measures a rate, it synchronises nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = attempts.load(Ordering::SeqCst);
    cancel.cancel();
    bounded("run() to return after cancel", run).await.unwrap();
    // Delays are drawn below 50, 100, 200, 200, ... ms: about ten attempts a second; a
    // client that does not back off makes hundreds.
    assert!((2..=25).contains(&n), "{n} attempts in one second");
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "rd-server-test-{tag}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn unix_socket_targets_are_dialed_on_the_client_side() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let dir = TempDir::new("unix");
    let path = dir.0.join("service.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 5];
        conn.read_exact(&mut buf).await.unwrap();
        buf.reverse();
        conn.write_all(&buf).await.unwrap();
    });

    let mut stream = ts
        .server
        .dialer("foo")
        .dial("unix", path.to_str().unwrap())
        .await
        .unwrap();
    stream.write_all(b"hello").await.unwrap();
    let mut reply = Vec::new();
    bounded("unix reply", stream.read_to_end(&mut reply))
        .await
        .unwrap();
    assert_eq!(reply, b"olleh");

    // A missing socket is the stream's error, with Go's wording (a short path: receivers
    // keep only the first 100 bytes of an Error, as Go's).
    let mut stream = ts
        .server
        .dialer("foo")
        .dial("unix", "/nonexistent/rd.sock")
        .await
        .unwrap();
    let err = bounded("missing socket", stream.read_to_end(&mut Vec::new()))
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "dial unix /nonexistent/rd.sock: connect: no such file or directory"
    );
}

/// A minimal HTTP CONNECT proxy on 127.0.0.1:0 that reports each request line.
async fn spawn_connect_proxy() -> (SocketAddr, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    head.push(client.read_u8().await.unwrap());
                }
                let head = String::from_utf8(head).unwrap();
                let line = head.lines().next().unwrap().to_owned();
                let target = line.split(' ').nth(1).unwrap().to_owned();
                tx.send(line).ok();
                let mut upstream = TcpStream::connect(target).await.unwrap();
                client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn client_reaches_the_server_through_a_connect_proxy() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let (proxy, mut seen) = spawn_connect_proxy().await;
    let options = ConnectOptions::default()
        .with_proxy(ProxyMode::Url(
            ProxyUrl::parse(&format!("http://{proxy}")).unwrap(),
        ))
        .with_handshake_timeout(BOUND);
    let client = agent(&ts.ws_url(), "foo").connect_options(options).build();
    let _running = RunningClient::spawn(client);

    let line = bounded("the proxy's CONNECT", seen.recv()).await.unwrap();
    assert_eq!(line, format!("CONNECT {} HTTP/1.1", ts.addr));
    let server = ts.server.clone();
    wait_until("session foo", || server.has_session("foo")).await;
    let echo = spawn_echo(b"via proxy:").await;
    assert_eq!(
        echo_through(&ts.server, "foo", echo, 10).await,
        "via proxy:ping"
    );
}
