//! A round-robin TCP front for the harnesses that put rd-server replicas behind one address,
//! as a Kubernetes Service does: each new connection goes to the next backend in turn, and a
//! backend that refuses the connection is skipped (a stopped replica, as a Service skips a
//! pod that is not ready).

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
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let backends = Arc::new(Mutex::new(backends));
        let next = Arc::new(AtomicUsize::new(0));
        let shared = backends.clone();
        let accepts = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
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
