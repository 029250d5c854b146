//! In-memory fan-out of status changes to long-polls and SSE streams.
//!
//! One `watch` channel per event that someone is following, created on the
//! first subscription and dropped with the last. Whoever writes a status
//! (the dispatcher) publishes it here right after the write, so followers wake
//! at once and never read the disk per change. A `watch` keeps only the newest
//! value: a slow subscriber skips intermediate statuses and always gets the
//! latest one; it never builds a backlog and never slows anyone else down.
//!
//! Changes written by another host are not published here by anyone; in
//! shared mode `app` re-reads the followed events' statuses on an interval
//! ([`Hub::followed`]) and publishes what moved on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use tokio::sync::watch;

use crate::spool::ids::EventId;
use crate::spool::records::Status;

#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<EventId, watch::Sender<Arc<StatusView>>>>,
}

/// A status and its encodings, each made once however many read it: the
/// JSON that polls send, and the SSE frames every subscriber sends.
pub struct StatusView {
    pub status: Status,
    json: OnceLock<Bytes>,
    frames: [OnceLock<Bytes>; 2],
}

/// The SSE event a status is sent as (see `serve::sse`).
#[derive(Clone, Copy)]
pub enum Frame {
    Status = 0,
    End = 1,
}

impl From<Status> for StatusView {
    fn from(status: Status) -> StatusView {
        StatusView {
            status,
            json: OnceLock::new(),
            frames: Default::default(),
        }
    }
}

impl std::ops::Deref for StatusView {
    type Target = Status;

    fn deref(&self) -> &Status {
        &self.status
    }
}

impl StatusView {
    /// The JSON body of `GET /events/{id}`.
    pub fn json(&self) -> Bytes {
        self.json
            .get_or_init(|| Bytes::from(self.status.to_json()))
            .clone()
    }

    /// The SSE frame of this status as `frame`, made by `encode`.
    pub fn frame(&self, frame: Frame, encode: impl FnOnce(&[u8]) -> String) -> Bytes {
        self.frames[frame as usize]
            .get_or_init(|| Bytes::from(encode(&self.json())))
            .clone()
    }
}

/// A live view of one event's status. Dropping it unsubscribes.
pub struct Subscription {
    pub rx: watch::Receiver<Arc<StatusView>>,
    hub: Arc<Hub>,
    id: EventId,
}

impl Hub {
    /// Hands a newly written status to everyone following its event.
    pub fn publish(&self, status: &Status) {
        let Ok(id) = EventId::parse(&status.id) else {
            return;
        };
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = channels.get(&id) {
            offer(tx, status);
        }
    }

    /// Follows an event. `load` reads its status from disk; it is called twice
    /// (before and after joining) so that a write landing in between is not missed.
    pub fn subscribe<F>(self: &Arc<Hub>, id: &EventId, load: F) -> Option<Subscription>
    where
        F: Fn() -> Option<Status>,
    {
        let first = load()?;
        let rx = {
            let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
            match channels.get(id) {
                Some(tx) => {
                    offer(tx, &first);
                    tx.subscribe()
                }
                None => {
                    let (tx, rx) = watch::channel(Arc::new(StatusView::from(first)));
                    channels.insert(id.clone(), tx);
                    rx
                }
            }
        };
        let sub = Subscription {
            rx,
            hub: Arc::clone(self),
            id: id.clone(),
        };
        if let Some(again) = load() {
            self.publish(&again);
        }
        Some(sub)
    }

    /// Events someone is following right now.
    pub fn followed(&self) -> Vec<(EventId, u64)> {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels
            .iter()
            .map(|(id, tx)| (id.clone(), tx.borrow().seq))
            .collect()
    }
}

/// Replaces the channel's value when `status` is newer.
fn offer(tx: &watch::Sender<Arc<StatusView>>, status: &Status) {
    tx.send_if_modified(|current| {
        if status.seq > current.seq {
            *current = Arc::new(StatusView::from(status.clone()));
            true
        } else {
            false
        }
    });
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut channels = self.hub.channels.lock().unwrap_or_else(|e| e.into_inner());
        // Our own receiver is still alive here, hence "1".
        if channels
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            channels.remove(&self.id);
        }
    }
}
