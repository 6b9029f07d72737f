//! Library-level scale measurements, each run in a fresh child process (`rd-bench
//! --scale-child streams|sessions N`) so the heap holds nothing from earlier scenarios. The
//! child prints one JSON line: RSS before and after, and the time to open everything.
//!
//! - streams: N idle streams on one session. The rd side under test runs against a raw
//!   websocket peer that only reads (server side) or only sends Connects (client side), so
//!   each side's cost is measured alone; client-side streams are piped to an idle local
//!   connection, as `rd-client` pipes them to a TCP socket.
//! - sessions: N idle client sessions on one `rd_server::Server`, served by a hyper accept
//!   loop on loopback. The clients are bare upgraded TCP connections that never send, so
//!   almost all of the process's growth is the server's per-session cost.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rd_benches::procfs::self_rss;
use rd_proto::{ConnId, Message, Target};
use rd_server::{Server, TunnelIdHeader};
use rd_session::{BoxedIo, ConnectRefused, SessionBuilder};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

use crate::load::BoxError;

/// A local connection that never has anything to read and swallows writes.
struct Idle;

impl AsyncRead for Idle {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Pending
    }
}

impl AsyncWrite for Idle {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Lets allocations settle, then reads VmRSS.
async fn settled_rss() -> u64 {
    tokio::time::sleep(Duration::from_millis(300)).await;
    self_rss()
}

async fn ws_pair() -> (
    WebSocketStream<tokio::io::DuplexStream>,
    WebSocketStream<tokio::io::DuplexStream>,
) {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let a = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
    let b = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
    (a, b)
}

async fn wait_for(counter: &AtomicUsize, n: usize, what: &str) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter.load(Ordering::Relaxed) < n {
        if Instant::now() > deadline {
            return Err(format!("{what}: only {} of {n}", counter.load(Ordering::Relaxed)).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Server side: N streams dialed through one session whose peer just reads the Connects.
async fn server_streams(n: usize) -> Result<serde_json::Value, BoxError> {
    let (server_ws, mut peer) = ws_pair().await;
    let received = Arc::new(AtomicUsize::new(0));
    let r = received.clone();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = peer.next().await {
            if matches!(msg, WsMessage::Binary(_)) {
                r.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let handle = SessionBuilder::server("scale", 1).spawn(server_ws);
    // One stream first, so the session's one-off allocations are in the baseline.
    let warm = handle.dial_addr("tcp", "127.0.0.1:9")?;
    wait_for(&received, 1, "server warm-up").await?;
    let before = settled_rss().await;
    let start = Instant::now();
    let mut streams = Vec::with_capacity(n);
    for _ in 0..n {
        streams.push(handle.dial_addr("tcp", "127.0.0.1:9")?);
    }
    wait_for(&received, n + 1, "server streams").await?;
    let open = start.elapsed();
    let after = settled_rss().await;
    let live = handle.stats().streams;
    drop((warm, streams));
    Ok(serde_json::json!({
        "before": before, "after": after, "open_s": open.as_secs_f64(), "live": live,
    }))
}

/// Client side: a raw peer sends N Connects to a client session whose handler answers each
/// with an idle local connection.
async fn client_streams(n: usize) -> Result<serde_json::Value, BoxError> {
    let (peer, client_ws) = ws_pair().await;
    let handled = Arc::new(AtomicUsize::new(0));
    let h = handled.clone();
    let handle = SessionBuilder::client()
        .connect_handler(move |_target: Target| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::Relaxed);
                Ok::<BoxedIo, ConnectRefused>(Box::new(Idle))
            }
        })
        .spawn(client_ws);
    // Drain what the client sends (pings, syncs) so it never blocks.
    let (mut sink, mut source) = peer.split();
    tokio::spawn(async move { while let Some(Ok(_)) = source.next().await {} });
    let target = Target::new("tcp", "127.0.0.1:9")?;
    let connect = |id: i64| {
        let bytes = Message::Connect {
            conn_id: ConnId(id),
            target: target.clone(),
        }
        .to_bytes(id);
        WsMessage::Binary(bytes)
    };
    sink.send(connect(1)).await?;
    wait_for(&handled, 1, "client warm-up").await?;
    let before = settled_rss().await;
    let start = Instant::now();
    for id in 2..=(n as i64 + 1) {
        sink.feed(connect(id)).await?;
    }
    sink.flush().await?;
    wait_for(&handled, n + 1, "client streams").await?;
    let open = start.elapsed();
    let after = settled_rss().await;
    let live = handle.stats().streams;
    drop(sink);
    Ok(serde_json::json!({
        "before": before, "after": after, "open_s": open.as_secs_f64(), "live": live,
    }))
}

/// N idle client sessions on one `rd_server::Server`.
async fn sessions(n: usize) -> Result<serde_json::Value, BoxError> {
    let (server, addr) = serve_sessions().await?;
    let mut clients = Vec::with_capacity(n + 1);
    clients.push(raw_client(addr, "warm").await?);
    wait_sessions(&server, 1).await?;
    let before = settled_rss().await;
    let start = Instant::now();
    for i in 0..n {
        clients.push(raw_client(addr, &format!("scale-{i}")).await?);
    }
    wait_sessions(&server, n + 1).await?;
    let open = start.elapsed();
    let after = settled_rss().await;
    let live = server.list_clients().len();
    let (dial_p50_us, dial_p99_us) = dial_latency(&server, "scale", n).await?;
    drop(clients);
    Ok(serde_json::json!({
        "before": before, "after": after, "open_s": open.as_secs_f64(), "live": live,
        "dial_p50_us": dial_p50_us, "dial_p99_us": dial_p99_us,
    }))
}

/// An in-process `rd_server::Server` behind a hyper accept loop on a loopback port.
async fn serve_sessions() -> Result<(Server, std::net::SocketAddr), BoxError> {
    let server = Server::builder(TunnelIdHeader).build();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let s = server.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tcp.set_nodelay(true).ok();
            let s = s.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let s = s.clone();
                    async move { Ok::<_, std::convert::Infallible>(s.handle(req).await) }
                });
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await
                    .ok();
            });
        }
    });
    Ok((server, addr))
}

