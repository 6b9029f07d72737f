//! Two sessions back to back (see `common`), scenario by scenario, on a virtual clock.
//!
//! The Go implementation's own session tests, and where each is covered (Go test -> rd test):
//! - `TestExceedBuffer` -> `a_four_streams_16_mib_each_way_with_a_slow_reader`
//! - `TestSession_connections`, `TestSession_clientConnect` -> `connect_registers_the_stream_under_the_received_id`
//! - `TestSession_sessionKeys`, `TestSession_addRemoveRemoteClient` -> `add_and_remove_client_events`
//! - `TestSession_activeConnectionIDs`, `TestSession_sendSyncConnections` -> `sync_payload_lists_sorted_active_ids`
//! - `TestSession_sendPings` -> `e_client_pings_every_5_s_server_never`
//! - `TestSession_connectionData` -> `connect_registers_the_stream_under_the_received_id`
//! - `TestSession_pauseResumeConnection` -> `pause_and_resume_set_and_clear_the_peer_pause`
//! - `TestSession_closeConnection` -> `c_reset_reason_reaches_the_peer`
//! - `Test_diffSortedSetsGetRemoved` -> `go_sync_diff_cases`
//! - (`Test_encodeConnectionIDs` and `TestNewServerMessage_266` are in proptest.rs / codec unit
//!   tests; `TestSession_CloseDeadlock` and `TestConnectionSetWriteDeadlineConcurrentWrite` are
//!   about Go locks and have no sans-IO counterpart.)
//!
//! Suggested extra cases: unknown type ignored -> `i_unknown_type_is_ignored`; Data to unknown
//! id, Error to unknown id -> `h_unknown_ids`; Connect without `/` and Connect of 300 bytes ->
//! `k_bad_connects_refuse_only_that_connection` (rd deviation: an Error for that connection, Go
//! ends the session); Error of 150 bytes -> `error_text_is_cut_to_100_bytes`; Error `EOF` ->
//! `b_finish_gives_data_then_eof`; bad SyncConnections length -> `k_session_level_garbage_ends_the_session`;
//! 60 s without pings, pongs extend deadlines -> `f_keepalive_*`. Connect denied: rd leaves
//! the decision to the application, which refuses with `reset` -> `d_connect_refused_text_reaches_the_dialer`.
//! Text frames are the transport's concern (rd-proto has no text input).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Dir, Sim};
use rd_proto::varint::put_varint;
use rd_proto::{
    ClientSession, Config, ConnId, Event, Message, ProtocolError, ReadOutcome, SessionEnd, Side,
    StreamEnd, StreamError,
};

const DATA: i64 = 1;
const CONNECT: i64 = 2;
const ERROR: i64 = 3;
const PAUSE: i64 = 6;
const RESUME: i64 = 7;
const SYNC: i64 = 8;

/// A message built by hand, as a (possibly broken) peer would send it.
fn raw(conn: i64, type_code: i64, payload: &[u8]) -> Bytes {
    let mut out = Vec::new();
    put_varint(&mut out, 4242);
    put_varint(&mut out, conn);
    put_varint(&mut out, type_code);
    if type_code == DATA || type_code == CONNECT {
        put_varint(&mut out, 15_000);
    }
    out.extend_from_slice(payload);
    Bytes::from(out)
}

fn data(conn: i64, payload: Vec<u8>) -> Bytes {
    Message::Data {
        conn_id: ConnId(conn),
        payload: Bytes::from(payload),
    }
    .to_bytes(7)
}

fn errors_sent(sim: &Sim, side: Side, id: ConnId) -> Vec<String> {
    let p = match side {
        Side::Client => &sim.client,
        Side::Server => &sim.server,
    };
    p.sent
        .iter()
        .filter_map(|f| match &f.message {
            Message::Error { conn_id, text } if *conn_id == id => Some(text.clone()),
            _ => None,
        })
        .collect()
}

fn requested(events: &[Event]) -> Vec<ConnId> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StreamRequested { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

fn closed(events: &[Event]) -> Vec<(ConnId, StreamEnd)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StreamClosed { id, end } => Some((*id, end.clone())),
            _ => None,
        })
        .collect()
}

fn read_all(sim: &mut Sim, side: Side, id: ConnId) -> (Vec<u8>, Result<ReadOutcome, StreamError>) {
    let mut out = Vec::new();
    loop {
        match sim.read(side, id, usize::MAX) {
            Ok(ReadOutcome::Data(b)) => out.extend_from_slice(&b),
            other => return (out, other),
        }
    }
}

/// Server opens a stream and the client learns of it.
fn open_from_server(sim: &mut Sim) -> ConnId {
    let id = sim.open(Side::Server).unwrap();
    sim.flush();
    assert!(requested(&sim.client.take_events()).contains(&id));
    id
}

