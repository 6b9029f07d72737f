//! A round-robin TCP front for the harnesses that put rd-server replicas behind one address,
//! as a Kubernetes Service does: each new connection goes to the next backend in turn, and a
//! backend that refuses the connection is skipped (a stopped replica, as a Service skips a
//! pod that is not ready).
//!
//! A front holds two descriptors per connection. Thousands of agents with a session on each
//! replica need more than one process may open, so several fronts can share one address
//! with `SO_REUSEPORT` ([`Front::start_shared`]), in processes of their own: the kernel
//! spreads the connections over them, as kube-proxy runs on every node.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// The front; it stops accepting when dropped (connections already made go on).
#[derive(Debug)]
pub struct Front {
    /// Where it listens.
    pub addr: SocketAddr,
    backends: Arc<Mutex<Vec<SocketAddr>>>,
    accepts: JoinHandle<()>,
}

impl Drop for Front {
    fn drop(&mut self) {
        self.accepts.abort();
    }
}

impl Front {
    /// Listens on `listen` (port 0 for any) and spreads connections over `backends`.
    pub async fn start(listen: SocketAddr, backends: Vec<SocketAddr>) -> std::io::Result<Self> {
        Self::serve(TcpListener::bind(listen).await?, backends)
    }

    /// As [`start`](Self::start), on a socket with `SO_REUSEPORT`: other fronts (in other
    /// processes) may listen on the same address.
    pub fn start_shared(listen: SocketAddr, backends: Vec<SocketAddr>) -> std::io::Result<Self> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(listen),
            socket2::Type::STREAM,
            None,
        )?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&listen.into())?;
        socket.listen(4096)?;
        Self::serve(TcpListener::from_std(socket.into())?, backends)
    }

    fn serve(listener: TcpListener, backends: Vec<SocketAddr>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        let backends = Arc::new(Mutex::new(backends));
        let next = Arc::new(AtomicUsize::new(0));
        let shared = backends.clone();
        let accepts = tokio::spawn(async move {
            loop {
                let client = match listener.accept().await {
                    Ok((client, _)) => client,
                    Err(e) => {
                        // Out of descriptors, say: the front must not stop for good.
                        eprintln!("front: accept failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let list = shared.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let first = next.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(forward(client, list, first));
            }
        });
        Ok(Self {
            addr,
            backends,
            accepts,
        })
    }

    /// Replaces the backends (a replica added or removed).
    pub fn set_backends(&self, backends: Vec<SocketAddr>) {
        *self.backends.lock().unwrap_or_else(|p| p.into_inner()) = backends;
    }
}

/// Connects to the backends from `first` on, in turn, and copies both ways with the first
/// that accepts; the client's connection is closed if none does.
async fn forward(mut client: TcpStream, backends: Vec<SocketAddr>, first: usize) {
    let n = backends.len();
    for k in 0..n {
        let backend = backends[(first + k) % n];
        if let Ok(mut server) = TcpStream::connect(backend).await {
            client.set_nodelay(true).ok();
            server.set_nodelay(true).ok();
            tokio::io::copy_bidirectional(&mut client, &mut server)
                .await
                .ok();
            return;
        }
    }
}
