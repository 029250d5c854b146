//! Claims and leases: who runs an event.
//!
//! A claim is a rename of `queue/<id>` to `running/<host>/<id>`. rename is
//! atomic on every POSIX filesystem and on NFS, so when several dispatchers
//! race for an entry exactly one succeeds; the others see ENOENT (or ESTALE on
//! NFS) and move on. No locks for claims: NFS locking is too often missing or
//! broken. (The only lock is `hosts/<host>.lock`, which keeps a second spoold
//! with the same host id off the spool; see [`Spool::lock_host`].)
//!
//! The claim file's mtime is the lease: its owner touches it while it runs the
//! event. A claim whose mtime is older than `lease_ttl` by the shared
//! filesystem's own clock is stale, and anyone may move it back to `queue/`.
//! The entry is touched *before* it is renamed, so a claim never appears with
//! the old mtime of an entry that waited long in the queue.
//!
//! A [`ClaimToken`] is the claim file's inode: the owner checks it before it
//! acts, so a claim file that someone else made after a takeover is never
//! mistaken for its own. Claim files are rewritten in place (never replaced
//! through a rename), so a write can never bring back a claim that was moved.
//!
//! The owner leaves the claim in one of three ways, each after writing the
//! status that says why (so a crash in between is repaired by recovery):
//! [`Spool::release`] (final), [`Spool::requeue`] (retry later; one rename)
//! or [`Spool::dead_letter`] (final, gave up).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::atomic::{rename_noreplace, rename_noreplace_contended, Durability};
use super::ids::EventId;
use super::records::{DeadLetter, QueueEntry};
use super::{is_gone, IoContext, Result, Spool};

/// Proof of holding a claim: the inode of the claim file this host made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClaimToken(u64);

