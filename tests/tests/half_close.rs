//! Half-close through the real binaries: a user of a `--forward` port writes a request,
//! shuts down writing and reads the whole answer from a service that answers only after
//! EOF. With rd-client's default (the half-close extension) the answer arrives; with
//! `--no-half-close --flow-control pause` (the plain Go protocol, what a Go agent speaks)
//! the shutdown closes the connection both ways and the answer is cut, as with Go.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use rd_e2e_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bound on one step; only reached when something is broken.
const BOUND: Duration = Duration::from_secs(20);
const REQUEST: usize = 200 * 1024;
const ANSWER: usize = 2 * 1024 * 1024;

/// A TCP service that reads its request until EOF, then answers `ANSWER` bytes seeded with
/// the request's length (so a full answer proves the whole request arrived) and closes.
async fn spawn_answer_after_eof() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                if tcp.read_to_end(&mut request).await.is_ok() {
                    let answer = pattern(request.len() as u32, ANSWER);
                    // Nobody may be left to read it (the Go protocol's case).
                    tcp.write_all(&answer).await.ok();
                }
            });
        }
    });
    addr
}

/// Connects to the forward, writes the request, shuts down writing, reads to the end.
async fn request_shutdown_read(fwd: SocketAddr) -> std::io::Result<Vec<u8>> {
    let mut tcp = TcpStream::connect(fwd).await?;
    tcp.write_all(&pattern(1, REQUEST)).await?;
    tcp.shutdown().await?;
    let mut got = Vec::new();
    tcp.read_to_end(&mut got).await?;
    Ok(got)
}

/// Waits until the server has logged `n` sessions of client `foo` and returns the last line.
fn nth_session_line(server: &Proc, n: usize) -> String {
    let lines = || -> Vec<String> {
        server
            .stderr()
            .lines()
            .filter(|l| l.contains("Handling backend connection request [foo]"))
            .map(str::to_owned)
            .collect()
    };
    wait_until("the agent's session", BOUND, || lines().len() >= n);
    lines()[n - 1].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_request_then_shutdown_gets_the_whole_answer_with_rd_peers_only() {
    let service = spawn_answer_after_eof().await;
    let forward = format!("127.0.0.1:0=foo:tcp/{service}");
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &["-listen", "127.0.0.1:0", "-forward", &forward],
    );
    let fwd: SocketAddr = server
        .stdout_lines()
        .iter()
        .find_map(|l| l.strip_prefix("forwarding "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a `forwarding ADDR to ...` line")
        .parse()
        .unwrap();
    let url = format!("ws://{addr}/connect");

    // rd-client's default: both ends speak half-close.
    let mut client = Proc::start("rd-client", &["-connect", &url, "-id", "foo"]);
    let line = nth_session_line(&server, 1);
    assert!(line.contains("half_close=true"), "{line}");
    let got = tokio::time::timeout(BOUND, request_shutdown_read(fwd))
        .await
        .expect("the exchange through the forward")
        .unwrap();
    assert_eq!(got.len(), ANSWER, "the whole answer");
    assert!(got == pattern(REQUEST as u32, ANSWER), "the answer's bytes");
    client.kill();
    // Forwards use the oldest live session: wait until the server has dropped this one.
    wait_until("the first session to end", BOUND, || {
        server.stderr().contains("session ended [foo]")
    });

    // The plain Go protocol: the user's shutdown closes the connection both ways before
    // the service answers.
    let mut client = Proc::start(
        "rd-client",
        &[
            "-connect",
            &url,
            "-id",
            "foo",
            "--no-half-close",
            "--flow-control",
            "pause",
        ],
    );
    let line = nth_session_line(&server, 2);
    assert!(line.contains("half_close=false"), "{line}");
    let got = tokio::time::timeout(BOUND, request_shutdown_read(fwd))
        .await
        .expect("the connection is closed, not left hanging");
    match got {
        Ok(answer) => assert!(answer.is_empty(), "{} bytes of answer", answer.len()),
        // A reset is a cut answer too.
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    client.kill();
}
