//! The fault suite (issue 3): spoold's promise is that an accepted event is
//! never lost and never recorded twice, whatever crashes, and that nothing
//! outside the operator's intent runs or is read.
//!
//! Every scenario drives the real binary (see `tests/common`) and ends with
//! the same invariants, checked over the spool on disk and through the HTTP
//! API ([`support::audit`]):
//! - every event that got a `202` (or `200` for its Idempotency-Key) reaches
//!   exactly one terminal status, and keeps it;
//! - no handler starts for an event after its terminal status was written,
//!   and `attempt` counts every start (fixture handlers append
//!   `<id> <attempt> start` / `<id> <attempt> end <code>` to a log);
//! - nothing is left in `tmp/` after recovery;
//! - every `status.json`, result and queue entry on disk parses (never torn).
//!
//! Scenarios, one module each:
//! - [`crash_loop`]: seeded kill -9 of the server at random moments, over
//!   thousands of events, plus SIGKILLs of handlers; a smaller loop with
//!   fsync on. `SPOOLD_FAULT_SEED=<n>` replays a run; the seed is printed.
//! - [`grandchild`]: the server dies while a handler's children (in its
//!   group, or escaped with `setsid`) still run.
//! - [`bad_handlers`]: hangs, ignored SIGTERM, silent exits, floods, garbage
//!   and half-written progress, symlinks and FIFOs, a deleted event
//!   directory, daemons.
//! - [`disk`]: the spool on a small tmpfs that fills up, and made read-only
//!   (needs root to mount; skipped with a reason otherwise, unless `CI` is set).
//! - [`damage`]: files truncated or deleted by hand, strays, a spool of
//!   another format.
//! - [`idempotency`]: 50 concurrent submits with one key, also across a crash.
//!
//! Figures (`cargo test --test faults -- --nocapture`) are printed by the
//! crash loops in one line each, starting with `FAULTS`.

mod common;

#[path = "faults/bad_handlers.rs"]
mod bad_handlers;
#[path = "faults/crash_loop.rs"]
mod crash_loop;
#[path = "faults/damage.rs"]
mod damage;
#[path = "faults/disk.rs"]
mod disk;
#[path = "faults/grandchild.rs"]
mod grandchild;
#[path = "faults/idempotency.rs"]
mod idempotency;
#[path = "faults/support.rs"]
mod support;
