//! Datagrams over a tunnel stream (rd's `udp` extension): each datagram is a 2-byte
//! big-endian length and its payload, in the stream's ordinary bytes.
//!
//! Framing inside the byte stream keeps everything below as it is: Data messages may split
//! and coalesce datagrams freely, and credit, Pause/Resume and backpressure apply to
//! datagrams as to any bytes. The wire format of the protocol does not change, and a
//! stream carries datagrams only when both ends negotiated `udp` (a Go peer never does).
//! See docs/protocol.md, "The udp extension".

use std::future::poll_fn;
use std::io;
use std::task::{ready, Context, Poll};

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::stream::TunnelStream;

/// The largest datagram a stream carries: the largest UDP payload over IPv4
/// (65,535 − 8 bytes of UDP header − 20 of IP header).
pub const MAX_DATAGRAM: usize = 65_507;

/// Bytes of the length prefix before each datagram.
pub const DATAGRAM_HEADER: usize = 2;

/// A datagram could not be sent or received.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DatagramError {
    /// A datagram to send is larger than [`MAX_DATAGRAM`].
    #[error("datagram of {0} bytes is larger than the {MAX_DATAGRAM} a stream carries")]
    TooLarge(usize),
    /// The peer framed a datagram longer than [`MAX_DATAGRAM`]: it does not speak the
    /// framing (or the stream was not opened for datagrams).
    #[error("malformed datagram stream: a length of {0} bytes (at most {MAX_DATAGRAM})")]
    Malformed(usize),
    /// The stream ended in the middle of a datagram.
    #[error("datagram stream ended inside a datagram ({missing} bytes missing)")]
    Truncated {
        /// Bytes of the datagram (and its header) that never came.
        missing: usize,
    },
    /// The stream failed (the peer's error text, a reset, the session's end).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Appends `datagram` framed (length, then payload) to `out`.
pub fn encode_datagram(datagram: &[u8], out: &mut BytesMut) -> Result<(), DatagramError> {
    let len = u16::try_from(datagram.len())
        .ok()
        .filter(|&n| usize::from(n) <= MAX_DATAGRAM)
        .ok_or(DatagramError::TooLarge(datagram.len()))?;
    out.reserve(DATAGRAM_HEADER + datagram.len());
    out.put_u16(len);
    out.put_slice(datagram);
    Ok(())
}

/// Reassembles datagrams from a framed byte stream cut anywhere. Holds at most one
/// datagram, so its memory is bounded by [`MAX_DATAGRAM`].
#[derive(Debug, Default)]
pub struct DatagramDecoder {
    /// The length prefix read so far (up to 2 bytes).
    header: [u8; DATAGRAM_HEADER],
    header_len: usize,
    /// The payload read so far; its capacity is the datagram's length once known.
    payload: Option<BytesMut>,
    want: usize,
}

impl DatagramDecoder {
    /// A decoder at a datagram boundary.
    pub fn new() -> Self {
        Self::default()
    }

    /// Consumes bytes from `input` up to the end of the next datagram at most. Returns how
    /// many bytes it took and the datagram if one completed. Bytes after a completed
    /// datagram stay in `input` for the next call.
    pub fn push(&mut self, input: &[u8]) -> Result<(usize, Option<Bytes>), DatagramError> {
        let mut used = 0;
        if self.payload.is_none() {
            let take = (DATAGRAM_HEADER - self.header_len).min(input.len());
            self.header[self.header_len..self.header_len + take].copy_from_slice(&input[..take]);
            self.header_len += take;
            used += take;
            if self.header_len < DATAGRAM_HEADER {
                return Ok((used, None));
            }
            let len = usize::from(u16::from_be_bytes(self.header));
            if len > MAX_DATAGRAM {
                return Err(DatagramError::Malformed(len));
            }
            self.want = len;
            self.payload = Some(BytesMut::with_capacity(len));
        }
        let payload = self.payload.as_mut().expect("set above");
        let take = (self.want - payload.len()).min(input.len() - used);
        payload.put_slice(&input[used..used + take]);
        used += take;
        if payload.len() < self.want {
            return Ok((used, None));
        }
        self.header_len = 0;
        let done = self.payload.take().expect("set above").freeze();
        Ok((used, Some(done)))
    }

