//! Which server a [`Client`](crate::Client) dials next: several URLs, each host name
//! expanded to its addresses, tried in turn.
//!
//! A client whose server goes away moves to another one at once: a different server is
//! tried without delay, and the backoff applies only once every server has failed in a
//! round. A server that answered `503` with `Retry-After` is not tried again before that
//! time (plus jitter); the others go first.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use crate::transport::ConnectOptions;

/// A session shorter than this does not count as the server working: a server that accepts
/// and drops every session must not make the client loop without backoff.
const STABLE: Duration = Duration::from_secs(1);

/// One place to connect to: a URL, and one of its host's addresses when it was resolved
/// here (the `Host` header and TLS name stay the URL's).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Endpoint {
    pub(crate) url: String,
    pub(crate) addr: Option<SocketAddr>,
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            Some(addr) => write!(f, "{} at {addr}", self.url),
            None => f.write_str(&self.url),
        }
    }
}

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Try the (new) current endpoint at once.
    Now,
    /// Every endpoint failed in this round: wait out the backoff, then start a new round.
    Backoff,
}

/// The endpoints and where the client is among them.
#[derive(Debug, Default)]
pub(crate) struct Rotation {
    endpoints: Vec<Endpoint>,
    current: usize,
    /// Endpoints tried without success in this round.
    tried: Vec<bool>,
    /// Not before this instant (a server's `Retry-After`).
    not_before: HashMap<Endpoint, Instant>,
}

impl Rotation {
    /// Replaces the endpoints (a new round's resolution); the current one stays current if
    /// it is still listed. Starts a new round.
    pub(crate) fn set_endpoints(&mut self, endpoints: Vec<Endpoint>) {
        let current = self.endpoints.get(self.current).cloned();
        self.current = current
            .and_then(|c| endpoints.iter().position(|e| *e == c))
            .unwrap_or(0);
        self.tried = vec![false; endpoints.len()];
        self.endpoints = endpoints;
        self.not_before.retain(|e, _| self.endpoints.contains(e));
    }

    /// The endpoint to dial now.
    pub(crate) fn current(&self) -> Option<&Endpoint> {
        self.endpoints.get(self.current)
    }

    /// Moves to the next endpoint that may be tried at `now` (one that did not answer
    /// `Retry-After`), for the next of several sessions: the next replica is more likely
    /// behind another endpoint. Stays if none may.
    pub(crate) fn advance(&mut self, now: Instant) {
        let n = self.endpoints.len();
        if let Some(i) = (1..n)
            .map(|k| (self.current + k) % n)
            .find(|&i| self.eligible(i, now))
        {
            self.current = i;
        }
    }

    /// How many endpoints there are.
    pub(crate) fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// A session on `endpoint` ended after `uptime`; `going_away` if the server said it is
    /// leaving (a drain). The next attempt goes elsewhere if there is elsewhere.
    pub(crate) fn session_ended(
        &mut self,
        endpoint: &Endpoint,
        uptime: Duration,
        going_away: bool,
    ) -> Next {
        if let Some(i) = self.endpoints.iter().position(|e| e == endpoint) {
            self.current = i;
        }
        if uptime >= STABLE {
            // The server worked: a new round starts with the others.
            self.tried.fill(false);
        }
        if self.endpoints.len() <= 1 {
            return if going_away && uptime >= STABLE {
                Next::Now
            } else {
                Next::Backoff
            };
        }
        self.failed_here(Instant::now())
    }

    /// An attempt on the current endpoint failed; `retry_after` is the server's
    /// `Retry-After`, which keeps it aside at least that long (plus up to half again, so a
    /// fleet refused together does not come back together).
    pub(crate) fn attempt_failed(&mut self, now: Instant, retry_after: Option<Duration>) -> Next {
        if let (Some(delay), Some(e)) = (retry_after, self.current()) {
            let jitter = delay.mul_f64(rand::rng().random_range(0.0..=0.5));
            self.not_before.insert(e.clone(), now + delay + jitter);
        }
        self.failed_here(now)
    }

    fn failed_here(&mut self, now: Instant) -> Next {
        if let Some(t) = self.tried.get_mut(self.current) {
            *t = true;
        }
        let n = self.endpoints.len();
        let next = (1..=n)
            .map(|k| (self.current + k) % n.max(1))
            .find(|&i| !self.tried[i] && self.eligible(i, now));
        match next {
            Some(i) => {
                self.current = i;
                Next::Now
            }
            None => Next::Backoff,
        }
    }

