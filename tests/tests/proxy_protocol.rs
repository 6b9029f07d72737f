//! PROXY protocol through the real binaries: targets behind an agent receive a v1 or v2
//! header with the user's address, from `--forward ...?proxy-protocol=` and from
//! `--connect-proxy-protocol`; a trusted front's header (`--proxy-protocol-from`) replaces
//! the TCP peer address in what rd-server reports and sends onwards; an untrusted source's
//! header and a trusted source without one are refused.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use ppp::{HeaderResult, PartialResult};
use rd_e2e_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;

/// How long a freshly started client may take to register (normally milliseconds).
const CONNECT_BOUND: Duration = Duration::from_secs(15);
/// Bound on one exchange; only reached when something is broken.
const BOUND: Duration = Duration::from_secs(20);

/// `Proxy-Authorization` for `foo:` (what `curl -x http://foo@...` sends).
const BASIC_FOO: &str = "Basic Zm9vOg==";

/// The trusted front's address in these tests (a second loopback address).
const FRONT_IP: &str = "127.0.0.2";

/// What a target read in a connection's PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    version: u8,
    source: SocketAddr,
    destination: SocketAddr,
}

/// Parses a header at the start of `buf`: `None` while it may still be incomplete,
/// else what it says and its length.
fn parse_header(buf: &[u8]) -> Option<(Seen, usize)> {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return None;
    }
    let seen = |version, (source, destination): (SocketAddr, SocketAddr)| Seen {
        version,
        source,
        destination,
    };
    Some(match result {
        HeaderResult::V1(Ok(h)) => {
            let pair = match h.addresses {
                ppp::v1::Addresses::Tcp4(a) => (
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                ppp::v1::Addresses::Tcp6(a) => (
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                other => panic!("v1 header without addresses: {other:?}"),
            };
            (seen(1, pair), h.header.len())
        }
        HeaderResult::V2(Ok(h)) => {
            let pair = match h.addresses {
                ppp::v2::Addresses::IPv4(a) => (
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                ppp::v2::Addresses::IPv6(a) => (
                    (a.source_address, a.source_port).into(),
                    (a.destination_address, a.destination_port).into(),
                ),
                other => panic!("v2 header without addresses: {other:?}"),
            };
            (seen(2, pair), h.header.len())
        }
        other => panic!("the target got no valid PROXY header: {other:?}"),
    })
}

/// A TCP service on 127.0.0.1:0 behind the agent that expects a PROXY header on every
/// connection: reports what the header says, then echoes every byte after it.
async fn spawn_proxy_target() -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                let (seen, len) = loop {
                    if let Some(parsed) = parse_header(&buf) {
                        break parsed;
                    }
                    match tcp.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                tx.send(seen).ok();
                if tcp.write_all(&buf[len..]).await.is_err() {
                    return;
                }
                let (mut r, mut w) = tcp.into_split();
                tokio::io::copy(&mut r, &mut w).await.ok();
            });
        }
    });
    (addr, rx)
}

/// Waits until agent `id` has a session on the server at `addr` (its admin API says so);
/// returns the address the session came from, as the server knows it.
async fn wait_for_agent(addr: SocketAddr, id: &str) -> String {
    let remote = |r: &Reply| {
        let doc: serde_json::Value = serde_json::from_slice(&r.body).ok()?;
        doc["sessions"][0]["remote"].as_str().map(str::to_owned)
    };
    let reply = poll_get(addr, &format!("/admin/agents/{id}"), CONNECT_BOUND, |r| {
        r.status == 200 && remote(r).is_some()
    })
    .await;
    remote(&reply).unwrap()
}

/// Sends `CONNECT target` as agent foo on `tcp` and reads the answer's head; returns its
/// status. Bytes after the head stay unread (none come before the client speaks).
async fn connect_head(tcp: &mut TcpStream, target: SocketAddr) -> u16 {
    let head = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {BASIC_FOO}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        let n = tcp.read(&mut byte).await.unwrap();
        assert!(n > 0, "connection closed in the head: {answer:?}");
        answer.push(byte[0]);
    }
    String::from_utf8_lossy(&answer[9..12]).parse().unwrap()
}

