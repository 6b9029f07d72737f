//! Isolation with bounded memory (issue 10): 1,000 streams whose readers never read beside
//! one stream whose reader reads everything, over a link with a delay and a fixed bandwidth,
//! on a virtual clock.
//!
//! The receiving session is rd's (the side that dialed the streams, as rd-server receiving
//! responses). The sender is either
//! - a model of a Go peer, which only speaks Pause/Resume: it keeps sending on a stream
//!   until the Pause has crossed the link, then stops until Resume; or
//! - an rd session with the credit extension.
//!
//! Checked at every step: no stream is reset and the session never stops reading (honest
//! peers are held back per stream), the session's unread bytes stay within the budget plus
//! the per-stream slack, and the fast stream keeps moving at a good share of the link.
#![allow(clippy::unwrap_used)]

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rd_proto::{
    decode, Config, ConnId, Event, Identity, Message, ReadOutcome, Session, Side, StreamError,
    Target, Transmit, CREDIT_INITIAL_WINDOW,
};

const STALLED: usize = 1000;
/// Each direction of the link delays a message this long.
const DELAY: Duration = Duration::from_millis(1);
const STEP: Duration = Duration::from_micros(100);
/// The link carries this many bytes per step (1 GB/s).
const BYTES_PER_STEP: usize = 100_000;
const STEPS: usize = 20_000;
const MESSAGE: usize = 32 * 1024;

/// One direction of the link: messages arrive `DELAY` after they were sent.
#[derive(Default)]
struct Link(VecDeque<(Instant, Bytes)>);

impl Link {
    fn send(&mut self, now: Instant, msg: Bytes) {
        self.0.push_back((now + DELAY, msg));
    }

    fn arrived(&mut self, now: Instant) -> Vec<Bytes> {
        let mut out = Vec::new();
        while self.0.front().is_some_and(|(at, _)| *at <= now) {
            out.push(self.0.pop_front().unwrap().1);
        }
        out
    }
}

/// What the sending side does each step.
trait Sender {
    /// Handles messages from the receiver.
    fn handle(&mut self, now: Instant, msg: Bytes);
    /// Sends up to `budget` bytes of messages.
    fn transmit(&mut self, now: Instant, budget: usize, link: &mut Link);
}

/// A Go remotedialer peer: every known stream has endless data; Data goes out round-robin
/// on streams the receiver has not paused (as far as the sender has seen).
#[derive(Default)]
struct GoLikeSender {
    /// Streams not paused, in turn.
    active: VecDeque<ConnId>,
    paused: HashSet<ConnId>,
    message_id: i64,
    /// Streams on which this peer ignores Pause (a broken or hostile peer).
    ignores_pause: HashSet<ConnId>,
    /// Streams the receiver reset.
    reset: HashSet<ConnId>,
}

impl Sender for GoLikeSender {
    fn handle(&mut self, _now: Instant, msg: Bytes) {
        match decode(msg).unwrap().message {
            Message::Connect { conn_id, .. } => self.active.push_back(conn_id),
            Message::Pause { conn_id } if !self.ignores_pause.contains(&conn_id) => {
                self.paused.insert(conn_id);
            }
            Message::Resume { conn_id } => {
                if self.paused.remove(&conn_id) {
                    self.active.push_back(conn_id);
                }
            }
            Message::Pause { .. } => {}
            Message::Error { conn_id, .. } => {
                assert!(
                    self.ignores_pause.contains(&conn_id),
                    "honest stream {conn_id} reset"
                );
                self.reset.insert(conn_id);
                self.paused.insert(conn_id);
            }
            other => panic!("the receiver sent {other:?}"),
        }
    }

    fn transmit(&mut self, now: Instant, budget: usize, link: &mut Link) {
        let mut sent = 0;
        while sent < budget {
            let Some(id) = self.active.pop_front() else {
                break;
            };
            if self.paused.contains(&id) {
                // Leaves the turn until its Resume puts it back.
                continue;
            }
            self.active.push_back(id);
            self.message_id += 1;
            let msg = Message::Data {
                conn_id: id,
                payload: Bytes::from(vec![7u8; MESSAGE]),
            }
            .to_bytes(self.message_id);
            sent += msg.len();
            link.send(now, msg);
        }
    }
}

/// An rd peer with the credit extension whose applications always have data to write.
struct CreditSender {
    session: Session,
}

impl CreditSender {
    fn fill(&mut self, id: ConnId) {
        let chunk = [7u8; MESSAGE];
        loop {
            match self.session.write(id, &chunk) {
                Ok(_) => {}
                Err(StreamError::Blocked) => break,
                Err(e) => panic!("sender: {e}"),
            }
        }
    }

