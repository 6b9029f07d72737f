//! Reloading files while the server runs: on SIGHUP, and when a file's size or modification
//! time changes (polled every 2 s, which works the same on every file system and for a
//! Kubernetes Secret volume's symlink swap).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// How often the files are looked at.
const POLL: Duration = Duration::from_secs(2);

type Stamp = Vec<Option<(Option<SystemTime>, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        })
        .collect()
}

/// Calls `reload` with what triggered it ("SIGHUP" or "file changed") whenever SIGHUP
/// arrives or one of `paths` changes; runs until the task is dropped. `reload` logs its own
/// outcome, and keeps what is in force when the files do not load.
pub async fn watch(paths: Vec<PathBuf>, mut reload: impl FnMut(&'static str) + Send) {
    let mut last = stamp(&paths);
    let mut tick = tokio::time::interval(POLL);
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(h) => {
                    h.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let trigger = tokio::select! {
            () = hangup => "SIGHUP",
            _ = tick.tick() => {
                if stamp(&paths) == last {
                    continue;
                }
                "file changed"
            }
        };
        last = stamp(&paths);
        reload(trigger);
    }
}
