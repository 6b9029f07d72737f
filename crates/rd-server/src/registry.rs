//! The session manager's tables. Held under a `std` mutex for map operations only: nothing
//! here awaits or touches a socket. Announcements to peer links are queued into those
//! sessions' state machines (no IO; their drivers write them later), which keeps their
//! order consistent with the table without letting a slow peer stall registration.

use std::collections::{HashMap, HashSet};

use rd_proto::ClientSession;
use rd_session::SessionHandle;

/// An incoming link from a peer server, and the clients it announced.
#[derive(Debug)]
struct PeerSession {
    handle: SessionHandle,
    routes: HashMap<String, HashSet<i64>>,
}

/// Where a dial for a client key goes.
#[derive(Debug, Clone)]
pub(crate) enum Route {
    /// A session of the client on this server.
    Local(SessionHandle),
    /// A peer server's link that announced the client.
    Peer(SessionHandle),
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Client sessions by key, oldest first: dials use the oldest live one, as Go.
    clients: HashMap<String, Vec<SessionHandle>>,
    /// Incoming peer links, oldest first: the first that announced a client routes it.
    peers: Vec<PeerSession>,
    /// Our outgoing peer links, told about every client session.
    listeners: Vec<(u64, SessionHandle)>,
    next_listener: u64,
    /// Draining: our clients were withdrawn from the peers, and none is announced again.
    withdrawn: bool,
}

fn announcement(h: &SessionHandle) -> ClientSession {
    ClientSession {
        client_key: h.client_key().to_owned(),
        session_key: h.session_key(),
    }
}

impl Registry {
    pub(crate) fn add_client(&mut self, handle: SessionHandle) {
        if !self.withdrawn {
            for (_, link) in &self.listeners {
                link.announce(announcement(&handle), true);
            }
        }
        self.clients
            .entry(handle.client_key().to_owned())
            .or_default()
            .push(handle);
    }

    pub(crate) fn remove_client(&mut self, handle: &SessionHandle) {
        let key = handle.client_key();
        if let Some(list) = self.clients.get_mut(key) {
            list.retain(|h| !h.same_session(handle));
            if list.is_empty() {
                self.clients.remove(key);
            }
        }
        for (_, link) in &self.listeners {
            link.announce(announcement(handle), false);
        }
    }

    pub(crate) fn add_peer_session(&mut self, handle: SessionHandle) {
        self.peers.push(PeerSession {
            handle,
            routes: HashMap::new(),
        });
    }

    pub(crate) fn remove_peer_session(&mut self, handle: &SessionHandle) {
        self.peers.retain(|p| !p.handle.same_session(handle));
    }

    /// Records an AddClient/RemoveClient received on peer link `link`.
    pub(crate) fn peer_announced(
        &mut self,
        link: &SessionHandle,
        client: ClientSession,
        added: bool,
    ) {
        let Some(peer) = self.peers.iter_mut().find(|p| p.handle.same_session(link)) else {
            return;
        };
        if added {
            peer.routes
                .entry(client.client_key)
                .or_default()
                .insert(client.session_key);
        } else if let Some(keys) = peer.routes.get_mut(&client.client_key) {
            keys.remove(&client.session_key);
            if keys.is_empty() {
                peer.routes.remove(&client.client_key);
            }
        }
    }

    pub(crate) fn route(&self, client_key: &str) -> Option<Route> {
        if let Some(h) = self
            .clients
            .get(client_key)
            .and_then(|l| l.iter().find(|h| !h.is_closed()))
        {
            return Some(Route::Local(h.clone()));
        }
        self.peers
            .iter()
            .find(|p| p.routes.contains_key(client_key) && !p.handle.is_closed())
            .map(|p| Route::Peer(p.handle.clone()))
    }

    /// Registers an outgoing peer link and queues AddClient for every current client.
    pub(crate) fn add_listener(&mut self, link: SessionHandle) -> u64 {
        if !self.withdrawn {
            for h in self.clients.values().flatten() {
                link.announce(announcement(h), true);
            }
        }
        let id = self.next_listener;
        self.next_listener += 1;
        self.listeners.push((id, link));
        id
    }

    pub(crate) fn remove_listener(&mut self, id: u64) {
        self.listeners.retain(|(i, _)| *i != id);
    }

    /// Tells every peer that our clients are gone (RemoveClient for each session), so
    /// peers route no new request through us while the sessions finish their streams;
    /// no client is announced again.
    pub(crate) fn withdraw_announcements(&mut self) {
        if self.withdrawn {
            return;
        }
        self.withdrawn = true;
        for h in self.clients.values().flatten() {
            for (_, link) in &self.listeners {
                link.announce(announcement(h), false);
            }
        }
    }

    /// Client sessions, and every peer link either way (incoming and outgoing).
    pub(crate) fn drain_view(&self) -> (Vec<SessionHandle>, Vec<SessionHandle>) {
        let clients = self.clients.values().flatten().cloned().collect();
        let links = self
            .peers
            .iter()
            .map(|p| p.handle.clone())
            .chain(self.listeners.iter().map(|(_, h)| h.clone()))
            .collect();
        (clients, links)
    }

    pub(crate) fn client_keys(&self) -> Vec<String> {
        self.clients.keys().cloned().collect()
    }

    pub(crate) fn sessions_of(&self, client_key: &str) -> Vec<SessionHandle> {
        self.clients.get(client_key).cloned().unwrap_or_default()
    }

    pub(crate) fn all_sessions(&self) -> Vec<SessionHandle> {
        let clients = self.clients.values().flatten().cloned();
        clients
            .chain(self.peers.iter().map(|p| p.handle.clone()))
            .collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.clients.is_empty() && self.peers.is_empty()
    }
}
