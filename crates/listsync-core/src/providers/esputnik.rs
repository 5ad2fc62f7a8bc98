//! eSputnik and Yespo: one contacts API (Yespo is eSputnik's new brand) under two base URLs,
//! `https://esputnik.com/api/v1/...` and `https://yespo.io/api/v1/...`, with HTTP Basic
//! authentication whose password is the API key.
//!
//! A binding's list is a static segment ("group"). The API cannot create a segment: it comes
//! into being when the first import names it in `groupNames`. So `prepare` binds to an existing
//! static segment of the list's name (or to the segment id given), and otherwise keeps the
//! segment's *name* as the list id until a later `prepare` (a resync) finds its id.
//!
//! Members are upserted with the asynchronous bulk import (`POST /api/v1/contacts`, 3000 per
//! call, deduplicated on the email address, `groupNames` = the segment), whose session is
//! polled briefly for the contact ids; with double opt-in, first-time members go through
//! `POST /api/v1/contact/subscribe` instead. Leaving members are detached from the segment
//! by contact id, and never with an empty id list, which eSputnik reads as "detach everyone".

use super::{
    Binding, Capabilities, Config, ConsentStatus, LeaveAction, Limits, Member, MemberStatus, Need,
    Outcome, Provider, Spec, kit,
};
use crate::http::{Http, Method, ProviderError, Request, Response, Result, percent_encode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::time::Duration;

pub static ESPUTNIK: Spec = brand("esputnik", connect_esputnik);
pub static YESPO: Spec = brand("yespo", connect_yespo);

/// The two brands differ only in their name and default endpoint.
const fn brand(name: &'static str, connect: fn(&Config) -> Box<dyn Provider>) -> Spec {
    Spec {
        name,
        settings: &[("subscription_form", Need::Optional)],
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
    }
}

fn connect_esputnik(config: &Config) -> Box<dyn Provider> {
    Box::new(Esputnik::new(config, "eSputnik", "https://esputnik.com"))
}

fn connect_yespo(config: &Config) -> Box<dyn Provider> {
    Box::new(Esputnik::new(config, "Yespo", "https://yespo.io"))
}

/// Contacts per bulk import (documented maximum).
const IMPORT_BATCH: usize = 3000;
/// Contact ids per segment attach/detach call (documented maximum).
const DETACH_BATCH: usize = 500;
/// Segments per page of `GET /api/v1/groups` (documented maximum).
const GROUP_PAGE: usize = 500;
/// Waits between polls of an import session: about three seconds in all. A session still
/// running after that is reported as delivered, without contact ids.
const POLL_WAITS: [Duration; 6] = [
    Duration::ZERO,
    Duration::from_millis(100),
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1600),
];
/// eSputnik refuses a second subscribe call for a contact within a minute (HTTP 409).
const SUBSCRIBE_COOLDOWN: Duration = Duration::from_secs(60);

/// Contact fields the import knows by name; any other provider field is an additional field
/// (by id, key or name). Address parts live in `address`, the phone in an `sms` channel.
const STANDARD_FIELDS: [&str; 9] = [
    "firstName",
    "lastName",
    "sms",
    "address",
    "town",
    "region",
    "postcode",
    "languageCode",
    "timeZone",
];
const ADDRESS_PARTS: [&str; 4] = ["address", "town", "region", "postcode"];

fn field_name(name: &str) -> std::result::Result<(), String> {
    match name {
        "email" => {
            Err("the address is the contact's identity at eSputnik; map other fields".into())
        }
        "externalCustomerId" | "id" | "contactKey" => Err(format!(
            "{name} identifies eSputnik contacts and cannot be a mapped field (pg_listsync identifies contacts by their address)"
        )),
        _ => Ok(()),
    }
}

struct Esputnik {
    brand: &'static str,
    /// `<base>/api`.
    root: String,
    authorization: String,
    subscription_form: String,
    /// Segment ids found by name, for segments created by an import after `prepare`.
    segment_ids: HashMap<String, i64>,
}

/// What became of one import session.
#[derive(Debug, Clone, PartialEq)]
enum Import {
    /// Done: contact id per (lower-cased) address.
    Finished(HashMap<String, i64>),
    Failed(String),
    /// Still queued or running when polling stopped.
    Running,
}

/// eSputnik lists hold one object instead of a one-element array in several answers.
fn one_or_many(value: &Value) -> Vec<&Value> {
    match value {
        Value::Array(items) => items.iter().collect(),
        Value::Null => Vec::new(),
        other => vec![other],
    }
}

/// The body of a detach call, or `None` when there is nobody to detach: eSputnik reads a
/// detach without ids as "remove every contact from the segment".
fn detach_body(contact_ids: &[i64]) -> Option<Value> {
    (!contact_ids.is_empty()).then(|| json!({ "contactIds": contact_ids }))
}

/// The address of a contact as eSputnik returns it (its email channel).
fn email_of(contact: &Value) -> Option<String> {
    one_or_many(&contact["channels"])
        .into_iter()
        .find(|c| c["type"].as_str() == Some("email"))
        .and_then(|c| c["value"].as_str())
        .map(str::to_lowercase)
}

/// An import's per-contact refusal: consent states by eSputnik's words, the rest permanent.
fn refusal(error: &str) -> Outcome {
    let text = error.to_lowercase();
    let status = if text.contains("unsubscrib") {
        Some(ConsentStatus::Unsubscribed)
    } else if text.contains("spam") || text.contains("complain") {
        Some(ConsentStatus::Complained)
    } else if text.contains("bounce") || text.contains("blacklist") || text.contains("undeliver") {
        Some(ConsentStatus::Bounced)
    } else {
        None
    };
    match status {
        Some(status) => Outcome::Refused {
            status,
            message: error.to_string(),
        },
        None => Outcome::failed(error.to_string()),
    }
}

/// An additional field's value as eSputnik stores it: text, with dates as `YYYY-MM-DD`.
fn field_value(value: &Value, kind: Option<&str>) -> String {
    let Some(text) = kit::text(value) else {
        return String::new();
    };
    match kind {
        Some("DATE") if text.len() >= 10 && text.as_bytes()[4] == b'-' => text[..10].to_string(),
        Some("NUMBER") => text
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|n| n.fract() == 0.0 && n.abs() < 9.0e15)
            .map(|n| (n as i64).to_string())
            .unwrap_or(text),
        _ => text,
    }
}

