//! The mixed workload through the tunnel: small GETs on keep-alive connections, medium and
//! large downloads, streamed POST uploads to an in-process sink; every body is checked for
//! size and hash, every failure is recorded with its kind and when it happened.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream;
use http::header::HOST;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rd_benches::{Rng, StreamHash};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A file rd-dummy serves, with what its body must be.
#[derive(Debug, Clone)]
pub struct FileInfo {
    pub name: String,
    pub size: u64,
    pub hash: u64,
}

/// Which part of the workload a request belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Work {
    Small,
    Medium,
    Large,
    Upload,
}

impl Work {
    pub const ALL: [Work; 4] = [Work::Small, Work::Medium, Work::Large, Work::Upload];

    pub fn name(self) -> &'static str {
        match self {
            Work::Small => "small",
            Work::Medium => "medium",
            Work::Large => "large",
            Work::Upload => "upload",
        }
    }
}

/// A failed request.
#[derive(Debug, Clone)]
pub struct Failure {
    pub work: Work,
    /// The error kind: `connect refused`, `5xx 502 dial refused`, `truncated body`, ...
    pub kind: String,
    pub detail: String,
    pub start: Instant,
    pub end: Instant,
}

/// Counters for one kind of work.
#[derive(Debug, Default)]
pub struct Counter {
    pub ok: AtomicU64,
    /// Verified body bytes (downloaded, or uploaded and confirmed by the sink).
    pub bytes: AtomicU64,
    /// Bytes of failed requests that did arrive (truncated bodies).
    pub partial_bytes: AtomicU64,
}

/// Everything the workload saw.
#[derive(Debug, Default)]
pub struct Stats {
    pub counters: [Counter; 4],
    pub failures: Mutex<Vec<Failure>>,
    /// Medium, large and upload requests running now.
    pub bulk_in_flight: Arc<AtomicU64>,
}

impl Stats {
    fn counter(&self, w: Work) -> &Counter {
        &self.counters[w as usize]
    }

    fn record(&self, work: Work, start: Instant, result: Result<u64, Fail>) {
        match result {
            Ok(n) => {
                let c = self.counter(work);
                c.ok.fetch_add(1, Ordering::Relaxed);
                c.bytes.fetch_add(n, Ordering::Relaxed);
            }
            Err(f) => {
                self.counter(work)
                    .partial_bytes
                    .fetch_add(f.partial, Ordering::Relaxed);
                self.failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Failure {
                        work,
                        kind: f.kind,
                        detail: f.detail,
                        start,
                        end: Instant::now(),
                    });
            }
        }
    }

    pub fn ok(&self, w: Work) -> u64 {
        self.counter(w).ok.load(Ordering::Relaxed)
    }

    pub fn bytes(&self, w: Work) -> u64 {
        self.counter(w).bytes.load(Ordering::Relaxed)
    }

    pub fn partial_bytes(&self, w: Work) -> u64 {
        self.counter(w).partial_bytes.load(Ordering::Relaxed)
    }

    pub fn failures(&self) -> Vec<Failure> {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Why one request failed.
#[derive(Debug)]
struct Fail {
    kind: String,
    detail: String,
    /// Body bytes that arrived anyway.
    partial: u64,
}

impl Fail {
    fn new(kind: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            detail: detail.into(),
            partial: 0,
        }
    }
}

/// The full text of an error and its sources.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// A 5xx body's category: the error class without addresses and numbers.
pub fn category(body: &str) -> String {
    let b = body.to_ascii_lowercase();
    let known = [
        ("failed to find session", "no session"),
        ("tunnel disconnect", "tunnel disconnect"),
        ("connection refused", "dial refused"),
        ("timeout", "timeout"),
        ("timed out", "timeout"),
        ("reset", "reset"),
        ("closed", "closed"),
    ];
    if let Some((_, c)) = known.iter().find(|(k, _)| b.contains(k)) {
        return (*c).to_string();
    }
    let line = body.lines().next().unwrap_or("").trim();
    let cleaned: String = line
        .chars()
        .take(60)
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    if cleaned.is_empty() {
        "(empty body)".into()
    } else {
        cleaned
    }
}

/// Where the workload sends requests, and what it expects back.
#[derive(Debug)]
pub struct Target {
    pub server: Mutex<SocketAddr>,
    /// `/client/soak/http/DUMMY`.
    pub dummy_prefix: String,
    /// `/client/soak/http/SINK`.
    pub sink_prefix: String,
    pub small: FileInfo,
    pub medium: Vec<FileInfo>,
    pub large: Vec<FileInfo>,
}

