//! Wiring: opens the spool, recovers it, and runs the stages until shutdown.
//!
//! ```text
//!   HTTP (serve) ──submit──▶ spool ◀──claim/run── dispatch ◀── watch (hints)
//!        ▲                                          │
//!        └────────────── hub (status changes) ◀─────┘
//! ```
//!
//! Shutdown: when `shutdown` fires, the server stops accepting, SSE streams end,
//! the dispatcher stops starting runs; runs still going get `shutdown_grace` to
//! finish, then their process groups are stopped and the events requeued.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Settings;
use crate::dispatch::{self, DispatchHandle};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::spool::Spool;
use crate::{serve, watch};

/// What every stage shares.
pub struct Shared {
    pub settings: Arc<Settings>,
    pub spool: Arc<Spool>,
    pub hub: Arc<Hub>,
    /// Final statuses kept for polls (see `serve::statuses`).
    pub statuses: crate::serve::statuses::Statuses,
    /// Wakes running handlers' runs when they report progress.
    pub runs: Arc<watch::Runs>,
    pub metrics: Metrics,
    pub dispatch: DispatchHandle,
    /// True when other hosts may be writing to this spool.
    pub shared_fs: bool,
}

impl Shared {
    pub fn rescan_interval(&self) -> Duration {
        if self.shared_fs {
            self.settings.shared_rescan_interval
        } else {
            self.settings.rescan_interval
        }
    }
}

/// Runs spoold until `shutdown` is cancelled.
pub async fn run(mut settings: Settings, shutdown: CancellationToken) -> anyhow::Result<()> {
    fit_open_files(&mut settings);
    let settings = Arc::new(settings);
    // Bind first: a second spoold on the same port stops here, before it
    // touches the spool.
    let listener = bind(settings.listen)
        .await
        .with_context(|| format!("cannot listen on {}", settings.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let spool = Spool::open(&settings.spool_dir, &settings.host_id, settings.fsync)
        .with_context(|| format!("cannot open the spool at {}", settings.spool_dir.display()))?;
    let _lock = spool.lock_host()?;
    let shared_fs = settings
        .shared
        .unwrap_or_else(|| crate::spool::is_network_fs(spool.root()));
    let recovered = spool
        .recover(settings.lease_ttl)
        .context("recovery of the spool failed")?;
    tracing::info!(spool = %spool.root().display(), host = %settings.host_id, shared = shared_fs, ?recovered, "spool ready");
    if !settings.handlers_dir.is_dir() {
        tracing::warn!(dir = %settings.handlers_dir.display(), "the handlers directory does not exist; every submit will get 404 until it does");
    }

    let (dispatch, rx) = DispatchHandle::channel();
    let sh = Arc::new(Shared {
        settings: Arc::clone(&settings),
        spool: Arc::new(spool),
        hub: Arc::default(),
        statuses: Default::default(),
        runs: watch::Runs::new(),
        metrics: Metrics::default(),
        dispatch,
        shared_fs,
    });
    let _watcher = match watch::start(&sh.spool.dir("queue"), sh.dispatch.clone()) {
        Ok(w) => Some(w),
        Err(e) => {
            tracing::warn!(error = %e, "no filesystem notifications; relying on the periodic rescan");
            None
        }
    };

    let runs = TaskTracker::new();
    let abort = CancellationToken::new();
    let tasks = TaskTracker::new();
    let mut dispatcher = tasks.spawn(dispatch::run(
        Arc::clone(&sh),
        rx,
        shutdown.clone(),
        abort.clone(),
        runs.clone(),
    ));
    tasks.spawn(gc_loop(Arc::clone(&sh), shutdown.clone()));
    if shared_fs {
        tasks.spawn(follow_other_hosts(Arc::clone(&sh), shutdown.clone()));
    }
    let mut server = tasks.spawn(serve::run(Arc::clone(&sh), listener, shutdown.clone()));
    println!("spoold listening on http://{addr}");
    let auth = if settings.tokens.is_empty() {
        "off".to_owned()
    } else {
        format!("{} tokens", settings.tokens.len())
    };
    tracing::info!(%addr, %auth, "listening");
    if settings.tokens.is_empty() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "--insecure: anyone who can reach this address can run handlers and read results");
    }

    // The dispatcher and the server only end when told to; if one ends on
    // its own (a panic, no HTTP thread could start), spoold is half there:
    // stop, so that a supervisor restarts it.
    let mut failure = None;
    let mut server_ended = false;
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {}
        _ = &mut server => {
            server_ended = true;
            if !shutdown.is_cancelled() {
                let why = "the HTTP server stopped";
                tracing::error!("{why}; shutting down so that a supervisor can restart spoold");
                failure = Some(why);
                shutdown.cancel();
            }
        }
        ended = &mut dispatcher => {
            if !shutdown.is_cancelled() {
                let why = match ended {
                    Err(e) if e.is_panic() => "the dispatcher panicked",
                    _ => "the dispatcher stopped",
                };
                tracing::error!("{why}; shutting down so that a supervisor can restart spoold");
                failure = Some(why);
                shutdown.cancel();
            }
        }
    }
    tracing::info!("shutting down");
    runs.close();
    if tokio::time::timeout(settings.shutdown_grace, runs.wait())
        .await
        .is_err()
    {
        tracing::warn!("handlers still running after shutdown_grace; stopping them and requeueing their events");
        abort.cancel();
        runs.wait().await;
    }
    tasks.close();
    if !server_ended {
        let _ = server.await;
    }
    tasks.wait().await;
    sh.spool.writer().drop_spares();
    match failure {
        Some(why) => anyhow::bail!("{why}; see the log above"),
        None => Ok(()),
    }
}

