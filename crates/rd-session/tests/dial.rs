//! Dialing in both directions, refusals and limits.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;

use common::*;
use rd_proto::{Config, Target};
use rd_session::{BoxedIo, ConnectRefused, DialError, RefuseAll, SessionBuilder, StreamClosed};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A client-side session dials a server-side session that has no handler: the stream fails
/// with `connect not allowed` and both sessions stay up.
#[tokio::test]
async fn client_dial_to_a_server_without_handler_is_not_allowed() {
    let pair = pair(echo_handler()).await;
    let mut stream = pair.client.dial_addr("tcp", "127.0.0.1:22").unwrap();
    assert_eq!(stream.id().0, 1, "client ids start at 1");
    // A write before the refusal arrives is accepted (there is no acknowledgement).
    stream.write_all(b"hello?").await.unwrap();
    let err = within(BOUND, "refusal", stream.read(&mut [0u8; 16]))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "connect not allowed");
    assert_eq!(err.kind(), io::ErrorKind::ConnectionReset);
    let closed = err
        .get_ref()
        .unwrap()
        .downcast_ref::<StreamClosed>()
        .unwrap();
    assert_eq!(
        closed.end,
        rd_proto::StreamEnd::PeerError("connect not allowed".into())
    );
    drop(stream);
    // Both sessions stay up; the server still dials through the client.
    assert!(!pair.client.is_closed() && !pair.server.is_closed());
    let mut s = pair.server.dial_addr("tcp", "127.0.0.1:7").unwrap();
    s.write_all(b"still up").await.unwrap();
    let mut buf = [0u8; 8];
    within(BOUND, "echo", s.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"still up");
    until("refused stream forgotten", || {
        pair.client.stats().streams == 1
    })
    .await;
}

/// The same with an explicit handler that refuses everything.
#[tokio::test]
async fn refuse_all_handler_refuses_with_gos_text() {
    let pair = pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY).connect_handler(RefuseAll),
        SessionBuilder::client(),
    )
    .await;
    let mut stream = pair.client.dial_addr("tcp", "127.0.0.1:22").unwrap();
    let err = within(BOUND, "refusal", stream.read(&mut [0u8; 16]))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "connect not allowed");
    assert!(!pair.server.is_closed());
}

/// Client-initiated streams work when the server has a handler (peer links do this).
#[tokio::test]
async fn client_dials_through_a_server_with_a_handler() {
    let pair = pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY).connect_handler(echo_handler()),
        SessionBuilder::client(),
    )
    .await;
    let mut stream = pair.client.dial_addr("tcp", "10.0.0.1:80").unwrap();
    stream.write_all(b"reverse").await.unwrap();
    let mut buf = [0u8; 7];
    within(BOUND, "echo", stream.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"reverse");
}

/// A handler's dial failure reaches the dialer as a read error with Go's text and kind.
#[tokio::test]
async fn handler_dial_failure_reads_as_connection_refused() {
    let handler = |target: Target| async move {
        let cause = io::Error::from(io::ErrorKind::ConnectionRefused);
        Err::<BoxedIo, _>(ConnectRefused::dial_failed(&target, &cause))
    };
    let pair = pair(handler).await;
    let mut stream = pair.server.dial_addr("tcp", "127.0.0.1:8127").unwrap();
    let err = within(BOUND, "refusal", stream.read(&mut [0u8; 16]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(
        err.to_string(),
        "dial tcp 127.0.0.1:8127: connect: connection refused"
    );
}

/// Dials beyond `max_streams` are refused locally; releasing one makes room again.
#[tokio::test]
async fn dials_beyond_max_streams_are_refused() {
    let mut config = Config::default();
    config.max_streams = 3;
    let pair = pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY).config(config),
        SessionBuilder::client().connect_handler(echo_handler()),
    )
    .await;
    let mut streams: Vec<_> = (0..3)
        .map(|i| {
            pair.server
                .dial_addr("tcp", &format!("127.0.0.1:{i}"))
                .unwrap()
        })
        .collect();
    assert!(matches!(
        pair.server.dial_addr("tcp", "127.0.0.1:9"),
        Err(DialError::TooManyStreams(3))
    ));
    // Close one cleanly: once the peer's EOF is back, its slot is free.
    let mut first = streams.remove(0);
    first.write_all(b"x").await.unwrap();
    let mut b = [0u8; 1];
    first.read_exact(&mut b).await.unwrap();
    first.shutdown().await.unwrap();
    let mut rest = Vec::new();
    within(BOUND, "peer closes", first.read_to_end(&mut rest))
        .await
        .unwrap();
    drop(first);
    until("slot freed", || pair.server.stats().streams == 2).await;
    let _again = pair.server.dial_addr("tcp", "127.0.0.1:9").unwrap();
}

