//! Golden vectors: real traffic between the Go example client and server
//! (`tests/vectors/go-remotedialer-get.json`), decoded and re-encoded byte for byte, plus the
//! websocket framing around it (fragmentation and masking) parsed by a tiny frame parser.
//!
//! docs/protocol.md coverage: "Transport" (one binary message per remotedialer message,
//! fragmentation, masking); "Message layout" (varints, incl. real 9-byte message ids; the
//! header, the legacy deadline only for Data/Connect; type codes 1-8 all captured; payload
//! forms; the worked examples); "Connections" (server ids start at 2, 3, 4).
#![allow(clippy::unwrap_used)]

use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rd_proto::{decode, ConnId, Event, Identity, Message, MessageType, ReadOutcome, Session, Side};
use serde_json::Value;

const VECTORS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/go-remotedialer-get.json"
);

/// Binary messages with full hex in the file (counted independently below as well).
const FULL_BINARY_MESSAGES: usize = 26;
/// Binary messages whose hex is elided (long Data runs of the pause_resume phase).
const ELIDED_RUNS: usize = 3;

fn vectors() -> Value {
    let text = std::fs::read_to_string(VECTORS).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every captured message, in capture order, with the name of its section.
fn all_messages(v: &Value) -> Vec<(&'static str, &Value)> {
    let mut out = Vec::new();
    for (name, section) in [
        ("messages", &v["messages"]),
        ("later_phases_same_session", &v["later_phases_same_session"]),
        ("ha_peer_link.messages", &v["ha_peer_link"]["messages"]),
    ] {
        for m in section.as_array().unwrap() {
            out.push((name, m));
        }
    }
    out
}

fn is_full_binary(m: &Value) -> bool {
    m["opcode"] == "binary" && m["hex"].is_string()
}

fn type_name(code: i64) -> &'static str {
    match MessageType::from_code(code) {
        Some(MessageType::Data) => "Data",
        Some(MessageType::Connect) => "Connect",
        Some(MessageType::Error) => "Error",
        Some(MessageType::AddClient) => "AddClient",
        Some(MessageType::RemoveClient) => "RemoveClient",
        Some(MessageType::Pause) => "Pause",
        Some(MessageType::Resume) => "Resume",
        Some(MessageType::SyncConnections) => "SyncConnections",
        Some(MessageType::Credit) => "Credit",
        Some(MessageType::Fin) => "Fin",
        Some(MessageType::GoAway) => "GoAway",
        Some(MessageType::Replicas) => "Replicas",
        Some(MessageType::ConnectAck) => "ConnectAck",
        None => "Unknown",
    }
}

