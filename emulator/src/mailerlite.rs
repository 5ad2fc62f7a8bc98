//! MailerLite (the current API at `connect.mailerlite.com`), the subset pg_listsync uses,
//! served under `/mailerlite/api/...`.
//!
//! Modelled after developers.mailerlite.com (Getting started, Subscribers, Groups, Fields,
//! Batching): `Authorization: Bearer <token>` (else 401 `{"message": "Unauthenticated."}`);
//! subscribers keyed by address with a numeric-string id and a status (`active`,
//! `unsubscribed`, `unconfirmed`, `bounced`, `junk`); groups are the lists; `POST
//! /api/subscribers` is a non-destructive upsert (omitted fields and groups stay, `status` only
//! changes when sent: an unsubscribed subscriber re-activated that way is recorded in
//! [`MailerLite::resubscribed`] so tests can assert the sync never did it); errors are
//! Laravel-style `{"message", "errors": {field: [..]}}` with 404/422; `POST /api/batch` runs at
//! most 50 sub-requests (paths must start with `api/`) and answers each with `{code, body}`.
//!
//! Rate limits are opt-in, so tests that do not care are not slowed: [`MailerLite::set_rate_limit`]
//! (the account-wide 120 requests/min; 429 `Too Many Attempts.` with `Retry-After` and
//! `X-RateLimit-*`) and [`MailerLite::set_import_limit`] (a batch made only of subscriber
//! upserts is an import, 5/min; 429 `You're being rate limited on import creation.`).
//!
//! Not modelled: segments, campaigns, automations, webhooks, cursor opacity (cursors are
//! offsets), the 30-day delay of `forget` (the subscriber disappears at once), and validation
//! of field keys the account does not have (they are ignored).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::http::{Request, Response, percent_decode, reason_phrase};
use crate::mailchimp::is_valid_email;
use crate::provider::{Provider, admin_error, lock, opt_bool, opt_str, req_str, unix_now};

/// Sub-requests per `POST /api/batch`.
pub const MAX_BATCH_REQUESTS: usize = 50;
/// Groups an account may have.
const MAX_GROUPS: usize = 1000;
const STATUSES: [&str; 5] = ["active", "unsubscribed", "unconfirmed", "bounced", "junk"];
/// Statuses that must not be turned back into `active`/`unconfirmed` without consent.
const CONSENT_STATUSES: [&str; 3] = ["unsubscribed", "bounced", "junk"];
const FIELD_TYPES: [&str; 3] = ["text", "number", "date"];
/// Every account has these fields.
const DEFAULT_FIELDS: [&str; 8] = [
    "name",
    "last_name",
    "company",
    "country",
    "city",
    "phone",
    "state",
    "z_i_p",
];

/// A subscriber, as tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscriber {
    pub id: String,
    /// As first given (case preserved).
    pub email: String,
    pub status: String,
    /// Only the fields that hold a value.
    pub fields: Map<String, Value>,
    /// Group ids.
    pub groups: BTreeSet<String>,
    pub created_at: i64,
    pub updated_at: i64,
    pub unsubscribed_at: Option<i64>,
}

/// A group (MailerLite's static list).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub created_at: i64,
}

/// A subscriber field.
#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub id: String,
    pub name: String,
    /// What the API keys values by (`name` → `name`, `ZIP` → `z_i_p`).
    pub key: String,
    /// `text`, `number` or `date`.
    pub field_type: String,
}

/// The MailerLite fake. Obtain it with [`crate::Emulator::mailerlite`].
pub struct MailerLite {
    state: Mutex<State>,
}

struct State {
    /// `None`: any token (or none) is accepted.
    api_key: Option<String>,
    /// The account's "Double opt-in for API and integrations": new subscribers sent without a
    /// status become `unconfirmed` (and get a confirmation e-mail) instead of `active`.
    double_opt_in: bool,
    /// Keyed by lower-cased address.
    subscribers: BTreeMap<String, Subscriber>,
    groups: Vec<Group>,
    fields: Vec<Field>,
    /// Lower-cased address -> 422 message for every write of it.
    rejected: BTreeMap<String, String>,
    deleted: Vec<String>,
    forgotten: Vec<String>,
    resubscribed: Vec<String>,
    confirmation_emails: Vec<String>,
    rate_limit: Option<Window>,
    import_limit: Option<Window>,
}

impl State {
    fn new() -> State {
        State {
            api_key: None,
            double_opt_in: false,
            subscribers: BTreeMap::new(),
            groups: Vec::new(),
            fields: DEFAULT_FIELDS
                .iter()
                .map(|key| Field {
                    id: next_id(),
                    name: key.to_string(),
                    key: key.to_string(),
                    field_type: "text".into(),
                })
                .collect(),
            rejected: BTreeMap::new(),
            deleted: Vec::new(),
            forgotten: Vec::new(),
            resubscribed: Vec::new(),
            confirmation_emails: Vec::new(),
            rate_limit: None,
            import_limit: None,
        }
    }
}

/// A sliding one-minute window of admitted requests (also used by the Unisender fake).
pub(crate) struct Window {
    per_minute: usize,
    admitted: VecDeque<Instant>,
}

impl Window {
    pub(crate) fn new(per_minute: u32) -> Window {
        Window {
            per_minute: per_minute as usize,
            admitted: VecDeque::new(),
        }
    }

    /// Admits a request now, or says in how many seconds one will be admitted.
    pub(crate) fn admit(&mut self, now: Instant) -> Result<(), u64> {
        let minute = Duration::from_secs(60);
        while self
            .admitted
            .front()
            .is_some_and(|t| now.duration_since(*t) >= minute)
        {
            self.admitted.pop_front();
        }
        if self.admitted.len() < self.per_minute {
            self.admitted.push_back(now);
            return Ok(());
        }
        let oldest = self.admitted.front().copied().unwrap_or(now);
        let wait = minute.saturating_sub(now.duration_since(oldest));
        Err(wait.as_secs().max(1))
    }
}

