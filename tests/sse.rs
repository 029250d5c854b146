//! Integration tests of `GET /events/{id}/stream` (SPEC §4): framing, headers,
//! heartbeats, resuming with Last-Event-ID, the end of a stream, fan-out to
//! several subscribers, slow subscribers and shutdown. Real `spoold`, real
//! sockets, no sleeps: the handlers wait for files the tests create.

mod common;

use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use common::{Server, Sse, SseEvent};
use serde_json::Value;

const FINAL: Duration = Duration::from_secs(10);
const SOON: Duration = Duration::from_secs(5);

/// Reports "step 1", waits for `<testdir>/go-<id>-1`, reports "step 2", ...
/// for `steps` steps, then prints "finished".
fn stepping(steps: u32) -> String {
    format!(
        r#"#!/bin/sh
i=1
while [ $i -le {steps} ]; do
  spoold report --progress $((i * 10)) --message "step $i"
  while [ ! -e "$SPOOL_DIR/../go-$SPOOL_ID-$i" ]; do sleep 0.01; done
  i=$((i + 1))
done
echo finished
"#
    )
}

fn go(srv: &Server, id: &str, step: u32) {
    fs::write(srv.dir.path().join(format!("go-{id}-{step}")), b"").unwrap();
}

fn stream_path(id: &str) -> String {
    format!("/events/{id}/stream")
}

fn open(srv: &Server, id: &str, headers: &[(&str, &str)]) -> Sse {
    let s = Sse::connect(srv.addr, &stream_path(id), headers);
    assert_eq!(s.status, 200, "stream of {id}: {:?} {:?}", s.headers, s.raw);
    s
}

/// Reads the `retry:` frame every stream starts with.
#[track_caller]
fn expect_retry(s: &mut Sse) {
    let ev = s.next(SOON).expect("a retry frame");
    assert_eq!(ev.retry, Some(500), "first frame: {ev:?}\nraw: {}", s.raw);
    assert!(
        s.raw.starts_with("retry: 500\n\n"),
        "the stream must start with the retry frame: {:?}",
        s.raw
    );
}

/// Reads until a `status` event whose message is `message`; returns all
/// events read, that one last.
#[track_caller]
fn read_to_message(s: &mut Sse, message: &str) -> Vec<SseEvent> {
    read_to_message_within(s, message, SOON)
}

#[track_caller]
fn read_to_message_within(s: &mut Sse, message: &str, within: Duration) -> Vec<SseEvent> {
    let deadline = Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(ev) = s.next(left) else {
            panic!("no status with message {message:?}; raw:\n{}", s.raw);
        };
        let found = ev.event.as_deref() == Some("status") && ev.json()["message"] == message;
        assert_ne!(ev.event.as_deref(), Some("end"), "ended early: {}", s.raw);
        seen.push(ev);
        if found {
            return seen;
        }
    }
}

/// Reads until a `status` event whose message is `message`; returns it.
#[track_caller]
fn until_message(s: &mut Sse, message: &str) -> SseEvent {
    read_to_message(s, message).pop().unwrap()
}

