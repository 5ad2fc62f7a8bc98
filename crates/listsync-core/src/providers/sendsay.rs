//! Sendsay (JSON action API).
//!
//! Every call is a POST of `{"action": ...}` to one endpoint,
//! `/general/api/v100/json/<account>`, authenticated with `Authorization: sendsay apikey=<key>`.
//! Sendsay answers HTTP 200 whatever happened: failures are `{"errors": [{"id", "explain"}]}`
//! in the body, and an account served by another cluster answers `{"REDIRECT": "<path>"}`,
//! which the adapter follows (at most 10 times) and keeps for later calls.
//!
//! A binding's list is a group of type `list` (found by name or created with `group.create`).
//! Members are written with `member.set` inside one `batch` per chunk of members; membership is
//! the `-group.<id>` key of `datakey` and mapped fields are `anketa.question` keys
//! (`base.firstName`, `custom.city`). Before adding anyone the adapter reads, in one more
//! batch, the stop list and each member's `member.lockremove`, and refuses stop-listed and
//! unsubscribed addresses instead of adding them: Sendsay itself would accept the addition.

use super::{
    Binding, Capabilities, Config, ConsentStatus, LeaveAction, Limits, Member, MemberStatus, Need,
    Outcome, Provider, Spec, kit,
};
use crate::http::{Http, Method, ProviderError, Request, Result, transient};
use serde_json::{Value, json};
use std::collections::HashSet;

pub static SPEC: Spec = Spec {
    name: "sendsay",
    settings: &[("account", Need::Required)],
    secrets: &[("api_key", Need::Required)],
    capabilities: Capabilities {
        on_leave: &["remove", "unsubscribe", "delete", "keep"],
        double_opt_in: true,
        tags: false,
        phone_identity: false,
    },
    validate,
    field_name,
    connect,
};

/// Members per `batch` call. Sendsay documents no count limit for `batch` (only 400 MB per
/// request); 500 keeps one call well inside the HTTP timeout.
const BATCH: usize = 500;
/// Redirects followed for one call; Sendsay's own clients stop at 10.
const MAX_REDIRECTS: usize = 10;

fn validate(config: &Config) -> std::result::Result<(), String> {
    let account = config.setting("account").unwrap_or_default();
    if account
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        Ok(())
    } else {
        Err("settings.account must be the Sendsay account code (your main login), letters, digits, _, - and .".into())
    }
}

/// `anketa.question` (`base.firstName`, `custom.q12`); the system questionnaire `member` and
/// the `-group` keys belong to the sync.
fn field_name(name: &str) -> std::result::Result<(), String> {
    let word = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    match name.split_once('.') {
        Some((anketa, quest))
            if word(anketa) && word(quest) && !anketa.starts_with('-') && anketa != "member" =>
        {
            Ok(())
        }
        _ => Err("Sendsay fields are questionnaire keys anketa.question, like base.firstName or custom.city (not member.* or -group.*)".into()),
    }
}

fn connect(config: &Config) -> Box<dyn Provider> {
    Box::new(Sendsay {
        root: config.base_url("https://api.sendsay.ru"),
        account: config.setting("account").unwrap_or_default().to_string(),
        api_key: config.secret("api_key").unwrap_or_default().to_string(),
        redirect: None,
    })
}

struct Sendsay {
    root: String,
    account: String,
    api_key: String,
    /// The path a `REDIRECT` sent us to, kept for later calls as Sendsay's clients do.
    redirect: Option<String>,
}

/// One failed action, as Sendsay words it.
#[derive(Debug, Clone, PartialEq)]
struct ApiError {
    ids: Vec<String>,
    text: String,
}

