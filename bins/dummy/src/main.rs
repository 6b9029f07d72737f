//! `rd-dummy`: the small file server the remotedialer examples tunnel to.
//!
//! A port of the Go example `dummy/main.go`: serves a directory with
//! `http.FileServer` semantics and logs one line per request with its duration.

mod access_log;
#[path = "../../common/cli.rs"]
mod cli;
mod file_body;
mod files;
#[path = "../../common/go_flags.rs"]
mod go_flags;
mod http_date;
mod listing;
#[path = "../../common/log_json.rs"]
mod log_json;
mod mime;
mod range;
mod sanitize;
mod server;

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Test web server for remotedialer: serves a directory over HTTP/1.1.
///
/// Supports GET and HEAD, single byte ranges, index.html and directory listings.
/// Go-style single-dash flags work too: `rd-dummy -listen :8125`.
/// Logs go to stderr (filter with RUST_LOG); stdout carries only the
/// `listening on http://ADDR` line, printed once the socket is bound.
#[derive(Debug, Parser)]
#[command(name = "rd-dummy", version = cli::VERSION)]
struct Args {
    /// Address to listen on: `:PORT` (all interfaces), `HOST:PORT` or `[V6]:PORT`.
    /// Port 0 picks a free port; the `listening on` line shows which.
    #[arg(
        long,
        env = "RD_DUMMY_LISTEN",
        value_name = "ADDR",
        default_value = ":8125"
    )]
    listen: String,

    /// Directory to serve [default: the current directory].
    #[arg(long, env = "RD_DUMMY_DIR", value_name = "PATH")]
    dir: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse_from(go_flags::normalize(std::env::args_os()));
    let _log = cli::init_tracing(false, cli::LogFormat::Text);
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            cli::say_err(&format!("rd-dummy: {e}"));
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> std::io::Result<()> {
    let dir = args.dir.unwrap_or_else(|| PathBuf::from("."));
    let root = std::fs::canonicalize(&dir)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.display())))?;
    if !root.is_dir() {
        let msg = format!("{} is not a directory", root.display());
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, msg));
    }
    let listener = cli::bind(&args.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!("serving {}", root.display());
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{addr}")?;
    stdout.flush()?;
    drop(stdout);
    server::run(
        listener,
        files::FileServer::new(root),
        cli::shutdown_signal(),
    )
    .await;
    Ok(())
}
