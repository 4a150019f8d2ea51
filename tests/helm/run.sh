#!/usr/bin/env bash
# Tests of the Helm chart (helm/tokenhub), its examples (helm/examples) and
# the Dockerfile, in their own venv (.venv-helm, from the pinned
# tests/helm/requirements.txt; installed again only when that file changed).
# The boot test runs target/debug/tokenhub (or $TOKENHUB_BIN): build it first.
# Arguments are passed to pytest.
set -euo pipefail
cd "$(dirname "$0")/../.."
dir=.venv-helm
requirements=tests/helm/requirements.txt
if [ ! -x "$dir/bin/python" ]; then
  echo "creating the Python venv ($dir)"
  "${PYTHON:-python3}" -m venv "$dir"
fi
if ! cmp -s "$requirements" "$dir/.installed-requirements.txt"; then
  echo "installing Python packages ($requirements)"
  "$dir/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$dir/.installed-requirements.txt"
fi
exec "$dir/bin/python" -m pytest tests/helm -v -p no:cacheprovider "$@"
