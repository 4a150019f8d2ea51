#!/usr/bin/env bash
# Tests of the Helm chart (helm/tokenhub), its examples (helm/examples) and
# the Dockerfile, in their own venv (.venv-helm, from the pinned
# tests/helm/requirements.txt; installed again only when that file changed).
# The boot test runs target/debug/tokenhub (or $TOKENHUB_BIN): build it first.
# Arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=.venv-helm
scripts/venv.sh "$dir" tests/helm/requirements.txt
exec "$dir/bin/python" -m pytest tests/helm -v -p no:cacheprovider "$@"
