#!/usr/bin/env bash
# Builds a Debian package of pg_listsync for each PostgreSQL major in MAJORS (default: 15 16 17
# 18) into target/package/: postgresql-<major>-pg-listsync_<version>_amd64.deb. It installs the
# library and SQL scripts where Debian's and apt.postgresql.org's postgresql-<major> look for
# them, and needs no Rust on the database host.
#   scripts/package.sh [--debug]    (--debug: an unoptimized build, for the package test)
set -euo pipefail
cd "$(dirname "$0")/.."

profile=()
if [ "${1:-}" = --debug ]; then profile=(--debug); fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
out=target/package
mkdir -p "$out"

for major in ${MAJORS:-15 16 17 18}; do
    PG=$major scripts/setup.sh
    pg_config=$(scripts/pg-config "$major")
    tree=$out/pg$major/tree
    rm -rf "$out/pg$major" "$out/postgresql-$major-pg-listsync_"*.deb
    mkdir -p "$out/pg$major"
    cargo pgrx package ${profile[@]+"${profile[@]}"} --pg-config "$pg_config" \
        --no-default-features --features "pg$major" --out-dir "$tree" >"$out/pg$major/build.log" 2>&1 ||
        { cat "$out/pg$major/build.log" >&2; exit 1; }

    # cargo pgrx lays files out under this build's own pg_config paths; a package puts them
    # where the distribution's PostgreSQL of that major has them.
    root=$out/pg$major/root
    mkdir -p "$root/usr/lib/postgresql/$major/lib" "$root/usr/share/postgresql/$major/extension" "$root/DEBIAN"
    cp "$tree$("$pg_config" --pkglibdir)/pg_listsync.so" "$root/usr/lib/postgresql/$major/lib/"
    cp "$tree$("$pg_config" --sharedir)"/extension/pg_listsync* "$root/usr/share/postgresql/$major/extension/"
    mkdir -p "$root/usr/share/doc/postgresql-$major-pg-listsync"
    cp README.md "$root/usr/share/doc/postgresql-$major-pg-listsync/"

    # The newest glibc symbol version the library needs.
    glibc=$(objdump -T "$root/usr/lib/postgresql/$major/lib/pg_listsync.so" \
        | sed -n 's/.*GLIBC_\([0-9.]*\).*/\1/p' | sort -V | tail -1)
    cat >"$root/DEBIAN/control" <<EOF
Package: postgresql-$major-pg-listsync
Version: $version
Architecture: amd64
Maintainer: pg_listsync maintainers <maintainers@pg-listsync.invalid>
Depends: postgresql-$major, libc6 (>= $glibc), libgcc-s1
Section: database
Priority: optional
Description: keeps email provider lists in step with filters over PostgreSQL $major tables
 pg_listsync evaluates saved filters in the writing transaction, records what changed in an
 outbox and delivers it to Mailchimp, MailerLite, SendGrid, SendPulse, Unisender, eSputnik,
 Yespo, Sendsay, Google Contacts or a webhook from a background worker.
EOF
    deb=$out/postgresql-$major-pg-listsync_${version}_amd64.deb
    dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
    echo "package: $deb"
done
