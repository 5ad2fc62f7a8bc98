//! Leaving and erasing: members taken out of the binding's group (`on_leave => 'remove'`), or
//! deleted when the sync created them and no other label holds them (`'delete'`). Erasure
//! itself (`Provider::erase`, in `mod.rs`) deletes every contact holding the address.

use super::fields::{client_data, contact_fields, memberships};
use super::{CREATED_KEY, GoogleContacts, MY_CONTACTS, distinct, list_group, tag_groups};
use crate::http::{Http, Result};
use crate::providers::{Binding, Member, Outcome};
use std::collections::BTreeSet;

impl GoogleContacts {
    /// Takes contacts out of the binding's group (they stay): one outcome per name.
    pub(super) fn leave_group(
        &mut self,
        http: &mut Http,
        group: &str,
        names: &[Option<String>],
    ) -> Result<Vec<Outcome>> {
        let leaving = distinct(names.iter().flatten());
        let (_, kept) = if leaving.is_empty() {
            Default::default()
        } else {
            self.modify(http, group, &[], &leaving)?
        };
        Ok(names
            .iter()
            .map(|name| match name {
                Some(name) if kept.contains(name) => Outcome::failed(format!(
                    "Google keeps every contact in at least one group and {group} is the last one of {name}"
                )),
                _ => Outcome::Removed,
            })
            .collect())
    }

    /// Deletes the contacts the sync created and nothing else holds; the others only leave the
    /// binding's group.
    pub(super) fn delete_members(
        &mut self,
        http: &mut Http,
        binding: &Binding,
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let group = list_group(binding)?;
        let mut ours: BTreeSet<String> = tag_groups(binding).into_iter().collect();
        ours.insert(group.clone());
        ours.insert(MY_CONTACTS.to_string());
        let names = self.resolve(http, members)?;
        let known: Vec<String> = names.iter().flatten().cloned().collect();
        let people = self.fetch(http, &known)?;
        let (mut deleting, mut leaving) = (BTreeSet::new(), Vec::new());
        for (i, name) in names.iter().enumerate() {
            let Some((name, person)) = name.as_ref().and_then(|n| Some((n, people.get(n)?))) else {
                continue;
            };
            let created = client_data(&contact_fields(person), CREATED_KEY).is_some();
            if created && memberships(person).is_subset(&ours) {
                deleting.insert(name.clone());
            } else {
                leaving.push((i, Some(name.clone())));
            }
        }
        let deleting: Vec<String> = deleting.into_iter().collect();
        let failed = self.delete(http, &deleting)?;
        let leaving_names: Vec<Option<String>> = leaving.iter().map(|(_, n)| n.clone()).collect();
        let left = self.leave_group(http, &group, &leaving_names)?;
        let mut outcomes: Vec<Outcome> = names
            .iter()
            .map(|name| Outcome::removed_unless(name.as_ref().and_then(|n| failed.get(n))))
            .collect();
        for ((i, _), outcome) in leaving.into_iter().zip(left) {
            outcomes[i] = outcome;
        }
        Ok(outcomes)
    }
}
