//! Sendsay's JSON action API, the list-sync subset, served under
//! `/sendsay/general/api/v100/json/<ACCOUNT>`.
//!
//! One endpoint takes `{"action": "...", ...}` (as a JSON body, or the legacy form
//! `apiversion=100&json=1&request=<JSON>`) and answers HTTP 200 whatever happened: errors are
//! `{"errors": [{"id", "explain"}]}` in the body, including a wrong API key
//! (`error/auth/failed`). Authentication is the header `Authorization: sendsay apikey=<KEY>`.
//! An account may live on another cluster: the answer is then `{"REDIRECT": "<path>"}` and the
//! client repeats the request at that path ([`Sendsay::set_redirect`]).
//!
//! Modelled actions: `pong`, `sys.settings.get`, `group.get`, `group.create`, `member.get`,
//! `member.set` (`datakey` with `set`, or `obj`; `if_exists`; `newbie.confirm`;
//! `return_fresh_obj`), `member.delete`, `stoplist.get`/`add`/`delete`, and `batch`
//! (`do: [...]`, `stop_on_error`, answers `result: [...]` in order, per-item `errors`).
//! Consent: a member's `member.lockremove` (unsubscribed) and the account's stop list
//! (blocked: bounced, complained, or added by the client). Sendsay does not stop a client
//! from adding such an address to a list, so the fake records it
//! ([`Sendsay::locked_additions`]) for tests to assert the sync never does it.
//!
//! The error ids below are the fake's; Sendsay's reference names only some of them
//! (`error/auth/failed`). Clients should classify by prefix, not by exact id.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use serde_json::{Map, Value, json};

use crate::http::{Request, Response, percent_decode, reason_phrase};
use crate::mailchimp::is_valid_email;
use crate::provider::{Provider, admin_error, lock, opt_str, req_str};

/// The API path below the (optional) cluster prefix: `/general/api/v100/json/<account>`.
const API_PATH: [&str; 4] = ["general", "api", "v100", "json"];
/// `member.hard.limit` of a fresh account.
const DEFAULT_MEMBER_LIMIT: u64 = 100_000;

/// A member of the account, as tests inspect it.
#[derive(Debug, Clone, PartialEq)]
pub struct SendsayMember {
    /// Sendsay's stable numeric `member.id`.
    pub id: u64,
    /// Lower-cased address.
    pub email: String,
    /// Ids of the list groups the member belongs to.
    pub groups: BTreeSet<String>,
    /// Questionnaire answers, keyed `anketa.question` (`base.firstName`).
    pub data: Map<String, Value>,
    /// When the member unsubscribed (`member.lockremove`).
    pub lockremove: Option<String>,
    /// Waiting for double opt-in confirmation (`member.lockconfirm`).
    pub lockconfirm: bool,
}

/// A group: `list` (explicit membership) or `filter` (computed by Sendsay).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    pub id: String,
    pub name: String,
    pub kind: String,
}

/// The Sendsay fake. Obtain it with [`crate::Emulator::sendsay`].
pub struct Sendsay {
    state: Mutex<State>,
}

struct State {
    api_key: Option<String>,
    /// `None`: any account code is served.
    account: Option<String>,
    /// The cluster prefix the account lives under (e.g. `/clu7`); requests elsewhere are
    /// answered with `REDIRECT`.
    redirect: Option<String>,
    /// Answer every request with a `REDIRECT` to itself (a broken cluster).
    redirect_loop: bool,
    groups: BTreeMap<String, Group>,
    members: BTreeMap<String, SendsayMember>,
    stoplist: BTreeSet<String>,
    anketas: BTreeSet<String>,
    /// Lower-cased address -> `(id, explain)`: `member.set` of it fails.
    rejected: BTreeMap<String, (String, String)>,
    deleted: Vec<String>,
    locked_additions: Vec<String>,
    member_limit: u64,
    next_id: u64,
}

