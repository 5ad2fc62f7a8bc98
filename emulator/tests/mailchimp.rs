//! The Mailchimp fake over real HTTP.

mod common;

use common::Client;
use listsync_emulator::Emulator;
use listsync_emulator::mailchimp::subscriber_hash;
use serde_json::{Value, json};

const LIST: &str = "/3.0/lists/a1";

fn setup() -> (Emulator, Client) {
    let emulator = Emulator::start();
    let client = Client::new(emulator.base_url("mailchimp"));
    (emulator, client)
}

fn batch(client: &Client, members: Value, update_existing: bool) -> Value {
    let reply = client.post(
        LIST,
        &json!({ "members": members, "update_existing": update_existing }),
    );
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.json()
}

fn emails(items: &Value, key: &str) -> Vec<String> {
    items[key]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["email_address"].as_str().unwrap().to_string())
        .collect()
}

fn assert_problem(reply: &common::Reply, status: u16, title: &str) {
    assert_eq!(reply.status, status, "{}", reply.body);
    assert_eq!(
        reply.header("content-type"),
        Some("application/problem+json")
    );
    let body = reply.json();
    assert_eq!(body["title"], title, "{body}");
    assert_eq!(body["status"], status);
    for key in ["type", "detail", "instance"] {
        assert!(body[key].is_string(), "problem without {key}: {body}");
    }
}

#[test]
fn ping_and_audience_info() {
    let (emulator, client) = setup();
    assert_eq!(
        client.get("/3.0/ping").json(),
        json!({ "health_status": "Everything's Chimpy!" })
    );
    let info = client.get(LIST).json();
    assert_eq!(info["id"], "a1");
    assert_eq!(info["stats"]["member_count"], 0);
    assert_eq!(emulator.mailchimp().audience_ids(), vec!["a1"]);
}

#[test]
fn unknown_audience_is_404_without_auto_create() {
    let (emulator, client) = setup();
    emulator.mailchimp().set_auto_create(false);
    emulator.mailchimp().create_audience("known");
    assert_problem(&client.get("/3.0/lists/nope"), 404, "Resource Not Found");
    assert_eq!(client.get("/3.0/lists/known").status, 200);
    assert_problem(&client.get("/3.0/no/such/route"), 404, "Resource Not Found");
    assert_problem(&client.delete("/3.0/ping"), 405, "Method Not Allowed");
}

#[test]
fn batch_subscribe_creates_then_updates() {
    let (emulator, client) = setup();
    let first = batch(
        &client,
        json!([
            { "email_address": "Ann@Example.com", "status_if_new": "subscribed", "merge_fields": { "FNAME": "Ann" }, "tags": ["crm"] },
            { "email_address": "bob@example.com", "status_if_new": "pending" },
        ]),
        true,
    );
    assert_eq!(first["total_created"], 2);
    assert_eq!(first["total_updated"], 0);
    assert_eq!(first["error_count"], 0);
    let ann = &first["new_members"][0];
    assert_eq!(ann["id"], subscriber_hash("ann@example.com"));
    assert_eq!(ann["email_address"], "Ann@Example.com");
    assert_eq!(ann["merge_fields"]["FNAME"], "Ann");
    assert_eq!(
        ann["merge_fields"]["LNAME"], "",
        "unset merge fields are returned empty"
    );
    assert_eq!(ann["tags"][0]["name"], "crm");
    assert!(ann["tags"][0]["id"].is_u64());

    let second = batch(
        &client,
        json!([{ "email_address": "ann@example.com", "status_if_new": "subscribed", "merge_fields": { "LNAME": "Lee" } }]),
        true,
    );
    assert_eq!(second["total_updated"], 1);
    assert_eq!(second["total_created"], 0);

    let audience = emulator.mailchimp().audience("a1");
    let ann = &audience["ann@example.com"];
    assert_eq!(ann.status, "subscribed");
    assert_eq!(
        ann.merge_fields,
        json!({ "FNAME": "Ann", "LNAME": "Lee" })
            .as_object()
            .unwrap()
            .clone()
    );
    assert_eq!(audience["bob@example.com"].status, "pending");
    assert_eq!(
        emulator
            .mailchimp()
            .members_with_tag("a1", "crm")
            .keys()
            .collect::<Vec<_>>(),
        vec!["ann@example.com"]
    );
}

