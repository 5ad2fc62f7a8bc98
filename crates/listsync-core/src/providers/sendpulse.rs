//! SendPulse bulk email REST API (`api.sendpulse.com`).
//!
//! A binding's list is a SendPulse mailing list ("address book"); mapped fields are the book's
//! variables and binding tags are SendPulse contact tags. Authentication is the OAuth2 client
//! credentials grant (`POST /oauth/access_token`, a bearer token for an hour, cached in a
//! [`kit::BearerToken`]: renewed before it expires and once on a 401) or a static API key.
//!
//! SendPulse answers an add with a bare `{"result": true}`, so consent is read before writing:
//! `POST /emails` tells which addresses the book already holds, and for those the book's status
//! explanation (`GET /addressbooks/{id}/emails/{email}`) tells unsubscribed, bounced or
//! complained addresses apart; those are never sent again. A batch the API rejects is split in
//! halves until the offending address is alone, so one bad address fails only itself.

use super::kit::{BearerToken, IssuedToken};
use super::{
    Binding, Capabilities, Config, ConsentStatus, LeaveAction, Limits, Member, MemberStatus, Need,
    Outcome, Provider, Spec, kit,
};
use crate::http::{
    Http, Method, ProviderError, Request, Response, Result, percent_encode, transient,
};
use serde_json::{Map, Value, json};
use std::collections::HashMap;
use std::time::Duration;

