#!/usr/bin/env python3
"""Chaos soak: mixed sync, async and cold-start traffic for a long time (default 30 minutes)
while replicas are SIGKILLed at random, functions are scaled up and down by hand, and misbehaving
clients disconnect mid-body, send their heads too slowly or stop reading. Then the gateway is
SIGTERMed, started again and SIGKILLed, and no replica process may outlive it.

What it checks (exit status 1 if any fails):

* every request a well-behaved client sent ended: `200`, or a gateway status carrying
  `X-Sluicegate-Reason` (a `502` for a replica killed under it, a `503` when admission refuses);
  no request without an answer, no client time-out (60 s), no status without a reason;
* every async invocation answered `202` reached an end: its callback arrived, or its record says
  `succeeded`, `failed` or `dead_lettered` (nothing acknowledged is lost);
* after the load stops, nothing is left in flight or queued (the gateway's own gauges);
* RSS and open file descriptors flat after the warm-up: at most 10% growth over the rest of the
  run (median of the first and of the last minute of it, sampled every 10 s);
* no replica process (nor anything in its process group) left after the gateway is SIGTERMed,
  nor after it is SIGKILLed.

Loopback only; every loop bounded in time (`--duration`) and count (`--max-requests`).

    cargo build --release --bin sluicegate
    python3 loadtests/soak/soak.py --bin target/release/sluicegate --duration 1800 --warmup 600

A short run to try it: `--duration 120 --warmup 30`.
"""
import argparse
import collections
import http.client
import http.server
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

p = argparse.ArgumentParser()
p.add_argument("--bin", default="target/release/sluicegate")
p.add_argument("--duration", type=float, default=1800, help="seconds of load")
p.add_argument("--warmup", type=float, default=600, help="seconds before growth is measured")
p.add_argument("--max-requests", type=int, default=3_000_000, help="bound on sync requests")
p.add_argument("--sync-clients", type=int, default=6)
p.add_argument("--async-clients", type=int, default=2)
p.add_argument("--seed", type=int, default=1)
p.add_argument("--json", default=None, help="write the summary here too")
p.add_argument("--keep", action="store_true", help="keep the temporary directory")
args = p.parse_args()

rng = random.Random(args.seed)
BIN = os.path.abspath(args.bin)
tmp = tempfile.mkdtemp(prefix="sluicegate-soak-")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT = free_port()
STOP = threading.Event()
DEADLINE = time.monotonic() + args.duration
lock = threading.Lock()
outcomes = collections.Counter()  # "200", "502 replica_reset", "NO ANSWER: ...", ...
failures = []  # (what, detail), capped
sync_sent = 0


def record(key, failure=None):
    with lock:
        outcomes[key] += 1
        if failure and len(failures) < 50:
            failures.append(failure)


# --- callbacks --------------------------------------------------------------------------------

callbacks = {}  # call id -> function status


class Callback(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        with lock:
            callbacks[self.headers.get("X-Call-Id")] = self.headers.get("X-Function-Status")
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


cb_server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Callback)
cb_server.daemon_threads = True
CB_URL = f"http://127.0.0.1:{cb_server.server_address[1]}/done"
threading.Thread(target=cb_server.serve_forever, daemon=True).start()

# --- the gateway ------------------------------------------------------------------------------

