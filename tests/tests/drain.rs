//! Graceful drain of rd-server on SIGTERM (issues 13 and 23): a download in flight completes
//! byte-exact within the grace period while /readyz fails and new requests that still reach
//! the draining server are served through the peer that holds the agent; the agents, which
//! hold a session with each replica, stay reachable through the other replica the whole
//! time; a stream still running at the deadline is cut and logged; a second SIGTERM exits
//! at once.
//!
//! The downloads are read by the test at its own pace: holding a read back keeps the
//! stream in flight (flow control pauses it) for as long as a step needs, without timing.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rd_e2e_tests::*;
use sha2::{Digest, Sha256};

const HELLO: &str = "hello\n";
/// The download: big enough that flow control holds most of it back while unread.
const BIG: usize = 32 << 20;
/// Bound on a step that should happen promptly; only reached on failure.
const STEP: Duration = Duration::from_secs(15);

/// An open download whose body the test reads when it chooses.
struct Download {
    status: u16,
    body: Incoming,
    received: Vec<u8>,
}

impl Download {
    async fn start(addr: SocketAddr, path: &str) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, addr.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = tokio::time::timeout(STEP, sender.send_request(req))
            .await
            .expect("response head in time")
            .unwrap();
        Self {
            status: response.status().as_u16(),
            body: response.into_body(),
            received: Vec::new(),
        }
    }

    /// Reads at least `n` more bytes (or to the end).
    async fn read_some(&mut self, n: usize) {
        let goal = self.received.len() + n;
        while self.received.len() < goal {
            match tokio::time::timeout(STEP, self.body.frame()).await.unwrap() {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.received.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => panic!("body failed after {} bytes: {e}", self.received.len()),
                None => return,
            }
        }
    }

    /// Reads to the end; the error if the body was cut.
    async fn finish(&mut self, bound: Duration) -> Result<(), String> {
        let read = async {
            while let Some(frame) = self.body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Ok(data) = f.into_data() {
                            self.received.extend_from_slice(&data);
                        }
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            Ok(())
        };
        tokio::time::timeout(bound, read)
            .await
            .unwrap_or_else(|_| Err(format!("body not over within {bound:?}")))
    }
}

/// A file of `BIG` pseudo-random bytes and its SHA-256.
fn big_file(dir: &std::path::Path) -> String {
    let mut data = vec![0u8; BIG];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(dir.join("big.bin"), &data).unwrap();
    std::fs::write(dir.join("hello.txt"), HELLO).unwrap();
    hex::encode(Sha256::digest(&data))
}

fn sessions_of(server: &Proc, id: &str) -> usize {
    server
        .stderr()
        .matches(&format!("Handling backend connection request [{id}]"))
        .count()
}

/// Two free, distinct ports.
fn two_ports() -> (u16, u16) {
    loop {
        let (a, b) = (free_port(), free_port());
        if a != b {
            return (a, b);
        }
    }
}

/// Server `id` on 127.0.0.1:`port` with `extra` flags, peered with `peer` if given.
fn start_server(
    id: &str,
    port: u16,
    peer: Option<(&str, u16)>,
    extra: &[&str],
) -> Option<(Proc, SocketAddr)> {
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["-listen", &listen, "-id", id, "-token", "aaa"];
    let peers;
    if let Some((peer_id, peer_port)) = peer {
        peers = format!("{peer_id}:aaa:ws://127.0.0.1:{peer_port}/connect");
        args.extend(["-peers", &peers]);
    }
    args.extend(extra);
    let mut p = Proc::start("rd-server", &args);
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.wait_listening()))
        .ok()
        .map(|addr| (p, addr))
}

