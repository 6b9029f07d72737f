//! DNS peer discovery against fake resolvers: the peer set follows the records round by
//! round (links added, removed, kept through a failed lookup, static links untouched),
//! readiness waits for the first round, and servers that find each other (and themselves)
//! through the same name peer without any static configuration.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use common::*;
use rd_server::proxy::ClientProxy;
use rd_server::{
    PeerDiscovery, PeerLinkInfo, Resolve, ResolveError, ResolveFuture, Server, TunnelIdHeader,
};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Mutex};

type Answer = Result<Vec<IpAddr>, ResolveError>;

/// A resolver the test drives: each lookup reports itself, then waits for the test's
/// answer. A lookup starting means the previous round's answer was applied in full.
struct Scripted {
    called: mpsc::UnboundedSender<String>,
    answers: Mutex<mpsc::UnboundedReceiver<Answer>>,
}

impl Resolve for Scripted {
    fn resolve<'a>(&'a self, name: &'a str) -> ResolveFuture<'a> {
        Box::pin(async move {
            self.called.send(name.to_owned()).ok();
            self.answers
                .lock()
                .await
                .recv()
                .await
                .unwrap_or_else(|| Err(ResolveError::NotFound(name.to_owned())))
        })
    }
}

/// Drives a [`Scripted`] resolver.
struct Script {
    called: mpsc::UnboundedReceiver<String>,
    answers: mpsc::UnboundedSender<Answer>,
}

impl Script {
    fn new() -> (Scripted, Self) {
        let (called_tx, called) = mpsc::unbounded_channel();
        let (answers, answers_rx) = mpsc::unbounded_channel();
        let resolver = Scripted {
            called: called_tx,
            answers: Mutex::new(answers_rx),
        };
        (resolver, Self { called, answers })
    }

    /// Waits for a lookup of `peers.test`.
    async fn lookup(&mut self) {
        let name = bounded("a discovery lookup", self.called.recv()).await;
        assert_eq!(name.as_deref(), Some("peers.test"));
    }

    /// Answers the pending lookup and waits until the round is applied (the next lookup).
    async fn answer(&mut self, answer: Answer) {
        self.answers.send(answer).unwrap();
        self.lookup().await;
    }
}

fn ips(last_octets: &[u8]) -> Vec<IpAddr> {
    last_octets
        .iter()
        .map(|n| IpAddr::from([127, 0, 0, *n]))
        .collect()
}

fn dns_urls(links: &[PeerLinkInfo]) -> Vec<String> {
    links
        .iter()
        .filter(|l| l.source == "dns")
        .map(|l| l.url.clone())
        .collect()
}

#[tokio::test]
async fn peer_set_follows_the_records() {
    let (resolver, mut script) = Script::new();
    // Nothing listens there: the links only redial, which is all this test needs.
    let port = closed_port();
    let discovery: PeerDiscovery = format!("peers.test:{port}").parse().unwrap();
    let server = Server::builder(TunnelIdHeader)
        .peer_identity("a", "tok")
        .peer_discovery(
            discovery
                .interval(Duration::from_millis(10))
                .resolver(resolver),
        )
        .build();
    server.add_peer("ws://127.0.0.1:1/connect", "static-peer", "tok");
    let url = |n: u8| format!("ws://127.0.0.{n}:{port}/connect");

    // Not ready until the first round is done.
    script.lookup().await;
    assert!(!server.peers_discovered());
    assert!(!server.is_ready());
    script.answer(Ok(ips(&[2, 3]))).await;
    // The round is done, but nothing listens there, so no discovered peer links back: not
    // ready (for two intervals and a second), requests entering here would miss their clients.
    assert!(!server.peers_discovered() && !server.is_ready());
    assert_eq!(dns_urls(&server.peer_links()), [url(2), url(3)]);

    // One address goes, another comes.
    script.answer(Ok(ips(&[3, 4]))).await;
    assert_eq!(dns_urls(&server.peer_links()), [url(3), url(4)]);

    // A failed lookup changes nothing; an empty name removes every discovered link.
    let failed = ResolveError::Failed {
        name: "peers.test".into(),
        reason: "test".into(),
    };
    script.answer(Err(failed)).await;
    assert_eq!(dns_urls(&server.peer_links()), [url(3), url(4)]);
    script
        .answer(Err(ResolveError::NotFound("peers.test".into())))
        .await;
    assert!(dns_urls(&server.peer_links()).is_empty());
    // No discovered peer left to wait for.
    assert!(server.peers_discovered() && server.is_ready());

    // The static peer was never touched.
    let links = server.peer_links();
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(
        (links[0].source, links[0].id.as_deref()),
        ("static", Some("static-peer"))
    );

    let metrics = server.encode_metrics();
    for (series, want) in [
        ("rd_peer_links{source=\"dns\"}", 0.0),
        ("rd_peer_links{source=\"static\"}", 1.0),
        ("rd_peer_links_added{source=\"dns\"}", 3.0),
        (
            "rd_peer_links_removed{source=\"dns\",reason=\"removed\"}",
            3.0,
        ),
        ("rd_peer_discovery_rounds{result=\"ok\"}", 3.0),
        ("rd_peer_discovery_rounds{result=\"failed\"}", 1.0),
    ] {
        assert_eq!(sample(&metrics, series), Some(want), "{series}\n{metrics}");
    }

    // Draining turns readiness off and nothing else.
    server.begin_drain();
    assert!(server.is_draining() && !server.is_ready() && server.is_accepting());
    server.shutdown(Duration::from_secs(1)).await;
}

