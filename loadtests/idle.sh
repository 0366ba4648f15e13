#!/usr/bin/env bash
# What configured idle functions cost: N `process` functions with an `rps` autoscaler and
# min_replicas = 0, never invoked. Reports start-up time, RSS (against a one-function gateway),
# idle CPU over a fixed span, one /metrics scrape (time and bytes) and `check-config`'s time.
#   loadtests/idle.sh [BIN] [FUNCTIONS] [IDLE_SECONDS]   (default target/release/sluicegate, 10000, 60)
# Loopback only; every wait is bounded.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/sluicegate}; n=${2:-10000}; idle=${3:-60}
out=$(mktemp -d /tmp/sluicegate-idle-XXXXXX)
port=18110

# The config: N functions that would start `python3 -m http.server` if ever invoked (they are not).
gen() {
  local count=$1 file=$2
  {
    printf '[gateway]\nlisten = "127.0.0.1:%s"\n\n' "$port"
    printf '[defaults]\nprovider = "process"\ncommand = ["python3", "-m", "http.server"]\nreadiness_path = "/"\n'
    printf 'max_ongoing_requests = 100\nmax_queued_requests = 1000\n\n'
    printf '[defaults.autoscaler]\ntype = "rps"\nmin_replicas = 0\nmax_replicas = 2\nthreshold = 100\nrate_seconds = 30\npolling_interval = 1\ncooldown_period = 60\n\n'
    for i in $(seq 1 "$count"); do printf '[functions.idle-%05d]\n' "$i"; done
  } > "$file"
}
gen "$n" "$out/many.toml"; gen 1 "$out/one.toml"

ms() { date +%s%3N; }
rss_kb() { awk '/^VmRSS/ {print $2}' /proc/$1/status; }
ticks() { awk '{print $14 + $15}' /proc/$1/stat; }
hz=$(getconf CLK_TCK)

t0=$(ms); "$bin" check-config "$out/many.toml" >/dev/null; t1=$(ms)
echo "check-config, $n functions: $((t1 - t0)) ms"

run() {
  local file=$1 label=$2
  local start; start=$(ms)
  "$bin" --config "$file" 2>"$out/$label.log" & local gw=$!
  for _ in $(seq 1000); do curl -sf -o /dev/null "http://127.0.0.1:$port/readyz" && break; sleep 0.01; done
  local up; up=$(ms)
  echo "$label: ready in $((up - start)) ms, RSS $(( $(rss_kb $gw) / 1024 )) MB"
  if [ "$label" = many ]; then
    sleep 2
    local c0 c1; c0=$(ticks $gw); sleep "$idle"; c1=$(ticks $gw)
    echo "$label: idle CPU over ${idle} s: $((c1 - c0)) ticks of 1/$hz s = $(awk "BEGIN {printf \"%.2f\", ($c1 - $c0) * 100 / $hz / $idle}")% of a core"
    for i in 1 2 3; do
      curl -s -o "$out/metrics.txt" -w "$label: /metrics scrape $i: %{size_download} bytes in %{time_total} s\n" "http://127.0.0.1:$port/metrics"
    done
    echo "$label: /metrics lines $(wc -l < "$out/metrics.txt"), $(( $(stat -c %s "$out/metrics.txt") / n )) bytes per function"
    curl -s -o /dev/null -w "$label: /system/functions: %{size_download} bytes in %{time_total} s\n" "http://127.0.0.1:$port/system/functions"
    echo "$label: RSS after scrapes $(( $(rss_kb $gw) / 1024 )) MB"
  fi
  RSS_KB=$(rss_kb $gw)
  kill $gw; wait $gw 2>/dev/null || true
}
run "$out/one.toml" one; one=$RSS_KB
run "$out/many.toml" many; many=$RSS_KB
echo "RSS growth over one function: $(( (many - one) / 1024 )) MB = $(( (many - one) * 1024 / n )) bytes per function"
rm -rf "$out"
