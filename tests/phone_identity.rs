//! Contacts known by their phone: over a filter naming a phone column, a Google Contacts binding
//! holds rows without a valid email as contacts with that number and no email, while a webhook
//! binding over the same filter holds only the rows with an email (semantics 1 and 4).

mod common;

use common::*;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// What a list holds: identity → the one field the test maps.
fn held(emulator: &Emulator, provider: &str, list: &str, field: &str) -> BTreeMap<String, Value> {
    emulator
        .list_members(provider, list)
        .into_iter()
        .map(|(identity, fields)| {
            let value = fields.get(field).cloned().unwrap_or(Value::Null);
            (identity, value)
        })
        .collect()
}

fn expected(pairs: &[(&str, &str)]) -> BTreeMap<String, Value> {
    pairs
        .iter()
        .map(|(identity, name)| (identity.to_string(), json!(name)))
        .collect()
}

fn numbers(person: &Value) -> Vec<&str> {
    person["phoneNumbers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["value"].as_str())
        .collect()
}

/// The contact of the binding's label known by this identity.
fn contact_in(emulator: &Emulator, group: &str, phone: &str) -> Value {
    let gc = emulator.google_contacts();
    let members = gc.group_members(group);
    let mut found: Vec<Value> = gc
        .people_with_phone(phone)
        .into_iter()
        .filter(|p| members.contains(p["resourceName"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(found.len(), 1, "one contact with {phone} in {group}");
    found.remove(0)
}

#[test]
fn google_contacts_holds_rows_by_phone_and_the_webhook_only_rows_with_an_email() {
    let emulator = Emulator::start();
    let cluster = Cluster::start("phone_identity", &[]);
    let mut db = cluster.connect();
    db.batch_execute(CONTACTS).unwrap();
    db.batch_execute("ALTER TABLE contacts ADD COLUMN phone text")
        .unwrap();
    db.execute(
        "SELECT listsync.create_connection('google', 'google_contacts', jsonb_build_object('base_url', $1::text),
                 '{\"client_id\": \"client\", \"client_secret\": \"secret\", \"refresh_token\": \"refresh\"}')",
        &[&emulator.base_url("google_contacts")],
    )
    .unwrap();
    emulator
        .google_contacts()
        .set_credentials("client", "secret", "refresh");
    db.execute(
        "SELECT listsync.create_connection('hook', 'webhook', jsonb_build_object('url', $1::text),
                 '{\"signing_secret\": \"a-long-enough-shared-secret\"}')",
        &[&format!("{}/crm", emulator.base_url("webhook"))],
    )
    .unwrap();
    db.batch_execute(
        "SELECT listsync.create_filter('customers', 'contacts', $$ ltv > 100 $$, phone_column => 'phone')",
    )
    .unwrap();
    let google: i64 = scalar(
        &mut db,
        r#"SELECT listsync.bind_filter_to_list('customers', 'google', fields => '{"given_name": "first_name"}')"#,
    );
    let hook: i64 = scalar(
        &mut db,
        r#"SELECT listsync.bind_filter_to_list('customers', 'hook', fields => '{"name": "first_name"}')"#,
    );

    db.batch_execute(
        "INSERT INTO contacts (email, phone, first_name, ltv) VALUES
            ('Ann@Example.com', NULL, 'Ann', 500),
            (NULL, '+49 30 1234567', 'Pia', 500),
            ('bob@example.com', '+1 555 0100 99', 'Bob', 500),
            (NULL, NULL, 'Nil', 500),
            ('not-an-address', '8 (916) 123-45-67', 'Ivan', 500),
            (NULL, '0044 20 7946 0000', 'Olga', 500),
            (NULL, 'ask reception', 'Rex', 500),
            (NULL, '+33 1 23 45 67 89', 'Low', 5)",
    )
    .unwrap();
    let group = wait_synced(&mut db, google, T);
    let endpoint = wait_synced(&mut db, hook, T);
    assert_eq!(
        held(&emulator, "google_contacts", &group, "given_name"),
        expected(&[
            ("ann@example.com", "Ann"),
            ("bob@example.com", "Bob"),
            ("tel:+442079460000", "Olga"),
            ("tel:+49301234567", "Pia"),
            ("tel:89161234567", "Ivan"),
        ]),
        "the email first, else the phone; neither, or a phone that is no number: not sent"
    );
    assert_eq!(
        held(&emulator, "webhook", &endpoint, "name"),
        expected(&[("ann@example.com", "Ann"), ("bob@example.com", "Bob")]),
        "a provider without phone identity holds the email rows only"
    );
    let pia = contact_in(&emulator, &group, "+49 30 1234567");
    assert_eq!(numbers(&pia), ["+49301234567"]);
    assert!(pia.get("emailAddresses").is_none(), "{pia}");
    let s = status(&mut db, google);
    assert_eq!(
        (&s["members"], &s["skipped_invalid_addresses"]),
        (&json!(5), &json!(2)),
        "{s}"
    );
    let s = status(&mut db, hook);
    assert_eq!(
        (&s["members"], &s["skipped_invalid_addresses"]),
        (&json!(2), &json!(5)),
        "{s}"
    );

    // A new number moves the contact; an email takes over from the phone; a mapped field of a
    // phone member changes; a row goes.
    db.batch_execute(
        "UPDATE contacts SET phone = '+49 (30) 765-43-21' WHERE first_name = 'Pia';
         UPDATE contacts SET email = 'ivan@example.com' WHERE first_name = 'Ivan';
         UPDATE contacts SET first_name = 'Olga K.' WHERE first_name = 'Olga';
         DELETE FROM contacts WHERE first_name = 'Bob';",
    )
    .unwrap();
    wait_synced(&mut db, google, T);
    wait_synced(&mut db, hook, T);
    assert_eq!(
        held(&emulator, "google_contacts", &group, "given_name"),
        expected(&[
            ("ann@example.com", "Ann"),
            ("ivan@example.com", "Ivan"),
            ("tel:+442079460000", "Olga K."),
            ("tel:+49307654321", "Pia"),
        ])
    );
    assert_eq!(
        held(&emulator, "webhook", &endpoint, "name"),
        expected(&[("ann@example.com", "Ann"), ("ivan@example.com", "Ivan")])
    );
    let gc = emulator.google_contacts();
    assert_eq!(
        gc.people_with_phone("+49 30 1234567").len(),
        1,
        "Pia's old contact left the label and stays (on_leave remove)"
    );
    assert_eq!(
        numbers(&contact_in(&emulator, &group, "+49 30 7654321")),
        ["+49307654321"]
    );
    let ivan = gc.people_with_email("ivan@example.com");
    assert_eq!(ivan.len(), 1);
    assert!(
        ivan[0].get("phoneNumbers").is_none(),
        "the email's own contact: {}",
        ivan[0]
    );
    assert_eq!(
        gc.people_with_phone("8 916 123 45 67").len(),
        1,
        "the phone-only contact stays, out of the label"
    );

    // Deleting a phone-only row takes its contact out of the label; nothing is duplicated.
    let contacts_before = gc.contact_count();
    db.batch_execute("DELETE FROM contacts WHERE first_name = 'Olga K.'")
        .unwrap();
    wait_synced(&mut db, google, T);
    assert_eq!(
        held(&emulator, "google_contacts", &group, "given_name"),
        expected(&[
            ("ann@example.com", "Ann"),
            ("ivan@example.com", "Ivan"),
            ("tel:+49307654321", "Pia"),
        ])
    );
    assert_eq!(gc.contact_count(), contacts_before);
    let s = status(&mut db, google);
    assert_eq!(s["members"], 3, "{s}");
    let recorded: Vec<String> = db
        .query(
            "SELECT address FROM listsync.members WHERE binding_id = $1 ORDER BY 1",
            &[&google],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        recorded,
        ["ann@example.com", "ivan@example.com", "tel:+49307654321"]
    );
}
