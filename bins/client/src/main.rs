//! `rd-client`: the tunnel agent, command-line compatible with Go remotedialer's example.

mod agent_metrics;
#[path = "../../common/checks.rs"]
mod checks;
#[path = "../../common/cli.rs"]
mod cli;
#[path = "../../common/go_flags.rs"]
mod go_flags;
#[path = "../../common/log_json.rs"]
mod log_json;
#[path = "../../common/process_metrics.rs"]
mod process_metrics;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use agent_metrics::AgentMetrics;

use clap::{ArgAction, Parser};
use http::{HeaderName, HeaderValue};
use rd_client::{
    AllowAll, AllowRule, AllowRules, Client, ClientBuilder, ConnectOptions, ProxyMode,
    SessionCount, TlsOptions,
};
use rd_proto::Config;
use rd_session::{Backoff, Extensions};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Reverse-tunnel client: dials out to an rd (or Go remotedialer) server and lets it open
/// connections to services on this side. Keeps redialing with backoff until stopped.
///
/// Go-style single-dash flags work too: rd-client -connect ws://localhost:8123/connect -id foo
///
/// Every flag can also be set through the environment variable shown with it (RD_...); a
/// flag on the command line wins. HTTP_PROXY, HTTPS_PROXY and NO_PROXY are read as Go does;
/// an invalid proxy value stops the client at start-up.
#[derive(Debug, Parser)]
#[command(name = "rd-client", version = cli::VERSION)]
struct Args {
    /// Websocket URL of the server's tunnel endpoint (ws:// or wss://), a load balancer in
    /// front of several replicas or one replica. Repeat it (or give a comma-separated list)
    /// for several: the client dials them in turn until it holds its --sessions, and moves
    /// on at once when one goes away (a drain, a crash), backing off only once all have
    /// failed. A host name with several addresses counts as one server per address (same
    /// Host header and TLS name).
    #[arg(
        long,
        env = "RD_CONNECT",
        value_delimiter = ',',
        value_name = "URL",
        default_value = "ws://localhost:8123/connect"
    )]
    connect: Vec<String>,
    /// Sessions to hold: `all` (one with each replica the rd servers count, found through
    /// the --connect URL(s) even behind one load balancer, so a drain, restart or crash of
    /// one replica never leaves this agent unreachable and no request takes a peer hop), or
    /// at most a number; 1 is the behaviour of earlier versions. A Go server always gets one.
    #[arg(long, env = "RD_SESSIONS", value_name = "all|N", default_value = "all")]
    sessions: SessionCount,
    /// Client id, sent as the X-Tunnel-ID header (the example server's client key).
    #[arg(long, env = "RD_CLIENT_ID", default_value = "foo")]
    id: String,
    /// Token for a server that authenticates agents (rd-server --agent-tokens), sent as the
    /// X-API-Tunnel-Token header. Prefer RD_CLIENT_TOKEN or --token-file: a command line is
    /// visible to every user of the machine.
    #[arg(long, env = "RD_CLIENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the token (its first line), instead of --token.
    #[arg(long, env = "RD_CLIENT_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Debug logging, including a dump of every tunnel message. (Go's example defaults to on.)
    #[arg(long, env = "RD_DEBUG", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = ArgAction::Set, value_parser = cli::boolish())]
    debug: bool,
    /// Log line format.
    #[arg(long, env = "RD_LOG_FORMAT", value_enum, default_value_t = cli::LogFormat::Text)]
    log_format: cli::LogFormat,
    /// Exit after the first session ends, as Go's example does, instead of redialing.
    #[arg(long, env = "RD_ONCE", value_parser = cli::boolish())]
    once: bool,
    /// Extra header for the upgrade request, as Name:Value; repeatable (one per line in the
    /// environment variable, whose value --help never shows: headers often carry credentials).
    #[arg(
        long = "header",
        env = "RD_HEADER",
        value_delimiter = '\n',
        hide_env_values = true,
        value_name = "NAME:VALUE"
    )]
    headers: Vec<String>,
    /// Targets the server may reach, as proto:address with * wildcards (tcp:127.0.0.1:*,
    /// unix:/var/run/docker.sock); repeatable (comma-separated in the environment variable).
    /// Default: every target this machine can reach, as Go's example (logged at start-up).
    #[arg(
        long = "allow",
        env = "RD_ALLOW",
        value_delimiter = ',',
        value_name = "RULE"
    )]
    allow: Vec<AllowRule>,
    /// Extra CA certificate (PEM) to verify a wss:// server; repeatable (comma-separated in
    /// the environment variable).
    #[arg(long, env = "RD_CA_CERT", value_delimiter = ',')]
    ca_cert: Vec<PathBuf>,
    /// Client certificate (PEM chain) to present to a wss:// server that authenticates
    /// agents by certificate (rd-server --agent-ca); needs --key. The server takes the
    /// agent id from it (subject CN, else first DNS SAN): --id must be that id. Read again
    /// at every dial, so a renewed certificate is used from the next reconnection on.
    #[arg(long, env = "RD_CLIENT_CERT", value_name = "FILE", requires = "key")]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert; read again at every dial too.
    #[arg(long, env = "RD_CLIENT_KEY", value_name = "FILE", requires = "cert")]
    key: Option<PathBuf>,
    /// Do not verify the server's TLS certificate (test setups only).
    #[arg(long, env = "RD_INSECURE_SKIP_VERIFY", value_parser = cli::boolish())]
    insecure_skip_verify: bool,
    /// Serve Prometheus metrics at /metrics, liveness at /livez, readiness at /readyz
    /// (200 while at least one session is up; /healthz is the same) and this agent's
    /// sessions and streams at /admin/streams (JSON) on this address (":PORT" or
    /// "HOST:PORT"; no credentials: keep it on loopback or a private network). Off by
    /// default.
    #[arg(long, env = "RD_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// Flow control to ask for: `credit` (per-stream windows, used when the server is rd;
    /// a Go server always gets Pause/Resume) or `pause` (Go's Pause/Resume even with rd).
    #[arg(long, env = "RD_FLOW_CONTROL", value_enum, default_value_t = FlowControl::Credit)]
    flow_control: FlowControl,
    /// Do not offer rd's half-close extension. With it (the default, used when the server is
    /// rd) a forwarded connection whose one side shuts down writing keeps the other direction
    /// open, as TCP does; without it (and always with a Go server) that shutdown closes both.
    #[arg(long, env = "RD_NO_HALF_CLOSE", value_parser = cli::boolish())]
    no_half_close: bool,
    /// Do not offer rd's replicas extension: towards rd servers, behave as a Go agent (one
    /// session, whatever --sessions says, and no make-before-break move when a server
    /// drains: the agent moves when the draining server closes its session).
    #[arg(long, env = "RD_NO_REPLICAS", value_parser = cli::boolish())]
    no_replicas: bool,
    /// Do not offer rd's connect-ack extension: the server cannot tell when this agent's
    /// dial succeeded, so its CONNECT waits --connect-wait as for a Go agent.
    #[arg(long, env = "RD_NO_CONNECT_ACK", value_parser = cli::boolish())]
    no_connect_ack: bool,
    /// Do not offer rd's udp extension: the server refuses udp dials and forwards to this
    /// agent, as for a Go agent.
    #[arg(long, env = "RD_NO_UDP", value_parser = cli::boolish())]
    no_udp: bool,
    /// First redial delay ceiling; it doubles on each failure up to --backoff-max.
    #[arg(long, env = "RD_BACKOFF_INITIAL", value_name = "DURATION", default_value = "1s", value_parser = duration)]
    backoff_initial: Duration,
    /// Largest redial delay ceiling: after an outage of any length the client is back
    /// within this long of the server's return.
    #[arg(long, env = "RD_BACKOFF_MAX", value_name = "DURATION", default_value = "5s", value_parser = duration)]
    backoff_max: Duration,
    /// Share of the ceiling drawn at random (0: always the ceiling, as Go's fixed 5 s;
    /// 1: anywhere below it), so a fleet does not redial in lockstep.
    #[arg(long, env = "RD_BACKOFF_JITTER", value_name = "0..1", default_value_t = rd_session::DEFAULT_BACKOFF_JITTER)]
    backoff_jitter: f64,
    /// Bytes a session may hold for its streams' readers beyond their initial 32 KiB windows
    /// (credit: granted and unread; Pause/Resume: unread). It decides the longest link one
    /// session fills: a budget B serves links with up to B/2 in flight with room (64MiB:
    /// 100 MB/s over 335 ms); one stream's window is still at most 32 MiB. It costs memory
    /// only while readers stop reading. Units: KiB, MiB, GiB (or plain bytes).
    #[arg(long, env = "RD_RECEIVE_BUDGET", value_name = "SIZE", default_value = "64MiB", value_parser = cli::byte_size)]
    receive_budget: usize,
    /// How often to ping the server (Go: 5s).
    #[arg(long, env = "RD_PING_INTERVAL", value_name = "DURATION", default_value = "5s", value_parser = duration)]
    ping_interval: Duration,
    /// Give up on a server that answered pings before and then sent nothing for this long
    /// (a dead link); 0 disables, leaving only --keepalive-timeout.
    #[arg(long, env = "RD_ANSWER_TIMEOUT", value_name = "DURATION", default_value = "15s", value_parser = duration)]
    answer_timeout: Duration,
    /// Give up on a server that sent no ping or pong for this long (Go: 60s).
    #[arg(long, env = "RD_KEEPALIVE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = duration)]
    keepalive_timeout: Duration,
    /// Exit (status 3) after this many handshakes in a row refused for the agent's
    /// credentials (401/403: a wrong or unknown --id or token) instead of retrying forever;
    /// 0 (the default) retries forever, as Go does.
    #[arg(
        long,
        env = "RD_MAX_AUTH_REFUSALS",
        value_name = "N",
        default_value_t = 0
    )]
    max_auth_refusals: u32,
}

