//! Dispatch and the handler protocol, end to end against the real binary:
//! what a handler is given (argv-less exec, process group, cwd, stdin, a clean
//! environment), how its exit maps to a state, retries with backoff, timeouts,
//! cancellation, idempotent submits, concurrency limits, and events that other
//! processes drop into the spool by hand.
//!
//! Handlers that must wait for the test block on a file the test creates in
//! the server's temporary directory (`$SPOOL_DIR/..`); their wait loops are
//! bounded and also end when that directory disappears, so a failing test
//! never leaves a handler looping for long.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{lines, process_alive, release, script, secs, state, tdir, wait_until, Reap, Server};
use serde_json::Value;

const SECS: Duration = Duration::from_secs(1);

/// A pid a handler wrote to `$T/<name>`, once it is there.
fn read_pid(srv: &Server, name: &str) -> i32 {
    let path = tdir(srv).join(name);
    let mut pid = None;
    wait_until(secs(10), &format!("a pid in {}", path.display()), || {
        pid = fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        pid.is_some()
    });
    pid.unwrap()
}

fn error(v: &Value) -> String {
    v["error"].as_str().unwrap_or("").to_owned()
}

/// States of several events, counted.
fn census(srv: &Server, ids: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for id in ids {
        *m.entry(state(&srv.status(id)).to_owned()).or_insert(0) += 1;
    }
    m
}

fn count(m: &BTreeMap<String, usize>, s: &str) -> usize {
    m.get(s).copied().unwrap_or(0)
}

