//! `rd-server`: the tunnel server, command-line compatible with Go remotedialer's example.

mod admin_auth;
#[path = "../../common/checks.rs"]
mod checks;
#[path = "../../common/cli.rs"]
mod cli;
mod file_watch;
mod forwards;
#[path = "../../common/go_flags.rs"]
mod go_flags;
#[path = "../../common/log_json.rs"]
mod log_json;
#[path = "../../common/process_metrics.rs"]
mod process_metrics;
mod routes;
mod tls;

/// mimalloc instead of glibc's malloc. Data messages are allocated on the thread that reads
/// the websocket and freed on the one that writes them on; glibc gives each thread an arena
/// and trims a non-main arena's heap back to the kernel (madvise) as soon as its top is
/// free, so every few messages the next allocation page-faults fresh zeroed pages in again:
/// a profile of rd-server moving 1 GiB spent about a fifth of its CPU in page faults,
/// memset and munmap. mimalloc keeps freed pages for reuse (docs/benchmarks.md). rd-client
/// stays on glibc: with mimalloc its peak RSS moving 1 GiB doubled (12 → 26 MiB), past the
/// 16 MiB target. Built with mimalloc's `no_thp`: with transparent huge pages its first,
/// eagerly committed arena made 10 MiB resident at start (19.8 MiB RSS at start, 12.4
/// without), for no measured gain in CPU.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// This server's peer id, for HA peering (needs --token). Default: the pod's name
    /// (POD_NAME) or else the host name.
    #[arg(long, env = "RD_ID", default_value = "", hide_default_value = true)]
    id: String,
    /// The token peers share, for HA peering (needs --id). Prefer --token-file or RD_TOKEN:
    /// a command line is visible to every user of the machine.
    #[arg(
        long,
        env = "RD_TOKEN",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    token: String,
    /// File holding the peer token (its first line), instead of --token.
    #[arg(long, env = "RD_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Authenticate agents: a file of "client-id token" lines ('#' comments). An agent must
    /// send its id (X-Tunnel-ID) and token (X-API-Tunnel-Token). Reloaded on SIGHUP and when
    /// the file changes. Without it any X-Tunnel-ID is accepted, as Go's example.
    #[arg(long, env = "RD_AGENT_TOKENS", value_name = "FILE")]
    agent_tokens: Option<PathBuf>,
    /// Serve /client, /metrics and /healthz on this address instead (":PORT" or
    /// "HOST:PORT", e.g. 127.0.0.1:8124); --listen then serves only /connect, the tunnel
    /// endpoint agents need. Default: everything on --listen, as Go's example.
    #[arg(long, env = "RD_ADMIN_LISTEN", value_name = "ADDR")]
    admin_listen: Option<String>,
    /// Also serve SOCKS5 alone on this address (":PORT" or "HOST:PORT", never TLS). SOCKS5
    /// is always served beside CONNECT on the operator's listener (--admin-listen, else
    /// --listen) when that is plain HTTP: curl --socks5-hostname CLIENT:PASSWORD@host:port
    /// (the user name is the agent's client key, the password is checked as CONNECT's).
    #[arg(long, env = "RD_SOCKS_LISTEN", value_name = "ADDR")]
    socks_listen: Option<String>,
    /// Require credentials for the operator's routes: /client and /admin (an Authorization
    /// header), HTTP CONNECT, SOCKS5 and plain-HTTP proxy requests (the proxy password: any
    /// bearer token, or the password of a "basic CLIENT:PASSWORD" line). A file of "bearer TOKEN"
    /// and "basic USER:PASSWORD" lines ('#' comments). Without it, whoever reaches the
    /// listener serving them reaches every agent's network.
    #[arg(long, env = "RD_ADMIN_AUTH", value_name = "FILE")]
    admin_auth: Option<PathBuf>,
    /// Label connection counters with the target address, as Go does (an outsider then
    /// chooses how many series there are).
    #[arg(long, env = "RD_METRICS_PER_ADDRESS", value_parser = cli::boolish())]
    metrics_per_address: bool,
    /// Peers to link to: id:token:url,id:token:url (the url may contain colons).
    #[arg(
        long,
        env = "RD_PEERS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    peers: String,
    /// Find peers through DNS: every address NAME resolves to (e.g. a Kubernetes headless
    /// Service, rd-server-headless.ns.svc:8123) gets a peer link to ws://ADDRESS:PORT/connect,
    /// except this server's own. A URL (wss://NAME:PORT/path) sets scheme and path. Needs the
    /// shared token; combinable with --peers.
    #[arg(long, env = "RD_PEERS_DNS", value_name = "NAME:PORT")]
    peers_dns: Option<rd_server::PeerDiscovery>,
    /// How often --peers-dns is resolved again.
    #[arg(long, env = "RD_PEERS_DNS_INTERVAL", value_name = "DURATION", default_value = "10s", value_parser = cli::duration)]
    peers_dns_interval: Duration,
    /// DNS server for --peers-dns instead of the system's (/etc/resolv.conf).
    #[arg(long, env = "RD_DNS_SERVER", value_name = "IP:PORT")]
    dns_server: Option<std::net::SocketAddr>,
    /// Debug logging, including a dump of every tunnel message.
    #[arg(long, env = "RD_DEBUG", num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = ArgAction::Set, value_parser = cli::boolish())]
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
    /// Authenticate agents by TLS client certificate (mTLS; needs --tls-cert): a PEM file
    /// of the CA certificate(s) that sign agents' certificates. The agent id is the
    /// certificate's subject CN, else its first DNS SAN; the agent's --id must be that id.
    /// With --agent-tokens too, an agent without a certificate may use a token. The
    /// handshake demands a certificate only on an agents-only listener (--admin-listen set)
    /// without tokens or peer token; otherwise /connect refuses agents without one.
    /// Reloaded, with --tls-cert and --tls-key, on SIGHUP and when a file changes.
    #[arg(long, env = "RD_AGENT_CA", value_name = "FILE", requires = "tls_cert")]
    agent_ca: Option<PathBuf>,
    /// Serve Prometheus metrics at /metrics.
    #[arg(long, env = "RD_METRICS", num_args = 0..=1, default_missing_value = "true", default_value_t = true, action = ArgAction::Set, value_parser = cli::boolish())]
    metrics: bool,
    /// Extra CA certificate (PEM) to verify peers' TLS certificates; repeatable (comma-separated
    /// in the environment variable).
    #[arg(long, env = "RD_PEER_CA_CERT", value_delimiter = ',')]
    peer_ca_cert: Vec<PathBuf>,
    /// Do not verify peers' TLS certificates (what Go remotedialer always does).
    #[arg(long, env = "RD_PEER_INSECURE_SKIP_VERIFY", value_parser = cli::boolish())]
    peer_insecure_skip_verify: bool,
    /// Forward a local port through an agent, like ssh -L: every connection to LISTEN is
    /// dialed through client CLIENT to PROTO/ADDRESS on its side; repeatable.
    /// E.g. 127.0.0.1:2222=foo:tcp/127.0.0.1:22 (":2222" listens on every interface).
    /// A "?proxy-protocol=v1" (or v2) suffix sends the target a PROXY protocol header with
    /// the user's address first (the target must expect one).
    /// A udp target forwards datagrams from a UDP socket on LISTEN (rd agents only), e.g.
    /// 127.0.0.1:5353=foo:udp/10.0.0.10:53; see --udp-idle-timeout, --udp-max-flows.
    #[arg(
        long = "forward",
        env = "RD_FORWARD",
        value_delimiter = ',',
        value_name = "LISTEN=CLIENT:PROTO/ADDRESS"
    )]
    forward: Vec<rd_server::forward::ForwardSpec>,
    /// A UDP forward (--forward LISTEN=CLIENT:udp/HOST:PORT) closes a flow (one user's
    /// source address, one tunnel stream) after this long without a datagram either way;
    /// the source's next datagram opens a new one.
    #[arg(long, env = "RD_UDP_IDLE_TIMEOUT", value_name = "DURATION", default_value = "60s", value_parser = cli::duration)]
    udp_idle_timeout: Duration,
    /// Flows one UDP forward carries at once; datagrams from further sources are dropped
    /// (counted in rd_udp_datagrams_dropped_total{reason="max_flows"}) until a flow ends.
    #[arg(long, env = "RD_UDP_MAX_FLOWS", value_name = "N", default_value_t = rd_server::forward_udp::DEFAULT_UDP_MAX_FLOWS)]
    udp_max_flows: usize,
    /// How long an HTTP CONNECT through a Go agent (or one run with --no-connect-ack) waits
    /// for the agent to refuse or fail the dial before answering 200 (a refusal is answered
    /// 502 with the agent's text); 0 answers at once. rd agents acknowledge their dials, and
    /// CONNECT through them answers as soon as the dial succeeded or failed.
    #[arg(long, env = "RD_CONNECT_WAIT", value_name = "DURATION", default_value = "100ms", value_parser = cli::duration)]
    connect_wait: Duration,
    /// Send the target of every HTTP CONNECT (and SOCKS5) tunnel a PROXY protocol header
    /// (v1 text or v2 binary) before the user's bytes, carrying the user's address and the
    /// address they connected to, so the target logs and judges the user, not the agent.
    /// The target must expect the header. Default: none.
    #[arg(long, env = "RD_CONNECT_PROXY_PROTOCOL", value_name = "v1|v2")]
    connect_proxy_protocol: Option<rd_server::proxy_protocol::ProxyProtocolVersion>,
    /// Trusted fronts (load balancers) that send a PROXY protocol header (v1 or v2) on
    /// every connection to --listen and --admin-listen: IP addresses and CIDR blocks,
    /// comma-separated (10.0.0.0/8,fd00::/8). Their connections must start with a header,
    /// and the address in it is the one logged, authorized and sent onwards; a connection
    /// from anywhere else that starts with a header is refused. See docs/security.md.
    #[arg(long, env = "RD_PROXY_PROTOCOL_FROM", value_name = "CIDR[,CIDR...]")]
    proxy_protocol_from: Option<rd_server::proxy_protocol::TrustedProxies>,
    /// Ping a client that sent nothing for this long (Go's server never pings; Go and rd
    /// clients ping every 5s themselves, so these go out only to quiet ones); 0 disables.
    #[arg(long, env = "RD_PING_AFTER", value_name = "DURATION", default_value = "5s", value_parser = cli::duration)]
    ping_after: Duration,
    /// Drop a client that pinged or answered pings before and then sent nothing for this
    /// long (a dead link); 0 disables, leaving Go's 60s keepalive timeout.
    #[arg(long, env = "RD_ANSWER_TIMEOUT", value_name = "DURATION", default_value = "15s", value_parser = cli::duration)]
    answer_timeout: Duration,
    /// On SIGTERM (or SIGINT), drain: refuse new agents and requests (503, /readyz fails),
    /// ask the agents to move to another replica (going-away close, each once its streams
    /// are done), let streams in flight finish for up to this long, then log and cut the
    /// rest and exit. A second signal exits at once. 0 cuts at once.
    #[arg(long, env = "RD_GRACE_PERIOD", value_name = "DURATION", default_value = "30s", value_parser = cli::duration)]
    grace_period: Duration,
    /// Websocket upgrades in progress at once; more are answered 503 with Retry-After.
    #[arg(long, env = "RD_MAX_PENDING_HANDSHAKES", value_name = "N", default_value_t = rd_server::DEFAULT_MAX_PENDING_HANDSHAKES)]
    max_pending_handshakes: usize,
    /// How much one read of a session's small websocket frames (pings, requests, Go's 4 KiB
    /// fragments) takes at first, in bytes (at least 1 KiB). The buffer exists only while
    /// frames arrive; a frame larger than it is read into a buffer of its own size.
    #[arg(long, env = "RD_WS_READ_BUFFER", value_name = "BYTES", default_value_t = rd_server::DEFAULT_WS_READ_BUFFER)]
    ws_read_buffer: usize,
    /// Most bytes one read syscall takes while a client sends faster than the websocket
    /// reads (bulk data); the buffer exists only during such bursts. 0 turns bursts off.
    #[arg(long, env = "RD_WS_READ_BURST", value_name = "BYTES", default_value_t = rd_server::DEFAULT_WS_READ_BURST)]
    ws_read_burst: usize,
    /// Close a tunnel stream (CONNECT, forward, /client) that moved no byte either way for
    /// this long; 0 (the default, as Go) never does. The shipped manifests set 1h.
    #[arg(long, env = "RD_STREAM_IDLE_TIMEOUT", value_name = "DURATION", default_value = "0", value_parser = cli::duration)]
    stream_idle_timeout: Duration,
    /// Close a stream whose agent has not answered the dial at all (no data, error or
    /// credit) within this long; 0 (the default) never does. A target that never speaks
    /// and a client that sends less than a credit window count as unanswered.
    #[arg(long, env = "RD_PENDING_DIAL_TIMEOUT", value_name = "DURATION", default_value = "0", value_parser = cli::duration)]
    pending_dial_timeout: Duration,
    /// Dials through one session still waiting for the agent's first answer; one more is
    /// refused ("too many dials pending through this session") and counted in
    /// rd_dials_refused{reason="max_pending_dials"}.
    #[arg(
        long,
        env = "RD_MAX_PENDING_DIALS",
        value_name = "N",
        default_value_t = 4096
    )]
    max_pending_dials: usize,
    /// Bytes a session may hold for its streams' readers beyond their initial 32 KiB windows
    /// (credit: granted and unread; Pause/Resume: unread). It decides the longest link one
    /// session fills: a budget B serves links with up to B/2 in flight with room (64MiB:
    /// 100 MB/s over 335 ms); one stream's window is still at most 32 MiB. It costs memory
    /// only while readers stop reading. Units: KiB, MiB, GiB (or plain bytes).
    #[arg(long, env = "RD_RECEIVE_BUDGET", value_name = "SIZE", default_value = "64MiB", value_parser = cli::byte_size)]
    receive_budget: usize,
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
                    rd_session::transport::validate_url(url)
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

