//! Unisender, API 1.0 (`https://api.unisender.com/{language}/api/{method}?format=json`; the
//! Selzy brand serves the same API at `https://api.selzy.com`, via `settings.base_url`).
//!
//! Every call is a form-encoded POST with `api_key` in the body (never in the URL, which
//! proxies and logs keep). Unisender answers HTTP 200 even for errors, with
//! `{"error": ..., "code": ...}` instead of `{"result": ...}`: the body is always inspected, and
//! codes are mapped to authentication (`invalid_api_key`, `access_denied`), throttling
//! (`api_call_limit_exceeded_*`, `retry_later`) or the call's own failure.
//!
//! A binding's list is a Unisender list. Unisender has no bulk way to read contacts' statuses
//! (`exportContacts` is asynchronous), so each member costs one `getContact` to learn its
//! account-wide status, availability and entry in the list; unsubscribed, blocked, disabled and
//! unreachable contacts are refused without any write. Writes go in bulk with
//! `importContacts` (at most 500 rows, no `email_status`, so existing statuses stay), except
//! for double opt-in bindings, whose new members are added with `subscribe` and
//! `double_optin=4` (a confirmation e-mail unless the contact is already new or active).
//! Leaving uses `exclude` (out of the list, still in the account) or `unsubscribe`; deleting
//! and erasing are `importContacts` rows with `delete` = 1.

use super::{
    Binding, Capabilities, Config, ConsentStatus, LeaveAction, Limits, Member, MemberStatus, Need,
    Outcome, Provider, Spec, kit,
};
use crate::http::{Http, Method, ProviderError, Request, Response, Result, transient};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::time::Duration;

pub static SPEC: Spec = Spec {
    name: "unisender",
    settings: &[("language", Need::Optional)],
    secrets: &[("api_key", Need::Required)],
    capabilities: Capabilities {
        on_leave: &["remove", "unsubscribe", "delete", "keep"],
        double_opt_in: true,
        tags: true,
        phone_identity: false,
    },
    validate,
    field_name,
    connect,
};

/// Rows per `importContacts` call (documented maximum).
const IMPORT_ROWS: usize = 500;
/// Members per upsert or removal: each costs a call of its own (`getContact`, `exclude`), so
/// batches stay short enough for the worker to stay responsive.
const BATCH: usize = 100;
const DEFAULT_ROOT: &str = "https://api.unisender.com";
/// Column names `importContacts` gives a meaning of its own; they cannot be mapped fields.
const RESERVED: [&str; 10] = [
    "email",
    "email_status",
    "email_list_ids",
    "email_subscribe_times",
    "email_unsubscribed_list_ids",
    "email_excluded_list_ids",
    "tags",
    "delete",
    "phone",
    "phone_status",
];

fn validate(config: &Config) -> std::result::Result<(), String> {
    match config.setting("language") {
        Some(language)
            if language.len() != 2 || !language.chars().all(|c| c.is_ascii_lowercase()) =>
        {
            Err(format!(
                "settings.language must be a two-letter code like en or ru, not \"{language}\""
            ))
        }
        _ => Ok(()),
    }
}

/// User field names: Latin letters, digits, `_` and `-`, starting with a letter.
fn field_name(name: &str) -> std::result::Result<(), String> {
    if RESERVED.contains(&name) {
        return Err(format!(
            "{name} is one of Unisender's system columns, not a user field"
        ));
    }
    let mut chars = name.chars();
    let valid = chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if valid {
        Ok(())
    } else {
        Err("Unisender field names are Latin letters, digits, _ and -, starting with a letter (like Name)".into())
    }
}

fn connect(config: &Config) -> Box<dyn Provider> {
    Box::new(Unisender {
        root: format!(
            "{}/{}/api",
            config.base_url(DEFAULT_ROOT),
            config.setting("language").unwrap_or("en")
        ),
        api_key: config.secret("api_key").unwrap_or_default().to_string(),
    })
}

struct Unisender {
    root: String,
    api_key: String,
}

/// A call's answer that is not an account-level failure.
enum Answer {
    Result(Value),
    /// The call failed on its own terms (a bad address, an unknown list, ...).
    Error {
        code: String,
        message: String,
    },
}

impl Answer {
    fn describe(code: &str, message: &str) -> String {
        if code.is_empty() {
            message.to_string()
        } else {
            format!("{message} ({code})")
        }
    }
}

/// A contact as `getContact` shows it.
enum Contact {
    Missing,
    Found {
        status: String,
        availability: String,
        /// Its entry in the binding's list, if any: `active` or `unsubscribed`.
        in_list: Option<String>,
    },
    Failed(Outcome),
}