/// Asserts that `cond` holds at every check during `span` (an invariant that
/// must not break while the server has every chance to break it).
fn holds_for(span: Duration, what: &str, mut cond: impl FnMut() -> Result<(), String>) {
    let end = Instant::now() + span;
    while Instant::now() < end {
        if let Err(e) = cond() {
            panic!("{what} stopped holding: {e}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Maximum number of handlers between "start" and "end" lines at once.
fn max_overlap(log: &[String]) -> usize {
    let (mut now, mut max) = (0usize, 0usize);
    for l in log {
        if l.starts_with("start") {
            now += 1;
            max = max.max(now);
        } else if l.starts_with("end") {
            now = now.saturating_sub(1);
        }
    }
    max
}

fn parse_rfc3339(s: &str) -> SystemTime {
    humantime::parse_rfc3339_weak(s).unwrap_or_else(|e| panic!("not RFC 3339 ({e}): {s:?}"))
}

fn ms_between(a: &Value, b: &Value) -> i128 {
    let ms = |v: &Value| {
        parse_rfc3339(v.as_str().unwrap_or_else(|| panic!("not a timestamp: {v}")))
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as i128
    };
    ms(b) - ms(a)
}

// ---------------------------------------------------------------------------
// The handler protocol
// ---------------------------------------------------------------------------

#[test]
fn handler_gets_exact_environment_cwd_stdin_and_its_own_process_group() {
    // Variables of the server's own environment: only those named in the
    // config's pass_env or the handler's toml `env` may reach the handler.
    std::env::set_var("SECRET_TOKEN", "hunter2");
    std::env::set_var("SPOOLD_TEST_CFG_VAR", "from-config");
    std::env::set_var("SPOOLD_TEST_TOML_VAR", "from-toml");
    let srv = common::server()
        .handler(
            "envdump",
            &script(
                r#"tr '\0' '\n' < /proc/$$/environ > "$T/env.txt"
pwd -P > "$T/pwd.txt"
cut -d' ' -f5 /proc/$$/stat > "$T/pgid.txt"
echo $$ > "$T/pid.txt"
cat > "$T/stdin.txt"
echo ok"#,
            ),
        )
        .handler_toml(
            "envdump",
            "timeout = 30\nenv = [\"SPOOLD_TEST_TOML_VAR\", \"SPOOLD_TEST_UNSET_VAR\"]\n",
        )
        .config("pass_env = [\"SPOOLD_TEST_CFG_VAR\"]")
        .start();
    let payload = "{\"b\": [1, 2,  3],\n \"s\": \"h\\u00e9llo \\\"q\\\"\", \"n\": 1.50}";
    let before = SystemTime::now();
    let id = srv.submit("envdump", payload);
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(st["exit_code"], 0, "{st}");
    assert_eq!(st["attempt"], 1, "{st}");

    let t = tdir(&srv);
    let spool = srv.spool.canonicalize().unwrap();
    let event_dir = spool.join("events").join(&id);
    let env_text = fs::read_to_string(t.join("env.txt")).unwrap();
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for line in env_text.lines().filter(|l| !l.is_empty()) {
        let (k, v) = line.split_once('=').unwrap_or((line, ""));
        assert!(
            env.insert(k.to_owned(), v.to_owned()).is_none(),
            "{k} is set twice in the handler's environment:\n{env_text}"
        );
    }
    let names: BTreeSet<&str> = env.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = [
        "PATH",
        "LANG",
        "SPOOLD_TEST_CFG_VAR",
        "SPOOLD_TEST_TOML_VAR",
        "SPOOL_ID",
        "SPOOL_TYPE",
        "SPOOL_DIR",
        "SPOOL_EVENT",
        "SPOOL_PROGRESS",
        "SPOOL_RESULT",
        "SPOOL_ATTEMPT",
        "SPOOL_DEADLINE",
    ]
    .into();
    assert_eq!(
        names, expected,
        "the handler's environment must be exactly these names:\n{env_text}"
    );
    assert!(!env_text.contains("hunter2"), "a secret leaked: {env_text}");
    assert_eq!(env["SPOOLD_TEST_CFG_VAR"], "from-config");
    assert_eq!(env["SPOOLD_TEST_TOML_VAR"], "from-toml");
    assert_eq!(env["SPOOL_ID"], id);
    assert_eq!(env["SPOOL_TYPE"], "envdump");
    assert_eq!(Path::new(&env["SPOOL_DIR"]), spool);
    assert_eq!(Path::new(&env["SPOOL_EVENT"]), event_dir.join("event.json"));
    assert_eq!(
        Path::new(&env["SPOOL_PROGRESS"]),
        event_dir.join("progress.json")
    );
    assert_eq!(Path::new(&env["SPOOL_RESULT"]), event_dir.join("result"));
    assert_eq!(env["SPOOL_ATTEMPT"], "1");
    assert!(!env["PATH"].is_empty() && !env["LANG"].is_empty());
    // The deadline is the start plus the toml's timeout (30 s, a bare number).
    let deadline = parse_rfc3339(&env["SPOOL_DEADLINE"]);
    let ahead = deadline.duration_since(before).unwrap_or_default();
    assert!(
        ahead >= secs(29) && ahead <= secs(40),
        "SPOOL_DEADLINE {} is not ~30 s after the submit",
        env["SPOOL_DEADLINE"]
    );
    // cwd is the event's directory.
    let pwd = fs::read_to_string(t.join("pwd.txt")).unwrap();
    assert_eq!(Path::new(pwd.trim()), event_dir);
    // Its own process group: pgid == pid.
    let pid = fs::read_to_string(t.join("pid.txt")).unwrap();
    let pgid = fs::read_to_string(t.join("pgid.txt")).unwrap();
    assert_eq!(
        pgid.trim(),
        pid.trim(),
        "the handler must lead its own group"
    );
    assert_ne!(pgid.trim(), srv.pid().to_string());
    // stdin is the payload, byte for byte.
    assert_eq!(fs::read_to_string(t.join("stdin.txt")).unwrap(), payload);
    assert_eq!(srv.get(&format!("/events/{id}/result")).text(), "ok\n");
}

#[test]
fn a_symlink_to_an_existing_tool_is_a_handler() {
    let srv = common::server()
        .symlink("echo", Path::new("/bin/cat"))
        .start();
    let payload = r#"{"hello": ["wor", "ld"], "n": 42}"#;
    let id = srv.submit("echo", payload);
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(st["exit_code"], 0);
    assert_eq!(st["result"]["bytes"], payload.len());
    let r = srv.get(&format!("/events/{id}/result"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), payload);
    assert_eq!(
        fs::read_to_string(srv.spool.join("events").join(&id).join("result")).unwrap(),
        payload
    );
}

/// A report is noticed when it is written (inotify), not at the next
/// progress_interval check: here the interval is a minute, and each report
/// must show within seconds. Reports that come faster than the interval
/// are not lost either: the next one is, at the latest, a tick later.
#[test]
fn a_progress_report_is_noticed_when_written_not_a_progress_interval_later() {
    let srv = common::server()
        .handler(
            "prog",
            &script(
                r#"spoold report --progress 10 --message "first"
wait_for go1
spoold report --progress 90 --message "second"
wait_for go2
echo done"#,
            ),
        )
        .config("progress_interval = \"60s\"")
        .start();
    let id = srv.submit("prog", "{}");
    wait_until(secs(10), "the first report in the status", || {
        srv.status(&id)["message"] == "first"
    });
    release(&srv, "go1");
    wait_until(secs(10), "the second report in the status", || {
        srv.status(&id)["message"] == "second"
    });
    release(&srv, "go2");
    assert_eq!(state(&srv.wait_final(&id, secs(10))), "succeeded");
}

#[test]
fn progress_file_and_report_cli_are_folded_into_the_status() {
    let srv = common::server()
        .handler(
            "prog",
            &script(
                r#"printf '{"progress": 40, "message": "step one", "data": {"rows": 4}}' > p.tmp
mv p.tmp "$SPOOL_PROGRESS"
wait_for go1
printf '{"progress": 250, "message": "too far"}' > p.tmp
mv p.tmp "$SPOOL_PROGRESS"
wait_for go2
spoold report --progress 70 --message "via the cli" || echo "report failed" >&2
wait_for go3
echo done"#,
            ),
        )
        .start();
    let id = srv.submit("prog", "{}");
    let mut seen = Value::Null;
    wait_until(secs(10), "progress 40 'step one'", || {
        seen = srv.status(&id);
        seen["progress"] == 40.0 && seen["message"] == "step one"
    });
    assert_eq!(state(&seen), "running");
    assert_eq!(seen["data"], serde_json::json!({"rows": 4}));
    let mut seq = seen["seq"].as_u64().unwrap();

    // Each gate lets the handler write its next progress: (gate, message, progress).
    for (gate, message, progress) in [("go1", "too far", 100.0), ("go2", "via the cli", 70.0)] {
        release(&srv, gate);
        wait_until(secs(10), &format!("message {message:?}"), || {
            seen = srv.status(&id);
            seen["message"] == message
        });
        assert_eq!(
            seen["progress"], progress,
            "progress is clamped to 0..=100: {seen}"
        );
        assert_eq!(state(&seen), "running");
        let next = seen["seq"].as_u64().unwrap();
        assert!(next > seq, "seq must grow: {seq} then {next}");
        seq = next;
    }

    release(&srv, "go3");
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(st["progress"], 100.0);
    assert!(st["seq"].as_u64().unwrap() > seq);
    assert_eq!(srv.get(&format!("/events/{id}/result")).text(), "done\n");
}

#[test]
fn result_file_wins_over_stdout_and_stdout_is_the_fallback() {
    let srv = common::server()
        .handler(
            "file",
            "#!/bin/sh\necho 'stdout noise'\nprintf '<r>from the file</r>' > r.tmp && mv r.tmp \"$SPOOL_RESULT\"\n",
        )
        .handler("out", "#!/bin/sh\nprintf 'from stdout'\n")
        .handler("none", "#!/bin/sh\nexit 0\n")
        .start();
    let a = srv.submit("file", "{}");
    let b = srv.submit("out", "{}");
    let c = srv.submit("none", "{}");
    let sa = srv.wait_final(&a, secs(10));
    let sb = srv.wait_final(&b, secs(10));
    let sc = srv.wait_final(&c, secs(10));
    for s in [&sa, &sb, &sc] {
        assert_eq!(state(s), "succeeded", "{s}");
    }
    assert_eq!(
        srv.get(&format!("/events/{a}/result")).text(),
        "<r>from the file</r>"
    );
    assert_eq!(sa["result"]["bytes"], 20);
    assert_eq!(
        srv.get(&format!("/events/{b}/result")).text(),
        "from stdout"
    );
    assert_eq!(sb["result"]["bytes"], 11);
    assert!(sc["result"].is_null(), "no output means no result: {sc}");
}

#[test]
fn failed_attempt_reports_exit_code_and_last_stderr_line() {
    let srv = common::server()
        .handler(
            "fail",
            "#!/bin/sh\necho 'first complaint' >&2\necho 'the real reason' >&2\necho '' >&2\nexit 3\n",
        )
        .handler_toml("fail", "max_attempts = 1\n")
        .start();
    let id = srv.submit("fail", "{}");
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "failed", "{st}");
    assert_eq!(st["exit_code"], 3, "{st}");
    assert_eq!(st["attempt"], 1);
    let err = error(&st);
    assert!(err.contains('3'), "error lacks the exit code: {err}");
    assert!(
        err.contains("the real reason"),
        "error lacks the last stderr line: {err}"
    );
    assert!(
        !err.contains("first complaint"),
        "only the last line: {err}"
    );
    let tail = fs::read_to_string(srv.spool.join("events").join(&id).join("stderr")).unwrap();
    assert!(
        tail.contains("first complaint\nthe real reason\n"),
        "stderr tail: {tail:?}"
    );
}

#[test]
fn exit_65_fails_at_once_without_retry() {
    let srv = common::server()
        .handler(
            "bad",
            "#!/bin/sh\necho \"$SPOOL_ATTEMPT\" >> \"$SPOOL_DIR/../attempts\"\necho 'field x is missing' >&2\nexit 65\n",
        )
        .start();
    let id = srv.submit("bad", "{}");
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "failed", "{st}");
    assert_eq!(st["attempt"], 1, "{st}");
    assert_eq!(st["max_attempts"], 3, "{st}");
    assert_eq!(st["exit_code"], 65);
    assert!(st["retry_at"].is_null(), "{st}");
    assert_ne!(st["dead_letter"], true, "{st}");
    let err = error(&st);
    assert!(err.contains("65"), "{err}");
    assert!(err.contains("field x is missing"), "{err}");
    assert_eq!(lines(&srv, "attempts"), ["1"]);
    assert!(!srv.spool.join("dead").join(&id).exists());
    // Nothing is left queued for it.
    assert!(common::names(&srv.spool.join("queue")).is_empty());
}

#[test]
fn retryable_failures_back_off_then_dead_letter_after_max_attempts() {
    let srv = common::server()
        .handler(
            "flaky",
            "#!/bin/sh\necho \"$SPOOL_ATTEMPT $(date +%s%N)\" >> \"$SPOOL_DIR/../attempts\"\necho \"try $SPOOL_ATTEMPT failed\" >&2\nexit 75\n",
        )
        .start();
    let id = srv.submit("flaky", "{}");
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "failed", "{st}");
    assert_eq!(st["dead_letter"], true, "{st}");
    assert_eq!(st["attempt"], 3, "{st}");
    assert_eq!(st["max_attempts"], 3, "{st}");
    assert_eq!(st["exit_code"], 75, "{st}");
    let err = error(&st);
    assert!(err.contains("75"), "{err}");
    assert!(err.contains("try 3 failed"), "{err}");

    let dead = srv.spool.join("dead").join(&id);
    wait_until(secs(3), "dead/<id>", || dead.exists());
    let letter: Value = serde_json::from_slice(&fs::read(&dead).unwrap()).unwrap();
    assert_eq!(letter["id"], id.as_str());
    assert_eq!(letter["attempts"], 3, "{letter}");
    assert!(common::names(&srv.spool.join("queue")).is_empty());
    wait_until(secs(3), "the claim to be dropped", || {
        common::names(&srv.spool.join("running").join("testhost")).is_empty()
    });

    let log = lines(&srv, "attempts");
    let attempts: Vec<&str> = log.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(attempts, ["1", "2", "3"], "SPOOL_ATTEMPT per run: {log:?}");
    let t: Vec<u128> = log
        .iter()
        .map(|l| l.split(' ').nth(1).unwrap().parse().unwrap())
        .collect();
    let gap = |i: usize| Duration::from_nanos((t[i] - t[i - 1]) as u64);
    // Equal jitter: at least half of base·2^(n-1) (base 50 ms, max 200 ms).
    assert!(gap(1) >= Duration::from_millis(25), "gap 1: {:?}", gap(1));
    assert!(gap(2) >= Duration::from_millis(50), "gap 2: {:?}", gap(2));
    assert!(
        gap(2) < 3 * SECS,
        "gap 2 is far over backoff_max: {:?}",
        gap(2)
    );
}

#[test]
fn retry_waits_queued_with_retry_at_and_a_later_success_ends_succeeded() {
    let srv = common::server()
        .handler(
            "second",
            "#!/bin/sh\necho \"$SPOOL_ATTEMPT\" >> \"$SPOOL_DIR/../attempts\"\nif [ \"$SPOOL_ATTEMPT\" = 1 ]; then echo 'not yet' >&2; exit 1; fi\necho \"ok on $SPOOL_ATTEMPT\"\n",
        )
        .config("backoff_base = \"1s\"\nbackoff_max = \"1s\"")
        .start();
    let id = srv.submit("second", "{}");
    let mut seen = Value::Null;
    wait_until(secs(10), "queued for a retry after attempt 1", || {
        seen = srv.status(&id);
        state(&seen) == "queued" && seen["attempt"] == 1
    });
    assert!(
        seen["retry_at"].is_string(),
        "a waiting retry must carry retry_at: {seen}"
    );
    let wait = ms_between(&seen["updated_at"], &seen["retry_at"]);
    assert!(
        (450..=1100).contains(&wait),
        "retry_at should be 0.5..1.0 s after the failure, is {wait} ms: {seen}"
    );
    assert!(error(&seen).contains("not yet"), "{seen}");
    assert_eq!(seen["exit_code"], 1, "{seen}");
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(st["attempt"], 2);
    assert!(st["error"].is_null(), "a success clears the error: {st}");
    assert!(st["retry_at"].is_null(), "{st}");
    assert_eq!(lines(&srv, "attempts"), ["1", "2"]);
    assert_eq!(srv.get(&format!("/events/{id}/result")).text(), "ok on 2\n");
    assert!(!srv.spool.join("dead").join(&id).exists());
}

/// A retry is queued again by its own run, before the run has ended; it
/// must start when its backoff is over, not at the next rescan of `queue/`
/// (set to a minute here). It used to wait for that rescan.
#[test]
fn a_retry_starts_when_its_backoff_ends_not_at_the_next_rescan() {
    let srv = common::server()
        .handler(
            "second",
            "#!/bin/sh\nif [ \"$SPOOL_ATTEMPT\" = 1 ]; then exit 75; fi\necho ok\n",
        )
        .config("backoff_base = \"50ms\"\nbackoff_max = \"50ms\"\nrescan_interval = \"60s\"")
        .start();
    let ids: Vec<String> = (0..5).map(|_| srv.submit("second", "{}")).collect();
    for id in &ids {
        let st = srv.wait_final(id, secs(15));
        assert_eq!(state(&st), "succeeded", "{st}");
        assert_eq!(st["attempt"], 2, "{st}");
    }
}

#[test]
fn any_nonzero_exit_or_signal_death_is_retried_up_to_the_toml_max_attempts() {
    let srv = common::server()
        .handler(
            "one",
            "#!/bin/sh\necho \"$SPOOL_ATTEMPT\" >> \"$SPOOL_DIR/../one\"\nexit 1\n",
        )
        .handler_toml("one", "max_attempts = 2\n")
        .handler(
            "sig",
            "#!/bin/sh\necho \"$SPOOL_ATTEMPT\" >> \"$SPOOL_DIR/../sig\"\nkill -9 $$\n",
        )
        .handler_toml("sig", "max_attempts = 2\n")
        .start();
    let a = srv.submit("one", "{}");
    let b = srv.submit("sig", "{}");
    let sa = srv.wait_final(&a, secs(10));
    let sb = srv.wait_final(&b, secs(10));
    for (s, log) in [(&sa, "one"), (&sb, "sig")] {
        assert_eq!(state(s), "failed", "{s}");
        assert_eq!(s["dead_letter"], true, "{s}");
        assert_eq!(s["attempt"], 2, "{s}");
        assert_eq!(s["max_attempts"], 2, "{s}");
        assert_eq!(lines(&srv, log), ["1", "2"], "{log}");
    }
    wait_until(secs(3), "both dead letters", || {
        srv.spool.join("dead").join(&a).exists() && srv.spool.join("dead").join(&b).exists()
    });
    assert_eq!(sa["exit_code"], 1);
    let err = error(&sb);
    assert!(
        err.contains("signal 9") || err.contains("SIGKILL"),
        "error must name the signal: {err}"
    );
    assert!(sb["exit_code"].is_null(), "no exit code for a signal: {sb}");
}

// ---------------------------------------------------------------------------
// Timeouts and process groups
// ---------------------------------------------------------------------------

#[test]
fn timeout_kills_the_whole_group_including_grandchildren() {
    let srv = common::server()
        .handler(
            "slow",
            &script(
                r#"echo "$SPOOL_ATTEMPT" >> "$T/attempts"
(trap '' TERM; exec sleep 1000) &
echo $! > "$T/grandchild"
echo $$ > "$T/leader"
wait_for never"#,
            ),
        )
        .handler_toml("slow", "timeout = \"300ms\"\n")
        .start();
    let id = srv.submit("slow", "{}");
    let leader = read_pid(&srv, "leader");
    let grandchild = read_pid(&srv, "grandchild");
    let _reap = Reap(vec![leader, grandchild]);
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "timed_out", "{st}");
    assert_eq!(st["attempt"], 1, "a timeout is final: {st}");
    assert!(!error(&st).is_empty(), "{st}");
    let ran = ms_between(&st["started_at"], &st["finished_at"]);
    assert!(
        (280..5000).contains(&ran),
        "ran {ran} ms for a 300 ms timeout"
    );
    wait_until(secs(3), "the handler's group to be gone", || {
        !process_alive(leader) && !process_alive(grandchild)
    });
    // Not retried, not dead-lettered.
    assert_eq!(lines(&srv, "attempts"), ["1"]);
    assert!(!srv.spool.join("dead").join(&id).exists());
    assert!(common::names(&srv.spool.join("queue")).is_empty());
}

