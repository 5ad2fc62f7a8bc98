//! Mailchimp Marketing API v3, the subset pg_listsync uses, served under `/mailchimp/3.0/...`.
//!
//! Request and response field names follow the official OpenAPI description
//! (`shared/specs/mailchimp/marketing-lists-subset.json`); behaviour follows the live
//! API where it matters for list sync: batch subscribe semantics (`status` vs
//! `status_if_new`, `update_existing`, per-item `errors[]`), compliance states that
//! must never be re-subscribed, archive vs permanent delete, static segments being
//! tags, 500-item limits, and `application/problem+json` errors.
//!
//! Where the live API's behaviour is unknown or unhelpful for testing, the
//! emulator is strict and says so in the item's error text; see `README.md`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use md5::{Digest, Md5};
use serde_json::{Map, Value, json};

use crate::http::{Request, Response, reason_phrase};
use crate::provider::{self, Provider, admin_error, lock, opt_bool, opt_str, req_str, type_name};

const PROBLEM_TYPE: &str = "https://mailchimp.com/developer/marketing/docs/errors/";
/// Batch subscribe and static segment calls take at most this many addresses.
const MAX_MEMBERS_PER_CALL: usize = 500;
/// Statuses a client may set.
const SETTABLE_STATUSES: [&str; 5] = [
    "subscribed",
    "unsubscribed",
    "cleaned",
    "pending",
    "transactional",
];
/// Statuses a member may have (`archived` results from DELETE).
const ALL_STATUSES: [&str; 6] = [
    "subscribed",
    "unsubscribed",
    "cleaned",
    "pending",
    "transactional",
    "archived",
];
const MERGE_FIELD_TYPES: [&str; 11] = [
    "text", "number", "address", "phone", "date", "url", "imageurl", "radio", "dropdown",
    "birthday", "zip",
];
/// Every new Mailchimp audience has these merge fields.
const DEFAULT_MERGE_FIELDS: [(&str, &str, &str); 5] = [
    ("FNAME", "First Name", "text"),
    ("LNAME", "Last Name", "text"),
    ("ADDRESS", "Address", "address"),
    ("PHONE", "Phone Number", "phone"),
    ("BIRTHDAY", "Birthday", "birthday"),
];

/// A member of an audience, as tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The address as first given (case preserved).
    pub email: String,
    /// `subscribed`, `pending`, `unsubscribed`, `cleaned`, `archived` or `transactional`.
    pub status: String,
    /// Only the merge fields that were set (responses also show the audience's others as `""`).
    pub merge_fields: Map<String, Value>,
    /// Tag names (= static segment names).
    pub tags: BTreeSet<String>,
}

/// A static segment (tag).
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub id: u64,
    pub name: String,
    /// Members carrying the tag, not counting archived ones.
    pub member_count: usize,
}

/// A merge field of an audience.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeField {
    pub merge_id: u64,
    pub tag: String,
    pub name: String,
    /// `text`, `number`, `address`, `phone`, `date`, `birthday`, ...
    pub field_type: String,
    pub required: bool,
}

/// The Mailchimp fake. Obtain it with [`crate::Emulator::mailchimp`].
pub struct Mailchimp {
    state: Mutex<State>,
}

struct State {
    /// `None`: any API key (or none) is accepted.
    api_key: Option<String>,
    auto_create: bool,
    strict_merge_fields: bool,
    audiences: BTreeMap<String, Audience>,
    /// Lower-cased address -> error message for per-item failures.
    rejected: BTreeMap<String, String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            api_key: None,
            auto_create: true,
            strict_merge_fields: true,
            audiences: BTreeMap::new(),
            rejected: BTreeMap::new(),
        }
    }
}

/// One audience (list).
struct Audience {
    id: String,
    name: String,
    /// Keyed by subscriber hash.
    members: BTreeMap<String, Member>,
    merge_fields: Vec<MergeField>,
    /// Tag name -> id. In Mailchimp every tag is a static segment and vice versa.
    tags: BTreeMap<String, u64>,
    /// Permanently deleted: subscriber hash -> address. These cannot be re-imported.
    forgotten: BTreeMap<String, String>,
    /// Addresses moved from `unsubscribed` back to `subscribed`/`pending` through the
    /// API. Allowed by Mailchimp only with the contact's consent, so tests can assert
    /// that the sync never did it.
    resubscribed: Vec<String>,
}

