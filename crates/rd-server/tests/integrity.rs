//! Data integrity under load: 200 concurrent streams of random sizes (seeded), downloads and
//! uploads, with slow and stalling readers and deliberate closes from either end, through
//! one session and through a peer hop. Every stream nobody closed must arrive byte-exact
//! (length and sha256); every stream that was closed early must fail or end short in the
//! way its own deliberate close explains: never a truncated stream that looks complete.
//!
//! The service on the client's side speaks a small protocol so that both ends can check:
//! the request names the stream, the content seed and length, the operation and the
//! service's own misbehaviour; a download answers `len`, the content and its sha256; an
//! upload is answered with the length and sha256 the service received.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rd_server::{Server, ServerBuilder, TunnelIdHeader};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on the whole run; a healthy run takes a few seconds.
const RUN_BOUND: Duration = Duration::from_secs(90);
const STREAMS: usize = 200;
const REQUEST_LEN: usize = 35;

/// Byte `i` of the content with `seed`: a counter-based generator, so any range can be
/// produced (and checked) independently of how the stream was chunked.
fn fill(seed: u64, offset: u64, buf: &mut [u8]) {
    let mut i = 0;
    while i < buf.len() {
        let pos = offset + i as u64;
        let word = splitmix64(seed ^ (pos / 8)).to_le_bytes();
        let from = (pos % 8) as usize;
        let n = (8 - from).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&word[from..from + n]);
        i += n;
    }
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn content_sha(seed: u64, len: u64) -> [u8; 32] {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(buf.len() as u64) as usize;
        fill(seed, at, &mut buf[..n]);
        hasher.update(&buf[..n]);
        at += n as u64;
    }
    hasher.finalize().into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// The service sends `len` bytes.
    Download,
    /// The test sends `len` bytes.
    Upload,
}

/// A deliberate early close, after `at` content bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Close {
    None,
    /// The test drops its stream (Error `EOF` after what it wrote).
    TestDrop(u64),
    /// The test resets its stream.
    TestReset(u64),
    /// The service shuts its socket down (FIN).
    ServiceFin(u64),
    /// The service resets its socket (RST).
    ServiceRst(u64),
}

/// How the reading end paces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pace {
    Fast,
    /// Yields to the scheduler after every read.
    Yield,
    /// Sleeps 1 ms after every 64 KiB.
    Throttle,
    /// Stops reading for 150 ms once, after 256 KiB (long enough to pause the sender).
    Stall,
}

#[derive(Debug, Clone, Copy)]
struct Plan {
    id: u64,
    seed: u64,
    len: u64,
    op: Op,
    close: Close,
    pace: Pace,
    /// Largest read or write the test does at once.
    chunk: usize,
}

impl Plan {
    fn request(&self) -> [u8; REQUEST_LEN] {
        let mut r = [0u8; REQUEST_LEN];
        r[0..8].copy_from_slice(&self.id.to_le_bytes());
        r[8..16].copy_from_slice(&self.seed.to_le_bytes());
        r[16..24].copy_from_slice(&self.len.to_le_bytes());
        let (close, at) = match self.close {
            Close::ServiceFin(at) => (1, at),
            Close::ServiceRst(at) => (2, at),
            _ => (0, 0),
        };
        r[24..32].copy_from_slice(&at.to_le_bytes());
        r[32] = match self.op {
            Op::Download => 0,
            Op::Upload => 1,
        };
        r[33] = close;
        r[34] = match self.pace {
            Pace::Fast => 0,
            Pace::Yield => 1,
            Pace::Throttle => 2,
            Pace::Stall => 3,
        };
        r
    }
}