/// The peer id when none is given: the pod's name (Kubernetes sets POD_NAME through the
/// downward API in our manifests), else the host name (a pod's host name is its name too).
fn default_id() -> String {
    let from_env = |name| {
        std::env::var(name)
            .ok()
            .filter(|v: &String| !v.trim().is_empty())
    };
    from_env("POD_NAME")
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .filter(|h| !h.trim().is_empty())
        })
        .or_else(|| from_env("HOSTNAME"))
        .map(|id| id.trim().to_owned())
        .unwrap_or_default()
}

/// A configuration mistake found at start-up: the process exits with status 2.
#[derive(Debug)]
struct ConfigError(String);

/// Everything that can be checked without serving: the service would otherwise start and
/// then fail (or retry) forever on a mistake that cannot fix itself.
async fn check_config(args: &Args) -> Result<Checked, ConfigError> {
    cli::check_listen("--listen", &args.listen).map_err(ConfigError)?;
    let peers = parse_peers(&args.peers).map_err(ConfigError)?;
    let peer_token = match &args.token_file {
        Some(path) => {
            cli::read_secret(path).map_err(|e| ConfigError(format!("--token-file {e}")))?
        }
        None => args.token.clone(),
    };
    if !peers.is_empty() && (args.id.is_empty() || peer_token.is_empty()) {
        return Err(ConfigError("--peers needs --id and --token".into()));
    }
    if args.peers_dns.is_some() && peer_token.is_empty() {
        return Err(ConfigError(
            "--peers-dns needs the shared token (--token-file, RD_TOKEN or --token)".into(),
        ));
    }
    if let Some(admin) = &args.admin_listen {
        cli::check_listen("--admin-listen", admin).map_err(ConfigError)?;
        // Port 0 asks for a free port on each listener: two of them never clash.
        let ephemeral = admin.trim().ends_with(":0");
        if admin.trim() == args.listen.trim() && !ephemeral {
            return Err(ConfigError(format!(
                "--admin-listen {admin:?}: the same address as --listen; the admin routes \
                 need an address of their own (or leave --admin-listen out to serve \
                 everything on --listen)"
            )));
        }
    }
    if let Some(socks) = &args.socks_listen {
        cli::check_listen("--socks-listen", socks).map_err(ConfigError)?;
    }
    for spec in &args.forward {
        cli::check_listen("--forward", &spec.listen).map_err(ConfigError)?;
    }
    let admin_auth = match &args.admin_auth {
        Some(path) => Some(Arc::new(
            admin_auth::AdminAuth::load(path)
                .map_err(|e| ConfigError(format!("--admin-auth {e}")))?,
        )),
        None => None,
    };
    let agent_tokens = match &args.agent_tokens {
        Some(path) => Some(
            rd_server::AgentTokens::load(path)
                .map_err(|e| ConfigError(format!("--agent-tokens: {e}")))?,
        ),
        None => None,
    };
    for ca in &args.peer_ca_cert {
        checks::check_ca_file("--peer-ca-cert", ca)
            .await
            .map_err(ConfigError)?;
    }
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let files = tls::TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                agent_ca: args.agent_ca.clone(),
                // Who reaches this listener without a client certificate and must still
                // get through the handshake: operators and probes (everything on one
                // listener), token agents, peers (they dial without one). /connect's
                // authorizer then refuses agents with neither certificate nor token.
                cert_optional: args.admin_listen.is_none()
                    || agent_tokens.is_some()
                    || !peer_token.is_empty(),
            };
            Some(tls::Tls::load(files).map_err(ConfigError)?)
        }
        _ => None,
    };
    Ok(Checked {
        peers,
        peer_token,
        agent_tokens,
        admin_auth,
        tls,
    })
}

