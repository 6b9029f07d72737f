//! A client and a server [`Session`] wired back to back through in-memory queues, with a
//! virtual clock, and invariant checks on everything that crosses: used by `sim.rs` and
//! `proptest.rs`.
//!
//! Checked on every operation (a violation panics):
//! - every transmitted message decodes;
//! - per sender and connection id, Pause and Resume alternate, starting with Pause;
//! - a session that has handled Pause(id) and not yet Resume(id) transmits no Data for id
//!   (unless the application released the stream: then its last Data and EOF go out);
//! - deliveries wait while the receiver says `wants_input() == false`, as a driver would;
//! - per stream, unread bytes stay within `stream_receive_cap`, the session's totals equal
//!   the sum over its streams, and operations that are about no stream leave
//!   `receive_buffered` unchanged;
//! - `receive_buffered <= session_receive_cap`;
//! - no event for a stream after its `StreamClosed` (until a new stream takes the id), no
//!   second `StreamClosed`, and no event at all after `SessionClosed`;
//! - half-close: no Data after this side's Fin or Error for the stream; with the extension in
//!   force, a read after the peer's Fin never waits (it returns data, EOF or the end), a read
//!   returns EOF only after the peer's Fin or Error `EOF`, and a stream ends cleanly
//!   (`StreamClosed` with `Finished`) only once both sides sent Fin, or the peer sent Error
//!   `EOF`.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rd_proto::{
    decode, Config, ConnId, Event, Frame, Identity, Message, OpenError, ProtocolError, ReadOutcome,
    Session, SessionEnd, Side, StreamEnd, StreamError, Target, Transmit,
};

/// One end of the simulated websocket.
#[derive(Debug)]
pub struct Peer {
    pub session: Session,
    /// Every event, in order.
    pub events: Vec<Event>,
    cursor: usize,
    /// Errors returned by `handle_message`.
    pub errors: Vec<ProtocolError>,
    /// Every message this peer transmitted, decoded.
    pub sent: Vec<Frame>,
    pub pings_sent: usize,
    /// Largest unread byte count seen per stream.
    pub max_unread: HashMap<ConnId, i64>,
    unread: HashMap<ConnId, i64>,
    closed: HashSet<ConnId>,
    session_closed: bool,
    /// Ids for which this session handled Pause and not yet Resume.
    paused_by_peer: HashSet<ConnId>,
    /// Ids the application released: those may send their last Data and EOF despite a
    /// Pause (like Go's Close), so two ends that paused each other still close.
    released: HashSet<ConnId>,
    /// Deliveries held back because the receiver said `wants_input() == false`.
    pub input_stalls: usize,
    /// Per id, whether the last flow message this peer sent was Pause.
    last_flow_sent: HashMap<ConnId, bool>,
    /// Ids this peer sent Fin for, in the stream's current life.
    pub fin_sent: HashSet<ConnId>,
    /// Ids this peer sent an Error for.
    error_sent: HashSet<ConnId>,
    /// Ids this peer was delivered a Fin for.
    pub fin_received: HashSet<ConnId>,
    /// Ids this peer was delivered Error `EOF` for.
    eof_received: HashSet<ConnId>,
    /// Streams that ended cleanly on Fins whose own Fin must be on the wire by the end of
    /// the operation (it is sent by the very call that ends the stream).
    fin_check: Vec<ConnId>,
}

impl Peer {
    fn new(session: Session) -> Self {
        Self {
            session,
            events: Vec::new(),
            cursor: 0,
            errors: Vec::new(),
            sent: Vec::new(),
            pings_sent: 0,
            max_unread: HashMap::new(),
            unread: HashMap::new(),
            closed: HashSet::new(),
            session_closed: false,
            paused_by_peer: HashSet::new(),
            released: HashSet::new(),
            input_stalls: 0,
            last_flow_sent: HashMap::new(),
            fin_sent: HashSet::new(),
            error_sent: HashSet::new(),
            fin_received: HashSet::new(),
            eof_received: HashSet::new(),
            fin_check: Vec::new(),
        }
    }

    fn half_close(&self) -> bool {
        self.session.config().half_close
    }

    /// Both Fins are on the wire for every stream that ended cleanly on Fins.
    fn check_fins(&mut self) {
        for id in self.fin_check.drain(..) {
            assert!(
                self.fin_sent.contains(&id),
                "{:?}: stream {id} ended on the peer's Fin without our own",
                self.session.side()
            );
        }
    }