/// Always answers the same addresses.
struct Fixed(Vec<IpAddr>);

impl Resolve for Fixed {
    fn resolve<'a>(&'a self, _name: &'a str) -> ResolveFuture<'a> {
        let found = self.0.clone();
        Box::pin(async move { Ok(found) })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_found_through_one_name_peer_with_each_other_and_not_themselves() {
    // Three servers on 127.0.0.1-3, one port, as replicas behind a headless Service.
    let first = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = first.local_addr().unwrap().port();
    let mut listeners = vec![first];
    for n in [2, 3] {
        let addr = SocketAddr::from(([127, 0, 0, n], port));
        match TcpListener::bind(addr).await {
            Ok(l) => listeners.push(l),
            Err(e) => {
                eprintln!(
                    "skipping: cannot listen on {addr} ({e}); 127.0.0.0/8 is not all loopback here"
                );
                return;
            }
        }
    }
    let discovery: PeerDiscovery = format!("peers.test:{port}").parse().unwrap();
    let discovery = discovery
        .interval(Duration::from_millis(50))
        .resolver(Fixed(ips(&[1, 2, 3])));
    let ids = ["a", "b", "c"];
    let servers: Vec<TestServer> = ids
        .iter()
        .zip(listeners)
        .map(|(id, listener)| {
            let server = Server::builder(TunnelIdHeader)
                .peer_identity(*id, "tok")
                .peer_discovery(discovery.clone())
                .build();
            serve_on(server.clone(), ClientProxy::new(server), listener)
        })
        .collect();

    // Each links to the two others, learns their ids, and drops the address that is itself.
    for (ts, own) in servers.iter().zip(ids) {
        wait_until("two connected discovered links", || {
            let links = ts.server.peer_links();
            links.len() == 2 && links.iter().all(|l| l.connected)
        })
        .await;
        let learned: BTreeSet<_> = ts
            .server
            .peer_links()
            .into_iter()
            .filter_map(|l| l.id)
            .collect();
        let others: BTreeSet<_> = ids
            .iter()
            .filter(|id| **id != own)
            .map(|id| id.to_string())
            .collect();
        assert_eq!(learned, others, "links of {own}");
        let metrics = ts.server.encode_metrics();
        assert_eq!(
            sample(
                &metrics,
                "rd_peer_links_removed{source=\"dns\",reason=\"self\"}"
            ),
            Some(1.0),
            "{own}: {metrics}"
        );
    }

    // A client of the first is reachable through the others.
    let greeting = b"hello from foo's side\n";
    let echo = spawn_echo(greeting).await;
    let _foo = connected_agent(&servers[0], "foo").await;
    for ts in &servers[1..] {
        wait_until("the peer's route to foo", || ts.server.has_session("foo")).await;
        let reply = echo_through(&ts.server, "foo", echo, greeting.len()).await;
        assert_eq!(
            reply.as_bytes(),
            [&greeting[..], b"ping".as_slice()].concat()
        );
    }
}
