//! eSputnik / Yespo contacts API (one API, two brands), the subset pg_listsync uses. The same
//! type is registered twice, serving `/esputnik/api/v1/...` and `/yespo/api/v1/...` with
//! separate state.
//!
//! Field names follow `tests/contract/specs/yespo.prism.json`; behaviour follows Yespo's
//! documentation where it matters for list sync: Basic authentication with the API key as
//! password, the asynchronous bulk import (`POST /api/v1/contacts`, at most 3000 contacts,
//! `dedupeOn`, `contactFields`/`customFieldsIDs` deciding what is overwritten, segments named in
//! `groupNames` created on first use, `restoreDeleted`) with import sessions to poll, static
//! segments without a creation call, detach/attach by contact id (at most 500, and a detach
//! naming no contact empties the segment, as documented), the account-wide unsubscribed list,
//! soft and erasing deletes, the double opt-in `contact/subscribe` (409 when repeated within a
//! minute), and the "one object instead of a one-element array" answers.
//!
//! Assumptions where the documentation says nothing: the import refuses, in `failedContacts`,
//! contacts whose address is on the unsubscribed list or blacklisted (hard bounce, spam
//! complaint) and leaves them unchanged; a deleted contact leaves its segments.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Map, Value, json};

use crate::http::{Request, Response, reason_phrase};
use crate::mailchimp::is_valid_email;
use crate::provider::{Provider, admin_error, lock, opt_str, req_str};

/// Contacts per bulk import (documented maximum).
const MAX_IMPORT: usize = 3000;
/// Contact ids per attach/detach call, and rows per page (documented maxima).
const MAX_IDS: usize = 500;
const ADDRESS_PARTS: [&str; 4] = ["address", "town", "region", "postcode"];
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
/// Statuses a contact's address can have.
const STATUSES: [&str; 5] = [
    "active",
    "unconfirmed",
    "unsubscribed",
    "bounced",
    "complained",
];

/// A contact, as tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct Contact {
    pub id: i64,
    /// As first imported (case preserved).
    pub email: String,
    /// `active`, `unconfirmed` (double opt-in not confirmed), `unsubscribed`, `bounced` or
    /// `complained`.
    pub status: String,
    /// Standard fields by their API names (`firstName`, `town`, `sms`, ...), additional fields
    /// by their names.
    pub fields: Map<String, Value>,
    /// Soft-deleted (restorable by an import with `restoreDeleted`).
    pub deleted: bool,
}

/// A segment, as tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub id: i64,
    pub name: String,
    /// `Static` or `Dynamic`.
    pub kind: String,
    pub contact_ids: BTreeSet<i64>,
}

struct Field {
    id: i64,
    name: String,
    key: String,
    kind: String,
}

struct Session {
    polls_left: usize,
    error: Option<String>,
    mapping: Vec<(String, i64)>,
}

/// The eSputnik / Yespo fake. Obtain it with [`crate::Emulator::esputnik`] or
/// [`crate::Emulator::yespo`].
pub struct Esputnik {
    name: &'static str,
    state: Mutex<State>,
}

struct State {
    /// `None`: any credentials are accepted.
    api_key: Option<String>,
    contacts: BTreeMap<i64, Contact>,
    groups: BTreeMap<i64, Group>,
    /// The account's unsubscribed list (lower-cased addresses).
    unsubscribed: BTreeSet<String>,
    fields: Vec<Field>,
    sessions: BTreeMap<String, Session>,
    /// Status polls an import session answers `IMPORTING` before it is done.
    import_polls: usize,
    /// Descriptions for the next imports to end in `ERROR` (nothing applied).
    failing_imports: VecDeque<String>,
    /// Lower-cased address -> the error its import fails with.
    rejected: BTreeMap<String, String>,
    /// Lower-cased address -> last `contact/subscribe` call, for the one-per-minute rule.
    subscribed_at: BTreeMap<String, Instant>,
    subscribe_cooldown: Duration,
    /// Addresses of `contact/subscribe` calls that created or found a contact.
    subscriptions: Vec<String>,
    /// Addresses of contacts erased for good.
    erased: Vec<String>,
    next_id: i64,
}

impl Default for State {
    fn default() -> Self {
        State {
            api_key: None,
            contacts: BTreeMap::new(),
            groups: BTreeMap::new(),
            unsubscribed: BTreeSet::new(),
            fields: Vec::new(),
            sessions: BTreeMap::new(),
            import_polls: 0,
            failing_imports: VecDeque::new(),
            rejected: BTreeMap::new(),
            subscribed_at: BTreeMap::new(),
            subscribe_cooldown: Duration::from_secs(60),
            subscriptions: Vec::new(),
            erased: Vec::new(),
            next_id: 100_000,
        }
    }
}

