//! Fair sharing of one websocket: streams with data queued take turns message by message.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;

use common::*;
use rd_proto::{Config, ConnId, Message};
use rd_session::SessionBuilder;
use tokio::io::AsyncWriteExt as _;

const LEN: usize = 8 * 1024 * 1024;
const MAX_RUN: usize = 4;

/// Two writers of 8 MiB each through a server session; a raw peer records whose Data
/// arrives in which order.
/// With `up_front`, both streams' data is queued before the driver can run (the send buffer
/// must hold it all and the runtime must be current-thread).
async fn record_two_writers(config: Config, up_front: bool) -> Vec<ConnId> {
    let (server, mut peer) =
        raw_client_of(SessionBuilder::server(CLIENT_KEY, SESSION_KEY).config(config)).await;
    let mut ids = Vec::new();
    let mut streams = Vec::new();
    for port in [1u64, 2] {
        let stream = server
            .dial_addr("tcp", &format!("127.0.0.1:{port}"))
            .unwrap();
        let (id, _) = peer.expect_connect().await;
        ids.push(id);
        streams.push((port, stream));
    }
    if up_front {
        for (port, stream) in &mut streams {
            let mut data = vec![0u8; LEN];
            fill_pattern(*port, 0, &mut data);
            // Taken whole without yielding: the send buffer holds it.
            let n = stream.write(&data).await.unwrap();
            assert_eq!(n, LEN);
        }
    }
    // Both writers start together, once both streams exist.
    let start = std::sync::Arc::new(tokio::sync::Barrier::new(3));
    for (port, mut stream) in streams {
        let start = start.clone();
        tokio::spawn(async move {
            let mut data = vec![0u8; LEN];
            fill_pattern(port, 0, &mut data);
            start.wait().await;
            if !up_front {
                stream.write_all(&data).await.unwrap();
            }
            stream.shutdown().await.unwrap();
        });
    }
    start.wait().await;
    let mut order = Vec::new();
    let mut received: HashMap<ConnId, Vec<u8>> = HashMap::new();
    let mut finished = 0;
    within(BOUND, "both transfers", async {
        while finished < 2 {
            match peer.expect_message().await {
                Message::Data { conn_id, payload } => {
                    assert!(ids.contains(&conn_id));
                    order.push(conn_id);
                    received
                        .entry(conn_id)
                        .or_default()
                        .extend_from_slice(&payload);
                }
                Message::Error { conn_id, text } => {
                    assert_eq!(text, "EOF");
                    assert!(ids.contains(&conn_id));
                    finished += 1;
                }
                other => panic!("unexpected {}", summary(&other)),
            }
        }
    })
    .await;
    for (port, id) in [1u64, 2].into_iter().zip(&ids) {
        let got = &received[id];
        assert_eq!(got.len(), LEN);
        check_pattern(port, 0, got).unwrap();
    }
    order
}

/// The longest run of one stream's Data while the other stream still sent Data later.
fn longest_run_while_both_active(order: &[ConnId]) -> usize {
    let last = |id: ConnId| order.iter().rposition(|x| *x == id).unwrap();
    let first_done = last(order[0]).min(last(*order.iter().find(|x| **x != order[0]).unwrap()));
    let mut longest = 0;
    let mut run = 0;
    for (i, id) in order[..=first_done].iter().enumerate() {
        run = if i > 0 && order[i - 1] == *id {
            run + 1
        } else {
            1
        };
        longest = longest.max(run);
    }
    longest
}

#[tokio::test]
async fn two_writers_take_turns() {
    let order = record_two_writers(Config::default(), false).await;
    let run = longest_run_while_both_active(&order);
    assert!(run <= MAX_RUN, "a stream got {run} messages in a row");
    // Data is cut at 32 KiB per message so streams can interleave.
    assert!(order.len() >= 2 * LEN / Config::default().max_data_payload);
}

/// With everything queued up front (a send buffer as large as the transfer), the scheduler
/// alone decides: strict alternation until one stream is done.
#[tokio::test]
async fn the_scheduler_alternates_when_both_have_everything_queued() {
    let mut config = Config::default();
    config.stream_send_buffer = LEN;
    let order = record_two_writers(config, true).await;
    let run = longest_run_while_both_active(&order);
    assert_eq!(run, 1, "strict round robin expected");
}
