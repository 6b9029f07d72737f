//! Prometheus metrics: Go's counters under Go's names and labels, plus gauges Go lacks.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// A counter exposed under its exact name. prometheus-client writes counters the OpenMetrics
/// way, with a `_total` suffix on the sample; Go's classic exposition has none, and
/// dashboards built on Go's `session_server_total_add_websocket_session` must keep working.
/// An untyped sample keeps the name as it is.
#[derive(Debug, Clone, Default)]
pub struct GoCounter(Arc<AtomicU64>);

impl GoCounter {
    /// Adds `v`.
    pub fn inc_by(&self, v: u64) {
        self.0.fetch_add(v, Ordering::Relaxed);
    }

    /// Adds one.
    pub fn inc(&self) {
        self.inc_by(1);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl TypedMetric for GoCounter {
    const TYPE: MetricType = MetricType::Unknown;
}

impl EncodeMetric for GoCounter {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        encoder.encode_gauge(&self.get())
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Unknown
    }
}

/// Every metric a server keeps. Cloning shares the same series.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    add_ws: Family<Labels, GoCounter>,
    remove_ws: Family<Labels, GoCounter>,
    add_conn: Family<Labels, GoCounter>,
    remove_conn: Family<Labels, GoCounter>,
    transmit_bytes: Family<Labels, GoCounter>,
    transmit_error_bytes: Family<Labels, GoCounter>,
    receive_bytes: Family<Labels, GoCounter>,
    peer_attempt: Family<Labels, GoCounter>,
    peer_connected: Family<Labels, GoCounter>,
    peer_disconnected: Family<Labels, GoCounter>,
    /// Sessions registered now.
    pub sessions: Gauge,
    /// Streams dialed through this server and still open.
    pub streams: Gauge,
    /// Streams whose peer we asked to pause, summed at the last scrape of session stats.
    pub streams_paused_by_us: Gauge,
    /// Streams the peer asked us to pause.
    pub streams_paused_by_peer: Gauge,
    /// Received bytes waiting for readers, over all sessions.
    pub buffered_bytes: Gauge,
    /// Time from a dial to the first bytes or error from the far side (the dial's outcome,
    /// as the dialer can see it), or to the connection being dropped before either; for
    /// connections made through a [`Dialer`](crate::Dialer)'s connector (the /client route).
    pub dial_seconds: Histogram,
    /// Connections refused at the handshake, by reason.
    pub handshake_rejects: Family<Labels, GoCounter>,
    /// Tasks alive in the tokio runtime (at the last scrape); a leak shows as growth.
    pub runtime_alive_tasks: Gauge,
    /// Limits the peers hit after the handshake, by limit (the `Config` field's name).
    pub limit_exceeded: Family<Labels, GoCounter>,
    /// Whether the connection counters carry the target address (Go's `addr` label).
    per_address: bool,
    /// Sessions that ended, by why ([`SessionEnd::kind`](rd_proto::SessionEnd::kind)):
    /// `unresponsive` is a dead link found by the answer timeout.
    pub sessions_ended: Family<Labels, GoCounter>,
    /// Outgoing peer links configured now, by source (`static` or `dns`).
    pub peer_links: Family<Labels, Gauge>,
    /// Outgoing peer links added, by source.
    pub peer_links_added: Family<Labels, GoCounter>,
    /// Outgoing peer links removed, by source and why (`removed`: gone from the list or
    /// from DNS; `self`: the address reached this server; `replaced`: url or token changed).
    pub peer_links_removed: Family<Labels, GoCounter>,
    /// DNS peer discovery rounds, by result (`ok`, `failed`).
    pub peer_discovery_rounds: Family<Labels, GoCounter>,
    /// Streams dialed, by route: `local` (a session of the client on this server) or `peer`
    /// (a hop through the peer server that holds the client's session).
    pub dials: Family<Labels, GoCounter>,
    /// Replicas this server counts, itself included: what it tells rd agents to fill.
    pub replicas: Gauge,
    /// Agents (distinct client keys) with a session on this server (at the last scrape).
    pub agents: Gauge,
    /// Sessions registered since start; minus [`sessions_closed`](Self::sessions_closed) it
    /// is [`sessions`](Self::sessions) at every scrape.
    pub sessions_opened: Counter,
    /// Sessions that ended since start.
    pub sessions_closed: Counter,
    /// Streams opened since start (dialed here or asked for by the peer); minus
    /// [`streams_closed`](Self::streams_closed) it is [`streams`](Self::streams) at every
    /// scrape.
    pub streams_opened: Counter,
    /// Streams closed since start.
    pub streams_closed: Counter,
    /// Completed uses of the tunnel (a `/client` request, a CONNECT, a SOCKS5 connection, a
    /// forwarded connection), by origin (`client`, `connect`, `socks5`, `forward`) and outcome.
    pub tunnel_uses: Family<Labels, Counter>,
    /// How long each use took, by origin and outcome.
    pub tunnel_use_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// Dials refused before a stream existed, by reason (`max_pending_dials`, `no_session`,
    /// `draining`, `session`, `invalid_target`).
    pub dials_refused: Family<Labels, Counter>,
    /// Streams a leak guard closed, by guard (`idle_timeout`, `pending_dial_timeout`).
    pub streams_expired: Family<Labels, Counter>,
    /// The UDP forwards' flows and datagrams.
    pub udp: crate::metrics_udp::UdpMetrics,
    /// Sessions and streams per client key, for [`transient_client_keys`](Self::transient_client_keys).
    key_use: Arc<Mutex<HashMap<String, KeyUse>>>,
    /// Whether the series of a client key go away once its last session and stream end.
    transient_keys: bool,
}

