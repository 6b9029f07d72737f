//! The server's one lifecycle state (running, draining, shutting down), shared by the
//! server, its dial routing and its peer set, and the subscribers told when it changes.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::events::ServerEvents;

/// The drain began. Bits rather than a counter: a shutdown after a drain still routes
/// dials as the drain does, and a shutdown may come without a drain.
const DRAINING: u8 = 1;
/// The shutdown began: no new sessions.
const STOPPING: u8 = 2;

/// Where a server is in its life, as one set of bits that are only ever set: running
/// (none), draining, shutting down.
pub(crate) struct Lifecycle {
    state: AtomicU8,
    /// Cancelled when the shutdown begins; what background tasks (guards, discovery,
    /// peer links, forwards) stop on.
    stopped: CancellationToken,
    /// Woken when a stream or a session ends, so a drain notices promptly.
    pub(crate) wake: Arc<Notify>,
    subscribers: Mutex<Vec<Arc<dyn ServerEvents>>>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("state", &self.state.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            state: AtomicU8::new(0),
            stopped: CancellationToken::new(),
            wake: Arc::new(Notify::new()),
            subscribers: Mutex::new(Vec::new()),
        }
    }
}

impl Lifecycle {
    /// Whether new sessions are accepted at all (false once the shutdown began).
    pub(crate) fn is_accepting(&self) -> bool {
        self.state.load(Ordering::SeqCst) & STOPPING == 0
    }

    /// Whether the drain began (it stays true through the shutdown that follows it).
    pub(crate) fn is_draining(&self) -> bool {
        self.state.load(Ordering::SeqCst) & DRAINING != 0
    }

    /// The token cancelled when the shutdown begins.
    pub(crate) fn stopped(&self) -> &CancellationToken {
        &self.stopped
    }

    /// Begins the drain; tells the subscribers the first time.
    pub(crate) fn begin_drain(&self) {
        self.enter(DRAINING, |s| s.draining());
    }

    /// Begins the shutdown; tells the subscribers the first time.
    pub(crate) fn begin_shutdown(&self) {
        self.enter(STOPPING, |s| s.shutting_down());
        self.stopped.cancel();
    }

    /// Adds a subscriber; tells it at once of a drain or shutdown that began before.
    pub(crate) fn subscribe(&self, events: Arc<dyn ServerEvents>) {
        // The state is read under the lock `enter` sets it under, so an event racing the
        // subscription reaches the subscriber exactly once: from here or from `enter`.
        let state = {
            let mut subscribers = self.subscribers();
            subscribers.push(events.clone());
            self.state.load(Ordering::SeqCst)
        };
        if state & DRAINING != 0 {
            events.draining();
        }
        if state & STOPPING != 0 {
            events.shutting_down();
        }
    }

    pub(crate) fn session_added(&self, client_key: &str) {
        for s in self.subscribers().clone() {
            s.session_added(client_key);
        }
    }

    pub(crate) fn peer_withdrew(&self, client_key: &str) {
        for s in self.subscribers().clone() {
            s.peer_withdrew(client_key);
        }
    }

    /// Sets `bit`; the first time, tells the subscribers (outside the lock: a callback
    /// may subscribe).
    fn enter(&self, bit: u8, tell: impl Fn(&dyn ServerEvents)) {
        let told = {
            let subscribers = self.subscribers();
            if self.state.fetch_or(bit, Ordering::SeqCst) & bit != 0 {
                return;
            }
            subscribers.clone()
        };
        for s in told {
            tell(s.as_ref());
        }
    }

    fn subscribers(&self) -> std::sync::MutexGuard<'_, Vec<Arc<dyn ServerEvents>>> {
        self.subscribers.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Default)]
    struct Count {
        draining: AtomicUsize,
        stopping: AtomicUsize,
    }

    impl ServerEvents for Count {
        fn draining(&self) {
            self.draining.fetch_add(1, Ordering::SeqCst);
        }
        fn shutting_down(&self) {
            self.stopping.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn each_transition_is_told_once_to_early_and_late_subscribers() {
        let life = Lifecycle::default();
        let early = Arc::new(Count::default());
        life.subscribe(early.clone());
        assert!(life.is_accepting() && !life.is_draining());
        life.begin_drain();
        life.begin_drain();
        assert!(life.is_accepting() && life.is_draining());
        let late = Arc::new(Count::default());
        life.subscribe(late.clone());
        life.begin_shutdown();
        life.begin_shutdown();
        assert!(!life.is_accepting() && life.is_draining());
        assert!(life.stopped().is_cancelled());
        let last = Arc::new(Count::default());
        life.subscribe(last.clone());
        for c in [&early, &late, &last] {
            assert_eq!(c.draining.load(Ordering::SeqCst), 1);
            assert_eq!(c.stopping.load(Ordering::SeqCst), 1);
        }
    }

    #[test]
    fn a_shutdown_without_a_drain_is_not_a_drain() {
        let life = Lifecycle::default();
        life.begin_shutdown();
        assert!(!life.is_accepting() && !life.is_draining());
    }
}
