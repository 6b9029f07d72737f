//! The state the driver task and the stream handles share.
//!
//! As in quinn, the sans-IO session lives behind one `std` mutex that is only held for
//! synchronous state-machine calls, never across an `.await`. The driver task alone owns the
//! websocket; stream handles touch only the state and wake the driver when they leave it
//! something to send.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use rd_proto::{ConnId, Session, SessionEnd};
use tokio::sync::watch;

use crate::handle::PeerNotices;
use crate::observer::SessionObserver;

#[derive(Debug, Default)]
pub(crate) struct Wakers {
    pub(crate) read: Option<Waker>,
    pub(crate) write: Option<Waker>,
    /// A task waiting for the stream to leave the wire ([`crate::TunnelStream::poll_closed`]).
    pub(crate) closed: Option<Waker>,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) proto: Session,
    pub(crate) driver: Option<Waker>,
    pub(crate) streams: HashMap<ConnId, Wakers>,
    /// The reason of a going-away close asked for by
    /// [`SessionHandle::close_going_away`](crate::SessionHandle::close_going_away): the
    /// driver sends it in the websocket Close frame (code 1001) instead of a bare Close.
    pub(crate) going_away: Option<String>,
    /// The status code of the peer's websocket Close frame, once one arrived.
    pub(crate) peer_close_code: Option<u16>,
}

impl Inner {
    /// Wakes the driver if the state machine has something for it to do.
    pub(crate) fn wake_driver(&mut self) {
        if let Some(w) = &self.driver {
            w.wake_by_ref();
        }
    }

    pub(crate) fn wake_stream(&mut self, id: ConnId, read: bool, write: bool) {
        if let Some(w) = self.streams.get_mut(&id) {
            if read {
                if let Some(r) = w.read.take() {
                    r.wake();
                }
            }
            if write {
                if let Some(wr) = w.write.take() {
                    wr.wake();
                }
            }
        }
    }

    /// The stream ended (or the session did): wakes everyone waiting on it.
    pub(crate) fn wake_ended(&mut self, id: ConnId) {
        self.wake_stream(id, true, true);
        if let Some(c) = self.streams.get_mut(&id).and_then(|w| w.closed.take()) {
            c.wake();
        }
    }

    /// Registers the task waiting for the stream to leave the wire.
    pub(crate) fn register_closed(&mut self, id: ConnId, waker: &Waker) {
        let slot = &mut self.streams.entry(id).or_default().closed;
        match slot {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }

    pub(crate) fn register(&mut self, id: ConnId, waker: &Waker, read: bool) {
        let entry = self.streams.entry(id).or_default();
        let slot = if read {
            &mut entry.read
        } else {
            &mut entry.write
        };
        match slot {
            Some(w) if w.will_wake(waker) => {}
            _ => *slot = Some(waker.clone()),
        }
    }
}

pub(crate) struct Shared {
    inner: Mutex<Inner>,
    pub(crate) ended: watch::Sender<Option<SessionEnd>>,
    /// What the peer said about itself (GoAway, Replicas); the driver publishes it. Made on
    /// first use: a server holds thousands of agent sessions whose notices nobody watches,
    /// and a watch channel costs a few hundred bytes each.
    notices: std::sync::OnceLock<watch::Sender<PeerNotices>>,
    pub(crate) session_key: i64,
    pub(crate) client_key: String,
    pub(crate) observer: Arc<dyn SessionObserver>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("client_key", &self.client_key)
            .finish()
    }
}

impl Shared {
    pub(crate) fn new(
        proto: Session,
        client_key: String,
        session_key: i64,
        observer: Arc<dyn SessionObserver>,
    ) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                proto,
                driver: None,
                streams: HashMap::new(),
                going_away: None,
                peer_close_code: None,
            }),
            ended: watch::Sender::new(None),
            notices: std::sync::OnceLock::new(),
            session_key,
            client_key,
            observer,
        })
    }

    /// The channel of the peer's notices.
    pub(crate) fn notices(&self) -> &watch::Sender<PeerNotices> {
        self.notices
            .get_or_init(|| watch::Sender::new(PeerNotices::default()))
    }

    /// Locks the state. A panic while holding the lock cannot leave the sans-IO state
    /// half-updated in a way later calls misread, so poisoning is ignored.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
