//! Twilio SendGrid Marketing Campaigns, the list-sync subset, served under `/sendgrid/v3/...`.
//!
//! Paths, field names and answers follow the official OpenAPI descriptions vendored in
//! `tests/contract/specs/tsg_*.json`; behaviour follows the live API where list sync depends on
//! it: `PUT /v3/marketing/contacts` validates synchronously (400 with `errors[].field` naming
//! `contacts[N]...`) and applies asynchronously through an import job polled at
//! `GET /v3/marketing/contacts/imports/{id}` (`pending` → `completed` / `errored` / `failed`);
//! list removal and contact deletion need contact ids (`POST .../search/emails`, at most 100);
//! custom fields are addressed by field id; consent lives in account-wide suppression lists
//! (global unsubscribes, bounces, spam reports, invalid emails) that SendGrid does NOT enforce
//! on upsert, so the fake records every suppressed address that was upserted anyway
//! ([`SendGrid::suppressed_upserts`]) for tests to assert the sync never does it.
//!
//! Errors are `{"errors": [{"field", "message"}]}`; 401 `authorization required` on a wrong
//! key; 429 carries `X-RateLimit-Limit/Remaining/Reset` (Reset as an epoch timestamp, as in
//! SendGrid's rate-limit documentation), not `Retry-After`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use md5::{Digest, Md5};
use serde_json::{Map, Value, json};

use crate::http::{Request, Response, reason_phrase};
use crate::mailchimp::is_valid_email;
use crate::provider::{Provider, admin_error, lock, opt_str, req_str, unix_now};

/// Contacts per upsert request (documented maximum).
const MAX_UPSERT_CONTACTS: usize = 30_000;
/// Upsert request body limit (documented: 6 MB).
const MAX_UPSERT_BYTES: usize = 6 * 1024 * 1024;
/// Addresses per `search/emails` call.
const MAX_SEARCH_EMAILS: usize = 100;
/// Addresses per erasure job.
const MAX_ERASE_EMAILS: usize = 5_000;
/// Page size limit of the suppression list endpoints.
const MAX_SUPPRESSION_PAGE: usize = 500;
/// Writable reserved fields: set at the top level of a contact, by name.
const RESERVED_FIELDS: [&str; 13] = [
    "first_name",
    "last_name",
    "address_line_1",
    "address_line_2",
    "city",
    "state_province_region",
    "postal_code",
    "country",
    "phone_number",
    "whatsapp",
    "line",
    "facebook",
    "unique_name",
];
/// Reserved fields the API reports but does not let clients write.
const READ_ONLY_FIELDS: [(&str, &str); 4] = [
    ("email", "Text"),
    ("created_at", "Date"),
    ("updated_at", "Date"),
    ("contact_id", "Text"),
];
/// Suppression kinds, as the path segment under `/v3/suppression/`.
pub const SUPPRESSION_KINDS: [&str; 4] =
    ["unsubscribes", "bounces", "spam_reports", "invalid_emails"];

/// A Marketing Campaigns contact, as tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct Contact {
    pub id: String,
    /// Lower-cased, as SendGrid stores it.
    pub email: String,
    pub list_ids: BTreeSet<String>,
    /// Reserved fields set, by name.
    pub fields: Map<String, Value>,
    /// Custom fields set, by field id.
    pub custom_fields: Map<String, Value>,
}

/// A custom field definition.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldDefinition {
    pub id: String,
    pub name: String,
    /// `Text`, `Number` or `Date`.
    pub field_type: String,
}

/// The SendGrid fake. Obtain it with [`crate::Emulator::sendgrid`].
pub struct SendGrid {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// `None`: any key (or none) is accepted.
    api_key: Option<String>,
    /// id -> name.
    lists: BTreeMap<String, String>,
    /// Lower-cased address -> contact.
    contacts: BTreeMap<String, Contact>,
    fields: Vec<FieldDefinition>,
    jobs: BTreeMap<String, Job>,
    /// kind -> lower-cased address -> created (unix time).
    suppressions: BTreeMap<&'static str, BTreeMap<String, i64>>,
    /// Lower-cased address -> message: the import job reports the contact as errored.
    rejected: BTreeMap<String, String>,
    /// Status polls a new import job answers `pending` before it is applied.
    job_polls: u32,
    erased: Vec<String>,
    suppressed_upserts: Vec<String>,
    next_id: u64,
}

/// The contacts of an upsert job, validated, with the lists they join.
struct Upsert {
    list_ids: Vec<String>,
    changes: Vec<Map<String, Value>>,
}

/// An asynchronous job (upsert, delete, list removal, erasure).
struct Job {
    job_type: &'static str,
    status: &'static str,
    polls_left: u32,
    /// For a pending upsert: what to apply.
    upsert: Option<Upsert>,
    results: Map<String, Value>,
}

impl SendGrid {
    pub(crate) fn new() -> SendGrid {
        SendGrid {
            state: Mutex::new(State::default()),
        }
    }

    /// Require this API key (`Authorization: Bearer <key>`); others get 401.
    pub fn set_api_key(&self, key: &str) {
        lock(&self.state).api_key = Some(key.to_string());
    }

    /// Accept any API key, or none (the default).
    pub fn accept_any_api_key(&self) {
        lock(&self.state).api_key = None;
    }