/// Dial latency, p50 and p99 in µs, to a random one of the sessions `{prefix}-0` ..
/// `{prefix}-{n-1}`: the registry lookup plus queueing the Connect (a dial does not wait for
/// the agent). It must not grow with n.
async fn dial_latency(server: &Server, prefix: &str, n: usize) -> Result<(f64, f64), BoxError> {
    let mut rng = rd_benches::Rng::new(14);
    let mut lat = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let key = format!("{prefix}-{}", rng.next_u64() % n.max(1) as u64);
        let t = Instant::now();
        let stream = server.dialer(key).dial("tcp", "127.0.0.1:9").await?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        drop(stream);
    }
    lat.sort_by(f64::total_cmp);
    Ok((lat[lat.len() / 2], lat[lat.len() * 99 / 100]))
}

/// Dial latency with n sessions whose agents live in a storm load process, so that this
/// process holds one descriptor per session and 10,000 fit under a 20,000 limit.
async fn dial(n: usize) -> Result<serde_json::Value, BoxError> {
    let (server, addr) = serve_sessions().await?;
    let (mut load, _) =
        tokio::task::spawn_blocking(move || crate::storm::start_load(addr, n)).await??;
    wait_sessions(&server, n).await?;
    let live = server.list_clients().len();
    let (dial_p50_us, dial_p99_us) = dial_latency(&server, "storm", n).await?;
    drop(load.stdin.take());
    tokio::task::spawn_blocking(move || load.wait()).await?.ok();
    Ok(serde_json::json!({
        "live": live, "dial_p50_us": dial_p50_us, "dial_p99_us": dial_p99_us,
    }))
}

async fn wait_sessions(server: &Server, n: usize) -> Result<(), BoxError> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.list_clients().len() < n {
        if Instant::now() > deadline {
            return Err(format!("only {} of {n} sessions", server.list_clients().len()).into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A websocket upgrade by hand; the connection is then held and never used.
async fn raw_client(addr: std::net::SocketAddr, key: &str) -> Result<TcpStream, BoxError> {
    let mut tcp = TcpStream::connect(addr).await?;
    crate::storm::upgrade(&mut tcp, addr, key).await?;
    Ok(tcp)
}

/// Runs one measurement in this (child) process and prints its JSON line.
pub fn child_main(kind: &str, n: usize) -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let value = rt.block_on(async {
        match kind {
            "streams-server" => server_streams(n).await,
            "streams-client" => client_streams(n).await,
            "sessions" => sessions(n).await,
            "dial" => dial(n).await,
            "slow-streams" => crate::slow_streams::run(n).await,
            other => Err(format!("unknown scale measurement {other}").into()),
        }
    })?;
    println!("{value}");
    Ok(())
}

/// Per-item figures from a child's JSON.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScaleResult {
    pub live: usize,
    pub bytes_per_item: f64,
    pub open_s: f64,
    /// Sessions only: median and 99th percentile dial latency to a random session, in µs.
    pub dial_p50_us: f64,
    pub dial_p99_us: f64,
}

/// Runs `rd-bench --scale-child KIND N` and returns its JSON line.
pub fn child_json(kind: &str, n: usize) -> Result<serde_json::Value, BoxError> {
    let exe = std::env::current_exe()?;
    let out = std::process::Command::new(exe)
        .args(["--scale-child", kind, &n.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()?;
    if !out.status.success() {
        return Err(format!("scale child {kind} failed: {}", out.status).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(serde_json::from_str(text.trim())?)
}

/// Runs `rd-bench --scale-child KIND N` and parses its answer.
pub fn run_child(kind: &str, n: usize) -> Result<ScaleResult, BoxError> {
    let v = child_json(kind, n)?;
    let get = |k: &str| v[k].as_f64().unwrap_or(0.0);
    Ok(ScaleResult {
        live: get("live") as usize,
        bytes_per_item: (get("after") - get("before")) / n as f64,
        open_s: get("open_s"),
        dial_p50_us: get("dial_p50_us"),
        dial_p99_us: get("dial_p99_us"),
    })
}
