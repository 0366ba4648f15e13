#!/usr/bin/env python3
"""HTTP/2 abuse from clients, measured: the gateway's RSS and a well-behaved client's latency
before, during and after each attack, and how the gateway ended the abusive connections.

One gateway (the release binary) with two `static` functions in front of one local backend (the
bundled demo function): `echo`, which the well-behaved clients call, and `target`, which the
attackers aim at. Two well-behaved clients run for the whole run, each in its own process, one
request at a time at a fixed pace (default 100 requests/s each): one over HTTP/1.1 keep-alive, one
over HTTP/2 (prior knowledge, frames by hand). Phases, each measured on its own:

  baseline       nothing else (the "before" figures)
  rapid-reset    HEADERS then RST_STREAM(CANCEL) at once, 100 pairs to a write (CVE-2023-44487)
  cont-16k       HEADERS without END_HEADERS, then CONTINUATION frames of 16 KiB that never end it
  cont-empty     the same with empty CONTINUATION frames (no memory, frames only)
  ping-deaf      PING frames, 1000 to a write, from a client that never reads the PING ACKs
  settings-deaf  SETTINGS frames (INITIAL_WINDOW_SIZE), likewise never reading the ACKs
  ping-read      PING frames from a client that does read the ACKs (costs CPU only)
  streams        HEADERS for new streams (`?sleep=1s`, so they stay open) without waiting:
                 past max_concurrent_streams (1024), the gateway refuses them
  oversized      complete header blocks of ~80 KiB (over max_header_bytes, 64 KiB), one per
                 stream, 4 to a write, never waiting for the answers
  after          nothing again: does RSS come back, does latency

Each attack runs `--attack-seconds` with `--connections` attacking connections, each in its own
thread of one attacker process; when the gateway closes one (GOAWAY, EOF, reset), it reconnects
and starts again. A settle pause separates phases. Frames are written by hand with `struct`
(HPACK: literals without indexing, no Huffman coding; the static table for `:method GET` and
`:scheme http`), as tests/common/h2raw.rs does.

Loopback only; every wait is bounded; the whole run takes about 2.5 minutes with the defaults.
Prints a markdown table and writes the figures as JSON.

    loadtests/h2abuse.py [--bin target/release/sluicegate] [--json /tmp/h2abuse.json]
        [--attacks rapid-reset,cont-16k,...] [--connections 2] [--attack-seconds 12]
        [--baseline-seconds 10] [--rate 100]
"""
import argparse, errno, json, multiprocessing, os, re, socket, statistics, struct, subprocess
import sys, tempfile, threading, time, http.client, urllib.request

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--bin", default="target/release/sluicegate")
p.add_argument("--json", default="/tmp/h2abuse.json", help="where to write the figures")
p.add_argument("--attacks", default="rapid-reset,cont-16k,cont-empty,ping-deaf,settings-deaf,ping-read,streams,oversized")
p.add_argument("--connections", type=int, default=2, help="attacking connections at once (1-4)")
p.add_argument("--attack-seconds", type=float, default=12.0)
p.add_argument("--baseline-seconds", type=float, default=10.0)
p.add_argument("--settle-seconds", type=float, default=3.0)
p.add_argument("--rate", type=float, default=100.0, help="requests/s of each well-behaved client")
p.add_argument("--max-conns", type=int, default=5000,
               help="at most this many connections per attacking thread and phase")
p.add_argument("--reconnect-rate", type=float, default=200.0,
               help="at most this many new connections a second per attacking thread (each closed one "
                    "leaves a TIME_WAIT socket for 60 s: the machine's ephemeral ports are shared)")
args = p.parse_args()
if not 1 <= args.connections <= 8:
    sys.exit("--connections: 1 to 8")

# --- HTTP/2 frames and a little HPACK (mirrors tests/common/h2raw.rs) -------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
CANCEL = 0x8
ERRORS = ["NO_ERROR", "PROTOCOL_ERROR", "INTERNAL_ERROR", "FLOW_CONTROL_ERROR", "SETTINGS_TIMEOUT",
          "STREAM_CLOSED", "FRAME_SIZE_ERROR", "REFUSED_STREAM", "CANCEL", "COMPRESSION_ERROR",
          "CONNECT_ERROR", "ENHANCE_YOUR_CALM", "INADEQUATE_SECURITY", "HTTP_1_1_REQUIRED"]