    /// Whether the decoder is between datagrams (a clean place for the stream to end).
    pub fn at_boundary(&self) -> bool {
        self.header_len == 0 && self.payload.is_none()
    }

    /// Bytes still missing from the datagram in progress (0 at a boundary).
    pub fn missing(&self) -> usize {
        match &self.payload {
            Some(p) => self.want - p.len(),
            None if self.header_len == 0 => 0,
            None => DATAGRAM_HEADER - self.header_len,
        }
    }
}

/// A [`TunnelStream`] carrying datagrams (rd's `udp` extension): [`send`](Self::send)
/// frames one, [`recv`](Self::recv) returns the next whole one, whatever Data messages the
/// bytes came in. Open it on a stream dialed with network `udp`.
///
/// `recv` is cancel-safe (bytes read stay in the decoder), so it may sit in a `select!`
/// beside other events. A `send` cancelled half-way keeps its unwritten bytes and the next
/// send writes them first, so the framing holds; to drop a datagram that waits, end the
/// stream. Dropping the value closes the stream.
#[derive(Debug)]
pub struct DatagramStream {
    stream: TunnelStream,
    decoder: DatagramDecoder,
    /// Received bytes not yet decoded (the rest of a chunk after a datagram).
    pending: Bytes,
    /// The framed datagram being written.
    out: BytesMut,
}

/// Most bytes one read from the stream takes.
const READ_CHUNK: usize = 64 * 1024;

impl DatagramStream {
    /// Datagrams over `stream`.
    pub fn new(stream: TunnelStream) -> Self {
        Self {
            stream,
            decoder: DatagramDecoder::new(),
            pending: Bytes::new(),
            out: BytesMut::new(),
        }
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &TunnelStream {
        &self.stream
    }

    /// The stream underneath; bytes received and not yet returned as a datagram are lost.
    pub fn into_inner(self) -> TunnelStream {
        self.stream
    }

    /// Sends one datagram (0 to [`MAX_DATAGRAM`] bytes). Waits while the stream's send
    /// buffer is full, as any write, so a congested tunnel slows the sender down; a
    /// sender that must not wait drops datagrams before calling this instead.
    ///
    /// Cancel-safe in the sense that matters for framing: bytes of a send cancelled
    /// half-way stay queued and go out first at the next send, so the stream never carries
    /// half a datagram followed by another (the cancelled datagram itself may arrive late).
    pub async fn send(&mut self, datagram: &[u8]) -> Result<(), DatagramError> {
        self.send_all([datagram]).await
    }

    /// Sends datagrams in one write (one Data message when they fit), as
    /// [`send`](Self::send) does each: what a sender with a queue of them should use. A
    /// datagram too large fails the call before anything is written.
    pub async fn send_all<'d>(
        &mut self,
        datagrams: impl IntoIterator<Item = &'d [u8]>,
    ) -> Result<(), DatagramError> {
        // After what a cancelled send left (see `send`); a datagram too large takes its
        // batch back out.
        let queued = self.out.len();
        for datagram in datagrams {
            if let Err(e) = encode_datagram(datagram, &mut self.out) {
                self.out.truncate(queued);
                return Err(e);
            }
        }
        self.write_out().await
    }

    async fn write_out(&mut self) -> Result<(), DatagramError> {
        while !self.out.is_empty() {
            let n = self.stream.write_shared(&self.out).await?;
            self.out.advance(n);
        }
        // Release a large batch's buffer; small ones reuse it.
        if self.out.capacity() > 64 * 1024 {
            self.out = BytesMut::new();
        }
        Ok(())
    }

