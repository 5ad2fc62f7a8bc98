//! Twilio SendGrid Marketing Campaigns (v3 `/marketing/...`).
//!
//! A binding's list is a Marketing Campaigns list (found by name or created). Contacts are
//! upserted with `PUT /v3/marketing/contacts` (at most 30,000 contacts or 6 MB per request) with
//! the list in `list_ids`; that call only queues an import job, so the adapter polls the job
//! (`GET /v3/marketing/contacts/imports/{id}`) for at most `settings.import_wait_seconds`:
//! `completed` makes every contact a member, `failed` fails them all, `errored` is resolved
//! contact by contact with `search/emails` (in the list → member, else failed), and a job still
//! `pending` makes every contact `Retry` while the adapter remembers the job, so the retry
//! polls the same job instead of queueing the contacts again.
//!
//! SendGrid keeps consent in account-wide suppression lists, not on contacts, and does not stop
//! an upsert of a suppressed address: the adapter reads the global unsubscribes, bounces, spam
//! reports and invalid addresses (in full hourly, incrementally by `start_time` before every
//! upsert) and refuses those addresses instead of adding them.
//!
//! Removing from a list and deleting need contact ids: they come from
//! `POST /v3/marketing/contacts/search/emails` (at most 100 addresses), which sets the removal
//! batch size.

use super::{
    Binding, Capabilities, Config, ConsentStatus, LeaveAction, Limits, Member, MemberStatus, Need,
    Outcome, Provider, Spec, kit,
};
use crate::http::{
    Http, Method, ProviderError, Request, Response, Result, percent_encode, transient,
};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

pub static SPEC: Spec = Spec {
    name: "sendgrid",
    settings: &[
        ("region", Need::Optional),
        ("on_behalf_of", Need::Optional),
        ("import_wait_seconds", Need::Optional),
    ],
    secrets: &[("api_key", Need::Required)],
    capabilities: Capabilities {
        on_leave: &["remove", "unsubscribe", "delete", "keep"],
        double_opt_in: false,
        tags: false,
        phone_identity: false,
    },
    validate,
    field_name,
    connect,
};

/// Contacts per upsert request (documented maximum).
const UPSERT_CONTACTS: usize = 30_000;
/// Bytes of contacts per upsert request: the documented 6 MB less room for the envelope.
const UPSERT_BYTES: usize = 6_000_000 - 4_096;
/// Addresses per `search/emails` call, and so per removal batch.
const SEARCH_BATCH: usize = 100;
/// Page size of the suppression lists (documented maximum).
const SUPPRESSION_PAGE: usize = 500;
/// A full re-read of the suppression lists catches suppressions deleted at SendGrid, which an
/// incremental read by creation time cannot see.
const SUPPRESSION_RELOAD: Duration = Duration::from_secs(3600);
/// Incremental reads start this far before the last read, for clock skew between SendGrid's
/// `created` stamps and ours.
const SUPPRESSION_OVERLAP_SECS: i64 = 600;
const DEFAULT_IMPORT_WAIT: Duration = Duration::from_secs(20);
const FIRST_POLL: Duration = Duration::from_millis(250);
const LONGEST_POLL: Duration = Duration::from_secs(2);
/// When to look again at an import job that was still pending.
const PENDING_RETRY: Duration = Duration::from_secs(30);
/// Import jobs remembered for re-polling; older or more are forgotten (the contacts are then
/// simply queued again, which upserting makes harmless).
const REMEMBERED_JOBS: usize = 64;
const REMEMBER_JOBS_FOR: Duration = Duration::from_secs(3600);
/// Reserved fields that identify a contact: mapping them would make the sync change identity.
const IDENTIFIERS: [&str; 5] = [
    "email",
    "phone_number_id",
    "external_id",
    "anonymous_id",
    "alternate_emails",
];

fn validate(config: &Config) -> std::result::Result<(), String> {
    if let Some(region) = config.setting("region")
        && !matches!(region, "global" | "eu")
    {
        return Err(format!(
            "settings.region must be \"global\" or \"eu\", not \"{region}\""
        ));
    }
    if let Some(wait) = config.setting("import_wait_seconds")
        && !wait.trim().parse::<u64>().is_ok_and(|s| s <= 600)
    {
        return Err(
            "settings.import_wait_seconds must be a whole number of seconds, 0 to 600".into(),
        );
    }
    Ok(())
}

/// Reserved field names (`first_name`, `city`, ...) and custom field names: letters, digits and
/// `_`, not starting with a digit. Identifiers are not fields.
fn field_name(name: &str) -> std::result::Result<(), String> {
    if IDENTIFIERS.contains(&name) {
        return Err(format!(
            "{name} identifies a SendGrid contact and cannot be mapped as a field"
        ));
    }
    let mut chars = name.chars();
    let valid = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        Ok(())
    } else {
        Err("SendGrid field names are letters, digits and _, not starting with a digit (a reserved field like first_name, or a custom field's name)".into())
    }
}

fn connect(config: &Config) -> Box<dyn Provider> {
    let default = match config.setting("region") {
        Some("eu") => "https://api.eu.sendgrid.com",
        _ => "https://api.sendgrid.com",
    };
    let import_wait = config
        .setting("import_wait_seconds")
        .and_then(|s| s.trim().parse().ok())
        .map_or(DEFAULT_IMPORT_WAIT, Duration::from_secs);
    Box::new(SendGrid {
        api: Api {
            root: config.base_url(default),
            api_key: config.secret("api_key").unwrap_or_default().to_string(),
            on_behalf_of: config.setting("on_behalf_of").map(str::to_string),
        },
        import_wait,
        suppressions: Suppressions::default(),
        jobs: HashMap::new(),
    })
}

struct SendGrid {
    api: Api,
    import_wait: Duration,
    suppressions: Suppressions,
    /// Digest of an upsert body → the import job it queued, while that job is unresolved.
    jobs: HashMap<String, (String, Instant)>,
}

struct Api {
    root: String,
    api_key: String,
    on_behalf_of: Option<String>,
}

impl Api {
    fn request(&self, method: Method, path: &str) -> Request {
        let request = Request::new(method, format!("{}{path}", self.root))
            .header("authorization", format!("Bearer {}", self.api_key))
            .header("accept", "application/json");
        match &self.on_behalf_of {
            Some(subuser) => request.header("on-behalf-of", subuser.clone()),
            None => request,
        }
    }

    /// Sends; authentication and transient failures become errors, any other answer is the
    /// caller's to read.
    fn send(&self, http: &mut Http, operation: &str, request: Request) -> Result<Response> {
        let response = http.send(operation, request)?;
        check(&response)?;
        Ok(response)
    }

    /// [`Api::send`] for callers that can only use a success.
    fn send_ok(&self, http: &mut Http, operation: &str, request: Request) -> Result<Response> {
        succeeded(self.send(http, operation, request)?)
    }

    fn get(&self, http: &mut Http, operation: &str, path: &str) -> Result<Response> {
        self.send_ok(http, operation, self.request(Method::Get, path))
    }
}

/// 401/403 → Auth, 408/429/5xx → Transient. SendGrid announces its rate-limit window in
/// `X-RateLimit-Reset` rather than `Retry-After`.
fn check(response: &Response) -> Result<()> {
    if response.status == 429 {
        return Err(ProviderError::Transient {
            message: format!("HTTP 429: {}", describe(response)),
            retry_after: response
                .retry_after()
                .or_else(|| rate_limit_reset(response)),
        });
    }
    response.check_common(describe)
}

