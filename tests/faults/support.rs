//! What every fault scenario shares: logged fixture handlers, a seeded RNG,
//! a scan of the spool that finds torn files, a census of processes that
//! belong to a spool, and [`audit`], which checks the invariants at the end
//! of a scenario and returns the figures.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, Server};

/// The log the fixture handlers append to, in the server's directory.
pub const RUNS: &str = "runs.log";

/// The start of a logged fixture handler: `$T` is the server's directory;
/// the handler logs `<id> <attempt> start` at once, and `finish CODE` logs
/// `<id> <attempt> end CODE` and exits with CODE. Lines are short and
/// appended with O_APPEND, so concurrent handlers never tear each other's.
pub const LOGGED: &str = r#"#!/bin/sh
T="$SPOOL_DIR/.."
echo "$SPOOL_ID $SPOOL_ATTEMPT start" >> "$T/runs.log"
finish() { echo "$SPOOL_ID $SPOOL_ATTEMPT end $1" >> "$T/runs.log"; exit "$1"; }
"#;

/// A logged fixture handler: [`LOGGED`], then `body`.
pub fn logged(body: &str) -> String {
    format!("{LOGGED}{body}\n")
}

/// What the fixture handlers logged, per event.
#[derive(Default, Debug)]
pub struct Runs {
    pub starts: BTreeMap<String, Vec<u32>>,
    pub ends: BTreeMap<String, Vec<(u32, i32)>>,
    pub lines: usize,
}

pub fn runs(srv: &Server) -> Runs {
    let mut r = Runs::default();
    for line in common::lines(srv, RUNS) {
        r.lines += 1;
        let f: Vec<&str> = line.split(' ').collect();
        let attempt = f.get(1).and_then(|a| a.parse().ok()).unwrap_or(0);
        match f.get(2).copied() {
            Some("start") => r.starts.entry(f[0].into()).or_default().push(attempt),
            Some("end") => {
                let code = f.get(3).and_then(|c| c.parse().ok()).unwrap_or(-1);
                r.ends.entry(f[0].into()).or_default().push((attempt, code));
            }
            _ => panic!("a torn line in {RUNS}: {line:?}"),
        }
    }
    r
}

/// xorshift64*: small, seeded, good enough to pick fault moments.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True `percent` times out of 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// `SPOOLD_FAULT_SEED` if set, else `default`.
pub fn fault_seed(default: u64) -> u64 {
    match std::env::var("SPOOLD_FAULT_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("SPOOLD_FAULT_SEED={s:?} is not a number")),
        Err(_) => default,
    }
}

/// Prints how to replay a seeded run when the test fails.
pub struct SeedNote(pub &'static str, pub u64);

impl Drop for SeedNote {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "{} failed with seed {}; replay it with SPOOLD_FAULT_SEED={} cargo test --test faults {} -- --nocapture",
                self.0, self.1, self.1, self.0
            );
        }
    }
}

/// Parses every file of the spool that must never be torn: `event.json`,
/// `status.json`, the result (when `json_results`, as JSON), queue entries
/// and dead letters. Returns the statuses by event ID (`None`: no status
/// written yet), or the problems found.
pub fn scan_spool(
    spool: &Path,
    json_results: bool,
) -> Result<BTreeMap<String, Option<Value>>, Vec<String>> {
    scan_spool_except(spool, json_results, &BTreeSet::new())
}

/// [`scan_spool`], but the `event.json` of the events in `damaged` (cut or
/// deleted by the test itself) is not checked.
pub fn scan_spool_except(
    spool: &Path,
    json_results: bool,
    damaged: &BTreeSet<String>,
) -> Result<BTreeMap<String, Option<Value>>, Vec<String>> {
    let mut statuses = BTreeMap::new();
    let mut bad = Vec::new();
    let parse = |path: &Path, bad: &mut Vec<String>| -> Option<Value> {
        match fs::read(path) {
            Ok(bytes) => match serde_json::from_slice::<Value>(&bytes) {
                Ok(v) => Some(v),
                Err(e) => {
                    bad.push(format!(
                        "{} does not parse ({e}): {:?}",
                        path.display(),
                        String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
                    ));
                    None
                }
            },
            Err(_) => None,
        }
    };
    for id in common::names(&spool.join("events")) {
        let dir = spool.join("events").join(&id);
        if !damaged.contains(&id)
            && parse(&dir.join("event.json"), &mut bad).is_none()
            && !dir.join("event.json").exists()
        {
            bad.push(format!("events/{id} has no event.json"));
        }
        let status = if dir.join("status.json").exists() {
            parse(&dir.join("status.json"), &mut bad)
        } else {
            None
        };
        if json_results && dir.join("result").exists() {
            parse(&dir.join("result"), &mut bad);
        }
        statuses.insert(id, status);
    }
    for sub in ["queue", "dead"] {
        for name in common::names(&spool.join(sub)) {
            parse(&spool.join(sub).join(&name), &mut bad);
        }
    }
    if bad.is_empty() {
        Ok(statuses)
    } else {
        Err(bad)
    }
}

