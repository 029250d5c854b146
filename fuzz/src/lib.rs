//! The checks behind spoold's fuzz targets: one module per thing spoold parses
//! from outside, each with `check(data: &[u8])`, which panics when a property
//! does not hold. A property is more than "does not panic": each module's doc
//! says what it asserts.
//!
//! The same code runs two ways. `fuzz_targets/<name>.rs` hands it to libFuzzer
//! (`cargo +nightly fuzz run <name>`), and `tests/fuzz.rs` in spoold includes
//! this file as a module and replays `fuzz/corpus/<name>/` through [`TARGETS`]
//! on stable, so the corpus is a regression suite without nightly.
//!
//! Inputs are plain bytes, never `arbitrary` structures, so that a corpus file
//! means the same thing in both runs. Targets that need several strings split
//! the input on the byte `0xFF`, which never occurs in UTF-8 text.

pub mod body;
pub mod ids;
pub mod last_event_id;
pub mod progress;
pub mod query;
pub mod records;
pub mod sse;

/// A target's check: panics when a property does not hold for the input.
pub type Check = fn(&[u8]);

/// Every target: its name (`fuzz_targets/<name>.rs`, `corpus/<name>/`) and check.
pub const TARGETS: &[(&str, Check)] = &[
    ("body", body::check),
    ("ids", ids::check),
    ("last_event_id", last_event_id::check),
    ("progress", progress::check),
    ("query", query::check),
    ("records", records::check),
    ("sse", sse::check),
];

/// The input split on `0xFF` into at most `n` parts (the last keeps the rest).
pub fn split(data: &[u8], n: usize) -> Vec<&[u8]> {
    data.splitn(n, |&b| b == 0xFF).collect()
}

/// Bytes as text the way a lenient reader takes them.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