CONFIG = f"""[gateway]
listen = "127.0.0.1:{PORT}"
header_read_timeout = "5s"
cold_start_timeout = "30s"
drain_timeout = "10s"
async_store = "{tmp}/soak.async.redb"
# Finished invocations' records kept 2 minutes (default 24 h): the store reaches its steady size
# within the warm-up, so growth after it is what the gateway keeps, not what it was told to keep.
async_record_retention = "2m"

[defaults]
max_ongoing_requests = 8
max_queued_requests = 200
timeout = "30s"

# Warm, scaled on concurrency between one and three replicas; replicas are killed under it.
[functions.web]
provider = "process"
command = ["sluicegate", "demo-function", "--startup-delay", "200ms"]
readiness_path = "/healthz"

[functions.web.autoscaler]
type = "concurrency"
target_ongoing_requests = 4
min_replicas = 1
max_replicas = 3
rate_seconds = 10
cooldown_period = 20

# At zero between bursts: every burst is a cold start.
[functions.cold]
provider = "process"
command = ["sluicegate", "demo-function", "--startup-delay", "500ms"]
readiness_path = "/healthz"

[functions.cold.autoscaler]
type = "rps"
min_replicas = 0
max_replicas = 2
threshold = 20
rate_seconds = 5
polling_interval = 1
cooldown_period = 5

# Async work, scaled on its backlog.
[functions.worker]
provider = "process"
command = ["sluicegate", "demo-function", "--startup-delay", "300ms"]
readiness_path = "/healthz"
max_ongoing_requests = 4
async_max_attempts = 4
async_initial_retry_wait = "500ms"
async_max_retry_wait = "4s"

[functions.worker.autoscaler]
type = "queue"
queue_length = 8
min_replicas = 0
max_replicas = 3
cooldown_period = 10
"""
config_path = os.path.join(tmp, "soak.toml")
with open(config_path, "w") as f:
    f.write(CONFIG)
log = open(os.path.join(tmp, "gateway.log"), "wb")