#[test]
fn a_handler_that_ignores_sigterm_is_killed_after_kill_grace() {
    let srv = common::server()
        .handler(
            "stubborn",
            &script(
                r#"trap 'echo TERM >> "$T/signals"' TERM
echo $$ > "$T/leader"
wait_for never
wait_for never"#,
            ),
        )
        .handler_toml("stubborn", "timeout = 1\n")
        .start();
    let id = srv.submit("stubborn", "{}");
    let leader = read_pid(&srv, "leader");
    let _reap = Reap(vec![leader]);
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "timed_out", "{st}");
    // timeout 1 s + kill_grace 500 ms before SIGKILL.
    let ran = ms_between(&st["started_at"], &st["finished_at"]);
    assert!(
        (1400..6000).contains(&ran),
        "ran {ran} ms: SIGKILL must come kill_grace after SIGTERM"
    );
    wait_until(secs(3), "the stubborn handler to be gone", || {
        !process_alive(leader)
    });
    assert_eq!(
        lines(&srv, "signals").first().map(String::as_str),
        Some("TERM"),
        "SIGTERM must be sent first"
    );
}

#[test]
fn processes_left_behind_by_a_handler_that_exited_are_killed() {
    let srv = common::server()
        .handler(
            "leaky",
            "#!/bin/sh\nsleep 1000 &\necho $! > \"$SPOOL_DIR/../grandchild\"\necho done\n",
        )
        .start();
    let id = srv.submit("leaky", "{}");
    let st = srv.wait_final(&id, secs(10));
    let grandchild = read_pid(&srv, "grandchild");
    let _reap = Reap(vec![grandchild]);
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(srv.get(&format!("/events/{id}/result")).text(), "done\n");
    wait_until(secs(3), "the leftover sleep to be killed", || {
        !process_alive(grandchild)
    });
}

