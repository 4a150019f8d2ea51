#!/usr/bin/env bash
# Creates or reuses a Python venv and installs a pinned requirements file into
# it, again only when that file changed since the last install:
#   scripts/venv.sh DIR REQUIREMENTS
set -euo pipefail
dir=$1 requirements=$2
if [ ! -x "$dir/bin/python" ]; then
  echo "creating the Python venv ($dir)"
  "${PYTHON:-python3}" -m venv "$dir"
fi
if ! cmp -s "$requirements" "$dir/.installed-requirements.txt"; then
  echo "installing Python packages ($requirements)"
  "$dir/bin/pip" install -q --disable-pip-version-check -r "$requirements"
  cp "$requirements" "$dir/.installed-requirements.txt"
fi
