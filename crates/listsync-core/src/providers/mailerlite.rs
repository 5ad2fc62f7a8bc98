//! MailerLite, the current API (`https://connect.mailerlite.com/api`, `Authorization: Bearer`).
//!
//! A binding's list is a group. MailerLite has no bulk subscriber endpoint with per-item
//! results other than `POST /api/batch` (at most 50 sub-requests, answered in order), so each
//! chunk of 50 members costs two calls: a batch of `GET /api/subscribers/{email}` to learn who
//! exists and with which status, then a batch of `POST /api/subscribers` upserts. The upsert is
//! non-destructive (omitted fields and groups stay) and changes a status only when one is sent,
//! so `status` goes only with subscribers that do not exist yet; subscribers that are
//! unsubscribed, bounced or junk are not written at all and come back as refusals.
//!
//! Limits: 120 requests per minute per account (429 with `Retry-After`), and a batch made only
//! of subscriber upserts counts as an import (5 per minute, its own 429): backfills are paced by
//! that second limit, which the engine honours through `Retry-After`.

use super::{
    Binding, Capabilities, Config, ConsentStatus, LeaveAction, Limits, Member, MemberStatus, Need,
    Outcome, Provider, Spec, chunks, kit,
};
use crate::http::{
    Http, Method, ProviderError, Request, Response, Result, percent_encode, transient,
};
use serde_json::{Map, Value, json};

pub static SPEC: Spec = Spec {
    name: "mailerlite",
    settings: &[],
    secrets: &[("api_key", Need::Required)],
    capabilities: Capabilities {
        on_leave: &["remove", "unsubscribe", "delete", "keep"],
        double_opt_in: true,
        tags: false,
        phone_identity: false,
    },
    validate: super::no_extra_validation,
    field_name,
    connect,
};

/// Sub-requests per `POST /api/batch` (documented maximum).
const BATCH: usize = 50;
const DEFAULT_ROOT: &str = "https://connect.mailerlite.com";

/// Field keys are MailerLite's slugs of field names: `name`, `last_name`, `z_i_p`, ...
fn field_name(name: &str) -> std::result::Result<(), String> {
    let valid = name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(
            "MailerLite fields are given by key: lower-case letters, digits and _ (like last_name)"
                .into(),
        )
    }
}

fn connect(config: &Config) -> Box<dyn Provider> {
    Box::new(MailerLite {
        root: config.base_url(DEFAULT_ROOT),
        token: config.secret("api_key").unwrap_or_default().to_string(),
    })
}

struct MailerLite {
    root: String,
    token: String,
}

/// One request inside `POST /api/batch`; `path` starts with `api/`.
struct Sub {
    method: &'static str,
    path: String,
    body: Option<Value>,
}

impl Sub {
    fn new(method: &'static str, path: String) -> Sub {
        Sub {
            method,
            path,
            body: None,
        }
    }

    fn with_body(mut self, body: Value) -> Sub {
        self.body = Some(body);
        self
    }
}

/// A sub-request's answer.
struct SubAnswer {
    code: u16,
    body: Value,
}

impl SubAnswer {
    fn ok(&self) -> bool {
        (200..300).contains(&self.code)
    }
}

/// What a lookup by address found.
enum Found {
    Subscriber {
        id: String,
        status: String,
    },
    Missing,
    /// The lookup itself failed for this member.
    Failed(Outcome),
}

impl MailerLite {
    fn request(&self, method: Method, path: &str) -> Request {
        Request::new(method, format!("{}/{path}", self.root))
            .header("authorization", format!("Bearer {}", self.token))
            .header("accept", "application/json")
    }

