//! A receiver for pg_listsync's generic webhook provider, served under `/webhook/<anything>`.
//!
//! It verifies Standard Webhooks signatures (<https://www.standardwebhooks.com/>) with
//! an implementation independent of the extension's, applies the changes to per-list
//! state, answers per-item results, and treats a repeated `webhook-id` as a retry of
//! the same message: applied once, answered the same way.
//!
//! Payloads:
//! ```json
//! {"type": "listsync.changes", "binding": {"id": 3, "list": "vip (crm)", "filter": "vip"},
//!  "changes": [
//!    {"action": "upsert", "email": "ann@example.com", "fields": {"FNAME": "Ann"}, "tags": ["crm"], "status_if_new": "subscribed"},
//!    {"action": "remove", "email": "bob@example.com", "on_leave": "remove"}]}
//! {"type": "listsync.ping"}
//! ```

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value, json};
use sha2::Sha256;

use crate::http::{Request, Response};
use crate::provider::{Provider, admin_error, lock, opt_str, req_str, unix_now};

/// Standard Webhooks: reject timestamps further than this from now (replay protection).
const TIMESTAMP_TOLERANCE_SECS: i64 = 5 * 60;

/// One POST the receiver got (accepted or not), in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct WebhookDelivery {
    /// The `webhook-id` header ("" if absent).
    pub id: String,
    /// The `webhook-timestamp` header (0 if absent or not a number).
    pub timestamp: i64,
    /// The path below `/webhook`, e.g. `/crm`.
    pub path: String,
    /// The parsed body (`Null` if it was not JSON).
    pub body: Value,
    /// True only if a secret is set and one of the signatures matched within the
    /// timestamp tolerance. Without a secret nothing is verified and this is false.
    pub signature_valid: bool,
    /// A repeated `webhook-id` that was answered from the first delivery, not re-applied.
    pub duplicate: bool,
    /// The HTTP status answered.
    pub status: u16,
    /// When the receiver got the request (the whole request read, before it was processed):
    /// the end of a commit → provider latency measurement (`make bench`).
    pub received_at: SystemTime,
}

/// One change the receiver applied (or, for `on_leave: keep`, deliberately did not).
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedChange {
    pub delivery_id: String,
    pub list: String,
    pub email: String,
    /// `upsert` or `remove`.
    pub action: String,
    /// For removals: the binding's `on_leave` (`remove`, `archive`, `unsubscribe`, `delete`, `keep`).
    pub on_leave: Option<String>,
    /// For upserts: the fields set.
    pub fields: Value,
}

/// The webhook receiver. Obtain it with [`crate::Emulator::webhook`].
pub struct Webhook {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// The decoded HMAC key; `None` accepts unsigned requests.
    secret: Option<Vec<u8>>,
    deliveries: Vec<WebhookDelivery>,
    /// `webhook-id` -> the response first given, for idempotent retries.
    answered: HashMap<String, Response>,
    /// list -> lower-cased address -> fields.
    lists: BTreeMap<String, BTreeMap<String, Value>>,
    /// lower-cased address -> per-item failure message.
    rejected: BTreeMap<String, String>,
    applied: Vec<AppliedChange>,
}

impl Webhook {
    pub(crate) fn new() -> Webhook {
        Webhook {
            state: Mutex::new(State::default()),
        }
    }

    /// Requires Standard Webhooks signatures made with this secret (`whsec_<base64 key>`;
    /// a bare base64 key is accepted too).
    ///
    /// # Panics
    /// If the key is not valid base64 (see [`Webhook::try_set_secret`]).
    pub fn set_secret(&self, secret: &str) {
        if let Err(message) = self.try_set_secret(secret) {
            panic!("{message}");
        }
    }

    pub fn try_set_secret(&self, secret: &str) -> Result<(), String> {
        let key = decode_secret(secret)?;
        lock(&self.state).secret = Some(key);
        Ok(())
    }

    /// Accept unsigned deliveries again (the default).
    pub fn clear_secret(&self) {
        lock(&self.state).secret = None;
    }

    /// Every change for this address is answered `failed` with `message`, and not applied.
    pub fn reject_address(&self, email: &str, message: &str) {
        lock(&self.state)
            .rejected
            .insert(email.trim().to_lowercase(), message.to_string());
    }

    pub fn clear_rejections(&self) {
        lock(&self.state).rejected.clear();
    }

    /// All deliveries received, in order (including rejected and duplicate ones).
    pub fn received(&self) -> Vec<WebhookDelivery> {
        lock(&self.state).deliveries.clone()
    }

    /// The state built from the applied changes: list -> address -> fields.
    pub fn lists(&self) -> BTreeMap<String, BTreeMap<String, Value>> {
        lock(&self.state).lists.clone()
    }

