//! Google Contacts, through the People API v1 (`https://people.googleapis.com/v1`).
//!
//! A binding's list is a contact group (a "label" in the Google Contacts UI), found by name or
//! created; tags are further labels. Authentication is OAuth2 for the account owner: the
//! connection keeps an OAuth client (`client_id`, `client_secret`) and a `refresh_token` with the
//! `https://www.googleapis.com/auth/contacts` scope; the provider exchanges it for an access
//! token at `settings.token_url` (default `https://oauth2.googleapis.com/token`, or
//! `<settings.base_url>/token` when only the API root is overridden, as the emulator serves
//! both), keeps the token in a [`kit::BearerToken`] (renewed before it expires and once on a 401).
//!
//! Contacts are people (`people/c…`), not addresses: the person's resource name is returned as
//! the member's `remote_id` and used from then on. An address seen for the first time is looked
//! up in a directory of the account's contacts (address → people), built once from
//! `people/me/connections` and kept current with its sync token, so that a contact the user
//! already has joins the label instead of being duplicated. Google documents that writes reach
//! listings with a delay, so a contact created elsewhere moments before can be missed and
//! duplicated; contacts this provider writes are entered in the directory at once.
//!
//! The sync owns only the fields a binding maps. Updates read the contact first (its etag and
//! values), change the mapped fields, and write back with the etag: other names, phones,
//! addresses, custom fields and labels the user keeps are left alone. For the multi-valued
//! fields (phone, url, address) the value last written is remembered in the contact's
//! `clientData` (`pg_listsync.phoneNumbers`, `.urls`, `.addresses`), so a new value replaces
//! that entry and no other.
//! Contacts created by the sync are marked there too (`pg_listsync.created`): `on_leave =>
//! 'delete'` deletes only those, and only when no other label holds them.
//!
//! Google contacts need no email, so the engine may hand this provider phone identities
//! (`tel:+49301234567`, see `listsync.phone_identity`) for rows without a valid email. Such a
//! member is a contact holding that number and no email: it is created with the number and never
//! given an email, and found among existing contacts by the number. A contact is known by its
//! emails, and by its numbers only when it has no email, the rule rows follow too; so a user's
//! contact with an email and the same number is not taken over by a phone-only row.

use super::kit::{BearerToken, IssuedToken, ListDirectory};
use super::{
    Binding, Capabilities, Config, LeaveAction, Limits, Member, MemberStatus, Need, Outcome,
    Provider, Spec, chunks, kit,
};
use crate::address::phone_identity;
use crate::http::{
    Http, Method, ProviderError, Request, Response, Result, percent_encode, transient,
};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::time::Duration;

pub static SPEC: Spec = Spec {
    name: "google_contacts",
    settings: &[("token_url", Need::Optional)],
    secrets: &[
        ("client_id", Need::Required),
        ("client_secret", Need::Required),
        ("refresh_token", Need::Required),
    ],
    capabilities: Capabilities {
        // Google Contacts has no consent state: nothing to archive or unsubscribe.
        on_leave: &["remove", "delete", "keep"],
        double_opt_in: false,
        tags: true,
        phone_identity: true,
    },
    validate,
    field_name,
    connect,
};

const API: &str = "https://people.googleapis.com";
const TOKEN_URL: &str = "https://oauth2.googleapis.com/token";
/// Contacts one Google account can hold.
pub const CONTACT_LIMIT: usize = 25_000;
/// People per `batchCreateContacts`, `batchUpdateContacts` and `batchGet`.
const BATCH: usize = 200;
/// People per `batchDeleteContacts`.
const DELETE_BATCH: usize = 500;
/// Names per `members:modify` (added and removed together).
const MODIFY_BATCH: usize = 1000;
const PAGE_SIZE: usize = 1000;
const MY_CONTACTS: &str = "contactGroups/myContacts";
/// What the sync reads of a contact before changing it.
const READ_FIELDS: &str = "addresses,biographies,birthdays,clientData,emailAddresses,memberships,metadata,names,organizations,phoneNumbers,urls,userDefined";
/// The person fields the sync may write.
const WRITTEN_FIELDS: [&str; 10] = [
    "names",
    "emailAddresses",
    "phoneNumbers",
    "organizations",
    "birthdays",
    "addresses",
    "urls",
    "biographies",
    "userDefined",
    "clientData",
];
/// `clientData` key marking contacts the sync created.
const CREATED_KEY: &str = "pg_listsync.created";
const FIELD_NAMES: &str = "given_name, middle_name, family_name, phone, organization, department, job_title, birthday, address, url, biography, or user:<key> for a custom field";

/// A provider field a binding may map.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    GivenName,
    MiddleName,
    FamilyName,
    Phone,
    Organization,
    Department,
    JobTitle,
    Birthday,
    Address,
    Url,
    Biography,
    /// A custom field (`userDefined`) with this key.
    Custom(String),
}

fn parse_field(name: &str) -> Option<Field> {
    Some(match name {
        "given_name" => Field::GivenName,
        "middle_name" => Field::MiddleName,
        "family_name" => Field::FamilyName,
        "phone" => Field::Phone,
        "organization" => Field::Organization,
        "department" => Field::Department,
        "job_title" => Field::JobTitle,
        "birthday" => Field::Birthday,
        "address" => Field::Address,
        "url" => Field::Url,
        "biography" => Field::Biography,
        _ => {
            let key = name.strip_prefix("user:")?.trim();
            if key.is_empty() {
                return None;
            }
            Field::Custom(key.to_string())
        }
    })
}

fn field_name(name: &str) -> std::result::Result<(), String> {
    match parse_field(name) {
        Some(_) => Ok(()),
        None => Err(format!(
            "\"{name}\" is not a Google Contacts field: use {FIELD_NAMES}"
        )),
    }
}

fn validate(config: &Config) -> std::result::Result<(), String> {
    match config.setting("token_url") {
        Some(url) if !(url.starts_with("https://") || url.starts_with("http://")) => Err(format!(
            "settings.token_url must be an http(s) URL, not \"{url}\""
        )),
        _ => Ok(()),
    }
}

fn connect(config: &Config) -> Box<dyn Provider> {
    Box::new(GoogleContacts::new(config))
}

/// A new access token from the refresh token.
fn refresh_access_token(
    http: &mut Http,
    token_url: &str,
    client_id: &str,
    client_secret: &str,
    refresh_token: &str,
) -> Result<IssuedToken> {
    let form = [
        ("grant_type", "refresh_token"),
        ("client_id", client_id),
        ("client_secret", client_secret),
        ("refresh_token", refresh_token),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let request = Request::new(Method::Post, token_url.to_string()).form(&form);
    let response = http.send("refresh access token", request)?;
    response.check_common(oauth_problem)?;
    if !response.is_success() {
        // invalid_grant (revoked or expired refresh token), invalid_client, ...: only an
        // operator can fix these.
        return Err(ProviderError::Auth(format!(
            "the token endpoint refused the refresh token: HTTP {}: {}",
            response.status,
            oauth_problem(&response)
        )));
    }
    let body = response.json()?;
    let value = body["access_token"]
        .as_str()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| transient("the token endpoint answered without an access_token"))?
        .to_string();
    Ok(IssuedToken {
        value,
        lifetime: Duration::from_secs(body["expires_in"].as_u64().unwrap_or(3599)),
    })
}

struct GoogleContacts {
    /// `…/v1`.
    api: String,
    token_url: String,
    client_id: String,
    client_secret: String,
    refresh_token: String,
    token: BearerToken,
    /// The account's contacts by address, loaded when an address must be looked up.
    directory: Option<Directory>,
}

/// An error answer of the People API: `{"error": {"code", "message", "status", "details"}}`.
#[derive(Debug, Clone, PartialEq)]
struct ApiError {
    http: u16,
    /// `INVALID_ARGUMENT`, `FAILED_PRECONDITION`, `NOT_FOUND`, ...
    status: String,
    message: String,
    /// `ErrorInfo` reasons from `details`.
    reasons: Vec<String>,
}

impl ApiError {
    fn parse(response: &Response) -> ApiError {
        let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
        let error = &body["error"];
        let reasons = error["details"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d["reason"].as_str().map(str::to_string))
            .chain(
                error["errors"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|e| e["reason"].as_str().map(str::to_string)),
            )
            .collect();
        ApiError {
            http: response.status,
            status: error["status"].as_str().unwrap_or("").to_string(),
            message: error["message"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| response.text_excerpt()),
            reasons,
        }
    }

    fn is_rate_limit(&self) -> bool {
        self.status == "RESOURCE_EXHAUSTED"
            || self.reasons.iter().any(|r| {
                r.eq_ignore_ascii_case("RATE_LIMIT_EXCEEDED") || r.ends_with("RateLimitExceeded")
            })
    }

    /// Google's answer to an update whose etag is no longer the contact's.
    fn is_stale_etag(&self) -> bool {
        self.http == 400 && self.status == "FAILED_PRECONDITION"
    }

    fn rejected(&self) -> ProviderError {
        ProviderError::Rejected(self.to_string())
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status.as_str() {
            "" => write!(f, "HTTP {}: {}", self.http, self.message),
            status => write!(f, "HTTP {} {status}: {}", self.http, self.message),
        }
    }
}

/// What the People API answered: the body, or its error for the caller to interpret.
/// Authentication and transient failures are already `Err` of the outer result.
type Answer = std::result::Result<Value, ApiError>;

/// OAuth's error words: `error: error_description`.
fn oauth_problem(response: &Response) -> String {
    let body: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    match (body["error"].as_str(), body["error_description"].as_str()) {
        (Some(e), Some(d)) => format!("{e}: {d}"),
        (Some(e), None) => e.to_string(),
        _ => response.text_excerpt(),
    }
}

fn group_name(id: &str) -> String {
    if id.starts_with("contactGroups/") {
        id.to_string()
    } else {
        format!("contactGroups/{id}")
    }
}

fn list_group(binding: &Binding) -> Result<String> {
    kit::list_id(binding, "Google contact group").map(group_name)
}

fn tag_groups(binding: &Binding) -> Vec<String> {
    binding
        .remote
        .get("tag_groups")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.as_str().map(str::to_string))
        .collect()
}

fn member(remote_id: String) -> Outcome {
    Outcome::Member {
        status: MemberStatus::Subscribed,
        remote_id: Some(remote_id),
    }
}

fn retry(message: impl Into<String>) -> Outcome {
    Outcome::Retry {
        message: message.into(),
        retry_after: None,
    }
}

// ---------------------------------------------------------------------------------------------
// The directory: the account's contacts by address

/// Which contacts hold which identities (see [`identities_of`]), and the sync token to catch up
/// from. Its size is the account's contact count, which the 25,000 cap is checked against.
#[derive(Default)]
struct Directory {
    people: HashMap<String, Vec<String>>,
    by_address: HashMap<String, Vec<String>>,
    sync_token: Option<String>,
}

impl Directory {
    fn put(&mut self, person: &str, addresses: Vec<String>) {
        self.drop_person(person);
        for address in &addresses {
            self.by_address
                .entry(address.clone())
                .or_default()
                .push(person.to_string());
        }
        self.people.insert(person.to_string(), addresses);
    }

    fn drop_person(&mut self, person: &str) {
        for address in self.people.remove(person).unwrap_or_default() {
            if let Some(holders) = self.by_address.get_mut(&address) {
                holders.retain(|p| p != person);
                if holders.is_empty() {
                    self.by_address.remove(&address);
                }
            }
        }
    }

    fn holders(&self, address: &str) -> &[String] {
        self.by_address
            .get(&address.to_lowercase())
            .map_or(&[], Vec::as_slice)
    }

    fn apply(&mut self, listing: Listing) {
        for (person, addresses) in listing.people {
            match addresses {
                Some(addresses) => self.put(&person, addresses),
                None => self.drop_person(&person),
            }
        }
        self.sync_token = listing.sync_token;
    }
}

/// One pass over `people/me/connections`: contact → its identities, or `None` if deleted.
struct Listing {
    people: Vec<(String, Option<Vec<String>>)>,
    sync_token: Option<String>,
}

fn entry_values_of(entries: &[Value]) -> impl Iterator<Item = &str> {
    entries.iter().filter_map(|e| e["value"].as_str())
}

fn entry_values<'a>(person: &'a Value, field: &str) -> impl Iterator<Item = &'a str> {
    entry_values_of(person[field].as_array().map_or(&[], Vec::as_slice))
}

/// The member addresses a contact answers to, in its order: its emails (lower-cased), or when
/// it has none its numbers as `tel:` identities, as a row's identity is its email before its
/// phone.
fn identities_of(person: &Value) -> Vec<String> {
    let emails: Vec<String> = entry_values(person, "emailAddresses")
        .map(|a| a.trim().to_lowercase())
        .filter(|a| !a.is_empty())
        .collect();
    if !emails.is_empty() {
        return emails;
    }
    entry_values(person, "phoneNumbers")
        .filter_map(phone_identity)
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Mapping fields onto a contact

/// A member's mapped values as text (`None`: NULL or blank, which clears the field).
fn wanted(member: &Member) -> std::result::Result<Vec<(Field, Option<String>)>, String> {
    member
        .fields
        .iter()
        .map(|(name, value)| {
            let field = parse_field(name)
                .ok_or_else(|| format!("\"{name}\" is not a Google Contacts field"))?;
            let text = match value {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => Some(other.to_string()),
            };
            Ok((field, text.filter(|t| !t.trim().is_empty())))
        })
        .collect()
}

/// `YYYY-MM-DD` (a timestamp's date part too) or `--MM-DD` (no year) → a People API `Date`.
fn birthday(text: &str) -> std::result::Result<Value, String> {
    let text = text.trim();
    let invalid =
        || format!("birthday \"{text}\" is not a date (YYYY-MM-DD, or --MM-DD without a year)");
    let number = |s: &str| s.parse::<u32>().map_err(|_| invalid());
    let (year, month, day) = match text.strip_prefix("--") {
        Some(rest) if rest.len() == 5 && rest.as_bytes()[2] == b'-' => {
            (None, number(&rest[..2])?, number(&rest[3..5])?)
        }
        None if text.len() >= 10 && text.as_bytes()[4] == b'-' && text.as_bytes()[7] == b'-' => (
            Some(number(&text[..4])?),
            number(&text[5..7])?,
            number(&text[8..10])?,
        ),
        _ => return Err(invalid()),
    };
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return Err(invalid());
    }
    Ok(match year {
        Some(year) => json!({"year": year, "month": month, "day": day}),
        None => json!({"month": month, "day": day}),
    })
}

