//! `GET /events/{id}/stream`: Server-Sent Events for one event.
//!
//! Frames: `retry:` first; then `event: status` / `id: <seq>` / `data: <status
//! JSON>` whenever the status changes; a `: keepalive` comment every
//! `sse_heartbeat` so proxies keep the connection; and on a final state one
//! `event: end` whose data is the final status, after which the stream closes.
//! Browsers drop events without data, hence the data on `end`.
//!
//! Resuming: `Last-Event-ID` (or `?last_event_id=` for a first connect) is the
//! seq the client has; only newer statuses are sent. A reconnect to a finished
//! event the client has fully seen gets 204, which tells EventSource to stop
//! reconnecting.
//!
//! Each stream reads a shared `watch` channel of the newest status, so a slow
//! subscriber skips to the latest status instead of queueing a backlog; it never
//! delays anyone else. A status's frames are encoded once, on the first
//! subscriber's turn, and shared by the rest. Streams end when spoold shuts
//! down.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http_body_util::{BodyExt, StreamBody};
use hyper::{header, Response, StatusCode};
use tokio::time::{interval_at, Instant, Interval};
use tokio_util::sync::CancellationToken;

use super::problem::Problem;
use super::Body;
use crate::app::Shared;
use crate::hub::{Frame, Subscription};
use crate::spool::ids::EventId;

/// The decoders of what clients send, public for the fuzz targets (`fuzz/`):
/// their modules, `query` and `submit`, are private to `serve`.
pub use super::query::{last_event_id, query, wait_limit, wants_html};
pub use super::submit::json_body;

/// Encodes one SSE event. `event` and `id` lose any CR, LF or NUL (they
/// would end the field early); `data` is split into one `data:` line per line.
pub fn encode(event: Option<&str>, id: Option<&str>, data: &str) -> String {
    let clean = |s: &str| {
        s.chars()
            .filter(|c| !matches!(c, '\r' | '\n' | '\0'))
            .collect::<String>()
    };
    let mut out = String::with_capacity(data.len() + 48);
    if let Some(event) = event {
        out.push_str("event: ");
        out.push_str(&clean(event));
        out.push('\n');
    }
    if let Some(id) = id {
        out.push_str("id: ");
        out.push_str(&clean(id));
        out.push('\n');
    }
    let data = data
        .replace("\r\n", "\n")
        .replace('\r', "\n")
        .replace('\0', "\u{fffd}");
    for line in data.split('\n') {
        out.push_str("data: ");
        out.push_str(line);
        out.push('\n');
    }
    out.push('\n');
    out
}

struct Stream {
    sub: Subscription,
    sent: Option<u64>,
    started: bool,
    done: bool,
    retry: Duration,
    heartbeat: Interval,
    shutdown: CancellationToken,
    sh: Arc<Shared>,
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.sh.metrics.sse_open.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn respond(
    sh: &Arc<Shared>,
    id: &EventId,
    last_event_id: Option<u64>,
    shutdown: CancellationToken,
) -> Result<Response<Body>, Problem> {
    let spool = Arc::clone(&sh.spool);
    let load_id = id.clone();
    let sub = sh
        .hub
        .subscribe(id, move || spool.read_status(&load_id).ok().flatten())
        .ok_or_else(|| Problem::not_found(format!("no event {id}")))?;
    let current = Arc::clone(&sub.rx.borrow());
    // A client that claims a seq we never issued gets the whole story again.
    let sent = last_event_id.filter(|&n| n <= current.seq);
    if current.state.is_terminal() && sent == Some(current.seq) {
        let mut resp = Response::new(super::empty());
        *resp.status_mut() = StatusCode::NO_CONTENT;
        return Ok(resp);
    }
    let open = sh.metrics.sse_open.fetch_add(1, Ordering::Relaxed);
    if open >= sh.settings.max_streams as i64 {
        sh.metrics.sse_open.fetch_sub(1, Ordering::Relaxed);
        return Err(too_many_streams(sh.settings.max_streams));
    }
    let beat = sh.settings.sse_heartbeat;
    let state = Stream {
        sub,
        sent,
        started: false,
        done: false,
        retry: sh.settings.sse_retry,
        heartbeat: interval_at(Instant::now() + beat, beat),
        shutdown,
        sh: Arc::clone(sh),
    };
    let frames = stream::unfold(state, |mut st| async move {
        let bytes = next_frame(&mut st).await?;
        Some((
            Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(bytes)),
            st,
        ))
    });
    let mut resp = Response::new(StreamBody::new(frames).boxed_unsync());
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    h.insert("x-accel-buffering", header::HeaderValue::from_static("no"));
    // A stream is the last answer on its connection, whichever way it is
    // served (see `direct`).
    h.insert(
        header::CONNECTION,
        header::HeaderValue::from_static("close"),
    );
    Ok(resp)
}

/// Over `max_streams`: the last connections are kept for polls and submits.
fn too_many_streams(max: usize) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "too-many-streams",
        "Too many streams",
        format!("{max} event streams are open, the most this spoold allows (max_streams); poll GET /events/{{id}} instead, or retry later"),
    )
    .header(header::RETRY_AFTER, "5")
}

/// One status as an SSE event, for every subscriber alike.
fn frame(event: &str, seq: u64, json: &[u8]) -> String {
    encode(
        Some(event),
        Some(&seq.to_string()),
        &String::from_utf8_lossy(json),
    )
}

async fn next_frame(st: &mut Stream) -> Option<Bytes> {
    if st.done {
        return None;
    }
    if !st.started {
        st.started = true;
        return Some(Bytes::from(format!("retry: {}\n\n", st.retry.as_millis())));
    }
    loop {
        let status = Arc::clone(&st.sub.rx.borrow_and_update());
        if st.sent.is_none_or(|n| status.seq > n) {
            st.sent = Some(status.seq);
            return Some(status.frame(Frame::Status, |json| frame("status", status.seq, json)));
        }
        if status.state.is_terminal() {
            st.done = true;
            return Some(status.frame(Frame::End, |json| frame("end", status.seq, json)));
        }
        tokio::select! {
            changed = st.sub.rx.changed() => {
                if changed.is_err() {
                    return None;
                }
            }
            _ = st.heartbeat.tick() => return Some(Bytes::from_static(b": keepalive\n\n")),
            _ = st.shutdown.cancelled() => {
                st.done = true;
                return None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::encode;

    #[test]
    fn fields_cannot_be_injected() {
        let out = encode(
            Some("status\r\nevent: evil"),
            Some("7\nid: 9\0"),
            "a\r\nb\rc\nd",
        );
        assert_eq!(
            out,
            "event: statusevent: evil\nid: 7id: 9\ndata: a\ndata: b\ndata: c\ndata: d\n\n"
        );
    }

    #[test]
    fn empty_data_is_one_line() {
        assert_eq!(encode(None, None, ""), "data: \n\n");
    }
}
