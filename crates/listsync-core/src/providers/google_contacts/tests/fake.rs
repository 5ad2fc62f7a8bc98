use super::*;
use crate::providers::conformance::{Erasure, Fake, WRONG_SECRET, conformance_suite};
use crate::providers::test_support;
use crate::providers::test_support::{Bound, connected, known_member as member, remote_id};
use listsync_emulator::{Emulator, Fault};

fn provider(emulator: &Emulator) -> Box<dyn Provider> {
    provider_with_refresh_token(emulator, "refresh")
}

/// A provider of the account whose refresh token is `refresh`, presenting `refresh_token`.
fn provider_with_refresh_token(emulator: &Emulator, refresh_token: &str) -> Box<dyn Provider> {
    let config = test_support::config(
        json!({"base_url": emulator.base_url("google_contacts")}),
        json!({"client_id": "client", "client_secret": "secret", "refresh_token": refresh_token}),
    );
    emulator
        .google_contacts()
        .set_credentials("client", "secret", "refresh");
    connect(&config)
}

fn binding(tags: &[&str]) -> Binding {
    Binding {
        id: 7,
        tags: tags.iter().map(|t| t.to_string()).collect(),
        ..test_support::binding(&["given_name", "phone"])
    }
}

fn list(emulator: &Emulator, binding: &Binding) -> BTreeMap<String, Map<String, Value>> {
    emulator.list_members("google_contacts", binding.list_id.as_deref().unwrap())
}

fn person(emulator: &Emulator, rn: &str) -> Value {
    emulator
        .google_contacts()
        .person(rn)
        .expect("the contact exists")
}

#[test]
fn groups_are_created_reused_and_checked() {
    let (emulator, mut provider, mut http) = connected::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    let mut first = binding(&["crm"]);
    provider.prepare(&mut http, &mut first).unwrap();
    let group = first.list_id.clone().unwrap();
    assert_eq!(gc.group_named("vip (crm)"), Some(group.clone()));
    assert_eq!(
        first.remote["tag_groups"]["crm"],
        json!(gc.group_named("crm").unwrap())
    );
    let mut again = binding(&["crm"]);
    provider.prepare(&mut http, &mut again).unwrap();
    assert_eq!(again.list_id, Some(group.clone()), "reused by name");
    assert_eq!(gc.groups().iter().filter(|g| !g.system).count(), 2);

    let mut by_id = binding(&[]);
    by_id.list_id = Some(group.trim_start_matches("contactGroups/").to_string());
    provider.prepare(&mut http, &mut by_id).unwrap();
    assert_eq!(
        by_id.list_id,
        Some(group.clone()),
        "stored as the resource name"
    );
    for missing in ["contactGroups/0ff", "myContacts"] {
        let mut wrong = binding(&[]);
        wrong.list_id = Some(missing.into());
        let error = provider.prepare(&mut http, &mut wrong).unwrap_err();
        assert!(
            matches!(error, ProviderError::Binding(_)),
            "{missing}: {error:?}"
        );
    }
    let status = provider.check(&mut http).unwrap();
    assert_eq!(status["contact_groups"], 4, "{status}");
    assert_eq!(status["contact_limit"], CONTACT_LIMIT);
}

