//! SendPulse's bulk email REST API, the subset pg_listsync uses, served under `/sendpulse/...`.
//!
//! Field names follow the OpenAPI description in `tests/contract/specs/sendpulse-bulk-email-
//! openapi.prism.yml`; behaviour follows SendPulse's documentation where it matters for list
//! sync: OAuth2 client credentials (`POST /oauth/access_token`, tokens that expire) or static
//! API keys, mailing lists ("address books") with per-list variables and per-list address
//! statuses, double opt-in adds (`confirmation: force` with a `sender_email`), 100-address
//! limits on removals, account-wide tags (created through a queue), `{"message", "error_code"}`
//! errors, and the 10 requests/s limit (429, error code 2020202020) when switched on.
//!
//! Assumptions where SendPulse documents nothing: an add never changes the status an address
//! already has in the list (an unsubscribed address stays unsubscribed); an add naming an
//! invalid or rejected address fails as a whole (422); `POST /emails` answers, like the live
//! API, each address's lists with `book_id`, a numeric `status` and `variables`, but no
//! `status_explain`, which only `GET /addressbooks/{id}/emails/{email}` gives. The numeric
//! status codes are this emulator's own.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::http::{Request, Response, percent_decode, reason_phrase};
use crate::mailchimp::is_valid_email;
use crate::provider::{Provider, admin_error, lock, opt_str, req_str};

/// Addresses per removal or unsubscribe call (documented maximum).
const MAX_EMAILS_PER_REMOVAL: usize = 100;
/// Mailing lists per page of `GET /addressbooks`.
const MAX_PAGE: usize = 100;
/// SendPulse's error code for "more than 10 requests per second".
pub const RATE_LIMIT_CODE: i64 = 2_020_202_020;

/// Statuses an address can have in a mailing list, with this emulator's codes and SendPulse's
/// explanations. `new`, `active` and `unconfirmed` receive mail (the last once confirmed).
const STATUSES: [(&str, i64, &str); 7] = [
    ("new", 0, "New"),
    ("active", 1, "Active"),
    ("unsubscribed", 2, "Unsubscribed"),
    ("unconfirmed", 3, "Unconfirmed"),
    ("bounced", 4, "Bounced"),
    ("complained", 5, "Spam complaint"),
    ("blacklisted", 6, "Blacklisted"),
];

/// An address in a mailing list, as tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct BookMember {
    /// As first added (case preserved).
    pub email: String,
    /// `new`, `active`, `unconfirmed`, `unsubscribed`, `bounced`, `complained` or `blacklisted`.
    pub status: String,
    pub variables: Map<String, Value>,
}

/// A double opt-in add: SendPulse mails the address a confirmation from `sender`.
#[derive(Debug, Clone, PartialEq)]
pub struct Confirmation {
    pub book: u64,
    pub email: String,
    pub sender: String,
    pub lang: Option<String>,
}

/// The SendPulse fake. Obtain it with [`crate::Emulator::sendpulse`].
pub struct SendPulse {
    state: Mutex<State>,
}

struct State {
    /// Required OAuth client credentials; `None` with no API keys: anything is accepted.
    credentials: Option<(String, String)>,
    api_keys: BTreeSet<String>,
    token_lifetime: Duration,
    /// Issued access token -> when it expires.
    tokens: BTreeMap<String, Instant>,
    tokens_issued: u64,
    /// Requests per second before 429; `None`: unlimited.
    rate_limit: Option<usize>,
    recent: VecDeque<Instant>,
    books: BTreeMap<u64, Book>,
    /// Tag id -> name.
    tags: BTreeMap<u64, String>,
    /// Lower-cased address -> tag ids pinned to it.
    contact_tags: BTreeMap<String, BTreeSet<u64>>,
    blacklist: BTreeSet<String>,
    /// Lower-cased address -> the message an add containing it fails with.
    rejected: BTreeMap<String, String>,
    confirmations: Vec<Confirmation>,
    /// Addresses deleted from every list (`DELETE /emails/{email}`).
    deleted: Vec<String>,
    next_id: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            credentials: None,
            api_keys: BTreeSet::new(),
            token_lifetime: Duration::from_secs(3600),
            tokens: BTreeMap::new(),
            tokens_issued: 0,
            rate_limit: None,
            recent: VecDeque::new(),
            books: BTreeMap::new(),
            tags: BTreeMap::new(),
            contact_tags: BTreeMap::new(),
            blacklist: BTreeSet::new(),
            rejected: BTreeMap::new(),
            confirmations: Vec::new(),
            deleted: Vec::new(),
            next_id: 1000,
        }
    }
}

