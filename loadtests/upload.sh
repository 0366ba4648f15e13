#!/usr/bin/env bash
# 1 GiB upload through the gateway to the demo function (which counts the bytes), sampling the
# gateway's resident memory every 100 ms: memory must stay flat (bodies stream, never buffered).
#   SIZE_MB (default 1024)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release/sluicegate
[ -x "$bin" ] || cargo build --release --bin sluicegate
cfg=$(mktemp /tmp/sluicegate-upload-XXXXXX.toml)
cat > "$cfg" <<TOML
[gateway]
listen = "127.0.0.1:18095"
[functions.sink]
provider = "static"
upstreams = ["http://127.0.0.1:18094"]
max_body_bytes = 0
timeout = "300s"
TOML
"$bin" demo-function --listen 127.0.0.1:18094 2>/dev/null & backend=$!
"$bin" --config "$cfg" 2>/dev/null & gateway=$!
trap 'kill $gateway $backend 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf -o /dev/null http://127.0.0.1:18095/healthz && break; sleep 0.1; done
rss() { awk '/VmRSS/ {print $2}' /proc/$gateway/status; }
before=$(rss); peak=$before
( while kill -0 $gateway 2>/dev/null; do r=$(rss); echo "$r"; sleep 0.1; done ) > /tmp/sluicegate-upload-rss.txt & sampler=$!
start=$(date +%s.%N)
resp=$(head -c "$(( ${SIZE_MB:-1024} * 1024 * 1024 ))" /dev/zero | curl -s -X POST -T - -H 'Content-Type: application/octet-stream' http://127.0.0.1:18095/function/sink/)
end=$(date +%s.%N)
kill $sampler 2>/dev/null || true
peak=$(sort -n /tmp/sluicegate-upload-rss.txt | tail -1)
echo "$resp" | grep -o 'body_bytes=[0-9]*'
echo "gateway RSS before: ${before} kB, peak during upload: ${peak} kB, upload took $(echo "$end - $start" | bc) s"
