//! Datagrams over a session (rd's udp extension): boundaries kept through the session's
//! Data messages, whatever sizes; a peer that breaks the framing or ends inside a datagram
//! is an error, not a hang; a session without the extension refuses udp at the dial and
//! sends nothing.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use rd_proto::Target;
use rd_session::{
    BoxedIo, ConnectRefused, DatagramError, DatagramStream, DialError, Extensions, SessionBuilder,
    MAX_DATAGRAM,
};
use tokio::io::AsyncWriteExt as _;

fn with(
    ext: Extensions,
    handler: impl rd_session::ConnectHandler,
) -> (SessionBuilder, SessionBuilder) {
    (
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY).extensions(ext),
        SessionBuilder::client()
            .extensions(ext)
            .connect_handler(handler),
    )
}

/// A byte echo on the far side returns the framed bytes as they came, so every datagram
/// must come back whole and in order, from empty to the largest.
#[tokio::test]
async fn datagrams_keep_their_boundaries_through_a_session() {
    let (server, client) = with(Extensions::SUPPORTED, echo_handler());
    let pair = pair_with(server, client).await;
    let stream = pair.server.dial_addr("udp", "127.0.0.1:53").unwrap();
    let mut datagrams = DatagramStream::new(stream);
    let sizes = [0usize, 1, 2, 511, 512, 1500, 8192, 40_000, MAX_DATAGRAM, 3];
    let sent: Vec<Vec<u8>> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut d = vec![0u8; n];
            fill_pattern(i as u64, 0, &mut d);
            d
        })
        .collect();
    let writer = async {
        for d in &sent {
            datagrams.send(d).await.unwrap();
        }
        datagrams
    };
    let mut datagrams = within(BOUND, "sending", writer).await;
    for d in &sent {
        let got = within(BOUND, "a datagram back", datagrams.recv())
            .await
            .unwrap();
        assert_eq!(
            got.as_deref(),
            Some(&d[..]),
            "datagram of {} bytes",
            d.len()
        );
    }
    assert!(matches!(
        datagrams.send(&vec![0; MAX_DATAGRAM + 1]).await,
        Err(DatagramError::TooLarge(_))
    ));
}

/// A send cancelled half-way (a zero timeout polls it once: a batch far beyond the
/// stream's buffers is then cut mid-frame) leaves its bytes queued; the next send writes
/// them first, so the far side decodes every datagram whole, in order, and the next one.
#[tokio::test]
async fn a_cancelled_send_does_not_break_the_framing() {
    // The far side's connection: its bytes are decoded here.
    let (far_tx, mut far_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = move |_target: Target| {
        let far_tx = far_tx.clone();
        async move {
            let (far, io) = tokio::io::duplex(64 * 1024);
            far_tx.send(far).unwrap();
            Ok::<BoxedIo, ConnectRefused>(Box::new(io))
        }
    };
    let (server, client) = with(Extensions::SUPPORTED, handler);
    let pair = pair_with(server, client).await;
    let stream = pair.server.dial_addr("udp", "127.0.0.1:53").unwrap();
    let mut datagrams = DatagramStream::new(stream);
    let big: Vec<Vec<u8>> = (0..40u64)
        .map(|i| {
            let mut d = vec![0u8; MAX_DATAGRAM];
            fill_pattern(i, 0, &mut d);
            d
        })
        .collect();
    let batch = datagrams.send_all(big.iter().map(|d| &d[..]));
    let cut = tokio::time::timeout(std::time::Duration::ZERO, batch).await;
    assert!(cut.is_err(), "2.6 MB went out in one poll: nothing was cut");
    let mut far = within(BOUND, "the far side's connection", far_rx.recv())
        .await
        .unwrap();
    let receive = async {
        let mut decoder = rd_session::DatagramDecoder::new();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        while got.len() < big.len() + 1 {
            let n = tokio::io::AsyncReadExt::read(&mut far, &mut buf)
                .await
                .unwrap();
            assert!(n > 0, "the stream ended early");
            let mut input = &buf[..n];
            while !input.is_empty() {
                let (used, datagram) = decoder.push(input).expect("the framing broke");
                input = &input[used..];
                got.extend(datagram);
            }
        }
        got
    };
    let (sent, got) = within(BOUND, "the rest and the next datagram", async {
        tokio::join!(datagrams.send(b"after"), receive)
    })
    .await;
    sent.unwrap();
    for (i, d) in big.iter().enumerate() {
        assert!(got[i][..] == d[..], "datagram {i} differs after the cut");
    }
    assert_eq!(&got[big.len()][..], b"after");
}

/// The far side writes a length beyond the maximum: `recv` says the stream is malformed.
/// The far side ends inside a datagram: `recv` says it was truncated.
#[tokio::test]
async fn malformed_and_truncated_streams_are_errors() {
    let handler = |target: Target| async move {
        let (mut service, io) = tokio::io::duplex(1024);
        let bytes: &'static [u8] = if target.address().ends_with(":1") {
            &[0xff, 0xf0, 1, 2, 3]
        } else {
            &[0, 1, b'a', 0, 9, b'b']
        };
        tokio::spawn(async move {
            service.write_all(bytes).await.ok();
            service.shutdown().await.ok();
            // Hold the service end until the stream is gone.
            let mut sink = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut service, &mut sink)
                .await
                .ok();
        });
        Ok::<BoxedIo, ConnectRefused>(Box::new(io))
    };
    let (server, client) = with(Extensions::SUPPORTED, handler);
    let pair = pair_with(server, client).await;

    let mut malformed = DatagramStream::new(pair.server.dial_addr("udp", "127.0.0.1:1").unwrap());
    let err = within(BOUND, "the malformed length", malformed.recv())
        .await
        .unwrap_err();
    assert!(matches!(err, DatagramError::Malformed(65_520)), "{err}");

    let mut truncated = DatagramStream::new(pair.server.dial_addr("udp", "127.0.0.1:2").unwrap());
    let first = within(BOUND, "the whole datagram", truncated.recv())
        .await
        .unwrap();
    assert_eq!(first.as_deref(), Some(&b"a"[..]));
    let err = within(BOUND, "the cut datagram", truncated.recv())
        .await
        .unwrap_err();
    assert!(
        matches!(err, DatagramError::Truncated { missing: 8 }),
        "{err}"
    );
}

/// Without the extension (a Go peer) a udp dial is refused at once and no Connect leaves:
/// the peer's handler is never asked.
#[tokio::test]
async fn udp_without_the_extension_is_refused_at_the_dial() {
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = asked.clone();
    let handler = move |_target: Target| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Err::<BoxedIo, _>(ConnectRefused::not_allowed()) }
    };
    let go_style = Extensions {
        udp: false,
        ..Extensions::SUPPORTED
    };
    let (server, client) = with(go_style, handler);
    let pair = pair_with(server, client).await;
    for proto in ["udp", "udp4", "udp6"] {
        let err = pair.server.dial_addr(proto, "127.0.0.1:53").unwrap_err();
        assert_eq!(err, DialError::UdpNotNegotiated);
        assert!(
            err.to_string()
                .contains("does not speak rd's udp extension"),
            "{err}"
        );
    }
    // A tcp dial still goes out (and is refused by the handler): the counter proves the
    // handler is reachable, so the udp dials above really sent nothing.
    let mut tcp = pair.server.dial_addr("tcp", "127.0.0.1:53").unwrap();
    let mut buf = [0u8; 1];
    let read = within(
        BOUND,
        "the refusal",
        tokio::io::AsyncReadExt::read(&mut tcp, &mut buf),
    )
    .await;
    assert!(read.is_err());
    assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 1);
}
