#!/usr/bin/env bash
# `make demo`: pg_listsync doing its job, end to end, on this machine.
#
# A scratch PostgreSQL 15 cluster (port 55499, data in /tmp/listsync-demo) with the extension
# preloaded, the project's provider emulator on 127.0.0.1:18080 (Mailchimp-compatible, plus a
# webhook receiver), a small CRM with a few thousand contacts, two filters bound to lists, and
# a scripted story. After each step it prints what the provider holds next to what the filter
# says, and exits non-zero if they differ. Both keep running afterwards for you to explore.
#
#   scripts/demo.sh          run the demo (again: it starts from scratch)
#   scripts/demo.sh stop     stop the cluster and the emulator
set -euo pipefail
cd "$(dirname "$0")/.."

PORT=55499
EMULATOR_PORT=18080
DIR=/tmp/listsync-demo
BIN=$("${PG_CONFIG:-$(scripts/pg-config "${PG:-15}")}" --bindir)
EMULATOR="http://127.0.0.1:$EMULATOR_PORT"

as_postgres() { if [ "$(id -u)" = 0 ]; then sudo -u postgres -- "$@"; else "$@"; fi; }
psql_crm() { "$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -d crm -v ON_ERROR_STOP=1 -X -q "$@"; }
value() { psql_crm -At -c "$1"; }

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
fail() { printf '\n\033[31mdemo failed: %s\033[0m\n' "$*" >&2; exit 1; }

stop() {
    if [ -f "$DIR/data/postmaster.pid" ]; then
        as_postgres "$BIN/pg_ctl" -D "$DIR/data" -m fast stop >/dev/null 2>&1 || true
    fi
    if [ -f "$DIR/emulator.pid" ]; then
        kill "$(cat "$DIR/emulator.pid")" 2>/dev/null || true
        rm -f "$DIR/emulator.pid"
    fi
}

if [ "${1:-}" = stop ]; then
    stop
    echo "demo cluster and emulator stopped"
    exit 0
fi

# ------------------------------------------------------------------------------------------
bold "1. A scratch cluster with pg_listsync preloaded, and the provider emulator"
stop
rm -rf "$DIR"
mkdir -p "$DIR"
chmod 755 "$DIR"
[ "$(id -u)" = 0 ] && chown postgres "$DIR"

nohup target/release/listsync-emulator --port "$EMULATOR_PORT" --mailchimp-audience crm_audience \
    >"$DIR/emulator.log" 2>&1 &
echo $! >"$DIR/emulator.pid"
for _ in $(seq 50); do grep -q "listening on" "$DIR/emulator.log" 2>/dev/null && break; sleep 0.1; done
grep -q "listening on" "$DIR/emulator.log" || fail "the emulator did not start (port $EMULATOR_PORT busy?)"

as_postgres "$BIN/initdb" -D "$DIR/data" -U postgres -A trust --no-locale -E UTF8 >/dev/null
cat <<EOF | as_postgres tee -a "$DIR/data/postgresql.conf" >/dev/null
port = $PORT
listen_addresses = '127.0.0.1'
unix_socket_directories = '$DIR'
shared_preload_libraries = 'pg_listsync'
listsync.database = 'crm'
listsync.allowed_insecure_hosts = '127.0.0.1'
listsync.reconcile_interval = '10s'
EOF
as_postgres "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w start >/dev/null
"$BIN/psql" -h 127.0.0.1 -p "$PORT" -U postgres -X -q -c "CREATE DATABASE crm"
echo "cluster on port $PORT, emulator on $EMULATOR"

# ------------------------------------------------------------------------------------------
bold "2. A CRM with 5,000 contacts"
psql_crm <<'SQL'
CREATE EXTENSION pg_listsync;
CREATE TABLE contacts (
    id           serial PRIMARY KEY,
    email        text,
    first_name   text,
    last_name    text,
    city         text,
    ltv          numeric NOT NULL DEFAULT 0,
    birthday     date,
    last_seen_at timestamptz,
    is_deleted   boolean NOT NULL DEFAULT false
);
-- The worker reads desired state by normalized address: index it on large tables.
CREATE INDEX ON contacts (listsync.normalize_email(email));
INSERT INTO contacts (email, first_name, last_name, city, ltv, birthday)
SELECT CASE WHEN g % 97 = 0 THEN NULL ELSE 'customer' || g || '@example.com' END,
       (ARRAY['Anna', 'Boris', 'Chen', 'Dina', 'Emil', 'Fatima'])[1 + g % 6],
       'Lastname' || g,
       (ARRAY['Moscow', 'Kazan', 'Berlin', 'Paris'])[1 + g % 4],
       (g * 37) % 3000,
       date '1970-01-01' + (g * 53) % 18000
  FROM generate_series(1, 5000) g;
SQL
value "SELECT count(*) || ' contacts, ' || count(*) FILTER (WHERE email IS NULL) || ' without an email' FROM contacts"

# ------------------------------------------------------------------------------------------
bold "3. Two filters bound to lists: VIPs in Moscow (Mailchimp tag), birthdays this week (webhook)"
psql_crm <<SQL
SELECT listsync.create_connection('mailchimp', 'mailchimp',
         settings => '{"audience_id": "crm_audience", "base_url": "$EMULATOR/mailchimp"}',
         secrets  => '{"api_key": "demo-key-us21"}');
SELECT listsync.create_connection('birthday_service', 'webhook',
         settings => '{"url": "$EMULATOR/webhook/birthdays"}',
         secrets  => '{"signing_secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}');
-- A predicate written as SQL...
SELECT listsync.create_filter('vip_moscow', 'contacts',
         \$\$ city = 'Moscow' AND ltv > 2000 AND NOT is_deleted \$\$);
-- ...and one as the JSON a CRM UI produces; it depends on the date, so it is reconciled by time.
SELECT listsync.create_filter('birthday_week', 'contacts',
         '{"all": [{"column": "birthday", "op": "within_next_days", "value": 7, "annual": true},
                   {"column": "is_deleted", "op": "=", "value": false}]}'::jsonb);
