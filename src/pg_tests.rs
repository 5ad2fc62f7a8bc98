//! In-database tests (`cargo pgrx test`): each runs in a transaction that is rolled back, so
//! they see the outbox as the capture trigger fills it statement by statement; nothing here
//! ever commits, so the worker never sees it. Behaviour that needs commits (rollback, COPY,
//! prepared transactions, the worker) is in `tests/`.

#[pgrx::pg_schema]
mod tests {
    use pgrx::pg_sys;
    use pgrx::pg_sys::errcodes::PgSqlErrorCode;
    use pgrx::pg_sys::panic::CaughtError;
    use pgrx::prelude::*;

    // -----------------------------------------------------------------------------------------
    // Helpers

    pub(crate) fn run(sql: &str) {
        Spi::run(sql).unwrap_or_else(|e| panic!("{sql}: {e}"));
    }

    pub(crate) fn value<T: FromDatum + IntoDatum>(sql: &str) -> Option<T> {
        crate::query::optional::<T>(sql, &[]).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    pub(crate) fn count(sql: &str) -> i64 {
        value::<i64>(sql).unwrap_or(0)
    }

    /// Runs `sql` in a subtransaction (as PL/pgSQL's EXCEPTION blocks do) and returns the
    /// SQLSTATE and message of the error it raised, or None.
    pub(crate) fn error_of(sql: &str) -> Option<(PgSqlErrorCode, String, Option<String>)> {
        // SAFETY: the PL/pgSQL exception-block pattern: the subtransaction is released or rolled
        // back before returning, and the memory context and resource owner restored.
        unsafe {
            let context = pg_sys::CurrentMemoryContext;
            let owner = pg_sys::CurrentResourceOwner;
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            let outcome = PgTryBuilder::new(|| {
                Spi::run(sql).expect("SPI");
                None
            })
            .catch_others(|caught| {
                let report = match &caught {
                    CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => r,
                    CaughtError::RustPanic { ereport, .. } => ereport,
                };
                Some((
                    report.sql_error_code(),
                    report.message().to_string(),
                    report.hint().map(str::to_string),
                ))
            })
            .execute();
            if outcome.is_some() {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
            } else {
                pg_sys::ReleaseCurrentSubTransaction();
            }
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
            outcome
        }
    }

    pub(crate) fn expect_error(sql: &str, code: PgSqlErrorCode, message_part: &str) -> String {
        match error_of(sql) {
            Some((got, message, _)) => {
                assert_eq!(got, code, "{sql}: {message}");
                assert!(
                    message.contains(message_part),
                    "{sql}: expected \"{message_part}\" in \"{message}\""
                );
                message
            }
            None => panic!("{sql}: expected an error {code:?}"),
        }
    }

    pub(crate) fn contacts() {
        run("CREATE TABLE contacts (id serial PRIMARY KEY, email text, first_name text, last_name text,
                                    city text, ltv numeric DEFAULT 0, last_seen_at timestamptz,
                                    is_deleted boolean NOT NULL DEFAULT false, birthday date, tags text[])");
        run("SELECT listsync.create_connection('hook', 'webhook', '{\"url\": \"https://hooks.example/x\"}',
                                               '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}')");
    }

    /// A bound filter `vip` (Moscow, ltv > 1000) mapping FNAME; returns the binding id.
    fn vip_binding() -> i64 {
        contacts();
        run(
            "SELECT listsync.create_filter('vip', 'contacts', $$ city = 'Moscow' AND ltv > 1000 AND NOT is_deleted $$)",
        );
        let id = value::<i64>("SELECT listsync.bind_filter_to_list('vip', 'hook', fields => '{\"FNAME\": \"first_name\"}', backfill => false)")
            .unwrap();
        // Binding always queues a recount of skipped rows; start from an empty outbox.
        clear_outbox();
        id
    }

    pub(crate) fn dirty(binding: i64) -> Vec<String> {
        value::<Vec<String>>(&format!(
            "SELECT coalesce(array_agg(address ORDER BY address), '{{}}') FROM listsync.outbox WHERE binding_id = {binding}"
        ))
        .unwrap_or_default()
    }

    pub(crate) fn clear_outbox() {
        run("DELETE FROM listsync.outbox");
    }

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    // -----------------------------------------------------------------------------------------
    // Filters: what is accepted and what is refused

    #[pg_test]
    fn normalize_email_trims_lowercases_and_rejects() {
        assert_eq!(
            value::<String>("SELECT listsync.normalize_email('  Ann@Example.COM ')"),
            Some("ann@example.com".into())
        );
        assert_eq!(
            value::<String>("SELECT listsync.normalize_email('not an address')"),
            None
        );
    }

    #[pg_test]
    fn predicates_are_compiled_like_check_constraints() {
        contacts();
        run(
            "SELECT listsync.create_filter('vip', 'contacts', $$ city = 'Moscow' AND ltv > 1000 $$)",
        );
        assert_eq!(
            value::<String>("SELECT predicate FROM listsync.filters WHERE name = 'vip'"),
            Some("((city = 'Moscow'::text) AND (ltv > (1000)::numeric))".into())
        );
        assert_eq!(
            value::<bool>("SELECT time_dependent FROM listsync.filters WHERE name = 'vip'"),
            Some(false)
        );
    }

    #[pg_test]
    fn bad_predicates_are_refused_with_their_sqlstate() {
        contacts();
        use PgSqlErrorCode::*;
        let create = |predicate: &str| {
            format!("SELECT listsync.create_filter('f', 'contacts', $p${predicate}$p$)")
        };
        expect_error(
            &create("city = "),
            ERRCODE_SYNTAX_ERROR,
            "filter \"f\": syntax error",
        );
        expect_error(
            &create("citi = 'x'"),
            ERRCODE_UNDEFINED_COLUMN,
            "filter \"f\": column \"citi\" does not exist",
        );
        expect_error(
            &create("ltv + 1"),
            ERRCODE_DATATYPE_MISMATCH,
            "must be type boolean",
        );
        expect_error(
            &create("city IN (SELECT 'x')"),
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "cannot use subquery in filter predicate",
        );
        expect_error(
            &create("count(*) > 1"),
            ERRCODE_GROUPING_ERROR,
            "aggregate functions are not allowed in filter predicates",
        );
        expect_error(
            &create("row_number() OVER () > 1"),
            ERRCODE_WINDOWING_ERROR,
            "window functions are not allowed",
        );
        expect_error(
            &create("generate_series(1, 2) > 1"),
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "set-returning functions are not allowed",
        );
        expect_error(
            &create("random() > 0.5"),
            ERRCODE_INVALID_OBJECT_DEFINITION,
            "volatile functions",
        );
        expect_error(
            &create("ltv > $1"),
            ERRCODE_UNDEFINED_PARAMETER,
            "there is no parameter $1",
        );
        expect_error(
            &create("true; DROP TABLE contacts"),
            ERRCODE_SYNTAX_ERROR,
            "single boolean expression",
        );
        expect_error(
            &create("true UNION SELECT true"),
            ERRCODE_SYNTAX_ERROR,
            "single boolean expression",
        );
        expect_error(
            &create("true ORDER BY 1"),
            ERRCODE_SYNTAX_ERROR,
            "single boolean expression",
        );
        expect_error(
            &create("xmin::text <> ''"),
            ERRCODE_INVALID_COLUMN_REFERENCE,
            "system column \"xmin\"",
        );
        expect_error(
            &create("contacts IS NOT NULL"),
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "whole-row references",
        );
        assert_eq!(count("SELECT count(*) FROM listsync.filters"), 0);
    }

    #[pg_test]
    fn filters_need_a_key_a_text_email_and_a_unique_name() {
        contacts();
        use PgSqlErrorCode::*;
        run("CREATE TABLE keyless (email text)");
        expect_error(
            "SELECT listsync.create_filter('k', 'keyless', 'true')",
            ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "has no primary key",
        );
        expect_error(
            "SELECT listsync.create_filter('m', 'contacts', 'true', email_column => 'mail')",
            ERRCODE_UNDEFINED_COLUMN,
            "column \"mail\" of table public.contacts does not exist",
        );
        expect_error(
            "SELECT listsync.create_filter('m', 'contacts', 'true', email_column => 'ltv')",
            ERRCODE_DATATYPE_MISMATCH,
            "email column \"ltv\" is of type numeric",
        );
        run("SELECT listsync.create_filter('dup', 'contacts', 'true')");
        expect_error(
            "SELECT listsync.create_filter('dup', 'contacts', 'true')",
            ERRCODE_DUPLICATE_OBJECT,
            "filter \"dup\" already exists",
        );
        run("CREATE VIEW contact_view AS SELECT * FROM contacts");
        expect_error(
            "SELECT listsync.create_filter('v', 'contact_view', 'true')",
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "is not a table",
        );
        expect_error(
            "SELECT listsync.create_filter('', 'contacts', 'true')",
            ERRCODE_INVALID_NAME,
            "invalid filter name",
        );
    }

    #[pg_test]
    fn functions_an_ordinary_role_wrote_are_refused() {
        contacts();
        run("CREATE ROLE listsync_test_plain NOLOGIN");
        run("CREATE FUNCTION evil(text) RETURNS boolean LANGUAGE sql STABLE AS 'SELECT true'");
        run("ALTER FUNCTION evil(text) OWNER TO listsync_test_plain");
        expect_error(
            "SELECT listsync.create_filter('f', 'contacts', 'evil(city)')",
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "function public.evil(text) is not built in",
        );
    }

    #[pg_test]
    fn stable_functions_make_a_filter_time_dependent() {
        contacts();
        run(
            "SELECT listsync.create_filter('recent', 'contacts', $$ last_seen_at > now() - interval '30 days' $$)",
        );
        assert_eq!(
            value::<bool>("SELECT time_dependent FROM listsync.filters WHERE name = 'recent'"),
            Some(true)
        );
    }

    #[pg_test]
    fn json_conditions_compile_to_the_same_form() {
        contacts();
        run(r#"SELECT listsync.create_filter('vip', 'contacts',
                 '{"all": [{"column": "city", "op": "=", "value": "Moscow"}, {"column": "ltv", "op": ">", "value": 1000},
                           {"not": {"column": "is_deleted", "op": "=", "value": true}}]}'::jsonb)"#);
        let predicate =
            value::<String>("SELECT predicate FROM listsync.filters WHERE name = 'vip'").unwrap();
        assert_eq!(
            predicate,
            "((city = 'Moscow'::text) AND (ltv > '1000'::numeric) AND (NOT (is_deleted = true)))"
        );
        run(r#"SELECT listsync.create_filter('bday', 'contacts',
                 '{"column": "birthday", "op": "within_next_days", "value": 7, "annual": true}'::jsonb)"#);
        assert_eq!(
            value::<bool>("SELECT time_dependent FROM listsync.filters WHERE name = 'bday'"),
            Some(true)
        );
    }

