//! Idempotency races: 50 concurrent submits with the same Idempotency-Key
//! make one event, and every answer names it: with a fresh key; with a key
//! whose first submitter died after it reserved the key but before the event
//! existed; with the server killed in the middle of the race; and with two
//! bodies racing for one key (one wins, the others get 422 naming it).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::common::{self, Server};
use crate::support::{audit, logged, Expect, ReapSpool};

const N: usize = 50;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One POST with a key, retried while the server is down; the answer.
fn post_until_answered(addr: SocketAddr, key: &str, body: &str) -> (u16, Value) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "{key}: never answered");
        let attempt = || -> Option<common::Resp> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(15))).ok()?;
            let raw = format!(
                "POST /events/job HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nIdempotency-Key: {key}\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(raw.as_bytes()).ok()?;
            let mut out = Vec::new();
            s.read_to_end(&mut out).ok()?;
            common::parse_response(&out)
        };
        match attempt() {
            Some(r) => return (r.status, r.json()),
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// `N` threads post `bodies[i % bodies.len()]` with `key` at once; `during`
/// runs on this thread meanwhile. Returns the answers: (code, body sent, JSON).
fn race(
    srv: &mut Server,
    key: &str,
    bodies: &[&str],
    during: impl FnOnce(&mut Server),
) -> Vec<(u16, String, Value)> {
    let barrier = Arc::new(Barrier::new(N + 1));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (barrier, addr) = (Arc::clone(&barrier), srv.addr);
            let (key, body) = (key.to_owned(), bodies[i % bodies.len()].to_owned());
            std::thread::spawn(move || {
                barrier.wait();
                let (code, v) = post_until_answered(addr, &key, &body);
                (code, body, v)
            })
        })
        .collect();
    barrier.wait();
    during(srv);
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

/// The events on disk whose event.json carries `key`.
fn events_with_key(srv: &Server, key: &str) -> Vec<String> {
    common::names(&srv.spool.join("events"))
        .into_iter()
        .filter(|id| {
            let path = srv.spool.join("events").join(id).join("event.json");
            std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|e| e["idempotency_key"] == key)
        })
        .collect()
}

/// Every answer names the one event on disk for `key`; at most one 202 (it
/// may have been cut off by a kill, and its retry answered 200).
#[track_caller]
fn one_event(
    srv: &Server,
    key: &str,
    answers: &[(u16, String, Value)],
    winner_body: Option<&str>,
) -> String {
    let on_disk = events_with_key(srv, key);
    assert_eq!(on_disk.len(), 1, "{key}: events on disk {on_disk:?}");
    let id = on_disk[0].clone();
    let mut codes: BTreeMap<u16, usize> = BTreeMap::new();
    for (code, body, v) in answers {
        *codes.entry(*code).or_default() += 1;
        match code {
            200 | 202 => {
                assert_eq!(v["id"], id.as_str(), "{key}: {v}");
                if let Some(w) = winner_body {
                    assert_eq!(body, w, "{key}: the losing body got {code}");
                }
            }
            422 => {
                assert_eq!(v["type"], "/problems/idempotency-key-reused", "{v}");
                assert_eq!(v["event"], format!("/events/{id}"), "{key}: {v}");
            }
            _ => panic!("{key}: answer {code} {v}"),
        }
    }
    assert!(
        codes.get(&202).copied().unwrap_or(0) <= 1,
        "{key}: {codes:?}"
    );
    id
}

#[test]
fn fifty_concurrent_submits_with_one_key_make_one_event_also_across_a_crash() {
    let mut srv = common::server()
        .handler("job", &logged("cat\nfinish 0"))
        .config("concurrency = 4")
        .start();
    crate::support::quiet_port(&mut srv);
    let _reap = ReapSpool(srv.spool.clone());
    let mut ids = BTreeSet::new();

    // A fresh key.
    let answers = race(&mut srv, "fresh-key", &[r#"{"order": 1}"#], |_| {});
    let id = one_event(&srv, "fresh-key", &answers, None);
    assert_eq!(answers.iter().filter(|a| a.0 == 202).count(), 1);
    ids.insert(id);

    // A key reserved by a submitter that died before its event existed.
    let (key, body) = ("orphan-key", r#"{"order": 2}"#);
    let unborn = common::make_ulid();
    let fingerprint = hex(&Sha256::digest(format!("job\n{body}").as_bytes()));
    std::fs::write(
        srv.spool
            .join("idem")
            .join(hex(&Sha256::digest(key.as_bytes()))),
        format!(r#"{{"id":"{unborn}","fingerprint":"{fingerprint}"}}"#),
    )
    .unwrap();
    let answers = race(&mut srv, key, &[body], |_| {});
    let id = one_event(&srv, key, &answers, None);
    assert_eq!(id, unborn, "the reserved ID is the event's");
    assert_eq!(answers.iter().filter(|a| a.0 == 202).count(), 1);
    ids.insert(id);

    // The server killed in the middle of the race (clients retry).
    for (round, pause) in [(0, 0), (1, 3), (2, 15)] {
        let key = format!("crash-key-{round}");
        let answers = race(&mut srv, &key, &[r#"{"order": 3}"#], |srv| {
            std::thread::sleep(Duration::from_millis(pause));
            srv.kill9();
            crate::support::restart(srv);
        });
        ids.insert(one_event(&srv, &key, &answers, None));
    }

    // Two bodies racing for one key: one event, with the winner's body.
    let (a, b) = (r#"{"order": "A"}"#, r#"{"order": "B"}"#);
    let answers = race(&mut srv, "split-key", &[a, b], |_| {});
    let id = events_with_key(&srv, "split-key")[0].clone();
    let env: Value = serde_json::from_slice(
        &std::fs::read(srv.spool.join("events").join(&id).join("event.json")).unwrap(),
    )
    .unwrap();
    let winner = if env["payload"]["order"] == "A" { a } else { b };
    one_event(&srv, "split-key", &answers, Some(winner));
    assert_eq!(answers.iter().filter(|x| x.0 == 422).count(), N / 2);
    ids.insert(id);

    audit(&srv, &Expect::new(ids));
}
