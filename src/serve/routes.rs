//! The routing table of the HTTP API (see docs/http-api.md): the request
//! guards first (`guard`: Host and Origin), then the token (`bearer`: the
//! scope each route needs), then one arm per method and path. The handlers
//! live in `submit` and `events`; `cors` adds its headers to every answer.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::problem::Problem;
use super::query::header_str;
use super::{bearer, cors, events, full, guard, json_response, pages, submit, Body};
use crate::app::Shared;
use crate::dispatch::handlers;
use crate::metrics::Metrics;

pub async fn route(
    sh: Arc<Shared>,
    req: Request<Incoming>,
    shutdown: CancellationToken,
) -> Response<Body> {
    Metrics::inc(&sh.metrics.http_requests);
    let origin = header_str(req.headers(), "origin").map(str::to_owned);
    let answer = answer(&sh, req, shutdown).await;
    respond(&sh, origin.as_deref(), answer)
}

/// Routes a request that has no body, read outside hyper: only the event
/// streams come this way (see `direct`).
pub async fn route_head(
    sh: Arc<Shared>,
    req: &Request<()>,
    shutdown: CancellationToken,
) -> Response<Body> {
    Metrics::inc(&sh.metrics.http_requests);
    let segments = segments(req.uri().path());
    let answer = admit(&sh, req.method(), req.uri(), req.headers(), &segments).and_then(|method| {
        match (&method, segments.as_slice()) {
            (&Method::GET, ["events", id, "stream"]) => {
                events::stream(&sh, id, req.headers(), req.uri(), shutdown)
            }
            _ => Err(Problem::not_found("only event streams are routed here")),
        }
    });
    respond(&sh, header_str(req.headers(), "origin"), answer)
}

/// The answer as sent: a problem as its document, and the CORS headers
/// when the origin is allowed.
fn respond(
    sh: &Shared,
    origin: Option<&str>,
    answer: Result<Response<Body>, Problem>,
) -> Response<Body> {
    let mut resp = answer.unwrap_or_else(Problem::into_response);
    cors::decorate(&sh.settings, origin, &mut resp);
    resp
}

/// What every request passes before its handler: the guards (Host,
/// Origin), then the token its route (`segments` of the path) needs.
/// Returns the method to route on (HEAD is routed as GET).
fn admit(
    sh: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    segments: &[&str],
) -> Result<Method, Problem> {
    guard::check(&sh.settings, method, uri, headers)?;
    let method = if method == Method::HEAD {
        Method::GET
    } else {
        method.clone()
    };
    let need = bearer::need(&method, segments);
    let token = bearer::check(&sh.settings.tokens, need, &method, uri, headers)?;
    if let Some(t) = token {
        tracing::debug!(token = %t.name, %method, path = uri.path(), "authenticated");
    }
    Ok(method)
}

fn segments(path: &str) -> Vec<&str> {
    path.trim_start_matches('/').split('/').collect()
}

async fn answer(
    sh: &Arc<Shared>,
    req: Request<Incoming>,
    shutdown: CancellationToken,
) -> Result<Response<Body>, Problem> {
    let path = req.uri().path().to_owned();
    let segments = segments(&path);
    let method = admit(sh, req.method(), req.uri(), req.headers(), &segments)?;
    match (&method, segments.as_slice()) {
        (&Method::OPTIONS, _) => cors::options(&sh.settings, req.headers()),
        (&Method::GET, [""]) => Ok(pages::demo()),
        (&Method::GET, ["healthz"]) => Ok(json_response(StatusCode::OK, &json!({"status": "ok"}))),
        (&Method::GET, ["metrics"]) => Ok(metrics(sh)),
        (&Method::GET, ["handlers"]) => Ok(json_response(StatusCode::OK, &json!(handlers::list(&sh.settings.handlers_dir)))),
        (&Method::POST, ["events", kind]) => submit::submit(sh, kind, req).await,
        (&Method::POST, ["events"]) => Err(Problem::new(
            StatusCode::NOT_IMPLEMENTED,
            "cloudevents-not-yet",
            "Not implemented",
            "CloudEvents submission is not available yet; POST your JSON to /events/{type} instead",
        )),
        (&Method::GET, ["events", id]) => events::get_status(sh, id, &req, &shutdown).await,
        (&Method::GET, ["events", id, "result"]) => events::get_result(sh, id).await,
        (&Method::GET, ["events", id, "stream"]) => events::stream(sh, id, req.headers(), req.uri(), shutdown),
        (&Method::DELETE, ["events", id]) => events::cancel(sh, id, &shutdown).await,
        (_, [""] | ["healthz"] | ["metrics"] | ["handlers"] | ["events", _, "result"] | ["events", _, "stream"]) => Err(not_allowed("GET, HEAD")),
        (_, ["events", _]) => Err(not_allowed("GET, HEAD, POST, DELETE")),
        _ => Err(Problem::not_found(format!(
            "nothing at {}: the API is POST /events/{{type}}, GET|DELETE /events/{{id}}, GET /events/{{id}}/result and /events/{{id}}/stream",
            truncate(&path, 100)
        ))),
    }
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

fn metrics(sh: &Shared) -> Response<Body> {
    let mut resp = Response::new(full(sh.metrics.render(sh.dispatch.pending())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}