fn text(status: u16, message: &str) -> Response {
    Response::new(status, "text/plain; charset=UTF-8", message.to_string())
}

fn ok_json(value: &Value) -> Response {
    Response::new(200, "application/json; charset=UTF-8", value.to_string())
}

/// eSputnik answers a one-element list with the element itself.
fn one_or_many(items: Vec<Value>) -> Value {
    if items.len() == 1 {
        items.into_iter().next().unwrap_or(Value::Null)
    } else {
        Value::Array(items)
    }
}

fn receiving(status: &str) -> bool {
    matches!(status, "active" | "unconfirmed")
}

fn email_of(contact: &Map<String, Value>) -> Option<String> {
    let channels = match contact.get("channels") {
        Some(Value::Array(items)) => items.clone(),
        Some(single @ Value::Object(_)) => vec![single.clone()],
        _ => Vec::new(),
    };
    channels
        .iter()
        .find(|c| c["type"].as_str() == Some("email"))
        .and_then(|c| c["value"].as_str())
        .map(|e| e.trim().to_string())
}

// ---------------------------------------------------------------------------------------------
// Public API for tests

impl Esputnik {
    /// A fake served under `/<name>/` (`esputnik` or `yespo`).
    pub(crate) fn new(name: &'static str) -> Esputnik {
        Esputnik {
            name,
            state: Mutex::new(State::default()),
        }
    }

    /// Require HTTP Basic authentication with this API key as the password (any user name).
    pub fn set_api_key(&self, key: &str) {
        lock(&self.state).api_key = Some(key.into());
    }

    /// Accept any credentials, or none (the default).
    pub fn accept_any_api_key(&self) {
        lock(&self.state).api_key = None;
    }

    /// Creates a segment (`Static`, or `Dynamic` when `is_static` is false); returns its id.
    pub fn create_group(&self, name: &str, is_static: bool) -> i64 {
        lock(&self.state).create_group(name, is_static)
    }

    pub fn group_id(&self, name: &str) -> Option<i64> {
        let st = lock(&self.state);
        st.groups.values().find(|g| g.name == name).map(|g| g.id)
    }

    pub fn groups(&self) -> Vec<Group> {
        lock(&self.state).groups.values().cloned().collect()
    }

    /// Defines an additional field (`TEXTFIELD`, `NUMBER`, `DATE`, ...); returns its id.
    pub fn add_field(&self, name: &str, kind: &str) -> i64 {
        let mut st = lock(&self.state);
        let id = st.next_id();
        st.fields.push(Field {
            id,
            name: name.into(),
            key: name.to_lowercase().replace(' ', "_"),
            kind: kind.into(),
        });
        id
    }

    /// The contact with this address (deleted ones included).
    pub fn contact(&self, email: &str) -> Option<Contact> {
        let st = lock(&self.state);
        st.find(email).map(|id| st.view(id))
    }

    /// Non-deleted contacts of a segment, by lower-cased address.
    pub fn group_members(&self, group: i64) -> BTreeMap<String, Contact> {
        let st = lock(&self.state);
        st.groups
            .get(&group)
            .into_iter()
            .flat_map(|g| g.contact_ids.iter())
            .map(|id| st.view(*id))
            .filter(|c| !c.deleted)
            .map(|c| (c.email.to_lowercase(), c))
            .collect()
    }

    /// Sets an address's status as if it happened at eSputnik. `unsubscribed` puts it on the
    /// unsubscribed list (no contact needed); the others need a contact. False otherwise.
    pub fn set_status(&self, email: &str, status: &str) -> bool {
        if !STATUSES.contains(&status) {
            return false;
        }
        let mut st = lock(&self.state);
        let key = email.trim().to_lowercase();
        if status == "unsubscribed" {
            st.unsubscribed.insert(key);
            return true;
        }
        st.unsubscribed.remove(&key);
        match st.find(&key) {
            Some(id) => {
                if let Some(c) = st.contacts.get_mut(&id) {
                    c.status = status.into();
                }
                true
            }
            None => false,
        }
    }

    /// The account's unsubscribed list.
    pub fn unsubscribed(&self) -> BTreeSet<String> {
        lock(&self.state).unsubscribed.clone()
    }

    /// Imports of this address fail for it (in `failedContacts`) with `message`.
    pub fn reject_address(&self, email: &str, message: &str) {
        lock(&self.state)
            .rejected
            .insert(email.trim().to_lowercase(), message.into());
    }

    /// Import sessions answer `IMPORTING` to this many status polls before `FINISHED`.
    pub fn set_import_polls(&self, polls: usize) {
        lock(&self.state).import_polls = polls;
    }