#[test]
fn a_result_file_over_max_result_bytes_fails_without_retry() {
    let srv = common::server()
        .handler(
            "bigfile",
            "#!/bin/sh\necho \"$SPOOL_ATTEMPT\" >> \"$SPOOL_DIR/../bigfile\"\nhead -c 5000 /dev/zero > r.tmp && mv r.tmp \"$SPOOL_RESULT\"\n",
        )
        .handler("small", "#!/bin/sh\nhead -c 1000 /dev/zero | tr '\\0' y\n")
        .config("max_result_bytes = 1000")
        .start();
    let b = srv.submit("bigfile", "{}");
    let c = srv.submit("small", "{}");
    let sb = srv.wait_final(&b, secs(10));
    let sc = srv.wait_final(&c, secs(10));
    assert_eq!(state(&sb), "failed", "{sb}");
    assert_eq!(sb["attempt"], 1, "not retried: {sb}");
    assert!(error(&sb).contains("max_result_bytes"), "{sb}");
    assert!(sb["result"].is_null(), "{sb}");
    assert_eq!(lines(&srv, "bigfile"), ["1"]);
    // Exactly at the cap is fine.
    assert_eq!(state(&sc), "succeeded", "{sc}");
    assert_eq!(sc["result"]["bytes"], 1000);
    assert_eq!(srv.get(&format!("/events/{c}/result")).body.len(), 1000);
}