    /// Creates a list; returns its id.
    pub fn create_list(&self, name: &str) -> String {
        let mut st = lock(&self.state);
        let id = st.uuid();
        st.lists.insert(id.clone(), name.to_string());
        id
    }

    /// All lists: id -> name.
    pub fn lists(&self) -> BTreeMap<String, String> {
        lock(&self.state).lists.clone()
    }

    /// Defines a custom field (`Text`, `Number` or `Date`); returns its id.
    pub fn add_field(&self, name: &str, field_type: &str) -> String {
        lock(&self.state).define_field(name, field_type)
    }

    pub fn fields(&self) -> Vec<FieldDefinition> {
        lock(&self.state).fields.clone()
    }

    /// Puts an address on a suppression list as if it happened at SendGrid: `unsubscribed`
    /// (global unsubscribe), `bounced`, `spam_report` or `invalid`. False for another status.
    pub fn set_status(&self, email: &str, status: &str) -> bool {
        let kind = match status {
            "unsubscribed" | "unsubscribes" => "unsubscribes",
            "bounced" | "bounces" => "bounces",
            "spam_report" | "spam_reports" | "complained" => "spam_reports",
            "invalid" | "invalid_emails" => "invalid_emails",
            _ => return false,
        };
        lock(&self.state)
            .suppressions
            .entry(kind)
            .or_default()
            .insert(email.trim().to_lowercase(), unix_now());
        true
    }

    /// Removes an address from every suppression list (the recipient asked to be mailed again).
    pub fn clear_status(&self, email: &str) {
        let email = email.trim().to_lowercase();
        for list in lock(&self.state).suppressions.values_mut() {
            list.remove(&email);
        }
    }

    /// The suppression kinds holding an address (`unsubscribes`, `bounces`, ...).
    pub fn suppressions_of(&self, email: &str) -> Vec<&'static str> {
        let email = email.trim().to_lowercase();
        lock(&self.state)
            .suppressions
            .iter()
            .filter(|(_, list)| list.contains_key(&email))
            .map(|(kind, _)| *kind)
            .collect()
    }

    /// The import job reports this address as errored (it is not upserted) with `message`.
    pub fn reject_address(&self, email: &str, message: &str) {
        lock(&self.state)
            .rejected
            .insert(email.trim().to_lowercase(), message.to_string());
    }

    /// How many status polls a new import job stays `pending` (default 0: it is applied at
    /// once and the first poll sees the result).
    pub fn set_job_polls(&self, polls: u32) {
        lock(&self.state).job_polls = polls;
    }

    /// One contact, by address (any case).
    pub fn contact(&self, email: &str) -> Option<Contact> {
        lock(&self.state)
            .contacts
            .get(&email.trim().to_lowercase())
            .cloned()
    }

    /// All contacts, by lower-cased address.
    pub fn contacts(&self) -> BTreeMap<String, Contact> {
        lock(&self.state).contacts.clone()
    }

    /// Contacts on a list, by lower-cased address (suppressed ones included).
    pub fn list_contacts(&self, list_id: &str) -> BTreeMap<String, Contact> {
        lock(&self.state)
            .contacts
            .iter()
            .filter(|(_, c)| c.list_ids.contains(list_id))
            .map(|(k, c)| (k.clone(), c.clone()))
            .collect()
    }

    /// Addresses sent to `POST /v3/recipients/erasejob`.
    pub fn erased(&self) -> Vec<String> {
        lock(&self.state).erased.clone()
    }

    /// Suppressed addresses that an import job upserted anyway (SendGrid allows it; the sync
    /// must not do it).
    pub fn suppressed_upserts(&self) -> Vec<String> {
        lock(&self.state).suppressed_upserts.clone()
    }

    /// Import jobs still pending.
    pub fn pending_jobs(&self) -> usize {
        lock(&self.state)
            .jobs
            .values()
            .filter(|j| j.status == "pending")
            .count()
    }

    fn admin_action(&self, action: &str, body: &Map<String, Value>) -> Result<(), String> {
        match action {
            "api_key" => match opt_str(body, "key")? {
                Some(key) => self.set_api_key(key),
                None => self.accept_any_api_key(),
            },
            "list" => {
                self.create_list(req_str(body, "name")?);
            }
            "field" => {
                let field_type = opt_str(body, "type")?.unwrap_or("Text");
                if !["Text", "Number", "Date"].contains(&field_type) {
                    return Err(format!(
                        "type must be Text, Number or Date, not {field_type:?}"
                    ));
                }
                self.add_field(req_str(body, "name")?, field_type);
            }
            "status" => {
                let (email, status) = (req_str(body, "email")?, req_str(body, "status")?);
                if !self.set_status(email, status) {
                    return Err(format!(
                        "status must be unsubscribed, bounced, spam_report or invalid, not {status:?}"
                    ));
                }
            }
            "reject" => self.reject_address(
                req_str(body, "email")?,
                opt_str(body, "message")?.unwrap_or("rejected"),
            ),
            "job_polls" => {
                let polls = body
                    .get("polls")
                    .and_then(Value::as_u64)
                    .ok_or("polls must be a non-negative integer")?;
                self.set_job_polls(polls.min(u32::MAX as u64) as u32);
            }
            _ => return Err(format!("unknown sendgrid admin action {action:?}")),
        }
        Ok(())
    }
}