#[test]
fn batch_without_update_existing_reports_existing_members() {
    let (_emulator, client) = setup();
    batch(
        &client,
        json!([{ "email_address": "ann@example.com", "status": "subscribed" }]),
        false,
    );
    let again = batch(
        &client,
        json!([{ "email_address": "ann@example.com", "status": "subscribed" }]),
        false,
    );
    assert_eq!(again["error_count"], 1);
    assert_eq!(again["errors"][0]["error_code"], "ERROR_CONTACT_EXISTS");
}

#[test]
fn batch_reports_invalid_and_rejected_addresses_and_applies_the_rest() {
    let (emulator, client) = setup();
    emulator
        .mailchimp()
        .reject_address("blocked@example.com", "blocked@example.com has been banned");
    let result = batch(
        &client,
        json!([
            { "email_address": "not-an-email", "status_if_new": "subscribed" },
            { "email_address": "Blocked@example.com", "status_if_new": "subscribed" },
            { "email_address": "ok@example.com", "status_if_new": "subscribed" },
            { "email_address": "carl@example.com", "status_if_new": "subscribed", "merge_fields": { "NOPE": 1 } },
        ]),
        true,
    );
    assert_eq!(result["total_created"], 1);
    assert_eq!(result["error_count"], 3);
    let errors = result["errors"].as_array().unwrap();
    assert_eq!(errors[0]["email_address"], "not-an-email");
    assert!(
        errors[0]["error"]
            .as_str()
            .unwrap()
            .contains("looks fake or invalid")
    );
    assert_eq!(errors[0]["error_code"], "ERROR_GENERIC");
    assert_eq!(errors[0]["field"], "email_address");
    assert_eq!(errors[1]["error"], "blocked@example.com has been banned");
    assert_eq!(errors[2]["error"], "Your merge fields were invalid.");
    assert_eq!(errors[2]["field"], "NOPE");
    assert_eq!(
        emulator
            .mailchimp()
            .audience("a1")
            .keys()
            .collect::<Vec<_>>(),
        vec!["ok@example.com"]
    );
}

#[test]
fn status_if_new_never_resubscribes_and_cleaned_is_a_compliance_error() {
    let (emulator, client) = setup();
    let mc = emulator.mailchimp();
    batch(
        &client,
        json!([
            { "email_address": "gone@example.com", "status_if_new": "subscribed" },
            { "email_address": "bounced@example.com", "status_if_new": "subscribed" },
        ]),
        true,
    );
    assert!(mc.set_status("a1", "gone@example.com", "unsubscribed"));
    assert!(mc.set_status("a1", "bounced@example.com", "cleaned"));

    let result = batch(
        &client,
        json!([
            { "email_address": "gone@example.com", "status_if_new": "subscribed", "merge_fields": { "FNAME": "G" } },
            { "email_address": "bounced@example.com", "status_if_new": "subscribed" },
        ]),
        true,
    );
    assert_eq!(result["error_count"], 0);
    assert_eq!(
        mc.member("a1", "gone@example.com").unwrap().status,
        "unsubscribed"
    );
    assert_eq!(
        mc.member("a1", "gone@example.com").unwrap().merge_fields["FNAME"],
        "G"
    );
    assert_eq!(
        mc.member("a1", "bounced@example.com").unwrap().status,
        "cleaned"
    );
    assert!(mc.resubscribed("a1").is_empty());

    // An explicit status on a cleaned contact fails; on an unsubscribed one it is
    // allowed (Mailchimp requires consent) but recorded for tests to assert on.
    let explicit = batch(
        &client,
        json!([
            { "email_address": "bounced@example.com", "status": "subscribed" },
            { "email_address": "gone@example.com", "status": "subscribed" },
        ]),
        true,
    );
    assert_eq!(explicit["error_count"], 1);
    assert!(
        explicit["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("compliance state")
    );
    assert_eq!(
        mc.member("a1", "bounced@example.com").unwrap().status,
        "cleaned"
    );
    assert_eq!(mc.resubscribed("a1"), vec!["gone@example.com"]);
}

#[test]
fn batch_request_limits_and_schema_errors() {
    let (_emulator, client) = setup();
    let many: Vec<Value> =
        (0..501).map(|i| json!({ "email_address": format!("u{i}@example.com"), "status_if_new": "subscribed" })).collect();
    assert_problem(
        &client.post(LIST, &json!({ "members": many })),
        400,
        "Invalid Resource",
    );
    assert_problem(
        &client.post(LIST, &json!({ "members": "x" })),
        400,
        "Invalid Resource",
    );
    assert_problem(
        &client.post(
            LIST,
            &json!({ "members": [{ "email_address": "a@example.com", "status": "bogus" }] }),
        ),
        400,
        "Invalid Resource",
    );
    assert_problem(
        &client.send("POST", LIST, Some("{not json")),
        400,
        "JSON Parse Exception",
    );
}

#[test]
fn member_put_get_patch() {
    let (emulator, client) = setup();
    let hash = subscriber_hash("ann@example.com");
    let path = format!("{LIST}/members/{hash}");

    assert_problem(&client.get(&path), 404, "Resource Not Found");
    // A new member needs status_if_new.
    assert_problem(
        &client.put(&path, &json!({ "email_address": "ann@example.com" })),
        400,
        "Invalid Resource",
    );
    // The hash must match the address.
    let wrong = client.put(
        &path,
        &json!({ "email_address": "bob@example.com", "status_if_new": "subscribed" }),
    );
    assert_problem(&wrong, 400, "Invalid Resource");

    let put = client.put(&path, &json!({ "email_address": "ann@example.com", "status_if_new": "subscribed", "merge_fields": { "FNAME": "Ann" } }));
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.json()["status"], "subscribed");
    // The address works in place of the hash.
    assert_eq!(
        client
            .get(&format!("{LIST}/members/ann@example.com"))
            .json()["id"],
        hash
    );

    let patched = client.patch(
        &path,
        &json!({ "email_address": "ann.new@example.com", "merge_fields": { "LNAME": "Lee" } }),
    );
    assert_eq!(patched.status, 200, "{}", patched.body);
    assert_eq!(patched.json()["id"], subscriber_hash("ann.new@example.com"));
    assert_eq!(
        client.get(&path).status,
        404,
        "the member moved to the new hash"
    );
    let ann = emulator
        .mailchimp()
        .member("a1", "ann.new@example.com")
        .unwrap();
    assert_eq!(ann.merge_fields["FNAME"], "Ann");
    assert_eq!(ann.merge_fields["LNAME"], "Lee");
}

