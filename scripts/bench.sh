#!/usr/bin/env bash
# The token-fetch benchmark: prints a table (requests/s, p50, p99 per
# concurrency level) and tokenhub's resident memory. Not a test: rerun it to
# compare. BENCH_SECONDS (default 5) and BENCH_CONCURRENCY (default 1,16,64)
# tune it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bin tokenhub
cargo bench --bench token_fetch --no-run -q
exec .venv/bin/python scripts/bench.py
