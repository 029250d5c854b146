mod common;

use std::time::Duration;

#[test]
fn a_submitted_event_runs_and_its_result_is_served() {
    let srv = common::server()
        .handler("hello", "#!/bin/sh\necho \"hello $SPOOL_ID\"\n")
        .start();
    let id = srv.submit("hello", "{}");
    let st = srv.wait_final(&id, Duration::from_secs(10));
    assert_eq!(st["state"], "succeeded");
    let r = srv.get(&format!("/events/{id}/result"));
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), format!("hello {id}\n"));
}