impl Unisender {
    /// Calls `method`; errors inside HTTP 200 answers are found and classified here.
    fn call(
        &self,
        http: &mut Http,
        operation: &str,
        method: &str,
        params: Vec<(String, String)>,
    ) -> Result<Answer> {
        let mut form = vec![("api_key".to_string(), self.api_key.clone())];
        form.extend(params);
        let request =
            Request::new(Method::Post, format!("{}/{method}?format=json", self.root)).form(&form);
        let response = http.send(operation, request)?;
        if response.status == 404 {
            return Err(ProviderError::Binding(format!(
                "no Unisender API at {} (settings.base_url, settings.language?)",
                self.root
            )));
        }
        response.check(error_text)?;
        classify(&response.json()?)
    }

    /// A call whose error answer is a failure of the whole operation.
    fn result(
        &self,
        http: &mut Http,
        operation: &str,
        method: &str,
        params: Vec<(String, String)>,
    ) -> Result<Value> {
        match self.call(http, operation, method, params)? {
            Answer::Result(result) => Ok(result),
            Answer::Error { code, message } => Err(ProviderError::Rejected(format!(
                "{operation}: {}",
                Answer::describe(&code, &message)
            ))),
        }
    }

    /// `(id, title)` of every list.
    fn lists(&self, http: &mut Http) -> Result<Vec<(String, String)>> {
        let lists = self.result(http, "list lists", "getLists", Vec::new())?;
        Ok(lists
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|l| Some((id_text(&l["id"])?, l["title"].as_str()?.to_string())))
            .collect())
    }
}

impl kit::ListDirectory for Unisender {
    const KIND: &'static str = "list";
    const PROVIDER: &'static str = "Unisender";

    fn list_by_id(&mut self, http: &mut Http, id: &str) -> Result<Option<String>> {
        Ok(self
            .lists(http)?
            .into_iter()
            .find(|(l, _)| l == id)
            .map(|(l, _)| l))
    }

    fn list_by_name(&mut self, http: &mut Http, title: &str) -> Result<Option<String>> {
        Ok(self
            .lists(http)?
            .into_iter()
            .find(|(_, t)| t == title)
            .map(|(id, _)| id))
    }

    fn create_list(&mut self, http: &mut Http, title: &str) -> Result<String> {
        match self.call(
            http,
            "create list",
            "createList",
            vec![("title".into(), title.into())],
        )? {
            Answer::Result(result) => id_text(&result["id"]).ok_or_else(|| {
                transient(format!(
                    "Unisender created list \"{title}\" without telling its id"
                ))
            }),
            // Titles are unique: another run may have just created it.
            Answer::Error { code, message } => self.list_by_name(http, title)?.ok_or_else(|| {
                ProviderError::Binding(format!(
                    "Unisender refused to create list \"{title}\": {}",
                    Answer::describe(&code, &message)
                ))
            }),
        }
    }
}

impl Unisender {
    fn look_up(&self, http: &mut Http, address: &str, list: &str) -> Result<Contact> {
        let params = vec![
            ("email".to_string(), address.to_string()),
            ("include_lists".into(), "1".into()),
        ];
        Ok(
            match self.call(http, "get contact", "getContact", params)? {
                Answer::Result(result) => Contact::Found {
                    status: result["email"]["status"]
                        .as_str()
                        .unwrap_or("new")
                        .to_string(),
                    availability: result["email"]["availability"]
                        .as_str()
                        .unwrap_or("available")
                        .to_string(),
                    in_list: result["lists"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|l| id_text(&l["id"]).as_deref() == Some(list))
                        .map(|l| l["status"].as_str().unwrap_or("active").to_string()),
                },
                Answer::Error { message, .. } if not_found(&message) => Contact::Missing,
                Answer::Error { code, message } => {
                    Contact::Failed(Outcome::failed(Answer::describe(&code, &message)))
                }
            },
        )
    }

    /// Adds a new member of a double opt-in binding: `subscribe` sends the confirmation
    /// e-mail (`double_optin=4`: unless the contact is already new or active).
    fn subscribe(
        &self,
        http: &mut Http,
        binding: &Binding,
        list: &str,
        member: &Member,
        already_active: bool,
    ) -> Result<Outcome> {
        let types = binding.remote_object("field_types");
        let mut params = vec![
            ("list_ids".to_string(), list.to_string()),
            ("fields[email]".into(), member.address.clone()),
            ("double_optin".into(), "4".into()),
            ("overwrite".into(), "2".into()),
        ];
        for (name, value) in &member.fields {
            params.push((
                format!("fields[{name}]"),
                field_text(value, kind(types, name)),
            ));
        }
        if !binding.tags.is_empty() {
            params.push(("tags".into(), binding.tags.join(",")));
        }
        Ok(
            match self.call(http, "subscribe contact", "subscribe", params)? {
                Answer::Result(result) => Outcome::Member {
                    status: if already_active {
                        MemberStatus::Subscribed
                    } else {
                        MemberStatus::Pending
                    },
                    remote_id: id_text(&result["person_id"]),
                },
                Answer::Error { code, message } => {
                    Outcome::failed(Answer::describe(&code, &message))
                }
            },
        )
    }

