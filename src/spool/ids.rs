//! Names that come from outside and end up in paths: event IDs and handler types.
//!
//! Every ID or type taken from a URL, a file name or a CLI argument goes through
//! [`EventId::parse`] or [`HandlerType::parse`] before it touches a path, so no
//! input can name `..`, a slash, or anything but one plain file name.
//!
//! IDs are ULIDs: 48 bits of milliseconds and 80 random bits, written as 26
//! upper-case Crockford base-32 characters. They sort by creation time, which
//! makes the queue FIFO by name and lets retention stop at the first young one.
//! Within one process they are strictly increasing (the random part is bumped
//! when the clock does not move), so two submits in the same millisecond keep
//! their order.

use std::fmt;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const CROCKFORD: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
const ULID_LEN: usize = 26;

/// A validated event ID (ULID).
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct InvalidName(pub String);

impl EventId {
    /// A fresh ID, greater than every ID this process made before.
    pub fn generate() -> EventId {
        static LAST: Mutex<(u64, u128)> = Mutex::new((0, 0));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        let (ms, rand) = if now > last.0 {
            (now, random_u80())
        } else {
            // Same millisecond (or the clock went back): keep order by counting up.
            (last.0, (last.1 + 1) & ((1u128 << 80) - 1))
        };
        *last = (ms, rand);
        EventId(encode((u128::from(ms) << 80) | rand))
    }

    /// Accepts exactly 26 Crockford base-32 characters (either case) whose
    /// first digit keeps the value within 128 bits.
    pub fn parse(s: &str) -> Result<EventId, InvalidName> {
        let bad = || {
            InvalidName(format!(
                "{:?} is not an event ID: IDs are 26-character ULIDs such as 01JD8X3Q7M2N4P5R6S7T8V9W0X, as returned in the Location header of a submit",
                truncate(s, 40)
            ))
        };
        if s.len() != ULID_LEN || !s.bytes().all(|b| decode_char(b).is_some()) {
            return Err(bad());
        }
        if decode_char(s.as_bytes()[0]).unwrap_or(8) > 7 {
            return Err(bad());
        }
        Ok(EventId(s.to_ascii_uppercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Milliseconds since the Unix epoch at which the ID was made.
    pub fn timestamp_ms(&self) -> u64 {
        let value = self.0.bytes().fold(0u128, |acc, b| {
            (acc << 5) | u128::from(decode_char(b).unwrap_or(0))
        });
        (value >> 80) as u64
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn encode(mut value: u128) -> String {
    let mut out = [0u8; ULID_LEN];
    for slot in out.iter_mut().rev() {
        *slot = CROCKFORD[(value & 31) as usize];
        value >>= 5;
    }
    String::from_utf8(out.to_vec()).expect("base32 alphabet is ASCII")
}

fn decode_char(b: u8) -> Option<u8> {
    CROCKFORD
        .iter()
        .position(|&c| c == b.to_ascii_uppercase())
        .map(|p| p as u8)
}

fn random_u80() -> u128 {
    let mut buf = [0u8; 10];
    // getrandom only fails when the OS has no entropy source at all.
    getrandom::fill(&mut buf).expect("the OS random source is unavailable");
    buf.iter().fold(0u128, |acc, &b| (acc << 8) | u128::from(b))
}

/// A validated handler type: `[a-z0-9][a-z0-9._-]{0,63}`. Names `handlers/<type>`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub struct HandlerType(String);

impl HandlerType {
    pub fn parse(s: &str) -> Result<HandlerType, InvalidName> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || (i > 0 && matches!(b, b'.' | b'_' | b'-'))
            });
        if ok {
            Ok(HandlerType(s.to_owned()))
        } else {
            Err(InvalidName(format!(
                "{:?} is not a valid event type: a type is 1 to 64 characters of a-z, 0-9, '.', '_' or '-', starting with a letter or digit, and names an executable in the handlers directory",
                truncate(s, 70)
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HandlerType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn truncate(s: &str, max: usize) -> String {
    s.chars().take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_increase() {
        let mut prev = EventId::generate();
        for _ in 0..10_000 {
            let next = EventId::generate();
            assert!(next > prev, "{next} must sort after {prev}");
            assert_eq!(EventId::parse(next.as_str()).unwrap(), next);
            prev = next;
        }
    }

    #[test]
    fn id_timestamp_is_close_to_now() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ts = EventId::generate().timestamp_ms();
        assert!(ts.abs_diff(now) < 5_000);
    }

    #[test]
    fn ids_that_could_leave_the_spool_are_rejected() {
        for bad in [
            "",
            "..",
            "../../etc/passwd",
            "01JD8X3Q7M2N4P5R6S7T8V9W0/",
            "01JD8X3Q7M2N4P5R6S7T8V9W0X0",
            "81JD8X3Q7M2N4P5R6S7T8V9W0X",
            "01JD8X3Q7M2N4P5R6S7T8V9W0U",
            "01JD8X3Q7M2N4P5R6S7T8V9W0\0",
        ] {
            assert!(EventId::parse(bad).is_err(), "{bad:?} must be rejected");
        }
        assert_eq!(
            EventId::parse("01jd8x3q7m2n4p5r6s7t8v9w0x")
                .unwrap()
                .as_str(),
            "01JD8X3Q7M2N4P5R6S7T8V9W0X"
        );
    }

    #[test]
    fn types_follow_the_handler_name_rule() {
        for good in ["report", "a", "jq", "x.y_z-1", &"a".repeat(64)] {
            assert!(HandlerType::parse(good).is_ok(), "{good:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-x",
            "Report",
            "a/b",
            "a b",
            &"a".repeat(65),
            "ä",
        ] {
            assert!(HandlerType::parse(bad).is_err(), "{bad:?}");
        }
    }
}