/// The import's view of one member: channels, standard fields and additional fields.
fn contact(member: &Member, custom: &Map<String, Value>) -> Value {
    let mut channels = vec![json!({"type": "email", "value": member.address})];
    let mut contact = Map::new();
    let mut address = Map::new();
    let mut fields = Vec::new();
    for (name, value) in &member.fields {
        if let Some(field) = custom.get(name) {
            let kind = field["type"].as_str();
            fields.push(json!({"id": field["id"], "value": field_value(value, kind)}));
            continue;
        }
        let Some(value) = kit::text(value).filter(|v| !v.is_empty()) else {
            // Left out: a listed standard field without data is cleared by the import.
            continue;
        };
        match name.as_str() {
            "sms" => channels.push(json!({"type": "sms", "value": value})),
            part if ADDRESS_PARTS.contains(&part) => {
                address.insert(part.to_string(), json!(value));
            }
            other => {
                contact.insert(other.to_string(), json!(value));
            }
        }
    }
    contact.insert("channels".into(), Value::Array(channels));
    if !address.is_empty() {
        contact.insert("address".into(), Value::Object(address));
    }
    if !fields.is_empty() {
        contact.insert("fields".into(), Value::Array(fields));
    }
    Value::Object(contact)
}

impl Esputnik {
    fn new(config: &Config, brand: &'static str, default_base: &str) -> Esputnik {
        let key = config.secret("api_key").unwrap_or_default();
        Esputnik {
            brand,
            root: format!("{}/api", config.base_url(default_base)),
            authorization: format!("Basic {}", BASE64.encode(format!("pg_listsync:{key}"))),
            subscription_form: config
                .setting("subscription_form")
                .unwrap_or("pg_listsync")
                .to_string(),
            segment_ids: HashMap::new(),
        }
    }

    fn request(&self, method: Method, path: &str) -> Request {
        Request::new(method, format!("{}{path}", self.root))
            .header("authorization", self.authorization.clone())
            .header("accept", "application/json")
    }

    /// Sends and classifies: 401/403 → Auth, 408/429/5xx → Transient, and a 2xx whose body
    /// claims to be JSON but is not → Transient (a cut-off answer says nothing about whether
    /// the write happened).
    fn send(&self, http: &mut Http, operation: &str, request: Request) -> Result<Response> {
        let response = http.send(operation, request)?;
        response.check_common(Response::text_excerpt)?;
        let claims_json = response
            .header("content-type")
            .is_some_and(|t| t.to_ascii_lowercase().contains("json"));
        if response.is_success() && claims_json && !response.body.is_empty() {
            response.json()?;
        }
        Ok(response)
    }

    /// A call whose answer is needed: 2xx → JSON (malformed → Transient), 404 → `None`, any
    /// other status → Rejected with eSputnik's words.
    fn call(&self, http: &mut Http, operation: &str, request: Request) -> Result<Option<Value>> {
        let response = self.send(http, operation, request)?;
        match response.status {
            200..=299 => Ok(Some(response.json()?)),
            404 => Ok(None),
            _ => Err(rejected(&response)),
        }
    }

    /// A GET whose 404 reads as nothing found (`null`).
    fn get(&self, http: &mut Http, operation: &str, path: &str) -> Result<Value> {
        let found = self.call(http, operation, self.request(Method::Get, path))?;
        Ok(found.unwrap_or(Value::Null))
    }

    fn group_name(binding: &Binding) -> String {
        binding
            .remote
            .get("group_name")
            .and_then(Value::as_str)
            .unwrap_or(&binding.list_name)
            .to_string()
    }

    /// Segments, page by page, until `pick` finds one.
    fn find_group(
        &self,
        http: &mut Http,
        name: Option<&str>,
        pick: impl Fn(&Value) -> bool,
    ) -> Result<Option<Value>> {
        let mut start = 1;
        loop {
            let mut path = format!("/v1/groups?startindex={start}&maxrows={GROUP_PAGE}");
            if let Some(name) = name {
                path.push_str(&format!("&name={}", percent_encode(name)));
            }
            let page = self.get(http, "list segments", &path)?;
            let groups = one_or_many(&page);
            if let Some(found) = groups.iter().find(|g| pick(g)) {
                return Ok(Some((*found).clone()));
            }
            if groups.len() < GROUP_PAGE {
                return Ok(None);
            }
            start += groups.len();
        }
    }

    /// The static segment of exactly this name (the search matches parts of names).
    fn group_named(&self, http: &mut Http, name: &str) -> Result<Option<i64>> {
        let found = self.find_group(http, Some(name), |g| g["name"].as_str() == Some(name))?;
        match found {
            Some(group) if !is_static(&group) => Err(not_static(&group)),
            Some(group) => Ok(kit::numeric(&group["id"])),
            None => Ok(None),
        }
    }

    /// The segment a binding detaches from, if it exists yet.
    fn group_id(&mut self, http: &mut Http, binding: &Binding) -> Result<Option<i64>> {
        if let Some(id) = binding.remote.get("group_id").and_then(kit::numeric) {
            return Ok(Some(id));
        }
        if let Some(id) = binding.list_id.as_deref().and_then(|l| l.parse().ok()) {
            return Ok(Some(id));
        }
        let name = Self::group_name(binding);
        if let Some(id) = self.segment_ids.get(&name) {
            return Ok(Some(*id));
        }
        let found = self.group_named(http, &name)?;
        if let Some(id) = found {
            self.segment_ids.insert(name, id);
        }
        Ok(found)
    }

