//! What the engine reads in a transaction: each binding's target, the desired state through
//! its view (as the owner), the recorded remote state, suppressions and erasures, and the plan
//! of each pair.

use crate::error::{Error, Kind, Result};
use crate::names::binding_view;
use crate::privilege::{self};
use listsync_core::plan::{self, Action, Recorded};
use listsync_core::providers::{self, MemberStatus, OnLeave};
use pgrx::prelude::*;
use pgrx::{JsonB, pg_sys};
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};

use super::*;

/// A binding as the engine serves it.
pub(super) struct Target {
    pub(super) owner: pg_sys::Oid,
    pub(super) connection: Connection,
    pub(super) binding: providers::Binding,
    /// Not part of `binding`: providers are handed only the action to apply, never `keep`.
    pub(super) on_leave: OnLeave,
    pub(super) needs_prepare: bool,
}

pub(super) fn load_targets(ids: &[i64]) -> Result<HashMap<i64, Target>> {
    Spi::connect(|c| {
        let mut targets = HashMap::new();
        for row in c.select(
            "SELECT b.id, b.filter_name, b.list_id, coalesce(b.list_name, b.list_id) AS list_name,
                    b.tags, ARRAY(SELECT jsonb_object_keys(b.fields)) AS fields, b.on_leave,
                    b.new_member_status, b.remote, b.owner::oid AS owner,
                    (b.list_id IS NULL OR NOT b.remote ? 'prepared_at') AS needs_prepare,
                    c.id AS connection_id, c.name AS connection_name, c.provider, c.settings,
                    s.secrets
               FROM listsync.bindings b
               JOIN listsync.connections c ON c.id = b.connection_id
               JOIN listsync.connection_secrets s ON s.connection_id = c.id
              WHERE b.id = ANY($1)",
            None,
            &[ids.to_vec().into()],
        )? {
            let id: i64 = row.get_by_name("id")?.unwrap_or_default();
            let on_leave: String = row.get_by_name("on_leave")?.unwrap_or_default();
            let on_leave = OnLeave::parse(&on_leave).ok_or_else(|| {
                Error::new(
                    Kind::InvalidParameter,
                    format!("binding {id} has an unknown on_leave \"{on_leave}\""),
                )
            })?;
            let status: Option<String> = row.get_by_name("new_member_status")?;
            let Some(new_member_status) = status.as_deref().and_then(MemberStatus::parse) else {
                return Err(Error::new(
                    Kind::InvalidParameter,
                    format!(
                        "binding {id} has an unknown new_member_status {:?}",
                        status.as_deref()
                    ),
                ));
            };
            let binding = providers::Binding {
                id,
                filter: row.get_by_name("filter_name")?.unwrap_or_default(),
                list_id: row.get_by_name("list_id")?,
                list_name: row.get_by_name("list_name")?.unwrap_or_default(),
                tags: row.get_by_name("tags")?.unwrap_or_default(),
                fields: row.get_by_name("fields")?.unwrap_or_default(),
                new_member_status,
                remote: row
                    .get_by_name::<JsonB, _>("remote")?
                    .and_then(|j| j.0.as_object().cloned())
                    .unwrap_or_default(),
            };
            let json = |column: &str| -> Result<Value> {
                Ok(row
                    .get_by_name::<JsonB, _>(column)?
                    .map(|j| j.0)
                    .unwrap_or_default())
            };
            targets.insert(
                id,
                Target {
                    owner: row.get_by_name("owner")?.unwrap_or(pg_sys::InvalidOid),
                    needs_prepare: row.get_by_name("needs_prepare")?.unwrap_or(true),
                    on_leave,
                    connection: Connection {
                        id: row.get_by_name("connection_id")?.unwrap_or_default(),
                        name: row.get_by_name("connection_name")?.unwrap_or_default(),
                        provider: row.get_by_name("provider")?.unwrap_or_default(),
                        settings: json("settings")?,
                        secrets: json("secrets")?,
                    },
                    binding,
                },
            );
        }
        Ok(targets)
    })
}

/// For each address the filter matches now, the mapped fields of its row (the row with the
/// greatest key when several rows share the address: semantics 4). Read as the binding's
/// owner, so row-level security applies.
pub(super) fn desired(
    binding: i64,
    owner: pg_sys::Oid,
    addresses: &[String],
) -> Result<HashMap<String, Map<String, Value>>> {
    let view = binding_view(binding);
    let keys: i64 = Spi::get_one_with_args(
        "SELECT count(*) FROM pg_catalog.pg_attribute WHERE attrelid = pg_catalog.to_regclass($1) AND attname::text LIKE 'key\\_%'",
        &[view.clone().into()],
    )?
    .unwrap_or(0);
    let order: String = (1..=keys).map(|i| format!(", key_{i} DESC")).collect();
    privilege::as_owner(owner, || {
        Spi::connect(|c| {
            let mut found = HashMap::with_capacity(addresses.len());
            for row in c.select(
                &format!(
                    "SELECT DISTINCT ON (address) address, fields FROM {view}
                      WHERE address = ANY($1) ORDER BY address{order}"
                ),
                None,
                &[addresses.to_vec().into()],
            )? {
                let address: String = row.get(1)?.unwrap_or_default();
                let fields = row
                    .get::<JsonB>(2)?
                    .and_then(|j| j.0.as_object().cloned())
                    .unwrap_or_default();
                found.insert(address, fields);
            }
            Ok(found)
        })
    })
}

