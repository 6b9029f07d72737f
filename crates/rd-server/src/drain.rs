//! Graceful drain: move the agents to other replicas without cutting the streams in flight.
//!
//! The order matters. A session carrying streams cannot be closed without cutting them, so:
//! 1. stop taking work: new sessions and new streams are refused ([`Server::begin_drain`]),
//!    and the peers are told our clients are gone, so they route nothing new through us;
//! 2. close every idle client session with a going-away close (1001): rd clients redial at
//!    once, to another replica;
//! 3. as each busy session's last stream ends, close it the same way;
//! 4. at the deadline, log every stream still running (client, target, bytes) and cut it.
//!
//! Peer links stay up until the end: they carry other replicas' requests to our clients,
//! and ours to theirs, that are still in flight.

use std::time::Duration;

use rd_session::SessionHandle;
use tokio::time::Instant;

use crate::server::Server;

/// The close reason agents see in the going-away Close frame.
const GOING_AWAY_REASON: &str = "server draining";

/// How often a drain looks again even without a wake-up: outgoing peer links have no
/// observer to wake it when their streams end.
const RECHECK: Duration = Duration::from_millis(100);

/// Bound on closing the last sessions after the drain.
const CLOSE_BOUND: Duration = Duration::from_secs(2);

/// What a [`Server::drain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Client sessions closed with a going-away close (idle at once, or once their last
    /// stream ended).
    pub sessions_moved: usize,
    /// Streams still running at the deadline, cut and logged.
    pub streams_cut: usize,
    /// Whether every stream finished within the grace period.
    pub finished_in_time: bool,
}

impl Server {
    /// Drains the server: [`begin_drain`](Self::begin_drain), withdraw our clients from the
    /// peers, close each client session with a going-away close once it carries no stream,
    /// wait up to `grace` for the streams in flight, log and cut those left at the
    /// deadline (`stream cut at the drain deadline`: client, target, bytes sent and received
    /// through the tunnel, age),
    /// then [`shutdown`](Self::shutdown). Kubernetes' default grace is 30 s.
    pub async fn drain(&self, grace: Duration) -> DrainReport {
        let deadline = Instant::now() + grace;
        self.begin_drain();
        {
            // Under the registry's lock, as every announcement: see the lock order there.
            let registry = self.registry();
            self.peers().withdraw(&registry.all_sessions());
        }
        let mut report = DrainReport::default();
        let (clients, links) = self.drain_view();
        tracing::info!(
            clients = clients.len(),
            peer_links = links.len(),
            streams = count_streams(clients.iter().chain(&links)),
            ?grace,
            "draining: agents are asked to move, streams in flight may finish"
        );
        loop {
            // Registered before looking, so an end between the look and the wait still wakes us.
            let wake = self.inner.drain_wake.clone();
            let woken = wake.notified();
            let (clients, links) = self.drain_view();
            for session in clients.iter().filter(|s| !s.is_closed()) {
                if session.stats().streams == 0 {
                    session.close_going_away(GOING_AWAY_REASON);
                    report.sessions_moved += 1;
                }
            }
            let busy = count_streams(clients.iter().chain(&links));
            if busy == 0 {
                report.finished_in_time = true;
                break;
            }
            tokio::select! {
                () = woken => {}
                () = tokio::time::sleep(RECHECK) => {}
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        if !report.finished_in_time {
            let (clients, links) = self.drain_view();
            for session in &clients {
                report.streams_cut += log_cut(session, false);
            }
            for link in &links {
                report.streams_cut += log_cut(link, true);
            }
            for session in clients.iter().filter(|s| !s.is_closed()) {
                session.close_going_away(GOING_AWAY_REASON);
                report.sessions_moved += 1;
            }
        }
        tracing::info!(
            sessions_moved = report.sessions_moved,
            streams_cut = report.streams_cut,
            finished_in_time = report.finished_in_time,
            "drain over"
        );
        self.shutdown(CLOSE_BOUND).await;
        report
    }
}

impl Server {
    /// Client sessions, and every peer link either way (incoming and outgoing).
    fn drain_view(&self) -> (Vec<SessionHandle>, Vec<SessionHandle>) {
        let clients = self.registry().all_sessions();
        (clients, self.peers().link_sessions())
    }
}

/// Streams of the sessions still open.
fn count_streams<'a>(sessions: impl Iterator<Item = &'a SessionHandle>) -> usize {
    sessions
        .filter(|s| !s.is_closed())
        .map(|s| s.stats().streams)
        .sum()
}

/// Logs each stream of `session` as cut; returns how many. On a peer link the client is
/// the one the target is routed to (`foo::tcp/...`).
fn log_cut(session: &SessionHandle, peer_link: bool) -> usize {
    if session.is_closed() {
        return 0;
    }
    let streams = session.streams();
    for s in &streams {
        let client = match s.target.client_key() {
            Some(key) if peer_link => key.to_owned(),
            _ => session.client_key().to_owned(),
        };
        tracing::warn!(
            client = %client,
            target = %s.target.without_route(),
            bytes_sent = s.bytes_written,
            bytes_received = s.bytes_read,
            age = ?std::time::Instant::now().saturating_duration_since(s.opened_at),
            via_peer_link = peer_link,
            "stream cut at the drain deadline"
        );
    }
    streams.len()
}
