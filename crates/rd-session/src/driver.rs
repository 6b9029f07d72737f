//! The task that owns the websocket and moves bytes between it and the state machine.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use rd_proto::{ClientSession, Event, Limit, ProtocolError, SessionEnd, Transmit};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::frames::{FrameError, FrameReader, FrameWriter, Incoming};
use crate::incoming::{self, ConnectHandler};
use crate::shared::{Inner, Shared};
use crate::stream::TunnelStream;
use crate::websocket::WebSocketIo;

/// How much one poll of the driver may do before it gives other tasks a turn.
#[derive(Debug, Clone, Copy)]
struct TurnBudget {
    /// Websocket messages read per turn.
    read_messages: usize,
    /// Vectored writes per turn.
    writes: usize,
    /// Bytes of frames queued for the socket beyond which no more transmits are pulled
    /// from the state machine until the socket took them: what a message that becomes
    /// ready now (a small stream's request behind a bulk download) waits behind in this
    /// process, besides the socket's unsent bytes (`TCP_NOTSENT_LOWAT`).
    write_queue: usize,
    /// Bytes written after which the driver waits for the runtime to poll its I/O driver
    /// before writing more (see [`IoPolled`]).
    io_yield_bytes: usize,
    /// Turns per poll while there is progress; then the driver yields.
    turns_per_poll: usize,
}

const BUDGET: TurnBudget = TurnBudget {
    read_messages: 64,
    writes: 16,
    write_queue: 128 * 1024,
    io_yield_bytes: 1 << 20,
    turns_per_poll: 16,
};

/// How long a locally closed session may spend flushing its last messages.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Receives AddClient/RemoveClient announcements (`true` = added) from a peer server.
pub type AnnouncementFn = Arc<dyn Fn(ClientSession, bool) + Send + Sync>;

/// Drives one session: await it (or spawn it) and it runs until the session ends,
/// returning why. Built by [`SessionBuilder::start`](crate::SessionBuilder::start).
pub struct SessionDriver<S> {
    io: S,
    reader: FrameReader,
    writer: FrameWriter,
    /// A close frame was queued (local close).
    close_queued: bool,
    shared: Arc<Shared>,
    handler: Option<Arc<dyn ConnectHandler>>,
    on_announcement: Option<AnnouncementFn>,
    cancel: CancellationToken,
    timer: Pin<Box<Sleep>>,
    timer_at: Option<std::time::Instant>,
    close_deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes handed to the websocket since the runtime last polled its I/O driver for us.
    written_since_yield: usize,
    /// Set while writing waits for the runtime to poll its I/O driver.
    io_yield: Option<Arc<IoPolled>>,
    /// Events to act on once the state's lock is released.
    events: Vec<Event>,
    /// Limits hit, reported to the observer once the lock is released.
    limits: Vec<Limit>,
    pending_dials: Arc<AtomicUsize>,
    max_pending_connects: usize,
}

impl<S> fmt::Debug for SessionDriver<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionDriver")
            .field("session_key", &self.shared.session_key)
            .finish()
    }
}

pub(crate) fn now() -> std::time::Instant {
    // tokio's clock, so tests can pause and advance time.
    Instant::now().into_std()
}

