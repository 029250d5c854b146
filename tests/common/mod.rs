//! Shared helpers for the integration tests: start the real `spoold` binary on
//! 127.0.0.1:0 with a temporary spool and fixture handlers, talk real HTTP to
//! it over plain TCP (so framing is visible byte for byte), read real SSE, and
//! wait for conditions with deadlines instead of sleeping.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_spoold");

/// Settings that make tests fast; any of them can be overridden per test.
pub const FAST_CONFIG: &str = r#"
backoff_base = "50ms"
backoff_max = "200ms"
rescan_interval = "200ms"
progress_interval = "20ms"
kill_grace = "500ms"
lease_ttl = "3s"
sse_heartbeat = "15s"
sse_retry = "500ms"
shutdown_grace = "2s"
page_refresh = "1s"
page_max_checks = 5
"#;

pub struct Server {
    pub dir: tempfile::TempDir,
    pub spool: PathBuf,
    pub handlers: PathBuf,
    pub addr: SocketAddr,
    child: Option<Child>,
    extra_config: String,
    extra_args: Vec<String>,
    extra_env: Vec<(String, String)>,
    restarts: usize,
}

pub struct ServerBuilder {
    handlers: Vec<(String, String)>,
    tomls: Vec<(String, String)>,
    symlinks: Vec<(String, PathBuf)>,
    config: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    files: Vec<(String, String, u32)>,
    listen: SocketAddr,
}

/// The address in the "spoold listening on http://…" line a `spoold serve`
/// started with piped stdout prints once it serves; None when it has not
/// within `within`. Its stdout is read to the end on a thread of its own.
pub fn listening_addr(child: &mut Child, within: Duration) -> Option<SocketAddr> {
    let stdout = child.stdout.take().expect("spoold's stdout is piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("spoold listening on http://") {
                let _ = tx.send(addr.trim().parse().ok());
            }
        }
    });
    rx.recv_timeout(within).ok().flatten()
}

/// A new server with no handlers yet.
pub fn server() -> ServerBuilder {
    remember_panics();
    ServerBuilder {
        handlers: Vec::new(),
        tomls: Vec::new(),
        symlinks: Vec::new(),
        config: String::new(),
        args: Vec::new(),
        env: Vec::new(),
        files: Vec::new(),
        listen: "127.0.0.1:0".parse().unwrap(),
    }
}

impl ServerBuilder {
    /// Adds `handlers/<name>` with this script text (give it a #! line).
    pub fn handler(mut self, name: &str, script: &str) -> Self {
        self.handlers.push((name.into(), script.into()));
        self
    }

    /// Adds `handlers/<name>.toml`.
    pub fn handler_toml(mut self, name: &str, toml: &str) -> Self {
        self.tomls.push((name.into(), toml.into()));
        self
    }

    pub fn symlink(mut self, name: &str, target: &Path) -> Self {
        self.symlinks.push((name.into(), target.into()));
        self
    }

    /// Extra lines for the config file (override FAST_CONFIG keys freely).
    pub fn config(mut self, toml: &str) -> Self {
        self.config.push_str(toml);
        self.config.push('\n');
        self
    }

    pub fn arg(mut self, a: &str) -> Self {
        self.args.push(a.into());
        self
    }

    /// The address to listen on (default 127.0.0.1:0).
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.parse().unwrap();
        self
    }

    /// An environment variable for spoold.
    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// A file next to the config (relative names in the config resolve there).
    pub fn file(mut self, name: &str, text: &str, mode: u32) -> Self {
        self.files.push((name.into(), text.into(), mode));
        self
    }

    pub fn start(self) -> Server {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool = dir.path().join("spool");
        let handlers = dir.path().join("handlers");
        fs::create_dir_all(&handlers).unwrap();
        for (name, script) in &self.handlers {
            write_executable(&handlers.join(name), script);
        }
        for (name, toml) in &self.tomls {
            fs::write(handlers.join(format!("{name}.toml")), toml).unwrap();
        }
        for (name, target) in &self.symlinks {
            std::os::unix::fs::symlink(target, handlers.join(name)).unwrap();
        }
        for (name, text, mode) in &self.files {
            let path = dir.path().join(name);
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).unwrap();
        }
        let mut s = Server {
            dir,
            spool,
            handlers,
            addr: self.listen,
            child: None,
            extra_config: self.config,
            extra_args: self.args,
            extra_env: self.env,
            restarts: 0,
        };
        s.launch();
        s
    }
}

