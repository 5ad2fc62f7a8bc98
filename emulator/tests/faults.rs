//! Fault injection, the request log and the admin API, over real HTTP.

mod common;

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::Client;
use listsync_emulator::{Emulator, Fault};
use serde_json::{Value, json};

const LIST: &str = "/3.0/lists/a1";

fn setup() -> (Emulator, Client) {
    let emulator = Emulator::start();
    let client = Client::new(emulator.base_url("mailchimp"));
    (emulator, client)
}

fn subscribe(client: &Client, email: &str) -> io::Result<common::Reply> {
    let body = json!({ "members": [{ "email_address": email, "status_if_new": "subscribed" }], "update_existing": true });
    client.try_send("POST", LIST, Some(&body.to_string()))
}

#[test]
fn status_faults_have_provider_bodies_and_retry_after() {
    let (emulator, client) = setup();
    let faults = emulator.faults("mailchimp");
    faults.push(Fault::too_many_requests(Some(2)));
    faults.push(Fault::status(500));
    faults.push(Fault::Status {
        code: 400,
        retry_after: None,
        body: Some(r#"{"custom":true}"#.into()),
    });

    let throttled = client.get("/3.0/ping");
    assert_eq!(throttled.status, 429);
    assert_eq!(throttled.header("retry-after"), Some("2"));
    assert_eq!(
        throttled.header("content-type"),
        Some("application/problem+json")
    );
    assert_eq!(throttled.json()["title"], "Too Many Requests");
    let failed = client.get("/3.0/ping");
    assert_eq!(failed.status, 500);
    assert_eq!(failed.header("retry-after"), None);
    assert_eq!(failed.json()["status"], 500);
    assert_eq!(client.get("/3.0/ping").json(), json!({ "custom": true }));
    assert_eq!(
        client.get("/3.0/ping").status,
        200,
        "scripted faults are consumed"
    );
    assert_eq!(faults.pending(), 0);
}

#[test]
fn faulted_requests_are_not_applied_and_are_logged() {
    let (emulator, client) = setup();
    emulator.faults("mailchimp").push(Fault::status(503));
    assert_eq!(subscribe(&client, "ann@example.com").unwrap().status, 503);
    assert!(emulator.mailchimp().audience("a1").is_empty());

    let log = emulator.requests("mailchimp");
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].method, "POST");
    assert_eq!(log[0].path, LIST);
    assert_eq!(log[0].status, 503);
    assert_eq!(log[0].fault.as_deref(), Some("status 503"));
    assert_eq!(
        log[0].json()["members"][0]["email_address"],
        "ann@example.com"
    );
    emulator.clear_requests("mailchimp");
    assert!(emulator.requests("mailchimp").is_empty());
}

#[test]
fn scripted_faults_are_fifo_and_path_filtered() {
    let (emulator, client) = setup();
    let faults = emulator.faults("mailchimp");
    faults.push(Fault::status(500).on_path("/segments"));
    faults.push(Fault::status(502));
    faults.push(Fault::status(503));
    assert_eq!(
        client.get("/3.0/ping").status,
        502,
        "the /segments fault waits for a matching request"
    );
    assert_eq!(client.get(&format!("{LIST}/segments")).status, 500);
    assert_eq!(client.get(&format!("{LIST}/segments")).status, 503);
    assert_eq!(client.get(&format!("{LIST}/segments")).status, 200);

    faults.push(Fault::status(500).on_method("POST"));
    assert_eq!(client.get("/3.0/ping").status, 200);
    assert_eq!(subscribe(&client, "a@example.com").unwrap().status, 500);
}

