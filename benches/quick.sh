#!/usr/bin/env bash
# A first, quick measurement of spoold on this machine (the full suite with
# peers and ratios is issue 5). Prints events/s for a no-op compiled handler:
#   submit    HTTP submits/s, 8 keep-alive clients; the handler is held, so
#             the queue just grows
#   e2e       submit and run 2,000 events, 8 clients, until all succeeded
#   drain     dispatch only: 2,000 queued events run after a restart
# each with fsync on and off. Usage: benches/quick.sh [N]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-2000}
cargo build --release -q
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$work"' EXIT
cc -O2 -o "$work/noop" benches/noop.c
mkdir -p "$work/handlers"
cp "$work/noop" "$work/handlers/noop"
# "held" blocks until released, one at a time: submits only fill the queue.
printf '#!/bin/sh\nwhile [ ! -e "%s/release" ]; do sleep 0.05; done\n' "$work" > "$work/handlers/held"
chmod +x "$work/handlers/held"
echo 'concurrency = 1' > "$work/handlers/held.toml"
port=18765
bin=target/release/spoold

start() { # start SPOOL [flags]; sets PID
    local spool=$1; shift
    "$bin" serve --spool "$spool" --handlers "$work/handlers" --listen 127.0.0.1:$port "$@" >"$work/out" 2>>"$work/log" &
    PID=$!
    until grep -q listening "$work/out" 2>/dev/null; do sleep 0.05; done
}
stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; }
succeeded() { curl -s localhost:$port/metrics | awk '/^spoold_events_succeeded_total/ {print $2}'; }
now() { date +%s%N; }

printf '| measure | fsync on | fsync off |\n| --- | --- | --- |\n'
declare -A r
for mode in on off; do
    flags=(); [ $mode = off ] && flags=(--no-fsync)
    # submit only
    rm -rf "$work/s1"; start "$work/s1" "${flags[@]}"
    r[submit,$mode]=$(python3 benches/load.py 127.0.0.1 $port held "$N" 8)
    kill -9 "$PID"; wait "$PID" 2>/dev/null || true; touch "$work/release"
    # end to end
    rm -rf "$work/s2"; start "$work/s2" "${flags[@]}"
    t0=$(now); python3 benches/load.py 127.0.0.1 $port noop "$N" 8 >/dev/null
    until [ "$(succeeded)" -ge "$N" ]; do sleep 0.01; done
    r[e2e,$mode]=$(( N * 1000000000 / ($(now) - t0) )); stop
    # drain: queue N while held back by a handler with no room, then restart
    rm -rf "$work/s3"; start "$work/s3" "${flags[@]}"
    python3 benches/load.py 127.0.0.1 $port noop "$N" 8 >/dev/null; kill -9 "$PID"; wait "$PID" 2>/dev/null || true
    left=$(ls "$work/s3/queue" | wc -l)
    : >"$work/out"; t0=$(now); start "$work/s3" "${flags[@]}"
    until [ -z "$(ls "$work/s3/queue")" ] && [ -z "$(ls "$work/s3/running/"*/ 2>/dev/null)" ]; do sleep 0.01; done
    r[drain,$mode]=$(( left * 1000000000 / ($(now) - t0) )); stop
    : >"$work/out"
done
for m in submit e2e drain; do
    printf '| %s (events/s) | %s | %s |\n' "$m" "${r[$m,on]}" "${r[$m,off]}"
done