#[test]
fn members_are_created_in_the_group_with_their_fields() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let mut tagged = binding(&["crm"]);
    s.provider.prepare(&mut s.http, &mut tagged).unwrap();
    s.binding = tagged;
    let outcomes = s.upsert(&[
        member(
            "ann@example.com",
            json!({"given_name": "Ann", "family_name": "Lee", "phone": "+1 555 0100",
                   "organization": "Acme", "job_title": "CTO", "birthday": "1990-07-14",
                   "address": "1 Main St, Springfield", "url": "https://ann.example",
                   "biography": "VIP since 2020", "user:crm_id": 42}),
            None,
        ),
        member(
            "bob@example.com",
            json!({"given_name": "Bob", "phone": null}),
            None,
        ),
    ]);
    let ann = remote_id(&outcomes[0]);
    assert!(ann.starts_with("people/c"), "{ann}");
    let list = list(&emulator, &s.binding);
    assert_eq!(
        Value::Object(list["ann@example.com"].clone()),
        json!({"given_name": "Ann", "family_name": "Lee", "phone": "+1 555 0100",
               "organization": "Acme", "job_title": "CTO", "birthday": "1990-07-14",
               "address": "1 Main St, Springfield", "url": "https://ann.example",
               "biography": "VIP since 2020", "user:crm_id": "42"})
    );
    assert_eq!(
        Value::Object(list["bob@example.com"].clone()),
        json!({"given_name": "Bob"})
    );
    let crm = s.binding.remote["tag_groups"]["crm"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        emulator.google_contacts().group_members(&crm).len(),
        2,
        "tags are labels"
    );
    let again = s.upsert(&[member(
        "ann@example.com",
        json!({"given_name": "Ann"}),
        Some(&ann),
    )]);
    assert_eq!(remote_id(&again[0]), ann);
    assert_eq!(
        emulator.google_contacts().contact_count(),
        2,
        "no duplicate"
    );
}

#[test]
fn updates_change_only_the_mapped_fields() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let ann = remote_id(
        &s.upsert(&[member(
            "ann@example.com",
            json!({"given_name": "Ann", "phone": "+1 555 0100"}),
            None,
        )])[0],
    );
    let gc = emulator.google_contacts();
    // The user adds a work number, a nickname and a label of their own.
    let mut phones = person(&emulator, &ann)["phoneNumbers"]
        .as_array()
        .unwrap()
        .clone();
    phones.push(json!({"value": "+1 555 0199", "type": "work"}));
    gc.edit_contact(&ann, "phoneNumbers", Value::Array(phones));
    gc.edit_contact(&ann, "nicknames", json!([{"value": "Annie"}]));
    let mut user = binding(&[]);
    user.list_name = "Friends".into();
    s.provider.prepare(&mut s.http, &mut user).unwrap();
    let friends = user.list_id.clone().unwrap();
    // The user's label, put on through the API as any client would.
    s.provider
        .upsert(
            &mut s.http,
            &user,
            &[member("ann@example.com", json!({}), Some(&ann))],
        )
        .unwrap();
    let outcomes = s.upsert(&[member(
        "ann@example.com",
        json!({"given_name": "Anna", "phone": "+1 555 0111"}),
        Some(&ann),
    )]);
    assert_eq!(remote_id(&outcomes[0]), ann);
    let person = person(&emulator, &ann);
    assert_eq!(person["names"][0]["givenName"], "Anna");
    let numbers: Vec<&str> = person["phoneNumbers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["value"].as_str().unwrap())
        .collect();
    assert_eq!(numbers, ["+1 555 0111", "+1 555 0199"]);
    assert_eq!(person["nicknames"][0]["value"], "Annie");
    assert!(gc.group_members(&friends).contains(&ann), "labels stay");
    let before = gc.person(&ann).unwrap()["etag"].clone();
    s.upsert(&[member(
        "ann@example.com",
        json!({"given_name": "Anna", "phone": "+15550111"}),
        Some(&ann),
    )]);
    let requests = emulator.requests("google_contacts");
    assert_ne!(
        gc.person(&ann).unwrap()["etag"],
        before,
        "reformatted number written"
    );
    assert!(
        requests
            .iter()
            .any(|r| r.path == "/v1/people:batchUpdateContacts")
    );
}

