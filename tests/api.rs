//! Integration tests of the HTTP API (SPEC §3, §4): submit, status, long-poll,
//! the HTML wait page, results, cancel, and the small endpoints. Every test
//! runs the real `spoold` binary and talks raw HTTP to it.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{request, Resp, Server};
use serde_json::{json, Value};

const FINAL: Duration = Duration::from_secs(10);

/// Asserts an RFC 9457 problem response and returns its JSON.
#[track_caller]
fn assert_problem(r: &Resp, status: u16, kind: &str) -> Value {
    assert_eq!(r.status, status, "status of {:?}: {}", r.headers, r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "problem content type: {}",
        r.text()
    );
    let p = r.json();
    assert_eq!(p["type"], format!("/problems/{kind}"), "problem: {p}");
    assert!(p["type"].as_str().unwrap().starts_with("/problems/"), "{p}");
    assert!(
        p["title"].as_str().is_some_and(|t| !t.is_empty()),
        "problem title: {p}"
    );
    assert_eq!(p["status"], status, "problem status member: {p}");
    assert!(
        p["detail"].as_str().is_some_and(|d| d.len() > 10),
        "problem detail: {p}"
    );
    p
}

fn get_h(srv: &Server, path: &str, headers: &[(&str, &str)]) -> Resp {
    request(srv.addr, "GET", path, headers, b"")
}

fn post_h(srv: &Server, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    request(srv.addr, "POST", path, headers, body)
}

/// Lets the `common::BLOCKING` handler of event `id` finish.
fn release(srv: &Server, id: &str) {
    fs::write(srv.dir.path().join(format!("go-{id}")), b"").unwrap();
}

fn wait_state(srv: &Server, id: &str, state: &str) -> Value {
    let mut last = Value::Null;
    common::wait_until(FINAL, &format!("event {id} to be {state}"), || {
        last = srv.status(id);
        last["state"] == state
    });
    last
}

/// Waits until the event is running and its handler's first progress report
/// has been folded into the status.
fn wait_progress(srv: &Server, id: &str) -> Value {
    let mut last = Value::Null;
    common::wait_until(FINAL, &format!("event {id} to report progress"), || {
        last = srv.status(id);
        last["state"] == "running" && last["progress"] == 42.0
    });
    last
}

fn event_dirs(srv: &Server) -> Vec<String> {
    common::names(&srv.spool.join("events"))
}

fn metric(srv: &Server, name: &str) -> f64 {
    let r = srv.get("/metrics");
    assert_eq!(r.status, 200);
    r.text()
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in:\n{}", r.text()))
}

/// The server's request count, to pass to [`wait_for_requests`].
fn requests_so_far(srv: &Server) -> f64 {
    metric(srv, "spoold_http_requests_total")
}

/// Waits until the server has seen `n` more requests since `before` besides
/// the /metrics requests made here to count them.
fn wait_for_requests(srv: &Server, before: f64, n: u32) {
    let mut asked = 0.0;
    common::wait_until(FINAL, "requests to reach the server", || {
        asked += 1.0;
        metric(srv, "spoold_http_requests_total") >= before + asked + f64::from(n)
    });
}

fn elapsed_ms(t: Instant) -> u128 {
    t.elapsed().as_millis()
}

// ---------------------------------------------------------------- submit

#[test]
fn submit_answers_202_with_location_retry_after_etag_and_links() {
    let srv = common::server().handler("echo", common::BLOCKING).start();
    let r = srv.post("/events/echo", r#"{"n": 1}"#);
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    let id = v["id"].as_str().expect("id").to_owned();
    assert_eq!(id.len(), 26, "a ULID: {id}");
    assert!(
        id.bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()),
        "{id}"
    );
    assert_eq!(r.header("location"), Some(format!("/events/{id}").as_str()));
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("etag"), Some("\"0\""));
    assert_eq!(v["type"], "echo");
    assert_eq!(v["state"], "queued");
    assert_eq!(v["seq"], 0);
    assert_eq!(
        v["links"],
        json!({
            "self": format!("/events/{id}"),
            "result": format!("/events/{id}/result"),
            "stream": format!("/events/{id}/stream"),
            "page": format!("/events/{id}"),
        })
    );
    // The Location really names the event.
    let st = srv.status(&id);
    assert_eq!(st["id"], id);
    assert_eq!(st["type"], "echo");
    release(&srv, &id);
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");
}

#[test]
fn the_payload_reaches_the_handler_and_an_empty_body_counts_as_empty_object() {
    let srv = common::server()
        .handler("cat", "#!/bin/sh\nexec cat\n")
        .start();
    let body = r#"{"name": "Zoë", "list": [1, 2.5, null], "nested": {"a": true}}"#;
    let id = srv.submit("cat", body);
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");
    assert_eq!(srv.get(&format!("/events/{id}/result")).text(), body);

    for empty in ["", "  \r\n\t "] {
        let r = srv.post("/events/cat", empty);
        assert_eq!(r.status, 202, "body {empty:?}: {}", r.text());
        let id = r.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");
        let res = srv.get(&format!("/events/{id}/result"));
        assert_eq!(res.status, 200);
        assert_eq!(res.text(), "{}", "the handler's stdin for body {empty:?}");
    }
}

#[test]
fn bad_json_is_a_400_problem_that_says_how_to_fix_it() {
    let srv = common::server()
        .handler("cat", "#!/bin/sh\nexec cat\n")
        .start();
    for body in [
        "{not json",
        "{\"a\": 1,}",
        "[1, 2",
        "{\"a\": 1} trailing",
        "'single'",
    ] {
        let r = srv.post("/events/cat", body);
        let p = assert_problem(&r, 400, "bad-json");
        assert!(
            p["detail"].as_str().unwrap().contains("JSON"),
            "the detail should explain the fix: {p}"
        );
    }
    // Invalid UTF-8 is not JSON either.
    let r = post_h(
        &srv,
        "/events/cat",
        &[("content-type", "application/json")],
        b"{\"a\": \"\xff\xfe\"}",
    );
    assert_problem(&r, 400, "bad-json");
    assert!(
        event_dirs(&srv).is_empty(),
        "nothing may be spooled: {:?}",
        event_dirs(&srv)
    );
}

