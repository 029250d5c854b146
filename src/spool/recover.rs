//! Start-up repair of what a crash of this host left behind.
//!
//! - `tmp/`: this host's staging files are removed; a staged queue entry whose
//!   event directory made it into `events/` but was never published (crash
//!   between steps 3 and 4 of a submit) is published now. Other hosts' staging
//!   files are left alone unless they are older than a day.
//! - `running/<host>/`: claims of this host from its previous life. A handler
//!   process group it left running is killed first (its pid and start time are
//!   kept in `hosts/<host>/<id>.process`), and so is every process that left
//!   that group but still carries the run's `SPOOL_DIR`, `SPOOL_ID` and
//!   `SPOOL_ATTEMPT` (a `setsid` child), so an event never runs twice at once.
//!   Then a claim whose status is already final is just dropped (after its
//!   dead letter, if that was not written yet); a claim whose `event.json` is
//!   gone or damaged is dead-lettered with a `failed` status; any other is put
//!   back in the queue, its status saying so. (If that was its last attempt,
//!   the dispatcher dead-letters it when it claims it: see `dispatch::runner`.)
//!
//! Queue entries whose event directory is missing or damaged are dealt with by
//! the dispatcher when it claims them (dead-lettered with a log line), which
//! covers damage that happens later too.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::atomic::Durability;
use super::claim::ClaimToken;
use super::ids::EventId;
use super::records::{DeadLetter, Envelope, QueueEntry, State, Status, Timestamp};
use super::submit::JOURNAL_MARK;
use super::{is_gone, IoContext, Result, Spool, SpoolError};

const FOREIGN_TMP_AGE: Duration = Duration::from_secs(24 * 3600);

/// `hosts/<host>/<id>.process`, written when a handler starts: enough to
/// find its process group again after spoold dies, so that it can be killed
/// before the event runs anew. Kept apart from the claim, so the claim file is
/// never rewritten while a handler runs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct ProcessMark {
    pub pid: i32,
    /// Start time of the process in clock ticks since boot (/proc/<pid>/stat field 22).
    pub start: u64,
    /// The kernel's boot id: a pid from before a reboot names nothing of ours.
    #[serde(default)]
    pub boot: Option<String>,
    /// The attempt this handler runs: what its processes carry in
    /// `SPOOL_ATTEMPT`, so that those that left its group (setsid) are found.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
}

impl ProcessMark {
    /// The mark of a running process, if it can be read.
    pub fn of(pid: i32, attempt: u32) -> Option<ProcessMark> {
        Some(ProcessMark {
            pid,
            start: process_start(pid)?,
            boot: boot_id(),
            attempt: Some(attempt),
        })
    }
}

fn boot_id() -> Option<String> {
    static BOOT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
    })
    .clone()
}

/// What recovery did, for the log.
#[derive(Debug, Default)]
pub struct Recovered {
    pub staging_removed: usize,
    pub published: usize,
    pub requeued: usize,
    pub released: usize,
    pub killed_groups: usize,
}

impl Spool {
    /// Repairs what a previous life of this host left. `lease_ttl` tells how
    /// old another host's unfinished submit must be to count as abandoned.
    pub fn recover(&self, lease_ttl: Duration) -> Result<Recovered> {
        let mut done = Recovered::default();
        self.recover_tmp(lease_ttl, &mut done)?;
        self.recover_claims(&mut done)?;
        Ok(done)
    }

