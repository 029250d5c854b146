//! The JSON records kept in the spool: the event envelope (`event.json`), the
//! status (`status.json`), and queue entries (`queue/<id>`).
//!
//! `event.json` is written once and never changed. `status.json` has one
//! writer at a time: the host that owns the event (its claim in `running/`).
//! Its `seq` grows by one on every write, which makes it the SSE `id` and the
//! HTTP `ETag`.
//!
//! A freshly submitted event has no `status.json`: its status, `queued` with
//! seq 0, follows from `event.json` alone ([`Status::initial`]). That saves one
//! fsync'd file per submit and means there is nothing to get out of step.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use super::ids::HandlerType;

/// A point in time, written as RFC 3339 UTC with milliseconds.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(SystemTime);

impl Timestamp {
    pub fn now() -> Timestamp {
        Timestamp(SystemTime::now())
    }

    pub fn from_unix_ms(ms: u64) -> Timestamp {
        Timestamp(UNIX_EPOCH + Duration::from_millis(ms))
    }

    pub fn unix_ms(self) -> u64 {
        self.0
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    pub fn system_time(self) -> SystemTime {
        self.0
    }

    pub fn plus(self, d: Duration) -> Timestamp {
        Timestamp(self.0 + d)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.0))
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s)
            .map(Timestamp)
            .map_err(serde::de::Error::custom)
    }
}

/// `events/<id>/event.json`: what was submitted, and the policy it runs under.
#[derive(Serialize, Deserialize, Debug)]
pub struct Envelope {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub submitted_at: Timestamp,
    pub max_attempts: u32,
    /// Seconds a single attempt may run.
    pub timeout: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    pub payload: Box<RawValue>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Cancelled,
}

impl State {
    pub fn is_terminal(self) -> bool {
        !matches!(self, State::Queued | State::Running)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Succeeded => "succeeded",
            State::Failed => "failed",
            State::TimedOut => "timed_out",
            State::Cancelled => "cancelled",
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ResultInfo {
    pub content_type: String,
    pub bytes: u64,
}

/// `events/<id>/status.json`: the one view every API serves.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Status {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub state: State,
    pub seq: u64,
    pub progress: Option<f64>,
    pub message: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
    pub attempt: u32,
    pub max_attempts: u32,
    pub host: Option<String>,
    pub submitted_at: Timestamp,
    pub started_at: Option<Timestamp>,
    pub updated_at: Timestamp,
    pub finished_at: Option<Timestamp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_at: Option<Timestamp>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub dead_letter: bool,
    pub result: Option<ResultInfo>,
}

impl Status {
    /// The status of an event that no one has touched since it was submitted.
    pub fn initial(env: &Envelope) -> Status {
        Status {
            max_attempts: env.max_attempts,
            ..Status::queued(&env.id, &env.kind, env.submitted_at)
        }
    }

    /// A queued status with nothing known but the ID, type and submit time
    /// (seq 0, no attempts).
    pub fn queued(id: &str, kind: &str, submitted_at: Timestamp) -> Status {
        Status {
            id: id.to_owned(),
            kind: kind.to_owned(),
            state: State::Queued,
            seq: 0,
            progress: None,
            message: None,
            data: serde_json::Value::Object(Default::default()),
            attempt: 0,
            max_attempts: 0,
            host: None,
            submitted_at,
            started_at: None,
            updated_at: submitted_at,
            finished_at: None,
            retry_at: None,
            exit_code: None,
            error: None,
            dead_letter: false,
            result: None,
        }
    }

    /// The next version of this status: `seq` bumped and `updated_at` set.
    pub fn next(&self) -> Status {
        let mut s = self.clone();
        // Saturating: only a damaged or hand-edited status.json has seq
        // u64::MAX, and `+= 1` on it panicked (debug) or went back to 0
        // (release), under ETags and SSE ids that must never go back. Found
        // by the `records` fuzz target.
        s.seq = s.seq.saturating_add(1);
        s.updated_at = Timestamp::now();
        s
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a status always serializes")
    }
}

/// `queue/<id>`: a pending unit of work. Carries the type so that a host can
/// tell whether it has room to run it before it claims it, and a not-before
/// time for retries.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct QueueEntry {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before_ms: Option<u64>,
}

impl QueueEntry {
    pub fn now(kind: &HandlerType) -> QueueEntry {
        QueueEntry {
            kind: kind.as_str().to_owned(),
            not_before_ms: None,
        }
    }
}

/// `dead/<id>`: why an event was given up on.
#[derive(Serialize, Deserialize, Debug)]
pub struct DeadLetter {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub attempts: u32,
    pub error: Option<String>,
    pub at: Timestamp,
}

impl DeadLetter {
    pub fn new(id: &str, kind: &str, attempts: u32, error: Option<String>) -> DeadLetter {
        DeadLetter {
            id: id.to_owned(),
            kind: kind.to_owned(),
            attempts,
            error,
            at: Timestamp::now(),
        }
    }
}
