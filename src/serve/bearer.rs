//! The HTTP side of [`crate::auth`]: which scope each route needs, where a
//! request's token is found, and the 401 and 403 answers.

use hyper::header::{self, HeaderMap};
use hyper::{Method, StatusCode, Uri};
use serde_json::json;

use super::problem::Problem;
use super::query::query;
use crate::auth::{Scope, Token, Tokens};

/// What a route needs: nothing, any valid token, or one scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Public,
    AnyToken,
    Scope(Scope),
}

/// The table, in the order of `routes`. `GET /` is a static page that asks
/// for a token when the API answers 401; `/healthz` is for probes.
pub fn need(method: &Method, segments: &[&str]) -> Need {
    match (method, segments) {
        (&Method::OPTIONS, _) => Need::Public,
        (&Method::GET, [""] | ["healthz"]) => Need::Public,
        (&Method::GET, ["metrics"]) => Need::Scope(Scope::Admin),
        (&Method::GET, ["handlers"] | ["events", ..]) => Need::Scope(Scope::Read),
        (&Method::POST, ["events", ..]) => Need::Scope(Scope::Submit),
        (&Method::DELETE, ["events", ..]) => Need::Scope(Scope::Cancel),
        _ => Need::AnyToken,
    }
}

/// Checks the request's token against `need`. `Ok(None)` when tokens are off
/// or the route is public.
pub fn check<'t>(
    tokens: &'t Tokens,
    need: Need,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<&'t Token>, Problem> {
    if tokens.is_empty() || need == Need::Public {
        return Ok(None);
    }
    let presented = presented(method, uri, headers)?;
    let Some(secret) = presented else {
        return Err(unauthorized(
            "this spoold requires a token: send `Authorization: Bearer TOKEN` (or `?access_token=TOKEN` on a GET from a browser)",
            None,
        ));
    };
    let Some(token) = tokens.find(&secret) else {
        return Err(unauthorized(
            "the token is not one this spoold knows; check it against the tokens file (see docs/security.md)",
            Some("invalid_token"),
        ));
    };
    match need {
        Need::Scope(scope) if !token.allows(scope) => Err(forbidden(token, scope)),
        _ => Ok(Some(token)),
    }
}