impl ApiError {
    fn from_errors(errors: &Value) -> Option<ApiError> {
        let items = match errors {
            Value::Array(items) if !items.is_empty() => items.clone(),
            Value::Object(_) => vec![errors.clone()],
            _ => return None,
        };
        let ids = items
            .iter()
            .map(|e| e["id"].as_str().unwrap_or("error").to_string())
            .collect();
        let text = items
            .iter()
            .map(|e| {
                let id = e["id"].as_str().unwrap_or("error");
                match &e["explain"] {
                    Value::Null => id.to_string(),
                    Value::String(s) => format!("{id}: {s}"),
                    other => format!("{id}: {other}"),
                }
            })
            .collect::<Vec<_>>()
            .join("; ");
        Some(ApiError { ids, text })
    }

    /// The errors of an answer (`errors`, or the older single `error`).
    fn of(answer: &Value) -> Option<ApiError> {
        ApiError::from_errors(&answer["errors"]).or_else(|| ApiError::from_errors(&answer["error"]))
    }

    fn any(&self, test: impl Fn(&str) -> bool) -> bool {
        self.ids.iter().any(|id| test(id))
    }

    fn is_auth(&self) -> bool {
        self.any(|id| {
            id.starts_with("error/auth")
                || id.contains("too_many_auth")
                || id.contains("access_denied")
        })
    }

    /// Sendsay's reference does not list which errors are temporary; these words are how
    /// overload and internal failures are named.
    fn is_transient(&self) -> bool {
        self.any(|id| {
            [
                "internal",
                "temporar",
                "timeout",
                "too_many_requests",
                "try_later",
                "unavailable",
                "overload",
            ]
            .iter()
            .any(|word| id.contains(word))
        })
    }

    fn is_missing(&self) -> bool {
        self.any(|id| id.contains("not_found") || id.contains("not_exist"))
    }

    fn into_error(self) -> ProviderError {
        if self.is_auth() {
            ProviderError::Auth(self.text)
        } else if self.is_transient() {
            transient(self.text)
        } else {
            ProviderError::Rejected(self.text)
        }
    }

    /// A per-member failure: retried when temporary, a dead letter otherwise.
    fn outcome(&self) -> Outcome {
        if self.is_transient() {
            Outcome::retry(self.text.clone())
        } else {
            Outcome::failed(self.text.clone())
        }
    }
}

/// A datakey value: Sendsay stores text and numbers as given; an absent value clears the
/// answer.
fn datakey_value(value: &Value) -> Value {
    match value {
        Value::Null => json!(""),
        Value::String(_) | Value::Number(_) => value.clone(),
        Value::Bool(b) => json!(if *b { 1 } else { 0 }),
        other => json!(other.to_string()),
    }
}

/// The member object of an answer: `obj`, nested once more inside `batch` results.
fn member_object(answer: &Value) -> &Value {
    let obj = &answer["obj"];
    if obj["obj"].is_object() {
        &obj["obj"]
    } else {
        obj
    }
}

fn present(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::Bool(b) => *b,
        _ => true,
    }
}

impl Sendsay {
    /// One action; follows `REDIRECT`s, and turns errors in the body into errors.
    fn call(&mut self, http: &mut Http, operation: &str, body: &Value) -> Result<Value> {
        let mut path = self
            .redirect
            .clone()
            .unwrap_or_else(|| format!("/general/api/v100/json/{}", self.account));
        for _ in 0..=MAX_REDIRECTS {
            let request = Request::new(Method::Post, format!("{}{path}", self.root))
                .header("authorization", format!("sendsay apikey={}", self.api_key))
                .json(body);
            let response = http.send(operation, request)?;
            let described = |r: &crate::http::Response| {
                serde_json::from_slice::<Value>(&r.body)
                    .ok()
                    .and_then(|v| ApiError::of(&v))
                    .map_or_else(|| r.text_excerpt(), |e| e.text)
            };
            response.check(described)?;
            let answer = response.json()?;
            if let Some(target) = answer["REDIRECT"].as_str() {
                // Only a path on the same host: the API key must not follow a redirect
                // elsewhere.
                if !target.starts_with('/') || target.starts_with("//") {
                    return Err(ProviderError::Rejected(format!(
                        "Sendsay redirected to \"{target}\", which is not a path on {}",
                        self.root
                    )));
                }
                path = target.to_string();
                self.redirect = Some(path.clone());
                continue;
            }
            if let Some(error) = ApiError::of(&answer) {
                return Err(error.into_error());
            }
            return Ok(answer);
        }
        Err(transient(format!(
            "Sendsay redirected more than {MAX_REDIRECTS} times"
        )))
    }

