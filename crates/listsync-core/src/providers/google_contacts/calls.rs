//! Calls: the People API requests. Sending with the access token and classifying Google's
//! answers; the contact groups, and [`ContactGroups`], through which the binding's group and its
//! tags are found or created; listing contacts into the directory; reading, regrouping and
//! deleting contacts; and finding the contacts members are.

use super::directory::{Directory, Listing, identities_of};
use super::{
    API, Answer, ApiError, BATCH, DELETE_BATCH, GoogleContacts, MODIFY_BATCH, PAGE_SIZE,
    READ_FIELDS, TOKEN_URL, distinct, group_name, refresh_access_token,
};
use crate::http::{
    Http, Method, ProviderError, Request, Response, Result, percent_encode, transient,
};
use crate::providers::kit::BearerToken;
use crate::providers::{Config, Member, chunks, kit};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};

impl GoogleContacts {
    pub(super) fn new(config: &Config) -> GoogleContacts {
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
    pub(super) fn call(
        &mut self,
        http: &mut Http,
        operation: &str,
        request: Request,
    ) -> Result<Answer> {
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

    pub(super) fn get(&mut self, http: &mut Http, operation: &str, path: &str) -> Result<Answer> {
        let request = Request::new(Method::Get, format!("{}{path}", self.api));
        self.call(http, operation, request)
    }

    pub(super) fn post(
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
    pub(super) fn groups(&mut self, http: &mut Http) -> Result<BTreeMap<String, (String, bool)>> {
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
pub(super) struct ContactGroups<'a> {
    pub(super) google: &'a mut GoogleContacts,
    /// Resource name → (name, whether a user group).
    pub(super) groups: BTreeMap<String, (String, bool)>,
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
    pub(super) fn refresh_directory(&mut self, http: &mut Http) -> Result<&Directory> {
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

    pub(super) fn forget(&mut self, person: &str) {
        if let Some(directory) = &mut self.directory {
            directory.drop_person(person);
        }
    }

    pub(super) fn remember(&mut self, person: &str, fields: &Map<String, Value>) {
        if let Some(directory) = &mut self.directory {
            directory.put(person, identities_of(&Value::Object(fields.clone())));
        }
    }

    /// Reads contacts as the sync needs them; the answer is keyed by the requested name (a
    /// contact's own name can change when Google links it to a profile). Unknown ones are
    /// absent.
    pub(super) fn fetch(
        &mut self,
        http: &mut Http,
        names: &[String],
    ) -> Result<HashMap<String, Value>> {
        let unique = distinct(names);
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
    pub(super) fn modify(
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
                kit::strings(&answer[key]).map(str::to_string).collect()
            };
            missing.extend(listed("notFoundResourceNames"));
            kept.extend(listed("canNotRemoveLastContactGroupResourceNames"));
        }
        Ok((missing, kept))
    }

    /// Deletes contacts, 500 per call; when Google refuses a batch (one of them gone meanwhile,
    /// say), one by one. Returns the ones that could not be deleted, with Google's words.
    pub(super) fn delete(
        &mut self,
        http: &mut Http,
        people: &[String],
    ) -> Result<HashMap<String, String>> {
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
    pub(super) fn resolve(
        &mut self,
        http: &mut Http,
        members: &[Member],
    ) -> Result<Vec<Option<String>>> {
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
