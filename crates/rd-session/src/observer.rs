//! A hook for metrics: what happens to a session's streams.

use rd_proto::{Limit, Target};

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
    /// A configured limit refused something the peer sent ([`Limit::name`] is a stable
    /// label for it).
    fn limit_exceeded(&self, _limit: Limit) {}
}

/// Observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoObserver;

impl SessionObserver for NoObserver {}
