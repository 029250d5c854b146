//! How an attempt ends: from what happened (an [`Ending`]) to a [`Verdict`],
//! and from a verdict to what is written, always status first (fsync'd), then
//! the claim is let go, so recovery can always tell what happened.
//!
//! Every function here does blocking file I/O: call it from a blocking task.
//! Each checks that this host still holds the claim (by its token) before it
//! writes anything, so a host that lost its lease never writes a status.

use std::process::ExitStatus;

use super::process;
use super::retry::backoff;
use crate::app::Shared;
use crate::metrics::Metrics;
use crate::spool::atomic::Durability;
use crate::spool::claim::ClaimToken;
use crate::spool::ids::EventId;
use crate::spool::records::{
    DeadLetter, Envelope, QueueEntry, ResultInfo, State, Status, Timestamp,
};
use crate::spool::SpoolError;

/// Exit code for "bad input, do not retry" (sysexits EX_DATAERR).
pub const EX_DATAERR: i32 = 65;

/// How the handler's run came to an end.
pub enum Ending {
    Exited(ExitStatus),
    TimedOut,
    Cancelled,
    Overflow,
    LostLease,
    ShuttingDown,
}

/// What to record.
pub enum Verdict {
    Succeeded(Option<ResultInfo>),
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

/// The verdict on an ending (a success still needs its result stored).
pub fn judge(ending: &Ending, stderr: &[u8]) -> Verdict {
    match ending {
        Ending::Exited(s) if s.success() => Verdict::Succeeded(None),
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
        Ending::ShuttingDown => Verdict::Requeue("requeued: spoold shut down during the attempt (not counted against max_attempts)".into()),
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

/// Records the verdict on attempt `st`.
pub fn finish(
    sh: &Shared,
    id: &EventId,
    token: ClaimToken,
    env: &Envelope,
    st: Status,
    verdict: Verdict,
) -> Result<(), SpoolError> {
    let mut next = st.next();
    match verdict {
        Verdict::Abandon => {
            tracing::warn!("lost the claim to another host; this host stops acting for the event");
            return Ok(());
        }
        Verdict::Requeue(why) => {
            next.state = State::Queued;
            next.message = Some(why);
            next.max_attempts += 1;
            return requeue(sh, id, token, env, next, None);
        }
        Verdict::Retryable(why) if st.attempt < st.max_attempts => {
            let delay = backoff(&sh.settings, st.attempt);
            next.state = State::Queued;
            next.error = Some(why);
            next.retry_at = Some(Timestamp::now().plus(delay));
            Metrics::inc(&sh.metrics.retried);
            tracing::info!(error = ?next.error, retry_in = ?delay, "attempt failed; will retry");
            let at = next.retry_at;
            return requeue(sh, id, token, env, next, at);
        }
        Verdict::Retryable(why) => {
            next.state = State::Failed;
            next.error = Some(format!("{why}; gave up after {} attempts", st.attempt));
            next.dead_letter = true;
        }
        Verdict::Exhausted(why) => {
            next.state = State::Failed;
            next.error = Some(why);
            next.dead_letter = true;
        }
        Verdict::Final(state, why) => {
            next.state = state;
            next.error = Some(why);
        }
        Verdict::Succeeded(result) => {
            next.state = State::Succeeded;
            next.progress = Some(100.0);
            next.result = result;
        }
    }
    next.finished_at = Some(next.updated_at);
    if !sh.spool.holds(id, token) {
        tracing::warn!("the claim is no longer this host's; not recording the final status");
        return Ok(());
    }
    sh.spool.write_status(&next, Durability::Durable)?;
    sh.hub.publish(&next);
    count_final(sh, &next);
    tracing::info!(state = next.state.as_str(), error = ?next.error, "event finished");
    if next.dead_letter {
        let letter = DeadLetter::new(id.as_str(), &env.kind, next.attempt, next.error.clone());
        sh.spool.dead_letter(id, token, &letter)
    } else {
        sh.spool.release(id, token)
    }
}

fn requeue(
    sh: &Shared,
    id: &EventId,
    token: ClaimToken,
    env: &Envelope,
    status: Status,
    at: Option<Timestamp>,
) -> Result<(), SpoolError> {
    if !sh.spool.holds(id, token) {
        return Ok(());
    }
    sh.spool.write_status(&status, Durability::Durable)?;
    sh.hub.publish(&status);
    let entry = QueueEntry {
        kind: env.kind.clone(),
        not_before_ms: at.map(Timestamp::unix_ms),
    };
    if sh.spool.requeue(id, token, &entry)? {
        sh.dispatch.queued(id.clone(), entry);
    }
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

/// A spool error cut the attempt short: put the event back in the queue
/// with backoff (or let a final status stand), so it never sits claimed
/// with nobody running it.
pub fn give_back(
    sh: &Shared,
    id: &EventId,
    token: ClaimToken,
    why: &str,
) -> Result<(), SpoolError> {
    let Some(env) = sh.spool.read_envelope(id)? else {
        return sh.spool.release(id, token);
    };
    let status = sh
        .spool
        .status_or_rebuild(id)?
        .unwrap_or_else(|| Status::initial(&env));
    if status.state.is_terminal() {
        return sh.spool.release_final(id, token, &status);
    }
    let mut next = status.next();
    let delay = backoff(&sh.settings, status.attempt.max(1));
    next.state = State::Queued;
    next.error = Some(format!("spool error, will retry: {why}"));
    next.retry_at = Some(Timestamp::now().plus(delay));
    let at = next.retry_at;
    requeue(sh, id, token, &env, next, at)
}

/// A claimed event whose files cannot be read (deleted or damaged by hand):
/// record a final status where one can still be written, and dead-letter it.
pub fn dead_on_arrival(
    sh: &Shared,
    id: &EventId,
    token: ClaimToken,
    why: &str,
) -> Result<(), SpoolError> {
    if !sh.spool.holds(id, token) {
        return Ok(());
    }
    tracing::error!(error = why, "claimed event is damaged; moving it to dead/");
    let kind = sh
        .spool
        .read_entry(&sh.spool.running_path(id))
        .ok()
        .flatten()
        .map(|e| e.kind)
        .unwrap_or_default();
    // A status is written even when none can be read (see give_up_damaged).
    if let Some(status) = sh.spool.give_up_damaged(id, token, &kind, why)? {
        sh.hub.publish(&status);
    }
    Metrics::inc(&sh.metrics.dead_lettered);
    Ok(())
}

/// Cancels an event that sits in the queue by claiming it, so that only its
/// owner ever writes its status. False: it is not in the queue (running,
/// gone, or unreadable, in which case it is put back).
pub fn cancel_queued(sh: &Shared, id: &EventId) -> Result<bool, SpoolError> {
    let Some(token) = sh.spool.claim(id)? else {
        return Ok(false);
    };
    let loaded = sh
        .spool
        .read_envelope(id)
        .and_then(|env| Ok(env.zip(sh.spool.status_or_rebuild(id)?)));
    let (env, status) = match loaded {
        Ok(Some(pair)) => pair,
        other => {
            // Not ours to judge here: the dispatcher deals with it when it claims it.
            let entry = sh
                .spool
                .read_entry(&sh.spool.running_path(id))?
                .unwrap_or(QueueEntry {
                    kind: String::new(),
                    not_before_ms: None,
                });
            sh.spool.requeue(id, token, &entry)?;
            return other.map(|_| false);
        }
    };
    if status.state.is_terminal() {
        sh.spool.release_final(id, token, &status)?;
        return Ok(false);
    }
    cancel_unstarted(sh, id, token, &env, status)?;
    Ok(true)
}

pub fn cancel_unstarted(
    sh: &Shared,
    id: &EventId,
    token: ClaimToken,
    env: &Envelope,
    status: Status,
) -> Result<(), SpoolError> {
    finish(
        sh,
        id,
        token,
        env,
        status,
        Verdict::Final(State::Cancelled, "cancelled before it started".into()),
    )
}