    fn drain_events(&mut self) {
        while let Some(ev) = self.session.poll_event() {
            match ev {
                Event::StreamRequested { id, .. } | Event::StreamWritable { id } => self.fill(id),
                other => panic!("sender: {other:?}"),
            }
        }
    }
}

impl Sender for CreditSender {
    fn handle(&mut self, now: Instant, msg: Bytes) {
        self.session.handle_message(now, msg).unwrap();
        self.drain_events();
    }

    fn transmit(&mut self, now: Instant, budget: usize, link: &mut Link) {
        let mut sent = 0;
        while sent < budget {
            match self.session.poll_transmit() {
                Some(Transmit::Message(msg)) => {
                    sent += msg.len();
                    link.send(now, msg);
                }
                Some(Transmit::Ping) => {}
                None => break,
            }
            self.drain_events();
        }
    }
}

struct Outcome {
    fast_read: usize,
    fast_read_second_half: usize,
    max_unread: usize,
    max_committed: usize,
    /// What each stalled stream holds unread at the end.
    stalled_unread: Vec<usize>,
    /// Streams whose peer has no credit left (or that we paused) at the end.
    holding_back: usize,
}

fn run(config: Config, sender: Box<dyn Sender>) -> Outcome {
    run_with(config, sender, false)
}

/// `flood`: the sender ignores Pause on some streams; the receiver may reset those.
fn run_with(config: Config, mut sender: Box<dyn Sender>, flood: bool) -> Outcome {
    let t0 = Instant::now();
    let mut now = t0;
    let mut receiver = Session::new(Side::Server, config.clone(), Identity::client(), t0, 1);
    let target = Target::new("tcp", "127.0.0.1:80").unwrap();
    let fast = receiver.open_stream(now, target.clone()).unwrap();
    let stalled: Vec<ConnId> = (0..STALLED)
        .map(|_| receiver.open_stream(now, target.clone()).unwrap())
        .collect();
    let mut to_sender = Link::default();
    let mut to_receiver = Link::default();
    let mut fast_read = 0;
    let mut fast_read_second_half = 0;
    let mut max_unread = 0;
    let mut max_committed = 0;
    let mut per_stream_max: HashMap<ConnId, usize> = HashMap::new();
    // Pings the sender answers: the pong is back a round trip later.
    let mut pongs: VecDeque<Instant> = VecDeque::new();
    for step in 0..STEPS {
        now += STEP;
        while pongs.front().is_some_and(|at| *at <= now) {
            pongs.pop_front();
            receiver.handle_pong(now);
        }
        for msg in to_receiver.arrived(now) {
            assert!(
                receiver.wants_input(),
                "step {step}: the session stopped reading its websocket"
            );
            receiver.handle_message(now, msg).unwrap();
        }
        loop {
            match receiver.read(fast, usize::MAX) {
                Ok(ReadOutcome::Data(b)) => {
                    fast_read += b.len();
                    if step >= STEPS / 2 {
                        fast_read_second_half += b.len();
                    }
                }
                Err(StreamError::Blocked) => break,
                other => panic!("fast stream: {other:?}"),
            }
        }
        while let Some(t) = receiver.poll_transmit() {
            if t == Transmit::Ping {
                pongs.push_back(now + 2 * DELAY);
            }
            if let Transmit::Message(msg) = t {
                if let Message::Error { conn_id, text } = decode(msg.clone()).unwrap().message {
                    assert!(
                        flood,
                        "step {step}: the receiver reset stream {conn_id}: {text}"
                    );
                }
                to_sender.send(now, msg);
            }
        }
        while let Some(ev) = receiver.poll_event() {
            if let Event::LimitExceeded(limit) = ev {
                assert!(
                    flood && limit == rd_proto::Limit::StreamReceiveCap,
                    "step {step}: limit {limit:?}"
                );
            }
        }
        for msg in to_sender.arrived(now) {
            sender.handle(now, msg);
        }
        sender.transmit(now, BYTES_PER_STEP, &mut to_receiver);

        receiver.assert_invariants();
        let stats = receiver.stats();
        max_unread = max_unread.max(stats.receive_buffered);
        max_committed = max_committed.max(stats.receive_committed);
        if step % 100 == 99 && !flood {
            for &id in &stalled {
                let unread = receiver.unread(id).unwrap();
                let max = per_stream_max.entry(id).or_default();
                *max = (*max).max(unread);
            }
        }
    }
    let worst_stalled = per_stream_max.values().copied().max().unwrap_or(0);
    let per_stream_bound = if config.credit {
        CREDIT_INITIAL_WINDOW as usize
    } else {
        config.high_watermark + 2 * MESSAGE
    };
    assert!(
        worst_stalled <= per_stream_bound,
        "a stalled stream holds {worst_stalled} bytes"
    );
    eprintln!(
        "fast stream read {fast_read} bytes ({fast_read_second_half} in the second half); \
         session unread peaked at {max_unread}, committed at {max_committed}; \
         worst stalled stream {worst_stalled}"
    );
    Outcome {
        fast_read,
        fast_read_second_half,
        max_unread,
        max_committed,
        stalled_unread: stalled
            .iter()
            .filter_map(|&id| receiver.unread(id))
            .collect(),
        holding_back: receiver.stats().paused_by_us,
    }
}