#[test]
fn archive_and_permanent_delete() {
    let (emulator, client) = setup();
    let mc = emulator.mailchimp();
    batch(
        &client,
        json!([
            { "email_address": "arch@example.com", "status_if_new": "subscribed", "tags": ["t"] },
            { "email_address": "gdpr@example.com", "status_if_new": "subscribed" },
        ]),
        true,
    );
    assert_eq!(
        client
            .delete(&format!(
                "{LIST}/members/{}",
                subscriber_hash("arch@example.com")
            ))
            .status,
        204
    );
    assert_eq!(
        mc.member("a1", "arch@example.com").unwrap().status,
        "archived"
    );
    assert!(
        mc.members_with_tag("a1", "t").is_empty(),
        "archived members are not counted in tags"
    );
    let listing = client.get(&format!("{LIST}/members?count=100")).json();
    assert_eq!(
        listing["total_items"], 1,
        "archived members are listed only with status=archived"
    );
    assert_eq!(
        client
            .get(&format!("{LIST}/members?status=archived"))
            .json()["total_items"],
        1
    );

    // Archived members come back with status_if_new, keeping their data.
    let readd = batch(
        &client,
        json!([{ "email_address": "arch@example.com", "status_if_new": "pending" }]),
        true,
    );
    assert_eq!(readd["total_created"], 1);
    assert_eq!(
        mc.member("a1", "arch@example.com").unwrap().status,
        "pending"
    );

    let gdpr = subscriber_hash("gdpr@example.com");
    let erased = client.send(
        "POST",
        &format!("{LIST}/members/{gdpr}/actions/delete-permanent"),
        None,
    );
    assert_eq!(erased.status, 204);
    assert!(mc.member("a1", "gdpr@example.com").is_none());
    let again = batch(
        &client,
        json!([{ "email_address": "gdpr@example.com", "status_if_new": "subscribed" }]),
        true,
    );
    assert_eq!(again["error_count"], 1);
    assert!(
        again["errors"][0]["error"]
            .as_str()
            .unwrap()
            .contains("was permanently deleted and cannot be re-imported")
    );
    let put = client.put(
        &format!("{LIST}/members/{gdpr}"),
        &json!({ "email_address": "gdpr@example.com", "status_if_new": "subscribed" }),
    );
    assert_problem(&put, 400, "Forgotten Email Not Subscribed");
    assert!(mc.permanently_deleted("a1").contains("gdpr@example.com"));
}

