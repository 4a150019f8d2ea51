#!/usr/bin/env bash
# Installs what tokenhub's tests and demo need on a fresh machine; quick when
# everything is already there. Safe to run again.
#   Debian packages: PostgreSQL (tests start their own server)
#   npm: the test identity provider (idp/, from its lockfile)
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(postgresql)
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
if [ ! -d idp/node_modules/oidc-provider ] || [ idp/package-lock.json -nt idp/node_modules/.package-lock.json ]; then
  echo "installing the test identity provider (npm ci in idp/)"
  npm ci --prefix idp --no-audit --no-fund --loglevel=error
fi
