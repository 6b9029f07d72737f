//! Pause/Resume end to end: Go's TestExceedBuffer, a slow reader beside a fast one, and a
//! writer stopped by the peer's Pause.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use rd_proto::{Config, ConnId, Message, Target};
use rd_session::{SessionBuilder, SessionHandle, TunnelStream};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const MIB: u64 = 1024 * 1024;

/// Seeds are the target port: `127.0.0.1:<seed>`.
fn seed_of(target: &Target) -> u64 {
    target
        .address()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Reads `stream` to the end, checking the pattern of `seed`; calls `sample` after each read.
async fn read_all_checked(
    stream: &mut TunnelStream,
    seed: u64,
    mut sample: impl FnMut(u64),
) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let mut off = 0u64;
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            return off;
        }
        if let Err(at) = check_pattern(seed, off, &buf[..n]) {
            panic!("stream {seed}: wrong byte at offset {at}");
        }
        off += n as u64;
        sample(off);
    }
}

#[derive(Default, Debug)]
struct Seen {
    max_receive_buffered: usize,
    max_paused_by_us: usize,
}

impl Seen {
    fn sample(&mut self, session: &SessionHandle) {
        let s = session.stats();
        self.max_receive_buffered = self.max_receive_buffered.max(s.receive_buffered);
        self.max_paused_by_us = self.max_paused_by_us.max(s.paused_by_us);
    }
}

/// Go's TestExceedBuffer: two 16 MiB downloads on one session; the second is read to the end
/// while the first is left unread, then the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceed_buffer_two_16_mib_downloads_second_read_first() {
    const LEN: u64 = 16 * MIB;
    let pair = pair(producer_handler(
        |t| Produce {
            len: LEN,
            seed: seed_of(t),
        },
        None,
    ))
    .await;
    let cap = Config::default().session_receive_cap;
    let mut first = pair.server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    let mut second = pair.server.dial_addr("tcp", "127.0.0.1:2").unwrap();
    first.write_all(b"GET /bigfile\r\n\r\n").await.unwrap();
    second.write_all(b"GET /bigfile\r\n\r\n").await.unwrap();

    let mut seen = Seen::default();
    let n = within(
        BOUND,
        "second download",
        read_all_checked(&mut second, 2, |_| seen.sample(&pair.server)),
    )
    .await;
    assert_eq!(n, 16_777_216);
    // The first download is unread: it must end up paused, holding about 2 MiB.
    until("the unread download is paused", || {
        seen.sample(&pair.server);
        seen.max_paused_by_us >= 1
    })
    .await;
    let n = within(
        BOUND,
        "first download",
        read_all_checked(&mut first, 1, |_| seen.sample(&pair.server)),
    )
    .await;
    assert_eq!(n, 16_777_216);
    assert!(seen.max_paused_by_us >= 1, "{seen:?}");
    assert!(seen.max_receive_buffered < cap, "{seen:?}");
    // Pause kept the unread stream near the watermark, far from 16 MiB.
    assert!(
        seen.max_receive_buffered < Config::default().stream_receive_cap,
        "{seen:?}"
    );
    let stats = pair.server.stats();
    assert_eq!(stats.receive_buffered, 0);
    assert_eq!(stats.paused_by_us, 0, "everything read: Resume sent");
    assert!(!pair.server.is_closed());
}

