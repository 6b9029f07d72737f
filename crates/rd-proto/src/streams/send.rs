//! The send half of a stream: Data the application wrote that the websocket has not taken,
//! already encoded (the header is written at `write` time, so the transmit path hands out
//! `Bytes` without copying), bounded by the send buffer, the peer's Pause and, with the
//! credit extension, the credit the peer granted.

use std::collections::VecDeque;

use bytes::{BufMut, Bytes};

use crate::config::Config;
use crate::ids::ConnId;
use crate::message::{data_header_len, put_data_header, CREDIT_INITIAL_WINDOW};
use crate::outbox::Outbox;
use crate::pool::SendPool;

/// One encoded Data message and where its payload starts.
#[derive(Debug)]
struct Queued {
    message: Bytes,
    header_len: usize,
}

impl Queued {
    fn payload_len(&self) -> usize {
        self.message.len() - self.header_len
    }
}

#[derive(Debug)]
pub(crate) struct SendHalf {
    queue: VecDeque<Queued>,
    queued: usize,
    /// The peer sent Pause and no Resume since.
    paused_by_peer: bool,
    /// Bytes the peer still lets us send (credit extension); `None` with Pause/Resume peers.
    credit: Option<usize>,
    /// The application's writer is waiting for [`Event::StreamWritable`](crate::Event).
    writer_waiting: bool,
}

impl SendHalf {
    pub(crate) fn new(credit: bool) -> Self {
        Self {
            queue: VecDeque::new(),
            queued: 0,
            paused_by_peer: false,
            credit: credit.then_some(CREDIT_INITIAL_WINDOW as usize),
            writer_waiting: false,
        }
    }

    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// The application's writer waits for [`Event::StreamWritable`](crate::Event).
    pub(crate) fn wait(&mut self) {
        self.writer_waiting = true;
    }

    /// Whether a writer waits and now has room; if so it stops waiting (the caller emits
    /// [`Event::StreamWritable`](crate::Event)).
    pub(crate) fn take_writable(&mut self, config: &Config) -> bool {
        let writable = self.writer_waiting && self.room(config) > 0;
        if writable {
            self.writer_waiting = false;
        }
        writable
    }

    /// Bytes a write may still queue: the send buffer, and with credit no more than the
    /// credit left (but always one message of up to 32 KiB, the initial window), so a stream
    /// the peer does not read holds its data in the writer (a socket's kernel buffer, for a
    /// pipe) rather than in rd's memory. Larger messages (up to `max_data_payload`) are
    /// only queued when the credit covers them, so what a stalled stream holds does not
    /// grow with the message size.
    pub(crate) fn room(&self, config: &Config) -> usize {
        let limit = match self.credit {
            Some(credit) => config
                .stream_send_buffer
                .min(credit.max(config.max_data_payload.min(CREDIT_INITIAL_WINDOW as usize))),
            None => config.stream_send_buffer,
        };
        limit.saturating_sub(self.queued)
    }

    /// Credit the peer still grants us (`None` with Pause/Resume peers).
    pub(crate) fn credit(&self) -> Option<usize> {
        self.credit
    }

    pub(crate) fn paused_by_peer(&self) -> bool {
        self.paused_by_peer
    }

    /// Whether the peer's flow control holds this side back: its Pause, or no credit left.
    pub(crate) fn held_back(&self) -> bool {
        self.paused_by_peer || self.credit == Some(0)
    }

    pub(crate) fn set_paused_by_peer(&mut self, paused: bool) {
        self.paused_by_peer = paused;
    }