    /// One list's members (empty if unknown).
    pub fn list(&self, list: &str) -> BTreeMap<String, Value> {
        lock(&self.state)
            .lists
            .get(list)
            .cloned()
            .unwrap_or_default()
    }

    /// Every change applied, in order.
    pub fn applied_changes(&self) -> Vec<AppliedChange> {
        lock(&self.state).applied.clone()
    }
}

impl Provider for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    fn handle(&self, req: &Request) -> Response {
        // Taken first, before waiting for the state lock, so it is the arrival time.
        let received_at = SystemTime::now();
        if req.method != "POST" {
            return error(405, "the webhook receiver only accepts POST");
        }
        let mut st = lock(&self.state);
        let id = req.header("webhook-id").unwrap_or("").to_string();
        let timestamp_header = req.header("webhook-timestamp").unwrap_or("");
        let verdict = st.secret.as_deref().map(|key| {
            verify_signature(
                key,
                &id,
                timestamp_header,
                req.header("webhook-signature").unwrap_or(""),
                &req.body,
                unix_now(),
            )
        });
        let mut delivery = WebhookDelivery {
            id: id.clone(),
            timestamp: timestamp_header.parse().unwrap_or(0),
            path: req.path.clone(),
            body: serde_json::from_slice(&req.body).unwrap_or(Value::Null),
            signature_valid: matches!(verdict, Some(Ok(()))),
            duplicate: false,
            status: 0,
            received_at,
        };

        let response = if let Some(Err(reason)) = verdict {
            error(401, &reason)
        } else if let Some(previous) = st.answered.get(&id).filter(|_| !id.is_empty()) {
            delivery.duplicate = true;
            previous.clone()
        } else {
            let response = st.process(&id, &delivery.body);
            if !id.is_empty() && response.status == 200 {
                st.answered.insert(id, response.clone());
            }
            response
        };
        delivery.status = response.status;
        st.deliveries.push(delivery);
        response
    }

    fn state_json(&self) -> Value {
        let st = lock(&self.state);
        json!({
            "secret_set": st.secret.is_some(),
            "rejected": st.rejected,
            "lists": st.lists,
            "deliveries": st.deliveries.iter().map(|d| json!({
                "id": d.id, "timestamp": d.timestamp, "path": d.path, "signature_valid": d.signature_valid,
                "duplicate": d.duplicate, "status": d.status, "body": d.body,
                "received_at_ms": d.received_at.duration_since(UNIX_EPOCH).map(|t| t.as_secs_f64() * 1000.0).unwrap_or(0.0),
            })).collect::<Vec<_>>(),
        })
    }

    fn admin(&self, action: &str, body: &Value) -> Response {
        let empty = Map::new();
        let body = body.as_object().unwrap_or(&empty);
        let result = match action {
            "secret" => match opt_str(body, "secret") {
                Ok(Some(secret)) => self.try_set_secret(secret),
                Ok(None) => {
                    self.clear_secret();
                    Ok(())
                }
                Err(e) => Err(e),
            },
            "reject" => req_str(body, "email").and_then(|email| {
                self.reject_address(email, opt_str(body, "message")?.unwrap_or("rejected"));
                Ok(())
            }),
            _ => Err(format!("unknown webhook admin action {action:?}")),
        };
        match result {
            Ok(()) => Response::json(200, &self.state_json()),
            Err(message) => admin_error(400, &message),
        }
    }

    fn list_members(&self, list_id: &str) -> BTreeMap<String, Map<String, Value>> {
        self.list(list_id)
            .into_iter()
            .map(|(email, fields)| (email, fields.as_object().cloned().unwrap_or_default()))
            .collect()
    }

    fn reset(&self) {
        *lock(&self.state) = State::default();
    }
}

impl State {
    /// Applies a verified payload; 400 for a payload that is not one of ours.
    fn process(&mut self, delivery_id: &str, body: &Value) -> Response {
        let Some(obj) = body.as_object() else {
            return error(400, "body must be a JSON object");
        };
        match obj.get("type").and_then(Value::as_str) {
            Some("listsync.ping") => Response::json(200, &json!({ "ok": true })),
            Some("listsync.changes") => {
                let list = obj
                    .get("binding")
                    .and_then(|b| b.get("list"))
                    .and_then(Value::as_str);
                let Some(list) = list else {
                    return error(400, "binding.list (a string) is required");
                };
                let Some(changes) = obj.get("changes").and_then(Value::as_array) else {
                    return error(400, "changes (an array) is required");
                };
                let results: Vec<Value> = changes
                    .iter()
                    .map(|change| self.apply_change(delivery_id, list, change))
                    .collect();
                Response::json(200, &json!({ "results": results }))
            }
            Some(other) => error(400, &format!("unknown payload type {other:?}")),
            None => error(400, "type (a string) is required"),
        }
    }

