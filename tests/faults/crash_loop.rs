//! Crash anywhere: a seeded loop kills the server with SIGKILL at random
//! moments while clients submit in bursts and a mix of handlers runs (some
//! fail with 75 and then succeed, some write progress and result files, some
//! are slow, some have only two attempts), and now and then SIGKILLs a
//! handler too. After every kill the spool on disk is checked while nothing
//! runs that could change a status (no torn file; every terminal status seen
//! stays as it was), and after every restart `tmp/` holds nothing of the
//! dead server. At the end everything drains and [`audit`] checks the rest.
//!
//! Clients retry a submit that was cut off until it is answered; three in
//! four carry an Idempotency-Key, so each of those is one event however
//! often it was sent. A cut-off submit without a key may have made an event
//! the client never heard of: such events must end like any other.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{self, Server};
use crate::support::{
    audit, fault_seed, foreign_tmp, is_terminal, logged, quiet_port, restart, scan_spool,
    spool_on_tmpfs, spool_processes, Expect, Figures, ReapSpool, Rng, SeedNote,
};

const SUBMITTERS: usize = 4;

/// The handler mix, with the share of events (out of 100) each gets.
const MIX: [(&str, u64); 5] = [
    ("ok", 35),
    ("flaky", 20),
    ("prog", 20),
    ("slow", 10),
    ("fragile", 15),
];

struct Plan {
    name: &'static str,
    default_seed: u64,
    cycles: usize,
    events: usize,
    fsync: bool,
}

/// Kills with fsync off (the bulk: fsync changes nothing for a process
/// crash, only for a power cut, and it costs most of the time).
#[test]
fn crash_anywhere_kill9_loop() {
    run(Plan {
        name: "crash_anywhere_kill9_loop",
        default_seed: 0x5eed_0003,
        cycles: 52,
        events: 2080,
        fsync: false,
    });
}

/// The same with fsync on (the default), smaller: the flushes are on the
/// paths a kill lands in, and they must not change the outcome.
#[test]
fn crash_anywhere_kill9_loop_with_fsync() {
    run(Plan {
        name: "crash_anywhere_kill9_loop_with_fsync",
        default_seed: 0x5eed_f5c0,
        cycles: 20,
        events: 600,
        fsync: true,
    });
}

fn handler_scripts() -> Vec<(&'static str, String, &'static str)> {
    let result = r#"printf '{"id":"%s","attempt":%s}' "$SPOOL_ID" "$SPOOL_ATTEMPT""#;
    vec![
        ("ok", logged(&format!("{result}\nfinish 0")), "max_attempts = 12\n"),
        (
            "flaky",
            logged(&format!(
                "[ \"$SPOOL_ATTEMPT\" -ge 2 ] || {{ echo 'not yet' >&2; finish 75; }}\n{result}\nfinish 0"
            )),
            "max_attempts = 12\n",
        ),
        (
            "prog",
            logged(
                r#"for i in 1 2 3; do
  printf '{"progress": %s, "message": "step %s"}' $((i*30)) $i > progress.tmp.$$ && mv progress.tmp.$$ "$SPOOL_PROGRESS"
  sleep 0.02
done
printf '{"id":"%s","attempt":%s,"by":"file"}' "$SPOOL_ID" "$SPOOL_ATTEMPT" > result.tmp.$$ && mv result.tmp.$$ "$SPOOL_RESULT"
finish 0"#,
            ),
            "max_attempts = 12\n",
        ),
        (
            "slow",
            logged(&format!(
                "sleep 0.15\nspoold report --progress 50 --message half\nsleep 0.15\n{result}\nfinish 0"
            )),
            "max_attempts = 12\n",
        ),
        (
            "fragile",
            logged(&format!(
                "[ \"$SPOOL_ATTEMPT\" -ge 2 ] || finish 75\nsleep 0.1\n{result}\nfinish 0"
            )),
            "max_attempts = 2\n",
        ),
    ]
}

/// The type of event number `i` (a function of the seed, not of timing).
fn kind_of(seed: u64, i: usize) -> &'static str {
    let mut r = Rng::new(seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    r.next_u64();
    let mut pick = r.below(100);
    for (kind, share) in MIX {
        if pick < share {
            return kind;
        }
        pick -= share;
    }
    "ok"
}