#[test]
fn invalid_types_are_rejected_with_400_before_anything_is_spooled() {
    let long = "a".repeat(65);
    let srv = common::server()
        .handler("cat", "#!/bin/sh\nexec cat\n")
        .handler(&"b".repeat(64), "#!/bin/sh\necho ok\n")
        .start();
    for bad in [
        "Cat",
        "CAT",
        "..",
        ".",
        "%2E%2E",
        "a%2Fb",
        "..%2F..%2Fetc%2Fpasswd",
        long.as_str(),
        ".hidden",
        "-dash",
        "_under",
        "a%20b",
        "caf%C3%A9",
    ] {
        let r = srv.post(&format!("/events/{bad}"), "{}");
        let p = assert_problem(&r, 400, "invalid-type");
        assert!(
            p["detail"].as_str().unwrap().contains("a-z"),
            "the detail should say what a type looks like: {p}"
        );
    }
    // A literal slash makes it another path: not found, and nothing spooled.
    for path in ["/events/a/b", "/events/../handlers"] {
        let r = srv.post(path, "{}");
        assert!(
            r.status == 400 || r.status == 404,
            "{path}: {} {}",
            r.status,
            r.text()
        );
        assert_problem(
            &r,
            r.status,
            if r.status == 400 {
                "invalid-type"
            } else {
                "not-found"
            },
        );
    }
    assert!(event_dirs(&srv).is_empty(), "{:?}", event_dirs(&srv));
    // 64 characters is still a valid type.
    let id = srv.submit(&"b".repeat(64), "{}");
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");
}

#[test]
fn unknown_or_non_executable_types_are_404() {
    let srv = common::server()
        .handler("cat", "#!/bin/sh\nexec cat\n")
        .start();
    fs::write(srv.handlers.join("plain"), "#!/bin/sh\necho hi\n").unwrap();
    let r = srv.post("/events/nosuch", "{}");
    let p = assert_problem(&r, 404, "unknown-type");
    assert!(p["detail"].as_str().unwrap().contains("nosuch"), "{p}");
    let r = srv.post("/events/plain", "{}");
    let p = assert_problem(&r, 404, "unknown-type");
    assert!(
        p["detail"].as_str().unwrap().contains("chmod"),
        "a non-executable handler: the detail should say to make it executable: {p}"
    );
    // A handler's own config file is not a type.
    fs::write(srv.handlers.join("cat.toml"), "timeout = \"5s\"\n").unwrap();
    assert_problem(&srv.post("/events/cat.toml", "{}"), 404, "unknown-type");
    assert!(event_dirs(&srv).is_empty(), "{:?}", event_dirs(&srv));
}

#[test]
fn bodies_over_max_body_bytes_are_413_by_content_length_and_when_chunked() {
    let srv = common::server()
        .handler("cat", "#!/bin/sh\nexec cat\n")
        .config("max_body_bytes = 64")
        .start();
    // Exactly at the cap: fine.
    let at_cap = format!("{{\"s\": \"{}\"}}", "x".repeat(64 - 9));
    assert_eq!(at_cap.len(), 64);
    let id = srv.submit("cat", &at_cap);
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");

    // One byte over, declared by Content-Length.
    let over = format!("{{\"s\": \"{}\"}}", "x".repeat(65 - 9));
    assert_eq!(over.len(), 65);
    let p = assert_problem(&srv.post("/events/cat", &over), 413, "body-too-large");
    assert!(p["detail"].as_str().unwrap().contains("64"), "{p}");

    // A huge declared length is refused at once, without waiting for the body.
    let t = Instant::now();
    let raw = b"POST /events/cat HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{\"s\": \"";
    let r = common::raw_request(srv.addr, raw);
    assert_problem(&r, 413, "body-too-large");
    assert!(elapsed_ms(t) < 5000, "took {} ms", elapsed_ms(t));

    // Chunked, no length declared: over the cap in total.
    let mut raw = b"POST /events/cat HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    let mut body = format!("{{\"s\": \"{}\"}}", "y".repeat(200)).into_bytes();
    for chunk in body.chunks(30) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let r = common::raw_request(srv.addr, &raw);
    assert_problem(&r, 413, "body-too-large");

    // Chunked and under the cap: accepted, the handler sees the whole body.
    body = br#"{"chunked": [1, 2, 3]}"#.to_vec();
    let mut raw = b"POST /events/cat HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for chunk in body.chunks(7) {
        raw.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        raw.extend_from_slice(chunk);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"0\r\n\r\n");
    let r = common::raw_request(srv.addr, &raw);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");
    assert_eq!(srv.get(&format!("/events/{id}/result")).body, body);
    // Only the two accepted events were spooled.
    assert_eq!(event_dirs(&srv).len(), 2, "{:?}", event_dirs(&srv));
}