impl Provider for SendGrid {
    fn name(&self) -> &'static str {
        "sendgrid"
    }

    fn handle(&self, req: &Request) -> Response {
        let mut st = lock(&self.state);
        if !authorized(st.api_key.as_deref(), req) {
            return errors(401, None, "authorization required");
        }
        st.route(req)
    }

    fn state_json(&self) -> Value {
        let st = lock(&self.state);
        let contacts: Map<String, Value> = st
            .contacts
            .iter()
            .map(|(email, c)| {
                (
                    email.clone(),
                    json!({"id": c.id, "list_ids": c.list_ids, "fields": c.fields, "custom_fields": c.custom_fields}),
                )
            })
            .collect();
        let jobs: Map<String, Value> = st
            .jobs
            .iter()
            .map(|(id, j)| {
                (
                    id.clone(),
                    json!({"job_type": j.job_type, "status": j.status}),
                )
            })
            .collect();
        json!({
            "api_key_required": st.api_key.is_some(),
            "lists": st.lists,
            "contacts": contacts,
            "field_definitions": st.fields.iter().map(|f| json!({"id": f.id, "name": f.name, "field_type": f.field_type})).collect::<Vec<_>>(),
            "suppressions": st.suppressions,
            "jobs": jobs,
            "rejected": st.rejected,
            "job_polls": st.job_polls,
            "erased": st.erased,
            "suppressed_upserts": st.suppressed_upserts,
        })
    }

    fn admin(&self, action: &str, body: &Value) -> Response {
        let empty = Map::new();
        let body = body.as_object().unwrap_or(&empty);
        match self.admin_action(action, body) {
            Ok(()) => Response::json(200, &self.state_json()),
            Err(message) => admin_error(400, &message),
        }
    }

    fn reset(&self) {
        *lock(&self.state) = State::default();
    }

    fn list_members(&self, list_id: &str) -> BTreeMap<String, Map<String, Value>> {
        let st = lock(&self.state);
        st.contacts
            .values()
            .filter(|c| c.list_ids.contains(list_id) && !st.suppressed(&c.email))
            .map(|c| {
                let mut fields = c.fields.clone();
                for (id, value) in &c.custom_fields {
                    let name = st
                        .fields
                        .iter()
                        .find(|f| &f.id == id)
                        .map_or(id.clone(), |f| f.name.clone());
                    fields.insert(name, value.clone());
                }
                (c.email.clone(), fields)
            })
            .collect()
    }

    fn error_response(&self, status: u16, detail: &str) -> Response {
        match status {
            429 => {
                let reset = unix_now() + 1;
                errors(429, None, "too many requests")
                    .with_header("X-RateLimit-Limit", "600")
                    .with_header("X-RateLimit-Remaining", "0")
                    .with_header("X-RateLimit-Reset", reset.to_string())
            }
            500..=599 => errors(status, None, reason_phrase(status)),
            _ => errors(status, None, detail),
        }
    }
}

/// `Authorization: Bearer <key>`.
fn authorized(expected: Option<&str>, req: &Request) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    req.header("authorization")
        .and_then(|h| h.split_once(' '))
        .is_some_and(|(scheme, key)| {
            scheme.eq_ignore_ascii_case("bearer") && key.trim() == expected
        })
}

/// SendGrid's error document.
fn errors(status: u16, field: Option<&str>, message: &str) -> Response {
    Response::json(
        status,
        &json!({"errors": [{"field": field, "message": message}]}),
    )
}

fn many_errors(status: u16, items: Vec<(String, String)>) -> Response {
    let items: Vec<Value> = items
        .into_iter()
        .map(|(field, message)| json!({"field": field, "message": message}))
        .collect();
    Response::json(status, &json!({"errors": items}))
}

fn body_object(req: &Request) -> Result<Map<String, Value>, Response> {
    match req.json() {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(errors(400, None, "request body must be a JSON object")),
        Err(_) => Err(errors(400, None, "invalid JSON")),
    }
}

fn string_array(body: &Map<String, Value>, key: &str) -> Result<Vec<String>, Response> {
    match body.get(key) {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| errors(400, Some(key), "must be an array of strings"))
            })
            .collect(),
        _ => Err(errors(
            400,
            Some(key),
            &format!("{key} is required and must be an array"),
        )),
    }
}