    /// The next import ends in `ERROR` with this description, applying nothing.
    pub fn fail_next_import(&self, description: &str) {
        lock(&self.state)
            .failing_imports
            .push_back(description.into());
    }

    /// How long a second `contact/subscribe` for one address gets 409 (default a minute).
    pub fn set_subscribe_cooldown(&self, cooldown: Duration) {
        lock(&self.state).subscribe_cooldown = cooldown;
    }

    /// Addresses passed to `contact/subscribe` (double opt-in requests), in order.
    pub fn subscriptions(&self) -> Vec<String> {
        lock(&self.state).subscriptions.clone()
    }

    /// Addresses of contacts erased for good.
    pub fn erased(&self) -> Vec<String> {
        lock(&self.state).erased.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Provider plumbing

impl Provider for Esputnik {
    fn name(&self) -> &'static str {
        self.name
    }

    fn handle(&self, req: &Request) -> Response {
        let mut st = lock(&self.state);
        if !st.authorized(req) {
            return text(401, "Unauthorized");
        }
        let segments = req.segments();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        let result = match segments.as_slice() {
            ["api", "v1", rest @ ..] => st.route(self.name, req, rest),
            _ => Err(text(404, "Not Found")),
        };
        result.unwrap_or_else(|response| response)
    }

    fn state_json(&self) -> Value {
        let st = lock(&self.state);
        let contacts: Map<String, Value> = st
            .contacts
            .keys()
            .map(|id| {
                let c = st.view(*id);
                (
                    id.to_string(),
                    json!({"email": c.email, "status": c.status, "fields": c.fields, "deleted": c.deleted}),
                )
            })
            .collect();
        let groups: Vec<Value> = st
            .groups
            .values()
            .map(|g| json!({"id": g.id, "name": g.name, "type": g.kind, "contacts": g.contact_ids}))
            .collect();
        json!({
            "api_key_required": st.api_key.is_some(),
            "contacts": contacts,
            "groups": groups,
            "unsubscribed": st.unsubscribed,
            "rejected": st.rejected,
            "erased": st.erased,
            "subscriptions": st.subscriptions,
        })
    }

    fn admin(&self, action: &str, body: &Value) -> Response {
        let empty = Map::new();
        let body = body.as_object().unwrap_or(&empty);
        let result = match action {
            "status" => {
                let (email, status) = (req_str(body, "email"), req_str(body, "status"));
                match (email, status) {
                    (Ok(email), Ok(status)) if self.set_status(email, status) => Ok(()),
                    (Ok(email), Ok(status)) => {
                        Err(format!("no contact {email}, or bad status {status:?}"))
                    }
                    (Err(e), _) | (_, Err(e)) => Err(e),
                }
            }
            "api_key" => opt_str(body, "key").map(|key| match key {
                Some(key) => self.set_api_key(key),
                None => self.accept_any_api_key(),
            }),
            "group" => req_str(body, "name").map(|name| {
                let is_static = body.get("static").and_then(Value::as_bool).unwrap_or(true);
                self.create_group(name, is_static);
            }),
            "field" => req_str(body, "name").and_then(|name| {
                let kind = opt_str(body, "type")?.unwrap_or("TEXTFIELD");
                self.add_field(name, kind);
                Ok(())
            }),
            "reject" => req_str(body, "email").and_then(|email| {
                self.reject_address(email, opt_str(body, "message")?.unwrap_or("Invalid email"));
                Ok(())
            }),
            "import_polls" => {
                let polls = body.get("polls").and_then(Value::as_u64).unwrap_or(0);
                self.set_import_polls(polls as usize);
                Ok(())
            }
            _ => Err(format!("unknown {} admin action {action:?}", self.name)),
        };
        match result {
            Ok(()) => Response::json(200, &self.state_json()),
            Err(message) => admin_error(400, &message),
        }
    }

    fn reset(&self) {
        *lock(&self.state) = State::default();
    }

    fn list_members(&self, list_id: &str) -> BTreeMap<String, Map<String, Value>> {
        let st = lock(&self.state);
        let group = match list_id.trim().parse::<i64>() {
            Ok(id) => st.groups.get(&id),
            Err(_) => st
                .groups
                .values()
                .find(|g| g.name == list_id && g.kind == "Static"),
        };
        group
            .into_iter()
            .flat_map(|g| g.contact_ids.iter())
            .map(|id| st.view(*id))
            .filter(|c| !c.deleted && receiving(&c.status))
            .map(|c| (c.email.to_lowercase(), c.fields))
            .collect()
    }

    fn error_response(&self, status: u16, _detail: &str) -> Response {
        match status {
            429 => text(
                429,
                "Too many requests: More than 200 requests per 1 second",
            ),
            _ => text(status, reason_phrase(status)),
        }
    }
}

impl State {
    fn next_id(&mut self) -> i64 {
        self.next_id += 1;
        self.next_id
    }