impl Default for State {
    fn default() -> Self {
        State {
            api_key: None,
            account: None,
            redirect: None,
            redirect_loop: false,
            groups: BTreeMap::new(),
            members: BTreeMap::new(),
            stoplist: BTreeSet::new(),
            anketas: ["base", "custom"].iter().map(|s| s.to_string()).collect(),
            rejected: BTreeMap::new(),
            deleted: Vec::new(),
            locked_additions: Vec::new(),
            member_limit: DEFAULT_MEMBER_LIMIT,
            next_id: 0,
        }
    }
}

/// An action's failure: the `{"id", "explain"}` of Sendsay's `errors[]`.
#[derive(Debug, Clone)]
struct ApiError {
    id: String,
    explain: String,
}

fn fail(id: &str, explain: impl Into<String>) -> ApiError {
    ApiError {
        id: id.to_string(),
        explain: explain.into(),
    }
}

type ActionResult = Result<Value, ApiError>;

fn error_body(error: &ApiError) -> Value {
    json!({"errors": [{"id": error.id, "explain": error.explain}]})
}

impl Sendsay {
    pub(crate) fn new() -> Sendsay {
        Sendsay {
            state: Mutex::new(State::default()),
        }
    }

    /// Require this key in `Authorization: sendsay apikey=<key>`.
    pub fn set_api_key(&self, key: &str) {
        lock(&self.state).api_key = Some(key.to_string());
    }

    pub fn accept_any_api_key(&self) {
        lock(&self.state).api_key = None;
    }

    /// Serve only this account code (others fail authentication).
    pub fn set_account(&self, account: &str) {
        lock(&self.state).account = Some(account.to_string());
    }

    /// Put the account on a cluster: requests not under `prefix` (like `/clu7`) get a
    /// `REDIRECT` there. `None` serves at the canonical path.
    pub fn set_redirect(&self, prefix: Option<&str>) {
        lock(&self.state).redirect = prefix.map(|p| format!("/{}", p.trim_matches('/')));
    }

    /// Answer every request with a `REDIRECT` (a misconfigured cluster).
    pub fn set_redirect_loop(&self, on: bool) {
        lock(&self.state).redirect_loop = on;
    }

    /// Creates a `list` group; returns its id.
    pub fn create_group(&self, name: &str) -> String {
        lock(&self.state).create_group(None, name, "list")
    }

    /// Creates a `filter` group (membership computed by Sendsay; clients cannot add to it).
    pub fn create_filter_group(&self, name: &str) -> String {
        lock(&self.state).create_group(None, name, "filter")
    }

    pub fn groups(&self) -> Vec<Group> {
        lock(&self.state).groups.values().cloned().collect()
    }

    /// Makes questionnaire `id` known (`base` and `custom` exist from the start).
    pub fn add_anketa(&self, id: &str) {
        lock(&self.state).anketas.insert(id.to_string());
    }

    /// Consent as if it happened at Sendsay: `unsubscribed` sets `member.lockremove`
    /// (creating the member if needed); `bounced`, `complained` or `stoplisted` put the
    /// address on the stop list. False for another status.
    pub fn set_status(&self, email: &str, status: &str) -> bool {
        let email = email.trim().to_lowercase();
        let mut st = lock(&self.state);
        match status {
            "unsubscribed" => {
                let member = st.member_entry(&email);
                member.lockremove = Some("2024-01-01 00:00:00".into());
            }
            "bounced" | "complained" | "stoplisted" => {
                st.stoplist.insert(email);
            }
            _ => return false,
        }
        true
    }

    /// `member.set` of this address fails with `{id, explain}`.
    pub fn reject_address(&self, email: &str, id: &str, explain: &str) {
        lock(&self.state).rejected.insert(
            email.trim().to_lowercase(),
            (id.to_string(), explain.to_string()),
        );
    }

    pub fn clear_rejections(&self) {
        lock(&self.state).rejected.clear();
    }

    /// The account's cap on members (`member.hard.limit`); new members beyond it fail.
    pub fn set_member_limit(&self, limit: u64) {
        lock(&self.state).member_limit = limit;
    }

    pub fn member(&self, email: &str) -> Option<SendsayMember> {
        lock(&self.state)
            .members
            .get(&email.trim().to_lowercase())
            .cloned()
    }

    pub fn members(&self) -> BTreeMap<String, SendsayMember> {
        lock(&self.state).members.clone()
    }