pub static SPEC: Spec = Spec {
    name: "sendpulse",
    settings: &[
        ("sender_email", Need::Optional),
        ("message_lang", Need::Optional),
        ("confirmation_template_id", Need::Optional),
    ],
    secrets: &[
        ("client_id", Need::Optional),
        ("client_secret", Need::Optional),
        ("api_key", Need::Optional),
    ],
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

const DEFAULT_ROOT: &str = "https://api.sendpulse.com";
/// Addresses per call: the documented maximum of the removal calls, and small enough that the
/// per-address status reads of one upsert batch stay within seconds at 10 requests/s.
const BATCH: usize = 100;
/// SendPulse's error code for "more than 10 requests per second".
const TOO_MANY_REQUESTS: i64 = 2_020_202_020;
/// SendPulse's error code for "mailing list not found".
const BOOK_NOT_FOUND: i64 = 213;
/// SendPulse's error code for "this mailing list name already exists".
const NAME_IN_USE: i64 = 203;
/// Error codes meaning "no such address here": what a removal wants anyway.
const ADDRESS_NOT_FOUND: [i64; 4] = [17, 303, 502, 14];

fn validate(config: &Config) -> std::result::Result<(), String> {
    let present = |key: &str| config.secret(key).is_some_and(|v| !v.trim().is_empty());
    match (
        present("api_key"),
        present("client_id"),
        present("client_secret"),
    ) {
        (true, false, false) | (false, true, true) => {}
        (true, _, _) => {
            return Err("use either secrets.api_key or secrets.client_id with secrets.client_secret, not both".into());
        }
        (false, true, false) => return Err("missing required key secrets.client_secret".into()),
        (false, false, true) => return Err("missing required key secrets.client_id".into()),
        (false, false, false) => {
            return Err(
                "missing required key secrets.client_id (with secrets.client_secret), or secrets.api_key"
                    .into(),
            );
        }
    }
    if let Some(sender) = config.setting("sender_email")
        && !sender.contains('@')
    {
        return Err(format!(
            "settings.sender_email must be an email address, not \"{sender}\""
        ));
    }
    Ok(())
}

/// Variables are free-form names; the address itself is the contact's identity.
fn field_name(name: &str) -> std::result::Result<(), String> {
    if name.trim().eq_ignore_ascii_case("email") {
        return Err(
            "the address is the contact's identity at SendPulse; map other variables".into(),
        );
    }
    Ok(())
}

fn connect(config: &Config) -> Box<dyn Provider> {
    Box::new(build(config))
}

fn build(config: &Config) -> SendPulse {
    let secret = |key: &str| {
        config
            .secret(key)
            .filter(|v| !v.trim().is_empty())
            .map(str::to_string)
    };
    let auth = match secret("api_key") {
        Some(key) => Auth::Key(key),
        None => Auth::Client {
            id: secret("client_id").unwrap_or_default(),
            secret: secret("client_secret").unwrap_or_default(),
            token: BearerToken::default(),
        },
    };
    SendPulse {
        root: config.base_url(DEFAULT_ROOT),
        auth,
        sender_email: config.setting("sender_email").map(str::to_string),
        message_lang: config.setting("message_lang").unwrap_or("en").to_string(),
        template_id: config
            .setting("confirmation_template_id")
            .map(str::to_string),
    }
}

enum Auth {
    /// A static API key, sent as the bearer token.
    Key(String),
    /// OAuth2 client credentials and the token they were last exchanged for.
    Client {
        id: String,
        secret: String,
        token: BearerToken,
    },
}

/// A token for the client credentials (`POST /oauth/access_token`).
fn exchange_credentials(
    http: &mut Http,
    root: &str,
    id: &str,
    secret: &str,
) -> Result<IssuedToken> {
    let request = Request::new(Method::Post, format!("{root}/oauth/access_token")).form(&[
        ("grant_type".into(), "client_credentials".into()),
        ("client_id".into(), id.into()),
        ("client_secret".into(), secret.into()),
    ]);
    let response = http.send("get access token", request)?;
    if matches!(response.status, 400..=499) && response.status != 408 && response.status != 429 {
        return Err(ProviderError::Auth(format!(
            "SendPulse refused the client credentials (HTTP {}): {}",
            response.status,
            describe(&response)
        )));
    }
    response.check_common(describe)?;
    if !response.is_success() {
        return Err(transient(format!(
            "HTTP {} from the token endpoint: {}",
            response.status,
            describe(&response)
        )));
    }
    IssuedToken::from_answer(
        &response,
        Duration::from_secs(3600),
        "SendPulse's token answer has no access_token",
    )
}

struct SendPulse {
    root: String,
    auth: Auth,
    sender_email: Option<String>,
    message_lang: String,
    template_id: Option<String>,
}

/// A SendPulse error answer: `{"message": ..., "error_code": ...}` with a 4xx, or a 2xx whose
/// body says `"result": false`.
#[derive(Debug, Clone, PartialEq)]
struct ApiError {
    status: u16,
    code: Option<i64>,
    message: String,
}

impl ApiError {
    fn describe(&self) -> String {
        match self.code {
            Some(code) if code != i64::from(self.status) => {
                format!(
                    "HTTP {}: {} (SendPulse error {code})",
                    self.status, self.message
                )
            }
            _ => format!("HTTP {}: {}", self.status, self.message),
        }
    }

    fn rejected(&self) -> ProviderError {
        ProviderError::Rejected(self.describe())
    }

    fn book_missing(&self) -> bool {
        self.status == 404 || self.code == Some(BOOK_NOT_FOUND)
    }

    fn address_missing(&self) -> bool {
        self.code.is_some_and(|c| ADDRESS_NOT_FOUND.contains(&c))
            || self.message.to_lowercase().contains("not found")
    }

    /// Errors about the connection's double opt-in settings, not about any one address.
    fn about_settings(&self) -> bool {
        let message = self.message.to_lowercase();
        self.code == Some(1003) || message.contains("sender") || message.contains("confirmation")
    }
}

type Answer = std::result::Result<Value, ApiError>;

/// SendPulse's words for a failed answer: its `message` (or OAuth's `error_description`).
fn message_of(body: &Value, response: &Response) -> String {
    ["message", "error_description", "error"]
        .iter()
        .find_map(|k| body[*k].as_str().filter(|s| !s.is_empty()))
        .map(str::to_string)
        .unwrap_or_else(|| response.text_excerpt())
}

fn code_of(body: &Value) -> Option<i64> {
    kit::numeric(&body["error_code"])
}

fn describe(response: &Response) -> String {
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    match code_of(&body) {
        Some(code) => format!("{} (SendPulse error {code})", message_of(&body, response)),
        None => message_of(&body, response),
    }
}

/// Ids arrive as numbers or as numeric strings, depending on the endpoint.
fn as_id(value: &Value) -> Option<u64> {
    kit::numeric(value)
}

/// What the book holds for an address before an upsert.
#[derive(Debug, Clone, PartialEq)]
enum BookState {
    /// Not in the book: a new member.
    Absent,
    /// In the book and receiving (or waiting for its double opt-in confirmation).
    Receiving(MemberStatus),
    /// In the book with a consent state the sync must respect.
    Refused(ConsentStatus, String),
    /// In the book with a state this adapter does not know: left alone.
    Unknown(String),
}

/// Reads SendPulse's status explanation ("New", "Active", "Unsubscribed", ...). Refusals are
/// matched first so that "Inactive" or "Not active" never read as active.
fn classify(explain: &str) -> BookState {
    let text = explain.trim().to_lowercase();
    let refused = if text.contains("unsubscrib") {
        Some(ConsentStatus::Unsubscribed)
    } else if text.contains("spam") || text.contains("complain") || text.contains("abuse") {
        Some(ConsentStatus::Complained)
    } else if text.contains("bounce")
        || text.contains("undeliver")
        || text.contains("invalid")
        || text.contains("not exist")
        || text.contains("unavailable")
    {
        Some(ConsentStatus::Bounced)
    } else if text.contains("blacklist") || text.contains("block") {
        Some(ConsentStatus::Unsubscribed)
    } else {
        None
    };
    if let Some(status) = refused {
        return BookState::Refused(status, explain.trim().to_string());
    }
    if text.contains("inactive") || text.contains("not active") || text.contains("deleted") {
        return BookState::Unknown(explain.trim().to_string());
    }
    if text.contains("confirm") || text.contains("pending") || text.contains("awaiting") {
        return BookState::Receiving(MemberStatus::Pending);
    }
    if text == "new" || text.contains("active") {
        return BookState::Receiving(MemberStatus::Subscribed);
    }
    BookState::Unknown(explain.trim().to_string())
}

/// Variable values as SendPulse's variable types want them: numbers for `number`,
/// `YYYY-MM-DD` for `date`, text otherwise (an empty text clears a variable).
fn variable_value(value: &Value, kind: Option<&str>) -> Value {
    let Some(text) = kit::text(value) else {
        return Value::String(String::new());
    };
    match kind {
        Some("number") => {
            let trimmed = text.trim();
            if let Ok(n) = trimmed.parse::<i64>() {
                json!(n)
            } else {
                trimmed
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Value::Number)
                    .unwrap_or(Value::String(text))
            }
        }
        Some("date") if text.len() >= 10 && text.as_bytes()[4] == b'-' => {
            Value::String(text[..10].to_string())
        }
        _ => Value::String(text),
    }
}

