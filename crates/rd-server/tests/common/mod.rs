//! Shared helpers of the rd-server integration tests: a hyper accept loop serving a
//! [`Server`] at `/connect` and its [`ClientProxy`] at `/client/`, agents built from
//! [`rd_client::Client`], a small HTTP client, test services and polling helpers.
#![allow(dead_code, clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rd_client::{AllowAll, Client, ClientBuilder, ConnectOptions, ProxyMode};
use rd_server::proxy::ClientProxy;
use rd_server::{text_response, Body, BoxError, Server, ServerBuilder, TunnelIdHeader};
use rd_session::Backoff;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Log lines at the binaries' default level (info), as text without colours.
#[derive(Clone, Default)]
pub struct CapturedLog(Arc<std::sync::Mutex<Vec<u8>>>);

impl CapturedLog {
    /// A subscriber that writes this log.
    pub fn subscriber(&self) -> impl tracing::Subscriber + Send + Sync {
        let writer = self.clone();
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish()
    }

    /// Captures this thread's log lines until the guard is dropped (in a single-threaded
    /// test, every task's).
    pub fn start() -> (Self, tracing::subscriber::DefaultGuard) {
        let log = Self::default();
        let guard = tracing::subscriber::set_default(log.subscriber());
        (log, guard)
    }

    /// What was logged so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for CapturedLog {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Upper bound on any single wait in these tests; only reached when something is broken.
pub const BOUND: Duration = Duration::from_secs(10);

/// Polls `cond` every 10 ms until it holds; panics after [`BOUND`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Awaits `fut` for at most [`BOUND`].
pub async fn bounded<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(BOUND, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// A [`Server`] served on 127.0.0.1 at `/connect`, with the example's `/client/` proxy.
pub struct TestServer {
    pub server: Server,
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TestServer {
    /// The websocket URL of the tunnel endpoint.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/connect", self.addr)
    }
}

/// Serves `server` on 127.0.0.1:0.
pub async fn serve(server: Server) -> TestServer {
    let proxy = ClientProxy::new(server.clone());
    serve_with_proxy(server, proxy).await
}

/// Serves `server` on 127.0.0.1:0 with a configured `/client/` proxy.
pub async fn serve_with_proxy(server: Server, proxy: ClientProxy) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    serve_on(server, proxy, listener)
}

/// Serves `server` on `listener` with a configured `/client/` proxy.
pub fn serve_on(server: Server, proxy: ClientProxy, listener: TcpListener) -> TestServer {
    let addr = listener.local_addr().unwrap();
    let proxy = Arc::new(proxy);
    let s = server.clone();
    let accept = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (server, proxy) = (s.clone(), proxy.clone());
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let (server, proxy) = (server.clone(), proxy.clone());
                    async move {
                        let path = req.uri().path().to_owned();
                        let response = if path == "/connect" {
                            server.handle(req).await
                        } else if let Some(rest) = path.strip_prefix("/client/") {
                            proxy.handle(req, rest).await
                        } else {
                            text_response(StatusCode::NOT_FOUND, "not found".into())
                        };
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    TestServer {
        server,
        addr,
        accept,
    }
}

/// Two servers `a` and `b` peered with each other (token `tok`), each built from `build`
/// (which gets the builder with its peer identity set). `b` registers `a` first, so `a`'s
/// link to `b`, the one `b` routes through, is accepted at once.
pub async fn peered_pair(build: impl Fn(ServerBuilder) -> Server) -> (TestServer, TestServer) {
    let a = serve(build(
        Server::builder(TunnelIdHeader).peer_identity("a", "tok"),
    ))
    .await;
    let b = serve(build(
        Server::builder(TunnelIdHeader).peer_identity("b", "tok"),
    ))
    .await;
    b.server.add_peer(a.ws_url(), "a", "tok");
    a.server.add_peer(b.ws_url(), "b", "tok");
    (a, b)
}

/// A client of `url` registering as `id`: no proxy, every target allowed, quick redials.
pub fn agent(url: &str, id: &str) -> ClientBuilder {
    Client::builder(url)
        .connect_options(
            ConnectOptions::default()
                .with_proxy(ProxyMode::None)
                .with_handshake_timeout(BOUND),
        )
        .header(
            HeaderName::from_static("x-tunnel-id"),
            HeaderValue::from_str(id).unwrap(),
        )
        .allow(AllowAll)
        .backoff(Backoff::new(
            Duration::from_millis(20),
            Duration::from_millis(200),
            Duration::from_secs(60),
        ))
}

/// A client running [`Client::run`] in a task; cancelled on drop.
pub struct RunningClient {
    pub cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl RunningClient {
    pub fn spawn(client: Client) -> Self {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let task = tokio::spawn(async move {
            client.run(c).await;
        });
        Self {
            cancel,
            task: Some(task),
        }
    }

    /// Cancels the client and waits for `run` to return.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            bounded("client run() to return after cancel", task)
                .await
                .unwrap();
        }
    }
}

impl Drop for RunningClient {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Starts a client of `ts` as `id` and waits until the server has its session.
pub async fn connected_agent(ts: &TestServer, id: &str) -> RunningClient {
    let running = RunningClient::spawn(agent(&ts.ws_url(), id).build());
    let server = ts.server.clone();
    wait_until("the client's session", || server.has_session(id)).await;
    running
}

// ---------------------------------------------------------------------------------------
// HTTP client

pub fn empty() -> Body {
    Empty::<Bytes>::new().map_err(|n| match n {}).boxed()
}

pub fn full(data: impl Into<Bytes>) -> Body {
    Full::new(data.into()).map_err(|n| match n {}).boxed()
}

/// Sends one request on a fresh HTTP/1.1 connection to `addr`.
pub async fn request(addr: SocketAddr, method: &str, path: &str, body: Body) -> Response<Incoming> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, addr.to_string())
        .body(body)
        .unwrap();
    sender.send_request(req).await.unwrap()
}

