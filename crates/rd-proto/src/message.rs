//! The eight remotedialer messages (plus rd's negotiated Credit, Fin, GoAway, Replicas and
//! ConnectAck), one variant each, and their wire encoding.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::ids::{ClientSession, ConnId};
use crate::target::Target;
use crate::varint::{put_varint, varint_len};

/// What Go writes in the legacy deadline field of Data and Connect (15 s in milliseconds).
pub const LEGACY_DEADLINE_MS: i64 = 15_000;
/// Bytes of Error text a Go receiver keeps; the rest is cut.
pub const MAX_ERROR_TEXT: usize = 100;
/// Bytes of AddClient/RemoveClient payload a Go receiver reads.
pub(crate) const MAX_CLIENT_PAYLOAD: usize = 100;
/// Error text that means a clean end of stream (Go's `io.EOF`).
pub(crate) const EOF_TEXT: &str = "EOF";
/// The credit each direction of a new stream starts with when the credit extension is on
/// (docs/protocol.md, "`credit`"). Fixed by the extension so neither end has to announce it.
pub const CREDIT_INITIAL_WINDOW: u32 = 32 * 1024;

/// The wire type codes (docs/protocol.md, "Message layout").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MessageType {
    /// Application bytes.
    Data = 1,
    /// Open a virtual connection.
    Connect = 2,
    /// Close a virtual connection; `EOF` is graceful.
    Error = 3,
    /// A peer server announces one of its client sessions.
    AddClient = 4,
    /// A peer server withdraws one of its client sessions.
    RemoveClient = 5,
    /// Stop sending Data on a connection.
    Pause = 6,
    /// Start sending Data again.
    Resume = 7,
    /// The client's list of live connection ids.
    SyncConnections = 8,
    /// rd extension (negotiated, never sent to Go peers): the receiver lets the sender send
    /// this many more bytes on a connection.
    Credit = 64,
    /// rd extension (negotiated, never sent to Go peers): the sender has finished writing on a
    /// connection (half-close); it still reads.
    Fin = 65,
    /// rd extension (negotiated, never sent to Go peers): the sender is leaving; the
    /// receiver opens no new streams on this session and makes its replacement elsewhere,
    /// while the streams in flight go on.
    GoAway = 66,
    /// rd extension (negotiated, never sent to Go peers): how many replicas the server side
    /// counts (itself included), so an agent knows how many sessions to hold.
    Replicas = 67,
    /// rd extension (negotiated, never sent to Go peers): the receiver of a Connect dialed
    /// its target; a failed dial is still an Error with the dial's text.
    ConnectAck = 68,
}

impl MessageType {
    /// The type for a wire code, if it is one this implementation knows.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => Self::Data,
            2 => Self::Connect,
            3 => Self::Error,
            4 => Self::AddClient,
            5 => Self::RemoveClient,
            6 => Self::Pause,
            7 => Self::Resume,
            8 => Self::SyncConnections,
            64 => Self::Credit,
            65 => Self::Fin,
            66 => Self::GoAway,
            67 => Self::Replicas,
            68 => Self::ConnectAck,
            _ => return None,
        })
    }

    /// Whether Go writes the legacy deadline varint after the type.
    pub fn has_deadline(self) -> bool {
        matches!(self, Self::Data | Self::Connect)
    }
}