impl SendPulse {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.root)
    }

    fn send(&mut self, http: &mut Http, operation: &str, request: Request) -> Result<Response> {
        match &mut self.auth {
            Auth::Key(key) => http.send(
                operation,
                request.header("authorization", format!("Bearer {key}")),
            ),
            Auth::Client { id, secret, token } => {
                let root = &self.root;
                token.send(http, operation, request, |http| {
                    exchange_credentials(http, root, id, secret)
                })
            }
        }
    }

    /// Sends and classifies: 401/403 → Auth, 429/5xx and SendPulse's rate-limit code →
    /// Transient, malformed JSON → Transient; SendPulse's own refusals come back as `ApiError`.
    fn call(&mut self, http: &mut Http, operation: &str, request: Request) -> Result<Answer> {
        let response = self.send(http, operation, request)?;
        let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        if code_of(&body) == Some(TOO_MANY_REQUESTS) {
            return Err(ProviderError::Transient {
                message: format!("HTTP {}: {}", response.status, describe(&response)),
                retry_after: response.retry_after().or(Some(Duration::from_secs(1))),
            });
        }
        response.check_common(describe)?;
        if response.is_success() {
            let body = response.json()?;
            let refused = body["result"] == Value::Bool(false)
                || matches!(&body["is_error"], Value::Bool(true))
                || body["is_error"].as_i64() == Some(1);
            if !refused {
                return Ok(Ok(body));
            }
        }
        Ok(Err(ApiError {
            status: response.status,
            code: code_of(&body),
            message: message_of(&body, &response),
        }))
    }

    fn get(&mut self, http: &mut Http, operation: &str, path: &str) -> Result<Answer> {
        let request = Request::new(Method::Get, self.url(path));
        self.call(http, operation, request)
    }

    fn with_body(
        &mut self,
        http: &mut Http,
        operation: &str,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<Answer> {
        let request = Request::new(method, self.url(path)).json(body);
        self.call(http, operation, request)
    }

    fn book_gone(book: impl std::fmt::Display) -> ProviderError {
        ProviderError::Binding(format!("mailing list {book} no longer exists at SendPulse"))
    }

    fn book_id(binding: &Binding) -> Result<u64> {
        kit::numeric_list_id(binding, "SendPulse mailing list id")
    }
}

impl kit::ListDirectory for SendPulse {
    const KIND: &'static str = "mailing list";
    const PROVIDER: &'static str = "SendPulse";

    /// Pages through all the mailing lists (100 per page).
    fn list_by_name(&mut self, http: &mut Http, name: &str) -> Result<Option<String>> {
        let mut offset = 0;
        loop {
            let path = format!("/addressbooks?limit=100&offset={offset}");
            let page = self
                .get(http, "list mailing lists", &path)?
                .map_err(|e| e.rejected())?;
            let books = page.as_array().cloned().unwrap_or_default();
            if let Some(book) = books.iter().find(|b| b["name"].as_str() == Some(name)) {
                return Ok(as_id(&book["id"]).map(|id| id.to_string()));
            }
            if books.len() < 100 {
                return Ok(None);
            }
            offset += books.len();
        }
    }

    fn create_list(&mut self, http: &mut Http, name: &str) -> Result<String> {
        let answer = self.with_body(
            http,
            "create mailing list",
            Method::Post,
            "/addressbooks",
            &json!({"bookName": name}),
        )?;
        match answer {
            Ok(created) => as_id(&created["id"])
                .map(|id| id.to_string())
                .ok_or_else(|| {
                    ProviderError::Rejected(format!(
                        "SendPulse returned no id for the new mailing list \"{name}\""
                    ))
                }),
            // Created meanwhile by another worker: use it.
            Err(e) if e.code == Some(NAME_IN_USE) => {
                self.list_by_name(http, name)?.ok_or_else(|| e.rejected())
            }
            Err(e) => Err(e.rejected()),
        }
    }

    fn list_by_id(&mut self, http: &mut Http, id: &str) -> Result<Option<String>> {
        let book: u64 = id.trim().parse().map_err(|_| {
            ProviderError::Binding(format!(
                "SendPulse mailing list id \"{id}\" is not a number"
            ))
        })?;
        match self.get(http, "get mailing list", &format!("/addressbooks/{book}"))? {
            Ok(Value::Array(found)) if !found.is_empty() => Ok(Some(book.to_string())),
            Ok(Value::Object(_)) => Ok(Some(book.to_string())),
            Ok(_) => Err(Self::book_gone(book)),
            Err(e) if e.book_missing() => Ok(None),
            Err(e) => Err(e.rejected()),
        }
    }
}

impl SendPulse {
    /// Tag name → id, creating missing tags. SendPulse queues tag creation, so a tag that is
    /// not listed yet right after its creation makes `prepare` retry later.
    fn resolve_tags(&mut self, http: &mut Http, names: &[String]) -> Result<Map<String, Value>> {
        let mut known = self.list_tags(http)?;
        let missing: Vec<&String> = names.iter().filter(|n| !known.contains_key(*n)).collect();
        if !missing.is_empty() {
            for name in &missing {
                self.with_body(
                    http,
                    "create tag",
                    Method::Post,
                    "/tags",
                    &json!({"name": name, "color": "#f0f4f6"}),
                )?
                .map_err(|e| e.rejected())?;
            }
            known = self.list_tags(http)?;
            if let Some(pending) = missing.iter().find(|n| !known.contains_key(**n)) {
                return Err(transient(format!(
                    "SendPulse has queued the creation of tag \"{pending}\"; the binding is prepared once it exists"
                )));
            }
        }
        Ok(names
            .iter()
            .filter_map(|n| known.get(n).map(|id| (n.clone(), json!(id))))
            .collect())
    }

    fn list_tags(&mut self, http: &mut Http) -> Result<HashMap<String, u64>> {
        let answer = self
            .get(http, "list tags", "/tags")?
            .map_err(|e| e.rejected())?;
        let tags = match &answer {
            Value::Array(items) => items.clone(),
            other => other["tags"].as_array().cloned().unwrap_or_default(),
        };
        Ok(tags
            .iter()
            .filter_map(|t| Some((t["name"].as_str()?.to_string(), as_id(&t["id"])?)))
            .collect())
    }

