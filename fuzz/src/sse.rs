//! The SSE encoder, `serve::sse::encode(event, id, data)`.
//!
//! Input: byte 0 says which fields are present (bit 0: event, bit 1: id);
//! the rest is split on `0xFF` into event, id and data (UTF-8, lossy).
//!
//! Asserts: the frame holds no CR and no NUL at all, only `event:`, `id:` and
//! `data:` lines, and ends with a blank line. A conforming parser (the WHATWG
//! algorithm, written out below) reads exactly one event from it, and two
//! frames in a row as exactly two events: the event name is the given one
//! minus CR, LF and NUL; the id likewise; the data is the given data with
//! CRLF and CR read as LF and NUL as U+FFFD. So no input can add a field or an
//! event, or end one early.

use spoold::serve::sse::encode;

pub fn check(data: &[u8]) {
    let flags = data.first().copied().unwrap_or(0);
    let parts = super::split(data.get(1..).unwrap_or_default(), 3);
    let part = |i: usize| parts.get(i).map(|p| super::text(p)).unwrap_or_default();
    let (event, id, body) = (part(0), part(1), part(2));
    let event = (flags & 1 != 0).then_some(event.as_str());
    let id = (flags & 2 != 0).then_some(id.as_str());

    let frame = encode(event, id, &body);
    assert!(!frame.contains(['\r', '\0']), "{frame:?}");
    assert!(frame.ends_with("\n\n"), "{frame:?}");
    let lines: Vec<&str> = frame[..frame.len() - 2].split('\n').collect();
    for line in &lines {
        let known = ["event: ", "id: ", "data: "];
        assert!(
            known.iter().any(|k| line.starts_with(k)),
            "{line:?} in {frame:?}"
        );
    }
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("event:")).count(),
        usize::from(event.is_some())
    );
    assert_eq!(
        lines.iter().filter(|l| l.starts_with("id:")).count(),
        usize::from(id.is_some())
    );

    let want = Parsed {
        event: event.map(strip),
        id: id.map(strip),
        data: body
            .replace("\r\n", "\n")
            .replace('\r', "\n")
            .replace('\0', "\u{fffd}"),
    };
    assert_eq!(parse(&frame), std::slice::from_ref(&want), "{frame:?}");
    let twice = format!("{frame}{frame}");
    assert_eq!(parse(&twice), [want.clone(), want], "{twice:?}");
}

fn strip(s: &str) -> String {
    s.replace(['\r', '\n', '\0'], "")
}

/// One dispatched event, as an EventSource would see it.
#[derive(Clone, Debug, PartialEq)]
struct Parsed {
    event: Option<String>,
    id: Option<String>,
    data: String,
}

/// The WHATWG "interpret an event stream" algorithm, for one stream: lines end
/// at CRLF, CR or LF; a blank line dispatches; `:` starts a comment; a field's
/// value loses one leading space; an id with NUL is ignored; an event with
/// empty data is not dispatched. Unknown fields are ignored by the algorithm,
/// but here they fail the check, since spoold never sends any.
fn parse(stream: &str) -> Vec<Parsed> {
    let stream = stream.strip_prefix('\u{feff}').unwrap_or(stream);
    let mut out = Vec::new();
    let (mut event, mut id, mut data) = (None::<String>, None::<String>, String::new());
    let mut rest = stream;
    while !rest.is_empty() {
        let end = rest
            .find(['\r', '\n'])
            .expect("a stream ends with a line break");
        let line = &rest[..end];
        let brk = if rest[end..].starts_with("\r\n") {
            2
        } else {
            1
        };
        rest = &rest[end + brk..];
        if line.is_empty() {
            if !data.is_empty() {
                data.pop();
                out.push(Parsed {
                    event: event.take(),
                    id: id.clone(),
                    data: std::mem::take(&mut data),
                });
            }
            event = None;
            data.clear();
            continue;
        }
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => {
                data.push_str(value);
                data.push('\n');
            }
            "id" if !value.contains('\0') => id = Some(value.to_owned()),
            other => panic!("field {other:?} in {stream:?}"),
        }
    }
    out
}
