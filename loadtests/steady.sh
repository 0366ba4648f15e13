#!/usr/bin/env bash
# Steady state through a static function to a local backend, with wrk (or oha).
# The backend is the bundled demo function; the gateway runs from target/release.
#   DURATION (default 20s)  CONNS (default 64)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/sluicegate
[ -x "$bin" ] || cargo build --release
"$bin" demo-function --listen 127.0.0.1:18080 2>/dev/null & backend=$!
BACKEND=http://127.0.0.1:18080 PORT=18083 loadtests/bench-gateway.sh 2>/dev/null & gateway=$!
trap 'kill $gateway $backend 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:18083/function/echo/ && break; sleep 0.1; done
echo "== direct to the backend"
wrk -t1 -c"${CONNS:-64}" -d"${DURATION:-20s}" --latency http://127.0.0.1:18080/
echo "== through sluicegate"
wrk -t1 -c"${CONNS:-64}" -d"${DURATION:-20s}" --latency http://127.0.0.1:18083/function/echo/
