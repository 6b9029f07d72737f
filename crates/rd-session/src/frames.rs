//! The websocket framing under the driver: RFC 6455 frames read and written by the driver
//! itself, with tungstenite's frame header type (parsing, formatting, opcodes).
//!
//! The driver used to go through tokio-tungstenite's `WebSocketStream`. That cost, per byte,
//! two user-space copies on the way in (tungstenite's read buffer, zero-filled before each
//! read, then the message) and one on the way out (tungstenite's write buffer, and on a
//! client a second pass to mask it there); per wake-up, a waker proxy; and tungstenite
//! writes the pong it owes only at its next read, which made the driver's own frame writer
//! deadlock two rd peers (commits aec6678 and 3cc6ca7). Here:
//!
//! - [`FrameReader`] reads small frames (control frames, requests, Go's 4 KiB fragments)
//!   into a small buffer that it frees whenever the socket has nothing more (an idle session
//!   holds none), and copies them out. A frame larger than that buffer gets an allocation of
//!   its own, exactly its size plus a little, which the socket reads into directly: its
//!   payload becomes the message's `Bytes` without a copy, and pins nothing else (a stream
//!   whose reader stalls holds its own messages' memory, not other streams' read buffers).
//! - [`FrameWriter`] keeps each message's `Bytes` as it is and hands the kernel one vectored
//!   write of headers and payloads for many frames; a client masks a payload in place, in
//!   the buffer the message already owns. Control frames go ahead of queued data frames
//!   (never inside a half-written one), and a ping read is answered by queueing the pong
//!   right there: reading never has to wait for writing, so two peers cannot deadlock.

