//! Replays of frames captured between the Go example client and server
//! (crates/rd-proto/tests/vectors/go-remotedialer-get.json): a raw websocket plays the Go
//! side, an rd session the other, and rd must answer as the Go peer did in the capture.
#![allow(clippy::unwrap_used)]

mod common;

use std::io;

use bytes::Bytes;
use common::*;
use rd_proto::{decode, varint, ConnId, Message, Target};
use rd_session::{BoxedIo, ConnectRefused, SessionBuilder, StreamClosed};
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../rd-proto/tests/vectors/go-remotedialer-get.json"
);

/// One captured binary message.
#[derive(Debug, Clone)]
struct Captured {
    phase: String,
    from_client: bool,
    raw: Bytes,
    message: Message,
}

fn captured() -> Vec<Captured> {
    let text = std::fs::read_to_string(VECTORS).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for list in ["messages", "later_phases_same_session"] {
        for m in v[list].as_array().unwrap() {
            if m["opcode"] != "binary" || m["hex"].as_str().is_none() {
                continue;
            }
            let raw = Bytes::from(hex::decode(m["hex"].as_str().unwrap()).unwrap());
            let message = decode(raw.clone()).unwrap().message;
            out.push(Captured {
                phase: m["phase"].as_str().unwrap().to_owned(),
                from_client: m["dir"] == "client->server",
                raw,
                message,
            });
        }
    }
    out
}

fn phase(phase: &str, from_client: bool) -> Vec<Captured> {
    captured()
        .into_iter()
        .filter(|c| c.phase == phase && c.from_client == from_client)
        .collect()
}

/// The bytes after the message id varint: everything the two implementations must agree on.
fn after_message_id(raw: &Bytes) -> Bytes {
    let mut b = raw.clone();
    varint::get_varint(&mut b).unwrap();
    b
}

/// The captured message re-addressed to `id`.
fn readdress(msg: &Message, id: ConnId) -> Message {
    match msg.clone() {
        Message::Data { payload, .. } => Message::Data {
            conn_id: id,
            payload,
        },
        Message::Error { text, .. } => Message::Error { conn_id: id, text },
        Message::Connect { target, .. } => Message::Connect {
            conn_id: id,
            target,
        },
        other => panic!("not re-addressable: {other:?}"),
    }
}

/// Sends a Data for an id nobody knows; rd's "connection not found" reply marks the point
/// in its output up to which everything caused by earlier input has been sent.
async fn marker(peer: &mut RawPeer) -> Message {
    peer.send(&Message::Data {
        conn_id: ConnId(999_999),
        payload: Bytes::from_static(b"marker"),
    })
    .await;
    Message::Error {
        conn_id: ConnId(999_999),
        text: format!("connection not found {CLIENT_KEY}/{SESSION_KEY}/999999"),
    }
}

/// get phase from the server side: rd dials like Go's server, byte for byte after the
/// message id, starting at conn id 2; the GET goes out as Go sent it.
#[tokio::test]
async fn rd_server_dials_like_the_go_server() {
    let from_server = phase("get", false);
    let (server, mut peer) = raw_client().await;
    let Message::Connect { target, .. } = &from_server[0].message else {
        panic!("capture starts with Connect")
    };
    let mut stream = server.dial_addr(target.proto(), target.address()).unwrap();
    let connect = within(BOUND, "connect", peer.next_binary()).await.unwrap();
    assert_eq!(
        decode(connect.clone()).unwrap().message,
        Message::Connect {
            conn_id: ConnId(2),
            target: Target::new("tcp", "127.0.0.1:8125").unwrap()
        }
    );
    assert_eq!(
        after_message_id(&connect),
        after_message_id(&from_server[0].raw)
    );

    let Message::Data {
        payload: request, ..
    } = &from_server[1].message
    else {
        panic!("then the GET")
    };
    stream.write_all(request).await.unwrap();
    let data = within(BOUND, "data", peer.next_binary()).await.unwrap();
    assert_eq!(
        after_message_id(&data),
        after_message_id(&from_server[1].raw)
    );

    // The Go client's response (captured) reaches the rd stream unchanged.
    let from_client = phase("get", true);
    peer.send(&from_client[0].message).await;
    let Message::Data {
        payload: response, ..
    } = &from_client[0].message
    else {
        panic!("response")
    };
    let mut got = vec![0u8; response.len()];
    within(BOUND, "response", stream.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got[..], &response[..]);
    assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
}