    /// What the book holds for each address of a batch: one `POST /emails` for the batch, and
    /// a status read for each address the book holds when that answer carries no explanation.
    fn book_states(
        &mut self,
        http: &mut Http,
        book: u64,
        members: &[Member],
    ) -> Result<HashMap<String, BookState>> {
        let addresses: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
        let answer = self
            .with_body(
                http,
                "read contact statuses",
                Method::Post,
                "/emails",
                &json!({"emails": addresses}),
            )?
            .map_err(|e| e.rejected())?;
        let entries: HashMap<String, &Value> = answer
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.to_lowercase(), v))
            .collect();
        let mut states = HashMap::new();
        for member in members {
            let ours = entries
                .get(&member.address.to_lowercase())
                .and_then(|v| v.as_array())
                .and_then(|list| list.iter().find(|e| as_id(&e["book_id"]) == Some(book)));
            let state = match ours {
                None => BookState::Absent,
                Some(entry) => match entry["status_explain"].as_str() {
                    Some(explain) => classify(explain),
                    None => self.address_state(http, book, &member.address)?,
                },
            };
            states.insert(member.address.clone(), state);
        }
        Ok(states)
    }

    fn address_state(&mut self, http: &mut Http, book: u64, address: &str) -> Result<BookState> {
        let path = format!("/addressbooks/{book}/emails/{}", percent_encode(address));
        match self.get(http, "read contact status", &path)? {
            Ok(entry) => Ok(match entry["status_explain"].as_str() {
                Some(explain) => classify(explain),
                None if entry.is_null() || entry["email"].is_null() => BookState::Absent,
                None => {
                    BookState::Unknown(format!("status {} without explanation", entry["status"]))
                }
            }),
            Err(e) if e.code == Some(BOOK_NOT_FOUND) => Err(Self::book_gone(book)),
            // The address left the list since `POST /emails` was answered.
            Err(e) if e.status == 404 || e.address_missing() => Ok(BookState::Absent),
            Err(e) => Err(e.rejected()),
        }
    }

    /// `POST /addressbooks/{id}/emails`, with the double opt-in parameters when `confirm`.
    fn add_emails(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        book: u64,
        members: &[&Member],
        confirm: bool,
    ) -> Result<std::result::Result<(), ApiError>> {
        let types = binding.remote_object("variable_types");
        let emails: Vec<Value> = members
            .iter()
            .map(|m| {
                let variables = kit::typed_fields(&m.fields, types, variable_value);
                json!({"email": m.address, "variables": variables})
            })
            .collect();
        let mut body = json!({"emails": emails});
        let tags: Vec<Value> = binding
            .remote_object("tag_ids")
            .into_iter()
            .flatten()
            .map(|(_, id)| id.clone())
            .collect();
        if !tags.is_empty() {
            body["tags"] = Value::Array(tags);
        }
        if confirm {
            body["confirmation"] = json!("force");
            body["sender_email"] = json!(self.sender_email);
            body["message_lang"] = json!(self.message_lang);
            if let Some(template) = &self.template_id {
                body["template_id"] = json!(template);
            }
        }
        let path = format!("/addressbooks/{book}/emails");
        Ok(self
            .with_body(http, "add contacts", Method::Post, &path, &body)?
            .map(|_| ()))
    }

    /// Adds members, halving a rejected batch until each rejection is down to one address:
    /// `None` for each address added, `Some(message)` for each one SendPulse refused.
    fn add_isolating(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        book: u64,
        members: &[&Member],
        confirm: bool,
    ) -> Result<Vec<Option<String>>> {
        if members.is_empty() {
            return Ok(Vec::new());
        }
        match self.add_emails(http, binding, book, members, confirm)? {
            Ok(()) => Ok(vec![None; members.len()]),
            Err(e) if e.book_missing() => Err(Self::book_gone(book)),
            Err(e) if confirm && e.about_settings() => Err(ProviderError::Binding(format!(
                "SendPulse refused the double opt-in settings (settings.sender_email, settings.message_lang, settings.confirmation_template_id): {}",
                e.describe()
            ))),
            Err(e) if members.len() == 1 => Ok(vec![Some(e.describe())]),
            Err(_) => {
                let (left, right) = members.split_at(members.len() / 2);
                let mut results = self.add_isolating(http, binding, book, left, confirm)?;
                results.extend(self.add_isolating(http, binding, book, right, confirm)?);
                Ok(results)
            }
        }
    }

    fn upsert_batch(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        book: u64,
        batch: &[Member],
    ) -> Result<Vec<Outcome>> {
        let states = self.book_states(http, book, batch)?;
        let confirm_new = binding.new_member_status == MemberStatus::Pending;
        let sendable = |m: &&Member| {
            matches!(
                states.get(&m.address),
                Some(BookState::Absent | BookState::Receiving(_))
            )
        };
        let is_new = |m: &&Member| states.get(&m.address) == Some(&BookState::Absent);
        // Existing members are never sent with confirmation: that would ask them to confirm
        // again.
        let (confirmed, plain): (Vec<&Member>, Vec<&Member>) = batch
            .iter()
            .filter(sendable)
            .partition(|m| confirm_new && is_new(m));
        let mut errors: HashMap<&str, String> = HashMap::new();
        for (group, confirm) in [(&confirmed, true), (&plain, false)] {
            let results = self.add_isolating(http, binding, book, group, confirm)?;
            for (member, result) in group.iter().zip(results) {
                if let Some(message) = result {
                    errors.insert(member.address.as_str(), message);
                }
            }
        }
        Ok(batch
            .iter()
            .map(|m| {
                if let Some(message) = errors.remove(m.address.as_str()) {
                    return Outcome::failed(message);
                }
                match states.get(&m.address) {
                    Some(BookState::Absent) | None => Outcome::member(binding.new_member_status, None),
                    Some(BookState::Receiving(status)) => Outcome::member(*status, None),
                    Some(BookState::Refused(status, explain)) => Outcome::Refused {
                        status: *status,
                        message: format!(
                            "the address is \"{explain}\" in SendPulse mailing list {book}"
                        ),
                    },
                    Some(BookState::Unknown(explain)) => Outcome::failed(format!(
                        "SendPulse holds the address as \"{explain}\" in mailing list {book}; it is left as it is"
                    )),
                }
            })
            .collect())
    }

    /// A removal call for a whole batch; SendPulse answering that the addresses are not there
    /// is what a removal wants.
    fn remove_batch(
        &mut self,
        http: &mut Http,
        book: u64,
        operation: &str,
        method: Method,
        path: &str,
        batch: &[Member],
    ) -> Result<Vec<Outcome>> {
        let addresses: Vec<&str> = batch.iter().map(|m| m.address.as_str()).collect();
        match self.with_body(http, operation, method, path, &json!({"emails": addresses}))? {
            Ok(_) => {}
            Err(e) if e.book_missing() => return Err(Self::book_gone(book)),
            Err(e) if e.address_missing() || e.message.to_lowercase().contains("active emails") => {
            }
            Err(e) => return Err(e.rejected()),
        }
        Ok(vec![Outcome::Removed; batch.len()])
    }

    /// `DELETE /emails/{email}`: the address leaves every mailing list of the account.
    fn delete_everywhere(&mut self, http: &mut Http, members: &[Member]) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(members.len());
        for member in members {
            let path = format!("/emails/{}", percent_encode(&member.address));
            let request = Request::new(Method::Delete, self.url(&path));
            outcomes.push(match self.call(http, "delete contact", request)? {
                Ok(_) => Outcome::Removed,
                Err(e) if e.address_missing() || e.status == 404 => Outcome::Removed,
                Err(e) => Outcome::failed(e.describe()),
            });
        }
        Ok(outcomes)
    }
}

