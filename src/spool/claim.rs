//! Claims and leases: who runs an event.
//!
//! A claim is `rename(queue/<id>, running/<host>/<id>)`. rename is atomic on
//! every POSIX filesystem and on NFS, so when several dispatchers race for an
//! entry exactly one succeeds; the others see ENOENT (or ESTALE on NFS) and
//! move on. No locks for claims: NFS locking is too often missing or broken.
//! (The only lock is `hosts/<host>.lock`, which keeps a second spoold with
//! the same host id off the spool; see [`Spool::lock_host`].)
//!
//! The claim file's mtime is the lease: its owner touches it while it runs the
//! event. A claim whose mtime is older than `lease_ttl` by the shared
//! filesystem's own clock is stale, and anyone may move it back to `queue/`.
//!
//! The owner leaves the claim in one of three ways, each after writing the
//! status that says why (so a crash in between is repaired by recovery):
//! [`Spool::release`] (terminal), [`Spool::requeue`] (retry later) or
//! [`Spool::dead_letter`] (terminal, gave up).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::atomic::{rename_checked, Durability};
use super::ids::EventId;
use super::records::{DeadLetter, QueueEntry};
use super::{is_gone, IoContext, Result, Spool, SpoolError};

impl Spool {
    /// Tries to claim `queue/<id>` for this host. False: someone else has it.
    pub fn claim(&self, id: &EventId) -> Result<bool> {
        let from = self.queue_path(id);
        let to = self.running_path(id);
        match rename_checked(&from, &to) {
            Ok(()) => {
                // rename keeps the entry's mtime, which may be old enough to
                // look like an expired lease to other hosts: start it afresh.
                let _ = touch(&to);
                Ok(true)
            }
            Err(e) if is_gone(&e) => Ok(false),
            Err(e) => Err(SpoolError::Io {
                op: "claim",
                path: from,
                source: e,
            }),
        }
    }

    /// True while this host still holds the claim on `id`.
    pub fn holds(&self, id: &EventId) -> bool {
        self.running_path(id).exists()
    }

    /// Reads a queue (or claim) entry. `Ok(None)`: gone, or not valid JSON
    /// (an entry is written atomically, so invalid means hand-made).
    pub fn read_entry(&self, path: &Path) -> Result<Option<QueueEntry>> {
        match fs::read(path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(SpoolError::Io {
                op: "read",
                path: path.to_owned(),
                source: e,
            }),
        }
    }

    /// Lists `queue/`: IDs with their file names; names that are not IDs are
    /// returned apart so the caller can report them.
    pub fn list_queue(&self) -> Result<(Vec<EventId>, Vec<PathBuf>)> {
        list_ids(&self.dir("queue"))
    }

    /// Lists this host's claims.
    pub fn list_own_claims(&self) -> Result<(Vec<EventId>, Vec<PathBuf>)> {
        list_ids(&self.running_dir())
    }

    /// Refreshes the lease on a claim. False when the claim is gone (taken over).
    pub fn touch_claim(&self, id: &EventId) -> Result<bool> {
        let path = self.running_path(id);
        match touch(&path) {
            Ok(()) => Ok(true),
            Err(e) if is_gone(&e) => Ok(false),
            Err(e) => Err(SpoolError::Io {
                op: "refresh the lease on",
                path,
                source: e,
            }),
        }
    }

    /// Puts a claimed event back in the queue with `entry` (e.g. a not-before
    /// time), then drops the claim. The status must already say `queued`.
    pub fn requeue(&self, id: &EventId, entry: &QueueEntry) -> Result<()> {
        let dest = self.queue_path(id);
        let bytes = serde_json::to_vec(entry).expect("serializable");
        // link() semantics: if an entry is already queued for this ID (a crash
        // between these two steps last time), keep it.
        self.writer()
            .create_new(&dest, &bytes, Durability::Durable)
            .at("requeue", &dest)?;
        self.release(id)
    }

    /// Drops this host's claim on `id`. The status must already be final.
    pub fn release(&self, id: &EventId) -> Result<()> {
        let path = self.running_path(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if is_gone(&e) => Ok(()),
            Err(e) => Err(SpoolError::Io {
                op: "release",
                path,
                source: e,
            }),
        }
    }

    /// Records a dead letter, then drops the claim. The status must be final.
    pub fn dead_letter(&self, id: &EventId, letter: &DeadLetter) -> Result<()> {
        let path = self.dead_path(id);
        let bytes = serde_json::to_vec_pretty(letter).expect("serializable");
        self.writer()
            .replace(&path, &bytes, Durability::Durable)
            .at("write", &path)?;
        self.release(id)
    }

    /// The shared filesystem's idea of "now": the mtime of a file just
    /// touched there. Leases are judged by this clock, never the local one.
    pub fn fs_now(&self) -> Result<SystemTime> {
        let path = self
            .dir("tmp")
            .join(format!("{}clock", self.writer().prefix()));
        let stamp = || -> io::Result<SystemTime> {
            fs::write(&path, b"")?;
            let t = fs::metadata(&path)?.modified();
            let _ = fs::remove_file(&path);
            t
        };
        stamp().at("read the filesystem clock through", &path)
    }
}

fn touch(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: c is a valid NUL-terminated path; a null `times` means "now".
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn list_ids(dir: &Path) -> Result<(Vec<EventId>, Vec<PathBuf>)> {
    let mut ids = Vec::new();
    let mut strays = Vec::new();
    for entry in fs::read_dir(dir).at("list", dir)? {
        let entry = entry.at("list", dir)?;
        let name = entry.file_name();
        match name.to_str().map(|n| (n, EventId::parse(n))) {
            // Only canonical (upper-case) names: anything else is hand-made.
            Some((n, Ok(id))) if id.as_str() == n => ids.push(id),
            _ => strays.push(entry.path()),
        }
    }
    ids.sort();
    Ok((ids, strays))
}
