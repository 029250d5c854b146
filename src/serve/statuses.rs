//! Statuses as the API reads them, with final ones kept in memory.
//!
//! A poll of a finished event is the most common request a spool answers
//! (wait pages, scripts, dashboards), and its answer never changes: a final
//! status is never rewritten. So a final status is kept here, with its JSON
//! encoded once, and a poll that finds it costs one `stat` of `status.json`
//! instead of an open, a read, a parse and an encode. The `stat` is what
//! keeps the cache honest: the entry is used only while the file is the very
//! one it was read from (inode, size, mtime and ctime), so a status rewritten
//! by hand, or by a host that took the event over, is read again, and an
//! event deleted by retention is gone at once.
//!
//! Statuses still moving (queued, running) are read from disk every time:
//! another host may write them, and the hub serves those who want changes.
//! At most [`CAPACITY`] statuses of at most [`LARGEST`] bytes are kept;
//! when full, one is dropped.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};

pub use crate::hub::StatusView;
use crate::spool::ids::EventId;
use crate::spool::{self, Spool};

/// The most final statuses kept.
pub const CAPACITY: usize = 4096;

/// Statuses whose JSON is longer are not kept (a handler's `data` can make
/// a status up to 64 KB): most are well under 1 KB, so the cache stays
/// under about 20 MB.
pub const LARGEST: usize = 2048;

/// Which file an entry was read from.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Default)]
pub struct Statuses {
    finals: Mutex<HashMap<EventId, (Stamp, Arc<StatusView>)>>,
}

impl Statuses {
    /// The status of `id` as it is on disk now; None when there is no such
    /// event. Blocking (a `stat`, and a read on a miss), like the reads it
    /// replaces: status files are small and local or on a mount the
    /// operator chose.
    ///
    /// `shared`: other hosts write this spool (NFS). A `stat` there may
    /// answer from the client's attribute cache, so the stamp is taken from
    /// an `open` (which revalidates, close-to-open) and `fstat` instead.
    pub fn load(
        &self,
        spool: &Spool,
        id: &EventId,
        shared: bool,
    ) -> spool::Result<Option<Arc<StatusView>>> {
        let path = spool.event_dir(id).join("status.json");
        let meta = if shared {
            spool::open_regular(&path).and_then(|f| f.metadata())
        } else {
            std::fs::symlink_metadata(&path)
        };
        let stamp = meta.ok().filter(|m| m.is_file()).map(|m| Stamp::of(&m));
        if let Some(stamp) = stamp {
            let finals = self.finals.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((seen, view)) = finals.get(id) {
                if *seen == stamp {
                    return Ok(Some(Arc::clone(view)));
                }
            }
        }
        let Some(status) = spool.read_status(id)? else {
            self.forget(id);
            return Ok(None);
        };
        let view = Arc::new(StatusView::from(status));
        // The read came after the stat, so it saw that file or a newer one;
        // a final status has no newer one. Worst case an entry is stamped
        // with an older file's stamp and is read again once.
        match stamp {
            Some(stamp) if view.status.state.is_terminal() && view.json().len() <= LARGEST => {
                let mut finals = self.finals.lock().unwrap_or_else(|e| e.into_inner());
                if finals.len() >= CAPACITY {
                    if let Some(old) = finals.keys().next().cloned() {
                        finals.remove(&old);
                    }
                }
                finals.insert(id.clone(), (stamp, Arc::clone(&view)));
            }
            _ => self.forget(id),
        }
        Ok(Some(view))
    }

    fn forget(&self, id: &EventId) {
        let mut finals = self.finals.lock().unwrap_or_else(|e| e.into_inner());
        finals.remove(id);
    }
}