    /// Additional fields of the account (from its catalogs): id, key and name → id and type.
    fn resolve_fields(&self, http: &mut Http, wanted: &[&String]) -> Result<Map<String, Value>> {
        let catalogs = self.get(http, "list additional fields", "/v1/addressbooks")?;
        let mut known: Vec<(Vec<String>, Value)> = Vec::new();
        for book in one_or_many(&catalogs["addressBook"]) {
            for group in one_or_many(&book["fieldGroups"]) {
                for field in one_or_many(&group["fields"]) {
                    let names: Vec<String> = [&field["id"], &field["fieldKey"], &field["name"]]
                        .iter()
                        .filter_map(|v| match v {
                            Value::String(s) => Some(s.clone()),
                            Value::Number(n) => Some(n.to_string()),
                            _ => None,
                        })
                        .collect();
                    let described = json!({
                        "id": field["id"],
                        "type": field["description"]["type"],
                    });
                    known.push((names, described));
                }
            }
        }
        let mut resolved = Map::new();
        for name in wanted {
            let Some((_, field)) = known.iter().find(|(names, _)| names.contains(name)) else {
                // Listed by name, with the standard fields, which are mapped by name too.
                let additional = known
                    .iter()
                    .filter_map(|(names, _)| names.last().map(String::as_str));
                return Err(kit::unknown_field(
                    self.brand,
                    name,
                    STANDARD_FIELDS.into_iter().chain(additional),
                ));
            };
            resolved.insert((*name).clone(), field.clone());
        }
        Ok(resolved)
    }

    /// Contact ids for members: recorded ones, else looked up by address (`None`: no such
    /// contact).
    fn contact_ids(&self, http: &mut Http, members: &[Member]) -> Result<Vec<Option<i64>>> {
        let mut ids = Vec::with_capacity(members.len());
        for member in members {
            if let Some(id) = member.remote_id.as_deref().and_then(|r| r.parse().ok()) {
                ids.push(Some(id));
                continue;
            }
            let path = format!("/v1/contacts?email={}", percent_encode(&member.address));
            let found = self.get(http, "find contact", &path)?;
            let address = member.address.to_lowercase();
            ids.push(
                one_or_many(&found)
                    .into_iter()
                    .find(|c| email_of(c).as_deref() == Some(address.as_str()))
                    .and_then(|c| kit::numeric(&c["id"])),
            );
        }
        Ok(ids)
    }

    fn detach(&self, http: &mut Http, group: i64, contact_ids: &[i64]) -> Result<()> {
        for ids in contact_ids.chunks(DETACH_BATCH) {
            let Some(body) = detach_body(ids) else {
                continue;
            };
            let request = self
                .request(Method::Post, &format!("/v1/group/{group}/contacts/detach"))
                .json(&body);
            let response = self.send(http, "detach from segment", request)?;
            match response.status {
                200..=299 => {}
                404 => {
                    return Err(ProviderError::Binding(format!(
                        "segment {group} no longer exists at {}",
                        self.brand
                    )));
                }
                _ => return Err(rejected(&response)),
            }
        }
        Ok(())
    }

    /// `DELETE /api/v1/contact/{id}`, soft or (with `erase`) for good; a contact that is not
    /// there is what a deletion wants.
    fn delete_contacts(
        &self,
        http: &mut Http,
        members: &[Member],
        erase: bool,
    ) -> Result<Vec<Outcome>> {
        let ids = self.contact_ids(http, members)?;
        let mut outcomes = Vec::with_capacity(members.len());
        for id in ids {
            let Some(id) = id else {
                outcomes.push(Outcome::Removed);
                continue;
            };
            let request = self.request(Method::Delete, &format!("/v1/contact/{id}?erase={erase}"));
            let operation = if erase {
                "erase contact"
            } else {
                "delete contact"
            };
            let response = self.send(http, operation, request)?;
            outcomes.push(match response.status {
                200..=299 | 404 => Outcome::Removed,
                _ => Outcome::failed(http_words(&response)),
            });
        }
        Ok(outcomes)
    }

    /// The bulk import of one batch: per-member outcomes, in order.
    fn import(
        &self,
        http: &mut Http,
        binding: &Binding,
        members: &[&Member],
        status: MemberStatus,
    ) -> Result<Vec<Outcome>> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        let custom = custom_fields(binding);
        let mut contact_fields = vec!["email".to_string()];
        contact_fields.extend(
            binding
                .fields
                .iter()
                .filter(|f| !custom.contains_key(*f))
                .cloned(),
        );
        let custom_ids: Vec<Value> = custom.values().map(|f| f["id"].clone()).collect();
        let body = json!({
            "contacts": members.iter().map(|m| contact(m, &custom)).collect::<Vec<_>>(),
            "dedupeOn": "email",
            "contactFields": contact_fields,
            "customFieldsIDs": custom_ids,
            "groupNames": [Self::group_name(binding)],
            // A contact deleted when it left the filter comes back when it returns.
            "restoreDeleted": true,
        });
        let answer = self
            .call(
                http,
                "import contacts",
                self.request(Method::Post, "/v1/contacts").json(&body),
            )?
            .ok_or_else(|| {
                ProviderError::Rejected(format!("{} has no contact import here (404)", self.brand))
            })?;
        let refused: HashMap<String, String> = one_or_many(&answer["failedContacts"])
            .into_iter()
            .filter_map(|c| {
                let error = c["error"].as_str().unwrap_or("refused by the import");
                Some((email_of(c)?, error.to_string()))
            })
            .collect();
        let session = answer["asyncSessionId"].as_str().filter(|s| !s.is_empty());
        let import = match session {
            Some(session) => self.poll(http, session)?,
            None if refused.len() == members.len() => Import::Running,
            None => {
                return Err(ProviderError::Rejected(format!(
                    "{} started no import: {}",
                    self.brand,
                    answer["errorMessage"].as_str().unwrap_or("no reason given")
                )));
            }
        };
        Ok(members
            .iter()
            .map(|m| {
                let address = m.address.to_lowercase();
                if let Some(error) = refused.get(&address) {
                    return refusal(error);
                }
                match &import {
                    Import::Failed(message) => Outcome::retry(message.clone()),
                    Import::Finished(ids) => {
                        Outcome::member(status, ids.get(&address).map(i64::to_string))
                    }
                    Import::Running => Outcome::member(status, None),
                }
            })
            .collect())
    }

    fn poll(&self, http: &mut Http, session: &str) -> Result<Import> {
        let path = format!("/v1/importstatus/{}", percent_encode(session));
        for wait in POLL_WAITS {
            std::thread::sleep(wait);
            let answer = match self.call(http, "import status", self.request(Method::Get, &path)) {
                Ok(Some(answer)) => answer,
                // The import was accepted; not knowing how it went is not a reason to send it
                // again.
                Ok(None) | Err(ProviderError::Transient { .. }) => return Ok(Import::Running),
                Err(e) => return Err(e),
            };
            match answer["status"].as_str() {
                Some("FINISHED") => {
                    let ids = one_or_many(&answer["mapping"])
                        .into_iter()
                        .filter_map(|m| {
                            Some((
                                m["dedupeValue"].as_str()?.to_lowercase(),
                                kit::numeric(&m["contactId"])?,
                            ))
                        })
                        .collect();
                    return Ok(Import::Finished(ids));
                }
                Some("ERROR") => {
                    return Ok(Import::Failed(format!(
                        "{} import session {session} failed: {}",
                        self.brand,
                        answer["description"]
                            .as_str()
                            .unwrap_or("no description given")
                    )));
                }
                _ => {}
            }
        }
        Ok(Import::Running)
    }

    /// Double opt-in for a first-time member: `POST /api/v1/contact/subscribe` creates it
    /// unconfirmed (eSputnik's workflow on the form's event sends the confirmation).
    fn subscribe(&self, http: &mut Http, binding: &Binding, member: &Member) -> Result<Outcome> {
        let body = json!({
            "contact": contact(member, &custom_fields(binding)),
            "groups": [Self::group_name(binding)],
            "formType": self.subscription_form,
        });
        let request = self
            .request(Method::Post, "/v1/contact/subscribe")
            .json(&body);
        let response = self.send(http, "subscribe contact", request)?;
        match response.status {
            200..=299 => {}
            409 => {
                return Ok(Outcome::Retry {
                    message: format!(
                        "{} accepts one subscription per contact and minute",
                        self.brand
                    ),
                    retry_after: Some(SUBSCRIBE_COOLDOWN),
                });
            }
            _ => {
                return Ok(Outcome::failed(http_words(&response)));
            }
        }
        let answer = response.json()?;
        let remote_id = kit::numeric::<i64>(&answer["id"]).map(|id| id.to_string());
        Ok(match answer["emailStatus"].as_str() {
            Some("BLACKLISTED") => Outcome::Refused {
                status: ConsentStatus::Unsubscribed,
                message: format!(
                    "{} holds the address as blacklisted (unsubscribed, bounced or complained)",
                    self.brand
                ),
            },
            Some("SUBSCRIBED" | "ALREADY_SUBSCRIBED") => {
                Outcome::member(MemberStatus::Subscribed, remote_id)
            }
            _ => Outcome::member(MemberStatus::Pending, remote_id),
        })
    }
}

