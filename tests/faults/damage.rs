//! Hand damage: files of events truncated or deleted, stray files where
//! spoold keeps its queue and claims, a spool written by another version.
//! Each gets a clear log line and ends its event (failed, or gone), and the
//! server never ends up in a crash loop: it restarts over the same damage.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::common::{self, make_ulid, write_event_by_hand, Server};
use crate::support::{audit, error, logged, scan_spool, Expect, ReapSpool};

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn queue(spool: &Path, id: &str, kind: &str) {
    fs::write(
        spool.join("queue").join(id),
        format!("{{\"type\":\"{kind}\"}}"),
    )
    .unwrap();
}

/// The log has a WARN or ERROR line that names `what`.
#[track_caller]
fn logged_line(srv: &Server, what: &str) {
    crate::support::wait_for(secs(5), || {
        let found = srv
            .log()
            .lines()
            .any(|l| (l.contains("WARN") || l.contains("ERROR")) && l.contains(what));
        (found, ())
    })
    .unwrap_or_else(|()| panic!("no log line about {what}"));
}

#[test]
fn damaged_events_and_strays_are_reported_and_never_cause_a_crash_loop() {
    let mut srv = common::server()
        .handler("job", &logged("cat\nfinish 0"))
        .start();
    let _reap = ReapSpool(srv.spool.clone());
    let done = srv.submit("job", r#"{"done": 1}"#);
    let result_cut = srv.submit("job", r#"{"a long": "result, cut short by hand"}"#);
    srv.wait_final(&done, secs(10));
    srv.wait_final(&result_cut, secs(10));
    srv.kill9();
    let sp = srv.spool.clone();
    let ev = |id: &str| sp.join("events").join(id);

    // Queued events whose files were damaged while nothing ran.
    let half_envelope = make_ulid();
    write_event_by_hand(&sp, &half_envelope, "job", r#"{"x": 1}"#);
    let text = fs::read(ev(&half_envelope).join("event.json")).unwrap();
    fs::write(
        ev(&half_envelope).join("event.json"),
        &text[..text.len() / 2],
    )
    .unwrap();
    queue(&sp, &half_envelope, "job");
    let no_envelope = make_ulid();
    write_event_by_hand(&sp, &no_envelope, "job", r#"{"x": 2}"#);
    fs::remove_file(ev(&no_envelope).join("event.json")).unwrap();
    queue(&sp, &no_envelope, "job");
    let no_dir = make_ulid();
    queue(&sp, &no_dir, "job");
    // A claim of this host whose event.json was cut (found at recovery).
    let claimed_half = make_ulid();
    write_event_by_hand(&sp, &claimed_half, "job", r#"{"x": 3}"#);
    fs::write(ev(&claimed_half).join("event.json"), b"{\"id\": \"").unwrap();
    fs::write(
        sp.join("running/testhost").join(&claimed_half),
        br#"{"type":"job"}"#,
    )
    .unwrap();
    // A claim of this host whose event.json is gone (the directory is there).
    let claimed_gone = make_ulid();
    write_event_by_hand(&sp, &claimed_gone, "job", r#"{"x": 5}"#);
    fs::remove_file(ev(&claimed_gone).join("event.json")).unwrap();
    fs::write(
        sp.join("running/testhost").join(&claimed_gone),
        br#"{"type":"job"}"#,
    )
    .unwrap();
    // A finished event: status.json cut, result cut.
    let st = fs::read(ev(&done).join("status.json")).unwrap();
    fs::write(ev(&done).join("status.json"), &st[..st.len() / 3]).unwrap();
    fs::write(ev(&result_cut).join("result"), b"{\"a lo").unwrap();
    // Strays: names that are no event IDs, an ID that is a directory,
    // garbage where a queue entry or a process mark should be.
    fs::write(sp.join("queue/README.txt"), b"hello").unwrap();
    fs::write(sp.join("queue").join(make_ulid().to_lowercase()), b"{}").unwrap();
    let dir_in_queue = make_ulid();
    fs::create_dir(sp.join("queue").join(&dir_in_queue)).unwrap();
    let dir_in_running = make_ulid();
    fs::create_dir(sp.join("running/testhost").join(&dir_in_running)).unwrap();
    fs::write(sp.join("running/testhost/notes"), b"x").unwrap();
    let garbage_entry = make_ulid();
    write_event_by_hand(&sp, &garbage_entry, "job", r#"{"x": 4}"#);
    fs::write(sp.join("queue").join(&garbage_entry), b"\xff\x00not json").unwrap();
    fs::create_dir_all(sp.join("hosts/testhost")).unwrap();
    fs::write(sp.join("hosts/testhost/junk.process"), b"{").unwrap();
    fs::write(sp.join("tmp/otherhost.1.2.queue.nonsense"), b"x").unwrap();

    // Twice: a start over the same damage must work as well as the first.
    for _ in 0..2 {
        crate::support::restart(&mut srv);
        assert_eq!(srv.get("/healthz").status, 200);
    }
    logged_line(&srv, "queue/README.txt");
    logged_line(&srv, "running/testhost/notes");
    logged_line(&srv, &half_envelope);
    logged_line(&srv, &no_envelope);
    logged_line(&srv, &no_dir);

    // The damaged ones end failed, dead-lettered, saying what was damaged.
    for (id, what) in [
        (&half_envelope, "event.json"),
        (&no_envelope, "event.json"),
        (&claimed_half, "event.json"),
        (&claimed_gone, "event.json is missing"),
    ] {
        let st = srv.wait_final(id, secs(10));
        assert_eq!(st["state"], "failed", "{id}: {st}");
        assert_eq!(st["dead_letter"], true, "{st}");
        assert!(error(&st).contains(what), "{st}");
        let dead = sp.join("dead").join(id);
        crate::support::wait_for(secs(5), || (dead.exists(), ()))
            .expect("the dead letter after the final status");
    }
    // Gone is gone: a dead letter, and 404.
    crate::support::wait_for(secs(5), || (sp.join("dead").join(&no_dir).exists(), ()))
        .expect("the entry without an event to be dead-lettered");
    assert_eq!(srv.get(&format!("/events/{no_dir}")).status, 404);
    // A garbage queue entry still runs (its type comes from event.json).
    let st = srv.wait_final(&garbage_entry, secs(10));
    assert_eq!(st["state"], "succeeded", "{st}");
    // The finished event whose status.json was cut says so, and is not run again.
    let r = srv.get(&format!("/events/{done}"));
    assert!(
        r.status == 200 || r.status == 500,
        "{} {}",
        r.status,
        r.text()
    );
    if r.status == 500 {
        assert!(r.text().contains("damaged"), "{}", r.text());
    }
    let r = srv.get(&format!("/events/{result_cut}/result"));
    println!(
        "a result cut by hand is served as {} with {} bytes",
        r.status,
        r.body.len()
    );

    // Work goes on.
    let fresh = srv.submit("job", r#"{"fresh": true}"#);
    assert_eq!(srv.wait_final(&fresh, secs(10))["state"], "succeeded");
    // The strays are still there (spoold does not delete what it does not
    // understand) and nothing else is left.
    assert!(sp.join("queue/README.txt").exists());
    for stray in [
        "queue/README.txt",
        &format!("queue/{dir_in_queue}"),
        "running/testhost/notes",
        &format!("running/testhost/{dir_in_running}"),
    ] {
        let _ = fs::remove_dir(sp.join(stray)).or_else(|_| fs::remove_file(sp.join(stray)));
    }
    for n in common::names(&sp.join("queue")) {
        if n.chars().any(|c| c.is_ascii_lowercase()) {
            fs::remove_file(sp.join("queue").join(n)).unwrap();
        }
    }
    // Another host's fresh staging file stays (for a day): not this test's.
    assert!(sp.join("tmp/otherhost.1.2.queue.nonsense").exists());
    fs::remove_file(sp.join("tmp/otherhost.1.2.queue.nonsense")).unwrap();
    // Finished events may be deleted by hand; these two cannot pass the audit.
    fs::remove_dir_all(ev(&done)).unwrap();
    fs::remove_dir_all(ev(&result_cut)).unwrap();
    let damaged = [half_envelope, no_envelope, claimed_half, claimed_gone];
    let mut expect = Expect::new(damaged.iter().cloned().chain([garbage_entry, fresh]));
    expect.damaged = damaged.into_iter().collect();
    expect.logged = false;
    audit(&srv, &expect);
}

/// What a spoold of another version left: a FORMAT it does not know. It must
/// stop with a clear message and touch nothing.
#[test]
fn a_spool_of_another_format_is_refused_with_a_clear_message_and_left_alone() {
    let mut srv = common::server()
        .handler("job", &logged("cat\nfinish 0"))
        .start();
    let id = srv.submit("job", "{}");
    srv.wait_final(&id, secs(10));
    srv.kill9();
    let before = scan_spool(&srv.spool, false).expect("a clean spool");
    // The spare files the killed spoold kept in tmp/ (its next start removes them).
    let tmp_before = common::names(&srv.spool.join("tmp"));
    for found in ["spoold-spool 2", "", "garbage\n\u{0}"] {
        fs::write(srv.spool.join("FORMAT"), found).unwrap();
        let out = Command::new(common::BIN)
            .args(["serve", "--listen", "127.0.0.1:0", "--host-id", "testhost"])
            .arg("--spool")
            .arg(&srv.spool)
            .arg("--handlers")
            .arg(&srv.handlers)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "FORMAT {found:?}: {err}");
        assert!(
            err.contains("another format") && err.contains("spoold-spool 1"),
            "FORMAT {found:?}: {err}"
        );
        assert_eq!(
            scan_spool(&srv.spool, false).expect("still clean"),
            before,
            "FORMAT {found:?}: the spool was changed"
        );
        assert_eq!(common::names(&srv.spool.join("tmp")), tmp_before);
    }
    // No FORMAT at all (a spool from before FORMAT existed, or a hand-made
    // one): taken for format 1, which is all there has been, and marked so.
    fs::remove_file(srv.spool.join("FORMAT")).unwrap();
    crate::support::restart(&mut srv);
    assert_eq!(srv.status(&id)["state"], "succeeded");
    assert_eq!(
        fs::read_to_string(srv.spool.join("FORMAT")).unwrap(),
        "spoold-spool 1\n"
    );
}

/// Records of another version of the same format: unknown fields are
/// ignored; a status of a state this version does not know is rebuilt.
#[test]
fn records_with_unknown_fields_or_states_do_not_stop_the_event() {
    let srv = common::server()
        .handler("job", &logged("cat\nfinish 0"))
        .start();
    let _reap = ReapSpool(srv.spool.clone());
    let sp = &srv.spool;
    let extra = make_ulid();
    let dir = sp.join("events").join(&extra);
    fs::create_dir_all(&dir).unwrap();
    let envelope = format!(
        r#"{{"id": "{extra}", "type": "job", "submitted_at": "{}", "max_attempts": 3, "timeout": 30, "priority": 7, "payload": {{"v": 2}}}}"#,
        humantime::format_rfc3339_millis(std::time::SystemTime::now())
    );
    fs::write(dir.join("event.json"), envelope).unwrap();
    fs::write(
        sp.join("queue").join(&extra),
        br#"{"type":"job","lane":"fast"}"#,
    )
    .unwrap();
    let paused = make_ulid();
    write_event_by_hand(sp, &paused, "job", r#"{"v": 3}"#);
    let st = format!(
        r#"{{"id":"{paused}","type":"job","state":"paused","seq":5,"attempt":1,"max_attempts":3}}"#
    );
    fs::write(sp.join("events").join(&paused).join("status.json"), st).unwrap();
    fs::write(sp.join("queue").join(&paused), br#"{"type":"job"}"#).unwrap();
    for id in [&extra, &paused] {
        let st = srv.wait_final(id, secs(10));
        assert_eq!(st["state"], "succeeded", "{id}: {st}");
    }
    logged_line(&srv, "status.json was damaged");
    audit(&srv, &Expect::new([extra, paused]));
}

#[test]
fn a_status_that_names_another_event_is_never_served_as_this_ones() {
    let srv = common::server()
        .handler("job", &logged("cat\nfinish 0"))
        .start();
    let _reap = ReapSpool(srv.spool.clone());
    let sp = &srv.spool;
    // A status.json copied from another event (by hand; or what a reader
    // could find in a replaced status file spoold has written again).
    let (id, other) = (make_ulid(), make_ulid());
    write_event_by_hand(sp, &id, "job", r#"{"v": 4}"#);
    let st = format!(
        r#"{{"id":"{other}","type":"job","state":"succeeded","seq":9,"attempt":1,"max_attempts":3}}"#
    );
    fs::write(sp.join("events").join(&id).join("status.json"), st).unwrap();
    fs::write(sp.join("queue").join(&id), br#"{"type":"job"}"#).unwrap();
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(st["id"], id.as_str(), "{st}");
    assert_eq!(st["state"], "succeeded", "the event ran: {st}");
    logged_line(&srv, "status.json was damaged");
    audit(&srv, &Expect::new([id]));
}
