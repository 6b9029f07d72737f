//! How many sessions a [`Client`](crate::Client) holds, and with which servers.
//!
//! An rd server with a peer id tells an agent that negotiated the replicas extension its id
//! and how many replicas it counts (in the `101`, and again in the session when the count
//! changes). The agent keeps dialing its URL(s) until it holds a session with that many
//! distinct server ids, so a drain, a restart or a crash of one replica never leaves it
//! unreachable: each replica dials its own session, and the others carry on while it
//! re-fills. A session whose server said it is going away (a drain) no longer counts, so its
//! replacement is made while it still serves the streams in flight.

use std::fmt;
use std::num::NonZeroUsize;
use std::str::FromStr;

use http::HeaderMap;
use rd_session::{REPLICAS_HEADER, SERVER_ID_HEADER};

/// How many sessions a [`Client`](crate::Client) holds at once
/// ([`ClientBuilder::sessions`](crate::ClientBuilder::sessions)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionCount {
    /// One with each replica the servers count (the default). Against a Go server, or an
    /// rd server without a peer id, that is one.
    #[default]
    All,
    /// At most this many; one is the behaviour of earlier versions (and of Go's client).
    AtMost(NonZeroUsize),
}

impl SessionCount {
    /// One session: the behaviour of earlier versions.
    pub const ONE: Self = Self::AtMost(NonZeroUsize::MIN);

    fn cap(self) -> usize {
        match self {
            Self::All => usize::MAX,
            Self::AtMost(n) => n.get(),
        }
    }
}

impl fmt::Display for SessionCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::All => f.write_str("all"),
            Self::AtMost(n) => n.fmt(f),
        }
    }
}

/// A [`SessionCount`] that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid session count {0:?}: want `all` or a number from 1")]
pub struct InvalidSessionCount(String);

impl FromStr for SessionCount {
    type Err = InvalidSessionCount;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("all") {
            return Ok(Self::All);
        }
        t.parse::<NonZeroUsize>()
            .map(Self::AtMost)
            .map_err(|_| InvalidSessionCount(s.to_owned()))
    }
}

/// What a server said about itself in its handshake answer (replicas extension).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ServerInfo {
    /// Its peer id; `None` from a Go server or an rd server without one.
    pub(crate) id: Option<String>,
    /// The replicas it counts, itself included.
    pub(crate) replicas: Option<u32>,
}

impl ServerInfo {
    pub(crate) fn from_headers(headers: &HeaderMap) -> Self {
        let text = |name| {
            headers
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
                .map(str::trim)
                .filter(|v| !v.is_empty())
        };
        Self {
            id: text(SERVER_ID_HEADER).map(str::to_owned),
            replicas: text(REPLICAS_HEADER)
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|&n| n > 0),
        }
    }
}

/// A session the client holds, as [`StateObserver::sessions`](crate::StateObserver::sessions)
/// reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HeldSession {
    /// The server's id (`None` for a Go server, or an rd server without a peer id).
    pub server_id: Option<String>,
    /// The server said the session is going away (it drains): it serves the streams in
    /// flight while the client makes its replacement.
    pub going_away: bool,
}

#[derive(Debug)]
struct Member {
    slot: u64,
    server: ServerInfo,
    going_away: bool,
}

/// The sessions held and how many are wanted.
#[derive(Debug)]
pub(crate) struct Fleet {
    limit: SessionCount,
    members: Vec<Member>,
}

impl Fleet {
    pub(crate) fn new(limit: SessionCount) -> Self {
        Self {
            limit,
            members: Vec::new(),
        }
    }

    fn live(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(|m| !m.going_away)
    }

    /// How many sessions to hold: what the servers count, within the limit. One while no
    /// session is up (the first one says how many), and one as long as a server that gives
    /// no id is among them (a Go server: its replicas cannot be told apart).
    pub(crate) fn target(&self) -> usize {
        let mut live = self.live().peekable();
        if live.peek().is_none() || self.limit == SessionCount::ONE {
            return 1;
        }
        let mut most = 1u32;
        for m in live {
            if m.server.id.is_none() {
                return 1;
            }
            most = most.max(m.server.replicas.unwrap_or(1));
        }
        (most as usize).min(self.limit.cap())
    }

    /// Sessions that count: held, and not going away.
    pub(crate) fn live_count(&self) -> usize {
        self.live().count()
    }

    /// Sessions held, going away or not.
    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    pub(crate) fn wants_more(&self) -> bool {
        self.live_count() < self.target()
    }

    /// The ids of the servers held (not going away): a server among them answers a new
    /// attempt with `409` instead of a second session.
    pub(crate) fn held_ids(&self) -> Vec<&str> {
        self.live().filter_map(|m| m.server.id.as_deref()).collect()
    }

