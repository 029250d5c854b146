//! The example handlers shipped in handlers/ work as the README says.

mod common;

use std::path::Path;
use std::time::Duration;

fn with_bundled_handlers() -> common::Server {
    let bundled = Path::new(env!("CARGO_MANIFEST_DIR")).join("handlers");
    let mut b = common::server();
    for name in ["report", "stats"] {
        b = b.handler(name, &std::fs::read_to_string(bundled.join(name)).unwrap());
    }
    b.handler_toml(
        "report",
        &std::fs::read_to_string(bundled.join("report.toml")).unwrap(),
    )
    .symlink("echo", &std::fs::read_link(bundled.join("echo")).unwrap())
    .start()
}

#[test]
fn report_steps_through_progress_and_returns_xml() {
    let srv = with_bundled_handlers();
    let id = srv.submit(
        "report",
        r#"{"steps": 3, "delay": 0.05, "title": "Customers"}"#,
    );
    let mut stream = common::sse(srv.addr, &format!("/events/{id}/stream"), &[]);
    let events = stream.until("end", Duration::from_secs(20));
    let messages: Vec<String> = events
        .iter()
        .filter(|e| e.event.is_some())
        .filter_map(|e| {
            e.json()
                .get("message")
                .and_then(|m| m.as_str())
                .map(String::from)
        })
        .collect();
    assert!(
        messages.iter().any(|m| m == "on iteration 3 of 3"),
        "{messages:?}"
    );
    let end = events.last().unwrap().json();
    assert_eq!(end["state"], "succeeded");
    let r = srv.get(&format!("/events/{id}/result"));
    assert_eq!(r.header("content-type"), Some("text/xml"));
    let xml = r.text();
    assert!(
        xml.starts_with("<?xml")
            && xml.contains("<title>Customers</title>")
            && xml.contains("row 3 of 3"),
        "{xml}"
    );
}

#[test]
fn report_rejects_bad_steps_without_retrying() {
    let srv = with_bundled_handlers();
    let id = srv.submit("report", r#"{"steps": "many"}"#);
    let st = srv.wait_final(&id, Duration::from_secs(10));
    assert_eq!(st["state"], "failed");
    assert_eq!(st["attempt"], 1);
    assert!(
        st["error"]
            .as_str()
            .unwrap()
            .contains("steps must be a whole number"),
        "{st}"
    );
}

#[test]
fn stats_in_python_computes_and_reports() {
    let srv = with_bundled_handlers();
    let id = srv.submit(
        "stats",
        r#"{"numbers": [2, 4, 4, 4, 5, 5, 7, 9], "delay": 0}"#,
    );
    let st = srv.wait_final(&id, Duration::from_secs(20));
    assert_eq!(st["state"], "succeeded", "{st}");
    assert_eq!(st["message"], "computed max");
    let result = srv.get(&format!("/events/{id}/result")).json();
    assert_eq!(result["mean"], 5.0);
    assert_eq!(result["stdev"], 2.0);
    assert_eq!(
        srv.get(&format!("/events/{id}/result"))
            .header("content-type"),
        Some("application/json")
    );
}

#[test]
fn echo_is_a_symlink_to_cat_and_returns_the_payload() {
    let srv = with_bundled_handlers();
    let id = srv.submit("echo", r#"{"hello": "world"}"#);
    assert_eq!(
        srv.wait_final(&id, Duration::from_secs(10))["state"],
        "succeeded"
    );
    assert_eq!(
        srv.get(&format!("/events/{id}/result")).text(),
        r#"{"hello": "world"}"#
    );
}

#[test]
fn the_handler_list_shows_the_examples() {
    let srv = with_bundled_handlers();
    assert_eq!(
        srv.get("/handlers").json(),
        serde_json::json!(["echo", "report", "stats"])
    );
}