/// What the submitting clients share.
#[derive(Default)]
struct Clients {
    next: AtomicUsize,
    quota: AtomicUsize,
    abort: AtomicBool,
    /// Event number → (ID, Idempotency-Key).
    accepted: Mutex<BTreeMap<usize, (String, Option<String>)>>,
    cut_off: AtomicUsize,
    odd: Mutex<Vec<String>>,
}

fn submitter(c: Arc<Clients>, addr: SocketAddr, seed: u64, total: usize) {
    loop {
        let i = c.next.fetch_add(1, Ordering::SeqCst);
        if i >= total {
            return;
        }
        while i >= c.quota.load(Ordering::SeqCst) {
            if c.abort.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let kind = kind_of(seed, i);
        let key = (i % 4 != 3).then(|| format!("crash-{seed:x}-{i}"));
        let body = format!("{{\"n\": {i}}}");
        loop {
            if c.abort.load(Ordering::SeqCst) {
                return;
            }
            match post(addr, kind, key.as_deref(), &body) {
                Some(r) if r.status == 202 || r.status == 200 => {
                    let id = r.json()["id"].as_str().unwrap_or("").to_owned();
                    c.accepted.lock().unwrap().insert(i, (id, key.clone()));
                    break;
                }
                Some(r) => {
                    c.odd
                        .lock()
                        .unwrap()
                        .push(format!("event {i}: {} {}", r.status, r.text()));
                    std::thread::sleep(Duration::from_millis(20));
                }
                None => {
                    c.cut_off.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

/// One POST that may be cut off by a kill: None then.
fn post(addr: SocketAddr, kind: &str, key: Option<&str>, body: &str) -> Option<common::Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
    let key = key
        .map(|k| format!("Idempotency-Key: {k}\r\n"))
        .unwrap_or_default();
    let raw = format!(
        "POST /events/{kind} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\n{key}Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(raw.as_bytes()).ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).ok()?;
    common::parse_response(&out)
}

/// Where a kill landed, judged from what the dead server left.
#[derive(Default, Debug)]
struct Phases {
    submit_in_flight: usize,
    write_in_flight: usize,
    claims_held: usize,
    handlers_running: usize,
    retries_waiting: usize,
    queue_waiting: usize,
}

impl Phases {
    fn tally(&mut self, srv: &Server) {
        let tmp = common::names(&srv.spool.join("tmp"));
        if tmp
            .iter()
            .any(|n| n.contains(".queue.") || n.ends_with(".event"))
        {
            self.submit_in_flight += 1;
        }
        // A staged status, result, claim record or key: a plain counter name.
        if tmp.iter().any(|n| {
            n.rsplit('.')
                .next()
                .is_some_and(|c| c.parse::<u64>().is_ok())
        }) {
            self.write_in_flight += 1;
        }
        if !common::names(&srv.spool.join("running/testhost")).is_empty() {
            self.claims_held += 1;
        }
        if !common::names(&srv.spool.join("hosts/testhost")).is_empty() {
            self.handlers_running += 1;
        }
        let queue = common::names(&srv.spool.join("queue"));
        if !queue.is_empty() {
            self.queue_waiting += 1;
        }
        if queue.iter().any(|n| {
            fs::read_to_string(srv.spool.join("queue").join(n))
                .is_ok_and(|t| t.contains("not_before_ms"))
        }) {
            self.retries_waiting += 1;
        }
    }
}

fn run(plan: Plan) {
    let seed = fault_seed(plan.default_seed);
    let _note = SeedNote(plan.name, seed);
    println!(
        "{}: seed {seed} (replay with SPOOLD_FAULT_SEED={seed})",
        plan.name
    );
    let began = Instant::now();
    let mut builder = common::server().config("concurrency = 12");
    for (kind, script, toml) in handler_scripts() {
        builder = builder.handler(kind, &script).handler_toml(kind, toml);
    }
    if !plan.fsync {
        builder = builder.arg("--no-fsync");
    }
    let mut srv = builder.start();
    quiet_port(&mut srv);
    // Without fsync, a tmpfs (when this runs as root) only saves time: the
    // crash of a process is the same on any filesystem.
    let mounts = (!plan.fsync && unsafe { libc::geteuid() } == 0)
        .then(|| spool_on_tmpfs(&mut srv, "size=1g").ok())
        .flatten();
    let storage = if mounts.is_some() { "tmpfs" } else { "disk" };
    let _reap = ReapSpool(srv.spool.clone());
    let mut rng = Rng::new(seed);
    let clients = Arc::new(Clients::default());
    let per_cycle = plan.events.div_ceil(plan.cycles);
    let threads: Vec<_> = (0..SUBMITTERS)
        .map(|_| {
            let (c, addr, total) = (Arc::clone(&clients), srv.addr, plan.events);
            std::thread::spawn(move || submitter(c, addr, seed, total))
        })
        .collect();
    // Stops the clients if the loop panics, so the test ends.
    struct Abort(Arc<Clients>);
    impl Drop for Abort {
        fn drop(&mut self) {
            self.0.abort.store(true, Ordering::SeqCst);
        }
    }
    let _abort = Abort(Arc::clone(&clients));

    let mut phases = Phases::default();
    let mut terminal_seen: BTreeMap<String, Value> = BTreeMap::new();
    let mut handler_kills = 0;
    let mut held_port = 0;
    for cycle in 0..plan.cycles {
        clients
            .quota
            .store((cycle + 1) * per_cycle, Ordering::SeqCst);
        // Mostly anywhere in a run of the server; sometimes at once, while it
        // recovers and claims what the last one left.
        let delay = if rng.chance(20) {
            rng.below(30)
        } else {
            30 + rng.below(700)
        };
        let handler_kill_at = rng.chance(40).then(|| rng.below(delay + 1));
        let t0 = Instant::now();
        if let Some(at) = handler_kill_at {
            std::thread::sleep(Duration::from_millis(at));
            // A process of this spool (by its environment), not a pid from
            // a process mark that may have ended and been reused.
            let pids: Vec<i32> = spool_processes(&srv.spool)
                .into_iter()
                .map(|(pid, _)| pid)
                .collect();
            if !pids.is_empty() {
                let pid = pids[rng.below(pids.len() as u64) as usize];
                unsafe { libc::kill(pid, libc::SIGKILL) };
                handler_kills += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(delay).saturating_sub(t0.elapsed()));
        srv.kill9();

        // The server is dead: no status can change now.
        phases.tally(&srv);
        let statuses = scan_spool(&srv.spool, true).unwrap_or_else(|bad| {
            panic!(
                "cycle {cycle}: torn files after a kill:\n{}",
                bad.join("\n")
            )
        });
        for (id, st) in statuses {
            let Some(st) = st.filter(is_terminal) else {
                continue;
            };
            match terminal_seen.get(&id) {
                None => {
                    terminal_seen.insert(id, st);
                }
                Some(seen) => assert!(
                    ["state", "attempt", "seq", "finished_at"]
                        .iter()
                        .all(|k| seen[k] == st[k]),
                    "cycle {cycle}: the terminal status of {id} changed:\nwas {seen}\nnow {st}"
                ),
            }
        }
        if restart(&mut srv) {
            held_port += 1;
        }
        let left = foreign_tmp(&srv.spool, srv.pid());
        assert!(
            left.is_empty(),
            "cycle {cycle}: recovery left the dead server's files in tmp/: {left:?}"
        );
    }
    clients.quota.store(plan.events, Ordering::SeqCst);
    for t in threads {
        t.join().expect("a client thread failed");
    }
    let kill_phase = began.elapsed();
    let accepted = clients.accepted.lock().unwrap().clone();
    let odd = clients.odd.lock().unwrap().clone();
    assert!(odd.is_empty(), "unexpected answers to submits: {odd:?}");
    assert_eq!(accepted.len(), plan.events, "every submit was answered");

    let mut expect = Expect::new(accepted.values().map(|(id, _)| id.clone()));
    expect.terminal_seen = terminal_seen;
    expect.json_results = true;
    expect.drain = Duration::from_secs(90);
    let f = audit(&srv, &expect);
    let dup_keys = keys_with_two_events(&srv);
    let wrong_results = check_results(&srv, &accepted);
    let failed = failures_by_type(&srv);
    print_figures(
        &plan,
        storage,
        seed,
        &f,
        &clients,
        (handler_kills, held_port),
        &failed,
        &phases,
        kill_phase,
        began,
    );
    assert!(
        dup_keys.is_empty(),
        "keys that made two events: {dup_keys:?}"
    );
    assert!(wrong_results.is_empty(), "wrong results: {wrong_results:?}");
    assert!(
        phases.handlers_running >= plan.cycles / 4 && phases.claims_held >= plan.cycles / 4,
        "too few kills landed while handlers ran: {phases:?}"
    );
    assert!(
        clients.cut_off.load(Ordering::Relaxed) > 0,
        "no kill cut off a submit"
    );
}

/// Idempotency keys that name two events on disk.
fn keys_with_two_events(srv: &Server) -> Vec<String> {
    let mut by_key: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for id in common::names(&srv.spool.join("events")) {
        let path = srv.spool.join("events").join(&id).join("event.json");
        let env: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        if let Some(k) = env["idempotency_key"].as_str() {
            by_key.entry(k.to_owned()).or_default().insert(id);
        }
    }
    by_key
        .into_iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(k, ids)| format!("{k}: {ids:?}"))
        .collect()
}

/// Every succeeded event's result is the one its last attempt made; checked
/// through the API for a sample, on disk for all.
fn check_results(
    srv: &Server,
    accepted: &BTreeMap<usize, (String, Option<String>)>,
) -> Vec<String> {
    let mut wrong = Vec::new();
    for (n, (id, _)) in accepted {
        let dir = srv.spool.join("events").join(id);
        let st: Value =
            serde_json::from_slice(&fs::read(dir.join("status.json")).unwrap()).unwrap();
        if st["state"] != "succeeded" {
            continue;
        }
        let bytes = fs::read(dir.join("result")).unwrap_or_default();
        let r: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if r["id"] != id.as_str() || r["attempt"] != st["attempt"] {
            wrong.push(format!(
                "{id}: result {r} for status attempt {}",
                st["attempt"]
            ));
        }
        if n % 10 == 0 {
            let api = srv.get(&format!("/events/{id}/result"));
            if api.status != 200 || api.body != bytes {
                wrong.push(format!("{id}: GET result {} {}", api.status, api.text()));
            }
        }
    }
    wrong
}

/// The events that did not succeed, by type; each must be a dead letter
/// whose error says why.
fn failures_by_type(srv: &Server) -> BTreeMap<String, usize> {
    let mut by_type = BTreeMap::new();
    for id in common::names(&srv.spool.join("events")) {
        let path = srv.spool.join("events").join(&id).join("status.json");
        let st: Value = serde_json::from_slice(&fs::read(path).unwrap()).unwrap();
        if st["state"] != "succeeded" {
            assert!(
                st["dead_letter"] == true && crate::support::error(&st).len() > 20,
                "{st}"
            );
            *by_type
                .entry(st["type"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
    }
    by_type
}

#[allow(clippy::too_many_arguments)]
fn print_figures(
    plan: &Plan,
    storage: &str,
    seed: u64,
    f: &Figures,
    c: &Clients,
    (handler_kills, held_port): (usize, usize),
    failed: &BTreeMap<String, usize>,
    phases: &Phases,
    kill_phase: Duration,
    began: Instant,
) {
    let extra = f.starts.saturating_sub(f.on_disk);
    println!(
        "FAULTS {} fsync={} spool={storage} seed={seed}: kill_cycles={} handler_kills={handler_kills} submits_cut_off={} restarts_waiting_for_the_port={held_port} \
         events_accepted={} events_on_disk={} lost={} duplicated={} states={:?} dead_letters={} failed_by_type={failed:?} \
         handler_starts={} starts_beyond_one_per_event={extra} attempts_counted_not_started={} \
         kills_landing: {phases:?} kill_phase={:.1}s total={:.1}s",
        plan.name,
        if plan.fsync { "on" } else { "off" },
        plan.cycles,
        c.cut_off.load(Ordering::Relaxed),
        f.accepted,
        f.on_disk,
        f.lost,
        f.duplicated,
        f.by_state,
        f.dead_letters,
        f.starts,
        f.counted_not_started,
        kill_phase.as_secs_f64(),
        began.elapsed().as_secs_f64(),
    );
}