/// One remotedialer message (the header's message id travels beside it in [`Frame`]).
///
/// `Debug` shows a Data message's length, not its bytes: the wire dump (`-debug`, target
/// `rd_proto::wire`) prints messages with it, and payloads are the application's data
/// (credentials, personal data) that must not end up in logs.
#[derive(Clone, PartialEq, Eq)]
pub enum Message {
    /// Application bytes for a connection; the payload is a slice of the received buffer.
    Data {
        /// The connection.
        conn_id: ConnId,
        /// The bytes, any length including zero.
        payload: Bytes,
    },
    /// Open connection `conn_id` to `target`.
    Connect {
        /// The new connection's id.
        conn_id: ConnId,
        /// Where to dial.
        target: Target,
    },
    /// Close a connection; the text `EOF` means a clean end.
    Error {
        /// The connection.
        conn_id: ConnId,
        /// The reason, at most [`MAX_ERROR_TEXT`] bytes once received.
        text: String,
    },
    /// A peer server gained a client session.
    AddClient(ClientSession),
    /// A peer server lost a client session.
    RemoveClient(ClientSession),
    /// Stop sending Data on the connection.
    Pause {
        /// The connection.
        conn_id: ConnId,
    },
    /// Resume sending Data on the connection.
    Resume {
        /// The connection.
        conn_id: ConnId,
    },
    /// The sender's live connection ids, ascending.
    SyncConnections {
        /// The ids.
        ids: Vec<i64>,
    },
    /// rd's credit extension: the sender may send `increment` more payload bytes on the
    /// connection. Only sent when both ends negotiated the extension at the upgrade.
    Credit {
        /// The connection.
        conn_id: ConnId,
        /// Bytes granted, added to what the sender may still send.
        increment: u32,
    },
    /// rd's half-close extension: the sender sends no more Data on the connection, and still
    /// takes the peer's. Only sent when both ends negotiated the extension at the upgrade;
    /// header only, no payload.
    Fin {
        /// The connection.
        conn_id: ConnId,
    },
    /// rd's replicas extension: the sender is leaving (a draining server). The receiver
    /// opens no new streams on this session and makes a replacement elsewhere; streams in
    /// flight go on until they end or the sender closes the session. Session-level
    /// (connection id 0).
    GoAway {
        /// Why, for logs; at most [`MAX_ERROR_TEXT`] bytes once received.
        reason: String,
    },
    /// rd's replicas extension: the replicas the sender counts, itself included (a server
    /// that sees a peer come or go tells its agents). Session-level (connection id 0).
    Replicas {
        /// The count.
        count: u32,
    },
    /// rd's connect-ack extension: the sender (the side that received the Connect) dialed
    /// the connection's target, so the dial succeeded. Header only, no payload; sent before
    /// any Data of the connection. Only sent when both ends negotiated the extension.
    ConnectAck {
        /// The connection.
        conn_id: ConnId,
    },
    /// A type this implementation does not know; receivers ignore it, as Go does.
    Unknown {
        /// The type code.
        type_code: i64,
        /// The header's connection id.
        conn_id: ConnId,
    },
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Data { conn_id, payload } => f
                .debug_struct("Data")
                .field("conn_id", conn_id)
                .field("len", &payload.len())
                .finish(),
            Self::Connect { conn_id, target } => f
                .debug_struct("Connect")
                .field("conn_id", conn_id)
                .field("target", target)
                .finish(),
            Self::Error { conn_id, text } => f
                .debug_struct("Error")
                .field("conn_id", conn_id)
                .field("text", text)
                .finish(),
            Self::AddClient(c) => f.debug_tuple("AddClient").field(c).finish(),
            Self::RemoveClient(c) => f.debug_tuple("RemoveClient").field(c).finish(),
            Self::Pause { conn_id } => f.debug_struct("Pause").field("conn_id", conn_id).finish(),
            Self::Resume { conn_id } => f.debug_struct("Resume").field("conn_id", conn_id).finish(),
            Self::SyncConnections { ids } => {
                f.debug_struct("SyncConnections").field("ids", ids).finish()
            }
            Self::Fin { conn_id } => f.debug_struct("Fin").field("conn_id", conn_id).finish(),
            Self::ConnectAck { conn_id } => f
                .debug_struct("ConnectAck")
                .field("conn_id", conn_id)
                .finish(),
            Self::GoAway { reason } => f.debug_struct("GoAway").field("reason", reason).finish(),
            Self::Replicas { count } => f.debug_struct("Replicas").field("count", count).finish(),
            Self::Credit { conn_id, increment } => f
                .debug_struct("Credit")
                .field("conn_id", conn_id)
                .field("increment", increment)
                .finish(),
            Self::Unknown { type_code, conn_id } => f
                .debug_struct("Unknown")
                .field("type_code", type_code)
                .field("conn_id", conn_id)
                .finish(),
        }
    }
}

/// A decoded websocket message: the informational message id and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The sender's message counter; never checked by receivers.
    pub message_id: i64,
    /// The message.
    pub message: Message,
}