/// A number's digits, without the `00` that stands for `+` (as `listsync.phone_identity` reads it).
fn digits(text: &str) -> String {
    let digits: String = text.chars().filter(char::is_ascii_digit).collect();
    match text.trim_start().starts_with("00") {
        true => digits[2..].to_string(),
        false => digits,
    }
}

/// Whether two phone numbers are the same number however they are written.
fn same_phone(a: &str, b: &str) -> bool {
    let (da, db) = (digits(a), digits(b));
    if da.is_empty() || db.is_empty() {
        a.trim().eq_ignore_ascii_case(b.trim())
    } else {
        da == db
    }
}

fn same_url(a: &str, b: &str) -> bool {
    let clean = |s: &str| s.trim().trim_end_matches('/').to_lowercase();
    clean(a) == clean(b)
}

fn same_text(a: &str, b: &str) -> bool {
    let clean = |s: &str| {
        s.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    clean(a) == clean(b)
}

/// The contact-sourced entries of the person fields the sync writes, without what Google
/// computes (so they can be written back): data from a linked Google profile is not the
/// contact's to change.
fn contact_fields(person: &Value) -> Map<String, Value> {
    let mut fields = Map::new();
    for field in WRITTEN_FIELDS {
        let Some(entries) = person[field].as_array() else {
            continue;
        };
        let kept: Vec<Value> = entries
            .iter()
            .filter(|e| {
                e["metadata"]["source"]["type"]
                    .as_str()
                    .is_none_or(|t| t == "CONTACT")
            })
            .map(|entry| {
                let mut entry = entry.clone();
                if let Some(object) = entry.as_object_mut() {
                    for key in ["metadata", "formattedType", "canonicalForm"] {
                        object.remove(key);
                    }
                    if field == "names" {
                        object.remove("displayName");
                        object.remove("displayNameLastFirst");
                    }
                }
                entry
            })
            .collect();
        if !kept.is_empty() {
            fields.insert(field.to_string(), Value::Array(kept));
        }
    }
    fields
}

fn entries<'a>(fields: &'a mut Map<String, Value>, field: &str) -> &'a mut Vec<Value> {
    let slot = fields
        .entry(field.to_string())
        .or_insert_with(|| Value::Array(Vec::new()));
    if !slot.is_array() {
        *slot = Value::Array(Vec::new());
    }
    slot.as_array_mut().expect("made an array above")
}

fn client_data(fields: &Map<String, Value>, key: &str) -> Option<String> {
    fields
        .get("clientData")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| e["key"] == key)
        .and_then(|e| e["value"].as_str())
        .map(str::to_string)
}

fn set_client_data(fields: &mut Map<String, Value>, key: &str, value: Option<&str>) {
    let data = entries(fields, "clientData");
    let at = data.iter().position(|e| e["key"] == key);
    match (at, value) {
        (Some(i), Some(v)) => data[i]["value"] = json!(v),
        (None, Some(v)) => data.push(json!({"key": key, "value": v})),
        (Some(i), None) => {
            data.remove(i);
        }
        (None, None) => {}
    }
}

/// Sets the entry of a multi-valued field that the sync owns: the one holding the value it
/// wrote last (remembered in `clientData`). Entries the user added stay; a value the contact
/// already holds is not added twice. The entry holding `kept` (the number a phone member is
/// known by) is never taken over, even when the mapped value was that number: it must stay
/// when the mapped value moves on.
fn set_owned(
    fields: &mut Map<String, Value>,
    field: &str,
    key: &str,
    wanted: Option<&str>,
    same: fn(&str, &str) -> bool,
    kept: Option<&str>,
) {
    let memory = format!("pg_listsync.{field}");
    let remembered = client_data(fields, &memory);
    let list = entries(fields, field);
    let value_of = |e: &Value| e[key].as_str().map(str::to_string);
    let ours = remembered
        .as_deref()
        .filter(|r| kept.is_none_or(|k| !same(r, k)))
        .and_then(|r| {
            list.iter()
                .position(|e| value_of(e).is_some_and(|v| same(&v, r)))
        });
    if let Some(value) = wanted {
        let held = list
            .iter()
            .enumerate()
            .any(|(i, e)| Some(i) != ours && value_of(e).is_some_and(|v| same(&v, value)));
        match (ours, held) {
            (Some(i), true) => {
                list.remove(i);
            }
            (Some(i), false) => {
                let mut entry = json!({ key: value });
                if let Some(kind) = list[i].get("type") {
                    entry["type"] = kind.clone();
                }
                list[i] = entry;
            }
            (None, true) => {}
            (None, false) => list.push(json!({ key: value })),
        }
    } else if let Some(i) = ours {
        list.remove(i);
    }
    set_client_data(fields, &memory, wanted);
}

/// Sets parts of a singleton-like entry (the first name, the first organization); an entry
/// left empty is removed. Returns whether a part changed.
fn set_parts(fields: &mut Map<String, Value>, field: &str, parts: &[(&str, Option<&str>)]) -> bool {
    if parts.is_empty() {
        return false;
    }
    let list = entries(fields, field);
    let mut entry = list.first().cloned().unwrap_or_else(|| json!({}));
    let before = entry.clone();
    for (part, value) in parts {
        match value {
            Some(v) => entry[*part] = json!(v),
            None => {
                if let Some(object) = entry.as_object_mut() {
                    object.remove(*part);
                }
            }
        }
    }
    let changed = entry != before;
    let empty = entry
        .as_object()
        .is_none_or(|o| o.keys().all(|k| k == "type" || k == "current"));
    match (list.is_empty(), empty) {
        (true, true) => {}
        (true, false) => list.push(entry),
        (false, true) => {
            list.remove(0);
        }
        (false, false) => list[0] = entry,
    }
    changed
}

/// The contact's written fields with the member's identity and mapped values applied: an
/// email address, or for a phone member (`tel:…`) its number, and then no email at all.
fn merge(
    mut fields: Map<String, Value>,
    address: &str,
    values: &[(Field, Option<String>)],
) -> std::result::Result<Map<String, Value>, String> {
    let value = |field: &Field| {
        values
            .iter()
            .find(|(f, _)| f == field)
            .map(|(_, v)| v.as_deref())
    };
    let number = address.strip_prefix("tel:");
    match number {
        Some(number) => {
            let phones = entries(&mut fields, "phoneNumbers");
            if !entry_values_of(phones).any(|v| phone_identity(v).as_deref() == Some(address)) {
                // Written as the CRM writes it when the mapped phone is this number; first, as
                // the number the contact is known by.
                let written = value(&Field::Phone)
                    .flatten()
                    .filter(|v| phone_identity(v).as_deref() == Some(address))
                    .unwrap_or(number);
                phones.insert(0, json!({"value": written}));
            }
        }
        None => {
            let emails = entries(&mut fields, "emailAddresses");
            if !entry_values_of(emails).any(|v| v.trim().eq_ignore_ascii_case(address)) {
                emails.push(json!({"value": address}));
            }
        }
    }
    let name_parts: Vec<(&str, Option<&str>)> = [
        ("givenName", Field::GivenName),
        ("middleName", Field::MiddleName),
        ("familyName", Field::FamilyName),
    ]
    .iter()
    .filter_map(|(part, field)| value(field).map(|v| (*part, v)))
    .collect();
    if set_parts(&mut fields, "names", &name_parts) {
        // Google derives the one-line name from the parts; a stale one would win over them.
        let names = entries(&mut fields, "names");
        let emptied = names
            .first_mut()
            .and_then(Value::as_object_mut)
            .map(|name| {
                name.remove("unstructuredName");
                name.is_empty()
            });
        if emptied == Some(true) {
            names.remove(0);
        }
    }
    let org_parts: Vec<(&str, Option<&str>)> = [
        ("name", Field::Organization),
        ("department", Field::Department),
        ("title", Field::JobTitle),
    ]
    .iter()
    .filter_map(|(part, field)| value(field).map(|v| (*part, v)))
    .collect();
    set_parts(&mut fields, "organizations", &org_parts);
    if let Some(wanted) = value(&Field::Birthday) {
        let list = match wanted {
            Some(text) => vec![json!({"date": birthday(text)?})],
            None => Vec::new(),
        };
        fields.insert("birthdays".into(), Value::Array(list));
    }
    if let Some(wanted) = value(&Field::Biography) {
        let list = match wanted {
            Some(text) => vec![json!({"value": text, "contentType": "TEXT_PLAIN"})],
            None => Vec::new(),
        };
        fields.insert("biographies".into(), Value::Array(list));
    }
    if let Some(wanted) = value(&Field::Phone) {
        set_owned(
            &mut fields,
            "phoneNumbers",
            "value",
            wanted,
            same_phone,
            number,
        );
    }
    if let Some(wanted) = value(&Field::Url) {
        set_owned(&mut fields, "urls", "value", wanted, same_url, None);
    }
    if let Some(wanted) = value(&Field::Address) {
        set_owned(
            &mut fields,
            "addresses",
            "formattedValue",
            wanted,
            same_text,
            None,
        );
    }
    for (field, wanted) in values {
        let Field::Custom(key) = field else { continue };
        let list = entries(&mut fields, "userDefined");
        let at = list.iter().position(|e| e["key"] == key.as_str());
        match (at, wanted) {
            (Some(i), Some(v)) => list[i] = json!({"key": key, "value": v}),
            (None, Some(v)) => list.push(json!({"key": key, "value": v})),
            (Some(i), None) => {
                list.remove(i);
            }
            (None, None) => {}
        }
    }
    fields.retain(|_, v| v.as_array().is_none_or(|a| !a.is_empty()));
    Ok(fields)
}

/// The person fields whose value differs.
fn changed_fields(
    before: &Map<String, Value>,
    after: &Map<String, Value>,
) -> BTreeSet<&'static str> {
    WRITTEN_FIELDS
        .iter()
        .copied()
        .filter(|f| before.get(*f) != after.get(*f))
        .collect()
}

fn memberships(person: &Value) -> BTreeSet<String> {
    person["memberships"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["contactGroupMembership"]["contactGroupResourceName"].as_str())
        .map(str::to_string)
        .collect()
}

/// An update of one contact: the person as read, and the members (indices) it serves.
struct Update {
    person: Value,
    members: Vec<usize>,
}

/// A contact to write: its fields after the merge, and which of them changed.
struct Write {
    name: String,
    update: Update,
    fields: Map<String, Value>,
    changed: BTreeSet<&'static str>,
}