    /// Members of a group, by address (locked ones included).
    pub fn group_members(&self, group: &str) -> BTreeMap<String, SendsayMember> {
        lock(&self.state)
            .members
            .iter()
            .filter(|(_, m)| m.groups.contains(group))
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect()
    }

    pub fn stoplist(&self) -> BTreeSet<String> {
        lock(&self.state).stoplist.clone()
    }

    /// Addresses removed with `member.delete`.
    pub fn deleted(&self) -> Vec<String> {
        lock(&self.state).deleted.clone()
    }

    /// Unsubscribed or stop-listed addresses that were added to a group anyway.
    pub fn locked_additions(&self) -> Vec<String> {
        lock(&self.state).locked_additions.clone()
    }

    fn admin_action(&self, action: &str, body: &Map<String, Value>) -> Result<(), String> {
        match action {
            "api_key" => match opt_str(body, "key")? {
                Some(key) => self.set_api_key(key),
                None => self.accept_any_api_key(),
            },
            "account" => match opt_str(body, "account")? {
                Some(account) => self.set_account(account),
                None => lock(&self.state).account = None,
            },
            "redirect" => self.set_redirect(opt_str(body, "prefix")?),
            "group" => {
                self.create_group(req_str(body, "name")?);
            }
            "anketa" => self.add_anketa(req_str(body, "id")?),
            "status" => {
                let (email, status) = (req_str(body, "email")?, req_str(body, "status")?);
                if !self.set_status(email, status) {
                    return Err(format!(
                        "status must be unsubscribed, bounced, complained or stoplisted, not {status:?}"
                    ));
                }
            }
            "reject" => self.reject_address(
                req_str(body, "email")?,
                opt_str(body, "id")?.unwrap_or("error/member/rejected"),
                opt_str(body, "explain")?.unwrap_or("rejected"),
            ),
            _ => return Err(format!("unknown sendsay admin action {action:?}")),
        }
        Ok(())
    }
}

impl Provider for Sendsay {
    fn name(&self) -> &'static str {
        "sendsay"
    }

    fn handle(&self, req: &Request) -> Response {
        let mut st = lock(&self.state);
        let segments = req.segments();
        let Some(at) = segments
            .windows(API_PATH.len())
            .position(|w| w.iter().map(String::as_str).eq(API_PATH))
        else {
            return Response::json(
                404,
                &json!({"errors": [{"id": "error/http/not_found", "explain": req.path}]}),
            );
        };
        let prefix: String = segments[..at].iter().map(|s| format!("/{s}")).collect();
        let Some(account) = segments.get(at + API_PATH.len()).cloned() else {
            return Response::json(
                404,
                &json!({"errors": [{"id": "error/http/not_found", "explain": req.path}]}),
            );
        };
        if req.method != "POST" {
            return ok(error_body(&fail(
                "error/http/method",
                "only POST is accepted",
            )));
        }
        let canonical = st.redirect.clone().unwrap_or_default();
        if st.redirect_loop || prefix != canonical {
            let target = if st.redirect_loop { prefix } else { canonical };
            return ok(json!({"REDIRECT": format!("{target}/general/api/v100/json/{account}")}));
        }
        if !st.authorized(req, &account) {
            return ok(error_body(&fail(
                "error/auth/failed",
                "wrong api key or account",
            )));
        }
        let request = match parse_request(req) {
            Ok(r) => r,
            Err(e) => return ok(error_body(&e)),
        };
        match st.action(&account, &request, true) {
            Ok(answer) => ok(answer),
            Err(e) => ok(error_body(&e)),
        }
    }

    fn state_json(&self) -> Value {
        let st = lock(&self.state);
        let members: Map<String, Value> = st
            .members
            .iter()
            .map(|(k, m)| (k.clone(), st.member_json(m)))
            .collect();
        json!({
            "api_key_required": st.api_key.is_some(),
            "account": st.account,
            "redirect": st.redirect,
            "groups": st.groups.values().map(|g| json!({"id": g.id, "name": g.name, "type": g.kind})).collect::<Vec<_>>(),
            "members": members,
            "stoplist": st.stoplist,
            "anketas": st.anketas,
            "deleted": st.deleted,
            "locked_additions": st.locked_additions,
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
        let st = lock(&self.state);
        st.members
            .values()
            .filter(|m| {
                m.groups.contains(list_id)
                    && m.lockremove.is_none()
                    && !st.stoplist.contains(&m.email)
            })
            .map(|m| (m.email.clone(), m.data.clone()))
            .collect()
    }

    fn error_response(&self, status: u16, detail: &str) -> Response {
        Response::json(
            status,
            &json!({"errors": [{"id": format!("error/http/{status}"), "explain": format!("{}: {detail}", reason_phrase(status))}]}),
        )
    }
}

fn ok(body: Value) -> Response {
    Response::json(200, &body)
}

/// A JSON body, or the legacy form `apiversion=100&json=1&request=<JSON>`.
fn parse_request(req: &Request) -> Result<Map<String, Value>, ApiError> {
    let form = req
        .header("content-type")
        .is_some_and(|t| t.contains("application/x-www-form-urlencoded"));
    let text = if form {
        req.body_text()
            .split('&')
            .filter_map(|pair| pair.split_once('='))
            .find(|(k, _)| *k == "request")
            .map(|(_, v)| percent_decode(v, true))
            .ok_or_else(|| fail("error/request/missing", "no request parameter"))?
    } else {
        req.body_text()
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(fail(
            "error/request/json",
            "the request is not a JSON object",
        )),
    }
}

fn emails_of(body: &Map<String, Value>) -> Result<Vec<String>, ApiError> {
    match (body.get("email"), body.get("list")) {
        (Some(Value::String(e)), _) => Ok(vec![e.trim().to_lowercase()]),
        (_, Some(Value::Array(items))) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(|s| s.trim().to_lowercase())
                    .ok_or_else(|| fail("error/param/list", "list must hold strings"))
            })
            .collect(),
        _ => Err(fail("error/param/email", "email or list is required")),
    }
}

