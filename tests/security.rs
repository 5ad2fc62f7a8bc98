//! The worker cannot be made to run someone else's code, and credentials never come back out
//! of a provider's answers into anything stored, raised or logged.

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// The API key `mailchimp_connection` configures.
const KEY: &str = "0123456789abcdef-us21";

/// A Mailchimp client against the emulator with binding `vip` synced once; returns the binding.
fn setup(db: &mut postgres::Client, emulator: &Emulator) -> i64 {
    db.batch_execute(CONTACTS).unwrap();
    mailchimp_connection(db, emulator);
    db.batch_execute("SELECT listsync.create_filter('vip', 'contacts', $$ ltv > 1000 $$)")
        .unwrap();
    let binding: i64 = scalar(
        db,
        r#"SELECT listsync.bind_filter_to_list('vip', 'mc', fields => '{"FNAME": "first_name"}')"#,
    );
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, ltv) VALUES ('first@x.io', 'F', 5000)",
    )
    .unwrap();
    wait_synced(db, binding, T);
    binding
}

#[test]
fn the_worker_never_resolves_operators_planted_in_public() {
    let emulator = Emulator::start();
    let cluster = Cluster::start("search-path", &[]);
    let mut db = cluster.connect();
    let binding = setup(&mut db, &emulator);
    // An unprivileged role with CREATE on public plants operators matching the worker's
    // `now() + $n * interval '...'` exactly (integer and bigint), so that they would be chosen
    // over pg_catalog's `float8 * interval` by a session with public on its search_path. Run by
    // a superuser, they would make the role a superuser.
    db.batch_execute(
        r#"
        CREATE ROLE mallory;
        GRANT CREATE ON SCHEMA public TO mallory;
        SET ROLE mallory;
        CREATE TABLE public.pwned (backend text, at timestamptz DEFAULT pg_catalog.now());
        GRANT INSERT ON public.pwned TO PUBLIC;
        CREATE FUNCTION public.pwn(integer, interval) RETURNS interval LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.pwned (backend) SELECT backend_type FROM pg_catalog.pg_stat_activity
             WHERE pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid();
            BEGIN
                EXECUTE 'ALTER ROLE mallory SUPERUSER';
            EXCEPTION WHEN OTHERS THEN NULL;
            END;
            RETURN $1::float8 OPERATOR(pg_catalog.*) $2;
        END $$;
        CREATE FUNCTION public.pwn(bigint, interval) RETURNS interval LANGUAGE sql
            AS $$ SELECT public.pwn(1, $2) OPERATOR(pg_catalog.*) $1::float8 $$;
        CREATE OPERATOR public.* (LEFTARG = integer, RIGHTARG = interval, FUNCTION = public.pwn);
        CREATE OPERATOR public.* (LEFTARG = bigint, RIGHTARG = interval, FUNCTION = public.pwn);
        -- The trap works: mallory's own session (public on its path) picks her operator.
        SELECT 2 * interval '1 second';
        RESET ROLE;
        "#,
    )
    .unwrap();
    let armed: i64 = scalar(&mut db, "SELECT count(*) FROM public.pwned");
    assert_eq!(
        armed, 1,
        "the planted operator is what `integer * interval` resolves to"
    );
    db.batch_execute("TRUNCATE public.pwned").unwrap();
    // From here this test's own session cannot resolve them: only the worker could.
    db.batch_execute("SET search_path = pg_catalog, pg_temp")
        .unwrap();

    // Deliveries (the claim leases with `$2 * interval`), retries after a 500 (backoff) and a
    // 429 with Retry-After (throttling), then reconciliation and housekeeping.
    let faults = emulator.faults("mailchimp");
    faults.push(Fault::status(500));
    faults.push(Fault::too_many_requests(Some(1)));
    db.batch_execute(
        "INSERT INTO public.contacts (email, first_name, ltv)
         SELECT 'c' || g || '@x.io', 'C', 5000 FROM pg_catalog.generate_series(1, 20) g",
    )
    .unwrap();
    wait_synced(&mut db, binding, T);
    assert_eq!(faults.pending(), 0, "the retries happened");
    assert!(
        scalar::<i64>(
            &mut db,
            "SELECT count(*) FROM listsync.deliveries WHERE http_status IN (429, 500)"
        ) >= 2
    );
    db.batch_execute(
        "UPDATE public.contacts SET ltv = 0 WHERE email = 'c1@x.io';
         SELECT listsync.resync(1)",
    )
    .unwrap_or_else(|e| panic!("{e:?}"));
    wait_synced(&mut db, binding, T);

    let ran: Vec<String> = db
        .query("SELECT coalesce(backend, '?') FROM public.pwned", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(ran.is_empty(), "mallory's operator ran in: {ran:?}");
    let superuser: bool = scalar(
        &mut db,
        "SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = 'mallory'",
    );
    assert!(!superuser, "mallory became a superuser");
}

/// Every text column the worker writes, and the public views over them.
const STORED_TEXT: &[&str] = &[
    "listsync.delivery_log",
    "listsync.deliveries",
    "listsync.outbox",
    "listsync.dead_letter_items",
    "listsync.dead_letters",
    "listsync.bindings",
    "listsync.connections",
    "listsync.status",
];

#[test]
fn credentials_echoed_by_the_provider_are_never_stored_raised_or_logged() {
    let emulator = Emulator::start();
    let cluster = Cluster::start("secrets", &[]);
    let mut db = cluster.connect();
    let binding = setup(&mut db, &emulator);
    // The harness logs LOG and above only; errors and warnings must be clean too.
    cluster.reconfigure(&[("log_min_messages", "warning")]);
    // What a careless provider (or a proxy in front of it) answers: the request's credentials.
    let echo = |code: u16| Fault::Status {
        code,
        retry_after: None,
        body: Some(
            serde_json::json!({
                "title": "Echo",
                "detail": format!(
                    "you sent Authorization: Bearer {KEY} (apikey {KEY}); key={KEY}"
                ),
            })
            .to_string(),
        ),
    };
    let faults = emulator.faults("mailchimp");

    // A transient failure (retried), then a refusal of the batch (a dead letter).
    faults.push(echo(500));
    faults.push(echo(400).on_method("POST"));
    db.batch_execute("INSERT INTO contacts (email, first_name, ltv) VALUES ('a@x.io', 'A', 5000)")
        .unwrap();
    wait_for("the dead letter", T, || {
        status(&mut db, binding)["dead_letters"] == 1
    });

    // A transient failure left in the outbox, then an authentication failure that stops the
    // connection and its bindings.
    faults.push(echo(500));
    faults.push(echo(401));
    db.batch_execute("INSERT INTO contacts (email, first_name, ltv) VALUES ('b@x.io', 'B', 5000)")
        .unwrap();
    wait_for("the connection to stop", T, || {
        scalar::<String>(&mut db, "SELECT state FROM listsync.connections") == "error"
    });
    assert_eq!(faults.pending(), 0);

    // test_connection raises the provider's answer.
    faults.push(echo(401));
    let raised = db
        .batch_execute("SELECT listsync.test_connection('mc')")
        .expect_err("a refused check raises");
    let raised = raised
        .as_db_error()
        .map(|e| e.message().to_string())
        .unwrap_or_else(|| raised.to_string());
    assert!(raised.contains("[redacted]"), "{raised}");
    assert!(
        !raised.contains(KEY),
        "test_connection raised the key: {raised}"
    );

    for relation in STORED_TEXT {
        let text: String = scalar(
            &mut db,
            &format!("SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {relation} t"),
        );
        assert!(!text.contains(KEY), "{relation} holds the key:\n{text}");
        assert!(
            !text.contains("0123456789abcdef"),
            "{relation} holds part of the key:\n{text}"
        );
    }
    // The provider's words are kept, minus the credentials.
    for (what, sql) in [
        (
            "the call log",
            "SELECT count(*) FROM listsync.deliveries WHERE message LIKE '%you sent Authorization: [redacted] (apikey [redacted]); key=[redacted]%'",
        ),
        (
            "the dead letter",
            "SELECT count(*) FROM listsync.dead_letters WHERE error LIKE '%you sent Authorization: [redacted] (apikey [redacted]); key=[redacted]%'",
        ),
        (
            "the outbox",
            "SELECT count(*) FROM listsync.outbox WHERE last_error LIKE '%you sent Authorization: [redacted] (apikey [redacted]); key=[redacted]%'",
        ),
        (
            "the connection's state",
            "SELECT count(*) FROM listsync.connections WHERE state_reason LIKE '%you sent Authorization: [redacted] (apikey [redacted]); key=[redacted]%'",
        ),
        (
            "the binding's state",
            "SELECT count(*) FROM listsync.bindings WHERE state_reason LIKE '%you sent Authorization: [redacted] (apikey [redacted]); key=[redacted]%'",
        ),
    ] {
        let messages: String = scalar(
            &mut db,
            "SELECT coalesce(string_agg(message, E'\\n'), '') FROM listsync.deliveries",
        );
        assert!(
            scalar::<i64>(&mut db, sql) > 0,
            "{what} lost the message; the call log says:\n{messages}"
        );
    }
    let log = cluster.log();
    assert!(
        !log.contains(KEY) && log.contains("[redacted]"),
        "the server log holds the key (or never saw the error)"
    );
}