struct Book {
    id: u64,
    name: String,
    /// Variable name -> type (`string`, `number`, `date`).
    variables: BTreeMap<String, String>,
    /// Lower-cased address -> entry.
    emails: BTreeMap<String, BookMember>,
}

fn status_code(status: &str) -> i64 {
    STATUSES
        .iter()
        .find(|(s, ..)| *s == status)
        .map_or(0, |(_, code, _)| *code)
}

fn status_explain(status: &str) -> &'static str {
    STATUSES
        .iter()
        .find(|(s, ..)| *s == status)
        .map_or("New", |(.., explain)| explain)
}

fn receiving(status: &str) -> bool {
    matches!(status, "new" | "active" | "unconfirmed")
}

/// SendPulse's error document.
fn error(status: u16, code: i64, message: &str) -> Response {
    Response::json(status, &json!({ "message": message, "error_code": code }))
}

fn invalid(message: &str) -> Response {
    error(422, 422, message)
}

fn book_not_found() -> Response {
    error(404, 213, "Book not found")
}

// ---------------------------------------------------------------------------------------------
// Public API for tests

impl SendPulse {
    pub(crate) fn new() -> SendPulse {
        SendPulse {
            state: Mutex::new(State::default()),
        }
    }

    /// Require these OAuth client credentials; bearer tokens must then be ones issued for them
    /// (or API keys added with [`SendPulse::add_api_key`]). Others get 401.
    pub fn set_credentials(&self, client_id: &str, client_secret: &str) {
        lock(&self.state).credentials = Some((client_id.into(), client_secret.into()));
    }

    /// Accept this static API key as a bearer token (and require valid credentials).
    pub fn add_api_key(&self, key: &str) {
        lock(&self.state).api_keys.insert(key.into());
    }

    /// Accept any credentials and any bearer token (the default).
    pub fn accept_any_credentials(&self) {
        let mut st = lock(&self.state);
        st.credentials = None;
        st.api_keys.clear();
    }

