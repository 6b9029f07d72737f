//! Credit over a long link (issue 24), on a virtual clock: an rd sender whose applications
//! always have data, an rd receiver whose reader takes everything at once, and between them
//! a link with a one-way delay, a rate and a deep buffer, as the relay in rd-bench's
//! long-link rows. Measured per round trip: what the reader got against what the link
//! carries, and how many round trips the credit windows took to get there.
#![allow(clippy::unwrap_used)]

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rd_proto::{
    Config, ConnId, Event, Identity, ReadOutcome, Session, Side, StreamError, Target, Transmit,
};

/// What the simulated link does to one direction.
#[derive(Debug, Clone, Copy)]
struct Link {
    /// One-way delay.
    delay: Duration,
    /// Bytes per second (the data direction only; the other direction carries grants).
    rate: u64,
}

/// One direction of the link: messages leave the serializer at the rate, in order, and
/// arrive `delay` later.
struct Wire {
    link: Link,
    next_free: Instant,
    queue: VecDeque<(Instant, Item)>,
}

enum Item {
    Message(Bytes),
    Ping,
    Pong,
}

impl Wire {
    fn new(link: Link, now: Instant) -> Self {
        Self {
            link,
            next_free: now,
            queue: VecDeque::new(),
        }
    }

    fn send(&mut self, now: Instant, item: Item, len: usize) {
        let start = self.next_free.max(now);
        let on_wire = Duration::from_nanos(len as u64 * 1_000_000_000 / self.link.rate);
        self.next_free = start + on_wire;
        self.queue
            .push_back((self.next_free + self.link.delay, item));
    }

    fn arrived(&mut self, now: Instant) -> Vec<Item> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            out.push(self.queue.pop_front().unwrap().1);
        }
        out
    }
}

/// What a run measured.
struct Run {
    /// Bytes the reader took, all streams, per round trip.
    per_rtt: Vec<usize>,
    /// What the link carries per round trip.
    link_per_rtt: usize,
    /// The most the receiver had committed (granted and unread) at once.
    max_committed: usize,
    /// Bytes each stream's reader took after the first `SETTLED` round trips.
    per_stream_settled: Vec<usize>,
}

/// Round trips after which the streams are compared with each other.
const SETTLED: usize = 8;

impl Run {
    /// The first round trip from which every later one moved at least `share` of what the
    /// link carries (the last, partial one aside).
    fn ramp(&self, share: f64) -> usize {
        let full = |b: &usize| *b as f64 >= share * self.link_per_rtt as f64;
        let n = self.per_rtt.len() - 1;
        (0..n)
            .find(|&i| self.per_rtt[i..n].iter().all(full))
            .unwrap_or(n)
    }

    /// What the reader got after round trip `from`, against what the link carried.
    fn share_after(&self, from: usize) -> f64 {
        let n = self.per_rtt.len() - 1;
        let got: usize = self.per_rtt[from..n].iter().sum();
        got as f64 / (self.link_per_rtt * (n - from)) as f64
    }
}

/// An rd sender and an rd receiver across a [`Link`], on a virtual clock.
struct Pair {
    now: Instant,
    step: Duration,
    receiver: Session,
    sender: Session,
    /// Grants and pings; data and pongs go the other way.
    to_sender: Wire,
    to_receiver: Wire,
}

impl Pair {
    fn new(link: Link, config: Config) -> Self {
        let t0 = Instant::now();
        // The direction from the receiver carries grants and pings, not bytes worth pacing.
        let quiet = Link {
            rate: u64::MAX / 2,
            ..link
        };
        let mut pair = Self {
            now: t0,
            step: Duration::from_micros(250),
            receiver: Session::new(Side::Server, config.clone(), Identity::client(), t0, 1),
            sender: Session::new(Side::Client, config, Identity::client(), t0, 1),
            to_sender: Wire::new(quiet, t0),
            to_receiver: Wire::new(link, t0),
        };
        // The session's first round trip is measured on a quiet link, as in rd-bench (the
        // agents connect before the downloads start).
        while pair.receiver.rtt().is_none() {
            pair.step();
        }
        pair
    }

