#!/usr/bin/env bash
# Installs what tokenhub's tests and demo need on a fresh machine; quick when
# everything is already there. Safe to run again.
#   Debian packages: PostgreSQL (the tests start their own server), chromium
#   npm (from lockfiles): the test identity provider (idp/) and
#                         configurable-http-proxy (hub/)
#   Python venv (.venv, pinned hub/requirements.txt): JupyterHub,
#                         OAuthenticator, JupyterLab, fabrictestbed, Playwright;
#                         with --jupyterhub6 also .venv-jupyterhub6 (JupyterHub 6)
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(postgresql chromium)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing Debian packages: ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

command -v node >/dev/null || { echo "node (Node.js 20+) is required" >&2; exit 1; }
for dir in idp hub; do
  if [ ! -f "$dir/node_modules/.package-lock.json" ] || [ "$dir/package-lock.json" -nt "$dir/node_modules/.package-lock.json" ]; then
    echo "installing npm packages in $dir/"
    npm ci --prefix "$dir" --no-audit --no-fund --loglevel=error
  fi
done

# venv: .venv (JupyterHub 5, the demo's) and, with --jupyterhub6, .venv-jupyterhub6.
scripts/venv.sh .venv hub/requirements.txt
if [ "${1:-}" = "--jupyterhub6" ]; then
  scripts/venv.sh .venv-jupyterhub6 hub/requirements-jupyterhub6.txt
fi
