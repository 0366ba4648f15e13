#!/usr/bin/env python3
"""Replica churn: what the gateway keeps per replica that ever started. One `process` function
(`sluicegate demo-function`) is scaled 3 -> 1 by hand, over and over, with requests to the
replicas in between; the gateway's RSS is printed every 100 rounds (two replicas started and
stopped per round). Flat means nothing is kept per replica. Loopback only, bounded by --rounds.

    loadtests/churn.py [--bin target/release/sluicegate] [--rounds 2000]
"""
import argparse, http.client, json, os, socket, subprocess, tempfile, time

p = argparse.ArgumentParser()
p.add_argument("--bin", default="target/release/sluicegate")
p.add_argument("--rounds", type=int, default=2000)
args = p.parse_args()

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
tmp = tempfile.mkdtemp(prefix="sluicegate-churn-")
config = os.path.join(tmp, "churn.toml")
with open(config, "w") as f:
    f.write(f"""[gateway]
listen = "127.0.0.1:{port}"

[functions.web]
provider = "process"
command = ["sluicegate", "demo-function"]
readiness_path = "/healthz"

[functions.web.autoscaler]
type = "concurrency"
target_ongoing_requests = 4
min_replicas = 1
max_replicas = 3
""")
gw = subprocess.Popen([args.bin, "--config", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def req(method, path, body=None):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        r.read()
        return r.status
    except OSError as e:
        return repr(e)
    finally:
        c.close()


def rss_kib():
    with open(f"/proc/{gw.pid}/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))


def replicas():
    n = 0
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                st = open(f"/proc/{e}/stat").read()
            except OSError:
                continue
            fields = st[st.rindex(")") + 2:].split()
            n += fields[0] != "Z" and int(fields[1]) == gw.pid
    return n


try:
    for _ in range(500):
        if req("GET", "/readyz") == 200:
            break
        time.sleep(0.02)
    for _ in range(50):
        req("GET", "/function/web/x")
    start = rss_kib()
    print(f"start: RSS {start / 1024:.1f} MB", flush=True)
    t0 = time.time()
    for i in range(args.rounds):
        for n in (3, 1):
            req("POST", "/system/scale-function/web", json.dumps({"replicas": n}).encode())
            deadline = time.time() + 5
            while replicas() != n and time.time() < deadline:
                time.sleep(0.02)
            for _ in range(6):
                req("GET", "/function/web/x")
        if (i + 1) % 100 == 0:
            now = rss_kib()
            print(f"{i + 1} rounds ({2 * (i + 1)} replicas started and stopped), {time.time() - t0:.0f} s: "
                  f"RSS {now / 1024:.1f} MB ({(now - start) * 1024 / (2 * (i + 1)):.0f} bytes per replica)",
                  flush=True)
finally:
    gw.terminate()
    gw.wait(30)
    subprocess.run(["rm", "-rf", tmp])