MAX_WINDOW = 2**31 - 1


def error_name(code):
    return ERRORS[code] if code < len(ERRORS) else f"0x{code:x}"


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def hpack_int(first, prefix, n):
    top = (1 << prefix) - 1
    if n < top:
        return bytes([first | n])
    out = bytearray([first | top])
    n -= top
    while n >= 128:
        out.append(n % 128 + 128)
        n //= 128
    out.append(n)
    return bytes(out)


def hpack_string(s):
    """A string literal, not Huffman-coded."""
    return hpack_int(0x00, 7, len(s)) + s


def literal(name, value):
    """A literal header field, new name, not indexed."""
    return b"\x00" + hpack_string(name) + hpack_string(value)


def get_block(path):
    """`GET path`: `:method GET`, `:scheme http` from the static table; `:path` and `:authority`
    literal with an indexed name, not indexed."""
    return b"\x82\x86\x04" + hpack_string(path.encode()) + b"\x01" + hpack_string(b"localhost")


def settings(**values):
    ids = {"header_table_size": 1, "enable_push": 2, "max_concurrent_streams": 3,
           "initial_window_size": 4, "max_frame_size": 5, "max_header_list_size": 6}
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", ids[k], v) for k, v in values.items()))


def huffman_digits(data):
    """A Huffman-coded string of decimal digits (RFC 7541 Appendix B), None if it holds more."""
    codes = [("00000", "0"), ("00001", "1"), ("00010", "2"), ("011001", "3"), ("011010", "4"),
             ("011011", "5"), ("011100", "6"), ("011101", "7"), ("011110", "8"), ("011111", "9")]
    bits = "".join(f"{b:08b}" for b in data)
    out, at = "", 0
    while at < len(bits):
        for code, digit in codes:
            if bits.startswith(code, at):
                out += digit
                at += len(code)
                break
        else:
            rest = bits[at:]
            return out if len(rest) < 8 and set(rest) <= {"1"} else None
    return out


def status(payload, flags):
    """The `:status` at the start of a response header block, 0 when it cannot be read."""
    p = payload
    if flags & PADDED:
        if not p:
            return 0
        p = p[1:len(p) - p[0]]
    if flags & PRIORITY:
        p = p[5:]
    if not p:
        return 0
    first, static = p[0], [200, 204, 206, 304, 400, 404, 500]
    if first & 0x80:
        i = first & 0x7F
        return static[i - 8] if 8 <= i <= 14 else 0
    name = first & 0x3F if first & 0xC0 == 0x40 else first & 0x0F
    if not 8 <= name <= 14 or len(p) < 2:
        return 0
    n = p[1] & 0x7F
    value = p[2:2 + n]
    digits = huffman_digits(value) if p[1] & 0x80 else value.decode("latin-1")
    try:
        return int(digits)
    except (TypeError, ValueError):
        return 0


def frames_in(buf):
    """Complete frames at the start of `buf`: [(kind, flags, stream, payload)], bytes used."""
    out, at = [], 0
    while len(buf) - at >= 9:
        n = int.from_bytes(buf[at:at + 3], "big")
        if len(buf) - at < 9 + n:
            break
        kind, flags, stream = buf[at + 3], buf[at + 4], int.from_bytes(buf[at + 5:at + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, stream, bytes(buf[at + 9:at + 9 + n])))
        at += 9 + n
    return out, at


def hello(big_windows, ack=True):
    """Preface, our SETTINGS, an ACK of the gateway's (with `ack`: sent ahead, as h2raw.rs does;
    a second ACK would be a protocol error); with `big_windows`, flow-control windows so large
    the gateway never waits for a WINDOW_UPDATE."""
    out = PREFACE
    if big_windows:
        out += settings(initial_window_size=MAX_WINDOW)
        out += frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535))
    else:
        out += frame(SETTINGS, 0, 0)
    return out + frame(SETTINGS, ACK, 0) if ack else out