#[test]
fn idempotency_key_returns_the_same_event_and_refuses_a_different_body() {
    let srv = common::server()
        .handler("cat", "#!/bin/sh\nexec cat\n")
        .handler("other", "#!/bin/sh\nexec cat\n")
        .start();
    let ct = ("content-type", "application/json");
    let key = ("idempotency-key", "order-4711");
    let first = post_h(&srv, "/events/cat", &[ct, key], br#"{"order": 4711}"#);
    assert_eq!(first.status, 202, "{}", first.text());
    let id = first.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");

    let again = post_h(&srv, "/events/cat", &[ct, key], br#"{"order": 4711}"#);
    assert_eq!(again.status, 200, "same key, same body: {}", again.text());
    let v = again.json();
    assert_eq!(v["id"], id);
    assert_eq!(
        v["state"], "succeeded",
        "the repeat shows the event as it is now"
    );
    assert_eq!(
        again.header("location"),
        Some(format!("/events/{id}").as_str())
    );
    assert_eq!(v["links"]["result"], format!("/events/{id}/result"));

    let other_body = post_h(&srv, "/events/cat", &[ct, key], br#"{"order": 4712}"#);
    let p = assert_problem(&other_body, 422, "idempotency-key-reused");
    assert!(p["detail"].as_str().unwrap().contains(&id), "{p}");
    let other_type = post_h(&srv, "/events/other", &[ct, key], br#"{"order": 4711}"#);
    assert_problem(&other_type, 422, "idempotency-key-reused");

    // Another key is another event.
    let fresh = post_h(
        &srv,
        "/events/cat",
        &[ct, ("idempotency-key", "order-4712")],
        br#"{"order": 4711}"#,
    );
    assert_eq!(fresh.status, 202);
    assert_ne!(fresh.json()["id"], id);
    assert_eq!(event_dirs(&srv).len(), 2, "{:?}", event_dirs(&srv));
}

#[test]
fn invalid_idempotency_keys_are_400() {
    let srv = common::server()
        .handler("cat", "#!/bin/sh\nexec cat\n")
        .start();
    let too_long = "k".repeat(256);
    // (A DEL or other control byte never reaches spoold: hyper refuses the head.)
    for bad in ["", "tab\there", too_long.as_str(), "caf\u{e9}", "  "] {
        let r = post_h(
            &srv,
            "/events/cat",
            &[
                ("content-type", "application/json"),
                ("idempotency-key", bad),
            ],
            b"{}",
        );
        assert_problem(&r, 400, "invalid-idempotency-key");
    }
    assert!(event_dirs(&srv).is_empty(), "{:?}", event_dirs(&srv));
    let max = "k".repeat(255);
    let r = post_h(
        &srv,
        "/events/cat",
        &[
            ("content-type", "application/json"),
            ("idempotency-key", &max),
        ],
        b"{}",
    );
    assert_eq!(r.status, 202, "a 255-character key is fine: {}", r.text());
}

// ---------------------------------------------------------------- status

#[test]
fn status_has_etag_from_seq_and_if_none_match_gives_304() {
    let srv = common::server().handler("job", common::BLOCKING).start();
    let id = srv.submit("job", "{}");
    let st = wait_progress(&srv, &id);
    let r = srv.get(&format!("/events/{id}"));
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    assert_eq!(r.header("retry-after"), Some("1"), "not final yet");
    let v = r.json();
    let seq = v["seq"].as_u64().unwrap();
    assert!(seq >= st["seq"].as_u64().unwrap());
    assert_eq!(r.header("etag"), Some(format!("\"{seq}\"").as_str()));
    for key in [
        "id",
        "type",
        "state",
        "seq",
        "progress",
        "message",
        "data",
        "attempt",
        "max_attempts",
        "host",
        "submitted_at",
        "started_at",
        "updated_at",
        "finished_at",
        "exit_code",
        "error",
        "result",
    ] {
        assert!(v.get(key).is_some(), "status lacks {key}: {v}");
    }
    assert_eq!(v["message"], "working on it");
    assert_eq!(v["host"], "testhost");
    assert_eq!(v["attempt"], 1);

    for inm in [
        format!("\"{seq}\""),
        format!("W/\"{seq}\""),
        format!(" \"{seq}\" "),
    ] {
        let r = get_h(&srv, &format!("/events/{id}"), &[("if-none-match", &inm)]);
        assert_eq!(r.status, 304, "If-None-Match {inm}: {}", r.text());
        assert!(r.body.is_empty(), "a 304 has no body");
        assert_eq!(r.header("etag"), Some(format!("\"{seq}\"").as_str()));
    }
    let stale = format!("\"{}\"", seq - 1);
    let r = get_h(&srv, &format!("/events/{id}"), &[("if-none-match", &stale)]);
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["seq"], seq);

    release(&srv, &id);
    let fin = srv.wait_final(&id, FINAL);
    let r = srv.get(&format!("/events/{id}"));
    assert_eq!(r.header("retry-after"), None, "final: no Retry-After");
    assert_eq!(
        r.header("etag"),
        Some(format!("\"{}\"", fin["seq"]).as_str())
    );
    assert!(fin["seq"].as_u64().unwrap() > seq);
}

#[test]
fn if_none_match_with_a_list_matches_any_of_its_tags() {
    let srv = common::server()
        .handler("hi", "#!/bin/sh\necho hi\n")
        .start();
    let id = srv.submit("hi", "{}");
    let seq = srv.wait_final(&id, FINAL)["seq"].as_u64().unwrap();
    for inm in [
        format!("\"{}\", \"{seq}\"", seq + 100),
        format!("\"{}\", W/\"{seq}\"", seq - 1),
        "*".to_owned(),
    ] {
        let r = get_h(&srv, &format!("/events/{id}"), &[("if-none-match", &inm)]);
        assert_eq!(r.status, 304, "If-None-Match {inm}: {}", r.text());
    }
    let other = format!("\"{}\", \"{}\"", seq + 100, seq + 200);
    let r = get_h(&srv, &format!("/events/{id}"), &[("if-none-match", &other)]);
    assert_eq!(r.status, 200, "If-None-Match {other}");
}

#[test]
fn long_poll_returns_as_soon_as_the_status_changes() {
    let srv = common::server().handler("job", common::BLOCKING).start();
    let id = srv.submit("job", "{}");
    let seq = wait_progress(&srv, &id)["seq"].as_u64().unwrap();
    let addr = srv.addr;
    let path = format!("/events/{id}?wait=20");
    let inm = format!("\"{seq}\"");
    let before = requests_so_far(&srv);
    let poll = std::thread::spawn(move || {
        let t = Instant::now();
        let r = request(addr, "GET", &path, &[("if-none-match", &inm)], b"");
        (r, t.elapsed())
    });
    // Give the poll a moment to park on the server, measured by its own clock:
    // the request count goes up when it arrives.
    wait_for_requests(&srv, before, 1);
    let released = Instant::now();
    release(&srv, &id);
    let (r, took) = poll.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(v["seq"].as_u64().unwrap() > seq, "{v}");
    assert_eq!(r.header("etag"), Some(format!("\"{}\"", v["seq"]).as_str()));
    assert!(
        took < Duration::from_secs(10) && released.elapsed() < Duration::from_secs(5),
        "the long-poll should return on the change, not after ?wait=20 (took {took:?})"
    );
}

#[test]
fn long_poll_without_if_none_match_waits_for_a_change_from_the_current_seq() {
    let srv = common::server().handler("job", common::BLOCKING).start();
    let id = srv.submit("job", "{}");
    let seq = wait_progress(&srv, &id)["seq"].as_u64().unwrap();
    let addr = srv.addr;
    let path = format!("/events/{id}?wait=20");
    let before = requests_so_far(&srv);
    let poll = std::thread::spawn(move || request(addr, "GET", &path, &[], b""));
    wait_for_requests(&srv, before, 1);
    release(&srv, &id);
    let r = poll.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.json()["seq"].as_u64().unwrap() > seq, "{}", r.text());
}

#[test]
fn long_poll_times_out_with_304_or_the_unchanged_status() {
    let srv = common::server().handler("job", common::BLOCKING).start();
    let id = srv.submit("job", "{}");
    let seq = wait_progress(&srv, &id)["seq"].as_u64().unwrap();

    let t = Instant::now();
    let r = get_h(
        &srv,
        &format!("/events/{id}?wait=1"),
        &[("if-none-match", &format!("\"{seq}\""))],
    );
    let took = t.elapsed();
    assert_eq!(r.status, 304, "{}", r.text());
    assert!(r.body.is_empty());
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "?wait=1 should wait about a second, took {took:?}"
    );

    let t = Instant::now();
    let r = srv.get(&format!("/events/{id}?wait=1"));
    let took = t.elapsed();
    assert_eq!(r.status, 200, "no If-None-Match: the status, {}", r.text());
    assert_eq!(r.json()["seq"], seq);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "took {took:?}"
    );

    // A fractional wait works too, and a bad one is a 400.
    let t = Instant::now();
    let r = get_h(
        &srv,
        &format!("/events/{id}?wait=0.3"),
        &[("if-none-match", &format!("\"{seq}\""))],
    );
    assert_eq!(r.status, 304);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    assert_problem(
        &srv.get(&format!("/events/{id}?wait=soon")),
        400,
        "invalid-wait",
    );
    release(&srv, &id);
}