    /// Sends and classifies: 2xx → body; 401/403 → Auth; 408/429/5xx → Transient; 404 →
    /// `None`; any other error → Rejected with MailerLite's words.
    fn call(
        &self,
        http: &mut Http,
        operation: &str,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Option<Value>> {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = http.send(operation, request)?;
        if response.status == 404 {
            return Ok(None);
        }
        response.check(response_message)?;
        Ok(Some(response.json()?))
    }

    /// A GET that must find something: a 404 means `base_url` points at no MailerLite API.
    fn get(&self, http: &mut Http, operation: &str, path: &str) -> Result<Value> {
        self.call(http, operation, Method::Get, path, None)?
            .ok_or_else(|| self.no_api())
    }

    /// `POST /api/batch`: one answer per sub-request, in order.
    fn batch(&self, http: &mut Http, operation: &str, subs: &[Sub]) -> Result<Vec<SubAnswer>> {
        let requests: Vec<Value> = subs
            .iter()
            .map(|sub| {
                let mut request = json!({"method": sub.method, "path": sub.path});
                if let Some(body) = &sub.body {
                    request["body"] = body.clone();
                }
                request
            })
            .collect();
        let answer = self
            .call(
                http,
                operation,
                Method::Post,
                "api/batch",
                Some(&json!({"requests": requests})),
            )?
            .ok_or_else(|| {
                ProviderError::Binding(format!(
                    "no MailerLite batch endpoint at {}/api/batch (settings.base_url?)",
                    self.root
                ))
            })?;
        let responses = answer["responses"]
            .as_array()
            .filter(|r| r.len() == subs.len())
            .ok_or_else(|| {
                transient(format!(
                    "MailerLite answered a batch of {} requests without one response each",
                    subs.len()
                ))
            })?;
        responses
            .iter()
            .map(|response| {
                let code = response["code"].as_u64().unwrap_or(0) as u16;
                // Sub-response bodies are objects, but tolerate them JSON-encoded as strings.
                let body = match &response["body"] {
                    Value::String(text) => {
                        serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.clone()))
                    }
                    other => other.clone(),
                };
                if code == 401 || code == 403 {
                    return Err(ProviderError::Auth(format!(
                        "HTTP {code}: {}",
                        describe(&body)
                    )));
                }
                Ok(SubAnswer { code, body })
            })
            .collect()
    }

    /// Who of `members` exists, by address (one batch of lookups).
    fn lookup(&self, http: &mut Http, members: &[Member]) -> Result<Vec<Found>> {
        let subs: Vec<Sub> = members
            .iter()
            .map(|m| Sub::new("GET", subscriber_path(&m.address)))
            .collect();
        let answers = self.batch(http, "look up subscribers", &subs)?;
        Ok(answers
            .iter()
            .map(|answer| match answer.code {
                200 => match (
                    answer.body["data"]["id"].as_str(),
                    answer.body["data"]["status"].as_str(),
                ) {
                    (Some(id), Some(status)) => Found::Subscriber {
                        id: id.to_string(),
                        status: status.to_string(),
                    },
                    _ => Found::Failed(Outcome::retry(
                        "MailerLite answered a lookup without the subscriber's id and status",
                    )),
                },
                404 => Found::Missing,
                _ => Found::Failed(item_failure(answer)),
            })
            .collect())
    }

    /// Applies `subs(id)` to each member's subscriber (the recorded id, or looked up by
    /// address): a member that does not exist, or whose requests all succeed or find nothing,
    /// is removed.
    fn for_each_subscriber(
        &self,
        http: &mut Http,
        operation: &str,
        members: &[Member],
        per_member: usize,
        subs: impl Fn(&str) -> Vec<Sub>,
    ) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(members.len());
        for batch in chunks(members, BATCH / per_member) {
            let unknown: Vec<Member> = batch
                .iter()
                .filter(|m| m.remote_id.is_none())
                .cloned()
                .collect();
            let mut found = if unknown.is_empty() {
                Vec::new()
            } else {
                self.lookup(http, &unknown)?
            }
            .into_iter();
            let mut slots: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
            let mut requests = Vec::new();
            let mut owners = Vec::new();
            for (i, member) in batch.iter().enumerate() {
                let id = match &member.remote_id {
                    Some(id) => id.clone(),
                    None => match found.next() {
                        Some(Found::Subscriber { id, .. }) => id,
                        Some(Found::Failed(outcome)) => {
                            slots.push(Some(outcome));
                            continue;
                        }
                        Some(Found::Missing) | None => {
                            slots.push(Some(Outcome::Removed));
                            continue;
                        }
                    },
                };
                for sub in subs(&id) {
                    requests.push(sub);
                    owners.push(i);
                }
                slots.push(None);
            }
            if !requests.is_empty() {
                let answers = self.batch(http, operation, &requests)?;
                for (i, answer) in owners.into_iter().zip(&answers) {
                    if slots[i].is_none() && !(answer.ok() || answer.code == 404) {
                        slots[i] = Some(item_failure(answer));
                    }
                }
            }
            outcomes.extend(slots.into_iter().map(|s| s.unwrap_or(Outcome::Removed)));
        }
        Ok(outcomes)
    }

    /// Field keys of the account → their types (`text`, `number`, `date`).
    fn field_types(&self, http: &mut Http) -> Result<Map<String, Value>> {
        let mut types = Map::new();
        for page in 1.. {
            let answer = self.get(
                http,
                "list fields",
                &format!("api/fields?limit=100&page={page}"),
            )?;
            for field in answer["data"].as_array().into_iter().flatten() {
                if let Some(key) = field["key"].as_str() {
                    types.insert(key.to_string(), field["type"].clone());
                }
            }
            if last_page(&answer, page) {
                break;
            }
        }
        Ok(types)
    }

    fn no_api(&self) -> ProviderError {
        ProviderError::Binding(format!(
            "no MailerLite API at {}/api (settings.base_url?)",
            self.root
        ))
    }
}

