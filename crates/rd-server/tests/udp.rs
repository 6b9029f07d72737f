//! UDP through an agent (rd's udp extension): a DNS query through a UDP forward to dnsmasq
//! on the agent's side, a burst of datagrams of many sizes with their boundaries kept, a
//! Go-style agent refused cleanly (at the dial, and once in the forward's log), and the
//! forward's flow bound and idle timeout.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rd_benches::dns::Dnsmasq;
use rd_server::forward::{ForwardHandle, ForwardSpec};
use rd_server::forward_udp::UdpForward;
use rd_server::{DialError, Server, TunnelIdHeader};
use tokio::net::UdpSocket;

/// A UDP forward of `client`'s `target` on 127.0.0.1:0, configured by `configure`.
async fn udp_forward(
    server: &Server,
    client: &str,
    target: SocketAddr,
    configure: impl FnOnce(UdpForward) -> UdpForward,
) -> (ForwardHandle, SocketAddr) {
    let spec: ForwardSpec = format!("127.0.0.1:0={client}:udp/{target}")
        .parse()
        .unwrap();
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let handle = configure(UdpForward::new(server.clone(), spec)).spawn(socket);
    let addr = handle.local_addr().unwrap();
    (handle, addr)
}

/// A UDP echo on 127.0.0.1:0: every datagram goes back to its sender as it came.
async fn spawn_udp_echo() -> SocketAddr {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65_536];
        while let Ok((n, from)) = socket.recv_from(&mut buf).await {
            socket.send_to(&buf[..n], from).await.ok();
        }
    });
    addr
}

/// A client socket connected to the forward.
async fn user_of(forward: SocketAddr) -> UdpSocket {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket.connect(forward).await.unwrap();
    socket
}

/// Sends `datagram` and returns the reply (within [`BOUND`]).
async fn exchange(socket: &UdpSocket, datagram: &[u8]) -> Vec<u8> {
    socket.send(datagram).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let n = bounded("a reply through the forward", socket.recv(&mut buf))
        .await
        .unwrap();
    buf.truncate(n);
    buf
}

