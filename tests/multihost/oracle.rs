//! The invariants of a crash test, checked on the backing directory (the
//! "NFS server's disk") once every host has stopped:
//!
//! - every accepted event has a final status, `succeeded`, recorded exactly
//!   once: one `event finished` line in all the hosts' logs together;
//! - the handlers' own record (`runs.log`, appended outside the mounts) shows
//!   exactly one completed run per event, and it is the event's last line: no
//!   run completed twice and nothing started after it;
//! - that run is the one the status names (host and attempt), and the result
//!   is its output;
//! - attempts only grow: no attempt number was started twice;
//! - nothing is left in `queue/`, `running/*/`, `dead/`, `tmp/`, or as a
//!   process mark in `hosts/*/`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs;

use crate::cluster::Cluster;
use crate::common;

/// One line of `runs.log`.
#[derive(Debug, Clone)]
pub struct Run {
    /// `start`, `fail` or `done`.
    pub what: String,
    pub id: String,
    pub host: String,
    pub attempt: u32,
    /// Wall-clock time of the line, in ns since 1970 (the handlers' clock).
    pub t_ns: u128,
}

/// Every line of `runs.log` so far.
pub fn runs(cl: &Cluster) -> Vec<Run> {
    fs::read_to_string(&cl.runs)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some(Run {
                what: f.first()?.to_string(),
                id: f.get(1)?.to_string(),
                host: f.get(2)?.to_string(),
                attempt: f.get(3)?.parse().ok()?,
                t_ns: f.get(4).and_then(|t| t.parse().ok()).unwrap_or(0),
            })
        })
        .collect()
}

/// What the run looked like, for the scenario's own assertions.
#[derive(Debug, Default)]
pub struct Summary {
    /// Completed runs per host.
    pub done_by_host: BTreeMap<String, usize>,
    /// Handler starts in all (retries and takeovers make more than events).
    pub starts: usize,
    /// Claims moved back to the queue because their lease expired.
    pub takeovers: usize,
}

/// Stops every host, then checks the invariants for `accepted` (the IDs
/// that got a 202); panics listing the violations.
pub fn check(cl: &mut Cluster, accepted: &[String]) -> Summary {
    cl.stop_all();
    let mut bad = Vec::new();
    let all_runs = runs(cl);
    let mut by_id: HashMap<&str, Vec<&Run>> = HashMap::new();
    for r in &all_runs {
        by_id.entry(r.id.as_str()).or_default().push(r);
    }
    let finished = finished_lines(cl);
    let accepted_set: HashSet<&str> = accepted.iter().map(String::as_str).collect();
    for id in by_id.keys().filter(|id| !accepted_set.contains(*id)) {
        bad.push(format!("{id}: ran, but was never accepted"));
    }
    let mut summary = Summary::default();
    for id in accepted {
        let runs = by_id.get(id.as_str()).cloned().unwrap_or_default();
        check_event(cl, id, &runs, finished.get(id.as_str()).copied(), &mut bad);
        if let Some(done) = runs.iter().find(|r| r.what == "done") {
            *summary.done_by_host.entry(done.host.clone()).or_default() += 1;
        }
        summary.starts += runs.iter().filter(|r| r.what == "start").count();
    }
    for dir in ["queue", "dead", "tmp"] {
        let left = common::names(&cl.spool.join(dir));
        if !left.is_empty() {
            bad.push(format!("{dir}/ is not empty: {left:?}"));
        }
    }
    for host in common::names(&cl.spool.join("running")) {
        let left = common::names(&cl.spool.join("running").join(&host));
        if !left.is_empty() {
            bad.push(format!("running/{host}/ is not empty: {left:?}"));
        }
    }
    for entry in common::names(&cl.spool.join("hosts")) {
        let dir = cl.spool.join("hosts").join(&entry);
        if dir.is_dir() && !common::names(&dir).is_empty() {
            bad.push(format!(
                "hosts/{entry}/ still has process marks: {:?}",
                common::names(&dir)
            ));
        }
    }
    summary.takeovers = cl.log_lines("moved a claim whose lease expired").len();
    if !bad.is_empty() {
        let n = bad.len();
        bad.truncate(25);
        panic!(
            "{n} invariant violations (first {}):\n{}",
            bad.len(),
            bad.join("\n")
        );
    }
    summary
}

fn check_event(
    cl: &Cluster,
    id: &str,
    runs: &[&Run],
    finished_logged: Option<usize>,
    bad: &mut Vec<String>,
) {
    let Some(status) = cl.disk_status(id) else {
        bad.push(format!("{id}: accepted but has no status.json"));
        return;
    };
    if common::state(&status) != "succeeded" || status["finished_at"].is_null() {
        bad.push(format!(
            "{id}: not succeeded: {}",
            serde_json::to_string(&status).unwrap()
        ));
        return;
    }
    if finished_logged != Some(1) {
        bad.push(format!(
            "{id}: {} `event finished` log lines, want exactly 1",
            finished_logged.unwrap_or(0)
        ));
    }
    let dones: Vec<&&Run> = runs.iter().filter(|r| r.what == "done").collect();
    if dones.len() != 1 {
        bad.push(format!(
            "{id}: {} completed runs, want 1: {runs:?}",
            dones.len()
        ));
        return;
    }
    let done = dones[0];
    if runs.last().map(|r| r.what.as_str()) != Some("done") {
        bad.push(format!(
            "{id}: a run started after the completed one: {runs:?}"
        ));
    }
    let starts: Vec<u32> = runs
        .iter()
        .filter(|r| r.what == "start")
        .map(|r| r.attempt)
        .collect();
    if starts.windows(2).any(|w| w[1] <= w[0]) {
        bad.push(format!("{id}: attempt numbers did not grow: {starts:?}"));
    }
    let (host, attempt) = (
        status["host"].as_str().unwrap_or(""),
        status["attempt"].as_u64().unwrap_or(0),
    );
    if done.host != host || u64::from(done.attempt) != attempt {
        bad.push(format!(
            "{id}: the status names {host} attempt {attempt}, but the completed run was {} attempt {}",
            done.host, done.attempt
        ));
    }
    let result =
        fs::read_to_string(cl.spool.join("events").join(id).join("result")).unwrap_or_default();
    let want = format!("{id} {} {}\n", done.host, done.attempt);
    if result != want {
        bad.push(format!("{id}: result {result:?}, want {want:?}"));
    }
}

/// `event finished` log lines per event ID, over every host's log.
fn finished_lines(cl: &Cluster) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (_, line) in cl.log_lines("event finished") {
        if let Some(at) = line.find("id=") {
            let id: String = line[at + 3..].chars().take(26).collect();
            *counts.entry(id).or_default() += 1;
        }
    }
    counts
}
