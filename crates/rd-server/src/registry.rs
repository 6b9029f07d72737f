//! The client sessions of this server, by client key. Held under a `std` mutex for map
//! operations only: nothing here awaits or touches a socket.
//!
//! Lock order: this registry's lock, then the [`PeerSet`](crate::peers::PeerSet)'s. A client
//! session is added and announced to the peer links under this lock, and a peer link that
//! comes up takes its snapshot of the clients under it, so every link sees each client's
//! AddClient and RemoveClient exactly once and in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rd_proto::ClientSession;
use rd_session::SessionHandle;

/// The registry shared by the server, its dialers and its peer set.
pub(crate) type SharedRegistry = Arc<Mutex<Registry>>;

/// Locks the registry; a panic elsewhere while it was held leaves consistent maps (every
/// operation is a single insert or remove), so a poisoned lock is taken over.
pub(crate) fn lock(registry: &SharedRegistry) -> MutexGuard<'_, Registry> {
    registry.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a peer link is told about a client session.
pub(crate) fn announcement(h: &SessionHandle) -> ClientSession {
    ClientSession {
        client_key: h.client_key().to_owned(),
        session_key: h.session_key(),
    }
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Client sessions by key, oldest first: dials use the oldest live one, as Go.
    clients: HashMap<String, Vec<SessionHandle>>,
}

impl Registry {
    pub(crate) fn add_client(&mut self, handle: SessionHandle) {
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
    }

    /// The oldest live session of `client_key` on this server.
    pub(crate) fn route(&self, client_key: &str) -> Option<SessionHandle> {
        self.clients
            .get(client_key)
            .and_then(|l| l.iter().find(|h| !h.is_closed()))
            .cloned()
    }

    pub(crate) fn client_keys(&self) -> Vec<String> {
        self.clients.keys().cloned().collect()
    }

    pub(crate) fn sessions_of(&self, client_key: &str) -> Vec<SessionHandle> {
        self.clients.get(client_key).cloned().unwrap_or_default()
    }

    pub(crate) fn all_sessions(&self) -> Vec<SessionHandle> {
        self.clients.values().flatten().cloned().collect()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}
