-- pg_listsync 0.1.0 -> 0.2.0: the privilege model of semantics 10.
--   * USAGE on connections (listsync.grant_usage / revoke_usage); the owners of existing
--     bindings keep the use of their connections.
--   * Functions an administrator allowed in filters (listsync.allow_function).
--   * Operational views and the filters/bindings tables show a role its own rows.
--   * A member's status is one the engine records: 'refused' was allowed but never written.
--   * listsync.workers (the running workers), listsync.check_setup(), rename_filter and
--     rename_connection; create_connection(..., if_not_exists).
--   * listsync.instance: a restored or cloned database delivers nothing until
--     listsync.confirm_restore(); status shows its bindings as 'restored'.
--   * listsync.counters, the listsync.stats view and listsync.metrics() (Prometheus).
--   * listsync.explain(binding, address) and listsync.alter_binding(id, ...).
-- Filters made under 0.1.0 that break the new rules are put in state error by the worker (its
-- first look after the upgrade) and are not captured; nothing is dropped.

\echo Use "ALTER EXTENSION pg_listsync UPDATE TO '0.2.0'" to load this file. \quit

CREATE TABLE listsync.connection_usage (
    connection_id bigint NOT NULL REFERENCES listsync.connections (id) ON DELETE CASCADE,
    grantee       regrole NOT NULL,
    granted_by    regrole NOT NULL,
    granted_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection_id, grantee)
);

CREATE TABLE listsync.allowed_functions (
    function   regprocedure PRIMARY KEY,
    allowed_by regrole NOT NULL,
    allowed_at timestamptz NOT NULL DEFAULT now()
);

