//! Client failover between replicas: three rd-server processes on 127.0.0.1, .2 and .3
//! (same port), peered with static `-peers`; rd-clients given all three. One holding a
//! single session (`--sessions 1`) moves to another server at once when its own is killed
//! (SIGKILL); one holding a session with each (the default) loses nothing: requests
//! entering the survivors reach it throughout.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rd_e2e_tests::*;

const HELLO: &str = "hello through whichever replica\n";

/// Bound on the client being back on another server after its own was killed (issue 13).
const FAILOVER_BOUND: Duration = Duration::from_secs(2);

/// The line a server logs when a client's session starts.
fn sessions_of(server: &Proc, id: &str) -> usize {
    server
        .stderr()
        .matches(&format!("Handling backend connection request [{id}]"))
        .count()
}

/// Three peered servers on 127.0.0.{1,2,3}:port; `None` if one could not listen.
fn start_three(port: u16) -> Option<Vec<(Proc, SocketAddr)>> {
    let mut servers = Vec::new();
    for i in 1..=3u8 {
        let listen = format!("127.0.0.{i}:{port}");
        let peers: Vec<String> = (1..=3u8)
            .filter(|&j| j != i)
            .map(|j| format!("s{j}:aaa:ws://127.0.0.{j}:{port}/connect"))
            .collect();
        let id = format!("s{i}");
        let args = [
            "-listen",
            &listen,
            "-id",
            &id,
            "-token",
            "aaa",
            "-peers",
            &peers.join(","),
        ];
        let mut p = Proc::start("rd-server", &args);
        let addr =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| p.wait_listening())).ok()?;
        servers.push((p, addr));
    }
    Some(servers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_moves_to_another_replica_when_its_server_is_killed() {
    let dir = TempDir::new("failover");
    std::fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    let (_dummy, dummy) = start_dummy(dir.path());
    let mut servers = match (0..2).find_map(|_| start_three(free_port())) {
        Some(s) => s,
        None => panic!("could not start three servers on 127.0.0.1-3 (tried two ports)"),
    };
    let port = servers[0].1.port();
    let urls: Vec<String> = (1..=3)
        .map(|i| format!("ws://127.0.0.{i}:{port}/connect"))
        .collect();
    // One session: with one per replica (the default) the agent may already hold the
    // others when the kill comes, and then has nowhere to move (it raced the fill).
    let _client = Proc::start(
        "rd-client",
        &["-connect", &urls.join(","), "-id", "foo", "--sessions", "1"],
    );
    let _all = Proc::start("rd-client", &["-connect", &urls.join(","), "-id", "all"]);
    let all_path = format!("/client/all/http/{dummy}/hello.txt");
    let path = format!("/client/foo/http/{dummy}/hello.txt");
    let ok = |r: &Reply| r.status == 200 && r.text() == HELLO;

    // Reachable through every server: directly on one, through the peers on the others.
    for (_, addr) in &servers {
        poll_get(*addr, &path, Duration::from_secs(15), ok).await;
    }
    // `all` holds a session with each.
    for (p, _) in &servers {
        wait_until(
            "all's session on each server",
            Duration::from_secs(15),
            || sessions_of(p, "all") == 1,
        );
    }
    let on = servers
        .iter()
        .position(|(p, _)| sessions_of(p, "foo") == 1)
        .expect("one server holds foo's session");
    let before: Vec<usize> = servers.iter().map(|(p, _)| sessions_of(p, "foo")).collect();

    let killed_at = Instant::now();
    servers[on].0.kill();
    let (_, gone) = servers.remove(on);
    // `all` never needed to move: every request through the survivors reaches it.
    for (_, addr) in &servers {
        for _ in 0..10 {
            let r = try_get(*addr, &all_path, Duration::from_secs(15))
                .await
                .unwrap();
            assert!(ok(&r), "all through {addr}: {} {}", r.status, r.text());
        }
    }
    // Back on one of the others: its session count for foo goes up.
    let mut before = before;
    before.remove(on);
    let mut moved_to = None;
    while moved_to.is_none() {
        moved_to = servers
            .iter()
            .zip(&before)
            .position(|((p, _), b)| sessions_of(p, "foo") > *b);
        assert!(
            killed_at.elapsed() < FAILOVER_BOUND || moved_to.is_some(),
            "foo not back on another server within {FAILOVER_BOUND:?} of {gone} dying"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let moved_after = killed_at.elapsed();
    assert!(
        moved_after < FAILOVER_BOUND,
        "foo took {moved_after:?} to move"
    );

    // Requests entering either survivor reach it again.
    for (_, addr) in &servers {
        let r = poll_get(*addr, &path, Duration::from_secs(15), ok).await;
        assert_eq!(r.text(), HELLO);
    }
}
