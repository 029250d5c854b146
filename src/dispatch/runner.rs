//! One attempt of one claimed event, from its `running` status to the status
//! that ends it (final, or queued again for a retry).
//!
//! The runner is the single writer of the event's status while it holds the
//! claim (checked by its [`ClaimToken`] before every write). It records
//! `attempt` before the handler starts, so every start is counted, and it
//! writes the final status, fsync'd, before it lets go of the claim (see
//! [`outcome`]). The `running` status and progress are written with their
//! data synced but not their name: never torn, and at worst the previous
//! version after a power cut, which ends the run anyway.
//!
//! A failing handler is an outcome, not an error. A spool error (disk full,
//! out of file descriptors) is an error: the event is given back to the
//! queue with backoff, so it never stays claimed with nobody running it.
//! File I/O runs on blocking threads, never on the runtime's.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{interval_at, sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::handlers::{self, HandlerSpec};
use super::outcome::{self, Ending, Verdict};
use super::process::{self, Captured, Launch};
use super::progress::{Progress, ProgressFile};
use super::Slot;
use crate::app::Shared;
use crate::metrics::Metrics;
use crate::spool::atomic::Durability;
use crate::spool::claim::ClaimToken;
use crate::spool::ids::{EventId, HandlerType};
use crate::spool::records::{Envelope, State, Status, Timestamp};
use crate::spool::recover::ProcessMark;
use crate::spool::SpoolError;

/// What an attempt starts from, once its `running` status is written.
struct Started {
    env: Envelope,
    spec: HandlerSpec,
    st: Status,
}

/// Runs one attempt of a claimed event.
pub async fn run(
    sh: Arc<Shared>,
    id: EventId,
    token: ClaimToken,
    abort: CancellationToken,
    slot: Slot,
) {
    use tracing::Instrument;
    let span = tracing::info_span!("event", %id);
    async {
        if let Err(e) = attempt(&sh, &id, token, &abort, slot).await {
            tracing::error!(error = %e, "spool error during the attempt; giving the event back to the queue");
            let why = e.brief();
            let given = blocking(&sh, move |sh| {
                let given = outcome::give_back(sh, &id, token, &why);
                sh.spool.forget_process(&id);
                given
            })
            .await;
            if let Err(e) = given {
                tracing::error!(error = %e, "could not give the event back either; a rescan will once its lease expires");
            }
        }
    }
    .instrument(span)
    .await
}

/// Runs `f` on a blocking thread (a panic in it carries on in the caller).
pub async fn blocking<T, F>(sh: &Arc<Shared>, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce(&Shared) -> T + Send + 'static,
{
    joined(start_blocking(sh, f)).await
}

/// Starts `f` on a blocking thread, in the current span; see [`joined`].
fn start_blocking<T, F>(sh: &Arc<Shared>, f: F) -> tokio::task::JoinHandle<T>
where
    T: Send + 'static,
    F: FnOnce(&Shared) -> T + Send + 'static,
{
    let sh = Arc::clone(sh);
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| f(&sh)))
}

