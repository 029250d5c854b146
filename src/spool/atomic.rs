//! The one way anything is written into the spool.
//!
//! Every file is first written whole to a uniquely named file in `tmp/`
//! (`<host>.<pid>.<counter>[.suffix]`), optionally fsync'd, then moved to its
//! final name: `rename` to replace (status, result), `link` to create only if
//! absent (queue entries, idempotency keys, dead letters). When durable, the
//! destination directory is fsync'd too, so the new name survives a power cut.
//! Nothing ever appears half-written under its final name.
//!
//! NFS may report an error for a rename or link that did happen (the reply was
//! lost and the retransmission failed). Both operations therefore check the
//! outcome on disk, by inode, before reporting failure.
//!
//! **Flushes.** With fsync on, a staged file's data is flushed through its
//! own descriptor (`fdatasync`), and a new name by an fsync of its
//! directory: a finishing run waits for its own files only.
//!
//! **Group commit of submits.** A submit flushes with
//! [`AtomicWriter::barrier`] instead, twice: a barrier returns once a
//! `syncfs` of the spool's filesystem that *started after it was asked for*
//! has finished, so everything written before the barrier is on disk.
//! Concurrent submits share one `syncfs`: while one runs, the next batch
//! gathers, and its leader flushes for all. A submit would need six flushes
//! of its own (journal, `event.json`, its directory, `tmp/`, `events/`,
//! `queue/`); two barriers shared with every other submit in flight measured
//! faster (0.37–0.61 × the fsync floor, against 0.21–0.40 × for the six
//! fsyncs, with those of the shared directories grouped). Finishing runs do not
//! use barriers: a `syncfs` writes back every dirty page of the spool, and
//! runs that waited for it managed 340 events/s end to end, against 550–680
//! with their own fsyncs (see `docs/benchmarks.md`).
//!
//! **Spare files.** A claim or a process mark that has served is not
//! deleted: [`AtomicWriter::recycle`] moves it into `tmp/` as a spare, and
//! the next staging file is written into a spare instead of a new inode.
//! Only files that no reader opens by name are recycled. A status file,
//! which readers do open, is never written again once replaced; instead the
//! first one gets a second name (see `Spool::write_status`), so that
//! replacing it does not free its inode. ext4 without a journal skips every
//! inode freed in the last few seconds (minutes, while its inode table
//! block is dirty) each time it allocates one, holding the directory's lock
//! meanwhile: with three inodes freed per event, that scan was a quarter of
//! spoold's CPU time at 600 events/s, and the freed `running` statuses alone
//! halved the events/s end to end.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// Writes files atomically through one staging directory.
#[derive(Debug)]
pub struct AtomicWriter {
    tmp_dir: PathBuf,
    prefix: String,
    counter: AtomicU64,
    fsync: bool,
    flusher: Flusher,
    /// Files in `tmp/` free to be written again, newest last.
    spares: Mutex<Vec<(PathBuf, Instant)>>,
}

/// At most this many spare files are kept; past it, a file is deleted.
const MAX_SPARES: usize = 256;

/// A spare unused for this long is deleted rather than written again:
/// another host's recovery removes files of this host's left in `tmp/` for a
/// day, and must never do so under a write.
const SPARE_MAX_AGE: Duration = Duration::from_secs(3600);

/// How much a write must survive (when fsync is enabled in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory: the new name survives a power cut.
    Durable,
    /// fsync the file only: after a power cut the name may show the previous
    /// version, but never a torn or empty file (renaming unsynced data can
    /// leave an empty file on XFS, or on ext4 mounted noauto_da_alloc).
    DataOnly,
    /// No flush at all: survives a crash of spoold (the page cache has it),
    /// not a power cut, which may leave the previous version or an empty
    /// file. Only for what recovery rebuilds anyway: the status of a running
    /// event (rebuilt from `event.json` when damaged) and process marks
    /// (after a power cut there is no process left to stop). It keeps every
    /// flush off the path from a claim to a started handler.
    Volatile,
}