    /// Lifetime of the access tokens issued from now on (default one hour, as SendPulse).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state).token_lifetime = lifetime;
    }

    /// Revokes every issued token: the next call with one gets 401.
    pub fn expire_tokens(&self) {
        lock(&self.state).tokens.clear();
    }

    /// How many access tokens were issued.
    pub fn tokens_issued(&self) -> u64 {
        lock(&self.state).tokens_issued
    }

    /// Answer 429 (error code 2020202020) beyond `per_second` requests in any second;
    /// `None` (the default) turns the limit off.
    pub fn set_rate_limit(&self, per_second: Option<usize>) {
        let mut st = lock(&self.state);
        st.rate_limit = per_second;
        st.recent.clear();
    }

    /// Creates a mailing list; returns its id.
    pub fn create_book(&self, name: &str) -> u64 {
        lock(&self.state).create_book(name)
    }

    /// The id of the mailing list of this name.
    pub fn book_id(&self, name: &str) -> Option<u64> {
        let st = lock(&self.state);
        st.books.values().find(|b| b.name == name).map(|b| b.id)
    }

    /// Mailing lists: id -> name.
    pub fn books(&self) -> BTreeMap<u64, String> {
        let st = lock(&self.state);
        st.books.values().map(|b| (b.id, b.name.clone())).collect()
    }

    /// Defines a variable (`string`, `number` or `date`) in a mailing list.
    pub fn add_variable(&self, book: u64, name: &str, kind: &str) -> bool {
        let mut st = lock(&self.state);
        st.books
            .get_mut(&book)
            .map(|b| b.variables.insert(name.into(), kind.into()))
            .is_some()
    }

    /// Every address of a mailing list, any status, by lower-cased address.
    pub fn members(&self, book: u64) -> BTreeMap<String, BookMember> {
        let st = lock(&self.state);
        st.books
            .get(&book)
            .map(|b| b.emails.clone())
            .unwrap_or_default()
    }

    pub fn member(&self, book: u64, email: &str) -> Option<BookMember> {
        self.members(book).remove(&email.trim().to_lowercase())
    }

    /// Sets an address's status in a mailing list as if it happened at SendPulse (the contact
    /// unsubscribed, bounced, ...). False if there is no such entry or status.
    pub fn set_status(&self, book: u64, email: &str, status: &str) -> bool {
        if !STATUSES.iter().any(|(s, ..)| *s == status) {
            return false;
        }
        let mut st = lock(&self.state);
        st.books
            .get_mut(&book)
            .and_then(|b| b.emails.get_mut(&email.trim().to_lowercase()))
            .map(|m| m.status = status.to_string())
            .is_some()
    }

    /// Puts an address on the account's blacklist: added to a list later, it is blacklisted.
    pub fn blacklist(&self, email: &str) {
        lock(&self.state)
            .blacklist
            .insert(email.trim().to_lowercase());
    }

    /// Every add that contains this address fails (422) with `message`.
    pub fn reject_address(&self, email: &str, message: &str) {
        lock(&self.state)
            .rejected
            .insert(email.trim().to_lowercase(), message.into());
    }

    /// Tags: id -> name.
    pub fn tags(&self) -> BTreeMap<u64, String> {
        lock(&self.state).tags.clone()
    }

    /// Names of the tags pinned to an address.
    pub fn contact_tags(&self, email: &str) -> BTreeSet<String> {
        let st = lock(&self.state);
        st.contact_tags
            .get(&email.trim().to_lowercase())
            .into_iter()
            .flatten()
            .filter_map(|id| st.tags.get(id).cloned())
            .collect()
    }

    /// Confirmation emails SendPulse would have sent (double opt-in adds of new addresses).
    pub fn confirmations(&self) -> Vec<Confirmation> {
        lock(&self.state).confirmations.clone()
    }

    /// Addresses deleted from every mailing list.
    pub fn deleted(&self) -> Vec<String> {
        lock(&self.state).deleted.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// Provider plumbing

impl Provider for SendPulse {
    fn name(&self) -> &'static str {
        "sendpulse"
    }

    fn handle(&self, req: &Request) -> Response {
        let mut st = lock(&self.state);
        if let Some(limit) = st.rate_limit {
            let now = Instant::now();
            while st
                .recent
                .front()
                .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
            {
                st.recent.pop_front();
            }
            if st.recent.len() >= limit {
                return error(429, RATE_LIMIT_CODE, "Too Many Requests");
            }
            st.recent.push_back(now);
        }
        let segments = req.segments();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        if segments == ["oauth", "access_token"] {
            return if req.method == "POST" {
                st.issue_token(req)
            } else {
                error(405, 405, "Method Not Allowed")
            };
        }
        if !st.authorized(req) {
            return error(401, 401, "Unauthorized!");
        }
        st.route(req, &segments)
    }

    fn state_json(&self) -> Value {
        let st = lock(&self.state);
        let books: Map<String, Value> = st
            .books
            .values()
            .map(|b| {
                let emails: Map<String, Value> = b
                    .emails
                    .iter()
                    .map(|(k, m)| {
                        (
                            k.clone(),
                            json!({"email": m.email, "status": m.status, "variables": m.variables}),
                        )
                    })
                    .collect();
                (
                    b.id.to_string(),
                    json!({"name": b.name, "variables": b.variables, "emails": emails}),
                )
            })
            .collect();
        json!({
            "credentials_required": st.credentials.is_some() || !st.api_keys.is_empty(),
            "tokens_issued": st.tokens_issued,
            "rate_limit": st.rate_limit,
            "books": books,
            "tags": st.tags.iter().map(|(id, name)| (id.to_string(), json!(name))).collect::<Map<_, _>>(),
            "blacklist": st.blacklist,
            "rejected": st.rejected,
            "deleted": st.deleted,
            "confirmations": st.confirmations.iter().map(|c| json!({"book": c.book, "email": c.email, "sender": c.sender})).collect::<Vec<_>>(),
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
        let Ok(id) = list_id.trim().parse::<u64>() else {
            return BTreeMap::new();
        };
        let st = lock(&self.state);
        st.books
            .get(&id)
            .into_iter()
            .flat_map(|b| b.emails.iter())
            .filter(|(_, m)| receiving(&m.status))
            .map(|(k, m)| (k.clone(), m.variables.clone()))
            .collect()
    }

    fn error_response(&self, status: u16, detail: &str) -> Response {
        match status {
            429 => error(429, RATE_LIMIT_CODE, "Too Many Requests"),
            401 => error(401, 401, "Unauthorized!"),
            _ => error(
                status,
                i64::from(status),
                &format!("{} ({detail})", reason_phrase(status)),
            ),
        }
    }
}

impl SendPulse {
    /// `POST /_admin/sendpulse/<action>`; see README.md.
    fn admin_action(&self, action: &str, body: &Map<String, Value>) -> Result<(), String> {
        match action {
            "status" => {
                let book = body
                    .get("book")
                    .and_then(Value::as_u64)
                    .ok_or("book (a number) is required")?;
                let (email, status) = (req_str(body, "email")?, req_str(body, "status")?);
                if !self.set_status(book, email, status) {
                    return Err(format!(
                        "no {email} in mailing list {book}, or bad status {status:?}"
                    ));
                }
            }
            "credentials" => match opt_str(body, "client_id")? {
                Some(id) => self.set_credentials(id, req_str(body, "client_secret")?),
                None => self.accept_any_credentials(),
            },
            "api_key" => self.add_api_key(req_str(body, "key")?),
            "expire_tokens" => self.expire_tokens(),
            "rate_limit" => self.set_rate_limit(
                body.get("per_second")
                    .and_then(Value::as_u64)
                    .map(|n| n as usize),
            ),
            "book" => {
                self.create_book(req_str(body, "name")?);
            }
            "reject" => self.reject_address(
                req_str(body, "email")?,
                opt_str(body, "message")?.unwrap_or("Argument email is invalid"),
            ),
            "blacklist" => self.blacklist(req_str(body, "email")?),
            _ => return Err(format!("unknown sendpulse admin action {action:?}")),
        }
        Ok(())
    }
}

/// `application/x-www-form-urlencoded` or JSON, as the token endpoint takes either.
fn form_or_json(req: &Request) -> Map<String, Value> {
    if let Ok(Value::Object(map)) = req.json() {
        return map;
    }
    req.body_text()
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (percent_decode(k, true), json!(percent_decode(v, true))))
        .collect()
}

fn email_list(body: &Map<String, Value>) -> Result<Vec<String>, Response> {
    match body.get("emails") {
        None | Some(Value::Null) => Err(invalid("Argument emails missing")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(|s| s.trim().to_string())
                    .ok_or_else(|| invalid("Argument emails is invalid"))
            })
            .collect(),
        Some(_) => Err(invalid("Argument emails must be array")),
    }
}

