//! The receive half of a stream: bytes the peer sent that the application has not read yet
//! (slices of the received websocket messages, never copied), and their flow control:
//! Pause/Resume with Go peers ([`PauseFlow`]), credit with rd peers that negotiated it
//! ([`CreditWindow`]).

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use crate::config::Config;

use super::budget::{Held, Pressure};
use super::credit::CreditWindow;
use super::pause::PauseFlow;

/// What the receiver must tell the peer after a change in buffered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FlowSignal {
    /// Send Pause for this stream.
    Pause,
    /// Send Resume for this stream.
    Resume,
    /// Grant this many more bytes (credit extension).
    Credit(u32),
}

/// Data arrived beyond what the stream may hold: the peer ignores flow control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Overflow {
    /// Unread bytes the stream would hold.
    pub(crate) buffered: usize,
    /// What it may hold.
    pub(crate) cap: usize,
}

/// Receive flow control of one stream.
#[derive(Debug, Clone, PartialEq, Eq)]
enum RecvFlow {
    /// Go's Pause/Resume, with adaptive marks.
    Pause(PauseFlow),
    /// rd's credit extension.
    Credit(CreditWindow),
    /// None any more: nobody reads the stream, or the peer can send nothing more on it.
    Off,
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
            flow: if config.credit {
                RecvFlow::Credit(CreditWindow::default())
            } else {
                RecvFlow::Pause(PauseFlow::default())
            },
            reader_waiting: false,
        }
    }

    /// What this half holds against the session's budget.
    pub(crate) fn held(&self) -> Held {
        let (credit, grown) = match &self.flow {
            RecvFlow::Credit(c) => (c.credit(), usize::from(c.grown())),
            RecvFlow::Pause(_) | RecvFlow::Off => (0, 0),
        };
        Held {
            unread: self.unread,
            committed: self.unread.saturating_add(credit),
            grown,
        }
    }

    /// Whether flow control holds the peer back: our Pause is outstanding, or the peer has
    /// used all its credit.
    pub(crate) fn holding_back(&self) -> bool {
        match &self.flow {
            RecvFlow::Pause(p) => p.pause_sent(),
            RecvFlow::Credit(c) => c.credit() == 0,
            RecvFlow::Off => false,
        }
    }

    /// The credit window we aim to keep granted (`None` with Pause/Resume, and once the
    /// credit is void).
    pub(crate) fn window(&self) -> Option<usize> {
        match &self.flow {
            RecvFlow::Credit(c) => Some(c.window()),
            RecvFlow::Pause(_) | RecvFlow::Off => None,
        }
    }

    /// Credit granted to the peer and not yet used (`None` whenever
    /// [`window`](Self::window) is).
    pub(crate) fn credit(&self) -> Option<usize> {
        match &self.flow {
            RecvFlow::Credit(c) => Some(c.credit()),
            RecvFlow::Pause(_) | RecvFlow::Off => None,
        }
    }

    /// Bytes received since our outstanding Pause was queued (always 0 with credit).
    pub(crate) fn since_pause(&self) -> usize {
        match &self.flow {
            RecvFlow::Pause(p) => p.since_pause(),
            RecvFlow::Credit(_) | RecvFlow::Off => 0,
        }
    }

    /// Takes a payload; returns whether the reader was waiting for it, and the signal for
    /// the peer. Beyond the stream's hard cap, or (credit) beyond the credit granted, the
    /// bytes are refused and nothing changes.
    pub(crate) fn on_data(
        &mut self,
        payload: Bytes,
        now: Instant,
        pressure: Pressure,
        config: &Config,
    ) -> Result<(bool, Option<FlowSignal>), Overflow> {
        let n = payload.len();
        let buffered = self.unread.saturating_add(n);
        if buffered > config.stream_receive_cap {
            return Err(Overflow {
                buffered,
                cap: config.stream_receive_cap,
            });
        }
        let signal = match &mut self.flow {
            RecvFlow::Pause(p) => p
                .on_data(n, buffered, now, pressure, config)
                .then_some(FlowSignal::Pause),
            RecvFlow::Credit(c) => {
                // Beyond the credit only by a released sender's last bytes (at most a send
                // buffer: it may send its queued data and EOF whatever the credit).
                let slack = config.stream_send_buffer;
                if !c.on_data(n, self.reader_waiting, slack, pressure) {
                    return Err(Overflow {
                        buffered,
                        cap: self.unread + c.credit() + slack,
                    });
                }
                None
            }
            RecvFlow::Off => None,
        };
        self.unread = buffered;
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
        let signal = match &mut self.flow {
            RecvFlow::Pause(p) => p.on_consumed(n, self.unread).then_some(FlowSignal::Resume),
            RecvFlow::Credit(c) => c
                .on_consumed(n, self.unread, pressure, config)
                .map(FlowSignal::Credit),
            RecvFlow::Off => None,
        };
        self.assert_invariants(config);
        Some((chunk, signal))
    }

    /// Drops every unread byte and all flow state: nobody will read them. No credit is held
    /// for it either: a peer that still sends is answered by the stream's end, not by flow
    /// control.
    pub(crate) fn discard(&mut self) {
        self.chunks.clear();
        self.unread = 0;
        self.flow = RecvFlow::Off;
        self.reader_waiting = false;
    }

    /// The peer can send nothing more (its Fin, or the stream left the wire): the credit
    /// granted to it is void. Unread bytes stay for the application's last reads.
    pub(crate) fn void_credit(&mut self) {
        if let RecvFlow::Credit(_) = self.flow {
            self.flow = RecvFlow::Off;
        }
    }

    pub(crate) fn stop_waiting(&mut self) {
        self.reader_waiting = false;
    }

    /// Whether the reader was waiting; it no longer is.
    pub(crate) fn take_waiting(&mut self) -> bool {
        std::mem::take(&mut self.reader_waiting)
    }

    pub(crate) fn assert_invariants(&self, config: &Config) {
        if cfg!(debug_assertions) {
            debug_assert_eq!(
                self.unread,
                self.chunks.iter().map(Bytes::len).sum::<usize>(),
                "unread count matches the chunks"
            );
            debug_assert!(
                self.unread <= config.stream_receive_cap,
                "buffered over the hard cap"
            );
            if let RecvFlow::Credit(c) = &self.flow {
                c.assert_invariants(config);
            }
        }
    }
}