impl AtomicWriter {
    pub fn new(tmp_dir: PathBuf, host: &str, fsync: bool) -> AtomicWriter {
        AtomicWriter {
            flusher: Flusher::new(&tmp_dir),
            tmp_dir,
            prefix: format!("{host}.{}.", std::process::id()),
            counter: AtomicU64::new(0),
            fsync,
            spares: Mutex::new(Vec::new()),
        }
    }

    /// Everything written so far is on disk when this returns (fsync on).
    pub fn barrier(&self) -> io::Result<()> {
        if self.fsync {
            self.flusher.flush()
        } else {
            Ok(())
        }
    }

    /// The prefix of every staging name this process makes (used by recovery).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A fresh, unused path in `tmp/`.
    pub fn staging_path(&self, suffix: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        self.tmp_dir.join(format!("{}{n}{suffix}", self.prefix))
    }

    /// Writes `bytes` to a new staging file without flushing it: the caller
    /// calls [`barrier`](Self::barrier) before the file is given a final name.
    pub fn stage_unflushed(&self, bytes: &[u8], suffix: &str) -> io::Result<PathBuf> {
        self.stage(bytes, suffix, false)
    }

    /// Writes a staging file, its data flushed (fsync on) unless
    /// `durability` is `Volatile`.
    fn stage_for(&self, bytes: &[u8], durability: Durability) -> io::Result<PathBuf> {
        self.stage(bytes, "", self.fsync && durability != Durability::Volatile)
    }

    /// Writes a staging file named with `suffix`: into a spare if there is
    /// one, else a new file.
    fn stage(&self, bytes: &[u8], suffix: &str, flush: bool) -> io::Result<PathBuf> {
        while let Some(spare) = self.take_spare() {
            if let Some(path) = self.rewrite_spare(spare, bytes, suffix, flush)? {
                return Ok(path);
            }
        }
        let path = self.staging_path(suffix);
        write_new(&path, bytes, flush)?;
        Ok(path)
    }

    fn take_spare(&self) -> Option<PathBuf> {
        let mut spares = self.spares.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((path, since)) = spares.pop() {
            if since.elapsed() < SPARE_MAX_AGE {
                return Some(path);
            }
            let _ = fs::remove_file(path);
        }
        None
    }

