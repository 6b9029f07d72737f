//! The agent's end of a `udp` stream (rd's udp extension): a connected UDP socket that the
//! session splices to the stream like any local connection, with each datagram framed as a
//! 2-byte length and its payload on the stream's side.
//!
//! Stream to socket: the framed bytes are decoded and each whole datagram is sent.
//! Socket to stream: each datagram received is framed and read by the splice. When the
//! tunnel is congested the splice stops reading, and datagrams wait in the socket's kernel
//! receive buffer and beyond it are dropped by the kernel, as for any slow UDP receiver:
//! memory stays bounded and no datagram is held back longer than the buffer lasts.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rd_proto::Target;
use rd_session::{DatagramDecoder, DATAGRAM_HEADER, MAX_DATAGRAM};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UdpSocket;

/// Receive buffer asked for each udp target's socket.
const UDP_RECV_BUFFER: usize = 1024 * 1024;

/// Binds an ephemeral UDP socket and connects it to `target` (`udp`, `udp4` or `udp6`,
/// `host:port`, resolved here on the agent), so it only exchanges datagrams with the
/// target.
pub async fn dial_udp(target: &Target) -> io::Result<UdpRelay> {
    crate::dial::first_reachable(target.proto(), target.address(), |addr| async move {
        let local: std::net::SocketAddr = if addr.is_ipv4() {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let socket = UdpSocket::bind(local).await?;
        // Replies wait here while the tunnel is busy: more room than the default (about
        // 200 KiB, 4 ms at 50,000 datagrams of 512 bytes a second) before the kernel
        // drops them. Kernel memory, used only while a backlog lasts; capped by
        // `net.core.rmem_max`.
        socket2::SockRef::from(&socket)
            .set_recv_buffer_size(UDP_RECV_BUFFER)
            .ok();
        socket.connect(addr).await?;
        Ok(UdpRelay::new(socket))
    })
    .await
}

/// A connected UDP socket as a framed byte stream: what the session splices to a `udp`
/// stream. Writes take framed datagrams and send them; reads return received datagrams
/// framed. Shutting down the write side (the stream's end) ends the reads too, so the
/// flow ends with its stream.
#[derive(Debug)]
pub struct UdpRelay {
    socket: UdpSocket,
    decoder: DatagramDecoder,
    /// A decoded datagram the socket could not take yet.
    unsent: Option<Bytes>,
    /// A received datagram, framed, not yet read out; its buffer is freed once the socket
    /// runs dry, so an idle flow holds no 64 KiB.
    received: BytesMut,
    /// The stream ended: reads return EOF.
    finished: bool,
    /// The reader to wake when `finished` is set.
    reader: Option<Waker>,
    /// A receive error met after a read had data already, for the next read.
    error: Option<io::Error>,
    sent: u64,
    refused: u64,
}

impl UdpRelay {
    fn new(socket: UdpSocket) -> Self {
        Self {
            socket,
            decoder: DatagramDecoder::new(),
            unsent: None,
            received: BytesMut::new(),
            finished: false,
            reader: None,
            error: None,
            sent: 0,
            refused: 0,
        }
    }

    /// The socket's local address.
    pub fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.socket.local_addr()
    }

    /// Datagrams sent to the target, and datagrams lost because the target's port
    /// answered with ICMP port unreachable (nothing listens there).
    pub fn counts(&self) -> (u64, u64) {
        (self.sent, self.refused)
    }

    fn poll_send_unsent(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(datagram) = &self.unsent {
            match ready!(self.socket.poll_send(cx, datagram)) {
                Ok(_) => self.sent += 1,
                // An earlier datagram's ICMP port unreachable: that one is lost, as UDP
                // loses datagrams; the flow goes on until the stream ends.
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => self.refused += 1,
                Err(e) => return Poll::Ready(Err(e)),
            }
            self.unsent = None;
        }
        Poll::Ready(Ok(()))
    }
}

fn invalid(e: rd_session::DatagramError) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl UdpRelay {
    /// Receives one datagram into `received`, framed, without waiting: `Ok(true)` if one
    /// was taken (or dropped as unframeable), `Ok(false)` if none is waiting.
    fn try_receive(&mut self) -> io::Result<bool> {
        self.received.clear();
        self.received.reserve(DATAGRAM_HEADER + MAX_DATAGRAM);
        self.received.put_u16(0);
        match self.socket.try_recv_buf(&mut self.received) {
            Ok(n) => {
                match u16::try_from(n) {
                    Ok(len) if usize::from(len) <= MAX_DATAGRAM => {
                        self.received[..DATAGRAM_HEADER].copy_from_slice(&len.to_be_bytes());
                    }
                    // Over IPv4 payloads are at most 65,507 bytes; a larger IPv6 one does
                    // not fit the framing and is dropped.
                    _ => self.received.clear(),
                }
                Ok(true)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.received.clear();
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // ICMP port unreachable for something we sent: nothing listens (yet).
                self.received.clear();
                self.refused += 1;
                Ok(true)
            }
            Err(e) => {
                self.received.clear();
                Err(e)
            }
        }
    }
}

