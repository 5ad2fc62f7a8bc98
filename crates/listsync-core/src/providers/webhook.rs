//! Any webhook: batches of JSON changes POSTed to `settings.url`, signed per the Standard
//! Webhooks convention (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
//! HMAC-SHA256 of "id.timestamp.body">`). The escape hatch for Zapier, Make and in-house services.
//!
//! Any 2xx answer delivers the batch. The receiver may report per-item failures with
//! `{"results": [{"email": ..., "status": "failed", "message": ...}]}`; a status of
//! `unsubscribed` (or `bounced`, `complained`) is a consent refusal.

use super::{
    Binding, Capabilities, Config, ConsentStatus, LeaveAction, Limits, Member, Need, Outcome,
    Provider, Spec,
};
use crate::http::{Http, Method, Request, Response, Result, transient};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::collections::HashMap;

pub static SPEC: Spec = Spec {
    name: "webhook",
    settings: &[("url", Need::Required)],
    secrets: &[("signing_secret", Need::Required)],
    capabilities: Capabilities {
        on_leave: &["remove", "archive", "unsubscribe", "delete", "keep"],
        double_opt_in: true,
        tags: true,
        phone_identity: false,
    },
    validate,
    field_name: super::any_field_name,
    connect,
};

const BATCH: usize = 500;

fn validate(config: &Config) -> std::result::Result<(), String> {
    let url = config.setting("url").unwrap_or_default();
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err("settings.url must be an http(s) URL".into());
    }
    signing_key(config.secret("signing_secret").unwrap_or_default()).map(|_| ())
}

/// A `whsec_<base64>` secret is the base64 of the key; any other string is the key itself.
fn signing_key(secret: &str) -> std::result::Result<Vec<u8>, String> {
    match secret.strip_prefix("whsec_") {
        Some(encoded) => BASE64
            .decode(encoded)
            .map_err(|_| "secrets.signing_secret: the part after whsec_ is not base64".to_string()),
        None if secret.len() >= 16 => Ok(secret.as_bytes().to_vec()),
        None => {
            Err("secrets.signing_secret must be whsec_<base64> or at least 16 characters".into())
        }
    }
}

fn connect(config: &Config) -> Box<dyn Provider> {
    Box::new(Webhook {
        url: config.base_url(config.setting("url").unwrap_or_default()),
        key: signing_key(config.secret("signing_secret").unwrap_or_default()).unwrap_or_default(),
    })
}

struct Webhook {
    url: String,
    key: Vec<u8>,
}