impl Target {
    pub fn server(&self) -> SocketAddr {
        *self.server.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Knobs of the workload.
#[derive(Debug, Clone)]
pub struct Shape {
    pub small_conns: usize,
    /// Requests per second per small connection.
    pub small_rate: f64,
    pub medium_workers: usize,
    pub medium_pause: Duration,
    /// Pause between large downloads.
    pub large_every: Duration,
    pub uploads: bool,
    pub upload_pause: Duration,
}

async fn connect<B>(addr: SocketAddr) -> Result<SendRequest<B>, Fail>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tcp = TcpStream::connect(addr).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Fail::new("connect refused", e.to_string())
        } else {
            Fail::new("connect error", e.to_string())
        }
    })?;
    tcp.set_nodelay(true).ok();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| Fail::new("connect error", chain(&e)))?;
    tokio::spawn(async move {
        conn.await.ok();
    });
    Ok(sender)
}

/// Sends `req` and checks the status; a 5xx is classified by its body text.
async fn send<B>(sender: &mut SendRequest<B>, req: Request<B>) -> Result<Response<Incoming>, Fail>
where
    B: hyper::body::Body + 'static,
{
    sender
        .ready()
        .await
        .map_err(|e| Fail::new("no response (connection closed)", chain(&e)))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| Fail::new("no response (connection closed)", chain(&e)))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let body = tokio::time::timeout(Duration::from_secs(5), resp.into_body().collect())
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
    if status.is_server_error() {
        Err(Fail::new(
            format!("5xx {} {}", status.as_u16(), category(&body)),
            body.trim().to_string(),
        ))
    } else {
        Err(Fail::new(
            format!("status {}", status.as_u16()),
            body.trim().to_string(),
        ))
    }
}

/// GETs `file` on `sender` and checks its size and hash.
async fn get_file(
    sender: &mut SendRequest<Empty<Bytes>>,
    host: &str,
    prefix: &str,
    file: &FileInfo,
) -> Result<u64, Fail> {
    let path = format!("{prefix}/{}", file.name);
    let req = Request::get(&path)
        .header(HOST, host)
        .body(Empty::new())
        .map_err(|e| Fail::new("bad request", e.to_string()))?;
    let resp = send(sender, req).await?;
    let mut body = resp.into_body();
    let mut hash = StreamHash::new();
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Ok(data) = frame.into_data() {
                    hash.update(&data);
                }
            }
            Err(e) => {
                return Err(Fail {
                    kind: "truncated body".into(),
                    detail: format!("{} of {} bytes: {}", hash.len(), file.size, chain(&e)),
                    partial: hash.len(),
                });
            }
        }
    }
    if hash.len() < file.size {
        return Err(Fail {
            kind: "truncated body".into(),
            detail: format!("{} of {} bytes, clean end", hash.len(), file.size),
            partial: hash.len(),
        });
    }
    if hash.len() != file.size || hash.finish() != file.hash {
        return Err(Fail {
            kind: "hash mismatch".into(),
            detail: format!(
                "{}: {} bytes (want {}), hash {:016x} (want {:016x})",
                file.name,
                hash.len(),
                file.size,
                hash.finish(),
                file.hash
            ),
            partial: hash.len(),
        });
    }
    Ok(hash.len())
}

async fn timed<T>(
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, Fail>>,
) -> Result<T, Fail> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(Fail::new("timeout", format!("no answer within {limit:?}"))),
    }
}

/// One GET of `file` on a fresh connection, for probes.
pub async fn probe(target: &Target, limit: Duration) -> Result<(), String> {
    let addr = target.server();
    timed(limit, async {
        let mut s = connect(addr).await?;
        get_file(
            &mut s,
            &addr.to_string(),
            &target.dummy_prefix,
            &target.small,
        )
        .await
    })
    .await
    .map(|_| ())
    .map_err(|f| format!("{}: {}", f.kind, f.detail))
}

/// Runs the workload until `until` (no request starts later, and none runs for long after).
/// Returns the number of requests still running when they were cut off at `until + grace`.
pub async fn run(
    target: Arc<Target>,
    stats: Arc<Stats>,
    shape: Shape,
    until: Instant,
    grace: Duration,
) -> u64 {
    let in_flight = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    let seconds = until
        .saturating_duration_since(Instant::now())
        .as_secs_f64();
    for i in 0..shape.small_conns {
        let (t, s, f) = (target.clone(), stats.clone(), in_flight.clone());
        let rate = shape.small_rate;
        // A hard bound on the count too, whatever the clock does.
        let max = (seconds * rate * 2.0) as u64 + 10;
        tasks.spawn(small_loop(t, s, f, i, rate, until, max));
    }
    for i in 0..shape.medium_workers {
        let (t, s, f) = (target.clone(), stats.clone(), in_flight.clone());
        tasks.spawn(medium_loop(t, s, f, i as u64, shape.medium_pause, until));
    }
    {
        let (t, s, f) = (target.clone(), stats.clone(), in_flight.clone());
        tasks.spawn(large_loop(t, s, f, shape.large_every, until));
    }
    if shape.uploads {
        let (t, s, f) = (target.clone(), stats.clone(), in_flight.clone());
        tasks.spawn(upload_loop(t, s, f, shape.upload_pause, until));
    }
    let cut = tokio::time::sleep_until((until + grace).into());
    tokio::pin!(cut);
    loop {
        tokio::select! {
            next = tasks.join_next() => if next.is_none() { return 0 },
            () = &mut cut => {
                let left = in_flight.load(Ordering::Relaxed);
                tasks.shutdown().await;
                return left;
            }
        }
    }
}