/// Waits until the server counts `n` open SSE streams.
fn wait_streams_open(srv: &Server, n: u64) {
    common::wait_until(FINAL, &format!("{n} open SSE streams"), || {
        let text = srv.get("/metrics").text();
        text.lines()
            .find_map(|l| l.strip_prefix("spoold_sse_streams_open "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            == Some(n)
    });
}

fn wait_message(srv: &Server, id: &str, message: &str) -> Value {
    let mut last = Value::Null;
    common::wait_until(FINAL, &format!("{id} to report {message:?}"), || {
        last = srv.status(id);
        last["message"] == message
    });
    last
}

/// Checks what every stream must satisfy: the status events have strictly
/// increasing numeric ids equal to their data's seq; a final `end` repeats
/// the final status.
#[track_caller]
fn check_sequence(events: &[SseEvent], id: &str) -> Value {
    let mut last: Option<u64> = None;
    let frames: Vec<&SseEvent> = events
        .iter()
        .filter(|e| !e.comment && e.retry.is_none())
        .collect();
    let (end, statuses) = frames.split_last().expect("events");
    assert_eq!(end.event.as_deref(), Some("end"), "{events:?}");
    for ev in statuses {
        assert_eq!(ev.event.as_deref(), Some("status"), "{ev:?}");
        let seq: u64 = ev.id.as_deref().unwrap().parse().expect("numeric id");
        let data = ev.json();
        assert_eq!(data["seq"], seq, "id is the seq: {ev:?}");
        assert_eq!(data["id"], id);
        assert!(last.is_none_or(|l| seq > l), "ids must grow: {events:?}");
        last = Some(seq);
    }
    let fin = end.json();
    assert_eq!(end.id.as_deref(), Some(fin["seq"].to_string().as_str()));
    assert!(
        !matches!(fin["state"].as_str(), Some("queued" | "running")),
        "end carries the final status: {fin}"
    );
    if let Some(l) = last {
        assert!(fin["seq"].as_u64().unwrap() >= l);
    }
    fin
}

#[test]
fn stream_sends_retry_then_every_change_then_end_and_closes() {
    let srv = common::server().handler("job", &stepping(3)).start();
    let id = srv.submit("job", "{}");
    let mut s = open(&srv, &id, &[]);
    assert_eq!(
        s.headers.get("content-type").map(String::as_str),
        Some("text/event-stream; charset=utf-8")
    );
    assert_eq!(
        s.headers.get("cache-control").map(String::as_str),
        Some("no-cache")
    );
    assert_eq!(
        s.headers.get("x-accel-buffering").map(String::as_str),
        Some("no")
    );
    expect_retry(&mut s);

    let mut events = Vec::new();
    for step in 1..=3 {
        events.extend(read_to_message(&mut s, &format!("step {step}")));
        let data = events.last().unwrap().json();
        assert_eq!(data["state"], "running", "{data}");
        assert_eq!(data["progress"], f64::from(step * 10), "{data}");
        go(&srv, &id, step);
    }
    events.extend(s.until("end", FINAL));
    let fin = check_sequence(&events, &id);
    assert_eq!(fin["state"], "succeeded");
    assert_eq!(fin["result"]["bytes"], 9);
    assert!(s.ends_within(SOON), "the stream must close after end");
    // The end's data is the status the API serves.
    assert_eq!(fin, srv.status(&id));
    // Every byte was UTF-8 (checked by the reader) and had no CR.
    assert!(!s.raw.contains('\r'), "{:?}", s.raw);
    wait_streams_open(&srv, 0);
}

#[test]
fn heartbeat_comments_keep_an_idle_stream_alive() {
    let srv = common::server()
        .handler("job", &stepping(1))
        .config("sse_heartbeat = \"200ms\"")
        .start();
    let id = srv.submit("job", "{}");
    wait_message(&srv, &id, "step 1");
    let mut s = open(&srv, &id, &[]);
    expect_retry(&mut s);
    let first = s.next(SOON).expect("the current status");
    assert_eq!(first.event.as_deref(), Some("status"));
    assert_eq!(first.json()["message"], "step 1");
    let t = Instant::now();
    for n in 1..=3 {
        let ev = s.next(Duration::from_secs(2)).expect("a keepalive");
        assert!(ev.comment, "keepalive {n}: expected a comment, got {ev:?}");
    }
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "three beats 200 ms apart came in {:?}",
        t.elapsed()
    );
    assert!(s.raw.contains("\n\n: keepalive\n\n"), "{:?}", s.raw);
    go(&srv, &id, 1);
    let events = s.until("end", FINAL);
    assert_eq!(events.last().unwrap().json()["state"], "succeeded");
    assert!(s.ends_within(SOON));
}

#[test]
fn no_heartbeat_before_sse_heartbeat_has_passed() {
    // FAST_CONFIG: heartbeat every 15 s, so an idle second is silent.
    let srv = common::server().handler("job", &stepping(1)).start();
    let id = srv.submit("job", "{}");
    wait_message(&srv, &id, "step 1");
    let mut s = open(&srv, &id, &[]);
    expect_retry(&mut s);
    assert_eq!(s.next(SOON).unwrap().event.as_deref(), Some("status"));
    let quiet = s.next(Duration::from_millis(700));
    assert!(
        quiet.is_none() && !s.closed(),
        "expected silence, got {quiet:?}"
    );
    go(&srv, &id, 1);
    s.until("end", FINAL);
}

#[test]
fn last_event_id_resumes_after_the_given_seq() {
    let srv = common::server().handler("job", &stepping(2)).start();
    let id = srv.submit("job", "{}");
    let seq = wait_message(&srv, &id, "step 1")["seq"].as_u64().unwrap();
    let s_str = seq.to_string();
    let prev = (seq - 1).to_string();
    let q = format!("{}?last_event_id={seq}", stream_path(&id));

    // Fresh: the current status at once.
    let mut fresh = open(&srv, &id, &[]);
    // Resuming at the current seq, by header or by query: nothing yet.
    let mut by_header = open(&srv, &id, &[("Last-Event-ID", &s_str)]);
    let mut by_query = Sse::connect(srv.addr, &q, &[]);
    assert_eq!(by_query.status, 200);
    // The header wins over the query.
    let both_path = format!("{}?last_event_id=0", stream_path(&id));
    let mut both = Sse::connect(srv.addr, &both_path, &[("Last-Event-ID", &s_str)]);
    // Resuming one seq back: the current status again.
    let mut behind = open(&srv, &id, &[("Last-Event-ID", &prev)]);
    for s in [
        &mut fresh,
        &mut by_header,
        &mut by_query,
        &mut both,
        &mut behind,
    ] {
        expect_retry(s);
    }
    for s in [&mut fresh, &mut behind] {
        let ev = s.next(SOON).expect("the current status");
        assert_eq!(ev.event.as_deref(), Some("status"));
        assert_eq!(ev.id.as_deref(), Some(s_str.as_str()));
    }
    wait_streams_open(&srv, 5);
    for (name, s) in [
        ("header", &mut by_header),
        ("query", &mut by_query),
        ("both", &mut both),
    ] {
        let ev = s.next(Duration::from_millis(500));
        assert!(
            ev.is_none() && !s.closed(),
            "resumed at {seq} by {name}: nothing new yet, got {ev:?}"
        );
    }

    go(&srv, &id, 1);
    for s in [
        &mut fresh,
        &mut by_header,
        &mut by_query,
        &mut both,
        &mut behind,
    ] {
        let ev = until_message(s, "step 2");
        assert!(ev.id.as_deref().unwrap().parse::<u64>().unwrap() > seq);
    }
    // Nothing at or before the resume point was ever sent on the resumed streams.
    for s in [&by_header, &by_query, &both] {
        assert!(!s.raw.contains("step 1"), "{}", s.raw);
    }
    go(&srv, &id, 2);
    let mut finals = Vec::new();
    for s in [
        &mut fresh,
        &mut by_header,
        &mut by_query,
        &mut both,
        &mut behind,
    ] {
        let events = s.until("end", FINAL);
        finals.push(events.last().unwrap().json());
        assert!(s.ends_within(SOON));
    }
    assert!(finals
        .iter()
        .all(|f| f == &finals[0] && f["state"] == "succeeded"));
}

#[test]
fn a_finished_event_streams_its_final_status_or_204_when_already_seen() {
    let srv = common::server()
        .handler("hi", "#!/bin/sh\necho hi\n")
        .start();
    let id = srv.submit("hi", "{}");
    let fin = srv.wait_final(&id, FINAL);
    let seq = fin["seq"].as_u64().unwrap();
    let seq_s = seq.to_string();

    // No Last-Event-ID: retry, the final status, end, close.
    for headers in [
        vec![],
        vec![("Last-Event-ID", "0")],
        vec![("Last-Event-ID", "1")],
    ] {
        let mut s = open(&srv, &id, &headers);
        expect_retry(&mut s);
        let status = s.next(SOON).expect("the final status");
        assert_eq!(status.event.as_deref(), Some("status"), "{headers:?}");
        assert_eq!(status.id.as_deref(), Some(seq_s.as_str()));
        assert_eq!(status.json(), fin);
        let end = s.next(SOON).expect("end");
        assert_eq!(end.event.as_deref(), Some("end"));
        assert_eq!(end.id.as_deref(), Some(seq_s.as_str()));
        assert_eq!(end.json(), fin);
        assert!(s.ends_within(SOON), "closes after end: {}", s.raw);
    }
    // Seen it all: 204 so that EventSource stops reconnecting.
    let q = format!("{}?last_event_id={seq}", stream_path(&id));
    for (path, headers) in [
        (stream_path(&id), vec![("Last-Event-ID", seq_s.as_str())]),
        (q, vec![]),
    ] {
        let mut h = headers.clone();
        h.push(("accept", "text/event-stream"));
        let r = common::request(srv.addr, "GET", &path, &h, b"");
        assert_eq!(r.status, 204, "{path} {headers:?}: {}", r.text());
        assert!(r.body.is_empty());
    }
    // One seq short of the end: the final status and end.
    let prev = (seq - 1).to_string();
    let mut s = open(&srv, &id, &[("Last-Event-ID", &prev)]);
    let events = s.until("end", SOON);
    assert_eq!(check_sequence(&events, &id), fin);
    assert!(s.ends_within(SOON));
}

#[test]
fn streams_of_unknown_or_malformed_ids_are_problems() {
    let srv = common::server().start();
    for (path, status, kind) in [
        (
            "/events/01ARZ3NDEKTSV4RRFFQ69G5FAV/stream",
            404,
            "/problems/not-found",
        ),
        ("/events/..%2F..%2Fetc/stream", 400, "/problems/invalid-id"),
        ("/events/nope/stream", 400, "/problems/invalid-id"),
    ] {
        let r = common::request(
            srv.addr,
            "GET",
            path,
            &[("accept", "text/event-stream"), ("Last-Event-ID", "3")],
            b"",
        );
        assert_eq!(r.status, status, "{path}: {}", r.text());
        assert_eq!(r.header("content-type"), Some("application/problem+json"));
        let p = r.json();
        assert_eq!(p["type"], kind);
        assert_eq!(p["status"], status);
        assert!(p["title"].is_string() && p["detail"].is_string(), "{p}");
    }
}

#[test]
fn several_subscribers_all_get_the_same_final_status() {
    let srv = common::server().handler("job", &stepping(1)).start();
    let id = srv.submit("job", "{}");
    let mut streams: Vec<Sse> = (0..5).map(|_| open(&srv, &id, &[])).collect();
    wait_streams_open(&srv, 5);
    for s in &mut streams {
        expect_retry(s);
        until_message(s, "step 1");
    }
    go(&srv, &id, 1);
    let mut finals = Vec::new();
    for s in &mut streams {
        let events = s.until("end", FINAL);
        let end = events.last().unwrap();
        finals.push((end.id.clone(), end.data.clone()));
        assert!(s.ends_within(SOON));
    }
    assert!(
        finals.iter().all(|f| f == &finals[0]),
        "every subscriber must see the same end: {finals:?}"
    );
    let fin: Value = serde_json::from_str(&finals[0].1).unwrap();
    assert_eq!(fin["state"], "succeeded");
    assert_eq!(fin, srv.status(&id));
    wait_streams_open(&srv, 0);
}

#[test]
fn a_stream_ends_with_the_cancelled_status_when_the_event_is_deleted() {
    let srv = common::server().handler("job", &stepping(1)).start();
    let id = srv.submit("job", "{}");
    let mut s = open(&srv, &id, &[]);
    expect_retry(&mut s);
    until_message(&mut s, "step 1");
    let r = srv.delete(&format!("/events/{id}"));
    assert!(r.status == 200 || r.status == 202, "{}", r.text());
    let events = s.until("end", FINAL);
    let fin = check_sequence(&events, &id);
    assert_eq!(fin["state"], "cancelled");
    assert!(s.ends_within(SOON));
}

#[test]
fn a_message_with_newlines_stays_one_json_data_line() {
    let srv = common::server()
        .handler(
            "job",
            r#"#!/bin/sh
spoold report --progress 5 --message "$(printf 'line1\nline2\r\nline3\rline4')"
while [ ! -e "$SPOOL_DIR/../go-$SPOOL_ID-1" ]; do sleep 0.01; done
echo '{"done": true}'
"#,
        )
        .start();
    let id = srv.submit("job", "{}");
    let mut s = open(&srv, &id, &[]);
    expect_retry(&mut s);
    let text = "line1\nline2\r\nline3\rline4";
    let mut events = read_to_message(&mut s, text);
    assert_eq!(events.last().unwrap().json()["progress"], 5.0);
    go(&srv, &id, 1);
    events.extend(s.until("end", FINAL));
    let fin = check_sequence(&events, &id);
    assert_eq!(fin["message"], text);
    assert!(!s.raw.contains('\r'), "a raw CR in the stream: {:?}", s.raw);
    assert!(!s.raw.contains('\0'));
    for block in s.raw.split("\n\n").filter(|b| !b.is_empty()) {
        let lines: Vec<&str> = block.split('\n').collect();
        let data = lines.iter().filter(|l| l.starts_with("data:")).count();
        assert!(
            data <= 1,
            "status JSON is compact, one data line: {block:?}"
        );
        for l in &lines {
            assert!(
                l.starts_with("data: ")
                    || l.starts_with("event: ")
                    || l.starts_with("id: ")
                    || l.starts_with("retry: ")
                    || l.starts_with(':'),
                "unexpected line {l:?} in {block:?}"
            );
        }
    }
}

/// A TCP connection whose receive buffer is tiny, so that a subscriber that
/// never reads backs up after a few kilobytes.
fn connect_with_small_receive_buffer(addr: SocketAddr) -> TcpStream {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 expected: {addr}")
    };
    // SAFETY: plain socket calls on a descriptor we own; it is handed to
    // TcpStream, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let size: libc::c_int = 2048;
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*v4.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

/// Fills the slow subscriber's socket with FILL big statuses (each folded
/// into the status before the next is written, so each one is published),
/// then takes 5 steps that each wait for the test.
const BIG_HANDLER: &str = r#"#!/bin/sh
pad=$(head -c 60000 /dev/zero | tr '\0' x)
status="$SPOOL_DIR/events/$SPOOL_ID/status.json"
put() {
  printf '{"progress": %d, "message": "%s", "data": {"step": %d, "pad": "%s"}}' "$1" "$2" "$1" "$pad" > "$SPOOL_PROGRESS.tmp" && mv "$SPOOL_PROGRESS.tmp" "$SPOOL_PROGRESS"
}
i=1
while [ $i -le FILL ]; do
  put $i "fill $i"
  while ! grep -q "\"step\":$i," "$status"; do sleep 0.005; done
  i=$((i + 1))
done
j=1
while [ $j -le 5 ]; do
  put $((FILL + j)) "final $j"
  while [ ! -e "$SPOOL_DIR/../go-$SPOOL_ID-$j" ]; do sleep 0.01; done
  j=$((j + 1))
done
echo finished
"#;

fn seqs(events: &[SseEvent]) -> std::collections::BTreeSet<u64> {
    events
        .iter()
        .filter(|e| e.event.as_deref() == Some("status"))
        .map(|e| e.id.as_deref().unwrap().parse().unwrap())
        .collect()
}

#[test]
fn a_subscriber_that_never_reads_does_not_delay_the_others() {
    // 80 statuses of ~60 kB: more than the kernel buffers for one socket
    // (net.ipv4.tcp_wmem max is 4 MiB), so the slow one really backs up.
    const FILL: u32 = 80;
    let srv = common::server()
        .handler("big", &BIG_HANDLER.replace("FILL", &FILL.to_string()))
        .config("progress_interval = \"5ms\"")
        .start();
    let id = srv.submit("big", "{}");
    let mut slow = Sse::over(
        connect_with_small_receive_buffer(srv.addr),
        &stream_path(&id),
        &[],
    );
    assert_eq!(slow.status, 200);
    let mut fast = open(&srv, &id, &[]);
    wait_streams_open(&srv, 2);
    expect_retry(&mut fast);

    // The fill runs only as fast as statuses are published; a publisher that
    // waited for the slow subscriber would stall it here.
    let t = Instant::now();
    let mut seen = read_to_message_within(&mut fast, "final 1", FINAL);
    eprintln!("fill of {FILL} statuses took {:?}", t.elapsed());
    for step in 1..=5 {
        let t = Instant::now();
        if step > 1 {
            seen.extend(read_to_message(&mut fast, &format!("final {step}")));
        }
        assert_eq!(seen.last().unwrap().json()["data"]["step"], FILL + step);
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "step {step} took {:?} to reach the fast subscriber",
            t.elapsed()
        );
        go(&srv, &id, step);
    }
    seen.extend(fast.until("end", FINAL));
    let fin = check_sequence(&seen, &id);
    assert_eq!(fin["state"], "succeeded");
    assert!(fast.ends_within(SOON));

    // The slow one, read at last: a well-formed stream that either ends with
    // the same final status or was cut off, never garbage.
    let mut late = Vec::new();
    let deadline = Instant::now() + FINAL;
    while let Some(ev) = slow.next(deadline.saturating_duration_since(Instant::now())) {
        late.push(ev);
    }
    assert!(
        slow.closed(),
        "the slow stream neither ended nor was cut off"
    );
    let frames: Vec<SseEvent> = late.into_iter().filter(|e| !e.comment).collect();
    let mut last = 0;
    for ev in frames.iter().filter(|e| e.retry.is_none()) {
        let seq: u64 = ev.id.as_deref().unwrap().parse().unwrap();
        assert!(seq >= last, "ids go back: {seq} after {last}");
        last = seq;
        assert_eq!(ev.json()["seq"], seq);
    }
    if let Some(end) = frames.last().filter(|e| e.event.as_deref() == Some("end")) {
        assert_eq!(end.json(), fin);
    }
    // It really was slow: it missed statuses the fast one got.
    let missed: Vec<u64> = seqs(&seen).difference(&seqs(&frames)).copied().collect();
    assert!(
        !missed.is_empty(),
        "the slow subscriber got every status, so it was never backed up and the test proves nothing"
    );
}