impl State {
    fn authorized(&self, req: &Request, account: &str) -> bool {
        if self.account.as_deref().is_some_and(|a| a != account) {
            return false;
        }
        let Some(expected) = &self.api_key else {
            return true;
        };
        req.header("authorization")
            .and_then(|h| h.trim().strip_prefix("sendsay "))
            .and_then(|rest| rest.trim().strip_prefix("apikey="))
            .is_some_and(|key| key == expected)
    }

    fn create_group(&mut self, id: Option<&str>, name: &str, kind: &str) -> String {
        let id = match id {
            Some(id) => id.to_string(),
            None => {
                self.next_id += 1;
                format!("pl{}", self.next_id)
            }
        };
        self.groups.insert(
            id.clone(),
            Group {
                id: id.clone(),
                name: name.to_string(),
                kind: kind.to_string(),
            },
        );
        id
    }

    fn member_entry(&mut self, email: &str) -> &mut SendsayMember {
        if !self.members.contains_key(email) {
            self.next_id += 1;
            let id = self.next_id;
            self.members.insert(
                email.to_string(),
                SendsayMember {
                    id,
                    email: email.to_string(),
                    groups: BTreeSet::new(),
                    data: Map::new(),
                    lockremove: None,
                    lockconfirm: false,
                },
            );
        }
        self.members.get_mut(email).expect("inserted above")
    }

    fn member_json(&self, m: &SendsayMember) -> Value {
        let mut obj = json!({
            "member": {
                "email": m.email,
                "id": m.id,
                "addr_type": "email",
                "lockremove": m.lockremove,
                "lockconfirm": if m.lockconfirm { json!(1) } else { Value::Null },
            },
            "-group": m.groups.iter().map(|g| (g.clone(), json!(1))).collect::<Map<String, Value>>(),
        });
        for (key, value) in &m.data {
            if let Some((anketa, quest)) = key.split_once('.') {
                obj[anketa][quest] = value.clone();
            }
        }
        obj
    }

