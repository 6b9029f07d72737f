//! Malformed and unexpected input from a raw peer against a server-side rd session: the
//! session either ends with the right protocol error or answers and stays up; never a
//! panic or a hang.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::*;
use futures_util::SinkExt as _;
use rd_proto::{ConnId, DecodeError, HeaderField, Message, ProtocolError, SessionEnd};
use rd_session::SessionHandle;
use tokio::io::AsyncReadExt as _;
use tokio_tungstenite::tungstenite::Message as WsMessage;

async fn ends_with(server: &SessionHandle) -> SessionEnd {
    within(BOUND, "session end", server.closed()).await
}

/// After a session-ending input, an open stream fails and new dials are refused.
async fn assert_torn_down(server: &SessionHandle, stream: &mut rd_session::TunnelStream) {
    let err = within(BOUND, "stream read", stream.read(&mut [0u8; 8]))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "tunnel disconnect");
    assert!(matches!(
        server.dial_addr("tcp", "127.0.0.1:1"),
        Err(rd_session::DialError::SessionClosed(_))
    ));
}

/// The session is still up: a dial reaches the peer.
async fn assert_still_up(server: &SessionHandle, peer: &mut RawPeer) {
    assert_eq!(server.end(), None);
    let _s = server.dial_addr("tcp", "127.0.0.1:9999").unwrap();
    let (_, target) = peer.expect_connect().await;
    assert_eq!(target, "tcp/127.0.0.1:9999");
}

#[tokio::test]
async fn text_frame_ends_the_session() {
    let (server, mut peer) = raw_client().await;
    let mut stream = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    peer.expect_connect().await;
    peer.ws.send(WsMessage::text("hello")).await.unwrap();
    assert_eq!(
        ends_with(&server).await,
        SessionEnd::Protocol(ProtocolError::TextFrame)
    );
    assert_torn_down(&server, &mut stream).await;
}

#[tokio::test]
async fn truncated_header_ends_the_session() {
    let (server, mut peer) = raw_client().await;
    let mut stream = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    peer.expect_connect().await;
    peer.send_raw(Bytes::from_static(&[0x02])).await;
    assert_eq!(
        ends_with(&server).await,
        SessionEnd::Protocol(ProtocolError::Decode(DecodeError::Truncated {
            field: HeaderField::ConnId
        }))
    );
    assert_torn_down(&server, &mut stream).await;
}

#[tokio::test]
async fn empty_message_ends_the_session() {
    let (server, mut peer) = raw_client().await;
    peer.send_raw(Bytes::new()).await;
    assert_eq!(
        ends_with(&server).await,
        SessionEnd::Protocol(ProtocolError::Decode(DecodeError::Truncated {
            field: HeaderField::MessageId
        }))
    );
}

#[tokio::test]
async fn eleven_byte_varint_ends_the_session() {
    let (server, mut peer) = raw_client().await;
    let mut stream = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    peer.expect_connect().await;
    peer.send_raw(hex::decode("ffffffffffffffffffff01").unwrap())
        .await;
    assert_eq!(
        ends_with(&server).await,
        SessionEnd::Protocol(ProtocolError::Decode(DecodeError::VarintOverflow {
            field: HeaderField::MessageId
        }))
    );
    assert_torn_down(&server, &mut stream).await;
}

#[tokio::test]
async fn data_for_an_unknown_id_is_answered_and_the_session_stays_up() {
    let (server, mut peer) = raw_client().await;
    peer.send(&Message::Data {
        conn_id: ConnId(77),
        payload: Bytes::from_static(b"who?"),
    })
    .await;
    assert_eq!(
        peer.expect_message().await,
        Message::Error {
            conn_id: ConnId(77),
            text: format!("connection not found foo/{SESSION_KEY}/77"),
        }
    );
    // Errors, Pause and Resume for unknown ids are ignored silently; unknown types too.
    peer.send(&Message::Error {
        conn_id: ConnId(78),
        text: "EOF".into(),
    })
    .await;
    peer.send(&Message::Pause {
        conn_id: ConnId(79),
    })
    .await;
    peer.send(&Message::Resume {
        conn_id: ConnId(79),
    })
    .await;
    peer.send_raw(hex::decode("0202120000").unwrap()).await;
    assert_still_up(&server, &mut peer).await;
}