fn object_body(req: &Request) -> Result<Map<String, Value>, Response> {
    match req.json() {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(error(400, 400, "Invalid JSON")),
    }
}

fn page_param(req: &Request, name: &str, default: usize) -> Result<usize, Response> {
    match req.query_param(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| invalid(&format!("Argument {name} must be integer"))),
    }
}

impl State {
    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn create_book(&mut self, name: &str) -> u64 {
        let id = self.next_id();
        self.books.insert(
            id,
            Book {
                id,
                name: name.to_string(),
                variables: BTreeMap::new(),
                emails: BTreeMap::new(),
            },
        );
        id
    }

    fn issue_token(&mut self, req: &Request) -> Response {
        let form = form_or_json(req);
        let field = |k: &str| form.get(k).and_then(Value::as_str).unwrap_or("");
        if field("grant_type") != "client_credentials" {
            return error(400, 400, "Unsupported grant type");
        }
        if let Some((id, secret)) = &self.credentials
            && (field("client_id") != id || field("client_secret") != secret)
        {
            return Response::json(
                401,
                &json!({"error": "invalid_client", "error_description": "Client authentication failed", "message": "Client authentication failed", "error_code": 401}),
            );
        }
        self.tokens_issued += 1;
        let serial = self.next_id();
        let token = format!("sp-token-{}-{serial}", self.tokens_issued);
        self.tokens
            .insert(token.clone(), Instant::now() + self.token_lifetime);
        Response::json(
            200,
            &json!({"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime.as_secs()}),
        )
    }

    fn authorized(&mut self, req: &Request) -> bool {
        let enforced = self.credentials.is_some() || !self.api_keys.is_empty();
        let bearer = req
            .header("authorization")
            .and_then(|h| {
                h.strip_prefix("Bearer ")
                    .or_else(|| h.strip_prefix("bearer "))
            })
            .map(str::trim);
        let now = Instant::now();
        self.tokens.retain(|_, expires| *expires > now);
        match bearer {
            _ if !enforced => true,
            Some(token) => self.api_keys.contains(token) || self.tokens.contains_key(token),
            None => false,
        }
    }

    fn route(&mut self, req: &Request, segments: &[&str]) -> Response {
        let result = match (req.method.as_str(), segments) {
            ("GET", ["addressbooks"]) => self.list_books(req),
            ("POST", ["addressbooks"]) => self.add_book(req),
            ("GET", ["tags"]) => Ok(self.list_tags()),
            ("GET", ["blacklist"]) => Ok(Response::json(200, &json!(self.blacklist))),
            ("POST", ["tags"]) => self.add_tag(req),
            ("POST", ["emails"]) => self.emails_info(req),
            ("DELETE", ["emails", email]) => Ok(self.delete_everywhere(email)),
            (method, ["addressbooks", id, rest @ ..]) => match id.parse::<u64>() {
                Ok(id) if self.books.contains_key(&id) => self.book_route(id, method, rest, req),
                _ => Err(book_not_found()),
            },
            _ => Err(error(404, 404, "Not found")),
        };
        result.unwrap_or_else(|response| response)
    }

    fn list_books(&self, req: &Request) -> Result<Response, Response> {
        let limit = page_param(req, "limit", MAX_PAGE)?;
        let offset = page_param(req, "offset", 0)?;
        if limit == 0 || limit > MAX_PAGE {
            return Err(invalid(&format!(
                "Argument limit may not be greater than {MAX_PAGE}"
            )));
        }
        let page: Vec<Value> = self
            .books
            .values()
            .skip(offset)
            .take(limit)
            .map(Book::info)
            .collect();
        Ok(Response::json(200, &Value::Array(page)))
    }

    fn add_book(&mut self, req: &Request) -> Result<Response, Response> {
        let body = object_body(req)?;
        let name = match body.get("bookName") {
            Some(Value::String(name)) if !name.trim().is_empty() => name.trim().to_string(),
            Some(Value::String(_)) | None => return Err(invalid("Argument bookName missing")),
            Some(_) => return Err(invalid("Argument bookName must be string")),
        };
        if self.books.values().any(|b| b.name == name) {
            return Err(error(422, 203, "Name already in use"));
        }
        let id = self.create_book(&name);
        Ok(Response::json(200, &json!({ "id": id })))
    }

    fn list_tags(&self) -> Response {
        let tags: Vec<Value> = self
            .tags
            .iter()
            .map(|(id, name)| json!({"id": id, "name": name, "color": "#f0f4f6"}))
            .collect();
        Response::json(
            200,
            &json!({"tags": tags, "user_id": 7043663, "version": "2.7.3"}),
        )
    }

    fn add_tag(&mut self, req: &Request) -> Result<Response, Response> {
        let body = object_body(req)?;
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.trim().is_empty())
            .ok_or_else(|| invalid("Argument name missing"))?;
        if body.get("color").and_then(Value::as_str).is_none() {
            return Err(invalid("Argument color missing"));
        }
        if !self.tags.values().any(|t| t == name) {
            let id = self.next_id();
            self.tags.insert(id, name.to_string());
        }
        let queue_id = format!("queue-{}", self.next_id());
        Ok(Response::json(
            200,
            &json!({"code": "request_sended_to_queue", "description": "Request sended to queue", "failure": false,
                    "http_code": 200, "queue_id": queue_id, "success": true, "user_id": 7043663, "version": "2.7.3"}),
        ))
    }

    /// `POST /emails`: for each address in some list, its lists (`book_id`, numeric `status`,
    /// `variables`); addresses in no list are left out.
    fn emails_info(&self, req: &Request) -> Result<Response, Response> {
        let body = object_body(req)?;
        let mut answer = Map::new();
        for email in email_list(&body)? {
            let key = email.to_lowercase();
            let entries: Vec<Value> = self
                .books
                .values()
                .filter_map(|b| {
                    let m = b.emails.get(&key)?;
                    Some(json!({
                        "book_id": b.id,
                        "status": status_code(&m.status),
                        "variables": variables_list(b, m),
                    }))
                })
                .collect();
            if !entries.is_empty() {
                answer.insert(email, Value::Array(entries));
            }
        }
        Ok(Response::json(200, &Value::Object(answer)))
    }

    fn delete_everywhere(&mut self, email: &str) -> Response {
        let key = email.trim().to_lowercase();
        let mut found = false;
        for book in self.books.values_mut() {
            found |= book.emails.remove(&key).is_some();
        }
        self.contact_tags.remove(&key);
        if found {
            self.deleted.push(key);
        }
        Response::json(200, &json!({ "result": true }))
    }

    fn book_route(
        &mut self,
        id: u64,
        method: &str,
        rest: &[&str],
        req: &Request,
    ) -> Result<Response, Response> {
        match (method, rest) {
            ("GET", []) => {
                let book = &self.books[&id];
                Ok(Response::json(200, &json!([book.info()])))
            }
            ("DELETE", []) => {
                self.books.remove(&id);
                Ok(Response::json(200, &json!({ "result": true })))
            }
            ("GET", ["variables"]) => {
                let vars: Vec<Value> = self.books[&id]
                    .variables
                    .iter()
                    .map(|(name, kind)| json!({"name": name, "type": kind}))
                    .collect();
                Ok(Response::json(200, &Value::Array(vars)))
            }
            ("GET", ["emails"]) => self.book_emails(id, req),
            ("POST", ["emails"]) => self.add_emails(id, req),
            ("DELETE", ["emails"]) => {
                let emails = self.removal_list(req)?;
                let book = self.books.get_mut(&id).expect("checked by the caller");
                for email in emails {
                    book.emails.remove(&email.to_lowercase());
                }
                Ok(Response::json(200, &json!({ "result": true })))
            }
            ("POST", ["emails", "unsubscribe"]) => {
                let emails = self.removal_list(req)?;
                let book = self.books.get_mut(&id).expect("checked by the caller");
                let mut changed = 0;
                for email in emails {
                    if let Some(m) = book
                        .emails
                        .get_mut(&email.to_lowercase())
                        .filter(|m| receiving(&m.status))
                    {
                        m.status = "unsubscribed".into();
                        changed += 1;
                    }
                }
                if changed == 0 {
                    return Err(invalid("Active emails not found"));
                }
                Ok(Response::json(200, &json!({ "result": true })))
            }
            ("GET", ["emails", email]) => {
                let book = &self.books[&id];
                let m = book
                    .emails
                    .get(&email.trim().to_lowercase())
                    .ok_or_else(|| error(404, 502, "Email address not found"))?;
                Ok(Response::json(
                    200,
                    &json!({
                        "email": m.email,
                        "abook_id": id.to_string(),
                        "phone": "",
                        "status": status_code(&m.status),
                        "status_explain": status_explain(&m.status),
                        "variables": variables_list(book, m),
                    }),
                ))
            }
            _ => Err(error(404, 404, "Not found")),
        }
    }

    fn book_emails(&self, id: u64, req: &Request) -> Result<Response, Response> {
        let limit = page_param(req, "limit", MAX_PAGE)?;
        let offset = page_param(req, "offset", 0)?;
        if limit == 0 || limit > MAX_PAGE {
            return Err(invalid(&format!(
                "Argument limit may not be greater than {MAX_PAGE}"
            )));
        }
        let active = req.query_param("active").as_deref() == Some("true");
        let not_active = req.query_param("not_active").as_deref() == Some("true");
        let page: Vec<Value> = self.books[&id]
            .emails
            .values()
            .filter(|m| (!active || receiving(&m.status)) && (!not_active || !receiving(&m.status)))
            .skip(offset)
            .take(limit)
            .map(|m| json!({"email": m.email, "status": status_code(&m.status), "status_explain": status_explain(&m.status), "variables": m.variables}))
            .collect();
        Ok(Response::json(200, &Value::Array(page)))
    }

    fn removal_list(&self, req: &Request) -> Result<Vec<String>, Response> {
        let body = object_body(req)?;
        let emails = email_list(&body)?;
        if emails.is_empty() {
            return Err(error(422, 303, "No emails"));
        }
        if emails.len() > MAX_EMAILS_PER_REMOVAL {
            return Err(invalid(&format!(
                "Limit is exceeded. Max count: {MAX_EMAILS_PER_REMOVAL}"
            )));
        }
        Ok(emails)
    }

    /// `POST /addressbooks/{id}/emails`: validates the whole request first (SendPulse applies
    /// all or nothing), then adds new addresses (`new`, `unconfirmed` with confirmation, or
    /// `blacklisted`) and updates the variables of known ones without touching their status.
    fn add_emails(&mut self, id: u64, req: &Request) -> Result<Response, Response> {
        let body = object_body(req)?;
        let Some(Value::Array(items)) = body.get("emails") else {
            return Err(invalid("Argument emails missing"));
        };
        if items.is_empty() {
            return Err(error(422, 303, "No emails"));
        }
        let confirm = match body.get("confirmation") {
            None | Some(Value::Null) => false,
            Some(Value::String(c)) if c == "force" => true,
            Some(Value::String(_)) => return Err(invalid("Argument confirmation is invalid")),
            Some(_) => return Err(invalid("Argument confirmation must be string")),
        };
        let sender = body.get("sender_email").and_then(Value::as_str);
        if confirm {
            match sender {
                None => return Err(invalid("Argument sender_email missing")),
                Some(s) if !is_valid_email(s) => {
                    return Err(invalid("Argument sender_email is invalid"));
                }
                Some(_) => {}
            }
        }
        let lang = body
            .get("message_lang")
            .and_then(Value::as_str)
            .map(str::to_string);
        let tag_ids: Vec<u64> = match body.get("tags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| {
                    v.as_u64()
                        .filter(|id| self.tags.contains_key(id))
                        .ok_or_else(|| invalid("Argument tags is invalid"))
                })
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(invalid("Argument tags must be array")),
        };
        let mut changes = Vec::with_capacity(items.len());
        for item in items {
            let Some(obj) = item.as_object() else {
                return Err(invalid("Argument emails is invalid"));
            };
            let email = obj
                .get("email")
                .and_then(Value::as_str)
                .map(str::trim)
                .ok_or_else(|| invalid("Argument email is invalid"))?;
            if let Some(message) = self.rejected.get(&email.to_lowercase()) {
                return Err(invalid(message));
            }
            if !is_valid_email(email) {
                return Err(invalid("Argument email is invalid"));
            }
            let variables = match obj.get("variables") {
                None | Some(Value::Null) => Map::new(),
                Some(Value::Object(vars)) => vars.clone(),
                Some(_) => return Err(invalid("Argument emails.*.variables is invalid")),
            };
            changes.push((email.to_string(), variables));
        }
        for (email, variables) in changes {
            let key = email.to_lowercase();
            let blacklisted = self.blacklist.contains(&key);
            let book = self.books.get_mut(&id).expect("checked by the caller");
            for name in variables.keys() {
                book.variables
                    .entry(name.clone())
                    .or_insert_with(|| "string".into());
            }
            match book.emails.get_mut(&key) {
                Some(existing) => existing.variables.extend(variables),
                None => {
                    let status = if blacklisted {
                        "blacklisted"
                    } else if confirm {
                        "unconfirmed"
                    } else {
                        "new"
                    };
                    book.emails.insert(
                        key.clone(),
                        BookMember {
                            email: email.clone(),
                            status: status.into(),
                            variables,
                        },
                    );
                    if confirm && !blacklisted {
                        self.confirmations.push(Confirmation {
                            book: id,
                            email: email.clone(),
                            sender: sender.unwrap_or_default().to_string(),
                            lang: lang.clone(),
                        });
                    }
                }
            }
            if !tag_ids.is_empty() {
                self.contact_tags
                    .entry(key)
                    .or_default()
                    .extend(tag_ids.iter().copied());
            }
        }
        Ok(Response::json(200, &json!({ "result": true })))
    }
}

