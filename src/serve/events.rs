//! The handlers for one event: its status (JSON, long poll, or the wait
//! page), its result, its SSE stream, and cancelling it.
//!
//! Waits (`?wait=`, and `DELETE` waiting for the handler to stop) end when
//! spoold shuts down, with the status as it is then.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::poll::{self, etag, known_seq, none_match};
use super::problem::Problem;
use super::query::{self, query, wants_html};
use super::statuses::StatusView;
use super::{full, json_response, pages, sse, Body};
use crate::app::Shared;
use crate::dispatch::runner;
use crate::spool::atomic::Durability;
use crate::spool::ids::EventId;
use crate::spool::records::{State, Status};

/// The status as the API shows it after a submit: with links.
pub fn with_links(status: &Status) -> Value {
    let mut v = serde_json::to_value(status).expect("serializable");
    let id = &status.id;
    v["links"] = json!({
        "self": format!("/events/{id}"),
        "result": format!("/events/{id}/result"),
        "stream": format!("/events/{id}/stream"),
        "page": format!("/events/{id}"),
    });
    v
}

fn parse_id(raw: &str) -> Result<EventId, Problem> {
    EventId::parse(raw).map_err(|e| Problem::bad_request("invalid-id", e.0))
}

/// The status of `id`. On a shared spool the read goes to the blocking
/// pool: an NFS server that stalls must not stall this HTTP thread's other
/// connections with it. A local `stat` is cheaper than the hop.
async fn read_status(sh: &Arc<Shared>, id: &EventId) -> Result<Arc<StatusView>, Problem> {
    let loaded = if sh.shared_fs {
        let (sh2, id2) = (Arc::clone(sh), id.clone());
        tokio::task::spawn_blocking(move || sh2.statuses.load(&sh2.spool, &id2, true))
            .await
            .map_err(|e| {
                Problem::internal(format!(
                    "reading the status failed ({e}); the server log has the cause"
                ))
            })?
    } else {
        sh.statuses.load(&sh.spool, id, false)
    };
    loaded?.ok_or_else(|| {
        Problem::not_found(format!(
            "no event {id}: it never existed, or it finished longer ago than the retention period"
        ))
    })
}

pub async fn get_status(
    sh: &Arc<Shared>,
    raw: &str,
    req: &Request<Incoming>,
    shutdown: &CancellationToken,
) -> Result<Response<Body>, Problem> {
    let id = parse_id(raw)?;
    let q = query(req.uri());
    let mut view = read_status(sh, &id).await?;
    if wants_html(req.headers(), q.get("format").map(String::as_str)) {
        let check: u32 = q.get("check").and_then(|c| c.parse().ok()).unwrap_or(0);
        let token = super::bearer::query_token(req.uri());
        return Ok(pages::wait_page(sh, &view.status, check, token.as_deref()));
    }
    if let Some(wait) = q.get("wait") {
        let limit = query::wait_limit(wait, sh.settings.long_poll_max).ok_or_else(|| {
            Problem::bad_request(
                "invalid-wait",
                "wait must be a number of seconds, e.g. ?wait=30",
            )
        })?;
        let seq = view.status.seq;
        let known = if none_match(req.headers(), seq) {
            seq
        } else {
            known_seq(req.headers()).unwrap_or(seq)
        };
        if let Some(newer) = poll::long_poll(sh, &id, known, limit, shutdown).await {
            view = newer;
        }
    }
    let status = &view.status;
    if none_match(req.headers(), status.seq) {
        return Ok(poll::not_modified(status.seq));
    }
    let mut resp = Response::new(full(view.json()));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(header::ETAG, etag(status.seq));
    if !status.state.is_terminal() {
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    Ok(resp)
}

pub async fn get_result(sh: &Arc<Shared>, raw: &str) -> Result<Response<Body>, Problem> {
    let id = parse_id(raw)?;
    let view = read_status(sh, &id).await?;
    let status = &view.status;
    if !status.state.is_terminal() {
        let mut resp = json_response(StatusCode::ACCEPTED, &with_links(status));
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(resp);
    }
    if status.state != State::Succeeded {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "event-not-succeeded",
            "The event did not succeed",
            format!(
                "event {id} ended {}: {}",
                status.state.as_str(),
                status.error.as_deref().unwrap_or("no error recorded")
            ),
        )
        .with("event", serde_json::to_value(status).expect("serializable")));
    }
    let Some(info) = &status.result else {
        let mut resp = Response::new(super::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        return Ok(resp);
    };
    let path = sh.spool.event_dir(&id).join("result");
    let want = info.bytes;
    let read = tokio::task::spawn_blocking(move || read_result(&path, want))
        .await
        .map_err(|e| Problem::internal(format!("reading the result failed: {e}")))?;
    let bytes = read.map_err(|e| {
        tracing::error!(%id, error = %e, "cannot serve a result");
        Problem::internal(format!("the result of {id} could not be read: {e}"))
    })?;
    Ok(result_response(bytes, &info.content_type, status.seq))
}