    /// One step: deliveries both ways, the sender's applications fill their streams, and
    /// both sessions transmit what they may.
    fn step(&mut self) {
        self.now += self.step;
        let now = self.now;
        for item in self.to_receiver.arrived(now) {
            match item {
                Item::Message(m) => self.receiver.handle_message(now, m).unwrap(),
                Item::Pong => self.receiver.handle_pong(now),
                Item::Ping => self.receiver.handle_keepalive(now),
            }
        }
        while let Some(t) = self.receiver.poll_transmit() {
            match t {
                Transmit::Message(m) => {
                    let len = m.len();
                    self.to_sender.send(now, Item::Message(m), len);
                }
                Transmit::Ping => self.to_sender.send(now, Item::Ping, 2),
            }
        }
        for item in self.to_sender.arrived(now) {
            match item {
                Item::Message(m) => self.sender.handle_message(now, m).unwrap(),
                Item::Ping => {
                    // The sender's websocket answers at once, ahead of the Data it sends
                    // next (but behind what is already on the link).
                    self.sender.handle_keepalive(now);
                    self.to_receiver.send(now, Item::Pong, 2);
                }
                Item::Pong => self.sender.handle_pong(now),
            }
        }
        // The link's buffer is deep: what the sender may send goes out now.
        self.fill_sender();
        while let Some(t) = self.sender.poll_transmit() {
            match t {
                Transmit::Message(m) => {
                    let len = m.len();
                    self.to_receiver.send(now, Item::Message(m), len);
                }
                Transmit::Ping => self.to_receiver.send(now, Item::Ping, 2),
            }
            self.fill_sender();
        }
    }

    /// The sender's applications always have data: they write until blocked whenever told.
    fn fill_sender(&mut self) {
        let chunk = [7u8; 64 * 1024];
        while let Some(ev) = self.sender.poll_event() {
            if let Event::StreamRequested { id, .. } | Event::StreamWritable { id } = ev {
                while self.sender.write(id, &chunk).is_ok() {}
            }
        }
    }
}

/// `streams` bulk streams from an rd sender to an rd receiver over `link` for `rtts` round
/// trips.
fn run(link: Link, streams: usize, rtts: u32, config: Config) -> Run {
    let rtt = 2 * link.delay;
    let mut pair = Pair::new(link, config);
    let target = Target::new("tcp", "127.0.0.1:80").unwrap();
    let ids: Vec<ConnId> = (0..streams)
        .map(|_| pair.receiver.open_stream(pair.now, target.clone()).unwrap())
        .collect();
    let mut per_rtt = vec![0usize];
    let mut bucket_end = pair.now + rtt;
    let mut max_committed = 0;
    let mut per_stream_settled = vec![0; streams];
    let end = pair.now + rtt * rtts;
    while pair.now < end {
        pair.step();
        let receiver = &mut pair.receiver;
        for (i, &id) in ids.iter().enumerate() {
            loop {
                // In pieces, as a proxy's reader takes them.
                match receiver.read(id, 8 * 1024) {
                    Ok(ReadOutcome::Data(b)) => {
                        *per_rtt.last_mut().unwrap() += b.len();
                        if per_rtt.len() > SETTLED {
                            per_stream_settled[i] += b.len();
                        }
                    }
                    Err(StreamError::Blocked) => break,
                    other => panic!("reader: {other:?}"),
                }
            }
        }
        while receiver.poll_event().is_some() {}
        max_committed = max_committed.max(receiver.stats().receive_committed);
        receiver.assert_invariants();
        if pair.now >= bucket_end {
            per_rtt.push(0);
            bucket_end += rtt;
        }
    }
    let link_per_rtt = (link.rate as u128 * rtt.as_nanos() / 1_000_000_000) as usize;
    eprintln!(
        "{streams} stream(s), {rtt:?} round trip, {} MB/s: per round trip (MB) {:?}; \
         most committed {} MiB",
        link.rate / 1_000_000,
        per_rtt
            .iter()
            .map(|b| (*b as f64 / 1e5).round() / 10.0)
            .collect::<Vec<_>>(),
        max_committed >> 20
    );
    Run {
        per_rtt,
        link_per_rtt,
        max_committed,
        per_stream_settled,
    }
}

fn credit() -> Config {
    let mut c = Config::default();
    c.credit = true;
    c
}

const RATE: u64 = 100_000_000;

fn check(run: &Run, max_ramp: usize) {
    let ramp = run.ramp(0.95);
    let after = run.share_after(ramp);
    eprintln!("ramp: {ramp} round trips, then {after:.3} of the link");
    assert!(
        ramp <= max_ramp,
        "the windows took {ramp} round trips to fill the link"
    );
    assert!(after >= 0.95, "after the ramp: {after:.3} of the link");
}

