use super::*;

fn config(settings: Value) -> Config {
    crate::providers::test_support::config(
        settings,
        json!({"client_id": "id", "client_secret": "secret", "refresh_token": "refresh"}),
    )
}

fn values(pairs: &[(&str, Value)]) -> Vec<(Field, Option<String>)> {
    let member = Member {
        address: "ann@example.com".into(),
        fields: pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect(),
        remote_id: None,
    };
    wanted(&member).unwrap()
}

#[test]
fn field_names_are_checked() {
    for name in [
        "given_name",
        "family_name",
        "phone",
        "job_title",
        "birthday",
        "user:crm_id",
    ] {
        assert!(field_name(name).is_ok(), "{name}");
    }
    for name in ["FNAME", "email", "user:", "user:  ", "phones"] {
        let e = field_name(name).unwrap_err();
        assert!(e.contains("given_name") && e.contains("user:<key>"), "{e}");
    }
}

#[test]
fn token_endpoint_follows_the_settings() {
    assert_eq!(GoogleContacts::new(&config(json!({}))).token_url, TOKEN_URL);
    let emulated = GoogleContacts::new(&config(
        json!({"base_url": "http://127.0.0.1:9/google_contacts/"}),
    ));
    assert_eq!(
        emulated.token_url,
        "http://127.0.0.1:9/google_contacts/token"
    );
    assert_eq!(emulated.api, "http://127.0.0.1:9/google_contacts/v1");
    let explicit = GoogleContacts::new(&config(
        json!({"base_url": "http://127.0.0.1:9/x", "token_url": "http://127.0.0.1:8/t"}),
    ));
    assert_eq!(explicit.token_url, "http://127.0.0.1:8/t");
    assert!(validate(&config(json!({"token_url": "ftp://x"}))).is_err());
    assert!(validate(&config(json!({"token_url": "https://x/token"}))).is_ok());
    assert_eq!(
        crate::providers::validate_config(
            "google_contacts",
            &json!({}),
            &json!({"client_id": "i", "client_secret": "s"})
        )
        .unwrap_err(),
        "missing required key secrets.refresh_token"
    );
}

