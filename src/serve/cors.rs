//! CORS: which other sites' pages may call the API from a browser.
//!
//! Off by default: only spoold's own pages (same origin) and programs
//! (no `Origin` header) get through, see `guard`. `cors_origins` names the
//! origins let in; their requests pass the CSRF check and their answers carry
//! `Access-Control-Allow-Origin`. `*` means any origin and is only accepted
//! with tokens configured. spoold never sends `Access-Control-Allow-Credentials`:
//! it uses no cookies, so a page authenticates with a bearer token it holds
//! (`Authorization` on `fetch`, `?access_token=` on an `EventSource`), and no
//! page can borrow a user's ambient credentials.

use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Response, StatusCode};

use super::problem::Problem;
use super::query::header_str;
use super::{empty, Body};
use crate::config::{canonical_origin, Settings};

const METHODS: &str = "GET, HEAD, POST, DELETE, OPTIONS";

/// Request headers a page may send. `Last-Event-ID` is for SSE clients built
/// on `fetch` (a browser's own `EventSource` needs no preflight for it).
const ALLOW_HEADERS: &str = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID, \
If-None-Match, Cache-Control, Accept, X-Request-ID, Traceparent";

/// Response headers a page may read besides the safelisted ones.
const EXPOSE_HEADERS: &str = "Location, Retry-After, ETag, WWW-Authenticate";

/// True when pages of `origin` may call the API.
pub fn allowed(settings: &Settings, origin: &str) -> bool {
    if settings.cors_origins.is_empty() {
        return false;
    }
    let Some(origin) = canonical_origin(origin).filter(|o| o != "*") else {
        return false; // `null`, or not an http(s) origin
    };
    settings
        .cors_origins
        .iter()
        .any(|o| o == "*" || *o == origin)
}

/// `OPTIONS`: a preflight when it has `Origin` and
/// `Access-Control-Request-Method`, otherwise the list of methods.
pub fn options(settings: &Settings, headers: &HeaderMap) -> Result<Response<Body>, Problem> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ALLOW, HeaderValue::from_static(METHODS));
    let origin = header_str(headers, "origin");
    let preflight = headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    let (Some(origin), true) = (origin, preflight) else {
        return Ok(resp);
    };
    if !allowed(settings, origin) {
        let shown: String = origin.chars().take(100).collect();
        return Err(Problem::new(
            StatusCode::FORBIDDEN,
            "cors-origin-not-allowed",
            "Origin not allowed",
            format!(
                "pages from {shown:?} may not call this API; add the origin to cors_origins in spoold's config file (see docs/security.md)"
            ),
        ));
    }
    allow_origin(settings, origin, h);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static(METHODS),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(ALLOW_HEADERS),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    h.append(
        header::VARY,
        HeaderValue::from_static("Access-Control-Request-Method, Access-Control-Request-Headers"),
    );
    Ok(resp)
}

/// Adds the CORS headers to any answer (errors too, so a page can read the
/// problem JSON) when the request came from an allowed origin.
pub fn decorate(settings: &Settings, origin: Option<&str>, resp: &mut Response<Body>) {
    if settings.cors_origins.is_empty() {
        return;
    }
    let h = resp.headers_mut();
    // Caches must keep answers to different origins apart.
    h.append(header::VARY, HeaderValue::from_static("Origin"));
    if let Some(origin) = origin.filter(|o| allowed(settings, o)) {
        allow_origin(settings, origin, h);
        h.insert(
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSE_HEADERS),
        );
    }
}

fn allow_origin(settings: &Settings, origin: &str, h: &mut HeaderMap) {
    let value = if settings.cors_origins.iter().any(|o| o == "*") {
        HeaderValue::from_static("*")
    } else {
        // The origin as the browser sent it: it compares byte for byte.
        HeaderValue::from_str(origin).unwrap_or(HeaderValue::from_static("null"))
    };
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(origins: &[&str]) -> Settings {
        Settings {
            cors_origins: origins
                .iter()
                .map(|o| canonical_origin(o).unwrap())
                .collect(),
            ..Settings::default()
        }
    }

    #[test]
    fn only_listed_origins_are_allowed() {
        let s = settings(&["https://app.example.com", "http://localhost:3000"]);
        assert!(allowed(&s, "https://app.example.com"));
        assert!(allowed(&s, "https://APP.example.com:443"));
        assert!(allowed(&s, "http://localhost:3000"));
        assert!(!allowed(&s, "http://app.example.com"));
        assert!(!allowed(&s, "http://localhost:3001"));
        assert!(!allowed(&s, "null"));
        assert!(!allowed(&s, "https://app.example.com.evil.example"));
        assert!(!allowed(&settings(&[]), "https://app.example.com"));
        let any = settings(&["*"]);
        assert!(allowed(&any, "https://whoever.example") && !allowed(&any, "null"));
    }

    #[test]
    fn preflight_allows_last_event_id_and_never_credentials() {
        let s = settings(&["https://app.example.com"]);
        let mut h = HeaderMap::new();
        h.insert("origin", "https://app.example.com".parse().unwrap());
        h.insert("access-control-request-method", "GET".parse().unwrap());
        h.insert(
            "access-control-request-headers",
            "last-event-id".parse().unwrap(),
        );
        let resp = options(&s, &h).unwrap();
        let got = |n: &str| {
            resp.headers()
                .get(n)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(
            got("access-control-allow-origin").as_deref(),
            Some("https://app.example.com")
        );
        assert!(got("access-control-allow-headers")
            .unwrap()
            .contains("Last-Event-ID"));
        assert_eq!(got("access-control-allow-credentials"), None);
        h.insert("origin", "https://evil.example".parse().unwrap());
        assert_eq!(options(&s, &h).unwrap_err().status, StatusCode::FORBIDDEN);
    }
}