/// A link of round trip `rtt_ms` at [`RATE`].
fn long_link(rtt_ms: u64) -> Link {
    Link {
        delay: Duration::from_millis(rtt_ms / 2),
        rate: RATE,
    }
}

/// 200 ms at 100 MB/s: a bandwidth-delay product of 20 MB, one stream.
#[test]
fn credit_fills_a_200_ms_link() {
    let run = run(long_link(200), 1, 20, credit());
    check(&run, 5);
}

/// 50 ms at 100 MB/s: 5 MB in flight, one stream.
#[test]
fn credit_fills_a_50_ms_link() {
    let run = run(long_link(50), 1, 40, credit());
    check(&run, 5);
}

/// Eight streams share a 200 ms link: together they fill it, and the windows the
/// receiver committed stay within the session budget.
#[test]
fn eight_credit_streams_fill_a_200_ms_link_within_the_budget() {
    let config = credit();
    let run = run(long_link(200), 8, 20, config.clone());
    check(&run, 5);
    assert!(run.max_committed <= config.session_receive_budget);
    // Once the windows have settled, the streams share the link about equally (so they
    // finish about together): none gets less than half its share.
    let total: usize = run.per_stream_settled.iter().sum();
    eprintln!(
        "per stream after {SETTLED} round trips: {:?}",
        run.per_stream_settled
    );
    for (i, got) in run.per_stream_settled.iter().enumerate() {
        assert!(
            got * 8 * 2 >= total,
            "stream {i} got {got} of {total} bytes"
        );
    }
}

/// A peer that sends beyond the credit it was granted loses that stream, and only that
/// stream: at once for a message larger than the credit left plus a send buffer (what a
/// released sender may still send whatever its credit), else once what it sent beyond its
/// credit passes the stream's cap.
#[test]
fn a_sender_beyond_its_credit_is_reset() {
    let config = credit();
    let initial = rd_proto::CREDIT_INITIAL_WINDOW as usize;
    let data = |id: ConnId, n: usize| {
        rd_proto::Message::Data {
            conn_id: id,
            payload: Bytes::from(vec![7u8; n]),
        }
        .to_bytes(1)
    };
    for one_message in [true, false] {
        let t0 = Instant::now();
        let mut receiver = Session::new(Side::Server, config.clone(), Identity::client(), t0, 1);
        let target = Target::new("tcp", "127.0.0.1:80").unwrap();
        let honest = receiver.open_stream(t0, target.clone()).unwrap();
        let flooding = receiver.open_stream(t0, target).unwrap();
        while receiver.poll_transmit().is_some() {}
        receiver.handle_message(t0, data(honest, initial)).unwrap();
        if one_message {
            receiver
                .handle_message(t0, data(flooding, initial + config.stream_send_buffer))
                .unwrap();
            assert!(
                receiver.is_stream_open(flooding),
                "within credit and a send buffer"
            );
            receiver
                .handle_message(t0, data(flooding, initial + config.stream_send_buffer + 1))
                .unwrap();
        } else {
            let mut sent = 0;
            while receiver.is_stream_open(flooding) {
                receiver
                    .handle_message(t0, data(flooding, 64 * 1024))
                    .unwrap();
                sent += 64 * 1024;
                assert!(sent <= config.stream_receive_cap + 64 * 1024, "never reset");
            }
            assert!(sent > config.stream_receive_cap);
        }
        assert!(!receiver.is_stream_open(flooding));
        let mut reset = Vec::new();
        while let Some(Transmit::Message(m)) = receiver.poll_transmit() {
            if let rd_proto::Message::Error { conn_id, text } = rd_proto::decode(m).unwrap().message
            {
                reset.push((conn_id, text));
            }
        }
        assert_eq!(reset.len(), 1, "{reset:?}");
        assert_eq!(reset[0].0, flooding);
        assert!(
            reset[0].1.contains("ignored flow control"),
            "{}",
            reset[0].1
        );
        let events: Vec<Event> = std::iter::from_fn(|| receiver.poll_event()).collect();
        assert!(events.contains(&Event::LimitExceeded(rd_proto::Limit::StreamReceiveCap)));
        // The honest stream and the session go on.
        assert!(receiver.is_stream_open(honest));
        assert_eq!(
            receiver.read(honest, usize::MAX),
            Ok(ReadOutcome::Data(Bytes::from(vec![7u8; initial])))
        );
        assert!(receiver.end().is_none());
        receiver.assert_invariants();
    }
}
