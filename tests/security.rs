//! Secure defaults: bearer tokens with scopes, the refusal to listen in the
//! open without them, and the CORS allowlist.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{request, secs, Server, BIN};
use serde_json::Value;

const READER: &str = "reader-token-0123456789";
const WEBAPP: &str = "webapp+token/0123456789=";
const OPS: &str = "ops-token-0123456789abcd";

fn tokens_file() -> String {
    format!(
        "# name  scopes       token\n\
         reader  read         {READER}\n\
         webapp  submit,read  {WEBAPP}\n\
         ops     admin        {OPS}   # everything\n"
    )
}

fn secured() -> Server {
    common::server()
        .handler("echo", "#!/bin/sh\ncat\n")
        .file("tokens", &tokens_file(), 0o600)
        .config("tokens_file = \"tokens\"")
        .start()
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn call(srv: &Server, method: &str, path: &str, token: Option<&str>, body: &str) -> common::Resp {
    let auth = token.map(bearer);
    let mut headers = vec![("content-type", "application/json")];
    if let Some(a) = &auth {
        headers.push(("authorization", a.as_str()));
    }
    request(srv.addr, method, path, &headers, body.as_bytes())
}

fn problem(r: &common::Resp) -> Value {
    assert_eq!(
        r.header("content-type"),
        Some("application/problem+json"),
        "{}",
        r.text()
    );
    r.json()
}

#[test]
fn without_a_token_the_api_answers_401_with_a_bearer_challenge() {
    let srv = secured();
    let r = call(&srv, "POST", "/events/echo", None, "{}");
    assert_eq!(r.status, 401);
    assert_eq!(
        r.header("www-authenticate"),
        Some("Bearer realm=\"spoold\"")
    );
    let p = problem(&r);
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("Authorization: Bearer"),
        "{p}"
    );

    let r = call(
        &srv,
        "GET",
        "/events/01ARZ3NDEKTSV4RRFFQ69G5FAV",
        Some("not-a-known-token-at-all"),
        "",
    );
    assert_eq!(r.status, 401);
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("invalid_token"));

    let r = request(
        srv.addr,
        "GET",
        "/handlers",
        &[("authorization", "Basic cmVhZGVyOng=")],
        b"",
    );
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(problem(&r)["detail"]
        .as_str()
        .unwrap()
        .contains("Bearer TOKEN"));

    // Probes and the static demo page need no token.
    assert_eq!(srv.get("/healthz").status, 200);
    assert_eq!(srv.get("/").status, 200);
}