SELECT pg_catalog.pg_extension_config_dump('listsync.connection_usage', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.allowed_functions', '');
REVOKE ALL ON listsync.connection_usage, listsync.allowed_functions FROM PUBLIC;
GRANT SELECT ON listsync.allowed_functions TO PUBLIC;

-- Whoever bound a filter to a connection under 0.1.0 may go on doing so.
INSERT INTO listsync.connection_usage (connection_id, grantee, granted_by)
SELECT DISTINCT b.connection_id, b.owner, c.owner
  FROM listsync.bindings b JOIN listsync.connections c ON c.id = b.connection_id
 WHERE b.owner::oid <> c.owner::oid
ON CONFLICT DO NOTHING;

-- Where the catalog was bound: a restore or a clone waits for listsync.confirm_restore().
CREATE TABLE listsync.instance (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    system_identifier text NOT NULL,
    database          oid NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('listsync.instance', '');
REVOKE ALL ON listsync.instance FROM PUBLIC;
-- A catalog with bindings was bound here.
INSERT INTO listsync.instance (system_identifier, database)
SELECT system_identifier::text, (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database())
  FROM pg_catalog.pg_control_system()
 WHERE EXISTS (SELECT FROM listsync.bindings);
CREATE FUNCTION listsync.restore_unconfirmed() RETURNS boolean STABLE STRICT
LANGUAGE c AS 'MODULE_PATHNAME', 'restore_unconfirmed_wrapper';

CREATE OR REPLACE VIEW listsync.status AS
SELECT b.id                                   AS binding,
       b.filter_name                          AS filter,
       c.name                                 AS connection,
       c.provider,
       coalesce(b.list_name, b.list_id)       AS list,
       b.list_id,
       CASE WHEN b.state = 'active' AND r.restored THEN 'restored'
            WHEN b.state = 'active' AND c.state = 'error' THEN 'error' ELSE b.state END AS state,
       CASE WHEN b.state = 'active' AND r.restored
            THEN 'this database is a restore or a clone of another: nothing is delivered until listsync.confirm_restore()'
            ELSE coalesce(b.state_reason, CASE WHEN c.state = 'error' THEN c.state_reason END) END AS state_reason,
       (SELECT count(*) FROM listsync.members m
         WHERE m.binding_id = b.id AND m.status IN ('subscribed', 'pending'))       AS members,
       p.pending,
       p.oldest_pending_age,
       (SELECT count(*) FROM listsync.dead_letter_items d WHERE d.binding_id = b.id) AS dead_letters,
       (SELECT count(*) FROM listsync.members m
         WHERE m.binding_id = b.id AND m.status NOT IN ('subscribed', 'pending'))   AS refused,
       b.skipped_invalid                      AS skipped_invalid_addresses,
       b.last_success_at,
       b.last_error_at,
       b.last_error,
       c.throttled_until,
       p.realtime                             AS pending_realtime,
       p.backfill                             AS pending_backfill,
       p.retry                                AS pending_retry
  FROM listsync.bindings b
  JOIN listsync.connections c ON c.id = b.connection_id
  CROSS JOIN (SELECT listsync.restore_unconfirmed() AS restored) r
  -- Pending pairs by why they wait: changes captured as they happen (due at once), marked in
  -- bulk by a backfill, resync or reconcile (served after real-time ones), waiting for a retry.
  CROSS JOIN LATERAL (
      SELECT count(*)                                                   AS pending,
             now() - min(o.dirtied_at)                                  AS oldest_pending_age,
             count(*) FILTER (WHERE o.not_before = '-infinity')         AS realtime,
             count(*) FILTER (WHERE o.not_before = 'epoch')             AS backfill,
             count(*) FILTER (WHERE o.not_before NOT IN ('-infinity', 'epoch')) AS retry
        FROM listsync.outbox o
       WHERE o.binding_id = b.id AND o.address <> '') p
 WHERE pg_catalog.pg_has_role(b.owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE');

CREATE OR REPLACE VIEW listsync.dead_letters AS
SELECT d.binding_id AS binding, b.filter_name AS filter, c.name AS connection, d.address, d.operation,
       d.attempts, d.error, d.first_failed_at, d.last_failed_at
  FROM listsync.dead_letter_items d
  JOIN listsync.bindings b ON b.id = d.binding_id
  JOIN listsync.connections c ON c.id = b.connection_id
 WHERE pg_catalog.pg_has_role(b.owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE');

CREATE OR REPLACE VIEW listsync.deliveries AS
SELECT l.id, l.at, c.name AS connection, l.binding_id AS binding, l.operation, l.request,
       l.http_status, l.duration_ms, l.outcome, l.message
  FROM listsync.delivery_log l
  LEFT JOIN listsync.connections c ON c.id = l.connection_id
  LEFT JOIN listsync.bindings b ON b.id = l.binding_id
 WHERE pg_catalog.pg_has_role(b.owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE');

CREATE OR REPLACE VIEW listsync.connection_list AS
SELECT id, name, provider, settings, state, state_reason, throttled_until, owner, created_at
  FROM listsync.connections c
 WHERE pg_catalog.pg_has_role(c.owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE')
    OR EXISTS (SELECT FROM listsync.connection_usage u
                WHERE u.connection_id = c.id
                  AND (u.grantee::oid = 0 OR pg_catalog.pg_has_role(u.grantee, 'USAGE')));

ALTER TABLE listsync.filters ENABLE ROW LEVEL SECURITY;
ALTER TABLE listsync.bindings ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON listsync.filters FOR SELECT
    USING (pg_catalog.pg_has_role(owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE'));
CREATE POLICY own_rows ON listsync.bindings FOR SELECT
    USING (pg_catalog.pg_has_role(owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE'));

ALTER TABLE listsync.members DROP CONSTRAINT members_status_check,
    ADD CONSTRAINT members_status_check
        CHECK (status IN ('subscribed', 'pending', 'unsubscribed', 'cleaned', 'bounced', 'complained'));

-- New functions (as 0.2.0's install script defines them).
CREATE FUNCTION listsync.allow_function("function" regprocedure) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'allow_function_wrapper';
CREATE FUNCTION listsync.disallow_function("function" regprocedure) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'disallow_function_wrapper';
CREATE FUNCTION listsync.grant_usage("connection" text, "role" text) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'grant_usage_wrapper';
CREATE FUNCTION listsync.revoke_usage("connection" text, "role" text) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'revoke_usage_wrapper';
-- create_connection gains if_not_exists.
DROP FUNCTION listsync.create_connection(text, text, jsonb, jsonb);
CREATE FUNCTION listsync.create_connection("name" text, "provider" text, "settings" jsonb DEFAULT '{}',
                                           "secrets" jsonb DEFAULT '{}', "if_not_exists" boolean DEFAULT false)
RETURNS bigint LANGUAGE c AS 'MODULE_PATHNAME', 'create_connection_wrapper';
CREATE FUNCTION listsync.rename_filter("name" text, "new_name" text) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'rename_filter_wrapper';
CREATE FUNCTION listsync.rename_connection("name" text, "new_name" text) RETURNS void
LANGUAGE c AS 'MODULE_PATHNAME', 'rename_connection_wrapper';
CREATE FUNCTION listsync.alter_binding("id" bigint, "fields" jsonb DEFAULT NULL, "tags" text[] DEFAULT NULL,
                                       "on_leave" text DEFAULT NULL, "new_member_status" text DEFAULT NULL)
RETURNS void LANGUAGE c AS 'MODULE_PATHNAME', 'alter_binding_wrapper';
-- dry_run gains only_address and max_rows.
DROP FUNCTION listsync.dry_run(bigint);
CREATE FUNCTION listsync.dry_run("id" bigint, "only_address" text DEFAULT NULL, "max_rows" integer DEFAULT NULL)
RETURNS TABLE ("address" text, "operation" text, "fields" jsonb, "reason" text)
LANGUAGE c AS 'MODULE_PATHNAME', 'dry_run_wrapper';
CREATE FUNCTION listsync.explain("binding" bigint, "address" text) RETURNS jsonb
LANGUAGE c AS 'MODULE_PATHNAME', 'explain_wrapper';
CREATE FUNCTION listsync.confirm_restore() RETURNS void STRICT
LANGUAGE c AS 'MODULE_PATHNAME', 'confirm_restore_wrapper';
CREATE FUNCTION listsync.check_setup() RETURNS boolean STRICT
LANGUAGE c AS 'MODULE_PATHNAME', 'check_setup_wrapper';
CREATE FUNCTION listsync.worker_registry() RETURNS TABLE (
    database oid, pid integer, started_at_ms bigint, last_cycle_at_ms bigint, cycles bigint,
    last_error_at_ms bigint, last_error text) STRICT
LANGUAGE c AS 'MODULE_PATHNAME', 'worker_registry_wrapper';

-- The database workers running now, from the launcher's shared registry (empty without the
-- preload). For whoever administers pg_listsync: last_error carries provider text.
CREATE VIEW listsync.workers AS
SELECT d.datname                                              AS database,
       w.pid,
       pg_catalog.to_timestamp(w.started_at_ms / 1000.0)                      AS started_at,
       pg_catalog.to_timestamp(nullif(w.last_cycle_at_ms, 0) / 1000.0)        AS last_cycle_at,
       w.cycles,
       pg_catalog.to_timestamp(nullif(w.last_error_at_ms, 0) / 1000.0)        AS last_error_at,
       w.last_error
  FROM listsync.worker_registry() w
  LEFT JOIN pg_catalog.pg_database d ON d.oid = w.database;
REVOKE ALL ON listsync.workers FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION listsync.worker_registry() FROM PUBLIC;
GRANT SELECT ON listsync.workers TO listsync_admin;
GRANT EXECUTE ON FUNCTION listsync.worker_registry() TO listsync_admin;

SELECT listsync.check_setup();

-- Cumulative delivery counters per binding, added to by the worker as it records each cycle
-- (one row per binding, one statement per cycle): what listsync.stats and listsync.metrics()
-- read. Not dumped: a restored copy counts from zero.
CREATE TABLE listsync.counters (
    binding_id bigint PRIMARY KEY REFERENCES listsync.bindings (id) ON DELETE CASCADE,
    added      bigint NOT NULL DEFAULT 0,
    updated    bigint NOT NULL DEFAULT 0,
    removed    bigint NOT NULL DEFAULT 0,
    erased     bigint NOT NULL DEFAULT 0,
    refused    bigint NOT NULL DEFAULT 0,
    failed     bigint NOT NULL DEFAULT 0,
    retried    bigint NOT NULL DEFAULT 0,
    throttled  bigint NOT NULL DEFAULT 0,
    since      timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON listsync.counters FROM PUBLIC;

-- Cumulative counters per binding (each role sees its own bindings): items added, updated,
-- removed and erased at the provider, refused by it (consent), failed for good, retried, and
-- cycles held back by the provider's rate limit.
CREATE VIEW listsync.stats AS
SELECT b.id AS binding, b.filter_name AS filter, c.name AS connection, c.provider,
       coalesce(k.added, 0) AS added, coalesce(k.updated, 0) AS updated,
       coalesce(k.removed, 0) AS removed, coalesce(k.erased, 0) AS erased,
       coalesce(k.refused, 0) AS refused, coalesce(k.failed, 0) AS failed,
       coalesce(k.retried, 0) AS retried, coalesce(k.throttled, 0) AS throttled,
       k.since
  FROM listsync.bindings b
  JOIN listsync.connections c ON c.id = b.connection_id
  LEFT JOIN listsync.counters k ON k.binding_id = b.id
 WHERE pg_catalog.pg_has_role(b.owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE');
GRANT SELECT ON listsync.stats TO PUBLIC;

-- The counters and the status gauges in Prometheus' text exposition format, for a scraper
-- (postgres_exporter's custom queries, or any job running SELECT listsync.metrics()).
CREATE FUNCTION listsync.metrics() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $metrics$
WITH bindings AS (
    SELECT s.*, st.pending, st.members, st.dead_letters,
           coalesce(extract(epoch FROM st.oldest_pending_age), 0) AS lag,
           format('database="%s",binding="%s",filter="%s",connection="%s",provider="%s"',
                  replace(replace(current_database(), E'\\', E'\\\\'), '"', E'\\"'), s.binding,
                  replace(replace(replace(s.filter, E'\\', E'\\\\'), '"', E'\\"'), E'\n', E'\\n'),
                  replace(replace(replace(s.connection, E'\\', E'\\\\'), '"', E'\\"'), E'\n', E'\\n'),
                  s.provider) AS labels
      FROM listsync.stats s JOIN listsync.status st ON st.binding = s.binding
), samples (metric, kind, help, labels, value) AS (
    SELECT 'listsync_items_total', 'counter', 'Items the worker recorded, by outcome at the provider.',
           b.labels || format(',outcome="%s"', o.outcome), o.value::numeric
      FROM bindings b,
           LATERAL (VALUES ('added', b.added), ('updated', b.updated), ('removed', b.removed),
                           ('erased', b.erased), ('refused', b.refused), ('failed', b.failed),
                           ('retried', b.retried)) AS o(outcome, value)
    UNION ALL
    SELECT 'listsync_throttled_total', 'counter', 'Delivery cycles the provider held back (429, Retry-After).',
           labels, throttled FROM bindings
    UNION ALL
    SELECT 'listsync_pending', 'gauge', 'Changes waiting in the outbox.', labels, pending FROM bindings
    UNION ALL
    SELECT 'listsync_oldest_pending_seconds', 'gauge', 'Age of the oldest waiting change.', labels, round(lag::numeric, 3) FROM bindings
    UNION ALL
    SELECT 'listsync_members', 'gauge', 'Members recorded as subscribed or pending.', labels, members FROM bindings
    UNION ALL
    SELECT 'listsync_dead_letters', 'gauge', 'Items refused for good, waiting for retry_dead_letters.', labels, dead_letters FROM bindings
)
SELECT coalesce(string_agg(block, '' ORDER BY metric), '')
  FROM (SELECT metric,
               format(E'# HELP %s %s\n# TYPE %s %s\n', metric, min(help), metric, min(kind))
               || string_agg(format(E'%s{%s} %s\n', metric, labels, value), '' ORDER BY labels) AS block
          FROM samples GROUP BY metric) blocks
$metrics$;