    fn authorized(&self, req: &Request) -> bool {
        let Some(expected) = &self.api_key else {
            return true;
        };
        req.header("authorization")
            .and_then(|h| h.strip_prefix("Basic "))
            .and_then(|b| {
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|raw| String::from_utf8(raw).ok())
            .is_some_and(|pair| pair.split_once(':').is_some_and(|(_, key)| key == expected))
    }

    fn create_group(&mut self, name: &str, is_static: bool) -> i64 {
        let id = self.next_id();
        self.groups.insert(
            id,
            Group {
                id,
                name: name.into(),
                kind: if is_static { "Static" } else { "Dynamic" }.into(),
                contact_ids: BTreeSet::new(),
            },
        );
        id
    }

    fn find(&self, email: &str) -> Option<i64> {
        let key = email.trim().to_lowercase();
        self.contacts
            .values()
            .find(|c| c.email.to_lowercase() == key)
            .map(|c| c.id)
    }

    /// A contact with its effective status (the unsubscribed list wins).
    fn view(&self, id: i64) -> Contact {
        let mut c = self.contacts[&id].clone();
        if self.unsubscribed.contains(&c.email.to_lowercase()) {
            c.status = "unsubscribed".into();
        }
        c
    }

    /// Why an address may not be imported, if it may not.
    fn refusal(&self, key: &str) -> Option<String> {
        if let Some(message) = self.rejected.get(key) {
            return Some(message.clone());
        }
        if self.unsubscribed.contains(key) {
            return Some("Email is in the unsubscribed list".into());
        }
        let id = self.find(key)?;
        match self.contacts[&id].status.as_str() {
            "bounced" => Some("Email is blacklisted (hard bounce)".into()),
            "complained" => Some("Email is blacklisted (spam complaint)".into()),
            _ => None,
        }
    }

    fn route(&mut self, brand: &str, req: &Request, path: &[&str]) -> Result<Response, Response> {
        match (req.method.as_str(), path) {
            ("GET", ["account", "info"]) => Ok(ok_json(
                &json!({"userEmail": "owner@example.com", "organisationName": format!("Emulated {brand}")}),
            )),
            ("GET", ["addressbooks"]) => Ok(ok_json(&self.catalog())),
            ("POST", ["contacts"]) => self.import(req),
            ("GET", ["contacts"]) => self.search_contacts(req),
            ("GET", ["importstatus", session]) => self.import_status(session),
            ("GET", ["groups"]) => self.search_groups(req),
            ("GET", ["group", id, "contacts"]) => self.group_contacts(id, req),
            ("POST", ["group", id, "contacts", action @ ("attach" | "detach")]) => {
                self.modify_group(id, action, req)
            }
            ("GET", ["contact", id]) => {
                let id = self.contact_id(id)?;
                Ok(ok_json(&self.contact_json(id)))
            }
            ("DELETE", ["contact", id]) => {
                let id = self.contact_id(id)?;
                let erase = req.query_param("erase").as_deref() == Some("true");
                self.delete(id, erase);
                Ok(ok_json(&json!("")))
            }
            ("POST", ["contact", "subscribe"]) => self.subscribe(req),
            ("POST", ["emails", "unsubscribed", action @ ("add" | "delete")]) => {
                let body = body_object(req)?;
                let emails = body
                    .get("emails")
                    .and_then(Value::as_array)
                    .ok_or_else(|| text(400, "emails is required"))?;
                for email in emails.iter().filter_map(Value::as_str) {
                    let key = email.trim().to_lowercase();
                    if *action == "add" {
                        self.unsubscribed.insert(key);
                    } else {
                        self.unsubscribed.remove(&key);
                    }
                }
                Ok(ok_json(&json!({})))
            }
            _ => Err(text(404, "Not Found")),
        }
    }

    fn contact_id(&self, id: &str) -> Result<i64, Response> {
        id.parse::<i64>()
            .ok()
            .filter(|id| self.contacts.contains_key(id))
            .ok_or_else(|| text(404, "Contact not found"))
    }

    fn catalog(&self) -> Value {
        let fields: Vec<Value> = self
            .fields
            .iter()
            .map(|f| json!({"id": f.id, "name": f.name, "fieldKey": f.key, "description": {"type": f.kind, "required": false, "readonly": false}}))
            .collect();
        json!({"addressBook": {
            "addressBookId": 1,
            "name": "Contacts",
            "fieldGroups": {"name": "Additional fields", "profileKey": "additional", "fields": one_or_many(fields)},
        }})
    }

    fn contact_json(&self, id: i64) -> Value {
        let c = self.view(id);
        let mut channels = vec![json!({"type": "email", "value": c.email})];
        let mut out = Map::new();
        let mut address = Map::new();
        let mut fields = Vec::new();
        for (name, value) in &c.fields {
            match name.as_str() {
                "sms" => channels.push(json!({"type": "sms", "value": value})),
                part if ADDRESS_PARTS.contains(&part) => {
                    address.insert(part.into(), value.clone());
                }
                standard if STANDARD_FIELDS.contains(&standard) => {
                    out.insert(standard.into(), value.clone());
                }
                custom => {
                    if let Some(f) = self.fields.iter().find(|f| f.name == custom) {
                        fields.push(json!({"id": f.id, "value": value}));
                    }
                }
            }
        }
        out.insert("id".into(), json!(c.id));
        out.insert("channels".into(), Value::Array(channels));
        if !address.is_empty() {
            out.insert("address".into(), Value::Object(address));
        }
        out.insert("fields".into(), Value::Array(fields));
        let groups: Vec<Value> = self
            .groups
            .values()
            .filter(|g| g.contact_ids.contains(&id))
            .map(|g| json!({"id": g.id, "name": g.name, "type": g.kind}))
            .collect();
        out.insert("groups".into(), Value::Array(groups));
        Value::Object(out)
    }

    /// The values a contact item sets: standard fields by name, additional ones by field name
    /// (`None` for an unknown additional field id).
    fn values_of(&self, item: &Map<String, Value>) -> Result<Map<String, Value>, String> {
        let mut values = Map::new();
        for name in ["firstName", "lastName", "languageCode", "timeZone"] {
            if let Some(v) = item.get(name).filter(|v| !v.is_null()) {
                values.insert(name.into(), v.clone());
            }
        }
        if let Some(Value::Object(address)) = item.get("address") {
            for part in ADDRESS_PARTS {
                if let Some(v) = address.get(part).filter(|v| !v.is_null()) {
                    values.insert(part.into(), v.clone());
                }
            }
        }
        if let Some(Value::Array(channels)) = item.get("channels")
            && let Some(sms) = channels.iter().find(|c| c["type"] == "sms")
        {
            values.insert("sms".into(), sms["value"].clone());
        }
        if let Some(Value::Array(fields)) = item.get("fields") {
            for field in fields {
                let id = field["id"].as_i64().unwrap_or_default();
                let def = self
                    .fields
                    .iter()
                    .find(|f| f.id == id)
                    .ok_or_else(|| format!("Unknown additional field id {}", field["id"]))?;
                values.insert(def.name.clone(), field["value"].clone());
            }
        }
        Ok(values)
    }

    /// `POST /api/v1/contacts`.
    fn import(&mut self, req: &Request) -> Result<Response, Response> {
        let body = body_object(req)?;
        let Some(Value::Array(items)) = body.get("contacts") else {
            return Err(text(400, "contacts is required"));
        };
        if items.len() > MAX_IMPORT {
            return Err(text(
                400,
                &format!("Too many contacts: at most {MAX_IMPORT} per request"),
            ));
        }
        match body.get("dedupeOn").and_then(Value::as_str) {
            Some("email") => {}
            Some(other) => {
                return Err(text(
                    400,
                    &format!("dedupeOn {other} is not modelled by the emulator"),
                ));
            }
            None => return Err(text(400, "dedupeOn is required")),
        }
        let strings = |key: &str| -> Option<Vec<String>> {
            body.get(key).and_then(Value::as_array).map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
        };
        let contact_fields = strings("contactFields");
        let custom_ids: Option<Vec<i64>> = body
            .get("customFieldsIDs")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect());
        let groups = strings("groupNames").unwrap_or_default();
        let excluded = strings("groupNamesExclude").unwrap_or_default();
        let restore = body.get("restoreDeleted").and_then(Value::as_bool) == Some(true);

        let mut failed = Vec::new();
        let mut accepted = Vec::new();
        for item in items {
            let Some(obj) = item.as_object() else {
                failed.push(json!({"channels": [], "error": "Contact must be an object"}));
                continue;
            };
            let fail = |error: &str| {
                let mut f = obj.clone();
                f.insert("error".into(), json!(error));
                Value::Object(f)
            };
            let Some(email) = email_of(obj).filter(|e| is_valid_email(e)) else {
                failed.push(fail("Invalid email"));
                continue;
            };
            if let Some(reason) = self.refusal(&email.to_lowercase()) {
                failed.push(fail(&reason));
                continue;
            }
            match self.values_of(obj) {
                Ok(values) => accepted.push((email, values)),
                Err(reason) => failed.push(fail(&reason)),
            }
        }
        let session = format!("session-{}", self.next_id());
        let error = self.failing_imports.pop_front();
        let mut mapping = Vec::new();
        if error.is_none() {
            for (email, values) in accepted {
                let id = self.upsert(&email, values, &contact_fields, &custom_ids, restore);
                for name in &groups {
                    let group = match self
                        .groups
                        .values()
                        .find(|g| &g.name == name && g.kind == "Static")
                    {
                        Some(g) => g.id,
                        None => self.create_group(name, true),
                    };
                    if let Some(g) = self.groups.get_mut(&group) {
                        g.contact_ids.insert(id);
                    }
                }
                for name in &excluded {
                    for g in self.groups.values_mut().filter(|g| &g.name == name) {
                        g.contact_ids.remove(&id);
                    }
                }
                mapping.push((email.to_lowercase(), id));
            }
        }
        self.sessions.insert(
            session.clone(),
            Session {
                polls_left: self.import_polls,
                error,
                mapping,
            },
        );
        let mut answer = json!({"asyncSessionId": session});
        if !failed.is_empty() {
            answer["failedContacts"] = one_or_many(failed);
        }
        Ok(ok_json(&answer))
    }

