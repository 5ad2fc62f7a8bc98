//! Whether this database's catalog (the extension's tables, views and functions) is the version
//! this library was built for.
//!
//! Installing a new package replaces the library at once, while every database keeps the
//! catalog of the version it last ran `CREATE` / `ALTER EXTENSION` for. Between the two, a
//! library reading tables that are not there yet fails with "relation does not exist" or worse;
//! instead every entry point that touches the catalog asks here first and says what to run.

use crate::error::{Error, Kind, Result};
use pgrx::prelude::*;
use std::cell::Cell;

pub const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

#[derive(Debug, PartialEq, Eq)]
pub enum Catalog {
    /// The extension is not installed in this database.
    Missing,
    Current,
    /// Installed at another version (`ALTER EXTENSION ... UPDATE` not run yet, or an older
    /// library installed over a newer catalog).
    Other(String),
}

pub fn installed() -> Catalog {
    let version = Spi::get_one::<String>(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_listsync'",
    );
    match version {
        Ok(Some(version)) if version == LIBRARY_VERSION => Catalog::Current,
        Ok(Some(version)) => Catalog::Other(version),
        Ok(None) | Err(_) => Catalog::Missing,
    }
}

thread_local! {
    /// Set once a call found the catalog current: updates only move forward, so a backend
    /// need not ask again.
    static FOUND_CURRENT: Cell<bool> = const { Cell::new(false) };
}

/// Refuses (55000) to work on a catalog of another version, naming both and the command that
/// brings them together.
pub fn require_current() -> Result<()> {
    if FOUND_CURRENT.get() {
        return Ok(());
    }
    match installed() {
        Catalog::Current => {
            FOUND_CURRENT.set(true);
            Ok(())
        }
        Catalog::Missing => Ok(()),
        Catalog::Other(version) => Err(mismatch(&version)),
    }
}

pub fn mismatch(catalog_version: &str) -> Error {
    let database = crate::names::current_database();
    Error::new(
        Kind::ObjectNotInPrerequisiteState,
        format!(
            "the pg_listsync library is version {LIBRARY_VERSION}, but database \"{database}\" holds the catalog of version {catalog_version}"
        ),
    )
    .with_detail("Nothing is captured or delivered in this database until the versions agree; changes already recorded are kept.")
    .with_hint(format!(
        "Run ALTER EXTENSION pg_listsync UPDATE in database \"{database}\" (or install the pg_listsync {catalog_version} package again)."
    ))
}
