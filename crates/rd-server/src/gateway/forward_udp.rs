//! UDP forwards: a local UDP socket whose datagrams are carried through an agent to a fixed
//! `udp` target (`rd-server --forward 127.0.0.1:5353=foo:udp/10.0.0.10:53`), over rd's udp
//! extension.
//!
//! Each user's source address is a flow: its first datagram dials one tunnel stream
//! ([`DatagramStream`]), its later ones follow on it, and the target's replies go back to
//! that address. A flow ends after [`UdpForward::idle_timeout`] without a datagram either
//! way, or when the agent ends it. At most [`UdpForward::max_flows`] flows exist at once;
//! datagrams of new sources beyond it are dropped. Nothing here waits on the tunnel for
//! long: a flow whose stream is congested has its datagrams dropped once its queue is
//! full, as a UDP path drops them, and every drop is counted
//! (`rd_udp_datagrams_dropped_total{reason}`).
//!
//! A Go agent (or an rd agent without the extension) cannot carry datagrams: the dial is
//! refused before anything reaches it, logged once per forward, and its datagrams dropped.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rd_proto::Target;
use rd_session::{DatagramStream, TunnelStream, MAX_DATAGRAM};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::forward::{ForwardHandle, ForwardSpec};
use crate::log_limit::{rejection, LogLimit};
use crate::UdpMetrics;
use crate::{DialError, Server};

/// Default of [`UdpForward::idle_timeout`]: 60 s.
pub const DEFAULT_UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Receive buffer asked for a UDP forward's socket (the kernel caps it at
/// `net.core.rmem_max`): every flow's datagrams arrive there, and the default (about
/// 200 KiB, 4 ms at 50,000 datagrams of 512 bytes a second) overflows whenever the receive
/// loop waits for a CPU a little longer.
pub const UDP_FORWARD_RECV_BUFFER: usize = 4 * 1024 * 1024;

/// Default of [`UdpForward::max_flows`].
pub const DEFAULT_UDP_MAX_FLOWS: usize = 1024;

/// Bytes of datagrams a flow queues towards its stream (as much as a stream's send
/// buffer holds); more, while the tunnel is congested, are dropped. A few milliseconds of
/// traffic at tens of thousands of datagrams a second: enough to ride out a busy moment
/// of the flow's task, not enough to make datagrams late.
const FLOW_QUEUE_BYTES: usize = 256 * 1024;

/// Datagrams a flow queues at most (small ones), and takes into one write.
const FLOW_QUEUE: usize = 1024;

/// A UDP forward to configure and [`spawn`](Self::spawn).
#[derive(Debug, Clone)]
pub struct UdpForward {
    server: Server,
    spec: ForwardSpec,
    idle_timeout: Duration,
    max_flows: usize,
}

impl UdpForward {
    /// A forward of `spec` (a `udp`, `udp4` or `udp6` target, see
    /// [`ForwardSpec::is_udp`]) through `server`'s tunnels.
    pub fn new(server: Server, spec: ForwardSpec) -> Self {
        Self {
            server,
            spec,
            idle_timeout: DEFAULT_UDP_IDLE_TIMEOUT,
            max_flows: DEFAULT_UDP_MAX_FLOWS,
        }
    }

    /// How long a flow lives without a datagram either way (default 60 s); then its stream
    /// is closed, and the source's next datagram opens a new one.
    pub fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Flows (distinct source addresses) carried at once (default 1024); datagrams of new
    /// sources beyond it are dropped (`reason="max_flows"`) until a flow ends.
    pub fn max_flows(mut self, limit: usize) -> Self {
        self.max_flows = limit.max(1);
        self
    }