// ----- (a) bulk transfer with flow control ---------------------------------------------------

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn a_four_streams_16_mib_each_way_with_a_slow_reader() {
    const TOTAL: usize = 16 * 1024 * 1024;
    const STREAMS: usize = 4;
    let config = Config::default();
    let cap = config.stream_receive_cap as i64;
    let high = config.high_watermark as i64;
    let mut sim = Sim::new(config);
    let src = pseudo_random(TOTAL + 2 * STREAMS * 4099);
    let ids: Vec<ConnId> = (0..STREAMS).map(|_| open_from_server(&mut sim)).collect();
    assert_eq!(ids, [ConnId(2), ConnId(3), ConnId(4), ConnId(5)]);
    // (writer side, stream index) -> offset into src; sent and received counters.
    let offset = |w: usize, k: usize| (w * STREAMS + k) * 4099;
    let sides = [Side::Server, Side::Client];
    let mut sent = [[0usize; STREAMS]; 2];
    let mut received = [[0usize; STREAMS]; 2];
    let slow = ids[0]; // the client reads the server's bytes on this stream slowly

    let mut iterations = 0;
    while received.iter().flatten().any(|&r| r < TOTAL) {
        iterations += 1;
        assert!(iterations < 200_000, "transfer stalled: {received:?}");
        for (w, &writer) in sides.iter().enumerate() {
            for (k, &id) in ids.iter().enumerate() {
                while sent[w][k] < TOTAL {
                    let chunk = &src[offset(w, k) + sent[w][k]..offset(w, k) + TOTAL];
                    match sim.write(writer, id, chunk) {
                        Ok(n) => sent[w][k] += n,
                        Err(StreamError::Blocked) => break,
                        Err(e) => panic!("write: {e}"),
                    }
                }
            }
        }
        for (w, &writer) in sides.iter().enumerate() {
            let reader = if writer == Side::Server {
                Side::Client
            } else {
                Side::Server
            };
            for (k, &id) in ids.iter().enumerate() {
                let is_slow = reader == Side::Client && id == slow;
                if is_slow && iterations % 3 != 0 {
                    continue;
                }
                let mut budget = if is_slow { 48 * 1024 } else { usize::MAX };
                while budget > 0 {
                    match sim.read(reader, id, budget.min(1 << 20)) {
                        Ok(ReadOutcome::Data(b)) => {
                            let at = offset(w, k) + received[w][k];
                            assert!(b[..] == src[at..at + b.len()], "bytes differ on {id}");
                            received[w][k] += b.len();
                            budget -= b.len().min(budget);
                        }
                        Err(StreamError::Blocked) => break,
                        other => panic!("read: {other:?}"),
                    }
                }
            }
        }
        sim.step();
    }
    assert_eq!(received, [[TOTAL; STREAMS]; 2]);

    // Flow control engaged for the slow stream only, within the hard cap.
    let pauses = sim.client.sent_of_type(PAUSE);
    let resumes = sim.client.sent_of_type(RESUME);
    assert!(
        pauses.contains(&&Message::Pause { conn_id: slow }),
        "{pauses:?}"
    );
    assert!(resumes.contains(&&Message::Resume { conn_id: slow }));
    let max = sim.client.max_unread[&slow];
    assert!(max > high && max <= cap, "slow stream peaked at {max}");
    // Nothing was reset, both sessions are alive.
    assert!(sim.client.errors.is_empty() && sim.server.errors.is_empty());
    assert!(sim.client.session.end().is_none() && sim.server.session.end().is_none());
    for side in sides {
        assert!(sim.peer(side).sent_of_type(ERROR).is_empty());
    }

    // Clean shutdown: the server finishes, the client sees EOF, both release.
    for &id in &ids {
        sim.finish(Side::Server, id).unwrap();
    }
    sim.flush();
    for &id in &ids {
        assert_eq!(sim.read(Side::Client, id, 10), Ok(ReadOutcome::Eof));
        sim.release(Side::Client, id);
        sim.release(Side::Server, id);
    }
    sim.flush();
    assert_eq!(sim.client.session.stats().streams, 0);
    assert_eq!(sim.server.session.stats().streams, 0);
    assert_eq!(sim.client.session.stats().receive_buffered, 0);
}

// ----- (b) finish -----------------------------------------------------------------------------

#[test]
fn b_finish_gives_data_then_eof() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    assert_eq!(sim.write(Side::Server, id, b"hello"), Ok(5));
    sim.finish(Side::Server, id).unwrap();
    assert_eq!(
        sim.write(Side::Server, id, b"x"),
        Err(StreamError::Finished)
    );
    sim.flush();
    // Data, then Eof, and the stream left the wire with a clean end.
    assert_eq!(
        sim.read(Side::Client, id, 100),
        Ok(ReadOutcome::Data(Bytes::from_static(b"hello")))
    );
    assert_eq!(sim.read(Side::Client, id, 100), Ok(ReadOutcome::Eof));
    assert_eq!(sim.read(Side::Client, id, 100), Ok(ReadOutcome::Eof));
    assert_eq!(
        closed(&sim.client.take_events()),
        [(id, StreamEnd::Finished)]
    );
    // The client echoed EOF (as Go does); the server took it as the end and did not answer.
    assert_eq!(errors_sent(&sim, Side::Client, id), ["EOF"]);
    assert_eq!(errors_sent(&sim, Side::Server, id), ["EOF"]);
    assert_eq!(
        closed(&sim.server.take_events()),
        [(id, StreamEnd::Finished)]
    );
    assert_eq!(sim.read(Side::Server, id, 100), Ok(ReadOutcome::Eof));
    // Entries stay until the application lets go.
    assert_eq!(sim.client.session.stats().streams, 1);
    assert_eq!(sim.server.session.stats().streams, 1);
    sim.release(Side::Client, id);
    sim.release(Side::Server, id);
    assert!(!sim.flush(), "releasing a finished stream sends nothing");
    assert_eq!(sim.client.session.stats().streams, 0);
    assert_eq!(sim.server.session.stats().streams, 0);
    assert_eq!(sim.read(Side::Client, id, 1), Err(StreamError::Unknown(id)));
}

#[test]
fn release_of_an_open_stream_finishes_it() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    sim.write(Side::Client, id, b"response").unwrap();
    sim.release(Side::Client, id);
    sim.flush();
    let (bytes, end) = read_all(&mut sim, Side::Server, id);
    assert_eq!(bytes, b"response");
    assert_eq!(end, Ok(ReadOutcome::Eof));
    sim.release(Side::Server, id);
    sim.flush();
    assert_eq!(sim.client.session.stats().streams, 0);
    assert_eq!(sim.server.session.stats().streams, 0);
}

// ----- (c), (d) reset ------------------------------------------------------------------------

