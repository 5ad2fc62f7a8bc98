//! Unisender (API 1.0, `api.unisender.com/{lang}/api/{method}?format=json`), the list-sync
//! subset, served under `/unisender/{lang}/api/{method}`.
//!
//! Modelled after unisender.com/en/support/api: parameters come form-encoded (query string or
//! POST body; `api_key` among them), and every answer is HTTP 200 with either `{"result": ...}`
//! or `{"error": "<message>", "code": "<code>"}` — a wrong key is `invalid_api_key`, a throttled
//! one `api_call_limit_exceeded_for_api_key`. Contacts have an account-wide status (`new`,
//! `invited`, `active`, `inactive`, `unsubscribed`, `blocked`, `activation_requested`), an
//! availability, and per-list entries (`active` or `unsubscribed`).
//!
//! Methods: `getLists`, `createList` (titles are unique), `getFields`, `getContact`,
//! `importContacts` (at most 500 rows; never changes the status of an unsubscribed or blocked
//! contact, never re-adds it to a list it unsubscribed from; per-row problems in `log`),
//! `subscribe` (`double_optin` 0 = always send a confirmation e-mail, 3 = add without one, 4 =
//! send one unless the contact is already new or active; `overwrite` 0/1/2), `exclude` (leave a
//! list, stay in the account) and `unsubscribe`. Re-subscriptions of unsubscribed or blocked
//! contacts through the API are recorded in [`Unisender::resubscribed`].
//!
//! Not modelled: SMS/phone contacts, campaigns, `exportContacts`, webhooks, test mode. Where
//! the live API's exact wording is unknown (e.g. `getContact` of an unknown address) the fake
//! answers `{"error": "Contact not found", "code": "unspecified"}`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::{Map, Value, json};

use crate::http::{Request, Response, percent_decode, reason_phrase};
use crate::mailchimp::is_valid_email;
use crate::mailerlite::Window;
use crate::provider::{Provider, admin_error, lock, opt_str, req_str};

/// Rows per `importContacts` call (documented maximum).
pub const MAX_IMPORT_ROWS: usize = 500;
const STATUSES: [&str; 7] = [
    "new",
    "invited",
    "active",
    "inactive",
    "unsubscribed",
    "blocked",
    "activation_requested",
];
/// Statuses the API may never turn back into a subscribed one without consent.
const CONSENT_STATUSES: [&str; 2] = ["unsubscribed", "blocked"];
const AVAILABILITIES: [&str; 6] = [
    "available",
    "unreachable",
    "temp_unreachable",
    "mailbox_full",
    "spam_rejected",
    "spam_folder",
];
const FIELD_TYPES: [&str; 5] = ["string", "text", "number", "date", "bool"];
/// Column names `importContacts` treats specially.
const SPECIAL_COLUMNS: [&str; 8] = [
    "email",
    "email_status",
    "email_list_ids",
    "email_subscribe_times",
    "email_unsubscribed_list_ids",
    "email_excluded_list_ids",
    "tags",
    "delete",
];

/// A contact, as tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct Contact {
    pub person_id: u64,
    /// As first given (case preserved).
    pub email: String,
    pub status: String,
    pub availability: String,
    /// List id -> `active` or `unsubscribed`.
    pub lists: BTreeMap<String, String>,
    /// Only the fields that hold a value.
    pub fields: BTreeMap<String, String>,
    pub tags: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct List {
    pub id: String,
    pub title: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub id: u64,
    pub name: String,
    /// `string`, `text`, `number`, `date` or `bool`.
    pub field_type: String,
}

/// The Unisender fake. Obtain it with [`crate::Emulator::unisender`].
pub struct Unisender {
    state: Mutex<State>,
}

struct State {
    /// `None`: any key (or none) is accepted.
    api_key: Option<String>,
    lists: Vec<List>,
    fields: Vec<Field>,
    /// Keyed by lower-cased address.
    contacts: BTreeMap<String, Contact>,
    rejected: BTreeMap<String, String>,
    deleted: Vec<String>,
    resubscribed: Vec<String>,
    confirmation_emails: Vec<String>,
    call_limit: Option<Window>,
}

impl State {
    fn new() -> State {
        State {
            api_key: None,
            lists: Vec::new(),
            fields: vec![Field {
                id: next_id(),
                name: "Name".into(),
                field_type: "string".into(),
            }],
            contacts: BTreeMap::new(),
            rejected: BTreeMap::new(),
            deleted: Vec::new(),
            resubscribed: Vec::new(),
            confirmation_emails: Vec::new(),
            call_limit: None,
        }
    }
}

fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1_000_001);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Public API for tests

impl Unisender {
    pub(crate) fn new() -> Unisender {
        Unisender {
            state: Mutex::new(State::new()),
        }
    }

    /// Require this `api_key`; others get `invalid_api_key` (inside an HTTP 200).
    pub fn set_api_key(&self, key: &str) {
        lock(&self.state).api_key = Some(key.to_string());
    }

    /// Accept any key, or none (the default).
    pub fn accept_any_api_key(&self) {
        lock(&self.state).api_key = None;
    }

    /// Every write of this address fails with `message` (a `log` entry of `importContacts`,
    /// an error answer of `subscribe`).
    pub fn reject_address(&self, email: &str, message: &str) {
        lock(&self.state)
            .rejected
            .insert(email.trim().to_lowercase(), message.to_string());
    }

    /// At most `per_minute` calls per sliding minute, then `api_call_limit_exceeded_for_api_key`
    /// inside an HTTP 200; `None` (the default) for no limit.
    pub fn set_call_limit(&self, per_minute: Option<u32>) {
        lock(&self.state).call_limit = per_minute.map(Window::new);
    }

    /// Creates a list; returns its id.
    pub fn create_list(&self, title: &str) -> String {
        let mut st = lock(&self.state);
        let list = List {
            id: next_id().to_string(),
            title: title.to_string(),
        };
        let id = list.id.clone();
        st.lists.push(list);
        id
    }

    /// Adds a user field (`string`, `text`, `number`, `date`, `bool`).
    pub fn add_field(&self, name: &str, field_type: &str) {
        let mut st = lock(&self.state);
        if !st.fields.iter().any(|f| f.name == name) {
            st.fields.push(Field {
                id: next_id(),
                name: name.to_string(),
                field_type: field_type.to_string(),
            });
        }
    }

    pub fn lists(&self) -> Vec<List> {
        lock(&self.state).lists.clone()
    }

    /// All contacts, keyed by lower-cased address.
    pub fn contacts(&self) -> BTreeMap<String, Contact> {
        lock(&self.state).contacts.clone()
    }

    pub fn contact(&self, email: &str) -> Option<Contact> {
        lock(&self.state)
            .contacts
            .get(&email.trim().to_lowercase())
            .cloned()
    }

    /// Changes a contact's account-wide status as if it happened at Unisender. False if there
    /// is no such contact or status.
    pub fn set_status(&self, email: &str, status: &str) -> bool {
        STATUSES.contains(&status) && self.with_contact(email, |c| c.status = status.into())
    }

    /// Sets the contact's entry in a list (`active` or `unsubscribed`), as if the contact
    /// unsubscribed from that list through a campaign's link.
    pub fn set_list_status(&self, email: &str, list_id: &str, status: &str) -> bool {
        matches!(status, "active" | "unsubscribed")
            && self.with_contact(email, |c| {
                c.lists.insert(list_id.to_string(), status.to_string());
            })
    }

    /// Sets the contact's availability (`unreachable` for a hard bounce, ...).
    pub fn set_availability(&self, email: &str, availability: &str) -> bool {
        AVAILABILITIES.contains(&availability)
            && self.with_contact(email, |c| c.availability = availability.into())
    }

    /// Addresses the API moved from unsubscribed/blocked (or from a list they unsubscribed
    /// from) back towards a subscription.
    pub fn resubscribed(&self) -> Vec<String> {
        lock(&self.state).resubscribed.clone()
    }

    /// Addresses that were sent a double opt-in confirmation e-mail.
    pub fn confirmation_emails(&self) -> Vec<String> {
        lock(&self.state).confirmation_emails.clone()
    }

    /// Addresses deleted through `importContacts` with `delete` = 1.
    pub fn deleted(&self) -> Vec<String> {
        lock(&self.state).deleted.clone()
    }

    fn with_contact(&self, email: &str, change: impl FnOnce(&mut Contact)) -> bool {
        let mut st = lock(&self.state);
        match st.contacts.get_mut(&email.trim().to_lowercase()) {
            Some(contact) => {
                change(contact);
                true
            }
            None => false,
        }
    }

