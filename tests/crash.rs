//! Crashes: the worker SIGKILLed again and again in the middle of delivery, the postmaster
//! stopped with `-m immediate` and restarted, the worker terminated. Committed changes are
//! never lost (the outbox is WAL-logged) and the provider ends equal to the filter.

mod common;

use common::*;
use std::time::Duration;

const PREDICATE: &str = "ltv > 1000 AND NOT is_deleted";

fn setup(name: &str) -> (Cluster, Emulator, postgres::Client, i64) {
    let emulator = Emulator::start();
    let cluster = Cluster::start(name, &["listsync.batch_size = 500"]);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    mailchimp_connection(&mut db, &emulator);
    db.batch_execute(&format!(
        "SELECT listsync.create_filter('vip', 'contacts', $${PREDICATE}$$)"
    ))
    .unwrap();
    let binding: i64 = scalar(
        &mut db,
        r#"SELECT listsync.bind_filter_to_list('vip', 'mc', fields => '{"FNAME": "first_name"}')"#,
    );
    wait_synced(&mut db, binding, Duration::from_secs(60));
    (cluster, emulator, db, binding)
}

fn backlog(cluster: &Cluster, db: &mut postgres::Client) {
    execute_retrying(
        cluster,
        db,
        "INSERT INTO contacts (email, first_name, ltv)
         SELECT 'k' || g || '@x.io', 'K' || g, CASE WHEN g % 3 = 0 THEN 10 ELSE 5000 END FROM generate_series(1, 20000) g",
    );
}

#[test]
fn sigkill_of_the_worker_mid_delivery_loses_nothing() {
    let (cluster, emulator, mut db, binding) = setup("sigkill");
    // Slow the provider down so that kills land in the middle of calls.
    emulator.faults("mailchimp").set_random(0.3, 11);
    emulator
        .faults("mailchimp")
        .set_timeout(Duration::from_millis(300));
    backlog(&cluster, &mut db);
    let mut kills = 0;
    for _ in 0..8 {
        std::thread::sleep(Duration::from_millis(700));
        if cluster.kill_worker() {
            kills += 1;
        }
        cluster.wait_for_worker();
        db = cluster.connect();
        execute_retrying(
            &cluster,
            &mut db,
            "UPDATE contacts SET first_name = first_name || '+' WHERE id % 97 = 0",
        );
    }
    assert!(kills >= 5, "the worker was killed {kills} times");
    emulator.faults("mailchimp").clear();
    db = cluster.connect();
    assert_converged(
        &mut db,
        &emulator,
        &[("mailchimp", binding, PREDICATE, "FNAME")],
        Duration::from_secs(300),
    );
}

#[test]
fn immediate_shutdown_mid_drain_loses_nothing() {
    let (cluster, emulator, mut db, binding) = setup("immediate");
    backlog(&cluster, &mut db);
    execute_retrying(
        &cluster,
        &mut db,
        "UPDATE contacts SET is_deleted = true WHERE id % 7 = 0",
    );
    std::thread::sleep(Duration::from_millis(300));
    cluster.crash_and_restart();
    db = cluster.connect();
    execute_retrying(
        &cluster,
        &mut db,
        "UPDATE contacts SET first_name = 'after-crash' WHERE id % 11 = 0",
    );
    cluster.crash_and_restart();
    db = cluster.connect();
    assert_converged(
        &mut db,
        &emulator,
        &[("mailchimp", binding, PREDICATE, "FNAME")],
        Duration::from_secs(300),
    );
    assert!(
        cluster.log().contains("database system was interrupted"),
        "the server really crashed"
    );
}

#[test]
fn a_terminated_worker_is_started_again() {
    let (cluster, emulator, mut db, binding) = setup("terminate");
    let first = cluster.wait_for_worker();
    let mut postgres = cluster.connect_to("postgres");
    postgres
        .execute("SELECT pg_terminate_backend($1)", &[&first])
        .unwrap();
    wait_for("a new worker", Duration::from_secs(60), || {
        cluster.worker_pid().is_some_and(|pid| pid != first)
    });
    execute_retrying(
        &cluster,
        &mut db,
        "INSERT INTO contacts (email, first_name, ltv) VALUES ('t@x.io', 'T', 5000)",
    );
    assert_converged(
        &mut db,
        &emulator,
        &[("mailchimp", binding, PREDICATE, "FNAME")],
        Duration::from_secs(60),
    );
    // The launcher too: the postmaster restarts it, and it restarts nothing twice.
    let launcher: i32 = scalar(
        &mut postgres,
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_listsync launcher'",
    );
    postgres
        .execute("SELECT pg_terminate_backend($1)", &[&launcher])
        .unwrap();
    wait_for("a new launcher", Duration::from_secs(60), || {
        postgres
            .query_opt(
                "SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_listsync launcher'",
                &[],
            )
            .ok()
            .flatten()
            .is_some_and(|r| r.get::<_, i32>(0) != launcher)
    });
    std::thread::sleep(Duration::from_secs(2));
    let workers: i64 = scalar(
        &mut postgres,
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_listsync worker'",
    );
    assert_eq!(
        workers, 1,
        "one worker per database, whatever the launcher's restarts"
    );
}
