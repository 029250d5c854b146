//! Several hosts sharing one spool, on one machine: each "host" is a network
//! namespace with its own FUSE (bindfs) mount of one backing directory, with
//! NFS-like attribute and lookup caching and no cross-mount notifications,
//! and runs the real spoold with `--shared`. See `multihost/cluster.rs` for
//! the set-up and `multihost/oracle.rs` for the invariants every scenario
//! ends with (every accepted event ends exactly once, nothing is lost or
//! left behind).
//!
//! Needs root, `ip`, `nsenter`, `bindfs` and `fusermount` (and libfaketime
//! for the clock test): without them a test prints why and passes, except
//! under `CI=true`, where it fails. The tests run one at a time (a static
//! lock): each starts three spoolds and three FUSE daemons, and their
//! timings mean something only on a machine that is not doing three such
//! runs at once.
//!
//! `benches/multihost.sh` (`cargo test --release --test multihost measure
//! -- --ignored --nocapture`) runs the measurements instead: takeover time,
//! cross-host progress latency, throughput of three hosts against one (see
//! `multihost/measure.rs`). deploy/nfs.md has the figures.

#[path = "multihost/cluster.rs"]
mod cluster;
mod common;
#[path = "multihost/measure.rs"]
mod measure;
#[path = "multihost/oracle.rs"]
mod oracle;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cluster::{cluster, Cluster};
use common::{secs, state};
use oracle::Run;

/// One multihost test at a time; None (after saying why) when this machine
/// cannot run them.
fn serial_or_skip(needs_faketime: bool) -> Option<MutexGuard<'static, ()>> {
    static LOCK: Mutex<()> = Mutex::new(());
    if let Some(why) = cluster::preflight(needs_faketime) {
        eprintln!("skipped: {why}");
        return None;
    }
    Some(LOCK.lock().unwrap_or_else(|e| e.into_inner()))
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// The lines of `runs.log` for one event.
fn runs_of(cl: &Cluster, id: &str) -> Vec<Run> {
    oracle::runs(cl)
        .into_iter()
        .filter(|r| r.id == id)
        .collect()
}

/// Waits until every event in `ids` has started at least once.
fn wait_started(cl: &Cluster, ids: &[String], within: Duration) {
    cl.wait_for(within, "every event to start", || {
        let runs = oracle::runs(cl);
        ids.iter()
            .all(|id| runs.iter().any(|r| &r.id == id && r.what == "start"))
            .then_some(())
    });
}

/// Submits `payload` to host `n` until the event is claimed by host `n`
/// itself (another host's rescan can, rarely, win the race for it). Returns
/// the one claimed by `n` and every ID submitted.
fn submit_claimed_by(cl: &Cluster, n: usize, payload: &str) -> (String, Vec<String>) {
    let host = cl.host(n).name.clone();
    let mut all = Vec::new();
    for _ in 0..5 {
        let id = cl.submit(n, payload);
        all.push(id.clone());
        let owner = cl.wait_for(secs(10), "the event to be claimed", || {
            cl.hosts
                .iter()
                .find(|h| cl.claims(&h.name).contains(&id))
                .map(|h| h.name.clone())
        });
        if owner == host {
            return (id, all);
        }
        cl.open_gate(&id);
    }
    panic!("5 events submitted to {host} were all claimed by other hosts");
}