    pub(crate) fn add_credit(&mut self, increment: u32) {
        if let Some(credit) = &mut self.credit {
            *credit = credit.saturating_add(increment as usize);
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether Data may go out now. A released stream ignores the peer's Pause and credit:
    /// like Go's `Close`, which sends its Error whatever the pause state, it must get its EOF
    /// out (after at most a send buffer of Data the writer was already told was written), or
    /// two ends that paused each other never close.
    pub(crate) fn can_send(&self, released: bool) -> bool {
        released || (!self.paused_by_peer && self.credit != Some(0))
    }

    /// Queues `data` as Data messages of at most `max_payload` bytes, numbered by `out`, in
    /// buffers from `pool`.
    pub(crate) fn push(
        &mut self,
        id: ConnId,
        data: &[u8],
        max_payload: usize,
        out: &mut Outbox,
        pool: &mut SendPool,
    ) {
        for chunk in data.chunks(max_payload.max(1)) {
            let message = encode_data(id, chunk, out, pool);
            let header_len = message.len() - chunk.len();
            self.queue.push_back(Queued {
                message,
                header_len,
            });
        }
        self.queued += data.len();
    }

    /// The next Data message that may go out, cut to the credit left; the payload length
    /// comes with it.
    pub(crate) fn pop(
        &mut self,
        id: ConnId,
        released: bool,
        out: &mut Outbox,
        pool: &mut SendPool,
    ) -> Option<(Bytes, usize)> {
        if !self.can_send(released) {
            return None;
        }
        let front = self.queue.front_mut()?;
        let len = front.payload_len();
        let allowed = match self.credit {
            Some(credit) if !released => credit.min(len),
            _ => len,
        };
        let message = if allowed == len {
            self.queue.pop_front()?.message
        } else {
            // Rare: the credit left is smaller than the message. Send what it allows and
            // keep the rest as a message of its own (the only case that copies again).
            let payload = front.message.slice(front.header_len..);
            let message = encode_data(id, &payload[..allowed], out, pool);
            let rest = encode_data(id, &payload[allowed..], out, pool);
            *front = Queued {
                header_len: rest.len() - (len - allowed),
                message: rest,
            };
            message
        };
        if let Some(credit) = &mut self.credit {
            *credit = credit.saturating_sub(allowed);
        }
        self.queued -= allowed;
        Some((message, allowed))
    }

    /// Drops everything queued.
    pub(crate) fn clear(&mut self) {
        self.queue.clear();
        self.queued = 0;
        self.writer_waiting = false;
    }

    pub(crate) fn assert_invariants(&self) {
        if cfg!(debug_assertions) {
            debug_assert_eq!(
                self.queued,
                self.queue.iter().map(Queued::payload_len).sum::<usize>(),
                "queued count matches the messages"
            );
        }
    }
}

fn encode_data(id: ConnId, payload: &[u8], out: &mut Outbox, pool: &mut SendPool) -> Bytes {
    let message_id = out.message_id();
    let mut buf = pool.take(data_header_len(message_id, id) + payload.len());
    put_data_header(&mut buf, message_id, id);
    buf.put_slice(payload);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// With credit, 64 KiB messages go out only when the credit covers them; a stream out
    /// of credit may still queue no more than the 32 KiB it could before.
    #[test]
    fn large_messages_only_within_credit() {
        let config = Config::default();
        let id = ConnId(1);
        let mut next = Outbox::new(1);
        let mut send = SendHalf::new(true);
        let mut pool = SendPool::default();
        assert_eq!(send.room(&config), 32 * 1024, "the initial window");
        send.push(
            id,
            &[0u8; 32 * 1024],
            config.max_data_payload,
            &mut next,
            &mut pool,
        );
        assert_eq!(
            send.pop(id, false, &mut next, &mut pool).unwrap().1,
            32 * 1024
        );
        assert_eq!(
            send.room(&config),
            32 * 1024,
            "out of credit: one 32 KiB message"
        );
        send.add_credit(1 << 20);
        assert_eq!(send.room(&config), config.stream_send_buffer);
        send.push(
            id,
            &[0u8; 128 * 1024],
            config.max_data_payload,
            &mut next,
            &mut pool,
        );
        assert_eq!(
            send.pop(id, false, &mut next, &mut pool).unwrap().1,
            64 * 1024
        );
        assert_eq!(
            send.pop(id, false, &mut next, &mut pool).unwrap().1,
            64 * 1024
        );
        assert!(send.is_empty());
    }
}
