//! Keepalive on virtual time: client-side sessions ping every 5 s; a session that hears no
//! ping or pong for 60 s ends, however much Data flows; answering pings keeps it up.
//! Server-side sessions ping a peer that has been silent for a tick, and a peer that took
//! part in keepalive and then goes silent is dropped after the answer timeout (15 s).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt as _;
use rd_proto::{Config, Message, SessionEnd};
use rd_session::SessionBuilder;
use tokio::io::AsyncReadExt as _;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[tokio::test(start_paused = true)]
async fn client_session_pings_every_five_seconds() {
    let (client, mut peer) = raw_server_of(SessionBuilder::client()).await;
    let start = Instant::now();
    let mut pings = Vec::new();
    let mut syncs = Vec::new();
    let end = start + Duration::from_secs(62);
    loop {
        let msg = tokio::select! {
            m = peer.next_ws() => m.expect("the session ended"),
            () = tokio::time::sleep_until(end) => break,
        };
        let at = Instant::now() - start;
        match msg {
            // tungstenite answers the ping with a pong when we read on.
            WsMessage::Ping(payload) => {
                assert!(payload.is_empty(), "Go's pings are empty");
                pings.push(at);
            }
            WsMessage::Binary(b) => syncs.push((at, rd_proto::decode(b).unwrap().message)),
            other => panic!("unexpected {other:?}"),
        }
    }
    let expected: Vec<Duration> = (1..=12).map(|i| Duration::from_secs(5 * i)).collect();
    assert_eq!(pings, expected);
    // And SyncConnections once, after 60 s, listing no connections.
    assert_eq!(
        syncs,
        vec![(
            Duration::from_secs(60),
            Message::SyncConnections { ids: vec![] }
        )]
    );
    // The pongs kept it alive past 60 s.
    assert_eq!(client.end(), None);
}

/// A raw client that never pings a server-side session is dropped after 60 s, although it
/// sends Data every second.
#[tokio::test(start_paused = true)]
async fn server_drops_a_peer_without_pings_despite_data() {
    let (server, mut peer) = raw_client().await;
    let start = Instant::now();
    let mut stream = server.dial_addr("tcp", "127.0.0.1:8125").unwrap();
    let (id, _) = peer.expect_connect().await;
    let reader = tokio::spawn(async move {
        let mut n = 0usize;
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return (n, None),
                Ok(k) => n += k,
                Err(e) => return (n, Some(e)),
            }
        }
    });
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut sent = 0usize;
        loop {
            tick.tick().await;
            let msg = Message::Data {
                conn_id: id,
                payload: Bytes::from_static(b"still here"),
            };
            if peer
                .ws
                .send(WsMessage::Binary(msg.to_bytes(1)))
                .await
                .is_err()
            {
                return sent;
            }
            sent += 10;
        }
    });
    let end = within(
        Duration::from_secs(120),
        "keepalive timeout",
        server.closed(),
    )
    .await;
    assert_eq!(end, SessionEnd::KeepaliveTimeout(Duration::from_secs(60)));
    let elapsed = Instant::now() - start;
    assert!(
        elapsed >= Duration::from_secs(60) && elapsed <= Duration::from_secs(61),
        "{elapsed:?}"
    );
    let (received, err) = within(Duration::from_secs(1), "reader", reader)
        .await
        .unwrap();
    assert!(received >= 500, "Data was delivered meanwhile: {received}");
    let err = err.expect("the stream ends with an error");
    assert_eq!(err.to_string(), "tunnel disconnect");
    let sent = within(Duration::from_secs(10), "sender notices", sender)
        .await
        .unwrap();
    assert!(sent >= received);
}

/// A raw client that pings every 5 s keeps a server-side session up for ten minutes.
#[tokio::test(start_paused = true)]
async fn server_stays_up_while_the_peer_pings() {
    let (server, mut peer) = raw_client().await;
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let mut pongs = 0;
    while Instant::now() - start < Duration::from_secs(600) {
        tokio::select! {
            _ = tick.tick() => peer.ws.send(WsMessage::Ping(Bytes::new())).await.unwrap(),
            m = peer.next_ws() => match m.expect("session ended") {
                WsMessage::Pong(p) => {
                    assert!(p.is_empty());
                    pongs += 1;
                }
                other => panic!("unexpected {other:?}"),
            },
        }
    }
    assert!(pongs >= 115, "rd answers pings: {pongs}");
    assert_eq!(server.end(), None);
    // Still usable.
    let _s = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    let (id, target) = peer.expect_connect().await;
    assert_eq!((id.0, target.as_str()), (2, "tcp/127.0.0.1:1"));
}

