//! Decoding what a request asks for: its query string, single headers, and
//! whether it wants HTML. Pure functions of the request; no I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use hyper::header::HeaderMap;
use hyper::Uri;

/// The query string as decoded pairs (`+` is a space; a later key wins).
pub fn query(uri: &Uri) -> BTreeMap<String, String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Decodes `%XX` and `+`; a malformed escape stays as it is, invalid UTF-8
/// becomes U+FFFD.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A header's value as text; None when missing or not visible ASCII.
pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `?format=json|html` wins; otherwise the Accept header decides.
pub fn wants_html(headers: &HeaderMap, format: Option<&str>) -> bool {
    match format {
        Some("html") => return true,
        Some("json") => return false,
        _ => {}
    }
    let accept = header_str(headers, "accept").unwrap_or("");
    let pos = |needle: &str| accept.find(needle);
    match (pos("text/html"), pos("application/json")) {
        (Some(h), Some(j)) => h < j,
        (Some(_), None) => true,
        _ => false,
    }
}

/// `?wait=N`: a finite number of seconds, or None when it is not one.
pub fn wait_secs(raw: &str) -> Option<f64> {
    raw.parse::<f64>().ok().filter(|s| s.is_finite())
}

/// `?wait=N` as the time to wait: N seconds clamped to `0..=max`; None when N
/// is not a finite number. The `min` keeps the bound exact where `max` has
/// more precision than an f64 of seconds.
pub fn wait_limit(raw: &str, max: Duration) -> Option<Duration> {
    let secs = wait_secs(raw)?.clamp(0.0, max.as_secs_f64());
    Some(Duration::try_from_secs_f64(secs).map_or(max, |d| d.min(max)))
}

/// The seq an SSE client has: `Last-Event-ID`, else `?last_event_id=`.
pub fn last_event_id(headers: &HeaderMap, uri: &Uri) -> Option<u64> {
    header_str(headers, "last-event-id")
        .map(str::to_owned)
        .or_else(|| query(uri).get("last_event_id").cloned())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_pairs_are_percent_decoded() {
        let uri: Uri = "/x?a=1%202&b=c+d&bad=%zz&last=%4".parse().unwrap();
        let q = query(&uri);
        assert_eq!(q["a"], "1 2");
        assert_eq!(q["b"], "c d");
        assert_eq!(q["bad"], "%zz");
        assert_eq!(q["last"], "%4");
    }

    #[test]
    fn wait_must_be_finite() {
        assert_eq!(wait_secs("0.5"), Some(0.5));
        assert_eq!(wait_secs("-3"), Some(-3.0));
        for bad in ["NaN", "inf", "soon", ""] {
            assert_eq!(wait_secs(bad), None, "{bad}");
        }
    }
}
