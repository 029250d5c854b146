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

use std::path::Path;

use notify::event::{EventKind, Flag, ModifyKind, RenameMode};
use notify::{RecommendedWatcher, RecursiveMode, Watcher};

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