use std::collections::VecDeque;
use std::io::{self, Cursor, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tungstenite::protocol::frame::coding::{Control, Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use crate::websocket::ReadLimits;

/// Longest websocket frame header: 2 bytes, 8 bytes of length, 4 bytes of mask.
const MAX_HEADER: usize = 14;

/// Most I/O slices handed to one vectored write (two per frame); Linux takes up to 1024.
const MAX_SLICES: usize = 64;

/// Room beyond a large frame's payload in its own buffer: the read that completes the
/// payload usually brings the next frame's header with it, which is moved to the small
/// buffer (a copy of at most this much) instead of costing a read syscall of its own.
const SPILL: usize = 2 * 1024;

/// Largest payload of a control frame (RFC 6455 5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// A websocket message or control frame from the peer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Incoming {
    /// A binary message (reassembled if it came in fragments).
    Binary(Bytes),
    /// A text message: the remotedialer protocol has none, so the session ends.
    Text,
    /// A ping; the payload goes back in the pong.
    Ping(Bytes),
    /// A pong.
    Pong,
    /// A close frame, with its status code if it had one.
    Close(Option<u16>),
}

/// Why reading frames failed; each ends the session.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FrameError {
    /// A message (or a fragmented message so far) above the size limit.
    #[error("websocket message of {size} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// A frame that breaks RFC 6455.
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
    /// The peer closed the connection without a close frame.
    #[error("connection closed without a websocket close frame")]
    Eof,
    /// Reading the socket failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// A frame whose header was read and whose payload is still coming.
#[derive(Debug)]
struct Partial {
    opcode: OpCode,
    fin: bool,
    mask: Option<[u8; 4]>,
    len: usize,
    /// The payload so far, in a buffer of `len + SPILL` bytes (large frames only).
    buf: BytesMut,
}

/// Reads websocket frames from a socket; see the module documentation.
#[derive(Debug)]
pub(crate) struct FrameReader {
    /// We are the server side: every frame must be masked, and is unmasked here.
    server: bool,
    max_message: usize,
    /// Frames up to this size (header included) are read into the small buffer and
    /// copied out; larger ones get a buffer of their own.
    small: usize,
    /// How much the next read into the small buffer takes: `small` at first, growing up
    /// to `max_read` while reads fill it (a burst of small messages).
    read_size: usize,
    max_read: usize,
    /// Bytes read and not yet parsed (small frames, headers).
    head: BytesMut,
    /// A large frame being read into a buffer of its own.
    body: Option<Partial>,
    /// A fragmented binary message being assembled.
    fragments: Option<BytesMut>,
}

impl FrameReader {
    /// A reader for the `server` (or client) side, with `read_ahead` (bytes read past the
    /// handshake) first.
    pub(crate) fn new(server: bool, limits: ReadLimits, read_ahead: Bytes) -> Self {
        let small = limits.read_buffer.max(MAX_HEADER * 2);
        Self {
            server,
            max_message: limits.max_message_size,
            small,
            read_size: small,
            max_read: limits.read_burst.max(small),
            head: BytesMut::from(&read_ahead[..]),
            body: None,
            fragments: None,
        }
    }

    /// Bytes of buffer this reader holds right now (0 for an idle session).
    #[cfg(test)]
    pub(crate) fn buffer_capacity(&self) -> usize {
        self.head.capacity() + self.body.as_ref().map_or(0, |b| b.buf.capacity())
    }

    /// The next message or control frame, `Pending` once the socket has nothing more.
    pub(crate) fn poll_next<S: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
    ) -> Poll<Result<Incoming, FrameError>> {
        loop {
            if let Some(body) = &mut self.body {
                if body.buf.len() < body.len {
                    let n = ready!(tokio_util::io::poll_read_buf(
                        Pin::new(&mut *io),
                        cx,
                        &mut body.buf
                    ))?;
                    if n == 0 {
                        return Poll::Ready(Err(FrameError::Protocol(
                            "connection closed inside a frame",
                        )));
                    }
                    continue;
                }
                let mut body = self.body.take().expect("invariant: checked above");
                if body.buf.len() > body.len {
                    // The start of the next frame: to the small buffer, which is empty
                    // (everything in it belonged to this frame when it started).
                    let spill = body.buf.split_off(body.len);
                    self.head.extend_from_slice(&spill);
                }
                if let Some(incoming) = self.complete(body)? {
                    return Poll::Ready(Ok(incoming));
                }
                continue;
            }
            if let Some(incoming) = self.parse_head()? {
                return Poll::Ready(Ok(incoming));
            }
            if self.body.is_some() {
                continue;
            }
            // More bytes are needed in the small buffer.
            if self.head.capacity() - self.head.len() < MAX_HEADER {
                self.head.reserve(self.read_size);
            }
            let room = self.head.capacity() - self.head.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, &mut self.head) {
                Poll::Pending => {
                    if self.head.is_empty() && self.head.capacity() > 0 {
                        // Nothing half-read: an idle session keeps no read buffer.
                        self.head = BytesMut::new();
                        self.read_size = self.small;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Ok(n)) if n == room => {
                    // The socket had more than the buffer took: read more per syscall.
                    self.read_size = (self.read_size * 2).min(self.max_read);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(if self.head.is_empty() && self.fragments.is_none() {
                        FrameError::Eof
                    } else {
                        FrameError::Protocol("connection closed inside a frame")
                    }));
                }
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    /// Parses the next frame from the small buffer: a complete one is handled (returning
    /// what it yields), a large one moves to a buffer of its own (`self.body`); `Ok(None)`
    /// if the buffer holds too little for either.
    fn parse_head(&mut self) -> Result<Option<Incoming>, FrameError> {
        loop {
            let mut cursor = Cursor::new(&self.head[..]);
            let Some((header, len)) = FrameHeader::parse(&mut cursor)
                .map_err(|_| FrameError::Protocol("invalid frame header"))?
            else {
                return Ok(None);
            };
            let header_len = usize::try_from(cursor.position())
                .expect("invariant: a header is at most 14 bytes");
            let len = self.check(&header, len)?;
            let available = self.head.len() - header_len;
            if available < len {
                if len + header_len <= self.small {
                    // Small: wait for the rest in this buffer.
                    self.head.reserve(len + header_len - self.head.len());
                    return Ok(None);
                }
                // Large: a buffer of its own, the socket reads the rest straight into it.
                // Large frames come in runs (bulk data): small reads again, so that the
                // next frame's start copied out of the small buffer stays small.
                self.read_size = self.small;
                self.head.advance(header_len);
                let mut buf = BytesMut::with_capacity(len + SPILL);
                buf.extend_from_slice(&self.head);
                self.head.clear();
                self.body = Some(Partial {
                    opcode: header.opcode,
                    fin: header.is_final,
                    mask: header.mask,
                    len,
                    buf,
                });
                return Ok(None);
            }
            self.head.advance(header_len);
            // Copied out, so the small buffer is reused rather than pinned by the message.
            let buf = BytesMut::from(&self.head[..len]);
            self.head.advance(len);
            let frame = Partial {
                opcode: header.opcode,
                fin: header.is_final,
                mask: header.mask,
                len,
                buf,
            };
            if let Some(incoming) = self.complete(frame)? {
                return Ok(Some(incoming));
            }
        }
    }

    /// Checks a frame header against RFC 6455 and the size limit; returns the payload length.
    fn check(&self, header: &FrameHeader, len: u64) -> Result<usize, FrameError> {
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Err(FrameError::Protocol(
                "reserved bits set without an extension",
            ));
        }
        match (self.server, header.mask.is_some()) {
            (true, false) => return Err(FrameError::Protocol("unmasked frame from the client")),
            (false, true) => return Err(FrameError::Protocol("masked frame from the server")),
            _ => {}
        }
        let so_far = self.fragments.as_ref().map_or(0, BytesMut::len);
        let too_large = |size: u64| FrameError::TooLarge {
            size: usize::try_from(size).unwrap_or(usize::MAX),
            max: self.max_message,
        };
        match header.opcode {
            OpCode::Control(_) => {
                if !header.is_final {
                    return Err(FrameError::Protocol("fragmented control frame"));
                }
                if len > MAX_CONTROL_PAYLOAD as u64 {
                    return Err(FrameError::Protocol("control frame payload over 125 bytes"));
                }
            }
            OpCode::Data(Data::Continue) if self.fragments.is_none() => {
                return Err(FrameError::Protocol("continuation frame without a message"));
            }
            OpCode::Data(Data::Binary | Data::Text) if self.fragments.is_some() => {
                return Err(FrameError::Protocol("new message inside a fragmented one"));
            }
            OpCode::Data(_) => {
                let total = (so_far as u64).saturating_add(len);
                if total > self.max_message as u64 {
                    return Err(too_large(total));
                }
            }
        }
        usize::try_from(len).map_err(|_| too_large(len))
    }

    /// A frame's payload is complete: unmask it and return what it means (`None`: a
    /// fragment of a message still coming).
    fn complete(&mut self, frame: Partial) -> Result<Option<Incoming>, FrameError> {
        let mut payload = frame.buf;
        debug_assert_eq!(payload.len(), frame.len);
        if let Some(key) = frame.mask {
            apply_mask(&mut payload, key);
        }
        Ok(match frame.opcode {
            OpCode::Control(Control::Ping) => Some(Incoming::Ping(payload.freeze())),
            OpCode::Control(Control::Pong) => Some(Incoming::Pong),
            OpCode::Control(Control::Close) => match payload.len() {
                0 => Some(Incoming::Close(None)),
                1 => return Err(FrameError::Protocol("close frame with a one-byte payload")),
                _ => Some(Incoming::Close(Some(u16::from_be_bytes([
                    payload[0], payload[1],
                ])))),
            },
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                return Err(FrameError::Protocol("reserved opcode"))
            }
            OpCode::Data(Data::Text) => Some(Incoming::Text),
            OpCode::Data(Data::Binary) if frame.fin => Some(Incoming::Binary(payload.freeze())),
            OpCode::Data(Data::Binary) => {
                self.fragments = Some(payload);
                None
            }
            OpCode::Data(Data::Continue) => {
                let message = self
                    .fragments
                    .as_mut()
                    .expect("invariant: checked with the header");
                message.extend_from_slice(&payload);
                if frame.fin {
                    self.fragments.take().map(|m| Incoming::Binary(m.freeze()))
                } else {
                    None
                }
            }
        })
    }
}