impl Message {
    /// The header's type code.
    pub fn type_code(&self) -> i64 {
        match self {
            Self::Data { .. } => MessageType::Data as i64,
            Self::Connect { .. } => MessageType::Connect as i64,
            Self::Error { .. } => MessageType::Error as i64,
            Self::AddClient(_) => MessageType::AddClient as i64,
            Self::RemoveClient(_) => MessageType::RemoveClient as i64,
            Self::Pause { .. } => MessageType::Pause as i64,
            Self::Resume { .. } => MessageType::Resume as i64,
            Self::SyncConnections { .. } => MessageType::SyncConnections as i64,
            Self::Credit { .. } => MessageType::Credit as i64,
            Self::Fin { .. } => MessageType::Fin as i64,
            Self::GoAway { .. } => MessageType::GoAway as i64,
            Self::Replicas { .. } => MessageType::Replicas as i64,
            Self::ConnectAck { .. } => MessageType::ConnectAck as i64,
            Self::Unknown { type_code, .. } => *type_code,
        }
    }

    /// The header's connection id (0 for session-level messages).
    pub fn conn_id(&self) -> ConnId {
        match self {
            Self::Data { conn_id, .. }
            | Self::Connect { conn_id, .. }
            | Self::Error { conn_id, .. }
            | Self::Pause { conn_id }
            | Self::Resume { conn_id }
            | Self::Credit { conn_id, .. }
            | Self::Fin { conn_id }
            | Self::ConnectAck { conn_id }
            | Self::Unknown { conn_id, .. } => *conn_id,
            Self::AddClient(_)
            | Self::RemoveClient(_)
            | Self::SyncConnections { .. }
            | Self::GoAway { .. }
            | Self::Replicas { .. } => ConnId(0),
        }
    }

    fn payload_len(&self) -> usize {
        match self {
            Self::Data { payload, .. } => payload.len(),
            Self::Connect { target, .. } => target.wire_len(),
            Self::Error { text, .. } => text.len(),
            Self::AddClient(c) | Self::RemoveClient(c) => {
                c.client_key.len() + 1 + decimal_len(c.session_key)
            }
            Self::SyncConnections { ids } => ids.len() * 8,
            Self::Credit { increment, .. } => varint_len(i64::from(*increment)),
            Self::GoAway { reason } => reason.len(),
            Self::Replicas { count } => varint_len(i64::from(*count)),
            Self::Pause { .. }
            | Self::Resume { .. }
            | Self::Fin { .. }
            | Self::ConnectAck { .. }
            | Self::Unknown { .. } => 0,
        }
    }

    /// Exact encoded size with the given message id.
    pub fn encoded_len(&self, message_id: i64) -> usize {
        let deadline = match MessageType::from_code(self.type_code()) {
            Some(t) if t.has_deadline() => varint_len(LEGACY_DEADLINE_MS),
            _ => 0,
        };
        header_len(message_id, self.conn_id(), self.type_code()) + deadline + self.payload_len()
    }

    /// Appends the Go wire form: varints id, conn id, type, the legacy deadline for Data and
    /// Connect, then the payload (minimal varints, as Go writes them).
    pub fn encode(&self, message_id: i64, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len(message_id));
        put_varint(buf, message_id);
        put_varint(buf, self.conn_id().0);
        put_varint(buf, self.type_code());
        match self {
            Self::Data { payload, .. } => {
                put_varint(buf, LEGACY_DEADLINE_MS);
                buf.put_slice(payload);
            }
            Self::Connect { target, .. } => {
                put_varint(buf, LEGACY_DEADLINE_MS);
                buf.put_slice(target.to_string().as_bytes());
            }
            Self::Error { text, .. } => buf.put_slice(text.as_bytes()),
            Self::AddClient(c) | Self::RemoveClient(c) => buf.put_slice(c.to_string().as_bytes()),
            Self::SyncConnections { ids } => ids.iter().for_each(|id| buf.put_i64_le(*id)),
            Self::Credit { increment, .. } => put_varint(buf, i64::from(*increment)),
            Self::GoAway { reason } => buf.put_slice(reason.as_bytes()),
            Self::Replicas { count } => put_varint(buf, i64::from(*count)),
            Self::Pause { .. }
            | Self::Resume { .. }
            | Self::Fin { .. }
            | Self::ConnectAck { .. }
            | Self::Unknown { .. } => {}
        }
    }

    /// Encodes into a fresh buffer of exactly the right size.
    pub fn to_bytes(&self, message_id: i64) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len(message_id));
        self.encode(message_id, &mut buf);
        buf.freeze()
    }
}

/// Size of a Data header (id, conn id, type, deadline) without payload.
pub fn data_header_len(message_id: i64, conn_id: ConnId) -> usize {
    header_len(message_id, conn_id, MessageType::Data as i64) + varint_len(LEGACY_DEADLINE_MS)
}

