//! spoold: a serverless-style event processor on a file spool.
//!
//! The data path, one module per stage, wired together in [`app`]:
//! [`spool`] (the directory that is the queue and the store) →
//! [`watch`] (filesystem hints) → [`dispatch`] (claims and handler runs) →
//! [`serve`] (HTTP: submit, poll, stream, pages; [`auth`] tokens), with [`hub`] carrying status
//! changes from dispatch to the followers in serve.

pub mod app;
pub mod auth;
pub mod client;
pub mod config;
pub mod dispatch;
pub mod hub;
pub mod metrics;
pub mod report;
pub mod serve;
pub mod spool;
pub mod watch;
