//! Mailchimp Marketing API v3.
//!
//! A binding's list is an audience (`settings.audience_id`) plus a tag: Mailchimp recommends one
//! audience with tags over many audiences, and a tag is a static segment, which has an id
//! (renaming the tag at Mailchimp changes nothing here). Members are upserted 500 at a time
//! with `POST /lists/{id}` and `status_if_new` only, so an existing contact's consent is never
//! changed; tags are applied with `POST /lists/{id}/segments/{segment_id}`.

use super::{
    Binding, Capabilities, Config, ConsentStatus, LeaveAction, Limits, Member, MemberStatus, Need,
    Outcome, Provider, Spec, kit,
};
use crate::http::{Http, Method, ProviderError, Request, Response, Result};
use md5::{Digest, Md5};
use serde_json::{Map, Value, json};
use std::collections::HashMap;

pub static SPEC: Spec = Spec {
    name: "mailchimp",
    settings: &[("audience_id", Need::Required)],
    secrets: &[("api_key", Need::Required)],
    capabilities: Capabilities {
        on_leave: &["remove", "archive", "unsubscribe", "delete", "keep"],
        double_opt_in: true,
        tags: true,
        phone_identity: false,
    },
    validate,
    field_name,
    connect,
};

/// Members per batch-subscribe and per segment call (documented maximum).
const BATCH: usize = 500;

fn validate(config: &Config) -> std::result::Result<(), String> {
    let key = config.secret("api_key").unwrap_or_default();
    if config.setting("base_url").is_none() && data_center(key).is_none() {
        return Err("secrets.api_key must end with the data centre, like \"…-us21\" (or set settings.base_url)".into());
    }
    Ok(())
}

/// Merge tags: up to 10 characters of A–Z, 0–9 and `_`.
fn field_name(name: &str) -> std::result::Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 10
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err("Mailchimp merge tags are 1 to 10 characters of A-Z, 0-9 and _ (like FNAME)".into())
    }
}

fn connect(config: &Config) -> Box<dyn Provider> {
    let key = config.secret("api_key").unwrap_or_default().to_string();
    let default = format!(
        "https://{}.api.mailchimp.com",
        data_center(&key).unwrap_or("us1")
    );
    Box::new(Mailchimp {
        root: format!("{}/3.0", config.base_url(&default)),
        audience: config
            .setting("audience_id")
            .unwrap_or_default()
            .to_string(),
        api_key: key,
    })
}

/// `…-us21` → `us21`.
fn data_center(api_key: &str) -> Option<&str> {
    let (_, dc) = api_key.rsplit_once('-')?;
    (dc.len() >= 3 && dc.chars().all(|c| c.is_ascii_alphanumeric())).then_some(dc)
}

