//! Faults and hostile input against the real binaries on loopback: an rd-client killed
//! (SIGKILL) in the middle of a proxied download, garbage instead of HTTP or websocket
//! frames, slowloris connections and a flood of failed authentications.
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::{Rng, SeedableRng};
use rd_e2e_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a freshly started client may take to register (normally milliseconds).
const CONNECT_BOUND: Duration = Duration::from_secs(15);
/// How long a proxied download may keep going after its client was killed.
const FAIL_BOUND: Duration = Duration::from_secs(2);
/// Content-Length of the endless download: never reached in these tests.
const HUGE: u64 = 1 << 40;

/// A body of `remaining` bytes, produced in 64 KiB chunks as fast as it is read.
struct EndlessBody {
    remaining: u64,
    chunk: Bytes,
}

impl hyper::body::Body for EndlessBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let n = self.remaining.min(self.chunk.len() as u64) as usize;
        self.remaining -= n as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(..n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// An HTTP service on 127.0.0.1:0 (the target on the client's side): `/huge` is a body of
/// [`HUGE`] bytes with its Content-Length, anything else is `hello`.
async fn spawn_service() -> SocketAddr {
    spawn_counted_service().await.0
}

/// [`spawn_service`], also counting its open connections.
async fn spawn_counted_service() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let chunk = Bytes::from((0..64 * 1024).map(|i| (i % 251) as u8).collect::<Vec<_>>());
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let chunk = chunk.clone();
            let open = counter.clone();
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let service = service_fn(move |req: http::Request<Incoming>| {
                    let chunk = chunk.clone();
                    async move {
                        let body = if req.uri().path() == "/huge" {
                            EndlessBody {
                                remaining: HUGE,
                                chunk,
                            }
                            .boxed()
                        } else {
                            Full::new(Bytes::from_static(b"hello"))
                                .map_err(|n| match n {})
                                .boxed()
                        };
                        Ok::<_, Infallible>(http::Response::new(body))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

/// rd-server's /metrics, parsed for one sample.
async fn metric(addr: SocketAddr, name: &str) -> Option<f64> {
    let reply = try_get(addr, "/metrics", Duration::from_secs(5))
        .await
        .ok()?;
    sample(&reply.text(), name)
}

/// Polls /metrics until every `(sample, value)` holds; panics with the last text after `bound`.
async fn wait_metrics(addr: SocketAddr, want: &[(&str, f64)], bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        let text = try_get(addr, "/metrics", Duration::from_secs(5))
            .await
            .map(|r| r.text())
            .unwrap_or_default();
        if want.iter().all(|(k, v)| sample(&text, k) == Some(*v)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "metrics never reached {want:?} within {bound:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls until `fds()` is at most `limit`; panics after `bound`.
async fn wait_fds(server: &Proc, limit: usize, bound: Duration) {
    let deadline = Instant::now() + bound;
    loop {
        let n = server.open_fds();
        if n <= limit {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "rd-server keeps {n} file descriptors open, want at most {limit}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn start_client(server: SocketAddr, id: &str) -> Proc {
    Proc::start(
        "rd-client",
        &["-connect", &format!("ws://{server}/connect"), "-id", id],
    )
}

/// A proxied download of [`HUGE`] bytes from `service` through client `foo`: the task reads
/// 2 MiB, says so, and then (if `resume` is given) stops reading until told to go on.
/// It returns the bytes read and how the body ended.
async fn start_download(
    server: SocketAddr,
    service: SocketAddr,
    resume: Option<tokio::sync::oneshot::Receiver<()>>,
) -> tokio::task::JoinHandle<(u64, Result<(), String>)> {
    let tcp = TcpStream::connect(server).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = http::Request::get(format!("/client/foo/http/{service}/huge"))
        .header(http::header::HOST, server.to_string())
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    let response = tokio::time::timeout(CONNECT_BOUND, sender.send_request(req))
        .await
        .expect("response headers in time")
        .unwrap();
    assert_eq!(response.status(), 200);
    let length: u64 = response.headers()[http::header::CONTENT_LENGTH]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(length, HUGE, "the Content-Length must pass through");

    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let download = tokio::spawn(async move {
        let mut body = response.into_body();
        let mut got = 0u64;
        let mut started = Some(started_tx);
        let mut resume = resume;
        loop {
            match body.frame().await {
                None => return (got, Ok(())),
                Some(Err(e)) => return (got, Err(e.to_string())),
                Some(Ok(frame)) => {
                    got += frame.data_ref().map_or(0, |d| d.len() as u64);
                    if got >= 2 << 20 {
                        if let Some(tx) = started.take() {
                            tx.send(()).ok();
                            if let Some(rx) = resume.take() {
                                rx.await.ok();
                            }
                        }
                    }
                }
            }
        }
    });
    tokio::time::timeout(CONNECT_BOUND, started_rx)
        .await
        .expect("2 MiB of the download in time")
        .unwrap();
    download
}

/// One cycle: an rd-client connects, a proxied download of [`HUGE`] bytes starts, the client
/// is killed once 2 MiB arrived; the download must fail within [`FAIL_BOUND`] and the server
/// must end up with no session and no stream. With `stalled`, the downloader stops reading
/// first, until the server has paused the stream, and reads on only after the kill.
async fn download_then_kill_client(server: SocketAddr, service: SocketAddr, stalled: bool) {
    let mut client = start_client(server, "foo");
    wait_metrics(server, &[("rd_sessions", 1.0)], CONNECT_BOUND).await;
    let length = HUGE;
    let (resume_tx, resume_rx) = tokio::sync::oneshot::channel();
    let download = start_download(server, service, stalled.then_some(resume_rx)).await;
    if stalled {
        wait_metrics(
            server,
            &[("rd_streams", 1.0), ("rd_streams_paused_by_us", 1.0)],
            CONNECT_BOUND,
        )
        .await;
    }

    let killed = Instant::now();
    client.kill();
    resume_tx.send(()).ok();
    let (got, end) = tokio::time::timeout(FAIL_BOUND, download)
        .await
        .unwrap_or_else(|_| panic!("the download still runs {FAIL_BOUND:?} after the kill"))
        .unwrap();
    eprintln!(
        "download ended {:?} after the kill at {got} bytes: {end:?}",
        killed.elapsed()
    );
    assert!(got < length, "{got} of {length} bytes");
    assert!(
        end.is_err(),
        "a download cut at {got} of {length} bytes ended cleanly after {:?}",
        killed.elapsed()
    );
    wait_metrics(
        server,
        &[("rd_sessions", 0.0), ("rd_streams", 0.0)],
        Duration::from_secs(5),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_killed_mid_download_fails_the_download_and_leaks_nothing() {
    let service = spawn_service().await;
    let (server_proc, server) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);

    // A first cycle warms up whatever the server allocates once; the descriptors it holds
    // afterwards are the baseline.
    download_then_kill_client(server, service, false).await;
    let baseline = server_proc.open_fds();
    for stalled in [true, false, true] {
        download_then_kill_client(server, service, stalled).await;
    }
    // Sockets of the last requests close asynchronously: poll.
    wait_fds(&server_proc, baseline + 2, Duration::from_secs(5)).await;
    // Without --agent-tokens the series of `foo` went with its last session; the
    // unlabelled counter keeps the count.
    assert_eq!(metric(server, "rd_sessions_closed_total").await, Some(4.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downloader_gone_mid_download_frees_the_stream_on_both_sides() {
    let (service, open) = spawn_counted_service().await;
    let (_server_proc, server) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let _client = start_client(server, "foo");
    wait_metrics(server, &[("rd_sessions", 1.0)], CONNECT_BOUND).await;

    for stalled in [false, true] {
        let (resume_tx, resume_rx) = tokio::sync::oneshot::channel::<()>();
        let download = start_download(server, service, stalled.then_some(resume_rx)).await;
        if stalled {
            wait_metrics(
                server,
                &[("rd_streams", 1.0), ("rd_streams_paused_by_us", 1.0)],
                CONNECT_BOUND,
            )
            .await;
        }
        assert_eq!(open.load(Ordering::SeqCst), 1);
        // The downloader goes away: its connection to rd-server closes.
        download.abort();
        drop(resume_tx);
        // rd-server drops the tunnel stream, rd-client closes its connection to the target.
        wait_metrics(
            server,
            &[("rd_streams", 0.0), ("rd_sessions", 1.0)],
            Duration::from_secs(5),
        )
        .await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while open.load(Ordering::SeqCst) != 0 {
            assert!(
                Instant::now() < deadline,
                "the client keeps its connection to the target open"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    good_request_as(server, service, "foo").await;
}

/// A request through the good client's tunnel, which must succeed within 3 s.
async fn good_request(server: SocketAddr, service: SocketAddr) {
    good_request_as(server, service, "good").await;
}

async fn good_request_as(server: SocketAddr, service: SocketAddr, client: &str) {
    let started = Instant::now();
    let reply = try_get(
        server,
        &format!("/client/{client}/http/{service}/hello"),
        Duration::from_secs(3),
    )
    .await
    .unwrap_or_else(|e| panic!("the good client's request failed: {e}"));
    assert_eq!(
        (reply.status, reply.text().as_str()),
        (200, "hello"),
        "after {:?}",
        started.elapsed()
    );
}

/// Reads until the peer closes; panics if that takes longer than `bound`. Returns what was
/// read.
async fn read_until_closed(tcp: &mut TcpStream, bound: Duration) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let read = async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(bound, read)
        .await
        .expect("the server must close the connection");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_instead_of_http_or_websocket_frames_is_cut_off() {
    let service = spawn_service().await;
    let (_server_proc, server) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let _client = start_client(server, "good");
    wait_metrics(server, &[("rd_sessions", 1.0)], CONNECT_BOUND).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);

    // Random bytes instead of a request: a 400 at most, then the connection closes.
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(server).await.unwrap();
        let garbage: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
        // The server may close before it has read everything.
        tcp.write_all(&garbage).await.ok();
        let answer = read_until_closed(&mut tcp, Duration::from_secs(5)).await;
        assert!(
            answer.is_empty() || answer.starts_with(b"HTTP/1.1 400"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        good_request(server, service).await;
    }

    // A valid upgrade, then garbage instead of websocket frames (0xFF: reserved bits and
    // opcode, and no mask): the session ends and the server closes the connection.
    let mut tcp = TcpStream::connect(server).await.unwrap();
    let upgrade = format!(
        "GET /connect HTTP/1.1\r\nHost: {server}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-Tunnel-ID: mallory\r\n\r\n"
    );
    tcp.write_all(upgrade.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut byte))
            .await
            .expect("the upgrade answer")
            .unwrap();
        assert_eq!(n, 1, "closed during the upgrade answer");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    wait_metrics(server, &[("rd_sessions", 2.0)], Duration::from_secs(5)).await;
    let mut garbage: Vec<u8> = (0..4096).map(|_| rng.random()).collect();
    garbage[0] = 0xFF;
    tcp.write_all(&garbage).await.ok();
    read_until_closed(&mut tcp, Duration::from_secs(5)).await;
    wait_metrics(
        server,
        &[("rd_sessions", 1.0), ("rd_sessions_closed_total", 1.0)],
        Duration::from_secs(5),
    )
    .await;
    good_request(server, service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_do_not_starve_a_good_client() {
    let service = spawn_service().await;
    let (server_proc, server) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let _client = start_client(server, "good");
    wait_metrics(server, &[("rd_sessions", 1.0)], CONNECT_BOUND).await;
    good_request(server, service).await;
    let baseline = server_proc.open_fds();

    // 50 connections sending an upgrade request one byte per 100 ms, from one task.
    const SLOW: usize = 50;
    let mut slow = Vec::new();
    for _ in 0..SLOW {
        slow.push(TcpStream::connect(server).await.unwrap());
    }
    let head = format!(
        "GET /connect HTTP/1.1\r\nHost: {server}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         X-Tunnel-ID: slow\r\n"
    )
    .into_bytes();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let dripped = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let dripped2 = dripped.clone();
    let dripping = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut sent = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = &mut stop_rx => return (slow, sent),
            }
            let byte = [head[sent % head.len()]];
            for tcp in &mut slow {
                tcp.write_all(&byte)
                    .await
                    .expect("the server cut a slow connection before its header timeout");
            }
            sent += 1;
            dripped2.store(sent, std::sync::atomic::Ordering::Relaxed);
        }
    });
    // (The baseline may still count the last request's socket.)
    wait_fds_at_least(&server_proc, baseline + SLOW - 2).await;

    // The good client is served throughout, for as long as the slow connections take to
    // send 10 bytes each (about a second).
    let started = Instant::now();
    let mut served = 0;
    while dripped.load(std::sync::atomic::Ordering::Relaxed) < 10 || served < 10 {
        good_request(server, service).await;
        let health = try_get(server, "/healthz", Duration::from_secs(3))
            .await
            .unwrap();
        assert_eq!(health.status, 200);
        served += 1;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the drip stalled"
        );
    }
    stop_tx.send(()).unwrap();
    let (slow, sent) = bounded_join(dripping).await;
    assert!(sent >= 10, "the slow connections sent {sent} bytes");
    assert_eq!(metric(server, "rd_sessions").await, Some(1.0));
    eprintln!(
        "{served} requests and health checks alongside {SLOW} slowloris connections in {:?}",
        started.elapsed()
    );

    // Once the slow connections go away, so do their descriptors.
    drop(slow);
    wait_fds(&server_proc, baseline + 2, Duration::from_secs(5)).await;
}

async fn wait_fds_at_least(server: &Proc, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.open_fds() < n {
        assert!(
            Instant::now() < deadline,
            "rd-server never accepted the slow connections ({} fds, want {n})",
            server.open_fds()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn bounded_join<T>(task: tokio::task::JoinHandle<T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("task to finish")
        .unwrap()
}

/// One upgrade request without `X-Tunnel-ID` on a fresh connection; returns the status line.
async fn unauthenticated_upgrade(server: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(server).await.unwrap();
    let req = format!(
        "GET /connect HTTP/1.1\r\nHost: {server}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(2).any(|w| w == b"\r\n") {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed without an answer");
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_failed_authentications_cost_no_memory_and_no_service() {
    let service = spawn_service().await;
    let (server_proc, server) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let _client = start_client(server, "good");
    wait_metrics(server, &[("rd_sessions", 1.0)], CONNECT_BOUND).await;

    // Warm-up: whatever is allocated once per worker thread or pool.
    const WARMUP: usize = 50;
    const FAILURES: usize = 1000;
    const WORKERS: usize = 4;
    for _ in 0..WARMUP {
        assert_eq!(
            unauthenticated_upgrade(server).await,
            "HTTP/1.1 401 Unauthorized"
        );
    }
    good_request(server, service).await;
    let rss_before = server_proc.rss_kib();

    let flood = async {
        let mut workers = Vec::new();
        for _ in 0..WORKERS {
            workers.push(tokio::spawn(async move {
                for _ in 0..FAILURES / WORKERS {
                    let status = unauthenticated_upgrade(server).await;
                    assert_eq!(status, "HTTP/1.1 401 Unauthorized");
                }
            }));
        }
        for w in workers {
            w.await.unwrap();
        }
    };
    // The good client keeps working while the flood runs.
    let good = async {
        let mut served = 0;
        for _ in 0..10 {
            good_request(server, service).await;
            served += 1;
        }
        served
    };
    let ((), served) =
        tokio::time::timeout(Duration::from_secs(60), async { tokio::join!(flood, good) })
            .await
            .expect("the flood and the good requests in time");
    assert_eq!(served, 10);
    good_request(server, service).await;

    assert_eq!(
        metric(server, "rd_handshake_rejects{reason=\"unauthorized\"}").await,
        Some((WARMUP + FAILURES) as f64)
    );
    assert_eq!(metric(server, "rd_sessions").await, Some(1.0));
    let rss_after = server_proc.rss_kib();
    eprintln!("rd-server VmRSS: {rss_before} KiB before {FAILURES} failed authentications, {rss_after} KiB after");
    assert!(
        rss_after <= rss_before + 8 * 1024,
        "VmRSS grew from {rss_before} KiB to {rss_after} KiB"
    );
}