#[test]
fn each_scope_opens_its_routes_only() {
    let srv = secured();
    // read may not submit, and the answer names the scope needed.
    let r = call(&srv, "POST", "/events/echo", Some(READER), "{}");
    assert_eq!(r.status, 403);
    let p = problem(&r);
    assert_eq!(p["scope"], "submit");
    assert!(p["detail"].as_str().unwrap().contains("\"reader\""), "{p}");
    assert!(r
        .header("www-authenticate")
        .unwrap()
        .contains("insufficient_scope"));

    let r = call(&srv, "POST", "/events/echo", Some(WEBAPP), r#"{"n": 1}"#);
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let mut done = Value::Null;
    common::wait_until(secs(10), "the event succeeds", || {
        done = call(&srv, "GET", &format!("/events/{id}"), Some(READER), "").json();
        done["state"] == "succeeded"
    });
    assert_eq!(done["attempt"], 1);
    let r = call(
        &srv,
        "GET",
        &format!("/events/{id}/result"),
        Some(READER),
        "",
    );
    assert_eq!((r.status, r.text().as_str()), (200, r#"{"n": 1}"#));

    // cancel and admin are scopes of their own; admin may do everything.
    assert_eq!(
        call(&srv, "DELETE", &format!("/events/{id}"), Some(WEBAPP), "").status,
        403
    );
    assert_ne!(
        call(&srv, "DELETE", &format!("/events/{id}"), Some(OPS), "").status,
        403
    );
    assert_eq!(call(&srv, "GET", "/metrics", Some(WEBAPP), "").status, 403);
    assert_eq!(call(&srv, "GET", "/metrics", Some(OPS), "").status, 200);
    assert_eq!(
        call(&srv, "POST", "/events/echo", Some(OPS), "{}").status,
        202
    );
}

#[test]
fn browsers_carry_the_token_in_the_query_of_gets_only() {
    let srv = secured();
    let id = call(&srv, "POST", "/events/echo", Some(WEBAPP), "{}").json()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let q = "access_token=webapp%2Btoken%2F0123456789%3D";
    // An EventSource cannot send headers: the stream takes the query token.
    let mut sse = common::sse(srv.addr, &format!("/events/{id}/stream?{q}"), &[]);
    assert_eq!(sse.status, 200);
    let end = sse.until("end", secs(10));
    assert_eq!(end.last().unwrap().json()["state"], "succeeded");

    // The wait page hands the token on in its own links.
    let r = request(
        srv.addr,
        "GET",
        &format!("/events/{id}?{q}"),
        &[("accept", "text/html")],
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains(&format!("/events/{id}/result?{q}")),
        "{}",
        r.text()
    );
    assert_eq!(r.header("referrer-policy"), Some("no-referrer"));

    // Never on a request that changes something, and never twice.
    let r = call(&srv, "POST", &format!("/events/echo?{q}"), None, "{}");
    assert_eq!(r.status, 400);
    assert_eq!(problem(&r)["type"], "/problems/token-in-query");
    let r = call(&srv, "GET", &format!("/events/{id}?{q}"), Some(WEBAPP), "");
    assert_eq!(r.status, 400);
}

#[test]
fn tokens_come_from_the_environment_too() {
    let srv = common::server()
        .handler("echo", "#!/bin/sh\ncat\n")
        .env(
            "SPOOLD_TOKENS",
            &format!("ci submit,read {WEBAPP}; ops admin {OPS}"),
        )
        .start();
    assert_eq!(call(&srv, "POST", "/events/echo", None, "{}").status, 401);
    assert_eq!(
        call(&srv, "POST", "/events/echo", Some(WEBAPP), "{}").status,
        202
    );
    assert_eq!(call(&srv, "GET", "/metrics", Some(OPS), "").status, 200);
}

#[test]
fn the_cli_sends_spoold_token() {
    let srv = secured();
    let url = format!("http://{}", srv.addr);
    let out = Command::new(BIN)
        .args(["submit", "echo", r#"{"hi": 1}"#, "--wait", "--server", &url])
        .env("SPOOLD_TOKEN", WEBAPP)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), r#"{"hi": 1}"#);

    let out = Command::new(BIN)
        .args(["submit", "echo", "{}", "--server", &url])
        .env_remove("SPOOLD_TOKEN")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("requires a token"), "{err}");
}

fn serve_fails(args: &[&str], config: Option<&str>, envs: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("serve")
        .arg("--spool")
        .arg(dir.path().join("spool"))
        .arg("--handlers")
        .arg(dir.path())
        .args(args)
        .env_remove("SPOOLD_TOKENS");
    if let Some(text) = config {
        let path = dir.path().join("spoold.toml");
        std::fs::write(&path, text).unwrap();
        cmd.arg("--config").arg(path);
    }
    cmd.envs(envs.iter().copied());
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            assert_eq!(st.code(), Some(2), "serve {args:?} should fail with 2");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("serve {args:?} started; it should have refused");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut err = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(
        !std::path::Path::new(&dir.path().join("spool")).exists(),
        "a refused start must not create the spool"
    );
    err
}

#[test]
fn bad_token_setups_refuse_to_start_with_the_fix() {
    let e = serve_fails(&[], None, &[("SPOOLD_TOKENS", "ci submit short")]);
    assert!(
        e.contains("SPOOLD_TOKENS, line 1") && e.contains("at least 16"),
        "{e}"
    );
    let e = serve_fails(
        &[],
        None,
        &[("SPOOLD_TOKENS", &format!("ci write {WEBAPP}"))],
    );
    assert!(
        e.contains("not a scope") && e.contains("submit, read, cancel and admin"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tokens");
    std::fs::write(&file, tokens_file()).unwrap();
    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let e = serve_fails(&["--tokens", file.to_str().unwrap()], None, &[]);
    assert!(
        e.contains("writable by everyone") && e.contains("chmod 600"),
        "{e}"
    );

    let e = serve_fails(&[], Some("cors_origins = [\"*\"]"), &[]);
    assert!(e.contains("only allowed together with tokens"), "{e}");
    let e = serve_fails(
        &[],
        Some("cors_origins = [\"https://app.example.com/\"]"),
        &[],
    );
    assert!(e.contains("is not an origin"), "{e}");
}

#[test]
fn a_public_address_is_allowed_with_tokens() {
    let srv = common::server()
        .handler("echo", "#!/bin/sh\ncat\n")
        .file("tokens", &tokens_file(), 0o600)
        .config("tokens_file = \"tokens\"")
        .listen("0.0.0.0:0")
        .start();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", srv.addr.port()).parse().unwrap();
    let r = request(
        addr,
        "GET",
        "/handlers",
        &[("authorization", &bearer(READER))],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(request(addr, "GET", "/handlers", &[], b"").status, 401);
}

fn with_cors() -> Server {
    common::server()
        .handler("echo", "#!/bin/sh\ncat\n")
        .config("cors_origins = [\"https://app.example.com\"]")
        .start()
}

#[test]
fn cors_preflight_lets_listed_origins_send_last_event_id() {
    let srv = with_cors();
    let pre = |origin: &str| {
        request(
            srv.addr,
            "OPTIONS",
            "/events/01ARZ3NDEKTSV4RRFFQ69G5FAV/stream",
            &[
                ("origin", origin),
                ("access-control-request-method", "GET"),
                (
                    "access-control-request-headers",
                    "last-event-id, authorization",
                ),
            ],
            b"",
        )
    };
    let r = pre("https://app.example.com");
    assert_eq!(r.status, 204);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    let allowed = r
        .header("access-control-allow-headers")
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("last-event-id") && allowed.contains("authorization"),
        "{allowed}"
    );
    assert!(r
        .header("access-control-allow-methods")
        .unwrap()
        .contains("DELETE"));
    assert_eq!(r.header("access-control-allow-credentials"), None);

    let r = pre("https://evil.example");
    assert_eq!(r.status, 403);
    assert_eq!(r.header("access-control-allow-origin"), None);
    assert!(problem(&r)["detail"]
        .as_str()
        .unwrap()
        .contains("cors_origins"));
}

#[test]
fn cors_answers_name_only_listed_origins_and_let_them_submit() {
    let srv = with_cors();
    let r = request(
        srv.addr,
        "POST",
        "/events/echo",
        &[
            ("origin", "https://app.example.com"),
            ("sec-fetch-site", "cross-site"),
            ("content-type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("https://app.example.com")
    );
    assert!(r
        .header("access-control-expose-headers")
        .unwrap()
        .contains("Location"));
    assert!(r.header("vary").unwrap().contains("Origin"));
    assert_eq!(r.header("access-control-allow-credentials"), None);

    let r = request(
        srv.addr,
        "POST",
        "/events/echo",
        &[
            ("origin", "https://evil.example"),
            ("content-type", "application/json"),
        ],
        b"{}",
    );
    assert_eq!(r.status, 403);
    assert_eq!(r.header("access-control-allow-origin"), None);
    let r = request(
        srv.addr,
        "GET",
        "/handlers",
        &[("origin", "https://evil.example")],
        b"",
    );
    assert_eq!(r.header("access-control-allow-origin"), None);
}

#[test]
fn a_types_name_is_never_a_path() {
    let srv = common::server().handler("echo", "#!/bin/sh\ncat\n").start();
    std::fs::write(srv.dir.path().join("outside"), "#!/bin/sh\necho pwned\n").unwrap();
    for kind in [
        "..%2Foutside",
        "%2E%2E",
        ".hidden",
        "a%00b",
        "echo%2F..%2F..%2Foutside",
        "echo.toml",
    ] {
        let r = srv.post(&format!("/events/{kind}"), "{}");
        assert!(
            r.status == 400 || r.status == 404,
            "{kind}: {} {}",
            r.status,
            r.text()
        );
        assert!(
            !r.text().contains(srv.dir.path().to_str().unwrap()),
            "no server paths: {}",
            r.text()
        );
    }
    assert!(common::names(&srv.spool.join("queue")).is_empty());
}

#[test]
fn handlers_get_a_clean_environment_without_spoolds_secrets() {
    let srv = common::server()
        .handler("envdump", "#!/bin/sh\nenv\n")
        .env("SPOOLD_TOKENS", &format!("ops admin {OPS}"))
        .env("SECRET_OF_THE_OPERATOR", "hunter2")
        .start();
    let r = call(&srv, "POST", "/events/envdump", Some(OPS), "{}");
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.json()["id"].as_str().unwrap().to_owned();
    common::wait_until(secs(10), "the handler ran", || {
        call(&srv, "GET", &format!("/events/{id}"), Some(OPS), "").json()["state"] == "succeeded"
    });
    let env = call(&srv, "GET", &format!("/events/{id}/result"), Some(OPS), "").text();
    assert!(env.contains(&format!("SPOOL_ID={id}")), "{env}");
    assert!(
        !env.contains(OPS) && !env.contains("SPOOLD_TOKENS"),
        "{env}"
    );
    assert!(!env.contains("hunter2"), "{env}");
    let names: Vec<&str> = env.lines().filter_map(|l| l.split('=').next()).collect();
    for name in &names {
        assert!(
            name.starts_with("SPOOL_") || ["PATH", "LANG", "PWD", "SHLVL", "_"].contains(name),
            "unexpected variable {name} in a handler's environment: {env}"
        );
    }
}

#[test]
fn a_result_swapped_for_a_symlink_or_cut_short_is_never_served() {
    let srv = common::server().handler("echo", "#!/bin/sh\ncat\n").start();
    let id = srv.submit("echo", r#"{"n": 12345}"#);
    assert_eq!(srv.wait_final(&id, secs(10))["state"], "succeeded");
    let result = srv.spool.join("events").join(&id).join("result");
    // A process the handler left behind swaps the result for a link to
    // something outside the spool after the event ended.
    let outside = srv.dir.path().join("outside");
    std::fs::write(&outside, "TOP SECRET, not a result").unwrap();
    std::fs::remove_file(&result).unwrap();
    std::os::unix::fs::symlink(&outside, &result).unwrap();
    let r = srv.get(&format!("/events/{id}/result"));
    assert_eq!(r.status, 500);
    assert!(!r.text().contains("TOP SECRET"), "{}", r.text());
    // Cut short by hand: damaged, not served short.
    std::fs::remove_file(&result).unwrap();
    std::fs::write(&result, r#"{"n": 1"#).unwrap();
    let r = srv.get(&format!("/events/{id}/result"));
    assert_eq!(r.status, 500);
    assert!(
        r.json()["detail"].as_str().unwrap().contains("damaged"),
        "{}",
        r.text()
    );
    assert!(!r.text().contains(srv.dir.path().to_str().unwrap()));
}