/// Mailchimp's member id: the MD5 of the lower-cased address, in hex.
pub fn subscriber_hash(address: &str) -> String {
    let digest = Md5::digest(address.to_lowercase().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

struct Mailchimp {
    root: String,
    audience: String,
    api_key: String,
}

impl Mailchimp {
    fn request(&self, method: Method, path: &str) -> Request {
        Request::new(method, format!("{}{path}", self.root))
            .header("authorization", format!("Bearer {}", self.api_key))
    }

    /// Sends and classifies: 2xx → body; 401/403 → Auth; 429/5xx → Transient; 404 → `None`;
    /// any other error → Rejected with Mailchimp's own words.
    fn call(&self, http: &mut Http, operation: &str, request: Request) -> Result<Option<Value>> {
        let response = http.send(operation, request)?;
        if response.status == 404 {
            return Ok(None);
        }
        response.check(problem)?;
        Ok(Some(response.json()?))
    }

    /// [`call`](Self::call) where a 404 means the audience itself is gone.
    fn in_audience(&self, http: &mut Http, operation: &str, request: Request) -> Result<Value> {
        self.call(http, operation, request)?
            .ok_or_else(|| self.audience_missing())
    }

    fn segments_path(&self) -> String {
        format!("/lists/{}/segments", self.audience)
    }

    /// The static segments (tags) of the audience, by name.
    fn static_segments(&self, http: &mut Http) -> Result<HashMap<String, i64>> {
        let mut segments = HashMap::new();
        let mut offset = 0;
        loop {
            let path = format!(
                "{}?type=static&count=1000&offset={offset}",
                self.segments_path()
            );
            let page = self.in_audience(http, "list tags", self.request(Method::Get, &path))?;
            let items = page["segments"].as_array().cloned().unwrap_or_default();
            for segment in &items {
                if let (Some(name), Some(id)) = (segment["name"].as_str(), segment["id"].as_i64()) {
                    segments.insert(name.to_string(), id);
                }
            }
            offset += items.len();
            if items.is_empty() || offset as u64 >= page["total_items"].as_u64().unwrap_or(0) {
                return Ok(segments);
            }
        }
    }

    fn create_segment(&self, http: &mut Http, name: &str) -> Result<i64> {
        let request = self
            .request(Method::Post, &self.segments_path())
            .json(&json!({"name": name, "static_segment": []}));
        let created = self.in_audience(http, "create tag", request)?;
        created["id"].as_i64().ok_or_else(|| {
            ProviderError::Rejected(format!(
                "Mailchimp returned no segment id for tag \"{name}\""
            ))
        })
    }

    fn audience_missing(&self) -> ProviderError {
        ProviderError::Binding(format!(
            "audience \"{}\" does not exist at Mailchimp (settings.audience_id)",
            self.audience
        ))
    }

    /// Adds or removes addresses from a static segment; returns the addresses Mailchimp could
    /// not process, with its message.
    fn update_segment(
        &self,
        http: &mut Http,
        segment: i64,
        add: &[&str],
        remove: &[&str],
    ) -> Result<HashMap<String, String>> {
        let body = json!({"members_to_add": add, "members_to_remove": remove});
        let path = format!("{}/{segment}", self.segments_path());
        let answer = self
            .call(
                http,
                "tag members",
                self.request(Method::Post, &path).json(&body),
            )?
            .ok_or_else(|| {
                ProviderError::Binding(format!(
                    "tag (static segment) {segment} no longer exists in audience \"{}\"",
                    self.audience
                ))
            })?;
        let mut failed = HashMap::new();
        for error in answer["errors"].as_array().into_iter().flatten() {
            let message = error["error"].as_str().unwrap_or("rejected").to_string();
            for address in kit::strings(&error["email_addresses"]) {
                failed.insert(address.to_lowercase(), message.clone());
            }
        }
        Ok(failed)
    }

    /// `POST /lists/{id}`: the batch subscribe endpoint, 500 members at most.
    fn batch_subscribe(
        &self,
        http: &mut Http,
        operation: &str,
        members: Vec<Value>,
    ) -> Result<Value> {
        let request = self
            .request(Method::Post, &format!("/lists/{}", self.audience))
            .json(&json!({"members": members, "update_existing": true}));
        self.in_audience(http, operation, request)
    }

    fn list_segment(binding: &Binding) -> Result<i64> {
        kit::numeric_list_id(binding, "Mailchimp tag id")
    }

    fn tag_segments(binding: &Binding) -> Vec<i64> {
        binding
            .remote_object("tag_segments")
            .into_iter()
            .flatten()
            .filter_map(|(_, v)| v.as_i64())
            .collect()
    }

    /// One call per member (archive, permanent delete): Mailchimp has no batch form for these.
    fn each_member(
        &self,
        http: &mut Http,
        operation: &str,
        members: &[Member],
        request: impl Fn(&str) -> Request,
    ) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(members.len());
        for member in members {
            let response = http.send(operation, request(&subscriber_hash(&member.address)))?;
            response.check_common(problem)?;
            outcomes.push(match response.status {
                200..=299 | 404 => Outcome::Removed,
                _ => Outcome::failed(format!("HTTP {}: {}", response.status, problem(&response))),
            });
        }
        Ok(outcomes)
    }
}

/// The audience's tags (static segments) by name, listed once for the binding's tag and its
/// other tags.
struct Segments<'a> {
    mailchimp: &'a Mailchimp,
    by_name: HashMap<String, i64>,
}

impl kit::ListDirectory for Segments<'_> {
    const KIND: &'static str = "tag (static segment)";
    const PROVIDER: &'static str = "Mailchimp";

    fn list_by_id(&mut self, _: &mut Http, id: &str) -> Result<Option<String>> {
        let id: i64 = id.parse().map_err(|_| {
            ProviderError::Binding(format!("Mailchimp tag id \"{id}\" is not a number"))
        })?;
        Ok(self
            .by_name
            .values()
            .any(|s| *s == id)
            .then(|| id.to_string()))
    }

    fn list_by_name(&mut self, _: &mut Http, name: &str) -> Result<Option<String>> {
        Ok(self.by_name.get(name).map(i64::to_string))
    }

    fn create_list(&mut self, http: &mut Http, name: &str) -> Result<String> {
        Ok(self.mailchimp.create_segment(http, name)?.to_string())
    }
}

