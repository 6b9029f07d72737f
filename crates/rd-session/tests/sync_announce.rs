//! SyncConnections, AddClient/RemoveClient announcements and the metrics observer.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt as _;
use rd_proto::{ClientSession, ConnId, Message, Target};
use rd_session::{SessionBuilder, SessionObserver};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// A raw client's SyncConnections closes server streams it does not list ("sync from
/// client", no Error sent), but only those older than one sync interval.
#[tokio::test(start_paused = true)]
async fn sync_from_client_closes_unlisted_old_streams() {
    let (server, mut peer) = raw_client().await;
    let mut old = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    let mut listed = server.dial_addr("tcp", "127.0.0.1:2").unwrap();
    let (old_id, _) = peer.expect_connect().await;
    let (listed_id, _) = peer.expect_connect().await;
    // Keep the session alive with pings while virtual time passes.
    for _ in 0..14 {
        tokio::time::advance(Duration::from_secs(5)).await;
        peer.ws.send(WsMessage::Ping(Bytes::new())).await.unwrap();
    }
    let young = server.dial_addr("tcp", "127.0.0.1:3").unwrap();
    let (young_id, _) = peer.expect_connect().await;
    peer.send(&Message::SyncConnections {
        ids: vec![listed_id.0],
    })
    .await;
    let err = within(BOUND, "old stream closed", old.read(&mut [0u8; 4]))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "sync from client");
    // The listed and the young (Connect possibly still in flight) streams live on.
    peer.send(&Message::Data {
        conn_id: listed_id,
        payload: Bytes::from_static(b"ok"),
    })
    .await;
    let mut buf = [0u8; 2];
    within(BOUND, "listed", listed.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"ok");
    assert_eq!(server.stats().streams, 3);
    // No Error went out for the synced stream: the next message is our marker's answer.
    peer.send(&Message::Data {
        conn_id: ConnId(4242),
        payload: Bytes::new(),
    })
    .await;
    match peer.expect_message().await {
        Message::Error { conn_id, text } => {
            assert_eq!(conn_id, ConnId(4242), "{text}");
        }
        other => panic!("unexpected {}", summary(&other)),
    }
    drop((old, young));
    let _ = (old_id, young_id);
}

/// A client-side session lists its live streams in SyncConnections every 60 s.
#[tokio::test(start_paused = true)]
async fn client_sync_lists_live_streams() {
    let (client, mut peer) =
        raw_server_of(SessionBuilder::client().connect_handler(echo_handler())).await;
    for id in [2, 3, 5] {
        peer.send(&Message::Connect {
            conn_id: ConnId(id),
            target: Target::new("tcp", "127.0.0.1:7").unwrap(),
        })
        .await;
    }
    peer.send(&Message::Error {
        conn_id: ConnId(3),
        text: "EOF".into(),
    })
    .await;
    let sync = within(Duration::from_secs(120), "sync", async {
        loop {
            match peer.next_frame().await.expect("ended").message {
                Message::SyncConnections { ids } => return ids,
                Message::Error { .. } => {}
                other => panic!("unexpected {}", summary(&other)),
            }
        }
    })
    .await;
    assert_eq!(sync, vec![2, 5]);
    assert_eq!(client.end(), None);
}

/// AddClient/RemoveClient from a peer reach the server's callback; a client session's
/// announcements reach the wire; client sessions ignore received announcements.
#[tokio::test]
async fn announcements_reach_the_callback_and_the_wire() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let (server, mut peer) = raw_client_of(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY)
            .on_announcement(move |c, added| seen2.lock().unwrap().push((c, added))),
    )
    .await;
    let bar = ClientSession {
        client_key: "bar".into(),
        session_key: 42,
    };
    peer.send(&Message::AddClient(bar.clone())).await;
    peer.send(&Message::RemoveClient(bar.clone())).await;
    // A round trip so both were processed.
    peer.send(&Message::Data {
        conn_id: ConnId(1),
        payload: Bytes::new(),
    })
    .await;
    assert!(matches!(peer.expect_message().await, Message::Error { .. }));
    assert_eq!(
        *seen.lock().unwrap(),
        vec![(bar.clone(), true), (bar.clone(), false)]
    );
    server.announce(bar.clone(), true);
    assert_eq!(peer.expect_message().await, Message::AddClient(bar.clone()));
    server.announce(bar.clone(), false);
    assert_eq!(peer.expect_message().await, Message::RemoveClient(bar));
}

#[derive(Default)]
struct Counts {
    opened: AtomicUsize,
    closed: AtomicUsize,
    transmitted: AtomicUsize,
    received: AtomicUsize,
    resets: AtomicUsize,
}

impl SessionObserver for Counts {
    fn stream_opened(&self, _: &Target) {
        self.opened.fetch_add(1, Ordering::SeqCst);
    }
    fn stream_closed(&self, _: &Target) {
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
    fn transmitted(&self, n: usize) {
        self.transmitted.fetch_add(n, Ordering::SeqCst);
    }
    fn received(&self, n: usize) {
        self.received.fetch_add(n, Ordering::SeqCst);
    }
    fn reset(&self, _: &str) {
        self.resets.fetch_add(1, Ordering::SeqCst);
    }
}

/// The observer sees every stream open and close and every byte each way.
#[tokio::test]
async fn observer_counts_streams_and_bytes() {
    let counts = Arc::new(Counts::default());
    let pair = pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY).observer(counts.clone()),
        SessionBuilder::client().connect_handler(echo_handler()),
    )
    .await;
    for i in 0..5 {
        let mut s = pair
            .server
            .dial_addr("tcp", &format!("127.0.0.1:{i}"))
            .unwrap();
        let data = vec![i as u8; 1000 * (i + 1)];
        s.write_all(&data).await.unwrap();
        let mut back = vec![0u8; data.len()];
        within(BOUND, "echo", s.read_exact(&mut back))
            .await
            .unwrap();
        assert_eq!(back, data);
    }
    let total: usize = (1..=5).map(|i| 1000 * i).sum();
    assert_eq!(counts.opened.load(Ordering::SeqCst), 5);
    assert_eq!(counts.closed.load(Ordering::SeqCst), 5);
    assert_eq!(counts.transmitted.load(Ordering::SeqCst), total);
    assert_eq!(counts.received.load(Ordering::SeqCst), total);
    assert_eq!(counts.resets.load(Ordering::SeqCst), 0);
    // An incoming Connect refused for lack of a handler is opened, reset and closed.
    let mut refused = pair.client.dial_addr("tcp", "127.0.0.1:22").unwrap();
    assert!(within(BOUND, "refused", refused.read(&mut [0u8; 1]))
        .await
        .is_err());
    assert_eq!(counts.opened.load(Ordering::SeqCst), 6);
    assert_eq!(counts.resets.load(Ordering::SeqCst), 1);
    assert_eq!(counts.closed.load(Ordering::SeqCst), 6);
}
