//! `dry_run`: the plan of every dirty pair of a binding, without sending anything; `explain`:
//! everything that decides one address's place in a binding's list.

use crate::error::{Error, Result};
use crate::names::binding_view;
use crate::privilege::{self, AsExtension};
use listsync_core::plan::Action;
use pgrx::prelude::*;
use serde_json::Value;

use super::*;

pub struct DryRunStep {
    pub address: String,
    pub operation: String,
    pub fields: Option<Value>,
    pub reason: Option<String>,
}

/// What a resync of the binding would send now, computed exactly as the worker would: for
/// every address the filter matches or the provider was given, or for `only` that address.
pub fn dry_run(binding: i64, only: Option<&str>) -> Result<Vec<DryRunStep>> {
    let only = only.map(normalized).transpose()?;
    AsExtension::run(|| {
        let targets = load_targets(&[binding])?;
        let target = targets
            .get(&binding)
            .ok_or_else(|| Error::not_found("binding", &binding.to_string()))?;
        let addresses = match only {
            Some(address) => vec![address],
            None => {
                let view = binding_view(binding);
                let mut addresses: Vec<String> = privilege::as_owner(target.owner, || {
                    Spi::get_one::<Vec<String>>(&format!(
                        "SELECT coalesce(array_agg(DISTINCT address), '{{}}') FROM {view} WHERE address IS NOT NULL"
                    ))
                })?
                .unwrap_or_default();
                addresses.extend(
                    Spi::get_one_with_args::<Vec<String>>(
                        "SELECT coalesce(array_agg(address), '{}') FROM listsync.members WHERE binding_id = $1",
                        &[binding.into()],
                    )?
                    .unwrap_or_default(),
                );
                addresses.sort_unstable();
                addresses.dedup();
                addresses
            }
        };
        let mut steps = Vec::new();
        for chunk in addresses.chunks(5_000) {
            for planned in plan_binding(binding, target.owner, target.on_leave, chunk)? {
                let reason = match &planned.action {
                    Action::Nothing => continue,
                    Action::Refrain(why) => Some(why.clone()),
                    _ => None,
                };
                let fields = matches!(planned.action, Action::Add | Action::Update)
                    .then(|| Value::Object(planned.fields.clone()));
                steps.push(DryRunStep {
                    address: planned.address,
                    operation: planned.action.describe().into(),
                    fields,
                    reason,
                });
            }
        }
        Ok(steps)
    })
}

/// Why `raw_address` is or is not in the binding's list: the rows the filter matches for it,
/// what was recorded at the provider, suppression, a pending change or a dead letter, and what
/// the worker would do with it now (computed as the worker plans it).
pub fn explain(binding: i64, raw_address: &str) -> Result<Value> {
    let address = normalized(raw_address)?;
    AsExtension::run(|| {
        let targets = load_targets(&[binding])?;
        let target = targets
            .get(&binding)
            .ok_or_else(|| Error::not_found("binding", &binding.to_string()))?;
        let view = binding_view(binding);
        let matching = privilege::as_owner(target.owner, || {
            Spi::get_one_with_args::<pgrx::JsonB>(
                &format!("SELECT coalesce(jsonb_agg(to_jsonb(v) - 'address'), '[]') FROM {view} v WHERE address = $1"),
                &[address.clone().into()],
            )
        })?
        .map(|j| j.0)
        .unwrap_or(Value::Null);
        let matching = with_key_names(binding, matching)?;
        let row = |sql: &str, args: &[pgrx::datum::DatumWithOid]| -> Result<Value> {
            Ok(crate::query::optional::<pgrx::JsonB>(sql, args)?
                .map(|j| j.0)
                .unwrap_or(Value::Null))
        };
        let pair = [binding.into(), address.clone().into()];
        let member = row(
            "SELECT to_jsonb(m) - 'binding_id' - 'address' FROM listsync.members m WHERE binding_id = $1 AND address = $2",
            &pair,
        )?;
        let pending = row(
            "SELECT to_jsonb(o) - 'binding_id' - 'address' FROM listsync.outbox o WHERE binding_id = $1 AND address = $2",
            &pair,
        )?;
        let dead_letter = row(
            "SELECT to_jsonb(d) - 'binding_id' - 'address' FROM listsync.dead_letter_items d WHERE binding_id = $1 AND address = $2",
            &pair,
        )?;
        let suppressed = row(
            "SELECT to_jsonb(s) - 'address' FROM listsync.suppressions s WHERE address = $1",
            &[address.clone().into()],
        )?;
        let planned = plan_binding(
            binding,
            target.owner,
            target.on_leave,
            std::slice::from_ref(&address),
        )?
        .into_iter()
        .next()
        .ok_or_else(|| Error::internal("no plan for the address"))?;
        let on_the_list = planned.recorded.as_ref().is_some_and(|r| r.is_member());
        let next = serde_json::json!({
            "operation": planned.action.describe(),
            "fields": matches!(planned.action, Action::Add | Action::Update).then(|| Value::Object(planned.fields.clone())),
            "reason": match &planned.action { Action::Refrain(why) => Some(why.clone()), _ => None },
        });
        Ok(serde_json::json!({
            "binding": binding,
            "address": address,
            "matching_rows": matching,
            "on_the_list": on_the_list,
            "member": member,
            "suppressed": suppressed,
            "pending": pending,
            "dead_letter": dead_letter,
            "next": next,
        }))
    })
}

/// The binding view names the table's key columns `key_1`, ...: show the table's own names.
fn with_key_names(binding: i64, mut rows: Value) -> Result<Value> {
    let names: Vec<String> = Spi::get_one_with_args::<Vec<String>>(
        "SELECT coalesce(array_agg(a.attname::text ORDER BY array_position(i.indkey::int2[], a.attnum)), '{}')
           FROM listsync.bindings b
           JOIN pg_catalog.pg_index i ON i.indrelid = b.source::oid AND i.indisprimary
           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
          WHERE b.id = $1",
        &[binding.into()],
    )?
    .unwrap_or_default();
    for row in rows.as_array_mut().into_iter().flatten() {
        if let Some(columns) = row.as_object_mut() {
            for (i, name) in names.iter().enumerate() {
                if let Some(value) = columns.remove(&format!("key_{}", i + 1)) {
                    columns.insert(name.clone(), value);
                }
            }
        }
    }
    Ok(rows)
}

/// An address as the binding's view normalizes it, or a clear error.
fn normalized(raw: &str) -> Result<String> {
    listsync_core::address::normalize(raw).ok_or_else(|| {
        Error::invalid(format!("\"{raw}\" is not an email address"))
            .with_hint("Give the address as the filter's email column holds it; it is normalized as the binding's view does.")
    })
}
