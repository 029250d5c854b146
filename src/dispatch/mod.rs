//! Dispatch: turns queue entries into handler runs.
//!
//! One task owns every decision. It keeps the queue entries it knows of
//! ([`pending`]), and on every wake-up starts as many due entries as the
//! global and per-type concurrency limits allow, oldest first, claiming each
//! by rename just before it starts it: a host never holds an event it cannot
//! run now, so hosts sharing a spool divide the work. It never claims an ID it
//! is already running.
//!
//! It learns of entries from three sources, cheapest first: submits made in
//! this process (and retries of its own runs) hand them over directly; the
//! filesystem watcher passes on the names it sees created in `queue/`; and a
//! periodic rescan of `queue/`, the source of truth, catches everything else
//! (other hosts, lost notifications). The same rescan moves stale claims back
//! to the queue: other hosts' whose lease expired, and this host's own that
//! no runner holds (left by a runner that could not finish its work).
//!
//! Runs are separate tasks ([`runner`]); they report back when done, even
//! when they panic.

pub mod handlers;
pub mod outcome;
pub mod pending;
pub mod process;
pub mod progress;
pub mod result;
pub mod retry;
pub mod runner;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant, SystemTime};

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Shared;
use crate::spool::claim::ClaimToken;
use crate::spool::ids::{EventId, HandlerType};
use crate::spool::records::{QueueEntry, Timestamp};
use crate::spool::Spool;
use pending::Pending;

/// Messages to the dispatcher.
pub enum Msg {
    /// An entry was published in `queue/` (by us, or seen by the watcher).
    Queued(EventId, QueueEntry),
    /// A name appeared in `queue/`; its entry must be read.
    Seen(EventId),
    /// Something may have been missed: list `queue/` again.
    Rescan,
    /// A handler of this type ended (or its run did without one): its slot
    /// is free.
    SlotFree(String),
    /// A run ended (or panicked): its event is no longer ours.
    Finished(EventId),
}

/// One place in the concurrency limits (`concurrency`, and its type's),
/// taken when a run starts and given back when dropped: by the runner as
/// soon as its handler has exited, so the next handler starts while this
/// one's outcome is written and flushed.
pub struct Slot {
    dispatch: DispatchHandle,
    kind: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.dispatch
            .send(Msg::SlotFree(std::mem::take(&mut self.kind)));
    }
}

/// The sending side, held by the server, the watcher and the runners.
#[derive(Clone)]
pub struct DispatchHandle {
    tx: mpsc::UnboundedSender<Msg>,
    pending: Arc<AtomicUsize>,
}

impl DispatchHandle {
    pub fn channel() -> (DispatchHandle, mpsc::UnboundedReceiver<Msg>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            DispatchHandle {
                tx,
                pending: Arc::default(),
            },
            rx,
        )
    }

    pub fn queued(&self, id: EventId, entry: QueueEntry) {
        let _ = self.tx.send(Msg::Queued(id, entry));
    }

    pub fn send(&self, msg: Msg) {
        let _ = self.tx.send(msg);
    }

    /// Queue entries known to the dispatcher (for /metrics).
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

struct Dispatcher {
    sh: Arc<Shared>,
    pending: Pending,
    /// Runs going on now (claimed, not yet finished).
    running: HashSet<EventId>,
    /// Entries queued again by a run that has not yet told it finished (a
    /// retry): pending once it has.
    parked: HashMap<EventId, QueueEntry>,
    /// Slots taken: handlers running or about to (see [`Slot`]).
    busy: usize,
    /// Slots taken, per type.
    per_type: HashMap<String, usize>,
    limits: Limits,
    /// Claims seen stale once: a second sighting, unchanged, is needed.
    suspects: HashMap<PathBuf, SystemTime>,
    warned: HashSet<PathBuf>,
    abort: CancellationToken,
    tracker: TaskTracker,
}

/// Runs until `shutdown`; then stops starting runs. Runs still going are told
/// to stop when `abort` fires and are awaited through `tracker`.
pub async fn run(
    sh: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Msg>,
    shutdown: CancellationToken,
    abort: CancellationToken,
    tracker: TaskTracker,
) {
    let mut d = Dispatcher {
        sh,
        pending: Pending::default(),
        running: HashSet::new(),
        parked: HashMap::new(),
        busy: 0,
        per_type: HashMap::new(),
        limits: Limits::default(),
        suspects: HashMap::new(),
        warned: HashSet::new(),
        abort,
        tracker,
    };
    let interval = d.sh.rescan_interval();
    let mut next_scan = Instant::now();
    while !shutdown.is_cancelled() {
        if Instant::now() >= next_scan {
            d.rescan().await;
            next_scan = Instant::now() + interval;
        }
        d.start_due();
        d.sh.dispatch
            .pending
            .store(d.pending.len(), Ordering::Relaxed);
        let wake = d.next_due().map_or(next_scan, |t| t.min(next_scan));
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                d.handle(msg);
                while let Ok(msg) = rx.try_recv() {
                    d.handle(msg);
                }
            }
            _ = sleep_until(wake) => {}
        }
    }
    tracing::info!(
        running = d.running.len(),
        "dispatcher stopped taking new work"
    );
}

