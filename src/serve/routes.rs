//! Routing and the request handlers of the HTTP API (see docs/http-api.md).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::problem::Problem;
use super::{full, pages, sse, Body};
use crate::app::Shared;
use crate::dispatch::handlers::{self, HandlerError};
use crate::dispatch::runner;
use crate::metrics::Metrics;
use crate::spool::atomic::Durability;
use crate::spool::ids::{EventId, HandlerType};
use crate::spool::records::{QueueEntry, Status};
use crate::spool::submit::{NewEvent, Submitted};

pub async fn route(
    sh: Arc<Shared>,
    req: Request<Incoming>,
    shutdown: CancellationToken,
) -> Response<Body> {
    Metrics::inc(&sh.metrics.http_requests);
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = if req.method() == Method::HEAD {
        Method::GET
    } else {
        req.method().clone()
    };
    let result = match (&method, segments.as_slice()) {
        (&Method::GET, [""]) => Ok(html(pages::DEMO.into())),
        (&Method::GET, ["healthz"]) => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        (&Method::GET, ["metrics"]) => Ok(metrics(&sh)),
        (&Method::GET, ["handlers"]) => Ok(json_response(StatusCode::OK, &json!(handlers::list(&sh.settings.handlers_dir)))),
        (&Method::POST, ["events", kind]) => submit(&sh, kind, req).await,
        (&Method::POST, ["events"]) => Err(Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "cloudevents-not-yet",
            "Not implemented",
            "CloudEvents submission is not available yet; POST your JSON to /events/{type} instead",
        )),
        (&Method::GET, ["events", id]) => get_status(&sh, id, &req).await,
        (&Method::GET, ["events", id, "result"]) => get_result(&sh, id),
        (&Method::GET, ["events", id, "stream"]) => stream(&sh, id, &req, shutdown),
        (&Method::DELETE, ["events", id]) => cancel(&sh, id).await,
        (_, [""] | ["healthz"] | ["metrics"] | ["handlers"] | ["events", _, "result"] | ["events", _, "stream"]) => Err(not_allowed("GET, HEAD")),
        (_, ["events", _]) => Err(not_allowed("GET, HEAD, POST, DELETE")),
        _ => Err(Problem::not_found(format!(
            "nothing at {}: the API is POST /events/{{type}}, GET|DELETE /events/{{id}}, GET /events/{{id}}/result and /events/{{id}}/stream",
            truncate(&path, 100)
        ))),
    };
    result.unwrap_or_else(Problem::into_response)
}

fn not_allowed(allow: &'static str) -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        format!("this resource accepts {allow}"),
    )
    .header(header::ALLOW, allow)
    .with("allow", json!(allow))
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

