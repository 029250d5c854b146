//! The spool: a directory that is the queue, the state store and the result
//! store, shared by every process (and host) that works on it.
//!
//! ```text
//! spool/
//!   FORMAT                  "spoold-spool 1": refuses to open a spool of another format
//!   tmp/                    staging, <host>.<pid>.<counter>[.suffix]
//!   events/<id>/            event.json, status.json, progress.json, result, stderr
//!   queue/<id>              pending work (JSON QueueEntry), published with link()
//!   running/<host>/<id>     claimed by rename from queue/; mtime = lease heartbeat
//!   dead/<id>               dead letters (JSON DeadLetter)
//!   idem/<sha256(key)>      idempotency keys: first event for a key
//!   hosts/<host>.lock       locked (fcntl) by the one spoold serving as <host>; holds its pid
//! ```
//!
//! Invariants:
//! - every file is written through [`atomic::AtomicWriter`]; nothing is ever
//!   seen half-written under its final name;
//! - no name in `queue/` or `running/` is ever overwritten: entries are
//!   created with link(), and moved with a no-replace rename; a claim is a
//!   rename out of `queue/`, so exactly one claimer wins;
//! - `status.json` has one writer: the holder of the claim (checked by its
//!   [`claim::ClaimToken`]); a submit writes none (see [`records`]);
//! - nothing on a hot path lists `events/`.
//!
//! Submodules: [`ids`] (validated names), [`atomic`] (the write primitive),
//! [`records`] (JSON types), [`submit`], [`claim`] (claims, leases, requeue,
//! finish), [`recover`] (start-up repair), [`gc`] (retention).

pub mod atomic;
pub mod claim;
pub mod gc;
pub mod ids;
pub mod records;
pub mod recover;
pub mod submit;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use atomic::{AtomicWriter, Durability};
use ids::EventId;
use records::{Envelope, Status};

const FORMAT: &str = "spoold-spool 1";

/// An error of the spool, with the path it happened on.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is damaged: {detail}", path.display())]
    Damaged { path: PathBuf, detail: String },
    #[error("{} holds a spool of another format ({found:?}, this spoold reads {FORMAT:?}); point --spool at a new directory or migrate it", path.display())]
    Format { path: PathBuf, found: String },
}

impl SpoolError {
    /// The error without server paths, for statuses that clients read (the
    /// full error goes to the log).
    pub fn brief(&self) -> String {
        match self {
            SpoolError::Io { op, source, .. } => format!("cannot {op} a spool file: {source}"),
            SpoolError::Damaged { path, detail } => {
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                format!("{name} is damaged: {detail}")
            }
            SpoolError::Format { found, .. } => format!("the spool has another format ({found:?})"),
        }
    }

    /// True when the disk (or quota) is full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }

    /// True when the spool cannot be written at all (read-only filesystem or permissions).
    pub fn is_read_only(&self) -> bool {
        matches!(self, SpoolError::Io { source, .. }
            if matches!(source.raw_os_error(), Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)))
    }
}

pub type Result<T, E = SpoolError> = std::result::Result<T, E>;

/// Attaches the operation and path to an io::Error.
pub trait IoContext<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|source| SpoolError::Io {
            op,
            path: path.to_owned(),
            source,
        })
    }
}

/// The second name of an event's first status file (see
/// [`Spool::write_status`]); spoold never reads it.
pub const FIRST_STATUS: &str = "status.first";

/// True for the errors that mean "someone else moved or removed it".
pub fn is_gone(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESTALE)
}

/// One spool directory, seen from one host.
#[derive(Debug)]
pub struct Spool {
    root: PathBuf,
    host: String,
    writer: AtomicWriter,
}

