//! Faults at the provider: throttling, server errors, timeouts, resets, malformed answers,
//! per-item refusals and authentication failures. Nothing is lost, nothing loops forever, and
//! listsync.status tells the truth throughout.

mod common;

use common::*;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

fn setup(name: &str) -> (Cluster, Emulator, postgres::Client, i64, String) {
    let emulator = Emulator::start();
    // Injected timeouts hold a request 3 s; the client gives up after 1 s.
    emulator
        .faults("mailchimp")
        .set_timeout(Duration::from_secs(3));
    let cluster = Cluster::start(name, &["listsync.http_timeout = '1s'"]);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    mailchimp_connection(&mut db, &emulator);
    db.batch_execute("SELECT listsync.create_filter('vip', 'contacts', $$ ltv > 1000 $$)")
        .unwrap();
    let binding: i64 = scalar(
        &mut db,
        r#"SELECT listsync.bind_filter_to_list('vip', 'mc', fields => '{"FNAME": "first_name"}')"#,
    );
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, ltv) VALUES ('first@x.io', 'F', 5000)",
    )
    .unwrap();
    let list = wait_synced(&mut db, binding, T);
    (cluster, emulator, db, binding, list)
}

fn insert(db: &mut postgres::Client, from: i32, to: i32) {
    db.execute(
        "INSERT INTO contacts (email, first_name, ltv) SELECT 'c' || g || '@x.io', 'C' || g, 5000 FROM generate_series($1::int, $2::int) g",
        &[&from, &to],
    )
    .unwrap();
}

#[test]
fn every_transient_fault_is_retried_until_delivered() {
    let (_cluster, emulator, mut db, binding, list) = setup("transient");
    let faults = emulator.faults("mailchimp");
    faults.push(Fault::too_many_requests(Some(1)));
    faults.push(Fault::too_many_requests(None));
    faults.push(Fault::status(500));
    faults.push(Fault::status(503));
    faults.push(Fault::Timeout(Duration::from_secs(3)));
    faults.push(Fault::Reset);
    faults.push(Fault::MalformedJson);
    faults.push(Fault::LostResponse);
    insert(&mut db, 1, 50);
    wait_synced(&mut db, binding, T);
    assert_eq!(faults.pending(), 0, "every scripted fault was hit");
    assert_eq!(emulator.list_members("mailchimp", &list).len(), 51);
    let outcomes: Vec<String> = db
        .query(
            "SELECT DISTINCT outcome FROM listsync.deliveries ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        outcomes,
        vec!["error", "ok", "transport error"],
        "the call log shows what happened"
    );
    assert_eq!(status(&mut db, binding)["dead_letters"], 0);
}

#[test]
fn retry_after_throttles_the_whole_connection() {
    let (_cluster, emulator, mut db, binding, list) = setup("throttle");
    emulator
        .faults("mailchimp")
        .push(Fault::too_many_requests(Some(3)));
    let started = Instant::now();
    insert(&mut db, 1, 5);
    wait_for("the connection to be throttled", T, || {
        status(&mut db, binding)["throttled_until"].is_string()
    });
    wait_synced(&mut db, binding, T);
    assert!(
        started.elapsed() >= Duration::from_secs(3),
        "Retry-After: 3 was honoured"
    );
    assert_eq!(emulator.list_members("mailchimp", &list).len(), 6);
}

