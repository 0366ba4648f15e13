#!/usr/bin/env python3
"""What a held request and an idle keep-alive client connection cost the gateway, in RSS.

Two fresh gateways, one per case, each measured against its own RSS before the connections:
  * held: N connections each send one request to a function at zero whose replica takes 300 s to
    start, and wait (all N queued, as `sluicegate_function_queued_requests` shows);
  * idle: N connections each make one request to a static function (the demo function) and stay
    open, idle, keep-alive.
Loopback only; connections are opened in bounded batches and every wait is bounded.

    loadtests/held.py [--bin target/release/sluicegate] [--connections 10000]
"""
import argparse, asyncio, os, re, subprocess, sys, tempfile, time, urllib.request

p = argparse.ArgumentParser()
p.add_argument("--bin", default="target/release/sluicegate")
p.add_argument("--connections", type=int, default=10000)
p.add_argument("--port", type=int, default=18130)
args = p.parse_args()
n, port, backend = args.connections, args.port, args.port + 1
tmp = tempfile.mkdtemp(prefix="sluicegate-held-")
path = os.path.join(tmp, "held.toml")
open(path, "w").write(f"""[gateway]
listen = "127.0.0.1:{port}"
idle_timeout = "600s"

[functions.slow]
provider = "process"
command = ["sh", "-c", "sleep 300; exec python3 -m http.server $PORT --bind 127.0.0.1"]
readiness_path = "/"
cold_start_timeout = "600s"
max_queued_requests = {n + 100}
[functions.slow.autoscaler]
type = "rps"
min_replicas = 0
max_replicas = 1

[functions.echo]
provider = "static"
upstreams = ["http://127.0.0.1:{backend}"]
max_ongoing_requests = 1000
""")


def rss_kb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1])


def scrape():
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def gauge(text, name):
    m = re.search(name.replace("{", r"\{").replace("}", r"\}") + r" (\S+)", text)
    return float(m.group(1)) if m else 0.0


async def read_response(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    m = re.search(rb"(?i)content-length: *(\d+)", head)
    if m:
        await reader.readexactly(int(m.group(1)))
    return head


async def open_all(path, wait_response):
    conns = []

    async def one():
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await w.drain()
        if wait_response:
            head = await asyncio.wait_for(read_response(r), 30)
            assert head.startswith(b"HTTP/1.1 200"), head[:40]
        conns.append((r, w))

    for start in range(0, n, 500):
        await asyncio.gather(*(one() for _ in range(start, min(n, start + 500))))
    return conns


async def case(label, path, wait_response, ready):
    gw = subprocess.Popen([args.bin, "--config", path_], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(500):
            try:
                scrape()
                break
            except OSError:
                time.sleep(0.01)
        # Warm the path once, so the baseline includes what the first request allocates.
        if wait_response:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10).read()
        time.sleep(0.5)
        before = rss_kb(gw.pid)
        conns = await open_all(path, wait_response)
        deadline = time.monotonic() + 60
        while not ready(scrape()) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(1)
        after = rss_kb(gw.pid)
        print(f"{label}: {len(conns)} connections, RSS {before // 1024} MB -> {after // 1024} MB: "
              f"{(after - before) // 1024} MB, {(after - before) * 1024 // len(conns)} bytes each", flush=True)
        for _, w in conns:
            w.close()
    finally:
        gw.terminate()
        try:
            gw.wait(15)
        except subprocess.TimeoutExpired:
            gw.kill()


path_ = path
demo = subprocess.Popen([args.bin, "demo-function", "--listen", f"127.0.0.1:{backend}"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
try:
    time.sleep(0.5)
    asyncio.run(case("held requests", "/function/slow/", False,
                     lambda t: gauge(t, 'sluicegate_function_queued_requests{function_name="slow"}') >= n))
    asyncio.run(case("idle keep-alive connections", "/function/echo/", True, lambda t: True))
finally:
    demo.terminate()
    demo.wait(10)