    /// Applies one change and returns its result item.
    fn apply_change(&mut self, delivery_id: &str, list: &str, change: &Value) -> Value {
        let email = change
            .get("email")
            .and_then(Value::as_str)
            .map(|e| e.trim().to_lowercase());
        let Some(email) = email.filter(|e| !e.is_empty()) else {
            return json!({ "email": change.get("email"), "status": "failed", "message": "email (a string) is required" });
        };
        let failed =
            |message: &str| json!({ "email": email, "status": "failed", "message": message });
        if let Some(message) = self.rejected.get(&email) {
            return failed(message);
        }
        let mut applied = AppliedChange {
            delivery_id: delivery_id.to_string(),
            list: list.to_string(),
            email: email.clone(),
            action: String::new(),
            on_leave: None,
            fields: Value::Null,
        };
        match change.get("action").and_then(Value::as_str) {
            Some("upsert") => {
                let fields = match change.get("fields") {
                    None | Some(Value::Null) => json!({}),
                    Some(fields @ Value::Object(_)) => fields.clone(),
                    Some(_) => return failed("fields must be an object"),
                };
                self.lists
                    .entry(list.to_string())
                    .or_default()
                    .insert(email.clone(), fields.clone());
                applied.action = "upsert".into();
                applied.fields = fields;
            }
            Some("remove") => {
                let on_leave = change
                    .get("on_leave")
                    .and_then(Value::as_str)
                    .unwrap_or("remove")
                    .to_string();
                if on_leave != "keep"
                    && let Some(members) = self.lists.get_mut(list)
                {
                    members.remove(&email);
                }
                applied.action = "remove".into();
                applied.on_leave = Some(on_leave);
            }
            Some(other) => return failed(&format!("unknown action {other:?}")),
            None => return failed("action (a string) is required"),
        }
        self.applied.push(applied);
        json!({ "email": email, "status": "ok", "message": null })
    }
}

fn error(status: u16, message: &str) -> Response {
    Response::json(status, &json!({ "error": message }))
}

/// `whsec_<base64>` (or bare base64) -> key bytes.
fn decode_secret(secret: &str) -> Result<Vec<u8>, String> {
    let encoded = secret
        .trim()
        .strip_prefix("whsec_")
        .unwrap_or(secret.trim());
    let key = BASE64
        .decode(encoded)
        .map_err(|e| format!("webhook secret is not whsec_<base64>: {e}"))?;
    if key.is_empty() {
        return Err("webhook secret is empty".into());
    }
    Ok(key)
}

/// Standard Webhooks verification: the signed content is `{id}.{timestamp}.{body}`;
/// the header holds space-separated `v1,<base64 HMAC-SHA256>` entries, any of which may match.
fn verify_signature(
    key: &[u8],
    id: &str,
    timestamp: &str,
    header: &str,
    body: &[u8],
    now: i64,
) -> Result<(), String> {
    if id.is_empty() || timestamp.is_empty() || header.is_empty() {
        return Err("missing webhook-id, webhook-timestamp or webhook-signature header".into());
    }
    let ts: i64 = timestamp
        .parse()
        .map_err(|_| format!("webhook-timestamp {timestamp:?} is not a number"))?;
    if (now - ts).abs() > TIMESTAMP_TOLERANCE_SECS {
        return Err(format!(
            "webhook-timestamp {ts} is more than 5 minutes away from now ({now})"
        ));
    }
    let mut signed = format!("{id}.{timestamp}.").into_bytes();
    signed.extend_from_slice(body);
    let matches = header
        .split_whitespace()
        .filter_map(|entry| entry.strip_prefix("v1,"))
        .any(|candidate| {
            let Ok(candidate) = BASE64.decode(candidate) else {
                return false;
            };
            let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
                return false;
            };
            mac.update(&signed);
            mac.verify_slice(&candidate).is_ok() // constant-time comparison
        });
    if matches {
        Ok(())
    } else {
        Err("no webhook-signature matches".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector from the Standard Webhooks specification's reference libraries.
    #[test]
    fn verifies_reference_vector() {
        let key = decode_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        let header = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
        assert_eq!(
            verify_signature(
                &key,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                "1614265330",
                header,
                body,
                1614265330
            ),
            Ok(())
        );
        let err = verify_signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            header,
            body,
            1614265330 + 301,
        );
        assert!(err.unwrap_err().contains("5 minutes"));
        let tampered = verify_signature(
            &key,
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            "1614265330",
            header,
            b"{}",
            1614265330,
        );
        assert!(tampered.is_err());
    }
}
