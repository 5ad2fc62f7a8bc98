//! The webhook receiver over real HTTP, with signatures computed independently here.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::{Client, Reply};
use hmac::{Hmac, Mac};
use listsync_emulator::Emulator;
use serde_json::{Value, json};
use sha2::Sha256;

const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

fn secret() -> String {
    format!("whsec_{}", BASE64.encode(KEY))
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn sign(key: &[u8], id: &str, timestamp: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(format!("{id}.{timestamp}.{body}").as_bytes());
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

/// Posts `body` with the given headers (signature computed by the caller).
fn deliver(emulator: &Emulator, id: &str, timestamp: i64, signature: &str, body: &Value) -> Reply {
    Client::new(emulator.base_url("webhook"))
        .with_header("webhook-id", id)
        .with_header("webhook-timestamp", &timestamp.to_string())
        .with_header("webhook-signature", signature)
        .send("POST", "/crm", Some(&body.to_string()))
}

fn deliver_signed(emulator: &Emulator, id: &str, body: &Value) -> Reply {
    let ts = now();
    deliver(
        emulator,
        id,
        ts,
        &sign(KEY, id, ts, &body.to_string()),
        body,
    )
}

fn changes(list: &str, changes: Value) -> Value {
    json!({ "type": "listsync.changes", "binding": { "id": 3, "list": list, "filter": "vip" }, "changes": changes })
}

#[test]
fn applies_upserts_and_removals() {
    let emulator = Emulator::start();
    let body = changes(
        "vip (crm)",
        json!([
            { "action": "upsert", "email": "Ann@Example.com", "fields": { "FNAME": "Ann" }, "tags": ["crm"], "status_if_new": "subscribed" },
            { "action": "upsert", "email": "bob@example.com", "fields": { "FNAME": "Bob" } },
            { "action": "upsert", "email": "kept@example.com", "fields": {} },
        ]),
    );
    let reply = Client::new(emulator.base_url("webhook")).post("/crm", &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(
        reply.json()["results"][0],
        json!({ "email": "ann@example.com", "status": "ok", "message": null })
    );

    let removals = changes(
        "vip (crm)",
        json!([
            { "action": "remove", "email": "bob@example.com", "on_leave": "archive" },
            { "action": "remove", "email": "kept@example.com", "on_leave": "keep" },
        ]),
    );
    assert_eq!(
        Client::new(emulator.base_url("webhook"))
            .post("/crm", &removals)
            .status,
        200
    );

    let list = emulator.webhook().list("vip (crm)");
    assert_eq!(
        list.keys().collect::<Vec<_>>(),
        vec!["ann@example.com", "kept@example.com"]
    );
    assert_eq!(list["ann@example.com"], json!({ "FNAME": "Ann" }));
    let applied = emulator.webhook().applied_changes();
    assert_eq!(applied.len(), 5);
    assert_eq!(applied[3].on_leave.as_deref(), Some("archive"));
    let delivery = &emulator.webhook().received()[0];
    assert!(
        !delivery.signature_valid,
        "nothing is verified without a secret"
    );
    assert_eq!(delivery.body["binding"]["id"], 3);
}

#[test]
fn deliveries_record_when_they_arrived() {
    let emulator = Emulator::start();
    let body = changes(
        "l",
        json!([{ "action": "upsert", "email": "a@example.com" }]),
    );
    let before = SystemTime::now();
    let reply = Client::new(emulator.base_url("webhook")).post("/crm", &body);
    let after = SystemTime::now();
    assert_eq!(reply.status, 200, "{}", reply.body);
    let received_at = emulator.webhook().received()[0].received_at;
    assert!(
        before <= received_at && received_at <= after,
        "{received_at:?} is not between {before:?} and {after:?}"
    );
    let state = Client::new(emulator.url())
        .get("/_admin/state/webhook")
        .json();
    let ms = state["deliveries"][0]["received_at_ms"].as_f64().unwrap();
    let expected = received_at
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        * 1000.0;
    assert!((ms - expected).abs() < 0.001, "{ms} != {expected}");
}

#[test]
fn valid_signature_is_accepted() {
    let emulator = Emulator::start();
    emulator.webhook().set_secret(&secret());
    let body = changes(
        "l",
        json!([{ "action": "upsert", "email": "a@example.com", "fields": { "X": 1 } }]),
    );
    let reply = deliver_signed(&emulator, "msg_1", &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    let received = emulator.webhook().received();
    assert_eq!(received.len(), 1);
    assert!(received[0].signature_valid);
    assert_eq!(received[0].id, "msg_1");
    assert_eq!(emulator.webhook().list("l").len(), 1);
}

#[test]
fn any_of_several_signatures_may_match() {
    let emulator = Emulator::start();
    emulator.webhook().set_secret(&secret());
    let body = json!({ "type": "listsync.ping" });
    let ts = now();
    let good = sign(KEY, "msg_r", ts, &body.to_string());
    let header = format!("v1,AAAA {good} v2,ignored");
    let reply = deliver(&emulator, "msg_r", ts, &header, &body);
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json(), json!({ "ok": true }));
}

#[test]
fn bad_signatures_are_rejected_and_not_applied() {
    let emulator = Emulator::start();
    emulator.webhook().set_secret(&secret());
    let body = changes(
        "l",
        json!([{ "action": "upsert", "email": "a@example.com" }]),
    );
    let ts = now();

    let wrong_key = deliver(
        &emulator,
        "m1",
        ts,
        &sign(b"another key", "m1", ts, &body.to_string()),
        &body,
    );
    assert_eq!(wrong_key.status, 401);
    // Signed for a different body.
    let tampered = deliver(&emulator, "m2", ts, &sign(KEY, "m2", ts, "{}"), &body);
    assert_eq!(tampered.status, 401);
    // Correctly signed, but six minutes old.
    let old = ts - 360;
    assert_eq!(
        deliver(
            &emulator,
            "m3",
            old,
            &sign(KEY, "m3", old, &body.to_string()),
            &body
        )
        .status,
        401
    );
    // No signature at all.
    assert_eq!(
        Client::new(emulator.base_url("webhook"))
            .post("/crm", &body)
            .status,
        401
    );

    assert!(emulator.webhook().lists().is_empty());
    let received = emulator.webhook().received();
    assert_eq!(received.len(), 4);
    assert!(
        received
            .iter()
            .all(|d| !d.signature_valid && d.status == 401)
    );

    // A retry of a rejected message with a good signature is processed.
    assert_eq!(deliver_signed(&emulator, "m1", &body).status, 200);
    assert_eq!(emulator.webhook().list("l").len(), 1);
}

#[test]
fn duplicate_ids_are_applied_once() {
    let emulator = Emulator::start();
    emulator.webhook().set_secret(&secret());
    let add = changes(
        "l",
        json!([{ "action": "upsert", "email": "a@example.com", "fields": { "N": 1 } }]),
    );
    let first = deliver_signed(&emulator, "msg_dup", &add);
    assert_eq!(first.status, 200);
    emulator.webhook().list("l"); // state after the first delivery
    let remove = changes(
        "l",
        json!([{ "action": "remove", "email": "a@example.com" }]),
    );
    assert_eq!(deliver_signed(&emulator, "msg_other", &remove).status, 200);
    assert!(emulator.webhook().list("l").is_empty());

    // The retry of msg_dup must not re-add the address; it gets the first answer again.
    let retry = deliver_signed(&emulator, "msg_dup", &add);
    assert_eq!(retry.status, 200);
    assert_eq!(retry.body, first.body);
    assert!(emulator.webhook().list("l").is_empty());
    let received = emulator.webhook().received();
    assert_eq!(received.iter().filter(|d| d.duplicate).count(), 1);
    assert_eq!(emulator.webhook().applied_changes().len(), 2);
}

#[test]
fn rejected_addresses_fail_per_item() {
    let emulator = Emulator::start();
    emulator
        .webhook()
        .reject_address("bad@example.com", "mailbox does not exist");
    let body = changes(
        "l",
        json!([
            { "action": "upsert", "email": "bad@example.com", "fields": {} },
            { "action": "upsert", "email": "good@example.com", "fields": {} },
            { "action": "frobnicate", "email": "odd@example.com" },
        ]),
    );
    let reply = Client::new(emulator.base_url("webhook")).post("/crm", &body);
    assert_eq!(reply.status, 200);
    let results = reply.json()["results"].clone();
    assert_eq!(
        results[0],
        json!({ "email": "bad@example.com", "status": "failed", "message": "mailbox does not exist" })
    );
    assert_eq!(results[1]["status"], "ok");
    assert_eq!(results[2]["status"], "failed");
    assert_eq!(
        emulator.webhook().list("l").keys().collect::<Vec<_>>(),
        vec!["good@example.com"]
    );
}

#[test]
fn malformed_payloads_are_400() {
    let emulator = Emulator::start();
    let client = Client::new(emulator.base_url("webhook"));
    assert_eq!(client.send("POST", "/crm", Some("not json")).status, 400);
    assert_eq!(
        client
            .post("/crm", &json!({ "type": "something.else" }))
            .status,
        400
    );
    assert_eq!(
        client
            .post(
                "/crm",
                &json!({ "type": "listsync.changes", "changes": [] })
            )
            .status,
        400
    );
    assert_eq!(client.get("/crm").status, 405);
}