pub fn write_executable(path: &Path, text: &str) {
    fs::write(path, text).unwrap();
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).unwrap();
}

impl Server {
    fn launch(&mut self) {
        // Keep the same config (and port, after the first start) across restarts.
        let config = self.dir.path().join("spoold.toml");
        let mut text = String::from(FAST_CONFIG);
        // Later keys must not repeat earlier ones in TOML: drop overridden defaults.
        let overridden: Vec<&str> = self
            .extra_config
            .lines()
            .filter_map(|l| l.split('=').next())
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .collect();
        text = text
            .lines()
            .filter(|l| !overridden.contains(&l.split('=').next().unwrap_or("").trim()))
            .collect::<Vec<_>>()
            .join("\n");
        text.push('\n');
        text.push_str(&self.extra_config);
        fs::write(&config, text).unwrap();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let mut child = Command::new(BIN)
            .arg("serve")
            .arg("--spool")
            .arg(&self.spool)
            .arg("--handlers")
            .arg(&self.handlers)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--config")
            .arg(&config)
            .arg("--host-id")
            .arg("testhost")
            .args(&self.extra_args)
            .env("RUST_LOG", "spoold=debug")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start spoold");
        let Some(addr) = listening_addr(&mut child, Duration::from_secs(20)) else {
            let _ = child.kill();
            panic!("spoold did not start; its log:\n{}", self.log());
        };
        self.addr = addr;
        self.child = Some(child);
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("spoold.log")
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// kill -9, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = c.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                panic!(
                    "spoold did not stop within 20 s after SIGTERM; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts spoold again on the same spool and port.
    pub fn restart(&mut self) {
        self.kill9();
        self.restarts += 1;
        self.launch();
    }

    pub fn get(&self, path: &str) -> Resp {
        request(self.addr, "GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, body: &str) -> Resp {
        request(
            self.addr,
            "POST",
            path,
            &[("content-type", "application/json")],
            body.as_bytes(),
        )
    }

    pub fn delete(&self, path: &str) -> Resp {
        request(self.addr, "DELETE", path, &[], b"")
    }

    /// Submits and returns the new event's ID (asserting 202).
    pub fn submit(&self, kind: &str, body: &str) -> String {
        let r = self.post(&format!("/events/{kind}"), body);
        assert_eq!(r.status, 202, "submit {kind} {body}: {}", r.text());
        r.json()["id"].as_str().unwrap().to_owned()
    }

    /// The status JSON of an event (asserting 200).
    pub fn status(&self, id: &str) -> Value {
        let r = self.get(&format!("/events/{id}"));
        assert_eq!(r.status, 200, "status of {id}: {}", r.text());
        r.json()
    }

    /// Long-polls until the event is final; panics after `within`.
    pub fn wait_final(&self, id: &str, within: Duration) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let r = self.get(&format!("/events/{id}?wait=2"));
            if r.status == 200 {
                let v = r.json();
                let state = v["state"].as_str().unwrap_or("");
                if !matches!(state, "queued" | "running") {
                    return v;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "event {id} not final within {within:?}: {}\nlog:\n{}",
                    r.text(),
                    self.log()
                );
            }
        }
    }
}