#[test]
fn member_listing_paginates_and_filters() {
    let (emulator, client) = setup();
    let members: Vec<Value> =
        (0..25).map(|i| json!({ "email_address": format!("u{i:02}@example.com"), "status_if_new": "subscribed" })).collect();
    batch(&client, Value::Array(members), true);
    emulator
        .mailchimp()
        .set_status("a1", "u03@example.com", "unsubscribed");
    let first = client.get(&format!("{LIST}/members"));
    assert_eq!(
        first.json()["members"].as_array().unwrap().len(),
        10,
        "default count is 10"
    );
    assert_eq!(first.json()["total_items"], 25);
    let last = client
        .get(&format!("{LIST}/members?count=10&offset=20"))
        .json();
    assert_eq!(emails(&last, "members").len(), 5);
    let unsubscribed = client
        .get(&format!("{LIST}/members?status=unsubscribed"))
        .json();
    assert_eq!(emails(&unsubscribed, "members"), vec!["u03@example.com"]);
}

#[test]
fn member_tags_endpoint() {
    let (emulator, client) = setup();
    batch(
        &client,
        json!([{ "email_address": "ann@example.com", "status_if_new": "subscribed", "tags": ["old"] }]),
        true,
    );
    let path = format!("{LIST}/members/{}/tags", subscriber_hash("ann@example.com"));
    let update = json!({ "tags": [{ "name": "new", "status": "active" }, { "name": "old", "status": "inactive" }] });
    assert_eq!(client.post(&path, &update).status, 204);
    let tags = client.get(&path).json();
    assert_eq!(tags["total_items"], 1);
    assert_eq!(tags["tags"][0]["name"], "new");
    assert_eq!(
        emulator
            .mailchimp()
            .member("a1", "ann@example.com")
            .unwrap()
            .tags
            .into_iter()
            .collect::<Vec<_>>(),
        vec!["new"]
    );
    assert_eq!(
        client
            .post(&format!("{LIST}/members/nobody/tags"), &update)
            .status,
        404
    );
}

