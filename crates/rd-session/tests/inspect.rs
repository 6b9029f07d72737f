//! What an operator (the admin API) sees of a running session and can do to one stream:
//! labels, pending dials, last activity, and a reset by id.
#![allow(clippy::unwrap_used)]

mod common;

use common::{echo_handler, pair, within, BOUND};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn streams_are_listed_with_their_label_and_reset_by_id() {
    let p = pair(echo_handler()).await;
    let mut stream = p.server.dial_addr("tcp", "127.0.0.1:7").unwrap();
    stream.set_label("connect");
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    within(BOUND, "the echo", stream.read_exact(&mut buf))
        .await
        .unwrap();
    assert_eq!(p.server.pending_dials(), 0, "the echo answered the dial");
    let infos = p.server.streams();
    assert_eq!(infos.len(), 1);
    assert_eq!(infos[0].label, Some("connect"));
    assert!(infos[0].last_heard.is_some());
    assert!(infos[0].last_activity <= p.server.now());
    assert!(p.server.last_heard() <= p.server.now());

    assert!(p
        .server
        .reset_stream(stream.id(), "disconnected by the operator"));
    assert!(
        !p.server.reset_stream(stream.id(), "again"),
        "already off the wire"
    );
    let err = within(BOUND, "the reset", stream.read(&mut buf))
        .await
        .unwrap_err();
    assert_eq!(err.to_string(), "disconnected by the operator");
    // The agent's side ends too: its stream leaves the table.
    common::until("the agent's stream ends", || p.client.streams().is_empty()).await;
}