/// Mailchimp's error words: problem+json `title: detail`, plus field errors when present.
fn problem(response: &Response) -> String {
    let Ok(body) = serde_json::from_slice::<Value>(&response.body) else {
        return response.text_excerpt();
    };
    let mut text = match (body["title"].as_str(), body["detail"].as_str()) {
        (Some(t), Some(d)) => format!("{t}: {d}"),
        (Some(t), None) => t.to_string(),
        (None, Some(d)) => d.to_string(),
        (None, None) => response.text_excerpt(),
    };
    for error in body["errors"].as_array().into_iter().flatten() {
        text.push_str(&format!(
            " [{}: {}]",
            error["field"].as_str().unwrap_or(""),
            error["message"].as_str().unwrap_or("")
        ));
    }
    text
}

/// Values as Mailchimp's merge field types want them: numbers for `number`, `MM/DD` for
/// `birthday`, `YYYY-MM-DD` for `date`, text otherwise.
fn merge_value(value: &Value, kind: Option<&str>) -> Value {
    let Some(text) = kit::text(value) else {
        return Value::String(String::new());
    };
    match kind {
        Some("number") => text
            .trim()
            .parse::<f64>()
            .map(|n| json!(n))
            .unwrap_or(Value::String(text)),
        Some("birthday") if text.len() >= 10 && text.as_bytes()[4] == b'-' => {
            Value::String(format!("{}/{}", &text[5..7], &text[8..10]))
        }
        Some("date") if text.len() >= 10 => Value::String(text[..10].to_string()),
        _ => Value::String(text),
    }
}

fn consent(status: &str) -> Option<ConsentStatus> {
    match status {
        "unsubscribed" => Some(ConsentStatus::Unsubscribed),
        "cleaned" => Some(ConsentStatus::Cleaned),
        _ => None,
    }
}

impl Provider for Mailchimp {
    fn limits(&self) -> Limits {
        // Mailchimp limits simultaneous connections (10), not the request rate; the worker
        // makes one call at a time per connection (one delivery thread each).
        Limits::batches(BATCH, BATCH)
    }

    fn check(&mut self, http: &mut Http) -> Result<Value> {
        let ping = self
            .call(http, "ping", self.request(Method::Get, "/ping"))?
            .unwrap_or(Value::Null);
        let path = format!("/lists/{}", self.audience);
        let audience = self.in_audience(http, "get audience", self.request(Method::Get, &path))?;
        Ok(json!({
            "provider": "mailchimp",
            "health": ping["health_status"],
            "audience": {"id": audience["id"], "name": audience["name"], "members": audience["stats"]["member_count"]},
        }))
    }