    /// Writes `bytes` over a spare. `Ok(None)`: the spare was unfit (gone,
    /// or given another name meanwhile) and is dropped; take another.
    fn rewrite_spare(
        &self,
        spare: PathBuf,
        bytes: &[u8],
        suffix: &str,
        flush: bool,
    ) -> io::Result<Option<PathBuf>> {
        use std::os::unix::fs::OpenOptionsExt;
        // Not blocked by a FIFO put where a file was (O_NONBLOCK), and
        // never through a symlink.
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&spare);
        let fit = opened.and_then(|f| f.metadata().map(|m| (f, m)));
        let (mut file, old_len) = match fit {
            Ok((f, m)) if m.is_file() && m.nlink() == 1 => (f, m.len()),
            _ => {
                let _ = remove_any(&spare);
                return Ok(None);
            }
        };
        // Written from the start, then cut to length: truncating to zero
        // first would make ext4 start writing the file back at close. Written
        // before it is renamed, so that no name in `tmp/` ever shows a
        // spare's old bytes and old mtime (another host's recovery could
        // take such a `.queue.` file for an abandoned journal).
        let written = file.write_all(bytes).and_then(|()| {
            if old_len > bytes.len() as u64 {
                file.set_len(bytes.len() as u64)?;
            }
            if flush {
                file.sync_data()?;
            }
            Ok(())
        });
        if let Err(e) = written {
            let _ = fs::remove_file(&spare);
            return Err(e);
        }
        if suffix.is_empty() {
            return Ok(Some(spare));
        }
        let named = self.staging_path(suffix);
        match fs::rename(&spare, &named) {
            Ok(()) => Ok(Some(named)),
            Err(_) => {
                let _ = fs::remove_file(&spare);
                Ok(None)
            }
        }
    }

    /// Deletes every spare (at a graceful stop: a crash leaves them to
    /// recovery, which removes this host's files in `tmp/`).
    pub fn drop_spares(&self) {
        let spares = std::mem::take(&mut *self.spares.lock().unwrap_or_else(|e| e.into_inner()));
        for (path, _) in spares {
            let _ = fs::remove_file(path);
        }
    }

    /// Takes `path`, a file spoold is done with and no reader opens by name
    /// (a released claim, a process mark), as a spare for a later staging
    /// file, instead of deleting it (see the module documentation). Either
    /// way, `path` is gone when this returns `Ok`; an error is the rename's.
    pub fn recycle(&self, path: &Path) -> io::Result<()> {
        let full = self.spares.lock().unwrap_or_else(|e| e.into_inner()).len() >= MAX_SPARES;
        if full {
            return fs::remove_file(path);
        }
        let spare = self.staging_path(".spare");
        fs::rename(path, &spare)?;
        self.spares
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((spare, Instant::now()));
        Ok(())
    }

    /// Replaces `dest` with `bytes` in one step.
    pub fn replace(&self, dest: &Path, bytes: &[u8], durability: Durability) -> io::Result<()> {
        self.replace_keeping(dest, None, bytes, durability)
    }

    /// [`replace`](Self::replace), giving the new file the name `keep` too
    /// when nothing has that name yet (the first version of `dest`): the
    /// version that replaces it later then does not free its inode (see
    /// the module documentation).
    pub fn replace_keeping(
        &self,
        dest: &Path,
        keep: Option<&Path>,
        bytes: &[u8],
        durability: Durability,
    ) -> io::Result<()> {
        let staged = self.stage_for(bytes, durability)?;
        if let Some(keep) = keep {
            let _ = fs::hard_link(&staged, keep);
        }
        if let Err(e) = rename_checked(&staged, dest) {
            let _ = fs::remove_file(&staged);
            return Err(e);
        }
        self.sync_parent(dest, durability)
    }

    /// Creates `dest` with `bytes` unless it exists. Returns false when it did.
    pub fn create_new(
        &self,
        dest: &Path,
        bytes: &[u8],
        durability: Durability,
    ) -> io::Result<bool> {
        let staged = self.stage_for(bytes, durability)?;
        let created = publish_staged(&staged, dest);
        let _ = fs::remove_file(&staged);
        let created = created?;
        if created {
            self.sync_parent(dest, durability)?;
        }
        Ok(created)
    }

    /// Makes the new name of `path` durable, if this durability asks for it:
    /// an fsync of its directory.
    pub fn sync_parent(&self, path: &Path, durability: Durability) -> io::Result<()> {
        if !self.syncs(durability) {
            return Ok(());
        }
        let dir = path.parent().unwrap_or(Path::new("."));
        File::open(dir)?.sync_all()
    }

    /// True when file contents are fsync'd (any durability, fsync on).
    pub fn syncs_data(&self) -> bool {
        self.fsync
    }

    /// True when this durability also fsyncs the directory.
    pub fn syncs(&self, durability: Durability) -> bool {
        self.fsync && durability == Durability::Durable
    }
}

/// Creates `path` with `bytes` (its data flushed if `flush`); removes it
/// again if the write fails.
pub fn write_new(path: &Path, bytes: &[u8], flush: bool) -> io::Result<()> {
    let written = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .and_then(|mut file| {
            file.write_all(bytes)?;
            if flush {
                file.sync_data()?;
            }
            Ok(())
        });
    if written.is_err() {
        let _ = fs::remove_file(path);
    }
    written
}

/// Removes a file, or a directory and what it holds.
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    }
}

/// Links an already written staging file to `dest` unless `dest` exists.
/// Returns false when `dest` was already there (and was not this very file).
pub fn publish_staged(staged: &Path, dest: &Path) -> io::Result<bool> {
    let ino = fs::metadata(staged)?.ino();
    match fs::hard_link(staged, dest) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(same_inode(dest, ino)),
        // A lost NFS reply: the link may have happened after all.
        Err(e) if same_inode(dest, ino) => {
            tracing::debug!(path = %dest.display(), error = %e, "link reported an error but took effect");
            Ok(true)
        }
        Err(e) => Err(e),
    }
}

