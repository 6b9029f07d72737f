//! rd's connect-ack extension (`Config::connect_ack`, message ConnectAck = 68) on two
//! sessions back to back: the dialing side learns that the peer's dial succeeded, the ack
//! goes out before the stream's Data, and nothing of it reaches or affects a peer that did
//! not negotiate it.
#![allow(clippy::unwrap_used)]

mod common;

use common::Sim;
use rd_proto::{Config, Event, Message, ReadOutcome, Side, StreamEnd, StreamError};

const CONNECT_ACK: i64 = 68;

fn connect_ack() -> Config {
    let mut c = Config::default();
    c.connect_ack = true;
    c
}

fn acknowledged(events: &[Event]) -> Vec<rd_proto::ConnId> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::StreamAcknowledged { id } => Some(*id),
            _ => None,
        })
        .collect()
}

#[test]
fn the_dialer_learns_the_dial_succeeded_before_any_data() {
    let mut sim = Sim::new(connect_ack());
    let id = sim.open(Side::Server).unwrap();
    sim.flush();
    assert!(!sim.server.session.is_acknowledged(id));
    // The agent's dial succeeded: it acknowledges and answers at once.
    assert!(sim.client.session.acknowledge(id));
    assert!(!sim.client.session.acknowledge(id), "at most once");
    sim.write(Side::Client, id, b"hello").unwrap();
    sim.flush();
    let acks = sim.client.sent_of_type(CONNECT_ACK);
    assert_eq!(acks, [&Message::ConnectAck { conn_id: id }]);
    // The ack came first, the Data after it.
    let order: Vec<i64> = sim
        .client
        .sent
        .iter()
        .map(|f| f.message.type_code())
        .collect();
    assert_eq!(order, [CONNECT_ACK, 1], "{order:?}");
    assert_eq!(acknowledged(&sim.server.take_events()), [id]);
    assert!(sim.server.session.is_acknowledged(id));
    assert_eq!(
        sim.read(Side::Server, id, 64).unwrap(),
        ReadOutcome::Data("hello".into())
    );
}

#[test]
fn a_failed_dial_is_still_an_error_and_no_ack() {
    let mut sim = Sim::new(connect_ack());
    let id = sim.open(Side::Server).unwrap();
    sim.flush();
    sim.reset(
        Side::Client,
        id,
        "dial tcp 127.0.0.1:9: connect: connection refused",
    )
    .unwrap();
    assert!(
        !sim.client.session.acknowledge(id),
        "no ack after the reset"
    );
    sim.flush();
    assert!(sim.client.sent_of_type(CONNECT_ACK).is_empty());
    assert!(acknowledged(&sim.server.take_events()).is_empty());
    assert!(!sim.server.session.is_acknowledged(id));
    assert_eq!(
        sim.read(Side::Server, id, 64),
        Err(StreamError::Closed(StreamEnd::PeerError(
            "dial tcp 127.0.0.1:9: connect: connection refused".into()
        )))
    );
}

#[test]
fn acks_are_only_for_streams_the_peer_opened() {
    let mut sim = Sim::new(connect_ack());
    let ours = sim.open(Side::Client).unwrap();
    sim.flush();
    assert!(
        !sim.client.session.acknowledge(ours),
        "a side does not acknowledge its own dial"
    );
    // An ack for a stream the receiver did not open is ignored, as is one for no stream.
    sim.inject(
        Side::Server,
        Message::ConnectAck { conn_id: ours }.to_bytes(7),
    )
    .unwrap();
    sim.inject(
        Side::Server,
        Message::ConnectAck {
            conn_id: rd_proto::ConnId(999),
        }
        .to_bytes(8),
    )
    .unwrap();
    assert!(acknowledged(&sim.client.take_events()).is_empty());
    assert!(acknowledged(&sim.server.take_events()).is_empty());
    assert!(!sim.client.session.is_acknowledged(ours));
    assert!(!sim.server.session.is_acknowledged(ours));
}

#[test]
fn without_the_extension_nothing_is_sent_and_a_stray_ack_is_ignored() {
    let mut sim = Sim::new(Config::default());
    let id = sim.open(Side::Server).unwrap();
    sim.flush();
    assert!(
        !sim.client.session.acknowledge(id),
        "a Go peer never gets one"
    );
    sim.flush();
    assert!(sim.client.sent_of_type(CONNECT_ACK).is_empty());
    sim.inject(
        Side::Server,
        Message::ConnectAck { conn_id: id }.to_bytes(9),
    )
    .unwrap();
    assert!(acknowledged(&sim.server.take_events()).is_empty());
    assert!(!sim.server.session.is_acknowledged(id));
    assert!(sim.server.session.end().is_none(), "the session stays up");
}