impl kit::ListDirectory for MailerLite {
    const KIND: &'static str = "group";
    const PROVIDER: &'static str = "MailerLite";

    fn list_by_id(&mut self, http: &mut Http, id: &str) -> Result<Option<String>> {
        let path = format!("api/groups/{}/subscribers?limit=1", percent_encode(id));
        Ok(self
            .call(http, "check group", Method::Get, &path, None)?
            .map(|_| id.to_string()))
    }

    /// `filter[name]` matches partially: the exact name is picked from its answer.
    fn list_by_name(&mut self, http: &mut Http, name: &str) -> Result<Option<String>> {
        for page in 1.. {
            let path = format!(
                "api/groups?{}={}&limit=100&page={page}",
                percent_encode("filter[name]"),
                percent_encode(name)
            );
            let answer = self.get(http, "find group", &path)?;
            let exact = answer["data"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|g| g["name"].as_str() == Some(name));
            if let Some(group) = exact {
                return Ok(group_id(group));
            }
            if last_page(&answer, page) {
                break;
            }
        }
        Ok(None)
    }

    fn create_list(&mut self, http: &mut Http, name: &str) -> Result<String> {
        let created = self
            .call(
                http,
                "create group",
                Method::Post,
                "api/groups",
                Some(&json!({"name": name})),
            )
            .map_err(|e| match e {
                ProviderError::Rejected(message) => ProviderError::Binding(format!(
                    "MailerLite refused to create group \"{name}\": {message}"
                )),
                other => other,
            })?
            .ok_or_else(|| self.no_api())?;
        group_id(&created["data"]).ok_or_else(|| {
            transient(format!(
                "MailerLite created group \"{name}\" without telling its id"
            ))
        })
    }
}

fn subscriber_path(id_or_email: &str) -> String {
    format!("api/subscribers/{}", percent_encode(id_or_email))
}

fn group_id(group: &Value) -> Option<String> {
    match &group["id"] {
        Value::String(id) => Some(id.clone()),
        Value::Number(id) => Some(id.to_string()),
        _ => None,
    }
}

/// Whether a Laravel paginator answer is the last page.
fn last_page(answer: &Value, page: u64) -> bool {
    let empty = answer["data"].as_array().is_none_or(Vec::is_empty);
    empty
        || answer["meta"]["last_page"]
            .as_u64()
            .is_none_or(|last| page >= last)
}

fn list_group(binding: &Binding) -> Result<&str> {
    kit::list_id(binding, "MailerLite group")
}

