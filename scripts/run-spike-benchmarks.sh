#!/usr/bin/env bash
# The traffic-spike matrix of BENCHMARKS.md ("Traffic spikes"): closed-loop
# peaks with admission off, then open loops from a third of the echo peak to
# four times it, the same overload with admission off, a spike inside an
# open loop, two instances, and demo participants at 2x and 3x their peak.
# Usage: scripts/run-spike-benchmarks.sh [OUT_DIR] (default docs/bench/spikes)
# then: python3 scripts/plot_spikes.py OUT_DIR
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/bench/spikes}
mkdir -p "$out"
cargo build --release --bin orchestrator --bin saga-bench
bench=target/release/saga-bench
run() {
  local name=$1; shift
  echo "== $name" >&2
  "$bench" "$@" --json "$out/$name.json" > "$out/$name.txt"
}
peak_of() { python3 -c "import json,sys; print(round(json.load(open(sys.argv[1]))['sagas_per_s']))" "$1"; }

run peak_echo --mode echo --loop closed --concurrency 256 --duration 60s --orchestrator-arg=--admission=off
for rate in 225 450 900 1350 1800 2700; do
  run "echo_$rate" --mode echo --loop open --rate "$rate" --duration 60s
done
run echo_1800_off --mode echo --loop open --rate 1800 --duration 60s --orchestrator-arg=--admission=off
run spike_echo --mode echo --loop open --rate 450 --spike-rate 2700 --spike-at 20s --spike-length 20s --duration 55s
run echo_1800_x2 --mode echo --loop open --rate 1800 --duration 60s --orchestrators 2
run peak_echo_x2 --mode echo --loop closed --concurrency 256 --duration 60s --orchestrators 2 --orchestrator-arg=--admission=off
run peak_demo --mode demo --loop closed --concurrency 256 --duration 60s --orchestrator-arg=--admission=off
demo=$(peak_of "$out/peak_demo.json")
run "demo_$((2 * demo))" --mode demo --loop open --rate $((2 * demo)) --duration 60s
run "demo_$((3 * demo))" --mode demo --loop open --rate $((3 * demo)) --duration 60s
run "demo_$((2 * demo))_t300" --mode demo --loop open --rate $((2 * demo)) --duration 60s --orchestrator-arg=--admission-target-ms=300