#[test]
fn c_reset_reason_reaches_the_peer() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    sim.write(Side::Client, id, b"partial").unwrap();
    sim.reset(Side::Client, id, "read tcp: connection reset by peer")
        .unwrap();
    sim.flush();
    let reason = "read tcp: connection reset by peer".to_owned();
    // Queued Data was dropped; the Error went out (Go's closeConnection check).
    assert!(sim.client.sent_of_type(DATA).is_empty());
    assert_eq!(
        errors_sent(&sim, Side::Client, id),
        std::slice::from_ref(&reason)
    );
    assert_eq!(
        sim.read(Side::Server, id, 100),
        Err(StreamError::Closed(StreamEnd::PeerError(reason.clone())))
    );
    assert_eq!(
        sim.read(Side::Client, id, 100),
        Err(StreamError::Closed(StreamEnd::Reset(reason.clone())))
    );
    assert_eq!(
        sim.write(Side::Server, id, b"more"),
        Err(StreamError::Closed(StreamEnd::PeerError(reason.clone())))
    );
    // The server's echo is ignored by the client: no third Error.
    assert_eq!(
        errors_sent(&sim, Side::Server, id),
        std::slice::from_ref(&reason)
    );
    assert_eq!(errors_sent(&sim, Side::Client, id).len(), 1);
    assert_eq!(
        closed(&sim.client.take_events()),
        [(id, StreamEnd::Reset(reason.clone()))]
    );
    sim.release(Side::Client, id);
    sim.release(Side::Server, id);
    assert_eq!(sim.client.session.stats().streams, 0);
    assert_eq!(sim.server.session.stats().streams, 0);
}

#[test]
fn d_connect_refused_text_reaches_the_dialer() {
    const REFUSED: &str = "dial tcp 127.0.0.1:9: connect: connection refused";
    let mut sim = Sim::new(Config::default());
    let id = sim.open(Side::Server).unwrap();
    // The dialer writes before the remote dial result, as Go allows.
    sim.write(Side::Server, id, b"GET / HTTP/1.1\r\n\r\n")
        .unwrap();
    sim.flush();
    let events = sim.client.take_events();
    let Some(Event::StreamRequested { target, .. }) = events.first() else {
        panic!("{events:?}")
    };
    assert_eq!(target.to_string(), "tcp/127.0.0.1:8125");
    sim.reset(Side::Client, id, REFUSED).unwrap();
    sim.flush();
    assert_eq!(
        sim.read(Side::Server, id, 100),
        Err(StreamError::Closed(StreamEnd::PeerError(REFUSED.into())))
    );
    assert_eq!(
        closed(&sim.server.take_events()),
        [(id, StreamEnd::PeerError(REFUSED.into()))]
    );
}

// ----- (e), (f) keepalive -----------------------------------------------------------------------

#[test]
fn e_client_pings_every_5_s_server_never() {
    let mut sim = Sim::new(Config::default());
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.client.pings_sent, 12);
    assert_eq!(sim.server.pings_sent, 0);
    // Only the client sends SyncConnections, the first after one interval.
    assert_eq!(sim.client.sent_of_type(SYNC).len(), 1);
    assert!(sim.server.sent_of_type(SYNC).is_empty());
    sim.advance(Duration::from_millis(4999));
    assert_eq!(sim.client.pings_sent, 12);
    sim.advance(Duration::from_millis(1));
    assert_eq!(sim.client.pings_sent, 13);
}

#[test]
fn e_server_pings_only_a_client_that_does_not_ping() {
    // A client on Go's schedule: the server never needs to ping (each of its ticks heard
    // the client's ping), so the wire looks as with a Go server.
    let mut sim = Sim::new(Config::default());
    sim.advance(Duration::from_secs(600));
    assert_eq!(sim.server.pings_sent, 0);
    // A client that pings only every 10 minutes (it still answers pings): the server pings
    // on every 5 s tick, the first 7.5 s in, and the answers keep both sides up.
    let mut quiet = Config::default();
    quiet.ping_interval = Duration::from_secs(600);
    quiet.keepalive_timeout = Duration::from_secs(3600);
    quiet.sync_interval = None;
    let mut sim = Sim::with_configs(quiet, Config::default());
    sim.advance(Duration::from_secs(300));
    assert_eq!(sim.client.pings_sent, 0);
    assert_eq!(sim.server.pings_sent, 59);
    assert!(sim.server.session.end().is_none() && sim.client.session.end().is_none());
    // The link stops forwarding: the server ends the session 15 s after the last answer
    // (to its ping at 297.5 s).
    sim.keepalive_works = false;
    sim.advance(Duration::from_millis(12_499));
    assert!(sim.server.session.end().is_none());
    sim.advance(Duration::from_millis(1));
    assert_eq!(
        sim.server.session.end(),
        Some(&SessionEnd::Unresponsive(Duration::from_secs(15)))
    );
}

#[test]
fn f_keepalive_answered_pings_keep_the_session_for_10_minutes() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    sim.advance(Duration::from_secs(600));
    assert!(sim.client.session.end().is_none());
    assert!(sim.server.session.end().is_none());
    assert_eq!(sim.client.pings_sent, 120);
    assert_eq!(sim.client.sent_of_type(SYNC).len(), 10);
    // The stream survived the syncs (the client lists it every time).
    assert!(closed(&sim.server.take_events()).is_empty());
    assert_eq!(sim.write(Side::Server, id, b"still here"), Ok(10));
}

