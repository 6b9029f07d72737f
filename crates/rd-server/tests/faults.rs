//! Link faults between an [`rd_client::Client`] and a [`Server`], injected by a TCP relay
//! the test controls: a link that goes silent without a FIN (only keepalive can notice),
//! and a link reset under both ends. Open streams in both directions must fail with an
//! error (never hang, never end as if complete), both sessions must end, and the client
//! must redial and serve again.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rd_proto::{Config, SessionEnd, Target};
use rd_server::{Server, TunnelIdHeader};
use rd_session::{BoxedIo, ConnectRefused, SessionHandle, TunnelStream};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// How one relayed connection is told to misbehave.
#[derive(Clone, Default)]
struct ConnControl {
    /// Stop forwarding both ways and keep both sockets open (no FIN, no RST).
    freeze: CancellationToken,
    /// Close both sockets with a RST.
    reset: CancellationToken,
}

/// A TCP relay on 127.0.0.1:0 to `upstream`. Connections accepted after a fault forward
/// normally again.
struct Relay {
    addr: SocketAddr,
    conns: Arc<Mutex<Vec<ConnControl>>>,
    stop: CancellationToken,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let conns = Arc::new(Mutex::new(Vec::<ConnControl>::new()));
        let stop = CancellationToken::new();
        let (list, stop2) = (conns.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    () = stop2.cancelled() => return,
                };
                let Ok((down, _)) = accepted else { return };
                let Ok(up) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let control = ConnControl::default();
                list.lock().unwrap().push(control.clone());
                tokio::spawn(forward(down, up, control, stop2.clone()));
            }
        });
        Self { addr, conns, stop }
    }

    fn ws_url(&self) -> String {
        format!("ws://{}/connect", self.addr)
    }

    /// Connections accepted so far.
    fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Every current connection stops forwarding, keeping its sockets open.
    fn freeze_all(&self) {
        for c in self.conns.lock().unwrap().iter() {
            c.freeze.cancel();
        }
    }

    /// Every current connection is reset on both sides.
    fn reset_all(&self) {
        for c in self.conns.lock().unwrap().iter() {
            c.reset.cancel();
        }
    }
}

async fn copy_one_way<R, W>(mut from: R, mut to: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        }
    }
    to.shutdown().await.ok();
}

async fn forward(
    mut a: TcpStream,
    mut b: TcpStream,
    control: ConnControl,
    stop: CancellationToken,
) {
    enum Fault {
        None,
        Freeze,
        Reset,
    }
    let fault = {
        let (ar, aw) = a.split();
        let (br, bw) = b.split();
        tokio::select! {
            _ = async { tokio::join!(copy_one_way(ar, bw), copy_one_way(br, aw)) } => Fault::None,
            () = control.freeze.cancelled() => Fault::Freeze,
            () = control.reset.cancelled() => Fault::Reset,
            () = stop.cancelled() => Fault::None,
        }
    };
    let reset = match fault {
        Fault::None => false,
        Fault::Reset => true,
        // A black hole: nothing moves, nothing closes, until the test ends (or resets it).
        Fault::Freeze => tokio::select! {
            () = control.reset.cancelled() => true,
            () = stop.cancelled() => false,
        },
    };
    if reset {
        a.set_zero_linger().ok();
        b.set_zero_linger().ok();
    }
}

/// Go's keepalive scaled down: a ping every 100 ms, dead after 1 s without one.
fn fast_keepalive() -> Config {
    let mut config = Config::default();
    config.ping_interval = Duration::from_millis(100);
    config.keepalive_timeout = Duration::from_secs(1);
    config
}

/// A server with fast keepalive that serves client-initiated Connects to `echo`.
async fn keepalive_server(echo: SocketAddr) -> TestServer {
    let server = Server::builder(TunnelIdHeader)
        .session_config(fast_keepalive())
        .client_connect(move |target: Target| async move {
            let tcp = TcpStream::connect(echo)
                .await
                .map_err(|e| ConnectRefused::dial_failed(&target, &e))?;
            Ok::<BoxedIo, ConnectRefused>(Box::new(tcp))
        })
        .build();
    serve(server).await
}

