//! Pings and pongs beside a bidirectional bulk echo over a socket that takes a few hundred
//! bytes at a time (so frames are half-written all the time), pings every millisecond both
//! ways: every byte arrives intact and neither end stops reading. The driver reads and writes
//! every frame itself and answers pings as it reads them, so the two peers never wait on each
//! other. (A driver that wrote its own frames beside tungstenite's pongs corrupted frames
//! here, and when it held reads back to avoid that, deadlocked in about one run in fifteen;
//! the round-4 frame writer, commit aec6678, deadlocked when both peers owed a pong behind a
//! half-written frame.)
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use rd_proto::Config;
use rd_session::SessionBuilder;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

const LEN: u64 = 4 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pings_never_land_inside_a_half_written_frame() {
    let mut client_config = Config::default();
    client_config.ping_interval = Duration::from_millis(1);
    client_config.answer_timeout = None;
    let mut server_config = Config::default();
    server_config.server_ping_after = Some(Duration::from_millis(1));
    server_config.answer_timeout = None;
    let (a, b) = tokio::io::duplex(300);
    let server_ws = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
    let client_ws = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
    let server = SessionBuilder::server(CLIENT_KEY, SESSION_KEY)
        .config(server_config)
        .spawn(server_ws);
    let client = SessionBuilder::client()
        .config(client_config)
        .connect_handler(echo_handler())
        .spawn(client_ws);

    let stream = server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    let (mut rx, mut tx) = tokio::io::split(stream);
    let write = async {
        let mut buf = vec![0u8; 10_000];
        let mut off = 0;
        while off < LEN {
            let n = (LEN - off).min(buf.len() as u64) as usize;
            fill_pattern(7, off, &mut buf[..n]);
            tx.write_all(&buf[..n]).await.unwrap();
            off += n as u64;
        }
    };
    let read = async {
        let mut buf = vec![0u8; 20_000];
        let mut off = 0;
        while off < LEN {
            let n = rx.read(&mut buf).await.unwrap();
            assert!(n > 0, "echo ended early at {off}");
            check_pattern(7, off, &buf[..n]).unwrap();
            off += n as u64;
        }
    };
    tokio::time::timeout(BOUND, async { tokio::join!(write, read) })
        .await
        .expect("the echo finished");
    assert_eq!(server.end(), None, "the server session is still up");
    assert_eq!(client.end(), None, "the client session is still up");
}