impl Provider for SendPulse {
    fn limits(&self) -> Limits {
        // SendPulse allows 10 requests per second per account; requests are spaced, not burst.
        Limits::batches(BATCH, BATCH).paced(10.0, 1.0)
    }

    fn check(&mut self, http: &mut Http) -> Result<Value> {
        let books = self
            .get(
                http,
                "list mailing lists",
                "/addressbooks?limit=100&offset=0",
            )?
            .map_err(|e| e.rejected())?;
        Ok(json!({
            "provider": "sendpulse",
            "auth": match self.auth {
                Auth::Key(_) => "api key",
                Auth::Client { .. } => "oauth2 client credentials",
            },
            "mailing_lists": books.as_array().map_or(0, Vec::len),
        }))
    }

    fn prepare(&mut self, http: &mut Http, binding: &mut Binding) -> Result<()> {
        if binding.new_member_status == MemberStatus::Pending && self.sender_email.is_none() {
            return Err(ProviderError::Binding(
                "double opt-in (new_member_status pending) needs settings.sender_email: the confirmed SendPulse sender of the confirmation email".into(),
            ));
        }
        let book = kit::resolve_list(http, self, binding)?;
        let variables = match self.get(
            http,
            "list variables",
            &format!("/addressbooks/{book}/variables"),
        )? {
            Ok(v) => v,
            Err(e) if e.book_missing() => return Err(Self::book_gone(&book)),
            Err(e) => return Err(e.rejected()),
        };
        let types: Map<String, Value> = variables
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| Some((v["name"].as_str()?.to_string(), v["type"].clone())))
            .collect();
        let tags = if binding.tags.is_empty() {
            Map::new()
        } else {
            self.resolve_tags(http, &binding.tags)?
        };
        binding.list_id = Some(book);
        binding.keep_remote("variable_types", types);
        binding.keep_remote("tag_ids", tags);
        Ok(())
    }

    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let book = Self::book_id(binding)?;
        self.upsert_batch(http, binding, book, members)
    }

    fn remove(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        action: LeaveAction,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let book = Self::book_id(binding)?;
        let path = format!("/addressbooks/{book}/emails");
        let (operation, method, path) = match action {
            LeaveAction::Remove => ("remove contacts", Method::Delete, path),
            LeaveAction::Unsubscribe => {
                ("unsubscribe contacts", Method::Post, path + "/unsubscribe")
            }
            LeaveAction::Delete => return self.delete_everywhere(http, members),
            LeaveAction::Archive => {
                return Err(ProviderError::Binding(
                    "SendPulse has no archive; use on_leave remove, unsubscribe or delete".into(),
                ));
            }
        };
        self.remove_batch(http, book, operation, method, &path, members)
    }

    /// SendPulse has no erasure call: the closest is deleting the address from every mailing
    /// list of the account (campaign statistics stay at SendPulse).
    fn erase(
        &mut self,
        http: &mut Http,
        _binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        self.delete_everywhere(http, members)
    }
}

#[cfg(test)]
mod unit {
    use super::*;
    use crate::providers::test_support::config;

    #[test]
    fn credentials_are_a_client_pair_or_an_api_key() {
        let ok = |s: Value| validate(&config(json!({}), s));
        assert!(ok(json!({"client_id": "i", "client_secret": "s"})).is_ok());
        assert!(ok(json!({"api_key": "k"})).is_ok());
        assert!(
            ok(json!({"client_id": "i"}))
                .unwrap_err()
                .contains("secrets.client_secret")
        );
        assert!(
            ok(json!({"client_secret": "s"}))
                .unwrap_err()
                .contains("secrets.client_id")
        );
        assert!(ok(json!({})).unwrap_err().contains("secrets.client_id"));
        let both = ok(json!({"api_key": "topsecret", "client_id": "i", "client_secret": "s"}));
        assert!(both.as_ref().unwrap_err().contains("not both"));
        assert!(!both.unwrap_err().contains("topsecret"));
        let sender = validate(&config(
            json!({"sender_email": "nobody"}),
            json!({"api_key": "k"}),
        ));
        assert!(sender.unwrap_err().contains("settings.sender_email"));
    }

    #[test]
    fn the_address_is_not_a_variable() {
        assert!(field_name("Email").is_err());
        assert!(field_name("name").is_ok());
        assert!(field_name("Телефон").is_ok());
    }

