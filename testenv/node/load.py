#!/usr/bin/env python3
"""Steady GET load through the Ingress for testenv/node/e2e's upgrade test.

    load.py --addr 127.0.0.1:PORT --host HOST --path /id/... --expect TEXT \
            --stop FILE --out FILE [--workers N]

Each worker sends one request at a time on a fresh connection (so every request
can land on any pod) until FILE exists; a request fails on a connection error, a
timeout (5 s), a status other than 200 or a body without TEXT. Writes
{"total", "failed", "errors": {reason: count}} to --out.
"""
import argparse
import collections
import http.client
import json
import os
import threading
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", required=True)
    ap.add_argument("--host", required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--expect", required=True)
    ap.add_argument("--stop", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--workers", type=int, default=4)
    a = ap.parse_args()
    host, port = a.addr.rsplit(":", 1)
    lock = threading.Lock()
    total = [0]
    errors = collections.Counter()

    def worker():
        while not os.path.exists(a.stop):
            reason = None
            try:
                c = http.client.HTTPConnection(host, int(port), timeout=5)
                c.request("GET", a.path, headers={"Host": a.host})
                r = c.getresponse()
                body = r.read()
                c.close()
                if r.status != 200:
                    reason = f"status {r.status}"
                elif a.expect.encode() not in body:
                    reason = "unexpected body"
            except Exception as e:  # noqa: BLE001 - every failure counts
                reason = type(e).__name__
            with lock:
                total[0] += 1
                if reason:
                    errors[reason] += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=worker) for _ in range(a.workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with open(a.out, "w") as f:
        json.dump({"total": total[0], "failed": sum(errors.values()), "errors": dict(errors)}, f)


if __name__ == "__main__":
    main()