/// Decodes one captured message, compares every field with the capture's `decoded`, and
/// re-encodes it. Returns the message's type name.
fn check_message(section: &str, index: usize, m: &Value) -> String {
    let ctx = format!("{section}[{index}]");
    let raw = hex::decode(m["hex"].as_str().unwrap()).unwrap();
    let d = &m["decoded"];
    assert_eq!(
        raw.len() as u64,
        m["payload_len"].as_u64().unwrap(),
        "{ctx}"
    );
    let frame = decode(Bytes::from(raw.clone())).unwrap_or_else(|e| panic!("{ctx}: {e}"));

    assert_eq!(
        frame.message_id,
        d["message_id"].as_i64().unwrap(),
        "{ctx} id"
    );
    assert_eq!(
        frame.message.conn_id(),
        ConnId(d["conn_id"].as_i64().unwrap()),
        "{ctx} conn"
    );
    let code = frame.message.type_code();
    assert_eq!(code, d["type_code"].as_i64().unwrap(), "{ctx} type code");
    assert_eq!(
        type_name(code),
        d["type"].as_str().unwrap(),
        "{ctx} type name"
    );
    if let Some(deadline) = d.get("legacy_deadline_ms") {
        assert_eq!(
            deadline.as_i64(),
            Some(rd_proto::LEGACY_DEADLINE_MS),
            "{ctx}"
        );
        assert!(
            MessageType::from_code(code).unwrap().has_deadline(),
            "{ctx}"
        );
    } else {
        assert!(
            !MessageType::from_code(code).unwrap().has_deadline(),
            "{ctx}"
        );
    }

    let header_len = d["header_len"].as_u64().unwrap() as usize;
    let body = &raw[header_len..];
    assert_eq!(body.len() as u64, d["body_len"].as_u64().unwrap(), "{ctx}");
    let body_text = d["body_text"].as_str();
    if let Some(text) = body_text {
        // The capture's text is lossless for every message in the file.
        assert_eq!(text.as_bytes(), body, "{ctx} body_text");
    }
    match &frame.message {
        Message::Data { payload, .. } => assert_eq!(&payload[..], body, "{ctx} data"),
        Message::Connect { target, .. } => {
            assert_eq!(Some(target.to_string().as_str()), body_text, "{ctx}");
            assert_eq!(target.wire_len(), body.len(), "{ctx}");
            let routed = body_text.unwrap().split_once("::");
            assert_eq!(target.client_key(), routed.map(|(k, _)| k), "{ctx}");
        }
        Message::Error { text, .. } => assert_eq!(Some(text.as_str()), body_text, "{ctx}"),
        Message::AddClient(c) | Message::RemoveClient(c) => {
            let (key, session) = body_text.unwrap().split_once('/').unwrap();
            assert_eq!(c.client_key, key, "{ctx}");
            assert_eq!(c.session_key, session.parse::<i64>().unwrap(), "{ctx}");
            assert!(c.session_key >= 0, "{ctx}");
        }
        Message::Pause { .. } | Message::Resume { .. } => assert!(body.is_empty(), "{ctx}"),
        Message::SyncConnections { ids } => {
            let want: Vec<i64> = d["sync_connection_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect();
            assert_eq!(ids, &want, "{ctx} sync ids");
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ctx} sorted");
        }
        Message::Unknown { .. }
        | Message::Credit { .. }
        | Message::Fin { .. }
        | Message::GoAway { .. }
        | Message::Replicas { .. }
        | Message::ConnectAck { .. } => {
            panic!("{ctx}: Go never sent an unknown type or one of rd's extensions")
        }
    }

    // Re-encode: identical bytes, both through `encode` and `to_bytes`.
    let mut buf = BytesMut::new();
    frame.message.encode(frame.message_id, &mut buf);
    assert_eq!(hex::encode(&buf), hex::encode(&raw), "{ctx} re-encoded");
    assert_eq!(frame.message.to_bytes(frame.message_id), raw, "{ctx}");
    assert_eq!(
        frame.message.encoded_len(frame.message_id),
        raw.len(),
        "{ctx}"
    );
    assert_eq!(
        frame.message.encoded_len(frame.message_id) - body.len(),
        header_len,
        "{ctx} header length"
    );
    d["type"].as_str().unwrap().to_owned()
}

#[test]
fn every_captured_message_decodes_and_reencodes_identically() {
    let v = vectors();
    let messages = all_messages(&v);
    let expected = messages.iter().filter(|(_, m)| is_full_binary(m)).count();
    assert_eq!(expected, FULL_BINARY_MESSAGES, "vector file changed");

    let mut checked = 0;
    let mut types = std::collections::BTreeSet::new();
    for (i, (section, m)) in messages.iter().enumerate() {
        if is_full_binary(m) {
            types.insert(check_message(section, i, m));
            checked += 1;
        }
    }
    assert_eq!(
        checked, expected,
        "every captured binary message was checked"
    );
    // All eight types were captured from real Go peers.
    assert_eq!(types.len(), 8, "{types:?}");
}