/// `X-RateLimit-Reset` is documented both as an epoch timestamp and as seconds until the
/// reset; a value that can only be a timestamp is read as one.
fn rate_limit_reset(response: &Response) -> Option<Duration> {
    let value: i64 = response.header("x-ratelimit-reset")?.trim().parse().ok()?;
    let seconds = if value > 1_000_000_000 {
        value - unix_now()
    } else {
        value
    };
    Some(Duration::from_secs(seconds.clamp(1, 3600) as u64))
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A deletion SendGrid queued answers with a JSON object naming the job (whose id the
/// official description types sometimes as a string, sometimes as an object). A success whose
/// body is not one (cut short on the way) does not show that anything was queued: recording the
/// members as removed would leave them in the list for good, so the removal is tried again.
fn queued(response: &Response) -> Result<()> {
    match response.json()? {
        Value::Object(_) => Ok(()),
        _ => Err(unconfirmed(response, "the job it queued")),
    }
}

fn unconfirmed(response: &Response, missing: &str) -> ProviderError {
    transient(format!(
        "SendGrid answered HTTP {} without {missing}: {}",
        response.status,
        describe(response)
    ))
}

/// SendGrid's words: `errors[].message`, prefixed by the field when there is one.
fn describe(response: &Response) -> String {
    let messages: Vec<String> = error_items(response)
        .into_iter()
        .map(|(field, message)| match field {
            Some(field) => format!("{field}: {message}"),
            None => message,
        })
        .collect();
    if messages.is_empty() {
        response.text_excerpt()
    } else {
        messages.join("; ")
    }
}

/// `(field, message)` of each entry of `{"errors": [...]}`.
fn error_items(response: &Response) -> Vec<(Option<String>, String)> {
    let Ok(body) = serde_json::from_slice::<Value>(&response.body) else {
        return Vec::new();
    };
    body["errors"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["field"]
                    .as_str()
                    .filter(|f| !f.is_empty())
                    .map(str::to_string),
                e["message"].as_str().unwrap_or("error").to_string(),
            )
        })
        .collect()
}

/// `contacts[12].email` → 12.
fn contact_index(field: &str) -> Option<usize> {
    field
        .strip_prefix("contacts[")?
        .split(']')
        .next()?
        .parse()
        .ok()
}

fn rejected(response: &Response) -> ProviderError {
    ProviderError::Rejected(format!("HTTP {}: {}", response.status, describe(response)))
}

fn succeeded(response: Response) -> Result<Response> {
    if response.is_success() {
        Ok(response)
    } else {
        Err(rejected(&response))
    }
}

/// The account's suppressions, as last read.
#[derive(Default)]
struct Suppressions {
    held: HashMap<String, ConsentStatus>,
    /// Our clock when the last read started.
    read_at: Option<i64>,
    loaded: Option<Instant>,
}

const SUPPRESSION_KINDS: [(&str, ConsentStatus); 4] = [
    ("unsubscribes", ConsentStatus::Unsubscribed),
    ("bounces", ConsentStatus::Bounced),
    ("spam_reports", ConsentStatus::Complained),
    ("invalid_emails", ConsentStatus::Cleaned),
];

impl Suppressions {
    fn refresh(&mut self, api: &Api, http: &mut Http) -> Result<()> {
        let started = unix_now();
        let full = self
            .loaded
            .is_none_or(|at| at.elapsed() >= SUPPRESSION_RELOAD);
        let since = if full {
            None
        } else {
            self.read_at.map(|t| t - SUPPRESSION_OVERLAP_SECS)
        };
        let mut read = HashMap::new();
        for (kind, status) in SUPPRESSION_KINDS {
            let mut offset = 0;
            loop {
                let mut path =
                    format!("/v3/suppression/{kind}?limit={SUPPRESSION_PAGE}&offset={offset}");
                if let Some(since) = since {
                    path.push_str(&format!("&start_time={since}"));
                }
                let page = api.get(http, "read suppressions", &path)?.json()?;
                let items = page.as_array().cloned().unwrap_or_default();
                for item in &items {
                    if let Some(email) = item["email"].as_str() {
                        read.entry(email.trim().to_lowercase()).or_insert(status);
                    }
                }
                if items.len() < SUPPRESSION_PAGE {
                    break;
                }
                offset += SUPPRESSION_PAGE;
            }
        }
        if full {
            self.held = read;
            self.loaded = Some(Instant::now());
        } else {
            self.held.extend(read);
        }
        self.read_at = Some(started);
        Ok(())
    }

    fn status(&self, address: &str) -> Option<ConsentStatus> {
        self.held.get(&address.to_lowercase()).copied()
    }
}

/// How the binding's mapped fields land on a contact, as resolved by `prepare`.
struct Fields {
    /// name → (field id, `Text` | `Number` | `Date`).
    custom: HashMap<String, (String, String)>,
    reserved: HashSet<String>,
}

impl Fields {
    fn of(binding: &Binding) -> Fields {
        let custom = binding
            .remote_object("custom_fields")
            .into_iter()
            .flatten()
            .filter_map(|(name, f)| {
                Some((
                    name.clone(),
                    (
                        f["id"].as_str()?.to_string(),
                        f["type"].as_str().unwrap_or("Text").to_string(),
                    ),
                ))
            })
            .collect();
        let reserved = kit::strings(
            binding
                .remote
                .get("reserved_fields")
                .unwrap_or(&Value::Null),
        )
        .map(str::to_string)
        .collect();
        Fields { custom, reserved }
    }

    /// The contact object of an upsert, or why this member cannot be sent.
    fn contact(&self, member: &Member) -> std::result::Result<Value, String> {
        let mut contact = Map::new();
        contact.insert("email".into(), json!(member.address));
        let mut custom = Map::new();
        for (name, value) in &member.fields {
            if let Some((id, kind)) = self.custom.get(name) {
                let value = custom_value(value, kind).map_err(|e| format!("field {name}: {e}"))?;
                custom.insert(id.clone(), value);
            } else if self.reserved.contains(name) {
                contact.insert(name.clone(), json!(kit::text(value).unwrap_or_default()));
            } else {
                return Err(format!(
                    "field {name} is not known to the binding's SendGrid field map (run resync)"
                ));
            }
        }
        if !custom.is_empty() {
            contact.insert("custom_fields".into(), Value::Object(custom));
        }
        Ok(Value::Object(contact))
    }
}

/// Values as SendGrid's field types want them, all as strings like the spec's examples
/// (`"w33": "42"`): a plain decimal for `Number`, `MM/DD/YYYY` for `Date`; an empty string
/// clears a field of any type.
fn custom_value(value: &Value, kind: &str) -> std::result::Result<Value, String> {
    let text = kit::text(value).unwrap_or_default();
    if text.trim().is_empty() {
        return Ok(json!(""));
    }
    match kind {
        "Number" => {
            let n: f64 = text
                .trim()
                .parse()
                .ok()
                .filter(|n: &f64| n.is_finite())
                .ok_or_else(|| format!("\"{text}\" is not a number"))?;
            Ok(Value::String(if n.fract() == 0.0 && n.abs() < 9e15 {
                (n as i64).to_string()
            } else {
                n.to_string()
            }))
        }
        "Date" => us_date(text.trim())
            .map(Value::String)
            .ok_or_else(|| format!("\"{text}\" is not a date (YYYY-MM-DD or MM/DD/YYYY)")),
        _ => Ok(Value::String(text)),
    }
}