    /// Runs `actions` in one `batch` (all of them, whatever fails): one result per action.
    fn batch(
        &mut self,
        http: &mut Http,
        operation: &str,
        actions: Vec<Value>,
    ) -> Result<Vec<std::result::Result<Value, ApiError>>> {
        // Nothing to do needs no call (when every member was refused or is absent, say).
        if actions.is_empty() {
            return Ok(Vec::new());
        }
        let count = actions.len();
        let answer = self.call(
            http,
            operation,
            &json!({"action": "batch", "stop_on_error": 0, "do": actions}),
        )?;
        let results = answer["result"].as_array().cloned().unwrap_or_default();
        if results.len() != count {
            return Err(transient(format!(
                "Sendsay answered {} results for a batch of {count} actions",
                results.len()
            )));
        }
        Ok(results
            .into_iter()
            .map(|r| match ApiError::of(&r) {
                Some(error) => Err(error),
                None => Ok(r),
            })
            .collect())
    }

    fn group(binding: &Binding) -> Result<&str> {
        kit::list_id(binding, "Sendsay group")
    }

    fn groups(&mut self, http: &mut Http) -> Result<Vec<Value>> {
        let answer = self.call(
            http,
            "list groups",
            &json!({"action": "group.get", "id": ["*"]}),
        )?;
        Ok(answer["list"].as_array().cloned().unwrap_or_default())
    }

    /// Sets `-group.<group>` to 0 for each member that exists. Members Sendsay cannot show are
    /// not written: `member.set` would create them.
    fn leave_group(
        &mut self,
        http: &mut Http,
        group: &str,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let reads = members
            .iter()
            .map(|m| json!({"action": "member.get", "email": m.address, "addr_type": "email"}))
            .collect();
        let existing: Vec<bool> = self
            .batch(http, "read members", reads)?
            .iter()
            .map(|read| read.is_ok())
            .collect();
        let writes: Vec<Value> = members
            .iter()
            .zip(&existing)
            .filter(|(_, exists)| **exists)
            .map(|(m, _)| {
                json!({
                    "action": "member.set",
                    "email": m.address,
                    "addr_type": "email",
                    "if_exists": "overwrite",
                    "datakey": [[format!("-group.{group}"), "set", 0]],
                })
            })
            .collect();
        let mut written = self.batch(http, "remove from group", writes)?.into_iter();
        Ok(existing
            .into_iter()
            .map(|exists| match exists.then(|| written.next()).flatten() {
                None | Some(Ok(_)) => Outcome::Removed,
                Some(Err(error)) if error.is_missing() => Outcome::Removed,
                Some(Err(error)) => error.outcome(),
            })
            .collect())
    }

    fn delete(
        &mut self,
        http: &mut Http,
        operation: &str,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let addresses: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
        self.call(
            http,
            operation,
            &json!({"action": "member.delete", "addr_type": "email", "list": addresses}),
        )?;
        Ok(vec![Outcome::Removed; members.len()])
    }
}

