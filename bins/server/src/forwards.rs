//! `--forward`: binding every forward's listener before the main listener, so a bad
//! forward stops the server at start-up, then starting them.

use rd_server::forward::{Forward, ForwardHandle, ForwardSpec};
use rd_server::Server;
use tokio::net::TcpListener;

use crate::cli;

/// Binds every forward's listener.
pub async fn bind(
    specs: &[ForwardSpec],
) -> Result<Vec<(ForwardSpec, TcpListener)>, Box<dyn std::error::Error>> {
    let mut listeners = Vec::with_capacity(specs.len());
    for spec in specs {
        let listener = cli::bind(&spec.listen)
            .await
            .map_err(|e| format!("--forward {spec}: {e}"))?;
        listeners.push((spec.clone(), listener));
    }
    Ok(listeners)
}

/// Starts the bound forwards; prints `forwarding ADDR to CLIENT:PROTO/ADDRESS` on stdout
/// for each (the bound address, so `:0` is usable), and warns about a forward that anyone
/// can reach: forwards take no credentials.
pub fn start(
    server: &Server,
    listeners: Vec<(ForwardSpec, TcpListener)>,
    format: cli::LogFormat,
) -> Result<Vec<ForwardHandle>, Box<dyn std::error::Error>> {
    let mut handles = Vec::with_capacity(listeners.len());
    for (spec, listener) in listeners {
        let addr = listener.local_addr()?;
        let to = format!(
            "{}:{}/{}",
            spec.client_key,
            spec.target.proto(),
            spec.target.address()
        );
        cli::announce(
            format,
            &format!("forwarding {addr} to {to}"),
            "forwarding",
            &[("listen", addr.to_string()), ("to", to)],
        );
        tracing::info!(%addr, forward = %spec, "forward listening");
        if !addr.ip().is_loopback() {
            tracing::warn!(
                listen = %addr,
                forward = %spec,
                "this forward is open to anyone who reaches its address (forwards take no \
                 credentials): they reach its target on the agent's side; listen on \
                 127.0.0.1 or a private address"
            );
        }
        handles.push(Forward::new(server.clone(), spec).spawn(listener));
    }
    Ok(handles)
}