/// Account-wide ids (segments/tags, merge fields, generated list ids), unique across audiences.
fn next_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Mailchimp's subscriber hash: the hex MD5 of the lower-cased address.
pub fn subscriber_hash(email: &str) -> String {
    let digest = Md5::digest(email.trim().to_lowercase().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------------
// Public API for tests

impl Mailchimp {
    pub(crate) fn new() -> Mailchimp {
        Mailchimp {
            state: Mutex::new(State::default()),
        }
    }

    /// Require this API key: `Authorization: Bearer <key>` or Basic with password `<key>`
    /// (any user name, as Mailchimp's `anystring:KEY`). Others get 401.
    pub fn set_api_key(&self, key: &str) {
        lock(&self.state).api_key = Some(key.to_string());
    }

    /// Accept any API key, or none (the default).
    pub fn accept_any_api_key(&self) {
        lock(&self.state).api_key = None;
    }

    /// Whether an unknown list id creates the audience on first use (default on);
    /// when off, unknown ids get 404 as at the real Mailchimp.
    pub fn set_auto_create(&self, enabled: bool) {
        lock(&self.state).auto_create = enabled;
    }

    /// Whether a merge tag unknown to the audience is an error (default, so mapping
    /// mistakes show up in tests) or silently dropped.
    pub fn set_strict_merge_fields(&self, strict: bool) {
        lock(&self.state).strict_merge_fields = strict;
    }

    /// Every write of this address (batch subscribe, PUT/POST member, segment add) fails
    /// with `message`: an error item in batch responses, a 400 otherwise.
    pub fn reject_address(&self, email: &str, message: &str) {
        lock(&self.state)
            .rejected
            .insert(email.trim().to_lowercase(), message.to_string());
    }

    pub fn clear_rejections(&self) {
        lock(&self.state).rejected.clear();
    }

    /// Creates an audience with the default merge fields (no-op if it exists).
    pub fn create_audience(&self, id: &str) {
        lock(&self.state)
            .audiences
            .entry(id.to_string())
            .or_insert_with(|| Audience::new(id, id));
    }

    /// Adds a merge field (creating the audience if needed). `field_type` as in the API:
    /// `text`, `number`, `date`, `birthday`, `phone`, `address`, ...
    pub fn add_merge_field(&self, audience: &str, tag: &str, field_type: &str) {
        let mut st = lock(&self.state);
        let aud = st
            .audiences
            .entry(audience.to_string())
            .or_insert_with(|| Audience::new(audience, audience));
        if aud.merge_field(tag).is_none() {
            aud.merge_fields.push(MergeField {
                merge_id: next_id(),
                tag: tag.to_ascii_uppercase(),
                name: tag.to_string(),
                field_type: field_type.to_string(),
                required: false,
            });
        }
    }

    /// Ids of all audiences.
    pub fn audience_ids(&self) -> Vec<String> {
        lock(&self.state).audiences.keys().cloned().collect()
    }

    /// All members of an audience (including archived ones), keyed by lower-cased
    /// address. Empty if the audience does not exist.
    pub fn audience(&self, audience: &str) -> BTreeMap<String, Member> {
        self.members_where(audience, |_| true)
    }

    /// One member, by address (any case).
    pub fn member(&self, audience: &str, email: &str) -> Option<Member> {
        let st = lock(&self.state);
        st.audiences
            .get(audience)?
            .members
            .get(&subscriber_hash(email))
            .cloned()
    }

    /// Non-archived members carrying tag `tag` (the static segment of that name).
    pub fn members_with_tag(&self, audience: &str, tag: &str) -> BTreeMap<String, Member> {
        self.members_where(audience, |m| m.status != "archived" && m.tags.contains(tag))
    }

    /// Members with the given status.
    pub fn members_with_status(&self, audience: &str, status: &str) -> BTreeMap<String, Member> {
        self.members_where(audience, |m| m.status == status)
    }

    /// Changes a member's status as if it happened at Mailchimp (the contact
    /// unsubscribed, bounced, ...). Returns false if there is no such member or the
    /// status is not one of Mailchimp's.
    pub fn set_status(&self, audience: &str, email: &str, status: &str) -> bool {
        if !ALL_STATUSES.contains(&status) {
            return false;
        }
        let mut st = lock(&self.state);
        let member = st
            .audiences
            .get_mut(audience)
            .and_then(|a| a.members.get_mut(&subscriber_hash(email)));
        member.map(|m| m.status = status.to_string()).is_some()
    }

    /// The audience's static segments (tags), by id.
    pub fn segments(&self, audience: &str) -> Vec<Segment> {
        let st = lock(&self.state);
        let Some(aud) = st.audiences.get(audience) else {
            return Vec::new();
        };
        let mut segments: Vec<Segment> = aud
            .tags
            .iter()
            .map(|(name, id)| Segment {
                id: *id,
                name: name.clone(),
                member_count: aud.tag_count(name),
            })
            .collect();
        segments.sort_by_key(|s| s.id);
        segments
    }

    pub fn merge_fields(&self, audience: &str) -> Vec<MergeField> {
        lock(&self.state)
            .audiences
            .get(audience)
            .map(|a| a.merge_fields.clone())
            .unwrap_or_default()
    }

    /// Addresses that the API moved from `unsubscribed` back to `subscribed` or `pending`.
    pub fn resubscribed(&self, audience: &str) -> Vec<String> {
        lock(&self.state)
            .audiences
            .get(audience)
            .map(|a| a.resubscribed.clone())
            .unwrap_or_default()
    }

    /// Addresses deleted with `actions/delete-permanent`.
    pub fn permanently_deleted(&self, audience: &str) -> BTreeSet<String> {
        let st = lock(&self.state);
        st.audiences
            .get(audience)
            .map(|a| a.forgotten.values().cloned().collect())
            .unwrap_or_default()
    }

    fn members_where(
        &self,
        audience: &str,
        keep: impl Fn(&Member) -> bool,
    ) -> BTreeMap<String, Member> {
        let st = lock(&self.state);
        let Some(aud) = st.audiences.get(audience) else {
            return BTreeMap::new();
        };
        aud.members
            .values()
            .filter(|m| keep(m))
            .map(|m| (m.email.to_lowercase(), m.clone()))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Provider plumbing

impl Provider for Mailchimp {
    fn name(&self) -> &'static str {
        "mailchimp"
    }

    fn handle(&self, req: &Request) -> Response {
        let mut st = lock(&self.state);
        let result = if authorized(st.api_key.as_deref(), req) {
            route(&mut st, req)
        } else {
            Err(Problem::api_key_invalid())
        };
        result.unwrap_or_else(|problem| problem.response())
    }

    fn state_json(&self) -> Value {
        let st = lock(&self.state);
        let audiences: Map<String, Value> = st
            .audiences
            .iter()
            .map(|(id, aud)| (id.clone(), aud.state_json()))
            .collect();
        json!({
            "api_key_required": st.api_key.is_some(),
            "auto_create": st.auto_create,
            "strict_merge_fields": st.strict_merge_fields,
            "rejected": st.rejected,
            "audiences": audiences,
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

    fn list_members(&self, list_id: &str) -> BTreeMap<String, Map<String, Value>> {
        // The extension keeps a binding's tag (static segment) id as its list id.
        let st = lock(&self.state);
        let Some((audience, tag)) = st.audiences.values().find_map(|a| {
            a.tags
                .iter()
                .find(|(_, id)| id.to_string() == list_id)
                .map(|(name, _)| (a, name.clone()))
        }) else {
            return BTreeMap::new();
        };
        audience
            .members
            .values()
            .filter(|m| {
                matches!(m.status.as_str(), "subscribed" | "pending") && m.tags.contains(&tag)
            })
            .map(|m| (m.email.to_lowercase(), m.merge_fields.clone()))
            .collect()
    }

    fn reset(&self) {
        *lock(&self.state) = State::default();
    }

    fn error_response(&self, status: u16, detail: &str) -> Response {
        let (title, detail) = match status {
            429 => (
                "Too Many Requests",
                "You have exceeded the limit of 10 simultaneous connections.",
            ),
            500 => (
                "Internal Server Error",
                "An unexpected internal error has occurred. Please contact Support for more information.",
            ),
            503 => (
                "Service Unavailable",
                "This service is temporarily unavailable. Please try again later.",
            ),
            504 => (
                "Gateway Timeout",
                "The request timed out before it could be completed.",
            ),
            _ => (reason_phrase(status), detail),
        };
        Problem::new(status, title, detail).response()
    }
}

impl Mailchimp {
    /// `POST /_admin/mailchimp/<action>`; see README.md.
    fn admin_action(&self, action: &str, body: &Map<String, Value>) -> Result<(), String> {
        match action {
            "status" => {
                let (audience, email, status) = (
                    req_str(body, "audience")?,
                    req_str(body, "email")?,
                    req_str(body, "status")?,
                );
                if !self.set_status(audience, email, status) {
                    return Err(format!(
                        "no member {email} in audience {audience}, or bad status {status:?}"
                    ));
                }
            }
            "reject" => self.reject_address(
                req_str(body, "email")?,
                opt_str(body, "message")?.unwrap_or("rejected"),
            ),
            "api_key" => match opt_str(body, "key")? {
                Some(key) => self.set_api_key(key),
                None => self.accept_any_api_key(),
            },
            "audience" => self.create_audience(req_str(body, "id")?),
            "merge_field" => {
                let field_type = opt_str(body, "type")?.unwrap_or("text");
                self.add_merge_field(
                    req_str(body, "audience")?,
                    req_str(body, "tag")?,
                    field_type,
                );
            }
            "auto_create" => self.set_auto_create(opt_bool(body, "enabled")?.unwrap_or(true)),
            "strict_merge_fields" => {
                self.set_strict_merge_fields(opt_bool(body, "enabled")?.unwrap_or(true))
            }
            _ => return Err(format!("unknown mailchimp admin action {action:?}")),
        }
        Ok(())
    }
}

/// Bearer token, or HTTP Basic whose password is the key (Mailchimp ignores the user name).
fn authorized(expected: Option<&str>, req: &Request) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    let Some(header) = req.header("authorization") else {
        return false;
    };
    let (scheme, credentials) = header.split_once(' ').unwrap_or((header, ""));
    let credentials = credentials.trim();
    match scheme.to_ascii_lowercase().as_str() {
        "bearer" => credentials == expected,
        "basic" => base64::engine::general_purpose::STANDARD
            .decode(credentials)
            .ok()
            .and_then(|raw| String::from_utf8(raw).ok())
            .is_some_and(|pair| {
                pair.split_once(':')
                    .is_some_and(|(_, password)| password == expected)
            }),
        _ => false,
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An `application/problem+json` error.
#[derive(Debug)]
struct Problem {
    status: u16,
    title: String,
    detail: String,
    /// Field-level details, as Mailchimp's `errors: [{field, message}]`.
    errors: Vec<Value>,
}

impl Problem {
    fn new(status: u16, title: &str, detail: &str) -> Problem {
        Problem {
            status,
            title: title.into(),
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    fn not_found() -> Problem {
        Problem::new(
            404,
            "Resource Not Found",
            "The requested resource could not be found.",
        )
    }

    fn method_not_allowed() -> Problem {
        Problem::new(
            405,
            "Method Not Allowed",
            "The requested method and resource are not compatible. See the Allow header for this resource's available methods.",
        )
    }

    fn api_key_invalid() -> Problem {
        Problem::new(
            401,
            "API Key Invalid",
            "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
        )
    }

    fn invalid(detail: &str) -> Problem {
        Problem::new(400, "Invalid Resource", detail)
    }

    /// A schema violation on one field.
    fn schema(field: &str, message: &str) -> Problem {
        let mut p = Problem::invalid(
            "The resource submitted could not be validated. For field-specific details, see the 'errors' array.",
        );
        p.errors.push(json!({ "field": field, "message": message }));
        p
    }

    fn json_parse() -> Problem {
        Problem::new(
            400,
            "JSON Parse Exception",
            "We encountered an unspecified JSON parsing error.",
        )
    }

    fn response(&self) -> Response {
        let mut body = json!({
            "type": PROBLEM_TYPE,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance_id(),
        });
        if !self.errors.is_empty() {
            body["errors"] = Value::Array(self.errors.clone());
        }
        Response::new(self.status, "application/problem+json", body.to_string())
    }
}

/// A fresh UUID-shaped id for `instance`.
fn instance_id() -> String {
    let a = subscriber_hash(&format!("instance-{}", next_id()));
    format!(
        "{}-{}-{}-{}-{}",
        &a[0..8],
        &a[8..12],
        &a[12..16],
        &a[16..20],
        &a[20..32]
    )
}

/// Why a member write failed. Rendered as a batch `errors[]` item or as a problem.
#[derive(Debug)]
enum MemberError {
    Rejected(String),
    FakeEmail,
    Forgotten,
    Exists,
    Compliance,
    StatusRequired,
    MergeFields(Vec<(String, String)>),
}

impl MemberError {
    fn detail(&self, email: &str) -> String {
        match self {
            MemberError::Rejected(message) => message.clone(),
            MemberError::FakeEmail => {
                format!("{email} looks fake or invalid, please enter a real email address.")
            }
            MemberError::Forgotten => format!(
                "{email} was permanently deleted and cannot be re-imported. The contact must re-subscribe to get back on the list."
            ),
            MemberError::Exists => format!(
                "{email} is already a list member. Use PUT to insert or update list members."
            ),
            MemberError::Compliance => format!(
                "{email} is in a compliance state due to unsubscribe, bounce, or compliance review and cannot be subscribed."
            ),
            MemberError::StatusRequired => {
                format!("{email}: a status is required to add a new member.")
            }
            MemberError::MergeFields(_) => "Your merge fields were invalid.".into(),
        }
    }

    /// `(field, field_message)` of a batch error item.
    fn field(&self) -> (String, String) {
        match self {
            MemberError::FakeEmail => (
                "email_address".into(),
                "This value is not a valid email address.".into(),
            ),
            MemberError::StatusRequired => (
                "status_if_new".into(),
                "This value should not be blank.".into(),
            ),
            MemberError::MergeFields(errors) => errors.first().cloned().unwrap_or_default(),
            _ => (String::new(), String::new()),
        }
    }

    fn batch_item(&self, email: &str) -> Value {
        let code = if matches!(self, MemberError::Exists) {
            "ERROR_CONTACT_EXISTS"
        } else {
            "ERROR_GENERIC"
        };
        let (field, field_message) = self.field();
        json!({
            "email_address": email,
            "error": self.detail(email),
            "error_code": code,
            "field": field,
            "field_message": field_message,
        })
    }

    fn problem(&self, email: &str) -> Problem {
        let detail = self.detail(email);
        match self {
            MemberError::Forgotten => Problem::new(400, "Forgotten Email Not Subscribed", &detail),
            MemberError::Exists => Problem::new(400, "Member Exists", &detail),
            MemberError::Compliance => Problem::new(400, "Member In Compliance State", &detail),
            MemberError::StatusRequired => {
                Problem::schema("status_if_new", "This value should not be blank.")
            }
            MemberError::MergeFields(errors) => {
                let mut p = Problem::invalid(&detail);
                p.errors = errors
                    .iter()
                    .map(|(f, m)| json!({ "field": f, "message": m }))
                    .collect();
                p
            }
            MemberError::Rejected(_) | MemberError::FakeEmail => Problem::invalid(&detail),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Routing

/// What a request may bypass or relax, plus the account-wide rejection list.
struct Policy<'a> {
    rejected: &'a BTreeMap<String, String>,
    strict_merge_fields: bool,
    skip_merge_validation: bool,
}

fn route(st: &mut State, req: &Request) -> Result<Response, Problem> {
    let segments = req.segments();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let method = req.method.as_str();
    match (method, segments.as_slice()) {
        ("GET", ["3.0", "ping"]) => Ok(Response::json(
            200,
            &json!({ "health_status": "Everything's Chimpy!" }),
        )),
        ("POST", ["3.0", "lists"]) => create_list(st, req),
        (_, ["3.0", "ping" | "lists"]) => Err(Problem::method_not_allowed()),
        (_, ["3.0", "lists", list_id, rest @ ..]) => {
            let State {
                audiences,
                rejected,
                strict_merge_fields,
                auto_create,
                ..
            } = st;
            let audience = match audiences.get_mut(*list_id) {
                Some(audience) => audience,
                None if *auto_create => audiences
                    .entry(list_id.to_string())
                    .or_insert_with(|| Audience::new(list_id, list_id)),
                None => return Err(Problem::not_found()),
            };
            let policy = Policy {
                rejected,
                strict_merge_fields: *strict_merge_fields,
                skip_merge_validation: req.query_param("skip_merge_validation").as_deref()
                    == Some("true"),
            };
            audience.route(&policy, method, rest, req)
        }
        _ => Err(Problem::not_found()),
    }
}

/// `POST /3.0/lists`: creates an audience with a generated id.
fn create_list(st: &mut State, req: &Request) -> Result<Response, Problem> {
    let body = body_object(req)?;
    let name = req_str(&body, "name").map_err(|m| Problem::schema("name", &m))?;
    let id = subscriber_hash(&format!("list-{}", next_id()))[..10].to_string();
    let audience = Audience::new(&id, name);
    let info = audience.info_json();
    st.audiences.insert(id, audience);
    Ok(Response::json(200, &info))
}

fn body_object(req: &Request) -> Result<Map<String, Value>, Problem> {
    match req.json() {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(Problem::schema(
            "",
            &format!(
                "Schema describes object, {} found instead",
                type_name(&other)
            ),
        )),
        Err(_) => Err(Problem::json_parse()),
    }
}

/// Accepts `{subscriber_hash}` as the hash, the address itself, or the contact id (= hash here).
fn member_key(segment: &str) -> String {
    if segment.contains('@') {
        subscriber_hash(segment)
    } else {
        segment.to_ascii_lowercase()
    }
}

impl Audience {
    fn new(id: &str, name: &str) -> Audience {
        let merge_fields = DEFAULT_MERGE_FIELDS
            .iter()
            .map(|(tag, name, field_type)| MergeField {
                merge_id: next_id(),
                tag: tag.to_string(),
                name: name.to_string(),
                field_type: field_type.to_string(),
                required: false,
            })
            .collect();
        Audience {
            id: id.to_string(),
            name: name.to_string(),
            members: BTreeMap::new(),
            merge_fields,
            tags: BTreeMap::new(),
            forgotten: BTreeMap::new(),
            resubscribed: Vec::new(),
        }
    }

    fn route(
        &mut self,
        policy: &Policy,
        method: &str,
        rest: &[&str],
        req: &Request,
    ) -> Result<Response, Problem> {
        match (method, rest) {
            ("GET", []) => Ok(Response::json(200, &self.info_json())),
            ("POST", []) => self.batch_subscribe(policy, req),
            ("GET", ["members"]) => self.list_members(req),
            ("POST", ["members"]) => self.add_member(policy, req),
            ("GET", ["members", id]) => self.get_member(id),
            ("PUT", ["members", id]) => self.put_member(policy, id, req),
            ("PATCH", ["members", id]) => self.patch_member(policy, id, req),
            ("DELETE", ["members", id]) => self.archive_member(id),
            ("POST", ["members", id, "actions", "delete-permanent"]) => self.delete_permanent(id),
            ("GET", ["members", id, "tags"]) => self.member_tags(id),
            ("POST", ["members", id, "tags"]) => self.update_member_tags(id, req),
            ("GET", ["merge-fields"]) => self.list_merge_fields(req),
            ("POST", ["merge-fields"]) => self.create_merge_field(req),
            ("GET", ["segments"]) => self.list_segments(req),
            ("POST", ["segments"]) => self.create_segment(req),
            ("GET", ["segments", id]) => self.get_segment(id),
            ("POST", ["segments", id]) => self.update_segment_members(policy, id, req),
            ("DELETE", ["segments", id]) => self.delete_segment(id),
            (
                _,
                []
                | ["members" | "merge-fields" | "segments"]
                | ["members", _]
                | ["members", _, "tags"]
                | ["members", _, "actions", "delete-permanent"]
                | ["segments", _],
            ) => Err(Problem::method_not_allowed()),
            _ => Err(Problem::not_found()),
        }
    }

    // -- members --------------------------------------------------------------------------

    /// `POST /3.0/lists/{id}`: batch subscribe/unsubscribe, per-item errors.
    fn batch_subscribe(&mut self, policy: &Policy, req: &Request) -> Result<Response, Problem> {
        let body = body_object(req)?;
        let items = match body.get("members") {
            Some(Value::Array(items)) => items,
            other => {
                let found = other.map_or("nothing", type_name);
                return Err(Problem::schema(
                    "members",
                    &format!("Schema describes array, {found} found instead"),
                ));
            }
        };
        if items.len() > MAX_MEMBERS_PER_CALL {
            return Err(Problem::invalid(&format!(
                "You can only add or update up to {MAX_MEMBERS_PER_CALL} members per call; this request has {}.",
                items.len()
            )));
        }
        let update_existing = opt_bool(&body, "update_existing")
            .map_err(|m| Problem::schema("update_existing", &m))?;
        let sync_tags =
            opt_bool(&body, "sync_tags").map_err(|m| Problem::schema("sync_tags", &m))?;
        // Validate the whole request before changing anything, as a schema check would.
        let changes = items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                MemberChange::parse(item, true)
                    .map_err(|m| Problem::schema(&format!("members[{i}]"), &m))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let mode = if update_existing.unwrap_or(false) {
            Mode::Upsert
        } else {
            Mode::Create
        };
        let (mut created, mut updated, mut errors) = (Vec::new(), Vec::new(), Vec::new());
        for mut change in changes {
            change.replace_tags = sync_tags.unwrap_or(false);
            match self.upsert(policy, &change, mode) {
                Ok((key, Applied::Created)) => created.push(self.member_json(&key)),
                Ok((key, Applied::Updated)) => updated.push(self.member_json(&key)),
                Err(error) => errors.push(error.batch_item(&change.email)),
            }
        }
        Ok(Response::json(
            200,
            &json!({
                "total_created": created.len(),
                "total_updated": updated.len(),
                "error_count": errors.len(),
                "new_members": created,
                "updated_members": updated,
                "errors": errors,
                "_links": [],
            }),
        ))
    }

    /// `POST /3.0/lists/{id}/members`: add a new member (`status` required).
    fn add_member(&mut self, policy: &Policy, req: &Request) -> Result<Response, Problem> {
        let mut change = MemberChange::parse(&Value::Object(body_object(req)?), false)
            .map_err(|m| Problem::schema("", &m))?;
        if change.status.is_none() {
            return Err(Problem::schema("status", "This value should not be blank."));
        }
        change.status_if_new = None;
        let (key, _) = self
            .upsert(policy, &change, Mode::Create)
            .map_err(|e| e.problem(&change.email))?;
        Ok(Response::json(200, &self.member_json(&key)))
    }

    /// `PUT /3.0/lists/{id}/members/{hash}`: add or update.
    fn put_member(
        &mut self,
        policy: &Policy,
        id: &str,
        req: &Request,
    ) -> Result<Response, Problem> {
        let key = member_key(id);
        let mut body = body_object(req)?;
        let known = self.members.get(&key);
        match (
            opt_str(&body, "email_address").map_err(|m| Problem::schema("email_address", &m))?,
            known,
        ) {
            (Some(email), _) if subscriber_hash(email) != key => {
                return Err(Problem::invalid(
                    "The subscriber hash in the URL does not match the email_address in the request body.",
                ));
            }
            (Some(_), _) => {}
            // Updating a known member: the address may be omitted.
            (None, Some(member)) => {
                body.insert("email_address".into(), Value::String(member.email.clone()));
            }
            (None, None) => {
                return Err(Problem::schema(
                    "email_address",
                    "This value should not be blank.",
                ));
            }
        }
        let change = MemberChange::parse(&Value::Object(body), false)
            .map_err(|m| Problem::schema("", &m))?;
        let is_new = self
            .members
            .get(&key)
            .is_none_or(|m| m.status == "archived");
        if is_new && change.status_if_new.is_none() {
            return Err(MemberError::StatusRequired.problem(&change.email));
        }
        let (key, _) = self
            .upsert(policy, &change, Mode::Upsert)
            .map_err(|e| e.problem(&change.email))?;
        Ok(Response::json(200, &self.member_json(&key)))
    }

    /// `PATCH /3.0/lists/{id}/members/{hash}`: update an existing member; a new
    /// `email_address` moves the member to the new subscriber hash.
    fn patch_member(
        &mut self,
        policy: &Policy,
        id: &str,
        req: &Request,
    ) -> Result<Response, Problem> {
        let key = member_key(id);
        let Some(current) = self.members.get(&key).cloned() else {
            return Err(Problem::not_found());
        };
        let body = body_object(req)?;
        let new_email =
            opt_str(&body, "email_address").map_err(|m| Problem::schema("email_address", &m))?;
        let status = status_field(&body, "status")?;
        let merge_input = merge_fields_field(&body)?;

        let mut member = current.clone();
        let mut new_key = key.clone();
        if let Some(email) = new_email
            .map(str::trim)
            .filter(|e| !e.eq_ignore_ascii_case(&current.email))
        {
            check_address(policy, email).map_err(|e| e.problem(email))?;
            new_key = subscriber_hash(email);
            if self.forgotten.contains_key(&new_key) {
                return Err(MemberError::Forgotten.problem(email));
            }
            if self.members.contains_key(&new_key) {
                return Err(MemberError::Exists.problem(email));
            }
            member.email = email.to_string();
        } else if let Some(email) = new_email {
            member.email = email.trim().to_string(); // same address, maybe different case
        }
        let merge = self
            .check_merge_fields(policy, merge_input.as_ref(), false)
            .map_err(|e| e.problem(&member.email))?;
        let resubscribe = match status {
            Some(status) => {
                check_transition(&current.status, status).map_err(|e| e.problem(&member.email))?
            }
            None => false,
        };
        if let Some(status) = status {
            member.status = status.to_string();
        }
        member.merge_fields.extend(merge);
        if resubscribe {
            self.resubscribed.push(member.email.to_lowercase());
        }
        self.members.remove(&key);
        self.members.insert(new_key.clone(), member);
        Ok(Response::json(200, &self.member_json(&new_key)))
    }

    fn get_member(&self, id: &str) -> Result<Response, Problem> {
        let key = member_key(id);
        if !self.members.contains_key(&key) {
            return Err(Problem::not_found());
        }
        Ok(Response::json(200, &self.member_json(&key)))
    }

    /// `DELETE .../members/{hash}`: archives (the contact and its data stay).
    fn archive_member(&mut self, id: &str) -> Result<Response, Problem> {
        let member = self
            .members
            .get_mut(&member_key(id))
            .ok_or_else(Problem::not_found)?;
        member.status = "archived".into();
        Ok(Response::no_content())
    }

    /// `POST .../members/{hash}/actions/delete-permanent`: erases the contact for good.
    fn delete_permanent(&mut self, id: &str) -> Result<Response, Problem> {
        let key = member_key(id);
        let member = self.members.remove(&key).ok_or_else(Problem::not_found)?;
        self.forgotten.insert(key, member.email.to_lowercase());
        Ok(Response::no_content())
    }

    /// `GET .../members?count=&offset=&status=`; archived members only with `status=archived`.
    fn list_members(&self, req: &Request) -> Result<Response, Problem> {
        let (count, offset) = provider::page(req, 10, 1000).map_err(|m| Problem::invalid(&m))?;
        let status = req.query_param("status").filter(|s| !s.is_empty());
        if let Some(status) = &status
            && !ALL_STATUSES.contains(&status.as_str())
        {
            return Err(Problem::invalid(&format!("Invalid status {status:?}.")));
        }
        let mut keys: Vec<(&String, String)> = self
            .members
            .iter()
            .filter(|(_, m)| match &status {
                Some(s) => m.status == *s,
                None => m.status != "archived",
            })
            .map(|(key, m)| (key, m.email.to_lowercase()))
            .collect();
        keys.sort_by(|a, b| a.1.cmp(&b.1));
        let members: Vec<Value> = keys
            .iter()
            .skip(offset)
            .take(count)
            .map(|(key, _)| self.member_json(key))
            .collect();
        Ok(Response::json(
            200,
            &json!({ "members": members, "list_id": self.id, "total_items": keys.len() }),
        ))
    }

    fn member_tags(&self, id: &str) -> Result<Response, Problem> {
        let member = self
            .members
            .get(&member_key(id))
            .ok_or_else(Problem::not_found)?;
        let tags: Vec<Value> = member
            .tags
            .iter()
            .map(|name| json!({ "id": self.tags.get(name).copied().unwrap_or(0), "name": name, "date_added": "" }))
            .collect();
        Ok(Response::json(
            200,
            &json!({ "tags": tags, "total_items": member.tags.len() }),
        ))
    }

    /// `POST .../members/{hash}/tags` `{tags: [{name, status: active|inactive}]}` → 204.
    fn update_member_tags(&mut self, id: &str, req: &Request) -> Result<Response, Problem> {
        let key = member_key(id);
        if !self.members.contains_key(&key) {
            return Err(Problem::not_found());
        }
        let body = body_object(req)?;
        let Some(Value::Array(items)) = body.get("tags") else {
            return Err(Problem::schema(
                "tags",
                "Schema describes array, which is required",
            ));
        };
        let mut updates = Vec::new();
        for item in items {
            let obj = item
                .as_object()
                .ok_or_else(|| Problem::schema("tags", "each tag must be an object"))?;
            let name = req_str(obj, "name")
                .map_err(|m| Problem::schema("tags.name", &m))?
                .trim()
                .to_string();
            let active =
                match req_str(obj, "status").map_err(|m| Problem::schema("tags.status", &m))? {
                    "active" => true,
                    "inactive" => false,
                    other => {
                        return Err(Problem::schema(
                            "tags.status",
                            &format!("Invalid tag status {other:?}."),
                        ));
                    }
                };
            if name.is_empty() {
                return Err(Problem::schema(
                    "tags.name",
                    "This value should not be blank.",
                ));
            }
            updates.push((name, active));
        }
        for (name, active) in updates {
            if active {
                self.ensure_tag(&name);
            }
            let Some(member) = self.members.get_mut(&key) else {
                continue;
            };
            if active {
                member.tags.insert(name);
            } else {
                member.tags.remove(&name);
            }
        }
        Ok(Response::no_content())
    }

    /// Shared by batch subscribe, POST and PUT member.
    fn upsert(
        &mut self,
        policy: &Policy,
        change: &MemberChange,
        mode: Mode,
    ) -> Result<(String, Applied), MemberError> {
        let key = check_address(policy, &change.email)?;
        if self.forgotten.contains_key(&key) {
            return Err(MemberError::Forgotten);
        }
        let current_status = self.members.get(&key).map(|m| m.status.clone());
        let creating = current_status.as_deref().is_none_or(|s| s == "archived");
        if !creating && mode == Mode::Create {
            return Err(MemberError::Exists);
        }
        let merge = self.check_merge_fields(policy, change.merge_fields.as_ref(), creating)?;
        // Only `status_if_new` (or `status`) applies to a new or archived member;
        // only `status` applies to an existing one, subject to compliance states.
        let (new_status, resubscribe) = if creating {
            (
                Some(
                    change
                        .status_if_new
                        .or(change.status)
                        .ok_or(MemberError::StatusRequired)?,
                ),
                false,
            )
        } else {
            match (change.status, current_status.as_deref()) {
                (Some(to), Some(from)) => (Some(to), check_transition(from, to)?),
                _ => (None, false),
            }
        };

        for tag in change.tags.iter().flatten() {
            self.ensure_tag(tag);
        }
        let member = self.members.entry(key.clone()).or_insert_with(|| Member {
            email: change.email.clone(),
            status: String::new(),
            merge_fields: Map::new(),
            tags: BTreeSet::new(),
        });
        if let Some(status) = new_status {
            member.status = status.to_string();
        }
        member.merge_fields.extend(merge);
        if let Some(tags) = &change.tags {
            if change.replace_tags {
                member.tags.clear();
            }
            member.tags.extend(tags.iter().cloned());
        }
        if resubscribe {
            self.resubscribed.push(change.email.to_lowercase());
        }
        Ok((
            key,
            if creating {
                Applied::Created
            } else {
                Applied::Updated
            },
        ))
    }

    /// Validates and normalises merge field values; on create, checks required fields.
    fn check_merge_fields(
        &self,
        policy: &Policy,
        input: Option<&Map<String, Value>>,
        creating: bool,
    ) -> Result<Map<String, Value>, MemberError> {
        let mut values = Map::new();
        let mut errors = Vec::new();
        for (tag, value) in input.into_iter().flatten() {
            match self.merge_field(tag) {
                Some(field) => match merge_value(field, value) {
                    Ok(v) => {
                        values.insert(field.tag.clone(), v);
                    }
                    Err(message) => errors.push((field.tag.clone(), message)),
                },
                None if policy.strict_merge_fields => {
                    errors.push((
                        tag.clone(),
                        format!("Merge field {tag} does not exist in this audience."),
                    ));
                }
                None => {}
            }
        }
        if creating && !policy.skip_merge_validation {
            for field in self.merge_fields.iter().filter(|f| f.required) {
                if values
                    .get(&field.tag)
                    .is_none_or(|v| v.as_str() == Some(""))
                {
                    errors.push((field.tag.clone(), "Please enter a value".into()));
                }
            }
        }
        if errors.is_empty() {
            Ok(values)
        } else {
            Err(MemberError::MergeFields(errors))
        }
    }

    fn member_json(&self, key: &str) -> Value {
        let Some(m) = self.members.get(key) else {
            return Value::Null;
        };
        let merge_fields: Map<String, Value> = self
            .merge_fields
            .iter()
            .map(|f| {
                (
                    f.tag.clone(),
                    m.merge_fields
                        .get(&f.tag)
                        .cloned()
                        .unwrap_or_else(|| json!("")),
                )
            })
            .collect();
        let full_name = [m.merge_fields.get("FNAME"), m.merge_fields.get("LNAME")]
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" ");
        let tags: Vec<Value> = m
            .tags
            .iter()
            .map(|name| json!({ "id": self.tags.get(name).copied().unwrap_or(0), "name": name }))
            .collect();
        json!({
            "id": key,
            "email_address": m.email,
            "unique_email_id": &key[..10.min(key.len())],
            "contact_id": key,
            "full_name": full_name,
            "email_type": "html",
            "status": m.status,
            "merge_fields": merge_fields,
            "interests": {},
            "stats": { "avg_open_rate": 0, "avg_click_rate": 0 },
            "vip": false,
            "source": "API - Generic",
            "tags_count": tags.len(),
            "tags": tags,
            "list_id": self.id,
        })
    }

    // -- merge fields ---------------------------------------------------------------------

    fn merge_field(&self, tag: &str) -> Option<&MergeField> {
        self.merge_fields
            .iter()
            .find(|f| f.tag.eq_ignore_ascii_case(tag))
    }

    fn list_merge_fields(&self, req: &Request) -> Result<Response, Problem> {
        let (count, offset) = provider::page(req, 10, 1000).map_err(|m| Problem::invalid(&m))?;
        let fields: Vec<Value> = self
            .merge_fields
            .iter()
            .skip(offset)
            .take(count)
            .map(|f| self.merge_field_json(f))
            .collect();
        Ok(Response::json(
            200,
            &json!({ "merge_fields": fields, "list_id": self.id, "total_items": self.merge_fields.len() }),
        ))
    }

    /// `POST .../merge-fields` `{name, type, tag?, required?}`.
    fn create_merge_field(&mut self, req: &Request) -> Result<Response, Problem> {
        let body = body_object(req)?;
        let name = req_str(&body, "name").map_err(|m| Problem::schema("name", &m))?;
        let field_type = req_str(&body, "type").map_err(|m| Problem::schema("type", &m))?;
        if !MERGE_FIELD_TYPES.contains(&field_type) {
            return Err(Problem::schema(
                "type",
                &format!("Invalid merge field type {field_type:?}."),
            ));
        }
        let required = opt_bool(&body, "required")
            .map_err(|m| Problem::schema("required", &m))?
            .unwrap_or(false);
        let merge_id = next_id();
        let tag = match opt_str(&body, "tag").map_err(|m| Problem::schema("tag", &m))? {
            Some(tag) => tag.trim().to_ascii_uppercase(),
            None => format!("MMERGE{}", self.merge_fields.len() + 1),
        };
        if tag.is_empty()
            || tag.len() > 10
            || !tag.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(Problem::schema(
                "tag",
                "A merge tag is 1 to 10 letters, digits or underscores.",
            ));
        }
        if self.merge_field(&tag).is_some() {
            return Err(Problem::invalid(&format!(
                "A Merge Field with the tag \"{tag}\" already exists for this list."
            )));
        }
        let field = MergeField {
            merge_id,
            tag,
            name: name.to_string(),
            field_type: field_type.to_string(),
            required,
        };
        let body = self.merge_field_json(&field);
        self.merge_fields.push(field);
        Ok(Response::json(200, &body))
    }

    fn merge_field_json(&self, f: &MergeField) -> Value {
        json!({
            "merge_id": f.merge_id,
            "tag": f.tag,
            "name": f.name,
            "type": f.field_type,
            "required": f.required,
            "default_value": "",
            "public": false,
            "display_order": f.merge_id,
            "options": {},
            "help_text": "",
            "list_id": self.id,
        })
    }

    // -- segments (= tags) ----------------------------------------------------------------

    fn ensure_tag(&mut self, name: &str) -> u64 {
        *self.tags.entry(name.to_string()).or_insert_with(next_id)
    }

    fn tag_count(&self, name: &str) -> usize {
        self.members
            .values()
            .filter(|m| m.status != "archived" && m.tags.contains(name))
            .count()
    }

    fn segment_by_id(&self, id: &str) -> Result<(String, u64), Problem> {
        let id: u64 = id.parse().map_err(|_| Problem::not_found())?;
        let name = self
            .tags
            .iter()
            .find(|(_, v)| **v == id)
            .map(|(name, _)| name.clone());
        name.map(|name| (name, id)).ok_or_else(Problem::not_found)
    }

    fn segment_json(&self, name: &str, id: u64) -> Value {
        json!({
            "id": id,
            "name": name,
            "member_count": self.tag_count(name),
            "type": "static",
            "created_at": "",
            "updated_at": "",
            "list_id": self.id,
        })
    }

    /// `GET .../segments?type=&count=&offset=`; every segment here is static.
    fn list_segments(&self, req: &Request) -> Result<Response, Problem> {
        let (count, offset) = provider::page(req, 10, 1000).map_err(|m| Problem::invalid(&m))?;
        let wanted = req
            .query_param("type")
            .is_none_or(|t| t.is_empty() || t == "static");
        let mut all: Vec<(&String, u64)> = if wanted {
            self.tags.iter().map(|(n, id)| (n, *id)).collect()
        } else {
            Vec::new()
        };
        all.sort_by_key(|(_, id)| *id);
        let segments: Vec<Value> = all
            .iter()
            .skip(offset)
            .take(count)
            .map(|(name, id)| self.segment_json(name, *id))
            .collect();
        Ok(Response::json(
            200,
            &json!({ "segments": segments, "list_id": self.id, "total_items": all.len() }),
        ))
    }

    /// `POST .../segments` `{name, static_segment: [emails]}`; addresses not on the list are ignored.
    fn create_segment(&mut self, req: &Request) -> Result<Response, Problem> {
        let body = body_object(req)?;
        let name = req_str(&body, "name")
            .map_err(|m| Problem::schema("name", &m))?
            .trim()
            .to_string();
        if name.is_empty() {
            return Err(Problem::schema("name", "This value should not be blank."));
        }
        if body.get("options").is_some_and(|o| !o.is_null()) && body.get("static_segment").is_none()
        {
            return Err(Problem::invalid(
                "The emulator only supports static segments (tags), not saved segments.",
            ));
        }
        let emails = string_list(&body, "static_segment")
            .map_err(|m| Problem::schema("static_segment", &m))?;
        if self.tags.contains_key(&name) {
            return Err(Problem::invalid(&format!(
                "A tag or static segment named \"{name}\" already exists."
            )));
        }
        let id = self.ensure_tag(&name);
        for email in emails {
            if let Some(member) = self
                .members
                .get_mut(&subscriber_hash(&email))
                .filter(|m| m.status != "archived")
            {
                member.tags.insert(name.clone());
            }
        }
        Ok(Response::json(200, &self.segment_json(&name, id)))
    }

    fn get_segment(&self, id: &str) -> Result<Response, Problem> {
        let (name, id) = self.segment_by_id(id)?;
        Ok(Response::json(200, &self.segment_json(&name, id)))
    }

    fn delete_segment(&mut self, id: &str) -> Result<Response, Problem> {
        let (name, _) = self.segment_by_id(id)?;
        self.tags.remove(&name);
        for member in self.members.values_mut() {
            member.tags.remove(&name);
        }
        Ok(Response::no_content())
    }

    /// `POST .../segments/{id}` `{members_to_add, members_to_remove}`. Only actual
    /// changes are listed; addresses that are not (non-archived) members are errors.
    fn update_segment_members(
        &mut self,
        policy: &Policy,
        id: &str,
        req: &Request,
    ) -> Result<Response, Problem> {
        let (name, _) = self.segment_by_id(id)?;
        let body = body_object(req)?;
        let to_add = string_list(&body, "members_to_add")
            .map_err(|m| Problem::schema("members_to_add", &m))?;
        let to_remove = string_list(&body, "members_to_remove")
            .map_err(|m| Problem::schema("members_to_remove", &m))?;
        if to_add.len() > MAX_MEMBERS_PER_CALL || to_remove.len() > MAX_MEMBERS_PER_CALL {
            return Err(Problem::invalid(&format!(
                "You can only add or remove up to {MAX_MEMBERS_PER_CALL} members to a static segment per call."
            )));
        }
        // error message -> addresses, so each message is reported once, as Mailchimp groups them.
        let mut errors: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        const NOT_ON_LIST: &str = "Email addresses were not found on this list.";
        for email in to_add {
            if let Some(message) = policy.rejected.get(&email.trim().to_lowercase()) {
                errors.entry(message.clone()).or_default().push(email);
                continue;
            }
            let key = subscriber_hash(&email);
            match self
                .members
                .get_mut(&key)
                .filter(|m| m.status != "archived")
            {
                None => errors.entry(NOT_ON_LIST.into()).or_default().push(email),
                Some(member) => {
                    if member.tags.insert(name.clone()) {
                        added.push(key);
                    }
                }
            }
        }
        for email in to_remove {
            let key = subscriber_hash(&email);
            match self.members.get_mut(&key) {
                None => errors.entry(NOT_ON_LIST.into()).or_default().push(email),
                Some(member) => {
                    if member.tags.remove(&name) {
                        removed.push(key);
                    }
                }
            }
        }
        let errors: Vec<Value> = errors
            .into_iter()
            .map(|(error, emails)| json!({ "email_addresses": emails, "error": error }))
            .collect();
        let added: Vec<Value> = added.iter().map(|k| self.member_json(k)).collect();
        let removed: Vec<Value> = removed.iter().map(|k| self.member_json(k)).collect();
        Ok(Response::json(
            200,
            &json!({
                "total_added": added.len(),
                "total_removed": removed.len(),
                "error_count": errors.len(),
                "members_added": added,
                "members_removed": removed,
                "errors": errors,
                "_links": [],
            }),
        ))
    }

    // -- inspection -----------------------------------------------------------------------

    fn info_json(&self) -> Value {
        let count = |status: &str| self.members.values().filter(|m| m.status == status).count();
        json!({
            "id": self.id,
            "web_id": 0,
            "name": self.name,
            "double_optin": false,
            "email_type_option": false,
            "marketing_permissions": false,
            "visibility": "prv",
            "stats": {
                "member_count": count("subscribed"),
                "unsubscribe_count": count("unsubscribed"),
                "cleaned_count": count("cleaned"),
                "total_contacts": self.members.values().filter(|m| m.status != "archived").count(),
                "merge_field_count": self.merge_fields.len(),
            },
        })
    }

    fn state_json(&self) -> Value {
        let members: Map<String, Value> = self
            .members
            .values()
            .map(|m| {
                let value = json!({ "email": m.email, "status": m.status, "merge_fields": m.merge_fields, "tags": m.tags });
                (m.email.to_lowercase(), value)
            })
            .collect();
        let segments: Map<String, Value> = self
            .tags
            .iter()
            .map(|(name, id)| {
                (
                    name.clone(),
                    json!({ "id": id, "member_count": self.tag_count(name) }),
                )
            })
            .collect();
        json!({
            "name": self.name,
            "members": members,
            "segments": segments,
            "merge_fields": self.merge_fields.iter().map(|f| json!({ "tag": f.tag, "type": f.field_type, "required": f.required })).collect::<Vec<_>>(),
            "permanently_deleted": self.forgotten.values().collect::<Vec<_>>(),
            "resubscribed": self.resubscribed,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Request pieces

#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    /// Fail with "already a list member" if the address is a (non-archived) member.
    Create,
    /// Create or update.
    Upsert,
}

enum Applied {
    Created,
    Updated,
}

/// One member in a write request (batch item, PUT or POST body).
#[derive(Debug)]
struct MemberChange {
    /// Trimmed, case preserved.
    email: String,
    status: Option<&'static str>,
    status_if_new: Option<&'static str>,
    merge_fields: Option<Map<String, Value>>,
    tags: Option<Vec<String>>,
    replace_tags: bool,
}

impl MemberChange {
    /// Schema checks only; `email_may_be_null` is true for batch items (an absent address
    /// is then reported as an invalid-address error item, not a request error).
    fn parse(value: &Value, email_may_be_null: bool) -> Result<MemberChange, String> {
        let obj = value.as_object().ok_or_else(|| {
            format!(
                "Schema describes object, {} found instead",
                type_name(value)
            )
        })?;
        let email = match opt_str(obj, "email_address")? {
            Some(email) => email.trim().to_string(),
            None if email_may_be_null => String::new(),
            None => return Err("email_address: This value should not be blank.".into()),
        };
        let tags = match obj.get("tags") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|t| {
                        t.as_str()
                            .map(|s| s.trim().to_string())
                            .ok_or("tags: each tag must be a string")
                    })
                    .collect::<Result<Vec<_>, _>>()?,
            ),
            Some(other) => {
                return Err(format!(
                    "tags: Schema describes array, {} found instead",
                    type_name(other)
                ));
            }
        };
        Ok(MemberChange {
            email,
            status: parse_status(obj, "status")?,
            status_if_new: parse_status(obj, "status_if_new")?,
            merge_fields: parse_merge_fields(obj)?,
            tags,
            replace_tags: false,
        })
    }
}

fn parse_status(obj: &Map<String, Value>, key: &str) -> Result<Option<&'static str>, String> {
    match opt_str(obj, key)? {
        None => Ok(None),
        Some(s) => SETTABLE_STATUSES
            .iter()
            .find(|known| **known == s)
            .copied()
            .map(Some)
            .ok_or_else(|| {
                format!("{key}: Invalid value {s:?}; expected one of {SETTABLE_STATUSES:?}")
            }),
    }
}

fn parse_merge_fields(obj: &Map<String, Value>) -> Result<Option<Map<String, Value>>, String> {
    match obj.get("merge_fields") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => Ok(Some(map.clone())),
        Some(other) => Err(format!(
            "merge_fields: Schema describes object, {} found instead",
            type_name(other)
        )),
    }
}

fn status_field(body: &Map<String, Value>, key: &str) -> Result<Option<&'static str>, Problem> {
    parse_status(body, key).map_err(|m| Problem::schema(key, &m))
}

fn merge_fields_field(body: &Map<String, Value>) -> Result<Option<Map<String, Value>>, Problem> {
    parse_merge_fields(body).map_err(|m| Problem::schema("merge_fields", &m))
}

fn string_list(body: &Map<String, Value>, key: &str) -> Result<Vec<String>, String> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(|s| s.trim().to_string())
                    .ok_or_else(|| format!("{key} must hold strings"))
            })
            .collect(),
        Some(other) => Err(format!(
            "Schema describes array, {} found instead",
            type_name(other)
        )),
    }
}

/// Rejection list and syntax; returns the subscriber hash.
fn check_address(policy: &Policy, email: &str) -> Result<String, MemberError> {
    if let Some(message) = policy.rejected.get(&email.trim().to_lowercase()) {
        return Err(MemberError::Rejected(message.clone()));
    }
    if !is_valid_email(email) {
        return Err(MemberError::FakeEmail);
    }
    Ok(subscriber_hash(email))
}

/// Whether an existing member may move from `from` to `to`; `Ok(true)` marks a
/// re-subscription of an unsubscribed contact (allowed, but recorded).
fn check_transition(from: &str, to: &str) -> Result<bool, MemberError> {
    let subscribing = matches!(to, "subscribed" | "pending");
    match from {
        "cleaned" if subscribing => Err(MemberError::Compliance),
        "unsubscribed" if subscribing => Ok(true),
        _ => Ok(false),
    }
}

/// Checks a merge value against its field type; numbers and booleans sent to text
/// fields are stored as text, as Mailchimp returns them.
fn merge_value(field: &MergeField, value: &Value) -> Result<Value, String> {
    match (field.field_type.as_str(), value) {
        (_, Value::Null) => Ok(json!("")),
        ("number", Value::Number(_)) => Ok(value.clone()),
        ("number", Value::String(s)) if s.trim().is_empty() => Ok(json!("")),
        ("number", Value::String(s)) => {
            let s = s.trim();
            s.parse::<i64>()
                .map(Value::from)
                .or_else(|_| {
                    s.parse::<f64>()
                        .ok()
                        .and_then(|f| serde_json::Number::from_f64(f).map(Value::Number))
                        .ok_or(())
                })
                .map_err(|_| "Please enter a number".to_string())
        }
        ("number", _) => Err("Please enter a number".into()),
        ("address", Value::Object(_) | Value::String(_)) => Ok(value.clone()),
        (_, Value::String(_)) => Ok(value.clone()),
        (_, Value::Number(n)) => Ok(Value::String(n.to_string())),
        (_, Value::Bool(b)) => Ok(Value::String(b.to_string())),
        (_, other) => Err(format!(
            "Please enter a text value, not {}",
            type_name(other)
        )),
    }
}

/// Plausible address syntax: one `@`, a dot-atom local part, a domain of valid
/// labels with an alphabetic TLD. (Mailchimp also rejects "fake-looking" addresses;
/// the emulator does not guess.)
pub fn is_valid_email(email: &str) -> bool {
    let Some((local, domain)) = email.split_once('@') else {
        return false;
    };
    const LOCAL_SPECIALS: &str = "!#$%&'*+/=?^_`{|}~.-";
    let local_ok = !local.is_empty()
        && local.len() <= 64
        && !local.starts_with('.')
        && !local.ends_with('.')
        && !local.contains("..")
        && local
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || LOCAL_SPECIALS.contains(c));
    let labels: Vec<&str> = domain.split('.').collect();
    let domain_ok = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.len() >= 2 && tld.chars().all(|c| c.is_ascii_alphabetic()));
    email.len() <= 254 && local_ok && domain_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscriber_hash_is_md5_of_lowercase() {
        // md5("urist.mcvankab@freddiesjokes.com"), the example in Mailchimp's docs.
        assert_eq!(
            subscriber_hash("Urist.McVankab@freddiesjokes.com"),
            "62eeb292278cc15f5817cb78f7790b08"
        );
    }

    #[test]
    fn email_syntax() {
        assert!(is_valid_email("ann@example.com"));
        assert!(is_valid_email("a.b+tag@sub.example.co"));
        for bad in [
            "",
            "ann",
            "ann@",
            "@x.com",
            "ann@x",
            "a b@x.com",
            "ann@@x.com",
            "ann@x..com",
            "ann@-x.com",
            "ann@x.c0m",
        ] {
            assert!(!is_valid_email(bad), "{bad:?} should be invalid");
        }
    }

    #[test]
    fn transitions_respect_compliance_states() {
        assert!(matches!(
            check_transition("cleaned", "subscribed"),
            Err(MemberError::Compliance)
        ));
        assert!(matches!(
            check_transition("unsubscribed", "subscribed"),
            Ok(true)
        ));
        assert!(matches!(
            check_transition("subscribed", "unsubscribed"),
            Ok(false)
        ));
    }
}