    /// Creates or updates one contact; `contact_fields`/`custom_ids` name what an update may
    /// overwrite (a listed field without a value is cleared), as the import does.
    fn upsert(
        &mut self,
        email: &str,
        values: Map<String, Value>,
        contact_fields: &Option<Vec<String>>,
        custom_ids: &Option<Vec<i64>>,
        restore: bool,
    ) -> i64 {
        let existing = self
            .find(email)
            .filter(|id| restore || !self.contacts[id].deleted);
        let Some(id) = existing else {
            if let Some(old) = self.find(email) {
                // A deleted contact that is not restored makes way for a new one.
                self.contacts.remove(&old);
            }
            let id = self.next_id();
            self.contacts.insert(
                id,
                Contact {
                    id,
                    email: email.to_string(),
                    status: "active".into(),
                    fields: values,
                    deleted: false,
                },
            );
            return id;
        };
        let custom_names: Vec<String> = match custom_ids {
            Some(ids) => self
                .fields
                .iter()
                .filter(|f| ids.contains(&f.id))
                .map(|f| f.name.clone())
                .collect(),
            None => Vec::new(),
        };
        let contact = self.contacts.get_mut(&id).expect("found above");
        contact.deleted = false;
        let standard: Vec<String> = match contact_fields {
            Some(names) => names
                .iter()
                .filter(|n| STANDARD_FIELDS.contains(&n.as_str()))
                .cloned()
                .collect(),
            None => STANDARD_FIELDS.iter().map(|s| s.to_string()).collect(),
        };
        for name in standard.iter().chain(custom_names.iter()) {
            match values.get(name) {
                Some(v) => contact.fields.insert(name.clone(), v.clone()),
                None => contact.fields.remove(name),
            };
        }
        id
    }