/// Echoes `len` bytes seeded with `seed` through `tcp` (a tunnel to the PROXY target)
/// byte-exact, then takes the header the target saw for it: `version`, from `tcp`'s own
/// address, to `destination`.
async fn echo_then_expect_header(
    tcp: &mut TcpStream,
    seen: &mut mpsc::UnboundedReceiver<Seen>,
    (seed, len): (u32, usize),
    version: u8,
    destination: SocketAddr,
    what: &str,
) {
    let data = pattern(seed, len);
    let got = tokio::time::timeout(BOUND, echo_round(tcp, &data))
        .await
        .unwrap_or_else(|_| panic!("the echo through {what}"));
    assert!(got == data, "{what}: the payload after the header differs");
    let header = tokio::time::timeout(BOUND, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        header,
        Seen {
            version,
            source: tcp.local_addr().unwrap(),
            destination,
        },
        "{what}"
    );
}

/// A connection to `server` from the trusted front's address.
async fn connect_from_front(server: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(format!("{FRONT_IP}:0").parse().unwrap())
        .unwrap();
    socket.connect(server).await.unwrap()
}

/// Whether the server closes `tcp` without a byte of answer (EOF or reset) within BOUND.
async fn closed_without_answer(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 256];
    match tokio::time::timeout(BOUND, tcp.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => true,
        Ok(Ok(n)) => panic!("answered: {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_connect_and_socks5_send_the_users_address_in_v1_and_v2_headers() {
    let (target, mut seen) = spawn_proxy_target().await;
    let v1 = format!("127.0.0.1:0=foo:tcp/{target}?proxy-protocol=v1");
    let v2 = format!("127.0.0.1:0=foo:tcp/{target}?proxy-protocol=v2");
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "-forward",
            &v1,
            "-forward",
            &v2,
            "-connect-proxy-protocol",
            "v2",
        ],
    );
    let forwards: Vec<SocketAddr> = server
        .stdout_lines()
        .iter()
        .filter_map(|l| l.strip_prefix("forwarding "))
        .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(forwards.len(), 2, "{:?}", server.stdout_lines());
    let _client = start_client(addr, "foo", &[]);
    wait_for_agent(addr, "foo").await;

    for (version, fwd) in [(1u8, forwards[0]), (2, forwards[1])] {
        let mut tcp = TcpStream::connect(fwd).await.unwrap();
        let what = format!("the v{version} forward");
        let echo = (u32::from(version), 256 * 1024);
        echo_then_expect_header(&mut tcp, &mut seen, echo, version, fwd, &what).await;
    }

    // CONNECT: the same, with the main listener as the destination.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let status = tokio::time::timeout(BOUND, connect_head(&mut tcp, target))
        .await
        .unwrap();
    assert_eq!(status, 200);
    echo_then_expect_header(&mut tcp, &mut seen, (7, 64 * 1024), 2, addr, "CONNECT").await;

    // SOCKS5 on the same listener sends CONNECT's header (--connect-proxy-protocol).
    let socks = tokio::time::timeout(
        BOUND,
        tokio_socks::tcp::Socks5Stream::connect_with_password(addr, target, "foo", "any"),
    )
    .await
    .unwrap()
    .expect("the SOCKS5 handshake through the agent");
    let mut tcp = socks.into_inner();
    echo_then_expect_header(&mut tcp, &mut seen, (9, 64 * 1024), 2, addr, "SOCKS5").await;
}

