//! Fixture builders shared by the provider tests.

use super::conformance::Fake;
use super::{
    Binding, Config, ConsentStatus, LeaveAction, Member, MemberStatus, Outcome, Provider, Spec,
};
use crate::http::{Http, ProviderError};
use listsync_emulator::Emulator;
use serde_json::{Map, Value, json};
use std::time::Duration;

/// A client for the local fakes. No test injects a stall, so the timeout is only a ceiling
/// for a debug-built fake on a busy machine.
pub fn http() -> Http {
    Http::local(Duration::from_secs(5))
}

/// A fresh emulator with `F`'s account opened, a provider connected to it and a client: where
/// a provider's own tests against its fake start.
pub fn connected<F: Fake>() -> (Emulator, Box<dyn Provider>, Http) {
    let emulator = Emulator::start();
    let provider = F::connect(&emulator);
    (emulator, provider, http())
}

/// A provider with its client and a prepared binding, so that a test's upserts and removals
/// name only the members. The emulator stays apart, for the test to look into between calls.
pub struct Bound {
    pub provider: Box<dyn Provider>,
    pub http: Http,
    pub binding: Binding,
}

impl Bound {
    /// [`connected`] to `F`'s fake, with `F`'s binding prepared.
    pub fn new<F: Fake>() -> (Emulator, Bound) {
        let (emulator, mut provider, mut http) = connected::<F>();
        let mut binding = F::binding();
        provider.prepare(&mut http, &mut binding).expect("prepare");
        let bound = Bound {
            provider,
            http,
            binding,
        };
        (emulator, bound)
    }

    pub fn upsert(&mut self, members: &[Member]) -> Vec<Outcome> {
        self.provider
            .upsert(&mut self.http, &self.binding, members)
            .expect("upsert")
    }

    pub fn remove(&mut self, action: LeaveAction, members: &[Member]) -> Vec<Outcome> {
        self.provider
            .remove(&mut self.http, &self.binding, action, members)
            .expect("remove")
    }

    pub fn erase(&mut self, members: &[Member]) -> Vec<Outcome> {
        self.provider
            .erase(&mut self.http, &self.binding, members)
            .expect("erase")
    }
}

/// Whether `outcome` is a member who joined (or stayed) subscribed.
pub fn is_subscribed(outcome: &Outcome) -> bool {
    matches!(
        outcome,
        Outcome::Member {
            status: MemberStatus::Subscribed,
            ..
        }
    )
}

/// A member with `fields` (a JSON object) and no recorded provider id.
pub fn member(address: &str, fields: Value) -> Member {
    known_member(address, fields, None)
}

/// A member whose provider id an earlier delivery recorded (or not).
pub fn known_member(address: &str, fields: Value, remote_id: Option<&str>) -> Member {
    Member {
        address: address.into(),
        fields: fields
            .as_object()
            .cloned()
            .expect("member fields are a JSON object"),
        remote_id: remote_id.map(str::to_string),
    }
}

/// Binding 1 of filter `vip` mapping `fields`, not yet prepared, adding members as subscribed.
pub fn binding(fields: &[&str]) -> Binding {
    Binding {
        id: 1,
        filter: "vip".into(),
        list_id: None,
        list_name: "vip (crm)".into(),
        tags: vec![],
        fields: fields.iter().map(|f| f.to_string()).collect(),
        new_member_status: MemberStatus::Subscribed,
        remote: Map::new(),
    }
}

/// The provider's id for a member who joined subscribed; panics on any other outcome, so a
/// test taking the id also checks the member joined.
pub fn remote_id(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Member {
            remote_id: Some(id),
            status: MemberStatus::Subscribed,
        } => id.clone(),
        other => panic!("not a subscribed member with an id: {other:?}"),
    }
}

/// A provider's configuration from two JSON objects, its settings and its secrets.
pub fn config(settings: Value, secrets: Value) -> Config {
    let object = |value: Value| {
        value
            .as_object()
            .cloned()
            .expect("settings and secrets are JSON objects")
    };
    Config {
        settings: object(settings),
        secrets: object(secrets),
    }
}

/// The consent status a refusal names; `None` for any other outcome.
pub fn refusal_status(outcome: &Outcome) -> Option<ConsentStatus> {
    match outcome {
        Outcome::Refused { status, .. } => Some(*status),
        _ => None,
    }
}

/// Asserts that `provider` refuses, as a binding error, every leave action `spec` does not
/// offer: a binding set to one must stop at the first leave, not do something else instead.
pub fn assert_unoffered_leaves_are_refused(
    spec: &Spec,
    provider: &mut Box<dyn Provider>,
    http: &mut Http,
    binding: &Binding,
) {
    let leaving = [member("leaver@example.com", json!({}))];
    for action in [
        LeaveAction::Remove,
        LeaveAction::Archive,
        LeaveAction::Unsubscribe,
        LeaveAction::Delete,
    ] {
        if !spec.capabilities.on_leave.contains(&action.as_str()) {
            let removed = provider.remove(http, binding, action, &leaving);
            assert!(
                matches!(removed, Err(ProviderError::Binding(_))),
                "{action:?}: {removed:?}"
            );
        }
    }
}