/// Moves `from` to `to` unless `to` exists (then `AlreadyExists`). One step
/// where the filesystem supports `RENAME_NOREPLACE` (ext4, xfs, btrfs, tmpfs);
/// elsewhere (NFS, FUSE) a check then a rename, whose window only a
/// hand-made file could fall into: spoold never creates a name it is about
/// to rename onto.
///
/// An error after which `from` is gone and `to` is the same file is taken
/// as a lost NFS reply: the rename happened. That reading is only right
/// when no other host may move `from` to `to` meanwhile; where several
/// may (taking over a stale claim), use [`rename_noreplace_contended`].
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    rename_noreplace_inner(from, to, true)
}

/// [`rename_noreplace`] for a `from` that other hosts race to move: an
/// error is an error, even when `to` then holds the file, since that is
/// what the winner of the race leaves. A lost reply is then reported as a
/// loss, which costs nothing but a missed log line: the file is in place.
pub fn rename_noreplace_contended(from: &Path, to: &Path) -> io::Result<()> {
    rename_noreplace_inner(from, to, false)
}

fn rename_noreplace_inner(from: &Path, to: &Path, lost_reply_check: bool) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (cf, ct) = (c(from)?, c(to)?);
    // Only a lost reply needs the inode, to recognise the file at `to`.
    let ino = lost_reply_check
        .then(|| fs::symlink_metadata(from).map(|m| m.ino()).ok())
        .flatten();
    // SAFETY: two valid NUL-terminated paths, relative to the working directory.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    let err = if rc == 0 {
        return Ok(());
    } else {
        io::Error::last_os_error()
    };
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            if lost_reply_check {
                rename_checked(from, to)
            } else {
                fs::rename(from, to)
            }
        }
        // A lost NFS reply: it may have happened after all.
        _ if lost_reply_check
            && ino.is_some()
            && !from.exists()
            && ino == fs::symlink_metadata(to).map(|m| m.ino()).ok() =>
        {
            Ok(())
        }
        _ => Err(err),
    }
}

/// `rename(from, to)`, treating a reported failure that did take effect as success.
pub fn rename_checked(from: &Path, to: &Path) -> io::Result<()> {
    let ino = fs::symlink_metadata(from).map(|m| m.ino()).ok();
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) => match ino {
            Some(ino) if !from.exists() && same_inode(to, ino) => Ok(()),
            _ => Err(e),
        },
    }
}

fn same_inode(path: &Path, ino: u64) -> bool {
    fs::symlink_metadata(path)
        .map(|m| m.ino() == ino)
        .unwrap_or(false)
}

/// Group commit of submits: see the module documentation.
#[derive(Debug)]
struct Flusher {
    /// Any directory of the spool: `syncfs` flushes the filesystem it is on.
    /// Or why it cannot be opened, said at each flush.
    dir: Result<File, String>,
    batch: Mutex<Batch>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct Batch {
    /// Tickets handed out: the number of flushes asked for.
    asked: u64,
    /// Every ticket up to this one is covered by a finished `syncfs`.
    flushed: u64,
    /// A `syncfs` is running now.
    running: bool,
    /// Recent failed flushes: (first ticket, last ticket, errno).
    failures: Vec<(u64, u64, i32)>,
}

impl Flusher {
    fn new(dir: &Path) -> Flusher {
        Flusher {
            dir: File::open(dir).map_err(|e| {
                format!(
                    "cannot flush the spool: {} cannot be opened ({e}); check that it exists and that spoold may read it",
                    dir.display()
                )
            }),
            batch: Mutex::new(Batch::default()),
            done: Condvar::new(),
        }
    }

