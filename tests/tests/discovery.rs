//! DNS peer discovery with real processes: rd-server replicas on 127.0.0.1-4 (one port, as
//! pods behind a headless Service) find each other through a dnsmasq the test runs on
//! loopback, with the records in a hosts file it rewrites (SIGHUP makes dnsmasq reread it).
//! Requests entering any server reach every server's client; a server added to DNS joins
//! within two discovery rounds; one removed from DNS and stopped is dropped; links and file
//! descriptors come back to where they were.
#![allow(clippy::unwrap_used)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use rd_benches::dns::Dnsmasq;

use rd_e2e_tests::*;

const NAME: &str = "rd-peers.test";
const HELLO: &str = "hello through discovered peers\n";
const TOKEN: &str = "shared-peer-secret";
/// Generous: debug binaries on a shared 2-core machine.
const BOUND: Duration = Duration::from_secs(30);

/// `127.0.0.N` for each octet N.
fn ips(octets: &[u8]) -> Vec<Ipv4Addr> {
    octets
        .iter()
        .map(|&n| Ipv4Addr::new(127, 0, 0, n))
        .collect()
}

/// Starts replica `n` on 127.0.0.`n`:`port`, finding its peers through `dns`.
fn start_server(n: u8, port: u16, dns: SocketAddr, token_file: &Path) -> (Proc, SocketAddr) {
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
        // The agent of the replica stopped below knows only that replica, so its drain
        // waits out the whole grace period for the pooled streams through it: 30 s, the
        // same as the bound the test waits for its exit (it lost that race now and then).
        "--grace-period",
        "5s",
    ];
    // The token and the DNS server from the environment, as a pod gets them; the token
    // from a file for one replica, from RD_TOKEN for the others.
    let token_file = token_file.to_str().unwrap();
    let env: Vec<(&str, &str)> = if n == 4 {
        vec![
            ("RD_DNS_SERVER", dns.as_str()),
            ("RD_TOKEN_FILE", token_file),
        ]
    } else {
        vec![("RD_DNS_SERVER", dns.as_str()), ("RD_TOKEN", TOKEN)]
    };
    let mut p = Proc::start_with("rd-server", &args, &env, false);
    let addr = p.wait_listening();
    (p, addr)
}

fn start_client(server: SocketAddr, id: &str) -> Proc {
    Proc::start(
        "rd-client",
        &["-connect", &format!("ws://{server}/connect"), "-id", id],
    )
}

async fn metric(server: SocketAddr, series: &str) -> Option<f64> {
    let text = try_get(server, "/metrics", Duration::from_secs(5))
        .await
        .ok()?
        .text();
    sample(&text, series)
}

/// Polls until `series` on `server` reads `want`.
async fn wait_metric(server: SocketAddr, series: &str, want: f64) {
    let deadline = Instant::now() + BOUND;
    loop {
        let got = metric(server, series).await;
        if got == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{server} {series}: {got:?}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every server reaches every client (the hello file on the client's side).
async fn all_reach_all(servers: &[SocketAddr], clients: &[&str], dummy: SocketAddr) {
    for server in servers {
        for client in clients {
            let path = format!("/client/{client}/http/{dummy}/hello.txt");
            let r = poll_get(*server, &path, BOUND, |r| r.status == 200).await;
            assert_eq!(r.text(), HELLO, "{server} -> {client}");
        }
    }
}

const DNS_LINKS: &str = "rd_peer_links{source=\"dns\"}";
const ROUNDS_OK: &str = "rd_peer_discovery_rounds{result=\"ok\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_find_each_other_through_dns() {
    let dir = TempDir::new("discovery");
    // All four loopback addresses must be usable with one port.
    let port = free_port();
    for n in 2..=4u8 {
        if let Err(e) = std::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, n], port))) {
            eprintln!("skipping: cannot listen on 127.0.0.{n}:{port} ({e})");
            return;
        }
    }
    let mut dns = match Dnsmasq::start(dir.path(), NAME, &ips(&[1, 2, 3])) {
        Ok(dns) => dns,
        Err(why) => {
            eprintln!("skipping: {why}");
            return;
        }
    };
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    let (_dummy, dummy) = start_dummy(dir.path());

    let mut procs = Vec::new();
    let mut addrs = Vec::new();
    for n in 1..=3 {
        let (p, addr) = start_server(n, port, dns.addr, &token_file);
        procs.push(p);
        addrs.push(addr);
    }
    let mut clients: Vec<Proc> = (0..3)
        .map(|i| start_client(addrs[i], &format!("c{}", i + 1)))
        .collect();

    // Each links to the two others (its own address answered 409 and was dropped), is
    // ready, and every request reaches every client.
    for &s in &addrs {
        wait_metric(s, DNS_LINKS, 2.0).await;
        wait_metric(
            s,
            "rd_peer_links_removed{source=\"dns\",reason=\"self\"}",
            1.0,
        )
        .await;
        let r = poll_get(s, "/readyz", BOUND, |r| r.status == 200).await;
        assert_eq!(r.text(), "ok\n");
    }
    all_reach_all(&addrs, &["c1", "c2", "c3"], dummy).await;
    let first = addrs[0];
    let baseline_fds = procs[0].open_fds();

    // A fourth replica: it joins the others' sets within two of their discovery rounds.
    let (p4, s4) = start_server(4, port, dns.addr, &token_file);
    procs.push(p4);
    dns.set(&ips(&[1, 2, 3, 4])).unwrap();
    // From here on DNS answers with the fourth: the round in flight may still miss it, the
    // next one finds it.
    let rounds_before = metric(first, ROUNDS_OK).await.unwrap();
    wait_metric(first, DNS_LINKS, 3.0).await;
    let rounds_after = metric(first, ROUNDS_OK).await.unwrap();
    assert!(
        rounds_after - rounds_before <= 2.0,
        "the fourth server joined after {} rounds",
        rounds_after - rounds_before
    );
    for &s in &addrs[1..] {
        wait_metric(s, DNS_LINKS, 3.0).await;
    }
    wait_metric(s4, DNS_LINKS, 3.0).await;
    addrs.push(s4);
    clients.push(start_client(s4, "c4"));
    all_reach_all(&addrs, &["c1", "c2", "c3", "c4"], dummy).await;

    // The second goes: out of DNS, then stopped. The others drop their link to it.
    dns.set(&ips(&[1, 3, 4])).unwrap();
    procs[1].terminate();
    assert!(procs[1].wait_exit(BOUND).is_some(), "server 2 did not exit");
    clients[1].kill();
    let rest = [addrs[0], addrs[2], addrs[3]];
    for &s in &rest {
        wait_metric(s, DNS_LINKS, 2.0).await;
        wait_metric(
            s,
            "rd_peer_links_removed{source=\"dns\",reason=\"removed\"}",
            1.0,
        )
        .await;
        // Its incoming link from the second is gone too.
        wait_metric(
            s,
            "session_server_total_remove_websocket_session{clientkey=\"server-2\",peer=\"true\"}",
            1.0,
        )
        .await;
    }
    all_reach_all(&rest, &["c1", "c3", "c4"], dummy).await;
    let gone = format!("/client/c2/http/{dummy}/hello.txt");
    poll_get(first, &gone, BOUND, |r| r.status == 500).await;

    // Same shape as the baseline (two peers, one client): the same descriptors, give or
    // take the test's own connections still closing.
    let deadline = Instant::now() + BOUND;
    loop {
        let fds = procs[0].open_fds();
        if fds <= baseline_fds + 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server 1 holds {fds} descriptors, {baseline_fds} before the fourth came and the second went"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