    fn import_status(&mut self, session: &str) -> Result<Response, Response> {
        let s = self
            .sessions
            .get_mut(session)
            .ok_or_else(|| text(404, "Import session not found"))?;
        let timestamp = "2024-01-01T00:00:00Z";
        if s.polls_left > 0 {
            s.polls_left -= 1;
            return Ok(ok_json(
                &json!({"status": "IMPORTING", "timestamp": timestamp}),
            ));
        }
        Ok(ok_json(&match &s.error {
            Some(description) => {
                json!({"status": "ERROR", "timestamp": timestamp, "description": description})
            }
            None => json!({
                "status": "FINISHED",
                "timestamp": timestamp,
                "mapping": one_or_many(s.mapping.iter().map(|(e, id)| json!({"dedupeValue": e, "contactId": id})).collect()),
            }),
        }))
    }

    fn page(req: &Request) -> Result<(usize, usize), Response> {
        let number = |name: &str, default: usize| match req.query_param(name) {
            None => Ok(default),
            Some(v) => v
                .parse::<usize>()
                .map_err(|_| text(400, &format!("{name} must be a number"))),
        };
        let start = number("startindex", 1)?.max(1);
        let rows = number("maxrows", MAX_IDS)?;
        if rows > MAX_IDS {
            return Err(text(400, &format!("maxrows must be at most {MAX_IDS}")));
        }
        Ok((start - 1, rows))
    }

