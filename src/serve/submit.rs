//! `POST /events/{type}`: check the type, read the body within its limits
//! (`max_body_bytes`, `body_timeout`), and spool the event.
//!
//! The `202` is sent only after the spool has the event on disk. Nothing is
//! written for a request that fails any check. Errors name the handler by its
//! relative name (`handlers/<type>.toml`); absolute paths go to the log only.

use std::collections::BTreeMap;
use std::sync::Arc;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use serde_json::json;
use serde_json::value::RawValue;

use super::events::with_links;
use super::poll::etag;
use super::problem::Problem;
use super::query::header_str;
use super::{json_response, Body};
use crate::app::Shared;
use crate::dispatch::handlers::{self, HandlerError, HandlerSpec};
use crate::metrics::Metrics;
use crate::spool::ids::{EventId, HandlerType};
use crate::spool::records::QueueEntry;
use crate::spool::submit::{NewEvent, Submitted};

pub async fn submit(
    sh: &Arc<Shared>,
    kind: &str,
    req: Request<Incoming>,
) -> Result<Response<Body>, Problem> {
    let kind = HandlerType::parse(kind).map_err(|e| Problem::bad_request("invalid-type", e.0))?;
    let spec = handlers::resolve(&sh.settings.handlers_dir, &kind)
        .map_err(|e| handler_problem(&kind, e))?;
    let key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => Some(idempotency_key(v)?),
    };
    let headers = forwarded_headers(sh, &req);
    let payload = read_json_body(sh, req).await?;
    let new = new_event(sh, &kind, &spec, payload, headers, key);
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
        Submitted::KeyConflict { existing } => return Err(key_reused(&existing)),
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

fn new_event(
    sh: &Shared,
    kind: &HandlerType,
    spec: &HandlerSpec,
    payload: Box<RawValue>,
    headers: BTreeMap<String, String>,
    idempotency_key: Option<String>,
) -> NewEvent {
    NewEvent {
        kind: kind.clone(),
        payload,
        headers,
        max_attempts: spec.max_attempts.unwrap_or(sh.settings.max_attempts),
        timeout_secs: spec.timeout.unwrap_or(sh.settings.timeout).as_secs_f64(),
        idempotency_key,
    }
}

/// The request headers named in `forward_headers`, for `event.json`.
fn forwarded_headers(sh: &Shared, req: &Request<Incoming>) -> BTreeMap<String, String> {
    sh.settings
        .forward_headers
        .iter()
        .filter_map(|name| Some((name.clone(), header_str(req.headers(), name)?.to_owned())))
        .collect()
}

/// A missing or unusable handler, told without the server's paths.
fn handler_problem(kind: &HandlerType, e: HandlerError) -> Problem {
    match e {
        HandlerError::BadConfig { ref detail, .. } => {
            tracing::error!(error = %e, "a submit found a broken handler config");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "handler-misconfigured",
                "Handler misconfigured",
                format!("handler {kind} is misconfigured; the operator should check handlers/{kind}.toml: {detail}"),
            )
        }
        HandlerError::NotExecutable { .. } => unknown_type(format!(
            "the handler for type \"{kind}\" is not executable; the operator should run chmod +x on handlers/{kind}"
        )),
        _ => unknown_type(format!(
            "no handler for type \"{kind}\": put an executable named {kind} in spoold's handlers directory; GET /handlers lists the types that can run"
        )),
    }
}

fn unknown_type(detail: String) -> Problem {
    Problem::new(
        StatusCode::NOT_FOUND,
        "unknown-type",
        "Unknown event type",
        detail,
    )
}

fn key_reused(existing: &EventId) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency-key-reused",
        "Idempotency-Key reused",
        format!("this Idempotency-Key was first used for event {existing} with a different body or type; use a new key for a new event"),
    )
    .with("event", json!(format!("/events/{existing}")))
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

/// The body as JSON: at most `max_body_bytes`, all of it within
/// `body_timeout`; an empty (or all-whitespace) body is `{}`.
async fn read_json_body(sh: &Shared, req: Request<Incoming>) -> Result<Box<RawValue>, Problem> {
    let cap = sh.settings.max_body_bytes;
    let declared = header_str(req.headers(), "content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(too_large(cap));
    }
    let limit = sh.settings.body_timeout;
    tokio::time::timeout(limit, json_body(req.into_body(), cap))
        .await
        .map_err(|_| body_timeout(limit))?
}

/// Reads a body of at most `cap` bytes as one JSON document; an empty (or
/// all-whitespace) body is `{}`. The JSON passes through byte for byte.
pub async fn json_body<B>(body: B, cap: usize) -> Result<Box<RawValue>, Problem>
where
    B: hyper::body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let bytes = Limited::new(body, cap)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                too_large(cap)
            } else {
                Problem::bad_request(
                    "body-unreadable",
                    format!("could not read the request body: {e}"),
                )
            }
        })?
        .to_bytes();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(RawValue::from_string("{}".into()).expect("valid JSON"));
    }
    serde_json::from_slice::<Box<RawValue>>(&bytes).map_err(|e| {
        Problem::bad_request("bad-json", format!("the body is not valid JSON ({e}); send a JSON document such as {{\"name\": \"value\"}} with Content-Type: application/json"))
    })
}

fn too_large(cap: usize) -> Problem {
    Problem::new(StatusCode::PAYLOAD_TOO_LARGE, "body-too-large", "Payload too large", format!("the body is larger than max_body_bytes ({cap} bytes); send a smaller payload, or put large inputs in a file and send its path"))
}

fn body_timeout(limit: std::time::Duration) -> Problem {
    Problem::new(
        StatusCode::REQUEST_TIMEOUT,
        "body-timeout",
        "Request body too slow",
        format!(
            "the request body did not arrive within body_timeout ({} s); send the whole body at once, or check the network between client and server",
            limit.as_secs_f64()
        ),
    )
    // The rest of the body may still come; it must not be read as a request.
    .header(header::CONNECTION, "close")
}
