//! Connections are served independently: one whose endpoint hangs delays only its own pairs.

mod common;

use common::*;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(60);

/// How long each injected hang lasts: under the client's timeout, so each ends in a 504.
const HANG: Duration = Duration::from_secs(8);

/// A change for a healthy connection reaches it this soon even while another hangs.
const PROMPT: Duration = Duration::from_secs(3);

#[test]
fn a_hanging_connection_does_not_hold_up_the_others() {
    let emulator = Emulator::start();
    let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    emulator.webhook().set_secret(secret);
    let cluster = Cluster::start("isolation", &["listsync.http_timeout = '10s'"]);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    mailchimp_connection(&mut db, &emulator);
    db.execute(
        "SELECT listsync.create_connection('hook', 'webhook', jsonb_build_object('url', $1::text), jsonb_build_object('signing_secret', $2::text))",
        &[&format!("{}/crm", emulator.base_url("webhook")), &secret],
    )
    .unwrap();
    db.batch_execute(
        "SELECT listsync.create_filter('slow', 'contacts', $$ city = 'slow' $$);
         SELECT listsync.create_filter('fast', 'contacts', $$ city = 'fast' $$);
         INSERT INTO contacts (email, first_name, city) VALUES ('s0@x.io', 'S', 'slow'), ('f0@x.io', 'F', 'fast');",
    )
    .unwrap();
    let slow: i64 = scalar(
        &mut db,
        r#"SELECT listsync.bind_filter_to_list('slow', 'mc', fields => '{"FNAME": "first_name"}')"#,
    );
    let fast: i64 = scalar(
        &mut db,
        r#"SELECT listsync.bind_filter_to_list('fast', 'hook', fields => '{"name": "first_name"}')"#,
    );
    let slow_list = wait_synced(&mut db, slow, T);
    let fast_list = wait_synced(&mut db, fast, T);

    // Mailchimp hangs on its next two requests: the change and its retry.
    let faults = emulator.faults("mailchimp");
    faults.push(Fault::Timeout(HANG));
    faults.push(Fault::Timeout(HANG));
    db.batch_execute(
        "INSERT INTO contacts (email, first_name, city) VALUES ('s1@x.io', 'S', 'slow')",
    )
    .unwrap();
    let hung_since = Instant::now();
    for (round, pending) in [(1, 1), (2, 0)] {
        wait_for(&format!("Mailchimp hang {round} to start"), T, || {
            faults.pending() == pending
        });
        let address = format!("f{round}@x.io");
        let started = Instant::now();
        db.execute(
            "INSERT INTO contacts (email, first_name, city) VALUES ($1, 'F', 'fast')",
            &[&address],
        )
        .unwrap();
        wait_for(
            &format!("{address} to reach the webhook while Mailchimp hangs"),
            PROMPT,
            || {
                emulator
                    .list_members("webhook", &fast_list)
                    .contains_key(&address)
            },
        );
        assert!(
            started.elapsed() < PROMPT,
            "{address} took {:?}",
            started.elapsed()
        );
    }
    assert!(
        !emulator
            .list_members("mailchimp", &slow_list)
            .contains_key("s1@x.io"),
        "the webhook changes went out while Mailchimp was still hanging"
    );

    // The hung connection catches up once its endpoint answers again.
    wait_synced(&mut db, slow, T);
    assert!(
        hung_since.elapsed() >= HANG * 2,
        "both hangs were waited out"
    );
    assert!(
        emulator
            .list_members("mailchimp", &slow_list)
            .contains_key("s1@x.io")
    );
    assert_eq!(status(&mut db, slow)["dead_letters"], 0);
    assert_eq!(status(&mut db, fast)["pending"], 0);
}
