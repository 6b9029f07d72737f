//! Half-close through rd-session: a client that writes a request, shuts down writing and then
//! reads the whole answer. With rd peers (the half-close extension) the answer arrives; with
//! the plain Go protocol the shutdown closes both directions and the answer is cut, as in Go.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rd_proto::Target;
use rd_session::{BoxedIo, ConnectHandler, ConnectRefused, Extensions, SessionBuilder};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const REQUEST: usize = 300 * 1024;
const ANSWER: usize = 1024 * 1024;

/// A service that reads its request until EOF and only then answers: `ANSWER` bytes of the
/// pattern seeded with the request's length (so the answer proves the whole request came).
fn answer_after_eof() -> impl ConnectHandler {
    |_target: Target| async {
        let (mut service, io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut request = Vec::new();
            service.read_to_end(&mut request).await.unwrap();
            let mut answer = vec![0u8; ANSWER];
            fill_pattern(request.len() as u64, 0, &mut answer);
            // With the Go protocol nobody is left to take the answer: that write fails.
            if service.write_all(&answer).await.is_ok() {
                service.shutdown().await.ok();
            }
        });
        Ok::<BoxedIo, ConnectRefused>(Box::new(io))
    }
}

/// Writes the request, shuts down writing, reads until EOF.
async fn request_shutdown_read(stream: &mut rd_session::TunnelStream) -> Vec<u8> {
    let mut request = vec![0u8; REQUEST];
    fill_pattern(7, 0, &mut request);
    stream.write_all(&request).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut got = Vec::new();
    stream.read_to_end(&mut got).await.unwrap();
    got
}

#[tokio::test]
async fn through_rd_peers_the_whole_answer_arrives_after_shutdown() {
    let pair = pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY).extensions(Extensions::SUPPORTED),
        SessionBuilder::client()
            .extensions(Extensions::SUPPORTED)
            .connect_handler(answer_after_eof()),
    )
    .await;
    let mut stream = pair.server.dial_addr("tcp", "127.0.0.1:7").unwrap();
    assert!(stream.half_close());
    let got = within(
        BOUND,
        "request, shutdown, answer",
        request_shutdown_read(&mut stream),
    )
    .await;
    assert_eq!(got.len(), ANSWER);
    assert_eq!(check_pattern(REQUEST as u64, 0, &got), Ok(()));
    // Both directions ended cleanly: the stream is off the wire and both ends forget it.
    within(BOUND, "stream closed", stream.closed()).await;
    drop(stream);
    until("both sessions forget the stream", || {
        pair.server.stats().streams == 0 && pair.client.stats().streams == 0
    })
    .await;
}

#[tokio::test]
async fn with_the_go_protocol_shutdown_closes_both_ways_and_the_answer_is_cut() {
    // No extension on either side: what a Go peer speaks.
    let pair = pair(answer_after_eof()).await;
    let mut stream = pair.server.dial_addr("tcp", "127.0.0.1:7").unwrap();
    assert!(!stream.half_close());
    let got = within(
        BOUND,
        "request, shutdown, read",
        request_shutdown_read(&mut stream),
    )
    .await;
    // Error `EOF` closed the connection both ways before the service could answer.
    assert!(got.is_empty(), "{} bytes of answer arrived", got.len());
    assert!(
        stream.write_all(b"more").await.is_err(),
        "the stream is closed for writing too"
    );
}

#[tokio::test]
async fn the_extension_needs_both_ends() {
    // Only the client speaks it: the plain protocol, so the answer is cut.
    let pair = pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY),
        SessionBuilder::client()
            .extensions(Extensions::SUPPORTED)
            .connect_handler(answer_after_eof()),
    )
    .await;
    let mut stream = pair.server.dial_addr("tcp", "127.0.0.1:7").unwrap();
    let got = within(
        BOUND,
        "request, shutdown, read",
        request_shutdown_read(&mut stream),
    )
    .await;
    assert!(got.is_empty());
}

#[tokio::test]
async fn a_reset_after_half_close_ends_the_agents_pipe() {
    // The service reads to EOF and then neither answers nor closes.
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let pair = pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY).extensions(Extensions::SUPPORTED),
        SessionBuilder::client()
            .extensions(Extensions::SUPPORTED)
            .connect_handler(move |_target: Target| {
                let held_tx = held_tx.clone();
                async move {
                    let (mut service, io) = tokio::io::duplex(1024);
                    tokio::spawn(async move {
                        let mut request = Vec::new();
                        service.read_to_end(&mut request).await.unwrap();
                        // Keep the service's end open for the rest of the test.
                        held_tx.send(service).unwrap();
                    });
                    Ok::<BoxedIo, ConnectRefused>(Box::new(io))
                }
            }),
    )
    .await;
    let mut stream = pair.server.dial_addr("tcp", "127.0.0.1:7").unwrap();
    stream.write_all(b"request").await.unwrap();
    stream.shutdown().await.unwrap();
    let service = within(BOUND, "service got EOF", async {
        loop {
            if let Ok(s) = held_rx.try_recv() {
                return s;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(pair.client.stats().streams, 1, "half-closed: still live");
    stream.reset("gave up");
    drop(stream);
    // The agent's pipe notices the end although its local side stays open and silent.
    until("the agent drops the stream", || {
        pair.client.stats().streams == 0
    })
    .await;
    drop(service);
}
