//! The adversarial suite (semantics 10): a role that owns one table, or that can create in
//! `public`, or that row-level security restricts, gains nothing through pg_listsync. Each
//! test plays the attack as that role and checks that it failed in the right way.

#[pgrx::pg_schema]
mod tests {
    use crate::pg_tests::tests::{
        clear_outbox, contacts, count, dirty, error_of, expect_error, run, value,
    };
    use pgrx::pg_sys::errcodes::PgSqlErrorCode::{self, *};
    use pgrx::prelude::*;

    /// `crm_app`: owns schema crmx and its table crmx.t (two contacts), has no other right; it
    /// may use connection `hook`. The test backend can act as it (SET LOCAL ROLE).
    fn table_owner() {
        contacts();
        run("CREATE ROLE listsync_crm_app NOLOGIN");
        run("GRANT listsync_crm_app TO current_user");
        run("CREATE SCHEMA crmx AUTHORIZATION listsync_crm_app");
        run("SELECT listsync.grant_usage('hook', 'listsync_crm_app')");
        as_crm_app();
        run("CREATE TABLE crmx.t (id int PRIMARY KEY, email text, city text)");
        run(
            "INSERT INTO crmx.t VALUES (1, 'a@example.com', 'Moscow'), (2, 'b@example.com', 'Paris')",
        );
        run("RESET ROLE");
    }

    fn as_crm_app() {
        run("SET LOCAL ROLE listsync_crm_app");
        run("SET LOCAL search_path = crmx, public");
    }

    fn is_superuser(role: &str) -> bool {
        value::<bool>(&format!(
            "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = '{role}'"
        ))
        .unwrap_or(false)
    }

    fn refused(predicate: &str, code: PgSqlErrorCode, message_part: &str) -> String {
        expect_error(
            &format!("SELECT listsync.create_filter('probe', 'crmx.t', $${predicate}$$)"),
            code,
            message_part,
        )
    }

    #[pg_test]
    fn a_table_owner_cannot_become_superuser_through_a_filter() {
        table_owner();
        as_crm_app();
        run(
            "CREATE FUNCTION crmx.esc() RETURNS int LANGUAGE plpgsql AS $$ BEGIN
               IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
                 EXECUTE 'ALTER ROLE listsync_crm_app SUPERUSER';
               END IF;
               RETURN 1; END $$",
        );
        run("CREATE VIEW crmx.v AS SELECT crmx.esc() AS x");
        let message = refused(
            "table_to_xml('crmx.v'::regclass, false, false, '') IS NOT NULL",
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "table_to_xml",
        );
        assert!(message.contains("filter \"probe\""), "{message}");
        refused(
            "query_to_xml('SELECT crmx.esc()', false, false, '') IS NOT NULL",
            ERRCODE_INVALID_OBJECT_DEFINITION,
            "volatile",
        );
        refused(
            "crmx.esc() = 1",
            ERRCODE_INVALID_OBJECT_DEFINITION,
            "volatile",
        );
        run("RESET ROLE");
        assert!(!is_superuser("listsync_crm_app"));
    }

    #[pg_test]
    fn secrets_cannot_be_read_through_a_predicate() {
        table_owner();
        as_crm_app();
        let message = refused(
            "(table_to_xml('listsync.connection_secrets'::regclass, false, false, ''))::text::int > 0",
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "table_to_xml",
        );
        assert!(!message.contains("whsec_"), "{message}");
        run("RESET ROLE");
    }

