//! The standalone binary, and compatibility with ureq (the extension's HTTP client).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::Client;
use listsync_emulator::{Emulator, Fault};
use serde_json::{Value, json};

#[test]
fn binary_prints_its_url_and_serves_until_stdin_closes() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_listsync-emulator"))
        .args(["--mailchimp-audience", "pre", "--exit-on-stdin-eof"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn listsync-emulator");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
    assert!(url.starts_with("http://127.0.0.1:"), "{url}");

    let admin = Client::new(format!("{url}/_admin"));
    admin.post("/mailchimp/auto_create", &json!({ "enabled": false }));
    let mailchimp = Client::new(format!("{url}/mailchimp"));
    assert_eq!(
        mailchimp.get("/3.0/lists/pre").status,
        200,
        "pre-created audience"
    );
    assert_eq!(mailchimp.get("/3.0/lists/other").status, 404);
    assert!(admin.get("/state/mailchimp").json()["audiences"]["pre"].is_object());

    drop(child.stdin.take());
    let status = child.wait().unwrap();
    assert!(status.success());
}

#[test]
fn binary_rejects_bad_arguments() {
    let status = Command::new(env!("CARGO_BIN_EXE_listsync-emulator"))
        .arg("--bogus")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(2));
}

#[test]
fn ureq_agent_works_with_keep_alive_auth_and_faults() {
    let emulator = Emulator::start();
    emulator.mailchimp().set_api_key("k-us1");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_millis(500)))
        .build()
        .into();
    let base = emulator.base_url("mailchimp");
    let auth = "Bearer k-us1";

    for i in 0..5 {
        let body = json!({ "members": [{ "email_address": format!("u{i}@example.com"), "status_if_new": "subscribed" }], "update_existing": true });
        let mut reply = agent
            .post(format!("{base}/3.0/lists/a1"))
            .header("Authorization", auth)
            .send_json(&body)
            .unwrap();
        assert_eq!(reply.status(), 200);
        let body: Value = reply.body_mut().read_json().unwrap();
        assert_eq!(body["total_created"], 1);
    }
    assert_eq!(emulator.mailchimp().audience("a1").len(), 5);

    let reply = agent.get(format!("{base}/3.0/ping")).call().unwrap();
    assert_eq!(reply.status(), 401);

    emulator.faults("mailchimp").push(Fault::Reset);
    assert!(
        agent
            .get(format!("{base}/3.0/ping"))
            .header("Authorization", auth)
            .call()
            .is_err()
    );
    emulator
        .faults("mailchimp")
        .push(Fault::Timeout(Duration::from_secs(2)));
    assert!(
        agent
            .get(format!("{base}/3.0/ping"))
            .header("Authorization", auth)
            .call()
            .is_err()
    );
    let reply = agent
        .get(format!("{base}/3.0/ping"))
        .header("Authorization", auth)
        .call()
        .unwrap();
    assert_eq!(
        reply.status(),
        200,
        "the agent recovers after a reset and a timeout"
    );
}
