//! Hostile HTTP: slow clients, floods of idle connections and streams, and
//! requests built to confuse a parser. Each gets a clean answer (or a clean
//! close) and never starves the polls and submits of other clients.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::FromRawFd;
use std::time::{Duration, Instant};

use common::{parse_response, raw_request, secs, Resp, Server};

/// A connection to `to` from the loopback address `from` (127.x.y.z): each
/// such address is a client of its own to spoold's per-client limit.
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let sin = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 only")
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // address structs live across the calls that read them.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let local = sin(from, 0);
        let rc = libc::bind(fd, (&local as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "bind {from}: {}", std::io::Error::last_os_error());
        let remote = sin(*to.ip(), to.port());
        let rc = libc::connect(fd, (&remote as *const libc::sockaddr_in).cast(), len);
        assert_eq!(rc, 0, "connect: {}", std::io::Error::last_os_error());
        TcpStream::from_raw_fd(fd)
    }
}

/// Lets this test process hold thousands of sockets.
fn raise_open_files() {
    // SAFETY: getrlimit/setrlimit with a struct this function owns.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

/// Sends `raw` and reads until the server closes or `within` passes.
fn exchange(addr: SocketAddr, raw: &[u8], within: Duration) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(within)).unwrap();
    s.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

/// True when the server closes `s` within `within` (EOF or reset).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
            Err(_) => return true,
        }
    }
}

fn with_echo(config: &str) -> Server {
    common::server()
        .handler("echo", "#!/bin/sh\ncat\n")
        .config(config)
        .start()
}