/// The body of an update: resource name, etag and contact source (Google checks it against
/// the contact's), and the fields in the mask, cleared when absent.
fn update_body(person: &Value, fields: &Map<String, Value>, mask: &BTreeSet<&str>) -> Value {
    let sources: Vec<Value> = person["metadata"]["sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["type"] == "CONTACT")
        .map(|s| json!({"type": "CONTACT", "id": s["id"], "etag": s["etag"]}))
        .collect();
    let mut body = json!({
        "resourceName": person["resourceName"],
        "etag": person["etag"],
        "metadata": {"sources": sources},
    });
    for field in mask {
        body[*field] = fields.get(*field).cloned().unwrap_or_else(|| json!([]));
    }
    body
}

// ---------------------------------------------------------------------------------------------
// Calls

impl GoogleContacts {
    fn new(config: &Config) -> GoogleContacts {
        let secret = |key: &str| config.secret(key).unwrap_or_default().to_string();
        let token_url = match (config.setting("token_url"), config.setting("base_url")) {
            (Some(url), _) => url.to_string(),
            (None, Some(_)) => format!("{}/token", config.base_url(API)),
            (None, None) => TOKEN_URL.to_string(),
        };
        GoogleContacts {
            api: format!("{}/v1", config.base_url(API)),
            token_url,
            client_id: secret("client_id"),
            client_secret: secret("client_secret"),
            refresh_token: secret("refresh_token"),
            token: BearerToken::default(),
            directory: None,
        }
    }

    fn send(&mut self, http: &mut Http, operation: &str, request: Request) -> Result<Response> {
        let (url, id, secret, refresh) = (
            &self.token_url,
            &self.client_id,
            &self.client_secret,
            &self.refresh_token,
        );
        self.token.send(http, operation, request, |http| {
            refresh_access_token(http, url, id, secret, refresh)
        })
    }

    /// Sends and classifies: 401 → Auth; 403 → Auth unless it is a quota; 408/429/5xx →
    /// Transient; other errors are returned for the caller to interpret.
    fn call(&mut self, http: &mut Http, operation: &str, request: Request) -> Result<Answer> {
        let response = self.send(http, operation, request)?;
        if response.is_success() {
            return Ok(Ok(response.json()?));
        }
        let error = ApiError::parse(&response);
        match response.status {
            401 => Err(ProviderError::Auth(error.to_string())),
            // PERMISSION_DENIED: the contacts scope was not granted, or the API is disabled.
            403 if !error.is_rate_limit() => Err(ProviderError::Auth(error.to_string())),
            403 | 408 | 425 | 429 | 500..=599 => Err(ProviderError::Transient {
                message: error.to_string(),
                retry_after: response.retry_after(),
            }),
            _ => Ok(Err(error)),
        }
    }

    fn get(&mut self, http: &mut Http, operation: &str, path: &str) -> Result<Answer> {
        let request = Request::new(Method::Get, format!("{}{path}", self.api));
        self.call(http, operation, request)
    }

    fn post(
        &mut self,
        http: &mut Http,
        operation: &str,
        path: &str,
        body: &Value,
    ) -> Result<Answer> {
        let request = Request::new(Method::Post, format!("{}{path}", self.api)).json(body);
        self.call(http, operation, request)
    }

    /// The contact groups: resource name → (name, whether a user group).
    fn groups(&mut self, http: &mut Http) -> Result<BTreeMap<String, (String, bool)>> {
        let mut groups = BTreeMap::new();
        let mut page: Option<String> = None;
        loop {
            let mut path =
                format!("/contactGroups?pageSize={PAGE_SIZE}&groupFields=name%2CgroupType");
            if let Some(token) = &page {
                path.push_str(&format!("&pageToken={}", percent_encode(token)));
            }
            let body = self
                .get(http, "list contact groups", &path)?
                .map_err(|e| e.rejected())?;
            for group in body["contactGroups"].as_array().into_iter().flatten() {
                if let Some(rn) = group["resourceName"].as_str() {
                    let name = group["name"].as_str().unwrap_or("").to_string();
                    let user = group["groupType"] == "USER_CONTACT_GROUP";
                    groups.insert(rn.to_string(), (name, user));
                }
            }
            page = body["nextPageToken"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if page.is_none() {
                return Ok(groups);
            }
        }
    }
}

/// The account's contact groups, listed once for the binding's group and its tags, and kept
/// current as groups are created.
struct ContactGroups<'a> {
    google: &'a mut GoogleContacts,
    /// Resource name → (name, whether a user group).
    groups: BTreeMap<String, (String, bool)>,
}

impl kit::ListDirectory for ContactGroups<'_> {
    const KIND: &'static str = "contact group";
    const PROVIDER: &'static str = "Google Contacts";

    /// A group given by id is stored as its resource name.
    fn list_by_id(&mut self, _: &mut Http, id: &str) -> Result<Option<String>> {
        let rn = group_name(id);
        match self.groups.get(&rn) {
            Some((_, true)) => Ok(Some(rn)),
            Some((name, false)) => Err(ProviderError::Binding(format!(
                "{rn} (\"{name}\") is a system group of Google Contacts: bind to a label of your own"
            ))),
            None => Ok(None),
        }
    }

    /// Only user groups: a system group of the same name is not the binding's.
    fn list_by_name(&mut self, _: &mut Http, name: &str) -> Result<Option<String>> {
        Ok(self
            .groups
            .iter()
            .find(|(_, (n, user))| *user && n == name)
            .map(|(rn, _)| rn.clone()))
    }

    fn create_list(&mut self, http: &mut Http, name: &str) -> Result<String> {
        let body = json!({"contactGroup": {"name": name}, "readGroupFields": "name,groupType"});
        match self
            .google
            .post(http, "create contact group", "/contactGroups", &body)?
        {
            Ok(group) => {
                let rn = group["resourceName"].as_str().unwrap_or("").to_string();
                if rn.is_empty() {
                    return Err(transient(format!(
                        "Google created contact group \"{name}\" without a resource name"
                    )));
                }
                self.groups.insert(rn.clone(), (name.to_string(), true));
                Ok(rn)
            }
            // Created meanwhile (another worker, the user): use it.
            Err(e) if e.http == 409 => {
                self.groups = self.google.groups(http)?;
                self.list_by_name(http, name)?.ok_or_else(|| {
                    ProviderError::Binding(format!("cannot create contact group \"{name}\": {e}"))
                })
            }
            Err(e) => Err(ProviderError::Binding(format!(
                "cannot create contact group \"{name}\": {e}"
            ))),
        }
    }
}

impl GoogleContacts {
    /// One pass over `people/me/connections`, in full or since a sync token. The inner error
    /// is Google's refusal (an expired sync token, typically).
    fn list_contacts(
        &mut self,
        http: &mut Http,
        since: Option<&str>,
    ) -> Result<std::result::Result<Listing, ApiError>> {
        let mut listing = Listing {
            people: Vec::new(),
            sync_token: None,
        };
        let mut page: Option<String> = None;
        loop {
            let mut path = format!(
                "/people/me/connections?personFields=emailAddresses%2Cmetadata%2CphoneNumbers&pageSize={PAGE_SIZE}&requestSyncToken=true"
            );
            if let Some(token) = since {
                path.push_str(&format!("&syncToken={}", percent_encode(token)));
            }
            if let Some(token) = &page {
                path.push_str(&format!("&pageToken={}", percent_encode(token)));
            }
            let body = match self.get(http, "list contacts", &path)? {
                Ok(body) => body,
                Err(e) => return Ok(Err(e)),
            };
            for person in body["connections"].as_array().into_iter().flatten() {
                let Some(rn) = person["resourceName"].as_str() else {
                    continue;
                };
                let identities =
                    (person["metadata"]["deleted"] != true).then(|| identities_of(person));
                listing.people.push((rn.to_string(), identities));
            }
            page = body["nextPageToken"]
                .as_str()
                .filter(|t| !t.is_empty())
                .map(str::to_string);
            if page.is_none() {
                listing.sync_token = body["nextSyncToken"].as_str().map(str::to_string);
                return Ok(Ok(listing));
            }
        }
    }

    /// Brings the directory up to date: the changes since its sync token, or everything when
    /// there is none or Google no longer honours it (tokens expire after 7 days).
    fn refresh_directory(&mut self, http: &mut Http) -> Result<&Directory> {
        let token = self.directory.as_ref().and_then(|d| d.sync_token.clone());
        if let Some(token) = token
            && let Ok(changes) = self.list_contacts(http, Some(&token))?
        {
            let directory = self.directory.get_or_insert_with(Directory::default);
            directory.apply(changes);
            return Ok(directory);
        }
        let listing = self.list_contacts(http, None)?.map_err(|e| e.rejected())?;
        let mut directory = Directory::default();
        directory.apply(listing);
        Ok(self.directory.insert(directory))
    }

    fn forget(&mut self, person: &str) {
        if let Some(directory) = &mut self.directory {
            directory.drop_person(person);
        }
    }

    fn remember(&mut self, person: &str, fields: &Map<String, Value>) {
        if let Some(directory) = &mut self.directory {
            directory.put(person, identities_of(&Value::Object(fields.clone())));
        }
    }

    /// Reads contacts as the sync needs them; the answer is keyed by the requested name (a
    /// contact's own name can change when Google links it to a profile). Unknown ones are
    /// absent.
    fn fetch(&mut self, http: &mut Http, names: &[String]) -> Result<HashMap<String, Value>> {
        let unique: BTreeSet<&String> = names.iter().collect();
        let unique: Vec<&String> = unique.into_iter().collect();
        let mut found = HashMap::new();
        for batch in chunks(&unique, BATCH) {
            let mut path = format!(
                "/people:batchGet?personFields={}&sources=READ_SOURCE_TYPE_CONTACT",
                percent_encode(READ_FIELDS)
            );
            for name in batch {
                path.push_str(&format!("&resourceNames={}", percent_encode(name)));
            }
            let body = self
                .get(http, "read contacts", &path)?
                .map_err(|e| e.rejected())?;
            for answer in body["responses"].as_array().into_iter().flatten() {
                let ok = answer["status"]["code"].as_i64().unwrap_or(0) == 0;
                let person = &answer["person"];
                let requested = answer["requestedResourceName"]
                    .as_str()
                    .or(person["resourceName"].as_str());
                if let (true, Some(requested), true) = (ok, requested, person.is_object()) {
                    found.insert(requested.to_string(), person.clone());
                }
            }
        }
        Ok(found)
    }

    /// `members:modify` in calls of at most 1000 names: (not found, not removable).
    fn modify(
        &mut self,
        http: &mut Http,
        group: &str,
        add: &[String],
        remove: &[String],
    ) -> Result<(BTreeSet<String>, BTreeSet<String>)> {
        let (mut missing, mut kept) = (BTreeSet::new(), BTreeSet::new());
        let names: Vec<(bool, &String)> = add
            .iter()
            .map(|n| (true, n))
            .chain(remove.iter().map(|n| (false, n)))
            .collect();
        for batch in chunks(&names, MODIFY_BATCH) {
            let to_add: Vec<&String> = batch.iter().filter(|(a, _)| *a).map(|(_, n)| *n).collect();
            let to_remove: Vec<&String> =
                batch.iter().filter(|(a, _)| !*a).map(|(_, n)| *n).collect();
            let body = json!({"resourceNamesToAdd": to_add, "resourceNamesToRemove": to_remove});
            let answer = self.post(
                http,
                if to_add.is_empty() {
                    "remove from contact group"
                } else {
                    "add to contact group"
                },
                &format!("/{group}/members:modify"),
                &body,
            )?;
            let answer = match answer {
                Ok(answer) => answer,
                Err(e) if e.http == 404 => {
                    return Err(ProviderError::Binding(format!(
                        "contact group {group} no longer exists at Google Contacts: {e}"
                    )));
                }
                Err(e) => return Err(e.rejected()),
            };
            let listed = |key: &str| -> Vec<String> {
                answer[key]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            };
            missing.extend(listed("notFoundResourceNames"));
            kept.extend(listed("canNotRemoveLastContactGroupResourceNames"));
        }
        Ok((missing, kept))
    }

    /// Deletes contacts, 500 per call; when Google refuses a batch (one of them gone meanwhile,
    /// say), one by one. Returns the ones that could not be deleted, with Google's words.
    fn delete(&mut self, http: &mut Http, people: &[String]) -> Result<HashMap<String, String>> {
        let mut failed = HashMap::new();
        for batch in chunks(people, DELETE_BATCH) {
            let body = json!({"resourceNames": batch});
            if self
                .post(
                    http,
                    "delete contacts",
                    "/people:batchDeleteContacts",
                    &body,
                )?
                .is_err()
            {
                for person in batch {
                    let request = Request::new(
                        Method::Delete,
                        format!("{}/{person}:deleteContact", self.api),
                    );
                    match self.call(http, "delete contact", request)? {
                        Err(e) if e.http != 404 => {
                            failed.insert(person.clone(), e.to_string());
                        }
                        _ => {}
                    }
                }
            }
            for person in batch {
                if !failed.contains_key(person) {
                    self.forget(person);
                }
            }
        }
        Ok(failed)
    }

    /// The people the members are known by: the recorded remote id, else the directory.
    fn resolve(&mut self, http: &mut Http, members: &[Member]) -> Result<Vec<Option<String>>> {
        let mut names: Vec<Option<String>> = members
            .iter()
            .map(|m| m.remote_id.clone().filter(|r| r.starts_with("people/")))
            .collect();
        if names.iter().any(Option::is_none) {
            let directory = self.refresh_directory(http)?;
            for (name, member) in names.iter_mut().zip(members) {
                if name.is_none() {
                    *name = directory.holders(&member.address).first().cloned();
                }
            }
        }
        Ok(names)
    }
}

// ---------------------------------------------------------------------------------------------
// Upsert

impl GoogleContacts {
    fn upsert_batch(
        &mut self,
        http: &mut Http,
        groups: &[String],
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; members.len()];
        let mut values = Vec::with_capacity(members.len());
        for (i, member) in members.iter().enumerate() {
            match wanted(member) {
                Ok(v) => values.push(v),
                Err(message) => {
                    outcomes[i] = Some(Outcome::Failed { message });
                    values.push(Vec::new());
                }
            }
        }
        let live: Vec<usize> = (0..members.len())
            .filter(|i| outcomes[*i].is_none())
            .collect();

        // Who is who: recorded ids first; the directory for new addresses and for contacts
        // deleted at Google since.
        let mut names: Vec<Option<String>> = members
            .iter()
            .map(|m| m.remote_id.clone().filter(|r| r.starts_with("people/")))
            .collect();
        let known: Vec<String> = live.iter().filter_map(|i| names[*i].clone()).collect();
        let mut people = self.fetch(http, &known)?;
        for i in &live {
            if let Some(name) = names[*i].clone().filter(|n| !people.contains_key(n)) {
                self.forget(&name);
                names[*i] = None;
            }
        }
        let unresolved: Vec<usize> = live
            .iter()
            .copied()
            .filter(|i| names[*i].is_none())
            .collect();
        if !unresolved.is_empty() {
            let directory = self.refresh_directory(http)?;
            for i in &unresolved {
                names[*i] = directory.holders(&members[*i].address).first().cloned();
            }
            let found: Vec<String> = unresolved
                .iter()
                .filter_map(|i| names[*i].clone())
                .collect();
            people.extend(self.fetch(http, &found)?);
            for i in &unresolved {
                if names[*i].as_ref().is_some_and(|n| !people.contains_key(n)) {
                    names[*i] = None;
                }
            }
        }

