#!/usr/bin/env python3
"""The benchmark suite of spoold: each measure next to its floor or peer.

Run it through `benches/run`, which installs the peers, builds spoold and the
helpers in benches/tools/, and raises `ulimit -n`. This file runs the measures
and writes the table; docs/benchmarks.md says what each one means.

Every measure runs `--rounds` times. In each round spoold and its peers run one
after the other (the order alternates from round to round), so a minute in
which the shared machine is busier hurts both sides alike. A ratio is taken
from the medians; the table also shows the range of the per-round ratios.

Nothing is deleted until the run ends (benches/run removes the work directory):
on this machine's ext4, which has no journal, every freed inode slows the
creation of new files for minutes, and the next measure would pay for it.

Python 3.11 standard library only. Every process it starts is recorded, and
stopped by its pid when the run ends, however it ends.
"""

import argparse
import http.client
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
MEASURES = ["e2e", "latency", "submits", "polls", "sse", "scale"]
STARTED: list[subprocess.Popen] = []


# ------------------------------------------------------------------ helpers


def log(*args):
    print(f"[{time.strftime('%H:%M:%S')}]", *args, file=sys.stderr, flush=True)


def ulid(ms=None):
    ms = int(time.time() * 1000) if ms is None else ms
    v = (ms << 80) | random.getrandbits(80)
    return "".join(CROCKFORD[(v >> (5 * i)) & 31] for i in range(25, -1, -1))


def ulid_ms(id_):
    v = 0
    for c in id_:
        v = (v << 5) | CROCKFORD.index(c)
    return v >> 80


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), 0.2).close()
        return True
    except OSError:
        return False


def start(cmd, out=None, **kw):
    """Starts a process that is stopped when the run ends, whatever happens."""
    p = subprocess.Popen(cmd, stdout=out or subprocess.DEVNULL,
                         stderr=subprocess.STDOUT if out else subprocess.DEVNULL, **kw)
    STARTED.append(p)
    return p


def stop(p, sig=signal.SIGTERM, wait=20):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in STARTED:
        STARTED.remove(p)


