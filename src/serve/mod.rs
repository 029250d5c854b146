//! The HTTP server: hyper 1 over HTTP/1.1, one task per connection.
//!
//! Limits that keep one client from starving the rest: at most
//! `max_connections` open connections (more wait in the kernel's backlog),
//! `header_timeout` to send a request head, a request body cap
//! (`max_body_bytes`) and `body_timeout` to send it. On shutdown the listener
//! closes, SSE streams and long polls end (with an answer), and in-flight
//! requests get `shutdown_grace` to finish.
//!
//! # Layout
//!
//! `routes` is the table (after the `guard`s: Host against DNS rebinding,
//! Origin against CSRF; then `bearer`, the tokens and their scopes; `cors`
//! answers preflights and marks answers to allowed origins); `submit` and
//! `events` are the handlers; `poll` is
//! ETags and long polling, `sse` the event streams, `pages` the HTML, `query`
//! the decoding of query strings and headers, `problem` the error documents.

mod bearer;
mod cors;
mod events;
mod guard;
pub mod pages;
mod poll;
pub mod problem;
mod query;
pub mod routes;
pub mod sse;
mod submit;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::app::Shared;

/// Every response body: a full buffer or a stream (SSE).
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

pub fn empty() -> Body {
    Empty::new().boxed_unsync()
}

/// A JSON answer, never cached without revalidation.
pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
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

pub async fn run(sh: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(sh.settings.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&slots).acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, _peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off a little instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let sh2 = Arc::clone(&sh);
        let stop = shutdown.clone();
        let service = service_fn(move |req| {
            let sh = Arc::clone(&sh2);
            let stop = stop.clone();
            async move { Ok::<_, Infallible>(routes::route(sh, req, stop).await) }
        });
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(sh.settings.header_timeout)
            .keep_alive(true)
            .serve_connection(TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(sh.settings.shutdown_grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections were still open after shutdown_grace; closing them");
    }
}