fn is_static(group: &Value) -> bool {
    group["type"]
        .as_str()
        .is_none_or(|t| t.eq_ignore_ascii_case("static"))
}

fn not_static(group: &Value) -> ProviderError {
    ProviderError::Binding(format!(
        "segment \"{}\" ({}) is {}, not static: only static segments hold a list",
        group["name"].as_str().unwrap_or(""),
        group["id"],
        group["type"].as_str().unwrap_or("of another type")
    ))
}

fn custom_fields(binding: &Binding) -> Map<String, Value> {
    binding
        .remote_object("custom_fields")
        .cloned()
        .unwrap_or_default()
}

/// eSputnik's answers carry no structured error: the status and the body's start say it.
fn http_words(response: &Response) -> String {
    format!("HTTP {}: {}", response.status, response.text_excerpt())
}

fn rejected(response: &Response) -> ProviderError {
    ProviderError::Rejected(http_words(response))
}

impl Provider for Esputnik {
    fn limits(&self) -> Limits {
        // Contact writes are limited to 200 requests per second per account.
        Limits::batches(IMPORT_BATCH, DETACH_BATCH).paced(200.0, 20.0)
    }

    fn check(&mut self, http: &mut Http) -> Result<Value> {
        let info = self.get(http, "account info", "/v1/account/info")?;
        Ok(json!({
            "provider": self.brand,
            "organisation": info["organisationName"],
        }))
    }

