//! Transactions, bulk loads and the life of the cluster around pg_listsync: rollbacks leave
//! nothing, COPY and prepared transactions are captured, DROP DATABASE and DROP EXTENSION work
//! with the worker attached, pg_dump/restore keeps the configuration, time-dependent filters
//! move without writes, and one cluster serves several databases.

mod common;

use common::*;
use std::io::Write;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn webhook_setup(name: &str, settings: &[&str]) -> (Cluster, Emulator, postgres::Client, i64) {
    let emulator = Emulator::start();
    let cluster = Cluster::start(name, settings);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    create_webhook(&mut db, &emulator, "hook");
    db.batch_execute("SELECT listsync.create_filter('vip', 'contacts', $$ ltv > 1000 $$)")
        .unwrap();
    let binding: i64 = scalar(
        &mut db,
        "SELECT listsync.bind_filter_to_list('vip', 'hook', fields => '{\"name\": \"first_name\"}')",
    );
    (cluster, emulator, db, binding)
}

fn create_webhook(db: &mut postgres::Client, emulator: &Emulator, name: &str) {
    db.execute(
        "SELECT listsync.create_connection($1, 'webhook', jsonb_build_object('url', $2::text),
                                           '{\"signing_secret\": \"a-long-enough-shared-secret\"}')",
        &[&name, &format!("{}/crm", emulator.base_url("webhook"))],
    )
    .unwrap();
}

fn pending(db: &mut postgres::Client) -> Vec<String> {
    db.query(
        "SELECT address FROM listsync.outbox WHERE address <> '' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn rolled_back_work_leaves_nothing_and_committed_work_everything() {
    let (_cluster, _emulator, mut db, binding) = webhook_setup("rollback", &[]);
    wait_synced(&mut db, binding, T);
    // Paused: the worker leaves the outbox alone, so we can look at it.
    db.execute("SELECT listsync.pause_binding($1)", &[&binding])
        .unwrap();
    db.batch_execute(
        "BEGIN; INSERT INTO contacts (email, ltv) VALUES ('rolled@x.io', 5000); ROLLBACK;",
    )
    .unwrap();
    assert!(
        pending(&mut db).is_empty(),
        "a rolled-back transaction left nothing"
    );
    db.batch_execute(
        "BEGIN;
         INSERT INTO contacts (email, ltv) VALUES ('kept@x.io', 5000);
         SAVEPOINT s;
         INSERT INTO contacts (email, ltv) VALUES ('undone@x.io', 5000);
         UPDATE contacts SET ltv = 0 WHERE email = 'kept@x.io';
         ROLLBACK TO SAVEPOINT s;
         INSERT INTO contacts (email, ltv) VALUES ('after@x.io', 5000);
         COMMIT;",
    )
    .unwrap();
    assert_eq!(pending(&mut db), vec!["after@x.io", "kept@x.io"]);
    // A statement that fails takes its captured rows with it; the transaction goes on.
    db.batch_execute(
        "BEGIN;
         SAVEPOINT s;
         INSERT INTO contacts (id, email, ltv) VALUES (1000, 'dup1@x.io', 5000), (1000, 'dup2@x.io', 5000);",
    )
    .unwrap_err();
    db.batch_execute("ROLLBACK TO SAVEPOINT s; COMMIT;")
        .unwrap();
    assert_eq!(pending(&mut db), vec!["after@x.io", "kept@x.io"]);
}

#[test]
fn copy_of_ten_thousand_rows_is_captured_and_delivered() {
    let (_cluster, emulator, mut db, binding) = webhook_setup("copy", &[]);
    let list = wait_synced(&mut db, binding, T);
    let mut writer = db
        .copy_in("COPY contacts (email, first_name, ltv) FROM STDIN")
        .unwrap();
    for i in 0..10_000 {
        writeln!(
            writer,
            "copy{i}@x.io\tC{i}\t{}",
            if i % 4 == 0 { 10 } else { 5000 }
        )
        .unwrap();
    }
    writer.finish().unwrap();
    wait_synced(&mut db, binding, Duration::from_secs(180));
    let members = emulator.list_members("webhook", &list);
    assert_eq!(members.len(), 7500);
    assert_eq!(members["copy7@x.io"]["name"], "C7");
}

#[test]
fn prepared_transactions_are_delivered_by_the_polling_fallback() {
    let (_cluster, emulator, mut db, binding) =
        webhook_setup("twophase", &["listsync.poll_interval = '500ms'"]);
    let list = wait_synced(&mut db, binding, T);
    db.batch_execute("BEGIN; INSERT INTO contacts (email, ltv) VALUES ('2pc@x.io', 5000); PREPARE TRANSACTION 'crm-1';").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        !emulator
            .list_members("webhook", &list)
            .contains_key("2pc@x.io"),
        "not before COMMIT PREPARED"
    );
    db.batch_execute("COMMIT PREPARED 'crm-1'").unwrap();
    wait_for("the prepared transaction's change", T, || {
        emulator
            .list_members("webhook", &list)
            .contains_key("2pc@x.io")
    });
}