fn metric(server: &Server, name: &str) -> f64 {
    sample(&server.encode_metrics(), name).unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------
// DNS

/// A DNS query for the A record of `name`, recursion desired.
fn dns_query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::new();
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// The IPv4 addresses in the A records of a DNS answer to [`dns_query`] `id`.
fn a_records(answer: &[u8], id: u16) -> Vec<[u8; 4]> {
    assert!(answer.len() >= 12, "short answer {answer:?}");
    assert_eq!(u16::from_be_bytes([answer[0], answer[1]]), id, "answer id");
    assert_eq!(answer[3] & 0x0f, 0, "rcode of {answer:?}");
    let questions = u16::from_be_bytes([answer[4], answer[5]]);
    let answers = u16::from_be_bytes([answer[6], answer[7]]);
    let mut at = 12;
    let skip_name = |mut at: usize| -> usize {
        loop {
            let len = answer[at];
            if len & 0xc0 == 0xc0 {
                return at + 2;
            }
            at += 1 + len as usize;
            if len == 0 {
                return at;
            }
        }
    };
    for _ in 0..questions {
        at = skip_name(at) + 4;
    }
    let mut found = Vec::new();
    for _ in 0..answers {
        at = skip_name(at);
        let rtype = u16::from_be_bytes([answer[at], answer[at + 1]]);
        let len = u16::from_be_bytes([answer[at + 8], answer[at + 9]]) as usize;
        at += 10;
        if rtype == 1 && len == 4 {
            found.push([answer[at], answer[at + 1], answer[at + 2], answer[at + 3]]);
        }
        at += len;
    }
    found
}

/// A DNS query through a UDP forward reaches dnsmasq on the agent's side and its answer
/// comes back to the user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dns_query_through_a_udp_forward_is_answered_by_dnsmasq() {
    // dnsmasq answering `rd.test` with 10.1.2.3 from a hosts file (the harnesses' own).
    let dir = std::env::temp_dir().join(format!("rd-udp-dns-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dns = match Dnsmasq::start(&dir, "rd.test", &[std::net::Ipv4Addr::new(10, 1, 2, 3)]) {
        Ok(dns) => dns,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let (_forward, addr) = udp_forward(&ts.server, "foo", dns.addr, |f| f).await;
    let user = user_of(addr).await;
    let answer = exchange(&user, &dns_query(0x4a7e, "rd.test")).await;
    assert_eq!(a_records(&answer, 0x4a7e), vec![[10, 1, 2, 3]]);
    // A second query rides the same flow.
    let answer = exchange(&user, &dns_query(7, "rd.test")).await;
    assert_eq!(a_records(&answer, 7), vec![[10, 1, 2, 3]]);
    drop(dns);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(metric(&ts.server, "rd_udp_flows_opened_total"), 1.0);
    assert_eq!(
        metric(&ts.server, "rd_udp_datagrams_total{direction=\"out\"}"),
        2.0
    );
}

// ---------------------------------------------------------------------------------------
// Boundaries

/// Datagram `i` of a burst: its size from a spread of sizes, its bytes from its index.
fn burst_datagram(i: usize) -> Vec<u8> {
    const SIZES: [usize; 14] = [
        1, 2, 3, 7, 64, 100, 511, 512, 1000, 1472, 1500, 2048, 4096, 8192,
    ];
    let size = SIZES[i % SIZES.len()];
    (0..size).map(|j| (i * 31 + j * 7) as u8).collect()
}

/// A burst of datagrams of many sizes through the forward to a UDP echo on the agent's side:
/// every reply is its request, byte for byte and no more (the boundaries survive the
/// stream's coalescing and splitting), and so is the largest UDP datagram.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_datagrams_keeps_its_boundaries() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let echo = spawn_udp_echo().await;
    let (_forward, addr) = udp_forward(&ts.server, "foo", echo, |f| f).await;
    let user = Arc::new(user_of(addr).await);

    // A window of datagrams in flight: well within the flow's queue and the sockets'
    // buffers, so nothing is lost on loopback and every reply is accounted for.
    const COUNT: usize = 280;
    const WINDOW: usize = 8;
    let (sent_tx, mut sent_rx) = tokio::sync::mpsc::channel::<()>(WINDOW);
    for _ in 0..WINDOW {
        sent_tx.send(()).await.unwrap();
    }
    let sender = {
        let user = user.clone();
        tokio::spawn(async move {
            for i in 0..COUNT {
                sent_rx.recv().await.unwrap();
                user.send(&burst_datagram(i)).await.unwrap();
            }
        })
    };
    let mut buf = vec![0u8; 65_536];
    for i in 0..COUNT {
        let n = bounded("a reply of the burst", user.recv(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf[..n], &burst_datagram(i)[..], "reply {i}");
        sent_tx.send(()).await.ok();
    }
    sender.await.unwrap();

    let largest: Vec<u8> = (0..rd_session::MAX_DATAGRAM)
        .map(|j| (j % 251) as u8)
        .collect();
    assert_eq!(exchange(&user, &largest).await, largest);
    let empty = exchange(&user, &[]).await;
    assert!(empty.is_empty());
    assert_eq!(metric(&ts.server, "rd_udp_flows_opened_total"), 1.0);
}

// ---------------------------------------------------------------------------------------
// Go-style agents

/// An agent that does not negotiate the udp extension (a Go agent, or rd-client --no-udp):
/// a udp dial is refused at once with a clear error, and a UDP forward to it drops its
/// datagrams, says so once in its log, opens no flow and keeps running.
///
/// Single-threaded, so the log subscriber of this thread sees every task's lines.
#[tokio::test(flavor = "current_thread")]
async fn a_go_style_agent_is_refused_at_the_dial_and_logged_once() {
    let (log, _guard) = CapturedLog::start();

    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let go_style = rd_session::Extensions {
        udp: false,
        ..rd_session::Extensions::SUPPORTED
    };
    let _agent = RunningClient::spawn(agent(&ts.ws_url(), "gopher").extensions(go_style).build());
    let server = ts.server.clone();
    wait_until("the agent's session", || server.has_session("gopher")).await;
    let echo = spawn_udp_echo().await;

    let err = ts
        .server
        .dialer("gopher")
        .dial("udp", &echo.to_string())
        .await
        .unwrap_err();
    assert!(matches!(err, DialError::UdpNotSupported(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "agent gopher does not support udp (a Go agent, or an rd agent without the udp extension)"
    );
    assert_eq!(
        metric(
            &ts.server,
            "rd_dials_refused_total{reason=\"udp_not_supported\"}"
        ),
        1.0
    );
    // Nothing reached the agent: no stream was opened.
    assert_eq!(metric(&ts.server, "rd_streams_opened_total"), 0.0);

    let (forward, addr) = udp_forward(&ts.server, "gopher", echo, |f| f).await;
    let user = user_of(addr).await;
    for i in 0..10u8 {
        user.send(&[i; 16]).await.unwrap();
    }
    wait_until("the forward to drop the datagrams", || {
        metric(
            &server,
            "rd_udp_datagrams_dropped_total{reason=\"udp_not_supported\"}",
        ) == 10.0
    })
    .await;
    assert_eq!(metric(&ts.server, "rd_udp_flows_opened_total"), 0.0);
    assert_eq!(metric(&ts.server, "rd_streams_opened_total"), 0.0);
    assert_eq!(forward.tasks(), 1, "only the receive loop runs");
    let text = log.text();
    assert_eq!(
        text.matches("the agent cannot carry udp").count(),
        1,
        "logged once, not per datagram:\n{text}"
    );
    assert!(text.contains("agent gopher does not support udp"), "{text}");
    bounded("the forward to stop", forward.stop()).await;
}

/// The same Go-style agent behind a peer replica: the forward's dial goes through the peer
/// link and the far replica refuses it with its text. The forward recognises the refusal,
/// logs it once and drops the next datagrams without dialing again (one flow, not one per
/// datagram).
#[tokio::test(flavor = "current_thread")]
async fn a_go_style_agent_behind_a_peer_replica_is_logged_once_and_not_redialed() {
    let (log, _guard) = CapturedLog::start();
    let logged = || log.text().matches("the agent cannot carry udp").count();

    let (a, b) = peered_pair(|builder| builder.build()).await;
    let go_style = rd_session::Extensions {
        udp: false,
        ..rd_session::Extensions::SUPPORTED
    };
    let _agent = RunningClient::spawn(agent(&b.ws_url(), "gopher").extensions(go_style).build());
    let server = a.server.clone();
    wait_until("a route to the agent through b", || {
        server.has_session("gopher")
    })
    .await;
    let echo = spawn_udp_echo().await;
    let (forward, addr) = udp_forward(&a.server, "gopher", echo, |f| f).await;
    let user = user_of(addr).await;
    user.send(b"first").await.unwrap();
    wait_until("the far replica's refusal, logged", || logged() == 1).await;
    for i in 0..9u8 {
        user.send(&[i; 16]).await.unwrap();
    }
    wait_until("the next datagrams dropped without a dial", || {
        metric(
            &server,
            "rd_udp_datagrams_dropped_total{reason=\"udp_not_supported\"}",
        ) == 9.0
    })
    .await;
    assert_eq!(metric(&a.server, "rd_udp_flows_opened_total"), 1.0);
    assert_eq!(logged(), 1, "logged once, not per datagram");
    bounded("the forward to stop", forward.stop()).await;
}

/// The agent refuses the forward's target (its allow rules): the flow ends before any
/// answer, and for a second the forward drops datagrams of every source instead of making
/// each one a Connect to the agent (sources can be spoofed; the target is the same).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_target_is_not_redialed_for_every_datagram() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let deny_udp = |target: &rd_proto::Target| !rd_session::is_udp(target.proto());
    let _agent = RunningClient::spawn(agent(&ts.ws_url(), "foo").allow(deny_udp).build());
    let server = ts.server.clone();
    wait_until("the agent's session", || server.has_session("foo")).await;
    let echo = spawn_udp_echo().await;
    let (forward, addr) = udp_forward(&ts.server, "foo", echo, |f| f).await;
    let first = user_of(addr).await;
    first.send(b"refused").await.unwrap();
    // The stream closed, and the flow is no longer counted: its end is on its way to the
    // forward's loop (it is sent before the gauge goes down).
    wait_until("the refused flow to end", || {
        metric(&server, "rd_streams_closed_total") == 1.0 && metric(&server, "rd_udp_flows") == 0.0
    })
    .await;
    // Ten more sources within the hold: dropped, not dialed. (The hold is a second; the
    // sends take microseconds, and a late one would only open a flow, which is counted.)
    for i in 0..10u8 {
        user_of(addr).await.send(&[i]).await.unwrap();
    }
    wait_until("the datagrams dropped as refused", || {
        metric(
            &server,
            "rd_udp_datagrams_dropped_total{reason=\"refused\"}",
        ) + metric(&server, "rd_udp_flows_opened_total")
            >= 11.0
    })
    .await;
    assert!(
        metric(&server, "rd_udp_flows_opened_total") < 5.0,
        "most datagrams of the hold dialed anyway"
    );
    bounded("the forward to stop", forward.stop()).await;
}

/// An agent whose session takes nothing more (its local end is never read, so it grants
/// no credit): a flow stuck writing to it still ends when the forward stops, instead of
/// holding the stop for as long as the agent stays silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_forward_ends_a_flow_stuck_on_a_full_tunnel() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let mut headers = http::HeaderMap::new();
    headers.insert("x-tunnel-id", http::HeaderValue::from_static("stuck"));
    let options = rd_session::transport::ConnectOptions::default()
        .with_proxy(rd_session::transport::ProxyMode::None)
        .with_extensions(rd_session::Extensions::SUPPORTED)
        .with_headers(headers);
    let (ws, extensions, _) =
        rd_session::transport::connect_websocket_with_headers(&ts.ws_url(), &options)
            .await
            .unwrap();
    assert!(extensions.udp);
    // The far ends of the agent's connections, held and never read.
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    let _session = rd_session::SessionBuilder::client()
        .extensions(extensions)
        .connect_handler(move |_target: rd_proto::Target| {
            let keep = keep.clone();
            async move {
                let (io, far) = tokio::io::duplex(1024);
                keep.lock().unwrap().push(far);
                Ok::<rd_session::BoxedIo, rd_session::ConnectRefused>(Box::new(io))
            }
        })
        .spawn(ws);
    let server = ts.server.clone();
    wait_until("the agent's session", || server.has_session("stuck")).await;
    let (forward, addr) = udp_forward(&ts.server, "stuck", "127.0.0.1:9".parse().unwrap(), |f| {
        f.idle_timeout(Duration::from_secs(3600))
    })
    .await;
    let user = user_of(addr).await;
    // Far more than the stream's credit and the flow's queue: the flow ends up waiting.
    for _ in 0..2000 {
        user.send(&[7u8; 1024]).await.unwrap();
    }
    wait_until("the flow's queue to fill", || {
        metric(
            &server,
            "rd_udp_datagrams_dropped_total{reason=\"congested\"}",
        ) > 0.0
    })
    .await;
    bounded("the forward to stop", forward.stop()).await;
    assert_eq!(metric(&server, "rd_udp_flows"), 0.0);
    assert_eq!(held.lock().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------
// Flow bound and idle timeout

/// At most `max_flows` sources at once: a third source's datagram is dropped and counted.
/// Idle flows close after the idle timeout (their streams with them), and then the third
/// source gets a flow and its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_are_bounded_and_idle_ones_close() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    let echo = spawn_udp_echo().await;
    let (forward, addr) = udp_forward(&ts.server, "foo", echo, |f| {
        f.max_flows(2).idle_timeout(Duration::from_millis(300))
    })
    .await;
    let (a, b, c) = (
        user_of(addr).await,
        user_of(addr).await,
        user_of(addr).await,
    );
    assert_eq!(exchange(&a, b"a").await, b"a");
    assert_eq!(exchange(&b, b"b").await, b"b");
    assert_eq!(metric(&ts.server, "rd_udp_flows"), 2.0);

    c.send(b"c").await.unwrap();
    let server = ts.server.clone();
    wait_until("the third source's datagram to be dropped", || {
        metric(
            &server,
            "rd_udp_datagrams_dropped_total{reason=\"max_flows\"}",
        ) == 1.0
    })
    .await;
    assert_eq!(metric(&ts.server, "rd_udp_flows_opened_total"), 2.0);

    // Nothing moves: both flows idle out, and their streams close.
    wait_until("the idle flows to close", || {
        metric(&server, "rd_udp_flows") == 0.0 && metric(&server, "rd_streams") == 0.0
    })
    .await;
    wait_until("the flows' tasks to end", || forward.tasks() == 1).await;
    assert_eq!(exchange(&c, b"c again").await, b"c again");
    assert_eq!(metric(&ts.server, "rd_udp_flows_opened_total"), 3.0);
    assert_eq!(metric(&ts.server, "rd_udp_flows"), 1.0);
}
