#!/usr/bin/env bash
# Overload: one slow replica (100 ms per request, max_ongoing_requests = 4, so 40 req/s of
# capacity, max_queued_requests = 8) offered 10x its capacity (400 req/s) for 30 s, beside an
# unloaded run at half capacity. Records that every request ended 200 or 503 (none hung, no
# errors), the 503s' latency, and the admitted requests' latency in both runs.
#   SECONDS_EACH (default 30)  OUT (default loadtests/out)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-loadtests/out}; mkdir -p "$out"
cargo build --release --quiet --bin sluicegate --example loadgen
bin=target/release/sluicegate; loadgen=target/release/examples/loadgen
cfg=$(mktemp /tmp/sluicegate-overload-XXXXXX.toml)
cat > "$cfg" <<TOML
[gateway]
listen = "127.0.0.1:18093"
[functions.slow]
provider = "static"
upstreams = ["http://127.0.0.1:18090"]
max_ongoing_requests = 4
max_queued_requests = 8
queue_timeout = "5s"
TOML
"$bin" demo-function --listen 127.0.0.1:18090 2>/dev/null & backend=$!
"$bin" --config "$cfg" 2>"$out/overload-gateway.log" & gateway=$!
trap 'kill $gateway $backend 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:18093/function/slow/ && break; sleep 0.1; done
url='http://127.0.0.1:18093/function/slow/?sleep=100ms'
s=${SECONDS_EACH:-30}
echo "== unloaded: 20 req/s (half of capacity) for ${s}s"
"$loadgen" --url "$url" --rate 20 --duration "${s}s" --timeout 60s --label unloaded --json "$out/overload-unloaded.json"
echo "== overload: 400 req/s (10x capacity) for ${s}s"
"$loadgen" --url "$url" --rate 400 --duration "${s}s" --timeout 60s --label overload --json "$out/overload-10x.json"
echo "== gateway's own count of rejections"
curl -s http://127.0.0.1:18093/metrics | grep -E '^sluicegate_function_rejected_total\{function_name="slow",reason="queue_full"\}|^gateway_function_invocation_total'