/// One frame waiting to be written.
#[derive(Debug)]
struct Queued {
    header: [u8; MAX_HEADER],
    header_len: u8,
    payload: Bytes,
    /// A data frame whose payload buffer goes back to the state machine once written.
    data: bool,
    /// A pong not written yet, which a later ping's pong may replace.
    pong: bool,
}

impl Queued {
    fn len(&self) -> usize {
        usize::from(self.header_len) + self.payload.len()
    }
}

/// Frames queued for the socket, written with vectored writes; see the module
/// documentation.
#[derive(Debug)]
pub(crate) struct FrameWriter {
    /// Client side: every frame is masked (RFC 6455 5.3).
    mask: bool,
    frames: VecDeque<Queued>,
    /// Bytes of the front frame already written.
    written: usize,
    queued_bytes: usize,
    /// Payloads of data frames written, for [`take_written`](Self::take_written).
    done: Vec<Bytes>,
}

impl FrameWriter {
    /// A writer for the client side (`mask`) or the server side.
    pub(crate) fn new(mask: bool) -> Self {
        Self {
            mask,
            frames: VecDeque::new(),
            written: 0,
            queued_bytes: 0,
            done: Vec::new(),
        }
    }

    /// Whether frames wait to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes queued and not yet written.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes - self.written
    }

    /// Queues `payload` as one binary frame (one remotedialer message).
    pub(crate) fn push_binary(&mut self, payload: Bytes) {
        let frame = self.frame(OpCode::Data(Data::Binary), payload, true);
        self.queued_bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Queues a ping, ahead of data frames not yet started.
    pub(crate) fn push_ping(&mut self, payload: Bytes) {
        let frame = self.frame(OpCode::Control(Control::Ping), payload, false);
        self.push_control(frame);
    }

    /// Queues the pong for a ping just read, ahead of data frames not yet started. A pong
    /// still waiting is replaced: only the latest ping needs its answer (RFC 6455 5.5.3),
    /// so a peer that pings faster than we can write does not grow the queue.
    pub(crate) fn push_pong(&mut self, payload: Bytes) {
        let mut frame = self.frame(OpCode::Control(Control::Pong), payload, false);
        frame.pong = true;
        let start = usize::from(self.written > 0);
        if let Some(i) = (start..self.frames.len()).find(|&i| self.frames[i].pong) {
            self.queued_bytes = self.queued_bytes - self.frames[i].len() + frame.len();
            self.frames[i] = frame;
            return;
        }
        self.push_control(frame);
    }

    /// Queues a close frame with `code` and `reason` after everything else.
    pub(crate) fn push_close(&mut self, code: u16, reason: &str) {
        let mut payload = BytesMut::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        // A close payload is a control frame's: at most 125 bytes.
        let mut end = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        payload.extend_from_slice(&reason.as_bytes()[..end]);
        let frame = self.frame(OpCode::Control(Control::Close), payload.freeze(), false);
        self.queued_bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Control frames go ahead of queued data frames, but never inside a half-written one.
    fn push_control(&mut self, frame: Queued) {
        self.queued_bytes += frame.len();
        let at = usize::from(self.written > 0)
            + self
                .frames
                .iter()
                .skip(usize::from(self.written > 0))
                .take_while(|f| !f.data)
                .count();
        self.frames.insert(at, frame);
    }

    fn frame(&self, opcode: OpCode, payload: Bytes, data: bool) -> Queued {
        let mut header = FrameHeader {
            opcode,
            ..FrameHeader::default()
        };
        let payload = if self.mask {
            let key: [u8; 4] = rand::random();
            header.mask = Some(key);
            // The message is normally the only owner of its buffer (the state machine
            // handed it over), so masking happens in place; a shared one is copied.
            let mut owned = payload
                .try_into_mut()
                .unwrap_or_else(|shared| BytesMut::from(&shared[..]));
            apply_mask(&mut owned, key);
            owned.freeze()
        } else {
            payload
        };
        let mut buf = [0u8; MAX_HEADER];
        let mut cursor = &mut buf[..];
        // Cannot fail: no header is longer than the 14 bytes it is written into.
        header.format(payload.len() as u64, &mut cursor).ok();
        let header_len = MAX_HEADER - cursor.len();
        Queued {
            header: buf,
            header_len: u8::try_from(header_len).expect("invariant: at most 14"),
            payload,
            data,
            pong: false,
        }
    }

    /// Writes queued frames until all are written (`Ready(Ok)`) or the socket is full.
    pub(crate) fn poll_flush<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
    ) -> Poll<io::Result<()>> {
        while !self.frames.is_empty() {
            let n = {
                let slices = self.slices(io.is_write_vectored());
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.advance(n);
        }
        Poll::Ready(Ok(()))
    }

    /// Payloads of the data frames written since the last call: their buffers are ours
    /// alone again, for the state machine to encode the next messages into.
    pub(crate) fn take_written(&mut self) -> std::vec::Drain<'_, Bytes> {
        self.done.drain(..)
    }

    /// The unwritten bytes of the queued frames as I/O slices (only the first one when the
    /// socket does not take vectored writes: tokio would write only that one anyway).
    fn slices(&self, vectored: bool) -> Vec<IoSlice<'_>> {
        let max = if vectored { MAX_SLICES } else { 1 };
        let mut slices = Vec::with_capacity(max.min(2 * self.frames.len()));
        let mut skip = self.written;
        'frames: for frame in &self.frames {
            for part in [&frame.header[..frame.header_len.into()], &frame.payload[..]] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices.push(IoSlice::new(&part[skip..]));
                skip = 0;
                if slices.len() == max {
                    break 'frames;
                }
            }
        }
        slices
    }

    /// Marks `n` more bytes written, dropping the frames that are done.
    fn advance(&mut self, mut n: usize) {
        while let Some(front) = self.frames.front() {
            let left = front.len() - self.written;
            if n < left {
                self.written += n;
                return;
            }
            n -= left;
            self.queued_bytes -= front.len();
            self.written = 0;
            let frame = self.frames.pop_front().expect("invariant: front exists");
            if frame.data {
                self.done.push(frame.payload);
            }
        }
    }
}

