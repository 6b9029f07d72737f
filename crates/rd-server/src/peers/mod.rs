//! [`PeerSet`]: every peer of this server in one place, behind one mutex.
//!
//! It owns the outgoing links (static ones from [`Server::add_peer`](crate::Server::add_peer),
//! discovered ones from DNS), the live sessions of those links (told about every client
//! session: AddClient/RemoveClient), the incoming links of other servers with the clients
//! each announced (routes for dials), and the discovery state. The server asks it; nothing
//! else reaches into it. It knows nothing of the server or its dialers: peer-routed
//! Connects go to the [`ConnectHandler`] it was built with.

mod discovery;
mod link;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rd_proto::{ClientSession, Config};
use rd_session::transport::ConnectOptions;
use rd_session::{ConnectHandler, SessionHandle};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::constant_time_eq;
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::registry::{self, announcement, SharedRegistry};

pub use discovery::{
    DnsResolver, InvalidDiscovery, PeerDiscovery, Resolve, ResolveError, ResolveFuture,
    DEFAULT_DISCOVERY_INTERVAL,
};

/// Which outgoing link: a static peer by its id, or a discovered address.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum LinkKey {
    /// Configured with `add_peer(url, id, token)`.
    Static(String),
    /// Found through DNS; the peer's id is learned from its handshake.
    Dns(SocketAddr),
}

impl LinkKey {
    fn source(&self) -> &'static str {
        match self {
            Self::Static(_) => "static",
            Self::Dns(_) => "dns",
        }
    }

    /// The `peer` label of the Go peer metrics: the id of a static peer, the address of a
    /// discovered one (stable for the link's life; its id is known only once it answered).
    fn label(&self) -> String {
        match self {
            Self::Static(id) => id.clone(),
            Self::Dns(addr) => addr.to_string(),
        }
    }
}

/// An outgoing link as configured.
#[derive(Debug)]
struct Link {
    url: String,
    /// The token the peer must present when it links to us (static peers only).
    token: String,
    cancel: CancellationToken,
    /// The id the peer gave in its handshake (rd servers only).
    learned_id: Option<String>,
}

/// An outgoing peer link, as [`Server::peer_links`](crate::Server::peer_links) lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PeerLinkInfo {
    /// `static` (from `add_peer`) or `dns` (discovered).
    pub source: &'static str,
    /// The URL the link dials.
    pub url: String,
    /// The peer's id: the configured one for a static peer, the one it gave in its
    /// handshake for a discovered one (`None` until it answered, or for a Go server).
    pub id: Option<String>,
    /// Whether the link has a running session now.
    pub connected: bool,
}

/// An incoming link from a peer server, and the clients it announced.
#[derive(Debug)]
struct IncomingPeer {
    handle: SessionHandle,
    routes: HashMap<String, HashSet<i64>>,
}

/// What the peer headers of an upgrade request say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PeerCheck {
    /// No peer headers: a client.
    NotPeer,
    /// A peer with the right token.
    Peer(String),
    /// A discovered link that reached this server itself.
    ItsMe,
    /// Peer headers that do not match (Go then asks the authorizer, as here).
    Refused(&'static str),
}

#[derive(Debug, Default)]
struct State {
    links: HashMap<LinkKey, Link>,
    /// Running sessions of our outgoing links, told about every client session.
    live: Vec<(u64, LinkKey, SessionHandle)>,
    next_live: u64,
    /// Incoming peer links, oldest first: the first that announced a client routes it.
    incoming: Vec<IncomingPeer>,
    /// Discovered addresses that turned out to be this server: not dialed again while DNS
    /// lists them.
    own_addresses: HashSet<SocketAddr>,
    /// Client sessions (by session key) withdrawn from the links while draining: told gone,
    /// and never announced again.
    withdrawn: HashSet<i64>,
    /// The replica count last computed (see [`PeerSet::recount`]).
    replicas: u32,
}

/// Our own peer id and the token every peer shares.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) id: String,
    pub(crate) token: String,
}

/// How outgoing links connect and run.
pub(crate) struct LinkSettings {
    pub(crate) connect: ConnectOptions,
    pub(crate) session: Config,
    /// Serves peer-routed Connects (`clientKey::proto/address`) arriving on our links.
    /// The Connect handler of one link, given what the link negotiated.
    pub(crate) connects: ConnectsFactory,
}