    /// Returns when a `syncfs` that started after this call has finished.
    fn flush(&self) -> io::Result<()> {
        let dir = self
            .dir
            .as_ref()
            .map_err(|why| io::Error::other(why.clone()))?;
        let mut b = self.batch.lock().unwrap_or_else(|e| e.into_inner());
        b.asked += 1;
        let ticket = b.asked;
        loop {
            if b.flushed >= ticket {
                return match b.failures.iter().find(|f| f.0 <= ticket && ticket <= f.1) {
                    Some(&(_, _, errno)) => Err(io::Error::from_raw_os_error(errno)),
                    None => Ok(()),
                };
            }
            if b.running {
                b = self.done.wait(b).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Lead the next batch: every ticket asked for so far rides on it.
            b.running = true;
            let first = b.flushed + 1;
            let last = b.asked;
            drop(b);
            // SAFETY: syncfs on a descriptor this struct owns.
            let rc = unsafe { libc::syncfs(dir.as_raw_fd()) };
            let err = (rc != 0).then(io::Error::last_os_error);
            b = self.batch.lock().unwrap_or_else(|e| e.into_inner());
            b.running = false;
            b.flushed = last;
            if let Some(e) = &err {
                b.failures
                    .push((first, last, e.raw_os_error().unwrap_or(libc::EIO)));
                let keep = b.failures.len().saturating_sub(64);
                b.failures.drain(..keep);
            }
            self.done.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(dir: &Path) -> AtomicWriter {
        fs::create_dir_all(dir.join("tmp")).unwrap();
        AtomicWriter::new(dir.join("tmp"), "testhost", true)
    }

    #[test]
    fn replace_leaves_no_staging_file() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let dest = dir.path().join("status.json");
        w.replace(&dest, b"one", Durability::Durable).unwrap();
        w.replace(&dest, b"two", Durability::DataOnly).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn create_new_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let dest = dir.path().join("entry");
        assert!(w.create_new(&dest, b"first", Durability::Durable).unwrap());
        assert!(!w.create_new(&dest, b"second", Durability::Durable).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"first");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_recycled_file_is_written_again_whole_under_its_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let done = dir.path().join("claim");
        fs::write(&done, b"a claim much longer than what comes next").unwrap();
        let ino = fs::metadata(&done).unwrap().ino();
        w.recycle(&done).unwrap();
        assert!(!done.exists());
        let dest = dir.path().join("status.json");
        w.replace(&dest, b"new", Durability::Durable).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        assert_eq!(
            fs::metadata(&dest).unwrap().ino(),
            ino,
            "the spare was used"
        );
        // The next write finds no spare and makes a new file.
        let journal = w.stage_unflushed(b"entry", ".queue.x").unwrap();
        assert_ne!(fs::metadata(&journal).unwrap().ino(), ino);
        fs::remove_file(journal).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_spare_with_another_name_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let (done, other) = (dir.path().join("mark"), dir.path().join("other"));
        fs::write(&done, b"keep me").unwrap();
        fs::hard_link(&done, &other).unwrap();
        w.recycle(&done).unwrap();
        let dest = dir.path().join("status.json");
        w.replace(&dest, b"new", Durability::Durable).unwrap();
        assert_eq!(fs::read(&other).unwrap(), b"keep me");
        assert_eq!(fs::read(&dest).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn a_kept_first_version_outlives_its_replacements_under_its_second_name() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(dir.path());
        let (dest, keep) = (
            dir.path().join("status.json"),
            dir.path().join("status.first"),
        );
        w.replace_keeping(&dest, Some(&keep), b"running", Durability::Volatile)
            .unwrap();
        let first = fs::metadata(&dest).unwrap().ino();
        assert_eq!(fs::metadata(&keep).unwrap().ino(), first);
        w.replace_keeping(&dest, Some(&keep), b"final", Durability::Durable)
            .unwrap();
        assert_eq!(fs::read(&dest).unwrap(), b"final");
        assert_eq!(fs::read(&keep).unwrap(), b"running", "never written again");
        assert_eq!(fs::metadata(&keep).unwrap().ino(), first);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn only_the_winner_of_a_contended_rename_is_told_it_moved_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("claim"), dir.path().join("queued"));
        let race = std::sync::Barrier::new(2);
        for round in 0..2000 {
            fs::write(&from, b"claim").unwrap();
            let won = std::thread::scope(|s| {
                let take = || {
                    race.wait();
                    rename_noreplace_contended(&from, &to).is_ok()
                };
                let other = s.spawn(take);
                take() as u32 + other.join().unwrap() as u32
            });
            assert_eq!(won, 1, "round {round}");
            fs::remove_file(&to).unwrap();
        }
    }
}