        let mut updates: BTreeMap<String, Update> = BTreeMap::new();
        let mut creates: Vec<(usize, Map<String, Value>)> = Vec::new();
        for i in live {
            match names[i].clone() {
                Some(name) => {
                    let person = people[&name].clone();
                    updates
                        .entry(name)
                        .or_insert_with(|| Update {
                            person,
                            members: Vec::new(),
                        })
                        .members
                        .push(i);
                }
                None => match merge(Map::new(), &members[i].address, &values[i]) {
                    Ok(fields) => creates.push((i, fields)),
                    Err(message) => outcomes[i] = Some(Outcome::Failed { message }),
                },
            }
        }

        self.create(http, groups, members, creates, &mut outcomes)?;
        let settled = self.update(http, members, &values, updates, &mut outcomes)?;
        self.join_groups(http, groups, settled, &mut outcomes)?;
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| retry("Google did not report this contact")))
            .collect())
    }

    /// Creates contacts in the binding's groups, within the account's cap.
    fn create(
        &mut self,
        http: &mut Http,
        groups: &[String],
        members: &[Member],
        mut creates: Vec<(usize, Map<String, Value>)>,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<()> {
        if creates.is_empty() {
            return Ok(());
        }
        let held = self.directory.as_ref().map_or(0, |d| d.people.len());
        let room = CONTACT_LIMIT.saturating_sub(held);
        for (i, _) in creates.iter().skip(room) {
            outcomes[*i] = Some(Outcome::Failed {
                message: format!(
                    "not created: a Google account holds at most {CONTACT_LIMIT} contacts and this one has {held}"
                ),
            });
        }
        creates.truncate(room);
        if creates.is_empty() {
            return Ok(());
        }
        let memberships: Vec<Value> = groups
            .iter()
            .map(|g| json!({"contactGroupMembership": {"contactGroupResourceName": g}}))
            .collect();
        let people: Vec<Value> = creates
            .iter_mut()
            .map(|(_, fields)| {
                set_client_data(fields, CREATED_KEY, Some("true"));
                let mut person = Value::Object(fields.clone());
                person["memberships"] = Value::Array(memberships.clone());
                person
            })
            .collect();
        let body = json!({
            "contacts": people.iter().map(|p| json!({"contactPerson": p})).collect::<Vec<_>>(),
            "readMask": "emailAddresses,metadata,phoneNumbers",
        });
        match self.post(
            http,
            "create contacts",
            "/people:batchCreateContacts",
            &body,
        )? {
            Ok(answer) => {
                // Matched by identity: Google answers in request order, but says so nowhere. A
                // new contact's first identity is its member's (see `merge`); a later one can be
                // another member's too (a mapped phone that is another row's identity).
                let mut created: HashMap<String, String> = HashMap::new();
                for entry in answer["createdPeople"].as_array().into_iter().flatten() {
                    let person = &entry["person"];
                    if let (Some(rn), Some(identity)) = (
                        person["resourceName"].as_str(),
                        identities_of(person).into_iter().next(),
                    ) {
                        created.insert(identity, rn.to_string());
                    }
                }
                for (i, fields) in &creates {
                    if let Some(rn) = created.get(&members[*i].address.to_lowercase()) {
                        self.remember(rn, fields);
                        outcomes[*i] = Some(member(rn.clone()));
                    }
                }
            }
            // One invalid contact fails the whole batch: find it by creating one at a time.
            Err(_) => {
                for (person, (i, fields)) in people.iter().zip(&creates) {
                    let request = Request::new(
                        Method::Post,
                        format!("{}/people:createContact?personFields=metadata", self.api),
                    )
                    .json(person);
                    outcomes[*i] = Some(match self.call(http, "create contact", request)? {
                        Ok(created) => match created["resourceName"].as_str() {
                            Some(rn) => {
                                self.remember(rn, fields);
                                member(rn.to_string())
                            }
                            None => retry("Google created the contact without a resource name"),
                        },
                        Err(e) => Outcome::Failed {
                            message: e.to_string(),
                        },
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes the mapped fields of existing contacts with their etags. Returns the contacts
    /// now right, by name (a name may change on update), with the members they serve.
    fn update(
        &mut self,
        http: &mut Http,
        members: &[Member],
        values: &[Vec<(Field, Option<String>)>],
        updates: BTreeMap<String, Update>,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<Vec<(String, Value, Vec<usize>)>> {
        let plan = |person: &Value, served: &[usize]| {
            let before = contact_fields(person);
            let mut after = before.clone();
            for i in served {
                after = merge(after, &members[*i].address, &values[*i])?;
            }
            let changed = changed_fields(&before, &after);
            Ok::<_, String>((after, changed))
        };
        let mut settled = Vec::new();
        let mut pending: Vec<Write> = Vec::new();
        for (name, update) in updates {
            match plan(&update.person, &update.members) {
                Err(message) => {
                    for i in &update.members {
                        outcomes[*i] = Some(Outcome::Failed {
                            message: message.clone(),
                        });
                    }
                }
                Ok((_, changed)) if changed.is_empty() => {
                    settled.push((name, update.person, update.members));
                }
                Ok((fields, changed)) => pending.push(Write {
                    name,
                    update,
                    fields,
                    changed,
                }),
            }
        }
        if pending.is_empty() {
            return Ok(settled);
        }
        let mask: BTreeSet<&str> = pending
            .iter()
            .flat_map(|w| w.changed.iter().copied())
            .collect();
        let contacts: Map<String, Value> = pending
            .iter()
            .map(|w| {
                (
                    w.name.clone(),
                    update_body(&w.update.person, &w.fields, &mask),
                )
            })
            .collect();
        let body = json!({
            "contacts": contacts,
            "updateMask": mask.iter().copied().collect::<Vec<_>>().join(","),
            "readMask": "emailAddresses,memberships,metadata",
        });
        if let Ok(answer) = self.post(
            http,
            "update contacts",
            "/people:batchUpdateContacts",
            &body,
        )? {
            for Write {
                name,
                update,
                fields,
                ..
            } in pending
            {
                let person = &answer["updateResult"][&name]["person"];
                let current = person["resourceName"].as_str().unwrap_or(&name).to_string();
                if current != name {
                    self.forget(&name);
                }
                self.remember(&current, &fields);
                settled.push((current, update.person, update.members));
            }
            return Ok(settled);
        }
        // Google refused the batch (a stale etag: the user edited a contact meanwhile; or one
        // invalid contact): one at a time, re-reading a contact whose etag went stale.
        for Write {
            name,
            mut update,
            mut fields,
            mut changed,
        } in pending
        {
            let mut attempts = 0;
            let result = loop {
                attempts += 1;
                let path = format!(
                    "{}/{name}:updateContact?updatePersonFields={}&personFields=memberships%2Cmetadata",
                    self.api,
                    percent_encode(&changed.iter().copied().collect::<Vec<_>>().join(","))
                );
                let request = Request::new(Method::Patch, path).json(&update_body(
                    &update.person,
                    &fields,
                    &changed,
                ));
                match self.call(http, "update contact", request)? {
                    Ok(person) => break Ok(person),
                    Err(e) if e.is_stale_etag() && attempts == 1 => {
                        let Some(fresh) =
                            self.fetch(http, std::slice::from_ref(&name))?.remove(&name)
                        else {
                            break Err(retry(format!(
                                "the contact was deleted at Google meanwhile: {e}"
                            )));
                        };
                        update.person = fresh;
                        match plan(&update.person, &update.members) {
                            Ok((_, c)) if c.is_empty() => break Ok(update.person.clone()),
                            Ok((f, c)) => (fields, changed) = (f, c),
                            Err(message) => break Err(Outcome::Failed { message }),
                        }
                    }
                    Err(e) if e.is_stale_etag() => break Err(retry(e.to_string())),
                    Err(e) if e.http == 404 => {
                        self.forget(&name);
                        break Err(retry(format!(
                            "the contact was deleted at Google meanwhile: {e}"
                        )));
                    }
                    Err(e) => {
                        break Err(Outcome::Failed {
                            message: e.to_string(),
                        });
                    }
                }
            };
            match result {
                Ok(person) => {
                    let current = person["resourceName"].as_str().unwrap_or(&name).to_string();
                    if current != name {
                        self.forget(&name);
                    }
                    self.remember(&current, &fields);
                    settled.push((current, update.person, update.members));
                }
                Err(outcome) => {
                    for i in &update.members {
                        outcomes[*i] = Some(outcome.clone());
                    }
                }
            }
        }
        Ok(settled)
    }

    /// Adds existing contacts to the binding's groups they are not in yet.
    fn join_groups(
        &mut self,
        http: &mut Http,
        groups: &[String],
        settled: Vec<(String, Value, Vec<usize>)>,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<()> {
        let mut missing = BTreeSet::new();
        for group in groups {
            let joining: Vec<String> = settled
                .iter()
                .filter(|(_, person, _)| !memberships(person).contains(group))
                .map(|(name, _, _)| name.clone())
                .collect();
            if !joining.is_empty() {
                missing.extend(self.modify(http, group, &joining, &[])?.0);
            }
        }
        for (name, _, served) in settled {
            for i in served {
                outcomes[i] = Some(if missing.contains(&name) {
                    self.forget(&name);
                    retry("the contact was deleted at Google meanwhile")
                } else {
                    member(name.clone())
                });
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Leaving and erasing

impl GoogleContacts {
    /// Takes contacts out of the binding's group (they stay): one outcome per name.
    fn leave_group(
        &mut self,
        http: &mut Http,
        group: &str,
        names: &[Option<String>],
    ) -> Result<Vec<Outcome>> {
        let leaving: Vec<String> = names
            .iter()
            .flatten()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let (_, kept) = if leaving.is_empty() {
            Default::default()
        } else {
            self.modify(http, group, &[], &leaving)?
        };
        Ok(names
            .iter()
            .map(|name| match name {
                Some(name) if kept.contains(name) => Outcome::Failed {
                    message: format!(
                        "Google keeps every contact in at least one group and {group} is the last one of {name}"
                    ),
                },
                _ => Outcome::Removed,
            })
            .collect())
    }

    /// Deletes the contacts the sync created and nothing else holds; the others only leave the
    /// binding's group.
    fn delete_members(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let group = list_group(binding)?;
        let mut ours: BTreeSet<String> = tag_groups(binding).into_iter().collect();
        ours.insert(group.clone());
        ours.insert(MY_CONTACTS.to_string());
        let names = self.resolve(http, members)?;
        let known: Vec<String> = names.iter().flatten().cloned().collect();
        let people = self.fetch(http, &known)?;
        let (mut deleting, mut leaving) = (BTreeSet::new(), Vec::new());
        for (i, name) in names.iter().enumerate() {
            let Some((name, person)) = name.as_ref().and_then(|n| Some((n, people.get(n)?))) else {
                continue;
            };
            let created = client_data(&contact_fields(person), CREATED_KEY).is_some();
            if created && memberships(person).is_subset(&ours) {
                deleting.insert(name.clone());
            } else {
                leaving.push((i, Some(name.clone())));
            }
        }
        let deleting: Vec<String> = deleting.into_iter().collect();
        let failed = self.delete(http, &deleting)?;
        let leaving_names: Vec<Option<String>> = leaving.iter().map(|(_, n)| n.clone()).collect();
        let left = self.leave_group(http, &group, &leaving_names)?;
        let mut outcomes: Vec<Outcome> = names
            .iter()
            .map(|name| match name.as_ref().and_then(|n| failed.get(n)) {
                Some(message) => Outcome::Failed {
                    message: message.clone(),
                },
                None => Outcome::Removed,
            })
            .collect();
        for ((i, _), outcome) in leaving.into_iter().zip(left) {
            outcomes[i] = outcome;
        }
        Ok(outcomes)
    }
}

impl Provider for GoogleContacts {
    fn limits(&self) -> Limits {
        // People API quotas are per minute, per project and per user, set in the Cloud
        // Console; Google answers 429 RESOURCE_EXHAUSTED beyond them, which the engine backs
        // off from. A connection makes one call at a time (one delivery thread each), as Google asks for mutations.
        Limits {
            upsert_batch: BATCH,
            remove_batch: DELETE_BATCH,
            rate: None,
        }
    }

    fn check(&mut self, http: &mut Http) -> Result<Value> {
        let groups = self
            .get(http, "list contact groups", "/contactGroups?pageSize=1")?
            .map_err(|e| e.rejected())?;
        let contacts = self
            .get(
                http,
                "count contacts",
                "/people/me/connections?personFields=metadata&pageSize=1",
            )?
            .map_err(|e| e.rejected())?;
        Ok(json!({
            "provider": "google_contacts",
            "contact_groups": groups["totalItems"],
            "contacts": contacts["totalItems"],
            "contact_limit": CONTACT_LIMIT,
        }))
    }

    fn prepare(&mut self, http: &mut Http, binding: &mut Binding) -> Result<()> {
        let mut groups = ContactGroups {
            groups: self.groups(http)?,
            google: self,
        };
        let list = kit::resolve_list(http, &mut groups, binding)?;
        let mut tags = Map::new();
        for tag in &binding.tags {
            let rn = groups.find_or_create(http, tag)?;
            tags.insert(tag.clone(), json!(rn));
        }
        binding.list_id = Some(list);
        binding
            .remote
            .insert("tag_groups".into(), Value::Object(tags));
        Ok(())
    }

    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let list = list_group(binding)?;
        let mut groups = vec![list.clone()];
        groups.extend(tag_groups(binding).into_iter().filter(|g| *g != list));
        self.upsert_batch(http, &groups, members)
    }

    fn remove(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        action: LeaveAction,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        match action {
            LeaveAction::Remove => {
                let names = self.resolve(http, members)?;
                self.leave_group(http, &list_group(binding)?, &names)
            }
            LeaveAction::Delete => self.delete_members(http, binding, members),
            other => Err(ProviderError::Binding(format!(
                "Google Contacts cannot {}: it has no consent state (on_leave may be remove, delete or keep)",
                other.as_str()
            ))),
        }
    }

    /// Deletes every contact holding the address (and the one recorded for it), whoever
    /// created it: an erasure request covers all the copies.
    fn erase(
        &mut self,
        http: &mut Http,
        _binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(members.len());
        let directory = self.refresh_directory(http)?;
        let holders: Vec<BTreeSet<String>> = members
            .iter()
            .map(|m| {
                let mut people: BTreeSet<String> =
                    directory.holders(&m.address).iter().cloned().collect();
                people.extend(m.remote_id.clone().filter(|r| r.starts_with("people/")));
                people
            })
            .collect();
        let all: Vec<String> = holders
            .iter()
            .flatten()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let failed = self.delete(http, &all)?;
        outcomes.extend(holders.iter().map(
            |people| match people.iter().find_map(|p| failed.get(p)) {
                Some(message) => Outcome::Failed {
                    message: message.clone(),
                },
                None => Outcome::Removed,
            },
        ));
        Ok(outcomes)
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    fn config(settings: Value) -> Config {
        Config {
            settings: serde_json::from_value(settings).unwrap(),
            secrets: serde_json::from_value(
                json!({"client_id": "id", "client_secret": "secret", "refresh_token": "refresh"}),
            )
            .unwrap(),
        }
    }

    fn values(pairs: &[(&str, Value)]) -> Vec<(Field, Option<String>)> {
        let member = Member {
            address: "ann@example.com".into(),
            fields: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            remote_id: None,
        };
        wanted(&member).unwrap()
    }

    #[test]
    fn field_names_are_checked() {
        for name in [
            "given_name",
            "family_name",
            "phone",
            "job_title",
            "birthday",
            "user:crm_id",
        ] {
            assert!(field_name(name).is_ok(), "{name}");
        }
        for name in ["FNAME", "email", "user:", "user:  ", "phones"] {
            let e = field_name(name).unwrap_err();
            assert!(e.contains("given_name") && e.contains("user:<key>"), "{e}");
        }
    }

    #[test]
    fn token_endpoint_follows_the_settings() {
        assert_eq!(GoogleContacts::new(&config(json!({}))).token_url, TOKEN_URL);
        let emulated = GoogleContacts::new(&config(
            json!({"base_url": "http://127.0.0.1:9/google_contacts/"}),
        ));
        assert_eq!(
            emulated.token_url,
            "http://127.0.0.1:9/google_contacts/token"
        );
        assert_eq!(emulated.api, "http://127.0.0.1:9/google_contacts/v1");
        let explicit = GoogleContacts::new(&config(
            json!({"base_url": "http://127.0.0.1:9/x", "token_url": "http://127.0.0.1:8/t"}),
        ));
        assert_eq!(explicit.token_url, "http://127.0.0.1:8/t");
        assert!(validate(&config(json!({"token_url": "ftp://x"}))).is_err());
        assert!(validate(&config(json!({"token_url": "https://x/token"}))).is_ok());
        assert_eq!(
            super::super::validate_config(
                "google_contacts",
                &json!({}),
                &json!({"client_id": "i", "client_secret": "s"})
            )
            .unwrap_err(),
            "missing required key secrets.refresh_token"
        );
    }

    #[test]
    fn birthdays_with_and_without_a_year() {
        assert_eq!(
            birthday("1990-07-14").unwrap(),
            json!({"year": 1990, "month": 7, "day": 14})
        );
        assert_eq!(birthday("1990-07-14T00:00:00").unwrap()["day"], 14);
        assert_eq!(birthday("--02-29").unwrap(), json!({"month": 2, "day": 29}));
        for bad in ["14.07.1990", "1990-13-01", "--2-29", "yesterday", ""] {
            assert!(birthday(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_new_contact_gets_the_address_and_the_mapped_fields() {
        let merged = merge(
            Map::new(),
            "ann@example.com",
            &values(&[
                ("given_name", json!("Ann")),
                ("family_name", json!("Lee")),
                ("middle_name", json!("  ")),
                ("phone", json!(79161234567u64)),
                ("job_title", json!("CTO")),
                ("birthday", json!("1990-07-14")),
                ("biography", json!(null)),
                ("user:crm_id", json!(42)),
            ]),
        )
        .unwrap();
        assert_eq!(
            Value::Object(merged),
            json!({
                "emailAddresses": [{"value": "ann@example.com"}],
                "names": [{"givenName": "Ann", "familyName": "Lee"}],
                "organizations": [{"title": "CTO"}],
                "birthdays": [{"date": {"year": 1990, "month": 7, "day": 14}}],
                "phoneNumbers": [{"value": "79161234567"}],
                "clientData": [{"key": "pg_listsync.phoneNumbers", "value": "79161234567"}],
                "userDefined": [{"key": "crm_id", "value": "42"}],
            })
        );
    }

    #[test]
    fn only_the_mapped_parts_and_our_own_entries_change() {
        let person = json!({
            "names": [{"givenName": "Ann", "middleName": "Q", "familyName": "Lee", "unstructuredName": "Ann Q Lee",
                       "displayName": "Ann Q Lee", "metadata": {"primary": true, "source": {"type": "CONTACT"}}}],
            "emailAddresses": [{"value": "Ann@Example.com"}, {"value": "ann@home.example", "formattedType": "Home", "type": "home"}],
            "phoneNumbers": [
                {"value": "+1 555 0100", "type": "mobile", "canonicalForm": "+15550100"},
                {"value": "+7 916 123-45-67", "type": "work"},
                {"value": "+1 555 0199", "metadata": {"source": {"type": "PROFILE"}}}
            ],
            "userDefined": [{"key": "shoe", "value": "42"}, {"key": "crm_id", "value": "1"}],
            "clientData": [{"key": "other.app", "value": "x"}, {"key": "pg_listsync.phoneNumbers", "value": "+79161234567"}],
        });
        let before = contact_fields(&person);
        assert_eq!(
            before["phoneNumbers"].as_array().unwrap().len(),
            2,
            "profile data is not the contact's"
        );
        let after = merge(
            before.clone(),
            "ann@example.com",
            &values(&[
                ("given_name", json!("Anna")),
                ("phone", json!("+7 (916) 000-00-00")),
                ("user:crm_id", json!("2")),
            ]),
        )
        .unwrap();
        assert_eq!(
            after["names"],
            json!([{"givenName": "Anna", "middleName": "Q", "familyName": "Lee"}])
        );
        assert_eq!(
            after["emailAddresses"], before["emailAddresses"],
            "the address was there, in another case"
        );
        assert_eq!(
            after["phoneNumbers"],
            json!([{"value": "+1 555 0100", "type": "mobile"}, {"value": "+7 (916) 000-00-00", "type": "work"}])
        );
        assert_eq!(
            after["userDefined"],
            json!([{"key": "shoe", "value": "42"}, {"key": "crm_id", "value": "2"}])
        );
        assert_eq!(
            after["clientData"],
            json!([{"key": "other.app", "value": "x"}, {"key": "pg_listsync.phoneNumbers", "value": "+7 (916) 000-00-00"}])
        );
        assert_eq!(
            changed_fields(&before, &after),
            BTreeSet::from(["names", "phoneNumbers", "userDefined", "clientData"])
        );
        let reformatted = merge(
            after.clone(),
            "ann@example.com",
            &values(&[("phone", json!("+79160000000"))]),
        )
        .unwrap();
        assert_eq!(
            reformatted["phoneNumbers"],
            json!([{"value": "+1 555 0100", "type": "mobile"}, {"value": "+79160000000", "type": "work"}]),
            "the same number as the CRM writes it now, in the same entry"
        );
    }

    #[test]
    fn a_number_the_contact_holds_is_not_added_twice() {
        let before =
            contact_fields(&json!({"phoneNumbers": [{"value": "+1 (555) 0100", "type": "home"}]}));
        let after = merge(
            before.clone(),
            "a@x.io",
            &values(&[("phone", json!("15550100"))]),
        )
        .unwrap();
        assert_eq!(after["phoneNumbers"], before["phoneNumbers"]);
        let cleared = merge(
            after,
            "a@x.io",
            &values(&[("phone", json!(null)), ("url", json!(""))]),
        )
        .unwrap();
        assert!(
            cleared.get("phoneNumbers").is_none(),
            "the number equal to the mapped value became the mapped field's: {cleared:?}"
        );
        let user_only =
            merge(before.clone(), "a@x.io", &values(&[("phone", json!(null))])).unwrap();
        assert_eq!(
            user_only["phoneNumbers"], before["phoneNumbers"],
            "never ours: kept"
        );
    }

    #[test]
    fn a_phone_member_holds_its_number_and_never_an_email() {
        let pia = "tel:+49301234567";
        let created = merge(Map::new(), pia, &values(&[("given_name", json!("Pia"))])).unwrap();
        assert_eq!(
            Value::Object(created),
            json!({"phoneNumbers": [{"value": "+49301234567"}], "names": [{"givenName": "Pia"}]})
        );
        let mapped = merge(
            Map::new(),
            pia,
            &values(&[("phone", json!("0049 30 123 45 67"))]),
        )
        .unwrap();
        assert_eq!(
            mapped["phoneNumbers"],
            json!([{"value": "0049 30 123 45 67"}]),
            "the number once, as the CRM writes it"
        );
        assert_eq!(
            merge(
                mapped.clone(),
                pia,
                &values(&[("phone", json!("0049 30 123 45 67"))])
            )
            .unwrap(),
            mapped,
            "nothing to write again"
        );
        let moved = merge(mapped, pia, &values(&[("phone", json!("+1 555 0100"))])).unwrap();
        assert_eq!(
            moved["phoneNumbers"],
            json!([{"value": "0049 30 123 45 67"}, {"value": "+1 555 0100"}]),
            "the number the contact is known by stays when the mapped one moves on"
        );
        let cleared = merge(moved, pia, &values(&[("phone", json!(null))])).unwrap();
        assert_eq!(
            Value::Object(cleared),
            json!({"phoneNumbers": [{"value": "0049 30 123 45 67"}]})
        );
        let found = contact_fields(&json!({
            "phoneNumbers": [{"value": "+7 916 000 00 00"}, {"value": "+49 (30) 123-45-67", "type": "mobile"}],
        }));
        let joined = merge(found.clone(), pia, &values(&[])).unwrap();
        assert_eq!(
            joined, found,
            "a contact holding the number, written otherwise, is left as it is"
        );
    }

    #[test]
    fn contacts_are_known_by_their_emails_else_their_numbers() {
        assert_eq!(
            identities_of(&json!({"emailAddresses": [{"value": " Ann@Example.com"}],
                                  "phoneNumbers": [{"value": "+49 30 1234567"}]})),
            ["ann@example.com"]
        );
        assert_eq!(
            identities_of(
                &json!({"phoneNumbers": [{"value": "0049 30 1234567"}, {"value": "ext. 12"},
                                                   {"value": "8 (916) 123-45-67"}]})
            ),
            ["tel:+49301234567", "tel:89161234567"]
        );
        assert!(identities_of(&json!({"names": [{"givenName": "Nobody"}]})).is_empty());
        assert!(same_phone("0049 30 1234567", "+49301234567"));
        assert!(!same_phone("0049 30 1234567", "+4930 1234568"));
    }

    #[test]
    fn clearing_the_name_removes_the_entry() {
        let before =
            contact_fields(&json!({"names": [{"givenName": "Ann", "unstructuredName": "Ann"}]}));
        let after = merge(before, "a@x.io", &values(&[("given_name", json!(null))])).unwrap();
        assert!(after.get("names").is_none(), "{after:?}");
        assert!(
            merge(
                Map::new(),
                "a@x.io",
                &values(&[("birthday", json!("soon"))])
            )
            .is_err()
        );
    }

    #[test]
    fn google_errors_are_read() {
        let response = |status, body: Value| Response {
            status,
            headers: vec![],
            body: body.to_string().into_bytes(),
        };
        let stale = ApiError::parse(&response(
            400,
            json!({"error": {"code": 400, "message": "Request person.etag is different", "status": "FAILED_PRECONDITION"}}),
        ));
        assert!(stale.is_stale_etag());
        assert_eq!(
            stale.to_string(),
            "HTTP 400 FAILED_PRECONDITION: Request person.etag is different"
        );
        let quota = ApiError::parse(&response(
            403,
            json!({"error": {"code": 403, "message": "Quota", "status": "PERMISSION_DENIED",
                             "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "RATE_LIMIT_EXCEEDED"}]}}),
        ));
        assert!(quota.is_rate_limit());
        let html = ApiError::parse(&Response {
            status: 502,
            headers: vec![],
            body: b"<html>Bad Gateway</html>".to_vec(),
        });
        assert_eq!(html.to_string(), "HTTP 502: <html>Bad Gateway</html>");
        let oauth = response(
            400,
            json!({"error": "invalid_grant", "error_description": "Token has been expired or revoked."}),
        );
        assert_eq!(
            oauth_problem(&oauth),
            "invalid_grant: Token has been expired or revoked."
        );
    }

    #[test]
    fn the_directory_follows_changes() {
        let mut directory = Directory::default();
        directory.apply(Listing {
            people: vec![
                ("people/c1".into(), Some(vec!["ann@example.com".into()])),
                (
                    "people/c2".into(),
                    Some(vec!["ann@example.com".into(), "bob@example.com".into()]),
                ),
            ],
            sync_token: Some("t1".into()),
        });
        assert_eq!(
            directory.holders("ANN@example.com"),
            ["people/c1", "people/c2"]
        );
        directory.apply(Listing {
            people: vec![
                ("people/c1".into(), None),
                ("people/c2".into(), Some(vec!["bob@example.com".into()])),
            ],
            sync_token: Some("t2".into()),
        });
        assert!(directory.holders("ann@example.com").is_empty());
        assert_eq!(directory.people.len(), 1);
        assert_eq!(directory.sync_token.as_deref(), Some("t2"));
    }
}

#[cfg(test)]
mod fake {
    use super::*;
    use crate::providers::conformance::{Erasure, Fake, WRONG_SECRET, conformance_suite};
    use crate::providers::test_support;
    use crate::providers::test_support::known_member as member;
    use listsync_emulator::{Emulator, Fault};

    fn http() -> Http {
        Http::local(Duration::from_secs(5))
    }

    fn provider(emulator: &Emulator) -> Box<dyn Provider> {
        provider_with_refresh_token(emulator, "refresh")
    }

    /// A provider of the account whose refresh token is `refresh`, presenting `refresh_token`.
    fn provider_with_refresh_token(emulator: &Emulator, refresh_token: &str) -> Box<dyn Provider> {
        let config = Config {
            settings: serde_json::from_value(
                json!({"base_url": emulator.base_url("google_contacts")}),
            )
            .unwrap(),
            secrets: serde_json::from_value(
                json!({"client_id": "client", "client_secret": "secret", "refresh_token": refresh_token}),
            )
            .unwrap(),
        };
        emulator
            .google_contacts()
            .set_credentials("client", "secret", "refresh");
        connect(&config)
    }

    fn binding(tags: &[&str]) -> Binding {
        Binding {
            id: 7,
            tags: tags.iter().map(|t| t.to_string()).collect(),
            ..test_support::binding(&["given_name", "phone"])
        }
    }

    fn remote_id(outcome: &Outcome) -> String {
        match outcome {
            Outcome::Member {
                remote_id: Some(id),
                status: MemberStatus::Subscribed,
            } => id.clone(),
            other => panic!("not a member: {other:?}"),
        }
    }

    /// A prepared binding with its provider and client, and what leaving members get.
    struct Sync {
        provider: Box<dyn Provider>,
        http: Http,
        binding: Binding,
        leave: LeaveAction,
    }

    fn setup(leave: LeaveAction) -> (Emulator, Sync) {
        let emulator = Emulator::start();
        let mut provider = provider(&emulator);
        let mut http = http();
        let mut binding = binding(&[]);
        provider.prepare(&mut http, &mut binding).expect("prepare");
        (
            emulator,
            Sync {
                provider,
                http,
                binding,
                leave,
            },
        )
    }

    impl Sync {
        fn upsert(&mut self, members: &[Member]) -> Vec<Outcome> {
            self.provider
                .upsert(&mut self.http, &self.binding, members)
                .expect("upsert")
        }

        fn remove(&mut self, members: &[Member]) -> Vec<Outcome> {
            self.provider
                .remove(&mut self.http, &self.binding, self.leave, members)
                .expect("remove")
        }
    }

    fn list(emulator: &Emulator, binding: &Binding) -> BTreeMap<String, Map<String, Value>> {
        emulator.list_members("google_contacts", binding.list_id.as_deref().unwrap())
    }

    fn person(emulator: &Emulator, rn: &str) -> Value {
        emulator
            .google_contacts()
            .person(rn)
            .expect("the contact exists")
    }

    #[test]
    fn groups_are_created_reused_and_checked() {
        let emulator = Emulator::start();
        let gc = emulator.google_contacts();
        let mut provider = provider(&emulator);
        let mut http = http();
        let mut first = binding(&["crm"]);
        provider.prepare(&mut http, &mut first).unwrap();
        let group = first.list_id.clone().unwrap();
        assert_eq!(gc.group_named("vip (crm)"), Some(group.clone()));
        assert_eq!(
            first.remote["tag_groups"]["crm"],
            json!(gc.group_named("crm").unwrap())
        );
        let mut again = binding(&["crm"]);
        provider.prepare(&mut http, &mut again).unwrap();
        assert_eq!(again.list_id, Some(group.clone()), "reused by name");
        assert_eq!(gc.groups().iter().filter(|g| !g.system).count(), 2);

        let mut by_id = binding(&[]);
        by_id.list_id = Some(group.trim_start_matches("contactGroups/").to_string());
        provider.prepare(&mut http, &mut by_id).unwrap();
        assert_eq!(
            by_id.list_id,
            Some(group.clone()),
            "stored as the resource name"
        );
        for missing in ["contactGroups/0ff", "myContacts"] {
            let mut wrong = binding(&[]);
            wrong.list_id = Some(missing.into());
            let error = provider.prepare(&mut http, &mut wrong).unwrap_err();
            assert!(
                matches!(error, ProviderError::Binding(_)),
                "{missing}: {error:?}"
            );
        }
        let status = provider.check(&mut http).unwrap();
        assert_eq!(status["contact_groups"], 4, "{status}");
        assert_eq!(status["contact_limit"], CONTACT_LIMIT);
    }

    #[test]
    fn members_are_created_in_the_group_with_their_fields() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let mut tagged = binding(&["crm"]);
        s.provider.prepare(&mut s.http, &mut tagged).unwrap();
        s.binding = tagged;
        let outcomes = s.upsert(&[
            member(
                "ann@example.com",
                json!({"given_name": "Ann", "family_name": "Lee", "phone": "+1 555 0100",
                       "organization": "Acme", "job_title": "CTO", "birthday": "1990-07-14",
                       "address": "1 Main St, Springfield", "url": "https://ann.example",
                       "biography": "VIP since 2020", "user:crm_id": 42}),
                None,
            ),
            member(
                "bob@example.com",
                json!({"given_name": "Bob", "phone": null}),
                None,
            ),
        ]);
        let ann = remote_id(&outcomes[0]);
        assert!(ann.starts_with("people/c"), "{ann}");
        let list = list(&emulator, &s.binding);
        assert_eq!(
            Value::Object(list["ann@example.com"].clone()),
            json!({"given_name": "Ann", "family_name": "Lee", "phone": "+1 555 0100",
                   "organization": "Acme", "job_title": "CTO", "birthday": "1990-07-14",
                   "address": "1 Main St, Springfield", "url": "https://ann.example",
                   "biography": "VIP since 2020", "user:crm_id": "42"})
        );
        assert_eq!(
            Value::Object(list["bob@example.com"].clone()),
            json!({"given_name": "Bob"})
        );
        let crm = s.binding.remote["tag_groups"]["crm"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            emulator.google_contacts().group_members(&crm).len(),
            2,
            "tags are labels"
        );
        let again = s.upsert(&[member(
            "ann@example.com",
            json!({"given_name": "Ann"}),
            Some(&ann),
        )]);
        assert_eq!(remote_id(&again[0]), ann);
        assert_eq!(
            emulator.google_contacts().contact_count(),
            2,
            "no duplicate"
        );
    }

    #[test]
    fn updates_change_only_the_mapped_fields() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let ann = remote_id(
            &s.upsert(&[member(
                "ann@example.com",
                json!({"given_name": "Ann", "phone": "+1 555 0100"}),
                None,
            )])[0],
        );
        let gc = emulator.google_contacts();
        // The user adds a work number, a nickname and a label of their own.
        let mut phones = person(&emulator, &ann)["phoneNumbers"]
            .as_array()
            .unwrap()
            .clone();
        phones.push(json!({"value": "+1 555 0199", "type": "work"}));
        gc.edit_contact(&ann, "phoneNumbers", Value::Array(phones));
        gc.edit_contact(&ann, "nicknames", json!([{"value": "Annie"}]));
        let mut user = binding(&[]);
        user.list_name = "Friends".into();
        s.provider.prepare(&mut s.http, &mut user).unwrap();
        let friends = user.list_id.clone().unwrap();
        // The user's label, put on through the API as any client would.
        s.provider
            .upsert(
                &mut s.http,
                &user,
                &[member("ann@example.com", json!({}), Some(&ann))],
            )
            .unwrap();
        let outcomes = s.upsert(&[member(
            "ann@example.com",
            json!({"given_name": "Anna", "phone": "+1 555 0111"}),
            Some(&ann),
        )]);
        assert_eq!(remote_id(&outcomes[0]), ann);
        let person = person(&emulator, &ann);
        assert_eq!(person["names"][0]["givenName"], "Anna");
        let numbers: Vec<&str> = person["phoneNumbers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["value"].as_str().unwrap())
            .collect();
        assert_eq!(numbers, ["+1 555 0111", "+1 555 0199"]);
        assert_eq!(person["nicknames"][0]["value"], "Annie");
        assert!(gc.group_members(&friends).contains(&ann), "labels stay");
        let before = gc.person(&ann).unwrap()["etag"].clone();
        s.upsert(&[member(
            "ann@example.com",
            json!({"given_name": "Anna", "phone": "+15550111"}),
            Some(&ann),
        )]);
        let requests = emulator.requests("google_contacts");
        assert_ne!(
            gc.person(&ann).unwrap()["etag"],
            before,
            "reformatted number written"
        );
        assert!(
            requests
                .iter()
                .any(|r| r.path == "/v1/people:batchUpdateContacts")
        );
    }

    #[test]
    fn an_existing_contact_joins_instead_of_being_duplicated() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let gc = emulator.google_contacts();
        let existing = gc.insert_contact(
            json!({"names": [{"givenName": "Carol"}], "emailAddresses": [{"value": "Carol@Example.com"}],
                   "phoneNumbers": [{"value": "+44 20 7946 0000", "type": "home"}]}),
            &[],
        );
        // The directory is loaded first, then the contact appears: found through the sync token.
        s.upsert(&[member("zed@example.com", json!({}), None)]);
        let later = gc.insert_contact(
            json!({"emailAddresses": [{"value": "dan@example.com"}]}),
            &[],
        );
        let outcomes = s.upsert(&[
            member(
                "carol@example.com",
                json!({"given_name": "Carol", "phone": "+1 555 0123"}),
                None,
            ),
            member("dan@example.com", json!({"given_name": "Dan"}), None),
        ]);
        assert_eq!(remote_id(&outcomes[0]), existing);
        assert_eq!(remote_id(&outcomes[1]), later);
        assert_eq!(gc.people_with_email("carol@example.com").len(), 1);
        let carol = person(&emulator, &existing);
        let numbers: Vec<&str> = carol["phoneNumbers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["value"].as_str().unwrap())
            .collect();
        assert_eq!(
            numbers,
            ["+44 20 7946 0000", "+1 555 0123"],
            "the user's number stays"
        );
        assert!(list(&emulator, &s.binding).contains_key("carol@example.com"));
        // An expired sync token means a full listing, not an error.
        gc.expire_sync_tokens();
        let eve = gc.insert_contact(
            json!({"emailAddresses": [{"value": "eve@example.com"}]}),
            &[],
        );
        let outcomes = s.upsert(&[member("eve@example.com", json!({}), None)]);
        assert_eq!(remote_id(&outcomes[0]), eve);
        assert_eq!(gc.contact_count(), 4);
    }

    #[test]
    fn a_stale_etag_is_read_again_and_retried() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let outcomes = s.upsert(&[
            member("ann@example.com", json!({"given_name": "Ann"}), None),
            member("bob@example.com", json!({"given_name": "Bob"}), None),
        ]);
        let (ann, bob) = (remote_id(&outcomes[0]), remote_id(&outcomes[1]));
        emulator.google_contacts().touch_after_next_read(&ann);
        emulator.clear_requests("google_contacts");
        let outcomes = s.upsert(&[
            member("ann@example.com", json!({"given_name": "Anna"}), Some(&ann)),
            member(
                "bob@example.com",
                json!({"given_name": "Bobby"}),
                Some(&bob),
            ),
        ]);
        assert_eq!(remote_id(&outcomes[0]), ann);
        assert_eq!(remote_id(&outcomes[1]), bob);
        assert_eq!(person(&emulator, &ann)["names"][0]["givenName"], "Anna");
        assert_eq!(person(&emulator, &bob)["names"][0]["givenName"], "Bobby");
        let calls: Vec<(String, u16)> = emulator
            .requests("google_contacts")
            .iter()
            .map(|r| {
                (
                    format!(
                        "{} {}",
                        r.method,
                        r.path.split(['/', ':']).next_back().unwrap()
                    ),
                    r.status,
                )
            })
            .collect();
        let calls: Vec<(&str, u16)> = calls.iter().map(|(c, s)| (c.as_str(), *s)).collect();
        // The batch fails on Ann's stale etag; one by one, Ann's is read again and retried.
        assert_eq!(
            calls,
            [
                ("GET batchGet", 200),
                ("POST batchUpdateContacts", 400),
                ("PATCH updateContact", 400),
                ("GET batchGet", 200),
                ("PATCH updateContact", 200),
                ("PATCH updateContact", 200),
            ]
        );
    }

    #[test]
    fn a_contact_deleted_at_google_is_created_again() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let ann = remote_id(&s.upsert(&[member("ann@example.com", json!({}), None)])[0]);
        assert!(emulator.google_contacts().person(&ann).is_some());
        s.provider
            .erase(
                &mut s.http,
                &s.binding,
                &[member("ann@example.com", json!({}), Some(&ann))],
            )
            .unwrap();
        let again = remote_id(
            &s.upsert(&[member(
                "ann@example.com",
                json!({"given_name": "Ann"}),
                Some(&ann),
            )])[0],
        );
        assert_ne!(again, ann);
        assert_eq!(
            list(&emulator, &s.binding).keys().collect::<Vec<_>>(),
            ["ann@example.com"]
        );
    }

    #[test]
    fn leaving_removes_from_the_group_and_the_contact_stays() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let ann = remote_id(&s.upsert(&[member("ann@example.com", json!({}), None)])[0]);
        let outcomes = s.remove(&[
            member("ann@example.com", json!({}), Some(&ann)),
            member("never@example.com", json!({}), None),
        ]);
        assert_eq!(outcomes, [Outcome::Removed, Outcome::Removed]);
        assert!(list(&emulator, &s.binding).is_empty());
        assert!(emulator.google_contacts().person(&ann).is_some());
        let error = s.provider.remove(
            &mut s.http,
            &binding(&[]),
            LeaveAction::Archive,
            &[member("x@example.com", json!({}), None)],
        );
        assert!(matches!(error, Err(ProviderError::Binding(_))), "{error:?}");
        assert_eq!(SPEC.capabilities.on_leave, ["remove", "delete", "keep"]);
    }

    #[test]
    fn delete_removes_only_what_the_sync_created_and_nothing_else_holds() {
        let (emulator, mut s) = setup(LeaveAction::Delete);
        let gc = emulator.google_contacts();
        let users = gc.insert_contact(
            json!({"emailAddresses": [{"value": "carol@example.com"}]}),
            &[],
        );
        let outcomes = s.upsert(&[
            member("ann@example.com", json!({}), None),
            member("bob@example.com", json!({}), None),
            member("carol@example.com", json!({}), None),
        ]);
        let (ann, bob) = (remote_id(&outcomes[0]), remote_id(&outcomes[1]));
        assert_eq!(remote_id(&outcomes[2]), users);
        let mut other = binding(&[]);
        other.list_name = "newsletter (crm)".into();
        s.provider.prepare(&mut s.http, &mut other).unwrap();
        s.provider
            .upsert(
                &mut s.http,
                &other,
                &[member("bob@example.com", json!({}), Some(&bob))],
            )
            .unwrap();
        let outcomes = s.remove(&[
            member("ann@example.com", json!({}), Some(&ann)),
            member("bob@example.com", json!({}), Some(&bob)),
            member("carol@example.com", json!({}), Some(&users)),
        ]);
        assert_eq!(
            outcomes,
            [Outcome::Removed, Outcome::Removed, Outcome::Removed]
        );
        assert!(gc.person(&ann).is_none(), "created by the sync: deleted");
        assert!(
            gc.person(&bob).is_some(),
            "another binding's label holds it"
        );
        assert!(gc.person(&users).is_some(), "the user's own contact");
        assert!(list(&emulator, &s.binding).is_empty());
        assert_eq!(
            emulator
                .list_members("google_contacts", other.list_id.as_deref().unwrap())
                .len(),
            1
        );
    }

    fn numbers(person: &Value) -> Vec<&str> {
        entry_values(person, "phoneNumbers").collect()
    }

    const PIA: &str = "tel:+49301234567";

    #[test]
    fn a_phone_member_is_a_contact_with_the_number_and_no_email() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let gc = emulator.google_contacts();
        let outcomes = s.upsert(&[
            member(PIA, json!({"given_name": "Pia"}), None),
            member(
                "ann@example.com",
                json!({"given_name": "Ann", "phone": "+49 30 1234567"}),
                None,
            ),
        ]);
        let (pia, ann) = (remote_id(&outcomes[0]), remote_id(&outcomes[1]));
        assert_ne!(pia, ann);
        let contact = person(&emulator, &pia);
        assert_eq!(numbers(&contact), ["+49301234567"]);
        assert!(contact.get("emailAddresses").is_none(), "{contact}");
        let held = list(&emulator, &s.binding);
        assert_eq!(
            held.keys().collect::<Vec<_>>(),
            ["ann@example.com", PIA],
            "Ann holds the number too, but she is known by her email"
        );
        assert_eq!(held[PIA]["given_name"], "Pia");

        // A mapped field changes; then the same without the recorded id: the directory finds
        // Pia's contact by her number, not Ann's, which holds it too.
        let again = s.upsert(&[member(PIA, json!({"given_name": "Pina"}), Some(&pia))]);
        assert_eq!(remote_id(&again[0]), pia);
        let again = s.upsert(&[member(PIA, json!({"given_name": "Pina"}), None)]);
        assert_eq!(remote_id(&again[0]), pia);
        let contact = person(&emulator, &pia);
        assert_eq!(contact["names"][0]["givenName"], "Pina");
        assert_eq!(numbers(&contact), ["+49301234567"]);
        assert!(contact.get("emailAddresses").is_none(), "{contact}");
        assert_eq!(gc.contact_count(), 2, "no duplicate");
        assert_eq!(
            gc.people_with_phone(PIA.trim_start_matches("tel:")).len(),
            2
        );

        let outcomes = s.remove(&[member(PIA, json!({}), Some(&pia))]);
        assert_eq!(outcomes, [Outcome::Removed]);
        assert_eq!(
            list(&emulator, &s.binding).keys().collect::<Vec<_>>(),
            ["ann@example.com"]
        );
        assert!(gc.person(&pia).is_some(), "on_leave remove keeps it");
    }

    #[test]
    fn a_phone_only_contact_the_user_has_joins() {
        let (emulator, mut s) = setup(LeaveAction::Delete);
        let gc = emulator.google_contacts();
        let users = gc.insert_contact(
            json!({"names": [{"givenName": "P.", "familyName": "Schulz"}],
                   "phoneNumbers": [{"value": "0049 (30) 123-45-67", "type": "mobile"}]}),
            &[],
        );
        let with_email = gc.insert_contact(
            json!({"emailAddresses": [{"value": "office@example.com"}],
                   "phoneNumbers": [{"value": "+49 30 1234567"}]}),
            &[],
        );
        let outcomes = s.upsert(&[member(
            PIA,
            json!({"given_name": "Pia", "phone": "+49 30 1234567"}),
            None,
        )]);
        assert_eq!(remote_id(&outcomes[0]), users);
        let contact = person(&emulator, &users);
        assert_eq!(
            numbers(&contact),
            ["0049 (30) 123-45-67"],
            "the number is not added again"
        );
        assert_eq!(contact["names"][0]["givenName"], "Pia");
        assert_eq!(contact["names"][0]["familyName"], "Schulz");
        assert!(contact.get("emailAddresses").is_none(), "{contact}");
        assert_eq!(gc.contact_count(), 2);
        assert!(
            !gc.group_members(s.binding.list_id.as_deref().unwrap())
                .contains(&with_email)
        );
        // on_leave delete: the user's contact only leaves; one the sync created is deleted.
        let outcomes = s.upsert(&[member("tel:+4930555000", json!({}), None)]);
        let ours = remote_id(&outcomes[0]);
        let outcomes = s.remove(&[
            member(PIA, json!({}), Some(&users)),
            member("tel:+4930555000", json!({}), Some(&ours)),
        ]);
        assert_eq!(outcomes, [Outcome::Removed, Outcome::Removed]);
        assert!(gc.person(&users).is_some(), "the user's own contact");
        assert!(gc.person(&ours).is_none(), "created by the sync: deleted");
        assert!(list(&emulator, &s.binding).is_empty());
    }

    #[test]
    fn a_lost_answer_to_a_create_does_not_duplicate_a_phone_contact() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let gc = emulator.google_contacts();
        emulator
            .faults("google_contacts")
            .push(Fault::LostResponse.on_path("batchCreateContacts"));
        let members = [
            member(PIA, json!({"given_name": "Pia"}), None),
            member("tel:89161234567", json!({"given_name": "Ivan"}), None),
        ];
        assert!(
            s.provider
                .upsert(&mut s.http, &s.binding, &members)
                .is_err(),
            "the answer was lost"
        );
        assert_eq!(gc.contact_count(), 2, "Google created them");
        let outcomes = s.upsert(&members);
        let found: Vec<String> = outcomes.iter().map(remote_id).collect();
        assert_eq!(gc.contact_count(), 2, "found again, not created twice");
        assert_eq!(gc.people_with_phone("+49 30 1234567").len(), 1);
        assert_eq!(gc.people_with_phone("8 916 123 45 67").len(), 1);
        let held = list(&emulator, &s.binding);
        assert_eq!(held.keys().collect::<Vec<_>>(), [PIA, "tel:89161234567"]);
        assert_ne!(found[0], found[1]);
    }

    #[test]
    fn a_phone_only_contact_that_gets_an_email_moves_to_the_email() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let pia = remote_id(&s.upsert(&[member(PIA, json!({"given_name": "Pia"}), None)])[0]);
        // The engine sends the phone identity as a leave and the email as an upsert.
        assert_eq!(
            s.remove(&[member(PIA, json!({}), Some(&pia))]),
            [Outcome::Removed]
        );
        let email = remote_id(
            &s.upsert(&[member(
                "pia@example.com",
                json!({"given_name": "Pia"}),
                None,
            )])[0],
        );
        assert_ne!(email, pia);
        let held = list(&emulator, &s.binding);
        assert_eq!(held.keys().collect::<Vec<_>>(), ["pia@example.com"]);
        assert_eq!(held["pia@example.com"]["given_name"], "Pia");
        assert!(
            emulator.google_contacts().person(&pia).is_some(),
            "the phone-only contact stays, out of the label"
        );
    }

    #[test]
    fn erasing_a_phone_member_deletes_the_contacts_known_by_the_number() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let gc = emulator.google_contacts();
        let ours = remote_id(&s.upsert(&[member(PIA, json!({}), None)])[0]);
        let copy = gc.insert_contact(json!({"phoneNumbers": [{"value": "+49-30-1234567"}]}), &[]);
        let office = gc.insert_contact(
            json!({"emailAddresses": [{"value": "office@example.com"}],
                   "phoneNumbers": [{"value": "+49 30 1234567"}]}),
            &[],
        );
        let outcomes = s
            .provider
            .erase(
                &mut s.http,
                &s.binding,
                &[member(PIA, json!({}), Some(&ours))],
            )
            .unwrap();
        assert_eq!(outcomes, [Outcome::Removed]);
        assert!(gc.person(&ours).is_none());
        assert!(gc.person(&copy).is_none());
        assert!(
            gc.person(&office).is_some(),
            "known by its email: another person's contact"
        );
    }

    #[test]
    fn erase_deletes_every_contact_holding_the_address() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let gc = emulator.google_contacts();
        let ours = remote_id(&s.upsert(&[member("ann@example.com", json!({}), None)])[0]);
        gc.insert_contact(
            json!({"emailAddresses": [{"value": "ANN@example.com"}]}),
            &[],
        );
        let outcomes = s
            .provider
            .erase(
                &mut s.http,
                &s.binding,
                &[member("ann@example.com", json!({}), Some(&ours))],
            )
            .unwrap();
        assert_eq!(outcomes, [Outcome::Removed]);
        assert!(gc.people_with_email("ann@example.com").is_empty());
        // A contact gone meanwhile makes Google refuse the batch: one by one then.
        let bob = remote_id(&s.upsert(&[member("bob@example.com", json!({}), None)])[0]);
        emulator
            .faults("google_contacts")
            .push(Fault::status(404).on_path("batchDeleteContacts"));
        let outcomes = s
            .provider
            .erase(
                &mut s.http,
                &s.binding,
                &[member("bob@example.com", json!({}), Some(&bob))],
            )
            .unwrap();
        assert_eq!(outcomes, [Outcome::Removed]);
        assert!(gc.person(&bob).is_none());
    }

    #[test]
    fn the_contact_cap_fails_items_with_a_clear_message() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let gc = emulator.google_contacts();
        assert_eq!(gc.seed_contacts(CONTACT_LIMIT - 1), CONTACT_LIMIT - 1);
        let outcomes = s.upsert(&[
            member("a@example.com", json!({}), None),
            member("b@example.com", json!({}), None),
            member(
                "seed1@example.invalid",
                json!({"given_name": "Known"}),
                None,
            ),
        ]);
        remote_id(&outcomes[0]);
        match &outcomes[1] {
            Outcome::Failed { message } => {
                assert!(message.contains("at most 25000 contacts"), "{message}")
            }
            other => panic!("{other:?}"),
        }
        remote_id(&outcomes[2]);
        assert_eq!(gc.contact_count(), CONTACT_LIMIT);
    }

    /// A refused address is the suite's; a value Google does not take fails its contact alone.
    #[test]
    fn a_refused_value_fails_its_contact_alone() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let outcomes = s.upsert(&[
            member("ann@example.com", json!({}), None),
            member("bob@example.com", json!({"birthday": "someday"}), None),
            member("cat@example.com", json!({}), None),
        ]);
        remote_id(&outcomes[0]);
        assert!(
            matches!(&outcomes[1], Outcome::Failed { message } if message.contains("birthday"))
        );
        remote_id(&outcomes[2]);
        assert_eq!(list(&emulator, &s.binding).len(), 2);
    }

    #[test]
    fn tokens_are_cached_renewed_and_refreshed_on_401() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let gc = emulator.google_contacts();
        assert_eq!(gc.token_requests(), 1, "one token for prepare's calls");
        s.upsert(&[member("ann@example.com", json!({}), None)]);
        assert_eq!(gc.token_requests(), 1, "cached");
        gc.expire_access_tokens();
        s.provider
            .check(&mut s.http)
            .expect("a 401 gets a new token");
        assert_eq!(gc.token_requests(), 2);
        // A token about to expire is renewed before use.
        gc.set_token_lifetime(Duration::from_secs(30));
        gc.expire_access_tokens();
        s.provider.check(&mut s.http).unwrap();
        let after = gc.token_requests();
        s.provider.check(&mut s.http).unwrap();
        assert_eq!(gc.token_requests(), after + 2, "one per call");
        let unauthorized = emulator
            .requests("google_contacts")
            .iter()
            .filter(|r| r.status == 401)
            .count();
        assert_eq!(
            unauthorized, 2,
            "each expired token met one 401, then a new one was used"
        );
    }

    #[test]
    fn refused_credentials_are_authentication_failures() {
        let emulator = Emulator::start();
        let mut provider = provider(&emulator);
        let mut http = http();
        emulator
            .google_contacts()
            .set_credentials("client", "secret", "another refresh token");
        match provider.check(&mut http) {
            Err(ProviderError::Auth(message)) => {
                assert!(message.contains("invalid_grant"), "{message}");
                assert!(!message.contains("refresh\""), "{message}");
            }
            other => panic!("{other:?}"),
        }
        emulator
            .google_contacts()
            .set_credentials("client", "other secret", "refresh");
        assert!(matches!(
            provider.check(&mut http),
            Err(ProviderError::Auth(_))
        ));
        emulator
            .google_contacts()
            .set_credentials("client", "secret", "refresh");
        let faults = emulator.faults("google_contacts");
        faults.push(Fault::status(401).on_path("/v1/"));
        faults.push(Fault::status(401).on_path("/v1/"));
        assert!(matches!(
            provider.check(&mut http),
            Err(ProviderError::Auth(_))
        ));
        faults.push(Fault::status(403).on_path("/v1/"));
        assert!(matches!(
            provider.check(&mut http),
            Err(ProviderError::Auth(_))
        ));
    }

    /// What the delivery engine does, in small: level-based changes of a pool of addresses (a
    /// quarter of them phone identities), delivered in batches, retried while the provider says
    /// so, with a fifth of the requests failing (429s, 5xx, timeouts, resets, broken bodies) and
    /// a write per round applied but its answer lost. The label must end up holding exactly the
    /// wanted addresses with their names, and no address may be duplicated.
    #[test]
    fn random_changes_under_faults_converge() {
        let (emulator, mut s) = setup(LeaveAction::Remove);
        let faults = emulator.faults("google_contacts");
        faults.set_timeout(Duration::from_millis(20));
        faults.set_random(0.2, 11);
        let mut seed: u64 = 7;
        let mut next = move |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let pool = |n: u64| match n % 4 {
            0 => format!("tel:+4930100{n:04}"),
            _ => format!("p{n}@example.com"),
        };
        let mut wanted: BTreeMap<String, String> = BTreeMap::new();
        let mut recorded: BTreeMap<String, String> = BTreeMap::new();
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        for round in 0..12 {
            let lost = [
                "batchCreateContacts",
                "members:modify",
                "batchUpdateContacts",
            ][round % 3];
            faults.push(Fault::LostResponse.on_path(lost));
            for _ in 0..15 {
                let address = pool(next(40));
                if next(4) == 0 {
                    wanted.remove(&address);
                } else {
                    wanted.insert(address.clone(), format!("Name {round}-{}", next(3)));
                }
                dirty.insert(address);
            }
            for _attempt in 0..60 {
                if dirty.is_empty() {
                    break;
                }
                let joining: Vec<Member> = dirty
                    .iter()
                    .filter_map(|a| {
                        let name = wanted.get(a)?;
                        Some(member(
                            a,
                            json!({"given_name": name}),
                            recorded.get(a).map(String::as_str),
                        ))
                    })
                    .collect();
                let leaving: Vec<Member> = dirty
                    .iter()
                    .filter(|a| !wanted.contains_key(*a))
                    .map(|a| member(a, json!({}), recorded.get(a).map(String::as_str)))
                    .collect();
                if let Ok(outcomes) = s.provider.upsert(&mut s.http, &s.binding, &joining) {
                    for (m, outcome) in joining.iter().zip(outcomes) {
                        match outcome {
                            Outcome::Member {
                                remote_id: Some(id),
                                ..
                            } => {
                                recorded.insert(m.address.clone(), id);
                                dirty.remove(&m.address);
                            }
                            Outcome::Retry { .. } => {}
                            other => panic!("{}: {other:?}", m.address),
                        }
                    }
                }
                if let Ok(outcomes) = s
                    .provider
                    .remove(&mut s.http, &s.binding, s.leave, &leaving)
                {
                    for (m, outcome) in leaving.iter().zip(outcomes) {
                        assert_eq!(outcome, Outcome::Removed, "{}", m.address);
                        recorded.remove(&m.address);
                        dirty.remove(&m.address);
                    }
                }
            }
            assert!(
                dirty.is_empty(),
                "round {round}: still dirty after retries: {dirty:?}"
            );
            let held: BTreeMap<String, String> = list(&emulator, &s.binding)
                .into_iter()
                .map(|(a, f)| (a, f["given_name"].as_str().unwrap_or("").to_string()))
                .collect();
            assert_eq!(held, wanted, "round {round}");
        }
        faults.clear();
        let gc = emulator.google_contacts();
        for n in 0..40 {
            let address = pool(n);
            let holders = match address.strip_prefix("tel:") {
                Some(number) => gc.people_with_phone(number),
                None => gc.people_with_email(&address),
            };
            assert!(holders.len() <= 1, "{address} duplicated");
        }
    }

    /// The token endpoint is a service of its own: its outage is transient too (the API's are
    /// the suite's).
    #[test]
    fn a_token_endpoint_outage_is_transient() {
        let emulator = Emulator::start();
        let mut provider = provider(&emulator);
        let mut http = http();
        provider.check(&mut http).expect("a token is cached");
        // The cached token must go for the token endpoint to be asked.
        emulator.google_contacts().expire_access_tokens();
        emulator
            .faults("google_contacts")
            .push(Fault::status(500).on_path("/token"));
        assert!(matches!(
            provider.check(&mut http),
            Err(ProviderError::Transient { .. })
        ));
        assert!(provider.check(&mut http).is_ok());
    }

    struct GoogleContactsFake;

    impl Fake for GoogleContactsFake {
        const SPEC: &'static Spec = &SPEC;

        fn connect(emulator: &Emulator) -> Box<dyn Provider> {
            provider(emulator)
        }

        fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider> {
            provider_with_refresh_token(emulator, WRONG_SECRET)
        }

        fn binding() -> Binding {
            binding(&[])
        }

        fn member(address: &str) -> Member {
            member(
                address,
                json!({"given_name": "Ann", "phone": "+1 555 0100"}),
                None,
            )
        }

        fn refuse(emulator: &Emulator, address: &str) -> &'static str {
            emulator
                .google_contacts()
                .reject_address(address, "Invalid email address.");
            "HTTP 400 INVALID_ARGUMENT: Invalid email address."
        }

        fn knows(emulator: &Emulator, address: &str) -> bool {
            !emulator
                .google_contacts()
                .people_with_email(address)
                .is_empty()
        }
    }

    impl Erasure for GoogleContactsFake {
        /// Google has no erasure apart from deletion: a deleted contact is gone for good.
        fn erased(emulator: &Emulator, address: &str) -> bool {
            !Self::knows(emulator, address)
        }
    }

    conformance_suite!(GoogleContactsFake {
        consent: unsupported("an address book keeps no consent: nobody unsubscribes from a label"),
        erasure: supported
    });
}

/// Google's API is stateful where the adapter's choices depend on answers (an existing contact
/// is updated with its etag, a stale etag is read again, a refused batch is retried one by
/// one), and Prism answers every request with the same invented data. So the scenario runs
/// against the stateful fake, which logs every request the adapter made, and each People API
/// request is then sent again, verbatim (method, path, query, body, a bearer token), to Prism
/// on the official description. The OAuth2 token exchange is not part of the People API
/// description: the fake's token endpoint serves it and it is not replayed.
#[cfg(test)]
mod contract {
    use super::*;
    use crate::providers::contract::{Prism, assert_all_valid};
    use crate::providers::test_support::known_member as member;
    use listsync_emulator::{Emulator, Fault};

    /// A request's kind: its path with the resource ids replaced as the description names them.
    fn kind(method: &str, path: &str) -> String {
        let mut segments: Vec<String> = path.split('/').map(str::to_string).collect();
        if let Some(id) = segments.get_mut(3).filter(|s| s.as_str() != "me") {
            let action = id
                .split_once(':')
                .map(|(_, a)| format!(":{a}"))
                .unwrap_or_default();
            let name = if segments[2] == "people" {
                "{personId}"
            } else {
                "{contactGroupId}"
            };
            segments[3] = format!("{name}{action}");
        }
        format!("{method} {}", segments.join("/"))
    }

    fn id(outcome: &Outcome) -> String {
        match outcome {
            Outcome::Member {
                remote_id: Some(id),
                ..
            } => id.clone(),
            other => panic!("not a member: {other:?}"),
        }
    }

    #[test]
    fn every_request_validates_against_the_official_spec() {
        let emulator = Emulator::start();
        let gc = emulator.google_contacts();
        gc.reject_address("bad@example.com", "Invalid email address.");
        let mut http = Http::local(Duration::from_secs(10));
        let config = Config {
            settings: serde_json::from_value(
                json!({"base_url": emulator.base_url("google_contacts")}),
            )
            .unwrap(),
            secrets: serde_json::from_value(
                json!({"client_id": "id.apps.googleusercontent.com", "client_secret": "s", "refresh_token": "1//r"}),
            )
            .unwrap(),
        };
        let mut provider = connect(&config);
        provider.check(&mut http).expect("check");
        let mut binding = Binding {
            id: 1,
            filter: "vip".into(),
            list_id: None,
            list_name: "vip (crm)".into(),
            tags: vec!["crm".into()],
            fields: vec![],
            new_member_status: MemberStatus::Subscribed,
            remote: Map::new(),
        };
        provider
            .prepare(&mut http, &mut binding)
            .expect("prepare creates groups");
        let fields = json!({"given_name": "Ann", "family_name": "Lee", "phone": "+1 555 0100",
                            "organization": "Acme", "job_title": "CTO", "birthday": "--07-14",
                            "address": "1 Main St", "url": "https://ann.example",
                            "biography": "VIP", "user:crm_id": "42"});
        let carol = gc.insert_contact(
            json!({"emailAddresses": [{"value": "carol@example.com"}], "phoneNumbers": [{"value": "+44 20 7946 0000"}]}),
            &[],
        );
        // A refused contact fails the batch: created one by one; Carol exists: updated, joins.
        let outcomes = provider
            .upsert(
                &mut http,
                &binding,
                &[
                    member("ann@example.com", fields.clone(), None),
                    member("bob@example.com", json!({"given_name": "Bob"}), None),
                    member("bad@example.com", json!({}), None),
                    member("carol@example.com", fields.clone(), None),
                    member("tel:+49301234567", json!({"given_name": "Pia"}), None),
                ],
            )
            .expect("upsert");
        let (ann, bob) = (id(&outcomes[0]), id(&outcomes[1]));
        assert_eq!(id(&outcomes[3]), carol);
        // A stale etag: the batch update fails, then one by one with a fresh read.
        gc.touch_after_next_read(&ann);
        provider
            .upsert(
                &mut http,
                &binding,
                &[member(
                    "ann@example.com",
                    json!({"given_name": "Anna", "phone": null}),
                    Some(&ann),
                )],
            )
            .expect("update");
        provider
            .remove(
                &mut http,
                &binding,
                LeaveAction::Remove,
                &[member("bob@example.com", json!({}), Some(&bob))],
            )
            .expect("remove");
        provider
            .remove(
                &mut http,
                &binding,
                LeaveAction::Delete,
                &[member("ann@example.com", json!({}), Some(&ann))],
            )
            .expect("delete");
        emulator
            .faults("google_contacts")
            .push(Fault::status(404).on_path("batchDeleteContacts"));
        provider
            .erase(
                &mut http,
                &binding,
                &[member("carol@example.com", json!({}), Some(&carol))],
            )
            .expect("erase");

        let prism = Prism::start("google-people.prism.yaml");
        let mut replay = prism.http();
        let mut kinds = BTreeSet::new();
        for logged in emulator.requests("google_contacts") {
            if logged.path == "/token" {
                continue;
            }
            kinds.insert(kind(&logged.method, &logged.path));
            let method = match logged.method.as_str() {
                "GET" => Method::Get,
                "POST" => Method::Post,
                "PATCH" => Method::Patch,
                "DELETE" => Method::Delete,
                other => panic!("unexpected method {other}"),
            };
            let query = if logged.query.is_empty() {
                String::new()
            } else {
                format!("?{}", logged.query)
            };
            let mut request =
                Request::new(method, format!("{}{}{query}", prism.base_url, logged.path))
                    .header("authorization", "Bearer ya29.replayed");
            if !logged.body.is_empty() {
                request = request.header("content-type", "application/json");
                request.body = Some(logged.body.into_bytes());
            }
            replay
                .send(&kind(&logged.method, &logged.path), request)
                .expect("Prism answers");
        }
        assert_all_valid(&replay.drain_records());
        let expected: BTreeSet<String> = [
            "GET /v1/contactGroups",
            "POST /v1/contactGroups",
            "POST /v1/contactGroups/{contactGroupId}/members:modify",
            "GET /v1/people/me/connections",
            "GET /v1/people:batchGet",
            "POST /v1/people:batchCreateContacts",
            "POST /v1/people:createContact",
            "POST /v1/people:batchUpdateContacts",
            "PATCH /v1/people/{personId}:updateContact",
            "POST /v1/people:batchDeleteContacts",
            "DELETE /v1/people/{personId}:deleteContact",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(kinds, expected, "every kind of request the adapter makes");
    }
}