#[test]
fn drop_database_and_drop_extension_work_with_the_worker_attached() {
    let (cluster, emulator, mut db, binding) = webhook_setup("drops", &[]);
    wait_synced(&mut db, binding, T);
    cluster.wait_for_worker();
    // DROP EXTENSION: bindings' views and triggers depend on it, so CASCADE; the worker holds
    // no lock that would block it.
    db.batch_execute("DROP EXTENSION pg_listsync CASCADE")
        .unwrap();
    db.batch_execute("INSERT INTO contacts (email, ltv) VALUES ('after-drop@x.io', 5000)")
        .unwrap();
    let triggers: i64 = scalar(
        &mut db,
        "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'listsync%'",
    );
    assert_eq!(triggers, 0);
    db.batch_execute("CREATE EXTENSION pg_listsync").unwrap();
    create_webhook(&mut db, &emulator, "hook");
    db.batch_execute("SELECT listsync.create_filter('again', 'contacts', $$ ltv > 1000 $$)")
        .unwrap();
    let again: i64 = scalar(
        &mut db,
        "SELECT listsync.bind_filter_to_list('again', 'hook')",
    );
    let list = wait_synced(&mut db, again, T);
    assert!(
        emulator
            .list_members("webhook", &list)
            .contains_key("after-drop@x.io"),
        "the worker picked the new extension up"
    );
    drop(db);
    // DROP DATABASE asks the connected worker to leave first.
    let mut postgres = cluster.connect_to("postgres");
    postgres.batch_execute("DROP DATABASE crm").unwrap();
    assert!(
        cluster
            .log()
            .contains("pg_listsync worker for database \"crm\" stopping")
    );
    postgres.batch_execute("CREATE DATABASE crm").unwrap();
    wait_for("a worker for the re-created database", T, || {
        cluster.worker_pid().is_some()
    });
}

/// Dumps database `from` (custom format) and restores it into a new database `to`.
fn dump_and_restore(cluster: &Cluster, from: &str, to: &str) {
    let dump = cluster.dir().join(format!("{from}.dump"));
    let connection = [
        "-h",
        "127.0.0.1",
        "-p",
        &cluster.port.to_string(),
        "-U",
        "postgres",
    ];
    let output = Cluster::bin("pg_dump")
        .args(connection)
        .args(["-Fc", "-f", dump.to_str().unwrap(), from])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    cluster
        .connect_to("postgres")
        .batch_execute(&format!("CREATE DATABASE {to}"))
        .unwrap();
    let output = Cluster::bin("pg_restore")
        .args(connection)
        .args(["-d", to, dump.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "pg_restore: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn pg_dump_and_restore_keep_filters_bindings_and_connections() {
    let (cluster, emulator, mut db, binding) = webhook_setup("dump", &[]);
    db.batch_execute("INSERT INTO contacts (email, first_name, ltv) VALUES ('d@x.io', 'D', 5000)")
        .unwrap();
    wait_synced(&mut db, binding, T);
    dump_and_restore(&cluster, "crm", "restored");
    let mut restored = cluster.connect_to("restored");
    let config: (String, String, String, i64) = {
        let row = restored
            .query_one(
                "SELECT f.name, c.name, s.secrets->>'signing_secret', (SELECT count(*) FROM listsync.members)
                   FROM listsync.bindings b JOIN listsync.filters f ON f.id = b.filter_id
                   JOIN listsync.connections c ON c.id = b.connection_id
                   JOIN listsync.connection_secrets s ON s.connection_id = c.id",
                &[],
            )
            .unwrap();
        (row.get(0), row.get(1), row.get(2), row.get(3))
    };
    assert_eq!(
        config,
        (
            "vip".into(),
            "hook".into(),
            "a-long-enough-shared-secret".into(),
            1
        )
    );
    // The restored views and triggers capture as before.
    restored
        .batch_execute("SELECT listsync.pause_binding(id) FROM listsync.bindings")
        .unwrap();
    restored
        .batch_execute("INSERT INTO contacts (email, ltv) VALUES ('new-after-restore@x.io', 5000)")
        .unwrap();
    assert_eq!(pending(&mut restored), vec!["new-after-restore@x.io"]);
    let predicate: String = scalar(
        &mut restored,
        "SELECT pg_get_viewdef('listsync.\"filter:vip\"')",
    );
    assert!(predicate.contains("ltv > "), "{predicate}");
    drop(emulator);
}

#[test]
fn a_restored_copy_delivers_nothing_until_confirmed() {
    let (cluster, emulator, mut db, binding) =
        // The worker's complaint is a WARNING, which the harness's `log_min_messages = log` hides.
        webhook_setup("restore-guard", &["listsync.database = 'crm, staging'", "log_min_messages = 'warning'"]);
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, ltv) VALUES ('prod@x.io', 'P', 5000)",
    )
    .unwrap();
    let list = wait_synced(&mut db, binding, T);
    assert!(!scalar::<bool>(
        &mut db,
        "SELECT listsync.restore_unconfirmed()"
    ));

    // Staging is restored from production's dump, into a database a worker serves.
    dump_and_restore(&cluster, "crm", "staging");
    let mut staging = cluster.connect_to("staging");
    assert!(scalar::<bool>(
        &mut staging,
        "SELECT listsync.restore_unconfirmed()"
    ));
    staging
        .batch_execute(
            "INSERT INTO contacts (email, first_name, ltv) VALUES ('staging@x.io', 'S', 5000)",
        )
        .unwrap();
    let cycles = |db: &mut postgres::Client| -> i64 {
        scalar(
            db,
            "SELECT coalesce(sum(cycles), 0)::bigint FROM listsync.workers WHERE database = 'staging'",
        )
    };
    wait_for("a worker serving staging", T, || cycles(&mut db) > 0);
    let seen = cycles(&mut db);
    staging.batch_execute("SELECT listsync.wake()").unwrap();
    wait_for("the staging worker to look again", T, || {
        cycles(&mut db) >= seen + 3
    });
    let delivered = || emulator.webhook().list(&list);
    assert!(
        !delivered().contains_key("staging@x.io"),
        "a copy delivered to production's list"
    );
    let state = status(&mut staging, binding);
    assert_eq!(state["state"], "restored", "{state}");
    assert!(
        state["state_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("listsync.confirm_restore()")
    );
    assert!(
        cluster.log().contains("this database is a copy"),
        "the worker says why it waits"
    );
    // Production itself is not held back.
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, ltv) VALUES ('prod2@x.io', 'Q', 5000)",
    )
    .unwrap();
    wait_synced(&mut db, binding, T);

    // Once an administrator confirms, the copy delivers as its own.
    let refused = {
        staging
            .batch_execute("CREATE ROLE listsync_not_admin; SET ROLE listsync_not_admin")
            .unwrap();
        let refused = staging.batch_execute("SELECT listsync.confirm_restore()");
        staging.batch_execute("RESET ROLE").unwrap();
        refused.expect_err("only listsync_admin confirms a restore")
    };
    assert_eq!(refused.code().map(|c| c.code()), Some("42501"), "{refused}");
    staging
        .batch_execute("SELECT listsync.confirm_restore()")
        .unwrap();
    assert!(!scalar::<bool>(
        &mut staging,
        "SELECT listsync.restore_unconfirmed()"
    ));
    wait_for("the confirmed copy to deliver", T, || {
        delivered().contains_key("staging@x.io")
    });
}