/// A poll and a submit from 127.0.0.1, each answered within `within`.
fn others_are_served(srv: &Server, within: Duration) {
    let started = Instant::now();
    let r = srv.get("/healthz");
    assert_eq!(r.status, 200);
    let id = srv.submit("echo", r#"{"n": 1}"#);
    let st = srv.get(&format!("/events/{id}"));
    assert_eq!(st.status, 200, "{}", st.text());
    assert!(
        started.elapsed() < within,
        "a poll and a submit took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_slowloris_head_is_cut_off_after_header_timeout() {
    let srv = with_echo("header_timeout = \"1s\"");
    let mut slow = TcpStream::connect(srv.addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        .unwrap();
    let started = Instant::now();
    // One header line every 200 ms: it never finishes its head.
    let mut cut = false;
    for i in 0..40 {
        if slow.write_all(format!("X-{i}: a\r\n").as_bytes()).is_err() {
            cut = true;
            break;
        }
        if closed_within(&mut slow, Duration::from_millis(200)) {
            cut = true;
            break;
        }
    }
    assert!(
        cut,
        "a head trickled for {:?} was never cut off (header_timeout 1 s)",
        started.elapsed()
    );
    others_are_served(&srv, secs(10));
}

#[test]
fn an_idle_keep_alive_connection_is_closed_after_header_timeout() {
    let srv = with_echo("header_timeout = \"1s\"");
    let mut s = TcpStream::connect(srv.addr).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    s.set_read_timeout(Some(secs(5))).unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).unwrap();
    assert!(parse_response(&buf[..n]).is_some_and(|r| r.status == 200));
    // Never sends a second request: closed, not kept forever.
    let started = Instant::now();
    assert!(closed_within(&mut s, secs(5)), "idle connection kept open");
    assert!(started.elapsed() >= Duration::from_millis(800));
}

#[test]
fn one_address_gets_503_past_its_share_and_others_are_served() {
    let srv = with_echo("max_connections_per_client = 20\nexempt_clients = []");
    let hog = Ipv4Addr::new(127, 0, 0, 2);
    let held: Vec<TcpStream> = (0..20).map(|_| connect_from(hog, srv.addr)).collect();
    // The server counts a connection when it accepts it: wait until the
    // 21st is refused rather than assume it has accepted all 20 already.
    let mut refused = None;
    common::wait_until(secs(10), "the 21st connection is refused", || {
        let mut extra = connect_from(hog, srv.addr);
        let _ = extra.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n");
        extra.set_read_timeout(Some(secs(2))).unwrap();
        let mut out = Vec::new();
        let _ = extra.read_to_end(&mut out);
        match parse_response(&out) {
            Some(r) if r.status == 503 => {
                refused = Some(r);
                true
            }
            _ => false,
        }
    });
    let r = refused.unwrap();
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.json()["type"], "/problems/too-many-connections");
    // Another address is a client of its own.
    others_are_served(&srv, secs(10));
    // Closing one frees a place for the hog again.
    drop(held);
    common::wait_until(secs(10), "the hog is served again", || {
        let mut s = connect_from(hog, srv.addr);
        let _ =
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
        s.set_read_timeout(Some(secs(2))).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        parse_response(&out).is_some_and(|r| r.status == 200)
    });
}

#[test]
fn thousands_of_idle_connections_and_streams_do_not_starve_polls_or_submits() {
    raise_open_files();
    let srv = common::server()
        .handler("echo", "#!/bin/sh\ncat\n")
        .handler("held", common::BLOCKING)
        .config("max_connections_per_client = 300\nexempt_clients = []\nheader_timeout = \"60s\"")
        .start();
    let held = srv.submit("held", "{}");
    let mut socks = Vec::new();
    // 1,500 idle connections from five addresses, 1,500 streams from five more.
    for a in 2..7u8 {
        for _ in 0..300 {
            socks.push(connect_from(Ipv4Addr::new(127, 0, 1, a), srv.addr));
        }
    }
    let stream_req = format!("GET /events/{held}/stream HTTP/1.1\r\nHost: localhost\r\n\r\n");
    for a in 7..12u8 {
        for _ in 0..300 {
            let mut s = connect_from(Ipv4Addr::new(127, 0, 1, a), srv.addr);
            s.write_all(stream_req.as_bytes()).unwrap();
            socks.push(s);
        }
    }
    common::wait_until(secs(30), "1,500 streams are open", || {
        let m = srv.get("/metrics").text();
        m.lines()
            .find(|l| l.starts_with("spoold_sse_streams_open "))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|n| n.parse::<f64>().ok())
            .is_some_and(|n| n >= 1500.0)
    });
    for _ in 0..5 {
        others_are_served(&srv, secs(10));
    }
    let_go(&srv, &held);
    drop(socks);
}

#[test]
fn streams_past_max_streams_get_503_and_polls_still_answer() {
    let srv = common::server()
        .handler("echo", "#!/bin/sh\ncat\n")
        .handler("held", common::BLOCKING)
        .config("max_streams = 5\nsse_heartbeat = \"200ms\"")
        .start();
    let id = srv.submit("held", "{}");
    let streams: Vec<_> = (0..5)
        .map(|_| common::sse(srv.addr, &format!("/events/{id}/stream"), &[]))
        .collect();
    assert!(streams.iter().all(|s| s.status == 200));
    let r = srv.get(&format!("/events/{id}/stream"));
    assert_eq!(r.status, 503);
    assert_eq!(r.header("retry-after"), Some("5"));
    assert!(r.json()["detail"].as_str().unwrap().contains("max_streams"));
    assert_eq!(srv.get(&format!("/events/{id}")).status, 200);
    drop(streams);
    // A closed stream is noticed at its next heartbeat.
    let mut again = None;
    common::wait_until(secs(10), "a stream is allowed again", || {
        let s = common::sse(srv.addr, &format!("/events/{id}/stream"), &[]);
        let ok = s.status == 200;
        again = Some(s);
        ok
    });
    let_go(&srv, &id);
}

/// Lets a `common::BLOCKING` handler finish.
fn let_go(srv: &Server, id: &str) {
    std::fs::write(srv.dir.path().join(format!("go-{id}")), b"").unwrap();
}

