#!/usr/bin/env bash
# Starts the release gateway with one static function `echo` in front of $BACKEND, for
# ../shared/bench/proxybench.py (which sets BACKEND) and the steady-state scenario.
#   PORT (default 18083)  BACKEND (default http://127.0.0.1:18080)  SLUICEGATE_BIN (default target/release/sluicegate)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cfg=$(mktemp /tmp/sluicegate-bench-XXXXXX.toml)
cat > "$cfg" <<TOML
[gateway]
listen = "127.0.0.1:${PORT:-18083}"

[functions.echo]
provider = "static"
upstreams = ["${BACKEND:-http://127.0.0.1:18080}"]
# Admission control and metrics stay on; the caps are just above what the benchmark offers.
max_ongoing_requests = 10000
max_queued_requests = -1
TOML
exec "${SLUICEGATE_BIN:-$here/../target/release/sluicegate}" --config "$cfg"