def start_gateway():
    gw = subprocess.Popen([BIN, "--config", config_path], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(1000):
        try:
            if request("GET", "/readyz", timeout=1)[0] == 200:
                return gw
        except OSError:
            time.sleep(0.02)
    raise SystemExit("the gateway did not become ready")


def request(method, path, body=None, headers=None, timeout=60.0, conn=None):
    """One request; returns (status, reason header, body, response headers)."""
    c = conn or http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        data = r.read()
        return r.status, r.getheader("X-Sluicegate-Reason"), data, r
    finally:
        if conn is None:
            c.close()


# --- processes --------------------------------------------------------------------------------

def processes():
    """(pid, ppid, pgid) of every live (not zombie) process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] != "Z":
            yield int(entry), int(fields[1]), int(fields[2])


def children(pid):
    """(pid, pgid) of the live direct children of `pid`."""
    return [(p, g) for p, ppid, g in processes() if ppid == pid]


def alive_in_groups(pgids):
    """Live (not zombie) processes whose process group is one of `pgids`."""
    return [p for p, _, g in processes() if g in pgids]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


# --- well-behaved clients ----------------------------------------------------------------------

def judge(status, reason, what):
    if status == 200:
        record("200")
    elif reason:
        record(f"{status} {reason}")
    else:
        record(f"{status} WITHOUT REASON", (what, status))


def sync_client(i):
    global sync_sent
    r = random.Random(args.seed * 100 + i)
    conn = None
    while not STOP.is_set() and time.monotonic() < DEADLINE:
        with lock:
            if sync_sent >= args.max_requests:
                return
            sync_sent += 1
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        roll = r.random()
        if roll < 0.6:
            method, path, body = "GET", f"/function/web/item/{r.randrange(1000)}?sleep={r.randrange(30)}ms", None
        elif roll < 0.9:
            method, path, body = "POST", "/function/web/upload", os.urandom(r.choice([16, 1024, 65536]))
        else:
            method, path, body = "GET", f"/function/web/stream?chunks=5&every={r.randrange(20)}ms", None
        try:
            status, reason, _, resp = request(method, path, body, conn=conn)
            judge(status, reason, f"{method} {path}")
            if resp.getheader("Connection", "").lower() == "close":
                conn.close()
                conn = None
        except http.client.IncompleteRead as e:
            # The head (200) went out, then the replica died under the body: the gateway aborts
            # the response rather than end it early (a truncated body is never passed as whole).
            record("200 then aborted mid-body (replica killed)")
            conn.close()
            conn = None
        except Exception as e:  # noqa: BLE001 - every one is a failure
            record(f"NO ANSWER: {type(e).__name__}", (f"{method} {path}", repr(e)))
            conn.close()
            conn = None


def cold_client():
    """Bursts at the function at zero, each after it has gone back to zero (or nearly)."""
    r = random.Random(args.seed * 7)
    while not STOP.is_set() and time.monotonic() < DEADLINE:
        n = r.randrange(5, 25)
        threads = []

        def one():
            try:
                status, reason, _, _ = request("GET", f"/function/cold/wake?sleep={r.randrange(50)}ms")
                judge(status, reason, "GET /function/cold")
            except Exception as e:  # noqa: BLE001
                record(f"NO ANSWER: {type(e).__name__}", ("cold", repr(e)))

        for _ in range(n):
            t = threading.Thread(target=one)
            t.start()
            threads.append(t)
        for t in threads:
            t.join(90)
        STOP.wait(r.uniform(8, 25))


accepted = []  # call ids answered 202


def async_client(i):
    r = random.Random(args.seed * 1000 + i)
    conn = None
    while not STOP.is_set() and time.monotonic() < DEADLINE:
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=60)
        # One in 100 answers 500 on every attempt, one in 5,000 exits its replica on every attempt:
        # both are retried, then dead-lettered (and their callbacks say so). (Exits more often
        # than that keep the replicas in their crash-loop backoff, up to 30 s, most of the time.)
        roll = r.random()
        query = "status=500" if roll < 0.01 else "exit=1" if roll < 0.0102 else f"sleep={r.randrange(100)}ms"
        try:
            status, reason, _, resp = request(
                "POST", f"/async-function/worker/job?{query}", os.urandom(r.choice([64, 4096])),
                headers={"X-Callback-Url": CB_URL}, conn=conn)
            if status == 202:
                record("202")
                with lock:
                    accepted.append(resp.getheader("X-Call-Id"))
            else:
                judge(status, reason, "POST /async-function/worker")
        except Exception as e:  # noqa: BLE001
            record(f"NO ANSWER: {type(e).__name__}", ("async", repr(e)))
            conn.close()
            conn = None
        STOP.wait(r.uniform(0.01, 0.1))


# --- misbehaving clients -----------------------------------------------------------------------

abuse = collections.Counter()


def raw(data_parts, pause=0.0, read=True, timeout=15):
    s = socket.create_connection(("127.0.0.1", PORT), timeout=timeout)
    try:
        for part in data_parts:
            try:
                s.sendall(part)
            except OSError:
                break  # the gateway gave up on us: read what it said
            if pause:
                time.sleep(pause)
        if read:
            try:
                return s.recv(256)
            except OSError:
                return b""
        return b""
    finally:
        s.close()


def misbehaving_client():
    r = random.Random(args.seed * 31)
    while not STOP.is_set() and time.monotonic() < DEADLINE:
        kind = r.choice(["mid-body", "slow-head", "slow-reader", "abandon-held"])
        try:
            if kind == "mid-body":
                # Declares 100 KB, sends 1 KB, goes away.
                raw([b"POST /function/web/upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
                     os.urandom(1024)], read=False)
                abuse["mid-body disconnect"] += 1
            elif kind == "slow-head":
                # A head dribbled out over ~8 s, past header_read_timeout (5 s): 408, or closed.
                head = b"GET /function/web/slow HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 14 + b"\r\n\r\n"
                got = raw([head[i:i + 4] for i in range(0, len(head), 4)], pause=0.4, timeout=20)
                abuse[f"slow head -> {got.split(b' ')[1].decode() if got.startswith(b'HTTP/') else 'closed'}"] += 1
            elif kind == "slow-reader":
                # Asks for 4 MiB and reads 8 KiB of it before going away.
                s = socket.create_connection(("127.0.0.1", PORT), timeout=15)
                s.sendall(b"GET /function/web/big?bytes=4194304 HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(r.uniform(0.5, 3))
                s.recv(8192)
                s.close()
                abuse["slow reader, gone mid-response"] += 1
            else:
                # Waits for the function at zero, then gives up before it is answered.
                s = socket.create_connection(("127.0.0.1", PORT), timeout=15)
                s.sendall(b"GET /function/cold/abandon?sleep=200ms HTTP/1.1\r\nHost: x\r\n\r\n")
                time.sleep(r.uniform(0.05, 0.6))
                s.close()
                abuse["gone while held or in flight"] += 1
        except OSError as e:
            abuse[f"{kind}: {type(e).__name__}"] += 1
        STOP.wait(r.uniform(0.5, 2))


# --- chaos ------------------------------------------------------------------------------------

chaos = collections.Counter()
replica_groups = set()


def chaos_monkey(gw_pid):
    r = random.Random(args.seed * 13)
    next_scale = time.monotonic() + 45
    while not STOP.is_set() and time.monotonic() < DEADLINE:
        STOP.wait(r.uniform(5, 20))
        kids = children(gw_pid)
        with lock:
            replica_groups.update(g for _, g in kids)
        if kids:
            pid, _ = r.choice(kids)
            try:
                os.kill(pid, signal.SIGKILL)
                chaos["replica SIGKILLed"] += 1
            except ProcessLookupError:
                pass
        if time.monotonic() >= next_scale:
            n = r.randrange(1, 4)
            try:
                status, _, _, _ = request("POST", "/system/scale-function/web",
                                          json.dumps({"replicas": n}).encode(),
                                          headers={"Content-Type": "application/json"}, timeout=10)
                chaos[f"manual scale of web -> {status}"] += 1
            except OSError as e:
                chaos[f"manual scale: {type(e).__name__}"] += 1
            next_scale = time.monotonic() + r.uniform(30, 90)


def janitor():
    """The operator: every minute, lists the dead letters, replays one in ten and discards the
    rest (dead letters are kept until someone decides; left alone they are data the store keeps,
    not growth of the gateway's own)."""
    r = random.Random(args.seed * 17)
    while not STOP.is_set() and time.monotonic() < DEADLINE:
        STOP.wait(60)
        try:
            status, _, body, _ = request("GET", "/system/async-dead-letters?function=worker&limit=1000",
                                         timeout=10)
            letters = json.loads(body).get("deadLetters", []) if status == 200 else []
            for letter in letters:
                path = f"/system/async-dead-letters/worker/{letter['id']}"
                if r.random() < 0.1:
                    status, *_ = request("POST", path + "/replay", b"", timeout=10)
                    chaos[f"dead letter replayed -> {status}"] += 1
                else:
                    status, *_ = request("DELETE", path, timeout=10)
                    chaos[f"dead letter discarded -> {status}"] += 1
        except (OSError, ValueError) as e:
            chaos[f"janitor: {type(e).__name__}"] += 1


samples = []  # (t, rss KiB, fds, replicas, store bytes)


def sampler(gw_pid, t0):
    while not STOP.is_set():
        try:
            kids = children(gw_pid)
            with lock:
                replica_groups.update(g for _, g in kids)
            try:
                store = os.path.getsize(os.path.join(tmp, "soak.async.redb"))
            except OSError:
                store = 0
            samples.append((time.monotonic() - t0, rss_kib(gw_pid), fds(gw_pid), len(kids), store))
        except OSError:
            pass
        STOP.wait(10)


def metric(text, name, function):
    m = re.search(rf'^{name}\{{[^}}]*function_name="{function}"[^}}]*\}} (\S+)', text, re.M)
    return float(m.group(1)) if m else 0.0


# --- the run ----------------------------------------------------------------------------------

def main():
    ok = True
    gw = start_gateway()
    t0 = time.monotonic()
    print(f"gateway pid {gw.pid} on 127.0.0.1:{PORT}, {args.duration:.0f} s of load, config {config_path}",
          flush=True)
    threads = [threading.Thread(target=sync_client, args=(i,)) for i in range(args.sync_clients)]
    threads += [threading.Thread(target=async_client, args=(i,)) for i in range(args.async_clients)]
    threads += [threading.Thread(target=cold_client), threading.Thread(target=misbehaving_client),
                threading.Thread(target=chaos_monkey, args=(gw.pid,)), threading.Thread(target=janitor)]
    mon = threading.Thread(target=sampler, args=(gw.pid, t0))
    mon.start()
    for t in threads:
        t.start()
    last = 0
    while time.monotonic() < DEADLINE and any(t.is_alive() for t in threads):
        time.sleep(1)
        if time.monotonic() - t0 - last >= 60:
            last = time.monotonic() - t0
            s = samples[-1] if samples else (0, 0, 0, 0, 0)
            print(f"t={last:5.0f}s rss={s[1] / 1024:.1f} MB fds={s[2]} replicas={s[3]} store={s[4] / 2**20:.1f} MB "
                  f"sync={sync_sent} async={len(accepted)} callbacks={len(callbacks)} "
                  f"chaos={dict(chaos)}", flush=True)
    STOP.set()
    for t in threads:
        t.join(120)
    mon.join(15)

    # Async: every 202 ends (callback, or a final record).
    drain_until = time.monotonic() + 600
    drain_t0 = time.monotonic()
    while time.monotonic() < drain_until:
        with lock:
            missing = [c for c in accepted if c not in callbacks]
        if not missing:
            break
        text = request("GET", "/metrics", timeout=10)[2].decode()
        m = re.search(r'^sluicegate_async_backlog\{function_name="worker"\} (\S+)', text, re.M)
        if m and float(m.group(1)) == 0:
            break
        time.sleep(2)
    drained_in = time.monotonic() - drain_t0
    with lock:
        missing = [c for c in accepted if c not in callbacks]
    lost, ended_without_callback = [], collections.Counter()
    for call in missing:
        try:
            status, _, body, _ = request("GET", f"/system/async/{call}", timeout=10)
            state = json.loads(body).get("state") if status == 200 else f"HTTP {status}"
        except (OSError, ValueError) as e:
            state = repr(e)
        if state in ("succeeded", "failed", "dead_lettered"):
            ended_without_callback[state] += 1
        else:
            lost.append((call, state))
    callback_statuses = collections.Counter(callbacks.get(c) for c in accepted if c in callbacks)

    # Nothing left in flight or queued.
    text = request("GET", "/metrics", timeout=10)[2].decode()
    leftovers = {f: {g: metric(text, g, f) for g in ("sluicegate_function_ongoing_requests",
                                                        "sluicegate_function_queued_requests")}
                 for f in ("web", "cold", "worker")}
    backlog = re.search(r'^sluicegate_async_backlog\{function_name="worker"\} (\S+)', text, re.M)

    # Growth after the warm-up: median of its first minute against median of the last minute.
    after = [s for s in samples if s[0] >= args.warmup]
    growth = {}
    if len(after) >= 12:
        for i, what in ((1, "rss"), (2, "fds"), (4, "store")):
            first = statistics.median(s[i] for s in after[:6])
            last_ = statistics.median(s[i] for s in after[-6:])
            growth[what] = (first, last_, (last_ - first) / first * 100 if first else 0.0,
                            max(s[i] for s in after))

    # SIGTERM: every replica gone.
    with lock:
        replica_groups.update(g for _, g in children(gw.pid))
    groups_term = set(replica_groups)
    gw.send_signal(signal.SIGTERM)
    try:
        gw.wait(60)
        term_exit = gw.returncode
    except subprocess.TimeoutExpired:
        term_exit = "did not exit in 60 s"
        gw.kill()
        gw.wait()
    time.sleep(2)
    left_term = alive_in_groups(groups_term)

    # SIGKILL: started again, replicas up, then killed outright.
    gw = start_gateway()
    for _ in range(20):
        request("GET", "/function/web/again")
        request("GET", "/function/cold/again")
    groups_kill = {g for _, g in children(gw.pid)}
    gw.kill()
    gw.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and alive_in_groups(groups_kill):
        time.sleep(0.2)
    left_kill = alive_in_groups(groups_kill)
    for pid in left_term + left_kill:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    # --- report ---
    bad = {k: v for k, v in outcomes.items() if k.startswith("NO ANSWER") or "WITHOUT REASON" in k}
    print("\n## Soak summary\n")
    print(f"* load: {args.duration:.0f} s, warm-up {args.warmup:.0f} s, seed {args.seed}; "
          f"{sync_sent} sync requests, {len(accepted)} async accepted")
    print("* outcomes: " + ", ".join(f"{k}: {v}" for k, v in sorted(outcomes.items(), key=lambda kv: -kv[1])))
    print("* chaos: " + ", ".join(f"{k}: {v}" for k, v in sorted(chaos.items())))
    print("* misbehaving clients: " + ", ".join(f"{k}: {v}" for k, v in sorted(abuse.items())))
    print(f"* async: backlog drained {drained_in:.0f} s after the load; {len(accepted)} accepted, {len(accepted) - len(missing)} callbacks "
          f"(function status {dict(callback_statuses)}), ended without a callback "
          f"{dict(ended_without_callback)}, **lost {len(lost)}**")
    print(f"* left in flight or queued after the load: {leftovers}; async backlog "
          f"{backlog.group(1) if backlog else 'n/a'}")
    for what, (first, last_, pct, peak) in growth.items():
        unit = "" if what == "fds" else " MB"
        scale = {"rss": 1024, "fds": 1, "store": 2**20}[what]
        print(f"* {what} after warm-up: {first / scale:.1f}{unit} -> {last_ / scale:.1f}{unit} "
              f"({pct:+.1f}%), peak {peak / scale:.1f}{unit}")
    print(f"* SIGTERM: exit {term_exit}, replica process groups {len(groups_term)}, left {left_term}")
    print(f"* SIGKILL: replica process groups {len(groups_kill)}, left {left_kill}")
    if failures:
        print("* first failures: " + "; ".join(map(str, failures[:10])))

    if bad:
        print(f"FAIL: requests without an answer or a reason: {bad}")
        ok = False
    if lost:
        print(f"FAIL: async invocations lost: {lost[:10]}")
        ok = False
    if any(v for f in leftovers.values() for v in f.values()):
        print("FAIL: requests left in flight or queued")
        ok = False
    if len(growth) < 3:
        print("FAIL: too few samples after the warm-up to judge growth")
        ok = False
    for what, (_, _, pct, _) in growth.items():
        if what != "store" and pct > 10:
            print(f"FAIL: {what} grew {pct:.1f}% after the warm-up")
            ok = False
    if left_term or left_kill or term_exit != 0:
        print("FAIL: replicas outlived the gateway, or it did not exit cleanly on SIGTERM")
        ok = False
    summary = {
        "duration_s": args.duration, "warmup_s": args.warmup, "sync_requests": sync_sent,
        "async_accepted": len(accepted), "outcomes": dict(outcomes), "chaos": dict(chaos),
        "abuse": dict(abuse), "async_callbacks": len(accepted) - len(missing),
        "async_ended_without_callback": dict(ended_without_callback), "async_lost": len(lost),
        "leftovers": leftovers, "growth": growth, "samples": samples,
        "sigterm_left": left_term, "sigkill_left": left_kill, "ok": ok,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    print("PASS" if ok else "FAIL", flush=True)
    if not args.keep:
        subprocess.run(["rm", "-rf", tmp])
    else:
        print(f"kept {tmp}")
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        STOP.set()