    #[test]
    fn status_explanations_are_classified() {
        use BookState::*;
        assert_eq!(classify("New"), Receiving(MemberStatus::Subscribed));
        assert_eq!(classify("Active"), Receiving(MemberStatus::Subscribed));
        assert_eq!(classify("Unconfirmed"), Receiving(MemberStatus::Pending));
        assert_eq!(
            classify("Awaiting confirmation"),
            Receiving(MemberStatus::Pending)
        );
        assert!(matches!(
            classify("Unsubscribed"),
            Refused(ConsentStatus::Unsubscribed, _)
        ));
        assert!(matches!(
            classify("Spam complaint"),
            Refused(ConsentStatus::Complained, _)
        ));
        assert!(matches!(
            classify("Bounced"),
            Refused(ConsentStatus::Bounced, _)
        ));
        assert!(matches!(
            classify("Blacklisted"),
            Refused(ConsentStatus::Unsubscribed, _)
        ));
        assert_eq!(classify("Inactive"), Unknown("Inactive".into()));
        assert_eq!(classify("Frozen"), Unknown("Frozen".into()));
    }

    #[test]
    fn variables_follow_their_types() {
        assert_eq!(variable_value(&json!("42"), Some("number")), json!(42));
        assert_eq!(variable_value(&json!("4.5"), Some("number")), json!(4.5));
        assert_eq!(
            variable_value(&json!("lots"), Some("number")),
            json!("lots")
        );
        assert_eq!(
            variable_value(&json!("1990-07-14T10:00:00"), Some("date")),
            json!("1990-07-14")
        );
        assert_eq!(variable_value(&json!(5), Some("string")), json!("5"));
        assert_eq!(variable_value(&json!(true), None), json!("true"));
        assert_eq!(variable_value(&Value::Null, None), json!(""));
    }

    #[test]
    fn errors_read_sendpulse_codes() {
        let e = ApiError {
            status: 400,
            code: Some(213),
            message: "Book not found".into(),
        };
        assert!(e.book_missing());
        assert_eq!(
            e.describe(),
            "HTTP 400: Book not found (SendPulse error 213)"
        );
        let e = ApiError {
            status: 422,
            code: Some(1003),
            message: "Sender not found".into(),
        };
        assert!(e.about_settings());
        assert!(!e.book_missing());
        assert_eq!(as_id(&json!("391289")), Some(391_289));
        assert_eq!(as_id(&json!(7)), Some(7));
        assert_eq!(as_id(&json!("x")), None);
    }
}

#[cfg(test)]
mod fake {
    use super::*;
    use crate::providers::conformance::{Consent, Erasure, Fake, WRONG_SECRET, conformance_suite};
    use crate::providers::test_support;
    use crate::providers::test_support::{Bound, connected, refusal_status};
    use listsync_emulator::Emulator;

    fn config(emulator: &Emulator, settings: Value, secrets: Value) -> Config {
        let mut settings = settings;
        settings["base_url"] = json!(emulator.base_url("sendpulse"));
        test_support::config(settings, secrets)
    }

    /// A provider with a sender for confirmations, presenting `secret` as the client secret.
    fn provider(emulator: &Emulator, secret: &str) -> Box<dyn Provider> {
        connect(&config(
            emulator,
            json!({"sender_email": "news@shop.example"}),
            json!({"client_id": "client", "client_secret": secret}),
        ))
    }

    fn binding() -> Binding {
        Binding {
            tags: vec!["crm".into()],
            ..test_support::binding(&["name", "age"])
        }
    }

    fn member(address: &str, name: &str) -> Member {
        test_support::member(address, json!({"name": name, "age": 42}))
    }

    fn prepared(provider: &mut Box<dyn Provider>, http: &mut Http) -> Binding {
        let mut b = binding();
        provider.prepare(http, &mut b).expect("prepare");
        b
    }

    fn book(b: &Binding) -> u64 {
        b.list_id.as_deref().unwrap().parse().unwrap()
    }

    fn subscribed() -> Outcome {
        Outcome::Member {
            status: MemberStatus::Subscribed,
            remote_id: None,
        }
    }

