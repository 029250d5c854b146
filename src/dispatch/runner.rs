//! One attempt of one claimed event, from its `running` status to the status
//! that ends it (final, or queued again for a retry).
//!
//! The runner is the single writer of the event's status while it holds the
//! claim. It records `attempt` before the handler starts, so every start is
//! counted even when spoold is killed (the write is atomic but not fsync'd:
//! only a power cut can lose it, and then the attempt is re-run anyway), and
//! it writes the final status, fsync'd, before it lets go of the claim, so
//! recovery can always tell what happened.
//!
//! A failing handler is an outcome, not an error: every way a handler can end
//! maps to a state and a sentence in `error`. Errors returned from here are
//! spool I/O failures, logged by the caller.

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{interval, sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::handlers::{self, HandlerSpec};
use super::process::{self, Captured, Launch};
use super::progress::{Progress, ProgressFile};
use super::retry::backoff;
use crate::app::Shared;
use crate::metrics::Metrics;
use crate::spool::atomic::Durability;
use crate::spool::ids::{EventId, HandlerType};
use crate::spool::records::{
    DeadLetter, Envelope, QueueEntry, ResultInfo, State, Status, Timestamp,
};
use crate::spool::recover::{process_start, ClaimRecord, ProcessMark};
use crate::spool::SpoolError;

/// Exit code for "bad input, do not retry" (sysexits EX_DATAERR).
pub const EX_DATAERR: i32 = 65;

/// How the handler's run came to an end.
enum Ending {
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
    Overflow,
    LostLease,
    ShuttingDown,
}

/// What to record.
enum Verdict {
    Succeeded,
    /// A failure that may be retried if attempts are left.
    Retryable(String),
    /// Final: state, error.
    Final(State, String),
    /// Spoold is stopping: back to the queue at once, the attempt not held
    /// against the event (its `max_attempts` grows by one).
    Requeue(String),
    /// No attempts left and no verdict from the last one: dead letter.
    Exhausted(String),
    /// Another host owns the event now: record nothing.
    Abandon,
}

pub async fn run(sh: Arc<Shared>, id: EventId, abort: CancellationToken) {
    use tracing::Instrument;
    let span = tracing::info_span!("event", %id);
    async {
        if let Err(e) = attempt(&sh, &id, &abort).await {
            tracing::error!(error = %e, "spool error while running the event; it will be recovered at the next start");
        }
    }
    .instrument(span)
    .await
}

async fn attempt(sh: &Shared, id: &EventId, abort: &CancellationToken) -> Result<(), SpoolError> {
    let spool = &sh.spool;
    let (env, status) = match load(sh, id) {
        Ok(Some(pair)) => pair,
        Ok(None) => return Ok(()),
        Err(e) => return dead_on_arrival(sh, id, e),
    };
    if status.state.is_terminal() {
        return spool.release(id);
    }
    let dir = spool.event_dir(id);
    if dir.join("cancel").exists() {
        return cancel_unstarted(sh, id, &env, status);
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
        return finish(sh, id, &env, status, Verdict::Exhausted(why), None);
    }
    let spec = match HandlerType::parse(&env.kind)
        .map_err(|e| e.to_string())
        .and_then(|k| handlers::resolve(&sh.settings.handlers_dir, &k).map_err(|e| e.to_string()))
    {
        Ok(spec) => spec,
        Err(e) => return finish(sh, id, &env, status, Verdict::Final(State::Failed, e), None),
    };

    let mut st = status.next();
    st.state = State::Running;
    st.attempt += 1;
    st.host = Some(spool.host().to_owned());
    st.started_at = Some(st.updated_at);
    st.finished_at = None;
    st.retry_at = None;
    st.progress = None;
    st.message = None;
    st.error = None;
    st.exit_code = None;
    st.data = serde_json::json!({});
    // Atomic, not fsync'd: a process crash keeps it (page cache), and after a
    // power cut the attempt is re-run anyway (at-least-once); only the final
    // status must survive everything, and that one is fsync'd.
    spool.write_status(&st, Durability::Volatile)?;
    sh.hub.publish(&st);
    tracing::info!(kind = %env.kind, attempt = st.attempt, "starting handler");
    for stale in ["result", "progress.json", "stderr"] {
        let _ = fs::remove_file(dir.join(stale));
    }

    let timeout = Duration::from_secs_f64(env.timeout.max(0.001));
    let deadline = Timestamp::now().plus(timeout);
    let launch = Launch {
        program: &spec.path,
        cwd: &dir,
        env: handler_env(sh, &env, &spec, &dir, st.attempt, deadline),
        stdin: env.payload.get().as_bytes().to_vec(),
        stdout_cap: sh.settings.max_result_bytes,
        stderr_tail: sh.settings.stderr_tail_bytes,
    };
    let mut running = match process::spawn(launch) {
        Ok(r) => r,
        Err(e) => {
            let why = format!(
                "could not start {}: {e} (is it executable, with a valid #! line?)",
                spec.path.display()
            );
            return finish(sh, id, &env, st, Verdict::Final(State::Failed, why), None);
        }
    };
    Metrics::inc(&sh.metrics.started);
    sh.metrics
        .running
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    mark_process(sh, id, &env, running.pid);

    let mut progress = ProgressFile::new(dir.join("progress.json"));
    let ending = supervise(sh, id, &mut running, &mut st, &mut progress, timeout, abort).await;
    sh.metrics
        .running
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);

    // Whatever is left of the group goes now; then collect its output, giving
    // up on pipes held open by a process that escaped the group.
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
    // Exiting (killed by SIGPIPE, say) may beat the overflow signal: stdout decides.
    let ending = if stdout.overflowed {
        Ending::Overflow
    } else {
        ending
    };
    if let Some(p) = progress.poll() {
        apply_progress(&mut st, p);
    }
    if !stderr.is_empty() {
        spool.write_event_file(id, "stderr", &stderr, Durability::Volatile)?;
    }
    let verdict = judge(&ending, &stderr);
    if let Ending::Exited(code) = ending {
        st.exit_code = code.code();
    }
    let result = match verdict {
        Verdict::Succeeded => match store_result(sh, id, &spec, &progress, stdout) {
            Ok(info) => info,
            Err(why) => return finish(sh, id, &env, st, Verdict::Final(State::Failed, why), None),
        },
        _ => None,
    };
    finish(sh, id, &env, st, verdict, result)
}

