//! Event IDs and handler types, the names that become paths.
//!
//! Input: the text (UTF-8, lossy) is tried as an ID and as a type; when it is
//! longer than 26 bytes its first two 26-byte windows are tried as IDs too.
//!
//! Asserts, for IDs: accepted exactly when the text is 26 Crockford base-32
//! characters (either case) starting with 0-7; an accepted ID is the text in
//! upper case, 26 characters of the alphabet, `parse(display(x)) == x`, one
//! plain path component, and its timestamp fits 48 bits; IDs sort like their
//! timestamps. For types: accepted exactly when the text matches
//! `[a-z0-9][a-z0-9._-]{0,63}`, so never with `/`, NUL, a leading `.`, or as
//! `.`/`..`; an accepted type (and `<type>.toml`) is one plain path component.

use std::path::{Component, Path};

use spoold::spool::ids::{EventId, HandlerType};

const CROCKFORD: &str = "0123456789ABCDEFGHJKMNPQRSTVWXYZ";

pub fn check(data: &[u8]) {
    let s = super::text(data);
    check_id(&s);
    check_type(&s);
    if data.len() >= 52 {
        let (a, b) = (super::text(&data[..26]), super::text(&data[26..52]));
        check_id(&a);
        check_id(&b);
        if let (Ok(a), Ok(b)) = (EventId::parse(&a), EventId::parse(&b)) {
            if a.timestamp_ms() < b.timestamp_ms() {
                assert!(a < b, "{a} is older than {b} but does not sort first");
            }
        }
    }
}

fn check_id(s: &str) {
    let expected = s.len() == 26
        && s.chars()
            .all(|c| CROCKFORD.contains(c.to_ascii_uppercase()))
        && s.as_bytes()[0].is_ascii_digit()
        && s.as_bytes()[0] <= b'7';
    let parsed = EventId::parse(s);
    assert_eq!(
        parsed.is_ok(),
        expected,
        "EventId::parse({s:?}) = {parsed:?}"
    );
    let Ok(id) = parsed else { return };
    let text = id.as_str();
    assert_eq!(text, s.to_ascii_uppercase());
    assert_eq!(text.len(), 26);
    assert!(text.chars().all(|c| CROCKFORD.contains(c)), "{text:?}");
    assert_eq!(id.to_string(), text);
    assert_eq!(EventId::parse(&id.to_string()).as_ref(), Ok(&id));
    assert!(id.timestamp_ms() < 1 << 48);
    one_component(text);
}

fn check_type(s: &str) {
    let b = s.as_bytes();
    let expected = (1..=64).contains(&b.len())
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c));
    let parsed = HandlerType::parse(s);
    assert_eq!(
        parsed.is_ok(),
        expected,
        "HandlerType::parse({s:?}) = {parsed:?}"
    );
    let Ok(kind) = parsed else { return };
    let text = kind.as_str();
    assert_eq!(text, s);
    assert_eq!(kind.to_string(), text);
    assert!(
        !text.contains(['/', '\0']) && !text.starts_with('.'),
        "{text:?}"
    );
    one_component(text);
    one_component(&format!("{text}.toml"));
}

/// Joined to a directory, the name stays one level inside it.
fn one_component(name: &str) {
    let comps: Vec<_> = Path::new(name).components().collect();
    assert_eq!(comps, [Component::Normal(name.as_ref())], "{name:?}");
    let joined = Path::new("/spool/events").join(name);
    assert_eq!(joined.parent(), Some(Path::new("/spool/events")));
}
