//! The directory: the account's contacts by address. It is how an address seen for the first
//! time finds the contact the user already has; the calls that fill it from
//! `people/me/connections` and keep it current with its sync token are in `calls.rs`.

use crate::address::phone_identity;
use serde_json::Value;
use std::collections::HashMap;

/// Which contacts hold which identities (see [`identities_of`]), and the sync token to catch up
/// from. Its size is the account's contact count, which the 25,000 cap is checked against.
#[derive(Default)]
pub(super) struct Directory {
    pub(super) people: HashMap<String, Vec<String>>,
    by_address: HashMap<String, Vec<String>>,
    pub(super) sync_token: Option<String>,
}

impl Directory {
    pub(super) fn put(&mut self, person: &str, addresses: Vec<String>) {
        self.drop_person(person);
        for address in &addresses {
            self.by_address
                .entry(address.clone())
                .or_default()
                .push(person.to_string());
        }
        self.people.insert(person.to_string(), addresses);
    }

    pub(super) fn drop_person(&mut self, person: &str) {
        for address in self.people.remove(person).unwrap_or_default() {
            if let Some(holders) = self.by_address.get_mut(&address) {
                holders.retain(|p| p != person);
                if holders.is_empty() {
                    self.by_address.remove(&address);
                }
            }
        }
    }

    pub(super) fn holders(&self, address: &str) -> &[String] {
        self.by_address
            .get(&address.to_lowercase())
            .map_or(&[], Vec::as_slice)
    }

    pub(super) fn apply(&mut self, listing: Listing) {
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
pub(super) struct Listing {
    pub(super) people: Vec<(String, Option<Vec<String>>)>,
    pub(super) sync_token: Option<String>,
}

pub(super) fn entry_values_of(entries: &[Value]) -> impl Iterator<Item = &str> {
    entries.iter().filter_map(|e| e["value"].as_str())
}

pub(super) fn entry_values<'a>(person: &'a Value, field: &str) -> impl Iterator<Item = &'a str> {
    entry_values_of(person[field].as_array().map_or(&[], Vec::as_slice))
}

/// The member addresses a contact answers to, in its order: its emails (lower-cased), or when
/// it has none its numbers as `tel:` identities, as a row's identity is its email before its
/// phone.
pub(super) fn identities_of(person: &Value) -> Vec<String> {
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