#[test]
fn open_streams_end_cleanly_on_sigterm_and_spoold_exits_0() {
    let mut srv = common::server().handler("job", &stepping(1)).start();
    let id = srv.submit("job", "{}");
    let mut streams: Vec<Sse> = (0..2).map(|_| open(&srv, &id, &[])).collect();
    for s in &mut streams {
        expect_retry(s);
        until_message(s, "step 1");
    }
    wait_streams_open(&srv, 2);
    let sigterm = Instant::now();
    let readers: Vec<_> = streams
        .into_iter()
        .map(|mut s| {
            std::thread::spawn(move || {
                let closed = s.ends_within(Duration::from_secs(20));
                (closed, s.terminated, sigterm.elapsed(), s.raw)
            })
        })
        .collect();
    let code = srv.stop();
    assert_eq!(code, Some(0), "spoold's exit status after SIGTERM");
    for r in readers {
        let (closed, terminated, took, raw) = r.join().unwrap();
        assert!(closed, "the stream stayed open");
        assert!(
            took < Duration::from_secs(3),
            "the stream stayed open {took:?} after SIGTERM"
        );
        assert!(
            terminated,
            "the chunked body must be ended with its last chunk, not cut: {raw:?}"
        );
        assert!(
            !raw.contains("event: end"),
            "the event did not end: {raw:?}"
        );
    }
}

