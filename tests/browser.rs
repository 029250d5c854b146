//! The demo page and the wait page in a real browser: headless Chromium
//! driven over WebDriver (chromedriver), against the real server.
//!
//! Needs Debian's `chromium` and `chromium-driver`; `.ci/run` installs them.
//! Without them the tests print why and pass, so `cargo test` still works on a
//! machine without a browser; under CI (`CI` set, as `.ci/run` runs) or with
//! SPOOLD_REQUIRE_BROWSER=1 a missing browser is a failure.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const DRIVER: &str = "/usr/bin/chromedriver";
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// One request to chromedriver, its JSON answer; None when the connection
/// fails or the answer is not JSON (no panic: the callers retry).
fn driver_call(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<Value> {
    let headers = [("content-type", "application/json")];
    let r = common::try_request(addr, method, path, &headers, body.as_bytes()).ok()?;
    serde_json::from_slice(&r.body).ok()
}

struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Option<Browser> {
        if !Path::new(DRIVER).exists() {
            assert!(
                std::env::var_os("SPOOLD_REQUIRE_BROWSER").is_none(),
                "{DRIVER} is missing: apt-get install chromium chromium-driver"
            );
            eprintln!("skipping: {DRIVER} is missing (apt-get install chromium chromium-driver)");
            return None;
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new(DRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        // Ready when its /status says so, not when its port first accepts:
        // a session asked for earlier was sometimes answered with nothing.
        common::wait_until(Duration::from_secs(20), "chromedriver ready", || {
            driver_call(addr, "GET", "/status", "").is_some_and(|v| v["value"]["ready"] == true)
        });
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     format!("--user-data-dir={}", profile.path().display()), "--window-size=1000,900"]}}}});
        let mut b = Browser {
            driver,
            addr,
            session: String::new(),
            _profile: profile,
        };
        // Chromium is started for the session; under load a start can
        // fail with an empty answer, so it is tried three times.
        let v = (0..3)
            .find_map(|_| driver_call(addr, "POST", "/session", &caps.to_string()))
            .unwrap_or_else(|| panic!("chromedriver gave no session three times"));
        b.session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        Some(b)
    }

    fn call(&self, method: &str, path: &str, body: &Value) -> Value {
        self.try_call(method, path, body)
            .unwrap_or_else(|e| panic!("WebDriver {method} {path}: {e}"))
    }

    /// One WebDriver command; the error value when the driver refuses it.
    fn try_call(&self, method: &str, path: &str, body: &Value) -> Result<Value, Value> {
        let path = if path == "/session" {
            path.to_owned()
        } else {
            format!("/session/{}{path}", self.session)
        };
        let body = if method == "GET" {
            Vec::new()
        } else {
            body.to_string().into_bytes()
        };
        let r = common::request(
            self.addr,
            method,
            &path,
            &[("content-type", "application/json")],
            &body,
        );
        let v = r.json();
        if r.status < 300 {
            Ok(v["value"].clone())
        } else {
            Err(v)
        }
    }

    fn goto(&self, url: &str) {
        self.call("POST", "/url", &json!({"url": url}));
    }

    fn find(&self, css: &str) -> String {
        let v = self.call(
            "POST",
            "/element",
            &json!({"using": "css selector", "value": css}),
        );
        v[ELEMENT].as_str().unwrap().to_owned()
    }

    fn text(&self, css: &str) -> String {
        let el = self.find(css);
        self.call("GET", &format!("/element/{el}/text"), &Value::Null)
            .as_str()
            .unwrap_or("")
            .to_owned()
    }

    fn script(&self, js: &str) -> Value {
        self.call("POST", "/execute/sync", &json!({"script": js, "args": []}))
    }

    /// The element's text, or None while the page is between documents
    /// (a reload leaves a moment with no element, or a stale one).
    fn try_text(&self, css: &str) -> Option<String> {
        let found = self
            .try_call(
                "POST",
                "/element",
                &json!({"using": "css selector", "value": css}),
            )
            .ok()?;
        let el = found[ELEMENT].as_str()?;
        let text = self
            .try_call("GET", &format!("/element/{el}/text"), &Value::Null)
            .ok()?;
        Some(text.as_str().unwrap_or("").to_owned())
    }

    fn wait_text(&self, css: &str, want: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let t = self.try_text(css).unwrap_or_default();
            if t.contains(want) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{css} never showed {want:?}; it shows {t:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn screenshot(&self, to: &Path) {
        use std::io::Write;
        let b64 = self.call("GET", "/screenshot", &Value::Null);
        let bytes = decode_base64(b64.as_str().unwrap());
        std::fs::File::create(to)
            .unwrap()
            .write_all(&bytes)
            .unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = common::request(
                self.addr,
                "DELETE",
                &format!("/session/{}", self.session),
                &[],
                b"",
            );
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let clean: Vec<u8> = s
        .bytes()
        .filter(|&c| c != b'=' && !c.is_ascii_whitespace())
        .collect();
    let mut out = Vec::with_capacity(clean.len() * 3 / 4);
    for chunk in clean.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &c)| {
            acc | (u32::from(val(c)) << (18 - 6 * i))
        });
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

const SLOW_STEPS: &str = r#"#!/bin/sh
cat > /dev/null
for i in 1 2 3; do
  sleep 0.2
  spoold report --progress $((i * 33)) --message "on iteration $i of 3"
done
echo '<?xml version="1.0"?><done/>'
"#;

#[test]
fn demo_page_submits_and_shows_progress_and_log_over_sse() {
    let Some(b) = Browser::start() else { return };
    let srv = common::server()
        .handler("steps", SLOW_STEPS)
        .handler("other", "#!/bin/sh\necho hi\n")
        .start();
    b.goto(&format!("http://{}/", srv.addr));
    common::wait_until(Duration::from_secs(10), "handler list loaded", || {
        b.script("return document.querySelectorAll('#type option').length")
            .as_u64()
            == Some(2)
    });
    b.script("document.getElementById('type').value = 'steps';");
    let start = b.find("#start");
    b.call("POST", &format!("/element/{start}/click"), &json!({}));
    let log = b.wait_text("#log", "finished: succeeded", Duration::from_secs(15));
    for i in 1..=3 {
        assert!(
            log.contains(&format!("on iteration {i} of 3")),
            "every message appears in the log: {log}"
        );
    }
    assert_eq!(b.text("#state"), "succeeded");
    assert_eq!(b.text("#percentage"), "100%");
    assert_eq!(
        b.script("return document.getElementById('progressor').value"),
        json!(100)
    );
    assert!(b.text("#links").contains("result"));
    if let Some(dir) = std::env::var_os("SPOOLD_SCREENSHOTS") {
        b.screenshot(&Path::new(&dir).join("demo.png"));
    }
}

#[test]
fn demo_page_shows_a_submit_error() {
    let Some(b) = Browser::start() else { return };
    let srv = common::server().handler("steps", SLOW_STEPS).start();
    b.goto(&format!("http://{}/", srv.addr));
    common::wait_until(Duration::from_secs(10), "handler list loaded", || {
        b.script("return document.querySelectorAll('#type option').length")
            .as_u64()
            == Some(1)
    });
    b.script("document.getElementById('payload').value = '{broken';");
    let start = b.find("#start");
    b.call("POST", &format!("/element/{start}/click"), &json!({}));
    b.wait_text("#error", "not valid JSON", Duration::from_secs(10));
}

#[test]
fn wait_page_refreshes_until_done_then_shows_the_result_escaped() {
    let Some(b) = Browser::start() else { return };
    let srv = common::server()
        .handler("slowxml", "#!/bin/sh\nwhile [ ! -e \"$SPOOL_DIR/../go\" ]; do sleep 0.02; done\necho '<b>bold?</b><script>document.title=\"owned\"</script>'\n")
        .handler_toml("slowxml", "content_type = \"text/html\"\n")
        .config("page_refresh = \"1s\"")
        .start();
    let id = srv.submit("slowxml", "{}");
    b.goto(&format!("http://{}/events/{id}", srv.addr));
    let first = b.wait_text(
        "body",
        "Waiting for the event to complete",
        Duration::from_secs(5),
    );
    assert!(first.contains("Check 1 of 5"), "first load: {first}");
    // The page reloads itself (Refresh header) and counts its checks.
    b.wait_text("body", "Check 2 of 5", Duration::from_secs(5));
    std::fs::write(srv.dir.path().join("go"), "").unwrap();
    let body = b.wait_text("body", "Done.", Duration::from_secs(10));
    assert!(
        body.contains("<b>bold?</b><script>"),
        "the result is shown as text, not markup: {body}"
    );
    let title = b.script("return document.title");
    assert_ne!(title, json!("owned"), "the handler's script must not run");
    if let Some(dir) = std::env::var_os("SPOOLD_SCREENSHOTS") {
        b.screenshot(&Path::new(&dir).join("wait-page.png"));
    }
}
