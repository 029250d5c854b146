//! Event bodies: `serve::submit::json_body`, which reads a submit's body
//! under the `max_body_bytes` cap and checks that it is JSON.
//!
//! Input: byte 0 sets the cap (times 8 bytes: 0 to 2040), byte 1 the size of
//! the chunks the body arrives in (1 to 64 bytes); the rest is the body.
//!
//! Asserts: a body over the cap is always `413 body-too-large`, however it is
//! chunked; within the cap, an empty or all-whitespace body is `{}`, and any
//! other is accepted exactly when it is one JSON document in UTF-8 (else
//! `400 bad-json`); an accepted payload is the body's own bytes without the
//! surrounding whitespace, and survives `event.json` (written and read back
//! byte for byte).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::{pin, Pin};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use hyper::body::{Body, Frame};
use hyper::StatusCode;
use serde::de::IgnoredAny;
use serde_json::value::RawValue;
use spoold::serve::sse::json_body;
use spoold::spool::records::{Envelope, Timestamp};

pub fn check(data: &[u8]) {
    let cap = usize::from(data.first().copied().unwrap_or(0)) * 8;
    let chunk = 1 + usize::from(data.get(1).copied().unwrap_or(0)) % 64;
    let body = data.get(2..).unwrap_or_default();
    let chunks = body.chunks(chunk).map(Bytes::copy_from_slice).collect();

    let mut read = pin!(json_body(Chunks(chunks), cap));
    let Poll::Ready(got) = read.as_mut().poll(&mut Context::from_waker(Waker::noop())) else {
        panic!("a body that is all there must be read at once");
    };
    if body.len() > cap {
        let p = got.expect_err("a body over the cap was accepted");
        assert_eq!(
            (p.status, p.slug),
            (StatusCode::PAYLOAD_TOO_LARGE, "body-too-large")
        );
        return;
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        assert_eq!(got.expect("a blank body is {}").get(), "{}");
        return;
    }
    // JSON text is UTF-8 (RFC 8259); the payload becomes part of event.json.
    let is_json = std::str::from_utf8(body)
        .is_ok_and(|text| serde_json::from_str::<IgnoredAny>(text).is_ok());
    match got {
        Ok(payload) => {
            assert!(is_json, "accepted {:?}", String::from_utf8_lossy(body));
            let trimmed = body.trim_ascii();
            assert_eq!(payload.get().as_bytes(), trimmed);
            survives_event_json(payload);
        }
        Err(p) => {
            assert!(!is_json, "rejected JSON: {}", p.detail);
            assert_eq!((p.status, p.slug), (StatusCode::BAD_REQUEST, "bad-json"));
        }
    }
}

fn survives_event_json(payload: Box<RawValue>) {
    let raw = payload.get().to_owned();
    let env = Envelope {
        id: "01HF7YAT00AAAAAAAAAAAAAAAA".into(),
        kind: "report".into(),
        submitted_at: Timestamp::from_unix_ms(1_700_000_000_000),
        max_attempts: 3,
        timeout: 30.0,
        headers: Default::default(),
        idempotency_key: None,
        payload,
    };
    let written = serde_json::to_vec(&env).expect("an envelope serializes");
    let again: Envelope = serde_json::from_slice(&written).expect("event.json reads back");
    assert_eq!(again.payload.get(), raw);
}

/// A request body that has all its chunks at hand.
struct Chunks(VecDeque<Bytes>);

impl Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(|b| Ok(Frame::data(b))))
    }
}