/// What one client key has open now, and which connection series it made.
#[derive(Debug, Default)]
struct KeyUse {
    sessions: usize,
    streams: usize,
    peer: bool,
    /// `(proto, addr)` label values of its connection counters.
    conns: HashSet<(String, String)>,
}

/// The buckets of [`Metrics::tunnel_use_seconds`]: 1 ms to about 4.6 hours.
fn use_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 4.0, 12))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        Self::new_with(|_| {})
    }

    /// A fresh registry with every metric registered, plus what `extra` registers (for
    /// example process metrics or a build info metric from the binary).
    pub fn new_with(extra: impl FnOnce(&mut Registry)) -> Self {
        let mut registry = Registry::default();
        extra(&mut registry);
        let fam = Family::<Labels, GoCounter>::default;
        let m = Self {
            registry: Arc::new(Registry::default()),
            add_ws: fam(),
            remove_ws: fam(),
            add_conn: fam(),
            remove_conn: fam(),
            transmit_bytes: fam(),
            transmit_error_bytes: fam(),
            receive_bytes: fam(),
            peer_attempt: fam(),
            peer_connected: fam(),
            peer_disconnected: fam(),
            sessions: Gauge::default(),
            streams: Gauge::default(),
            streams_paused_by_us: Gauge::default(),
            streams_paused_by_peer: Gauge::default(),
            buffered_bytes: Gauge::default(),
            dial_seconds: Histogram::new(exponential_buckets(0.000_05, 4.0, 10)),
            handshake_rejects: fam(),
            runtime_alive_tasks: Gauge::default(),
            limit_exceeded: fam(),
            per_address: false,
            sessions_ended: fam(),
            peer_links: Family::default(),
            peer_links_added: fam(),
            peer_links_removed: fam(),
            peer_discovery_rounds: fam(),
            dials: fam(),
            replicas: Gauge::default(),
            agents: Gauge::default(),
            sessions_opened: Counter::default(),
            sessions_closed: Counter::default(),
            streams_opened: Counter::default(),
            streams_closed: Counter::default(),
            tunnel_uses: Family::default(),
            tunnel_use_seconds: Family::new_with_constructor(use_histogram as fn() -> Histogram),
            dials_refused: Family::default(),
            streams_expired: Family::default(),
            udp: Default::default(),
            key_use: Arc::default(),
            transient_keys: false,
        };
        let go: [(&str, &str, &Family<Labels, GoCounter>); 10] = [
            (
                "total_add_websocket_session",
                "Total count of added websocket sessions",
                &m.add_ws,
            ),
            (
                "total_remove_websocket_session",
                "Total count of removed websocket sessions",
                &m.remove_ws,
            ),
            (
                "total_add_connections",
                "Total count of added connections",
                &m.add_conn,
            ),
            (
                "total_remove_connections",
                "Total count of removed connections",
                &m.remove_conn,
            ),
            (
                "total_transmit_bytes",
                "Total bytes transmitted",
                &m.transmit_bytes,
            ),
            (
                "total_transmit_error_bytes",
                "Total error bytes transmitted",
                &m.transmit_error_bytes,
            ),
            (
                "total_receive_bytes",
                "Total bytes received",
                &m.receive_bytes,
            ),
            (
                "total_peer_ws_attempt",
                "Total count of attempts to establish websocket session to other rancher-server",
                &m.peer_attempt,
            ),
            (
                "total_peer_ws_connected",
                "Total count of connected websocket sessions to other rancher-server",
                &m.peer_connected,
            ),
            (
                "total_peer_ws_disconnected",
                "Total count of disconnected websocket sessions from other rancher-server",
                &m.peer_disconnected,
            ),
        ];
        {
            let sub = registry.sub_registry_with_prefix("session_server");
            for (name, help, family) in go {
                sub.register(name, help, family.clone());
            }
        }
        let rd = registry.sub_registry_with_prefix("rd");
        rd.register(
            "sessions",
            "Websocket sessions registered now",
            m.sessions.clone(),
        );
        rd.register(
            "streams",
            "Virtual connections dialed through this server and open now",
            m.streams.clone(),
        );
        rd.register(
            "streams_paused_by_us",
            "Open streams whose peer we asked to pause (at the last scrape)",
            m.streams_paused_by_us.clone(),
        );
        rd.register(
            "streams_paused_by_peer",
            "Open streams the peer asked us to pause (at the last scrape)",
            m.streams_paused_by_peer.clone(),
        );
        rd.register(
            "buffered_bytes",
            "Received bytes waiting for their readers, all sessions (at the last scrape)",
            m.buffered_bytes.clone(),
        );
        rd.register(
            "dial_seconds",
            "Time from a dial through a session to the first bytes or error from the far side",
            m.dial_seconds.clone(),
        );
        rd.register(
            "handshake_rejects",
            "Tunnel upgrade requests refused, by reason",
            m.handshake_rejects.clone(),
        );
        rd.register(
            "runtime_alive_tasks",
            "Tasks alive in the tokio runtime (at the last scrape)",
            m.runtime_alive_tasks.clone(),
        );
        rd.register(
            "limit_exceeded",
            "Limits peers hit in sessions (stream and session receive caps, streams, pending connects, message size)",
            m.limit_exceeded.clone(),
        );
        rd.register(
            "sessions_ended",
            "Sessions ended, by reason (local, peer_closed, keepalive_timeout, unresponsive, protocol, transport)",
            m.sessions_ended.clone(),
        );
        rd.register(
            "peer_links",
            "Outgoing peer links configured now, by source (static, dns)",
            m.peer_links.clone(),
        );
        rd.register(
            "peer_links_added",
            "Outgoing peer links added, by source (static, dns)",
            m.peer_links_added.clone(),
        );
        rd.register(
            "peer_links_removed",
            "Outgoing peer links removed, by source and reason (removed, self, replaced)",
            m.peer_links_removed.clone(),
        );
        rd.register(
            "dials",
            "Streams dialed through this server, by route: local (the client's session here) or peer (a hop through the replica that holds it)",
            m.dials.clone(),
        );
        rd.register(
            "replicas",
            "Replicas this server counts, itself included (rd peers with a live link, draining ones left out): what rd agents are told to hold a session with",
            m.replicas.clone(),
        );
        rd.register(
            "agents",
            "Agents (distinct client ids) with a session on this server, not counting peers (at the last scrape)",
            m.agents.clone(),
        );
        rd.register(
            "sessions_opened",
            "Sessions registered since start (minus rd_sessions_closed_total: rd_sessions)",
            m.sessions_opened.clone(),
        );
        rd.register(
            "sessions_closed",
            "Sessions that ended since start",
            m.sessions_closed.clone(),
        );
        rd.register(
            "streams_opened",
            "Streams opened since start (minus rd_streams_closed_total: rd_streams)",
            m.streams_opened.clone(),
        );
        rd.register(
            "streams_closed",
            "Streams closed since start",
            m.streams_closed.clone(),
        );
        rd.register(
            "tunnel_uses",
            "Completed uses of the tunnel by origin (client, connect, socks5, forward) and outcome (completed, refused, rejected, cut, timeout, failed)",
            m.tunnel_uses.clone(),
        );
        rd.register(
            "tunnel_use_seconds",
            "How long each use of the tunnel took, by origin and outcome",
            m.tunnel_use_seconds.clone(),
        );
        rd.register(
            "dials_refused",
            "Dials refused before a stream existed, by reason (max_pending_dials, no_session, draining, session, invalid_target)",
            m.dials_refused.clone(),
        );
        rd.register(
            "streams_expired",
            "Streams a leak guard closed, by guard (idle_timeout, pending_dial_timeout)",
            m.streams_expired.clone(),
        );
        rd.register(
            "peer_discovery_rounds",
            "DNS peer discovery rounds, by result (ok, failed)",
            m.peer_discovery_rounds.clone(),
        );
        m.udp.register(rd);
        Self {
            registry: Arc::new(registry),
            ..m
        }
    }

    /// Gives `session_server_total_add_connections` and `..._remove_connections` the target
    /// address in their `addr` label, as Go does. Off by default: whoever sends requests
    /// chooses the addresses, so every new one would be a new series kept forever (memory
    /// and scrape size grow without bound). Off, `addr` is empty, which Prometheus stores as
    /// no label, and the counters still sum per client and protocol.
    pub fn with_address_labels(mut self, on: bool) -> Self {
        self.per_address = on;
        self
    }

    /// Removes every series of a client key once its last session and stream have ended
    /// (`session_server_total_*{clientkey=...}`). Without agent authentication anyone who
    /// reaches the tunnel port chooses client keys, and each key would otherwise leave its
    /// series behind for good: 500 anonymous handshakes left 2,500 series. Off by default,
    /// as Go keeps every series; rd-server turns it on unless `--agent-tokens` bounds the
    /// keys. The counters of a key that comes back start again from zero (a counter reset
    /// to Prometheus, which `rate()` handles).
    pub fn transient_client_keys(mut self, on: bool) -> Self {
        self.transient_keys = on;
        self
    }

    /// The registry, to encode or to nest in an application's own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        prometheus_client::encoding::text::encode(&mut out, &self.registry).ok();
        out
    }

    pub(crate) fn session_added(&self, client_key: &str, peer: bool) {
        // Under the key table's lock, so a key's series are never removed between this and
        // the session's first bytes (see `forget_if_unused`).
        let mut keys = self.keys();
        let key = keys.entry(client_key.to_owned()).or_default();
        key.sessions += 1;
        key.peer |= peer;
        self.add_ws
            .get_or_create(&session_labels(client_key, peer))
            .inc();
        self.sessions_opened.inc();
        self.sessions.inc();
    }

    pub(crate) fn session_removed(&self, client_key: &str, peer: bool) {
        let mut keys = self.keys();
        self.remove_ws
            .get_or_create(&session_labels(client_key, peer))
            .inc();
        self.sessions_closed.inc();
        self.sessions.dec();
        if let Some(key) = keys.get_mut(client_key) {
            key.sessions = key.sessions.saturating_sub(1);
        }
        self.forget_if_unused(&mut keys, client_key);
    }

    fn keys(&self) -> std::sync::MutexGuard<'_, HashMap<String, KeyUse>> {
        self.key_use.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops a key's entry once nothing of it is open, and with
    /// [`transient_client_keys`](Self::transient_client_keys) its series too.
    fn forget_if_unused(&self, keys: &mut HashMap<String, KeyUse>, client_key: &str) {
        let Some(key) = keys.get(client_key) else {
            return;
        };
        if key.sessions > 0 || key.streams > 0 {
            return;
        }
        let Some(key) = keys.remove(client_key) else {
            return;
        };
        if !self.transient_keys || key.peer {
            return;
        }
        for peer in [false, true] {
            let labels = session_labels(client_key, peer);
            self.add_ws.remove(&labels);
            self.remove_ws.remove(&labels);
        }
        for (proto, addr) in &key.conns {
            let labels = conn_labels(client_key, proto, addr);
            self.add_conn.remove(&labels);
            self.remove_conn.remove(&labels);
        }
        let labels = vec![("clientkey", client_key.to_owned())];
        self.transmit_bytes.remove(&labels);
        self.transmit_error_bytes.remove(&labels);
        self.receive_bytes.remove(&labels);
    }

    /// Sessions and streams opened minus closed, as the gauges show them: set at scrape so
    /// they always reconcile with the counters.
    pub(crate) fn reconcile(&self) {
        let open = |opened: &Counter, closed: &Counter| {
            i64::try_from(opened.get().saturating_sub(closed.get())).unwrap_or(i64::MAX)
        };
        self.sessions
            .set(open(&self.sessions_opened, &self.sessions_closed));
        self.streams
            .set(open(&self.streams_opened, &self.streams_closed));
    }

    /// Counts one use of the tunnel that is over, in `rd_tunnel_uses_total` and
    /// `rd_tunnel_use_seconds`: `origin` is the gateway entry (`connect`, `forward`,
    /// `/client`, ...), `outcome` how it ended, `took` its length in seconds. A gateway
    /// built on the library counts its uses here as rd's own does.
    pub fn tunnel_used(&self, origin: &'static str, outcome: &str, took: f64) {
        let labels = vec![
            ("origin", origin.to_owned()),
            ("outcome", outcome.to_owned()),
        ];
        self.tunnel_uses.get_or_create(&labels).inc();
        self.tunnel_use_seconds.get_or_create(&labels).observe(took);
    }

    pub(crate) fn dial_refused(&self, reason: &'static str) {
        self.dials_refused
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    pub(crate) fn stream_expired(&self, guard: &'static str) {
        self.streams_expired
            .get_or_create(&vec![("guard", guard.to_owned())])
            .inc();
    }

    fn addr_label<'a>(&self, addr: &'a str) -> &'a str {
        if self.per_address {
            addr
        } else {
            ""
        }
    }

    pub(crate) fn connection_added(&self, client_key: &str, proto: &str, addr: &str) {
        let addr = self.addr_label(addr);
        let mut keys = self.keys();
        // A key's entry exists while a session of it does: no allocation per stream.
        if !keys.contains_key(client_key) {
            keys.insert(client_key.to_owned(), KeyUse::default());
        }
        if let Some(key) = keys.get_mut(client_key) {
            key.streams += 1;
            if self.transient_keys && !key.conns.iter().any(|(p, a)| p == proto && a == addr) {
                key.conns.insert((proto.to_owned(), addr.to_owned()));
            }
        }
        self.add_conn
            .get_or_create(&conn_labels(client_key, proto, addr))
            .inc();
        self.streams_opened.inc();
        self.streams.inc();
    }

    pub(crate) fn connection_removed(&self, client_key: &str, proto: &str, addr: &str) {
        let mut keys = self.keys();
        self.remove_conn
            .get_or_create(&conn_labels(client_key, proto, self.addr_label(addr)))
            .inc();
        self.streams_closed.inc();
        self.streams.dec();
        if let Some(key) = keys.get_mut(client_key) {
            key.streams = key.streams.saturating_sub(1);
        }
        self.forget_if_unused(&mut keys, client_key);
    }

    /// The byte counters of one client key. They are bumped on every read and write, so a
    /// session resolves them once instead of building labels and looking them up each time
    /// (a `GoCounter` clone shares its series).
    pub(crate) fn byte_counters(&self, client_key: &str) -> ByteCounters {
        let labels = vec![("clientkey", client_key.to_owned())];
        ByteCounters {
            transmit: self.transmit_bytes.get_or_create(&labels).clone(),
            transmit_error: self.transmit_error_bytes.get_or_create(&labels).clone(),
            receive: self.receive_bytes.get_or_create(&labels).clone(),
        }
    }

    pub(crate) fn peer_attempt(&self, peer: &str) {
        self.peer_attempt
            .get_or_create(&vec![("peer", peer.to_owned())])
            .inc();
    }

    pub(crate) fn peer_connected(&self, peer: &str) {
        self.peer_connected
            .get_or_create(&vec![("peer", peer.to_owned())])
            .inc();
    }

    pub(crate) fn peer_disconnected(&self, peer: &str) {
        self.peer_disconnected
            .get_or_create(&vec![("peer", peer.to_owned())])
            .inc();
    }

    pub(crate) fn limit_hit(&self, limit: &'static str) {
        self.limit_exceeded
            .get_or_create(&vec![("limit", limit.to_owned())])
            .inc();
    }

    pub(crate) fn session_ended(&self, reason: &'static str) {
        self.sessions_ended
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }

    pub(crate) fn peer_link_added(&self, source: &'static str) {
        self.peer_links_added
            .get_or_create(&vec![("source", source.to_owned())])
            .inc();
        self.peer_links
            .get_or_create(&vec![("source", source.to_owned())])
            .inc();
    }

    pub(crate) fn peer_link_removed(&self, source: &'static str, reason: &'static str) {
        self.peer_links_removed
            .get_or_create(&vec![
                ("source", source.to_owned()),
                ("reason", reason.to_owned()),
            ])
            .inc();
        self.peer_links
            .get_or_create(&vec![("source", source.to_owned())])
            .dec();
    }

    pub(crate) fn peer_discovery_round(&self, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.peer_discovery_rounds
            .get_or_create(&vec![("result", result.to_owned())])
            .inc();
    }

    pub(crate) fn dialed(&self, via_peer: bool) {
        let route = if via_peer { "peer" } else { "local" };
        self.dials
            .get_or_create(&vec![("route", route.into())])
            .inc();
    }

    pub(crate) fn handshake_rejected(&self, reason: &'static str) {
        self.handshake_rejects
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }
}