impl<S> SessionDriver<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    pub(crate) fn new(
        ws: WebSocketIo<S>,
        server: bool,
        shared: Arc<Shared>,
        handler: Option<Arc<dyn ConnectHandler>>,
        on_announcement: Option<AnnouncementFn>,
        cancel: CancellationToken,
        max_pending_connects: usize,
    ) -> Self {
        let (io, read_ahead, limits) = ws.into_parts();
        Self {
            io,
            reader: FrameReader::new(server, limits, read_ahead),
            // The client side masks (RFC 6455 5.3).
            writer: FrameWriter::new(!server),
            close_queued: false,
            shared,
            handler,
            on_announcement,
            cancel,
            timer: Box::pin(tokio::time::sleep(Duration::from_secs(3600))),
            timer_at: None,
            close_deadline: None,
            written_since_yield: 0,
            io_yield: None,
            events: Vec::new(),
            limits: Vec::new(),
            pending_dials: Arc::new(AtomicUsize::new(0)),
            max_pending_connects,
        }
    }

    /// Handles one message or control frame; returns whether to read more now: the state
    /// machine wants input, and the message did not queue a control message (a Pause, say)
    /// that should go out before we read on (every further read lets the peer send more
    /// before it sees the Pause).
    fn on_incoming(
        &mut self,
        inner: &mut Inner,
        now: std::time::Instant,
        incoming: Incoming,
    ) -> bool {
        let control_was_queued = inner.proto.has_control_queued();
        match incoming {
            Incoming::Binary(bytes) => {
                if let Err(e) = inner.proto.handle_message(now, bytes) {
                    tracing::debug!(error = %e, "peer broke the protocol");
                }
            }
            Incoming::Ping(payload) => {
                // Answered as it is read: the pong is queued ahead of data frames, and
                // reading never waits for writing.
                self.writer.push_pong(payload);
                inner.proto.handle_keepalive(now);
                // Keepalive comes every few seconds: the clock for freeing the recycled
                // send buffers of a session that stopped sending.
                inner.proto.trim_buffers();
            }
            Incoming::Pong => {
                inner.proto.handle_pong(now);
                inner.proto.trim_buffers();
            }
            Incoming::Text => inner
                .proto
                .close(SessionEnd::Protocol(ProtocolError::TextFrame)),
            Incoming::Close(code) => {
                inner.peer_close_code = code;
                inner.proto.close(SessionEnd::PeerClosed);
            }
        }
        inner.proto.wants_input() && (control_was_queued || !inner.proto.has_control_queued())
    }

    /// Reads messages until the socket has none (its waker is then registered) or reading
    /// should pause. Returns whether another turn must read again: not after `Pending`,
    /// nor while the state machine refuses input (see [`turn`](Self::turn)).
    fn read(&mut self, cx: &mut Context<'_>, inner: &mut Inner) -> bool {
        if !inner.proto.wants_input() {
            // Replies are piling up unsent, or readers are at the ceiling: read again once
            // the write half has drained them or readers have read.
            return false;
        }
        // One clock reading per turn: a turn reads a batch in microseconds, and the clock
        // only feeds timers and rates measured in milliseconds.
        let now = now();
        for _ in 0..BUDGET.read_messages {
            match self.reader.poll_next(cx, &mut self.io) {
                Poll::Ready(Ok(incoming)) => {
                    if !self.on_incoming(inner, now, incoming) {
                        // A control message goes out first; then read on.
                        return true;
                    }
                    if inner.proto.end().is_some() {
                        return true;
                    }
                }
                Poll::Ready(Err(FrameError::TooLarge { size, max })) => {
                    self.limits.push(Limit::MaxMessageSize);
                    let err = ProtocolError::MessageTooLarge { size, max };
                    tracing::debug!(error = %err, "peer broke the protocol");
                    inner.proto.close(SessionEnd::Protocol(err));
                    return true;
                }
                Poll::Ready(Err(e)) => {
                    inner.proto.close(SessionEnd::Transport(e.to_string()));
                    return true;
                }
                Poll::Pending => return false,
            }
        }
        // Out of budget with more to read.
        true
    }

    /// Moves what the state machine has to send into the frame writer (up to
    /// [`TurnBudget::write_queue`] bytes ahead of the socket) and writes it. Returns whether
    /// another turn must write again: only when the budget ran out with more to send (a
    /// full socket, an empty queue and the I/O yield each leave a waker that brings the
    /// driver back).
    fn write(&mut self, cx: &mut Context<'_>, inner: &mut Inner) -> bool {
        if self
            .io_yield
            .as_ref()
            .is_some_and(|y| y.polled.load(Ordering::Acquire))
        {
            self.io_yield = None;
            self.written_since_yield = 0;
        }
        for _ in 0..BUDGET.writes {
            self.fill(cx, inner);
            if self.writer.is_empty() {
                return false;
            }
            let flushed = self.writer.poll_flush(cx, &mut self.io);
            // Written messages' buffers go back to the state machine, which encodes the
            // next Data messages into them (no allocation, and with glibc no fresh pages,
            // per message).
            for payload in self.writer.take_written() {
                if let Ok(buf) = payload.try_into_mut() {
                    inner.proto.recycle(buf);
                }
            }
            match flushed {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => {
                    inner.proto.close(SessionEnd::Transport(e.to_string()));
                    return true;
                }
                Poll::Pending => return false,
            }
            if self.io_yield.is_some() {
                return false;
            }
        }
        // Out of budget with more to write.
        inner.proto.has_output()
    }

    /// Pulls transmits from the state machine into the frame writer while its queue is
    /// short and the I/O yield allows.
    fn fill(&mut self, cx: &mut Context<'_>, inner: &mut Inner) {
        while self.writer.queued_bytes() < BUDGET.write_queue {
            if self.written_since_yield >= BUDGET.io_yield_bytes {
                // Pause and Resume from the peer reach us only once the runtime's I/O driver
                // has marked the socket readable, and a runtime kept busy (by this driver
                // and the writers it wakes, which wake it back) polls its I/O driver only
                // every few dozen task polls. Meanwhile we would keep sending a paused
                // stream's data, megabytes of it, until the peer resets the stream for
                // ignoring Pause. So after each io_yield_bytes, wait for that poll.
                if self.io_yield.is_none() {
                    self.io_yield = Some(IoPolled::after_next_io_poll(cx));
                }
                return;
            }
            match inner.proto.poll_transmit() {
                None => return,
                Some(Transmit::Message(bytes)) => {
                    tracing::trace!(target: "rd_proto::wire", len = bytes.len(), "sending");
                    tracing::trace!(target: "rd_proto::payload", message = ?bytes, "sending");
                    self.written_since_yield += bytes.len();
                    self.writer.push_binary(bytes);
                }
                Some(Transmit::Ping) => self.writer.push_ping(Bytes::new()),
            }
        }
    }

    /// Wakes the streams the state machine's events concern and keeps the rest for
    /// [`dispatch`](Self::dispatch), which runs without the lock.
    fn collect_events(&mut self, inner: &mut Inner) {
        while let Some(event) = inner.proto.poll_event() {
            match event {
                // A task waiting for the dial's outcome waits as the stream's reader.
                Event::StreamReadable { id } | Event::StreamAcknowledged { id } => {
                    inner.wake_stream(id, true, false)
                }
                Event::StreamWritable { id } => inner.wake_stream(id, false, true),
                Event::StreamClosed { id, ref end } => {
                    tracing::debug!(conn_id = %id, %end, "stream closed");
                    inner.wake_ended(id);
                }
                Event::LimitExceeded(limit) => self.limits.push(limit),
                other => self.events.push(other),
            }
        }
    }

    /// Acts on collected events: spawns the dial of each incoming stream, passes on
    /// announcements, reports limits. Takes locks of its own, so never under the state's.
    fn dispatch(&mut self) {
        for limit in self.limits.drain(..) {
            Self::log_limit(&self.shared, limit);
            self.shared.observer.limit_exceeded(limit);
        }
        for event in std::mem::take(&mut self.events) {
            match event {
                Event::StreamRequested { id, target } => {
                    let stream = TunnelStream::new(self.shared.clone(), id, target);
                    let in_flight = self.pending_dials.fetch_add(1, Ordering::Relaxed);
                    let pending = incoming::PendingDial(self.pending_dials.clone());
                    match &self.handler {
                        Some(_) if in_flight >= self.max_pending_connects => {
                            let text = format!(
                                "too many connects in flight: limit {}",
                                self.max_pending_connects
                            );
                            tracing::debug!(%id, "{text}");
                            stream.reset(&text);
                            self.shared
                                .observer
                                .limit_exceeded(Limit::MaxPendingConnects);
                        }
                        Some(handler) => {
                            tokio::spawn(incoming::serve(
                                handler.clone(),
                                stream,
                                self.cancel.clone(),
                                pending,
                            ));
                        }
                        None => stream.reset("connect not allowed"),
                    }
                }
                Event::ClientAdded(c) => {
                    if let Some(f) = &self.on_announcement {
                        f(c, true);
                    }
                }
                Event::ClientRemoved(c) => {
                    if let Some(f) = &self.on_announcement {
                        f(c, false);
                    }
                }
                Event::PeerGoingAway { reason } => {
                    tracing::debug!(%reason, "the peer is going away");
                    self.shared
                        .notices()
                        .send_modify(|n| n.going_away = Some(reason));
                }
                Event::ReplicasAnnounced(count) => {
                    self.shared
                        .notices()
                        .send_modify(|n| n.replicas = Some(count));
                }
                // The other end of the stall `log_limit` warned about.
                Event::ReadingResumed => tracing::info!(
                    client_key = %self.shared.client_key,
                    session_key = self.shared.session_key,
                    "session reads again: its readers caught up"
                ),
                _ => {}
            }
        }
    }

    /// Says in the log which session hit a limit that an operator should see. The session
    /// is named in the event itself rather than by an enclosing span: a server keeps no span
    /// per idle session at the default level (a span held by the subscriber costs about
    /// 2 KiB and a lock round per poll, for each of thousands of agents).
    fn log_limit(shared: &Shared, limit: Limit) {
        let (client_key, session_key) = (&shared.client_key, shared.session_key);
        match limit {
            Limit::SessionStall => tracing::warn!(
                client_key = %client_key,
                session_key,
                "session stops reading until its readers catch up: the peer sends on many \
                 streams beyond flow control"
            ),
            Limit::StreamReceiveCap | Limit::SessionReceiveCap => tracing::warn!(
                client_key = %client_key,
                session_key,
                limit = limit.name(),
                "reset a stream: the peer sent beyond flow control"
            ),
            // Refused connects and oversized messages: counted in metrics, and the latter
            // ends the session, which is logged with its reason.
            _ => tracing::debug!(limit = limit.name(), "limit hit"),
        }
    }

    /// Runs due timers and arms the sleep for the next one. True if it fired.
    fn timer(&mut self, cx: &mut Context<'_>, inner: &mut Inner) -> bool {
        let at = inner.proto.poll_timeout();
        if at.is_some_and(|at| at <= now()) {
            inner.proto.handle_timeout(now());
            return true;
        }
        // Every message from the peer moves the keepalive and answer deadlines (and a server
        // side's next ping) later. Re-arm at once: tokio moves an armed timer's deadline
        // later in place (one atomic; the wheel re-files the entry when its old slot comes
        // due, without waking us), while leaving the old deadline armed would wake this
        // task for nothing, every few seconds for each of thousands of idle sessions.
        if at != self.timer_at {
            self.timer_at = at;
            let deadline = at.map_or_else(
                || Instant::now() + Duration::from_secs(3600),
                Instant::from_std,
            );
            self.timer.as_mut().reset(deadline);
        }
        self.timer.as_mut().poll(cx).is_ready()
    }

    /// One turn under one lock: read, timers, write, collect events; then, unlocked, act on
    /// them. Returns whether anything moved, and the end once the session has ended.
    fn turn(&mut self, cx: &mut Context<'_>) -> (bool, Option<SessionEnd>) {
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        match &inner.driver {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inner.driver = Some(cx.waker().clone()),
        }
        // Another turn only where one is owed: a read or write that stopped with more to
        // do, a timer that fired (it is re-armed next turn), or input the write just made
        // welcome again. Everything else left a waker behind; an idle session's ping then
        // costs one turn, not a second that finds nothing.
        let mut progress = false;
        if inner.proto.end().is_none() {
            let refused_input = !inner.proto.wants_input();
            progress |= self.read(cx, &mut inner);
            progress |= self.timer(cx, &mut inner);
            progress |= self.write(cx, &mut inner);
            progress |= refused_input && inner.proto.wants_input();
        }
        self.collect_events(&mut inner);
        let ended = inner.proto.end().cloned();
        drop(inner);
        self.dispatch();
        (progress, ended)
    }

    /// After the state machine ended: flush what it still queued (a local close tells the
    /// peer about every stream) and a close frame, within [`CLOSE_GRACE`].
    fn poll_closing(&mut self, cx: &mut Context<'_>, end: &SessionEnd) -> Poll<()> {
        if *end != SessionEnd::Local {
            // The transport is gone or the peer misbehaved: nothing more to say.
            return Poll::Ready(());
        }
        let deadline = self
            .close_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(CLOSE_GRACE)));
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(());
        }
        let shared = self.shared.clone();
        let mut inner = shared.lock();
        // The I/O yield only spaces out Data, which a closed session no longer sends.
        self.written_since_yield = 0;
        self.fill(cx, &mut inner);
        if !self.close_queued && !inner.proto.has_output() {
            self.close_queued = true;
            match inner.going_away.take() {
                Some(reason) => self.writer.push_close(crate::GOING_AWAY, &reason),
                None => self.writer.push_close(1000, ""),
            }
        }
        drop(inner);
        match self.writer.poll_flush(cx, &mut self.io) {
            Poll::Ready(Ok(())) if self.close_queued => Poll::Ready(()),
            // More messages than one fill takes: the next poll writes them.
            Poll::Ready(Ok(())) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Ready(Err(_)) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S> Future for SessionDriver<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Output = SessionEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<SessionEnd> {
        crate::shared::DRIVER_POLLS.fetch_add(1, Ordering::Relaxed);
        let this = self.get_mut();
        for _ in 0..BUDGET.turns_per_poll {
            let (progress, ended) = this.turn(cx);
            if let Some(end) = ended {
                if this.poll_closing(cx, &end).is_pending() {
                    return Poll::Pending;
                }
                this.cancel.cancel();
                this.shared.ended.send_replace(Some(end.clone()));
                tracing::debug!(reason = %end, "session ended");
                return Poll::Ready(end);
            }
            if !progress {
                return Poll::Pending;
            }
        }
        // Busy: yield to other tasks and come back.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// Tells the driver that the runtime has polled its I/O driver since the driver asked.
///
/// tokio defers the wake-up of a task that yields (`yield_now`) until the worker has polled
/// its I/O driver. A plain deferred yield is not enough here, though: the writers this
/// driver wakes wake it right back, and that wake-up is not deferred. So the deferred wake
/// goes to this waker, which sets a flag the driver checks before writing on.
struct IoPolled {
    polled: AtomicBool,
    task: std::sync::Mutex<Option<Waker>>,
}

impl IoPolled {
    fn after_next_io_poll(cx: &mut Context<'_>) -> Arc<Self> {
        let this = Arc::new(Self {
            polled: AtomicBool::new(false),
            task: std::sync::Mutex::new(Some(cx.waker().clone())),
        });
        let waker = Waker::from(this.clone());
        let mut yielding = std::pin::pin!(tokio::task::yield_now());
        // The first poll hands `waker` to the scheduler and is always pending (outside a
        // tokio runtime it wakes it at once).
        let _ = yielding.as_mut().poll(&mut Context::from_waker(&waker));
        this
    }
}

impl Wake for IoPolled {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.polled.store(true, Ordering::Release);
        let task = self.task.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            task.wake();
        }
    }
}

impl<S> Drop for SessionDriver<S> {
    fn drop(&mut self) {
        // A driver dropped without finishing (its task aborted) still ends every stream.
        let mut inner = self.shared.lock();
        inner.driver = None;
        if inner.proto.end().is_none() {
            inner.proto.close(SessionEnd::Local);
        }
        let ids: Vec<_> = inner.streams.keys().copied().collect();
        for id in ids {
            inner.wake_ended(id);
        }
        drop(inner);
        self.cancel.cancel();
        self.shared.ended.send_if_modified(|v| {
            if v.is_none() {
                *v = Some(SessionEnd::Local);
                true
            } else {
                false
            }
        });
    }
}
