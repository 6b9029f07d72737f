//! Stream handles wake the session's driver only when a call owes it a turn: a read that
//! queued nothing for the peer, and a write while the driver is still draining, cost no
//! hop to the driver's task.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rd_session::{Extensions, SessionBuilder};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_that_queue_nothing_do_not_wake_the_driver() {
    let pair = pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY).extensions(Extensions::SUPPORTED),
        SessionBuilder::client()
            .extensions(Extensions::SUPPORTED)
            .connect_handler(echo_handler()),
    )
    .await;
    let mut stream = pair.server.dial_addr("tcp", "127.0.0.1:7").unwrap();
    let data: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
    stream.write_all(&data).await.unwrap();

    // 1000 bytes back in reads of 10: far below a credit grant (a quarter of the 32 KiB
    // window), so no read queues anything for the peer.
    let before = pair.server.driver_wakes();
    let mut got = Vec::new();
    for _ in 0..100 {
        let mut buf = [0u8; 10];
        within(BOUND, "a small read", stream.read_exact(&mut buf))
            .await
            .unwrap();
        got.extend_from_slice(&buf);
    }
    assert_eq!(got, data);
    assert_eq!(
        pair.server.driver_wakes(),
        before,
        "100 reads that queued nothing woke the driver"
    );

    // 256 KiB round trip: the reads now earn credit grants, and each grant wakes the
    // driver once; the writes wake it only when it had nothing left to send.
    let big = vec![7u8; 256 * 1024];
    let before = pair.server.driver_wakes();
    let (mut rx, mut tx) = tokio::io::split(stream);
    let write = async {
        for chunk in big.chunks(1024) {
            tx.write_all(chunk).await.unwrap();
        }
    };
    let mut reads = 0u64;
    let read = async {
        let mut left = big.len();
        let mut buf = [0u8; 1024];
        while left > 0 {
            let n = rx.read(&mut buf).await.unwrap();
            assert!(n > 0);
            left -= n;
            reads += 1;
        }
    };
    within(BOUND, "the round trip", async { tokio::join!(write, read) }).await;
    let wakes = pair.server.driver_wakes() - before;
    assert!(wakes > 0, "grants and new Data need the driver");
    assert!(
        wakes < (256 + reads) / 2,
        "{wakes} wake-ups for 256 writes and {reads} reads of 1 KiB"
    );
}