#[test]
fn merge_fields_listing_and_creation() {
    let (emulator, client) = setup();
    let listing = client.get(&format!("{LIST}/merge-fields?count=100")).json();
    let tags: Vec<&str> = listing["merge_fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["tag"].as_str().unwrap())
        .collect();
    assert_eq!(tags, vec!["FNAME", "LNAME", "ADDRESS", "PHONE", "BIRTHDAY"]);
    assert_eq!(listing["total_items"], 5);

    let created = client.post(
        &format!("{LIST}/merge-fields"),
        &json!({ "name": "Lifetime value", "tag": "LTV", "type": "number" }),
    );
    assert_eq!(created.status, 200, "{}", created.body);
    assert_eq!(created.json()["tag"], "LTV");
    assert!(created.json()["merge_id"].is_u64());
    let duplicate = client.post(
        &format!("{LIST}/merge-fields"),
        &json!({ "name": "x", "tag": "LTV", "type": "text" }),
    );
    assert_problem(&duplicate, 400, "Invalid Resource");

    emulator.mailchimp().add_merge_field("a1", "CITY", "text");
    let result = batch(
        &client,
        json!([
            { "email_address": "a@example.com", "status_if_new": "subscribed", "merge_fields": { "LTV": "5000", "CITY": "Moscow" } },
            { "email_address": "b@example.com", "status_if_new": "subscribed", "merge_fields": { "LTV": "lots" } },
        ]),
        true,
    );
    assert_eq!(result["total_created"], 1);
    assert_eq!(result["errors"][0]["field"], "LTV");
    let a = emulator.mailchimp().member("a1", "a@example.com").unwrap();
    assert_eq!(a.merge_fields["LTV"], 5000);
    assert_eq!(a.merge_fields["CITY"], "Moscow");
}

#[test]
fn static_segments_are_tags() {
    let (emulator, client) = setup();
    let mc = emulator.mailchimp();
    batch(
        &client,
        json!([
            { "email_address": "ann@example.com", "status_if_new": "subscribed" },
            { "email_address": "bob@example.com", "status_if_new": "subscribed" },
            { "email_address": "cat@example.com", "status_if_new": "subscribed" },
        ]),
        true,
    );
    let created = client.post(&format!("{LIST}/segments"), &json!({ "name": "vip (crm)", "static_segment": ["ann@example.com", "stranger@example.com"] }));
    assert_eq!(created.status, 200, "{}", created.body);
    let segment = created.json();
    assert_eq!(segment["type"], "static");
    assert_eq!(segment["member_count"], 1);
    let id = segment["id"].as_u64().unwrap();
    assert_problem(
        &client.post(
            &format!("{LIST}/segments"),
            &json!({ "name": "vip (crm)", "static_segment": [] }),
        ),
        400,
        "Invalid Resource",
    );

    let update = client.post(
        &format!("{LIST}/segments/{id}"),
        &json!({ "members_to_add": ["bob@example.com", "cat@example.com", "nobody@example.com"], "members_to_remove": ["ann@example.com"] }),
    );
    assert_eq!(update.status, 200, "{}", update.body);
    let update = update.json();
    assert_eq!(update["total_added"], 2);
    assert_eq!(update["total_removed"], 1);
    assert_eq!(
        emails(&update, "members_added"),
        vec!["bob@example.com", "cat@example.com"]
    );
    assert_eq!(emails(&update, "members_removed"), vec!["ann@example.com"]);
    assert_eq!(update["error_count"], 1);
    assert_eq!(
        update["errors"][0]["email_addresses"],
        json!(["nobody@example.com"])
    );
    assert!(update["errors"][0]["error"].is_string());

    let vips: Vec<String> = mc.members_with_tag("a1", "vip (crm)").into_keys().collect();
    assert_eq!(vips, vec!["bob@example.com", "cat@example.com"]);
    let listing = client
        .get(&format!("{LIST}/segments?type=static&count=100"))
        .json();
    assert_eq!(listing["total_items"], 1);
    assert_eq!(listing["segments"][0]["member_count"], 2);
    assert_eq!(
        client.get(&format!("{LIST}/segments/{id}")).json()["name"],
        "vip (crm)"
    );
    assert_eq!(mc.segments("a1")[0].member_count, 2);

    let too_many: Vec<String> = (0..501).map(|i| format!("u{i}@example.com")).collect();
    assert_problem(
        &client.post(
            &format!("{LIST}/segments/{id}"),
            &json!({ "members_to_add": too_many }),
        ),
        400,
        "Invalid Resource",
    );

    assert_eq!(client.delete(&format!("{LIST}/segments/{id}")).status, 204);
    assert!(mc.members_with_tag("a1", "vip (crm)").is_empty());
    assert_problem(
        &client.get(&format!("{LIST}/segments/{id}")),
        404,
        "Resource Not Found",
    );
}

#[test]
fn api_key_is_checked_when_set() {
    let (emulator, client) = setup();
    emulator.mailchimp().set_api_key("secret-us21");
    let missing = client.get("/3.0/ping");
    assert_problem(&missing, 401, "API Key Invalid");
    assert_eq!(
        missing.json()["detail"],
        "Your API key may be invalid, or you've attempted to access the wrong datacenter."
    );
    let wrong = client.clone().with_header("Authorization", "Bearer nope");
    assert_eq!(wrong.get("/3.0/ping").status, 401);
    let bearer = client
        .clone()
        .with_header("Authorization", "Bearer secret-us21");
    assert_eq!(bearer.get("/3.0/ping").status, 200);
    // anystring:secret-us21
    let basic = client
        .clone()
        .with_header("Authorization", "Basic YW55c3RyaW5nOnNlY3JldC11czIx");
    assert_eq!(basic.get("/3.0/ping").status, 200);
    emulator.mailchimp().accept_any_api_key();
    assert_eq!(client.get("/3.0/ping").status, 200);
}

#[test]
fn concurrent_requests_are_served() {
    let (emulator, client) = setup();
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let client = client.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    let member = json!([{ "email_address": format!("t{t}-{i}@example.com"), "status_if_new": "subscribed" }]);
                    let reply = client.post(LIST, &json!({ "members": member, "update_existing": true }));
                    assert_eq!(reply.status, 200);
                }
            })
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
    assert_eq!(emulator.mailchimp().audience("a1").len(), 160);
    assert_eq!(emulator.requests("mailchimp").len(), 160);
}
