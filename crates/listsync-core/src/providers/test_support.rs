//! Fixture builders shared by the provider tests.

use super::Member;
use serde_json::Value;

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