/// MailerLite's error words: `message`, plus the per-field `errors` of a 422.
fn describe(body: &Value) -> String {
    let mut text = match &body["message"] {
        Value::String(message) => message.clone(),
        Value::Null => body.to_string(),
        other => other.to_string(),
    };
    for (field, messages) in body["errors"].as_object().into_iter().flatten() {
        let messages: Vec<&str> = kit::strings(messages).collect();
        text.push_str(&format!(" [{field}: {}]", messages.join(" ")));
    }
    text
}

fn response_message(response: &Response) -> String {
    match serde_json::from_slice::<Value>(&response.body) {
        Ok(body) if body.is_object() => describe(&body),
        _ => response.text_excerpt(),
    }
}

/// A failed sub-request as one member's outcome: throttling and server errors are retried,
/// the rest (422 validation, ...) is MailerLite's final word.
fn item_failure(answer: &SubAnswer) -> Outcome {
    let message = format!("HTTP {}: {}", answer.code, describe(&answer.body));
    match answer.code {
        0 | 408 | 425 | 429 | 500..=599 => Outcome::retry(message),
        _ => Outcome::failed(message),
    }
}

fn consent(status: &str) -> Option<ConsentStatus> {
    match status {
        "unsubscribed" => Some(ConsentStatus::Unsubscribed),
        "bounced" => Some(ConsentStatus::Bounced),
        "junk" => Some(ConsentStatus::Complained),
        _ => None,
    }
}

fn refused(status: &str) -> Option<Outcome> {
    consent(status).map(|consent| Outcome::Refused {
        status: consent,
        message: format!("the subscriber is {status} at MailerLite"),
    })
}

/// The outcome an upserted subscriber (`data` of the answer) stands for.
fn upserted(subscriber: &Value) -> Outcome {
    let status = subscriber["status"].as_str().unwrap_or("active");
    refused(status).unwrap_or_else(|| Outcome::Member {
        status: if status == "unconfirmed" {
            MemberStatus::Pending
        } else {
            MemberStatus::Subscribed
        },
        remote_id: group_id(subscriber),
    })
}

/// Values as MailerLite's field types want them: numbers for `number`, `YYYY-MM-DD` for
/// `date`, text otherwise; `null` clears a field.
fn field_value(value: &Value, kind: Option<&str>) -> Value {
    match (kind, value) {
        (_, Value::Null) => Value::Null,
        (Some("number"), Value::Number(_)) => value.clone(),
        (Some("number"), Value::Bool(b)) => json!(u8::from(*b)),
        (Some("number"), Value::String(text)) => text
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| value.clone()),
        (Some("date"), Value::String(text)) if text.len() >= 10 && text.as_bytes()[4] == b'-' => {
            Value::String(text[..10].to_string())
        }
        (_, Value::String(_)) => value.clone(),
        (_, other) => Value::String(other.to_string()),
    }
}

impl Provider for MailerLite {
    fn limits(&self) -> Limits {
        // 120 requests per minute per account.
        Limits::batches(BATCH, BATCH).paced(2.0, 10.0)
    }

    fn check(&mut self, http: &mut Http) -> Result<Value> {
        let count = self.get(http, "count subscribers", "api/subscribers?limit=0")?;
        Ok(json!({"provider": "mailerlite", "subscribers": count["total"]}))
    }

