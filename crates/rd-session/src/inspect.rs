//! What an operator sees of a running session and its streams: plain, serializable views
//! built from a [`SessionHandle`], for admin APIs (rd-server's `/admin/agents`, rd-client's
//! `/admin/streams`). Times are given both as timestamps and as seconds ago, so `jq` can
//! filter on them without date arithmetic.

use std::time::{Duration, Instant, SystemTime};

use rd_proto::{Origin, StreamInfo};
use serde::Serialize;

use crate::handle::SessionHandle;

/// A session as the admin API shows it (without what only the server or client knows:
/// remote address, identity, server id).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct SessionView {
    /// The session key, as a string: 63-bit numbers do not survive JSON tools that read
    /// numbers as doubles (jq).
    pub id: String,
    /// `credit` or `pause/resume`.
    pub flow_control: &'static str,
    /// The rd extensions in force (all false with a Go peer).
    pub extensions: ExtensionsView,
    /// Streams in the session's table (open, or ended with bytes still unread).
    pub streams_open: usize,
    /// Streams opened here the peer has not answered yet.
    pub pending_dials: usize,
    /// When the last frame (message, ping or pong) arrived from the peer.
    pub last_frame_at: String,
    /// The same, in seconds before the moment of the view.
    pub last_frame_seconds_ago: f64,
    /// The link's round trip measured with pings, in milliseconds (`null` before the first).
    pub rtt_ms: Option<f64>,
    /// This end told the peer it is going away (replicas extension, a draining server).
    pub going_away: bool,
    /// The peer told us it is going away.
    pub peer_going_away: bool,
    /// Why the session ended, if it has.
    pub ended: Option<String>,
}

/// The extensions of a session.
#[derive(Debug, Clone, Copy, Serialize)]
#[non_exhaustive]
pub struct ExtensionsView {
    /// Per-stream credit flow control.
    pub credit: bool,
    /// TCP half-close.
    pub half_close: bool,
    /// One session per replica, GoAway.
    pub replicas: bool,
    /// The agent acknowledges a dial as soon as it succeeded (CONNECT answers then).
    pub connect_ack: bool,
    /// Streams to `udp` targets carry datagrams (2-byte length framing).
    pub udp: bool,
}

/// One stream as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct StreamView {
    /// The stream (connection) id.
    pub id: i64,
    /// What opened it: the label its dialer gave (`/client`, `connect`, `forward`, `peer`),
    /// `library` for an unlabelled stream opened here, `remote` for one the peer opened.
    pub origin: &'static str,
    /// `proto/address` on the far side.
    pub target: String,
    /// `dialing` (opened here, no answer yet), `open`, `half-closed-local` (we finished
    /// writing), `half-closed-remote` (the peer did), `closing` (both, or ended with bytes
    /// still unread).
    pub state: &'static str,
    /// Seconds since it was opened.
    pub age_seconds: f64,
    /// Bytes written into the stream (towards the far side).
    pub bytes_sent: u64,
    /// Bytes read from the stream (from the far side).
    pub bytes_received: u64,
    /// When bytes last moved either way.
    pub last_activity_at: String,
    /// The same, in seconds ago.
    pub last_activity_seconds_ago: f64,
    /// Seconds since the last frame for this stream came from the peer (`null`: never).
    pub last_heard_seconds_ago: Option<f64>,
    /// Flow control and what the stream holds.
    pub flow: FlowView,
}

/// A stream's flow state.
#[derive(Debug, Clone, Copy, Serialize)]
#[non_exhaustive]
pub struct FlowView {
    /// `credit` or `pause/resume`.
    pub mode: &'static str,
    /// Our flow control holds the peer back (our Pause, or the peer used all its credit):
    /// the local reader is slower than the far side.
    pub paused_by_us: bool,
    /// The peer holds us back (its Pause, or no credit left): the far side reads slowly.
    pub paused_by_peer: bool,
    /// Credit: the receive window we aim to keep granted.
    pub recv_window: Option<usize>,
    /// Credit: bytes the peer may still send us.
    pub recv_credit: Option<usize>,
    /// Credit: bytes we may still send.
    pub send_credit: Option<usize>,
    /// Received bytes not read yet (held here).
    pub unread_bytes: usize,
    /// Written bytes not sent yet (held here).
    pub queued_bytes: usize,
}

