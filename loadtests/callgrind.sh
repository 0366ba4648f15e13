#!/usr/bin/env bash
# User-space instructions per proxied request, counted by valgrind's callgrind: deterministic for a
# given binary, whatever else the machine is doing (unlike CPU time). Use it to compare two builds.
#   loadtests/callgrind.sh [BIN] [REQUESTS]    (default target/release/sluicegate, 2000)
# Needs: valgrind, the demo function as backend (from BIN), loadgen (cargo build --release --example loadgen).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/sluicegate}; n=${2:-2000}
loadgen=target/release/examples/loadgen
[ -x "$loadgen" ] || cargo build --release --quiet --example loadgen
out=$(mktemp -d /tmp/sluicegate-callgrind-XXXXXX)
cat > "$out/gw.toml" <<TOML
[gateway]
listen = "127.0.0.1:18099"
worker_threads = 1
[functions.echo]
provider = "static"
upstreams = ["http://127.0.0.1:18098"]
max_ongoing_requests = 1000
TOML
"$bin" demo-function --listen 127.0.0.1:18098 2>/dev/null & backend=$!
valgrind --tool=callgrind --callgrind-out-file="$out/cg.%p" "$bin" --config "$out/gw.toml" 2>"$out/valgrind.log" & gw=$!
trap 'kill $gw $backend 2>/dev/null || true' EXIT
for _ in $(seq 300); do curl -sf -o /dev/null http://127.0.0.1:18099/function/echo/ && break; sleep 0.2; done
"$loadgen" --url http://127.0.0.1:18099/function/echo/ --concurrency 8 --max-requests 200 --duration 120s >/dev/null
callgrind_control -z $gw >/dev/null
"$loadgen" --url http://127.0.0.1:18099/function/echo/ --concurrency 8 --max-requests "$n" --duration 300s > "$out/load.txt"; head -1 "$out/load.txt"
callgrind_control -d $gw >/dev/null
sleep 1
total=$(grep -h "^summary:" $out/cg.$gw* | awk '{s+=$2} END {print s}')
echo "$bin: $total instructions for $n requests = $((total / n)) per request"
