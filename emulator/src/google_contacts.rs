//! Google People API v1 (Google Contacts), the subset pg_listsync uses, served under
//! `/google_contacts/v1/...`, plus Google's OAuth2 token endpoint at `/google_contacts/token`.
//!
//! Paths, field names and error documents follow the official API (the OpenAPI rendering in
//! `tests/contract/specs/google-people.prism.yaml` and the reference pages); behaviour follows
//! the live service where list sync depends on it:
//!
//! - **OAuth2**: `POST /token` (`application/x-www-form-urlencoded`, `grant_type=refresh_token`,
//!   `client_id`, `client_secret`, `refresh_token`) issues bearer tokens that expire
//!   ([`GoogleContacts::set_token_lifetime`], [`GoogleContacts::expire_access_tokens`]); errors
//!   are OAuth's `{"error", "error_description"}` (`invalid_grant` 400, `invalid_client` 401).
//!   Every `/v1` call needs a live token, else 401 `UNAUTHENTICATED`.
//! - **Errors** are Google's `{"error": {"code", "message", "status", "details"?}}`.
//! - **Contact groups**: `GET /v1/contactGroups` (system groups `myContacts` and `starred`
//!   first), `POST /v1/contactGroups` (409 `ALREADY_EXISTS` on a duplicate name),
//!   `POST /v1/contactGroups/{id}/members:modify` (≤ 1000 names in total; unknown people in
//!   `notFoundResourceNames`; a contact never loses its last group:
//!   `canNotRemoveLastContactGroupResourceNames`). Contacts always join `myContacts`.
//! - **Contacts** (`people/c…`, each with an etag that changes on every write, memberships
//!   included): `people:batchCreateContacts` (≤ 200, atomic: one invalid contact fails the
//!   request with 400 and `BadRequest.fieldViolations`), `people:createContact`,
//!   `people:batchUpdateContacts` (≤ 200) and `PATCH people/{id}:updateContact`, which replace
//!   the fields named in the update mask and require `metadata.sources[CONTACT].etag` or
//!   `etag`: a stale one is 400 `FAILED_PRECONDITION`, as Google answers; the batch form is
//!   atomic. `GET people:batchGet` (≤ 200, per-item `status` 5 for unknown names),
//!   `GET people/{id}`, `DELETE people/{id}:deleteContact`, `POST people:batchDeleteContacts`
//!   (≤ 500; strict here: an unknown name fails the whole call with 404 and deletes nothing).
//!   Singleton fields (names, birthdays, biographies, genders) take one entry.
//! - **Listing**: `GET /v1/people/me/connections` with `pageSize` ≤ 1000, `requestSyncToken`
//!   and `syncToken` (only changes since, deleted contacts with `metadata.deleted`);
//!   [`GoogleContacts::expire_sync_tokens`] makes old tokens fail with 400
//!   `FAILED_PRECONDITION` / `EXPIRED_SYNC_TOKEN`, as they do after 7 days.
//! - **The 25,000-contact cap** of a Google account ([`GoogleContacts::set_contact_limit`]):
//!   creating beyond it fails with 400 `FAILED_PRECONDITION`. Google does not document the
//!   exact answer; this one is the emulator's choice.
//!
//! [`crate::Emulator::list_members`] keys a group's contacts as pg_listsync keys members: by
//! each email (lower-cased), and a contact without an email by each of its numbers as a phone
//! identity (`tel:` and the number without spaces, dashes, dots or parentheses, `00` read as
//! `+`, 7 to 15 digits, as `listsync.phone_identity` computes it).
//!
//! Read answers carry what Google adds (entry `metadata` with the source, `formattedType`,
//! `displayName`, person `metadata.sources`), so a client that writes back what it read must
//! drop output-only data as the real service expects. Not modelled: `searchContacts`, other
//! contacts, photos, directory people, per-minute quotas other than injected 429s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::http::{Request, Response, percent_decode};
use crate::provider::{Provider, admin_error, lock, opt_str, req_str, unix_now};

/// Contacts a Google account may hold.
pub const CONTACT_LIMIT: usize = 25_000;
const MAX_BATCH_CREATE: usize = 200;
const MAX_BATCH_UPDATE: usize = 200;
const MAX_BATCH_GET: usize = 200;
const MAX_BATCH_DELETE: usize = 500;
const MAX_MODIFY: usize = 1000;
const MAX_PAGE: usize = 1000;
const DEFAULT_TOKEN_LIFETIME: i64 = 3599;
const SCOPE: &str = "https://www.googleapis.com/auth/contacts";
const MY_CONTACTS: &str = "contactGroups/myContacts";
/// System groups that can receive members (others only lose them).
const SYSTEM_GROUPS: [(&str, &str); 2] = [
    (MY_CONTACTS, "My Contacts"),
    ("contactGroups/starred", "Starred"),
];

/// Person fields a client may write (`updatePersonFields` values).
const WRITABLE_FIELDS: [&str; 24] = [
    "addresses",
    "biographies",
    "birthdays",
    "calendarUrls",
    "clientData",
    "emailAddresses",
    "events",
    "externalIds",
    "genders",
    "imClients",
    "interests",
    "locales",
    "locations",
    "memberships",
    "miscKeywords",
    "names",
    "nicknames",
    "occupations",
    "organizations",
    "phoneNumbers",
    "relations",
    "sipAddresses",
    "urls",
    "userDefined",
];
/// Readable besides the writable ones (`personFields` / `readMask` values).
const READ_ONLY_FIELDS: [&str; 5] = ["ageRanges", "coverPhotos", "metadata", "photos", "skills"];
/// Output-only person keys a request body may carry; they are ignored.
const IGNORED_PERSON_KEYS: [&str; 9] = [
    "resourceName",
    "etag",
    "metadata",
    "photos",
    "coverPhotos",
    "ageRanges",
    "ageRange",
    "skills",
    "taglines",
];
/// A contact holds at most one of these.
const SINGLETONS: [&str; 4] = ["names", "birthdays", "biographies", "genders"];
/// Output-only keys of field entries, which Google computes.
const OUTPUT_ONLY_ENTRY_KEYS: [&str; 4] = [
    "metadata",
    "formattedType",
    "canonicalForm",
    "formattedProtocol",
];

/// A contact group as tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct ContactGroup {
    /// `contactGroups/<id>`.
    pub resource_name: String,
    pub name: String,
    /// `myContacts` and `starred`.
    pub system: bool,
    pub member_count: usize,
}

/// The Google Contacts fake. Obtain it with [`crate::Emulator::google_contacts`].
pub struct GoogleContacts {
    state: Mutex<State>,
}

struct Credentials {
    client_id: String,
    client_secret: String,
    refresh_token: String,
}

struct State {
    /// `None`: any client and refresh token obtain access tokens.
    credentials: Option<Credentials>,
    token_lifetime: i64,
    /// Access token -> expiry (Unix seconds).
    tokens: BTreeMap<String, i64>,
    token_requests: usize,
    contact_limit: usize,
    /// Ids of people, groups and tokens.
    counter: u64,
    /// Change sequence: etags and sync tokens.
    seq: u64,
    /// Bumped to expire every sync token issued before.
    sync_epoch: u64,
    people: BTreeMap<String, Contact>,
    /// Deleted contacts -> the change sequence of the deletion (for incremental sync).
    deleted: BTreeMap<String, u64>,
    groups: BTreeMap<String, Group>,
    /// Lower-cased address -> why a contact holding it is refused.
    rejected: BTreeMap<String, String>,
    /// Contacts whose etag changes right after their next read (a concurrent edit).
    touch_after_read: BTreeSet<String>,
    /// Contacts made by `seed_contacts` so far.
    seeded: usize,
}

impl Default for State {
    fn default() -> Self {
        let mut groups = BTreeMap::new();
        for (resource_name, name) in SYSTEM_GROUPS {
            groups.insert(
                resource_name.to_string(),
                Group {
                    name: name.to_string(),
                    system: true,
                    etag: "%EgUBAgMEBQ==".into(),
                    updated: unix_now(),
                },
            );
        }
        State {
            credentials: None,
            token_lifetime: DEFAULT_TOKEN_LIFETIME,
            tokens: BTreeMap::new(),
            token_requests: 0,
            contact_limit: CONTACT_LIMIT,
            counter: 0,
            seq: 0,
            sync_epoch: 1,
            people: BTreeMap::new(),
            deleted: BTreeMap::new(),
            groups,
            rejected: BTreeMap::new(),
            touch_after_read: BTreeSet::new(),
            seeded: 0,
        }
    }
}

struct Contact {
    /// Writable person fields except memberships, each an array of entries as stored.
    fields: Map<String, Value>,
    groups: BTreeSet<String>,
    etag: String,
    source_id: String,
    changed: u64,
    updated: i64,
}

struct Group {
    name: String,
    system: bool,
    etag: String,
    updated: i64,
}

// ---------------------------------------------------------------------------------------------
// Public API for tests

impl GoogleContacts {
    pub(crate) fn new() -> GoogleContacts {
        GoogleContacts {
            state: Mutex::new(State::default()),
        }
    }