pub fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let mut resp = Response::new(full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

fn html(body: String) -> Response<Body> {
    let mut resp = Response::new(full(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp.headers_mut().insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

fn metrics(sh: &Shared) -> Response<Body> {
    let mut resp = Response::new(full(sh.metrics.render(sh.dispatch.pending())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

fn parse_id(raw: &str) -> Result<EventId, Problem> {
    EventId::parse(raw).map_err(|e| Problem::bad_request("invalid-id", e.0))
}

/// The query string as decoded pairs.
pub fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The status as the API shows it after a submit: with links.
fn with_links(status: &Status) -> Value {
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

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

async fn submit(
    sh: &Arc<Shared>,
    kind: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let kind = HandlerType::parse(kind).map_err(|e| Problem::bad_request("invalid-type", e.0))?;
    let spec = handlers::resolve(&sh.settings.handlers_dir, &kind).map_err(|e| match e {
        HandlerError::BadConfig { .. } => Problem::internal(e.to_string()),
        _ => Problem::new(
            StatusCode::NOT_FOUND,
            "unknown-type",
            "Unknown event type",
            e.to_string(),
        ),
    })?;
    let key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => Some(idempotency_key(v)?),
    };
    let headers: BTreeMap<String, String> = sh
        .settings
        .forward_headers
        .iter()
        .filter_map(|name| Some((name.clone(), header_str(req.headers(), name)?.to_owned())))
        .collect();
    let payload = read_json_body(sh, req).await?;
    let new = NewEvent {
        kind: kind.clone(),
        payload,
        headers,
        max_attempts: spec.max_attempts.unwrap_or(sh.settings.max_attempts),
        timeout_secs: spec.timeout.unwrap_or(sh.settings.timeout).as_secs_f64(),
        idempotency_key: key,
    };
    let spool = Arc::clone(&sh.spool);
    let outcome = tokio::task::spawn_blocking(move || spool.submit(new))
        .await
        .map_err(|e| Problem::internal(format!("submit task failed: {e}")))??;
    let (code, status) = match outcome {
        Submitted::Created(status) => {
            Metrics::inc(&sh.metrics.submitted);
            let id = EventId::parse(&status.id).expect("generated IDs are valid");
            sh.dispatch.queued(id, QueueEntry::now(&kind));
            (StatusCode::ACCEPTED, status)
        }
        Submitted::Existing(status) => (StatusCode::OK, status),
        Submitted::KeyConflict { existing } => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency-Key reused",
                format!("this Idempotency-Key was first used for event {existing} with a different body or type; use a new key for a new event"),
            )
            .with("event", json!(format!("/events/{existing}"))))
        }
    };
    let mut resp = json_response(code, &with_links(&status));
    let h = resp.headers_mut();
    h.insert(
        header::LOCATION,
        HeaderValue::from_str(&format!("/events/{}", status.id)).expect("IDs are header-safe"),
    );
    h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    h.insert(header::ETAG, etag(status.seq));
    Ok(resp)
}

fn idempotency_key(v: &HeaderValue) -> Result<String, Problem> {
    match v.to_str() {
        Ok(s)
            if !s.is_empty()
                && s.len() <= 255
                && s.bytes().all(|b| (0x21..0x7f).contains(&b) || b == b' ') =>
        {
            Ok(s.trim_matches('"').to_owned())
        }
        _ => Err(Problem::bad_request(
            "invalid-idempotency-key",
            "Idempotency-Key must be 1 to 255 printable ASCII characters, e.g. a UUID",
        )),
    }
}

async fn read_json_body(sh: &Shared, req: Request<Incoming>) -> Result<Box<RawValue>, Problem> {
    let cap = sh.settings.max_body_bytes;
    let too_large = || {
        Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", "Payload too large", format!("the body is larger than max_body_bytes ({cap} bytes); send a smaller payload, or put large inputs in a file and send its path"))
    };
    let declared = header_str(req.headers(), "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(too_large());
    }
    let body = Limited::new(req.into_body(), cap)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large()
            } else {
                Problem::bad_request(
                    "body-unreadable",
                    format!("could not read the request body: {e}"),
                )
            }
        })?;
    let bytes = body.to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(RawValue::from_string("{}".into()).expect("valid JSON"));
    }
    serde_json::from_slice::<Box<RawValue>>(&bytes).map_err(|e| {
        Problem::bad_request("bad-json", format!("the body is not valid JSON ({e}); send a JSON document such as {{\"name\": \"value\"}} with Content-Type: application/json"))
    })
}

fn etag(seq: u64) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{seq}\"")).expect("digits are header-safe")
}

/// True when If-None-Match names this seq's ETag (any tag of a list, or `*`).
fn none_match(headers: &HeaderMap, seq: u64) -> bool {
    let Some(v) = header_str(headers, "if-none-match") else {
        return false;
    };
    let want = seq.to_string();
    v.split(',')
        .map(|t| t.trim().trim_start_matches("W/").trim_matches('"'))
        .any(|t| t == "*" || t == want)
}

/// The newest seq the client says it has, from If-None-Match (a list: the highest).
fn known_seq(headers: &HeaderMap) -> Option<u64> {
    let v = header_str(headers, "if-none-match")?;
    v.split(',')
        .filter_map(|t| {
            t.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .parse()
                .ok()
        })
        .max()
}

/// `?format=json|html` wins; otherwise the Accept header decides.
fn wants_html(headers: &HeaderMap, format: Option<&str>) -> bool {
    match format {
        Some("html") => return true,
        Some("json") => return false,
        _ => {}
    }
    let accept = header_str(headers, "accept").unwrap_or("");
    let pos = |needle: &str| accept.find(needle);
    match (pos("text/html"), pos("application/json")) {
        (Some(h), Some(j)) => h < j,
        (Some(_), None) => true,
        _ => false,
    }
}

fn read_status(sh: &Shared, id: &EventId) -> Result<Status, Problem> {
    sh.spool.read_status(id)?.ok_or_else(|| {
        Problem::not_found(format!(
            "no event {id}: it never existed, or it finished longer ago than the retention period"
        ))
    })
}

