#!/usr/bin/env python3
"""Cold start of the bundled demo function, measured from both sides.

For each of N rounds: the function is at zero; one request wakes it; then it is scaled back to
zero by hand. From the replica's own timestamps (it prints when it starts listening, and echoes
when a request arrived) and the gateway's JSON log (when its readiness probe succeeded):

  listen -> first request   time from the replica listening to the first held request reaching it
                            (includes the up-to-10 ms readiness probe interval)
  ready  -> first request   time from the gateway noticing readiness to the request reaching it
                            (the gateway's own hand-off)
  client total              the first request's whole latency as the client saw it

Usage: loadtests/coldstart.py [--rounds 20] [--startup-delay 0ms]
"""
import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "sluicegate")
PORT = 18097


def http(method, path, body=None, timeout=30):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=body, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read().decode()


def wait(cond, what, limit=20.0):
    deadline = time.time() + limit
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def ns_of(ts):
    # tracing's JSON timestamps: 2026-11-23T10:16:52.519812Z (microseconds)
    dt = datetime.datetime.strptime(ts.rstrip("Z")[:26], "%Y-%m-%dT%H:%M:%S.%f")
    return int(dt.replace(tzinfo=datetime.timezone.utc).timestamp() * 1e6) * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--startup-delay", default="0ms")
    args = ap.parse_args()
    if not os.path.exists(BIN):
        subprocess.run(["cargo", "build", "--release", "--bin", "sluicegate"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="sluicegate-cold-")
    cfg = os.path.join(tmp, "cold.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[gateway]
listen = "127.0.0.1:{PORT}"
[functions.cold]
provider = "process"
command = ["{BIN}", "demo-function", "--startup-delay", "{args.startup_delay}"]
readiness_path = "/healthz"
termination_grace = "1s"
[functions.cold.autoscaler]
type = "none"
min_replicas = 0
max_replicas = 1
""")
    log_path = os.path.join(tmp, "gateway.log")
    log = open(log_path, "w")
    gw = subprocess.Popen([BIN, "--config", cfg, "--log-format", "json"], stderr=log,
                          env=dict(os.environ, SLUICEGATE_LOG="info"))
    try:
        wait(lambda: _ok("/healthz"), "gateway")
        rows = []
        for _ in range(args.rounds):
            t0 = time.time_ns()
            status, headers, body = http("GET", "/function/cold/")
            total_ms = (time.time_ns() - t0) / 1e6
            assert status == 200, body
            received = int(re.search(r"received_unix_ns=(\d+)", body).group(1))
            pid = int(re.search(r"pid=(\d+)", body).group(1))
            rows.append({"total_ms": total_ms, "received": received, "pid": pid,
                         "held_s": float(headers.get("x-sluicegate-cold-start", "nan"))})
            http("POST", "/system/scale-function/cold", b'{"replicas": 0}')
            wait(lambda: json.loads(http("GET", "/system/function/cold")[2])["availableReplicas"] == 0, "scale to zero")
            wait(lambda: not os.path.exists(f"/proc/{pid}"), "replica exit")
            time.sleep(0.1)
        _, _, metrics = http("GET", "/metrics")
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        log.close()
    # Match log events to rounds by order: one "listening" line and one "replica ready" per round.
    listens, readies = [], []
    for line in open(log_path):
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        msg = ev.get("message", "") or ev.get("fields", {}).get("message", "")
        m = re.search(r"listening on .* at unix_ns=(\d+)", msg)
        if m:
            listens.append(int(m.group(1)))
        elif msg == "replica ready":
            readies.append(ns_of(ev["timestamp"]))
    assert len(listens) == len(readies) == len(rows), (len(listens), len(readies), len(rows))
    listen_to_req = [(r["received"] - l) / 1e6 for r, l in zip(rows, listens)]
    ready_to_req = [(r["received"] - d) / 1e6 for r, d in zip(rows, readies)]
    totals = [r["total_ms"] for r in rows]
    held = [r["held_s"] * 1000 for r in rows]

    def line(name, v):
        v = sorted(v)
        p90 = v[min(len(v) - 1, int(0.9 * len(v)))]
        print(f"| {name} | {statistics.median(v):.2f} | {p90:.2f} | {max(v):.2f} |")

    print(f"cold starts: {len(rows)} rounds, demo-function --startup-delay {args.startup_delay}")
    print("| measure | median ms | p90 ms | max ms |")
    print("|---|---|---|---|")
    line("listen -> first request at replica", listen_to_req)
    line("ready (probe ok) -> first request at replica", ready_to_req)
    line("client: whole first request", totals)
    line("gateway: X-Sluicegate-Cold-Start (held)", held)
    count = re.search(r'sluicegate_function_cold_start_seconds_count\{function_name="cold"\} (\d+)', metrics)
    print(f"sluicegate_function_cold_start_seconds_count = {count.group(1) if count else '?'}")


def _ok(path):
    try:
        return http("GET", path, timeout=1)[0] == 200
    except Exception:  # noqa: BLE001
        return False


if __name__ == "__main__":
    sys.exit(main())