#[test]
fn an_existing_contact_joins_instead_of_being_duplicated() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    let existing = gc.insert_contact(
        json!({"names": [{"givenName": "Carol"}], "emailAddresses": [{"value": "Carol@Example.com"}],
               "phoneNumbers": [{"value": "+44 20 7946 0000", "type": "home"}]}),
        &[],
    );
    // The directory is loaded first, then the contact appears: found through the sync token.
    s.upsert(&[member("zed@example.com", json!({}), None)]);
    let later = gc.insert_contact(
        json!({"emailAddresses": [{"value": "dan@example.com"}]}),
        &[],
    );
    let outcomes = s.upsert(&[
        member(
            "carol@example.com",
            json!({"given_name": "Carol", "phone": "+1 555 0123"}),
            None,
        ),
        member("dan@example.com", json!({"given_name": "Dan"}), None),
    ]);
    assert_eq!(remote_id(&outcomes[0]), existing);
    assert_eq!(remote_id(&outcomes[1]), later);
    assert_eq!(gc.people_with_email("carol@example.com").len(), 1);
    assert_eq!(
        numbers(&person(&emulator, &existing)),
        ["+44 20 7946 0000", "+1 555 0123"],
        "the user's number stays"
    );
    assert!(list(&emulator, &s.binding).contains_key("carol@example.com"));
    // An expired sync token means a full listing, not an error.
    gc.expire_sync_tokens();
    let eve = gc.insert_contact(
        json!({"emailAddresses": [{"value": "eve@example.com"}]}),
        &[],
    );
    let outcomes = s.upsert(&[member("eve@example.com", json!({}), None)]);
    assert_eq!(remote_id(&outcomes[0]), eve);
    assert_eq!(gc.contact_count(), 4);
}

#[test]
fn a_stale_etag_is_read_again_and_retried() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let outcomes = s.upsert(&[
        member("ann@example.com", json!({"given_name": "Ann"}), None),
        member("bob@example.com", json!({"given_name": "Bob"}), None),
    ]);
    let (ann, bob) = (remote_id(&outcomes[0]), remote_id(&outcomes[1]));
    emulator.google_contacts().touch_after_next_read(&ann);
    emulator.clear_requests("google_contacts");
    let outcomes = s.upsert(&[
        member("ann@example.com", json!({"given_name": "Anna"}), Some(&ann)),
        member(
            "bob@example.com",
            json!({"given_name": "Bobby"}),
            Some(&bob),
        ),
    ]);
    assert_eq!(remote_id(&outcomes[0]), ann);
    assert_eq!(remote_id(&outcomes[1]), bob);
    assert_eq!(person(&emulator, &ann)["names"][0]["givenName"], "Anna");
    assert_eq!(person(&emulator, &bob)["names"][0]["givenName"], "Bobby");
    let calls: Vec<(String, u16)> = emulator
        .requests("google_contacts")
        .iter()
        .map(|r| {
            (
                format!(
                    "{} {}",
                    r.method,
                    r.path.split(['/', ':']).next_back().unwrap()
                ),
                r.status,
            )
        })
        .collect();
    let calls: Vec<(&str, u16)> = calls.iter().map(|(c, s)| (c.as_str(), *s)).collect();
    // The batch fails on Ann's stale etag; one by one, Ann's is read again and retried.
    assert_eq!(
        calls,
        [
            ("GET batchGet", 200),
            ("POST batchUpdateContacts", 400),
            ("PATCH updateContact", 400),
            ("GET batchGet", 200),
            ("PATCH updateContact", 200),
            ("PATCH updateContact", 200),
        ]
    );
}

#[test]
fn a_contact_deleted_at_google_is_created_again() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let ann = remote_id(&s.upsert(&[member("ann@example.com", json!({}), None)])[0]);
    assert!(emulator.google_contacts().person(&ann).is_some());
    s.erase(&[member("ann@example.com", json!({}), Some(&ann))]);
    let again = remote_id(
        &s.upsert(&[member(
            "ann@example.com",
            json!({"given_name": "Ann"}),
            Some(&ann),
        )])[0],
    );
    assert_ne!(again, ann);
    assert_eq!(
        list(&emulator, &s.binding).keys().collect::<Vec<_>>(),
        ["ann@example.com"]
    );
}

