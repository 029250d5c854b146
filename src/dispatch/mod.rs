//! Dispatch: turns queue entries into handler runs.
//!
//! One task owns every decision. It keeps the queue entries it knows of in
//! ID order (IDs are time-ordered, so this is FIFO), and on every wake-up
//! starts as many due entries as the global and per-type concurrency limits
//! allow, claiming each by rename just before it starts it: a host never holds
//! an event it cannot run now, so hosts sharing a spool divide the work.
//!
//! It learns of entries from three sources, cheapest first: submits made in
//! this process (and retries of its own runs) hand them over directly; the
//! filesystem watcher passes on the names it sees created in `queue/`; and a
//! periodic rescan of `queue/`, the source of truth, catches everything else
//! (other hosts, lost notifications). The same rescan takes over claims of
//! other hosts whose lease expired.
//!
//! Runs are separate tasks ([`runner`]); they report back when done.

pub mod handlers;
pub mod pending;
pub mod process;
pub mod progress;
pub mod retry;
pub mod runner;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant as StdInstant};

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Shared;
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
    /// A run ended.
    Finished(String),
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
    running: HashMap<String, usize>,
    total: usize,
    limits: Limits,
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
        running: HashMap::new(),
        total: 0,
        limits: Limits::default(),
        warned: HashSet::new(),
        abort,
        tracker,
    };
    let interval = d.sh.rescan_interval();
    let mut next_scan = Instant::now();
    loop {
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
    tracing::info!(running = d.total, "dispatcher stopped taking new work");
}

impl Dispatcher {
    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Queued(id, entry) => {
                self.pending.insert(id, entry);
            }
            Msg::Seen(id) => self.learn(id),
            Msg::Rescan => {
                // Coalesced: the loop rescans when its timer says so; make it now.
                let _ = self.rescan_now();
            }
            Msg::Finished(kind) => {
                self.total -= 1;
                if let Some(n) = self.running.get_mut(&kind) {
                    *n -= 1;
                }
            }
        }
    }

    fn rescan_now(&mut self) -> crate::spool::Result<()> {
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
        if !self.pending.contains(&id) {
            if let Some(entry) = read_entry(&self.sh.spool, &id) {
                self.pending.insert(id, entry);
            }
        }
    }

    async fn rescan(&mut self) {
        if let Err(e) = self.rescan_now() {
            tracing::error!(error = %e, "cannot list the queue");
        }
        let sh = Arc::clone(&self.sh);
        let taken = tokio::task::spawn_blocking(move || {
            take_over_stale_claims(&sh.spool, sh.settings.lease_ttl)
        })
        .await;
        if let Ok(ids) = taken {
            for id in ids {
                if let Some(entry) = read_entry(&self.sh.spool, &id) {
                    self.pending.insert(id, entry);
                }
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
        let mut full: HashSet<String> = HashSet::new();
        while self.total < capacity {
            let mut next = None;
            for (id, kind) in self.pending.ready() {
                if full.contains(kind) {
                    continue;
                }
                let running = self.running.get(kind).copied().unwrap_or(0);
                if running >= self.limits.get(&self.sh.settings.handlers_dir, kind) {
                    full.insert(kind.to_owned());
                    continue;
                }
                next = Some((id.clone(), kind.to_owned()));
                break;
            }
            let Some((id, kind)) = next else { break };
            self.pending.remove(&id);
            match self.sh.spool.claim(&id) {
                Ok(true) => self.start(id, kind),
                Ok(false) => {}
                Err(e) => tracing::error!(%id, error = %e, "cannot claim a queue entry"),
            }
        }
    }

    fn start(&mut self, id: EventId, kind: String) {
        self.total += 1;
        *self.running.entry(kind.clone()).or_default() += 1;
        let sh = Arc::clone(&self.sh);
        let abort = self.abort.clone();
        self.tracker.spawn(async move {
            runner::run(Arc::clone(&sh), id, abort).await;
            sh.dispatch.send(Msg::Finished(kind));
        });
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

/// Reads a queue entry; a hand-made or damaged one still runs (its type then
/// comes from event.json, or it is dead-lettered by the runner).
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

/// Moves other hosts' claims whose lease ran out back to `queue/`.
/// Returns the IDs this call put back.
fn take_over_stale_claims(spool: &Spool, ttl: Duration) -> Vec<EventId> {
    let mut taken = Vec::new();
    let Ok(hosts) = std::fs::read_dir(spool.dir("running")) else {
        return taken;
    };
    let mut now = None;
    for host in hosts.flatten() {
        if host.file_name().to_str() == Some(spool.host()) {
            continue;
        }
        let Ok(claims) = std::fs::read_dir(host.path()) else {
            continue;
        };
        for claim in claims.flatten() {
            let Some(id) = claim
                .file_name()
                .to_str()
                .and_then(|n| EventId::parse(n).ok())
            else {
                continue;
            };
            let Ok(mtime) = claim.metadata().and_then(|m| m.modified()) else {
                continue;
            };
            let fs_now = match now {
                Some(t) => t,
                None => match spool.fs_now() {
                    Ok(t) => *now.insert(t),
                    Err(_) => return taken,
                },
            };
            if fs_now.duration_since(mtime).unwrap_or_default() > ttl {
                // rename, not link: when several hosts race, exactly one moves it.
                match crate::spool::atomic::rename_checked(&claim.path(), &spool.queue_path(&id)) {
                    Ok(()) => {
                        tracing::warn!(%id, host = ?host.file_name(), "took over a claim whose lease expired");
                        taken.push(id);
                    }
                    Err(e) => tracing::debug!(%id, error = %e, "takeover raced with another host"),
                }
            }
        }
    }
    taken
}
