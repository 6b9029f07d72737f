//! Zero-gap HA (issue 23) with real processes: three rd-server replicas on 127.0.0.1-3 (one
//! port, as pods behind a headless Service) find each other through a dnsmasq the test runs
//! on loopback; a round-robin TCP front in the test stands for the Service. One rd agent
//! given only the front's URL ends up with a session on each replica, so requests entering
//! any replica take no peer hop; a drain of its first replica, with a long-lived stream
//! open through it, fails no request through the others; a kill -9 of a second fails none
//! through the last; the agent fills again when that replica comes back. A Go-style agent
//! (one session, no extensions) on the same replicas is still reached through peering.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use rd_benches::dns::Dnsmasq;
use rd_benches::front::Front;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use rd_e2e_tests::*;

const NAME: &str = "rd-zero-gap.test";
const TOKEN: &str = "zero-gap-peer-secret";
const HELLO: &str = "hello through every replica\n";
/// Generous: debug binaries on a shared 2-core machine; only reached on failure.
const BOUND: Duration = Duration::from_secs(30);
/// The drained replica's grace period: the long-lived stream outlives it and is cut.
const GRACE: &str = "3s";

fn ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, n)
}

/// Replica `n` on 127.0.0.`n`:`port`, finding its peers through `dns`.
fn start_server(n: u8, port: u16, dns: SocketAddr) -> Proc {
    let listen = format!("127.0.0.{n}:{port}");
    let id = format!("server-{n}");
    let peers_dns = format!("{NAME}:{port}");
    let dns = dns.to_string();
    let args = [
        "--listen",
        &listen,
        "--id",
        &id,
        "--peers-dns",
        &peers_dns,
        "--peers-dns-interval",
        "300ms",
        "--grace-period",
        GRACE,
    ];
    let env = [("RD_DNS_SERVER", dns.as_str()), ("RD_TOKEN", TOKEN)];
    let mut p = Proc::start_with("rd-server", &args, &env, false);
    p.wait_listening();
    p
}

async fn metrics_of(addr: SocketAddr) -> String {
    try_get(addr, "/metrics", BOUND)
        .await
        .map(|r| r.text())
        .unwrap_or_default()
}

/// The server ids the agent (its metrics listener at `metrics`) holds a live session with.
async fn held(metrics: SocketAddr) -> Vec<String> {
    let text = metrics_of(metrics).await;
    let mut ids: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with("rd_client_server_sessions{") && !l.ends_with(" 0"))
        .filter(|l| l.contains("going_away=\"false\""))
        .filter_map(|l| {
            l.split("server_id=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_owned)
        })
        .collect();
    ids.sort();
    ids
}