#[test]
fn leaving_removes_from_the_group_and_the_contact_stays() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let ann = remote_id(&s.upsert(&[member("ann@example.com", json!({}), None)])[0]);
    let outcomes = s.remove(
        LeaveAction::Remove,
        &[
            member("ann@example.com", json!({}), Some(&ann)),
            member("never@example.com", json!({}), None),
        ],
    );
    assert_eq!(outcomes, [Outcome::Removed, Outcome::Removed]);
    assert!(list(&emulator, &s.binding).is_empty());
    assert!(emulator.google_contacts().person(&ann).is_some());
    assert_eq!(SPEC.capabilities.on_leave, ["remove", "delete", "keep"]);
    test_support::assert_unoffered_leaves_are_refused(
        &SPEC,
        &mut s.provider,
        &mut s.http,
        &s.binding,
    );
}

#[test]
fn delete_removes_only_what_the_sync_created_and_nothing_else_holds() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    let users = gc.insert_contact(
        json!({"emailAddresses": [{"value": "carol@example.com"}]}),
        &[],
    );
    let outcomes = s.upsert(&[
        member("ann@example.com", json!({}), None),
        member("bob@example.com", json!({}), None),
        member("carol@example.com", json!({}), None),
    ]);
    let (ann, bob) = (remote_id(&outcomes[0]), remote_id(&outcomes[1]));
    assert_eq!(remote_id(&outcomes[2]), users);
    let mut other = binding(&[]);
    other.list_name = "newsletter (crm)".into();
    s.provider.prepare(&mut s.http, &mut other).unwrap();
    s.provider
        .upsert(
            &mut s.http,
            &other,
            &[member("bob@example.com", json!({}), Some(&bob))],
        )
        .unwrap();
    let outcomes = s.remove(
        LeaveAction::Delete,
        &[
            member("ann@example.com", json!({}), Some(&ann)),
            member("bob@example.com", json!({}), Some(&bob)),
            member("carol@example.com", json!({}), Some(&users)),
        ],
    );
    assert_eq!(
        outcomes,
        [Outcome::Removed, Outcome::Removed, Outcome::Removed]
    );
    assert!(gc.person(&ann).is_none(), "created by the sync: deleted");
    assert!(
        gc.person(&bob).is_some(),
        "another binding's label holds it"
    );
    assert!(gc.person(&users).is_some(), "the user's own contact");
    assert!(list(&emulator, &s.binding).is_empty());
    assert_eq!(
        emulator
            .list_members("google_contacts", other.list_id.as_deref().unwrap())
            .len(),
        1
    );
}

fn numbers(person: &Value) -> Vec<&str> {
    entry_values(person, "phoneNumbers").collect()
}

const PIA: &str = "tel:+49301234567";

#[test]
fn a_phone_member_is_a_contact_with_the_number_and_no_email() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    let outcomes = s.upsert(&[
        member(PIA, json!({"given_name": "Pia"}), None),
        member(
            "ann@example.com",
            json!({"given_name": "Ann", "phone": "+49 30 1234567"}),
            None,
        ),
    ]);
    let (pia, ann) = (remote_id(&outcomes[0]), remote_id(&outcomes[1]));
    assert_ne!(pia, ann);
    let contact = person(&emulator, &pia);
    assert_eq!(numbers(&contact), ["+49301234567"]);
    assert!(contact.get("emailAddresses").is_none(), "{contact}");
    let held = list(&emulator, &s.binding);
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        ["ann@example.com", PIA],
        "Ann holds the number too, but she is known by her email"
    );
    assert_eq!(held[PIA]["given_name"], "Pia");

    // A mapped field changes; then the same without the recorded id: the directory finds
    // Pia's contact by her number, not Ann's, which holds it too.
    let again = s.upsert(&[member(PIA, json!({"given_name": "Pina"}), Some(&pia))]);
    assert_eq!(remote_id(&again[0]), pia);
    let again = s.upsert(&[member(PIA, json!({"given_name": "Pina"}), None)]);
    assert_eq!(remote_id(&again[0]), pia);
    let contact = person(&emulator, &pia);
    assert_eq!(contact["names"][0]["givenName"], "Pina");
    assert_eq!(numbers(&contact), ["+49301234567"]);
    assert!(contact.get("emailAddresses").is_none(), "{contact}");
    assert_eq!(gc.contact_count(), 2, "no duplicate");
    assert_eq!(
        gc.people_with_phone(PIA.trim_start_matches("tel:")).len(),
        2
    );

    let outcomes = s.remove(LeaveAction::Remove, &[member(PIA, json!({}), Some(&pia))]);
    assert_eq!(outcomes, [Outcome::Removed]);
    assert_eq!(
        list(&emulator, &s.binding).keys().collect::<Vec<_>>(),
        ["ann@example.com"]
    );
    assert!(gc.person(&pia).is_some(), "on_leave remove keeps it");
}

