//! rd-proto codec: encode and decode of Data (1 KiB, 32 KiB, 1 MiB), Connect and a
//! SyncConnections of 10,000 ids. `RD_BENCH_SCALE` (default 1) scales the measurement time.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rd_proto::{decode, ConnId, Message, Target};

fn criterion_config() -> Criterion {
    let scale = rd_benches::scale();
    Criterion::default()
        .sample_size(20)
        .warm_up_time(rd_benches::scaled_duration(0.5, scale))
        .measurement_time(rd_benches::scaled_duration(1.5, scale))
        .without_plots()
}

const MESSAGE_ID: i64 = 0x1234_5678_9abc;

fn payload(len: usize) -> Bytes {
    let mut rng = rd_benches::Rng::new(len as u64);
    let mut buf = vec![0u8; len];
    rng.fill(&mut buf);
    Bytes::from(buf)
}

fn data(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec/data");
    for (name, len) in [("1KiB", 1024), ("32KiB", 32 * 1024), ("1MiB", 1024 * 1024)] {
        let msg = Message::Data {
            conn_id: ConnId(42),
            payload: payload(len),
        };
        let wire = msg.to_bytes(MESSAGE_ID);
        group.throughput(Throughput::Bytes(len as u64));
        let mut buf = BytesMut::with_capacity(wire.len());
        group.bench_with_input(BenchmarkId::new("encode", name), &msg, |b, msg| {
            b.iter(|| {
                buf.clear();
                msg.encode(black_box(MESSAGE_ID), &mut buf);
                black_box(buf.len())
            })
        });
        group.bench_with_input(BenchmarkId::new("to_bytes", name), &msg, |b, msg| {
            b.iter(|| black_box(msg.to_bytes(black_box(MESSAGE_ID))))
        });
        group.bench_with_input(BenchmarkId::new("decode", name), &wire, |b, wire| {
            b.iter(|| black_box(decode(black_box(wire.clone()))))
        });
    }
    group.finish();
}

fn connect(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec/connect");
    let msg = Message::Connect {
        conn_id: ConnId(7),
        target: Target::new("tcp", "127.0.0.1:8125").expect("valid target"),
    };
    let wire = msg.to_bytes(MESSAGE_ID);
    group.throughput(Throughput::Elements(1));
    let mut buf = BytesMut::with_capacity(wire.len());
    group.bench_function("encode", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&msg).encode(MESSAGE_ID, &mut buf);
            black_box(buf.len())
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| black_box(decode(black_box(wire.clone()))))
    });
    group.finish();
}

fn sync_connections(c: &mut Criterion) {
    let mut group = c.benchmark_group("codec/sync_connections_10k");
    let msg = Message::SyncConnections {
        ids: (1..=10_000).collect(),
    };
    let wire = msg.to_bytes(MESSAGE_ID);
    group.throughput(Throughput::Elements(10_000));
    let mut buf = BytesMut::with_capacity(wire.len());
    group.bench_function("encode", |b| {
        b.iter(|| {
            buf.clear();
            black_box(&msg).encode(MESSAGE_ID, &mut buf);
            black_box(buf.len())
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| black_box(decode(black_box(wire.clone()))))
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = criterion_config();
    targets = data, connect, sync_connections
}
criterion_main!(benches);