/// 200 streams: mostly small, some MiBs, `huge` of 16 MiB; a fifth of them closed early.
/// `RD_INTEGRITY_SEED` replaces the fixed seed (to explore; failures print the plan).
fn plans(seed: u64, huge: usize) -> Vec<Plan> {
    let seed = std::env::var("RD_INTEGRITY_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .map_or(seed, |s| s ^ seed);
    let mut rng = StdRng::seed_from_u64(seed);
    (0..STREAMS)
        .map(|i| {
            let len: u64 = if i < huge {
                16 << 20
            } else {
                match rng.random_range(0..100) {
                    0..75 => rng.random_range(0..=64 * 1024),
                    75..92 => rng.random_range(64 * 1024..=1 << 20),
                    _ => rng.random_range(1 << 20..=4 << 20),
                }
            };
            let op = if rng.random_bool(0.7) {
                Op::Download
            } else {
                Op::Upload
            };
            let at = if len > 0 { rng.random_range(0..len) } else { 0 };
            let close = match (len, rng.random_range(0..20)) {
                (0, _) => Close::None,
                (_, 0) => Close::TestDrop(at),
                (_, 1) => Close::TestReset(at),
                (_, 2) => Close::ServiceFin(at),
                (_, 3) => Close::ServiceRst(at),
                _ => Close::None,
            };
            let pace = if i < huge {
                Pace::Stall
            } else {
                match rng.random_range(0..10) {
                    0..5 => Pace::Fast,
                    5..7 => Pace::Yield,
                    7..9 => Pace::Throttle,
                    _ => Pace::Stall,
                }
            };
            Plan {
                id: i as u64,
                seed: rng.random(),
                len,
                op,
                close,
                pace,
                chunk: rng.random_range(1..=128 * 1024),
            }
        })
        .collect()
}

/// Paces the reading side: called after each read with the bytes read so far.
struct Pacer {
    pace: Pace,
    next: u64,
}

impl Pacer {
    fn new(pace: Pace) -> Self {
        let next = match pace {
            Pace::Stall => 256 * 1024,
            _ => 64 * 1024,
        };
        Self { pace, next }
    }

    async fn after(&mut self, total: u64) {
        match self.pace {
            Pace::Fast => {}
            Pace::Yield => tokio::task::yield_now().await,
            Pace::Throttle if total >= self.next => {
                self.next = total + 64 * 1024;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Pace::Stall if total >= self.next => {
                self.next = u64::MAX;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------
// The service on the client's side

/// What the service saw of an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Received {
    len: u64,
    sha: [u8; 32],
    complete: bool,
}

/// What the service saw: uploads by stream id, and connections accepted and finished.
#[derive(Debug, Default)]
struct Seen {
    uploads: HashMap<u64, Received>,
    accepted: usize,
    finished: usize,
}

type Uploads = Arc<Mutex<Seen>>;

async fn spawn_service() -> (SocketAddr, Uploads) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let uploads = Uploads::default();
    let seen = uploads.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            seen.lock().unwrap().accepted += 1;
            let seen = seen.clone();
            tokio::spawn(async move {
                serve_one(tcp, seen.clone()).await;
                seen.lock().unwrap().finished += 1;
            });
        }
    });
    (addr, uploads)
}

async fn serve_one(mut tcp: TcpStream, uploads: Uploads) {
    let mut request = [0u8; REQUEST_LEN];
    if tcp.read_exact(&mut request).await.is_err() {
        return;
    }
    let word = |i: usize| u64::from_le_bytes(request[i..i + 8].try_into().unwrap());
    let (id, seed, len, close_at) = (word(0), word(8), word(16), word(24));
    let (upload, close, pace) = (request[32] == 1, request[33], request[34]);
    let pace = match pace {
        1 => Pace::Yield,
        2 => Pace::Throttle,
        3 => Pace::Stall,
        _ => Pace::Fast,
    };
    // Content bytes to move before misbehaving.
    let stop_at = if close == 0 { len } else { close_at };
    if upload {
        let mut hasher = Sha256::new();
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let mut pacer = Pacer::new(pace);
        while got < stop_at {
            let want = (stop_at - got).min(buf.len() as u64) as usize;
            match tcp.read(&mut buf[..want]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    hasher.update(&buf[..n]);
                    got += n as u64;
                }
            }
            pacer.after(got).await;
        }
        let sha: [u8; 32] = hasher.finalize().into();
        let complete = got == len;
        uploads.lock().unwrap().uploads.insert(
            id,
            Received {
                len: got,
                sha,
                complete,
            },
        );
        if complete {
            let mut reply = got.to_le_bytes().to_vec();
            reply.extend_from_slice(&sha);
            tcp.write_all(&reply).await.ok();
            tcp.shutdown().await.ok();
            return;
        }
    } else {
        let mut hasher = Sha256::new();
        if tcp.write_all(&len.to_le_bytes()).await.is_err() {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        while at < stop_at {
            let n = (stop_at - at).min(buf.len() as u64) as usize;
            fill(seed, at, &mut buf[..n]);
            hasher.update(&buf[..n]);
            if tcp.write_all(&buf[..n]).await.is_err() {
                return;
            }
            at += n as u64;
        }
        if close == 0 {
            let sha: [u8; 32] = hasher.finalize().into();
            tcp.write_all(&sha).await.ok();
            tcp.shutdown().await.ok();
            return;
        }
    }
    match close {
        1 => {
            tcp.shutdown().await.ok();
        }
        2 => {
            tcp.set_zero_linger().ok();
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------------
// The test's end of each stream

/// How a stream ended, as the test saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Every byte, checked against the length and sha256 the other end sent.
    Complete,
    /// Closed early on purpose; what arrived before was checked.
    ClosedEarly,
}

struct Failure(Plan, String);

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.0, self.1)
    }
}