    /// Serves `socket` (bound to the spec's listen address by the caller) until the
    /// returned handle is stopped or dropped, or the server shuts down. Its receive buffer
    /// is raised to [`UDP_FORWARD_RECV_BUFFER`] where the kernel allows.
    pub fn spawn(self, socket: UdpSocket) -> ForwardHandle {
        if let Err(e) =
            socket2::SockRef::from(&socket).set_recv_buffer_size(UDP_FORWARD_RECV_BUFFER)
        {
            tracing::debug!(error = %e, "udp forward: receive buffer left as it was");
        }
        let cancel = self.server.shutdown_token();
        let tracker = TaskTracker::new();
        let local_addr = socket.local_addr().ok();
        let span = tracing::info_span!(parent: None, "forward", forward = %self.spec);
        tracker.spawn(
            receive_loop(self, Arc::new(socket), cancel.clone(), tracker.clone()).instrument(span),
        );
        ForwardHandle::new(local_addr, cancel, tracker)
    }
}

/// One flow as the receive loop sees it: its queue towards the stream.
#[derive(Debug)]
struct FlowEntry {
    id: u64,
    queue: mpsc::Sender<Bytes>,
    /// Bytes in `queue`, for [`FLOW_QUEUE_BYTES`].
    queued_bytes: Arc<AtomicUsize>,
}

/// What every flow of a forward shares.
#[derive(Debug)]
struct Shared {
    socket: Arc<UdpSocket>,
    metrics: UdpMetrics,
    idle_timeout: Duration,
    cancel: CancellationToken,
    /// Flows tell the receive loop they ended, so it forgets them.
    ended: mpsc::UnboundedSender<FlowEnded>,
    /// Flow failures (a refused target on the agent, say) are logged at most so often.
    failures: LogLimit,
}

async fn receive_loop(
    forward: UdpForward,
    socket: Arc<UdpSocket>,
    cancel: CancellationToken,
    tracker: TaskTracker,
) {
    let dialer = forward
        .server
        .dialer(&forward.spec.client_key)
        .labeled("forward");
    let target = forward.spec.target.clone();
    let (ended_tx, mut ended) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        socket: socket.clone(),
        metrics: forward.server.metrics().udp.clone(),
        idle_timeout: forward.idle_timeout,
        cancel: cancel.clone(),
        ended: ended_tx,
        failures: LogLimit::new(),
    });
    let metrics = &shared.metrics;
    let drops = LogLimit::new();
    let mut flows: HashMap<SocketAddr, FlowEntry> = HashMap::new();
    let mut next_id = 0u64;
    let mut hold = DialHold::default();
    // One buffer for the forward: a datagram is copied out at its own size.
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let (n, source) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(received) => received,
                Err(e) => {
                    tracing::warn!(error = %e, "udp receive failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        () = cancel.cancelled() => return,
                    }
                }
            },
            Some(end) = ended.recv() => {
                hold.after(end.forget(&mut flows), &dialer);
                continue;
            }
            () = cancel.cancelled() => return,
        };
        metrics.datagram("in");
        if n > MAX_DATAGRAM {
            metrics.drop_one("too_large");
            rejection!(drops, %source, len = n, "dropping a datagram larger than a stream carries");
            continue;
        }
        let mut datagram = Bytes::copy_from_slice(&buf[..n]);
        if let Some(flow) = flows.get(&source) {
            if flow.queued_bytes.load(Ordering::Relaxed) + n > FLOW_QUEUE_BYTES {
                metrics.drop_one("congested");
                continue;
            }
            match flow.queue.try_send(datagram) {
                Ok(()) => {
                    flow.queued_bytes.fetch_add(n, Ordering::Relaxed);
                    continue;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    metrics.drop_one("congested");
                    continue;
                }
                // The flow ended and its notice is on its way: this datagram opens a new one.
                Err(mpsc::error::TrySendError::Closed(back)) => {
                    flows.remove(&source);
                    datagram = back;
                }
            }
        }
        // Flows that ended since: their places are free.
        while let Ok(end) = ended.try_recv() {
            hold.after(end.forget(&mut flows), &dialer);
        }
        if let Some(reason) = hold.holding() {
            metrics.drop_one(reason);
            continue;
        }
        if flows.len() >= forward.max_flows {
            metrics.drop_one("max_flows");
            rejection!(
                drops,
                %source,
                max_flows = forward.max_flows,
                "dropping a datagram: the forward carries as many flows as it may (--udp-max-flows)"
            );
            continue;
        }
        let stream = match dialer.dial_target(target.clone()).await {
            Ok(stream) => stream,
            Err(DialError::UdpNotSupported(_)) => {
                metrics.drop_one("udp_not_supported");
                hold.after(FlowEnd::Unsupported, &dialer);
                continue;
            }
            Err(e) => {
                let reason = match e {
                    DialError::NoSession(_) => "no_session",
                    _ => "refused",
                };
                metrics.drop_one(reason);
                rejection!(drops, %source, error = %e, "dropping a datagram: dial refused");
                continue;
            }
        };
        hold.dialed();
        let (queue, queued) = mpsc::channel(FLOW_QUEUE);
        // A fresh queue has room.
        let _ = queue.try_send(datagram);
        let queued_bytes = Arc::new(AtomicUsize::new(n));
        next_id += 1;
        flows.insert(
            source,
            FlowEntry {
                id: next_id,
                queue,
                queued_bytes: queued_bytes.clone(),
            },
        );
        metrics.flows_opened.inc();
        metrics.flows.inc();
        let span = tracing::debug_span!("flow", %source, stream = stream.id().0);
        tracker.spawn(
            flow(
                shared.clone(),
                stream,
                Queue {
                    datagrams: queued,
                    bytes: queued_bytes,
                },
                source,
                next_id,
                target.clone(),
            )
            .instrument(span),
        );
    }
}