/// Waits for a task from [`start_blocking`] (a panic in it carries on here).
async fn joined<T>(task: tokio::task::JoinHandle<T>) -> T {
    match task.await {
        Ok(v) => v,
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn attempt(
    sh: &Arc<Shared>,
    id: &EventId,
    token: ClaimToken,
    abort: &CancellationToken,
    slot: Slot,
) -> Result<(), SpoolError> {
    let id2 = id.clone();
    let Some(Started { env, spec, mut st }) =
        blocking(sh, move |sh| start(sh, &id2, token)).await?
    else {
        return Ok(());
    };
    let dir = sh.spool.event_dir(id);
    let timeout = Duration::from_secs_f64(env.timeout.clamp(0.001, 1e9));
    let launch = Launch {
        program: &spec.path,
        cwd: &dir,
        env: handler_env(
            sh,
            &env,
            &spec,
            &dir,
            st.attempt,
            Timestamp::now().plus(timeout),
        ),
        stdin: env.payload.get().as_bytes().to_vec(),
        stdout_cap: sh.settings.max_result_bytes,
        stderr_tail: sh.settings.stderr_tail_bytes,
    };
    let mut running = match process::spawn(launch) {
        Ok(r) => r,
        Err(e) => {
            let verdict = spawn_failure(&spec, &e);
            let id = id.clone();
            return blocking(sh, move |sh| {
                outcome::finish(sh, &id, token, &env, st, verdict)
            })
            .await;
        }
    };
    Metrics::inc(&sh.metrics.started);
    sh.metrics.running.fetch_add(1, Ordering::Relaxed);
    // The mark is written while the handler is watched, not before: a
    // short handler may exit meanwhile. It is waited for before the run
    // settles, which forgets it.
    let (id2, pid, attempt) = (id.clone(), running.pid, st.attempt);
    let marking = start_blocking(sh, move |sh| mark_process(sh, &id2, pid, attempt));
    let mut progress = ProgressFile::new(dir.join("progress.json"));
    let ending = supervise(
        sh,
        id,
        token,
        &mut running,
        &mut st,
        &mut progress,
        timeout,
        abort,
    )
    .await;
    sh.metrics.running.fetch_sub(1, Ordering::Relaxed);
    let (stdout, stderr) = collect_output(running).await;
    // The handler is gone: the next one may start while this outcome is
    // written.
    drop(slot);
    joined(marking).await;
    // Exiting (killed by SIGPIPE, say) may beat the overflow signal: stdout decides.
    let ending = if stdout.overflowed {
        Ending::Overflow
    } else {
        ending
    };
    if let Some(p) = progress.poll() {
        apply_progress(&mut st, p);
    }
    if let Ending::Exited(code) = ending {
        st.exit_code = code.code();
    }
    let reported_type = progress.content_type.take();
    let id = id.clone();
    blocking(sh, move |sh| {
        let settled = settle(
            sh,
            &id,
            token,
            &env,
            st,
            &ending,
            stdout,
            &stderr,
            &spec,
            reported_type,
        );
        // The run is over and its handler group stopped. Every way out but
        // one dropped the process mark with the claim; a run that lost its
        // claim to another host (the lease lapsed) recorded nothing, so its
        // mark would stay until a restart (found by the multihost
        // frozen-host test). Not reached after a panic: then the mark is
        // what lets the rescan kill the handler.
        sh.spool.forget_process(&id);
        settled
    })
    .await
}

/// Keeps what the handler left and writes the outcome.
#[allow(clippy::too_many_arguments)]
fn settle(
    sh: &Shared,
    id: &EventId,
    token: ClaimToken,
    env: &Envelope,
    st: Status,
    ending: &Ending,
    stdout: Captured,
    stderr: &[u8],
    spec: &HandlerSpec,
    reported_type: Option<String>,
) -> Result<(), SpoolError> {
    // The event's directory (or its event.json) was removed while the
    // handler ran, by the handler or by hand: put event.json back from
    // memory, so that the event ends with a status that says so instead
    // of vanishing (found by the fault suite's bad-handler tests).
    if sh.spool.holds(id, token) && sh.spool.restore_envelope(id, env)? {
        tracing::error!(
            "the event's directory was removed while its handler ran; failing the event"
        );
        let why = "the event's directory was removed while its handler ran (by the handler, or by hand); not retried";
        return outcome::finish(sh, id, token, env, st, Verdict::Exhausted(why.into()));
    }
    if !stderr.is_empty() {
        if let Err(e) = sh
            .spool
            .write_event_file(id, "stderr", stderr, Durability::DataOnly)
        {
            tracing::warn!(error = %e, "could not keep the handler's stderr");
        }
    }
    let verdict = match outcome::judge(ending, stderr) {
        Verdict::Succeeded(_) => match super::result::store(sh, id, spec, reported_type, stdout)? {
            Ok(info) => Verdict::Succeeded(info),
            Err(why) => Verdict::Final(State::Failed, why),
        },
        other => other,
    };
    outcome::finish(sh, id, token, env, st, verdict)
}

/// Everything before the handler starts, on a blocking thread. `None` when
/// the event was settled without running (final already, cancelled, out of
/// attempts, damaged, or no runnable handler).
fn start(sh: &Shared, id: &EventId, token: ClaimToken) -> Result<Option<Started>, SpoolError> {
    let spool = &sh.spool;
    let env = match spool.read_envelope(id) {
        Ok(Some(env)) => env,
        Ok(None) => {
            return outcome::dead_on_arrival(sh, id, token, "event.json is missing").map(|()| None)
        }
        Err(e @ SpoolError::Damaged { .. }) => {
            return outcome::dead_on_arrival(sh, id, token, &e.brief()).map(|()| None)
        }
        Err(e) => return Err(e),
    };
    let status = spool
        .status_or_rebuild_from(id, Some(&env))?
        .unwrap_or_else(|| Status::initial(&env));
    if status.state.is_terminal() {
        spool.release_final(id, token, &status)?;
        return Ok(None);
    }
    if spool.event_dir(id).join("cancel").exists() {
        return outcome::cancel_unstarted(sh, id, token, &env, status).map(|()| None);
    }
    if status.attempt >= status.max_attempts {
        // The last attempt was cut short (spoold was killed, or its host lost
        // the lease) with no verdict: the budget is spent. A run that takes
        // its host down with it must not do so forever.
        let why = format!(
            "the last attempt ({} of {}) was cut short and not retried ({})",
            status.attempt,
            status.max_attempts,
            status.message.as_deref().unwrap_or("its host stopped")
        );
        return outcome::finish(sh, id, token, &env, status, Verdict::Exhausted(why))
            .map(|()| None);
    }
    let st = running_status(&status, spool.host());
    if !spool.holds(id, token) {
        return Ok(None);
    }
    spool.write_status(&st, Durability::Volatile)?;
    sh.hub.publish(&st);
    tracing::info!(kind = %env.kind, attempt = st.attempt, "starting handler");
    for stale in ["result", "progress.json", "stderr"] {
        let _ = fs::remove_file(spool.event_dir(id).join(stale));
    }
    // Resolved after the attempt is counted: a handler that is missing now
    // (in the middle of a deploy, say) is retried, but not forever.
    let resolved = HandlerType::parse(&env.kind)
        .map_err(|e| e.to_string())
        .and_then(|k| {
            handlers::resolve(&sh.settings.handlers_dir, &k).map_err(|e| e.brief(&env.kind))
        });
    match resolved {
        Ok(spec) => Ok(Some(Started { env, spec, st })),
        Err(why) => {
            outcome::finish(sh, id, token, &env, st, Verdict::Retryable(why)).map(|()| None)
        }
    }
}

/// The status of a new attempt.
fn running_status(prev: &Status, host: &str) -> Status {
    let mut st = prev.next();
    st.state = State::Running;
    st.attempt += 1;
    st.host = Some(host.to_owned());
    st.started_at = Some(st.updated_at);
    st.finished_at = None;
    st.retry_at = None;
    st.progress = None;
    st.message = None;
    st.error = None;
    st.exit_code = None;
    st.data = serde_json::json!({});
    st
}

/// A handler that cannot be started: permanent when it never can be (no
/// such file or interpreter, not executable), retried when it is the
/// machine's passing trouble (out of processes, memory or descriptors).
fn spawn_failure(spec: &HandlerSpec, e: &std::io::Error) -> Verdict {
    // Named as the operator knows it, not by the server's absolute path.
    let path = format!(
        "handlers/{}",
        spec.path
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::EACCES) | Some(libc::ENOEXEC) | Some(libc::ENOTDIR) => Verdict::Final(
            State::Failed,
            format!("could not start {path}: {e} (is it executable, with a #! line naming an interpreter that exists?)"),
        ),
        _ => Verdict::Retryable(format!("could not start {path}: {e}")),
    }
}

fn handler_env(
    sh: &Shared,
    env: &Envelope,
    spec: &HandlerSpec,
    dir: &Path,
    attempt: u32,
    deadline: Timestamp,
) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = Vec::new();
    vars.push(("PATH".into(), handler_path().to_owned()));
    vars.push((
        "LANG".into(),
        std::env::var("LANG").unwrap_or_else(|_| "C.UTF-8".into()),
    ));
    for name in sh.settings.pass_env.iter().chain(&spec.env) {
        if let Ok(value) = std::env::var(name) {
            vars.push((name.clone(), value));
        }
    }
    let file = |name: &str| dir.join(name).display().to_string();
    vars.extend([
        ("SPOOL_ID".into(), env.id.clone()),
        ("SPOOL_TYPE".into(), env.kind.clone()),
        ("SPOOL_DIR".into(), sh.spool.root().display().to_string()),
        ("SPOOL_EVENT".into(), file("event.json")),
        ("SPOOL_PROGRESS".into(), file("progress.json")),
        ("SPOOL_RESULT".into(), file("result")),
        ("SPOOL_ATTEMPT".into(), attempt.to_string()),
        ("SPOOL_DEADLINE".into(), deadline.to_string()),
    ]);
    vars
}

