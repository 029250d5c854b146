//! Request guards, checked before routing: which host names spoold answers
//! to, and which browser pages may change things.
//!
//! **Host** (against DNS rebinding). A page on `evil.example` can make its
//! name resolve to 127.0.0.1 and then read spoold's answers as its own
//! origin; its requests still say `Host: evil.example`. So on a loopback
//! `listen`, only loopback names (`localhost`, `127.x.x.x`, `[::1]`, the
//! listen IP) and `allowed_hosts` are answered; anything else is `421`. On a
//! non-loopback `listen` (only with `--insecure`) with no `allowed_hosts`,
//! every name is. A request without `Host` (HTTP/1.0) has no name to check
//! and passes. `GET /healthz` is exempt: probes often use an IP address, and
//! its answer is a constant.
//!
//! **Origin** (against CSRF). Any page can make a browser POST a
//! `text/plain` form here. Browsers say who sent a request in `Origin` (and
//! `Sec-Fetch-Site`); programs such as curl send neither. So a state-changing
//! request (any method but GET, HEAD and OPTIONS) is refused with `403` when
//! `Origin` is `null` or another origin than the one named by `Host`, or when
//! `Sec-Fetch-Site` says `cross-site` or `same-site`, unless the origin is in
//! the CORS allowlist (`cors_origins`, see `cors`).

use std::net::IpAddr;
use std::str::FromStr;

use hyper::header::{self, HeaderMap};
use hyper::http::uri::Authority;
use hyper::{Method, StatusCode, Uri};

use super::problem::Problem;
use super::query::header_str;
use crate::config::{canonical_host, Settings};

/// Runs the guards; the first refusal wins.
pub fn check(
    settings: &Settings,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<(), Problem> {
    if !(uri.path() == "/healthz" && matches!(*method, Method::GET | Method::HEAD)) {
        check_host(settings, uri, headers)?;
    }
    check_origin(settings, method, headers)
}

/// Every name the request gives (Host headers and an absolute-form URI) must be allowed.
fn check_host(settings: &Settings, uri: &Uri, headers: &HeaderMap) -> Result<(), Problem> {
    let given = headers
        .get_all(header::HOST)
        .iter()
        .map(|v| v.to_str().unwrap_or("\u{fffd}").to_owned())
        .chain(uri.authority().map(|a| a.as_str().to_owned()))
        .filter(|h| !h.is_empty());
    for host in given {
        let name = split_host(&host).map(|(name, _)| name);
        if !name.as_deref().is_some_and(|n| host_allowed(settings, n)) {
            return Err(host_not_allowed(&host));
        }
    }
    Ok(())
}

/// Splits `name[:port]` into the canonical name and the port.
fn split_host(host: &str) -> Option<(String, Option<u16>)> {
    if host.contains('@') {
        return None;
    }
    let a = Authority::from_str(host).ok()?;
    Some((canonical_host(a.host())?, a.port_u16()))
}

fn host_allowed(settings: &Settings, name: &str) -> bool {
    let listen = settings.listen.ip();
    if listen.is_loopback() && is_loopback_name(name, listen) {
        return true;
    }
    if settings.allowed_hosts.is_empty() {
        return !listen.is_loopback();
    }
    settings.allowed_hosts.iter().any(|h| h == name)
}

/// `localhost`, any 127.x.x.x, `[::1]`, or the address spoold listens on.
fn is_loopback_name(name: &str, listen: IpAddr) -> bool {
    if name == "localhost" {
        return true;
    }
    let ip = name.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<IpAddr>()
        .is_ok_and(|ip| ip.is_loopback() || ip == listen)
}

fn host_not_allowed(host: &str) -> Problem {
    let shown: String = host.chars().take(100).collect();
    Problem::new(
        StatusCode::MISDIRECTED_REQUEST,
        "host-not-allowed",
        "Host not allowed",
        format!(
            "this spoold does not answer to the host name in {shown:?}: it only answers to its own names, so that a web page cannot reach it through a name of its own (DNS rebinding). \
             If this is a name of this server, add it to allowed_hosts in spoold's config file (see docs/configuration.md)"
        ),
    )
}

fn check_origin(settings: &Settings, method: &Method, headers: &HeaderMap) -> Result<(), Problem> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let origin = header_str(headers, "origin");
    let site = header_str(headers, "sec-fetch-site").unwrap_or("");
    let same = !matches!(site, "cross-site" | "same-site")
        && origin.is_none_or(|o| same_origin(o, header_str(headers, "host")));
    if same || origin.is_some_and(|o| cors_allows(settings, o)) {
        Ok(())
    } else {
        Err(cross_origin(method, origin.unwrap_or(site)))
    }
}