/// `when` (on the session clock, `now` being that clock's present) as an RFC 3339 UTC
/// timestamp, with milliseconds.
pub fn timestamp(now: Instant, wall: SystemTime, when: Instant) -> String {
    let ago = now.saturating_duration_since(when);
    let at = wall.checked_sub(ago).unwrap_or(SystemTime::UNIX_EPOCH);
    rfc3339(at)
}

/// Seconds as a number with millisecond precision (`1.5`, never `1.4999999999`).
pub fn seconds(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

fn ago(now: Instant, when: Instant) -> f64 {
    seconds(now.saturating_duration_since(when))
}

/// A UTC time as `2026-11-30T14:12:36.459Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl SessionView {
    /// The view of `session` now (`wall` is the wall clock at the same moment).
    pub fn of(session: &SessionHandle, wall: SystemTime) -> Self {
        let now = session.now();
        let ext = session.extensions();
        let stats = session.stats();
        let last = session.last_heard();
        Self {
            id: session.session_key().to_string(),
            flow_control: ext.flow_control(),
            extensions: ExtensionsView {
                credit: ext.credit,
                half_close: ext.half_close,
                replicas: ext.replicas,
                connect_ack: ext.connect_ack,
                udp: ext.udp,
            },
            streams_open: stats.streams,
            pending_dials: session.pending_dials(),
            last_frame_at: timestamp(now, wall, last),
            last_frame_seconds_ago: ago(now, last),
            rtt_ms: session.rtt().map(|d| d.as_micros() as f64 / 1000.0),
            going_away: session.is_going_away(),
            peer_going_away: session.peer_going_away().is_some(),
            ended: session.end().map(|e| e.to_string()),
        }
    }
}

impl StreamView {
    /// Every stream of `session`, by id.
    pub fn all_of(session: &SessionHandle, wall: SystemTime) -> Vec<Self> {
        let now = session.now();
        let credit = session.extensions().credit;
        let mut views: Vec<Self> = session
            .streams()
            .iter()
            .map(|s| Self::of(s, credit, now, wall))
            .collect();
        views.sort_by_key(|v| v.id);
        views
    }

    fn of(s: &StreamInfo, credit: bool, now: Instant, wall: SystemTime) -> Self {
        let origin = match (s.origin, s.label) {
            (_, Some(label)) => label,
            (Origin::Local, None) => "library",
            (Origin::Remote, None) => "remote",
        };
        let state = if !s.on_wire || (s.finished && s.peer_finished) {
            "closing"
        } else if s.origin == Origin::Local && s.last_heard.is_none() {
            "dialing"
        } else if s.finished {
            "half-closed-local"
        } else if s.peer_finished {
            "half-closed-remote"
        } else {
            "open"
        };
        Self {
            id: s.id.0,
            origin,
            target: format!("{}/{}", s.target.network(), s.target.address()),
            state,
            age_seconds: ago(now, s.opened_at),
            bytes_sent: s.bytes_written,
            bytes_received: s.bytes_read,
            last_activity_at: timestamp(now, wall, s.last_activity),
            last_activity_seconds_ago: ago(now, s.last_activity),
            last_heard_seconds_ago: s.last_heard.map(|h| ago(now, h)),
            flow: FlowView {
                mode: if credit { "credit" } else { "pause/resume" },
                paused_by_us: s.flow.paused_by_us,
                paused_by_peer: s.flow.paused_by_peer,
                recv_window: s.flow.recv_window,
                recv_credit: s.flow.recv_credit,
                send_credit: s.flow.send_credit,
                unread_bytes: s.flow.unread,
                queued_bytes: s.flow.send_queued,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_796_047_956_459);
        assert_eq!(rfc3339(t), "2026-11-30T14:12:36.459Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
        assert_eq!(seconds(Duration::from_micros(1_906_645)), 1.906);
    }
}
