//! [`splice`]: raw bytes both ways between a tunnel stream and a local connection, for
//! HTTP CONNECT, port forwards and upgraded `/client` requests.
//!
//! Each direction is copied until its source ends, and then only the *write* side of its
//! destination is shut down, as TCP half-close would: the other direction keeps flowing.
//! With rd's half-close extension (an rd agent) that is what the agent sees too: a local
//! client that shuts down writing gets the whole answer. With the Go protocol a tunnel
//! stream has no half-close (an EOF either way closes the connection on the agent's side in
//! both directions), so once the tunnel stream has ended (left the wire) and its last bytes
//! are delivered, the splice ends at once instead of waiting for the local side to close
//! too; the same holds for a half-closed stream the agent resets later.

use tokio::io::{AsyncRead, AsyncWrite};

pub use rd_session::{SpliceError, Spliced};

/// Copies `local` to `tunnel` and `tunnel` to `local` until both directions have ended (or
/// the tunnel stream has ended and delivered its last bytes, which with the Go protocol is
/// at its EOF): [`rd_session::splice`], the copy loop the agent's side runs too, for a
/// stream this task owns. A local failure resets the tunnel stream with the error's text,
/// so the agent drops its connection at once; a tunnel failure is returned for the caller
/// to log, and the local connection is closed when the caller drops it.
pub async fn splice<L>(tunnel: rd_session::TunnelStream, local: L) -> Result<Spliced, SpliceError>
where
    L: AsyncRead + AsyncWrite + Unpin,
{
    rd_session::splice(&tunnel, local).await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rd_session::{BoxedIo, ConnectRefused, Extensions, SessionBuilder, SessionHandle};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    const BOUND: std::time::Duration = std::time::Duration::from_secs(10);

    /// A server session whose client answers every Connect with `serve`'s duplex end, or
    /// refuses targets on port 9.
    async fn session(
        serve: impl Fn() -> BoxedIo + Send + Sync + 'static,
    ) -> (SessionHandle, SessionHandle) {
        session_with(Extensions::NONE, serve).await
    }

    /// [`session`] with `extensions` negotiated on both ends.
    async fn session_with(
        extensions: Extensions,
        serve: impl Fn() -> BoxedIo + Send + Sync + 'static,
    ) -> (SessionHandle, SessionHandle) {
        let (a, b) = tokio::io::duplex(256 * 1024);
        let server_ws = WebSocketStream::from_raw_socket(a, Role::Server, None).await;
        let client_ws = WebSocketStream::from_raw_socket(b, Role::Client, None).await;
        let serve = std::sync::Arc::new(serve);
        let client = SessionBuilder::client()
            .extensions(extensions)
            .connect_handler(move |target: rd_proto::Target| {
                let serve = serve.clone();
                async move {
                    if target.address().ends_with(":9") {
                        return Err(ConnectRefused("connect not allowed".into()));
                    }
                    Ok::<BoxedIo, ConnectRefused>(serve())
                }
            })
            .spawn(client_ws);
        let server = SessionBuilder::server("foo", 1)
            .extensions(extensions)
            .spawn(server_ws);
        (server, client)
    }

    fn echo() -> BoxedIo {
        let (service, io) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(service);
            tokio::io::copy(&mut r, &mut w).await.ok();
        });
        Box::new(io)
    }

    /// Splices a dialed echo stream to a user who writes 1 MB, shuts down writing and reads
    /// to the end; returns what was sent, what came back and what the splice reports.
    async fn echo_a_megabyte(server: &SessionHandle) -> (Vec<u8>, Vec<u8>, Spliced) {
        let tunnel = server.dial_addr("tcp", "127.0.0.1:7").unwrap();
        let (mut user, local) = tokio::io::duplex(8 * 1024);
        let task = tokio::spawn(splice(tunnel, local));
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut r, mut w) = tokio::io::split(&mut user);
        let sent = data.clone();
        let write = async move {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let read = async move {
            let mut got = Vec::new();
            r.read_to_end(&mut got).await.unwrap();
            got
        };
        let ((), got) = tokio::time::timeout(BOUND, async { tokio::join!(write, read) })
            .await
            .unwrap();
        let moved = tokio::time::timeout(BOUND, task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        (data, got, moved)
    }

    #[tokio::test]
    async fn carries_bytes_both_ways_and_ends_when_the_local_side_closes() {
        let (server, _client) = session(echo).await;
        // Half-close: with the Go protocol the agent closes both directions, so the echo may
        // be cut short; the splice must still end.
        let (expected, got, moved) = echo_a_megabyte(&server).await;
        assert!(
            expected.starts_with(&got),
            "echo is a prefix of what was sent"
        );
        assert_eq!(moved.to_tunnel, 1_000_000);
        assert_eq!(moved.from_tunnel, got.len() as u64);
    }

    #[tokio::test]
    async fn ends_when_the_agent_closes_even_if_the_local_side_stays_open() {
        // The target says hello and closes at once.
        let (server, _client) = session(|| {
            let (mut service, io) = tokio::io::duplex(1024);
            tokio::spawn(async move {
                service.write_all(b"bye\n").await.ok();
            });
            Box::new(io)
        })
        .await;
        let tunnel = server.dial_addr("tcp", "127.0.0.1:7").unwrap();
        let (mut user, local) = tokio::io::duplex(1024);
        let task = tokio::spawn(splice(tunnel, local));
        let mut got = Vec::new();
        tokio::time::timeout(BOUND, user.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"bye\n");
        // `user` is still open for writing: the splice must not wait for it.
        let moved = tokio::time::timeout(BOUND, task)
            .await
            .expect("the splice ends once the agent has closed")
            .unwrap()
            .unwrap();
        assert_eq!(moved.from_tunnel, 4);
        drop(user);
    }

    #[tokio::test]
    async fn with_half_close_the_echo_is_complete_after_the_users_shutdown() {
        let (server, _client) = session_with(Extensions::SUPPORTED, echo).await;
        let (data, got, moved) = echo_a_megabyte(&server).await;
        assert!(
            got == data,
            "the whole echo, {} of {} bytes",
            got.len(),
            data.len()
        );
        assert_eq!(moved.to_tunnel, 1_000_000);
        assert_eq!(moved.from_tunnel, 1_000_000);
    }

    #[tokio::test]
    async fn with_half_close_the_splice_ends_when_the_agent_goes_though_the_user_is_silent() {
        // The target says hello and shuts down writing, but keeps reading.
        let (server, client) = session_with(Extensions::SUPPORTED, || {
            let (mut service, io) = tokio::io::duplex(1024);
            tokio::spawn(async move {
                service.write_all(b"bye\n").await.ok();
                service.shutdown().await.ok();
                let mut rest = Vec::new();
                service.read_to_end(&mut rest).await.ok();
            });
            Box::new(io)
        })
        .await;
        let tunnel = server.dial_addr("tcp", "127.0.0.1:7").unwrap();
        let (mut user, local) = tokio::io::duplex(1024);
        let task = tokio::spawn(splice(tunnel, local));
        let mut got = Vec::new();
        tokio::time::timeout(BOUND, user.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"bye\n");
        // Half-closed: the user could still write. The agent's session now ends instead,
        // and the splice must notice although neither of its sides moves.
        assert!(!task.is_finished());
        client.close();
        let moved = tokio::time::timeout(BOUND, task)
            .await
            .expect("the splice ends once the agent's stream has ended")
            .unwrap()
            .unwrap();
        assert_eq!(moved.from_tunnel, 4);
        drop(user);
    }

    #[tokio::test]
    async fn a_refused_dial_is_a_tunnel_error_with_the_agents_text() {
        let (server, _client) = session(echo).await;
        let tunnel = server.dial_addr("tcp", "127.0.0.1:9").unwrap();
        let (_user, local) = tokio::io::duplex(1024);
        let err = tokio::time::timeout(BOUND, splice(tunnel, local))
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, SpliceError::Tunnel(_)), "{err:?}");
        assert!(err.to_string().contains("connect not allowed"), "{err}");
    }
}