    fn prepare(&mut self, http: &mut Http, binding: &mut Binding) -> Result<()> {
        let path = format!("/lists/{}/merge-fields?count=1000", self.audience);
        let merge_fields =
            self.in_audience(http, "list merge fields", self.request(Method::Get, &path))?;
        let types: Map<String, Value> = merge_fields["merge_fields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| Some((f["tag"].as_str()?.to_string(), f["type"].clone())))
            .collect();
        kit::require_fields(
            "Mailchimp",
            &binding.fields,
            types.keys().map(String::as_str),
        )?;
        let mut segments = Segments {
            by_name: self.static_segments(http)?,
            mailchimp: self,
        };
        let list = kit::resolve_list(http, &mut segments, binding)?;
        let mut tag_segments = Map::new();
        for tag in &binding.tags {
            let id = match segments.by_name.get(tag) {
                Some(id) => *id,
                None => self.create_segment(http, tag)?,
            };
            tag_segments.insert(tag.clone(), json!(id));
        }
        binding.list_id = Some(list);
        binding.keep_remote("merge_field_types", types);
        binding.keep_remote("tag_segments", tag_segments);
        Ok(())
    }

    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let segment = Self::list_segment(binding)?;
        let types = binding.remote_object("merge_field_types");
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(members.len());
        let body: Vec<Value> = members
            .iter()
            .map(|m| {
                let merge_fields = kit::typed_fields(&m.fields, types, merge_value);
                json!({
                    "email_address": m.address,
                    "status_if_new": binding.new_member_status.as_str(),
                    "merge_fields": merge_fields,
                })
            })
            .collect();
        let answer = self.batch_subscribe(http, "upsert members", body)?;
        let mut by_address: HashMap<String, Outcome> = HashMap::new();
        for member in ["new_members", "updated_members"]
            .iter()
            .flat_map(|k| answer[*k].as_array().cloned().unwrap_or_default())
        {
            let Some(address) = member["email_address"].as_str() else {
                continue;
            };
            let status = member["status"].as_str().unwrap_or("subscribed");
            let outcome = match consent(status) {
                Some(consent) => Outcome::Refused {
                    status: consent,
                    message: format!("the contact is {status} at Mailchimp"),
                },
                None => Outcome::Member {
                    status: if status == "pending" {
                        MemberStatus::Pending
                    } else {
                        MemberStatus::Subscribed
                    },
                    remote_id: member["id"].as_str().map(str::to_string),
                },
            };
            by_address.insert(address.to_lowercase(), outcome);
        }
        for error in answer["errors"].as_array().into_iter().flatten() {
            let Some(address) = error["email_address"].as_str() else {
                continue;
            };
            let mut message = error["error"].as_str().unwrap_or("rejected").to_string();
            if let Some(field) = error["field_message"].as_str().filter(|f| !f.is_empty()) {
                message = format!("{message} ({field})");
            }
            by_address.insert(address.to_lowercase(), Outcome::failed(message));
        }

        let tagged: Vec<&str> = members
            .iter()
            .filter(|m| matches!(by_address.get(&m.address), Some(Outcome::Member { .. })))
            .map(|m| m.address.as_str())
            .collect();
        let mut untagged = HashMap::new();
        if !tagged.is_empty() {
            for segment in std::iter::once(segment).chain(Self::tag_segments(binding)) {
                untagged.extend(self.update_segment(http, segment, &tagged, &[])?);
            }
        }
        for member in members {
            let outcome = match (
                by_address.remove(&member.address),
                untagged.get(&member.address),
            ) {
                (Some(Outcome::Member { .. }), Some(message)) => {
                    Outcome::failed(format!("could not be tagged: {message}"))
                }
                (Some(outcome), _) => outcome,
                (None, _) => Outcome::retry("Mailchimp did not report this member"),
            };
            outcomes.push(outcome);
        }
        Ok(outcomes)
    }

    fn remove(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        action: LeaveAction,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let segment = Self::list_segment(binding)?;
        let audience = self.audience.clone();
        match action {
            LeaveAction::Remove | LeaveAction::Unsubscribe => {
                if action == LeaveAction::Unsubscribe {
                    let body = members
                        .iter()
                        .map(|m| json!({"email_address": m.address, "status": "unsubscribed"}))
                        .collect();
                    self.batch_subscribe(http, "unsubscribe members", body)?;
                }
                let addresses: Vec<&str> = members.iter().map(|m| m.address.as_str()).collect();
                // Addresses the segment no longer holds are what we wanted: removed.
                self.update_segment(http, segment, &[], &addresses)?;
                Ok(vec![Outcome::Removed; members.len()])
            }
            LeaveAction::Archive => self.each_member(http, "archive member", members, |hash| {
                self.request(Method::Delete, &format!("/lists/{audience}/members/{hash}"))
            }),
            LeaveAction::Delete => self.erase(http, binding, members),
        }
    }

    fn erase(
        &mut self,
        http: &mut Http,
        _binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let audience = self.audience.clone();
        self.each_member(http, "delete member permanently", members, |hash| {
            self.request(
                Method::Post,
                &format!("/lists/{audience}/members/{hash}/actions/delete-permanent"),
            )
        })
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn subscriber_hash_is_md5_of_lowercase() {
        assert_eq!(
            subscriber_hash("Urist.McVankab@freddiesjokes.com"),
            "62eeb292278cc15f5817cb78f7790b08"
        );
    }

    #[test]
    fn data_centre_comes_from_the_key() {
        assert_eq!(data_center("0123456789abcdef-us21"), Some("us21"));
        assert_eq!(data_center("nodash"), None);
        let config = crate::providers::test_support::config(json!({}), json!({"api_key": "k"}));
        assert!(validate(&config).is_err());
    }

    #[test]
    fn merge_tags_are_checked() {
        assert!(field_name("FNAME").is_ok());
        assert!(field_name("fname").is_err());
        assert!(field_name("TOOLONGNAME1").is_err());
    }

    #[test]
    fn merge_values_follow_field_types() {
        assert_eq!(merge_value(&json!("42"), Some("number")), json!(42.0));
        assert_eq!(
            merge_value(&json!("1990-07-14"), Some("birthday")),
            json!("07/14")
        );
        assert_eq!(merge_value(&json!(5), Some("text")), json!("5"));
        assert_eq!(merge_value(&Value::Null, Some("text")), json!(""));
    }
}

#[cfg(test)]
mod fake {
    use super::*;
    use crate::providers::conformance::{Consent, Erasure, Fake, WRONG_SECRET, conformance_suite};
    use crate::providers::test_support;
    use listsync_emulator::Emulator;