    #[pg_test]
    fn stable_built_ins_that_read_the_database_or_settings_are_refused() {
        table_owner();
        as_crm_app();
        for (predicate, function) in [
            ("current_setting('search_path') = city", "current_setting"),
            ("to_regclass(city) IS NULL", "to_regclass"),
            ("pg_catalog.pg_get_userbyid(10) = city", "pg_get_userbyid"),
            ("has_table_privilege(city, 'SELECT')", "has_table_privilege"),
        ] {
            refused(predicate, ERRCODE_FEATURE_NOT_SUPPORTED, function);
        }
        refused(
            "city = current_user",
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "current_user",
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn user_defined_functions_operators_types_and_domains_are_refused() {
        table_owner();
        as_crm_app();
        run("CREATE FUNCTION crmx.f(text) RETURNS boolean LANGUAGE sql IMMUTABLE AS 'SELECT true'");
        let message = refused(
            "crmx.f(city)",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "function crmx.f(text) is not built in",
        );
        assert!(message.contains("filter \"probe\""), "{message}");
        run(
            "CREATE OPERATOR crmx.=== (LEFTARG = text, RIGHTARG = text, FUNCTION = pg_catalog.texteq)",
        );
        refused(
            "city OPERATOR(crmx.===) 'Moscow'",
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "user-defined operator",
        );
        run("CREATE DOMAIN crmx.d AS text CHECK (crmx.f(VALUE))");
        refused(
            "(email)::crmx.d IS NOT NULL",
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "casting to domain crmx.d",
        );
        run("CREATE TYPE crmx.pair AS (a text, b text)");
        refused(
            "ROW(city, email)::crmx.pair IS NOT NULL",
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "user-defined type crmx.pair",
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn mapped_fields_follow_the_same_rules() {
        table_owner();
        as_crm_app();
        run("SELECT listsync.create_filter('moscow', 't', $$ city = 'Moscow' $$)");
        let message = expect_error(
            r#"SELECT listsync.bind_filter_to_list('moscow', 'hook',
                 fields => $j${"CITY": "table_to_xml('listsync.connection_secrets'::regclass, false, false, '')::text"}$j$)"#,
            ERRCODE_FEATURE_NOT_SUPPORTED,
            "table_to_xml",
        );
        assert!(message.contains("field \"CITY\""), "{message}");
        run(
            r#"SELECT listsync.bind_filter_to_list('moscow', 'hook', fields => '{"CITY": "upper(city)"}')"#,
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn enum_and_domain_columns_are_usable() {
        table_owner();
        as_crm_app();
        run("CREATE TYPE crmx.stage AS ENUM ('lead', 'customer')");
        run("CREATE DOMAIN crmx.city_name AS text");
        run(
            "CREATE TABLE crmx.people (id int PRIMARY KEY, email text, stage crmx.stage, city crmx.city_name)",
        );
        run(
            "SELECT listsync.create_filter('customers', 'crmx.people', $$ stage = 'customer' AND city = 'Moscow' $$)",
        );
        let predicate =
            value::<String>("SELECT predicate FROM listsync.filters WHERE name = 'customers'")
                .unwrap_or_default();
        assert!(predicate.contains("crmx.stage"), "{predicate}");
        run("RESET ROLE");
    }

    #[pg_test]
    fn date_time_functions_and_json_conditions_stay_allowed() {
        table_owner();
        as_crm_app();
        run("ALTER TABLE crmx.t ADD COLUMN birthday date, ADD COLUMN seen timestamptz");
        run("SELECT listsync.create_filter('recent', 'crmx.t',
               $$ seen > now() - interval '30 days' AND birthday < current_date
                  AND date_trunc('month', seen) = date_trunc('month', now())
                  AND extract(year FROM age(birthday)) >= 18 AND to_char(seen, 'YYYY') <> '' $$)");
        run(r#"SELECT listsync.create_filter('birthdays', 'crmx.t',
               '{"all": [{"column": "birthday", "op": "within_next_days", "value": 7, "annual": true},
                         {"column": "seen", "op": "within_last_days", "value": 30},
                         {"column": "city", "op": "contains", "value": "mos"}]}'::jsonb)"#);
        assert_eq!(
            count(
                "SELECT count(*) FROM listsync.filters WHERE name IN ('recent', 'birthdays') AND time_dependent"
            ),
            2
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn execute_is_checked_for_the_owner() {
        table_owner();
        run("REVOKE EXECUTE ON FUNCTION pg_catalog.lower(text) FROM PUBLIC");
        as_crm_app();
        refused(
            "lower(city) = 'moscow'",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied for function lower(text)",
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn an_allowed_function_runs_as_the_owner_and_is_printed_qualified() {
        table_owner();
        as_crm_app();
        // Evaluated as the owner it is true; evaluated with anyone else's rights, false.
        run(
            "CREATE FUNCTION crmx.evaluated_by_owner(text) RETURNS boolean LANGUAGE sql STABLE
               AS $$ SELECT current_user = 'listsync_crm_app' AND $1 IS NOT NULL $$",
        );
        expect_error(
            "SELECT listsync.allow_function('crmx.evaluated_by_owner(text)')",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied to allow a function",
        );
        run("RESET ROLE");
        run("SELECT listsync.allow_function('crmx.evaluated_by_owner(text)')");
        as_crm_app();
        run("SELECT listsync.create_filter('own', 't', $$ evaluated_by_owner(email) $$)");
        let predicate =
            value::<String>("SELECT predicate FROM listsync.filters WHERE name = 'own'")
                .unwrap_or_default();
        assert!(
            predicate.contains("crmx.evaluated_by_owner"),
            "search_path-relative names are stored qualified: {predicate}"
        );
        let binding = value::<i64>("SELECT listsync.bind_filter_to_list('own', 'hook')").unwrap();
        run("RESET ROLE");
        assert_eq!(
            dirty(binding),
            vec!["", "a@example.com", "b@example.com"],
            "the backfill evaluated the filter as its owner"
        );
        clear_outbox();
        as_crm_app();
        assert_eq!(
            value::<i64>(&format!("SELECT listsync.resync({binding})")),
            Some(2)
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn evaluating_a_binding_is_a_security_restricted_operation() {
        table_owner();
        as_crm_app();
        run(
            "CREATE FUNCTION crmx.escalates(text) RETURNS boolean LANGUAGE plpgsql STABLE AS $$
               BEGIN PERFORM pg_catalog.set_config('role', 'none', true); RETURN true; END $$",
        );
        run("RESET ROLE");
        run("SELECT listsync.allow_function('crmx.escalates(text)')");
        as_crm_app();
        run("SELECT listsync.create_filter('esc', 't', $$ escalates(email) $$)");
        expect_error(
            "SELECT listsync.bind_filter_to_list('esc', 'hook')",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "cannot set parameter \"role\" within security-",
        );
        run("RESET ROLE");
    }

    #[pg_test]
    fn row_level_security_applies_to_backfill_and_resync() {
        contacts();
        run("CREATE ROLE listsync_rls NOLOGIN");
        run("GRANT listsync_rls TO current_user");
        run(
            "INSERT INTO contacts (email, city) VALUES ('m@example.com', 'Moscow'), ('p@example.com', 'Paris')",
        );
        run("GRANT SELECT, TRIGGER ON contacts TO listsync_rls");
        run("ALTER TABLE contacts ENABLE ROW LEVEL SECURITY");
        run(
            "CREATE POLICY moscow_only ON contacts FOR SELECT TO listsync_rls USING (city = 'Moscow')",
        );
        run("SELECT listsync.grant_usage('hook', 'listsync_rls')");
        run("SET LOCAL ROLE listsync_rls");
        run("SELECT listsync.create_filter('everyone', 'contacts', 'true')");
        let binding =
            value::<i64>("SELECT listsync.bind_filter_to_list('everyone', 'hook')").unwrap();
        assert_eq!(
            value::<i64>(&format!("SELECT listsync.resync({binding})")),
            Some(1)
        );
        let previewed = value::<pgrx::JsonB>("SELECT listsync.preview_filter('everyone')").unwrap();
        assert_eq!(previewed.0["matching_rows"], 1);
        run("RESET ROLE");
        assert_eq!(dirty(binding), vec!["", "m@example.com"]);
    }

    #[pg_test]
    fn binding_needs_usage_on_the_connection() {
        table_owner();
        run("SELECT listsync.revoke_usage('hook', 'listsync_crm_app')");
        as_crm_app();
        run("SELECT listsync.create_filter('moscow', 't', $$ city = 'Moscow' $$)");
        let message = expect_error(
            "SELECT listsync.bind_filter_to_list('moscow', 'hook')",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "permission denied for connection \"hook\"",
        );
        assert!(message.contains("hook"));
        expect_error(
            "SELECT listsync.grant_usage('hook', 'listsync_crm_app')",
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "must be owner of connection \"hook\"",
        );
        assert_eq!(
            count("SELECT count(*) FROM listsync.connection_list"),
            0,
            "a connection the role may not use is not listed to it"
        );
        run("RESET ROLE");
        run("SELECT listsync.grant_usage('hook', 'public')");
        as_crm_app();
        run("SELECT listsync.bind_filter_to_list('moscow', 'hook')");
        assert_eq!(count("SELECT count(*) FROM listsync.connection_list"), 1);
        run("RESET ROLE");
        expect_error(
            "SELECT listsync.grant_usage('hook', 'no_such_role')",
            ERRCODE_UNDEFINED_OBJECT,
            "role \"no_such_role\" does not exist",
        );
    }

    #[pg_test]
    fn operational_views_show_a_role_its_own_bindings_only() {
        table_owner();
        run("SELECT listsync.create_filter('admins', 'contacts', 'true')");
        let theirs = value::<i64>(
            "SELECT listsync.bind_filter_to_list('admins', 'hook', backfill => false)",
        )
        .unwrap();
        as_crm_app();
        run("SELECT listsync.create_filter('mine', 't', 'true')");
        let mine =
            value::<i64>("SELECT listsync.bind_filter_to_list('mine', 'hook', backfill => false)")
                .unwrap();
        run("RESET ROLE");
        for binding in [theirs, mine] {
            run(&format!(
                "INSERT INTO listsync.dead_letter_items (binding_id, address, operation, attempts, error)
                 VALUES ({binding}, 'x@example.com', 'add', 1, 'refused for binding {binding}')"
            ));
            run(&format!(
                "INSERT INTO listsync.delivery_log (connection_id, binding_id, operation, request, outcome, message)
                 SELECT connection_id, id, 'upsert', 'POST /', 'failed', 'answer for binding {binding}'
                   FROM listsync.bindings WHERE id = {binding}"
            ));
            run(&format!(
                "UPDATE listsync.bindings SET last_error = 'error of binding {binding}' WHERE id = {binding}"
            ));
        }
        as_crm_app();
        for view in [
            "listsync.status",
            "listsync.dead_letters",
            "listsync.deliveries",
            "listsync.bindings",
        ] {
            let column = if view == "listsync.bindings" {
                "id"
            } else {
                "binding"
            };
            assert_eq!(
                value::<Vec<i64>>(&format!("SELECT array_agg({column}) FROM {view}")),
                Some(vec![mine]),
                "{view}"
            );
        }
        assert_eq!(
            value::<Vec<String>>("SELECT array_agg(name) FROM listsync.filters"),
            Some(vec!["mine".to_string()])
        );
        run("RESET ROLE");
        assert_eq!(count("SELECT count(*) FROM listsync.status"), 2);
    }

    #[pg_test]
    fn bad_arguments_get_their_sqlstate_not_an_internal_error() {
        contacts();
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let message = expect_error(
            &format!("SELECT listsync.create_filter('deep', 'contacts', '{deep}'::jsonb)"),
            ERRCODE_INVALID_PARAMETER_VALUE,
            "conditions nests too deeply",
        );
        assert!(message.contains("conditions"));
        expect_error(
            &format!("SELECT listsync.create_connection('deep', 'webhook', '{{\"url\": {deep}}}')"),
            ERRCODE_INVALID_PARAMETER_VALUE,
            "settings nests too deeply",
        );
        expect_error(
            "SELECT listsync.create_filter('nothing', 0::oid::regclass, 'true')",
            ERRCODE_UNDEFINED_TABLE,
            "relation with OID 0 does not exist",
        );
        for function in ["capture", "capture_flush", "capture_truncate"] {
            expect_error(
                &format!("SELECT listsync.{function}()"),
                ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                "can only be called as a trigger",
            );
        }
        let (code, _, _) =
            error_of("SELECT listsync.allow_function(0::oid::regprocedure)").expect("an error");
        assert_eq!(code, ERRCODE_UNDEFINED_OBJECT);
    }

    #[pg_test]
    fn tags_are_bounded_in_count_and_size() {
        contacts();
        run(
            "SELECT listsync.create_connection('mc', 'mailchimp', '{\"audience_id\": \"a1\"}', '{\"api_key\": \"0123456789abcdef-us21\"}')",
        );
        run("SELECT listsync.create_filter('all', 'contacts', 'true')");
        expect_error(
            "SELECT listsync.bind_filter_to_list('all', 'mc', tags => (SELECT array_agg('t' || g) FROM generate_series(1, 51) g))",
            ERRCODE_INVALID_PARAMETER_VALUE,
            "at most 50 tags",
        );
        expect_error(
            "SELECT listsync.bind_filter_to_list('all', 'mc', tags => ARRAY[repeat('x', 101)])",
            ERRCODE_INVALID_PARAMETER_VALUE,
            "invalid tag",
        );
        run(
            "SELECT listsync.bind_filter_to_list('all', 'mc', tags => (SELECT array_agg('t' || g) FROM generate_series(1, 50) g))",
        );
    }

    #[pg_test]
    fn a_filter_that_breaks_the_rules_later_is_never_evaluated() {
        table_owner();
        as_crm_app();
        run(
            "CREATE FUNCTION crmx.is_moscow(text) RETURNS boolean LANGUAGE sql IMMUTABLE AS $$ SELECT $1 = 'Moscow' $$",
        );
        run("RESET ROLE");
        run("SELECT listsync.allow_function('crmx.is_moscow(text)')");
        as_crm_app();
        run("SELECT listsync.create_filter('moscow', 't', $$ is_moscow(city) $$)");
        let binding = value::<i64>(
            "SELECT listsync.bind_filter_to_list('moscow', 'hook', backfill => false)",
        )
        .unwrap();
        run("RESET ROLE");
        run("SELECT listsync.disallow_function('crmx.is_moscow(text)')");
        assert_eq!(crate::filter::revalidate::revalidate_bindings().unwrap(), 1);
        let (state, reason) = (
            value::<String>(&format!(
                "SELECT state FROM listsync.bindings WHERE id = {binding}"
            )),
            value::<String>(&format!(
                "SELECT state_reason FROM listsync.bindings WHERE id = {binding}"
            ))
            .unwrap_or_default(),
        );
        assert_eq!(state.as_deref(), Some("error"));
        assert!(
            reason.contains("crmx.is_moscow(text) is not built in"),
            "{reason}"
        );
        clear_outbox();
        run("INSERT INTO crmx.t VALUES (3, 'c@example.com', 'Moscow')");
        assert!(dirty(binding).is_empty(), "capture skips it");
        expect_error(
            &format!("SELECT listsync.resume_binding({binding})"),
            ERRCODE_INSUFFICIENT_PRIVILEGE,
            "is not built in",
        );
    }
}