#[test]
fn an_outage_that_heals_loses_nothing() {
    let (_cluster, emulator, mut db, binding, list) = setup("outage");
    emulator.faults("mailchimp").set_down(true);
    insert(&mut db, 1, 200);
    db.batch_execute("UPDATE contacts SET first_name = 'Changed' WHERE id % 3 = 0")
        .unwrap();
    db.batch_execute("UPDATE contacts SET ltv = 0 WHERE id % 5 = 0")
        .unwrap();
    wait_for("failures to be visible", T, || {
        let s = status(&mut db, binding);
        s["last_error"].as_str().is_some_and(|e| e.contains("503"))
            && s["pending"].as_i64().unwrap_or(0) > 0
    });
    emulator.faults("mailchimp").set_down(false);
    wait_synced(&mut db, binding, T);
    let expected: std::collections::BTreeMap<String, String> = db
        .query(
            "SELECT lower(email), first_name FROM contacts WHERE ltv > 1000",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let actual: std::collections::BTreeMap<String, String> = emulator
        .list_members("mailchimp", &list)
        .into_iter()
        .map(|(address, fields)| {
            (
                address,
                fields["FNAME"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    assert_eq!(actual, expected);
}

#[test]
fn per_item_refusals_become_dead_letters_while_the_rest_proceeds() {
    let (_cluster, emulator, mut db, binding, list) = setup("dead");
    emulator
        .mailchimp()
        .reject_address("c3@x.io", "c3@x.io has been banned from this list");
    insert(&mut db, 1, 5);
    wait_synced(&mut db, binding, T);
    let members = emulator.list_members("mailchimp", &list);
    assert_eq!(members.len(), 5, "four new ones and the first");
    assert!(!members.contains_key("c3@x.io"));
    let (address, error): (String, String) = {
        let row = db
            .query_one("SELECT address, error FROM listsync.dead_letters", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(address, "c3@x.io");
    assert!(
        error.contains("has been banned"),
        "the provider's words: {error}"
    );
    assert_eq!(status(&mut db, binding)["dead_letters"], 1);
    // Fixed at the provider: a retry delivers it and clears the dead letter.
    emulator.mailchimp().clear_rejections();
    let retried: i64 = scalar(&mut db, "SELECT listsync.retry_dead_letters()");
    assert_eq!(retried, 1);
    wait_synced(&mut db, binding, T);
    assert!(
        emulator
            .list_members("mailchimp", &list)
            .contains_key("c3@x.io")
    );
    assert_eq!(status(&mut db, binding)["dead_letters"], 0);
}

#[test]
fn retryable_failures_give_up_into_a_dead_letter_after_max_attempts() {
    let (cluster, emulator, mut db, binding, _list) = setup("give_up");
    cluster.reconfigure(&[("listsync.max_attempts", "3")]);
    emulator.faults("mailchimp").set_down(true);
    insert(&mut db, 1, 1);
    wait_for("a dead letter after 3 attempts", T, || {
        status(&mut db, binding)["dead_letters"] == 1
    });
    let error: String = scalar(&mut db, "SELECT error FROM listsync.dead_letters");
    assert!(error.starts_with("gave up after 3 attempts"), "{error}");
}

#[test]
fn authentication_failure_stops_the_connection_until_fixed() {
    let (_cluster, emulator, mut db, binding, list) = setup("auth");
    emulator.mailchimp().set_api_key("the-real-key-us21");
    insert(&mut db, 1, 3);
    wait_for("the binding to stop", T, || {
        status(&mut db, binding)["state"] == "error"
    });
    let s = status(&mut db, binding);
    assert!(
        s["state_reason"]
            .as_str()
            .unwrap()
            .contains("API Key Invalid"),
        "{s}"
    );
    assert!(
        !s.to_string().contains("0123456789abcdef"),
        "no secret in the status"
    );
    // Stopped means stopped: no further calls.
    std::thread::sleep(Duration::from_secs(2));
    emulator.clear_requests("mailchimp");
    insert(&mut db, 4, 4);
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        emulator.requests("mailchimp").is_empty(),
        "no calls while the credentials are known bad"
    );
    assert_eq!(status(&mut db, binding)["pending"], 4);
    // The operator rotates the key: everything pending goes out.
    db.batch_execute(
        "SELECT listsync.alter_connection('mc', secrets => '{\"api_key\": \"the-real-key-us21\"}')",
    )
    .unwrap();
    wait_synced(&mut db, binding, T);
    assert_eq!(status(&mut db, binding)["state"], "active");
    assert_eq!(emulator.list_members("mailchimp", &list).len(), 5);
}

#[test]
fn a_binding_that_cannot_read_its_rows_stops_alone() {
    let (_cluster, emulator, mut db, good, list) = setup("stops_alone");
    // A mapped expression that fails on some rows (division by zero when ltv = 7000).
    db.batch_execute(
        r#"SELECT listsync.create_filter('fragile', 'contacts', 'ltv > 1000');
           SELECT listsync.bind_filter_to_list('fragile', 'mc', fields => '{"FNAME": "(100 / (ltv - 7000))::text"}');"#,
    )
    .unwrap();
    let fragile: i64 = scalar(
        &mut db,
        "SELECT id FROM listsync.bindings WHERE filter_name = 'fragile'",
    );
    db.batch_execute("INSERT INTO contacts (email, first_name, ltv) VALUES ('zero@x.io', 'Z', 7000), ('fine@x.io', 'F', 5000)").unwrap();
    wait_for("the fragile binding to stop", T, || {
        status(&mut db, fragile)["state"] == "error"
    });
    let reason = status(&mut db, fragile)["state_reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(reason.contains("division by zero"), "{reason}");
    wait_synced(&mut db, good, T);
    assert!(
        emulator
            .list_members("mailchimp", &list)
            .contains_key("fine@x.io"),
        "the other binding went on"
    );
}