    /// `importContacts` of up to 500 rows; returns each row's problem, by row index.
    fn import(
        &self,
        http: &mut Http,
        operation: &str,
        columns: &[String],
        rows: &[Vec<String>],
    ) -> Result<HashMap<usize, String>> {
        let mut params: Vec<(String, String)> = columns
            .iter()
            .enumerate()
            .map(|(j, name)| (format!("field_names[{j}]"), name.clone()))
            .collect();
        for (i, row) in rows.iter().enumerate() {
            for (j, cell) in row.iter().enumerate() {
                params.push((format!("data[{i}][{j}]"), cell.clone()));
            }
        }
        match self.call(http, operation, "importContacts", params)? {
            Answer::Result(result) => {
                let log = result["log"].as_array().into_iter().flatten();
                Ok(log
                    .filter_map(|entry| {
                        let message = Answer::describe(
                            entry["code"].as_str().unwrap_or(""),
                            entry["message"].as_str().unwrap_or("rejected"),
                        );
                        Some((usize::try_from(entry["index"].as_u64()?).ok()?, message))
                    })
                    .collect())
            }
            // A column or list the account does not have: the binding needs attention.
            Answer::Error { code, message } if code == "invalid_arg" => {
                Err(ProviderError::Binding(format!(
                    "Unisender refused the import: {}",
                    Answer::describe(&code, &message)
                )))
            }
            Answer::Error { code, message } => Err(ProviderError::Rejected(format!(
                "{operation}: {}",
                Answer::describe(&code, &message)
            ))),
        }
    }

    /// Deletes contacts from the account (`delete` = 1 rows).
    fn delete(&self, http: &mut Http, operation: &str, members: &[Member]) -> Result<Vec<Outcome>> {
        let columns = ["email".to_string(), "delete".to_string()];
        let mut outcomes = Vec::with_capacity(members.len());
        for batch in members.chunks(IMPORT_ROWS) {
            let rows: Vec<Vec<String>> = batch
                .iter()
                .map(|m| vec![m.address.clone(), "1".into()])
                .collect();
            let problems = self.import(http, operation, &columns, &rows)?;
            outcomes.extend((0..batch.len()).map(|i| Outcome::removed_unless(problems.get(&i))));
        }
        Ok(outcomes)
    }

    /// `exclude` or `unsubscribe` for each member, from the binding's list.
    fn leave(
        &self,
        http: &mut Http,
        method: &str,
        list: &str,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(members.len());
        for member in members {
            let params = vec![
                ("contact_type".to_string(), "email".to_string()),
                ("contact".into(), member.address.clone()),
                ("list_ids".into(), list.to_string()),
            ];
            outcomes.push(match self.call(http, method, method, params)? {
                Answer::Result(_) => Outcome::Removed,
                Answer::Error { message, .. } if not_found(&message) => Outcome::Removed,
                Answer::Error { code, message } => {
                    Outcome::failed(Answer::describe(&code, &message))
                }
            });
        }
        Ok(outcomes)
    }
}