async fn get_status(
    sh: &Arc<Shared>,
    raw: &str,
    req: &Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let id = parse_id(raw)?;
    let q = query(req);
    let mut status = read_status(sh, &id)?;
    if wants_html(req.headers(), q.get("format").map(String::as_str)) {
        let check: u32 = q.get("check").and_then(|c| c.parse().ok()).unwrap_or(0);
        return Ok(pages::wait_page(sh, &status, check));
    }
    if let Some(wait) = q.get("wait") {
        let secs = wait
            .parse::<f64>()
            .ok()
            .filter(|s| s.is_finite())
            .ok_or_else(|| {
                Problem::bad_request(
                    "invalid-wait",
                    "wait must be a number of seconds, e.g. ?wait=30",
                )
            })?;
        let limit =
            Duration::from_secs_f64(secs.clamp(0.0, sh.settings.long_poll_max.as_secs_f64()));
        let known = if none_match(req.headers(), status.seq) {
            status.seq
        } else {
            known_seq(req.headers()).unwrap_or(status.seq)
        };
        status = long_poll(sh, &id, known, limit).await.unwrap_or(status);
    }
    if none_match(req.headers(), status.seq) {
        let mut resp = Response::new(super::empty());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp.headers_mut().insert(header::ETAG, etag(status.seq));
        return Ok(resp);
    }
    let mut resp = json_response(
        StatusCode::OK,
        &serde_json::to_value(&status).expect("serializable"),
    );
    resp.headers_mut().insert(header::ETAG, etag(status.seq));
    if !status.state.is_terminal() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    Ok(resp)
}

/// Waits until the event's seq differs from `known` or it is final, at most `limit`.
async fn long_poll(sh: &Arc<Shared>, id: &EventId, known: u64, limit: Duration) -> Option<Status> {
    let spool = Arc::clone(&sh.spool);
    let load_id = id.clone();
    let mut sub = sh
        .hub
        .subscribe(id, move || spool.read_status(&load_id).ok().flatten())?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let current = Arc::clone(&sub.rx.borrow_and_update());
        if current.seq != known || current.state.is_terminal() {
            return Some((*current).clone());
        }
        tokio::select! {
            changed = sub.rx.changed() => if changed.is_err() { return Some((*current).clone()) },
            _ = tokio::time::sleep_until(deadline) => return Some((*current).clone()),
        }
    }
}

fn get_result(sh: &Shared, raw: &str) -> Result<Response<Body>, Problem> {
    let id = parse_id(raw)?;
    let status = read_status(sh, &id)?;
    if !status.state.is_terminal() {
        let mut resp = json_response(StatusCode::ACCEPTED, &with_links(&status));
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Ok(resp);
    }
    if status.state != crate::spool::records::State::Succeeded {
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
        .with(
            "event",
            serde_json::to_value(&status).expect("serializable"),
        ));
    }
    let Some(info) = &status.result else {
        let mut resp = Response::new(super::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        return Ok(resp);
    };
    let path = sh.spool.event_dir(&id).join("result");
    let bytes = std::fs::read(&path)
        .map_err(|e| Problem::internal(format!("the result of {id} could not be read: {e}")))?;
    let mut resp = Response::new(full(bytes));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_str(&info.content_type)
            .unwrap_or(HeaderValue::from_static("application/octet-stream")),
    );
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    // A handler's HTML must never run script with this origin's authority.
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
    h.insert(header::ETAG, etag(status.seq));
    Ok(resp)
}

fn stream(
    sh: &Arc<Shared>,
    raw: &str,
    req: &Request<Incoming>,
    shutdown: CancellationToken,
) -> Result<Response<Body>, Problem> {
    let id = parse_id(raw)?;
    let last = header_str(req.headers(), "last-event-id")
        .map(str::to_owned)
        .or_else(|| query(req).get("last_event_id").cloned())
        .and_then(|v| v.trim().parse::<u64>().ok());
    sse::respond(sh, &id, last, shutdown)
}

async fn cancel(sh: &Arc<Shared>, raw: &str) -> Result<Response<Body>, Problem> {
    let id = parse_id(raw)?;
    let status = read_status(sh, &id)?;
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
    // The marker reaches whichever host runs the event; claiming a queued
    // event makes us its owner, so the cancelled status has one writer.
    let sh2 = Arc::clone(sh);
    let id2 = id.clone();
    tokio::task::spawn_blocking(move || {
        sh2.spool
            .writer()
            .create_new(
                &sh2.spool.event_dir(&id2).join("cancel"),
                b"",
                Durability::Durable,
            )
            .map_err(|e| crate::spool::SpoolError::Io {
                op: "write",
                path: sh2.spool.event_dir(&id2).join("cancel"),
                source: e,
            })?;
        runner::cancel_queued(&sh2, &id2)
    })
    .await
    .map_err(|e| Problem::internal(format!("cancel task failed: {e}")))??;
    let wait = sh.settings.kill_grace + sh.settings.progress_interval * 3 + Duration::from_secs(1);
    let status = long_poll_terminal(sh, &id, wait).await.unwrap_or(status);
    let code = if status.state.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok(json_response(code, &with_links(&status)))
}

async fn long_poll_terminal(sh: &Arc<Shared>, id: &EventId, limit: Duration) -> Option<Status> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let status = long_poll(sh, id, u64::MAX, Duration::ZERO).await?;
        if status.state.is_terminal() || left.is_zero() {
            return Some(status);
        }
        long_poll(sh, id, status.seq, left).await?;
    }
}
