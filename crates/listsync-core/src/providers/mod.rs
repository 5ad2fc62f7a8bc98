//! Providers: one module per email provider behind the [`Provider`] trait, plus the registry
//! that validates connection settings and builds a provider from them.
//!
//! A provider only translates: it receives batches already planned by the delivery engine
//! (who joins, who leaves, with which fields), calls its API through the shared [`Http`]
//! client, and reports one [`Outcome`] per member. Retries, batching, rate limits, dead letters
//! and state all live in the engine, once.
//!
//! Adding a provider: a new file with a `pub static SPEC: Spec` and a line in [`SPECS`].

use crate::http::{Http, RateLimit, Result};
use serde_json::{Map, Value};
use std::time::Duration;

#[cfg(test)]
mod conformance;
#[cfg(test)]
pub mod contract;
pub mod esputnik;
pub mod google_contacts;
pub mod kit;
pub mod mailchimp;
pub mod mailerlite;
pub mod sendgrid;
pub mod sendpulse;
pub mod sendsay;
#[cfg(test)]
mod test_support;
pub mod unisender;
pub mod webhook;

/// What [`Provider::remove`] does at the provider to members who left the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaveAction {
    /// Untag / remove from the list; the contact stays at the provider.
    Remove,
    /// Archive the contact (where the provider has archiving).
    Archive,
    /// Mark the contact unsubscribed.
    Unsubscribe,
    /// Delete the contact.
    Delete,
}

impl LeaveAction {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveAction::Remove => "remove",
            LeaveAction::Archive => "archive",
            LeaveAction::Unsubscribe => "unsubscribe",
            LeaveAction::Delete => "delete",
        }
    }
}

/// A binding's `on_leave`: what becomes of members who leave its filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnLeave {
    /// Leave them as they are at the provider: the sync forgets them and sends nothing.
    Keep,
    /// Apply the action at the provider.
    Act(LeaveAction),
}

impl OnLeave {
    /// Every value `on_leave` may take.
    pub const ALL: [OnLeave; 5] = [
        OnLeave::Act(LeaveAction::Remove),
        OnLeave::Act(LeaveAction::Archive),
        OnLeave::Act(LeaveAction::Unsubscribe),
        OnLeave::Act(LeaveAction::Delete),
        OnLeave::Keep,
    ];

    /// The setting `text` names; `None` when it names none.
    pub fn parse(text: &str) -> Option<OnLeave> {
        OnLeave::ALL.into_iter().find(|o| o.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OnLeave::Keep => "keep",
            OnLeave::Act(action) => action.as_str(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberStatus {
    Subscribed,
    /// Waiting for double opt-in confirmation.
    Pending,
}

impl MemberStatus {
    /// Every status a member of a list can have.
    pub const ALL: [MemberStatus; 2] = [MemberStatus::Subscribed, MemberStatus::Pending];

    /// The status `text` names; `None` when it names none.
    pub fn parse(text: &str) -> Option<MemberStatus> {
        MemberStatus::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            MemberStatus::Subscribed => "subscribed",
            MemberStatus::Pending => "pending",
        }
    }
}

/// A consent state the provider holds for an address; the sync never overrides it
/// (semantics 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentStatus {
    Unsubscribed,
    Cleaned,
    Bounced,
    Complained,
}

impl ConsentStatus {
    /// Every consent state the sync records for a refused address.
    pub const ALL: [ConsentStatus; 4] = [
        ConsentStatus::Unsubscribed,
        ConsentStatus::Cleaned,
        ConsentStatus::Bounced,
        ConsentStatus::Complained,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ConsentStatus::Unsubscribed => "unsubscribed",
            ConsentStatus::Cleaned => "cleaned",
            ConsentStatus::Bounced => "bounced",
            ConsentStatus::Complained => "complained",
        }
    }
}

/// What a provider must know about the binding it serves.
#[derive(Debug, Clone)]
pub struct Binding {
    pub id: i64,
    pub filter: String,
    /// The provider's id of the list; `None` until `prepare` created it.
    pub list_id: Option<String>,
    /// The name to create the list with: `<filter> (<owner>)`.
    pub list_name: String,
    pub tags: Vec<String>,
    /// The provider field names the binding maps.
    pub fields: Vec<String>,
    pub new_member_status: MemberStatus,
    /// Provider-specific ids resolved by `prepare` (segment ids, field ids, ...), kept in
    /// `listsync.bindings.remote`.
    pub remote: Map<String, Value>,
}

impl Binding {
    /// An object `prepare` kept in `remote`; `None` before it ran.
    pub fn remote_object(&self, key: &str) -> Option<&Map<String, Value>> {
        self.remote.get(key).and_then(Value::as_object)
    }