async fn wait_held(metrics: SocketAddr, want: &[&str]) {
    let deadline = Instant::now() + BOUND;
    loop {
        let ids = held(metrics).await;
        if ids == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the agent holds {ids:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn peer_hops(server: SocketAddr) -> f64 {
    sample(&metrics_of(server).await, "rd_dials{route=\"peer\"}").unwrap_or(0.0)
}

/// `foo:` (the agent's id as the proxy user, no password: the servers have no --admin-auth).
const BASIC_FOO: &str = "Basic Zm9vOg==";

/// A CONNECT tunnel through `server` to `target` on foo's side, kept open.
async fn connect_tunnel(server: SocketAddr, target: SocketAddr) -> BufReader<TcpStream> {
    let mut tcp = TcpStream::connect(server).await.unwrap();
    let req = format!(
        "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nProxy-Authorization: {BASIC_FOO}\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut reader = BufReader::new(tcp);
    let mut status = String::new();
    reader.read_line(&mut status).await.unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            return reader;
        }
    }
}

/// One HTTP/1.0 GET of hello.txt over the tunnel: whether the whole answer came back.
async fn tunnel_works(tunnel: &mut BufReader<TcpStream>) -> bool {
    let exchange = async {
        let tcp = tunnel.get_mut();
        tcp.write_all(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .ok()?;
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !answer.ends_with(HELLO.as_bytes()) {
            let n = tunnel.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    tokio::time::timeout(BOUND, exchange)
        .await
        .ok()
        .flatten()
        .is_some()
}

/// Requests for `client` through `servers` in turn until `done` says stop; returns
/// (sent, failures as "server: status body").
async fn requests_until(
    servers: &[SocketAddr],
    client: &str,
    dummy: SocketAddr,
    mut done: impl FnMut(usize) -> bool,
) -> (usize, Vec<String>) {
    let path = format!("/client/{client}/http/{dummy}/hello.txt");
    let mut failures = Vec::new();
    let mut sent = 0;
    while !done(sent) {
        let server = servers[sent % servers.len()];
        sent += 1;
        match try_get(server, &path, BOUND).await {
            Ok(r) if r.status == 200 && r.text() == HELLO => {}
            Ok(r) => failures.push(format!("{server}: {} {}", r.status, r.text().trim())),
            Err(e) => failures.push(format!("{server}: {e}")),
        }
    }
    (sent, failures)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_holds_every_replica_and_no_drain_or_crash_leaves_it_unreachable() {
    let dir = TempDir::new("zero-gap");
    let port = free_port();
    for n in 1..=3u8 {
        if let Err(e) = std::net::TcpListener::bind(SocketAddr::from((ip(n), port))) {
            eprintln!("skipping: cannot listen on 127.0.0.{n}:{port} ({e})");
            return;
        }
    }
    let dns = match Dnsmasq::start(dir.path(), NAME, &[ip(1), ip(2), ip(3)]) {
        Ok(dns) => dns,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    let (_dummy, dummy) = start_dummy(dir.path());
    let addrs: Vec<SocketAddr> = (1..=3).map(|n| SocketAddr::from((ip(n), port))).collect();
    let mut servers: Vec<Proc> = (1..=3).map(|n| start_server(n, port, dns.addr)).collect();
    for &s in &addrs {
        poll_get(s, "/readyz", BOUND, |r| r.status == 200).await;
    }
    let front = Front::start(SocketAddr::from(([127, 0, 0, 1], 0)), addrs.clone())
        .await
        .unwrap();

    // The rd agent knows only the front.
    let url = format!("ws://{}/connect", front.addr);
    let (_foo, foo_metrics) = start_agent_with_metrics(&url, "foo");
    wait_held(foo_metrics, &["server-1", "server-2", "server-3"]).await;
    // A Go-style agent (one session, none of rd's extensions) through the same front.
    let _bar = Proc::start(
        "rd-client",
        &[
            "-connect",
            &url,
            "-id",
            "bar",
            "--sessions",
            "1",
            "--no-replicas",
            "--no-half-close",
            "--flow-control",
            "pause",
        ],
    );

    // Requests for foo entering any replica take no peer hop; bar is reached from all
    // three, through peering from the two it is not on.
    let (sent, failures) = requests_until(&addrs, "foo", dummy, |n| n == 30).await;
    assert!(failures.is_empty(), "{failures:?} of {sent}");
    for &s in &addrs {
        assert_eq!(peer_hops(s).await, 0.0, "{s} took a peer hop for foo");
    }
    for &s in &addrs {
        let path = format!("/client/bar/http/{dummy}/hello.txt");
        poll_get(s, &path, BOUND, |r| r.status == 200).await;
    }
    let hops: f64 = {
        let mut total = 0.0;
        for &s in &addrs {
            total += peer_hops(s).await;
        }
        total
    };
    assert!(
        hops >= 2.0,
        "bar is on one replica: the two others hop ({hops})"
    );

    // A long-lived stream through the first replica (a CONNECT tunnel to rd-dummy).
    let mut tunnel = connect_tunnel(addrs[0], dummy).await;
    assert!(tunnel_works(&mut tunnel).await);

    // Drain the first replica. Until it exits (its grace period cuts the tunnel), every
    // request for foo through the two others succeeds, and the tunnel keeps working for a
    // while.
    servers[0].terminate();
    let started = Instant::now();
    let others = [addrs[1], addrs[2]];
    let (mut sent, mut failures) = (0, Vec::new());
    let mut tunnel_during_drain = None;
    while started.elapsed() < BOUND && servers[0].is_running() {
        let (n, f) = requests_until(&others, "foo", dummy, |n| n == 10).await;
        sent += n;
        failures.extend(f);
        if tunnel_during_drain.is_none() {
            tunnel_during_drain = Some(tunnel_works(&mut tunnel).await);
        }
    }
    assert!(!servers[0].is_running(), "server-1 did not exit");
    assert!(
        failures.is_empty(),
        "{} of {sent} failed during the drain: {failures:?}",
        failures.len()
    );
    assert!(sent >= 20, "only {sent} requests during the drain");
    assert_eq!(
        tunnel_during_drain,
        Some(true),
        "the tunnel stopped working at the drain's start"
    );
    let log = servers[0].stderr();
    assert!(log.contains("agents_told=1"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("stream cut at the drain deadline") && l.contains("client=foo")),
        "the tunnel cut at the deadline is logged:\n{log}"
    );
    assert!(
        !tunnel_works(&mut tunnel).await,
        "the tunnel outlived its server"
    );
    wait_held(foo_metrics, &["server-2", "server-3"]).await;

    // kill -9 of the second: requests through the third never fail.
    servers[1].kill();
    let (sent, failures) = requests_until(&[addrs[2]], "foo", dummy, |n| n == 50).await;
    assert!(failures.is_empty(), "{failures:?} of {sent} after the kill");
    wait_held(foo_metrics, &["server-3"]).await;

    // It comes back: the agent fills again, and requests entering it take no hop.
    servers[1] = start_server(2, port, dns.addr);
    wait_held(foo_metrics, &["server-2", "server-3"]).await;
    let hops_before = peer_hops(addrs[1]).await;
    let (sent, failures) = requests_until(&addrs[1..], "foo", dummy, |n| n == 20).await;
    assert!(
        failures.is_empty(),
        "{failures:?} of {sent} after the return"
    );
    assert_eq!(
        peer_hops(addrs[1]).await,
        hops_before,
        "the returned replica hops"
    );
    drop(front);
}