/// A flow's end of its queue.
#[derive(Debug)]
struct Queue {
    datagrams: mpsc::Receiver<Bytes>,
    /// Bytes queued, shared with the receive loop's [`FlowEntry`].
    bytes: Arc<AtomicUsize>,
}

/// Carries one source's datagrams until the flow idles out, ends or fails.
async fn flow(
    shared: Arc<Shared>,
    stream: TunnelStream,
    mut queued: Queue,
    source: SocketAddr,
    id: u64,
    target: Target,
) {
    tracing::debug!("flow opened");
    let mut datagrams = DatagramStream::new(stream);
    let idle = tokio::time::sleep(shared.idle_timeout);
    tokio::pin!(idle);
    let mut replied = false;
    let end: Result<&'static str, String> = loop {
        tokio::select! {
            d = queued.datagrams.recv() => match d {
                // What else is queued goes in the same write (one Data message for a
                // burst).
                Some(d) => {
                    let mut batch = vec![d];
                    while batch.len() < FLOW_QUEUE {
                        let Ok(more) = queued.datagrams.try_recv() else { break };
                        batch.push(more);
                    }
                    let taken = batch.iter().map(Bytes::len).sum::<usize>();
                    queued.bytes.fetch_sub(taken, Ordering::Relaxed);
                    // A tunnel that grants no room must not hold the flow past its idle
                    // timeout or the forward's stop (the flow ends, and its stream with it).
                    tokio::select! {
                        sent = datagrams.send_all(batch.iter().map(|d| &d[..])) => {
                            if let Err(e) = sent {
                                break Err(e.to_string());
                            }
                        }
                        () = &mut idle => break Ok("idle (the tunnel took nothing)"),
                        () = shared.cancel.cancelled() => break Ok("forward stopped"),
                    }
                }
                None => break Ok("forward stopped"),
            },
            r = datagrams.recv() => match r {
                Ok(Some(d)) => {
                    replied = true;
                    shared.metrics.datagram("out");
                    if let Err(e) = shared.socket.send_to(&d, source).await {
                        tracing::debug!(error = %e, "reply not sent");
                    }
                }
                Ok(None) => break Ok("closed by the agent"),
                Err(e) => break Err(rd_session::error_chain(&e)),
            },
            () = &mut idle => break Ok("idle"),
            () = shared.cancel.cancelled() => break Ok("forward stopped"),
        }
        idle.as_mut()
            .reset(tokio::time::Instant::now() + shared.idle_timeout);
    };
    // Through a peer replica, a Go agent's refusal arrives as the far replica's text.
    let how = match &end {
        Err(e) if e.contains(crate::dialer::UDP_NOT_SUPPORTED) => FlowEnd::Unsupported,
        Err(_) if !replied => FlowEnd::Refused,
        _ => FlowEnd::Normal,
    };
    shared.ended.send(FlowEnded { source, id, how }).ok();
    // After the notice: whoever sees the gauge drop may count on the forward knowing.
    shared.metrics.flows.dec();
    match end {
        Ok(why) => tracing::debug!(why, "flow ended"),
        // Reported once by the receive loop, not per flow.
        Err(error) if how == FlowEnd::Unsupported => {
            tracing::debug!(%error, "udp flow refused")
        }
        Err(error) => {
            rejection!(shared.failures, %source, %target, %error, "udp flow failed");
        }
    }
}