#[tokio::test]
async fn connect_without_slash_is_refused_and_the_session_stays_up() {
    let (server, mut peer) = raw_client().await;
    // id 1, conn 2, Connect, deadline 15000, "tcp".
    peer.send_raw(hex::decode("020404b0ea01746370").unwrap())
        .await;
    match peer.expect_message().await {
        Message::Error { conn_id, text } => {
            assert_eq!(conn_id, ConnId(2));
            assert!(text.contains("no '/'"), "{text}");
        }
        other => panic!("expected an Error, got {other:?}"),
    }
    assert_eq!(server.stats().streams, 0);
    assert_still_up(&server, &mut peer).await;
}

#[tokio::test]
async fn connect_to_a_server_without_handler_is_refused() {
    let (server, mut peer) = raw_client().await;
    peer.send(&Message::Connect {
        conn_id: ConnId(1),
        target: rd_proto::Target::new("tcp", "127.0.0.1:22").unwrap(),
    })
    .await;
    assert_eq!(
        peer.expect_message().await,
        Message::Error {
            conn_id: ConnId(1),
            text: "connect not allowed".into()
        }
    );
    // Data still in flight for it gets "connection not found".
    peer.send(&Message::Data {
        conn_id: ConnId(1),
        payload: Bytes::from_static(b"x"),
    })
    .await;
    assert!(matches!(
        peer.expect_message().await,
        Message::Error { conn_id: ConnId(1), text } if text.starts_with("connection not found")
    ));
    assert_eq!(server.stats().streams, 0);
    assert_still_up(&server, &mut peer).await;
}

#[tokio::test]
async fn sync_connections_of_seven_bytes_ends_the_session() {
    let (server, mut peer) = raw_client().await;
    let mut stream = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    peer.expect_connect().await;
    peer.send_raw(hex::decode("020010aabbccddeeff00").unwrap())
        .await;
    assert_eq!(
        ends_with(&server).await,
        SessionEnd::Protocol(ProtocolError::Decode(DecodeError::BadSyncLength { len: 7 }))
    );
    assert_torn_down(&server, &mut stream).await;
}

#[tokio::test]
async fn duplicate_connect_for_a_live_id_is_refused() {
    let (client, mut peer) =
        raw_server_of(rd_session::SessionBuilder::client().connect_handler(echo_handler())).await;
    let connect = Message::Connect {
        conn_id: ConnId(2),
        target: rd_proto::Target::new("tcp", "127.0.0.1:7").unwrap(),
    };
    peer.send(&connect).await;
    peer.send(&Message::Data {
        conn_id: ConnId(2),
        payload: Bytes::from_static(b"ping"),
    })
    .await;
    assert_eq!(
        peer.expect_message().await,
        Message::Data {
            conn_id: ConnId(2),
            payload: Bytes::from_static(b"ping")
        }
    );
    peer.send(&connect).await;
    assert!(matches!(
        peer.expect_message().await,
        Message::Error { conn_id: ConnId(2), text } if text == "connection id already in use"
    ));
    assert_eq!(client.end(), None);
}

