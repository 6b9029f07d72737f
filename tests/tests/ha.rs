//! HA with real rd-server processes peered as in the Go README: requests to the second
//! server reach a client connected to the first, across restarts and disconnects, while the
//! second keeps serving its own client throughout.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rd_e2e_tests::*;

const HELLO: &str = "hello from a peer's client\n";

/// Starts a peered server `id` on 127.0.0.1:`port` linking to `peer_id` at `peer_port`.
/// `None` if it could not listen (the port was taken meanwhile).
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

/// Two free, distinct ports.
fn two_ports() -> (u16, u16) {
    loop {
        let (a, b) = (free_port(), free_port());
        if a != b {
            return (a, b);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_server_routes_to_the_firsts_client_across_restarts() {
    let dir = TempDir::new("ha");
    std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    let (_dummy, dummy) = start_dummy(dir.path());

    // The ports must be known before start for -peers: pick free ones, retry once if one
    // was taken in between.
    let mut attempt = 0;
    let (mut first, _second, second_addr, p1) = loop {
        attempt += 1;
        let (p1, p2) = two_ports();
        let Some((first, _)) = start_peer("first", p1, "second", p2) else {
            assert!(attempt < 2, "could not start the first server");
            continue;
        };
        let Some((second, second_addr)) = start_peer("second", p2, "first", p1) else {
            assert!(attempt < 2, "could not start the second server");
            continue;
        };
        break (first, second, second_addr, p1);
    };
    let first_addr: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();

    let mut client = Proc::start(
        "rd-client",
        &[
            "-connect",
            &format!("ws://{first_addr}/connect"),
            "-id",
            "foo",
        ],
    );
    let path = format!("/client/foo/http/{dummy}/hello.txt");
    let ok = |r: &Reply| r.status == 200;
    let no_session =
        |r: &Reply| r.status == 500 && r.text() == "failed to find Session for client foo\n";

    // Directly, then through the peer once the first has announced the client.
    let r = poll_get(first_addr, &path, Duration::from_secs(15), ok).await;
    assert_eq!(r.text(), HELLO);
    let r = poll_get(second_addr, &path, Duration::from_secs(15), ok).await;
    assert_eq!(r.text(), HELLO);

    // A client of the second: requests for it must keep working while the first dies and
    // comes back.
    let _bar = Proc::start(
        "rd-client",
        &[
            "-connect",
            &format!("ws://{second_addr}/connect"),
            "-id",
            "bar",
        ],
    );
    let bar_path = format!("/client/bar/http/{dummy}/hello.txt");
    let r = poll_get(second_addr, &bar_path, Duration::from_secs(15), ok).await;
    assert_eq!(r.text(), HELLO);
    // Through the first too, once the second has announced bar to it.
    let r = poll_get(first_addr, &bar_path, Duration::from_secs(15), ok).await;
    assert_eq!(r.text(), HELLO);
    let stop = Arc::new(AtomicBool::new(false));
    let survivor = {
        let (stop, bar_path) = (stop.clone(), bar_path.clone());
        tokio::spawn(async move {
            let (mut served, mut failures) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match try_get(second_addr, &bar_path, Duration::from_secs(5)).await {
                    Ok(r) if r.status == 200 && r.text() == HELLO => served += 1,
                    other => failures.push(format!("{:?}", other.map(|r| (r.status, r.text())))),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (served, failures)
        })
    };

    // The first dies: its route disappears from the second.
    first.kill();
    poll_get(second_addr, &path, Duration::from_secs(15), no_session).await;

    // It comes back on the same port: its link to the second returns, the client redials,
    // and routing through the second resumes.
    let mut restarted = None;
    for _ in 0..3 {
        restarted = start_peer("first", p1, "second", second_addr.port());
        if restarted.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_first_again, _) = restarted.expect("restarting the first server on its port");
    let r = poll_get(second_addr, &path, Duration::from_secs(35), ok).await;
    assert_eq!(r.text(), HELLO);
    // The routes the other way come back too: the first reaches the second's client.
    let r = poll_get(first_addr, &bar_path, Duration::from_secs(35), ok).await;
    assert_eq!(r.text(), HELLO);
    stop.store(true, Ordering::Relaxed);
    let (served, failures) = tokio::time::timeout(Duration::from_secs(10), survivor)
        .await
        .expect("the survivor's request loop to stop")
        .unwrap();
    assert!(
        failures.is_empty(),
        "requests for the surviving server's client failed while its peer was down \
         ({served} served): {failures:?}"
    );
    assert!(served > 0);
    let metrics = try_get(second_addr, "/metrics", Duration::from_secs(5))
        .await
        .unwrap()
        .text();
    let links = sample(
        &metrics,
        "session_server_total_add_websocket_session{clientkey=\"first\",peer=\"true\"}",
    );
    assert!(
        links.is_some_and(|n| n >= 2.0),
        "the first's peer link must have connected twice: {links:?}\n{metrics}"
    );

    // The client goes away: the key disappears from the second within a bounded time.
    client.kill();
    poll_get(second_addr, &path, Duration::from_secs(15), no_session).await;
    poll_get(first_addr, &path, Duration::from_secs(5), no_session).await;
}