/// Account-wide ids, shaped like MailerLite's (17-digit numbers as strings).
fn next_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(90_000_000_000_000_001);
    NEXT.fetch_add(1, Ordering::Relaxed).to_string()
}

/// A field key as MailerLite derives it from a field name (Laravel's snake case).
pub fn field_key(name: &str) -> String {
    let mut key = String::new();
    for (i, c) in name.trim().chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 && !key.ends_with('_') {
                key.push('_');
            }
            key.push(c.to_ascii_lowercase());
        } else if c.is_ascii_alphanumeric() {
            key.push(c);
        } else if !key.ends_with('_') {
            key.push('_');
        }
    }
    key
}

// ---------------------------------------------------------------------------------------------
// Public API for tests

impl MailerLite {
    pub(crate) fn new() -> MailerLite {
        MailerLite {
            state: Mutex::new(State::new()),
        }
    }

    /// Require `Authorization: Bearer <key>`; others get 401.
    pub fn set_api_key(&self, key: &str) {
        lock(&self.state).api_key = Some(key.to_string());
    }

    /// Accept any token, or none (the default).
    pub fn accept_any_api_key(&self) {
        lock(&self.state).api_key = None;
    }

    /// The account setting "Double opt-in for API and integrations" (off by default).
    pub fn set_double_opt_in(&self, enabled: bool) {
        lock(&self.state).double_opt_in = enabled;
    }

    /// Every write of this address fails with 422 and `message` (a per-item error in batches).
    pub fn reject_address(&self, email: &str, message: &str) {
        lock(&self.state)
            .rejected
            .insert(email.trim().to_lowercase(), message.to_string());
    }

    /// At most `per_minute` requests per sliding minute, then 429 with `Retry-After`;
    /// `None` (the default) for no limit.
    pub fn set_rate_limit(&self, per_minute: Option<u32>) {
        lock(&self.state).rate_limit = per_minute.map(Window::new);
    }

    /// At most `per_minute` batches made only of subscriber upserts (MailerLite processes them
    /// as imports; the live limit is 5); `None` (the default) for no limit.
    pub fn set_import_limit(&self, per_minute: Option<u32>) {
        lock(&self.state).import_limit = per_minute.map(Window::new);
    }

    /// Creates a group; returns its id.
    pub fn create_group(&self, name: &str) -> String {
        let mut st = lock(&self.state);
        let group = Group {
            id: next_id(),
            name: name.to_string(),
            created_at: unix_now(),
        };
        let id = group.id.clone();
        st.groups.push(group);
        id
    }

    /// Adds a custom field (`text`, `number` or `date`); returns its key.
    pub fn add_field(&self, name: &str, field_type: &str) -> String {
        let mut st = lock(&self.state);
        let key = field_key(name);
        if !st.fields.iter().any(|f| f.key == key) {
            st.fields.push(Field {
                id: next_id(),
                name: name.to_string(),
                key: key.clone(),
                field_type: field_type.to_string(),
            });
        }
        key
    }

    pub fn groups(&self) -> Vec<Group> {
        lock(&self.state).groups.clone()
    }

    pub fn fields(&self) -> Vec<Field> {
        lock(&self.state).fields.clone()
    }

    /// All subscribers, keyed by lower-cased address.
    pub fn subscribers(&self) -> BTreeMap<String, Subscriber> {
        lock(&self.state).subscribers.clone()
    }

    pub fn subscriber(&self, email: &str) -> Option<Subscriber> {
        lock(&self.state)
            .subscribers
            .get(&email.trim().to_lowercase())
            .cloned()
    }

    /// Subscribers in a group (any status), keyed by lower-cased address.
    pub fn group_members(&self, group_id: &str) -> BTreeMap<String, Subscriber> {
        lock(&self.state)
            .subscribers
            .iter()
            .filter(|(_, s)| s.groups.contains(group_id))
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect()
    }

    /// Changes a subscriber's status as if it happened at MailerLite (the subscriber
    /// unsubscribed, bounced, complained). False if there is no such subscriber or status.
    pub fn set_status(&self, email: &str, status: &str) -> bool {
        if !STATUSES.contains(&status) {
            return false;
        }
        let mut st = lock(&self.state);
        match st.subscribers.get_mut(&email.trim().to_lowercase()) {
            Some(s) => {
                s.status = status.to_string();
                if status == "unsubscribed" {
                    s.unsubscribed_at = Some(unix_now());
                }
                true
            }
            None => false,
        }
    }

    /// Addresses the API moved from unsubscribed/bounced/junk back to active/unconfirmed.
    pub fn resubscribed(&self) -> Vec<String> {
        lock(&self.state).resubscribed.clone()
    }

    /// Addresses deleted with `DELETE /api/subscribers/{id}`.
    pub fn deleted(&self) -> Vec<String> {
        lock(&self.state).deleted.clone()
    }

    /// Addresses erased with `POST /api/subscribers/{id}/forget`.
    pub fn forgotten(&self) -> Vec<String> {
        lock(&self.state).forgotten.clone()
    }

    /// Addresses that were sent a double opt-in confirmation e-mail.
    pub fn confirmation_emails(&self) -> Vec<String> {
        lock(&self.state).confirmation_emails.clone()
    }

