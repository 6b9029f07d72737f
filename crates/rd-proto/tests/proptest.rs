//! Property tests: the codec round-trips every message, decoding never panics, and random
//! operation sequences on a session pair keep the invariants checked by `common::Sim`.
//!
//! Go's `Test_encodeConnectionIDs` (SyncConnections payload round trip with
//! random ids) is `round_trip` with the `SyncConnections` strategy; `TestNewServerMessage_266`
//! (Connect up to 266 bytes) is covered by the target strategy's lengths and by sim.rs.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use common::{Dir, Sim};
use proptest::prelude::*;
use rd_proto::varint::put_varint;
use rd_proto::{
    decode, ClientSession, Config, ConnId, Event, Frame, Message, ReadOutcome, SessionEnd, Side,
    StreamError, Target, MAX_CONNECT_PAYLOAD,
};

// ----- strategies -------------------------------------------------------------------------------

fn target() -> impl Strategy<Value = Target> {
    (
        "[a-z0-9]{1,5}",
        "[a-zA-Z0-9.:/_\\[\\]-]{1,200}",
        proptest::option::of("[a-zA-Z0-9._-]{1,40}"),
    )
        .prop_map(|(proto, address, key)| {
            let t = Target::new(proto, address).unwrap();
            match key {
                Some(key) => t.routed_via(key).unwrap(),
                None => t,
            }
        })
}

fn conn_id() -> impl Strategy<Value = ConnId> {
    any::<i64>().prop_map(ConnId)
}

fn client_session() -> impl Strategy<Value = ClientSession> {
    ("[a-zA-Z0-9:._-]{0,60}", 0..=i64::MAX).prop_map(|(client_key, session_key)| ClientSession {
        client_key,
        session_key,
    })
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (conn_id(), proptest::collection::vec(any::<u8>(), 0..2000)).prop_map(
            |(conn_id, payload)| Message::Data {
                conn_id,
                payload: Bytes::from(payload)
            }
        ),
        (conn_id(), target()).prop_map(|(conn_id, target)| Message::Connect { conn_id, target }),
        (conn_id(), "[ -~]{0,100}").prop_map(|(conn_id, text)| Message::Error { conn_id, text }),
        client_session().prop_map(Message::AddClient),
        client_session().prop_map(Message::RemoveClient),
        conn_id().prop_map(|conn_id| Message::Pause { conn_id }),
        conn_id().prop_map(|conn_id| Message::Resume { conn_id }),
        conn_id().prop_map(|conn_id| Message::Fin { conn_id }),
        conn_id().prop_map(|conn_id| Message::ConnectAck { conn_id }),
        proptest::collection::vec(any::<i64>(), 0..64)
            .prop_map(|ids| Message::SyncConnections { ids }),
        (
            any::<i64>().prop_filter("known type", |c| !(1..=8).contains(c)
                && !(64..=68).contains(c)),
            conn_id()
        )
            .prop_map(|(type_code, conn_id)| Message::Unknown { type_code, conn_id }),
    ]
}

