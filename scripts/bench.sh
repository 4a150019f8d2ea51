#!/usr/bin/env bash
# The token-fetch benchmark: prints a table (requests/s, p50, p99 and the
# server's CPU time per request, per concurrency level) and tokenhub's
# resident memory. Not a test: rerun it to compare. BENCH_SECONDS (default
# 5), BENCH_ROUNDS (default 3) and BENCH_CONCURRENCY (default 1,16,64) tune
# it; BENCH_INSTRUCTIONS=1 counts instructions per request under callgrind
# instead (needs valgrind), BENCH_PROFILE=<file> records perf samples
# (scripts/profile.sh), BENCH_ONLY=direct,ceiling runs only the targets
# whose names hold one of those words.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bin tokenhub
cargo bench --bench token_fetch --no-run -q
exec .venv/bin/python scripts/bench.py
