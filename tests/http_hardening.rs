//! Regression tests for the HTTP hardening: the Host check (DNS rebinding),
//! the Origin check (CSRF), pages that refuse to be framed, `body_timeout`
//! for bodies that stall, waits that end at shutdown, and error answers that
//! do not leak the server's paths. Every test runs the real binary and talks
//! raw HTTP to it, so the headers sent are exactly the ones written here.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{Resp, Server};
use serde_json::Value;

const FINAL: Duration = Duration::from_secs(10);

/// Like common::BLOCKING, but ignores SIGTERM, so a cancel waits for kill_grace.
/// It gives up by itself after 30 s, so it never outlives a failed test long.
const STUBBORN: &str = r#"#!/bin/sh
trap '' TERM
spoold report --progress 42 --message 'working on it'
i=0
while [ $i -lt 3000 ] && [ ! -e "$SPOOL_DIR/../go-$SPOOL_ID" ]; do sleep 0.01; i=$((i+1)); done
echo done
"#;

/// One request on a fresh connection with exactly these headers: `host`
/// None sends no Host header at all (and HTTP/1.0, where that is legal).
fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    common::raw_request(addr, &raw(method, path, host, headers, body))
}

fn raw(
    method: &str,
    path: &str,
    host: Option<&str>,
    headers: &[(&str, &str)],
    body: &str,
) -> Vec<u8> {
    let version = if host.is_some() { "1.1" } else { "1.0" };
    let mut out = format!("{method} {path} HTTP/{version}\r\nConnection: close\r\n");
    if let Some(h) = host {
        out.push_str(&format!("Host: {h}\r\n"));
    }
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if method == "POST" {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

#[track_caller]
fn assert_problem(r: &Resp, status: u16, slug: &str) -> Value {
    assert_eq!(r.status, status, "{:?}: {}", r.headers, r.text());
    assert_eq!(r.header("content-type"), Some("application/problem+json"));
    let p = r.json();
    assert_eq!(p["type"], format!("/problems/{slug}"), "{p}");
    assert_eq!(p["status"], status, "{p}");
    p
}

fn release(srv: &Server, id: &str) {
    fs::write(srv.dir.path().join(format!("go-{id}")), b"").unwrap();
}

fn wait_progress(srv: &Server, id: &str) {
    common::wait_until(FINAL, &format!("event {id} to report progress"), || {
        let v = srv.status(id);
        v["state"] == "running" && v["progress"] == 42.0
    });
}

fn event_count(srv: &Server) -> usize {
    common::names(&srv.spool.join("events")).len()
}

fn requests_total(srv: &Server) -> f64 {
    let r = srv.get("/metrics");
    r.text()
        .lines()
        .find_map(|l| {
            l.strip_prefix("spoold_http_requests_total ")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no request counter in:\n{}", r.text()))
}

/// Waits until the server has routed `n` requests more than `before`,
/// not counting the /metrics requests made here to find out.
fn wait_for_requests(srv: &Server, before: f64, n: u32) {
    let mut asked = 0.0;
    common::wait_until(FINAL, "requests to reach the server", || {
        asked += 1.0;
        requests_total(srv) >= before + asked + f64::from(n)
    });
}

/// Reads one whole response (the request said Connection: close).
fn read_response(mut s: TcpStream, within: Duration) -> Option<Resp> {
    s.set_read_timeout(Some(within)).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    common::parse_response(&out)
}

// ------------------------------------------------------------------- Host

#[test]
fn foreign_host_names_get_421_and_loopback_names_are_answered() {
    let srv = common::server().handler("job", common::BLOCKING).start();
    let id = srv.submit("job", "{}");
    let port = srv.addr.port();
    let path = format!("/events/{id}");
    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        "LocalHost".to_owned(),
        format!("127.8.9.10:{port}"),
        format!("[::1]:{port}"),
    ] {
        let r = send(srv.addr, "GET", &path, Some(&host), &[], "");
        assert_eq!(r.status, 200, "Host: {host}: {}", r.text());
    }
    // HTTP/1.0 without Host: nothing to check.
    let r = send(srv.addr, "GET", &path, None, &[], "");
    assert_eq!(r.status, 200, "no Host: {}", r.text());

    for host in [
        "evil.example".to_owned(),
        format!("evil.example:{port}"),
        format!("127.0.0.1.evil.example:{port}"),
        format!("10.1.2.3:{port}"),
    ] {
        for (method, path) in [
            ("GET", path.as_str()),
            ("GET", "/"),
            ("POST", "/events/job"),
        ] {
            let r = send(srv.addr, method, path, Some(&host), &[], "{}");
            let p = assert_problem(&r, 421, "host-not-allowed");
            assert!(
                p["detail"].as_str().unwrap().contains("allowed_hosts"),
                "the detail should say how to allow the name: {p}"
            );
        }
    }
    // An absolute-form request line names a host too.
    let r = common::raw_request(
        srv.addr,
        format!("GET http://evil.example{path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert_problem(&r, 421, "host-not-allowed");
    // Liveness probes may use any name; the answer is a constant.
    let r = send(srv.addr, "GET", "/healthz", Some("10.1.2.3"), &[], "");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(event_count(&srv), 1, "a refused POST spooled an event");
    release(&srv, &id);
}

#[test]
fn allowed_hosts_adds_names_besides_the_loopback_ones() {
    let srv = common::server()
        .handler("hi", "#!/bin/sh\necho hi\n")
        .config(r#"allowed_hosts = ["jobs.example.com", "10.1.2.3"]"#)
        .start();
    for host in [
        "jobs.example.com",
        "JOBS.Example.com:443",
        "10.1.2.3:8080",
        "localhost",
    ] {
        let r = send(srv.addr, "POST", "/events/hi", Some(host), &[], "{}");
        assert_eq!(r.status, 202, "Host: {host}: {}", r.text());
    }
    for host in ["other.example.com", "example.com", "sub.jobs.example.com"] {
        let r = send(srv.addr, "GET", "/handlers", Some(host), &[], "");
        assert_problem(&r, 421, "host-not-allowed");
    }
}

#[test]
fn a_bad_allowed_hosts_entry_stops_spoold_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("c.toml");
    fs::write(&conf, "allowed_hosts = [\"jobs.example.com:8080\"]\n").unwrap();
    let out = std::process::Command::new(common::BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--host-id",
            "t",
            "--config",
        ])
        .arg(&conf)
        .arg("--spool")
        .arg(dir.path().join("spool"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("allowed_hosts") && err.contains("without port"),
        "{err}"
    );
}

// ----------------------------------------------------------------- Origin

#[test]
fn cross_site_posts_and_deletes_are_403_and_change_nothing() {
    let srv = common::server().handler("job", common::BLOCKING).start();
    let host = srv.addr.to_string();
    let form = ("Content-Type", "text/plain");
    for headers in [
        vec![form, ("Origin", "http://evil.example")],
        vec![form, ("Origin", "null")],
        vec![form, ("Origin", "http://localhost:1")],
        // Same host name, another port: another origin.
        vec![(
            "Origin",
            &*format!("http://127.0.0.1:{}", srv.addr.port() + 1),
        )],
        vec![form, ("Sec-Fetch-Site", "cross-site")],
        vec![form, ("Sec-Fetch-Site", "same-site")],
    ] {
        let r = send(
            srv.addr,
            "POST",
            "/events/job",
            Some(&host),
            &headers,
            r#"{"a":1}"#,
        );
        let p = assert_problem(&r, 403, "cross-origin");
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("cross-site requests are refused"),
            "{p}"
        );
    }
    assert_eq!(event_count(&srv), 0, "a refused POST spooled an event");

    // Same origin (the demo page), and curl (no Origin), may submit.
    let own = format!("http://{host}");
    let r = send(
        srv.addr,
        "POST",
        "/events/job",
        Some(&host),
        &[("Origin", &own), ("Sec-Fetch-Site", "same-origin")],
        "{}",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let curl = [("Content-Type", "application/x-www-form-urlencoded")];
    let r = send(srv.addr, "POST", "/events/job", Some(&host), &curl, "{}");
    assert_eq!(r.status, 202, "{}", r.text());
    let other = r.json()["id"].as_str().unwrap().to_owned();

    // A cross-site DELETE does not cancel.
    wait_progress(&srv, &id);
    let path = format!("/events/{id}");
    let r = send(
        srv.addr,
        "DELETE",
        &path,
        Some(&host),
        &[("Origin", "http://evil.example")],
        "",
    );
    assert_problem(&r, 403, "cross-origin");
    assert_eq!(srv.status(&id)["state"], "running");
    assert!(!srv.spool.join("events").join(&id).join("cancel").exists());
    // Reading cross-site is not refused (the browser keeps the answer from the page).
    let r = send(
        srv.addr,
        "GET",
        &path,
        Some(&host),
        &[("Origin", "http://evil.example")],
        "",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    // The same DELETE from the same origin cancels.
    let r = send(
        srv.addr,
        "DELETE",
        &path,
        Some(&host),
        &[("Origin", &own)],
        "",
    );
    assert!(r.status == 200 || r.status == 202, "{}", r.text());
    assert_eq!(srv.wait_final(&id, FINAL)["state"], "cancelled");
    release(&srv, &other);
}

// ------------------------------------------------------------------ pages

#[test]
fn pages_refuse_to_be_framed() {
    let srv = common::server().handler("job", common::BLOCKING).start();
    let id = srv.submit("job", "{}");
    let demo = srv.get("/");
    let wait = common::request(
        srv.addr,
        "GET",
        &format!("/events/{id}"),
        &[("Accept", "text/html")],
        b"",
    );
    for (name, r) in [("demo", &demo), ("wait", &wait)] {
        assert_eq!(r.status, 200, "{name}: {}", r.text());
        assert_eq!(
            r.header("content-type"),
            Some("text/html; charset=utf-8"),
            "{name}"
        );
        assert_eq!(r.header("x-frame-options"), Some("DENY"), "{name}");
        let csp = r.header("content-security-policy").unwrap_or_default();
        assert!(csp.contains("frame-ancestors 'none'"), "{name}: {csp}");
        assert!(csp.contains("default-src 'none'"), "{name}: {csp}");
    }
    let csp = demo.header("content-security-policy").unwrap();
    for part in [
        "script-src 'unsafe-inline'",
        "style-src 'unsafe-inline'",
        "connect-src 'self'",
    ] {
        assert!(csp.contains(part), "the demo page needs {part}: {csp}");
    }
    assert!(
        demo.text().contains("<script>"),
        "the demo page's script is inline"
    );
    let csp = wait.header("content-security-policy").unwrap();
    assert!(
        !csp.contains("script-src"),
        "the wait page runs no script: {csp}"
    );
    release(&srv, &id);
}

// ------------------------------------------------------------ body timeout

#[test]
fn a_body_that_stalls_is_408_after_body_timeout() {
    let srv = common::server()
        .handler("cat", "#!/bin/sh\nexec cat\n")
        .config(r#"body_timeout = "500ms""#)
        .start();
    let full = r#"{"half": "of this body never comes"}"#;
    let chunked = b"POST /events/cat HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":".to_vec();
    let mut by_length = raw("POST", "/events/cat", Some("localhost"), &[], full);
    by_length.truncate(by_length.len() - full.len() / 2);
    for (name, bytes) in [("Content-Length", by_length), ("chunked", chunked)] {
        let mut s = TcpStream::connect(srv.addr).unwrap();
        let t = Instant::now();
        s.write_all(&bytes).unwrap();
        let r = read_response(s, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{name}: no answer to a stalled body within 10 s"));
        let took = t.elapsed();
        let p = assert_problem(&r, 408, "body-timeout");
        assert!(
            p["detail"].as_str().unwrap().contains("body_timeout"),
            "{p}"
        );
        assert_eq!(r.header("connection"), Some("close"), "{name}");
        assert!(
            took >= Duration::from_millis(450),
            "{name}: answered before body_timeout: {took:?}"
        );
        assert!(took < Duration::from_secs(5), "{name}: took {took:?}");
    }
    assert_eq!(event_count(&srv), 0);
    // A body that arrives in time, in pieces, is fine.
    let mut s = TcpStream::connect(srv.addr).unwrap();
    let whole = raw("POST", "/events/cat", Some("localhost"), &[], full);
    let (a, b) = whole.split_at(whole.len() - 5);
    s.write_all(a).unwrap();
    s.flush().unwrap();
    s.write_all(b).unwrap();
    let r = read_response(s, FINAL).expect("an answer");
    assert_eq!(r.status, 202, "{}", r.text());
}

// --------------------------------------------------------------- shutdown

#[test]
fn long_polls_and_cancel_waits_answer_at_once_when_spoold_shuts_down() {
    let mut srv = common::server()
        .handler("job", common::BLOCKING)
        .handler("stubborn", STUBBORN)
        .config("shutdown_grace = \"30s\"\nkill_grace = \"20s\"")
        .start();
    let polled = srv.submit("job", "{}");
    let stuck = srv.submit("stubborn", "{}");
    wait_progress(&srv, &polled);
    wait_progress(&srv, &stuck);

    let before = requests_total(&srv);
    let mut poll = TcpStream::connect(srv.addr).unwrap();
    poll.write_all(&raw(
        "GET",
        &format!("/events/{polled}?wait=60"),
        Some("localhost"),
        &[],
        "",
    ))
    .unwrap();
    let mut cancel = TcpStream::connect(srv.addr).unwrap();
    cancel
        .write_all(&raw(
            "DELETE",
            &format!("/events/{stuck}"),
            Some("localhost"),
            &[],
            "",
        ))
        .unwrap();
    wait_for_requests(&srv, before, 2);
    let marker = srv.spool.join("events").join(&stuck).join("cancel");
    common::wait_until(FINAL, "the cancel marker", || marker.exists());

    let t = Instant::now();
    unsafe { libc::kill(srv.pid() as i32, libc::SIGTERM) };
    let r = read_response(poll, Duration::from_secs(10)).expect("the long poll got no answer");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["id"], polled.as_str());
    assert_eq!(r.json()["state"], "running");
    let r = read_response(cancel, Duration::from_secs(10)).expect("the DELETE got no answer");
    assert_eq!(r.status, 202, "still running, so 202: {}", r.text());
    assert_eq!(r.json()["id"], stuck.as_str());
    assert_eq!(r.json()["state"], "running");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answers took {:?}",
        t.elapsed()
    );

    // Once the handlers are done, spoold finishes its shutdown by itself.
    release(&srv, &polled);
    release(&srv, &stuck);
    let pid = srv.pid() as i32;
    common::wait_until(Duration::from_secs(20), "spoold to exit", || {
        !common::process_alive(pid)
    });
    assert_eq!(srv.stop(), Some(0), "reaps the exited process");
}

// ------------------------------------------------------------ no paths

#[test]
fn errors_tell_clients_what_is_wrong_without_the_servers_paths() {
    let srv = common::server()
        .handler("broken", "#!/bin/sh\necho never\n")
        .handler_toml("broken", "colour = \"red\"\n")
        .handler("hi", "#!/bin/sh\necho hi\n")
        .start();
    let secret = srv.dir.path().to_str().unwrap().to_owned();
    fs::write(srv.handlers.join("plain"), "#!/bin/sh\necho hi\n").unwrap();

    let r = srv.post("/events/broken", "{}");
    let p = assert_problem(&r, 500, "handler-misconfigured");
    let detail = p["detail"].as_str().unwrap();
    assert!(
        detail.contains("handler broken is misconfigured"),
        "{detail}"
    );
    assert!(detail.contains("handlers/broken.toml"), "{detail}");
    assert!(
        detail.contains("unknown field `colour`"),
        "the TOML error: {detail}"
    );
    assert!(!r.text().contains(&secret), "a path leaked: {}", r.text());
    let log = srv.log();
    assert!(
        log.contains(&srv.handlers.join("broken.toml").display().to_string()),
        "the operator's log should name the file:\n{log}"
    );

    for (kind, words) in [("nosuch", "nosuch"), ("plain", "chmod +x")] {
        let r = srv.post(&format!("/events/{kind}"), "{}");
        let p = assert_problem(&r, 404, "unknown-type");
        assert!(p["detail"].as_str().unwrap().contains(words), "{p}");
        assert!(!r.text().contains(&secret), "a path leaked: {}", r.text());
    }

    // A damaged status file: 500, without its path.
    let id = srv.submit("hi", "{}");
    srv.wait_final(&id, FINAL);
    let status = srv.spool.join("events").join(&id).join("status.json");
    fs::write(&status, "{not json").unwrap();
    let r = srv.get(&format!("/events/{id}"));
    let p = assert_problem(&r, 500, "internal");
    assert!(p["detail"].as_str().unwrap().contains("damaged"), "{p}");
    assert!(!r.text().contains(&secret), "a path leaked: {}", r.text());
    common::wait_until(FINAL, "the log to name the damaged file", || {
        srv.log().contains(&status.display().to_string())
    });
}
