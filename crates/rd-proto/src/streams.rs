//! The stream table: streams by id, the queue of streams with something to send, and id
//! allocation.

use std::collections::{HashMap, VecDeque};

use crate::message::ConnId;
use crate::session::Side;
use crate::stream::Stream;

#[derive(Debug)]
pub(crate) struct Streams {
    map: HashMap<ConnId, Stream>,
    /// Streams with output, each at most once (its `scheduled` flag), served round-robin.
    ready: VecDeque<ConnId>,
    last_id: i64,
}

impl Streams {
    pub(crate) fn new(side: Side) -> Self {
        Self {
            map: HashMap::new(),
            ready: VecDeque::new(),
            // Go's client numbers its connections from 1, its server from 2.
            last_id: if side == Side::Client { 0 } else { 1 },
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn get(&self, id: ConnId) -> Option<&Stream> {
        self.map.get(&id)
    }

    pub(crate) fn get_mut(&mut self, id: ConnId) -> Option<&mut Stream> {
        self.map.get_mut(&id)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&ConnId, &Stream)> {
        self.map.iter()
    }

    pub(crate) fn ids(&self) -> Vec<ConnId> {
        self.map.keys().copied().collect()
    }

    /// The next free id after the last one handed out, skipping live ones.
    pub(crate) fn allocate_id(&mut self) -> ConnId {
        loop {
            self.last_id = self.last_id.checked_add(1).unwrap_or(1);
            let id = ConnId(self.last_id);
            if !self.map.contains_key(&id) {
                return id;
            }
        }
    }

    pub(crate) fn insert(&mut self, id: ConnId, stream: Stream) {
        self.map.insert(id, stream);
    }

    pub(crate) fn remove(&mut self, id: ConnId) -> Option<Stream> {
        self.map.remove(&id)
    }

    /// Puts the stream in the ready queue if it has output and is not there yet. Every
    /// change that can give a stream output ends with this call.
    pub(crate) fn schedule(&mut self, id: ConnId) {
        if let Some(s) = self.map.get_mut(&id) {
            if !s.scheduled && s.has_output() {
                s.scheduled = true;
                self.ready.push_back(id);
            }
        }
    }

    /// Whether any stream waits in the ready queue.
    pub(crate) fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// The next stream in turn, taken off the ready queue (its `scheduled` flag cleared).
    pub(crate) fn next_ready(&mut self) -> Option<ConnId> {
        let id = self.ready.pop_front()?;
        if let Some(s) = self.map.get_mut(&id) {
            s.scheduled = false;
        }
        Some(id)
    }

    pub(crate) fn clear_ready(&mut self) {
        for id in self.ready.drain(..) {
            if let Some(s) = self.map.get_mut(&id) {
                s.scheduled = false;
            }
        }
    }
}
