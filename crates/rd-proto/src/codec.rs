//! Decoding one websocket binary message into a [`Frame`].

use bytes::{Buf, Bytes};

use crate::error::{DecodeError, HeaderField};
use crate::ids::{ClientSession, ConnId};
use crate::message::{Frame, Message, MessageType, MAX_CLIENT_PAYLOAD, MAX_ERROR_TEXT};
use crate::target::Target;
use crate::varint::{get_varint, VarintError};

fn field(buf: &mut Bytes, field: HeaderField) -> Result<i64, DecodeError> {
    get_varint(buf).map_err(|e| match e {
        VarintError::Truncated => DecodeError::Truncated { field },
        VarintError::Overflow => DecodeError::VarintOverflow { field },
    })
}

/// Decodes one websocket binary message. Data payloads are slices of `buf`, not copies.
///
/// Receive limits follow Go: Error text is cut to 100 bytes, AddClient/RemoveClient payloads
/// are read to 100 bytes; unknown types decode to [`Message::Unknown`].
pub fn decode(mut buf: Bytes) -> Result<Frame, DecodeError> {
    let message_id = field(&mut buf, HeaderField::MessageId)?;
    let conn_id = ConnId(field(&mut buf, HeaderField::ConnId)?);
    let type_code = field(&mut buf, HeaderField::Type)?;
    let Some(kind) = MessageType::from_code(type_code) else {
        let message = Message::Unknown { type_code, conn_id };
        return Ok(Frame {
            message_id,
            message,
        });
    };
    if kind.has_deadline() {
        field(&mut buf, HeaderField::Deadline)?;
    }
    let message = match kind {
        MessageType::Data => Message::Data {
            conn_id,
            payload: buf,
        },
        MessageType::Connect => Message::Connect {
            conn_id,
            target: Target::parse(&buf)
                .map_err(|reason| DecodeError::BadConnect { conn_id, reason })?,
        },
        MessageType::Error => Message::Error {
            conn_id,
            text: error_text(&buf),
        },
        MessageType::AddClient => Message::AddClient(client_session(&buf)?),
        MessageType::RemoveClient => Message::RemoveClient(client_session(&buf)?),
        MessageType::Pause => Message::Pause { conn_id },
        MessageType::Resume => Message::Resume { conn_id },
        // Header only, like Pause: trailing bytes are ignored.
        MessageType::Fin => Message::Fin { conn_id },
        MessageType::ConnectAck => Message::ConnectAck { conn_id },
        MessageType::SyncConnections => {
            if buf.len() % 8 != 0 {
                return Err(DecodeError::BadSyncLength { len: buf.len() });
            }
            let mut ids = Vec::with_capacity(buf.len() / 8);
            while buf.has_remaining() {
                ids.push(buf.get_i64_le());
            }
            Message::SyncConnections { ids }
        }
        MessageType::Credit => {
            let increment = field(&mut buf, HeaderField::Credit)?;
            let increment =
                u32::try_from(increment).map_err(|_| DecodeError::BadCredit { increment })?;
            Message::Credit { conn_id, increment }
        }
        MessageType::GoAway => Message::GoAway {
            reason: error_text(&buf),
        },
        MessageType::Replicas => {
            let count = field(&mut buf, HeaderField::Replicas)?;
            match u32::try_from(count) {
                Ok(count) if count > 0 => Message::Replicas { count },
                _ => return Err(DecodeError::BadReplicas { count }),
            }
        }
    };
    Ok(Frame {
        message_id,
        message,
    })
}