    /// Whether a session with server `id` counts already.
    pub(crate) fn holds(&self, id: &str) -> bool {
        self.held_ids().contains(&id)
    }

    pub(crate) fn add(&mut self, slot: u64, server: ServerInfo) {
        self.members.push(Member {
            slot,
            server,
            going_away: false,
        });
    }

    pub(crate) fn remove(&mut self, slot: u64) {
        self.members.retain(|m| m.slot != slot);
    }

    /// The server of session `slot` said it is going away; whether that is news.
    pub(crate) fn going_away(&mut self, slot: u64) -> bool {
        match self.members.iter_mut().find(|m| m.slot == slot) {
            Some(m) => !std::mem::replace(&mut m.going_away, true),
            None => false,
        }
    }

    /// The server of session `slot` counts `replicas` now.
    pub(crate) fn replicas(&mut self, slot: u64, replicas: u32) {
        if let Some(m) = self.members.iter_mut().find(|m| m.slot == slot) {
            m.server.replicas = Some(replicas.max(1));
        }
    }

    /// Server `id` (held) counts `replicas` now: what its `409` said.
    pub(crate) fn replicas_of(&mut self, id: &str, replicas: u32) {
        for m in &mut self.members {
            if m.server.id.as_deref() == Some(id) {
                m.server.replicas = Some(replicas.max(1));
            }
        }
    }

    pub(crate) fn held(&self) -> Vec<HeldSession> {
        self.members
            .iter()
            .map(|m| HeldSession {
                server_id: m.server.id.clone(),
                going_away: m.going_away,
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn info(id: &str, replicas: u32) -> ServerInfo {
        ServerInfo {
            id: Some(id.into()),
            replicas: Some(replicas),
        }
    }

    #[test]
    fn session_counts_parse() {
        assert_eq!("all".parse(), Ok(SessionCount::All));
        assert_eq!(" ALL ".parse(), Ok(SessionCount::All));
        assert_eq!("1".parse(), Ok(SessionCount::ONE));
        assert_eq!(
            "3".parse::<SessionCount>().map(|c| c.to_string()),
            Ok("3".into())
        );
        for bad in ["0", "-1", "many", ""] {
            assert!(bad.parse::<SessionCount>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_fleet_fills_to_the_count_the_servers_give() {
        let mut f = Fleet::new(SessionCount::All);
        assert_eq!((f.target(), f.wants_more()), (1, true));
        f.add(1, info("a", 3));
        assert_eq!((f.target(), f.live_count()), (3, 1));
        f.add(2, info("b", 3));
        f.add(3, info("c", 3));
        assert!(!f.wants_more());
        assert!(f.holds("b") && !f.holds("d"));
        // A replica comes: its peers count 4, and say so in the session.
        f.replicas(2, 4);
        assert_eq!(f.target(), 4);
        assert!(f.wants_more());
        // One drains: it no longer counts, and its id may be dialed again (a restarted
        // replica with the same id).
        assert!(f.going_away(1));
        assert!(!f.going_away(1), "news once");
        assert_eq!(f.live_count(), 2);
        assert!(!f.holds("a"));
        assert_eq!(f.len(), 3);
        assert_eq!(f.held_ids(), ["b", "c"]);
        f.remove(1);
        assert_eq!(f.len(), 2);
    }

    #[test]
    fn a_limit_and_a_go_server_keep_fewer() {
        let mut f = Fleet::new(SessionCount::AtMost(NonZeroUsize::new(2).unwrap()));
        f.add(1, info("a", 5));
        assert_eq!(f.target(), 2);
        let mut one = Fleet::new(SessionCount::ONE);
        one.add(1, info("a", 5));
        assert_eq!((one.target(), one.wants_more()), (1, false));
        let mut go = Fleet::new(SessionCount::All);
        go.add(1, ServerInfo::default());
        assert_eq!((go.target(), go.wants_more()), (1, false));
        // A server id without a count: one replica.
        let mut bare = Fleet::new(SessionCount::All);
        bare.add(
            1,
            ServerInfo {
                id: Some("a".into()),
                replicas: None,
            },
        );
        assert_eq!(bare.target(), 1);
    }

    #[test]
    fn handshake_headers_are_read_leniently() {
        let mut h = HeaderMap::new();
        assert_eq!(ServerInfo::from_headers(&h), ServerInfo::default());
        h.insert(SERVER_ID_HEADER, " rd-1 ".parse().unwrap());
        h.insert(REPLICAS_HEADER, "3".parse().unwrap());
        assert_eq!(ServerInfo::from_headers(&h), info("rd-1", 3));
        h.insert(REPLICAS_HEADER, "0".parse().unwrap());
        assert_eq!(ServerInfo::from_headers(&h).replicas, None);
        h.insert(REPLICAS_HEADER, "x".parse().unwrap());
        assert_eq!(ServerInfo::from_headers(&h).replicas, None);
    }
}