    #[pg_test]
    fn json_conditions_are_immune_to_injection() {
        contacts();
        run(
            "INSERT INTO contacts (email, city) VALUES ('a@x.io', 'x'' OR true --'), ('b@x.io', 'plain')",
        );
        // Values with quotes, backslashes, comment markers and unicode are data, not SQL.
        let hostile = r#"x' OR true --"#;
        run(&format!(
            r#"SELECT listsync.create_filter('h', 'contacts', '{{"column": "city", "op": "=", "value": {}}}'::jsonb)"#,
            serde_json::to_string(hostile).unwrap().replace('\'', "''")
        ));
        let preview = value::<pgrx::JsonB>("SELECT listsync.preview_filter('h')")
            .unwrap()
            .0;
        assert_eq!(
            preview["matching_rows"], 1,
            "the hostile value matched as data, one row, not all: {preview}"
        );
        for (name, city) in [
            ("q", r#"it's"#),
            ("b", r#"back\slash\'"#),
            ("u", "Москва 🚀"),
            ("s", "'; DROP TABLE contacts; --"),
        ] {
            let json = serde_json::json!({"column": "city", "op": "=", "value": city})
                .to_string()
                .replace('\'', "''");
            run(&format!(
                "SELECT listsync.create_filter('{name}', 'contacts', '{json}'::jsonb)"
            ));
            run(&format!(
                "INSERT INTO contacts (email, city) VALUES ('{name}@x.io', {})",
                listsync_core::conditions::escape_literal(city)
            ));
            let preview =
                value::<pgrx::JsonB>(&format!("SELECT listsync.preview_filter('{name}')"))
                    .unwrap()
                    .0;
            assert_eq!(preview["matching_rows"], 1, "{name}: {preview}");
        }
        assert_eq!(
            count("SELECT count(*) FROM contacts"),
            6,
            "the table survived"
        );
        let error = expect_error(
            r#"SELECT listsync.create_filter('c', 'contacts', '{"column": "city\" = city OR \"city", "op": "=", "value": 1}'::jsonb)"#,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "does not exist",
        );
        assert!(error.contains("$.column"), "{error}");
        expect_error(
            r#"SELECT listsync.create_filter('o', 'contacts', '{"column": "city", "op": "= 1 OR", "value": 1}'::jsonb)"#,
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "unknown operator",
        );
    }

    #[pg_test]
    fn a_json_tree_passed_as_text_gets_a_hint() {
        contacts();
        let error =
            error_of(r#"SELECT listsync.create_filter('j', 'contacts', '{"all": []}')"#).unwrap();
        assert!(error.2.unwrap_or_default().contains("::jsonb"));
    }

    #[pg_test]
    fn preview_counts_rows_addresses_and_invalid_ones() {
        contacts();
        run("INSERT INTO contacts (email, city, ltv) VALUES ('a@x.io', 'Moscow', 5000), ('A@X.IO ', 'Moscow', 5000),
                    (NULL, 'Moscow', 5000), ('nope', 'Moscow', 5000), ('b@x.io', 'Paris', 5000)");
        run("SELECT listsync.create_filter('vip', 'contacts', $$ city = 'Moscow' $$)");
        let preview = value::<pgrx::JsonB>("SELECT listsync.preview_filter('vip', 2)")
            .unwrap()
            .0;
        assert_eq!(preview["matching_rows"], 4);
        assert_eq!(preview["addresses"], 1);
        assert_eq!(preview["invalid_addresses"], 2);
        assert_eq!(preview["sample"].as_array().unwrap().len(), 2);
    }

    /// The values a CHECK constraint of the catalog allows, sorted.
    fn allowed_by_check(table: &str, column: &str) -> Vec<String> {
        value::<Vec<String>>(&format!(
            "SELECT array_agg(m[1] ORDER BY m[1]) FROM pg_constraint c,
                    regexp_matches(pg_get_constraintdef(c.oid), '''([^'']*)''', 'g') m
              WHERE c.conrelid = 'listsync.{table}'::regclass AND c.conname = '{table}_{column}_check'"
        ))
        .unwrap_or_default()
    }

    fn sorted(values: impl IntoIterator<Item = &'static str>) -> Vec<String> {
        let mut values: Vec<String> = values.into_iter().map(str::to_string).collect();
        values.sort();
        values
    }

    /// The catalog's CHECK constraints and the Rust types that read the same columns name the
    /// same values, so neither can gain one the other refuses.
    #[pg_test]
    fn catalog_checks_allow_exactly_the_values_the_engine_reads() {
        use listsync_core::providers::{ConsentStatus, MemberStatus, OnLeave};
        assert_eq!(
            allowed_by_check("bindings", "on_leave"),
            sorted(OnLeave::ALL.map(OnLeave::as_str))
        );
        assert_eq!(
            allowed_by_check("bindings", "new_member_status"),
            sorted(MemberStatus::ALL.map(MemberStatus::as_str))
        );
        assert_eq!(
            allowed_by_check("members", "status"),
            sorted(
                MemberStatus::ALL
                    .map(MemberStatus::as_str)
                    .into_iter()
                    .chain(ConsentStatus::ALL.map(ConsentStatus::as_str))
            )
        );
    }

    // -----------------------------------------------------------------------------------------
    // Bindings

    #[pg_test]
    fn binding_validates_without_the_network() {
        contacts();
        use PgSqlErrorCode::*;
        run("SELECT listsync.create_filter('vip', 'contacts', 'true')");
        expect_error(
            "SELECT listsync.bind_filter_to_list('nope', 'hook')",
            ERRCODE_UNDEFINED_OBJECT,
            "filter \"nope\" does not exist",
        );
        expect_error(
            "SELECT listsync.bind_filter_to_list('vip', 'nope')",
            ERRCODE_UNDEFINED_OBJECT,
            "connection \"nope\" does not exist",
        );
        expect_error(
            "SELECT listsync.bind_filter_to_list('vip', 'hook', on_leave => 'vanish')",
            ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid on_leave",
        );
        expect_error(
            "SELECT listsync.bind_filter_to_list('vip', 'hook', new_member_status => 'maybe')",
            ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid new_member_status",
        );
        expect_error(
            r#"SELECT listsync.bind_filter_to_list('vip', 'hook', fields => '{"FNAME": "frist_name"}')"#,
            ERRCODE_UNDEFINED_COLUMN,
            "field \"FNAME\": filter \"vip\": column \"frist_name\" does not exist",
        );
        expect_error(
            r#"SELECT listsync.bind_filter_to_list('vip', 'hook', fields => '{"FNAME": "(SELECT 1)"}')"#,
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "subquery",
        );
        expect_error(
            r#"SELECT listsync.bind_filter_to_list('vip', 'hook', fields => '{"FNAME": 1}')"#,
            ERRCODE_INVALID_PARAMETER_VALUE,
            "expected a column name",
        );
        run(
            "SELECT listsync.create_connection('mc', 'mailchimp', '{\"audience_id\": \"a1\"}', '{\"api_key\": \"k-us1\"}')",
        );
        expect_error(
            r#"SELECT listsync.bind_filter_to_list('vip', 'mc', fields => '{"fname": "first_name"}')"#,
            ERRCODE_INVALID_PARAMETER_VALUE,
            "merge tags",
        );
        let id = value::<i64>(
            r#"SELECT listsync.bind_filter_to_list('vip', 'mc', fields => '{"FNAME": "first_name", "FULL": "first_name || '' '' || last_name"}',
                                                   tags => ARRAY['crm'], on_leave => 'archive', new_member_status => 'pending')"#,
        )
        .unwrap();
        assert_eq!(
            value::<String>(&format!(
                "SELECT list_name FROM listsync.bindings WHERE id = {id}"
            )),
            Some("vip (postgres)".into())
        );
        assert_eq!(
            value::<String>(&format!(
                "SELECT state FROM listsync.status WHERE binding = {id}"
            )),
            Some("active".into())
        );
    }

    #[pg_test]
    fn binding_needs_the_trigger_privilege() {
        contacts();
        run("SELECT listsync.create_filter('vip', 'contacts', 'true')");
        run("CREATE ROLE listsync_test_crm NOLOGIN");
        run("GRANT SELECT ON contacts TO listsync_test_crm");
        run("GRANT listsync_test_crm TO current_user");
        run("SELECT listsync.grant_usage('hook', 'listsync_test_crm')");
        run("SET LOCAL ROLE listsync_test_crm");
        let message = expect_error(
            "SELECT listsync.bind_filter_to_list('vip', 'hook')",
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "no TRIGGER privilege on table public.contacts",
        );
        assert!(message.contains("filter \"vip\""));
        run("RESET ROLE");
        run("GRANT TRIGGER ON contacts TO listsync_test_crm");
        run("SET LOCAL ROLE listsync_test_crm");
        let id = value::<i64>("SELECT listsync.bind_filter_to_list('vip', 'hook')").unwrap();
        run("RESET ROLE");
        assert_eq!(
            value::<String>(&format!(
                "SELECT owner::text FROM listsync.bindings WHERE id = {id}"
            )),
            Some("listsync_test_crm".into())
        );
    }

    #[pg_test]
    fn secrets_are_readable_by_no_ordinary_role() {
        contacts();
        run("CREATE ROLE listsync_test_reader NOLOGIN");
        run("GRANT listsync_test_reader TO current_user");
        run("SET LOCAL ROLE listsync_test_reader");
        use PgSqlErrorCode::*;
        expect_error(
            "SELECT * FROM listsync.connection_secrets",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied",
        );
        expect_error(
            "SELECT * FROM listsync.connections",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied",
        );
        expect_error(
            "SELECT listsync.test_connection('hook')",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to test a connection",
        );
        expect_error(
            "SELECT listsync.create_connection('x', 'webhook', '{\"url\": \"https://a.example\"}', '{\"signing_secret\": \"0123456789abcdefg\"}')",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to create a connection",
        );
        let visible =
            value::<String>("SELECT string_agg(t::text, ' ') FROM listsync.connection_list t")
                .unwrap_or_default();
        assert!(!visible.contains("whsec_"), "{visible}");
        let everywhere = value::<String>(
            "SELECT string_agg(s::text, ' ') FROM (SELECT * FROM listsync.status) s",
        )
        .unwrap_or_default();
        assert!(!everywhere.contains("whsec_"));
        run("RESET ROLE");
    }

    #[pg_test]
    fn the_capture_trigger_reads_only_what_bindings_read() {
        vip_binding();
        let columns = value::<String>(
            "SELECT string_agg(attname, ',' ORDER BY attname) FROM pg_trigger t
               JOIN pg_attribute a ON a.attrelid = t.tgrelid AND a.attnum = ANY(t.tgattr)
              WHERE t.tgname = 'listsync_capture'",
        );
        assert_eq!(
            columns,
            Some("city,email,first_name,id,is_deleted,ltv".into())
        );
    }

    // -----------------------------------------------------------------------------------------
    // Capture

    #[pg_test]
    fn entering_changing_and_leaving_mark_the_address() {
        let b = vip_binding();
        run(
            "INSERT INTO contacts (email, first_name, city, ltv) VALUES ('Ann@Example.com', 'Ann', 'Moscow', 5000), ('bob@x.io', 'Bob', 'Paris', 5000)",
        );
        assert_eq!(
            dirty(b),
            strings(&["ann@example.com"]),
            "insert: only the row that matches"
        );
        clear_outbox();
        run("UPDATE contacts SET last_seen_at = now()");
        assert_eq!(
            dirty(b),
            Vec::<String>::new(),
            "an unrelated column: nothing"
        );
        run("UPDATE contacts SET last_name = 'Lee' WHERE first_name = 'Ann'");
        assert_eq!(
            dirty(b),
            Vec::<String>::new(),
            "a column no binding reads: nothing"
        );
        run("UPDATE contacts SET ltv = 6000 WHERE first_name = 'Ann'");
        assert_eq!(
            dirty(b),
            Vec::<String>::new(),
            "a filtered column that keeps the row in: nothing"
        );
        run("UPDATE contacts SET first_name = 'Anna' WHERE first_name = 'Ann'");
        assert_eq!(
            dirty(b),
            strings(&["ann@example.com"]),
            "a mapped field of a member"
        );
        clear_outbox();
        run("UPDATE contacts SET city = 'Moscow' WHERE first_name = 'Bob'");
        assert_eq!(dirty(b), strings(&["bob@x.io"]), "entering");
        clear_outbox();
        run("UPDATE contacts SET first_name = 'Robert' WHERE city = 'Paris'");
        assert_eq!(dirty(b), Vec::<String>::new(), "rows outside stay outside");
        run("UPDATE contacts SET is_deleted = true WHERE first_name = 'Bob'");
        assert_eq!(dirty(b), strings(&["bob@x.io"]), "leaving");
        clear_outbox();
        run("DELETE FROM contacts WHERE first_name = 'Anna'");
        assert_eq!(dirty(b), strings(&["ann@example.com"]), "deleting a member");
        clear_outbox();
        run("DELETE FROM contacts");
        assert_eq!(dirty(b), Vec::<String>::new(), "deleting a non-member");
    }

    #[pg_test]
    fn an_email_change_marks_both_addresses() {
        let b = vip_binding();
        run(
            "INSERT INTO contacts (email, first_name, city, ltv) VALUES ('old@x.io', 'Ann', 'Moscow', 5000)",
        );
        clear_outbox();
        run("UPDATE contacts SET email = ' NEW@x.io' WHERE first_name = 'Ann'");
        assert_eq!(dirty(b), strings(&["new@x.io", "old@x.io"]));
        clear_outbox();
        run("UPDATE contacts SET email = 'New@X.io' WHERE first_name = 'Ann'");
        assert_eq!(
            dirty(b),
            Vec::<String>::new(),
            "the same address after normalization"
        );
    }

    #[pg_test]
    fn null_and_invalid_addresses_are_never_marked_only_counted() {
        let b = vip_binding();
        run(
            "INSERT INTO contacts (email, first_name, city, ltv) VALUES (NULL, 'N', 'Moscow', 5000), ('not-an-address', 'I', 'Moscow', 5000)",
        );
        assert_eq!(dirty(b), strings(&[""]), "only the recount marker");
        clear_outbox();
        run("UPDATE contacts SET email = 'fixed@x.io' WHERE first_name = 'I'");
        assert_eq!(dirty(b), strings(&["", "fixed@x.io"]));
    }

    #[pg_test]
    fn a_shared_address_is_marked_for_each_row_change() {
        let b = vip_binding();
        run(
            "INSERT INTO contacts (email, first_name, city, ltv) VALUES ('s@x.io', 'One', 'Moscow', 5000), ('S@x.io', 'Two', 'Moscow', 5000)",
        );
        assert_eq!(dirty(b), strings(&["s@x.io"]), "one pair for two rows");
        clear_outbox();
        run("UPDATE contacts SET city = 'Paris' WHERE first_name = 'One'");
        assert_eq!(
            dirty(b),
            strings(&["s@x.io"]),
            "the worker decides the address stays (row Two holds it)"
        );
    }

    #[pg_test]
    fn two_bindings_on_one_table_and_two_tables() {
        let vip = vip_binding();
        run("SELECT listsync.create_filter('paris', 'contacts', $$ city = 'Paris' $$)");
        let paris =
            value::<i64>("SELECT listsync.bind_filter_to_list('paris', 'hook', backfill => false)")
                .unwrap();
        run("CREATE TABLE leads (lead_id int PRIMARY KEY, mail text, stage text)");
        run(
            "SELECT listsync.create_filter('hot', 'leads', $$ stage = 'hot' $$, email_column => 'mail')",
        );
        let hot =
            value::<i64>("SELECT listsync.bind_filter_to_list('hot', 'hook', backfill => false)")
                .unwrap();
        clear_outbox();
        run(
            "INSERT INTO contacts (email, city, ltv) VALUES ('m@x.io', 'Moscow', 5000), ('p@x.io', 'Paris', 1)",
        );
        run("INSERT INTO leads VALUES (1, 'h@x.io', 'hot'), (2, 'c@x.io', 'cold')");
        assert_eq!(dirty(vip), strings(&["m@x.io"]));
        assert_eq!(dirty(paris), strings(&["p@x.io"]));
        assert_eq!(dirty(hot), strings(&["h@x.io"]));
        clear_outbox();
        run("UPDATE contacts SET city = 'Paris' WHERE email = 'm@x.io'");
        assert_eq!(dirty(vip), strings(&["m@x.io"]), "left vip");
        assert_eq!(dirty(paris), strings(&["m@x.io"]), "entered paris");
    }

    #[pg_test]
    fn multi_row_statements_upserts_and_views_capture() {
        let b = vip_binding();
        run(
            "INSERT INTO contacts (id, email, city, ltv) SELECT g, 'u' || g || '@x.io', 'Moscow', 5000 FROM generate_series(1, 100) g",
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM listsync.outbox WHERE binding_id = {b}"
            )),
            100
        );
        clear_outbox();
        run("INSERT INTO contacts (id, email, city, ltv) VALUES (1, 'u1@x.io', 'Paris', 1), (101, 'new@x.io', 'Moscow', 5000)
             ON CONFLICT (id) DO UPDATE SET city = EXCLUDED.city, ltv = EXCLUDED.ltv");
        assert_eq!(dirty(b), strings(&["new@x.io", "u1@x.io"]));
        clear_outbox();
        run("CREATE VIEW moscow AS SELECT * FROM contacts WHERE city = 'Moscow'");
        run("UPDATE moscow SET is_deleted = true WHERE id = 2");
        assert_eq!(dirty(b), strings(&["u2@x.io"]), "a write through a view");
    }

    #[pg_test]
    fn partitioned_tables_are_bound_at_the_parent() {
        run(
            "CREATE TABLE people (id int, region text, email text, PRIMARY KEY (id, region)) PARTITION BY LIST (region)",
        );
        run("CREATE TABLE people_eu PARTITION OF people FOR VALUES IN ('eu')");
        // A partition with another column order: its rows are converted to the parent's shape.
        run("CREATE TABLE people_us (email text, region text NOT NULL, id int NOT NULL)");
        run("ALTER TABLE people ATTACH PARTITION people_us FOR VALUES IN ('us')");
        contacts_connection_only();
        run("SELECT listsync.create_filter('all_people', 'people', $$ email LIKE '%@x.io' $$)");
        let b = value::<i64>(
            "SELECT listsync.bind_filter_to_list('all_people', 'hook', backfill => false)",
        )
        .unwrap();
        clear_outbox();
        run(
            "INSERT INTO people VALUES (1, 'eu', 'e@x.io'), (2, 'us', 'u@x.io'), (3, 'us', 'u@y.io')",
        );
        assert_eq!(dirty(b), strings(&["e@x.io", "u@x.io"]));
        clear_outbox();
        run("INSERT INTO people_us (id, region, email) VALUES (4, 'us', 'direct@x.io')");
        // Writes routed to a partition directly are flushed at the latest before commit.
        crate::capture::flush_pending().unwrap();
        assert_eq!(dirty(b), strings(&["direct@x.io"]));
    }

    fn contacts_connection_only() {
        run("SELECT listsync.create_connection('hook', 'webhook', '{\"url\": \"https://hooks.example/x\"}',
                                               '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}')");
    }

    #[pg_test]
    fn many_filters_keyed_on_a_column_capture_exactly_their_rows() {
        contacts();
        run(
            "ALTER TABLE contacts ADD COLUMN region varchar(10), ADD COLUMN vip boolean NOT NULL DEFAULT false",
        );
        let mut bindings = Vec::new();
        for city in 0..20 {
            run(&format!(
                "SELECT listsync.create_filter('c{city}', 'contacts', $$ city = 'City{city}' AND ltv > 10 $$)"
            ));
            bindings.push(
                value::<i64>(&format!(
                    "SELECT listsync.bind_filter_to_list('c{city}', 'hook', backfill => false)"
                ))
                .unwrap(),
            );
        }
        for (name, predicate) in [
            ("any", "ltv > 100"),
            ("eu", "region = 'EU'"),
            ("id3", "id = 3"),
            ("vip", "vip = true OR city = 'City1'"),
        ] {
            run(&format!(
                "SELECT listsync.create_filter('{name}', 'contacts', $$ {predicate} $$)"
            ));
            bindings.push(
                value::<i64>(&format!(
                    "SELECT listsync.bind_filter_to_list('{name}', 'hook', backfill => false)"
                ))
                .unwrap(),
            );
        }
        clear_outbox();
        run(
            "INSERT INTO contacts (id, email, city, ltv, region, vip) VALUES
               (1, 'a@x.io', 'City1', 50, 'EU', false), (2, 'b@x.io', 'City7', 500, NULL, true),
               (3, 'c@x.io', 'Nowhere', 5, 'US', false), (4, 'd@x.io', NULL, 50, 'EU', false)",
        );
        let marked = |name: &str| -> Vec<String> {
            let b = value::<i64>(&format!(
                "SELECT id FROM listsync.bindings WHERE filter_name = '{name}'"
            ))
            .unwrap();
            dirty(b)
        };
        assert_eq!(marked("c1"), strings(&["a@x.io"]));
        assert_eq!(marked("c7"), strings(&["b@x.io"]));
        assert_eq!(marked("c3"), Vec::<String>::new());
        assert_eq!(marked("any"), strings(&["b@x.io"]));
        assert_eq!(
            marked("eu"),
            strings(&["a@x.io", "d@x.io"]),
            "varchar compared as text"
        );
        assert_eq!(marked("id3"), strings(&["c@x.io"]), "an int4 key");
        assert_eq!(
            marked("vip"),
            strings(&["a@x.io", "b@x.io"]),
            "an OR is never keyed"
        );
        clear_outbox();
        run("UPDATE contacts SET city = 'City7' WHERE id = 1");
        assert_eq!(
            marked("c1"),
            strings(&["a@x.io"]),
            "left c1 (the old row's key)"
        );
        assert_eq!(
            marked("c7"),
            strings(&["a@x.io"]),
            "entered c7 (the new row's key)"
        );
        assert_eq!(bindings.len(), 24);
    }

    #[pg_test]
    fn contacts_without_an_email_are_identified_by_phone_where_the_provider_allows() {
        contacts();
        run("ALTER TABLE contacts ADD COLUMN phone text");
        run(
            "SELECT listsync.create_connection('google', 'google_contacts', '{}',
                 '{\"client_id\": \"c\", \"client_secret\": \"s\", \"refresh_token\": \"r\"}')",
        );
        run(
            "SELECT listsync.create_filter('all', 'contacts', $$ ltv > 10 $$, phone_column => 'phone')",
        );
        let google =
            value::<i64>("SELECT listsync.bind_filter_to_list('all', 'google', backfill => false)")
                .unwrap();
        let hook =
            value::<i64>("SELECT listsync.bind_filter_to_list('all', 'hook', backfill => false)")
                .unwrap();
        clear_outbox();
        run("INSERT INTO contacts (email, phone, ltv) VALUES
               (NULL, '+49 30 1234567', 50), ('e@x.io', '+1 555 0100 99', 50), ('bad', NULL, 50)");
        assert_eq!(
            dirty(google),
            strings(&["", "e@x.io", "tel:+49301234567"]),
            "the email first, else the phone"
        );
        assert_eq!(
            dirty(hook),
            strings(&["", "e@x.io"]),
            "an email-only provider skips phone-only rows"
        );
        let address = value::<String>(&format!(
            "SELECT string_agg(address, ' ' ORDER BY address) FROM listsync.\"binding:{google}\" WHERE address IS NOT NULL"
        ));
        assert_eq!(
            address,
            Some("e@x.io tel:+49301234567".into()),
            "the view computes what capture does"
        );
        clear_outbox();
        run("UPDATE contacts SET phone = '+49 30 7654321' WHERE email IS NULL");
        assert_eq!(
            dirty(google),
            strings(&["tel:+49301234567", "tel:+49307654321"]),
            "a phone change moves the contact"
        );
        expect_error(
            "SELECT listsync.create_filter('p', 'contacts', 'true', phone_column => 'ltv')",
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            "phone column \"ltv\" is of type numeric",
        );
    }

    #[pg_test]
    fn truncate_marks_every_recorded_member() {
        let b = vip_binding();
        run(&format!(
            "INSERT INTO listsync.members (binding_id, address, status) VALUES ({b}, 'a@x.io', 'subscribed'), ({b}, 'b@x.io', 'subscribed')"
        ));
        run("TRUNCATE contacts");
        assert_eq!(dirty(b), strings(&["", "a@x.io", "b@x.io"]));
    }

    #[pg_test]
    fn paused_bindings_still_capture() {
        let b = vip_binding();
        run(&format!("SELECT listsync.pause_binding({b})"));
        run("INSERT INTO contacts (email, city, ltv) VALUES ('p@x.io', 'Moscow', 5000)");
        assert_eq!(dirty(b), strings(&["p@x.io"]));
    }

    #[pg_test]
    fn only_bindings_that_are_not_paused_wake_the_worker() {
        let b = vip_binding();
        run(&format!("SELECT listsync.pause_binding({b})"));
        crate::wake::take_wake_request();
        run("INSERT INTO contacts (email, city, ltv) VALUES ('p@x.io', 'Moscow', 5000)");
        assert_eq!(dirty(b), strings(&["p@x.io"]));
        assert!(
            !crate::wake::take_wake_request(),
            "a paused binding's capture must not wake the worker"
        );
        run(&format!("SELECT listsync.resume_binding({b})"));
        crate::wake::take_wake_request();
        run("INSERT INTO contacts (email, city, ltv) VALUES ('q@x.io', 'Moscow', 5000)");
        assert!(crate::wake::take_wake_request());
    }

    #[pg_test]
    fn backfill_marks_every_matching_address() {
        contacts();
        run(
            "INSERT INTO contacts (email, city, ltv) VALUES ('a@x.io', 'Moscow', 5000), ('b@x.io', 'Moscow', 5000), ('c@x.io', 'Paris', 5000), (NULL, 'Moscow', 5000)",
        );
        run("SELECT listsync.create_filter('vip', 'contacts', $$ city = 'Moscow' $$)");
        let b = value::<i64>("SELECT listsync.bind_filter_to_list('vip', 'hook')").unwrap();
        assert_eq!(dirty(b), strings(&["", "a@x.io", "b@x.io"]));
    }

    #[pg_test]
    fn a_pair_changed_while_queued_for_later_is_due_now() {
        contacts();
        run(
            "INSERT INTO contacts (email, city, ltv) VALUES ('a@x.io', 'Moscow', 5000), ('b@x.io', 'Moscow', 5000)",
        );
        run("SELECT listsync.create_filter('vip', 'contacts', $$ city = 'Moscow' $$)");
        let b = value::<i64>("SELECT listsync.bind_filter_to_list('vip', 'hook')").unwrap();
        // a@ waits in retry backoff; b@ is queued by the backfill.
        run(&format!(
            "UPDATE listsync.outbox SET not_before = now() + interval '1 hour' WHERE binding_id = {b} AND address = 'a@x.io'"
        ));
        run("UPDATE contacts SET ltv = 6000");
        let due = |address: &str| {
            value::<bool>(&format!(
                "SELECT not_before = '-infinity' FROM listsync.outbox WHERE binding_id = {b} AND address = '{address}'"
            ))
        };
        assert_eq!(
            due("a@x.io"),
            Some(false),
            "ltv is read by no binding: no change"
        );
        run("UPDATE contacts SET city = 'Paris' WHERE email = 'a@x.io'");
        run("UPDATE contacts SET city = 'Paris' WHERE email = 'b@x.io'");
        assert_eq!(
            due("a@x.io"),
            Some(true),
            "the retry slot gave way to the change"
        );
        assert_eq!(
            due("b@x.io"),
            Some(true),
            "the backfill slot gave way to the change"
        );
        run(&format!("SELECT listsync.resync({b})"));
        assert_eq!(
            due("b@x.io"),
            Some(true),
            "bulk marking never delays a due pair"
        );
    }

    #[pg_test]
    fn misspelt_settings_are_refused() {
        expect_error(
            "SET listsync.batchsize = 5",
            PgSqlErrorCode::ERRCODE_INVALID_NAME,
            "listsync.batchsize",
        );
    }

    #[pg_test]
    fn alter_filter_makes_old_and_new_members_dirty() {
        let b = vip_binding();
        run(
            "INSERT INTO contacts (email, city, ltv) VALUES ('m@x.io', 'Moscow', 5000), ('p@x.io', 'Paris', 5000)",
        );
        run(&format!(
            "INSERT INTO listsync.members (binding_id, address, status) VALUES ({b}, 'm@x.io', 'subscribed')"
        ));
        clear_outbox();
        run("SELECT listsync.alter_filter('vip', $$ city = 'Paris' $$)");
        assert_eq!(dirty(b), strings(&["", "m@x.io", "p@x.io"]));
        clear_outbox();
        run("UPDATE contacts SET ltv = 1 WHERE city = 'Paris'");
        assert_eq!(
            dirty(b),
            Vec::<String>::new(),
            "the new predicate no longer reads ltv"
        );
        run("UPDATE contacts SET city = 'Paris' WHERE email = 'm@x.io'");
        assert_eq!(
            dirty(b),
            strings(&["m@x.io"]),
            "the new predicate is what capture evaluates"
        );
    }

    #[pg_test]
    fn drop_filter_leaves_its_bindings_visibly_inactive() {
        let b = vip_binding();
        run("SELECT listsync.drop_filter('vip')");
        assert_eq!(
            value::<String>(&format!(
                "SELECT state FROM listsync.status WHERE binding = {b}"
            )),
            Some("inactive".into())
        );
        assert_eq!(
            value::<String>(&format!(
                "SELECT state_reason FROM listsync.status WHERE binding = {b}"
            )),
            Some("filter \"vip\" was dropped".into())
        );
        assert_eq!(
            count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'listsync_capture%'"),
            0,
            "the last binding took the triggers with it"
        );
        run("INSERT INTO contacts (email, city, ltv) VALUES ('x@x.io', 'Moscow', 5000)");
        assert_eq!(dirty(b), Vec::<String>::new());
    }

    #[pg_test]
    fn status_splits_pending_into_realtime_backfill_and_retry() {
        let b = vip_binding();
        run(&format!(
            "INSERT INTO listsync.members (binding_id, address, status) VALUES ({b}, 'gone@x.io', 'subscribed')"
        ));
        run(
            "INSERT INTO contacts (email, city, ltv) VALUES ('now@x.io', 'Moscow', 5000), ('later@x.io', 'Moscow', 5000)",
        );
        run(&format!("SELECT listsync.resync({b})"));
        run(
            "UPDATE listsync.outbox SET not_before = now() + interval '1 hour', attempts = 2 WHERE address = 'later@x.io'",
        );
        assert_eq!(
            value::<Vec<i64>>(&format!(
                "SELECT ARRAY[pending, pending_realtime, pending_backfill, pending_retry] FROM listsync.status WHERE binding = {b}"
            )),
            Some(vec![3, 1, 1, 1])
        );
        // Edited while it waits for its retry: due now, its attempts kept for the retry policy.
        run("UPDATE contacts SET first_name = 'L' WHERE email = 'later@x.io'");
        assert_eq!(
            value::<Vec<i64>>(&format!(
                "SELECT ARRAY[pending_realtime, pending_retry, (SELECT attempts FROM listsync.outbox WHERE address = 'later@x.io')]
                   FROM listsync.status WHERE binding = {b}"
            )),
            Some(vec![2, 0, 2])
        );
    }

    // -----------------------------------------------------------------------------------------
    // Explaining one address

    fn explained(binding: i64, address: &str) -> serde_json::Value {
        value::<pgrx::JsonB>(&format!("SELECT listsync.explain({binding}, '{address}')"))
            .unwrap()
            .0
    }

    #[pg_test]
    fn explain_says_why_an_address_is_or_is_not_on_the_list() {
        let b = vip_binding();
        run(
            "INSERT INTO contacts (id, email, first_name, city, ltv) VALUES (7, 'Ann@X.io', 'Ann', 'Moscow', 5000)",
        );
        let ann = explained(b, " ann@x.io ");
        assert_eq!(ann["address"], "ann@x.io");
        assert_eq!(ann["matching_rows"][0]["id"], 7);
        assert_eq!(
            ann["matching_rows"][0]["fields"],
            serde_json::json!({"FNAME": "Ann"})
        );
        assert_eq!(ann["on_the_list"], false);
        assert_eq!(ann["pending"]["attempts"], 0);
        assert_eq!(ann["next"]["operation"], "add");
        assert_eq!(ann["next"]["fields"], serde_json::json!({"FNAME": "Ann"}));

        let nobody = explained(b, "nobody@x.io");
        assert_eq!(nobody["matching_rows"], serde_json::json!([]));
        assert_eq!(nobody["member"], serde_json::Value::Null);
        assert_eq!(nobody["next"]["operation"], "none");

        run("SELECT listsync.suppress('ann@x.io', 'asked by phone')");
        let suppressed = explained(b, "ann@x.io");
        assert_eq!(suppressed["suppressed"]["reason"], "asked by phone");
        assert_eq!(suppressed["next"]["operation"], "none");
        expect_error(
            &format!("SELECT listsync.explain({b}, 'not an address')"),
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "is not an email address",
        );
    }

    // -----------------------------------------------------------------------------------------
    // Renaming in place

    #[pg_test]
    fn a_renamed_filter_keeps_its_bindings_and_capture() {
        let b = vip_binding();
        run("SELECT listsync.rename_filter('vip', 'moscow_vip')");
        assert_eq!(
            value::<String>(&format!(
                "SELECT filter_name FROM listsync.bindings WHERE id = {b}"
            )),
            Some("moscow_vip".into())
        );
        assert_eq!(
            count(
                "SELECT count(*) FROM pg_views WHERE viewname IN ('filter:vip', 'filter:moscow_vip')"
            ),
            1
        );
        run("INSERT INTO contacts (email, city, ltv) VALUES ('n@x.io', 'Moscow', 5000)");
        assert_eq!(dirty(b), strings(&["n@x.io"]));
        run("SELECT listsync.create_filter('vip', 'contacts', $$ city = 'Paris' $$)");
        expect_error(
            "SELECT listsync.rename_filter('moscow_vip', 'vip')",
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            "filter \"vip\" already exists",
        );
        expect_error(
            "SELECT listsync.rename_filter('nope', 'other')",
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            "filter \"nope\" does not exist",
        );
    }

    #[pg_test]
    fn create_connection_if_not_exists_keeps_the_one_there() {
        contacts();
        let id = value::<i64>("SELECT id FROM listsync.connections WHERE name = 'hook'");
        let again = "SELECT listsync.create_connection('hook', 'webhook', '{\"url\": \"https://other.example/\"}', '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}'";
        assert_eq!(
            value::<i64>(&format!("{again}, if_not_exists => true)")),
            id
        );
        assert_eq!(
            value::<String>(
                "SELECT settings->>'url' FROM listsync.connections WHERE name = 'hook'"
            ),
            Some("https://hooks.example/x".into())
        );
        expect_error(
            &format!("{again})"),
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            "connection \"hook\" already exists",
        );
        expect_error(
            "SELECT listsync.create_connection('hook', 'mailchimp', '{\"audience_id\": \"a1\"}', '{\"api_key\": \"0123456789abcdef-us21\"}', if_not_exists => true)",
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            "connection \"hook\" already exists",
        );
    }

    #[pg_test]
    fn alter_binding_changes_it_in_place_and_resends_only_what_differs() {
        let b = vip_binding();
        run(
            "INSERT INTO contacts (email, first_name, city, ltv) VALUES ('a@x.io', 'A', 'Moscow', 5000), ('b@x.io', 'B', 'Moscow', 5000)",
        );
        clear_outbox();
        run(&format!(
            "INSERT INTO listsync.members (binding_id, address, status, fields) VALUES
                ({b}, 'a@x.io', 'subscribed', '{{\"FNAME\": \"A\", \"CITY\": \"Moscow\"}}'),
                ({b}, 'b@x.io', 'subscribed', '{{\"FNAME\": \"B\"}}')"
        ));
        run(&format!(
            "SELECT listsync.alter_binding({b}, fields => '{{\"FNAME\": \"first_name\", \"CITY\": \"city\"}}')"
        ));
        // (and the recount marker of rows without an address)
        assert_eq!(dirty(b), strings(&["", "a@x.io", "b@x.io"]));
        // a@x.io was delivered with these values already: only b@x.io goes out again.
        assert_eq!(
            value::<Vec<String>>(&format!(
                "SELECT array_agg(address || ' ' || operation ORDER BY address) FROM listsync.dry_run({b})"
            )),
            Some(strings(&["b@x.io update"]))
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM listsync.members WHERE binding_id = {b}"
            )),
            2
        );

        run(&format!(
            "SELECT listsync.alter_binding({b}, tags => ARRAY['crm'])"
        ));
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM listsync.members WHERE binding_id = {b} AND NOT verified"
            )),
            2,
            "new tags send every member again"
        );
        run(&format!(
            "SELECT listsync.alter_binding({b}, on_leave => 'keep')"
        ));
        assert_eq!(
            value::<String>(&format!(
                "SELECT on_leave || ' ' || array_to_string(tags, ',') || ' ' || (fields->>'CITY') FROM listsync.bindings WHERE id = {b}"
            )),
            Some("keep crm city".into()),
            "what is not given stays"
        );
        expect_error(
            &format!("SELECT listsync.alter_binding({b}, on_leave => 'explode')"),
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid on_leave",
        );
        expect_error(
            &format!(
                "SELECT listsync.alter_binding({b}, fields => '{{\"FNAME\": \"no_such_column\"}}')"
            ),
            PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
            "no_such_column",
        );
    }

    #[pg_test]
    fn a_renamed_connection_keeps_its_bindings() {
        let b = vip_binding();
        run("SELECT listsync.rename_connection('hook', 'crm_hook')");
        assert_eq!(
            value::<String>(&format!(
                "SELECT connection FROM listsync.status WHERE binding = {b}"
            )),
            Some("crm_hook".into())
        );
        run(
            "SELECT listsync.create_connection('hook', 'webhook', '{\"url\": \"https://hooks.example/y\"}', '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}')",
        );
        expect_error(
            "SELECT listsync.rename_connection('crm_hook', 'hook')",
            PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
            "connection \"hook\" already exists",
        );
    }

    // -----------------------------------------------------------------------------------------
    // DDL cannot silently break a binding (semantics 9)

    #[pg_test]
    fn renaming_a_column_is_followed() {
        let b = vip_binding();
        run("ALTER TABLE contacts RENAME COLUMN city TO town");
        run("ALTER TABLE contacts RENAME COLUMN first_name TO given_name");
        run("ALTER TABLE contacts RENAME COLUMN email TO mail");
        run(
            "INSERT INTO contacts (mail, given_name, town, ltv) VALUES ('r@x.io', 'R', 'Moscow', 5000)",
        );
        assert_eq!(dirty(b), strings(&["r@x.io"]));
        let preview = value::<pgrx::JsonB>("SELECT listsync.preview_filter('vip')")
            .unwrap()
            .0;
        assert_eq!(preview["matching_rows"], 1);
        let steps = value::<pgrx::JsonB>(&format!(
            "SELECT fields FROM listsync.dry_run({b}) WHERE address = 'r@x.io'"
        ))
        .unwrap()
        .0;
        assert_eq!(steps, serde_json::json!({"FNAME": "R"}));
        run("SELECT listsync.alter_filter('vip', $$ town = 'Paris' $$)");
    }

    #[pg_test]
    fn dropping_or_retyping_a_used_column_is_refused_naming_the_filter() {
        vip_binding();
        let message = expect_error(
            "ALTER TABLE contacts DROP COLUMN city",
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            "cannot drop column city",
        );
        assert!(message.contains("other objects depend on it"), "{message}");
        let detail = error_detail("ALTER TABLE contacts DROP COLUMN city");
        assert!(detail.contains("filter:vip"), "{detail}");
        expect_error(
            "ALTER TABLE contacts DROP COLUMN first_name",
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            "first_name",
        );
        expect_error(
            "ALTER TABLE contacts ALTER COLUMN ltv TYPE int",
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "used by a view or rule",
        );
        run("ALTER TABLE contacts DROP COLUMN last_seen_at");
    }

    /// The DETAIL of the error `sql` raises (it names the dependent objects).
    fn error_detail(sql: &str) -> String {
        // SAFETY: as in error_of.
        unsafe {
            let context = pg_sys::CurrentMemoryContext;
            let owner = pg_sys::CurrentResourceOwner;
            pg_sys::BeginInternalSubTransaction(std::ptr::null());
            let detail = PgTryBuilder::new(|| {
                Spi::run(sql).expect("SPI");
                String::new()
            })
            .catch_others(|caught| match &caught {
                CaughtError::PostgresError(r) | CaughtError::ErrorReport(r) => {
                    r.detail().unwrap_or_default().to_string()
                }
                CaughtError::RustPanic { .. } => String::new(),
            })
            .execute();
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
            pg_sys::MemoryContextSwitchTo(context);
            pg_sys::CurrentResourceOwner = owner;
            detail
        }
    }

    #[pg_test]
    fn dropping_the_table_cascades_into_inactive_bindings() {
        let b = vip_binding();
        expect_error(
            "DROP TABLE contacts",
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            "other objects depend on it",
        );
        run("DROP TABLE contacts CASCADE");
        assert_eq!(
            value::<String>(&format!(
                "SELECT state FROM listsync.bindings WHERE id = {b}"
            )),
            Some("inactive".into())
        );
        let reason = value::<String>(&format!(
            "SELECT state_reason FROM listsync.bindings WHERE id = {b}"
        ))
        .unwrap();
        assert!(reason.contains("contacts"), "{reason}");
        assert_eq!(
            count("SELECT count(*) FROM listsync.filters WHERE name = 'vip'"),
            0
        );
    }

    #[pg_test]
    fn unbind_removes_the_triggers_with_the_last_binding() {
        let b = vip_binding();
        run("SELECT listsync.create_filter('paris', 'contacts', $$ city = 'Paris' $$)");
        let p =
            value::<i64>("SELECT listsync.bind_filter_to_list('paris', 'hook', backfill => false)")
                .unwrap();
        clear_outbox();
        run(&format!("SELECT listsync.unbind({b})"));
        assert_eq!(
            count("SELECT count(*) FROM pg_trigger WHERE tgname = 'listsync_capture'"),
            1
        );
        run(
            "INSERT INTO contacts (email, city, ltv) VALUES ('m@x.io', 'Moscow', 5000), ('p@x.io', 'Paris', 1)",
        );
        assert_eq!(dirty(p), strings(&["p@x.io"]));
        assert_eq!(dirty(b), Vec::<String>::new());
        run(&format!("SELECT listsync.unbind({p})"));
        assert_eq!(
            count("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'listsync_capture%'"),
            0
        );
    }

    #[pg_test]
    fn dry_run_plans_like_the_worker() {
        let b = vip_binding();
        run("INSERT INTO contacts (email, first_name, city, ltv) VALUES ('new@x.io', 'New', 'Moscow', 5000),
                    ('same@x.io', 'Same', 'Moscow', 5000), ('changed@x.io', 'Changed', 'Moscow', 5000),
                    ('gone@x.io', 'Gone', 'Paris', 1), ('unsub@x.io', 'U', 'Moscow', 5000)");
        run(&format!(
            r#"INSERT INTO listsync.members (binding_id, address, status, fields) VALUES
                 ({b}, 'same@x.io', 'subscribed', '{{"FNAME": "Same"}}'), ({b}, 'changed@x.io', 'subscribed', '{{"FNAME": "Old"}}'),
                 ({b}, 'gone@x.io', 'subscribed', '{{}}'), ({b}, 'unsub@x.io', 'unsubscribed', '{{}}')"#
        ));
        let plan = value::<String>(&format!(
            "SELECT string_agg(address || ':' || operation, ' ' ORDER BY address) FROM listsync.dry_run({b})"
        ));
        assert_eq!(
            plan,
            Some("changed@x.io:update gone@x.io:remove new@x.io:add unsub@x.io:skip".into())
        );
        run("SELECT listsync.suppress('NEW@x.io')");
        let plan = value::<String>(&format!(
            "SELECT string_agg(address || ':' || operation, ' ' ORDER BY address) FROM listsync.dry_run({b})"
        ));
        assert_eq!(
            plan,
            Some("changed@x.io:update gone@x.io:remove unsub@x.io:skip".into()),
            "suppressed addresses are never sent"
        );
        assert_eq!(
            value::<String>(&format!(
                "SELECT string_agg(address || ':' || operation, ' ') FROM listsync.dry_run({b}, only_address => ' Changed@X.io ')"
            )),
            Some("changed@x.io:update".into()),
            "one address, normalized"
        );
        assert_eq!(
            count(&format!(
                "SELECT count(*) FROM listsync.dry_run({b}, max_rows => 2)"
            )),
            2
        );
        expect_error(
            &format!("SELECT * FROM listsync.dry_run({b}, max_rows => -1)"),
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "max_rows",
        );
    }

    #[pg_test]
    fn null_arguments_are_errors_not_silent_nulls() {
        contacts();
        use PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED;
        expect_error(
            "SELECT listsync.create_filter(NULL, 'contacts', 'true')",
            ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "name must not be NULL",
        );
        expect_error(
            "SELECT listsync.create_filter('f', 'contacts', NULL::text)",
            ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "predicate must not be NULL",
        );
        expect_error(
            "SELECT listsync.create_connection('x', NULL)",
            ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "provider must not be NULL",
        );
        expect_error(
            "SELECT listsync.resync(NULL)",
            ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "id must not be NULL",
        );
        run("SELECT listsync.create_filter('vip', 'contacts', 'true')");
        expect_error(
            "SELECT listsync.bind_filter_to_list('vip', 'hook', tags => ARRAY['a', NULL])",
            ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "a tag must not be NULL",
        );
    }

    #[pg_test]
    fn only_the_owner_previews_a_filter() {
        contacts();
        run("SELECT listsync.create_filter('vip', 'contacts', 'true')");
        run("CREATE ROLE listsync_test_other NOLOGIN");
        run("GRANT listsync_test_other TO current_user");
        run("SET LOCAL ROLE listsync_test_other");
        expect_error(
            "SELECT listsync.preview_filter('vip')",
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "must be owner of filter \"vip\"",
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn a_binding_whose_table_was_dropped_can_be_unbound() {
        let b = vip_binding();
        run("DROP TABLE contacts CASCADE");
        run(&format!("SELECT listsync.unbind({b})"));
        assert_eq!(count("SELECT count(*) FROM listsync.bindings"), 0);
    }

    #[pg_test]
    fn connection_settings_are_validated_naming_the_key() {
        use PgSqlErrorCode::*;
        expect_error(
            "SELECT listsync.create_connection('x', 'nosuch')",
            ERRCODE_INVALID_PARAMETER_VALUE,
            "unknown provider \"nosuch\"",
        );
        expect_error(
            "SELECT listsync.create_connection('x', 'mailchimp', '{\"audience\": \"a\"}', '{\"api_key\": \"k-us1\"}')",
            ERRCODE_INVALID_PARAMETER_VALUE,
            "unknown key settings.audience",
        );
        expect_error(
            "SELECT listsync.create_connection('x', 'mailchimp', '{}', '{\"api_key\": \"k-us1\"}')",
            ERRCODE_INVALID_PARAMETER_VALUE,
            "missing required key settings.audience_id",
        );
        let message = expect_error(
            "SELECT listsync.create_connection('x', 'mailchimp', '{\"audience_id\": \"a\"}', '{\"api_key\": \"s3cr3t-no-dc\"}')",
            ERRCODE_INVALID_PARAMETER_VALUE,
            "data centre",
        );
        assert!(
            !message.contains("s3cr3t"),
            "secrets never appear in errors: {message}"
        );
        run(
            "SELECT listsync.create_connection('x', 'mailchimp', '{\"audience_id\": \"a\"}', '{\"api_key\": \"k-us1\"}')",
        );
        expect_error(
            "SELECT listsync.create_connection('x', 'mailchimp', '{\"audience_id\": \"a\"}', '{\"api_key\": \"k-us1\"}')",
            ERRCODE_DUPLICATE_OBJECT,
            "connection \"x\" already exists",
        );
    }

    #[pg_test]
    fn connections_in_use_cannot_be_dropped() {
        let b = vip_binding();
        let message = expect_error(
            "SELECT listsync.drop_connection('hook')",
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            "cannot drop connection \"hook\"",
        );
        assert!(!message.is_empty());
        run(&format!("SELECT listsync.unbind({b})"));
        run("SELECT listsync.drop_connection('hook')");
        assert_eq!(count("SELECT count(*) FROM listsync.connection_secrets"), 0);
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod security;