/// Reads one whole response with a Content-Length off a keep-alive socket.
fn read_sized_response(sock: &mut TcpStream) -> String {
    use std::io::Read;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(sock.read(&mut byte).unwrap(), 1, "closed mid-head");
        got.push(byte[0]);
    }
    let head = String::from_utf8(got).unwrap();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("a content-length");
    let mut body = vec![0u8; len];
    sock.read_exact(&mut body).unwrap();
    head + &String::from_utf8(body).unwrap()
}

/// The first request of a connection is sorted before hyper sees it (see
/// src/serve/direct.rs); a stream asked for later on a keep-alive
/// connection, as a browser reusing its connection does, still streams.
#[test]
fn a_stream_asked_for_on_a_used_keep_alive_connection_streams_too() {
    use std::io::Write;
    let srv = common::server().handler("job", &stepping(1)).start();
    let id = srv.submit("job", "{}");
    let mut sock = TcpStream::connect(srv.addr).unwrap();
    sock.set_read_timeout(Some(FINAL)).unwrap();
    let poll = format!("GET /events/{id} HTTP/1.1\r\nHost: {}\r\n\r\n", srv.addr);
    sock.write_all(poll.as_bytes()).unwrap();
    let answer = read_sized_response(&mut sock);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut s = Sse::over(sock, &stream_path(&id), &[]);
    assert_eq!(s.status, 200, "{:?}", s.raw);
    expect_retry(&mut s);
    until_message(&mut s, "step 1");
    go(&srv, &id, 1);
    let fin = check_sequence(&s.until("end", FINAL), &id);
    assert_eq!(fin["state"], "succeeded");
    assert!(s.ends_within(SOON), "the stream must close after end");
}

/// A subscriber that hangs up is let go at once, not at the next
/// heartbeat (an hour away here): its slot under max_streams is free again.
#[test]
fn a_subscriber_that_hangs_up_is_let_go_at_once() {
    let srv = common::server()
        .handler("job", &stepping(1))
        .config("sse_heartbeat = \"1h\"")
        .start();
    let id = srv.submit("job", "{}");
    let mut s = open(&srv, &id, &[]);
    expect_retry(&mut s);
    wait_streams_open(&srv, 1);
    drop(s);
    wait_streams_open(&srv, 0);
    go(&srv, &id, 1);
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");
}
