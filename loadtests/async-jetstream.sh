#!/usr/bin/env bash
# Async accept throughput, JetStream store against the embedded redb store: closed-loop
# POST /async-function/down/job with a 1 KiB body at several concurrencies, against the same
# gateway binary twice, once per store. `down` is a closed port with retries an hour away, so
# every accepted invocation stays stored (its first attempt fails and is scheduled in the store).
#   redb       async_store = a file under $STORE_DIR: 202 after the group commit's fsync;
#   jetstream  a local nats-server -js (NATS_SERVER_BIN, else on PATH; `scripts/test` installs
#              one) with `sync_interval: always` and its store under $STORE_DIR: 202 after
#              JetStream's publish ack, which then comes after the write's fsync.
# Gateway, nats-server and loadgen share the machine's cores.
#   SECONDS_EACH (default 10)  CONCURRENCY (default "1 8 32 128")  BODY_BYTES (default 1024)  OUT
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-loadtests/out}; mkdir -p "$out"
target=${CARGO_TARGET_DIR:-target}
cargo build --release --quiet --bin sluicegate --example loadgen
bin=$target/release/sluicegate; loadgen=$target/release/examples/loadgen
nats=${NATS_SERVER_BIN:-$(command -v nats-server || true)}
[ -x "$nats" ] || { echo "nats-server not found: run scripts/test once, or set NATS_SERVER_BIN" >&2; exit 1; }
dir=$(mktemp -d "${STORE_DIR:-/var/tmp}/sluicegate-async-js-XXXXXX")
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
cat > "$dir/nats.conf" <<CONF
listen: "127.0.0.1:18097"
http: "127.0.0.1:18098"
jetstream { store_dir: "$dir/nats", sync_interval: always }
CONF
"$nats" -js -c "$dir/nats.conf" 2>"$out/async-js-nats.log" & pids+=($!)
for _ in $(seq 100); do curl -sf -o /dev/null "http://127.0.0.1:18098/healthz?js-enabled-only=true" && break; sleep 0.1; done
s=${SECONDS_EACH:-10}
for store in redb jetstream; do
  case $store in
    redb) location="$dir/async.redb" ;;
    jetstream) location="nats://127.0.0.1:18097" ;;
  esac
  cat > "$dir/gw-$store.toml" <<TOML
[gateway]
listen = "127.0.0.1:18096"
async_store = "$location"
[defaults]
async_max_backlog = 10000000
[functions.down]
provider = "static"
upstreams = ["http://127.0.0.1:9"]
async_initial_retry_wait = "1h"
async_max_retry_wait = "1h"
TOML
  "$bin" --config "$dir/gw-$store.toml" 2>"$out/async-js-gateway-$store.log" & gateway=$!
  for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:18096/healthz && break; sleep 0.1; done
  for c in ${CONCURRENCY:-1 8 32 128}; do
    echo "== $store: concurrency $c for ${s}s"
    "$loadgen" --url "http://127.0.0.1:18096/async-function/down/job" --method POST \
      --body-bytes "${BODY_BYTES:-1024}" --concurrency "$c" --duration "${s}s" --timeout 30s \
      --label "async-$store-c$c" --json "$out/async-$store-c$c.json"
    sleep 1
  done
  echo "== $store: the gateway's own counts"
  curl -s http://127.0.0.1:18096/metrics | grep -E '^sluicegate_async_(invocations_total|backlog)' | grep -v ' 0$' || true
  kill $gateway; wait $gateway 2>/dev/null || true
done
