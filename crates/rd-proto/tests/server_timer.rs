//! A server side's timer at fleet scale: with clients that ping on their own, its deadline
//! must keep moving past them, so a runtime that re-arms on every change is never woken for
//! nothing (10,000 idle sessions would otherwise cost one wake-up per session per 5 s tick).
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use rd_proto::{Config, Identity, Session, SessionEnd, Side, Transmit};

fn server(start: Instant) -> Session {
    Session::new(
        Side::Server,
        Config::default(),
        Identity {
            client_key: "foo".into(),
            session_key: 1,
        },
        start,
        1,
    )
}

/// Runs the server until `until`, calling `handle_timeout` at each deadline it asks for, the
/// way a runtime would; returns (timer wake-ups, pings sent).
fn run_until(server: &mut Session, now: &mut Instant, until: Instant) -> (usize, usize) {
    let (mut wakes, mut pings) = (0, 0);
    while let Some(at) = server.poll_timeout().filter(|at| *at <= until) {
        *now = at.max(*now);
        wakes += 1;
        server.handle_timeout(*now);
        while let Some(tx) = server.poll_transmit() {
            pings += usize::from(tx == Transmit::Ping);
        }
    }
    *now = until;
    (wakes, pings)
}

#[test]
fn a_client_that_pings_never_wakes_the_server_timer() {
    let start = Instant::now();
    let mut now = start;
    let mut s = server(start);
    // A client on Go's schedule, with some jitter: pings every 5 s +- 300 ms for 10 minutes.
    let mut wakes = 0;
    for i in 1..=120u64 {
        let jitter = Duration::from_millis((i * 7919) % 600);
        let at = start + Duration::from_secs(5 * i) + jitter - Duration::from_millis(300);
        let (w, p) = run_until(&mut s, &mut now, at);
        assert_eq!(p, 0, "no server ping to a client that pings");
        wakes += w;
        s.handle_keepalive(at);
    }
    assert_eq!(
        wakes, 0,
        "the deadline always moved past the client's pings"
    );
    assert!(s.end().is_none());
}

#[test]
fn a_client_that_goes_quiet_is_pinged_on_the_next_silent_tick_then_dropped() {
    let start = Instant::now();
    let mut now = start;
    let mut s = server(start);
    // Pings at 5, 10 and 15 s (ticks are at 7.5 s + k * 5 s), then nothing.
    for t in [5, 10, 15] {
        run_until(&mut s, &mut now, start + Duration::from_secs(t));
        s.handle_keepalive(start + Duration::from_secs(t));
    }
    // The tick at 17.5 s heard the ping at 15 s; the one at 22.5 s heard nothing: it pings.
    let (_, pings) = run_until(&mut s, &mut now, start + Duration::from_millis(22_499));
    assert_eq!(pings, 0);
    let (wakes, pings) = run_until(&mut s, &mut now, start + Duration::from_millis(22_500));
    assert_eq!((wakes, pings), (1, 1));
    // Unanswered: pings every tick, and the session ends 15 s after the last ping heard.
    let (_, pings) = run_until(&mut s, &mut now, start + Duration::from_millis(29_999));
    assert_eq!(pings, 1, "the tick at 27.5 s");
    assert!(s.end().is_none());
    run_until(&mut s, &mut now, start + Duration::from_secs(30));
    assert_eq!(
        s.end(),
        Some(&SessionEnd::Unresponsive(Duration::from_secs(15)))
    );
}