#[test]
fn f_keepalive_timeout_ends_both_sides_even_with_data_flowing() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    sim.keepalive_works = false;
    for _ in 0..5 {
        sim.write(Side::Server, id, b"tick").unwrap();
        sim.write(Side::Client, id, b"tock").unwrap();
        sim.advance(Duration::from_secs(10));
        assert_eq!(read_all(&mut sim, Side::Client, id).0, b"tick");
        assert_eq!(read_all(&mut sim, Side::Server, id).0, b"tock");
    }
    // t = 50 s: alive; pings went out but nobody answered.
    assert!(sim.client.session.end().is_none() && sim.server.session.end().is_none());
    assert_eq!(sim.client.pings_sent, 10);
    sim.write(Side::Server, id, b"tick").unwrap();
    sim.advance(Duration::from_millis(9_999));
    assert!(sim.client.session.end().is_none());
    sim.advance(Duration::from_millis(1));
    let want = SessionEnd::KeepaliveTimeout(Duration::from_secs(60));
    for side in [Side::Client, Side::Server] {
        let p = sim.peer(side);
        assert_eq!(p.session.end(), Some(&want), "{side:?}");
        let events = p.take_events();
        assert!(
            closed(&events).contains(&(id, StreamEnd::Disconnected)),
            "{side:?}: {events:?}"
        );
        assert_eq!(events.last(), Some(&Event::SessionClosed(want.clone())));
        assert_eq!(p.session.poll_timeout(), None);
    }
    // Buffered data is still readable, then the disconnect shows.
    let (bytes, end) = read_all(&mut sim, Side::Client, id);
    assert_eq!(bytes, b"tick");
    assert_eq!(end, Err(StreamError::Closed(StreamEnd::Disconnected)));
    assert!(sim.open(Side::Server).is_err());
}

#[test]
fn f_keepalive_server_without_pings_for_60_s_ends() {
    let mut sim = Sim::new(Config::default());
    // Pings are lost on the way to the server only: the client still gets... nothing either,
    // since pongs answer pings. Deliver pongs by hand instead: the client stays up on its
    // own keepalives, the server sees none.
    sim.keepalive_works = false;
    for _ in 0..12 {
        sim.advance(Duration::from_secs(5));
        let now = sim.now;
        sim.client.session.handle_keepalive(now);
    }
    assert!(sim.client.session.end().is_none());
    assert_eq!(
        sim.server.session.end(),
        Some(&SessionEnd::KeepaliveTimeout(Duration::from_secs(60)))
    );
}

// ----- (g) SyncConnections ------------------------------------------------------------------------

#[test]
fn g_sync_closes_unlisted_old_streams_only() {
    let mut sim = Sim::new(Config::default());
    // A: Connect lost, so the client never lists it.
    let a = sim.open(Side::Server).unwrap();
    sim.pump(Side::Server);
    assert_eq!(sim.drop_in_flight(Dir::ServerToClient).len(), 1);
    // C: known to both.
    let c = open_from_server(&mut sim);
    // A client-opened stream, accepted by the server.
    let local = sim.open(Side::Client).unwrap();
    assert_eq!(local, ConnId(1));
    sim.flush();
    assert_eq!(requested(&sim.server.take_events()), [local]);
    sim.advance(Duration::from_secs(30));
    // B: Connect lost too, but only 30 s before the sync.
    let b = sim.open(Side::Server).unwrap();
    sim.pump(Side::Server);
    sim.drop_in_flight(Dir::ServerToClient);
    let more: Vec<ConnId> = (0..3).map(|_| open_from_server(&mut sim)).collect();
    sim.server.take_events();

    sim.advance(Duration::from_secs(30));
    let syncs = sim.client.sent_of_type(SYNC);
    let mut want = vec![local.0, c.0];
    want.extend(more.iter().map(|i| i.0));
    assert_eq!(syncs, [&Message::SyncConnections { ids: want.clone() }]);
    assert!(want.windows(2).all(|w| w[0] < w[1]), "sorted: {want:?}");
    assert_eq!(closed(&sim.server.take_events()), [(a, StreamEnd::Synced)]);
    // Go's `sync from client` closes without sending an Error.
    assert!(errors_sent(&sim, Side::Server, a).is_empty());
    assert_eq!(
        sim.read(Side::Server, a, 1),
        Err(StreamError::Closed(StreamEnd::Synced))
    );

    // One interval later B is old enough.
    sim.advance(Duration::from_secs(60));
    assert_eq!(sim.client.sent_of_type(SYNC).len(), 2);
    assert_eq!(closed(&sim.server.take_events()), [(b, StreamEnd::Synced)]);
    for id in std::iter::once(c).chain(more) {
        assert_eq!(sim.write(Side::Server, id, b"ok"), Ok(2), "{id} kept");
    }
}

#[test]
fn go_sync_diff_cases() {
    // Test_diffSortedSetsGetRemoved: server set vs client list -> removed. Streams the peer
    // opened have no grace period.
    let cases: [(&[i64], &[i64], &[i64]); 4] = [
        (&[2, 4, 6], &[2, 4, 6], &[]),
        (&[1, 2, 3], &[1, 2, 3, 4, 5], &[]),
        (&[1, 2, 3, 4, 5], &[1, 2, 3], &[4, 5]),
        (&[1, 2, 3, 4, 5], &[3, 6], &[1, 2, 4, 5]),
    ];
    for (server, client, removed) in cases {
        let mut sim = Sim::new(Config::default());
        for &id in server {
            let t = rd_proto::Target::new("tcp", "10.0.0.1:80").unwrap();
            let connect = Message::Connect {
                conn_id: ConnId(id),
                target: t,
            };
            sim.inject(Side::Server, connect.to_bytes(1)).unwrap();
        }
        assert_eq!(requested(&sim.server.take_events()).len(), server.len());
        let sync = Message::SyncConnections {
            ids: client.to_vec(),
        };
        sim.inject(Side::Server, sync.to_bytes(2)).unwrap();
        let mut got: Vec<i64> = closed(&sim.server.take_events())
            .into_iter()
            .map(|(id, end)| {
                assert_eq!(end, StreamEnd::Synced);
                id.0
            })
            .collect();
        got.sort_unstable();
        assert_eq!(got, removed, "server {server:?} client {client:?}");
        assert_eq!(sim.pump(Side::Server), 0, "sync closes silently");
    }
}