impl Dispatcher {
    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Queued(id, entry) => {
                if self.running.contains(&id) {
                    // A retry: its run sends this before it ends. Dropped,
                    // the retry waited for the next rescan of `queue/`,
                    // however short its backoff.
                    self.parked.insert(id, entry);
                } else {
                    self.pending.insert(id, entry);
                }
            }
            Msg::Seen(id) => self.learn(id),
            Msg::Rescan => {
                if let Err(e) = self.rescan_queue() {
                    tracing::error!(error = %e, "cannot list the queue");
                }
            }
            Msg::SlotFree(kind) => {
                self.busy = self.busy.saturating_sub(1);
                if let Some(n) = self.per_type.get_mut(&kind) {
                    *n = n.saturating_sub(1);
                }
            }
            Msg::Finished(id) => {
                self.running.remove(&id);
                if let Some(entry) = self.parked.remove(&id) {
                    self.pending.insert(id, entry);
                }
            }
        }
    }

    fn rescan_queue(&mut self) -> crate::spool::Result<()> {
        let (ids, strays) = self.sh.spool.list_queue()?;
        for stray in strays {
            if self.warned.insert(stray.clone()) {
                tracing::warn!(path = %stray.display(), "ignoring a file in queue/ whose name is not an event ID; remove it by hand");
            }
        }
        let listed: HashSet<&EventId> = ids.iter().collect();
        self.pending.retain(|id| listed.contains(id));
        for id in ids {
            self.learn(id);
        }
        Ok(())
    }

    /// Adds a queue entry not known yet, reading it from disk.
    fn learn(&mut self, id: EventId) {
        if !self.pending.contains(&id) && !self.running.contains(&id) {
            if let Some(entry) = read_entry(&self.sh.spool, &id) {
                self.pending.insert(id, entry);
            }
        }
    }

    async fn rescan(&mut self) {
        if let Err(e) = self.rescan_queue() {
            tracing::error!(error = %e, "cannot list the queue");
        }
        let sh = Arc::clone(&self.sh);
        let ours = self.running.clone();
        let suspects = std::mem::take(&mut self.suspects);
        let scan = tokio::task::spawn_blocking(move || {
            take_over_stale_claims(&sh.spool, sh.settings.lease_ttl, &ours, suspects)
        })
        .await;
        if let Ok((taken, suspects)) = scan {
            self.suspects = suspects;
            for id in taken {
                self.learn(id);
            }
        }
    }

    fn next_due(&self) -> Option<Instant> {
        let now_ms = Timestamp::now().unix_ms();
        let due = self.pending.next_due_ms()?;
        Some(Instant::now() + Duration::from_millis(due.saturating_sub(now_ms)))
    }

    /// Starts due entries, oldest first, while there is room; an entry whose
    /// type is at its own limit is passed over, not waited for.
    fn start_due(&mut self) {
        let capacity = self.sh.settings.concurrency;
        self.pending.promote(Timestamp::now().unix_ms());
        // Runs whose handler exited but whose outcome is still being
        // written keep their claims: at most as many as there are places,
        // so a host on a slow disk never holds more than twice its share.
        while self.busy < capacity && self.running.len() < 2 * capacity {
            let (per_type, limits, dir) = (
                &self.per_type,
                &mut self.limits,
                &self.sh.settings.handlers_dir,
            );
            let Some((id, kind)) = self.pending.next_ready(|kind| {
                per_type.get(kind).copied().unwrap_or(0) < limits.get(dir, kind)
            }) else {
                break;
            };
            self.pending.remove(&id);
            match self.sh.spool.claim(&id) {
                Ok(Some(token)) => self.start(id, kind, token),
                Ok(None) => {}
                Err(e) => tracing::error!(%id, error = %e, "cannot claim a queue entry"),
            }
        }
    }

    fn start(&mut self, id: EventId, kind: String, token: ClaimToken) {
        self.running.insert(id.clone());
        self.busy += 1;
        *self.per_type.entry(kind.clone()).or_default() += 1;
        let slot = Slot {
            dispatch: self.sh.dispatch.clone(),
            kind,
        };
        let done = Done {
            sh: Arc::clone(&self.sh),
            id: Some(id.clone()),
        };
        let abort = self.abort.clone();
        self.tracker.spawn(async move {
            runner::run(Arc::clone(&done.sh), id, token, abort, slot).await;
            drop(done);
        });
    }
}

