#!/usr/bin/env bash
# make bench: measures pg_listsync against the targets of docs/design.md ("Targets") in one run and
# prints one table. Raw numbers go to target/bench/results.json, the table to results.md.
#
# Runs on a scratch cluster of its own (unix socket only, its own directory under /tmp), so it
# neither needs nor disturbs any other PostgreSQL on the machine; the cluster is removed on exit.
# The figures themselves are taken by bench/ (listsync-bench), which this script builds and runs.
#
# Knobs (environment): BENCH_PORT (55432), BENCH_DIR (/tmp/listsync-bench), and for quick
# trial runs BENCH_SECONDS, BENCH_ROUNDS, BENCH_COPY_ROUNDS, BENCH_LATENCY_SAMPLES,
# BENCH_DRAIN_ROWS, BENCH_DRAIN_TIMEOUT, BENCH_ONLY, BENCH_MIXED (see bench/src/main.rs; the
# defaults are the reported run).
set -euo pipefail
cd "$(dirname "$0")/.."

PG_BIN=$("${PG_CONFIG:-$(scripts/pg-config "${PG:-15}")}" --bindir)
PORT=${BENCH_PORT:-55432}
DIR=${BENCH_DIR:-/tmp/listsync-bench}
DATA=$DIR/data
LOG=$DIR/postgresql.log
OUT=target/bench
LIB=$("$PG_BIN/pg_config" --pkglibdir)/pg_listsync.so

# PostgreSQL refuses to run as root: as root, run its programs as the postgres user.
as_pg() {
    if [ "$(id -u)" = 0 ]; then sudo -u postgres -- "$@"; else "$@"; fi
}

stop_cluster() {
    if [ -f "$DATA/postmaster.pid" ]; then
        as_pg "$PG_BIN/pg_ctl" -D "$DATA" stop -m immediate >/dev/null 2>&1 || true
    fi
    rm -rf "$DIR"
}

on_exit() {
    local status=$?
    if [ "$status" != 0 ] && [ -f "$LOG" ]; then
        echo "bench: failed; last lines of the server log:" >&2
        tail -n 40 "$LOG" >&2 || true
    fi
    stop_cluster
    exit "$status"
}

[ -f "$LIB" ] || { echo "bench: $LIB is missing: run make install-release" >&2; exit 1; }
[ -x "$PG_BIN/pgbench" ] || { echo "bench: $PG_BIN/pgbench is missing (postgresql-15)" >&2; exit 1; }

# Builds nothing when `make bench` already did.
cargo build --release --quiet -p listsync-bench

# A cluster left over by an interrupted run goes first (idempotence).
stop_cluster
trap on_exit EXIT
mkdir -p "$DIR" "$OUT"
if [ "$(id -u)" = 0 ]; then chown postgres "$DIR"; fi

echo "bench: scratch cluster in $DIR (port $PORT)" >&2
as_pg "$PG_BIN/initdb" -D "$DATA" -U postgres -A trust --no-locale -E UTF8 --no-sync >/dev/null
# Why each setting:
# - unix socket only: no TCP port to collide with the test clusters others run;
# - synchronous_commit off: the write-path figures are CPU-bound measurements (docs/design.md),
#   otherwise the WAL flush of every commit hides any trigger cost;
# - large max_wal_size, long checkpoint_timeout: no checkpoint in the middle of a measurement
#   (the benchmark checkpoints between runs instead);
# - shared_buffers 1GB: the drain's million contacts, outbox and member rows stay in memory.
as_pg tee -a "$DATA/postgresql.auto.conf" >/dev/null <<EOF
port = $PORT
listen_addresses = ''
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_listsync'
listsync.database = 'crm'
listsync.allowed_insecure_hosts = '127.0.0.1'
synchronous_commit = off
shared_buffers = '1GB'
max_wal_size = '8GB'
checkpoint_timeout = '30min'
EOF
as_pg "$PG_BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null
# The postmaster loaded the library at start: make sure it is the release build we just
# installed (`make install` or `cargo pgrx test` elsewhere on the machine installs a debug build
# into the same directory, and a debug build is several times slower).
# BENCH_ANY_BUILD=1 skips the check, for trying out changes to the benchmark itself.
if [ "${BENCH_ANY_BUILD:-0}" != 1 ] && ! cmp -s target/release/libpg_listsync.so "$LIB"; then
    echo "bench: the installed $LIB is not target/release/libpg_listsync.so" \
         "(replaced by another build?): run make install-release, then this again" >&2
    exit 1
fi
as_pg "$PG_BIN/psql" -h "$DIR" -p "$PORT" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 \
    -c "CREATE DATABASE crm" >/dev/null
as_pg "$PG_BIN/psql" -h "$DIR" -p "$PORT" -U postgres -d crm -qAt -v ON_ERROR_STOP=1 \
    -c "CREATE EXTENSION pg_listsync" >/dev/null

started=$(date +%s)
target/release/listsync-bench --host "$DIR" --port "$PORT" --out "$OUT" --pg-bin "$PG_BIN"
echo "bench: measured in $(($(date +%s) - started)) s" >&2
