//! HTML pages: the "please wait" page of an event and the demo page.
//!
//! The wait page works without JavaScript, like the classic async web request
//! pattern: it shows the state, progress and message, a check counter, and a
//! `Refresh` header that reloads it every `page_refresh` with the counter
//! bumped; after `page_max_checks` it stops refreshing and offers a link to keep
//! waiting. When the event is done it shows the result (inline when it is
//! small text) with a link to the raw bytes. Everything shown is escaped.
//!
//! Both pages refuse to be framed (`X-Frame-Options: DENY` and CSP
//! `frame-ancestors 'none'`), so another site cannot overlay them to trick a
//! click (clickjacking). The wait page runs no script at all; the demo page
//! may run only its own inline script and talk only to this origin.

use hyper::header::{self, HeaderValue};
use hyper::Response;

use super::{bearer, full, Body};
use crate::app::Shared;
use crate::spool::records::{State, Status};

const DEMO: &str = include_str!("assets/index.html");

const DEMO_CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
connect-src 'self'; img-src 'self' data:; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

const WAIT_CSP: &str =
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; frame-ancestors 'none'";

const INLINE_MAX: u64 = 64 * 1024;

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `GET /`: the demo page.
pub fn demo() -> Response<Body> {
    page(DEMO.into(), "no-cache", DEMO_CSP)
}

/// An HTML page with the headers every page gets.
fn page(html: String, cache: &'static str, csp: &'static str) -> Response<Body> {
    let mut resp = Response::new(full(html));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("content-security-policy", HeaderValue::from_static(csp));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Links may carry ?access_token=: never hand a URL on to another site.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

/// The wait page. `token` is the `?access_token=` the request came with: a
/// browser cannot add a header to a page it reloads, so the page's own links
/// carry it on.
pub fn wait_page(sh: &Shared, status: &Status, check: u32, token: Option<&str>) -> Response<Body> {
    let id = escape(&status.id);
    let then_raw = bearer::link_suffix(token, false);
    let then = escape(&then_raw);
    let only = escape(&bearer::link_suffix(token, true));
    let kind = escape(&status.kind);
    let max = sh.settings.page_max_checks;
    let refresh = sh.settings.page_refresh.as_secs().max(1);
    let pct = status.progress.unwrap_or(0.0);
    let message = status.message.as_deref().map(escape).unwrap_or_default();
    let (title, body, reload) = if status.state.is_terminal() {
        (
            format!("{kind}: {}", status.state.as_str()),
            finished_body(sh, status, &only),
            None,
        )
    } else if check >= max {
        let body = format!(
            "<p>Still {state} after {check} checks. <a href=\"/events/{id}?check=0{then}\">Keep waiting</a></p>",
            state = status.state.as_str()
        );
        (
            format!("{kind}: still {}", status.state.as_str()),
            body,
            None,
        )
    } else {
        let dots = ". ".repeat((check as usize % 20) + 1);
        let body = format!(
            "<p><b>Waiting for the event to complete {dots}</b></p>\
             <p>State: <b>{state}</b>{attempt}</p>\
             <progress max=\"100\" value=\"{pct}\">{pct}%</progress> <span>{pct}%</span>\
             <p class=\"msg\">{message}</p>\
             <p class=\"small\">Check {n} of {max}. This page reloads itself every {refresh} s; the work runs in another process meanwhile.</p>",
            state = status.state.as_str(),
            attempt = if status.attempt > 1 { format!(", attempt {} of {}", status.attempt, status.max_attempts) } else { String::new() },
            n = check + 1,
        );
        (
            format!("Running {kind}…"),
            body,
            Some(format!(
                "{refresh}; url=/events/{}?check={}{then_raw}",
                status.id,
                check + 1
            )),
        )
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{title}</title><style>{CSS}</style></head><body><main><h1>{title}</h1>{body}\
         <p class=\"small\">Event <code>{id}</code> · <a href=\"/events/{id}/stream{only}\">stream</a> · <a href=\"/events/{id}?format=json{then}\">status JSON</a></p></main></body></html>"
    );
    let mut resp = page(html, "no-store", WAIT_CSP);
    let h = resp.headers_mut();
    if let Some(r) = reload {
        h.insert("refresh", HeaderValue::from_str(&r).expect("ASCII"));
    }
    resp
}

fn finished_body(sh: &Shared, status: &Status, token: &str) -> String {
    let id = escape(&status.id);
    match (status.state, &status.result) {
        (State::Succeeded, Some(info)) => {
            let link = format!(
                "<p><a href=\"/events/{id}/result{token}\">Open the result</a> ({} bytes, {})</p>",
                info.bytes,
                escape(&info.content_type)
            );
            let inline = is_text(&info.content_type) && info.bytes <= INLINE_MAX;
            let preview = inline
                .then(|| crate::spool::ids::EventId::parse(&status.id).ok())
                .flatten()
                .and_then(|eid| std::fs::read(sh.spool.event_dir(&eid).join("result")).ok())
                .map(|b| format!("<pre>{}</pre>", escape(&String::from_utf8_lossy(&b))))
                .unwrap_or_default();
            format!("<p>Done.</p>{link}{preview}")
        }
        (State::Succeeded, None) => "<p>Done. The handler produced no result.</p>".into(),
        (state, _) => format!(
            "<p>The event ended <b>{}</b>: {}</p>",
            state.as_str(),
            escape(status.error.as_deref().unwrap_or("no reason recorded"))
        ),
    }
}

fn is_text(content_type: &str) -> bool {
    let ct = content_type.to_ascii_lowercase();
    ct.starts_with("text/") || ct.contains("json") || ct.contains("xml")
}

const CSS: &str =
    "body{font:16px/1.5 system-ui,sans-serif;margin:2rem;color:#222}main{max-width:48rem}\
progress{width:20rem;height:1.2rem}.small{color:#666;font-size:.85rem}.msg{font-style:italic}\
pre{background:#f4f4f4;padding:1rem;overflow:auto;max-height:30rem}";

#[cfg(test)]
mod tests {
    use super::escape;

    #[test]
    fn escape_neutralises_markup() {
        assert_eq!(
            escape(r#"<script>alert('x')</script>&""#),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&amp;&quot;"
        );
    }
}