#[test]
fn sync_payload_lists_sorted_active_ids() {
    // TestSession_sendSyncConnections with 0, 5 and 20 active ids.
    for n in [0usize, 5, 20] {
        let mut sim = Sim::new(Config::default());
        let mut ids: Vec<i64> = (0..n).map(|_| open_from_server(&mut sim).0).collect();
        // A finished stream that has left the wire is not listed.
        let gone = open_from_server(&mut sim);
        sim.reset(Side::Client, gone, "gone").unwrap();
        sim.advance(Duration::from_secs(60));
        ids.sort_unstable();
        assert_eq!(sim.client.session.live_ids(), ids);
        let syncs = sim.client.sent_of_type(SYNC);
        assert_eq!(syncs, [&Message::SyncConnections { ids: ids.clone() }]);
        // Payload is 8 bytes per id.
        let frame = sim
            .client
            .sent
            .iter()
            .find(|f| f.message.type_code() == SYNC);
        let (message, message_id) = (&frame.unwrap().message, frame.unwrap().message_id);
        let header = rd_proto::varint::varint_len(message_id) + 2;
        assert_eq!(message.to_bytes(message_id).len(), header + 8 * n);
    }
}

// ----- (h), (i) unknown ids and types -------------------------------------------------------------

#[test]
fn h_unknown_ids() {
    let mut sim = Sim::new(Config::default());
    // Data for an unknown id: Error "connection not found <clientKey>/<sessionKey>/<id>".
    sim.inject(Side::Client, data(5, b"x".to_vec())).unwrap();
    assert_eq!(sim.pump(Side::Client), 1);
    assert_eq!(
        errors_sent(&sim, Side::Client, ConnId(5)),
        ["connection not found client/0/5"]
    );
    // An Error message (docs/protocol.md, "Message layout"): header `.. 0a 06`, then the text.
    let last = sim.client.sent.last().unwrap();
    let bytes = last.message.to_bytes(last.message_id);
    let hdr = rd_proto::varint::varint_len(last.message_id);
    assert_eq!(bytes[hdr..hdr + 2], [0x0a, 0x06]);
    assert_eq!(&bytes[hdr + 2..], b"connection not found client/0/5");
    sim.inject(Side::Server, data(9, Vec::new())).unwrap();
    sim.pump(Side::Server);
    assert_eq!(
        errors_sent(&sim, Side::Server, ConnId(9)),
        ["connection not found foo/5577006791947779410/9"]
    );
    // Pause, Resume and Error for unknown ids: nothing at all.
    for msg in [
        Message::Pause { conn_id: ConnId(5) },
        Message::Resume { conn_id: ConnId(5) },
        Message::Error {
            conn_id: ConnId(5),
            text: "EOF".into(),
        },
        Message::Error {
            conn_id: ConnId(5),
            text: "boom".into(),
        },
    ] {
        sim.inject(Side::Client, msg.to_bytes(3)).unwrap();
        assert_eq!(sim.pump(Side::Client), 0, "{msg:?}");
    }
    assert!(sim.client.take_events().is_empty());
    // An id that was closed earlier counts as unknown.
    let id = open_from_server(&mut sim);
    sim.reset(Side::Server, id, "bye").unwrap();
    sim.flush();
    sim.inject(Side::Server, data(id.0, b"late".to_vec()))
        .unwrap();
    sim.pump(Side::Server);
    assert_eq!(
        errors_sent(&sim, Side::Server, id).last().unwrap(),
        &format!("connection not found foo/5577006791947779410/{id}")
    );
    assert!(sim.client.session.end().is_none() && sim.server.session.end().is_none());
}

#[test]
fn i_unknown_type_is_ignored() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    sim.inject(
        Side::Client,
        Bytes::from_static(&[0x02, 0x14, 0x12, 0xff, 0xff]),
    )
    .unwrap();
    sim.inject(Side::Client, raw(id.0, 9, b"payload")).unwrap();
    sim.inject(Side::Client, raw(0, 100, b"")).unwrap();
    assert_eq!(sim.pump(Side::Client), 0);
    assert!(sim.client.take_events().is_empty());
    assert!(sim.client.session.end().is_none());
    sim.write(Side::Server, id, b"after").unwrap();
    sim.flush();
    assert_eq!(read_all(&mut sim, Side::Client, id).0, b"after");
}

// ----- (j) a peer that ignores Pause -------------------------------------------------------------

