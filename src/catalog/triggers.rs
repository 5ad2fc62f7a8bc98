//! The capture triggers' DDL: which tables carry them, and on which columns they fire.

use crate::error::Result;
use crate::query;
use pgrx::pg_sys;
use pgrx::prelude::*;

/// Installs, updates or removes the capture triggers of `relid` to match its bindings: the
/// column list of the row trigger is every column a binding's views read.
pub fn sync_triggers(relid: pg_sys::Oid) -> Result<()> {
    let exists = query::optional::<i32>(
        "SELECT 1 FROM pg_catalog.pg_class WHERE oid = $1",
        &[relid.into()],
    )?;
    if exists.is_none() {
        // The table was dropped (and its triggers with it).
        return Ok(());
    }
    let table = crate::names::relation_name(relid)?;
    let columns: Option<Vec<String>> = Spi::get_one_with_args(
        "SELECT array_agg(DISTINCT pg_catalog.quote_ident(a.attname::text))
           FROM listsync.bindings b
           JOIN listsync.filters f ON f.id = b.filter_id
           CROSS JOIN LATERAL (VALUES (pg_catalog.to_regclass(pg_catalog.format('listsync.%I', 'filter:' || f.name))),
                                      (pg_catalog.to_regclass(pg_catalog.format('listsync.%I', 'binding:' || b.id)))) v(view)
           JOIN pg_catalog.pg_rewrite r ON r.ev_class = v.view
           JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::regclass AND d.objid = r.oid
                AND d.refclassid = 'pg_catalog.pg_class'::regclass AND d.refobjid = $1 AND d.refobjsubid > 0
           JOIN pg_catalog.pg_attribute a ON a.attrelid = $1 AND a.attnum = d.refobjsubid
          WHERE b.source = $1::regclass AND b.state <> 'inactive'",
        &[relid.into()],
    )?;
    let installed: Vec<String> = Spi::get_one_with_args(
        "SELECT coalesce(array_agg(tgname::text), '{}') FROM pg_catalog.pg_trigger
          WHERE tgrelid = $1 AND tgname IN ('listsync_capture', 'listsync_capture_flush', 'listsync_capture_truncate')",
        &[relid.into()],
    )?
    .unwrap_or_default();
    for trigger in installed {
        Spi::run(&format!("DROP TRIGGER {trigger} ON {table}"))?;
    }
    if let Some(columns) = columns.filter(|c| !c.is_empty()) {
        let events = format!("INSERT OR DELETE OR UPDATE OF {}", columns.join(", "));
        Spi::run(&format!(
            "CREATE TRIGGER listsync_capture AFTER {events} ON {table} FOR EACH ROW EXECUTE FUNCTION listsync.capture()"
        ))?;
        Spi::run(&format!(
            "CREATE TRIGGER listsync_capture_flush AFTER {events} ON {table} FOR EACH STATEMENT EXECUTE FUNCTION listsync.capture_flush()"
        ))?;
        Spi::run(&format!(
            "CREATE TRIGGER listsync_capture_truncate AFTER TRUNCATE ON {table} FOR EACH STATEMENT EXECUTE FUNCTION listsync.capture_truncate()"
        ))?;
    }
    // SAFETY: queues a relcache invalidation, delivered to every backend at commit.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
    Ok(())
}