struct Shared {
    identity: Option<Identity>,
    settings: LinkSettings,
    clients: SharedRegistry,
    metrics: Metrics,
    /// The server's lifecycle: links stop when it shuts down, and a peer's withdrawals are
    /// told to its subscribers.
    lifecycle: Arc<Lifecycle>,
    /// Whether DNS discovery is configured (incoming peers are then accepted by token).
    discovering: bool,
    /// False until the first discovery round completed (true without discovery).
    discovered_once: AtomicBool,
    /// When the first discovery round completed, and how long readiness then waits at most
    /// for the discovered peers to link back (see [`PeerSet::discovery_ready`]).
    converge: Mutex<(Option<std::time::Instant>, std::time::Duration)>,
    state: Mutex<State>,
}

/// Builds a link's Connect handler from the extensions the link negotiated.
pub(crate) type ConnectsFactory =
    Arc<dyn Fn(&rd_session::Extensions) -> Arc<dyn ConnectHandler> + Send + Sync>;

/// Whether a link session's peer said it is going away (a draining replica).
fn going_away(h: &SessionHandle) -> bool {
    h.peer_going_away().is_some()
}

/// The peers of one server. Cheap to clone; clones share everything.
#[derive(Clone)]
pub(crate) struct PeerSet(Arc<Shared>);

impl std::fmt::Debug for PeerSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerSet")
            .field("id", &self.0.identity.as_ref().map(|i| &i.id))
            .finish_non_exhaustive()
    }
}