#[test]
fn timeout_holds_the_request_past_the_client_timeout() {
    let (emulator, client) = setup();
    emulator
        .faults("mailchimp")
        .push(Fault::Timeout(Duration::from_millis(800)));
    let impatient = client.clone().with_timeout(Duration::from_millis(200));
    let started = Instant::now();
    let error = subscribe(&impatient, "slow@example.com").unwrap_err();
    assert!(
        matches!(
            error.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "{error:?}"
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
    // A patient client gets 504 once the delay is over; nothing was applied.
    emulator
        .faults("mailchimp")
        .push(Fault::Timeout(Duration::from_millis(100)));
    assert_eq!(subscribe(&client, "slow@example.com").unwrap().status, 504);
    assert!(emulator.mailchimp().audience("a1").is_empty());
}

#[test]
fn reset_closes_the_connection_without_a_response() {
    let (emulator, client) = setup();
    emulator.faults("mailchimp").push(Fault::Reset);
    let error = subscribe(&client, "ann@example.com").unwrap_err();
    assert!(
        matches!(
            error.kind(),
            io::ErrorKind::ConnectionReset | io::ErrorKind::UnexpectedEof
        ),
        "{error:?}"
    );
    assert!(emulator.mailchimp().audience("a1").is_empty());
    assert_eq!(emulator.requests("mailchimp")[0].status, 0);
}

#[test]
fn lost_response_applies_then_resets() {
    let (emulator, client) = setup();
    emulator.faults("mailchimp").push(Fault::LostResponse);
    assert!(subscribe(&client, "ann@example.com").is_err());
    assert_eq!(
        emulator.mailchimp().audience("a1").len(),
        1,
        "the request was applied"
    );
}

#[test]
fn malformed_json_is_a_200_with_a_broken_body() {
    let (emulator, client) = setup();
    emulator.faults("mailchimp").push(Fault::MalformedJson);
    let reply = subscribe(&client, "ann@example.com").unwrap();
    assert_eq!(reply.status, 200);
    assert!(serde_json::from_str::<Value>(&reply.body).is_err());
    assert!(emulator.mailchimp().audience("a1").is_empty());
}

#[test]
fn down_mode_answers_503_until_cleared() {
    let (emulator, client) = setup();
    let faults = emulator.faults("mailchimp");
    faults.set_down(true);
    for _ in 0..3 {
        let reply = client.get("/3.0/ping");
        assert_eq!(reply.status, 503);
        assert_eq!(reply.json()["title"], "Service Unavailable");
    }
    // Other providers are unaffected.
    let webhook = Client::new(emulator.base_url("webhook"));
    assert_eq!(
        webhook
            .post("/x", &json!({ "type": "listsync.ping" }))
            .status,
        200
    );
    faults.set_down(false);
    assert_eq!(client.get("/3.0/ping").status, 200);
}

#[test]
fn random_faults_are_reproducible_per_seed() {
    let run = |seed| {
        let (emulator, client) = setup();
        let faults = emulator.faults("mailchimp");
        faults.set_timeout(Duration::from_millis(20));
        faults.set_random(0.5, seed);
        (0..40)
            .map(|i| match subscribe(&client, &format!("u{i}@example.com")) {
                Ok(reply) if serde_json::from_str::<Value>(&reply.body).is_err() => {
                    "malformed".to_string()
                }
                Ok(reply) => reply.status.to_string(),
                Err(_) => "reset".to_string(),
            })
            .collect::<Vec<_>>()
    };
    let first = run(7);
    assert_eq!(first, run(7));
    let ok = first.iter().filter(|s| *s == "200").count();
    assert!(
        (8..=32).contains(&ok),
        "rate 0.5 gave {ok}/40 successes: {first:?}"
    );
    let kinds: std::collections::BTreeSet<&String> = first.iter().filter(|s| *s != "200").collect();
    assert!(kinds.len() >= 3, "expected a mix of faults, got {kinds:?}");
}

#[test]
fn faults_apply_per_provider() {
    let (emulator, _client) = setup();
    emulator.faults("webhook").push(Fault::status(500));
    let webhook = Client::new(emulator.base_url("webhook"));
    assert_eq!(
        webhook
            .post("/x", &json!({ "type": "listsync.ping" }))
            .status,
        500
    );
    assert_eq!(emulator.requests("webhook")[0].status, 500);
    assert!(emulator.requests("mailchimp").is_empty());
}

#[test]
fn keep_alive_connections_serve_several_requests() {
    let (emulator, _client) = setup();
    let mut stream = TcpStream::connect(("127.0.0.1", emulator.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = "GET /mailchimp/3.0/ping HTTP/1.1\r\nHost: x\r\n\r\n";
    stream
        .write_all(format!("{request}{request}").as_bytes())
        .unwrap();
    let mut seen = String::new();
    let mut buf = [0; 4096];
    while seen.matches("Chimpy").count() < 2 {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert_eq!(seen.matches("HTTP/1.1 200 OK").count(), 2);
}

#[test]
fn admin_api_controls_faults_state_and_logs() {
    let (emulator, client) = setup();
    let admin = Client::new(format!("{}/_admin", emulator.url()));

    let pushed = admin.post(
        "/faults/mailchimp",
        &json!({ "push": [{ "status": 429, "retry_after": 1 }, { "reset": true, "path": "/lists" }, { "malformed": true }, { "timeout_ms": 10 }] }),
    );
    assert_eq!(pushed.status, 200, "{}", pushed.body);
    assert_eq!(emulator.faults("mailchimp").pending(), 4);
    assert_eq!(
        admin
            .post("/faults/mailchimp", &json!({ "push": [{ "bogus": 1 }] }))
            .status,
        400
    );
    assert_eq!(
        admin
            .post("/faults/mailchimp", &json!({ "clear": true }))
            .status,
        200
    );
    assert_eq!(emulator.faults("mailchimp").pending(), 0);

    admin.post("/faults/mailchimp", &json!({ "down": true }));
    assert_eq!(client.get("/3.0/ping").status, 503);
    admin.post("/faults/mailchimp", &json!({ "down": false }));
    admin.post(
        "/faults/mailchimp",
        &json!({ "random": { "rate": 1.0, "seed": 3 }, "timeout_default_ms": 10 }),
    );
    assert_ne!(
        subscribe(&client, "x@example.com")
            .map(|r| r.status)
            .unwrap_or(0),
        200
    );
    admin.post("/faults/mailchimp", &json!({ "clear": true }));

    assert_eq!(subscribe(&client, "ann@example.com").unwrap().status, 200);
    let status = admin.post(
        "/mailchimp/status",
        &json!({ "audience": "a1", "email": "ann@example.com", "status": "unsubscribed" }),
    );
    assert_eq!(status.status, 200, "{}", status.body);
    assert_eq!(
        emulator
            .mailchimp()
            .member("a1", "ann@example.com")
            .unwrap()
            .status,
        "unsubscribed"
    );
    assert_eq!(
        admin
            .post(
                "/mailchimp/status",
                &json!({ "audience": "a1", "email": "nobody@example.com", "status": "cleaned" })
            )
            .status,
        400
    );

    let state = admin.get("/state/mailchimp").json();
    assert_eq!(
        state["audiences"]["a1"]["members"]["ann@example.com"]["status"],
        "unsubscribed"
    );
    let requests = admin.get("/requests/mailchimp").json();
    assert!(
        requests
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["status"] == 503)
    );
    assert_eq!(admin.delete("/requests/mailchimp").status, 204);
    assert_eq!(admin.get("/requests/mailchimp").json(), json!([]));
    let providers = admin.get("/providers").json()["providers"].clone();
    for provider in ["mailchimp", "webhook"] {
        assert!(
            providers.as_array().unwrap().contains(&json!(provider)),
            "{providers}"
        );
    }
    assert_eq!(admin.get("/state/nope").status, 404);
    assert_eq!(admin.post("/reset/mailchimp", &json!({})).status, 204);
    assert!(emulator.mailchimp().audience_ids().is_empty());
}

#[test]
fn unknown_provider_and_garbage_requests() {
    let (emulator, _client) = setup();
    let root = Client::new(emulator.url());
    assert_eq!(root.get("/nope/x").status, 404);
    let mut stream = TcpStream::connect(("127.0.0.1", emulator.port())).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"this is not http\r\n\r\n").unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
}

#[test]
fn drop_stops_the_server() {
    let emulator = Emulator::start();
    let port = emulator.port();
    drop(emulator);
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Err(_) => break,
            Ok(_) if Instant::now() > deadline => panic!("still accepting after drop"),
            Ok(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}