#[test]
fn a_phone_only_contact_the_user_has_joins() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    let users = gc.insert_contact(
        json!({"names": [{"givenName": "P.", "familyName": "Schulz"}],
               "phoneNumbers": [{"value": "0049 (30) 123-45-67", "type": "mobile"}]}),
        &[],
    );
    let with_email = gc.insert_contact(
        json!({"emailAddresses": [{"value": "office@example.com"}],
               "phoneNumbers": [{"value": "+49 30 1234567"}]}),
        &[],
    );
    let outcomes = s.upsert(&[member(
        PIA,
        json!({"given_name": "Pia", "phone": "+49 30 1234567"}),
        None,
    )]);
    assert_eq!(remote_id(&outcomes[0]), users);
    let contact = person(&emulator, &users);
    assert_eq!(
        numbers(&contact),
        ["0049 (30) 123-45-67"],
        "the number is not added again"
    );
    assert_eq!(contact["names"][0]["givenName"], "Pia");
    assert_eq!(contact["names"][0]["familyName"], "Schulz");
    assert!(contact.get("emailAddresses").is_none(), "{contact}");
    assert_eq!(gc.contact_count(), 2);
    assert!(
        !gc.group_members(s.binding.list_id.as_deref().unwrap())
            .contains(&with_email)
    );
    // on_leave delete: the user's contact only leaves; one the sync created is deleted.
    let outcomes = s.upsert(&[member("tel:+4930555000", json!({}), None)]);
    let ours = remote_id(&outcomes[0]);
    let outcomes = s.remove(
        LeaveAction::Delete,
        &[
            member(PIA, json!({}), Some(&users)),
            member("tel:+4930555000", json!({}), Some(&ours)),
        ],
    );
    assert_eq!(outcomes, [Outcome::Removed, Outcome::Removed]);
    assert!(gc.person(&users).is_some(), "the user's own contact");
    assert!(gc.person(&ours).is_none(), "created by the sync: deleted");
    assert!(list(&emulator, &s.binding).is_empty());
}

#[test]
fn a_lost_answer_to_a_create_does_not_duplicate_a_phone_contact() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    emulator
        .faults("google_contacts")
        .push(Fault::LostResponse.on_path("batchCreateContacts"));
    let members = [
        member(PIA, json!({"given_name": "Pia"}), None),
        member("tel:89161234567", json!({"given_name": "Ivan"}), None),
    ];
    assert!(
        s.provider
            .upsert(&mut s.http, &s.binding, &members)
            .is_err(),
        "the answer was lost"
    );
    assert_eq!(gc.contact_count(), 2, "Google created them");
    let outcomes = s.upsert(&members);
    let found: Vec<String> = outcomes.iter().map(remote_id).collect();
    assert_eq!(gc.contact_count(), 2, "found again, not created twice");
    assert_eq!(gc.people_with_phone("+49 30 1234567").len(), 1);
    assert_eq!(gc.people_with_phone("8 916 123 45 67").len(), 1);
    let held = list(&emulator, &s.binding);
    assert_eq!(held.keys().collect::<Vec<_>>(), [PIA, "tel:89161234567"]);
    assert_ne!(found[0], found[1]);
}