impl State {
    fn uuid(&mut self) -> String {
        self.next_id += 1;
        let hex: String = Md5::digest(format!("sendgrid-{}", self.next_id).as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }

    fn define_field(&mut self, name: &str, field_type: &str) -> String {
        if let Some(existing) = self
            .fields
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
        {
            return existing.id.clone();
        }
        self.next_id += 1;
        let suffix = match field_type {
            "Number" => "N",
            "Date" => "D",
            _ => "T",
        };
        let id = format!("e{}_{suffix}", self.next_id);
        self.fields.push(FieldDefinition {
            id: id.clone(),
            name: name.to_string(),
            field_type: field_type.to_string(),
        });
        id
    }

    fn suppressed(&self, email: &str) -> bool {
        self.suppressions.values().any(|l| l.contains_key(email))
    }

    fn route(&mut self, req: &Request) -> Response {
        let segments = req.segments();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (req.method.as_str(), segments.as_slice()) {
            ("GET", ["v3", "marketing", "lists"]) => self.get_lists(req),
            ("POST", ["v3", "marketing", "lists"]) => self.create_list(req),
            ("GET", ["v3", "marketing", "lists", id]) => match self.lists.get(*id) {
                Some(name) => Response::json(200, &self.list_json(id, name)),
                None => errors(404, None, "resource not found"),
            },
            ("DELETE", ["v3", "marketing", "lists", id, "contacts"]) => {
                self.remove_from_list(id, req)
            }
            ("GET", ["v3", "marketing", "field_definitions"]) => self.field_definitions(),
            ("POST", ["v3", "marketing", "field_definitions"]) => self.create_field(req),
            ("PUT", ["v3", "marketing", "contacts"]) => self.upsert(req),
            ("DELETE", ["v3", "marketing", "contacts"]) => self.delete_contacts(req),
            ("POST", ["v3", "marketing", "contacts", "search", "emails"]) => self.search(req),
            ("GET", ["v3", "marketing", "contacts", "imports", id]) => self.job_status(id),
            ("GET", ["v3", "suppression", kind]) => self.suppression_list(kind, req),
            ("POST", ["v3", "asm", "suppressions", "global"]) => self.add_global(req),
            ("GET", ["v3", "asm", "suppressions", "global", email]) => {
                let email = email.trim().to_lowercase();
                let held = self
                    .suppressions
                    .get("unsubscribes")
                    .is_some_and(|l| l.contains_key(&email));
                Response::json(
                    200,
                    &if held {
                        json!({"recipient_email": email})
                    } else {
                        json!({})
                    },
                )
            }
            ("POST", ["v3", "recipients", "erasejob"]) => self.erase(req),
            _ => errors(404, None, "resource not found"),
        }
    }

    fn list_json(&self, id: &str, name: &str) -> Value {
        let count = self
            .contacts
            .values()
            .filter(|c| c.list_ids.contains(id))
            .count();
        json!({
            "id": id,
            "name": name,
            "contact_count": count,
            "_metadata": {"self": format!("https://api.sendgrid.com/v3/marketing/lists/{id}")},
        })
    }

    /// `page_token` is the offset of the page, opaque to clients.
    fn get_lists(&self, req: &Request) -> Response {
        let size = match req.query_param("page_size").map(|v| v.parse::<usize>()) {
            None => 100,
            Some(Ok(n)) if (1..=1000).contains(&n) => n,
            Some(_) => {
                return errors(
                    400,
                    Some("page_size"),
                    "page_size must be between 1 and 1000",
                );
            }
        };
        let offset = match req.query_param("page_token").filter(|t| !t.is_empty()) {
            None => 0,
            Some(token) => match token.parse::<usize>() {
                Ok(n) => n,
                Err(_) => return errors(400, Some("page_token"), "invalid page_token"),
            },
        };
        let result: Vec<Value> = self
            .lists
            .iter()
            .skip(offset)
            .take(size)
            .map(|(id, name)| self.list_json(id, name))
            .collect();
        let base = "https://api.sendgrid.com/v3/marketing/lists";
        let mut metadata = json!({
            "self": format!("{base}?page_size={size}&page_token={offset}"),
            "count": self.lists.len(),
        });
        if offset + size < self.lists.len() {
            metadata["next"] = json!(format!(
                "{base}?page_size={size}&page_token={}",
                offset + size
            ));
        }
        Response::json(200, &json!({"result": result, "_metadata": metadata}))
    }

    fn create_list(&mut self, req: &Request) -> Response {
        let body = match body_object(req) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let Some(name) = body.get("name").and_then(Value::as_str) else {
            return errors(400, Some("name"), "name is required");
        };
        if name.is_empty() || name.chars().count() > 100 {
            return errors(400, Some("name"), "name must be 1 to 100 characters");
        }
        if self.lists.values().any(|n| n == name) {
            return errors(400, Some("name"), "list name already exists");
        }
        let id = self.uuid();
        self.lists.insert(id.clone(), name.to_string());
        Response::json(201, &self.list_json(&id, name))
    }

    fn remove_from_list(&mut self, list_id: &str, req: &Request) -> Response {
        if !self.lists.contains_key(list_id) {
            return errors(404, None, "list not found");
        }
        let Some(ids) = req.query_param("contact_ids").filter(|v| !v.is_empty()) else {
            return errors(400, Some("contact_ids"), "contact_ids is required");
        };
        let ids: Vec<&str> = ids.split(',').map(str::trim).collect();
        if ids
            .iter()
            .any(|id| !self.contacts.values().any(|c| c.id == *id))
        {
            return errors(404, None, "one or more contact IDs do not exist");
        }
        for contact in self.contacts.values_mut() {
            if ids.contains(&contact.id.as_str()) {
                contact.list_ids.remove(list_id);
            }
        }
        let job = self.finished_job("delete", json!({"requested_count": ids.len()}));
        Response::json(202, &json!({"job_id": job}))
    }

    fn field_definitions(&self) -> Response {
        let mut reserved: Vec<Value> = RESERVED_FIELDS
            .iter()
            .enumerate()
            .map(|(i, name)| json!({"id": format!("_rf{i}_T"), "name": name, "field_type": "Text"}))
            .collect();
        for (i, (name, field_type)) in READ_ONLY_FIELDS.iter().enumerate() {
            let n = RESERVED_FIELDS.len() + i;
            reserved.push(json!({"id": format!("_rf{n}_{}", &field_type[..1]), "name": name, "field_type": field_type, "read_only": true}));
        }
        let custom: Vec<Value> = self
            .fields
            .iter()
            .map(|f| json!({"id": f.id, "name": f.name, "field_type": f.field_type}))
            .collect();
        Response::json(
            200,
            &json!({
                "custom_fields": custom,
                "reserved_fields": reserved,
                "_metadata": {"self": "https://api.sendgrid.com/v3/marketing/field_definitions"},
            }),
        )
    }

    fn create_field(&mut self, req: &Request) -> Response {
        let body = match body_object(req) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let (Some(name), Some(field_type)) = (
            body.get("name").and_then(Value::as_str),
            body.get("field_type").and_then(Value::as_str),
        ) else {
            return errors(400, None, "name and field_type are required");
        };
        if !["Text", "Number", "Date"].contains(&field_type) {
            return errors(
                400,
                Some("field_type"),
                "field_type must be Text, Number or Date",
            );
        }
        if RESERVED_FIELDS.contains(&name) || READ_ONLY_FIELDS.iter().any(|(n, _)| *n == name) {
            return errors(
                400,
                Some("name"),
                "a custom field cannot use a reserved field name",
            );
        }
        let id = self.define_field(name, field_type);
        Response::json(
            200,
            &json!({"id": id, "name": name, "field_type": field_type}),
        )
    }

    /// Synchronous validation, then an import job.
    fn upsert(&mut self, req: &Request) -> Response {
        if req.body.len() > MAX_UPSERT_BYTES {
            return errors(413, None, "request body is larger than 6 MB");
        }
        let body = match body_object(req) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let list_ids = match body.get("list_ids") {
            None | Some(Value::Null) => Vec::new(),
            Some(_) => match string_array(&body, "list_ids") {
                Ok(ids) => ids,
                Err(r) => return r,
            },
        };
        if let Some(missing) = list_ids.iter().find(|id| !self.lists.contains_key(*id)) {
            return errors(
                404,
                Some("list_ids"),
                &format!("list {missing} does not exist"),
            );
        }
        let Some(Value::Array(contacts)) = body.get("contacts") else {
            return errors(400, Some("contacts"), "contacts is required");
        };
        if contacts.is_empty() || contacts.len() > MAX_UPSERT_CONTACTS {
            return errors(
                400,
                Some("contacts"),
                &format!("contacts must hold between 1 and {MAX_UPSERT_CONTACTS} items"),
            );
        }
        let mut problems = Vec::new();
        let mut changes = Vec::with_capacity(contacts.len());
        for (i, contact) in contacts.iter().enumerate() {
            match self.check_contact(contact) {
                Ok(change) => changes.push(change),
                Err(items) => problems.extend(
                    items
                        .into_iter()
                        .map(|(field, message)| (format!("contacts[{i}]{field}"), message)),
                ),
            }
        }
        if !problems.is_empty() {
            return many_errors(400, problems);
        }
        let polls = self.job_polls;
        let id = self.uuid();
        let mut job = Job {
            job_type: "upsert",
            status: "pending",
            polls_left: polls,
            upsert: Some(Upsert { list_ids, changes }),
            results: Map::new(),
        };
        if polls == 0 {
            self.apply(&mut job);
        }
        self.jobs.insert(id.clone(), job);
        Response::json(
            202,
            &json!({"job_id": id, "_metadata": {"self": format!("https://api.sendgrid.com/v3/marketing/contacts/imports/{id}")}}),
        )
    }

    /// One contact of an upsert: `(field suffix, message)` problems, or the normalised change.
    fn check_contact(&self, contact: &Value) -> Result<Map<String, Value>, Vec<(String, String)>> {
        let Some(obj) = contact.as_object() else {
            return Err(vec![(String::new(), "must be an object".into())]);
        };
        let mut problems = Vec::new();
        let mut change = obj.clone();
        match obj.get("email").and_then(Value::as_str) {
            Some(email) if is_valid_email(email.trim()) => {}
            Some(_) => problems.push((".email".into(), "email is invalid".into())),
            None => problems.push((".email".into(), "email is required".into())),
        }
        for (key, value) in obj {
            match key.as_str() {
                "email" => {}
                "custom_fields" => {
                    let Some(custom) = value.as_object() else {
                        problems.push((".custom_fields".into(), "must be an object".into()));
                        continue;
                    };
                    let unknown: Vec<&str> = custom
                        .keys()
                        .filter(|id| !self.fields.iter().any(|f| &f.id == *id))
                        .map(String::as_str)
                        .collect();
                    if !unknown.is_empty() {
                        problems.push((
                            ".custom_fields".into(),
                            format!("invalid custom field ids supplied - {}", unknown.join(",")),
                        ));
                    }
                    let mut normalised = Map::new();
                    for (id, v) in custom {
                        let Some(def) = self.fields.iter().find(|f| &f.id == id) else {
                            continue;
                        };
                        match field_value(&def.field_type, v) {
                            Ok(v) => {
                                normalised.insert(id.clone(), v);
                            }
                            Err(message) => {
                                problems.push((format!(".custom_fields.{id}"), message))
                            }
                        }
                    }
                    change.insert("custom_fields".into(), Value::Object(normalised));
                }
                name if RESERVED_FIELDS.contains(&name) => {
                    if !(value.is_string() || value.is_null()) {
                        problems.push((format!(".{name}"), "must be a string".into()));
                    }
                }
                other => problems.push((
                    format!(".{other}"),
                    "is not a writable contact field".into(),
                )),
            }
        }
        if problems.is_empty() {
            Ok(change)
        } else {
            Err(problems)
        }
    }

    /// Applies an upsert job's contacts and sets its final status.
    fn apply(&mut self, job: &mut Job) {
        let Some(Upsert { list_ids, changes }) = job.upsert.take() else {
            return;
        };
        let (mut created, mut updated, mut errored) = (0, 0, 0);
        for change in &changes {
            let email = change["email"].as_str().unwrap_or("").trim().to_lowercase();
            if self.rejected.contains_key(&email) {
                errored += 1;
                continue;
            }
            if self.suppressed(&email) {
                self.suppressed_upserts.push(email.clone());
            }
            if !self.contacts.contains_key(&email) {
                let id = self.uuid();
                self.contacts.insert(
                    email.clone(),
                    Contact {
                        id,
                        email: email.clone(),
                        list_ids: BTreeSet::new(),
                        fields: Map::new(),
                        custom_fields: Map::new(),
                    },
                );
                created += 1;
            } else {
                updated += 1;
            }
            let contact = self.contacts.get_mut(&email).expect("inserted above");
            contact.list_ids.extend(list_ids.iter().cloned());
            for (key, value) in change {
                match key.as_str() {
                    "email" => {}
                    "custom_fields" => {
                        for (id, v) in value.as_object().into_iter().flatten() {
                            contact.custom_fields.insert(id.clone(), v.clone());
                        }
                    }
                    name => {
                        contact.fields.insert(name.to_string(), value.clone());
                    }
                }
            }
        }
        job.status = match errored {
            0 => "completed",
            n if n == changes.len() => "failed",
            _ => "errored",
        };
        job.results = json!({
            "requested_count": changes.len(),
            "created_count": created,
            "updated_count": updated,
            "errored_count": errored,
        })
        .as_object()
        .cloned()
        .unwrap_or_default();
        if errored > 0 {
            let errors_url = format!(
                "https://sendgrid-emulator.invalid/errors/{}.csv",
                self.next_id
            );
            job.results.insert("errors_url".into(), json!(errors_url));
        }
    }

    fn job_status(&mut self, id: &str) -> Response {
        let Some(mut job) = self.jobs.remove(id) else {
            return errors(404, None, "job not found");
        };
        if job.status == "pending" {
            job.polls_left = job.polls_left.saturating_sub(1);
            if job.polls_left == 0 {
                self.apply(&mut job);
            }
        }
        let answer = json!({
            "id": id,
            "status": job.status,
            "job_type": job.job_type,
            "results": job.results,
            "started_at": "2024-01-01T00:00:00Z",
        });
        self.jobs.insert(id.to_string(), job);
        Response::json(200, &answer)
    }

    fn finished_job(&mut self, job_type: &'static str, results: Value) -> String {
        let id = self.uuid();
        self.jobs.insert(
            id.clone(),
            Job {
                job_type,
                status: "completed",
                polls_left: 0,
                upsert: None,
                results: results.as_object().cloned().unwrap_or_default(),
            },
        );
        id
    }

    fn delete_contacts(&mut self, req: &Request) -> Response {
        let all = req.query_param("delete_all_contacts").as_deref() == Some("true");
        let ids = req.query_param("ids").filter(|v| !v.is_empty());
        let deleted = match (all, ids) {
            (true, None) => {
                let n = self.contacts.len();
                self.contacts.clear();
                n
            }
            (false, Some(ids)) => {
                let ids: BTreeSet<&str> = ids.split(',').map(str::trim).collect();
                let before = self.contacts.len();
                self.contacts.retain(|_, c| !ids.contains(c.id.as_str()));
                before - self.contacts.len()
            }
            _ => {
                return errors(
                    400,
                    None,
                    "set either ids or delete_all_contacts=true, not both",
                );
            }
        };
        let job = self.finished_job("delete", json!({"deleted_count": deleted}));
        Response::json(202, &json!({"job_id": job}))
    }

    fn search(&self, req: &Request) -> Response {
        let body = match body_object(req) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let emails = match string_array(&body, "emails") {
            Ok(e) => e,
            Err(r) => return r,
        };
        if emails.len() > MAX_SEARCH_EMAILS {
            return errors(
                400,
                Some("emails"),
                &format!("at most {MAX_SEARCH_EMAILS} emails per request"),
            );
        }
        let invalid: Vec<(String, String)> = emails
            .iter()
            .enumerate()
            .filter(|(_, e)| !e.is_empty() && !is_valid_email(e.trim()))
            .map(|(i, e)| (format!("emails[{i}]"), format!("{e} is not a valid email")))
            .collect();
        if !invalid.is_empty() {
            return many_errors(400, invalid);
        }
        let mut result = Map::new();
        let mut found = 0;
        for email in emails.iter().filter(|e| !e.is_empty()) {
            let key = email.trim().to_lowercase();
            let entry = match self.contacts.get(&key) {
                Some(c) => {
                    found += 1;
                    let mut contact = json!({
                        "id": c.id,
                        "email": c.email,
                        "list_ids": c.list_ids,
                        "segment_ids": [],
                        "custom_fields": c.custom_fields,
                        "created_at": "2024-01-01T00:00:00Z",
                        "updated_at": "2024-01-01T00:00:00Z",
                    });
                    for (k, v) in &c.fields {
                        contact[k] = v.clone();
                    }
                    json!({"contact": contact})
                }
                None => json!({"error": "contact not found"}),
            };
            result.insert(key, entry);
        }
        if found == 0 {
            return errors(404, None, "No contacts found");
        }
        Response::json(200, &json!({"result": result}))
    }

    fn suppression_list(&self, kind: &str, req: &Request) -> Response {
        let Some(kind) = SUPPRESSION_KINDS.iter().find(|k| **k == kind) else {
            return errors(404, None, "resource not found");
        };
        let number = |name: &str| -> Result<Option<i64>, Response> {
            match req.query_param(name).filter(|v| !v.is_empty()) {
                None => Ok(None),
                Some(v) => v
                    .parse::<i64>()
                    .map(Some)
                    .map_err(|_| errors(400, Some(name), &format!("{name} must be an integer"))),
            }
        };
        let (start, end, limit, offset) = match (
            number("start_time"),
            number("end_time"),
            number("limit"),
            number("offset"),
        ) {
            (Ok(s), Ok(e), Ok(l), Ok(o)) => (s, e, l, o),
            (Err(r), ..) | (_, Err(r), ..) | (_, _, Err(r), _) | (.., Err(r)) => return r,
        };
        let limit = limit.unwrap_or(MAX_SUPPRESSION_PAGE as i64);
        if !(1..=MAX_SUPPRESSION_PAGE as i64).contains(&limit) {
            return errors(400, Some("limit"), "limit must be between 1 and 500");
        }
        let prefix = req.query_param("email").unwrap_or_default().to_lowercase();
        let mut entries: Vec<(&String, &i64)> = self
            .suppressions
            .get(kind)
            .into_iter()
            .flatten()
            .filter(|(email, created)| {
                start.is_none_or(|s| **created >= s)
                    && end.is_none_or(|e| **created <= e)
                    && email.starts_with(&prefix)
            })
            .collect();
        entries.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let page: Vec<Value> = entries
            .into_iter()
            .skip(offset.unwrap_or(0).max(0) as usize)
            .take(limit as usize)
            .map(|(email, created)| match *kind {
                "bounces" => json!({"created": created, "email": email, "reason": "550 5.1.1 user unknown", "status": "5.1.1"}),
                "spam_reports" => json!({"created": created, "email": email, "ip": "192.0.2.1"}),
                "invalid_emails" => json!({"created": created, "email": email, "reason": "Mail domain mentioned in email address is unknown"}),
                _ => json!({"created": created, "email": email}),
            })
            .collect();
        Response::json(200, &Value::Array(page))
    }

    fn add_global(&mut self, req: &Request) -> Response {
        let body = match body_object(req) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let emails = match string_array(&body, "recipient_emails") {
            Ok(e) => e,
            Err(r) => return r,
        };
        if let Some(bad) = emails.iter().find(|e| !is_valid_email(e.trim())) {
            return errors(
                400,
                Some("recipient_emails"),
                &format!("{bad} is not a valid email"),
            );
        }
        let now = unix_now();
        let list = self.suppressions.entry("unsubscribes").or_default();
        for email in &emails {
            list.entry(email.trim().to_lowercase()).or_insert(now);
        }
        Response::json(201, &json!({"recipient_emails": emails}))
    }

    fn erase(&mut self, req: &Request) -> Response {
        let body = match body_object(req) {
            Ok(b) => b,
            Err(r) => return r,
        };
        let emails = match string_array(&body, "email_addresses") {
            Ok(e) => e,
            Err(r) => return r,
        };
        if emails.is_empty() || emails.len() > MAX_ERASE_EMAILS {
            return errors(
                400,
                Some("email_addresses"),
                &format!("email_addresses must hold between 1 and {MAX_ERASE_EMAILS} addresses"),
            );
        }
        let invalid: Vec<(String, String)> = emails
            .iter()
            .filter(|e| !is_valid_email(e.trim()))
            .map(|e| {
                (
                    "email_addresses".to_string(),
                    format!("Email_address {e} is not valid"),
                )
            })
            .collect();
        if !invalid.is_empty() {
            return many_errors(400, invalid);
        }
        for email in &emails {
            let key = email.trim().to_lowercase();
            self.contacts.remove(&key);
            self.erased.push(key);
        }
        let job = self.uuid();
        Response::json(202, &json!({"job_id": job}))
    }
}

/// A custom field value checked against its type and stored as SendGrid returns it: numbers
/// (sent as numbers or numeric strings) as numbers; `""` clears any field.
fn field_value(field_type: &str, value: &Value) -> Result<Value, String> {
    match (field_type, value) {
        (_, Value::String(s)) if s.is_empty() => Ok(value.clone()),
        ("Number", Value::Number(_)) => Ok(value.clone()),
        ("Number", Value::String(s)) => {
            let s = s.trim();
            s.parse::<i64>()
                .map(Value::from)
                .ok()
                .or_else(|| {
                    s.parse::<f64>()
                        .ok()
                        .and_then(serde_json::Number::from_f64)
                        .map(Value::Number)
                })
                .ok_or_else(|| "must be a number".to_string())
        }
        ("Number", _) => Err("must be a number".into()),
        ("Date", Value::String(s)) if is_us_date(s) => Ok(value.clone()),
        ("Date", _) => Err("must be a date in MM/DD/YYYY format".into()),
        (_, Value::String(_)) => Ok(value.clone()),
        _ => Err("must be a string".into()),
    }
}

/// `MM/DD/YYYY`.
fn is_us_date(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 3
        && parts[0].len() == 2
        && parts[1].len() == 2
        && parts[2].len() == 4
        && parts.iter().all(|p| p.chars().all(|c| c.is_ascii_digit()))
        && parts[0].parse::<u32>().is_ok_and(|m| (1..=12).contains(&m))
        && parts[1].parse::<u32>().is_ok_and(|d| (1..=31).contains(&d))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, query: &str, body: Value) -> Request {
        let raw = format!(
            "{method} {path}?{query} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{}",
            body.to_string().len(),
            body
        );
        crate::http::read_request(
            &mut std::io::BufReader::new(raw.as_bytes()),
            &mut Vec::new(),
        )
        .expect("a valid request")
    }