/// The PATH handlers get: spoold's own, with spoold's directory in front
/// so that shell handlers can call `spoold report`.
fn handler_path() -> &'static str {
    static PATH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
        match std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
        {
            Some(own) => format!("{}:{path}", own.display()),
            None => path,
        }
    })
}

/// Notes the handler's pid, start time and boot, so that a restarted
/// spoold (or a rescan that finds the claim abandoned) can kill it.
fn mark_process(sh: &Shared, id: &EventId, pid: i32, attempt: u32) {
    let Some(mark) = ProcessMark::of(pid, attempt) else {
        return;
    };
    if let Err(e) = sh.spool.mark_process(id, &mark) {
        tracing::warn!(error = %e, "could not note the handler's pid; a crash now could not stop it");
    }
}

#[allow(clippy::too_many_arguments)]
async fn supervise(
    sh: &Arc<Shared>,
    id: &EventId,
    token: ClaimToken,
    running: &mut process::Running,
    st: &mut Status,
    progress: &mut ProgressFile,
    timeout: Duration,
    abort: &CancellationToken,
) -> Ending {
    let now = Instant::now();
    let deadline = now + timeout;
    // The first check of progress is due at once: the handler may have
    // reported before its directory was watched. The lease's first touch
    // is due a period after the start. (It used to be due at once too, and
    // awaited before the handler was watched; tokio's timer fires a tick
    // due now at its next millisecond, so noticing that a short handler
    // had exited took up to 1 ms longer, half of a no-op run's time.)
    let every = |first: Instant, period: Duration| {
        let mut i = interval_at(first, period);
        i.set_missed_tick_behavior(MissedTickBehavior::Delay);
        i
    };
    let mut tick = every(now, sh.settings.progress_interval);
    let lease_every = sh.settings.lease_ttl / 3;
    let mut lease = every(now + lease_every, lease_every);
    let dir = sh.spool.event_dir(id);
    let cancel_marker = dir.join("cancel");
    // Progress is checked as soon as the handler writes it, but checks woken
    // by writes are WAKE_GAP apart (a write during the gap is checked at its
    // end). The tick is the fallback; it skips a check when any was made
    // within WAKE_GAP. So a handler that reports in a tight loop costs at
    // most 1 / WAKE_GAP + 1 / max(progress_interval, WAKE_GAP) status writes
    // per second. A tick's check does not hold up the next write's: that
    // cost every report up to WAKE_GAP (the SSE measure's median went from
    // 31 to 53-69 ms).
    let following = sh.runs.follow(&dir);
    let long_ago = Instant::now()
        .checked_sub(WAKE_GAP)
        .unwrap_or_else(Instant::now);
    let (mut woke, mut checked) = (long_ago, long_ago);
    let mut due: Option<Instant> = None;
    let stop = loop {
        tokio::select! {
            exit = running.child.wait() => {
                return Ending::Exited(exit.unwrap_or(ExitStatus::from_raw(0x7f00)));
            }
            _ = sleep_until(deadline) => break Ending::TimedOut,
            _ = running.overflow.cancelled() => break Ending::Overflow,
            _ = abort.cancelled() => break Ending::ShuttingDown,
            _ = following.wake.notified(), if due.is_none() => {
                due = Some((woke + WAKE_GAP).max(Instant::now()));
            }
            _ = sleep_until(due.unwrap_or(deadline)), if due.is_some() => {
                due = None;
                (woke, checked) = (Instant::now(), Instant::now());
                if let Some(stop) = check(sh, id, token, st, progress, &cancel_marker).await {
                    break stop;
                }
            }
            _ = tick.tick() => {
                if checked.elapsed() < WAKE_GAP {
                    continue;
                }
                checked = Instant::now();
                if let Some(stop) = check(sh, id, token, st, progress, &cancel_marker).await {
                    break stop;
                }
            }
            _ = lease.tick() => {
                let id = id.clone();
                if !blocking(sh, move |sh| sh.spool.touch_claim(&id, token).unwrap_or(true)).await {
                    break Ending::LostLease;
                }
            }
        }
    };
    drop(following);
    tracing::info!(pid = running.pid, "stopping the handler's process group");
    let _ = process::terminate(&mut running.child, running.pid, sh.settings.kill_grace).await;
    stop
}

