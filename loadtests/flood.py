#!/usr/bin/env python3
"""The flood case: 200 concurrent requests to a function at zero whose one replica is a plain
`python3 -m http.server` (listen backlog 5) that takes 1 s to start. Each run starts a fresh
gateway, fires all requests at once, and reports how many were served and the slowest, beside the
cold start the gateway measured. Loopback only; every wait is bounded.

    loadtests/flood.py [--bin target/release/sluicegate] [--runs 10] [--requests 200] [--slow-start 2s]
"""
import argparse, concurrent.futures, http.client, os, re, subprocess, sys, tempfile, threading, time

p = argparse.ArgumentParser()
p.add_argument("--bin", default="target/release/sluicegate")
p.add_argument("--runs", type=int, default=10)
p.add_argument("--requests", type=int, default=200)
p.add_argument("--slow-start", default=None, help="the function's slow_start (default: the gateway's)")
p.add_argument("--port", type=int, default=18120)
args = p.parse_args()

tmp = tempfile.mkdtemp(prefix="sluicegate-flood-")
slow = f'slow_start = "{args.slow_start}"\n' if args.slow_start else ""
config = f"""[gateway]
listen = "127.0.0.1:{args.port}"

[functions.web]
provider = "process"
command = ["sh", "-c", "sleep 1; exec python3 -m http.server $PORT --bind 127.0.0.1 --directory {tmp}"]
readiness_path = "/"
max_ongoing_requests = 100
max_queued_requests = 1000
{slow}
[functions.web.autoscaler]
type = "rps"
min_replicas = 0
max_replicas = 1
"""
path = os.path.join(tmp, "flood.toml")
open(path, "w").write(config)


def get(path, timeout=30.0):
    c = http.client.HTTPConnection("127.0.0.1", args.port, timeout=timeout)
    try:
        c.request("GET", path)
        r = c.getresponse()
        body = r.read()
        return r.status, body
    finally:
        c.close()


def one(barrier):
    barrier.wait(10)
    t0 = time.monotonic()
    try:
        status, _ = get("/function/web/")
    except Exception as e:  # noqa: BLE001 - reported as a failure
        status = type(e).__name__
    return status, time.monotonic() - t0


failed_runs = 0
for run in range(1, args.runs + 1):
    gw = subprocess.Popen([args.bin, "--config", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            try:
                if get("/readyz", 1)[0] == 200:
                    break
            except OSError:
                time.sleep(0.01)
        barrier = threading.Barrier(args.requests)
        with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
            results = list(pool.map(lambda _: one(barrier), range(args.requests)))
        metrics = get("/metrics")[1].decode()
        m = re.search(r'sluicegate_function_cold_start_seconds_sum\{function_name="web"\} (\S+)', metrics)
        cold = float(m.group(1)) if m else float("nan")
        ok = sum(1 for s, _ in results if s == 200)
        slowest = max(t for _, t in results)
        others = sorted({str(s) for s, _ in results if s != 200})
        verdict = "ok" if ok == args.requests and slowest <= cold + 2 else "FAIL"
        failed_runs += verdict != "ok"
        print(f"run {run:2}: {ok}/{args.requests} served, slowest {slowest:.2f} s, "
              f"cold start {cold:.2f} s, slowest - cold start {slowest - cold:.2f} s {verdict}"
              + (f" other: {others}" if others else ""), flush=True)
    finally:
        gw.terminate()
        try:
            gw.wait(15)
        except subprocess.TimeoutExpired:
            gw.kill()
print(f"{args.runs - failed_runs}/{args.runs} runs ok")
sys.exit(1 if failed_runs else 0)
