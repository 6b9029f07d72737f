//! rd's half-close extension (`Config::half_close`, message Fin = 65), scenario by scenario
//! on two sessions back to back, and the Go behaviour it replaces when it is off.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{Dir, Sim};
use rd_proto::{
    Config, ConnId, Event, Message, ReadOutcome, SessionEnd, Side, StreamEnd, StreamError,
};

const FIN: i64 = 65;
const ERROR: i64 = 3;

fn half_close() -> Config {
    let mut c = Config::default();
    c.half_close = true;
    c
}

fn open_from_server(sim: &mut Sim) -> ConnId {
    let id = sim.open(Side::Server).unwrap();
    sim.flush();
    assert!(sim
        .client
        .take_events()
        .iter()
        .any(|e| matches!(e, Event::StreamRequested { id: got, .. } if *got == id)));
    id
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

fn errors_sent(sim: &mut Sim, side: Side, id: ConnId) -> Vec<String> {
    sim.peer(side)
        .sent
        .iter()
        .filter_map(|f| match &f.message {
            Message::Error { conn_id, text } if *conn_id == id => Some(text.clone()),
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

fn answer() -> Vec<u8> {
    (0..300_000u32).map(|i| (i % 253) as u8).collect()
}

/// Writes all of `data` from `side`, moving messages across and letting the other side's
/// reader take what arrived whenever the send buffer is full; returns what it read.
fn write_all(sim: &mut Sim, side: Side, id: ConnId, data: &[u8]) -> Vec<u8> {
    let reader = match side {
        Side::Client => Side::Server,
        Side::Server => Side::Client,
    };
    let mut got = Vec::new();
    let mut at = 0;
    while at < data.len() {
        match sim.write(side, id, &data[at..]) {
            Ok(n) => at += n,
            Err(StreamError::Blocked) => {
                sim.flush();
                let (chunk, end) = read_all(sim, reader, id);
                assert_eq!(end, Err(StreamError::Blocked));
                assert!(!chunk.is_empty(), "a blocked writer's reader has data");
                got.extend_from_slice(&chunk);
                sim.flush();
            }
            Err(e) => panic!("write failed: {e}"),
        }
    }
    got
}

/// Reads until EOF (or an end), moving messages across while the reader waits.
fn read_to_end(
    sim: &mut Sim,
    side: Side,
    id: ConnId,
) -> (Vec<u8>, Result<ReadOutcome, StreamError>) {
    let mut out = Vec::new();
    loop {
        let (chunk, end) = read_all(sim, side, id);
        out.extend_from_slice(&chunk);
        if end != Err(StreamError::Blocked) {
            return (out, end);
        }
        assert!(sim.flush(), "a waiting reader makes progress once flushed");
    }
}

#[test]
fn request_fin_then_the_whole_answer() {
    for credit in [false, true] {
        let mut config = half_close();
        config.credit = credit;
        let mut sim = Sim::new(config);
        let id = open_from_server(&mut sim);
        // The server writes its request and shuts down writing.
        sim.write(Side::Server, id, b"request").unwrap();
        sim.finish(Side::Server, id).unwrap();
        assert_eq!(
            sim.write(Side::Server, id, b"x"),
            Err(StreamError::Finished)
        );
        sim.flush();
        // The client reads the request, then EOF, and the stream stays open its way.
        let (request, end) = read_all(&mut sim, Side::Client, id);
        assert_eq!(
            (request.as_slice(), end),
            (&b"request"[..], Ok(ReadOutcome::Eof))
        );
        assert!(closed(&sim.client.take_events()).is_empty());
        assert_eq!(sim.client.session.live_ids(), [id.0], "half-closed is live");
        // Its answer is much larger than every window, so flow control works after the Fin.
        let answer = answer();
        let mut got = write_all(&mut sim, Side::Client, id, &answer);
        sim.finish(Side::Client, id).unwrap();
        let (rest, end) = read_to_end(&mut sim, Side::Server, id);
        got.extend_from_slice(&rest);
        assert_eq!(end, Ok(ReadOutcome::Eof), "credit={credit}");
        assert!(got == answer, "credit={credit}: the whole answer arrived");
        sim.flush();
        // One Fin each way, no Error at all: both ends left the wire on the two Fins.
        for side in [Side::Client, Side::Server] {
            assert_eq!(sim.peer(side).sent_of_type(FIN).len(), 1, "{side:?}");
            assert!(sim.peer(side).sent_of_type(ERROR).is_empty(), "{side:?}");
            assert_eq!(
                closed(&sim.peer(side).take_events()),
                [(id, StreamEnd::Finished)]
            );
            assert_eq!(sim.read(side, id, 10), Ok(ReadOutcome::Eof));
        }
        // No credit or Pause/Resume for a finished direction keeps session totals clean.
        assert_eq!(sim.server.session.stats().receive_committed, 0);
        sim.release(Side::Client, id);
        sim.release(Side::Server, id);
        assert!(!sim.flush(), "releasing a finished stream sends nothing");
        assert_eq!(sim.client.session.stats().streams, 0);
        assert_eq!(sim.server.session.stats().streams, 0);
    }
}

#[test]
fn without_the_extension_eof_closes_both_ways_as_go() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    sim.write(Side::Server, id, b"request").unwrap();
    sim.finish(Side::Server, id).unwrap();
    sim.flush();
    let (request, end) = read_all(&mut sim, Side::Client, id);
    assert_eq!(
        (request.as_slice(), end),
        (&b"request"[..], Ok(ReadOutcome::Eof))
    );
    // The connection is closed both ways: the answer cannot be written.
    assert_eq!(
        sim.write(Side::Client, id, b"answer"),
        Err(StreamError::Closed(StreamEnd::Finished))
    );
    assert_eq!(errors_sent(&mut sim, Side::Server, id), ["EOF"]);
    assert_eq!(errors_sent(&mut sim, Side::Client, id), ["EOF"]);
    assert!(sim.server.sent_of_type(FIN).is_empty());
    assert!(sim.client.sent_of_type(FIN).is_empty());
}

#[test]
fn fins_that_cross_close_both_ends() {
    let mut sim = Sim::new(half_close());
    let id = open_from_server(&mut sim);
    sim.write(Side::Server, id, b"from server").unwrap();
    sim.write(Side::Client, id, b"from client").unwrap();
    sim.finish(Side::Server, id).unwrap();
    sim.finish(Side::Client, id).unwrap();
    // Both Fins are on the wire before either arrives.
    sim.pump(Side::Server);
    sim.pump(Side::Client);
    sim.flush();
    for (side, want) in [(Side::Client, "from server"), (Side::Server, "from client")] {
        let (got, end) = read_all(&mut sim, side, id);
        assert_eq!(
            (got.as_slice(), end),
            (want.as_bytes(), Ok(ReadOutcome::Eof))
        );
        assert_eq!(
            closed(&sim.peer(side).take_events()),
            [(id, StreamEnd::Finished)]
        );
        assert!(sim.peer(side).sent_of_type(ERROR).is_empty());
    }
}

#[test]
fn data_after_the_peers_fin_resets_the_stream() {
    let mut sim = Sim::new(half_close());
    let id = open_from_server(&mut sim);
    let fin = Message::Fin { conn_id: id }.to_bytes(9);
    sim.inject(Side::Client, fin.clone()).unwrap();
    // A second Fin changes nothing.
    sim.inject(Side::Client, fin).unwrap();
    assert_eq!(sim.read(Side::Client, id, 10), Ok(ReadOutcome::Eof));
    let data = Message::Data {
        conn_id: id,
        payload: Bytes::from_static(b"late"),
    }
    .to_bytes(10);
    sim.inject(Side::Client, data).unwrap();
    sim.pump(Side::Client);
    assert_eq!(errors_sent(&mut sim, Side::Client, id), ["data after fin"]);
    assert_eq!(
        closed(&sim.client.take_events()),
        [(id, StreamEnd::Reset("data after fin".into()))]
    );
    assert!(sim.client.session.end().is_none(), "only the stream ends");
}

#[test]
fn fin_without_the_extension_is_ignored() {
    let mut sim = Sim::new(Config::default());
    let id = open_from_server(&mut sim);
    sim.inject(Side::Client, Message::Fin { conn_id: id }.to_bytes(9))
        .unwrap();
    assert_eq!(sim.read(Side::Client, id, 10), Err(StreamError::Blocked));
    assert_eq!(sim.write(Side::Client, id, b"still open"), Ok(10));
    assert_eq!(sim.pump(Side::Client), 1, "only the Data");
}

#[test]
fn releasing_a_half_closed_stream_the_peer_still_writes_to_closes_both_ways() {
    let mut sim = Sim::new(half_close());
    let id = open_from_server(&mut sim);
    sim.finish(Side::Server, id).unwrap();
    sim.flush();
    sim.write(Side::Client, id, b"partial").unwrap();
    sim.flush();
    // Nobody on the server side will read the rest: it says EOF the Go way.
    sim.release(Side::Server, id);
    sim.flush();
    assert_eq!(errors_sent(&mut sim, Side::Server, id), ["EOF"]);
    assert_eq!(
        sim.write(Side::Client, id, b"more"),
        Err(StreamError::Closed(StreamEnd::Finished))
    );
    assert_eq!(sim.server.session.stats().streams, 0);
    sim.release(Side::Client, id);
    sim.flush();
    assert_eq!(sim.client.session.stats().streams, 0);
}

#[test]
fn releasing_an_open_stream_after_the_peers_fin_sends_fin() {
    let mut sim = Sim::new(half_close());
    let id = open_from_server(&mut sim);
    sim.finish(Side::Server, id).unwrap();
    sim.flush();
    sim.write(Side::Client, id, b"answer").unwrap();
    // The client's handle goes away after its answer (the common end of a request).
    sim.release(Side::Client, id);
    sim.flush();
    assert_eq!(sim.client.sent_of_type(FIN).len(), 1);
    assert!(sim.client.sent_of_type(ERROR).is_empty());
    assert_eq!(sim.client.session.stats().streams, 0);
    let (got, end) = read_all(&mut sim, Side::Server, id);
    assert_eq!(
        (got.as_slice(), end),
        (&b"answer"[..], Ok(ReadOutcome::Eof))
    );
}

#[test]
fn a_reset_after_our_fin_reaches_the_peer() {
    let mut sim = Sim::new(half_close());
    let id = open_from_server(&mut sim);
    sim.finish(Side::Server, id).unwrap();
    sim.flush();
    sim.reset(Side::Server, id, "changed my mind").unwrap();
    sim.flush();
    assert_eq!(
        sim.write(Side::Client, id, b"x"),
        Err(StreamError::Closed(StreamEnd::PeerError(
            "changed my mind".into()
        )))
    );
}

#[test]
fn half_closed_streams_stay_through_sync_and_hear_of_a_local_close() {
    let mut sim = Sim::new(half_close());
    let id = open_from_server(&mut sim);
    // The client finished its side; the server still writes.
    sim.finish(Side::Client, id).unwrap();
    sim.flush();
    assert_eq!(sim.read(Side::Server, id, 10), Ok(ReadOutcome::Eof));
    // Two SyncConnections later the stream, older than the grace period, is still there.
    sim.advance(Duration::from_secs(125));
    assert_eq!(sim.client.sent_of_type(8).len(), 2);
    assert_eq!(sim.write(Side::Server, id, b"late answer"), Ok(11));
    sim.flush();
    assert_eq!(
        read_all(&mut sim, Side::Client, id),
        (b"late answer".to_vec(), Err(StreamError::Blocked))
    );
    // A local close tells the peer about the half-closed stream too.
    sim.close(Side::Client, SessionEnd::Local);
    sim.pump(Side::Client);
    sim.deliver(Dir::ClientToServer, usize::MAX);
    assert_eq!(
        errors_sent(&mut sim, Side::Client, id),
        ["tunnel disconnect"]
    );
    assert_eq!(
        sim.write(Side::Server, id, b"x"),
        Err(StreamError::Closed(StreamEnd::PeerError(
            "tunnel disconnect".into()
        )))
    );
}

#[test]
fn a_release_after_our_fin_then_the_peers_fin_sends_nothing_more() {
    // Found by the proptest: the released stream went back to sending its end and, once the
    // peer's Fin arrived, sent a second Fin.
    let mut sim = Sim::new(half_close());
    let id = open_from_server(&mut sim);
    sim.finish(Side::Client, id).unwrap();
    sim.finish(Side::Server, id).unwrap();
    sim.pump(Side::Client);
    sim.pump(Side::Server);
    // The client lets go before the server's Fin arrives.
    sim.release(Side::Client, id);
    sim.deliver(Dir::ServerToClient, usize::MAX);
    sim.flush();
    assert_eq!(sim.client.sent_of_type(FIN).len(), 1);
    assert!(sim.client.sent_of_type(ERROR).is_empty());
    assert!(sim.server.sent_of_type(ERROR).is_empty());
    assert_eq!(sim.client.session.stats().streams, 0);
    assert_eq!(
        closed(&sim.server.take_events()),
        [(id, StreamEnd::Finished)]
    );
}