#[test]
fn long_poll_is_capped_by_long_poll_max_and_negative_waits_do_not_wait() {
    let srv = common::server()
        .handler("job", common::BLOCKING)
        .config("long_poll_max = \"3s\"")
        .start();
    let id = srv.submit("job", "{}");
    let seq = wait_progress(&srv, &id)["seq"].as_u64().unwrap();
    let inm = format!("\"{seq}\"");
    let t = Instant::now();
    let r = get_h(
        &srv,
        &format!("/events/{id}?wait=600"),
        &[("if-none-match", &inm)],
    );
    assert_eq!(r.status, 304, "{}", r.text());
    let took = t.elapsed();
    // Capped: at least the 3 s cap, far less than the 600 s asked for.
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(60),
        "?wait=600 with long_poll_max 3s took {took:?}"
    );
    let t = Instant::now();
    let r = get_h(
        &srv,
        &format!("/events/{id}?wait=-5"),
        &[("if-none-match", &inm)],
    );
    assert_eq!(r.status, 304);
    // Not a wait up to the 3 s cap: at once.
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "{:?}",
        t.elapsed()
    );
    release(&srv, &id);
}

#[test]
fn non_finite_wait_is_a_400_problem_not_a_dropped_connection() {
    let srv = common::server().handler("job", common::BLOCKING).start();
    let id = srv.submit("job", "{}");
    for wait in ["NaN", "nan"] {
        let mut s = std::net::TcpStream::connect(srv.addr).unwrap();
        use std::io::{Read, Write};
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /events/{id}?wait={wait} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let r = common::parse_response(&out).unwrap_or_else(|| {
            panic!(
                "?wait={wait}: no HTTP response at all ({} bytes)",
                out.len()
            )
        });
        assert_problem(&r, 400, "invalid-wait");
    }
    // The server is still fine afterwards.
    assert_eq!(srv.get("/healthz").status, 200);
    release(&srv, &id);
}

#[test]
fn long_poll_on_a_final_event_returns_at_once() {
    let srv = common::server()
        .handler("hi", "#!/bin/sh\necho hi\n")
        .start();
    let id = srv.submit("hi", "{}");
    let fin = srv.wait_final(&id, FINAL);
    let seq = fin["seq"].as_u64().unwrap();
    let t = Instant::now();
    let r = srv.get(&format!("/events/{id}?wait=20"));
    assert_eq!(r.status, 200);
    assert_eq!(r.json(), fin);
    let r = get_h(
        &srv,
        &format!("/events/{id}?wait=20"),
        &[("if-none-match", &format!("\"{seq}\""))],
    );
    assert_eq!(r.status, 304);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "a final event must not be waited on: {:?}",
        t.elapsed()
    );
}