/// A message id unique to each POST. Not derived from the content alone: the same change (say,
/// "remove ann") can legitimately be sent again later, after she came back, and a receiver
/// that drops duplicate ids would then ignore it. Redelivered batches are harmless anyway:
/// every change says what the state should be, not what happened.
fn message_id(body: &[u8]) -> String {
    static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut digest = Sha256::new();
    digest.update(body);
    digest.update(std::process::id().to_le_bytes());
    digest.update(
        SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    digest.update(nanos.to_le_bytes());
    let hash = digest.finalize();
    format!(
        "msg_{}",
        hash.iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The Standard Webhooks signature header value for a message.
pub fn signature(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
}

impl Webhook {
    /// POSTs a signed message with a fresh id.
    fn post(&self, http: &mut Http, operation: &str, message: &Value) -> Result<Response> {
        let body = serde_json::to_vec(message).unwrap_or_default();
        let id = message_id(&body);
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let mut request = Request::new(Method::Post, self.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", id.clone())
            .header("webhook-timestamp", timestamp.to_string())
            .header(
                "webhook-signature",
                signature(&self.key, &id, timestamp, &body),
            );
        request.body = Some(body);
        let response = http.send(operation, request)?;
        response.check(Response::text_excerpt)?;
        Ok(response)
    }

    /// POSTs one `change` per member; those the receiver reports nothing for are `ok`.
    fn deliver(
        &self,
        http: &mut Http,
        binding: &Binding,
        operation: &str,
        members: &[Member],
        ok: Outcome,
        change: impl Fn(&Member) -> Value,
    ) -> Result<Vec<Outcome>> {
        let changes: Vec<Value> = members.iter().map(change).collect();
        let message = json!({
            "type": "listsync.changes",
            "binding": {"id": binding.id, "list": binding.list_id, "filter": binding.filter},
            "changes": changes,
        });
        let response = self.post(http, operation, &message)?;
        let reported = item_results(&response)?;
        Ok(members
            .iter()
            .map(|m| {
                reported
                    .get(&m.address)
                    .cloned()
                    .unwrap_or_else(|| ok.clone())
            })
            .collect())
    }
}

/// Per-item results the receiver chose to report. A 2xx whose body says JSON but does not
/// parse was cut off on the way (a proxy, a crash mid-answer): whether the receiver applied
/// the message is unknown, so it is retried, as after a timeout.
fn item_results(response: &Response) -> Result<HashMap<String, Outcome>> {
    let says_json = response
        .header("content-type")
        .is_some_and(|t| t.to_ascii_lowercase().contains("json"));
    let body: Value = match serde_json::from_slice(&response.body) {
        Ok(body) => body,
        Err(e) if says_json && !response.body.trim_ascii().is_empty() => {
            return Err(transient(format!(
                "HTTP {} with a JSON body that does not parse ({e}): the outcome is unknown",
                response.status
            )));
        }
        Err(_) => Value::Null,
    };
    let mut results = HashMap::new();
    for item in body["results"].as_array().into_iter().flatten() {
        let Some(email) = item["email"].as_str() else {
            continue;
        };
        let message = item["message"].as_str().unwrap_or("").to_string();
        let outcome = match item["status"].as_str() {
            Some("failed") => Outcome::failed(message),
            Some("unsubscribed") => Outcome::Refused {
                status: ConsentStatus::Unsubscribed,
                message,
            },
            Some("bounced") => Outcome::Refused {
                status: ConsentStatus::Bounced,
                message,
            },
            Some("complained") => Outcome::Refused {
                status: ConsentStatus::Complained,
                message,
            },
            Some("retry") => Outcome::retry(message),
            _ => continue,
        };
        results.insert(email.to_lowercase(), outcome);
    }
    Ok(results)
}

impl Provider for Webhook {
    fn limits(&self) -> Limits {
        Limits::batches(BATCH, BATCH)
    }

    fn check(&mut self, http: &mut Http) -> Result<Value> {
        let response = self.post(http, "ping", &json!({"type": "listsync.ping"}))?;
        Ok(json!({"provider": "webhook", "status": response.status}))
    }

    fn prepare(&mut self, _http: &mut Http, binding: &mut Binding) -> Result<()> {
        // The receiver's lists are whatever it makes of the binding's list name.
        if binding.list_id.is_none() {
            binding.list_id = Some(binding.list_name.clone());
        }
        Ok(())
    }

    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let ok = Outcome::member(binding.new_member_status, None);
        self.deliver(http, binding, "upsert members", members, ok, |m| {
            json!({"action": "upsert", "email": m.address, "fields": m.fields, "tags": binding.tags,
                   "status_if_new": binding.new_member_status.as_str()})
        })
    }

    fn remove(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        action: LeaveAction,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        self.deliver(
            http,
            binding,
            "remove members",
            members,
            Outcome::Removed,
            |m| json!({"action": "remove", "email": m.address, "on_leave": action.as_str()}),
        )
    }

    fn erase(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        self.deliver(
            http,
            binding,
            "erase members",
            members,
            Outcome::Removed,
            |m| json!({"action": "erase", "email": m.address}),
        )
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::http::ProviderError;
    use crate::providers::test_support::refusal_status;

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // From the Standard Webhooks specification's test vectors.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn weak_secrets_are_refused() {
        assert!(signing_key("short").is_err());
        assert!(signing_key("whsec_***").is_err());
        assert!(signing_key("a-long-enough-shared-secret").is_ok());
    }

    #[test]
    fn receivers_may_report_items() {
        let response = Response {
            status: 200,
            headers: vec![],
            body: br#"{"results":[{"email":"A@x.io","status":"failed","message":"no"},{"email":"b@x.io","status":"unsubscribed"}]}"#.to_vec(),
        };
        let results = item_results(&response).unwrap();
        assert_eq!(
            results["a@x.io"],
            Outcome::Failed {
                message: "no".into()
            }
        );
        assert_eq!(
            refusal_status(&results["b@x.io"]),
            Some(ConsentStatus::Unsubscribed)
        );
    }

    #[test]
    fn a_cut_off_json_answer_is_an_unknown_outcome() {
        let answer = |content_type: &str, body: &[u8]| Response {
            status: 200,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.to_vec(),
        };
        let cut_off = answer("application/json", br#"{"results": [{"email": "a@x"#);
        assert!(matches!(
            item_results(&cut_off),
            Err(ProviderError::Transient { .. })
        ));
        // Any other 2xx is delivered: an empty body, or a plain-text "OK".
        assert!(
            item_results(&answer("application/json", b""))
                .unwrap()
                .is_empty()
        );
        assert!(
            item_results(&answer("text/plain", b"OK"))
                .unwrap()
                .is_empty()
        );
    }
}

#[cfg(test)]
mod fake {
    use super::*;
    use crate::providers::conformance::{Fake, WRONG_SECRET, conformance_suite};
    use crate::providers::test_support;
    use listsync_emulator::Emulator;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn provider(emulator: &Emulator, signing_secret: &str) -> Box<dyn Provider> {
        connect(&test_support::config(
            json!({"url": format!("{}/crm", emulator.base_url("webhook"))}),
            json!({"signing_secret": signing_secret}),
        ))
    }

    struct WebhookFake;

    impl Fake for WebhookFake {
        const SPEC: &'static Spec = &SPEC;
        /// The ping proves the receiver is there and takes the signature: its 2xx says so.
        const CHECK_READS_THE_BODY: bool = false;

        fn connect(emulator: &Emulator) -> Box<dyn Provider> {
            emulator.webhook().set_secret(SECRET);
            provider(emulator, SECRET)
        }

        fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider> {
            provider(emulator, WRONG_SECRET)
        }

        fn binding() -> Binding {
            test_support::binding(&["FNAME"])
        }

        fn member(address: &str) -> Member {
            test_support::member(address, json!({"FNAME": "Ann"}))
        }

        fn refuse(emulator: &Emulator, address: &str) -> &'static str {
            emulator
                .webhook()
                .reject_address(address, "no such mailbox");
            "no such mailbox"
        }

        /// The receiver holds an address while one of its lists does.
        fn knows(emulator: &Emulator, address: &str) -> bool {
            emulator
                .webhook()
                .lists()
                .values()
                .any(|list| list.contains_key(address))
        }
    }

    conformance_suite!(WebhookFake {
        consent: unsupported(
            "the receiver's consent is its own: it reports refusals per item (unit::receivers_may_report_items)"
        ),
        erasure: unsupported(
            "what an erasure means is the receiver's to decide; the fake receiver does not implement it"
        )
    });
}