/// close_eof: the Go client sends the response and Error "EOF" twice; rd's stream reads
/// exactly the response, then EOF; rd echoes one Error "EOF", as the Go server did.
#[tokio::test]
async fn close_eof_reads_the_response_then_eof_and_echoes_once() {
    let from_client = phase("close_eof", true);
    let from_server = phase("close_eof", false);
    let (server, mut peer) = raw_client().await;
    let Message::Connect { target, .. } = &from_server[0].message else {
        panic!("capture starts with Connect")
    };
    let mut stream = server.dial_addr(target.proto(), target.address()).unwrap();
    let (id, text) = peer.expect_connect().await;
    assert_eq!((id, text.as_str()), (ConnId(2), "tcp/127.0.0.1:8126"));
    let Message::Data {
        payload: request, ..
    } = &from_server[1].message
    else {
        panic!("GET")
    };
    stream.write_all(request).await.unwrap();
    assert_eq!(
        peer.expect_message().await,
        Message::Data {
            conn_id: id,
            payload: request.clone()
        }
    );

    // The client's Data, Error EOF, Error EOF, re-addressed to rd's id.
    assert_eq!(from_client.len(), 3);
    for c in &from_client {
        peer.send(&readdress(&c.message, id)).await;
    }
    let expected_marker = marker(&mut peer).await;

    let Message::Data {
        payload: response, ..
    } = &from_client[0].message
    else {
        panic!("response")
    };
    let mut got = Vec::new();
    within(BOUND, "read to EOF", stream.read_to_end(&mut got))
        .await
        .unwrap();
    assert_eq!(got, response.to_vec());
    assert!(got.starts_with(b"HTTP/1.0 200 OK\r\n") && got.ends_with(b"hello\n"));

    // rd answers like the Go server in the capture: one Error "EOF", nothing more.
    let echo = within(BOUND, "echo", peer.next_binary()).await.unwrap();
    let go_echo = &from_server[2];
    assert_eq!(
        decode(echo.clone()).unwrap().message,
        readdress(&go_echo.message, id)
    );
    // Same bytes after the message id, except the conn id (3 in the capture, 2 here).
    assert_eq!(
        after_message_id(&echo),
        Message::Error {
            conn_id: id,
            text: "EOF".into()
        }
        .to_bytes(0)
        .slice(1..)
    );
    assert_eq!(peer.expect_message().await, expected_marker);
    drop(stream);
    // Dropping the finished stream sends nothing more (the id is gone on both sides).
    let expected_marker = marker(&mut peer).await;
    assert_eq!(peer.expect_message().await, expected_marker);
    assert_eq!(server.stats().streams, 0);
}