    fn prepare(&mut self, http: &mut Http, binding: &mut Binding) -> Result<()> {
        // Not kit::resolve_list: the API cannot create a segment, and the list id may be a name.
        let wanted = binding.list_id.clone().unwrap_or(binding.list_name.clone());
        let (list_id, name) = match wanted.trim().parse::<i64>() {
            Ok(id) => {
                let group = self
                    .find_group(http, None, |g| kit::numeric(&g["id"]) == Some(id))?
                    .ok_or_else(|| {
                        ProviderError::Binding(format!(
                            "segment {id} does not exist at {}",
                            self.brand
                        ))
                    })?;
                if !is_static(&group) {
                    return Err(not_static(&group));
                }
                let name = group["name"].as_str().unwrap_or_default().to_string();
                binding.remote.insert("group_id".into(), json!(id));
                (id.to_string(), name)
            }
            Err(_) => match self.group_named(http, &wanted)? {
                Some(id) => {
                    binding.remote.insert("group_id".into(), json!(id));
                    (id.to_string(), wanted)
                }
                None => {
                    // Created by the first import that names it.
                    binding.remote.remove("group_id");
                    (wanted.clone(), wanted)
                }
            },
        };
        let wanted_fields: Vec<&String> = binding
            .fields
            .iter()
            .filter(|f| !STANDARD_FIELDS.contains(&f.as_str()))
            .collect();
        let custom = if wanted_fields.is_empty() {
            Map::new()
        } else {
            self.resolve_fields(http, &wanted_fields)?
        };
        binding.list_id = Some(list_id);
        binding.remote.insert("group_name".into(), json!(name));
        binding.keep_remote("custom_fields", custom);
        Ok(())
    }

    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(members.len());
        let pending = binding.new_member_status == MemberStatus::Pending;
        // First-time members of a double opt-in binding are subscribed one by one; known
        // ones are updated by the import, which never asks them to confirm again.
        let (newcomers, known): (Vec<&Member>, Vec<&Member>) = members
            .iter()
            .partition(|m| pending && m.remote_id.is_none());
        let mut by_address: HashMap<&str, Outcome> = HashMap::new();
        // Once some subscriptions went through, a transient failure must not make the
        // engine send them again (each one can mail a confirmation request): the rest of
        // the members is retried item by item instead.
        let mut stalled: Option<Outcome> = None;
        for member in &newcomers {
            if let Some(retry) = &stalled {
                by_address.insert(&member.address, retry.clone());
                continue;
            }
            let outcome = match self.subscribe(http, binding, member) {
                Ok(outcome) => outcome,
                Err(ProviderError::Transient {
                    message,
                    retry_after,
                }) if !by_address.is_empty() => {
                    let retry = Outcome::Retry {
                        message,
                        retry_after,
                    };
                    stalled = Some(retry.clone());
                    retry
                }
                Err(e) => return Err(e),
            };
            by_address.insert(&member.address, outcome);
        }
        let imported = match stalled {
            Some(retry) => known.iter().map(|_| retry.clone()).collect(),
            None => match self.import(http, binding, &known, binding.new_member_status) {
                Ok(outcomes) => outcomes,
                Err(ProviderError::Transient {
                    message,
                    retry_after,
                }) if !by_address.is_empty() => known
                    .iter()
                    .map(|_| Outcome::Retry {
                        message: message.clone(),
                        retry_after,
                    })
                    .collect(),
                Err(e) => return Err(e),
            },
        };
        for (member, outcome) in known.iter().zip(imported) {
            by_address.insert(&member.address, outcome);
        }
        outcomes.extend(members.iter().map(|m| {
            by_address.remove(m.address.as_str()).unwrap_or_else(|| {
                Outcome::retry(format!("{} did not report this contact", self.brand))
            })
        }));
        Ok(outcomes)
    }

    fn remove(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        action: LeaveAction,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(members.len());
        match action {
            LeaveAction::Remove | LeaveAction::Unsubscribe => {
                if action == LeaveAction::Unsubscribe {
                    let emails: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
                    let request = self
                        .request(Method::Post, "/v1/emails/unsubscribed/add")
                        .json(&json!({ "emails": emails }));
                    let response = self.send(http, "unsubscribe contacts", request)?;
                    if !response.is_success() {
                        return Err(rejected(&response));
                    }
                }
                // No segment yet, or no such contact: nobody to detach, which is the goal.
                if let Some(group) = self.group_id(http, binding)? {
                    let ids: Vec<i64> = self
                        .contact_ids(http, members)?
                        .into_iter()
                        .flatten()
                        .collect();
                    self.detach(http, group, &ids)?;
                }
                outcomes.extend(members.iter().map(|_| Outcome::Removed));
            }
            LeaveAction::Delete => outcomes.extend(self.delete_contacts(http, members, false)?),
            LeaveAction::Archive => {
                return Err(ProviderError::Binding(format!(
                    "{} has no archive; use on_leave remove, unsubscribe or delete",
                    self.brand
                )));
            }
        }
        Ok(outcomes)
    }

    /// `DELETE /api/v1/contact/{id}?erase=true`: the contact's profile, activity and tracking
    /// data are wiped for good.
    fn erase(
        &mut self,
        http: &mut Http,
        _binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        self.delete_contacts(http, members, true)
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::providers::test_support::{config, member, refusal_status};

    #[test]
    fn an_empty_detach_is_never_sent() {
        // eSputnik detaches every contact of the segment when the body names none.
        assert_eq!(detach_body(&[]), None);
        assert_eq!(detach_body(&[7, 9]), Some(json!({"contactIds": [7, 9]})));
    }

    #[test]
    fn both_brands_share_everything_but_name_and_endpoint() {
        assert_eq!(ESPUTNIK.name, "esputnik");
        assert_eq!(YESPO.name, "yespo");
        assert_eq!(ESPUTNIK.capabilities.on_leave, YESPO.capabilities.on_leave);
        let config = config(json!({}), json!({"api_key": "k"}));
        assert_eq!(
            Esputnik::new(&config, "eSputnik", "https://esputnik.com").root,
            "https://esputnik.com/api"
        );
        assert_eq!(
            Esputnik::new(&config, "Yespo", "https://yespo.io").root,
            "https://yespo.io/api"
        );
        let authorization = Esputnik::new(&config, "Yespo", "https://yespo.io").authorization;
        let decoded = BASE64
            .decode(authorization.trim_start_matches("Basic "))
            .unwrap();
        assert!(String::from_utf8(decoded).unwrap().ends_with(":k"));
    }

    #[test]
    fn identity_fields_cannot_be_mapped() {
        assert!(field_name("email").is_err());
        assert!(field_name("externalCustomerId").is_err());
        assert!(field_name("firstName").is_ok());
        assert!(field_name("Loyalty level").is_ok());
    }

    #[test]
    fn contacts_carry_channels_address_and_additional_fields() {
        let custom: Map<String, Value> =
            serde_json::from_value(json!({"birthday": {"id": 77, "type": "DATE"}})).unwrap();
        let c = contact(
            &member(
                "ann@example.com",
                json!({"firstName": "Ann", "lastName": null, "sms": "+3801", "town": "Kyiv", "birthday": "1990-07-14T00:00:00"}),
            ),
            &custom,
        );
        assert_eq!(
            c,
            json!({
                "firstName": "Ann",
                "channels": [{"type": "email", "value": "ann@example.com"}, {"type": "sms", "value": "+3801"}],
                "address": {"town": "Kyiv"},
                "fields": [{"id": 77, "value": "1990-07-14"}],
            })
        );
    }

    #[test]
    fn import_refusals_are_read() {
        for (error, consent) in [
            (
                "Email is in the unsubscribed list",
                ConsentStatus::Unsubscribed,
            ),
            ("email is blacklisted (hard bounce)", ConsentStatus::Bounced),
            ("Contact complained: spam", ConsentStatus::Complained),
        ] {
            assert_eq!(refusal_status(&refusal(error)), Some(consent), "{error}");
        }
        assert!(matches!(refusal("Invalid email"), Outcome::Failed { .. }));
    }

    #[test]
    fn single_objects_count_as_lists() {
        let one = json!({"id": 5});
        assert_eq!(one_or_many(&one).len(), 1);
        assert_eq!(one_or_many(&json!([1, 2])).len(), 2);
        assert!(one_or_many(&Value::Null).is_empty());
        assert_eq!(field_value(&json!("12.0"), Some("NUMBER")), "12");
        assert_eq!(field_value(&json!(3.5), Some("DECIMAL")), "3.5");
        assert_eq!(field_value(&Value::Null, Some("TEXTFIELD")), "");
    }
}

