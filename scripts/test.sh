#!/usr/bin/env bash
# Runs every test: installs what they need, then
#   1. the Rust unit and integration tests (they start oidc-provider and a
#      PostgreSQL server on 127.0.0.1 themselves);
#   2. the end-to-end tests (tests/e2e): oidc-provider, JupyterHub with
#      configurable-http-proxy, tokenhub as a hub service, local servers,
#      Debian's chromium driven by Playwright; once with JupyterHub 5
#      (.venv) and once with JupyterHub 6 (.venv-jupyterhub6).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --jupyterhub6
cargo test --no-fail-fast
cargo build --bin tokenhub
echo "== end-to-end tests, JupyterHub 5"
.venv/bin/python -m pytest tests/e2e -v -p no:cacheprovider
echo "== end-to-end tests, JupyterHub 6"
.venv-jupyterhub6/bin/python -m pytest tests/e2e -v -p no:cacheprovider
