//! SOCKS5 through the real binaries (issue 25): curl and a SOCKS5 client library through an
//! agent, on the operator listener beside CONNECT and on `--socks-listen`; the reply codes
//! for refused targets, unknown agents, unsupported commands and address types; RFC 1929's
//! failure for a wrong password; malformed handshakes closed without harm to the server.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use rd_e2e_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a freshly started client may take to register (normally milliseconds).
const CONNECT_BOUND: Duration = Duration::from_secs(15);
/// Bound on one exchange; only reached when something is broken.
const BOUND: Duration = Duration::from_secs(20);
/// Bound on a close that must not wait for the server's 10 s SOCKS5 handshake timeout.
const PROMPTLY: Duration = Duration::from_secs(5);

const HELLO: &str = "hello through SOCKS5\n";

fn content() -> TempDir {
    let dir = TempDir::new("socks5");
    std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    dir
}

/// Waits until agent `id` serves `target` through `server`'s `/client` route.
async fn wait_for_agent(server: SocketAddr, id: &str, target: SocketAddr) {
    poll_get(
        server,
        &format!("/client/{id}/http/{target}/hello.txt"),
        CONNECT_BOUND,
        |r| r.status == 200,
    )
    .await;
}

/// The `socks5 listening on socks5://ADDR` line's address (it follows `listening on`).
fn socks_addr(server: &Proc) -> SocketAddr {
    let find = || {
        server.stdout_lines().into_iter().find_map(|l| {
            l.strip_prefix("socks5 listening on socks5://")
                .map(|a| a.trim().parse().unwrap())
        })
    };
    wait_until("the `socks5 listening on` line", START_BOUND, || {
        find().is_some()
    });
    find().unwrap()
}

/// How a raw SOCKS5 exchange ended.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The method reply chose this method, and it was not username/password.
    Method(u8),
    /// RFC 1929's status was a failure; then whether the server closed the connection.
    AuthFailed { closed: bool },
    /// The request's reply code; then whether the server closed the connection after it.
    Reply { code: u8, closed: bool },
}

/// Whether the server closes the connection (EOF or reset) within [`BOUND`].
async fn closes(tcp: &mut TcpStream) -> bool {
    closes_within(tcp, BOUND).await
}