    pub fn keep_remote(&mut self, key: &str, object: Map<String, Value>) {
        self.remote.insert(key.to_string(), Value::Object(object));
    }
}

/// One address to add, update or remove.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub address: String,
    /// Mapped fields (provider field name → value) for an upsert; empty for a removal.
    pub fields: Map<String, Value>,
    /// The provider's id for the address, when an earlier delivery recorded one.
    pub remote_id: Option<String>,
}

/// What happened to one member of a batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// It is in the list with the fields sent.
    Member {
        status: MemberStatus,
        remote_id: Option<String>,
    },
    /// It is no longer in the list.
    Removed,
    /// The provider holds a consent state for it that the sync must respect: a terminal
    /// outcome, never retried.
    Refused {
        status: ConsentStatus,
        message: String,
    },
    /// Refused for good, with the provider's words: a dead letter.
    Failed { message: String },
    /// Failed for now: retried with backoff.
    Retry {
        message: String,
        retry_after: Option<Duration>,
    },
}

impl Outcome {
    pub fn member(status: MemberStatus, remote_id: Option<String>) -> Outcome {
        Outcome::Member { status, remote_id }
    }

    pub fn failed(message: impl Into<String>) -> Outcome {
        Outcome::Failed {
            message: message.into(),
        }
    }

    /// A retry after the engine's own backoff: the provider named no time.
    pub fn retry(message: impl Into<String>) -> Outcome {
        Outcome::Retry {
            message: message.into(),
            retry_after: None,
        }
    }

    /// `Removed`, unless the provider reported a failure for the member.
    pub fn removed_unless(failure: Option<impl Into<String>>) -> Outcome {
        failure.map_or(Outcome::Removed, Outcome::failed)
    }
}

/// A provider's documented limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Members per upsert call.
    pub upsert_batch: usize,
    /// Members per removal call.
    pub remove_batch: usize,
    /// Request rate for one account.
    pub rate: Option<RateLimit>,
}

impl Limits {
    /// Batch sizes and no request rate: the provider publishes none, or limits something else.
    pub fn batches(upsert_batch: usize, remove_batch: usize) -> Limits {
        Limits {
            upsert_batch,
            remove_batch,
            rate: None,
        }
    }

    /// Paced to `per_second` requests on average, `burst` at once.
    pub fn paced(self, per_second: f64, burst: f64) -> Limits {
        Limits {
            rate: Some(RateLimit { per_second, burst }),
            ..self
        }
    }
}

pub trait Provider: Send {
    fn limits(&self) -> Limits;

    /// A cheap authenticated call proving the credentials (and settings) work.
    fn check(&mut self, http: &mut Http) -> Result<Value>;

    /// Gets the binding's list ready: creates it (named `binding.list_name`) when `list_id` is
    /// `None`, or checks the given one exists; resolves tags and mapped fields. Idempotent: it
    /// runs again after a restart or a `resync`.
    fn prepare(&mut self, http: &mut Http, binding: &mut Binding) -> Result<()>;

    /// Adds or updates members (at most `limits().upsert_batch`): one outcome per member, in
    /// order. New members get `binding.new_member_status`; existing ones keep their consent.
    fn upsert(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>>;

    /// Applies `action` to members that left the filter (at most `limits().remove_batch`): one
    /// outcome per member, in order.
    fn remove(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        action: LeaveAction,
        members: &[Member],
    ) -> Result<Vec<Outcome>>;

    /// Erases members for good (GDPR): one outcome per member, in order.
    fn erase(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>>;
}

/// What a provider can do, checked at bind time (without the network).
#[derive(Debug, Clone, Copy)]
pub struct Capabilities {
    pub on_leave: &'static [&'static str],
    pub double_opt_in: bool,
    pub tags: bool,
    /// Contacts without an email can be held, identified by their phone (`tel:` addresses).
    pub phone_identity: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    Required,
    Optional,
}

/// A connection's settings and secrets.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Map<String, Value>,
    pub secrets: Map<String, Value>,
}