def stop_all():
    """SIGTERM first: spoold then stops its handlers' process groups."""
    for p in list(STARTED):
        stop(p, signal.SIGTERM, 5)


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def wait_for(cond, timeout, what, every=0.005):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(every)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def request(port, method, path, body=None, headers=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, dict(r.getheaders()), data


def pss_kb(pids):
    """Proportional set size summed over pids: shared pages count once."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            total += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
    return total


def children(pid):
    out = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d))
        except (OSError, IndexError, ValueError):
            pass
    return out


def pct(values, p):
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.rename(tmp, path)


def httpload(port, threads, n, method, path, body=None, tool="httpload"):
    cmd = [tool, "127.0.0.1", str(port), str(threads), str(n), method, path] + ([body] if body else [])
    return json.loads(run(cmd))


def toml(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v) if isinstance(v, int) else json.dumps(v)


# ------------------------------------------------------------------ spoold


class Spoold:
    """One `spoold serve` on a free loopback port, with its own config file."""

    def __init__(self, bench, spool, **settings):
        self.b, self.spool = bench, Path(spool)
        self.port = free_port()
        conf = {
            "spool": str(self.spool),
            "handlers": str(bench.handlers),
            "listen": f"127.0.0.1:{self.port}",
            "shutdown_grace": "1s",
            "kill_grace": "1s",
            **settings,
        }
        self.conf = bench.work / f"spoold-{self.port}.toml"
        self.conf.write_text("".join(f"{k} = {toml(v)}\n" for k, v in conf.items()))
        self.log = bench.work / f"spoold-{self.port}.log"

    def __enter__(self):
        self.p = start([str(self.b.spoold), "serve", "--config", str(self.conf)], out=open(self.log, "w"))
        wait_for(lambda: "listening on" in self.log.read_text() or self.p.poll() is not None, 120, "spoold to listen")
        if self.p.poll() is not None:
            raise RuntimeError(f"spoold stopped at start:\n{self.log.read_text()}")
        return self

    def __exit__(self, *exc):
        stop(self.p)

    def succeeded(self, c):
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
        return int(re.search(r"^spoold_events_succeeded_total (\d+)", text, re.M).group(1))

    def submit(self, kind, body="{}"):
        code, _, data = request(self.port, "POST", f"/events/{kind}", body, {"content-type": "application/json"})
        assert code == 202, (code, data)
        return json.loads(data)["id"]

    def status(self, id_):
        code, _, data = request(self.port, "GET", f"/events/{id_}")
        assert code == 200, (code, data)
        return json.loads(data)

    def deleted(self):
        """Events the retention sweeps have deleted so far (from the log)."""
        return sum(int(x) for x in re.findall(r"events_deleted: (\d+)", self.log.read_text()))

    def e2e(self, n, limit):
        """Submits up to n no-op events from 8 keep-alive clients and counts
        those that succeed, until all n have or `limit` seconds have passed:
        events/s end to end, measured while the pipeline is full."""
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        before = self.succeeded(c)
        t0 = time.monotonic()
        load = start([self.b.tool("httpload"), "127.0.0.1", str(self.port), "8", str(n), "POST", "/events/noop", "{}"])
        done = 0
        while done < n and time.monotonic() - t0 < limit:
            time.sleep(0.01)
            done = self.succeeded(c) - before
        dt = time.monotonic() - t0
        if load.poll() not in (None, 0):
            raise RuntimeError("some submits failed")
        stop(load, signal.SIGKILL)
        c.close()
        if done < 20:
            raise RuntimeError(f"only {done} events succeeded in {dt:.1f} s")
        return done / dt


# ------------------------------------------------------------------ the bench


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = Path(args.work)
        self.bin = Path(args.bin)
        self.spoold = self.bin / "spoold"
        self.handlers = self.work / "handlers"
        self.rounds = args.rounds
        self.quick = args.quick
        # The longest one end-to-end count runs: a busy machine runs slowly.
        self.limit = 3 if args.quick else 8
        self.rows = []
        self.notes = []
        self.made = 0
        self.load_at_start = os.getloadavg()[0]

    def tool(self, name):
        return str(self.bin / name)

    def scratch(self, name):
        """A new directory under the work directory (see the module doc)."""
        self.made += 1
        d = self.work / f"{name}-{self.made}"
        d.mkdir(parents=True)
        return d

    def setup_handlers(self):
        h = self.handlers
        h.mkdir(exist_ok=True)
        shutil.copy(self.bin / "noop", h / "noop")
        shutil.copy(self.bin / "stamp", h / "stamp")
        # held and hold run until spoold stops them (at most a minute, so
        # nothing outlives the bench). held runs one at a time: submits of it
        # only fill the queue.
        for name in ("held", "hold"):
            (h / name).write_text("#!/bin/sh\nexec sleep 60\n")
            (h / name).chmod(0o755)
        (h / "held.toml").write_text("concurrency = 1\n")

    def side_by_side(self, what, sides, rounds=None):
        """Runs each side (name → function returning a dict of figures) once
        per round, the order alternating; returns name → figure → values."""
        out = {name: {} for name in sides}
        for r in range(rounds or self.rounds):
            names = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in names:
                for k, v in sides[name]().items():
                    out[name].setdefault(k, []).append(v)
            log(f"{what}, round {r + 1}: " + "; ".join(
                f"{name} " + ", ".join(f"{k} {v[-1]:,.3g}" for k, v in figs.items()) for name, figs in out.items()))
        return out

    def row(self, measure, unit, spoold, peer, peer_vals, target, absolute=False):
        """A line of the table. `target` is (op, bound): on the ratio
        spoold ÷ peer, or on spoold's median itself when `absolute`."""
        self.rows.append(dict(measure=measure, unit=unit, spoold=spoold, peer=peer, peer_vals=peer_vals,
                              target=target, absolute=absolute))

    # -------------------------------------------------------- e2e

    def m_e2e(self):
        n_spoold, n_spawn, n_incron = (400, 1000, 150) if self.quick else (1500, 3000, 400)
        res = self.side_by_side("events/s end to end", {
            "spoold": lambda: {"rate": self.e2e_round(n_spoold)},
            "spawn floor": lambda: {"rate": self.spawn_round(n_spawn)},
            "incron": lambda: {"rate": self.incron_round(n_incron)},
        })
        sp = res["spoold"]["rate"]
        self.row("events/s end to end: HTTP submit, fsync on, no-op compiled handler, 2 at once", "events/s", sp,
                 "spawn floor: posix_spawn + waitpid of the same handler, 2 threads", res["spawn floor"]["rate"], ("≥", 0.7))
        self.row("events/s end to end (the same figures)", "events/s", sp,
                 "incron running the same handler per file (bash -c)", res["incron"]["rate"], ("≥", 5.0))

    def e2e_round(self, n):
        with Spoold(self, self.scratch("e2e-spool"), concurrency=2, fsync=True) as srv:
            return srv.e2e(n, self.limit)

    def spawn_round(self, n):
        return float(run([self.tool("spawnfloor"), str(self.handlers / "noop"), "2", str(n)]))

    def incron_round(self, n):
        """incrond with one table: IN_MOVED_TO in a directory runs
        `noop $@/$#`, which removes the file; events/s until the directory
        is empty (or `limit` s: then the files handled so far)."""
        d = self.scratch("incron")
        inbox, stage = d / "in", d / "stage"
        for sub in ("tables", "users", "in", "stage"):
            (d / sub).mkdir()
        (d / "incron.conf").write_text(
            f"system_table_dir = {d}/tables\nuser_table_dir = {d}/users\nlockfile_dir = {d}\nlockfile_name = incrond\n")
        (d / "tables" / "bench").write_text(f"{inbox} IN_MOVED_TO {self.handlers}/noop $@/$#\n")
        p = start(["incrond", "-n", "-f", str(d / "incron.conf")])
        try:
            self.wait_incron_ready(p, stage, inbox)
            for i in range(n):
                (stage / f"f{i}").write_text("{}")
            t0 = time.monotonic()
            for i in range(n):
                os.rename(stage / f"f{i}", inbox / f"f{i}")
            left = n
            while left and time.monotonic() - t0 < self.limit:
                time.sleep(0.005)
                left = sum(1 for _ in os.scandir(inbox))
            return (n - left) / (time.monotonic() - t0)
        finally:
            stop(p)

    @staticmethod
    def wait_incron_ready(p, stage, inbox):
        """incrond is ready once it runs the handler for a probe file."""
        deadline = time.monotonic() + 20
        while True:
            (stage / "probe").write_text("")
            os.rename(stage / "probe", inbox / "probe")
            try:
                wait_for(lambda: not (inbox / "probe").exists(), 1, "incron's first run")
                return
            except RuntimeError:
                (inbox / "probe").unlink(missing_ok=True)
                if time.monotonic() > deadline or p.poll() is not None:
                    raise RuntimeError("incrond does not run the handler") from None

    # -------------------------------------------------------- latency

    def m_latency(self):
        n_spoold, n_inotify = (100, 300) if self.quick else (300, 1000)
        res = self.side_by_side("dispatch latency (ms)", {
            "spoold": lambda: self.dispatch_latency(True, n_spoold),
            "spoold fsync off": lambda: self.dispatch_latency(False, n_spoold),
            "inotify": lambda: self.inotify_latency(n_inotify),
        })
        sp, off, ino = res["spoold"], res["spoold fsync off"], res["inotify"]
        self.row("dispatch latency p50, queue entry published → handler started (fsync on)", "ms", sp["p50"],
                 "inotify's own latency for a rename, p50", ino["p50"], ("<", 1.0), absolute=True)
        self.row("dispatch latency p99 (fsync on)", "ms", sp["p99"],
                 "inotify p99", ino["p99"], ("<", 5.0), absolute=True)
        self.row("dispatch latency p50, fsync off (to tell flushes from the rest)", "ms", off["p50"],
                 "inotify p50", ino["p50"], ("<", 1.0), absolute=True)
        self.row("dispatch latency p99, fsync off", "ms", off["p99"],
                 "inotify p99", ino["p99"], ("<", 5.0), absolute=True)

    def inotify_latency(self, n):
        lat = [int(x) / 1e6 for x in run([self.tool("inotifylat"), str(self.scratch("inotify")), str(n)]).split()]
        return {"p50": statistics.median(lat), "p99": pct(lat, 0.99)}

    def dispatch_latency(self, fsync, n):
        """Publishes events by hand, one at a time, the way a submit does
        (the event directory first, then a link into queue/), reading the clock
        just before the link. The stamp handler reads it first thing in main()."""
        spool = self.scratch("lat-spool")
        stamps = self.work / "stamps"  # $SPOOL_DIR/.. for the stamp handler
        stamps.unlink(missing_ok=True)
        lat = []
        with Spoold(self, spool, concurrency=2, fsync=fsync):
            tmp, events, queue = spool / "tmp", spool / "events", spool / "queue"
            t_end = time.monotonic() + self.limit
            for i in range(n + 5):
                if time.monotonic() > t_end and len(lat) >= 50:
                    break
                id_ = ulid()
                staging = tmp / f"bench.{i}.event"
                staging.mkdir()
                now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
                (staging / "event.json").write_text(json.dumps({
                    "id": id_, "type": "stamp", "submitted_at": now, "max_attempts": 3,
                    "timeout": 30.0, "payload": {}}))
                os.rename(staging, events / id_)
                journal = tmp / f"bench.{i}.queue"
                journal.write_text('{"type":"stamp"}')
                t0 = time.time_ns()
                os.link(journal, queue / id_)
                journal.unlink()
                status = events / id_ / "status.json"
                # Polled every 2 ms: the latency is read from the stamp, and a
                # tighter loop would take CPU from the spoold it measures.
                wait_for(lambda: stamps.exists() and id_ in stamps.read_text(), 10, "the stamp handler", every=0.002)
                # The next event goes in once this one is over.
                wait_for(lambda: status.exists() and b'"succeeded"' in status.read_bytes(), 10, "the event to end", every=0.002)
                t1 = int(stamps.read_text().split(id_)[1].split()[0])
                if i >= 5:  # the first few warm the caches up
                    lat.append((t1 - t0) / 1e6)
                time.sleep(0.002)
        return {"p50": statistics.median(lat), "p99": pct(lat, 0.99)}

    # -------------------------------------------------------- submits

    def m_submits(self):
        n = 1000 if self.quick else 3000
        res = self.side_by_side("durable submits/s", {
            "spoold": lambda: {"rate": self.submit_round(n)},
            "floor": lambda: {"rate": float(run([self.tool("fsyncfloor"), str(self.scratch("fsync-floor")), "8", str(n)]))},
        })
        self.row("durable submits/s, 8 concurrent keep-alive clients (fsync on; the handler is held back)", "submits/s",
                 res["spoold"]["rate"], "tmp write + fsync + rename + dir fsync, 8 threads", res["floor"]["rate"], ("≥", 0.7))

    def submit_round(self, n):
        with Spoold(self, self.scratch("submit-spool"), fsync=True) as srv:
            return httpload(srv.port, 8, n, "POST", "/events/held", "{}", self.tool("httpload"))["rate"]

    # -------------------------------------------------------- polls

    def m_polls(self):
        secs = 3 if self.quick else 10
        self.status_file = None
        res = self.side_by_side("status polls/s", {
            "spoold": lambda: self.polls_spoold(secs),
            "nginx": lambda: self.polls_nginx(secs),
        })
        for code in ("200", "304"):
            what = "200" if code == "200" else "304 (If-None-Match with the current ETag)"
            self.row(f"status polls/s, keep-alive, wrk -t2 -c64 -d{secs}s, {what}", "req/s", res["spoold"][code],
                     "nginx serving the same status file, etag on", res["nginx"][code], ("≥", 1.0))

    def wrk(self, url, secs, header=None):
        cmd = ["wrk", "-t2", "-c64", f"-d{secs}s"] + (["-H", header] if header else []) + [url]
        out = run(cmd)
        if "Non-2xx or 3xx" in out or "Socket errors" in out:
            raise RuntimeError(f"wrk saw errors:\n{out}")
        return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))

    def finished_status(self):
        """The status of a finished no-op event, as spoold serves it (made once)."""
        if self.status_file is None:
            with Spoold(self, self.scratch("status-spool"), fsync=True) as srv:
                id_ = srv.submit("noop")
                wait_for(lambda: srv.status(id_)["state"] == "succeeded", 30, "the event to end")
                self.status_file = self.work / "status.json"
                self.status_file.write_bytes(request(srv.port, "GET", f"/events/{id_}")[2])
        return self.status_file

    def polls_spoold(self, secs):
        with Spoold(self, self.scratch("poll-spool"), fsync=True) as srv:
            id_ = srv.submit("noop")
            wait_for(lambda: srv.status(id_)["state"] == "succeeded", 30, "the event to end")
            etag = f'"{srv.status(id_)["seq"]}"'
            assert request(srv.port, "GET", f"/events/{id_}", headers={"If-None-Match": etag})[0] == 304
            url = f"http://127.0.0.1:{srv.port}/events/{id_}"
            return {"200": self.wrk(url, secs), "304": self.wrk(url, secs, f"If-None-Match: {etag}")}

    def nginx(self, name, server_block, modules=""):
        """nginx, 2 workers, on a free loopback port; returns (process, port, dir)."""
        d = self.scratch(name)
        port = free_port()
        (d / "logs").mkdir()
        conf = d / "nginx.conf"
        conf.write_text(f"""{modules}
user root;
worker_processes 2;
worker_rlimit_nofile 20000;
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 20000; }}
http {{
    access_log off;
    keepalive_requests 100000000;  # the default, 1000, makes wrk reconnect
    keepalive_timeout 75s;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        {server_block.replace("@DIR@", str(d))}
    }}
}}
""")
        run(["nginx", "-t", "-q", "-p", str(d), "-c", str(conf)])
        p = start(["nginx", "-p", str(d), "-c", str(conf), "-g", "daemon off;"])
        wait_for(lambda: port_open(port), 10, "nginx to listen")
        return p, port, d

    def polls_nginx(self, secs):
        p, port, d = self.nginx("nginx-static", """
        root @DIR@/www;
        location / { default_type application/json; etag on; add_header Cache-Control no-cache; }""")
        try:
            (d / "www").mkdir()
            shutil.copy(self.finished_status(), d / "www" / "status.json")
            etag = request(port, "GET", "/status.json")[1]["ETag"]
            assert request(port, "GET", "/status.json", headers={"If-None-Match": etag})[0] == 304
            url = f"http://127.0.0.1:{port}/status.json"
            return {"200": self.wrk(url, secs), "304": self.wrk(url, secs, f"If-None-Match: {etag}")}
        finally:
            stop(p, signal.SIGQUIT)

    # -------------------------------------------------------- SSE

    def m_sse(self):
        n = 2000 if self.quick else 10000
        res = self.side_by_side("SSE fan-out (ms, KB)", {
            "spoold": lambda: self.sse_spoold(n),
            "nchan": lambda: self.sse_nchan(n),
        })
        sp, nc = res["spoold"], res["nchan"]
        self.row(f"SSE: one status change delivered to {n:,} subscribers, time to reach all", "ms", sp["all"],
                 "nginx + nchan publishing the same message to as many EventSource subscribers", nc["all"], ("≤", 1.0))
        self.row("SSE: time to reach one subscriber, p50", "ms", sp["p50"], "nchan p50", nc["p50"], ("≤", 1.0))
        self.row("SSE: time to reach one subscriber, p99", "ms", sp["p99"], "nchan p99", nc["p99"], ("≤", 1.0))
        self.row("SSE: memory per subscriber (PSS growth ÷ subscribers)", "KB", sp["kb"],
                 "nchan (master and workers)", nc["kb"], ("≤", 10.0), absolute=True)

    def sse_clients(self, port, path, n, ready, marker, trigger, mem):
        """Connects n subscribers (benches/tools/sseclient, a process of its
        own), notes the server's memory growth, makes the change with
        `trigger` (which returns its clock reading) and returns the time from
        it to each subscriber (ms: p50, p99, all) and KB per subscriber."""
        out = self.work / "sse-times"
        before = mem()
        cli = subprocess.Popen([self.tool("sseclient"), "127.0.0.1", str(port), path, str(n), ready, marker, str(out), "60"],
                               stdout=subprocess.PIPE, text=True)
        STARTED.append(cli)
        try:
            line = cli.stdout.readline().split()
            if not line or line[0] != "ready" or int(line[1]) != n:
                raise RuntimeError(f"the SSE clients of {path} on port {port} did not all connect: {line}")
            time.sleep(1.0)
            kb = (mem() - before) / n
            t0 = trigger()
            done = cli.stdout.readline().split()
            cli.wait(30)
        finally:
            stop(cli, signal.SIGKILL)
        if not done or done[0] != "done" or int(done[1]) != n:
            raise RuntimeError(f"not every subscriber of {path} got the change: {done}")
        lat = [(int(x) - t0) / 1e6 for x in out.read_text().split()]
        return {"p50": statistics.median(lat), "p99": pct(lat, 0.99), "all": max(lat), "kb": kb}

    def sse_spoold(self, n):
        """The change: a handler's progress, written the way a handler writes
        it (progress.json replaced by a rename); spoold checks for it every
        progress_interval, here 10 ms."""
        spool = self.scratch("sse-spool")
        marker = f"GO-{random.getrandbits(48):x}"
        with Spoold(self, spool, fsync=True, max_connections=n + 2000, max_streams=n + 500,
                    progress_interval="10ms") as srv:
            id_ = srv.submit("hold")
            wait_for(lambda: srv.status(id_)["state"] == "running", 30, "the event to run")
            progress = spool / "events" / id_ / "progress.json"

            def trigger():
                t0 = time.time_ns()
                write_atomic(progress, json.dumps({"progress": 50, "message": marker}))
                return t0

            return self.sse_clients(srv.port, f"/events/{id_}/stream", n, "data:", marker, trigger,
                                    lambda: pss_kb([srv.p.pid]))

    def sse_nchan(self, n):
        """The change: one POST to nchan's publisher location. With
        `nchan_subscriber_first_message newest` a subscriber gets messages
        published after it came; it is ready when it has nchan's ": hi"."""
        marker = f"GO-{random.getrandbits(48):x}"
        p, port, d = self.nginx("nginx-nchan", """
        location = /sub { nchan_subscriber eventsource; nchan_channel_id bench; nchan_subscriber_first_message newest; }
        location = /pub { nchan_publisher; nchan_channel_id bench; }""",
                                modules="load_module /usr/lib/nginx/modules/ngx_nchan_module.so;")
        try:
            assert request(port, "POST", "/pub", '{"hello": true}', {"content-type": "application/json"})[0] in (201, 202)
            pids = [p.pid] + children(p.pid)
            body = json.dumps({"progress": 50, "message": marker})

            def trigger():
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                c.connect()
                t0 = time.time_ns()
                c.request("POST", "/pub", body=body, headers={"content-type": "application/json"})
                c.getresponse().read()
                c.close()
                return t0

            return self.sse_clients(port, "/sub", n, ": hi", marker, trigger, lambda: pss_kb(pids))
        finally:
            stop(p, signal.SIGQUIT)

    # -------------------------------------------------------- scale

    def m_scale(self):
        """Per-event cost with 1,000 and with --big finished events in the
        spool, while retention deletes the oldest of them (gc_batch at a time)."""
        n_big, n = self.args.big, (400 if self.quick else 1500)
        big = self.prepare_big(n_big)
        # Two more rounds than the others: the two sides are close, and the
        # target (1.1) leaves little room for the machine's noise.
        res = self.side_by_side("per-event cost (µs)", {
            "1,000": lambda: self.scale_round(self.prepare_small(1000), n),
            f"{n_big:,}": lambda: self.scale_round(big, n),
        }, rounds=self.rounds + 2)
        small, large = res["1,000"], res[f"{n_big:,}"]
        self.row(f"per-event cost end to end with {n_big:,} finished events in the spool, vs 1,000 "
                 "(1 ÷ events/s, as in the first row)", "µs/event",
                 large["e2e"], "the same with 1,000", small["e2e"], ("≤", 1.1))
        self.row(f"per-event cost of a status GET of a random finished event, {n_big:,} vs 1,000 "
                 "(one client, p50, best of 3 × 10,000)", "µs/GET",
                 large["get"], "the same with 1,000", small["get"], ("≤", 1.1))

    def scale_round(self, prepared, n):
        spool, sample, cutoff = prepared
        with Spoold(self, spool, concurrency=2, fsync=True, retention=self.retention(cutoff), gc_interval="3s") as srv:
            # Measure once the sweeps have begun deleting.
            wait_for(lambda: "retention sweep" in srv.log.read_text(), 60, "the first retention sweep", every=0.05)
            paths = f"@{sample}"
            httpload(srv.port, 1, len(sample.read_text().split()), "GET", paths, tool=self.tool("httpload"))  # warm-up
            rate = srv.e2e(n, self.limit)
            get = min(httpload(srv.port, 1, 10000, "GET", paths, tool=self.tool("httpload"))["p50_us"] for _ in range(3))
            self.deleted = getattr(self, "deleted", 0) + srv.deleted()
        return {"e2e": 1e6 / rate, "get": get}

    def init_spool(self, spool):
        """Lets spoold make an empty spool (FORMAT and directories)."""
        with Spoold(self, spool):
            pass

    @staticmethod
    def cutoff_ms(names):
        """The time before which the oldest 5% of the events were made."""
        return ulid_ms(names[len(names) * 5 // 100])

    @staticmethod
    def retention(cutoff_ms):
        """A retention after which the events made before cutoff_ms are due now."""
        return f"{max(1, int(time.time() - cutoff_ms / 1000))}s"

    def sample(self, names, k=1000):
        """A file of up to k status paths out of the youngest 90% of the events
        (never due for deletion)."""
        young = names[len(names) // 10:]
        self.made += 1
        dest = self.work / f"sample-{self.made}"
        dest.write_text("".join(f"/events/{x}\n" for x in random.sample(young, min(k, len(young)))))
        return dest

    def prepare_small(self, n):
        """A fresh small spool for each round, so it stays small."""
        spool = self.scratch("spool-small")
        self.init_spool(spool)
        now = int(time.time() * 1000)
        run([self.tool("genspool"), str(spool / "events"), str(n), str(now - 7_200_000), str(now - 3_600_000)])
        # As for the big spool: its writeback must not land in the measure.
        run(["sync", "-f", str(spool)])
        names = sorted(os.listdir(spool / "events"))
        return spool, self.sample(names), self.cutoff_ms(names)

    def prepare_big(self, n):
        """The big spool lives in the cache directory across runs (writing a
        million events takes a minute or two, and 12 GB); each run tops it up
        to n events (the sweeps of the last run deleted some)."""
        spool = Path(self.args.cache) / f"spool-{n}"
        if not (spool / "FORMAT").exists():
            spool.mkdir(parents=True, exist_ok=True)
            self.init_spool(spool)
        t0 = time.monotonic()
        names = os.listdir(spool / "events")
        missing = n - len(names)
        if missing > 0:
            if shutil.disk_usage(spool).free < missing * 16 * 1024 + (5 << 30):
                raise RuntimeError(f"not enough disk for {missing:,} more events in {spool}")
            log(f"writing {missing:,} finished events into {spool} (kept for the next runs)")
            now = int(time.time() * 1000)
            first = ulid_ms(max(names)) + 1 if names else now - 7_200_000
            run([self.tool("genspool"), str(spool / "events"), str(missing), str(min(first, now - 60_000)), str(now - 60_000)])
            subprocess.run(["sync", "-f", str(spool)], check=True)
            names = os.listdir(spool / "events")
            self.notes.append(f"This run wrote {missing:,} finished events into the cached large spool first, "
                              f"in {time.monotonic() - t0:.0f} s (generate + sync).")
        log(f"large spool: {len(names):,} events")
        names.sort()
        return spool, self.sample(names), self.cutoff_ms(names)

    # -------------------------------------------------------- table

    def table(self, started, elapsed):
        def fmt(x):
            if x >= 100:
                return f"{x:,.0f}"
            return f"{x:.1f}" if x >= 10 else f"{x:.2f}" if x >= 1 else f"{x:.3f}"

        def mmm(vals):
            return f"{fmt(min(vals))} / **{fmt(statistics.median(vals))}** / {fmt(max(vals))}"

        lines = [
            "| measure | spoold: min / **median** / max | compared with | its min / **median** / max | "
            "ratio of the medians (range over rounds) | target | met |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            sm, pm = statistics.median(r["spoold"]), statistics.median(r["peer_vals"])
            ratio = sm / pm
            per_round = [a / b for a, b in zip(r["spoold"], r["peer_vals"])]
            op, bound = r["target"]
            value = sm if r["absolute"] else ratio
            target = f"{op} {fmt(bound)} {r['unit']}" if r["absolute"] else f"{op} {bound} ×"
            ok = {"≥": value >= bound, "≤": value <= bound, "<": value < bound}[op]
            lines.append(
                f"| {r['measure']} ({r['unit']}) | {mmm(r['spoold'])} | {r['peer']} | {mmm(r['peer_vals'])} | "
                f"{ratio:.2f} × ({min(per_round):.2f}–{max(per_round):.2f}) | {target} | {'yes' if ok else '**no**'} |")
        quick = "; QUICK mode: smaller counts, shorter wrk runs" if self.quick else ""
        head = [
            "# spoold benchmark results",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(started))}",
            f"- machine: {machine(self.work, Path(self.args.cache).parent)}",
            f"- spoold: {self.args.commit}",
            f"- rounds: {self.rounds} ({self.rounds + 2} for the scale measure), spoold and what it is compared "
            f"with side by side in each round, the order alternating{quick}",
            f"- total time of the run: {elapsed:.0f} s, the build included",
            f"- load average (1 min) at the start: {self.load_at_start:.1f}, at the end: {os.getloadavg()[0]:.1f} "
            "(the machine is shared: absolute figures drift, ratios measured side by side hold better)",
            "",
        ]
        notes = list(self.notes)
        if hasattr(self, "deleted"):
            notes.append(f"The retention sweeps deleted {self.deleted:,} events during the scale rounds.")
        return "\n".join(head + lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


def filesystem(path):
    """`ext4 (/dev/vda, without a journal)`, say: the kind of disk the spools are on."""
    try:
        src, fstype = run(["findmnt", "-no", "SOURCE,FSTYPE", "-T", str(path)]).split()[:2]
    except (subprocess.CalledProcessError, FileNotFoundError, ValueError):
        return "?"
    jbd2 = os.listdir("/proc/fs/jbd2") if os.path.isdir("/proc/fs/jbd2") else []
    journal = any(j.startswith(os.path.basename(src)) for j in jbd2)
    return f"{fstype} ({src}{', without a journal' if fstype == 'ext4' and not journal else ''})"


def machine(work, cache):
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    fs_work, fs_cache = filesystem(work), filesystem(cache)
    fs = fs_work if fs_work == fs_cache else f"{fs_work}, the large spool on {fs_cache}"
    return (f"{os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}, "
            f"{platform.freedesktop_os_release().get('PRETTY_NAME', '?')}, spools on {fs}, "
            f"open files {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")


def main():
    ap = argparse.ArgumentParser(description="spoold's benchmark suite (run it through benches/run)")
    ap.add_argument("--work", required=True, help="a scratch directory, removed by the caller")
    ap.add_argument("--bin", required=True, help="spoold and the compiled helpers")
    ap.add_argument("--cache", required=True, help="where the large spool is kept between runs")
    ap.add_argument("--out", required=True, help="the Markdown table")
    ap.add_argument("--commit", default="?")
    ap.add_argument("--t0", type=float, default=None, help="when the run began (epoch s), to count the build in")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--big", type=int, default=1_000_000, help="finished events in the large spool")
    ap.add_argument("--only", default=",".join(MEASURES), help="comma-separated: " + ",".join(MEASURES))
    ap.add_argument("--quick", action="store_true", help="smaller counts and shorter runs, to try the suite out")
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    b = Bench(args)
    b.setup_handlers()
    started = args.t0 or time.time()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    try:
        for m in args.only.split(","):
            if m not in MEASURES:
                sys.exit(f"unknown measure {m!r}; the measures are {', '.join(MEASURES)}")
            t = time.monotonic()
            getattr(b, f"m_{m}")()
            log(f"{m} took {time.monotonic() - t:.0f} s")
    finally:
        stop_all()
    text = b.table(started, time.time() - started)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