/// The result file, exactly as long as its status says. Not a symlink or a
/// FIFO (a handler's leftover process could put one there after the event
/// ended), and never more than recorded: a file cut or grown by hand is
/// damaged, not served.
fn read_result(path: &std::path::Path, want: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::with_capacity(want.min(1 << 20) as usize);
    crate::spool::open_regular(path)?
        .take(want + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 != want {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "the result file is damaged: {} bytes where the status records {want}",
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// A result's bytes, which must never run script with this origin's authority.
fn result_response(bytes: Vec<u8>, content_type: &str, seq: u64) -> Response<Body> {
    let mut resp = Response::new(full(bytes));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "sandbox; default-src 'none'; img-src data:; style-src 'unsafe-inline'",
        ),
    );
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=300"),
    );
    h.insert(header::ETAG, etag(seq));
    resp
}

pub fn stream(
    sh: &Arc<Shared>,
    raw: &str,
    headers: &HeaderMap,
    uri: &Uri,
    shutdown: CancellationToken,
) -> Result<Response<Body>, Problem> {
    let id = parse_id(raw)?;
    let last = query::last_event_id(headers, uri);
    sse::respond(sh, &id, last, shutdown)
}

/// Cancels the event, then waits a little for it to be final: `200` with
/// the final status, or `202` with the current one.
pub async fn cancel(
    sh: &Arc<Shared>,
    raw: &str,
    shutdown: &CancellationToken,
) -> Result<Response<Body>, Problem> {
    let id = parse_id(raw)?;
    let status = read_status(sh, &id).await?.status.clone();
    if status.state.is_terminal() {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            "already-finished",
            "Already finished",
            format!(
                "event {id} already ended ({}); there is nothing to cancel",
                status.state.as_str()
            ),
        )
        .with(
            "event",
            serde_json::to_value(&status).expect("serializable"),
        ));
    }
    request_cancel(sh, &id).await?;
    let wait = sh.settings.kill_grace + sh.settings.progress_interval * 3 + Duration::from_secs(1);
    let status = poll::until_final(sh, &id, wait, shutdown)
        .await
        .map_or(status, |view| view.status.clone());
    let code = if status.state.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(json_response(code, &with_links(&status)))
}

/// Writes the `cancel` marker, which reaches whichever host runs the event;
/// a queued event is claimed and cancelled here, so its status has one writer.
async fn request_cancel(sh: &Arc<Shared>, id: &EventId) -> Result<(), Problem> {
    let sh2 = Arc::clone(sh);
    let id2 = id.clone();
    tokio::task::spawn_blocking(move || {
        let marker = sh2.spool.event_dir(&id2).join("cancel");
        sh2.spool
            .writer()
            .create_new(&marker, b"", Durability::Durable)
            .map_err(|e| crate::spool::SpoolError::Io {
                op: "write",
                path: marker.clone(),
                source: e,
            })?;
        runner::cancel_queued(&sh2, &id2)
    })
    .await
    .map_err(|e| Problem::internal(format!("cancel task failed: {e}")))??;
    Ok(())
}