    fn search_groups(&self, req: &Request) -> Result<Response, Response> {
        let (skip, rows) = Self::page(req)?;
        let name = req.query_param("name").map(|n| n.to_lowercase());
        let found: Vec<Value> = self
            .groups
            .values()
            .filter(|g| {
                name.as_ref()
                    .is_none_or(|n| g.name.to_lowercase().contains(n))
            })
            .skip(skip)
            .take(rows)
            .map(|g| json!({"id": g.id, "name": g.name, "type": g.kind}))
            .collect();
        Ok(ok_json(&Value::Array(found)))
    }

    fn search_contacts(&self, req: &Request) -> Result<Response, Response> {
        let (skip, rows) = Self::page(req)?;
        let email = req.query_param("email").map(|e| e.trim().to_lowercase());
        let found: Vec<Value> = self
            .contacts
            .values()
            .filter(|c| !c.deleted)
            .filter(|c| email.as_ref().is_none_or(|e| &c.email.to_lowercase() == e))
            .skip(skip)
            .take(rows)
            .map(|c| self.contact_json(c.id))
            .collect();
        let total = found.len();
        Ok(ok_json(&Value::Array(found)).with_header("TotalCount", total.to_string()))
    }

    fn group_contacts(&self, id: &str, req: &Request) -> Result<Response, Response> {
        let (skip, rows) = Self::page(req)?;
        let group = id
            .parse::<i64>()
            .ok()
            .and_then(|id| self.groups.get(&id))
            .ok_or_else(|| text(404, "Group not found"))?;
        let found: Vec<Value> = group
            .contact_ids
            .iter()
            .filter(|id| !self.contacts[id].deleted)
            .skip(skip)
            .take(rows)
            .map(|id| self.contact_json(*id))
            .collect();
        Ok(ok_json(&Value::Array(found)))
    }

    /// Attach or detach by contact ids. As documented, a detach naming no contact removes
    /// every contact from the segment.
    fn modify_group(
        &mut self,
        id: &str,
        action: &str,
        req: &Request,
    ) -> Result<Response, Response> {
        let group_id = id
            .parse::<i64>()
            .ok()
            .filter(|id| self.groups.contains_key(id))
            .ok_or_else(|| text(404, "Group not found"))?;
        let body = if req.body.iter().all(u8::is_ascii_whitespace) {
            Map::new()
        } else {
            body_object(req)?
        };
        let ids: Vec<i64> = body
            .get("contactIds")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        let external = body
            .get("externalCustomerIds")
            .and_then(Value::as_array)
            .map_or(0, Vec::len);
        if ids.len() > MAX_IDS || external > MAX_IDS {
            return Err(text(400, &format!("At most {MAX_IDS} ids per request")));
        }
        let known: Vec<i64> = ids
            .into_iter()
            .filter(|id| self.contacts.contains_key(id))
            .collect();
        let group = self.groups.get_mut(&group_id).expect("checked above");
        if group.kind != "Static" {
            return Err(text(400, "Only static segments can be modified"));
        }
        match action {
            "attach" => group.contact_ids.extend(known),
            _ if known.is_empty() && external == 0 => group.contact_ids.clear(),
            _ => {
                for id in known {
                    group.contact_ids.remove(&id);
                }
            }
        }
        Ok(ok_json(&json!("")))
    }

    fn delete(&mut self, id: i64, erase: bool) {
        for g in self.groups.values_mut() {
            g.contact_ids.remove(&id);
        }
        if erase {
            if let Some(c) = self.contacts.remove(&id) {
                self.erased.push(c.email.to_lowercase());
            }
        } else if let Some(c) = self.contacts.get_mut(&id) {
            c.deleted = true;
        }
    }

