//! The receive half of a stream: bytes the peer sent that the application has not read yet.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use crate::config::Config;
use crate::flow::{FlowSignal, Overflow, PauseFlow, Pressure, RecvFlow};

/// What a receive half holds against the session's budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Held {
    /// Received and not yet read.
    pub(crate) unread: usize,
    /// Unread plus credit the peer may still use (equals `unread` in Pause mode).
    pub(crate) committed: usize,
}

#[derive(Debug)]
pub(crate) struct RecvHalf {
    chunks: VecDeque<Bytes>,
    unread: usize,
    flow: RecvFlow,
    /// The application's reader is waiting for [`Event::StreamReadable`](crate::Event).
    reader_waiting: bool,
}

impl RecvHalf {
    pub(crate) fn new(config: &Config) -> Self {
        Self {
            chunks: VecDeque::new(),
            unread: 0,
            flow: RecvFlow::new(config),
            reader_waiting: false,
        }
    }

    pub(crate) fn held(&self) -> Held {
        Held {
            unread: self.unread,
            committed: self.unread.saturating_add(self.flow.credit()),
        }
    }

    /// Whether flow control holds the peer back: our Pause is outstanding, or the peer has
    /// used all its credit.
    pub(crate) fn holding_back(&self) -> bool {
        match &self.flow {
            RecvFlow::Pause(p) => p.pause_sent(),
            RecvFlow::Credit(c) => c.credit() == 0,
        }
    }

    /// The credit window (`None` in Pause mode).
    pub(crate) fn window(&self) -> Option<usize> {
        match &self.flow {
            RecvFlow::Pause(_) => None,
            RecvFlow::Credit(c) => Some(c.window()),
        }
    }

    /// Credit granted to the peer and not yet used (0 in Pause mode).
    pub(crate) fn credit(&self) -> usize {
        self.flow.credit()
    }

    pub(crate) fn since_pause(&self) -> usize {
        self.flow.since_pause()
    }

    /// Takes a payload; returns whether the reader was waiting for it, and the signal for
    /// the peer.
    pub(crate) fn on_data(
        &mut self,
        payload: Bytes,
        now: Instant,
        pressure: Pressure,
        config: &Config,
    ) -> Result<(bool, Option<FlowSignal>), Overflow> {
        let n = payload.len();
        let signal = self.flow.on_data(n, self.unread, now, pressure, config)?;
        self.unread += n;
        if n > 0 {
            self.chunks.push_back(payload);
        }
        let woke = std::mem::take(&mut self.reader_waiting);
        self.assert_invariants(config);
        Ok((woke, signal))
    }

    /// Takes up to `max` unread bytes (`None` when there are none: the reader is now
    /// waiting), and the signal for the peer.
    pub(crate) fn read(
        &mut self,
        max: usize,
        pressure: Pressure,
        config: &Config,
    ) -> Option<(Bytes, Option<FlowSignal>)> {
        let Some(front) = self.chunks.front_mut() else {
            self.reader_waiting = true;
            self.flow.on_starved();
            return None;
        };
        let chunk = if front.len() <= max {
            self.chunks.pop_front().unwrap_or_default()
        } else {
            front.split_to(max)
        };
        let n = chunk.len();
        self.unread = self.unread.checked_sub(n).unwrap_or_else(|| {
            debug_assert!(false, "read more than unread");
            0
        });
        let signal = self.flow.on_consumed(n, self.unread, pressure, config);
        self.assert_invariants(config);
        Some((chunk, signal))
    }

    /// Drops every unread byte and all flow state: nobody will read them.
    /// No credit is held for it either: a peer that still sends is answered by the stream's
    /// end, not by flow control.
    pub(crate) fn discard(&mut self) {
        self.chunks.clear();
        self.unread = 0;
        self.flow = RecvFlow::Pause(PauseFlow::default());
        self.reader_waiting = false;
    }

    /// The stream left the wire: the peer can use no more credit.
    pub(crate) fn void_credit(&mut self) {
        if let RecvFlow::Credit(_) = self.flow {
            self.flow = RecvFlow::Pause(PauseFlow::default());
        }
    }

    pub(crate) fn stop_waiting(&mut self) {
        self.reader_waiting = false;
    }

    /// Whether the reader was waiting; it no longer is.
    pub(crate) fn take_waiting(&mut self) -> bool {
        std::mem::take(&mut self.reader_waiting)
    }

    fn assert_invariants(&self, config: &Config) {
        if cfg!(debug_assertions) {
            debug_assert_eq!(
                self.unread,
                self.chunks.iter().map(Bytes::len).sum::<usize>(),
                "unread count matches the chunks"
            );
            self.flow.assert_invariants(self.unread, config);
        }
    }
}