    fn recover_tmp(&self, lease_ttl: Duration, done: &mut Recovered) -> Result<()> {
        let tmp = self.dir("tmp");
        let own = format!("{}.", self.host());
        // Ages of other hosts' files are judged by the shared filesystem's
        // clock, which stamped them, not by this host's: a host whose clock
        // runs hours ahead would otherwise take a submit that another host
        // is in the middle of for abandoned, publish it and remove its
        // journal under it (the submit then fails although its event runs).
        let now = self.fs_now().unwrap_or_else(|_| SystemTime::now());
        for entry in fs::read_dir(&tmp).at("list", &tmp)? {
            let entry = entry.at("list", &tmp)?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let mine = name.starts_with(&own);
            // Another host's submit journal, old enough that its host must have
            // died mid-submit: finish it for them, or the event never runs.
            let abandoned = !mine && is_older_than(&path, lease_ttl * 3, now);
            if mine || abandoned {
                if let Some(id) = name
                    .split_once(JOURNAL_MARK)
                    .and_then(|(_, id)| EventId::parse(id).ok())
                {
                    if self.journal_unpublished(&path, &id) {
                        self.publish_journal(&path, &id)?;
                        tracing::info!(%id, "published an event whose submit was cut short by a crash");
                        done.published += 1;
                    }
                }
            }
            if mine
                || is_older_than(&path, FOREIGN_TMP_AGE, now)
                || (abandoned && name.contains(JOURNAL_MARK))
            {
                remove_any(&path);
                done.staging_removed += 1;
            }
        }
        Ok(())
    }

    /// A staged entry was never linked when its inode has one name, and the
    /// event it stands for exists but was never touched by a dispatcher.
    fn journal_unpublished(&self, journal: &Path, id: &EventId) -> bool {
        let single = fs::metadata(journal)
            .map(|m| m.nlink() == 1)
            .unwrap_or(false);
        let dir = self.event_dir(id);
        single && dir.join("event.json").exists() && !dir.join("status.json").exists()
    }

