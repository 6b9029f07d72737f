//! Any bytes: decoding never panics, and whatever decodes re-encodes to something that
//! decodes to the same frame.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = rd_proto::decode(Bytes::copy_from_slice(data)) {
        let mut buf = BytesMut::new();
        frame.message.encode(frame.message_id, &mut buf);
        assert_eq!(buf.len(), frame.message.encoded_len(frame.message_id));
        let again = rd_proto::decode(buf.freeze()).expect("re-encoded frame decodes");
        assert_eq!(again, frame);
    }
});