/// The token in `Authorization: Bearer`, else `?access_token=` on a GET or
/// HEAD. Only one may be used (RFC 6750 §2), and a token never rides in the
/// query of a request that changes something.
fn presented(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<Option<String>, Problem> {
    let in_query = query(uri).remove("access_token");
    if let Some(auth) = headers.get(header::AUTHORIZATION) {
        let value = auth.to_str().unwrap_or("");
        let Some((scheme, secret)) = value.split_once(' ') else {
            return Err(malformed());
        };
        if !scheme.eq_ignore_ascii_case("bearer") || secret.trim().is_empty() {
            return Err(malformed());
        }
        if in_query.is_some() {
            return Err(Problem::bad_request(
                "token-twice",
                "send the token once: in the Authorization header or in ?access_token=, not both",
            ));
        }
        return Ok(Some(secret.trim().to_owned()));
    }
    match in_query {
        Some(_) if !matches!(*method, Method::GET | Method::HEAD) => Err(Problem::bad_request(
            "token-in-query",
            "?access_token= is only accepted on GET requests; send `Authorization: Bearer TOKEN` with this one",
        )),
        other => Ok(other),
    }
}

/// `?access_token=…` for links in pages, when the request carried its token
/// that way (a browser following links cannot add a header).
pub fn query_token(uri: &Uri) -> Option<String> {
    query(uri).remove("access_token")
}

fn malformed() -> Problem {
    unauthorized(
        "the Authorization header must be `Bearer TOKEN`; spoold knows no other scheme",
        Some("invalid_request"),
    )
}

fn unauthorized(detail: &str, error: Option<&'static str>) -> Problem {
    let challenge = match error {
        None => "Bearer realm=\"spoold\"",
        Some("invalid_token") => "Bearer realm=\"spoold\", error=\"invalid_token\"",
        Some(_) => "Bearer realm=\"spoold\", error=\"invalid_request\"",
    };
    Problem::new(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "Unauthorized",
        detail,
    )
    .header(header::WWW_AUTHENTICATE, challenge)
}

fn forbidden(token: &Token, scope: Scope) -> Problem {
    let has: Vec<&str> = token.scopes.iter().map(|s| s.as_str()).collect();
    Problem::new(
        StatusCode::FORBIDDEN,
        "insufficient-scope",
        "Forbidden",
        format!(
            "token {:?} may {}, but this request needs the {} scope; use a token that has it, or add it in the tokens file",
            token.name,
            has.join(", "),
            scope.as_str()
        ),
    )
    .header(
        header::WWW_AUTHENTICATE,
        match scope {
            Scope::Submit => "Bearer realm=\"spoold\", error=\"insufficient_scope\", scope=\"submit\"",
            Scope::Read => "Bearer realm=\"spoold\", error=\"insufficient_scope\", scope=\"read\"",
            Scope::Cancel => "Bearer realm=\"spoold\", error=\"insufficient_scope\", scope=\"cancel\"",
            Scope::Admin => "Bearer realm=\"spoold\", error=\"insufficient_scope\", scope=\"admin\"",
        },
    )
    .with("scope", json!(scope.as_str()))
}

/// Where spoold may put a token it was given in the query: its own links.
pub fn link_suffix(token: Option<&str>, first: bool) -> String {
    let Some(t) = token else {
        return String::new();
    };
    let sep = if first { '?' } else { '&' };
    let mut out = format!("{sep}access_token=");
    for b in t.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        let mut t = Tokens::default();
        t.add_lines(
            "reader read rrrrrrrrrrrrrrrrrrrr\nweb submit,read wwwwwwwwwwwwwww+/=w",
            "test",
        )
        .unwrap();
        t
    }

    fn run(method: Method, path: &str, auth: Option<&str>) -> Result<Option<String>, u16> {
        let uri: Uri = path.parse().unwrap();
        let segs: Vec<&str> = uri.path().trim_start_matches('/').split('/').collect();
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        let t = tokens();
        check(&t, need(&method, &segs), &method, &uri, &h)
            .map(|t| t.map(|t| t.name.clone()))
            .map_err(|p| p.status.as_u16())
    }

    #[test]
    fn routes_need_their_scope() {
        let r = "Bearer rrrrrrrrrrrrrrrrrrrr";
        assert_eq!(
            run(Method::GET, "/events/X", Some(r)),
            Ok(Some("reader".into()))
        );
        assert_eq!(run(Method::POST, "/events/echo", Some(r)), Err(403));
        assert_eq!(run(Method::DELETE, "/events/X", Some(r)), Err(403));
        assert_eq!(run(Method::GET, "/metrics", Some(r)), Err(403));
        assert_eq!(run(Method::GET, "/healthz", None), Ok(None));
        assert_eq!(run(Method::GET, "/", None), Ok(None));
        assert_eq!(run(Method::OPTIONS, "/events/echo", None), Ok(None));
        assert_eq!(run(Method::GET, "/events/X", None), Err(401));
        assert_eq!(run(Method::PUT, "/nowhere", None), Err(401));
    }

    #[test]
    fn tokens_ride_in_the_header_or_a_get_query() {
        assert_eq!(
            run(
                Method::GET,
                "/events/X",
                Some("bearer   rrrrrrrrrrrrrrrrrrrr ")
            ),
            Ok(Some("reader".into()))
        );
        assert_eq!(
            run(
                Method::GET,
                "/events/X/stream?access_token=wwwwwwwwwwwwwww%2B%2F%3Dw",
                None
            ),
            Ok(Some("web".into()))
        );
        assert_eq!(
            run(
                Method::POST,
                "/events/e?access_token=wwwwwwwwwwwwwww%2B%2F%3Dw",
                None
            ),
            Err(400)
        );
        assert_eq!(
            run(
                Method::GET,
                "/events/X?access_token=rrrrrrrrrrrrrrrrrrrr",
                Some("Bearer rrrrrrrrrrrrrrrrrrrr")
            ),
            Err(400)
        );
        assert_eq!(
            run(Method::GET, "/events/X", Some("Basic cnJycg==")),
            Err(401)
        );
        assert_eq!(run(Method::GET, "/events/X", Some("Bearer nope")), Err(401));
    }

    #[test]
    fn link_suffix_round_trips_through_the_query_decoder() {
        let s = link_suffix(Some("wwwwwwwwwwwwwww+/=w"), true);
        let uri: Uri = format!("/events/X{s}").parse().unwrap();
        assert_eq!(query_token(&uri).as_deref(), Some("wwwwwwwwwwwwwww+/=w"));
        assert_eq!(link_suffix(None, false), "");
    }
}