// ----- codec ------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn round_trip(m in message(), id in any::<i64>()) {
        if let Message::Connect { target, .. } = &m {
            prop_assert!(target.wire_len() <= MAX_CONNECT_PAYLOAD);
        }
        let bytes = m.to_bytes(id);
        prop_assert_eq!(bytes.len(), m.encoded_len(id));
        let frame = decode(bytes.clone()).unwrap();
        prop_assert_eq!(frame, Frame { message_id: id, message: m.clone() });
        // `encode` appends.
        let mut buf = BytesMut::from(&b"xyz"[..]);
        m.encode(id, &mut buf);
        prop_assert_eq!(&buf[..3], b"xyz");
        prop_assert_eq!(&buf[3..], &bytes[..]);
    }

    #[test]
    fn decode_of_arbitrary_bytes_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(frame) = decode(Bytes::from(raw)) {
            // Whatever decodes re-encodes to something that decodes the same.
            let again = decode(frame.message.to_bytes(frame.message_id)).unwrap();
            prop_assert_eq!(again, frame);
        }
    }

    #[test]
    fn decode_after_a_valid_header_never_panics(
        id in any::<i64>(),
        conn in any::<i64>(),
        type_code in 0i64..=10,
        deadline in proptest::option::of(any::<i64>()),
        payload in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        let mut raw = Vec::new();
        put_varint(&mut raw, id);
        put_varint(&mut raw, conn);
        put_varint(&mut raw, type_code);
        let type_end = raw.len();
        if let Some(d) = deadline {
            put_varint(&mut raw, d);
        }
        raw.extend_from_slice(&payload);
        let body_start = raw.len() - payload.len();
        let result = decode(Bytes::from(raw.clone()));
        if let Ok(frame) = &result {
            prop_assert_eq!(frame.message_id, id);
            let again = decode(frame.message.to_bytes(frame.message_id)).unwrap();
            prop_assert_eq!(&again, frame);
        }
        match type_code {
            // Data with its deadline: the rest is the payload, whatever it is.
            1 if deadline.is_some() => prop_assert_eq!(
                result.unwrap().message,
                Message::Data { conn_id: ConnId(conn), payload: Bytes::from(raw[body_start..].to_vec()) }
            ),
            // Header-only types ignore trailing bytes.
            6 => prop_assert_eq!(result.unwrap().message, Message::Pause { conn_id: ConnId(conn) }),
            7 => prop_assert_eq!(result.unwrap().message, Message::Resume { conn_id: ConnId(conn) }),
            // No deadline field: whatever follows the type is the payload.
            8 => prop_assert_eq!(result.is_ok(), (raw.len() - type_end) % 8 == 0),
            0 | 9 | 10 => prop_assert_eq!(
                result.unwrap().message,
                Message::Unknown { type_code, conn_id: ConnId(conn) }
            ),
            _ => {}
        }
    }
}

// ----- session pairs ----------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Open,
    Write {
        server: bool,
        pick: usize,
        len: usize,
    },
    Read {
        server: bool,
        pick: usize,
        max: usize,
    },
    Finish {
        server: bool,
        pick: usize,
    },
    Reset {
        server: bool,
        pick: usize,
    },
    Release {
        server: bool,
        pick: usize,
    },
    Deliver {
        to_server: bool,
        n: usize,
    },
    DeliverAll,
    /// Writes and delivers one way only, `rounds` times: the receiver's Pause stays in its
    /// queue, as over a long round trip, so the hard caps get hit.
    Flood {
        server: bool,
        pick: usize,
        rounds: usize,
    },
    Advance {
        millis: u64,
    },
    Close {
        server: bool,
    },
}

fn op() -> impl Strategy<Value = Op> {
    op_with_finish_weight(2)
}

/// [`op`] with finishes `finish` times as likely as there (half-close runs want many).
fn op_with_finish_weight(finish: u32) -> impl Strategy<Value = Op> {
    let pick = 0usize..4;
    // Weights: mostly writes and deliveries, reads smaller than writes so buffers fill up and
    // flow control kicks in; closing a whole session is rare.
    prop_oneof![
        10 => Just(Op::Open),
        80 => (any::<bool>(), pick.clone(), 0usize..4000)
            .prop_map(|(server, pick, len)| Op::Write { server, pick, len }),
        50 => (any::<bool>(), pick.clone(), 1usize..2500)
            .prop_map(|(server, pick, max)| Op::Read { server, pick, max }),
        finish => (any::<bool>(), pick.clone()).prop_map(|(server, pick)| Op::Finish { server, pick }),
        2 => (any::<bool>(), pick.clone()).prop_map(|(server, pick)| Op::Reset { server, pick }),
        2 => (any::<bool>(), pick).prop_map(|(server, pick)| Op::Release { server, pick }),
        90 => (any::<bool>(), 1usize..8).prop_map(|(to_server, n)| Op::Deliver { to_server, n }),
        15 => Just(Op::DeliverAll),
        4 => (any::<bool>(), 0usize..4, 1usize..12)
            .prop_map(|(server, pick, rounds)| Op::Flood { server, pick, rounds }),
        15 => (0u64..20_000).prop_map(|millis| Op::Advance { millis }),
        1 => (any::<bool>(), proptest::bool::weighted(0.25)).prop_map(|(server, really)| {
            if really {
                Op::Close { server }
            } else {
                Op::DeliverAll
            }
        }),
    ]
}