fn link_bytes(steps: usize) -> usize {
    steps * BYTES_PER_STEP
}

impl Outcome {
    /// Once the stalled streams are held back, the fast stream gets at least half the link.
    fn assert_fast_stream_kept_moving(&self) {
        let second_half = link_bytes(STEPS / 2);
        assert!(
            self.fast_read_second_half * 2 >= second_half,
            "fast stream moved {} of {} bytes in the second half",
            self.fast_read_second_half,
            second_half
        );
    }
}

#[test]
fn pause_only_peer_stalled_streams_do_not_stall_the_fast_one() {
    let config = Config::default();
    let out = run(config.clone(), Box::<GoLikeSender>::default());
    // Every stalled stream holds at most a floor plus what was in flight once the session
    // is under pressure; the total stays far below the ceiling.
    let slack = STALLED * (config.pause_floor + 2 * MESSAGE);
    assert!(
        out.max_unread <= config.session_receive_budget / 2 + slack + config.high_watermark,
        "session unread peaked at {} bytes",
        out.max_unread
    );
    assert!(out.max_unread < config.session_receive_ceiling);
    // Once the stalled streams are paused the fast one gets most of the link.
    out.assert_fast_stream_kept_moving();
    assert!(out.fast_read > 0);
}

#[test]
fn credit_peer_stalled_streams_hold_exactly_their_windows_and_the_fast_one_moves() {
    let mut config = Config::default();
    config.credit = true;
    let t0 = Instant::now();
    let sender = CreditSender {
        session: Session::new(Side::Client, config.clone(), Identity::client(), t0, 1),
    };
    let out = run(config.clone(), Box::new(sender));
    // Exact: a stream that is never read never gets more than its initial window.
    let initial = STALLED * CREDIT_INITIAL_WINDOW as usize;
    assert!(
        out.max_committed <= config.session_receive_budget + initial,
        "committed peaked at {} bytes",
        out.max_committed
    );
    assert!(out.max_unread <= out.max_committed);
    out.assert_fast_stream_kept_moving();
    // Each stalled stream holds exactly its window: the sender filled it, and has no credit
    // left on any of them.
    assert_eq!(out.stalled_unread.len(), STALLED);
    for unread in &out.stalled_unread {
        assert_eq!(*unread, CREDIT_INITIAL_WINDOW as usize);
    }
    assert!(
        out.holding_back >= STALLED,
        "{} streams held back",
        out.holding_back
    );
}

#[test]
fn a_peer_ignoring_pause_on_many_streams_loses_those_streams_only() {
    let config = Config::default();
    // The sender learns the ids from the Connects, in the order they were opened: the fast
    // stream first, then the stalled ones; the first 40 stalled ones flood.
    let ignores_pause = (0..40).map(|i| ConnId(4 + 2 * i)).collect();
    let sender = GoLikeSender {
        ignores_pause,
        ..GoLikeSender::default()
    };
    let out = run_with(config.clone(), Box::new(sender), true);
    // The ceiling is reached, the floods are shed, and the session never stops reading.
    assert!(
        out.max_unread <= config.session_receive_ceiling + 4 * MESSAGE,
        "session unread peaked at {}",
        out.max_unread
    );
    out.assert_fast_stream_kept_moving();
}

/// What one credit stream did over a simulated link.
struct LinkRun {
    /// Bytes the reader took, per `report_every` steps.
    read_per_report: Vec<usize>,
    /// The most credit the receiver had granted and not yet seen consumed at once.
    max_committed: usize,
}