SELECT listsync.bind_filter_to_list('vip_moscow', 'mailchimp',
         fields => '{"FNAME": "first_name", "LNAME": "last_name"}', tags => ARRAY['crm']);
SELECT listsync.bind_filter_to_list('birthday_week', 'birthday_service',
         fields => '{"name": "first_name || '' '' || last_name", "birthday": "to_char(birthday, ''MM-DD'')"}');
SQL

# Both sides of the comparison, as sorted "address fields" lines. The filter side reads the
# rows the filter matches now (its view), one row per address: the one with the greatest key.
filter_side() { # filter field-expression
    value "SELECT coalesce(string_agg(a || ' ' || f, E'\n' ORDER BY a), '')
             FROM (SELECT DISTINCT ON (a) a, f
                     FROM (SELECT listsync.normalize_email(c.email) AS a, $2 AS f, c.id
                             FROM contacts c JOIN listsync.\"filter:$1\" v ON v.key_1 = c.id) m
                    WHERE a IS NOT NULL ORDER BY a, id DESC) d"
}
provider_side() { # provider binding field
    local list
    list=$(value "SELECT list_id FROM listsync.bindings WHERE id = $2")
    [ -n "$list" ] || { echo ""; return; }
    curl -sf "$EMULATOR/_admin/lists/$1/$(python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$list")" |
        python3 -c 'import json, sys; d = json.load(sys.stdin); print("\n".join(sorted(a + " " + str(f.get(sys.argv[1], "")) for a, f in d.items())))' "$3"
}
wait_drained() {
    for _ in $(seq 600); do
        [ "$(value "SELECT count(*) FROM listsync.outbox WHERE address <> ''")" = 0 ] &&
            [ "$(value "SELECT count(*) FROM listsync.bindings WHERE list_id IS NULL")" = 0 ] && return 0
        sleep 0.1
    done
    fail "the outbox did not drain"
}
compare() { # step-title
    wait_drained
    local vip_filter vip_provider bday_filter bday_provider
    vip_filter=$(filter_side vip_moscow "c.first_name")
    vip_provider=$(provider_side mailchimp 1 FNAME)
    bday_filter=$(filter_side birthday_week "c.first_name || ' ' || c.last_name")
    bday_provider=$(provider_side webhook 2 name)
    printf '   %-44s %8s %8s\n' "" "filter" "provider"
    printf '   %-44s %8d %8d\n' "vip_moscow -> Mailchimp tag" "$(grep -c . <<<"$vip_filter" || true)" "$(grep -c . <<<"$vip_provider" || true)"
    printf '   %-44s %8d %8d\n' "birthday_week -> webhook" "$(grep -c . <<<"$bday_filter" || true)" "$(grep -c . <<<"$bday_provider" || true)"
    [ "$vip_filter" = "$vip_provider" ] || fail "$1: Mailchimp differs from the filter: $(diff <(echo "$vip_filter") <(echo "$vip_provider") | head -5)"
    [ "$bday_filter" = "$bday_provider" ] || fail "$1: the webhook list differs from the filter: $(diff <(echo "$bday_filter") <(echo "$bday_provider") | head -5)"
    echo "   ✓ address for address and field for field, the provider holds what the filter says"
}
compare "backfill"
psql_crm -c "SELECT binding, filter, connection, list, state, members, pending, skipped_invalid_addresses AS skipped FROM listsync.status ORDER BY binding"

