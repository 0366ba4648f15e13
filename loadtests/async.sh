#!/usr/bin/env bash
# Async accept throughput: closed-loop POST /async-function/... with a 1 KiB body at several
# concurrencies, each request answered 202 only after the store committed it with an fsync (the
# store's writer commits whatever arrived meanwhile in one transaction, one fsync for the group).
# Two functions behind one gateway:
#   fast  a demo-function replica answering at once: each invocation is stored, dispatched and
#         deleted while the load runs (the dispatcher's writes share the same commits);
#   down  a closed port, retries an hour away: each invocation is stored and its failed first
#         attempt recorded; the backlog only grows.
# The store lives on disk under $STORE_DIR (default /var/tmp, not a tmpfs: fsync must be real).
#   SECONDS_EACH (default 10)  CONCURRENCY (default "1 8 32 128")  BODY_BYTES (default 1024)  OUT
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-loadtests/out}; mkdir -p "$out"
cargo build --release --quiet --bin sluicegate --example loadgen
bin=target/release/sluicegate; loadgen=target/release/examples/loadgen
dir=$(mktemp -d "${STORE_DIR:-/var/tmp}/sluicegate-async-XXXXXX")
cat > "$dir/gw.toml" <<TOML
[gateway]
listen = "127.0.0.1:18095"
async_store = "$dir/async.redb"
[defaults]
async_max_backlog = 10000000
[functions.fast]
provider = "static"
upstreams = ["http://127.0.0.1:18094"]
max_ongoing_requests = 64
[functions.down]
provider = "static"
upstreams = ["http://127.0.0.1:9"]
async_initial_retry_wait = "1h"
async_max_retry_wait = "1h"
TOML
"$bin" demo-function --listen 127.0.0.1:18094 2>/dev/null & backend=$!
"$bin" --config "$dir/gw.toml" 2>"$out/async-gateway.log" & gateway=$!
trap 'kill $gateway $backend 2>/dev/null || true; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:18095/healthz && break; sleep 0.1; done
s=${SECONDS_EACH:-10}
for fn in fast down; do
  for c in ${CONCURRENCY:-1 8 32 128}; do
    echo "== $fn: concurrency $c for ${s}s"
    "$loadgen" --url "http://127.0.0.1:18095/async-function/$fn/job" --method POST \
      --body-bytes "${BODY_BYTES:-1024}" --concurrency "$c" --duration "${s}s" --timeout 30s \
      --label "async-$fn-c$c" --json "$out/async-$fn-c$c.json"
    sleep 2
  done
done
echo "== the gateway's own counts"
curl -s http://127.0.0.1:18095/metrics | grep -E '^sluicegate_async_(invocations_total|backlog)' | grep -v ' 0$'
ls -l "$dir/async.redb"