/// Handlers that print more than max_result_bytes: one streams through a
/// pipe (and may die of SIGPIPE once spoold stops reading), one writes it all
/// in one go and exits 0 before spoold has read it. Both must end `failed`
/// at once with an error naming max_result_bytes.
#[test]
fn stdout_over_max_result_bytes_fails_without_retry() {
    let srv = common::server()
        .handler(
            "chatty",
            "#!/bin/sh\necho \"$SPOOL_ID\" >> \"$SPOOL_DIR/../runs\"\nhead -c 100000 /dev/zero | tr '\\0' x\n",
        )
        .handler(
            "burst",
            "#!/bin/sh\necho \"$SPOOL_ID\" >> \"$SPOOL_DIR/../runs\"\nhead -c 5000 /dev/zero | tr '\\0' z > out.tmp\ncat out.tmp\n",
        )
        .config("max_result_bytes = 1000")
        .start();
    let ids: Vec<String> = ["chatty", "chatty", "burst", "burst", "burst"]
        .iter()
        .map(|k| srv.submit(k, "{}"))
        .collect();
    for id in &ids {
        let st = srv.wait_final(id, secs(10));
        assert_eq!(state(&st), "failed", "{st}");
        assert_eq!(st["attempt"], 1, "not retried: {st}");
        assert!(error(&st).contains("max_result_bytes"), "{st}");
        assert!(st["result"].is_null(), "{st}");
    }
    let mut runs = lines(&srv, "runs");
    runs.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(runs, want, "each ran once");
}

