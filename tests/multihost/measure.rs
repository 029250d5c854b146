//! Measurements of shared mode, run only on demand:
//!
//! ```console
//! $ cargo test --release --test multihost measure -- --ignored --nocapture
//! ```
//!
//! (`benches/multihost.sh` runs the same.) Prints, as Markdown tables:
//! - **takeover**: kill -9 of a host that holds claims → each of its events
//!   started again on another host (the handler's own start time, so it
//!   includes the claim and the spawn), with `lease_ttl = 3s`;
//! - **cross-host progress latency**: a handler on host3 writes progress with
//!   its wall-clock time; browsers' SSE streams on host1 (another host) and
//!   on host3 (the same host) note when each status arrives; with the default
//!   `progress_interval` (100 ms) and `shared_rescan_interval` (250 ms);
//! - **throughput**: N events submitted round-robin to 1 host, then to 3
//!   hosts, until all succeeded; once with a no-op handler (bound by this
//!   machine's CPUs, which the "hosts" share) and once with a handler that
//!   sleeps 0.2 s (bound by each host's `concurrency`).
//!
//! All "hosts" share one machine and its cores, so throughput on separate
//! machines would scale better than the no-op row shows.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::cluster::{cluster, Cluster};
use crate::common::secs;
use crate::{oracle, serial_or_skip, submit_claimed_by, wait_started};

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The q-quantile of sorted samples.
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[test]
#[ignore = "a measurement (about 2 minutes): cargo test --release --test multihost measure -- --ignored --nocapture"]
fn measure_takeover_latency_and_throughput() {
    let Some(_serial) = serial_or_skip(false) else {
        return;
    };
    let takeover = takeover_times(4);
    let (remote, local) = progress_latency(150);
    println!("\n| measure | samples | p50 | p99 | max |\n| --- | --- | --- | --- | --- |");
    for (name, mut v) in [
        (
            "takeover: kill -9 → restarted on another host (lease_ttl 3 s)",
            takeover,
        ),
        (
            "progress latency, SSE on another host (host1 ← host3)",
            remote,
        ),
        (
            "progress latency, SSE on the same host (host3 ← host3)",
            local,
        ),
    ] {
        v.sort();
        println!(
            "| {name} | {} | {} | {} | {} |",
            v.len(),
            ms(quantile(&v, 0.5)),
            ms(quantile(&v, 0.99)),
            ms(v.last().copied().unwrap_or_default())
        );
    }
    let n: usize = std::env::var("MH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    println!("\n| handler | events | 1 host | 3 hosts | ratio |\n| --- | --- | --- | --- | --- |");
    for (name, payload, count) in [
        ("no-op", "{}", n),
        ("sleeps 0.2 s", r#"{"steps":2}"#, n / 2),
    ] {
        let one = throughput(1, count, payload);
        let three = throughput(3, count, payload);
        println!(
            "| {name} | {count} | {one:.0}/s | {three:.0}/s | {:.2} |",
            three / one
        );
    }
}

/// kill -9 of host1 holding 3 claims, `rounds` times.
fn takeover_times(rounds: usize) -> Vec<Duration> {
    let mut cl = cluster(3).config("concurrency = 8").start();
    let mut all = Vec::new();
    let mut times = Vec::new();
    for _ in 0..rounds {
        let mut held = Vec::new();
        for _ in 0..3 {
            let (id, ids) = submit_claimed_by(&cl, 1, r#"{"steps":30}"#);
            all.extend(ids);
            held.push(id);
        }
        wait_started(&cl, &held, secs(10));
        let killed_at = now_ns();
        cl.kill9(1);
        for id in &held {
            let r = cl.wait_for(secs(20), "a takeover", || {
                oracle::runs(&cl).into_iter().find(|r| {
                    &r.id == id && r.what == "start" && r.host != "host1" && r.t_ns > killed_at
                })
            });
            times.push(Duration::from_nanos((r.t_ns - killed_at) as u64));
        }
        cl.restart(1);
    }
    cl.wait_final(&all, secs(60));
    oracle::check(&mut cl, &all);
    times
}

/// Latencies of progress written on host3 as seen by SSE on host1 and on host3.
fn progress_latency(steps: usize) -> (Vec<Duration>, Vec<Duration>) {
    let mut cl = cluster(3)
        .config("progress_interval = \"100ms\"\nshared_rescan_interval = \"250ms\"")
        .start();
    let (id, all) = submit_claimed_by(&cl, 3, &format!(r#"{{"gate":1,"steps":{steps}}}"#));
    let follow = |n: usize| {
        let mut sse = cl.sse(n, &id);
        move || {
            let mut got = Vec::new();
            while let Some(ev) = sse.next(secs(30)) {
                let arrived = now_ns();
                if ev.comment || ev.data.is_empty() {
                    continue;
                }
                let st = ev.json();
                let t = st["message"]
                    .as_str()
                    .and_then(|m| m.split("t=").nth(1))
                    .and_then(|t| t.parse::<u128>().ok());
                if let (Some(t), "running") = (t, st["state"].as_str().unwrap_or("")) {
                    got.push(Duration::from_nanos(arrived.saturating_sub(t) as u64));
                }
                if ev.event.as_deref() == Some("end") {
                    break;
                }
            }
            got
        }
    };
    let (remote, local) = (follow(1), follow(3));
    cl.open_gate(&id);
    let (remote, local) = std::thread::scope(|s| {
        let r = s.spawn(remote);
        let l = s.spawn(local);
        (r.join().unwrap(), l.join().unwrap())
    });
    for other in &all {
        cl.open_gate(other);
    }
    cl.wait_final(&all, secs(30));
    oracle::check(&mut cl, &all);
    (remote, local)
}

/// Events/s for `n` events submitted round-robin to `hosts` hosts.
fn throughput(hosts: usize, n: usize, payload: &str) -> f64 {
    let mut cl: Cluster = cluster(hosts).config(r#"lease_ttl = "10s""#).start();
    let started = Instant::now();
    let ids = cl.submit_spread(n, hosts, payload);
    cl.wait_final(&ids, secs(300));
    let rate = n as f64 / started.elapsed().as_secs_f64();
    oracle::check(&mut cl, &ids);
    rate
}
