//! The worker delivering to the Mailchimp emulator and the webhook receiver: what the provider
//! holds follows the filter through every kind of change (semantics 1, 4, 5, 6).

mod common;

use common::*;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

fn fields(pairs: &[(&str, &str)]) -> Map<String, Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), json!(v)))
        .collect()
}

fn setup(name: &str, settings: &[&str]) -> (Cluster, Emulator, postgres::Client, i64) {
    let emulator = Emulator::start();
    let cluster = Cluster::start(name, settings);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    mailchimp_connection(&mut db, &emulator);
    db.batch_execute("SELECT listsync.create_filter('vip', 'contacts', $$ city = 'Moscow' AND ltv > 1000 AND NOT is_deleted $$)")
        .unwrap();
    let binding: i64 = scalar(
        &mut db,
        r#"SELECT listsync.bind_filter_to_list('vip', 'mc', fields => '{"FNAME": "first_name", "LNAME": "last_name"}', tags => ARRAY['crm'])"#,
    );
    (cluster, emulator, db, binding)
}

#[test]
fn the_list_follows_the_filter() {
    let (_cluster, emulator, mut db, binding) = setup("follows", &[]);
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, last_name, city, ltv) VALUES
            ('Ann@Example.com', 'Ann', 'Lee', 'Moscow', 5000),
            ('bob@example.com', 'Bob', 'Ray', 'Paris', 5000),
            (NULL, 'Nul', 'L', 'Moscow', 5000),
            ('not-an-address', 'Bad', 'A', 'Moscow', 5000)",
    )
    .unwrap();
    let list = wait_synced(&mut db, binding, T);
    let expect = |pairs: &[(&str, Map<String, Value>)]| -> BTreeMap<String, Map<String, Value>> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    };
    assert_eq!(
        emulator.list_members("mailchimp", &list),
        expect(&[(
            "ann@example.com",
            fields(&[("FNAME", "Ann"), ("LNAME", "Lee")])
        )])
    );
    assert_eq!(
        emulator
            .mailchimp()
            .segments("a1")
            .iter()
            .find(|s| s.id.to_string() == list)
            .unwrap()
            .name,
        "vip (postgres)"
    );
    assert!(
        emulator
            .mailchimp()
            .member("a1", "ann@example.com")
            .unwrap()
            .tags
            .contains("crm"),
        "binding tags applied"
    );
    let s = status(&mut db, binding);
    assert_eq!(s["members"], 1, "{s}");
    assert_eq!(s["skipped_invalid_addresses"], 2, "{s}");

    // enters, mapped change, unmapped change
    db.batch_execute("UPDATE contacts SET city = 'Moscow' WHERE first_name = 'Bob'")
        .unwrap();
    db.batch_execute("UPDATE contacts SET first_name = 'Anna' WHERE first_name = 'Ann'")
        .unwrap();
    db.batch_execute("UPDATE contacts SET last_seen_at = now()")
        .unwrap();
    wait_synced(&mut db, binding, T);
    assert_eq!(
        emulator.list_members("mailchimp", &list),
        expect(&[
            (
                "ann@example.com",
                fields(&[("FNAME", "Anna"), ("LNAME", "Lee")])
            ),
            (
                "bob@example.com",
                fields(&[("FNAME", "Bob"), ("LNAME", "Ray")])
            ),
        ])
    );

    // email change moves membership; leaving removes the tag (the contact stays)
    db.batch_execute("UPDATE contacts SET email = 'anna@new.example' WHERE first_name = 'Anna'")
        .unwrap();
    db.batch_execute("UPDATE contacts SET is_deleted = true WHERE first_name = 'Bob'")
        .unwrap();
    wait_synced(&mut db, binding, T);
    assert_eq!(
        emulator
            .list_members("mailchimp", &list)
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec!["anna@new.example".to_string()]
    );
    let bob = emulator
        .mailchimp()
        .member("a1", "bob@example.com")
        .expect("remove keeps the contact");
    assert_eq!(bob.status, "subscribed");
    assert!(!bob.tags.contains("vip (postgres)"));

    // two rows sharing an address: it stays while any row holds it; fields from the greatest key
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, last_name, city, ltv) VALUES ('Anna@New.Example ', 'Second', 'Row', 'Moscow', 9000)",
    )
    .unwrap();
    wait_synced(&mut db, binding, T);
    assert_eq!(
        emulator.list_members("mailchimp", &list)["anna@new.example"],
        fields(&[("FNAME", "Second"), ("LNAME", "Row")])
    );
    db.batch_execute("DELETE FROM contacts WHERE first_name = 'Second'")
        .unwrap();
    wait_synced(&mut db, binding, T);
    assert_eq!(
        emulator.list_members("mailchimp", &list)["anna@new.example"],
        fields(&[("FNAME", "Anna"), ("LNAME", "Lee")])
    );

    db.batch_execute("DELETE FROM contacts").unwrap();
    wait_synced(&mut db, binding, T);
    assert!(emulator.list_members("mailchimp", &list).is_empty());
    assert_eq!(status(&mut db, binding)["members"], 0);
}

