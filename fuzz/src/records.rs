//! The JSON records read back from the spool: `status.json`, `event.json`
//! and queue entries. A damaged or hand-edited file must be an error (which
//! spoold reports or repairs), never a panic.
//!
//! Input: a file's bytes, tried as each of the three records.
//!
//! Asserts: parsing any bytes returns (no panic). A status that parses can be
//! written again (`to_json`) and reads back the same (timestamps at
//! millisecond precision, floats as JSON reads them), and its next version
//! (`next`) has a larger seq, or the same one at `u64::MAX`, never a
//! smaller. An envelope that parses yields its initial status (queued, seq
//! 0) and writes back with the payload byte for byte. A queue entry reads
//! back equal.

use serde_json::Value;
use spoold::spool::records::{Envelope, QueueEntry, State, Status, Timestamp};

pub fn check(data: &[u8]) {
    if let Ok(st) = serde_json::from_slice::<Status>(data) {
        status(&st);
    }
    if let Ok(env) = serde_json::from_slice::<Envelope>(data) {
        envelope(&env);
    }
    if let Ok(entry) = serde_json::from_slice::<QueueEntry>(data) {
        let again: QueueEntry = serde_json::from_slice(&serde_json::to_vec(&entry).unwrap())
            .expect("a queue entry reads back");
        assert_eq!(again, entry);
    }
}

fn status(st: &Status) {
    let written = st.to_json();
    let again: Status = serde_json::from_slice(&written).unwrap_or_else(|e| {
        panic!(
            "status {} does not read back: {e}",
            String::from_utf8_lossy(&written)
        )
    });
    // What was written is what reads back (compared as JSON, which reads its
    // numbers with the same parser as the status: no rounding in between).
    let text: Value = serde_json::from_slice(&written).expect("a status is JSON");
    assert_eq!(serde_json::to_value(&again).unwrap(), text);
    // The fields without floats survive the round trip itself.
    assert_eq!(
        (
            &again.id,
            &again.kind,
            again.state,
            again.seq,
            &again.message
        ),
        (&st.id, &st.kind, st.state, st.seq, &st.message)
    );
    assert_eq!(
        (
            again.attempt,
            again.max_attempts,
            &again.host,
            again.exit_code
        ),
        (st.attempt, st.max_attempts, &st.host, st.exit_code)
    );
    assert_eq!(
        (&again.error, again.dead_letter, &again.result),
        (&st.error, st.dead_letter, &st.result)
    );
    let ms = |s: &Status| {
        let opt = |t: Option<Timestamp>| t.map(Timestamp::unix_ms);
        let (sub, upd) = (s.submitted_at.unix_ms(), s.updated_at.unix_ms());
        (
            sub,
            upd,
            opt(s.started_at),
            opt(s.finished_at),
            opt(s.retry_at),
        )
    };
    assert_eq!(ms(&again), ms(st));
    let next = st.next();
    assert!(
        next.seq > st.seq || st.seq == u64::MAX,
        "seq {} did not grow",
        st.seq
    );
    assert!(
        next.seq >= st.seq,
        "seq {} went back to {}",
        st.seq,
        next.seq
    );
    next.to_json();
}

fn envelope(env: &Envelope) {
    let initial = Status::initial(env);
    assert_eq!((initial.state, initial.seq), (State::Queued, 0));
    status(&initial);
    let written = serde_json::to_vec(env).expect("an envelope serializes");
    let again: Envelope = serde_json::from_slice(&written).expect("an envelope reads back");
    assert_eq!(again.payload.get(), env.payload.get());
    assert_eq!((&again.id, &again.kind), (&env.id, &env.kind));
}