#[cfg(test)]
mod fake {
    use super::*;
    use crate::providers::conformance::{Consent, Erasure, Fake, WRONG_SECRET, conformance_suite};
    use crate::providers::test_support;
    use crate::providers::test_support::{Bound, connected, http, refusal_status};
    use listsync_emulator::esputnik::Esputnik as Account;
    use listsync_emulator::{Emulator, Fault};

    fn provider(emulator: &Emulator, brand: &str, key: &str) -> Box<dyn Provider> {
        let config = test_support::config(
            json!({"base_url": emulator.base_url(brand)}),
            json!({"api_key": key}),
        );
        let spec = if brand == "yespo" { &YESPO } else { &ESPUTNIK };
        (spec.connect)(&config)
    }

    const KEY: &str = "secret-key";

    fn binding() -> Binding {
        test_support::binding(&["firstName", "town"])
    }

    fn member(address: &str, name: &str) -> Member {
        test_support::member(address, json!({"firstName": name, "town": "Kyiv"}))
    }

    /// Upserts and returns the members with the contact ids the import reported.
    fn delivered(s: &mut Bound, members: &[Member]) -> Vec<Member> {
        let outcomes = s.upsert(members);
        members
            .iter()
            .zip(outcomes)
            .map(|(m, o)| {
                let Outcome::Member { remote_id, .. } = o else {
                    panic!("{} not delivered: {o:?}", m.address);
                };
                Member {
                    remote_id,
                    ..m.clone()
                }
            })
            .collect()
    }