#[tokio::test]
async fn random_garbage_never_panics_or_hangs() {
    use rand::{Rng as _, RngCore as _, SeedableRng as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    for _ in 0..200 {
        let (server, mut peer) = raw_client().await;
        let _stream = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
        let n = rng.random_range(0..40);
        let mut junk = vec![0u8; n];
        rng.fill_bytes(&mut junk);
        peer.send_raw(junk).await;
        // Either it ended, or it still answers: a Data for an unknown id gets an Error.
        peer.send(&Message::Data {
            conn_id: ConnId(123_456),
            payload: Bytes::new(),
        })
        .await;
        let outcome = within(BOUND, "answer or end", async {
            loop {
                match peer.next_frame().await {
                    None => return None,
                    Some(f) => {
                        if let Message::Error { conn_id, .. } = f.message {
                            if conn_id == ConnId(123_456) {
                                return Some(());
                            }
                        }
                    }
                }
            }
        })
        .await;
        match outcome {
            Some(()) => assert_eq!(server.end(), None),
            None => assert!(matches!(ends_with(&server).await, SessionEnd::Protocol(_))),
        }
    }
}

/// A Connect reusing the id of a stream that ended but whose handle still holds unread data
/// must not replace that stream: the application still reads its data, then EOF, and the
/// session's byte accounting stays right.
#[tokio::test]
async fn connect_reusing_an_ended_but_unread_id_is_refused() {
    let (server, mut peer) = raw_client().await;
    let mut stream = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    let (id, _) = peer.expect_connect().await;
    peer.send(&Message::Data {
        conn_id: id,
        payload: Bytes::from_static(b"old data"),
    })
    .await;
    peer.send(&Message::Error {
        conn_id: id,
        text: "EOF".into(),
    })
    .await;
    assert_eq!(
        peer.expect_message().await,
        Message::Error {
            conn_id: id,
            text: "EOF".into()
        }
    );
    // Same id again, while the application has not read the old stream yet.
    peer.send(&Message::Connect {
        conn_id: id,
        target: rd_proto::Target::new("tcp", "127.0.0.1:2").unwrap(),
    })
    .await;
    assert!(matches!(
        peer.expect_message().await,
        Message::Error { conn_id, .. } if conn_id == id
    ));
    let mut got = Vec::new();
    within(BOUND, "old stream", stream.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, b"old data");
    drop(stream);
    let stats = server.stats();
    assert_eq!((stats.streams, stats.receive_buffered), (0, 0), "{stats:?}");
    assert_still_up(&server, &mut peer).await;
}

/// A peer that floods Data for unknown ids and never reads the `connection not found`
/// replies: rd stops reading at `max_queued_control` queued replies instead of queueing
/// without bound, and the session survives once the peer reads again.
#[tokio::test]
async fn unread_reply_flood_is_bounded() {
    use futures_util::{SinkExt, StreamExt};
    use rd_proto::{ConnId, Message};
    use tokio_tungstenite::tungstenite::{protocol::Role, Message as Ws};
    use tokio_tungstenite::WebSocketStream;

    let mut config = rd_proto::Config::default();
    config.max_queued_control = 16;
    // A tiny pipe: the peer's unread replies fill it quickly.
    let (a, b) = tokio::io::duplex(4096);
    let server_ws = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
    let mut peer = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
    let server = rd_session::SessionBuilder::server("foo", 7)
        .config(config)
        .spawn(server_ws);

    // Send far more unknown-id Data than the pipe and the queue can hold, without reading.
    let flood = async {
        for i in 0..5_000i64 {
            let msg = Message::Data {
                conn_id: ConnId(1_000 + i),
                payload: bytes::Bytes::from_static(b"x"),
            };
            if peer.feed(Ws::Binary(msg.to_bytes(i))).await.is_err() {
                break;
            }
        }
        peer.flush().await.ok();
    };
    // The writes must stall: rd stopped reading because its replies are not being read.
    let stalled = tokio::time::timeout(std::time::Duration::from_millis(500), flood)
        .await
        .is_err();
    assert!(stalled, "rd kept reading while its replies piled up");
    let queued = server.stats();
    assert!(!server.is_closed(), "the session stays up");
    assert_eq!(queued.streams, 0);

    // Once the peer reads, rd resumes: replies arrive and the session still serves.
    let reply = tokio::time::timeout(std::time::Duration::from_secs(5), peer.next())
        .await
        .expect("a reply arrives")
        .expect("stream open")
        .expect("valid frame");
    let Ws::Binary(bytes) = reply else {
        panic!("unexpected {reply:?}")
    };
    let frame = rd_proto::decode(bytes).expect("decodes");
    assert!(
        matches!(frame.message, Message::Error { ref text, .. } if text.starts_with("connection not found foo/7/"))
    );
}