/// XORs `buf` with the repeating 4-byte `key`, eight bytes at a time (which the compiler
/// turns into vector instructions).
fn apply_mask(buf: &mut [u8], key: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        key[0], key[1], key[2], key[3], key[0], key[1], key[2], key[3],
    ]);
    let mut words = buf.chunks_exact_mut(8);
    for word in &mut words {
        let mut w = [0u8; 8];
        w.copy_from_slice(word);
        word.copy_from_slice(&(u64::from_ne_bytes(w) ^ wide).to_ne_bytes());
    }
    // The tail starts at a multiple of 8, so the key lines up from its first byte again.
    for (i, b) in words.into_remainder().iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

    fn limits(max_message_size: usize, read_buffer: usize) -> ReadLimits {
        ReadLimits {
            max_message_size,
            read_buffer,
            read_burst: 64 * 1024,
        }
    }

    #[test]
    fn mask_matches_the_bytewise_definition() {
        let key = [0x12, 0x34, 0x56, 0x78];
        for len in [0, 1, 3, 7, 8, 9, 15, 16, 17, 100, 1021] {
            let plain: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let mut masked = plain.clone();
            apply_mask(&mut masked, key);
            for (i, (p, m)) in plain.iter().zip(&masked).enumerate() {
                assert_eq!(*m, p ^ key[i % 4], "byte {i} of {len}");
            }
        }
    }

    const SIZES: [usize; 8] = [0, 1, 125, 126, 4096, 65_535, 65_536, 70_000];

    /// Frames written by a `FrameWriter` read back through tungstenite, from a socket that
    /// takes a few bytes per write (partial writes in headers and payloads).
    #[tokio::test]
    async fn tungstenite_reads_what_we_write() {
        for (mask, role) in [(true, Role::Server), (false, Role::Client)] {
            let (a, b) = tokio::io::duplex(7);
            let writer = tokio::spawn(async move {
                let mut a = a;
                let mut w = FrameWriter::new(mask);
                for (i, &len) in SIZES.iter().enumerate() {
                    w.push_binary(Bytes::from(vec![i as u8; len]));
                }
                w.push_close(1001, "bye");
                std::future::poll_fn(|cx| w.poll_flush(cx, &mut a))
                    .await
                    .unwrap();
                assert!(w.is_empty() && w.queued_bytes() == 0);
                assert_eq!(w.take_written().count(), SIZES.len());
                a.shutdown().await.unwrap();
                a
            });
            let mut ws = WebSocketStream::from_raw_socket(b, role, None).await;
            for (i, &len) in SIZES.iter().enumerate() {
                match ws.next().await.unwrap().unwrap() {
                    Message::Binary(got) => assert_eq!(got, vec![i as u8; len]),
                    other => panic!("unexpected {other:?}"),
                }
            }
            match ws.next().await.unwrap().unwrap() {
                Message::Close(Some(frame)) => {
                    assert_eq!(u16::from(frame.code), 1001);
                    assert_eq!(frame.reason, "bye");
                }
                other => panic!("unexpected {other:?}"),
            }
            drop(writer.await.unwrap());
        }
    }

    /// What tungstenite writes, fragmented or not, with pings between fragments, comes out
    /// of a `FrameReader` whole, through a socket that delivers a few bytes at a time.
    #[tokio::test]
    async fn we_read_what_tungstenite_writes() {
        for (role, server) in [(Role::Client, true), (Role::Server, false)] {
            let (a, mut b) = tokio::io::duplex(5);
            let writer = tokio::spawn(async move {
                let mut ws = WebSocketStream::from_raw_socket(a, role, None).await;
                for (i, &len) in SIZES.iter().enumerate() {
                    ws.send(Message::binary(vec![i as u8; len])).await.unwrap();
                    ws.send(Message::Ping(Bytes::from_static(b"p")))
                        .await
                        .unwrap();
                }
                // A message in three fragments, with a ping between them.
                let frame = |data: &[u8], opcode, fin| {
                    let mut f =
                        tungstenite::protocol::frame::Frame::message(data.to_vec(), opcode, fin);
                    if role == Role::Client {
                        f.header_mut().mask = Some([1, 2, 3, 4]);
                    }
                    Message::Frame(f)
                };
                ws.send(frame(b"ab", OpCode::Data(Data::Binary), false))
                    .await
                    .unwrap();
                ws.send(Message::Ping(Bytes::from_static(b"mid")))
                    .await
                    .unwrap();
                ws.send(frame(b"cd", OpCode::Data(Data::Continue), false))
                    .await
                    .unwrap();
                ws.send(frame(b"e", OpCode::Data(Data::Continue), true))
                    .await
                    .unwrap();
                ws.close(None).await.unwrap();
            });
            let mut r = FrameReader::new(server, limits(1 << 20, 1024), Bytes::new());
            let mut got = Vec::new();
            loop {
                let m = std::future::poll_fn(|cx| r.poll_next(cx, &mut b))
                    .await
                    .unwrap();
                let last = matches!(m, Incoming::Close(_));
                got.push(m);
                if last {
                    break;
                }
            }
            let mut want = Vec::new();
            for (i, &len) in SIZES.iter().enumerate() {
                want.push(Incoming::Binary(Bytes::from(vec![i as u8; len])));
                want.push(Incoming::Ping(Bytes::from_static(b"p")));
            }
            want.push(Incoming::Ping(Bytes::from_static(b"mid")));
            want.push(Incoming::Binary(Bytes::from_static(b"abcde")));
            want.push(Incoming::Close(None));
            assert_eq!(got, want);
            writer.await.unwrap();
        }
    }

    /// Bytes read past the handshake are the start of the first frame.
    #[tokio::test]
    async fn read_ahead_bytes_come_first() {
        let (mut a, mut b) = tokio::io::duplex(64);
        // An unmasked binary frame "hi", split between the read-ahead and the socket.
        a.write_all(b"i").await.unwrap();
        let mut r = FrameReader::new(
            false,
            limits(1024, 1024),
            Bytes::from_static(&[0x82, 0x02, b'h']),
        );
        let got = std::future::poll_fn(|cx| r.poll_next(cx, &mut b))
            .await
            .unwrap();
        assert_eq!(got, Incoming::Binary(Bytes::from_static(b"hi")));
    }

    /// An idle reader holds no buffer; a large frame's buffer is its own and exact.
    #[tokio::test]
    async fn buffers_exist_only_while_frames_arrive() {
        let (a, mut b) = tokio::io::duplex(1 << 20);
        let mut ws = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let mut r = FrameReader::new(false, limits(1 << 20, 4096), Bytes::new());
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(r.poll_next(&mut cx, &mut b).is_pending());
        assert_eq!(r.buffer_capacity(), 0);
        ws.send(Message::binary(vec![9u8; 100_000])).await.unwrap();
        ws.send(Message::binary(vec![8u8; 10])).await.unwrap();
        let Poll::Ready(Ok(Incoming::Binary(big))) = r.poll_next(&mut cx, &mut b) else {
            panic!("the large message is complete")
        };
        assert_eq!(big.len(), 100_000);
        let Poll::Ready(Ok(Incoming::Binary(small))) = r.poll_next(&mut cx, &mut b) else {
            panic!("the small one too")
        };
        assert_eq!(&small[..], &[8u8; 10][..]);
        assert!(r.poll_next(&mut cx, &mut b).is_pending());
        assert_eq!(
            r.buffer_capacity(),
            0,
            "nothing held once the socket is drained"
        );
        // The large message owns its buffer: dropping the small one frees nothing of it.
        let big = big.try_into_mut().expect("the only owner of its buffer");
        assert!(big.capacity() <= 100_000 + SPILL);
    }

    /// Broken frames end the session with a reason instead of a panic or a hang.
    #[tokio::test]
    async fn bad_frames_are_errors() {
        let cases: [(&[u8], bool, &str); 6] = [
            // Unmasked binary frame to a server.
            (&[0x82, 0x00], true, "unmasked"),
            // Masked frame to a client.
            (&[0x82, 0x80, 1, 2, 3, 4], false, "masked"),
            // RSV1 set.
            (&[0xc2, 0x00], false, "reserved bits"),
            // Fragmented ping.
            (&[0x09, 0x00], false, "fragmented control"),
            // Continuation without a message.
            (&[0x80, 0x00], false, "continuation"),
            // Reserved opcode 3.
            (&[0x83, 0x00], false, "header"),
        ];
        for (bytes, server, want) in cases {
            let (mut a, mut b) = tokio::io::duplex(64);
            a.write_all(bytes).await.unwrap();
            let mut r = FrameReader::new(server, limits(1024, 1024), Bytes::new());
            let err = std::future::poll_fn(|cx| r.poll_next(cx, &mut b))
                .await
                .unwrap_err();
            assert!(err.to_string().contains(want), "{bytes:02x?}: {err}");
        }
        // Over the size limit, announced in the header: refused before reading it.
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&[0x82, 0x7e, 0x08, 0x00]).await.unwrap();
        let mut r = FrameReader::new(false, limits(1024, 1024), Bytes::new());
        let err = std::future::poll_fn(|cx| r.poll_next(cx, &mut b))
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::TooLarge {
                    size: 2048,
                    max: 1024
                }
            ),
            "{err}"
        );
        // A peer that closes the socket without a close frame.
        drop(a);
        let (a, mut b) = tokio::io::duplex(64);
        drop(a);
        let mut r = FrameReader::new(false, limits(1024, 1024), Bytes::new());
        let err = std::future::poll_fn(|cx| r.poll_next(cx, &mut b))
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::Eof), "{err}");
    }

    #[tokio::test]
    async fn control_frames_go_ahead_of_data_and_pongs_replace_each_other() {
        let mut w = FrameWriter::new(false);
        w.push_binary(Bytes::from_static(b"data"));
        w.push_pong(Bytes::from_static(b"1"));
        w.push_pong(Bytes::from_static(b"2"));
        w.push_ping(Bytes::new());
        let (mut a, b) = tokio::io::duplex(1024);
        std::future::poll_fn(|cx| w.poll_flush(cx, &mut a))
            .await
            .unwrap();
        // `a` stays open: tungstenite answers the ping into it.
        let mut ws = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(ws.next().await.unwrap().unwrap());
        }
        assert_eq!(
            got,
            [
                Message::Pong(Bytes::from_static(b"2")),
                Message::Ping(Bytes::new()),
                Message::binary(&b"data"[..]),
            ]
        );
    }
}