/// Splits a Unisender answer into a result, an account-level failure, or the call's own error.
fn classify(body: &Value) -> Result<Answer> {
    let code = body["code"].as_str().unwrap_or("").to_string();
    let message = match &body["error"] {
        Value::String(text) => decode_entities(text),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    if code.is_empty() && message.is_empty() {
        return match body.get("result") {
            Some(result) => Ok(Answer::Result(result.clone())),
            None => Err(transient(format!(
                "Unisender answered neither a result nor an error: {}",
                excerpt(&body.to_string())
            ))),
        };
    }
    let described = Answer::describe(&code, &message);
    match code.as_str() {
        "invalid_api_key" | "access_denied" => Err(ProviderError::Auth(described)),
        "api_call_limit_exceeded_for_api_key"
        | "api_call_limit_exceeded_for_ip"
        | "retry_later" => {
            Err(ProviderError::Transient {
                message: described,
                // Unisender's documented limits are counted per 60 seconds.
                retry_after: Some(Duration::from_secs(60)),
            })
        }
        "not_enough_money" => Err(transient(format!(
            "the Unisender account has no funds for this: {described}"
        ))),
        "unknown_method" => Err(ProviderError::Binding(format!(
            "this endpoint does not speak Unisender's API (settings.base_url?): {described}"
        ))),
        _ => Ok(Answer::Error { code, message }),
    }
}

/// An error answer's words for the delivery log (a proxy's error page included).
fn error_text(response: &Response) -> String {
    match serde_json::from_slice::<Value>(&response.body) {
        Ok(body) if body["error"].is_string() => {
            decode_entities(body["error"].as_str().unwrap_or(""))
        }
        _ => response.text_excerpt(),
    }
}

fn excerpt(text: &str) -> String {
    text.chars().take(300).collect()
}

/// Unisender HTML-encodes its error messages.
fn decode_entities(text: &str) -> String {
    text.replace("&quot;", "\"")
        .replace("&#039;", "'")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn not_found(message: &str) -> bool {
    message.to_lowercase().contains("not found")
}

/// Unisender's ids are numbers in some answers and strings in others.
fn id_text(id: &Value) -> Option<String> {
    match id {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn list_id(binding: &Binding) -> Result<&str> {
    kit::list_id(binding, "Unisender list")
}

fn kind<'a>(types: Option<&'a Map<String, Value>>, name: &str) -> Option<&'a str> {
    types.and_then(|t| t.get(name)).and_then(Value::as_str)
}

/// A value as Unisender's field types want it (all values travel as text): `1`/`0` for
/// `bool`, `YYYY-MM-DD` for `date`; an empty value clears the field.
fn field_text(value: &Value, kind: Option<&str>) -> String {
    match (kind, value) {
        (_, Value::Null) => String::new(),
        (Some("bool"), Value::Bool(b)) => if *b { "1" } else { "0" }.to_string(),
        (Some("date"), Value::String(text)) if text.len() >= 10 && text.as_bytes()[4] == b'-' => {
            text[..10].to_string()
        }
        (_, Value::String(text)) => text.clone(),
        (_, other) => other.to_string(),
    }
}

/// The consent state Unisender holds for a contact, which the sync must not override.
fn refusal(status: &str, availability: &str, in_list: Option<&str>) -> Option<Outcome> {
    let (consent, why) = if status == "unsubscribed" {
        (ConsentStatus::Unsubscribed, "unsubscribed at Unisender")
    } else if in_list == Some("unsubscribed") {
        (
            ConsentStatus::Unsubscribed,
            "unsubscribed from this list at Unisender",
        )
    } else if status == "blocked" {
        (ConsentStatus::Complained, "blocked at Unisender")
    } else if availability == "unreachable" {
        (ConsentStatus::Bounced, "unreachable (bounced) at Unisender")
    } else if status == "inactive" {
        // Disabled by the account's owner: it gets no mail, and only the owner may undo it.
        (ConsentStatus::Cleaned, "disabled (inactive) at Unisender")
    } else {
        return None;
    };
    Some(Outcome::Refused {
        status: consent,
        message: format!("the contact is {why}"),
    })
}

/// Contacts waiting for their confirmation e-mail are pending; the rest receive mail.
fn member_status(status: &str) -> MemberStatus {
    match status {
        "invited" | "activation_requested" => MemberStatus::Pending,
        _ => MemberStatus::Subscribed,
    }
}

impl Provider for Unisender {
    fn limits(&self) -> Limits {
        // The documented per-method limits are 300 calls per 60 s per key (subscribe,
        // checkEmail); the same pace is kept for every call.
        Limits::batches(BATCH, BATCH).paced(5.0, 5.0)
    }

    fn check(&mut self, http: &mut Http) -> Result<Value> {
        let lists = self.lists(http)?;
        Ok(json!({"provider": "unisender", "lists": lists.len()}))
    }

    fn prepare(&mut self, http: &mut Http, binding: &mut Binding) -> Result<()> {
        let list = kit::resolve_list(http, self, binding)?;
        let fields = self.result(http, "list fields", "getFields", Vec::new())?;
        let types: Map<String, Value> = fields
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| Some((f["name"].as_str()?.to_string(), f["type"].clone())))
            .collect();
        kit::require_fields(
            "Unisender",
            &binding.fields,
            types.keys().map(String::as_str),
        )?;
        binding.list_id = Some(list);
        binding.keep_remote("field_types", types);
        Ok(())
    }

    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let list = list_id(binding)?;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; members.len()];
        // Members to import, with the status they will have.
        let mut imports: Vec<(usize, MemberStatus)> = Vec::new();
        for (i, member) in members.iter().enumerate() {
            let (status, in_list, active) = match self.look_up(http, &member.address, list)? {
                Contact::Failed(outcome) => {
                    outcomes[i] = Some(outcome);
                    continue;
                }
                Contact::Missing => (MemberStatus::Subscribed, false, false),
                Contact::Found {
                    status,
                    availability,
                    in_list,
                } => {
                    if let Some(refused) = refusal(&status, &availability, in_list.as_deref()) {
                        outcomes[i] = Some(refused);
                        continue;
                    }
                    let active = matches!(status.as_str(), "new" | "active");
                    (member_status(&status), in_list.is_some(), active)
                }
            };
            if binding.new_member_status == MemberStatus::Pending && !in_list {
                outcomes[i] = Some(self.subscribe(http, binding, list, member, active)?);
            } else {
                imports.push((i, status));
            }
        }

        let types = binding.remote_object("field_types");
        let mut columns = vec!["email".to_string(), "email_list_ids".to_string()];
        if !binding.tags.is_empty() {
            columns.push("tags".into());
        }
        columns.extend(binding.fields.iter().cloned());
        let rows: Vec<Vec<String>> = imports
            .iter()
            .map(|(i, _)| {
                let member = &members[*i];
                let mut row = vec![member.address.clone(), list.to_string()];
                if !binding.tags.is_empty() {
                    row.push(binding.tags.join(","));
                }
                row.extend(binding.fields.iter().map(|name| {
                    member
                        .fields
                        .get(name)
                        .map(|v| field_text(v, kind(types, name)))
                        .unwrap_or_default()
                }));
                row
            })
            .collect();
        let problems = self.import(http, "import contacts", &columns, &rows)?;
        for (row, (i, status)) in imports.iter().enumerate() {
            outcomes[*i] = Some(match problems.get(&row) {
                Some(message) => Outcome::failed(message),
                None => Outcome::member(*status, None),
            });
        }
        Ok(outcomes
            .into_iter()
            .map(|o| {
                o.unwrap_or_else(|| Outcome::retry("Unisender did not answer for this contact"))
            })
            .collect())
    }

    fn remove(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        action: LeaveAction,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        match action {
            LeaveAction::Remove => self.leave(http, "exclude", list_id(binding)?, members),
            LeaveAction::Unsubscribe => self.leave(http, "unsubscribe", list_id(binding)?, members),
            LeaveAction::Delete => self.delete(http, "delete contacts", members),
            LeaveAction::Archive => Err(ProviderError::Binding(
                "Unisender has no archive; use on_leave remove, unsubscribe, delete or keep".into(),
            )),
        }
    }

    fn erase(
        &mut self,
        http: &mut Http,
        _binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        // Unisender has no GDPR erasure method: deleting the contact is the closest.
        self.delete(http, "erase contacts", members)
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::providers::test_support::refusal_status;

    #[test]
    fn settings_and_field_names_are_checked() {
        let config = |language: &str| {
            crate::providers::test_support::config(json!({"language": language}), json!({}))
        };
        assert!(validate(&config("ru")).is_ok());
        assert!(validate(&config("english")).is_err());
        assert!(field_name("Name").is_ok());
        assert!(field_name("city_2").is_ok());
        assert!(field_name("2city").is_err());
        assert!(field_name("email").is_err());
        assert!(field_name("first name").is_err());
    }

    #[test]
    fn errors_inside_http_200_are_classified() {
        assert!(matches!(
            classify(&json!({"result": {"id": 5}})),
            Ok(Answer::Result(_))
        ));
        assert!(matches!(
            classify(&json!({"error": "AK100310-02", "code": "invalid_api_key"})),
            Err(ProviderError::Auth(_))
        ));
        assert!(matches!(
            classify(&json!({"error": "x", "code": "api_call_limit_exceeded_for_ip"})),
            Err(ProviderError::Transient {
                retry_after: Some(_),
                ..
            })
        ));
        assert!(matches!(
            classify(&json!({"error": "x", "code": "unknown_method"})),
            Err(ProviderError::Binding(_))
        ));
        match classify(&json!({"error": "Invalid &quot;email&quot;", "code": "invalid_arg"})) {
            Ok(Answer::Error { code, message }) => {
                assert_eq!(code, "invalid_arg");
                assert_eq!(message, "Invalid \"email\"");
            }
            _ => panic!("a call's own error"),
        }
        assert!(matches!(
            classify(&json!({"warnings": []})),
            Err(ProviderError::Transient { .. })
        ));
    }

    #[test]
    fn consent_states_refuse() {
        for (status, availability, list_status, consent) in [
            (
                "unsubscribed",
                "available",
                None,
                ConsentStatus::Unsubscribed,
            ),
            (
                "active",
                "available",
                Some("unsubscribed"),
                ConsentStatus::Unsubscribed,
            ),
            ("blocked", "available", None, ConsentStatus::Complained),
            (
                "active",
                "unreachable",
                Some("active"),
                ConsentStatus::Bounced,
            ),
            (
                "inactive",
                "available",
                Some("active"),
                ConsentStatus::Cleaned,
            ),
        ] {
            let outcome = refusal(status, availability, list_status);
            assert_eq!(
                outcome.as_ref().and_then(refusal_status),
                Some(consent),
                "{status}, {availability}, {list_status:?}"
            );
        }
        assert!(refusal("new", "available", Some("active")).is_none());
        assert_eq!(member_status("activation_requested"), MemberStatus::Pending);
        assert_eq!(member_status("active"), MemberStatus::Subscribed);
    }

    #[test]
    fn values_become_text() {
        assert_eq!(field_text(&json!(42), Some("number")), "42");
        assert_eq!(field_text(&json!(true), Some("bool")), "1");
        assert_eq!(
            field_text(&json!("1990-07-14T00:00:00"), Some("date")),
            "1990-07-14"
        );
        assert_eq!(field_text(&Value::Null, Some("string")), "");
    }
}

