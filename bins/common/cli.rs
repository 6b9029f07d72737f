//! What every rd binary does the same way: logging, Go-style listen addresses, signals.

// Each binary includes this file and uses a different part of it.
#![allow(dead_code)]

use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::net::TcpListener;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event (tracing-subscriber's default format).
    #[default]
    Text,
    /// One JSON object per line (tracing-subscriber's JSON format, event fields at the top).
    Json,
}

/// Set once a write to stderr failed: its reader went away, and nothing more is written.
static STDERR_GONE: AtomicBool = AtomicBool::new(false);

/// Stderr that never fails and never panics. A closed pipe (the log reader went away) turns
/// logging off instead of reaching tracing-subscriber's error path, whose `eprintln!` panics
/// on a broken pipe (and a panic in a task that logs kills a session or the signal handler).
#[derive(Debug, Clone, Copy, Default)]
pub struct QuietStderr;

impl Write for QuietStderr {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if !STDERR_GONE.load(Ordering::Relaxed) && io::stderr().write_all(buf).is_err() {
            STDERR_GONE.store(true, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !STDERR_GONE.load(Ordering::Relaxed) {
            io::stderr().flush().ok();
        }
        Ok(())
    }
}

/// Prints one line to stderr, never panicking (unlike `eprintln!` on a closed pipe).
pub fn say_err(line: &str) {
    QuietStderr.write_all(format!("{line}\n").as_bytes()).ok();
}

/// Prints one line to stdout, never panicking (unlike `println!` on a closed pipe).
pub fn say_out(line: &str) {
    let mut out = io::stdout();
    out.write_all(format!("{line}\n").as_bytes()).ok();
    out.flush().ok();
}

/// Makes sure file descriptors 0, 1 and 2 are open (on /dev/null if they were closed).
/// A process started with stderr closed would otherwise hand fd 2 to the first socket it
/// opens, and every log line would be written into that connection.
#[cfg(unix)]
pub fn guard_standard_fds() {
    for _ in 0..3 {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            // The lowest free descriptor is taken: one of 0..=2 means it was closed, and
            // /dev/null now holds its place for the life of the process.
            Ok(f) if std::os::fd::AsRawFd::as_raw_fd(&f) <= 2 => {
                let _kept_open = std::os::fd::IntoRawFd::into_raw_fd(f);
            }
            _ => return,
        }
    }
}

/// No standard descriptors to guard outside Unix.
#[cfg(not(unix))]
pub fn guard_standard_fds() {}

/// Logs to stderr at info (debug with `debug`); `RUST_LOG` overrides. The wire dump of every
/// message (target `rd_proto::wire`: headers and sizes, never payloads) is on with `debug` or
/// `CATTLE_TUNNEL_DATA_DEBUG=true`, as Go's `PrintTunnelData`; payload bytes (target
/// `rd_proto::payload`) only with `RD_WIRE_PAYLOADS=true` as well, since they carry the
/// tunnelled traffic's secrets.
///
/// Lines go through a bounded queue to a writer thread that drops lines when the queue is
/// full, so a stalled log reader never blocks the process; keep the guard until exit so the
/// last lines are written.
pub fn init_tracing(debug: bool, format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    guard_standard_fds();
    let wire = debug || std::env::var("CATTLE_TUNNEL_DATA_DEBUG").is_ok_and(|v| v == "true");
    let base = if debug { "debug" } else { "info" };
    let payloads = std::env::var("RD_WIRE_PAYLOADS").is_ok_and(|v| v == "true");
    let default = if wire && payloads {
        format!("{base},rd_proto::wire=trace,rd_proto::payload=trace")
    } else if wire {
        format!("{base},rd_proto::wire=trace")
    } else {
        base.to_owned()
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("rd-log")
        .finish(QuietStderr);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => builder
            .with_ansi(io::IsTerminal::is_terminal(&io::stderr()))
            .init(),
        LogFormat::Json => builder
            .fmt_fields(tracing_subscriber::fmt::format::JsonFields::new())
            .event_format(crate::log_json::JsonLines)
            .init(),
    }
    guard
}