#[test]
fn a_missing_interpreter_fails_with_could_not_start() {
    let srv = common::server()
        .handler("broken", "#!/nonexistent/interpreter\nprint('hi')\n")
        .start();
    let id = srv.submit("broken", "{}");
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "failed", "{st}");
    let err = error(&st);
    assert!(err.contains("could not start"), "{err}");
    assert!(
        err.contains("handlers/broken"),
        "the error should name the handler: {err}"
    );
    let server_dir = srv.dir.path().to_str().unwrap();
    assert!(
        !err.contains(server_dir),
        "no server paths in what clients read: {err}"
    );
    assert_eq!(st["attempt"], 1, "{st}");
    assert!(common::names(&srv.spool.join("queue")).is_empty());
    // The server keeps working.
    let again = srv.submit("broken", "{}");
    assert_eq!(state(&srv.wait_final(&again, secs(10))), "failed");
}

// ---------------------------------------------------------------------------
// Concurrency
// ---------------------------------------------------------------------------

const LOGGED_BLOCKER: &str = r#"echo "start $SPOOL_ID" >> "$T/log"
wait_for go
echo "end $SPOOL_ID" >> "$T/log""#;

#[test]
fn global_concurrency_limits_running_handlers() {
    let srv = common::server()
        .handler("blk", &script(LOGGED_BLOCKER))
        .config("concurrency = 2")
        .start();
    let ids: Vec<String> = (0..5).map(|_| srv.submit("blk", "{}")).collect();
    wait_until(secs(10), "2 handlers running", || {
        count(&census(&srv, &ids), "running") == 2
    });
    holds_for(Duration::from_millis(600), "2 running, 3 queued", || {
        let c = census(&srv, &ids);
        let started = lines(&srv, "log").len();
        if count(&c, "running") == 2 && count(&c, "queued") == 3 && started == 2 {
            Ok(())
        } else {
            Err(format!("{c:?}, {started} started"))
        }
    });
    release(&srv, "go");
    for id in &ids {
        assert_eq!(state(&srv.wait_final(id, secs(10))), "succeeded");
    }
    let log = lines(&srv, "log");
    assert_eq!(log.len(), 10, "{log:?}");
    assert_eq!(max_overlap(&log), 2, "{log:?}");
}

