//! The rd-proto session state machine: two `Session`s back to back in memory. The server
//! writes, its transmits are delivered to the client, the client reads everything (and its
//! Resume/Error replies go back). One iteration moves one write of the given size.
//! `RD_BENCH_SCALE` (default 1) scales the measurement time.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rd_proto::{
    Config, ConnId, Event, Identity, ReadOutcome, Session, Side, StreamError, Target, Transmit,
};

fn criterion_config() -> Criterion {
    let scale = rd_benches::scale();
    Criterion::default()
        .sample_size(20)
        .warm_up_time(rd_benches::scaled_duration(0.5, scale))
        .measurement_time(rd_benches::scaled_duration(1.5, scale))
        .without_plots()
}

/// A server and a client session with one open stream from the server to the client.
struct Pair {
    now: Instant,
    server: Session,
    client: Session,
    server_id: ConnId,
    client_id: ConnId,
}

impl Pair {
    fn new() -> Self {
        let now = Instant::now();
        let mut server = Session::new(Side::Server, Config::default(), Identity::client(), now, 1);
        let mut client = Session::new(Side::Client, Config::default(), Identity::client(), now, 1);
        let target = Target::new("tcp", "127.0.0.1:8125").expect("valid target");
        let server_id = server.open_stream(now, target).expect("open");
        while let Some(t) = server.poll_transmit() {
            if let Transmit::Message(m) = t {
                client.handle_message(now, m).expect("connect");
            }
        }
        let mut client_id = None;
        while let Some(e) = client.poll_event() {
            if let Event::StreamRequested { id, .. } = e {
                client_id = Some(id);
            }
        }
        Self {
            now,
            server,
            client,
            server_id,
            client_id: client_id.expect("stream requested"),
        }
    }

    /// Server writes `data`, everything is delivered, the client reads it all.
    fn round(&mut self, data: &[u8]) -> usize {
        let mut written = 0;
        let mut read = 0;
        while written < data.len() {
            match self.server.write(self.server_id, &data[written..]) {
                Ok(n) => written += n,
                Err(StreamError::Blocked) => {}
                Err(e) => panic!("write: {e}"),
            }
            while let Some(t) = self.server.poll_transmit() {
                if let Transmit::Message(m) = t {
                    self.client.handle_message(self.now, m).expect("data");
                }
            }
            loop {
                match self.client.read(self.client_id, usize::MAX) {
                    Ok(ReadOutcome::Data(b)) => read += black_box(b).len(),
                    Ok(ReadOutcome::Eof) | Err(StreamError::Blocked) => break,
                    Err(e) => panic!("read: {e}"),
                }
            }
            while let Some(t) = self.client.poll_transmit() {
                if let Transmit::Message(m) = t {
                    self.server.handle_message(self.now, m).expect("control");
                }
            }
            while self.server.poll_event().is_some() {}
            while self.client.poll_event().is_some() {}
        }
        read
    }
}

fn payload(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    rd_benches::Rng::new(7).fill(&mut buf);
    buf
}

fn pipe_bytes(c: &mut Criterion) {
    let mut group = c.benchmark_group("session/pipe");
    for (name, len) in [
        ("1KiB", 1024),
        ("32KiB", 32 * 1024),
        ("256KiB", 256 * 1024),
        ("1MiB", 1024 * 1024),
    ] {
        let data = payload(len);
        let mut pair = Pair::new();
        group.throughput(Throughput::Bytes(len as u64));
        group.bench_with_input(BenchmarkId::from_parameter(name), &data, |b, data| {
            b.iter(|| pair.round(data))
        });
    }
    group.finish();
}

fn messages(c: &mut Criterion) {
    let mut group = c.benchmark_group("session/messages");
    for (name, len) in [("16B", 16), ("1KiB", 1024)] {
        let data = payload(len);
        let mut pair = Pair::new();
        group.throughput(Throughput::Elements(1));
        group.bench_with_input(BenchmarkId::from_parameter(name), &data, |b, data| {
            b.iter(|| pair.round(data))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = pipe_bytes, messages
}
criterion_main!(benches);