/// The first 100 bytes of an Error payload as text. Invalid UTF-8 becomes U+FFFD, and the
/// result is cut back to 100 bytes on a character boundary, so re-sending it loses nothing more.
fn error_text(payload: &[u8]) -> String {
    let mut text =
        String::from_utf8_lossy(&payload[..payload.len().min(MAX_ERROR_TEXT)]).into_owned();
    let mut end = text.len().min(MAX_ERROR_TEXT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

fn client_session(payload: &[u8]) -> Result<ClientSession, DecodeError> {
    let kept = &payload[..payload.len().min(MAX_CLIENT_PAYLOAD)];
    let bad = |reason| DecodeError::BadClientSession {
        payload: String::from_utf8_lossy(kept).into_owned(),
        reason,
    };
    // Go keeps the key's raw bytes; a lossy decode would change the key (and could push it
    // past the 100-byte limit when re-sent), so a key that is not UTF-8 is refused.
    let text = std::str::from_utf8(kept).map_err(|_| bad("not valid UTF-8"))?;
    let (key, session) = text
        .split_once('/')
        .ok_or_else(|| bad("no '/' separator"))?;
    // strconv.Atoi accepts one leading sign; Rust's parse does the same for i64.
    let session_key = session
        .parse::<i64>()
        .map_err(|_| bad("session key is not a decimal integer"))?;
    Ok(ClientSession {
        client_key: key.to_owned(),
        session_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(hex: &str) -> Result<Frame, DecodeError> {
        decode(Bytes::from(hex::decode(hex).expect("test hex")))
    }

    #[test]
    fn data_payload_is_a_slice_of_the_input() {
        let input = Bytes::from(hex::decode("040202b0ea0168656c6c6f").expect("hex"));
        let frame = decode(input.clone()).expect("valid");
        let Message::Data { payload, .. } = frame.message else {
            panic!("not data: {frame:?}");
        };
        assert_eq!(&payload[..], b"hello");
        assert_eq!(payload.as_ptr(), input[6..].as_ptr(), "no copy");
    }

    #[test]
    fn unknown_type_is_ignored_payload_and_all() {
        let f = dec("021412ffff").expect("unknown types decode");
        assert_eq!(
            f.message,
            Message::Unknown {
                type_code: 9,
                conn_id: ConnId(10)
            }
        );
    }

    #[test]
    fn deadline_value_is_ignored() {
        // TestNewServerMessage_266 writes deadline 0.
        let mut raw = vec![0x02, 0x02, 0x04, 0x00];
        raw.extend_from_slice(format!("tcp/{}:65500", "h".repeat(255)).as_bytes());
        let f = decode(Bytes::from(raw)).expect("valid");
        assert_eq!(f.message_id, 1);
        let Message::Connect { conn_id, target } = f.message else {
            panic!("not connect")
        };
        assert_eq!(conn_id, ConnId(1));
        assert_eq!(target.address(), format!("{}:65500", "h".repeat(255)));
    }

    #[test]
    fn fuzz_regression_non_utf8_payloads_round_trip_or_fail_cleanly() {
        // Found by `make fuzz` (decode target): an AddClient key with invalid UTF-8 was
        // decoded lossily, grew past 100 bytes and no longer decoded after re-encoding.
        let crash = hex::decode(
            "d401000a3607fb474747474747474747474747474747474747474747474747474747474747474747474747\
             4747474747474747474747474747474747474747474747474747474747474747474747474747474747474747\
             eadeac92b4fc0100080e0d666f6f2f35",
        )
        .expect("hex");
        assert!(matches!(
            decode(Bytes::from(crash)),
            Err(DecodeError::BadClientSession {
                reason: "not valid UTF-8",
                ..
            })
        ));
        // Error text: invalid UTF-8 and multi-byte characters cut at 100 bytes stay within
        // 100 bytes after lossy decoding, so a re-encoded Error decodes to the same text.
        let mut raw = vec![0x02, 0x02, 0x06];
        raw.extend(std::iter::repeat_n(0xff, 60));
        raw.extend("é".repeat(30).as_bytes());
        let Message::Error { text, .. } = decode(Bytes::from(raw)).expect("valid").message else {
            panic!("not error")
        };
        assert!(text.len() <= 100);
        let again = decode(
            Message::Error {
                conn_id: ConnId(1),
                text: text.clone(),
            }
            .to_bytes(1),
        )
        .expect("re-encoded");
        assert!(matches!(again.message, Message::Error { text: t, .. } if t == text));
    }

    #[test]
    fn error_text_is_cut_to_100_bytes() {
        let mut raw = vec![0x02, 0x02, 0x06];
        raw.extend(std::iter::repeat_n(b'x', 150));
        let Message::Error { text, .. } = decode(Bytes::from(raw)).expect("valid").message else {
            panic!("not error")
        };
        assert_eq!(text.len(), 100);
    }

    #[test]
    fn malformed_messages_give_precise_errors() {
        assert_eq!(
            dec(""),
            Err(DecodeError::Truncated {
                field: HeaderField::MessageId
            })
        );
        assert_eq!(
            dec("02"),
            Err(DecodeError::Truncated {
                field: HeaderField::ConnId
            })
        );
        assert_eq!(
            dec("0202"),
            Err(DecodeError::Truncated {
                field: HeaderField::Type
            })
        );
        assert_eq!(
            dec("020202"),
            Err(DecodeError::Truncated {
                field: HeaderField::Deadline
            })
        );
        assert_eq!(
            dec("ffffffffffffffffffff01"),
            Err(DecodeError::VarintOverflow {
                field: HeaderField::MessageId
            })
        );
        assert_eq!(
            dec("020010aabbccddeeff00"),
            Err(DecodeError::BadSyncLength { len: 7 })
        );
        let no_slash = dec("020404b0ea01746370").expect_err("no slash");
        assert_eq!(no_slash.conn_id(), Some(ConnId(2)));
        assert!(matches!(
            dec("020008666f6f"),
            Err(DecodeError::BadClientSession { .. })
        ));
        assert!(matches!(
            dec("020008666f6f2f78"),
            Err(DecodeError::BadClientSession { .. })
        ));
    }
}