#[test]
fn j_peer_ignoring_pause_is_reset_at_the_cap() {
    let mut sim = Sim::new(Config::default());
    let cap = sim.client.session.config().stream_receive_cap;
    let target = rd_proto::Target::new("tcp", "127.0.0.1:80").unwrap();
    for conn in [2, 4] {
        let connect = Message::Connect {
            conn_id: ConnId(conn),
            target: target.clone(),
        };
        sim.inject(Side::Client, connect.to_bytes(1)).unwrap();
    }
    let chunk = vec![0xabu8; 32 * 1024];
    let mut delivered = 0;
    while delivered <= cap {
        sim.inject(Side::Client, data(2, chunk.clone())).unwrap();
        delivered += chunk.len();
    }
    sim.pump(Side::Client);
    let pauses = sim.client.sent_of_type(PAUSE);
    assert_eq!(
        pauses,
        [&Message::Pause { conn_id: ConnId(2) }],
        "one Pause"
    );
    let errors = errors_sent(&sim, Side::Client, ConnId(2));
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains(&cap.to_string()), "{errors:?}");
    assert!(
        errors[0].len() <= rd_proto::MAX_ERROR_TEXT,
        "fits Go's 100 bytes"
    );
    assert_eq!(sim.client.max_unread[&ConnId(2)], cap as i64);
    assert_eq!(sim.client.unread(ConnId(2)), 0, "reset dropped the buffer");
    let events = sim.client.take_events();
    assert!(matches!(
        closed(&events)[..],
        [(ConnId(2), StreamEnd::Reset(ref t))] if *t == errors[0]
    ));
    // Counted for metrics.
    assert!(events.contains(&rd_proto::Event::LimitExceeded(
        rd_proto::Limit::StreamReceiveCap
    )));
    assert!(matches!(
        sim.read(Side::Client, ConnId(2), 10),
        Err(StreamError::Closed(StreamEnd::Reset(_)))
    ));
    // The other stream and the session carry on.
    sim.inject(Side::Client, data(4, b"fine".to_vec())).unwrap();
    assert_eq!(read_all(&mut sim, Side::Client, ConnId(4)).0, b"fine");
    assert!(sim.client.session.end().is_none());
    assert_eq!(sim.client.session.stats().receive_buffered, 0);
}

#[test]
fn session_receive_cap_resets_the_stream_that_overflows_it() {
    let mut config = Config::default();
    config.high_watermark = 1 << 20;
    config.low_watermark = 1 << 17;
    config.stream_receive_cap = 2 << 20;
    config.session_receive_cap = 3 << 20;
    config.session_receive_budget = 3 << 20;
    config.session_receive_ceiling = 3 << 20;
    config.validate().unwrap();
    let mut sim = Sim::new(config);
    let target = rd_proto::Target::new("tcp", "127.0.0.1:80").unwrap();
    for conn in [2, 4] {
        let connect = Message::Connect {
            conn_id: ConnId(conn),
            target: target.clone(),
        };
        sim.inject(Side::Client, connect.to_bytes(1)).unwrap();
    }
    let chunk = vec![1u8; 512 * 1024];
    for _ in 0..3 {
        sim.inject(Side::Client, data(2, chunk.clone())).unwrap();
        sim.inject(Side::Client, data(4, chunk.clone())).unwrap();
    }
    assert_eq!(sim.client.session.stats().receive_buffered, 3 << 20);
    sim.inject(Side::Client, data(4, vec![1])).unwrap();
    sim.pump(Side::Client);
    let errors = errors_sent(&sim, Side::Client, ConnId(4));
    assert!(
        errors.len() == 1 && errors[0].contains("session"),
        "{errors:?}"
    );
    assert_eq!(sim.client.session.stats().receive_buffered, 3 << 19);
    assert_eq!(read_all(&mut sim, Side::Client, ConnId(2)).0.len(), 3 << 19);
}

// ----- (k) bad input ------------------------------------------------------------------------------

#[test]
fn k_bad_connects_refuse_only_that_connection() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    // rd deviation from Go: no '/' and over 266 bytes are refused per connection.
    sim.inject(Side::Client, raw(6, CONNECT, b"tcp")).unwrap();
    let long = format!("tcp/{}:443", "a".repeat(300));
    sim.inject(Side::Client, raw(8, CONNECT, long.as_bytes()))
        .unwrap();
    assert_eq!(sim.pump(Side::Client), 2);
    for conn in [6, 8] {
        let errors = errors_sent(&sim, Side::Client, ConnId(conn));
        assert_eq!(errors.len(), 1, "{conn}");
        assert!(!errors[0].is_empty());
    }
    assert!(
        errors_sent(&sim, Side::Client, ConnId(6))[0].contains("failed to parse connect address")
    );
    assert!(sim.client.take_events().is_empty(), "no stream was created");
    assert!(sim.client.errors.is_empty());
    assert!(sim.client.session.end().is_none());
    // Go's 265-byte limit case (TestNewServerMessage_266) is accepted.
    let max = format!("tcp/{}:65500", "h".repeat(255));
    sim.inject(Side::Client, raw(10, CONNECT, max.as_bytes()))
        .unwrap();
    let events = sim.client.take_events();
    assert!(matches!(
        &events[..],
        [Event::StreamRequested { id: ConnId(10), target }] if target.to_string() == max
    ));
    sim.write(Side::Server, id, b"alive").unwrap();
    sim.flush();
    assert_eq!(read_all(&mut sim, Side::Client, id).0, b"alive");
}

#[test]
fn k_session_level_garbage_ends_the_session() {
    let cases: [(&str, Bytes); 4] = [
        ("sync of 7 bytes", raw(0, SYNC, &[1, 2, 3, 4, 5, 6, 7])),
        ("truncated header", Bytes::from_static(&[0x02, 0x04])),
        ("empty message", Bytes::new()),
        ("11-byte varint", Bytes::from_static(&[0x80; 11])),
    ];
    for (what, bytes) in cases {
        let mut sim = Sim::new(Config::default());
        let id = open_from_server(&mut sim);
        let err = sim.inject(Side::Client, bytes).unwrap_err();
        assert!(matches!(err, ProtocolError::Decode(_)), "{what}");
        assert_eq!(
            sim.client.session.end(),
            Some(&SessionEnd::Protocol(err.clone())),
            "{what}"
        );
        let events = sim.client.take_events();
        assert_eq!(
            events,
            [
                Event::StreamClosed {
                    id,
                    end: StreamEnd::Disconnected
                },
                Event::SessionClosed(SessionEnd::Protocol(err))
            ],
            "{what}"
        );
        // Dead sessions ignore input and send nothing.
        sim.inject(Side::Client, data(id.0, b"x".to_vec())).unwrap();
        assert_eq!(sim.pump(Side::Client), 0, "{what}");
        assert!(sim.client.take_events().is_empty());
    }
}

