//! Retention: finished events are deleted after a while.
//!
//! A sweep lists `events/` (the only place anything does; it is not on any
//! request's path) and, because IDs sort by creation time, only looks at IDs
//! older than the retention period. An event is deleted when its status is
//! final and it finished before the cutoff; its dead letter goes with it.
//! Idempotency keys older than the retention period are deleted first, so a key
//! never outlives the check that it names a live event.
//!
//! Deletes are gentle: at most `max_deletes` per sweep, because deleting tens
//! of thousands of directories at once makes ext4 slow to create files for a
//! minute or two, which would stall submits.

use std::fs;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use walkdir::WalkDir;

use super::ids::EventId;
use super::{is_gone, IoContext, Result, Spool};

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub events_deleted: usize,
    pub keys_deleted: usize,
    /// True when the sweep stopped at `max_deletes` with more to delete.
    pub more: bool,
}

impl Spool {
    pub fn sweep(&self, retention: Duration, max_deletes: usize) -> Result<Swept> {
        let cutoff = SystemTime::now() - retention;
        let mut swept = Swept {
            keys_deleted: self.sweep_keys(cutoff, max_deletes)?,
            ..Swept::default()
        };
        let cutoff_ms = cutoff
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let events = self.dir("events");
        // Only IDs older than the cutoff are candidates (an ID holds its
        // creation time). They are picked while listing, and only they are
        // sorted, oldest first: sorting all of a million-event spool on
        // every sweep was most of an idle spoold's CPU (found by the scale
        // benchmark).
        let mut old: Vec<EventId> = WalkDir::new(&events)
            .min_depth(1)
            .max_depth(1)
            .into_iter()
            .filter_map(|e| EventId::parse(e.ok()?.file_name().to_str()?).ok())
            .filter(|id| id.timestamp_ms() < cutoff_ms)
            .collect();
        old.sort_unstable();
        for id in old {
            if swept.events_deleted + swept.keys_deleted >= max_deletes {
                swept.more = true;
                break;
            }
            let finished_before_cutoff = match self.read_status(&id) {
                Ok(Some(s)) => {
                    s.state.is_terminal() && s.finished_at.is_some_and(|t| t.system_time() < cutoff)
                }
                _ => false,
            };
            if finished_before_cutoff {
                self.delete_event(&id)?;
                swept.events_deleted += 1;
            }
        }
        Ok(swept)
    }

    fn delete_event(&self, id: &EventId) -> Result<()> {
        let dir = self.event_dir(id);
        match fs::remove_dir_all(&dir) {
            Ok(()) => {}
            Err(e) if is_gone(&e) => {}
            Err(e) => return Err(e).at("delete", &dir),
        }
        let _ = fs::remove_file(self.dead_path(id));
        Ok(())
    }

    fn sweep_keys(&self, cutoff: SystemTime, max_deletes: usize) -> Result<usize> {
        let dir = self.dir("idem");
        let mut deleted = 0;
        for entry in fs::read_dir(&dir).at("list", &dir)? {
            if deleted >= max_deletes {
                break;
            }
            let Ok(entry) = entry else { continue };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t < cutoff);
            if old && fs::remove_file(entry.path()).is_ok() {
                deleted += 1;
            }
        }
        Ok(deleted)
    }
}