/// Counts a request as in flight while it runs.
struct InFlight(Arc<AtomicU64>);

impl InFlight {
    fn new(c: &Arc<AtomicU64>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Sleeps `d`, or until `until` if that comes first.
async fn pause_until(d: Duration, until: Instant) {
    tokio::time::sleep_until((Instant::now() + d).min(until).into()).await;
}

/// After a failure: drop the connection and wait a little before the next attempt.
const ERROR_BACKOFF: Duration = Duration::from_millis(100);

async fn small_loop(
    target: Arc<Target>,
    stats: Arc<Stats>,
    in_flight: Arc<AtomicU64>,
    index: usize,
    rate: f64,
    until: Instant,
    max: u64,
) {
    let period = Duration::from_secs_f64(1.0 / rate.max(0.01));
    // Spread the connections over one period.
    let mut next = Instant::now() + period.mul_f64((index % 20) as f64 / 20.0);
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    let mut done = 0;
    while done < max {
        tokio::time::sleep_until(next.into()).await;
        let now = Instant::now();
        if now >= until {
            break;
        }
        next = (next + period).max(now);
        done += 1;
        let _f = InFlight::new(&in_flight);
        let addr = target.server();
        let result = timed(Duration::from_secs(15), async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                sender = Some(connect(addr).await?);
            }
            let s = sender.as_mut().ok_or_else(|| Fail::new("internal", ""))?;
            get_file(s, &addr.to_string(), &target.dummy_prefix, &target.small).await
        })
        .await;
        let failed = result.is_err();
        stats.record(Work::Small, now, result);
        if failed {
            sender = None;
            next = next.max(Instant::now() + ERROR_BACKOFF);
        }
    }
}

async fn medium_loop(
    target: Arc<Target>,
    stats: Arc<Stats>,
    in_flight: Arc<AtomicU64>,
    seed: u64,
    pause: Duration,
    until: Instant,
) {
    let mut rng = Rng::new(100 + seed);
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    let max = 1_000_000u64;
    for _ in 0..max {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let file = &target.medium[(rng.next_u64() % target.medium.len() as u64) as usize];
        let _f = InFlight::new(&in_flight);
        let _bulk = InFlight::new(&stats.bulk_in_flight);
        let addr = target.server();
        let result = timed(Duration::from_secs(60), async {
            if sender.as_ref().is_none_or(|s| s.is_closed()) {
                sender = Some(connect(addr).await?);
            }
            let s = sender.as_mut().ok_or_else(|| Fail::new("internal", ""))?;
            get_file(s, &addr.to_string(), &target.dummy_prefix, file).await
        })
        .await;
        if result.is_err() {
            sender = None;
        }
        stats.record(Work::Medium, now, result);
        drop((_f, _bulk));
        pause_until(pause, until).await;
    }
}

async fn large_loop(
    target: Arc<Target>,
    stats: Arc<Stats>,
    in_flight: Arc<AtomicU64>,
    every: Duration,
    until: Instant,
) {
    for i in 0..100_000usize {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let file = &target.large[i % target.large.len()];
        let _f = InFlight::new(&in_flight);
        let _bulk = InFlight::new(&stats.bulk_in_flight);
        let addr = target.server();
        let result = timed(Duration::from_secs(180), async {
            let mut s = connect(addr).await?;
            get_file(&mut s, &addr.to_string(), &target.dummy_prefix, file).await
        })
        .await;
        stats.record(Work::Large, now, result);
        drop((_f, _bulk));
        pause_until(every, until).await;
    }
}

type UploadBody = UnsyncBoxBody<Bytes, Infallible>;

/// `size` PRNG bytes from `seed` as a chunked body (no length), generated as it is sent.
fn upload_body(seed: u64, size: u64) -> UploadBody {
    let chunk = 64 * 1024u64;
    let s = stream::unfold((Rng::new(seed), size), move |(mut rng, left)| async move {
        if left == 0 {
            return None;
        }
        let n = left.min(chunk) as usize;
        let mut buf = vec![0u8; n];
        rng.fill(&mut buf);
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(buf))),
            (rng, left - n as u64),
        ))
    });
    // Note: Rng::fill draws one extra word for a partial tail, so split sizes must match
    // `upload_hash`, which uses the same chunking.
    BodyExt::boxed_unsync(StreamBody::new(s))
}