#[test]
fn error_text_is_cut_to_100_bytes() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    let text = "e".repeat(150);
    sim.inject(Side::Server, raw(id.0, ERROR, text.as_bytes()))
        .unwrap();
    assert_eq!(
        sim.read(Side::Server, id, 1),
        Err(StreamError::Closed(StreamEnd::PeerError("e".repeat(100))))
    );
}

// ----- (l) connection ids ----------------------------------------------------------------------

#[test]
fn l_connection_ids() {
    let mut sim = Sim::new(Config::default());
    let server: Vec<i64> = (0..3).map(|_| sim.open(Side::Server).unwrap().0).collect();
    assert_eq!(server, [2, 3, 4]);
    let mut sim = Sim::new(Config::default());
    let client: Vec<i64> = (0..3).map(|_| sim.open(Side::Client).unwrap().0).collect();
    assert_eq!(client, [1, 2, 3]);

    // Ids the peer is using are skipped.
    let mut sim = Sim::new(Config::default());
    let from_server = open_from_server(&mut sim);
    assert_eq!(from_server, ConnId(2));
    assert_eq!(sim.open(Side::Client).unwrap(), ConnId(1));
    assert_eq!(sim.open(Side::Client).unwrap(), ConnId(3));
    sim.flush();
    assert_eq!(requested(&sim.server.take_events()), [ConnId(1), ConnId(3)]);
    assert_eq!(sim.open(Side::Server).unwrap(), ConnId(4));
}

#[test]
fn connect_registers_the_stream_under_the_received_id() {
    // TestSession_clientConnect and TestSession_connectionData, on the receiving side.
    let mut sim = Sim::new(Config::default());
    let target = rd_proto::Target::new("tcp", "127.0.0.1:8125").unwrap();
    let connect = Message::Connect {
        conn_id: ConnId(77),
        target: target.clone(),
    };
    sim.inject(Side::Client, connect.to_bytes(1)).unwrap();
    assert_eq!(
        sim.client.take_events(),
        [Event::StreamRequested {
            id: ConnId(77),
            target: target.clone()
        }]
    );
    assert_eq!(sim.client.session.target(ConnId(77)), Some(&target));
    let payload: Vec<u8> = (0..=255).collect();
    sim.inject(Side::Client, data(77, payload.clone())).unwrap();
    assert_eq!(sim.client.session.stats().receive_buffered, 256);
    assert_eq!(read_all(&mut sim, Side::Client, ConnId(77)).0, payload);
}

#[test]
fn pause_and_resume_set_and_clear_the_peer_pause() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    sim.inject(Side::Server, Message::Pause { conn_id: id }.to_bytes(1))
        .unwrap();
    assert_eq!(sim.server.session.stats().paused_by_peer, 1);
    sim.write(Side::Server, id, b"held").unwrap();
    assert_eq!(sim.pump(Side::Server), 0, "no Data while paused");
    assert_eq!(sim.server.session.stats().send_buffered, 4);
    sim.inject(Side::Server, Message::Resume { conn_id: id }.to_bytes(2))
        .unwrap();
    assert_eq!(sim.server.session.stats().paused_by_peer, 0);
    assert_eq!(sim.pump(Side::Server), 1);
    sim.flush();
    assert_eq!(read_all(&mut sim, Side::Client, id).0, b"held");
}

#[test]
fn add_and_remove_client_events() {
    let mut sim = Sim::new(Config::default());
    let foo = ClientSession {
        client_key: "test".into(),
        session_key: 42,
    };
    sim.inject(Side::Server, Message::AddClient(foo.clone()).to_bytes(1))
        .unwrap();
    sim.inject(Side::Server, Message::RemoveClient(foo.clone()).to_bytes(2))
        .unwrap();
    assert_eq!(
        sim.server.take_events(),
        [
            Event::ClientAdded(foo.clone()),
            Event::ClientRemoved(foo.clone())
        ]
    );
    // Client-mode sessions keep no table: ignored, but parsed.
    sim.inject(Side::Client, Message::AddClient(foo.clone()).to_bytes(3))
        .unwrap();
    assert!(sim.client.take_events().is_empty());
    // Announcing goes out on the wire as Go's payload.
    sim.server.session.announce(foo.clone(), true);
    sim.pump(Side::Server);
    assert_eq!(
        sim.server.sent.last().unwrap().message,
        Message::AddClient(foo)
    );
}

// ----- (m) fairness -----------------------------------------------------------------------------

#[test]
fn m_streams_take_turns() {
    // Eight messages of one stream must fit in its send buffer (256 KiB).
    let mut config = Config::default();
    config.max_data_payload = 32 * 1024;
    let mut sim = Sim::new(config);
    let ids: Vec<ConnId> = (0..3).map(|_| open_from_server(&mut sim)).collect();
    let chunk = sim.server.session.config().max_data_payload;
    // Different amounts queued: 8, 2 and 5 chunks.
    let mut remaining = std::collections::HashMap::new();
    for (&id, chunks) in ids.iter().zip([8usize, 2, 5]) {
        assert_eq!(
            sim.write(Side::Server, id, &vec![7u8; chunks * chunk]),
            Ok(chunks * chunk)
        );
        remaining.insert(id, chunks);
    }
    sim.pump(Side::Server);
    let order: Vec<ConnId> = sim
        .server
        .sent
        .iter()
        .filter(|f| f.message.type_code() == DATA)
        .map(|f| f.message.conn_id())
        .collect();
    assert_eq!(order.len(), 15);
    let mut prev = None;
    for id in &order {
        if prev == Some(*id) {
            assert!(
                remaining.iter().all(|(other, n)| other == id || *n == 0),
                "{id} sent twice in a row while others had data: {order:?}"
            );
        }
        *remaining.get_mut(id).unwrap() -= 1;
        prev = Some(*id);
    }
    assert_eq!(
        &order[..6],
        &[ids[0], ids[1], ids[2], ids[0], ids[1], ids[2]]
    );

    // Control messages are not stuck behind queued Data.
    for &id in &ids {
        sim.write(Side::Server, id, &vec![1u8; 4 * chunk]).unwrap();
    }
    sim.reset(Side::Server, ids[2], "stop").unwrap();
    let before = sim.server.sent.len();
    sim.pump(Side::Server);
    let after: Vec<&Message> = sim.server.sent[before..]
        .iter()
        .map(|f| &f.message)
        .collect();
    assert!(matches!(after[0], Message::Error { conn_id, .. } if *conn_id == ids[2]));
    assert!(
        after[1..].iter().all(|m| m.conn_id() != ids[2]),
        "reset dropped queued Data"
    );
}

