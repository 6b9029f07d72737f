//! Property tests of the [`Streams`] API: any sequence of the peer's messages and the
//! application's calls keeps the session's budget equal to the sum of the streams' receive
//! halves, and (with credit) what is granted within the budget beyond the initial windows.

use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::codec::decode;
use crate::message::{Frame, CREDIT_INITIAL_WINDOW};

#[derive(Debug, Clone)]
enum Op {
    Open,
    Connect(u8),
    Data(u8, usize),
    Read(u8, usize),
    Write(u8, usize),
    Finish(u8),
    Reset(u8),
    Release(u8),
    PeerError(u8, bool),
    PeerFin(u8),
    PeerPause(u8, bool),
    PeerCredit(u8, u32),
    Sync(Vec<u8>),
    Transmit(u8),
    Advance(u16),
    Close(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let id = 0u8..6;
    prop_oneof![
        2 => Just(Op::Open),
        2 => id.clone().prop_map(Op::Connect),
        10 => (id.clone(), 0usize..70_000).prop_map(|(i, n)| Op::Data(i, n)),
        10 => (id.clone(), 1usize..200_000).prop_map(|(i, n)| Op::Read(i, n)),
        3 => (id.clone(), 0usize..100_000).prop_map(|(i, n)| Op::Write(i, n)),
        1 => id.clone().prop_map(Op::Finish),
        1 => id.clone().prop_map(Op::Reset),
        1 => id.clone().prop_map(Op::Release),
        1 => (id.clone(), any::<bool>()).prop_map(|(i, eof)| Op::PeerError(i, eof)),
        1 => id.clone().prop_map(Op::PeerFin),
        1 => (id.clone(), any::<bool>()).prop_map(|(i, p)| Op::PeerPause(i, p)),
        2 => (id.clone(), 0u32..1_000_000).prop_map(|(i, n)| Op::PeerCredit(i, n)),
        1 => proptest::collection::vec(id.clone(), 0..6).prop_map(Op::Sync),
        4 => (1u8..20).prop_map(Op::Transmit),
        3 => (0u16..500).prop_map(Op::Advance),
        1 => any::<bool>().prop_map(Op::Close),
    ]
}

fn config(credit: bool, half_close: bool) -> Config {
    Config {
        credit,
        half_close,
        // Small caps and budget so the sequences reach them.
        stream_receive_cap: 512 * 1024,
        credit_max_window: 256 * 1024,
        high_watermark: 128 * 1024,
        low_watermark: 16 * 1024,
        pause_floor: 16 * 1024,
        session_receive_budget: 512 * 1024,
        session_receive_ceiling: 2 * 1024 * 1024,
        session_receive_cap: 3 * 1024 * 1024,
        ..Config::default()
    }
}

fn run(ops: Vec<Op>, config: &Config) {
    let mut streams = Streams::new(Side::Server);
    let mut out = Outbox::new(1);
    let t0 = Instant::now();
    let mut now = t0;
    let target = Target::new("tcp", "127.0.0.1:80").expect("valid");
    // Ids of streams this side opened, and the ids the peer may use for its own.
    let id = |i: u8| ConnId(i64::from(i));
    for op in ops {
        let link = Link {
            rtt: Some(Duration::from_millis(20)),
            now,
        };
        match op {
            Op::Open => {
                streams.open(now, target.clone(), config, &mut out);
            }
            Op::Connect(i) => streams.on_connect(now, id(i), target.clone(), config, &mut out),
            Op::Data(i, n) => {
                let _ =
                    streams.on_data(now, id(i), Bytes::from(vec![1; n]), link, config, &mut out);
            }
            Op::Read(i, max) => {
                let _ = streams.read(id(i), max, link, config, &mut out);
            }
            Op::Write(i, n) => {
                let _ = streams.write(now, id(i), &vec![2; n], config, &mut out);
            }
            Op::Finish(i) => {
                let _ = streams.finish(id(i), config);
            }
            Op::Reset(i) => {
                let _ = streams.reset(id(i), "reset", config, &mut out);
            }
            Op::Release(i) => streams.release(id(i), config),
            Op::PeerError(i, eof) => {
                let text = if eof { EOF_TEXT.into() } else { "boom".into() };
                streams.on_error(id(i), text, config, &mut out);
            }
            Op::PeerFin(i) if config.half_close => streams.on_fin(id(i), config, &mut out),
            Op::PeerFin(_) => {}
            Op::PeerPause(i, paused) => streams.on_pause(id(i), paused, config),
            Op::PeerCredit(i, n) if config.credit => streams.on_credit(id(i), n, config, &mut out),
            Op::PeerCredit(..) => {}
            Op::Sync(ids) => {
                let ids: Vec<i64> = ids.into_iter().map(i64::from).collect();
                streams.on_sync(now, &ids, config, &mut out);
            }
            Op::Transmit(k) => {
                for _ in 0..k {
                    if streams.poll_transmit(config, &mut out).is_none() {
                        break;
                    }
                }
            }
            Op::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
            Op::Close(local) => streams.close(local, config, &mut out),
        }
        // The property: the budget is the sum of the halves...
        streams.assert_budget();
        let totals = streams.totals();
        assert!(totals.unread <= totals.committed);
        // ...and a grant takes the session past its budget only to give a stream back its
        // initial window.
        while let Some(msg) = out.pop_control() {
            if let Ok(Frame {
                message: Message::Credit { conn_id, .. },
                ..
            }) = decode(msg)
            {
                let held = streams
                    .held(conn_id)
                    .expect("credit for a stream in the table");
                assert!(
                    totals.committed <= config.session_receive_budget
                        || held.committed <= CREDIT_INITIAL_WINDOW as usize,
                    "a grant to {conn_id} took the session to {} bytes",
                    totals.committed
                );
            }
        }
        while out.pop_event().is_some() {}
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_sequence_keeps_the_budget_the_sum_of_the_halves(
        ops in proptest::collection::vec(op(), 1..300),
        credit in any::<bool>(),
        half_close in any::<bool>(),
    ) {
        run(ops, &config(credit, half_close));
    }
}