/// The hash of `upload_body(seed, size)`.
fn upload_hash(seed: u64, size: u64) -> u64 {
    let chunk = 64 * 1024u64;
    let mut rng = Rng::new(seed);
    let mut h = StreamHash::new();
    let mut buf = vec![0u8; chunk as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk) as usize;
        rng.fill(&mut buf[..n]);
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finish()
}

async fn upload_loop(
    target: Arc<Target>,
    stats: Arc<Stats>,
    in_flight: Arc<AtomicU64>,
    pause: Duration,
    until: Instant,
) {
    const SIZES: [u64; 4] = [(1 << 20) + 3, 4 << 20, (9 << 20) - 5, 16 << 20];
    let mut rng = Rng::new(42);
    for i in 0..1_000_000u64 {
        let now = Instant::now();
        if now >= until {
            break;
        }
        let size = SIZES[(rng.next_u64() % SIZES.len() as u64) as usize];
        let seed = 1000 + i;
        let want = upload_hash(seed, size);
        let _f = InFlight::new(&in_flight);
        let _bulk = InFlight::new(&stats.bulk_in_flight);
        let addr = target.server();
        let result = timed(Duration::from_secs(60), async {
            let mut s = connect::<UploadBody>(addr).await?;
            let req = Request::post(format!("{}/upload", target.sink_prefix))
                .header(HOST, addr.to_string())
                .body(upload_body(seed, size))
                .map_err(|e| Fail::new("bad request", e.to_string()))?;
            let resp = send(&mut s, req).await?;
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| Fail::new("truncated body", chain(&e)))?
                .to_bytes();
            let text = String::from_utf8_lossy(&body);
            let mut parts = text.split_whitespace();
            let got_len: u64 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
            let got_hash = parts
                .next()
                .and_then(|p| u64::from_str_radix(p, 16).ok())
                .unwrap_or(0);
            if got_len == size && got_hash == want {
                Ok(size)
            } else if got_len < size && parts.next() == Some("truncated") {
                Err(Fail::new(
                    "truncated body",
                    format!("sink got {got_len} of {size} bytes"),
                ))
            } else {
                Err(Fail::new(
                    "hash mismatch",
                    format!(
                        "upload seed {seed}: sink got {got_len} bytes hash {got_hash:016x}, sent {size} hash {want:016x}"
                    ),
                ))
            }
        })
        .await;
        stats.record(Work::Upload, now, result);
        drop((_f, _bulk));
        pause_until(pause, until).await;
    }
}

/// The upload sink on `listener`: answers each POST with `LEN HASH` of its body (`LEN HASH
/// truncated` if the body broke off).
pub async fn sink(listener: TcpListener) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        tokio::spawn(async move {
            let service = service_fn(|req: Request<Incoming>| async move {
                let mut body = req.into_body();
                let mut h = StreamHash::new();
                let mut broken = false;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) => {
                            if let Ok(d) = f.into_data() {
                                h.update(&d);
                            }
                        }
                        Err(_) => {
                            broken = true;
                            break;
                        }
                    }
                }
                let text = format!(
                    "{} {:016x}{}",
                    h.len(),
                    h.finish(),
                    if broken { " truncated" } else { "" }
                );
                Ok::<_, Infallible>(
                    Response::builder()
                        .status(StatusCode::OK)
                        .body(Full::new(Bytes::from(text)))
                        .unwrap_or_default(),
                )
            });
            hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await
                .ok();
        });
    }
}

/// Failures grouped by work and kind (`medium: truncated body`), counted.
pub fn by_work_kind<'a>(failures: impl Iterator<Item = &'a Failure>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for f in failures {
        *m.entry(format!("{}: {}", f.work.name(), f.kind))
            .or_insert(0) += 1;
    }
    m
}

/// Failures grouped by kind, counted.
pub fn by_kind<'a>(failures: impl Iterator<Item = &'a Failure>) -> BTreeMap<String, u64> {
    let mut m = BTreeMap::new();
    for f in failures {
        *m.entry(f.kind.clone()).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories() {
        assert_eq!(
            category("failed to find Session for client soak"),
            "no session"
        );
        assert_eq!(
            category("dial tcp 127.0.0.1:9: connect: connection refused"),
            "dial refused"
        );
        assert_eq!(category("weird 123 thing\nmore"), "weird ### thing");
    }

    #[test]
    fn upload_hash_matches_body() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let bytes = rt
            .block_on(upload_body(5, 200_003).collect())
            .expect("body")
            .to_bytes();
        let mut h = StreamHash::new();
        h.update(&bytes);
        assert_eq!(bytes.len(), 200_003);
        assert_eq!(h.finish(), upload_hash(5, 200_003));
    }
}
