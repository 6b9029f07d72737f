//! Raw TCP through the real binaries: HTTP CONNECT with curl as the client (direct, through a
//! peer, refused by allow rules, unknown agent), a websocket through `/client/...`, and
//! `--forward` port forwards under concurrency and agent loss.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rd_e2e_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// How long a freshly started client may take to register (normally milliseconds).
const CONNECT_BOUND: Duration = Duration::from_secs(15);
/// Bound on one exchange; only reached when something is broken.
const BOUND: Duration = Duration::from_secs(20);

const HELLO: &str = "hello through CONNECT\n";

/// `Proxy-Authorization` values for `foo:` and `bar:` (what `curl -x http://foo@...` sends).
const BASIC_FOO: &str = "Basic Zm9vOg==";
const BASIC_BAR: &str = "Basic YmFyOg==";

fn content() -> TempDir {
    let dir = TempDir::new("fwd");
    std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    dir
}

fn client_path(id: &str, target: SocketAddr, file: &str) -> String {
    format!("/client/{id}/http/{target}/{file}")
}

/// `curl -p -x http://{user}@{proxy} http://{target}/hello.txt`.
async fn curl_via_connect(
    proxy: SocketAddr,
    user: &str,
    target: SocketAddr,
) -> (bool, String, String) {
    curl(vec![
        "-p".into(),
        "-x".into(),
        format!("http://{user}@{proxy}"),
        format!("http://{target}/hello.txt"),
    ])
    .await
}