/// A client through `relay` as `foo` with fast keepalive; each session's handle is sent on
/// the returned channel.
fn relayed_client(relay: &Relay) -> (RunningClient, mpsc::UnboundedReceiver<SessionHandle>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let client = agent(&relay.ws_url(), "foo")
        .session_config(fast_keepalive())
        .on_connect(move |session, _ended| {
            tx.send(session).ok();
            async { Ok::<(), rd_client::BoxError>(()) }
        })
        .build();
    (RunningClient::spawn(client), rx)
}

/// Both directions of open streams: one the server dialed through the client and one the
/// client dialed through the server, each to an echo service and checked once.
async fn open_streams(
    server: &Server,
    session: &SessionHandle,
    echo: SocketAddr,
) -> (TunnelStream, TunnelStream) {
    let mut down = server
        .dialer("foo")
        .dial("tcp", &echo.to_string())
        .await
        .unwrap();
    let mut up = session.dial_addr("tcp", &echo.to_string()).unwrap();
    for stream in [&mut down, &mut up] {
        stream.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 7];
        bounded("echo on an open stream", stream.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf, b"hi:ping");
    }
    (down, up)
}

/// Reads `stream` until it ends; it must end with an error within `bound` of `since`.
async fn assert_fails(what: &str, stream: &mut TunnelStream, since: Instant, bound: Duration) {
    let mut sink = Vec::new();
    let read = tokio::time::timeout(bound, stream.read_to_end(&mut sink))
        .await
        .unwrap_or_else(|_| panic!("{what}: still open {:?} after the fault", since.elapsed()));
    let err = read.expect_err(&format!(
        "{what}: a stream cut by a dead link ended cleanly after {} bytes",
        sink.len()
    ));
    assert!(
        matches!(
            err.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected
        ),
        "{what}: {err:?}"
    );
    assert!(
        since.elapsed() <= bound,
        "{what}: failed only after {:?}",
        since.elapsed()
    );
}