    /// `POST /api/v1/contact/subscribe`: the double opt-in entry point.
    fn subscribe(&mut self, req: &Request) -> Result<Response, Response> {
        let body = body_object(req)?;
        let contact = body
            .get("contact")
            .and_then(Value::as_object)
            .ok_or_else(|| text(400, "contact is required"))?;
        let email = email_of(contact)
            .filter(|e| is_valid_email(e))
            .ok_or_else(|| text(400, "Invalid email"))?;
        let key = email.to_lowercase();
        let now = Instant::now();
        if self
            .subscribed_at
            .get(&key)
            .is_some_and(|t| now.duration_since(*t) < self.subscribe_cooldown)
        {
            return Err(text(409, "Repeated request within 1 minute"));
        }
        self.subscribed_at.insert(key.clone(), now);
        let values = self.values_of(contact).map_err(|e| text(400, &e))?;
        let existing = self.find(&key).filter(|id| !self.contacts[id].deleted);
        if self.refusal(&key).is_some() {
            return Ok(ok_json(
                &json!({"id": existing, "emailStatus": "BLACKLISTED", "new": false}),
            ));
        }
        self.subscriptions.push(key.clone());
        let (id, status, new) = match existing {
            Some(id) => {
                let c = self.contacts.get_mut(&id).expect("found above");
                c.fields.extend(values);
                let status = if c.status == "unconfirmed" {
                    "NEED_CONFIRMATION"
                } else {
                    "ALREADY_SUBSCRIBED"
                };
                (id, status, false)
            }
            None => {
                if let Some(old) = self.find(&key) {
                    self.contacts.remove(&old);
                }
                let id = self.next_id();
                self.contacts.insert(
                    id,
                    Contact {
                        id,
                        email: email.clone(),
                        status: "unconfirmed".into(),
                        fields: values,
                        deleted: false,
                    },
                );
                (id, "NEED_CONFIRMATION", true)
            }
        };
        let names: Vec<String> = body
            .get("groups")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        for name in names {
            let group = match self
                .groups
                .values()
                .find(|g| g.name == name && g.kind == "Static")
            {
                Some(g) => g.id,
                None => self.create_group(&name, true),
            };
            if let Some(g) = self.groups.get_mut(&group) {
                g.contact_ids.insert(id);
            }
        }
        Ok(ok_json(
            &json!({"id": id, "emailStatus": status, "new": new}),
        ))
    }
}

fn body_object(req: &Request) -> Result<Map<String, Value>, Response> {
    match req.json() {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(text(400, "Bad request: the body must be a JSON object")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, body: &Value) -> Request {
        let body = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        let text = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        crate::http::read_request(
            &mut std::io::BufReader::new(text.as_bytes()),
            &mut Vec::new(),
        )
        .expect("a well-formed request")
    }

    fn import(fake: &Esputnik, emails: &[&str], group: &str) -> Value {
        let contacts: Vec<Value> = emails
            .iter()
            .map(|e| json!({"channels": [{"type": "email", "value": e}], "firstName": "F"}))
            .collect();
        let response = fake.handle(&request(
            "POST",
            "/api/v1/contacts",
            &json!({"contacts": contacts, "dedupeOn": "email", "groupNames": [group]}),
        ));
        assert_eq!(response.status, 200);
        serde_json::from_slice(&response.body).unwrap()
    }

    #[test]
    fn an_empty_detach_empties_the_segment() {
        let fake = Esputnik::new("esputnik");
        import(&fake, &["a@example.com", "b@example.com"], "vip");
        let group = fake.group_id("vip").expect("created by the import");
        assert_eq!(fake.group_members(group).len(), 2);
        let path = format!("/api/v1/group/{group}/contacts/detach");
        let response = fake.handle(&request("POST", &path, &json!({})));
        assert_eq!(response.status, 200);
        assert!(fake.group_members(group).is_empty(), "documented behaviour");
    }

    #[test]
    fn imports_refuse_unsubscribed_addresses_and_report_one_object() {
        let fake = Esputnik::new("yespo");
        fake.set_status("u@example.com", "unsubscribed");
        let answer = import(&fake, &["u@example.com", "ok@example.com"], "vip");
        assert_eq!(
            answer["failedContacts"]["error"],
            "Email is in the unsubscribed list"
        );
        assert!(fake.contact("u@example.com").is_none());
        assert_eq!(fake.contact("ok@example.com").unwrap().status, "active");
    }

    #[test]
    fn imports_are_limited_to_3000_contacts() {
        let fake = Esputnik::new("esputnik");
        let contacts: Vec<Value> = (0..3001)
            .map(|i| json!({"channels": [{"type": "email", "value": format!("p{i}@example.com")}]}))
            .collect();
        let response = fake.handle(&request(
            "POST",
            "/api/v1/contacts",
            &json!({"contacts": contacts, "dedupeOn": "email"}),
        ));
        assert_eq!(response.status, 400);
    }

    #[test]
    fn subscribing_twice_within_a_minute_conflicts() {
        let fake = Esputnik::new("esputnik");
        let body = json!({"contact": {"channels": [{"type": "email", "value": "d@example.com"}]}, "groups": ["vip"]});
        let first = fake.handle(&request("POST", "/api/v1/contact/subscribe", &body));
        let answer: Value = serde_json::from_slice(&first.body).unwrap();
        assert_eq!(answer["emailStatus"], "NEED_CONFIRMATION");
        assert_eq!(fake.contact("d@example.com").unwrap().status, "unconfirmed");
        let second = fake.handle(&request("POST", "/api/v1/contact/subscribe", &body));
        assert_eq!(second.status, 409);
    }
}
