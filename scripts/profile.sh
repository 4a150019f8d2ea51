#!/usr/bin/env bash
# A flame graph of tokenhub's hot path (GET /api/v1/tokens, no refresh):
# runs the token-fetch benchmark (scripts/bench.sh) with perf recording
# tokenhub's stacks during the load, then folds them with inferno into
# target/profile/hot-path.svg (open it in a browser) and prints the
# functions where most samples fall. Needs perf (Debian's linux-perf) and
# inferno (`cargo install inferno`); installs both when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v perf >/dev/null || { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
command -v inferno-flamegraph >/dev/null || cargo install --locked inferno
out=target/profile
mkdir -p "$out"
export BENCH_PROFILE="$PWD/$out/perf.data" BENCH_CONCURRENCY="${BENCH_CONCURRENCY:-1,64}"
scripts/bench.sh
perf script -i "$out/perf.data" 2>/dev/null | inferno-collapse-perf > "$out/hot-path.folded"
inferno-flamegraph --title "tokenhub: GET /api/v1/tokens" < "$out/hot-path.folded" > "$out/hot-path.svg"
echo "flame graph: $out/hot-path.svg"