# --- gateway and backend ----------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def invocations(port, function):
    """Requests to `function` the gateway counted (all status codes)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None
    total = 0
    for m in re.finditer(r'^gateway_function_invocation_total\{([^}]*)\} (\S+)$', text, re.M):
        if f'function_name="{function}"' in m.group(1):
            total += float(m.group(2))
    return int(total)


# --- well-behaved clients (each in its own process, paced, one request at a time) --------------

def paced(rate, stop, one):
    """Calls `one()` every 1/rate s (never two at once, never catching up in a burst); returns
    [(start, seconds, error or None)]."""
    samples, interval, next_at = [], 1.0 / rate, time.monotonic()
    while not stop.is_set():
        now = time.monotonic()
        if now < next_at:
            time.sleep(next_at - now)
            continue
        next_at = max(next_at + interval, now)
        t0 = time.monotonic()
        err = one()
        samples.append((t0, time.monotonic() - t0, err))
    return samples


def good_h1(port, rate, stop, out):
    conn = [None]

    def one():
        try:
            if conn[0] is None:
                conn[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn[0].request("GET", "/function/echo/")
            r = conn[0].getresponse()
            r.read()
            if r.will_close:
                conn[0].close()
                conn[0] = None
            return None if r.status == 200 else f"status {r.status}"
        except (OSError, http.client.HTTPException) as e:
            if conn[0] is not None:
                conn[0].close()
            conn[0] = None
            return type(e).__name__

    out.send(paced(rate, stop, one))


def good_h2(port, rate, stop, out):
    state = {"sock": None, "buf": bytearray(), "stream": 1}
    block = get_block("/function/echo/")

    def reset():
        if state["sock"] is not None:
            state["sock"].close()
        state.update(sock=None, buf=bytearray(), stream=1)

    def one():
        try:
            if state["sock"] is None:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                s.sendall(hello(big_windows=True, ack=False))
                state["sock"] = s
            s, sid = state["sock"], state["stream"]
            state["stream"] += 2
            s.sendall(frame(HEADERS, END_HEADERS | END_STREAM, sid, block))
            deadline, code, goaway = time.monotonic() + 5, 0, None
            while True:
                if time.monotonic() > deadline:
                    reset()
                    return "timeout"
                chunk = s.recv(65536)
                if not chunk:
                    reset()
                    return "EOF"
                state["buf"] += chunk
                frames, used = frames_in(state["buf"])
                del state["buf"][:used]
                done = False
                for kind, flags, stream, payload in frames:
                    if kind == PING and not flags & ACK:
                        s.sendall(frame(PING, ACK, 0, payload))
                    elif kind == SETTINGS and not flags & ACK:
                        s.sendall(frame(SETTINGS, ACK, 0))
                    elif kind == GOAWAY:
                        goaway = error_name(struct.unpack(">I", payload[4:8])[0])
                    elif stream == sid and kind == RST_STREAM:
                        reset()
                        return "RST_STREAM " + error_name(struct.unpack(">I", payload)[0])
                    elif stream == sid and kind == HEADERS and not code:
                        code = status(payload, flags)
                    if stream == sid and kind in (HEADERS, DATA) and flags & END_STREAM:
                        done = True
                if done:
                    if goaway is not None:
                        reset()
                    return None if code == 200 else f"status {code}"
                if goaway is not None:
                    reset()
                    return "GOAWAY " + goaway
        except OSError as e:
            reset()
            return type(e).__name__

    out.send(paced(rate, stop, one))


# --- attackers --------------------------------------------------------------------------------

class Conn:
    """One attacking connection: what it sent, and what the gateway did with it."""

    def __init__(self, sock):
        self.sock, self.opened = sock, time.monotonic()
        self.frames = self.bytes = 0
        self.last_progress = self.opened
        self.goaway = self.goaway_at = None
        self.closed_at = self.close_kind = None
        self.resets, self.statuses, self.received = {}, {}, 0
        self.send_error = None

    def ended(self):
        return self.goaway is not None or self.closed_at is not None


def read_frames(c):
    buf = bytearray()
    while True:
        try:
            chunk = c.sock.recv(262144)
        except socket.timeout:
            continue
        except OSError as e:
            c.close_kind = errno.errorcode.get(e.errno, type(e).__name__)
            break
        if not chunk:
            c.close_kind = "EOF"
            break
        c.received += len(chunk)
        buf += chunk
        frames, used = frames_in(buf)
        del buf[:used]
        for kind, flags, stream, payload in frames:
            if kind == GOAWAY and len(payload) >= 8:
                c.goaway = struct.unpack(">I", payload[4:8])[0]
                c.goaway_at = time.monotonic()
            elif kind == RST_STREAM and len(payload) == 4:
                name = error_name(struct.unpack(">I", payload)[0])
                c.resets[name] = c.resets.get(name, 0) + 1
            elif kind == HEADERS:
                code = status(payload, flags) or "other (HPACK dynamic table)"
                c.statuses[code] = c.statuses.get(code, 0) + 1
    c.closed_at = time.monotonic()


def send(c, batch, nframes, deadline):
    """Writes `batch` (`nframes` frames); False once the connection ended or the phase did.
    A write the gateway does not take within 0.25 s is retried until the deadline, so a
    connection whose reads the gateway stopped shows as stalled (no progress), not as closed."""
    view, sent = memoryview(batch), 0
    try:
        while sent < len(batch):
            if time.monotonic() >= deadline or c.ended():
                return False
            try:
                n = c.sock.send(view[sent:])
            except socket.timeout:
                continue
            sent += n
            c.bytes += n
            c.last_progress = time.monotonic()
        return True
    except OSError as e:
        c.send_error = errno.errorcode.get(e.errno, type(e).__name__)
        return False
    finally:
        c.frames += nframes * sent // len(batch)


TARGET = "/function/target/"


def rapid_reset(c, deadline):
    block, rst = get_block(TARGET), struct.pack(">I", CANCEL)
    sid = 1
    while sid < 2**31 - 400:
        batch = b"".join(frame(HEADERS, END_HEADERS | END_STREAM, s, block) + frame(RST_STREAM, 0, s, rst)
                         for s in range(sid, sid + 200, 2))
        sid += 200
        if not send(c, batch, 200, deadline):
            return


def continuation(size):
    fields = b""
    while len(fields) < size - 64:
        fields += literal(b"x-flood", b"0123456789abcdef0123456789abcdef")
    count = max(1, 65536 // max(len(fields) + 9, 1)) if size else 1000

    def run(c, deadline):
        if not send(c, frame(HEADERS, 0, 1, get_block(TARGET)), 1, deadline):
            return
        batch = frame(CONTINUATION, 0, 1, fields) * count
        while send(c, batch, count, deadline):
            pass
    return run


def repeated(one, count):
    batch = one * count

    def run(c, deadline):
        while send(c, batch, count, deadline):
            pass
    return run


def streams(c, deadline):
    block = get_block(TARGET + "?sleep=1s")
    sid = 1
    while sid < 2**31 - 600:
        batch = b"".join(frame(HEADERS, END_HEADERS | END_STREAM, s, block) for s in range(sid, sid + 512, 2))
        sid += 512
        if not send(c, batch, 256, deadline):
            return


def oversized(c, deadline):
    block = get_block(TARGET)
    while len(block) < 80 * 1024:
        block += literal(b"x-big", b"a" * 1000)
    pieces = [block[i:i + 16384] for i in range(0, len(block), 16384)]
    sid = 1
    while sid < 2**31 - 10:
        batch, nframes = [], 0
        for _ in range(4):
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                batch.append(frame(HEADERS if i == 0 else CONTINUATION,
                                   END_HEADERS | END_STREAM if last else 0, sid, piece))
                nframes += 1
            sid += 2
        if not send(c, b"".join(batch), nframes, deadline):
            return


# name: (what it does, reads what the gateway sends?, flow-control windows, run)
ATTACKS = {
    "rapid-reset": ("HEADERS + RST_STREAM(CANCEL), 100 pairs a write", True, False, rapid_reset),
    "cont-16k": ("HEADERS, then 16 KiB CONTINUATION frames, never END_HEADERS", True, False, continuation(16384)),
    "cont-empty": ("HEADERS, then empty CONTINUATION frames, never END_HEADERS", True, False, continuation(0)),
    "ping-deaf": ("PING x1000 a write, never reading", False, False, repeated(frame(PING, 0, 0, b"abcdefgh"), 1000)),
    "settings-deaf": ("SETTINGS(INITIAL_WINDOW_SIZE) x1000 a write, never reading", False, False,
                      repeated(settings(initial_window_size=65535), 1000)),
    "ping-read": ("PING x100 a write, reading the ACKs", True, False, repeated(frame(PING, 0, 0, b"abcdefgh"), 100)),
    "streams": ("HEADERS for new streams (replica holds each 1 s), 256 a write, never waiting", True, True, streams),
    "oversized": ("~80 KiB header blocks (limit 64 KiB), 4 a write", True, True, oversized),
}


def attack_thread(name, port, deadline, records, max_conns, reconnect_rate):
    _, reads, windows, run = ATTACKS[name]
    opened, next_connect = 0, time.monotonic()
    while time.monotonic() < deadline - 0.05 and opened < max_conns:
        now = time.monotonic()
        if now < next_connect:
            time.sleep(min(next_connect - now, max(0.0, deadline - now)))
            continue
        next_connect = max(next_connect + 1 / reconnect_rate, now)
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
        except OSError as e:
            records.append({"connect_error": type(e).__name__})
            time.sleep(0.05)
            continue
        opened += 1
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(0.25)
        c = Conn(sock)
        reader = None
        if reads:
            reader = threading.Thread(target=read_frames, args=(c,), daemon=True)
            reader.start()
        if send(c, hello(windows), 0, deadline):
            run(c, deadline)
        ended_early = time.monotonic() < deadline
        # Whatever the gateway still sends (its GOAWAY, the close), for up to 1 s.
        if reader is not None and ended_early:
            reader.join(1.0)
        if c.goaway is not None:
            outcome, at = "GOAWAY " + error_name(c.goaway), c.goaway_at
        elif c.closed_at is not None:
            outcome, at = "closed: " + c.close_kind, c.closed_at
        elif c.send_error is not None:
            outcome, at = "closed: " + c.send_error, time.monotonic()
        elif time.monotonic() - c.last_progress > 1.0:
            outcome, at = "stalled (gateway stopped reading), open at the end", None
        else:
            outcome, at = "open at the end", None
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        if reader is not None:
            reader.join(1.0)
        records.append({
            "outcome": outcome,
            "lifetime_s": None if at is None else round(at - c.opened, 4),
            "stalled_after_s": round(c.last_progress - c.opened, 3) if outcome.startswith("stalled") else None,
            "frames": c.frames, "bytes": c.bytes, "received": c.received,
            "resets": c.resets, "statuses": {str(k): v for k, v in c.statuses.items()},
        })


def attacker(name, port, connections, deadline, max_conns, reconnect_rate, out):
    records = [[] for _ in range(connections)]
    threads = [threading.Thread(target=attack_thread,
                                args=(name, port, deadline, records[i], max_conns, reconnect_rate))
               for i in range(connections)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(deadline - time.monotonic() + 5)
    cpu = time.process_time() / max(time.monotonic() - t0, 0.001)
    out.send(([r for rs in records for r in rs], round(100 * cpu)))


# --- the run ----------------------------------------------------------------------------------

def pct(xs, q):
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def latency(samples, t0, t1):
    inside = [s for s in samples if t0 <= s[0] < t1]
    ok = [s[1] * 1000 for s in inside if s[2] is None]
    failures = {}
    for s in inside:
        if s[2] is not None:
            failures[s[2]] = failures.get(s[2], 0) + 1
    return {"requests": len(inside), "p50_ms": pct(ok, 50), "p99_ms": pct(ok, 99),
            "max_ms": max(ok) if ok else None, "failures": failures}


def summarise(records, seconds):
    conns = [r for r in records if "outcome" in r]
    outcomes, resets, statuses = {}, {}, {}
    for r in conns:
        outcomes[r["outcome"]] = outcomes.get(r["outcome"], 0) + 1
        for k, v in r["resets"].items():
            resets[k] = resets.get(k, 0) + v
        for k, v in r["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    closed = [r for r in conns if r["lifetime_s"] is not None]
    stalled = [r for r in conns if r["stalled_after_s"] is not None]
    return {
        "connections": len(conns),
        "connect_errors": len(records) - len(conns),
        "outcomes": outcomes,
        "closed_by_gateway": len(closed),
        "closed_per_s": round(len(closed) / seconds, 1),
        "closed_lifetime_ms_median": round(statistics.median(r["lifetime_s"] for r in closed) * 1000, 1) if closed else None,
        "closed_lifetime_ms_max": round(max(r["lifetime_s"] for r in closed) * 1000, 1) if closed else None,
        "frames_per_closed_conn_median": int(statistics.median(r["frames"] for r in closed)) if closed else None,
        "stalled_after_s_median": round(statistics.median(r["stalled_after_s"] for r in stalled), 2) if stalled else None,
        "kib_per_stalled_conn_median": int(statistics.median(r["bytes"] for r in stalled) // 1024) if stalled else None,
        "frames": sum(r["frames"] for r in conns),
        "bytes": sum(r["bytes"] for r in conns),
        "resets_received": resets,
        "statuses_received": statuses,
    }


def wait_for(url, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return True
        except OSError:
            time.sleep(0.05)
    return False


def main():
    ctx = multiprocessing.get_context("fork")
    port, backend_port = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="sluicegate-h2abuse-")
    config = os.path.join(tmp, "h2abuse.toml")
    with open(config, "w") as f:
        f.write(f"""[gateway]