/// One credit stream from `sender` to a receiver whose reader takes everything at once:
/// `delay` each way (pings answered after the round trip), the sender sending at most
/// `per_step` bytes per `step`. Also checks the round trip the receiver measured.
fn run_credit_link(
    delay: Duration,
    step: Duration,
    per_step: usize,
    steps: u32,
    report_every: u32,
) -> LinkRun {
    let mut config = Config::default();
    config.credit = true;
    let t0 = Instant::now();
    let mut now = t0;
    let mut receiver = Session::new(Side::Server, config.clone(), Identity::client(), t0, 1);
    let mut sender = CreditSender {
        session: Session::new(Side::Client, config.clone(), Identity::client(), t0, 1),
    };
    let id = receiver
        .open_stream(now, Target::new("tcp", "127.0.0.1:80").unwrap())
        .unwrap();
    let mut to_sender: VecDeque<(Instant, Bytes)> = VecDeque::new();
    let mut to_receiver: VecDeque<(Instant, Bytes)> = VecDeque::new();
    let mut pongs: VecDeque<Instant> = VecDeque::new();
    let mut run = LinkRun {
        read_per_report: Vec::new(),
        max_committed: 0,
    };
    let mut read = 0usize;
    for n in 1..=steps {
        now += step;
        while pongs.front().is_some_and(|at| *at <= now) {
            pongs.pop_front();
            receiver.handle_pong(now);
        }
        while to_receiver.front().is_some_and(|(at, _)| *at <= now) {
            let (_, msg) = to_receiver.pop_front().unwrap();
            receiver.handle_message(now, msg).unwrap();
        }
        while let Ok(ReadOutcome::Data(b)) = receiver.read(id, usize::MAX) {
            read += b.len();
        }
        let _ = receiver.read(id, usize::MAX);
        run.max_committed = run.max_committed.max(receiver.stats().receive_committed);
        while let Some(t) = receiver.poll_transmit() {
            match t {
                Transmit::Message(m) => to_sender.push_back((now + delay, m)),
                Transmit::Ping => pongs.push_back(now + 2 * delay),
            }
        }
        while to_sender.front().is_some_and(|(at, _)| *at <= now) {
            let (_, msg) = to_sender.pop_front().unwrap();
            sender.handle(now, msg);
        }
        let mut link = Link::default();
        sender.transmit(now, per_step, &mut link);
        for (at, msg) in link.0 {
            to_receiver.push_back((at - DELAY + delay, msg));
        }
        if n % report_every == 0 {
            run.read_per_report.push(read);
            read = 0;
        }
    }
    // Measured by the receiver's first ping, which goes out at the first step.
    let rtt = receiver
        .rtt()
        .expect("the receiver measured the round trip");
    assert!(
        rtt >= 2 * delay && rtt <= 2 * delay + 2 * step,
        "round trip {rtt:?} over a link of {delay:?} each way"
    );
    run
}

/// One credit stream over a long link (25 ms each way): the window auto-tunes to the
/// bandwidth-delay product, so the stream moves close to what the link carries.
#[test]
fn credit_fills_a_long_link() {
    // 256 KiB per millisecond: about 268 MB/s, a BDP of 13 MiB over the round trip.
    let per_step = 256 * 1024;
    let run = run_credit_link(
        Duration::from_millis(25),
        Duration::from_millis(1),
        per_step,
        3000,
        1000,
    );
    eprintln!("bytes read per second: {:?}", run.read_per_report);
    let link_per_second = per_step * 1000;
    // After the first second the window covers the round trip.
    for (second, bytes) in run.read_per_report.iter().enumerate().skip(1) {
        assert!(
            *bytes * 10 >= link_per_second * 8,
            "second {second}: {bytes} of {link_per_second} bytes"
        );
    }
}

/// A LAN (50 µs each way) whose sender is slower than the reader: the reader finds its
/// buffer empty all the time, but the window is not what limits the stream, so it stays
/// small instead of growing to the maximum, and the stream still moves at the sender's pace.
/// Small: twice what the sender moves in a millisecond, the shortest round trip windows are
/// sized for (the runtimes' turns make a credit's way round that long on a fast link).
#[test]
fn credit_stays_small_when_the_sender_sets_the_pace() {
    // At least 16 KiB (a message) per 50 µs.
    let per_step = 16 * 1024;
    let run = run_credit_link(
        Duration::from_micros(50),
        Duration::from_micros(50),
        per_step,
        20_000,
        10_000,
    );
    eprintln!(
        "bytes read per half second: {:?}, most committed {}",
        run.read_per_report, run.max_committed
    );
    // What the stream moved per millisecond.
    let per_millisecond = run.read_per_report.iter().max().unwrap() / 500;
    assert!(
        run.max_committed <= 2 * per_millisecond + 64 * 1024,
        "window grew to {} bytes",
        run.max_committed
    );
    // At the sender's pace: a message per step, 32 KiB (the sender's messages are larger
    // than per_step, the least it sends in a step).
    let sender_per_report = 32 * 1024 * 10_000;
    for (i, bytes) in run.read_per_report.iter().enumerate() {
        assert!(
            *bytes * 10 >= sender_per_report * 9,
            "half second {i}: {bytes} of {sender_per_report} bytes"
        );
    }
}