fn status_of(raw: &[u8]) -> u16 {
    parse_response(raw)
        .or_else(|| common::parse_head(raw))
        .map_or(0, |r: Resp| r.status)
}

#[test]
fn malformed_and_oversized_requests_get_clean_answers() {
    let srv = with_echo("");
    let big = format!(
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: {}\r\n\r\n",
        "a".repeat(500_000)
    );
    let many: String = (0..200).map(|i| format!("X-{i}: a\r\n")).collect();
    let many = format!("GET /healthz HTTP/1.1\r\nHost: localhost\r\n{many}\r\n");
    for (what, raw, want) in [
        ("a 500 KB header", big.into_bytes(), 431),
        ("200 headers", many.into_bytes(), 431),
        (
            "a path that is not UTF-8",
            b"GET /events/\xff\xfe HTTP/1.1\r\nHost: localhost\r\n\r\n".to_vec(),
            400,
        ),
        (
            "an Idempotency-Key that is not UTF-8",
            b"POST /events/echo HTTP/1.1\r\nHost: localhost\r\nIdempotency-Key: \xff\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}".to_vec(),
            400,
        ),
        (
            "two Content-Lengths",
            b"POST /events/echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{} ".to_vec(),
            400,
        ),
        (
            "an unknown Transfer-Encoding",
            b"POST /events/echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: xchunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a space before the colon",
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length : 5\r\n\r\n".to_vec(),
            400,
        ),
        (
            "a folded header line",
            b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n b\r\n\r\n".to_vec(),
            400,
        ),
        ("binary garbage", b"\x00\x01\x02 garbage\r\n\r\n".to_vec(), 400),
    ] {
        let out = exchange(srv.addr, &raw, secs(5));
        assert_eq!(status_of(&out), want, "{what}: {}", String::from_utf8_lossy(&out[..out.len().min(300)]));
    }
    // Framed two ways (a smuggling attempt through a proxy that goes by
    // Content-Length): hyper goes by Transfer-Encoding, as RFC 9112 §6.3 says,
    // answers once and closes, so what follows is never read as a request.
    let out = exchange(
        srv.addr,
        b"POST /events/nope HTTP/1.1\r\nHost: localhost\r\nContent-Length: 50\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\nGET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
        secs(5),
    );
    let text = String::from_utf8_lossy(&out);
    assert_eq!(text.matches("HTTP/1.1 ").count(), 1, "{text}");
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(!text.contains("spoold_"), "{text}");
    // None of them made an event.
    assert!(common::names(&srv.spool.join("queue")).is_empty());
    assert!(common::names(&srv.spool.join("events")).is_empty());
    others_are_served(&srv, secs(10));
}

#[test]
fn chunked_bodies_http_1_0_and_pipelining_work() {
    let srv = with_echo("");
    let r = raw_request(
        srv.addr,
        b"POST /events/echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\nContent-Type: application/json\r\n\r\n5\r\n{\"a\":\r\n2\r\n1}\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let done = srv.wait_final(&id, secs(10));
    assert_eq!(done["state"], "succeeded");
    assert_eq!(
        srv.get(&format!("/events/{id}/result")).text(),
        r#"{"a":1}"#
    );

    // HTTP/1.0 without Host: answered in HTTP/1.0, then closed.
    let out = exchange(srv.addr, b"GET /healthz HTTP/1.0\r\n\r\n", secs(5));
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.0 200"), "{text}");
    assert!(text.ends_with(r#"{"status":"ok"}"#), "{text}");

    // Two requests in one write: two answers, in order.
    let out = exchange(
        srv.addr,
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\nGET /handlers HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        secs(5),
    );
    let text = String::from_utf8_lossy(&out);
    let first = text.find(r#"{"status":"ok"}"#).expect("first answer");
    let second = text.find(r#"["echo"]"#).expect("second answer");
    assert!(first < second, "{text}");
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
}
