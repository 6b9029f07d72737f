//! Shared harness for rd-session's integration tests: in-memory websockets, connected
//! session pairs, a raw protocol peer that does not use rd-session, and connect handlers
//! (echo, producer).
#![allow(dead_code, clippy::unwrap_used)]

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt as _, StreamExt as _};
use rd_proto::{decode, ConnId, Frame, Message, Target};
use rd_session::{BoxedIo, ConnectHandler, ConnectRefused, SessionBuilder, SessionHandle};
use tokio::io::{AsyncWriteExt as _, DuplexStream};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::WebSocketStream;

/// An in-memory websocket end.
pub type Ws = WebSocketStream<DuplexStream>;

/// Upper bound for test steps that should finish quickly; only reached on failure.
pub const BOUND: Duration = Duration::from_secs(60);

/// Bytes buffered in each direction of the in-memory "socket".
pub const DUPLEX_BUFFER: usize = 256 * 1024;

/// Two ends of one in-memory websocket: (server role, client role).
pub async fn ws_pair() -> (Ws, Ws) {
    let (a, b) = tokio::io::duplex(DUPLEX_BUFFER);
    let server = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
    let client = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
    (server, client)
}

/// The client key and session key of every harness server session.
pub const CLIENT_KEY: &str = "foo";
/// See [`CLIENT_KEY`].
pub const SESSION_KEY: i64 = 5_577_006_791_947_779_410;

/// A connected rd server session and rd client session.
pub struct Pair {
    /// The websocket's server side (dials through the client).
    pub server: SessionHandle,
    /// The websocket's client side (serves Connects with the handler).
    pub client: SessionHandle,
}

/// A pair whose client serves Connects with `handler`; the server has no handler.
pub async fn pair(handler: impl ConnectHandler) -> Pair {
    pair_with(
        SessionBuilder::server(CLIENT_KEY, SESSION_KEY),
        SessionBuilder::client().connect_handler(handler),
    )
    .await
}

/// A pair from two builders.
pub async fn pair_with(server: SessionBuilder, client: SessionBuilder) -> Pair {
    let (s, c) = ws_pair().await;
    Pair {
        server: server.spawn(s),
        client: client.spawn(c),
    }
}

/// A handler whose every connection is an in-memory echo service.
pub fn echo_handler() -> impl ConnectHandler {
    |_target: Target| async {
        let (service, io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(service);
            tokio::io::copy(&mut r, &mut w).await.ok();
        });
        Ok::<BoxedIo, ConnectRefused>(Box::new(io))
    }
}

/// Deterministic content: byte `offset` of the stream with `seed`.
pub fn pattern_byte(seed: u64, offset: u64) -> u8 {
    let x = offset
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(seed.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    ((x >> 29) ^ (x >> 47) ^ offset) as u8
}

/// Fills `buf` with the pattern of `seed` starting at `offset`.
pub fn fill_pattern(seed: u64, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        *b = pattern_byte(seed, offset + i as u64);
    }
}

/// Checks `buf` against the pattern of `seed` at `offset`; the first bad offset on mismatch.
pub fn check_pattern(seed: u64, offset: u64, buf: &[u8]) -> Result<(), u64> {
    for (i, b) in buf.iter().enumerate() {
        if *b != pattern_byte(seed, offset + i as u64) {
            return Err(offset + i as u64);
        }
    }
    Ok(())
}

/// What a producer is told to write for one target.
#[derive(Clone, Copy, Debug)]
pub struct Produce {
    /// Total bytes.
    pub len: u64,
    /// Pattern seed.
    pub seed: u64,
}

/// A handler whose connections write `plan(target)` bytes of the seeded pattern, then
/// close. `written` (if any) counts bytes the producer handed to its connection, per seed.
pub fn producer_handler(
    plan: impl Fn(&Target) -> Produce + Send + Sync + 'static,
    written: Option<Arc<Vec<AtomicUsize>>>,
) -> impl ConnectHandler {
    let plan = Arc::new(plan);
    move |target: Target| {
        let plan = plan.clone();
        let written = written.clone();
        async move {
            let Produce { len, seed } = plan(&target);
            let (mut service, io) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut off = 0u64;
                while off < len {
                    let n = (len - off).min(buf.len() as u64) as usize;
                    fill_pattern(seed, off, &mut buf[..n]);
                    if service.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    off += n as u64;
                    if let Some(w) = &written {
                        w[seed as usize].fetch_add(n, Ordering::SeqCst);
                    }
                }
                service.shutdown().await.ok();
            });
            Ok::<BoxedIo, ConnectRefused>(Box::new(io))
        }
    }
}