#[test]
fn three_hosts_share_a_thousand_events_and_run_each_once() {
    let Some(_serial) = serial_or_skip(false) else {
        return;
    };
    let n: usize = std::env::var("MH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    // host3 is the slow one: one run at a time. It must not hoard claims.
    let mut cl = cluster(3)
        .config(r#"lease_ttl = "10s""#)
        .host_config(3, "concurrency = 1")
        .start();
    let limits = [("host1", 4), ("host2", 4), ("host3", 1)];
    let done = AtomicBool::new(false);
    let (ids, most_claims) = std::thread::scope(|s| {
        // Samples every host's claims on the backing disk while it all runs.
        let sampler = s.spawn(|| {
            let mut most: HashMap<&str, usize> = HashMap::new();
            while !done.load(Ordering::Relaxed) {
                for (host, _) in limits {
                    let held = cl.claims(host).len();
                    let m = most.entry(host).or_default();
                    *m = (*m).max(held);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            most
        });
        let ids = cl.submit_spread(n, 3, "{}");
        cl.wait_final(&ids, secs(100));
        done.store(true, Ordering::Relaxed);
        (ids, sampler.join().unwrap())
    });
    // Any host answers for any event, wherever it ran.
    for id in ids.iter().step_by(n.div_ceil(30).max(1)) {
        let ran_on = cl.disk_status(id).unwrap()["host"]
            .as_str()
            .unwrap()
            .to_owned();
        for h in 1..=3 {
            let s = cl.status(h, id);
            assert_eq!(state(&s), "succeeded", "{id} on host{h}: {s}");
            assert_eq!(s["host"], ran_on.as_str());
        }
    }
    let summary = oracle::check(&mut cl, &ids);
    eprintln!(
        "{n} events: completed per host {:?}, most claims held at once {most_claims:?}",
        summary.done_by_host
    );
    assert_eq!(summary.takeovers, 0, "no host died, so no lease may expire");
    for (host, limit) in limits {
        let did = summary.done_by_host.get(host).copied().unwrap_or(0);
        assert!(did >= n / 20, "{host} ran only {did} of {n} events");
        // A host claims an event only for a free place in `concurrency`;
        // a place is free once its handler exits, while that run's claim
        // stays until its outcome is written. So at most `limit` claims
        // waiting for or running a handler, and `limit` being closed.
        let most = most_claims.get(host).copied().unwrap_or(0);
        assert!(
            most <= 2 * limit,
            "{host} held {most} claims at once with room to run {limit}"
        );
    }
}

#[test]
fn sse_on_host1_follows_an_event_running_on_host3() {
    let Some(_serial) = serial_or_skip(false) else {
        return;
    };
    let mut cl = cluster(3).start();
    let (id, all) = submit_claimed_by(&cl, 3, r#"{"gate":1,"steps":15}"#);
    let mut sse = cl.sse(1, &id);
    assert_eq!(sse.status, 200);
    assert!(sse
        .header("content-type")
        .is_some_and(|t| t.starts_with("text/event-stream")));
    let first = sse.until("status", secs(5)).pop().unwrap().json();
    assert!(matches!(state(&first), "queued" | "running"), "{first}");
    // Meanwhile a program long-polls host2 for the same event.
    let (events, polled) = std::thread::scope(|s| {
        let poller = s.spawn(|| long_poll_until_final(&cl, 2, &id));
        cl.open_gate(&id);
        (sse.until("end", secs(30)), poller.join().unwrap())
    });
    let seqs: Vec<u64> = polled.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    assert!(seqs.len() >= 3, "host2's long polls saw only {seqs:?}");
    assert_eq!(state(polled.last().unwrap()), "succeeded");
    let statuses: Vec<_> = events
        .iter()
        .filter(|e| !e.comment && !e.data.is_empty())
        .map(|e| (e.clone(), e.json()))
        .collect();
    let mut last_seq = first["seq"].as_u64().unwrap();
    let mut progress = Vec::new();
    for (ev, st) in &statuses {
        let seq = st["seq"].as_u64().unwrap();
        assert_eq!(ev.id.as_deref(), Some(seq.to_string().as_str()));
        assert!(
            seq > last_seq || ev.event.as_deref() == Some("end"),
            "seq went from {last_seq} to {seq}"
        );
        last_seq = seq;
        if state(st) == "running" {
            assert_eq!(st["host"], "host3", "{st}");
            progress.extend(st["progress"].as_f64());
        }
    }
    assert!(
        progress.windows(2).all(|w| w[0] <= w[1]),
        "progress went back: {progress:?}"
    );
    assert!(
        progress.len() >= 3,
        "host1 relayed only {progress:?} of host3's 15 progress steps: {:#?}",
        statuses.iter().map(|s| &s.1).collect::<Vec<_>>()
    );
    let end = statuses.last().unwrap();
    assert_eq!(end.0.event.as_deref(), Some("end"));
    assert_eq!(state(&end.1), "succeeded");
    assert_eq!(end.1["host"], "host3");
    assert!(sse.ends_within(secs(5)), "the stream stays open after end");
    for other in &all {
        cl.open_gate(other);
    }
    cl.wait_final(&all, secs(20));
    oracle::check(&mut cl, &all);
}

/// Long-polls `id` on host `n` with its ETag, the way a script follows an
/// event, until it is final; returns every status it got.
fn long_poll_until_final(cl: &Cluster, n: usize, id: &str) -> Vec<serde_json::Value> {
    let deadline = std::time::Instant::now() + secs(30);
    let mut seen = Vec::new();
    let mut etag = String::new();
    loop {
        let headers: Vec<(&str, &str)> = if etag.is_empty() {
            Vec::new()
        } else {
            vec![("If-None-Match", etag.as_str())]
        };
        let r = cl
            .try_request(n, "GET", &format!("/events/{id}?wait=10"), &headers, b"")
            .unwrap_or_else(|e| panic!("long poll on host{n}: {e}"));
        match r.status {
            200 => {
                etag = r.header("etag").unwrap_or_default().to_owned();
                let v = r.json();
                let done = cluster::is_terminal(state(&v));
                seen.push(v);
                if done {
                    return seen;
                }
            }
            304 => {}
            other => panic!("long poll answered {other}: {}", r.text()),
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no final status: {seen:?}"
        );
    }
}

#[test]
fn a_killed_host_is_taken_over_within_two_leases_and_rejoins() {
    let Some(_serial) = serial_or_skip(false) else {
        return;
    };
    let ttl = Duration::from_secs(3);
    // Room on the other hosts: each takeover can start at once.
    let mut cl = cluster(3).config("concurrency = 8").start();
    // Handlers held at their gate: host1 still runs them when it dies, and
    // its orphaned ones still run when it comes back.
    let mut ids: Vec<String> = (0..9)
        .map(|i| cl.submit(i % 3 + 1, r#"{"gate":1,"steps":2}"#))
        .collect();
    wait_started(&cl, &ids, secs(10));
    let held = cl.claims("host1");
    assert!(!held.is_empty(), "host1 holds no claim to lose");
    let orphans = cl.wait_for(secs(5), "host1's process marks", || {
        let groups = cl.handler_groups("host1");
        (groups.len() == held.len()).then_some(groups)
    });
    let killed_at = now_ns();
    cl.kill9(1);

    // Its claims run again elsewhere within 2 × lease_ttl.
    let mut takeover = Vec::new();
    for id in &held {
        let restart = cl.wait_for(ttl * 2 + secs(2), "a takeover", || {
            runs_of(&cl, id)
                .into_iter()
                .find(|r| r.what == "start" && r.host != "host1" && r.t_ns > killed_at)
        });
        takeover.push(Duration::from_nanos((restart.t_ns - killed_at) as u64));
    }
    eprintln!("kill -9 to restart elsewhere: {takeover:?} (lease_ttl {ttl:?})");
    for t in &takeover {
        assert!(*t <= ttl * 2, "taken over after {t:?}, over 2 × lease_ttl");
    }

    // It comes back: the handlers its first life left are stopped, its
    // claims are gone (taken over), and it takes new work.
    assert!(orphans.iter().all(|&p| common::process_alive(p)));
    cl.restart(1);
    cl.wait_for(secs(1), "the orphaned handlers to be stopped", || {
        orphans
            .iter()
            .all(|&p| !common::process_alive(p))
            .then_some(())
    });
    for id in &ids {
        cl.open_gate(id);
    }
    let later: Vec<String> = (0..6)
        .map(|i| cl.submit(i % 3 + 1, r#"{"steps":2}"#))
        .collect();
    ids.extend(later.iter().cloned());
    cl.wait_final(&ids, secs(30));
    let rejoined = later
        .iter()
        .filter(|id| cl.disk_status(id).unwrap()["host"] == "host1")
        .count();
    assert!(rejoined > 0, "host1 ran nothing after it came back");
    let summary = oracle::check(&mut cl, &ids);
    assert!(summary.takeovers >= held.len(), "{summary:?}");
}

#[test]
fn a_host_cut_off_the_network_keeps_working_through_its_mount() {
    let Some(_serial) = serial_or_skip(false) else {
        return;
    };
    let mut cl = cluster(3).start();
    let (watched, mut ids) = submit_claimed_by(&cl, 2, r#"{"gate":1,"steps":20}"#);
    ids.extend((0..3).map(|_| cl.submit(2, r#"{"steps":20}"#)));
    wait_started(&cl, &ids, secs(10));
    let mut sse = cl.sse(1, &watched);
    sse.until("status", secs(5));

    cl.set_link(2, false);
    cl.wait_for(secs(10), "host2's HTTP to stop answering", || {
        cl.try_request(2, "GET", "/healthz", &[], b"")
            .is_err()
            .then_some(())
    });
    cl.open_gate(&watched);
    ids.extend((0..6).map(|i| cl.submit([1, 3][i % 2], r#"{"steps":2}"#)));
    // host2 still runs its events; host1 still relays their progress.
    let events = sse.until("end", secs(30));
    let end = events.last().unwrap().json();
    assert_eq!(
        (state(&end), end["host"].as_str()),
        ("succeeded", Some("host2"))
    );
    cl.wait_final(&ids, secs(30));

    cl.set_link(2, true);
    let back = cl.wait_for(secs(10), "host2's HTTP to answer again", || {
        cl.try_request(2, "GET", &format!("/events/{}", ids[0]), &[], b"")
            .ok()
    });
    assert_eq!(back.status, 200);
    let summary = oracle::check(&mut cl, &ids);
    assert_eq!(summary.takeovers, 0, "host2's leases lapsed: {summary:?}");
    assert!(summary.done_by_host.get("host2").copied().unwrap_or(0) >= 4);
}

#[test]
fn hosts_whose_clocks_are_hours_off_judge_leases_by_the_filesystem_clock() {
    let Some(_serial) = serial_or_skip(true) else {
        return;
    };
    let ttl = Duration::from_secs(3);
    let mut cl = cluster(3)
        .skewed_clock(2, "-3h")
        .skewed_clock(3, "+3h")
        .start();
    // Runs longer than lease_ttl, on every host: a host that judged leases
    // by its own clock (host3, 3 h ahead) would take the others' over.
    let mut ids: Vec<String> = (0..9)
        .map(|i| cl.submit(i % 3 + 1, r#"{"steps":40}"#))
        .collect();
    ids.push(cl.submit(3, r#"{"flaky":1}"#));
    ids.push(cl.submit(2, r#"{"flaky":1}"#));
    cl.wait_final(&ids, secs(40));
    assert!(
        cl.log_lines("moved a claim whose lease expired").is_empty(),
        "a lease was taken over while its owner was alive"
    );
    // The skew is real: host3 writes times 3 hours ahead.
    let on3 = ids
        .iter()
        .filter_map(|id| cl.disk_status(id))
        .find(|s| s["host"] == "host3")
        .expect("host3 ran something");
    let started = humantime::parse_rfc3339(on3["started_at"].as_str().unwrap()).unwrap();
    let ahead = started
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    assert!(
        ahead > Duration::from_secs(2 * 3600),
        "host3 is not ahead: {on3}"
    );

    // host1 dies while host3 is away: host2, 3 hours behind, must still
    // take its claims over within 2 × lease_ttl.
    cl.stop(3);
    let mine: Vec<String> = (0..3)
        .map(|_| cl.submit(1, r#"{"gate":1,"steps":2}"#))
        .collect();
    wait_started(&cl, &mine, secs(10));
    let held = cl.claims("host1");
    assert!(!held.is_empty());
    let killed_at = now_ns();
    cl.kill9(1);
    for id in &held {
        let r = cl.wait_for(ttl * 2 + secs(2), "host2 to take over", || {
            runs_of(&cl, id)
                .into_iter()
                .find(|r| r.what == "start" && r.host == "host2" && r.t_ns > killed_at)
        });
        let after = Duration::from_nanos((r.t_ns - killed_at) as u64);
        assert!(after <= ttl * 2, "{id} taken over after {after:?}");
    }
    for id in &mine {
        cl.open_gate(id);
    }
    ids.extend(mine);
    cl.wait_final(&ids, secs(30));

    // A host 3 h ahead starts while another host is in the middle of a
    // submit (its event placed, its queue entry still a journal in tmp/).
    // By the filesystem's clock the journal is seconds old: not abandoned.
    let (id, journal) = plant_submit_journal(&cl, "hostx");
    cl.restart(1);
    cl.restart(3);
    assert!(journal.exists(), "host3 took a fresh journal for abandoned");
    assert!(!cl.spool.join("queue").join(&id).exists());
    // The submitting host finishes its submit; the event runs.
    std::fs::hard_link(&journal, cl.spool.join("queue").join(&id)).unwrap();
    std::fs::remove_file(&journal).unwrap();
    ids.push(id);
    cl.wait_final(&ids, secs(30));
    oracle::check(&mut cl, &ids);
}

/// Leaves a submit by `host` between its last two steps: `events/<id>/`
/// placed, the queue entry staged as a journal in `tmp/` and not yet
/// linked into `queue/`. Returns the ID and the journal's path.
fn plant_submit_journal(cl: &Cluster, host: &str) -> (String, std::path::PathBuf) {
    let id = common::make_ulid();
    common::write_event_by_hand(&cl.spool, &id, "work", "{}");
    let journal = cl.spool.join("tmp").join(format!("{host}.1.1.queue.{id}"));
    std::fs::write(&journal, br#"{"type":"work"}"#).unwrap();
    (id, journal)
}

#[test]
fn a_frozen_host_loses_its_lease_and_records_nothing_when_it_wakes() {
    let Some(_serial) = serial_or_skip(false) else {
        return;
    };
    let ttl = Duration::from_secs(3);
    let mut cl = cluster(3).start();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (id, all) = submit_claimed_by(&cl, 1, r#"{"steps":60}"#);
        ids.extend(all.into_iter().filter(|a| *a != id));
        ids.push(id);
    }
    let frozen: Vec<String> = cl.claims("host1");
    wait_started(&cl, &frozen, secs(10));
    // Like a VM paused past its lease: spoold and its handlers stop.
    cl.signal_host(1, libc::SIGSTOP);
    for id in &frozen {
        cl.wait_for(
            ttl * 2 + secs(2),
            "a takeover of the frozen host's event",
            || {
                runs_of(&cl, id)
                    .iter()
                    .any(|r| r.what == "start" && r.host != "host1")
                    .then_some(())
            },
        );
    }
    cl.signal_host(1, libc::SIGCONT);
    cl.wait_for(secs(10), "host1 to notice it lost its claims", || {
        (cl.log_lines("lost the claim to another host").len() >= frozen.len()).then_some(())
    });
    cl.wait_final(&ids, secs(30));
    let summary = oracle::check(&mut cl, &ids);
    let on1: BTreeMap<_, _> = frozen
        .iter()
        .map(|id| (id, cl.disk_status(id).unwrap()["host"].clone()))
        .collect();
    assert!(on1.values().all(|h| h != "host1"), "{on1:?}");
    assert!(summary.takeovers >= frozen.len());
}

#[test]
fn an_attribute_cache_longer_than_the_lease_expires_no_live_lease() {
    let Some(_serial) = serial_or_skip(false) else {
        return;
    };
    let ttl = Duration::from_secs(3);
    // Every mount trusts cached attributes for 4 s, longer than lease_ttl:
    // a heartbeat can look 5 s old from another host when it is 1 s old.
    let mut cl = cluster(3).attr_cache(4).config("concurrency = 8").start();
    // Handlers that wait at their gate: the claims stay put until opened.
    let mut ids: Vec<String> = (0..9)
        .map(|i| cl.submit(i % 3 + 1, r#"{"gate":1,"steps":3}"#))
        .collect();
    wait_started(&cl, &ids, secs(10));
    // Past two leases: live claims stay where they are...
    std::thread::sleep(ttl * 2);
    assert!(
        cl.log_lines("moved a claim whose lease expired").is_empty(),
        "a live lease was taken over"
    );
    // ...and a dead host's are still taken over in time.
    let held = cl.claims("host1");
    assert!(!held.is_empty());
    let killed_at = now_ns();
    cl.kill9(1);
    for id in &held {
        let r = cl.wait_for(ttl * 2 + secs(2), "a takeover", || {
            runs_of(&cl, id)
                .into_iter()
                .find(|r| r.what == "start" && r.host != "host1" && r.t_ns > killed_at)
        });
        let after = Duration::from_nanos((r.t_ns - killed_at) as u64);
        assert!(after <= ttl * 2, "{id} taken over after {after:?}");
    }
    for id in &ids {
        cl.open_gate(id);
    }
    ids.extend((0..3).map(|i| cl.submit(i % 2 + 2, "{}")));
    cl.wait_final(&ids, secs(30));
    cl.restart(1);
    let summary = oracle::check(&mut cl, &ids);
    assert_eq!(summary.takeovers, held.len(), "{summary:?}");
}