// ----- regressions ---------------------------------------------------------------------------------

/// Both ends paused each other, then both applications dropped their handles. If each
/// side's EOF waited behind its peer's Pause, neither stream would ever be removed; a released
/// stream sends its last Data and EOF regardless (as Go's Close sends its Error).
#[test]
fn mutual_pause_then_release_does_not_leak_streams() {
    let mut config = Config::default();
    config.high_watermark = 4096;
    config.low_watermark = 1024;
    config.pause_floor = 1024;
    config.stream_receive_cap = 64 * 1024;
    config.session_receive_cap = 64 * 1024;
    config.session_receive_budget = 64 * 1024;
    config.session_receive_ceiling = 64 * 1024;
    config.stream_send_buffer = 2048;
    config.max_data_payload = 512;
    config.validate().unwrap();
    let mut sim = Sim::new(config);
    let id = open_from_server(&mut sim);
    for _ in 0..8 {
        for side in [Side::Client, Side::Server] {
            let _ = sim.write(side, id, &[9u8; 2048]);
        }
        sim.flush();
    }
    for side in [Side::Client, Side::Server] {
        let stats = sim.peer(side).session.stats();
        assert_eq!(stats.paused_by_us, 1, "{side:?}");
        assert_eq!(stats.paused_by_peer, 1, "{side:?}");
        assert!(stats.send_buffered > 0, "{side:?}");
    }
    sim.release(Side::Client, id);
    sim.release(Side::Server, id);
    sim.flush();
    assert_eq!(sim.client.session.stats().streams, 0);
    assert_eq!(sim.server.session.stats().streams, 0);
}

#[test]
fn local_close_tells_the_peer() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    sim.close(Side::Client, SessionEnd::Local);
    sim.flush();
    assert_eq!(errors_sent(&sim, Side::Client, id), ["tunnel disconnect"]);
    assert_eq!(
        sim.read(Side::Server, id, 1),
        Err(StreamError::Closed(StreamEnd::PeerError(
            "tunnel disconnect".into()
        )))
    );
    assert!(sim.server.session.end().is_none());
}

// ----- buffer reuse ------------------------------------------------------------------------------

/// A message buffer handed back with `recycle` carries the next Data message.
#[test]
fn recycled_buffers_carry_the_next_message() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    let session = &mut sim.server.session;
    let next_data = |session: &mut rd_proto::Session| loop {
        match session.poll_transmit() {
            Some(rd_proto::Transmit::Message(m))
                if rd_proto::decode(m.clone()).unwrap().message.type_code() == DATA =>
            {
                return m;
            }
            Some(_) => {}
            None => panic!("no Data message queued"),
        }
    };
    session.write(id, &[5u8; 32 * 1024]).unwrap();
    let first = next_data(session);
    let addr = first.as_ptr();
    let buf = first.try_into_mut().unwrap();
    session.recycle(buf);
    session.write(id, &[6u8; 1000]).unwrap();
    let second = next_data(session);
    assert_eq!(second.as_ptr(), addr, "encoded into the recycled buffer");
    assert!(second.ends_with(&[6u8; 1000]));
}

// ----- telling the runtime when to look -----------------------------------------------------------

/// `has_output` is true exactly while `poll_transmit` has something to drain, so a runtime
/// that drains on every wake need only be woken when a call turns it from false to true.
#[test]
fn has_output_follows_what_poll_transmit_would_hand_out() {
    let mut c = Config::default();
    c.credit = true;
    let mut sim = Sim::new(c);
    sim.flush();
    assert!(!sim.server.session.has_output(), "nothing queued");
    let id = sim.open(Side::Server).unwrap();
    assert!(sim.server.session.has_output(), "the Connect");
    sim.flush();
    assert!(!sim.server.session.has_output());
    sim.write(Side::Server, id, b"request").unwrap();
    assert!(sim.server.session.has_output(), "the stream's Data");
    sim.flush();
    assert!(!sim.server.session.has_output());
    // A read that queues no grant leaves nothing to send; one that does, does.
    sim.write(Side::Client, id, b"x").unwrap();
    sim.flush();
    sim.read(Side::Server, id, 64).unwrap();
    assert!(!sim.server.session.has_output(), "one byte earns no grant");
    sim.write(Side::Client, id, &[7u8; 32 * 1024 - 1]).unwrap();
    sim.flush();
    while sim.server.session.unread(id).unwrap_or(0) > 0 {
        sim.read(Side::Server, id, 4096).unwrap();
    }
    assert!(sim.server.session.has_output(), "the credit grant");
    sim.flush();
    assert!(!sim.server.session.has_output());
    sim.close(Side::Server, SessionEnd::Local);
    assert!(
        sim.server.session.has_output(),
        "the Errors of a local close"
    );
    sim.flush();
    assert!(!sim.server.session.has_output(), "nothing after the end");
}