std::thread_local! {
    /// What the test failed on, kept by [`remember_panics`]'s hook.
    static FAILURE: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Keeps each panic's message and place, so that [`Server`]'s drop can say it
/// again after the spoold log it prints: CI shows only the end of a failed
/// test's output, where the log would otherwise bury the reason.
pub fn remember_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            FAILURE.with(|f| *f.borrow_mut() = Some(info.to_string()));
            default(info);
        }));
    });
}

/// Repeats the failure [`remember_panics`] kept (at most 4 KB of it), after
/// logs printed on the way out of a failed test.
pub fn say_failure_again() {
    if let Some(failure) = FAILURE.with(|f| f.borrow().clone()) {
        let mut end = failure.len().min(4096);
        while !failure.is_char_boundary(end) {
            end -= 1;
        }
        eprintln!(
            "---- end of the logs; the test failed here ----\n{}",
            &failure[..end]
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- spoold log ({}) ----\n{}",
                self.log_path().display(),
                tail(&self.log(), 12_000)
            );
            say_failure_again();
        }
        self.kill9();
        reap_spool(&self.spool);
    }
}

fn tail(s: &str, n: usize) -> &str {
    let start = s.len().saturating_sub(n);
    let mut i = start;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A complete HTTP response.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// One HTTP/1.1 request on a fresh connection (Connection: close).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    try_request(addr, method, path, headers, body).unwrap_or_else(|e| panic!("{e}"))
}

/// [`request`] that reports a failed connection or an unreadable answer
/// instead of panicking, for callers that retry.
pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<Resp, String> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        raw.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        raw.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    raw.push_str("\r\n");
    let mut bytes = raw.into_bytes();
    bytes.extend_from_slice(body);
    try_raw_request(addr, &bytes)
}

/// Sends raw bytes and reads one response: by Content-Length, chunked
/// framing, or until the server closes when it sends neither.
pub fn raw_request(addr: SocketAddr, bytes: &[u8]) -> Resp {
    try_raw_request(addr, bytes).unwrap_or_else(|e| panic!("{e}"))
}

/// [`raw_request`], with what went wrong as an error instead of a panic.
pub fn try_raw_request(addr: SocketAddr, bytes: &[u8]) -> Result<Resp, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| format!("connect to {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(bytes)
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut reader = BufReader::new(s);
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut line = Vec::new();
        if reader.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
            break;
        }
        head.extend_from_slice(&line);
    }
    let mut resp = parse_head(&head).ok_or_else(|| {
        format!(
            "unparsable response head: {:?}",
            String::from_utf8_lossy(&head)
        )
    })?;
    let chunked = resp
        .header("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"));
    let length = resp
        .header("content-length")
        .and_then(|l| l.parse::<usize>().ok());
    if resp.status == 204 || resp.status == 304 || bytes.starts_with(b"HEAD ") {
        return Ok(resp);
    }
    if chunked {
        while let Some(chunk) = read_chunk(&mut reader) {
            resp.body.extend_from_slice(&chunk);
        }
    } else if let Some(n) = length {
        resp.body.resize(n, 0);
        reader
            .read_exact(&mut resp.body)
            .map_err(|e| format!("body shorter than Content-Length {n}: {e}"))?;
    } else {
        let _ = reader.read_to_end(&mut resp.body);
    }
    Ok(resp)
}

/// Reads one chunk of a chunked body; None at the last chunk or on EOF.
fn read_chunk(reader: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut size_line = String::new();
    if reader.read_line(&mut size_line).ok()? == 0 {
        return None;
    }
    let size = usize::from_str_radix(size_line.trim(), 16).ok()?;
    let mut chunk = vec![0u8; size + 2];
    if size == 0 || reader.read_exact(&mut chunk).is_err() {
        return None;
    }
    chunk.truncate(size);
    Some(chunk)
}

