#!/usr/bin/env bash
# The Debian package of one major installs and works without the build: its files are unpacked
# (dpkg-deb -x, as dpkg -i would place them) into a scratch root holding a copy of that
# PostgreSQL in Debian's layout, with no pg_listsync of its own; a cluster started from there
# preloads the library, CREATE EXTENSION runs, the worker starts and a filter is bound.
#   tests/package.sh <major> <package.deb>
set -euo pipefail
cd "$(dirname "$0")/.."
major=$1
deb=$(realpath "$2")
pg_config=$(scripts/pg-config "$major")

scratch=$(mktemp -d /tmp/listsync-package-XXXXXX)
cleanup() {
    [ -f "$scratch/data/postmaster.pid" ] && as_pg "$bin/pg_ctl" -D "$scratch/data" stop -m immediate >/dev/null 2>&1
    rm -rf "$scratch"
}
trap cleanup EXIT
as_pg() { if [ "$(id -u)" = 0 ]; then sudo -u postgres -- "$@"; else "$@"; fi; }

# PostgreSQL finds its share and library directories relative to its programs, so a copy in
# Debian's layout behaves as the installed one would.
root=$scratch/root
bin=$root/usr/lib/postgresql/$major/bin
mkdir -p "$root/usr/lib/postgresql/$major" "$root/usr/share/postgresql"
cp -a "$("$pg_config" --bindir)" "$bin"
cp -a "$("$pg_config" --pkglibdir)" "$root/usr/lib/postgresql/$major/lib"
cp -a "$("$pg_config" --sharedir)" "$root/usr/share/postgresql/$major"
if [ "$major" != 15 ]; then
    # The relocatable builds look for share/ next to bin/.
    ln -s "../../../share/postgresql/$major" "$root/usr/lib/postgresql/$major/share"
fi
rm -f "$root/usr/lib/postgresql/$major/lib/pg_listsync.so" "$root/usr/share/postgresql/$major/extension/pg_listsync"*
[ "$("$bin/pg_config" --pkglibdir)" = "$root/usr/lib/postgresql/$major/lib" ] ||
    { echo "package test: the scratch copy does not relocate ($("$bin/pg_config" --pkglibdir))" >&2; exit 1; }

dpkg-deb -x "$deb" "$root"
dpkg-deb -f "$deb" Depends | grep -q "postgresql-$major" ||
    { echo "package test: $deb does not depend on postgresql-$major" >&2; exit 1; }

chmod -R a+rX "$scratch"
mkdir "$scratch/data" "$scratch/run"
[ "$(id -u)" = 0 ] && chown postgres "$scratch/data" "$scratch/run"
as_pg "$bin/initdb" -D "$scratch/data" -U postgres -A trust --no-sync >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
as_pg "$bin/pg_ctl" -D "$scratch/data" -l "$scratch/run/log" -w -t 60 start \
    -o "-p $port -k $scratch/run -c listen_addresses='' -c shared_preload_libraries=pg_listsync -c listsync.database=postgres" >/dev/null
psql() { as_pg env PGOPTIONS="-c client_min_messages=warning" "$bin/psql" -h "$scratch/run" -p "$port" -U postgres -d postgres -qAt -v ON_ERROR_STOP=1 "$@"; }

psql -c "CREATE EXTENSION pg_listsync"
version=$(psql -c "SELECT extversion FROM pg_extension WHERE extname = 'pg_listsync'")
psql -c "CREATE TABLE contacts (id int PRIMARY KEY, email text, city text)" \
     -c "SELECT listsync.create_connection('hook', 'webhook', '{\"url\": \"https://hooks.example/x\"}', '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}')" \
     -c "SELECT listsync.create_filter('moscow', 'contacts', \$\$ city = 'Moscow' \$\$)" \
     -c "SELECT listsync.bind_filter_to_list('moscow', 'hook', 'list-1')" >/dev/null
psql -c "INSERT INTO contacts VALUES (1, 'ann@example.com', 'Moscow')"
# The hook's host does not resolve: the change stays pending, retried.
pending=$(psql -c "SELECT pending FROM listsync.status")
[ "$pending" = 1 ] || { echo "package test: the insert was not captured (pending: $pending)" >&2; exit 1; }
for _ in $(seq 100); do
    grep -q "pg_listsync worker serving database \"postgres\"" "$scratch/run/log" && break
    sleep 0.1
done
grep -q "pg_listsync worker serving database \"postgres\"" "$scratch/run/log" ||
    { echo "package test: the worker did not start"; cat "$scratch/run/log"; exit 1; }
[ "$version" = "$(dpkg-deb -f "$deb" Version)" ] ||
    { echo "package test: installed $version, packaged $(dpkg-deb -f "$deb" Version)" >&2; exit 1; }
echo "package test: $(basename "$deb") installs on PostgreSQL $major: extension $version, worker running, a change captured"
