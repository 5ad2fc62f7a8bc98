//! Fixture builders shared by the provider tests.

use super::{Binding, Member, MemberStatus};
use serde_json::{Map, Value};

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