impl Spool {
    /// Opens (creating if needed) the spool at `root` for host `host`.
    pub fn open(root: &Path, host: &str, fsync: bool) -> Result<Spool> {
        fs::create_dir_all(root).at("create the spool directory", root)?;
        let root = root.canonicalize().at("resolve", root)?;
        check_format(&root)?;
        for sub in ["tmp", "events", "queue", "running", "dead", "idem"] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).at("create", &dir)?;
        }
        let own = root.join("running").join(host);
        fs::create_dir_all(&own).at("create", &own)?;
        let writer = AtomicWriter::new(root.join("tmp"), host, fsync);
        Ok(Spool {
            root,
            host: host.to_owned(),
            writer,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn writer(&self) -> &AtomicWriter {
        &self.writer
    }

    pub fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    pub fn event_dir(&self, id: &EventId) -> PathBuf {
        self.root.join("events").join(id.as_str())
    }

    pub fn queue_path(&self, id: &EventId) -> PathBuf {
        self.root.join("queue").join(id.as_str())
    }

    pub fn running_dir(&self) -> PathBuf {
        self.root.join("running").join(&self.host)
    }

    pub fn running_path(&self, id: &EventId) -> PathBuf {
        self.running_dir().join(id.as_str())
    }

    pub fn dead_path(&self, id: &EventId) -> PathBuf {
        self.root.join("dead").join(id.as_str())
    }

    /// Reads `event.json`. `Ok(None)` when the event does not exist.
    pub fn read_envelope(&self, id: &EventId) -> Result<Option<Envelope>> {
        let path = self.event_dir(id).join("event.json");
        let Some(bytes) = read_if_exists(&path)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| SpoolError::Damaged {
                path,
                detail: e.to_string(),
            })
    }

    /// The current status: `status.json`, or the initial one derived from
    /// `event.json` when no status was written yet. `Ok(None)`: no such event.
    /// A `status.json` that does not parse, or names another event, is
    /// damaged.
    pub fn read_status(&self, id: &EventId) -> Result<Option<Status>> {
        self.read_status_or(id, || {
            Ok(self.read_envelope(id)?.map(|env| Status::initial(&env)))
        })
    }

    /// [`read_status`](Self::read_status), with the status to fall back on
    /// when no status was written yet from `initial` (which a caller that
    /// has read `event.json` already makes without reading it again).
    pub fn read_status_or(
        &self,
        id: &EventId,
        initial: impl FnOnce() -> Result<Option<Status>>,
    ) -> Result<Option<Status>> {
        let path = self.event_dir(id).join("status.json");
        let Some(bytes) = read_if_exists(&path)? else {
            return initial();
        };
        let status: Status = serde_json::from_slice(&bytes).map_err(|e| SpoolError::Damaged {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if status.id != id.as_str() {
            return Err(SpoolError::Damaged {
                path,
                detail: format!("it is the status of event {:?}", status.id),
            });
        }
        Ok(Some(status))
    }

    /// Replaces `status.json`. Only the event's owner may call this.
    ///
    /// An event's first status file also gets the name `status.first`, so
    /// that the statuses replacing it do not free it. Freeing a file is
    /// dear on this project's machines (ext4 without a journal searches past
    /// recently freed inodes at every creation, and `discard` sends the
    /// freed blocks to the disk): freeing one per event, the `running`
    /// status, halved the events/s end to end (see `docs/benchmarks.md`).
    /// The price is one small file per event until the event is deleted.
    pub fn write_status(&self, status: &Status, durability: Durability) -> Result<()> {
        let id = EventId::parse(&status.id).map_err(|e| SpoolError::Damaged {
            path: self.root.join("events"),
            detail: e.to_string(),
        })?;
        let dir = self.event_dir(&id);
        let path = dir.join("status.json");
        self.writer
            .replace_keeping(
                &path,
                Some(&dir.join(FIRST_STATUS)),
                &status.to_json(),
                durability,
            )
            .at("write", &path)
    }

    /// Writes a file into the event's directory, atomically.
    pub fn write_event_file(
        &self,
        id: &EventId,
        name: &str,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<()> {
        let path = self.event_dir(id).join(name);
        self.writer
            .replace(&path, bytes, durability)
            .at("write", &path)
    }
}

fn check_format(root: &Path) -> Result<()> {
    let path = root.join("FORMAT");
    match fs::read_to_string(&path) {
        Ok(found) if found.trim() == FORMAT => Ok(()),
        Ok(found) => Err(SpoolError::Format {
            path,
            found: found.trim().chars().take(60).collect(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let tmp = root.join(format!("FORMAT.{}.tmp", std::process::id()));
            fs::write(&tmp, format!("{FORMAT}\n")).at("write", &tmp)?;
            fs::rename(&tmp, &path).at("write", &path)
        }
        Err(e) => Err(SpoolError::Io {
            op: "read",
            path,
            source: e,
        }),
    }
}

/// Reads a whole file; `Ok(None)` when it is not there (or vanished under us).
/// Only a regular file (see [`open_regular`]): anything else is `Damaged`.
pub fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    use std::io::Read;
    let read = open_regular(path).and_then(|mut f| {
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).map(|_| bytes)
    });
    match read {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => Err(SpoolError::Damaged {
            path: path.to_owned(),
            detail: e.to_string(),
        }),
        Err(e) => Err(SpoolError::Io {
            op: "read",
            path: path.to_owned(),
            source: e,
        }),
    }
}

/// Opens a file for reading only if it is a regular file: never through a
/// symlink (`O_NOFOLLOW`), and without blocking on a FIFO (`O_NONBLOCK`),
/// else `InvalidInput`. Handlers write into their event's directory and can
/// leave a symlink to a file outside the spool, or a FIFO or device, where
/// spoold expects a file: following it would read what the operator never
/// meant to serve, and reading it would block a thread for good or never end
/// (found by the fault suite's bad-handler tests).
pub fn open_regular(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let not_regular = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a symlink, FIFO or device)",
        )
    };
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                not_regular()
            } else {
                e
            }
        })?;
    if !file.metadata()?.is_file() {
        return Err(not_regular());
    }
    Ok(file)
}