/// Sends `CONNECT target` with `auth` and reads a non-2xx answer: status and body.
async fn raw_connect(proxy: SocketAddr, target: &str, auth: Option<&str>) -> (u16, String) {
    let exchange = async {
        let mut tcp = TcpStream::connect(proxy).await.unwrap();
        let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(auth) = auth {
            head.push_str(&format!("Proxy-Authorization: {auth}\r\n"));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        let end = loop {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed in the head: {answer:?}");
            answer.extend_from_slice(&buf[..n]);
            if let Some(at) = answer.windows(4).position(|w| w == b"\r\n\r\n") {
                break at + 4;
            }
        };
        let head = String::from_utf8_lossy(&answer[..end]).to_lowercase();
        let status: u16 = head[9..12].parse().unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| v.trim().parse().unwrap());
        while answer.len() < end + len {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "connection closed in the body");
            answer.extend_from_slice(&buf[..n]);
        }
        (
            status,
            String::from_utf8_lossy(&answer[end..end + len]).into_owned(),
        )
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .expect("an answer to CONNECT")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_curl_through_an_agent_and_its_errors() {
    let dir = content();
    let (_dummy, dummy) = start_dummy(dir.path());
    let (server, addr) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let _client = start_client(addr, "foo", &[]);
    poll_get(
        addr,
        &client_path("foo", dummy, "hello.txt"),
        CONNECT_BOUND,
        |r| r.status == 200,
    )
    .await;

    // curl through CONNECT: the plain-http request inside the tunnel, byte for byte.
    let (ok, out, err) = curl_via_connect(addr, "foo", dummy).await;
    assert!(ok, "curl failed: {err}");
    assert_eq!(out, HELLO);

    // Without -p curl sends the request in absolute form, as http_proxy users do: it is
    // proxied through the agent named by the proxy user too.
    let (ok, out, err) = curl(vec![
        "-x".into(),
        format!("http://foo@{addr}"),
        format!("http://{dummy}/hello.txt"),
    ])
    .await;
    assert!(ok, "curl -x without -p failed: {err}");
    assert_eq!(out, HELLO);
    // The server's own routes still answer absolute-form requests without credentials.
    let (ok, out, err) = curl(vec![
        "-x".into(),
        format!("http://{addr}"),
        format!("http://{addr}/healthz"),
    ])
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "ok\n");

    // An agent nobody connected: 502 with one clear line, and a log line.
    let (ok, _, err) = curl_via_connect(addr, "bar", dummy).await;
    assert!(!ok && err.contains("502"), "{err}");
    let (status, body) = raw_connect(addr, &dummy.to_string(), Some(BASIC_BAR)).await;
    assert_eq!(
        (status, body.as_str()),
        (502, "failed to find Session for client bar\n")
    );
    wait_until("the unknown agent's log line", BOUND, || {
        server.stderr().lines().any(|l| {
            l.contains("tunnel connection")
                && l.contains("origin=\"connect\"")
                && l.contains("outcome=\"refused\"")
                && l.contains("failed to find Session for client bar")
        })
    });

    // No credentials: 407 with a challenge and the hint.
    let (status, body) = raw_connect(addr, &dummy.to_string(), None).await;
    assert_eq!(status, 407);
    assert!(
        body.contains("client key") && body.ends_with('\n'),
        "{body:?}"
    );
    // Not host:port.
    let (status, _) = raw_connect(addr, "127.0.0.1", Some(BASIC_FOO)).await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_refused_by_allow_rules_is_a_502_with_the_agents_text() {
    let dir = content();
    let (_allowed, allowed) = start_dummy(dir.path());
    let (_other, other) = start_dummy(dir.path());
    // A long wait, so the refusal is always in time on a busy machine: it ends the wait.
    let (_server, addr) = Proc::start_listening(
        "rd-server",
        &["-listen", "127.0.0.1:0", "-connect-wait", "15s"],
    );
    let rule = format!("tcp:{allowed}");
    let client = start_client(addr, "foo", &["--allow", &rule]);
    poll_get(
        addr,
        &client_path("foo", allowed, "hello.txt"),
        CONNECT_BOUND,
        |r| r.status == 200,
    )
    .await;

    let (ok, _, err) = curl_via_connect(addr, "foo", other).await;
    assert!(!ok && err.contains("502"), "{err}");
    let (status, body) = raw_connect(addr, &other.to_string(), Some(BASIC_FOO)).await;
    assert_eq!((status, body.as_str()), (502, "connect not allowed\n"));

    // The session is untouched.
    let reply = try_get(addr, &client_path("foo", allowed, "hello.txt"), BOUND)
        .await
        .unwrap();
    assert_eq!((reply.status, reply.text().as_str()), (200, HELLO));
    drop(client);
}

/// A peered server `id` on 127.0.0.1:`port` linking to `peer_id` at `peer_port`.
fn start_peer(id: &str, port: u16, peer_id: &str, peer_port: u16) -> Option<(Proc, SocketAddr)> {
    let listen = format!("127.0.0.1:{port}");
    let peers = format!("{peer_id}:aaa:ws://127.0.0.1:{peer_port}/connect");
    let args = [
        "-listen", &listen, "-id", id, "-token", "aaa", "-peers", &peers,
    ];
    let mut p = Proc::start("rd-server", &args);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.wait_listening()))
        .ok()
        .map(|addr| (p, addr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_through_a_peer_reaches_the_agent_on_the_other_replica() {
    let dir = content();
    let (_dummy, dummy) = start_dummy(dir.path());
    // -peers needs both ports up front: pick free ones, retry if one was taken meanwhile.
    let mut servers = None;
    for _ in 0..3 {
        let (p1, p2) = (free_port(), free_port());
        if p1 == p2 {
            continue;
        }
        let Some(first) = start_peer("first", p1, "second", p2) else {
            continue;
        };
        let Some(second) = start_peer("second", p2, "first", p1) else {
            continue;
        };
        servers = Some((first, second));
        break;
    }
    let ((_first, first), (_second, second)) = servers.expect("two peered servers");
    let _client = start_client(first, "foo", &[]);
    // Once the second routes /client requests for foo, it has the peer's announcement.
    poll_get(
        second,
        &client_path("foo", dummy, "hello.txt"),
        CONNECT_BOUND,
        |r| r.status == 200,
    )
    .await;

    let (ok, out, err) = curl_via_connect(second, "foo", dummy).await;
    assert!(ok, "curl through the peer failed: {err}");
    assert_eq!(out, HELLO);
}

/// A websocket service on 127.0.0.1:0: greets, then echoes every text and binary message.
async fn spawn_ws_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                if ws
                    .send(Message::text("hello from behind the agent"))
                    .await
                    .is_err()
                {
                    return;
                }
                while let Some(Ok(msg)) = ws.next().await {
                    let echo = matches!(msg, Message::Text(_) | Message::Binary(_));
                    if msg.is_close() || (echo && ws.send(msg).await.is_err()) {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_through_the_client_route_carries_messages_both_ways() {
    let dir = content();
    let (_dummy, dummy) = start_dummy(dir.path());
    let echo = spawn_ws_echo().await;
    let (_server, addr) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let _client = start_client(addr, "foo", &[]);
    poll_get(
        addr,
        &client_path("foo", dummy, "hello.txt"),
        CONNECT_BOUND,
        |r| r.status == 200,
    )
    .await;

    let session = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let url = format!("ws://{addr}/client/foo/http/{echo}/ws");
        let (mut ws, response) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        assert_eq!(response.status(), 101);
        // The service speaks first.
        assert_eq!(
            ws.next().await.unwrap().unwrap(),
            Message::text("hello from behind the agent")
        );
        for i in 0..50 {
            let msg = Message::text(format!("message {i}"));
            ws.send(msg.clone()).await.unwrap();
            assert_eq!(ws.next().await.unwrap().unwrap(), msg);
        }
        let big: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 253) as u8).collect();
        ws.send(Message::binary(big.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::binary(big));
        ws.close(None).await.unwrap();
        // The close completes: the stream ends rather than hanging.
        while let Some(Ok(_)) = ws.next().await {}
    };
    tokio::time::timeout(BOUND, session)
        .await
        .expect("the websocket exchange through /client");
}

/// Whether the connection ends (EOF or error) within `bound`, draining what is in flight.
async fn ends_within(tcp: &mut TcpStream, bound: Duration) -> bool {
    let drain = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(bound, drain).await.is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_carries_100_concurrent_echoes_and_closes_promptly_when_the_agent_goes() {
    let echo = spawn_echo().await;
    let forward = format!("127.0.0.1:0=foo:tcp/{echo}");
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
    let mut client = start_client(addr, "foo", &[]);

    // Until the client registers, connections are closed at once; then echoes go through.
    let deadline = std::time::Instant::now() + CONNECT_BOUND;
    loop {
        let mut tcp = TcpStream::connect(fwd).await.unwrap();
        let (mut r, mut w) = tcp.split();
        let mut got = [0u8; 5];
        let round = async {
            w.write_all(b"ready").await?;
            r.read_exact(&mut got).await
        };
        if tokio::time::timeout(BOUND, round).await.unwrap().is_ok() {
            assert_eq!(&got, b"ready");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the forward never carried an echo"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let baseline = server.open_fds();

    // 100 concurrent connections, 256 KiB each way, byte-exact.
    let mut tasks = Vec::new();
    for i in 0..100u32 {
        tasks.push(tokio::spawn(async move {
            let mut tcp = TcpStream::connect(fwd).await.unwrap();
            let data = pattern(i, 256 * 1024);
            let got = echo_round(&mut tcp, &data).await;
            assert!(got == data, "connection {i}: echo differs");
        }));
    }
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(90), t)
            .await
            .expect("100 concurrent echoes")
            .unwrap();
    }
    // Every one of them is gone from the server: nothing leaked.
    wait_until(
        "the server's descriptors to return to the baseline",
        BOUND,
        || server.open_fds() <= baseline,
    );

    // The agent disconnects with 20 connections open and data in flight: each is closed
    // promptly instead of hanging.
    let mut open = Vec::new();
    for i in 0..20u32 {
        let mut tcp = TcpStream::connect(fwd).await.unwrap();
        let data = pattern(1000 + i, 4096);
        assert!(echo_round(&mut tcp, &data).await == data);
        tcp.write_all(&pattern(2000 + i, 64 * 1024)).await.unwrap();
        open.push(tcp);
    }
    client.kill();
    for (i, tcp) in open.iter_mut().enumerate() {
        assert!(
            ends_within(tcp, BOUND).await,
            "connection {i} still open after the agent went away"
        );
    }
    // New connections: accepted, closed at once, and the reason logged.
    let mut tcp = TcpStream::connect(fwd).await.unwrap();
    assert!(ends_within(&mut tcp, BOUND).await);
    wait_until("the forward's log line", BOUND, || {
        server.stderr().lines().any(|l| {
            l.contains("tunnel connection")
                && l.contains("origin=\"forward\"")
                && l.contains("failed to find Session for client foo")
        })
    });
    drop(open);
    drop(tcp);
    wait_until(
        "the server's descriptors to drop after the agent left",
        BOUND,
        || server.open_fds() < baseline,
    );
}