#[test]
fn elided_runs_decode_from_their_prefix() {
    let v = vectors();
    let mut runs = 0;
    for (section, m) in all_messages(&v) {
        if m["opcode"] != "binary" || !m["hex"].is_null() {
            continue;
        }
        runs += 1;
        let run = &m["elided_run"];
        let first = &run["first_message"];
        let d = &first["decoded"];
        let prefix = hex::decode(first["hex_prefix"].as_str().unwrap()).unwrap();
        let frame = decode(Bytes::from(prefix.clone())).unwrap();
        assert_eq!(
            frame.message_id,
            d["message_id"].as_i64().unwrap(),
            "{section}"
        );
        assert_eq!(m["decoded"]["type"], "Data");
        assert_eq!(d["type_code"].as_i64(), Some(1));
        let Message::Data { conn_id, payload } = frame.message else {
            panic!("{section}: elided runs are Data: {frame:?}");
        };
        assert_eq!(conn_id, ConnId(d["conn_id"].as_i64().unwrap()));
        assert_eq!(conn_id, ConnId(m["decoded"]["conn_id"].as_i64().unwrap()));
        let header_len = d["header_len"].as_u64().unwrap() as usize;
        assert_eq!(
            payload.len(),
            prefix.len() - header_len,
            "truncated payload"
        );
        assert_eq!(
            first["payload_len"].as_u64().unwrap() - header_len as u64,
            d["body_len"].as_u64().unwrap()
        );
        // The header re-encodes to the captured prefix.
        let mut header = Vec::new();
        rd_proto::put_data_header(&mut header, frame.message_id, conn_id);
        assert_eq!(header, prefix[..header_len]);
        assert_eq!(
            rd_proto::data_header_len(frame.message_id, conn_id),
            header_len
        );
        // Frame metadata of a gorilla client: 4096-byte fragments, masked, continuation
        // frames after the first, FIN only on the last.
        let frames = first["ws_frames"].as_array().unwrap();
        let total: u64 = frames
            .iter()
            .map(|f| f["payload_len"].as_u64().unwrap())
            .sum();
        assert_eq!(total, first["payload_len"].as_u64().unwrap());
        for (i, f) in frames.iter().enumerate() {
            let last = i + 1 == frames.len();
            assert_eq!(f["fin"].as_bool(), Some(last));
            assert_eq!(f["opcode"].as_u64(), Some(if i == 0 { 2 } else { 0 }));
            assert_eq!(f["masked"].as_bool(), Some(true));
            if !last {
                assert_eq!(f["payload_len"].as_u64(), Some(4096));
            }
        }
        // Histogram and totals are consistent.
        let hist = run["payload_len_histogram"].as_object().unwrap();
        let count: u64 = hist.values().map(|c| c.as_u64().unwrap()).sum();
        let bytes: u64 = hist
            .iter()
            .map(|(len, c)| len.parse::<u64>().unwrap() * c.as_u64().unwrap())
            .sum();
        assert_eq!(count, run["count"].as_u64().unwrap());
        assert_eq!(bytes, run["total_payload_len"].as_u64().unwrap());
    }
    assert_eq!(runs, ELIDED_RUNS);
}

// ----- websocket frames -------------------------------------------------------------------

#[derive(Debug, PartialEq)]
struct WsFrame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask_key: Option<[u8; 4]>,
    /// Unmasked.
    payload: Vec<u8>,
}

/// Parses exactly one RFC 6455 frame; the input must hold nothing else.
fn parse_frame(wire: &[u8]) -> WsFrame {
    assert!(wire.len() >= 2, "frame header");
    let fin = wire[0] & 0x80 != 0;
    let rsv = (wire[0] >> 4) & 0x7;
    let opcode = wire[0] & 0x0f;
    let masked = wire[1] & 0x80 != 0;
    let (len, mut pos) = match wire[1] & 0x7f {
        126 => (u64::from(u16::from_be_bytes([wire[2], wire[3]])), 4),
        127 => (u64::from_be_bytes(wire[2..10].try_into().unwrap()), 10),
        n => (u64::from(n), 2),
    };
    let mask_key = masked.then(|| {
        let k: [u8; 4] = wire[pos..pos + 4].try_into().unwrap();
        pos += 4;
        k
    });
    let len = usize::try_from(len).unwrap();
    assert_eq!(wire.len(), pos + len, "frame length");
    let mut payload = wire[pos..].to_vec();
    if let Some(k) = mask_key {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= k[i % 4]);
    }
    WsFrame {
        fin,
        rsv,
        opcode,
        mask_key,
        payload,
    }
}

/// Reassembles one websocket message from its frames: first frame carries the opcode,
/// continuation frames have opcode 0, the last has FIN.
fn reassemble(frames: &[WsFrame]) -> (u8, Vec<u8>) {
    assert!(!frames.is_empty());
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(f.rsv, 0, "no extensions negotiated");
        if i == 0 {
            assert_ne!(f.opcode, 0, "first frame is not a continuation");
        } else {
            assert_eq!(f.opcode, 0, "continuation frame");
        }
        assert_eq!(f.fin, i + 1 == frames.len(), "FIN only on the last frame");
        out.extend_from_slice(&f.payload);
    }
    (frames[0].opcode, out)
}