#[test]
fn a_phone_only_contact_that_gets_an_email_moves_to_the_email() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let pia = remote_id(&s.upsert(&[member(PIA, json!({"given_name": "Pia"}), None)])[0]);
    // The engine sends the phone identity as a leave and the email as an upsert.
    assert_eq!(
        s.remove(LeaveAction::Remove, &[member(PIA, json!({}), Some(&pia))]),
        [Outcome::Removed]
    );
    let email = remote_id(
        &s.upsert(&[member(
            "pia@example.com",
            json!({"given_name": "Pia"}),
            None,
        )])[0],
    );
    assert_ne!(email, pia);
    let held = list(&emulator, &s.binding);
    assert_eq!(held.keys().collect::<Vec<_>>(), ["pia@example.com"]);
    assert_eq!(held["pia@example.com"]["given_name"], "Pia");
    assert!(
        emulator.google_contacts().person(&pia).is_some(),
        "the phone-only contact stays, out of the label"
    );
}

#[test]
fn erasing_a_phone_member_deletes_the_contacts_known_by_the_number() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    let ours = remote_id(&s.upsert(&[member(PIA, json!({}), None)])[0]);
    let copy = gc.insert_contact(json!({"phoneNumbers": [{"value": "+49-30-1234567"}]}), &[]);
    let office = gc.insert_contact(
        json!({"emailAddresses": [{"value": "office@example.com"}],
               "phoneNumbers": [{"value": "+49 30 1234567"}]}),
        &[],
    );
    let outcomes = s.erase(&[member(PIA, json!({}), Some(&ours))]);
    assert_eq!(outcomes, [Outcome::Removed]);
    assert!(gc.person(&ours).is_none());
    assert!(gc.person(&copy).is_none());
    assert!(
        gc.person(&office).is_some(),
        "known by its email: another person's contact"
    );
}

#[test]
fn erase_deletes_every_contact_holding_the_address() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    let ours = remote_id(&s.upsert(&[member("ann@example.com", json!({}), None)])[0]);
    gc.insert_contact(
        json!({"emailAddresses": [{"value": "ANN@example.com"}]}),
        &[],
    );
    let outcomes = s.erase(&[member("ann@example.com", json!({}), Some(&ours))]);
    assert_eq!(outcomes, [Outcome::Removed]);
    assert!(gc.people_with_email("ann@example.com").is_empty());
    // A contact gone meanwhile makes Google refuse the batch: one by one then.
    let bob = remote_id(&s.upsert(&[member("bob@example.com", json!({}), None)])[0]);
    emulator
        .faults("google_contacts")
        .push(Fault::status(404).on_path("batchDeleteContacts"));
    let outcomes = s.erase(&[member("bob@example.com", json!({}), Some(&bob))]);
    assert_eq!(outcomes, [Outcome::Removed]);
    assert!(gc.person(&bob).is_none());
}