    /// The next datagram, `Ok(None)` when the peer closed the stream cleanly between
    /// datagrams. A stream that ends inside a datagram or frames one longer than
    /// [`MAX_DATAGRAM`] is an error; the caller should drop (or reset) the stream then.
    pub async fn recv(&mut self) -> Result<Option<Bytes>, DatagramError> {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Poll form of [`recv`](Self::recv).
    pub fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<Bytes>, DatagramError>> {
        loop {
            if !self.pending.is_empty() {
                let (used, done) = self.decoder.push(&self.pending)?;
                self.pending.advance(used);
                if let Some(datagram) = done {
                    return Poll::Ready(Ok(Some(datagram)));
                }
                continue;
            }
            match ready!(self.stream.poll_read_chunk(cx, READ_CHUNK))? {
                Some(chunk) => self.pending = chunk,
                None if self.decoder.at_boundary() => return Poll::Ready(Ok(None)),
                None => {
                    return Poll::Ready(Err(DatagramError::Truncated {
                        missing: self.decoder.missing(),
                    }))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn framed(datagrams: &[Vec<u8>]) -> Vec<u8> {
        let mut out = BytesMut::new();
        for d in datagrams {
            encode_datagram(d, &mut out).expect("fits");
        }
        out.to_vec()
    }

    /// Feeds `bytes` cut at `cuts` and returns the datagrams and the decoder.
    fn decode(
        bytes: &[u8],
        cuts: &[usize],
    ) -> Result<(Vec<Vec<u8>>, DatagramDecoder), DatagramError> {
        let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        points.push(0);
        points.push(bytes.len());
        points.sort_unstable();
        let mut decoder = DatagramDecoder::new();
        let mut got = Vec::new();
        for w in points.windows(2) {
            let mut piece = &bytes[w[0]..w[1]];
            while !piece.is_empty() {
                let (used, done) = decoder.push(piece)?;
                assert!(used > 0, "no progress on a non-empty piece");
                piece = &piece[used..];
                got.extend(done.map(|d| d.to_vec()));
            }
        }
        Ok((got, decoder))
    }

    #[test]
    fn limits_and_edges() {
        let mut out = BytesMut::new();
        encode_datagram(&[], &mut out).expect("empty datagrams exist");
        assert_eq!(&out[..], &[0, 0]);
        encode_datagram(&vec![7; MAX_DATAGRAM], &mut out).expect("largest");
        assert!(matches!(
            encode_datagram(&vec![7; MAX_DATAGRAM + 1], &mut out),
            Err(DatagramError::TooLarge(65_508))
        ));
        let mut decoder = DatagramDecoder::new();
        let err = decoder.push(&[0xff, 0xff, 1]).expect_err("65535 > max");
        assert_eq!(
            err.to_string(),
            "malformed datagram stream: a length of 65535 bytes (at most 65507)"
        );
        let (got, decoder) = decode(&[0, 3, 1, 2], &[]).expect("valid so far");
        assert!(got.is_empty());
        assert_eq!(decoder.missing(), 1);
        assert!(!decoder.at_boundary());
    }

    proptest! {
        /// Whatever the cuts, the datagrams come out whole and in order, and the decoder
        /// ends at a boundary.
        #[test]
        fn boundaries_survive_any_split(
            datagrams in prop::collection::vec(
                prop_oneof![
                    prop::collection::vec(any::<u8>(), 0..64),
                    prop::collection::vec(any::<u8>(), 0..3000),
                ],
                0..20,
            ),
            big in prop::option::of(prop::collection::vec(any::<u8>(), MAX_DATAGRAM..=MAX_DATAGRAM)),
            cuts in prop::collection::vec(any::<usize>(), 0..40),
        ) {
            let mut datagrams = datagrams;
            datagrams.extend(big);
            let bytes = framed(&datagrams);
            let (got, decoder) = decode(&bytes, &cuts).expect("valid framing");
            prop_assert_eq!(got, datagrams);
            prop_assert!(decoder.at_boundary());
        }

        /// Arbitrary bytes never panic or make the decoder hold more than one datagram:
        /// either an error (a length beyond the maximum) or datagrams each at most the
        /// maximum, with the rest accounted for as missing.
        #[test]
        fn malformed_input_is_an_error_not_a_panic(
            bytes in prop::collection::vec(any::<u8>(), 0..300),
            cuts in prop::collection::vec(any::<usize>(), 0..10),
        ) {
            match decode(&bytes, &cuts) {
                Ok((got, decoder)) => {
                    let used: usize = got.iter().map(|d| d.len() + DATAGRAM_HEADER).sum();
                    prop_assert!(used <= bytes.len());
                    prop_assert!(decoder.missing() <= MAX_DATAGRAM + DATAGRAM_HEADER);
                }
                Err(DatagramError::Malformed(len)) => prop_assert!(len > MAX_DATAGRAM),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }
}