/// connect_refused: the Go client's dial error reaches rd's reader as ConnectionRefused with
/// Go's text, and rd echoes the Error with the same text, as the Go server did.
#[tokio::test]
async fn connect_refused_fails_the_read_and_echoes_the_text() {
    let from_client = phase("connect_refused", true);
    let from_server = phase("connect_refused", false);
    let (server, mut peer) = raw_client().await;
    let Message::Connect { target, .. } = &from_server[0].message else {
        panic!("capture starts with Connect")
    };
    let mut stream = server.dial_addr(target.proto(), target.address()).unwrap();
    let (id, text) = peer.expect_connect().await;
    assert_eq!(text, "tcp/127.0.0.1:8127");
    let Message::Data {
        payload: request, ..
    } = &from_server[1].message
    else {
        panic!("GET")
    };
    stream.write_all(request).await.unwrap();
    assert!(matches!(
        peer.expect_message().await,
        Message::Data { conn_id, .. } if conn_id == id
    ));

    // Error "dial tcp 127.0.0.1:8127: connect: connection refused", then Error "EOF".
    assert_eq!(from_client.len(), 2);
    for c in &from_client {
        peer.send(&readdress(&c.message, id)).await;
    }
    let expected_marker = marker(&mut peer).await;

    let refused = "dial tcp 127.0.0.1:8127: connect: connection refused";
    let err = within(BOUND, "read error", stream.read(&mut [0u8; 64]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::ConnectionRefused);
    assert_eq!(err.to_string(), refused);
    let inner = err.get_ref().unwrap().downcast_ref::<StreamClosed>();
    assert!(inner.is_some(), "{err:?}");
    // Writes fail too.
    assert!(stream.write_all(b"more").await.is_err());

    let echo = peer.expect_message().await;
    assert_eq!(echo, readdress(&from_server[2].message, id));
    assert_eq!(
        echo,
        Message::Error {
            conn_id: id,
            text: refused.into()
        }
    );
    assert_eq!(peer.expect_message().await, expected_marker);
}

/// The rd client side receiving the Go server's captured Connect + Data for conn 2 (the very
/// bytes): the handler dials tcp/127.0.0.1:8125 and gets the request; its answer goes back
/// as Data for conn 2.
#[tokio::test]
async fn rd_client_serves_the_go_servers_connect() {
    let from_server = phase("get", false);
    let from_client = phase("get", true);
    let (targets_tx, mut targets_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |target: Target| {
        let targets_tx = targets_tx.clone();
        async move {
            let (service, io) = tokio::io::duplex(64 * 1024);
            targets_tx.send((target, service)).unwrap();
            Ok::<BoxedIo, ConnectRefused>(Box::new(io))
        }
    };
    let (_client, mut peer) =
        raw_server_of(SessionBuilder::client().connect_handler(handler)).await;
    peer.send_raw(from_server[0].raw.clone()).await;
    peer.send_raw(from_server[1].raw.clone()).await;

    let (target, mut service) = within(BOUND, "handler called", targets_rx.recv())
        .await
        .unwrap();
    assert_eq!(target.to_string(), "tcp/127.0.0.1:8125");
    assert_eq!(
        (target.proto(), target.address()),
        ("tcp", "127.0.0.1:8125")
    );
    let Message::Data {
        payload: request, ..
    } = &from_server[1].message
    else {
        panic!("GET")
    };
    let mut got = vec![0u8; request.len()];
    within(BOUND, "request", service.read_exact(&mut got))
        .await
        .unwrap();
    assert_eq!(&got[..], &request[..]);

    // The service answers with the captured response: it arrives as Go's client sent it.
    let Message::Data {
        payload: response, ..
    } = &from_client[0].message
    else {
        panic!("response")
    };
    service.write_all(response).await.unwrap();
    let data = within(BOUND, "response", peer.next_binary()).await.unwrap();
    assert_eq!(
        after_message_id(&data),
        after_message_id(&from_client[0].raw)
    );

    // The service closes: the tunnel connection ends with Error "EOF".
    drop(service);
    assert_eq!(
        peer.expect_message().await,
        Message::Error {
            conn_id: ConnId(2),
            text: "EOF".into()
        }
    );
}

/// The captured SyncConnections from the Go client ([2]) keeps stream 2 and closes none.
#[tokio::test]
async fn captured_sync_connections_keeps_listed_streams() {
    let sync = phase("idle_until_sync", true);
    assert!(matches!(
        &sync[0].message,
        Message::SyncConnections { ids } if ids == &[2]
    ));
    let (server, mut peer) = raw_client().await;
    let mut stream = server.dial_addr("tcp", "127.0.0.1:8125").unwrap();
    let (id, _) = peer.expect_connect().await;
    assert_eq!(id, ConnId(2));
    peer.send_raw(sync[0].raw.clone()).await;
    peer.send(&Message::Data {
        conn_id: id,
        payload: Bytes::from_static(b"alive"),
    })
    .await;
    let mut buf = [0u8; 5];
    within(BOUND, "data after sync", stream.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(&buf, b"alive");
    assert_eq!(server.stats().streams, 1);
}