    /// Only this OAuth client and refresh token obtain access tokens (others: `invalid_client`
    /// 401, `invalid_grant` 400).
    pub fn set_credentials(&self, client_id: &str, client_secret: &str, refresh_token: &str) {
        lock(&self.state).credentials = Some(Credentials {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            refresh_token: refresh_token.into(),
        });
    }

    /// Any client and refresh token obtain access tokens (the default).
    pub fn accept_any_credentials(&self) {
        lock(&self.state).credentials = None;
    }

    /// The `expires_in` of tokens issued from now on (default 3599 s, as Google's).
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        lock(&self.state).token_lifetime = lifetime.as_secs() as i64;
    }

    /// Every access token issued so far stops working (API calls get 401).
    pub fn expire_access_tokens(&self) {
        lock(&self.state).tokens.clear();
    }

    /// Token requests received (successful or not).
    pub fn token_requests(&self) -> usize {
        lock(&self.state).token_requests
    }

    /// Every sync token issued so far is expired (400 `EXPIRED_SYNC_TOKEN`).
    pub fn expire_sync_tokens(&self) {
        lock(&self.state).sync_epoch += 1;
    }

    /// How many contacts the account may hold (default [`CONTACT_LIMIT`]).
    pub fn set_contact_limit(&self, limit: usize) {
        lock(&self.state).contact_limit = limit;
    }

    /// Creating or updating a contact holding this address fails with `message` (400).
    pub fn reject_address(&self, email: &str, message: &str) {
        lock(&self.state)
            .rejected
            .insert(email.trim().to_lowercase(), message.to_string());
    }

    pub fn clear_rejections(&self) {
        lock(&self.state).rejected.clear();
    }

    /// Creates `count` contacts named `Seed <n>` with addresses `seed<n>@example.invalid`
    /// (`n` counting from 1 across calls), as a user's existing address book. Returns how many
    /// contacts exist afterwards.
    pub fn seed_contacts(&self, count: usize) -> usize {
        let mut st = lock(&self.state);
        for _ in 0..count {
            st.seeded += 1;
            let n = st.seeded;
            let mut fields = Map::new();
            fields.insert(
                "names".into(),
                json!([{ "givenName": "Seed", "familyName": n.to_string() }]),
            );
            fields.insert(
                "emailAddresses".into(),
                json!([{ "value": format!("seed{n}@example.invalid") }]),
            );
            st.insert_contact(fields, BTreeSet::new());
        }
        st.people.len()
    }

    /// Creates a contact as the user would in Google Contacts (`person` holds writable person
    /// fields, e.g. `{"emailAddresses": [{"value": "ann@example.com"}]}`), in `myContacts`
    /// and the given groups. Returns its resource name.
    pub fn insert_contact(&self, person: Value, groups: &[&str]) -> String {
        let mut st = lock(&self.state);
        let fields = person
            .as_object()
            .map(|o| {
                o.iter()
                    .filter(|(k, v)| WRITABLE_FIELDS.contains(&k.as_str()) && v.is_array())
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        st.insert_contact(fields, groups.iter().map(|g| group_name(g)).collect())
    }

    /// Replaces one person field as the user would (`value` is the field's array; `null`
    /// clears it): the etag changes. False if there is no such contact.
    pub fn edit_contact(&self, resource_name: &str, field: &str, value: Value) -> bool {
        let mut st = lock(&self.state);
        let Some(contact) = st.people.get_mut(resource_name) else {
            return false;
        };
        match value {
            Value::Array(_) => contact.fields.insert(field.to_string(), value),
            _ => contact.fields.remove(field),
        };
        st.touch(resource_name);
        true
    }

    /// The next read of this contact returns it, then its etag changes as if the user edited
    /// it at that moment: the client's following update carries a stale etag.
    pub fn touch_after_next_read(&self, resource_name: &str) {
        lock(&self.state)
            .touch_after_read
            .insert(resource_name.to_string());
    }

    /// A contact with every field, its memberships and metadata, as `people.get` renders it.
    pub fn person(&self, resource_name: &str) -> Option<Value> {
        let st = lock(&self.state);
        let contact = st.people.get(resource_name)?;
        Some(person_json(resource_name, contact, &all_fields()))
    }

    /// The contacts holding this address (any case), as [`GoogleContacts::person`] renders them.
    pub fn people_with_email(&self, email: &str) -> Vec<Value> {
        let st = lock(&self.state);
        let wanted = email.trim().to_lowercase();
        st.people
            .iter()
            .filter(|(_, c)| c.emails().contains(&wanted))
            .map(|(rn, c)| person_json(rn, c, &all_fields()))
            .collect()
    }

    /// The contacts holding this phone number however written (with or without an email), as
    /// [`GoogleContacts::person`] renders them.
    pub fn people_with_phone(&self, phone: &str) -> Vec<Value> {
        let st = lock(&self.state);
        let Some(wanted) = phone_identity(phone) else {
            return Vec::new();
        };
        st.people
            .iter()
            .filter(|(_, c)| c.phone_identities().contains(&wanted))
            .map(|(rn, c)| person_json(rn, c, &all_fields()))
            .collect()
    }

    pub fn contact_count(&self) -> usize {
        lock(&self.state).people.len()
    }

    /// All contact groups, system ones first.
    pub fn groups(&self) -> Vec<ContactGroup> {
        let st = lock(&self.state);
        st.ordered_groups()
            .into_iter()
            .map(|(rn, g)| ContactGroup {
                resource_name: rn.clone(),
                name: g.name.clone(),
                system: g.system,
                member_count: st.member_count(rn),
            })
            .collect()
    }

    /// The resource name of the user group with this name.
    pub fn group_named(&self, name: &str) -> Option<String> {
        let st = lock(&self.state);
        st.groups
            .iter()
            .find(|(_, g)| !g.system && g.name == name)
            .map(|(rn, _)| rn.clone())
    }

    /// Resource names of the contacts in a group (`contactGroups/<id>` or just the id).
    pub fn group_members(&self, group: &str) -> BTreeSet<String> {
        let st = lock(&self.state);
        let group = group_name(group);
        st.people
            .iter()
            .filter(|(_, c)| c.groups.contains(&group))
            .map(|(rn, _)| rn.clone())
            .collect()
    }

    /// Deletes a user group as the user would; its contacts stay. False if there is none.
    pub fn delete_group(&self, group: &str) -> bool {
        let mut st = lock(&self.state);
        let group = group_name(group);
        if st.groups.get(&group).is_none_or(|g| g.system) {
            return false;
        }
        st.groups.remove(&group);
        let members: Vec<String> = st
            .people
            .iter()
            .filter(|(_, c)| c.groups.contains(&group))
            .map(|(rn, _)| rn.clone())
            .collect();
        for rn in members {
            if let Some(contact) = st.people.get_mut(&rn) {
                contact.groups.remove(&group);
            }
            st.touch(&rn);
        }
        true
    }
}

fn group_name(group: &str) -> String {
    if group.starts_with("contactGroups/") {
        group.to_string()
    } else {
        format!("contactGroups/{group}")
    }
}

fn all_fields() -> BTreeSet<String> {
    WRITABLE_FIELDS
        .iter()
        .chain(READ_ONLY_FIELDS.iter())
        .map(|f| f.to_string())
        .collect()
}

impl State {
    fn next(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn insert_contact(
        &mut self,
        fields: Map<String, Value>,
        extra_groups: BTreeSet<String>,
    ) -> String {
        let n = self.next();
        let resource_name = format!("people/c{}", 4_000_000_000_000_000_000u64 + n * 7919);
        let mut groups = extra_groups;
        groups.insert(MY_CONTACTS.into());
        self.people.insert(
            resource_name.clone(),
            Contact {
                fields,
                groups,
                etag: String::new(),
                source_id: format!("{:x}", 0x1a2b_0000_0000u64 + n),
                changed: 0,
                updated: 0,
            },
        );
        self.deleted.remove(&resource_name);
        self.touch(&resource_name);
        resource_name
    }

    /// Records a change of a contact: new etag, new change sequence.
    fn touch(&mut self, resource_name: &str) {
        self.seq += 1;
        let seq = self.seq;
        if let Some(contact) = self.people.get_mut(resource_name) {
            contact.changed = seq;
            contact.updated = unix_now();
            contact.etag = format!("%EgcBAgkLLjc9GgQBAgUHIgw{seq:08x}");
        }
    }

    fn delete_contact(&mut self, resource_name: &str) {
        self.people.remove(resource_name);
        self.seq += 1;
        self.deleted.insert(resource_name.to_string(), self.seq);
        self.touch_after_read.remove(resource_name);
    }

    fn member_count(&self, group: &str) -> usize {
        self.people
            .values()
            .filter(|c| c.groups.contains(group))
            .count()
    }

    fn ordered_groups(&self) -> Vec<(&String, &Group)> {
        let mut groups: Vec<(&String, &Group)> = self.groups.iter().collect();
        groups.sort_by_key(|(rn, g)| (!g.system, rn.as_str()));
        groups
    }

    /// Applies a pending "concurrent edit" after a read.
    fn after_read(&mut self, resource_name: &str) {
        if self.touch_after_read.remove(resource_name) {
            self.touch(resource_name);
        }
    }

    fn sync_token(&self) -> String {
        format!("EhQKEg{}~{}", self.sync_epoch, self.seq)
    }

    fn rejection(&self, fields: &Map<String, Value>) -> Option<String> {
        fields
            .get("emailAddresses")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| e["value"].as_str())
            .find_map(|email| self.rejected.get(&email.trim().to_lowercase()).cloned())
    }
}

/// `listsync.phone_identity`: `tel:` and the number without spaces, dashes, dots or
/// parentheses, `00` read as `+`; `None` unless 7 to 15 digits remain.
fn phone_identity(raw: &str) -> Option<String> {
    let compact: String = raw
        .chars()
        .filter(|c| !matches!(c, ' ' | '-' | '.' | '(' | ')' | '\u{a0}'))
        .collect();
    let (international, digits) = match (compact.strip_prefix('+'), compact.strip_prefix("00")) {
        (Some(rest), _) | (None, Some(rest)) => (true, rest),
        (None, None) => (false, compact.as_str()),
    };
    let valid = (7..=15).contains(&digits.len()) && digits.chars().all(|c| c.is_ascii_digit());
    valid.then(|| format!("tel:{}{digits}", if international { "+" } else { "" }))
}

impl Contact {
    fn values(&self, field: &str) -> impl Iterator<Item = &str> {
        self.fields
            .get(field)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|e| e["value"].as_str())
    }

    fn emails(&self) -> Vec<String> {
        self.values("emailAddresses")
            .map(|e| e.trim().to_lowercase())
            .collect()
    }

    fn phone_identities(&self) -> Vec<String> {
        self.values("phoneNumbers")
            .filter_map(phone_identity)
            .collect()
    }

    /// What pg_listsync knows the contact by: its emails, or without one its numbers.
    fn identities(&self) -> Vec<String> {
        let emails = self.emails();
        if emails.is_empty() {
            self.phone_identities()
        } else {
            emails
        }
    }

    fn first<'a>(&'a self, field: &str) -> Option<&'a Value> {
        self.fields.get(field)?.as_array()?.first()
    }

    /// The uniform view for convergence tests: pg_listsync's provider field names.
    fn listsync_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        let mut put = |key: &str, value: Option<&Value>| {
            if let Some(text) = value.and_then(Value::as_str).filter(|t| !t.is_empty()) {
                out.insert(key.to_string(), json!(text));
            }
        };
        if let Some(name) = self.first("names") {
            put("given_name", name.get("givenName"));
            put("middle_name", name.get("middleName"));
            put("family_name", name.get("familyName"));
        }
        put(
            "phone",
            self.first("phoneNumbers").and_then(|p| p.get("value")),
        );
        if let Some(org) = self.first("organizations") {
            put("organization", org.get("name"));
            put("department", org.get("department"));
            put("job_title", org.get("title"));
        }
        if let Some(date) = self.first("birthdays").map(|b| &b["date"]) {
            let (month, day) = (date["month"].as_u64(), date["day"].as_u64());
            if let (Some(month), Some(day)) = (month, day) {
                let text = match date["year"].as_u64().filter(|y| *y > 0) {
                    Some(year) => format!("{year:04}-{month:02}-{day:02}"),
                    None => format!("--{month:02}-{day:02}"),
                };
                out.insert("birthday".into(), json!(text));
            }
        }
        if let Some(address) = self.first("addresses") {
            let value = address
                .get("formattedValue")
                .or(address.get("streetAddress"));
            if let Some(text) = value.and_then(Value::as_str).filter(|t| !t.is_empty()) {
                out.insert("address".into(), json!(text));
            }
        }
        let first_value = |field: &str| self.first(field).and_then(|e| e.get("value")).cloned();
        for (key, field) in [("url", "urls"), ("biography", "biographies")] {
            if let Some(text) = first_value(field)
                .as_ref()
                .and_then(Value::as_str)
                .filter(|t| !t.is_empty())
            {
                out.insert(key.into(), json!(text));
            }
        }
        for entry in self
            .fields
            .get("userDefined")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let (Some(key), Some(value)) = (entry["key"].as_str(), entry["value"].as_str()) {
                out.insert(format!("user:{key}"), json!(value));
            }
        }
        out
    }
}

