//! The server dies (kill -9) while a handler's children still run: one in
//! the handler's process group, one escaped from it with `setsid`. The
//! restarted server must kill both before the event runs again, so that the
//! event never runs twice at once and nothing is orphaned for good; also
//! when the handler itself is gone by then and only its children are left.

use std::fs;
use std::time::Duration;

use crate::common::{self, process_alive, release, tdir, Server};
use crate::support::{audit, logged, Expect, ReapSpool};

/// Attempt 1 starts a child in its group and one in a session of its own,
/// notes the three pids, and waits; every attempt first logs any process
/// of an earlier attempt that still lives ("overlap").
const FAMILY: &str = r#"for f in "$T"/family.$SPOOL_ID.*; do
  [ -e "$f" ] || continue
  for p in $(cat "$f"); do
    if [ -r "/proc/$p/stat" ] && ! grep -q ') Z ' "/proc/$p/stat"; then
      echo "$SPOOL_ID $SPOOL_ATTEMPT overlap $p" >> "$T/overlap"
    fi
  done
done
if [ "$SPOOL_ATTEMPT" = 1 ]; then
  sleep 1000 &
  a=$!
  setsid sleep 1000 &
  b=$!
  echo "$$ $a $b" > "$T/family.tmp.$SPOOL_ID" && mv "$T/family.tmp.$SPOOL_ID" "$T/family.$SPOOL_ID.1"
fi
n=0
while [ ! -e "$T/go.$SPOOL_ATTEMPT" ] && [ -d "$SPOOL_DIR" ] && [ "$n" -lt 1500 ]; do
  sleep 0.01
  n=$((n+1))
done
echo "attempt $SPOOL_ATTEMPT"
finish 0"#;

fn family(srv: &Server, id: &str) -> Vec<i32> {
    let path = tdir(srv).join(format!("family.{id}.1"));
    crate::support::wait_for(Duration::from_secs(10), || (path.exists(), ()))
        .expect("attempt 1 to start its children");
    fs::read_to_string(&path)
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

fn scenario(kill_the_handler_too: bool) {
    let mut srv = common::server().handler("family", &logged(FAMILY)).start();
    let _reap = ReapSpool(srv.spool.clone());
    let id = srv.submit("family", "{}");
    let pids = family(&srv, &id);
    let (leader, in_group, escaped) = (pids[0], pids[1], pids[2]);
    srv.kill9();
    for &p in &pids {
        assert!(process_alive(p), "{p} died with spoold");
    }
    if kill_the_handler_too {
        // The handler ends while no spoold watches; its children live on.
        unsafe { libc::kill(leader, libc::SIGKILL) };
        crate::support::wait_for(Duration::from_secs(5), || (!process_alive(leader), ()))
            .expect("the handler to die");
        assert!(process_alive(in_group) && process_alive(escaped));
    }
    crate::support::restart(&mut srv);
    let left = crate::support::wait_for(Duration::from_secs(5), || {
        let left: Vec<i32> = pids.iter().copied().filter(|p| process_alive(*p)).collect();
        (left.is_empty(), left)
    });
    assert_eq!(
        left,
        Ok(vec![]),
        "processes of the first run outlived the restart (handler {leader}, child {in_group}, setsid child {escaped})"
    );
    release(&srv, "go.2");
    let st = srv.wait_final(&id, Duration::from_secs(15));
    assert_eq!(st["state"], "succeeded", "{st}");
    assert_eq!(st["attempt"], 2, "{st}");
    assert_eq!(
        common::lines(&srv, "overlap"),
        Vec::<String>::new(),
        "the rerun started while the first run's processes still ran"
    );
    audit(&srv, &Expect::new([id]));
}

#[test]
fn kill9_while_a_handler_and_its_children_run_kills_them_all_before_the_rerun() {
    scenario(false);
}

#[test]
fn kill9_after_the_handler_died_still_kills_its_children_before_the_rerun() {
    scenario(true);
}