#[cfg(test)]
mod fake {
    use super::*;
    use crate::providers::conformance::{Consent, Erasure, Fake, WRONG_SECRET, conformance_suite};
    use crate::providers::test_support;
    use crate::providers::test_support::{Bound, connected, is_subscribed, refusal_status};
    use listsync_emulator::Emulator;

    const KEY: &str = "6cknyh3pzk9d1dgj";

    fn provider(emulator: &Emulator, key: &str) -> Box<dyn Provider> {
        connect(&test_support::config(
            json!({"base_url": emulator.base_url("unisender")}),
            json!({"api_key": key}),
        ))
    }

    fn binding(status: MemberStatus) -> Binding {
        Binding {
            tags: vec!["crm".into()],
            new_member_status: status,
            ..test_support::binding(&["Name", "score"])
        }
    }

    fn member(address: &str, name: &str, score: i64) -> Member {
        test_support::member(address, json!({"Name": name, "score": score}))
    }

    fn gone(address: &str) -> Member {
        test_support::member(address, json!({}))
    }

    fn prepared(
        http: &mut Http,
        provider: &mut Box<dyn Provider>,
        status: MemberStatus,
    ) -> Binding {
        let mut binding = binding(status);
        provider.prepare(http, &mut binding).expect("prepare");
        binding
    }

