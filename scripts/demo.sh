#!/usr/bin/env bash
# The whole demo on 127.0.0.1: the test identity provider (any user name signs
# in), tokenhub, and JupyterHub with configurable-http-proxy. Installs what it
# needs first. Ctrl-C stops everything it started.
#   DEMO_STATE_DIR  where state and logs go (default .demo/, wiped each start)
#   HUB_PORT etc.   see jupyterhub_config.py (the demo uses 8000, 8081, 8001, 8090, 9000)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --bin tokenhub
export DEMO_STATE_DIR=${DEMO_STATE_DIR:-$PWD/.demo}
rm -rf "$DEMO_STATE_DIR"
exec .venv/bin/python hub/stack.py demo