/// Targets Go could not encode are refused before anything is sent.
#[tokio::test]
async fn invalid_targets_are_refused() {
    let pair = pair(echo_handler()).await;
    for (proto, address) in [("", "127.0.0.1:1"), ("tcp", "")] {
        assert!(matches!(
            pair.server.dial_addr(proto, address),
            Err(DialError::InvalidTarget(_))
        ));
    }
    assert_eq!(pair.server.stats().streams, 0);
}

/// A handler still dialing when the session ends is abandoned; nothing hangs.
#[tokio::test]
async fn pending_handler_is_abandoned_when_the_session_ends() {
    let (entered_tx, mut entered_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |_t: Target| {
        let entered_tx = entered_tx.clone();
        async move {
            entered_tx.send(()).unwrap();
            std::future::pending::<Result<BoxedIo, ConnectRefused>>().await
        }
    };
    let pair = pair(handler).await;
    let mut stream = pair.server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    within(BOUND, "handler called", entered_rx.recv())
        .await
        .unwrap();
    pair.client.close();
    let err = within(BOUND, "stream fails", stream.read(&mut [0u8; 1]))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "tunnel disconnect");
    within(BOUND, "server ends", pair.server.closed()).await;
}

/// Connects whose local dial has not finished are capped: one more is refused with a clear
/// Error, the session survives, and the slot frees up when a dial completes.
#[tokio::test]
async fn pending_connects_are_capped() {
    use rd_session::{BoxedIo, ConnectRefused, SessionBuilder};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio::sync::Semaphore;
    use tokio_tungstenite::{tungstenite::protocol::Role, WebSocketStream};

    let (a, b) = tokio::io::duplex(1 << 16);
    let server_ws = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
    let client_ws = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
    // Dials hang until the test releases them.
    let gate = Arc::new(Semaphore::new(0));
    let g = gate.clone();
    let mut config = rd_proto::Config::default();
    config.max_pending_connects = 2;
    let _client = SessionBuilder::client()
        .config(config)
        .connect_handler(move |_t| {
            let g = g.clone();
            async move {
                g.acquire().await.expect("open").forget();
                let (io, far) = tokio::io::duplex(16);
                // A local service that stays open and silent.
                tokio::spawn(async move {
                    let _far = far;
                    std::future::pending::<()>().await
                });
                Ok::<BoxedIo, ConnectRefused>(Box::new(io))
            }
        })
        .spawn(client_ws);
    let server = SessionBuilder::server("foo", 1).spawn(server_ws);
    let _s1 = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    let _s2 = server.dial_addr("tcp", "127.0.0.1:2").unwrap();
    let mut s3 = server.dial_addr("tcp", "127.0.0.1:3").unwrap();
    let mut buf = [0u8; 1];
    let err = tokio::time::timeout(std::time::Duration::from_secs(5), s3.read(&mut buf))
        .await
        .expect("refused promptly")
        .expect_err("third connect refused");
    assert!(
        err.to_string()
            .contains("too many connects in flight: limit 2"),
        "{err}"
    );
    assert!(!server.is_closed());
    // Let the two pending dials finish; a new connect is accepted again.
    gate.add_permits(3);
    let mut s4 = server.dial_addr("tcp", "127.0.0.1:4").unwrap();
    let r = tokio::time::timeout(std::time::Duration::from_millis(300), s4.read(&mut buf)).await;
    assert!(
        r.is_err(),
        "the fourth stream is served (open, waiting for data), not refused: {r:?}"
    );
}