# ------------------------------------------------------------------------------------------
bold "4. A contact qualifies: Anna in Moscow spends more"
committed=$(value "UPDATE contacts SET city = 'Moscow', ltv = 2500, first_name = 'Anna' WHERE id = 2; SELECT clock_timestamp()")
wait_drained
value "SELECT '   delivered and recorded ' || round(extract(epoch FROM synced_at - '$committed'::timestamptz) * 1000)
               || ' ms after the commit' FROM listsync.members WHERE binding_id = 1 AND address = 'customer2@example.com'"
compare "qualify"

bold "5. She changes her email address"
psql_crm -c "UPDATE contacts SET email = 'Anna.New@Example.com ' WHERE id = 2"
compare "email change"
held=$(provider_side mailchimp 1 FNAME)
grep -q "^anna.new@example.com " <<<"$held" && ! grep -q "^customer2@example.com " <<<"$held" ||
    fail "the email change did not move membership"
echo "   Mailchimp now has anna.new@example.com, and no longer customer2@example.com"

bold "6. She leaves the filter (marked deleted in the CRM)"
psql_crm -c "UPDATE contacts SET is_deleted = true WHERE id = 2"
compare "leave"
echo "   (on_leave => 'remove': the tag is removed, the contact stays in the audience)"

bold "7. A bulk import of 2,000 contacts (COPY)"
seq 1 2000 | awk '{ printf "import%d@example.com\tImported\tContact%d\tMoscow\t2999\t1990-01-01\n", $1, $1 }' >"$DIR/import.tsv"
psql_crm -c "\\copy contacts (email, first_name, last_name, city, ltv, birthday) FROM '$DIR/import.tsv'"
compare "bulk import"

bold "8. The provider goes down; the CRM keeps writing"
curl -sf -X POST "$EMULATOR/_admin/faults/mailchimp" -d '{"down": true}' >/dev/null
psql_crm -c "UPDATE contacts SET ltv = ltv + 1000 WHERE city = 'Moscow' AND id % 10 = 0"
psql_crm -c "UPDATE contacts SET first_name = 'Renamed' WHERE city = 'Moscow' AND id % 7 = 0"
sleep 2
psql_crm -c "SELECT binding, filter, state, pending, oldest_pending_age, left(last_error, 60) AS last_error FROM listsync.status WHERE binding = 1"
bold "   ...and comes back"
curl -sf -X POST "$EMULATOR/_admin/faults/mailchimp" -d '{"down": false}' >/dev/null
compare "outage healed"

# ------------------------------------------------------------------------------------------
bold "listsync.status"
psql_crm -c "SELECT binding, filter, provider, list, state, members, pending, dead_letters, refused, skipped_invalid_addresses AS skipped, last_success_at FROM listsync.status ORDER BY binding"
psql_crm -c "SELECT count(*) AS provider_calls, round(avg(duration_ms)::numeric, 1) AS avg_ms, count(*) FILTER (WHERE outcome <> 'ok') AS failed FROM listsync.deliveries"

cat <<EOF

The demo cluster and the emulator keep running. Explore:

  psql -h 127.0.0.1 -p $PORT -U postgres crm
      SELECT * FROM listsync.status;
      SELECT * FROM listsync.dry_run(1);
      UPDATE contacts SET ltv = 5000 WHERE id = 3;   -- then look at the emulator:
  curl -s $EMULATOR/_admin/state/mailchimp | python3 -m json.tool | less
  curl -s -X POST $EMULATOR/_admin/faults/mailchimp -d '{"push": [{"status": 429, "retry_after": 2}]}'

Stop everything with:  scripts/demo.sh stop
EOF
