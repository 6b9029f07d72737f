//! Session teardown: a dropped websocket, an aborted driver and a local close fail every
//! open stream with `tunnel disconnect`, promptly; dials afterwards are refused.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use rd_proto::{Config, Message, SessionEnd};
use rd_session::{DialError, SessionBuilder, SessionHandle, TunnelStream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message as WsMessage;

/// Within this much virtual time every stream must have failed.
const PROMPT: Duration = Duration::from_millis(100);

fn assert_disconnect(err: &io::Error) {
    assert_eq!(err.to_string(), "tunnel disconnect");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
}

/// Reads until an error; returns the bytes read and the error.
fn spawn_reader(mut r: tokio::io::ReadHalf<TunnelStream>) -> JoinHandle<(usize, io::Error)> {
    tokio::spawn(async move {
        let mut n = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match r.read(&mut buf).await {
                Ok(0) => panic!("clean EOF instead of an error"),
                Ok(k) => n += k,
                Err(e) => return (n, e),
            }
        }
    })
}

/// Writes until an error.
fn spawn_writer(mut w: tokio::io::WriteHalf<TunnelStream>) -> JoinHandle<(usize, io::Error)> {
    tokio::spawn(async move {
        let buf = vec![1u8; 64 * 1024];
        let mut n = 0;
        loop {
            match w.write(&buf).await {
                Ok(k) => n += k,
                Err(e) => return (n, e),
            }
        }
    })
}

#[tokio::test(start_paused = true)]
async fn dropping_the_websocket_fails_every_stream_at_once() {
    const STREAMS: usize = 3;
    let (server, mut peer) = raw_client().await;
    let mut tasks = Vec::new();
    let mut streams = Vec::new();
    for i in 0..STREAMS {
        let stream = server
            .dial_addr("tcp", &format!("127.0.0.1:{}", 100 + i))
            .unwrap();
        let (id, _) = peer.expect_connect().await;
        streams.push((id, stream));
    }
    for (id, stream) in streams {
        // Some data in, which the reader takes before it waits.
        peer.send(&Message::Data {
            conn_id: id,
            payload: Bytes::from(vec![9u8; 1000]),
        })
        .await;
        let (r, w) = tokio::io::split(stream);
        tasks.push((spawn_reader(r), spawn_writer(w)));
    }
    // The peer reads nothing more: every writer fills its send buffer and waits.
    let full = Config::default().stream_send_buffer * STREAMS;
    until("writers blocked", || server.stats().send_buffered == full).await;
    until("readers drained", || server.stats().receive_buffered == 0).await;
    for (r, w) in &tasks {
        assert!(!r.is_finished() && !w.is_finished());
    }

    drop(peer);
    let started = tokio::time::Instant::now();
    for (r, w) in tasks {
        let (read, err) = within(PROMPT, "reader fails", r).await.unwrap();
        assert_eq!(read, 1000);
        assert_disconnect(&err);
        let (written, err) = within(PROMPT, "writer fails", w).await.unwrap();
        assert!(written >= Config::default().stream_send_buffer);
        assert_disconnect(&err);
    }
    assert!(tokio::time::Instant::now() - started <= PROMPT);
    let end = within(PROMPT, "closed", server.closed()).await;
    assert!(
        matches!(end, SessionEnd::PeerClosed | SessionEnd::Transport(_)),
        "{end:?}"
    );
    assert!(matches!(
        server.dial_addr("tcp", "127.0.0.1:1"),
        Err(DialError::SessionClosed(_))
    ));
    let stats = server.stats();
    assert_eq!((stats.send_buffered, stats.receive_buffered), (0, 0));
}

/// Both rd sides: the client's driver task dies mid-transfer. Streams on both sessions fail
/// with `tunnel disconnect`.
#[tokio::test(start_paused = true)]
async fn aborting_the_client_driver_fails_streams_on_both_sides() {
    // Both sides serve Connects with an echo, and both dial.
    let (s, c) = ws_pair().await;
    let server = SessionBuilder::server(CLIENT_KEY, SESSION_KEY)
        .connect_handler(echo_handler())
        .spawn(s);
    let (client, driver) = SessionBuilder::client()
        .connect_handler(echo_handler())
        .start(c);
    let driver = tokio::spawn(driver);
    let mut tasks = Vec::new();
    for (i, session) in [&server, &client, &server, &client].into_iter().enumerate() {
        let mut stream = session.dial_addr("tcp", &format!("127.0.0.1:{i}")).unwrap();
        // Echo round trip first, so the stream is up end to end.
        stream.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        within(BOUND, "echo", stream.read_exact(&mut buf))
            .await
            .unwrap();
        assert_eq!(&buf, b"hello");
        let (r, w) = tokio::io::split(stream);
        tasks.push((spawn_reader(r), spawn_writer(w)));
    }
    until("data flowing", || server.stats().send_buffered > 0).await;
    driver.abort();
    for (r, w) in tasks {
        let (_, err) = within(PROMPT, "reader fails", r).await.unwrap();
        assert_disconnect(&err);
        let (_, err) = within(PROMPT, "writer fails", w).await.unwrap();
        assert_disconnect(&err);
    }
    assert_eq!(
        within(PROMPT, "client closed", client.closed()).await,
        SessionEnd::Local
    );
    let end = within(PROMPT, "server closed", server.closed()).await;
    assert!(
        matches!(end, SessionEnd::PeerClosed | SessionEnd::Transport(_)),
        "{end:?}"
    );
    for session in [&server, &client] {
        assert!(matches!(
            session.dial_addr("tcp", "127.0.0.1:1"),
            Err(DialError::SessionClosed(_))
        ));
    }
}

