#!/usr/bin/env bash
# Runs every test: installs what they need, then the Rust unit and
# integration tests (which start oidc-provider and PostgreSQL themselves).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo test --no-fail-fast "$@"