    fn action(&mut self, account: &str, request: &Map<String, Value>, top: bool) -> ActionResult {
        let action = request
            .get("action")
            .and_then(Value::as_str)
            .ok_or_else(|| fail("error/action/missing", "action is required"))?;
        match action {
            "pong" | "ping" => Ok(json!({"pong": "pong"})),
            "sys.settings.get" => Ok(self.settings(account, request)),
            "group.get" => self.group_get(request),
            "group.create" => self.group_create(request),
            "member.get" => self.member_get(request),
            "member.set" => self.member_set(request),
            "member.delete" => {
                let emails = emails_of(request)?;
                for email in emails {
                    if self.members.remove(&email).is_some() {
                        self.deleted.push(email);
                    }
                }
                Ok(json!({}))
            }
            "stoplist.get" => {
                let held: Vec<&String> = match request.get("list") {
                    Some(_) => {
                        let asked = emails_of(request)?;
                        self.stoplist.iter().filter(|e| asked.contains(e)).collect()
                    }
                    None => self.stoplist.iter().collect(),
                };
                Ok(json!({"list": held}))
            }
            "stoplist.add" => {
                let emails = emails_of(request)?;
                self.stoplist.extend(emails);
                Ok(json!({}))
            }
            "stoplist.delete" => {
                for email in emails_of(request)? {
                    self.stoplist.remove(&email);
                }
                Ok(json!({}))
            }
            "batch" if top => self.batch(account, request),
            "batch" => Err(fail("error/batch/nested", "batch cannot contain batch")),
            other => Err(fail("error/action/unknown", other)),
        }
    }

    fn settings(&self, account: &str, request: &Map<String, Value>) -> Value {
        let count = self.members.len() as u64;
        let known = json!({
            "about.id": account,
            "about.name": account,
            "member.hard.limit": self.member_limit,
            "member.hard.rest": self.member_limit.saturating_sub(count),
        });
        let asked: Vec<&str> = request
            .get("list")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let list: Map<String, Value> = asked
            .iter()
            .filter_map(|k| known.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        json!({"list": list})
    }

    fn group_json(group: &Group) -> Value {
        json!({"id": group.id, "name": group.name, "type": group.kind, "addr_type": "email"})
    }

    fn group_get(&self, request: &Map<String, Value>) -> ActionResult {
        match request.get("id") {
            Some(Value::String(id)) if id != "*" => self
                .groups
                .get(id)
                .map(|g| json!({"obj": Self::group_json(g)}))
                .ok_or_else(|| fail("error/group/not_exists", id.clone())),
            Some(Value::Array(ids)) if !ids.iter().any(|v| v == "*") => {
                let list: Vec<Value> = ids
                    .iter()
                    .filter_map(Value::as_str)
                    .filter_map(|id| self.groups.get(id))
                    .map(Self::group_json)
                    .collect();
                Ok(json!({"list": list}))
            }
            _ => {
                Ok(json!({"list": self.groups.values().map(Self::group_json).collect::<Vec<_>>()}))
            }
        }
    }

    fn group_create(&mut self, request: &Map<String, Value>) -> ActionResult {
        let name = request
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| fail("error/param/name", "name is required"))?;
        let kind = request
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("list");
        if !["list", "filter"].contains(&kind) {
            return Err(fail(
                "error/param/type",
                format!("unknown group type {kind}"),
            ));
        }
        let id = request.get("id").and_then(Value::as_str);
        if let Some(id) = id
            && self.groups.contains_key(id)
        {
            return Err(fail("error/group/already_exists", id));
        }
        let id = self.create_group(id, name, kind);
        Ok(json!({"id": id}))
    }

    fn member_get(&self, request: &Map<String, Value>) -> ActionResult {
        let email = request
            .get("email")
            .and_then(Value::as_str)
            .map(|e| e.trim().to_lowercase())
            .ok_or_else(|| fail("error/param/email", "email is required"))?;
        self.members
            .get(&email)
            .map(|m| json!({"obj": self.member_json(m)}))
            .ok_or_else(|| fail("error/member/not_found", email))
    }

