//! The UDP forwards' metrics: flows and datagrams ([`crate::gateway::forward_udp`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, String)>;

/// Flows and datagrams of every UDP forward of a server ([`Metrics::udp`](crate::Metrics::udp)).
#[derive(Debug, Clone, Default)]
pub struct UdpMetrics {
    /// Flows opened (a user's source address got a tunnel stream).
    pub flows_opened: Counter,
    /// Flows open now.
    pub flows: Gauge,
    /// Datagrams carried, by direction: `in` (from users, sent towards the agent) and
    /// `out` (from the agent, sent back to users).
    pub datagrams: Family<Labels, Counter>,
    /// Datagrams dropped, by reason: `max_flows` (a new source beyond the bound),
    /// `congested` (the flow's queue towards the tunnel was full), `no_session` (the agent
    /// is not connected), `udp_not_supported` (a Go agent), `refused` (another dial
    /// refusal), `too_large` (beyond 65,507 bytes).
    pub dropped: Family<Labels, Counter>,
}

impl UdpMetrics {
    pub(crate) fn register(&self, rd: &mut Registry) {
        rd.register(
            "udp_flows_opened",
            "UDP forward flows opened (a user's source address got a tunnel stream)",
            self.flows_opened.clone(),
        );
        rd.register(
            "udp_flows",
            "UDP forward flows open now",
            self.flows.clone(),
        );
        rd.register(
            "udp_datagrams",
            "Datagrams carried by UDP forwards, by direction (in: from users towards the agent, out: back to users)",
            self.datagrams.clone(),
        );
        rd.register(
            "udp_datagrams_dropped",
            "Datagrams UDP forwards dropped, by reason (max_flows, congested, no_session, udp_not_supported, refused, too_large)",
            self.dropped.clone(),
        );
    }

    pub(crate) fn datagram(&self, direction: &'static str) {
        self.datagrams
            .get_or_create(&vec![("direction", direction.to_owned())])
            .inc();
    }

    pub(crate) fn drop_one(&self, reason: &'static str) {
        self.dropped
            .get_or_create(&vec![("reason", reason.to_owned())])
            .inc();
    }
}
