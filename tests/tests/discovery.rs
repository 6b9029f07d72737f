//! DNS peer discovery with real processes: rd-server replicas on 127.0.0.1-4 (one port, as
//! pods behind a headless Service) find each other through a dnsmasq the test runs on
//! loopback, with the records in a hosts file it rewrites (SIGHUP makes dnsmasq reread it).
//! Requests entering any server reach every server's client; a server added to DNS joins
//! within two discovery rounds; one removed from DNS and stopped is dropped; links and file
//! descriptors come back to where they were.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rd_e2e_tests::*;

const NAME: &str = "rd-peers.test";
const HELLO: &str = "hello through discovered peers\n";
const TOKEN: &str = "shared-peer-secret";
/// Generous: debug binaries on a shared 2-core machine.
const BOUND: Duration = Duration::from_secs(30);

/// dnsmasq serving `NAME` from a hosts file, on 127.0.0.1 at a free UDP port.
struct Dnsmasq {
    child: Child,
    hosts: PathBuf,
    addr: SocketAddr,
    log: mpsc::Receiver<String>,
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        self.child.kill().ok();
        self.child.wait().ok();
    }
}

impl Dnsmasq {
    /// Starts dnsmasq; `Err` says why it cannot run here.
    fn start(dir: &Path, octets: &[u8]) -> Result<Self, String> {
        let binary = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or("dnsmasq is not installed (Debian: apt-get install dnsmasq-base)")?;
        let hosts = dir.join("hosts");
        write_hosts(&hosts, octets);
        let port = UdpSocket::bind("127.0.0.1:0")
            .and_then(|s| s.local_addr())
            .map_err(|e| format!("no free UDP port: {e}"))?
            .port();
        let mut child = Command::new(binary)
            .args([
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                "--user=root",
                "--pid-file=",
                "--log-facility=-",
                "--local-ttl=0",
                &format!("--port={port}"),
                &format!("--addn-hosts={}", hosts.display()),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {binary}: {e}"))?;
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut dns = Self {
            child,
            hosts,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        // dnsmasq reads the hosts file after binding its socket: once it says so, it answers.
        dns.wait_for_read()
            .map_err(|e| format!("dnsmasq did not start: {e}"))?;
        Ok(dns)
    }

    /// Waits for dnsmasq's "read <hosts file>" log line.
    fn wait_for_read(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains("read ") && line.contains("hosts") => return Ok(()),
                Ok(line) => seen.push(line),
                Err(_) => return Err(format!("no 'read hosts' line; log: {seen:?}")),
            }
        }
    }

    /// Serves `octets` from now on.
    fn set(&mut self, octets: &[u8]) {
        write_hosts(&self.hosts, octets);
        let status = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.wait_for_read().unwrap();
    }
}

fn write_hosts(path: &Path, octets: &[u8]) {
    let text: String = octets
        .iter()
        .map(|n| format!("127.0.0.{n} {NAME}\n"))
        .collect();
    // Write and rename, so dnsmasq never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
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
    let mut dns = match Dnsmasq::start(dir.path(), &[1, 2, 3]) {
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
    dns.set(&[1, 2, 3, 4]);
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
    dns.set(&[1, 3, 4]);
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