impl Config {
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.settings.get(key).and_then(Value::as_str)
    }

    pub fn secret(&self, key: &str) -> Option<&str> {
        self.secrets.get(key).and_then(Value::as_str)
    }

    /// The API root: `settings.base_url` when given (tests, emulators), else `default`.
    pub fn base_url(&self, default: &str) -> String {
        self.setting("base_url")
            .unwrap_or(default)
            .trim_end_matches('/')
            .to_string()
    }
}

/// A provider's declaration: its name, its configuration keys, what it can do, how to build it.
pub struct Spec {
    pub name: &'static str,
    /// Keys of `settings` besides `base_url`, which every provider accepts.
    pub settings: &'static [(&'static str, Need)],
    pub secrets: &'static [(&'static str, Need)],
    pub capabilities: Capabilities,
    /// Checks beyond key presence (formats, combinations).
    pub validate: fn(&Config) -> std::result::Result<(), String>,
    /// Whether a provider field name is acceptable (e.g. Mailchimp merge tags).
    pub field_name: fn(&str) -> std::result::Result<(), String>,
    pub connect: fn(&Config) -> Box<dyn Provider>,
}

pub static SPECS: &[&Spec] = &[
    &mailchimp::SPEC,
    &webhook::SPEC,
    &mailerlite::SPEC,
    &unisender::SPEC,
    &sendpulse::SPEC,
    &esputnik::ESPUTNIK,
    &esputnik::YESPO,
    &sendgrid::SPEC,
    &sendsay::SPEC,
    &google_contacts::SPEC,
];

pub fn spec(provider: &str) -> Option<&'static Spec> {
    SPECS.iter().copied().find(|s| s.name == provider)
}

pub fn capabilities(provider: &str) -> Option<Capabilities> {
    spec(provider).map(|s| s.capabilities)
}

fn unknown_provider(provider: &str) -> String {
    let known: Vec<&str> = SPECS.iter().map(|s| s.name).collect();
    format!(
        "unknown provider \"{provider}\" (one of {})",
        known.join(", ")
    )
}

/// Checks a connection's configuration without the network: the provider exists, no key is
/// unknown, none required is missing, values are strings, and the provider's own rules hold.
/// Messages name the key, never a secret's value.
pub fn validate_config(
    provider: &str,
    settings: &Value,
    secrets: &Value,
) -> std::result::Result<(), String> {
    let spec = spec(provider).ok_or_else(|| unknown_provider(provider))?;
    let config = to_config(settings, secrets)?;
    check_keys("settings", &config.settings, spec.settings, true)?;
    check_keys("secrets", &config.secrets, spec.secrets, false)?;
    if let Some(base) = config.setting("base_url")
        && !(base.starts_with("https://") || base.starts_with("http://"))
    {
        return Err(format!(
            "settings.base_url must be an http(s) URL, not \"{base}\""
        ));
    }
    (spec.validate)(&config)
}

fn to_config(settings: &Value, secrets: &Value) -> std::result::Result<Config, String> {
    let object = |what: &str, v: &Value| match v {
        Value::Object(o) => Ok(o.clone()),
        Value::Null => Ok(Map::new()),
        _ => Err(format!("{what} must be a JSON object")),
    };
    Ok(Config {
        settings: object("settings", settings)?,
        secrets: object("secrets", secrets)?,
    })
}

fn check_keys(
    what: &str,
    given: &Map<String, Value>,
    declared: &[(&str, Need)],
    base_url: bool,
) -> std::result::Result<(), String> {
    for (key, value) in given {
        let known = declared.iter().any(|(k, _)| k == key) || (base_url && key == "base_url");
        if !known {
            let mut keys: Vec<&str> = declared.iter().map(|(k, _)| *k).collect();
            if base_url {
                keys.push("base_url");
            }
            return Err(format!(
                "unknown key {what}.{key} (known: {})",
                keys.join(", ")
            ));
        }
        if !value.is_string() {
            return Err(format!("{what}.{key} must be a string"));
        }
    }
    for (key, need) in declared {
        if *need == Need::Required
            && given
                .get(*key)
                .and_then(Value::as_str)
                .is_none_or(|v| v.trim().is_empty())
        {
            return Err(format!("missing required key {what}.{key}"));
        }
    }
    Ok(())
}