/// Go's per-client byte counters for one client key; see [`Metrics::byte_counters`].
#[derive(Debug, Clone)]
pub(crate) struct ByteCounters {
    /// `session_server_total_transmit_bytes`.
    pub(crate) transmit: GoCounter,
    /// `session_server_total_transmit_error_bytes`.
    pub(crate) transmit_error: GoCounter,
    /// `session_server_total_receive_bytes`.
    pub(crate) receive: GoCounter,
}

fn session_labels(client_key: &str, peer: bool) -> Labels {
    vec![
        ("clientkey", client_key.to_owned()),
        ("peer", peer.to_string()),
    ]
}

fn conn_labels(client_key: &str, proto: &str, addr: &str) -> Labels {
    vec![
        ("clientkey", client_key.to_owned()),
        ("proto", proto.to_owned()),
        ("addr", addr.to_owned()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_names_without_total_suffix() {
        let m = Metrics::new().with_address_labels(true);
        m.session_added("foo", false);
        m.connection_added("foo", "tcp", "127.0.0.1:8125");
        m.byte_counters("foo").transmit.inc_by(42);
        let text = m.encode();
        assert!(
            text.contains(
                "session_server_total_add_websocket_session{clientkey=\"foo\",peer=\"false\"} 1\n"
            ),
            "{text}"
        );
        assert!(text.contains(
            "session_server_total_add_connections{clientkey=\"foo\",proto=\"tcp\",addr=\"127.0.0.1:8125\"} 1\n"
        ));
        assert!(text.contains("session_server_total_transmit_bytes{clientkey=\"foo\"} 42\n"));
        assert!(text.contains("rd_sessions 1\n"));
        assert!(text.contains("rd_streams 1\n"));
        // Families without samples are left out (as Go's client does with empty vectors).
        assert!(!text.contains("session_server_total_peer_ws_disconnected"));
        m.peer_disconnected("second");
        let text = m.encode();
        assert!(text.contains("# HELP session_server_total_peer_ws_disconnected"));
        assert!(text.contains("session_server_total_peer_ws_disconnected{peer=\"second\"} 1\n"));
    }

    #[test]
    fn addresses_make_no_series_by_default() {
        let m = Metrics::new();
        for port in 1..=100 {
            m.connection_added("foo", "tcp", &format!("127.0.0.1:{port}"));
        }
        let text = m.encode();
        assert!(
            text.contains(
                "session_server_total_add_connections{clientkey=\"foo\",proto=\"tcp\",addr=\"\"} 100\n"
            ),
            "{text}"
        );
    }
}
