//! Counters for `GET /metrics` (Prometheus text format).

use std::fmt::Write;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub submitted: AtomicU64,
    pub started: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub timed_out: AtomicU64,
    pub cancelled: AtomicU64,
    pub retried: AtomicU64,
    pub dead_lettered: AtomicU64,
    pub running: AtomicI64,
    pub http_requests: AtomicU64,
    pub sse_open: AtomicI64,
}

impl Metrics {
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, queued: usize) -> String {
        let mut out = String::new();
        let counters = [
            (
                "spoold_events_submitted_total",
                "Events accepted by this host.",
                &self.submitted,
            ),
            (
                "spoold_handler_starts_total",
                "Handler processes started.",
                &self.started,
            ),
            (
                "spoold_events_succeeded_total",
                "Events that succeeded.",
                &self.succeeded,
            ),
            (
                "spoold_events_failed_total",
                "Events that failed for good.",
                &self.failed,
            ),
            (
                "spoold_events_timed_out_total",
                "Events whose handler ran past its timeout.",
                &self.timed_out,
            ),
            (
                "spoold_events_cancelled_total",
                "Events cancelled.",
                &self.cancelled,
            ),
            (
                "spoold_retries_total",
                "Failed attempts put back in the queue.",
                &self.retried,
            ),
            (
                "spoold_dead_letters_total",
                "Events given up on after their last attempt.",
                &self.dead_lettered,
            ),
            (
                "spoold_http_requests_total",
                "HTTP requests served.",
                &self.http_requests,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                value.load(Ordering::Relaxed)
            );
        }
        let gauges = [
            (
                "spoold_handlers_running",
                "Handler processes running now.",
                self.running.load(Ordering::Relaxed),
            ),
            (
                "spoold_sse_streams_open",
                "Open SSE streams.",
                self.sse_open.load(Ordering::Relaxed),
            ),
            (
                "spoold_queue_pending",
                "Queue entries this host knows of.",
                queued as i64,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out
    }
}
