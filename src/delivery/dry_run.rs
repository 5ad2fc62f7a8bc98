//! `dry_run`: the plan of every dirty pair of a binding, without sending anything.

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

/// What a resync of the binding would send now, computed exactly as the worker would.
pub fn dry_run(binding: i64) -> Result<Vec<DryRunStep>> {
    AsExtension::run(|| {
        let targets = load_targets(&[binding])?;
        let target = targets
            .get(&binding)
            .ok_or_else(|| Error::not_found("binding", &binding.to_string()))?;
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
