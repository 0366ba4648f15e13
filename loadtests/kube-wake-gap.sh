#!/usr/bin/env bash
# Time from a ready endpoint appearing in the (fake, loopback) API server's EndpointSlice watch
# to the first held request reaching that pod, through the real kube client and the gateway.
#   loadtests/kube-wake-gap.sh [ROUNDS]     (default 50)
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(WAKE_GAP_ROUNDS=${1:-50} cargo test --release --quiet --test kubernetes -- --exact wake_gap --nocapture 2>&1 | grep "wake gap")
echo "$out"
echo "$out" | python3 -c '
import re, statistics, sys
xs = sorted(int(x) for x in re.findall(r"\d+", sys.stdin.read().split(":", 1)[1]))
p = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]
print(f"n={len(xs)} median={statistics.median(xs)/1000:.2f} ms p90={p(0.9)/1000:.2f} ms max={xs[-1]/1000:.2f} ms")
'
