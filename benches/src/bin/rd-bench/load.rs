//! The load generator: hyper HTTP/1.1 clients for bulk downloads, closed-loop keep-alive
//! request loops and open-loop fixed-rate requests, plus the ideal TCP relay.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HOST;
use http::{Request, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1::SendRequest;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rd_benches::Latencies;
use tokio::net::{TcpListener, TcpStream};

pub use rd_benches::BoxError;

/// One of the ways to reach rd-dummy.
#[derive(Debug, Clone)]
pub struct Path {
    /// `direct`, `relay`, `tunnel`, `forward`, `connect` or `socks5`.
    pub name: &'static str,
    /// Where the load generator connects.
    pub addr: SocketAddr,
    /// Prepended to `/FILE` (the tunnel's `/client/bench/http/DUMMY`).
    pub prefix: String,
    /// Asks for a tunnel to a `host:port` (as client `bench`) before speaking HTTP.
    pub connect: Option<Tunnel>,
}

/// How a raw path asks the server for its tunnel.
#[derive(Debug, Clone, Copy)]
pub enum Tunnel {
    /// HTTP `CONNECT target`.
    Connect(SocketAddr),
    /// A SOCKS5 CONNECT to the target.
    Socks5(SocketAddr),
}

impl Path {
    pub fn path(&self, file: &str) -> String {
        format!("{}/{}", self.prefix, file)
    }

    pub fn uri(&self, file: &str) -> Uri {
        format!("http://{}{}", self.addr, self.path(file))
            .parse()
            .expect("valid uri")
    }
}

/// `CONNECT target` on `tcp` as client `bench`; returns once the `200` head is read.
async fn connect_tunnel(tcp: &mut TcpStream, target: SocketAddr) -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // "bench:" in base64.
    let head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: Basic YmVuY2g6\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await?;
    // Byte by byte: nothing behind the head may be consumed (once per connection).
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if tcp.read(&mut b).await? == 0 {
            return Err("CONNECT: closed before the answer".into());
        }
        answer.push(b[0]);
    }
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(format!("CONNECT: {}", String::from_utf8_lossy(&answer).trim()).into());
    }
    Ok(())
}

/// SOCKS5 to `target` on `tcp` as client `bench`, one message at a time as curl does (three
/// round trips); returns once the success reply is read.
async fn socks5_tunnel(tcp: &mut TcpStream, target: SocketAddr) -> Result<(), BoxError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let SocketAddr::V4(v4) = target else {
        return Err("SOCKS5: the bench dials IPv4 targets".into());
    };
    tcp.write_all(&[5, 1, 2]).await?;
    let mut two = [0u8; 2];
    tcp.read_exact(&mut two).await?;
    if two != [5, 2] {
        return Err(format!("SOCKS5: method reply {two:?}").into());
    }
    tcp.write_all(&[1, 5, b'b', b'e', b'n', b'c', b'h', 1, b'x'])
        .await?;
    tcp.read_exact(&mut two).await?;
    if two != [1, 0] {
        return Err(format!("SOCKS5: authentication reply {two:?}").into());
    }
    let mut request = vec![5, 1, 0, 1];
    request.extend_from_slice(&v4.ip().octets());
    request.extend_from_slice(&v4.port().to_be_bytes());
    tcp.write_all(&request).await?;
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await?;
    if reply[1] != 0 {
        return Err(format!("SOCKS5: reply code {}", reply[1]).into());
    }
    Ok(())
}

async fn connect(path: &Path) -> Result<SendRequest<Empty<Bytes>>, BoxError> {
    let mut tcp = TcpStream::connect(path.addr).await?;
    tcp.set_nodelay(true)?;
    match path.connect {
        Some(Tunnel::Connect(target)) => connect_tunnel(&mut tcp, target).await?,
        Some(Tunnel::Socks5(target)) => socks5_tunnel(&mut tcp, target).await?,
        None => {}
    }
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(async move {
        conn.await.ok();
    });
    Ok(sender)
}