#[test]
fn time_dependent_filters_move_without_writes() {
    let emulator = Emulator::start();
    let cluster = Cluster::start("time", &["listsync.reconcile_interval = '1s'"]);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    create_webhook(&mut db, &emulator, "hook");
    db.batch_execute("SELECT listsync.create_filter('seen', 'contacts', $$ last_seen_at > now() - interval '3 seconds' $$)").unwrap();
    let binding: i64 = scalar(
        &mut db,
        "SELECT listsync.bind_filter_to_list('seen', 'hook')",
    );
    db.batch_execute("INSERT INTO contacts (email, last_seen_at) VALUES ('recent@x.io', now())")
        .unwrap();
    let list = wait_synced(&mut db, binding, T);
    wait_for("the contact to join", T, || {
        emulator
            .list_members("webhook", &list)
            .contains_key("recent@x.io")
    });
    // No write from here on: the contact leaves the filter as time passes.
    wait_for("the contact to leave by the clock alone", T, || {
        !emulator
            .list_members("webhook", &list)
            .contains_key("recent@x.io")
    });
    let reconciled: bool = scalar(
        &mut db,
        &format!(
            "SELECT last_reconciled_at IS NOT NULL FROM listsync.bindings WHERE id = {binding}"
        ),
    );
    assert!(reconciled);
}

#[test]
fn one_cluster_serves_several_databases() {
    let emulator = Emulator::start();
    let cluster = Cluster::start("multi", &["listsync.database = 'crm, crm2'"]);
    let mut postgres = cluster.connect_to("postgres");
    postgres.batch_execute("CREATE DATABASE crm2").unwrap();
    let mut lists = Vec::new();
    for database in ["crm", "crm2"] {
        let mut db = cluster.connect_to(database);
        if database == "crm2" {
            db.batch_execute("CREATE EXTENSION pg_listsync").unwrap();
        }
        db.batch_execute(CONTACTS).unwrap();
        create_webhook(&mut db, &emulator, "hook");
        db.batch_execute(&format!(
            "SELECT listsync.create_filter('all', 'contacts', 'true');
             SELECT listsync.bind_filter_to_list('all', 'hook', list => '{database}');
             INSERT INTO contacts (email) VALUES ('{database}@x.io');"
        ))
        .unwrap();
        lists.push((database, db));
    }
    for (database, db) in &mut lists {
        wait_synced(db, 1, T);
        assert!(
            emulator
                .list_members("webhook", database)
                .contains_key(&format!("{database}@x.io"))
        );
    }
    let workers: i64 = scalar(
        &mut postgres,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_listsync worker'",
    );
    assert_eq!(workers, 2);
}