    /// Events since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        let new = self.events[self.cursor..].to_vec();
        self.cursor = self.events.len();
        new
    }

    /// Unread bytes of a stream as tracked by the harness.
    pub fn unread(&self, id: ConnId) -> i64 {
        self.unread.get(&id).copied().unwrap_or(0)
    }

    /// Messages of a given type code this peer sent.
    pub fn sent_of_type(&self, code: i64) -> Vec<&Message> {
        self.sent
            .iter()
            .map(|f| &f.message)
            .filter(|m| m.type_code() == code)
            .collect()
    }

    fn new_life(&mut self, id: ConnId) {
        self.closed.remove(&id);
        self.paused_by_peer.remove(&id);
        self.released.remove(&id);
        self.last_flow_sent.remove(&id);
        self.fin_sent.remove(&id);
        self.error_sent.remove(&id);
        self.fin_received.remove(&id);
        self.eof_received.remove(&id);
    }

    fn drain_events(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            assert!(
                !self.session_closed,
                "{:?}: event after SessionClosed: {ev:?}",
                self.session.side()
            );
            match &ev {
                Event::StreamRequested { id, .. } => self.new_life(*id),
                Event::StreamReadable { id }
                | Event::StreamWritable { id }
                | Event::StreamAcknowledged { id } => {
                    assert!(
                        !self.closed.contains(id),
                        "event after StreamClosed: {ev:?}"
                    );
                }
                Event::StreamClosed { id, end } => {
                    assert!(self.closed.insert(*id), "second StreamClosed: {ev:?}");
                    if *end == StreamEnd::Finished && !self.eof_received.contains(id) {
                        assert!(
                            self.half_close() && self.fin_received.contains(id),
                            "{:?}: {id} finished without the peer's Fin or EOF",
                            self.session.side()
                        );
                        self.fin_check.push(*id);
                    }
                }
                Event::SessionClosed(_) => self.session_closed = true,
                Event::ClientAdded(_)
                | Event::ClientRemoved(_)
                | Event::LimitExceeded(_)
                | Event::ReadingResumed
                | Event::PeerGoingAway { .. }
                | Event::ReplicasAnnounced(_) => {}
                other => panic!("event this harness does not know: {other:?}"),
            }
            self.events.push(ev);
        }
    }

    /// Runs `f`, attributing the change of `receive_buffered` to stream `id` (or requiring
    /// no change when `id` is `None`), then checks the invariants and collects events.
    fn track<R>(&mut self, id: Option<ConnId>, f: impl FnOnce(&mut Session) -> R) -> R {
        let before = self.session.stats().receive_buffered as i64;
        let out = f(&mut self.session);
        let stats = self.session.stats();
        let delta = stats.receive_buffered as i64 - before;
        let config = self.session.config().clone();
        assert!(
            stats.receive_buffered <= config.session_receive_cap,
            "session buffered {} over cap",
            stats.receive_buffered
        );
        self.session.assert_invariants();
        match id {
            Some(id) => {
                // A message for one stream may reset others (a peer ignoring Pause is shed at
                // the session ceiling), so each stream's count comes from the session, whose
                // totals `assert_invariants` checked against its streams.
                let unread = self.unread.entry(id).or_insert(0);
                *unread = self.session.unread(id).map_or(0, |n| n as i64);
                assert!(
                    *unread <= config.stream_receive_cap as i64,
                    "stream {id} holds {unread} unread bytes, over the cap"
                );
                let max = self.max_unread.entry(id).or_insert(0);
                *max = (*max).max(*unread);
            }
            None => assert_eq!(delta, 0, "buffer changed by an operation on no stream"),
        }
        self.drain_events();
        out
    }
}

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    ClientToServer,
    ServerToClient,
}

/// Two sessions back to back.
#[derive(Debug)]
pub struct Sim {
    pub base: Instant,
    pub now: Instant,
    pub client: Peer,
    pub server: Peer,
    to_server: VecDeque<Transmit>,
    to_client: VecDeque<Transmit>,
    /// Deliver pings and answer them with pongs (both ends see a keepalive).
    pub keepalive_works: bool,
}

pub fn target() -> Target {
    Target::new("tcp", "127.0.0.1:8125").unwrap()
}

impl Sim {
    pub fn new(config: Config) -> Self {
        Self::with_configs(config.clone(), config)
    }

    pub fn with_configs(client: Config, server: Config) -> Self {
        let base = Instant::now();
        let server_identity = Identity {
            client_key: "foo".into(),
            session_key: 5577006791947779410,
        };
        Self {
            base,
            now: base,
            client: Peer::new(Session::new(
                Side::Client,
                client,
                Identity::client(),
                base,
                1_000_000,
            )),
            server: Peer::new(Session::new(
                Side::Server,
                server,
                server_identity,
                base,
                8_811_550_949_760_789_089,
            )),
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            keepalive_works: true,
        }
    }