#[test]
fn malformed_ids_are_400_unknown_ids_are_404_lowercase_ids_work() {
    let srv = common::server()
        .handler("hi", "#!/bin/sh\necho hi\n")
        .start();
    let id = srv.submit("hi", "{}");
    srv.wait_final(&id, FINAL);
    let bad_ids = [
        "..%2F..%2Fetc%2Fpasswd",
        "%2E%2E",
        "..",
        "not-an-id",
        "01ARZ3NDEKTSV4RRFFQ69G5FA",   // 25 characters
        "01ARZ3NDEKTSV4RRFFQ69G5FAVX", // 27 characters
        "01ARZ3NDEKTSV4RRFFQ69G5FAU",  // U is not Crockford base-32
        "81ARZ3NDEKTSV4RRFFQ69G5FAV",  // over 128 bits
        "01ARZ3NDEKTSV4RRFFQ69G5F%00",
    ];
    for bad in bad_ids {
        for (method, path) in [
            ("GET", format!("/events/{bad}")),
            ("GET", format!("/events/{bad}/result")),
            ("GET", format!("/events/{bad}/stream")),
            ("DELETE", format!("/events/{bad}")),
        ] {
            let r = request(srv.addr, method, &path, &[], b"");
            let p = assert_problem(&r, 400, "invalid-id");
            assert!(p["detail"].as_str().unwrap().contains("ULID"), "{p}");
        }
    }
    let unknown = "01ARZ3NDEKTSV4RRFFQ69G5FAV";
    for (method, path) in [
        ("GET", format!("/events/{unknown}")),
        ("GET", format!("/events/{unknown}?wait=5")),
        ("GET", format!("/events/{unknown}/result")),
        ("GET", format!("/events/{unknown}/stream")),
        ("DELETE", format!("/events/{unknown}")),
    ] {
        let t = Instant::now();
        let r = request(srv.addr, method, &path, &[], b"");
        assert_problem(&r, 404, "not-found");
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "{path}: unknown is not pending"
        );
    }
    let r = get_h(
        &srv,
        &format!("/events/{unknown}"),
        &[("accept", "text/html")],
    );
    assert_problem(&r, 404, "not-found");

    let lower = id.to_ascii_lowercase();
    let r = srv.get(&format!("/events/{lower}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], id, "the ID is shown upper-case");
    let r = srv.get(&format!("/events/{lower}/result"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hi\n");
}

// ---------------------------------------------------------------- wait page

const HTML: (&str, &str) = (
    "accept",
    "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
);

#[test]
fn wait_page_shows_state_progress_escaped_message_and_refreshes_with_a_counter() {
    let srv = common::server()
        .handler(
            "job",
            r#"#!/bin/sh
spoold report --progress 42 --message '<b>"x" & y</b>'
while [ ! -e "$SPOOL_DIR/../go-$SPOOL_ID" ]; do sleep 0.01; done
"#,
        )
        .start();
    let id = srv.submit("job", "{}");
    wait_progress(&srv, &id);

    let r = get_h(&srv, &format!("/events/{id}"), &[HTML]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(
        r.header("refresh"),
        Some(format!("1; url=/events/{id}?check=1").as_str())
    );
    let page = r.text();
    assert!(page.contains("running"), "{page}");
    assert!(page.contains("42"), "progress: {page}");
    assert!(page.contains("<progress"), "{page}");
    assert!(
        page.contains("&lt;b&gt;&quot;x&quot; &amp; y&lt;/b&gt;"),
        "the message, escaped: {page}"
    );
    assert!(!page.contains("<b>\"x\""), "unescaped message: {page}");
    assert!(page.contains("Check 1 of 5"), "{page}");
    assert!(!page.contains("Keep waiting"), "{page}");

    // The browser follows the Refresh URL: the counter goes up.
    let r = get_h(&srv, &format!("/events/{id}?check=2"), &[HTML]);
    assert_eq!(
        r.header("refresh"),
        Some(format!("1; url=/events/{id}?check=3").as_str())
    );
    assert!(r.text().contains("Check 3 of 5"), "{}", r.text());
    let r = get_h(&srv, &format!("/events/{id}?check=4"), &[HTML]);
    assert!(
        r.header("refresh").is_some(),
        "check 5 of 5 still refreshes"
    );

    // After page_max_checks it stops refreshing and offers to keep waiting.
    for check in ["5", "6", "1000"] {
        let r = get_h(&srv, &format!("/events/{id}?check={check}"), &[HTML]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("refresh"), None, "check={check}: gives up");
        let page = r.text();
        assert!(page.contains("Keep waiting"), "{page}");
        assert!(page.contains(&format!("href=\"/events/{id}")), "{page}");
        assert!(page.contains("running"), "{page}");
    }

    // A lowercase ID in the URL still refreshes to the canonical one.
    let r = get_h(
        &srv,
        &format!("/events/{}", id.to_ascii_lowercase()),
        &[HTML],
    );
    assert_eq!(
        r.header("refresh"),
        Some(format!("1; url=/events/{id}?check=1").as_str())
    );
    // JSON first in Accept: the status JSON, not the page.
    let r = get_h(
        &srv,
        &format!("/events/{id}"),
        &[("accept", "application/json, text/html")],
    );
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["id"], id);
    release(&srv, &id);
}

#[test]
fn wait_page_of_a_succeeded_event_shows_the_result_escaped_and_links_it() {
    let srv = common::server()
        .handler("xss", "#!/bin/sh\necho '<script>alert(1)</script>'\n")
        .start();
    let id = srv.submit("xss", "{}");
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");
    for check in ["", "?check=3", "?check=99"] {
        let r = get_h(&srv, &format!("/events/{id}{check}"), &[HTML]);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
        assert_eq!(r.header("refresh"), None, "final: no more refreshing");
        let page = r.text();
        assert!(page.contains("succeeded"), "{page}");
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "the result inline, escaped: {page}"
        );
        assert!(!page.contains("<script>"), "unescaped result: {page}");
        assert!(
            page.contains(&format!("href=\"/events/{id}/result\"")),
            "links the result: {page}"
        );
        assert!(!page.contains("Keep waiting"), "{page}");
    }
    // The raw result itself is served so that it cannot run script.
    let r = srv.get(&format!("/events/{id}/result"));
    assert_eq!(r.text(), "<script>alert(1)</script>\n");
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    assert!(r
        .header("content-security-policy")
        .is_some_and(|c| c.starts_with("sandbox")));
}

#[test]
fn wait_page_of_a_failed_event_shows_the_escaped_error() {
    let srv = common::server()
        .handler(
            "bad",
            "#!/bin/sh\necho '<i>no such customer</i>' >&2\nexit 65\n",
        )
        .start();
    let id = srv.submit("bad", "{}");
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "failed");
    let r = get_h(&srv, &format!("/events/{id}"), &[HTML]);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("refresh"), None);
    let page = r.text();
    assert!(page.contains("failed"), "{page}");
    assert!(
        page.contains("&lt;i&gt;no such customer&lt;/i&gt;"),
        "{page}"
    );
    assert!(!page.contains("<i>no such"), "{page}");
}

