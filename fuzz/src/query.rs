//! Query strings (`serve::query`), `?wait=` and the Accept header.
//!
//! Input, two ways at once: (1) the bytes as a raw query string, when they
//! make a valid URI; (2) the text split on `0xFF` into key, value, key, ...
//! pairs, which are percent-encoded into a query string (spaces as `+` when
//! the first byte is odd). The first 8 bytes also pick the `long_poll_max`
//! that `?wait=` is clamped to (0 to 10 years, the config's range).
//!
//! Asserts: decoding never panics; a raw query without `%` or `+` decodes
//! to its own pairs (a later key wins); encoded pairs decode back to exactly
//! those pairs; `wait` (the decoded value and the whole text) is a duration
//! within `0..=long_poll_max` exactly when it is a finite number, and 0 when
//! negative; the Accept header never panics and `?format=` overrides it.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::header::{HeaderMap, HeaderValue};
use hyper::Uri;
use spoold::serve::sse::{query, wait_limit, wants_html};

const TEN_YEARS: u64 = 10 * 365 * 24 * 3600 * 1_000_000_000;

pub fn check(data: &[u8]) {
    let mut seed = [0u8; 8];
    let n = data.len().min(8);
    seed[..n].copy_from_slice(&data[..n]);
    let max = Duration::from_nanos(u64::from_le_bytes(seed) % (TEN_YEARS + 1));
    raw(data, max);
    encoded(data);
    let text = super::text(data);
    wait(&text, max);
    accept(data);
}

fn raw(data: &[u8], max: Duration) {
    let mut target = b"/events/x?".to_vec();
    target.extend_from_slice(data);
    let Ok(uri) = Uri::try_from(target) else {
        return;
    };
    let pairs = query(&uri);
    if let Some(w) = pairs.get("wait") {
        wait(w, max);
    }
    let q = uri.query().unwrap_or("");
    if !q.contains(['%', '+']) {
        let mut want = BTreeMap::new();
        for pair in q.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            want.insert(k.to_owned(), v.to_owned());
        }
        assert_eq!(pairs, want, "{q:?}");
    }
}

fn encoded(data: &[u8]) {
    let plus = data.first().is_some_and(|b| b & 1 == 1);
    let parts: Vec<String> = data.split(|&b| b == 0xFF).map(super::text).collect();
    let mut want = BTreeMap::new();
    let mut q = Vec::new();
    for kv in parts.chunks(2) {
        let (k, v) = (&kv[0], kv.get(1).cloned().unwrap_or_default());
        q.push(format!("{}={}", encode(k, plus), encode(&v, plus)));
        want.insert(k.clone(), v);
    }
    let target = format!("/events/x?{}", q.join("&"));
    if target.len() > 60_000 {
        return; // past what a URI may hold; hyper answers 414 first
    }
    let uri: Uri = target.parse().expect("an encoded query is a valid URI");
    assert_eq!(query(&uri), want, "{uri}");
}

fn encode(s: &str, plus: bool) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b' ' if plus => out.push('+'),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn wait(raw: &str, max: Duration) {
    let number = raw.parse::<f64>().ok().filter(|s| s.is_finite());
    let limit = wait_limit(raw, max);
    assert_eq!(limit.is_some(), number.is_some(), "wait={raw:?}");
    let (Some(limit), Some(secs)) = (limit, number) else {
        return;
    };
    assert!(limit <= max, "wait={raw:?} gave {limit:?} over {max:?}");
    if secs <= 0.0 {
        assert_eq!(limit, Duration::ZERO, "wait={raw:?}");
    }
}

fn accept(data: &[u8]) {
    let Ok(value) = HeaderValue::from_bytes(data) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert("accept", value);
    wants_html(&headers, None);
    assert!(wants_html(&headers, Some("html")));
    assert!(!wants_html(&headers, Some("json")));
}
