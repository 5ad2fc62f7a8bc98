//! Google's API is stateful where the adapter's choices depend on answers (an existing contact
//! is updated with its etag, a stale etag is read again, a refused batch is retried one by
//! one), and Prism answers every request with the same invented data. So the scenario runs
//! against the stateful fake, which logs every request the adapter made, and each People API
//! request is then sent again, verbatim (method, path, query, body, a bearer token), to Prism
//! on the official description. The OAuth2 token exchange is not part of the People API
//! description: the fake's token endpoint serves it and it is not replayed.

use super::*;
use crate::providers::contract::{Prism, assert_all_valid};
use crate::providers::test_support::{config, known_member as member, remote_id};
use listsync_emulator::{Emulator, Fault};

/// A request's kind: its path with the resource ids replaced as the description names them.
fn kind(method: &str, path: &str) -> String {
    let mut segments: Vec<String> = path.split('/').map(str::to_string).collect();
    if let Some(id) = segments.get_mut(3).filter(|s| s.as_str() != "me") {
        let action = id
            .split_once(':')
            .map(|(_, a)| format!(":{a}"))
            .unwrap_or_default();
        let name = if segments[2] == "people" {
            "{personId}"
        } else {
            "{contactGroupId}"
        };
        segments[3] = format!("{name}{action}");
    }
    format!("{method} {}", segments.join("/"))
}

#[test]
fn every_request_validates_against_the_official_spec() {
    let emulator = Emulator::start();
    let gc = emulator.google_contacts();
    gc.reject_address("bad@example.com", "Invalid email address.");
    let mut http = Http::local(Duration::from_secs(10));
    let config = config(
        json!({"base_url": emulator.base_url("google_contacts")}),
        json!({"client_id": "id.apps.googleusercontent.com", "client_secret": "s", "refresh_token": "1//r"}),
    );
    let mut provider = connect(&config);
    provider.check(&mut http).expect("check");
    let mut binding = Binding {
        id: 1,
        filter: "vip".into(),
        list_id: None,
        list_name: "vip (crm)".into(),
        tags: vec!["crm".into()],
        fields: vec![],
        new_member_status: MemberStatus::Subscribed,
        remote: Map::new(),
    };
    provider
        .prepare(&mut http, &mut binding)
        .expect("prepare creates groups");
    let fields = json!({"given_name": "Ann", "family_name": "Lee", "phone": "+1 555 0100",
                        "organization": "Acme", "job_title": "CTO", "birthday": "--07-14",
                        "address": "1 Main St", "url": "https://ann.example",
                        "biography": "VIP", "user:crm_id": "42"});
    let carol = gc.insert_contact(
        json!({"emailAddresses": [{"value": "carol@example.com"}], "phoneNumbers": [{"value": "+44 20 7946 0000"}]}),
        &[],
    );
    // A refused contact fails the batch: created one by one; Carol exists: updated, joins.
    let outcomes = provider
        .upsert(
            &mut http,
            &binding,
            &[
                member("ann@example.com", fields.clone(), None),
                member("bob@example.com", json!({"given_name": "Bob"}), None),
                member("bad@example.com", json!({}), None),
                member("carol@example.com", fields.clone(), None),
                member("tel:+49301234567", json!({"given_name": "Pia"}), None),
            ],
        )
        .expect("upsert");
    let (ann, bob) = (remote_id(&outcomes[0]), remote_id(&outcomes[1]));
    assert_eq!(remote_id(&outcomes[3]), carol);
    // A stale etag: the batch update fails, then one by one with a fresh read.
    gc.touch_after_next_read(&ann);
    provider
        .upsert(
            &mut http,
            &binding,
            &[member(
                "ann@example.com",
                json!({"given_name": "Anna", "phone": null}),
                Some(&ann),
            )],
        )
        .expect("update");
    provider
        .remove(
            &mut http,
            &binding,
            LeaveAction::Remove,
            &[member("bob@example.com", json!({}), Some(&bob))],
        )
        .expect("remove");
    provider
        .remove(
            &mut http,
            &binding,
            LeaveAction::Delete,
            &[member("ann@example.com", json!({}), Some(&ann))],
        )
        .expect("delete");
    emulator
        .faults("google_contacts")
        .push(Fault::status(404).on_path("batchDeleteContacts"));
    provider
        .erase(
            &mut http,
            &binding,
            &[member("carol@example.com", json!({}), Some(&carol))],
        )
        .expect("erase");

    let prism = Prism::start("google-people.prism.yaml");
    let mut replay = prism.http();
    let mut kinds = BTreeSet::new();
    for logged in emulator.requests("google_contacts") {
        if logged.path == "/token" {
            continue;
        }
        kinds.insert(kind(&logged.method, &logged.path));
        let method = match logged.method.as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PATCH" => Method::Patch,
            "DELETE" => Method::Delete,
            other => panic!("unexpected method {other}"),
        };
        let query = if logged.query.is_empty() {
            String::new()
        } else {
            format!("?{}", logged.query)
        };
        let mut request = Request::new(method, format!("{}{}{query}", prism.base_url, logged.path))
            .header("authorization", "Bearer ya29.replayed");
        if !logged.body.is_empty() {
            request = request.header("content-type", "application/json");
            request.body = Some(logged.body.into_bytes());
        }
        replay
            .send(&kind(&logged.method, &logged.path), request)
            .expect("Prism answers");
    }
    assert_all_valid(&replay.drain_records());
    let expected: BTreeSet<String> = [
        "GET /v1/contactGroups",
        "POST /v1/contactGroups",
        "POST /v1/contactGroups/{contactGroupId}/members:modify",
        "GET /v1/people/me/connections",
        "GET /v1/people:batchGet",
        "POST /v1/people:batchCreateContacts",
        "POST /v1/people:createContact",
        "POST /v1/people:batchUpdateContacts",
        "PATCH /v1/people/{personId}:updateContact",
        "POST /v1/people:batchDeleteContacts",
        "DELETE /v1/people/{personId}:deleteContact",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(kinds, expected, "every kind of request the adapter makes");
}
