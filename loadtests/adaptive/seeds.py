#!/usr/bin/env python3
"""The issue-15 bar on several generated days: for each seed, generates a day with gen_trace.py,
runs `sluicegate simulate --compare` on it, and says for each adaptive configuration whether it
has no more cold-start requests than fixed-20m while spending no more replica-hours than
fixed-5m, and which presets it beats on one axis without losing on the other.

    python3 loadtests/adaptive/seeds.py --bin target/release/sluicegate --seeds 1,2,3,4,5 \\
        --compare adaptive,loadtests/adaptive/adaptive-10m.toml,loadtests/adaptive/adaptive-20m.toml

Loopback only; standard library; about 10 s per seed on this machine.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PRESETS = ["keda-http", "knative-kpa", "openfaas-ce-idler", "ray-serve", "fixed-1m", "fixed-5m", "fixed-10m", "fixed-20m"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/sluicegate")
    ap.add_argument("--seeds", default="1,2,3,4,5")
    ap.add_argument("--functions", type=int, default=100)
    ap.add_argument("--compare", default="adaptive", help="adaptive configurations (presets or files)")
    args = ap.parse_args()
    mine = [c.strip() for c in args.compare.split(",") if c.strip()]
    met = {c: 0 for c in mine}
    seeds = [int(s) for s in args.seeds.split(",")]
    for seed in seeds:
        with tempfile.NamedTemporaryFile("w", suffix=".csv") as day:
            subprocess.run([sys.executable, os.path.join(HERE, "gen_trace.py"), "--functions",
                            str(args.functions), "--seed", str(seed)], stdout=day, stderr=subprocess.DEVNULL, check=True)
            day.flush()
            out = subprocess.run([args.bin, "simulate", "--config", os.path.join(HERE, "function.toml"),
                                  "--minute-trace", day.name, "--compare", ",".join(PRESETS + mine), "--json"],
                                 capture_output=True, text=True, check=True).stdout
        rows = {r["name"]: r for r in json.loads(out)}
        cold = lambda n: rows[n]["cold_start_requests"]
        hours = lambda n: rows[n]["replica_seconds"] / 3600
        requests = rows["fixed-5m"]["requests"]
        print(f"seed {seed}: {requests} requests; bar: cold-start requests <= {cold('fixed-20m')} (fixed-20m), "
              f"replica-h <= {hours('fixed-5m'):.1f} (fixed-5m)")
        for p in PRESETS:
            print(f"  {p:<20} {cold(p):>6} {hours(p):>8.1f}  shed {rows[p]['shed']}")
        for c in mine:
            ok = cold(c) <= cold("fixed-20m") and hours(c) <= hours("fixed-5m")
            met[c] += ok
            beats = [p for p in PRESETS if cold(c) <= cold(p) and hours(c) <= hours(p)
                     and (cold(c) < cold(p) or hours(c) < hours(p))]
            trades = [p for p in PRESETS if p not in beats]
            print(f"  {c:<20} {cold(c):>6} {hours(c):>8.1f}  shed {rows[c]['shed']}  bar {'MET' if ok else 'not met'}; "
                  f"beats {len(beats)}/{len(PRESETS)}" + (f" (not: {', '.join(trades)})" if trades else ""))
    print("bar met on " + "; ".join(f"{c}: {met[c]}/{len(seeds)} seeds" for c in mine))


if __name__ == "__main__":
    main()