// ---------------------------------------------------------------- result

#[track_caller]
fn assert_result(srv: &Server, id: &str, content_type: &str, body: &[u8]) {
    let r = srv.get(&format!("/events/{id}/result"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some(content_type), "{}", r.text());
    assert_eq!(r.body, body, "{}", r.text());
    assert_eq!(r.header("x-content-type-options"), Some("nosniff"));
    let csp = r.header("content-security-policy").unwrap_or("");
    assert!(csp.starts_with("sandbox"), "CSP: {csp:?}");
    let st = srv.status(id);
    assert_eq!(st["result"]["content_type"], content_type);
    assert_eq!(st["result"]["bytes"], body.len());
}

#[test]
fn result_content_type_comes_from_progress_then_toml_then_sniffing() {
    let srv = common::server()
        .handler("json", "#!/bin/sh\nprintf ' {\"a\": 1}'\n")
        .handler("xml", "#!/bin/sh\nprintf '<?xml version=\"1.0\"?><r/>'\n")
        .handler("text", "#!/bin/sh\nprintf 'plain words\\n'\n")
        .handler("csv", "#!/bin/sh\nprintf 'a,b\\n1,2\\n'\n")
        .handler_toml("csv", "content_type = \"text/csv\"\n")
        .handler(
            "svg",
            "#!/bin/sh\nspoold report --content-type image/svg+xml\nprintf '<svg/>'\n",
        )
        .handler_toml("svg", "content_type = \"text/csv\"\n")
        .handler(
            "raw",
            "#!/bin/sh\nprintf '{\"content_type\": \"application/x-ndjson\"}' > \"$SPOOL_PROGRESS.tmp\" && mv \"$SPOOL_PROGRESS.tmp\" \"$SPOOL_PROGRESS\"\nprintf '{}\\n{}\\n'\n",
        )
        .start();
    let cases: [(&str, &str, &[u8]); 6] = [
        ("json", "application/json", b" {\"a\": 1}"),
        ("xml", "application/xml", b"<?xml version=\"1.0\"?><r/>"),
        ("text", "text/plain; charset=utf-8", b"plain words\n"),
        ("csv", "text/csv", b"a,b\n1,2\n"),
        ("svg", "image/svg+xml", b"<svg/>"),
        ("raw", "application/x-ndjson", b"{}\n{}\n"),
    ];
    let ids: Vec<String> = cases.iter().map(|(k, _, _)| srv.submit(k, "{}")).collect();
    for ((kind, ct, body), id) in cases.iter().zip(&ids) {
        let st = srv.wait_final(id, FINAL);
        assert_eq!(st["state"], "succeeded", "{kind}: {st}");
        assert_result(&srv, id, ct, body);
    }
}

#[test]
fn result_file_wins_over_stdout() {
    let srv = common::server()
        .handler(
            "file",
            r#"#!/bin/sh
printf '<?xml version="1.0"?><from-file/>' > "$SPOOL_RESULT.tmp" && mv "$SPOOL_RESULT.tmp" "$SPOOL_RESULT"
echo "this is stdout"
"#,
        )
        .start();
    let id = srv.submit("file", "{}");
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "succeeded");
    assert_result(
        &srv,
        &id,
        "application/xml",
        b"<?xml version=\"1.0\"?><from-file/>",
    );
}

#[test]
fn result_is_202_with_retry_after_while_pending() {
    let srv = common::server()
        .handler("job", common::BLOCKING)
        .handler_toml("job", "concurrency = 1\n")
        .start();
    let running = srv.submit("job", "{}");
    wait_progress(&srv, &running);
    let queued = srv.submit("job", "{}");
    for (id, state) in [(&running, "running"), (&queued, "queued")] {
        let r = srv.get(&format!("/events/{id}/result"));
        assert_eq!(r.status, 202, "{state}: {}", r.text());
        assert_eq!(r.header("retry-after"), Some("1"));
        assert_eq!(r.header("content-type"), Some("application/json"));
        let v = r.json();
        assert_eq!(v["id"], id.as_str());
        assert_eq!(v["state"], state);
        assert_eq!(v["links"]["result"], format!("/events/{id}/result"));
    }
    release(&srv, &running);
    release(&srv, &queued);
    srv.wait_final(&running, FINAL);
    assert_eq!(srv.wait_final(&queued, FINAL)["state"], "succeeded");
    assert_eq!(
        srv.get(&format!("/events/{queued}/result")).text(),
        "done\n"
    );
}