/// The lookups of one batch's keys below read key by key (a LATERAL subquery the planner
/// cannot turn into a scan of the whole table), whatever the tables' statistics say.
pub(super) fn recorded(binding: i64, addresses: &[String]) -> Result<HashMap<String, Recorded>> {
    Spi::connect(|c| {
        let mut found = HashMap::new();
        for row in c.select(
            "SELECT m.address, m.status, m.remote_id, m.fields, m.verified
               FROM unnest($2::text[]) AS u(address),
                    LATERAL (SELECT * FROM listsync.members m
                              WHERE m.binding_id = $1 AND m.address = u.address LIMIT 1) m",
            None,
            &[binding.into(), addresses.to_vec().into()],
        )? {
            found.insert(
                row.get::<String>(1)?.unwrap_or_default(),
                Recorded {
                    status: row.get(2)?.unwrap_or_default(),
                    remote_id: row.get(3)?,
                    fields: row
                        .get::<JsonB>(4)?
                        .and_then(|j| j.0.as_object().cloned())
                        .unwrap_or_default(),
                    verified: row.get(5)?.unwrap_or(true),
                },
            );
        }
        Ok(found)
    })
}

pub(super) fn address_set(
    query: &str,
    binding: Option<i64>,
    addresses: &[String],
) -> Result<HashSet<String>> {
    Spi::connect(|c| {
        let mut found = HashSet::new();
        let args = match binding {
            Some(b) => vec![addresses.to_vec().into(), b.into()],
            None => vec![addresses.to_vec().into()],
        };
        for row in c.select(query, None, &args)? {
            found.insert(row.get::<String>(1)?.unwrap_or_default());
        }
        Ok(found)
    })
}

pub(super) fn suppressed(addresses: &[String]) -> Result<HashSet<String>> {
    address_set(
        "SELECT s.address FROM unnest($1::text[]) AS u(address),
                LATERAL (SELECT address FROM listsync.suppressions s WHERE s.address = u.address LIMIT 1) s",
        None,
        addresses,
    )
}

pub(super) fn erasures(binding: i64, addresses: &[String]) -> Result<HashSet<String>> {
    address_set(
        "SELECT e.address FROM unnest($1::text[]) AS u(address),
                LATERAL (SELECT address FROM listsync.erasures e
                          WHERE e.binding_id = $2 AND e.address = u.address LIMIT 1) e",
        Some(binding),
        addresses,
    )
}

/// The planned action for each address of one binding.
pub(super) struct Planned {
    pub(super) address: String,
    pub(super) action: Action,
    pub(super) fields: Map<String, Value>,
    pub(super) recorded: Option<Recorded>,
}

pub(super) fn plan_binding(
    binding: i64,
    owner: pg_sys::Oid,
    on_leave: OnLeave,
    addresses: &[String],
) -> Result<Vec<Planned>> {
    let desired = desired(binding, owner, addresses)?;
    let mut recorded = recorded(binding, addresses)?;
    let suppressed = suppressed(addresses)?;
    let erasures = erasures(binding, addresses)?;
    Ok(addresses
        .iter()
        .map(|address| {
            let wanted = desired.get(address);
            let known = recorded.remove(address);
            let action = plan::plan(
                wanted,
                known.as_ref(),
                suppressed.contains(address),
                erasures.contains(address),
                on_leave,
            );
            Planned {
                address: address.clone(),
                action,
                fields: wanted.cloned().unwrap_or_default(),
                recorded: known,
            }
        })
        .collect())
}

/// Recounts the rows the binding's filter matches whose email is not an address.
pub(super) fn recount_skipped(binding: i64, owner: pg_sys::Oid) -> Result<()> {
    let view = binding_view(binding);
    let count: i64 = privilege::as_owner(owner, || {
        Spi::get_one::<i64>(&format!(
            "SELECT count(*) FROM {view} WHERE address IS NULL"
        ))
    })?
    .unwrap_or(0);
    Spi::run_with_args(
        "UPDATE listsync.bindings SET skipped_invalid = $2 WHERE id = $1",
        &[binding.into(), count.into()],
    )?;
    Ok(())
}