    fn eligible(&self, i: usize, now: Instant) -> bool {
        self.not_before
            .get(&self.endpoints[i])
            .is_none_or(|&t| t <= now)
    }

    /// Starts a round after the backoff: the current endpoint if it may be tried, else the
    /// next that may; if none may yet, the one free soonest and how long to wait for it.
    pub(crate) fn start_round(&mut self, now: Instant) -> Duration {
        self.tried.fill(false);
        let n = self.endpoints.len();
        if n == 0 {
            return Duration::ZERO;
        }
        if let Some(i) = (0..n)
            .map(|k| (self.current + k) % n)
            .find(|&i| self.eligible(i, now))
        {
            self.current = i;
            return Duration::ZERO;
        }
        let (i, at) = (0..n)
            .filter_map(|i| self.not_before.get(&self.endpoints[i]).map(|&t| (i, t)))
            .min_by_key(|&(_, t)| t)
            .unwrap_or((self.current, now));
        self.current = i;
        at.saturating_duration_since(now)
    }
}

/// The endpoints of `urls`: each host name resolved to its addresses (so a name with
/// several, a headless Service say, counts as several servers), IP literals and URLs
/// reached through a proxy as they are. A name that does not resolve stays one endpoint,
/// whose attempt reports the error.
pub(crate) async fn resolve(urls: &[String], options: &ConnectOptions) -> Vec<Endpoint> {
    let mut out: Vec<Endpoint> = Vec::new();
    let mut push = |e: Endpoint| {
        if !out.contains(&e) {
            out.push(e);
        }
    };
    for url in urls {
        let as_is = Endpoint {
            url: url.clone(),
            addr: None,
        };
        let Some((host, port, secure)) = host_port(url) else {
            push(as_is);
            continue;
        };
        let proxied = !matches!(options.proxy.proxy_for(secure, &host, port), Ok(None));
        if proxied || host.parse::<IpAddr>().is_ok() {
            push(as_is);
            continue;
        }
        let lookup = tokio::time::timeout(
            options.handshake_timeout,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await;
        // The resolver's order (its preference), each address once.
        let mut addrs: Vec<SocketAddr> = Vec::new();
        if let Ok(Ok(found)) = lookup {
            for a in found {
                if !addrs.contains(&a) {
                    addrs.push(a);
                }
            }
        }
        if addrs.len() <= 1 {
            // One address: the transport resolves it as it always did.
            push(as_is);
            continue;
        }
        for addr in addrs {
            push(Endpoint {
                url: url.clone(),
                addr: Some(addr),
            });
        }
    }
    out
}

/// Host (no brackets), port (the scheme's default) and whether TLS is used.
fn host_port(url: &str) -> Option<(String, u16, bool)> {
    let uri: http::Uri = url.parse().ok()?;
    let secure = matches!(uri.scheme_str()?, "wss" | "https");
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    Some((host.to_owned(), port, secure))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                url: format!("ws://127.0.0.{}:8123/connect", i + 1),
                addr: None,
            })
            .collect()
    }

    fn rotation(n: usize) -> Rotation {
        let mut r = Rotation::default();
        r.set_endpoints(endpoints(n));
        r
    }

    fn at(r: &Rotation) -> String {
        r.current().map(|e| e.url.clone()).unwrap_or_default()
    }

    #[test]
    fn a_lost_server_moves_the_client_to_the_next_at_once() {
        let mut r = rotation(3);
        let long = Duration::from_secs(30);
        let first = endpoints(3)[0].clone();
        assert_eq!(r.session_ended(&first, long, false), Next::Now);
        assert_eq!(at(&r), "ws://127.0.0.2:8123/connect");
        // The next one is down too: the third, still at once.
        assert_eq!(r.attempt_failed(Instant::now(), None), Next::Now);
        assert_eq!(at(&r), "ws://127.0.0.3:8123/connect");
        // Every server failed in this round: back off.
        assert_eq!(r.attempt_failed(Instant::now(), None), Next::Backoff);
        assert_eq!(r.start_round(Instant::now()), Duration::ZERO);
        assert_eq!(r.attempt_failed(Instant::now(), None), Next::Now);
    }

    #[test]
    fn one_server_backs_off_unless_it_went_away_after_working() {
        let mut r = rotation(1);
        let long = Duration::from_secs(30);
        let only = endpoints(1)[0].clone();
        assert_eq!(r.session_ended(&only, long, false), Next::Backoff);
        assert_eq!(r.session_ended(&only, long, true), Next::Now);
        assert_eq!(
            r.session_ended(&only, Duration::from_millis(10), true),
            Next::Backoff,
            "a server that sends its clients away at once does not make them loop"
        );
        assert_eq!(r.attempt_failed(Instant::now(), None), Next::Backoff);
    }

    #[test]
    fn sessions_that_drop_at_once_end_the_round() {
        let mut r = rotation(2);
        let short = Duration::from_millis(10);
        let eps = endpoints(2);
        assert_eq!(r.session_ended(&eps[0], short, false), Next::Now);
        assert_eq!(r.session_ended(&eps[1], short, false), Next::Backoff);
    }

    #[test]
    fn retry_after_puts_a_server_aside_and_the_others_go_first() {
        let now = Instant::now();
        let mut r = rotation(2);
        assert_eq!(
            r.attempt_failed(now, Some(Duration::from_secs(10))),
            Next::Now
        );
        assert_eq!(at(&r), "ws://127.0.0.2:8123/connect");
        assert_eq!(r.attempt_failed(now, None), Next::Backoff);
        // The first is still aside: the round starts with the second.
        assert_eq!(r.start_round(now + Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(at(&r), "ws://127.0.0.2:8123/connect");

        // Alone, a server that said Retry-After is waited for: at least that long, at most
        // half again.
        let mut one = rotation(1);
        assert_eq!(
            one.attempt_failed(now, Some(Duration::from_secs(10))),
            Next::Backoff
        );
        let wait = one.start_round(now + Duration::from_secs(1));
        assert!(
            wait >= Duration::from_secs(9) && wait <= Duration::from_secs(14),
            "{wait:?}"
        );
        assert_eq!(
            one.start_round(now + Duration::from_secs(16)),
            Duration::ZERO
        );
    }

    #[test]
    fn the_current_endpoint_survives_a_new_resolution() {
        let mut r = rotation(3);
        r.session_ended(&endpoints(3)[0], Duration::from_secs(30), false);
        assert_eq!(at(&r), "ws://127.0.0.2:8123/connect");
        let mut again = endpoints(3);
        again.reverse();
        r.set_endpoints(again);
        assert_eq!(at(&r), "ws://127.0.0.2:8123/connect");
        r.set_endpoints(endpoints(1));
        assert_eq!(at(&r), "ws://127.0.0.1:8123/connect");
    }

    #[test]
    fn a_session_ends_where_it_was_and_advance_skips_retry_after() {
        let now = Instant::now();
        let eps = endpoints(3);
        let mut r = rotation(3);
        // The session on the third ended while the rotation pointed at the first: the next
        // attempt goes to the one after the third.
        assert_eq!(
            r.session_ended(&eps[2], Duration::from_secs(30), false),
            Next::Now
        );
        assert_eq!(at(&r), "ws://127.0.0.1:8123/connect");
        // The second said Retry-After: advancing from the first skips it.
        r.advance(now);
        assert_eq!(at(&r), "ws://127.0.0.2:8123/connect");
        r.attempt_failed(now, Some(Duration::from_secs(60)));
        // The third was tried in this round (its session ended): the first is next.
        assert_eq!(at(&r), "ws://127.0.0.1:8123/connect");
        r.advance(now);
        assert_eq!(at(&r), "ws://127.0.0.3:8123/connect", "the second is aside");
        r.advance(now);
        assert_eq!(at(&r), "ws://127.0.0.1:8123/connect");
    }

    #[test]
    fn urls_split_into_host_port_and_tls() {
        assert_eq!(
            host_port("wss://[::1]/connect"),
            Some(("::1".into(), 443, true))
        );
        assert_eq!(
            host_port("ws://rd.ns.svc:8123/connect"),
            Some(("rd.ns.svc".into(), 8123, false))
        );
        assert_eq!(host_port("not a url"), None);
    }

    #[tokio::test]
    async fn ip_literals_and_unresolvable_names_stay_one_endpoint() {
        let urls = vec![
            "ws://127.0.0.1:1/connect".to_owned(),
            "ws://127.0.0.1:1/connect".to_owned(),
            "ws://name.invalid:1/connect".to_owned(),
        ];
        let options = ConnectOptions::default().with_proxy(crate::ProxyMode::None);
        let eps = resolve(&urls, &options).await;
        assert_eq!(eps.len(), 2, "duplicates count once: {eps:?}");
        assert!(eps.iter().all(|e| e.addr.is_none()));
    }
}