    /// `POST /_admin/unisender/<action>`.
    fn admin_action(&self, action: &str, body: &Map<String, Value>) -> Result<(), String> {
        match action {
            "api_key" => match opt_str(body, "key")? {
                Some(key) => self.set_api_key(key),
                None => self.accept_any_api_key(),
            },
            "reject" => self.reject_address(
                req_str(body, "email")?,
                opt_str(body, "message")?.unwrap_or("rejected"),
            ),
            "list" => {
                self.create_list(req_str(body, "title")?);
            }
            "field" => {
                let field_type = opt_str(body, "type")?.unwrap_or("string");
                if !FIELD_TYPES.contains(&field_type) {
                    return Err(format!("field type must be one of {FIELD_TYPES:?}"));
                }
                self.add_field(req_str(body, "name")?, field_type);
            }
            "status" => {
                let (email, status) = (req_str(body, "email")?, req_str(body, "status")?);
                let done = match opt_str(body, "list_id")? {
                    Some(list) => self.set_list_status(email, list, status),
                    None => self.set_status(email, status),
                };
                if !done {
                    return Err(format!("no contact {email}, or bad status {status:?}"));
                }
            }
            "call_limit" => {
                let limit = match body.get("per_minute") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(
                        v.as_u64()
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or("per_minute must be a non-negative integer or null")?,
                    ),
                };
                self.set_call_limit(limit);
            }
            _ => return Err(format!("unknown unisender admin action {action:?}")),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Provider plumbing

impl Provider for Unisender {
    fn name(&self) -> &'static str {
        "unisender"
    }

    fn handle(&self, req: &Request) -> Response {
        let segments = req.segments();
        let method = match segments.as_slice() {
            [lang, api, method] if lang.len() == 2 && api == "api" => method.clone(),
            _ => {
                return Response::new(404, "text/html", "<html><body>Not found</body></html>");
            }
        };
        let params = Params::from_request(req);
        let mut st = lock(&self.state);
        let answer = st.call(&method, &params);
        Response::json(200, &answer)
    }

    fn state_json(&self) -> Value {
        let st = lock(&self.state);
        let contacts: Map<String, Value> = st
            .contacts
            .iter()
            .map(|(k, c)| {
                (
                    k.clone(),
                    json!({"email": c.email, "status": c.status, "availability": c.availability,
                           "lists": c.lists, "fields": c.fields, "tags": c.tags}),
                )
            })
            .collect();
        json!({
            "api_key_required": st.api_key.is_some(),
            "lists": st.lists.iter().map(|l| json!({"id": l.id, "title": l.title})).collect::<Vec<_>>(),
            "fields": st.fields.iter().map(|f| json!({"name": f.name, "type": f.field_type})).collect::<Vec<_>>(),
            "contacts": contacts,
            "rejected": st.rejected,
            "deleted": st.deleted,
            "resubscribed": st.resubscribed,
            "confirmation_emails": st.confirmation_emails,
        })
    }

    fn admin(&self, action: &str, body: &Value) -> Response {
        let empty = Map::new();
        match self.admin_action(action, body.as_object().unwrap_or(&empty)) {
            Ok(()) => Response::json(200, &self.state_json()),
            Err(message) => admin_error(400, &message),
        }
    }

    fn reset(&self) {
        *lock(&self.state) = State::new();
    }

    fn list_members(&self, list_id: &str) -> BTreeMap<String, Map<String, Value>> {
        // The extension keeps a binding's list id as its list id.
        lock(&self.state)
            .contacts
            .iter()
            .filter(|(_, c)| {
                c.lists.get(list_id).is_some_and(|s| s == "active")
                    && matches!(
                        c.status.as_str(),
                        "new" | "invited" | "active" | "activation_requested"
                    )
                    && c.availability != "unreachable"
            })
            .map(|(k, c)| {
                let fields = c
                    .fields
                    .iter()
                    .map(|(name, value)| (name.clone(), Value::String(value.clone())))
                    .collect();
                (k.clone(), fields)
            })
            .collect()
    }

    fn error_response(&self, status: u16, _detail: &str) -> Response {
        let code = if status == 429 {
            "api_call_limit_exceeded_for_api_key"
        } else {
            "unspecified"
        };
        Response::json(
            status,
            &json!({"error": reason_phrase(status), "code": code}),
        )
    }
}

/// A call's parameters, from the query string and the form body, in order.
struct Params(Vec<(String, String)>);

impl Params {
    fn from_request(req: &Request) -> Params {
        let mut pairs = decode_form(&req.query);
        let form = req
            .header("content-type")
            .is_none_or(|t| t.starts_with("application/x-www-form-urlencoded"));
        if form {
            pairs.extend(decode_form(&req.body_text()));
        }
        Params(pairs)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `name[key]=value` pairs, keyed by what is inside the brackets.
    fn bracketed(&self, name: &str) -> Vec<(String, String)> {
        let prefix = format!("{name}[");
        self.0
            .iter()
            .filter_map(|(k, v)| {
                let inner = k.strip_prefix(&prefix)?.strip_suffix(']')?;
                Some((inner.to_string(), v.clone()))
            })
            .collect()
    }

    /// `field_names[i]` in index order.
    fn field_names(&self) -> Vec<String> {
        let mut names: Vec<(usize, String)> = self
            .bracketed("field_names")
            .into_iter()
            .filter_map(|(i, v)| Some((i.parse().ok()?, v)))
            .collect();
        names.sort_by_key(|(i, _)| *i);
        names.into_iter().map(|(_, v)| v).collect()
    }

    /// `data[i][j]` as rows of cells (absent cells are `None`).
    fn rows(&self, columns: usize) -> BTreeMap<usize, Vec<Option<String>>> {
        let mut rows: BTreeMap<usize, Vec<Option<String>>> = BTreeMap::new();
        for (inner, value) in self.bracketed("data") {
            let Some((row, column)) = inner.split_once("][") else {
                continue;
            };
            let (Ok(row), Ok(column)) = (row.parse::<usize>(), column.parse::<usize>()) else {
                continue;
            };
            if column < columns {
                rows.entry(row).or_insert_with(|| vec![None; columns])[column] = Some(value);
            }
        }
        rows
    }
}

fn decode_form(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

fn error(code: &str, message: &str) -> Value {
    json!({"error": message, "code": code})
}

fn ids(text: &str) -> Vec<String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

impl State {
    fn call(&mut self, method: &str, params: &Params) -> Value {
        if params.get("format") != Some("json") {
            return error("invalid_arg", "format must be json");
        }
        let key_ok = match &self.api_key {
            None => true,
            Some(expected) => params.get("api_key") == Some(expected.as_str()),
        };
        if !key_ok {
            return error(
                "invalid_api_key",
                "Invalid API key. Check the key in your account settings.",
            );
        }
        if let Some(window) = &mut self.call_limit
            && window.admit(Instant::now()).is_err()
        {
            return error(
                "api_call_limit_exceeded_for_api_key",
                "API call limit exceeded for this API key, try again later",
            );
        }
        match method {
            "getLists" => json!({"result": self.lists.iter().map(|l| {
                json!({"id": l.id.parse::<u64>().map(Value::from).unwrap_or_else(|_| json!(l.id)), "title": l.title})
            }).collect::<Vec<_>>()}),
            "createList" => self.create_list(params),
            "getFields" => json!({"result": self.fields.iter().enumerate().map(|(i, f)| {
                json!({"id": f.id, "name": f.name, "type": f.field_type, "is_visible": 1, "view_pos": i + 1})
            }).collect::<Vec<_>>()}),
            "getContact" => self.get_contact(params),
            "importContacts" => self.import(params),
            "subscribe" => self.subscribe(params),
            "exclude" => self.leave(params, false),
            "unsubscribe" => self.leave(params, true),
            other => error("unknown_method", &format!("Unknown method \"{other}\"")),
        }
    }

    fn list_exists(&self, id: &str) -> bool {
        self.lists.iter().any(|l| l.id == id)
    }

    fn create_list(&mut self, params: &Params) -> Value {
        let title = params.get("title").map(str::trim).unwrap_or("");
        if title.is_empty() {
            return error("invalid_arg", "Argument \"title\" is required");
        }
        if self.lists.iter().any(|l| l.title == title) {
            return error(
                "invalid_arg",
                &format!("A list titled \"{title}\" already exists"),
            );
        }
        let id = next_id();
        self.lists.push(List {
            id: id.to_string(),
            title: title.to_string(),
        });
        json!({"result": {"id": id}})
    }

    fn get_contact(&self, params: &Params) -> Value {
        let email = params.get("email").unwrap_or("").trim().to_lowercase();
        let Some(contact) = self.contacts.get(&email) else {
            return error("unspecified", "Contact not found");
        };
        let mut result = json!({
            "email": {
                "email": contact.email,
                "status": contact.status,
                "availability": contact.availability,
                "rating": 0,
            },
        });
        if params.get("include_lists") == Some("1") {
            result["lists"] = contact
                .lists
                .iter()
                .map(|(id, status)| json!({"id": id.parse::<u64>().unwrap_or(0), "status": status}))
                .collect();
        }
        if params.get("include_fields") == Some("1") {
            result["fields"] = json!(contact.fields);
        }
        json!({"result": result})
    }

    /// A user field's problem with a value, if any.
    fn check_value(&self, name: &str, value: &str) -> Option<String> {
        let field = self.fields.iter().find(|f| f.name == name)?;
        let value = value.trim();
        let valid = value.is_empty()
            || match field.field_type.as_str() {
                "number" => value.parse::<f64>().is_ok(),
                "date" => is_date(value),
                "bool" => matches!(value, "0" | "1" | "yes" | "no"),
                _ => true,
            };
        (!valid).then(|| format!("Invalid value \"{value}\" for field \"{name}\""))
    }

    fn import(&mut self, params: &Params) -> Value {
        let columns = params.field_names();
        if !columns.iter().any(|c| c == "email") {
            return error("invalid_arg", "field_names must contain \"email\"");
        }
        if let Some(unknown) = columns.iter().find(|c| {
            !SPECIAL_COLUMNS.contains(&c.as_str()) && !self.fields.iter().any(|f| f.name == **c)
        }) {
            return error("invalid_arg", &format!("Unknown field \"{unknown}\""));
        }
        let rows = params.rows(columns.len());
        if rows.len() > MAX_IMPORT_ROWS {
            return error(
                "invalid_arg",
                &format!(
                    "Too many contacts: {} (at most {MAX_IMPORT_ROWS} per call)",
                    rows.len()
                ),
            );
        }
        let overwrite_tags = params.get("overwrite_tags") == Some("1");
        let overwrite_lists = params.get("overwrite_lists") == Some("1");
        let (mut inserted, mut updated, mut deleted, mut invalid) = (0, 0, 0, 0);
        let mut log = Vec::new();
        for (index, row) in &rows {
            let cell = |name: &str| {
                columns
                    .iter()
                    .position(|c| c == name)
                    .and_then(|i| row[i].clone())
            };
            let email = cell("email").unwrap_or_default().trim().to_string();
            let key = email.to_lowercase();
            let mut problem = None;
            if !is_valid_email(&email) {
                problem = Some(("invalid_email", format!("Invalid email \"{email}\"")));
            } else if let Some(message) = self.rejected.get(&key) {
                problem = Some(("rejected", message.clone()));
            }
            if problem.is_none() {
                for list in [
                    "email_list_ids",
                    "email_unsubscribed_list_ids",
                    "email_excluded_list_ids",
                ]
                .iter()
                .filter_map(|c| cell(c))
                .flat_map(|v| ids(&v))
                {
                    if !self.list_exists(&list) {
                        problem = Some(("invalid_arg", format!("List {list} does not exist")));
                    }
                }
            }
            if problem.is_none()
                && let Some(status) = cell("email_status").filter(|s| !s.is_empty())
                && !STATUSES.contains(&status.as_str())
            {
                problem = Some(("invalid_arg", format!("Invalid email_status \"{status}\"")));
            }
            if problem.is_none() {
                problem = columns
                    .iter()
                    .zip(row)
                    .filter(|(c, _)| !SPECIAL_COLUMNS.contains(&c.as_str()))
                    .find_map(|(c, v)| self.check_value(c, v.as_deref()?))
                    .map(|message| ("invalid_arg", message));
            }
            if let Some((code, message)) = problem {
                invalid += 1;
                log.push(json!({"index": index, "code": code, "message": message}));
                continue;
            }
            if cell("delete").as_deref() == Some("1") {
                if self.contacts.remove(&key).is_some() {
                    deleted += 1;
                    self.deleted.push(key);
                }
                continue;
            }
            let created = !self.contacts.contains_key(&key);
            if created {
                inserted += 1;
                self.contacts.insert(key.clone(), new_contact(&email));
            } else {
                updated += 1;
            }
            let contact = self.contacts.get_mut(&key).expect("inserted above");
            if let Some(status) = cell("email_status").filter(|s| !s.is_empty())
                && !CONSENT_STATUSES.contains(&contact.status.as_str())
            {
                contact.status = status;
            }
            if let Some(lists) = cell("email_list_ids") {
                let wanted = ids(&lists);
                if overwrite_lists {
                    contact.lists.retain(|id, _| wanted.contains(id));
                }
                for id in wanted {
                    contact.lists.entry(id).or_insert_with(|| "active".into());
                }
            }
            for id in cell("email_unsubscribed_list_ids")
                .map(|v| ids(&v))
                .unwrap_or_default()
            {
                contact.lists.insert(id, "unsubscribed".into());
            }
            for id in cell("email_excluded_list_ids")
                .map(|v| ids(&v))
                .unwrap_or_default()
            {
                contact.lists.remove(&id);
            }
            if let Some(tags) = cell("tags") {
                if overwrite_tags {
                    contact.tags.clear();
                }
                contact.tags.extend(ids(&tags));
            }
            for (column, value) in columns.iter().zip(row) {
                if SPECIAL_COLUMNS.contains(&column.as_str()) {
                    continue;
                }
                match value.as_deref().map(str::trim) {
                    Some("") => {
                        contact.fields.remove(column);
                    }
                    Some(value) => {
                        contact.fields.insert(column.clone(), value.to_string());
                    }
                    None => {}
                }
            }
        }
        json!({"result": {
            "total": rows.len(),
            "inserted": inserted,
            "updated": updated,
            "deleted": deleted,
            "new_emails": inserted,
            "invalid": invalid,
            "log": log,
        }})
    }

    fn subscribe(&mut self, params: &Params) -> Value {
        let lists = ids(params.get("list_ids").unwrap_or(""));
        if lists.is_empty() {
            return error("invalid_arg", "Argument \"list_ids\" is required");
        }
        if let Some(missing) = lists.iter().find(|l| !self.list_exists(l)) {
            return error("invalid_arg", &format!("List {missing} does not exist"));
        }
        let fields: BTreeMap<String, String> = params.bracketed("fields").into_iter().collect();
        let email = fields
            .get("email")
            .map(|e| e.trim().to_string())
            .unwrap_or_default();
        if !is_valid_email(&email) {
            return error("invalid_arg", &format!("Invalid email \"{email}\""));
        }
        let key = email.to_lowercase();
        if let Some(message) = self.rejected.get(&key) {
            return error("invalid_arg", &message.clone());
        }
        if let Some(unknown) = fields
            .keys()
            .find(|f| *f != "email" && !self.fields.iter().any(|d| d.name == **f))
        {
            return error("invalid_arg", &format!("Unknown field \"{unknown}\""));
        }
        if let Some(message) = fields
            .iter()
            .filter(|(f, _)| *f != "email")
            .find_map(|(f, v)| self.check_value(f, v))
        {
            return error("invalid_arg", &message);
        }
        let double_optin = params.get("double_optin").unwrap_or("0");
        if !matches!(double_optin, "0" | "3" | "4") {
            return error("invalid_arg", "double_optin must be 0, 3 or 4");
        }
        let overwrite = params.get("overwrite").unwrap_or("0");
        if !matches!(overwrite, "0" | "1" | "2") {
            return error("invalid_arg", "overwrite must be 0, 1 or 2");
        }
        let existing = self.contacts.get(&key);
        let withdrawn = existing.is_some_and(|c| {
            CONSENT_STATUSES.contains(&c.status.as_str())
                || lists
                    .iter()
                    .any(|l| c.lists.get(l).is_some_and(|s| s == "unsubscribed"))
        });
        if withdrawn && double_optin == "3" {
            return error(
                "invalid_arg",
                &format!(
                    "{email} has unsubscribed and can only come back by confirming a subscription"
                ),
            );
        }
        let already_in = existing.is_some_and(|c| matches!(c.status.as_str(), "new" | "active"));
        let confirm = match double_optin {
            "0" => true,
            "4" => withdrawn || !already_in,
            _ => false,
        };
        if withdrawn {
            self.resubscribed.push(key.clone());
        }
        if confirm {
            self.confirmation_emails.push(key.clone());
        }
        let contact = self
            .contacts
            .entry(key)
            .or_insert_with(|| new_contact(&email));
        if confirm && contact.status != "active" {
            contact.status = "activation_requested".into();
        }
        for list in lists {
            contact.lists.insert(list, "active".into());
        }
        if overwrite == "1" {
            contact.fields.clear();
            contact.tags.clear();
        }
        for (name, value) in fields.into_iter().filter(|(f, _)| f != "email") {
            if overwrite == "0" && contact.fields.contains_key(&name) {
                continue;
            }
            if value.trim().is_empty() {
                contact.fields.remove(&name);
            } else {
                contact.fields.insert(name, value);
            }
        }
        contact.tags.extend(ids(params.get("tags").unwrap_or("")));
        json!({"result": {"person_id": contact.person_id}})
    }

    /// `exclude` (leave the lists, stay in the account) or `unsubscribe` (from the lists, or
    /// from everything without `list_ids`).
    fn leave(&mut self, params: &Params, unsubscribe: bool) -> Value {
        if !matches!(params.get("contact_type"), Some("email" | "phone")) {
            return error("invalid_arg", "contact_type must be email or phone");
        }
        let key = params.get("contact").unwrap_or("").trim().to_lowercase();
        let lists = ids(params.get("list_ids").unwrap_or(""));
        if let Some(missing) = lists.iter().find(|l| !self.list_exists(l)) {
            return error("invalid_arg", &format!("List {missing} does not exist"));
        }
        if let Some(contact) = self.contacts.get_mut(&key) {
            match (unsubscribe, lists.is_empty()) {
                (false, true) => contact.lists.clear(),
                (false, false) => contact.lists.retain(|id, _| !lists.contains(id)),
                (true, true) => contact.status = "unsubscribed".into(),
                (true, false) => {
                    for list in lists {
                        contact.lists.insert(list, "unsubscribed".into());
                    }
                }
            }
        }
        json!({"result": {}})
    }
}

fn new_contact(email: &str) -> Contact {
    Contact {
        person_id: next_id(),
        email: email.to_string(),
        status: "new".into(),
        availability: "available".into(),
        lists: BTreeMap::new(),
        fields: BTreeMap::new(),
        tags: BTreeSet::new(),
    }
}

/// `DD.MM.YYYY`, `DD-MM-YYYY`, `YYYY.MM.DD` or `YYYY-MM-DD`.
fn is_date(text: &str) -> bool {
    let parts: Vec<&str> = text.split(['.', '-']).collect();
    let digits = |s: &str, n: usize| s.len() == n && s.chars().all(|c| c.is_ascii_digit());
    parts.len() == 3
        && ((digits(parts[0], 2) && digits(parts[1], 2) && digits(parts[2], 4))
            || (digits(parts[0], 4) && digits(parts[1], 2) && digits(parts[2], 2)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Emulator;

    fn call(emulator: &Emulator, method: &str, params: &[(&str, &str)]) -> Value {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let body = params
            .iter()
            .map(|(k, v)| format!("{}={}", encode(k), encode(v)))
            .collect::<Vec<_>>()
            .join("&");
        let mut response = agent
            .post(format!(
                "{}/en/api/{method}?format=json",
                emulator.base_url("unisender")
            ))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .send(body)
            .expect("request");
        assert_eq!(
            response.status(),
            200,
            "Unisender answers 200 even for errors"
        );
        response.body_mut().read_json().expect("JSON")
    }

    fn encode(text: &str) -> String {
        text.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }

    #[test]
    fn form_values_round_trip() {
        assert_eq!(
            percent_decode(&encode("a+b@x.io [0]"), true),
            "a+b@x.io [0]"
        );
    }

    #[test]
    fn errors_come_inside_http_200() {
        let emulator = Emulator::start();
        emulator.unisender().set_api_key("k");
        assert_eq!(
            call(&emulator, "getLists", &[("api_key", "wrong")])["code"],
            "invalid_api_key"
        );
        assert_eq!(
            call(&emulator, "noSuchMethod", &[("api_key", "k")])["code"],
            "unknown_method"
        );
        assert!(call(&emulator, "getLists", &[("api_key", "k")])["result"].is_array());
        emulator.unisender().set_call_limit(Some(1));
        call(&emulator, "getLists", &[("api_key", "k")]);
        assert_eq!(
            call(&emulator, "getLists", &[("api_key", "k")])["code"],
            "api_call_limit_exceeded_for_api_key"
        );
    }

    #[test]
    fn lists_have_unique_titles() {
        let emulator = Emulator::start();
        let id = call(&emulator, "createList", &[("title", "vip")])["result"]["id"].clone();
        assert!(id.is_u64());
        assert_eq!(
            call(&emulator, "createList", &[("title", "vip")])["code"],
            "invalid_arg"
        );
        assert_eq!(call(&emulator, "getLists", &[])["result"][0]["id"], id);
    }

    #[test]
    fn import_adds_updates_deletes_and_logs_rows() {
        let emulator = Emulator::start();
        let us = emulator.unisender();
        let list = us.create_list("vip");
        us.add_field("score", "number");
        let result = &call(
            &emulator,
            "importContacts",
            &[
                ("field_names[0]", "email"),
                ("field_names[1]", "email_list_ids"),
                ("field_names[2]", "Name"),
                ("field_names[3]", "score"),
                ("field_names[4]", "tags"),
                ("data[0][0]", "Ann@Example.com"),
                ("data[0][1]", &list),
                ("data[0][2]", "Ann"),
                ("data[0][3]", "10"),
                ("data[0][4]", "crm,vip"),
                ("data[1][0]", "not-an-address"),
                ("data[1][1]", &list),
                ("data[2][0]", "bob@example.com"),
                ("data[2][1]", &list),
                ("data[2][3]", "lots"),
            ],
        )["result"];
        assert_eq!(result["inserted"], 1);
        assert_eq!(result["invalid"], 2);
        assert_eq!(result["log"][0]["index"], 1);
        assert_eq!(result["log"][1]["index"], 2);
        let ann = us.contact("ann@example.com").unwrap();
        assert_eq!(ann.status, "new");
        assert_eq!(ann.fields["score"], "10");
        assert_eq!(ann.tags.len(), 2);
        assert_eq!(emulator.list_members("unisender", &list).len(), 1);

        us.set_status("ann@example.com", "unsubscribed");
        call(
            &emulator,
            "importContacts",
            &[
                ("field_names[0]", "email"),
                ("field_names[1]", "email_status"),
                ("data[0][0]", "ann@example.com"),
                ("data[0][1]", "active"),
            ],
        );
        assert_eq!(
            us.contact("ann@example.com").unwrap().status,
            "unsubscribed"
        );

        call(
            &emulator,
            "importContacts",
            &[
                ("field_names[0]", "email"),
                ("field_names[1]", "delete"),
                ("data[0][0]", "ann@example.com"),
                ("data[0][1]", "1"),
            ],
        );
        assert!(us.contacts().is_empty());
        assert_eq!(us.deleted(), vec!["ann@example.com"]);
    }

    #[test]
    fn import_takes_at_most_500_rows_and_known_fields() {
        let emulator = Emulator::start();
        let names = [("field_names[0]", "email".to_string())];
        let rows: Vec<(String, String)> = (0..501)
            .map(|i| (format!("data[{i}][0]"), format!("u{i}@example.com")))
            .collect();
        let mut params: Vec<(&str, &str)> = names.iter().map(|(k, v)| (*k, v.as_str())).collect();
        params.extend(rows.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(
            call(&emulator, "importContacts", &params)["code"],
            "invalid_arg"
        );
        assert!(emulator.unisender().contacts().is_empty());
        assert_eq!(
            call(
                &emulator,
                "importContacts",
                &[
                    ("field_names[0]", "email"),
                    ("field_names[1]", "Shoe"),
                    ("data[0][0]", "a@example.com")
                ]
            )["code"],
            "invalid_arg"
        );
    }

    #[test]
    fn subscribe_follows_double_optin() {
        let emulator = Emulator::start();
        let us = emulator.unisender();
        let list = us.create_list("vip");
        let subscribe = |email: &str, double_optin: &str| {
            call(
                &emulator,
                "subscribe",
                &[
                    ("list_ids", &list),
                    ("fields[email]", email),
                    ("fields[Name]", "X"),
                    ("double_optin", double_optin),
                    ("overwrite", "2"),
                ],
            )
        };
        assert!(subscribe("new@example.com", "4")["result"]["person_id"].is_u64());
        assert_eq!(
            us.contact("new@example.com").unwrap().status,
            "activation_requested"
        );
        assert!(subscribe("quiet@example.com", "3")["result"].is_object());
        assert_eq!(us.contact("quiet@example.com").unwrap().status, "new");
        subscribe("quiet@example.com", "4");
        assert_eq!(us.confirmation_emails(), vec!["new@example.com"]);

        us.set_list_status("quiet@example.com", &list, "unsubscribed");
        assert_eq!(subscribe("quiet@example.com", "3")["code"], "invalid_arg");
        assert!(us.resubscribed().is_empty());
        subscribe("quiet@example.com", "4");
        assert_eq!(us.resubscribed(), vec!["quiet@example.com"]);
    }

    #[test]
    fn exclude_leaves_the_list_and_unsubscribe_marks_it() {
        let emulator = Emulator::start();
        let us = emulator.unisender();
        let list = us.create_list("vip");
        for email in ["a@example.com", "b@example.com"] {
            call(
                &emulator,
                "subscribe",
                &[
                    ("list_ids", &list),
                    ("fields[email]", email),
                    ("double_optin", "3"),
                ],
            );
        }
        let leave = |method: &str, email: &str| {
            call(
                &emulator,
                method,
                &[
                    ("contact_type", "email"),
                    ("contact", email),
                    ("list_ids", &list),
                ],
            )
        };
        assert!(leave("exclude", "a@example.com")["result"].is_object());
        assert!(leave("unsubscribe", "b@example.com")["result"].is_object());
        assert!(us.contact("a@example.com").unwrap().lists.is_empty());
        assert_eq!(
            us.contact("b@example.com").unwrap().lists[&list],
            "unsubscribed"
        );
        assert!(emulator.list_members("unisender", &list).is_empty());
        let contact = call(
            &emulator,
            "getContact",
            &[("email", "b@example.com"), ("include_lists", "1")],
        );
        assert_eq!(contact["result"]["lists"][0]["status"], "unsubscribed");
        assert_eq!(
            call(&emulator, "getContact", &[("email", "zed@example.com")])["code"],
            "unspecified"
        );
    }
}
