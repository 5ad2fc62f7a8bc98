//! The SQL API, one file per object it manages: `connections`, `filters`, `bindings`,
//! `addresses`, `operations`, and the capture triggers' DDL in `triggers` (the public contract
//! is in `docs/design.md`). Each function checks its caller's rights and its arguments, then does
//! its catalog work with the extension's rights (`privilege::AsExtension`).
//!
//! A filter is stored as a view, `listsync."filter:<name>"`, selecting the email and key columns
//! of the rows the predicate matches; a binding as a view `listsync."binding:<id>"` adding the
//! normalized address and the mapped fields. PostgreSQL then does for us what semantics 9 asks:
//! the views follow column renames, refuse to let a column they read be dropped or retyped,
//! and pg_dump recreates them from their definition. The capture trigger reads its predicates
//! from these views' rules, and the worker reads desired state through them.

use crate::error::{Error, Kind, OrRaise, Result, required};
use crate::filter::compile::compile_predicate;
use crate::filter::view::ViewRule;
use crate::names::{binding_view, filter_view, relation_name, relation_name_now, view_oid};
use crate::outbox::{BULK_PRIORITY, ON_CONFLICT_DIRTY};
use crate::privilege::{self, AsExtension};
use crate::sql_types::{Jsonb, Regclass, Regprocedure};
use listsync_core::conditions::{self, ColumnKind, escape_literal, quote_identifier};
use listsync_core::providers;
use pgrx::prelude::*;
use pgrx::{JsonB, pg_sys};
use serde_json::Value;
use std::collections::BTreeMap;

mod addresses;
mod bindings;
mod connections;
mod filters;
mod operations;
mod rows;
pub mod triggers;
mod views;

pub const MAX_FILTER_NAME_BYTES: usize = 56;

/// A NULL jsonb argument stays `None`; a value too deeply nested is refused (22023).
pub(super) fn json_argument(argument: Option<Jsonb>, name: &str) -> Result<Option<Value>> {
    argument.map(|json| json.parse(name)).transpose()
}

pub struct Column {
    pub name: String,
    pub category: char,
    pub type_name: String,
}

pub struct Table {
    pub relid: pg_sys::Oid,
    pub name: String,
    pub columns: Vec<Column>,
    pub key: Vec<String>,
}

impl Table {
    /// Reads the table's shape from the catalogs (under the fixed search_path: it runs in the
    /// caller's backend).
    pub fn load(relid: pg_sys::Oid) -> Result<Table> {
        privilege::with_fixed_search_path(|| Table::load_now(relid))
    }

    fn load_now(relid: pg_sys::Oid) -> Result<Table> {
        let name = relation_name_now(relid)?;
        let kind: Option<String> = crate::query::optional(
            "SELECT relkind::text FROM pg_catalog.pg_class WHERE oid = $1",
            &[relid.into()],
        )?;
        match kind.as_deref() {
            Some("r") | Some("p") => {}
            Some(_) => {
                return Err(Error::new(Kind::FeatureNotSupported, format!("\"{name}\" is not a table"))
                    .with_hint("Filters are defined over tables (or partitioned tables); writes through views reach the table's triggers."));
            }
            None => {
                return Err(Error::new(
                    Kind::UndefinedTable,
                    format!("relation with OID {} does not exist", relid.to_u32()),
                ));
            }
        }
        let columns = Spi::connect(|c| -> Result<Vec<Column>> {
            let mut columns = Vec::new();
            let rows = c.select(
                "SELECT a.attname::text, t.typcategory::text, pg_catalog.format_type(a.atttypid, a.atttypmod)
                   FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
                  WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
                  ORDER BY a.attnum",
                None,
                &[relid.into()],
            )?;
            for row in rows {
                columns.push(Column {
                    name: row.get::<String>(1)?.unwrap_or_default(),
                    category: row
                        .get::<String>(2)?
                        .and_then(|s| s.chars().next())
                        .unwrap_or('X'),
                    type_name: row.get::<String>(3)?.unwrap_or_default(),
                });
            }
            Ok(columns)
        })?;
        let key: Vec<String> = Spi::get_one_with_args::<Vec<String>>(
            "SELECT pg_catalog.array_agg(a.attname::text ORDER BY k.ord)
               FROM pg_catalog.pg_index i,
                    unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord),
                    pg_catalog.pg_attribute a
              WHERE i.indrelid = $1 AND i.indisprimary
                AND a.attrelid = i.indrelid AND a.attnum = k.attnum",
            &[relid.into()],
        )?
        .unwrap_or_default();
        Ok(Table {
            relid,
            name,
            columns,
            key,
        })
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    fn column_kind(&self, name: &str) -> Option<ColumnKind> {
        self.column(name).map(|c| match c.category {
            'S' => ColumnKind::Text,
            'A' => ColumnKind::Array,
            'D' if c.type_name == "date" => ColumnKind::Date,
            'D' if c.type_name.starts_with("timestamp") => ColumnKind::Timestamp,
            _ => ColumnKind::Other,
        })
    }

    fn require_key(&self, filter: &str) -> Result<()> {
        if self.key.is_empty() {
            return Err(Error::new(
                Kind::ObjectNotInPrerequisiteState,
                format!("filter \"{filter}\": table {} has no primary key", self.name),
            )
            .with_hint("pg_listsync needs a primary key to pick one row per address deterministically; add one."));
        }
        Ok(())
    }

    fn require_text_column(&self, filter: &str, role: &str, column: &str) -> Result<()> {
        let email_column = column;
        match self.column(email_column) {
            None => Err(Error::new(
                Kind::UndefinedColumn,
                format!(
                    "filter \"{filter}\": column \"{email_column}\" of table {} does not exist",
                    self.name
                ),
            )
            .with_hint(format!(
                "Name the column holding the {role} with {role}_column => '...'."
            ))),
            Some(c) if c.category != 'S' => Err(Error::new(
                Kind::DatatypeMismatch,
                format!(
                    "filter \"{filter}\": {role} column \"{email_column}\" is of type {}, not a text type",
                    c.type_name
                ),
            )),
            Some(_) => Ok(()),
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// An OID as an SPI argument, the invalid OID included (pgrx passes that as NULL).
pub(super) fn oid_argument(oid: pg_sys::Oid) -> pgrx::datum::DatumWithOid<'static> {
    i64::from(oid.to_u32()).into()
}

/// The caller has the privileges of `owner`, or is an admin.
pub(super) fn caller_owns(owner: pg_sys::Oid) -> bool {
    // SAFETY: role membership check by OIDs.
    let has_privileges = unsafe { pg_sys::has_privs_of_role(privilege::caller(), owner) };
    has_privileges || privilege::require_admin("").is_ok()
}

pub(super) fn require_owner(what: &str, owner: pg_sys::Oid) -> Result<()> {
    if caller_owns(owner) {
        return Ok(());
    }
    Err(Error::new(
        Kind::InsufficientPrivilege,
        format!("must be owner of {what}"),
    )
    .with_detail(format!(
        "{what} is owned by role \"{}\".",
        privilege::role_name(owner)
    )))
}

pub(super) fn check_name(what: &str, name: &str, max_bytes: usize) -> Result<()> {
    if name.trim().is_empty() || name.len() > max_bytes || name.chars().any(char::is_control) {
        return Err(
            Error::new(Kind::InvalidName, format!("invalid {what} name \"{name}\"")).with_hint(
                format!("A {what} name is 1 to {max_bytes} bytes of printable characters."),
            ),
        );
    }
    Ok(())
}
