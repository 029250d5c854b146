//! The little languages of the settings: durations, host names and origins.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use anyhow::{bail, Context};

/// The longest duration any setting may have: 10 years (humantime's `"10y"`).
/// Longer values are mistakes, and would overflow deadlines (`Instant + d`).
pub const MAX_DURATION: Duration = Duration::from_secs(315_576_000);

/// Parses "30s", "1m 30s", "250ms"; a bare number means seconds. Refuses
/// negative and non-finite numbers and anything over [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<f64>() {
        return duration_from_secs(secs).with_context(|| format!("{s:?} is not a valid duration"));
    }
    let d = humantime::parse_duration(s).with_context(|| {
        format!("{s:?} is not a duration; write e.g. \"30s\", \"5m\" or \"250ms\"")
    })?;
    if d > MAX_DURATION {
        bail!("{s:?} is too long: durations are at most 10 years (\"10y\")");
    }
    Ok(d)
}

/// A number of seconds as a duration, with the checks of [`parse_duration`].
pub fn duration_from_secs(secs: f64) -> anyhow::Result<Duration> {
    if !secs.is_finite() {
        bail!("{secs} seconds is not a finite number");
    }
    if secs < 0.0 {
        bail!("{secs} seconds is negative");
    }
    if secs > MAX_DURATION.as_secs_f64() {
        bail!("{secs} seconds is too long: durations are at most 10 years (315576000 seconds)");
    }
    Duration::try_from_secs_f64(secs).with_context(|| format!("{secs} seconds is not a duration"))
}

/// An origin as the CORS check compares it: `scheme://host[:port]` with the
/// host canonical and the scheme's default port left out; `*` stays `*`.
/// None when it is not an http(s) origin (a path, a wildcard in a name).
pub fn canonical_origin(origin: &str) -> Option<String> {
    let origin = origin.trim();
    if origin == "*" {
        return Some("*".into());
    }
    let (scheme, rest) = origin.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    if rest.contains(['/', '@', '?', '#']) {
        return None;
    }
    let a = rest.parse::<hyper::http::uri::Authority>().ok()?;
    let host = canonical_host(a.host())?;
    Some(match a.port_u16() {
        Some(p) if p != default_port => format!("{scheme}://{host}:{p}"),
        _ => format!("{scheme}://{host}"),
    })
}

/// A host name as the Host check compares it: lowercase, without a trailing
/// dot, IPv6 addresses bracketed in canonical form (`[::1]`). None when it is
/// not a host name or IP address (a port, a path, a user or a wildcard).
pub fn canonical_host(name: &str) -> Option<String> {
    let name = name.trim().to_ascii_lowercase();
    let name = name.strip_suffix('.').unwrap_or(&name);
    let inner = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    if let Ok(ip) = inner.parse::<Ipv6Addr>() {
        return Some(format!("[{ip}]"));
    }
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    ok.then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_and_are_capped_at_ten_years() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(
            parse_duration(" 1.5 ").unwrap(),
            Duration::from_millis(1500)
        );
        assert_eq!(parse_duration("10y").unwrap(), MAX_DURATION);
        assert_eq!(parse_duration("315576000").unwrap(), MAX_DURATION);
        for bad in ["11y", "3653d", "315576001", "1e300", "1000000000000y"] {
            let e = format!("{:#}", parse_duration(bad).unwrap_err());
            assert!(
                e.contains("10 years") || e.contains("not a duration"),
                "{bad}: {e}"
            );
        }
        for bad in ["inf", "-inf", "NaN", "-1", "-0.5"] {
            let e = format!("{:#}", parse_duration(bad).unwrap_err());
            assert!(e.contains(bad), "{bad}: {e}");
        }
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn duration_from_secs_checks_like_parse_duration() {
        assert_eq!(
            duration_from_secs(0.25).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(duration_from_secs(0.0).unwrap(), Duration::ZERO);
        for bad in [f64::NAN, f64::INFINITY, -1.0, 1e300, 315_576_000.5] {
            assert!(duration_from_secs(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn origins_are_canonical() {
        for (given, want) in [
            ("https://App.Example.com", "https://app.example.com"),
            ("https://app.example.com:443", "https://app.example.com"),
            ("http://localhost:3000", "http://localhost:3000"),
            ("HTTP://127.0.0.1:80", "http://127.0.0.1"),
            ("http://[::1]:8080", "http://[::1]:8080"),
            ("*", "*"),
        ] {
            assert_eq!(canonical_origin(given).as_deref(), Some(want), "{given}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://*.example.com",
            "ftp://a.com",
            "https://u@a.com",
            "null",
        ] {
            assert_eq!(canonical_origin(bad), None, "{bad}");
        }
    }

    #[test]
    fn host_names_are_canonical() {
        assert_eq!(
            canonical_host("Jobs.Example.COM.").as_deref(),
            Some("jobs.example.com")
        );
        assert_eq!(canonical_host("::1").as_deref(), Some("[::1]"));
        assert_eq!(canonical_host("[0:0::1]").as_deref(), Some("[::1]"));
        assert_eq!(canonical_host("10.0.0.5").as_deref(), Some("10.0.0.5"));
        for bad in [
            "",
            ".",
            "*",
            "*.example.com",
            "a.com:8080",
            "user@a.com",
            "a/b",
            "[1.2.3.4]",
        ] {
            assert_eq!(canonical_host(bad), None, "{bad}");
        }
    }
}