    fn call(sg: &SendGrid, method: &str, path: &str, query: &str, body: Value) -> (u16, Value) {
        let r = sg.handle(&request(method, path, query, body));
        (
            r.status,
            serde_json::from_slice(&r.body).unwrap_or(Value::Null),
        )
    }

    #[test]
    fn upsert_is_validated_then_applied_by_a_job() {
        let sg = SendGrid::new();
        let list = sg.create_list("vip");
        let city = sg.add_field("city_code", "Number");
        let (status, body) = call(
            &sg,
            "PUT",
            "/v3/marketing/contacts",
            "",
            json!({"list_ids": [list], "contacts": [{"email": "Ann@Example.com", "first_name": "Ann", "custom_fields": {city.clone(): 7}}, {"email": "bad"}]}),
        );
        assert_eq!(status, 400);
        assert_eq!(body["errors"][0]["field"], "contacts[1].email");
        assert!(sg.contacts().is_empty());

        sg.set_job_polls(2);
        let (status, body) = call(
            &sg,
            "PUT",
            "/v3/marketing/contacts",
            "",
            json!({"list_ids": [list], "contacts": [{"email": "Ann@Example.com", "first_name": "Ann", "custom_fields": {city: 7}}]}),
        );
        assert_eq!(status, 202);
        let job = body["job_id"].as_str().unwrap().to_string();
        let path = format!("/v3/marketing/contacts/imports/{job}");
        assert_eq!(
            call(&sg, "GET", &path, "", Value::Null).1["status"],
            "pending"
        );
        assert_eq!(
            call(&sg, "GET", &path, "", Value::Null).1["status"],
            "completed"
        );
        let members = sg.list_members(&list);
        assert_eq!(members["ann@example.com"]["first_name"], "Ann");
        assert_eq!(members["ann@example.com"]["city_code"], 7);
    }

