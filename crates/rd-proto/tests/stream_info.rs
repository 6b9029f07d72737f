//! What `Session::stream_infos` reports about each stream (for the admin API), and the
//! bound on dials pending through one session (`Config::max_pending_dials`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::Sim;
use rd_proto::{Config, OpenError, Side};

fn credit() -> Config {
    let mut c = Config::default();
    c.credit = true;
    c.half_close = true;
    c
}

#[test]
fn a_dial_is_pending_until_the_peer_answers_and_the_bound_refuses_more() {
    let mut config = Config::default();
    config.max_pending_dials = 2;
    let mut sim = Sim::new(config);
    let a = sim.open(Side::Server).unwrap();
    let b = sim.open(Side::Server).unwrap();
    assert_eq!(sim.server.session.pending_dials(), 2);
    assert_eq!(
        sim.open(Side::Server),
        Err(OpenError::TooManyPendingDials(2)),
        "a third dial while two wait"
    );
    sim.flush();
    // The agent answers `a` with data: that dial is no longer pending.
    sim.advance(Duration::from_millis(10));
    sim.write(Side::Client, a, b"hello").unwrap();
    sim.flush();
    assert_eq!(sim.server.session.pending_dials(), 1);
    let infos = sim.server.session.stream_infos();
    let info_a = infos.iter().find(|i| i.id == a).unwrap();
    let info_b = infos.iter().find(|i| i.id == b).unwrap();
    assert!(info_a.last_heard.is_some() && info_b.last_heard.is_none());
    assert!(info_a.last_activity > info_a.opened_at, "{info_a:?}");
    assert_eq!(info_a.flow.unread, 5);
    assert!(sim.open(Side::Server).is_ok(), "room for one more");
    // An Error answers a dial too (a refused target).
    sim.reset(Side::Client, b, "connect not allowed").unwrap();
    sim.flush();
    assert_eq!(
        sim.server.session.pending_dials(),
        1,
        "only the third waits"
    );
}

#[test]
fn infos_carry_labels_and_flow_state() {
    let mut sim = Sim::new(credit());
    let id = sim.open(Side::Server).unwrap();
    sim.server.session.set_stream_label(id, "connect");
    sim.flush();
    let info = sim
        .server
        .session
        .stream_infos()
        .into_iter()
        .find(|i| i.id == id)
        .unwrap();
    assert_eq!(info.label, Some("connect"));
    assert!(info.on_wire && !info.finished && !info.peer_finished);
    assert_eq!(info.flow.recv_window, Some(32 * 1024));
    assert_eq!(info.flow.recv_credit, Some(32 * 1024));
    assert_eq!(info.flow.send_credit, Some(32 * 1024));
    assert!(!info.flow.paused_by_us && !info.flow.paused_by_peer);
    // The agent fills the window and nobody reads: the server holds the peer back.
    let chunk = vec![0u8; 32 * 1024];
    assert_eq!(sim.write(Side::Client, id, &chunk).unwrap(), chunk.len());
    sim.flush();
    let info = sim.server.session.stream_infos().remove(0);
    assert_eq!(info.flow.unread, 32 * 1024);
    assert_eq!(info.flow.recv_credit, Some(0));
    assert!(info.flow.paused_by_us, "{info:?}");
    let agent = sim.client.session.stream_infos().remove(0);
    assert!(agent.flow.paused_by_peer, "{agent:?}");
    assert_eq!(agent.flow.send_credit, Some(0));
    sim.finish(Side::Server, id).unwrap();
    sim.flush();
    let info = sim.server.session.stream_infos().remove(0);
    assert!(info.finished && info.on_wire);
    let agent = sim.client.session.stream_infos().remove(0);
    assert!(agent.peer_finished, "{agent:?}");
}

#[test]
fn pause_mode_reports_no_credit_and_a_zero_bound_is_invalid() {
    let mut sim = Sim::new(Config::default());
    let id = sim.open(Side::Server).unwrap();
    sim.flush();
    let info = sim.server.session.stream_infos().remove(0);
    assert_eq!(info.id, id);
    assert_eq!(
        (
            info.flow.recv_window,
            info.flow.recv_credit,
            info.flow.send_credit
        ),
        (None, None, None)
    );
    assert!(sim.server.session.last_heard() >= sim.base);
    let mut bad = Config::default();
    bad.max_pending_dials = 0;
    assert!(bad.validate().is_err());
}