    fn ann_and_bob() -> [Member; 2] {
        [
            member("ann@example.com", "Ann", 10),
            member("bob@example.com", "Bob", 20),
        ]
    }

    #[test]
    fn prepare_creates_the_list_once_and_checks_fields() {
        let (emulator, mut provider, mut http) = connected::<UnisenderFake>();
        let first = prepared(&mut http, &mut provider, MemberStatus::Subscribed);
        let again = prepared(&mut http, &mut provider, MemberStatus::Subscribed);
        assert_eq!(
            first.list_id, again.list_id,
            "the list of that title is reused"
        );
        let lists = emulator.unisender().lists();
        assert_eq!(lists.len(), 1);
        assert_eq!(lists[0].title, "vip (crm)");
        assert_eq!(first.remote["field_types"]["score"], "number");

        let mut given = binding(MemberStatus::Subscribed);
        given.list_id = Some("999".into());
        let e = provider.prepare(&mut http, &mut given).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Binding(m) if m.contains("999")),
            "{e:?}"
        );

        let mut unknown = binding(MemberStatus::Subscribed);
        unknown.fields.push("shoe".into());
        let e = provider.prepare(&mut http, &mut unknown).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Binding(m) if m.contains("shoe")),
            "{e:?}"
        );
    }

    #[test]
    fn upsert_imports_members_with_fields_and_tags_then_updates() {
        let (emulator, mut s) = Bound::new::<UnisenderFake>();
        let outcomes = s.upsert(&ann_and_bob());
        assert!(outcomes.iter().all(is_subscribed), "{outcomes:?}");
        let list = s.binding.list_id.clone().unwrap();
        let members = emulator.list_members("unisender", &list);
        assert_eq!(members.len(), 2);
        assert_eq!(members["ann@example.com"]["Name"], "Ann");
        assert_eq!(members["ann@example.com"]["score"], "10");
        let ann = emulator.unisender().contact("ann@example.com").unwrap();
        assert!(ann.tags.contains("crm"));

        s.upsert(&[member("ann@example.com", "Anne", 11)]);
        let ann = emulator.unisender().contact("ann@example.com").unwrap();
        assert_eq!(ann.fields["Name"], "Anne");
        assert_eq!(ann.fields["score"], "11");
        assert!(emulator.unisender().confirmation_emails().is_empty());
    }

    #[test]
    fn the_api_key_travels_in_the_body_never_in_the_url() {
        let (emulator, mut s) = Bound::new::<UnisenderFake>();
        s.upsert(&ann_and_bob());
        let requests = emulator.requests("unisender");
        assert!(!requests.is_empty());
        for request in requests {
            assert_eq!(request.method, "POST");
            assert_eq!(request.query, "format=json", "{}", request.path);
            assert!(request.body.contains(&format!("api_key={KEY}")));
        }
    }

    #[test]
    fn double_opt_in_subscribes_new_members_with_a_confirmation() {
        let (emulator, mut provider, mut http) = connected::<UnisenderFake>();
        let subscribed = prepared(&mut http, &mut provider, MemberStatus::Subscribed);
        provider
            .upsert(
                &mut http,
                &subscribed,
                &[member("ann@example.com", "Ann", 1)],
            )
            .unwrap();
        let mut pending = binding(MemberStatus::Pending);
        pending.list_name = "double (crm)".into();
        provider.prepare(&mut http, &mut pending).unwrap();
        let outcomes = provider
            .upsert(
                &mut http,
                &pending,
                &[
                    member("ann@example.com", "Ann", 1),
                    member("cid@example.com", "Cid", 3),
                ],
            )
            .unwrap();
        assert!(matches!(
            outcomes[0],
            Outcome::Member {
                status: MemberStatus::Subscribed,
                ..
            }
        ));
        assert!(matches!(
            outcomes[1],
            Outcome::Member {
                status: MemberStatus::Pending,
                remote_id: Some(_)
            }
        ));
        let us = emulator.unisender();
        assert_eq!(us.confirmation_emails(), vec!["cid@example.com"]);
        assert_eq!(us.contact("cid@example.com").unwrap().fields["Name"], "Cid");
        let list = pending.list_id.as_deref().unwrap();
        assert_eq!(emulator.list_members("unisender", list).len(), 2);

        // Later updates of the pending member are imports, without a second e-mail.
        let outcomes = provider
            .upsert(&mut http, &pending, &[member("cid@example.com", "Cyd", 3)])
            .unwrap();
        assert!(matches!(
            outcomes[0],
            Outcome::Member {
                status: MemberStatus::Pending,
                ..
            }
        ));
        assert_eq!(us.confirmation_emails().len(), 1);
        assert_eq!(us.contact("cid@example.com").unwrap().fields["Name"], "Cyd");
    }

    /// Unsubscribing from the whole account is the suite's; Unisender's other consent states
    /// (per list, blocked, unreachable, inactive) are refused too, by either kind of binding.
    #[test]
    fn every_consent_state_is_never_overridden() {
        for pending in [MemberStatus::Subscribed, MemberStatus::Pending] {
            let (emulator, mut provider, mut http) = connected::<UnisenderFake>();
            let binding = prepared(&mut http, &mut provider, pending);
            let list = binding.list_id.clone().unwrap();
            let addresses = [
                "left@example.com",
                "blk@example.com",
                "bnc@example.com",
                "off@example.com",
            ];
            let first: Vec<Member> = addresses.iter().map(|a| member(a, "X", 1)).collect();
            let mut subscribed = binding.clone();
            subscribed.new_member_status = MemberStatus::Subscribed;
            provider.upsert(&mut http, &subscribed, &first).unwrap();
            let us = emulator.unisender();
            assert!(us.set_list_status("left@example.com", &list, "unsubscribed"));
            assert!(us.set_status("blk@example.com", "blocked"));
            assert!(us.set_availability("bnc@example.com", "unreachable"));
            assert!(us.set_status("off@example.com", "inactive"));
            let outcomes = provider.upsert(&mut http, &binding, &first).unwrap();
            let statuses: Vec<Option<ConsentStatus>> =
                outcomes.iter().map(refusal_status).collect();
            assert_eq!(
                statuses,
                [
                    ConsentStatus::Unsubscribed,
                    ConsentStatus::Complained,
                    ConsentStatus::Bounced,
                    ConsentStatus::Cleaned
                ]
                .map(Some),
                "{pending:?}"
            );
            assert!(us.resubscribed().is_empty());
            assert_eq!(us.contact("blk@example.com").unwrap().status, "blocked");
            assert!(emulator.list_members("unisender", &list).is_empty());
        }
    }

    /// A refused address is the suite's; here a value the field type refuses, and a refused
    /// address on the double opt-in path, which subscribes instead of importing.
    #[test]
    fn per_item_errors_do_not_fail_the_batch() {
        let (emulator, mut s) = Bound::new::<UnisenderFake>();
        emulator
            .unisender()
            .reject_address("trap@example.com", "Spam trap address");
        let mut bad_score = member("eve@example.com", "Eve", 0);
        bad_score.fields.insert("score".into(), json!("lots"));
        let outcomes = s.upsert(&[member("ann@example.com", "Ann", 2), bad_score]);
        assert!(matches!(outcomes[0], Outcome::Member { .. }));
        assert!(matches!(&outcomes[1], Outcome::Failed { message } if message.contains("score")));

        s.binding.new_member_status = MemberStatus::Pending;
        let outcomes = s.upsert(&[member("trap@example.com", "T", 1)]);
        assert!(
            matches!(&outcomes[0], Outcome::Failed { message } if message.contains("Spam trap"))
        );
    }

    #[test]
    fn remove_unsubscribe_and_delete() {
        for action in [
            LeaveAction::Remove,
            LeaveAction::Unsubscribe,
            LeaveAction::Delete,
        ] {
            let (emulator, mut s) = Bound::new::<UnisenderFake>();
            s.upsert(&ann_and_bob());
            let leaving = [gone("ann@example.com"), gone("zed@example.com")];
            let outcomes = s.remove(action, &leaving);
            assert_eq!(outcomes, vec![Outcome::Removed; 2], "{action:?}");
            let us = emulator.unisender();
            let list = s.binding.list_id.as_deref().unwrap();
            let members = emulator.list_members("unisender", list);
            match action {
                LeaveAction::Remove => {
                    assert!(us.contact("ann@example.com").unwrap().lists.is_empty());
                    assert_eq!(us.contact("ann@example.com").unwrap().status, "new");
                }
                LeaveAction::Unsubscribe => {
                    assert_eq!(
                        us.contact("ann@example.com").unwrap().lists[list],
                        "unsubscribed"
                    )
                }
                _ => assert_eq!(us.deleted(), vec!["ann@example.com"]),
            }
            assert_eq!(members.keys().collect::<Vec<_>>(), vec!["bob@example.com"]);
        }
    }

    #[test]
    fn archive_is_refused() {
        let (_emulator, mut s) = Bound::new::<UnisenderFake>();
        assert!(!SPEC.capabilities.on_leave.contains(&"archive"));
        test_support::assert_unoffered_leaves_are_refused(
            &SPEC,
            &mut s.provider,
            &mut s.http,
            &s.binding,
        );
    }

    #[test]
    fn erase_deletes_contacts_in_chunks_of_500() {
        let (emulator, mut s) = Bound::new::<UnisenderFake>();
        s.upsert(&ann_and_bob());
        let mut erasing: Vec<Member> = (0..600)
            .map(|i| gone(&format!("u{i}@example.com")))
            .collect();
        erasing.push(gone("ann@example.com"));
        let outcomes = s.erase(&erasing);
        assert_eq!(outcomes.len(), 601);
        assert!(outcomes.iter().all(|o| *o == Outcome::Removed));
        assert_eq!(emulator.unisender().deleted(), vec!["ann@example.com"]);
        assert_eq!(
            emulator
                .requests("unisender")
                .iter()
                .filter(|r| r.path.ends_with("importContacts"))
                .count(),
            3,
            "one import for the upsert, two for the erasure"
        );
    }

    #[test]
    fn check_counts_the_lists() {
        let (_emulator, mut provider, mut http) = connected::<UnisenderFake>();
        assert_eq!(provider.check(&mut http).unwrap()["lists"], 0);
    }

    /// Unisender's call limit is an error in a 200 answer, not a 429: still transient, with
    /// the minute it counts calls over.
    #[test]
    fn the_call_limit_is_transient() {
        let (emulator, mut s) = Bound::new::<UnisenderFake>();
        let batch = ann_and_bob();

        emulator.unisender().set_call_limit(Some(1));
        s.provider.check(&mut s.http).unwrap();
        match s.provider.upsert(&mut s.http, &s.binding, &batch) {
            Err(ProviderError::Transient {
                message,
                retry_after,
            }) => {
                assert!(message.contains("api_call_limit_exceeded"), "{message}");
                assert_eq!(retry_after, Some(Duration::from_secs(60)));
            }
            other => panic!("{other:?}"),
        }
        emulator.unisender().set_call_limit(None);
        s.upsert(&batch);
    }

    struct UnisenderFake;

    impl Fake for UnisenderFake {
        const SPEC: &'static Spec = &SPEC;

        fn connect(emulator: &Emulator) -> Box<dyn Provider> {
            emulator.unisender().set_api_key(KEY);
            emulator.unisender().add_field("score", "number");
            provider(emulator, KEY)
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
                .unisender()
                .reject_address(address, "Spam trap address");
            "Spam trap address"
        }

        fn knows(emulator: &Emulator, address: &str) -> bool {
            emulator.unisender().contact(address).is_some()
        }
    }

    impl Consent for UnisenderFake {
        fn unsubscribe(emulator: &Emulator, _: &Binding, address: &str) {
            assert!(emulator.unisender().set_status(address, "unsubscribed"));
        }
    }

    impl Erasure for UnisenderFake {
        /// Unisender erases as it deletes: an import with `delete` = 1.
        fn erased(emulator: &Emulator, address: &str) -> bool {
            emulator.unisender().deleted().iter().any(|a| a == address)
        }
    }

    conformance_suite!(UnisenderFake {
        consent: supported,
        erasure: supported
    });
}
