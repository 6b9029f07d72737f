//! rd's replicas extension (`Config::replicas`, messages GoAway = 66 and Replicas = 67) on
//! two sessions back to back: what each side sees, and that nothing of it reaches or
//! affects a peer that did not negotiate it.
#![allow(clippy::unwrap_used)]

mod common;

use bytes::Bytes;
use common::Sim;
use rd_proto::{Config, Event, Message, OpenError, ReadOutcome, Side};

const GO_AWAY: i64 = 66;
const REPLICAS: i64 = 67;

fn replicas() -> Config {
    let mut c = Config::default();
    c.replicas = true;
    c
}

fn announced(events: &[Event]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::ReplicasAnnounced(n) => Some(*n),
            _ => None,
        })
        .collect()
}

fn going_away(events: &[Event]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::PeerGoingAway { reason } => Some(reason.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn go_away_stops_new_streams_from_the_agent_and_lets_streams_in_flight_finish() {
    let mut sim = Sim::new(replicas());
    // A stream the server opened before the drain, and one the agent opened.
    let from_server = sim.open(Side::Server).unwrap();
    let from_agent = sim.open(Side::Client).unwrap();
    sim.flush();
    sim.client.take_events();

    assert!(sim.server.session.go_away("server draining"));
    assert!(!sim.server.session.go_away("again"), "sent at most once");
    assert!(sim.server.session.is_going_away());
    sim.flush();
    assert_eq!(sim.server.sent_of_type(GO_AWAY).len(), 1);
    let events = sim.client.take_events();
    assert_eq!(going_away(&events), ["server draining"]);
    assert_eq!(
        sim.client.session.peer_going_away(),
        Some("server draining")
    );

    // The agent opens nothing new on this session...
    assert!(matches!(
        sim.open(Side::Client),
        Err(OpenError::PeerGoingAway(reason)) if reason == "server draining"
    ));
    // ...but the draining server still may (it serves an agent until it is reachable
    // elsewhere), and both streams in flight carry data both ways.
    let late = sim.open(Side::Server).unwrap();
    sim.flush();
    for id in [from_server, from_agent, late] {
        sim.write(Side::Server, id, b"ping").unwrap();
        sim.write(Side::Client, id, b"pong").unwrap();
    }
    sim.flush();
    for id in [from_server, from_agent, late] {
        assert_eq!(
            sim.read(Side::Client, id, 64).unwrap(),
            ReadOutcome::Data(Bytes::from_static(b"ping"))
        );
        assert_eq!(
            sim.read(Side::Server, id, 64).unwrap(),
            ReadOutcome::Data(Bytes::from_static(b"pong"))
        );
    }
    // A second GoAway from the peer changes nothing and raises no second event.
    let again = Message::GoAway {
        reason: "twice".into(),
    }
    .to_bytes(99);
    sim.inject(Side::Client, again).unwrap();
    assert!(going_away(&sim.client.take_events()).is_empty());
    sim.server.session.assert_invariants();
    sim.client.session.assert_invariants();
}

#[test]
fn the_server_tells_its_agent_the_replica_count() {
    let mut sim = Sim::new(replicas());
    sim.server.session.announce_replicas(3);
    sim.server.session.announce_replicas(0);
    sim.flush();
    assert_eq!(
        announced(&sim.client.take_events()),
        [3, 1],
        "0 is sent as 1"
    );
    // A client side counts no replicas: it sends none.
    sim.client.session.announce_replicas(5);
    sim.flush();
    assert!(sim.client.sent_of_type(REPLICAS).is_empty());
    // And a server ignores one that arrives anyway.
    sim.inject(Side::Server, Message::Replicas { count: 7 }.to_bytes(1))
        .unwrap();
    assert!(announced(&sim.server.take_events()).is_empty());
}

#[test]
fn without_the_extension_nothing_is_sent_and_nothing_received_counts() {
    let mut sim = Sim::new(Config::default());
    assert!(!sim.server.session.go_away("server draining"));
    sim.server.session.announce_replicas(3);
    sim.flush();
    assert!(sim.server.sent_of_type(GO_AWAY).is_empty());
    assert!(sim.server.sent_of_type(REPLICAS).is_empty());

    // A peer that sends them anyway is ignored, as a Go peer ignores unknown types.
    sim.inject(
        Side::Client,
        Message::GoAway { reason: "x".into() }.to_bytes(1),
    )
    .unwrap();
    sim.inject(Side::Client, Message::Replicas { count: 2 }.to_bytes(2))
        .unwrap();
    let events = sim.client.take_events();
    assert!(going_away(&events).is_empty() && announced(&events).is_empty());
    assert!(sim.open(Side::Client).is_ok(), "still open for new streams");
}

#[test]
fn a_server_side_told_go_away_still_opens_streams() {
    // A draining peer server says GoAway on a peer link it dialed; the other server (the
    // link's server side) still routes to it the agents only it holds.
    let mut sim = Sim::new(replicas());
    assert!(sim.client.session.go_away("server draining"));
    sim.flush();
    assert_eq!(going_away(&sim.server.take_events()), ["server draining"]);
    let id = sim.open(Side::Server).unwrap();
    sim.write(Side::Server, id, b"routed").unwrap();
    sim.flush();
    assert_eq!(
        sim.read(Side::Client, id, 64).unwrap(),
        ReadOutcome::Data(Bytes::from_static(b"routed"))
    );
}

#[test]
fn malformed_extension_messages_from_a_peer_that_did_not_negotiate_are_ignored() {
    let raw = |code: i64, value: i64| {
        let mut raw = bytes::BytesMut::new();
        for v in [1, 0, code, value] {
            rd_proto::varint::put_varint(&mut raw, v);
        }
        raw.freeze()
    };
    let mut sim = Sim::new(Config::default());
    sim.inject(Side::Client, raw(REPLICAS, 0)).unwrap();
    sim.inject(Side::Client, raw(64, -5)).unwrap();
    assert!(sim.client.session.end().is_none());
}

#[test]
fn a_bad_replica_count_ends_the_session() {
    for count in [0i64, -1, 1 << 40] {
        let mut sim = Sim::new(replicas());
        let mut raw = bytes::BytesMut::new();
        rd_proto::varint::put_varint(&mut raw, 1);
        rd_proto::varint::put_varint(&mut raw, 0);
        rd_proto::varint::put_varint(&mut raw, REPLICAS);
        rd_proto::varint::put_varint(&mut raw, count);
        assert!(
            sim.inject(Side::Client, raw.freeze()).is_err(),
            "count {count}"
        );
        assert!(sim.client.session.end().is_some());
    }
}

#[test]
fn a_long_reason_is_cut_to_what_a_receiver_keeps() {
    let mut sim = Sim::new(replicas());
    let long = "é".repeat(80);
    assert!(sim.server.session.go_away(&long));
    sim.flush();
    let reasons = going_away(&sim.client.take_events());
    assert_eq!(reasons.len(), 1);
    assert!(reasons[0].len() <= 100 && long.starts_with(&reasons[0]));
}