// ---------------------------------------------------------------------------------------------
// Provider plumbing

impl Provider for GoogleContacts {
    fn name(&self) -> &'static str {
        "google_contacts"
    }

    fn handle(&self, req: &Request) -> Response {
        let mut st = lock(&self.state);
        let segments = req.segments();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match segments.as_slice() {
            ["token"] if req.method == "POST" => token(&mut st, req),
            ["v1", rest @ ..] => authorize(&st, req)
                .and_then(|()| route(&mut st, req, rest))
                .unwrap_or_else(|e| e.response()),
            _ => ApiError::new(
                404,
                "NOT_FOUND",
                &format!("Method not found: {} {}", req.method, req.path),
            )
            .response(),
        }
    }

    fn state_json(&self) -> Value {
        let st = lock(&self.state);
        let people: Map<String, Value> = st
            .people
            .iter()
            .map(|(rn, c)| (rn.clone(), person_json(rn, c, &all_fields())))
            .collect();
        let groups: Vec<Value> = st
            .ordered_groups()
            .into_iter()
            .map(|(rn, g)| group_json(rn, g, st.member_count(rn)))
            .collect();
        json!({
            "credentials_required": st.credentials.is_some(),
            "token_lifetime": st.token_lifetime,
            "live_tokens": st.tokens.len(),
            "token_requests": st.token_requests,
            "contact_limit": st.contact_limit,
            "rejected": st.rejected,
            "groups": groups,
            "people": people,
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
        // The extension keeps a binding's contact group resource name as its list id.
        let st = lock(&self.state);
        let group = group_name(list_id);
        let mut members = BTreeMap::new();
        for contact in st.people.values().filter(|c| c.groups.contains(&group)) {
            let fields = contact.listsync_fields();
            for identity in contact.identities() {
                members.insert(identity, fields.clone());
            }
        }
        members
    }

    fn error_response(&self, status: u16, detail: &str) -> Response {
        let (code, message) = match status {
            400 => ("INVALID_ARGUMENT", "Request contains an invalid argument."),
            401 => ("UNAUTHENTICATED", UNAUTHENTICATED_MESSAGE),
            403 => ("PERMISSION_DENIED", "The caller does not have permission"),
            404 => ("NOT_FOUND", "Requested entity was not found."),
            409 => ("ABORTED", "The operation was aborted."),
            429 => (
                "RESOURCE_EXHAUSTED",
                "Quota exceeded for quota metric 'Critical write requests' and limit 'Critical write requests per minute per user' of service 'people.googleapis.com'.",
            ),
            500 => ("INTERNAL", "Internal error encountered."),
            503 => ("UNAVAILABLE", "The service is currently unavailable."),
            504 => ("DEADLINE_EXCEEDED", "The request timed out."),
            _ => ("UNKNOWN", detail),
        };
        let mut error = ApiError::new(status, code, message);
        if status == 429 {
            error.details.push(json!({
                "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                "reason": "RATE_LIMIT_EXCEEDED",
                "domain": "googleapis.com",
                "metadata": { "service": "people.googleapis.com" },
            }));
        }
        error.response()
    }
}

impl GoogleContacts {
    /// `POST /_admin/google_contacts/<action>`; see the module documentation.
    fn admin_action(&self, action: &str, body: &Map<String, Value>) -> Result<(), String> {
        match action {
            "credentials" => match (
                opt_str(body, "client_id")?,
                opt_str(body, "client_secret")?,
                opt_str(body, "refresh_token")?,
            ) {
                (Some(id), Some(secret), Some(token)) => self.set_credentials(id, secret, token),
                (None, None, None) => self.accept_any_credentials(),
                _ => {
                    return Err(
                        "give client_id, client_secret and refresh_token, or none of them".into(),
                    );
                }
            },
            "token_lifetime" => {
                let seconds = body
                    .get("seconds")
                    .and_then(Value::as_u64)
                    .ok_or("seconds must be a non-negative integer")?;
                self.set_token_lifetime(Duration::from_secs(seconds));
            }
            "expire_tokens" => self.expire_access_tokens(),
            "expire_sync_tokens" => self.expire_sync_tokens(),
            "contact_limit" => {
                let limit = body
                    .get("limit")
                    .and_then(Value::as_u64)
                    .ok_or("limit must be a non-negative integer")?;
                self.set_contact_limit(limit as usize);
            }
            "reject" => self.reject_address(
                req_str(body, "email")?,
                opt_str(body, "message")?.unwrap_or("rejected"),
            ),
            "seed" => {
                let count = body
                    .get("count")
                    .and_then(Value::as_u64)
                    .ok_or("count must be a non-negative integer")?;
                self.seed_contacts(count as usize);
            }
            "contact" => {
                let person = body.get("person").cloned().ok_or("person is required")?;
                let groups: Vec<&str> = body
                    .get("groups")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                self.insert_contact(person, &groups);
            }
            _ => return Err(format!("unknown google_contacts admin action {action:?}")),
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Errors

const UNAUTHENTICATED_MESSAGE: &str = "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie or other valid authentication credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.";
const STALE_ETAG_MESSAGE: &str = "Request person.etag is different than the current person.etag. Clear local cache and get the latest person.";

/// Google's error document: `{"error": {"code", "message", "status", "details"}}`.
#[derive(Debug)]
struct ApiError {
    code: u16,
    status: &'static str,
    message: String,
    details: Vec<Value>,
}

impl ApiError {
    fn new(code: u16, status: &'static str, message: &str) -> ApiError {
        ApiError {
            code,
            status,
            message: message.to_string(),
            details: Vec::new(),
        }
    }

    fn invalid(message: &str) -> ApiError {
        ApiError::new(400, "INVALID_ARGUMENT", message)
    }

    fn precondition(message: &str) -> ApiError {
        ApiError::new(400, "FAILED_PRECONDITION", message)
    }

    fn not_found() -> ApiError {
        ApiError::new(404, "NOT_FOUND", "Requested entity was not found.")
    }

    fn with_reason(mut self, reason: &str) -> ApiError {
        self.details.push(json!({
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": "people.googleapis.com",
        }));
        self
    }

    fn response(&self) -> Response {
        let mut error =
            json!({ "code": self.code, "message": self.message, "status": self.status });
        if !self.details.is_empty() {
            error["details"] = Value::Array(self.details.clone());
        }
        let response = Response::json(self.code, &json!({ "error": error }));
        if self.code == 401 {
            response.with_header(
                "WWW-Authenticate",
                "Bearer realm=\"https://accounts.google.com/\", error=\"invalid_token\"",
            )
        } else {
            response
        }
    }
}

// ---------------------------------------------------------------------------------------------
// OAuth2

/// `POST /token`: the refresh-token grant.
fn token(st: &mut State, req: &Request) -> Response {
    st.token_requests += 1;
    let oauth = |status: u16, error: &str, description: &str| {
        Response::json(
            status,
            &json!({ "error": error, "error_description": description }),
        )
    };
    let form = form_pairs(&req.body_text());
    let param = |name: &str| {
        form.iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    };
    match param("grant_type") {
        Some("refresh_token") => {}
        Some(other) => {
            return oauth(
                400,
                "unsupported_grant_type",
                &format!("Invalid grant_type: {other}"),
            );
        }
        None => {
            return oauth(
                400,
                "invalid_request",
                "Missing required parameter: grant_type",
            );
        }
    }
    let Some(client_id) = param("client_id") else {
        return oauth(
            400,
            "invalid_request",
            "Could not determine client ID from request.",
        );
    };
    let Some(refresh_token) = param("refresh_token") else {
        return oauth(
            400,
            "invalid_request",
            "Missing required parameter: refresh_token",
        );
    };
    if let Some(expected) = &st.credentials {
        if client_id != expected.client_id {
            return oauth(401, "invalid_client", "The OAuth client was not found.");
        }
        if param("client_secret") != Some(expected.client_secret.as_str()) {
            return oauth(401, "invalid_client", "Unauthorized");
        }
        if refresh_token != expected.refresh_token {
            return oauth(400, "invalid_grant", "Token has been expired or revoked.");
        }
    }
    let n = st.next();
    let access_token = format!("ya29.emulated-{n:06}");
    st.tokens
        .insert(access_token.clone(), unix_now() + st.token_lifetime);
    Response::json(
        200,
        &json!({
            "access_token": access_token,
            "expires_in": st.token_lifetime,
            "scope": SCOPE,
            "token_type": "Bearer",
        }),
    )
}

fn authorize(st: &State, req: &Request) -> Result<(), ApiError> {
    let token = req
        .header("authorization")
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match token.and_then(|t| st.tokens.get(t)) {
        Some(expiry) if *expiry > unix_now() => Ok(()),
        _ => Err(ApiError::new(
            401,
            "UNAUTHENTICATED",
            UNAUTHENTICATED_MESSAGE,
        )),
    }
}

/// `a=1&b=x%20y` (also `+` for spaces) as decoded pairs, in order.
fn form_pairs(text: &str) -> Vec<(String, String)> {
    text.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k, true), percent_decode(v, true))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Routing

fn route(st: &mut State, req: &Request, rest: &[&str]) -> Result<Response, ApiError> {
    let query = form_pairs(&req.query);
    let param = |name: &str| {
        query
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    match (req.method.as_str(), rest) {
        ("GET", ["contactGroups"]) => list_groups(st, &param),
        ("POST", ["contactGroups"]) => create_group(st, req),
        ("POST", ["contactGroups", id, "members:modify"]) => {
            modify_members(st, &group_name(id), req)
        }
        ("GET", ["people", "me", "connections"]) => connections(st, &param),
        ("GET", ["people:batchGet"]) => {
            let names: Vec<String> = query
                .iter()
                .filter(|(k, _)| k == "resourceNames")
                .map(|(_, v)| v.clone())
                .collect();
            batch_get(st, &names, param("personFields"))
        }
        ("POST", ["people:batchCreateContacts"]) => batch_create(st, req),
        ("POST", ["people:createContact"]) => create_contact(st, req, param("personFields")),
        ("POST", ["people:batchUpdateContacts"]) => batch_update(st, req),
        ("POST", ["people:batchDeleteContacts"]) => batch_delete(st, req),
        ("GET", ["people", id]) if !id.contains(':') => {
            let rn = format!("people/{id}");
            let mask = read_mask(param("personFields"), "personFields")?;
            let contact = st.people.get(&rn).ok_or_else(ApiError::not_found)?;
            let person = person_json(&rn, contact, &mask);
            st.after_read(&rn);
            Ok(Response::json(200, &person))
        }
        ("PATCH", ["people", action]) if action.ends_with(":updateContact") => {
            let rn = format!("people/{}", action.trim_end_matches(":updateContact"));
            update_contact(
                st,
                &rn,
                req,
                param("updatePersonFields"),
                param("personFields"),
            )
        }
        ("DELETE", ["people", action]) if action.ends_with(":deleteContact") => {
            let rn = format!("people/{}", action.trim_end_matches(":deleteContact"));
            if !st.people.contains_key(&rn) {
                return Err(ApiError::not_found());
            }
            st.delete_contact(&rn);
            Ok(Response::json(200, &json!({})))
        }
        _ => Err(ApiError::new(
            404,
            "NOT_FOUND",
            &format!("Method not found: {} {}", req.method, req.path),
        )),
    }
}

fn body_object(req: &Request) -> Result<Map<String, Value>, ApiError> {
    match req.json() {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid(
            "Invalid JSON payload received. Expected an object.",
        )),
        Err(e) => Err(ApiError::invalid(&format!(
            "Invalid JSON payload received. {e}"
        ))),
    }
}

/// A page size within `1..=max` (`default` when absent or 0) and the offset from a page token.
fn paging(
    param: &dyn Fn(&str) -> Option<String>,
    default: usize,
    max: usize,
) -> Result<(usize, usize), ApiError> {
    let size = match param("pageSize") {
        None => default,
        Some(text) => match text.parse::<usize>() {
            Ok(0) => default,
            Ok(n) if n <= max => n,
            _ => {
                return Err(ApiError::invalid(&format!(
                    "pageSize must be between 1 and {max}"
                )));
            }
        },
    };
    let offset = match param("pageToken").filter(|t| !t.is_empty()) {
        None => 0,
        Some(token) => token
            .strip_prefix("page~")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ApiError::invalid("Page token is not valid."))?,
    };
    Ok((size, offset))
}

fn read_mask(mask: Option<String>, what: &str) -> Result<BTreeSet<String>, ApiError> {
    let mask = mask.unwrap_or_default();
    let paths: BTreeSet<String> = mask
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| p.trim_start_matches("person.").to_string())
        .collect();
    if paths.is_empty() {
        return Err(ApiError::invalid(&format!(
            "{what} mask is required. Please specify one or more valid paths. Valid paths are documented at https://developers.google.com/people/api/rest/v1/people/get."
        )));
    }
    for path in &paths {
        if !WRITABLE_FIELDS.contains(&path.as_str()) && !READ_ONLY_FIELDS.contains(&path.as_str()) {
            return Err(ApiError::invalid(&format!(
                "Invalid {what} mask path: \"{path}\". Valid paths are documented at https://developers.google.com/people/api/rest/v1/people/get."
            )));
        }
    }
    Ok(paths)
}

fn update_mask(mask: Option<String>, what: &str) -> Result<BTreeSet<String>, ApiError> {
    let paths = read_mask(mask, what)?;
    match paths
        .iter()
        .find(|p| !WRITABLE_FIELDS.contains(&p.as_str()))
    {
        Some(path) => Err(ApiError::invalid(&format!(
            "Invalid {what} mask path: \"{path}\". It is not updatable."
        ))),
        None => Ok(paths),
    }
}

// ---------------------------------------------------------------------------------------------
// Contact groups

fn group_json(resource_name: &str, group: &Group, member_count: usize) -> Value {
    json!({
        "resourceName": resource_name,
        "etag": group.etag,
        "metadata": { "updateTime": rfc3339(group.updated) },
        "groupType": if group.system { "SYSTEM_CONTACT_GROUP" } else { "USER_CONTACT_GROUP" },
        "name": if group.system { resource_name.trim_start_matches("contactGroups/") } else { group.name.as_str() },
        "formattedName": group.name,
        "memberCount": member_count,
    })
}

fn list_groups(st: &State, param: &dyn Fn(&str) -> Option<String>) -> Result<Response, ApiError> {
    let (size, offset) = paging(param, 30, MAX_PAGE)?;
    let groups = st.ordered_groups();
    let page: Vec<Value> = groups
        .iter()
        .skip(offset)
        .take(size)
        .map(|(rn, g)| group_json(rn, g, st.member_count(rn)))
        .collect();
    let mut body = json!({ "contactGroups": page, "totalItems": groups.len() });
    if offset + size < groups.len() {
        body["nextPageToken"] = json!(format!("page~{}", offset + size));
    } else {
        body["nextSyncToken"] = json!(st.sync_token());
    }
    Ok(Response::json(200, &body))
}

fn create_group(st: &mut State, req: &Request) -> Result<Response, ApiError> {
    let body = body_object(req)?;
    let name = body
        .get("contactGroup")
        .and_then(|g| g.get("name"))
        .and_then(Value::as_str)
        .map(str::trim)
        .unwrap_or("");
    if name.is_empty() {
        return Err(ApiError::invalid("contactGroup.name must not be empty."));
    }
    if st.groups.values().any(|g| g.name == name) {
        return Err(ApiError::new(
            409,
            "ALREADY_EXISTS",
            "Contact group name already exists.",
        ));
    }
    let n = st.next();
    let resource_name = format!("contactGroups/{:x}", 0x3c5e_0000_0000u64 + n);
    let group = Group {
        name: name.to_string(),
        system: false,
        etag: format!("%EgYBAgMEBQ{n:04x}"),
        updated: unix_now(),
    };
    let rendered = group_json(&resource_name, &group, 0);
    st.groups.insert(resource_name, group);
    Ok(Response::json(200, &rendered))
}

fn string_array(body: &Map<String, Value>, key: &str) -> Result<Vec<String>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    ApiError::invalid(&format!("Invalid value at '{key}': expected strings."))
                })
            })
            .collect(),
        Some(_) => Err(ApiError::invalid(&format!(
            "Invalid value at '{key}': expected a list."
        ))),
    }
}

