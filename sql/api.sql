-- pg_listsync: views and the DDL event trigger (the functions are defined by the Rust code).

-- One row per binding: what it syncs where, whether it works, and how far behind it is.
CREATE VIEW listsync.status AS
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

-- Items a provider refused for good, with its words. listsync.retry_dead_letters() retries them.
CREATE VIEW listsync.dead_letters AS
SELECT d.binding_id AS binding, b.filter_name AS filter, c.name AS connection, d.address, d.operation,
       d.attempts, d.error, d.first_failed_at, d.last_failed_at
  FROM listsync.dead_letter_items d
  JOIN listsync.bindings b ON b.id = d.binding_id
  JOIN listsync.connections c ON c.id = b.connection_id
 WHERE pg_catalog.pg_has_role(b.owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE');

-- Recent provider calls (kept for listsync.deliveries_retention).
CREATE VIEW listsync.deliveries AS
SELECT l.id, l.at, c.name AS connection, l.binding_id AS binding, l.operation, l.request,
       l.http_status, l.duration_ms, l.outcome, l.message
  FROM listsync.delivery_log l
  LEFT JOIN listsync.connections c ON c.id = l.connection_id
  LEFT JOIN listsync.bindings b ON b.id = l.binding_id
 WHERE pg_catalog.pg_has_role(b.owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE');

-- Connections without their secrets: those a role owns or may use (all, to listsync_admin).
CREATE VIEW listsync.connection_list AS
SELECT id, name, provider, settings, state, state_reason, throttled_until, owner, created_at
  FROM listsync.connections c
 WHERE pg_catalog.pg_has_role(c.owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE')
    OR EXISTS (SELECT FROM listsync.connection_usage u
                WHERE u.connection_id = c.id
                  AND (u.grantee::oid = 0 OR pg_catalog.pg_has_role(u.grantee, 'USAGE')));

GRANT SELECT ON listsync.status, listsync.dead_letters, listsync.deliveries, listsync.connection_list TO PUBLIC;

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

-- Filters and bindings are readable by every role, each role seeing its own rows (all of them
-- to listsync_admin): a binding's errors carry provider text. The extension's own code runs as
-- the superuser owning these tables, which row-level security does not restrict.
GRANT SELECT ON listsync.filters, listsync.bindings TO PUBLIC;
ALTER TABLE listsync.filters ENABLE ROW LEVEL SECURITY;
ALTER TABLE listsync.bindings ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_rows ON listsync.filters FOR SELECT
    USING (pg_catalog.pg_has_role(owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE'));
CREATE POLICY own_rows ON listsync.bindings FOR SELECT
    USING (pg_catalog.pg_has_role(owner, 'USAGE') OR pg_catalog.pg_has_role('listsync_admin', 'USAGE'));

-- DROP TABLE ... CASCADE (or DROP COLUMN ... CASCADE) takes the filter and binding views with
-- it: the bindings they served become visibly inactive instead of failing later.
CREATE FUNCTION listsync._on_sql_drop() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF to_regclass('listsync.bindings') IS NULL THEN
        RETURN;  -- the extension itself is being dropped
    END IF;
    WITH causes AS (
        SELECT b.id, 1 AS rank, format('table %s was dropped', d.object_identity) AS reason
          FROM pg_event_trigger_dropped_objects() d
          JOIN listsync.bindings b ON d.object_type = 'table' AND d.objid = b.source::oid
        UNION ALL
        SELECT b.id, 2, format('its view %s was dropped', d.object_identity)
          FROM pg_event_trigger_dropped_objects() d
          JOIN listsync.bindings b ON d.object_type = 'view' AND d.schema_name = 'listsync'
           AND d.object_name IN ('binding:' || b.id, 'filter:' || b.filter_name)
    ), dropped AS (
        SELECT DISTINCT ON (id) id, reason FROM causes ORDER BY id, rank
    ), deactivated AS (
        UPDATE listsync.bindings b SET state = 'inactive', state_reason = dropped.reason
          FROM dropped WHERE b.id = dropped.id AND b.state <> 'inactive'
        RETURNING b.id
    )
    DELETE FROM listsync.outbox WHERE binding_id IN (SELECT id FROM deactivated);
    DELETE FROM listsync.filters f
     USING pg_event_trigger_dropped_objects() d
     WHERE d.object_type = 'view' AND d.schema_name = 'listsync' AND d.object_name = 'filter:' || f.name;
END
$$;
CREATE EVENT TRIGGER listsync_sql_drop ON sql_drop EXECUTE FUNCTION listsync._on_sql_drop();

-- Says at once (a WARNING with the fix) when nothing recorded here would ever be delivered.
SELECT listsync.check_setup();