/// Reads until `buf` is full; `Ok(n < buf.len())` means a clean end of stream after `n`.
async fn read_full<R: AsyncRead + Unpin>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).await? {
            0 => break,
            n => got += n,
        }
    }
    Ok(got)
}

async fn run_stream<S>(plan: Plan, mut stream: S) -> Result<Outcome, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + AbortStream,
{
    stream
        .write_all(&plan.request())
        .await
        .map_err(|e| format!("writing the request: {e}"))?;
    match plan.op {
        Op::Download => download(plan, stream).await,
        Op::Upload => upload(plan, stream).await,
    }
}

/// Closing on purpose: dropping finishes the stream, `abort` resets it.
trait AbortStream {
    fn abort(&self);
}

impl AbortStream for rd_session::TunnelStream {
    fn abort(&self) {
        self.reset("test closes the stream");
    }
}

async fn download<S>(plan: Plan, mut stream: S) -> Result<Outcome, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + AbortStream,
{
    let (test_close_at, service_close_at) = match plan.close {
        Close::TestDrop(at) | Close::TestReset(at) => (Some(at), None),
        Close::ServiceFin(at) | Close::ServiceRst(at) => (None, Some(at)),
        Close::None => (None, None),
    };
    let mut prefix = [0u8; 8];
    match read_full(&mut stream, &mut prefix).await {
        Ok(8) => {}
        Ok(n) if service_close_at.is_some() && matches!(plan.close, Close::ServiceRst(_)) => {
            return Err(format!(
                "a RST must read as an error, not a clean end after {n} prefix bytes"
            ));
        }
        Ok(n) => return Err(format!("clean end after {n} bytes of the length prefix")),
        Err(e) if matches!(plan.close, Close::ServiceRst(_)) => {
            return check_rst(&e, 0, plan);
        }
        Err(e) => return Err(format!("reading the length prefix: {e}")),
    }
    if u64::from_le_bytes(prefix) != plan.len {
        return Err(format!("length prefix {}", u64::from_le_bytes(prefix)));
    }
    let mut hasher = Sha256::new();
    let mut expected = vec![0u8; plan.chunk];
    let mut buf = vec![0u8; plan.chunk];
    let mut got = 0u64;
    let mut pacer = Pacer::new(plan.pace);
    // For a stream closed early, every byte is compared with the content it should be.
    let compare = plan.close != Close::None;
    while got < plan.len {
        if let Some(at) = test_close_at {
            if got >= at {
                if matches!(plan.close, Close::TestReset(_)) {
                    stream.abort();
                }
                drop(stream);
                return Ok(Outcome::ClosedEarly);
            }
        }
        let want = (plan.len - got).min(buf.len() as u64) as usize;
        let want = match test_close_at {
            Some(at) => want.min((at - got) as usize).max(1),
            None => want,
        };
        let n = match stream.read(&mut buf[..want]).await {
            Ok(0) => {
                // A clean end before the announced length: only a service that shut its
                // socket down on purpose, at exactly that point, explains it.
                return match plan.close {
                    Close::ServiceFin(at) if at == got => Ok(Outcome::ClosedEarly),
                    _ => Err(format!(
                        "clean end of stream after {got} of {} bytes: a truncated stream",
                        plan.len
                    )),
                };
            }
            Ok(n) => n,
            Err(e) if matches!(plan.close, Close::ServiceRst(_)) => {
                return check_rst(&e, got, plan);
            }
            Err(e) => return Err(format!("read error after {got} bytes: {e}")),
        };
        if compare {
            fill(plan.seed, got, &mut expected[..n]);
            if buf[..n] != expected[..n] {
                return Err(format!("wrong bytes in {got}..{}", got + n as u64));
            }
        } else {
            hasher.update(&buf[..n]);
        }
        got += n as u64;
        pacer.after(got).await;
    }
    if let Some(at) = service_close_at {
        return Err(format!(
            "the service was to close after {at} bytes, yet all {got} arrived"
        ));
    }
    if let Some(at) = test_close_at {
        return Err(format!("test close at {at} never reached ({got} bytes)"));
    }
    let mut trailer = [0u8; 32];
    match read_full(&mut stream, &mut trailer).await {
        Ok(32) => {}
        Ok(n) => return Err(format!("clean end after {n} bytes of the sha256 trailer")),
        Err(e) => return Err(format!("reading the sha256 trailer: {e}")),
    }
    let sha: [u8; 32] = hasher.finalize().into();
    if sha != trailer {
        return Err(format!("sha256 mismatch over {got} bytes"));
    }
    // And then the end: nothing more, and a clean EOF.
    match stream.read(&mut buf[..1]).await {
        Ok(0) => Ok(Outcome::Complete),
        Ok(_) => Err("bytes after the trailer".into()),
        Err(e) => Err(format!("error instead of EOF after a complete stream: {e}")),
    }
}