impl PeerSet {
    pub(crate) fn new(
        identity: Option<Identity>,
        settings: LinkSettings,
        clients: SharedRegistry,
        metrics: Metrics,
        lifecycle: Arc<Lifecycle>,
        discovering: bool,
    ) -> Self {
        metrics.replicas.set(1);
        Self(Arc::new(Shared {
            identity,
            settings,
            clients,
            metrics,
            lifecycle,
            discovering,
            discovered_once: AtomicBool::new(!discovering),
            converge: Mutex::new((None, std::time::Duration::ZERO)),
            state: Mutex::new(State {
                replicas: 1,
                ..State::default()
            }),
        }))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn identity(&self) -> Option<&Identity> {
        self.0.identity.as_ref()
    }

    /// Starts DNS discovery (a task until shutdown). Needs a tokio runtime.
    pub(crate) fn start_discovery(&self, discovery: PeerDiscovery) {
        // Peers find a new replica at their next round; give them two, and a moment to link.
        self.converge().1 = discovery.period() * 2 + std::time::Duration::from_secs(1);
        let span = tracing::info_span!(parent: None, "peer_discovery", name = %discovery.name());
        tokio::spawn(discovery::run(self.clone(), discovery).instrument(span));
    }

    fn converge(&self) -> MutexGuard<'_, (Option<std::time::Instant>, std::time::Duration)> {
        self.0.converge.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether discovery lets this server be ready (always true without discovery): the
    /// first round is done, and every discovered rd peer has linked back to us, so that
    /// requests entering here reach the other replicas' clients; or, if some peer does not
    /// link back (down, or a Go server), two discovery intervals have passed since.
    pub(crate) fn discovery_ready(&self) -> bool {
        if !self.0.discovered_once.load(Ordering::SeqCst) {
            return false;
        }
        if !self.0.discovering || self.linked_back() {
            return true;
        }
        let (first, bound) = *self.converge();
        first.is_none_or(|t| t.elapsed() >= bound)
    }

    /// Every discovered link is up, and each peer that gave its id has a live link to us.
    fn linked_back(&self) -> bool {
        let state = self.state();
        state
            .links
            .iter()
            .filter(|(key, _)| matches!(key, LinkKey::Dns(_)))
            .all(|(key, link)| {
                let live = state
                    .live
                    .iter()
                    .any(|(_, k, h)| k == key && !h.is_closed());
                live && link.learned_id.as_deref().is_none_or(|id| {
                    state
                        .incoming
                        .iter()
                        .any(|p| p.handle.client_key() == id && !p.handle.is_closed())
                })
            })
    }

    // ---- outgoing links -------------------------------------------------------------

    /// Starts (or restarts, if its url or token changed) the link to static peer `id`.
    pub(crate) fn add_static(&self, url: String, id: String, token: String) {
        if self.0.identity.is_none() {
            tracing::warn!(peer = %id, "ignoring peer: this server has no peer id and token");
            return;
        }
        let key = LinkKey::Static(id);
        let mut state = self.state();
        if let Some(existing) = state.links.get(&key) {
            if existing.url == url && existing.token == token {
                return;
            }
        }
        if let Some(old) = state.links.remove(&key) {
            old.cancel.cancel();
            self.0.metrics.peer_link_removed(key.source(), "replaced");
        }
        self.start_link(&mut state, key, url, token);
    }

    /// Stops the link to static peer `id`.
    pub(crate) fn remove_static(&self, id: &str) {
        self.remove_link(&LinkKey::Static(id.to_owned()), "removed");
    }

    /// Makes the discovered links those of `addresses`: a link for each new address that
    /// is not this server, none for addresses gone from DNS.
    pub(crate) fn set_discovered(
        &self,
        addresses: &HashSet<SocketAddr>,
        url_for: impl Fn(SocketAddr) -> String,
    ) {
        let Some(identity) = self.0.identity.clone() else {
            return;
        };
        let mut state = self.state();
        state.own_addresses.retain(|a| addresses.contains(a));
        let gone: Vec<LinkKey> = state
            .links
            .keys()
            .filter(|k| matches!(k, LinkKey::Dns(a) if !addresses.contains(a)))
            .cloned()
            .collect();
        for key in gone {
            if let Some(link) = state.links.remove(&key) {
                link.cancel.cancel();
                self.0.metrics.peer_link_removed(key.source(), "removed");
                tracing::info!(peer = %key.label(), id = link.learned_id.as_deref(), "peer gone from DNS: link removed");
            }
        }
        for &addr in addresses {
            let key = LinkKey::Dns(addr);
            if state.links.contains_key(&key) || state.own_addresses.contains(&addr) {
                continue;
            }
            tracing::info!(peer = %addr, "peer found in DNS: link added");
            self.start_link(&mut state, key, url_for(addr), identity.token.clone());
        }
    }

    pub(crate) fn discovery_round_done(&self) {
        if !self.0.discovered_once.swap(true, Ordering::SeqCst) {
            self.converge().0 = Some(std::time::Instant::now());
        }
    }

    fn start_link(&self, state: &mut State, key: LinkKey, url: String, token: String) {
        let cancel = self.0.lifecycle.stopped().child_token();
        state.links.insert(
            key.clone(),
            Link {
                url: url.clone(),
                token,
                cancel: cancel.clone(),
                learned_id: None,
            },
        );
        self.0.metrics.peer_link_added(key.source());
        let span = tracing::info_span!(parent: None, "peer", peer = %key.label(), %url);
        tokio::spawn(link::run(self.clone(), key, url, cancel).instrument(span));
    }

    fn remove_link(&self, key: &LinkKey, reason: &'static str) {
        if let Some(link) = self.state().links.remove(key) {
            link.cancel.cancel();
            self.0.metrics.peer_link_removed(key.source(), reason);
        }
    }

    /// A discovered address answered with our own id: forget its link, and do not dial it
    /// again while DNS lists it.
    fn found_self(&self, key: &LinkKey) {
        if let LinkKey::Dns(addr) = key {
            self.state().own_addresses.insert(*addr);
        }
        self.remove_link(key, "self");
    }

    fn learned(&self, key: &LinkKey, id: Option<String>) {
        if let Some(link) = self.state().links.get_mut(key) {
            link.learned_id = id;
        }
        self.recount();
    }

    // ---- the replica count ----------------------------------------------------------

    /// Replicas this server counts, itself included: the distinct rd servers (those that
    /// gave their id) it has a live outgoing link with, left out those that said they are
    /// going away. What an rd agent is told to hold a session with.
    pub(crate) fn replica_count(&self) -> u32 {
        self.state().replicas
    }

    fn count_replicas(state: &State) -> u32 {
        let ids: HashSet<&str> = state
            .live
            .iter()
            .filter(|(_, _, h)| !h.is_closed() && !going_away(h))
            .filter_map(|(_, key, _)| state.links.get(key)?.learned_id.as_deref())
            .collect();
        u32::try_from(ids.len() + 1).unwrap_or(u32::MAX)
    }

    /// Computes the replica count again (a link came or went, a peer said it is going
    /// away) and, if it changed, tells every rd agent of ours (a Replicas message on each
    /// session that negotiated the extension; the others ignore the call). Under the
    /// registry's lock, then ours (the lock order), from the computation to the last
    /// message: two recounts at once cannot tell the agents their counts out of order.
    pub(crate) fn recount(&self) {
        let clients = registry::lock(&self.0.clients);
        let changed = {
            let mut state = self.state();
            let count = Self::count_replicas(&state);
            (std::mem::replace(&mut state.replicas, count) != count).then_some(count)
        };
        let Some(count) = changed else { return };
        self.0.metrics.replicas.set(i64::from(count));
        tracing::info!(
            replicas = count,
            "replica count changed: telling the agents"
        );
        for h in clients.all_sessions() {
            h.announce_replicas(count);
        }
    }

    /// Registers a running link session and queues AddClient for every client session now
    /// (under the registry's lock, then ours: see the lock order in `registry`).
    fn link_up(&self, key: &LinkKey, session: SessionHandle) -> u64 {
        let clients = registry::lock(&self.0.clients);
        let mut state = self.state();
        for h in clients.all_sessions() {
            if !state.withdrawn.contains(&h.session_key()) {
                session.announce(announcement(&h), true);
            }
        }
        let id = state.next_live;
        state.next_live += 1;
        state.live.push((id, key.clone(), session));
        drop(state);
        drop(clients);
        self.recount();
        id
    }

    fn link_down(&self, id: u64) {
        self.state().live.retain(|(i, _, _)| *i != id);
        self.recount();
    }

    /// Tells every running link about a client session added or removed. The caller holds
    /// the registry's lock, so links see announcements in the registry's order.
    pub(crate) fn announce(&self, client: &SessionHandle, added: bool) {
        let mut state = self.state();
        if state.withdrawn.contains(&client.session_key()) {
            if !added {
                // Told gone already; the session has ended, so its key can go.
                state.withdrawn.remove(&client.session_key());
            }
            return;
        }
        for (_, _, link) in &state.live {
            link.announce(announcement(client), added);
        }
    }

    /// Tells every running link that `clients` (under the registry's lock) are gone, so
    /// peers route nothing new to them through us while a drain lets their streams finish;
    /// they are not announced again. Those withdrawn before are skipped.
    pub(crate) fn withdraw(&self, clients: &[SessionHandle]) {
        let mut state = self.state();
        let fresh: Vec<&SessionHandle> = clients
            .iter()
            .filter(|h| state.withdrawn.insert(h.session_key()))
            .collect();
        for (_, _, link) in &state.live {
            for h in &fresh {
                link.announce(announcement(h), false);
            }
        }
    }

    /// Whether `client` was withdrawn from the links ([`withdraw`](Self::withdraw)).
    pub(crate) fn is_withdrawn(&self, client: &SessionHandle) -> bool {
        self.state().withdrawn.contains(&client.session_key())
    }

    /// Whether a peer that is not going away announced a session of `client_key`: requests
    /// for it can go there instead of through a session of ours.
    pub(crate) fn routable_elsewhere(&self, client_key: &str) -> bool {
        self.state().incoming.iter().any(|p| {
            p.routes.contains_key(client_key) && !p.handle.is_closed() && !going_away(&p.handle)
        })
    }

    /// Whether any peer link is up, either way, to a peer that is not going away: whether
    /// a draining server has anywhere to hand its agents over to.
    pub(crate) fn has_live_peer(&self) -> bool {
        let state = self.state();
        let live = |h: &SessionHandle| !h.is_closed() && !going_away(h);
        state.incoming.iter().any(|p| live(&p.handle)) || state.live.iter().any(|(_, _, h)| live(h))
    }

    /// Tells every peer link, either way, that this server is going away (replicas
    /// extension: Go peers and older rd ones are told nothing): peers stop counting it as a
    /// replica, and route through it only what no other peer can take.
    pub(crate) fn go_away_links(&self, reason: &str) {
        for h in self.link_sessions() {
            h.go_away(reason);
        }
    }

    /// Every peer link session either way: incoming ones and our running outgoing ones.
    pub(crate) fn link_sessions(&self) -> Vec<SessionHandle> {
        let state = self.state();
        state
            .incoming
            .iter()
            .map(|p| p.handle.clone())
            .chain(state.live.iter().map(|(_, _, h)| h.clone()))
            .collect()
    }

    /// The outgoing links, for operators and tests.
    pub(crate) fn links(&self) -> Vec<PeerLinkInfo> {
        let state = self.state();
        let mut links: Vec<PeerLinkInfo> = state
            .links
            .iter()
            .map(|(key, link)| PeerLinkInfo {
                source: key.source(),
                url: link.url.clone(),
                id: match key {
                    LinkKey::Static(id) => Some(id.clone()),
                    LinkKey::Dns(_) => link.learned_id.clone(),
                },
                connected: state.live.iter().any(|(_, k, _)| k == key),
            })
            .collect();
        links.sort_by(|a, b| a.url.cmp(&b.url));
        links
    }

    // ---- incoming links -------------------------------------------------------------

    /// Whether an upgrade's peer headers (`id`, `token`) name a peer we accept.
    ///
    /// A static peer must present the token it was added with (Go). With DNS discovery,
    /// peers are not known in advance: any id presenting our own shared token is a peer,
    /// except our own id, which means a discovered address reached this server itself.
    pub(crate) fn check(&self, id: &str, token: &str) -> PeerCheck {
        let state = self.state();
        if let Some(link) = state.links.get(&LinkKey::Static(id.to_owned())) {
            return if constant_time_eq(link.token.as_bytes(), token.as_bytes()) {
                PeerCheck::Peer(id.to_owned())
            } else {
                PeerCheck::Refused("wrong peer token")
            };
        }
        drop(state);
        match &self.0.identity {
            Some(own) if self.0.discovering => {
                if !constant_time_eq(own.token.as_bytes(), token.as_bytes()) {
                    PeerCheck::Refused("wrong peer token")
                } else if own.id == id {
                    PeerCheck::ItsMe
                } else {
                    PeerCheck::Peer(id.to_owned())
                }
            }
            _ => PeerCheck::Refused("unknown peer id"),
        }
    }

    pub(crate) fn incoming_added(&self, handle: SessionHandle) {
        self.state().incoming.push(IncomingPeer {
            handle,
            routes: HashMap::new(),
        });
    }

    pub(crate) fn incoming_removed(&self, handle: &SessionHandle) {
        self.state()
            .incoming
            .retain(|p| !p.handle.same_session(handle));
    }

    /// Records an AddClient/RemoveClient received on incoming link `link`.
    pub(crate) fn announced(&self, link: &SessionHandle, client: ClientSession, added: bool) {
        let withdrawn = {
            let mut state = self.state();
            let Some(peer) = state
                .incoming
                .iter_mut()
                .find(|p| p.handle.same_session(link))
            else {
                return;
            };
            if added {
                peer.routes
                    .entry(client.client_key)
                    .or_default()
                    .insert(client.session_key);
                None
            } else if let Some(keys) = peer.routes.get_mut(&client.client_key) {
                keys.remove(&client.session_key);
                if keys.is_empty() {
                    peer.routes.remove(&client.client_key);
                }
                Some(client.client_key)
            } else {
                None
            }
        };
        if let Some(key) = withdrawn {
            // A proxy drops its idle pooled streams to the client then: reused, they would
            // keep a draining peer's session busy, and its agent from moving, until the
            // pool's idle timeout.
            self.0.lifecycle.peer_withdrew(&key);
        }
    }

    /// The first live incoming link that announced `client_key`, one whose peer is not
    /// going away if there is one (a draining peer serves an agent until it is reachable
    /// elsewhere, so it is the last resort, not no route).
    pub(crate) fn route(&self, client_key: &str) -> Option<SessionHandle> {
        let state = self.state();
        let mut announced = state
            .incoming
            .iter()
            .filter(|p| p.routes.contains_key(client_key) && !p.handle.is_closed())
            .map(|p| &p.handle);
        let first = announced.next()?;
        if !going_away(first) {
            return Some(first.clone());
        }
        Some(announced.find(|h| !going_away(h)).unwrap_or(first).clone())
    }

    pub(crate) fn incoming_sessions(&self) -> Vec<SessionHandle> {
        self.state()
            .incoming
            .iter()
            .map(|p| p.handle.clone())
            .collect()
    }
}
