#!/usr/bin/env bash
# Shared mode on one machine: three "hosts" (network namespaces, each with
# its own bindfs mount of one spool) running the release build. Prints, as
# Markdown tables, the takeover time after kill -9 of a host, the cross-host
# progress latency (p50/p99, SSE on another host and on the same one), and
# the throughput of 3 hosts against 1. About two minutes. Needs root and
# bindfs (Debian: apt-get install -y bindfs faketime). See deploy/nfs.md.
#   MH_EVENTS=N   events per throughput run (default 600)
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --release --test multihost measure -- --ignored --nocapture
