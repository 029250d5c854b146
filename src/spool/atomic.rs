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
//! Known limit: fsync is per call; batching concurrent writers into one commit
//! is left to the filesystem's journal (ext4 and xfs already merge concurrent
//! commits).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes files atomically through one staging directory.
#[derive(Debug)]
pub struct AtomicWriter {
    tmp_dir: PathBuf,
    prefix: String,
    counter: AtomicU64,
    fsync: bool,
}

/// How much a write must survive (when fsync is enabled in the config).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// fsync the file and its directory: the new name survives a power cut.
    Durable,
    /// fsync the file only: after a power cut the name may show the previous
    /// version, but never a torn or empty file (renaming unsynced data can
    /// leave an empty file on XFS, or on ext4 mounted noauto_da_alloc).
    DataOnly,
}

impl AtomicWriter {
    pub fn new(tmp_dir: PathBuf, host: &str, fsync: bool) -> AtomicWriter {
        AtomicWriter {
            tmp_dir,
            prefix: format!("{host}.{}.", std::process::id()),
            counter: AtomicU64::new(0),
            fsync,
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

    /// Writes `bytes` to a new staging file and returns its path.
    pub fn stage(&self, bytes: &[u8], suffix: &str) -> io::Result<PathBuf> {
        let path = self.staging_path(suffix);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let written =
            file.write_all(bytes)
                .and_then(|()| if self.fsync { file.sync_data() } else { Ok(()) });
        if let Err(e) = written {
            let _ = fs::remove_file(&path);
            return Err(e);
        }
        Ok(path)
    }

    /// Replaces `dest` with `bytes` in one step.
    pub fn replace(&self, dest: &Path, bytes: &[u8], durability: Durability) -> io::Result<()> {
        let staged = self.stage(bytes, "")?;
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
        let staged = self.stage(bytes, "")?;
        let created = publish_staged(&staged, dest);
        let _ = fs::remove_file(&staged);
        let created = created?;
        if created {
            self.sync_parent(dest, durability)?;
        }
        Ok(created)
    }

    /// fsyncs the directory holding `path`, if this durability asks for it.
    pub fn sync_parent(&self, path: &Path, durability: Durability) -> io::Result<()> {
        match path.parent() {
            Some(dir) if self.syncs(durability) => sync_dir(dir),
            _ => Ok(()),
        }
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
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (cf, ct) = (c(from)?, c(to)?);
    let ino = fs::symlink_metadata(from).map(|m| m.ino()).ok();
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
            rename_checked(from, to)
        }
        // A lost NFS reply: it may have happened after all.
        _ if ino.is_some()
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

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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
}