/// Polls `cond` every 10 ms; panics unless it holds within `bound`.
async fn within(what: &str, bound: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !cond() {
        assert!(Instant::now() < deadline, "not within {bound:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_link_without_fin_is_found_by_keepalive_and_the_client_redials() {
    let echo = spawn_echo(b"hi:").await;
    let ts = keepalive_server(echo).await;
    let relay = Relay::start(ts.addr).await;
    let (_client, mut sessions) = relayed_client(&relay);
    let first = bounded("the first session", sessions.recv()).await.unwrap();
    let server = ts.server.clone();
    wait_until("the server's session", || server.has_session("foo")).await;
    let (mut down, mut up) = open_streams(&ts.server, &first, echo).await;

    // The link goes silent both ways; no FIN, no RST: only the missing pings tell.
    relay.freeze_all();
    let frozen = Instant::now();
    let bound = Duration::from_secs(3);
    // (The client may already have redialed: count removals rather than wait for none.)
    within("the server drops the session", bound, || {
        sample(
            &server.encode_metrics(),
            "session_server_total_remove_websocket_session{clientkey=\"foo\",peer=\"false\"}",
        ) == Some(1.0)
    })
    .await;
    let end = tokio::time::timeout(bound, first.closed())
        .await
        .expect("the client's session must end within 3 s");
    assert!(
        matches!(end, SessionEnd::KeepaliveTimeout(t) if t == Duration::from_secs(1)),
        "{end:?}"
    );
    assert_fails("server-dialed stream", &mut down, frozen, bound).await;
    assert_fails("client-dialed stream", &mut up, frozen, bound).await;

    // The client redials through the relay, which forwards new connections again.
    let second = bounded("the redialed session", sessions.recv())
        .await
        .unwrap();
    assert!(!second.same_session(&first));
    wait_until("the server's new session", || server.has_session("foo")).await;
    assert_eq!(echo_through(&ts.server, "foo", echo, 3).await, "hi:ping");
    let (_down, _up) = open_streams(&ts.server, &second, echo).await;
    assert_eq!(relay.connections(), 2);
    assert_eq!(ts.server.list_clients(), vec!["foo".to_owned()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_reset_fails_open_streams_at_once_and_the_client_redials() {
    let echo = spawn_echo(b"hi:").await;
    let ts = keepalive_server(echo).await;
    let relay = Relay::start(ts.addr).await;
    let (_client, mut sessions) = relayed_client(&relay);
    let first = bounded("the first session", sessions.recv()).await.unwrap();
    let server = ts.server.clone();
    wait_until("the server's session", || server.has_session("foo")).await;
    let (mut down, mut up) = open_streams(&ts.server, &first, echo).await;

    // Both ends see a RST, as when the machine on the other side dies: no keepalive needed.
    relay.reset_all();
    let reset = Instant::now();
    let bound = Duration::from_millis(900);
    assert_fails("server-dialed stream", &mut down, reset, bound).await;
    assert_fails("client-dialed stream", &mut up, reset, bound).await;
    let end = tokio::time::timeout(bound, first.closed())
        .await
        .expect("the client's session must end at once");
    assert!(matches!(end, SessionEnd::Transport(_)), "{end:?}");

    let second = bounded("the redialed session", sessions.recv())
        .await
        .unwrap();
    assert!(!second.same_session(&first));
    within("the server's new session only", BOUND, || {
        server.list_clients() == vec!["foo".to_owned()] && ts.server.metrics().sessions.get() == 1
    })
    .await;
    assert_eq!(echo_through(&ts.server, "foo", echo, 3).await, "hi:ping");
    assert_eq!(relay.connections(), 2);
}

/// An echo service (greeting `hi:`) counting its open connections.
async fn counted_echo() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let open = counter.clone();
            open.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if tcp.write_all(b"hi:").await.is_ok() {
                    let (mut r, mut w) = tcp.split();
                    tokio::io::copy(&mut r, &mut w).await.ok();
                }
                open.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    (addr, open)
}

/// A stream from `server` to `echo` on client `foo`, checked once.
async fn echo_stream(server: &Server, echo: SocketAddr) -> TunnelStream {
    let mut stream = server
        .dialer("foo")
        .dial("tcp", &echo.to_string())
        .await
        .unwrap();
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 7];
    bounded("echo through the peer hop", stream.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"hi:ping");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_hop_streams_fail_when_either_leg_dies_and_routes_come_back() {
    use std::sync::atomic::Ordering;
    let (echo, open) = counted_echo().await;
    let (a, b) = peered_pair(|b| b.session_config(fast_keepalive()).build()).await;
    let relay = Relay::start(a.addr).await;
    let (_client, mut sessions) = relayed_client(&relay);
    bounded("the client's session", sessions.recv())
        .await
        .unwrap();
    let server_b = b.server.clone();
    wait_until("b to learn foo from a", || server_b.has_session("foo")).await;
    let bound = Duration::from_secs(1);

    // The client's leg dies (reset): b's stream through a fails, b forgets foo.
    let mut via_b = echo_stream(&b.server, echo).await;
    relay.reset_all();
    let cut = Instant::now();
    assert_fails(
        "stream via the peer, client leg cut",
        &mut via_b,
        cut,
        bound,
    )
    .await;
    drop(via_b);
    bounded("the redialed session", sessions.recv())
        .await
        .unwrap();
    wait_until("b to learn foo again", || server_b.has_session("foo")).await;
    let mut via_b = echo_stream(&b.server, echo).await;

    // The peer leg dies (both links stopped): b's stream fails, and the connection on the
    // client's side to the target is closed too.
    a.server.remove_peer("b");
    b.server.remove_peer("a");
    let cut = Instant::now();
    assert_fails("stream via the peer, peer leg cut", &mut via_b, cut, bound).await;
    wait_until("b to forget foo", || !server_b.has_session("foo")).await;
    within("the target's connections to close", bound, || {
        open.load(Ordering::SeqCst) == 0
    })
    .await;

    // The links come back, and the route with them.
    b.server.add_peer(a.ws_url(), "a", "tok");
    a.server.add_peer(b.ws_url(), "b", "tok");
    wait_until("b to learn foo once more", || server_b.has_session("foo")).await;
    let _via_b = echo_stream(&b.server, echo).await;
    assert_eq!(open.load(Ordering::SeqCst), 1);
    assert_eq!(a.server.list_clients(), vec!["foo".to_owned()]);
}

/// A service that sends `len` bytes on every connection, then closes it.
async fn producer(len: usize) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                let mut sent = 0;
                while sent < len {
                    let n = chunk.len().min(len - sent);
                    if tcp.write_all(&chunk[..n]).await.is_err() {
                        return;
                    }
                    sent += n;
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_that_stall_the_whole_session_do_not_get_it_killed_by_keepalive() {
    // Readers that leave more than `session_receive_ceiling` unread make the server stop
    // reading the websocket (the last resort), pings included. That is our own doing, not a
    // dead peer: the session must survive it, however long it lasts. With Pause/Resume and
    // a ceiling at Go's pause mark, one paused stream reaches it.
    let log = capture_log();
    let mut config = fast_keepalive();
    config.session_receive_budget = 2 << 20;
    config.session_receive_ceiling = 2 << 20;
    // Go's fixed 2 MiB mark (no adaptation), so that the first paused stream reaches the
    // ceiling whatever order the three streams' data arrives in.
    config.pause_floor = config.high_watermark;
    let ts = serve(
        Server::builder(TunnelIdHeader)
            .session_config(config.clone())
            .build(),
    )
    .await;
    let (tx, mut sessions) = mpsc::unbounded_channel();
    let client = agent(&ts.ws_url(), "foo")
        .session_config(config)
        .extensions(rd_session::Extensions::NONE)
        .on_connect(move |session, _ended| {
            tx.send(session).ok();
            async { Ok::<(), rd_client::BoxError>(()) }
        })
        .build();
    let _running = RunningClient::spawn(client);
    let first = bounded("the session", sessions.recv()).await.unwrap();
    let server = ts.server.clone();
    wait_until("the server's session", || server.has_session("foo")).await;

    const LEN: usize = 8 << 20;
    let service = producer(LEN).await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        streams.push(
            ts.server
                .dialer("foo")
                .dial("tcp", &service.to_string())
                .await
                .unwrap(),
        );
    }
    // The paused streams hold the ceiling: the server stops reading.
    wait_until("the server to buffer up to its ceiling", || {
        let m = server.encode_metrics();
        sample(&m, "rd_buffered_bytes").is_some_and(|b| b >= (2 << 20) as f64)
    })
    .await;
    // The log says so, naming the session (rd-server keeps no span per session at info).
    wait_until("the stall warning", || {
        log.text().lines().any(|l| {
            l.contains("WARN")
                && l.contains("session stops reading")
                && l.contains("client_key=foo")
        })
    })
    .await;
    // Two keepalive timeouts of not reading.
    let ended = tokio::time::timeout(Duration::from_secs(2), first.closed()).await;
    assert!(
        ended.is_err(),
        "the session was killed while its own readers stalled: {ended:?}"
    );
    // The readers catch up (together: two stalled streams alone hold the session's pause
    // threshold here, so reading one at a time would wait on the others by design).
    let reads = streams.into_iter().map(|mut stream| {
        tokio::spawn(async move {
            let mut got = Vec::new();
            stream.read_to_end(&mut got).await.map(|_| got.len())
        })
    });
    for (i, read) in reads.collect::<Vec<_>>().into_iter().enumerate() {
        let len = bounded("reading a stalled stream", read)
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
        assert_eq!(len, LEN, "stream {i}");
    }
    assert!(first.end().is_none());
    assert!(
        sessions.try_recv().is_err(),
        "the client must not have redialed"
    );
    wait_until("the all-clear in the log", || {
        log.text()
            .lines()
            .any(|l| l.contains("session reads again") && l.contains("client_key=foo"))
    })
    .await;
}

/// Sends this process's log to a buffer (nextest runs each test in a process of its own).
fn capture_log() -> CapturedLog {
    let log = CapturedLog::default();
    tracing::subscriber::set_global_default(log.subscriber()).expect("no other subscriber");
    log
}

/// A local connection that always has data to read and takes every write: a target that
/// never makes its pipe wait.
struct Endless;

impl AsyncRead for Endless {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        let n = buf.remaining();
        buf.put_slice(&vec![0x5a; n]);
        std::task::Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Endless {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::task::Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_client_honours_pause_before_the_stream_cap() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    // The client on a runtime of its own, with a target that is never idle, so its
    // runtime is always busy.
    let url = ts.ws_url();
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    let client_thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Pause/Resume: what this test is about (a credit sender cannot overshoot).
        let client = agent(&url, "foo")
            .extensions(rd_session::Extensions::NONE)
            .local_dialer(|_: &Target| async { Ok::<BoxedIo, io::Error>(Box::new(Endless)) })
            .build();
        rt.block_on(client.run(stop));
    });
    let server = ts.server.clone();
    wait_until("the session", || server.has_session("foo")).await;

    let mut stream = server
        .dialer("foo")
        .dial("tcp", "127.0.0.1:1")
        .await
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    bounded("the first MiB", stream.read_exact(&mut buf))
        .await
        .unwrap();
    // Stop reading until the server has paused the stream, then for a while longer:
    // whatever the client sent after the Pause must stay below the 16 MiB cap, or the
    // server resets the stream as one whose peer ignored Pause.
    wait_until("the stream to be paused", || {
        sample(&server.encode_metrics(), "rd_streams_paused_by_us") == Some(1.0)
    })
    .await;
    let watched = Instant::now();
    let mut most = 0.0f64;
    while watched.elapsed() < Duration::from_millis(300) {
        let m = server.encode_metrics();
        most = most.max(sample(&m, "rd_buffered_bytes").unwrap_or(0.0));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(most < (16 << 20) as f64, "{most} bytes unread");
    eprintln!(
        "at most {:.1} MiB unread after the pause",
        most / f64::from(1 << 20)
    );
    for _ in 0..32 {
        bounded("reading on after the pause", stream.read_exact(&mut buf))
            .await
            .unwrap();
    }
    cancel.cancel();
    client_thread.join().unwrap();
}

/// The answer timeout scaled down: Go's 60 s keepalive timeout stays, but both ends ping
/// every 100 ms (the server only when it heard nothing for a tick) and give up on a peer that
/// answered before and then is silent for 500 ms.
fn fast_answer_timeout() -> Config {
    let mut config = Config::default();
    config.ping_interval = Duration::from_millis(100);
    config.server_ping_after = Some(Duration::from_millis(100));
    config.answer_timeout = Some(Duration::from_millis(500));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_stops_forwarding_is_found_by_both_ends_within_the_answer_timeout() {
    let echo = spawn_echo(b"hi:").await;
    let server = Server::builder(TunnelIdHeader)
        .session_config(fast_answer_timeout())
        .build();
    let ts = serve(server).await;
    let relay = Relay::start(ts.addr).await;
    let (tx, mut sessions) = mpsc::unbounded_channel();
    let client = agent(&relay.ws_url(), "foo")
        .session_config(fast_answer_timeout())
        .on_connect(move |session, _ended| {
            tx.send(session).ok();
            async { Ok::<(), rd_client::BoxError>(()) }
        })
        .build();
    let _client = RunningClient::spawn(client);
    let first = bounded("the first session", sessions.recv()).await.unwrap();
    let server = ts.server.clone();
    wait_until("the server's session", || server.has_session("foo")).await;
    let mut down = server
        .dialer("foo")
        .dial("tcp", &echo.to_string())
        .await
        .unwrap();
    down.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 7];
    bounded("echo", down.read_exact(&mut buf)).await.unwrap();

    // The answer timeout applies once each end has seen the other take part in keepalive:
    // a pong at the client means its ping reached the server first.
    within("keepalive exchanged", BOUND, || {
        first.stats().keepalive_seen
    })
    .await;
    relay.freeze_all();
    let frozen = Instant::now();
    // Far below the 60 s keepalive timeout: only the answer timeout can end them in time.
    let bound = Duration::from_secs(5);
    let end = tokio::time::timeout(bound, first.closed())
        .await
        .expect("the client's session must end within 5 s");
    assert_eq!(end, SessionEnd::Unresponsive(Duration::from_millis(500)));
    within(
        "the server drops the session as unresponsive",
        bound,
        || {
            sample(
                &server.encode_metrics(),
                "rd_sessions_ended{reason=\"unresponsive\"}",
            ) == Some(1.0)
        },
    )
    .await;
    assert_fails("server-dialed stream", &mut down, frozen, bound).await;
    // The client comes back through the relay, which forwards new connections again.
    let second = bounded("the redialed session", sessions.recv())
        .await
        .unwrap();
    assert!(!second.same_session(&first));
    assert_eq!(echo_through(&ts.server, "foo", echo, 3).await, "hi:ping");
}
