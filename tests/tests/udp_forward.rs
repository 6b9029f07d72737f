//! UDP forwards through the real binaries: `rd-server --forward ...=foo:udp/...` carries
//! datagrams through an rd agent to a UDP echo, and a forward to an agent without the udp
//! extension (`rd-client --no-udp`, as a Go agent) drops its datagrams with one log line,
//! not one per datagram, and keeps running.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rd_e2e_tests::*;
use tokio::net::UdpSocket;

/// Bound on each wait; only reached when something is broken.
const BOUND: Duration = Duration::from_secs(20);

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

/// The `forwarding ADDR to CLIENT:...` addresses rd-server printed, by client.
fn forward_addr(server: &Proc, client: &str) -> SocketAddr {
    server
        .stdout_lines()
        .iter()
        .filter_map(|l| l.strip_prefix("forwarding "))
        .find(|rest| rest.contains(&format!(" to {client}:udp/")))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("a `forwarding ADDR to ...` line")
        .parse()
        .unwrap()
}

fn metric(text: &str, name: &str) -> f64 {
    sample(text, name).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_forwards_carry_datagrams_and_refuse_go_style_agents_once() {
    let echo = spawn_udp_echo().await;
    let to_foo = format!("127.0.0.1:0=foo:udp/{echo}");
    let to_gopher = format!("127.0.0.1:0=gopher:udp/{echo}");
    let (server, addr) = Proc::start_listening(
        "rd-server",
        &[
            "-listen",
            "127.0.0.1:0",
            "-forward",
            &to_foo,
            "-forward",
            &to_gopher,
            "-udp-idle-timeout",
            "30s",
        ],
    );
    let (foo_fwd, gopher_fwd) = (
        forward_addr(&server, "foo"),
        forward_addr(&server, "gopher"),
    );
    let url = format!("ws://{addr}/connect");
    let _foo = Proc::start("rd-client", &["-connect", &url, "-id", "foo"]);
    let _gopher = Proc::start("rd-client", &["-connect", &url, "-id", "gopher", "-no-udp"]);

    // Until foo registers, datagrams are dropped; then they come back whole.
    let user = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    user.connect(foo_fwd).await.unwrap();
    let mut buf = vec![0u8; 65_536];
    let deadline = Instant::now() + BOUND;
    loop {
        user.send(b"ready?").await.unwrap();
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(100), user.recv(&mut buf)).await
        {
            assert_eq!(&buf[..n], b"ready?");
            break;
        }
        assert!(Instant::now() < deadline, "the UDP forward never answered");
    }
    for size in [1usize, 100, 1400, 9000, 65_507] {
        let datagram: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        user.send(&datagram).await.unwrap();
        let n = tokio::time::timeout(BOUND, user.recv(&mut buf))
            .await
            .expect("a reply")
            .unwrap();
        assert_eq!(&buf[..n], &datagram[..], "datagram of {size} bytes");
    }

    // gopher cannot carry udp: once it is connected, its datagrams are counted as such.
    let gopher_user = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    gopher_user.connect(gopher_fwd).await.unwrap();
    let refused = "rd_udp_datagrams_dropped_total{reason=\"udp_not_supported\"}";
    let deadline = Instant::now() + BOUND;
    loop {
        gopher_user.send(b"anyone?").await.unwrap();
        let text = try_get(addr, "/metrics", BOUND).await.unwrap().text();
        if metric(&text, refused) >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gopher's datagrams were never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = metric(
        &try_get(addr, "/metrics", BOUND).await.unwrap().text(),
        refused,
    );
    for _ in 0..20 {
        gopher_user.send(b"more").await.unwrap();
    }
    poll_get(addr, "/metrics", BOUND, |r| {
        metric(&r.text(), refused) >= before + 20.0
    })
    .await;
    let log = server.stderr();
    assert_eq!(
        log.matches("the agent cannot carry udp").count(),
        1,
        "one line for the forward, not one per datagram:\n{log}"
    );
    assert!(log.contains("agent gopher does not support udp"), "{log}");
    // foo's forward is unaffected.
    user.send(b"still here").await.unwrap();
    let n = tokio::time::timeout(BOUND, user.recv(&mut buf))
        .await
        .expect("a reply")
        .unwrap();
    assert_eq!(&buf[..n], b"still here");
}
