//! Where an SSE client resumes: `serve::query::last_event_id`, from the
//! `Last-Event-ID` header, else `?last_event_id=`.
//!
//! Input: split on the first `0xFF` into the header value and a raw query
//! string; with no `0xFF` there is no header. A header value hyper could not
//! carry (CR, LF, NUL) or a query that is no valid URI is left out.
//!
//! Asserts: the answer is the header's value when the header is there as
//! text, else the query's, and it is a seq exactly when that value (trimmed)
//! is an optional `+` and decimal digits that fit a u64, checked against a
//! separate digit-by-digit reading. So a sign, a fraction, hex, an overflow
//! or trailing text is never taken for a seq.

use hyper::header::{HeaderMap, HeaderValue};
use hyper::Uri;
use spoold::serve::sse::{last_event_id, query};

pub fn check(data: &[u8]) {
    let (header, raw_query) = match data.iter().position(|&b| b == 0xFF) {
        Some(i) => (Some(&data[..i]), &data[i + 1..]),
        None => (None, data),
    };
    let mut headers = HeaderMap::new();
    if let Some(value) = header.and_then(|h| HeaderValue::from_bytes(h).ok()) {
        headers.insert("last-event-id", value);
    }
    let mut target = b"/events/x/stream?".to_vec();
    target.extend_from_slice(raw_query);
    let uri = Uri::try_from(target).unwrap_or_else(|_| Uri::from_static("/events/x/stream"));

    let source = match headers.get("last-event-id").map(|v| v.to_str()) {
        Some(Ok(text)) => Some(text.to_owned()),
        _ => query(&uri).get("last_event_id").cloned(),
    };
    let want = source.as_deref().and_then(seq);
    assert_eq!(last_event_id(&headers, &uri), want, "from {source:?}");
}

/// The reference reading: trimmed, an optional `+`, then only ASCII digits.
fn seq(text: &str) -> Option<u64> {
    let t = text.trim();
    let digits = t.strip_prefix('+').unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.bytes().try_fold(0u64, |n, b| {
        n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}