/// A service RST must surface as an error after at most the bytes it had sent.
fn check_rst(e: &io::Error, got: u64, plan: Plan) -> Result<Outcome, String> {
    let Close::ServiceRst(at) = plan.close else {
        unreachable!()
    };
    if got > at {
        return Err(format!("{got} bytes arrived, the service sent {at}"));
    }
    if e.kind() != io::ErrorKind::ConnectionReset {
        return Err(format!("a reset read as {:?}: {e}", e.kind()));
    }
    Ok(Outcome::ClosedEarly)
}

async fn upload<S>(plan: Plan, mut stream: S) -> Result<Outcome, String>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + AbortStream,
{
    let mut buf = vec![0u8; plan.chunk];
    let mut sent = 0u64;
    let test_close_at = match plan.close {
        Close::TestDrop(at) | Close::TestReset(at) => Some(at),
        _ => None,
    };
    let service_closes = matches!(plan.close, Close::ServiceFin(_) | Close::ServiceRst(_));
    while sent < plan.len {
        if let Some(at) = test_close_at {
            if sent >= at {
                if matches!(plan.close, Close::TestReset(_)) {
                    stream.abort();
                }
                drop(stream);
                return Ok(Outcome::ClosedEarly);
            }
        }
        let mut n = (plan.len - sent).min(buf.len() as u64) as usize;
        if let Some(at) = test_close_at {
            n = n.min((at - sent) as usize).max(1);
        }
        fill(plan.seed, sent, &mut buf[..n]);
        if let Err(e) = stream.write_all(&buf[..n]).await {
            return if service_closes {
                Ok(Outcome::ClosedEarly)
            } else {
                Err(format!("write error after {sent} bytes: {e}"))
            };
        }
        sent += n as u64;
    }
    if test_close_at.is_some() {
        return Err("test close never reached".into());
    }
    let mut reply = [0u8; 40];
    match read_full(&mut stream, &mut reply).await {
        Ok(40) if !service_closes => {}
        Ok(40) => return Err("a full reply from a service that closed early".into()),
        Ok(_) | Err(_) if service_closes => return Ok(Outcome::ClosedEarly),
        Ok(n) => return Err(format!("clean end after {n} bytes of the reply")),
        Err(e) => return Err(format!("reading the reply: {e}")),
    }
    let len = u64::from_le_bytes(reply[..8].try_into().unwrap());
    if len != plan.len || reply[8..] != content_sha(plan.seed, plan.len) {
        return Err(format!(
            "the service received {len} bytes with another sha256"
        ));
    }
    match stream.read(&mut buf[..1]).await {
        Ok(0) => Ok(Outcome::Complete),
        Ok(_) => Err("bytes after the reply".into()),
        Err(e) => Err(format!("error instead of EOF after a complete upload: {e}")),
    }
}