/// One stream is read a kilobyte per mebibyte of another one's progress; the fast one moves
/// 64 MiB to completion meanwhile, and the slow one's producer is held back by Pause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_does_not_stall_a_fast_stream() {
    const FAST: u64 = 64 * MIB;
    const SLOW: u64 = 16 * MIB;
    const FAST_SEED: u64 = 1;
    const SLOW_SEED: u64 = 2;
    let written: Arc<Vec<AtomicUsize>> = Arc::new((0..3).map(|_| AtomicUsize::new(0)).collect());
    let pair = pair(producer_handler(
        |t| {
            let seed = seed_of(t);
            Produce {
                len: if seed == FAST_SEED { FAST } else { SLOW },
                seed,
            }
        },
        Some(written.clone()),
    ))
    .await;
    let config = Config::default();
    let mut fast = pair.server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    let mut slow = pair.server.dial_addr("tcp", "127.0.0.1:2").unwrap();
    fast.write_all(b"go").await.unwrap();
    slow.write_all(b"go").await.unwrap();

    let (tokens_tx, mut tokens_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let slow_read = Arc::new(AtomicUsize::new(0));
    let max_slow_backlog = Arc::new(AtomicUsize::new(0));
    let fast_task = {
        let session = pair.server.clone();
        tokio::spawn(async move {
            let mut max_buffered = 0;
            let mut next_token = MIB;
            let n = read_all_checked(&mut fast, FAST_SEED, |off| {
                max_buffered = max_buffered.max(session.stats().receive_buffered);
                while off >= next_token {
                    tokens_tx.send(()).ok();
                    next_token += MIB;
                }
            })
            .await;
            (n, max_buffered)
        })
    };
    let slow_task = {
        let slow_read = slow_read.clone();
        let written = written.clone();
        let max_slow_backlog = max_slow_backlog.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let mut off = 0u64;
            // One small read per token, while the fast stream runs.
            while tokens_rx.recv().await.is_some() {
                let n = slow.read(&mut buf).await.unwrap();
                assert!(n > 0);
                check_pattern(SLOW_SEED, off, &buf[..n]).unwrap();
                off += n as u64;
                slow_read.store(off as usize, Ordering::SeqCst);
                // What the producer pushed and we have not read bounds what is buffered.
                let backlog = written[SLOW_SEED as usize].load(Ordering::SeqCst) - off as usize;
                max_slow_backlog.fetch_max(backlog, Ordering::SeqCst);
                tokio::task::yield_now().await;
            }
            (slow, off)
        })
    };
    let (fast_n, fast_max_buffered) = within(BOUND, "fast stream", fast_task).await.unwrap();
    assert_eq!(fast_n, FAST);
    // The fast stream finished while the slow one had been read only a trickle.
    let slow_at_fast_end = slow_read.load(Ordering::SeqCst) as u64;
    assert!(
        slow_at_fast_end <= 64 * 1024,
        "slow stream read {slow_at_fast_end} bytes"
    );
    let stats = pair.server.stats();
    assert!(
        stats.paused_by_us >= 1,
        "the slow stream is paused: {stats:?}"
    );
    assert!(
        stats.receive_buffered <= config.stream_receive_cap,
        "{stats:?}"
    );
    assert!(
        fast_max_buffered <= 2 * config.stream_receive_cap,
        "{fast_max_buffered}"
    );
    let (mut slow, off) = within(BOUND, "slow task", slow_task).await.unwrap();
    let backlog = max_slow_backlog.load(Ordering::SeqCst);
    assert!(
        backlog <= config.stream_receive_cap,
        "slow producer got {backlog} bytes ahead of its reader"
    );
    assert!(
        (written[SLOW_SEED as usize].load(Ordering::SeqCst) as u64) < SLOW / 2,
        "the slow producer was held back"
    );
    // The slow stream was never reset for exceeding its cap: it reads out completely.
    let mut rest = vec![0u8; (SLOW - off) as usize];
    within(BOUND, "rest of slow stream", slow.read_exact(&mut rest))
        .await
        .unwrap();
    check_pattern(SLOW_SEED, off, &rest).unwrap();
    let mut end = [0u8; 1];
    assert_eq!(slow.read(&mut end).await.unwrap(), 0);
}