/// Durations: Go's forms and more (see [`cli::duration`]), one parser for both binaries.
fn duration(s: &str) -> Result<Duration, String> {
    cli::duration(s)
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
        .ok_or_else(|| format!("--header {spec:?}: want Name:Value"))?;
    let name = HeaderName::try_from(name.trim())
        .map_err(|e| format!("--header {spec:?}: invalid name: {e}"))?;
    let value = HeaderValue::try_from(value.trim())
        .map_err(|e| format!("--header {spec:?}: invalid value: {e}"))?;
    Ok((name, value))
}

/// Checks what cannot fix itself by retrying, then builds the client. Every error names the
/// flag (or variable) at fault.
async fn build(args: &Args, metrics: Option<Arc<AgentMetrics>>) -> Result<Client, String> {
    let mut urls = args
        .connect
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty());
    let first = urls.next().ok_or("--connect: no URL")?;
    let others: Vec<&str> = urls.collect();
    for url in std::iter::once(first).chain(others.iter().copied()) {
        rd_client::transport::validate_url(url).map_err(|e| format!("--connect: {e}"))?;
    }
    if args.id.is_empty() {
        return Err("--id: empty; the server needs a client id".into());
    }
    let id = HeaderValue::try_from(args.id.as_str())
        .map_err(|_| format!("--id {:?}: not a valid header value", args.id))?;
    for ca in &args.ca_cert {
        checks::check_ca_file("--ca-cert", ca).await?;
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        checks::check_client_cert(cert, key).await?;
    }
    if let Some(listen) = &args.metrics_listen {
        cli::check_listen("--metrics-listen", listen)?;
    }
    // Read once, as Go does, and refuse a value that does not parse: Go's dial fails on it,
    // and connecting directly instead would bypass a proxy the operator asked for.
    let proxy_env = rd_client::transport::ProxyEnv::try_from_process_env()
        .map_err(|e| format!("{}: {}", e.variable, e.error))?;
    let mut tls = TlsOptions::default().with_insecure_skip_verify(args.insecure_skip_verify);
    for ca in &args.ca_cert {
        tls = tls.with_ca_file(ca);
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        tls = tls.with_client_cert(cert, key);
    }
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Some(t.clone()),
        (None, Some(path)) => {
            Some(cli::read_secret(path).map_err(|e| format!("--token-file {e}"))?)
        }
        (None, None) => None,
    };
    let extensions = Extensions {
        credit: args.flow_control == FlowControl::Credit,
        half_close: !args.no_half_close,
        // Safe with every server: a Go server never answers it. It also gives a client of
        // one session (--sessions 1) a make-before-break move when an rd server drains.
        replicas: !args.no_replicas,
        connect_ack: !args.no_connect_ack,
        udp: !args.no_udp,
    };
    let mut config = Config::default();
    config.ping_interval = args.ping_interval;
    config.keepalive_timeout = args.keepalive_timeout;
    config.answer_timeout = (!args.answer_timeout.is_zero()).then_some(args.answer_timeout);
    config = config.with_session_receive_budget(args.receive_budget);
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
    let mut builder = others
        .iter()
        .fold(ClientBuilder::new(first), |b, url| b.server(*url))
        .session_config(config)
        .backoff(backoff)
        .connect_options(
            ConnectOptions::default()
                .with_tls(tls)
                .with_proxy(ProxyMode::Env(proxy_env)),
        )
        .extensions(extensions)
        .sessions(args.sessions)
        .max_auth_refusals(args.max_auth_refusals)
        .header(HeaderName::from_static("x-tunnel-id"), id);
    if let Some(token) = token {
        let mut value = HeaderValue::try_from(token.as_str())
            .map_err(|_| "--token: not a valid header value".to_owned())?;
        // Marked sensitive: hyper and http's Debug output leave it out.
        value.set_sensitive(true);
        builder = builder.header(HeaderName::from_static("x-api-tunnel-token"), value);
    }
    for spec in &args.headers {
        let (name, value) = header(spec)?;
        builder = builder.header(name, value);
    }
    builder = if args.allow.is_empty() {
        tracing::warn!(
            "the server may open connections to every target this machine can reach (the \
             default, as Go's example); restrict them with --allow, e.g. --allow tcp:127.0.0.1:*"
        );
        builder.allow(AllowAll)
    } else {
        let rules: Vec<String> = args.allow.iter().map(ToString::to_string).collect();
        tracing::info!(rules = %rules.join(","), "the server may open connections only to these targets");
        builder.allow(AllowRules(args.allow.clone()))
    };
    if let Some(m) = metrics {
        builder = builder.observer(m.clone()).state_observer(m);
    }
    Ok(builder.build())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse_from(go_flags::normalize(std::env::args_os()));
    let _log = cli::init_tracing(args.debug, args.log_format);
    let metrics = args
        .metrics_listen
        .as_ref()
        .map(|_| Arc::new(AgentMetrics::new(&args.id)));
    let client = match build(&args, metrics.clone()).await {
        Ok(c) => c,
        Err(e) => {
            cli::say_err(&format!("rd-client: {e}"));
            return ExitCode::from(2);
        }
    };
    if let (Some(listen), Some(metrics)) = (&args.metrics_listen, metrics) {
        let listener = match cli::bind(listen).await {
            Ok(l) => l,
            Err(e) => {
                cli::say_err(&format!("rd-client: --metrics-listen: {e}"));
                return ExitCode::FAILURE;
            }
        };
        if let Ok(addr) = agent_metrics::local_addr(&listener) {
            let url = format!("http://{addr}");
            cli::announce_listening(args.log_format, "listening on", &url);
        }
        tokio::spawn(agent_metrics::serve(listener, metrics));
    }
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        cli::shutdown_signal().await;
        tracing::info!("shutting down");
        stop.cancel();
    });
    // Every line of this agent carries its id: one log pipeline often collects many agents.
    let span = tracing::info_span!("agent", client_id = %args.id);
    run(args, client, cancel).instrument(span).await
}