fn wait_for_log(server: &Proc, what: &str) {
    wait_until(&format!("{what:?} in the server's log"), STEP, || {
        server.stderr().contains(what)
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_download_finish_and_the_agents_stay_reachable() {
    let dir = TempDir::new("drain");
    let sha = big_file(dir.path());
    let (_dummy, dummy) = start_dummy(dir.path());
    let ((mut a, a_addr), (b, b_addr)) = (0..2)
        .find_map(|_| {
            let (pa, pb) = two_ports();
            let a = start_server("a", pa, Some(("b", pb)), &["--grace-period", "60s"])?;
            let b = start_server("b", pb, Some(("a", pa)), &[])?;
            Some((a, b))
        })
        .expect("two peered servers");
    // Both agents know both servers and hold a session with each.
    let urls = format!("ws://{a_addr}/connect,ws://{b_addr}/connect");
    let _foo = Proc::start("rd-client", &["-connect", &urls, "-id", "foo"]);
    let _bar = Proc::start("rd-client", &["-connect", &urls, "-id", "bar"]);
    let ok = |r: &Reply| r.status == 200 && r.text() == HELLO;
    let hello = |id: &str| format!("/client/{id}/http/{dummy}/hello.txt");
    for id in ["foo", "bar"] {
        for server in [&a, &b] {
            wait_until(&format!("{id}'s session on each server"), STEP, || {
                sessions_of(server, id) == 1
            });
        }
        poll_get(a_addr, &hello(id), STEP, ok).await;
        poll_get(b_addr, &hello(id), STEP, ok).await;
    }
    // Each server reached each agent through its own session: no peer hop.
    for server in [a_addr, b_addr] {
        assert_eq!(metric(server, "rd_dials{route=\"peer\"}").await, None);
        assert!(metric(server, "rd_dials{route=\"local\"}").await >= Some(2.0));
    }

    // A download through foo's session on a, partly read, then held: in flight when the
    // drain begins.
    let mut download = Download::start(a_addr, &format!("/client/foo/http/{dummy}/big.bin")).await;
    assert_eq!(download.status, 200);
    download.read_some(1 << 20).await;

    a.terminate();
    wait_for_log(&a, "draining");
    // Not ready at once; a request that still reaches a (a load balancer learns of the
    // drain only at its next probe) is served, through b, which holds the agent.
    let r = try_get(a_addr, "/readyz", STEP).await.unwrap();
    assert_eq!(r.status, 503, "{}", r.text());
    for id in ["foo", "bar"] {
        let r = try_get(a_addr, &hello(id), STEP).await.unwrap();
        assert!(
            ok(&r),
            "{id} through the draining server: {} {}",
            r.status,
            r.text()
        );
        let r = try_get(b_addr, &hello(id), STEP).await.unwrap();
        assert!(ok(&r), "{id} through b: {} {}", r.status, r.text());
    }
    assert!(metric(a_addr, "rd_dials{route=\"peer\"}").await >= Some(2.0));
    assert_eq!(
        metric(b_addr, "rd_dials{route=\"peer\"}").await,
        None,
        "b never needed a"
    );
    assert!(a.is_running(), "a waits for the download");
    // The agents were told, and made no second session with b (they hold one already).
    assert_eq!((sessions_of(&b, "foo"), sessions_of(&b, "bar")), (1, 1));

    // The rest of the download arrives, byte-exact.
    download.finish(STEP).await.unwrap();
    assert_eq!(download.received.len(), BIG);
    assert_eq!(hex::encode(Sha256::digest(&download.received)), sha);

    // a is done: it exits cleanly, well within its grace period.
    let status = a
        .wait_exit(STEP)
        .expect("a exits once its last stream is over");
    assert!(status.success(), "{status:?}\n{}", a.stderr());
    let log = a.stderr();
    assert!(log.contains("finished_in_time=true"), "{log}");
    assert!(log.contains("agents_told=2"), "{log}");
    assert!(!log.contains("stream cut"), "{log}");
    for id in ["foo", "bar"] {
        let r = poll_get(b_addr, &hello(id), STEP, ok).await;
        assert_eq!(r.text(), HELLO);
    }
}

async fn metric(server: SocketAddr, series: &str) -> Option<f64> {
    let text = try_get(server, "/metrics", STEP).await.unwrap().text();
    sample(&text, series)
}

/// One server, one agent, one download held unread (so in flight) for SIGTERM to find.
struct Held {
    server: Proc,
    download: Download,
    dummy: SocketAddr,
    // Kept running until the test ends: the download must not end on its own.
    _processes: (Proc, Proc, TempDir),
}

async fn held_download(grace: &str) -> Held {
    let dir = TempDir::new("drain-cut");
    big_file(dir.path());
    let (dummy_proc, dummy) = start_dummy(dir.path());
    let (server, addr) = (0..2)
        .find_map(|_| start_server("a", free_port(), None, &["--grace-period", grace]))
        .expect("a server");
    let client = Proc::start(
        "rd-client",
        &["-connect", &format!("ws://{addr}/connect"), "-id", "foo"],
    );
    let hello = format!("/client/foo/http/{dummy}/hello.txt");
    poll_get(addr, &hello, STEP, |r| r.status == 200).await;
    let mut download = Download::start(addr, &format!("/client/foo/http/{dummy}/big.bin")).await;
    assert_eq!(download.status, 200);
    download.read_some(1 << 20).await;
    Held {
        server,
        download,
        dummy,
        _processes: (dummy_proc, client, dir),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_running_at_the_deadline_is_cut_and_logged() {
    // Fields taken one by one: the rest (the agent, rd-dummy) lives until the test ends.
    let mut held = held_download("1s").await;
    let (server, download, dummy) = (&mut held.server, &mut held.download, held.dummy);
    server.terminate();
    let status = server
        .wait_exit(STEP)
        .expect("exits after its 1 s grace period");
    assert!(status.success(), "{status:?}");
    let log = server.stderr();
    let cut = log
        .lines()
        .find(|l| l.contains("stream cut at the drain deadline"))
        .unwrap_or_else(|| panic!("no cut stream logged:\n{log}"));
    for field in [
        "client=foo".to_owned(),
        format!("target=tcp/{dummy}"),
        "bytes_received=".to_owned(),
    ] {
        assert!(cut.contains(&field), "{field} missing from {cut}");
    }
    assert!(log.contains("streams_cut=1"), "{log}");
    assert!(
        download.finish(STEP).await.is_err() || download.received.len() < BIG,
        "the cut download cannot be complete"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once() {
    let mut held = held_download("300s").await;
    let server = &mut held.server;
    server.terminate();
    wait_for_log(server, "draining");
    server.terminate();
    // Far below the 300 s grace period: the second signal does not wait for the download.
    server.wait_exit(STEP).expect("exits at the second SIGTERM");
    assert!(
        server.stderr().contains("second signal"),
        "{}",
        server.stderr()
    );
}
