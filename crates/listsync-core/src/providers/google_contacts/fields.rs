//! Mapping fields onto a contact: a member's mapped values, merged into the contact's own
//! entries so that only the mapped fields and the entries the sync wrote change, and the body
//! of an update written back with the contact's etag.

use super::directory::entry_values_of;
use super::{Field, WRITTEN_FIELDS, parse_field};
use crate::address::phone_identity;
use crate::providers::{Member, kit};
use serde_json::{Map, Value, json};
use std::collections::BTreeSet;

/// A member's mapped values as text (`None`: NULL or blank, which clears the field).
pub(super) fn wanted(member: &Member) -> std::result::Result<Vec<(Field, Option<String>)>, String> {
    member
        .fields
        .iter()
        .map(|(name, value)| {
            let field = parse_field(name)
                .ok_or_else(|| format!("\"{name}\" is not a Google Contacts field"))?;
            Ok((field, kit::text(value).filter(|t| !t.trim().is_empty())))
        })
        .collect()
}

/// `YYYY-MM-DD` (a timestamp's date part too) or `--MM-DD` (no year) → a People API `Date`.
pub(super) fn birthday(text: &str) -> std::result::Result<Value, String> {
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
pub(super) fn same_phone(a: &str, b: &str) -> bool {
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
pub(super) fn contact_fields(person: &Value) -> Map<String, Value> {
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

pub(super) fn client_data(fields: &Map<String, Value>, key: &str) -> Option<String> {
    fields
        .get("clientData")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|e| e["key"] == key)
        .and_then(|e| e["value"].as_str())
        .map(str::to_string)
}

pub(super) fn set_client_data(fields: &mut Map<String, Value>, key: &str, value: Option<&str>) {
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
pub(super) fn merge(
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
pub(super) fn changed_fields(
    before: &Map<String, Value>,
    after: &Map<String, Value>,
) -> BTreeSet<&'static str> {
    WRITTEN_FIELDS
        .iter()
        .copied()
        .filter(|f| before.get(*f) != after.get(*f))
        .collect()
}

pub(super) fn memberships(person: &Value) -> BTreeSet<String> {
    person["memberships"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["contactGroupMembership"]["contactGroupResourceName"].as_str())
        .map(str::to_string)
        .collect()
}

/// An update of one contact: the person as read, and the members (indices) it serves.
pub(super) struct Update {
    pub(super) person: Value,
    pub(super) members: Vec<usize>,
}

/// A contact to write: its fields after the merge, and which of them changed.
pub(super) struct Write {
    pub(super) name: String,
    pub(super) update: Update,
    pub(super) fields: Map<String, Value>,
    pub(super) changed: BTreeSet<&'static str>,
}

/// The body of an update: resource name, etag and contact source (Google checks it against
/// the contact's), and the fields in the mask, cleared when absent.
pub(super) fn update_body(
    person: &Value,
    fields: &Map<String, Value>,
    mask: &BTreeSet<&str>,
) -> Value {
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