/// Prints `WHAT URL` (`listening on http://...`, `admin listening on ...`) with
/// [`announce`]: `url` is the JSON form's `url`.
pub fn announce_listening(format: LogFormat, what: &str, url: &str) {
    announce(
        format,
        &format!("{what} {url}"),
        what,
        &[("url", url.to_owned())],
    );
}

/// Prints a line for programs that read stdout (`listening on URL`): `text` as it is, or
/// with `--log-format json` one JSON object like the log lines (`message` and `fields`,
/// level INFO, `module` the binary), so a collector that merges stdout and stderr (as
/// Kubernetes does) sees nothing but JSON.
pub fn announce(format: LogFormat, text: &str, message: &str, fields: &[(&str, String)]) {
    match format {
        LogFormat::Text => say_out(text),
        LogFormat::Json => {
            let mut line = crate::log_json::Line::new("INFO");
            line.field("message", serde_json::Value::String(message.to_owned()));
            for (name, value) in fields {
                line.field(name, serde_json::Value::String(value.clone()));
            }
            let module = env!("CARGO_BIN_NAME").replace('-', "_");
            line.put("module", serde_json::Value::String(module));
            say_out(&line.to_json());
        }
    }
}

/// `--version` text: the package version and the commit it was built from.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("RD_COMMIT"),
    ")"
);

/// Checks a listen address's form before anything starts, naming `flag` in the error and
/// suggesting the likely intent for the common slips (`8123` for `:8123`).
pub fn check_listen(flag: &str, listen: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{flag} {listen:?}: {why}"));
    if listen.is_empty() {
        return bad("empty; want :PORT or HOST:PORT");
    }
    if listen.bytes().all(|b| b.is_ascii_digit()) {
        return bad(&format!("not an address; did you mean \":{listen}\"?"));
    }
    let Some((host, port)) = listen.rsplit_once(':') else {
        return bad("no port; want :PORT or HOST:PORT");
    };
    if port.parse::<u16>().is_err() {
        return bad(&format!(
            "invalid port {port:?}; want a number from 0 to 65535"
        ));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return bad("an IPv6 address needs brackets, as [::1]:8123");
    }
    if host.contains("://") || host.contains('/') {
        return bad("want :PORT or HOST:PORT, not a URL");
    }
    Ok(())
}

/// Binds a listen address the way Go's `net.Listen` reads it: `:8123` is every interface
/// (IPv6 and IPv4 where the system allows both), `host:port` that host.
pub async fn bind(listen: &str) -> io::Result<TcpListener> {
    bind_with(listen, listen_on)
        .await
        .map_err(|e| io::Error::new(e.kind(), format!("listen on {listen}: {e}")))
}

/// Reads `listen` as [`bind`] does and binds it with `bind_one`: for `:PORT`, the IPv6
/// wildcard first (which takes IPv4 too where the system allows), else the IPv4 one; for
/// `host:port`, the first address the host resolves to. UDP forwards bind this way too.
pub async fn bind_with<T>(
    listen: &str,
    bind_one: impl Fn(std::net::SocketAddr) -> io::Result<T>,
) -> io::Result<T> {
    match listen.strip_prefix(':') {
        Some(port) => {
            let port: u16 = port.parse().map_err(|_| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("invalid port in {listen:?}"),
                )
            })?;
            match bind_one((std::net::Ipv6Addr::UNSPECIFIED, port).into()) {
                Ok(l) => Ok(l),
                Err(_) => bind_one((std::net::Ipv4Addr::UNSPECIFIED, port).into()),
            }
        }
        None => match tokio::net::lookup_host(listen).await?.next() {
            Some(addr) => bind_one(addr),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "address resolves to nothing",
            )),
        },
    }
}

