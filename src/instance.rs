//! Which cluster and database this catalog's deliveries belong to (`listsync.instance`), so that
//! a restored dump or a cloned database does not deliver to the original's lists until an
//! administrator says it should (`listsync.confirm_restore()`).

use crate::error::Result;
use pgrx::prelude::*;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub system_identifier: String,
    pub database: u32,
}

impl Instance {
    /// The cluster and database this backend runs in.
    pub fn here() -> Instance {
        // SAFETY: both are read-only backend globals, set before any SQL runs.
        let (system_identifier, database) =
            unsafe { (pg_sys::GetSystemIdentifier(), pg_sys::MyDatabaseId.to_u32()) };
        Instance {
            system_identifier: system_identifier.to_string(),
            database,
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "cluster {} database oid {}",
            self.system_identifier, self.database
        )
    }
}

/// Where the catalog was bound, if a binding was ever made.
pub fn recorded() -> Result<Option<Instance>> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT system_identifier, database FROM listsync.instance",
            None,
            &[],
        )?;
        if rows.is_empty() {
            return Ok(None);
        }
        let row = rows.first();
        Ok(Some(Instance {
            system_identifier: row.get::<String>(1)?.unwrap_or_default(),
            database: row.get::<pg_sys::Oid>(2)?.map(|o| o.to_u32()).unwrap_or(0),
        }))
    })
}

/// The instance the catalog was bound in, when that is not this one: a restore or a clone that
/// nobody confirmed yet.
pub fn unconfirmed_copy_of() -> Result<Option<Instance>> {
    Ok(recorded()?.filter(|original| *original != Instance::here()))
}

/// Records this instance as the catalog's own; with `replace`, over what a restore brought.
pub fn record_here(replace: bool) -> Result<()> {
    let here = Instance::here();
    let conflict = if replace {
        "DO UPDATE SET system_identifier = EXCLUDED.system_identifier, database = EXCLUDED.database, recorded_at = now()"
    } else {
        "DO NOTHING"
    };
    Spi::run_with_args(
        &format!(
            "INSERT INTO listsync.instance (system_identifier, database) VALUES ($1, $2)
             ON CONFLICT (singleton) {conflict}"
        ),
        &[
            here.system_identifier.into(),
            pg_sys::Oid::from(here.database).into(),
        ],
    )?;
    Ok(())
}