/// What [`check_config`] built on the way.
struct Checked {
    peers: Vec<PeerSpec>,
    peer_token: String,
    agent_tokens: Option<rd_server::AgentTokens>,
    admin_auth: Option<Arc<admin_auth::AdminAuth>>,
    tls: Option<tls::Tls>,
}

/// Reloads the agent tokens on SIGHUP and when the file changes (see `file_watch`). A file
/// that does not parse leaves the table in use.
async fn watch_agent_tokens(tokens: rd_server::AgentTokens) {
    let paths = vec![tokens.path().to_owned()];
    file_watch::watch(paths, |trigger| match tokens.reload() {
        Ok(agents) => tracing::info!(agents, trigger, "agent tokens reloaded"),
        Err(e) => {
            tracing::warn!(error = %e, trigger, "agent tokens not reloaded; the previous ones stay in force")
        }
    })
    .await;
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = Args::parse_from(go_flags::normalize(std::env::args_os()));
    if args.id.is_empty() {
        args.id = default_id();
    }
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
    let Checked {
        peers,
        peer_token,
        agent_tokens,
        admin_auth,
        tls,
    } = checked;
    let mut peer_tls = rd_session::transport::TlsOptions::default()
        .with_insecure_skip_verify(args.peer_insecure_skip_verify);
    for ca in &args.peer_ca_cert {
        peer_tls = peer_tls.with_ca_file(ca);
    }
    let metrics = rd_server::Metrics::new_with(|registry| {
        process_metrics::register(registry, env!("CARGO_PKG_VERSION"), env!("RD_COMMIT"));
    })
    .with_address_labels(args.metrics_per_address)
    // Without tokens anyone chooses client keys: their series go when their sessions do.
    .transient_client_keys(agent_tokens.is_none() && args.agent_ca.is_none());
    if let Some(tokens) = &agent_tokens {
        tracing::info!(
            agents = tokens.len(),
            file = %tokens.path().display(),
            "agents authenticate with tokens"
        );
        tokio::spawn(watch_agent_tokens(tokens.clone()));
    }
    let builder = match (&args.agent_ca, &agent_tokens) {
        (Some(ca), tokens) => {
            tracing::info!(
                file = %ca.display(),
                tokens_too = tokens.is_some(),
                "agents authenticate with client certificates (id: subject CN, else first DNS SAN)"
            );
            let certs = rd_server::ClientCertificates::new();
            match tokens {
                Some(tokens) => Server::builder(certs.or_else(tokens.clone())),
                None => Server::builder(certs),
            }
        }
        (None, Some(tokens)) => Server::builder(tokens.clone()),
        (None, None) => Server::builder(TunnelIdHeader),
    };
    if let Some(tls) = &tls {
        tokio::spawn(tls.clone().watch());
    }
    let mut config = rd_proto::Config::default();
    config.server_ping_after = (!args.ping_after.is_zero()).then_some(args.ping_after);
    config.answer_timeout = (!args.answer_timeout.is_zero()).then_some(args.answer_timeout);
    config.max_pending_dials = args.max_pending_dials;
    config = config.with_session_receive_budget(args.receive_budget);
    config.validate()?;
    let mut builder = builder
        .metrics(metrics)
        .session_config(config)
        .max_pending_handshakes(args.max_pending_handshakes)
        .websocket_read_buffer(args.ws_read_buffer)
        .websocket_read_burst(args.ws_read_burst)
        .stream_idle_timeout(Some(args.stream_idle_timeout))
        .pending_dial_timeout(Some(args.pending_dial_timeout))
        .peer_connect_options(rd_session::transport::ConnectOptions::default().with_tls(peer_tls));
    if !args.id.is_empty() && !peer_token.is_empty() {
        builder = builder.peer_identity(&args.id, &peer_token);
    }
    if let Some(discovery) = args.peers_dns.clone() {
        let mut discovery = discovery.interval(args.peers_dns_interval);
        if let Some(server) = args.dns_server {
            discovery = discovery.resolver(rd_server::DnsResolver::with_server(server));
        }
        tracing::info!(
            id = %args.id,
            name = discovery.name(),
            interval = ?args.peers_dns_interval,
            dns_server = args.dns_server.map(tracing::field::display),
            "finding peers through DNS"
        );
        builder = builder.peer_discovery(discovery);
    }
    let server = builder.build();
    for p in peers {
        server.add_peer(p.url, p.id, p.token);
    }
    // Every socket is bound before anything says it listens: a second bind that fails
    // (the admin address taken) exits without a `listening on` line first.
    let forwards = forwards::bind(&args.forward).await?;
    let listener = cli::bind(&args.listen)
        .await
        .map_err(|e| format!("--listen: {e}"))?;
    let admin_listener = match &args.admin_listen {
        Some(admin) => Some(
            cli::bind(admin)
                .await
                .map_err(|e| format!("--admin-listen: {e}"))?,
        ),
        None => None,
    };
    let socks_listener = match &args.socks_listen {
        Some(socks) => Some(
            cli::bind(socks)
                .await
                .map_err(|e| format!("--socks-listen: {e}"))?,
        ),
        None => None,
    };
    let local = listener.local_addr()?;
    let operator = match &admin_listener {
        Some(a) => a.local_addr()?,
        None => local,
    };
    warn_if_open(
        &local,
        &operator,
        agent_tokens.is_some() || args.agent_ca.is_some(),
        admin_auth.is_some(),
    );
    let udp = forwards::UdpOptions {
        idle_timeout: args.udp_idle_timeout,
        max_flows: args.udp_max_flows,
    };
    let _forwards = forwards::start(&server, forwards, args.log_format, udp)?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let url = format!("{scheme}://{local}");
    cli::announce_listening(args.log_format, "listening on", &url);
    let proxy = Arc::new(rd_server::proxy::ClientProxy::new(server.clone()));
    let front = routes::Front::default();
    let proxy_protocol = args.proxy_protocol_from.clone().map(|trusted| {
        tracing::info!(trusted = %trusted, "PROXY protocol headers taken from trusted fronts");
        Arc::new(rd_server::proxy_protocol::ProxyProtocolAcceptor::new(
            trusted,
        ))
    });
    let app = |role| {
        Arc::new(
            routes::App::new(
                server.clone(),
                proxy.clone(),
                args.metrics,
                role,
                admin_auth.clone(),
            )
            .connect_wait(args.connect_wait)
            .connect_proxy_protocol(args.connect_proxy_protocol)
            .accept_proxy_protocol(proxy_protocol.clone())
            .front(front.clone()),
        )
    };
    let admin = match admin_listener {
        Some(admin) => {
            let url = format!("{scheme}://{}", admin.local_addr()?);
            cli::announce_listening(args.log_format, "admin listening on", &url);
            // Operators and probes: no client certificates asked for here.
            let admin_tls = match &tls {
                Some(tls) => {
                    let tls = tls::Tls::load(tls.files().without_client_auth())?;
                    tokio::spawn(tls.clone().watch());
                    Some(tls)
                }
                None => None,
            };
            let served = routes::serve(admin, admin_tls, app(routes::Role::Admin));
            Some(tokio::spawn(served))
        }
        None => None,
    };
    let socks = match socks_listener {
        Some(socks) => {
            let url = format!("socks5://{}", socks.local_addr()?);
            cli::announce_listening(args.log_format, "socks5 listening on", &url);
            Some(tokio::spawn(routes::serve(
                socks,
                None,
                app(routes::Role::Socks5),
            )))
        }
        None => None,
    };
    let role = if admin.is_some() {
        routes::Role::Agents
    } else {
        routes::Role::All
    };
    // Registered before serving: a signal from the first moment on starts the drain.
    let mut signals = cli::Signals::listen();
    // Served from a task of its own: the listener keeps answering (/readyz 503, /client
    // 503) while the drain runs.
    let mut serving = tokio::spawn(routes::serve(listener, tls, app(role)));
    let signal = tokio::select! {
        r = &mut serving => return Ok(r??),
        signal = signals.recv() => signal,
    };
    // Refuse new work before saying so: whoever reads the line may rely on it.
    server.begin_drain();
    front.drain.cancel();
    tracing::info!(signal, grace_period = ?args.grace_period, "draining; a second SIGTERM or SIGINT exits at once");
    let started = tokio::time::Instant::now();
    let drained = async {
        server.drain(args.grace_period).await;
        // The last bytes of each response leave through hyper after the tunnel stream has
        // ended: wait for the connections too, within what is left of the grace period
        // (at least a moment, for responses already cut to end).
        front.connections.close();
        let left = args
            .grace_period
            .saturating_sub(started.elapsed())
            .max(Duration::from_millis(500));
        if tokio::time::timeout(left, front.connections.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                connections = front.connections.len(),
                "HTTP connections still open at the end of the drain"
            );
        }
    };
    tokio::select! {
        () = drained => tracing::info!(elapsed = ?started.elapsed(), "drained; exiting"),
        signal = signals.recv() => tracing::warn!(signal, "second signal: exiting at once, cutting what is left"),
    }
    serving.abort();
    if let Some(admin) = admin {
        admin.abort();
    }
    if let Some(socks) = socks {
        socks.abort();
    }
    Ok(())
}

/// Says at start-up what anyone who reaches a listener can do, when that is more than
/// nothing: register as any agent (no `--agent-tokens`, no `--agent-ca`), reach every
/// agent's network through `/client`, `/admin`, CONNECT, SOCKS5 or plain-HTTP proxy requests (no
/// `--admin-auth`).
/// Loopback listeners are left out: only this machine reaches them.
fn warn_if_open(
    agents: &std::net::SocketAddr,
    operator: &std::net::SocketAddr,
    agents_authenticated: bool,
    admin_auth: bool,
) {
    if !agents_authenticated && !agents.ip().is_loopback() {
        tracing::warn!(
            listen = %agents,
            "agents are not authenticated: anyone who reaches this address can register as \
             any client id (X-Tunnel-ID) and receive the requests meant for it; use \
             --agent-tokens or --agent-ca (see docs/security.md)"
        );
    }
    if !admin_auth && !operator.ip().is_loopback() {
        tracing::warn!(
            listen = %operator,
            "/client, /admin, CONNECT, SOCKS5 and plain-HTTP proxy requests are open to \
             anyone who reaches this address, and through them every agent's network; use --admin-auth \
             and keep them on --admin-listen with a private address (see docs/security.md)"
        );
    }
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
