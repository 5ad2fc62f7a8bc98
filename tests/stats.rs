//! The worker counts what it does per binding (`listsync.stats`), and `listsync.metrics()`
//! serves the counters and the status gauges in Prometheus' text format.

mod common;

use common::*;
use listsync_emulator::Fault;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

#[test]
fn the_counters_follow_what_reached_the_provider_and_metrics_expose_them() {
    let emulator = Emulator::start();
    let cluster = Cluster::start("stats", &[]);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    mailchimp_connection(&mut db, &emulator);
    db.batch_execute("SELECT listsync.create_filter('vip', 'contacts', $$ city = 'Moscow' $$)")
        .unwrap();
    let binding: i64 = scalar(
        &mut db,
        r#"SELECT listsync.bind_filter_to_list('vip', 'mc', fields => '{"FNAME": "first_name"}')"#,
    );
    emulator
        .mailchimp()
        .reject_address("banned@x.io", "banned@x.io has been banned from this list");
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, city) VALUES
            ('ann@x.io', 'Ann', 'Moscow'), ('bob@x.io', 'Bob', 'Moscow'), ('banned@x.io', 'B', 'Moscow')",
    )
    .unwrap();
    wait_synced(&mut db, binding, T);
    // One cycle held back by the provider's rate limit, then an edit and a leave.
    emulator
        .faults("mailchimp")
        .push(Fault::too_many_requests(Some(1)));
    db.batch_execute(
        "UPDATE contacts SET first_name = 'Anna' WHERE email = 'ann@x.io';
         UPDATE contacts SET city = 'Paris' WHERE email = 'bob@x.io';",
    )
    .unwrap();
    wait_synced(&mut db, binding, T);

    let counted = |db: &mut postgres::Client| -> Vec<i64> {
        let row = db
            .query_one(
                "SELECT added, updated, removed, erased, refused, failed, throttled
                   FROM listsync.stats WHERE binding = $1",
                &[&binding],
            )
            .unwrap();
        (0..7).map(|i| row.get(i)).collect()
    };
    assert_eq!(
        counted(&mut db),
        [2, 1, 1, 0, 0, 1, 1],
        "added, updated, removed, erased, refused, failed, throttled"
    );

    let metrics: String = scalar(&mut db, "SELECT listsync.metrics()");
    let labels = format!(
        "database=\"crm\",binding=\"{binding}\",filter=\"vip\",connection=\"mc\",provider=\"mailchimp\""
    );
    for line in [
        "# TYPE listsync_items_total counter".to_string(),
        format!("listsync_items_total{{{labels},outcome=\"added\"}} 2"),
        format!("listsync_items_total{{{labels},outcome=\"failed\"}} 1"),
        format!("listsync_throttled_total{{{labels}}} 1"),
        "# TYPE listsync_pending gauge".to_string(),
        format!("listsync_pending{{{labels}}} 0"),
        format!("listsync_members{{{labels}}} 1"),
        format!("listsync_dead_letters{{{labels}}} 1"),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no line {line:?} in:\n{metrics}"
        );
    }
    // Every sample line is `name{labels} number`, as scrapers parse it.
    for sample in metrics.lines().filter(|l| !l.starts_with('#')) {
        let (_, value) = sample.rsplit_once(' ').unwrap();
        assert!(value.parse::<f64>().is_ok(), "{sample}");
    }

    // Counters go with their binding.
    db.execute("SELECT listsync.unbind($1)", &[&binding])
        .unwrap();
    assert_eq!(
        scalar::<i64>(&mut db, "SELECT count(*) FROM listsync.counters"),
        0
    );
}