#[test]
fn the_contact_cap_fails_items_with_a_clear_message() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    assert_eq!(gc.seed_contacts(CONTACT_LIMIT - 1), CONTACT_LIMIT - 1);
    let outcomes = s.upsert(&[
        member("a@example.com", json!({}), None),
        member("b@example.com", json!({}), None),
        member(
            "seed1@example.invalid",
            json!({"given_name": "Known"}),
            None,
        ),
    ]);
    remote_id(&outcomes[0]);
    match &outcomes[1] {
        Outcome::Failed { message } => {
            assert!(message.contains("at most 25000 contacts"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    remote_id(&outcomes[2]);
    assert_eq!(gc.contact_count(), CONTACT_LIMIT);
}

/// A refused address is the suite's; a value Google does not take fails its contact alone.
#[test]
fn a_refused_value_fails_its_contact_alone() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let outcomes = s.upsert(&[
        member("ann@example.com", json!({}), None),
        member("bob@example.com", json!({"birthday": "someday"}), None),
        member("cat@example.com", json!({}), None),
    ]);
    remote_id(&outcomes[0]);
    assert!(matches!(&outcomes[1], Outcome::Failed { message } if message.contains("birthday")));
    remote_id(&outcomes[2]);
    assert_eq!(list(&emulator, &s.binding).len(), 2);
}

#[test]
fn tokens_are_cached_renewed_and_refreshed_on_401() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    assert_eq!(gc.token_requests(), 1, "one token for prepare's calls");
    s.upsert(&[member("ann@example.com", json!({}), None)]);
    assert_eq!(gc.token_requests(), 1, "cached");
    gc.expire_access_tokens();
    s.provider
        .check(&mut s.http)
        .expect("a 401 gets a new token");
    assert_eq!(gc.token_requests(), 2);
    // A token about to expire is renewed before use.
    gc.set_token_lifetime(Duration::from_secs(30));
    gc.expire_access_tokens();
    s.provider.check(&mut s.http).unwrap();
    let after = gc.token_requests();
    s.provider.check(&mut s.http).unwrap();
    assert_eq!(gc.token_requests(), after + 2, "one per call");
    let unauthorized = emulator
        .requests("google_contacts")
        .iter()
        .filter(|r| r.status == 401)
        .count();
    assert_eq!(
        unauthorized, 2,
        "each expired token met one 401, then a new one was used"
    );
}

/// The suite presents a wrong refresh token; here Google's reason for refusing it, a wrong
/// client secret, and the API refusing a fresh token (401 twice) or the scope (403).
#[test]
fn refused_credentials_are_authentication_failures() {
    let (emulator, mut provider, mut http) = connected::<GoogleContactsFake>();
    let gc = emulator.google_contacts();
    gc.set_credentials("client", "secret", "another refresh token");
    match provider.check(&mut http) {
        Err(ProviderError::Auth(message)) => {
            assert!(message.contains("invalid_grant"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let mut refused = || matches!(provider.check(&mut http), Err(ProviderError::Auth(_)));
    gc.set_credentials("client", "other secret", "refresh");
    assert!(refused(), "a wrong client secret");
    gc.set_credentials("client", "secret", "refresh");
    let faults = emulator.faults("google_contacts");
    faults.push(Fault::status(401).on_path("/v1/"));
    faults.push(Fault::status(401).on_path("/v1/"));
    assert!(refused(), "a fresh token refused too");
    faults.push(Fault::status(403).on_path("/v1/"));
    assert!(refused(), "the scope refused");
}

/// What the delivery engine does, in small: level-based changes of a pool of addresses (a
/// quarter of them phone identities), delivered in batches, retried while the provider says
/// so, with a fifth of the requests failing (429s, 5xx, timeouts, resets, broken bodies) and
/// a write per round applied but its answer lost. The label must end up holding exactly the
/// wanted addresses with their names, and no address may be duplicated.
#[test]
fn random_changes_under_faults_converge() {
    let (emulator, mut s) = Bound::new::<GoogleContactsFake>();
    let faults = emulator.faults("google_contacts");
    faults.set_timeout(Duration::from_millis(20));
    faults.set_random(0.2, 11);
    let mut seed: u64 = 7;
    let mut next = move |n: u64| {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (seed >> 33) % n
    };
    let pool = |n: u64| match n % 4 {
        0 => format!("tel:+4930100{n:04}"),
        _ => format!("p{n}@example.com"),
    };
    let mut wanted: BTreeMap<String, String> = BTreeMap::new();
    let mut recorded: BTreeMap<String, String> = BTreeMap::new();
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    for round in 0..12 {
        let lost = [
            "batchCreateContacts",
            "members:modify",
            "batchUpdateContacts",
        ][round % 3];
        faults.push(Fault::LostResponse.on_path(lost));
        for _ in 0..15 {
            let address = pool(next(40));
            if next(4) == 0 {
                wanted.remove(&address);
            } else {
                wanted.insert(address.clone(), format!("Name {round}-{}", next(3)));
            }
            dirty.insert(address);
        }
        for _attempt in 0..60 {
            if dirty.is_empty() {
                break;
            }
            let joining: Vec<Member> = dirty
                .iter()
                .filter_map(|a| {
                    let name = wanted.get(a)?;
                    Some(member(
                        a,
                        json!({"given_name": name}),
                        recorded.get(a).map(String::as_str),
                    ))
                })
                .collect();
            let leaving: Vec<Member> = dirty
                .iter()
                .filter(|a| !wanted.contains_key(*a))
                .map(|a| member(a, json!({}), recorded.get(a).map(String::as_str)))
                .collect();
            if let Ok(outcomes) = s.provider.upsert(&mut s.http, &s.binding, &joining) {
                for (m, outcome) in joining.iter().zip(outcomes) {
                    match outcome {
                        Outcome::Member {
                            remote_id: Some(id),
                            ..
                        } => {
                            recorded.insert(m.address.clone(), id);
                            dirty.remove(&m.address);
                        }
                        Outcome::Retry { .. } => {}
                        other => panic!("{}: {other:?}", m.address),
                    }
                }
            }
            if let Ok(outcomes) =
                s.provider
                    .remove(&mut s.http, &s.binding, LeaveAction::Remove, &leaving)
            {
                for (m, outcome) in leaving.iter().zip(outcomes) {
                    assert_eq!(outcome, Outcome::Removed, "{}", m.address);
                    recorded.remove(&m.address);
                    dirty.remove(&m.address);
                }
            }
        }
        assert!(
            dirty.is_empty(),
            "round {round}: still dirty after retries: {dirty:?}"
        );
        let held: BTreeMap<String, String> = list(&emulator, &s.binding)
            .into_iter()
            .map(|(a, f)| (a, f["given_name"].as_str().unwrap_or("").to_string()))
            .collect();
        assert_eq!(held, wanted, "round {round}");
    }
    faults.clear();
    let gc = emulator.google_contacts();
    for n in 0..40 {
        let address = pool(n);
        let holders = match address.strip_prefix("tel:") {
            Some(number) => gc.people_with_phone(number),
            None => gc.people_with_email(&address),
        };
        assert!(holders.len() <= 1, "{address} duplicated");
    }
}

/// The token endpoint is a service of its own: its outage is transient too (the API's are
/// the suite's).
#[test]
fn a_token_endpoint_outage_is_transient() {
    let (emulator, mut provider, mut http) = connected::<GoogleContactsFake>();
    provider.check(&mut http).expect("a token is cached");
    // The cached token must go for the token endpoint to be asked.
    emulator.google_contacts().expire_access_tokens();
    emulator
        .faults("google_contacts")
        .push(Fault::status(500).on_path("/token"));
    assert!(matches!(
        provider.check(&mut http),
        Err(ProviderError::Transient { .. })
    ));
    assert!(provider.check(&mut http).is_ok());
}

struct GoogleContactsFake;

impl Fake for GoogleContactsFake {
    const SPEC: &'static Spec = &SPEC;

    fn connect(emulator: &Emulator) -> Box<dyn Provider> {
        provider(emulator)
    }

    fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider> {
        provider_with_refresh_token(emulator, WRONG_SECRET)
    }

    fn binding() -> Binding {
        binding(&[])
    }

    fn member(address: &str) -> Member {
        member(
            address,
            json!({"given_name": "Ann", "phone": "+1 555 0100"}),
            None,
        )
    }

    fn refuse(emulator: &Emulator, address: &str) -> &'static str {
        emulator
            .google_contacts()
            .reject_address(address, "Invalid email address.");
        "HTTP 400 INVALID_ARGUMENT: Invalid email address."
    }

    fn knows(emulator: &Emulator, address: &str) -> bool {
        !emulator
            .google_contacts()
            .people_with_email(address)
            .is_empty()
    }
}

impl Erasure for GoogleContactsFake {
    /// Google has no erasure apart from deletion: a deleted contact is gone for good.
    fn erased(emulator: &Emulator, address: &str) -> bool {
        !Self::knows(emulator, address)
    }
}

conformance_suite!(GoogleContactsFake {
    consent: unsupported("an address book keeps no consent: nobody unsubscribes from a label"),
    erasure: supported
});