fn modify_members(st: &mut State, group: &str, req: &Request) -> Result<Response, ApiError> {
    let body = body_object(req)?;
    let add = string_array(&body, "resourceNamesToAdd")?;
    let remove = string_array(&body, "resourceNamesToRemove")?;
    if add.len() + remove.len() > MAX_MODIFY {
        return Err(ApiError::invalid(&format!(
            "The total number of resource names to add and remove must be at most {MAX_MODIFY}."
        )));
    }
    let Some(target) = st.groups.get(group) else {
        return Err(ApiError::not_found());
    };
    if target.system && !add.is_empty() && !SYSTEM_GROUPS.iter().any(|(rn, _)| *rn == group) {
        return Err(ApiError::precondition(
            "Cannot add contacts to this system contact group.",
        ));
    }
    let (mut not_found, mut last_group) = (Vec::new(), Vec::new());
    let mut changed = BTreeSet::new();
    for rn in &add {
        match st.people.get_mut(rn) {
            None => not_found.push(rn.clone()),
            Some(contact) => {
                if contact.groups.insert(group.to_string()) {
                    changed.insert(rn.clone());
                }
            }
        }
    }
    for rn in &remove {
        match st.people.get_mut(rn) {
            None => not_found.push(rn.clone()),
            Some(contact) if contact.groups.contains(group) && contact.groups.len() == 1 => {
                last_group.push(rn.clone())
            }
            Some(contact) => {
                if contact.groups.remove(group) {
                    changed.insert(rn.clone());
                }
            }
        }
    }
    for rn in &changed {
        st.touch(rn);
    }
    let mut answer = Map::new();
    if !not_found.is_empty() {
        answer.insert("notFoundResourceNames".into(), json!(not_found));
    }
    if !last_group.is_empty() {
        answer.insert(
            "canNotRemoveLastContactGroupResourceNames".into(),
            json!(last_group),
        );
    }
    Ok(Response::json(200, &Value::Object(answer)))
}

