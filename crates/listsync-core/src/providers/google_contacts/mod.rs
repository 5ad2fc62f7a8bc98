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

mod calls;
mod directory;
mod fields;
mod leave;
mod upsert;

#[cfg(test)]
mod tests;

use super::kit::{BearerToken, IssuedToken, ListDirectory};
use super::{
    Binding, Capabilities, Config, LeaveAction, Limits, Member, MemberStatus, Need, Outcome,
    Provider, Spec, kit,
};
use crate::http::{Http, Method, ProviderError, Request, Response, Result};
use calls::ContactGroups;
use directory::Directory;
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;
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
    IssuedToken::from_answer(
        &response,
        Duration::from_secs(3599),
        "the token endpoint answered without an access_token",
    )
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
        .remote_object("tag_groups")
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.as_str().map(str::to_string))
        .collect()
}

/// The names, each once, sorted.
fn distinct<'a>(names: impl IntoIterator<Item = &'a String>) -> Vec<String> {
    let names: BTreeSet<&String> = names.into_iter().collect();
    names.into_iter().cloned().collect()
}

fn member(remote_id: String) -> Outcome {
    Outcome::member(MemberStatus::Subscribed, Some(remote_id))
}

impl Provider for GoogleContacts {
    fn limits(&self) -> Limits {
        // People API quotas are per minute, per project and per user, set in the Cloud
        // Console; Google answers 429 RESOURCE_EXHAUSTED beyond them, which the engine backs
        // off from. A connection makes one call at a time (one delivery thread each), as Google
        // asks for mutations.
        Limits::batches(BATCH, DELETE_BATCH)
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
        binding.keep_remote("tag_groups", tags);
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
        let failed = self.delete(http, &distinct(holders.iter().flatten()))?;
        Ok(holders
            .iter()
            .map(|people| Outcome::removed_unless(people.iter().find_map(|p| failed.get(p))))
            .collect())
    }
}