    fn prepare(&mut self, http: &mut Http, binding: &mut Binding) -> Result<()> {
        let types = self.field_types(http)?;
        kit::require_fields(
            "MailerLite",
            &binding.fields,
            types.keys().map(String::as_str),
        )?;
        let group = kit::resolve_list(http, self, binding)?;
        binding.list_id = Some(group);
        binding.keep_remote("field_types", types);
        Ok(())
    }

    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let group = list_group(binding)?;
        let types = binding.remote_object("field_types");
        let status_if_new = match binding.new_member_status {
            MemberStatus::Subscribed => "active",
            MemberStatus::Pending => "unconfirmed",
        };
        let mut outcomes = Vec::with_capacity(members.len());
        for batch in chunks(members, BATCH) {
            let found = self.lookup(http, batch)?;
            let mut slots: Vec<Option<Outcome>> = Vec::with_capacity(batch.len());
            let mut writes = Vec::new();
            let mut owners = Vec::new();
            for (i, (member, found)) in batch.iter().zip(found).enumerate() {
                let status = match found {
                    Found::Failed(outcome) => {
                        slots.push(Some(outcome));
                        continue;
                    }
                    Found::Subscriber { status, .. } => match refused(&status) {
                        Some(refusal) => {
                            slots.push(Some(refusal));
                            continue;
                        }
                        None => None,
                    },
                    Found::Missing => Some(status_if_new),
                };
                let fields = kit::typed_fields(&member.fields, types, field_value);
                let mut body =
                    json!({"email": member.address, "fields": fields, "groups": [group]});
                if let Some(status) = status {
                    body["status"] = json!(status);
                }
                writes.push(Sub::new("POST", "api/subscribers".into()).with_body(body));
                owners.push(i);
                slots.push(None);
            }
            if !writes.is_empty() {
                let answers = self.batch(http, "upsert subscribers", &writes)?;
                for (i, answer) in owners.into_iter().zip(&answers) {
                    slots[i] = Some(if answer.ok() {
                        upserted(&answer.body["data"])
                    } else {
                        item_failure(answer)
                    });
                }
            }
            outcomes.extend(slots.into_iter().map(|slot| {
                slot.unwrap_or_else(|| {
                    Outcome::retry("MailerLite did not answer for this subscriber")
                })
            }));
        }
        Ok(outcomes)
    }

    fn remove(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        action: LeaveAction,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let group = list_group(binding)?.to_string();
        let unassign =
            move |id: &str| Sub::new("DELETE", format!("{}/groups/{group}", subscriber_path(id)));
        match action {
            LeaveAction::Remove => {
                self.for_each_subscriber(http, "remove from group", members, 1, |id| {
                    vec![unassign(id)]
                })
            }
            LeaveAction::Unsubscribe => {
                self.for_each_subscriber(http, "unsubscribe subscribers", members, 2, |id| {
                    vec![
                        Sub::new("PUT", subscriber_path(id))
                            .with_body(json!({"status": "unsubscribed"})),
                        unassign(id),
                    ]
                })
            }
            LeaveAction::Delete => {
                self.for_each_subscriber(http, "delete subscribers", members, 1, |id| {
                    vec![Sub::new("DELETE", subscriber_path(id))]
                })
            }
            LeaveAction::Archive => Err(ProviderError::Binding(
                "MailerLite has no archive; use on_leave remove, unsubscribe, delete or keep"
                    .into(),
            )),
        }
    }

    fn erase(
        &mut self,
        http: &mut Http,
        _binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        self.for_each_subscriber(http, "forget subscribers", members, 1, |id| {
            vec![Sub::new("POST", format!("{}/forget", subscriber_path(id)))]
        })
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::providers::test_support::refusal_status;

    #[test]
    fn field_keys_are_checked() {
        assert!(field_name("last_name").is_ok());
        assert!(field_name("z_i_p").is_ok());
        assert!(field_name("Last Name").is_err());
        assert!(field_name("FNAME").is_err());
    }

    #[test]
    fn values_follow_field_types() {
        assert_eq!(field_value(&json!("42"), Some("number")), json!(42.0));
        assert_eq!(field_value(&json!(true), Some("number")), json!(1));
        assert_eq!(
            field_value(&json!("2024-05-01 10:00:00+00"), Some("date")),
            json!("2024-05-01")
        );
        assert_eq!(field_value(&json!(5), Some("text")), json!("5"));
        assert_eq!(field_value(&Value::Null, Some("text")), Value::Null);
        assert_eq!(field_value(&json!("many"), Some("number")), json!("many"));
    }

    #[test]
    fn errors_carry_laravel_field_messages() {
        let body = json!({"message": "The given data was invalid.",
                          "errors": {"email": ["The email must be a valid email address."]}});
        assert_eq!(
            describe(&body),
            "The given data was invalid. [email: The email must be a valid email address.]"
        );
    }

    #[test]
    fn sub_request_failures_are_classified() {
        let answer = |code| SubAnswer {
            code,
            body: json!({"message": "x"}),
        };
        assert!(matches!(item_failure(&answer(422)), Outcome::Failed { .. }));
        assert!(matches!(item_failure(&answer(429)), Outcome::Retry { .. }));
        assert!(matches!(item_failure(&answer(503)), Outcome::Retry { .. }));
    }

    #[test]
    fn consent_statuses_are_refused() {
        for (status, consent) in [
            ("unsubscribed", ConsentStatus::Unsubscribed),
            ("bounced", ConsentStatus::Bounced),
            ("junk", ConsentStatus::Complained),
        ] {
            let outcome = upserted(&json!({"id": "1", "status": status}));
            assert_eq!(refusal_status(&outcome), Some(consent), "{status}");
        }
        assert_eq!(
            upserted(&json!({"id": "7", "status": "unconfirmed"})),
            Outcome::Member {
                status: MemberStatus::Pending,
                remote_id: Some("7".into())
            }
        );
    }

    #[test]
    fn paging_stops_at_the_last_page() {
        assert!(last_page(&json!({"data": [], "meta": {"last_page": 3}}), 1));
        assert!(!last_page(
            &json!({"data": [1], "meta": {"last_page": 3}}),
            2
        ));
        assert!(last_page(
            &json!({"data": [1], "meta": {"last_page": 3}}),
            3
        ));
    }
}