#[test]
fn result_of_an_unsuccessful_event_is_409_with_its_status() {
    let srv = common::server()
        .handler(
            "bad",
            "#!/bin/sh\necho 'customer 17 unknown' >&2\nexit 65\n",
        )
        .handler("retry", "#!/bin/sh\necho 'upstream down' >&2\nexit 75\n")
        .handler_toml("retry", "max_attempts = 2\n")
        .handler("slow", "#!/bin/sh\nexec sleep 30\n")
        .handler_toml("slow", "timeout = \"300ms\"\n")
        .handler("job", common::BLOCKING)
        .start();
    let failed = srv.submit("bad", "{}");
    let dead = srv.submit("retry", "{}");
    let timed_out = srv.submit("slow", "{}");
    let cancelled = srv.submit("job", "{}");
    wait_progress(&srv, &cancelled);
    assert_eq!(srv.delete(&format!("/events/{cancelled}")).status, 200);

    for (id, state, says) in [
        (&failed, "failed", "customer 17 unknown"),
        (&dead, "failed", "upstream down"),
        (&timed_out, "timed_out", "timeout"),
        (&cancelled, "cancelled", "cancelled"),
    ] {
        let st = srv.wait_final(id, FINAL);
        assert_eq!(st["state"], state, "{st}");
        let r = srv.get(&format!("/events/{id}/result"));
        let p = assert_problem(&r, 409, "event-not-succeeded");
        assert_eq!(p["event"]["id"], id.as_str(), "{p}");
        assert_eq!(p["event"]["state"], state, "{p}");
        assert_eq!(p["event"], st, "the event member is the status");
        assert!(
            p["detail"].as_str().unwrap().contains(says),
            "the detail says why: {p}"
        );
    }
    assert_eq!(srv.status(&dead)["dead_letter"], true);
    assert_eq!(srv.status(&dead)["attempt"], 2);
}

#[test]
fn result_of_a_success_without_output_is_204() {
    let srv = common::server()
        .handler("quiet", "#!/bin/sh\nexit 0\n")
        .start();
    let id = srv.submit("quiet", "{}");
    let st = srv.wait_final(&id, FINAL);
    assert_eq!(st["state"], "succeeded");
    assert_eq!(st["result"], Value::Null);
    let r = srv.get(&format!("/events/{id}/result"));
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(r.body.is_empty());
}

// ---------------------------------------------------------------- cancel

#[test]
fn delete_cancels_a_queued_event_which_then_never_runs() {
    let srv = common::server()
        .handler(
            "job",
            r#"#!/bin/sh
touch "$SPOOL_DIR/../ran-$SPOOL_ID"
while [ ! -e "$SPOOL_DIR/../go-$SPOOL_ID" ]; do sleep 0.01; done
echo done
"#,
        )
        .handler_toml("job", "concurrency = 1\n")
        .start();
    let blocker = srv.submit("job", "{}");
    wait_state(&srv, &blocker, "running");
    let queued = srv.submit("job", "{}");
    assert_eq!(srv.status(&queued)["state"], "queued");

    let r = srv.delete(&format!("/events/{queued}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["id"], queued);
    assert_eq!(v["state"], "cancelled");
    assert_eq!(v["links"]["self"], format!("/events/{queued}"));
    assert_eq!(srv.status(&queued)["state"], "cancelled");

    // The slot frees up; the cancelled event still never runs.
    release(&srv, &blocker);
    assert_eq!(srv.wait_final(&blocker, FINAL)["state"], "succeeded");
    let after = srv.submit("job", "{}");
    wait_state(&srv, &after, "running");
    release(&srv, &after);
    assert_eq!(srv.wait_final(&after, FINAL)["state"], "succeeded");
    assert!(
        !srv.dir.path().join(format!("ran-{queued}")).exists(),
        "the cancelled event's handler ran"
    );
    assert_eq!(srv.status(&queued)["state"], "cancelled");
}

#[test]
fn delete_stops_a_running_handler_and_its_whole_process_group() {
    let srv = common::server()
        .handler(
            "job",
            r#"#!/bin/sh
echo $$ > "$SPOOL_DIR/../pid-$SPOOL_ID"
sleep 300 &
echo $! > "$SPOOL_DIR/../child-$SPOOL_ID"
spoold report --progress 42 --message 'running'
wait
"#,
        )
        .start();
    let id = srv.submit("job", "{}");
    wait_progress(&srv, &id);
    let read_pid = |name: &str| -> i32 {
        let p = srv.dir.path().join(format!("{name}-{id}"));
        fs::read_to_string(&p).unwrap().trim().parse().unwrap()
    };
    let (pid, child) = (read_pid("pid"), read_pid("child"));
    assert!(common::process_alive(pid) && common::process_alive(child));

    let r = srv.delete(&format!("/events/{id}"));
    assert!(
        r.status == 200 || r.status == 202,
        "{} {}",
        r.status,
        r.text()
    );
    if r.status == 200 {
        assert_eq!(r.json()["state"], "cancelled");
    }
    let st = srv.wait_final(&id, FINAL);
    assert_eq!(st["state"], "cancelled", "{st}");
    common::wait_until(
        Duration::from_secs(5),
        "the handler's group to be gone",
        || !common::process_alive(pid) && !common::process_alive(child),
    );
    // Cancelling again: already finished.
    let p = assert_problem(
        &srv.delete(&format!("/events/{id}")),
        409,
        "already-finished",
    );
    assert_eq!(p["event"]["state"], "cancelled");
}

#[test]
fn delete_of_a_finished_event_is_409_and_of_an_unknown_one_404() {
    let srv = common::server()
        .handler("hi", "#!/bin/sh\necho hi\n")
        .start();
    let id = srv.submit("hi", "{}");
    let fin = srv.wait_final(&id, FINAL);
    let p = assert_problem(
        &srv.delete(&format!("/events/{id}")),
        409,
        "already-finished",
    );
    assert_eq!(p["event"]["state"], "succeeded");
    assert!(p["detail"].as_str().unwrap().contains("succeeded"), "{p}");
    // Nothing changed.
    assert_eq!(srv.status(&id), fin);
    assert_eq!(srv.get(&format!("/events/{id}/result")).text(), "hi\n");
    assert_problem(
        &srv.delete("/events/01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        404,
        "not-found",
    );
}

// ---------------------------------------------------------------- the rest

#[test]
fn demo_page_health_metrics_and_handler_list() {
    let srv = common::server()
        .handler("alpha", "#!/bin/sh\necho a\n")
        .handler("beta", "#!/bin/sh\necho b\n")
        .handler_toml("beta", "timeout = \"5s\"\n")
        .handler("Upper", "#!/bin/sh\necho no\n")
        .symlink("gamma", Path::new("/bin/cat"))
        .start();
    fs::write(srv.handlers.join("notexec"), "#!/bin/sh\necho no\n").unwrap();
    fs::create_dir(srv.handlers.join("adir")).unwrap();
    fs::write(srv.handlers.join("README.md"), "docs").unwrap();

    let r = srv.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("text/html; charset=utf-8"));
    let page = r.text();
    assert!(page.contains("EventSource"), "{page}");
    assert!(page.contains("<progress"), "{page}");

    let r = srv.get("/handlers");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json(), json!(["alpha", "beta", "gamma"]));

    let r = srv.get("/healthz");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json(), json!({"status": "ok"}));
    let r = request(srv.addr, "HEAD", "/healthz", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "HEAD has no body");

    let r = srv.get("/metrics");
    assert_eq!(r.status, 200);
    assert!(r.header("content-type").unwrap().starts_with("text/plain"));
    assert!(r
        .text()
        .contains("# TYPE spoold_events_submitted_total counter"));
    assert_eq!(metric(&srv, "spoold_events_submitted_total"), 0.0);
    let a = srv.submit("alpha", "{}");
    let g = srv.submit("gamma", r#"{"via": "symlink"}"#);
    srv.wait_final(&a, FINAL);
    srv.wait_final(&g, FINAL);
    assert_eq!(
        srv.get(&format!("/events/{g}/result")).text(),
        r#"{"via": "symlink"}"#
    );
    assert_eq!(metric(&srv, "spoold_events_submitted_total"), 2.0);
    common::wait_until(FINAL, "succeeded_total to count both", || {
        metric(&srv, "spoold_events_succeeded_total") == 2.0
    });
}

#[test]
fn method_not_allowed_has_an_allow_header() {
    let srv = common::server().start();
    for (method, path, allow) in [
        ("PUT", "/events/01ARZ3NDEKTSV4RRFFQ69G5FAV", "DELETE"),
        ("POST", "/healthz", "GET"),
    ] {
        let r = request(srv.addr, method, path, &[], b"");
        assert_problem(&r, 405, "method-not-allowed");
        let header = r
            .header("allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow header"));
        assert!(
            header.contains(allow) && header.contains("GET"),
            "Allow: {header}"
        );
    }
}

