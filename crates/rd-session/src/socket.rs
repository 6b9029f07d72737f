//! Socket options for the TCP connection under a tunnel.

use std::io;

use tokio::net::TcpStream;

/// Kernel send and receive buffer size [`tune_tunnel_socket`] asks for (Linux doubles it).
pub const TUNNEL_SOCKET_BUFFER: usize = 512 * 1024;

/// Unsent bytes a tunnel socket queues at most (`TCP_NOTSENT_LOWAT`, as HTTP/2 servers set
/// it so that priorities decide what goes next): beyond it a write waits, and the bytes
/// stay in the session's queues, where the driver's round-robin decides which stream goes
/// next. A small stream's request then waits behind at most this much of a bulk download
/// in our kernel, instead of the whole send buffer.
pub const TUNNEL_NOTSENT_LOWAT: u32 = 128 * 1024;

/// Sets TCP_NODELAY, bounds the kernel's send and receive buffers of a socket that carries
/// a tunnel, and the unsent bytes it queues ([`TUNNEL_NOTSENT_LOWAT`]).
///
/// Pause only takes effect for bytes not yet sent, and with buffer autotuning the kernels
/// on both ends can hold many megabytes: all of it arrives after a Pause, raising memory use
/// and the latency of every other stream queued behind it. Fixed buffers keep that bounded
/// without costing throughput on fast links (loopback moves GB/s with them). Use it on both
/// ends: the client's connection and the server's accepted one (a server that learns only
/// at the upgrade which connections carry tunnels uses [`tune_accepted_socket`] when it
/// accepts and [`set_tunnel_send_queue`] at the upgrade).
pub fn tune_tunnel_socket(stream: &TcpStream) -> io::Result<()> {
    tune_accepted_socket(stream)?;
    set_tunnel_send_queue(stream)
}

/// [`tune_tunnel_socket`] without the unsent-bytes bound, for every connection a server
/// accepts before it knows which will carry a tunnel (plain HTTP downloads would only pay
/// more wake-ups for it).
pub fn tune_accepted_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    socket.set_send_buffer_size(TUNNEL_SOCKET_BUFFER)?;
    socket.set_recv_buffer_size(TUNNEL_SOCKET_BUFFER)?;
    Ok(())
}

/// Bounds the unsent bytes of a socket that carries a tunnel ([`TUNNEL_NOTSENT_LOWAT`]).
/// Only on Linux and Android; elsewhere nothing is set.
pub fn set_tunnel_send_queue(stream: &TcpStream) -> io::Result<()> {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket2::SockRef::from(stream).set_tcp_notsent_lowat(lowat())?;
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = stream;
    Ok(())
}

/// The bound in force: [`TUNNEL_NOTSENT_LOWAT`], or `RD_TUNNEL_NOTSENT_LOWAT` (bytes) for
/// measurements.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn lowat() -> u32 {
    std::env::var("RD_TUNNEL_NOTSENT_LOWAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(TUNNEL_NOTSENT_LOWAT)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn tunnel_sockets_bound_their_unsent_bytes() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        tune_accepted_socket(&accepted).unwrap();
        tune_tunnel_socket(&client).unwrap();
        let lowat = |s: &TcpStream| socket2::SockRef::from(s).tcp_notsent_lowat().unwrap();
        assert!(client.nodelay().unwrap() && accepted.nodelay().unwrap());
        assert!(lowat(&client) > 0 && lowat(&client) < u32::MAX);
        set_tunnel_send_queue(&accepted).unwrap();
        assert_eq!(lowat(&accepted), lowat(&client));
    }
}