/// Parses a response head (status line and headers).
pub fn parse_head(raw: &[u8]) -> Option<Resp> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let mut headers = BTreeMap::new();
    for l in lines {
        let (k, v) = l.split_once(':')?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    Some(Resp {
        status,
        headers,
        body: Vec::new(),
    })
}

/// Parses a whole response read to EOF: head, then the body (de-chunked).
pub fn parse_response(raw: &[u8]) -> Option<Resp> {
    let mut resp = parse_head(raw)?;
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let rest = &raw[end..];
    if resp
        .header("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        let mut cursor = std::io::Cursor::new(rest);
        while let Some(chunk) = read_chunk(&mut cursor) {
            resp.body.extend_from_slice(&chunk);
        }
    } else {
        resp.body = rest.to_vec();
    }
    Some(resp)
}

/// One SSE event as a browser's EventSource would assemble it.
#[derive(Debug, Clone, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub id: Option<String>,
    pub data: String,
    pub retry: Option<u64>,
    pub comment: bool,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data not JSON ({e}): {}", self.data))
    }
}

/// A live SSE response, read the way EventSource does. A read that times out
/// leaves the stream open (so silence can be asserted and reading go on); the
/// stream counts as closed only when the server ends the chunked body or closes
/// the connection, and a reset connection fails the test.
pub struct Sse {
    sock: TcpStream,
    pub status: u16,
    pub headers: BTreeMap<String, String>,
    /// Bytes after the head not yet de-chunked.
    wire: Vec<u8>,
    chunked: bool,
    /// Every body byte so far, de-chunked.
    pub raw: String,
    /// De-chunked text not yet split into events.
    pending: String,
    /// The server sent the last chunk (a cleanly ended body).
    pub terminated: bool,
    /// The server closed the connection.
    eof: bool,
}

impl Sse {
    pub fn connect(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
        let sock = TcpStream::connect(addr).expect("connect");
        Sse::over(sock, path, headers)
    }

    pub fn over(mut sock: TcpStream, path: &str, headers: &[(&str, &str)]) -> Sse {
        // spoold answers only to its own names (the Host check).
        let host = sock.peer_addr().expect("connected");
        let mut req =
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n");
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        sock.write_all(req.as_bytes()).unwrap();
        let mut st = Sse {
            sock,
            status: 0,
            headers: BTreeMap::new(),
            wire: Vec::new(),
            chunked: false,
            raw: String::new(),
            pending: String::new(),
            terminated: false,
            eof: false,
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let end = loop {
            if let Some(end) = st.wire.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            assert!(
                !st.eof && Instant::now() < deadline,
                "no response head: {:?}",
                String::from_utf8_lossy(&st.wire)
            );
            st.read_some(deadline);
        };
        let head = String::from_utf8(st.wire[..end].to_vec()).expect("ASCII head");
        st.wire.drain(..end + 4);
        let mut lines = head.split("\r\n");
        st.status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        for l in lines {
            let (k, v) = l.split_once(':').expect("header line");
            st.headers
                .insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
        }
        st.chunked = st
            .header("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"));
        if st.status == 204 || st.status == 304 {
            st.terminated = true;
        }
        st.decode();
        st
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    pub fn closed(&self) -> bool {
        self.terminated || self.eof
    }

    /// One read, waiting at most until `deadline`; a timeout is not an end.
    fn read_some(&mut self, deadline: Instant) {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(left)).unwrap();
        let mut buf = [0u8; 65536];
        match self.sock.read(&mut buf) {
            Ok(0) => self.eof = true,
            Ok(n) => self.wire.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!(
                "the stream was reset instead of closed: {e}; so far: {:?}",
                self.raw
            ),
        }
    }

