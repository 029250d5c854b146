//! The HTTP server: hyper 1 over HTTP/1.1, one task per connection.
//!
//! Limits that keep one client from starving the rest: at most
//! `max_connections` open connections (more wait in the kernel's backlog),
//! at most `max_connections_per_client` from one address (more are answered
//! `503` at once; `exempt_clients`, the reverse proxies, are not counted), at
//! most `max_streams` SSE streams (so polls and submits always find a
//! connection), `header_timeout` to send a request head and to send the next
//! one on an idle keep-alive connection, a request body cap
//! (`max_body_bytes`) and `body_timeout` to send it. On shutdown the listener
//! closes, SSE streams and long polls end (with an answer), and in-flight
//! requests get `shutdown_grace` to finish.
//!
//! # Layout
//!
//! `routes` is the table (after the `guard`s: Host against DNS rebinding,
//! Origin against CSRF; then `bearer`, the tokens and their scopes; `cors`
//! answers preflights and marks answers to allowed origins); `submit` and
//! `events` are the handlers; `direct` writes SSE streams past hyper; `poll` is
//! ETags and long polling, `statuses` the status reads (final ones cached),
//! `sse` the event streams, `pages` the HTML, `query` the decoding of query
//! strings and headers, `problem` the error documents.

mod bearer;
mod cors;
mod direct;
mod events;
mod guard;
pub mod pages;
mod poll;
pub mod problem;
mod query;
pub mod routes;
pub mod sse;
pub mod statuses;
mod submit;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

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

/// Serves until `shutdown`: one thread per core, each with its own
/// single-threaded runtime accepting from the same listening socket, the
/// way nginx runs a worker per core. A connection then lives on one thread:
/// no task hops between threads, no wakeups across cores, which on a small
/// machine is most of the difference to a static file server. What the
/// threads share (the limits, `Shared`) is behind `Arc`s and atomics.
pub async fn run(sh: Arc<Shared>, listener: TcpListener, shutdown: CancellationToken) {
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot hand the listening socket to the HTTP threads");
            return;
        }
    };
    let limits = Limits {
        slots: Arc::new(Semaphore::new(sh.settings.max_connections)),
        clients: Arc::new(Clients::new(&sh.settings)),
    };
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(16));
    let mut stopped = Vec::with_capacity(threads);
    for n in 0..threads {
        let listener = match listener.try_clone() {
            Ok(l) => l,
            Err(e) if n > 0 => {
                tracing::warn!(error = %e, threads = n, "fewer HTTP threads than cores; raise the open-files limit (ulimit -n)");
                break;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot share the listening socket; raise the open-files limit (ulimit -n)");
                return;
            }
        };
        let (sh, limits, shutdown) = (Arc::clone(&sh), limits.clone(), shutdown.clone());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("spoold-http-{n}"))
            .spawn(move || {
                // Together no more blocking threads than one default pool.
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .max_blocking_threads((512 / threads).max(16))
                    .build();
                match rt {
                    Ok(rt) => rt.block_on(accept_loop(sh, listener, limits, shutdown)),
                    Err(e) => tracing::error!(error = %e, "cannot start an HTTP thread; raise the limits on processes and memory (ulimit -u, ulimit -v)"),
                }
                drop(tx);
            });
        match spawned {
            Ok(_) => stopped.push(rx),
            Err(e) => {
                tracing::error!(error = %e, "cannot start an HTTP thread; raise the limits on processes and memory (ulimit -u, ulimit -v)")
            }
        }
    }
    // The socket closes when the last thread's copy does.
    drop(listener);
    for rx in stopped {
        let _ = rx.await;
    }
}

/// The largest request head: more is answered `431`.
const MAX_HEAD: usize = 64 * 1024;

/// What all HTTP threads count against.
#[derive(Clone)]
struct Limits {
    slots: Arc<Semaphore>,
    clients: Arc<Clients>,
}

async fn accept_loop(
    sh: Arc<Shared>,
    listener: std::net::TcpListener,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen on an HTTP thread");
            return;
        }
    };
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&limits.slots).acquire_owned() => p.expect("semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
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
        let Some(client) = limits.clients.enter(peer.ip()) else {
            tokio::spawn(refuse_busy_client(stream));
            continue;
        };
        let _ = stream.set_nodelay(true);
        let (sh, stop, watcher) = (Arc::clone(&sh), shutdown.clone(), graceful.watcher());
        tokio::spawn(async move {
            let mut stream = stream;
            match direct::first_request(&mut stream, sh.settings.header_timeout).await {
                direct::First::Gone => {}
                direct::First::Stream(req) => direct::serve_stream(sh, stream, req, stop).await,
                direct::First::Hyper(pre) => {
                    let timeout = sh.settings.header_timeout;
                    let service = service_fn(move |req| {
                        let sh = Arc::clone(&sh);
                        let stop = stop.clone();
                        async move { Ok::<_, Infallible>(routes::route(sh, req, stop).await) }
                    });
                    let conn = http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(timeout)
                        // hyper checks this between reads, and one read can
                        // take in more: with its default (about 400 KB) a
                        // 500 KB head sent whole was sometimes read whole
                        // and served. 64 KB keeps any read well below that.
                        .max_buf_size(MAX_HEAD)
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(direct::Rewind::new(pre, stream)), service);
                    let _ = watcher.watch(conn).await;
                }
            }
            drop(client);
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

/// Open connections per client address, for `max_connections_per_client`.
struct Clients {
    limit: usize,
    exempt: Vec<IpAddr>,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One counted connection; uncounted when dropped.
struct ClientSlot {
    clients: Arc<Clients>,
    ip: IpAddr,
}

impl Clients {
    fn new(settings: &crate::config::Settings) -> Clients {
        Clients {
            limit: settings.max_connections_per_client,
            exempt: settings.exempt_clients.clone(),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// A slot for one more connection from `ip`; None when it has its share.
    /// Exempt addresses get a slot that counts nothing.
    fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<Option<ClientSlot>> {
        let ip = ip.to_canonical();
        if self.exempt.contains(&ip) {
            return Some(None);
        }
        let mut open = self.open.lock().expect("client counts");
        let n = open.entry(ip).or_insert(0);
        if *n >= self.limit {
            return None;
        }
        *n += 1;
        Some(Some(ClientSlot {
            clients: Arc::clone(self),
            ip,
        }))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.clients.open.lock().expect("client counts");
        if let Some(n) = open.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// The answer to a client over `max_connections_per_client`: a short `503`,
/// written without reading its request, then close.
async fn refuse_busy_client(mut stream: tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    const BODY: &str = r#"{"type":"/problems/too-many-connections","title":"Too many connections","status":503,"detail":"this client address has max_connections_per_client connections open already; close some (or reuse them with keep-alive) and retry"}"#;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{BODY}",
        BODY.len()
    );
    let refuse = async {
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        // Read what the client sent before closing: closing on unread
        // bytes resets the connection, and the client would never see the 503.
        let mut sink = [0u8; 4096];
        while tokio::io::AsyncReadExt::read(&mut stream, &mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), refuse).await;
}