#[test]
fn a_commit_wakes_the_worker_without_polling() {
    // With a 10-minute polling interval only the commit-time latch can deliver in time.
    let (cluster, emulator, mut db, binding) = setup("wake", &["listsync.poll_interval = '10min'"]);
    cluster.wait_for_worker();
    let list = wait_synced(&mut db, binding, T);
    db.batch_execute("INSERT INTO contacts (email, first_name, city, ltv) VALUES ('w@x.io', 'W', 'Moscow', 5000)").unwrap();
    wait_for(
        "the commit to reach the provider",
        Duration::from_secs(20),
        || {
            emulator
                .list_members("mailchimp", &list)
                .contains_key("w@x.io")
        },
    );
}

#[test]
fn consent_at_the_provider_is_never_overridden() {
    let (_cluster, emulator, mut db, binding) = setup("consent", &[]);
    db.batch_execute("INSERT INTO contacts (email, first_name, city, ltv) VALUES ('u@x.io', 'U', 'Moscow', 5000)").unwrap();
    let list = wait_synced(&mut db, binding, T);
    assert!(
        emulator
            .list_members("mailchimp", &list)
            .contains_key("u@x.io")
    );
    // The contact unsubscribes at Mailchimp; the CRM then changes a mapped field.
    assert!(
        emulator
            .mailchimp()
            .set_status("a1", "u@x.io", "unsubscribed")
    );
    db.batch_execute("UPDATE contacts SET first_name = 'Ulla' WHERE email = 'u@x.io'")
        .unwrap();
    wait_synced(&mut db, binding, T);
    assert_eq!(
        emulator.mailchimp().member("a1", "u@x.io").unwrap().status,
        "unsubscribed"
    );
    assert!(emulator.mailchimp().resubscribed("a1").is_empty());
    let s = status(&mut db, binding);
    assert_eq!(s["refused"], 1, "{s}");
    let recorded: String = scalar(
        &mut db,
        "SELECT status FROM listsync.members WHERE address = 'u@x.io'",
    );
    assert_eq!(recorded, "unsubscribed");
    // Further changes are terminal outcomes, not retry loops.
    emulator.clear_requests("mailchimp");
    db.batch_execute("UPDATE contacts SET first_name = 'Ulrike' WHERE email = 'u@x.io'")
        .unwrap();
    wait_synced(&mut db, binding, T);
    assert!(
        emulator.requests("mailchimp").is_empty(),
        "nothing sent for an unsubscribed address"
    );
    // Local suppression works the same way, and takes a member out.
    db.batch_execute("INSERT INTO contacts (email, first_name, city, ltv) VALUES ('s@x.io', 'S', 'Moscow', 5000)").unwrap();
    wait_synced(&mut db, binding, T);
    db.batch_execute("SELECT listsync.suppress('S@x.io', 'asked by phone')")
        .unwrap();
    wait_synced(&mut db, binding, T);
    assert!(
        !emulator
            .list_members("mailchimp", &list)
            .contains_key("s@x.io")
    );
}

