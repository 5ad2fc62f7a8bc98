#!/usr/bin/env bash
# Installs what building, testing and running pg_listsync needs on Debian 12, idempotently:
# PostgreSQL 15 (server and headers), clang for bindgen, sudo (tests run PostgreSQL as the
# postgres user when invoked as root), cargo-pgrx pinned to the pgrx version in Cargo.toml,
# and Prism for the contract tests. Fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_MAJOR=15
# The one pin is Cargo.toml's `pgrx = "=X.Y.Z"`; cargo-pgrx must match it exactly.
PGRX_VERSION=$(sed -n 's/^pgrx = "=\([0-9.]*\)"$/\1/p' Cargo.toml)
[ -n "$PGRX_VERSION" ] || { echo "setup: no exact pgrx pin in Cargo.toml" >&2; exit 1; }
PG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

packages=(postgresql-$PG_MAJOR postgresql-server-dev-$PG_MAJOR postgresql-client-$PG_MAJOR
          clang libclang-dev build-essential pkg-config sudo curl)
# Node.js may come from elsewhere than Debian (its npm conflicts with Debian's): only install
# Debian's when there is none.
command -v npm >/dev/null || packages+=(nodejs npm)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q " $PGRX_VERSION\$"; then
    echo "setup: installing cargo-pgrx $PGRX_VERSION"
    cargo install cargo-pgrx --version "=$PGRX_VERSION" --locked --quiet
fi

if ! grep -qs "^pg$PG_MAJOR = \"$PG_CONFIG\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    cargo pgrx init --pg$PG_MAJOR "$PG_CONFIG" >/dev/null
fi

if [ ! -x tests/contract/node_modules/.bin/prism ]; then
    echo "setup: installing Prism (npm)"
    (cd tests/contract && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