    #[test]
    fn the_segment_comes_with_the_first_import_and_is_found_by_name_later() {
        let (emulator, mut s) = Bound::new::<EsputnikBrand>();
        let es = emulator.esputnik();
        assert_eq!(
            s.binding.list_id.as_deref(),
            Some("vip (crm)"),
            "no segment yet"
        );
        assert!(es.groups().is_empty());
        delivered(&mut s, &[member("ann@example.com", "Ann")]);
        let id = es.group_id("vip (crm)").expect("created by the import");
        assert_eq!(emulator.list_members("esputnik", "vip (crm)").len(), 1);

        let mut again = binding();
        s.provider
            .prepare(&mut s.http, &mut again)
            .expect("a resync");
        assert_eq!(again.list_id, Some(id.to_string()), "a resync finds its id");
        let mut given = binding();
        given.list_id = Some(id.to_string());
        s.provider
            .prepare(&mut s.http, &mut given)
            .expect("an existing id");
        assert_eq!(given.remote["group_name"], "vip (crm)");

        given.list_id = Some("424242".into());
        let e = s.provider.prepare(&mut s.http, &mut given).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Binding(m) if m.contains("424242")),
            "{e:?}"
        );
        let dynamic = es.create_group("dynamic", false);
        given.list_id = Some(dynamic.to_string());
        let e = s.provider.prepare(&mut s.http, &mut given).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Binding(m) if m.contains("not static")),
            "{e:?}"
        );
        assert_eq!(
            s.provider.check(&mut s.http).unwrap()["provider"],
            "eSputnik"
        );
    }

    #[test]
    fn upsert_maps_standard_and_additional_fields_and_updates_them() {
        let (emulator, mut provider, mut http) = connected::<EsputnikBrand>();
        let es = emulator.esputnik();
        let birthday = es.add_field("Birthday", "DATE");
        es.add_field("Loyalty", "TEXTFIELD");
        let mut b = binding();
        b.fields.push("Birthday".into());
        provider.prepare(&mut http, &mut b).unwrap();
        assert_eq!(b.remote["custom_fields"]["Birthday"]["id"], birthday);
        let mut s = Bound {
            provider,
            http,
            binding: b,
        };
        let mut ann = member("ann@example.com", "Ann");
        ann.fields
            .insert("Birthday".into(), json!("1990-07-14T00:00:00"));
        let sent = delivered(&mut s, &[ann.clone()]);
        let contact = es.contact("ann@example.com").unwrap();
        assert_eq!(sent[0].remote_id, Some(contact.id.to_string()));
        assert_eq!(contact.fields["firstName"], "Ann");
        assert_eq!(contact.fields["town"], "Kyiv");
        assert_eq!(contact.fields["Birthday"], "1990-07-14");

        ann.fields.insert("firstName".into(), json!("Anna"));
        ann.fields.insert("town".into(), Value::Null);
        delivered(&mut s, &[ann]);
        let listed = emulator.list_members("esputnik", "vip (crm)");
        assert_eq!(listed["ann@example.com"]["firstName"], "Anna");
        assert!(
            !listed["ann@example.com"].contains_key("town"),
            "a null clears"
        );

        let mut unknown = binding();
        unknown.fields.push("Shoe size".into());
        let e = s.provider.prepare(&mut s.http, &mut unknown).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Binding(m) if m.contains("Shoe size") && m.contains("Loyalty")),
            "{e:?}"
        );
    }

    #[test]
    fn slow_and_failed_imports() {
        let (emulator, mut s) = Bound::new::<EsputnikBrand>();
        let es = emulator.esputnik();
        es.set_import_polls(2);
        let sent = delivered(&mut s, &[member("a@example.com", "A")]);
        assert!(sent[0].remote_id.is_some(), "finished within the polls");
        es.set_import_polls(50);
        let sent = delivered(&mut s, &[member("s@example.com", "S")]);
        assert_eq!(
            sent[0].remote_id, None,
            "still running: delivered, id unknown"
        );
        es.set_import_polls(0);
        es.fail_next_import("storage unavailable");
        let outcomes = s.upsert(&[member("f@example.com", "F")]);
        assert!(
            matches!(&outcomes[0], Outcome::Retry { message, .. } if message.contains("storage unavailable")),
            "{outcomes:?}"
        );
    }

    /// Unsubscribed members and refused addresses are the suite's; eSputnik's other consent
    /// states are refused per contact too.
    #[test]
    fn bounced_and_complained_contacts_are_refused() {
        let (emulator, mut s) = Bound::new::<EsputnikBrand>();
        let es = emulator.esputnik();
        let people = ["b@example.com", "c@example.com", "ok@example.com"];
        let members: Vec<Member> = people.iter().map(|a| member(a, "P")).collect();
        delivered(&mut s, &members);
        es.set_status("b@example.com", "bounced");
        es.set_status("c@example.com", "complained");
        let outcomes = s.upsert(&members);
        assert_eq!(refusal_status(&outcomes[0]), Some(ConsentStatus::Bounced));
        assert_eq!(
            refusal_status(&outcomes[1]),
            Some(ConsentStatus::Complained)
        );
        assert!(matches!(outcomes[2], Outcome::Member { .. }));
    }

    /// Erasure is the suite's.
    #[test]
    fn every_on_leave() {
        let (emulator, mut s) = Bound::new::<EsputnikBrand>();
        let es = emulator.esputnik();
        let everyone: Vec<Member> = [
            "r@example.com",
            "u@example.com",
            "d@example.com",
            "k@example.com",
            "stay@example.com",
        ]
        .iter()
        .map(|a| member(a, "X"))
        .collect();
        let mut sent = delivered(&mut s, &everyone);
        // A contact whose id was never recorded is found by its address.
        sent[0].remote_id = None;
        let group = es.group_id("vip (crm)").unwrap();
        let leave = |s: &mut Bound, action, m: &Member| {
            assert_eq!(
                s.remove(action, std::slice::from_ref(m)),
                vec![Outcome::Removed]
            );
        };
        leave(&mut s, LeaveAction::Remove, &sent[0]);
        assert!(!es.group_members(group).contains_key("r@example.com"));
        assert!(es.contact("r@example.com").is_some(), "the contact stays");
        leave(&mut s, LeaveAction::Unsubscribe, &sent[1]);
        assert!(es.unsubscribed().contains("u@example.com"));
        assert!(!es.group_members(group).contains_key("u@example.com"));
        leave(&mut s, LeaveAction::Delete, &sent[2]);
        assert!(es.contact("d@example.com").unwrap().deleted);

        // Leaving again, or leaving without ever having been there, detaches nobody: an
        // empty detach would have emptied the segment.
        let strangers = [member("never@example.com", "N"), sent[0].clone()];
        assert_eq!(
            s.remove(LeaveAction::Remove, &strangers),
            vec![Outcome::Removed; 2]
        );
        assert!(
            emulator
                .requests("esputnik")
                .iter()
                .all(|r| !r.path.ends_with("/detach") || r.body.contains("contactIds\":[")),
            "every detach named its contacts"
        );
        let listed = emulator.list_members("esputnik", &group.to_string());
        assert_eq!(
            listed.keys().collect::<Vec<_>>(),
            vec!["k@example.com", "stay@example.com"]
        );

        // A deleted contact comes back when it returns to the filter.
        let back = delivered(&mut s, &[member("d@example.com", "Back")]);
        assert_eq!(back[0].remote_id, sent[2].remote_id);
        assert!(!es.contact("d@example.com").unwrap().deleted);
    }

    #[test]
    fn removing_before_the_segment_exists_calls_nothing_destructive() {
        let (emulator, mut s) = Bound::new::<EsputnikBrand>();
        let outcomes = s.remove(LeaveAction::Remove, &[member("a@example.com", "A")]);
        assert_eq!(outcomes, vec![Outcome::Removed]);
        assert!(
            emulator
                .requests("esputnik")
                .iter()
                .all(|r| !r.path.contains("/detach"))
        );
    }

    #[test]
    fn double_opt_in_subscribes_newcomers_on_yespo() {
        let emulator = Emulator::start();
        let yespo = emulator.yespo();
        let mut provider = provider(&emulator, "yespo", "any");
        let mut http = http();
        let mut b = binding();
        b.new_member_status = MemberStatus::Pending;
        provider.prepare(&mut http, &mut b).unwrap();
        yespo.set_status("blocked@example.com", "unsubscribed");
        let outcomes = provider
            .upsert(
                &mut http,
                &b,
                &[
                    member("new@example.com", "N"),
                    member("blocked@example.com", "B"),
                ],
            )
            .unwrap();
        let contact = yespo.contact("new@example.com").unwrap();
        assert_eq!(contact.status, "unconfirmed");
        assert_eq!(
            outcomes[0],
            Outcome::Member {
                status: MemberStatus::Pending,
                remote_id: Some(contact.id.to_string())
            }
        );
        assert_eq!(
            refusal_status(&outcomes[1]),
            Some(ConsentStatus::Unsubscribed)
        );
        assert_eq!(yespo.subscriptions(), vec!["new@example.com".to_string()]);
        // Known members are updated by the import, without a second subscription.
        let known = Member {
            remote_id: Some(contact.id.to_string()),
            ..member("new@example.com", "Newer")
        };
        provider.upsert(&mut http, &b, &[known]).unwrap();
        assert_eq!(yespo.subscriptions().len(), 1);
        assert_eq!(
            yespo.contact("new@example.com").unwrap().fields["firstName"],
            "Newer"
        );
        assert_eq!(
            emulator.list_members("yespo", "vip (crm)").len(),
            1,
            "pending counts"
        );
        assert!(
            emulator.esputnik().groups().is_empty(),
            "the brands do not share state"
        );
        assert_eq!(provider.check(&mut http).unwrap()["provider"], "Yespo");
    }

    /// Preparing looks the segment up at eSputnik, so a wrong key stops a binding there
    /// already; the other calls are the suite's.
    #[test]
    fn a_wrong_key_fails_prepare() {
        let (emulator, _, mut http) = connected::<EsputnikBrand>();
        let mut wrong = provider(&emulator, "esputnik", WRONG_SECRET);
        let mut b = binding();
        assert!(matches!(
            wrong.prepare(&mut http, &mut b),
            Err(ProviderError::Auth(_))
        ));
    }

    #[test]
    fn partial_failures_never_repeat_what_went_through() {
        let emulator = Emulator::start();
        let es = emulator.esputnik();
        let mut provider = provider(&emulator, "esputnik", "k");
        let mut http = http();
        let mut b = binding();
        b.new_member_status = MemberStatus::Pending;
        provider.prepare(&mut http, &mut b).unwrap();
        let mut s = Bound {
            provider,
            http,
            binding: b,
        };
        let faults = emulator.faults("esputnik");

        // A subscription went through, then the import failed: only the import is retried.
        let known = Member {
            remote_id: Some("1".into()),
            ..member("known@example.com", "K")
        };
        faults.push(Fault::status(503).on_path("/api/v1/contacts"));
        let outcomes = s.upsert(&[member("new@example.com", "N"), known]);
        assert!(matches!(
            outcomes[0],
            Outcome::Member {
                status: MemberStatus::Pending,
                ..
            }
        ));
        assert!(matches!(outcomes[1], Outcome::Retry { .. }), "{outcomes:?}");
        assert_eq!(es.subscriptions().len(), 1);

        // An import whose status cannot be read was still accepted.
        s.binding.new_member_status = MemberStatus::Subscribed;
        faults.push(Fault::status(500).on_path("/importstatus"));
        let outcomes = s.upsert(&[member("s@example.com", "S")]);
        assert_eq!(
            outcomes,
            vec![Outcome::Member {
                status: MemberStatus::Subscribed,
                remote_id: None
            }]
        );

        // A cut-off answer to a detach is not taken for success.
        let sent = delivered(&mut s, &[member("d@example.com", "D")]);
        faults.push(Fault::MalformedJson.on_path("/detach"));
        let e = s
            .provider
            .remove(&mut s.http, &s.binding, LeaveAction::Remove, &sent)
            .unwrap_err();
        assert!(matches!(e, ProviderError::Transient { .. }), "{e:?}");
        assert!(
            emulator
                .list_members("esputnik", "vip (crm)")
                .contains_key("d@example.com")
        );
    }

    /// eSputnik and Yespo are one API under two brands, each with an account of its own at
    /// the emulator: the suite runs for both.
    trait Brand {
        const SPEC: &'static Spec;
        fn account(emulator: &Emulator) -> &Account;
    }

    struct EsputnikBrand;

    impl Brand for EsputnikBrand {
        const SPEC: &'static Spec = &ESPUTNIK;
        fn account(emulator: &Emulator) -> &Account {
            emulator.esputnik()
        }
    }

    struct YespoBrand;

    impl Brand for YespoBrand {
        const SPEC: &'static Spec = &YESPO;
        fn account(emulator: &Emulator) -> &Account {
            emulator.yespo()
        }
    }

    impl<B: Brand> Fake for B {
        const SPEC: &'static Spec = <B as Brand>::SPEC;

        fn connect(emulator: &Emulator) -> Box<dyn Provider> {
            B::account(emulator).set_api_key(KEY);
            provider(emulator, <B as Brand>::SPEC.name, KEY)
        }

        fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider> {
            provider(emulator, <B as Brand>::SPEC.name, WRONG_SECRET)
        }

        fn binding() -> Binding {
            binding()
        }

        fn member(address: &str) -> Member {
            member(address, "Ann")
        }

        fn refuse(emulator: &Emulator, address: &str) -> &'static str {
            B::account(emulator).reject_address(address, "Invalid email domain");
            "Invalid email domain"
        }

        fn knows(emulator: &Emulator, address: &str) -> bool {
            B::account(emulator).contact(address).is_some()
        }
    }

    impl<B: Brand> Consent for B {
        fn unsubscribe(emulator: &Emulator, _: &Binding, address: &str) {
            assert!(B::account(emulator).set_status(address, "unsubscribed"));
        }
    }

    impl<B: Brand> Erasure for B {
        /// Erased for good, not marked deleted as `on_leave` delete does.
        fn erased(emulator: &Emulator, address: &str) -> bool {
            B::account(emulator).erased().iter().any(|a| a == address)
        }
    }

    conformance_suite!(EsputnikBrand {
        consent: supported,
        erasure: supported
    });

    mod yespo {
        use super::*;

        conformance_suite!(YespoBrand {
            consent: supported,
            erasure: supported
        });
    }
}