/// Runs every plan concurrently through `dialer`, then checks the service's view of the
/// uploads the test closed early.
async fn run_all(dialer: rd_server::Dialer, service: SocketAddr, uploads: Uploads, plans: &[Plan]) {
    let mut tasks = Vec::new();
    for &plan in plans {
        let dialer = dialer.clone();
        tasks.push(tokio::spawn(async move {
            let stream = dialer
                .dial("tcp", &service.to_string())
                .await
                .map_err(|e| Failure(plan, format!("dial: {e}")))?;
            run_stream(plan, stream)
                .await
                .map(|outcome| (plan, outcome))
                .map_err(|e| Failure(plan, e))
        }));
    }
    let mut failures = Vec::new();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    let mut bytes = 0u64;
    for task in tasks {
        match tokio::time::timeout(RUN_BOUND, task)
            .await
            .expect("every stream ends in time")
            .unwrap()
        {
            Ok((plan, outcome)) => {
                let key = match (outcome, plan.close) {
                    (Outcome::Complete, Close::None) => {
                        bytes += plan.len;
                        "complete"
                    }
                    (Outcome::Complete, _) => {
                        failures.push(Failure(plan, "complete despite an early close".into()));
                        continue;
                    }
                    (Outcome::ClosedEarly, Close::None) => {
                        failures.push(Failure(plan, "closed early by nobody".into()));
                        continue;
                    }
                    (Outcome::ClosedEarly, Close::TestDrop(_) | Close::TestReset(_)) => {
                        "closed by the test"
                    }
                    (Outcome::ClosedEarly, _) => "closed by the service",
                };
                *counts.entry(key).or_default() += 1;
            }
            Err(f) => failures.push(f),
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} streams failed:\n{failures:#?}",
        failures.len(),
        plans.len()
    );
    eprintln!("{counts:?}, {} MiB checked", bytes >> 20);
    assert!(counts["complete"] >= plans.len() / 2, "{counts:?}");
    assert!(counts["closed by the test"] > 0 && counts["closed by the service"] > 0);

    // Every connection the client dialed to the service ends with its stream.
    wait_until("the service's connections to end", || {
        let seen = uploads.lock().unwrap();
        seen.accepted == plans.len() && seen.finished == seen.accepted
    })
    .await;

    // What the service received of the uploads the test cut: a drop delivers exactly what
    // was written before it (then EOF); a reset at most that (possibly not even the whole
    // request, which a reset discards with the rest of the send queue). Never "complete".
    for plan in plans.iter().filter(|p| p.op == Op::Upload) {
        let (at, exact) = match plan.close {
            Close::TestDrop(at) => (at, true),
            Close::TestReset(at) => (at, false),
            _ => continue,
        };
        let got = uploads.lock().unwrap().uploads.get(&plan.id).cloned();
        let Some(got) = got else {
            assert!(
                !exact,
                "{plan:?}: the service never saw the dropped upload end"
            );
            continue;
        };
        assert!(!got.complete, "{plan:?}: {got:?}");
        assert!(got.len <= at, "{plan:?}: the service got {} bytes", got.len);
        if exact {
            assert_eq!(
                got.len, at,
                "{plan:?}: a dropped stream must deliver what it wrote"
            );
        }
        let mut prefix = vec![0u8; got.len as usize];
        fill(plan.seed, 0, &mut prefix);
        let sha: [u8; 32] = Sha256::digest(&prefix).into();
        assert_eq!(sha, got.sha, "{plan:?}: the received prefix differs");
    }
}

/// Waits until `server` counts no open stream.
async fn assert_no_streams_left(server: &Server) {
    let m = server.metrics().clone();
    wait_until("every stream to be closed", || m.streams.get() == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_through_one_session_are_byte_exact() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let (service, uploads) = spawn_service().await;
    let plans = plans(0x5EED_0001, 2);
    run_all(ts.server.dialer("foo"), service, uploads, &plans).await;
    assert_no_streams_left(&ts.server).await;
    assert!(ts.server.has_session("foo"), "the session must survive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_streams_through_a_peer_hop_are_byte_exact() {
    let (a, b) = peered_pair(ServerBuilder::build).await;
    let _agent = connected_agent(&a, "foo").await;
    let server_b = b.server.clone();
    wait_until("b to learn foo from a", || server_b.has_session("foo")).await;
    assert!(b.server.list_clients().is_empty(), "foo is a's client");

    let (service, uploads) = spawn_service().await;
    let plans = plans(0x5EED_0002, 1);
    run_all(b.server.dialer("foo"), service, uploads, &plans).await;
    assert_no_streams_left(&a.server).await;
    assert_no_streams_left(&b.server).await;
    assert!(b.server.has_session("foo"), "the route must survive");
}