    fn recover_claims(&self, done: &mut Recovered) -> Result<()> {
        let (ids, strays) = self.list_own_claims()?;
        for stray in strays {
            tracing::warn!(path = %stray.display(), "ignoring a file in running/ that is not an event ID; remove it by hand");
        }
        for id in &ids {
            if self.kill_leftover(id) {
                done.killed_groups += 1;
            }
            match self.recover_claim(id) {
                Ok(Some(true)) => done.requeued += 1,
                Ok(Some(false)) => done.released += 1,
                Ok(None) => {}
                // Left for the rescan, which retries once the lease expires.
                Err(e) => {
                    tracing::error!(%id, error = %e, "cannot recover a claim now; the rescan will retry")
                }
            }
        }
        // A mark whose claim is gone: another host took the claim over while
        // this host was down (shared mode), and runs the event again. The
        // handler the previous spoold left is nobody's now: stop it too, or
        // it runs on unsupervised next to the new attempt (found by the
        // multihost kill -9 test). kill_leftover also removes the mark.
        let claimed: std::collections::HashSet<String> =
            ids.iter().map(|id| format!("{id}.process")).collect();
        for entry in fs::read_dir(self.process_dir())
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if claimed.contains(&name) {
                continue;
            }
            match name.strip_suffix(".process").map(EventId::parse) {
                Some(Ok(id)) => {
                    if self.kill_leftover(&id) {
                        done.killed_groups += 1;
                    }
                }
                _ => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        Ok(())
    }

    fn process_dir(&self) -> std::path::PathBuf {
        self.dir("hosts").join(self.host())
    }

    fn mark_path(&self, id: &EventId) -> std::path::PathBuf {
        self.process_dir().join(format!("{id}.process"))
    }

    /// Notes the process group of the handler now running `id`.
    pub fn mark_process(&self, id: &EventId, mark: &ProcessMark) -> Result<()> {
        let path = self.mark_path(id);
        let bytes = serde_json::to_vec(mark).expect("serializable");
        let write = || self.writer().replace(&path, &bytes, Durability::Volatile);
        // `hosts/<host>/` is made at the first mark, and again if it was
        // removed by hand: not looked for at every run.
        match write() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let dir = self.process_dir();
                fs::create_dir_all(&dir).at("create", &dir)?;
                write()
            }
            other => other,
        }
        .at("write", &path)
    }

    /// Forgets the process of `id` (its run is over).
    pub fn forget_process(&self, id: &EventId) {
        let _ = self.writer().recycle(&self.mark_path(id));
    }

    /// Kills the handler group a previous run of `id` on this host may have
    /// left (spoold died, or a run was abandoned); true if one was killed.
    pub fn kill_leftover(&self, id: &EventId) -> bool {
        let path = self.mark_path(id);
        let mark: Option<ProcessMark> = fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let killed = mark.as_ref().is_some_and(kill_leftover_group);
        if let (true, Some(mark)) = (killed, &mark) {
            tracing::warn!(%id, pid = mark.pid, "killed a handler group left running for this event");
        }
        // Processes that left the group (setsid, a daemon) escape the group
        // kill, and would run on next to the rerun (found by the fault
        // suite's grandchild test). They still carry the run's environment.
        // Without a mark (a crash between spawn and mark), the run is the one
        // its status says this host started.
        let attempt = match &mark {
            Some(m) => m.attempt,
            None => self
                .read_status(id)
                .ok()
                .flatten()
                .filter(|s| s.state == State::Running && s.host.as_deref() == Some(self.host()))
                .map(|s| s.attempt),
        };
        let group = mark.as_ref().map(|m| m.pid);
        let escaped = attempt.map_or(0, |a| kill_escaped(self.root(), id, a, group));
        if escaped > 0 {
            tracing::warn!(%id, processes = escaped, "killed processes that a handler left running outside its process group");
        }
        self.forget_process(id);
        killed || escaped > 0
    }

    /// Settles one claim of this host that no runner holds: put back in the
    /// queue (`Some(true)`), dropped because its status is final
    /// (`Some(false)`), or `None` when it was gone or dead-lettered.
    pub fn recover_claim(&self, id: &EventId) -> Result<Option<bool>> {
        let Some(token) = self.claim_token(id) else {
            return Ok(None);
        };
        let entry = self.read_entry(&self.running_path(id)).ok().flatten();
        let status = match self.status_or_rebuild(id) {
            Ok(Some(s)) => s,
            // No event.json (nor status): dead-lettered as the dispatcher
            // does at a claim. Dropping the claim without a word lost an
            // event whose event.json was deleted by hand, if spoold died
            // between claiming it and giving up on it (fault suite).
            Ok(None) => {
                tracing::error!(%id, "claimed event has no event.json; moving it to the dead letters");
                let kind = entry.map(|e| e.kind).unwrap_or_default();
                self.give_up_damaged(id, token, &kind, "event.json is missing")?;
                return Ok(None);
            }
            Err(e @ SpoolError::Damaged { .. }) => {
                tracing::error!(%id, error = %e, "claimed event cannot be read; moving it to the dead letters");
                let kind = entry.map(|e| e.kind).unwrap_or_default();
                self.give_up_damaged(id, token, &kind, &e.brief())?;
                return Ok(None);
            }
            Err(e) => return Err(e),
        };
        if status.state.is_terminal() {
            self.release_final(id, token, &status)?;
            return Ok(Some(false));
        }
        let mut next = status.next();
        next.state = State::Queued;
        next.message = Some(format!(
            "requeued: spoold on host {} restarted during attempt {}",
            self.host(),
            status.attempt
        ));
        self.write_status(&next, Durability::Durable)?;
        let entry = QueueEntry {
            kind: status.kind.clone(),
            not_before_ms: None,
        };
        self.requeue(id, token, &entry)?;
        tracing::info!(%id, attempt = status.attempt, "requeued an event this host was running when it stopped");
        Ok(Some(true))
    }

    /// Drops a claim whose status is already final. A dead-lettered status
    /// whose `dead/<id>` is missing gets it first: the owner writes the final
    /// status, then the dead letter, then lets go, and a crash between the
    /// first two left a dead-lettered event without its record (found by the
    /// fault suite's kill -9 loop).
    pub fn release_final(&self, id: &EventId, token: ClaimToken, status: &Status) -> Result<()> {
        if status.dead_letter && !self.dead_path(id).exists() {
            let letter = DeadLetter::new(
                id.as_str(),
                &status.kind,
                status.attempt,
                status.error.clone(),
            );
            return self.dead_letter(id, token, &letter);
        }
        self.release(id, token)
    }

    /// Gives up on a claimed event whose `event.json` is missing or cannot
    /// be parsed (cut or deleted by hand): a final `failed` status where its
    /// directory still exists, then the dead letter. Without the status,
    /// such an event answered `500` for good, or `404` (found by the fault
    /// suite's hand-damage test). Returns the status written.
    pub fn give_up_damaged(
        &self,
        id: &EventId,
        token: ClaimToken,
        kind: &str,
        why: &str,
    ) -> Result<Option<Status>> {
        if !self.holds(id, token) {
            return Ok(None);
        }
        let prev = match self.read_status(id) {
            Ok(Some(s)) => Some(s),
            _ if self.event_dir(id).is_dir() => Some(placeholder_status(id, kind)),
            _ => None,
        };
        let written = match prev {
            Some(prev) => {
                let mut next = prev.next();
                next.state = State::Failed;
                next.dead_letter = true;
                next.error = Some(format!("the event's files are damaged: {why}"));
                next.finished_at = Some(next.updated_at);
                self.write_status(&next, Durability::Durable)?;
                Some(next)
            }
            None => None,
        };
        let attempts = written.as_ref().map_or(0, |s| s.attempt);
        let letter = DeadLetter::new(id.as_str(), kind, attempts, Some(why.to_owned()));
        self.dead_letter(id, token, &letter)?;
        Ok(written)
    }

    /// Puts `event.json` back from the copy a runner holds in memory, when
    /// the event's directory (or its `event.json`) was removed while its
    /// handler ran, so that its final status can still be written and read.
    /// True when it had to.
    pub fn restore_envelope(&self, id: &EventId, env: &Envelope) -> Result<bool> {
        let dir = self.event_dir(id);
        let path = dir.join("event.json");
        if path.exists() {
            return Ok(false);
        }
        match fs::create_dir(&dir) {
            Ok(()) => self
                .writer()
                .sync_parent(&dir, Durability::Durable)
                .at("sync", &self.dir("events"))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).at("create", &dir),
        }
        let bytes = serde_json::to_vec_pretty(env).expect("serializable");
        self.write_event_file(id, "event.json", &bytes, Durability::Durable)?;
        Ok(true)
    }

    /// The status; a `status.json` that cannot be parsed (torn by hand, or by
    /// a filesystem that lost data) is rebuilt from `event.json`, with the
    /// attempt count started afresh, rather than losing the event.
    pub fn status_or_rebuild(&self, id: &EventId) -> Result<Option<Status>> {
        self.status_or_rebuild_from(id, None)
    }

    /// [`status_or_rebuild`](Self::status_or_rebuild) for an event whose
    /// `event.json` the caller has read already.
    pub fn status_or_rebuild_from(
        &self,
        id: &EventId,
        env: Option<&Envelope>,
    ) -> Result<Option<Status>> {
        let initial = || match env {
            Some(env) => Ok(Some(Status::initial(env))),
            None => Ok(self.read_envelope(id)?.map(|env| Status::initial(&env))),
        };
        match self.read_status_or(id, initial) {
            Err(SpoolError::Damaged { path, detail }) if path.ends_with("status.json") => {
                let Some(mut status) = initial()? else {
                    return Ok(None);
                };
                // The old seq is lost; one from the clock stays ahead of it, so
                // ETags and SSE ids keep growing for those who follow the event.
                status.updated_at = Timestamp::now();
                status.seq = status.updated_at.unix_ms();
                status.message = Some("status.json was damaged and has been rebuilt from event.json; the attempt count starts again".into());
                tracing::warn!(%id, %detail, "status.json was damaged; rebuilt it from event.json");
                // Not written here: the caller writes its next status as the owner.
                Ok(Some(status))
            }
            other => other,
        }
    }
}