/// A local close tells the peer about each open stream (Error `tunnel disconnect`), closes
/// the websocket and fails local streams.
#[tokio::test(start_paused = true)]
async fn local_close_tells_the_peer_and_fails_local_streams() {
    let (server, mut peer) = raw_client().await;
    let a = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    let b = server.dial_addr("tcp", "127.0.0.1:2").unwrap();
    let (ia, _) = peer.expect_connect().await;
    let (ib, _) = peer.expect_connect().await;
    let ra = spawn_reader(tokio::io::split(a).0);
    let rb = spawn_reader(tokio::io::split(b).0);
    server.close();
    let mut errors = Vec::new();
    let closed = within(BOUND, "peer sees close", async {
        loop {
            match peer.next_ws().await {
                Some(WsMessage::Binary(raw)) => errors.push(rd_proto::decode(raw).unwrap().message),
                Some(WsMessage::Close(_)) | None => return true,
                Some(other) => panic!("unexpected {other:?}"),
            }
        }
    })
    .await;
    assert!(closed);
    errors.sort_by_key(|m| m.conn_id());
    assert_eq!(
        errors,
        vec![
            Message::Error {
                conn_id: ia,
                text: "tunnel disconnect".into()
            },
            Message::Error {
                conn_id: ib,
                text: "tunnel disconnect".into()
            }
        ]
    );
    for r in [ra, rb] {
        let (_, err) = within(PROMPT, "reader fails", r).await.unwrap();
        assert_disconnect(&err);
    }
    assert_eq!(
        within(PROMPT, "closed", server.closed()).await,
        SessionEnd::Local
    );
    assert!(matches!(
        server.dial_addr("tcp", "127.0.0.1:3"),
        Err(DialError::SessionClosed(SessionEnd::Local))
    ));
}

/// Dropping every handle does not stop the session; dropping its streams does not either.
#[tokio::test]
async fn streams_and_session_outlive_each_other_cleanly() {
    let pair = pair(echo_handler()).await;
    let stream = pair.server.dial_addr("tcp", "127.0.0.1:7").unwrap();
    let server: SessionHandle = pair.server.clone();
    drop(pair.server);
    server.close();
    within(BOUND, "closed", server.closed()).await;
    let mut stream = stream;
    let err = stream.write_all(b"x").await.unwrap_err();
    assert_disconnect(&err);
    let end = within(BOUND, "client notices", pair.client.closed()).await;
    assert!(
        matches!(end, SessionEnd::PeerClosed | SessionEnd::Transport(_)),
        "{end:?}"
    );
}

/// A going-away close reaches the peer as websocket status 1001 with the reason, after the
/// streams' last words; the peer's handle says so. A plain close carries no such code.
#[tokio::test(start_paused = true)]
async fn going_away_close_reaches_the_peer_as_1001() {
    let (server, mut peer) = raw_client().await;
    let _a = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    let (ia, _) = peer.expect_connect().await;
    server.close_going_away("server draining");
    let mut errors = Vec::new();
    let frame = within(BOUND, "peer sees close", async {
        loop {
            match peer.next_ws().await {
                Some(WsMessage::Binary(raw)) => errors.push(rd_proto::decode(raw).unwrap().message),
                Some(WsMessage::Close(frame)) => return frame,
                other => panic!("unexpected {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame with a code");
    assert_eq!(u16::from(frame.code), rd_session::GOING_AWAY);
    assert_eq!(frame.reason.as_str(), "server draining");
    assert_eq!(
        errors,
        vec![Message::Error {
            conn_id: ia,
            text: "tunnel disconnect".into()
        }]
    );

    let pair = pair(echo_handler()).await;
    pair.server.close_going_away("server draining");
    within(BOUND, "client notices", pair.client.closed()).await;
    assert!(pair.client.peer_went_away());
    let plain = pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY),
        SessionBuilder::client(),
    )
    .await;
    plain.server.close();
    within(BOUND, "client notices", plain.client.closed()).await;
    assert!(!plain.client.peer_went_away());
}
