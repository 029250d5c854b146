//! Reading `progress.json`, which the handler replaces whenever it likes.
//!
//! The file is checked (a stat, and a read only when its size, mtime or
//! inode changed) when the handler writes it (`watch::Runs`) and every
//! `progress_interval`, which works the same on local disks and on NFS. Whatever the handler wrote is taken leniently: invalid UTF-8 is
//! replaced, progress is clamped to 0..=100, oversized messages and data are
//! cut, and a file that is not a JSON object is skipped (and logged) rather
//! than failing the event.

use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use serde_json::Value;

const MAX_MESSAGE: usize = 4096;
const MAX_DATA: usize = 64 * 1024;
/// The most of progress.json that is read: far more than a message and data
/// take; a larger file is not a progress report.
const MAX_FILE: u64 = 1024 * 1024;

/// One reading of progress.json.
#[derive(Debug, Default, PartialEq)]
pub struct Progress {
    pub progress: Option<f64>,
    pub message: Option<String>,
    pub data: Option<Value>,
    pub content_type: Option<String>,
}

pub struct ProgressFile {
    path: PathBuf,
    seen: Option<(i64, i64, u64, u64)>,
    pub content_type: Option<String>,
}

impl ProgressFile {
    pub fn new(path: PathBuf) -> ProgressFile {
        ProgressFile {
            path,
            seen: None,
            content_type: None,
        }
    }

    /// The new contents, if the file changed since the last call.
    pub fn poll(&mut self) -> Option<Progress> {
        let meta = fs::symlink_metadata(&self.path).ok()?;
        let sig = (meta.mtime(), meta.mtime_nsec(), meta.ino(), meta.len());
        if self.seen == Some(sig) {
            return None;
        }
        self.seen = Some(sig);
        // Only a regular file, at most MAX_FILE: the handler may have left a
        // symlink (to a file outside the spool, or /dev/zero) or a FIFO here.
        let mut bytes = Vec::new();
        let read = crate::spool::open_regular(&self.path)
            .and_then(|f| f.take(MAX_FILE + 1).read_to_end(&mut bytes));
        if let Err(e) = read {
            tracing::warn!(path = %self.path.display(), error = %e, "progress.json cannot be read; ignored (write a regular file, atomically)");
            return None;
        }
        if bytes.len() as u64 > MAX_FILE {
            tracing::warn!(path = %self.path.display(), "progress.json is over 1 MiB; ignored");
            return None;
        }
        let parsed = parse(&bytes);
        if parsed.is_none() {
            tracing::warn!(path = %self.path.display(), "progress.json is not a JSON object; ignored (write it atomically: to a temp file, then rename)");
        }
        let p = parsed?;
        if p.content_type.is_some() {
            self.content_type.clone_from(&p.content_type);
        }
        Some(p)
    }
}

pub fn parse(bytes: &[u8]) -> Option<Progress> {
    let text = String::from_utf8_lossy(bytes);
    let Value::Object(map) = serde_json::from_str::<Value>(&text).ok()? else {
        return None;
    };
    let progress = match map.get("progress") {
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().trim_end_matches('%').parse::<f64>().ok(),
        _ => None,
    }
    .filter(|p| p.is_finite())
    .map(|p| p.clamp(0.0, 100.0));
    let message = match map.get("message") {
        Some(Value::String(s)) => Some(cut(s, MAX_MESSAGE)),
        Some(Value::Null) | None => None,
        Some(other) => Some(cut(&other.to_string(), MAX_MESSAGE)),
    };
    let data = map
        .get("data")
        .cloned()
        .filter(|d| d.to_string().len() <= MAX_DATA);
    let content_type = match map.get("content_type") {
        Some(Value::String(s)) if is_token_like(s) => Some(s.clone()),
        _ => None,
    };
    Some(Progress {
        progress,
        message,
        data,
        content_type,
    })
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// A content type must be printable ASCII (it becomes a header).
fn is_token_like(s: &str) -> bool {
    !s.is_empty() && s.len() <= 200 && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_is_clamped_and_lenient() {
        let p = parse(br#"{"progress": 140, "message": "hi"}"#).unwrap();
        assert_eq!(p.progress, Some(100.0));
        assert_eq!(p.message.as_deref(), Some("hi"));
        assert_eq!(parse(br#"{"progress": -3}"#).unwrap().progress, Some(0.0));
        assert_eq!(
            parse(br#"{"progress": "40%"}"#).unwrap().progress,
            Some(40.0)
        );
        assert!(parse(b"{\"progress\": 4").is_none());
        assert!(parse(b"[1,2]").is_none());
        let bad_utf8 = parse(b"{\"message\": \"a\xffb\"}").unwrap();
        assert_eq!(bad_utf8.message.as_deref(), Some("a\u{fffd}b"));
        assert!(parse(br#"{"content_type": "text/html\r\nX: y"}"#)
            .unwrap()
            .content_type
            .is_none());
    }
}