/// `YYYY-MM-DD…` (a date or timestamp) or `MM/DD/YYYY` → `MM/DD/YYYY`.
fn us_date(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    if digits(0..4)
        && b.get(4) == Some(&b'-')
        && digits(5..7)
        && b.get(7) == Some(&b'-')
        && digits(8..10)
    {
        return Some(format!("{}/{}/{}", &text[5..7], &text[8..10], &text[0..4]));
    }
    (b.len() == 10 && digits(0..2) && b[2] == b'/' && digits(3..5) && b[5] == b'/' && digits(6..10))
        .then(|| text.to_string())
}

/// Splits `(index, contact)` pairs into upsert requests within the count and size limits.
fn upsert_requests(contacts: Vec<(usize, Value)>, max_bytes: usize) -> Vec<Vec<(usize, Value)>> {
    let mut requests = Vec::new();
    let mut current: Vec<(usize, Value)> = Vec::new();
    let mut bytes = 0;
    for (index, contact) in contacts {
        let size = contact.to_string().len() + 1;
        if !current.is_empty() && (current.len() == UPSERT_CONTACTS || bytes + size > max_bytes) {
            requests.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push((index, contact));
    }
    if !current.is_empty() {
        requests.push(current);
    }
    requests
}

/// Gives every contact of one upsert request the same outcome.
fn settle(outcomes: &mut [Option<Outcome>], contacts: &[(usize, Value)], outcome: Outcome) {
    for (index, _) in contacts {
        outcomes[*index] = Some(outcome.clone());
    }
}

enum Job {
    Completed,
    Failed(String),
    Errored,
    Pending,
    Unknown,
}

/// A contact `search/emails` found.
struct Found {
    id: String,
    list_ids: Vec<String>,
}

#[derive(Default)]
struct Search {
    /// Lower-cased address → contact.
    found: HashMap<String, Found>,
    /// Lower-cased address → why SendGrid refused to look it up.
    invalid: HashMap<String, String>,
}

impl SendGrid {
    fn list_id(binding: &Binding) -> Result<&str> {
        kit::list_id(binding, "SendGrid list id")
    }

    fn list_missing(id: &str) -> ProviderError {
        kit::list_missing::<Self>(id)
    }
}

/// SendGrid list names are 1 to 100 characters.
fn list_name(name: &str) -> String {
    name.chars().take(100).collect()
}

impl kit::ListDirectory for SendGrid {
    const KIND: &'static str = "list";
    const PROVIDER: &'static str = "SendGrid";

    fn list_by_id(&mut self, http: &mut Http, id: &str) -> Result<Option<String>> {
        Ok(self.list_exists(http, id)?.then(|| id.to_string()))
    }

    fn list_by_name(&mut self, http: &mut Http, name: &str) -> Result<Option<String>> {
        let name = list_name(name);
        let mut token: Option<String> = None;
        // A bound on pages guards against a `next` link that never ends.
        for _ in 0..1000 {
            let mut path = "/v3/marketing/lists?page_size=1000".to_string();
            if let Some(token) = &token {
                path.push_str(&format!("&page_token={}", percent_encode(token)));
            }
            let page = self.api.get(http, "list lists", &path)?.json()?;
            for list in page["result"].as_array().into_iter().flatten() {
                if list["name"].as_str() == Some(name.as_str())
                    && let Some(id) = list["id"].as_str()
                {
                    return Ok(Some(id.to_string()));
                }
            }
            token = page["_metadata"]["next"]
                .as_str()
                .and_then(|next| query_param(next, "page_token"));
            if token.is_none() {
                break;
            }
        }
        Ok(None)
    }

    fn create_list(&mut self, http: &mut Http, name: &str) -> Result<String> {
        let name = list_name(name);
        let request = self
            .api
            .request(Method::Post, "/v3/marketing/lists")
            .json(&json!({"name": name}));
        let response = self.api.send(http, "create list", request)?;
        if response.is_success() {
            let created = response.json()?;
            return created["id"].as_str().map(str::to_string).ok_or_else(|| {
                ProviderError::Rejected(format!("SendGrid returned no id for list \"{name}\""))
            });
        }
        // Another worker may have created it meanwhile: the name is the key.
        match self.list_by_name(http, &name)? {
            Some(id) => Ok(id),
            None => Err(rejected(&response)),
        }
    }
}

impl SendGrid {
    fn list_exists(&self, http: &mut Http, id: &str) -> Result<bool> {
        let path = format!("/v3/marketing/lists/{}", percent_encode(id));
        let response = self
            .api
            .send(http, "get list", self.api.request(Method::Get, &path))?;
        match response.status {
            200..=299 => Ok(true),
            404 => Ok(false),
            _ => Err(rejected(&response)),
        }
    }

    /// Looks addresses up (at most [`SEARCH_BATCH`]). SendGrid answers 404 when none is found
    /// and 400 when any is invalid; an invalid one is then singled out by asking one by one.
    fn search(&self, http: &mut Http, addresses: &[&str]) -> Result<Search> {
        let mut search = Search::default();
        if addresses.is_empty() {
            return Ok(search);
        }
        let request = self
            .api
            .request(Method::Post, "/v3/marketing/contacts/search/emails")
            .json(&json!({"emails": addresses}));
        let response = self.api.send(http, "find contacts", request)?;
        match response.status {
            200..=299 => {
                let body = response.json()?;
                for (email, entry) in body["result"].as_object().into_iter().flatten() {
                    if let Some(id) = entry["contact"]["id"].as_str() {
                        let list_ids = kit::strings(&entry["contact"]["list_ids"])
                            .map(str::to_string)
                            .collect();
                        search.found.insert(
                            email.to_lowercase(),
                            Found {
                                id: id.to_string(),
                                list_ids,
                            },
                        );
                    }
                }
            }
            404 => {}
            400 if addresses.len() == 1 => {
                search
                    .invalid
                    .insert(addresses[0].to_lowercase(), describe(&response));
            }
            400 => {
                for address in addresses {
                    let one = self.search(http, &[address])?;
                    search.found.extend(one.found);
                    search.invalid.extend(one.invalid);
                }
            }
            _ => return Err(rejected(&response)),
        }
        Ok(search)
    }

    fn poll(&self, http: &mut Http, job: &str) -> Result<Job> {
        let deadline = Instant::now() + self.import_wait;
        let mut pause = FIRST_POLL;
        let path = format!("/v3/marketing/contacts/imports/{}", percent_encode(job));
        loop {
            let response =
                self.api
                    .send(http, "import status", self.api.request(Method::Get, &path))?;
            if response.status == 404 {
                return Ok(Job::Unknown);
            }
            let status = succeeded(response)?.json()?;
            match status["status"].as_str() {
                Some("completed") => return Ok(Job::Completed),
                Some("errored") => return Ok(Job::Errored),
                Some("failed") => {
                    let errored = status["results"]["errored_count"].as_u64().unwrap_or(0);
                    return Ok(Job::Failed(format!(
                        "SendGrid's import job {job} failed ({errored} contacts in error)"
                    )));
                }
                _ => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Job::Pending);
            }
            std::thread::sleep(pause.min(left));
            pause = (pause * 2).min(LONGEST_POLL);
        }
    }

    fn remember(&mut self, digest: &str, job: &str) {
        self.jobs
            .retain(|_, (_, at)| at.elapsed() < REMEMBER_JOBS_FOR);
        if self.jobs.len() >= REMEMBERED_JOBS
            && let Some(oldest) = self
                .jobs
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| k.clone())
        {
            self.jobs.remove(&oldest);
        }
        self.jobs
            .insert(digest.to_string(), (job.to_string(), Instant::now()));
    }

    /// Queues one upsert request (or finds the job an earlier attempt queued) and turns its
    /// outcome into per-contact outcomes.
    fn import(
        &mut self,
        http: &mut Http,
        list: &str,
        members: &[Member],
        mut contacts: Vec<(usize, Value)>,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<()> {
        let job = loop {
            if contacts.is_empty() {
                return Ok(());
            }
            let body = json!({
                "list_ids": [list],
                "contacts": contacts.iter().map(|(_, c)| c).collect::<Vec<_>>(),
            });
            let bytes = serde_json::to_vec(&body).unwrap_or_default();
            let digest: String = Sha256::digest(&bytes)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            if let Some((job, _)) = self.jobs.get(&digest) {
                break (digest, job.clone());
            }
            let mut request = self
                .api
                .request(Method::Put, "/v3/marketing/contacts")
                .header("content-type", "application/json");
            request.body = Some(bytes);
            let response = self.api.send(http, "upsert contacts", request)?;
            match response.status {
                200..=299 => {
                    let job = response.json()?["job_id"]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| {
                            transient("SendGrid accepted the contacts but returned no job id")
                        })?;
                    self.remember(&digest, &job);
                    break (digest, job);
                }
                404 => return Err(Self::list_missing(list)),
                400 => {
                    let items = error_items(&response);
                    if items.iter().any(|(field, _)| {
                        field.as_deref().is_some_and(|f| f.starts_with("list_ids"))
                    }) {
                        return Err(Self::list_missing(list));
                    }
                    let mut refused: HashMap<usize, String> = HashMap::new();
                    let mut general = Vec::new();
                    for (field, message) in items {
                        match field.as_deref().and_then(contact_index) {
                            Some(i) if i < contacts.len() => {
                                let field = field.unwrap_or_default();
                                refused
                                    .entry(i)
                                    .and_modify(|m| m.push_str(&format!("; {field}: {message}")))
                                    .or_insert(format!("{field}: {message}"));
                            }
                            _ => general.push(message),
                        }
                    }
                    if refused.is_empty() || !general.is_empty() {
                        let message = format!("HTTP 400: {}", describe(&response));
                        settle(outcomes, &contacts, Outcome::failed(message));
                        return Ok(());
                    }
                    // SendGrid refuses the whole request for one bad contact: the others
                    // go again without it.
                    let mut kept = Vec::with_capacity(contacts.len());
                    for (position, (index, contact)) in contacts.into_iter().enumerate() {
                        match refused.remove(&position) {
                            Some(message) => outcomes[index] = Some(Outcome::failed(message)),
                            None => kept.push((index, contact)),
                        }
                    }
                    contacts = kept;
                }
                _ => {
                    let message = format!("HTTP {}: {}", response.status, describe(&response));
                    settle(outcomes, &contacts, Outcome::failed(message));
                    return Ok(());
                }
            }
        };
        let (digest, job) = job;
        let state = self.poll(http, &job)?;
        if !matches!(state, Job::Pending) {
            self.jobs.remove(&digest);
        }
        let every = match state {
            Job::Completed => Outcome::member(MemberStatus::Subscribed, None),
            Job::Failed(message) => Outcome::failed(message),
            Job::Pending => Outcome::Retry {
                message: format!("SendGrid's import job {job} is still pending"),
                retry_after: Some(PENDING_RETRY),
            },
            Job::Unknown => Outcome::retry(format!("SendGrid no longer knows import job {job}")),
            Job::Errored => {
                for batch in contacts.chunks(SEARCH_BATCH) {
                    let addresses: Vec<&str> = batch
                        .iter()
                        .map(|(i, _)| members[*i].address.as_str())
                        .collect();
                    let search = self.search(http, &addresses)?;
                    for (index, _) in batch {
                        let address = members[*index].address.to_lowercase();
                        outcomes[*index] = Some(match search.found.get(&address) {
                            Some(found) if found.list_ids.iter().any(|l| l == list) => {
                                Outcome::member(MemberStatus::Subscribed, Some(found.id.clone()))
                            }
                            _ => Outcome::failed(format!(
                                "SendGrid's import job {job} reported errors and this contact is not in the list (see the job's errors file in SendGrid)"
                            )),
                        });
                    }
                }
                return Ok(());
            }
        };
        settle(outcomes, &contacts, every);
        Ok(())
    }

    /// `DELETE` with a comma-separated id list in the query.
    fn delete_ids(
        &self,
        http: &mut Http,
        operation: &str,
        path: &str,
        param: &str,
        ids: &[&str],
    ) -> Result<Response> {
        let path = format!("{path}?{param}={}", percent_encode(&ids.join(",")));
        self.api
            .send(http, operation, self.api.request(Method::Delete, &path))
    }

    /// Removes found contacts from the list; 404 means the list or a contact vanished.
    fn leave_list(&self, http: &mut Http, list: &str, ids: &[&str]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let path = format!("/v3/marketing/lists/{}/contacts", percent_encode(list));
        let response = self.delete_ids(http, "remove from list", &path, "contact_ids", ids)?;
        match response.status {
            200..=299 => queued(&response),
            404 => {
                if !self.list_exists(http, list)? {
                    return Err(Self::list_missing(list));
                }
                Err(transient(
                    "a contact was deleted at SendGrid while it was being removed from the list",
                ))
            }
            _ => Err(rejected(&response)),
        }
    }

    fn delete_contacts(&self, http: &mut Http, ids: &[&str]) -> Result<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let response = self.delete_ids(
            http,
            "delete contacts",
            "/v3/marketing/contacts",
            "ids",
            ids,
        )?;
        queued(&succeeded(response)?)
    }

    fn suppress(&mut self, http: &mut Http, addresses: &[&str]) -> Result<()> {
        let request = self
            .api
            .request(Method::Post, "/v3/asm/suppressions/global")
            .json(&json!({"recipient_emails": addresses}));
        let response = self.api.send_ok(http, "unsubscribe", request)?;
        if !response.json()?["recipient_emails"].is_array() {
            return Err(unconfirmed(&response, "the addresses it unsubscribed"));
        }
        for address in addresses {
            self.suppressions
                .held
                .insert(address.to_lowercase(), ConsentStatus::Unsubscribed);
        }
        Ok(())
    }

    /// Erasure jobs refuse the whole request for one invalid address, naming it: named ones
    /// fail, the others go again.
    fn erase_job(
        &self,
        http: &mut Http,
        mut addresses: Vec<String>,
    ) -> Result<HashMap<String, String>> {
        let mut failed = HashMap::new();
        while !addresses.is_empty() {
            let request = self
                .api
                .request(Method::Post, "/v3/recipients/erasejob")
                .json(&json!({"email_addresses": addresses}));
            let response = self.api.send(http, "erase recipients", request)?;
            if response.is_success() {
                break;
            }
            if response.status != 400 {
                return Err(rejected(&response));
            }
            let messages: Vec<String> =
                error_items(&response).into_iter().map(|(_, m)| m).collect();
            let named: Vec<String> = addresses
                .iter()
                .filter(|a| {
                    let a = a.to_lowercase();
                    messages.iter().any(|m| m.to_lowercase().contains(&a))
                })
                .cloned()
                .collect();
            if named.is_empty() {
                return Err(rejected(&response));
            }
            for address in named {
                let message = messages
                    .iter()
                    .find(|m| m.to_lowercase().contains(&address.to_lowercase()))
                    .cloned()
                    .unwrap_or_default();
                addresses.retain(|a| *a != address);
                failed.insert(address.to_lowercase(), message);
            }
        }
        Ok(failed)
    }
}

