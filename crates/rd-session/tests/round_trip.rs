//! Many concurrent streams from the server side, echoed by the client's handler.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rand::{Rng as _, RngCore as _, SeedableRng as _};
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const STREAMS: usize = 1000;
const MAX_SIZE: usize = 64 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_echo_streams_round_trip() {
    let pair = pair(echo_handler()).await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..STREAMS {
        let size = rng.random_range(0..=MAX_SIZE);
        let mut data = vec![0u8; size];
        rng.fill_bytes(&mut data);
        let stream = pair
            .server
            .dial_addr("tcp", &format!("127.0.0.1:{}", 1000 + i));
        let stream = stream.unwrap();
        tasks.spawn(async move {
            let sent = Sha256::digest(&data);
            let (mut r, mut w) = tokio::io::split(stream);
            let writer = async move {
                w.write_all(&data).await.unwrap();
                w.flush().await.unwrap();
                w
            };
            let reader = async move {
                let mut got = vec![0u8; size];
                r.read_exact(&mut got).await.unwrap();
                (r, got)
            };
            let (w, (r, got)) = tokio::join!(writer, reader);
            assert_eq!(got.len(), size);
            assert_eq!(Sha256::digest(&got), sent, "stream {i} came back different");
            let mut stream = r.unsplit(w);
            stream.shutdown().await.unwrap();
            size
        });
    }
    let mut total = 0;
    let mut done = 0;
    within(BOUND, "all echo streams", async {
        while let Some(r) = tasks.join_next().await {
            total += r.unwrap();
            done += 1;
        }
    })
    .await;
    assert_eq!(done, STREAMS);
    assert!(total > STREAMS * MAX_SIZE / 4, "sizes should be spread out");
    // Every stream is gone from both sessions once both ends closed.
    until("streams released on both sides", || {
        pair.server.stats().streams == 0 && pair.client.stats().streams == 0
    })
    .await;
    assert!(!pair.server.is_closed() && !pair.client.is_closed());
    let s = pair.server.stats();
    assert_eq!((s.receive_buffered, s.send_buffered), (0, 0));
}
