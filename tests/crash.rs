//! Crash recovery and damaged spools, against the real binary: kill -9 while
//! handlers run, restart on the same spool, and check that every accepted
//! event ends exactly once, that orphaned handlers are killed, and that
//! nothing is left behind. Also leftovers of a crash in the middle of a
//! submit, stray files, queue entries without an event, and graceful stops.
//!
//! Handlers that must wait for the test block on a file the test creates in
//! the server's temporary directory (`$SPOOL_DIR/..`); their wait loops are
//! bounded and end when that directory disappears.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    lines, names, process_alive, release, script, secs, state, tdir, wait_until, Reap, Server,
};
use serde_json::Value;

fn read_pid(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The status as it is on disk (for when the server is not running).
fn disk_status(srv: &Server, id: &str) -> Value {
    let path = srv.spool.join("events").join(id).join("status.json");
    serde_json::from_slice(&fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .unwrap()
}

/// Waits until nothing of the spool's transient state is left: no staging
/// files (but the spare files a running spoold keeps in `tmp/` to write
/// again), no claims, no queue entries.
fn assert_spool_settles(srv: &Server) {
    let dirs = [
        srv.spool.join("tmp"),
        srv.spool.join("running").join("testhost"),
        srv.spool.join("queue"),
    ];
    let deadline = Instant::now() + secs(3);
    let left = loop {
        let left: Vec<PathBuf> = dirs
            .iter()
            .flat_map(|d| names(d).into_iter().map(move |n| d.join(n)))
            .filter(|p| p.extension().is_none_or(|e| e != "spare"))
            .collect();
        if left.is_empty() || Instant::now() > deadline {
            break left;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(left.is_empty(), "left behind in the spool: {left:?}");
}

// ---------------------------------------------------------------------------
// kill -9 while handlers run
// ---------------------------------------------------------------------------

#[test]
fn kill9_while_handlers_run_reruns_each_event_once_after_killing_the_orphans() {
    let handler = script(
        r#"old=$(cat "$T/pid.$SPOOL_ID" 2>/dev/null)
if [ -n "$old" ] && [ -r "/proc/$old/stat" ] && ! grep -q ') Z ' "/proc/$old/stat"; then
  echo "alive $SPOOL_ID $SPOOL_ATTEMPT $old" >> "$T/log"
fi
sleep 1000 &
echo $! > "$T/child.$SPOOL_ID.$SPOOL_ATTEMPT"
echo $$ > "$T/pid.$SPOOL_ID"
echo "start $SPOOL_ID $SPOOL_ATTEMPT" >> "$T/log"
wait_for "go.$SPOOL_ATTEMPT"
echo "end $SPOOL_ID $SPOOL_ATTEMPT" >> "$T/log"
echo "done $SPOOL_ATTEMPT""#,
    );
    let mut srv = common::server()
        .handler("job", &handler)
        .handler_toml("job", "concurrency = 3\n")
        .config("concurrency = 8")
        .start();
    let ids: Vec<String> = (0..4)
        .map(|i| srv.submit("job", &format!("{{\"n\": {i}}}")))
        .collect();
    let (running, queued) = ids.split_at(3);
    let t = tdir(&srv);
    wait_until(secs(10), "3 handlers running", || {
        running
            .iter()
            .all(|id| t.join(format!("pid.{id}")).exists())
            && lines(&srv, "log").len() == 3
    });
    assert_eq!(state(&srv.status(&queued[0])), "queued");
    // Each handler's process group: the handler and its background child.
    let old: Vec<i32> = running
        .iter()
        .flat_map(|id| [format!("pid.{id}"), format!("child.{id}.1")])
        .map(|f| read_pid(&t.join(&f)).unwrap_or_else(|| panic!("no pid in {f}")))
        .collect();
    let _reap = Reap(old.clone());

    srv.kill9();
    // The handlers outlive spoold (they lead their own groups)...
    for &pid in &old {
        assert!(process_alive(pid), "handler process {pid} died with spoold");
    }
    srv.restart();
    // ...until the new spoold kills them.
    wait_until(secs(5), "orphaned handler groups to be killed", || {
        old.iter().all(|&p| !process_alive(p))
    });
    wait_until(secs(10), "the re-runs (attempt 2) to start", || {
        let log = lines(&srv, "log");
        running
            .iter()
            .all(|id| log.contains(&format!("start {id} 2")))
    });
    release(&srv, "go.2");
    release(&srv, "go.1");
    let mut finals = BTreeMap::new();
    for id in &ids {
        let st = srv.wait_final(id, secs(10));
        assert_eq!(state(&st), "succeeded", "{st}");
        finals.insert(id.clone(), st);
    }
    for id in running {
        assert_eq!(finals[id]["attempt"], 2, "{}", finals[id]);
        assert_eq!(srv.get(&format!("/events/{id}/result")).text(), "done 2\n");
    }
    assert_eq!(finals[&queued[0]]["attempt"], 1, "{}", finals[&queued[0]]);

    let log = lines(&srv, "log");
    let alive: Vec<&String> = log.iter().filter(|l| l.starts_with("alive")).collect();
    assert!(
        alive.is_empty(),
        "a re-run started while the old handler still ran: {alive:?}"
    );
    for id in &ids {
        let starts: Vec<&String> = log
            .iter()
            .filter(|l| l.starts_with(&format!("start {id} ")))
            .collect();
        let ends: Vec<&String> = log
            .iter()
            .filter(|l| l.starts_with(&format!("end {id} ")))
            .collect();
        let last = finals[id]["attempt"].as_u64().unwrap();
        assert_eq!(starts.len() as u64, last, "{id}: {log:?}");
        assert_eq!(
            ends,
            [&format!("end {id} {last}")],
            "{id} must complete exactly once: {log:?}"
        );
    }
    assert_spool_settles(&srv);
}

#[test]
fn kill9_during_a_retry_backoff_keeps_the_retry() {
    let mut srv = common::server()
        .handler(
            "again",
            "#!/bin/sh\necho \"$SPOOL_ATTEMPT\" >> \"$SPOOL_DIR/../attempts\"\n[ \"$SPOOL_ATTEMPT\" -ge 2 ] || exit 75\necho fine\n",
        )
        .config("backoff_base = \"2s\"\nbackoff_max = \"2s\"")
        .start();
    let id = srv.submit("again", "{}");
    wait_until(secs(10), "waiting for its retry", || {
        let st = srv.status(&id);
        state(&st) == "queued" && st["attempt"] == 1
    });
    srv.kill9();
    srv.restart();
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(st["attempt"], 2, "{st}");
    assert_eq!(lines(&srv, "attempts"), ["1", "2"]);
    assert_spool_settles(&srv);
}

/// One POST that may fail because the server is being killed: None then.
fn try_post(addr: SocketAddr, path: &str, key: &str, body: &str) -> Option<common::Resp> {
    let mut s = TcpStream::connect_timeout(&addr, secs(1)).ok()?;
    s.set_read_timeout(Some(secs(10))).ok()?;
    let raw = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(raw.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    common::parse_response(&out)
}

#[test]
fn repeated_kill9_during_a_burst_of_submits_loses_no_accepted_event() {
    let mut srv = common::server()
        .handler(
            "quick",
            "#!/bin/sh\necho \"$SPOOL_ID $SPOOL_ATTEMPT\" >> \"$SPOOL_DIR/../log\"\ncat\n",
        )
        .config("concurrency = 4")
        .start();
    let addr = srv.addr;
    const THREADS: usize = 4;
    const PER_THREAD: usize = 50;
    let acked = Arc::new(AtomicUsize::new(0));
    // key -> (id, status code of the answer that carried it)
    let accepted: Arc<Mutex<BTreeMap<String, (String, u16)>>> = Arc::default();
    let odd: Arc<Mutex<Vec<String>>> = Arc::default();
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (acked, accepted, odd) = (acked.clone(), accepted.clone(), odd.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + secs(40);
                for n in 0..PER_THREAD {
                    let key = format!("burst-{t}-{n}");
                    let body = format!("{{\"t\": {t}, \"n\": {n}}}");
                    loop {
                        assert!(Instant::now() < deadline, "{key} never accepted");
                        match try_post(addr, "/events/quick", &key, &body) {
                            Some(r) if r.status == 202 || r.status == 200 => {
                                let id = r.json()["id"].as_str().unwrap().to_owned();
                                accepted.lock().unwrap().insert(key, (id, r.status));
                                acked.fetch_add(1, Ordering::SeqCst);
                                break;
                            }
                            Some(r) => {
                                odd.lock().unwrap().push(format!(
                                    "{key}: {} {}",
                                    r.status,
                                    r.text()
                                ));
                                std::thread::sleep(Duration::from_millis(20));
                            }
                            // Refused or cut off: the server is down; try again.
                            None => std::thread::sleep(Duration::from_millis(5)),
                        }
                    }
                }
            })
        })
        .collect();
    for at in [40, 90, 140] {
        wait_until(secs(20), &format!("{at} submits accepted"), || {
            acked.load(Ordering::SeqCst) >= at
        });
        srv.kill9();
        srv.restart();
    }
    for w in workers {
        w.join().expect("a submitting thread failed");
    }
    let accepted = accepted.lock().unwrap().clone();
    assert_eq!(accepted.len(), THREADS * PER_THREAD);
    let ids: BTreeSet<String> = accepted.values().map(|(id, _)| id.clone()).collect();
    assert_eq!(ids.len(), accepted.len(), "two keys got the same event");
    // Every accepted event ends, succeeded.
    let mut finals = BTreeMap::new();
    for id in &ids {
        let st = srv.wait_final(id, secs(20));
        assert_eq!(state(&st), "succeeded", "{st}");
        finals.insert(id.clone(), st["attempt"].as_u64().unwrap());
    }
    // One event directory per key: retries of a cut-off submit found theirs.
    let on_disk: BTreeSet<String> = names(&srv.spool.join("events")).into_iter().collect();
    assert_eq!(on_disk, ids, "events on disk vs. events accepted");
    // Each event ran at least once, no attempt number twice, and the final
    // status is the one of its last run.
    let mut runs: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for line in lines(&srv, "log") {
        let (id, attempt) = line.split_once(' ').expect("log line");
        runs.entry(id.to_owned())
            .or_default()
            .push(attempt.parse().unwrap());
    }
    for id in &ids {
        let attempts = runs
            .get(id)
            .unwrap_or_else(|| panic!("{id} was accepted but its handler never ran"));
        let distinct: BTreeSet<&u64> = attempts.iter().collect();
        assert_eq!(
            distinct.len(),
            attempts.len(),
            "{id} ran attempts {attempts:?}"
        );
        assert_eq!(
            attempts.iter().max(),
            Some(&finals[id]),
            "{id}: runs {attempts:?}, final attempt {}",
            finals[id]
        );
    }
    let unknown: Vec<&String> = runs.keys().filter(|id| !ids.contains(*id)).collect();
    assert!(
        unknown.is_empty(),
        "runs of events never accepted: {unknown:?}"
    );
    let odd = odd.lock().unwrap();
    assert!(odd.is_empty(), "unexpected answers: {odd:?}");
    assert_spool_settles(&srv);
}

// ---------------------------------------------------------------------------
// Leftovers of a crash in the middle of a submit
// ---------------------------------------------------------------------------

#[test]
fn a_submit_cut_short_between_event_dir_and_queue_is_published_at_start() {
    let mut srv = common::server()
        .handler(
            "t",
            "#!/bin/sh\necho \"$SPOOL_ID\" >> \"$SPOOL_DIR/../log\"\ncat\n",
        )
        .start();
    srv.kill9();
    let tmp = srv.spool.join("tmp");
    // Crash between steps 3 and 4: event dir placed, entry only staged.
    let unpublished = common::make_ulid();
    common::write_event_by_hand(&srv.spool, &unpublished, "t", r#"{"case": "unpublished"}"#);
    fs::write(
        tmp.join(format!("testhost.1.0.queue.{unpublished}")),
        br#"{"type":"t"}"#,
    )
    .unwrap();
    // Crash after the link but before the staging name was removed.
    let linked = common::make_ulid();
    common::write_event_by_hand(&srv.spool, &linked, "t", r#"{"case": "linked"}"#);
    let staged = tmp.join(format!("testhost.1.1.queue.{linked}"));
    fs::write(&staged, br#"{"type":"t"}"#).unwrap();
    fs::hard_link(&staged, srv.spool.join("queue").join(&linked)).unwrap();
    // Crash before the event dir was placed: no event at all.
    let never = common::make_ulid();
    fs::write(
        tmp.join(format!("testhost.1.2.queue.{never}")),
        br#"{"type":"t"}"#,
    )
    .unwrap();

    srv.restart();
    for (id, case) in [(&unpublished, "unpublished"), (&linked, "linked")] {
        let st = srv.wait_final(id, secs(10));
        assert_eq!(state(&st), "succeeded", "{case}: {st}");
        assert_eq!(st["attempt"], 1, "{case}: {st}");
        assert_eq!(
            srv.get(&format!("/events/{id}/result")).text(),
            format!("{{\"case\": \"{case}\"}}")
        );
    }
    assert_eq!(srv.get(&format!("/events/{never}")).status, 404);
    let mut ran = lines(&srv, "log");
    ran.sort();
    let mut want = vec![unpublished.clone(), linked.clone()];
    want.sort();
    assert_eq!(ran, want, "each ran exactly once");
    assert_spool_settles(&srv);
}

// ---------------------------------------------------------------------------
// Damaged and hand-made spool contents
// ---------------------------------------------------------------------------

#[test]
fn stray_files_in_queue_and_running_are_ignored_with_a_warning() {
    let mut srv = common::server().handler("echo", "#!/bin/sh\ncat\n").start();
    fs::write(srv.spool.join("queue").join("junk"), b"not an entry").unwrap();
    fs::write(
        srv.spool.join("running").join("testhost").join("junk"),
        b"not a claim",
    )
    .unwrap();
    let a = srv.submit("echo", r#"{"a": 1}"#);
    assert_eq!(state(&srv.wait_final(&a, secs(10))), "succeeded");
    wait_until(secs(5), "a warning about queue/junk", || {
        srv.log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("queue/junk"))
    });
    // At start, recovery walks running/<host>/ too.
    srv.restart();
    wait_until(secs(5), "a warning about running/testhost/junk", || {
        srv.log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("running/testhost/junk"))
    });
    let b = srv.submit("echo", r#"{"b": 2}"#);
    assert_eq!(state(&srv.wait_final(&b, secs(10))), "succeeded");
    assert_eq!(
        srv.get(&format!("/events/{b}/result")).text(),
        r#"{"b": 2}"#
    );
    assert_eq!(srv.get("/events/junk").status, 400);
}

#[test]
fn a_queue_entry_without_its_event_is_dead_lettered_and_work_goes_on() {
    let mut srv = common::server().handler("echo", "#!/bin/sh\ncat\n").start();
    let ghost = common::make_ulid();
    fs::write(srv.spool.join("queue").join(&ghost), br#"{"type":"echo"}"#).unwrap();
    let dead = srv.spool.join("dead").join(&ghost);
    wait_until(secs(5), "the orphan entry in dead/", || dead.exists());
    wait_until(
        secs(3),
        "the orphan entry out of queue/ and running/",
        || {
            !srv.spool.join("queue").join(&ghost).exists()
                && !srv
                    .spool
                    .join("running")
                    .join("testhost")
                    .join(&ghost)
                    .exists()
        },
    );
    let letter: Value = serde_json::from_slice(&fs::read(&dead).unwrap()).unwrap();
    assert_eq!(letter["id"], ghost.as_str(), "{letter}");
    assert!(
        letter["error"]
            .as_str()
            .unwrap_or("")
            .contains("event.json"),
        "{letter}"
    );
    assert_eq!(srv.get(&format!("/events/{ghost}")).status, 404);
    let a = srv.submit("echo", r#"{"a": 1}"#);
    assert_eq!(state(&srv.wait_final(&a, secs(10))), "succeeded");

    // The same, found at start-up.
    srv.kill9();
    let ghost2 = common::make_ulid();
    fs::write(srv.spool.join("queue").join(&ghost2), br#"{"type":"echo"}"#).unwrap();
    srv.restart();
    let dead2 = srv.spool.join("dead").join(&ghost2);
    wait_until(secs(5), "the second orphan entry in dead/", || {
        dead2.exists()
    });
    let b = srv.submit("echo", r#"{"b": 2}"#);
    assert_eq!(state(&srv.wait_final(&b, secs(10))), "succeeded");
    assert_spool_settles(&srv);
}

// ---------------------------------------------------------------------------
// Graceful stop
// ---------------------------------------------------------------------------

#[test]
fn graceful_stop_requeues_a_handler_that_outlives_shutdown_grace() {
    let mut srv = common::server()
        .handler(
            "long",
            &script(
                r#"echo "$SPOOL_ATTEMPT" >> "$T/attempts"
echo $$ > "$T/pid"
wait_for go
echo "finished $SPOOL_ATTEMPT""#,
            ),
        )
        .config("shutdown_grace = \"300ms\"")
        .start();
    let id = srv.submit("long", "{}");
    let pidfile = tdir(&srv).join("pid");
    wait_until(secs(10), "the handler to start", || pidfile.exists());
    let pid = read_pid(&pidfile).unwrap();
    let _reap = Reap(vec![pid]);
    let began = Instant::now();
    assert_eq!(srv.stop(), Some(0), "a graceful stop exits 0");
    let took = began.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "the handler got no shutdown_grace: stop took {took:?}"
    );
    assert!(!process_alive(pid), "the handler outlived spoold");
    let st = disk_status(&srv, &id);
    assert_eq!(state(&st), "queued", "{st}");
    assert_eq!(st["attempt"], 1, "{st}");
    assert!(srv.spool.join("queue").join(&id).exists());
    assert!(names(&srv.spool.join("running").join("testhost")).is_empty());

    release(&srv, "go");
    srv.restart();
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(st["attempt"], 2, "{st}");
    assert_eq!(
        srv.get(&format!("/events/{id}/result")).text(),
        "finished 2\n"
    );
    assert_eq!(lines(&srv, "attempts"), ["1", "2"]);
    assert_spool_settles(&srv);
}

#[test]
fn graceful_stop_lets_a_handler_finish_within_shutdown_grace() {
    let mut srv = common::server()
        .handler(
            "long",
            &script(
                r#"echo "$SPOOL_ATTEMPT" >> "$T/attempts"
wait_for go
echo "finished $SPOOL_ATTEMPT""#,
            ),
        )
        .config("shutdown_grace = \"8s\"")
        .start();
    let id = srv.submit("long", "{}");
    wait_until(secs(10), "the handler to start", || {
        lines(&srv, "attempts").len() == 1
    });
    let server_pid = srv.pid() as i32;
    unsafe { libc::kill(server_pid, libc::SIGTERM) };
    wait_until(secs(5), "spoold to begin shutting down", || {
        srv.log().contains("shutting down")
    });
    assert!(
        process_alive(server_pid),
        "spoold must wait for its handler"
    );
    release(&srv, "go");
    wait_until(secs(8), "spoold to exit", || !process_alive(server_pid));
    assert_eq!(srv.stop(), Some(0), "a graceful stop exits 0");
    let st = disk_status(&srv, &id);
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(st["attempt"], 1, "{st}");
    assert_eq!(
        names(&srv.spool.join("tmp")),
        Vec::<String>::new(),
        "a graceful stop leaves nothing in tmp/, spare files included"
    );

    srv.restart();
    assert_eq!(state(&srv.status(&id)), "succeeded");
    assert_eq!(
        srv.get(&format!("/events/{id}/result")).text(),
        "finished 1\n"
    );
    assert_eq!(lines(&srv, "attempts"), ["1"], "it ran once");
    assert_spool_settles(&srv);
}

const LAST_ATTEMPT: &str = r#"echo "$SPOOL_ATTEMPT" >> "$T/attempts"
echo $$ > "$T/pid"
wait_for go
echo "finished $SPOOL_ATTEMPT""#;

#[test]
fn kill9_during_the_last_attempt_dead_letters_instead_of_retrying_forever() {
    let mut srv = common::server()
        .handler("last", &script(LAST_ATTEMPT))
        .handler_toml("last", "max_attempts = 1\n")
        .start();
    let id = srv.submit("last", "{}");
    let pidfile = tdir(&srv).join("pid");
    wait_until(secs(10), "the handler to start", || pidfile.exists());
    let _reap = Reap(vec![read_pid(&pidfile).unwrap()]);
    srv.kill9();
    srv.restart();
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "failed", "{st}");
    assert_eq!(st["dead_letter"], true, "{st}");
    assert_eq!(st["attempt"], 1, "{st}");
    let error = st["error"].as_str().unwrap();
    assert!(
        error.contains("last attempt (1 of 1) was cut short"),
        "{error}"
    );
    assert!(
        error.contains("restarted during attempt 1"),
        "the error says what cut it short: {error}"
    );
    assert_eq!(
        lines(&srv, "attempts"),
        ["1"],
        "the handler never ran again"
    );
    wait_until(secs(5), "the dead letter", || {
        srv.spool.join("dead").join(&id).exists()
    });
    assert_spool_settles(&srv);
}

#[test]
fn a_graceful_stop_during_the_last_attempt_does_not_use_it_up() {
    let mut srv = common::server()
        .handler("last", &script(LAST_ATTEMPT))
        .handler_toml("last", "max_attempts = 1\n")
        .config("shutdown_grace = \"300ms\"")
        .start();
    let id = srv.submit("last", "{}");
    let pidfile = tdir(&srv).join("pid");
    wait_until(secs(10), "the handler to start", || pidfile.exists());
    let _reap = Reap(vec![read_pid(&pidfile).unwrap()]);
    assert_eq!(srv.stop(), Some(0));
    let st = disk_status(&srv, &id);
    assert_eq!(state(&st), "queued", "{st}");
    assert_eq!(st["max_attempts"], 2, "the cut attempt is given back: {st}");
    release(&srv, "go");
    srv.restart();
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(st["attempt"], 2, "attempt still counts every start: {st}");
    assert!(
        st["attempt"].as_u64() <= st["max_attempts"].as_u64(),
        "{st}"
    );
    assert_eq!(lines(&srv, "attempts"), ["1", "2"]);
    assert_spool_settles(&srv);
}

#[test]
fn a_torn_status_json_is_rebuilt_from_event_json_and_the_event_still_runs() {
    let mut srv = common::server()
        .handler("torn", &script(LAST_ATTEMPT))
        .start();
    let id = srv.submit("torn", "{}");
    let pidfile = tdir(&srv).join("pid");
    wait_until(secs(10), "the handler to start", || pidfile.exists());
    let _reap = Reap(vec![read_pid(&pidfile).unwrap()]);
    srv.kill9();
    // What a filesystem that lost unsynced data after a power cut can leave.
    fs::write(srv.spool.join("events").join(&id).join("status.json"), b"").unwrap();
    release(&srv, "go");
    srv.restart();
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert!(
        srv.log()
            .contains("status.json was damaged; rebuilt it from event.json"),
        "the log says what happened"
    );
    assert_spool_settles(&srv);
}

#[test]
fn a_claim_of_this_host_that_no_runner_holds_goes_back_to_the_queue() {
    let srv = common::server()
        .handler("lost", "#!/bin/sh\necho found\n")
        .config("lease_ttl = \"1s\"")
        .start();
    // A claim left behind while spoold runs (a runner that could not finish
    // its work): the event's files, and a claim whose lease ran out long ago.
    let id = common::make_ulid();
    common::write_event_by_hand(&srv.spool, &id, "lost", "{}");
    let claim = srv.spool.join("running").join("testhost").join(&id);
    fs::write(&claim, r#"{"type":"lost"}"#).unwrap();
    let old = libc::timespec {
        tv_sec: 1_000_000_000,
        tv_nsec: 0,
    };
    let path = std::ffi::CString::new(claim.to_str().unwrap()).unwrap();
    assert_eq!(
        unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), [old, old].as_ptr(), 0) },
        0
    );
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(srv.get(&format!("/events/{id}/result")).text(), "found\n");
    assert!(srv
        .log()
        .contains("moved a claim whose lease expired back to the queue"));
    assert_spool_settles(&srv);
}