/// A query parameter of a URL, decoded.
fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| percent_decode(v))
        .filter(|v| !v.is_empty())
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Provider for SendGrid {
    fn limits(&self) -> Limits {
        // SendGrid limits each endpoint separately without publishing the numbers; its 429s
        // say when to come back (see `check`).
        Limits::batches(UPSERT_CONTACTS, SEARCH_BATCH)
    }

    fn check(&mut self, http: &mut Http) -> Result<Value> {
        let lists = self
            .api
            .get(http, "list lists", "/v3/marketing/lists?page_size=1")?
            .json()?;
        // The sync cannot honour consent without reading suppressions: prove the key may.
        self.api.get(
            http,
            "read suppressions",
            "/v3/suppression/unsubscribes?limit=1",
        )?;
        Ok(json!({
            "provider": "sendgrid",
            "lists": lists["_metadata"]["count"],
        }))
    }

    fn prepare(&mut self, http: &mut Http, binding: &mut Binding) -> Result<()> {
        let definitions = self
            .api
            .get(http, "list fields", "/v3/marketing/field_definitions")?
            .json()?;
        let custom: Map<String, Value> = definitions["custom_fields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| {
                Some((
                    f["name"].as_str()?.to_string(),
                    json!({"id": f["id"].as_str()?, "type": f["field_type"]}),
                ))
            })
            .collect();
        let writable: Vec<&str> = definitions["reserved_fields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| !f["read_only"].as_bool().unwrap_or(false))
            .filter_map(|f| f["name"].as_str())
            .filter(|name| !IDENTIFIERS.contains(name))
            .collect();
        kit::require_fields(
            "SendGrid",
            &binding.fields,
            custom.keys().map(String::as_str).chain(writable),
        )?;
        let mut used_custom = Map::new();
        let mut used_reserved = Vec::new();
        for field in &binding.fields {
            match custom.get(field) {
                Some(definition) => {
                    used_custom.insert(field.clone(), definition.clone());
                }
                None => used_reserved.push(json!(field)),
            }
        }
        let list = kit::resolve_list(http, self, binding)?;
        binding.list_id = Some(list);
        binding.keep_remote("custom_fields", used_custom);
        binding
            .remote
            .insert("reserved_fields".into(), Value::Array(used_reserved));
        Ok(())
    }

    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let list = Self::list_id(binding)?.to_string();
        self.suppressions.refresh(&self.api, http)?;
        let fields = Fields::of(binding);
        let mut outcomes: Vec<Option<Outcome>> = vec![None; members.len()];
        let mut contacts = Vec::with_capacity(members.len());
        for (index, member) in members.iter().enumerate() {
            if let Some(status) = self.suppressions.status(&member.address) {
                outcomes[index] = Some(Outcome::Refused {
                    status,
                    message: format!(
                        "the address is on SendGrid's {} suppression list",
                        status.as_str()
                    ),
                });
                continue;
            }
            match fields.contact(member) {
                Ok(contact) => contacts.push((index, contact)),
                Err(message) => outcomes[index] = Some(Outcome::failed(message)),
            }
        }
        for request in upsert_requests(contacts, UPSERT_BYTES) {
            self.import(http, &list, members, request, &mut outcomes)?;
        }
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::retry("SendGrid did not report this contact")))
            .collect())
    }

    fn remove(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        action: LeaveAction,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let list = Self::list_id(binding)?.to_string();
        match action {
            LeaveAction::Archive => {
                return Err(ProviderError::Binding(
                    "SendGrid has no archived contacts: use on_leave remove, unsubscribe, delete or keep".into(),
                ));
            }
            LeaveAction::Remove | LeaveAction::Unsubscribe | LeaveAction::Delete => {}
        }
        let addresses: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
        if action == LeaveAction::Unsubscribe {
            self.suppress(http, &addresses)?;
        }
        let search = self.search(http, &addresses)?;
        let ids: Vec<&str> = members
            .iter()
            .filter_map(|m| search.found.get(&m.address.to_lowercase()))
            .map(|f| f.id.as_str())
            .collect();
        if action == LeaveAction::Delete {
            self.delete_contacts(http, &ids)?;
        } else {
            self.leave_list(http, &list, &ids)?;
        }
        Ok(members
            .iter()
            .map(|m| Outcome::removed_unless(search.invalid.get(&m.address.to_lowercase())))
            .collect())
    }

    /// Deletes the Marketing Campaigns contact and asks SendGrid to erase the address's
    /// personal data from its email records (`/v3/recipients/erasejob`). Suppression entries
    /// stay: they are what keeps an erased address from being mailed again.
    fn erase(
        &mut self,
        http: &mut Http,
        _binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let addresses: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
        let search = self.search(http, &addresses)?;
        let ids: Vec<&str> = search.found.values().map(|f| f.id.as_str()).collect();
        self.delete_contacts(http, &ids)?;
        let valid: Vec<String> = addresses
            .iter()
            .filter(|a| !search.invalid.contains_key(&a.to_lowercase()))
            .map(|a| a.to_string())
            .collect();
        let failed = self.erase_job(http, valid)?;
        Ok(members
            .iter()
            .map(|m| {
                let key = m.address.to_lowercase();
                Outcome::removed_unless(search.invalid.get(&key).or_else(|| failed.get(&key)))
            })
            .collect())
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn response(status: u16, headers: Vec<(&str, &str)>, body: &str) -> Response {
        Response {
            status,
            headers: headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
            body: body.as_bytes().to_vec(),
        }
    }

    #[test]
    fn field_values_follow_field_types() {
        assert_eq!(custom_value(&json!("1200"), "Number"), Ok(json!("1200")));
        assert_eq!(custom_value(&json!(12.5), "Number"), Ok(json!("12.5")));
        assert!(custom_value(&json!("lots"), "Number").is_err());
        assert_eq!(
            custom_value(&json!("1990-07-14"), "Date"),
            Ok(json!("07/14/1990"))
        );
        assert_eq!(
            custom_value(&json!("2024-03-05T10:00:00Z"), "Date"),
            Ok(json!("03/05/2024"))
        );
        assert_eq!(
            custom_value(&json!("07/14/1990"), "Date"),
            Ok(json!("07/14/1990"))
        );
        assert!(custom_value(&json!("14.07.1990"), "Date").is_err());
        assert_eq!(custom_value(&Value::Null, "Number"), Ok(json!("")));
        assert_eq!(custom_value(&json!(5), "Text"), Ok(json!("5")));
    }

    #[test]
    fn field_names_and_settings_are_checked() {
        assert!(field_name("first_name").is_ok());
        assert!(field_name("ltv_2024").is_ok());
        assert!(field_name("2fast").is_err());
        assert!(field_name("has space").is_err());
        assert!(field_name("email").is_err());
        let config = |settings| crate::providers::test_support::config(settings, json!({}));
        assert!(validate(&config(json!({"region": "eu", "import_wait_seconds": "5"}))).is_ok());
        assert!(validate(&config(json!({"region": "mars"}))).is_err());
        assert!(validate(&config(json!({"import_wait_seconds": "soon"}))).is_err());
    }

    #[test]
    fn rate_limit_reset_is_a_timestamp_or_seconds() {
        let at = (unix_now() + 30).to_string();
        let r = response(429, vec![("X-RateLimit-Reset", &at)], "");
        let wait = rate_limit_reset(&r).unwrap();
        assert!(
            wait >= Duration::from_secs(28) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        let r = response(429, vec![("X-RateLimit-Reset", "7")], "");
        assert_eq!(rate_limit_reset(&r), Some(Duration::from_secs(7)));
        let r = response(
            429,
            vec![("X-RateLimit-Reset", "7")],
            r#"{"errors":[{"field":null,"message":"too many requests"}]}"#,
        );
        match check(&r) {
            Err(ProviderError::Transient {
                message,
                retry_after,
            }) => {
                assert!(message.contains("too many requests"), "{message}");
                assert_eq!(retry_after, Some(Duration::from_secs(7)));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_are_described_and_tied_to_contacts() {
        let r = response(
            400,
            vec![],
            r#"{"errors":[{"field":"contacts[3].email","message":"email is invalid"},{"message":"bad"}]}"#,
        );
        assert_eq!(describe(&r), "contacts[3].email: email is invalid; bad");
        assert_eq!(contact_index("contacts[3].email"), Some(3));
        assert_eq!(contact_index("list_ids"), None);
    }

    #[test]
    fn upserts_split_by_size() {
        let contacts: Vec<(usize, Value)> = (0..10)
            .map(|i| (i, json!({"email": format!("user{i}@example.com")})))
            .collect();
        let one = json!({"email": "user0@example.com"}).to_string().len() + 1;
        let requests = upsert_requests(contacts, one * 4);
        assert_eq!(
            requests.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
    }

    #[test]
    fn next_page_token_is_read_from_the_link() {
        assert_eq!(
            query_param(
                "https://api.sendgrid.com/v3/marketing/lists?page_size=1000&page_token=abc%3D%3D",
                "page_token"
            ),
            Some("abc==".into())
        );
        assert_eq!(query_param("https://x/y?page_token=", "page_token"), None);
    }
}

#[cfg(test)]
mod fake {
    use super::*;
    use crate::providers::conformance::{Consent, Erasure, Fake, WRONG_SECRET, conformance_suite};
    use crate::providers::test_support;
    use crate::providers::test_support::{Bound, http, is_subscribed, member, refusal_status};
    use listsync_emulator::{Emulator, Fault};

    const KEY: &str = "SG.test-key";

    fn provider(emulator: &Emulator) -> Box<dyn Provider> {
        provider_with_key(emulator, KEY)
    }

    fn provider_with_key(emulator: &Emulator, key: &str) -> Box<dyn Provider> {
        connect(&test_support::config(
            json!({"base_url": emulator.base_url("sendgrid"), "import_wait_seconds": "0"}),
            json!({"api_key": key}),
        ))
    }

    fn binding(fields: &[&str]) -> Binding {
        Binding {
            id: 7,
            ..test_support::binding(fields)
        }
    }

    #[test]
    fn prepare_creates_the_list_once_and_resolves_fields() {
        let (emulator, mut s) = Bound::new::<SendGridFake>();
        let list = s.binding.list_id.clone().unwrap();
        assert_eq!(emulator.sendgrid().lists()[&list], "vip (crm)");
        let ltv = &s.binding.remote["custom_fields"]["ltv"];
        assert_eq!(ltv["type"], "Number");
        assert_eq!(s.binding.remote["reserved_fields"], json!(["first_name"]));

        let mut again = binding(&["first_name"]);
        s.provider.prepare(&mut s.http, &mut again).unwrap();
        assert_eq!(again.list_id.as_deref(), Some(list.as_str()));
        assert_eq!(emulator.sendgrid().lists().len(), 1);

        let mut given = binding(&[]);
        given.list_id = Some(list.clone());
        s.provider.prepare(&mut s.http, &mut given).unwrap();
        given.list_id = Some("6f1c2b9e-0000-4000-8000-000000000000".into());
        assert!(matches!(
            s.provider.prepare(&mut s.http, &mut given),
            Err(ProviderError::Binding(m)) if m.contains("does not exist")
        ));
        let mut unknown = binding(&["shoe_size"]);
        assert!(matches!(
            s.provider.prepare(&mut s.http, &mut unknown),
            Err(ProviderError::Binding(m)) if m.contains("shoe_size") && m.contains("ltv")
        ));
    }

    #[test]
    fn upsert_adds_members_and_updates_fields() {
        let (emulator, mut s) = Bound::new::<SendGridFake>();
        let list = s.binding.list_id.clone().unwrap();
        let outcomes = s.upsert(&[
            member(
                "ann@example.com",
                json!({"first_name": "Ann", "ltv": "1200", "signup": "2024-03-05"}),
            ),
            member(
                "bob@example.com",
                json!({"first_name": "Bob", "ltv": 7, "signup": null}),
            ),
        ]);
        assert!(outcomes.iter().all(is_subscribed), "{outcomes:?}");
        let members = emulator.list_members("sendgrid", &list);
        assert_eq!(members["ann@example.com"]["first_name"], "Ann");
        assert_eq!(members["ann@example.com"]["ltv"], 1200);
        assert_eq!(members["ann@example.com"]["signup"], "03/05/2024");
        assert_eq!(members["bob@example.com"]["signup"], "");

        let outcomes = s.upsert(&[member(
            "ann@example.com",
            json!({"first_name": "Anne", "ltv": "1300", "signup": "2024-03-05"}),
        )]);
        assert!(is_subscribed(&outcomes[0]));
        let members = emulator.list_members("sendgrid", &list);
        assert_eq!(members["ann@example.com"]["first_name"], "Anne");
        assert_eq!(members["ann@example.com"]["ltv"], 1300);
        assert!(emulator.sendgrid().suppressed_upserts().is_empty());
    }

    #[test]
    fn pending_jobs_are_retried_without_queueing_the_contacts_again() {
        let (emulator, mut s) = Bound::new::<SendGridFake>();
        emulator.sendgrid().set_job_polls(3);
        let members = [member(
            "ann@example.com",
            json!({"first_name": "Ann", "ltv": 1, "signup": null}),
        )];
        for _ in 0..2 {
            let outcomes = s.upsert(&members);
            assert!(
                matches!(
                    &outcomes[0],
                    Outcome::Retry { message, retry_after: Some(after) } if message.contains("pending") && *after == PENDING_RETRY
                ),
                "{outcomes:?}"
            );
        }
        let outcomes = s.upsert(&members);
        assert!(is_subscribed(&outcomes[0]), "{outcomes:?}");
        let puts = emulator
            .requests("sendgrid")
            .iter()
            .filter(|r| r.method == "PUT")
            .count();
        assert_eq!(puts, 1);
        assert_eq!(emulator.sendgrid().pending_jobs(), 0);
    }

    #[test]
    fn each_on_leave_does_what_it_says() {
        let (emulator, mut s) = Bound::new::<SendGridFake>();
        let list = s.binding.list_id.clone().unwrap();
        let everyone: Vec<Member> = ["ann", "bob", "cid"]
            .iter()
            .map(|n| member(&format!("{n}@example.com"), json!({"first_name": n})))
            .collect();
        assert!(s.upsert(&everyone).iter().all(is_subscribed));
        let sg = emulator.sendgrid();

        let leaving = [
            member("ann@example.com", json!({})),
            member("nobody@example.com", json!({})),
        ];
        let outcomes = s.remove(LeaveAction::Remove, &leaving);
        assert_eq!(outcomes, vec![Outcome::Removed, Outcome::Removed]);
        assert!(sg.contact("ann@example.com").is_some());
        assert!(!sg.list_contacts(&list).contains_key("ann@example.com"));

        let outcomes = s.remove(
            LeaveAction::Unsubscribe,
            &[member("bob@example.com", json!({}))],
        );
        assert_eq!(outcomes, vec![Outcome::Removed]);
        assert_eq!(sg.suppressions_of("bob@example.com"), vec!["unsubscribes"]);
        assert!(!sg.list_contacts(&list).contains_key("bob@example.com"));
        let again = s.upsert(&[member("bob@example.com", json!({"first_name": "Bob"}))]);
        assert_eq!(refusal_status(&again[0]), Some(ConsentStatus::Unsubscribed));

        let outcomes = s.remove(LeaveAction::Delete, &[member("cid@example.com", json!({}))]);
        assert_eq!(outcomes, vec![Outcome::Removed]);
        assert!(sg.contact("cid@example.com").is_none());

        assert!(!SPEC.capabilities.on_leave.contains(&"archive"));
        test_support::assert_unoffered_leaves_are_refused(
            &SPEC,
            &mut s.provider,
            &mut s.http,
            &s.binding,
        );
    }

    /// The suite's consent scenario refuses an unsubscribed address; here SendGrid's other
    /// suppressions, and ones that appear after the first read.
    #[test]
    fn suppressed_addresses_are_refused_and_never_added() {
        let (emulator, mut s) = Bound::new::<SendGridFake>();
        let sg = emulator.sendgrid();
        sg.set_status("b@example.com", "bounced");
        let outcomes = s.upsert(&[
            member("b@example.com", json!({})),
            member("ok@example.com", json!({})),
        ]);
        assert_eq!(refusal_status(&outcomes[0]), Some(ConsentStatus::Bounced));
        assert!(is_subscribed(&outcomes[1]));

        // Suppressions that appear later are seen by the incremental read.
        for (address, suppression, consent) in [
            ("s@example.com", "spam_report", ConsentStatus::Complained),
            ("i@example.com", "invalid", ConsentStatus::Cleaned),
        ] {
            sg.set_status(address, suppression);
            let outcomes = s.upsert(&[member(address, json!({}))]);
            assert_eq!(refusal_status(&outcomes[0]), Some(consent), "{suppression}");
        }
        assert!(sg.suppressed_upserts().is_empty());
        assert!(
            emulator
                .requests("sendgrid")
                .iter()
                .any(|r| r.query.contains("start_time="))
        );
    }

    #[test]
    fn per_item_errors_fail_only_their_contact() {
        let (emulator, mut s) = Bound::new::<SendGridFake>();
        let list = s.binding.list_id.clone().unwrap();
        // Refused while validating the request: the others are sent again without it.
        let outcomes = s.upsert(&[
            member("ann@example.com", json!({})),
            member("odd@example.c0m", json!({})),
        ]);
        assert!(is_subscribed(&outcomes[0]));
        assert!(
            matches!(&outcomes[1], Outcome::Failed { message } if message.contains("contacts[1].email"))
        );
        // Refused by the import job: found out contact by contact, and the others are
        // matched to their contact ids.
        emulator
            .sendgrid()
            .reject_address("bad@example.com", "blocked");
        let outcomes = s.upsert(&[
            member("bad@example.com", json!({})),
            member("cid@example.com", json!({})),
        ]);
        assert!(
            matches!(&outcomes[0], Outcome::Failed { message } if message.contains("import job"))
        );
        assert!(
            matches!(
                &outcomes[1],
                Outcome::Member {
                    remote_id: Some(_),
                    ..
                }
            ),
            "{outcomes:?}"
        );
        // A value the field type refuses never leaves.
        let outcomes = s.upsert(&[member("dan@example.com", json!({"ltv": "lots"}))]);
        assert!(matches!(&outcomes[0], Outcome::Failed { message } if message.contains("ltv")));
        let members = emulator.list_members("sendgrid", &list);
        assert_eq!(
            members.keys().collect::<Vec<_>>(),
            vec!["ann@example.com", "cid@example.com"]
        );
    }

    #[test]
    fn a_wrong_key_is_an_authentication_failure() {
        let emulator = Emulator::start();
        emulator.sendgrid().set_api_key("SG.other");
        let mut http = http();
        match provider(&emulator).check(&mut http) {
            Err(ProviderError::Auth(message)) => {
                assert!(message.contains("authorization required"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Without a Retry-After, SendGrid's own `X-RateLimit-Reset` says when to come back.
    #[test]
    fn throttling_waits_for_the_rate_limit_reset() {
        let emulator = Emulator::start();
        let mut http = http();
        let mut provider = provider(&emulator);
        emulator
            .faults("sendgrid")
            .push(Fault::too_many_requests(None));
        match provider.check(&mut http) {
            Err(ProviderError::Transient {
                retry_after: Some(after),
                ..
            }) => {
                assert!(
                    after >= Duration::from_secs(1) && after <= Duration::from_secs(2),
                    "{after:?}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    /// The suite garbles removals from the list; here the other ways SendGrid's members leave.
    #[test]
    fn a_garbled_success_is_not_taken_for_a_deletion_or_unsubscription() {
        for (action, method, path) in [
            (LeaveAction::Delete, "DELETE", "/v3/marketing/contacts"),
            (
                LeaveAction::Unsubscribe,
                "POST",
                "/v3/asm/suppressions/global",
            ),
        ] {
            let (emulator, mut s) = Bound::new::<SendGridFake>();
            let list = s.binding.list_id.clone().unwrap();
            let ann = [member("ann@example.com", json!({"first_name": "Ann"}))];
            assert!(is_subscribed(&s.upsert(&ann)[0]));
            emulator
                .faults("sendgrid")
                .push(Fault::MalformedJson.on_method(method).on_path(path));
            assert!(
                matches!(
                    s.provider.remove(&mut s.http, &s.binding, action, &ann),
                    Err(ProviderError::Transient { .. })
                ),
                "{action:?}"
            );
            assert_eq!(s.remove(action, &ann), [Outcome::Removed], "{action:?}");
            assert!(
                emulator.list_members("sendgrid", &list).is_empty(),
                "{action:?}"
            );
        }
    }

    /// SendGrid is asked to erase an address even when it holds no contact for it: its email
    /// records may still hold the address.
    #[test]
    fn erasure_is_requested_for_unknown_addresses_too() {
        let (emulator, mut s) = Bound::new::<SendGridFake>();
        let outcomes = s.erase(&[member("ghost@example.com", json!({}))]);
        assert_eq!(outcomes, vec![Outcome::Removed]);
        assert_eq!(emulator.sendgrid().erased(), vec!["ghost@example.com"]);
    }

    #[test]
    fn the_fake_refuses_what_sendgrid_refuses() {
        let emulator = Emulator::start();
        // The oversize requests take the debug-built fake a while to read and refuse.
        let mut http = Http::local(Duration::from_secs(30));
        let contacts: Vec<Value> = (0..=UPSERT_CONTACTS)
            .map(|i| json!({"email": format!("u{i}@example.com")}))
            .collect();
        let request = Request::new(
            Method::Put,
            format!("{}/v3/marketing/contacts", emulator.base_url("sendgrid")),
        )
        .json(&json!({"contacts": contacts}));
        assert_eq!(http.send("oversize", request).unwrap().status, 400);
        let emails: Vec<String> = (0..=SEARCH_BATCH)
            .map(|i| format!("u{i}@example.com"))
            .collect();
        let request = Request::new(
            Method::Post,
            format!(
                "{}/v3/marketing/contacts/search/emails",
                emulator.base_url("sendgrid")
            ),
        )
        .json(&json!({"emails": emails}));
        assert_eq!(http.send("oversize", request).unwrap().status, 400);
    }

    struct SendGridFake;

    impl Fake for SendGridFake {
        const SPEC: &'static Spec = &SPEC;

        fn connect(emulator: &Emulator) -> Box<dyn Provider> {
            emulator.sendgrid().set_api_key(KEY);
            emulator.sendgrid().add_field("ltv", "Number");
            emulator.sendgrid().add_field("signup", "Date");
            provider(emulator)
        }

        fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider> {
            provider_with_key(emulator, WRONG_SECRET)
        }

        fn binding() -> Binding {
            binding(&["first_name", "ltv", "signup"])
        }

        fn member(address: &str) -> Member {
            member(
                address,
                json!({"first_name": "Ann", "ltv": 1200, "signup": "2024-03-05"}),
            )
        }

        fn refuse(emulator: &Emulator, address: &str) -> &'static str {
            emulator.sendgrid().reject_address(address, "blocked");
            "import job"
        }

        fn knows(emulator: &Emulator, address: &str) -> bool {
            emulator.sendgrid().contact(address).is_some()
        }
    }

    impl Consent for SendGridFake {
        /// SendGrid's consent is its global suppression list.
        fn unsubscribe(emulator: &Emulator, _: &Binding, address: &str) {
            assert!(emulator.sendgrid().set_status(address, "unsubscribed"));
        }
    }

    impl Erasure for SendGridFake {
        /// Erasure requested, beyond deleting the contact.
        fn erased(emulator: &Emulator, address: &str) -> bool {
            emulator.sendgrid().erased().iter().any(|a| a == address)
        }
    }

    conformance_suite!(SendGridFake {
        consent: supported,
        erasure: supported
    });
}

#[cfg(test)]
mod contract {
    use super::*;
    use crate::providers::contract::{Prism, assert_all_valid};
    use crate::providers::test_support;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// SendGrid's description comes in one file per area, and Prism serves one file: a small
    /// forwarder routes each path to the Prism holding it, so whole operations can run against
    /// one `base_url` while each request is validated by the spec that describes it.
    fn route(routes: Vec<(&'static str, String)>) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
        let address = listener.local_addr().expect("bound");
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let routes = routes.clone();
                std::thread::spawn(move || {
                    let _ = forward(client, &routes);
                });
            }
        });
        format!("http://{address}")
    }

    /// One request per connection: forwarded with `Connection: close`, the answer relayed
    /// byte for byte, then the connection closed.
    fn forward(client: TcpStream, routes: &[(&'static str, String)]) -> std::io::Result<()> {
        let mut reader = BufReader::new(client.try_clone()?);
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        let mut headers = Vec::new();
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let line = line.trim_end().to_string();
            if line.is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
                if name.eq_ignore_ascii_case("connection") {
                    continue;
                }
            }
            headers.push(line);
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body)?;
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        let upstream = routes
            .iter()
            .filter(|(prefix, _)| path.starts_with(prefix))
            .max_by_key(|(prefix, _)| prefix.len())
            .map(|(_, url)| url.trim_start_matches("http://").to_string());
        let mut client = client;
        let Some(upstream) = upstream else {
            return client.write_all(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        };
        let mut server = TcpStream::connect(upstream)?;
        let mut head = request_line.trim_end().to_string();
        head.push_str("\r\n");
        for header in headers {
            head.push_str(&header);
            head.push_str("\r\n");
        }
        head.push_str("Connection: close\r\n\r\n");
        server.write_all(head.as_bytes())?;
        server.write_all(&body)?;
        let mut answer = Vec::new();
        server.read_to_end(&mut answer)?;
        client.write_all(&answer)
    }

    fn member(address: &str) -> Member {
        test_support::member(
            address,
            json!({"first_name": "Jane", "num_orders": 3, "dob": "1990-07-14"}),
        )
    }

    #[test]
    fn every_request_validates_against_the_official_specs() {
        let specs = [
            "tsg_mc_contacts_v3.json",
            "tsg_mc_lists_v3.json",
            "tsg_mc_custom_fields_v3.json",
            "tsg_recipients_data_erasure_v3.json",
            "tsg_suppressions_v3.json",
        ];
        let prisms: Vec<Prism> = std::thread::scope(|s| {
            let started: Vec<_> = specs
                .iter()
                .map(|spec| s.spawn(|| Prism::start(spec)))
                .collect();
            started
                .into_iter()
                .map(|h| h.join().expect("Prism started"))
                .collect()
        });
        let url = |spec: &str| {
            prisms[specs.iter().position(|s| *s == spec).unwrap()]
                .base_url
                .clone()
        };
        let base_url = route(vec![
            ("/v3/marketing/contacts", url("tsg_mc_contacts_v3.json")),
            ("/v3/marketing/lists", url("tsg_mc_lists_v3.json")),
            (
                "/v3/marketing/field_definitions",
                url("tsg_mc_custom_fields_v3.json"),
            ),
            ("/v3/recipients", url("tsg_recipients_data_erasure_v3.json")),
            ("/v3/suppression", url("tsg_suppressions_v3.json")),
            ("/v3/asm", url("tsg_suppressions_v3.json")),
        ]);
        let mut http = prisms[0].http();
        let mut provider = connect(&test_support::config(
            json!({"base_url": base_url, "import_wait_seconds": "0"}),
            json!({"api_key": "SG.contract-test"}),
        ));
        provider.check(&mut http).expect("check");
        let mut binding = Binding {
            id: 1,
            filter: "vip".into(),
            list_id: None,
            list_name: "vip (crm)".into(),
            tags: vec![],
            // Field names from the spec's field-definitions example: reserved, Number, Date.
            fields: vec!["first_name".into(), "num_orders".into(), "dob".into()],
            new_member_status: MemberStatus::Subscribed,
            remote: Map::new(),
        };
        provider
            .prepare(&mut http, &mut binding)
            .expect("prepare creates the list");
        provider
            .prepare(&mut http, &mut binding)
            .expect("prepare checks the list");
        // The addresses the spec's search example knows, so removals find contact ids.
        let members = [
            member("jane_doe@example.com"),
            member("john_doe@example.com"),
        ];
        for _ in 0..2 {
            provider
                .upsert(&mut http, &binding, &members)
                .expect("upsert");
        }
        for action in [
            LeaveAction::Remove,
            LeaveAction::Unsubscribe,
            LeaveAction::Delete,
        ] {
            provider
                .remove(&mut http, &binding, action, &members)
                .expect("remove");
        }
        provider
            .erase(&mut http, &binding, &members)
            .expect("erase");
        let calls = http.drain_records();
        let made: HashSet<&str> = calls.iter().map(|c| c.operation.as_str()).collect();
        for operation in [
            "list lists",
            "create list",
            "get list",
            "list fields",
            "read suppressions",
            "upsert contacts",
            "import status",
            "find contacts",
            "remove from list",
            "unsubscribe",
            "delete contacts",
            "erase recipients",
        ] {
            assert!(made.contains(operation), "no {operation} request was made");
        }
        assert_all_valid(&calls);
    }
}