/// Accept backlog: tokio's default of 1024 overflows when thousands of agents reconnect at
/// once (a server restart), and each overflow costs that agent a SYN retransmit (1 s, then
/// 2 s, ...). The kernel caps it at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 8192;

fn listen_on(addr: std::net::SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv6() {
        tokio::net::TcpSocket::new_v6()?
    } else {
        tokio::net::TcpSocket::new_v4()?
    };
    // As std's and tokio's bind: restart on a port with connections in TIME_WAIT.
    #[cfg(unix)]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Resolves on SIGINT or SIGTERM. A signal whose handler cannot be installed is simply not
/// awaited, rather than being mistaken for a shutdown request.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => tracing::info!("interrupted"),
        () = terminate => tracing::info!("terminated"),
    }
}

/// SIGTERM and SIGINT, received one after another: the first starts a drain, the second
/// ends the process at once. Registered once, so a signal between two waits is not lost.
#[derive(Debug)]
pub struct Signals {
    #[cfg(unix)]
    term: Option<tokio::signal::unix::Signal>,
    #[cfg(unix)]
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    /// Starts listening for both signals.
    pub fn listen() -> Self {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Self {
                term: signal(SignalKind::terminate()).ok(),
                int: signal(SignalKind::interrupt()).ok(),
            }
        }
        #[cfg(not(unix))]
        Self {}
    }

    /// Waits for the next SIGTERM or SIGINT; returns its name.
    pub async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            async fn next(s: &mut Option<tokio::signal::unix::Signal>) {
                // A stream that cannot be registered, or ends, never fires.
                let fired = match s {
                    Some(s) => s.recv().await.is_some(),
                    None => false,
                };
                if !fired {
                    std::future::pending::<()>().await;
                }
            }
            tokio::select! {
                () = next(&mut self.term) => "SIGTERM",
                () = next(&mut self.int) => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            if tokio::signal::ctrl_c().await.is_err() {
                std::future::pending::<()>().await;
            }
            "SIGINT"
        }
    }
}

/// Parses a duration the way Go's `time.ParseDuration` reads it, and the forms people
/// write: `100ms`, `1.5s`, `1m30s`, `2h`, `1m 30s`, `0`; a plain number is seconds (as
/// earlier rd-client versions took it). Each `NUMBER UNIT` term may have a fraction; the
/// units are humantime's (`ns`, `us`, `ms`, `s`, `m`, `h`, `d`, ... and their long names).
pub fn duration(text: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        format!("invalid duration {text:?}: {why}; want e.g. 250ms, 1.5s, 1m30s, 2h or 0")
    };
    let s = text.trim();
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if s.starts_with('-') {
        return Err(bad("negative"));
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let secs: f64 = s.parse().map_err(|_| bad("not a number"))?;
        return Duration::try_from_secs_f64(secs).map_err(|e| bad(&e.to_string()));
    }
    let mut total = Duration::ZERO;
    let mut rest = s.trim_start_matches('+');
    while !rest.is_empty() {
        rest = rest.trim_start();
        let number_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(number_end);
        let unit_end = tail
            .find(|c: char| c.is_ascii_digit() || c == '.' || c.is_whitespace())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_end);
        if number.is_empty() || unit.is_empty() {
            return Err(bad("each term is a number and a unit"));
        }
        let amount: f64 = number.parse().map_err(|_| bad("not a number"))?;
        // humantime knows the units; the fraction is ours (it takes whole numbers only).
        let one = humantime::parse_duration(&format!("1{unit}"))
            .map_err(|_| bad(&format!("unknown unit {unit:?}")))?;
        let term = Duration::try_from_secs_f64(one.as_secs_f64() * amount)
            .map_err(|_| bad("too large"))?;
        total = total.checked_add(term).ok_or_else(|| bad("too large"))?;
        rest = tail;
    }
    Ok(total)
}