/// True when `origin` is `http(s)://<Host>`: same host name and port (a
/// missing port is the scheme's default). `null` is never the same. https is
/// accepted for pages served through a TLS proxy that passes `Host` on.
fn same_origin(origin: &str, host: Option<&str>) -> bool {
    let (Some((scheme, rest)), Some(host)) = (origin.split_once("://"), host) else {
        return false;
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return false,
    };
    match (split_host(rest), split_host(host)) {
        (Some((o_name, o_port)), Some((h_name, h_port))) => {
            o_name == h_name && o_port.unwrap_or(default_port) == h_port.unwrap_or(default_port)
        }
        _ => false,
    }
}

/// The cross-origin requests allowed anyway: those from `cors_origins`.
fn cors_allows(settings: &Settings, origin: &str) -> bool {
    super::cors::allowed(settings, origin)
}

fn cross_origin(method: &Method, from: &str) -> Problem {
    let shown: String = from.chars().take(100).collect();
    Problem::new(
        StatusCode::FORBIDDEN,
        "cross-origin",
        "Cross-origin request refused",
        format!(
            "cross-site requests are refused: this {method} came from a web page of another site ({shown:?}). \
             spoold's own pages (same origin) and programs that send no Origin header (curl, scripts) may {method}"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(listen: &str, allowed: &[&str]) -> Settings {
        Settings {
            listen: listen.parse().unwrap(),
            allowed_hosts: allowed.iter().map(|h| canonical_host(h).unwrap()).collect(),
            ..Settings::default()
        }
    }

    fn host_ok(s: &Settings, host: &str) -> bool {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        check_host(s, &Uri::from_static("/"), &h).is_ok()
    }

    #[test]
    fn loopback_listen_answers_loopback_names_only() {
        let s = settings("127.0.0.1:8080", &[]);
        for ok in [
            "localhost",
            "LOCALHOST:8080",
            "localhost.:1",
            "127.0.0.1:8080",
            "127.9.8.7",
            "[::1]:8080",
            "",
        ] {
            assert!(host_ok(&s, ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:8080",
            "127.0.0.1.evil.example",
            "localhost@evil",
            "10.0.0.1",
            "[::2]",
        ] {
            assert!(!host_ok(&s, bad), "{bad}");
        }
        let s = settings("[::1]:8080", &[]);
        assert!(host_ok(&s, "[::1]:8080") && host_ok(&s, "localhost") && !host_ok(&s, "spoold"));
    }

    #[test]
    fn allowed_hosts_add_names_and_restrict_other_listens() {
        let s = settings("127.0.0.1:8080", &["jobs.example.com"]);
        assert!(host_ok(&s, "Jobs.Example.com:443") && host_ok(&s, "localhost"));
        assert!(!host_ok(&s, "other.example.com"));
        let s = settings("0.0.0.0:8080", &["jobs.example.com"]);
        assert!(host_ok(&s, "jobs.example.com") && !host_ok(&s, "localhost"));
        assert!(host_ok(&settings("0.0.0.0:8080", &[]), "anything.example"));
    }

    #[test]
    fn same_origin_means_scheme_host_and_port_of_host() {
        assert!(same_origin("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(same_origin("http://LocalHost", Some("localhost:80")));
        assert!(same_origin(
            "https://jobs.example.com",
            Some("jobs.example.com")
        ));
        assert!(!same_origin(
            "http://127.0.0.1:8081",
            Some("127.0.0.1:8080")
        ));
        assert!(!same_origin(
            "http://localhost:8080",
            Some("127.0.0.1:8080")
        ));
        assert!(!same_origin("http://evil.example", Some("127.0.0.1:8080")));
        assert!(!same_origin("null", Some("127.0.0.1:8080")));
        assert!(!same_origin("ftp://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(!same_origin(
            "http://127.0.0.1:8080/x",
            Some("127.0.0.1:8080")
        ));
        assert!(!same_origin("http://127.0.0.1:8080", None));
    }
}
