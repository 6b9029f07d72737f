//! Graceful drain: move the agents to other replicas without cutting the streams in flight,
//! and without a moment in which an agent is reachable through no replica.
//!
//! The order matters. A session carrying streams cannot be closed without cutting them, so:
//! 1. stop taking new agents (new sessions are refused, readiness fails:
//!    [`Server::begin_drain`]), and tell the peers we are going away (a GoAway on every peer
//!    link: they stop counting us as a replica, and route through us only what no other peer
//!    can take);
//! 2. tell each rd agent (replicas extension) that its session here is going away: it opens
//!    nothing new on it and makes its replacement elsewhere, while the streams in flight go
//!    on. Go agents (and rd agents without the extension) are withdrawn from the peers at
//!    once and keep today's behaviour: served until their streams end, then moved;
//! 3. make-before-break: an rd agent's session is withdrawn from the peers only once
//!    another replica announced the agent (or no peer is left to hand it to, or it was not
//!    held elsewhere within [`HANDOVER_WAIT`]); until then requests for it keep reaching it
//!    through us. Requests that enter here go to a peer that holds the agent first, so the
//!    session we hand over carries nothing new;
//! 4. close each withdrawn session with a going-away close (1001) once it carries no
//!    stream;
//! 5. at the deadline, log every stream still running (client, target, bytes) and cut it.
//!
//! Peer links stay up until the end: they carry other replicas' requests to our clients,
//! and ours to theirs, that are still in flight.

use std::time::Duration;

use rd_session::SessionHandle;
use tokio::time::Instant;

use crate::server::Server;

/// The close reason agents see in the going-away Close frame, and the GoAway reason.
const GOING_AWAY_REASON: &str = "server draining";

/// How often a drain looks again even without a wake-up: outgoing peer links have no
/// observer to wake it when their streams end, and announcements from the peers (which
/// make an agent reachable elsewhere) wake nobody.
const RECHECK: Duration = Duration::from_millis(100);

/// How long an rd agent told to move gets to be held by another replica before its session
/// here is let go anyway (withdrawn, and closed once idle), as a Go agent's is at once.
/// Behind a load balancer an agent is held elsewhere within a second or two; one that is
/// not by then reaches only this replica (its own address, say) or cannot reach the others,
/// and keeping it would only keep the drain, and the rolling restart, waiting.
const HANDOVER_WAIT: Duration = Duration::from_secs(10);

/// Bound on closing the last sessions after the drain.
const CLOSE_BOUND: Duration = Duration::from_secs(2);

/// What a [`Server::drain`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DrainReport {
    /// Client sessions closed with a going-away close (idle at once, or once their last
    /// stream ended).
    pub sessions_moved: usize,
    /// rd agents told their session here is going away (replicas extension), so that they
    /// made their replacement while this one still served them.
    pub agents_told: usize,
    /// Streams still running at the deadline, cut and logged.
    pub streams_cut: usize,
    /// Whether every stream finished within the grace period.
    pub finished_in_time: bool,
}

impl Server {
    /// Drains the server: [`begin_drain`](Self::begin_drain), a GoAway to the peers and to
    /// each rd agent, withdraw each agent from the peers once it is reachable through
    /// another replica (Go agents at once), close each withdrawn client session with a
    /// going-away close once it carries no stream, wait up to `grace` for the streams in
    /// flight, log and cut those left at the deadline (`stream cut at the drain deadline`:
    /// client, target, bytes sent and received through the tunnel, age), then
    /// [`shutdown`](Self::shutdown). Kubernetes' default grace is 30 s.
    pub async fn drain(&self, grace: Duration) -> DrainReport {
        let deadline = Instant::now() + grace;
        let handover_deadline = Instant::now() + HANDOVER_WAIT.min(grace);
        self.begin_drain();
        let mut report = DrainReport::default();
        report.agents_told += self.tell_going_away();
        let (clients, links) = self.drain_view();
        tracing::info!(
            clients = clients.len(),
            told_to_move = report.agents_told,
            peer_links = links.len(),
            streams = count_streams(clients.iter().chain(&links)),
            ?grace,
            "draining: agents are asked to move, streams in flight may finish"
        );
        loop {
            // Registered before looking, so an end between the look and the wait still wakes us.
            let wake = self.inner.lifecycle.wake.clone();
            let woken = wake.notified();
            // Again each pass: a session or a peer link that came up after the first (an
            // upgrade in flight when the drain began, a link redialed) is told too.
            report.agents_told += self.tell_going_away();
            let overdue = Instant::now() >= handover_deadline;
            let let_go = self.hand_over(overdue);
            if let_go > 0 {
                tracing::info!(
                    agents = let_go,
                    wait = ?HANDOVER_WAIT,
                    "agents not held by another replica: moved anyway (they reach only this one, \
                     or cannot reach the others)"
                );
            }
            let (clients, links) = self.drain_view();
            let mut waiting = 0;
            for session in clients.iter().filter(|s| !s.is_closed()) {
                if !self.peers().is_withdrawn(session) {
                    waiting += 1;
                } else if session.stats().streams == 0 {
                    session.close_going_away(GOING_AWAY_REASON);
                    report.sessions_moved += 1;
                }
            }
            let busy = count_streams(clients.iter().chain(&links));
            if busy == 0 && waiting == 0 {
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
            agents_told = report.agents_told,
            streams_cut = report.streams_cut,
            finished_in_time = report.finished_in_time,
            "drain over"
        );
        self.shutdown(CLOSE_BOUND).await;
        report
    }

    /// Sends GoAway on every peer link and to every rd agent not told yet, and withdraws the
    /// sessions of agents that cannot be told (Go agents) at once. Returns how many agents
    /// were told now.
    fn tell_going_away(&self) -> usize {
        self.peers().go_away_links(GOING_AWAY_REASON);
        // Under the registry's lock, as every announcement: see the lock order there.
        let registry = self.registry();
        let (rd, go): (Vec<SessionHandle>, Vec<SessionHandle>) = registry
            .all_sessions()
            .into_iter()
            .partition(|s| s.extensions().replicas);
        let go: Vec<SessionHandle> = go
            .into_iter()
            .filter(|s| !self.peers().is_withdrawn(s))
            .collect();
        self.peers().withdraw(&go);
        rd.iter().filter(|s| s.go_away(GOING_AWAY_REASON)).count()
    }

    /// Withdraws from the peers every client session whose agent another replica announced
    /// (it made its replacement), or all of them once no peer is left to hand them to, or
    /// (`overdue`) once the handover wait is over. Returns how many were let go without
    /// being held elsewhere.
    fn hand_over(&self, overdue: bool) -> usize {
        let peers = self.peers();
        let anywhere = peers.has_live_peer();
        let registry = self.registry();
        let (ready, stuck): (Vec<SessionHandle>, Vec<SessionHandle>) = registry
            .all_sessions()
            .into_iter()
            .filter(|s| !peers.is_withdrawn(s))
            .partition(|s| !anywhere || peers.routable_elsewhere(s.client_key()));
        if !ready.is_empty() {
            tracing::debug!(
                sessions = ready.len(),
                "agents reachable elsewhere: withdrawn"
            );
            peers.withdraw(&ready);
        }
        if overdue && !stuck.is_empty() {
            peers.withdraw(&stuck);
            return stuck.len();
        }
        0
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