/// A group's or member's `id`, which Sendsay writes as a string or a number.
fn id_of(object: &Value) -> Option<String> {
    match &object["id"] {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl kit::ListDirectory for Sendsay {
    const KIND: &'static str = "group";
    const PROVIDER: &'static str = "Sendsay";

    fn list_by_id(&mut self, http: &mut Http, id: &str) -> Result<Option<String>> {
        let groups = self.groups(http)?;
        let Some(group) = groups.iter().find(|g| id_of(g).as_deref() == Some(id)) else {
            return Ok(None);
        };
        if group["type"].as_str().is_some_and(|t| t != "list") {
            return Err(ProviderError::Binding(format!(
                "Sendsay group {id} is a {} group, whose members Sendsay computes; bind to a list group",
                group["type"].as_str().unwrap_or("filter")
            )));
        }
        Ok(Some(id.to_string()))
    }

    fn list_by_name(&mut self, http: &mut Http, name: &str) -> Result<Option<String>> {
        Ok(self
            .groups(http)?
            .iter()
            .find(|g| {
                g["name"].as_str() == Some(name) && g["type"].as_str().is_none_or(|t| t == "list")
            })
            .and_then(id_of))
    }

    fn create_list(&mut self, http: &mut Http, name: &str) -> Result<String> {
        let created = self.call(
            http,
            "create group",
            &json!({"action": "group.create", "name": name, "type": "list", "addr_type": "email"}),
        )?;
        id_of(&created).ok_or_else(|| {
            ProviderError::Rejected(format!("Sendsay returned no id for group \"{name}\""))
        })
    }
}

impl Provider for Sendsay {
    fn limits(&self) -> Limits {
        // Sendsay's reference publishes no rate; integrators report 80 requests/s per account.
        // Batching makes a handful of calls per thousand members, so a quarter of that is
        // plenty and leaves room for the account's other integrations.
        Limits::batches(BATCH, BATCH).paced(20.0, 20.0)
    }

    fn check(&mut self, http: &mut Http) -> Result<Value> {
        let answer = self.call(
            http,
            "account settings",
            &json!({"action": "sys.settings.get", "list": ["about.id", "member.hard.limit", "member.hard.rest"]}),
        )?;
        let settings = &answer["list"];
        Ok(json!({
            "provider": "sendsay",
            "account": settings["about.id"],
            "member_limit": settings["member.hard.limit"],
            "members_left": settings["member.hard.rest"],
        }))
    }

    fn prepare(&mut self, http: &mut Http, binding: &mut Binding) -> Result<()> {
        let group = kit::resolve_list(http, self, binding)?;
        binding.list_id = Some(group);
        Ok(())
    }

    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let group = Self::group(binding)?.to_string();
        let confirm = i32::from(binding.new_member_status == MemberStatus::Pending);
        let mut outcomes = Vec::with_capacity(members.len());
        let addresses: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
        let mut reads = vec![json!({"action": "stoplist.get", "list": addresses})];
        reads.extend(
            addresses
                .iter()
                .map(|a| json!({"action": "member.get", "email": a, "addr_type": "email"})),
        );
        let mut read = self.batch(http, "read consent", reads)?.into_iter();
        let stopped: HashSet<String> = match read.next() {
            Some(Ok(answer)) => kit::strings(&answer["list"])
                .map(str::to_lowercase)
                .collect(),
            Some(Err(error)) => return Err(error.into_error()),
            None => HashSet::new(),
        };
        let mut refused: Vec<Option<Outcome>> = Vec::with_capacity(members.len());
        for (member, existing) in members.iter().zip(read) {
            // A member Sendsay cannot show is new (or invalid, which member.set will say).
            let unsubscribed = existing
                .as_ref()
                .is_ok_and(|a| present(&member_object(a)["member"]["lockremove"]));
            refused.push(if stopped.contains(&member.address.to_lowercase()) {
                Some(Outcome::Refused {
                    status: ConsentStatus::Cleaned,
                    message:
                        "the address is in Sendsay's stop list (bounced, complained or blocked)"
                            .into(),
                })
            } else if unsubscribed {
                Some(Outcome::Refused {
                    status: ConsentStatus::Unsubscribed,
                    message: "the member unsubscribed at Sendsay (member.lockremove)".into(),
                })
            } else {
                None
            });
        }
        let writes: Vec<Value> = members
            .iter()
            .zip(&refused)
            .filter(|(_, r)| r.is_none())
            .map(|(m, _)| {
                let mut datakey = vec![json!([format!("-group.{group}"), "set", 1])];
                datakey.extend(
                    m.fields
                        .iter()
                        .map(|(key, value)| json!([key, "set", datakey_value(value)])),
                );
                json!({
                    "action": "member.set",
                    "email": m.address,
                    "addr_type": "email",
                    "if_exists": "overwrite",
                    "newbie.confirm": confirm,
                    "return_fresh_obj": 1,
                    "datakey": datakey,
                })
            })
            .collect();
        let mut written = self.batch(http, "upsert members", writes)?.into_iter();
        for outcome in refused {
            outcomes.push(match outcome {
                Some(refusal) => refusal,
                None => match written.next() {
                    Some(Ok(answer)) => {
                        let member = &member_object(&answer)["member"];
                        let status = if present(&member["lockconfirm"]) {
                            MemberStatus::Pending
                        } else {
                            MemberStatus::Subscribed
                        };
                        Outcome::member(status, id_of(member))
                    }
                    Some(Err(error)) => error.outcome(),
                    None => Outcome::retry("Sendsay did not report this member"),
                },
            });
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
        let group = Self::group(binding)?.to_string();
        match action {
            LeaveAction::Archive => Err(ProviderError::Binding(
                "Sendsay has no archived members: use on_leave remove, unsubscribe, delete or keep"
                    .into(),
            )),
            LeaveAction::Remove => self.leave_group(http, &group, members),
            LeaveAction::Unsubscribe => {
                let addresses: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
                self.call(
                    http,
                    "stop-list members",
                    &json!({"action": "stoplist.add", "list": addresses}),
                )?;
                self.leave_group(http, &group, members)
            }
            LeaveAction::Delete => self.delete(http, "delete members", members),
        }
    }

    /// Sendsay's reference has no separate erasure call: `member.delete` removes the member
    /// with all its questionnaire data. The stop list is kept, so an erased address that had
    /// been blocked stays blocked.
    fn erase(
        &mut self,
        http: &mut Http,
        _binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        self.delete(http, "erase members", members)
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn field_names_are_questionnaire_keys() {
        assert!(field_name("base.firstName").is_ok());
        assert!(field_name("custom.q12").is_ok());
        assert!(field_name("firstName").is_err());
        assert!(field_name("member.lockremove").is_err());
        assert!(field_name("-group.pl1").is_err());
        assert!(field_name("base.").is_err());
    }

    #[test]
    fn the_account_is_a_path_segment() {
        let config = |account: &str| {
            crate::providers::test_support::config(json!({"account": account}), json!({}))
        };
        assert!(validate(&config("acme_shop")).is_ok());
        assert!(validate(&config("acme/../x")).is_err());
    }

    #[test]
    fn errors_are_classified_by_id() {
        let error = |id: &str| {
            ApiError::of(&json!({"errors": [{"id": id, "explain": "why"}]})).expect("an error")
        };
        assert!(matches!(
            error("error/auth/failed").into_error(),
            ProviderError::Auth(m) if m == "error/auth/failed: why"
        ));
        assert!(matches!(
            error("error/internal").into_error(),
            ProviderError::Transient { .. }
        ));
        assert!(matches!(
            error("error/member/email_invalid").into_error(),
            ProviderError::Rejected(_)
        ));
        assert!(matches!(
            error("error/internal").outcome(),
            Outcome::Retry { .. }
        ));
        assert!(error("error/member/not_found").is_missing());
        assert!(ApiError::of(&json!({"error": {"id": "x/y"}})).is_some());
        assert!(ApiError::of(&json!({"list": []})).is_none());
    }

    #[test]
    fn values_and_answers_are_read_leniently() {
        assert_eq!(datakey_value(&Value::Null), json!(""));
        assert_eq!(datakey_value(&json!(true)), json!(1));
        assert_eq!(datakey_value(&json!(42)), json!(42));
        let nested = json!({"obj": {"obj": {"member": {"id": 5}}}});
        assert_eq!(member_object(&nested)["member"]["id"], 5);
        let flat = json!({"obj": {"member": {"id": 6}}});
        assert_eq!(member_object(&flat)["member"]["id"], 6);
        assert!(present(&json!("2024-01-01 10:00:00")));
        assert!(!present(&json!("")));
        assert!(!present(&Value::Null));
    }
}

#[cfg(test)]
mod fake {
    use super::*;
    use crate::providers::conformance::{Consent, Erasure, Fake, WRONG_SECRET, conformance_suite};
    use crate::providers::test_support;
    use crate::providers::test_support::{Bound, http, member, refusal_status};
    use listsync_emulator::Emulator;

    const KEY: &str = "ss-test-key";

    fn provider(emulator: &Emulator) -> Box<dyn Provider> {
        provider_with_key(emulator, KEY)
    }

    fn provider_with_key(emulator: &Emulator, key: &str) -> Box<dyn Provider> {
        connect(&test_support::config(
            json!({"base_url": emulator.base_url("sendsay"), "account": "acme"}),
            json!({"api_key": key}),
        ))
    }

    fn binding() -> Binding {
        Binding {
            id: 3,
            ..test_support::binding(&["base.firstName", "custom.city"])
        }
    }

    fn is_member(outcome: &Outcome) -> bool {
        matches!(
            outcome,
            Outcome::Member {
                status: MemberStatus::Subscribed,
                remote_id: Some(_)
            }
        )
    }

    #[test]
    fn prepare_creates_the_group_once_and_checks_given_ones() {
        let (emulator, mut s) = Bound::new::<SendsayFake>();
        let group = s.binding.list_id.clone().unwrap();
        let groups = emulator.sendsay().groups();
        assert_eq!(groups.len(), 1);
        assert_eq!(
            (groups[0].id.as_str(), groups[0].name.as_str()),
            (group.as_str(), "vip (crm)")
        );

        let mut again = binding();
        s.provider.prepare(&mut s.http, &mut again).unwrap();
        assert_eq!(again.list_id, Some(group.clone()));
        assert_eq!(emulator.sendsay().groups().len(), 1);

        again.list_id = Some("nosuch".into());
        assert!(matches!(
            s.provider.prepare(&mut s.http, &mut again),
            Err(ProviderError::Binding(m)) if m.contains("does not exist")
        ));
        again.list_id = Some(emulator.sendsay().create_filter_group("computed"));
        assert!(matches!(
            s.provider.prepare(&mut s.http, &mut again),
            Err(ProviderError::Binding(m)) if m.contains("filter")
        ));
    }

    #[test]
    fn upsert_adds_members_updates_fields_and_honours_double_opt_in() {
        let (emulator, mut s) = Bound::new::<SendsayFake>();
        let group = s.binding.list_id.clone().unwrap();
        let outcomes = s.upsert(&[
            member(
                "ann@example.com",
                json!({"base.firstName": "Ann", "custom.city": "Moscow"}),
            ),
            member(
                "bob@example.com",
                json!({"base.firstName": "Bob", "custom.city": null}),
            ),
        ]);
        assert!(outcomes.iter().all(is_member), "{outcomes:?}");
        let members = emulator.list_members("sendsay", &group);
        assert_eq!(members["ann@example.com"]["base.firstName"], "Ann");
        assert_eq!(members["ann@example.com"]["custom.city"], "Moscow");
        assert_eq!(members["bob@example.com"]["custom.city"], "");

        s.upsert(&[member(
            "ann@example.com",
            json!({"base.firstName": "Anne", "custom.city": "Moscow"}),
        )]);
        assert_eq!(
            emulator.list_members("sendsay", &group)["ann@example.com"]["base.firstName"],
            "Anne"
        );

        s.binding.new_member_status = MemberStatus::Pending;
        let outcomes = s.upsert(&[
            member("cid@example.com", json!({})),
            member("ann@example.com", json!({})),
        ]);
        assert!(matches!(
            outcomes[0],
            Outcome::Member {
                status: MemberStatus::Pending,
                ..
            }
        ));
        assert!(
            is_member(&outcomes[1]),
            "an existing member keeps its consent: {outcomes:?}"
        );
        assert!(
            emulator
                .sendsay()
                .member("cid@example.com")
                .unwrap()
                .lockconfirm
        );
    }

    #[test]
    fn each_on_leave_does_what_it_says() {
        let (emulator, mut s) = Bound::new::<SendsayFake>();
        let group = s.binding.list_id.clone().unwrap();
        let everyone: Vec<Member> = ["ann", "bob", "cid"]
            .iter()
            .map(|n| member(&format!("{n}@example.com"), json!({"base.firstName": n})))
            .collect();
        assert!(s.upsert(&everyone).iter().all(is_member));
        let ss = emulator.sendsay();

        let outcomes = s.remove(
            LeaveAction::Remove,
            &[
                member("ann@example.com", json!({})),
                member("nobody@example.com", json!({})),
            ],
        );
        assert_eq!(outcomes, vec![Outcome::Removed, Outcome::Removed]);
        assert!(
            ss.member("ann@example.com")
                .is_some_and(|m| m.groups.is_empty())
        );
        assert!(ss.member("nobody@example.com").is_none());

        assert_eq!(
            s.remove(
                LeaveAction::Unsubscribe,
                &[member("bob@example.com", json!({}))]
            ),
            vec![Outcome::Removed]
        );
        assert!(ss.stoplist().contains("bob@example.com"));
        assert!(!ss.group_members(&group).contains_key("bob@example.com"));
        let again = s.upsert(&[member("bob@example.com", json!({}))]);
        assert_eq!(refusal_status(&again[0]), Some(ConsentStatus::Cleaned));

        assert_eq!(
            s.remove(LeaveAction::Delete, &[member("cid@example.com", json!({}))]),
            vec![Outcome::Removed]
        );
        assert!(ss.member("cid@example.com").is_none());

        assert!(!SPEC.capabilities.on_leave.contains(&"archive"));
        test_support::assert_unoffered_leaves_are_refused(
            &SPEC,
            &mut s.provider,
            &mut s.http,
            &s.binding,
        );
        assert!(ss.locked_additions().is_empty());
    }

    /// The suite's consent scenario refuses an unsubscribed address; here a stop-listed one.
    #[test]
    fn stop_listed_addresses_are_refused_and_never_added() {
        let (emulator, mut s) = Bound::new::<SendsayFake>();
        let group = s.binding.list_id.clone().unwrap();
        let ss = emulator.sendsay();
        ss.set_status("b@example.com", "bounced");
        let outcomes = s.upsert(&[
            member("b@example.com", json!({})),
            member("ok@example.com", json!({})),
        ]);
        assert_eq!(refusal_status(&outcomes[0]), Some(ConsentStatus::Cleaned));
        assert!(is_member(&outcomes[1]));
        assert!(ss.locked_additions().is_empty());
        assert_eq!(emulator.list_members("sendsay", &group).len(), 1);
    }

    /// A refused address is the suite's; here Sendsay's passing error, an address it does not
    /// take and a field it does not have, each only for its member.
    #[test]
    fn per_item_errors_fail_or_retry_only_their_member() {
        let (emulator, mut s) = Bound::new::<SendsayFake>();
        let ss = emulator.sendsay();
        ss.reject_address("busy@example.com", "error/internal", "try again");
        let outcomes = s.upsert(&[
            member("busy@example.com", json!({})),
            member("odd@example.c0m", json!({})),
            member("ok@example.com", json!({"nosuch.q": 1})),
            member("fine@example.com", json!({})),
        ]);
        assert!(matches!(&outcomes[0], Outcome::Retry { .. }));
        assert!(matches!(&outcomes[1], Outcome::Failed { .. }));
        assert!(
            matches!(&outcomes[2], Outcome::Failed { message } if message.contains("nosuch.q"))
        );
        assert!(is_member(&outcomes[3]));
    }

    #[test]
    fn a_wrong_key_in_a_200_answer_is_an_authentication_failure() {
        let emulator = Emulator::start();
        emulator.sendsay().set_api_key("ss-other");
        let mut http = http();
        match provider(&emulator).check(&mut http) {
            Err(ProviderError::Auth(message)) => {
                assert!(message.contains("error/auth/failed"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn redirects_are_followed_remembered_and_bounded() {
        let emulator = Emulator::start();
        let ss = emulator.sendsay();
        ss.set_redirect(Some("clu7"));
        let mut http = http();
        let mut provider = provider(&emulator);
        let checked = provider.check(&mut http).unwrap();
        assert_eq!(checked["account"], "acme");
        emulator.clear_requests("sendsay");
        provider.check(&mut http).unwrap();
        let paths: Vec<String> = emulator
            .requests("sendsay")
            .iter()
            .map(|r| r.path.clone())
            .collect();
        assert_eq!(paths, vec!["/clu7/general/api/v100/json/acme"]);

        ss.set_redirect_loop(true);
        assert!(matches!(
            provider.check(&mut http),
            Err(ProviderError::Transient { message, .. }) if message.contains("redirected")
        ));
    }

    #[test]
    fn the_account_member_limit_fails_new_members_only() {
        let (emulator, mut s) = Bound::new::<SendsayFake>();
        emulator.sendsay().set_member_limit(1);
        let outcomes = s.upsert(&[
            member("ann@example.com", json!({})),
            member("bob@example.com", json!({})),
        ]);
        assert!(is_member(&outcomes[0]));
        assert!(matches!(&outcomes[1], Outcome::Failed { message } if message.contains("limit")));
        let checked = s.provider.check(&mut s.http).unwrap();
        assert_eq!(checked["members_left"], 0);
    }

    struct SendsayFake;

    impl Fake for SendsayFake {
        const SPEC: &'static Spec = &SPEC;

        fn connect(emulator: &Emulator) -> Box<dyn Provider> {
            emulator.sendsay().set_api_key(KEY);
            provider(emulator)
        }

        fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider> {
            provider_with_key(emulator, WRONG_SECRET)
        }

        fn binding() -> Binding {
            binding()
        }

        fn member(address: &str) -> Member {
            member(
                address,
                json!({"base.firstName": "Ann", "custom.city": "Moscow"}),
            )
        }

        fn refuse(emulator: &Emulator, address: &str) -> &'static str {
            emulator.sendsay().reject_address(
                address,
                "error/member/blocked",
                "blocked by the account",
            );
            "blocked by the account"
        }

        fn knows(emulator: &Emulator, address: &str) -> bool {
            emulator.sendsay().member(address).is_some()
        }
    }

    impl Consent for SendsayFake {
        fn unsubscribe(emulator: &Emulator, _: &Binding, address: &str) {
            assert!(emulator.sendsay().set_status(address, "unsubscribed"));
        }
    }

    impl Erasure for SendsayFake {
        /// Sendsay erases as it deletes: the member and all its data go.
        fn erased(emulator: &Emulator, address: &str) -> bool {
            emulator.sendsay().deleted().iter().any(|a| a == address)
        }
    }

    conformance_suite!(SendsayFake {
        consent: supported,
        erasure: supported
    });
}