async fn run(args: Args, client: Client, cancel: CancellationToken) -> ExitCode {
    if args.once {
        return match client.connect(&cancel).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                // The causes matter: a ConnectError's own text leaves them out.
                cli::say_err(&format!("rd-client: {}", rd_session::error_chain(&e)));
                ExitCode::FAILURE
            }
        };
    }
    match client.run(cancel).await {
        // The credentials will not fix themselves: not a crash to restart at once.
        rd_client::RunEnd::CredentialsRefused(_) => ExitCode::from(3),
        _ => ExitCode::SUCCESS,
    }
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
            (a.connect.join(" "), a.id.as_str(), a.debug),
            ("ws://localhost:8124/connect".to_owned(), "bar", false)
        );
        let several = parse(&[
            "rd-client",
            "-connect",
            "ws://127.0.0.1:1/connect,ws://127.0.0.2:1/connect",
            "-connect",
            "ws://127.0.0.3:1/connect",
        ])
        .expect("several servers");
        assert_eq!(several.connect.len(), 3);
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
        assert_eq!(
            parse(&["rd-client"]).expect("defaults").sessions,
            SessionCount::All
        );
        assert_eq!(
            parse(&["rd-client", "-sessions", "1"])
                .expect("one")
                .sessions,
            SessionCount::ONE
        );
        assert!(parse(&["rd-client", "--sessions", "0"]).is_err());
        let c =
            parse(&["rd-client", "-no-half-close", "-flow-control", "pause"]).expect("go style");
        assert!(c.no_half_close);
        assert!(
            parse(&["rd-client", "-no-replicas"])
                .expect("go style")
                .no_replicas
        );
        assert!(
            parse(&["rd-client", "--no-connect-ack"])
                .expect("go style")
                .no_connect_ack
        );
        assert!(parse(&["rd-client", "--no-udp"]).expect("go style").no_udp);
        assert!(!parse(&["rd-client"]).expect("defaults").no_half_close);
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
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        assert!(rt.block_on(build(&c, None)).is_ok());
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("1m30s"), Ok(Duration::from_secs(90)));
        assert!(duration("x").is_err() && duration("5 parsecs").is_err());
        let bad = parse(&["rd-client", "--backoff-jitter", "2"]).expect("parses");
        assert!(
            rt.block_on(build(&bad, None)).is_err(),
            "jitter above 1 is refused"
        );
        let bad = parse(&["rd-client", "--answer-timeout", "1s"]).expect("parses");
        assert!(
            rt.block_on(build(&bad, None)).is_err(),
            "an answer timeout below the ping interval"
        );
    }
}
