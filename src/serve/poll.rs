//! Conditional requests and long polling: the `ETag` of a status is its seq,
//! `If-None-Match` names the seqs a client has, and a long poll waits on the
//! hub until the status moves on.
//!
//! Every wait is bounded three ways: the status changes, the deadline passes,
//! or spoold shuts down. In each case the waiter answers with the status as
//! it is then, so a shutdown ends long polls with an answer, not a reset.

use std::sync::Arc;
use std::time::Duration;

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};
use tokio_util::sync::CancellationToken;

use super::query::header_str;
use super::Body;
use crate::app::Shared;
use crate::hub::StatusView;
use crate::spool::ids::EventId;
use crate::spool::records::Status;

pub fn etag(seq: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{seq}\"")).expect("digits are header-safe")
}

/// The tags of an If-None-Match list, without quotes or the weak prefix.
fn tags(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    header_str(headers, "if-none-match")
        .unwrap_or("")
        .split(',')
        .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
        .filter(|t| !t.is_empty())
}

/// True when If-None-Match names this seq's ETag (any tag of a list, or `*`).
pub fn none_match(headers: &HeaderMap, seq: u64) -> bool {
    let want = seq.to_string();
    tags(headers).any(|t| t == "*" || t == want)
}

/// The newest seq the client says it has, from If-None-Match (a list: the highest).
pub fn known_seq(headers: &HeaderMap) -> Option<u64> {
    tags(headers).filter_map(|t| t.parse().ok()).max()
}

/// `304 Not Modified` with the current ETag.
pub fn not_modified(seq: u64) -> Response<Body> {
    let mut resp = Response::new(super::empty());
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    resp.headers_mut().insert(header::ETAG, etag(seq));
    resp
}

/// Waits until the event's seq differs from `known` or it is final, at most
/// `limit`. None when the event does not exist.
pub async fn long_poll(
    sh: &Arc<Shared>,
    id: &EventId,
    known: u64,
    limit: Duration,
    shutdown: &CancellationToken,
) -> Option<Arc<StatusView>> {
    wait_until(sh, id, limit, shutdown, |s| {
        s.seq != known || s.state.is_terminal()
    })
    .await
}

/// Waits until the event is final, at most `limit`.
pub async fn until_final(
    sh: &Arc<Shared>,
    id: &EventId,
    limit: Duration,
    shutdown: &CancellationToken,
) -> Option<Arc<StatusView>> {
    wait_until(sh, id, limit, shutdown, |s| s.state.is_terminal()).await
}

/// One subscription to the hub, and a loop on its changes until `done`
/// holds, the deadline passes or shutdown fires; returns the newest status.
async fn wait_until(
    sh: &Arc<Shared>,
    id: &EventId,
    limit: Duration,
    shutdown: &CancellationToken,
    done: impl Fn(&Status) -> bool,
) -> Option<Arc<StatusView>> {
    let spool = Arc::clone(&sh.spool);
    let load_id = id.clone();
    let mut sub = sh
        .hub
        .subscribe(id, move || spool.read_status(&load_id).ok().flatten())?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let current = Arc::clone(&sub.rx.borrow_and_update());
        if done(&current) {
            return Some(current);
        }
        tokio::select! {
            changed = sub.rx.changed() => if changed.is_err() { return Some(current) },
            _ = tokio::time::sleep_until(deadline) => return Some(current),
            _ = shutdown.cancelled() => return Some(current),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inm(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("if-none-match", HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn if_none_match_lists_weak_tags_and_star() {
        assert!(none_match(&inm(r#""1", W/"7""#), 7));
        assert!(!none_match(&inm(r#""1", "2""#), 7));
        assert!(none_match(&inm("*"), 3));
        assert!(!none_match(&HeaderMap::new(), 3));
        assert_eq!(known_seq(&inm(r#""1", W/"22", "x""#)), Some(22));
        assert_eq!(known_seq(&inm("*")), None);
    }
}
