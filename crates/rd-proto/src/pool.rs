//! Buffers of sent Data messages, handed back by the runtime for the next messages.
//!
//! Every Data message is encoded into a fresh buffer on the thread that writes the stream
//! and freed on the thread that writes the websocket. With glibc's allocator that churn
//! hands the pages back to the kernel and faults fresh zeroed ones in again every few
//! messages: about a tenth of rd-client's CPU in bulk transfers (docs/benchmarks.md). The
//! runtime returns each buffer once its frame is written ([`Session::recycle`]) and the
//! next message is encoded into it, so a busy session keeps reusing a few buffers.
//!
//! A session that stops sending must not keep them: [`Session::trim_buffers`], which the
//! runtime calls every few seconds (on keepalive traffic), frees them unless a message
//! was encoded since the last call.
//!
//! [`Session::recycle`]: crate::Session::recycle
//! [`Session::trim_buffers`]: crate::Session::trim_buffers

use bytes::BytesMut;

/// Most buffers kept: the messages one busy stream has in flight between two turns of
/// the runtime (its 256 KiB send buffer in 32 KiB messages), and then some.
const MAX_BUFFERS: usize = 16;

/// Buffers outside this range of capacities are not kept: smaller ones would not fit a
/// full message, larger ones were not made by the pool.
const MIN_CAPACITY: usize = 1024;
const MAX_CAPACITY: usize = 128 * 1024;

#[derive(Debug, Default)]
pub(crate) struct SendPool {
    buffers: Vec<BytesMut>,
    /// A buffer was taken since the last [`trim`](Self::trim).
    used: bool,
}

impl SendPool {
    /// An empty buffer with room for `capacity` bytes: a returned one if it is large
    /// enough, else a new one.
    pub(crate) fn take(&mut self, capacity: usize) -> BytesMut {
        self.used = true;
        match self.buffers.pop() {
            Some(buf) if buf.capacity() >= capacity => buf,
            // Too small for this message (a larger max_data_payload, say): let it go.
            _ => BytesMut::with_capacity(capacity),
        }
    }

    /// Keeps `buf` for a later message (emptied), if there is room and it is pool-sized.
    pub(crate) fn give(&mut self, mut buf: BytesMut) {
        let cap = buf.capacity();
        if self.buffers.len() < MAX_BUFFERS && (MIN_CAPACITY..=MAX_CAPACITY).contains(&cap) {
            buf.clear();
            self.buffers.push(buf);
        }
    }

    /// Frees every kept buffer unless one was taken since the last call.
    pub(crate) fn trim(&mut self) {
        if !self.used {
            self.buffers = Vec::new();
        }
        self.used = false;
    }

    /// Buffers kept right now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.buffers.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_returned_buffers_and_frees_them_when_idle() {
        let mut pool = SendPool::default();
        let mut a = pool.take(33_000);
        a.extend_from_slice(&[1; 100]);
        let addr = a.as_ptr();
        pool.give(a);
        assert_eq!(pool.len(), 1);
        let b = pool.take(33_000);
        assert_eq!(b.as_ptr(), addr, "the same allocation");
        assert!(b.is_empty());
        pool.give(b);
        pool.trim(); // used since the last trim: kept
        assert_eq!(pool.len(), 1);
        pool.trim(); // idle for a whole period: freed
        assert_eq!(pool.len(), 0);
    }

    #[test]
    fn keeps_a_bounded_number_of_pool_sized_buffers() {
        let mut pool = SendPool::default();
        pool.give(BytesMut::with_capacity(16));
        pool.give(BytesMut::with_capacity(1 << 20));
        assert_eq!(pool.len(), 0);
        for _ in 0..2 * MAX_BUFFERS {
            pool.give(BytesMut::with_capacity(40_000));
        }
        assert_eq!(pool.len(), MAX_BUFFERS);
        // A buffer too small for the message asked for is dropped, not handed out.
        let mut pool = SendPool::default();
        pool.give(BytesMut::with_capacity(2_000));
        assert!(pool.take(40_000).capacity() >= 40_000);
        assert_eq!(pool.len(), 0);
    }
}