#[test]
fn birthdays_with_and_without_a_year() {
    assert_eq!(
        birthday("1990-07-14").unwrap(),
        json!({"year": 1990, "month": 7, "day": 14})
    );
    assert_eq!(birthday("1990-07-14T00:00:00").unwrap()["day"], 14);
    assert_eq!(birthday("--02-29").unwrap(), json!({"month": 2, "day": 29}));
    for bad in ["14.07.1990", "1990-13-01", "--2-29", "yesterday", ""] {
        assert!(birthday(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_new_contact_gets_the_address_and_the_mapped_fields() {
    let merged = merge(
        Map::new(),
        "ann@example.com",
        &values(&[
            ("given_name", json!("Ann")),
            ("family_name", json!("Lee")),
            ("middle_name", json!("  ")),
            ("phone", json!(79161234567u64)),
            ("job_title", json!("CTO")),
            ("birthday", json!("1990-07-14")),
            ("biography", json!(null)),
            ("user:crm_id", json!(42)),
        ]),
    )
    .unwrap();
    assert_eq!(
        Value::Object(merged),
        json!({
            "emailAddresses": [{"value": "ann@example.com"}],
            "names": [{"givenName": "Ann", "familyName": "Lee"}],
            "organizations": [{"title": "CTO"}],
            "birthdays": [{"date": {"year": 1990, "month": 7, "day": 14}}],
            "phoneNumbers": [{"value": "79161234567"}],
            "clientData": [{"key": "pg_listsync.phoneNumbers", "value": "79161234567"}],
            "userDefined": [{"key": "crm_id", "value": "42"}],
        })
    );
}

#[test]
fn only_the_mapped_parts_and_our_own_entries_change() {
    let person = json!({
        "names": [{"givenName": "Ann", "middleName": "Q", "familyName": "Lee", "unstructuredName": "Ann Q Lee",
                   "displayName": "Ann Q Lee", "metadata": {"primary": true, "source": {"type": "CONTACT"}}}],
        "emailAddresses": [{"value": "Ann@Example.com"}, {"value": "ann@home.example", "formattedType": "Home", "type": "home"}],
        "phoneNumbers": [
            {"value": "+1 555 0100", "type": "mobile", "canonicalForm": "+15550100"},
            {"value": "+7 916 123-45-67", "type": "work"},
            {"value": "+1 555 0199", "metadata": {"source": {"type": "PROFILE"}}}
        ],
        "userDefined": [{"key": "shoe", "value": "42"}, {"key": "crm_id", "value": "1"}],
        "clientData": [{"key": "other.app", "value": "x"}, {"key": "pg_listsync.phoneNumbers", "value": "+79161234567"}],
    });
    let before = contact_fields(&person);
    assert_eq!(
        before["phoneNumbers"].as_array().unwrap().len(),
        2,
        "profile data is not the contact's"
    );
    let after = merge(
        before.clone(),
        "ann@example.com",
        &values(&[
            ("given_name", json!("Anna")),
            ("phone", json!("+7 (916) 000-00-00")),
            ("user:crm_id", json!("2")),
        ]),
    )
    .unwrap();
    assert_eq!(
        after["names"],
        json!([{"givenName": "Anna", "middleName": "Q", "familyName": "Lee"}])
    );
    assert_eq!(
        after["emailAddresses"], before["emailAddresses"],
        "the address was there, in another case"
    );
    assert_eq!(
        after["phoneNumbers"],
        json!([{"value": "+1 555 0100", "type": "mobile"}, {"value": "+7 (916) 000-00-00", "type": "work"}])
    );
    assert_eq!(
        after["userDefined"],
        json!([{"key": "shoe", "value": "42"}, {"key": "crm_id", "value": "2"}])
    );
    assert_eq!(
        after["clientData"],
        json!([{"key": "other.app", "value": "x"}, {"key": "pg_listsync.phoneNumbers", "value": "+7 (916) 000-00-00"}])
    );
    assert_eq!(
        changed_fields(&before, &after),
        BTreeSet::from(["names", "phoneNumbers", "userDefined", "clientData"])
    );
    let reformatted = merge(
        after.clone(),
        "ann@example.com",
        &values(&[("phone", json!("+79160000000"))]),
    )
    .unwrap();
    assert_eq!(
        reformatted["phoneNumbers"],
        json!([{"value": "+1 555 0100", "type": "mobile"}, {"value": "+79160000000", "type": "work"}]),
        "the same number as the CRM writes it now, in the same entry"
    );
}

#[test]
fn a_number_the_contact_holds_is_not_added_twice() {
    let before =
        contact_fields(&json!({"phoneNumbers": [{"value": "+1 (555) 0100", "type": "home"}]}));
    let after = merge(
        before.clone(),
        "a@x.io",
        &values(&[("phone", json!("15550100"))]),
    )
    .unwrap();
    assert_eq!(after["phoneNumbers"], before["phoneNumbers"]);
    let cleared = merge(
        after,
        "a@x.io",
        &values(&[("phone", json!(null)), ("url", json!(""))]),
    )
    .unwrap();
    assert!(
        cleared.get("phoneNumbers").is_none(),
        "the number equal to the mapped value became the mapped field's: {cleared:?}"
    );
    let user_only = merge(before.clone(), "a@x.io", &values(&[("phone", json!(null))])).unwrap();
    assert_eq!(
        user_only["phoneNumbers"], before["phoneNumbers"],
        "never ours: kept"
    );
}

#[test]
fn a_phone_member_holds_its_number_and_never_an_email() {
    let pia = "tel:+49301234567";
    let created = merge(Map::new(), pia, &values(&[("given_name", json!("Pia"))])).unwrap();
    assert_eq!(
        Value::Object(created),
        json!({"phoneNumbers": [{"value": "+49301234567"}], "names": [{"givenName": "Pia"}]})
    );
    let mapped = merge(
        Map::new(),
        pia,
        &values(&[("phone", json!("0049 30 123 45 67"))]),
    )
    .unwrap();
    assert_eq!(
        mapped["phoneNumbers"],
        json!([{"value": "0049 30 123 45 67"}]),
        "the number once, as the CRM writes it"
    );
    assert_eq!(
        merge(
            mapped.clone(),
            pia,
            &values(&[("phone", json!("0049 30 123 45 67"))])
        )
        .unwrap(),
        mapped,
        "nothing to write again"
    );
    let moved = merge(mapped, pia, &values(&[("phone", json!("+1 555 0100"))])).unwrap();
    assert_eq!(
        moved["phoneNumbers"],
        json!([{"value": "0049 30 123 45 67"}, {"value": "+1 555 0100"}]),
        "the number the contact is known by stays when the mapped one moves on"
    );
    let cleared = merge(moved, pia, &values(&[("phone", json!(null))])).unwrap();
    assert_eq!(
        Value::Object(cleared),
        json!({"phoneNumbers": [{"value": "0049 30 123 45 67"}]})
    );
    let found = contact_fields(&json!({
        "phoneNumbers": [{"value": "+7 916 000 00 00"}, {"value": "+49 (30) 123-45-67", "type": "mobile"}],
    }));
    let joined = merge(found.clone(), pia, &values(&[])).unwrap();
    assert_eq!(
        joined, found,
        "a contact holding the number, written otherwise, is left as it is"
    );
}

#[test]
fn contacts_are_known_by_their_emails_else_their_numbers() {
    assert_eq!(
        identities_of(&json!({"emailAddresses": [{"value": " Ann@Example.com"}],
                              "phoneNumbers": [{"value": "+49 30 1234567"}]})),
        ["ann@example.com"]
    );
    assert_eq!(
        identities_of(
            &json!({"phoneNumbers": [{"value": "0049 30 1234567"}, {"value": "ext. 12"},
                                               {"value": "8 (916) 123-45-67"}]})
        ),
        ["tel:+49301234567", "tel:89161234567"]
    );
    assert!(identities_of(&json!({"names": [{"givenName": "Nobody"}]})).is_empty());
    assert!(same_phone("0049 30 1234567", "+49301234567"));
    assert!(!same_phone("0049 30 1234567", "+4930 1234568"));
}

#[test]
fn clearing_the_name_removes_the_entry() {
    let before =
        contact_fields(&json!({"names": [{"givenName": "Ann", "unstructuredName": "Ann"}]}));
    let after = merge(before, "a@x.io", &values(&[("given_name", json!(null))])).unwrap();
    assert!(after.get("names").is_none(), "{after:?}");
    assert!(
        merge(
            Map::new(),
            "a@x.io",
            &values(&[("birthday", json!("soon"))])
        )
        .is_err()
    );
}

#[test]
fn google_errors_are_read() {
    let response = |status, body: Value| Response {
        status,
        headers: vec![],
        body: body.to_string().into_bytes(),
    };
    let stale = ApiError::parse(&response(
        400,
        json!({"error": {"code": 400, "message": "Request person.etag is different", "status": "FAILED_PRECONDITION"}}),
    ));
    assert!(stale.is_stale_etag());
    assert_eq!(
        stale.to_string(),
        "HTTP 400 FAILED_PRECONDITION: Request person.etag is different"
    );
    let quota = ApiError::parse(&response(
        403,
        json!({"error": {"code": 403, "message": "Quota", "status": "PERMISSION_DENIED",
                         "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED"}]}}),
    ));
    assert!(quota.is_rate_limit());
    let html = ApiError::parse(&Response {
        status: 502,
        headers: vec![],
        body: b"<html>Bad Gateway</html>".to_vec(),
    });
    assert_eq!(html.to_string(), "HTTP 502: <html>Bad Gateway</html>");
    let oauth = response(
        400,
        json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
    );
    assert_eq!(
        oauth_problem(&oauth),
        "invalid_grant: Token has been expired or revoked."
    );
}

#[test]
fn the_directory_follows_changes() {
    let mut directory = Directory::default();
    directory.apply(Listing {
        people: vec![
            ("people/c1".into(), Some(vec!["ann@example.com".into()])),
            (
                "people/c2".into(),
                Some(vec!["ann@example.com".into(), "bob@example.com".into()]),
            ),
        ],
        sync_token: Some("t1".into()),
    });
    assert_eq!(
        directory.holders("ANN@example.com"),
        ["people/c1", "people/c2"]
    );
    directory.apply(Listing {
        people: vec![
            ("people/c1".into(), None),
            ("people/c2".into(), Some(vec!["bob@example.com".into()])),
        ],
        sync_token: Some("t2".into()),
    });
    assert!(directory.holders("ann@example.com").is_empty());
    assert_eq!(directory.people.len(), 1);
    assert_eq!(directory.sync_token.as_deref(), Some("t2"));
}