impl Spool {
    /// Tries to claim `queue/<id>` for this host. `None`: someone else has it.
    pub fn claim(&self, id: &EventId) -> Result<Option<ClaimToken>> {
        let from = self.queue_path(id);
        let to = self.running_path(id);
        // Refresh the lease first: rename keeps the mtime, and an entry that
        // waited longer than lease_ttl would look expired to other hosts.
        match touch(&from) {
            Err(e) if is_gone(&e) => return Ok(None),
            other => other.at("claim", &from)?,
        }
        let mut moved = rename_noreplace(&from, &to);
        if matches!(&moved, Err(e) if is_gone(e)) && from.exists() {
            // The source is there, so the destination directory is missing
            // (removed by hand): make it again rather than never running anything.
            tracing::warn!(dir = %self.running_dir().display(), "this host's running/ directory was missing; recreated it");
            fs::create_dir_all(self.running_dir()).at("create", &self.running_dir())?;
            moved = rename_noreplace(&from, &to);
        }
        match moved {
            Ok(()) => Ok(self.claim_token(id)),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                tracing::error!(%id, "a claim file for this event already exists on this host; leaving the queue entry alone");
                Ok(None)
            }
            Err(e) => Err(e).at("claim", &from),
        }
    }

    /// The token of this host's claim on `id` as it is on disk now (for
    /// claims found at start-up, made by a previous life of this host).
    pub fn claim_token(&self, id: &EventId) -> Option<ClaimToken> {
        fs::symlink_metadata(self.running_path(id))
            .ok()
            .map(|m| ClaimToken(m.ino()))
    }

    /// True while this host still holds this very claim.
    pub fn holds(&self, id: &EventId, token: ClaimToken) -> bool {
        self.claim_token(id) == Some(token)
    }

    /// Rewrites the claim file in place (keeping its inode). False when the
    /// claim is no longer ours.
    pub fn rewrite_claim(&self, id: &EventId, token: ClaimToken, bytes: &[u8]) -> Result<bool> {
        let path = self.running_path(id);
        if !self.holds(id, token) {
            return Ok(false);
        }
        // No O_CREAT: if the claim was moved away meanwhile, this fails
        // instead of making a second claim.
        let mut file = match OpenOptions::new().write(true).truncate(true).open(&path) {
            Ok(f) => f,
            Err(e) if is_gone(&e) => return Ok(false),
            Err(e) => return Err(e).at("rewrite", &path),
        };
        file.write_all(bytes).at("rewrite", &path)?;
        if self.writer().syncs_data() {
            file.sync_data().at("sync", &path)?;
        }
        Ok(true)
    }

    /// Reads a queue (or claim) entry. `Ok(None)`: gone, or not valid JSON
    /// (an entry is written whole, so invalid means hand-made or torn).
    pub fn read_entry(&self, path: &Path) -> Result<Option<QueueEntry>> {
        match fs::read(path) {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes).ok()),
            Err(e) if is_gone(&e) => Ok(None),
            Err(e) => Err(e).at("read", path),
        }
    }

    /// Lists `queue/`: IDs, and apart from them the names that are not IDs
    /// (so the caller can report them).
    pub fn list_queue(&self) -> Result<(Vec<EventId>, Vec<PathBuf>)> {
        list_ids(&self.dir("queue"))
    }

    /// Lists this host's claims.
    pub fn list_own_claims(&self) -> Result<(Vec<EventId>, Vec<PathBuf>)> {
        list_ids(&self.running_dir())
    }

    /// Refreshes the lease on a claim. False when the claim is no longer ours.
    pub fn touch_claim(&self, id: &EventId, token: ClaimToken) -> Result<bool> {
        if !self.holds(id, token) {
            return Ok(false);
        }
        let path = self.running_path(id);
        match touch(&path) {
            Ok(()) => Ok(true),
            Err(e) if is_gone(&e) => Ok(false),
            Err(e) => Err(e).at("refresh the lease on", &path),
        }
    }

    /// Puts a claimed event back in the queue with `entry` (e.g. a not-before
    /// time), in one step: the claim file becomes the queue entry, by rename.
    /// The status must already say `queued`. False: the claim was not ours.
    pub fn requeue(&self, id: &EventId, token: ClaimToken, entry: &QueueEntry) -> Result<bool> {
        let bytes = serde_json::to_vec(entry).expect("serializable");
        if !self.rewrite_claim(id, token, &bytes)? {
            return Ok(false);
        }
        let (from, to) = (self.running_path(id), self.queue_path(id));
        match rename_noreplace(&from, &to) {
            Ok(()) => self.forget_process(id),
            Err(e) if is_gone(&e) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // Someone queued it by hand meanwhile: one entry is enough.
                tracing::warn!(%id, "the event was already back in queue/; dropping this host's claim");
                self.release(id, token)?;
            }
            Err(e) => return Err(e).at("requeue", &from),
        }
        self.writer()
            .sync_parent(&to, Durability::Durable)
            .at("sync", &self.dir("queue"))?;
        Ok(true)
    }

    /// Drops this host's claim on `id`. The status must already be final.
    pub fn release(&self, id: &EventId, token: ClaimToken) -> Result<()> {
        if !self.holds(id, token) {
            return Ok(());
        }
        self.forget_process(id);
        let path = self.running_path(id);
        match self.writer().recycle(&path) {
            Err(e) if !is_gone(&e) => Err(e).at("release", &path),
            _ => Ok(()),
        }
    }

    /// Records a dead letter, then drops the claim. The status must be final.
    pub fn dead_letter(&self, id: &EventId, token: ClaimToken, letter: &DeadLetter) -> Result<()> {
        if !self.holds(id, token) {
            return Ok(());
        }
        let path = self.dead_path(id);
        let bytes = serde_json::to_vec_pretty(letter).expect("serializable");
        self.writer()
            .replace(&path, &bytes, Durability::Durable)
            .at("write", &path)?;
        self.release(id, token)
    }

    /// Moves another host's claim back to `queue/` (a takeover). Of several
    /// hosts racing for it, only the one whose rename moved it gets true
    /// (none does, if that rename's reply was lost on NFS).
    pub fn take_over(&self, claim: &Path, id: &EventId) -> Result<bool> {
        match rename_noreplace_contended(claim, &self.queue_path(id)) {
            Ok(()) => Ok(true),
            Err(e) if is_gone(&e) || e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(e).at("take over", claim),
        }
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

/// The mtime of `path` as the file server has it now. A plain stat on NFS
/// (or FUSE) may answer from the client's attribute cache (`actimeo`,
/// `attr_timeout`), which can hold a lease heartbeat several seconds old;
/// `AT_STATX_FORCE_SYNC` asks the server. Used before judging a lease
/// expired, so a long attribute cache cannot expire the lease of a live
/// owner.
pub fn fresh_mtime(path: &Path) -> io::Result<SystemTime> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statx writes into a zeroed struct we own; c is NUL-terminated.
    let mut buf: libc::statx = unsafe { std::mem::zeroed() };
    let flags = libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_FORCE_SYNC;
    let rc = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            flags,
            libc::STATX_MTIME,
            &mut buf,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // No statx (old kernel or libc): the cached answer is all there is.
            Some(libc::ENOSYS) | Some(libc::EINVAL) => fs::symlink_metadata(path)?.modified(),
            _ => Err(e),
        };
    }
    let t = buf.stx_mtime;
    let since = std::time::Duration::new(t.tv_sec.max(0) as u64, t.tv_nsec);
    Ok(SystemTime::UNIX_EPOCH + since)
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
        // A directory (or FIFO) named like an ID is hand-made too: claiming,
        // reading or releasing it fails on every rescan (fault suite).
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        match name.to_str().map(|n| (n, EventId::parse(n))) {
            // Only canonical (upper-case) names: anything else is hand-made.
            Some((n, Ok(id))) if id.as_str() == n && is_file => ids.push(id),
            _ => strays.push(entry.path()),
        }
    }
    ids.sort();
    Ok((ids, strays))
}