// ---------------------------------------------------------------------------------------------
// People

fn rfc3339(unix: i64) -> String {
    let days = unix.div_euclid(86_400);
    let secs = unix.rem_euclid(86_400);
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
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.000Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// A contact as Google renders it, restricted to `mask`.
fn person_json(resource_name: &str, contact: &Contact, mask: &BTreeSet<String>) -> Value {
    let source = json!({ "type": "CONTACT", "id": contact.source_id });
    let mut person = Map::new();
    person.insert("resourceName".into(), json!(resource_name));
    person.insert("etag".into(), json!(contact.etag));
    for field in mask {
        match field.as_str() {
            "metadata" => {
                let mut contact_source = source.clone();
                contact_source["etag"] = json!(contact.etag);
                contact_source["updateTime"] = json!(rfc3339(contact.updated));
                person.insert(
                    "metadata".into(),
                    json!({ "sources": [contact_source], "objectType": "PERSON" }),
                );
            }
            "memberships" => {
                let memberships: Vec<Value> = contact
                    .groups
                    .iter()
                    .map(|g| {
                        json!({
                            "metadata": { "source": source },
                            "contactGroupMembership": {
                                "contactGroupId": g.trim_start_matches("contactGroups/"),
                                "contactGroupResourceName": g,
                            },
                        })
                    })
                    .collect();
                person.insert("memberships".into(), Value::Array(memberships));
            }
            name => {
                let Some(entries) = contact.fields.get(name).and_then(Value::as_array) else {
                    continue;
                };
                if entries.is_empty() {
                    continue;
                }
                let rendered: Vec<Value> = entries
                    .iter()
                    .enumerate()
                    .map(|(i, entry)| {
                        let mut entry = entry.clone();
                        entry["metadata"] =
                            json!({ "primary": i == 0, "sourcePrimary": i == 0, "source": source });
                        if let Some(kind) = entry.get("type").and_then(Value::as_str) {
                            entry["formattedType"] = json!(capitalized(kind));
                        }
                        if name == "names" {
                            let part = |k: &str| {
                                entry
                                    .get(k)
                                    .and_then(Value::as_str)
                                    .unwrap_or("")
                                    .to_string()
                            };
                            let (given, middle, family) =
                                (part("givenName"), part("middleName"), part("familyName"));
                            let display = [given.as_str(), middle.as_str(), family.as_str()]
                                .iter()
                                .filter(|p| !p.is_empty())
                                .copied()
                                .collect::<Vec<_>>()
                                .join(" ");
                            let display = if display.is_empty() {
                                part("unstructuredName")
                            } else {
                                display
                            };
                            entry["displayName"] = json!(display);
                            entry["displayNameLastFirst"] = json!(if family.is_empty() {
                                display.clone()
                            } else {
                                format!("{family}, {given}")
                                    .trim_end_matches(", ")
                                    .to_string()
                            });
                            if !display.is_empty() && entry.get("unstructuredName").is_none() {
                                entry["unstructuredName"] = json!(display);
                            }
                        }
                        entry
                    })
                    .collect();
                person.insert(name.to_string(), Value::Array(rendered));
            }
        }
    }
    Value::Object(person)
}

/// A person from a request body.
struct Incoming {
    /// Writable fields present in the body (memberships aside), sanitized.
    fields: Map<String, Value>,
    /// Contact group resource names from `memberships`, if the body had them.
    groups: Option<Vec<String>>,
    /// `etag`, and the CONTACT source's etag from `metadata.sources`.
    etags: Vec<String>,
}

/// Validates a person as Google does: known fields only, arrays of objects, one entry for
/// singletons, user-defined and client data with key and value.
fn parse_person(value: &Value, at: &str) -> Result<Incoming, String> {
    let person = value
        .as_object()
        .ok_or_else(|| format!("Invalid value at '{at}': expected an object."))?;
    let mut incoming = Incoming {
        fields: Map::new(),
        groups: None,
        etags: Vec::new(),
    };
    for (key, value) in person {
        if key == "etag" {
            if let Some(etag) = value.as_str() {
                incoming.etags.push(etag.to_string());
            }
            continue;
        }
        if key == "metadata" {
            for source in value["sources"].as_array().into_iter().flatten() {
                if source["type"] == "CONTACT"
                    && let Some(etag) = source["etag"].as_str()
                {
                    incoming.etags.push(etag.to_string());
                }
            }
            continue;
        }
        if IGNORED_PERSON_KEYS.contains(&key.as_str()) {
            continue;
        }
        if !WRITABLE_FIELDS.contains(&key.as_str()) {
            return Err(format!(
                "Invalid JSON payload received. Unknown name \"{key}\" at '{at}': Cannot find field."
            ));
        }
        let entries = match value {
            Value::Null => Vec::new(),
            Value::Array(items) if items.iter().all(Value::is_object) => items.clone(),
            _ => {
                return Err(format!(
                    "Invalid value at '{at}.{key}': expected a list of objects."
                ));
            }
        };
        if key == "memberships" {
            let groups = entries
                .iter()
                .map(|m| {
                    m["contactGroupMembership"]["contactGroupResourceName"]
                        .as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format!("{at}.memberships: contactGroupMembership.contactGroupResourceName is required."))
                })
                .collect::<Result<Vec<_>, _>>()?;
            incoming.groups = Some(groups);
            continue;
        }
        if SINGLETONS.contains(&key.as_str()) && entries.len() > 1 {
            return Err(format!(
                "{at}.{key}: only one {key} entry is allowed for a contact."
            ));
        }
        let mut stored = Vec::with_capacity(entries.len());
        for mut entry in entries {
            let object = entry.as_object_mut().expect("checked above");
            for output_only in OUTPUT_ONLY_ENTRY_KEYS {
                object.remove(output_only);
            }
            if key == "names" {
                object.remove("displayName");
                object.remove("displayNameLastFirst");
            }
            if matches!(key.as_str(), "userDefined" | "clientData") {
                let set = |k: &str| {
                    object
                        .get(k)
                        .and_then(Value::as_str)
                        .is_some_and(|s| !s.is_empty())
                };
                if !set("key") || !set("value") {
                    return Err(format!("{at}.{key}: key and value must be non-empty."));
                }
            }
            if key == "birthdays"
                && let Some(date) = object.get("date")
            {
                let month = date["month"].as_u64().unwrap_or(0);
                let day = date["day"].as_u64().unwrap_or(0);
                if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
                    return Err(format!("{at}.birthdays: the date is invalid."));
                }
            }
            stored.push(entry);
        }
        incoming.fields.insert(key.clone(), Value::Array(stored));
    }
    Ok(incoming)
}