/// Builds frames the way gorilla does (for the parser's own test).
fn build_frame(fin: bool, opcode: u8, mask_key: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![(u8::from(fin) << 7) | opcode];
    let mask_bit = if mask_key.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask_key {
        Some(k) => {
            out.extend_from_slice(&k);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

#[test]
fn captured_websocket_frames_reassemble_to_the_messages() {
    let v = vectors();
    let mut with_wire = 0;
    let mut extended_16 = 0;
    for (section, m) in all_messages(&v) {
        let Some(hex_msg) = m["hex"].as_str() else {
            continue;
        };
        // In ha_peer_link, "client" is the dialing peer server, also a websocket client.
        let client_to_server = m["dir"] == "client->server";
        let mut frames = Vec::new();
        for f in m["ws_frames"].as_array().unwrap() {
            let wire = hex::decode(f["wire_hex"].as_str().unwrap()).unwrap();
            let frame = parse_frame(&wire);
            if wire[1] & 0x7f == 126 {
                extended_16 += 1;
            }
            assert_eq!(Some(frame.fin), f["fin"].as_bool());
            assert_eq!(Some(u64::from(frame.rsv)), f["rsv"].as_u64());
            assert_eq!(Some(u64::from(frame.opcode)), f["opcode"].as_u64());
            assert_eq!(Some(frame.mask_key.is_some()), f["masked"].as_bool());
            assert_eq!(
                frame.mask_key.map(hex::encode),
                f["mask_key"].as_str().map(str::to_owned)
            );
            assert_eq!(Some(frame.payload.len() as u64), f["payload_len"].as_u64());
            // RFC 6455: clients mask every frame, servers never do.
            assert_eq!(frame.mask_key.is_some(), client_to_server, "{section}");
            frames.push(frame);
            with_wire += 1;
        }
        let (opcode, payload) = reassemble(&frames);
        let want_opcode = match m["opcode"].as_str().unwrap() {
            "binary" => 2,
            "ping" => 9,
            "pong" => 10,
            other => panic!("unexpected opcode {other}"),
        };
        assert_eq!(opcode, want_opcode, "never a text frame");
        assert_eq!(hex::encode(payload), hex_msg, "{section}");
        if want_opcode != 2 {
            // Go's pings and pongs are empty.
            assert!(hex_msg.is_empty());
        }
    }
    assert!(with_wire >= FULL_BINARY_MESSAGES, "{with_wire}");
    assert!(
        extended_16 > 0,
        "some captured frames use the 16-bit length"
    );
}

#[test]
fn frame_parser_handles_fragments_masks_and_64_bit_lengths() {
    // A Data message carrying `hello`, as sent by a client with
    // mask 37 fa 21 3d.
    let wire = hex::decode("828b37fa213d33f8238dddfb49585b964e").unwrap();
    let f = parse_frame(&wire);
    assert_eq!(hex::encode(&f.payload), "040202b0ea0168656c6c6f");
    assert_eq!(f.mask_key, Some([0x37, 0xfa, 0x21, 0x3d]));
    let server = hex::decode("820b040202b0ea0168656c6c6f").unwrap();
    assert_eq!(parse_frame(&server).payload, f.payload);

    // A 70000-byte Data message, fragmented like gorilla's client writer (4096-byte frames,
    // each masked with its own key) and as one unmasked server frame (64-bit length).
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let msg = Message::Data {
        conn_id: ConnId(2),
        payload: Bytes::from(payload),
    }
    .to_bytes(8811550949760789090);
    let chunks: Vec<&[u8]> = msg.chunks(4096).collect();
    let frames: Vec<WsFrame> = chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let key = [i as u8, 0x5a, 0xa5, 0xff];
            let opcode = if i == 0 { 2 } else { 0 };
            parse_frame(&build_frame(i + 1 == chunks.len(), opcode, Some(key), c))
        })
        .collect();
    assert_eq!(frames.len(), 18);
    let (opcode, joined) = reassemble(&frames);
    assert_eq!(opcode, 2);
    assert_eq!(joined, msg);
    let single = build_frame(true, 2, None, &msg);
    assert_eq!(single[1], 127, "64-bit length");
    assert_eq!(parse_frame(&single).payload, msg);
    let frame = decode(Bytes::from(joined)).unwrap();
    assert_eq!(frame.message.to_bytes(frame.message_id), msg);
}

// ----- replay ------------------------------------------------------------------------------

/// Feeds the Go server's messages of the main session into an rd client session: every
/// Connect becomes a StreamRequested with the captured target and every Data is readable.
#[test]
fn go_server_traffic_replays_into_a_client_session() {
    let v = vectors();
    let now = Instant::now();
    let mut client = Session::new(
        Side::Client,
        rd_proto::Config::default(),
        Identity::client(),
        now,
        1,
    );
    let mut requested = Vec::new();
    let mut data = std::collections::HashMap::<i64, Vec<u8>>::new();
    let main = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .chain(v["later_phases_same_session"].as_array().unwrap());
    for m in main {
        if !is_full_binary(m) || m["dir"] != "server->client" {
            continue;
        }
        let raw = Bytes::from(hex::decode(m["hex"].as_str().unwrap()).unwrap());
        client.handle_message(now, raw).unwrap();
        while let Some(ev) = client.poll_event() {
            if let Event::StreamRequested { id, target } = ev {
                requested.push((id.0, target.to_string()));
            }
        }
        for (id, _) in &requested {
            while let Ok(ReadOutcome::Data(b)) = client.read(ConnId(*id), usize::MAX) {
                data.entry(*id).or_default().extend_from_slice(&b);
            }
        }
    }
    assert!(client.end().is_none());
    assert_eq!(
        requested,
        vec![
            (2, "tcp/127.0.0.1:8125".to_owned()),
            (3, "tcp/127.0.0.1:8126".to_owned()),
            (4, "tcp/127.0.0.1:8127".to_owned()),
        ]
    );
    assert!(data[&2].starts_with(b"GET /bigfile HTTP/1.1\r\n"));
    assert!(data[&3].starts_with(b"GET "));
}

/// Feeds the peer link's first->second messages into an rd server session (second's side):
/// AddClient and RemoveClient become events with the captured key.
#[test]
fn go_peer_link_replays_into_a_server_session() {
    let v = vectors();
    let now = Instant::now();
    let mut second = Session::new(
        Side::Server,
        rd_proto::Config::default(),
        Identity {
            client_key: "first".into(),
            session_key: 1,
        },
        now,
        1,
    );
    let mut events = Vec::new();
    for m in v["ha_peer_link"]["messages"].as_array().unwrap() {
        if !is_full_binary(m) || m["dir"] != "client->server" {
            continue;
        }
        let raw = Bytes::from(hex::decode(m["hex"].as_str().unwrap()).unwrap());
        second.handle_message(now, raw).unwrap();
        while let Some(ev) = second.poll_event() {
            events.push(ev);
        }
    }
    let foo = rd_proto::ClientSession {
        client_key: "foo".into(),
        session_key: 5577006791947779410,
    };
    assert!(
        events.contains(&Event::ClientAdded(foo.clone())),
        "{events:?}"
    );
    assert!(events.contains(&Event::ClientRemoved(foo)), "{events:?}");
    assert!(second.end().is_none());
}

/// The captured Go client pings every 5 s (from the start of its session) with a few ms of
/// jitter. Replayed into an rd server-side session with the default config, whose ticks sit
/// half a period off those pings, not one server ping goes out: against Go clients rd-server
/// keeps Go's wire behaviour. (Were one to go out, Go answers it: both of its sides install a
/// ping handler that replies with an empty pong: docs/protocol.md, "Transport".)
#[test]
fn go_client_pings_leave_an_rd_server_nothing_to_ping() {
    let v = vectors();
    let mut ping_ms: Vec<f64> = all_messages(&v)
        .into_iter()
        .filter(|(_, m)| m["opcode"] == "ping" && m["dir"] == "client->server")
        .map(|(_, m)| m["t_ms"].as_f64().unwrap())
        .collect();
    ping_ms.sort_by(f64::total_cmp);
    assert!(ping_ms.len() >= 10, "{ping_ms:?}");
    let start = std::time::Instant::now();
    let at = |ms: f64| start + std::time::Duration::from_secs_f64(ms / 1000.0);
    let mut server = rd_proto::Session::new(
        rd_proto::Side::Server,
        rd_proto::Config::default(),
        rd_proto::Identity {
            client_key: "foo".into(),
            session_key: 1,
        },
        start,
        1,
    );
    let mut pings = 0;
    let mut run_until = |server: &mut rd_proto::Session, now: std::time::Instant| {
        while let Some(t) = server.poll_timeout().filter(|t| *t <= now) {
            server.handle_timeout(t);
            while let Some(tx) = server.poll_transmit() {
                if tx == rd_proto::Transmit::Ping {
                    pings += 1;
                }
            }
        }
    };
    for ms in &ping_ms {
        run_until(&mut server, at(*ms));
        server.handle_keepalive(at(*ms));
    }
    let last = *ping_ms.last().unwrap();
    run_until(&mut server, at(last + 1000.0));
    assert_eq!(pings, 0, "pings at {ping_ms:?}");
    assert!(server.end().is_none());
    assert!(server.stats().keepalive_seen);
}