/// Writes a Data header; the caller appends the payload. Lets a sender build a Data message
/// in one buffer without first copying the payload into a [`Message`].
pub fn put_data_header(buf: &mut impl BufMut, message_id: i64, conn_id: ConnId) {
    put_varint(buf, message_id);
    put_varint(buf, conn_id.0);
    put_varint(buf, MessageType::Data as i64);
    put_varint(buf, LEGACY_DEADLINE_MS);
}

fn header_len(message_id: i64, conn_id: ConnId, type_code: i64) -> usize {
    varint_len(message_id) + varint_len(conn_id.0) + varint_len(type_code)
}

fn decimal_len(v: i64) -> usize {
    let digits = v
        .unsigned_abs()
        .checked_ilog10()
        .map_or(1, |d| d as usize + 1);
    digits + usize::from(v < 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_shows_a_payload_length_not_its_bytes() {
        let m = Message::Data {
            conn_id: ConnId(3),
            payload: Bytes::from_static(b"Authorization: Bearer s3cret"),
        };
        let text = format!("{m:?}");
        assert_eq!(text, "Data { conn_id: ConnId(3), len: 28 }");
        assert!(!text.contains("s3cret"));
    }

    #[test]
    fn decimal_len_counts_digits_and_sign() {
        for v in [
            0,
            9,
            10,
            99,
            5577006791947779410,
            -1,
            -10,
            i64::MIN,
            i64::MAX,
        ] {
            assert_eq!(decimal_len(v), v.to_string().len(), "{v}");
        }
    }

    #[test]
    fn protocol_worked_examples() {
        // docs/protocol.md's worked examples, with small ids.
        let hex = |m: &Message, id| hex::encode(m.to_bytes(id));
        let c = ConnId(1);
        let connect = Message::Connect {
            conn_id: c,
            target: Target::new("tcp", "127.0.0.1:8125").expect("valid"),
        };
        assert_eq!(
            hex(&connect, 1),
            "020204b0ea017463702f3132372e302e302e313a38313235"
        );
        let data = Message::Data {
            conn_id: c,
            payload: Bytes::from_static(b"hello"),
        };
        assert_eq!(hex(&data, 2), "040202b0ea0168656c6c6f");
        let eof = Message::Error {
            conn_id: c,
            text: "EOF".into(),
        };
        assert_eq!(hex(&eof, 3), "060206454f46");
        assert_eq!(hex(&Message::Pause { conn_id: c }, 4), "08020c");
        assert_eq!(hex(&Message::Resume { conn_id: c }, 5), "0a020e");
        // rd's half-close: header only, type 65 (zig-zag 130 = `82 01`).
        assert_eq!(hex(&Message::Fin { conn_id: c }, 5), "0a028201");
        // rd's replicas extension: session-level, type 66 (`84 01`) with a reason, type 67
        // (`86 01`) with a varint count (3 -> `06`).
        let go_away = Message::GoAway {
            reason: "drain".into(),
        };
        assert_eq!(hex(&go_away, 5), "0a008401647261696e");
        let replicas = Message::Replicas { count: 3 };
        assert_eq!(hex(&replicas, 5), "0a00860106");
        // rd's connect-ack: header only, type 68 (zig-zag 136 = `88 01`), on connection 2.
        let ack = Message::ConnectAck { conn_id: ConnId(2) };
        assert_eq!(hex(&ack, 5), "0a048801");
        assert_eq!(ack.to_bytes(5).len(), ack.encoded_len(5));
        assert_eq!(go_away.to_bytes(5).len(), go_away.encoded_len(5));
        assert_eq!(replicas.to_bytes(5).len(), replicas.encoded_len(5));
        let sync = Message::SyncConnections { ids: vec![2, 3, 7] };
        assert_eq!(
            hex(&sync, 6),
            "0c0010020000000000000003000000000000000700000000000000"
        );
        let add = Message::AddClient(ClientSession {
            client_key: "foo".into(),
            session_key: 5577006791947779410,
        });
        assert_eq!(
            hex(&add, 7),
            "0e0008666f6f2f35353737303036373931393437373739343130"
        );
        for (m, id) in [(&connect, 1), (&data, 2), (&eof, 3), (&sync, 6), (&add, 7)] {
            assert_eq!(m.to_bytes(id).len(), m.encoded_len(id));
        }
    }
}