/// Raises the soft open-file limit to the hard one, and keeps
/// `max_connections` below it (with room for the spool and handlers' pipes),
/// so that a crowd of clients meets the connection limit, not EMFILE.
/// Binds `addr`, retrying for up to 2 s while it is in use: right after a
/// spoold is killed, a handler it was starting can hold its listening socket
/// for some milliseconds (between fork and exec). Another server that keeps
/// the port is still reported, 2 s later.
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    loop {
        match TcpListener::bind(addr).await {
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

pub fn fit_open_files(settings: &mut Settings) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim = raised;
            }
        }
    }
    let reserve = 64 + 4 * settings.concurrency as u64;
    let room = lim.rlim_cur.saturating_sub(reserve).max(16) as usize;
    if settings.max_connections > room {
        tracing::warn!(max_connections = settings.max_connections, open_file_limit = lim.rlim_cur, lowered_to = room, "max_connections is above what the open-file limit allows; lowered it (raise `ulimit -n` to allow more)");
        settings.max_connections = room;
    }
    // Streams never take the last tenth of the connections: polls and
    // submits always find room.
    let streams = (settings.max_connections * 9 / 10).max(1);
    settings.max_streams = settings.max_streams.min(streams);
}

async fn gc_loop(sh: Arc<Shared>, shutdown: CancellationToken) {
    let every = sh.settings.gc_interval;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let spool = Arc::clone(&sh.spool);
        let (retention, batch) = (sh.settings.retention, sh.settings.gc_batch);
        match tokio::task::spawn_blocking(move || spool.sweep(retention, batch)).await {
            Ok(Ok(swept)) if swept.events_deleted + swept.keys_deleted > 0 => {
                tracing::info!(?swept, "retention sweep")
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "retention sweep failed"),
            _ => {}
        }
    }
}

/// Shared mode: other hosts' status writes make no notification here, so the
/// statuses someone follows on this host are re-read every
/// `shared_rescan_interval` and handed to the hub when they moved on.
async fn follow_other_hosts(sh: Arc<Shared>, shutdown: CancellationToken) {
    let every = sh.settings.shared_rescan_interval;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let followed = sh.hub.followed();
        if followed.is_empty() {
            continue;
        }
        let sh2 = Arc::clone(&sh);
        let fresh = tokio::task::spawn_blocking(move || {
            followed
                .into_iter()
                .filter_map(|(id, seq)| {
                    sh2.spool
                        .read_status(&id)
                        .ok()
                        .flatten()
                        .filter(|s| s.seq > seq)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        for status in fresh {
            sh.hub.publish(&status);
        }
    }
}