#[test]
fn on_leave_archive_unsubscribe_delete_and_keep() {
    let emulator = Emulator::start();
    let cluster = Cluster::start("on_leave", &[]);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    mailchimp_connection(&mut db, &emulator);
    let mut bindings = Vec::new();
    for action in ["archive", "unsubscribe", "delete", "keep"] {
        db.batch_execute(&format!(
            "SELECT listsync.create_filter('{action}', 'contacts', $$ city = '{action}' $$);
             SELECT listsync.bind_filter_to_list('{action}', 'mc', on_leave => '{action}');"
        ))
        .unwrap();
        db.batch_execute(&format!(
            "INSERT INTO contacts (email, city) VALUES ('{action}@x.io', '{action}')"
        ))
        .unwrap();
        bindings.push(scalar::<i64>(
            &mut db,
            &format!("SELECT id FROM listsync.bindings WHERE filter_name = '{action}'"),
        ));
    }
    for b in &bindings {
        wait_synced(&mut db, *b, T);
    }
    db.batch_execute("UPDATE contacts SET city = 'elsewhere'")
        .unwrap();
    for b in &bindings {
        wait_synced(&mut db, *b, T);
    }
    let mc = emulator.mailchimp();
    assert_eq!(mc.member("a1", "archive@x.io").unwrap().status, "archived");
    assert_eq!(
        mc.member("a1", "unsubscribe@x.io").unwrap().status,
        "unsubscribed"
    );
    assert!(mc.member("a1", "delete@x.io").is_none());
    assert!(
        mc.permanently_deleted("a1")
            .iter()
            .any(|a| a == "delete@x.io")
    );
    let kept = mc.member("a1", "keep@x.io").unwrap();
    assert_eq!(kept.status, "subscribed");
    assert!(
        kept.tags.contains("keep (postgres)"),
        "keep leaves the contact tagged"
    );
    assert_eq!(
        scalar::<i64>(&mut db, "SELECT count(*) FROM listsync.members"),
        0
    );
}

#[test]
fn webhook_batches_are_signed_and_applied() {
    let emulator = Emulator::start();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    emulator.webhook().set_secret(secret);
    let cluster = Cluster::start("webhook", &[]);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    db.execute(
        "SELECT listsync.create_connection('hook', 'webhook', jsonb_build_object('url', $1::text), jsonb_build_object('signing_secret', $2::text))",
        &[&format!("{}/crm", emulator.base_url("webhook")), &secret],
    )
    .unwrap();
    db.batch_execute(
        "SELECT listsync.create_filter('vip', 'contacts', $$ ltv > 1000 $$);
         SELECT listsync.bind_filter_to_list('vip', 'hook', fields => '{\"name\": \"first_name || '' '' || last_name\"}');
         INSERT INTO contacts (email, first_name, last_name, ltv) SELECT 'p' || g || '@x.io', 'P', g::text, 5000 FROM generate_series(1, 1200) g;",
    )
    .unwrap();
    let binding: i64 = scalar(&mut db, "SELECT id FROM listsync.bindings");
    let list = wait_synced(&mut db, binding, T);
    let members = emulator.list_members("webhook", &list);
    assert_eq!(members.len(), 1200);
    assert_eq!(members["p7@x.io"]["name"], "P 7");
    let received = emulator.webhook().received();
    assert!(
        received.len() >= 3,
        "1200 changes in batches of at most 500"
    );
    assert!(
        received.iter().all(|d| d.signature_valid),
        "every delivery carries a valid signature"
    );
    db.batch_execute("UPDATE contacts SET ltv = 0 WHERE id <= 200")
        .unwrap();
    wait_synced(&mut db, binding, T);
    assert_eq!(emulator.list_members("webhook", &list).len(), 1000);
    // A receiver that refuses the signature (wrong secret) gets nothing applied: 401 is auth.
    emulator
        .webhook()
        .set_secret("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA");
    db.batch_execute("UPDATE contacts SET ltv = 0 WHERE id = 201")
        .unwrap();
    wait_for("the binding to stop on authentication failure", T, || {
        status(&mut db, binding)["state"] == "error"
    });
    assert_eq!(emulator.list_members("webhook", &list).len(), 1000);
}