    pub fn peer(&mut self, side: Side) -> &mut Peer {
        match side {
            Side::Client => &mut self.client,
            Side::Server => &mut self.server,
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.now - self.base
    }

    // ----- application calls, tracked ---------------------------------------------------

    pub fn open(&mut self, side: Side) -> Result<ConnId, OpenError> {
        let now = self.now;
        let p = self.peer(side);
        let r = p.track(None, |s| s.open_stream(now, target()));
        if let Ok(id) = r {
            p.new_life(id);
        }
        r
    }

    pub fn write(&mut self, side: Side, id: ConnId, data: &[u8]) -> Result<usize, StreamError> {
        self.peer(side).track(None, |s| s.write(id, data))
    }

    pub fn read(&mut self, side: Side, id: ConnId, max: usize) -> Result<ReadOutcome, StreamError> {
        let p = self.peer(side);
        let r = p.track(Some(id), |s| s.read(id, max));
        match &r {
            Ok(ReadOutcome::Data(b)) => assert!(!b.is_empty() && b.len() <= max, "read size"),
            Ok(ReadOutcome::Eof) => assert!(
                p.fin_received.contains(&id) || p.eof_received.contains(&id),
                "{side:?}: EOF on {id} without the peer's Fin or EOF"
            ),
            Err(StreamError::Blocked) => assert!(
                !(p.half_close() && p.fin_received.contains(&id)),
                "{side:?}: a read of {id} waits after the peer's Fin"
            ),
            Err(_) => {}
        }
        p.check_fins();
        r
    }

    pub fn finish(&mut self, side: Side, id: ConnId) -> Result<(), StreamError> {
        self.peer(side).track(None, |s| s.finish(id))
    }

    pub fn reset(&mut self, side: Side, id: ConnId, reason: &str) -> Result<(), StreamError> {
        self.peer(side).track(Some(id), |s| s.reset(id, reason))
    }

    pub fn release(&mut self, side: Side, id: ConnId) {
        let p = self.peer(side);
        p.released.insert(id);
        p.track(Some(id), |s| s.release(id));
    }

    pub fn close(&mut self, side: Side, end: SessionEnd) {
        self.peer(side).track(None, |s| s.close(end));
    }

    /// Feeds raw bytes to one side as if the other had sent them.
    pub fn inject(&mut self, to: Side, raw: Bytes) -> Result<(), ProtocolError> {
        let frame = decode(raw.clone()).ok();
        let id = frame.as_ref().map(|f| f.message.conn_id());
        let now = self.now;
        let p = self.peer(to);
        match frame.map(|f| f.message) {
            Some(Message::Fin { conn_id }) => {
                p.fin_received.insert(conn_id);
            }
            Some(Message::Error { conn_id, text }) if text == "EOF" => {
                p.eof_received.insert(conn_id);
            }
            _ => {}
        }
        let r = p.track(Some(id.unwrap_or(ConnId(0))), |s| {
            s.handle_message(now, raw)
        });
        if let Err(e) = &r {
            p.errors.push(e.clone());
        }
        r
    }

    // ----- the wire ---------------------------------------------------------------------

    /// Moves everything `side` wants to send into its outgoing queue. Returns how many.
    pub fn pump(&mut self, side: Side) -> usize {
        let mut n = 0;
        loop {
            let p = self.peer(side);
            let Some(t) = p.track(None, Session::poll_transmit) else {
                break;
            };
            if let Transmit::Message(bytes) = &t {
                let frame = decode(bytes.clone())
                    .unwrap_or_else(|e| panic!("{side:?} sent undecodable {bytes:?}: {e}"));
                match &frame.message {
                    Message::Data { conn_id, .. } => {
                        assert!(
                            !p.paused_by_peer.contains(conn_id) || p.released.contains(conn_id),
                            "{side:?} sent Data for {conn_id} while paused by the peer"
                        );
                        assert!(
                            !p.fin_sent.contains(conn_id) && !p.error_sent.contains(conn_id),
                            "{side:?} sent Data for {conn_id} after its Fin or Error"
                        );
                    }
                    Message::Fin { conn_id } => {
                        assert!(p.half_close(), "{side:?} sent Fin without the extension");
                        assert!(
                            p.fin_sent.insert(*conn_id),
                            "{side:?}: two Fins for {conn_id}"
                        );
                    }
                    Message::Error { conn_id, .. } => {
                        p.error_sent.insert(*conn_id);
                    }
                    Message::Pause { conn_id } => {
                        let last = p.last_flow_sent.insert(*conn_id, true);
                        assert_ne!(last, Some(true), "{side:?}: two Pauses for {conn_id}");
                    }
                    Message::Resume { conn_id } => {
                        let last = p.last_flow_sent.insert(*conn_id, false);
                        assert_eq!(last, Some(true), "{side:?}: Resume without Pause");
                    }
                    _ => {}
                }
                p.sent.push(frame);
            } else {
                p.pings_sent += 1;
            }
            match side {
                Side::Client => self.to_server.push_back(t),
                Side::Server => self.to_client.push_back(t),
            }
            n += 1;
        }
        self.peer(side).check_fins();
        n
    }

    /// Messages waiting in `dir`'s queue.
    pub fn in_flight(&self, dir: Dir) -> usize {
        match dir {
            Dir::ClientToServer => self.to_server.len(),
            Dir::ServerToClient => self.to_client.len(),
        }
    }

    /// Drops everything in flight in `dir` (a lost message).
    pub fn drop_in_flight(&mut self, dir: Dir) -> Vec<Transmit> {
        match dir {
            Dir::ClientToServer => self.to_server.drain(..).collect(),
            Dir::ServerToClient => self.to_client.drain(..).collect(),
        }
    }

    /// Delivers up to `max` queued transmits in `dir`, in order. Returns how many.
    pub fn deliver(&mut self, dir: Dir, max: usize) -> usize {
        let (from, to) = match dir {
            Dir::ClientToServer => (Side::Client, Side::Server),
            Dir::ServerToClient => (Side::Server, Side::Client),
        };
        let now = self.now;
        let mut n = 0;
        while n < max {
            if !self.peer(to).session.wants_input() {
                self.peer(to).input_stalls += 1;
                break;
            }
            let next = match dir {
                Dir::ClientToServer => self.to_server.pop_front(),
                Dir::ServerToClient => self.to_client.pop_front(),
            };
            let Some(t) = next else { break };
            n += 1;
            match t {
                Transmit::Ping => {
                    if self.keepalive_works {
                        self.peer(to).session.handle_keepalive(now);
                        // The pong comes straight back.
                        self.peer(from).session.handle_pong(now);
                    }
                }
                Transmit::Message(raw) => {
                    let frame = decode(raw.clone()).unwrap();
                    let p = self.peer(to);
                    match frame.message {
                        Message::Pause { conn_id } => {
                            p.paused_by_peer.insert(conn_id);
                        }
                        Message::Resume { conn_id } => {
                            p.paused_by_peer.remove(&conn_id);
                        }
                        Message::Fin { conn_id } => {
                            p.fin_received.insert(conn_id);
                        }
                        Message::Error { conn_id, ref text } if text == "EOF" => {
                            p.eof_received.insert(conn_id);
                        }
                        _ => {}
                    }
                    let id = frame.message.conn_id();
                    let r = p.track(Some(id), |s| s.handle_message(now, raw));
                    if let Err(e) = r {
                        p.errors.push(e);
                    }
                    p.check_fins();
                }
            }
        }
        n
    }

    /// Sends and delivers until both sides are quiet. Returns whether anything moved.
    pub fn flush(&mut self) -> bool {
        let mut moved = false;
        loop {
            let n = self.pump(Side::Client)
                + self.pump(Side::Server)
                + self.deliver(Dir::ClientToServer, usize::MAX)
                + self.deliver(Dir::ServerToClient, usize::MAX);
            if n == 0 {
                return moved;
            }
            moved = true;
        }
    }

    /// Runs both sessions' timers at the current time.
    pub fn tick(&mut self) {
        let now = self.now;
        self.client.track(None, |s| s.handle_timeout(now));
        self.server.track(None, |s| s.handle_timeout(now));
    }

    /// The earlier of the two sessions' timers.
    pub fn next_timeout(&self) -> Option<Instant> {
        [
            self.client.session.poll_timeout(),
            self.server.session.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Moves everything across; when nothing moved, advances the clock to the next timer.
    /// Returns false when nothing moved and no timer is pending.
    pub fn step(&mut self) -> bool {
        if self.flush() {
            return true;
        }
        match self.next_timeout() {
            Some(at) => {
                self.now = self.now.max(at);
                self.tick();
                self.flush();
                true
            }
            None => false,
        }
    }

    /// Advances the clock by `d`, firing every timer on the way and flushing after each.
    pub fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        self.flush();
        for _ in 0..1_000_000 {
            match self.next_timeout() {
                Some(at) if at <= end => {
                    self.now = self.now.max(at);
                    self.tick();
                    self.flush();
                }
                _ => break,
            }
        }
        self.now = end;
        self.tick();
        self.flush();
    }
}