/// The least time between two progress checks woken by the handler's writes.
const WAKE_GAP: Duration = Duration::from_millis(50);

/// Folds in new progress and looks for the cancel marker; the ending, if
/// either ends the run.
async fn check(
    sh: &Arc<Shared>,
    id: &EventId,
    token: ClaimToken,
    st: &mut Status,
    progress: &mut ProgressFile,
    cancel_marker: &Path,
) -> Option<Ending> {
    if let Some(p) = progress.poll() {
        if apply_progress(st, p) && !publish(sh, id, token, st).await {
            return Some(Ending::LostLease);
        }
    }
    cancel_marker.exists().then_some(Ending::Cancelled)
}

/// Whatever is left of the group goes now; then its output is collected,
/// giving up on pipes that a process which escaped the group holds open.
async fn collect_output(running: process::Running) -> (Captured, Vec<u8>) {
    process::signal_group(running.pid, libc::SIGKILL);
    let stop_reading = running.stop_reading.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop_reading.cancel();
    });
    let stdout = running.stdout.await.unwrap_or(Captured {
        bytes: Vec::new(),
        overflowed: false,
    });
    let stderr = running.stderr.await.unwrap_or_default();
    running.stop_reading.cancel();
    (stdout, stderr)
}

/// Folds a progress reading into the status; true when anything changed.
pub fn apply_progress(st: &mut Status, p: Progress) -> bool {
    let mut next = st.next();
    if p.progress.is_some() {
        next.progress = p.progress;
    }
    if p.message.is_some() {
        next.message = p.message;
    }
    if let Some(data) = p.data {
        next.data = data;
    }
    let changed =
        next.progress != st.progress || next.message != st.message || next.data != st.data;
    if changed {
        *st = next;
    }
    changed
}

/// Writes and publishes a progress status. False: the claim is not ours any more.
async fn publish(sh: &Arc<Shared>, id: &EventId, token: ClaimToken, st: &Status) -> bool {
    let (id, status) = (id.clone(), st.clone());
    blocking(sh, move |sh| {
        if !sh.spool.holds(&id, token) {
            return false;
        }
        match sh.spool.write_status(&status, Durability::Volatile) {
            Ok(()) => sh.hub.publish(&status),
            Err(e) => tracing::warn!(error = %e, "could not record progress"),
        }
        true
    })
    .await
}
pub use super::outcome::cancel_queued;