#[cfg(test)]
mod contract {
    use super::*;
    use crate::providers::contract::{Prism, assert_all_valid};
    use crate::providers::test_support;

    fn binding(list_id: Option<&str>) -> Binding {
        Binding {
            list_id: list_id.map(str::to_string),
            remote: serde_json::from_value(json!({
                "group_id": 200400,
                "group_name": "vip (crm)",
                "custom_fields": {"Birthday": {"id": 79814, "type": "DATE"}},
            }))
            .unwrap(),
            ..test_support::binding(&["firstName", "town", "Birthday"])
        }
    }

    fn member(address: &str, remote_id: Option<&str>) -> Member {
        test_support::known_member(
            address,
            json!({"firstName": "Ann", "town": "Kyiv", "Birthday": "1990-07-14"}),
            remote_id,
        )
    }

    #[test]
    fn every_request_validates_against_the_yespo_spec() {
        let prism = Prism::start("yespo.prism.json");
        let mut http = prism.http();
        let config = test_support::config(
            json!({"base_url": prism.base_url}),
            json!({"api_key": "0123456789abcdef"}),
        );
        let mut provider = (YESPO.connect)(&config);
        provider.check(&mut http).expect("check");
        // The mock's segments are not ours: the first prepare waits for the import to
        // create the segment; the second looks up a given id.
        let mut created = binding(None);
        created.remote = Map::new();
        let _ = provider.prepare(&mut http, &mut created);
        let mut given = binding(Some("200400"));
        let _ = provider.prepare(&mut http, &mut given);

        let members = [
            member("ann@example.com", Some("12345")),
            member("bob@example.com", None),
        ];
        let b = binding(Some("200400"));
        provider.upsert(&mut http, &b, &members).expect("import");
        let mut pending = b.clone();
        pending.new_member_status = MemberStatus::Pending;
        provider
            .upsert(&mut http, &pending, &members)
            .expect("subscribe and import");
        for action in [
            LeaveAction::Remove,
            LeaveAction::Unsubscribe,
            LeaveAction::Delete,
        ] {
            provider
                .remove(&mut http, &b, action, &members)
                .expect("remove");
        }
        provider.erase(&mut http, &b, &members).expect("erase");
        assert_all_valid(&http.drain_records());
    }
}