/// A front on 127.0.0.1:0 in the manner of a load balancer: relays every connection to
/// `server` from the front's address, starting with a PROXY v1 header that names
/// `claimed` as the user.
async fn spawn_front(server: SocketAddr, claimed: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut user, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut upstream = connect_from_front(server).await;
                let header = format!(
                    "PROXY TCP4 {} {} {} {}\r\n",
                    claimed.ip(),
                    addr.ip(),
                    claimed.port(),
                    addr.port()
                );
                if upstream.write_all(header.as_bytes()).await.is_ok() {
                    tokio::io::copy_bidirectional(&mut user, &mut upstream)
                        .await
                        .ok();
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_fronts_header_is_taken_and_others_are_refused() {
    let (target, mut seen) = spawn_proxy_target().await;
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "-proxy-protocol-from",
            FRONT_IP,
            "-connect-proxy-protocol",
            "v1",
        ],
    );
    // The agent itself comes through the front: its session is known by the claimed
    // address (203.0.113.7 is a documentation address; only the header names it).
    let agent_as: SocketAddr = "203.0.113.7:4444".parse().unwrap();
    let front = spawn_front(addr, agent_as).await;
    let _client = start_client(front, "foo", &[]);
    assert_eq!(wait_for_agent(addr, "foo").await, agent_as.to_string());

    // A user through the front (raw, to choose the claim): the header rd sends onwards
    // names the user and the address the user connected to, both as the front said.
    let mut tcp = connect_from_front(addr).await;
    tcp.write_all(b"PROXY TCP4 198.51.100.9 192.0.2.80 5555 443\r\n")
        .await
        .unwrap();
    let status = tokio::time::timeout(BOUND, connect_head(&mut tcp, target))
        .await
        .unwrap();
    assert_eq!(status, 200);
    let data = pattern(3, 4096);
    let got = tokio::time::timeout(BOUND, echo_round(&mut tcp, &data))
        .await
        .unwrap();
    assert!(got == data);
    drop(tcp);
    let header = tokio::time::timeout(BOUND, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        header,
        Seen {
            version: 1,
            source: "198.51.100.9:5555".parse().unwrap(),
            destination: "192.0.2.80:443".parse().unwrap(),
        }
    );
    // The CONNECT's log line names the user too.
    wait_until(
        "the CONNECT's log line with the user's address",
        BOUND,
        || {
            server
                .stderr()
                .lines()
                .any(|l| l.contains("tunnel connection") && l.contains("198.51.100.9:5555"))
        },
    );

    // A v2 header from the front works as well (a plain request, to see it served).
    let mut tcp = connect_from_front(addr).await;
    let v2 = rd_v2_header("198.51.100.10:6000", "192.0.2.80:443");
    tcp.write_all(&v2).await.unwrap();
    tcp.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(BOUND, tcp.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Not from the front: a header is refused (closed, no tunnel), and logged with the
    // address it came from.
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let untrusted = tcp.local_addr().unwrap();
    let head = format!(
        "PROXY TCP4 203.0.113.8 127.0.0.1 1 2\r\nCONNECT {target} HTTP/1.1\r\nHost: x\r\n\
         Proxy-Authorization: {BASIC_FOO}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    assert!(
        closed_without_answer(&mut tcp).await,
        "an untrusted header was not refused"
    );
    wait_until("the untrusted header's log line", BOUND, || {
        server.stderr().lines().any(|l| {
            l.contains("WARN")
                && l.contains("connection refused: PROXY protocol")
                && l.contains(&format!("peer={untrusted}"))
                && l.contains("not a trusted front")
        })
    });
    // The same address without a header is served as always.
    let reply = try_get(addr, "/livez", BOUND).await.unwrap();
    assert_eq!(reply.status, 200);

    // From the front without a header: refused, logged.
    let mut tcp = connect_from_front(addr).await;
    tcp.write_all(b"GET /livez HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        closed_without_answer(&mut tcp).await,
        "a headerless trusted connection was served"
    );
    wait_until("the missing header's log line", BOUND, || {
        server.stderr().lines().any(|l| {
            l.contains("connection refused: PROXY protocol")
                && l.contains(&format!("peer={FRONT_IP}:"))
                && l.contains("no PROXY header")
        })
    });
    // A malformed header from the front: refused, and the server still serves.
    let mut tcp = connect_from_front(addr).await;
    tcp.write_all(b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n")
        .await
        .unwrap();
    assert!(closed_without_answer(&mut tcp).await);
    let reply = try_get(addr, "/livez", BOUND).await.unwrap();
    assert_eq!(reply.status, 200);
    // Nothing of the refused connections reached the target.
    assert!(seen.try_recv().is_err());
}

/// A v2 header (IPv4, PROXY command) from `source` to `destination`, built with ppp.
fn rd_v2_header(source: &str, destination: &str) -> Vec<u8> {
    let pair: (SocketAddr, SocketAddr) = (source.parse().unwrap(), destination.parse().unwrap());
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        pair,
    )
    .build()
    .unwrap()
}