/// GETs `path` on a connection and reads the whole body; returns its length.
async fn get(
    sender: &mut SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> Result<u64, BoxError> {
    sender.ready().await?;
    let req = Request::get(path).header(HOST, host).body(Empty::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let mut body = resp.into_body();
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            n += data.len() as u64;
        }
    }
    if !status.is_success() {
        return Err(format!("GET {path}: status {status}").into());
    }
    Ok(n)
}

/// The value of a metric sample (`name` plus labels, as printed) from rd-server's
/// `/metrics`, if present.
pub async fn metric(server: SocketAddr, sample: &str) -> Option<f64> {
    let path = Path {
        name: "metrics",
        addr: server,
        prefix: String::new(),
        connect: None,
    };
    let mut sender = connect(&path).await.ok()?;
    sender.ready().await.ok()?;
    let req = Request::get("/metrics")
        .header(HOST, server.to_string())
        .body(Empty::new())
        .ok()?;
    let body = sender.send_request(req).await.ok()?.into_body();
    let text = body.collect().await.ok()?.to_bytes();
    String::from_utf8_lossy(&text).lines().find_map(|l| {
        let rest = l.strip_prefix(sample)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// One request on a fresh connection, for readiness checks.
pub async fn fetch_once(path: &Path, file: &str) -> Result<u64, BoxError> {
    let mut sender = connect(path).await?;
    get(&mut sender, &path.addr.to_string(), &path.path(file)).await
}

/// A fresh connection that has carried one request for `file`, kept open (idle) for as
/// long as the returned sender lives.
pub async fn open_after_one(
    path: &Path,
    file: &str,
) -> Result<SendRequest<Empty<Bytes>>, BoxError> {
    let mut sender = connect(path).await?;
    get(&mut sender, &path.addr.to_string(), &path.path(file)).await?;
    Ok(sender)
}

/// What a bulk run moved.
#[derive(Debug, Clone, Copy, Default)]
pub struct BulkResult {
    /// Body bytes received, truncated downloads included.
    pub bytes: u64,
    pub elapsed: Duration,
    /// Downloads that ended before `size` bytes (or failed).
    pub failed: usize,
}

/// `parallel` downloads of `file` at once, each on its own connection. A download that
/// ends early counts as failed; its bytes still count.
pub async fn bulk(
    path: &Path,
    file: &str,
    size: u64,
    parallel: usize,
) -> Result<BulkResult, BoxError> {
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..parallel {
        let addr = path.addr;
        let p = path.path(file);
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut sender = connect(&path).await?;
            sender.ready().await?;
            let req = Request::get(&p)
                .header(HOST, addr.to_string())
                .body(Empty::new())?;
            let resp = sender.send_request(req).await?;
            if !resp.status().is_success() {
                return Err::<(u64, bool), BoxError>(format!("GET {p}: {}", resp.status()).into());
            }
            let mut body = resp.into_body();
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(frame) => {
                        if let Ok(data) = frame.into_data() {
                            n += data.len() as u64;
                        }
                    }
                    Err(_) => return Ok((n, false)),
                }
            }
            Ok((n, n == size))
        }));
    }
    let mut result = BulkResult::default();
    for t in tasks {
        match t.await? {
            Ok((n, complete)) => {
                result.bytes += n;
                result.failed += usize::from(!complete);
            }
            Err(_) => result.failed += 1,
        }
    }
    result.elapsed = start.elapsed();
    Ok(result)
}

/// Closed loop result.
#[derive(Debug, Default)]
pub struct LoopResult {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latencies: Latencies,
    /// Open loop only: how far behind schedule the sender fell at most.
    pub max_lag: Duration,
}