    /// Moves every complete chunk from `wire` to `pending`.
    fn decode(&mut self) {
        let take = |bytes: Vec<u8>, raw: &mut String, pending: &mut String| {
            let text = String::from_utf8(bytes).expect("SSE must be UTF-8");
            raw.push_str(&text);
            pending.push_str(&text);
        };
        if !self.chunked {
            let bytes = std::mem::take(&mut self.wire);
            take(bytes, &mut self.raw, &mut self.pending);
            return;
        }
        while !self.terminated {
            let Some(eol) = self.wire.windows(2).position(|w| w == b"\r\n") else {
                return;
            };
            let size_line = String::from_utf8_lossy(&self.wire[..eol]).into_owned();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap().trim(), 16)
                .unwrap_or_else(|_| panic!("bad chunk size line {size_line:?}"));
            if size == 0 {
                // The last chunk: the body ended cleanly.
                self.terminated = true;
                self.wire.drain(..eol + 2);
                return;
            }
            if self.wire.len() < eol + 2 + size + 2 {
                return;
            }
            let data = self.wire[eol + 2..eol + 2 + size].to_vec();
            assert_eq!(
                &self.wire[eol + 2 + size..eol + 4 + size],
                b"\r\n",
                "chunk framing"
            );
            self.wire.drain(..eol + 4 + size);
            take(data, &mut self.raw, &mut self.pending);
        }
    }

    /// The next event or comment block; None when `within` passed (the
    /// stream stays usable) or the stream ended.
    pub fn next(&mut self, within: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(pos) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..pos + 2).collect();
                return Some(parse_block(&block));
            }
            if self.closed() || Instant::now() >= deadline {
                return None;
            }
            self.read_some(deadline);
            self.decode();
        }
    }

    /// Reads events until one named `name`; returns all read, that one last.
    #[track_caller]
    pub fn until(&mut self, name: &str, within: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        while let Some(ev) = self.next(deadline.saturating_duration_since(Instant::now())) {
            let done = ev.event.as_deref() == Some(name);
            seen.push(ev);
            if done {
                return seen;
            }
        }
        panic!(
            "no `{name}` event within {within:?}; got {seen:?}\nraw:\n{}",
            self.raw
        );
    }

    /// True when the server ends the stream within `within` without sending
    /// anything but comments first.
    #[track_caller]
    pub fn ends_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while !self.closed() && Instant::now() < deadline {
            if let Some(ev) = self.next(deadline.saturating_duration_since(Instant::now())) {
                assert!(ev.comment, "an event after the end: {ev:?}");
            }
        }
        self.closed()
    }
}

fn parse_block(block: &str) -> SseEvent {
    let mut ev = SseEvent::default();
    let mut data = Vec::new();
    let mut comment = true;
    for line in block
        .split('\n')
        .filter(|l| !l.is_empty() && !l.starts_with(':'))
    {
        comment = false;
        let (k, v) = line.split_once(':').unwrap_or((line, ""));
        let v = v.strip_prefix(' ').unwrap_or(v);
        match k {
            "event" => ev.event = Some(v.into()),
            "id" => ev.id = Some(v.into()),
            "data" => data.push(v),
            "retry" => ev.retry = v.parse().ok(),
            _ => panic!("unexpected SSE line {line:?} in {block:?}"),
        }
    }
    ev.data = data.join("\n");
    ev.comment = comment;
    ev
}