#[cfg(test)]
mod fake {
    use super::*;
    use crate::providers::conformance::{Consent, Erasure, Fake, WRONG_SECRET, conformance_suite};
    use crate::providers::test_support;
    use crate::providers::test_support::{
        Bound, connected, is_subscribed, refusal_status, remote_id,
    };
    use listsync_emulator::Emulator;

    const TOKEN: &str = "ml-token";

    fn provider(emulator: &Emulator, token: &str) -> Box<dyn Provider> {
        connect(&test_support::config(
            json!({"base_url": emulator.base_url("mailerlite")}),
            json!({"api_key": token}),
        ))
    }

    fn binding(status: MemberStatus) -> Binding {
        Binding {
            new_member_status: status,
            ..test_support::binding(&["name", "score"])
        }
    }

    fn member(address: &str, name: &str, score: i64) -> Member {
        test_support::member(address, json!({"name": name, "score": score.to_string()}))
    }

    fn gone(address: &str, remote_id: Option<String>) -> Member {
        test_support::known_member(address, json!({}), remote_id.as_deref())
    }

    /// A prepared binding with `ann` and `bob` upserted; returns their outcomes.
    fn prepared() -> (Emulator, Bound, Vec<Outcome>) {
        let (emulator, mut s) = Bound::new::<MailerLiteFake>();
        let outcomes = s.upsert(&[
            member("ann@example.com", "Ann", 10),
            member("bob@example.com", "Bob", 20),
        ]);
        (emulator, s, outcomes)
    }

