//! `rd-server`: the tunnel server, command-line compatible with Go remotedialer's example.

#[path = "../../common/checks.rs"]
mod checks;
#[path = "../../common/cli.rs"]
mod cli;
#[path = "../../common/go_flags.rs"]
mod go_flags;
#[path = "../../common/process_metrics.rs"]
mod process_metrics;
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
///
/// Every flag can also be set through the environment variable shown with it (RD_...); a
/// flag on the command line wins.
#[derive(Debug, Parser)]
#[command(name = "rd-server", version = cli::VERSION)]
struct Args {
    /// Address to listen on: ":PORT" (every interface) or "HOST:PORT".
    #[arg(long, env = "RD_LISTEN", default_value = ":8123")]
    listen: String,
    /// This server's peer id, for HA peering (needs --token).
    #[arg(long, env = "RD_ID", default_value = "")]
    id: String,
    /// The token peers share, for HA peering (needs --id).
    #[arg(
        long,
        env = "RD_TOKEN",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    token: String,
    /// Peers to link to: id:token:url,id:token:url (the url may contain colons).
    #[arg(
        long,
        env = "RD_PEERS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    peers: String,
    /// Debug logging, including a dump of every tunnel message.
    #[arg(long, env = "RD_DEBUG", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = ArgAction::Set)]
    debug: bool,
    /// Log line format.
    #[arg(long, env = "RD_LOG_FORMAT", value_enum, default_value_t = cli::LogFormat::Text)]
    log_format: cli::LogFormat,
    /// TLS certificate chain (PEM) to serve https/wss; needs --tls-key.
    #[arg(long, env = "RD_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM) for --tls-cert.
    #[arg(long, env = "RD_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics.
    #[arg(long, env = "RD_METRICS", num_args = 0..=1, default_missing_value = "true", default_value_t = true, action = ArgAction::Set)]
    metrics: bool,
    /// Extra CA certificate (PEM) to verify peers' TLS certificates; repeatable (comma-separated
    /// in the environment variable).
    #[arg(long, env = "RD_PEER_CA_CERT", value_delimiter = ',')]
    peer_ca_cert: Vec<PathBuf>,
    /// Do not verify peers' TLS certificates (what Go remotedialer always does).
    #[arg(long, env = "RD_PEER_INSECURE_SKIP_VERIFY")]
    peer_insecure_skip_verify: bool,
}

/// A `--peers` entry.
#[derive(Debug, PartialEq, Eq)]
struct PeerSpec {
    id: String,
    token: String,
    url: String,
}

/// Parses `--peers`. Errors name the entry by position, not by its text: it holds a token.
fn parse_peers(list: &str) -> Result<Vec<PeerSpec>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .enumerate()
        .map(|(i, entry)| {
            let mut parts = entry.splitn(3, ':');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(id), Some(token), Some(url)) if !id.is_empty() && !url.is_empty() => {
                    rd_client::transport::validate_url(url)
                        .map_err(|e| format!("--peers: peer {id:?}: {e}"))?;
                    Ok(PeerSpec {
                        id: id.into(),
                        token: token.into(),
                        url: url.into(),
                    })
                }
                _ => Err(format!("--peers: entry {} is not id:token:url", i + 1)),
            }
        })
        .collect()
}

/// A configuration mistake found at start-up: the process exits with status 2.
#[derive(Debug)]
struct ConfigError(String);

/// Everything that can be checked without serving: the service would otherwise start and
/// then fail (or retry) forever on a mistake that cannot fix itself.
async fn check_config(args: &Args) -> Result<Checked, ConfigError> {
    cli::check_listen("--listen", &args.listen).map_err(ConfigError)?;
    let peers = parse_peers(&args.peers).map_err(ConfigError)?;
    if !peers.is_empty() && (args.id.is_empty() || args.token.is_empty()) {
        return Err(ConfigError("--peers needs --id and --token".into()));
    }
    for ca in &args.peer_ca_cert {
        checks::check_ca_file("--peer-ca-cert", ca)
            .await
            .map_err(ConfigError)?;
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            Some(tls::acceptor(cert, key).map_err(|e| ConfigError(e.to_string()))?)
        }
        _ => None,
    };
    Ok(Checked { peers, tls })
}

/// What [`check_config`] built on the way.
struct Checked {
    peers: Vec<PeerSpec>,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse_from(go_flags::normalize(std::env::args_os()));
    let _log = cli::init_tracing(args.debug, args.log_format);
    let checked = match check_config(&args).await {
        Ok(checked) => checked,
        Err(ConfigError(e)) => {
            cli::say_err(&format!("rd-server: {e}"));
            return ExitCode::from(2);
        }
    };
    match run(args, checked).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::say_err(&format!("rd-server: {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args, checked: Checked) -> Result<(), Box<dyn std::error::Error>> {
    let Checked { peers, tls } = checked;
    let mut peer_tls =
        rd_client::TlsOptions::default().with_insecure_skip_verify(args.peer_insecure_skip_verify);
    for ca in &args.peer_ca_cert {
        peer_tls = peer_tls.with_ca_file(ca);
    }
    let metrics = rd_server::Metrics::new_with(|registry| {
        process_metrics::register(registry, env!("CARGO_PKG_VERSION"), env!("RD_COMMIT"));
    });
    let mut builder = Server::builder(TunnelIdHeader)
        .metrics(metrics)
        .peer_connect_options(rd_client::ConnectOptions::default().with_tls(peer_tls));
    if !args.id.is_empty() && !args.token.is_empty() {
        builder = builder.peer_identity(&args.id, &args.token);
    }
    let server = builder.build();
    for p in peers {
        server.add_peer(p.url, p.id, p.token);
    }
    let listener = cli::bind(&args.listen)
        .await
        .map_err(|e| format!("--listen: {e}"))?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    cli::say_out(&format!(
        "listening on {scheme}://{}",
        listener.local_addr()?
    ));
    let app = Arc::new(routes::App::new(server.clone(), args.metrics));
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
        let err = parse_peers("b:secret:localhost:1/connect").expect_err("no scheme");
        assert!(err.starts_with("--peers: peer \"b\""), "{err}");
        assert!(!err.contains("secret"), "{err}");
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