impl Book {
    fn info(&self) -> Value {
        let active = self
            .emails
            .values()
            .filter(|m| receiving(&m.status))
            .count();
        json!({
            "id": self.id,
            "name": self.name,
            "all_email_qty": self.emails.len(),
            "active_email_qty": active,
            "inactive_email_qty": self.emails.len() - active,
            "creationdate": "2024-01-01 00:00:00",
            "status": 0,
            "status_explain": "Active",
        })
    }
}

fn variables_list(book: &Book, member: &BookMember) -> Vec<Value> {
    member
        .variables
        .iter()
        .map(|(name, value)| {
            let kind = book.variables.get(name).map_or("string", String::as_str);
            json!({"name": name, "type": kind, "value": value})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request as the server would parse it off the wire.
    fn raw(method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> Request {
        let mut text = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        text.push_str(body);
        crate::http::read_request(
            &mut std::io::BufReader::new(text.as_bytes()),
            &mut Vec::new(),
        )
        .expect("a well-formed request")
    }

    fn request(method: &str, path: &str, body: Value) -> Request {
        raw(
            method,
            path,
            &[("authorization", "Bearer t")],
            &body.to_string(),
        )
    }

    #[test]
    fn adds_never_change_an_existing_status() {
        let fake = SendPulse::new();
        let book = fake.create_book("vip");
        let add = |email: &str| {
            fake.handle(&request(
                "POST",
                &format!("/addressbooks/{book}/emails"),
                json!({"emails": [{"email": email, "variables": {"name": "Ann"}}]}),
            ))
        };
        assert_eq!(add("ann@example.com").status, 200);
        assert!(fake.set_status(book, "ann@example.com", "unsubscribed"));
        assert_eq!(add("Ann@Example.com").status, 200);
        assert_eq!(
            fake.member(book, "ann@example.com").unwrap().status,
            "unsubscribed"
        );
        assert!(fake.list_members(&book.to_string()).is_empty());
    }

    #[test]
    fn removals_take_at_most_100_addresses() {
        let fake = SendPulse::new();
        let book = fake.create_book("vip");
        let emails: Vec<String> = (0..101).map(|i| format!("p{i}@example.com")).collect();
        let response = fake.handle(&request(
            "DELETE",
            &format!("/addressbooks/{book}/emails"),
            json!({ "emails": emails }),
        ));
        assert_eq!(response.status, 422);
    }

    #[test]
    fn tokens_expire_and_credentials_are_checked() {
        let fake = SendPulse::new();
        fake.set_credentials("id", "secret");
        let token = |secret: &str| {
            let body = format!("grant_type=client_credentials&client_id=id&client_secret={secret}");
            raw("POST", "/oauth/access_token", &[], &body)
        };
        assert_eq!(fake.handle(&token("wrong")).status, 401);
        let issued = fake.handle(&token("secret"));
        let value: Value = serde_json::from_slice(&issued.body).unwrap();
        let bearer = format!("Bearer {}", value["access_token"].as_str().unwrap());
        let books = || raw("GET", "/addressbooks", &[("authorization", &bearer)], "");
        assert_eq!(fake.handle(&books()).status, 200);
        fake.expire_tokens();
        assert_eq!(fake.handle(&books()).status, 401);
    }
}
