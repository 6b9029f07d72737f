//! A hook for metrics: what happens to a session's streams.

use rd_proto::Target;

/// Told about every stream of a session; calls happen on hot paths, so keep them cheap
/// (atomic counters). Every method has an empty default.
pub trait SessionObserver: Send + Sync + 'static {
    /// A stream was opened (by either side).
    fn stream_opened(&self, _target: &Target) {}
    /// The application closed (dropped) a stream.
    fn stream_closed(&self, _target: &Target) {}
    /// The application wrote `bytes` into a stream.
    fn transmitted(&self, _bytes: usize) {}
    /// The application read `bytes` from a stream.
    fn received(&self, _bytes: usize) {}
    /// A stream was reset with this Error text.
    fn reset(&self, _text: &str) {}
    /// A configured limit refused something the peer sent: `limit` is the config field's
    /// name (`stream_receive_cap`, `session_receive_cap`, `max_streams`,
    /// `max_pending_connects`, `max_message_size`).
    fn limit_exceeded(&self, _limit: &'static str) {}
}

/// Observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl SessionObserver for NoObserver {}
