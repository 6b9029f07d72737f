//! Arbitrary message sequences and application calls against both sides of a session:
//! never a panic, and the receive buffers stay within their caps.
#![no_main]

use std::time::{Duration, Instant};

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use rd_proto::{Config, ConnId, Identity, Session, Side, Target};

fuzz_target!(|data: &[u8]| {
    let start = Instant::now();
    let mut config = Config::default();
    config.high_watermark = 4096;
    config.low_watermark = 1024;
    config.pause_floor = 1024;
    config.stream_receive_cap = 16 * 1024;
    config.session_receive_budget = 24 * 1024;
    config.session_receive_ceiling = 32 * 1024;
    config.session_receive_cap = 32 * 1024;
    config.credit = data.first().is_some_and(|b| b & 2 == 2);
    config.stream_send_buffer = 2048;
    config.max_data_payload = 512;
    config.max_streams = 64;
    let side = if data.first().is_some_and(|b| b & 1 == 1) { Side::Client } else { Side::Server };
    let mut s = Session::new(side, config.clone(), Identity::client(), start, 1);
    let mut now = start;
    let mut rest = data.get(1..).unwrap_or_default();
    while let [op, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (chunk, tail) = tail.split_at(n);
        rest = tail;
        let id = ConnId(i64::from(*len % 8));
        match op % 8 {
            0 | 1 => {
                let _ = s.handle_message(now, Bytes::copy_from_slice(chunk));
            }
            2 => {
                if let Ok(t) = Target::new("tcp", "127.0.0.1:1") {
                    let _ = s.open_stream(now, t);
                }
            }
            3 => {
                let _ = s.write(id, chunk);
            }
            4 => {
                let _ = s.read(id, n + 1);
            }
            5 => match op % 3 {
                0 => drop(s.finish(id)),
                1 => drop(s.reset(id, "fuzz")),
                _ => s.release(id),
            },
            6 => {
                now += Duration::from_millis(u64::from(*len) * 500);
                s.handle_timeout(now);
            }
            _ => s.handle_keepalive(now),
        }
        while s.poll_transmit().is_some() {}
        while s.poll_event().is_some() {}
        let stats = s.stats();
        assert!(stats.receive_buffered <= config.session_receive_cap);
        s.assert_invariants();
        assert!(stats.streams <= config.max_streams);
    }
});
