//! `rd-client`: the tunnel agent, command-line compatible with Go remotedialer's example.

// The client listens on nothing, so `cli::bind` goes unused here.
#[allow(dead_code)]
#[path = "../../common/cli.rs"]
mod cli;
#[path = "../../common/go_flags.rs"]
mod go_flags;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Parser};
use http::{HeaderName, HeaderValue};
use rd_client::{
    AllowAll, AllowRule, AllowRules, Client, ClientBuilder, ConnectOptions, TlsOptions,
};
use rd_proto::Config;
use rd_session::{Backoff, Extensions};
use tokio_util::sync::CancellationToken;

/// Reverse-tunnel client: dials out to an rd (or Go remotedialer) server and lets it open
/// connections to services on this side. Keeps redialing with backoff until stopped.
///
/// Go-style single-dash flags work too: rd-client -connect ws://localhost:8123/connect -id foo
#[derive(Debug, Parser)]
#[command(name = "rd-client", version, about, long_about)]
struct Args {
    /// Websocket URL of the server's tunnel endpoint (ws:// or wss://).
    #[arg(long, default_value = "ws://localhost:8123/connect")]
    connect: String,
    /// Client id, sent as the X-Tunnel-ID header (the example server's client key).
    #[arg(long, default_value = "foo")]
    id: String,
    /// Debug logging, including a dump of every tunnel message. (Go's example defaults to on.)
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = ArgAction::Set)]
    debug: bool,
    /// Exit after the first session ends, as Go's example does, instead of redialing.
    #[arg(long)]
    once: bool,
    /// Extra header for the upgrade request, as Name:Value; repeatable.
    #[arg(long = "header", value_name = "NAME:VALUE")]
    headers: Vec<String>,
    /// Targets the server may reach, as proto:address with * wildcards (tcp:127.0.0.1:*,
    /// unix:/var/run/docker.sock); repeatable. Default: everything, as Go's example.
    #[arg(long = "allow", value_name = "RULE")]
    allow: Vec<AllowRule>,
    /// Extra CA certificate (PEM) to verify a wss:// server; repeatable.
    #[arg(long)]
    ca_cert: Vec<PathBuf>,
    /// Do not verify the server's TLS certificate (test setups only).
    #[arg(long)]
    insecure_skip_verify: bool,
    /// Flow control to ask for: `credit` (per-stream windows, used when the server is rd;
    /// a Go server always gets Pause/Resume) or `pause` (Go's Pause/Resume even with rd).
    #[arg(long, value_enum, default_value_t = FlowControl::Credit)]
    flow_control: FlowControl,
    /// First redial delay ceiling; it doubles on each failure up to --backoff-max.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = duration)]
    backoff_initial: Duration,
    /// Largest redial delay ceiling: after an outage of any length the client is back
    /// within this long of the server's return.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
    backoff_max: Duration,
    /// Share of the ceiling drawn at random (0: always the ceiling, as Go's fixed 5 s;
    /// 1: anywhere below it), so a fleet does not redial in lockstep.
    #[arg(long, value_name = "0..1", default_value_t = rd_session::DEFAULT_BACKOFF_JITTER)]
    backoff_jitter: f64,
    /// How often to ping the server (Go: 5s).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = duration)]
    ping_interval: Duration,
    /// Give up on a server that answered pings before and then sent nothing for this long
    /// (a dead link); 0 disables, leaving only --keepalive-timeout.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = duration)]
    answer_timeout: Duration,
    /// Give up on a server that sent no ping or pong for this long (Go: 60s).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = duration)]
    keepalive_timeout: Duration,
}

/// Parses `500ms`, `5s`, `2m` or a plain number of seconds.
fn duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration {s:?}: want e.g. 500ms, 5s, 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        _ => return Err(format!("invalid duration unit in {s:?}: use ms, s or m")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// `--flow-control`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum FlowControl {
    Credit,
    Pause,
}

fn header(spec: &str) -> Result<(HeaderName, HeaderValue), String> {
    let (name, value) = spec
        .split_once(':')
        .ok_or_else(|| format!("invalid header {spec:?}: want Name:Value"))?;
    let name = HeaderName::try_from(name.trim())
        .map_err(|e| format!("invalid header name in {spec:?}: {e}"))?;
    let value = HeaderValue::try_from(value.trim())
        .map_err(|e| format!("invalid header value in {spec:?}: {e}"))?;
    Ok((name, value))
}