pub fn validate_field_name(provider: &str, field: &str) -> std::result::Result<(), String> {
    let spec = spec(provider).ok_or_else(|| unknown_provider(provider))?;
    if field.trim().is_empty() {
        return Err("a field name cannot be empty".into());
    }
    (spec.field_name)(field)
}

/// Builds a provider from a validated configuration.
pub fn connect(
    provider: &str,
    settings: &Value,
    secrets: &Value,
) -> std::result::Result<Box<dyn Provider>, String> {
    validate_config(provider, settings, secrets)?;
    let spec = spec(provider).ok_or_else(|| unknown_provider(provider))?;
    Ok((spec.connect)(&to_config(settings, secrets)?))
}

/// Any field name the provider accepts as is.
pub fn any_field_name(_: &str) -> std::result::Result<(), String> {
    Ok(())
}

/// No checks beyond the declared keys.
pub fn no_extra_validation(_: &Config) -> std::result::Result<(), String> {
    Ok(())
}

/// Splits `items` into chunks of at most `size` (at least 1).
pub fn chunks<T>(items: &[T], size: usize) -> std::slice::Chunks<'_, T> {
    items.chunks(size.max(1))
}

#[cfg(test)]
mod unit {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_read_back_what_they_write() {
        assert_eq!(
            OnLeave::ALL.map(OnLeave::as_str),
            ["remove", "archive", "unsubscribe", "delete", "keep"]
        );
        for on_leave in OnLeave::ALL {
            assert_eq!(OnLeave::parse(on_leave.as_str()), Some(on_leave));
        }
        assert_eq!(OnLeave::parse("vanish"), None);
        assert_eq!(
            MemberStatus::ALL.map(MemberStatus::as_str),
            ["subscribed", "pending"]
        );
        for status in MemberStatus::ALL {
            assert_eq!(MemberStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(MemberStatus::parse("unsubscribed"), None);
    }

    #[test]
    fn providers_declare_only_known_on_leave_values() {
        for spec in SPECS {
            for value in spec.capabilities.on_leave {
                assert!(OnLeave::parse(value).is_some(), "{}: {value}", spec.name);
            }
        }
    }

    #[test]
    fn unknown_and_missing_keys_are_named() {
        let e = validate_config(
            "mailchimp",
            &json!({"audience_id": "a1", "colour": "red"}),
            &json!({"api_key": "k-us1"}),
        )
        .unwrap_err();
        assert!(e.contains("settings.colour"), "{e}");
        let e = validate_config("mailchimp", &json!({}), &json!({"api_key": "k-us1"})).unwrap_err();
        assert!(e.contains("settings.audience_id"), "{e}");
        let e =
            validate_config("mailchimp", &json!({"audience_id": "a1"}), &json!({})).unwrap_err();
        assert!(e.contains("secrets.api_key"), "{e}");
        assert!(
            validate_config("nosuch", &json!({}), &json!({}))
                .unwrap_err()
                .contains("one of mailchimp")
        );
    }

    #[test]
    fn secret_values_never_appear_in_errors() {
        let e = validate_config(
            "mailchimp",
            &json!({"audience_id": "a1"}),
            &json!({"api_key": "supersecret", "x": "y"}),
        )
        .unwrap_err();
        assert!(!e.contains("supersecret"), "{e}");
    }

    #[test]
    fn base_url_is_accepted_everywhere_and_checked() {
        for spec in SPECS {
            let mut settings = Map::new();
            for (k, _) in spec.settings {
                settings.insert(k.to_string(), json!("https://x.example/hook"));
            }
            settings.insert("base_url".into(), json!("ftp://x"));
            let mut secrets = Map::new();
            for (k, _) in spec.secrets {
                secrets.insert(k.to_string(), json!("k-us1"));
            }
            let e = validate_config(spec.name, &Value::Object(settings), &Value::Object(secrets))
                .unwrap_err();
            assert!(e.contains("base_url"), "{}: {e}", spec.name);
        }
    }
}