/// Reads what the attempt needs. `Ok(None)`: the event vanished (deleted by hand).
fn load(sh: &Shared, id: &EventId) -> Result<Option<(Envelope, Status)>, SpoolError> {
    let Some(env) = sh.spool.read_envelope(id)? else {
        return Err(SpoolError::Damaged {
            path: sh.spool.event_dir(id),
            detail: "event.json is missing".into(),
        });
    };
    let status = sh
        .spool
        .read_status(id)?
        .unwrap_or_else(|| Status::initial(&env));
    Ok(Some((env, status)))
}

/// A claimed entry whose event cannot be read: dead-letter it, loudly.
fn dead_on_arrival(sh: &Shared, id: &EventId, e: SpoolError) -> Result<(), SpoolError> {
    tracing::error!(error = %e, "queued event is damaged; moved to dead/");
    let letter = DeadLetter {
        id: id.to_string(),
        kind: String::new(),
        attempts: 0,
        error: Some(e.to_string()),
        at: Timestamp::now(),
    };
    Metrics::inc(&sh.metrics.dead_lettered);
    sh.spool.dead_letter(id, &letter)
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
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    // Put spoold itself on the PATH so shell handlers can call `spoold report`.
    let path = match std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_owned))
    {
        Some(own) => format!("{}:{path}", own.display()),
        None => path,
    };
    vars.push(("PATH".into(), path));
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

/// Notes the handler's pid and start time in the claim, so that a restarted
/// spoold can kill it if this one dies.
fn mark_process(sh: &Shared, id: &EventId, env: &Envelope, pid: i32) {
    let record = ClaimRecord {
        entry: QueueEntry {
            kind: env.kind.clone(),
            not_before_ms: None,
        },
        process: process_start(pid).map(|start| ProcessMark { pid, start }),
    };
    let bytes = serde_json::to_vec(&record).expect("serializable");
    if let Err(e) =
        sh.spool
            .writer()
            .replace(&sh.spool.running_path(id), &bytes, Durability::Volatile)
    {
        tracing::warn!(error = %e, "could not note the handler's pid in its claim");
    }
}