    fn member_set(&mut self, request: &Map<String, Value>) -> ActionResult {
        let email = request
            .get("email")
            .and_then(Value::as_str)
            .map(|e| e.trim().to_lowercase())
            .ok_or_else(|| fail("error/param/email", "email is required"))?;
        if !is_valid_email(&email) {
            return Err(fail("error/member/email_invalid", email));
        }
        if let Some((id, explain)) = self.rejected.get(&email) {
            return Err(fail(id, explain.clone()));
        }
        let exists = self.members.contains_key(&email);
        match request
            .get("if_exists")
            .and_then(Value::as_str)
            .unwrap_or("error")
        {
            "error" if exists => return Err(fail("error/member/exists", email)),
            "must" if !exists => return Err(fail("error/member/not_found", email)),
            "error" | "must" | "overwrite" => {}
            other => return Err(fail("error/param/if_exists", other)),
        }
        if !exists && self.members.len() as u64 >= self.member_limit {
            return Err(fail(
                "error/member/hard_limit",
                "the account's member limit is reached",
            ));
        }
        let changes = self.member_changes(request)?;
        let locked = self.stoplist.contains(&email)
            || self
                .members
                .get(&email)
                .is_some_and(|m| m.lockremove.is_some());
        let confirm = request.get("newbie.confirm").and_then(Value::as_i64) == Some(1);
        let mut joined = false;
        let member = self.member_entry(&email);
        if !exists {
            member.lockconfirm = confirm;
        }
        for (key, value) in changes {
            match key.strip_prefix("-group.") {
                Some(group) if value.as_i64() == Some(1) || value.as_str() == Some("1") => {
                    joined |= member.groups.insert(group.to_string());
                }
                Some(group) => {
                    member.groups.remove(group);
                }
                None => {
                    member.data.insert(key, value);
                }
            }
        }
        if joined && locked {
            self.locked_additions.push(email.clone());
        }
        let member = &self.members[&email];
        if request.get("return_fresh_obj").and_then(Value::as_i64) == Some(1) {
            Ok(json!({"obj": self.member_json(member)}))
        } else {
            Ok(json!({"member": {"email": member.email, "id": member.id}}))
        }
    }

    /// `(key, value)` pairs of a `datakey` or `obj`, checked before anything is applied.
    fn member_changes(
        &self,
        request: &Map<String, Value>,
    ) -> Result<Vec<(String, Value)>, ApiError> {
        let mut changes = Vec::new();
        if let Some(datakey) = request.get("datakey") {
            let items = datakey
                .as_array()
                .ok_or_else(|| fail("error/param/datakey", "datakey must be an array"))?;
            for item in items {
                let (Some(key), Some(op)) = (
                    item.get(0).and_then(Value::as_str),
                    item.get(1).and_then(Value::as_str),
                ) else {
                    return Err(fail(
                        "error/param/datakey",
                        "each datakey item is [key, op, value]",
                    ));
                };
                if op != "set" {
                    return Err(fail(
                        "error/datakey/op",
                        format!("unsupported operation {op}"),
                    ));
                }
                changes.push((key.to_string(), item.get(2).cloned().unwrap_or(Value::Null)));
            }
        }
        if let Some(obj) = request.get("obj").and_then(Value::as_object) {
            for (anketa, answers) in obj {
                for (quest, value) in answers.as_object().into_iter().flatten() {
                    let key = if anketa == "-group" {
                        format!("-group.{quest}")
                    } else {
                        format!("{anketa}.{quest}")
                    };
                    changes.push((key, value.clone()));
                }
            }
        }
        for (key, _) in &changes {
            if let Some(group) = key.strip_prefix("-group.") {
                match self.groups.get(group) {
                    Some(g) if g.kind == "list" => {}
                    Some(_) => {
                        return Err(fail(
                            "error/group/filter",
                            format!("{group} is a filter group"),
                        ));
                    }
                    None => return Err(fail("error/group/not_exists", group)),
                }
                continue;
            }
            let Some((anketa, quest)) = key.split_once('.') else {
                return Err(fail("error/datakey/key", key.clone()));
            };
            if anketa == "member" {
                return Err(fail("error/datakey/readonly", key.clone()));
            }
            if quest.is_empty() || !self.anketas.contains(anketa) {
                return Err(fail("error/anketa/not_exists", key.clone()));
            }
        }
        Ok(changes)
    }