/// Group resource names a contact may be added to, or the reason it may not.
fn check_groups(st: &State, groups: &[String]) -> Result<(), String> {
    for group in groups {
        match st.groups.get(group) {
            None => return Err(format!("Contact group \"{group}\" does not exist.")),
            Some(g) if g.system && !SYSTEM_GROUPS.iter().any(|(rn, _)| rn == group) => {
                return Err(format!(
                    "Cannot add contacts to system contact group \"{group}\"."
                ));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn batch_get(
    st: &mut State,
    names: &[String],
    fields: Option<String>,
) -> Result<Response, ApiError> {
    let mask = read_mask(fields, "personFields")?;
    if names.is_empty() || names.len() > MAX_BATCH_GET {
        return Err(ApiError::invalid(&format!(
            "resourceNames must hold 1 to {MAX_BATCH_GET} names."
        )));
    }
    let mut responses = Vec::with_capacity(names.len());
    for name in names {
        if !name.starts_with("people/") {
            return Err(ApiError::invalid(&format!(
                "Resource name \"{name}\" is not a valid person resource name."
            )));
        }
        responses.push(match st.people.get(name) {
            Some(contact) => json!({
                "httpStatusCode": 200,
                "requestedResourceName": name,
                "person": person_json(name, contact, &mask),
                "status": {},
            }),
            None => json!({
                "httpStatusCode": 404,
                "requestedResourceName": name,
                "status": { "code": 5, "message": "Requested entity was not found." },
            }),
        });
    }
    for name in names {
        st.after_read(name);
    }
    Ok(Response::json(200, &json!({ "responses": responses })))
}

fn limit_error(limit: usize) -> ApiError {
    ApiError::precondition(&format!(
        "Contact limit reached: an account can hold at most {limit} contacts."
    ))
    .with_reason("CONTACT_LIMIT_EXCEEDED")
}

/// Validates a new contact; `Err` is Google's description of what is wrong with it.
fn check_new_contact(st: &State, value: &Value, at: &str) -> Result<Incoming, String> {
    let incoming = parse_person(value, at)?;
    if let Some(message) = st.rejection(&incoming.fields) {
        return Err(message);
    }
    check_groups(st, incoming.groups.as_deref().unwrap_or(&[]))?;
    Ok(incoming)
}

fn store_new(st: &mut State, incoming: Incoming) -> String {
    let groups = incoming.groups.unwrap_or_default().into_iter().collect();
    st.insert_contact(incoming.fields, groups)
}

fn batch_create(st: &mut State, req: &Request) -> Result<Response, ApiError> {
    let body = body_object(req)?;
    let contacts = body
        .get("contacts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if contacts.is_empty() || contacts.len() > MAX_BATCH_CREATE {
        return Err(ApiError::invalid(&format!(
            "contacts must hold 1 to {MAX_BATCH_CREATE} contacts."
        )));
    }
    let mask = match body
        .get("readMask")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    {
        Some(mask) => Some(read_mask(Some(mask.to_string()), "readMask")?),
        None => None,
    };
    let mut accepted = Vec::with_capacity(contacts.len());
    let mut violations = Vec::new();
    for (i, contact) in contacts.iter().enumerate() {
        let at = format!("contacts[{i}].contact_person");
        match check_new_contact(st, &contact["contactPerson"], &at) {
            Ok(incoming) => accepted.push(incoming),
            Err(description) => violations.push(json!({ "field": at, "description": description })),
        }
    }
    if !violations.is_empty() {
        let mut error = ApiError::invalid("Request contains an invalid argument.");
        error.details.push(json!({
            "@type": "type.googleapis.com/google.rpc.BadRequest",
            "fieldViolations": violations,
        }));
        return Err(error);
    }
    if st.people.len() + accepted.len() > st.contact_limit {
        return Err(limit_error(st.contact_limit));
    }
    let created: Vec<String> = accepted
        .into_iter()
        .map(|incoming| store_new(st, incoming))
        .collect();
    let Some(mask) = mask else {
        return Ok(Response::json(200, &json!({})));
    };
    let people: Vec<Value> = created
        .iter()
        .map(|rn| json!({ "httpStatusCode": 200, "person": person_json(rn, &st.people[rn], &mask), "status": {} }))
        .collect();
    Ok(Response::json(200, &json!({ "createdPeople": people })))
}

fn create_contact(
    st: &mut State,
    req: &Request,
    fields: Option<String>,
) -> Result<Response, ApiError> {
    let mask = match fields.filter(|f| !f.is_empty()) {
        Some(f) => read_mask(Some(f), "personFields")?,
        None => ["names", "emailAddresses", "metadata"]
            .iter()
            .map(|f| f.to_string())
            .collect(),
    };
    let value = req
        .json()
        .map_err(|e| ApiError::invalid(&format!("Invalid JSON payload received. {e}")))?;
    let incoming = check_new_contact(st, &value, "person").map_err(|m| ApiError::invalid(&m))?;
    if st.people.len() >= st.contact_limit {
        return Err(limit_error(st.contact_limit));
    }
    let rn = store_new(st, incoming);
    Ok(Response::json(
        200,
        &person_json(&rn, &st.people[&rn], &mask),
    ))
}

/// Checks an update of an existing contact; nothing is applied.
fn check_update(
    st: &State,
    rn: &str,
    value: &Value,
    at: &str,
    mask: &BTreeSet<String>,
) -> Result<Incoming, ApiError> {
    let contact = st.people.get(rn).ok_or_else(ApiError::not_found)?;
    let incoming = parse_person(value, at).map_err(|m| ApiError::invalid(&m))?;
    if incoming.etags.is_empty() {
        return Err(ApiError::invalid(&format!(
            "{at}: person.metadata.sources (with the contact source's etag) is required to update a contact."
        )));
    }
    if incoming.etags.iter().any(|e| *e != contact.etag) {
        return Err(ApiError::precondition(STALE_ETAG_MESSAGE));
    }
    if mask.contains("emailAddresses")
        && let Some(message) = st.rejection(&incoming.fields)
    {
        return Err(ApiError::invalid(&message));
    }
    if mask.contains("memberships") {
        let groups = incoming.groups.clone().unwrap_or_default();
        if groups.is_empty() {
            return Err(ApiError::invalid(&format!(
                "{at}: a contact must keep at least one contact group membership."
            )));
        }
        check_groups(st, &groups).map_err(|m| ApiError::invalid(&m))?;
    }
    Ok(incoming)
}

fn apply_update(st: &mut State, rn: &str, incoming: Incoming, mask: &BTreeSet<String>) {
    let Some(contact) = st.people.get_mut(rn) else {
        return;
    };
    for field in mask {
        if field == "memberships" {
            contact.groups = incoming
                .groups
                .clone()
                .unwrap_or_default()
                .into_iter()
                .collect();
        } else {
            match incoming.fields.get(field) {
                Some(value) if value.as_array().is_some_and(|a| !a.is_empty()) => {
                    contact.fields.insert(field.clone(), value.clone());
                }
                _ => {
                    contact.fields.remove(field);
                }
            }
        }
    }
    st.touch(rn);
}

fn batch_update(st: &mut State, req: &Request) -> Result<Response, ApiError> {
    let body = body_object(req)?;
    let contacts = body
        .get("contacts")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    if contacts.is_empty() || contacts.len() > MAX_BATCH_UPDATE {
        return Err(ApiError::invalid(&format!(
            "contacts must hold 1 to {MAX_BATCH_UPDATE} contacts."
        )));
    }
    let mask = update_mask(
        body.get("updateMask")
            .and_then(Value::as_str)
            .map(str::to_string),
        "updateMask",
    )?;
    let read = match body
        .get("readMask")
        .and_then(Value::as_str)
        .filter(|m| !m.is_empty())
    {
        Some(m) => Some(read_mask(Some(m.to_string()), "readMask")?),
        None => None,
    };
    let mut checked = Vec::with_capacity(contacts.len());
    for (rn, person) in &contacts {
        checked.push((
            rn.clone(),
            check_update(st, rn, person, &format!("contacts[{rn}]"), &mask)?,
        ));
    }
    for (rn, incoming) in checked {
        apply_update(st, &rn, incoming, &mask);
    }
    let Some(read) = read else {
        return Ok(Response::json(200, &json!({})));
    };
    let result: Map<String, Value> = contacts
        .keys()
        .map(|rn| {
            let person = person_json(rn, &st.people[rn], &read);
            (rn.clone(), json!({ "httpStatusCode": 200, "requestedResourceName": rn, "person": person, "status": {} }))
        })
        .collect();
    Ok(Response::json(200, &json!({ "updateResult": result })))
}

fn update_contact(
    st: &mut State,
    rn: &str,
    req: &Request,
    update_fields: Option<String>,
    person_fields: Option<String>,
) -> Result<Response, ApiError> {
    let mask = update_mask(update_fields, "updatePersonFields")?;
    let read = match person_fields.filter(|f| !f.is_empty()) {
        Some(f) => read_mask(Some(f), "personFields")?,
        None => all_fields(),
    };
    let value = req
        .json()
        .map_err(|e| ApiError::invalid(&format!("Invalid JSON payload received. {e}")))?;
    if let Some(named) = value.get("resourceName").and_then(Value::as_str)
        && named != rn
    {
        return Err(ApiError::invalid(
            "person.resourceName does not match the resource name in the URL.",
        ));
    }
    let incoming = check_update(st, rn, &value, "person", &mask)?;
    apply_update(st, rn, incoming, &mask);
    Ok(Response::json(200, &person_json(rn, &st.people[rn], &read)))
}

fn batch_delete(st: &mut State, req: &Request) -> Result<Response, ApiError> {
    let body = body_object(req)?;
    let names = string_array(&body, "resourceNames")?;
    if names.is_empty() || names.len() > MAX_BATCH_DELETE {
        return Err(ApiError::invalid(&format!(
            "resourceNames must hold 1 to {MAX_BATCH_DELETE} names."
        )));
    }
    if names.iter().any(|rn| !st.people.contains_key(rn)) {
        return Err(ApiError::not_found());
    }
    for rn in &names {
        st.delete_contact(rn);
    }
    Ok(Response::json(200, &json!({})))
}

/// `GET /v1/people/me/connections`: all contacts, or with `syncToken` the changes since.
fn connections(st: &State, param: &dyn Fn(&str) -> Option<String>) -> Result<Response, ApiError> {
    let mask = read_mask(param("personFields"), "personFields")?;
    let (size, offset) = paging(param, 100, MAX_PAGE)?;
    let since = match param("syncToken").filter(|t| !t.is_empty()) {
        None => None,
        Some(token) => {
            let parsed = token
                .strip_prefix("EhQKEg")
                .and_then(|t| t.split_once('~'))
                .and_then(|(epoch, seq)| {
                    Some((epoch.parse::<u64>().ok()?, seq.parse::<u64>().ok()?))
                });
            match parsed {
                Some((epoch, seq)) if epoch == st.sync_epoch => Some(seq),
                _ => {
                    return Err(ApiError::precondition(
                        "Sync token is expired. Clear local cache and retry call without the sync token.",
                    )
                    .with_reason("EXPIRED_SYNC_TOKEN"));
                }
            }
        }
    };
    // Rendered per page only: a full listing of 25,000 contacts is 25 pages.
    let changed: Vec<(&String, Option<&Contact>)> = st
        .people
        .iter()
        .filter(|(_, c)| since.is_none_or(|s| c.changed > s))
        .map(|(rn, c)| (rn, Some(c)))
        .chain(
            st.deleted
                .iter()
                .filter(|(_, seq)| since.is_some_and(|s| **seq > s))
                .map(|(rn, _)| (rn, None)),
        )
        .collect();
    let total = changed.len();
    let page: Vec<Value> = changed
        .into_iter()
        .skip(offset)
        .take(size)
        .map(|(rn, contact)| match contact {
            Some(c) => person_json(rn, c, &mask),
            None => json!({ "resourceName": rn, "etag": "%EgQBAgME", "metadata": { "deleted": true, "objectType": "PERSON" } }),
        })
        .collect();
    let mut body = json!({ "totalPeople": total, "totalItems": total });
    if !page.is_empty() {
        body["connections"] = Value::Array(page);
    }
    if offset + size < total {
        body["nextPageToken"] = json!(format!("page~{}", offset + size));
    } else if param("requestSyncToken").as_deref() == Some("true") {
        body["nextSyncToken"] = json!(st.sync_token());
    }
    Ok(Response::json(200, &body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Emulator;

    struct Client {
        base: String,
        agent: ureq::Agent,
        token: String,
    }

    impl Client {
        fn new(emulator: &Emulator) -> Client {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut client = Client {
                base: emulator.base_url("google_contacts"),
                agent,
                token: String::new(),
            };
            let (status, body) = client.form(
                "/token",
                "grant_type=refresh_token&client_id=c&client_secret=s&refresh_token=r",
            );
            assert_eq!(status, 200, "{body}");
            client.token = body["access_token"].as_str().unwrap().to_string();
            client
        }

        fn answer(mut response: ureq::http::Response<ureq::Body>) -> (u16, Value) {
            let status = response.status().as_u16();
            let text = response.body_mut().read_to_string().unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        }

        fn form(&self, path: &str, body: &str) -> (u16, Value) {
            let response = self
                .agent
                .post(format!("{}{path}", self.base))
                .header("content-type", "application/x-www-form-urlencoded")
                .send(body)
                .unwrap();
            Client::answer(response)
        }

        fn get(&self, path: &str) -> (u16, Value) {
            let response = self
                .agent
                .get(format!("{}{path}", self.base))
                .header("authorization", format!("Bearer {}", self.token))
                .call()
                .unwrap();
            Client::answer(response)
        }

        fn send(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
            let url = format!("{}{path}", self.base);
            let auth = format!("Bearer {}", self.token);
            let text = body.to_string();
            let response = match method {
                "POST" => self
                    .agent
                    .post(&url)
                    .header("authorization", &auth)
                    .send(&text),
                "PATCH" => self
                    .agent
                    .patch(&url)
                    .header("authorization", &auth)
                    .send(&text),
                _ => self
                    .agent
                    .delete(&url)
                    .header("authorization", &auth)
                    .call(),
            };
            Client::answer(response.unwrap())
        }
    }

    fn create(client: &Client, emails: &[&str], group: &str) -> Vec<String> {
        let contacts: Vec<Value> = emails
            .iter()
            .map(|e| json!({ "contactPerson": {
                "emailAddresses": [{ "value": e }],
                "memberships": [{ "contactGroupMembership": { "contactGroupResourceName": group } }],
            }}))
            .collect();
        let (status, body) = client.send(
            "POST",
            "/v1/people:batchCreateContacts",
            &json!({ "contacts": contacts, "readMask": "emailAddresses,metadata" }),
        );
        assert_eq!(status, 200, "{body}");
        body["createdPeople"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["person"]["resourceName"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn tokens_are_required_issued_and_expire() {
        let emulator = Emulator::start();
        let gc = emulator.google_contacts();
        gc.set_credentials("id", "secret", "refresh");
        let client = Client {
            base: emulator.base_url("google_contacts"),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into(),
            token: "nope".into(),
        };
        let (status, body) = client.get("/v1/contactGroups");
        assert_eq!(
            (status, body["error"]["status"].as_str()),
            (401, Some("UNAUTHENTICATED"))
        );
        let (status, body) = client.form(
            "/token",
            "grant_type=refresh_token&client_id=id&client_secret=secret&refresh_token=old",
        );
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_grant"))
        );
        let (status, body) = client.form(
            "/token",
            "grant_type=refresh_token&client_id=id&client_secret=bad&refresh_token=refresh",
        );
        assert_eq!(
            (status, body["error"].as_str()),
            (401, Some("invalid_client"))
        );
        let (status, body) = client.form(
            "/token",
            "grant_type=refresh_token&client_id=id&client_secret=secret&refresh_token=refresh",
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["token_type"], "Bearer");
        let client = Client {
            token: body["access_token"].as_str().unwrap().into(),
            ..client
        };
        assert_eq!(client.get("/v1/contactGroups").0, 200);
        gc.expire_access_tokens();
        assert_eq!(client.get("/v1/contactGroups").0, 401);
        assert_eq!(gc.token_requests(), 3);
    }

    #[test]
    fn groups_memberships_and_the_last_group() {
        let emulator = Emulator::start();
        let client = Client::new(&emulator);
        let (status, group) = client.send(
            "POST",
            "/v1/contactGroups",
            &json!({ "contactGroup": { "name": "vip (crm)" } }),
        );
        assert_eq!(status, 200, "{group}");
        let group = group["resourceName"].as_str().unwrap().to_string();
        let (status, body) = client.send(
            "POST",
            "/v1/contactGroups",
            &json!({ "contactGroup": { "name": "vip (crm)" } }),
        );
        assert_eq!(
            (status, body["error"]["status"].as_str()),
            (409, Some("ALREADY_EXISTS"))
        );
        let people = create(&client, &["ann@example.com", "bob@example.com"], &group);
        assert_eq!(emulator.google_contacts().group_members(&group).len(), 2);
        let path = format!("/v1/{group}/members:modify");
        let (status, body) = client.send(
            "POST",
            &path,
            &json!({ "resourceNamesToRemove": [people[0], "people/c1"] }),
        );
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!({ "notFoundResourceNames": ["people/c1"] }));
        let (_, body) = client.send(
            "POST",
            "/v1/contactGroups/myContacts/members:modify",
            &json!({ "resourceNamesToRemove": [people[0]] }),
        );
        assert_eq!(
            body,
            json!({ "canNotRemoveLastContactGroupResourceNames": [people[0]] })
        );
        let too_many: Vec<String> = (0..1001).map(|i| format!("people/c{i}")).collect();
        assert_eq!(
            client
                .send("POST", &path, &json!({ "resourceNamesToAdd": too_many }))
                .0,
            400
        );
        let (_, listed) = client.get("/v1/contactGroups?pageSize=1000");
        let names: Vec<&str> = listed["contactGroups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, vec!["myContacts", "starred", "vip (crm)"]);
        let members = emulator.list_members("google_contacts", &group);
        assert_eq!(members.keys().collect::<Vec<_>>(), vec!["bob@example.com"]);
    }

    #[test]
    fn updates_need_the_current_etag() {
        let emulator = Emulator::start();
        let client = Client::new(&emulator);
        let rn = create(&client, &["ann@example.com"], MY_CONTACTS).remove(0);
        let (_, got) = client.get(&format!(
            "/v1/people:batchGet?resourceNames={rn}&personFields=names,metadata"
        ));
        let person = &got["responses"][0]["person"];
        let etag = person["etag"].clone();
        let update = |etag: &Value| {
            json!({
                "contacts": { rn.clone(): { "etag": etag, "names": [{ "givenName": "Ann" }] } },
                "updateMask": "names",
                "readMask": "names",
            })
        };
        let (status, body) = client.send("POST", "/v1/people:batchUpdateContacts", &update(&etag));
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["updateResult"][&rn]["person"]["names"][0]["displayName"],
            "Ann"
        );
        let (status, body) = client.send("POST", "/v1/people:batchUpdateContacts", &update(&etag));
        assert_eq!(
            (status, body["error"]["status"].as_str()),
            (400, Some("FAILED_PRECONDITION"))
        );
        let (status, _) = client.send(
            "POST",
            "/v1/people:batchUpdateContacts",
            &json!({ "contacts": { rn.clone(): { "names": [] } }, "updateMask": "names" }),
        );
        assert_eq!(status, 400);
        let fresh = emulator.google_contacts().person(&rn).unwrap()["etag"].clone();
        let two_names =
            json!({ "etag": fresh, "names": [{ "givenName": "A" }, { "givenName": "B" }] });
        let (status, _) = client.send(
            "PATCH",
            &format!("/v1/{rn}:updateContact?updatePersonFields=names"),
            &two_names,
        );
        assert_eq!(status, 400);
    }

    #[test]
    fn batch_create_is_atomic_and_capped() {
        let emulator = Emulator::start();
        let gc = emulator.google_contacts();
        let client = Client::new(&emulator);
        gc.reject_address("bad@example.com", "Invalid email address.");
        let contacts = json!([
            { "contactPerson": { "emailAddresses": [{ "value": "ok@example.com" }] } },
            { "contactPerson": { "emailAddresses": [{ "value": "bad@example.com" }] } },
        ]);
        let (status, body) = client.send(
            "POST",
            "/v1/people:batchCreateContacts",
            &json!({ "contacts": contacts, "readMask": "metadata" }),
        );
        assert_eq!(status, 400);
        assert_eq!(
            body["error"]["details"][0]["fieldViolations"][0]["field"],
            "contacts[1].contact_person"
        );
        assert_eq!(gc.contact_count(), 0);
        gc.set_contact_limit(2);
        gc.seed_contacts(1);
        let (status, body) = client.send(
            "POST",
            "/v1/people:batchCreateContacts",
            &json!({ "contacts": [contacts[0], contacts[0]], "readMask": "metadata" }),
        );
        assert_eq!(
            (status, body["error"]["status"].as_str()),
            (400, Some("FAILED_PRECONDITION"))
        );
        assert_eq!(create(&client, &["ok@example.com"], MY_CONTACTS).len(), 1);
    }

    #[test]
    fn incremental_sync_reports_changes_and_deletions() {
        let emulator = Emulator::start();
        let gc = emulator.google_contacts();
        let client = Client::new(&emulator);
        let people = create(
            &client,
            &["a@example.com", "b@example.com", "c@example.com"],
            MY_CONTACTS,
        );
        let (_, first) = client.get("/v1/people/me/connections?personFields=emailAddresses&pageSize=2&requestSyncToken=true");
        assert_eq!(first["connections"].as_array().unwrap().len(), 2);
        assert!(first.get("nextSyncToken").is_none());
        let page = first["nextPageToken"].as_str().unwrap();
        let (_, last) = client.get(&format!("/v1/people/me/connections?personFields=emailAddresses&pageSize=2&requestSyncToken=true&pageToken={page}"));
        let token = last["nextSyncToken"].as_str().unwrap().to_string();
        gc.edit_contact(
            &people[0],
            "phoneNumbers",
            json!([{ "value": "+1 555 0100" }]),
        );
        client.send(
            "DELETE",
            &format!("/v1/{}:deleteContact", people[1]),
            &Value::Null,
        );
        let (_, changes) = client.get(&format!("/v1/people/me/connections?personFields=emailAddresses&requestSyncToken=true&syncToken={token}"));
        let changed: Vec<(&str, bool)> = changes["connections"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["resourceName"].as_str().unwrap(),
                    p["metadata"]["deleted"] == true,
                )
            })
            .collect();
        assert_eq!(
            changed,
            vec![(people[0].as_str(), false), (people[1].as_str(), true)]
        );
        gc.expire_sync_tokens();
        let (status, body) = client.get(&format!(
            "/v1/people/me/connections?personFields=emailAddresses&syncToken={token}"
        ));
        assert_eq!(status, 400);
        assert_eq!(body["error"]["details"][0]["reason"], "EXPIRED_SYNC_TOKEN");
    }

    #[test]
    fn reads_carry_output_only_data_and_can_go_stale() {
        let emulator = Emulator::start();
        let gc = emulator.google_contacts();
        let client = Client::new(&emulator);
        let rn = gc.insert_contact(json!({ "names": [{ "givenName": "Ann", "familyName": "Lee" }], "phoneNumbers": [{ "value": "+15550100", "type": "mobile" }] }), &[]);
        gc.touch_after_next_read(&rn);
        let (_, got) = client.get(&format!(
            "/v1/people/{}?personFields=names,phoneNumbers,metadata",
            rn.trim_start_matches("people/")
        ));
        assert_eq!(got["names"][0]["displayName"], "Ann Lee");
        assert_eq!(got["phoneNumbers"][0]["formattedType"], "Mobile");
        assert_eq!(got["metadata"]["sources"][0]["type"], "CONTACT");
        let (status, _) = client.send(
            "PATCH",
            &format!("/v1/{rn}:updateContact?updatePersonFields=phoneNumbers"),
            &json!({ "etag": got["etag"], "metadata": got["metadata"], "phoneNumbers": got["phoneNumbers"] }),
        );
        assert_eq!(status, 400, "the etag changed after the read");
        assert_eq!(
            gc.people_with_email("nobody@example.com"),
            Vec::<Value>::new()
        );
    }

    #[test]
    fn contacts_without_an_email_are_listed_by_their_phone_identity() {
        let emulator = Emulator::start();
        let gc = emulator.google_contacts();
        let client = Client::new(&emulator);
        let (_, group) = client.send(
            "POST",
            "/v1/contactGroups",
            &json!({ "contactGroup": { "name": "vip (crm)" } }),
        );
        let group = group["resourceName"].as_str().unwrap().to_string();
        let phone_only = gc.insert_contact(
            json!({ "names": [{ "givenName": "Pia" }],
                    "phoneNumbers": [{ "value": "0049 (30) 123-45.67" }, { "value": "8 916 123 45 67" }] }),
            &[&group],
        );
        gc.insert_contact(
            json!({ "emailAddresses": [{ "value": "Ann@Example.com" }],
                    "phoneNumbers": [{ "value": "+1 555 0100 99" }] }),
            &[&group],
        );
        gc.insert_contact(
            json!({ "phoneNumbers": [{ "value": "ext. 12" }] }),
            &[&group],
        );
        gc.insert_contact(
            json!({ "phoneNumbers": [{ "value": "+7 495 000 00 00" }] }),
            &[],
        );
        let members = emulator.list_members("google_contacts", &group);
        assert_eq!(
            members.keys().collect::<Vec<_>>(),
            ["ann@example.com", "tel:+49301234567", "tel:89161234567"],
            "an email wins; no number that is not one; only the group's contacts"
        );
        assert_eq!(members["tel:+49301234567"]["given_name"], "Pia");
        let found = gc.people_with_phone("+49 30 1234567");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0]["resourceName"], phone_only.as_str());
        assert_eq!(gc.people_with_phone("+1 (555) 0100-99").len(), 1);
        assert!(gc.people_with_phone("12").is_empty());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(784_111_777), "1994-11-06T08:49:37.000Z");
    }
}