/// Go's timing, where only the keepalive timeout applies.
fn go_config() -> Config {
    let mut c = Config::default();
    c.server_ping_after = None;
    c.answer_timeout = None;
    c
}

/// A client-side session whose peer answers its pings stays up for ten minutes; one whose
/// peer stops answering ends 60 s after the last pong (Go's timing, without the answer
/// timeout).
#[tokio::test(start_paused = true)]
async fn client_stays_up_while_pongs_come_and_ends_without_them() {
    let (client, mut peer) = raw_server_of(SessionBuilder::client().config(go_config())).await;
    let start = Instant::now();
    let mut pings = 0;
    // Reading lets tungstenite answer each ping with a pong.
    while Instant::now() - start < Duration::from_secs(600) {
        if let WsMessage::Ping(_) = peer.next_ws().await.expect("session ended") {
            pings += 1;
        }
    }
    assert_eq!(pings, 120);
    assert_eq!(client.end(), None);
    // Stop reading (no more pongs): the client gives up 60 s after the last pong.
    let last = Instant::now();
    let end = within(Duration::from_secs(120), "client timeout", client.closed()).await;
    assert_eq!(end, SessionEnd::KeepaliveTimeout(Duration::from_secs(60)));
    let waited = Instant::now() - last;
    assert!(waited <= Duration::from_secs(60), "{waited:?}");
    drop(peer);
}

/// A raw client that never pings but answers pings (tungstenite does when read): the
/// server's own pings keep the session up, and the server drops it once it stops answering.
#[tokio::test(start_paused = true)]
async fn server_pings_a_silent_peer_and_drops_it_when_it_stops_answering() {
    let (server, mut peer) = raw_client().await;
    let start = Instant::now();
    let mut pings = Vec::new();
    while Instant::now() - start < Duration::from_secs(120) {
        match peer.next_ws().await.expect("session ended") {
            WsMessage::Ping(p) => {
                assert!(p.is_empty(), "empty, as Go's");
                pings.push(Instant::now() - start);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A ping on every 5 s tick (the first half a period later, see Session::new), each
    // answered, so the session lives far beyond the 15 s answer timeout.
    let expected: Vec<Duration> = (0..24)
        .map(|i| Duration::from_millis(7_500 + 5_000 * i))
        .collect();
    assert_eq!(pings, expected);
    assert_eq!(server.end(), None);
    // Stop reading: no more pongs. The server gives up 15 s after the last one.
    let last = Instant::now();
    let end = within(Duration::from_secs(120), "answer timeout", server.closed()).await;
    assert_eq!(end, SessionEnd::Unresponsive(Duration::from_secs(15)));
    let waited = Instant::now() - last;
    assert!(waited <= Duration::from_secs(15), "{waited:?}");
    drop(peer);
}

/// A peer that neither pings nor answers pings is not known to take part in keepalive:
/// only Go's 60 s keepalive timeout ends it, never the 15 s answer timeout.
#[tokio::test(start_paused = true)]
async fn a_peer_that_never_answered_gets_the_keepalive_timeout() {
    let (server, peer) = raw_client().await;
    let end = within(Duration::from_secs(120), "keepalive", server.closed()).await;
    assert_eq!(end, SessionEnd::KeepaliveTimeout(Duration::from_secs(60)));
    drop(peer);
}

/// The configured deadlines are the ones used: a client-side session with a 2 s answer
/// timeout whose peer stops answering ends 2 s after its last pong.
#[tokio::test(start_paused = true)]
async fn client_answer_timeout_is_configurable() {
    let mut config = Config::default();
    config.ping_interval = Duration::from_millis(500);
    config.answer_timeout = Some(Duration::from_secs(2));
    let (client, mut peer) = raw_server_of(SessionBuilder::client().config(config)).await;
    // Two pings read: the second read sends the pong to the first (tungstenite answers on
    // its next read), so the peer took part in keepalive; then it falls silent.
    assert!(matches!(peer.next_ws().await, Some(WsMessage::Ping(_))));
    assert!(matches!(peer.next_ws().await, Some(WsMessage::Ping(_))));
    let last = Instant::now();
    let end = within(Duration::from_secs(120), "answer timeout", client.closed()).await;
    assert_eq!(end, SessionEnd::Unresponsive(Duration::from_secs(2)));
    assert!(Instant::now() - last <= Duration::from_secs(2));
    drop(peer);
}
