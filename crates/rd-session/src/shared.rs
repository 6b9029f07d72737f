//! The state the driver task and the stream handles share.
//!
//! As in quinn, the sans-IO session lives behind one `std` mutex that is only held for
//! synchronous state-machine calls, never across an `.await`. The driver task alone owns the
//! websocket; stream handles touch only the state and wake the driver when they leave it
//! something to send.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use rd_proto::{ConnId, Session, SessionEnd};
use tokio::sync::watch;

use crate::handle::PeerNotices;
use crate::observer::SessionObserver;

/// Wake-ups of a driver by stream handles and session handles, all sessions of the process.
static STREAM_WAKES: AtomicU64 = AtomicU64::new(0);

/// Polls of a driver, all sessions of the process.
pub(crate) static DRIVER_POLLS: AtomicU64 = AtomicU64::new(0);

/// How often the sessions' drivers ran, for benchmarks and metrics (process-wide counters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct DriverStats {
    /// Times a stream or session handle woke a driver: each is a hop to the driver's task,
    /// often on another worker thread.
    pub stream_wakes: u64,
    /// Times a driver was polled (by those wake-ups, socket readiness and timers).
    pub polls: u64,
}

/// The process's [`DriverStats`] so far.
pub fn driver_stats() -> DriverStats {
    DriverStats {
        stream_wakes: STREAM_WAKES.load(Ordering::Relaxed),
        polls: DRIVER_POLLS.load(Ordering::Relaxed),
    }
}

#[derive(Debug, Default)]
pub(crate) struct Wakers {
    pub(crate) read: Option<Waker>,
    pub(crate) write: Option<Waker>,
    /// A task waiting for the stream to leave the wire ([`crate::TunnelStream::poll_closed`]).
    pub(crate) closed: Option<Waker>,
    /// A task waiting for the peer's dial to succeed or fail
    /// ([`crate::TunnelStream::poll_established`]): woken with the reader.
    pub(crate) established: Option<Waker>,
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
    /// Times handles woke this session's driver ([`crate::SessionHandle::driver_wakes`]).
    pub(crate) wakes: u64,
}

impl Inner {
    /// Wakes the driver (a cross-thread hop when it runs on another worker): for calls that
    /// change what the driver must do whatever the state machine's queues say (a close).
    pub(crate) fn wake_driver(&mut self) {
        if let Some(w) = &self.driver {
            STREAM_WAKES.fetch_add(1, Ordering::Relaxed);
            self.wakes += 1;
            w.wake_by_ref();
        }
    }

    /// Runs an application call on the state machine and wakes the driver only if the call
    /// owes it a turn: it left something to send where there was nothing (while there was,
    /// the driver has not finished draining and comes back by itself: every way its turn
    /// ends with output left registers a waker or yields), or it queued events. A read that
    /// queued no credit grant, and a write to a stream whose Data is still being drained,
    /// cost no wake-up.
    pub(crate) fn call<R>(&mut self, f: impl FnOnce(&mut Session) -> R) -> R {
        let had_output = self.proto.has_output();
        let r = f(&mut self.proto);
        if (!had_output && self.proto.has_output()) || self.proto.has_events() {
            self.wake_driver();
        }
        r
    }

    pub(crate) fn wake_stream(&mut self, id: ConnId, read: bool, write: bool) {
        if let Some(w) = self.streams.get_mut(&id) {
            if read {
                if let Some(r) = w.read.take() {
                    r.wake();
                }
                if let Some(e) = w.established.take() {
                    e.wake();
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
        set_waker(&mut self.streams.entry(id).or_default().closed, waker);
    }

    /// Registers the task waiting for the peer's dial to succeed or fail.
    pub(crate) fn register_established(&mut self, id: ConnId, waker: &Waker) {
        set_waker(&mut self.streams.entry(id).or_default().established, waker);
    }

    pub(crate) fn register(&mut self, id: ConnId, waker: &Waker, read: bool) {
        let entry = self.streams.entry(id).or_default();
        let slot = if read {
            &mut entry.read
        } else {
            &mut entry.write
        };
        set_waker(slot, waker);
    }
}

/// Keeps `waker` in `slot` (cloning only when it is another task's).
fn set_waker(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(w) if w.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
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
                wakes: 0,
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