/// Parses a size in bytes: a plain number, or one with a unit (`KiB`, `MiB`, `GiB`, powers of
/// 1024; `K`, `M`, `G` read the same, as most tools that take buffer sizes do; `KB`, `MB`,
/// `GB` are powers of 1000), e.g. `67108864`, `64MiB`, `1.5GiB`.
pub fn byte_size(text: &str) -> Result<usize, String> {
    let bad = |why: &str| format!("invalid size {text:?}: {why}; want e.g. 65536, 64MiB or 1GiB");
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let amount: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        other => return Err(bad(&format!("unknown unit {other:?}"))),
    };
    let bytes = amount * scale;
    if !bytes.is_finite() || bytes >= usize::MAX as f64 {
        return Err(bad("too large"));
    }
    Ok(bytes as usize)
}

/// A boolean flag's value, from the command line or the environment: `1/0`, `true/false`,
/// `yes/no` (also `on/off`, `y/n`, `t/f`), any case, as clap's `BoolishValueParser` reads
/// them.
pub fn boolish() -> clap::builder::BoolishValueParser {
    clap::builder::BoolishValueParser::new()
}

/// The first line of a secret file, without its line ending. The error names the file,
/// never its content.
pub fn read_secret(path: &std::path::Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_owned();
    if secret.is_empty() {
        return Err(format!("{}: empty", path.display()));
    }
    Ok(secret)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn listen_mistakes_are_named_with_a_hint() {
        let err = check_listen("--listen", "8123").unwrap_err();
        assert_eq!(
            err,
            "--listen \"8123\": not an address; did you mean \":8123\"?"
        );
        for bad in [
            "",
            "localhost",
            ":http",
            "host:99999",
            "::1:80",
            "http://x:80",
        ] {
            let err = check_listen("--listen", bad).unwrap_err();
            assert!(err.starts_with("--listen "), "{err}");
        }
        for good in [":8123", "127.0.0.1:0", "[::1]:8123", "localhost:8123", ":0"] {
            assert_eq!(check_listen("--listen", good), Ok(()), "{good}");
        }
    }

    #[test]
    fn sizes_take_units() {
        assert_eq!(byte_size("65536").unwrap(), 65536);
        assert_eq!(byte_size("64MiB").unwrap(), 64 << 20);
        assert_eq!(byte_size("64M").unwrap(), 64 << 20);
        assert_eq!(byte_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(byte_size("10MB").unwrap(), 10_000_000);
        assert!(byte_size("64 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(byte_size("").is_err());
        assert!(byte_size("-1").is_err());
    }

    #[test]
    fn durations_take_go_forms() {
        let ok = |s: &str, ms: u64| assert_eq!(duration(s), Ok(Duration::from_millis(ms)), "{s}");
        ok("0", 0);
        ok("100ms", 100);
        ok("2s", 2000);
        ok("1.5s", 1500);
        ok("1m30s", 90_000);
        ok("1m 30s", 90_000);
        ok("2h", 7_200_000);
        ok("1h2m3s4ms", 3_723_004);
        ok(".5s", 500);
        ok("5", 5000);
        assert_eq!(duration("1500us"), Ok(Duration::from_micros(1500)));
        for bad in ["", "-1s", "1x", "ms", "1m30", "s1", "1..5s"] {
            let err = duration(bad).unwrap_err();
            assert!(err.starts_with("invalid duration"), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn port_zero_binds_an_ephemeral_port() {
        let listener = bind("127.0.0.1:0").await.unwrap();
        assert_ne!(listener.local_addr().unwrap().port(), 0);
    }

    #[tokio::test]
    async fn go_style_port_only_binds_every_interface() {
        let listener = bind(":0").await.unwrap();
        assert!(listener.local_addr().unwrap().ip().is_unspecified());
    }

    #[tokio::test]
    async fn bad_ports_are_refused_with_the_address() {
        for bad in [":http", ":70000"] {
            let err = bind(bad).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad}");
            assert!(err.to_string().contains(bad), "{err}");
        }
    }
}