#[test]
fn per_type_concurrency_from_toml_runs_one_at_a_time_in_order() {
    let srv = common::server()
        .handler("solo", &script(LOGGED_BLOCKER))
        .handler_toml("solo", "concurrency = 1\n")
        .handler("free", "#!/bin/sh\necho free\n")
        .start();
    let ids: Vec<String> = (0..3).map(|_| srv.submit("solo", "{}")).collect();
    wait_until(secs(10), "1 solo handler running", || {
        count(&census(&srv, &ids), "running") == 1
    });
    assert_eq!(state(&srv.status(&ids[0])), "running", "FIFO");
    holds_for(Duration::from_millis(600), "1 running, 2 queued", || {
        let c = census(&srv, &ids);
        if count(&c, "running") == 1 && count(&c, "queued") == 2 {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        }
    });
    // Another type is not held up by this type's limit.
    let f = srv.submit("free", "{}");
    assert_eq!(state(&srv.wait_final(&f, secs(10))), "succeeded");
    assert_eq!(count(&census(&srv, &ids), "running"), 1);

    release(&srv, "go");
    for id in &ids {
        assert_eq!(state(&srv.wait_final(id, secs(10))), "succeeded");
    }
    let log = lines(&srv, "log");
    assert_eq!(max_overlap(&log), 1, "{log:?}");
    let starts: Vec<&str> = log
        .iter()
        .filter_map(|l| l.strip_prefix("start "))
        .collect();
    assert_eq!(starts, ids, "events of one type start in submit order");
}

// ---------------------------------------------------------------------------
// Cancellation
// ---------------------------------------------------------------------------

