#!/usr/bin/env bash
# Runs every test: installs what they need, then
#   1. the Rust style check (cargo fmt), the unit and integration tests (they start oidc-provider and a
#      PostgreSQL server on 127.0.0.1 themselves);
#   2. the hub block (hub/tokenhub_config.py) loaded the three ways operators
#      load it, with JupyterHub 5 and 6;
#   3. the Helm chart: rendered, validated against Kubernetes' schemas, its
#      values schema, and the rendered configuration booting tokenhub;
#   4. tokenhub against a second, independent OpenID provider
#      (django-oauth-toolkit);
#   5. the end-to-end tests (tests/e2e): oidc-provider, JupyterHub with
#      configurable-http-proxy, tokenhub as a hub service, local servers,
#      Debian's chromium driven by Playwright; once with JupyterHub 5
#      (.venv) and once with JupyterHub 6 (.venv-jupyterhub6).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh --jupyterhub6
# One style (rustfmt.toml); skipped where the toolchain has no rustfmt.
if cargo fmt --version >/dev/null 2>&1; then cargo fmt --check; else echo "rustfmt is not installed: style not checked"; fi
cargo test --no-fail-fast
cargo build --bin tokenhub
echo "== hub block, JupyterHub 5 and 6"
.venv/bin/python -m pytest tests/hub -q -p no:cacheprovider
.venv-jupyterhub6/bin/python -m pytest tests/hub -q -p no:cacheprovider
echo "== Helm chart"
tests/helm/run.sh
echo "== a second OpenID provider (django-oauth-toolkit)"
tests/interop/run.sh
echo "== end-to-end tests, JupyterHub 5"
.venv/bin/python -m pytest tests/e2e -v -p no:cacheprovider
echo "== end-to-end tests, JupyterHub 6"
.venv-jupyterhub6/bin/python -m pytest tests/e2e -v -p no:cacheprovider