impl LoopResult {
    pub fn merge(&mut self, other: LoopResult) {
        self.ok += other.ok;
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latencies.merge(other.latencies);
        self.max_lag = self.max_lag.max(other.max_lag);
    }

    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `conns` keep-alive connections, each sending the next request as soon as the previous
/// response is read, for `duration`.
pub async fn closed_loop(
    path: &Path,
    file: &str,
    conns: usize,
    duration: Duration,
) -> Result<LoopResult, BoxError> {
    let mut senders = Vec::with_capacity(conns);
    for _ in 0..conns {
        let mut s = connect(path).await?;
        // Warm the connection (and, for the tunnel, its pooled tunnel stream).
        get(&mut s, &path.addr.to_string(), &path.path(file)).await?;
        senders.push(s);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    for mut sender in senders {
        let host = path.addr.to_string();
        let p = path.path(file);
        let path = path.clone();
        tasks.push(tokio::spawn(async move {
            let mut r = LoopResult::default();
            while Instant::now() < deadline {
                let t = Instant::now();
                match get(&mut sender, &host, &p).await {
                    Ok(_) => {
                        r.latencies.record(t.elapsed());
                        r.ok += 1;
                    }
                    Err(_) => {
                        r.errors += 1;
                        match connect(&path).await {
                            Ok(s) => sender = s,
                            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    }
                }
            }
            r
        }));
    }
    let mut total = LoopResult::default();
    for t in tasks {
        total.merge(t.await?);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// A pooled keep-alive client for open-loop load.
pub type PoolClient = Client<HttpConnector, Empty<Bytes>>;

pub fn pool_client() -> PoolClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .build(connector)
}

async fn pooled_get(client: &PoolClient, uri: Uri) -> Result<u64, BoxError> {
    let resp = client.get(uri).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        return Err(format!("status {status}").into());
    }
    Ok(body.len() as u64)
}

/// Open loop: one request every `1/rate` s for `duration`, each in its own task, whether
/// or not earlier ones have finished. Latency is measured from the moment each request is
/// sent; the scheduler's lag is reported separately.
pub async fn open_loop(
    client: &PoolClient,
    path: &Path,
    file: &str,
    rate: u64,
    duration: Duration,
) -> Result<LoopResult, BoxError> {
    let uri = path.uri(file);
    // Warm the pool.
    for _ in 0..20 {
        pooled_get(client, uri.clone()).await?;
    }
    let period = Duration::from_nanos(1_000_000_000 / rate.max(1));
    let total = (duration.as_secs_f64() * rate as f64).round() as u64;
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let mut max_lag = Duration::ZERO;
    for i in 0..total {
        let due = start + period * i as u32;
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
        }
        max_lag = max_lag.max(Instant::now().saturating_duration_since(due));
        let client = client.clone();
        let uri = uri.clone();
        tasks.spawn(async move {
            let t = Instant::now();
            let r = pooled_get(&client, uri).await;
            (t.elapsed(), r.is_ok())
        });
    }
    let mut result = LoopResult::default();
    while let Some(done) = tasks.join_next().await {
        let (latency, ok) = done?;
        if ok {
            result.ok += 1;
            result.latencies.record(latency);
        } else {
            result.errors += 1;
        }
    }
    result.elapsed = start.elapsed();
    result.max_lag = max_lag;
    Ok(result)
}

/// Downloads `file` over and over on `path` until `stop` is set; counts the bytes.
pub async fn background_bulk(
    path: Path,
    file: String,
    stop: Arc<AtomicBool>,
    moved: Arc<AtomicU64>,
) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut sender) = connect(&path).await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let host = path.addr.to_string();
        let p = path.path(&file);
        // Read the body frame by frame so the loop notices `stop` promptly.
        let Ok(()) = sender.ready().await else {
            continue;
        };
        let Ok(req) = Request::get(&p).header(HOST, &host).body(Empty::new()) else {
            return;
        };
        let Ok(resp) = sender.send_request(req).await else {
            continue;
        };
        let mut body = resp.into_body();
        while let Some(Ok(frame)) = body.frame().await {
            if let Ok(data) = frame.into_data() {
                moved.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            if stop.load(Ordering::Relaxed) {
                return;
            }
        }
    }
}

/// An ideal relay: accept, connect to `upstream`, copy both ways with 256 KiB buffers.
pub async fn relay(listener: TcpListener, upstream: SocketAddr) {
    loop {
        let Ok((mut down, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            down.set_nodelay(true).ok();
            let Ok(mut up) = TcpStream::connect(upstream).await else {
                return;
            };
            up.set_nodelay(true).ok();
            tokio::io::copy_bidirectional_with_sizes(&mut down, &mut up, 256 << 10, 256 << 10)
                .await
                .ok();
        });
    }
}
