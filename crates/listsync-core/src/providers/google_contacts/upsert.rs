//! Upsert: members become contacts in the binding's groups. A member is found by its recorded
//! id, else in the directory; the ones found are updated with their etags and join the groups
//! they are not in yet, the others are created in them, within the account's cap.

use super::directory::identities_of;
use super::fields::{
    Update, Write, changed_fields, contact_fields, memberships, merge, set_client_data,
    update_body, wanted,
};
use super::{CONTACT_LIMIT, CREATED_KEY, Field, GoogleContacts, member};
use crate::http::{Http, Method, Request, Result, percent_encode};
use crate::providers::{Member, Outcome};
use serde_json::{Map, Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};

impl GoogleContacts {
    pub(super) fn upsert_batch(
        &mut self,
        http: &mut Http,
        groups: &[String],
        members: &[Member],
    ) -> Result<Vec<Outcome>> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; members.len()];
        let mut values = Vec::with_capacity(members.len());
        for (i, member) in members.iter().enumerate() {
            match wanted(member) {
                Ok(v) => values.push(v),
                Err(message) => {
                    outcomes[i] = Some(Outcome::failed(message));
                    values.push(Vec::new());
                }
            }
        }
        let live: Vec<usize> = (0..members.len())
            .filter(|i| outcomes[*i].is_none())
            .collect();

        // Who is who: recorded ids first; the directory for new addresses and for contacts
        // deleted at Google since.
        let mut names: Vec<Option<String>> = members
            .iter()
            .map(|m| m.remote_id.clone().filter(|r| r.starts_with("people/")))
            .collect();
        let known: Vec<String> = live.iter().filter_map(|i| names[*i].clone()).collect();
        let mut people = self.fetch(http, &known)?;
        for i in &live {
            if let Some(name) = names[*i].clone().filter(|n| !people.contains_key(n)) {
                self.forget(&name);
                names[*i] = None;
            }
        }
        let unresolved: Vec<usize> = live
            .iter()
            .copied()
            .filter(|i| names[*i].is_none())
            .collect();
        if !unresolved.is_empty() {
            let directory = self.refresh_directory(http)?;
            for i in &unresolved {
                names[*i] = directory.holders(&members[*i].address).first().cloned();
            }
            let found: Vec<String> = unresolved
                .iter()
                .filter_map(|i| names[*i].clone())
                .collect();
            people.extend(self.fetch(http, &found)?);
            for i in &unresolved {
                if names[*i].as_ref().is_some_and(|n| !people.contains_key(n)) {
                    names[*i] = None;
                }
            }
        }

        let mut updates: BTreeMap<String, Update> = BTreeMap::new();
        let mut creates: Vec<(usize, Map<String, Value>)> = Vec::new();
        for i in live {
            match names[i].clone() {
                Some(name) => {
                    let person = people[&name].clone();
                    updates
                        .entry(name)
                        .or_insert_with(|| Update {
                            person,
                            members: Vec::new(),
                        })
                        .members
                        .push(i);
                }
                None => match merge(Map::new(), &members[i].address, &values[i]) {
                    Ok(fields) => creates.push((i, fields)),
                    Err(message) => outcomes[i] = Some(Outcome::failed(message)),
                },
            }
        }

        self.create(http, groups, members, creates, &mut outcomes)?;
        let settled = self.update(http, members, &values, updates, &mut outcomes)?;
        self.join_groups(http, groups, settled, &mut outcomes)?;
        Ok(outcomes
            .into_iter()
            .map(|o| o.unwrap_or_else(|| Outcome::retry("Google did not report this contact")))
            .collect())
    }

    /// Creates contacts in the binding's groups, within the account's cap.
    fn create(
        &mut self,
        http: &mut Http,
        groups: &[String],
        members: &[Member],
        mut creates: Vec<(usize, Map<String, Value>)>,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<()> {
        if creates.is_empty() {
            return Ok(());
        }
        let held = self.directory.as_ref().map_or(0, |d| d.people.len());
        let room = CONTACT_LIMIT.saturating_sub(held);
        for (i, _) in creates.iter().skip(room) {
            outcomes[*i] = Some(Outcome::failed(format!(
                "not created: a Google account holds at most {CONTACT_LIMIT} contacts and this one has {held}"
            )));
        }
        creates.truncate(room);
        if creates.is_empty() {
            return Ok(());
        }
        let memberships: Vec<Value> = groups
            .iter()
            .map(|g| json!({"contactGroupMembership": {"contactGroupResourceName": g}}))
            .collect();
        let people: Vec<Value> = creates
            .iter_mut()
            .map(|(_, fields)| {
                set_client_data(fields, CREATED_KEY, Some("true"));
                let mut person = Value::Object(fields.clone());
                person["memberships"] = Value::Array(memberships.clone());
                person
            })
            .collect();
        let body = json!({
            "contacts": people.iter().map(|p| json!({"contactPerson": p})).collect::<Vec<_>>(),
            "readMask": "emailAddresses,metadata,phoneNumbers",
        });
        match self.post(
            http,
            "create contacts",
            "/people:batchCreateContacts",
            &body,
        )? {
            Ok(answer) => {
                // Matched by identity: Google answers in request order, but says so nowhere. A
                // new contact's first identity is its member's (see `merge`); a later one can be
                // another member's too (a mapped phone that is another row's identity).
                let mut created: HashMap<String, String> = HashMap::new();
                for entry in answer["createdPeople"].as_array().into_iter().flatten() {
                    let person = &entry["person"];
                    if let (Some(rn), Some(identity)) = (
                        person["resourceName"].as_str(),
                        identities_of(person).into_iter().next(),
                    ) {
                        created.insert(identity, rn.to_string());
                    }
                }
                for (i, fields) in &creates {
                    if let Some(rn) = created.get(&members[*i].address.to_lowercase()) {
                        self.remember(rn, fields);
                        outcomes[*i] = Some(member(rn.clone()));
                    }
                }
            }
            // One invalid contact fails the whole batch: find it by creating one at a time.
            Err(_) => {
                for (person, (i, fields)) in people.iter().zip(&creates) {
                    let request = Request::new(
                        Method::Post,
                        format!("{}/people:createContact?personFields=metadata", self.api),
                    )
                    .json(person);
                    outcomes[*i] = Some(match self.call(http, "create contact", request)? {
                        Ok(created) => match created["resourceName"].as_str() {
                            Some(rn) => {
                                self.remember(rn, fields);
                                member(rn.to_string())
                            }
                            None => {
                                Outcome::retry("Google created the contact without a resource name")
                            }
                        },
                        Err(e) => Outcome::failed(e.to_string()),
                    });
                }
            }
        }
        Ok(())
    }

    /// Writes the mapped fields of existing contacts with their etags. Returns the contacts
    /// now right, by name (a name may change on update), with the members they serve.
    fn update(
        &mut self,
        http: &mut Http,
        members: &[Member],
        values: &[Vec<(Field, Option<String>)>],
        updates: BTreeMap<String, Update>,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<Vec<(String, Value, Vec<usize>)>> {
        let plan = |person: &Value, served: &[usize]| {
            let before = contact_fields(person);
            let mut after = before.clone();
            for i in served {
                after = merge(after, &members[*i].address, &values[*i])?;
            }
            let changed = changed_fields(&before, &after);
            Ok::<_, String>((after, changed))
        };
        let mut settled = Vec::new();
        let mut pending: Vec<Write> = Vec::new();
        for (name, update) in updates {
            match plan(&update.person, &update.members) {
                Err(message) => {
                    for i in &update.members {
                        outcomes[*i] = Some(Outcome::failed(message.clone()));
                    }
                }
                Ok((_, changed)) if changed.is_empty() => {
                    settled.push((name, update.person, update.members));
                }
                Ok((fields, changed)) => pending.push(Write {
                    name,
                    update,
                    fields,
                    changed,
                }),
            }
        }
        if pending.is_empty() {
            return Ok(settled);
        }
        let mask: BTreeSet<&str> = pending
            .iter()
            .flat_map(|w| w.changed.iter().copied())
            .collect();
        let contacts: Map<String, Value> = pending
            .iter()
            .map(|w| {
                (
                    w.name.clone(),
                    update_body(&w.update.person, &w.fields, &mask),
                )
            })
            .collect();
        let body = json!({
            "contacts": contacts,
            "updateMask": mask.iter().copied().collect::<Vec<_>>().join(","),
            "readMask": "emailAddresses,memberships,metadata",
        });
        if let Ok(answer) = self.post(
            http,
            "update contacts",
            "/people:batchUpdateContacts",
            &body,
        )? {
            for Write {
                name,
                update,
                fields,
                ..
            } in pending
            {
                let person = &answer["updateResult"][&name]["person"];
                let current = person["resourceName"].as_str().unwrap_or(&name).to_string();
                if current != name {
                    self.forget(&name);
                }
                self.remember(&current, &fields);
                settled.push((current, update.person, update.members));
            }
            return Ok(settled);
        }
        // Google refused the batch (a stale etag: the user edited a contact meanwhile; or one
        // invalid contact): one at a time, re-reading a contact whose etag went stale.
        for Write {
            name,
            mut update,
            mut fields,
            mut changed,
        } in pending
        {
            let mut attempts = 0;
            let result = loop {
                attempts += 1;
                let path = format!(
                    "{}/{name}:updateContact?updatePersonFields={}&personFields=memberships%2Cmetadata",
                    self.api,
                    percent_encode(&changed.iter().copied().collect::<Vec<_>>().join(","))
                );
                let request = Request::new(Method::Patch, path).json(&update_body(
                    &update.person,
                    &fields,
                    &changed,
                ));
                match self.call(http, "update contact", request)? {
                    Ok(person) => break Ok(person),
                    Err(e) if e.is_stale_etag() && attempts == 1 => {
                        let Some(fresh) =
                            self.fetch(http, std::slice::from_ref(&name))?.remove(&name)
                        else {
                            break Err(Outcome::retry(format!(
                                "the contact was deleted at Google meanwhile: {e}"
                            )));
                        };
                        update.person = fresh;
                        match plan(&update.person, &update.members) {
                            Ok((_, c)) if c.is_empty() => break Ok(update.person.clone()),
                            Ok((f, c)) => (fields, changed) = (f, c),
                            Err(message) => break Err(Outcome::failed(message)),
                        }
                    }
                    Err(e) if e.is_stale_etag() => break Err(Outcome::retry(e.to_string())),
                    Err(e) if e.http == 404 => {
                        self.forget(&name);
                        break Err(Outcome::retry(format!(
                            "the contact was deleted at Google meanwhile: {e}"
                        )));
                    }
                    Err(e) => break Err(Outcome::failed(e.to_string())),
                }
            };
            match result {
                Ok(person) => {
                    let current = person["resourceName"].as_str().unwrap_or(&name).to_string();
                    if current != name {
                        self.forget(&name);
                    }
                    self.remember(&current, &fields);
                    settled.push((current, update.person, update.members));
                }
                Err(outcome) => {
                    for i in &update.members {
                        outcomes[*i] = Some(outcome.clone());
                    }
                }
            }
        }
        Ok(settled)
    }

    /// Adds existing contacts to the binding's groups they are not in yet.
    fn join_groups(
        &mut self,
        http: &mut Http,
        groups: &[String],
        settled: Vec<(String, Value, Vec<usize>)>,
        outcomes: &mut [Option<Outcome>],
    ) -> Result<()> {
        let mut missing = BTreeSet::new();
        for group in groups {
            let joining: Vec<String> = settled
                .iter()
                .filter(|(_, person, _)| !memberships(person).contains(group))
                .map(|(name, _, _)| name.clone())
                .collect();
            if !joining.is_empty() {
                missing.extend(self.modify(http, group, &joining, &[])?.0);
            }
        }
        for (name, _, served) in settled {
            for i in served {
                outcomes[i] = Some(if missing.contains(&name) {
                    self.forget(&name);
                    Outcome::retry("the contact was deleted at Google meanwhile")
                } else {
                    member(name.clone())
                });
            }
        }
        Ok(())
    }
}