    /// `POST /_admin/mailerlite/<action>`.
    fn admin_action(&self, action: &str, body: &Map<String, Value>) -> Result<(), String> {
        match action {
            "api_key" => match opt_str(body, "key")? {
                Some(key) => self.set_api_key(key),
                None => self.accept_any_api_key(),
            },
            "status" => {
                let (email, status) = (req_str(body, "email")?, req_str(body, "status")?);
                if !self.set_status(email, status) {
                    return Err(format!("no subscriber {email}, or bad status {status:?}"));
                }
            }
            "reject" => self.reject_address(
                req_str(body, "email")?,
                opt_str(body, "message")?.unwrap_or("rejected"),
            ),
            "group" => {
                self.create_group(req_str(body, "name")?);
            }
            "field" => {
                self.add_field(
                    req_str(body, "name")?,
                    opt_str(body, "type")?.unwrap_or("text"),
                );
            }
            "double_opt_in" => self.set_double_opt_in(opt_bool(body, "enabled")?.unwrap_or(true)),
            "rate_limit" => self.set_rate_limit(per_minute(body)?),
            "import_limit" => self.set_import_limit(per_minute(body)?),
            _ => return Err(format!("unknown mailerlite admin action {action:?}")),
        }
        Ok(())
    }
}

fn per_minute(body: &Map<String, Value>) -> Result<Option<u32>, String> {
    match body.get("per_minute") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| "per_minute must be a non-negative integer or null".into()),
    }
}

// ---------------------------------------------------------------------------------------------
// Provider plumbing

impl Provider for MailerLite {
    fn name(&self) -> &'static str {
        "mailerlite"
    }

    fn handle(&self, req: &Request) -> Response {
        let mut st = lock(&self.state);
        if !authorized(st.api_key.as_deref(), req) {
            return message(401, "Unauthenticated.");
        }
        if let Some(window) = &mut st.rate_limit
            && let Err(after) = window.admit(Instant::now())
        {
            return too_many(after, "Too Many Attempts.");
        }
        let body = if req.body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            match req.json() {
                Ok(body) => body,
                Err(_) => return message(400, "The request body is not valid JSON."),
            }
        };
        if req.method == "POST" && req.path.trim_end_matches('/') == "/api/batch" {
            return st.batch(&body);
        }
        let (status, answer) = st.route(&req.method, &req.path, &req.query, &body);
        reply(status, answer)
    }

    fn state_json(&self) -> Value {
        let st = lock(&self.state);
        let subscribers: Map<String, Value> = st
            .subscribers
            .iter()
            .map(|(k, s)| {
                (
                    k.clone(),
                    json!({"id": s.id, "email": s.email, "status": s.status, "fields": s.fields, "groups": s.groups}),
                )
            })
            .collect();
        json!({
            "api_key_required": st.api_key.is_some(),
            "double_opt_in": st.double_opt_in,
            "groups": st.groups.iter().map(|g| json!({"id": g.id, "name": g.name})).collect::<Vec<_>>(),
            "fields": st.fields.iter().map(|f| json!({"key": f.key, "type": f.field_type})).collect::<Vec<_>>(),
            "subscribers": subscribers,
            "rejected": st.rejected,
            "deleted": st.deleted,
            "forgotten": st.forgotten,
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
        // The extension keeps a binding's group id as its list id.
        lock(&self.state)
            .subscribers
            .iter()
            .filter(|(_, s)| {
                s.groups.contains(list_id) && matches!(s.status.as_str(), "active" | "unconfirmed")
            })
            .map(|(k, s)| (k.clone(), s.fields.clone()))
            .collect()
    }

    fn error_response(&self, status: u16, _detail: &str) -> Response {
        match status {
            429 => message(429, "Too Many Attempts.")
                .with_header("X-RateLimit-Limit", "120")
                .with_header("X-RateLimit-Remaining", "0"),
            500 => message(500, "Server Error"),
            _ => message(status, reason_phrase(status)),
        }
    }
}

fn authorized(expected: Option<&str>, req: &Request) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    req.header("authorization")
        .and_then(|h| h.split_once(' '))
        .is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && token.trim() == expected
        })
}

fn message(status: u16, text: &str) -> Response {
    Response::json(status, &json!({"message": text}))
}

fn too_many(retry_after: u64, text: &str) -> Response {
    message(429, text)
        .with_header("Retry-After", retry_after.to_string())
        .with_header("X-RateLimit-Remaining", "0")
}

fn reply(status: u16, body: Value) -> Response {
    if status == 204 {
        Response::no_content()
    } else {
        Response::json(status, &body)
    }
}

/// A status and body, as the router produces them (and as batch items carry them).
type Answer = (u16, Value);

fn not_found() -> Answer {
    (404, json!({"message": "Resource not found."}))
}

/// A 422 validation error on one field.
fn invalid(field: &str, text: &str) -> Answer {
    (422, json!({"message": text, "errors": {field: [text]}}))
}

/// The decoded value of a query parameter (`filter[name]` or `filter%5Bname%5D`).
fn query_param(query: &str, name: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('=').or(Some((pair, ""))))
        .find(|(k, _)| percent_decode(k, true) == name)
        .map(|(_, v)| percent_decode(v, true))
}

fn number_param(query: &str, name: &str, default: usize) -> Result<usize, Answer> {
    match query_param(query, name).filter(|v| !v.is_empty()) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| invalid(name, &format!("The {name} must be an integer."))),
    }
}

