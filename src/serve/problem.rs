//! RFC 9457 problem details: every error the API returns says what went wrong
//! and what to do about it.

use bytes::Bytes;
use hyper::{header, Response, StatusCode};
use serde_json::{json, Value};

use super::{full, Body};
use crate::spool::SpoolError;

#[derive(Debug)]
pub struct Problem {
    pub status: StatusCode,
    /// A short stable slug; the `type` is `/problems/<slug>`.
    pub slug: &'static str,
    pub title: &'static str,
    pub detail: String,
    pub extra: Vec<(&'static str, Value)>,
    pub headers: Vec<(header::HeaderName, &'static str)>,
}

impl Problem {
    pub fn new(
        status: StatusCode,
        slug: &'static str,
        title: &'static str,
        detail: impl Into<String>,
    ) -> Problem {
        Problem {
            status,
            slug,
            title,
            detail: detail.into(),
            extra: Vec::new(),
            headers: Vec::new(),
        }
    }

    pub fn with(mut self, key: &'static str, value: Value) -> Problem {
        self.extra.push((key, value));
        self
    }

    /// Adds a response header (e.g. Allow on a 405, Connection: close on a 408).
    pub fn header(mut self, name: header::HeaderName, value: &'static str) -> Problem {
        self.headers.push((name, value));
        self
    }

    pub fn not_found(detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::NOT_FOUND, "not-found", "Not found", detail)
    }

    pub fn bad_request(slug: &'static str, detail: impl Into<String>) -> Problem {
        Problem::new(StatusCode::BAD_REQUEST, slug, "Bad request", detail)
    }

    pub fn internal(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }

    pub fn into_response(self) -> Response<Body> {
        let mut body = json!({
            "type": format!("/problems/{}", self.slug),
            "title": self.title,
            "status": self.status.as_u16(),
            "detail": self.detail,
        });
        for (k, v) in self.extra {
            body[k] = v;
        }
        let mut resp = Response::new(full(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/problem+json"),
        );
        resp.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
        for (name, value) in self.headers {
            resp.headers_mut()
                .insert(name, header::HeaderValue::from_static(value));
        }
        resp
    }
}

/// The operator's log gets the whole error; the client gets what happened
/// and what to do, without the server's paths.
impl From<SpoolError> for Problem {
    fn from(e: SpoolError) -> Problem {
        tracing::error!(error = %e, "spool error while serving a request");
        let cause = client_cause(&e);
        if e.is_disk_full() {
            Problem::new(StatusCode::INSUFFICIENT_STORAGE, "disk-full", "Spool disk full", format!("the spool's disk is full, nothing was written ({cause}). Free space on it (or raise the quota), then retry"))
        } else if e.is_read_only() {
            Problem::new(StatusCode::SERVICE_UNAVAILABLE, "spool-read-only", "Spool not writable", format!("the spool cannot be written, nothing was written ({cause}). Make it writable for spoold, then retry"))
        } else {
            Problem::internal(format!(
                "the spool could not be read or written ({cause}); spoold's log names the file"
            ))
        }
    }
}

/// What went wrong, without the path: the OS error, or the kind of damage.
fn client_cause(e: &SpoolError) -> String {
    match e {
        SpoolError::Io { op, source, .. } => format!("cannot {op} a spool file: {source}"),
        _ => "a spool file is damaged or of another format".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn io(op: &'static str, errno: i32) -> SpoolError {
        SpoolError::Io {
            op,
            path: PathBuf::from("/srv/secret/spool/events/x/status.json"),
            source: std::io::Error::from_raw_os_error(errno),
        }
    }

    #[test]
    fn spool_errors_keep_their_status_and_lose_their_path() {
        for (e, status, slug) in [
            (io("write", libc::ENOSPC), 507, "disk-full"),
            (io("write", libc::EROFS), 503, "spool-read-only"),
            (io("read", libc::EIO), 500, "internal"),
            (
                SpoolError::Damaged {
                    path: PathBuf::from("/srv/secret/x"),
                    detail: "bad".into(),
                },
                500,
                "internal",
            ),
        ] {
            let p = Problem::from(e);
            assert_eq!((p.status.as_u16(), p.slug), (status, slug));
            assert!(!p.detail.contains("/srv"), "{}", p.detail);
            assert!(p.detail.len() > 30, "{}", p.detail);
        }
    }
}