/// A GET's status and body as text.
pub async fn get_text(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let response = bounded("GET", request(addr, "GET", path, empty())).await;
    let status = response.status();
    let body = bounded("GET body", response.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Reads a body to its end; returns its length and sha256 (hex).
pub async fn hash_body<B>(mut body: B) -> (u64, String)
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Debug,
{
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    (len, hex::encode(hasher.finalize()))
}

// ---------------------------------------------------------------------------------------
// Test data and services

/// `len` pseudo-random bytes (xorshift64), produced in 64 KiB chunks as a streamed body.
pub struct PatternBody {
    state: u64,
    remaining: u64,
}

impl PatternBody {
    pub fn new(len: u64) -> Self {
        Self {
            state: 0x9E37_79B9_7F4A_7C15,
            remaining: len,
        }
    }

    fn next_chunk(&mut self) -> Option<Bytes> {
        if self.remaining == 0 {
            return None;
        }
        let n = self.remaining.min(64 * 1024) as usize;
        let mut chunk = Vec::with_capacity(n + 8);
        while chunk.len() < n {
            let mut x = self.state;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.state = x;
            chunk.extend_from_slice(&x.to_le_bytes());
        }
        chunk.truncate(n);
        self.remaining -= n as u64;
        Some(Bytes::from(chunk))
    }

    /// Length and sha256 (hex) of the whole pattern of `len` bytes.
    pub fn digest(len: u64) -> (u64, String) {
        let mut body = Self::new(len);
        let mut hasher = Sha256::new();
        while let Some(chunk) = body.next_chunk() {
            hasher.update(&chunk);
        }
        (len, hex::encode(hasher.finalize()))
    }

    pub fn boxed(self) -> Body {
        BodyExt::map_err(self, |n: Infallible| -> BoxError { match n {} }).boxed()
    }
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.next_chunk().map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// An HTTP service on 127.0.0.1:0 for the proxy tests:
/// - `GET /big/{n}`: `n` bytes of [`PatternBody`];
/// - `POST /hash`: answers `{length} {sha256}` of the request body;
/// - anything else: `{method} {path} query={query}`.
pub async fn spawn_http_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    let path = req.uri().path().to_owned();
                    let response: Response<Body> = if let Some(n) = path.strip_prefix("/big/") {
                        Response::new(PatternBody::new(n.parse().unwrap()).boxed())
                    } else if path == "/hash" {
                        let (len, sha) = hash_body(req.into_body()).await;
                        Response::new(full(format!("{len} {sha}")))
                    } else {
                        let text = format!(
                            "{} {} query={}",
                            req.method(),
                            path,
                            req.uri().query().unwrap_or("")
                        );
                        Response::new(full(text))
                    };
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    addr
}

/// A TCP service on 127.0.0.1:0 that writes `greeting`, then echoes what it reads.
pub async fn spawn_echo(greeting: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if tcp.write_all(greeting).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 4096];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

/// A port on 127.0.0.1 that nothing listens on (bound, then released).
pub fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Dials `addr` through `server`'s tunnel to `key`, says `ping`, and returns the greeting and
/// echo as text.
pub async fn echo_through(
    server: &Server,
    key: &str,
    addr: SocketAddr,
    greeting_len: usize,
) -> String {
    let mut stream = server
        .dialer(key)
        .dial("tcp", &addr.to_string())
        .await
        .unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = vec![0u8; greeting_len + 4];
    bounded("echo through the tunnel", stream.read_exact(&mut buf))
        .await
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

/// The value of the metric sample whose line starts with `prefix` (name and labels).
pub fn sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix) && l[prefix.len()..].starts_with(' '))
        .and_then(|l| l[prefix.len()..].trim().parse().ok())
}