/// A status for an event that has neither a readable status nor a readable
/// `event.json`: what its ID and claim tell. Its seq comes from the clock,
/// so it is ahead of any the event had (as for a rebuilt status).
fn placeholder_status(id: &EventId, kind: &str) -> Status {
    let now = Timestamp::now();
    Status {
        seq: now.unix_ms(),
        updated_at: now,
        ..Status::queued(
            id.as_str(),
            kind,
            Timestamp::from_unix_ms(id.timestamp_ms()),
        )
    }
}

/// Kills the process group of a handler started by a previous spoold, if it
/// is still there. The start time guards against a recycled pid.
fn kill_leftover_group(mark: &ProcessMark) -> bool {
    if mark.pid <= 1
        || mark
            .boot
            .as_ref()
            .is_some_and(|b| Some(b) != boot_id().as_ref())
    {
        return false;
    }
    let leader_is_ours = match process_start(mark.pid) {
        Some(start) => start == mark.start,
        // The leader is gone. While any member of its group lives the kernel
        // does not hand its number out again, so a group with this id is ours,
        // unless the whole group ended and the number came round again to a
        // new group leader since (pids wrap only after ~4 million starts).
        None => true,
    };
    // SAFETY: plain kill(2) on a negative pid (a process group).
    leader_is_ours && unsafe { libc::kill(-mark.pid, libc::SIGKILL) } == 0
}

