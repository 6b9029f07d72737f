//! rd-session: a Rancher remotedialer session on tokio.
//!
//! A [`SessionBuilder`] turns an established websocket (tokio-tungstenite) into a running
//! session: one driver task owns the socket and feeds the sans-IO [`rd_proto::Session`];
//! [`SessionHandle::dial`] opens [`TunnelStream`]s (`AsyncRead + AsyncWrite`) through the
//! peer; Connects from the peer go to a [`ConnectHandler`] whose local connection the session
//! pipes to the stream. Keepalive pings, SyncConnections, Pause/Resume and teardown follow
//! the Go implementation. See `docs/architecture.md` for the task and buffer layout.
//!
//! ```
//! use rd_session::{BoxedIo, ConnectRefused, SessionBuilder};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tokio_tungstenite::{tungstenite::protocol::Role, WebSocketStream};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! // Two ends of an in-memory websocket.
//! let (a, b) = tokio::io::duplex(64 * 1024);
//! let server_ws = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
//! let client_ws = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
//!
//! // The client serves every Connect with an in-memory echo service.
//! let _client = SessionBuilder::client()
//!     .connect_handler(|_target| async {
//!         let (service, io) = tokio::io::duplex(1024);
//!         tokio::spawn(async move {
//!             let (mut r, mut w) = tokio::io::split(service);
//!             tokio::io::copy(&mut r, &mut w).await.ok();
//!         });
//!         Ok::<BoxedIo, ConnectRefused>(Box::new(io))
//!     })
//!     .spawn(client_ws);
//! let server = SessionBuilder::server("foo", 1).spawn(server_ws);
//!
//! let mut stream = server.dial_addr("tcp", "127.0.0.1:7").unwrap();
//! stream.write_all(b"ping").await.unwrap();
//! let mut buf = [0; 4];
//! stream.read_exact(&mut buf).await.unwrap();
//! assert_eq!(&buf, b"ping");
//! # }
//! ```
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod backoff;
mod datagram;
mod driver;
mod error;
mod extensions;
mod frames;
mod handle;
mod incoming;
pub mod inspect;
mod observer;
mod shared;
mod socket;
mod splice;
mod stream;
pub mod transport;
mod websocket;

pub use backoff::{Backoff, DEFAULT_BACKOFF_INITIAL, DEFAULT_BACKOFF_JITTER, DEFAULT_BACKOFF_MAX};
pub use datagram::{
    encode_datagram, DatagramDecoder, DatagramError, DatagramStream, DATAGRAM_HEADER, MAX_DATAGRAM,
};
pub use driver::{AnnouncementFn, SessionDriver};
pub use error::{error_chain, DialError, StreamClosed};
pub use extensions::{
    Extensions, CONNECT_ACK, CREDIT, EXTENSIONS_HEADER, HALF_CLOSE, HELD_SERVERS_HEADER, REPLICAS,
    REPLICAS_HEADER, SERVER_ID_HEADER, UDP,
};
pub use handle::{is_udp, PeerNotices, SessionBuilder, SessionHandle, GOING_AWAY};
pub use incoming::{
    pipe, BoxFuture, BoxedIo, ConnectHandler, ConnectRefused, Dialed, LocalIo, RefuseAll,
};
pub use observer::{NoObserver, SessionObserver};
pub use shared::{driver_stats, DriverStats};
pub use socket::{
    set_tunnel_send_queue, tune_accepted_socket, tune_tunnel_socket, TUNNEL_NOTSENT_LOWAT,
    TUNNEL_SOCKET_BUFFER,
};
pub use splice::{splice, SpliceError, Spliced};
pub use stream::{Established, TunnelStream};
pub use websocket::{IntoWebSocketIo, WebSocketIo};

/// A tungstenite config for tunnel websockets: no message larger than `max_message_size`
/// (Go sets no limit; a Go peer's Data messages are at most its write size, 32 KiB for
/// `io.Copy`), frames up to the same size so Go's unfragmented server frames fit, and a
/// 16 KiB read buffer: tungstenite allocates it up front for every connection, so its size
/// is most of an idle session's memory (128 KiB by default), while 16 KiB reads still move
/// GB/s.
pub fn websocket_config(
    max_message_size: usize,
) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    websocket_config_with(max_message_size, DEFAULT_WS_READ_BUFFER)
}

/// Default websocket read buffer of [`websocket_config`].
pub const DEFAULT_WS_READ_BUFFER: usize = 16 * 1024;

/// Default of the largest read of small websocket frames in a burst
/// ([`WebSocketIo::read_burst`]): 64 KiB, a
/// few Data messages.
pub const DEFAULT_BURST: usize = 64 * 1024;

/// [`websocket_config`] with another read buffer size. tungstenite zero-fills the whole
/// buffer on its first read, so it is resident for the session's life: measured on a
/// 10,000-session storm, a server's idle session costs about 22 KiB with 16 KiB and 10 KiB
/// with 4 KiB. It is also the most one read syscall takes, so a smaller buffer costs more
/// syscalls per byte on bulk transfers.
pub fn websocket_config_with(
    max_message_size: usize,
    read_buffer: usize,
) -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(read_buffer.max(1024))
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size))
}

/// Default websocket message size limit: 64 MiB, tungstenite's default.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 << 20;