/// Whether the server closes the connection (EOF or reset) within `bound`.
async fn closes_within(tcp: &mut TcpStream, bound: Duration) -> bool {
    let mut buf = [0u8; 64];
    loop {
        match tokio::time::timeout(bound, tcp.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Greeting (username/password), credentials, then `request` (the bytes after `VER CMD`):
/// how the server answered.
async fn raw_socks(proxy: SocketAddr, user: &str, password: &str, request: &[u8]) -> Answer {
    let exchange = async {
        let mut tcp = TcpStream::connect(proxy).await.unwrap();
        tcp.write_all(&[5, 1, 2]).await.unwrap();
        let mut method = [0u8; 2];
        tcp.read_exact(&mut method).await.unwrap();
        assert_eq!(method[0], 5);
        if method[1] != 2 {
            return Answer::Method(method[1]);
        }
        let mut auth = vec![1, user.len() as u8];
        auth.extend_from_slice(user.as_bytes());
        auth.push(password.len() as u8);
        auth.extend_from_slice(password.as_bytes());
        tcp.write_all(&auth).await.unwrap();
        let mut status = [0u8; 2];
        tcp.read_exact(&mut status).await.unwrap();
        assert_eq!(status[0], 1);
        if status[1] != 0 {
            return Answer::AuthFailed {
                closed: closes(&mut tcp).await,
            };
        }
        tcp.write_all(request).await.unwrap();
        let mut reply = [0u8; 10];
        tcp.read_exact(&mut reply).await.unwrap();
        assert_eq!((reply[0], reply[2], reply[3]), (5, 0, 1), "{reply:?}");
        let closed = reply[1] != 0 && closes(&mut tcp).await;
        Answer::Reply {
            code: reply[1],
            closed,
        }
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .expect("an answer to the SOCKS5 exchange")
}

/// A CONNECT request to `target`, by address.
fn connect_to(target: SocketAddr) -> Vec<u8> {
    let SocketAddr::V4(v4) = target else {
        panic!("tests use IPv4 loopback")
    };
    let mut r = vec![5, 1, 0, 1];
    r.extend_from_slice(&v4.ip().octets());
    r.extend_from_slice(&v4.port().to_be_bytes());
    r
}

/// Sends `data` through a tokio-socks connection to `echo` via `proxy` as `user` and
/// reads it back, concurrently; then half-closes and sees the end.
async fn echo_via_library(
    proxy: SocketAddr,
    user: &str,
    password: &str,
    echo: SocketAddr,
    seed: u32,
) {
    let data = pattern(seed, 300 * 1024);
    let round = async {
        let stream =
            tokio_socks::tcp::Socks5Stream::connect_with_password(proxy, echo, user, password)
                .await
                .unwrap();
        let mut tcp = stream.into_inner();
        let (mut r, mut w) = tcp.split();
        let mut got = vec![0u8; data.len()];
        let (written, read) = tokio::join!(
            async {
                w.write_all(&data).await?;
                w.shutdown().await
            },
            r.read_exact(&mut got)
        );
        written.unwrap();
        read.unwrap();
        assert!(got == data, "the echo differs from what was sent");
        // The echo ends its side after ours: the tunnel carries the half-close both ways.
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    };
    tokio::time::timeout(BOUND, round)
        .await
        .expect("the echo through SOCKS5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_with_curl_and_a_library_through_an_agent() {
    let dir = content();
    let (_dummy, dummy) = start_dummy(dir.path());
    let echo = spawn_echo().await;
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &["-listen", "127.0.0.1:0", "-socks-listen", "127.0.0.1:0"],
    );
    let socks = socks_addr(&server);
    let _client = start_client(addr, "foo", &[]);
    wait_for_agent(addr, "foo", dummy).await;

    // curl with the name resolved on the agent's side (socks5h), on the shared listener
    // and on --socks-listen: the body byte for byte.
    let named = format!("http://localhost:{}/hello.txt", dummy.port());
    for proxy in [addr, socks] {
        let (ok, out, err) = curl(vec![
            "--socks5-hostname".into(),
            format!("foo:anything@{proxy}"),
            named.clone(),
        ])
        .await;
        assert!(ok, "curl --socks5-hostname via {proxy} failed: {err}");
        assert_eq!(out, HELLO);
    }
    // curl resolving the name itself (an IPv4 address in the request).
    let (ok, out, err) = curl(vec![
        "-x".into(),
        format!("socks5://foo:x@{addr}"),
        format!("http://{dummy}/hello.txt"),
    ])
    .await;
    assert!(ok, "curl -x socks5:// failed: {err}");
    assert_eq!(out, HELLO);
    // HTTP on the shared listener is untouched by the first-byte sniff.
    let reply = try_get(addr, "/healthz", BOUND).await.unwrap();
    assert_eq!((reply.status, reply.text().as_str()), (200, "ok\n"));

    // A SOCKS5 client library: 300 KiB each way, byte for byte, on both listeners, two at
    // once.
    tokio::join!(
        echo_via_library(addr, "foo", "x", echo, 1),
        echo_via_library(socks, "foo", "pw", echo, 2),
    );

    wait_until("the completed SOCKS5 log line", BOUND, || {
        server.stderr().lines().any(|l| {
            l.contains("tunnel connection")
                && l.contains("origin=\"socks5\"")
                && l.contains("outcome=\"completed\"")
                && l.contains("bytes_sent=307200")
        })
    });
    let metrics = try_get(addr, "/metrics", BOUND).await.unwrap().text();
    let completed = sample(
        &metrics,
        "rd_tunnel_uses_total{origin=\"socks5\",outcome=\"completed\"}",
    )
    .unwrap_or(0.0);
    assert!(
        completed >= 5.0,
        "{completed} completed socks5 uses counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_reply_codes_for_refusals_and_bad_requests() {
    let dir = content();
    let (_allowed, allowed) = start_dummy(dir.path());
    let (_other, other) = start_dummy(dir.path());
    let creds = dir.path().join("admin");
    // Agent foo with its own password, or any agent with the bearer token as password.
    std::fs::write(&creds, "basic foo:s3cret\nbearer t0ken\n").unwrap();
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "--admin-auth",
            creds.to_str().unwrap(),
        ],
    );
    let rule = format!("tcp:{allowed}");
    let _client = start_client(addr, "foo", &["--allow", &rule]);
    wait_until("the agent's session", CONNECT_BOUND, || {
        server
            .stderr()
            .contains("Handling backend connection request [foo]")
    });

    // Allowed: success, and the tunnel carries HTTP.
    let ok = raw_socks(addr, "foo", "s3cret", &connect_to(allowed)).await;
    assert_eq!(
        ok,
        Answer::Reply {
            code: 0,
            closed: false
        }
    );
    // The agent's allow rules refuse: 0x02, not allowed by ruleset.
    let refused = raw_socks(addr, "foo", "s3cret", &connect_to(other)).await;
    assert_eq!(
        refused,
        Answer::Reply {
            code: 2,
            closed: true
        }
    );
    // A wrong password: RFC 1929's failure, then the connection closes.
    let wrong = raw_socks(addr, "foo", "nope", &connect_to(allowed)).await;
    assert_eq!(wrong, Answer::AuthFailed { closed: true });
    // An agent nobody connected (its credentials are fine): 0x03, network unreachable.
    let unknown = raw_socks(addr, "bar", "t0ken", &connect_to(allowed)).await;
    assert_eq!(
        unknown,
        Answer::Reply {
            code: 3,
            closed: true
        }
    );
    // BIND: 0x07; an unknown address type: 0x08.
    let bind = raw_socks(addr, "bar", "t0ken", &[5, 2, 0, 1, 127, 0, 0, 1, 0, 80]).await;
    assert_eq!(
        bind,
        Answer::Reply {
            code: 7,
            closed: true
        }
    );
    let atyp = raw_socks(addr, "bar", "t0ken", &[5, 1, 0, 9, 1, 2, 3]).await;
    assert_eq!(
        atyp,
        Answer::Reply {
            code: 8,
            closed: true
        }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_without_admin_auth_still_asks_for_the_agent_name() {
    let dir = content();
    let (_dummy, dummy) = start_dummy(dir.path());
    let (server, addr) = Proc::start_listening("rd-server", &["-listen", "127.0.0.1:0"]);
    let _client = start_client(addr, "foo", &[]);
    wait_for_agent(addr, "foo", dummy).await;

    // Offering only "no authentication": no acceptable method (0xFF), the agent is unnamed.
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&[5, 1, 0]).await.unwrap();
        let mut method = [0u8; 2];
        tcp.read_exact(&mut method).await.unwrap();
        assert_eq!(method, [5, 0xff]);
        assert!(closes(&mut tcp).await);
    };
    tokio::time::timeout(BOUND, exchange).await.unwrap();
    // Any password admits, as CONNECT without --admin-auth; the name in the request is
    // resolved by the agent.
    let mut by_name = vec![5, 1, 0, 3, 9];
    by_name.extend_from_slice(b"localhost");
    by_name.extend_from_slice(&dummy.port().to_be_bytes());
    assert_eq!(
        raw_socks(addr, "foo", "whatever", &by_name).await,
        Answer::Reply {
            code: 0,
            closed: false
        }
    );
    // A port nothing listens on, at the agent: 0x05, connection refused.
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(
        raw_socks(addr, "foo", "x", &connect_to(closed_port)).await,
        Answer::Reply {
            code: 5,
            closed: true
        }
    );
    wait_until("the refused SOCKS5 log line", BOUND, || {
        server.stderr().lines().any(|l| {
            l.contains("origin=\"socks5\"")
                && l.contains("outcome=\"refused\"")
                && l.contains("client=foo")
                && l.contains("status=5")
        })
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_socks5_handshakes_are_closed_and_the_server_goes_on() {
    let dir = content();
    let (_dummy, dummy) = start_dummy(dir.path());
    let (mut server, addr) = Proc::start_listening(
        "rd-server",
        &["-listen", "127.0.0.1:0", "-socks-listen", "127.0.0.1:0"],
    );
    let socks = socks_addr(&server);
    let _client = start_client(addr, "foo", &[]);
    wait_for_agent(addr, "foo", dummy).await;

    let garbage: &[&[u8]] = &[
        // Truncated greetings.
        &[5],
        &[5, 3, 2],
        // No methods at all.
        &[5, 0],
        // A greeting, then credentials with the wrong subnegotiation version.
        &[5, 1, 2, 5, 3, b'f', b'o', b'o', 0],
        // Credentials cut short.
        &[5, 1, 2, 1, 200, b'f'],
        // A request with a bad version after good credentials.
        &[
            5, 1, 2, 1, 3, b'f', b'o', b'o', 0, 4, 1, 0, 1, 127, 0, 0, 1, 0, 80,
        ],
        // A request cut in its domain name.
        &[5, 1, 2, 1, 3, b'f', b'o', b'o', 0, 5, 1, 0, 3, 50, b'a'],
        // An empty domain name.
        &[5, 1, 2, 1, 3, b'f', b'o', b'o', 0, 5, 1, 0, 3, 0, 0, 80],
        // Random-looking bytes after the version.
        &[5, 0xff, 0x13, 0x37, 0, 0, 0xde, 0xad, 0xbe, 0xef],
    ];
    for proxy in [addr, socks] {
        for bytes in garbage {
            let exchange = async {
                let mut tcp = TcpStream::connect(proxy).await.unwrap();
                tcp.write_all(bytes).await.unwrap();
                // Our side is done: a truncated message can never complete, so the server
                // closes at once, well before its 10 s handshake timeout would.
                tcp.shutdown().await.unwrap();
                assert!(
                    closes_within(&mut tcp, PROMPTLY).await,
                    "{bytes:?} left open"
                );
            };
            tokio::time::timeout(BOUND, exchange).await.unwrap();
        }
        // Not SOCKS5 at all on --socks-listen: closed.
        if proxy == socks {
            let mut tcp = TcpStream::connect(socks).await.unwrap();
            tcp.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
            assert!(closes(&mut tcp).await);
        }
    }
    // The server is unharmed and still serves both.
    assert!(server.is_running());
    let ok = raw_socks(socks, "foo", "", &connect_to(dummy)).await;
    assert_eq!(
        ok,
        Answer::Reply {
            code: 0,
            closed: false
        }
    );
    let reply = try_get(addr, "/healthz", BOUND).await.unwrap();
    assert_eq!(reply.status, 200);
    assert!(!server.stderr().contains("panicked"), "{}", server.stderr());
}

#[test]
fn a_bad_socks_listen_address_is_refused_at_start_up() {
    let (status, _, err) = run_to_end(
        "rd-server",
        &["-listen", "127.0.0.1:0", "-socks-listen", "1080"],
        BOUND,
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("--socks-listen \"1080\": not an address"),
        "{err}"
    );
}

/// An agent that does not acknowledge its dials (a Go agent, or `--no-connect-ack`): the
/// reply follows CONNECT's `--connect-wait` rule, so a refusal within the wait is still
/// `0x02`, and a target that speaks first succeeds as soon as its first bytes arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_through_an_agent_without_connect_ack_waits_as_connect_does() {
    let dir = content();
    let (_allowed, allowed) = start_dummy(dir.path());
    let (_other, other) = start_dummy(dir.path());
    // A target that greets its clients (as SSH or SMTP servers do).
    let banner = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let banner_addr = banner.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = banner.accept().await {
            tcp.write_all(b"220 hello\r\n").await.ok();
        }
    });
    // A wait longer than the test's bounds: only the refusal or the banner can end it.
    let (_server, addr) = Proc::start_listening(
        "rd-server",
        &["-listen", "127.0.0.1:0", "-connect-wait", "60s"],
    );
    let rules = format!("tcp:{allowed},tcp:{banner_addr}");
    let _client = start_client(addr, "foo", &["--allow", &rules, "--no-connect-ack"]);
    wait_for_agent(addr, "foo", allowed).await;
    assert_eq!(
        raw_socks(addr, "foo", "x", &connect_to(other)).await,
        Answer::Reply {
            code: 2,
            closed: true
        }
    );
    assert_eq!(
        raw_socks(addr, "foo", "x", &connect_to(banner_addr)).await,
        Answer::Reply {
            code: 0,
            closed: false
        }
    );
}