impl AsyncRead for UdpRelay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // The splice keeps reading while it waits for the stream, so a datagram left
        // unsent by a write goes out from here too.
        if let Poll::Ready(Err(e)) = this.poll_send_unsent(cx) {
            return Poll::Ready(Err(e));
        }
        if let Some(e) = this.error.take() {
            return Poll::Ready(Err(e));
        }
        let mut filled = false;
        loop {
            if !this.received.is_empty() {
                let n = this.received.len().min(buf.remaining());
                buf.put_slice(&this.received[..n]);
                this.received.advance(n);
                filled = true;
                if !this.received.is_empty() || buf.remaining() <= DATAGRAM_HEADER {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            if this.finished {
                return Poll::Ready(Ok(()));
            }
            if filled {
                // Datagrams that are waiting already go out in the same read (one Data
                // message for a burst); an error waits for the next read.
                match this.try_receive() {
                    Ok(true) => continue,
                    Ok(false) => return Poll::Ready(Ok(())),
                    Err(e) => {
                        this.error = Some(e);
                        return Poll::Ready(Ok(()));
                    }
                }
            }
            this.reader = Some(cx.waker().clone());
            if this.socket.poll_recv_ready(cx)?.is_pending() {
                // Idle: give the buffer back.
                this.received = BytesMut::new();
                return Poll::Pending;
            }
            this.try_receive()?;
        }
    }
}

impl AsyncWrite for UdpRelay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_send_unsent(cx))?;
        // Bytes are taken only once the socket can send: the splice that writes here does
        // not flush, so a datagram decoded while the socket could not take it would wait
        // for the next write. A new socket is not writable until the reactor says so.
        ready!(this.socket.poll_send_ready(cx))?;
        let (used, done) = this.decoder.push(buf).map_err(invalid)?;
        if let Some(datagram) = done {
            match this.socket.try_send(&datagram) {
                Ok(_) => this.sent += 1,
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => this.refused += 1,
                // Filled since it said ready: the next write, flush or read sends it.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.unsent = Some(datagram),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(used))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_send_unsent(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send_unsent(cx))?;
        if !this.decoder.at_boundary() {
            tracing::debug!(
                missing = this.decoder.missing(),
                "udp stream ended inside a datagram; its start is dropped"
            );
        }
        this.finished = true;
        if let Some(reader) = this.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rd_session::encode_datagram;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Framed writes become datagrams with their boundaries; datagrams come back framed;
    /// shutting down ends the reads.
    #[tokio::test]
    async fn frames_become_datagrams_and_back() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let target =
            Target::new("udp", echo.local_addr().expect("addr").to_string()).expect("target");
        let mut relay = dial_udp(&target).await.expect("dial");
        let mut framed = BytesMut::new();
        let datagrams: Vec<Vec<u8>> = vec![b"one".to_vec(), vec![], vec![9; 3000]];
        for d in &datagrams {
            encode_datagram(d, &mut framed).expect("fits");
        }
        // Written in awkward pieces: the boundaries come from the framing.
        for piece in framed.chunks(7) {
            relay.write_all(piece).await.expect("write");
        }
        relay.flush().await.expect("flush");
        let mut buf = vec![0u8; 65_536];
        for d in &datagrams {
            let (n, from) = echo.recv_from(&mut buf).await.expect("recv");
            assert_eq!(&buf[..n], &d[..]);
            echo.send_to(&buf[..n], from).await.expect("echo");
        }
        let mut back = vec![0u8; framed.len()];
        relay.read_exact(&mut back).await.expect("framed replies");
        assert_eq!(back, framed.to_vec());
        relay.shutdown().await.expect("shutdown");
        assert_eq!(relay.read(&mut buf).await.expect("eof"), 0);
        assert_eq!(relay.counts(), (3, 0));
    }

    /// The session's splice writes without flushing and then waits on reads: a datagram
    /// written to a socket the reactor has not yet seen writable must still go out (the
    /// first version kept it until the next write, so a lone DNS query never left).
    #[tokio::test]
    async fn a_write_without_flush_still_sends() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let target =
            Target::new("udp", echo.local_addr().expect("addr").to_string()).expect("target");
        let relay = dial_udp(&target).await.expect("dial");
        let (mut read_half, mut write_half) = tokio::io::split(relay);
        write_half
            .write_all(&[0, 2, b'h', b'i'])
            .await
            .expect("write");
        let echoing = async {
            let mut buf = [0u8; 16];
            let (n, from) = echo.recv_from(&mut buf).await.expect("recv");
            echo.send_to(&buf[..n], from).await.expect("echo");
        };
        let mut back = [0u8; 4];
        let (_, read) = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures_util::future::join(echoing, read_half.read_exact(&mut back)),
        )
        .await
        .expect("the datagram went out without a flush");
        read.expect("read");
        assert_eq!(back, [0, 2, b'h', b'i']);
    }

    /// Datagrams already waiting leave in one read (one Data message for a burst), each
    /// framed whole.
    #[tokio::test]
    async fn waiting_datagrams_leave_in_one_read() {
        let target_socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
        let target = Target::new("udp", target_socket.local_addr().expect("addr").to_string())
            .expect("target");
        let mut relay = dial_udp(&target).await.expect("dial");
        let relay_addr = relay.local_addr().expect("addr");
        let mut expected = BytesMut::new();
        for d in [&b"one"[..], b"", &[7u8; 1000][..]] {
            target_socket.send_to(d, relay_addr).await.expect("send");
            encode_datagram(d, &mut expected).expect("fits");
        }
        let mut buf = vec![0u8; 64 * 1024];
        let n = relay.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], &expected[..]);
    }
}
