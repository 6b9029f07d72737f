//! `rd-server`: the tunnel server, command-line compatible with Go remotedialer's example.

#[path = "../../common/cli.rs"]
mod cli;
mod forwards;
#[path = "../../common/go_flags.rs"]
mod go_flags;
mod routes;
mod tls;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{ArgAction, Parser};
use rd_server::{Server, TunnelIdHeader};

/// Reverse-tunnel server: clients connect out to it over a websocket at /connect, and it
/// opens TCP connections on their side through that tunnel.
///
/// Go-style single-dash flags work too: rd-server -listen :8123 -id first -token aaa
/// -peers second:aaa:ws://localhost:8124/connect
#[derive(Debug, Parser)]
#[command(name = "rd-server", version, about, long_about)]
struct Args {
    /// Address to listen on; ":8123" means every interface.
    #[arg(long, default_value = ":8123")]
    listen: String,
    /// This server's peer id, for HA peering (needs --token).
    #[arg(long, default_value = "")]
    id: String,
    /// The token peers share, for HA peering (needs --id).
    #[arg(long, default_value = "")]
    token: String,
    /// Peers to link to: id:token:url,id:token:url (the url may contain colons).
    #[arg(long, default_value = "")]
    peers: String,
    /// Debug logging, including a dump of every tunnel message.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = ArgAction::Set)]
    debug: bool,
    /// TLS certificate chain (PEM) to serve https/wss; needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = true, action = ArgAction::Set)]
    metrics: bool,
    /// Extra CA certificate (PEM) to verify peers' TLS certificates; repeatable.
    #[arg(long)]
    peer_ca_cert: Vec<PathBuf>,
    /// Do not verify peers' TLS certificates (what Go remotedialer always does).
    #[arg(long)]
    peer_insecure_skip_verify: bool,
    /// Forward a local port through an agent, like ssh -L: every connection to LISTEN is
    /// dialed through client CLIENT to PROTO/ADDRESS on its side; repeatable.
    /// E.g. 127.0.0.1:2222=foo:tcp/127.0.0.1:22 (":2222" listens on every interface).
    #[arg(long = "forward", value_name = "LISTEN=CLIENT:PROTO/ADDRESS")]
    forward: Vec<rd_server::forward::ForwardSpec>,
    /// How long an HTTP CONNECT waits for the agent to refuse or fail the dial before
    /// answering 200 (a refusal is answered 502 with the agent's text); 0 answers at once.
    #[arg(long, value_name = "DURATION", default_value = "100ms", value_parser = forwards::parse_duration)]
    connect_wait: Duration,
    /// Ping a client that sent nothing for this long (Go's server never pings; Go and rd
    /// clients ping every 5s themselves, so these go out only to quiet ones); 0 disables.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = forwards::parse_duration)]
    ping_after: Duration,
    /// Drop a client that pinged or answered pings before and then sent nothing for this
    /// long (a dead link); 0 disables, leaving Go's 60s keepalive timeout.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = forwards::parse_duration)]
    answer_timeout: Duration,
    /// Websocket upgrades in progress at once; more are answered 503 with Retry-After.
    #[arg(long, value_name = "N", default_value_t = rd_server::DEFAULT_MAX_PENDING_HANDSHAKES)]
    max_pending_handshakes: usize,
    /// Read buffer per session websocket, in bytes: resident for the session's life, so
    /// 4096 suits a server of many idle agents (about 10 KiB per session instead of 22),
    /// the default suits bulk transfers (fewer read syscalls).
    #[arg(long, value_name = "BYTES", default_value_t = rd_session::DEFAULT_WS_READ_BUFFER)]
    ws_read_buffer: usize,
}

/// A `--peers` entry.
#[derive(Debug, PartialEq, Eq)]
struct PeerSpec {
    id: String,
    token: String,
    url: String,
}

fn parse_peers(list: &str) -> Result<Vec<PeerSpec>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|entry| {
            let mut parts = entry.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(token), Some(url)) if !id.is_empty() && !url.is_empty() => {
                    Ok(PeerSpec {
                        id: id.into(),
                        token: token.into(),
                        url: url.into(),
                    })
                }
                _ => Err(format!("invalid peer {entry:?}: want id:token:url")),
            }
        })
        .collect()
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse_from(go_flags::normalize(std::env::args_os()));
    cli::init_tracing(args.debug);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rd-server: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let peers = parse_peers(&args.peers)?;
    let mut peer_tls =
        rd_client::TlsOptions::default().with_insecure_skip_verify(args.peer_insecure_skip_verify);
    for ca in &args.peer_ca_cert {
        peer_tls = peer_tls.with_ca_file(ca);
    }
    let mut config = rd_proto::Config::default();
    config.server_ping_after = (!args.ping_after.is_zero()).then_some(args.ping_after);
    config.answer_timeout = (!args.answer_timeout.is_zero()).then_some(args.answer_timeout);
    config.validate()?;
    let mut builder = Server::builder(TunnelIdHeader)
        .session_config(config)
        .max_pending_handshakes(args.max_pending_handshakes)
        .websocket_read_buffer(args.ws_read_buffer)
        .peer_connect_options(rd_client::ConnectOptions::default().with_tls(peer_tls));
    if !args.id.is_empty() && !args.token.is_empty() {
        builder = builder.peer_identity(&args.id, &args.token);
    } else if !peers.is_empty() {
        return Err("--peers needs --id and --token".into());
    }
    let server = builder.build();
    for p in peers {
        server.add_peer(p.url, p.id, p.token);
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let _forwards = forwards::start(&server, &args.forward).await?;
    let listener = cli::bind(&args.listen).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("listening on {scheme}://{}", listener.local_addr()?);
    let app =
        Arc::new(routes::App::new(server.clone(), args.metrics).connect_wait(args.connect_wait));
    tokio::select! {
        r = routes::serve(listener, tls, app) => r?,
        () = cli::shutdown_signal() => tracing::info!("shutting down"),
    }
    server.shutdown(Duration::from_secs(5)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_split_at_the_first_two_colons() {
        let p = parse_peers("second:aaa:ws://localhost:8124/connect, third:b:wss://h:1/c")
            .expect("valid");
        assert_eq!(
            p[0],
            PeerSpec {
                id: "second".into(),
                token: "aaa".into(),
                url: "ws://localhost:8124/connect".into()
            }
        );
        assert_eq!(p[1].url, "wss://h:1/c");
        assert!(parse_peers("").expect("empty is fine").is_empty());
        assert!(parse_peers("nocolon").is_err());
    }

    #[test]
    fn go_command_lines_parse() {
        let args = |a: &[&str]| Args::try_parse_from(go_flags::normalize(a.iter().map(Into::into)));
        let a = args(&[
            "rd-server",
            "-listen",
            ":8124",
            "-id",
            "second",
            "-token",
            "aaa",
            "-peers",
            "first:aaa:ws://localhost:8123/connect",
            "-debug",
        ])
        .expect("go style");
        assert_eq!(
            (a.listen.as_str(), a.id.as_str(), a.debug),
            (":8124", "second", true)
        );
        let b =
            args(&["rd-server", "--listen=127.0.0.1:0", "--metrics=false"]).expect("clap style");
        assert!(!b.metrics && !b.debug);
    }
}