/// How a flow ended, as far as the next dial cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlowEnd {
    /// Idle, stopped, closed by the agent, or failed after the target answered.
    Normal,
    /// The agent cannot carry udp (here, or the far replica said so).
    Unsupported,
    /// Failed before the target sent anything: the agent refused the target (allow rules,
    /// a name it cannot resolve). The forward's target is the same for every source.
    Refused,
}

/// A flow's notice to the receive loop that it ended.
#[derive(Debug)]
struct FlowEnded {
    source: SocketAddr,
    id: u64,
    how: FlowEnd,
}

impl FlowEnded {
    /// Forgets the flow (unless its source has a newer one); how it ended.
    fn forget(&self, flows: &mut HashMap<SocketAddr, FlowEntry>) -> FlowEnd {
        if flows.get(&self.source).is_some_and(|f| f.id == self.id) {
            flows.remove(&self.source);
        }
        self.how
    }
}

/// How long a forward whose agent cannot carry udp drops datagrams before it dials again:
/// a dial per datagram would cost the agent's replica a refusal per datagram.
const UNSUPPORTED_HOLD: Duration = Duration::from_secs(5);

/// How long a forward whose target the agent refused drops datagrams before it dials
/// again: each datagram of a new (perhaps spoofed) source would otherwise be a Connect
/// to the agent.
const REFUSED_HOLD: Duration = Duration::from_secs(1);

/// When the forward dials again after a refusal. A Go agent (or one without the udp
/// extension), here or behind a peer replica, is reported once, not per datagram (again
/// only after a dial succeeded in between), and not dialed for [`UNSUPPORTED_HOLD`]; a
/// refused target is not dialed for [`REFUSED_HOLD`] (each refusal is logged, rate-limited,
/// where the flow ends).
#[derive(Debug, Default)]
struct DialHold {
    reported: bool,
    until: Option<(tokio::time::Instant, &'static str)>,
}

impl DialHold {
    fn after(&mut self, how: FlowEnd, dialer: &crate::Dialer) {
        let now = tokio::time::Instant::now();
        match how {
            FlowEnd::Normal => {}
            FlowEnd::Refused => self.until = Some((now + REFUSED_HOLD, "refused")),
            FlowEnd::Unsupported => {
                self.until = Some((now + UNSUPPORTED_HOLD, "udp_not_supported"));
                if !self.reported {
                    self.reported = true;
                    let e = DialError::UdpNotSupported(dialer.client_key().to_owned());
                    tracing::warn!(
                        error = %e,
                        "the agent cannot carry udp; this forward drops its datagrams until an \
                         agent with rd's udp extension connects (logged once)"
                    );
                }
            }
        }
    }

    /// The drop reason while no dial is made.
    fn holding(&self) -> Option<&'static str> {
        self.until
            .filter(|(until, _)| tokio::time::Instant::now() < *until)
            .map(|(_, reason)| reason)
    }

    fn dialed(&mut self) {
        self.reported = false;
        self.until = None;
    }
}
