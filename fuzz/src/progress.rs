//! `progress.json`, which any handler writes: read with
//! `dispatch::progress::parse` and folded into the status with
//! `dispatch::runner::apply_progress`.
//!
//! Input: the file's bytes, any bytes at all (not UTF-8, not JSON, huge numbers).
//!
//! Asserts: a reading exists exactly when the text (invalid UTF-8 replaced) is
//! a JSON object; its progress is finite and within 0..=100; its message is
//! cut to 4 KiB (plus the ellipsis), its data to 64 KiB of JSON; its content
//! type is printable ASCII (it becomes a header), at most 200 bytes. Folded
//! into a running status, progress stays within 0..=100, `seq` grows by one
//! exactly when something changed, and folding the same reading again changes
//! nothing.

use serde_json::Value;
use spoold::dispatch::progress::parse;
use spoold::dispatch::runner::apply_progress;
use spoold::spool::records::{State, Status, Timestamp};

pub fn check(data: &[u8]) {
    let reading = parse(data);
    let is_object = matches!(
        serde_json::from_str::<Value>(&super::text(data)),
        Ok(Value::Object(_))
    );
    assert_eq!(
        reading.is_some(),
        is_object,
        "parse({:?})",
        super::text(data)
    );
    let Some(p) = reading else { return };
    if let Some(n) = p.progress {
        assert!(n.is_finite() && (0.0..=100.0).contains(&n), "progress {n}");
    }
    if let Some(m) = &p.message {
        assert!(
            m.len() <= 4096 + '…'.len_utf8(),
            "message of {} bytes",
            m.len()
        );
    }
    if let Some(d) = &p.data {
        assert!(d.to_string().len() <= 64 * 1024);
    }
    if let Some(ct) = &p.content_type {
        assert!(!ct.is_empty() && ct.len() <= 200, "{ct:?}");
        assert!(ct.bytes().all(|b| (0x20..0x7f).contains(&b)), "{ct:?}");
    }

    let mut st = running();
    let before = st.clone();
    let changed = apply_progress(&mut st, p);
    assert_eq!(st.seq, before.seq + u64::from(changed));
    if !changed {
        assert_eq!(st, before);
    }
    if let Some(n) = st.progress {
        assert!((0.0..=100.0).contains(&n), "folded progress {n}");
    }
    let again = parse(data).expect("the same bytes read the same");
    let seq = st.seq;
    assert!(
        !apply_progress(&mut st, again),
        "a repeated reading changed the status"
    );
    assert_eq!(st.seq, seq);
}

fn running() -> Status {
    let at = Timestamp::from_unix_ms(1_700_000_000_000);
    Status {
        state: State::Running,
        seq: 2,
        progress: Some(10.0),
        message: Some("started".into()),
        attempt: 1,
        max_attempts: 3,
        host: Some("web1".into()),
        started_at: Some(at),
        ..Status::queued("01HF7YAT00AAAAAAAAAAAAAAAA", "report", at)
    }
}