listen = "127.0.0.1:{port}"

[functions.echo]
provider = "static"
upstreams = ["http://127.0.0.1:{backend_port}"]
max_ongoing_requests = 1000

# What the attackers aim at: admission control out of the way, so what is measured is HTTP/2.
[functions.target]
provider = "static"
upstreams = ["http://127.0.0.1:{backend_port}"]
max_ongoing_requests = 100000
max_queued_requests = -1
""")
    backend = subprocess.Popen([args.bin, "demo-function", "--listen", f"127.0.0.1:{backend_port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gw = None
    try:
        if not wait_for(f"http://127.0.0.1:{backend_port}/healthz", 10):
            sys.exit("the demo function did not come up")
        gw = subprocess.Popen([args.bin, "--config", config], stdout=subprocess.DEVNULL,
                              stderr=open(os.path.join(tmp, "gateway.log"), "w"))
        if not wait_for(f"http://127.0.0.1:{port}/function/echo/", 10):
            sys.exit(f"the gateway did not come up (log: {tmp}/gateway.log)")
        run(ctx, port, gw)
    finally:
        for proc in (gw, backend):
            if proc is not None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def run(ctx, port, gw):
    stop = ctx.Event()
    clients = {}
    for label, target in (("h1", good_h1), ("h2", good_h2)):
        recv, send_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(port, args.rate, stop, send_end), daemon=True)
        proc.start()
        clients[label] = (proc, recv)
    time.sleep(2)  # warm-up, not measured
    attacks = [a for a in args.attacks.split(",") if a]
    for a in attacks:
        if a not in ATTACKS:
            sys.exit(f"unknown attack {a!r}: one of {', '.join(ATTACKS)}")
    phases = [("baseline", None)] + [(a, a) for a in attacks] + [("after", None)]
    results = []
    for i, (label, attack) in enumerate(phases):
        if i:
            time.sleep(args.settle_seconds)
        seconds = args.attack_seconds if attack else args.baseline_seconds
        before_invocations = invocations(port, "target")
        t0 = time.monotonic()
        deadline = t0 + seconds
        cpu0, rss0 = cpu_seconds(gw.pid), proc_status(gw.pid, "VmRSS")
        peak, timeline, next_sample = rss0, [], t0
        attacker_proc = recv = None
        if attack:
            recv, send_end = ctx.Pipe(duplex=False)
            attacker_proc = ctx.Process(target=attacker, args=(attack, port, args.connections, deadline,
                                                               args.max_conns, args.reconnect_rate, send_end),
                                        daemon=True)
            attacker_proc.start()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            rss = proc_status(gw.pid, "VmRSS")
            peak = max(peak, rss)
            if time.monotonic() >= next_sample:  # every second: RSS, open descriptors
                next_sample += 1
                timeline.append((round(time.monotonic() - t0, 1), rss, len(os.listdir(f"/proc/{gw.pid}/fd"))))
        t1 = time.monotonic()
        cpu1, rss1 = cpu_seconds(gw.pid), proc_status(gw.pid, "VmRSS")
        records, attacker_cpu = [], None
        if attacker_proc is not None:
            if recv.poll(15):
                records, attacker_cpu = recv.recv()
            attacker_proc.join(5)
            if attacker_proc.is_alive():
                attacker_proc.terminate()
        peak = max(peak, rss1, proc_status(gw.pid, "VmRSS"))
        after_invocations = invocations(port, "target")
        result = {
            "phase": label,
            "attack": ATTACKS[attack][0] if attack else None,
            "seconds": round(t1 - t0, 2),
            "window": (t0, t1),
            "rss_kib_start": rss0, "rss_kib_peak": peak, "rss_kib_end": rss1,
            "gateway_cpu_percent": round(100 * (cpu1 - cpu0) / (t1 - t0)),
            "gateway_threads": proc_status(gw.pid, "Threads"),
            "timeline_s_rsskib_fds": timeline,
            "target_requests": None if None in (before_invocations, after_invocations)
            else after_invocations - before_invocations,
        }
        if attack:
            result["attacker"] = summarise(records, t1 - t0)
            result["attacker"]["cpu_percent"] = attacker_cpu
        results.append(result)
        a = result.get("attacker", {})
        print(f"{label}: RSS peak {peak // 1024} MiB, gateway CPU {result['gateway_cpu_percent']}%, "
              f"attacker CPU {a.get('cpu_percent')}%, "
              f"{a.get('connections', 0)} attacking connections, {a.get('outcomes', {})}", flush=True)
    stop.set()
    samples = {}
    for label, (proc, recv) in clients.items():
        samples[label] = recv.recv() if recv.poll(15) else []
        proc.join(5)
    for r in results:
        t0, t1 = r.pop("window")
        for label in clients:
            r["good_" + label] = latency(samples[label], t0, t1)
    report(results)


def ms(x):
    return "–" if x is None else f"{x:.1f}"


def mib(kib):
    return f"{kib / 1024:.1f}"


def size(n):
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.0f} KiB"


def how_closed(a):
    if not a:
        return "–"
    parts = []
    for outcome, n in sorted(a["outcomes"].items(), key=lambda kv: -kv[1]):
        parts.append(f"{n} {outcome}")
    text = "; ".join(parts)
    if a["closed_by_gateway"]:
        text += (f"; {a['closed_per_s']}/s, each after {ms(a['closed_lifetime_ms_median'])} ms and "
                 f"{a['frames_per_closed_conn_median']:,} frames written (medians)")
    if a["stalled_after_s_median"] is not None:
        text += (f"; the gateway stopped reading after {a['stalled_after_s_median']} s and "
                 f"{a['kib_per_stalled_conn_median']:,} KiB written (medians)")
    return text


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip() or None
    except OSError:
        return None


def report(results):
    out = sys.stdout
    out.write("\n| phase | attacker wrote | connections (how they ended) | gateway RSS start → peak → end (MiB) "
              "| CPU: gateway / attacker | h1 client p50 / p99 (ms) | h2 client p50 / p99 (ms) | client failures |\n")
    out.write("|---|---|---|---|---|---|---|---|\n")
    for r in results:
        a = r.get("attacker")
        sent = f"{a['frames']:,} frames, {size(a['bytes'])}" if a else "–"
        cpu = f"{a['cpu_percent']}%" if a else "–"
        h1, h2 = r["good_h1"], r["good_h2"]
        fails = {}
        for side in (h1, h2):
            for k, v in side["failures"].items():
                fails[k] = fails.get(k, 0) + v
        failures = ", ".join(f"{v} {k}" for k, v in fails.items()) or f"0 of {h1['requests'] + h2['requests']}"
        out.write(f"| {r['phase']} | {sent} | {how_closed(a)} | {mib(r['rss_kib_start'])} → "
                  f"{mib(r['rss_kib_peak'])} → {mib(r['rss_kib_end'])} | {r['gateway_cpu_percent']}% / {cpu} | "
                  f"{ms(h1['p50_ms'])} / {ms(h1['p99_ms'])} | {ms(h2['p50_ms'])} / {ms(h2['p99_ms'])} | "
                  f"{failures} |\n")
    out.write("\nWhat the attackers received and reached:\n\n")
    for r in results:
        a = r.get("attacker")
        if a:
            out.write(f"- {r['phase']}: {r['attack']}; requests to `target` the gateway counted (gateway_function_invocation_total): {r['target_requests']}; "
                      f"RST_STREAM received: {a['resets_received'] or 'none'}; response statuses: "
                      f"{a['statuses_received'] or 'none'}\n")
    with open(args.json, "w") as f:
        json.dump({"date": time.strftime("%Y-%m-%d"), "commit": commit(), "args": vars(args),
                   "loadavg_at_end": os.getloadavg(), "cpus": os.cpu_count(),
                   "phases": results}, f, indent=1)
    out.write(f"\nJSON: {args.json}\n")


if __name__ == "__main__":
    main()
