//! Isolation between streams with the real binaries (issue 10): downloads whose readers stop
//! (sockets with a 16 KiB receive buffer that are not read) must not stall the session.
//! Fresh requests through the same client all succeed, a large download beside them
//! completes byte-exact, and when the readers resume every stalled download completes
//! byte-exact. Run with rd's credit extension (rd-client's default) and with Go's
//! Pause/Resume (`--flow-control pause`, what a Go peer speaks).
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use rd_e2e_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

// 40 readers paused at Go's 2 MiB each would exceed the 64 MiB at which rd's sessions used
// to stop reading altogether.
const STALLED: usize = 40;
const STALL_FILE: usize = 8 << 20;
const LARGE_FILE: usize = 16 << 20;
/// Bound on anything that should take milliseconds, to turn a stall into a failure.
const BOUND: Duration = Duration::from_secs(30);

fn content(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u64)
                .wrapping_mul(2654435761)
                .rotate_left(u32::from(seed)) as u8
        })
        .collect()
}

/// A GET through the tunnel whose reader then reads nothing.
async fn stalled_download(server: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = socket.connect(server).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    stream
}

/// The body of a `Connection: close` response read to its end.
async fn read_body(mut stream: TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut raw))
        .await
        .expect("the resumed download finishes in time")
        .unwrap();
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a response head");
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let body = &raw[head_end + 4..];
    if head.contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_vec()
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line]).unwrap().trim(), 16).unwrap();
        data = &data[line + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

async fn metrics(server: SocketAddr) -> String {
    try_get(server, "/metrics", BOUND).await.unwrap().text()
}

async fn stalled_readers_do_not_stall_the_session(flow_control: &str) {
    let dir = TempDir::new("isolation");
    let stall = content(STALL_FILE, 3);
    let large = content(LARGE_FILE, 5);
    std::fs::write(dir.path().join("stall.bin"), &stall).unwrap();
    std::fs::write(dir.path().join("large.bin"), &large).unwrap();
    std::fs::write(dir.path().join("small.txt"), b"fresh").unwrap();
    let (_dummy, dummy) = start_dummy(dir.path());
    let (_server_proc, server) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let connect = format!("ws://{server}/connect");
    let _client = Proc::start(
        "rd-client",
        &[
            "-connect",
            &connect,
            "-id",
            "foo",
            "--flow-control",
            flow_control,
        ],
    );
    let prefix = format!("/client/foo/http/{dummy}");
    poll_get(server, &format!("{prefix}/small.txt"), BOUND, |r| {
        r.status == 200
    })
    .await;

    let mut stalled = Vec::new();
    for _ in 0..STALLED {
        stalled.push(stalled_download(server, &format!("{prefix}/stall.bin")).await);
    }
    // Every stalled download is held back by flow control: the state the other streams
    // must not notice.
    let deadline = tokio::time::Instant::now() + BOUND;
    loop {
        let m = metrics(server).await;
        let held = sample(&m, "rd_streams_paused_by_us").unwrap_or(0.0);
        if held >= STALLED as f64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {held} of {STALLED} stalled streams held back:\n{m}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A large download and fresh requests beside them.
    let large_path = format!("{prefix}/large.bin");
    let download = tokio::spawn(async move { try_get(server, &large_path, BOUND).await });
    for i in 0..20 {
        let reply = try_get(
            server,
            &format!("{prefix}/small.txt"),
            Duration::from_secs(5),
        )
        .await
        .unwrap_or_else(|e| panic!("fresh request {i} beside stalled readers: {e}"));
        assert_eq!((reply.status, reply.text().as_str()), (200, "fresh"));
    }
    let reply = download.await.unwrap().expect("the large download");
    assert_eq!(reply.status, 200);
    assert_eq!(sha256_hex(&reply.body), sha256_hex(&large));

    let m = metrics(server).await;
    assert_eq!(
        sample(&m, "rd_limit_exceeded{limit=\"session_receive_ceiling\"}"),
        None,
        "the session stopped reading:\n{m}"
    );

    // The readers resume: every stalled download completes, byte for byte.
    let want = sha256_hex(&stall);
    let reads: Vec<_> = stalled
        .into_iter()
        .map(|s| tokio::spawn(read_body(s)))
        .collect();
    for (i, read) in reads.into_iter().enumerate() {
        let body = read.await.unwrap();
        assert_eq!(body.len(), STALL_FILE, "stalled download {i}");
        assert_eq!(sha256_hex(&body), want, "stalled download {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_stall_the_session_with_credit() {
    stalled_readers_do_not_stall_the_session("credit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_stall_the_session_with_pause_resume() {
    stalled_readers_do_not_stall_the_session("pause").await;
}
