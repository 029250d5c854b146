#!/usr/bin/env python3
"""POST N events of one type from T keep-alive connections; print submits/s.

usage: load.py HOST PORT TYPE N THREADS
"""
import http.client
import sys
import threading
import time

host, port, kind, n, threads = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
per = n // threads
errors = []


def work():
    c = http.client.HTTPConnection(host, port)
    for _ in range(per):
        c.request("POST", f"/events/{kind}", body="{}", headers={"content-type": "application/json"})
        r = c.getresponse()
        r.read()
        if r.status != 202:
            errors.append(r.status)


t0 = time.time()
ts = [threading.Thread(target=work) for _ in range(threads)]
for t in ts:
    t.start()
for t in ts:
    t.join()
if errors:
    sys.exit(f"{len(errors)} submits failed: {sorted(set(errors))}")
print(f"{per * threads / (time.time() - t0):.0f}")