/// A websocket peer speaking the remotedialer protocol by hand (no rd-session), for
/// replaying captured frames and sending bad input.
pub struct RawPeer {
    /// The websocket.
    pub ws: Ws,
    next_id: i64,
}

impl RawPeer {
    /// Wraps a websocket end.
    pub fn new(ws: Ws) -> Self {
        Self { ws, next_id: 1_000 }
    }

    /// Sends one message with a fresh message id.
    pub async fn send(&mut self, msg: &Message) {
        let id = self.next_id;
        self.next_id += 1;
        self.send_raw(msg.to_bytes(id)).await;
    }

    /// Sends raw bytes as one binary websocket message.
    pub async fn send_raw(&mut self, bytes: impl Into<Bytes>) {
        self.ws.send(WsMessage::Binary(bytes.into())).await.unwrap();
    }

    /// The next websocket message, `None` once the websocket ended (or failed).
    pub async fn next_ws(&mut self) -> Option<WsMessage> {
        match self.ws.next().await {
            Some(Ok(m)) => Some(m),
            _ => None,
        }
    }

    /// The next binary message, raw; pings and pongs are skipped (tungstenite answers pings).
    pub async fn next_binary(&mut self) -> Option<Bytes> {
        loop {
            match self.next_ws().await? {
                WsMessage::Binary(b) => return Some(b),
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
                WsMessage::Text(t) => panic!("unexpected text frame {t:?}"),
                WsMessage::Close(_) => return None,
            }
        }
    }

    /// The next remotedialer message, decoded; `None` once the websocket ended.
    pub async fn next_frame(&mut self) -> Option<Frame> {
        let raw = self.next_binary().await?;
        Some(decode(raw).expect("rd sent something that does not decode"))
    }

    /// [`next_frame`](Self::next_frame) within [`BOUND`], panicking on end or timeout.
    pub async fn expect_message(&mut self) -> Message {
        tokio::time::timeout(BOUND, self.next_frame())
            .await
            .expect("timed out waiting for a message")
            .expect("the websocket ended")
            .message
    }

    /// Waits for the next Connect, returning its id and target text.
    pub async fn expect_connect(&mut self) -> (ConnId, String) {
        match self.expect_message().await {
            Message::Connect { conn_id, target } => (conn_id, target.to_string()),
            other => panic!("expected Connect, got {}", summary(&other)),
        }
    }
}

/// A server-side rd session (`foo`/[`SESSION_KEY`]) with a raw peer as its client.
pub async fn raw_client_of(server: SessionBuilder) -> (SessionHandle, RawPeer) {
    let (s, c) = ws_pair().await;
    (server.spawn(s), RawPeer::new(c))
}

/// A server-side rd session with default settings and a raw client peer.
pub async fn raw_client() -> (SessionHandle, RawPeer) {
    raw_client_of(SessionBuilder::server(CLIENT_KEY, SESSION_KEY)).await
}

/// A client-side rd session with a raw peer as its server.
pub async fn raw_server_of(client: SessionBuilder) -> (SessionHandle, RawPeer) {
    let (s, c) = ws_pair().await;
    (client.spawn(c), RawPeer::new(s))
}

/// Runs `fut` within `bound`, panicking with `what` on timeout.
pub async fn within<F: Future>(bound: Duration, what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(bound, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out: {what}"),
    }
}

/// Polls `cond` (yielding between tries) until it holds, within [`BOUND`].
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    within(BOUND, what, async {
        while !cond() {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

/// A short description of a message for panics (Data payloads can be megabytes).
pub fn summary(msg: &Message) -> String {
    match msg {
        Message::Data { conn_id, payload } => {
            format!("Data {{ conn_id: {conn_id}, {} bytes }}", payload.len())
        }
        other => format!("{other:?}"),
    }
}
