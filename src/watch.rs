//! The filesystem watcher: a hint, never the truth.
//!
//! It watches `queue/` and tells the dispatcher about each name created or
//! moved in there, so a locally published entry starts within microseconds.
//! It never decides anything: the dispatcher's periodic rescan is what
//! guarantees progress. When the kernel's notification queue overflows
//! (`Flag::Rescan`) or the watcher reports an error, it asks for a rescan.
//!
//! Known limit: on NFS (and FUSE) other hosts' writes produce no
//! notifications at all; shared mode relies on the shorter rescan interval.
//!
//! [`Runs`] does the same for running events: it wakes a run when its
//! handler reports progress (the handler runs on this host, so this works
//! on NFS too).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use notify::event::{AccessKind, AccessMode, EventKind, Flag, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::Notify;

use crate::dispatch::{DispatchHandle, Msg};
use crate::spool::ids::EventId;

/// Starts watching `queue_dir`. Keep the returned watcher alive.
pub fn start(queue_dir: &Path, dispatch: DispatchHandle) -> notify::Result<RecommendedWatcher> {
    let mut watcher =
        notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
            Ok(event) if event.flag() == Some(Flag::Rescan) => dispatch.send(Msg::Rescan),
            Ok(event)
                if matches!(
                    event.kind,
                    EventKind::Create(_) | EventKind::Modify(ModifyKind::Name(RenameMode::To))
                ) =>
            {
                for path in &event.paths {
                    if let Some(id) = path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .and_then(|n| EventId::parse(n).ok())
                    {
                        dispatch.send(Msg::Seen(id));
                    }
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "filesystem watcher error; rescanning the queue");
                dispatch.send(Msg::Rescan);
            }
        })?;
    watcher.watch(queue_dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
}

/// Wakes a run when its handler writes `progress.json` or its `cancel`
/// marker appears, so a progress report reaches subscribers at once rather
/// than at the next `progress_interval` check. One inotify instance for all
/// runs, one watch per running event's directory. A hint too: the periodic
/// check still runs, and is all there is where notifications do not work.
pub struct Runs {
    watcher: Mutex<Option<RecommendedWatcher>>,
    waiting: Arc<Mutex<HashMap<PathBuf, Arc<Notify>>>>,
}

/// One run's watch; dropping it stops watching.
pub struct Following {
    runs: Arc<Runs>,
    dir: PathBuf,
    pub wake: Arc<Notify>,
}

/// The names in an event's directory that a run wants to hear about.
const WAKING: [&str; 2] = ["progress.json", "cancel"];

impl Runs {
    /// Without notifications (the watcher cannot start), runs rely on the
    /// periodic check alone.
    pub fn new() -> Arc<Runs> {
        let waiting: Arc<Mutex<HashMap<PathBuf, Arc<Notify>>>> = Arc::default();
        let table = Arc::clone(&waiting);
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            let Ok(event) = res else { return };
            // Writes only: spoold's own reads of progress.json (opens and
            // closes) would wake the run again after every check.
            let wrote = matches!(
                event.kind,
                EventKind::Create(_)
                    | EventKind::Modify(_)
                    | EventKind::Access(AccessKind::Close(AccessMode::Write))
            );
            if !wrote {
                return;
            }
            for path in &event.paths {
                let waking = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| WAKING.contains(&n));
                if let (true, Some(dir)) = (waking, path.parent()) {
                    let table = table.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(wake) = table.get(dir) {
                        wake.notify_one();
                    }
                }
            }
        });
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "no notifications for running handlers' progress; checking every progress_interval");
                None
            }
        };
        Arc::new(Runs {
            watcher: Mutex::new(watcher),
            waiting,
        })
    }

    /// Watches the event directory `dir` for as long as the result lives.
    pub fn follow(self: &Arc<Runs>, dir: &Path) -> Following {
        let wake = Arc::new(Notify::new());
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(dir.to_owned(), Arc::clone(&wake));
        if let Some(w) = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                tracing::debug!(error = %e, "cannot watch the event's directory; checking every progress_interval");
            }
        }
        Following {
            runs: Arc::clone(self),
            dir: dir.to_owned(),
            wake,
        }
    }
}

impl Drop for Following {
    fn drop(&mut self) {
        if let Some(w) = self
            .runs
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = w.unwatch(&self.dir);
        }
        self.runs
            .waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.dir);
    }
}
