//! The result of a successful attempt: the file the handler wrote to
//! `$SPOOL_RESULT`, or else its standard output, capped at `max_result_bytes`,
//! with a content type from progress.json, then `T.toml`, then sniffed.

use std::io::{self, Read};

use super::handlers::HandlerSpec;
use super::process::Captured;
use crate::app::Shared;
use crate::spool::atomic::Durability;
use crate::spool::ids::EventId;
use crate::spool::records::ResultInfo;
use crate::spool::{self, IoContext, SpoolError};

/// Keeps the result. The inner `Err` is the handler's fault (a sentence for
/// the status's `error`); the outer one is the spool's (the event is given
/// back to the queue).
pub fn store(
    sh: &Shared,
    id: &EventId,
    spec: &HandlerSpec,
    reported_type: Option<String>,
    stdout: Captured,
) -> Result<Result<Option<ResultInfo>, String>, SpoolError> {
    let path = sh.spool.event_dir(id).join("result");
    let cap = sh.settings.max_result_bytes;
    // Opened once, never through a symlink (to a file outside the spool, or
    // to a device: it would be served as the result; found by the fault
    // suite's bad-handler tests) and without blocking on a FIFO.
    let (len, head) = match spool::open_regular(&path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if stdout.bytes.is_empty() {
                return Ok(Ok(None));
            }
            sh.spool
                .write_event_file(id, "result", &stdout.bytes, Durability::Durable)?;
            (
                stdout.bytes.len() as u64,
                stdout.bytes[..stdout.bytes.len().min(512)].to_vec(),
            )
        }
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => {
            return Ok(Err("the result is not a regular file (a symlink, FIFO or device); write the result itself to $SPOOL_RESULT".into()))
        }
        Err(e) => {
            return Ok(Err(format!(
                "the result file cannot be read ({e}); leave $SPOOL_RESULT a regular file that spoold may read"
            )))
        }
        Ok(file) => {
            let len = file.metadata().at("read", &path)?.len();
            if len > cap {
                return Ok(Err(format!(
                    "the result file is {len} bytes, over max_result_bytes ({cap})"
                )));
            }
            // The handler wrote it: its data goes to disk before the final
            // status that names it does (the status's flush covers only
            // the status itself and the directory).
            if sh.spool.writer().syncs_data() {
                file.sync_data().at("sync", &path)?;
            }
            let mut head = Vec::new();
            let _ = (&file).take(512).read_to_end(&mut head);
            (len, head)
        }
    };
    let content_type = reported_type
        .or_else(|| spec.content_type.clone())
        .unwrap_or_else(|| sniff(&head).into());
    Ok(Ok(Some(ResultInfo {
        content_type,
        bytes: len,
    })))
}

/// A content type from the first bytes of a result.
pub fn sniff(head: &[u8]) -> &'static str {
    let text = String::from_utf8_lossy(head);
    let t = text.trim_start().to_ascii_lowercase();
    if head.starts_with(b"%PDF-") {
        "application/pdf"
    } else if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else if head.starts_with(b"\xff\xd8\xff") {
        "image/jpeg"
    } else if head.starts_with(b"GIF8") {
        "image/gif"
    } else if t.starts_with("<?xml") {
        "application/xml"
    } else if t.starts_with("<!doctype html") || t.starts_with("<html") {
        "text/html; charset=utf-8"
    } else if t.starts_with('{') || t.starts_with('[') {
        "application/json"
    } else if is_utf8_allowing_a_cut_char(head) {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    }
}

/// UTF-8, where the 512-byte head may end in the middle of a character.
fn is_utf8_allowing_a_cut_char(head: &[u8]) -> bool {
    match std::str::from_utf8(head) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none() && head.len() >= 509,
    }
}

#[cfg(test)]
mod tests {
    use super::sniff;

    #[test]
    fn sniffing_knows_common_results() {
        assert_eq!(sniff(b"  {\"a\": 1}"), "application/json");
        assert_eq!(sniff(b"<?xml version=\"1.0\"?><r/>"), "application/xml");
        assert_eq!(sniff(b"<!DOCTYPE html><p>"), "text/html; charset=utf-8");
        assert_eq!(sniff(b"%PDF-1.7"), "application/pdf");
        assert_eq!(sniff(b"plain words"), "text/plain; charset=utf-8");
        assert_eq!(sniff(b"\x00\xff\xfe"), "application/octet-stream");
        let mut cut = "é".repeat(255).into_bytes();
        cut.push(0xc3);
        assert_eq!(
            sniff(&cut),
            "text/plain; charset=utf-8",
            "a character cut at 512 bytes is still text"
        );
    }
}