    #[test]
    fn suppressed_contacts_are_not_list_members_and_are_recorded() {
        let sg = SendGrid::new();
        let list = sg.create_list("vip");
        assert!(sg.set_status("bob@example.com", "bounced"));
        call(
            &sg,
            "PUT",
            "/v3/marketing/contacts",
            "",
            json!({"list_ids": [list], "contacts": [{"email": "bob@example.com"}]}),
        );
        assert!(sg.list_members(&list).is_empty());
        assert_eq!(sg.suppressed_upserts(), vec!["bob@example.com"]);
        let (status, page) = call(
            &sg,
            "GET",
            "/v3/suppression/bounces",
            "limit=10",
            Value::Null,
        );
        assert_eq!(status, 200);
        assert_eq!(page[0]["email"], "bob@example.com");
    }

    #[test]
    fn search_limits_and_not_found() {
        let sg = SendGrid::new();
        let emails: Vec<String> = (0..101).map(|i| format!("u{i}@example.com")).collect();
        let (status, _) = call(
            &sg,
            "POST",
            "/v3/marketing/contacts/search/emails",
            "",
            json!({"emails": emails}),
        );
        assert_eq!(status, 400);
        let (status, body) = call(
            &sg,
            "POST",
            "/v3/marketing/contacts/search/emails",
            "",
            json!({"emails": ["x@example.com"]}),
        );
        assert_eq!(status, 404);
        assert!(body["errors"].is_array());
    }

    #[test]
    fn wrong_key_is_401() {
        let sg = SendGrid::new();
        sg.set_api_key("SG.right");
        let (status, body) = call(&sg, "GET", "/v3/marketing/lists", "", Value::Null);
        assert_eq!(status, 401);
        assert_eq!(body["errors"][0]["message"], "authorization required");
    }

    #[test]
    fn us_dates() {
        assert!(is_us_date("07/14/1990"));
        assert!(!is_us_date("1990-07-14"));
        assert!(!is_us_date("13/01/1990"));
    }
}