#[test]
fn unknown_paths_are_404_and_wrong_methods_405_as_problems() {
    let srv = common::server()
        .handler("hi", "#!/bin/sh\necho hi\n")
        .start();
    let id = srv.submit("hi", "{}");
    srv.wait_final(&id, FINAL);
    for path in [
        "/nope",
        "/events",
        &format!("/events/{id}/nope"),
        &format!("/events/{id}/result/x"),
        "/healthz/x",
    ] {
        let r = srv.get(path);
        assert_problem(&r, 404, "not-found");
    }
    for (method, path) in [
        ("PUT", format!("/events/{id}")),
        ("PATCH", format!("/events/{id}")),
        ("PUT", "/events/X".to_owned()),
        ("POST", "/healthz".to_owned()),
        ("DELETE", "/".to_owned()),
        ("POST", format!("/events/{id}/result")),
        ("DELETE", format!("/events/{id}/stream")),
    ] {
        let r = request(srv.addr, method, &path, &[], b"");
        let p = assert_problem(&r, 405, "method-not-allowed");
        assert!(
            p["allow"].as_str().is_some_and(|a| a.contains("GET")),
            "{p}"
        );
    }
    // The event was not touched by any of that.
    assert_eq!(srv.status(&id)["state"], "succeeded");
}

/// Final statuses are kept in memory for polls (src/serve/statuses.rs), but
/// only while status.json is the file they were read from: a status
/// rewritten by hand is served as rewritten, and an event removed from the
/// spool is gone.
#[test]
fn a_final_status_changed_or_removed_on_disk_is_served_as_it_is_now() {
    let srv = common::server()
        .handler("done", "#!/bin/sh\necho done\n")
        .start();
    let id = srv.submit("done", "{}");
    let fin = srv.wait_final(&id, Duration::from_secs(10));
    assert_eq!(srv.status(&id), fin);
    assert_eq!(
        srv.status(&id),
        fin,
        "the second poll (from memory) differs"
    );
    let dir = srv.spool.join("events").join(&id);
    let mut edited = fin.clone();
    edited["message"] = json!("edited by hand");
    let staged = dir.join("status.json.tmp");
    std::fs::write(&staged, serde_json::to_vec(&edited).unwrap()).unwrap();
    std::fs::rename(&staged, dir.join("status.json")).unwrap();
    assert_eq!(srv.status(&id)["message"], "edited by hand");
    std::fs::remove_dir_all(&dir).unwrap();
    assert_problem(&srv.get(&format!("/events/{id}")), 404, "not-found");
}