    const AUDIENCE: &str = "a1b2c3";
    const KEY: &str = "0123456789abcdef-us21";

    fn provider(emulator: &Emulator, api_key: &str) -> Box<dyn Provider> {
        connect(&test_support::config(
            json!({"audience_id": AUDIENCE, "base_url": emulator.base_url("mailchimp")}),
            json!({"api_key": api_key}),
        ))
    }

    struct MailchimpFake;

    impl Fake for MailchimpFake {
        const SPEC: &'static Spec = &SPEC;

        fn connect(emulator: &Emulator) -> Box<dyn Provider> {
            emulator.mailchimp().set_api_key(KEY);
            emulator.mailchimp().create_audience(AUDIENCE);
            provider(emulator, KEY)
        }

        fn connect_with_wrong_secret(emulator: &Emulator) -> Box<dyn Provider> {
            provider(emulator, WRONG_SECRET)
        }

        fn binding() -> Binding {
            test_support::binding(&["FNAME", "LNAME"])
        }

        fn member(address: &str) -> Member {
            test_support::member(address, json!({"FNAME": "Ann", "LNAME": "Lee"}))
        }

        fn refuse(emulator: &Emulator, address: &str) -> &'static str {
            emulator
                .mailchimp()
                .reject_address(address, "This address looks fake or invalid");
            "This address looks fake or invalid"
        }

        fn knows(emulator: &Emulator, address: &str) -> bool {
            emulator.mailchimp().member(AUDIENCE, address).is_some()
        }
    }

    impl Consent for MailchimpFake {
        fn unsubscribe(emulator: &Emulator, _: &Binding, address: &str) {
            assert!(
                emulator
                    .mailchimp()
                    .set_status(AUDIENCE, address, "unsubscribed")
            );
        }
    }

    impl Erasure for MailchimpFake {
        /// Deleted permanently, not archived as a plain DELETE would.
        fn erased(emulator: &Emulator, address: &str) -> bool {
            emulator
                .mailchimp()
                .permanently_deleted(AUDIENCE)
                .contains(address)
        }
    }

    conformance_suite!(MailchimpFake {
        consent: supported,
        erasure: supported
    });
}

#[cfg(test)]
mod contract {
    use super::*;
    use crate::providers::contract::{Prism, assert_all_valid};
    use crate::providers::test_support;

    fn binding(list_id: Option<&str>) -> Binding {
        Binding {
            list_id: list_id.map(str::to_string),
            tags: vec!["crm".into()],
            ..test_support::binding(&[])
        }
    }

    fn member(address: &str) -> Member {
        test_support::member(address, json!({"FNAME": "Ann", "LNAME": "Lee"}))
    }

    #[test]
    fn every_request_validates_against_the_official_spec() {
        let prism = Prism::start("mailchimp-marketing-lists-subset.json");
        let mut http = prism.http();
        let config = test_support::config(
            json!({"audience_id": "a1b2c3", "base_url": prism.base_url}),
            json!({"api_key": "0123456789abcdef-us21"}),
        );
        let mut provider = connect(&config);
        provider.check(&mut http).expect("ping and audience");
        let mut created = binding(None);
        provider
            .prepare(&mut http, &mut created)
            .expect("prepare creates the tag");
        let members = [member("ann@example.com"), member("bob@example.com")];
        provider
            .upsert(&mut http, &created, &members)
            .expect("upsert");
        let mut leaving = binding(Some("0"));
        leaving.remote = created.remote.clone();
        for action in [
            LeaveAction::Remove,
            LeaveAction::Archive,
            LeaveAction::Unsubscribe,
            LeaveAction::Delete,
        ] {
            provider
                .remove(&mut http, &leaving, action, &members)
                .expect("remove");
        }
        provider
            .erase(&mut http, &created, &members)
            .expect("erase");
        assert_all_valid(&http.drain_records());
    }
}
