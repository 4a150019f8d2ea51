#!/usr/bin/env bash
# The refresh-storm benchmark (benches/storm.rs): prints tables, not a test;
# rerun it to compare. Starts a PostgreSQL server of its own on 127.0.0.1
# (Debian's packages, in a temporary directory; stopped at the end).
# STORM_LINEAGES (default 10000,100000) sets the vault sizes measured.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release --bin tokenhub
cargo bench --bench storm --no-run -q

bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
dir=$(mktemp -d /tmp/tokenhub-storm-pg.XXXXXX)
as_postgres=()
if [ "$(id -u)" = 0 ]; then chown postgres "$dir"; as_postgres=(runuser -u postgres --); fi
"${as_postgres[@]}" "$bin/initdb" -D "$dir/data" --auth=trust -U postgres --no-sync -E UTF8 >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${as_postgres[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
  -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c max_connections=200" start >/dev/null
trap '"${as_postgres[@]}" "$bin/pg_ctl" -D "$dir/data" -m immediate stop >/dev/null 2>&1 || true' EXIT
STORM_POSTGRES_URL="postgres://postgres@127.0.0.1:$port" TOKENHUB_BIN="$PWD/target/release/tokenhub" \
  cargo bench --bench storm -q
