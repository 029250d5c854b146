//! The command line: submit (with and without --wait), status, report, and the
//! errors `serve` gives for bad set-ups.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::BIN;

fn spoold(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("SPOOL_PROGRESS")
        .output()
        .expect("run spoold")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const PROGRESS_HANDLER: &str = r#"#!/bin/sh
cat > /dev/null
spoold report --progress 50 --message "half way"
# Work between reports: statuses are conflated, so two reports within one
# progress_interval may show only the second.
sleep 0.3
spoold report --message "almost"
echo '{"answer": 42}'
"#;

#[test]
fn submit_prints_the_id_and_status_prints_its_json() {
    let srv = common::server().handler("work", PROGRESS_HANDLER).start();
    let url = format!("http://{}", srv.addr);
    let out = spoold(&["submit", "work", r#"{"n": 1}"#, "--server", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 26, "stdout is just the ID: {id:?}");
    srv.wait_final(&id, Duration::from_secs(10));
    let out = spoold(&["status", &id, "--server", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["state"], "succeeded");
    // `report --message` alone keeps the progress reported before it.
    assert_eq!(status["message"], "almost");
}

#[test]
fn submit_wait_shows_progress_and_prints_the_result() {
    let srv = common::server().handler("work", PROGRESS_HANDLER).start();
    let url = format!("http://{}", srv.addr);
    let out = spoold(&["submit", "work", "{}", "--wait", "--server", &url]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "{\"answer\": 42}\n");
    let progress = text(&out.stderr);
    assert!(
        progress.contains("half way"),
        "stderr shows progress messages: {progress}"
    );
    assert!(progress.contains("succeeded"), "{progress}");
}

#[test]
fn submit_wait_exits_1_when_the_event_fails() {
    let srv = common::server()
        .handler("bad", "#!/bin/sh\necho 'no such customer' >&2\nexit 65\n")
        .start();
    let url = format!("http://{}", srv.addr);
    let out = spoold(&["submit", "bad", "{}", "--wait", "--server", &url]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no such customer"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn submit_reads_the_payload_from_a_file_and_stdin() {
    let srv = common::server()
        .symlink("echo", std::path::Path::new("/bin/cat"))
        .start();
    let url = format!("http://{}", srv.addr);
    let file = srv.dir.path().join("payload.json");
    std::fs::write(&file, r#"{"from": "file"}"#).unwrap();
    let out = spoold(&[
        "submit",
        "echo",
        &format!("@{}", file.display()),
        "--wait",
        "--server",
        &url,
    ]);
    assert_eq!(
        text(&out.stdout),
        r#"{"from": "file"}"#,
        "{}",
        text(&out.stderr)
    );

    let mut child = Command::new(BIN)
        .args(["submit", "echo", "-", "--wait", "--server", &url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(br#"{"from": "stdin"}"#)
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        text(&out.stdout),
        r#"{"from": "stdin"}"#,
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn client_errors_say_what_to_do() {
    let srv = common::server().handler("work", PROGRESS_HANDLER).start();
    let url = format!("http://{}", srv.addr);

    let out = spoold(&["submit", "work", "{not json", "--server", &url]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("not valid JSON"),
        "{}",
        text(&out.stderr)
    );

    let out = spoold(&["submit", "nosuch", "{}", "--server", &url]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("put an executable named nosuch"),
        "{}",
        text(&out.stderr)
    );

    let out = spoold(&["status", "01ARZ3NDEKTSV4RRFFQ69G5FAV", "--server", &url]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("no event"),
        "{}",
        text(&out.stderr)
    );

    // Nothing listens on port 9 of loopback.
    let out = spoold(&[
        "status",
        "01ARZ3NDEKTSV4RRFFQ69G5FAV",
        "--server",
        "http://127.0.0.1:9",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("is `spoold serve` running"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn report_outside_a_handler_explains_itself() {
    let out = spoold(&["report", "--progress", "10"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("SPOOL_PROGRESS is not set"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn report_writes_progress_atomically_and_merges_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("progress.json");
    let run = |args: &[&str]| {
        Command::new(BIN)
            .arg("report")
            .args(args)
            .env("SPOOL_PROGRESS", &path)
            .output()
            .unwrap()
    };
    assert!(run(&["--progress", "40", "--message", "four"])
        .status
        .success());
    assert!(run(&["--data", r#"{"rows": 3}"#]).status.success());
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    assert_eq!(
        v,
        serde_json::json!({"progress": 40.0, "message": "four", "data": {"rows": 3}})
    );
    assert_eq!(
        common::names(dir.path()),
        vec!["progress.json"],
        "no temp file is left behind"
    );
    let bad = run(&["--data", "{oops"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(text(&bad.stderr).contains("--data must be JSON"));
}

#[test]
fn serve_refuses_a_public_address_without_insecure() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let out = spoold(&[
        "serve",
        "--listen",
        "0.0.0.0:0",
        "--spool",
        spool.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("refusing to listen on 0.0.0.0:0") && err.contains("--insecure"),
        "{err}"
    );
}

#[test]
fn a_second_spoold_with_the_same_spool_and_host_id_refuses_and_touches_nothing() {
    let srv = common::server().handler("held", common::BLOCKING).start();
    let id = srv.submit("held", "{}");
    common::wait_until(common::secs(10), "the handler runs", || {
        common::state(&srv.status(&id)) == "running"
    });
    let out = spoold(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--spool",
        srv.spool.to_str().unwrap(),
        "--handlers",
        srv.handlers.to_str().unwrap(),
        "--host-id",
        "testhost",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!("another spoold (pid {})", srv.pid())) && err.contains("--host-id"),
        "{err}"
    );
    // The first one's claim and run are untouched.
    assert_eq!(common::state(&srv.status(&id)), "running");
    assert_eq!(
        common::names(&srv.spool.join("running").join("testhost")),
        vec![id.clone()]
    );
    std::fs::write(srv.dir.path().join(format!("go-{id}")), b"").unwrap();
    assert_eq!(srv.wait_final(&id, common::secs(10))["attempt"], 1);
}

#[test]
fn serve_refuses_a_spool_of_another_format() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    std::fs::write(spool.join("FORMAT"), "spoold-spool 99\n").unwrap();
    let out = spoold(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--spool",
        spool.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("another format") && err.contains("spoold-spool 99"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(spool.join("FORMAT")).unwrap(),
        "spoold-spool 99\n",
        "the spool is left as it was"
    );
}

#[test]
fn serve_rejects_an_unknown_config_key_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("spoold.toml");
    std::fs::write(&config, "concurency = 4\n").unwrap();
    let out = spoold(&[
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("concurency") && err.contains("docs/configuration.md"),
        "{err}"
    );
}

#[test]
fn serve_stops_cleanly_on_sigterm() {
    let mut srv = common::server().handler("work", PROGRESS_HANDLER).start();
    let id = srv.submit("work", "{}");
    srv.wait_final(&id, Duration::from_secs(10));
    assert_eq!(srv.stop(), Some(0));
}
