#!/usr/bin/env bash
# tokenhub against a second, independent OpenID provider (django-oauth-toolkit):
# login, refresh with rotation, key rollover; see docs/interop.md.
# Creates or reuses the venv .venv-interop from the pinned
# tests/interop/requirements.txt (installs again only when that file changed),
# then runs the tests. Expects tokenhub built already:
#   cargo build --bin tokenhub    (or TOKENHUB_BIN=/path/to/tokenhub)
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."

venv=.venv-interop
scripts/venv.sh "$venv" tests/interop/requirements.txt

export TOKENHUB_BIN="${TOKENHUB_BIN:-$PWD/target/debug/tokenhub}"
if [ ! -x "$TOKENHUB_BIN" ]; then
  echo "no tokenhub binary at $TOKENHUB_BIN: run 'cargo build --bin tokenhub' first or set TOKENHUB_BIN" >&2
  exit 1
fi
echo "== interoperability tests: django-oauth-toolkit"
exec "$venv/bin/python" -m pytest tests/interop -v -p no:cacheprovider "$@"