    #[test]
    fn prepare_creates_the_group_once_and_checks_fields() {
        let (emulator, mut provider, mut http) = connected::<MailerLiteFake>();
        let mut first = binding(MemberStatus::Subscribed);
        provider.prepare(&mut http, &mut first).unwrap();
        let mut again = binding(MemberStatus::Subscribed);
        provider.prepare(&mut http, &mut again).unwrap();
        assert_eq!(first.list_id, again.list_id, "an existing group is reused");
        let groups = emulator.mailerlite().groups();
        assert_eq!(groups.len(), 1);
        assert_eq!(groups[0].name, "vip (crm)");
        assert_eq!(first.remote["field_types"]["score"], "number");

        let mut given = binding(MemberStatus::Subscribed);
        given.list_id = first.list_id.clone();
        provider.prepare(&mut http, &mut given).unwrap();
        given.list_id = Some("404404".into());
        let e = provider.prepare(&mut http, &mut given).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Binding(m) if m.contains("404404")),
            "{e:?}"
        );

        let mut unknown = binding(MemberStatus::Subscribed);
        unknown.fields.push("shoe_size".into());
        let e = provider.prepare(&mut http, &mut unknown).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Binding(m) if m.contains("shoe_size")),
            "{e:?}"
        );
    }

    #[test]
    fn upsert_adds_to_the_group_with_typed_fields_then_updates() {
        let (emulator, mut s, outcomes) = prepared();
        // remote_id panics unless the member joined subscribed with an id.
        for outcome in &outcomes {
            remote_id(outcome);
        }
        let group = s.binding.list_id.clone().unwrap();
        let members = emulator.list_members("mailerlite", &group);
        assert_eq!(members.len(), 2);
        assert_eq!(members["ann@example.com"]["name"], "Ann");
        assert_eq!(members["ann@example.com"]["score"], json!(10.0));

        let outcomes = s.upsert(&[member("ann@example.com", "Anne", 11)]);
        assert!(matches!(outcomes[0], Outcome::Member { .. }));
        let ann = emulator.mailerlite().subscriber("ann@example.com").unwrap();
        assert_eq!(ann.fields["name"], "Anne");
        assert_eq!(ann.fields["score"], json!(11.0));
        assert_eq!(ann.status, "active");
    }

    #[test]
    fn pending_binding_uses_unconfirmed_for_new_subscribers_only() {
        let (emulator, mut s, _) = prepared();
        s.binding.new_member_status = MemberStatus::Pending;
        let outcomes = s.upsert(&[
            member("ann@example.com", "Ann", 10),
            member("cid@example.com", "Cid", 30),
        ]);
        assert!(is_subscribed(&outcomes[0]));
        assert!(matches!(
            outcomes[1],
            Outcome::Member {
                status: MemberStatus::Pending,
                ..
            }
        ));
        let ml = emulator.mailerlite();
        assert_eq!(ml.subscriber("ann@example.com").unwrap().status, "active");
        assert_eq!(
            ml.subscriber("cid@example.com").unwrap().status,
            "unconfirmed"
        );
        assert_eq!(ml.confirmation_emails(), vec!["cid@example.com"]);
    }

    /// Unsubscribed members are the suite's; MailerLite's other consent states are refused too,
    /// and a junk address is not added to a group it was never in.
    #[test]
    fn bounced_and_junk_subscribers_are_refused() {
        let (emulator, mut s, _) = prepared();
        let ml = emulator.mailerlite();
        let outside = ml.create_group("elsewhere");
        assert!(ml.set_status("bob@example.com", "bounced"));
        let outcomes = s.upsert(&[member("bob@example.com", "Bob", 2)]);
        assert_eq!(refusal_status(&outcomes[0]), Some(ConsentStatus::Bounced));

        let mut spam = member("spam@example.com", "S", 0);
        spam.fields.clear();
        let mut other = s.binding.clone();
        other.list_id = Some(outside.clone());
        s.provider
            .upsert(&mut s.http, &other, &[spam.clone()])
            .unwrap();
        assert!(ml.set_status("spam@example.com", "junk"));
        let outcomes = s.upsert(&[spam]);
        assert_eq!(
            refusal_status(&outcomes[0]),
            Some(ConsentStatus::Complained)
        );
        let group = s.binding.list_id.as_deref().unwrap();
        assert!(!ml.group_members(group).contains_key("spam@example.com"));
        assert!(ml.resubscribed().is_empty());
    }

    #[test]
    fn remove_unsubscribe_and_delete() {
        for action in [
            LeaveAction::Remove,
            LeaveAction::Unsubscribe,
            LeaveAction::Delete,
        ] {
            let (emulator, mut s, outcomes) = prepared();
            // Ann with the recorded id, Bob looked up by address, Zed unknown to MailerLite.
            let leaving = [
                gone("ann@example.com", Some(remote_id(&outcomes[0]))),
                gone("bob@example.com", None),
                gone("zed@example.com", None),
            ];
            let outcomes = s.remove(action, &leaving);
            assert_eq!(outcomes, vec![Outcome::Removed; 3], "{action:?}");
            let group = s.binding.list_id.as_deref().unwrap();
            assert!(emulator.list_members("mailerlite", group).is_empty());
            let ml = emulator.mailerlite();
            match action {
                LeaveAction::Remove => {
                    assert_eq!(ml.subscriber("ann@example.com").unwrap().status, "active")
                }
                LeaveAction::Unsubscribe => {
                    assert_eq!(
                        ml.subscriber("bob@example.com").unwrap().status,
                        "unsubscribed"
                    );
                    assert!(ml.group_members(group).is_empty());
                }
                _ => assert_eq!(ml.deleted(), vec!["ann@example.com", "bob@example.com"]),
            }
        }
    }

    #[test]
    fn archive_is_refused() {
        let (_emulator, mut s, _) = prepared();
        assert!(!SPEC.capabilities.on_leave.contains(&"archive"));
        test_support::assert_unoffered_leaves_are_refused(
            &SPEC,
            &mut s.provider,
            &mut s.http,
            &s.binding,
        );
    }

    #[test]
    fn large_batches_are_split_to_fifty_requests() {
        let (emulator, mut s, _) = prepared();
        let many: Vec<Member> = (0..120)
            .map(|i| member(&format!("u{i}@example.com"), "U", i))
            .collect();
        let outcomes = s.upsert(&many);
        assert!(outcomes.iter().all(|o| matches!(o, Outcome::Member { .. })));
        let group = s.binding.list_id.clone().unwrap();
        assert_eq!(emulator.list_members("mailerlite", &group).len(), 122);
        let leaving: Vec<Member> = many.iter().map(|m| gone(&m.address, None)).collect();
        let outcomes = s.remove(LeaveAction::Unsubscribe, &leaving);
        assert_eq!(outcomes, vec![Outcome::Removed; 120]);
        assert_eq!(emulator.list_members("mailerlite", &group).len(), 2);
    }

    #[test]
    fn check_counts_the_subscribers() {
        let (_emulator, mut provider, mut http) = connected::<MailerLiteFake>();
        assert_eq!(provider.check(&mut http).unwrap()["subscribers"], 0);
    }

    /// MailerLite's import limit, apart from the request rate, defers the batch with a delay.
    #[test]
    fn the_import_limit_is_transient() {
        let (emulator, mut s, _) = prepared();
        emulator.mailerlite().set_import_limit(Some(1));
        let fresh = |i: usize| [member(&format!("new{i}@example.com"), "N", 1)];
        s.upsert(&fresh(1));
        match s.provider.upsert(&mut s.http, &s.binding, &fresh(2)) {
            Err(ProviderError::Transient {
                message,
                retry_after: Some(_),
            }) => assert!(message.contains("import"), "{message}"),
            other => panic!("{other:?}"),
        }
    }

    struct MailerLiteFake;

    impl Fake for MailerLiteFake {
        const SPEC: &'static Spec = &SPEC;

        fn connect(emulator: &Emulator) -> Box<dyn Provider> {
            emulator.mailerlite().set_api_key(TOKEN);
            emulator.mailerlite().add_field("score", "number");
            provider(emulator, TOKEN)
        }

        fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider> {
            provider(emulator, WRONG_SECRET)
        }

        fn binding() -> Binding {
            binding(MemberStatus::Subscribed)
        }

        fn member(address: &str) -> Member {
            member(address, "Ann", 10)
        }

        fn refuse(emulator: &Emulator, address: &str) -> &'static str {
            emulator
                .mailerlite()
                .reject_address(address, "This address is blocked.");
            "This address is blocked."
        }

        fn knows(emulator: &Emulator, address: &str) -> bool {
            emulator.mailerlite().subscriber(address).is_some()
        }
    }

    impl Consent for MailerLiteFake {
        fn unsubscribe(emulator: &Emulator, _: &Binding, address: &str) {
            assert!(emulator.mailerlite().set_status(address, "unsubscribed"));
        }
    }

    impl Erasure for MailerLiteFake {
        /// Forgotten (MailerLite's GDPR erasure), not merely deleted.
        fn erased(emulator: &Emulator, address: &str) -> bool {
            emulator
                .mailerlite()
                .forgotten()
                .iter()
                .any(|a| a == address)
        }
    }

    conformance_suite!(MailerLiteFake {
        consent: supported,
        erasure: supported
    });
}
