//! The queue entries a dispatcher knows of: the due ones per type in ID order
//! (FIFO, since IDs are time-ordered), and the delayed ones (retries waiting
//! out their backoff) by not-before time. Picking the next event to start
//! looks at the head of each type's line only, so its cost grows with the
//! number of types, not with the length of the queue.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::spool::ids::EventId;
use crate::spool::records::QueueEntry;

#[derive(Default)]
pub struct Pending {
    /// Due entries, per type.
    ready: HashMap<String, BTreeSet<EventId>>,
    /// Delayed entries: (not-before ms, ID) → type.
    delayed: BTreeMap<(u64, EventId), String>,
    /// Every known ID → (type, not-before if delayed).
    index: HashMap<EventId, (String, Option<u64>)>,
}

impl Pending {
    pub fn insert(&mut self, id: EventId, entry: QueueEntry) {
        self.remove(&id);
        match entry.not_before_ms {
            Some(t) => {
                self.delayed.insert((t, id.clone()), entry.kind.clone());
            }
            None => {
                self.ready
                    .entry(entry.kind.clone())
                    .or_default()
                    .insert(id.clone());
            }
        }
        self.index.insert(id, (entry.kind, entry.not_before_ms));
    }

    pub fn remove(&mut self, id: &EventId) {
        let Some((kind, not_before)) = self.index.remove(id) else {
            return;
        };
        match not_before {
            Some(t) => {
                self.delayed.remove(&(t, id.clone()));
            }
            None => {
                if let Some(line) = self.ready.get_mut(&kind) {
                    line.remove(id);
                    if line.is_empty() {
                        self.ready.remove(&kind);
                    }
                }
            }
        }
    }

    pub fn contains(&self, id: &EventId) -> bool {
        self.index.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Keeps only the entries for which `keep` is true.
    pub fn retain(&mut self, keep: impl Fn(&EventId) -> bool) {
        let gone: Vec<EventId> = self.index.keys().filter(|id| !keep(id)).cloned().collect();
        for id in gone {
            self.remove(&id);
        }
    }

    /// Moves delayed entries whose time has come to the due ones.
    pub fn promote(&mut self, now_ms: u64) {
        while let Some(entry) = self.delayed.first_entry() {
            if entry.key().0 > now_ms {
                break;
            }
            let ((_, id), kind) = entry.remove_entry();
            self.insert(
                id,
                QueueEntry {
                    kind,
                    not_before_ms: None,
                },
            );
        }
    }

    /// When the earliest delayed entry falls due (ms since the epoch).
    pub fn next_due_ms(&self) -> Option<u64> {
        self.delayed.keys().next().map(|(t, _)| *t)
    }

    /// The oldest due entry among the types for which `has_room` says yes.
    pub fn next_ready(&self, mut has_room: impl FnMut(&str) -> bool) -> Option<(EventId, String)> {
        self.ready
            .iter()
            .filter_map(|(kind, line)| Some((line.first()?, kind)))
            .filter(|(_, kind)| has_room(kind))
            .min_by(|a, b| a.0.cmp(b.0))
            .map(|(id, kind)| (id.clone(), kind.clone()))
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
        p.insert(b.clone(), entry("x", Some(100)));
        assert_eq!(p.next_due_ms(), Some(100));
        p.promote(150);
        assert_eq!(
            p.next_ready(|_| true).unwrap().0,
            b,
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

    #[test]
    fn a_type_without_room_does_not_hide_the_others() {
        let mut p = Pending::default();
        let ids: Vec<EventId> = (0..1000).map(|_| EventId::generate()).collect();
        for id in &ids {
            p.insert(id.clone(), entry("busy", None));
        }
        let late = EventId::generate();
        p.insert(late.clone(), entry("free", None));
        assert_eq!(p.next_ready(|k| k != "busy"), Some((late, "free".into())));
        assert_eq!(p.next_ready(|_| true).unwrap().0, ids[0]);
    }
}