/// `YYYY-MM-DD HH:MM:SS` (UTC), MailerLite's timestamp format.
fn datetime(unix: i64) -> String {
    let (days, secs) = (unix.div_euclid(86_400), unix.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

/// A page of `items` with Laravel's paginator metadata (groups, fields).
fn paged(items: Vec<Value>, query: &str, path: &str) -> Answer {
    let limit = match number_param(query, "limit", 50) {
        Ok(limit) => limit.max(1),
        Err(e) => return e,
    };
    let page = match number_param(query, "page", 1) {
        Ok(page) => page.max(1),
        Err(e) => return e,
    };
    let total = items.len();
    let last_page = total.div_ceil(limit).max(1);
    let data: Vec<Value> = items
        .into_iter()
        .skip((page - 1) * limit)
        .take(limit)
        .collect();
    let url = |p: usize| format!("https://connect.mailerlite.com/api/{path}?page={p}");
    let from = (page - 1) * limit + 1;
    (
        200,
        json!({
            "data": data,
            "links": {
                "first": url(1),
                "last": url(last_page),
                "prev": (page > 1).then(|| url(page - 1)),
                "next": (page < last_page).then(|| url(page + 1)),
            },
            "meta": {
                "current_page": page,
                "from": (!data.is_empty()).then_some(from),
                "last_page": last_page,
                "links": [],
                "path": format!("https://connect.mailerlite.com/api/{path}"),
                "per_page": limit,
                "to": (!data.is_empty()).then(|| from + data.len() - 1),
                "total": total,
            },
        }),
    )
}

impl State {
    fn route(&mut self, method: &str, path: &str, query: &str, body: &Value) -> Answer {
        let segments: Vec<String> = path
            .split('/')
            .filter(|s| !s.is_empty())
            .map(|s| percent_decode(s, false))
            .collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (method, segments.as_slice()) {
            ("GET", ["api", "subscribers"]) => self.list_subscribers(query, None),
            ("POST", ["api", "subscribers"]) => self.upsert(body),
            ("GET", ["api", "subscribers", id]) => self.find(id).map_or_else(not_found, |key| {
                (200, json!({"data": self.subscriber_json(&key)}))
            }),
            ("PUT", ["api", "subscribers", id]) => self.update(id, body),
            ("DELETE", ["api", "subscribers", id]) => self.delete(id),
            ("POST", ["api", "subscribers", id, "forget"]) => self.forget(id),
            ("POST", ["api", "subscribers", id, "groups", group]) => self.assign(id, group),
            ("DELETE", ["api", "subscribers", id, "groups", group]) => self.unassign(id, group),
            ("GET", ["api", "groups"]) => self.list_groups(query),
            ("POST", ["api", "groups"]) => self.create_group(body),
            ("PUT", ["api", "groups", group]) => self.rename_group(group, body),
            ("DELETE", ["api", "groups", group]) => self.delete_group(group),
            ("GET", ["api", "groups", group, "subscribers"]) => {
                if self.group(group).is_none() {
                    return not_found();
                }
                self.list_subscribers(query, Some(group))
            }
            ("GET", ["api", "fields"]) => {
                let items = self.fields.iter().map(field_json).collect();
                paged(items, query, "fields")
            }
            ("POST", ["api", "fields"]) => self.create_field(body),
            (
                _,
                ["api", "subscribers" | "groups" | "fields"]
                | ["api", "subscribers" | "groups", _]
                | ["api", "subscribers", _, "forget"]
                | ["api", "subscribers", _, "groups", _]
                | ["api", "groups", _, "subscribers"],
            ) => (
                405,
                json!({"message": format!("The {method} method is not supported for this route.")}),
            ),
            _ => not_found(),
        }
    }

    // -- batch ------------------------------------------------------------------------------

    fn batch(&mut self, body: &Value) -> Response {
        let Some(requests) = body.get("requests").and_then(Value::as_array) else {
            let (status, answer) = invalid("requests", "The requests field is required.");
            return reply(status, answer);
        };
        if requests.len() > MAX_BATCH_REQUESTS {
            let (status, answer) = invalid(
                "requests",
                &format!("The requests must not have more than {MAX_BATCH_REQUESTS} items."),
            );
            return reply(status, answer);
        }
        let mut parsed = Vec::with_capacity(requests.len());
        for (i, request) in requests.iter().enumerate() {
            let method = request["method"]
                .as_str()
                .unwrap_or("")
                .to_ascii_uppercase();
            if !["GET", "POST", "PUT", "DELETE", "PATCH"].contains(&method.as_str()) {
                let (status, answer) = invalid(
                    &format!("requests.{i}.method"),
                    &format!("The selected requests.{i}.method is invalid."),
                );
                return reply(status, answer);
            }
            let Some(path) = request["path"].as_str().filter(|p| p.starts_with("api/")) else {
                let (status, answer) = invalid(
                    &format!("requests.{i}.path"),
                    &format!("The requests.{i}.path must start with api/."),
                );
                return reply(status, answer);
            };
            let (path, query) = path.split_once('?').unwrap_or((path, ""));
            parsed.push((
                method,
                format!("/{path}"),
                query.to_string(),
                request["body"].clone(),
            ));
        }
        let import = !parsed.is_empty()
            && parsed
                .iter()
                .all(|(m, p, _, _)| m == "POST" && p.trim_end_matches('/') == "/api/subscribers");
        if import
            && let Some(window) = &mut self.import_limit
            && let Err(after) = window.admit(Instant::now())
        {
            return too_many(after, "You're being rate limited on import creation.");
        }
        let responses: Vec<Value> = parsed
            .iter()
            .map(|(method, path, query, body)| {
                let (code, body) = self.route(method, path, query, body);
                json!({"code": code, "body": body})
            })
            .collect();
        let successful = responses
            .iter()
            .filter(|r| r["code"].as_u64().is_some_and(|c| (200..300).contains(&c)))
            .count();
        Response::json(
            200,
            &json!({
                "total": responses.len(),
                "successful": successful,
                "failed": responses.len() - successful,
                "responses": responses,
            }),
        )
    }

    // -- subscribers ------------------------------------------------------------------------

    /// The key (lower-cased address) of a subscriber given by id or address.
    fn find(&self, id_or_email: &str) -> Option<String> {
        if id_or_email.contains('@') {
            let key = id_or_email.trim().to_lowercase();
            return self.subscribers.contains_key(&key).then_some(key);
        }
        self.subscribers
            .iter()
            .find(|(_, s)| s.id == id_or_email)
            .map(|(k, _)| k.clone())
    }

    fn group(&self, id: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.id == id)
    }

    fn upsert(&mut self, body: &Value) -> Answer {
        let Some(obj) = body.as_object() else {
            return invalid("email", "The email field is required.");
        };
        let email = match obj.get("email") {
            Some(Value::String(email)) if !email.trim().is_empty() => email.trim().to_string(),
            _ => return invalid("email", "The email field is required."),
        };
        if !is_valid_email(&email) {
            return invalid("email", "The email must be a valid email address.");
        }
        let key = email.to_lowercase();
        if let Some(text) = self.rejected.get(&key) {
            return invalid("email", &text.clone());
        }
        let changes = match self.parse_changes(obj) {
            Ok(changes) => changes,
            Err(answer) => return answer,
        };
        let now = unix_now();
        let created = !self.subscribers.contains_key(&key);
        if created {
            let status = changes.status.clone().unwrap_or_else(|| {
                if self.double_opt_in {
                    "unconfirmed"
                } else {
                    "active"
                }
                .to_string()
            });
            if status == "unconfirmed" {
                self.confirmation_emails.push(key.clone());
            }
            self.subscribers.insert(
                key.clone(),
                Subscriber {
                    id: next_id(),
                    email,
                    unsubscribed_at: (status == "unsubscribed").then_some(now),
                    status,
                    fields: Map::new(),
                    groups: BTreeSet::new(),
                    created_at: now,
                    updated_at: now,
                },
            );
        }
        self.apply(&key, changes);
        let status = if created { 201 } else { 200 };
        (status, json!({"data": self.subscriber_json(&key)}))
    }

    fn update(&mut self, id: &str, body: &Value) -> Answer {
        let Some(key) = self.find(id) else {
            return not_found();
        };
        let empty = Map::new();
        let changes = match self.parse_changes(body.as_object().unwrap_or(&empty)) {
            Ok(changes) => changes,
            Err(answer) => return answer,
        };
        if self.rejected.contains_key(&key) {
            return invalid("email", &self.rejected[&key].clone());
        }
        self.apply(&key, changes);
        (200, json!({"data": self.subscriber_json(&key)}))
    }

    /// Validates `fields`, `groups` and `status` of a write before anything changes.
    fn parse_changes(&self, obj: &Map<String, Value>) -> Result<Changes, Answer> {
        let status = match obj.get("status") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if STATUSES.contains(&s.as_str()) => Some(s.clone()),
            Some(_) => return Err(invalid("status", "The selected status is invalid.")),
        };
        let mut fields = Map::new();
        match obj.get("fields") {
            None | Some(Value::Null) => {}
            Some(Value::Object(given)) => {
                for (key, value) in given {
                    // Keys the account does not have are ignored, as the live API does.
                    let Some(field) = self.fields.iter().find(|f| f.key == *key) else {
                        continue;
                    };
                    fields.insert(key.clone(), field_value(field, value)?);
                }
            }
            Some(_) => return Err(invalid("fields", "The fields must be an array.")),
        }
        let mut groups = Vec::new();
        match obj.get("groups") {
            None | Some(Value::Null) => {}
            Some(Value::Array(ids)) => {
                for (i, id) in ids.iter().enumerate() {
                    let id = match id {
                        Value::String(s) => s.clone(),
                        Value::Number(n) => n.to_string(),
                        _ => String::new(),
                    };
                    if self.group(&id).is_none() {
                        return Err(invalid(
                            &format!("groups.{i}"),
                            &format!("The selected groups.{i} is invalid."),
                        ));
                    }
                    groups.push(id);
                }
            }
            Some(_) => return Err(invalid("groups", "The groups must be an array.")),
        }
        Ok(Changes {
            status,
            fields,
            groups,
        })
    }

    fn apply(&mut self, key: &str, changes: Changes) {
        let Some(subscriber) = self.subscribers.get_mut(key) else {
            return;
        };
        for (field, value) in changes.fields {
            if value.is_null() {
                subscriber.fields.remove(&field);
            } else {
                subscriber.fields.insert(field, value);
            }
        }
        subscriber.groups.extend(changes.groups);
        if let Some(status) = changes.status
            && status != subscriber.status
        {
            let consent = CONSENT_STATUSES.contains(&subscriber.status.as_str());
            if consent && matches!(status.as_str(), "active" | "unconfirmed") {
                self.resubscribed.push(key.to_string());
            }
            if status == "unsubscribed" {
                subscriber.unsubscribed_at = Some(unix_now());
            }
            subscriber.status = status;
        }
        subscriber.updated_at = unix_now();
    }

    fn delete(&mut self, id: &str) -> Answer {
        let Some(key) = self.find(id) else {
            return not_found();
        };
        self.subscribers.remove(&key);
        self.deleted.push(key);
        (204, Value::Null)
    }

    fn forget(&mut self, id: &str) -> Answer {
        let Some(key) = self.find(id) else {
            return not_found();
        };
        let data = self.subscriber_json(&key);
        self.subscribers.remove(&key);
        self.forgotten.push(key);
        (
            200,
            json!({"message": "Subscriber will be forgotten in 30 days.", "data": data}),
        )
    }

    fn assign(&mut self, id: &str, group: &str) -> Answer {
        let (Some(key), Some(found)) = (self.find(id), self.group(group).cloned()) else {
            return not_found();
        };
        if let Some(subscriber) = self.subscribers.get_mut(&key) {
            subscriber.groups.insert(found.id.clone());
        }
        (200, json!({"data": self.group_json(&found)}))
    }

    fn unassign(&mut self, id: &str, group: &str) -> Answer {
        let (Some(key), true) = (self.find(id), self.group(group).is_some()) else {
            return not_found();
        };
        if let Some(subscriber) = self.subscribers.get_mut(&key) {
            subscriber.groups.remove(group);
        }
        (204, Value::Null)
    }

    /// `GET /api/subscribers` (or a group's): `limit=0` answers the count only; cursors are
    /// offsets here.
    fn list_subscribers(&self, query: &str, group: Option<&str>) -> Answer {
        let status = query_param(query, "filter[status]").filter(|s| !s.is_empty());
        if status.as_deref().is_some_and(|s| !STATUSES.contains(&s)) {
            return invalid("filter.status", "The selected filter.status is invalid.");
        }
        let matching: Vec<&String> = self
            .subscribers
            .iter()
            .filter(|(_, s)| group.is_none_or(|g| s.groups.contains(g)))
            .filter(|(_, s)| status.as_deref().is_none_or(|st| s.status == st))
            .map(|(k, _)| k)
            .collect();
        let limit = match number_param(query, "limit", 25) {
            Ok(limit) => limit,
            Err(e) => return e,
        };
        if limit == 0 {
            return (200, json!({"total": matching.len()}));
        }
        let offset = query_param(query, "cursor")
            .and_then(|c| c.parse::<usize>().ok())
            .unwrap_or(0);
        let data: Vec<Value> = matching
            .iter()
            .skip(offset)
            .take(limit)
            .map(|k| self.subscriber_json(k))
            .collect();
        let next = (offset + limit < matching.len()).then(|| (offset + limit).to_string());
        let prev = (offset > 0).then(|| offset.saturating_sub(limit).to_string());
        (
            200,
            json!({
                "data": data,
                "links": {"first": null, "last": null, "prev": null, "next": null},
                "meta": {"path": "https://connect.mailerlite.com/api/subscribers", "per_page": limit,
                         "next_cursor": next, "prev_cursor": prev},
            }),
        )
    }

    fn subscriber_json(&self, key: &str) -> Value {
        let Some(s) = self.subscribers.get(key) else {
            return Value::Null;
        };
        let fields: Map<String, Value> = self
            .fields
            .iter()
            .map(|f| {
                (
                    f.key.clone(),
                    s.fields.get(&f.key).cloned().unwrap_or(Value::Null),
                )
            })
            .collect();
        let groups: Vec<Value> = self
            .groups
            .iter()
            .filter(|g| s.groups.contains(&g.id))
            .map(|g| self.group_json(g))
            .collect();
        json!({
            "id": s.id,
            "email": s.email,
            "status": s.status,
            "source": "api",
            "sent": 0,
            "opens_count": 0,
            "clicks_count": 0,
            "open_rate": 0,
            "click_rate": 0,
            "ip_address": null,
            "subscribed_at": datetime(s.created_at),
            "unsubscribed_at": s.unsubscribed_at.map(datetime),
            "created_at": datetime(s.created_at),
            "updated_at": datetime(s.updated_at),
            "fields": fields,
            "groups": groups,
            "opted_in_at": null,
            "optin_ip": null,
        })
    }

    // -- groups -----------------------------------------------------------------------------

    fn list_groups(&self, query: &str) -> Answer {
        let name = query_param(query, "filter[name]")
            .filter(|n| !n.is_empty())
            .map(|n| n.to_lowercase());
        let mut groups: Vec<&Group> = self
            .groups
            .iter()
            .filter(|g| {
                name.as_deref()
                    .is_none_or(|n| g.name.to_lowercase().contains(n))
            })
            .collect();
        match query_param(query, "sort").as_deref() {
            Some("name") => groups.sort_by(|a, b| a.name.cmp(&b.name)),
            Some("-name") => groups.sort_by(|a, b| b.name.cmp(&a.name)),
            Some("-created_at") => groups.reverse(),
            _ => {}
        }
        let items = groups.into_iter().map(|g| self.group_json(g)).collect();
        paged(items, query, "groups")
    }

    fn create_group(&mut self, body: &Value) -> Answer {
        let name = match body.get("name").and_then(Value::as_str).map(str::trim) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => return invalid("name", "The name field is required."),
        };
        if name.chars().count() > 255 {
            return invalid("name", "The name must not be greater than 255 characters.");
        }
        if self.groups.len() >= MAX_GROUPS {
            return invalid(
                "name",
                &format!("An account can have at most {MAX_GROUPS} groups."),
            );
        }
        let group = Group {
            id: next_id(),
            name,
            created_at: unix_now(),
        };
        let answer = json!({"data": self.group_json(&group)});
        self.groups.push(group);
        (201, answer)
    }

    fn rename_group(&mut self, id: &str, body: &Value) -> Answer {
        let name = match body.get("name").and_then(Value::as_str).map(str::trim) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => return invalid("name", "The name field is required."),
        };
        let Some(group) = self.groups.iter_mut().find(|g| g.id == id) else {
            return not_found();
        };
        group.name = name;
        let group = group.clone();
        (200, json!({"data": self.group_json(&group)}))
    }

    fn delete_group(&mut self, id: &str) -> Answer {
        let before = self.groups.len();
        self.groups.retain(|g| g.id != id);
        if self.groups.len() == before {
            return not_found();
        }
        for subscriber in self.subscribers.values_mut() {
            subscriber.groups.remove(id);
        }
        (204, Value::Null)
    }

    fn group_json(&self, group: &Group) -> Value {
        let count = |status: &str| {
            self.subscribers
                .values()
                .filter(|s| s.groups.contains(&group.id) && s.status == status)
                .count()
        };
        let rate = json!({"float": 0, "string": "0%"});
        json!({
            "id": group.id,
            "name": group.name,
            "active_count": count("active"),
            "sent_count": 0,
            "opens_count": 0,
            "open_rate": rate,
            "clicks_count": 0,
            "click_rate": rate,
            "unsubscribed_count": count("unsubscribed"),
            "unconfirmed_count": count("unconfirmed"),
            "bounced_count": count("bounced"),
            "junk_count": count("junk"),
            "created_at": datetime(group.created_at),
        })
    }

    // -- fields -----------------------------------------------------------------------------

    fn create_field(&mut self, body: &Value) -> Answer {
        let name = match body.get("name").and_then(Value::as_str).map(str::trim) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => return invalid("name", "The name field is required."),
        };
        let field_type = body.get("type").and_then(Value::as_str).unwrap_or("");
        if !FIELD_TYPES.contains(&field_type) {
            return invalid("type", "The selected type is invalid.");
        }
        let key = field_key(&name);
        if self.fields.iter().any(|f| f.key == key) {
            return invalid("name", "The name has already been taken.");
        }
        let field = Field {
            id: next_id(),
            name,
            key,
            field_type: field_type.to_string(),
        };
        let answer = json!({"data": field_json(&field)});
        self.fields.push(field);
        (201, answer)
    }
}

