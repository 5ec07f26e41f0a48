#!/usr/bin/env bash
# Runs the benchmark matrix of BENCHMARKS.md and draws its charts.
# Usage: scripts/run-benchmarks.sh [window]   (default window 60s)
# Results: docs/bench/*.json; charts: docs/bench/*.png (scripts/plot_benchmarks.py).
set -euo pipefail
cd "$(dirname "$0")/.."
window=${1:-60s}
out=docs/bench
mkdir -p "$out"
./scripts/ensure-services.sh
# A benchmark orchestrator left over from an interrupted run would share the
# bench namespace and take replies from the one being measured.
if pgrep -f "orchestrator serve --bench-flows" > /dev/null; then
  echo "an earlier benchmark orchestrator is still running (pgrep -af 'orchestrator serve --bench-flows'); stop it first" >&2
  exit 1
fi
cargo build --release --bin orchestrator --bin saga-bench
bench=./target/release/saga-bench

run() { # run NAME ARGS...
  local name=$1; shift
  echo "== $name: $*" >&2
  "$bench" --warmup 5s --duration "$window" --json "$out/$name.json" "$@" > "$out/$name.txt"
  grep -E "sagas/s|latency" "$out/$name.txt" >&2 || true
}

# Peak throughput and calibration (echo and demo), v1.
run echo-peak --mode echo --concurrency 256 --calibrate
run demo-peak --mode demo --concurrency 256
# One saga at a time.
run echo-single --mode echo --concurrency 1
# Throughput against concurrency.
for c in 1 4 16 64 128 256 512; do run "echo-c$c" --mode echo --concurrency "$c"; done
# Cost against steps per saga.
for n in 1 3 6 12; do run "echo-steps$n" --mode echo --steps "$n" --concurrency 128; done
# Open loop at half the measured peak (latency under load), and at a
# quarter and 35 % of it (where p99 stays under 100 ms).
peak=$(python3 -c "import json;print(int(json.load(open('$out/echo-peak.json'))['sagas_per_s']))")
run echo-open-half --mode echo --loop open --rate "$((peak / 2))"
run echo-open-p25 --mode echo --loop open --rate "$((peak / 4))"
run echo-open-p35 --mode echo --loop open --rate "$((peak * 35 / 100))"
# The demo participants one saga at a time.
run demo-single --mode demo --concurrency 1
# Last: the run after writing a million rows is disturbed (an open-loop
# run right after it measured p99 1.6 s, against 183 ms alone).
# History size: 1,000,000 finished sagas already in the tables.
run echo-prefill1m --mode echo --concurrency 256 --prefill 1000000
# Memory with 10,000 sagas in flight.
"$bench" --mode echo --inflight 10000 --json "$out/echo-inflight10k.json" > "$out/echo-inflight10k.txt"
python3 scripts/plot_benchmarks.py "$out"
