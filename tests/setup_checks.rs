//! A database whose changes no worker would ever deliver says so at once: without the preload,
//! or outside `listsync.database`, CREATE EXTENSION, bind_filter_to_list and wake() warn with
//! the fix, and check_setup() answers false. `listsync.workers` shows the workers that do run.

mod common;

use common::*;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn bind_a_filter(db: &mut postgres::Client) {
    db.batch_execute(
        "CREATE TABLE contacts (id int PRIMARY KEY, email text, city text);
         SELECT listsync.create_connection('hook', 'webhook', '{\"url\": \"https://hooks.example/x\"}',
                                           '{\"signing_secret\": \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"}');
         SELECT listsync.create_filter('moscow', 'contacts', $$ city = 'Moscow' $$);
         SELECT listsync.bind_filter_to_list('moscow', 'hook', 'list-1');",
    )
    .unwrap();
}

fn warned_about(heard: &[String], what: &str, hint: &str) -> bool {
    heard
        .iter()
        .any(|n| n.starts_with("WARNING: ") && n.contains(what) && n.contains(hint))
}

#[test]
fn without_the_preload_every_setup_call_warns_with_the_fix() {
    let cluster =
        Cluster::start_without_extension("no-preload", &["shared_preload_libraries = ''"]);
    let (mut db, notices) = cluster.connect_hearing_notices("crm");
    let not_preloaded = "pg_listsync is not in shared_preload_libraries";
    let fix = "Add pg_listsync to shared_preload_libraries";

    db.batch_execute("CREATE EXTENSION pg_listsync").unwrap();
    let heard = notices.take();
    assert!(
        warned_about(&heard, not_preloaded, fix),
        "CREATE EXTENSION: {heard:#?}"
    );

    bind_a_filter(&mut db);
    let heard = notices.take();
    assert!(
        warned_about(
            &heard,
            &format!("bind_filter_to_list: {not_preloaded}"),
            fix
        ),
        "bind_filter_to_list: {heard:#?}"
    );

    db.batch_execute("SELECT listsync.wake()").unwrap();
    assert!(warned_about(
        &notices.take(),
        &format!("wake: {not_preloaded}"),
        fix
    ));
    assert!(!scalar::<bool>(&mut db, "SELECT listsync.check_setup()"));
    assert_eq!(
        scalar::<i64>(&mut db, "SELECT count(*) FROM listsync.workers"),
        0
    );
}

#[test]
fn a_database_outside_listsync_database_is_told_how_to_add_it() {
    let cluster = Cluster::start("unlisted", &[]);
    cluster
        .connect_to("postgres")
        .batch_execute("CREATE DATABASE sales")
        .unwrap();
    let (mut sales, notices) = cluster.connect_hearing_notices("sales");
    sales.batch_execute("CREATE EXTENSION pg_listsync").unwrap();
    let fix = "ALTER SYSTEM SET listsync.database = 'crm, sales'; SELECT pg_reload_conf();";
    let heard = notices.take();
    assert!(
        warned_about(
            &heard,
            "database \"sales\" is not in listsync.database ('crm')",
            fix
        ),
        "{heard:#?}"
    );
    bind_a_filter(&mut sales);
    assert!(warned_about(
        &notices.take(),
        "bind_filter_to_list: database \"sales\"",
        fix
    ));
    assert!(!scalar::<bool>(&mut sales, "SELECT listsync.check_setup()"));

    // The served database is not warned.
    let (mut crm, crm_notices) = cluster.connect_hearing_notices("crm");
    assert!(scalar::<bool>(&mut crm, "SELECT listsync.check_setup()"));
    bind_a_filter(&mut crm);
    let heard = crm_notices.take();
    assert!(
        !heard.iter().any(|n| n.starts_with("WARNING")),
        "{heard:#?}"
    );

    // Following the hint (as psql runs it, one statement at a time) is enough: the launcher
    // starts a worker for the database.
    for statement in fix.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        sales.batch_execute(statement).unwrap();
    }
    let mut sales = cluster.connect_to("sales");
    assert!(scalar::<bool>(&mut sales, "SELECT listsync.check_setup()"));
    wait_for("a worker serving sales", T, || {
        scalar::<i64>(
            &mut crm,
            "SELECT count(*) FROM listsync.workers WHERE database = 'sales' AND cycles > 0",
        ) == 1
    });
}

#[test]
fn the_workers_view_shows_each_running_worker_and_its_cycles() {
    let cluster = Cluster::start("workers-view", &[]);
    let pid = cluster.wait_for_worker();
    let mut db = cluster.connect();
    let cycles = |db: &mut postgres::Client| -> i64 {
        scalar(
            db,
            "SELECT coalesce(sum(cycles), 0)::bigint FROM listsync.workers",
        )
    };
    wait_for("a first cycle", T, || cycles(&mut db) > 0);
    let row = db
        .query_one(
            "SELECT database::text, pid, started_at <= now(), last_cycle_at >= started_at, last_error
               FROM listsync.workers",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "crm");
    assert_eq!(row.get::<_, i32>(1), pid);
    assert!(row.get::<_, bool>(2) && row.get::<_, bool>(3));
    assert_eq!(row.get::<_, Option<String>>(4), None);
    let before = cycles(&mut db);
    db.batch_execute("SELECT listsync.wake()").unwrap();
    wait_for("the woken worker to count a cycle", T, || {
        cycles(&mut db) > before
    });

    // Shared-registry details are for administrators.
    db.batch_execute(
        "CREATE ROLE listsync_someone LOGIN;
         SET ROLE listsync_someone;",
    )
    .unwrap();
    let refused = db
        .batch_execute("SELECT * FROM listsync.workers")
        .expect_err("a role without listsync_admin cannot read the registry");
    assert_eq!(refused.code().map(|c| c.code()), Some("42501"), "{refused}");
}