/// A validated write.
struct Changes {
    status: Option<String>,
    fields: Map<String, Value>,
    groups: Vec<String>,
}

fn field_json(field: &Field) -> Value {
    json!({"id": field.id, "name": field.name, "key": field.key, "type": field.field_type})
}

/// Checks a value against its field's type; numbers are stored as numbers, the rest as text.
fn field_value(field: &Field, value: &Value) -> Result<Value, Answer> {
    let path = format!("fields.{}", field.key);
    match (field.field_type.as_str(), value) {
        (_, Value::Null) => Ok(Value::Null),
        ("number", Value::Number(_)) => Ok(value.clone()),
        ("number", Value::String(s)) => s
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| invalid(&path, &format!("The {path} must be a number."))),
        ("date", Value::String(s)) if is_date(s.trim()) => Ok(Value::String(s.trim().into())),
        ("date", _) => Err(invalid(&path, &format!("The {path} is not a valid date."))),
        (_, Value::String(s)) => Ok(Value::String(s.clone())),
        (_, Value::Number(n)) => Ok(Value::String(n.to_string())),
        (_, Value::Bool(b)) => Ok(Value::String(b.to_string())),
        (_, _) => Err(invalid(&path, &format!("The {path} must be a string."))),
    }
}

/// `YYYY-MM-DD`, MailerLite's date field format.
fn is_date(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Emulator, Fault};

    struct Client {
        agent: ureq::Agent,
        base: String,
        token: String,
    }

    impl Client {
        fn new(emulator: &Emulator, token: &str) -> Client {
            Client {
                agent: ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .build()
                    .into(),
                base: emulator.base_url("mailerlite"),
                token: token.to_string(),
            }
        }

        fn send(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
            let url = format!("{}{path}", self.base);
            let auth = format!("Bearer {}", self.token);
            let mut response = match (method, body) {
                ("GET", _) => self.agent.get(&url).header("Authorization", &auth).call(),
                ("DELETE", _) => self
                    .agent
                    .delete(&url)
                    .header("Authorization", &auth)
                    .call(),
                ("PUT", body) => self
                    .agent
                    .put(&url)
                    .header("Authorization", &auth)
                    .send_json(body.unwrap_or(Value::Null)),
                (_, body) => self
                    .agent
                    .post(&url)
                    .header("Authorization", &auth)
                    .send_json(body.unwrap_or(Value::Null)),
            }
            .expect("request");
            let status = response.status().as_u16();
            let text = response.body_mut().read_to_string().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }
    }

    #[test]
    fn bearer_token_is_required_when_set() {
        let emulator = Emulator::start();
        emulator.mailerlite().set_api_key("token");
        let (status, body) = Client::new(&emulator, "wrong").send("GET", "/api/groups", None);
        assert_eq!(
            (status, body),
            (401, json!({"message": "Unauthenticated."}))
        );
        let (status, _) = Client::new(&emulator, "token").send("GET", "/api/groups", None);
        assert_eq!(status, 200);
    }

    #[test]
    fn upsert_is_non_destructive_and_never_silently_resubscribes() {
        let emulator = Emulator::start();
        let ml = emulator.mailerlite();
        let group = ml.create_group("vip");
        let client = Client::new(&emulator, "t");
        let (status, body) = client.send(
            "POST",
            "/api/subscribers",
            Some(json!({"email": "Ann@Example.com", "fields": {"name": "Ann"}, "groups": [group]})),
        );
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["data"]["status"], "active");
        assert_eq!(body["data"]["fields"]["last_name"], Value::Null);
        let (status, body) = client.send(
            "POST",
            "/api/subscribers",
            Some(json!({"email": "ann@example.com", "fields": {"last_name": "Lee"}})),
        );
        assert_eq!(status, 200);
        assert_eq!(body["data"]["fields"]["name"], "Ann", "omitted fields stay");
        assert_eq!(
            body["data"]["groups"][0]["id"],
            group.as_str(),
            "omitted groups stay"
        );

        assert!(ml.set_status("ann@example.com", "unsubscribed"));
        client.send(
            "POST",
            "/api/subscribers",
            Some(json!({"email": "ann@example.com", "fields": {"name": "Anne"}})),
        );
        assert_eq!(
            ml.subscriber("ann@example.com").unwrap().status,
            "unsubscribed"
        );
        assert!(ml.resubscribed().is_empty());
        client.send(
            "POST",
            "/api/subscribers",
            Some(json!({"email": "ann@example.com", "status": "active"})),
        );
        assert_eq!(ml.resubscribed(), vec!["ann@example.com"]);
    }

    #[test]
    fn validation_errors_are_laravel_style() {
        let emulator = Emulator::start();
        let ml = emulator.mailerlite();
        ml.add_field("Score", "number");
        let client = Client::new(&emulator, "t");
        let (status, body) =
            client.send("POST", "/api/subscribers", Some(json!({"email": "nope"})));
        assert_eq!(status, 422);
        assert_eq!(
            body["errors"]["email"][0],
            "The email must be a valid email address."
        );
        let (status, body) = client.send(
            "POST",
            "/api/subscribers",
            Some(json!({"email": "a@example.com", "fields": {"score": "many"}})),
        );
        assert_eq!(status, 422);
        assert!(body["errors"]["fields.score"].is_array(), "{body}");
        let (status, _) = client.send(
            "POST",
            "/api/subscribers",
            Some(json!({"email": "a@example.com", "groups": ["404"]})),
        );
        assert_eq!(status, 422);
        assert!(ml.subscribers().is_empty(), "nothing applied");
    }

    #[test]
    fn batch_runs_sub_requests_in_order_and_enforces_its_limits() {
        let emulator = Emulator::start();
        let ml = emulator.mailerlite();
        let group = ml.create_group("vip");
        let client = Client::new(&emulator, "t");
        let (status, body) = client.send(
            "POST",
            "/api/batch",
            Some(json!({"requests": [
                {"method": "POST", "path": "api/subscribers", "body": {"email": "a@example.com", "groups": [group]}},
                {"method": "GET", "path": "api/subscribers/b%40example.com"},
                {"method": "DELETE", "path": format!("api/subscribers/a@example.com/groups/{group}")},
            ]})),
        );
        assert_eq!(status, 200);
        assert_eq!(body["total"], 3);
        assert_eq!(body["failed"], 1);
        let codes: Vec<u64> = body["responses"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["code"].as_u64().unwrap())
            .collect();
        assert_eq!(codes, vec![201, 404, 204]);
        assert!(ml.group_members(&group).is_empty());

        let many: Vec<Value> = (0..51)
            .map(|i| json!({"method": "GET", "path": format!("api/subscribers/{i}")}))
            .collect();
        let (status, _) = client.send("POST", "/api/batch", Some(json!({"requests": many})));
        assert_eq!(status, 422);
        let (status, _) = client.send(
            "POST",
            "/api/batch",
            Some(json!({"requests": [{"method": "GET", "path": "/api/groups"}]})),
        );
        assert_eq!(status, 422, "paths start with api/");
    }

    #[test]
    fn imports_and_requests_are_rate_limited_on_demand() {
        let emulator = Emulator::start();
        let ml = emulator.mailerlite();
        ml.set_import_limit(Some(1));
        let client = Client::new(&emulator, "t");
        let upserts = json!({"requests": [{"method": "POST", "path": "api/subscribers", "body": {"email": "a@example.com"}}]});
        assert_eq!(
            client.send("POST", "/api/batch", Some(upserts.clone())).0,
            200
        );
        let (status, body) = client.send("POST", "/api/batch", Some(upserts));
        assert_eq!(status, 429);
        assert_eq!(
            body["message"],
            "You're being rate limited on import creation."
        );
        let mixed = json!({"requests": [
            {"method": "POST", "path": "api/subscribers", "body": {"email": "b@example.com"}},
            {"method": "GET", "path": "api/subscribers/b@example.com"}]});
        assert_eq!(
            client.send("POST", "/api/batch", Some(mixed)).0,
            200,
            "not an import"
        );

        ml.set_rate_limit(Some(1));
        assert_eq!(client.send("GET", "/api/groups", None).0, 200);
        let (status, body) = client.send("GET", "/api/groups", None);
        assert_eq!(
            (status, body),
            (429, json!({"message": "Too Many Attempts."}))
        );

        ml.set_rate_limit(None);
        emulator
            .faults("mailerlite")
            .push(Fault::too_many_requests(Some(7)));
        let (status, body) = client.send("GET", "/api/groups", None);
        assert_eq!(
            (status, body),
            (429, json!({"message": "Too Many Attempts."}))
        );
    }

    #[test]
    fn groups_are_paged_and_filtered_by_name() {
        let emulator = Emulator::start();
        let ml = emulator.mailerlite();
        for i in 0..5 {
            ml.create_group(&format!("list {i}"));
        }
        let client = Client::new(&emulator, "t");
        let (_, body) = client.send("GET", "/api/groups?limit=2&page=3", None);
        assert_eq!(body["meta"]["last_page"], 3);
        assert_eq!(body["data"].as_array().unwrap().len(), 1);
        let (_, body) = client.send("GET", "/api/groups?filter%5Bname%5D=list%203", None);
        assert_eq!(body["data"][0]["name"], "list 3");
        let (status, body) = client.send("POST", "/api/groups", Some(json!({"name": "new"})));
        assert_eq!(status, 201);
        assert!(body["data"]["id"].is_string());
    }

    #[test]
    fn list_members_counts_active_and_unconfirmed_in_the_group() {
        let emulator = Emulator::start();
        let ml = emulator.mailerlite();
        let group = ml.create_group("vip");
        let client = Client::new(&emulator, "t");
        for (email, status) in [
            ("a@example.com", "active"),
            ("b@example.com", "unconfirmed"),
            ("c@example.com", "unsubscribed"),
        ] {
            client.send(
                "POST",
                "/api/subscribers",
                Some(json!({"email": email, "status": status, "groups": [group], "fields": {"name": "X"}})),
            );
        }
        let members = emulator.list_members("mailerlite", &group);
        assert_eq!(
            members.keys().collect::<Vec<_>>(),
            vec!["a@example.com", "b@example.com"]
        );
        assert_eq!(members["a@example.com"]["name"], "X");
        assert_eq!(ml.confirmation_emails(), vec!["b@example.com"]);
    }

    #[test]
    fn field_keys_and_timestamps() {
        assert_eq!(field_key("ZIP"), "z_i_p");
        assert_eq!(field_key("last name"), "last_name");
        assert_eq!(datetime(0), "1970-01-01 00:00:00");
        assert_eq!(datetime(784_111_777), "1994-11-06 08:49:37");
    }
}