async fn supervise(
    sh: &Shared,
    id: &EventId,
    running: &mut process::Running,
    st: &mut Status,
    progress: &mut ProgressFile,
    timeout: Duration,
    abort: &CancellationToken,
) -> Ending {
    let deadline = Instant::now() + timeout;
    let mut tick = interval(sh.settings.progress_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut lease = interval(sh.settings.lease_ttl / 3);
    lease.set_missed_tick_behavior(MissedTickBehavior::Delay);
    lease.tick().await;
    let cancel_marker = sh.spool.event_dir(id).join("cancel");
    let grace = sh.settings.kill_grace;
    let pid = running.pid;
    let stop = loop {
        tokio::select! {
            exit = running.child.wait() => {
                return match exit {
                    Ok(status) => Ending::Exited(status),
                    Err(_) => Ending::Exited(ExitStatus::from_raw(0x7f00)),
                };
            }
            _ = sleep_until(deadline) => break Ending::TimedOut,
            _ = running.overflow.cancelled() => break Ending::Overflow,
            _ = abort.cancelled() => break Ending::ShuttingDown,
            _ = tick.tick() => {
                if let Some(p) = progress.poll() {
                    if apply_progress(st, p) {
                        publish(sh, st);
                    }
                }
                if cancel_marker.exists() {
                    break Ending::Cancelled;
                }
            }
            _ = lease.tick() => {
                if !sh.spool.touch_claim(id).unwrap_or(true) {
                    break Ending::LostLease;
                }
            }
        }
    };
    tracing::info!(pid, "stopping the handler's process group");
    let _ = process::terminate(&mut running.child, pid, grace).await;
    stop
}

/// Folds a progress reading into the status; true when anything changed.
fn apply_progress(st: &mut Status, p: Progress) -> bool {
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

fn publish(sh: &Shared, st: &Status) {
    match sh.spool.write_status(st, Durability::Volatile) {
        Ok(()) => sh.hub.publish(st),
        Err(e) => tracing::warn!(error = %e, "could not record progress"),
    }
}

fn judge(ending: &Ending, stderr: &[u8]) -> Verdict {
    match ending {
        Ending::Exited(s) if s.success() => Verdict::Succeeded,
        Ending::Exited(s) => {
            let why = format!("handler {}{}", process::describe_exit(*s), last_line(stderr));
            if s.code() == Some(EX_DATAERR) {
                Verdict::Final(State::Failed, format!("{why} (65: bad input, not retried)"))
            } else {
                Verdict::Retryable(why)
            }
        }
        Ending::TimedOut => Verdict::Final(State::TimedOut, "handler ran past its timeout and was stopped".into()),
        Ending::Cancelled => Verdict::Final(State::Cancelled, "cancelled while running; the handler was stopped".into()),
        Ending::Overflow => Verdict::Final(
            State::Failed,
            "handler printed more than max_result_bytes to stdout and was stopped; write large results to $SPOOL_RESULT or raise max_result_bytes".into(),
        ),
        Ending::LostLease => Verdict::Abandon,
        Ending::ShuttingDown => Verdict::Requeue(
            "requeued: spoold shut down during the attempt (not counted against max_attempts)".into(),
        ),
    }
}

/// ": <last non-empty stderr line>", or nothing.
fn last_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    match text.lines().rev().map(str::trim).find(|l| !l.is_empty()) {
        Some(line) => format!(": {}", line.chars().take(300).collect::<String>()),
        None => String::new(),
    }
}

/// Keeps the result: the file the handler wrote, or else its stdout.
fn store_result(
    sh: &Shared,
    id: &EventId,
    spec: &HandlerSpec,
    progress: &ProgressFile,
    stdout: Captured,
) -> Result<Option<ResultInfo>, String> {
    let path = sh.spool.event_dir(id).join("result");
    let cap = sh.settings.max_result_bytes;
    let (len, head) = match fs::metadata(&path) {
        Ok(m) if m.len() > cap => {
            return Err(format!(
                "the result file is {} bytes, over max_result_bytes ({cap})",
                m.len()
            ))
        }
        Ok(m) => (m.len(), read_head(&path)),
        Err(_) if stdout.bytes.is_empty() => return Ok(None),
        Err(_) => {
            sh.spool
                .write_event_file(id, "result", &stdout.bytes, Durability::Durable)
                .map_err(|e| format!("could not store the result: {e}"))?;
            (
                stdout.bytes.len() as u64,
                stdout.bytes[..stdout.bytes.len().min(512)].to_vec(),
            )
        }
    };
    let content_type = progress
        .content_type
        .clone()
        .or_else(|| spec.content_type.clone())
        .unwrap_or_else(|| sniff(&head).into());
    Ok(Some(ResultInfo {
        content_type,
        bytes: len,
    }))
}

fn read_head(path: &Path) -> Vec<u8> {
    use std::io::Read;
    let mut head = Vec::new();
    if let Ok(f) = fs::File::open(path) {
        let _ = f.take(512).read_to_end(&mut head);
    }
    head
}

/// A content type from the first bytes of a result.
pub fn sniff(head: &[u8]) -> &'static str {
    let text = String::from_utf8_lossy(head);
    let t = text.trim_start().to_ascii_lowercase();
    if head.starts_with(b"%PDF-") {
        "application/pdf"
    } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if head.starts_with(b"\xff\xd8\xff") {
        "image/jpeg"
    } else if head.starts_with(b"GIF8") {
        "image/gif"
    } else if t.starts_with("<?xml") {
        "application/xml"
    } else if t.starts_with("<!doctype html") || t.starts_with("<html") {
        "text/html; charset=utf-8"
    } else if t.starts_with('{') || t.starts_with('[') {
        "application/json"
    } else if std::str::from_utf8(head).is_ok()
        || head.len() >= 509 && std::str::from_utf8(&head[..head.len() - 3]).is_ok()
    {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

/// Records the verdict: status first (fsync'd), then the claim is let go.
fn finish(
    sh: &Shared,
    id: &EventId,
    env: &Envelope,
    st: Status,
    verdict: Verdict,
    result: Option<ResultInfo>,
) -> Result<(), SpoolError> {
    let spool = &sh.spool;
    let mut next = st.next();
    let attempts_left = st.attempt < st.max_attempts;
    match verdict {
        Verdict::Abandon => {
            tracing::warn!("lost the claim to another host; this host stops acting for the event");
            return Ok(());
        }
        Verdict::Requeue(why) => {
            next.state = State::Queued;
            next.message = Some(why);
            next.max_attempts += 1;
            return requeue(sh, id, env, next, None);
        }
        Verdict::Exhausted(why) => {
            next.state = State::Failed;
            next.error = Some(why);
            next.dead_letter = true;
        }
        Verdict::Retryable(why) if attempts_left => {
            let delay = backoff(&sh.settings, st.attempt);
            next.state = State::Queued;
            next.error = Some(why);
            next.retry_at = Some(Timestamp::now().plus(delay));
            Metrics::inc(&sh.metrics.retried);
            tracing::info!(error = ?next.error, retry_in = ?delay, "attempt failed; will retry");
            let at = next.retry_at;
            return requeue(sh, id, env, next, at);
        }
        Verdict::Retryable(why) => {
            next.state = State::Failed;
            next.error = Some(format!("{why}; gave up after {} attempts", st.attempt));
            next.dead_letter = true;
        }
        Verdict::Final(state, why) => {
            next.state = state;
            next.error = Some(why);
        }
        Verdict::Succeeded => {
            next.state = State::Succeeded;
            next.progress = Some(100.0);
            next.result = result;
        }
    }
    next.finished_at = Some(next.updated_at);
    if !spool.holds(id) {
        tracing::warn!("the claim vanished before the final status was written; not recording it");
        return Ok(());
    }
    spool.write_status(&next, Durability::Durable)?;
    sh.hub.publish(&next);
    count_final(sh, &next);
    tracing::info!(state = next.state.as_str(), error = ?next.error, "event finished");
    if next.dead_letter {
        let letter = DeadLetter {
            id: id.to_string(),
            kind: env.kind.clone(),
            attempts: next.attempt,
            error: next.error.clone(),
            at: Timestamp::now(),
        };
        spool.dead_letter(id, &letter)
    } else {
        spool.release(id)
    }
}

fn requeue(
    sh: &Shared,
    id: &EventId,
    env: &Envelope,
    status: Status,
    at: Option<Timestamp>,
) -> Result<(), SpoolError> {
    if !sh.spool.holds(id) {
        return Ok(());
    }
    sh.spool.write_status(&status, Durability::Durable)?;
    sh.hub.publish(&status);
    let entry = QueueEntry {
        kind: env.kind.clone(),
        not_before_ms: at.map(Timestamp::unix_ms),
    };
    sh.spool.requeue(id, &entry)?;
    sh.dispatch.queued(id.clone(), entry);
    Ok(())
}

fn count_final(sh: &Shared, st: &Status) {
    let m = &sh.metrics;
    Metrics::inc(match st.state {
        State::Succeeded => &m.succeeded,
        State::TimedOut => &m.timed_out,
        State::Cancelled => &m.cancelled,
        _ => &m.failed,
    });
    if st.dead_letter {
        Metrics::inc(&m.dead_lettered);
    }
}

/// Cancels an event that sits in the queue by claiming it, so that only its
/// owner ever writes its status. False: it is not in the queue (running, or gone).
pub fn cancel_queued(sh: &Shared, id: &EventId) -> Result<bool, SpoolError> {
    if !sh.spool.claim(id)? {
        return Ok(false);
    }
    let Some((env, status)) = load(sh, id).ok().flatten() else {
        sh.spool.release(id)?;
        return Ok(false);
    };
    if status.state.is_terminal() {
        sh.spool.release(id)?;
        return Ok(false);
    }
    cancel_unstarted(sh, id, &env, status)?;
    Ok(true)
}

fn cancel_unstarted(
    sh: &Shared,
    id: &EventId,
    env: &Envelope,
    status: Status,
) -> Result<(), SpoolError> {
    let verdict = Verdict::Final(State::Cancelled, "cancelled before it started".into());
    finish(sh, id, env, status, verdict, None)
}
