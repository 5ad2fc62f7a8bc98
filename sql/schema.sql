-- pg_listsync catalog. Everything here is owned by the role that ran CREATE EXTENSION; other
-- roles reach it only through the functions and views of api.sql.
--
-- Config tables (connections, filters, bindings, and the state that says what was delivered)
-- are registered with pg_extension_config_dump so that pg_dump/restore keeps them.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'listsync_admin') THEN
        CREATE ROLE listsync_admin NOLOGIN;
    END IF;
END
$$;
COMMENT ON ROLE listsync_admin IS
    'pg_listsync administrators: may manage connections and read provider secrets';

-- A provider account: which API, how to reach it, and whether it currently works.
CREATE TABLE listsync.connections (
    id            bigserial PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    provider      text NOT NULL,
    settings      jsonb NOT NULL DEFAULT '{}',
    state         text NOT NULL DEFAULT 'ok' CHECK (state IN ('ok', 'error')),
    state_reason  text,
    -- A provider that asked us to slow down (429, Retry-After) is not called before this time.
    throttled_until timestamptz,
    owner         regrole NOT NULL DEFAULT current_user::regrole,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Who may bind filters to a connection besides its owner and listsync_admin, as USAGE on a
-- foreign server (grantee '-', the invalid role, is PUBLIC).
CREATE TABLE listsync.connection_usage (
    connection_id bigint NOT NULL REFERENCES listsync.connections (id) ON DELETE CASCADE,
    grantee       regrole NOT NULL,
    granted_by    regrole NOT NULL,
    granted_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (connection_id, grantee)
);

-- Functions that are not built in but that an administrator allowed in filters and mapped
-- fields (listsync.allow_function): they run in every writer's transaction, as the writer.
CREATE TABLE listsync.allowed_functions (
    function   regprocedure PRIMARY KEY,
    allowed_by regrole NOT NULL,
    allowed_at timestamptz NOT NULL DEFAULT now()
);

-- Secrets live apart so that no view, no join and no default privilege ever reaches them.
CREATE TABLE listsync.connection_secrets (
    connection_id bigint PRIMARY KEY REFERENCES listsync.connections (id) ON DELETE CASCADE,
    secrets       jsonb NOT NULL DEFAULT '{}'
);

-- A saved filter. The predicate's truth is the view listsync."filter:<name>": PostgreSQL keeps
-- it right through column renames and refuses to drop or retype what it reads (semantics 9).
CREATE TABLE listsync.filters (
    id             bigserial PRIMARY KEY,
    name           text NOT NULL UNIQUE,
    source         regclass NOT NULL,
    email_column   name NOT NULL,
    -- Where a binding's provider can hold contacts without an email (Google Contacts), rows
    -- without a valid email are identified by this phone number ('tel:+4930...').
    phone_column   name,
    predicate      text NOT NULL,
    conditions     jsonb,
    time_dependent boolean NOT NULL DEFAULT false,
    owner          regrole NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- A filter bound to a list at a provider.
CREATE TABLE listsync.bindings (
    id                bigserial PRIMARY KEY,
    filter_id         bigint REFERENCES listsync.filters (id) ON DELETE SET NULL,
    filter_name       text NOT NULL,
    connection_id     bigint NOT NULL REFERENCES listsync.connections (id),
    source            regclass,
    list_id           text,
    list_name         text,
    -- Provider-side set-up the worker has done for this binding (tag ids, field ids, ...).
    remote            jsonb NOT NULL DEFAULT '{}',
    fields            jsonb NOT NULL DEFAULT '{}',
    tags              text[] NOT NULL DEFAULT '{}',
    on_leave          text NOT NULL DEFAULT 'remove'
                      CHECK (on_leave IN ('remove', 'archive', 'unsubscribe', 'delete', 'keep')),
    new_member_status text NOT NULL DEFAULT 'subscribed'
                      CHECK (new_member_status IN ('subscribed', 'pending')),
    state             text NOT NULL DEFAULT 'active'
                      CHECK (state IN ('active', 'paused', 'error', 'inactive')),
    state_reason      text,
    owner             regrole NOT NULL,
    last_success_at   timestamptz,
    last_error_at     timestamptz,
    last_error        text,
    last_reconciled_at timestamptz,
    -- Rows the filter matches whose email is NULL or not an address (never sent); recounted by
    -- the worker when the outbox holds the pair (binding, '').
    skipped_invalid   bigint NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ON listsync.bindings (source);

-- The outbox: which (binding, address) pairs are dirty (semantics 3: level, not edge).
-- `generation` grows with every capture of the pair, so a worker that delivered the state it
-- read can tell whether a newer change arrived meanwhile.
CREATE TABLE listsync.outbox (
    binding_id         bigint NOT NULL,
    address            text NOT NULL,
    generation         bigint NOT NULL DEFAULT 1,
    dirtied_at         timestamptz NOT NULL DEFAULT now(),
    not_before         timestamptz NOT NULL DEFAULT '-infinity',
    claimed_generation bigint,
    lease_until        timestamptz,
    attempts           integer NOT NULL DEFAULT 0,
    last_error         text,
    PRIMARY KEY (binding_id, address)
);
-- The claim reads each servable binding's due pairs in due order.
CREATE INDEX outbox_due ON listsync.outbox (binding_id, not_before);

-- What the worker recorded at the provider after each delivery: the remote state the next
-- change is compared with.
CREATE TABLE listsync.members (
    binding_id  bigint NOT NULL REFERENCES listsync.bindings (id) ON DELETE CASCADE,
    address     text NOT NULL,
    status      text NOT NULL
                CHECK (status IN ('subscribed', 'pending', 'unsubscribed', 'cleaned',
                                  'bounced', 'complained')),
    remote_id   text,
    fields      jsonb NOT NULL DEFAULT '{}',
    synced_at   timestamptz NOT NULL DEFAULT now(),
    -- false after listsync.resync(id, full => true): send it again even if nothing changed.
    verified    boolean NOT NULL DEFAULT true,
    PRIMARY KEY (binding_id, address)
);

-- GDPR erasures requested for an address and not yet carried out at a binding's provider.
CREATE TABLE listsync.erasures (
    binding_id   bigint NOT NULL REFERENCES listsync.bindings (id) ON DELETE CASCADE,
    address      text NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (binding_id, address)
);

-- Items the provider refused for good, with its words. A new change of the pair retries it.
CREATE TABLE listsync.dead_letter_items (
    binding_id      bigint NOT NULL REFERENCES listsync.bindings (id) ON DELETE CASCADE,
    address         text NOT NULL,
    operation       text NOT NULL,
    attempts        integer NOT NULL,
    error           text NOT NULL,
    first_failed_at timestamptz NOT NULL DEFAULT now(),
    last_failed_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (binding_id, address)
);

-- Addresses never to be sent anywhere (semantics 6), whatever the filters say.
CREATE TABLE listsync.suppressions (
    address    text PRIMARY KEY,
    reason     text,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- Recent provider calls, for operators. Trimmed by the worker (listsync.deliveries_retention).
CREATE TABLE listsync.delivery_log (
    id            bigserial PRIMARY KEY,
    at            timestamptz NOT NULL DEFAULT now(),
    connection_id bigint,
    binding_id    bigint,
    operation     text NOT NULL,
    request       text NOT NULL,
    items         integer NOT NULL DEFAULT 0,
    http_status   integer,
    duration_ms   double precision,
    outcome       text NOT NULL,
    message       text
);
CREATE INDEX ON listsync.delivery_log (at);

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

-- Where this catalog's deliveries belong: the cluster (system identifier) and the database the
-- first binding was made in. A restored dump or a cloned database finds other values here and
-- delivers nothing until listsync.confirm_restore(): a staging copy of production must not
-- write to production's lists with production's keys. Written by the first
-- bind_filter_to_list and by confirm_restore, never by CREATE EXTENSION, so that a restore
-- brings the original's row with it.
CREATE TABLE listsync.instance (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    system_identifier text NOT NULL,
    database          oid NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);

SELECT pg_catalog.pg_extension_config_dump('listsync.connections', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.connections_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.connection_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.connection_usage', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.allowed_functions', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.filters', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.filters_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.bindings', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.bindings_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.outbox', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.members', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.erasures', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.dead_letter_items', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.suppressions', '');
SELECT pg_catalog.pg_extension_config_dump('listsync.instance', '');

REVOKE ALL ON ALL TABLES IN SCHEMA listsync FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA listsync FROM PUBLIC;
GRANT USAGE ON SCHEMA listsync TO PUBLIC;
GRANT SELECT ON listsync.connection_secrets TO listsync_admin;
GRANT SELECT ON listsync.allowed_functions TO PUBLIC;
