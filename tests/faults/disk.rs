//! The spool's filesystem stops taking writes: a small tmpfs that fills up,
//! and the same spool made read-only. Submits get a problem answer (`507`
//! disk full, `503` read-only) and leave nothing behind; running events
//! cannot record their end, and are neither lost nor torn; once the
//! filesystem takes writes again, everything proceeds.
//!
//! These need root to mount. Without it they are skipped with a printed
//! reason, unless `CI` is set: then they fail, so CI never skips them.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{self, release, Server};
use crate::support::{
    assert_problem, audit, logged, may_mount, scan_spool, spool_on_tmpfs, wait_for, Expect, Mounts,
    ReapSpool,
};

/// Writes progress, then waits for `$T/go` (on the real disk, outside the
/// spool), then prints its result.
const GATED: &str = r#"printf '{"progress": 10}' > p.tmp && mv p.tmp "$SPOOL_PROGRESS"
n=0
while [ ! -e "$T/go" ] && [ "$n" -lt 3000 ]; do sleep 0.01; n=$((n+1)); done
echo "{\"attempt\": $SPOOL_ATTEMPT}"
finish 0"#;

fn server() -> Server {
    common::server()
        .handler("gated", &logged(GATED))
        // Each rerun while the disk is full counts an attempt (a documented
        // limit): a budget that lasts through the stuck window.
        .handler_toml("gated", "max_attempts = 50")
        .handler("good", &logged("cat\nfinish 0"))
        .config("concurrency = 3\nlease_ttl = \"1s\"")
        .start()
}

/// Every name in the spool's directories that a submit writes to, one level
/// into events/ (the clock file of a rescan comes and goes: left out).
fn names(spool: &Path) -> BTreeSet<String> {
    let mut all = BTreeSet::new();
    for d in ["tmp", "queue", "idem", "dead", "events"] {
        for n in common::names(&spool.join(d)) {
            if n.ends_with("clock") {
                continue;
            }
            if d == "events" {
                for f in common::names(&spool.join(d).join(&n)) {
                    all.insert(format!("events/{n}/{f}"));
                }
            }
            all.insert(format!("{d}/{n}"));
        }
    }
    all
}

/// Fills the filesystem of `path` until it refuses; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = fs::File::create(path).unwrap();
    let mut written = 0;
    for chunk in [65536, 4096, 1] {
        let buf = vec![7u8; chunk];
        while f.write_all(&buf).is_ok() {
            written += chunk as u64;
        }
    }
    written
}

fn submit_refused(srv: &Server, status: u16, slug: &str, before: &BTreeSet<String>) {
    let bodies = [
        ("/events/good", None),
        ("/events/good", Some("disk-key-1")),
        ("/events/gated", Some("disk-key-2")),
    ];
    for (path, key) in bodies {
        let mut headers = vec![("content-type", "application/json")];
        if let Some(k) = key {
            headers.push(("idempotency-key", k));
        }
        let r = common::request(srv.addr, "POST", path, &headers, br#"{"n": 1}"#);
        let p = assert_problem(&r, status, slug);
        assert!(
            p["detail"]
                .as_str()
                .unwrap()
                .contains("nothing was written"),
            "{p}"
        );
        assert_eq!(
            &names(&srv.spool),
            before,
            "a refused submit ({key:?}) left something in the spool"
        );
    }
}

/// Waits until the gated events ran once (their handlers started) and
/// spoold recorded their handlers' progress, so that the spool holds still while
/// the tests compare it before and after a refused submit.
fn wait_running(srv: &Server, ids: &[String]) {
    wait_for(Duration::from_secs(10), || {
        let runs = crate::support::runs(srv);
        let progressed = |id: &String| {
            let dir = srv.spool.join("events").join(id);
            !dir.join("p.tmp").exists() && srv.status(id)["progress"] == 10.0
        };
        (
            ids.iter()
                .all(|id| runs.starts.contains_key(id) && progressed(id)),
            (),
        )
    })
    .expect("the gated handlers to start and report progress");
}

/// While (almost) nothing can be written: the server serves, every file
/// parses, and no event has ended otherwise than well. A rerun clears the
/// files of the attempt before it, which can free just enough room to
/// record a success; a failure would be the disk's fault, never recorded.
fn holds_while_stuck(srv: &Server, ids: &[String]) {
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(srv.get("/healthz").status, 200);
    if let Err(bad) = scan_spool(&srv.spool, true) {
        panic!("torn files while the spool takes no writes: {bad:?}");
    }
    for id in ids {
        let st = srv.status(id);
        assert!(
            matches!(
                st["state"].as_str(),
                Some("queued" | "running" | "succeeded")
            ),
            "{id} ended badly while the disk was full: {st}"
        );
    }
}

/// Once writes work again: everything ends, and new submits are taken.
fn proceeds(srv: &Server, mut ids: Vec<String>) {
    for id in &ids {
        let st = srv.wait_final(id, Duration::from_secs(20));
        assert_eq!(st["state"], "succeeded", "{st}");
    }
    ids.push(srv.submit("good", r#"{"after": true}"#));
    let mut expect = Expect::new(ids);
    expect.json_results = true;
    audit(srv, &expect);
}

#[test]
fn a_full_disk_gets_507_writes_nothing_half_and_everything_proceeds_once_space_is_freed() {
    const TEST: &str = "a_full_disk_gets_507";
    if !may_mount(TEST) {
        return;
    }
    let mut srv = server();
    let _reap = ReapSpool(srv.spool.clone());
    let _mounts = spool_on_tmpfs(&mut srv, "size=4m").expect("mount a tmpfs as the spool");
    let mut ids: Vec<String> = (0..5)
        .map(|i| srv.submit("gated", &format!("{{\"i\": {i}}}")))
        .collect();
    wait_running(&srv, &ids[..3]);
    let ballast = srv.spool.join("ballast");
    assert!(fill(&ballast) > 0);

    let before = names(&srv.spool);
    submit_refused(&srv, 507, "disk-full", &before);
    // The running ones end now, and nothing can record it.
    release(&srv, "go");
    holds_while_stuck(&srv, &ids);
    assert!(
        srv.log().contains("No space left on device"),
        "the log says why"
    );

    fs::remove_file(&ballast).unwrap();
    ids.push(srv.submit("gated", r#"{"i": "after"}"#));
    proceeds(&srv, ids);
}

#[test]
fn a_read_only_spool_gets_503_writes_nothing_and_everything_proceeds_once_writable() {
    const TEST: &str = "a_read_only_spool_gets_503";
    if !may_mount(TEST) {
        return;
    }
    let mut srv = server();
    let _reap = ReapSpool(srv.spool.clone());
    let mut mounts: Mounts =
        spool_on_tmpfs(&mut srv, "size=64m").expect("mount a tmpfs as the spool");
    let ids: Vec<String> = (0..4)
        .map(|i| srv.submit("gated", &format!("{{\"i\": {i}}}")))
        .collect();
    wait_running(&srv, &ids[..3]);
    mounts
        .read_only_over(&srv.spool)
        .expect("make the spool read-only");

    let before = names(&srv.spool);
    submit_refused(&srv, 503, "spool-read-only", &before);
    release(&srv, "go");
    holds_while_stuck(&srv, &ids);
    // A spoold started on the read-only spool stops with a clear message.
    let out = Command::new(common::BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--host-id", "other"])
        .arg("--spool")
        .arg(&srv.spool)
        .arg("--handlers")
        .arg(&srv.handlers)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("Read-only file system"), "{err}");

    mounts
        .unmount_last()
        .expect("make the spool writable again");
    proceeds(&srv, ids);
}