    fn batch(&mut self, account: &str, request: &Map<String, Value>) -> ActionResult {
        let actions = request
            .get("do")
            .and_then(Value::as_array)
            .ok_or_else(|| fail("error/param/do", "do must be an array of actions"))?;
        let stop_on_error = request.get("stop_on_error").and_then(Value::as_i64) == Some(1);
        let mut results = Vec::with_capacity(actions.len());
        for action in actions {
            let answer = match action.as_object() {
                Some(a) => self.action(account, a, false),
                None => Err(fail("error/param/do", "each action must be an object")),
            };
            match answer {
                Ok(v) => results.push(v),
                Err(e) => {
                    results.push(error_body(&e));
                    if stop_on_error {
                        break;
                    }
                }
            }
        }
        Ok(json!({"result": results}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(s: &Sendsay, path: &str, key: Option<&str>, body: Value) -> Value {
        let auth = key.map_or(String::new(), |k| {
            format!("Authorization: sendsay apikey={k}\r\n")
        });
        let text = body.to_string();
        let raw = format!(
            "POST {path} HTTP/1.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{text}",
            text.len()
        );
        let req = crate::http::read_request(
            &mut std::io::BufReader::new(raw.as_bytes()),
            &mut Vec::new(),
        )
        .expect("a valid request");
        let response = s.handle(&req);
        assert_eq!(response.status, 200);
        serde_json::from_slice(&response.body).unwrap()
    }

    const PATH: &str = "/general/api/v100/json/acme";

    #[test]
    fn errors_come_in_200_bodies_and_redirects_are_answered() {
        let s = Sendsay::new();
        s.set_api_key("k1");
        let answer = post(&s, PATH, Some("k2"), json!({"action": "pong"}));
        assert_eq!(answer["errors"][0]["id"], "error/auth/failed");
        s.set_redirect(Some("clu7"));
        let answer = post(&s, PATH, Some("k1"), json!({"action": "pong"}));
        assert_eq!(answer["REDIRECT"], "/clu7/general/api/v100/json/acme");
        let answer = post(
            &s,
            "/clu7/general/api/v100/json/acme",
            Some("k1"),
            json!({"action": "pong"}),
        );
        assert!(answer.get("errors").is_none(), "{answer}");
    }

    #[test]
    fn batch_member_set_joins_groups_and_records_locked_additions() {
        let s = Sendsay::new();
        let group = s.create_group("vip");
        s.set_status("bob@example.com", "bounced");
        let set = |email: &str| {
            json!({"action": "member.set", "email": email, "addr_type": "email", "if_exists": "overwrite",
            "datakey": [[format!("-group.{group}"), "set", 1], ["base.firstName", "set", "Ann"]], "return_fresh_obj": 1})
        };
        let answer = post(
            &s,
            PATH,
            None,
            json!({"action": "batch", "do": [set("ann@example.com"), set("bad"), set("bob@example.com")]}),
        );
        let result = answer["result"].as_array().unwrap();
        assert_eq!(result[0]["obj"]["member"]["email"], "ann@example.com");
        assert_eq!(result[1]["errors"][0]["id"], "error/member/email_invalid");
        assert_eq!(s.locked_additions(), vec!["bob@example.com"]);
        let members = s.list_members(&group);
        assert_eq!(members.len(), 1);
        assert_eq!(members["ann@example.com"]["base.firstName"], "Ann");
    }

    #[test]
    fn filter_groups_and_unknown_anketas_are_refused() {
        let s = Sendsay::new();
        let filter = s.create_filter_group("computed");
        let answer = post(
            &s,
            PATH,
            None,
            json!({"action": "member.set", "email": "a@example.com", "if_exists": "overwrite", "datakey": [[format!("-group.{filter}"), "set", 1]]}),
        );
        assert_eq!(answer["errors"][0]["id"], "error/group/filter");
        let answer = post(
            &s,
            PATH,
            None,
            json!({"action": "member.set", "email": "a@example.com", "if_exists": "overwrite", "datakey": [["nosuch.q1", "set", 1]]}),
        );
        assert_eq!(answer["errors"][0]["id"], "error/anketa/not_exists");
    }
}
