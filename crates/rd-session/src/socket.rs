//! Socket options for the TCP connection under a tunnel.

use std::io;

use tokio::net::TcpStream;

/// Kernel send and receive buffer size [`tune_tunnel_socket`] asks for (Linux doubles it).
pub const TUNNEL_SOCKET_BUFFER: usize = 512 * 1024;

/// Sets TCP_NODELAY and bounds the kernel's send and receive buffers of a socket that
/// carries a tunnel.
///
/// Pause only takes effect for bytes not yet sent, and with buffer autotuning the kernels
/// on both ends can hold many megabytes: all of it arrives after a Pause, raising memory use
/// and the latency of every other stream queued behind it. Fixed buffers keep that bounded
/// without costing throughput on fast links (loopback moves GB/s with them). Use it on both
/// ends: the client's connection and the server's accepted one.
pub fn tune_tunnel_socket(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = socket2::SockRef::from(stream);
    socket.set_send_buffer_size(TUNNEL_SOCKET_BUFFER)?;
    socket.set_recv_buffer_size(TUNNEL_SOCKET_BUFFER)?;
    Ok(())
}