/// Small limits so that Pause, Resume and the hard cap all happen within a few operations.
fn small_config() -> Config {
    let mut c = Config::default();
    c.high_watermark = 4096;
    c.low_watermark = 1024;
    c.pause_floor = 1024;
    c.stream_receive_cap = 12 * 1024;
    c.session_receive_budget = 24 * 1024;
    c.session_receive_ceiling = 24 * 1024;
    c.session_receive_cap = 32 * 1024;
    c.stream_send_buffer = 2048;
    c.max_data_payload = 700;
    c.max_queued_control = 64;
    c.validate().unwrap();
    c
}

/// Byte `pos` of the data `writer` sends on `id`: a hash, so lost, duplicated or reordered
/// chunks show.
fn pattern(writer: Side, id: ConnId, pos: usize) -> u8 {
    let salt = u64::from(writer == Side::Server) << 40 | id.0 as u64;
    ((pos as u64 ^ salt).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

fn other(side: Side) -> Side {
    match side {
        Side::Client => Side::Server,
        Side::Server => Side::Client,
    }
}

fn side(server: bool) -> Side {
    if server {
        Side::Server
    } else {
        Side::Client
    }
}

fn run(ops: Vec<Op>, config: Config) {
    let mut sim = Sim::new(config);
    let mut ids: Vec<ConnId> = Vec::new();
    // (writer, id) -> bytes written; (reader, id) -> bytes read.
    let mut written: HashMap<(bool, ConnId), usize> = HashMap::new();
    let mut read: HashMap<(bool, ConnId), usize> = HashMap::new();

    for op in ops {
        match op {
            Op::Open => {
                if let Ok(id) = sim.open(Side::Server) {
                    assert!(!ids.contains(&id), "server ids are never reused");
                    ids.push(id);
                }
            }
            Op::Write { server, pick, len } => {
                let Some(&id) = ids.get(pick % ids.len().max(1)) else {
                    continue;
                };
                let w = side(server);
                let pos = written.get(&(server, id)).copied().unwrap_or(0);
                let data: Vec<u8> = (pos..pos + len).map(|p| pattern(w, id, p)).collect();
                if let Ok(n) = sim.write(w, id, &data) {
                    assert!(n <= len);
                    *written.entry((server, id)).or_insert(0) += n;
                }
            }
            Op::Read { server, pick, max } => {
                let Some(&id) = ids.get(pick % ids.len().max(1)) else {
                    continue;
                };
                // The application reads until it has `max` bytes or would block.
                let r = side(server);
                let mut budget = max;
                while budget > 0 {
                    let Ok(ReadOutcome::Data(b)) = sim.read(r, id, budget) else {
                        break;
                    };
                    budget -= b.len();
                    let pos = read.entry((server, id)).or_insert(0);
                    let sent = written.get(&(!server, id)).copied().unwrap_or(0);
                    assert!(*pos + b.len() <= sent, "read more than was written");
                    for (i, &byte) in b.iter().enumerate() {
                        assert_eq!(byte, pattern(other(r), id, *pos + i), "byte {}", *pos + i);
                    }
                    *pos += b.len();
                }
            }
            Op::Finish { server, pick } => {
                if let Some(&id) = ids.get(pick % ids.len().max(1)) {
                    let _ = sim.finish(side(server), id);
                }
            }
            Op::Reset { server, pick } => {
                if let Some(&id) = ids.get(pick % ids.len().max(1)) {
                    let _ = sim.reset(side(server), id, "reset by test");
                }
            }
            Op::Release { server, pick } => {
                if let Some(&id) = ids.get(pick % ids.len().max(1)) {
                    sim.release(side(server), id);
                }
            }
            Op::Deliver { to_server, n } => {
                sim.pump(Side::Client);
                sim.pump(Side::Server);
                let dir = if to_server {
                    Dir::ClientToServer
                } else {
                    Dir::ServerToClient
                };
                sim.deliver(dir, n);
            }
            Op::DeliverAll => {
                sim.flush();
            }
            Op::Flood {
                server,
                pick,
                rounds,
            } => {
                let Some(&id) = ids.get(pick % ids.len().max(1)) else {
                    continue;
                };
                let w = side(server);
                for _ in 0..rounds {
                    let pos = written.get(&(server, id)).copied().unwrap_or(0);
                    let data: Vec<u8> = (pos..pos + 2048).map(|p| pattern(w, id, p)).collect();
                    if let Ok(n) = sim.write(w, id, &data) {
                        *written.entry((server, id)).or_insert(0) += n;
                    }
                    sim.pump(w);
                    let dir = if server {
                        Dir::ServerToClient
                    } else {
                        Dir::ClientToServer
                    };
                    sim.deliver(dir, usize::MAX);
                }
            }
            Op::Advance { millis } => {
                sim.now += Duration::from_millis(millis);
                sim.tick();
            }
            Op::Close { server } => sim.close(side(server), SessionEnd::Local),
        }
    }

    // Wind down: everything delivered, every handle released.
    // Deliveries can wait on `wants_input` until releases free buffers, so a Connect may
    // arrive after the first round of releases: release again until nothing moves.
    for _ in 0..4 {
        sim.flush();
        for &id in &ids {
            sim.release(Side::Server, id);
            sim.release(Side::Client, id);
        }
    }
    assert!(!sim.flush(), "quiet after releasing everything");
    let both_alive = sim.client.session.end().is_none() && sim.server.session.end().is_none();
    for s in [Side::Client, Side::Server] {
        let p = sim.peer(s);
        let stats = p.session.stats();
        assert_eq!(stats.receive_buffered, 0, "{s:?}");
        if both_alive || p.session.end().is_some() {
            assert_eq!(stats.streams, 0, "{s:?} leaked streams: {:?}", p.session);
        }
        // Every StreamClosed names a stream this pair opened.
        for ev in &p.events {
            if let Event::StreamClosed { id, .. } = ev {
                assert!(ids.contains(id), "{ev:?}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(192))]

    #[test]
    fn random_operations_keep_session_invariants(ops in proptest::collection::vec(op(), 1..300)) {
        run(ops, small_config());
    }

    /// The same with rd's half-close extension (and credit or Pause/Resume): the common
    /// harness then also checks that no Data follows a Fin, that reads after the peer's Fin
    /// never wait, and that a stream ends cleanly only once both sides sent Fin.
    #[test]
    fn random_operations_with_half_close_keep_session_invariants(
        ops in proptest::collection::vec(op_with_finish_weight(12), 1..300),
        credit in any::<bool>(),
    ) {
        let mut config = small_config();
        config.half_close = true;
        if credit {
            // Each direction starts with 32 KiB of credit: the caps must allow it.
            config.credit = true;
            config.stream_receive_cap = 48 * 1024;
            config.credit_max_window = 48 * 1024;
            config.session_receive_budget = 96 * 1024;
            config.session_receive_ceiling = 96 * 1024;
            config.session_receive_cap = 128 * 1024;
            config.validate().unwrap();
        }
        run(ops, config);
    }
}

/// A fixed, long sequence as a smoke test of the harness itself: it must see flow control.
#[test]
fn harness_sees_pause_and_resume() {
    let mut sim = Sim::new(small_config());
    let id = sim.open(Side::Server).unwrap();
    sim.flush();
    let data = vec![5u8; 2048];
    for _ in 0..4 {
        let _ = sim.write(Side::Server, id, &data);
        sim.flush();
    }
    assert!(!sim.client.sent_of_type(6).is_empty(), "Pause sent");
    assert_eq!(
        sim.write(Side::Server, id, &data),
        Err(StreamError::Blocked)
    );
    while let Ok(ReadOutcome::Data(_)) = sim.read(Side::Client, id, 1000) {}
    sim.flush();
    assert!(!sim.client.sent_of_type(7).is_empty(), "Resume sent");
    assert!(sim
        .server
        .take_events()
        .contains(&Event::StreamWritable { id }));
}