#[test]
fn the_worker_creates_the_list_and_checks_merge_fields() {
    let (_cluster, emulator, mut db, binding) = setup("prepare", &[]);
    let list = wait_synced(&mut db, binding, T);
    assert!(
        emulator
            .mailchimp()
            .segments("a1")
            .iter()
            .any(|s| s.id.to_string() == list && s.name == "vip (postgres)")
    );
    // A merge field the audience does not have: the binding goes to error with the reason.
    db.batch_execute(
        r#"SELECT listsync.create_filter('all', 'contacts', 'true');
           SELECT listsync.bind_filter_to_list('all', 'mc', fields => '{"NOSUCH": "city"}');
           INSERT INTO contacts (email) VALUES ('x@x.io');"#,
    )
    .unwrap();
    let broken: i64 = scalar(
        &mut db,
        "SELECT id FROM listsync.bindings WHERE filter_name = 'all'",
    );
    wait_for("the binding to report the missing merge field", T, || {
        status(&mut db, broken)["state_reason"]
            .as_str()
            .is_some_and(|r| r.contains("field NOSUCH does not exist at Mailchimp"))
    });
    assert_eq!(status(&mut db, broken)["state"], "error");
    // Fixing it at the provider and resuming delivers.
    emulator.mailchimp().add_merge_field("a1", "NOSUCH", "text");
    db.execute("SELECT listsync.resume_binding($1)", &[&broken])
        .unwrap();
    let list = wait_synced(&mut db, broken, T);
    assert_eq!(
        emulator.list_members("mailchimp", &list)["x@x.io"],
        fields(&[("NOSUCH", "")])
    );
}

#[test]
fn resync_dry_run_and_backfill() {
    let (_cluster, emulator, mut db, binding) = setup("resync", &[]);
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, city, ltv) SELECT 'b' || g || '@x.io', 'B', 'Moscow', 5000 FROM generate_series(1, 3000) g",
    )
    .unwrap();
    let list = wait_synced(&mut db, binding, Duration::from_secs(120));
    assert_eq!(emulator.list_members("mailchimp", &list).len(), 3000);
    // Someone removes a member's tag at Mailchimp by hand: the recorded state no longer matches.
    // dry_run shows nothing (it compares with what we recorded); resync re-sends everything and
    // the provider ends right again.
    emulator.mailchimp().set_status("a1", "b1@x.io", "archived");
    let planned: i64 = scalar(
        &mut db,
        &format!("SELECT count(*) FROM listsync.dry_run({binding})"),
    );
    assert_eq!(planned, 0);
    db.batch_execute("UPDATE listsync.members SET fields = '{}' WHERE address = 'b2@x.io'")
        .unwrap();
    let planned: Vec<(String, String)> = db
        .query(
            &format!("SELECT address, operation FROM listsync.dry_run({binding})"),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(planned, vec![("b2@x.io".to_string(), "update".to_string())]);
    let marked: i64 = scalar(&mut db, &format!("SELECT listsync.resync({binding})"));
    assert_eq!(marked, 3000);
    wait_synced(&mut db, binding, Duration::from_secs(120));
    assert_eq!(
        emulator.list_members("mailchimp", &list).len(),
        2999,
        "a plain resync trusts what was recorded"
    );
    assert_eq!(
        scalar::<String>(
            &mut db,
            "SELECT fields->>'FNAME' FROM listsync.members WHERE address = 'b2@x.io'"
        ),
        "B"
    );
    db.batch_execute(&format!("SELECT listsync.resync({binding}, full => true)"))
        .unwrap();
    wait_synced(&mut db, binding, Duration::from_secs(120));
    assert_eq!(
        emulator.list_members("mailchimp", &list).len(),
        3000,
        "a full resync repairs the provider"
    );
}