/// Entries of `tmp/` that do not belong to the spoold with this pid.
pub fn foreign_tmp(spool: &Path, pid: u32) -> Vec<String> {
    let own = format!("testhost.{pid}.");
    common::names(&spool.join("tmp"))
        .into_iter()
        .filter(|n| !n.starts_with(&own))
        .collect()
}

pub use crate::common::spool_processes;

/// Kills what [`spool_processes`] finds (so a failed test leaves nothing).
pub struct ReapSpool(pub std::path::PathBuf);

impl Drop for ReapSpool {
    fn drop(&mut self) {
        common::reap_spool(&self.0);
    }
}

/// What [`audit`] checks besides the invariants every scenario shares.
pub struct Expect {
    /// Events that must end (they got a `202` or `200`).
    pub accepted: BTreeSet<String>,
    /// Terminal statuses seen earlier (at a kill): they must not change.
    pub terminal_seen: BTreeMap<String, Value>,
    /// Every event's handler logs to [`RUNS`].
    pub logged: bool,
    /// Results are JSON.
    pub json_results: bool,
    /// How long the spool may take to drain.
    pub drain: Duration,
    /// Events whose `event.json` the test damaged on purpose.
    pub damaged: BTreeSet<String>,
}

impl Expect {
    pub fn new(accepted: impl IntoIterator<Item = String>) -> Expect {
        Expect {
            accepted: accepted.into_iter().collect(),
            terminal_seen: BTreeMap::new(),
            logged: true,
            json_results: false,
            drain: Duration::from_secs(60),
            damaged: BTreeSet::new(),
        }
    }
}

/// The figures of an audited scenario.
#[derive(Debug, Default)]
pub struct Figures {
    pub accepted: usize,
    pub on_disk: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub by_state: BTreeMap<String, usize>,
    pub dead_letters: usize,
    pub starts: usize,
    /// Attempts counted whose handler never logged a start (the server died
    /// between counting and starting it, or it was killed at once).
    pub counted_not_started: usize,
}

