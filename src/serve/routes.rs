//! The routing table of the HTTP API (see docs/http-api.md): the request
//! guards first (`guard`: Host and Origin), then the token (`bearer`: the
//! scope each route needs), then one arm per method and path. The handlers
//! live in `submit` and `events`; `cors` adds its headers to every answer.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
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
    let mut resp = answer(&sh, req, shutdown)
        .await
        .unwrap_or_else(Problem::into_response);
    cors::decorate(&sh.settings, origin.as_deref(), &mut resp);
    resp
}

async fn answer(
    sh: &Arc<Shared>,
    req: Request<Incoming>,
    shutdown: CancellationToken,
) -> Result<Response<Body>, Problem> {
    guard::check(&sh.settings, req.method(), req.uri(), req.headers())?;
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let method = if req.method() == Method::HEAD {
        Method::GET
    } else {
        req.method().clone()
    };
    let need = bearer::need(&method, &segments);
    let token = bearer::check(&sh.settings.tokens, need, &method, req.uri(), req.headers())?;
    if let Some(t) = token {
        tracing::debug!(token = %t.name, %method, %path, "authenticated");
    }
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
        (&Method::GET, ["events", id, "stream"]) => events::stream(sh, id, &req, shutdown),
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