#[test]
fn cancelling_a_queued_event_means_its_handler_never_runs() {
    let srv = common::server()
        .handler(
            "solo",
            &script(
                r#"echo "$SPOOL_ID" >> "$T/runs"
wait_for go"#,
            ),
        )
        .handler_toml("solo", "concurrency = 1\n")
        .start();
    let first = srv.submit("solo", "{}");
    wait_until(secs(10), "the first to run", || {
        state(&srv.status(&first)) == "running"
    });
    let second = srv.submit("solo", "{}");
    assert_eq!(state(&srv.status(&second)), "queued");
    let r = srv.delete(&format!("/events/{second}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(state(&r.json()), "cancelled", "{}", r.text());
    let st = srv.status(&second);
    assert_eq!(state(&st), "cancelled", "{st}");
    assert_eq!(st["attempt"], 0, "it never started: {st}");
    // Cancelling twice: it already ended.
    assert_eq!(srv.delete(&format!("/events/{second}")).status, 409);

    release(&srv, "go");
    // A later event of the same type runs after the first: had the cancelled
    // one been started, it would have run before this one (FIFO).
    let third = srv.submit("solo", "{}");
    assert_eq!(state(&srv.wait_final(&first, secs(10))), "succeeded");
    assert_eq!(state(&srv.wait_final(&third, secs(10))), "succeeded");
    assert_eq!(lines(&srv, "runs"), [first, third]);
    assert_eq!(state(&srv.status(&second)), "cancelled");
    assert!(common::names(&srv.spool.join("queue")).is_empty());
    wait_until(secs(3), "no claims left", || {
        common::names(&srv.spool.join("running").join("testhost")).is_empty()
    });
}

#[test]
fn cancelling_a_running_event_kills_its_process_group() {
    let srv = common::server()
        .handler(
            "long",
            &script(
                r#"echo "$SPOOL_ATTEMPT" >> "$T/attempts"
sleep 1000 &
echo $! > "$T/grandchild"
echo $$ > "$T/leader"
wait_for never"#,
            ),
        )
        .start();
    let id = srv.submit("long", "{}");
    let leader = read_pid(&srv, "leader");
    let grandchild = read_pid(&srv, "grandchild");
    let _reap = Reap(vec![leader, grandchild]);
    assert_eq!(state(&srv.status(&id)), "running");
    let r = srv.delete(&format!("/events/{id}"));
    assert!(r.status == 200 || r.status == 202, "{}", r.text());
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "cancelled", "{st}");
    assert_eq!(st["attempt"], 1);
    wait_until(secs(3), "the cancelled handler's group to be gone", || {
        !process_alive(leader) && !process_alive(grandchild)
    });
    assert_eq!(lines(&srv, "attempts"), ["1"], "a cancel is not retried");
    assert_eq!(srv.delete(&format!("/events/{id}")).status, 409);
    assert!(common::names(&srv.spool.join("queue")).is_empty());
}

// ---------------------------------------------------------------------------
// Idempotency
// ---------------------------------------------------------------------------

#[test]
fn fifty_concurrent_posts_with_one_idempotency_key_make_one_event() {
    let srv = common::server()
        .handler(
            "once",
            "#!/bin/sh\necho \"$SPOOL_ID\" >> \"$SPOOL_DIR/../runs\"\ncat\n",
        )
        .start();
    let addr = srv.addr;
    let body = r#"{"order": 1234}"#;
    let n = 50;
    let barrier = Arc::new(Barrier::new(n));
    let threads: Vec<_> = (0..n)
        .map(|_| {
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                barrier.wait();
                let r = common::request(
                    addr,
                    "POST",
                    "/events/once",
                    &[
                        ("content-type", "application/json"),
                        ("idempotency-key", "order-1234"),
                    ],
                    body.as_bytes(),
                );
                (r.status, r.text())
            })
        })
        .collect();
    let mut codes: HashMap<u16, usize> = HashMap::new();
    let mut ids = BTreeSet::new();
    for t in threads {
        let (code, text) = t.join().unwrap();
        *codes.entry(code).or_default() += 1;
        assert!(code == 200 || code == 202, "{code}: {text}");
        let v: Value = serde_json::from_str(&text).unwrap();
        ids.insert(v["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(ids.len(), 1, "every response names the same event: {ids:?}");
    assert_eq!(codes.get(&202), Some(&1), "exactly one 202: {codes:?}");
    assert_eq!(codes.get(&200), Some(&(n - 1)), "{codes:?}");
    let id = ids.into_iter().next().unwrap();
    assert_eq!(
        common::names(&srv.spool.join("events")),
        std::slice::from_ref(&id)
    );
    assert_eq!(common::names(&srv.spool.join("idem")).len(), 1);
    let st = srv.wait_final(&id, secs(10));
    assert_eq!(state(&st), "succeeded", "{st}");
    assert_eq!(srv.get(&format!("/events/{id}/result")).text(), body);
    // Once more after it finished: still the same event, not run again.
    let again = common::request(
        addr,
        "POST",
        "/events/once",
        &[
            ("content-type", "application/json"),
            ("idempotency-key", "order-1234"),
        ],
        body.as_bytes(),
    );
    assert_eq!(again.status, 200, "{}", again.text());
    assert_eq!(again.json()["id"], id.as_str());
    assert_eq!(state(&again.json()), "succeeded");
    // The same key with another body is a conflict, not a new event.
    let other = common::request(
        addr,
        "POST",
        "/events/once",
        &[
            ("content-type", "application/json"),
            ("idempotency-key", "order-1234"),
        ],
        br#"{"order": 9}"#,
    );
    assert_eq!(other.status, 422, "{}", other.text());
    assert_eq!(common::names(&srv.spool.join("events")).len(), 1);
    assert_eq!(lines(&srv, "runs"), [id]);
}

// ---------------------------------------------------------------------------
// Events placed in the spool by another process
// ---------------------------------------------------------------------------

#[test]
fn an_event_written_into_the_spool_by_hand_is_picked_up() {
    let srv = common::server()
        .handler("echo", "#!/bin/sh\nprintf 'got: '\ncat\n")
        .start();
    // One published by rename (a watcher sees it at once), one written in
    // place (a create of an empty file first: the rescan must still get it).
    let a = common::make_ulid();
    common::write_event_by_hand(&srv.spool, &a, "echo", r#"{"n": 1}"#);
    let staged = srv.spool.join("tmp").join(format!("other.1.{a}"));
    fs::write(&staged, br#"{"type":"echo"}"#).unwrap();
    fs::rename(&staged, srv.spool.join("queue").join(&a)).unwrap();

    let b = common::make_ulid();
    common::write_event_by_hand(&srv.spool, &b, "echo", r#"{"n": 2}"#);
    fs::write(srv.spool.join("queue").join(&b), br#"{"type":"echo"}"#).unwrap();

    for (id, n) in [(&a, 1), (&b, 2)] {
        let st = srv.wait_final(id, secs(10));
        assert_eq!(state(&st), "succeeded", "{st}");
        assert_eq!(st["attempt"], 1);
        assert_eq!(
            srv.get(&format!("/events/{id}/result")).text(),
            format!("got: {{\"n\": {n}}}")
        );
    }
    assert!(common::names(&srv.spool.join("queue")).is_empty());
}

#[test]
fn an_absurd_timeout_in_a_handler_toml_is_refused_and_dispatch_goes_on() {
    let srv = common::server()
        .handler("forever", "#!/bin/sh\necho never\n")
        .handler("fine", "#!/bin/sh\necho fine\n")
        .start();
    let id = srv.submit("forever", "{}");
    // Edited while an event of the type waits: neither submit nor dispatch may crash.
    std::fs::write(srv.handlers.join("forever.toml"), "timeout = 1e20\n").unwrap();
    let r = srv.post("/events/forever", "{}");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(r.text().contains("forever.toml"), "{}", r.text());
    let other = srv.submit("fine", "{}");
    assert_eq!(
        srv.wait_final(&other, Duration::from_secs(10))["state"],
        "succeeded"
    );
    let st = srv.wait_final(&id, Duration::from_secs(10));
    assert!(
        st["state"] == "succeeded" || st["error"].as_str().unwrap_or("").contains("timeout"),
        "{st}"
    );
}

#[test]
fn retention_deletes_finished_events_and_keeps_unfinished_ones() {
    let srv = common::server()
        .handler("echo", "#!/bin/sh\ncat\n")
        .handler("held", common::BLOCKING)
        .config("retention = \"1s\"\ngc_interval = \"200ms\"")
        .start();
    let done = srv.submit("echo", "{}");
    let held = srv.submit("held", "{}");
    assert_eq!(srv.wait_final(&done, secs(10))["state"], "succeeded");
    let gone = srv.spool.join("events").join(&done);
    common::wait_until(secs(15), "the finished event is swept", || !gone.exists());
    assert_eq!(srv.get(&format!("/events/{done}")).status, 404);
    // Older than the retention too, but not finished: kept, and it still runs.
    assert_eq!(common::state(&srv.status(&held)), "running");
    release(&srv, &format!("go-{held}"));
    assert_eq!(srv.wait_final(&held, secs(10))["state"], "succeeded");
}
