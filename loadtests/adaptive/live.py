#!/usr/bin/env python3
"""The adaptive keep-alive live, on the process provider: a periodic function is learned, then
pre-warmed before each call and stopped between calls.

A gateway on 127.0.0.1 runs one `process` function (the bundled demo function, with a startup
delay so that a cold start shows in the latency) with `cooldown_period = "adaptive"` and
`adaptive_bin_width = "1s"`: the histogram's minutes become seconds, so a function called every
PERIOD seconds is what a function called every PERIOD minutes is with the default bin width.
Decisions are compressed too (`polling_interval = "100ms"`, where the default is 1 s against
1-minute bins): at 1 s a pre-warm could start up to a whole bin late, which at this scale is
longer than the lead the forecast gives (a bin and half the spread of the idle times).

The script calls it every PERIOD seconds, CALLS times, and for each call prints its latency,
whether the gateway held it for a cold start (`X-Sluicegate-Cold-Start`), the replica's pid, the
replicas the gateway had half-way through the gap before the call, and the gateway's counters
(cold starts, pre-warms started/used/wasted). Bounded in time: about CALLS x PERIOD seconds plus
a few; loopback only.

Usage: loadtests/adaptive/live.py [--period 14.5] [--calls 22] [--learn 3] [--startup-delay 500ms]
       [--bin-width 1]   (e.g. --bin-width 3 --period 43.5 --calls 14: the learned pre-warm lead)
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "sluicegate")
PORT = 18098
FN = "periodic"


def http(method, path, body=None, timeout=30):
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=body, method=method)
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.status, dict(r.headers), r.read().decode()


def ok(path):
    try:
        return http("GET", path, timeout=1)[0] == 200
    except Exception:  # noqa: BLE001
        return False


def counter(metrics, name, labels=""):
    m = re.search(
        rf'^{name}\{{function_name="{FN}"{labels}\}} ([0-9.e+]+)$', metrics, re.MULTILINE
    )
    return float(m.group(1)) if m else 0.0


def status():
    return json.loads(http("GET", f"/system/function/{FN}")[2])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--period", type=float, default=14.5, help="seconds between calls (default 14.5)")
    ap.add_argument("--calls", type=int, default=22, help="calls (default 22)")
    ap.add_argument("--learn", type=int, default=3,
                    help="calls before the windows must hold (default 3: the first two idle times "
                         "agree when the third call arrives; the fourth is pre-warmed)")
    ap.add_argument("--startup-delay", default="500ms", help="demo function startup delay (default 500ms)")
    ap.add_argument("--bin-width", type=float, default=1.0,
                    help="adaptive_bin_width in seconds (default 1; with a wider bin than the replica's "
                         "start, the histogram's pre-warm, from the eleventh call, leads by twice the "
                         "start time seen instead of a whole bin)")
    args = ap.parse_args()
    if not os.path.exists(BIN):
        subprocess.run(["cargo", "build", "--release", "--bin", "sluicegate"], cwd=ROOT, check=True)
    tmp = tempfile.mkdtemp(prefix="sluicegate-adaptive-")
    cfg = os.path.join(tmp, "adaptive.toml")
    with open(cfg, "w") as f:
        f.write(f"""
[gateway]
listen = "127.0.0.1:{PORT}"
[functions.{FN}]
provider = "process"
command = ["{BIN}", "demo-function", "--startup-delay", "{args.startup_delay}"]
readiness_path = "/healthz"
termination_grace = "1s"
[functions.{FN}.autoscaler]
type = "rps"
min_replicas = 0
max_replicas = 1
cooldown_period = "adaptive"
adaptive_bin_width = "{args.bin_width}s"
polling_interval = "100ms"
""")
    log_path = os.path.join(tmp, "gateway.log")
    log = open(log_path, "w")
    gw = subprocess.Popen([BIN, "--config", cfg], stderr=log, env=dict(os.environ, SLUICEGATE_LOG="info"))
    rows = []
    try:
        deadline = time.time() + 20
        while not ok("/healthz"):
            if time.time() > deadline:
                raise RuntimeError("gateway did not start")
            time.sleep(0.05)
        print(f"demo function --startup-delay {args.startup_delay}; adaptive_bin_width {args.bin_width}s; "
              f"a call every {args.period} s, {args.calls} calls")
        print("| call | t s | latency ms | held for cold start | replica pid | replicas mid-gap "
              "| cold starts | pre-warms started/used/wasted | keep-alive s | pre-warm s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        start = time.time() + 0.5
        mid = None
        for i in range(args.calls):
            at = start + i * args.period
            # Half-way through the gap: how many replicas does the gateway keep?
            if i > 0:
                time.sleep(max(0.0, at - args.period / 2 - time.time()))
                mid = status()["replicas"]
            time.sleep(max(0.0, at - time.time()))
            t0 = time.time()
            code, headers, body = http("GET", f"/function/{FN}/")
            ms = (time.time() - t0) * 1000
            assert code == 200, body
            pid = re.search(r"pid=(\d+)", body).group(1)
            held = headers.get("X-Sluicegate-Cold-Start") or headers.get("x-sluicegate-cold-start")
            _, _, metrics = http("GET", "/metrics")
            st = status()
            rows.append(dict(ms=ms, held=held, pid=pid, mid=mid))
            pre = [int(counter(metrics, "sluicegate_function_prewarms_total", f',result="{r}"'))
                   for r in ("started", "used", "wasted")]
            cold = int(counter(metrics, "sluicegate_function_cold_starts_total"))
            print(f"| {i + 1} | {t0 - start:.1f} | {ms:.1f} | {held or '-'} | {pid} | "
                  f"{'-' if mid is None else mid} | {cold} | {pre[0]}/{pre[1]}/{pre[2]} | "
                  f"{st.get('keepAliveSeconds', '-')} | {st.get('prewarmSeconds', '-')} |", flush=True)
    finally:
        gw.terminate()
        gw.wait(timeout=30)
        log.close()
    prewarm_logs = sum(1 for line in open(log_path) if "pre-warm" in line)
    learned = [r for r in rows[args.learn:]]
    warm = [r for r in learned if not r["held"]]
    stopped = [r for r in learned if r["mid"] == 0]
    pids = len({r["pid"] for r in rows})
    print()
    print(f"after learning (calls {args.learn + 1}..{len(rows)}): {len(warm)}/{len(learned)} served warm, "
          f"{len(stopped)}/{len(learned)} with no replica half-way through the gap before them; "
          f"{pids} distinct replica processes over {len(rows)} calls; "
          f"{prewarm_logs} pre-warm log lines")
    return 0 if learned and len(warm) == len(learned) and len(stopped) == len(learned) else 1


if __name__ == "__main__":
    sys.exit(main())
