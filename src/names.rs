//! The names the extension gives its objects and reads back: the views that store filters and
//! bindings, and tables printed for our own SQL (always schema-qualified: it runs with a fixed
//! search_path).

use crate::error::{Error, Kind, Result};
use crate::privilege;
use listsync_core::conditions::quote_identifier;
use pgrx::pg_sys;
use pgrx::prelude::*;

pub fn filter_view(name: &str) -> String {
    format!("listsync.{}", quote_identifier(&format!("filter:{name}")))
}

pub fn binding_view(id: i64) -> String {
    format!("listsync.{}", quote_identifier(&format!("binding:{id}")))
}

/// `schema.table`, quoted as needed. A relation that does not exist (dropped since its OID was
/// read) is an error (42P01), never a bare OID that would end up in SQL text.
pub fn relation_name(relid: pg_sys::Oid) -> Result<String> {
    privilege::with_fixed_search_path(|| relation_name_now(relid))
}

/// [`relation_name`] for callers that already run under the fixed search_path.
pub fn relation_name_now(relid: pg_sys::Oid) -> Result<String> {
    crate::query::optional::<String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, c.relname)
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
        &[relid.into()],
    )?
    .ok_or_else(|| {
        Error::new(
            Kind::UndefinedTable,
            format!("relation with OID {} does not exist", relid.to_u32()),
        )
    })
}

/// The OID of the view (or any relation) named `qualified`, if it exists.
pub fn view_oid(qualified: &str) -> Result<Option<pg_sys::Oid>> {
    Ok(Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT pg_catalog.to_regclass($1)::oid",
        &[qualified.into()],
    )?)
}

/// The name of the database this backend is connected to.
pub fn current_database() -> String {
    // SAFETY: MyDatabaseId is set for any backend that can run SQL; get_database_name returns
    // a palloc'd copy or NULL for a database that is gone.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::MyDatabaseId);
        if name.is_null() {
            String::new()
        } else {
            std::ffi::CStr::from_ptr(name)
                .to_string_lossy()
                .into_owned()
        }
    }
}