/// Tells the dispatcher that a run ended, however it ended (a panic too).
struct Done {
    sh: Arc<Shared>,
    id: Option<EventId>,
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            if std::thread::panicking() {
                tracing::error!(%id, "the run panicked; its claim is recovered once its lease expires");
            }
            self.sh.dispatch.send(Msg::Finished(id));
        }
    }
}

/// Per-type concurrency limits from `handlers/<type>.toml`, re-read every
/// few seconds so an edited limit takes effect without a restart.
#[derive(Default)]
struct Limits(HashMap<String, (Option<usize>, StdInstant)>);

impl Limits {
    fn get(&mut self, dir: &std::path::Path, kind: &str) -> usize {
        const TTL: Duration = Duration::from_secs(2);
        if let Some((limit, at)) = self.0.get(kind) {
            if at.elapsed() < TTL {
                return limit.unwrap_or(usize::MAX);
            }
        }
        let limit = HandlerType::parse(kind)
            .ok()
            .and_then(|k| handlers::resolve(dir, &k).ok())
            .and_then(|spec| spec.concurrency);
        self.0.insert(kind.to_owned(), (limit, StdInstant::now()));
        limit.unwrap_or(usize::MAX)
    }
}

fn read_entry(spool: &Spool, id: &EventId) -> Option<QueueEntry> {
    let path = spool.queue_path(id);
    match spool.read_entry(&path) {
        Ok(Some(entry)) => Some(entry),
        Ok(None) if path.exists() => {
            let kind = spool
                .read_envelope(id)
                .ok()
                .flatten()
                .map(|e| e.kind)
                .unwrap_or_default();
            Some(QueueEntry {
                kind,
                not_before_ms: None,
            })
        }
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(%id, error = %e, "cannot read a queue entry");
            None
        }
    }
}

/// Moves claims whose lease expired back to `queue/`: other hosts', and this
/// host's own that no runner holds (`ours` are the ones running). A claim
/// must be seen stale, with the same mtime, on two scans in a row, so that a
/// claim caught between its rename and its first lease touch, or a host
/// stalled for a moment, is not taken from its owner. Returns the IDs put
/// back and the claims seen stale once.
fn take_over_stale_claims(
    spool: &Spool,
    ttl: Duration,
    ours: &HashSet<EventId>,
    suspects: HashMap<PathBuf, SystemTime>,
) -> (Vec<EventId>, HashMap<PathBuf, SystemTime>) {
    let mut taken = Vec::new();
    let mut seen_stale = HashMap::new();
    let Ok(hosts) = std::fs::read_dir(spool.dir("running")) else {
        return (taken, seen_stale);
    };
    let Ok(fs_now) = spool.fs_now() else {
        return (taken, seen_stale);
    };
    let own = spool.host();
    for host in hosts.flatten() {
        let Ok(claims) = std::fs::read_dir(host.path()) else {
            continue;
        };
        let is_own = host.file_name().to_str() == Some(own);
        for claim in claims.flatten() {
            let Some(id) = claim
                .file_name()
                .to_str()
                .and_then(|n| EventId::parse(n).ok())
            else {
                continue;
            };
            // Only files are claims (a directory named like an ID is a stray).
            if (is_own && ours.contains(&id)) || !claim.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let Ok(cached) = claim.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            if fs_now.duration_since(cached).unwrap_or_default() <= ttl {
                continue;
            }
            // Looks stale, but the client's attribute cache (NFS actimeo)
            // may be older than the owner's last heartbeat: ask the server
            // before calling it stale (the multihost tests' 4 s attribute
            // cache took over every live lease of 3 s without this).
            let path = claim.path();
            let Ok(mtime) = crate::spool::claim::fresh_mtime(&path) else {
                continue;
            };
            if fs_now.duration_since(mtime).unwrap_or_default() <= ttl {
                continue;
            }
            if suspects.get(&path) != Some(&mtime) {
                seen_stale.insert(path, mtime);
                continue;
            }
            if is_own {
                // Abandoned by a run of this very process: make sure its
                // handler is not still at work before the event runs again.
                spool.kill_leftover(&id);
            }
            match spool.take_over(&path, &id) {
                Ok(true) => {
                    tracing::warn!(%id, host = ?host.file_name(), "moved a claim whose lease expired back to the queue");
                    taken.push(id);
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(%id, error = %e, "could not take over a stale claim"),
            }
        }
    }
    (taken, seen_stale)
}
