//! Leak guards for tunnel streams: an idle timeout (no bytes either way for too long) and a
//! bound on how long a dial may wait for the agent's first answer. Both are off by default
//! (Go has neither); a task looks at every session's streams a few times per timeout and
//! resets those past it, so the application holding one sees it end with the reason, the
//! agent drops its side, and `rd_streams_expired{guard}` counts it.

use std::sync::Weak;
use std::time::Duration;

use crate::log_limit::{rejection, LogLimit};
use crate::server::Inner;
use crate::Server;

/// The leak guards' settings ([`ServerBuilder::stream_idle_timeout`](crate::ServerBuilder::stream_idle_timeout),
/// [`ServerBuilder::pending_dial_timeout`](crate::ServerBuilder::pending_dial_timeout)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Guards {
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) pending_dial_timeout: Option<Duration>,
}

/// Streams closed by a guard, logged at most a few lines a second.
static EXPIRED: LogLimit = LogLimit::new();

impl Guards {
    /// How often the streams are looked at: a quarter of the shortest timeout, between
    /// 50 ms and 10 s, so a stream outlives its timeout by at most a quarter of it.
    fn interval(&self) -> Option<Duration> {
        let shortest = match (self.idle_timeout, self.pending_dial_timeout) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return None,
        };
        Some((shortest / 4).clamp(Duration::from_millis(50), Duration::from_secs(10)))
    }

    /// Starts the task that applies the guards to `server`'s sessions, if any guard is on
    /// and a tokio runtime runs. It ends with the server (it holds it weakly).
    pub(crate) fn start(self, server: &Server) {
        let Some(every) = self.interval() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("stream guards need a tokio runtime: not started");
            return;
        };
        let weak = std::sync::Arc::downgrade(&server.inner);
        let shutdown = server.inner.lifecycle.stopped().clone();
        runtime.spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    () = shutdown.cancelled() => return,
                }
                if !self.sweep(&weak) {
                    return;
                }
            }
        });
    }

    /// One look at every stream; false once the server is gone.
    fn sweep(&self, weak: &Weak<Inner>) -> bool {
        let Some(inner) = weak.upgrade() else {
            return false;
        };
        let server = Server { inner };
        let records: Vec<_> = server.records().values().cloned().collect();
        for record in records {
            let session = &record.handle;
            let now = session.now();
            for s in session.streams() {
                if !s.on_wire {
                    continue;
                }
                let pending = s.origin == rd_proto::Origin::Local && s.last_heard.is_none();
                let (guard, reason) = match (self.pending_dial_timeout, self.idle_timeout) {
                    (Some(limit), _)
                        if pending && now.saturating_duration_since(s.opened_at) >= limit =>
                    {
                        (
                            "pending_dial_timeout",
                            format!(
                                "dial timeout: no answer from the agent within {}",
                                humantime::format_duration(limit)
                            ),
                        )
                    }
                    (_, Some(limit)) if now.saturating_duration_since(s.last_activity) >= limit => {
                        (
                            "idle_timeout",
                            format!(
                                "idle timeout: no data either way for {}",
                                humantime::format_duration(limit)
                            ),
                        )
                    }
                    _ => continue,
                };
                if session.reset_stream(s.id, &reason) {
                    server.metrics().stream_expired(guard);
                    rejection!(
                        EXPIRED,
                        client = %crate::short_id(session.client_key()),
                        session = session.session_key(),
                        stream = s.id.0,
                        target = %s.target.without_route(),
                        origin = s.label.unwrap_or("library"),
                        guard,
                        reason = %reason,
                        "stream closed by a leak guard"
                    );
                }
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interval_follows_the_shortest_timeout() {
        let g = |idle: Option<u64>, pending: Option<u64>| Guards {
            idle_timeout: idle.map(Duration::from_secs),
            pending_dial_timeout: pending.map(Duration::from_secs),
        };
        assert_eq!(g(None, None).interval(), None);
        assert_eq!(
            g(Some(300), Some(20)).interval(),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            g(Some(3600), None).interval(),
            Some(Duration::from_secs(10))
        );
        let tiny = Guards {
            idle_timeout: Some(Duration::from_millis(10)),
            pending_dial_timeout: None,
        };
        assert_eq!(tiny.interval(), Some(Duration::from_millis(50)));
    }
}