/// A peer's Pause stops a writer once its send buffer is full, and no Data goes out until
/// Resume; after Resume the writer completes and every byte arrives.
#[tokio::test(start_paused = true)]
async fn pause_from_peer_stops_the_writer_until_resume() {
    let (server, mut peer) = raw_client().await;
    let config = Config::default();
    let mut stream = server.dial_addr("tcp", "127.0.0.1:8125").unwrap();
    let (id, _) = peer.expect_connect().await;
    peer.send(&Message::Pause { conn_id: id }).await;
    // The Pause is processed once the session reports it.
    within(BOUND, "pause processed", async {
        while server.stats().paused_by_peer == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;

    let total = 3 * config.stream_send_buffer + 12345;
    let mut data = vec![0u8; total];
    fill_pattern(7, 0, &mut data);
    let writer = tokio::spawn(async move {
        stream.write_all(&data).await.unwrap();
        stream.flush().await.unwrap();
        stream
    });
    // Nothing arrives for ten (virtual) seconds, and the writer stays stuck.
    let quiet = tokio::time::timeout(Duration::from_secs(10), peer.next_frame()).await;
    assert!(quiet.is_err(), "got {quiet:?} while paused");
    assert!(!writer.is_finished(), "the write completed while paused");
    let stats = server.stats();
    assert_eq!(stats.send_buffered, config.stream_send_buffer, "{stats:?}");
    assert_eq!(stats.paused_by_peer, 1);

    peer.send(&Message::Resume { conn_id: id }).await;
    let mut got = Vec::with_capacity(total);
    within(BOUND, "all data after resume", async {
        while got.len() < total {
            match peer.expect_message().await {
                Message::Data { conn_id, payload } => {
                    assert_eq!(conn_id, id);
                    got.extend_from_slice(&payload);
                }
                other => panic!("unexpected {}", summary(&other)),
            }
        }
    })
    .await;
    check_pattern(7, 0, &got).unwrap();
    let stream = within(BOUND, "writer done", writer).await.unwrap();
    assert_eq!(server.stats().send_buffered, 0);
    drop(stream);
    assert_eq!(
        peer.expect_message().await,
        Message::Error {
            conn_id: id,
            text: "EOF".into()
        }
    );
}

/// A peer that keeps sending after our Pause beyond the stream's cap gets the stream reset,
/// and the session survives.
#[tokio::test]
async fn data_beyond_the_stream_cap_resets_only_that_stream() {
    let (server, mut peer) = raw_client().await;
    let config = Config::default();
    let mut stream = server.dial_addr("tcp", "127.0.0.1:8125").unwrap();
    let (id, _) = peer.expect_connect().await;
    let chunk = bytes::Bytes::from(vec![7u8; 1 << 20]);
    let mut sent = 0;
    let mut saw_pause = false;
    while sent <= config.stream_receive_cap {
        peer.send(&Message::Data {
            conn_id: id,
            payload: chunk.clone(),
        })
        .await;
        sent += chunk.len();
    }
    // rd asked us to pause and then reset the stream with a cap error.
    let text = within(BOUND, "reset", async {
        loop {
            match peer.expect_message().await {
                Message::Pause { conn_id } if conn_id == id => saw_pause = true,
                Message::Error { conn_id, text } if conn_id == id => return text,
                other => panic!("unexpected {}", summary(&other)),
            }
        }
    })
    .await;
    assert!(saw_pause);
    assert!(text.contains("receive buffer limit"), "{text}");
    let err = stream.read(&mut [0u8; 16]).await.unwrap_err();
    assert_eq!(err.to_string(), text);
    assert_eq!(server.stats().receive_buffered, 0);
    assert!(!server.is_closed());
    drop(stream);
    let _again = server.dial_addr("tcp", "127.0.0.1:8125").unwrap();
    let (id2, _) = peer.expect_connect().await;
    assert_ne!(id2, id);
}

/// Pause arriving mid-transfer: Data stops after what was already on its way, the writer
/// waits, and Resume lets the rest through intact.
#[tokio::test(start_paused = true)]
async fn pause_mid_transfer_stops_data_until_resume() {
    const TOTAL: usize = 8 << 20;
    let (server, mut peer) = raw_client().await;
    let mut stream = server.dial_addr("tcp", "127.0.0.1:8125").unwrap();
    let (id, _) = peer.expect_connect().await;
    let writer = tokio::spawn(async move {
        let mut data = vec![0u8; TOTAL];
        fill_pattern(9, 0, &mut data);
        stream.write_all(&data).await.unwrap();
        stream
    });
    let mut got = Vec::with_capacity(TOTAL);
    let next_data = async |peer: &mut RawPeer| match peer.expect_message().await {
        Message::Data { conn_id, payload } => {
            assert_eq!(conn_id, id);
            payload
        }
        other => panic!("unexpected {}", summary(&other)),
    };
    while got.len() < (1 << 20) {
        got.extend_from_slice(&next_data(&mut peer).await);
    }
    peer.send(&Message::Pause { conn_id: id }).await;
    let at_pause = got.len();
    // Read until quiet for a virtual second.
    while let Ok(frame) = tokio::time::timeout(Duration::from_secs(1), peer.next_frame()).await {
        match frame.unwrap().message {
            Message::Data { payload, .. } => got.extend_from_slice(&payload),
            other => panic!("unexpected {}", summary(&other)),
        }
    }
    let in_flight = got.len() - at_pause;
    assert!(
        in_flight <= 2 * DUPLEX_BUFFER + Config::default().stream_send_buffer,
        "{in_flight} bytes after Pause"
    );
    assert!(!writer.is_finished());
    assert_eq!(server.stats().paused_by_peer, 1);
    peer.send(&Message::Resume { conn_id: id }).await;
    while got.len() < TOTAL {
        got.extend_from_slice(&next_data(&mut peer).await);
    }
    check_pattern(9, 0, &got).unwrap();
    within(BOUND, "writer", writer).await.unwrap();
}

/// Both ends paused each other (neither application reads) and then one application drops
/// its stream: its EOF must still get through, so both ends forget the stream and the
/// client's pipe task ends instead of waiting forever on a Resume nobody will send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_paused_both_ways_still_closes_it() {
    // The client's local service writes 64 MiB and never reads.
    let pair = pair(producer_handler(
        |_| Produce {
            len: 64 * MIB,
            seed: 1,
        },
        None,
    ))
    .await;
    let mut stream = pair.server.dial_addr("tcp", "127.0.0.1:1").unwrap();
    stream.write_all(b"start").await.unwrap();
    let writer = tokio::spawn(async move {
        let chunk = vec![5u8; 1 << 20];
        loop {
            stream.write_all(&chunk).await.unwrap();
        }
    });
    until("paused both ways", || {
        let s = pair.server.stats();
        s.paused_by_us == 1 && s.paused_by_peer == 1
    })
    .await;
    writer.abort();
    assert!(writer.await.unwrap_err().is_cancelled());
    until("stream forgotten on both sides", || {
        pair.server.stats().streams == 0 && pair.client.stats().streams == 0
    })
    .await;
    assert!(!pair.server.is_closed() && !pair.client.is_closed());
}

/// A peer that ignores Pause on many streams at once: those streams are reset, the session
/// keeps reading and serving the others, and what it holds stays within its ceiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_ignoring_pause_on_many_streams_loses_only_those_streams() {
    let mut config = Config::default();
    config.high_watermark = 256 << 10;
    config.low_watermark = 32 << 10;
    config.stream_receive_cap = 4 << 20;
    config.session_receive_budget = 8 << 20;
    config.session_receive_ceiling = 16 << 20;
    config.session_receive_cap = 32 << 20;
    config.validate().unwrap();
    let ceiling = config.session_receive_ceiling;
    let (server, mut peer) =
        raw_client_of(SessionBuilder::server(CLIENT_KEY, SESSION_KEY).config(config)).await;
    let mut flooded = Vec::new();
    for _ in 0..20 {
        let stream = server.dial_addr("tcp", "127.0.0.1:8125").unwrap();
        let (id, _) = peer.expect_connect().await;
        flooded.push((id, stream));
    }
    let mut honest = server.dial_addr("tcp", "127.0.0.1:8126").unwrap();
    let (honest_id, _) = peer.expect_connect().await;

    // 3 MiB on each of the 20 streams, Pause or not: 60 MiB against a 16 MiB ceiling.
    let chunk = bytes::Bytes::from(vec![7u8; 256 << 10]);
    let ids: Vec<ConnId> = flooded.iter().map(|(id, _)| *id).collect();
    let (mut sink, mut source) = futures_util::StreamExt::split(peer.ws);
    let flood = tokio::spawn(async move {
        let mut message_id = 1;
        for _ in 0..12 {
            for &id in &ids {
                message_id += 1;
                let msg = Message::Data {
                    conn_id: id,
                    payload: chunk.clone(),
                };
                futures_util::SinkExt::send(&mut sink, WsMessage::Binary(msg.to_bytes(message_id)))
                    .await
                    .unwrap();
            }
        }
        // Then a little on the honest stream, below any pause mark.
        let msg = Message::Data {
            conn_id: honest_id,
            payload: bytes::Bytes::from(vec![9u8; 16 << 10]),
        };
        futures_util::SinkExt::send(&mut sink, WsMessage::Binary(msg.to_bytes(message_id + 1)))
            .await
            .unwrap();
        sink
    });
    // Meanwhile the session answers: Pause, then Errors for the streams that ignore it.
    let mut reset = std::collections::HashSet::new();
    let replies = tokio::spawn(async move {
        while let Some(Ok(msg)) = futures_util::StreamExt::next(&mut source).await {
            let WsMessage::Binary(raw) = msg else {
                continue;
            };
            match rd_proto::decode(raw).unwrap().message {
                // The test's own drops and close at the end.
                Message::Error { text, .. } if text == "EOF" || text == "tunnel disconnect" => {}
                Message::Error { conn_id, text } => {
                    assert_ne!(conn_id, honest_id, "the honest stream was reset: {text}");
                    if text.contains("connection not found") {
                        // The flood goes on after the reset, as a peer ignoring us does.
                        assert!(reset.contains(&conn_id), "{text}");
                    } else {
                        assert!(text.contains("ignored flow control"), "{text}");
                        reset.insert(conn_id);
                    }
                }
                Message::Pause { .. } => {}
                other => panic!("unexpected {}", summary(&other)),
            }
        }
        reset
    });
    let _sink = within(BOUND, "the flood is taken", flood).await.unwrap();
    let mut got = vec![0u8; 16 << 10];
    within(
        BOUND,
        "the honest stream's data",
        honest.read_exact(&mut got),
    )
    .await
    .unwrap();
    assert!(got.iter().all(|b| *b == 9));
    assert!(!server.is_closed());
    assert!(server.stats().receive_buffered <= ceiling);
    // Some of the flooded streams were reset for ignoring Pause.
    drop(flooded);
    drop(honest);
    server.close();
    let reset = within(BOUND, "the replies", replies).await.unwrap();
    assert!(!reset.is_empty(), "no flooded stream was reset");
}