/// Waits until every event on disk is final, then checks the invariants
/// over the spool and through the API, and panics with every violation.
pub fn audit(srv: &Server, expect: &Expect) -> Figures {
    let mut v: Vec<String> = Vec::new();
    let mut lost = BTreeSet::new();
    let mut duplicated = BTreeSet::new();
    // 1. Drain: every event on disk reaches a final state.
    let deadline = Instant::now() + expect.drain;
    let statuses = loop {
        let statuses = match scan_spool_except(&srv.spool, expect.json_results, &expect.damaged) {
            Ok(s) => s,
            Err(bad) => panic!("torn files in the spool:\n{}", bad.join("\n")),
        };
        let open: Vec<&String> = statuses
            .iter()
            .filter(|(_, s)| !s.as_ref().is_some_and(is_terminal))
            .map(|(id, _)| id)
            .collect();
        if open.is_empty() {
            break statuses;
        }
        if Instant::now() > deadline {
            for id in open {
                v.push(format!(
                    "{id} never ended: {:?}",
                    statuses[id].as_ref().map(|s| s.to_string())
                ));
                lost.insert(id.clone());
            }
            break statuses;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    // 2. Every accepted event is there and final; the API agrees with the disk.
    for id in &expect.accepted {
        if !statuses.contains_key(id) {
            v.push(format!("{id} was accepted but is not in events/"));
            lost.insert(id.clone());
        }
    }
    let mut f = Figures {
        accepted: expect.accepted.len(),
        on_disk: statuses.len(),
        ..Figures::default()
    };
    for (id, st) in &statuses {
        let Some(st) = st else { continue };
        *f.by_state
            .entry(st["state"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
        if st["dead_letter"] == true {
            f.dead_letters += 1;
            // The owner writes the final status first, then the dead letter.
            let dead = srv.spool.join("dead").join(id);
            if wait_for(Duration::from_secs(5), || (dead.exists(), ())).is_err() {
                v.push(format!("{id} is dead-lettered but has no dead/{id}"));
            }
        }
        let api = srv.get(&format!("/events/{id}"));
        if api.status != 200 {
            v.push(format!("GET /events/{id}: {} {}", api.status, api.text()));
        } else {
            let a = api.json();
            for k in ["state", "attempt", "seq", "finished_at"] {
                if a[k] != st[k] {
                    v.push(format!(
                        "{id}: the API says {k}={} but the disk {}",
                        a[k], st[k]
                    ));
                }
            }
        }
        if st["state"] == "succeeded" && !st["result"].is_null() {
            let path = srv.spool.join("events").join(id).join("result");
            let len = fs::metadata(&path).map(|m| m.len()).unwrap_or(u64::MAX);
            if Some(len) != st["result"]["bytes"].as_u64() {
                v.push(format!(
                    "{id}: result is {len} bytes, the status says {}",
                    st["result"]
                ));
            }
        }
        if let Some(seen) = expect.terminal_seen.get(id) {
            for k in ["state", "attempt", "seq", "finished_at", "error"] {
                if seen[k] != st[k] {
                    v.push(format!(
                        "{id}: its terminal status changed after it was written: {k} was {} and is {}",
                        seen[k], st[k]
                    ));
                    duplicated.insert(id.clone());
                }
            }
        }
    }
    // 3. Runs: no attempt number twice, none beyond the final attempt (that
    // would be a start after the terminal status), a success ended well.
    if expect.logged {
        let runs = runs(srv);
        for (id, starts) in &runs.starts {
            f.starts += starts.len();
            let Some(Some(st)) = statuses.get(id) else {
                v.push(format!("{id} ran ({starts:?}) but is not an event on disk"));
                continue;
            };
            let last = st["attempt"].as_u64().unwrap_or(0) as u32;
            let distinct: BTreeSet<&u32> = starts.iter().collect();
            if distinct.len() != starts.len() {
                v.push(format!("{id}: an attempt number started twice: {starts:?}"));
                duplicated.insert(id.clone());
            }
            if let Some(after) = starts.iter().find(|a| **a > last || **a == 0) {
                v.push(format!(
                    "{id}: attempt {after} started, but the final status says attempt {last} ({st})"
                ));
                duplicated.insert(id.clone());
            }
            f.counted_not_started += (last as usize).saturating_sub(distinct.len());
        }
        for (id, st) in statuses.iter().filter_map(|(i, s)| Some((i, s.as_ref()?))) {
            let last = st["attempt"].as_u64().unwrap_or(0) as u32;
            if st["state"] == "succeeded" {
                let ok = runs.ends.get(id).is_some_and(|e| e.contains(&(last, 0)));
                if !ok {
                    v.push(format!(
                        "{id} succeeded with attempt {last}, which never ended well: {:?}",
                        runs.ends.get(id)
                    ));
                }
            }
        }
    }
    // 4. Nothing transient is left, and no process of this spool lives on.
    let settled = wait_for(Duration::from_secs(5), || {
        let left: Vec<String> = ["tmp", "queue", "running/testhost", "hosts/testhost"]
            .iter()
            .flat_map(|d| {
                common::names(&srv.spool.join(d))
                    .into_iter()
                    .filter(|n| !n.ends_with(".spare"))
                    .map(move |n| format!("{d}/{n}"))
            })
            .collect();
        (left.is_empty(), left)
    });
    if let Err(left) = settled {
        v.push(format!("left behind in the spool: {left:?}"));
    }
    if let Err(procs) = wait_for(Duration::from_secs(5), || {
        let p = spool_processes(&srv.spool);
        (p.is_empty(), p)
    }) {
        v.push(format!("processes of this spool still run: {procs:?}"));
    }
    // 5. Quiet: nothing starts any more once everything is final.
    if expect.logged {
        let before = runs(srv).lines;
        std::thread::sleep(Duration::from_millis(600));
        let after = runs(srv);
        if after.lines != before {
            v.push(format!(
                "handlers ran after every event was final ({} more log lines)",
                after.lines - before
            ));
        }
    }
    f.lost = lost.len();
    f.duplicated = duplicated.len();
    if !v.is_empty() {
        let shown: Vec<&String> = v.iter().take(40).collect();
        panic!(
            "{} invariant violations ({f:?}):\n{}",
            v.len(),
            shown
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    f
}

pub fn is_terminal(st: &Value) -> bool {
    !matches!(
        st["state"].as_str(),
        Some("queued") | Some("running") | None
    )
}

/// Polls `probe` until it says done; `Err` with its last report after `within`.
pub fn wait_for<T>(within: Duration, mut probe: impl FnMut() -> (bool, T)) -> Result<T, T> {
    let deadline = Instant::now() + within;
    loop {
        let (done, report) = probe();
        if done {
            return Ok(report);
        }
        if Instant::now() > deadline {
            return Err(report);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts an RFC 9457 problem answer and returns its JSON.
#[track_caller]
pub fn assert_problem(r: &common::Resp, status: u16, slug: &str) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{}",
        r.text()
    );
    let p = r.json();
    assert_eq!(p["type"], format!("/problems/{slug}"), "{p}");
    assert!(
        p["detail"].as_str().is_some_and(|d| d.len() > 20),
        "the problem says what to do: {p}"
    );
    p
}

/// The error of a status, or "".
pub fn error(st: &Value) -> String {
    st["error"].as_str().unwrap_or("").to_owned()
}

/// True when this test may mount filesystems (it runs as root). Otherwise it
/// prints why it is skipped, and returns false; with `CI` set, it fails
/// instead, so that CI never skips silently.
pub fn may_mount(test: &str) -> bool {
    let why = if unsafe { libc::geteuid() } != 0 {
        "it needs root to mount a tmpfs".to_owned()
    } else {
        match probe_mount() {
            Ok(()) => return true,
            Err(e) => format!("mounting a tmpfs failed: {e}"),
        }
    };
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0") {
        panic!("{test}: {why}, and CI is set: run the fault suite as root in CI");
    }
    println!("SKIPPED {test}: {why} (CI is unset)");
    false
}

fn probe_mount() -> std::io::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut m = Mounts::default();
    m.tmpfs(dir.path(), "size=64k")?;
    m.unmount_last()
}

/// Filesystems mounted by a test, unmounted (lazily, so nothing can keep
/// them busy) in reverse order when dropped, also when the test panics.
/// Declare it after the [`Server`], so it is dropped before the server's
/// directory is removed.
#[derive(Default)]
pub struct Mounts(Vec<std::path::PathBuf>);

fn cpath(p: &Path) -> std::ffi::CString {
    std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).expect("a path without NUL")
}

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

impl Mounts {
    /// Mounts a new tmpfs at `at` with these options (e.g. `size=2m`).
    pub fn tmpfs(&mut self, at: &Path, options: &str) -> std::io::Result<()> {
        let (src, kind, opts) = (
            cpath(Path::new("tmpfs")),
            cpath(Path::new("tmpfs")),
            cpath(Path::new(options)),
        );
        check(unsafe {
            libc::mount(
                src.as_ptr(),
                cpath(at).as_ptr(),
                kind.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        })?;
        self.0.push(at.to_owned());
        Ok(())
    }

    /// Mounts a read-only view of `at` over `at` itself: from now on every
    /// path under `at` is read-only, while files already open stay as they
    /// were (a remount of the filesystem itself would fail with EBUSY while
    /// spoold holds its lock file open for writing).
    pub fn read_only_over(&mut self, at: &Path) -> std::io::Result<()> {
        let p = cpath(at);
        check(unsafe {
            libc::mount(
                p.as_ptr(),
                p.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        })?;
        self.0.push(at.to_owned());
        check(unsafe {
            libc::mount(
                std::ptr::null(),
                p.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                std::ptr::null(),
            )
        })
    }

    /// Unmounts the last mount made.
    pub fn unmount_last(&mut self) -> std::io::Result<()> {
        let Some(at) = self.0.pop() else {
            return Ok(());
        };
        check(unsafe { libc::umount2(cpath(&at).as_ptr(), libc::MNT_DETACH) })
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        while let Some(at) = self.0.pop() {
            unsafe { libc::umount2(cpath(&at).as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Puts the spool of `srv` on a fresh tmpfs (`size=…`): kills the server,
/// mounts the tmpfs over its empty spool directory, and starts it again.
pub fn spool_on_tmpfs(srv: &mut Server, options: &str) -> std::io::Result<Mounts> {
    srv.kill9();
    fs::remove_dir_all(&srv.spool)?;
    fs::create_dir_all(&srv.spool)?;
    let mut m = Mounts::default();
    let mounted = m.tmpfs(&srv.spool, options);
    restart(srv);
    mounted.map(|()| m)
}

/// Moves the server to a free port below the kernel's ephemeral range, so
/// that across many restarts on the same port no client socket (thousands of
/// them in a crash loop) can take the port while the server is down.
pub fn quiet_port(srv: &mut Server) {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = std::process::id() % 5_000;
    let port = (0..2_000)
        .map(|_| {
            let n = u32::from(NEXT.fetch_add(7, Ordering::Relaxed));
            20_000 + ((base + n) % 12_000) as u16
        })
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .expect("a free port below the ephemeral range");
    srv.kill9();
    srv.addr = format!("127.0.0.1:{port}").parse().unwrap();
    srv.restart();
}

/// Restarts the server after a kill, and says whether its port was still
/// held then. Right after a kill -9, a child that spoold was starting
/// (between fork and exec) may hold the listening socket for a few
/// milliseconds; spoold retries its bind for 2 s, so it must start anyway.
pub fn restart(srv: &mut Server) -> bool {
    srv.kill9();
    let held = std::net::TcpListener::bind(srv.addr).is_err();
    srv.restart();
    held
}