/// Opens `GET path` with `Accept: text/event-stream` and reads the head.
pub fn sse(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Sse {
    Sse::connect(addr, path, headers)
}

/// Polls `cond` until it holds; panics with `what` after `within`.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Processes whose environment names this spool (`SPOOL_DIR`): handlers and
/// whatever they started, with their `SPOOL_ID`.
pub fn spool_processes(spool: &Path) -> Vec<(i32, String)> {
    let root = spool.canonicalize().unwrap_or_else(|_| spool.to_owned());
    let want = [format!("SPOOL_DIR={}", root.display())];
    spoold::spool::recover::processes_with_env(&want)
        .into_iter()
        .filter(|(pid, _)| process_alive(*pid))
        .map(|(pid, env)| {
            let id = env
                .split(|b| *b == 0)
                .find_map(|v| v.strip_prefix(b"SPOOL_ID="))
                .map(|v| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default();
            (pid, id)
        })
        .collect()
}

/// Kills every process [`spool_processes`] finds. A spoold killed with -9
/// leaves its handlers running; one that waits for a file the test would
/// have made loops on for good once the test's directory is gone.
pub fn reap_spool(spool: &Path) {
    for (pid, _) in spool_processes(spool) {
        // SAFETY: kill(2) of a process that carries this test's spool.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// True while a process with this pid exists (and is not a zombie).
pub fn process_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Every file name directly in `dir`.
pub fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A fresh ULID made outside spoold (time-ordered, 26 Crockford base-32
/// characters), for events written into the spool by hand.
pub fn make_ulid() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let salt = u128::from(COUNTER.fetch_add(1, Ordering::Relaxed))
        ^ (u128::from(std::process::id()) << 20)
        ^ (u128::from(now.subsec_nanos()) << 40);
    let v = (now.as_millis() << 80) | (salt & ((1u128 << 80) - 1));
    (0..26)
        .map(|i| ALPHABET[((v >> (5 * (25 - i))) & 31) as usize] as char)
        .collect()
}

/// Writes `events/<id>/event.json` (atomically) the way another program
/// dropping an event into the spool would.
pub fn write_event_by_hand(spool: &Path, id: &str, kind: &str, payload: &str) {
    let dir = spool.join("events").join(id);
    fs::create_dir_all(&dir).unwrap();
    let envelope = format!(
        r#"{{"id": "{id}", "type": "{kind}", "submitted_at": "{}", "max_attempts": 3, "timeout": 30, "payload": {payload}}}"#,
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
    let tmp = dir.join(".event.json.tmp");
    fs::write(&tmp, envelope).unwrap();
    fs::rename(&tmp, dir.join("event.json")).unwrap();
}

/// The start of a gated shell handler: `$T` is the test's directory and
/// `wait_for NAME` waits (at most 15 s) until the test creates `$T/NAME`.
pub const PRELUDE: &str = r#"#!/bin/sh
T="$SPOOL_DIR/.."
wait_for() {
  n=0
  while [ ! -e "$T/$1" ] && [ -d "$SPOOL_DIR" ] && [ "$n" -lt 1500 ]; do
    sleep 0.01
    n=$((n+1))
  done
}
"#;

/// A gated shell handler: [`PRELUDE`] then `body`.
pub fn script(body: &str) -> String {
    format!("{PRELUDE}{body}\n")
}

pub fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

/// The server's temporary directory, as handlers see it (`$SPOOL_DIR/..`).
pub fn tdir(srv: &Server) -> PathBuf {
    srv.dir.path().canonicalize().unwrap()
}

/// Creates `$T/<name>`, releasing handlers that `wait_for` it.
pub fn release(srv: &Server, name: &str) {
    fs::write(tdir(srv).join(name), b"").unwrap();
}

/// Lines of `$T/<name>` (empty when it does not exist).
pub fn lines(srv: &Server, name: &str) -> Vec<String> {
    fs::read_to_string(tdir(srv).join(name))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The `state` of a status.
pub fn state(v: &Value) -> &str {
    v["state"].as_str().unwrap_or("")
}

/// A handler that reports progress, then waits until the test creates
/// `<testdir>/go-<id>`, then prints "done".
pub const BLOCKING: &str = r#"#!/bin/sh
spoold report --progress 42 --message 'working on it'
while [ ! -e "$SPOOL_DIR/../go-$SPOOL_ID" ]; do sleep 0.01; done
echo done
"#;

/// Kills processes a test started through a handler if they outlive the test
/// (only when the server under test failed to).
pub struct Reap(pub Vec<i32>);

impl Drop for Reap {
    fn drop(&mut self) {
        for &pid in &self.0 {
            if pid > 1 && process_alive(pid) {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}
