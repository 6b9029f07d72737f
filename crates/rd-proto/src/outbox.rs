//! What a session has to say, in the order it must be said: control messages (Connect,
//! Error, Pause, Resume, Credit, SyncConnections, announcements) first in, first out, events
//! for the application, and the counter that numbers every message the session sends.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::event::Event;
use crate::message::Message;

/// Something the websocket must send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transmit {
    /// One binary websocket message holding one encoded remotedialer message.
    Message(Bytes),
    /// A websocket ping with an empty payload.
    Ping,
}

/// Control messages and events waiting for [`Session::poll_transmit`] and
/// [`Session::poll_event`].
///
/// [`Session::poll_transmit`]: crate::Session::poll_transmit
/// [`Session::poll_event`]: crate::Session::poll_event
#[derive(Debug)]
pub(crate) struct Outbox {
    control: VecDeque<Bytes>,
    events: VecDeque<Event>,
    next_message_id: i64,
    /// The session ended: no further control message is queued.
    closed: bool,
}

impl Outbox {
    /// `first_message_id` seeds the informational message counter (Go starts it at a
    /// random 63-bit value).
    pub(crate) fn new(first_message_id: i64) -> Self {
        Self {
            control: VecDeque::new(),
            events: VecDeque::new(),
            next_message_id: first_message_id,
            closed: false,
        }
    }

    /// The id of the next message sent, control or Data.
    pub(crate) fn message_id(&mut self) -> i64 {
        let id = self.next_message_id;
        self.next_message_id = id.wrapping_add(1);
        id
    }

    /// Queues a control message, unless the session has ended.
    pub(crate) fn send(&mut self, msg: &Message) {
        if self.closed {
            return;
        }
        let id = self.message_id();
        self.control.push_back(msg.to_bytes(id));
    }

    pub(crate) fn event(&mut self, event: Event) {
        self.events.push_back(event);
    }

    /// The session ended: what is queued still goes out, nothing more is queued.
    pub(crate) fn close(&mut self) {
        self.closed = true;
    }

    pub(crate) fn pop_control(&mut self) -> Option<Bytes> {
        self.control.pop_front()
    }

    pub(crate) fn pop_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub(crate) fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    pub(crate) fn queued_control(&self) -> usize {
        self.control.len()
    }
}
