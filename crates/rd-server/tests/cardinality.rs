//! Metrics must not grow a series per value an outsider chooses: 10,000 dials to distinct
//! addresses leave the number of series where it was.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rd_server::{Server, TunnelIdHeader};
use tokio::io::AsyncReadExt;

/// Sample lines (not comments) of the exposition.
fn series(metrics: &str) -> usize {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count()
}

/// Dials `n` distinct loopback addresses (127.x.y.z, port 9: nothing listens there, each
/// dial is refused at once) and waits for each outcome.
async fn dial_distinct(server: &Server, first: u32, n: u32) {
    let dialer = server.dialer("foo");
    for chunk in (first..first + n).collect::<Vec<_>>().chunks(200) {
        let dials = chunk.iter().map(|i| {
            let dialer = dialer.clone();
            let addr = format!(
                "127.{}.{}.{}:9",
                1 + i / 65536 % 250,
                i / 256 % 256,
                i % 256
            );
            async move {
                let mut stream = dialer.dial("tcp", &addr).await.unwrap();
                let mut buf = [0u8; 16];
                // The refusal arrives as the first read's error.
                assert!(stream.read(&mut buf).await.is_err(), "{addr} answered");
            }
        });
        futures_util::future::join_all(dials).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_distinct_targets_leave_the_series_count_unchanged() {
    let ts = serve(Server::builder(TunnelIdHeader).build()).await;
    let _agent = connected_agent(&ts, "foo").await;
    dial_distinct(&ts.server, 0, 10).await;
    let before = ts.server.encode_metrics();
    // A generous bound: 10,000 round trips in a debug build on a busy 2-core machine.
    tokio::time::timeout(
        std::time::Duration::from_secs(180),
        dial_distinct(&ts.server, 10, 10_000),
    )
    .await
    .expect("10,000 dials within the bound");
    let after = ts.server.encode_metrics();
    assert_eq!(
        series(&before),
        series(&after),
        "before:\n{before}\nafter:\n{after}"
    );
    assert_eq!(
        sample(
            &after,
            "session_server_total_add_connections{clientkey=\"foo\",proto=\"tcp\",addr=\"\"}"
        ),
        Some(10_010.0)
    );
}