    #[test]
    fn prepare_creates_the_list_once_and_checks_given_ids() {
        let (emulator, mut provider, mut http) = connected::<SendPulseFake>();
        let first = prepared(&mut provider, &mut http);
        let again = prepared(&mut provider, &mut http);
        assert_eq!(first.list_id, again.list_id, "an existing list is reused");
        assert_eq!(emulator.sendpulse().books().len(), 1);
        assert_eq!(emulator.sendpulse().books()[&book(&first)], "vip (crm)");
        assert!(first.remote["tag_ids"]["crm"].is_u64());

        let mut given = binding();
        given.list_id = Some("999999".into());
        let e = provider.prepare(&mut http, &mut given).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Binding(m) if m.contains("999999")),
            "{e:?}"
        );
        given.list_id = first.list_id.clone();
        provider
            .prepare(&mut http, &mut given)
            .expect("an existing id");
        assert_eq!(
            provider.check(&mut http).expect("check")["mailing_lists"],
            1
        );
    }

    #[test]
    fn upsert_sets_variables_and_tags_and_updates_them() {
        let (emulator, mut provider, mut http) = connected::<SendPulseFake>();
        let sp = emulator.sendpulse();
        let mut b = binding();
        provider.prepare(&mut http, &mut b).unwrap();
        sp.add_variable(book(&b), "age", "number");
        provider.prepare(&mut http, &mut b).unwrap();
        let members = [
            member("ann@example.com", "Ann"),
            member("bob@example.com", "Bob"),
        ];
        let outcomes = provider.upsert(&mut http, &b, &members).unwrap();
        assert_eq!(outcomes, vec![subscribed(), subscribed()]);
        let ann = sp.member(book(&b), "ann@example.com").unwrap();
        assert_eq!(ann.variables["name"], "Ann");
        assert_eq!(ann.variables["age"], 42, "number variables get numbers");
        assert!(sp.contact_tags("ann@example.com").contains("crm"));

        let outcomes = provider
            .upsert(&mut http, &b, &[member("ann@example.com", "Anna")])
            .unwrap();
        assert_eq!(outcomes, vec![subscribed()]);
        let listed = emulator.list_members("sendpulse", b.list_id.as_deref().unwrap());
        assert_eq!(listed["ann@example.com"]["name"], "Anna");
        assert_eq!(listed.len(), 2);
    }

    #[test]
    fn double_opt_in_confirms_new_members_only() {
        let (emulator, mut provider, mut http) = connected::<SendPulseFake>();
        let sp = emulator.sendpulse();
        let mut b = binding();
        b.new_member_status = MemberStatus::Pending;
        provider.prepare(&mut http, &mut b).unwrap();
        sp.create_book("other");
        provider
            .upsert(
                &mut http,
                &Binding {
                    new_member_status: MemberStatus::Subscribed,
                    ..b.clone()
                },
                &[member("old@example.com", "Old")],
            )
            .unwrap();
        let outcomes = provider
            .upsert(
                &mut http,
                &b,
                &[
                    member("new@example.com", "New"),
                    member("old@example.com", "Old"),
                ],
            )
            .unwrap();
        assert_eq!(
            outcomes,
            vec![
                Outcome::Member {
                    status: MemberStatus::Pending,
                    remote_id: None
                },
                subscribed()
            ]
        );
        let confirmations = sp.confirmations();
        assert_eq!(confirmations.len(), 1, "{confirmations:?}");
        assert_eq!(confirmations[0].email, "new@example.com");
        assert_eq!(confirmations[0].sender, "news@shop.example");
        assert_eq!(
            sp.member(book(&b), "new@example.com").unwrap().status,
            "unconfirmed"
        );
        // Waiting for confirmation is still a member, and is never asked again.
        let outcomes = provider
            .upsert(&mut http, &b, &[member("new@example.com", "Newer")])
            .unwrap();
        assert_eq!(
            outcomes,
            vec![Outcome::Member {
                status: MemberStatus::Pending,
                remote_id: None
            }]
        );
        assert_eq!(sp.confirmations().len(), 1);

        let mut no_sender = connect(&config(
            &emulator,
            json!({}),
            json!({"client_id": "client", "client_secret": "secret"}),
        ));
        let mut pending = binding();
        pending.new_member_status = MemberStatus::Pending;
        let e = no_sender.prepare(&mut http, &mut pending).unwrap_err();
        assert!(
            matches!(&e, ProviderError::Binding(m) if m.contains("sender_email")),
            "{e:?}"
        );
    }

    /// Unsubscribed members are the suite's; SendPulse's other consent states, the blacklist
    /// among them, are refused too.
    #[test]
    fn consent_states_are_refused_and_never_overridden() {
        let (emulator, mut s) = Bound::new::<SendPulseFake>();
        let sp = emulator.sendpulse();
        let book = book(&s.binding);
        let people = ["b@example.com", "c@example.com", "k@example.com"];
        let members: Vec<Member> = people.iter().map(|a| member(a, "X")).collect();
        s.upsert(&members);
        for (address, status) in people.iter().zip(["bounced", "complained", "blacklisted"]) {
            assert!(sp.set_status(book, address, status));
        }
        let outcomes = s.upsert(&members);
        let statuses: Vec<Option<ConsentStatus>> = outcomes.iter().map(refusal_status).collect();
        assert_eq!(
            statuses,
            vec![
                Some(ConsentStatus::Bounced),
                Some(ConsentStatus::Complained),
                Some(ConsentStatus::Unsubscribed)
            ]
        );
        assert_eq!(sp.member(book, "b@example.com").unwrap().status, "bounced");
        assert!(
            emulator
                .list_members("sendpulse", &book.to_string())
                .is_empty()
        );
    }

    /// Erasure is the suite's.
    #[test]
    fn every_on_leave() {
        let (emulator, mut s) = Bound::new::<SendPulseFake>();
        let sp = emulator.sendpulse();
        let book = book(&s.binding);
        let everyone: Vec<Member> = [
            "r@example.com",
            "u@example.com",
            "d@example.com",
            "k@example.com",
        ]
        .iter()
        .map(|a| member(a, "X"))
        .collect();
        s.upsert(&everyone);
        let other = sp.create_book("other");
        let mut in_other = binding();
        in_other.list_id = Some(other.to_string());
        s.provider.prepare(&mut s.http, &mut in_other).unwrap();
        s.provider
            .upsert(&mut s.http, &in_other, &everyone[2..3])
            .unwrap();

        let leave = |s: &mut Bound, action, i: usize| {
            assert_eq!(s.remove(action, &everyone[i..=i]), vec![Outcome::Removed]);
        };
        leave(&mut s, LeaveAction::Remove, 0);
        assert!(sp.member(book, "r@example.com").is_none());
        leave(&mut s, LeaveAction::Unsubscribe, 1);
        assert_eq!(
            sp.member(book, "u@example.com").unwrap().status,
            "unsubscribed"
        );
        leave(&mut s, LeaveAction::Delete, 2);
        assert!(
            sp.member(other, "d@example.com").is_none(),
            "deleted from every list"
        );
        // Leaving twice is still "removed".
        leave(&mut s, LeaveAction::Remove, 0);
        leave(&mut s, LeaveAction::Unsubscribe, 1);
        let listed = emulator.list_members("sendpulse", &book.to_string());
        assert_eq!(listed.keys().collect::<Vec<_>>(), vec!["k@example.com"]);
    }

    #[test]
    fn tokens_are_cached_renewed_before_expiry_and_after_a_401() {
        let (emulator, mut s) = Bound::new::<SendPulseFake>();
        let sp = emulator.sendpulse();
        s.upsert(&[member("a@example.com", "A")]);
        assert_eq!(sp.tokens_issued(), 1, "one token serves many calls");

        sp.expire_tokens();
        s.upsert(&[member("a@example.com", "B")]);
        assert_eq!(
            sp.tokens_issued(),
            2,
            "a 401 gets a new token and one retry"
        );

        sp.set_token_lifetime(Duration::from_secs(2));
        sp.expire_tokens();
        s.provider.check(&mut s.http).unwrap();
        assert_eq!(sp.tokens_issued(), 3);
        std::thread::sleep(Duration::from_millis(1100));
        emulator.clear_requests("sendpulse");
        s.provider.check(&mut s.http).unwrap();
        assert_eq!(sp.tokens_issued(), 4, "renewed before it expired");
        assert!(
            emulator
                .requests("sendpulse")
                .iter()
                .all(|r| r.status != 401),
            "without a 401 first"
        );
    }

    /// Wrong client credentials are the suite's; a static API key, SendPulse's other way in,
    /// needs no token and is checked as well.
    #[test]
    fn a_static_api_key_is_checked_too() {
        let (emulator, _, mut http) = connected::<SendPulseFake>();
        emulator.sendpulse().add_api_key("static-key");
        let mut keyed = connect(&config(
            &emulator,
            json!({}),
            json!({"api_key": "static-key"}),
        ));
        keyed.check(&mut http).expect("a static API key works");
        let mut bad_key = connect(&config(&emulator, json!({}), json!({"api_key": "nope"})));
        assert!(matches!(
            bad_key.check(&mut http),
            Err(ProviderError::Auth(_))
        ));
        assert_eq!(emulator.sendpulse().tokens_issued(), 0);
    }

    /// SendPulse's own answer to a request over its rate limit is transient, with a delay.
    #[test]
    fn the_request_rate_limit_is_transient() {
        let (emulator, mut provider, mut http) = connected::<SendPulseFake>();
        emulator.sendpulse().set_rate_limit(Some(1));
        let e = provider
            .check(&mut http)
            .and_then(|_| provider.check(&mut http))
            .unwrap_err();
        assert!(
            matches!(
                e,
                ProviderError::Transient {
                    retry_after: Some(_),
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn limits_follow_the_documentation() {
        let (_, provider, _) = connected::<SendPulseFake>();
        let limits = provider.limits();
        assert_eq!(limits.remove_batch, 100);
        assert!(limits.upsert_batch <= 100);
        assert_eq!(limits.rate.unwrap().per_second, 10.0);
    }

    struct SendPulseFake;

    impl Fake for SendPulseFake {
        const SPEC: &'static Spec = &SPEC;

        fn connect(emulator: &Emulator) -> Box<dyn Provider> {
            emulator.sendpulse().set_credentials("client", "secret");
            provider(emulator, "secret")
        }

        fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider> {
            provider(emulator, WRONG_SECRET)
        }

        fn binding() -> Binding {
            binding()
        }

        fn member(address: &str) -> Member {
            member(address, "Ann")
        }

        fn refuse(emulator: &Emulator, address: &str) -> &'static str {
            emulator
                .sendpulse()
                .reject_address(address, "Argument email is invalid");
            "Argument email is invalid"
        }

        /// SendPulse keeps addresses per mailing list: known when in any of them.
        fn knows(emulator: &Emulator, address: &str) -> bool {
            let sp = emulator.sendpulse();
            sp.books()
                .keys()
                .any(|book| sp.member(*book, address).is_some())
        }
    }

    impl Consent for SendPulseFake {
        fn unsubscribe(emulator: &Emulator, binding: &Binding, address: &str) {
            assert!(
                emulator
                    .sendpulse()
                    .set_status(book(binding), address, "unsubscribed")
            );
        }
    }

    impl Erasure for SendPulseFake {
        /// SendPulse erases as it deletes: from every mailing list at once.
        fn erased(emulator: &Emulator, address: &str) -> bool {
            emulator.sendpulse().deleted().iter().any(|a| a == address)
        }
    }

    conformance_suite!(SendPulseFake {
        consent: supported,
        erasure: supported
    });
}

#[cfg(test)]
mod contract {
    use super::*;
    use crate::providers::contract::{Prism, assert_all_valid};
    use crate::providers::test_support;

    /// The token endpoint is not in the spec, so the spec's other scheme, a static API key,
    /// authenticates here; the OAuth exchange is covered by the fake.
    fn provider(prism: &Prism) -> SendPulse {
        build(&test_support::config(
            json!({
                "base_url": prism.base_url,
                "sender_email": "news@shop.example",
                "confirmation_template_id": "123",
            }),
            json!({"api_key": "0123456789abcdef"}),
        ))
    }

    fn binding(list_id: Option<&str>, tags: &[&str]) -> Binding {
        Binding {
            list_id: list_id.map(str::to_string),
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..test_support::binding(&["name"])
        }
    }

    fn member(address: &str) -> Member {
        test_support::member(address, json!({"name": "Ann"}))
    }

    #[test]
    fn every_request_validates_against_the_spec() {
        let prism = Prism::start("sendpulse-bulk-email-openapi.prism.yml");
        let mut http = prism.http();
        let mut provider = provider(&prism);
        provider.check(&mut http).expect("check");
        let mut created = binding(None, &[]);
        provider
            .prepare(&mut http, &mut created)
            .expect("prepare creates the list");
        // A tag the mock never lists: created, then waited for (a transient error).
        let mut tagged = binding(None, &["crm"]);
        let _ = provider.prepare(&mut http, &mut tagged);
        let mut given = binding(Some("123"), &[]);
        provider
            .prepare(&mut http, &mut given)
            .expect("prepare checks a given id");

        let members = [member("ann@example.com"), member("bob@example.com")];
        let mut b = given.clone();
        b.remote.insert("tag_ids".into(), json!({"crm": 2506}));
        provider.upsert(&mut http, &b, &members).expect("upsert");
        let mut pending = b.clone();
        pending.new_member_status = MemberStatus::Pending;
        provider
            .upsert(&mut http, &pending, &members)
            .expect("double opt-in upsert");
        provider
            .address_state(&mut http, 123, "ann@example.com")
            .expect("status read");
        let leaving = binding(Some("123"), &[]);
        for action in [
            LeaveAction::Remove,
            LeaveAction::Unsubscribe,
            LeaveAction::Delete,
        ] {
            provider
                .remove(&mut http, &leaving, action, &members)
                .expect("remove");
        }
        provider.erase(&mut http, &b, &members).expect("erase");
        assert_all_valid(&http.drain_records());
    }
}
