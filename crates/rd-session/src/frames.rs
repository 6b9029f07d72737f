//! Binary websocket frames written by the driver itself, header and payload side by side.
//!
//! tungstenite copies every message into its write buffer (and on a client masks it there,
//! a second pass): for Data that was the second user-space copy of every byte, after the
//! one into the encoded message. A [`FrameWriter`] instead keeps each message's `Bytes`
//! as it is and hands the kernel a vectored write of headers and payloads, many frames per
//! system call. A client masks the payload in place, in the buffer the message already owns.
//!
//! The bytes on the wire are the same RFC 6455 frames tungstenite writes (final, opcode
//! binary, unfragmented), so Go peers see no difference. tungstenite still reads, and
//! still writes the control frames (pings, its automatic pongs, the close frame); the
//! driver keeps the two writers from interleaving (see `driver.rs`).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

/// Most I/O slices handed to one vectored write (two per frame); Linux takes up to 1024.
const MAX_SLICES: usize = 64;

/// Longest websocket frame header: 2 bytes, 8 bytes of length, 4 bytes of mask.
const MAX_HEADER: usize = 14;

/// One frame waiting to be written.
#[derive(Debug)]
struct Queued {
    header: [u8; MAX_HEADER],
    header_len: u8,
    payload: Bytes,
}

impl Queued {
    fn len(&self) -> usize {
        usize::from(self.header_len) + self.payload.len()
    }
}

/// Binary frames queued for the socket, written with vectored writes.
#[derive(Debug)]
pub(crate) struct FrameWriter {
    /// Client side: every frame is masked (RFC 6455 5.3).
    mask: bool,
    frames: VecDeque<Queued>,
    /// Bytes of the front frame already written.
    written: usize,
    queued_bytes: usize,
}

impl FrameWriter {
    pub(crate) fn new(mask: bool) -> Self {
        Self {
            mask,
            frames: VecDeque::new(),
            written: 0,
            queued_bytes: 0,
        }
    }

    /// Whether frames wait to be written.
    pub(crate) fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Whether a frame is half written: nothing else may be written to the socket until it
    /// is done, or the peer would read the other bytes as part of it.
    pub(crate) fn is_partial(&self) -> bool {
        self.written > 0
    }

    /// Bytes queued and not yet written.
    pub(crate) fn queued_bytes(&self) -> usize {
        self.queued_bytes - self.written
    }

    /// Queues `payload` as one binary frame.
    pub(crate) fn push(&mut self, payload: Bytes) {
        let mut header = FrameHeader {
            opcode: OpCode::Data(Data::Binary),
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
        let frame = Queued {
            header: buf,
            header_len: header_len as u8,
            payload,
        };
        self.queued_bytes += frame.len();
        self.frames.push_back(frame);
    }

    /// Writes queued frames until all are written (`Ready(Ok)`) or the socket is full.
    pub(crate) fn poll_write<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
    ) -> Poll<io::Result<()>> {
        while !self.frames.is_empty() {
            std::task::ready!(self.poll_write_once(cx, io, usize::MAX))?;
        }
        Poll::Ready(Ok(()))
    }

    /// Finishes a half-written frame (`Ready(Ok)` at once if there is none), writing
    /// nothing of the frames after it.
    pub(crate) fn poll_write_front<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
    ) -> Poll<io::Result<()>> {
        while self.is_partial() {
            std::task::ready!(self.poll_write_once(cx, io, 1))?;
        }
        Poll::Ready(Ok(()))
    }

    /// One vectored write of (what is left of) the first `frames` frames.
    fn poll_write_once<S: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut S,
        frames: usize,
    ) -> Poll<io::Result<()>> {
        let n = {
            let slices = self.slices(frames);
            std::task::ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?
        };
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        self.advance(n);
        Poll::Ready(Ok(()))
    }

    /// The unwritten bytes of the first frames (at most `frames`), as I/O slices.
    fn slices(&self, frames: usize) -> Vec<IoSlice<'_>> {
        let mut slices = Vec::with_capacity(MAX_SLICES.min(2 * self.frames.len()));
        let mut skip = self.written;
        for frame in self.frames.iter().take(frames) {
            for part in [&frame.header[..frame.header_len.into()], &frame.payload[..]] {
                if skip >= part.len() {
                    skip -= part.len();
                    continue;
                }
                slices.push(IoSlice::new(&part[skip..]));
                skip = 0;
            }
            if slices.len() + 2 > MAX_SLICES {
                break;
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
            self.frames.pop_front();
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
        let masked = u64::from_ne_bytes([
            word[0], word[1], word[2], word[3], word[4], word[5], word[6], word[7],
        ]) ^ wide;
        word.copy_from_slice(&masked.to_ne_bytes());
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
    use futures_util::StreamExt;
    use tokio::io::AsyncWriteExt;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::WebSocketStream;

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

    /// Frames written by a `FrameWriter` read back through tungstenite, from a socket
    /// that takes a few bytes per write (partial writes in headers and payloads).
    #[tokio::test]
    async fn tungstenite_reads_what_it_writes() {
        for (mask, role) in [(true, Role::Server), (false, Role::Client)] {
            let (a, b) = tokio::io::duplex(7);
            let sizes = [0usize, 1, 125, 126, 65_535, 65_536, 70_000];
            let writer = tokio::spawn(async move {
                let mut a = a;
                let mut w = FrameWriter::new(mask);
                for (i, &len) in sizes.iter().enumerate() {
                    w.push(Bytes::from(vec![i as u8; len]));
                }
                std::future::poll_fn(|cx| w.poll_write(cx, &mut a))
                    .await
                    .unwrap();
                assert!(w.is_empty() && !w.is_partial() && w.queued_bytes() == 0);
                a.shutdown().await.unwrap();
                a
            });
            let mut ws = WebSocketStream::from_raw_socket(b, role, None).await;
            for (i, &len) in sizes.iter().enumerate() {
                match ws.next().await.unwrap().unwrap() {
                    Message::Binary(got) => assert_eq!(got, vec![i as u8; len]),
                    other => panic!("unexpected {other:?}"),
                }
            }
            drop(writer.await.unwrap());
        }
    }

    #[test]
    fn a_shared_payload_is_masked_in_a_copy() {
        let payload = Bytes::from(vec![1u8; 10]);
        let mut w = FrameWriter::new(true);
        w.push(payload.clone());
        assert_eq!(
            payload,
            vec![1u8; 10],
            "the caller's bytes stay as they were"
        );
        assert_eq!(w.queued_bytes(), 2 + 4 + 10);
    }
}