/// True when `path` is on a network or FUSE filesystem, where other hosts'
/// writes produce no notifications.
pub fn is_network_fs(path: &Path) -> bool {
    const NFS: i64 = 0x6969;
    const FUSE: i64 = 0x6573_5546;
    const SMB: i64 = 0x517b;
    const CIFS: i64 = 0xff53_4d42;
    const SMB2: i64 = 0xfe53_4d42;
    const CEPH: i64 = 0x00c3_6400;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into a zeroed struct we own; c is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut buf) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)]
    let kind = buf.f_type as i64;
    matches!(kind, NFS | FUSE | SMB | CIFS | SMB2 | CEPH)
}

/// Held for as long as a spoold serves this spool as this host: a second
/// spoold with the same host id would "recover" the first one's live claims.
/// (A lock on one file per host, not on claims: claims never use locks.)
#[derive(Debug)]
pub struct HostLock {
    _file: fs::File,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another spoold (pid {pid}) is already serving {} as host {host:?}; stop it, or give this one another --host-id", spool.display())]
    Held {
        pid: String,
        host: String,
        spool: PathBuf,
    },
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

impl Spool {
    pub fn lock_host(&self) -> Result<HostLock, LockError> {
        use std::io::{Read, Seek, Write};
        use std::os::fd::AsRawFd;
        let dir = self.dir("hosts");
        fs::create_dir_all(&dir).at("create", &dir)?;
        let path = dir.join(format!("{}.lock", self.host));
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .at("open", &path)?;
        // A POSIX record lock, not flock(2): it belongs to this process, so
        // it ends when the process does. An flock belongs to the open file,
        // which a handler being spawned (between its clone and its exec)
        // shares for a moment: a spoold restarted right after a kill -9 found
        // the dead one's lock still held, and gave up (fault suite).
        // SAFETY: a zeroed flock struct is valid; fcntl on a descriptor we own.
        let mut whole: libc::flock = unsafe { std::mem::zeroed() };
        whole.l_type = libc::F_WRLCK as libc::c_short;
        whole.l_whence = libc::SEEK_SET as libc::c_short;
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &whole) } != 0 {
            let err = io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(LockError::Held {
                    pid: pid.trim().to_owned(),
                    host: self.host.clone(),
                    spool: self.root.clone(),
                });
            }
            // No lock support here (some NFS set-ups): go on, but say so.
            tracing::warn!(path = %path.display(), error = %err, "cannot lock the host file; make sure only one spoold runs per host id");
        }
        let _ = file.set_len(0);
        let _ = file.rewind();
        let _ = write!(file, "{}", std::process::id());
        Ok(HostLock { _file: file })
    }
}
