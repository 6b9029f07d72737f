//! [`WebSocketIo`]: an upgraded websocket connection handed to a session.
//!
//! The handshake is tungstenite's (the client side in [`crate::transport`], or the caller's
//! own: hyper's upgrade on rd-server, `WebSocketStream::from_raw_socket` in tests); from
//! then on the session's driver reads and writes the frames itself (see `frames.rs`), so it
//! takes the byte stream back, with whatever the handshake read past the `101` head.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;

/// An upgraded websocket connection, ready for a session: the byte stream, the bytes a
/// handshake read past its head (the start of the first frames), and the reading limits.
#[derive(Debug)]
pub struct WebSocketIo<S> {
    io: S,
    read_ahead: Bytes,
    max_message_size: usize,
    read_buffer: usize,
    read_burst: usize,
}

impl<S> WebSocketIo<S> {
    /// A connection whose handshake is done and consumed nothing beyond its head, with the
    /// default limits ([`DEFAULT_MAX_MESSAGE_SIZE`](crate::DEFAULT_MAX_MESSAGE_SIZE),
    /// [`DEFAULT_WS_READ_BUFFER`](crate::DEFAULT_WS_READ_BUFFER)).
    pub fn new(io: S) -> Self {
        Self {
            io,
            read_ahead: Bytes::new(),
            max_message_size: crate::DEFAULT_MAX_MESSAGE_SIZE,
            read_buffer: crate::DEFAULT_WS_READ_BUFFER,
            read_burst: crate::DEFAULT_BURST,
        }
    }

    /// Bytes the handshake read beyond its head: they are the first frames' bytes.
    pub fn read_ahead(mut self, bytes: Bytes) -> Self {
        self.read_ahead = bytes;
        self
    }

    /// Largest websocket message accepted; a larger one ends the session.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// How much one read of small frames takes at first (at least 1 KiB). The buffer exists
    /// only while frames arrive; a frame larger than this is read into a buffer of its own.
    pub fn read_buffer(mut self, bytes: usize) -> Self {
        self.read_buffer = bytes.max(1024);
        self
    }

    /// How large reads of small frames grow while each read fills its buffer (a burst of
    /// many small messages): at most this much per read syscall (0: no growth).
    pub fn read_burst(mut self, bytes: usize) -> Self {
        self.read_burst = bytes;
        self
    }

    /// The connection.
    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// A tokio-tungstenite websocket over the connection, for a caller that speaks
    /// websocket messages itself rather than running a session; `role` is this end's.
    pub async fn into_websocket_stream(self, role: Role) -> WebSocketStream<S>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let config = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(self.max_message_size))
            .read_buffer_size(self.read_buffer);
        WebSocketStream::from_partially_read(self.io, self.read_ahead.to_vec(), role, Some(config))
            .await
    }

    pub(crate) fn into_parts(self) -> (S, Bytes, ReadLimits) {
        let limits = ReadLimits {
            max_message_size: self.max_message_size,
            read_buffer: self.read_buffer,
            read_burst: self.read_burst.max(self.read_buffer),
        };
        (self.io, self.read_ahead, limits)
    }
}

/// How a session's frame reader reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ReadLimits {
    pub(crate) max_message_size: usize,
    pub(crate) read_buffer: usize,
    pub(crate) read_burst: usize,
}

/// Something a session can run on: an upgraded websocket connection.
///
/// Implemented by [`WebSocketIo`] and by tokio-tungstenite's `WebSocketStream`, from which
/// the session takes the stream and the configured message size and read buffer. The
/// `WebSocketStream` must not have read anything yet beyond its handshake (true of one
/// made with `from_raw_socket`, as servers do after their own upgrade): bytes tungstenite
/// buffered are not handed over. Clients connected by [`crate::transport`] get a
/// [`WebSocketIo`] that carries them.
pub trait IntoWebSocketIo {
    /// The byte stream.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// The connection and its limits.
    fn into_websocket_io(self) -> WebSocketIo<Self::Io>;
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> IntoWebSocketIo for WebSocketIo<S> {
    type Io = S;

    fn into_websocket_io(self) -> WebSocketIo<S> {
        self
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> IntoWebSocketIo for WebSocketStream<S> {
    type Io = S;

    fn into_websocket_io(self) -> WebSocketIo<S> {
        let config = *self.get_config();
        let io = WebSocketIo::new(self.into_inner())
            .read_buffer(config.read_buffer_size)
            .read_burst(0);
        match config.max_message_size {
            Some(max) => io.max_message_size(max),
            None => io.max_message_size(usize::MAX),
        }
    }
}

/// Keeps a copy of everything read through it until [`take`](Self::take), so that the bytes
/// a client handshake reads past the server's `101` head (frames the server sent at once,
/// such as its first ping) can be handed to the session instead of being lost with
/// tungstenite's read buffer.
#[derive(Debug)]
pub(crate) struct Recorder<S> {
    io: S,
    seen: BytesMut,
}

impl<S> Recorder<S> {
    pub(crate) fn new(io: S) -> Self {
        Self {
            io,
            seen: BytesMut::new(),
        }
    }

    /// The stream and the bytes read through it after the HTTP response head, if the
    /// recording holds a complete head.
    pub(crate) fn take(self) -> (S, Bytes) {
        let mut seen = self.seen;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let tail = match response.parse(&seen) {
            Ok(httparse::Status::Complete(head)) => seen.split_off(head).freeze(),
            _ => Bytes::new(),
        };
        (self.io, tail)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Recorder<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            this.seen.extend_from_slice(&buf.filled()[before..]);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Recorder<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn the_bytes_after_the_response_head_are_kept() {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x89\x00")
            .await
            .unwrap();
        let mut r = Recorder::new(b);
        let mut buf = [0u8; 200];
        let n = r.read(&mut buf).await.unwrap();
        assert!(n > 50);
        let (_io, tail) = r.take();
        assert_eq!(&tail[..], b"\x89\x00", "a ping the server sent at once");
    }
}
