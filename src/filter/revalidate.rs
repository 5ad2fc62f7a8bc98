//! Bindings stored under older rules, or whose owner has since lost a privilege, are found
//! and taken out of service with the reason, before anything evaluates them again (semantics 10).

use crate::error::Result;
use crate::filter::view::ViewRule;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// The binding's view as stored follows the rules for `owner`, who it is evaluated as (the
/// filter's predicate was checked for the filter's owner, who may be someone else).
pub fn check_binding(binding: i64, owner: pg_sys::Oid) -> Result<()> {
    ViewRule::of_binding(binding)?
        .check_allowed(owner)
        .map_err(|e| e.in_object(&format!("binding {binding}")))
}

/// Bindings whose predicate or mapped fields break today's rules for what a filter may contain
/// (made by an older version, or a privilege since revoked from the owner) go to state error
/// with the reason: capture skips them and the worker does not serve them. Returns how many.
pub fn revalidate_bindings() -> Result<usize> {
    let bindings: Vec<(i64, pg_sys::Oid)> = Spi::connect(|c| -> Result<Vec<(i64, pg_sys::Oid)>> {
        let mut bindings = Vec::new();
        for row in c.select(
            "SELECT id, owner::oid FROM listsync.bindings WHERE state IN ('active', 'paused') ORDER BY id",
            None,
            &[],
        )? {
            bindings.push((
                row.get(1)?.unwrap_or_default(),
                row.get(2)?.unwrap_or(pg_sys::InvalidOid),
            ));
        }
        Ok(bindings)
    })?;
    let mut refused = 0;
    for (binding, owner) in bindings {
        if let Err(reason) = check_binding(binding, owner) {
            refused += 1;
            Spi::run_with_args(
                "UPDATE listsync.bindings SET state = 'error', state_reason = $2, last_error = $2, last_error_at = now()
                  WHERE id = $1",
                &[binding.into(), reason.message.into()],
            )?;
        }
    }
    if refused > 0 {
        invalidate_bound_tables()?;
    }
    Ok(refused)
}

/// Makes every backend rebuild the capture state of every bound table at its next write.
pub fn invalidate_bound_tables() -> Result<()> {
    let tables: Vec<pg_sys::Oid> = Spi::get_one::<Vec<pg_sys::Oid>>(
        "SELECT coalesce(array_agg(DISTINCT c.oid), '{}') FROM listsync.bindings b
           JOIN pg_catalog.pg_class c ON c.oid = b.source::oid",
    )?
    .unwrap_or_default();
    for table in tables {
        // SAFETY: queues a relcache invalidation of the table, delivered at commit.
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(table) };
    }
    Ok(())
}
