//! rd-proto: the Rancher remotedialer wire protocol without IO.
//!
//! Byte-for-byte compatible with the Go implementation (`github.com/rancher/remotedialer`):
//! one remotedialer message per binary websocket message, headers of Go signed varints,
//! Pause/Resume flow control per connection. This crate has no sockets, no async runtime and
//! reads no clock: time comes in as an argument, as in quinn-proto.
//!
//! It has two layers:
//! - the codec: [`Message`], [`decode`] and [`Message::encode`];
//! - the [`Session`] state machine. The caller feeds it websocket messages
//!   ([`Session::handle_message`]), pings/pongs ([`Session::handle_keepalive`]), timer ticks
//!   ([`Session::handle_timeout`]) and application calls ([`Session::open_stream`],
//!   [`Session::write`], [`Session::read`], [`Session::finish`], [`Session::reset`]). After each
//!   input it drains, in this order, [`Session::poll_transmit`] (websocket messages to send),
//!   [`Session::poll_timeout`] (when to call `handle_timeout` next) and
//!   [`Session::poll_event`] (what the application must know).
//!
//! ```
//! use std::time::Instant;
//! use rd_proto::{Config, Event, Identity, ReadOutcome, Session, Side, Target, Transmit};
//!
//! let now = Instant::now();
//! let mut server = Session::new(Side::Server, Config::default(), Identity::client(), now, 1);
//! let mut client = Session::new(Side::Client, Config::default(), Identity::client(), now, 100);
//!
//! // The server dials through the client and writes a request.
//! let id = server.open_stream(now, Target::new("tcp", "127.0.0.1:8125").unwrap()).unwrap();
//! server.write(id, b"GET / HTTP/1.0\r\n\r\n").unwrap();
//! while let Some(Transmit::Message(bytes)) = server.poll_transmit() {
//!     client.handle_message(now, bytes).unwrap();
//! }
//!
//! // The client learns of the stream and reads the request.
//! let Some(Event::StreamRequested { id, target }) = client.poll_event() else { panic!() };
//! assert_eq!(target.to_string(), "tcp/127.0.0.1:8125");
//! assert_eq!(client.read(id, 1024).unwrap(), ReadOutcome::Data("GET / HTTP/1.0\r\n\r\n".into()));
//! ```
//!
//! Inside, one idea per module, imported one way (no module imports one that imports it):
//! `varint`, `ids`, `target`, `message` and `error` are the vocabulary; `codec` decodes; `config`
//! holds [`Side`], [`Identity`] and [`Config`]; `event` and `outbox` are what a session
//! says; `timer` and `keepalive` its pings and deadlines; `streams` its virtual connections
//! (table, streams, receive and send halves, flow control, the receive budget); `session`
//! dispatches inputs to them and is the `poll_*` surface.
#![forbid(unsafe_code)]
#![warn(missing_docs)]
#![warn(unreachable_pub)]

mod codec;
mod config;
mod error;
mod event;
mod ids;
mod keepalive;
mod message;
mod outbox;
mod pool;
mod session;
mod streams;
mod target;
mod timer;
pub mod varint;

pub use codec::decode;
pub use config::{Config, Identity, Side};
pub use error::{
    ConfigError, DecodeError, HeaderField, OpenError, ProtocolError, SessionEnd, StreamEnd,
    StreamError, TargetError,
};
pub use event::{Event, Limit};
pub use ids::{ClientSession, ConnId};
pub use message::{
    data_header_len, put_data_header, Frame, Message, MessageType, CREDIT_INITIAL_WINDOW,
    LEGACY_DEADLINE_MS, MAX_ERROR_TEXT,
};
pub use outbox::Transmit;
pub use session::{Session, SessionStats};
pub use streams::{Origin, ReadOutcome, StreamFlow, StreamInfo};
pub use target::{Target, MAX_CONNECT_PAYLOAD};
