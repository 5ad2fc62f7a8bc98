#!/usr/bin/env bash
# Runs every test of pg_listsync on PostgreSQL $PG (default 15), after scripts/setup.sh:
#  - the core crate's tests (pure logic, every provider against its fake and Prism; no PostgreSQL);
#  - unit tests and in-database #[pg_test]s, then the integration tests in tests/ (scratch
#    clusters with the worker running, the provider emulator, faults, crashes, the randomized
#    convergence workload, the in-place upgrade from 0.1.0), then Prism contract tests — all
#    through `cargo pgrx test`, which first installs the extension into that PostgreSQL;
#  - the Debian package of that major, installed into a scratch root;
#  - the provider emulator's own tests.
# TEST_SCOPE=postgres runs only what depends on the PostgreSQL major (for CI's other majors).
set -euo pipefail
cd "$(dirname "$0")/.."

major=${PG:-15}
scope=${TEST_SCOPE:-all}
# Outside the checkout: PostgreSQL runs as the postgres user, which must reach the directory.
pgdata=/tmp/listsync-pgrx-test-$major
mkdir -p "$pgdata"
runas=()
if [ "$(id -u)" = 0 ]; then
    chown postgres "$pgdata"
    runas=(--runas postgres)
fi

# The integration tests start their clusters with this installation's programs.
PG_CONFIG=$(scripts/pg-config "$major")
export PG_CONFIG
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-2}"
status=0
started=$SECONDS
step() {
    echo "make test: $1 on PostgreSQL $major ($((SECONDS - started)) s so far)"
}
if [ "$scope" = all ]; then
    step "core crate"
    cargo test -p listsync-core || status=$?
fi
step "in-database and integration tests"
cargo pgrx test "pg$major" "${runas[@]}" --pgdata "$pgdata" || status=$?
step "Debian package"
{ MAJORS=$major scripts/package.sh --debug &&
    tests/package.sh "$major" target/package/postgresql-"$major"-pg-listsync_*_amd64.deb; } || status=$?
if [ "$scope" = all ]; then
    step "emulator"
    cargo test -p listsync-emulator || status=$?
fi
step "done"
if [ "$status" = 0 ]; then echo "make test: all tests passed"; else echo "make test: FAILED"; fi
exit "$status"
