//! The queue entries a dispatcher knows of: the due ones in ID order (FIFO,
//! since IDs are time-ordered), and the delayed ones (retries waiting out
//! their backoff) by not-before time. Picking the next event to start looks
//! only at the front of the due ones, so its cost does not grow with the
//! length of the queue.

use std::collections::{BTreeMap, HashMap};

use crate::spool::ids::EventId;
use crate::spool::records::QueueEntry;

#[derive(Default)]
pub struct Pending {
    /// Due entries: ID → type.
    ready: BTreeMap<EventId, String>,
    /// Delayed entries: (not-before ms, ID) → type.
    delayed: BTreeMap<(u64, EventId), String>,
    /// Delayed ID → its not-before, to find it for removal.
    when: HashMap<EventId, u64>,
}

impl Pending {
    pub fn insert(&mut self, id: EventId, entry: QueueEntry) {
        self.remove(&id);
        match entry.not_before_ms {
            Some(t) => {
                self.when.insert(id.clone(), t);
                self.delayed.insert((t, id), entry.kind);
            }
            None => {
                self.ready.insert(id, entry.kind);
            }
        }
    }

    pub fn remove(&mut self, id: &EventId) {
        if self.ready.remove(id).is_none() {
            if let Some(t) = self.when.remove(id) {
                self.delayed.remove(&(t, id.clone()));
            }
        }
    }

    pub fn contains(&self, id: &EventId) -> bool {
        self.ready.contains_key(id) || self.when.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.ready.len() + self.delayed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, keep: impl Fn(&EventId) -> bool) {
        self.ready.retain(|id, _| keep(id));
        self.delayed.retain(|(_, id), _| keep(id));
        self.when.retain(|id, _| keep(id));
    }

    /// Moves delayed entries whose time has come to the due ones.
    pub fn promote(&mut self, now_ms: u64) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let ((_, id), kind) = entry.remove_entry();
            self.when.remove(&id);
            self.ready.insert(id, kind);
        }
    }

    /// When the earliest delayed entry falls due (ms since the epoch).
    pub fn next_due_ms(&self) -> Option<u64> {
        self.delayed.keys().next().map(|(t, _)| *t)
    }

    /// Due entries, oldest first.
    pub fn ready(&self) -> impl Iterator<Item = (&EventId, &str)> {
        self.ready.iter().map(|(id, kind)| (id, kind.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: &str, not_before_ms: Option<u64>) -> QueueEntry {
        QueueEntry {
            kind: kind.into(),
            not_before_ms,
        }
    }

    #[test]
    fn delayed_entries_become_ready_in_time_and_order() {
        let mut p = Pending::default();
        let (a, b, c) = (
            EventId::generate(),
            EventId::generate(),
            EventId::generate(),
        );
        p.insert(c.clone(), entry("x", None));
        p.insert(a.clone(), entry("x", Some(200)));
        p.insert(b.clone(), entry("y", Some(100)));
        assert_eq!(p.next_due_ms(), Some(100));
        p.promote(150);
        let ready: Vec<_> = p.ready().map(|(id, _)| id.clone()).collect();
        assert_eq!(
            ready,
            vec![b.clone(), c.clone()],
            "FIFO by ID among due ones"
        );
        p.insert(a.clone(), entry("x", None));
        assert_eq!(
            p.next_due_ms(),
            None,
            "re-inserting replaces the delayed entry"
        );
        p.remove(&b);
        p.retain(|id| id != &c);
        assert_eq!(p.len(), 1);
        assert!(p.contains(&a) && !p.contains(&b));
    }
}