/// Kills the processes of this host whose environment says they belong to
/// attempt `attempt` of event `id` of the spool at `root` (what a handler
/// passes on to everything it starts, `setsid` or not). Several passes, in
/// case one forked while the last pass ran. Members of `group` (killed with
/// it already, but maybe not gone yet) are left out. Returns how many were
/// killed. A process of another user, or that cleared its environment, is
/// not seen.
fn kill_escaped(root: &Path, id: &EventId, attempt: u32, group: Option<i32>) -> usize {
    let want = [
        format!("SPOOL_DIR={}", root.display()),
        format!("SPOOL_ID={id}"),
        format!("SPOOL_ATTEMPT={attempt}"),
    ];
    let mut killed = std::collections::HashSet::new();
    for _ in 0..3 {
        let mut found = 0;
        for (pid, _) in processes_with_env(&want) {
            if killed.contains(&pid) || group.is_some() && process_group(pid) == group {
                continue;
            }
            // SAFETY: plain kill(2) of one process.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed.insert(pid);
                found += 1;
            }
        }
        if found == 0 {
            break;
        }
    }
    killed.len()
}

/// The processes but this one whose environment holds every `NAME=value`
/// of `vars`, each with its environment (`NAME=value` entries separated by
/// NULs). A zombie or a kernel thread shows an empty environment; a process
/// of another user, or one that cleared its environment, is not seen.
pub fn processes_with_env(vars: &[String]) -> Vec<(i32, Vec<u8>)> {
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(env) = fs::read(entry.path().join("environ")) else {
            continue;
        };
        let has = |v: &String| env.split(|b| *b == 0).any(|e| e == v.as_bytes());
        if vars.iter().all(has) {
            found.push((pid, env));
        }
    }
    found
}

/// Field 5 of /proc/<pid>/stat: the process group.
fn process_group(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(2)?.parse().ok()
}

/// Field 22 of /proc/<pid>/stat: start time in clock ticks after boot.
pub fn process_start(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn is_older_than(path: &Path, age: Duration, now: SystemTime) -> bool {
    fs::symlink_metadata(path)
        .and_then(|m| m.modified())
        .map(|t| now.duration_since(t).unwrap_or_default() > age)
        .unwrap_or(false)
}

fn remove_any(path: &Path) {
    if let Err(e) = super::atomic::remove_any(path) {
        if !is_gone(&e) {
            tracing::warn!(path = %path.display(), error = %e, "could not remove a staging leftover");
        }
    }
}