fn build(args: &Args) -> Result<Client, String> {
    let mut tls = TlsOptions::default().with_insecure_skip_verify(args.insecure_skip_verify);
    for ca in &args.ca_cert {
        tls = tls.with_ca_file(ca);
    }
    let id = HeaderValue::try_from(args.id.as_str()).map_err(|e| format!("invalid id: {e}"))?;
    let extensions = match args.flow_control {
        FlowControl::Credit => Extensions::SUPPORTED,
        FlowControl::Pause => Extensions::NONE,
    };
    let mut config = Config::default();
    config.ping_interval = args.ping_interval;
    config.keepalive_timeout = args.keepalive_timeout;
    config.answer_timeout = (!args.answer_timeout.is_zero()).then_some(args.answer_timeout);
    config.validate().map_err(|e| e.to_string())?;
    let backoff = Backoff::new(
        args.backoff_initial,
        args.backoff_max,
        Duration::from_secs(60),
    )
    .with_jitter(args.backoff_jitter);
    if !(0.0..=1.0).contains(&args.backoff_jitter) {
        return Err(format!(
            "invalid --backoff-jitter {}: want 0..1",
            args.backoff_jitter
        ));
    }
    let mut builder = ClientBuilder::new(&args.connect)
        .session_config(config)
        .backoff(backoff)
        .connect_options(ConnectOptions::default().with_tls(tls))
        .extensions(extensions)
        .header(HeaderName::from_static("x-tunnel-id"), id);
    for spec in &args.headers {
        let (name, value) = header(spec)?;
        builder = builder.header(name, value);
    }
    builder = if args.allow.is_empty() {
        builder.allow(AllowAll)
    } else {
        builder.allow(AllowRules(args.allow.clone()))
    };
    Ok(builder.build())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse_from(go_flags::normalize(std::env::args_os()));
    cli::init_tracing(args.debug);
    let client = match build(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("rd-client: {e}");
            return ExitCode::from(2);
        }
    };
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        cli::shutdown_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    if args.once {
        return match client.connect(&cancel).await {
            Ok(end) => {
                tracing::info!(reason = %end, "session ended");
                ExitCode::SUCCESS
            }
            Err(e) => {
                // The causes matter: a ConnectError's own text leaves them out.
                eprintln!("rd-client: {}", rd_session::error_chain(&e));
                ExitCode::FAILURE
            }
        };
    }
    client.run(cancel).await;
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_and_clap_command_lines_parse() {
        let parse =
            |a: &[&str]| Args::try_parse_from(go_flags::normalize(a.iter().map(Into::into)));
        let a = parse(&[
            "rd-client",
            "-connect",
            "ws://localhost:8124/connect",
            "-id",
            "bar",
            "-debug=false",
        ])
        .expect("go style");
        assert_eq!(
            (a.connect.as_str(), a.id.as_str(), a.debug),
            ("ws://localhost:8124/connect", "bar", false)
        );
        let b = parse(&[
            "rd-client",
            "--allow",
            "tcp:127.0.0.1:*",
            "--header",
            "Authorization: Bearer x",
            "--once",
        ])
        .expect("clap");
        assert_eq!(b.allow.len(), 1);
        assert!(b.once);
        assert_eq!(
            header("Authorization: Bearer x").expect("valid").1,
            "Bearer x"
        );
        assert!(parse(&["rd-client", "--allow", "nocolon"]).is_err());
        let c = parse(&[
            "rd-client",
            "--backoff-max",
            "10s",
            "--backoff-jitter",
            "0.5",
            "--ping-interval",
            "500ms",
            "--answer-timeout",
            "0",
        ])
        .expect("keepalive and backoff flags");
        assert_eq!(c.backoff_max, Duration::from_secs(10));
        assert_eq!(c.ping_interval, Duration::from_millis(500));
        assert!(build(&c).is_ok());
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert!(duration("5h").is_err() && duration("x").is_err());
        let bad = parse(&["rd-client", "--backoff-jitter", "2"]).expect("parses");
        assert!(build(&bad).is_err(), "jitter above 1 is refused");
        let bad = parse(&["rd-client", "--answer-timeout", "1s"]).expect("parses");
        assert!(
            build(&bad).is_err(),
            "an answer timeout below the ping interval"
        );
    }
}
